//! The engine's error: what went wrong, and the exit code that tells a script so.
//!
//! Exit codes: 2 for bad input (a flag, a name, a path, a file that is not what it claims to be),
//! the command's own code where the run ends it (126, 127, 128 + n after signal n), 1 for anything
//! that failed after the input was accepted.

use std::io;
use std::path::PathBuf;

use guest_agent::agent::client::ClientError;
use guest_agent::runtime::ContainerError;

use crate::image::ImageError;
use crate::microvm::MicroVmError;
use crate::portfwd::PortError;
use crate::state::StateError;

/// Exit code for bad input.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code for failures after the input was accepted.
pub const EXIT_FAILURE: i32 = 1;

/// A run that ends with a specific exit code after one error line (a command that is missing
/// (127) or cannot be executed (126), a signal before the VM started (128 + n), a failed runner).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{1}")]
pub struct CommandExit(pub i32, pub String);

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What was asked for is wrong; the message says what to do instead.
    #[error("{0}")]
    BadInput(String),
    /// The run ends with this exit code.
    #[error(transparent)]
    Exit(#[from] CommandExit),
    /// A file or directory of mvm's own could not be read or written.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done (`create`, `read`, `write`).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A system call failed (starting or waiting for a process, reaching a socket).
    #[error("{0}")]
    System(String, #[source] io::Error),
    /// Something that should have happened did not.
    #[error("{0}")]
    Failed(String),
    /// The mvm root is not safe to use (another user's, writable by others).
    #[error(transparent)]
    Root(#[from] rootfs_builder::rootdir::RootDirError),
    /// The container state store.
    #[error(transparent)]
    State(#[from] StateError),
    /// The image store or a registry.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The container runtime (`--isolation container`).
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// The microVM (`--isolation vm`).
    #[error(transparent)]
    MicroVm(#[from] MicroVmError),
    /// A disk image for a VM (the root filesystem, a volume).
    #[error("cannot {0}")]
    Disk(String, #[source] rootfs_builder::disk::DiskError),
    /// The agent's initramfs.
    #[error("cannot build the guest agent's initramfs")]
    Initramfs(#[from] rootfs_builder::initramfs::InitramfsError),
    /// A published port.
    #[error(transparent)]
    Port(#[from] PortError),
    /// A VM's guest agent could not be reached (the container named).
    #[error("cannot reach the guest agent of {0}")]
    AgentUnreachable(String, #[source] devices::virtio::vsock::VsockError),
    /// A session with a VM's guest agent (`exec`, `kill`).
    #[error("{what}")]
    Agent {
        /// What failed, naming the container.
        what: String,
        /// Why.
        #[source]
        source: ClientError,
    },
}

/// Shorthand for an [`Error::BadInput`].
pub fn bad_input(msg: impl Into<String>) -> Error {
    Error::BadInput(msg.into())
}

/// Shorthand for an [`Error::Io`] in `map_err`.
pub fn io_error(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

impl Error {
    /// The process exit code this error ends mvm with.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::BadInput(_) => EXIT_BAD_INPUT,
            Error::Exit(CommandExit(code, _)) => *code,
            Error::State(e) if e.is_bad_input() => EXIT_BAD_INPUT,
            Error::Image(e) if e.is_bad_input() => EXIT_BAD_INPUT,
            Error::Container(ContainerError::CommandNotFound(_)) => 127,
            Error::Container(ContainerError::NotExecutable(_)) => 126,
            Error::Container(ContainerError::Spec(_) | ContainerError::User(_)) => EXIT_BAD_INPUT,
            _ => EXIT_FAILURE,
        }
    }

    /// Whether the error is the user's input being wrong (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        self.exit_code() == EXIT_BAD_INPUT && !matches!(self, Error::Exit(_))
    }
}

/// The error and its sources on one line, `outer: inner: innermost`, as mvm prints it.
pub fn one_line(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let msg = s.to_string();
        // A transparent wrapper repeats its source's message: print it once.
        if !text.ends_with(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_kind_of_failure() {
        assert_eq!(bad_input("x").exit_code(), 2);
        assert_eq!(
            Error::from(CommandExit(127, "gone".into())).exit_code(),
            127
        );
        assert_eq!(
            Error::from(StateError::NotFound("web".into())).exit_code(),
            2
        );
        let io = io_error("create", "/x")(io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(io.exit_code(), 1);
        assert_eq!(one_line(&io), "cannot create /x: permission denied");
        assert_eq!(
            Error::from(ContainerError::CommandNotFound("x".into())).exit_code(),
            127
        );
    }
}
