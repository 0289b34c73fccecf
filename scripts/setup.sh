#!/usr/bin/env bash
# Installs what mvm needs on a fresh Debian machine, builds everything (mvm, the static guest
# agent, the guest kernel) and runs the quick start, which needs no outside service:
#
#   scripts/setup.sh            # everything
#   SKIP_KERNEL=1 scripts/setup.sh   # skip the guest kernel build (about 7 minutes on 2 cores)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
say() { echo "setup: $*" >&2; }

say "installing Debian packages (and cargo-fuzz, for scripts/fuzz.sh)"
scripts/deps.sh
command -v cargo >/dev/null || { say "cargo not found: install Rust (rustup) first"; exit 1; }

say "building mvm (release)"
cargo build --release --workspace --bins
say "building the static guest agent"
agent=$(scripts/build-agent.sh)
say "agent: $agent"
if [ -z "${SKIP_KERNEL:-}" ]; then
  say "building the guest kernel from Debian's linux-source-6.12 (cached after the first build)"
  kernel=$(scripts/build-kernel.sh)
  say "kernel: $kernel"
fi

say "quick start"
MVM="$repo/target/release/mvm" scripts/quickstart.sh
