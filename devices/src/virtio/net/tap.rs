//! Tap backend: a non-persistent Linux tap interface created through /dev/net/tun.
//!
//! The tap carries a 12-byte virtio-net header in front of every frame (`IFF_VNET_HDR` with
//! `TUNSETVNETHDRSZ` 12), so checksum and segmentation offloads pass through unchanged. It is
//! never made persistent: the kernel deletes the interface when the last file descriptor closes,
//! which is on drop or when the process exits in any way (the descriptor is close-on-exec).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};

use super::{features, NetBackend, NetError};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;
/// Name pattern when none is given; the kernel replaces `%d` with the first free number.
const DEFAULT_NAME: &str = "mvm-tap%d";

/// How to create a tap interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapConfig {
    /// Interface name; `None` picks the first free `mvm-tapN`.
    pub name: Option<String>,
    /// IPv4 address given to the host side of the tap, if any.
    pub host_ip: Option<Ipv4Addr>,
    /// Prefix length of `host_ip` (e.g. 24).
    pub prefix_len: u8,
}

/// `struct ifreq`: interface name followed by a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut req = Self {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    /// Stores a `struct sockaddr_in` for `ip` in the union.
    fn set_ipv4(&mut self, ip: Ipv4Addr) {
        self.data = [0; 24];
        let family = u16::try_from(libc::AF_INET).unwrap_or(2);
        self.data[..2].copy_from_slice(&family.to_ne_bytes());
        self.data[4..8].copy_from_slice(&ip.octets());
    }
}

/// Issues `request` with a pointer to `req` on `fd`.
fn ioctl_ifreq(fd: RawFd, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: `req` is a valid, writable `struct ifreq` that outlives the call; the kernel reads
    // and writes at most `size_of::<IfReq>()` bytes for the interface requests used here.
    let ret = unsafe { libc::ioctl(fd, request, req as *mut IfReq) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Issues `request` with an integer argument passed by pointer.
fn ioctl_int_ptr(fd: RawFd, request: libc::c_ulong, value: &libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a valid int that outlives the call; the kernel only reads it.
    let ret = unsafe { libc::ioctl(fd, request, value as *const libc::c_int) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Issues `request` with an integer argument passed by value.
fn ioctl_int_val(fd: RawFd, request: libc::c_ulong, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the request takes its argument by value; no memory is shared with the kernel.
    let ret = unsafe { libc::ioctl(fd, request, value) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A datagram socket for interface ioctls (`SIOCSIFFLAGS`, `SIOCSIFADDR`, ...).
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// A tap interface owned by this process.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the tap, sets its vnet header size, gives it `host_ip` and brings it up.
    pub fn new(config: &TapConfig) -> Result<Self, NetError> {
        let requested = config.name.as_deref().unwrap_or(DEFAULT_NAME);
        if config.name.is_some() && !valid_name(requested) {
            return Err(NetError::TapName(requested.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(NetError::OpenTun)?;
        let mut req = IfReq::new(requested);
        req.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        ioctl_ifreq(file.as_raw_fd(), TUNSETIFF, &mut req)
            .map_err(|e| NetError::TapIoctl("TUNSETIFF", requested.to_string(), e))?;
        let tap = Self {
            file,
            name: req.name(),
        };
        let err = |what| {
            let name = tap.name.clone();
            move |e| NetError::TapIoctl(what, name, e)
        };
        let hdr_len = libc::c_int::try_from(super::VNET_HDR_LEN).unwrap_or(12);
        ioctl_int_ptr(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len)
            .map_err(err("TUNSETVNETHDRSZ"))?;
        ioctl_int_val(tap.file.as_raw_fd(), TUNSETOFFLOAD, 0).map_err(err("TUNSETOFFLOAD"))?;
        let sock = inet_socket().map_err(err("socket"))?;
        if let Some(ip) = config.host_ip {
            let mut req = IfReq::new(&tap.name);
            req.set_ipv4(ip);
            ioctl_ifreq(sock.as_raw_fd(), libc::SIOCSIFADDR, &mut req)
                .map_err(err("SIOCSIFADDR"))?;
            let prefix = u32::from(config.prefix_len.min(32));
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            req.set_ipv4(Ipv4Addr::from(mask));
            ioctl_ifreq(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &mut req)
                .map_err(err("SIOCSIFNETMASK"))?;
        }
        let mut req = IfReq::new(&tap.name);
        ioctl_ifreq(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req).map_err(err("SIOCGIFFLAGS"))?;
        let flags = i16::from_ne_bytes([req.data[0], req.data[1]]);
        let up = i16::try_from(libc::IFF_UP).unwrap_or(1);
        req.data[..2].copy_from_slice(&(flags | up).to_ne_bytes());
        ioctl_ifreq(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req).map_err(err("SIOCSIFFLAGS"))?;
        log::info!("tap {} up", tap.name);
        Ok(tap)
    }

    /// The interface name the kernel gave the tap (e.g. `mvm-tap0`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn send(&mut self, vnet_hdr: &[u8], frame: &[u8]) -> io::Result<()> {
        let iov = [
            libc::iovec {
                iov_base: vnet_hdr.as_ptr() as *mut libc::c_void,
                iov_len: vnet_hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point into live slices of the given lengths, which the kernel
        // only reads; the descriptor is owned by `self.file`.
        let ret = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn offload_features(&self) -> u64 {
        [
            features::CSUM,
            features::GUEST_CSUM,
            features::GUEST_TSO4,
            features::GUEST_TSO6,
            features::HOST_TSO4,
            features::HOST_TSO6,
        ]
        .iter()
        .fold(0, |acc, bit| acc | (1u64 << bit))
    }

    fn set_offloads(&mut self, acked: u64) -> io::Result<()> {
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        let mut flags = 0;
        if has(features::GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            if has(features::GUEST_TSO4) {
                flags |= TUN_F_TSO4;
            }
            if has(features::GUEST_TSO6) {
                flags |= TUN_F_TSO6;
            }
        }
        ioctl_int_val(
            self.file.as_raw_fd(),
            TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use super::*;

    /// Runs `f` on a thread inside a fresh network namespace, so taps never reach the host's.
    /// Returns `None` (and says why) when namespaces or /dev/net/tun are unavailable.
    pub(crate) fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "skipping: unshare(CLONE_NEWNET): {}",
                    io::Error::last_os_error()
                );
                return None;
            }
            if !std::path::Path::new("/dev/net/tun").exists() {
                eprintln!("skipping: no /dev/net/tun");
                return None;
            }
            Some(f())
        })
        .join()
        .expect("netns thread")
    }

    pub(crate) fn if_exists(name: &str) -> bool {
        let sock = inet_socket().expect("socket");
        let mut req = IfReq::new(name);
        ioctl_ifreq(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req).is_ok()
    }

    #[test]
    fn tap_gets_default_name_and_vanishes_on_drop() {
        in_netns(|| {
            let tap = Tap::new(&TapConfig::default()).expect("tap");
            assert!(tap.name().starts_with("mvm-tap"), "{}", tap.name());
            let name = tap.name().to_string();
            assert!(if_exists(&name));
            drop(tap);
            assert!(!if_exists(&name), "tap {name} survived drop");
        });
    }

    #[test]
    fn tap_takes_given_name_and_is_up() {
        in_netns(|| {
            let cfg = TapConfig {
                name: Some("mvmtest0".into()),
                host_ip: Some(Ipv4Addr::new(10, 9, 0, 1)),
                prefix_len: 24,
            };
            let tap = Tap::new(&cfg).expect("tap");
            assert_eq!(tap.name(), "mvmtest0");
            let sock = inet_socket().expect("socket");
            let mut req = IfReq::new("mvmtest0");
            ioctl_ifreq(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req).expect("flags");
            let flags = i16::from_ne_bytes([req.data[0], req.data[1]]);
            assert_ne!(i32::from(flags) & libc::IFF_UP, 0);
            // The address is usable: a UDP socket can bind it.
            std::net::UdpSocket::bind("10.9.0.1:0").expect("bind host ip");
        });
    }

    #[test]
    fn tap_rejects_bad_names_with_one_error() {
        for bad in ["", "a/b", "has space", "sixteen_chars_xx"] {
            let cfg = TapConfig {
                name: Some(bad.into()),
                ..TapConfig::default()
            };
            let err = Tap::new(&cfg).expect_err(bad);
            assert!(matches!(err, NetError::TapName(_)), "{bad}: {err}");
        }
    }

    /// Helper run as a child process by `tap_vanishes_when_its_process_is_killed`.
    #[test]
    #[ignore = "run by tap_vanishes_when_its_process_is_killed"]
    fn hold_tap_until_killed() {
        if std::env::var_os("MVM_HOLD_TAP").is_none() {
            eprintln!("skipping: only runs as a child of another test");
            return;
        }
        let tap = Tap::new(&TapConfig::default()).expect("tap");
        println!("TAP {}", tap.name());
        std::thread::sleep(std::time::Duration::from_secs(30));
    }

    #[test]
    fn tap_vanishes_when_its_process_is_killed() {
        use std::io::BufRead;
        in_netns(|| {
            let exe = std::env::current_exe().expect("test binary");
            let mut child = std::process::Command::new(exe)
                .args(["--exact", "virtio::net::tap::tests::hold_tap_until_killed"])
                .args(["--ignored", "--nocapture", "--test-threads=1"])
                .env("MVM_HOLD_TAP", "1")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn child");
            let out = child.stdout.take().expect("stdout");
            let name = std::io::BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .find_map(|l| l.split("TAP ").nth(1).map(str::to_string))
                .expect("child reports its tap");
            assert!(if_exists(&name));
            child.kill().expect("kill");
            child.wait().expect("reap");
            assert!(!if_exists(&name), "tap {name} outlived its process");
        });
    }
}
