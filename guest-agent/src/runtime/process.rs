//! The runtime's side of a container: create it, hand out its stdio, signal it, wait for it and
//! tear it down.
//!
//! ```text
//! let mut c = Container::start(&spec, &StdioConfig::inherit())?;
//! let exit = c.wait()?;          // or wait_forwarding_signals() in a foreground CLI
//! std::process::exit(exit.code);
//! ```

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::cgroups::Cgroup;
use super::child::{self, ChildPlan};
use super::command::env_value;
use super::mounts::{IdMapped, RootMount, VolumeMount};
use super::namespaces::{self, errno};
use super::pty::{self, TermSize};
use super::spec::{ContainerSpec, Network, Rootfs};
use super::step::{self, Fail, Step};
use super::{user, ContainerError};

/// `TERM` of a process given a terminal when its environment names none (as docker's).
pub const TERM_DEFAULT: &str = "TERM=xterm";

/// Signals a foreground runtime forwards to the container (see
/// [`Container::wait_forwarding_signals`]).
pub const FORWARDED_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Where one of the container's standard streams goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StdioMode {
    /// Share the runtime's own stream.
    #[default]
    Inherit,
    /// A pipe; the runtime's end is handed out by `Container::take_stdin` and friends.
    Piped,
    /// `/dev/null`.
    Null,
}

/// The container's stdin, stdout and stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StdioConfig {
    /// Standard input.
    pub stdin: StdioMode,
    /// Standard output.
    pub stdout: StdioMode,
    /// Standard error.
    pub stderr: StdioMode,
    /// A new terminal of this size instead (`-t`): the process gets its slave as stdin, stdout,
    /// stderr and controlling terminal, the runtime keeps the master (see [`super::pty`]); the
    /// three modes above are then ignored.
    pub terminal: Option<TermSize>,
}

impl StdioConfig {
    /// All three streams shared with the runtime.
    pub fn inherit() -> Self {
        Self::default()
    }

    /// The runtime's own streams, except terminals: a stream that is a terminal becomes a pipe
    /// ([`Container::relay_stdio`] copies it), so the container never holds the terminal and
    /// cannot push input into it (TIOCSTI), change its settings or read it behind the runtime's
    /// back. A terminal stdin is relayed only while the runtime is in the foreground (else the
    /// container gets /dev/null, and a backgrounded `mvm run &` is not stopped by SIGTTIN).
    pub fn without_terminals() -> Self {
        use std::io::IsTerminal;
        let out = |tty: bool| {
            if tty {
                StdioMode::Piped
            } else {
                StdioMode::Inherit
            }
        };
        let stdin = if !std::io::stdin().is_terminal() {
            StdioMode::Inherit
        } else if foreground() {
            StdioMode::Piped
        } else {
            StdioMode::Null
        };
        StdioConfig {
            stdin,
            stdout: out(std::io::stdout().is_terminal()),
            stderr: out(std::io::stderr().is_terminal()),
            terminal: None,
        }
    }

    /// What a container on the host gets: [`StdioConfig::without_terminals`]; with `--userns`,
    /// every stream through a pipe (relayed), because container root, an unprivileged host
    /// user, could not reopen the runtime's own files and terminals through /dev/stdout.
    pub fn for_host(spec: &ContainerSpec) -> Self {
        let mut s = Self::without_terminals();
        if spec.security.userns.is_some() {
            for m in [&mut s.stdin, &mut s.stdout, &mut s.stderr] {
                if *m == StdioMode::Inherit {
                    *m = StdioMode::Piped;
                }
            }
        }
        s
    }

    /// All three streams as pipes (what the guest agent streams over vsock).
    pub fn piped() -> Self {
        StdioConfig {
            stdin: StdioMode::Piped,
            stdout: StdioMode::Piped,
            stderr: StdioMode::Piped,
            terminal: None,
        }
    }

    /// A new terminal of `size` for the process (see [`StdioConfig::terminal`]).
    pub fn terminal(size: TermSize) -> Self {
        StdioConfig {
            terminal: Some(size),
            ..Self::default()
        }
    }
}

fn uid(n: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(n)
}

fn gid(n: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(n)
}

/// Whether this process is in the foreground process group of the terminal on stdin.
fn foreground() -> bool {
    // SAFETY: tcgetpgrp and getpgrp take no pointers.
    unsafe { libc::tcgetpgrp(0) == libc::getpgrp() }
}

/// Threads copying between the runtime's own stdio and a container's pipes (see
/// [`Container::relay_stdio`]); host only, the guest agent stays single-threaded.
#[derive(Debug)]
pub struct Relay {
    outputs: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Waits until the container's stdout and stderr are drained (call after the container has
    /// exited). The stdin copy is left to end with the process.
    pub fn finish(self) {
        for h in self.outputs {
            let _ = h.join();
        }
    }
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerExit {
    /// Exit code as a shell reports it: the command's code, or 128 + signal when killed.
    pub code: i32,
    /// The signal that killed the container's PID 1, if one did.
    pub signal: Option<i32>,
    /// The kernel's OOM killer killed a process of the container (memory limit reached).
    pub oom_killed: bool,
}

/// A running (or finished, not yet dropped) container.
#[derive(Debug)]
pub struct Container {
    id: String,
    pid: libc::pid_t,
    cgroup: Option<Cgroup>,
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    terminal: Option<File>,
    exit: Option<ContainerExit>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(ContainerError::Os("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: the fd was just created and is owned by nobody else.
    let r = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let w = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((r, w))
}

fn cstring(s: &str, what: &'static str) -> Result<CString, ContainerError> {
    CString::new(s).map_err(|_| ContainerError::Spec(super::spec::SpecError::Nul(what)))
}

impl Container {
    /// Creates the container described by `spec` and starts its command. Returns once the
    /// command is executing (or with the reason it could not be).
    pub fn start(spec: &ContainerSpec, stdio: &StdioConfig) -> Result<Container, ContainerError> {
        spec.validate()?;
        for p in match &spec.rootfs {
            Rootfs::Dir { path, .. } => vec![path.clone()],
            Rootfs::Overlay { lower, upper, work } => {
                let mut v = lower.clone();
                v.push(upper.clone());
                v.push(work.clone());
                v
            }
        } {
            if !p.is_dir() {
                return Err(ContainerError::NotADirectory(p));
            }
        }
        write_etc_files(spec)?;
        let process = &spec.process;
        let identity = user::resolve(process.user.as_deref(), &spec.rootfs.read_dirs())?;
        let mut env = process.env.clone();
        if env_value(&env, "HOME").is_none() {
            env.push(format!("HOME={}", identity.home.as_deref().unwrap_or("/")));
        }
        if env_value(&env, "HOSTNAME").is_none() {
            env.push(format!("HOSTNAME={}", spec.effective_hostname()));
        }
        if stdio.terminal.is_some() && env_value(&env, "TERM").is_none() {
            env.push(TERM_DEFAULT.to_string());
        }
        let root = match &spec.rootfs {
            Rootfs::Dir { path, readonly } => RootMount::Bind {
                path: cstring(&path.display().to_string(), "the root filesystem path")?,
                readonly: *readonly,
            },
            Rootfs::Overlay { lower, upper, work } => RootMount::overlay(lower, upper, work)
                .ok_or(ContainerError::Spec(super::spec::SpecError::NoLowerDirs))?,
        };
        let args = process
            .args
            .iter()
            .map(|a| cstring(a, "the command"))
            .collect::<Result<Vec<_>, _>>()?;
        let env_c = env
            .iter()
            .map(|e| cstring(e, "the environment"))
            .collect::<Result<Vec<_>, _>>()?;
        let candidates = child::exec_candidates(&process.args[0], env_value(&env, "PATH"))
            .iter()
            .map(|c| cstring(c, "the command"))
            .collect::<Result<Vec<_>, _>>()?;

        let volumes = spec
            .mounts
            .iter()
            .map(|m| {
                VolumeMount::prepare(m).map_err(|e| {
                    ContainerError::Os(
                        "volume source",
                        std::io::Error::new(e.kind(), format!("{}: {e}", m.source.display())),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let posture = spec.security.prepare()?;
        // --userns: the user namespace exists before the container; its descriptor stays open
        // until the container has joined it.
        let userns = spec
            .security
            .userns
            .as_ref()
            .map(super::security::userns::create)
            .transpose()
            .map_err(super::security::SecurityError::from)?;
        let idmapped = match &userns {
            None => None,
            Some(fd) => Some(IdMapped {
                userns_fd: fd.as_raw_fd(),
                paths: match &spec.rootfs {
                    Rootfs::Dir { path, .. } => vec![path.clone()],
                    Rootfs::Overlay { lower, .. } => lower.clone(),
                }
                .iter()
                .map(|p| cstring(&p.display().to_string(), "the root filesystem path"))
                .collect::<Result<_, _>>()?,
                low_ports: spec.network == Network::None,
            }),
        };
        log::debug!(
            "container {}: capabilities {:?}, no_new_privs {}, seccomp {}",
            spec.id,
            posture.caps,
            spec.security.no_new_privs,
            if posture.has_seccomp() { "on" } else { "off" }
        );
        if log::log_enabled!(log::Level::Debug) {
            step::trace_to_stderr();
        }
        let cgroup = Cgroup::create(&spec.id, spec.cgroup_parent.as_deref(), &spec.limits)?;

        let (sync_r, sync_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let mut parent_ends: [Option<File>; 3] = [None, None, None];
        let mut child_ends: Vec<OwnedFd> = Vec::new();
        let mut stdio_fds: [Option<RawFd>; 3] = [None; 3];
        let mut terminal = None;
        let modes = if let Some(size) = stdio.terminal {
            let pty = pty::open(size)?;
            if let Some(m) = &spec.security.userns {
                // Container root owns its terminal, as with runc.
                rustix::fs::fchown(&pty.slave, Some(uid(m.host_uid)), Some(gid(m.host_gid)))
                    .map_err(|e| ContainerError::Os("fchown the terminal", e.into()))?;
            }
            stdio_fds = [Some(pty.slave.as_raw_fd()); 3];
            child_ends.push(pty.slave);
            terminal = Some(pty.master);
            [StdioMode::Inherit; 3]
        } else {
            [stdio.stdin, stdio.stdout, stdio.stderr]
        };
        for (i, mode) in modes.into_iter().enumerate() {
            match mode {
                StdioMode::Inherit => {}
                StdioMode::Null => {
                    let f = std::fs::OpenOptions::new()
                        .read(i == 0)
                        .write(i != 0)
                        .open("/dev/null")
                        .map_err(|e| ContainerError::Os("open /dev/null", e))?;
                    let fd: OwnedFd = f.into();
                    stdio_fds[i] = Some(fd.as_raw_fd());
                    child_ends.push(fd);
                }
                StdioMode::Piped => {
                    let (r, w) = pipe()?;
                    let (mine, theirs) = if i == 0 { (w, r) } else { (r, w) };
                    if let Some(m) = &spec.security.userns {
                        // Container root may reopen its own pipe (/dev/stdout), as with runc.
                        rustix::fs::fchown(&theirs, Some(uid(m.host_uid)), Some(gid(m.host_gid)))
                            .map_err(|e| ContainerError::Os("fchown stdio", e.into()))?;
                    }
                    stdio_fds[i] = Some(theirs.as_raw_fd());
                    child_ends.push(theirs);
                    parent_ends[i] = Some(File::from(mine));
                }
            }
        }

        let mut plan = ChildPlan {
            root,
            mounts: volumes,
            hostname: cstring(spec.effective_hostname(), "the hostname")?,
            loopback: spec.network == Network::None,
            cwd: cstring(&process.cwd, "the working directory")?,
            exec_candidates: candidates,
            argv: child::pointers(&args),
            envp: child::pointers(&env_c),
            _args: args,
            _env: env_c,
            uid: identity.uid,
            gid: identity.gid,
            groups: identity.groups.clone(),
            posture,
            idmapped,
            init: spec.init,
            stdio: stdio_fds,
            controlling_terminal: terminal.is_some(),
            sync_read: sync_r.as_raw_fd(),
            sync_write: sync_w.as_raw_fd(),
            err_read: err_r.as_raw_fd(),
            err_write: err_w.as_raw_fd(),
        };
        // SAFETY: child_main only makes system calls on the prepared plan, which stays valid in
        // the child's copy of our memory.
        let pid = unsafe {
            namespaces::spawn(
                namespaces::clone_flags(spec.network),
                child::child_main,
                std::ptr::from_mut(&mut plan).cast(),
            )
        }
        .map_err(|e| ContainerError::Os("clone", e))?;
        drop(sync_r);
        drop(err_w);
        drop(child_ends);
        let _keep_userns_until_started = userns;

        let mut container = Container {
            id: spec.id.clone(),
            pid,
            cgroup,
            stdin: parent_ends[0].take(),
            stdout: parent_ends[1].take(),
            stderr: parent_ends[2].take(),
            terminal,
            exit: None,
        };
        if let Some(cg) = &container.cgroup {
            cg.add_process(pid)?;
        }
        // SAFETY: writes one byte from a local buffer to our pipe.
        unsafe { libc::write(sync_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        drop(sync_w);

        let mut buf = [0u8; 8];
        let mut got = 0;
        while got < buf.len() {
            // SAFETY: reads into the unfilled part of a local buffer.
            let n = unsafe {
                libc::read(
                    err_r.as_raw_fd(),
                    buf[got..].as_mut_ptr().cast(),
                    buf.len() - got,
                )
            };
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            got += usize::try_from(n).unwrap_or(0);
        }
        if got == 0 {
            log::debug!("container {} started as pid {pid}", spec.id);
            return Ok(container);
        }
        let fail = Fail::decode(buf).unwrap_or(Fail {
            step: Step::Sync,
            errno: libc::EIO,
        });
        let _ = container.wait();
        Err(match (fail.step, fail.errno) {
            (Step::Exec, libc::ENOENT) => {
                ContainerError::CommandNotFound(spec.process.args[0].clone())
            }
            (Step::Exec, libc::EACCES) => {
                ContainerError::NotExecutable(spec.process.args[0].clone())
            }
            (step, e) => {
                ContainerError::Setup(step.describe(), std::io::Error::from_raw_os_error(e))
            }
        })
    }

    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Host pid of the container's PID 1.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The cgroup, when the host has one.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// The writing end of the container's stdin ([`StdioMode::Piped`] only). Dropping it gives
    /// the container end-of-file.
    pub fn take_stdin(&mut self) -> Option<File> {
        self.stdin.take()
    }

    /// The reading end of the container's stdout ([`StdioMode::Piped`] only). Read it while
    /// waiting, or the container blocks once the pipe is full.
    pub fn take_stdout(&mut self) -> Option<File> {
        self.stdout.take()
    }

    /// The reading end of the container's stderr ([`StdioMode::Piped`] only).
    pub fn take_stderr(&mut self) -> Option<File> {
        self.stderr.take()
    }

    /// The master of the container's terminal ([`StdioConfig::terminal`] only): read it for the
    /// container's output, write it for its input, resize it with [`TermSize::apply`].
    pub fn take_terminal(&mut self) -> Option<File> {
        self.terminal.take()
    }

    /// Copies this process's stdin into the container's piped stdin, and the container's piped
    /// stdout and stderr to this process's, on threads. Only the piped streams are relayed.
    pub fn relay_stdio(&mut self) -> Relay {
        use std::io::Write;
        if let Some(mut w) = self.take_stdin() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut w);
            });
        }
        let mut outputs = Vec::new();
        if let Some(mut r) = self.take_stdout() {
            outputs.push(std::thread::spawn(move || {
                let mut out = std::io::stdout().lock();
                let _ = std::io::copy(&mut r, &mut out);
                let _ = out.flush();
            }));
        }
        if let Some(mut r) = self.take_stderr() {
            outputs.push(std::thread::spawn(move || {
                let _ = std::io::copy(&mut r, &mut std::io::stderr().lock());
            }));
        }
        Relay { outputs }
    }

    /// Sends `sig` to the container's PID 1. Without `init`, PID 1 ignores signals it has no
    /// handler for (SIGKILL excepted); with `init`, they reach the command.
    pub fn signal(&self, sig: i32) -> Result<(), ContainerError> {
        if self.exit.is_some() {
            return Ok(());
        }
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
        if unsafe { libc::kill(self.pid, sig) } < 0 {
            return Err(ContainerError::Os("kill", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Kills the whole container (SIGKILL to PID 1 takes the PID namespace with it).
    pub fn kill(&self) -> Result<(), ContainerError> {
        self.signal(libc::SIGKILL)
    }

    /// Waits for the container to exit, then removes its cgroup.
    pub fn wait(&mut self) -> Result<ContainerExit, ContainerError> {
        if let Some(e) = self.exit {
            return Ok(e);
        }
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child; status is valid storage.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::__WALL) };
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
        Ok(self.finish(status))
    }

    /// Returns the exit if the container has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ContainerExit>, ContainerError> {
        if let Some(e) = self.exit {
            return Ok(Some(e));
        }
        Ok(try_waitpid(self.pid, libc::__WALL)?.map(|status| self.finish(status)))
    }

    fn finish(&mut self, status: i32) -> ContainerExit {
        let (code, signal) = if libc::WIFSIGNALED(status) {
            (128 + libc::WTERMSIG(status), Some(libc::WTERMSIG(status)))
        } else {
            (libc::WEXITSTATUS(status), None)
        };
        let oom_killed = self.cgroup.as_ref().is_some_and(|c| c.oom_kills() > 0);
        if let Some(cg) = self.cgroup.take() {
            if let Err(e) = cg.remove() {
                log::warn!("{e}");
            }
        }
        let exit = ContainerExit {
            code,
            signal,
            oom_killed,
        };
        log::debug!("container {} exited: {exit:?}", self.id);
        self.exit = Some(exit);
        exit
    }

    /// Waits for the container while forwarding SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to
    /// this process to the container's PID 1 (see [`wait_forwarding_signals`]).
    pub fn wait_forwarding_signals(&mut self) -> Result<ContainerExit, ContainerError> {
        if let Some(e) = self.exit {
            return Ok(e);
        }
        let status = wait_forwarding_signals(self.pid, &self.id)?;
        Ok(self.finish(status))
    }
}

/// Writes the spec's `/etc` files into the writable layer of an overlay root, where the image
/// has a directory `/etc` (or none). They belong to container root.
fn write_etc_files(spec: &ContainerSpec) -> Result<(), ContainerError> {
    let Rootfs::Overlay { lower, upper, .. } = &spec.rootfs else {
        if !spec.etc_files.is_empty() {
            log::debug!("a directory root gets no generated /etc files");
        }
        return Ok(());
    };
    if spec.etc_files.is_empty() {
        return Ok(());
    }
    // The topmost layer that has /etc decides what it is; a link or a file there is left alone.
    let image_etc = lower
        .iter()
        .find_map(|l| std::fs::symlink_metadata(l.join("etc")).ok());
    if image_etc.is_some_and(|m| !m.is_dir()) {
        log::warn!(
            "the image's /etc is not a directory: no /etc/hosts or /etc/resolv.conf written"
        );
        return Ok(());
    }
    let os = |what| move |e| ContainerError::Os(what, e);
    let etc = upper.join("etc");
    match std::fs::create_dir(&etc) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(os("create /etc in the container's layer")(e)),
    }
    let owner = spec
        .security
        .userns
        .as_ref()
        .map_or((0, 0), |m| (m.host_uid, m.host_gid));
    let chown = |p: &std::path::Path| {
        std::os::unix::fs::lchown(p, Some(owner.0), Some(owner.1))
            .map_err(os("chown a file in /etc"))
    };
    chown(&etc)?;
    for f in &spec.etc_files {
        let path = etc.join(&f.name);
        // Nothing of the layer is followed: an old file or link there is replaced.
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(os("write a file in /etc"))?;
        std::io::Write::write_all(&mut file, f.content.as_bytes())
            .map_err(os("write a file in /etc"))?;
        chown(&path)?;
    }
    Ok(())
}

/// The wait status of child `pid` if it has ended, without blocking (`flags` are added to
/// `WNOHANG`).
pub(crate) fn try_waitpid(pid: libc::pid_t, flags: i32) -> Result<Option<i32>, ContainerError> {
    let mut status = 0;
    // SAFETY: non-blocking wait for our own child; status is valid storage.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | flags) };
    if r < 0 {
        return Err(ContainerError::Os(
            "waitpid",
            std::io::Error::last_os_error(),
        ));
    }
    Ok((r != 0).then_some(status))
}

/// Waits for child `pid` while forwarding [`FORWARDED_SIGNALS`] sent to this process to it; a
/// second such signal sends SIGKILL (for a PID 1 that ignored the first). Returns the raw wait
/// status. Call [`block_forwarded_signals`] before starting the child so none is lost.
pub fn wait_forwarding_signals(pid: libc::pid_t, label: &str) -> Result<i32, ContainerError> {
    let set = forwarded_set();
    // SAFETY: a valid sigset; -1 asks for a new signalfd.
    let sfd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if sfd < 0 {
        return Err(ContainerError::Os(
            "signalfd",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the fd was just created and is owned here.
    let sfd = unsafe { OwnedFd::from_raw_fd(sfd) };
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = i32::try_from(pidfd)
        .ok()
        .filter(|fd| *fd >= 0)
        // SAFETY: a new fd owned here.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    let mut forwarded = 0;
    loop {
        let mut status = 0;
        // SAFETY: non-blocking wait for our own child; status is valid storage.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        if r == pid {
            return Ok(status);
        }
        if r < 0 && errno() != libc::EINTR {
            return Err(ContainerError::Os(
                "waitpid",
                std::io::Error::last_os_error(),
            ));
        }
        let mut fds = vec![libc::pollfd {
            fd: sfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(p) = &pidfd {
            fds.push(libc::pollfd {
                fd: p.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Without a pidfd (kernels before 5.3) look at the child every 50 ms.
        let timeout = if pidfd.is_some() { -1 } else { 50 };
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(1);
        // SAFETY: fds is a valid array of pollfd of length nfds.
        unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
        loop {
            // SAFETY: zeroed signalfd_siginfo is valid storage for one record.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reads at most one record into `info`.
            let n =
                unsafe { libc::read(sfd.as_raw_fd(), std::ptr::from_mut(&mut info).cast(), size) };
            if usize::try_from(n).ok() != Some(size) {
                break;
            }
            let sig = i32::try_from(info.ssi_signo).unwrap_or(libc::SIGTERM);
            forwarded += 1;
            let sent = if forwarded == 1 {
                log::debug!("forwarding signal {sig} to {label}");
                sig
            } else {
                log::warn!("signal {sig} again: killing {label}");
                libc::SIGKILL
            };
            // SAFETY: kill has no memory preconditions; pid is our unreaped child.
            unsafe { libc::kill(pid, sent) };
        }
    }
}

fn forwarded_set() -> libc::sigset_t {
    child::signal_set(false, &FORWARDED_SIGNALS)
}

/// Whether one of [`FORWARDED_SIGNALS`] was sent to this process and waits, blocked (see
/// [`block_forwarded_signals`]), for the next [`wait_forwarding_signals`]: a process between
/// two children (a runner about to restart one) asks whether it was told to end.
pub fn forwarded_signal_pending() -> bool {
    // SAFETY: sigset_t is plain data; sigemptyset below makes it a valid empty set.
    let mut pending: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `pending` is valid storage for a set; sigpending only writes to it.
    let ok = unsafe { libc::sigemptyset(&mut pending) == 0 && libc::sigpending(&mut pending) == 0 };
    // SAFETY: sigismember only reads the set sigpending filled.
    ok && FORWARDED_SIGNALS
        .iter()
        .any(|s| unsafe { libc::sigismember(&pending, *s) } == 1)
}

/// Blocks [`FORWARDED_SIGNALS`] in the calling thread so they queue for
/// [`Container::wait_forwarding_signals`] (call it before starting other threads, so they
/// inherit the mask). The container gets an unblocked mask.
pub fn block_forwarded_signals() -> Result<(), ContainerError> {
    let set = forwarded_set();
    // SAFETY: a valid set; the old mask is not needed.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(ContainerError::Os(
            "sigprocmask",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.kill();
            let _ = self.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::runtime::spec::{Limits, Process};

    #[test]
    fn a_blocked_forwarded_signal_shows_as_pending_until_taken() {
        // In a thread of its own: the signal is sent to that thread only, which blocks it.
        std::thread::spawn(|| {
            block_forwarded_signals().unwrap();
            assert!(!forwarded_signal_pending());
            // SAFETY: pthread_kill to this very thread, whose mask blocks SIGHUP.
            let sent = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) };
            assert_eq!(sent, 0);
            assert!(forwarded_signal_pending());
            let set = forwarded_set();
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a valid set and timeout; the siginfo is not asked for.
            let taken = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) };
            assert_eq!(taken, libc::SIGHUP);
            assert!(!forwarded_signal_pending());
        })
        .join()
        .unwrap();
    }

    /// A read-only busybox root, or None (with the reason printed) where the test cannot run.
    fn busybox_root() -> Option<tempfile::TempDir> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/bin/busybox").exists() {
            eprintln!("skipping: needs root and /bin/busybox (busybox-static)");
            return None;
        }
        let d = tempfile::tempdir().expect("tempdir");
        for sub in ["bin", "proc", "sys", "dev"] {
            std::fs::create_dir(d.path().join(sub)).expect("mkdir");
        }
        // A hard link, not a copy: a copy's write descriptor can leak into a child another test
        // thread forks at that moment, and exec then fails with ETXTBSY.
        let dst = d.path().join("bin/busybox");
        std::fs::hard_link("/bin/busybox", &dst)
            .or_else(|_| std::fs::copy("/bin/busybox", &dst).map(drop))
            .expect("copy");
        for a in ["sh", "cat", "echo", "touch"] {
            std::os::unix::fs::symlink("busybox", d.path().join("bin").join(a)).expect("link");
        }
        Some(d)
    }

    fn spec(root: &std::path::Path, args: &[&str]) -> ContainerSpec {
        ContainerSpec {
            id: format!("unit-{}", std::process::id()),
            rootfs: Rootfs::Dir {
                path: root.to_path_buf(),
                readonly: true,
            },
            process: Process {
                args: args.iter().map(|s| s.to_string()).collect(),
                env: vec!["PATH=/bin".into()],
                cwd: "/".into(),
                user: None,
            },
            hostname: None,
            limits: Limits::default(),
            terminal: false,
            network: Network::None,
            init: false,
            cgroup_parent: None,
            mounts: Vec::new(),
            security: Default::default(),
            etc_files: Vec::new(),
        }
    }

    #[test]
    fn piped_stdio_streams_through_a_read_only_dir_root() {
        let Some(root) = busybox_root() else { return };
        let s = spec(
            root.path(),
            &[
                "sh",
                "-c",
                "cat; echo err >&2; touch /x 2>/dev/null || exit 4",
            ],
        );
        let mut c = Container::start(&s, &StdioConfig::piped()).expect("start");
        let mut stdin = c.take_stdin().expect("stdin pipe");
        let mut stdout = c.take_stdout().expect("stdout pipe");
        let mut stderr = c.take_stderr().expect("stderr pipe");
        stdin.write_all(b"through the pipe").expect("write");
        drop(stdin);
        let mut out = String::new();
        stdout.read_to_string(&mut out).expect("read stdout");
        let mut err = String::new();
        stderr.read_to_string(&mut err).expect("read stderr");
        let exit = c.wait().expect("wait");
        assert_eq!(out, "through the pipe");
        assert_eq!(err, "err\n");
        // The root is read-only: touch failed.
        assert_eq!(exit.code, 4);
        assert!(!root.path().join("x").exists());
    }

    #[test]
    fn signal_kills_and_reports_128_plus_signal() {
        let Some(root) = busybox_root() else { return };
        let mut s = spec(root.path(), &["sh", "-c", "echo up; exec cat"]);
        s.id = format!("unit-kill-{}", std::process::id());
        let mut c = Container::start(&s, &StdioConfig::piped()).expect("start");
        let mut stdout = c.take_stdout().expect("stdout");
        let mut buf = [0u8; 3];
        stdout.read_exact(&mut buf).expect("up");
        c.kill().expect("kill");
        let exit = c.wait().expect("wait");
        assert_eq!((exit.code, exit.signal), (137, Some(libc::SIGKILL)));
        assert!(!exit.oom_killed);
    }
}
