#!/usr/bin/env bash
# Builds mvm's guest kernel from Debian's linux-source-6.12: `make tinyconfig` + the fragment
# kernel-config/microvm.config, then `make vmlinux`. The result is cached by (source version,
# fragment), installed where `mvm` looks for its default kernel, and its path printed on stdout.
#
#   scripts/build-kernel.sh                      build (or reuse) vmlinux, install it, print its path
#   scripts/build-kernel.sh --config-only        only generate the .config and print its path
#   scripts/build-kernel.sh --check-config FILE  check that every fragment option holds in FILE
#   scripts/build-kernel.sh --print-key          print the cache key (no apt, no unpacking)
#   options: --no-install (do not copy to the default kernel path)
# Exit codes: 0 done; 1 failed (build error, fragment option lost, check failed); 3 the source
# package or build tools cannot be installed on this machine.
#
# Environment: MVM_KERNEL_CACHE (cache dir, default ${XDG_CACHE_HOME:-$HOME/.cache}/mvm/kernel),
# MVM_ROOT (mvm's state dir; the kernel goes to $MVM_ROOT/kernel/vmlinux; default as `mvm`:
# /var/lib/mvm for root, ${XDG_DATA_HOME:-$HOME/.local/share}/mvm otherwise), JOBS (make -j).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
fragment="$here/kernel-config/microvm.config"
cache=${MVM_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mvm/kernel}
if [ -n "${MVM_ROOT:-}" ]; then
  mvm_root=$MVM_ROOT
elif [ "$(id -u)" = 0 ]; then
  mvm_root=/var/lib/mvm
else
  mvm_root=${XDG_DATA_HOME:-$HOME/.local/share}/mvm
fi
default_kernel="$mvm_root/kernel/vmlinux"
package=linux-source-6.12
deps=("$package" bc bison flex libelf-dev libssl-dev make gcc xz-utils)

log() { echo "build-kernel: $*" >&2; }
die() { log "error: $*"; exit 1; }
# Exit code 3: the kernel source or build tools cannot be installed here (tests skip on it).
unavailable() { log "error: $*"; exit 3; }

# check_config FRAGMENT CONFIG: prints one line per fragment option that CONFIG does not hold;
# returns 1 if there was any. `# CONFIG_X is not set` holds when CONFIG_X is unset or absent.
check_config() {
  local frag=$1 cfg=$2 line name want got bad=0
  while IFS= read -r line || [ -n "$line" ]; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
      name=${BASH_REMATCH[1]}
      want=${BASH_REMATCH[2]}
      if ! grep -qxF -- "$line" "$cfg"; then
        got=$(grep -E "^$name=" "$cfg" | head -1 | cut -d= -f2-)
        echo "$name: wanted $want, got ${got:-not set}"
        bad=1
      fi
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
      name=${BASH_REMATCH[1]}
      got=$(grep -E "^$name=" "$cfg" | head -1 | cut -d= -f2-)
      if [ -n "$got" ]; then
        echo "$name: wanted not set, got $got"
        bad=1
      fi
    fi
  done <"$frag"
  return $bad
}

config_only=0
install=1
mode=build
while [ $# -gt 0 ]; do
  case $1 in
    --config-only) config_only=1 ;;
    --no-install) install=0 ;;
    --print-key) mode=key ;;
    --check-config)
      [ $# -ge 2 ] || die "--check-config needs the path of a .config"
      mode=check
      check_target=$2
      shift
      ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[ -r "$fragment" ] || die "fragment $fragment is missing"

if [ "$mode" = check ]; then
  [ -r "$check_target" ] || die "cannot read $check_target"
  if failed=$(check_config "$fragment" "$check_target"); then
    log "all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set)' "$fragment") fragment options hold in $check_target"
    exit 0
  fi
  log "options of $fragment that did not survive in $check_target:"
  echo "$failed"
  exit 1
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

# Install the kernel source and the build tools when missing (apt is shared: take its lock).
missing=()
[ "$mode" = key ] && deps=("$package")
for d in "${deps[@]}"; do installed "$d" || missing+=("$d"); done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$mode" = key ] && ! installed "$package" && unavailable "$package is not installed (run without --print-key)"
  command -v apt-get >/dev/null || unavailable "missing ${missing[*]} and no apt-get to install them"
  mkdir -p "$cache"
  log "installing ${missing[*]} (log: $cache/apt.log)"
  if ! flock /tmp/apt.lock bash -c '
      set -e
      if ! apt-cache show "$1" >/dev/null 2>&1; then apt-get update -qq; fi
      shift
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
    ' apt "$package" "${missing[@]}" >"$cache/apt.log" 2>&1; then
    tail -5 "$cache/apt.log" >&2
    unavailable "apt-get could not install ${missing[*]}; see $cache/apt.log"
  fi
fi

version=$(dpkg-query -W -f='${Version}' "$package")
key=$( (echo "$package $version"; cat "$fragment") | sha256sum | cut -c1-16)
if [ "$mode" = key ]; then echo "$key"; exit 0; fi

mkdir -p "$cache"
out="$cache/vmlinux-$key"
config="$out.config"

install_kernel() {
  [ $install = 1 ] || return 0
  if [ -f "$default_kernel" ] && cmp -s "$out" "$default_kernel"; then return 0; fi
  if mkdir -p "$(dirname "$default_kernel")" 2>/dev/null \
    && cp "$out" "$default_kernel.tmp" 2>/dev/null && mv "$default_kernel.tmp" "$default_kernel"; then
    log "installed as $default_kernel (mvm's default kernel)"
  else
    log "warning: could not install $default_kernel (set MVM_ROOT or use --no-install)"
  fi
}

if [ $config_only = 0 ] && [ -s "$out" ]; then
  install_kernel
  echo "$out"
  exit 0
fi
if [ $config_only = 1 ] && [ -s "$config" ]; then
  echo "$config"
  exit 0
fi

# One build per key at a time; a second caller waits, then finds the result.
exec 9>"$cache/.lock-$key"
if ! flock -n 9; then
  log "another build of $key is running; waiting for it"
  flock 9
  if [ $config_only = 1 ] && [ -s "$config" ]; then echo "$config"; exit 0; fi
  if [ $config_only = 0 ] && [ -s "$out" ]; then install_kernel; echo "$out"; exit 0; fi
fi

# Unpack the source once per package version; builds go to separate output folders (O=).
tarball=$(ls /usr/src/linux-source-6.12*.tar.* 2>/dev/null | head -1)
[ -n "$tarball" ] || unavailable "no /usr/src/linux-source-6.12*.tar.* although $package is installed"
src="$cache/src-$(echo "$version" | tr -c 'A-Za-z0-9.+\n-' '_')"
if [ ! -f "$src/.mvm-unpacked" ]; then
  log "unpacking $(basename "$tarball") ($version)"
  rm -rf "$src" "$src.tmp"
  mkdir -p "$src.tmp"
  tar -xf "$tarball" -C "$src.tmp" --strip-components=1
  touch "$src.tmp/.mvm-unpacked"
  mv "$src.tmp" "$src"
fi

build="$cache/build-$key"
mkdir -p "$build"
log "generating .config: tinyconfig + $(basename "$fragment")"
make -s -C "$src" O="$build" tinyconfig >"$build/config.log" 2>&1 || { tail -5 "$build/config.log" >&2; die "make tinyconfig failed"; }
"$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$fragment" >>"$build/config.log" 2>&1 \
  || { tail -5 "$build/config.log" >&2; die "merging the fragment failed"; }
make -s -C "$src" O="$build" olddefconfig >>"$build/config.log" 2>&1 || { tail -5 "$build/config.log" >&2; die "make olddefconfig failed"; }
if ! failed=$(check_config "$fragment" "$build/.config"); then
  echo "$failed" >&2
  die "fragment options above did not survive olddefconfig (fix kernel-config/microvm.config)"
fi
cp "$build/.config" "$config.tmp" && mv "$config.tmp" "$config"

if [ $config_only = 1 ]; then
  echo "$config"
  exit 0
fi

jobs=${JOBS:-$(nproc)}
log "building vmlinux with $jobs jobs (about 7 minutes on 2 idle cores); log: $build/build.log"
start=$SECONDS
make -C "$src" O="$build" -j"$jobs" vmlinux >"$build/build.log" 2>&1 &
make_pid=$!
# Progress: compiled objects every 15 s while make runs.
while kill -0 "$make_pid" 2>/dev/null; do
  for _ in $(seq 15); do kill -0 "$make_pid" 2>/dev/null || break; sleep 1; done
  kill -0 "$make_pid" 2>/dev/null || break
  objs=$(find "$build" -name '*.o' -newer "$build/.config" 2>/dev/null | wc -l)
  log "$((SECONDS - start)) s: $objs objects compiled"
done
if ! wait "$make_pid"; then
  tail -20 "$build/build.log" >&2
  die "kernel build failed; full log: $build/build.log"
fi
cp "$build/vmlinux" "$out.tmp" && mv "$out.tmp" "$out"
log "built $(basename "$out") in $((SECONDS - start)) s ($(( $(stat -c %s "$out") / 1048576 )) MiB)"
rm -rf "$build"
install_kernel
echo "$out"
