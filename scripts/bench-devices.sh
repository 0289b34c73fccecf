#!/usr/bin/env bash
# Device throughput benchmark: block and network measured from inside a Linux guest, mvm against
# QEMU's microvm machine, on the same kernel, initramfs, backing file and tap, in one run.
#
# Usage: scripts/bench-devices.sh (env BENCH_MIB=256 block MiB, NET_MIB=8 network MiB per
#        direction, MEM=256M; MVM_TEST_KERNEL=vmlinux with a PVH note to skip the kernel build)
#
# The guest is the test kernel (../shared/test-kernel, built once more with CONFIG_PVH=y so QEMU
# can boot the same vmlinux through its PVH entry; mvm ignores the note) with
# tests/linux/bench_init.rs as /init. It reads and then writes BENCH_MIB MiB of /dev/vda with
# O_DIRECT in 1 MiB requests (the write ends with fsync), sends NET_MIB MiB to a host listener over
# the tap and receives NET_MIB MiB back, timing each with its own clock and printing MB/s.
# Both VMMs get 1 vCPU, a raw file with the host page cache (QEMU cache=writeback) and one
# persistent tap (172.30.98.1/24 on the host, .2 in the guest) with the virtio-net header.
# Needs root (tap), socat, cpio, qemu-system-x86, readelf (binutils).
set -euo pipefail

bench_mib=${BENCH_MIB:-256}
net_mib=${NET_MIB:-8}
mem=${MEM:-256M}
tap=mvmbench0
host_ip=172.30.98.1
guest_ip=172.30.98.2
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
die() { echo "bench-devices: $*" >&2; exit 1; }

for tool in qemu-system-x86_64 socat cpio readelf ip rustc; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
[ -w /dev/kvm ] || die "no usable /dev/kvm"
[ "$(id -u)" = 0 ] || die "needs root to create the tap device"
[ -e "/sys/class/net/$tap" ] && die "$tap already exists (another run?); remove it with: ip link del $tap"

work=$(mktemp -d /tmp/mvm-bench-devices.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip link del "$tap" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

target=${CARGO_TARGET_DIR:-$root/target}
mvm=$target/release/mvm
if [ ! -x "$mvm" ]; then
    echo "building mvm (release)..." >&2
    cargo build --release -p mvm --bin mvm >&2
fi

# The kernel: the test kernel's config and patches plus CONFIG_PVH=y, cached separately.
if [ -n "${MVM_TEST_KERNEL:-}" ]; then
    kernel=$MVM_TEST_KERNEL
else
    shared=""
    for d in "$root/../shared" /work/shared; do
        [ -f "$d/test-kernel/build.sh" ] && { shared=$d; break; }
    done
    [ -n "$shared" ] || die "no shared/test-kernel next to the repository"
    cp -r "$shared/test-kernel" "$work/kernel"
    echo "CONFIG_PVH=y" >>"$work/kernel/config"
    echo "building or reusing the test kernel with CONFIG_PVH=y..." >&2
    kernel=$(MVM_TEST_KERNEL_CACHE=${MVM_BENCH_KERNEL_CACHE:-$HOME/.cache/mvm-bench-kernel} \
        bash "$work/kernel/build.sh")
fi
readelf -n "$kernel" 2>/dev/null | grep -q "Xen.*0x00000012" \
    || die "$kernel has no PVH entry note (CONFIG_PVH=y), so QEMU cannot boot it"
cmdline_file=""
for d in "$root/../shared" /work/shared; do
    [ -f "$d/test-kernel/cmdline" ] && { cmdline_file=$d/test-kernel/cmdline; break; }
done
[ -n "$cmdline_file" ] || die "no shared/test-kernel/cmdline"
cmdline="$(tr -d '\n' <"$cmdline_file") bench_mib=$bench_mib net_mib=$net_mib bench_ip=$guest_ip bench_host=$host_ip"

# The initramfs: the static bench init as /init.
rustc --edition 2021 -O -C panic=abort -C target-feature=+crt-static \
    --target x86_64-unknown-linux-gnu -o "$work/init" tests/linux/bench_init.rs
mkdir -p "$work/root/dev" "$work/root/proc" "$work/root/sys"
cp "$work/init" "$work/root/init"
mknod "$work/root/dev/console" c 5 1
(cd "$work/root" && find . | cpio -o -H newc --quiet >"$work/initramfs.cpio")

# The backing file: random data (not a sparse hole), in the page cache for both VMMs.
disk=$work/disk.img
dd if=/dev/urandom of="$disk" bs=1M count="$bench_mib" status=none

ip tuntap add dev "$tap" mode tap vnet_hdr
ip addr add "$host_ip/24" dev "$tap"
ip link set "$tap" up

# One run: $1 = name, rest = the VMM command. Leaves the guest's serial output in $work/$1.out.
run_one() {
    local name=$1
    shift
    socat -u "TCP-LISTEN:7001,bind=$host_ip,reuseaddr" OPEN:/dev/null 2>/dev/null &
    pids+=($!)
    head -c $((net_mib << 20)) /dev/zero \
        | socat -u STDIN "TCP-LISTEN:7002,bind=$host_ip,reuseaddr" 2>/dev/null &
    pids+=($!)
    echo "running $name..." >&2
    timeout 600 "$@" </dev/null >"$work/$name.out" 2>"$work/$name.err" \
        || die "$name failed: $(tail -3 "$work/$name.err") $(tail -5 "$work/$name.out")"
    grep -q "MVM-BENCH done" "$work/$name.out" || die "$name: the guest did not finish: $(tail -5 "$work/$name.out")"
    if grep -q "MVM-BENCH .* error=" "$work/$name.out"; then
        die "$name: $(grep "MVM-BENCH .* error=" "$work/$name.out" | head -1)"
    fi
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}

run_one mvm "$mvm" boot --kernel "$kernel" --initrd "$work/initramfs.cpio" --cmdline "$cmdline" \
    --mem "$mem" --cpus 1 --disk "$disk" --network "tap:$tap"

qemu=(qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host,-arch-capabilities -m "$mem"
    -smp 1 -nodefaults -no-user-config -nographic -no-reboot -serial stdio
    -kernel "$kernel" -initrd "$work/initramfs.cpio" -append "$cmdline"
    -drive "id=d0,file=$disk,format=raw,if=none,cache=writeback,aio=threads"
    -device virtio-blk-device,drive=d0
    -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no,vnet_hdr=on"
    -device virtio-net-device,netdev=n0)
run_one qemu "${qemu[@]}"

value() { sed -n "s/.*MVM-BENCH $2 mbps=\([0-9.]*\).*/\1/p" "$work/$1.out" | head -1; }
echo "guest: $(basename "$kernel"), 1 vCPU, $mem; block: $bench_mib MiB O_DIRECT in 1 MiB requests" \
    "(write includes fsync); net: $net_mib MiB each way over the tap"
printf "%-24s %10s %10s %10s\n" "metric (MB/s, in guest)" mvm qemu mvm/qemu
for m in block-read block-write net-tx net-rx; do
    a=$(value mvm "$m")
    b=$(value qemu "$m")
    [ -n "$a" ] && [ -n "$b" ] || die "no $m figure: mvm '$a' qemu '$b'"
    printf "%-24s %10s %10s %10s\n" "$m" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
done
