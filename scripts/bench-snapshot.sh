#!/usr/bin/env bash
# Cold boot against template restore, side by side in one run: `mvm run --rm --image busybox
# -- echo hi` with `--cold` (the guest kernel boots) and from the VM template (made once by an
# untimed first run, then restored), alternating; time from `mvm run` to the first output line
# and to exit, medians of N runs each (default 5), the template/cold ratio, and the VMM's
# restore time alone (snapshot checked, memory mapped, devices attached, vCPUs, interrupt
# controllers, clock and devices put back: mvm's own measurement in each template run).
#
#   scripts/bench-snapshot.sh [N]        on this host (PVM: the test kernel)
#   scripts/bench-snapshot.sh --vt [N]   in the emulated AMD-V host (scripts/vt-host.sh) with
#                                        mvm's product kernel
#
# Environment: MVM (the mvm binary; default: built here, release), MVM_KERNEL and
# MVM_KERNEL_ARGS (the guest kernel and what it needs beyond mvm's arguments; default: the
# test kernel on a PVM host, mvm's kernel elsewhere), MVM_AGENT, MVM_EXAMPLES (a folder with
# busybox-oci/, built beforehand where there is no network). Needs root, /dev/kvm, python3.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
say() { echo "bench-snapshot: $*" >&2; }

vt=0
if [ "${1:-}" = --vt ]; then
  vt=1
  shift
fi
N=${1:-5}
command -v python3 >/dev/null || { say "needs python3"; exit 2; }

if [ -z "${MVM:-}" ]; then
  say "building mvm (release) and the static guest agent"
  cargo build -q --release -p mvm
  MVM=$repo/target/release/mvm
fi
MVM_AGENT=${MVM_AGENT:-$(scripts/build-agent.sh release)}
export MVM MVM_AGENT
MVM_EXAMPLES=${MVM_EXAMPLES:-$repo/target/bench-examples}
[ -d "$MVM_EXAMPLES/busybox-oci" ] || "$MVM" build-example busybox -o "$MVM_EXAMPLES/busybox-oci" >&2
export MVM_EXAMPLES

if [ $vt = 1 ]; then
  kernel=$(scripts/build-kernel.sh) || { say "mvm's kernel cannot be built here"; exit 2; }
  exec scripts/vt-host.sh --cpus "${MVM_VT_CPUS:-2}" --mem "${MVM_VT_MEM:-4G}" \
    --env "MVM=$MVM" --env "MVM_KERNEL=$kernel" --env "MVM_KERNEL_ARGS=" -- "$0" "$N"
fi

[ "$(id -u)" = 0 ] || { say "needs root"; exit 2; }
[ -e /dev/kvm ] || { say "no /dev/kvm"; exit 2; }
kernel=${MVM_KERNEL:-}
kargs=${MVM_KERNEL_ARGS-}
shared=$repo/../shared/test-kernel
if [ -z "$kernel" ]; then
  if [ -e /sys/module/kvm_pvm ] && [ -f "$shared/build.sh" ]; then
    kernel=$(bash "$shared/build.sh")
    [ -n "${MVM_KERNEL_ARGS+set}" ] || kargs=$(cat "$shared/cmdline")
  else
    kernel=$(scripts/build-kernel.sh)
  fi
fi
[ -f "$kernel" ] || { say "no guest kernel at $kernel"; exit 2; }

work=$(mktemp -d /tmp/mvm-bench-snapshot.XXXXXX)
trap 'rm -rf "$work"' EXIT INT TERM
"$MVM" --root "$work/root" load -i "$MVM_EXAMPLES/busybox-oci" -t bench/busybox >/dev/null

python3 - "$MVM" "$work/root" "$kernel" "$kargs" "$N" <<'EOF'
import re, statistics, subprocess, sys, time, os

mvm, root, kernel, kargs, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
RESTORED = re.compile(rb"VMM restored in ([0-9.]+) ms")

def one(cold):
    args = [mvm, "--root", root, "run", "--rm", "--image", "bench/busybox",
            "--kernel", kernel, "--kernel-args", kargs]
    if cold:
        args.append("--cold")
    env = dict(os.environ, MVM_LOG="debug")
    t0 = time.monotonic()
    p = subprocess.Popen(args + ["--", "echo", "hi"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    first = p.stdout.readline()
    t_first = time.monotonic() - t0
    p.stdout.read()
    err = p.stderr.read()
    code = p.wait()
    t_exit = time.monotonic() - t0
    if first.strip() != b"hi" or code != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        sys.exit(f"bench-snapshot: {'cold' if cold else 'template'} run failed (exit {code}): {tail}")
    m = RESTORED.search(err)
    if not cold and not m:
        sys.exit("bench-snapshot: the template run did not restore a template")
    return t_first, t_exit, float(m.group(1)) if m else None

t0 = time.monotonic()
one(False)  # makes the template (a cold boot to the agent, saved), untimed
print(f"template made by a first run in {time.monotonic() - t0:.1f} s", file=sys.stderr)
res = {"cold": [], "template": []}
for i in range(n):
    for mode in ("cold", "template"):
        res[mode].append(one(mode == "cold"))
        r = res[mode][-1]
        print(f"run {i + 1}/{n} {mode:8}: first output {r[0]:.3f} s, exit {r[1]:.3f} s", file=sys.stderr)

med = statistics.median
c_first, c_exit = med(r[0] for r in res["cold"]), med(r[1] for r in res["cold"])
t_first, t_exit = med(r[0] for r in res["template"]), med(r[1] for r in res["template"])
restore = [r[2] for r in res["template"]]
print(f"mvm run --rm --image busybox -- echo hi, median of {n} each (alternating)")
print(f"{'':24}{'cold':>10}{'template':>10}{'ratio':>8}")
print(f"{'first output (s)':24}{c_first:10.3f}{t_first:10.3f}{t_first / c_first:8.2f}")
print(f"{'exit (s)':24}{c_exit:10.3f}{t_exit:10.3f}{t_exit / c_exit:8.2f}")
print(f"VMM restore alone: median {med(restore):.1f} ms (min {min(restore):.1f}, max {max(restore):.1f})")
print(f"guest: 256 MiB, 1 vCPU, kernel {kernel}")
EOF
