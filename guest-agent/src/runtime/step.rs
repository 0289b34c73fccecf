//! The steps a new container process goes through up to `execve`: what the cloned process
//! reports when one fails ([`Fail`], over the error pipe) and, with debug logging, traces as it
//! enters each ([`trace`]). Shared by the child's code and the mount code it runs.

/// A setup step, reported by the child when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    /// Waiting for the parent.
    Sync = 1,
    /// Making mounts private.
    MakePrivate,
    /// Mounting the root filesystem.
    RootMount,
    /// Mounting /proc.
    Proc,
    /// Mounting /sys.
    Sys,
    /// Mounting /dev.
    Dev,
    /// Creating device nodes.
    Devices,
    /// Mounting /dev/pts.
    DevPts,
    /// Mounting /dev/shm.
    DevShm,
    /// pivot_root.
    PivotRoot,
    /// Setting the hostname.
    Hostname,
    /// Bringing up loopback.
    Loopback,
    /// Entering the working directory.
    Cwd,
    /// Connecting stdin/stdout/stderr.
    Stdio,
    /// Dropping capabilities.
    Capabilities,
    /// Switching user and groups.
    User,
    /// Starting the command under the init.
    Fork,
    /// Executing the command.
    Exec,
    /// Bind-mounting volumes.
    Volumes,
    /// Starting a new session (no controlling terminal).
    Session,
    /// Installing the seccomp filter.
    Seccomp,
    /// Entering the user namespace.
    UserNamespace,
}

impl Step {
    const ALL: [Step; 22] = [
        Step::Sync,
        Step::MakePrivate,
        Step::RootMount,
        Step::Proc,
        Step::Sys,
        Step::Dev,
        Step::Devices,
        Step::DevPts,
        Step::DevShm,
        Step::PivotRoot,
        Step::Hostname,
        Step::Loopback,
        Step::Cwd,
        Step::Stdio,
        Step::Capabilities,
        Step::User,
        Step::Fork,
        Step::Exec,
        Step::Volumes,
        Step::Session,
        Step::Seccomp,
        Step::UserNamespace,
    ];

    /// The step with this wire number.
    pub fn from_u32(n: u32) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u32 == n)
    }

    /// What the step does, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Step::Sync => "waiting for the runtime",
            Step::MakePrivate => "making mounts private",
            Step::RootMount => "mounting the root filesystem",
            Step::Proc => "mounting /proc",
            Step::Sys => "mounting /sys",
            Step::Dev => "mounting /dev",
            Step::Devices => "creating device nodes",
            Step::DevPts => "mounting /dev/pts",
            Step::DevShm => "mounting /dev/shm",
            Step::PivotRoot => "switching to the new root (pivot_root)",
            Step::Hostname => "setting the hostname",
            Step::Loopback => "bringing up the loopback interface",
            Step::Cwd => "entering the working directory",
            Step::Stdio => "connecting stdio",
            Step::Capabilities => "dropping capabilities",
            Step::User => "switching user",
            Step::Fork => "starting the command under init",
            Step::Exec => "executing the command",
            Step::Volumes => "mounting volumes",
            Step::Session => "starting a new session",
            Step::Seccomp => "installing the seccomp filter",
            Step::UserNamespace => "entering the user namespace",
        }
    }
}

/// A failed step and its errno.
#[derive(Debug, Clone, Copy)]
pub struct Fail {
    /// Which step.
    pub step: Step,
    /// The errno it failed with.
    pub errno: i32,
}

impl Fail {
    /// Wire form sent over the error pipe.
    pub(crate) fn encode(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&(self.step as u32).to_le_bytes());
        b[4..].copy_from_slice(&self.errno.to_le_bytes());
        b
    }

    /// Parses the wire form.
    pub(crate) fn decode(b: [u8; 8]) -> Option<Fail> {
        let step = Step::from_u32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))?;
        let errno = i32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        Some(Fail { step, errno })
    }
}

/// Where the cloned process writes each setup step it enters (-1: nowhere). Set by the parent
/// when debug logging is on: the agent's console then shows where a container start stops.
pub(crate) static TRACE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Sends the setup steps of containers started from now on to this process's stderr (a
/// close-on-exec copy: the child's own fd 2 becomes the container's stderr).
pub(crate) fn trace_to_stderr() {
    use std::sync::atomic::Ordering;
    if TRACE_FD.load(Ordering::Relaxed) < 0 {
        // SAFETY: duplicates fd 2 with integer arguments only.
        let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
        TRACE_FD.store(fd, Ordering::Relaxed);
    }
}

/// Writes `step` to [`TRACE_FD`] (no allocation: runs in the cloned process).
pub(crate) fn trace(step: Step) {
    let fd = TRACE_FD.load(std::sync::atomic::Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    for part in [
        b"mvm-agent: container setup: ".as_slice(),
        step.describe().as_bytes(),
        b"\n",
    ] {
        // SAFETY: writes a valid byte slice to an fd the parent keeps open.
        unsafe { libc::write(fd, part.as_ptr().cast(), part.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_survive_the_pipe() {
        for s in Step::ALL {
            let f = Fail {
                step: s,
                errno: libc::EPERM,
            };
            let back = Fail::decode(f.encode()).expect("decodes");
            assert_eq!((back.step, back.errno), (s, libc::EPERM));
        }
        assert!(Fail::decode([0xff; 8]).is_none());
    }
}
