#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS (default 60) each; fails on the first crash.
#
#   scripts/fuzz.sh [SECONDS]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a C++ compiler (libFuzzer is built from
# source). Nightly features come from RUSTC_BOOTSTRAP=1 on the installed stable toolchain.
# AddressSanitizer is used when it links; otherwise set FUZZ_SANITIZER=none.
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: $0 [SECONDS]  (SECONDS must be a positive integer)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: install it with 'cargo install cargo-fuzz'" >&2
    exit 2
fi

export RUSTC_BOOTSTRAP=1
sanitizer="${FUZZ_SANITIZER:-address}"

targets=$(cargo fuzz list)
failed=()
for target in $targets; do
    mkdir -p "fuzz/corpus/$target"
    corpora=("fuzz/corpus/$target")
    # Committed well-formed seeds (fuzz/seeds/make_seeds.py) start the search inside the parser.
    [ -d "fuzz/seeds/$target" ] && corpora+=("fuzz/seeds/$target")
    echo "== fuzzing $target for ${seconds}s (sanitizer: $sanitizer)"
    if ! cargo fuzz run --sanitizer "$sanitizer" "$target" "${corpora[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1; then
        echo "== $target FAILED: reproducer under fuzz/artifacts/$target/" >&2
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "all fuzz targets ran ${seconds}s without a crash: $targets" | tr '\n' ' '
echo
