#!/usr/bin/env bash
# Installs the Debian packages mvm needs to build, test and benchmark. Idempotent: installs only
# what is missing, so it is cheap to call from every script.
set -euo pipefail

packages=(
  # build (g++: libFuzzer, built from source by the fuzz targets)
  gcc g++ make pkg-config cpio
  # images and disks
  e2fsprogs erofs-utils busybox-static
  # networking
  iproute2 passt curl socat
  # tests: an interactive terminal (tmux) and a DNS server on the host (dnsmasq)
  tmux dnsmasq-base
  # benchmarks
  python3
  # tests and benchmarks: a real OCI registry, the peers we compare against
  docker-registry crun qemu-system-x86
  # tests: a real browser renders mvm compare's HTML report (headless screenshot)
  chromium
  # kernels: Debian's linux-source-6.12 and what building it needs
  linux-source-6.12 bc bison flex libelf-dev libssl-dev xz-utils patch
)

# Fuzzing (scripts/fuzz.sh, and the test command's smoke of every target): cargo-fuzz, once.
# Without it (no crates.io, say) the smoke says so and skips; nothing else needs it.
if command -v cargo >/dev/null && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "deps: installing cargo-fuzz (cargo install)" >&2
  flock /tmp/cargo-fuzz.lock cargo install --locked cargo-fuzz >/dev/null 2>&1 ||
    echo "deps: installing cargo-fuzz failed; fuzzing is not available" >&2
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# The docker-registry package would start a system service; tests start their own registry.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; trap 'rm -f "$policy"' EXIT
fi
flock /tmp/apt.lock apt-get update -qq
flock /tmp/apt.lock apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "deps: done" >&2
