//! `/init` of the snapshot tests (tests/snapshot.rs): keeps counting, in memory and in a file,
//! and says so on the console once per `tick_ms` (kernel command line, default 500), with 8
//! bytes it read from /dev/urandom and the wall clock:
//!
//! `MVM-SNAP tick=<n> file=<n> urandom=<16 hex> time=<seconds since the epoch>`
//!
//! A VM restored from a snapshot of it goes on from where it was saved: the next tick is one
//! more, in memory and in the file. It never ends by itself (the test stops the VM).
//!
//! Built static by the test with plain rustc (no crates).

use std::ffi::CString;
use std::io::{Read, Write};
use std::time::Duration;

extern "C" {
    fn mount(
        src: *const i8,
        target: *const i8,
        fstype: *const i8,
        flags: u64,
        data: *const u8,
    ) -> i32;
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

fn main() {
    mnt("devtmpfs", "/dev", "devtmpfs");
    mnt("tmpfs", "/run", "tmpfs");
    let tick_ms: u64 = std::env::var("tick_ms")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/console")
        .expect("console");
    let mut tick: u64 = 0;
    loop {
        tick += 1;
        let file = std::fs::read_to_string("/run/counter")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        let _ = std::fs::write("/run/counter", file.to_string());
        let mut bytes = [0u8; 8];
        let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let _ = writeln!(out, "MVM-SNAP tick={tick} file={file} urandom={hex} time={time}");
        std::thread::sleep(Duration::from_millis(tick_ms));
    }
}
