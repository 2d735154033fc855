#!/usr/bin/env bash
# Runs chatmq with the default configuration (config/chatmq.toml), or with
# the arguments given: scripts/serve.sh --config my.toml
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release -- serve "$@"
