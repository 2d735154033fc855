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

# Thousands of sockets for the storm and idle scenarios.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
mkdir -p "$here/results"
exec "$target/release/chatmq-load" compare \
  --chatmq-bin "$target/release/chatmq" \
  --mosquitto-bin "$mosquitto" \
  --rumqttd-bin "$here/rumqttd-baseline/target/release/rumqttd-baseline" \
  --json "$here/results/latest.json" "$@"
