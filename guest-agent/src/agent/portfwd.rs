//! The guest's end of published ports: for each port the host publishes (`mvm.ports=80,443` on
//! the kernel command line), a vsock listener on that port whose connections are relayed to
//! `127.0.0.1:<port>` in the guest, where the container (which shares the guest's network)
//! listens. The host's end is mvm's port forwarder, which connects to the same vsock port.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;

use super::vsock::{VsockListener, VsockStream};

/// Parses `80,443` into ports; entries that are not ports are skipped.
pub fn parse_ports(text: &str) -> Vec<u16> {
    text.split(',')
        .filter_map(|p| p.trim().parse().ok())
        .filter(|p| *p != 0)
        .collect()
}

/// Starts one relay thread per port; a port that cannot be bound is reported and skipped.
pub fn serve_ports(ports: &[u16]) {
    for &port in ports {
        match VsockListener::bind(u32::from(port)) {
            Ok(listener) => {
                thread::spawn(move || accept_loop(&listener, port));
            }
            Err(e) => log::warn!("published port {port}: cannot listen on vsock: {e}"),
        }
    }
}

fn accept_loop(listener: &VsockListener, port: u16) {
    loop {
        match listener.accept() {
            Ok(conn) => {
                thread::spawn(move || {
                    if let Err(e) = relay(conn, port) {
                        log::debug!("published port {port}: {e}");
                    }
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("published port {port}: accept failed: {e}");
                return;
            }
        }
    }
}

/// Copies bytes both ways between the host's vsock connection and the guest's TCP port.
fn relay(vsock: VsockStream, port: u16) -> io::Result<()> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    let (mut tcp_r, mut tcp_w) = (tcp.try_clone()?, tcp);
    let (mut vs_r, mut vs_w) = (vsock.try_clone()?, vsock);
    let up = thread::spawn(move || {
        let _ = copy(&mut vs_r, &mut tcp_w);
        let _ = tcp_w.shutdown(Shutdown::Write);
    });
    let _ = copy(&mut tcp_r, &mut vs_w);
    let _ = vs_w.shutdown_write();
    let _ = up.join();
    Ok(())
}

fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_parse_and_skip_junk() {
        assert_eq!(parse_ports("80,443"), [80, 443]);
        assert_eq!(parse_ports("80,x,0,70000, 8080"), [80, 8080]);
        assert!(parse_ports("").is_empty());
    }
}
