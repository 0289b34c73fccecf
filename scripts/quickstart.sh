#!/usr/bin/env bash
# The quick start: example images from Debian packages, busybox as a container on the host, then
# nginx in its own microVM with a published port, fetched with curl, and ps, logs, exec, stop, rm.
# Needs no outside service beyond Debian's mirror (for the example packages).
#
#   MVM=target/release/mvm scripts/quickstart.sh
#
# Environment: MVM (the mvm binary; default target/release/mvm), MVM_QUICKSTART_PORT (default
# 8080), MVM_EXAMPLES (a folder with busybox-oci/ and nginx-oci/ layouts built beforehand, as
# the emulated VT host uses, which has no network), SKIP_KERNEL (skip the microVM part).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
say() { echo "quickstart: $*" >&2; }
mvm=${MVM:-$repo/target/release/mvm}
"$mvm" version
"$mvm" info
work=$(mktemp -d)
trap '"$mvm" rm -f quickstart-web >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
# Example images built from Debian packages (busybox-static; nginx with the libraries it needs)
# as OCI layouts, loaded into the image store: no registry, no network beyond Debian's mirror.
for example in busybox nginx; do
  layout="$work/$example-oci"
  if [ -n "${MVM_EXAMPLES:-}" ] && [ -d "$MVM_EXAMPLES/$example-oci" ]; then
    layout="$MVM_EXAMPLES/$example-oci"
  else
    "$mvm" build-example "$example" -o "$layout"
  fi
  "$mvm" load -i "$layout" -t "example/$example"
done
"$mvm" images

# The same image as a container on the host (namespaces, overlay root, cgroup limits) ...
"$mvm" run --isolation container --rm --mem 64M --hostname demo --image example/busybox \
  -- sh -c 'echo "hello from container $(hostname), pid $$, kernel $(uname -r)"'

# ... and in its own microVM with its own guest kernel: nginx, published on a host port.
# mvm's kernel needs VT-x/AMD-V; on a host whose /dev/kvm is PVM-backed (guest kernel mode
# emulated) the PVM test kernel from ../shared/test-kernel is used when it is there.
kernel_flags=()
if "$mvm" info | grep -q '^virtualization: PVM'; then
  if [ -f "$repo/../shared/test-kernel/build.sh" ]; then
    say "PVM host: using the test kernel from ../shared/test-kernel"
    test_kernel=$(bash "$repo/../shared/test-kernel/build.sh")
    kernel_flags=(--kernel "$test_kernel" --kernel-args "$(cat "$repo/../shared/test-kernel/cmdline")")
  else
    say "PVM host without ../shared/test-kernel: mvm's kernel cannot boot here; skipping the microVM part"
    say "done"
    exit 0
  fi
elif [ -n "${SKIP_KERNEL:-}" ]; then
  say "SKIP_KERNEL set: skipping the microVM part"
  say "done"
  exit 0
fi
port=${MVM_QUICKSTART_PORT:-8080}
say "mvm run -d --name quickstart-web --mem 256M -p $port:80 --image example/nginx (boots a VM)"
"$mvm" run -d --name quickstart-web --mem 256M -p "$port:80" "${kernel_flags[@]}" --image example/nginx
"$mvm" ps
say "curl http://127.0.0.1:$port/"
# nginx needs a moment after the container started; until then the forwarder's connection to
# the guest port is refused and curl sees an empty reply.
for _ in $(seq 60); do
  if curl -fs "http://127.0.0.1:$port/" -o "$work/page.html"; then break; fi
  sleep 1
done
curl -fsS "http://127.0.0.1:$port/"
"$mvm" logs quickstart-web | tail -n 3
"$mvm" exec quickstart-web -- /usr/sbin/nginx -v
"$mvm" stop quickstart-web
"$mvm" rm quickstart-web
say "done"
