//! `/init` for the Linux-guest device test (tests/linux_devices.rs): uses each virtio device the
//! way a guest program would and prints one `MVM-DEV` line per result, then reboots.
//!
//! - block: mounts /dev/vda (ext4, read-only), prints /mnt/payload, checks a write fails
//! - rng: reads 32 bytes from /dev/hwrng
//! - vsock: connects to the host (CID 2) port 5000 and prints the reply; then listens on port
//!   6000, answers one host connection with the line it got, upper-cased.
//! Built static by the test with plain rustc (no crates): the few libc calls are declared here.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const MS_RDONLY: u64 = 1;
const RB_AUTOBOOT: i32 = 0x0123_4567;

#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved: u16,
    port: u32,
    cid: u32,
    zero: [u8; 4],
}

extern "C" {
    fn mount(src: *const i8, target: *const i8, fstype: *const i8, flags: u64, data: *const u8)
        -> i32;
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn listen(fd: i32, backlog: i32) -> i32;
    fn accept(fd: i32, addr: *mut u8, len: *mut u32) -> i32;
    fn reboot(cmd: i32) -> i32;
    fn ioctl(fd: i32, req: u64, arg: *mut IfReq) -> i32;
    fn sync();
}

fn say(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "MVM-DEV {line}");
    let _ = out.flush();
}

fn mnt(src: &str, target: &str, fstype: &str, flags: u64) -> bool {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (
        CString::new(src).unwrap_or_default(),
        CString::new(target).unwrap_or_default(),
        CString::new(fstype).unwrap_or_default(),
    );
    // SAFETY: valid C strings; null data.
    unsafe { mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, std::ptr::null()) == 0 }
}

fn addr(cid: u32, port: u32) -> SockaddrVm {
    SockaddrVm {
        family: AF_VSOCK as u16,
        reserved: 0,
        port,
        cid,
        zero: [0; 4],
    }
}

fn vsock_connect(port: u32) -> Option<File> {
    // SAFETY: plain socket/connect calls on a valid address.
    unsafe {
        let fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        let a = addr(2, port);
        if fd < 0 || connect(fd, &a, 16) != 0 {
            return None;
        }
        Some(File::from_raw_fd(fd))
    }
}

fn vsock_accept_one(port: u32) -> Option<File> {
    // SAFETY: plain socket/bind/listen/accept calls on a valid address.
    unsafe {
        let fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        let a = addr(u32::MAX, port);
        if fd < 0 || bind(fd, &a, 16) != 0 || listen(fd, 1) != 0 {
            return None;
        }
        say("vsock listening port=6000");
        let c = accept(fd, std::ptr::null_mut(), std::ptr::null_mut());
        (c >= 0).then(|| File::from_raw_fd(c))
    }
}

/// `struct ifreq` with the address/flags union as 16 raw bytes.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

const SIOCSIFADDR: u64 = 0x8916;
const SIOCSIFNETMASK: u64 = 0x891c;
const SIOCSIFFLAGS: u64 = 0x8914;

fn ifreq(name: &str) -> IfReq {
    let mut r = IfReq {
        name: [0; 16],
        data: [0; 24],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    r
}

fn sockaddr_in(r: &mut IfReq, ip: [u8; 4]) {
    r.data[..2].copy_from_slice(&2u16.to_ne_bytes()); // AF_INET
    r.data[4..8].copy_from_slice(&ip);
}

/// Gives `eth0` an address and brings it up.
fn eth0_up(ip: [u8; 4], mask: [u8; 4]) -> bool {
    // SAFETY: ioctls on a datagram socket with a valid ifreq we own.
    unsafe {
        let fd = socket(2, 2, 0);
        let mut r = ifreq("eth0");
        sockaddr_in(&mut r, ip);
        let a = ioctl(fd, SIOCSIFADDR, &mut r);
        let mut r = ifreq("eth0");
        sockaddr_in(&mut r, mask);
        let m = ioctl(fd, SIOCSIFNETMASK, &mut r);
        let mut r = ifreq("eth0");
        r.data[..2].copy_from_slice(&0x1i16.to_ne_bytes()); // IFF_UP
        let u = ioctl(fd, SIOCSIFFLAGS, &mut r);
        a == 0 && m == 0 && u == 0
    }
}

fn main() {
    mnt("proc", "/proc", "proc", 0);
    mnt("sysfs", "/sys", "sysfs", 0);
    mnt("devtmpfs", "/dev", "devtmpfs", 0);

    if mnt("/dev/vda", "/mnt", "ext4", MS_RDONLY) {
        let payload = std::fs::read_to_string("/mnt/payload").unwrap_or_default();
        say(&format!("block payload={}", payload.trim()));
        let refused = File::create("/mnt/new").is_err();
        say(&format!("block write-refused={refused}"));
    } else {
        say("block mount-failed");
    }

    if eth0_up([172, 30, 99, 2], [255, 255, 255, 252]) {
        let reply = std::net::TcpStream::connect_timeout(
            &"172.30.99.1:7000".parse().expect("address"),
            std::time::Duration::from_secs(20),
        )
        .and_then(|mut c| {
            c.write_all(b"hello over the tap\n")?;
            let mut line = String::new();
            BufReader::new(c).read_line(&mut line)?;
            Ok(line)
        });
        match reply {
            Ok(line) => say(&format!("net host-replied={}", line.trim())),
            Err(e) => say(&format!("net error={e}")),
        }
    } else {
        say("net eth0-setup-failed");
    }

    let mut rng = [0u8; 32];
    match File::open("/dev/hwrng").and_then(|mut f| f.read_exact(&mut rng)) {
        Ok(()) => {
            let hex: String = rng.iter().map(|b| format!("{b:02x}")).collect();
            say(&format!("rng bytes={hex}"));
        }
        Err(e) => say(&format!("rng error={e}")),
    }

    match vsock_connect(5000) {
        Some(mut conn) => {
            let _ = conn.write_all(b"ping from guest\n");
            let mut line = String::new();
            let _ = BufReader::new(conn).read_line(&mut line);
            say(&format!("vsock host-replied={}", line.trim()));
        }
        None => say("vsock connect-failed"),
    }

    if let Some(conn) = vsock_accept_one(6000) {
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let mut conn = reader.into_inner();
        let _ = conn.write_all(line.to_uppercase().as_bytes());
        say(&format!("vsock guest-got={}", line.trim()));
    }

    // SAFETY: sync and reboot take no pointers; as PID 1 reboot resets the VM.
    unsafe {
        sync();
        reboot(RB_AUTOBOOT);
    }
}
