//! SIGINT and SIGTERM in a process that runs VMs: one handler for both, installed once, for
//! `mvm boot`, `mvm run` and its background runner alike.
//!
//! The handler only records the signal. While a VM runs it also wakes the VM's event loop
//! through the VM's exit eventfd, and the loop ends the VM with `VmExit::Signal`. Before a VM
//! runs (while a run is being prepared), the caller asks [`received`] and stops on its own.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

/// The eventfd the handler writes to (-1: none).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The last SIGINT/SIGTERM received and not yet taken (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// Writes 1 to an eventfd, from the handler or from [`wake`].
fn poke(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer and `fd` is a VM's
    // exit eventfd, kept open while it is registered (see `wake`).
    let _ = unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
}

extern "C" fn on_terminate(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    RECEIVED.store(num, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        poke(fd);
    }
}

/// Installs the handler for SIGINT and SIGTERM (installing it again changes nothing).
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_terminate) {
            log::warn!("cannot handle signal {sig}: {e}");
        }
    }
}

/// The SIGINT or SIGTERM received since [`install`] and not yet taken by a VM, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}

/// Takes the signal received, if any (the VM's event loop ends the VM with it).
pub(crate) fn take() -> Option<i32> {
    match RECEIVED.swap(0, Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}

/// Routes the signals to the exit eventfd `fd` of a VM about to run, and installs the handler.
/// A signal that arrived before (while the VM was being built) wakes it at once. `fd` must stay
/// open until [`stop_waking`].
pub(crate) fn wake(fd: RawFd) {
    WAKE_FD.store(fd, Ordering::SeqCst);
    install();
    if received().is_some() {
        poke(fd);
    }
}

/// Stops routing signals to a VM (the handler stays, recording them).
pub(crate) fn stop_waking() {
    WAKE_FD.store(-1, Ordering::SeqCst);
}
