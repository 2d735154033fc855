#!/usr/bin/env bash
# The cluster benchmark (issue #12 item 11): the same QoS 1 chat load
# against one chatmq node and against a cluster of three chatmq nodes on
# three nats-servers, side by side on this machine, with the members of
# each conversation spread over the three nodes. Everything on free
# loopback ports and in a temporary directory. Writes
# benches/results/cluster.json (both outcomes) and prints the table.
# Extra arguments go to both `chatmq-load run chat` (e.g. --duration 20).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
"$root/scripts/setup.sh" --test >/dev/null
target=${CARGO_TARGET_DIR:-$root/target}
(cd "$root" && cargo build --release --workspace --bins)
chatmq="$target/release/chatmq"
load="$target/release/chatmq-load"

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
secret="cluster-bench-secret-0123456789abcdef"

# Three routed nats-servers with JetStream.
declare -a nats_ports route_ports
for i in 1 2 3; do nats_ports[$i]=$(free_port); route_ports[$i]=$(free_port); done
routes=""
for i in 1 2 3; do routes+="\"nats-route://127.0.0.1:${route_ports[$i]}\", "; done
for i in 1 2 3; do
  mkdir -p "$tmp/nats$i"
  cat >"$tmp/nats$i.conf" <<EOF
server_name: n$i
listen: "127.0.0.1:${nats_ports[$i]}"
jetstream { store_dir: "$tmp/nats$i", max_memory_store: 256MB, max_file_store: 4GB }
cluster { name: bench, listen: "127.0.0.1:${route_ports[$i]}", routes: [${routes%, }] }
EOF
  nats-server -c "$tmp/nats$i.conf" >"$tmp/nats$i.log" 2>&1 &
  pids+=($!)
done
urls="\"nats://127.0.0.1:${nats_ports[1]}\", \"nats://127.0.0.1:${nats_ports[2]}\", \"nats://127.0.0.1:${nats_ports[3]}\""

# A chatmq node: $1 name, $2 MQTT port, $3 HTTP port, $4 the [cluster]
# section (empty for the single node).
start_chatmq() {
  mkdir -p "$tmp/$1"
  cat >"$tmp/$1.toml" <<EOF
[node]
data_dir = "$tmp/$1/data"
[mqtt]
listen = "127.0.0.1:$2"
max_connections_per_ip = 0
accept_rate_per_ip = 0
publish_rate = 1000000000
publish_burst = 1000000000
user_publish_rate = 1000000000
user_publish_burst = 1000000000
[http]
listen = "127.0.0.1:$3"
[websocket]
enabled = false
[auth]
jwt_secret = "$secret"
$4
EOF
  "$chatmq" serve --config "$tmp/$1.toml" >"$tmp/$1.log" 2>&1 &
  pids+=($!)
}
ready() { # $1 HTTP port
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "cluster.sh: a node on HTTP port $1 did not become ready" >&2
  return 1
}

declare -a mqtt_ports http_ports
for i in 0 1 2 3; do mqtt_ports[$i]=$(free_port); http_ports[$i]=$(free_port); done
start_chatmq single "${mqtt_ports[0]}" "${http_ports[0]}" ""
ready "${http_ports[0]}"
for i in 1 2 3; do
  start_chatmq "node$i" "${mqtt_ports[$i]}" "${http_ports[$i]}" "[cluster]
node_id = \"node-$i\"
nats_urls = [$urls]
partitions = 16"
done
for i in 1 2 3; do ready "${http_ports[$i]}"; done
# Every node holds some partitions before the load starts.
sleep 5

mkdir -p "$here/results"
common=(--qos 1 --groups 20 --group-size 6 --jwt-secret "$secret" --warmup 2 --duration 10)
"$load" run chat --addr "127.0.0.1:${mqtt_ports[0]}" "${common[@]}" --label "single node" \
  --json "$tmp/single.json" "$@"
"$load" run chat --addr "127.0.0.1:${mqtt_ports[1]}" \
  --more-addrs "127.0.0.1:${mqtt_ports[2]},127.0.0.1:${mqtt_ports[3]}" \
  "${common[@]}" --label "3 nodes" --json "$tmp/cluster.json" "$@"
python3 - "$tmp/single.json" "$tmp/cluster.json" "$here/results/cluster.json" <<'EOF'
import json, sys
single, cluster = (json.load(open(p)) for p in sys.argv[1:3])
json.dump({"single": single, "cluster": cluster}, open(sys.argv[3], "w"), indent=2)
EOF
echo "cluster.sh: wrote $here/results/cluster.json"
