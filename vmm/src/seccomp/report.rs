//! What happens when a thread makes a system call its filter forbids: the kernel traps it with
//! SIGSYS; the handler writes one line to stderr naming the call and the thread, and the
//! process dies of SIGSYS. The handler only formats into a stack buffer and makes calls every
//! filter allows (`write`, `getpid`, `gettid`, `tgkill` with SIGSYS); it is installed with
//! `SA_RESETHAND`, so the signal it sends itself takes the default action. A process that is
//! PID 1 of its pid namespace (a jailed VMM) ignores that signal; every thread's filters
//! therefore kill the process outright when it raises SIGSYS (`Filter::kill`).

use std::cell::Cell;
use std::io;

use super::ThreadKind;

thread_local! {
    /// The kind of filter this thread installed (index into `ThreadKind::ALL` plus one; 0: none).
    static KIND: Cell<u8> = const { Cell::new(0) };
    /// This thread's name (`vcpu0`, `control`, ...), NUL-padded.
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Remembers what the calling thread is, for the report.
pub(super) fn label_thread(kind: ThreadKind) {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    NAME.with(|n| n.set(name));
    KIND.with(|k| k.set(u8::try_from(kind as usize + 1).unwrap_or(0)));
}

/// The kind of filter the calling thread installed, if any.
pub(super) fn thread_kind() -> Option<ThreadKind> {
    let k = KIND.with(Cell::get);
    ThreadKind::ALL.get(usize::from(k).checked_sub(1)?).copied()
}

/// The fields of a SIGSYS `siginfo_t` on x86_64 (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

/// A fixed buffer a line is formatted into without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_num(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + u8::try_from(n % 10).unwrap_or(0);
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The report line for a forbidden call `nr` on thread `name` of kind `kind`.
fn compose(kind: Option<ThreadKind>, name: &[u8], nr: i64) -> Line {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"mvm: the VMM's ");
    line.push(kind.map_or("unconfined", ThreadKind::name).as_bytes());
    line.push(b" thread");
    let name = name.split(|b| *b == 0).next().unwrap_or_default();
    if !name.is_empty() {
        line.push(b" '");
        line.push(name);
        line.push(b"'");
    }
    line.push(b" made a forbidden system call, ");
    match super::syscall_name(nr) {
        Some(n) => line.push(n.as_bytes()),
        None => line.push(b"unknown"),
    }
    line.push(b" (");
    line.push_num(nr.unsigned_abs());
    line.push(b"): its seccomp filter killed the VMM\n");
    line
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, whose layout `SigsysInfo` follows.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let line = compose(thread_kind(), &NAME.with(Cell::get), i64::from(nr));
    // SAFETY: write, getpid, gettid and tgkill are async-signal-safe and every filter allows
    // them; the buffer lives on this stack. SA_RESETHAND made SIGSYS's action the default, so
    // the signal ends the process; where it would not (PID 1), the filter kills it first.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
    }
}

/// Installs the SIGSYS handler and turns core dumps off.
pub(super) fn install() -> io::Result<()> {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature and only
    // does async-signal-safe work.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigsys;
        act.sa_sigaction = handler as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER | libc::SA_ONSTACK;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(l: &Line) -> String {
        String::from_utf8(l.buf[..l.len].to_vec()).unwrap()
    }

    #[test]
    fn the_report_is_one_line_naming_the_call_and_the_thread() {
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu1");
        let l = compose(Some(ThreadKind::Vcpu), &name, 83);
        assert_eq!(
            text(&l),
            "mvm: the VMM's vcpu thread 'vcpu1' made a forbidden system call, mkdir (83): \
             its seccomp filter killed the VMM\n"
        );
        let l = compose(None, &[0; 16], 100_000);
        assert!(
            text(&l).contains("unconfined thread made a forbidden system call, unknown (100000)")
        );
    }
}
