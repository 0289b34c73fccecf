#!/usr/bin/env bash
# The test command: unit tests, test-guest boots on real KVM, the container runtime and image store
# against a real registry, and the full Linux-guest tests with the test kernel.
#
#   scripts/test.sh [extra cargo test args]
#
# MVM_TEST_KERNEL=PATH uses that kernel for the Linux-guest tests; otherwise the test kernel is
# built (once, cached) from ../shared/test-kernel. Where it cannot be built, those tests say so and
# skip.
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
cargo test --workspace "$@"
