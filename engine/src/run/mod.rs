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
mod context;
mod process;
mod vm;

use std::path::{Path, PathBuf};

use guest_agent::runtime::{command, spec::SpecError, ImageConfig, Process};

use crate::error::{bad_input, Error};
use crate::image;
use crate::runner::{self, RunGuard, RUNNER_ENV};
use crate::spec::{Isolation, RunSpec, Source};
use crate::state::{new_id, ContainerRecord, StateStore};
pub use context::Exit;
use context::Run;
pub(crate) use vm::{find_agent, warm_vm_caches};

/// How a run ended for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The container ran in the foreground and exited.
    Exited(Exit),
    /// `-d`: the container runs in the background under this id.
    Detached(String),
}

/// Runs `spec` under the mvm root `root`: in the foreground until the container exits, or, with
/// `-d`, until the background runner reports that it runs.
pub fn run(root: &Path, spec: RunSpec) -> Result<RunOutcome, Error> {
    spec.validate(root)?;
    let mut spec = spec;
    let rootfs = resolve_source(root, &mut spec.source)?;
    let process = resolve_process(&spec, &rootfs.config)?;
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
    if !spec.detach {
        take_signals(spec.isolation)?;
    }
    let guard = RunGuard::create(store, record, spec.remove)?;
    runner::write_spec(guard.dir(), &spec)?;
    if spec.detach {
        return runner::detach(guard).map(RunOutcome::Detached);
    }
    execute(root, &spec, rootfs.dir, process, guard, false).map(RunOutcome::Exited)
}

/// The runner's side of `-d` (see [`runner`]): takes over the container registered in `dir`
/// and runs its spec (the image is the one the spec pins); returns the container's exit code.
pub fn resume(dir: &Path) -> Result<i32, Error> {
    let (store, id) = StateStore::of_container_dir(dir)
        .ok_or_else(|| bad_input(format!("{RUNNER_ENV}={}: not a container", dir.display())))?;
    let record = store.load(&id)?;
    let mut spec = runner::read_spec(dir)?;
    take_signals(spec.isolation)?;
    let guard = RunGuard::adopt(store.clone(), record, spec.remove)?;
    let root = store.root();
    let rootfs = resolve_source(root, &mut spec.source)?;
    let process = resolve_process(&spec, &rootfs.config)?;
    execute(root, &spec, rootfs.dir, process, guard, true).map(|exit| exit.code)
}

/// From here on SIGINT and SIGTERM no longer end this process at once, so every path goes
/// through the record's cleanup: a VM's handler records them (the VM ends with them, or the run
/// stops before the VM starts); a container or process gets them forwarded, so they are blocked
/// here (before any thread starts, so every thread keeps them blocked) for its wait.
fn take_signals(isolation: Isolation) -> Result<(), Error> {
    match isolation {
        Isolation::Vm => vmm::signals::install(),
        Isolation::Container | Isolation::Process => {
            guest_agent::runtime::block_forwarded_signals()?;
        }
    }
    Ok(())
}

/// The run's root directory and image config.
struct RootFs {
    dir: PathBuf,
    config: ImageConfig,
}

/// Resolves the spec's source: an image is found (or pulled) and unpacked, and its digest pinned
/// in the spec, so a runner reading the spec later runs exactly this image.
fn resolve_source(root: &Path, source: &mut Source) -> Result<RootFs, Error> {
    match source {
        Source::Image { reference, digest } => {
            let resolved = image::resolve(root, reference, digest.as_deref())?;
            *digest = Some(resolved.digest);
            Ok(RootFs {
                dir: resolved.dir,
                config: resolved.config,
            })
        }
        Source::Rootfs { path } => Ok(RootFs {
            dir: path.clone(),
            config: ImageConfig::default(),
        }),
    }
}

/// The container's first process: the image config with the spec's overrides.
fn resolve_process(spec: &RunSpec, config: &ImageConfig) -> Result<Process, Error> {
    // `-e KEY` entries were filled in when the spec was built: nothing comes from here.
    let process = command::resolve(config, &spec.command, |_| None);
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
    rootfs: PathBuf,
    process: Process,
    guard: RunGuard,
    runner: bool,
) -> Result<Exit, Error> {
    let run = Run {
        root,
        spec,
        rootfs,
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
