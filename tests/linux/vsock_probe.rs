//! What a hostile container process in a microVM tries (tests/run_vm.rs): reach the guest
//! agent's vsock port 1024 through vsock loopback, once as root and once as uid 65534, at each
//! CID given on the command line (1 is loopback, 3 the guest's own CID). For each try it sends
//! the agent protocol's Hello and prints one line:
//!
//!     probe uid=<uid> cid=<cid> answered|closed|refused[ detail]
//!
//! `answered` means the agent spoke to it (the attack worked). Built static by the test with
//! plain rustc (no crates): the few libc calls are declared here.

use std::time::Duration;

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const SOL_SOCKET: i32 = 1;
const SO_RCVTIMEO: i32 = 20;
const MSG_NOSIGNAL: i32 = 0x4000;
const AGENT_PORT: u32 = 1024;

#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved: u16,
    port: u32,
    cid: u32,
    zero: [u8; 4],
}

#[repr(C)]
struct Timeval {
    sec: i64,
    usec: i64,
}

extern "C" {
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn setsockopt(fd: i32, level: i32, name: i32, val: *const Timeval, len: u32) -> i32;
    fn send(fd: i32, buf: *const u8, len: usize, flags: i32) -> isize;
    fn recv(fd: i32, buf: *mut u8, len: usize, flags: i32) -> isize;
    fn close(fd: i32) -> i32;
    fn getuid() -> u32;
    fn setgroups(n: usize, groups: *const u32) -> i32;
    fn setgid(gid: u32) -> i32;
    fn setuid(uid: u32) -> i32;
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// The agent protocol's Hello request: a 9-byte header (length, kind 1, stream 0) and JSON.
fn hello() -> Vec<u8> {
    let json = br#"{"op":"hello","version":1}"#;
    let mut frame = (json.len() as u32).to_be_bytes().to_vec();
    frame.push(1);
    frame.extend_from_slice(&0u32.to_be_bytes());
    frame.extend_from_slice(json);
    frame
}

fn try_agent(cid: u32) -> String {
    // SAFETY: plain socket calls on a descriptor this function owns and closes; every pointer
    // passed is to a live value of the size given.
    unsafe {
        let fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if fd < 0 {
            return format!("refused socket: {}", errno());
        }
        let addr = SockaddrVm {
            family: AF_VSOCK as u16,
            reserved: 0,
            port: AGENT_PORT,
            cid,
            zero: [0; 4],
        };
        let result = if connect(fd, &addr, std::mem::size_of::<SockaddrVm>() as u32) < 0 {
            format!("refused connect: {}", errno())
        } else {
            let timeout = Timeval { sec: 10, usec: 0 };
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, 16);
            let frame = hello();
            // Give the agent a moment to take the connection before writing into it.
            std::thread::sleep(Duration::from_millis(200));
            let sent = send(fd, frame.as_ptr(), frame.len(), MSG_NOSIGNAL);
            let mut buf = [0u8; 256];
            let got = recv(fd, buf.as_mut_ptr(), buf.len(), 0);
            if got > 0 {
                let got = got as usize;
                let text = String::from_utf8_lossy(&buf[got.min(9)..got]).into_owned();
                format!("answered {text}")
            } else if got == 0 {
                format!("closed (sent {sent})")
            } else {
                format!("closed ({})", errno())
            }
        };
        close(fd);
        result
    }
}

fn probe_all(cids: &[u32]) {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { getuid() };
    for &cid in cids {
        println!("probe uid={uid} cid={cid} {}", try_agent(cid));
    }
}

fn main() {
    let cids: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    probe_all(&cids);
    // SAFETY: plain credential calls; no memory is involved.
    let dropped = unsafe { setgroups(0, std::ptr::null()) == 0 && setgid(65534) == 0 && setuid(65534) == 0 };
    if !dropped {
        println!("probe cannot become uid 65534: {}", errno());
        std::process::exit(1);
    }
    probe_all(&cids);
}
