//! AF_VSOCK stream sockets for the agent inside the guest (std has no vsock type).

use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// CID that addresses the host from a guest.
pub const VMADDR_CID_HOST: u32 = 2;
/// Wildcard CID for listening.
pub const VMADDR_CID_ANY: u32 = u32::MAX;

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
    // AF_VSOCK (40) fits sa_family_t.
    #[allow(clippy::cast_possible_truncation)]
    {
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    }
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// sockaddr_vm is 16 bytes.
#[allow(clippy::cast_possible_truncation)]
const ADDR_LEN: libc::socklen_t = mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Listens on `port` for connections from any CID.
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let addr = sockaddr(VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes and fd is an open socket.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                ADDR_LEN,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen on an open, bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockListener { fd })
    }

    /// Waits for the next connection; returns it with its peer's address (what getpeername(2)
    /// would say, from accept(2) itself: one system call less in a guest where each is costly).
    pub fn accept(&self) -> io::Result<(VsockStream, Option<VsockAddr>)> {
        loop {
            let mut addr = sockaddr(0, 0);
            let mut len = ADDR_LEN;
            // SAFETY: accept4 writes at most `len` bytes into `addr`, a sockaddr_vm of that size
            // that outlives the call, and stores the address length in `len`.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    (&raw mut addr).cast::<libc::sockaddr>(),
                    &raw mut len,
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                return Ok((VsockStream { fd }, VsockAddr::from_sockaddr(&addr, len)));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// A vsock address: context id and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockAddr {
    /// Context id (2 is the host, 1 the guest's own loopback, 3 and up guests).
    pub cid: u32,
    /// Port.
    pub port: u32,
}

impl VsockAddr {
    /// The address in `addr` as the kernel filled `len` bytes of it; `None` unless it is a
    /// whole `AF_VSOCK` address.
    pub fn from_sockaddr(addr: &libc::sockaddr_vm, len: libc::socklen_t) -> Option<Self> {
        let family_ok = i32::from(addr.svm_family) == libc::AF_VSOCK;
        (family_ok && len >= ADDR_LEN).then_some(VsockAddr {
            cid: addr.svm_cid,
            port: addr.svm_port,
        })
    }

    /// Whether this is the host (CID 2). The agent and its port relays answer nobody else: not
    /// a process in the guest reaching them through vsock loopback (CID 1, or the guest's own
    /// CID), which is what a container inside the VM would do.
    pub fn is_host(&self) -> bool {
        self.cid == VMADDR_CID_HOST
    }
}

/// Whether a peer reported by accept(2) may talk to the agent: only a known host address.
pub fn peer_allowed(peer: Option<VsockAddr>) -> bool {
    peer.is_some_and(|p| p.is_host())
}

/// A connected vsock stream.
#[derive(Debug)]
pub struct VsockStream {
    fd: OwnedFd,
}

impl VsockStream {
    /// Connects to `port` on `cid`.
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let addr = sockaddr(cid, port);
        // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes and fd is an open socket.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                ADDR_LEN,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockStream { fd })
    }

    /// A second handle on the same connection (for a reader and a writer thread).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(VsockStream {
            fd: self.fd.try_clone()?,
        })
    }

    /// Shuts down the write half, so the peer reads end-of-stream.
    pub fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown on an open socket descriptor.
        if unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most buf.len() bytes into the valid, writable buffer.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: writes at most buf.len() bytes from the valid buffer; MSG_NOSIGNAL turns a
        // closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for VsockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsRawFd for VsockListener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_cid_is_a_peer_the_agent_answers() {
        let peer = |cid, port| VsockAddr::from_sockaddr(&sockaddr(cid, port), ADDR_LEN);
        assert!(peer_allowed(peer(VMADDR_CID_HOST, 1_073_741_824)));
        // Loopback, the guest's own CID (mvm gives 3), another guest, the wildcard.
        for cid in [1, 3, 42, VMADDR_CID_ANY, 0] {
            assert!(!peer_allowed(peer(cid, 5000)), "cid {cid}");
        }
        // Not a vsock address, or one cut short: refused.
        let mut other = sockaddr(VMADDR_CID_HOST, 1);
        other.svm_family = 1;
        assert!(!peer_allowed(VsockAddr::from_sockaddr(&other, ADDR_LEN)));
        let short = VsockAddr::from_sockaddr(&sockaddr(VMADDR_CID_HOST, 1), 4);
        assert!(!peer_allowed(short));
        assert!(!peer_allowed(None));
    }
}
