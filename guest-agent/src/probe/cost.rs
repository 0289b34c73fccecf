//! What running here costs: a fixed compute loop, system call latency, fork+exec, file write +
//! fsync and TCP over loopback. Loops that make system calls are bounded by time, not count:
//! inside a guest whose kernel is emulated one system call can take tens of microseconds.

use std::ffi::CString;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use super::sys::{self, Forked};
use super::Cost;

/// Most MiB written (and fsynced) by the disk measurement.
pub const DISK_MIB: usize = 16;
/// Most MiB sent over loopback TCP.
pub const TCP_MIB: usize = 64;
/// Time after which the disk and TCP measurements stop sending (what was sent counts).
const IO_BUDGET: Duration = Duration::from_millis(300);
/// Iterations of the compute loop.
pub const CPU_LOOP_ITERATIONS: u64 = 20_000_000;
/// Time spent on the getppid loop.
const SYSCALL_BUDGET: Duration = Duration::from_millis(200);
/// Time spent forking and executing.
const FORK_EXEC_BUDGET: Duration = Duration::from_millis(500);
/// Longest wait for a helper's connection or data.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

/// Takes the measurements; `scratch` is where the disk test writes.
pub fn measure(scratch: Option<&Path>) -> Cost {
    let mut errors = Vec::new();
    let mut keep = |field: &str, r: Result<f64, String>| match r {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(format!("{field}: {e}"));
            None
        }
    };
    let cpu_loop_ns = Some(cpu_loop_ns());
    let syscall_ns = keep("syscall_ns", Ok(syscall_ns()));
    let fork_exec_per_s = keep("fork_exec_per_s", fork_exec_per_s());
    let disk_write_mib_s = keep(
        "disk_write_mib_s",
        scratch.map_or(Err("no writable directory".into()), disk_write_mib_s),
    );
    let tcp_loopback_mib_s = keep("tcp_loopback_mib_s", tcp_loopback_mib_s());
    Cost {
        cpu_loop_ns,
        syscall_ns,
        fork_exec_per_s,
        disk_write_mib_s,
        disk_dir: scratch.map(|d| d.display().to_string()),
        tcp_loopback_mib_s,
        errors,
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A fixed amount of integer work (xorshift), no memory traffic, no system calls.
fn compute(iterations: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    x
}

/// Nanoseconds for [`CPU_LOOP_ITERATIONS`], best of three.
pub fn cpu_loop_ns() -> u64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(compute(std::hint::black_box(CPU_LOOP_ITERATIONS)));
            nanos(t.elapsed())
        })
        .min()
        .unwrap_or(0)
}

/// Nanoseconds per getppid, over batches of 1000 for about [`SYSCALL_BUDGET`].
pub fn syscall_ns() -> f64 {
    let start = Instant::now();
    let mut calls = 0u32;
    while start.elapsed() < SYSCALL_BUDGET && calls < 10_000_000 {
        for _ in 0..1000 {
            std::hint::black_box(sys::getppid_raw());
        }
        calls += 1000;
    }
    start.elapsed().as_secs_f64() * 1e9 / f64::from(calls)
}

/// fork + exec of this binary's `probe --noop` + wait, per second.
pub fn fork_exec_per_s() -> Result<f64, String> {
    let exe = c"/proc/self/exe";
    let args = ["mvm-agent", "probe", "--noop"].map(|a| CString::new(a).unwrap_or_default());
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let start = Instant::now();
    let mut runs = 0u32;
    while runs == 0 || (start.elapsed() < FORK_EXEC_BUDGET && runs < 500) {
        let pid = match sys::fork() {
            Ok(Forked::Child) => sys::exec(exe, &argv),
            Ok(Forked::Parent(p)) => p,
            Err(e) => return Err(format!("fork: {}", sys::errno_name(e))),
        };
        match sys::wait(pid) {
            Ok(sys::Exit { code: Some(0), .. }) => runs += 1,
            Ok(exit) => return Err(format!("exec of /proc/self/exe ended with {exit:?}")),
            Err(e) => return Err(format!("wait: {}", sys::errno_name(e))),
        }
    }
    Ok(f64::from(runs) / start.elapsed().as_secs_f64())
}

/// Writes a new file in `dir` a MiB at a time, up to [`DISK_MIB`] MiB or for about
/// [`IO_BUDGET`], fsyncs it and removes it: MiB/s, the fsync included.
pub fn disk_write_mib_s(dir: &Path) -> Result<f64, String> {
    let path = dir.join(format!(".mvm-probe-write-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let block = vec![0xa5u8; MIB];
        let start = Instant::now();
        let mut written = 0;
        while written < DISK_MIB * MIB && (written == 0 || start.elapsed() < IO_BUDGET) {
            f.write_all(&block)?;
            written += MIB;
        }
        f.sync_all()?;
        Ok::<_, std::io::Error>((written, start.elapsed()))
    })();
    let _ = std::fs::remove_file(&path);
    let (bytes, elapsed) =
        result.map_err(|e| format!("{}: {}", path.display(), sys::io_name(&e)))?;
    Ok(mib_per_s(bytes, elapsed))
}

fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    let mib = bytes as f64 / MIB as f64;
    mib / elapsed.as_secs_f64().max(1e-9)
}

/// A forked child sends over 127.0.0.1 to this process, up to [`TCP_MIB`] MiB or for about
/// [`IO_BUDGET`]: MiB/s.
pub fn tcp_loopback_mib_s() -> Result<f64, String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("bind 127.0.0.1: {}", sys::io_name(&e)))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("local address: {}", sys::io_name(&e)))?
        .port();
    let pid = match sys::fork() {
        Ok(Forked::Child) => sys::in_child(|| {
            sys::die_with_parent();
            let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
                return 1;
            };
            let block = vec![0x5au8; 64 << 10];
            let start = Instant::now();
            for _ in 0..TCP_MIB * 16 {
                if s.write_all(&block).is_err() {
                    return 2;
                }
                if start.elapsed() > IO_BUDGET {
                    break;
                }
            }
            0
        }),
        Ok(Forked::Parent(p)) => p,
        Err(e) => return Err(format!("fork: {}", sys::errno_name(e))),
    };
    let received = receive(&listener);
    let exit = sys::wait(pid);
    let (bytes, elapsed) = received?;
    match exit {
        Ok(sys::Exit { code: Some(0), .. }) if bytes > 0 => Ok(mib_per_s(bytes, elapsed)),
        other => Err(format!(
            "the sender ended with {other:?} after {bytes} bytes"
        )),
    }
}

/// Accepts one connection (waiting at most [`IO_TIMEOUT`]) and reads it to the end.
fn receive(listener: &TcpListener) -> Result<(usize, Duration), String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| sys::io_name(&e))?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(format!("accept: {}", sys::io_name(&e))),
        }
    };
    conn.set_nonblocking(false).map_err(|e| sys::io_name(&e))?;
    conn.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| sys::io_name(&e))?;
    let start = Instant::now();
    let mut buf = vec![0u8; 256 << 10];
    let mut bytes = 0;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {}", sys::io_name(&e))),
        }
    }
    Ok((bytes, start.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_is_deterministic() {
        assert_eq!(compute(1000), compute(1000));
        assert_ne!(compute(1000), compute(1001));
    }

    #[test]
    fn disk_and_loopback_measure_something() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(disk_write_mib_s(dir.path()).expect("disk") > 0.0);
        assert!(std::fs::read_dir(dir.path()).expect("dir").next().is_none());
        assert!(tcp_loopback_mib_s().expect("tcp") > 0.0);
        assert!(syscall_ns() > 0.0);
    }
}
