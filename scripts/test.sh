#!/usr/bin/env bash
# Runs the whole test suite: unit tests of every crate, the black-box
# tests in tests/ that drive the real chatmq binary with real clients, and a
# short smoke run of every fuzz target (scripts/fuzz.sh, docs/FUZZING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# The black-box tests spawn the binary, so it is built first. --all-targets
# resolves features exactly as `cargo test` does, so RocksDB is built once.
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast "$@"
# Each fuzz target for 20 s, from the committed corpora (FUZZ_SECONDS
# changes it; 0 skips). Needs the nightly toolchain, which a machine may lack.
fuzz_seconds="${FUZZ_SECONDS:-20}"
if [ "$fuzz_seconds" != 0 ]; then
  if rustup run nightly rustc --version >/dev/null 2>&1; then
    scripts/fuzz.sh "$fuzz_seconds"
  else
    echo "test: the fuzz smoke run is SKIPPED: no nightly toolchain (rustup toolchain install nightly)" >&2
  fi
fi
