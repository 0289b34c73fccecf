//! Shared runtime for the mvm test guests: entry code (Linux 64-bit boot protocol, PVH, AP
//! trampoline), serial output, boot information, SMP start-up, reset, and a minimal virtio-mmio
//! driver core (`virtio`).
//!
//! A guest is one `NAME.rs` file next to this folder that declares `mod common;` and defines
//! `fn main(boot: &common::boot_info::BootInfo) -> !` at the crate root; `build.sh NAME OUTDIR`
//! compiles it. No floating point and no `core::fmt`: the code is built without SSE so that an
//! instruction emulator that only knows the general-purpose instructions can run all of it.

#[allow(dead_code)]
pub mod boot_info;
pub mod out;
#[allow(dead_code)]
pub mod smp;
#[allow(dead_code)]
pub mod virtio;

use core::arch::{asm, global_asm};

global_asm!(include_str!("entry.S"), options(att_syntax));

/// Entry kind passed by the assembly entry code: the Linux 64-bit boot protocol.
const KIND_LINUX: u64 = 1;
/// Entry kind passed by the assembly entry code: PVH (32-bit entry from the Xen ELF note).
const KIND_PVH: u64 = 2;

/// Called once by the entry code on the boot processor, in long mode on the guest's own stack,
/// GDT and page tables.
#[no_mangle]
extern "C" fn rust_start(kind: u64, info_paddr: u64) -> ! {
    let entry = match kind {
        KIND_LINUX => boot_info::EntryPath::Linux,
        KIND_PVH => boot_info::EntryPath::Pvh,
        _ => fail("unknown entry kind"),
    };
    out::line()
        .s("hello entry=")
        .s(entry.name())
        .s(" mode=64-bit")
        .end();
    let boot = boot_info::BootInfo::read(entry, info_paddr);
    crate::main(&boot)
}

/// Called by the entry code on every application processor that reached long mode.
#[no_mangle]
extern "C" fn rust_ap_start(index: u64) -> ! {
    smp::ap_checked_in(index);
    halt_forever()
}

/// Stops this processor for good (interrupts stay disabled).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli/hlt only stop this CPU; nothing else depends on it running.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Resets the machine through the i8042 controller (mvm treats it as power-off). A VMM stops
/// the vCPU on the write itself; machines without an i8042 (QEMU's microvm unless given
/// `-device i8042`) ignore it, and for them a triple fault follows at once, which resets too.
pub fn reset() -> ! {
    out::line().s("reset").end();
    // SAFETY: port 0x64 is the i8042 command port; 0xfe pulses the reset line.
    unsafe { outb(0x64, 0xfe) };
    out::line()
        .s("reset by i8042 did not happen, triple-faulting")
        .end();
    triple_fault()
}

/// Prints one failure line and halts without resetting.
pub fn fail(what: &str) -> ! {
    out::line().s("error ").s(what).end();
    halt_forever()
}

/// Provokes a triple fault: an empty IDT, then an invalid opcode. #UD cannot be delivered,
/// neither can the #DF that follows, so the processor shuts down.
pub fn triple_fault() -> ! {
    out::line().s("triple-fault now").end();
    let idtr = [0u16; 5];
    // SAFETY: loads a zero-limit IDT and executes ud2; the machine is meant to shut down here.
    unsafe {
        asm!("lidt [{0}]", "ud2", in(reg) idtr.as_ptr(), options(nostack, noreturn));
    }
}

/// Writes one byte to an I/O port.
///
/// # Safety
/// The caller must know what the device behind `port` does with the byte.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the port; `out` touches no memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

/// Reads one byte from an I/O port.
///
/// # Safety
/// The caller must know what reading `port` does to the device behind it.
#[allow(dead_code)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller vouches for the port; `in` touches no memory.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) };
    value
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Reads a value of type `T` from a guest-physical address (identity mapped below 4 GiB).
///
/// # Safety
/// `paddr` must be mapped, non-zero, and hold a `T`.
pub unsafe fn read_phys<T: Copy>(paddr: u64) -> T {
    // SAFETY: the caller guarantees the address is mapped and holds a T.
    unsafe { core::ptr::read_volatile(paddr as *const T) }
}

/// Writes a value of type `T` to a guest-physical address (identity mapped below 4 GiB).
///
/// # Safety
/// `paddr` must be mapped, non-zero, and writing there must not break anything in use.
pub unsafe fn write_phys<T: Copy>(paddr: u64, value: T) {
    // SAFETY: the caller guarantees the address is mapped and free to write.
    unsafe { core::ptr::write_volatile(paddr as *mut T, value) }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    fail("panic")
}

/// The precompiled `core` for the host target refers to the unwinding personality routine.
/// Nothing unwinds here (panic=abort, and the panic handler halts), so it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {
    fail("unwinding is not supported")
}

// Memory routines the compiler may call; string instructions, so no SSE and no recursion.

#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the compiler calls memcpy with valid, non-overlapping ranges of n bytes.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy from the last byte; ranges are valid per memmove's contract.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             inout("rcx") n => _, options(nostack));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the compiler calls memset with a valid range of n bytes.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") value as u8,
             options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: both ranges hold n readable bytes per memcmp's contract.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
