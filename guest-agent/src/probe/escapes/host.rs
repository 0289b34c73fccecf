//! Probes of host resources. Each is identified by something only the real host resource has
//! (a nonce the host hands over, the disk's size), so that a look-alike inside a VM or an image
//! never counts as `allowed`.

use std::ffi::CString;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use super::{probe, refused, Context};
use crate::agent::client::AgentClient;
use crate::agent::vsock::{VsockStream, VMADDR_CID_HOST};
use crate::probe::sys::{self, io_name};
use crate::probe::{Probe, ProbeResult};
use crate::protocol::AGENT_VSOCK_PORT;

/// How long a network probe waits for an answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

fn not_given(name: &str, option: &str) -> Probe {
    probe(name, ProbeResult::Error, format!("not given ({option})"))
}

/// The marker's pid, or the probe entry saying why there is none.
fn marker_pid(ctx: &Context, name: &str) -> Result<i32, Probe> {
    match ctx.marker {
        None => Err(not_given(name, "--marker-cmdline")),
        Some(m) => m.pid.ok_or_else(|| {
            probe(
                name,
                ProbeResult::Blocked,
                "the host's marker process is not visible",
            )
        }),
    }
}

/// `see-host-process`: the marker is among the processes in /proc.
pub fn see_process(ctx: &Context) -> Probe {
    const NAME: &str = "see-host-process";
    let Some(m) = ctx.marker else {
        return not_given(NAME, "--marker-cmdline");
    };
    match (m.pid, m.scanned) {
        (Some(pid), _) => probe(
            NAME,
            ProbeResult::Allowed,
            format!("the host's marker process is visible as pid {pid}"),
        ),
        (None, Some(n)) => probe(
            NAME,
            ProbeResult::Blocked,
            format!("none of the {n} processes in /proc is the host's marker"),
        ),
        (None, None) => probe(NAME, ProbeResult::Blocked, "/proc is not readable"),
    }
}

/// `signal-host-process`: kill(marker, 0), the permission check of a signal without one.
pub fn signal_process(ctx: &Context) -> Probe {
    const NAME: &str = "signal-host-process";
    let pid = match marker_pid(ctx, NAME) {
        Ok(p) => p,
        Err(p) => return p,
    };
    match sys::signal_check(pid) {
        Ok(()) => probe(
            NAME,
            ProbeResult::Allowed,
            format!("kill(pid {pid}, 0) succeeded: the marker can be signalled (none was sent)"),
        ),
        Err(e) => {
            let (r, d) = refused(e);
            probe(NAME, r, format!("kill(pid {pid}, 0): {d}"))
        }
    }
}

/// `ptrace-host-process`: PTRACE_SEIZE of the marker (it keeps running), released at once.
pub fn ptrace_process(ctx: &Context) -> Probe {
    const NAME: &str = "ptrace-host-process";
    let pid = match marker_pid(ctx, NAME) {
        Ok(p) => p,
        Err(p) => return p,
    };
    match sys::ptrace_seize(pid) {
        Ok(()) => {
            let released = match sys::ptrace_release(pid, Duration::from_secs(1)) {
                Ok(()) => "released at once".to_string(),
                Err(e) => format!(
                    "release: {}, released when the probe exits",
                    sys::errno_name(e)
                ),
            };
            probe(
                NAME,
                ProbeResult::Allowed,
                format!("PTRACE_SEIZE of the marker (pid {pid}) succeeded; {released}"),
            )
        }
        Err(e) => {
            let (r, d) = refused(e);
            probe(NAME, r, format!("PTRACE_SEIZE of pid {pid}: {d}"))
        }
    }
}

/// `read-host-secret`: the root-only host file that holds the secret nonce.
pub fn read_secret(ctx: &Context) -> Probe {
    const NAME: &str = "read-host-secret";
    let (Some(path), Some(nonce)) = (&ctx.opts.secret_file, &ctx.opts.secret) else {
        return not_given(NAME, "--secret-file, --secret");
    };
    let mut buf = Vec::new();
    let read = File::open(path).and_then(|f| f.take(1 << 16).read_to_end(&mut buf));
    match read {
        Err(e) => probe(
            NAME,
            ProbeResult::Blocked,
            format!("{}: {}", path.display(), io_name(&e)),
        ),
        Ok(_) if String::from_utf8_lossy(&buf).contains(nonce.as_str()) => probe(
            NAME,
            ProbeResult::Allowed,
            format!("read the host's secret from {}", path.display()),
        ),
        Ok(_) => probe(
            NAME,
            ProbeResult::Blocked,
            format!(
                "{} is readable but is not the host's (no nonce in it)",
                path.display()
            ),
        ),
    }
}

/// `open-host-disk`: mknod of the host disk's numbers in the scratch directory, open and read
/// one sector (read-only), compare the size; the node is removed again.
pub fn open_disk(ctx: &Context) -> Probe {
    const NAME: &str = "open-host-disk";
    let Some((major, minor)) = ctx.opts.host_disk else {
        return not_given(NAME, "--host-disk");
    };
    let Some(dir) = ctx.scratch else {
        return probe(
            NAME,
            ProbeResult::Error,
            "no writable directory for the node",
        );
    };
    let path = dir.join(format!(".mvm-probe-disk-{}", std::process::id()));
    let Ok(cpath) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return probe(NAME, ProbeResult::Error, "scratch path has a NUL byte");
    };
    let dev = format!("{major}:{minor}");
    if let Err(e) = sys::mknod_block(&cpath, major, minor) {
        let (r, d) = match e {
            libc::EROFS => (ProbeResult::Error, "EROFS (read-only scratch dir)".into()),
            _ => refused(e),
        };
        return probe(NAME, r, format!("mknod {dev}: {d}"));
    }
    let result = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .and_then(|mut f| {
            let mut sector = [0u8; 512];
            f.read_exact(&mut sector)?;
            Ok(sys::block_device_size(&f).ok())
        });
    let _ = std::fs::remove_file(&path);
    match (result, ctx.opts.host_disk_size) {
        (Err(e), _) => {
            let why = match e.raw_os_error() {
                Some(libc::ENXIO | libc::ENODEV) => " (no such device here)",
                Some(libc::EACCES) => " (a device policy, or a nodev mount)",
                Some(libc::EPERM) => " (a device policy: cgroup or LSM)",
                _ => "",
            };
            probe(
                NAME,
                ProbeResult::Blocked,
                format!("mknod {dev} allowed; open/read: {}{why}", io_name(&e)),
            )
        }
        (Ok(size), None) => probe(
            NAME,
            ProbeResult::Allowed,
            format!(
                "opened and read block device {dev} ({} bytes; no --host-disk-size to prove it is the host's)",
                size.map_or("?".into(), |s| s.to_string())
            ),
        ),
        (Ok(Some(size)), Some(want)) if size == want => probe(
            NAME,
            ProbeResult::Allowed,
            format!("opened and read the host's disk {dev} ({size} bytes)"),
        ),
        (Ok(size), Some(want)) => probe(
            NAME,
            ProbeResult::Blocked,
            format!(
                "block device {dev} here is not the host's disk ({} bytes, the host's has {want})",
                size.map_or("?".into(), |s| s.to_string())
            ),
        ),
    }
}

/// Reads from `r` until `nonce` shows up, EOF, an error or 4 KiB.
fn read_for_nonce(r: &mut impl Read, nonce: &str) -> std::io::Result<bool> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while got.len() < 4096 {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if got.is_empty() => return Err(e),
            Err(_) => break,
        };
        got.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&got).contains(nonce) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `reach-host-loopback`: the host's service on 127.0.0.1 answers with its nonce.
pub fn reach_loopback(ctx: &Context) -> Probe {
    const NAME: &str = "reach-host-loopback";
    let (Some(port), Some(nonce)) = (ctx.opts.loopback_port, &ctx.opts.loopback_nonce) else {
        return not_given(NAME, "--loopback-port, --loopback-nonce");
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = match TcpStream::connect_timeout(&addr, ANSWER_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            return probe(
                NAME,
                ProbeResult::Blocked,
                format!("connect {addr}: {}", io_name(&e)),
            )
        }
    };
    let _ = stream.set_read_timeout(Some(ANSWER_TIMEOUT));
    match read_for_nonce(&mut stream, nonce) {
        Ok(true) => probe(
            NAME,
            ProbeResult::Allowed,
            format!("the host's service on {addr} answered"),
        ),
        Ok(false) => probe(
            NAME,
            ProbeResult::Blocked,
            format!("{addr} answered without the nonce: not the host's service"),
        ),
        Err(e) => probe(
            NAME,
            ProbeResult::Blocked,
            format!("{addr} accepted but sent nothing: {}", io_name(&e)),
        ),
    }
}

/// `reach-agent-vsock`: an mvm agent answers a protocol Hello on vsock port 1024 at the local
/// CID (1), this VM's own CID, or with `--vsock-host` the host (CID 2).
pub fn reach_agent_vsock(ctx: &Context) -> Probe {
    const NAME: &str = "reach-agent-vsock";
    const VMADDR_CID_LOCAL: u32 = 1;
    let mut targets = vec![("local", VMADDR_CID_LOCAL)];
    if ctx.opts.vsock_host {
        targets.push(("host", VMADDR_CID_HOST));
    }
    if let Some(cid) = File::open("/dev/vsock")
        .ok()
        .and_then(|f| sys::vsock_local_cid(&f).ok())
    {
        targets.push(("own", cid));
    }
    let mut notes = Vec::new();
    for (label, cid) in targets {
        let stream = match VsockStream::connect(cid, AGENT_VSOCK_PORT) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                return probe(NAME, ProbeResult::Blocked, "no vsock here (EAFNOSUPPORT)");
            }
            Err(e) => {
                notes.push(format!("{label} CID {cid}: {}", io_name(&e)));
                continue;
            }
        };
        let _ = sys::set_read_timeout(stream.as_raw_fd(), ANSWER_TIMEOUT);
        match AgentClient::open(stream) {
            Ok(_) => {
                return probe(
                    NAME,
                    ProbeResult::Allowed,
                    format!(
                        "an mvm agent answered Hello at {label} CID {cid} port {AGENT_VSOCK_PORT}"
                    ),
                )
            }
            Err(e) => notes.push(format!("{label} CID {cid}: connected, no Hello ({e})")),
        }
    }
    probe(NAME, ProbeResult::Blocked, notes.join("; "))
}

/// `read-state-dir`: mvm's state directory on the host can be listed (and holds the entry the
/// host named).
pub fn read_state_dir(ctx: &Context) -> Probe {
    const NAME: &str = "read-state-dir";
    let Some(dir) = &ctx.opts.state_dir else {
        return not_given(NAME, "--state-dir");
    };
    let names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => {
            return probe(
                NAME,
                ProbeResult::Blocked,
                format!("{}: {}", dir.display(), io_name(&e)),
            )
        }
    };
    match &ctx.opts.state_nonce {
        Some(n) if names.contains(n) => probe(
            NAME,
            ProbeResult::Allowed,
            format!(
                "listed mvm's state dir {} ({} entries)",
                dir.display(),
                names.len()
            ),
        ),
        Some(_) => probe(
            NAME,
            ProbeResult::Blocked,
            format!(
                "{} is a directory here but not mvm's (no nonce entry)",
                dir.display()
            ),
        ),
        None => probe(
            NAME,
            ProbeResult::Allowed,
            format!(
                "listed {} ({} entries; no --state-nonce to prove it is the host's)",
                dir.display(),
                names.len()
            ),
        ),
    }
}

/// Most kernel log records read from /dev/kmsg.
const MAX_KMSG_RECORDS: usize = 1 << 20;
/// Bytes of the kernel log read through syslog(2).
const KLOG_BYTES: usize = 1 << 20;

/// How a kernel log source went.
enum LogScan {
    /// The nonce was found.
    Found,
    /// The log was read (this many records or bytes) without the nonce.
    Missing(String),
    /// The log could not be read.
    Unreadable(String),
}

/// Reads /dev/kmsg record by record (non-blocking, so it ends at the newest record).
fn scan_kmsg(nonce: Option<&str>) -> LogScan {
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/kmsg")
    {
        Ok(f) => f,
        Err(e) => return LogScan::Unreadable(format!("/dev/kmsg: {}", io_name(&e))),
    };
    let mut buf = vec![0u8; 16 << 10];
    let mut records = 0usize;
    while records < MAX_KMSG_RECORDS {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                records += 1;
                if nonce.is_some_and(|x| String::from_utf8_lossy(&buf[..n]).contains(x)) {
                    return LogScan::Found;
                }
            }
            // A record was overwritten while reading: go on with the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if records == 0 => {
                return LogScan::Unreadable(format!("/dev/kmsg: {}", io_name(&e)))
            }
            Err(_) => break,
        }
    }
    LogScan::Missing(format!("/dev/kmsg ({records} records)"))
}

/// Reads the newest megabyte of the kernel log through syslog(2).
fn scan_syslog(nonce: Option<&str>) -> LogScan {
    let mut buf = vec![0u8; KLOG_BYTES];
    match sys::klog_read_all(&mut buf) {
        Ok(n) if nonce.is_some_and(|x| String::from_utf8_lossy(&buf[..n]).contains(x)) => {
            LogScan::Found
        }
        Ok(n) => LogScan::Missing(format!("syslog(2) ({n} bytes)")),
        Err(e) => LogScan::Unreadable(format!("syslog(2): {}", sys::errno_name(e))),
    }
}

/// `read-kernel-log`: the host's kernel log (where mvm wrote the kmsg nonce) is readable, via
/// /dev/kmsg or syslog(2).
pub fn read_kernel_log(ctx: &Context) -> Probe {
    const NAME: &str = "read-kernel-log";
    let nonce = ctx.opts.kmsg_nonce.as_deref();
    let mut readable = Vec::new();
    let mut unreadable = Vec::new();
    for (source, scan) in [
        ("/dev/kmsg", scan_kmsg as fn(Option<&str>) -> LogScan),
        ("syslog(2)", scan_syslog),
    ] {
        match scan(nonce) {
            LogScan::Found => {
                return probe(
                    NAME,
                    ProbeResult::Allowed,
                    format!("read the host's kernel log through {source}"),
                )
            }
            LogScan::Missing(what) => readable.push(what),
            LogScan::Unreadable(why) => unreadable.push(why),
        }
    }
    let unreadable = unreadable.join("; ");
    if nonce.is_none() {
        let what = if readable.is_empty() {
            format!("the kernel log is not readable: {unreadable}")
        } else {
            format!("a kernel log is readable: {}", readable.join(", "))
        };
        return probe(
            NAME,
            ProbeResult::Error,
            format!("not given (--kmsg-nonce); {what}"),
        );
    }
    if readable.is_empty() {
        probe(NAME, ProbeResult::Blocked, unreadable)
    } else {
        probe(
            NAME,
            ProbeResult::Blocked,
            format!(
                "a kernel log is readable ({}) but not the host's (no nonce)",
                readable.join(", ")
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_is_found_across_reads() {
        struct Chunks(Vec<&'static [u8]>);
        impl Read for Chunks {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() {
                    return Ok(0);
                }
                let c = self.0.remove(0);
                buf[..c.len()].copy_from_slice(c);
                Ok(c.len())
            }
        }
        let mut r = Chunks(vec![b"hello mvm-non", b"ce-1234\n"]);
        assert!(read_for_nonce(&mut r, "mvm-nonce-1234").expect("read"));
        let mut r = Chunks(vec![b"something else\n"]);
        assert!(!read_for_nonce(&mut r, "mvm-nonce-1234").expect("read"));
    }
}
