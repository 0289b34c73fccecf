//! The host side of the muxer: the per-VM Unix socket, and host programs that connect to it
//! and ask for a guest port with `CONNECT <port>\n`.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_sys_util::epoll::EventSet;

use super::{epoll_ctl, ConnState, Connection, Muxer, FIRST_LOCAL_PORT};
use crate::virtio::vsock::packet::op;
use crate::virtio::vsock::VsockError;

/// Longest `CONNECT <port>\n` line accepted from a host program.
const MAX_LINE: usize = 32;
/// A host program that connected but has not finished its `CONNECT <port>` line.
#[derive(Debug)]
pub(super) struct PendingHost {
    pub(super) stream: UnixStream,
    pub(super) line: Vec<u8>,
}

/// Binds `path`, replacing a stale socket file nobody listens on.
pub(super) fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    let shown = || path.display().to_string();
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(VsockError::InUse(shown()));
            }
            std::fs::remove_file(path).map_err(|e| VsockError::Bind(shown(), e))?;
            UnixListener::bind(path).map_err(|e| VsockError::Bind(shown(), e))
        }
        Err(e) => Err(VsockError::Bind(shown(), e)),
    }
}

/// The Unix socket path a guest connection to host port `port` goes to.
pub fn listener_path(socket: &Path, port: u32) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// What a host program does to reach guest port `port` through the VM's vsock socket at
/// `path`: connect, send `CONNECT <port>`, wait for `OK <hostport>`. Returns the stream, ready
/// for raw data. Fails if the guest refuses (nobody listens on the port) or does not answer
/// within `timeout`.
pub fn host_connect(path: &Path, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
    let fail = |e| VsockError::HostConnect(port, path.display().to_string(), e);
    let mut stream = UnixStream::connect(path).map_err(fail)?;
    stream.set_read_timeout(Some(timeout)).map_err(fail)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(fail)?;
    // Read the answer byte by byte so no guest data is consumed with it.
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match stream.read(&mut b) {
            Ok(0) => {
                let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "guest refused");
                return Err(fail(refused));
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_LINE => {
                return Err(fail(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad answer",
                )));
            }
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(e)),
        }
    }
    if !line.starts_with(b"OK ") {
        let msg = String::from_utf8_lossy(&line).into_owned();
        return Err(fail(io::Error::new(io::ErrorKind::InvalidData, msg)));
    }
    stream.set_read_timeout(None).map_err(fail)?;
    Ok(stream)
}

/// Connects to the Unix socket at `path` without blocking: a listener whose backlog is full
/// refuses (`WouldBlock`) instead of stalling the event loop.
pub(super) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap_or(110);
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call and `len` is its size.
    let ret = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

impl Muxer {
    pub(super) fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.pending.len() >= self.max_connections {
                        self.metrics.limit_refused.inc();
                        crate::warn_limited!(
                            "vsock: connection limit reached, closing a host connection"
                        );
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    let ok = stream.set_nonblocking(true).is_ok()
                        && epoll_ctl(&self.epoll, fd, 0, EventSet::IN.bits()).is_ok();
                    if ok {
                        self.pending.insert(
                            fd,
                            PendingHost {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        crate::warn_limited!("vsock: accept failed: {e}");
                    }
                    return;
                }
            }
        }
    }

    fn drop_pending(&mut self, fd: RawFd, why: Option<&str>) {
        let _ = epoll_ctl(&self.epoll, fd, EventSet::IN.bits(), 0);
        if let Some(mut p) = self.pending.remove(&fd) {
            if let Some(why) = why {
                let _ = p.stream.write_all(format!("ERR {why}\n").as_bytes());
            }
        }
    }

    /// Reads the `CONNECT <port>` line one byte at a time, so no payload is consumed.
    pub(super) fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let line = loop {
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(0) => return self.drop_pending(fd, None),
                Ok(_) if b[0] == b'\n' => break std::mem::take(&mut p.line),
                Ok(_) if p.line.len() >= MAX_LINE => {
                    return self.drop_pending(fd, Some("expected CONNECT <port>"));
                }
                Ok(_) => p.line.push(b[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.drop_pending(fd, None),
            }
        };
        let port = std::str::from_utf8(&line)
            .ok()
            .map(|l| l.trim_end_matches('\r'))
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port else {
            return self.drop_pending(fd, Some("expected CONNECT <port>"));
        };
        let _ = epoll_ctl(&self.epoll, fd, EventSet::IN.bits(), 0);
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        let local = self.alloc_port();
        let key = (local, port);
        let mut conn = Connection::new(
            p.stream,
            ConnState::HostConnecting,
            local,
            port,
            self.guest_cid,
        );
        let req = conn.header(op::REQUEST, 0, 0);
        self.metrics.host_connects.inc();
        self.insert(key, conn);
        self.push_ctrl(req);
    }

    fn alloc_port(&mut self) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.0 == port) {
                return port;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::tests::*;
    use super::*;

    #[test]
    fn guest_refusing_host_connect_closes_host_stream() {
        let mut r = rig();
        let mut host = UnixStream::connect(&r.path).expect("connect");
        host.write_all(b"CONNECT 99\n").expect("write");
        let (req, _) = next_pkt(&mut r.m);
        r.m.send_pkt(&guest_hdr(op::RST, 99, req.src_port, 0), &[]);
        let mut buf = [0u8; 8];
        assert_eq!(host.read(&mut buf).expect("eof"), 0);
    }

    #[test]
    fn bad_connect_line_gets_one_error_line() {
        let mut r = rig();
        let mut host = UnixStream::connect(&r.path).expect("connect");
        host.write_all(b"HELLO\n").expect("write");
        for _ in 0..50 {
            r.m.process_host_events();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(read_line(&host), "ERR expected CONNECT <port>\n");
        no_pkt(&mut r.m);
    }

    #[test]
    fn host_hanging_up_before_guest_answers_resets_guest() {
        let mut r = rig();
        let mut host = UnixStream::connect(&r.path).expect("connect");
        host.write_all(b"CONNECT 7\n").expect("write");
        let (req, _) = next_pkt(&mut r.m);
        drop(host);
        let (rst, _) = next_pkt(&mut r.m);
        assert_eq!(
            (rst.op, rst.src_port, rst.dst_port),
            (op::RST, req.src_port, 7)
        );
    }

    #[test]
    fn socket_in_use_is_refused_and_stale_socket_replaced() {
        let r = rig();
        let err = Muxer::new(&r.path, CID, Arc::default()).expect_err("in use");
        assert!(matches!(err, VsockError::InUse(_)), "{err}");
        let path = r.path.clone();
        let dir = r._dir;
        drop(r.m);
        assert!(!path.exists(), "drop removes the socket");
        // A stale socket file (nobody listening) is replaced.
        drop(UnixListener::bind(&path).expect("stale"));
        assert!(path.exists());
        let m = Muxer::new(&path, CID, Arc::default()).expect("replaces stale socket");
        drop(m);
        drop(dir);
        assert!(matches!(
            Muxer::new(&path, 2, Arc::default()),
            Err(VsockError::Cid(2))
        ));
    }

    #[test]
    fn connect_to_a_full_backlog_does_not_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.sock");
        let _listener = UnixListener::bind(&path).expect("listen");
        let mut held = Vec::new();
        let refused = loop {
            match connect_nonblocking(&path) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 100_000, "backlog never filled");
        };
        assert_eq!(refused.kind(), io::ErrorKind::WouldBlock);
        assert!(connect_nonblocking(&dir.path().join("none")).is_err());
    }
}
