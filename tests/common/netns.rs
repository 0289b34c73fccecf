//! The host end of a tap device in a network namespace of its own: creating and deleting the
//! namespace, and a raw AF_PACKET socket on an interface inside it, for tests that put mvm's tap
//! there (`ip netns exec NS mvm ... --network tap:NAME`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A network namespace for one test, deleted on drop.
#[derive(Debug)]
pub struct NetNs(pub String);

impl NetNs {
    /// Creates `mvmtest<pid>n<k>`; `None` (after saying why) where that is not possible.
    pub fn create() -> Option<NetNs> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("mvmtest{}n{k}", std::process::id());
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(out) if out.status.success() => Some(NetNs(name)),
            Ok(out) => {
                eprintln!(
                    "skipping: cannot create a network namespace: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipping: cannot run ip (iproute2): {e}");
                None
            }
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// The size of `T` for a socket call.
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// Puts the calling thread into network namespace `ns` (from `ip netns add`).
pub fn enter_netns(ns: &str) -> io::Result<()> {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
    // SAFETY: setns on an open namespace file only changes this thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until interface `name` exists; returns its index.
pub fn wait_for_interface(name: &str, timeout: Duration) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let start = Instant::now();
    while start.elapsed() < timeout {
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if index != 0 {
            return Some(index);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// A raw socket for frames of `ethertype` on interface `index`.
#[derive(Debug)]
pub struct Socket(OwnedFd);

impl Socket {
    /// Opens and binds the socket (receive timeout 200 ms).
    pub fn open(index: u32, ethertype: u16) -> io::Result<Socket> {
        let proto = i32::from(ethertype.to_be());
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let sock = Socket(unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).map_err(io::Error::other)?;
        addr.sll_protocol = ethertype.to_be();
        addr.sll_ifindex = i32::try_from(index).map_err(io::Error::other)?;
        let len = socklen::<libc::sockaddr_ll>();
        // SAFETY: `addr` is a valid sockaddr_ll of `len` bytes that outlives the call.
        let r = unsafe {
            libc::bind(
                sock.0.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval, passed with its size; it is only read.
        let r = unsafe {
            libc::setsockopt(
                sock.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast::<libc::c_void>(),
                socklen::<libc::timeval>(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// One frame, or `None` after the 200 ms receive timeout.
    pub fn recv(&self) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: `buf` is writable for its whole length during the call.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        buf.truncate(n.unsigned_abs());
        Ok(Some(buf))
    }

    /// Sends one complete Ethernet frame out of the interface (into the tap, to the guest).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is readable for its whole length during the call.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                frame.as_ptr().cast::<libc::c_void>(),
                frame.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The hardware address of interface `name` in the current namespace.
pub fn mac_of(name: &str) -> io::Result<[u8; 6]> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct ifreq: 16-byte name, then a struct sockaddr whose sa_data holds the address.
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a 40-byte struct ifreq, writable; SIOCGIFHWADDR fills its union.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, req.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&req[18..24]);
    Ok(mac)
}
