//! The code that runs in the container's first process, from the clone to `execve`.
//!
//! The parent prepares a [`ChildPlan`] (every string already a `CString`, every pointer array
//! built) so that this side only makes system calls: it is a copy of a possibly multi-threaded
//! program and must not allocate or take locks. Failures are reported to the parent as a
//! `(step, errno)` pair over a close-on-exec pipe; end-of-file on that pipe means the command
//! was executed.
//!
//! PID 1: by default the command itself (as Docker and crun do). With `init`, PID 1 stays this
//! runtime code: it starts the command as PID 2, forwards every catchable signal to it, reaps
//! every zombie, and exits with the command's status (128+signal when it was killed).

use std::ffi::CString;
use std::os::fd::RawFd;

use super::mounts::{self, RootMount};
use super::namespaces::{self, errno};
use super::security::Prepared;
use super::step::{trace, Fail, Step};

/// Everything the child needs, prepared by the parent.
#[derive(Debug)]
pub(crate) struct ChildPlan {
    pub root: RootMount,
    /// Bind mounts made inside the new root.
    pub mounts: Vec<mounts::VolumeMount>,
    pub hostname: CString,
    pub loopback: bool,
    pub cwd: CString,
    /// Paths to try with execve, in order (PATH lookup done by the parent).
    pub exec_candidates: Vec<CString>,
    /// Keep the CStrings alive behind `argv` / `envp`.
    pub _args: Vec<CString>,
    pub _env: Vec<CString>,
    /// NULL-terminated pointer arrays.
    pub argv: Vec<*const libc::c_char>,
    pub envp: Vec<*const libc::c_char>,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    /// Capabilities, no_new_privs and seccomp filters.
    pub posture: Prepared,
    /// `--userns`: id-mapped layers and the user namespace to join.
    pub idmapped: Option<mounts::IdMapped>,
    pub init: bool,
    /// Fds to put on 0, 1, 2 (None: inherit).
    pub stdio: [Option<RawFd>; 3],
    /// stdin is a terminal slave that becomes the new session's controlling terminal.
    pub controlling_terminal: bool,
    pub sync_read: RawFd,
    pub sync_write: RawFd,
    pub err_read: RawFd,
    pub err_write: RawFd,
}

fn report(fd: RawFd, f: Fail) -> ! {
    let b = f.encode();
    // SAFETY: writes 8 bytes from a local buffer.
    unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
    // SAFETY: ends the process without unwinding or running the parent's exit handlers.
    unsafe { libc::_exit(127) }
}

fn fail(step: Step) -> Fail {
    Fail {
        step,
        errno: errno(),
    }
}

/// Entry point of the cloned process. `arg` is a `*const ChildPlan`.
pub(crate) extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the parent passes a pointer to a ChildPlan that lives in our copy of its memory.
    let plan = unsafe { &*arg.cast::<ChildPlan>() };
    match setup(plan) {
        Ok(never) => match never {},
        Err(f) => report(plan.err_write, f),
    }
}

fn setup(plan: &ChildPlan) -> Result<std::convert::Infallible, Fail> {
    // SAFETY: closing our copy of the parent's pipe end; the fd is valid.
    unsafe { libc::close(plan.sync_write) };
    // SAFETY: as above.
    unsafe { libc::close(plan.err_read) };
    // Die with the runtime, so a killed runtime never leaves a container behind.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // Wait until the parent has put us in the cgroup.
    let mut b = [0u8; 1];
    // SAFETY: reads one byte into a local buffer.
    let n = unsafe { libc::read(plan.sync_read, b.as_mut_ptr().cast(), 1) };
    if n != 1 {
        return Err(Fail {
            step: Step::Sync,
            errno: if n < 0 { errno() } else { libc::EPIPE },
        });
    }
    // SAFETY: the fd is valid and no longer needed.
    unsafe { libc::close(plan.sync_read) };
    // A new session without a controlling terminal: whatever terminal the runtime has, the
    // container cannot push input into it (TIOCSTI) or signal its foreground job.
    trace(Step::Session);
    rustix::process::setsid().map_err(|e| Fail {
        step: Step::Session,
        errno: e.raw_os_error(),
    })?;

    for (target, fd) in plan.stdio.iter().enumerate() {
        if let Some(fd) = fd {
            let target = i32::try_from(target).unwrap_or(0);
            // SAFETY: dup2 onto 0..2 from an fd the parent opened for us.
            if unsafe { libc::dup2(*fd, target) } < 0 {
                return Err(fail(Step::Stdio));
            }
        }
    }
    if plan.controlling_terminal {
        // The new terminal the runtime opened (never the user's) becomes this session's.
        controlling_terminal().map_err(|errno| Fail {
            step: Step::Stdio,
            errno,
        })?;
    }

    // Nothing but stdio reaches the command: descriptors this runtime inherited without
    // close-on-exec (a terminal, a pipe of the caller) are closed when it executes.
    cloexec_above_stdio();

    mounts::enter_rootfs(&plan.root, &plan.mounts, plan.idmapped.as_ref())?;
    trace(Step::Hostname);
    namespaces::set_hostname(&plan.hostname).map_err(|e| Fail {
        step: Step::Hostname,
        errno: e,
    })?;
    if plan.loopback {
        namespaces::loopback_up().map_err(|e| Fail {
            step: Step::Loopback,
            errno: e,
        })?;
    }
    if let Some(m) = &plan.idmapped {
        // From here on container root is the mapped host id, with capabilities only inside
        // this user namespace (the others stay owned by the host's).
        trace(Step::UserNamespace);
        // SAFETY: setns on a descriptor the parent opened; this process has one thread.
        if unsafe { libc::setns(m.userns_fd, libc::CLONE_NEWUSER) } < 0 {
            return Err(fail(Step::UserNamespace));
        }
        // SAFETY: our copy of the descriptor is no longer needed.
        unsafe { libc::close(m.userns_fd) };
    }
    mounts::mkdir_p(&plan.cwd).map_err(|e| Fail {
        step: Step::Cwd,
        errno: e,
    })?;
    // SAFETY: valid C string.
    if unsafe { libc::chdir(plan.cwd.as_ptr()) } < 0 {
        return Err(fail(Step::Cwd));
    }

    if plan.init {
        run_init(plan)
    } else {
        exec_command(plan)
    }
}

/// Drops capabilities, switches user, resets signals, sets no_new_privs, installs the seccomp
/// filter and executes the command.
fn exec_command(plan: &ChildPlan) -> Result<std::convert::Infallible, Fail> {
    trace(Step::Capabilities);
    plan.posture.drop_bounding().map_err(|e| Fail {
        step: Step::Capabilities,
        errno: e,
    })?;
    trace(Step::User);
    if set_identity(&plan.groups, plan.gid, plan.uid).is_err() {
        return Err(fail(Step::User));
    }
    reset_signals();
    trace(Step::Exec);
    finish_posture(&plan.posture, 0)?;
    let mut last = libc::ENOENT;
    let mut denied = false;
    for path in &plan.exec_candidates {
        // SAFETY: path, argv and envp are valid, NUL-terminated, and argv/envp end in NULL.
        unsafe { libc::execve(path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
        last = errno();
        match last {
            libc::ENOENT | libc::ENOTDIR => {}
            libc::EACCES => denied = true,
            _ => break,
        }
    }
    Err(Fail {
        step: Step::Exec,
        errno: if denied && last == libc::ENOENT {
            libc::EACCES
        } else {
            last
        },
    })
}

/// [`Prepared::finish`], with its failure as a [`Fail`].
pub(crate) fn finish_posture(posture: &Prepared, extra: u64) -> Result<(), Fail> {
    posture.finish(extra).map_err(|(seccomp, errno)| Fail {
        step: if seccomp {
            Step::Seccomp
        } else {
            Step::Capabilities
        },
        errno,
    })
}

/// Makes the terminal on stdin the controlling terminal of this process's new session.
pub(crate) fn controlling_terminal() -> Result<(), i32> {
    // SAFETY: fd 0 is the terminal slave put there by dup2; the call has no memory effects.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(0) };
    rustix::process::ioctl_tiocsctty(fd).map_err(|e| e.raw_os_error())
}

/// Marks every descriptor above 2 close-on-exec (no allocation).
pub(crate) fn cloexec_above_stdio() {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only changes flags of this process's descriptors.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if r < 0 {
        // Kernels before 5.11: one descriptor at a time.
        for fd in 3..4096 {
            // SAFETY: fcntl on a descriptor number; EBADF for unused ones is harmless.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

/// Sets the supplementary groups, then the gid, then the uid of this (single-threaded) process
/// with raw system calls. glibc's wrappers would first signal every thread the parent had (its
/// thread list is copied by clone(2)) and wait for them forever; in the guest, where the agent
/// is PID 1, one of those stale thread ids is 1: the container's own PID in its new namespace.
pub(crate) fn set_identity(
    groups: &[libc::gid_t],
    gid: libc::gid_t,
    uid: libc::uid_t,
) -> Result<(), i32> {
    // SAFETY: the group list points at `groups.len()` valid gids; the kernel copies it.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r < 0 {
        return Err(errno());
    }
    // SAFETY: plain id-setting system calls with integer arguments.
    if unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) } < 0 {
        return Err(errno());
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) } < 0 {
        return Err(errno());
    }
    Ok(())
}

/// Puts every signal back to its default action and unblocks all of them (the runtime may
/// ignore SIGPIPE or block the signals it forwards, and whatever started it may have ignored
/// SIGINT, SIGQUIT or SIGHUP: a background job, nohup). Async-signal-safe.
pub(crate) fn reset_signals() {
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: setting a default disposition has no memory effects.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    set_mask(&signal_set(false, &[]));
}

/// A signal set: all signals when `fill`, else just `signals`.
pub(crate) fn signal_set(fill: bool, signals: &[i32]) -> libc::sigset_t {
    // SAFETY: zeroed memory is valid storage for a sigset_t; it is initialised right below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    if fill {
        // SAFETY: `set` is valid storage.
        unsafe { libc::sigfillset(&mut set) };
    } else {
        // SAFETY: `set` is valid storage.
        unsafe { libc::sigemptyset(&mut set) };
    }
    for s in signals {
        // SAFETY: `set` is an initialised set.
        unsafe { libc::sigaddset(&mut set, *s) };
    }
    set
}

/// Replaces the calling thread's signal mask.
pub(crate) fn set_mask(set: &libc::sigset_t) {
    // SAFETY: a valid set; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, set, std::ptr::null_mut()) };
}

/// PID 1 with `init`: start the command, forward signals, reap, exit with its status.
fn run_init(plan: &ChildPlan) -> Result<std::convert::Infallible, Fail> {
    // Block every signal so they queue for sigwaitinfo below.
    let all = signal_set(true, &[]);
    set_mask(&all);
    // SAFETY: fork in a process that has only this thread; the child only makes syscalls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(fail(Step::Fork));
    }
    if pid == 0 {
        return exec_command(plan);
    }
    // The init keeps the container's capabilities (and CAP_KILL, to forward signals to a
    // command of another user) under the same filter.
    let posture = plan
        .posture
        .drop_bounding()
        .map_err(|e| (false, e))
        .and_then(|()| plan.posture.finish(1 << 5));
    if posture.is_err() {
        // SAFETY: killing our own child before giving up.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        return Err(fail(Step::Capabilities));
    }
    // The command holds the error pipe now; our copy would hide its exec from the parent. The
    // init needs no other descriptor either, and the container could reach any it kept through
    // /proc/1/fd.
    // SAFETY: closing our copy of the fd.
    unsafe { libc::close(plan.err_write) };
    // SAFETY: close_range only closes descriptors of this single-threaded process.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    loop {
        // SAFETY: zeroed siginfo_t is valid storage for sigwaitinfo.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `all` is a valid set and `info` valid storage.
        let sig = unsafe { libc::sigwaitinfo(&all, &mut info) };
        if sig < 0 {
            continue;
        }
        if sig != libc::SIGCHLD {
            // SAFETY: forwarding a signal to our child.
            unsafe { libc::kill(pid, sig) };
            continue;
        }
        loop {
            let mut status = 0;
            // SAFETY: reaps any exited child without blocking.
            let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if r <= 0 {
                break;
            }
            if r == pid {
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
                // SAFETY: ends PID 1; the kernel kills what is left in the namespace.
                unsafe { libc::_exit(code) };
            }
        }
    }
}

/// The paths to try for `cmd`, as execvp would: `cmd` itself when it has a `/`, else each
/// `PATH` entry joined with it.
pub(crate) fn exec_candidates(cmd: &str, path: Option<&str>) -> Vec<String> {
    if cmd.contains('/') {
        return vec![cmd.to_string()];
    }
    path.unwrap_or(super::command::DEFAULT_PATH)
        .split(':')
        .map(|d| if d.is_empty() { "." } else { d })
        .map(|d| format!("{}/{cmd}", d.trim_end_matches('/')))
        .collect()
}

/// Makes a `CStr` pointer array (NULL-terminated) for `strings`.
pub(crate) fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_candidates_follow_path() {
        assert_eq!(exec_candidates("/bin/sh", Some("/x")), ["/bin/sh"]);
        assert_eq!(exec_candidates("./run", None), ["./run"]);
        assert_eq!(
            exec_candidates("sh", Some("/usr/bin:/bin/")),
            ["/usr/bin/sh", "/bin/sh"]
        );
        assert_eq!(exec_candidates("sh", None).len(), 6);
    }

    #[test]
    fn pointer_arrays_end_in_null() {
        let s = vec![CString::new("a").expect("c"), CString::new("b").expect("c")];
        let p = pointers(&s);
        assert_eq!(p.len(), 3);
        assert!(p[2].is_null());
    }
}
