//! User-mode (rootless) backend: Debian's `passt`, started and stopped by mvm.
//!
//! passt is a userspace network stack that translates the guest's Ethernet frames to ordinary
//! host sockets (TCP, UDP, ICMP) and answers ARP, DHCP and NDP itself. mvm starts it with
//! `--one-off`, so it quits when mvm's connection closes (also when mvm is killed), and kills,
//! reaps and removes its socket on drop. Frames use the qemu stream framing: a 4-byte big-endian
//! length, then the Ethernet frame, with no virtio-net header.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{NetBackend, NetError, MAX_FRAME_LEN, VNET_HDR_LEN};

/// The passt binary (Debian package `passt`).
const PASST_BIN: &str = "passt";
/// How long to wait for passt to accept connections on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(5);
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
    /// Unix socket passt listens on; `None` picks `/tmp/mvm-passt-<pid>-<n>.sock`.
    pub socket_path: Option<PathBuf>,
    /// TCP ports forwarded from the host to the guest.
    pub tcp_ports: Vec<PortForward>,
    /// UDP ports forwarded from the host to the guest.
    pub udp_ports: Vec<PortForward>,
}

/// A running passt process and mvm's connection to it.
#[derive(Debug)]
pub struct Passt {
    child: Child,
    stream: UnixStream,
    socket_path: PathBuf,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
}

fn default_socket_path() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("mvm-passt-{}-{n}.sock", std::process::id()))
}

fn port_spec(ports: &[PortForward]) -> String {
    ports
        .iter()
        .map(|p| format!("{}:{}", p.host_port, p.guest_port))
        .collect::<Vec<_>>()
        .join(",")
}

impl Passt {
    /// The arguments mvm passes to passt for `config` and `socket`.
    pub fn args(config: &PasstConfig, socket: &Path) -> Vec<String> {
        let mut args = vec![
            "--foreground".to_string(),
            "--one-off".to_string(),
            "--quiet".to_string(),
            "--socket".to_string(),
            socket.display().to_string(),
        ];
        if !config.tcp_ports.is_empty() {
            args.extend(["--tcp-ports".to_string(), port_spec(&config.tcp_ports)]);
        }
        if !config.udp_ports.is_empty() {
            args.extend(["--udp-ports".to_string(), port_spec(&config.udp_ports)]);
        }
        args
    }

    /// Starts passt and connects to it.
    pub fn new(config: &PasstConfig) -> Result<Self, NetError> {
        let socket_path = config
            .socket_path
            .clone()
            .unwrap_or_else(default_socket_path);
        let _ = std::fs::remove_file(&socket_path);
        let mut child = Command::new(PASST_BIN)
            .args(Self::args(config, &socket_path))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(NetError::PasstSpawn)?;
        let deadline = Instant::now() + START_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(&socket_path) {
                Ok(s) => break s,
                Err(e) => {
                    let exited = matches!(child.try_wait(), Ok(Some(_)));
                    if exited || Instant::now() >= deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        let _ = std::fs::remove_file(&socket_path);
                        return Err(NetError::PasstConnect(socket_path.display().to_string(), e));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        // Writes block (passt always drains its socket) but never forever.
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        log::info!(
            "passt started (pid {}) on {}",
            child.id(),
            socket_path.display()
        );
        Ok(Self {
            child,
            stream,
            socket_path,
            rx: vec![0; RX_BUF_LEN],
            rx_start: 0,
            rx_end: 0,
        })
    }

    /// The Unix socket passt listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
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
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn passt_installed() -> bool {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(PASST_BIN).exists()))
            .unwrap_or(false);
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

    #[test]
    fn passt_answers_arp_and_cleans_up_on_drop() {
        if !passt_installed() {
            return;
        }
        let mut passt = Passt::new(&PasstConfig::default()).expect("start passt");
        let path = passt.socket_path().to_path_buf();
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
        assert!(!path.exists(), "socket left behind");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "passt still running"
        );
    }

    #[test]
    fn passt_command_line_has_socket_and_ports() {
        let cfg = PasstConfig {
            socket_path: None,
            tcp_ports: vec![PortForward {
                host_port: 8080,
                guest_port: 80,
            }],
            udp_ports: vec![],
        };
        let args = Passt::args(&cfg, Path::new("/run/x.sock"));
        assert_eq!(
            args,
            [
                "--foreground",
                "--one-off",
                "--quiet",
                "--socket",
                "/run/x.sock",
                "--tcp-ports",
                "8080:80"
            ]
        );
    }

    #[test]
    fn missing_passt_socket_dir_is_one_clear_error() {
        if !passt_installed() {
            return;
        }
        let cfg = PasstConfig {
            socket_path: Some("/nonexistent-dir-mvm/p.sock".into()),
            ..PasstConfig::default()
        };
        let err = Passt::new(&cfg).expect_err("must fail");
        assert!(matches!(err, NetError::PasstConnect(..)), "{err}");
    }
}
