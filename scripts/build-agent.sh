#!/usr/bin/env bash
# Builds the guest agent as one static binary (it is PID 1 of the guest's initramfs) and prints
# its path. Uses the installed x86_64-unknown-linux-gnu target with a static C runtime; naming the
# target keeps RUSTFLAGS away from build scripts and proc-macros.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
profile=${1:-release}
cd "$repo"
flags=(--target x86_64-unknown-linux-gnu -p guest-agent --bin mvm-agent)
[ "$profile" = release ] && flags+=(--release)
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q "${flags[@]}" >&2
out="$repo/target/x86_64-unknown-linux-gnu/$profile/mvm-agent"
if readelf -l "$out" | grep -q "program interpreter"; then echo "build-agent: $out is not static" >&2; exit 1; fi
echo "$out"
