#!/usr/bin/env bash
# Boot-time benchmark: `mvm boot` against QEMU's microvm machine on the same freestanding guest.
#
# Usage: scripts/bench-boot.sh [RUNS] (default 10; env CPUS=1, MEM=256M, VT=0 skips part 2)
#
# Builds mvm (release) and the boot test guest (tests/guests/boot.rs), then alternates runs of
#   mvm boot --kernel boot.elf                      (Linux 64-bit boot protocol)
#   qemu-system-x86_64 -M microvm -accel kvm ...    (PVH entry note; tcg if KVM is refused)
# and times, from just before the process is spawned, (a) the guest's first serial line,
# (b) its last line (just before it resets: the guest's own work is done) and (c) the process's
# exit after the guest resets through the i8042 (QEMU gets `-device i8042`, so
# both take the same reset path), and the peak memory (RSS) of the process tree (mvm and its
# VMM process). Prints medians, minima and maxima, and the QEMU/mvm ratio.
# mvm runs twice in each round: confined as always (the VMM jailed, its threads under seccomp)
# and with `--security-opt vmm-jail=off --security-opt vmm-seccomp=off`, to show what the confinement costs.
#
# Part 2, with a Linux guest on hardware virtualization: inside the emulated AMD-V host of
# scripts/vt-host.sh, scripts/bench-linux-boot.sh times mvm's own kernel to its /init under
# `mvm boot` and under `qemu-system-x86_64 -M microvm -accel kvm` (same vmlinux, same initramfs,
# same L1), and `mvm run --rm` of the busybox example to its first output. Those are TCG times
# (QEMU emulates L1's CPU): compare them only with each other.
set -euo pipefail

runs=${1:-10}
cpus=${CPUS:-1}
mem=${MEM:-256M}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

echo "building mvm (release) and the boot guest..." >&2
cargo build --release -p mvm --bin mvm >&2
target=${CARGO_TARGET_DIR:-$root/target}
mvm=$target/release/mvm
guest=$(tests/guests/build.sh boot "$target/test-guests")
qemu=$(command -v qemu-system-x86_64) || { echo "bench-boot: qemu-system-x86_64 not installed" >&2; exit 1; }
cmdline="console=ttyS0"

# One timed run: prints "<first line ms> <reset line ms> <exit ms>"; fails if the guest did not finish cleanly.
timer='
import os, subprocess, sys, time
cmd = sys.argv[1:]
t0 = time.perf_counter_ns()
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
first = None
last = None
buf = b""
fd = p.stdout.fileno()
while True:
    chunk = os.read(fd, 65536)
    if not chunk:
        break
    buf += chunk
    if first is None and b"mvm-test-guest: " in buf and b"\n" in buf[buf.index(b"mvm-test-guest: "):]:
        first = time.perf_counter_ns()
    if last is None and b"mvm-test-guest: reset\n" in buf:
        last = time.perf_counter_ns()
_, status, usage = os.wait4(p.pid, 0)
t_exit = time.perf_counter_ns()
p.returncode = rc = os.waitstatus_to_exitcode(status)
err = p.stderr.read()
if rc != 0 or first is None or last is None:
    sys.stderr.write("run failed (exit %d): %s\n%s%s" % (rc, " ".join(cmd), buf.decode(errors="replace")[-2000:], err.decode(errors="replace")))
    sys.exit(1)
# ru_maxrss (KiB): the largest of the process and its waited-for descendants (the VMM).
print("%.3f %.3f %.3f %.1f" % ((first - t0) / 1e6, (last - t0) / 1e6, (t_exit - t0) / 1e6, usage.ru_maxrss / 1024))
'
time_run() { python3 -c "$timer" "$@"; }

mvm_cmd=("$mvm" boot --kernel "$guest" --mem "$mem" --cpus "$cpus" --cmdline "$cmdline")
mvm_open_cmd=("$mvm" boot --security-opt vmm-jail=off --security-opt vmm-seccomp=off --kernel "$guest" --mem "$mem"
    --cpus "$cpus" --cmdline "$cmdline")
qemu_base=("$qemu" -M microvm -m "$mem" -smp "$cpus" -nodefaults -no-reboot -display none
    -serial stdio -device i8042 -kernel "$guest" -append "$cmdline")
accel=kvm
if ! time_run "${qemu_base[@]}" -accel kvm >/dev/null 2>&1; then
    echo "note: QEMU refused -accel kvm here; falling back to -accel tcg (emulation)" >&2
    accel=tcg
fi
qemu_cmd=("${qemu_base[@]}" -accel "$accel")

# Warm up both (page cache, first-run costs), then alternate.
time_run "${mvm_cmd[@]}" >/dev/null
time_run "${mvm_open_cmd[@]}" >/dev/null 2>&1
time_run "${qemu_cmd[@]}" >/dev/null
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for ((i = 0; i < runs; i++)); do
    echo "mvm $(time_run "${mvm_cmd[@]}")" >>"$results"
    echo "open $(time_run "${mvm_open_cmd[@]}" 2>/dev/null)" >>"$results"
    echo "qemu $(time_run "${qemu_cmd[@]}")" >>"$results"
done

python3 - "$results" "$runs" "$cpus" "$mem" "$accel" "$guest" <<'PY'
import statistics, sys
path, runs, cpus, mem, accel, guest = sys.argv[1:]
rows = {"mvm": ([], [], [], []), "open": ([], [], [], []), "qemu": ([], [], [], [])}
for line in open(path):
    who, *times = line.split()
    for col, t in zip(rows[who], times):
        col.append(float(t))
def cell(v):
    return "%7.1f %6.1f %6.1f" % (statistics.median(v), min(v), max(v))
print("boot guest %s, --mem %s, %s vCPU(s), %s runs each, alternating" % (guest, mem, cpus, runs))
print("ms from spawn, MiB     %-22s %-22s %-22s %-22s" % ("first serial line", "last line (reset)", "process exit", "peak RSS (MiB)"))
print("%-30s " % "" + "  ".join(["%7s %6s %6s" % ("median", "min", "max")] * 4))
names = {"mvm": "mvm boot", "open": "mvm boot, no jail/filters", "qemu": "qemu microvm (%s)" % accel}
for who in ("mvm", "open", "qemu"):
    print("%-30s %s" % (names[who], "  ".join(cell(c) for c in rows[who])))
def ratio(label, a, b):
    print("%-30s %s" % (label, "  ".join(
        "%6.2fx %13s" % (statistics.median(y) / statistics.median(x), "") for x, y in zip(a, b))))
ratio("confined/unconfined mvm", rows["open"], rows["mvm"])
ratio("ratio qemu/mvm", rows["mvm"], rows["qemu"])
PY

[ "${VT:-1}" = 1 ] || exit 0
echo >&2
echo "part 2: a Linux guest (mvm's kernel) inside the emulated AMD-V host" >&2
set +e
scripts/vt-host.sh --prepare
rc=$?
set -e
if [ $rc = 3 ]; then
    echo "bench-boot: part 2 skipped: this machine cannot run the emulated VT host" >&2
    exit 0
fi
kernel=$(scripts/build-kernel.sh --no-install)
agent=$(scripts/build-agent.sh release)
examples="$target/vt-examples"
[ -d "$examples/busybox-oci" ] || "$mvm" build-example busybox -o "$examples/busybox-oci" >&2
init="$target/bench-init"
rustc --edition 2021 -O -C panic=abort -C strip=symbols -C target-feature=+crt-static \
    --target x86_64-unknown-linux-gnu -o "$init" tests/linux/init.rs
scripts/vt-host.sh --env "MVM=$mvm" --env "MVM_KERNEL=$kernel" --env "MVM_AGENT=$agent" \
    --env "MVM_EXAMPLES=$examples" --env "MVM_BENCH_INIT=$init" --env "CPUS=$cpus" --env "MEM=$mem" \
    -- scripts/bench-linux-boot.sh "${LINUX_RUNS:-5}"
