//! Published ports (`-p HOST:GUEST`): a host TCP listener whose connections are forwarded to a
//! guest port over the VM's vsock Unix socket, so publishing needs no root and no host network
//! changes. For each accepted connection the forwarder connects to the vsock socket, sends
//! `CONNECT <guest port>\n`, waits for `OK <n>\n` and then copies bytes both ways until either side
//! closes. Bounded: at most [`MAX_FORWARDED`] connections per published port at once (more are
//! closed as they arrive), each with two small threads and fixed-size copy buffers.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Most connections one published port forwards at once; more are closed as they arrive.
pub const MAX_FORWARDED: usize = 256;
/// Stack of each copying thread (they hold an 8 KiB buffer and little else).
const COPY_THREAD_STACK: usize = 128 << 10;

/// Errors of port publishing.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// `-p` value that does not parse.
    #[error("invalid port mapping '{0}': expected [IP:]HOSTPORT:GUESTPORT[/tcp]")]
    Parse(String),
    /// Only TCP is forwarded.
    #[error("port mapping '{0}': only tcp ports can be published")]
    Protocol(String),
    /// The host port could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Address that was asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// One `-p` mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// Host address to listen on (127.0.0.1 unless given).
    pub host: SocketAddr,
    /// Port inside the guest.
    pub guest_port: u16,
}

impl std::fmt::Display for PortMapping {
    /// `IP:HOSTPORT:GUESTPORT`, which parses back to the same mapping.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.guest_port)
    }
}

impl FromStr for PortMapping {
    type Err = PortError;

    fn from_str(s: &str) -> Result<Self, PortError> {
        let bad = || PortError::Parse(s.to_string());
        let (spec, proto) = s.split_once('/').unwrap_or((s, "tcp"));
        if proto != "tcp" {
            return Err(PortError::Protocol(s.to_string()));
        }
        let (host_part, guest) = spec.rsplit_once(':').ok_or_else(bad)?;
        let guest_port: u16 = guest.parse().map_err(|_| bad())?;
        let (ip, host_port) = match host_part.rsplit_once(':') {
            Some((ip, port)) => (ip.parse().map_err(|_| bad())?, port),
            None => ([127, 0, 0, 1].into(), host_part),
        };
        let host_port: u16 = host_port.parse().map_err(|_| bad())?;
        if guest_port == 0 {
            return Err(bad());
        }
        Ok(PortMapping {
            host: SocketAddr::new(ip, host_port),
            guest_port,
        })
    }
}

/// A running forwarder; dropping it stops accepting new connections.
#[derive(Debug)]
pub struct PortForwarder {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    accept_thread: Option<thread::JoinHandle<()>>,
}

impl PortForwarder {
    /// Binds the host side of `mapping` and forwards connections to `vsock_socket`.
    pub fn start(mapping: PortMapping, vsock_socket: &Path) -> Result<Self, PortError> {
        Self::start_limited(mapping, vsock_socket, MAX_FORWARDED)
    }

    /// Like [`PortForwarder::start`], forwarding at most `max` connections at once.
    fn start_limited(
        mapping: PortMapping,
        vsock_socket: &Path,
        max: usize,
    ) -> Result<Self, PortError> {
        let listener = TcpListener::bind(mapping.host).map_err(|source| PortError::Bind {
            addr: mapping.host,
            source,
        })?;
        let local = listener.local_addr().map_err(|source| PortError::Bind {
            addr: mapping.host,
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let socket = vsock_socket.to_path_buf();
        let stop_flag = stop.clone();
        let accept_thread = thread::Builder::new()
            .name(format!("portfwd-{}", local.port()))
            .spawn(move || {
                // This thread and the relays it starts: confined where the VMM filters threads.
                if let Err(e) = vmm::seccomp::confine(vmm::seccomp::ThreadKind::Relay) {
                    log::error!("port {}: {e}", mapping.guest_port);
                    return;
                }
                accept_loop(listener, socket, mapping.guest_port, stop_flag, max)
            })
            .map_err(|source| PortError::Bind {
                addr: mapping.host,
                source,
            })?;
        Ok(PortForwarder {
            local,
            stop,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address actually bound (useful when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_millis(200));
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    socket: PathBuf,
    guest_port: u16,
    stop: Arc<AtomicBool>,
    max: usize,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(tcp) = conn else { continue };
        if active.load(Ordering::SeqCst) >= max {
            log::debug!("port {guest_port}: {max} connections forwarded already, closing one");
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (socket, done) = (socket.clone(), Arc::clone(&active));
        let spawned = thread::Builder::new()
            .name("portfwd-conn".into())
            .stack_size(COPY_THREAD_STACK)
            .spawn(move || {
                if let Err(e) = forward(tcp, &socket, guest_port) {
                    log::debug!("port {guest_port}: connection ended: {e}");
                }
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Opens a stream to `port` in the guest through the VM's vsock Unix socket.
pub fn connect_guest(vsock_socket: &Path, port: u32) -> io::Result<UnixStream> {
    let mut unix = UnixStream::connect(vsock_socket)?;
    unix.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the reply byte by byte so no payload byte after the newline is consumed.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    unix.set_read_timeout(Some(Duration::from_secs(10)))?;
    while line.len() < 64 {
        if unix.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("guest refused vsock port {port}"),
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    unix.set_read_timeout(None)?;
    if !line.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("guest refused vsock port {port}"),
        ));
    }
    Ok(unix)
}

fn forward(tcp: TcpStream, socket: &Path, guest_port: u16) -> io::Result<()> {
    let unix = connect_guest(socket, u32::from(guest_port))?;
    let (mut tcp_r, mut unix_w) = (tcp.try_clone()?, unix.try_clone()?);
    let upstream = thread::Builder::new()
        .name("portfwd-up".into())
        .stack_size(COPY_THREAD_STACK)
        .spawn(move || {
            let _ = io::copy(&mut tcp_r, &mut unix_w);
            let _ = unix_w.shutdown(Shutdown::Write);
        })?;
    let (mut unix_r, mut tcp_w) = (BufReader::new(unix), tcp);
    let _ = copy_buffered(&mut unix_r, &mut tcp_w);
    let _ = tcp_w.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

fn copy_buffered(r: &mut BufReader<UnixStream>, w: &mut TcpStream) -> io::Result<()> {
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.len();
        w.write_all(buf)?;
        r.consume(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn mappings_parse_like_docker() {
        let m: PortMapping = "8080:80".parse().unwrap();
        assert_eq!(m.host, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(m.guest_port, 80);
        let m: PortMapping = "0.0.0.0:8443:443/tcp".parse().unwrap();
        assert_eq!(m.host, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(m.to_string().parse::<PortMapping>().unwrap(), m);
        for bad in ["80", "a:80", "8080:", "8080:0", "1.2.3:80:80", "70000:80"] {
            assert!(
                matches!(bad.parse::<PortMapping>(), Err(PortError::Parse(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "53:53/udp".parse::<PortMapping>(),
            Err(PortError::Protocol(_))
        ));
    }

    /// Plays the VM side of the vsock socket: accepts `CONNECT <port>`, answers OK and echoes
    /// upper-cased bytes, so the forwarder's handshake and copying are checked end to end.
    fn vsock_side(listener: UnixListener, expect_port: u32) {
        for conn in listener.incoming().take(2) {
            let mut conn = conn.unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line != format!("CONNECT {expect_port}\n") {
                continue; // dropping the connection refuses it
            }
            conn.write_all(b"OK 1025\n").unwrap();
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            conn.write_all(&data.to_ascii_uppercase()).unwrap();
        }
    }

    #[test]
    fn published_port_reaches_the_guest_port_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let vm = thread::spawn(move || vsock_side(listener, 80));

        let fwd = PortForwarder::start("0:80".parse().unwrap(), &sock).unwrap();
        let mut client = TcpStream::connect(fwd.local_addr()).unwrap();
        client.write_all(b"get / http/1.0\r\n").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "GET / HTTP/1.0\r\n");

        // A guest that refuses the port closes the client's connection without data.
        drop(fwd);
        let fwd = PortForwarder::start("0:81".parse().unwrap(), &sock).unwrap();
        let mut client = TcpStream::connect(fwd.local_addr()).unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert!(reply.is_empty());
        drop(fwd);
        vm.join().unwrap();
    }

    #[test]
    fn connections_past_the_limit_are_closed_as_they_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vsock.sock");
        // A VM side that takes connections and never answers: forwarded ones stay open.
        let listener = UnixListener::bind(&sock).unwrap();
        let held = thread::spawn(move || {
            listener
                .incoming()
                .take(2)
                .map(Result::unwrap)
                .collect::<Vec<_>>()
        });
        let fwd = PortForwarder::start_limited("0:80".parse().unwrap(), &sock, 2).unwrap();
        let first = TcpStream::connect(fwd.local_addr()).unwrap();
        let second = TcpStream::connect(fwd.local_addr()).unwrap();
        let vm_side = held.join().unwrap();
        let mut third = TcpStream::connect(fwd.local_addr()).unwrap();
        third
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(third.read(&mut buf).unwrap(), 0, "closed at once");
        drop((first, second, vm_side));
    }

    #[test]
    fn busy_host_port_is_a_clear_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = PortForwarder::start(
            format!("{port}:80").parse().unwrap(),
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("cannot listen on 127.0.0.1:"),
            "{err}"
        );
    }
}
