#!/usr/bin/env bash
# Compares chatmq with Mosquitto and rumqttd on this machine (see README.md).
# Installs what it needs (Mosquitto from Debian, clang for RocksDB), builds
# chatmq and chatmq-load in release, builds rumqttd 0.20 from crates.io in
# rumqttd-baseline/ (its own target dir), then runs `chatmq-load compare`.
# Extra arguments go to chatmq-load compare (e.g. --duration 5, --only chat).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

"$root/scripts/setup.sh"
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
if [ ! -x "$mosquitto" ]; then
  echo "compare: installing mosquitto" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  mosquitto=/usr/sbin/mosquitto
fi

target=${CARGO_TARGET_DIR:-$root/target}
(cd "$root" && cargo build --release --workspace --bins)
(cd "$here/rumqttd-baseline" && CARGO_TARGET_DIR="$here/rumqttd-baseline/target" cargo build --release)

# `--only restart` and `--only scale` write their own file, so that
# latest.json keeps the full comparison.
only=""
prev=""
for a in "$@"; do
  case "$a" in --only=*) only=${a#--only=} ;; esac
  if [ "$prev" = "--only" ]; then only=$a; fi
  prev=$a
done
case "$only" in
  restart | scale) results="$here/results/$only.json" ;;
  *) results="$here/results/latest.json" ;;
esac

# The scale run holds as many sockets as it can, twice (both ends on this
# machine): lift the kernel's limits where we may, and say what changed.
if [ "$only" = scale ] && [ "$(id -u)" = 0 ]; then
  for kv in fs.nr_open=2200000 fs.file-max=4400000 net.ipv4.ip_local_port_range="1024 65535"; do
    key=${kv%%=*}
    echo "compare: sysctl $key: $(sysctl -n "$key" | tr '\t' ' ') -> ${kv#*=}" >&2
    sysctl -q -w "$kv" || echo "compare: could not set $key" >&2
  done
  ulimit -n 2100000 2>/dev/null || echo "compare: open files stay at $(ulimit -Hn) (hard limit; raising it needs CAP_SYS_RESOURCE)" >&2
fi
# Thousands of sockets for the storm, idle and group scenarios.
ulimit -n 2100000 2>/dev/null || ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
mkdir -p "$here/results"
"$target/release/chatmq-load" compare \
  --chatmq-bin "$target/release/chatmq" \
  --mosquitto-bin "$mosquitto" \
  --rumqttd-bin "$here/rumqttd-baseline/target/release/rumqttd-baseline" \
  --json "$results" "$@"
cd "$root" && "$target/release/chatmq-load" plot
