//! What every isolation mode gets to run one registered container ([`Run`]) and returns
//! ([`Exit`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use guest_agent::runtime::{Process, TermSize};

use crate::control::{self, ControlServer, Controlled};
use crate::error::Error;
use crate::logs::{ContainerLog, LOG_FILE};
use crate::runner::{self, RunGuard};
use crate::spec::RunSpec;
use crate::terminal::{self, InputRelay, RawMode, TerminalInput};

/// How a container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The container's name.
    pub name: String,
    /// Its exit code (128 + n when signal n ended it, 124 when its timeout ran out).
    pub code: i32,
    /// The kernel's OOM killer killed one of its processes (`--isolation container`).
    pub oom_killed: bool,
}

/// The control target of a container or process on the host: its first process, once it runs.
#[derive(Debug, Default)]
pub(super) struct HostProcess {
    pid: AtomicI32,
}

impl HostProcess {
    /// The first process runs as `pid` (0: it was reaped; nothing to signal any more).
    pub fn set(&self, pid: i32) {
        self.pid.store(pid, Ordering::SeqCst);
    }
}

impl Controlled for HostProcess {
    fn running(&self) -> bool {
        self.pid.load(Ordering::SeqCst) > 0
    }

    fn signal(&self, signal: i32) -> Result<(), String> {
        let pid = self.pid.load(Ordering::SeqCst);
        if pid <= 0 {
            return Err("the container does not run".into());
        }
        // SAFETY: kill has no memory preconditions; `pid` is this process's unreaped child.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(format!(
                "cannot send signal {signal}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    fn terminate(&self) {
        let _ = self.signal(libc::SIGKILL);
    }
}

/// Everything a mode needs to run one registered container. The caller has taken SIGINT and
/// SIGTERM over for the mode (see `take_signals`).
pub(super) struct Run<'a> {
    /// The mvm root.
    pub root: &'a Path,
    /// The spec.
    pub spec: &'a RunSpec,
    /// The read-only root directory.
    pub rootfs: PathBuf,
    /// The first process.
    pub process: Process,
    /// The record, while the container runs.
    pub guard: &'a mut RunGuard,
    /// Who runs it: the foreground `mvm run` (or a foreground microVM's runner, which has the
    /// user's terminal), or the runner of `-d`.
    pub caller: Caller,
}

/// Who runs a container in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Caller {
    /// On the user's terminal: `mvm run` in the foreground, or a foreground microVM's runner.
    Foreground,
    /// The runner of `-d` (no terminal); on its `first` run it tells its parent once the
    /// container runs (a restart does not).
    Runner {
        /// Not a restart.
        first: bool,
    },
}

impl Run<'_> {
    /// Whether this is the runner of `-d`: no terminal, output only to the log.
    pub fn detached(&self) -> bool {
        matches!(self.caller, Caller::Runner { .. })
    }

    /// The container runs: records it (with its first process's host pid, if it has one) and,
    /// in the runner's first run of `-d`, tells the parent.
    pub fn started(&mut self, taps: Vec<String>, process_pid: Option<i32>) -> Result<(), Error> {
        self.guard.running(taps, process_pid)?;
        if self.caller == (Caller::Runner { first: true }) {
            runner::announce_ready(&self.guard.record().id, self.guard.dir())?;
        }
        Ok(())
    }

    /// Whether the runner runs the container again (`--restart`).
    pub fn is_restart(&self) -> bool {
        self.caller == (Caller::Runner { first: false })
    }

    /// The container log (echoed to the terminal in the foreground), rotating as the spec says.
    pub fn log(&self) -> Result<ContainerLog, Error> {
        ContainerLog::open(&self.guard.dir().join(LOG_FILE), self.spec.log)
    }

    /// The size the container's terminal starts with: the user's terminal's.
    pub fn terminal_size(&self) -> TermSize {
        if self.detached() {
            TermSize::default()
        } else {
            terminal::size().unwrap_or_default()
        }
    }

    /// In the foreground, shows the container's terminal on the user's: raw mode while the
    /// returned guard lives (with `-i` on a terminal), input relayed with `-i`, the size followed.
    pub fn relay_terminal(
        &self,
        input: Box<dyn TerminalInput>,
    ) -> Result<(Option<InputRelay>, Option<RawMode>), Error> {
        if self.detached() {
            return Ok((None, None));
        }
        let interactive = self.spec.interactive;
        let raw = if interactive { RawMode::enter()? } else { None };
        let relay = InputRelay::start(input, interactive, None, Box::new(|| {}))?;
        Ok((Some(relay), raw))
    }

    /// Relays this process's stdin to the container's (no terminal).
    pub fn relay_input(&self, input: Box<dyn TerminalInput>) -> Result<InputRelay, Error> {
        InputRelay::start(input, true, None, Box::new(|| {}))
    }

    /// Serves the control socket in the container's directory for `target` (a run without one
    /// still works: `stop` and `kill` then signal the runner and the container directly).
    pub fn serve_control(&self, target: Arc<dyn Controlled>) -> Option<ControlServer> {
        let path = self.guard.dir().join(control::SOCKET);
        ControlServer::start(&path, target)
            .inspect_err(|e| log::warn!("no control socket at {}: {e}", path.display()))
            .ok()
    }

    /// The container exited with `code`: records it.
    pub fn exited(self, code: i32, oom_killed: bool) -> Exit {
        self.guard.exited(code);
        Exit {
            name: self.guard.record().name.clone(),
            code,
            oom_killed,
        }
    }
}
