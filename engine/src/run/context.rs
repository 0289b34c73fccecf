//! What every isolation mode gets to run one registered container ([`Run`]) and returns
//! ([`Exit`]).

use std::path::{Path, PathBuf};

use guest_agent::runtime::{Process, TermSize};

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
    /// Whether this is the background runner.
    pub runner: bool,
    /// The runner's first run: it tells the parent once the container runs (a restart does not).
    pub announce: bool,
}

impl Run<'_> {
    /// The container runs: records it (with its first process's host pid, if it has one) and,
    /// in the runner's first run, tells the parent.
    pub fn started(&mut self, taps: Vec<String>, process_pid: Option<i32>) -> Result<(), Error> {
        self.guard.running(taps, process_pid)?;
        if self.announce {
            runner::announce_ready(&self.guard.record().id, self.guard.dir())?;
        }
        Ok(())
    }

    /// Whether the runner runs the container again (`--restart`).
    pub fn is_restart(&self) -> bool {
        self.runner && !self.announce
    }

    /// The container log (echoed to the terminal in the foreground), rotating as the spec says.
    pub fn log(&self) -> Result<ContainerLog, Error> {
        ContainerLog::open(&self.guard.dir().join(LOG_FILE), self.spec.log)
    }

    /// The size the container's terminal starts with: the user's terminal's.
    pub fn terminal_size(&self) -> TermSize {
        if self.runner {
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
        if self.runner {
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
