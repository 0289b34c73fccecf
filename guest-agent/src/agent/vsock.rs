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

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: accept4 with null address pointers only returns the new descriptor.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                return Ok(VsockStream { fd });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
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
