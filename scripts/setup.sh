#!/usr/bin/env bash
# Installs what building and testing chatmq needs and is not on a fresh
# machine: clang and libclang (RocksDB's bindings), Mosquitto and its
# clients and paho-mqtt (third-party clients the tests drive), openssl (test keys),
# Chromium, Node and the web demo's npm packages (the browser tests),
# nats-server (the [cluster] tests run a JetStream cluster of it), and
# cargo-fuzz when the nightly toolchain is there (the fuzz smoke run).
# Idempotent and quiet when everything is there. Needs root for apt-get (or sudo).
#
#   scripts/setup.sh          what building needs
#   scripts/setup.sh --test   and what the tests need, and builds the web demo
#   scripts/setup.sh --web    and what the web demo needs, and builds it
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v clang >/dev/null 2>&1 || missing+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || missing+=(libclang-dev)
if [ "$mode" = "--test" ]; then
  command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
  # The broker itself: the MQTT bridge tests run one as the remote.
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  # Push tests generate RSA (FCM) and EC (APNs) keys with it.
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  # The [cluster] tests (tests/src/nats.rs) run 3 of it; Debian's is 2.9.10.
  command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
fi
if [ "$mode" = "--test" ] || [ "$mode" = "--web" ]; then
  command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "$mode" = "--test" ]; then
  if ! python3 -c 'import paho.mqtt' >/dev/null 2>&1; then
    echo "setup: installing paho-mqtt" >&2
    python3 -m pip install -q 'paho-mqtt>=2,<3'
  fi
fi

# The web demo and its SDK (mobile-demo/web): packages from the lock file
# when it changed, with the devDependencies the tests use (playwright-core,
# fake-indexeddb, typescript), then the bundle in dist/ (esbuild: well
# under a second).
if [ "$mode" = "--test" ] || [ "$mode" = "--web" ]; then
  (
    cd mobile-demo/web
    if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
      echo "setup: npm ci in mobile-demo/web" >&2
      npm ci --include=dev --no-audit --no-fund --loglevel=error >/dev/null
    fi
    npm run build --silent >/dev/null
  )
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is missing: install Rust (rustup) first" >&2; exit 1; }

# The fuzz smoke run of scripts/test.sh: cargo-fuzz (from crates.io), when
# the nightly toolchain it drives is there.
if [ "$mode" = "--test" ] && command -v rustup >/dev/null 2>&1 \
  && rustup run nightly rustc --version >/dev/null 2>&1 \
  && ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz" >&2
  cargo +stable install --quiet --locked cargo-fuzz
fi
