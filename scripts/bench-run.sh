#!/usr/bin/env bash
# `mvm run` of a cached image, in a microVM and as a container on the host, side by side in one
# run: time from `mvm run` to the command's first output line, time to exit, and for the VM the
# VMM's own memory (the mvm process's RSS minus the guest memory the guest touched). Alternates
# the two modes; prints medians of N runs each (default 5).
#
#   scripts/bench-run.sh [N]
#
# The image is the busybox example built from Debian packages (cached under the work store).
# The guest kernel is MVM_KERNEL, else the test kernel (MVM_TEST_KERNEL or ../shared/test-kernel,
# booted with its cmdline), else the product kernel at /var/lib/mvm/kernel/vmlinux.
# MVM_KERNEL_ARGS adds guest kernel arguments. Needs root and /dev/kvm.
set -euo pipefail

N=${1:-5}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
[ "$(id -u)" = 0 ] || { echo "bench-run: needs root" >&2; exit 2; }
[ -e /dev/kvm ] || { echo "bench-run: no /dev/kvm" >&2; exit 2; }
command -v python3 >/dev/null || { echo "bench-run: needs python3 (apt-get install python3)" >&2; exit 2; }

kernel=${MVM_KERNEL:-}
kargs=${MVM_KERNEL_ARGS:-}
shared=$repo/../shared/test-kernel
if [ -z "$kernel" ]; then
    if [ -n "${MVM_TEST_KERNEL:-}" ]; then
        kernel=$MVM_TEST_KERNEL
    elif [ -f "$shared/build.sh" ]; then
        echo "bench-run: building (or finding the cached) test kernel" >&2
        kernel=$(bash "$shared/build.sh")
    else
        kernel=/var/lib/mvm/kernel/vmlinux
    fi
    if [ "$kernel" != /var/lib/mvm/kernel/vmlinux ] && [ -f "$shared/cmdline" ]; then
        kargs="$(cat "$shared/cmdline") $kargs"
    fi
fi
[ -f "$kernel" ] || { echo "bench-run: no guest kernel at $kernel (scripts/build-kernel.sh, or set MVM_KERNEL)" >&2; exit 2; }

echo "bench-run: building mvm (release) and the static guest agent" >&2
cargo build -q --release -p mvm
MVM_AGENT=$(scripts/build-agent.sh release)
export MVM_AGENT
mvm=$repo/target/release/mvm

work=$(mktemp -d /tmp/mvm-bench-run.XXXXXX)
trap 'rm -rf "$work"' EXIT INT TERM
store=$work/store
"$mvm" --root "$store" build-example busybox --output "$work/busybox-oci" >&2
"$mvm" --root "$store" load -i "$work/busybox-oci" -t bench/busybox >/dev/null

python3 - "$mvm" "$store" "$kernel" "$kargs" "$N" <<'EOF'
import os, statistics, subprocess, sys, threading, time

mvm, store, kernel, kargs, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
MEM_MIB = 256
# The command prints a line, stays a moment (so the VMM's memory can be read), then exits.
CMD = ["--", "sh", "-c", "echo ready; sleep 1"]

def vmm_overhead_kib(pid):
    """RSS of the mvm process minus the resident part of its guest-memory mappings."""
    total = guest = 0
    size = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                parts = line.split()
                if parts[0] == "Size:":
                    size = int(parts[1])
                elif parts[0] == "Rss:":
                    rss = int(parts[1])
                    total += rss
                    if size == MEM_MIB * 1024:
                        guest += rss
    except OSError:
        return None
    return total - guest

def one(mode):
    args = [mvm, "--root", store, "run", "--rm", "--isolation", mode, "--image", "bench/busybox"]
    if mode == "vm":
        args += ["--mem", f"{MEM_MIB}M", "--kernel", kernel, "--kernel-args", kargs]
    t0 = time.monotonic()
    p = subprocess.Popen(args + CMD, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    t_first = time.monotonic() - t0
    mem = vmm_overhead_kib(p.pid) if mode == "vm" else None
    p.stdout.read()
    err = p.stderr.read()
    code = p.wait()
    t_exit = time.monotonic() - t0
    if first.strip() != b"ready" or code != 0:
        sys.exit(f"bench-run: {mode} run failed (exit {code}): {err.decode(errors='replace').strip()}")
    return t_first, t_exit, mem

# One warm-up of each: the image is unpacked and its disk image made once, then cached.
one("container"); one("vm")
res = {"vm": [], "container": []}
for i in range(n):
    for mode in ("vm", "container"):
        res[mode].append(one(mode))
        print(f"run {i + 1}/{n} {mode}: first line {res[mode][-1][0]:.3f} s, exit {res[mode][-1][1]:.3f} s", file=sys.stderr)

med = lambda xs: statistics.median(xs)
vm_first, vm_exit = med([r[0] for r in res["vm"]]), med([r[1] for r in res["vm"]])
c_first, c_exit = med([r[0] for r in res["container"]]), med([r[1] for r in res["container"]])
mems = [r[2] for r in res["vm"] if r[2] is not None]
print(f"mvm run of a cached busybox image, median of {n} (the command sleeps 1 s before exiting)")
print(f"{'':28}{'microVM':>12}{'container':>12}{'ratio':>8}")
print(f"{'first output line (s)':28}{vm_first:12.3f}{c_first:12.3f}{vm_first / c_first:8.1f}")
print(f"{'exit (s)':28}{vm_exit:12.3f}{c_exit:12.3f}{vm_exit / c_exit:8.1f}")
if mems:
    print(f"{'VMM memory overhead (MiB)':28}{med(mems) / 1024:12.1f}{'-':>12}")
print(f"guest: {MEM_MIB} MiB, 1 vCPU, kernel {kernel}")
EOF
