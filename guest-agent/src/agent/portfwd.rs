//! The guest's end of published ports: for each port the host publishes (`mvm.ports=80,443` on
//! the kernel command line), a vsock listener on that port whose connections are relayed to
//! `127.0.0.1:<port>` in the guest, where the container (which shares the guest's network)
//! listens. The host's end is mvm's port forwarder, which connects to the same vsock port.
//!
//! Bounded: a connection from anything but the host (a container reaching the port through vsock
//! loopback) is closed at once, at most [`MAX_RELAYS`] relays run, and each buffers at most
//! [`RELAY_BUF`] bytes per direction (it stops reading that side while they wait).

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

use super::poll::{read_some, set_nonblocking, write_some, READ, WRITE};
use super::vsock::{peer_allowed, VsockListener, VsockStream};

/// Bytes buffered per direction of a relay before it stops reading that side.
pub const RELAY_BUF: usize = 64 * 1024;
/// Most relays at once, all published ports together; more connections are closed at once.
pub const MAX_RELAYS: usize = 256;

/// What a descriptor of the port forwarder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortToken {
    /// The vsock listener of published port number `.0` (an index).
    Listener(usize),
    /// The host's vsock end of relay `.0`.
    Vsock(u64),
    /// The guest's TCP end of relay `.0`.
    Tcp(u64),
}

/// One direction of a relay: bytes read from one end, waiting to be written to the other.
#[derive(Debug, Default)]
struct Pipe {
    buf: Vec<u8>,
    /// The reading end reached end-of-file (the writing end is shut down once `buf` drains).
    eof: bool,
    /// The writing end was shut down.
    shut: bool,
}

impl Pipe {
    fn wants_read(&self) -> bool {
        !self.eof && self.buf.len() < RELAY_BUF
    }
    fn done(&self) -> bool {
        self.shut
    }
}

/// A host connection to a published port, relayed to `127.0.0.1:<port>` in the guest.
#[derive(Debug)]
struct Relay {
    vsock: VsockStream,
    tcp: TcpStream,
    /// vsock to TCP.
    up: Pipe,
    /// TCP to vsock.
    down: Pipe,
}

/// The guest's end of every published port: vsock listeners and the relays they accepted,
/// driven by the agent's event loop.
#[derive(Debug, Default)]
pub struct PortForwarder {
    listeners: Vec<(u16, VsockListener)>,
    relays: HashMap<u64, Relay>,
    next: u64,
}

impl PortForwarder {
    /// Listens on vsock for each port; a port that cannot be bound is reported and skipped.
    pub fn bind(ports: &[u16]) -> Self {
        let mut fwd = PortForwarder::default();
        for &port in ports {
            match VsockListener::bind(u32::from(port)) {
                Ok(l) => fwd.listeners.push((port, l)),
                Err(e) => log::warn!("published port {port}: cannot listen on vsock: {e}"),
            }
        }
        fwd
    }

    /// Reports the descriptors to wait on, and for what.
    pub fn interest(&self, add: &mut dyn FnMut(RawFd, i16, PortToken)) {
        for (i, (_, l)) in self.listeners.iter().enumerate() {
            add(l.as_raw_fd(), READ, PortToken::Listener(i));
        }
        for (&id, r) in &self.relays {
            let vs = (if r.up.wants_read() { READ } else { 0 })
                | (if r.down.buf.is_empty() { 0 } else { WRITE });
            let tcp = (if r.down.wants_read() { READ } else { 0 })
                | (if r.up.buf.is_empty() { 0 } else { WRITE });
            add(r.vsock.as_raw_fd(), vs, PortToken::Vsock(id));
            add(r.tcp.as_raw_fd(), tcp, PortToken::Tcp(id));
        }
    }

    /// Handles a ready descriptor.
    pub fn ready(&mut self, token: PortToken) {
        match token {
            PortToken::Listener(i) => self.accept(i),
            PortToken::Vsock(id) | PortToken::Tcp(id) => {
                let Some(r) = self.relays.get_mut(&id) else {
                    return;
                };
                match r.step() {
                    Ok(true) => {}
                    Ok(false) => {
                        self.relays.remove(&id);
                    }
                    Err(e) => {
                        log::debug!("published port relay: {e}");
                        self.relays.remove(&id);
                    }
                }
            }
        }
    }

    fn accept(&mut self, i: usize) {
        let Some((port, listener)) = self.listeners.get(i) else {
            return;
        };
        let port = *port;
        let vsock = match listener.accept() {
            Ok((c, peer)) if peer_allowed(peer) => c,
            Ok((_, peer)) => {
                return log::debug!("published port {port}: closing a connection from {peer:?}")
            }
            Err(e) => return log::warn!("published port {port}: accept failed: {e}"),
        };
        if self.relays.len() >= MAX_RELAYS {
            return log::debug!("published port {port}: {MAX_RELAYS} relays run, closing one more");
        }
        // The guest's own loopback: refused or accepted at once.
        let tcp = match TcpStream::connect(("127.0.0.1", port)) {
            Ok(t) => t,
            Err(e) => return log::debug!("published port {port}: {e}"),
        };
        if let Err(e) =
            set_nonblocking(vsock.as_raw_fd(), true).and_then(|()| tcp.set_nonblocking(true))
        {
            return log::warn!("published port {port}: {e}");
        }
        self.next += 1;
        self.relays.insert(
            self.next,
            Relay {
                vsock,
                tcp,
                up: Pipe::default(),
                down: Pipe::default(),
            },
        );
    }
}

impl Relay {
    /// Moves whatever can move now, both ways. Returns whether the relay goes on.
    fn step(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 16 * 1024];
        // Read what fits, then write what was read; each descriptor is non-blocking.
        if self.up.wants_read() {
            fill(&mut self.vsock, &mut self.up, &mut buf)?;
        }
        if self.down.wants_read() {
            fill(&mut self.tcp, &mut self.down, &mut buf)?;
        }
        drain(&mut self.tcp, &mut self.up, |t| t.shutdown(Shutdown::Write))?;
        drain(&mut self.vsock, &mut self.down, VsockStream::shutdown_write)?;
        Ok(!(self.up.done() && self.down.done()))
    }
}

fn fill(from: &mut impl io::Read, pipe: &mut Pipe, buf: &mut [u8]) -> io::Result<()> {
    while pipe.wants_read() {
        let room = (RELAY_BUF - pipe.buf.len()).min(buf.len());
        match read_some(from, &mut buf[..room])? {
            Some(0) => pipe.eof = true,
            Some(n) => pipe.buf.extend_from_slice(&buf[..n]),
            None => break,
        }
    }
    Ok(())
}

fn drain<W: io::Write>(
    to: &mut W,
    pipe: &mut Pipe,
    shutdown: impl FnOnce(&W) -> io::Result<()>,
) -> io::Result<()> {
    if !pipe.buf.is_empty() {
        let n = write_some(to, &pipe.buf)?;
        pipe.buf.drain(..n);
    }
    if pipe.eof && pipe.buf.is_empty() && !pipe.shut {
        pipe.shut = true;
        // The peer may already be gone; the other direction still finishes.
        let _ = shutdown(to);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_side_that_never_stops_sending_fills_its_buffer_and_no_more() {
        let mut pipe = Pipe::default();
        let mut buf = [0u8; 16 * 1024];
        fill(&mut io::repeat(7), &mut pipe, &mut buf).unwrap();
        assert_eq!(pipe.buf.len(), RELAY_BUF);
        assert!(
            !pipe.wants_read(),
            "reading stops until the other side takes some"
        );
        fill(&mut io::repeat(7), &mut pipe, &mut buf).unwrap();
        assert_eq!(pipe.buf.len(), RELAY_BUF);
    }
}
