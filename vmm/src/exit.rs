//! Why a VM ended, the exit code mvm gives it, and the shared record every part of the VMM
//! (vCPUs, i8042, the serial console's panic watcher, signals, stop handles) reports to.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// What the Linux kernel prints when it panics.
const PANIC_MARKER: &str = "Kernel panic - not syncing: ";
/// What it prints once the panic report is complete.
const PANIC_END_MARKER: &str = "---[ end Kernel panic";
/// Longest console line the watcher keeps.
const MAX_LINE: usize = 1024;

/// The advice given when KVM cannot emulate the guest on a host without VT-x/AMD-V.
pub const NO_HW_VIRT_HINT: &str = "no hardware virtualization on this host: use a PVM-enabled guest kernel, or a host with VT-x/AMD-V";

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself (reboot through the i8042, or a shutdown after a reset request):
    /// the normal end of a VM.
    Reset,
    /// Stopped through a [`VmHandle`].
    Stopped,
    /// mvm received this signal (SIGINT, SIGTERM).
    Signal(i32),
    /// The guest kernel panicked with this reason.
    GuestPanic(String),
    /// A vCPU hit a triple fault (KVM_EXIT_SHUTDOWN without a reset request).
    TripleFault {
        /// The vCPU.
        cpu: u8,
    },
    /// KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY).
    FailEntry {
        /// The vCPU.
        cpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// KVM_EXIT_INTERNAL_ERROR, usually an instruction KVM could not emulate.
    InternalError {
        /// The vCPU.
        cpu: u8,
        /// KVM's suberror (1 = emulation failure).
        suberror: u32,
        /// Guest RIP.
        rip: u64,
        /// The instruction bytes at RIP, when they could be read.
        insn: Vec<u8>,
        /// Whether the host has VT-x/AMD-V (if not, the hint explains the likely cause).
        hardware_virt: bool,
    },
    /// The guest signalled a crash through KVM_SYSTEM_EVENT_CRASH.
    GuestCrash {
        /// The vCPU.
        cpu: u8,
    },
    /// A vCPU failed in a way the guest cannot cause (a KVM ioctl error, an unknown exit).
    VcpuError {
        /// The vCPU.
        cpu: u8,
        /// What went wrong.
        message: String,
    },
    /// The VMM's event loop failed.
    EventLoop(String),
}

impl VmExit {
    /// The process exit code: 0 for a guest reset or a requested stop, 128 + n for signal n
    /// (like a shell), 1 for everything that went wrong.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reset | VmExit::Stopped => 0,
            VmExit::Signal(n) => 128 + n,
            _ => 1,
        }
    }

    /// Whether this is a failure worth one line on stderr.
    pub fn is_failure(&self) -> bool {
        self.exit_code() == 1
    }
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest reset"),
            VmExit::Stopped => write!(f, "VM stopped"),
            VmExit::Signal(n) => write!(f, "stopped by signal {n}"),
            VmExit::GuestPanic(reason) => write!(f, "guest kernel panicked: {reason}"),
            VmExit::TripleFault { cpu } => {
                write!(
                    f,
                    "guest triple fault on vCPU {cpu} (KVM_EXIT_SHUTDOWN without a reset request)"
                )
            }
            VmExit::FailEntry { cpu, reason } => {
                write!(f, "KVM could not enter the guest on vCPU {cpu} (hardware entry failure reason {reason:#x})")
            }
            VmExit::InternalError {
                cpu,
                suberror,
                rip,
                insn,
                hardware_virt,
            } => {
                let what = if *suberror == 1 {
                    "emulation failure"
                } else {
                    "internal error"
                };
                let bytes = if insn.is_empty() {
                    "unreadable".to_string()
                } else {
                    hex_bytes(insn)
                };
                let hint = if *hardware_virt {
                    "the guest ran an instruction KVM cannot emulate"
                } else {
                    NO_HW_VIRT_HINT
                };
                write!(
                    f,
                    "KVM {what} (suberror {suberror}) on vCPU {cpu} at rip {rip:#x}, instruction bytes [{bytes}]: {hint}"
                )
            }
            VmExit::GuestCrash { cpu } => write!(f, "guest reported a crash on vCPU {cpu}"),
            VmExit::VcpuError { cpu, message } => write!(f, "vCPU {cpu} failed: {message}"),
            VmExit::EventLoop(message) => write!(f, "event loop failed: {message}"),
        }
    }
}

/// The shared record of how the VM ends. The first reason reported wins; a guest panic seen on
/// the console turns a later reset into [`VmExit::GuestPanic`].
#[derive(Debug)]
pub struct ExitState {
    reason: Mutex<Option<VmExit>>,
    panic: Mutex<Option<(String, Instant)>>,
    reset_requested: AtomicBool,
    evt: EventFd,
}

impl ExitState {
    /// A fresh record with its wake-up eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            panic: Mutex::new(None),
            reset_requested: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The eventfd written whenever a reason is recorded (the event loop waits on it).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Records why the VM ends (ignored if a reason is already recorded) and wakes the loop.
    pub fn record(&self, exit: VmExit) {
        {
            let mut reason = devices::bus::lock(&self.reason);
            if reason.is_some() {
                return;
            }
            log::debug!("VM exit: {exit}");
            *reason = Some(exit);
        }
        if let Err(e) = self.evt.write(1) {
            devices::warn_limited!("cannot wake the event loop: {e}");
        }
    }

    /// The guest asked for a reset: the VM ends normally.
    pub fn request_reset(&self) {
        self.reset_requested.store(true, Ordering::SeqCst);
        self.record(VmExit::Reset);
    }

    /// Whether the guest asked for a reset (so a following KVM_EXIT_SHUTDOWN is not a fault).
    pub fn reset_requested(&self) -> bool {
        self.reset_requested.load(Ordering::SeqCst)
    }

    /// The console showed a kernel panic with `reason`.
    pub fn guest_panicked(&self, reason: String) {
        let mut panic = devices::bus::lock(&self.panic);
        if panic.is_none() {
            *panic = Some((reason, Instant::now()));
        }
    }

    /// The panic report is complete: end the VM now.
    pub fn panic_report_done(&self) {
        let reason = devices::bus::lock(&self.panic)
            .as_ref()
            .map(|p| p.0.clone());
        if let Some(reason) = reason {
            self.record(VmExit::GuestPanic(reason));
        }
    }

    /// Ends the VM if a panic was seen more than `grace` ago and the guest has not reset.
    pub fn check_panic_timeout(&self, grace: Duration) {
        let overdue = devices::bus::lock(&self.panic)
            .as_ref()
            .filter(|(_, at)| at.elapsed() >= grace)
            .map(|p| p.0.clone());
        if let Some(reason) = overdue {
            self.record(VmExit::GuestPanic(reason));
        }
    }

    /// The reason the VM ends, once one is recorded.
    pub fn exit(&self) -> Option<VmExit> {
        let reason = devices::bus::lock(&self.reason).clone()?;
        let panic = devices::bus::lock(&self.panic)
            .as_ref()
            .map(|p| p.0.clone());
        Some(match (reason, panic) {
            (VmExit::Reset | VmExit::TripleFault { .. }, Some(p)) => VmExit::GuestPanic(p),
            (r, _) => r,
        })
    }
}

/// Stops a VM from any thread (for `--timeout`, `mvm stop`, tests).
#[derive(Debug, Clone)]
pub struct VmHandle {
    state: Arc<ExitState>,
}

impl VmHandle {
    /// A handle on `state`.
    pub fn new(state: Arc<ExitState>) -> Self {
        Self { state }
    }

    /// Ends the VM; `wait` then returns [`VmExit::Stopped`] (unless it already ended).
    pub fn stop(&self) {
        self.state.record(VmExit::Stopped);
    }

    /// Ends the VM with a given reason.
    pub fn stop_with(&self, exit: VmExit) {
        self.state.record(exit);
    }

    /// Why the VM ended, if it has.
    pub fn exit(&self) -> Option<VmExit> {
        self.state.exit()
    }
}

/// A console writer that passes everything through and watches for the kernel's panic lines.
pub struct PanicWatcher<W: Write> {
    inner: W,
    line: Vec<u8>,
    state: Arc<ExitState>,
}

impl<W: Write> std::fmt::Debug for PanicWatcher<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PanicWatcher").finish_non_exhaustive()
    }
}

impl<W: Write> PanicWatcher<W> {
    /// Watches what is written to `inner` and reports panics to `state`.
    pub fn new(inner: W, state: Arc<ExitState>) -> Self {
        Self {
            inner,
            line: Vec::new(),
            state,
        }
    }

    fn end_of_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches('\r');
        // The closing line repeats the panic line, so look for it first.
        if text.contains(PANIC_END_MARKER) {
            self.state.panic_report_done();
        } else if let Some(pos) = text.find(PANIC_MARKER) {
            let reason = crate::console_log::printable(text[pos + PANIC_MARKER.len()..].trim());
            self.state.guest_panicked(reason);
        }
        self.line.clear();
    }
}

impl<W: Write> Write for PanicWatcher<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.end_of_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        // The console must keep working even if the output is gone (closed pipe).
        if let Err(e) = self.inner.write_all(buf) {
            log::debug!("console output failed: {e}");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_convention() {
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::Stopped.exit_code(), 0);
        assert_eq!(VmExit::Signal(2).exit_code(), 130);
        assert_eq!(VmExit::Signal(15).exit_code(), 143);
        assert_eq!(VmExit::GuestPanic("x".into()).exit_code(), 1);
        assert_eq!(VmExit::TripleFault { cpu: 0 }.exit_code(), 1);
    }

    #[test]
    fn internal_error_message_is_one_line_with_rip_bytes_and_hint() {
        let e = VmExit::InternalError {
            cpu: 0,
            suberror: 1,
            rip: 0xffff_ffff_8100_0000,
            insn: vec![0x0f, 0xc7, 0x0e],
            hardware_virt: false,
        };
        let msg = e.to_string();
        assert!(!msg.contains('\n'));
        assert!(msg.contains("rip 0xffffffff81000000"), "{msg}");
        assert!(msg.contains("[0f c7 0e]"), "{msg}");
        assert!(msg.ends_with(NO_HW_VIRT_HINT), "{msg}");
    }

    #[test]
    fn first_reason_wins_and_panic_overrides_reset() {
        let s = Arc::new(ExitState::new().unwrap());
        assert_eq!(s.exit(), None);
        s.record(VmExit::Stopped);
        s.record(VmExit::Reset);
        assert_eq!(s.exit(), Some(VmExit::Stopped));
        assert!(s.eventfd().read().unwrap() >= 1);

        let s = Arc::new(ExitState::new().unwrap());
        let mut w = PanicWatcher::new(Vec::new(), s.clone());
        w.write_all(b"[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n")
            .unwrap();
        assert_eq!(s.exit(), None, "the report goes on after the panic line");
        s.request_reset();
        assert_eq!(
            s.exit(),
            Some(VmExit::GuestPanic("VFS: Unable to mount root fs".into()))
        );
        assert!(w.inner.starts_with(b"[ 1.0] Kernel panic"));
    }

    #[test]
    fn a_guest_panic_reason_carries_no_terminal_escapes() {
        let s = Arc::new(ExitState::new().unwrap());
        let mut w = PanicWatcher::new(io::sink(), s.clone());
        w.write_all(b"Kernel panic - not syncing: \x1b]0;owned\x07x\n")
            .unwrap();
        w.write_all(b"---[ end Kernel panic ]---\n").unwrap();
        assert_eq!(
            s.exit(),
            Some(VmExit::GuestPanic("\\u{1b}]0;owned\\u{7}x".into()))
        );
    }

    #[test]
    fn panic_report_end_or_timeout_ends_the_vm() {
        let s = Arc::new(ExitState::new().unwrap());
        let mut w = PanicWatcher::new(io::sink(), s.clone());
        w.write_all(b"Kernel panic - not syncing: Attempted to kill init!\n")
            .unwrap();
        w.write_all(b"---[ end Kernel panic - not syncing: Attempted to kill init! ]---\n")
            .unwrap();
        assert_eq!(
            s.exit(),
            Some(VmExit::GuestPanic("Attempted to kill init!".into()))
        );

        let s = Arc::new(ExitState::new().unwrap());
        let mut w = PanicWatcher::new(io::sink(), s.clone());
        w.write_all(b"Kernel panic - not syncing: oops\n").unwrap();
        s.check_panic_timeout(Duration::from_secs(3600));
        assert_eq!(s.exit(), None);
        s.check_panic_timeout(Duration::ZERO);
        assert_eq!(s.exit(), Some(VmExit::GuestPanic("oops".into())));
        // Ordinary lines and very long lines are harmless.
        w.write_all(&[b'x'; 5000]).unwrap();
        w.write_all(b"\nhello\n").unwrap();
    }
}
