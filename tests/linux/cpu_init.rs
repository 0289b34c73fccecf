//! PID 1 of tests/cpu_features.rs: reports the CPU the guest sees and whether a program built
//! for x86-64-v2 may run on it, then ends the VM.
//!
//! It mounts /proc and prints, on /dev/console:
//! - `MVM-CPU flags=<the flags line of /proc/cpuinfo, spaces as commas>`
//! - `MVM-CPU cpuid=<leaf 1 ecx>,<leaf 7.0 ebx>,<leaf 0xd.0 eax>` (hex): what the CPUID
//!   instruction returns in the guest, i.e. what the VMM configured, before the guest kernel
//!   decides what it can use
//! - `MVM-CPU x86-64-v2=ok` when CPUID reports every feature that level needs (as glibc's loader
//!   checks before it runs a program built for it: cmpxchg16b, popcnt, sse3, ssse3, sse4.1,
//!   sse4.2, lahf/sahf), after running popcnt and cmpxchg16b once; else
//!   `MVM-CPU x86-64-v2=missing:<features>` (glibc: "CPU does not support x86-64-v2").
//!
//! Then it reboots (with `reboot=k` the kernel resets through the i8042 and mvm exits 0).
//! Built by the test with `-C target-cpu=x86-64-v2`, so the compiler may use those instructions
//! anywhere.

use std::ffi::{c_char, c_int, c_ulong, c_void};
use std::fs::OpenOptions;
use std::io::Write;

extern "C" {
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

/// The x86-64-v2 features CPUID does not report.
fn missing_v2_features() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !std::arch::is_x86_feature_detected!("cmpxchg16b") {
        missing.push("cx16");
    }
    if !std::arch::is_x86_feature_detected!("popcnt") {
        missing.push("popcnt");
    }
    if !std::arch::is_x86_feature_detected!("sse3") {
        missing.push("sse3");
    }
    if !std::arch::is_x86_feature_detected!("ssse3") {
        missing.push("ssse3");
    }
    if !std::arch::is_x86_feature_detected!("sse4.1") {
        missing.push("sse4_1");
    }
    if !std::arch::is_x86_feature_detected!("sse4.2") {
        missing.push("sse4_2");
    }
    // lahf/sahf in 64-bit mode: CPUID 0x8000_0001 ECX[0].
    let ext = std::arch::x86_64::__cpuid(0x8000_0001);
    if ext.ecx & 1 == 0 {
        missing.push("lahf_lm");
    }
    missing
}

/// Runs popcnt and cmpxchg16b once; returns whether both gave the expected results.
fn run_v2_instructions() -> bool {
    let value: u64 = std::hint::black_box(0xf0f0_0000_0000_0101);
    let ones: u64;
    // SAFETY: popcnt reads a register and writes another; the caller checked CPUID for it.
    unsafe { std::arch::asm!("popcnt {0}, {1}", out(reg) ones, in(reg) value) };
    #[repr(C, align(16))]
    struct Pair([u64; 2]);
    let mut slot = Pair([1, 2]);
    let ptr: *mut Pair = &mut slot;
    let (mut old_lo, mut old_hi) = (1u64, 2u64);
    // SAFETY: `slot` is 16-byte aligned and lives across the instruction; rbx is saved and
    // restored around it since LLVM reserves it.
    unsafe {
        std::arch::asm!(
            "xchg {new_lo}, rbx",
            "lock cmpxchg16b [{ptr}]",
            "xchg {new_lo}, rbx",
            ptr = in(reg) ptr,
            new_lo = inout(reg) 3u64 => _,
            in("rcx") 4u64,
            inout("rax") old_lo,
            inout("rdx") old_hi,
        );
    }
    ones == 10 && (old_lo, old_hi) == (1, 2) && slot.0 == [3, 4]
}

fn main() {
    let pid1 = std::process::id() == 1;
    let mut out = console();
    // Only as the guest's PID 1: anywhere else this program just reports.
    if pid1 {
        // SAFETY: the strings are NUL-terminated literals; mount reads them only during the call.
        unsafe {
            mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                0,
                std::ptr::null(),
            );
        }
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect::<Vec<_>>().join(","))
        .unwrap_or_default();
    let _ = writeln!(out, "MVM-CPU flags={flags}");
    let l1 = std::arch::x86_64::__cpuid(1);
    let l7 = std::arch::x86_64::__cpuid_count(7, 0);
    let ld = std::arch::x86_64::__cpuid_count(0xd, 0);
    let _ = writeln!(out, "MVM-CPU cpuid={:x},{:x},{:x}", l1.ecx, l7.ebx, ld.eax);
    let missing = missing_v2_features();
    if missing.is_empty() {
        let ran = run_v2_instructions();
        let _ = writeln!(
            out,
            "MVM-CPU x86-64-v2={}",
            if ran { "ok" } else { "wrong-results" }
        );
    } else {
        let _ = writeln!(out, "MVM-CPU x86-64-v2=missing:{}", missing.join(","));
    }
    let _ = out.flush();
    if pid1 {
        // SAFETY: reboot(2) with RB_AUTOBOOT only restarts the (guest) machine.
        unsafe {
            reboot(RB_AUTOBOOT);
        }
    }
}
