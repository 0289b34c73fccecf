//! `/init` for scripts/bench-devices.sh: measures the virtio block and net devices from inside
//! a Linux guest and prints one `MVM-BENCH` line per number, then reboots. The same init runs
//! under mvm and under QEMU, so the figures compare the two VMMs.
//!
//! - block: reads `bench_mib` MiB from /dev/vda with O_DIRECT in 1 MiB requests, then writes
//!   them back with O_DIRECT and fsyncs
//! - net: gives eth0 `bench_ip`/24, sends `net_mib` MiB to `bench_host`:7001 (the host closes
//!   after the last byte), then receives everything `bench_host`:7002 sends until EOF
//!
//! Parameters come from the kernel command line (`key=value` words become init's environment).
//! Built static by the script with plain rustc (no crates): the few libc calls are declared here.

use std::alloc::{alloc_zeroed, Layout};
use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

const O_RDONLY: i32 = 0;
const O_WRONLY: i32 = 1;
const O_DIRECT: i32 = 0o40000;
const RB_AUTOBOOT: i32 = 0x0123_4567;
const CHUNK: usize = 1 << 20;
const SIOCSIFADDR: u64 = 0x8916;
const SIOCSIFNETMASK: u64 = 0x891c;
const SIOCSIFFLAGS: u64 = 0x8914;

extern "C" {
    fn mount(
        src: *const i8,
        target: *const i8,
        fstype: *const i8,
        flags: u64,
        data: *const u8,
    ) -> i32;
    fn open(path: *const i8, flags: i32, mode: u32) -> i32;
    fn read(fd: i32, buf: *mut u8, len: usize) -> isize;
    fn write(fd: i32, buf: *const u8, len: usize) -> isize;
    fn fsync(fd: i32) -> i32;
    fn close(fd: i32) -> i32;
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn ioctl(fd: i32, req: u64, arg: *mut IfReq) -> i32;
    fn reboot(cmd: i32) -> i32;
    fn sync();
}

/// `struct ifreq` with the address/flags union as raw bytes.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

fn say(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "MVM-BENCH {line}");
    let _ = out.flush();
}

fn param(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn mbps(bytes: usize, took: Duration) -> String {
    // Bytes per microsecond is MB/s (10^6 bytes per second).
    let us = took.as_micros().max(1);
    let milli = (bytes as u128) * 1000 / us;
    format!("{}.{:03}", milli / 1000, milli % 1000)
}

fn mnt(src: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (
        CString::new(src).unwrap_or_default(),
        CString::new(target).unwrap_or_default(),
        CString::new(fstype).unwrap_or_default(),
    );
    // SAFETY: valid C strings; null data.
    unsafe { mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
}

/// Reads (`writing` false) or writes `total` bytes of /dev/vda with O_DIRECT; returns the time.
fn block_pass(buf: *mut u8, total: usize, writing: bool) -> Result<Duration, String> {
    let dev = CString::new("/dev/vda").unwrap_or_default();
    let flags = O_DIRECT | if writing { O_WRONLY } else { O_RDONLY };
    // SAFETY: a valid C string.
    let fd = unsafe { open(dev.as_ptr(), flags, 0) };
    if fd < 0 {
        return Err(format!("open: {}", std::io::Error::last_os_error()));
    }
    let start = Instant::now();
    let mut done = 0;
    while done < total {
        // SAFETY: `buf` is a live, 4096-aligned allocation of CHUNK bytes.
        let n = unsafe {
            if writing {
                write(fd, buf, CHUNK)
            } else {
                read(fd, buf, CHUNK)
            }
        };
        if n <= 0 {
            // SAFETY: closing the descriptor opened above.
            unsafe { close(fd) };
            return Err(format!(
                "at byte {done}: {}",
                std::io::Error::last_os_error()
            ));
        }
        done += usize::try_from(n).unwrap_or(0);
    }
    // SAFETY: fsync/close on the descriptor opened above.
    let synced = unsafe { fsync(fd) == 0 && close(fd) == 0 };
    if !synced {
        return Err(format!("fsync: {}", std::io::Error::last_os_error()));
    }
    Ok(start.elapsed())
}

fn block(mib: usize) {
    let Ok(layout) = Layout::from_size_align(CHUNK, 4096) else {
        return;
    };
    // SAFETY: the layout has a non-zero size.
    let buf = unsafe { alloc_zeroed(layout) };
    if buf.is_null() {
        say("block error=out of memory");
        return;
    }
    let total = mib * CHUNK;
    for (name, writing) in [("read", false), ("write", true)] {
        match block_pass(buf, total, writing) {
            Ok(t) => say(&format!(
                "block-{name} mbps={} bytes={total} us={}",
                mbps(total, t),
                t.as_micros()
            )),
            Err(e) => say(&format!("block-{name} error={e}")),
        }
    }
}

fn ifreq(data: &[u8]) -> IfReq {
    let mut r = IfReq {
        name: [0; 16],
        data: [0; 24],
    };
    r.name[..4].copy_from_slice(b"eth0");
    r.data[..data.len()].copy_from_slice(data);
    r
}

fn sockaddr(ip: [u8; 4]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a[..2].copy_from_slice(&2u16.to_ne_bytes()); // AF_INET
    a[4..].copy_from_slice(&ip);
    a
}

/// Gives `eth0` `ip`/24 and brings it up.
fn eth0_up(ip: [u8; 4]) -> bool {
    // SAFETY: ioctls on a datagram socket with ifreqs we own.
    unsafe {
        let fd = socket(2, 2, 0);
        let a = ioctl(fd, SIOCSIFADDR, &mut ifreq(&sockaddr(ip)));
        let m = ioctl(
            fd,
            SIOCSIFNETMASK,
            &mut ifreq(&sockaddr([255, 255, 255, 0])),
        );
        let u = ioctl(fd, SIOCSIFFLAGS, &mut ifreq(&0x1i16.to_ne_bytes()));
        close(fd);
        a == 0 && m == 0 && u == 0
    }
}

fn connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let addr = format!("{host}:{port}")
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad bench_host"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(e),
        }
    }
}

fn net_send(host: &str, total: usize) -> std::io::Result<Duration> {
    let mut conn = connect(host, 7001)?;
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        conn.write_all(&chunk[..n])?;
        sent += n;
    }
    conn.shutdown(Shutdown::Write)?;
    // The host closes once it has read everything: then every byte has arrived.
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)?;
    Ok(start.elapsed())
}

fn net_recv(host: &str) -> std::io::Result<(usize, Duration)> {
    let mut conn = connect(host, 7002)?;
    let mut chunk = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let mut got = 0;
    loop {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok((got, start.elapsed()));
        }
        got += n;
    }
}

fn net(mib: usize) {
    let ip: Vec<u8> = param("bench_ip", "172.30.98.2")
        .split('.')
        .filter_map(|p| p.parse().ok())
        .collect();
    let Ok(ip) = <[u8; 4]>::try_from(ip) else {
        say("net error=bad bench_ip");
        return;
    };
    if !eth0_up(ip) {
        say("net error=eth0 setup failed");
        return;
    }
    let host = param("bench_host", "172.30.98.1");
    let total = mib * CHUNK;
    match net_send(&host, total) {
        Ok(t) => say(&format!(
            "net-tx mbps={} bytes={total} us={}",
            mbps(total, t),
            t.as_micros()
        )),
        Err(e) => say(&format!("net-tx error={e}")),
    }
    match net_recv(&host) {
        Ok((got, t)) => say(&format!(
            "net-rx mbps={} bytes={got} us={}",
            mbps(got, t),
            t.as_micros()
        )),
        Err(e) => say(&format!("net-rx error={e}")),
    }
}

fn main() {
    mnt("proc", "/proc", "proc");
    mnt("sysfs", "/sys", "sysfs");
    mnt("devtmpfs", "/dev", "devtmpfs");
    say("start");
    block(param("bench_mib", "256").parse().unwrap_or(256));
    net(param("net_mib", "64").parse().unwrap_or(64));
    say("done");
    // SAFETY: sync and reboot take no pointers; as PID 1 reboot ends the VM.
    unsafe {
        sync();
        reboot(RB_AUTOBOOT);
    }
}
