#!/bin/sh
# Start-to-exit time of busybox `true` in a container: `mvm run --isolation container` against
# Debian's crun on the same root filesystem (an OCI bundle made with `crun spec`), alternating,
# median of N runs each (default 25). Needs root, busybox-static and crun.
#
#   scripts/bench-container.sh [N]
#   MVM=target/release/mvm scripts/bench-container.sh 50
set -eu

N=${1:-25}
HERE=$(cd "$(dirname "$0")/.." && pwd)
MVM=${MVM:-}
if [ -z "$MVM" ]; then
    if [ -x "$HERE/target/release/mvm" ]; then MVM=$HERE/target/release/mvm; else MVM=$HERE/target/debug/mvm; fi
fi
[ "$(id -u)" = 0 ] || { echo "bench-container: needs root" >&2; exit 2; }
[ -x "$MVM" ] || { echo "bench-container: $MVM not built (cargo build --release -p mvm)" >&2; exit 2; }
command -v crun >/dev/null || { echo "bench-container: crun not installed (apt-get install crun)" >&2; exit 2; }
[ -x /bin/busybox ] || { echo "bench-container: /bin/busybox missing (apt-get install busybox-static)" >&2; exit 2; }

WORK=$(mktemp -d /tmp/mvm-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT INT TERM

# One root filesystem: static busybox and its applets.
ROOTFS=$WORK/bundle/rootfs
mkdir -p "$ROOTFS/bin" "$ROOTFS/proc" "$ROOTFS/sys" "$ROOTFS/dev"
cp /bin/busybox "$ROOTFS/bin/busybox"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$ROOTFS/bin/$a"; done

# The crun bundle: its default spec, without a terminal, running /bin/true.
(cd "$WORK/bundle" && crun spec)
sed -i -e 's/"terminal": true/"terminal": false/' -e 's/"sh"$/"\/bin\/true"/' "$WORK/bundle/config.json"
grep -q '"/bin/true"' "$WORK/bundle/config.json" || { echo "bench-container: could not edit config.json" >&2; exit 1; }

# crun 1.8 refuses "hybrid" cgroup hosts (v1 controllers plus a cgroup2 mount at
# /sys/fs/cgroup/unified that holds a controller). There the whole loop runs in a private mount
# namespace without that mount, for both runtimes (mvm uses the v1 hierarchies either way).
if [ -z "${MVM_BENCH_INNER:-}" ] && grep -q ' /sys/fs/cgroup/unified .* - cgroup2 ' /proc/self/mountinfo \
    && [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)" ]; then
    echo "note: hybrid cgroup host: running both in a mount namespace without /sys/fs/cgroup/unified"
    export MVM MVM_BENCH_INNER=1
    rm -rf "$WORK"
    trap - EXIT INT TERM
    exec unshare -m --propagation private sh -c 'umount /sys/fs/cgroup/unified && exec "$0" "$@"' "$0" "$N"
fi
now() { date +%s%N; }

i=0
while [ "$i" -lt "$N" ]; do
    t0=$(now)
    "$MVM" run --root "$WORK/state" --isolation container --rm --rootfs "$ROOTFS" -- /bin/true
    t1=$(now)
    crun run --bundle "$WORK/bundle" "mvm-bench-$$-$i" </dev/null
    t2=$(now)
    echo "$(( (t1 - t0) / 1000 )) $(( (t2 - t1) / 1000 ))" >> "$WORK/times"
    i=$((i + 1))
done

median() { sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'; }
M=$(cut -d' ' -f1 "$WORK/times" | median)
C=$(cut -d' ' -f2 "$WORK/times" | median)
echo "runs: $N each, alternating; start-to-exit of /bin/true (busybox), microseconds"
echo "mvm run --isolation container: median ${M} us  ($MVM)"
echo "crun run:                      median ${C} us  ($(crun --version | head -1))"
awk -v m="$M" -v c="$C" 'BEGIN { printf "ratio mvm/crun: %.2f\n", m / c }'
