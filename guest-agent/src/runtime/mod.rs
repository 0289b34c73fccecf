//! The container runtime: runs a command in its own mount, PID, UTS, IPC and network namespaces
//! on an overlay (or plain directory) root, with cgroup limits. Used on the host for
//! `mvm run --isolation container` and by the guest agent inside the VM.
//!
//! - [`spec`]: the serde [`ContainerSpec`] and its [`Process`] (also what `exec` runs).
//! - [`command`]: Docker's Entrypoint/Cmd/Env/WorkingDir/User rules.
//! - [`user`]: user and group lookup in the root filesystem.
//! - [`cgroups`]: the container's cgroup (v2, or v1 on hosts that still bind controllers there).
//! - [`namespaces`], [`mounts`], `child`: the clone and everything the new process does up to
//!   `execve`; `step`: the steps it reports.
//! - [`security`]: seccomp, capabilities, no_new_privs, masked paths, devices, user namespace.
//! - [`stats`]: resource use and processes (`stats`, `top`); [`archive`]: `cp`'s tar streams.
//! - [`process`]: [`Container`]: start, stdio, signal, wait, teardown.
//! - [`pty`]: a new terminal for `-t`.

pub mod archive;
pub mod cgroups;
mod child;
pub mod command;
pub mod exec;
pub mod mounts;
pub mod namespaces;
pub mod process;
pub mod pty;
pub mod security;
pub mod spec;
pub mod stats;
mod step;
pub mod user;

use std::path::PathBuf;

pub use command::{ImageConfig, Overrides};
pub use process::{
    block_forwarded_signals, forwarded_signal_pending, wait_forwarding_signals, Container,
    ContainerExit, Relay, StdioConfig, StdioMode, FORWARDED_SIGNALS, TERM_DEFAULT,
};
pub use pty::TermSize;
pub use spec::{ContainerSpec, Limits, Network, Process, Rootfs};
pub use step::{Fail, Step};

/// Errors creating or running a container.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The spec is invalid.
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    /// The user could not be resolved.
    #[error(transparent)]
    User(#[from] user::UserError),
    /// The cgroup could not be set up.
    #[error(transparent)]
    Cgroup(#[from] cgroups::CgroupError),
    /// A root filesystem directory is missing.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// The command is not in the container.
    #[error("{0}: executable file not found in the container")]
    CommandNotFound(String),
    /// The command is not executable.
    #[error("{0}: permission denied (not executable)")]
    NotExecutable(String),
    /// A setup step in the new process failed.
    #[error("container setup failed while {0}")]
    Setup(&'static str, #[source] std::io::Error),
    /// A security option is invalid or cannot be prepared.
    #[error(transparent)]
    Security(#[from] security::SecurityError),
    /// A system call in the runtime failed.
    #[error("{0} failed")]
    Os(&'static str, #[source] std::io::Error),
}

/// An error and its sources on one line (`outer: inner`), as a user reads it.
pub fn error_line(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let msg = s.to_string();
        if !text.ends_with(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        source = s.source();
    }
    text
}
