//! PID 1 of the Linux-guest tests (tests/linux_guest.rs): a tiny static program that reports
//! what the guest sees on the console and ends the VM.
//!
//! It mounts sysfs, prints one line
//! `MVM-GUEST-INIT online=<cpu list> cpus=<n> release=<uname -r>` on /dev/console, and then
//! reboots (with `reboot=k` the kernel resets through the i8042 port and mvm exits 0). Given the
//! arguments `exit N` (kernel command line `... -- exit N`) it prints `MVM-GUEST-INIT exiting N`
//! and returns N instead, so the kernel panics with "Attempted to kill init".
//!
//! Built by the test with `rustc --edition 2021 -C target-feature=+crt-static -C panic=abort -O`.

use std::ffi::{c_char, c_int, c_ulong, c_void, CStr};
use std::fs::OpenOptions;
use std::io::Write;

/// `struct utsname` as glibc defines it on Linux.
#[repr(C)]
struct Utsname {
    sysname: [c_char; 65],
    nodename: [c_char; 65],
    release: [c_char; 65],
    version: [c_char; 65],
    machine: [c_char; 65],
    domainname: [c_char; 65],
}

extern "C" {
    fn uname(buf: *mut Utsname) -> c_int;
    fn mount(
        source: *const c_char,
        target: *const c_char,
        fstype: *const c_char,
        flags: c_ulong,
        data: *const c_void,
    ) -> c_int;
    fn reboot(howto: c_int) -> c_int;
}

/// `RB_AUTOBOOT`: restart the machine now.
const RB_AUTOBOOT: c_int = 0x0123_4567;

fn console() -> Box<dyn Write> {
    match OpenOptions::new().write(true).open("/dev/console") {
        Ok(f) => Box::new(f),
        Err(_) => Box::new(std::io::stdout()),
    }
}

fn kernel_release() -> String {
    let mut u = Utsname {
        sysname: [0; 65],
        nodename: [0; 65],
        release: [0; 65],
        version: [0; 65],
        machine: [0; 65],
        domainname: [0; 65],
    };
    // SAFETY: `u` is a writable utsname of the layout glibc expects; uname only writes into it.
    if unsafe { uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: the kernel NUL-terminates every utsname field within its 65 bytes.
    unsafe { CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn online_cpus() -> String {
    let none = std::ptr::null::<c_void>();
    // SAFETY: all strings are NUL-terminated literals and sysfs takes no data; a failure only
    // means the read below fails too.
    unsafe {
        mount(
            c"sysfs".as_ptr(),
            c"/sys".as_ptr(),
            c"sysfs".as_ptr(),
            0,
            none,
        )
    };
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unreadable({e})"))
}

fn main() {
    let mut out = console();
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The kernel puts the words of its command line it does not know (e.g. `nokaslr`) first.
    if let Some(at) = args.iter().position(|a| a == "exit") {
        let code: i32 = args.get(at + 1).and_then(|c| c.parse().ok()).unwrap_or(1);
        let _ = writeln!(out, "MVM-GUEST-INIT exiting {code}");
        let _ = out.flush();
        std::process::exit(code);
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        out,
        "MVM-GUEST-INIT online={} cpus={} release={}",
        online_cpus(),
        cpus,
        kernel_release()
    );
    let _ = out.flush();
    // SAFETY: PID 1 asking the kernel to restart; nothing in this process needs to survive it.
    unsafe { reboot(RB_AUTOBOOT) };
    // Only reached if reboot failed: exit so the kernel panics and the test sees a failure.
    let _ = writeln!(out, "MVM-GUEST-INIT reboot failed");
    std::process::exit(99);
}
