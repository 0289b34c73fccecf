#!/usr/bin/env bash
# Runs cargo-fuzz targets in fuzz/ for SECONDS (default 60) each, one after the other: every
# target, or the ones named. A crash fails the run (after the other targets ran); the last lines
# sum up each target's executions and speed from libFuzzer's final stats.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`; scripts/setup.sh installs it) and a C++ compiler
# (libFuzzer is built from source). Nightly features come from RUSTC_BOOTSTRAP=1 on the
# installed stable toolchain. AddressSanitizer is used unless FUZZ_SANITIZER says otherwise
# (`none` runs several times faster). FUZZ_RUNS=N also stops a target after N executions.
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: $0 [SECONDS] [TARGET...]  (SECONDS must be a positive integer)" >&2
    exit 2
fi
shift || true
cd "$(dirname "$0")/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: install it with 'cargo install cargo-fuzz'" >&2
    exit 2
fi

export RUSTC_BOOTSTRAP=1
sanitizer="${FUZZ_SANITIZER:-address}"
# Each sanitizer builds into its own folder: switching would otherwise rebuild everything.
build_dir=()
[ "$sanitizer" = address ] || build_dir=(--target-dir "fuzz/target/sanitizer-$sanitizer")

if [ $# -gt 0 ]; then
    targets="$*"
else
    targets=$(cargo fuzz list)
fi
failed=()
summary=()
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in $targets; do
    mkdir -p "fuzz/corpus/$target"
    corpora=("fuzz/corpus/$target")
    # Committed well-formed seeds (fuzz/seeds/make_seeds.py) start the search inside the parser.
    [ -d "fuzz/seeds/$target" ] && corpora+=("fuzz/seeds/$target")
    echo "== fuzzing $target for ${seconds}s (sanitizer: $sanitizer)"
    result=ok
    limits=(-max_total_time="$seconds")
    [ -n "${FUZZ_RUNS:-}" ] && limits+=(-runs="$FUZZ_RUNS")
    started=$SECONDS
    if ! cargo fuzz run "${build_dir[@]}" --sanitizer "$sanitizer" "$target" "${corpora[@]}" -- \
        "${limits[@]}" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tee "$log"; then
        echo "== $target FAILED: reproducer under fuzz/artifacts/$target/" >&2
        failed+=("$target")
        result=CRASH
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    # Wall time of the whole step, the (cached) build and the corpus replay included.
    summary+=("$(printf '%-16s %6ss %12s execs %8s exec/s  %s' \
        "$target" "$((SECONDS - started))" "${execs:-?}" "${rate:-?}" "$result")")
done

echo "== summary (sanitizer: $sanitizer)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]}" >&2
    exit 1
fi
limit="${seconds}s"
[ -z "${FUZZ_RUNS:-}" ] || limit="$limit or $FUZZ_RUNS executions each, whichever came first"
echo "every fuzz target ran (at most $limit) without a crash: $targets" | tr '\n' ' '
echo
