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

say "installing Debian packages"
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

mvm="$repo/target/release/mvm"
say "quick start"
"$mvm" version
"$mvm" info
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The busybox example image, built from Debian's busybox-static package as an OCI layout.
"$mvm" build-example busybox -o "$work/busybox-oci"
# The same package as a plain root directory, run as a container on the host (namespaces,
# overlay root, cgroup limits), then as a plain process, for comparison.
mkdir -p "$work/rootfs/bin"
cp /bin/busybox "$work/rootfs/bin/"
for applet in sh echo uname hostname cat; do ln -s busybox "$work/rootfs/bin/$applet"; done
"$mvm" run --isolation container --rm --mem 64M --rootfs "$work/rootfs" --hostname demo \
  -e PATH=/bin -- sh -c 'echo "hello from container $(hostname), pid $$"'
"$mvm" run --isolation process --rootfs "$work/rootfs" -- /bin/busybox echo "hello from a plain process"
say "done"
