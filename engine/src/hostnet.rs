//! The guest's IPv4 settings, worked out on the host and handed to the guest agent as
//! `mvm.net=eth0,<ip>/<prefix>[,<gateway>]` (the agent has no DHCP client).
//!
//! - `--network user`: passt gives the guest a copy of the host's own address on the interface of
//!   the default route, with the host's gateway (passt maps that gateway to the host itself).
//! - `--network tap:NAME,HOST_IP/PREFIX`: the guest takes the next address in the subnet and
//!   routes through the host's side.

use std::net::Ipv4Addr;

use guest_agent::guest::NetConfig;

use vmm::virtio_devices::NetworkMode;

/// The interface and gateway of the host's IPv4 default route, from a `/proc/net/route` table.
pub fn default_route(table: &str) -> Option<(String, Ipv4Addr)> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (iface, dst, gw, mask) = (f.first()?, f.get(1)?, f.get(2)?, f.get(7)?);
        if *dst != "00000000" || *mask != "00000000" {
            return None;
        }
        // The kernel prints the address in host byte order (little-endian here).
        let gw = u32::from_str_radix(gw, 16).ok()?;
        Some((iface.to_string(), Ipv4Addr::from(gw.to_le_bytes())))
    })
}

/// The first IPv4 address and prefix length of interface `name` on this host.
pub fn interface_ipv4(name: &str) -> Option<(Ipv4Addr, u8)> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() && found.is_none() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: ifa_addr points to a sockaddr of at least the generic size.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if ifname.to_bytes() != name.as_bytes() || family != libc::AF_INET {
            continue;
        }
        // SAFETY: AF_INET addresses and masks are sockaddr_in.
        let (addr, mask) = unsafe {
            (
                (*ifa.ifa_addr.cast::<libc::sockaddr_in>()).sin_addr.s_addr,
                (*ifa.ifa_netmask.cast::<libc::sockaddr_in>())
                    .sin_addr
                    .s_addr,
            )
        };
        let prefix = u8::try_from(u32::from_be(mask).leading_ones()).unwrap_or(32);
        found = Some((Ipv4Addr::from(u32::from_be(addr)), prefix));
    }
    // SAFETY: frees the list getifaddrs returned, once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// The next address after `host` in its subnet, if there is one that is not the broadcast.
fn peer_address(host: Ipv4Addr, prefix: u8) -> Option<Ipv4Addr> {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let next = u32::from(host).checked_add(1)?;
    let broadcast = (u32::from(host) & mask) | !mask;
    (prefix <= 30 && next & mask == u32::from(host) & mask && next != broadcast)
        .then(|| Ipv4Addr::from(next))
}

/// The `mvm.net=` settings of the guest's `eth0` in `mode`, if mvm knows them.
pub fn guest_net_param(mode: &NetworkMode) -> Option<NetConfig> {
    match mode {
        NetworkMode::None => None,
        NetworkMode::User => {
            let table = std::fs::read_to_string("/proc/net/route").ok()?;
            let (iface, gw) = default_route(&table)?;
            let (addr, prefix) = interface_ipv4(&iface)?;
            Some(NetConfig {
                dev: "eth0".into(),
                addr,
                prefix,
                gateway: Some(gw),
            })
        }
        NetworkMode::Tap { host_ip, .. } => {
            let (host, prefix) = (*host_ip)?;
            let guest = peer_address(host, prefix)?;
            Some(NetConfig {
                dev: "eth0".into(),
                addr: guest,
                prefix,
                gateway: Some(host),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0
";

    #[test]
    fn the_default_route_is_found_in_the_kernels_table() {
        assert_eq!(
            default_route(ROUTES),
            Some(("eth0".to_string(), Ipv4Addr::new(10, 0, 2, 1)))
        );
        assert_eq!(default_route("Iface\tDestination\n"), None);
    }

    #[test]
    fn a_tap_guest_takes_the_next_address_of_the_hosts_subnet() {
        let tap = |ip: [u8; 4], prefix| NetworkMode::Tap {
            name: None,
            host_ip: Some((Ipv4Addr::from(ip), prefix)),
        };
        assert_eq!(
            guest_net_param(&tap([172, 30, 0, 1], 24))
                .map(|n| n.to_string())
                .as_deref(),
            Some("eth0,172.30.0.2/24,172.30.0.1")
        );
        // The next address would be the broadcast address, or there is no room.
        assert_eq!(guest_net_param(&tap([172, 30, 0, 2], 30)), None);
        assert_eq!(guest_net_param(&tap([172, 30, 0, 1], 32)), None);
        assert_eq!(guest_net_param(&NetworkMode::None), None);
    }

    #[test]
    fn loopback_has_an_ipv4_address_with_its_prefix() {
        assert_eq!(interface_ipv4("lo"), Some((Ipv4Addr::LOCALHOST, 8)));
    }
}
