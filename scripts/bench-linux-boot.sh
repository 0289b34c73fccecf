#!/usr/bin/env bash
# Linux-guest start benchmark on a host with hardware virtualization: mvm's own kernel to its
# /init, mvm beside QEMU's microvm machine on the same vmlinux and initramfs (a ratio), and
# `mvm run --rm` of the busybox example to its first output line and to exit.
#
#   scripts/bench-linux-boot.sh [RUNS]       (default 5; env CPUS=1, MEM=256M)
#
# Run it where /dev/kvm is backed by VT-x/AMD-V. `scripts/bench-boot.sh` runs it inside the
# emulated AMD-V host of scripts/vt-host.sh: there every figure is a TCG figure (QEMU emulating
# the L1 CPU), meaningful only as a ratio between the two VMMs measured in the same L1.
# Expects mvm (release), the static agent and the busybox example layout to be built already
# (bench-boot.sh does that); MVM, MVM_AGENT, MVM_KERNEL and MVM_EXAMPLES name them, and
# MVM_BENCH_INIT a prebuilt static tests/linux/init.rs (else it is compiled here).
set -euo pipefail
runs=${1:-5}
cpus=${CPUS:-1}
mem=${MEM:-256M}
repo=$(cd "$(dirname "$0")/.." && pwd)
mvm=${MVM:-$repo/target/release/mvm}
kernel=${MVM_KERNEL:?MVM_KERNEL: the vmlinux to boot}
examples=${MVM_EXAMPLES:-$repo/target/vt-examples}
say() { echo "bench-linux-boot: $*" >&2; }

if "$mvm" info | grep -q '^virtualization: PVM'; then
  say "this host's KVM is PVM: mvm's kernel cannot boot here; run it on VT-x/AMD-V (or through scripts/bench-boot.sh)"
  exit 3
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The guest: the Linux-guest tests' init (prints a marker line, then reboots) as the initramfs.
init=${MVM_BENCH_INIT:-}
if [ -z "$init" ]; then
  init="$work/init"
  rustc --edition 2021 -O -C panic=abort -C strip=symbols -C target-feature=+crt-static \
    --target x86_64-unknown-linux-gnu -o "$init" "$repo/tests/linux/init.rs"
fi
mkdir -p "$work/root/dev" "$work/root/proc" "$work/root/sys"
cp "$init" "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet) >"$work/initrd.cpio"
cmdline="console=ttyS0 reboot=k panic=1 pci=off quiet"

# One timed run: prints "<marker ms> <exit ms>" (from spawn); fails if the marker never came.
# A run that takes longer than DEADLINE seconds (default 300) is killed and reported.
timer='
import os, select, subprocess, sys, time
marker = sys.argv[1].encode()
cmd = sys.argv[2:]
deadline = time.monotonic() + float(os.environ.get("DEADLINE", "300"))
t0 = time.perf_counter_ns()
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
seen = None
buf = b""
fd = p.stdout.fileno()
while True:
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([fd], [], [], left)[0]:
        p.kill()
        sys.stderr.write("run timed out: %s\n%s" % (" ".join(cmd), buf.decode(errors="replace")[-2000:]))
        sys.exit(1)
    chunk = os.read(fd, 65536)
    if not chunk:
        break
    buf += chunk
    if seen is None and marker in buf:
        seen = time.perf_counter_ns()
rc = p.wait()
t_exit = time.perf_counter_ns()
if rc != 0 or seen is None:
    sys.stderr.write("run failed (exit %d): %s\n%s%s" % (rc, " ".join(cmd), buf.decode(errors="replace")[-2000:], p.stderr.read().decode(errors="replace")))
    sys.exit(1)
print("%.1f %.1f" % ((seen - t0) / 1e6, (t_exit - t0) / 1e6))
'
time_run() { python3 -c "$timer" "$@"; }

mvm_boot=("$mvm" boot --kernel "$kernel" --initrd "$work/initrd.cpio" --mem "$mem" --cpus "$cpus" --cmdline "$cmdline")
qemu_boot=(qemu-system-x86_64 -M microvm,pit=on,pic=on,rtc=on -accel kvm -cpu host -m "$mem" -smp "$cpus"
  -nodefaults -no-reboot -display none -serial stdio -device i8042
  -kernel "$kernel" -initrd "$work/initrd.cpio" -append "$cmdline")
root="$work/mvm-root"
"$mvm" --root "$root" load -i "$examples/busybox-oci" -t example/busybox >/dev/null
mvm_run=("$mvm" --root "$root" run --rm --network none --mem "$mem" --kernel "$kernel" --image example/busybox -- echo ready)

say "warming up (page cache, cached disk image of the example)"
time_run "MVM-GUEST-INIT" "${mvm_boot[@]}" >/dev/null
time_run "MVM-GUEST-INIT" "${qemu_boot[@]}" >/dev/null
time_run "ready" "${mvm_run[@]}" >/dev/null
results="$work/results"
for ((i = 0; i < runs; i++)); do
  echo "mvm $(time_run "MVM-GUEST-INIT" "${mvm_boot[@]}")" >>"$results"
  echo "qemu $(time_run "MVM-GUEST-INIT" "${qemu_boot[@]}")" >>"$results"
  echo "run $(time_run "ready" "${mvm_run[@]}")" >>"$results"
done

python3 - "$results" "$runs" "$cpus" "$mem" "$(basename "$kernel")" <<'PY'
import statistics, sys
path, runs, cpus, mem, kernel = sys.argv[1:]
rows = {"mvm": ([], []), "qemu": ([], []), "run": ([], [])}
for line in open(path):
    who, *times = line.split()
    for col, t in zip(rows[who], times):
        col.append(float(t))
med = statistics.median
print("Linux guest %s, --mem %s, %s vCPU(s), %s runs each, alternating" % (kernel, mem, cpus, runs))
print("%-34s %12s %12s" % ("median ms from spawn (min-max)", "to /init", "to exit"))
names = {"mvm": "mvm boot", "qemu": "qemu -M microvm (kvm)", "run": "mvm run --rm busybox echo"}
for who in ("mvm", "qemu", "run"):
    a, b = rows[who]
    print("%-34s %12s %12s" % (names[who], "%.0f (%.0f-%.0f)" % (med(a), min(a), max(a)), "%.0f (%.0f-%.0f)" % (med(b), min(b), max(b))))
m, q = rows["mvm"], rows["qemu"]
print("%-34s %12s %12s" % ("ratio qemu/mvm (boot)", "%.2fx" % (med(q[0]) / med(m[0])), "%.2fx" % (med(q[1]) / med(m[1]))))
print("%-34s %12s %12s" % ("mvm run / mvm boot", "%.2fx" % (med(rows["run"][0]) / med(m[0])), "%.2fx" % (med(rows["run"][1]) / med(m[1]))))
print("('to /init' for mvm run is its first output line, 'ready')")
PY
