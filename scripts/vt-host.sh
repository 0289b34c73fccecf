#!/usr/bin/env bash
# The emulated VT host: runs a command inside a Linux VM (L1) that has hardware virtualization
# (AMD-V with nested paging), so mvm's product path (its own guest kernel on a host with
# VT-x/AMD-V) can be tested on any Linux machine with QEMU, also one without KVM.
#
#   scripts/vt-host.sh [options] -- CMD [ARG...]     run CMD in L1; exit with CMD's code
#   scripts/vt-host.sh --prepare                     only fetch the L1 kernel and build its initramfs
#   options: --cpus N (default 2)  --mem SIZE (default 4G)  --timeout SECS (default 3600)
#            --env NAME=VALUE (repeatable; PATH, HOME, TERM, MVM_*, RUST_* and CARGO_* pass anyway)
#
# L1 is QEMU with TCG emulating an AMD EPYC CPU with SVM and NPT (`-accel tcg -cpu EPYC`),
# booting Debian's generic kernel (package linux-image-amd64, downloaded with apt-get and unpacked,
# never installed; it has the 9p modules the cloud kernel lacks). Its root filesystem is this
# machine's / shared read-only over virtio-9p with a tmpfs overlay on top, so L1 sees the same
# files, programs and build outputs at the same paths; nothing L1 writes reaches this machine
# except the job folder. Its initramfs (busybox + modules) loads kvm_amd, so /dev/kvm in L1 is
# backed by (emulated) AMD-V. CMD runs in the current directory with the environment above; its
# output streams to this terminal through L1's serial console.
#
# Exit codes: CMD's own; 3 when this machine cannot run L1 (no QEMU, no kernel package);
# 124 when --timeout ran out; 125 when L1 ended without reporting CMD's code.
#
# Environment: MVM_VT_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/mvm/vt-host).
set -euo pipefail

cache=${MVM_VT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mvm/vt-host}
cpus=2
mem=4G
timeout_s=3600
prepare_only=0
extra_env=()

log() { echo "vt-host: $*" >&2; }
unavailable() { log "cannot run here: $*"; exit 3; }

while [ $# -gt 0 ]; do
  case $1 in
    --cpus) cpus=$2; shift ;;
    --mem) mem=$2; shift ;;
    --timeout) timeout_s=$2; shift ;;
    --env) extra_env+=("$2"); shift ;;
    --prepare) prepare_only=1 ;;
    --) shift; break ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) log "unknown argument '$1' (see --help)"; exit 2 ;;
  esac
  shift
done
[ $prepare_only = 1 ] || [ $# -gt 0 ] || { log "no command given (see --help)"; exit 2; }

command -v qemu-system-x86_64 >/dev/null || unavailable "qemu-system-x86_64 is not installed (Debian: qemu-system-x86)"
busybox=$(command -v busybox || true)
[ -n "$busybox" ] && ! ldd "$busybox" >/dev/null 2>&1 || unavailable "no static busybox (Debian: busybox-static)"
command -v cpio >/dev/null || unavailable "cpio is not installed"
mkdir -p "$cache"

# --- The L1 kernel: Debian's generic amd64 kernel, downloaded once per version. ---------------
exec 8>"$cache/.lock"
flock 8
meta=linux-image-amd64
pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }' || true)
if [ -z "$pkg" ] && [ ! -e "$cache/current" ]; then
  log "reading Debian's package lists"
  flock /tmp/apt.lock apt-get update -qq >/dev/null 2>&1 || true
  pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }' || true)
fi
if [ -n "$pkg" ] && [ ! -f "$cache/$pkg/.unpacked" ]; then
  log "downloading $pkg (the L1 kernel, about 70 MB; once)"
  dl=$(mktemp -d "$cache/dl.XXXXXX")
  if (cd "$dl" && apt-get download "$pkg" >/dev/null 2>"$dl/apt.log"); then
    rm -rf "$cache/$pkg"
    dpkg-deb -x "$dl"/*.deb "$cache/$pkg.tmp"
    touch "$cache/$pkg.tmp/.unpacked"
    mv "$cache/$pkg.tmp" "$cache/$pkg"
    ln -sfn "$pkg" "$cache/current"
  else
    log "apt-get download $pkg failed: $(tail -1 "$dl/apt.log")"
  fi
  rm -rf "$dl"
fi
[ -n "$pkg" ] && [ -f "$cache/$pkg/.unpacked" ] && ln -sfn "$pkg" "$cache/current"
[ -e "$cache/current/.unpacked" ] || unavailable "Debian's $meta kernel package cannot be downloaded and none is cached"
l1=$(readlink -f "$cache/current")
kver=$(ls "$l1/lib/modules" | head -1)
vmlinuz="$l1/boot/vmlinuz-$kver"
[ -f "$vmlinuz" ] || unavailable "$vmlinuz is missing from the unpacked package"

# --- The initramfs: busybox, the modules L1 needs, and /init (below). -------------------------
# Modules: the 9p root and its transport, overlayfs for a writable root, KVM on AMD-V, tun.
modules=(virtio_pci 9pnet_virtio 9p overlay kvm_amd tun vhost_vsock)
init_script=$(cat <<'INIT'
#!/bin/busybox sh
# L1's PID 1: mount this machine's root (9p, read-only) under a tmpfs overlay, load KVM, switch
# to that root and run the job with its output on the console, record its exit code, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "vt-host L1: $*" >/dev/console; poweroff -f; }
for m in __MODULES__; do modprobe "$m" || fail "modprobe $m failed"; done
job=$(sed -n 's/.*mvm_vt\.job=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$job" ] || fail "no mvm_vt.job= on the kernel command line"
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /lower \
  || fail "cannot mount the host's root over 9p"
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
  || fail "cannot mount the overlay root"
r=/newroot
mount -t proc proc $r/proc
mount -t sysfs sysfs $r/sys
mount -t cgroup2 cgroup2 $r/sys/fs/cgroup 2>/dev/null
mount -t devtmpfs devtmpfs $r/dev
ln -sf /proc/self/fd $r/dev/fd
ln -sf /proc/self/fd/0 $r/dev/stdin
ln -sf /proc/self/fd/1 $r/dev/stdout
ln -sf /proc/self/fd/2 $r/dev/stderr
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $r/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $r/dev/shm
mount -t tmpfs -o mode=1777 tmpfs $r/tmp
mount -t tmpfs -o mode=0755 tmpfs $r/run
# mvm's state dir on a real filesystem (overlay upper dirs cannot live on the overlay root), with
# this machine's kernel folder (mvm's default kernel) visible in it, read-only.
mkdir -p $r/var/lib/mvm
mount -t tmpfs -o mode=0700 mvm $r/var/lib/mvm
if [ -d /lower/var/lib/mvm/kernel ]; then
  mkdir -p $r/var/lib/mvm/kernel
  mount --bind /lower/var/lib/mvm/kernel $r/var/lib/mvm/kernel
fi
mkdir -p $r$job
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=512000 job $r$job \
  || fail "cannot mount the job folder"
hostname vt-host
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
# The job runs under a real root switch, not a chroot: the kernel refuses a new user namespace
# (the VMM's jail) to a process whose root is not its mount namespace's.
cat > $r/run/vt-init <<JOB
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
/bin/sh "$job/job.sh" </dev/null >/dev/console 2>&1
echo \$? > "$job/rc"
sync
umount "$job"
echo o > /proc/sysrq-trigger
sleep 10
JOB
exec switch_root $r /bin/sh /run/vt-init
INIT
)
init_script=${init_script/__MODULES__/${modules[*]}}
key=$( (echo "$kver"; echo "$init_script"; readlink -f "$busybox") | sha256sum | cut -c1-16)
initrd="$l1/initramfs-$key.cpio"
if [ ! -s "$initrd" ]; then
  log "building L1's initramfs ($kver)"
  stage=$(mktemp -d "$cache/initramfs.XXXXXX")
  mkdir -p "$stage"/{bin,dev,proc,sys,lib/modules/"$kver"}
  cp "$busybox" "$stage/bin/busybox"
  printf '%s\n' "$init_script" >"$stage/init"
  chmod 755 "$stage/init"
  # Each module with what it depends on (read from the module's own .modinfo).
  declare -A seen=()
  add_module() {
    local name=$1 file dep
    [ -z "${seen[$name]:-}" ] || return 0
    seen[$name]=1
    file=$(find "$l1/lib/modules/$kver/kernel" -name "$name.ko" -o -name "${name//_/-}.ko" | head -1)
    [ -n "$file" ] || { log "module $name is not in $kver"; exit 1; }
    mkdir -p "$stage/lib/modules/$kver/$(dirname "${file#"$l1/lib/modules/$kver/"}")"
    cp "$file" "$stage/lib/modules/$kver/${file#"$l1/lib/modules/$kver/"}"
    for dep in $(grep -a -o 'depends=[a-z0-9_,-]*' "$file" | head -1 | cut -d= -f2 | tr ',' ' '); do
      add_module "$dep"
    done
  }
  for m in "${modules[@]}"; do add_module "$m"; done
  "$busybox" depmod -b "$stage" "$kver"
  (cd "$stage" && find . | cpio -o -H newc --quiet) >"$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  rm -rf "$stage"
fi
flock -u 8
[ $prepare_only = 1 ] && { log "ready: $vmlinuz"; exit 0; }

# --- The job: CMD in this directory with the chosen environment. -----------------------------
job=$(mktemp -d /tmp/mvm-vt-job.XXXXXX)
cleanup() { rm -rf "$job"; }
trap cleanup EXIT
{
  echo "cd $(printf %q "$PWD") || exit 125"
  while IFS= read -r name; do
    case $name in
      PATH | HOME | TERM | USER | LANG | MVM_* | RUST_* | CARGO_* | RUSTC | RUSTFLAGS)
        echo "export $name=$(printf %q "${!name}")" ;;
    esac
  done < <(compgen -e)
  for kv in ${extra_env[@]+"${extra_env[@]}"}; do
    echo "export $(printf %q "${kv%%=*}")=$(printf %q "${kv#*=}")"
  done
  printf 'exec'
  printf ' %q' "$@"
  echo
} >"$job/job.sh"

# EPYC without the features TCG cannot emulate (QEMU would warn about each at every start).
cpu_model=EPYC,-rdseed,-sha-ni,-fxsr-opt,-misalignsse,-3dnowprefetch,-osvw,-topoext,-nrip-save,-xsavec
log "starting L1: QEMU TCG, AMD EPYC with SVM, $cpus vCPUs, $mem, kernel $kver"
set +e
timeout --foreground -k 10 "$timeout_s" qemu-system-x86_64 \
  -accel tcg,thread=multi -cpu "$cpu_model" -smp "$cpus" -m "$mem" \
  -display none -monitor none -no-reboot \
  -chardev stdio,id=con,signal=off -serial chardev:con \
  -kernel "$vmlinuz" -initrd "$initrd" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 mvm_vt.job=$job" \
  -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
  -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
  -fsdev local,id=job,path="$job",security_model=none,multidevs=remap \
  -device virtio-9p-pci,fsdev=job,mount_tag=job \
  -nic none </dev/null | sed -u 's/\r$//'
qemu_rc=${PIPESTATUS[0]}
set -e
if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
  log "timed out after $timeout_s s"
  exit 124
fi
if [ ! -s "$job/rc" ]; then
  log "L1 ended (QEMU exit $qemu_rc) without reporting the command's exit code"
  exit 125
fi
exit "$(cat "$job/rc")"
