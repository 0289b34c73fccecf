#!/usr/bin/env bash
# The test command, in two layers:
# 1. this machine: unit tests, test-guest boots on real KVM, the container runtime and image store
#    against a real registry, and the full Linux-guest tests (on a PVM host like this workplace's,
#    with the test kernel from ../shared/test-kernel);
# 2. the emulated AMD-V host (scripts/test-vt.sh): mvm's own kernel on hardware virtualization,
#    emulated by QEMU, running the Linux-guest, run_vm, run_lifecycle and quick-start tests.
#
#   scripts/test.sh [extra cargo test args]   (with args, only layer 1 runs, filtered)
#
# Layer 1 ends with a smoke of every fuzz target (scripts/fuzz.sh, MVM_FUZZ_SMOKE_SECONDS each,
# default 10) when cargo-fuzz is installed, and says so when it is not.
#
# MVM_TEST_KERNEL=PATH uses that kernel for layer 1's Linux-guest tests; otherwise the test kernel
# is built (once, cached) from ../shared/test-kernel. Where it cannot be built, those tests say so
# and skip. MVM_SKIP_VT=1 skips layer 2 (and says so).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

"$repo/scripts/deps.sh"

if [ -z "${MVM_TEST_KERNEL:-}" ]; then
  builder="$repo/../shared/test-kernel/build.sh"
  if [ -x "$builder" ] || [ -f "$builder" ]; then
    echo "test: building (or finding the cached) test kernel" >&2
    if kernel=$(bash "$builder"); then
      export MVM_TEST_KERNEL="$kernel"
      echo "test: test kernel $MVM_TEST_KERNEL" >&2
    else
      echo "test: the test kernel could not be built; full Linux-guest tests will skip" >&2
    fi
  else
    echo "test: no $builder; full Linux-guest tests will skip" >&2
  fi
fi

# The static guest agent: the initramfs /init of `mvm run --isolation vm`.
if [ -z "${MVM_AGENT:-}" ]; then
  echo "test: building the static guest agent" >&2
  MVM_AGENT=$("$repo/scripts/build-agent.sh" release)
  export MVM_AGENT
fi

cargo build --workspace --all-targets
start=$SECONDS
cargo test --workspace "$@"
echo "test: layer 1 (this machine) passed in $((SECONDS - start)) s" >&2

# A short smoke of every fuzz target (fuzz/): it builds with AddressSanitizer, replays the seeds
# and the local corpus, and fuzzes each target for a few seconds. scripts/fuzz.sh runs campaigns.
if [ $# -gt 0 ]; then
  echo "test: test filters given: the fuzz smoke does not run" >&2
elif ! cargo fuzz --version >/dev/null 2>&1; then
  echo "test: cargo-fuzz is not installed: the fuzz smoke does not run (scripts/deps.sh installs it)" >&2
else
  start=$SECONDS
  "$repo/scripts/fuzz.sh" "${MVM_FUZZ_SMOKE_SECONDS:-10}"
  echo "test: fuzz smoke (build and ${MVM_FUZZ_SMOKE_SECONDS:-10} s per target) passed in $((SECONDS - start)) s" >&2
fi

if [ $# -gt 0 ]; then
  echo "test: test filters given: the emulated-VT layer (scripts/test-vt.sh) does not run" >&2
elif [ -n "${MVM_SKIP_VT:-}" ]; then
  echo "test: MVM_SKIP_VT set: the emulated-VT layer (scripts/test-vt.sh) does not run" >&2
else
  start=$SECONDS
  "$repo/scripts/test-vt.sh"
  echo "test: layer 2 (emulated AMD-V host, mvm's kernel) passed in $((SECONDS - start)) s" >&2
fi
