//! `mvm run`: one [`RunSpec`] through one path for every isolation.
//!
//! 1. [`RunSpec::validate`] checks the spec against the host, once.
//! 2. [`image::resolve`] finds (or pulls) the image and unpacks it, pinning its digest in the
//!    spec; the image config and the spec's overrides give the command ([`command::resolve`]).
//! 3. The container is registered ([`RunGuard`]: one record, one name namespace, one id
//!    generator for every isolation) and the spec written next to its record.
//! 4. With `-d` the runner takes it from there ([`runner`]); else this process runs it: in a
//!    microVM ([`vm`]), a container on the host ([`container`]) or a plain process ([`process`]),
//!    its output going to the container log and the terminal ([`crate::logs`]).

mod container;
mod process;
mod vm;

use std::path::Path;

use guest_agent::runtime::{command, spec::SpecError, Process};

use crate::error::{bad_input, Error};
use crate::image::{self, Resolved};
use crate::runner::{self, RunGuard};
use crate::spec::{Isolation, RunSpec};
use crate::state::{new_id, ContainerRecord, StateStore};

/// How a run ended for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The container ran in the foreground and exited.
    Exited(Exit),
    /// `-d`: the container runs in the background under this id.
    Detached(String),
}

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

/// Runs `spec` under the mvm root `root`: in the foreground until the container exits, or, with
/// `-d`, until the background runner reports that it runs.
pub fn run(root: &Path, spec: RunSpec) -> Result<RunOutcome, Error> {
    spec.validate(root)?;
    let mut spec = spec;
    let resolved = image::resolve(root, &mut spec.source)?;
    let process = resolve_process(&spec, &resolved)?;
    let store = StateStore::open(root)?;
    let id = new_id();
    let name = spec.name.clone().unwrap_or_else(|| id[..12].to_string());
    let record = ContainerRecord::new(
        id,
        name,
        spec.source.label(),
        spec.isolation,
        process.args.clone(),
        spec.publish.iter().map(ToString::to_string).collect(),
    );
    let guard = RunGuard::create(store, record, spec.remove)?;
    runner::write_spec(guard.dir(), &spec)?;
    if spec.detach {
        return runner::detach(guard).map(RunOutcome::Detached);
    }
    execute(root, &spec, resolved, process, guard, false).map(RunOutcome::Exited)
}

/// Runs the spec of a container already registered (the runner's side of `-d`): the image is
/// the one the spec pins.
pub(crate) fn run_registered(
    root: &Path,
    mut spec: RunSpec,
    guard: RunGuard,
    runner: bool,
) -> Result<Exit, Error> {
    let resolved = image::resolve(root, &mut spec.source)?;
    let process = resolve_process(&spec, &resolved)?;
    execute(root, &spec, resolved, process, guard, runner)
}

/// The container's first process: the image config with the spec's overrides.
fn resolve_process(spec: &RunSpec, resolved: &Resolved) -> Result<Process, Error> {
    // `-e KEY` entries were filled in when the spec was built: nothing comes from here.
    let process = command::resolve(&resolved.config, &spec.command, |_| None);
    if process.args.is_empty() {
        return Err(bad_input(SpecError::NoCommand.to_string()));
    }
    Ok(process)
}

/// Runs the registered container in this process. `runner`: this is the background runner
/// (no terminal; it tells its parent once the container runs).
fn execute(
    root: &Path,
    spec: &RunSpec,
    resolved: Resolved,
    process: Process,
    guard: RunGuard,
    runner: bool,
) -> Result<Exit, Error> {
    let run = Run {
        root,
        spec,
        rootfs: resolved.dir,
        process,
        guard,
        runner,
    };
    match spec.isolation {
        Isolation::Vm => vm::run(run),
        Isolation::Container => container::run(run),
        Isolation::Process => process::run(run),
    }
}

/// Everything a mode needs to run one registered container.
struct Run<'a> {
    /// The mvm root.
    root: &'a Path,
    /// The spec.
    spec: &'a RunSpec,
    /// The read-only root directory.
    rootfs: std::path::PathBuf,
    /// The first process.
    process: Process,
    /// The record, while the container runs.
    guard: RunGuard,
    /// Whether this is the background runner.
    runner: bool,
}

impl Run<'_> {
    /// The container runs: records it (with its first process's host pid, if it has one) and,
    /// in the runner, tells the parent.
    fn started(&mut self, taps: Vec<String>, process_pid: Option<i32>) -> Result<(), Error> {
        self.guard.running(taps, process_pid)?;
        if self.runner {
            runner::announce_ready(&self.guard.record().id, self.guard.dir())?;
        }
        Ok(())
    }

    /// The container log, echoed to the terminal in the foreground.
    fn log_path(&self) -> std::path::PathBuf {
        self.guard.dir().join("container.log")
    }

    /// The container exited with `code`: records it.
    fn exited(mut self, code: i32, oom_killed: bool) -> Exit {
        self.guard.exited(code);
        Exit {
            name: self.guard.record().name.clone(),
            code,
            oom_killed,
        }
    }
}
