#!/bin/sh
# Runs CMD in the emulated AMD-V host's L1 (scripts/vt-host.sh) with a stand-in for an uplink:
# L1 has no network, so a tap gets an address and the default route, and passt finds a host
# address and a gateway to offer a guest (whose connections to the gateway reach L1's loopback).
#
#   scripts/vt-uplink.sh CMD [ARG...]      (inside L1, as root)
set -e
ip tuntap add dev uplink0 mode tap
ip addr add 10.0.2.15/24 dev uplink0
ip link set uplink0 up
ip route add default via 10.0.2.2 dev uplink0 onlink
exec "$@"
