//! The system calls of the probe, each in a small wrapper.
//!
//! Raw `libc` on purpose: most calls here are made with arguments the kernel is meant to reject
//! (an empty module image, a wrong reboot magic, an out-of-range tick), which no safe wrapper
//! offers. Each returns the errno so that the caller can tell a permission check (`EPERM`,
//! `EACCES`) from the argument check that comes after it.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// An errno value.
pub type Errno = i32;

fn last_errno() -> Errno {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The symbolic name of an errno (`EPERM`), or `errno N`.
pub fn errno_name(e: Errno) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::ENOEXEC => "ENOEXEC",
        libc::EBADF => "EBADF",
        libc::ECHILD => "ECHILD",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::EROFS => "EROFS",
        libc::EPIPE => "EPIPE",
        libc::ENOSYS => "ENOSYS",
        libc::ENOKEY => "ENOKEY",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNRESET => "ECONNRESET",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::E2BIG => "E2BIG",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

/// The errno name of an I/O error, or its text when it carries no errno.
pub fn io_name(e: &io::Error) -> String {
    e.raw_os_error().map_or_else(|| e.to_string(), errno_name)
}

fn check(r: libc::c_long) -> Result<libc::c_long, Errno> {
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(r)
    }
}

fn check_fd(r: libc::c_long) -> Result<OwnedFd, Errno> {
    let fd = RawFd::try_from(check(r)?).map_err(|_| libc::EBADF)?;
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Release and node name (`uname -r`, `uname -n`).
pub fn uname() -> (String, String) {
    // SAFETY: utsname is plain old data; all-zero is valid.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct we own.
    if unsafe { libc::uname(&mut u) } < 0 {
        return (String::new(), String::new());
    }
    let text = |f: &[libc::c_char]| {
        // SAFETY: the kernel NUL-terminates every utsname field within its array.
        unsafe { CStr::from_ptr(f.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    (text(&u.release), text(&u.nodename))
}

/// How many CPUs this process may run on.
pub fn affinity_cpus() -> u32 {
    // SAFETY: cpu_set_t is plain old data; all-zero is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into our set.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r < 0 {
        return 1;
    }
    // SAFETY: CPU_COUNT only reads the set we own.
    let n = unsafe { libc::CPU_COUNT(&set) };
    u32::try_from(n).unwrap_or(1).max(1)
}

/// Whether `no_new_privs` is set, from prctl (works without /proc).
pub fn no_new_privs() -> bool {
    // SAFETY: prctl with integer arguments only reads a flag.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

/// `getppid` through the raw system call (nothing caches it).
pub fn getppid_raw() -> libc::c_long {
    // SAFETY: getppid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_getppid) }
}

/// The side of a fork this process is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The new process.
    Child,
    /// The caller, with the child's pid.
    Parent(libc::pid_t),
}

/// fork(2). The probe is single-threaded, so the child may do anything the parent could; it
/// must end through [`child_exit`] (see [`in_child`]).
pub fn fork() -> Result<Forked, Errno> {
    // SAFETY: the process is single-threaded, so no lock is held by a thread that the child
    // would not have.
    match unsafe { libc::fork() } {
        r if r < 0 => Err(last_errno()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// Ends a forked child at once: no destructors, no flushing of the parent's buffers.
pub fn child_exit(code: i32) -> ! {
    // SAFETY: _exit ends the process; it is always safe to call.
    unsafe { libc::_exit(code) }
}

/// Runs `body` in a forked child and exits with its code (101 if it panicked), so that the
/// child never returns into the parent's stack.
pub fn in_child(body: impl FnOnce() -> i32) -> ! {
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101);
    child_exit(code)
}

/// execv(path, argv) in a forked child; exits with 127 when it fails. `argv` ends with a null
/// pointer.
pub fn exec(path: &CStr, argv: &[*const libc::c_char]) -> ! {
    if argv.last().is_some_and(|p| p.is_null()) {
        // SAFETY: path is NUL-terminated and argv is a null-terminated array of pointers to
        // NUL-terminated strings that outlive the call (execv only returns on failure).
        unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    }
    child_exit(127)
}

/// Asks the kernel to SIGKILL this process when its parent dies (helpers never outlive the
/// probe).
pub fn die_with_parent() {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal, when one killed it.
    pub signal: Option<i32>,
    /// CPU time it used (user + system).
    pub cpu: Duration,
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
}

/// Waits for child `pid` (retrying on EINTR).
pub fn wait(pid: libc::pid_t) -> Result<Exit, Errno> {
    let mut status = 0;
    // SAFETY: rusage is plain old data; all-zero is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own child; status and usage are valid storage.
        let r = unsafe { libc::wait4(pid, &mut status, libc::__WALL, &mut usage) };
        if r == pid {
            break;
        }
        let e = last_errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
    Ok(Exit {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
    })
}

/// Reaps children that ended without being waited for (orphans given to the probe when it is
/// the first process of a PID namespace).
pub fn reap_orphans() {
    let mut status = 0;
    // SAFETY: non-blocking wait for any child; status is valid storage.
    while unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL) } > 0 {}
}

/// A pipe, both ends close-on-exec: (read, write).
pub fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Waits until `fd` is readable (or its writer is gone), at most `timeout`.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> Result<bool, Errno> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: poll reads and writes the one pollfd we own.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        match r {
            0 => return Ok(false),
            r if r > 0 => return Ok(true),
            _ if last_errno() == libc::EINTR => {}
            _ => return Err(last_errno()),
        }
    }
}

/// kill(pid, 0): the permission check of sending a signal, without sending one.
pub fn signal_check(pid: libc::pid_t) -> Result<(), Errno> {
    // SAFETY: signal 0 delivers nothing; it only checks existence and permission.
    check(libc::c_long::from(unsafe { libc::kill(pid, 0) })).map(drop)
}

/// SIGKILL to one of the probe's own helpers.
pub fn kill(pid: libc::pid_t) -> Result<(), Errno> {
    // SAFETY: plain kill(2) with integer arguments.
    check(libc::c_long::from(unsafe {
        libc::kill(pid, libc::SIGKILL)
    }))
    .map(drop)
}

/// PTRACE_SEIZE: attaches without stopping the tracee.
pub fn ptrace_seize(pid: libc::pid_t) -> Result<(), Errno> {
    // SAFETY: ptrace with a pid and null addr/data; no memory is passed.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    check(r).map(drop)
}

/// Releases a seized tracee: interrupts it (detaching needs a stopped tracee), waits up to
/// `timeout` for the stop, detaches. If the stop does not come the tracee stays seized (still
/// running) until the probe exits, when the kernel releases it.
pub fn ptrace_release(pid: libc::pid_t, timeout: Duration) -> Result<(), Errno> {
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: ptrace with a pid and null addr/data.
    check(unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, pid, null, null) })?;
    let deadline = std::time::Instant::now() + timeout;
    let mut status = 0;
    loop {
        // SAFETY: non-blocking wait for our tracee; status is valid storage.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        if r == pid {
            break;
        }
        if r < 0 || std::time::Instant::now() > deadline {
            return Err(if r < 0 { last_errno() } else { libc::ETIMEDOUT });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: ptrace with a pid and null addr/data; data 0 resumes without a signal.
    check(unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, null, null) }).map(drop)
}

/// Mounts a tmpfs (4 KiB) on `target`.
pub fn mount_tmpfs(target: &CStr) -> Result<(), Errno> {
    // SAFETY: all pointers are valid NUL-terminated strings, as mount(2) expects.
    let r = unsafe {
        libc::mount(
            c"mvm-probe".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"size=4k".as_ptr().cast(),
        )
    };
    check(libc::c_long::from(r)).map(drop)
}

/// Unmounts `target` (lazily when it is busy).
pub fn umount(target: &CStr) -> Result<(), Errno> {
    // SAFETY: target is a valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    check(libc::c_long::from(unsafe {
        libc::umount2(target.as_ptr(), libc::MNT_DETACH)
    }))
    .map(drop)
}

/// init_module with an empty image: `EPERM` when CAP_SYS_MODULE is missing (or modules are
/// disabled), `ENOEXEC` when the permission check passed and the image was rejected.
pub fn init_module_empty() -> Errno {
    let image = [0u8; 1];
    // SAFETY: a length of 0 makes the kernel read nothing from the image pointer; the
    // parameter string is a valid NUL-terminated literal.
    let r = unsafe { libc::syscall(libc::SYS_init_module, image.as_ptr(), 0usize, c"".as_ptr()) };
    if r == 0 {
        0
    } else {
        last_errno()
    }
}

/// mknod of a block device node `path` (mode 0600).
pub fn mknod_block(path: &CStr, major: u32, minor: u32) -> Result<(), Errno> {
    let dev = libc::makedev(major, minor);
    // SAFETY: path is a valid NUL-terminated string.
    check(libc::c_long::from(unsafe {
        libc::mknod(path.as_ptr(), libc::S_IFBLK | 0o600, dev)
    }))
    .map(drop)
}

/// `BLKGETSIZE64`: the size of a block device in bytes.
pub fn block_device_size(file: &File) -> Result<u64, Errno> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
    check(libc::c_long::from(r)).map(|_| size)
}

/// A raw IPv4 ICMP socket (CAP_NET_RAW).
pub fn raw_socket() -> Result<OwnedFd, Errno> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    check_fd(libc::c_long::from(fd))
}

/// adjtimex asking to set the tick to 0: `EPERM` without CAP_SYS_TIME, `EINVAL` with it (the
/// range check comes after the capability check, so nothing is ever set).
pub fn adjtimex_invalid_tick() -> Errno {
    // SAFETY: timex is plain old data; all-zero is valid.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    t.modes = libc::ADJ_TICK;
    t.tick = 0;
    // SAFETY: adjtimex reads and writes the struct we own.
    if unsafe { libc::adjtimex(&mut t) } < 0 {
        last_errno()
    } else {
        0
    }
}

/// reboot with a wrong first magic number: `EPERM` without CAP_SYS_BOOT, `EINVAL` with it
/// (the magic is checked after the capability, so nothing ever reboots).
pub fn reboot_invalid_magic() -> Errno {
    const NOT_A_MAGIC: libc::c_long = 0x1234_5678;
    const NOT_A_COMMAND: libc::c_long = 0x0bad_c0de;
    // SAFETY: the magic is wrong, so the kernel returns without acting; arg is null.
    let r = unsafe {
        libc::syscall(
            libc::SYS_reboot,
            NOT_A_MAGIC,
            NOT_A_MAGIC,
            NOT_A_COMMAND,
            std::ptr::null::<libc::c_void>(),
        )
    };
    if r == 0 {
        0
    } else {
        last_errno()
    }
}

/// keyctl(KEYCTL_GET_KEYRING_ID, session keyring, do not create).
pub fn keyctl_session_keyring() -> Result<libc::c_long, Errno> {
    const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
    const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
    // SAFETY: integer arguments only; nothing is created (create = 0).
    check(unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_GET_KEYRING_ID,
            KEY_SPEC_SESSION_KEYRING,
            0,
        )
    })
}

/// unshare(CLONE_NEWUSER). Call it only in a child: it changes the caller's credentials.
pub fn unshare_user() -> Result<(), Errno> {
    // SAFETY: integer flag argument; the process is single-threaded as unshare requires.
    check(libc::c_long::from(unsafe {
        libc::unshare(libc::CLONE_NEWUSER)
    }))
    .map(drop)
}

/// bpf(BPF_MAP_CREATE) of a one-entry array map.
pub fn bpf_array_map() -> Result<OwnedFd, Errno> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    // map_type, key_size, value_size, max_entries, map_flags: the head of `union bpf_attr`;
    // the kernel zero-fills the rest.
    let attr: [u32; 5] = [BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0];
    // SAFETY: the kernel reads size_of_val(&attr) bytes from the array we own.
    check_fd(unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    })
}

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER0` (64 bytes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

/// perf_event_open of a disabled software CPU-clock counter on this process, kernel included
/// (what `perf_event_paranoid` >= 2 refuses to the unprivileged).
pub fn perf_cpu_clock_self() -> Result<OwnedFd, Errno> {
    const PERF_TYPE_SOFTWARE: u32 = 1;
    const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
    const DISABLED: u64 = 1;
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
    let attr = PerfEventAttr {
        type_: PERF_TYPE_SOFTWARE,
        size: u32::try_from(std::mem::size_of::<PerfEventAttr>()).unwrap_or(64),
        config: PERF_COUNT_SW_CPU_CLOCK,
        flags: DISABLED,
        ..PerfEventAttr::default()
    };
    // SAFETY: the kernel reads attr.size bytes from the struct we own; pid 0 = this process,
    // cpu -1 = any, no group, no flags.
    check_fd(unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            0,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    })
}

/// This VM's vsock CID (`IOCTL_VM_SOCKETS_GET_LOCAL_CID` on `/dev/vsock`).
pub fn vsock_local_cid(dev: &File) -> Result<u32, Errno> {
    const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 into `cid`.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) };
    check(libc::c_long::from(r)).map(|_| cid)
}

/// Sets a receive timeout on a socket.
pub fn set_read_timeout(fd: RawFd, timeout: Duration) -> Result<(), Errno> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(1),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: setsockopt reads one timeval from our struct.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(16),
        )
    };
    check(libc::c_long::from(r)).map(drop)
}

/// syslog(SYSLOG_ACTION_READ_ALL): copies up to `buf.len()` bytes of the kernel log.
pub fn klog_read_all(buf: &mut [u8]) -> Result<usize, Errno> {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    let len = libc::c_int::try_from(buf.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: the kernel writes at most `len` bytes into the buffer we own.
    let r = unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), len) };
    usize::try_from(check(libc::c_long::from(r))?).map_err(|_| libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::EPERM), "EPERM");
        assert_eq!(errno_name(libc::ENOEXEC), "ENOEXEC");
        assert_eq!(errno_name(9999), "errno 9999");
        assert_eq!(
            io_name(&io::Error::from_raw_os_error(libc::EACCES)),
            "EACCES"
        );
    }

    #[test]
    fn perf_attr_is_version_0_sized() {
        assert_eq!(std::mem::size_of::<PerfEventAttr>(), 64);
    }

    #[test]
    fn a_forked_child_reports_its_exit_code_and_cpu() {
        match fork().expect("fork") {
            Forked::Child => in_child(|| 7),
            Forked::Parent(pid) => {
                let exit = wait(pid).expect("wait");
                assert_eq!((exit.code, exit.signal), (Some(7), None));
            }
        }
    }

    #[test]
    fn signal_check_finds_this_process() {
        let me = libc::pid_t::try_from(std::process::id()).expect("pid");
        assert_eq!(signal_check(me), Ok(()));
    }
}
