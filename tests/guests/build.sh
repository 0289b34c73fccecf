#!/usr/bin/env bash
# Builds one freestanding test guest: tests/guests/NAME.rs -> OUTDIR/NAME.elf
#
# Usage: tests/guests/build.sh NAME OUTDIR
#
# The guest is compiled by rustc for the host target (x86_64-unknown-linux-gnu, always
# installed) without std, libc or start files, linked at 2 MiB by link.ld. It is built without
# SSE so that an instruction emulator knowing only general-purpose instructions can run it; rustc
# warns that this breaks the float ABI, which does not matter as the guests use no floats.
# Rebuilds only when a source is newer than the output; concurrent calls wait for each other
# (flock). Prints the ELF's path.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 NAME OUTDIR" >&2
    exit 2
fi
name=$1
outdir=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$here/$name.rs
if [ ! -f "$src" ]; then
    echo "build.sh: no guest named '$name' ($src does not exist)" >&2
    exit 2
fi
mkdir -p "$outdir"
out=$outdir/$name.elf

# One build at a time per output folder (tests run in parallel, several test binaries at once).
exec 9>"$outdir/.build.lock"
flock 9

if [ -f "$out" ] && [ -z "$(find "$here" -newer "$out" -type f -print -quit)" ]; then
    echo "$out"
    exit 0
fi

tmp=$(mktemp -d "$outdir/.build-$name.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log=$tmp/rustc.log
if ! rustc --edition 2021 --crate-type bin --crate-name "guest_$name" \
    --target x86_64-unknown-linux-gnu \
    -C panic=abort -C opt-level=s -C debuginfo=0 -C strip=debuginfo \
    -C relocation-model=static -C code-model=small \
    -C target-feature=-sse,-sse2,-avx,+crt-static \
    -C link-arg=-nostartfiles -C link-arg=-nostdlib -C link-arg=-static \
    -C link-arg=-Wl,--build-id=none -C link-arg=-Wl,-n \
    -C "link-arg=-Wl,-T,$here/link.ld" \
    -o "$tmp/$name.elf" "$src" 2>"$log"; then
    cat "$log" >&2
    echo "build.sh: rustc failed for guest '$name'" >&2
    exit 1
fi
# Show anything but the expected float-ABI warning for the disabled SSE.
if grep -q . "$log"; then
    awk '/target feature `sse2` must be enabled/ {skip=1} skip && /^$/ {skip=0; next} !skip' "$log" \
        | grep -v -e '^warning: [0-9]* warnings\? emitted' -e '^$' >&2 || true
fi
mv "$tmp/$name.elf" "$out"
echo "$out"
