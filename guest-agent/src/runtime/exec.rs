//! Running another process in a running container (`mvm exec`): join the namespaces of the
//! container's PID 1, take its root directory, join its cgroup, and exec.
//!
//! The command gets the container's posture (see [`super::security`]): its own session, the
//! container's capabilities, no_new_privs and seccomp filter, like the container's first process.
//!
//! Joining a PID namespace only applies to children, so this forks twice. The first child (the
//! *keeper*) joins the namespaces, waits until the runtime has put it into the container's
//! cgroup, forks the command, forwards signals to it and exits with its status, so the runtime
//! waits for the keeper as for any child. The command gets SIGKILL if the keeper dies.
//!
//! Between fork and exec only async-signal-safe system calls run: every string, path and
//! descriptor is prepared before the first fork.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use super::namespaces::errno;
use super::process::{StdioConfig, StdioMode};
use super::security::{Prepared, Security};
use super::spec::Process;
use super::{user, ContainerError};

/// Namespaces joined, in this order (the mount namespace last, as it changes path lookup).
const NAMESPACES: [(&str, libc::c_int); 5] = [
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("net", libc::CLONE_NEWNET),
    ("pid", libc::CLONE_NEWPID),
    ("mnt", libc::CLONE_NEWNS),
];

/// Signals the keeper passes on to the command.
const FORWARD: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// A process started in a container. Wait for it with [`ExecProcess::wait`].
#[derive(Debug)]
pub struct ExecProcess {
    pid: libc::pid_t,
    /// Write end of its stdin, when piped.
    pub stdin: Option<File>,
    /// Read end of its stdout, when piped.
    pub stdout: Option<File>,
    /// Read end of its stderr, when piped.
    pub stderr: Option<File>,
    /// The master of its terminal, with [`StdioConfig::terminal`].
    pub terminal: Option<File>,
    exited: bool,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(ContainerError::Os("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and nothing else owns them.
    let ends = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok(ends)
}

fn cstring(s: &str) -> Result<CString, ContainerError> {
    CString::new(s).map_err(|_| ContainerError::Spec(super::spec::SpecError::Nul("exec")))
}

fn open_path(path: &str) -> Result<OwnedFd, ContainerError> {
    let c = cstring(path)?;
    // SAFETY: opening a valid NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(ContainerError::Os(
            "open container namespace",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One end of a stdio stream for the command, and the runtime's end.
fn stdio_pair(
    mode: StdioMode,
    input: bool,
) -> Result<(Option<OwnedFd>, Option<File>), ContainerError> {
    match mode {
        StdioMode::Inherit => Ok((None, None)),
        StdioMode::Null => Ok((Some(open_path("/dev/null")?), None)),
        StdioMode::Piped => {
            let (r, w) = pipe()?;
            Ok(if input {
                (Some(r), Some(File::from(w)))
            } else {
                (Some(w), Some(File::from(r)))
            })
        }
    }
}

/// Starts `spec` inside the container whose PID 1 is `container_pid` (a child of this process),
/// in the container's cgroup directories `cgroup_dirs` (see `Cgroup::dirs`), with the
/// container's `security` settings (the command gets the same posture).
pub fn exec(
    container_pid: libc::pid_t,
    cgroup_dirs: &[PathBuf],
    spec: &Process,
    security: &Security,
    stdio: &StdioConfig,
) -> Result<ExecProcess, ContainerError> {
    if spec.args.is_empty() {
        return Err(ContainerError::Spec(super::spec::SpecError::NoCommand));
    }
    let root = PathBuf::from(format!("/proc/{container_pid}/root"));
    let ident = user::resolve(spec.user.as_deref(), std::slice::from_ref(&root))?;
    let ns_fds = NAMESPACES
        .iter()
        .map(|(name, flag)| {
            Ok((
                open_path(&format!("/proc/{container_pid}/ns/{name}"))?,
                *flag,
            ))
        })
        .collect::<Result<Vec<_>, ContainerError>>()?;
    let root_fd = open_path(&format!("/proc/{container_pid}/root"))?;

    // Everything the children need, prepared now.
    let argv: Vec<CString> = spec
        .args
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<_, _>>()?;
    let mut env = spec.env.clone();
    if stdio.terminal.is_some() && super::command::env_value(&env, "TERM").is_none() {
        env.push(super::TERM_DEFAULT.to_string());
    }
    let envp: Vec<CString> = env.iter().map(|e| cstring(e)).collect::<Result<_, _>>()?;
    let candidates = program_candidates(&spec.args[0], &spec.env)?;
    let cwd = cstring(if spec.cwd.is_empty() { "/" } else { &spec.cwd })?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let groups: Vec<libc::gid_t> = ident.groups.clone();
    let posture = security.prepare()?;

    let (child_in, parent_in, child_out, parent_out, child_err, parent_err, terminal);
    if let Some(size) = stdio.terminal {
        let pty = super::pty::open(size)?;
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| ContainerError::Os("dup the terminal", e))
        };
        (child_out, child_err) = (Some(dup(&pty.slave)?), Some(dup(&pty.slave)?));
        child_in = Some(pty.slave);
        (parent_in, parent_out, parent_err) = (None, None, None);
        terminal = Some(pty.master);
    } else {
        (child_in, parent_in) = stdio_pair(stdio.stdin, true)?;
        (child_out, parent_out) = stdio_pair(stdio.stdout, false)?;
        (child_err, parent_err) = stdio_pair(stdio.stderr, false)?;
        terminal = None;
    }
    let (go_read, go_write) = pipe()?;

    let plan = Plan {
        ns_fds: ns_fds
            .iter()
            .map(|(fd, flag)| (fd.as_raw_fd(), *flag))
            .collect(),
        root_fd: root_fd.as_raw_fd(),
        go_read: go_read.as_raw_fd(),
        stdio: [
            child_in.as_ref().map(AsRawFd::as_raw_fd),
            child_out.as_ref().map(AsRawFd::as_raw_fd),
            child_err.as_ref().map(AsRawFd::as_raw_fd),
        ],
        controlling_terminal: terminal.is_some(),
        cwd: &cwd,
        candidates: &candidates,
        argv: &argv_ptrs,
        envp: &envp_ptrs,
        uid: ident.uid,
        gid: ident.gid,
        groups: &groups,
        posture: &posture,
    };

    // SAFETY: fork has no preconditions; the child only runs `keeper`, which uses
    // async-signal-safe calls on data prepared above and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(ContainerError::Os("fork", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        keeper(&plan);
    }
    drop(go_read);
    let mut process = ExecProcess {
        pid,
        stdin: parent_in,
        stdout: parent_out,
        stderr: parent_err,
        terminal,
        exited: false,
    };
    for dir in cgroup_dirs {
        if let Err(e) = std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
            process.kill_and_reap();
            return Err(ContainerError::Os("joining the container's cgroup", e));
        }
    }
    // Let the keeper go on: it forks the command into the cgroup it is now in.
    // SAFETY: writes one byte from a valid buffer to the pipe we own.
    unsafe { libc::write(go_write.as_raw_fd(), b"g".as_ptr().cast(), 1) };
    Ok(process)
}

/// A wait status as a shell reports it: the exit code, or 128 + the signal that killed it.
fn exit_code(status: i32) -> i32 {
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

/// Paths to try for the program: itself if it has a `/`, else each `PATH` entry.
fn program_candidates(program: &str, env: &[String]) -> Result<Vec<CString>, ContainerError> {
    if program.contains('/') {
        return Ok(vec![cstring(program)?]);
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| cstring(&format!("{}/{program}", d.trim_end_matches('/'))))
        .collect()
}

struct Plan<'a> {
    ns_fds: Vec<(RawFd, libc::c_int)>,
    root_fd: RawFd,
    go_read: RawFd,
    stdio: [Option<RawFd>; 3],
    controlling_terminal: bool,
    cwd: &'a CString,
    candidates: &'a [CString],
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    uid: u32,
    gid: u32,
    groups: &'a [libc::gid_t],
    posture: &'a Prepared,
}

fn die(code: libc::c_int) -> ! {
    // SAFETY: _exit ends the process at once; always safe.
    unsafe { libc::_exit(code) }
}

/// The keeper: joins the container, forks the command, relays signals, exits with its status.
fn keeper(plan: &Plan<'_>) -> ! {
    // SAFETY (whole function): only system calls on descriptors and memory prepared before fork.
    // The keeper dies with the runtime (the agent, or mvm), and the command with it.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let mut byte = 0u8;
    // SAFETY: reads one byte into a valid buffer; blocks until the runtime placed us in the cgroup.
    if unsafe { libc::read(plan.go_read, (&raw mut byte).cast(), 1) } != 1 {
        die(126);
    }
    for (fd, flag) in &plan.ns_fds {
        // SAFETY: setns on a namespace descriptor we opened.
        if unsafe { libc::setns(*fd, *flag) } < 0 {
            die(126);
        }
    }
    // SAFETY: fchdir to the container's root directory descriptor, then chroot into it.
    if unsafe { libc::fchdir(plan.root_fd) } < 0 || unsafe { libc::chroot(c".".as_ptr()) } < 0 {
        die(126);
    }
    let mut forwarded: libc::sigset_t = empty_set();
    for sig in FORWARD.iter().chain([libc::SIGCHLD].iter()) {
        // SAFETY: adds a valid signal number to a set we own.
        unsafe { libc::sigaddset(&mut forwarded, *sig) };
    }
    // SAFETY: blocks the forwarded signals and SIGCHLD so sigwaitinfo receives them.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &forwarded, std::ptr::null_mut()) };

    // SAFETY: fork again so the command is born inside the joined PID namespace.
    let child = unsafe { libc::fork() };
    if child < 0 {
        die(126);
    }
    if child == 0 {
        command(plan);
    }
    // From here the keeper needs no descriptor. It inherited the runtime's ends of the stdio
    // pipes (and those of any exec in flight in another thread); a stdin write end kept open
    // here would keep the command from ever reading end-of-file (`mvm exec -i`).
    // SAFETY: close_range only closes descriptors of this forked, single-threaded process.
    if unsafe { libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) } < 0 {
        for fd in 0..1024 {
            // SAFETY: closing a descriptor number we may or may not have; EBADF is harmless.
            unsafe { libc::close(fd) };
        }
    }
    loop {
        // SAFETY: siginfo_t is plain data; sigwaitinfo fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waits on the blocked set we own.
        let sig = unsafe { libc::sigwaitinfo(&forwarded, &mut info) };
        if sig == libc::SIGCHLD {
            let mut status = 0;
            // SAFETY: reaps our only child if it exited.
            if unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) } == child {
                if libc::WIFSIGNALED(status) {
                    die(128 + libc::WTERMSIG(status));
                }
                die(libc::WEXITSTATUS(status));
            }
        } else if sig > 0 {
            // SAFETY: passes the signal on to our child.
            unsafe { libc::kill(child, sig) };
        }
    }
}

fn empty_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: initialises the set we own.
    unsafe { libc::sigemptyset(&mut set) };
    set
}

/// The command: stdio, identity, working directory, then exec.
fn command(plan: &Plan<'_>) -> ! {
    // Default actions (an ignored SIGINT would survive exec, and a shell cannot trap it) and an
    // unblocked mask, as for the first process.
    super::child::reset_signals();
    // SAFETY: the command dies with its keeper.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // Its own session, without a controlling terminal.
    if rustix::process::setsid().is_err() {
        die(126);
    }
    // Only stdio reaches the command.
    super::child::cloexec_above_stdio();
    for (target, fd) in [0, 1, 2].into_iter().zip(plan.stdio) {
        if let Some(fd) = fd {
            // SAFETY: dup2 onto fd 0, 1 or 2 (the duplicate has no CLOEXEC flag).
            if unsafe { libc::dup2(fd, target) } < 0 {
                die(126);
            }
        }
    }
    if plan.controlling_terminal && super::child::controlling_terminal().is_err() {
        die(126);
    }
    if plan.posture.drop_bounding().is_err() {
        die(126);
    }
    let ids_ok = super::child::set_identity(plan.groups, plan.gid, plan.uid).is_ok();
    if !ids_ok {
        die(126);
    }
    // SAFETY: chdir to a valid NUL-terminated path.
    if unsafe { libc::chdir(plan.cwd.as_ptr()) } < 0 {
        die(126);
    }
    // Capability sets, no_new_privs, then the seccomp filter, last before execve.
    if plan.posture.finish(0).is_err() {
        die(126);
    }
    let mut code = 127;
    for path in plan.candidates {
        // SAFETY: argv and envp are NULL-terminated arrays of valid C strings.
        unsafe { libc::execve(path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
        if errno() == libc::EACCES {
            code = 126;
        }
    }
    // One line on the command's stderr, as `mvm run` says it for the first process.
    let why: &[u8] = if code == 126 {
        b": permission denied (not executable)\n"
    } else {
        b": executable file not found in the container\n"
    };
    // SAFETY: argv[0] is a valid NUL-terminated string (argv is never empty here).
    let program = unsafe { std::ffi::CStr::from_ptr(plan.argv[0]) };
    for part in [b"mvm: ".as_slice(), program.to_bytes(), why] {
        // SAFETY: writes from a valid buffer to our stderr; no allocation.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    die(code)
}

impl ExecProcess {
    /// A child of this process that is not a command in the container (the agent's copies),
    /// with the runtime's ends of its pipes.
    pub(crate) fn from_child(
        pid: libc::pid_t,
        stdin: Option<File>,
        stdout: Option<File>,
        stderr: Option<File>,
    ) -> Self {
        ExecProcess {
            pid,
            stdin,
            stdout,
            stderr,
            terminal: None,
            exited: false,
        }
    }

    /// Pid of the keeper (signal it to signal the command).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Sends `sig` to the command (through its keeper).
    pub fn signal(&self, sig: i32) -> Result<(), ContainerError> {
        if self.exited {
            return Ok(());
        }
        // SAFETY: kill has no memory preconditions; the keeper is our unreaped child.
        if unsafe { libc::kill(self.pid, sig) } < 0 {
            return Err(ContainerError::Os("kill", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Waits for the command; returns its exit code (128 + signal when killed; 126 when it
    /// could not be started, 127 when it was not found).
    pub fn wait(&mut self) -> Result<i32, ContainerError> {
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child; status is valid storage.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                break;
            }
            if r < 0 && errno() != libc::EINTR {
                return Err(ContainerError::Os(
                    "waitpid",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        self.exited = true;
        Ok(exit_code(status))
    }

    /// The exit code if the command has ended (see [`ExecProcess::wait`]), without blocking.
    pub fn try_wait(&mut self) -> Result<Option<i32>, ContainerError> {
        let status = super::process::try_waitpid(self.pid, 0)?;
        self.exited |= status.is_some();
        Ok(status.map(exit_code))
    }

    fn kill_and_reap(&mut self) {
        let _ = self.signal(libc::SIGKILL);
        let _ = self.wait();
    }
}
