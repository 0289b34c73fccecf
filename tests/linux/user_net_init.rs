//! `/init` for the user-mode network test (tests/linux_devices.rs): configures eth0 the way
//! passt's DHCP would (address, prefix, default route; the test passes them on the kernel command
//! line, whose `key=value` words become init's environment), connects to the default gateway,
//! which passt maps to the host's loopback, and exchanges data with the test's server. Prints
//! `MVM-NET` lines, then reboots. Built static by the test with plain rustc (no crates).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

const RB_AUTOBOOT: i32 = 0x0123_4567;
const SIOCSIFADDR: u64 = 0x8916;
const SIOCSIFNETMASK: u64 = 0x891c;
const SIOCSIFFLAGS: u64 = 0x8914;
const SIOCADDRT: u64 = 0x890b;
/// Bytes the guest sends after its hello line; the host answers with as many.
const BULK: usize = 200_000;

/// `struct ifreq` with the address/flags union as raw bytes.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

/// `struct rtentry` (x86_64 layout).
#[repr(C)]
struct RtEntry {
    pad1: u64,
    dst: [u8; 16],
    gateway: [u8; 16],
    genmask: [u8; 16],
    flags: u16,
    pad2: i16,
    pad3: u64,
    pad4: *mut u8,
    metric: i16,
    dev: *mut u8,
    mtu: u64,
    window: u64,
    irtt: u16,
}

extern "C" {
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn ioctl(fd: i32, req: u64, arg: *mut u8) -> i32;
    fn close(fd: i32) -> i32;
    fn reboot(cmd: i32) -> i32;
}

fn say(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "MVM-NET {line}");
    let _ = out.flush();
}

fn sockaddr(ip: Ipv4Addr) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..2].copy_from_slice(&2u16.to_ne_bytes()); // AF_INET
    a[4..8].copy_from_slice(&ip.octets());
    a
}

fn ifreq(data: &[u8]) -> IfReq {
    let mut r = IfReq {
        name: [0; 16],
        data: [0; 24],
    };
    r.name[..4].copy_from_slice(b"eth0");
    r.data[..data.len()].copy_from_slice(data);
    r
}

/// Gives eth0 `ip`/`prefix`, brings it up and routes everything through `gw`.
fn configure(ip: Ipv4Addr, prefix: u32, gw: Ipv4Addr) -> Result<(), String> {
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix.min(32)).unwrap_or(0));
    let mut route = RtEntry {
        pad1: 0,
        dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        gateway: sockaddr(gw),
        genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        flags: 0x1 | 0x2, // RTF_UP | RTF_GATEWAY
        pad2: 0,
        pad3: 0,
        pad4: std::ptr::null_mut(),
        metric: 0,
        dev: std::ptr::null_mut(),
        mtu: 0,
        window: 0,
        irtt: 0,
    };
    let (mut addr, mut netmask) = (ifreq(&sockaddr(ip)), ifreq(&sockaddr(mask)));
    let mut up = ifreq(&1i16.to_ne_bytes()); // IFF_UP
    let steps: [(&str, u64, *mut u8); 4] = [
        ("address", SIOCSIFADDR, (&raw mut addr).cast()),
        ("netmask", SIOCSIFNETMASK, (&raw mut netmask).cast()),
        ("up", SIOCSIFFLAGS, (&raw mut up).cast()),
        ("route", SIOCADDRT, (&raw mut route).cast()),
    ];
    // SAFETY: a datagram socket for the ioctls below.
    let fd = unsafe { socket(2, 2, 0) };
    for (what, req, arg) in steps {
        // SAFETY: each pointer is to a live ifreq/rtentry of the layout the request expects.
        if unsafe { ioctl(fd, req, arg) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: closing the socket opened above.
            unsafe { close(fd) };
            return Err(format!("{what}: {e}"));
        }
    }
    // SAFETY: closing the socket opened above.
    unsafe { close(fd) };
    Ok(())
}

fn pattern(i: usize) -> u8 {
    u8::try_from(i * 7 % 251).unwrap_or(0)
}

/// Sends the hello line and the bulk bytes, then reads the host's line and its bulk bytes.
fn exchange(gw: Ipv4Addr, port: u16, nonce: &str) -> std::io::Result<(String, bool)> {
    let addr = SocketAddr::from((gw, port));
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(20))?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    conn.write_all(format!("hello from the guest {nonce}\n").as_bytes())?;
    let bulk: Vec<u8> = (0..BULK).map(pattern).collect();
    conn.write_all(&bulk)?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut back = vec![0u8; BULK];
    reader.read_exact(&mut back)?;
    let intact = back.iter().enumerate().all(|(i, b)| *b == pattern(i + 1));
    Ok((line.trim().to_string(), intact))
}

fn main() {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let ip: Option<Ipv4Addr> = env("user_ip").parse().ok();
    let gw: Option<Ipv4Addr> = env("user_gw").parse().ok();
    let prefix: u32 = env("user_prefix").parse().unwrap_or(24);
    let port: u16 = env("user_port").parse().unwrap_or(0);
    match (ip, gw) {
        (Some(ip), Some(gw)) => match configure(ip, prefix, gw) {
            Ok(()) => {
                say(&format!("eth0 {ip}/{prefix} via {gw}"));
                match exchange(gw, port, &env("user_nonce")) {
                    Ok((line, intact)) => {
                        say(&format!("host-replied={line}"));
                        say(&format!("bulk-intact={intact}"));
                    }
                    Err(e) => say(&format!("error={e}")),
                }
            }
            Err(e) => say(&format!("setup-failed={e}")),
        },
        _ => say("setup-failed=no user_ip/user_gw on the command line"),
    }
    // SAFETY: takes no pointers; as PID 1 reboot ends the VM.
    unsafe { reboot(RB_AUTOBOOT) };
}
