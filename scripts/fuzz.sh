#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for SECONDS each (default 60), one
# after another, seeded with the committed corpora in fuzz/corpus/<target>/.
# What a run learns goes to a working corpus outside the checkout, so the
# next run starts from it; a crash stops the script, and its reproducer is
# written to fuzz/artifacts/<target>/ (docs/FUZZING.md: what to do then).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]    e.g. scripts/fuzz.sh 3600 mqtt_decode
#
# Needs the nightly toolchain (sanitizers) and cargo-fuzz, which it installs
# from crates.io if missing. Builds into ${CARGO_TARGET_DIR:-target}/fuzz,
# apart from the stable build and persistent, so only the first run pays for
# a full build (a few minutes: the targets link no RocksDB).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(mqtt_decode websocket envelope rpc_request config)
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo +stable install --quiet --locked cargo-fuzz
fi

target_dir="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
work="${FUZZ_WORK:-$target_dir/corpus}"
# Release with debug assertions and overflow checks, under AddressSanitizer.
flags=(-O --debug-assertions --target-dir "$target_dir")

nice cargo +nightly fuzz build "${flags[@]}"
for target in "${targets[@]}"; do
  mkdir -p "$work/$target"
  echo "fuzz: $target for ${seconds}s (working corpus $work/$target)" >&2
  log="$target_dir/$target.log"
  if ! nice cargo +nightly fuzz run "${flags[@]}" "$target" "$work/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz: $target FAILED (full log $log); reproduce with:" >&2
    echo "  cargo +nightly fuzz run ${flags[*]} $target fuzz/artifacts/$target/<file>" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$log" | sed "s/^/fuzz: $target /" >&2
done
echo "fuzz: ${#targets[@]} target(s) ran ${seconds}s each without a crash" >&2
