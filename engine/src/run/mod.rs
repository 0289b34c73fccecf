//! `mvm run`: one [`RunSpec`] through one path for every isolation.
//!
//! 1. [`RunSpec::validate`] checks the spec against the host, once.
//! 2. [`image::resolve`] finds (or pulls) the image and unpacks it, pinning its digest in the
//!    spec; the image config and the spec's overrides give the command ([`command::resolve`]).
//! 3. The container is registered ([`RunGuard`]: one record, one name namespace, one id
//!    generator for every isolation) and the spec written next to its record.
//! 4. A microVM, and any run with `-d`, is owned by a runner process ([`runner`]), which reads
//!    the spec back and runs it ([`resume`]; with `-d` it also keeps `--restart`); a foreground `mvm run` is its client: it waits for
//!    it with the terminal's output and forwards its signals. A foreground container or process
//!    runs in this process. Either way the run happens in a microVM ([`vm`]), a container on the
//!    host ([`container`]) or a plain process ([`process`]), its output going to the container
//!    log and the terminal ([`crate::logs`]), its owner answering on the control socket
//!    ([`crate::control`]).

mod container;
mod context;
mod process;
mod template;
mod vm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_agent::runtime::{command, spec::SpecError, ImageConfig, Process};

use crate::error::{bad_input, Error};
use crate::image;
use crate::restart::Backoff;
use crate::runner::{self, RunGuard, RUNNER_ENV};
use crate::spec::{Isolation, RunSpec, Source};
use crate::state::{new_id, ContainerRecord, StateStore};
pub use context::Exit;
use context::{Caller, Run};
pub use template::{vmm_main as template_vmm_main, TEMPLATE_JOB};
pub(crate) use vm::{find_agent, vm_disks, warm_vm_caches};
pub use vm::{vmm_main, RunJob};

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
    // A fork runs its snapshot's spec, with this run's name, ports and ways of running.
    let spec = match spec.from_snapshot.clone() {
        Some(name) => crate::snapshot::fork_spec(root, &name, spec)?,
        None => spec,
    };
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
    let via_runner = spec.detach || spec.isolation == Isolation::Vm;
    if !spec.detach {
        if via_runner {
            // Held until the runner runs, then forwarded to it (a terminal's size changes too).
            guest_agent::runtime::block_forwarded_signals()?;
        } else {
            take_signals(spec.isolation)?;
        }
        if spec.tty {
            crate::terminal::block_winch()?;
        }
    }
    let mut guard = RunGuard::create(store, record, spec.remove)?;
    runner::write_spec(guard.dir(), &spec)?;
    if spec.detach {
        return runner::detach(guard).map(RunOutcome::Detached);
    }
    if via_runner {
        let name = guard.record().name.clone();
        let code = runner::foreground(guard)?;
        return Ok(RunOutcome::Exited(Exit {
            name,
            code,
            oom_killed: false,
        }));
    }
    execute(
        root,
        &spec,
        rootfs.dir,
        process,
        &mut guard,
        Caller::Foreground,
    )
    .map(RunOutcome::Exited)
}

/// The runner's side (see [`runner`]): takes over the container registered in `dir` and runs its
/// spec (the image is the one the spec pins), again after each exit as its `--restart` policy
/// says ([`crate::restart`]); returns how the container last exited. `foreground`: for a
/// foreground `mvm run`, whose terminal this process inherited. A run that fails to start ends
/// the runner with its error.
pub fn resume(dir: &Path, foreground: bool) -> Result<Exit, Error> {
    let (store, id) = StateStore::of_container_dir(dir)
        .ok_or_else(|| bad_input(format!("{RUNNER_ENV}={}: not a container", dir.display())))?;
    let record = store.load(&id)?;
    let mut spec = runner::read_spec(dir)?;
    take_signals(spec.isolation)?;
    if foreground && spec.tty {
        // Its client forwards the terminal's size changes.
        crate::terminal::block_winch()?;
    }
    let mut guard = RunGuard::adopt(store.clone(), record, spec.remove)?;
    let root = store.root();
    let rootfs = resolve_source(root, &mut spec.source)?;
    let process = resolve_process(&spec, &rootfs.config)?;
    guard.restart_policy(spec.restart);
    let mut backoff = Backoff::default();
    let mut caller = if foreground {
        Caller::Foreground
    } else {
        Caller::Runner { first: true }
    };
    loop {
        let began = Instant::now();
        let exit = execute(
            root,
            &spec,
            rootfs.dir.clone(),
            process.clone(),
            &mut guard,
            caller,
        )?;
        if !guard.restarts() {
            return Ok(exit);
        }
        caller = Caller::Runner { first: false };
        guard.clean_between_runs();
        let delay = backoff.next(began.elapsed());
        log::info!(
            "{} exited with code {}: restarting in {delay:?} (--restart {})",
            exit.name,
            exit.code,
            spec.restart
        );
        let until = Instant::now() + delay;
        while Instant::now() < until {
            if guard.told_to_stop() {
                return Ok(exit);
            }
            std::thread::sleep(RESTART_POLL.min(until - Instant::now()));
        }
    }
}

/// How often a runner waiting to restart a container looks for a stop.
const RESTART_POLL: Duration = Duration::from_millis(100);

/// From here on SIGINT and SIGTERM no longer end this process at once, so every path goes
/// through the record's cleanup: they are blocked here (before any thread starts, so every
/// thread keeps them blocked) and forwarded to what runs the container: a VM's VMM process
/// (which ends the VM with them, or stops before the VM starts), a container or process.
fn take_signals(_isolation: Isolation) -> Result<(), Error> {
    guest_agent::runtime::block_forwarded_signals()?;
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

/// Runs the registered container in this process, once.
fn execute(
    root: &Path,
    spec: &RunSpec,
    rootfs: PathBuf,
    process: Process,
    guard: &mut RunGuard,
    caller: Caller,
) -> Result<Exit, Error> {
    let run = Run {
        root,
        spec,
        rootfs,
        process,
        guard,
        caller,
    };
    match spec.isolation {
        Isolation::Vm => vm::run(run),
        Isolation::Container => container::run(run),
        Isolation::Process => process::run(run),
    }
}
