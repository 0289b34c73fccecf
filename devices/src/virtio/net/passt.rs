//! User-mode (rootless) backend: Debian's `passt`, started and stopped by mvm.
//!
//! passt is a userspace network stack that translates the guest's Ethernet frames to ordinary
//! host sockets (TCP, UDP, ICMP) and answers ARP, DHCP and NDP itself. mvm hands it one end of a
//! Unix stream socket pair (`--fd`), so there is no socket file to clean up and passt quits as
//! soon as mvm's end closes, also when mvm is killed. On drop mvm also kills and reaps it.
//! Frames use the qemu stream framing: a 4-byte big-endian length, then the Ethernet frame, with
//! no virtio-net header.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{NetBackend, NetError, MAX_FRAME_LEN, VNET_HDR_LEN};

/// The passt binary (Debian package `passt`).
const PASST_BIN: &str = "passt";
/// Receive buffer: room for several maximum-size frames with their length prefixes.
const RX_BUF_LEN: usize = 4 * (4 + MAX_FRAME_LEN);

/// A published port: host `host_port` forwards to guest `guest_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// Port on the host.
    pub host_port: u16,
    /// Port in the guest.
    pub guest_port: u16,
}

/// How to start passt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasstConfig {
    /// TCP ports forwarded from the host to the guest.
    pub tcp_ports: Vec<PortForward>,
    /// UDP ports forwarded from the host to the guest.
    pub udp_ports: Vec<PortForward>,
    /// An address passt answers DNS queries on for the guest, passing them on from the host
    /// (`--dns-forward`).
    #[serde(default)]
    pub dns_forward: Option<Ipv4Addr>,
    /// The resolvers those queries go to (`--dns`); the host's (its /etc/resolv.conf) when
    /// empty.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
}

/// A running passt process and mvm's connection to it.
#[derive(Debug)]
pub struct Passt {
    child: Child,
    stream: UnixStream,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
}

fn port_spec(ports: &[PortForward]) -> String {
    ports
        .iter()
        .map(|p| format!("{}:{}", p.host_port, p.guest_port))
        .collect::<Vec<_>>()
        .join(",")
}

impl Passt {
    /// The arguments mvm passes to passt for `config`, with its end of the socket pair at `fd`.
    pub fn args(config: &PasstConfig, fd: RawFd) -> Vec<String> {
        let mut args = vec![
            "--foreground".to_string(),
            "--quiet".to_string(),
            "--fd".to_string(),
            fd.to_string(),
        ];
        if !config.tcp_ports.is_empty() {
            args.extend(["--tcp-ports".to_string(), port_spec(&config.tcp_ports)]);
        }
        if !config.udp_ports.is_empty() {
            args.extend(["--udp-ports".to_string(), port_spec(&config.udp_ports)]);
        }
        if let Some(addr) = config.dns_forward {
            args.extend(["--dns-forward".to_string(), addr.to_string()]);
        }
        for addr in &config.dns {
            args.extend(["--dns".to_string(), addr.to_string()]);
        }
        args
    }

    /// Starts passt on one end of a new socket pair and keeps the other.
    pub fn new(config: &PasstConfig) -> Result<Self, NetError> {
        let (stream, theirs) = UnixStream::pair().map_err(NetError::PasstSpawn)?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(PASST_BIN);
        cmd.args(Self::args(config, fd))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let clear_cloexec = move || {
            // SAFETY: fcntl(2) on a descriptor number; no memory is shared with the kernel.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the hook runs in the forked child before exec and only calls fcntl(2), which
        // is async-signal-safe, on a descriptor the child inherited.
        unsafe { cmd.pre_exec(clear_cloexec) };
        let child = cmd.spawn().map_err(NetError::PasstSpawn)?;
        drop(theirs);
        // Writes block (passt always drains its socket) but never forever.
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        log::info!("passt started (pid {})", child.id());
        Ok(Self {
            child,
            stream,
            rx: vec![0; RX_BUF_LEN],
            rx_start: 0,
            rx_end: 0,
        })
    }

    /// Process id of passt.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns a complete buffered frame as (start, len), or `None`.
    fn buffered_frame(&self) -> io::Result<Option<(usize, usize)>> {
        let avail = self.rx_end - self.rx_start;
        if avail < 4 {
            return Ok(None);
        }
        let s = self.rx_start;
        let len = u32::from_be_bytes([self.rx[s], self.rx[s + 1], self.rx[s + 2], self.rx[s + 3]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_FRAME_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("passt sent a {len}-byte frame"),
            ));
        }
        Ok((avail >= 4 + len).then_some((s + 4, len)))
    }
}

impl NetBackend for Passt {
    fn send(&mut self, _vnet_hdr: &[u8], frame: &[u8]) -> io::Result<()> {
        let len = u32::try_from(frame.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
        let mut msg = Vec::with_capacity(4 + frame.len());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(frame);
        (&self.stream).write_all(&msg)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some((start, len)) = self.buffered_frame()? {
                let total = VNET_HDR_LEN + len;
                if buf.len() < total {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "buffer too small",
                    ));
                }
                buf[..VNET_HDR_LEN].fill(0);
                buf[VNET_HDR_LEN..total].copy_from_slice(&self.rx[start..start + len]);
                self.rx_start = start + len;
                return Ok(total);
            }
            if self.rx_start > 0 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            let free = &mut self.rx[self.rx_end..];
            // SAFETY: `free` is a live, writable buffer of `free.len()` bytes.
            let n = unsafe {
                libc::recv(
                    self.stream.as_raw_fd(),
                    free.as_mut_ptr().cast(),
                    free.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "passt closed"));
            }
            self.rx_end += usize::try_from(n).unwrap_or(0);
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn offload_features(&self) -> u64 {
        0
    }

    fn set_offloads(&mut self, _acked: u64) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether passt is installed (found on `PATH`).
pub fn passt_available() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(PASST_BIN).is_file()))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use std::time::Instant;

    use super::*;

    pub(crate) fn passt_installed() -> bool {
        let found = passt_available();
        if !found {
            eprintln!("skipping: passt is not installed (Debian package 'passt')");
        }
        found
    }

    /// An ARP request "who has 192.0.2.1" from MAC 52:54:00:12:34:56, padded to 60 bytes.
    pub(crate) fn arp_request(mac: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[192, 0, 2, 2]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[192, 0, 2, 1]);
        f.resize(60, 0);
        f
    }

    pub(crate) fn recv_wait(b: &mut dyn NetBackend, buf: &mut [u8]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match b.recv(buf) {
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    fn process_gone(pid: u32) -> bool {
        // A zombie still has /proc/<pid>; its state letter is Z.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')),
        }
    }

    #[test]
    fn passt_answers_arp_and_is_reaped_on_drop() {
        if !passt_installed() {
            return;
        }
        let mut passt = Passt::new(&PasstConfig::default()).expect("start passt");
        let pid = passt.pid();
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        passt
            .send(&[0; VNET_HDR_LEN], &arp_request(mac))
            .expect("send");
        let mut buf = vec![0; VNET_HDR_LEN + MAX_FRAME_LEN];
        let n = recv_wait(&mut passt, &mut buf);
        let frame = &buf[VNET_HDR_LEN..n];
        assert_eq!(&frame[0..6], &mac, "reply is addressed to the guest");
        assert_eq!(&frame[12..14], &[0x08, 0x06], "ethertype ARP");
        assert_eq!(&frame[20..22], &[0, 2], "ARP reply");
        assert_eq!(
            &frame[28..32],
            &[192, 0, 2, 1],
            "sender is the asked address"
        );
        drop(passt);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "passt not reaped"
        );
    }

    #[test]
    fn passt_exits_by_itself_when_mvm_end_closes() {
        if !passt_installed() {
            return;
        }
        let passt = Passt::new(&PasstConfig::default()).expect("start passt");
        let pid = passt.pid();
        // What the kernel does when mvm dies: mvm's end of the socket closes.
        passt
            .stream
            .shutdown(std::net::Shutdown::Both)
            .expect("shutdown");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !process_gone(pid) {
            assert!(
                Instant::now() < deadline,
                "passt {pid} outlived its connection"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn passt_command_line_has_fd_and_ports() {
        let cfg = PasstConfig {
            tcp_ports: vec![PortForward {
                host_port: 8080,
                guest_port: 80,
            }],
            udp_ports: vec![],
            dns_forward: Some(Ipv4Addr::new(169, 254, 1, 1)),
            dns: vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53))],
        };
        let args = Passt::args(&cfg, 5);
        assert_eq!(
            args,
            [
                "--foreground",
                "--quiet",
                "--fd",
                "5",
                "--tcp-ports",
                "8080:80",
                "--dns-forward",
                "169.254.1.1",
                "--dns",
                "127.0.0.53"
            ]
        );
    }
}
