#!/usr/bin/env bash
# The web chat demo in one command: installs what it needs, builds the web
# app (mobile-demo/web/dist) and runs chatmq with config/demo.toml. Then
# open http://127.0.0.1:8080/ (on a phone: see config/demo.toml) and log in
# as alice, bob or carol with the passwords alice-demo, bob-demo, carol-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --web
echo "demo: open http://127.0.0.1:8080/ and log in as alice / alice-demo (or bob, carol)" >&2
exec cargo run --release -- serve --config config/demo.toml "$@"
