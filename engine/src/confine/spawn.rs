//! The supervisor's side: starting a VMM process and waiting for it.
//!
//! The VMM is mvm itself, started again with [`super::VMM_ENV`] naming its job. It is created
//! with `clone` rather than `fork` so that it is PID 1 of a new pid namespace (and, when the
//! supervisor is not root, in a new user namespace whose id maps the supervisor writes); between
//! `clone` and `execve` the child only makes system calls with what was prepared before (it
//! joins the VMM's cgroup, arms its parent death signal, waits for the supervisor's go and puts
//! the two pipes on descriptors 3 and 4). The job follows on the handoff pipe as one line of
//! JSON; the supervisor keeps its end open, so the VMM sees end-of-file only once it is gone.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use serde::Serialize;

use super::cgroup::VmmCgroup;
use super::jail::{c_path, JailPlan};
use super::{os, ConfineError, Handoff, VmmEvent, MAX_LINE, VMM_ENV};

/// How a VMM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmExit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it (SIGSYS: its seccomp filter; it printed the line saying why).
    Signal(i32),
}

/// A running VMM process, as its supervisor sees it.
#[derive(Debug)]
pub struct VmmProcess {
    pid: i32,
    /// The supervisor's end of the handoff pipe, kept open while the VMM runs.
    _lifeline: std::fs::File,
    events: std::fs::File,
    buffer: Vec<u8>,
    started: bool,
    pending: Vec<i32>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ConfineError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors, owned below.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os("create a pipe")(io::Error::last_os_error()));
    }
    // SAFETY: both were just created and are owned once each.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn c_string(s: impl Into<Vec<u8>>) -> Result<CString, ConfineError> {
    CString::new(s).map_err(|_| ConfineError::Handoff("a NUL byte in the environment".into()))
}

/// Starts the VMM process for `job` (of kind `kind`, the value of [`VMM_ENV`]), in `cgroup`,
/// with `jail` and seccomp as asked. The caller has blocked the signals it forwards
/// (`guest_agent::runtime::FORWARDED_SIGNALS`); the VMM starts with none blocked.
pub fn spawn<J: Serialize>(
    kind: &str,
    job: &J,
    jail: JailPlan,
    seccomp: bool,
    cgroup: Option<&VmmCgroup>,
) -> Result<VmmProcess, ConfineError> {
    // This very binary, whatever has become of its file (see `crate::selfexec`).
    let exe = c_path(std::path::Path::new(crate::selfexec::SELF_EXE))?;
    let arg0 = crate::selfexec::argv0_c();
    let argv = [arg0.as_ptr(), std::ptr::null()];
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != VMM_ENV)
        .map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend_from_slice(v.as_encoded_bytes());
            c_string(kv)
        })
        .collect::<Result<_, _>>()?;
    env.push(c_string(format!("{VMM_ENV}={kind}"))?);
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let procs: Vec<CString> = cgroup
        .map(VmmCgroup::procs_files)
        .unwrap_or_default()
        .iter()
        .map(|p| c_path(p))
        .collect::<Result<_, _>>()?;
    let handoff = Handoff {
        job,
        jail: jail.clone(),
        seccomp,
    };
    let mut line = serde_json::to_vec(&handoff)
        .map_err(|e| ConfineError::Handoff(format!("cannot write the job: {e}")))?;
    line.push(b'\n');

    let (handoff_r, handoff_w) = pipe()?;
    let (events_r, events_w) = pipe()?;
    let mut flags = libc::SIGCHLD;
    if jail.enabled {
        flags |= libc::CLONE_NEWPID;
        if jail.userns_made {
            flags |= libc::CLONE_NEWUSER;
        }
    }
    let child = Child {
        exe: exe.as_ptr(),
        argv: &argv,
        envp: &envp,
        procs: &procs,
        handoff: handoff_r.as_raw_fd(),
        events: events_w.as_raw_fd(),
    };
    // SAFETY: clone without CLONE_VM and without a new stack returns twice, as fork does; the
    // child only runs `Child::exec`, which makes system calls on memory prepared above.
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::c_long::from(flags), 0, 0, 0, 0) };
    if pid == 0 {
        // SAFETY: in the child right after clone: see `Child::exec`.
        unsafe { child.exec() }
    }
    let pid = i32::try_from(pid).unwrap_or(-1);
    if pid < 0 {
        return Err(os("start the VMM process")(io::Error::last_os_error()));
    }
    drop((handoff_r, events_w));
    let mut lifeline = std::fs::File::from(handoff_w);
    let vmm = VmmProcess {
        pid,
        _lifeline: lifeline.try_clone().map_err(os("keep the handoff pipe"))?,
        events: std::fs::File::from(events_r),
        buffer: Vec::new(),
        started: false,
        pending: Vec::new(),
    };
    let handed = (|| {
        if jail.enabled && jail.userns_made {
            write_id_maps(pid, jail.uid, jail.gid)?;
        }
        lifeline
            .write_all(b"g")
            .and_then(|()| lifeline.write_all(&line))
            .map_err(os("hand the job to the VMM"))
    })();
    if let Err(e) = handed {
        vmm.kill();
        let _ = vmm.reap(true);
        return Err(e);
    }
    // SAFETY: sets O_NONBLOCK on a descriptor this process owns.
    unsafe {
        let fd = vmm.events.as_raw_fd();
        libc::fcntl(
            fd,
            libc::F_SETFL,
            libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
        );
    }
    Ok(vmm)
}

/// Writes the id maps of the VMM's user namespace (made by a supervisor that is not root): only
/// the supervisor's own uid and gid are mapped, as the namespace's 0, so that mvm keeps its
/// capabilities in the namespace across execve and can build its jail; it drops every one of
/// them, and locks them out, before the guest runs. Outside, it is the user and nothing more.
fn write_id_maps(pid: i32, uid: u32, gid: u32) -> Result<(), ConfineError> {
    for (file, text) in [
        ("setgroups", "deny".to_string()),
        ("uid_map", format!("0 {uid} 1")),
        ("gid_map", format!("0 {gid} 1")),
    ] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, text).map_err(os(format!("write {path}")))?;
    }
    Ok(())
}

/// What the child needs between clone and exec, prepared before the clone.
struct Child<'a> {
    exe: *const libc::c_char,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    procs: &'a [CString],
    handoff: RawFd,
    events: RawFd,
}

impl Child<'_> {
    /// Joins the cgroup, arms the parent death signal, waits for the supervisor's go, puts the
    /// pipes on descriptors 3 and 4 and executes mvm. Never returns.
    ///
    /// # Safety
    ///
    /// Only to be called in the child of a fork-like clone: it makes system calls only.
    unsafe fn exec(&self) -> ! {
        // SAFETY: every call below is async-signal-safe and reads memory prepared before the
        // clone (a copy of it in this process).
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            for p in self.procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(126);
                }
                libc::close(fd);
            }
            let mut go = 0u8;
            if libc::read(self.handoff, std::ptr::from_mut(&mut go).cast(), 1) != 1 {
                libc::_exit(125);
            }
            // Out of the way first, so that neither lands on the other's target.
            let h = libc::fcntl(self.handoff, libc::F_DUPFD, 10);
            let e = libc::fcntl(self.events, libc::F_DUPFD, 10);
            if h < 0 || e < 0 || libc::dup2(h, 3) < 0 || libc::dup2(e, 4) < 0 {
                libc::_exit(124);
            }
            libc::execve(self.exe, self.argv.as_ptr(), self.envp.as_ptr());
            libc::_exit(127)
        }
    }
}

impl VmmProcess {
    /// The VMM's pid (in the supervisor's pid namespace).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Kills the VMM (SIGKILL).
    pub fn kill(&self) {
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    fn reap(&self, block: bool) -> Result<Option<VmmExit>, ConfineError> {
        let mut status = 0;
        let flags = if block { 0 } else { libc::WNOHANG };
        // SAFETY: waits for our own child; status is valid storage.
        let r = unsafe { libc::waitpid(self.pid, &mut status, flags) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(os("wait for the VMM")(e));
        }
        if r == 0 {
            return Ok(None);
        }
        Ok(Some(if libc::WIFSIGNALED(status) {
            VmmExit::Signal(libc::WTERMSIG(status))
        } else {
            VmmExit::Code(libc::WEXITSTATUS(status))
        }))
    }

    /// Reads what the VMM reported since the last call.
    fn read_events(&mut self, on_event: &mut dyn FnMut(VmmEvent)) {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.events.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
        while let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            match serde_json::from_slice::<VmmEvent>(&line) {
                Ok(VmmEvent::Started) => self.started = true,
                Ok(event) => on_event(event),
                Err(e) => log::debug!("the VMM said something unreadable: {e}"),
            }
        }
        // A VMM that writes a line without end gets it dropped, not kept.
        if self.buffer.len() as u64 > MAX_LINE {
            self.buffer.clear();
        }
    }

    /// Forwards the signals the supervisor received (once the VMM handles them).
    fn forward_signals(&mut self, set: &libc::sigset_t) {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        loop {
            // SAFETY: `set` and `zero` are valid; the siginfo is not needed.
            let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &zero) };
            if sig <= 0 {
                break;
            }
            self.pending.push(sig);
        }
        if self.started {
            for sig in self.pending.drain(..) {
                log::debug!("forwarding signal {sig} to the VMM");
                // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
                unsafe { libc::kill(self.pid, sig) };
            }
        }
    }

    /// Waits for the VMM to end, handing `on_event` what it reports and forwarding the signals
    /// the caller blocked.
    pub fn wait(mut self, mut on_event: impl FnMut(VmmEvent)) -> Result<VmmExit, ConfineError> {
        let set = forwarded_set();
        loop {
            let mut fds = [libc::pollfd {
                fd: self.events.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let tick = i32::try_from(Duration::from_millis(50).as_millis()).unwrap_or(50);
            // SAFETY: polls one valid pollfd that lives across the call.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, tick) };
            self.read_events(&mut on_event);
            self.forward_signals(&set);
            if let Some(exit) = self.reap(false)? {
                self.read_events(&mut on_event);
                return Ok(exit);
            }
        }
    }
}

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds valid signal numbers to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in guest_agent::runtime::FORWARDED_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}
