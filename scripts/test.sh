#!/usr/bin/env bash
# Runs the whole test suite: unit tests of every crate, and the black-box
# tests in tests/ that drive the real chatmq binary with real clients.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# The black-box tests spawn the binary, so it is built first. --all-targets
# resolves features exactly as `cargo test` does, so RocksDB is built once.
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast "$@"
