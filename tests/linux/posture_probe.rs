//! A tiny static program the container tests put into a container to try what busybox cannot:
//!
//! - `posture_probe tiocsti`: tries to push `echo INJECTED` into the terminal's input queue
//!   (TIOCSTI) through stdin, stdout, stderr and /dev/tty. Prints one line per attempt and exits
//!   1 if any attempt worked, 0 if all were refused.
//! - `posture_probe ids`: prints `uid=U euid=E` (run setuid root, it shows whether setuid works).
//!
//! Built by the tests with `rustc --edition 2021 -C target-feature=+crt-static -O`.

use std::ffi::{c_int, c_ulong, c_void};
use std::os::fd::AsRawFd;

extern "C" {
    fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
    fn getuid() -> u32;
    fn geteuid() -> u32;
}

const TIOCSTI: c_ulong = 0x5412;

/// Pushes `text` into the input of the terminal behind `fd`; the errno of the first failure.
fn push(fd: c_int, text: &[u8]) -> Result<(), i32> {
    for b in text {
        // SAFETY: TIOCSTI reads one byte through the pointer, which points at a live byte.
        let r = unsafe { ioctl(fd, TIOCSTI, std::ptr::from_ref(b).cast::<c_void>()) };
        if r < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
    }
    Ok(())
}

fn tiocsti() -> i32 {
    let text = b"echo INJECTED\n";
    let mut worked = false;
    for (name, fd) in [("stdin", 0), ("stdout", 1), ("stderr", 2)] {
        match push(fd, text) {
            Ok(()) => {
                worked = true;
                println!("{name}: injected");
            }
            Err(e) => println!("{name}: refused (errno {e})"),
        }
    }
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty") {
        Ok(tty) => match push(tty.as_raw_fd(), text) {
            Ok(()) => {
                worked = true;
                println!("/dev/tty: injected");
            }
            Err(e) => println!("/dev/tty: refused (errno {e})"),
        },
        Err(e) => println!("/dev/tty: cannot open ({e})"),
    }
    i32::from(worked)
}

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let code = match arg.as_str() {
        "tiocsti" => tiocsti(),
        "ids" => {
            // SAFETY: getuid and geteuid have no preconditions.
            let (uid, euid) = unsafe { (getuid(), geteuid()) };
            println!("uid={uid} euid={euid}");
            0
        }
        _ => {
            eprintln!("usage: posture_probe tiocsti|ids");
            2
        }
    };
    std::process::exit(code);
}
