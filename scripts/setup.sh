#!/usr/bin/env bash
# Installs what building and testing chatmq needs and is not on a fresh
# machine: clang and libclang (RocksDB's bindings), the Mosquitto clients
# and paho-mqtt (third-party clients the tests drive), openssl (test keys). Idempotent and quiet
# when everything is there. Needs root for apt-get (or sudo).
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v clang >/dev/null 2>&1 || missing+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || missing+=(libclang-dev)
if [ "${1:-}" = "--test" ]; then
  command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
  # Push tests generate RSA (FCM) and EC (APNs) keys with it.
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "${1:-}" = "--test" ]; then
  if ! python3 -c 'import paho.mqtt' >/dev/null 2>&1; then
    echo "setup: installing paho-mqtt" >&2
    python3 -m pip install -q 'paho-mqtt>=2,<3'
  fi
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is missing: install Rust (rustup) first" >&2; exit 1; }
