#!/usr/bin/env bash
# Cold boot against template restore, side by side in one run: `mvm run --rm --image busybox
# -- echo hi` with `--cold` (the guest kernel boots) and from the VM template (made once by an
# untimed first run, then restored), alternating; time from `mvm run` to the first output line
# and to exit, medians of N runs each (default 5), the template/cold ratio, and the VMM's
# restore time alone (snapshot checked, memory mapped, devices attached, vCPUs, interrupt
# controllers, clock and devices put back: mvm's own measurement in each template run).
# Then forks: a counter container (`-d`, booted cold) is saved with `mvm snapshot create`
# (timed, with how long its VM stood still), and FORKS copies (default 10, MVM_FORKS) are
# started from it one after another with `mvm run -d --from-snapshot`: time to running and to
# the fork's first line of output, against the parent's cold `-d` start in the same run, and
# the host memory the forks take: the proportional set size (PSS) of each fork's VMM process
# without the pages of the snapshot's memory file they share, in total, and apart from it that
# of their network backends (passt, a process per VM); the parent's beside them.
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

python3 - "$MVM" "$work/root" "$kernel" "$kargs" "${MVM_FORKS:-10}" <<'EOF'
import json, os, re, statistics, subprocess, sys, time

mvm, root, kernel, kargs, forks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
med = statistics.median

def run(*args, env=None):
    p = subprocess.run([mvm, "--root", root, *args], capture_output=True, env=env)
    if p.returncode != 0:
        sys.exit(f"bench-snapshot: mvm {' '.join(args[:3])}: {p.stderr.decode(errors='replace').strip()}")
    return p

def lines(name):
    out = run("logs", name).stdout.decode(errors="replace").split()
    return [int(w) for w in out if w.isdigit()]

def wait_output(name, limit=600):
    t0 = time.monotonic()
    while not lines(name):
        if time.monotonic() - t0 > limit:
            sys.exit(f"bench-snapshot: {name} printed nothing in {limit} s")
        time.sleep(0.02)

def pss_kib(name, shared_file):
    # Every process of the container's VMM cgroup: PSS, and the PSS of the snapshot's memory
    # file's pages.
    rec = json.loads(run("inspect", name).stdout)
    procs = {rec["vmm_pid"]}
    for d in rec.get("vmm_cgroup_dirs") or []:
        try:
            procs |= {int(p) for p in open(os.path.join(d, "cgroup.procs")).read().split()}
        except OSError:
            pass
    vmm = shared = network = 0
    for pid in procs:
        try:
            smaps = open(f"/proc/{pid}/smaps").read().splitlines()
            passt = open(f"/proc/{pid}/comm").read().startswith("passt")
        except OSError:
            continue
        in_file = False
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                in_file = line.rstrip().endswith(shared_file)
            elif line.startswith("Pss:"):
                kib = int(line.split()[1])
                if passt:
                    network += kib
                elif in_file:
                    shared += kib
                else:
                    vmm += kib
    return vmm, shared, network

counter = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done"
t0 = time.monotonic()
run("run", "-d", "--cold", "--name", "parent", "--kernel", kernel, "--kernel-args", kargs,
    "--image", "bench/busybox", "--", "sh", "-c", counter)
t_parent_running = time.monotonic() - t0
wait_output("parent")
t_parent_first = time.monotonic() - t0
t0 = time.monotonic()
p = run("snapshot", "create", "parent", "snap", env=dict(os.environ, MVM_LOG="info"))
t_create = time.monotonic() - t0
m = re.search(rb"stood still ([0-9]+) ms", p.stderr)
paused = int(m.group(1)) if m else -1
memfile = os.path.realpath(os.path.join(root, "snapshots", "snap", "memory"))
print(f"snapshot of the running parent: {t_create:.3f} s (its VM stood still {paused} ms)", file=sys.stderr)

running, first = [], []
for i in range(forks):
    name = f"fork{i}"
    t0 = time.monotonic()
    run("run", "-d", "--from-snapshot", "snap", "--name", name)
    running.append(time.monotonic() - t0)
    wait_output(name)
    first.append(time.monotonic() - t0)
    print(f"fork {i + 1}/{forks}: running {running[-1]:.3f} s, first output {first[-1]:.3f} s", file=sys.stderr)
time.sleep(2)
totals = [pss_kib(f"fork{i}", memfile) for i in range(forks)]
beyond = sum(t[0] for t in totals) / 1024
shared = sum(t[1] for t in totals) / 1024
network = sum(t[2] for t in totals) / 1024
parent = pss_kib("parent", memfile)
for n in ["parent"] + [f"fork{i}" for i in range(forks)]:
    run("rm", "-f", n)
run("snapshot", "rm", "snap")
print(f"\nforks of one running busybox container (256 MiB, 1 vCPU), {forks} started one after another")
print(f"{'':30}{'cold -d':>10}{'fork':>10}{'ratio':>8}")
print(f"{'to running (s), median':30}{t_parent_running:10.3f}{med(running):10.3f}{med(running) / t_parent_running:8.2f}")
print(f"{'to first output (s), median':30}{t_parent_first:10.3f}{med(first):10.3f}{med(first) / t_parent_first:8.2f}")
print(f"host memory (PSS) of the {forks} forks' VMMs beyond the snapshot file they share: "
      f"{beyond:.1f} MiB in all ({beyond / forks:.1f} MiB per fork); their share of the file: "
      f"{shared:.1f} MiB; the cold-booted parent's VMM: {parent[0] / 1024:.1f} MiB")
if network:
    print(f"their network backends (passt, one per VM, as for a cold VM): {network:.1f} MiB in all "
          f"({network / forks:.1f} MiB per fork; the parent's: {parent[2] / 1024:.1f} MiB)")
EOF
