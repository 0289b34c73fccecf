//! `mvm`: run OCI images in KVM microVMs, containers or plain processes. The command line only:
//! each subcommand's module parses its flags into the engine's types (`mvm run` into an
//! `engine::RunSpec`), calls the engine (or, for `boot` and `info`, the `vmm` crate) and prints
//! the result; this module dispatches and turns errors into one line and an exit code.
//!
//! Exit codes: a command's own code on success (for `run`, the container's); 2 for bad input
//! (flags, paths, files that are not what they claim to be); 1 for anything that failed later.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use engine::state::default_root as root_dir;

use crate::error::{from_engine, report, EXIT_BAD_INPUT};

#[macro_use]
mod output;

mod boot;
mod compare;
mod copy;
mod error;
mod example;
mod image;
mod info;
mod lifecycle;
mod run;
mod snapshot;
mod stats;
mod template;
mod version;

/// mvm runs OCI container images inside lightweight KVM virtual machines.
#[derive(Debug, Parser)]
#[command(name = "mvm", version, disable_help_subcommand = true)]
pub struct Cli {
    /// Directory that holds images, containers and VM state
    /// (default: /var/lib/mvm for root, $XDG_DATA_HOME/mvm otherwise).
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print mvm's version and the versions of its parts.
    Version(version::VersionArgs),
    /// Boot a guest kernel directly in a microVM and wait until it ends.
    Boot(Box<boot::BootArgs>),
    /// Show what this host's KVM offers.
    Info(info::InfoArgs),
    /// Build an example OCI image (busybox or nginx) from Debian packages.
    BuildExample(example::BuildExampleArgs),
    /// Run a command from an image in a microVM, a container or a plain process.
    Run(Box<run::RunArgs>),
    /// Run one image as a process, a container and a microVM and compare them: what it sees,
    /// the limits, the attack surface, escape probes, cost.
    Compare(Box<compare::CompareArgs>),
    /// Pull an image from a registry into the local store.
    Pull(image::PullArgs),
    /// List the images in the local store.
    Images(image::ImagesArgs),
    /// Remove images from the local store (and the layers nothing else uses).
    Rmi(image::RmiArgs),
    /// Load images from an OCI layout or a `docker save` archive.
    Load(image::LoadArgs),
    /// Push an image from the local store to a registry.
    Push(image::PushArgs),
    /// List containers (running ones; -a for all).
    Ps(lifecycle::PsArgs),
    /// Print a container's output (-f: follow until it exits).
    Logs(lifecycle::LogsArgs),
    /// Run a command in a running container.
    Exec(lifecycle::ExecArgs),
    /// Stop a container: SIGTERM, then SIGKILL after a grace period.
    Stop(lifecycle::StopArgs),
    /// Send a signal to a container.
    Kill(lifecycle::KillArgs),
    /// Pause VM containers: their vCPUs stop, their memory and devices stay.
    Pause(lifecycle::PauseArgs),
    /// Let paused VM containers run again.
    Unpause(lifecycle::PauseArgs),
    /// Remove a container (-f: stop it first).
    Rm(lifecycle::RmArgs),
    /// Print a container's record as JSON.
    Inspect(lifecycle::InspectArgs),
    /// Show a running container's terminal or output here, with input (detach: ctrl-p,ctrl-q).
    Attach(lifecycle::AttachArgs),
    /// Copy files between a container and the host (a tar stream; `-` for stdin/stdout).
    Cp(copy::CpArgs),
    /// Show containers' CPU, memory, network and disk use, and their processes' count.
    Stats(stats::StatsArgs),
    /// Show the processes of a container.
    Top(stats::TopArgs),
    /// Wait until containers exit and print their exit codes.
    Wait(lifecycle::WaitArgs),
    /// Show a container's published ports.
    Port(lifecycle::PortArgs),
    /// Give a container a new name.
    Rename(lifecycle::RenameArgs),
    /// List or remove VM templates (saved guests that later runs restore instead of booting).
    Template(template::TemplateArgs),
    /// Save running VM containers as snapshots (`mvm run --from-snapshot` forks them), list or
    /// remove them.
    Snapshot(snapshot::SnapshotArgs),
}

fn main() {
    std::process::exit(run_main());
}

/// Parses the command line, runs the command and returns the process exit code.
fn run_main() -> i32 {
    // Started again by mvm itself (runner, VMM) through /proc/self/exe: named mvm again.
    engine::selfexec::name_self();
    // A VMM process started by its supervisor (see `engine::confine`).
    if let Some(request) = engine::confine::vmm_request() {
        init_logging();
        let request = match request {
            Ok(r) => r,
            Err(e) => return report(Err(e.into())),
        };
        return match request.kind.as_str() {
            "run" => report(engine::run::vmm_main(&request).map_err(from_engine)),
            "boot" => report(boot::vmm_main(&request)),
            engine::run::TEMPLATE_JOB => {
                report(engine::run::template_vmm_main(&request).map_err(from_engine))
            }
            other => report(Err(anyhow::anyhow!("unknown VMM job {other:?}"))),
        };
    }
    // The runner of a microVM or of `run -d` (see `engine::runner`): no command line to parse.
    if let Some(runner) = engine::runner::requested() {
        init_logging();
        let exit = engine::run::resume(&runner.dir, runner.foreground).map_err(from_engine);
        return report(exit.map(|e| run::report_exit(&e, None)));
    }
    // One run of `mvm compare` (see `engine::compare`): likewise.
    if let Some(file) = engine::compare::requested() {
        init_logging();
        return report(engine::compare::run_child(&file).map_err(from_engine));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_BAD_INPUT } else { 0 };
            // clap's usage errors span several lines; keep the first, which names the problem.
            if e.use_stderr() {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("invalid arguments");
                eprintln!("mvm: {}", first.trim_start_matches("error: "));
            } else {
                let _ = e.print();
            }
            return code;
        }
    };
    init_logging();
    let result = match cli.command {
        Command::Version(args) => version::run(&args),
        Command::Boot(args) => boot::run(&root_dir(cli.root), &args),
        Command::Info(args) => info::run(&args),
        Command::BuildExample(args) => example::run(&args, cli.root),
        Command::Run(args) => run::run(&root_dir(cli.root), &args),
        Command::Compare(args) => compare::run(&root_dir(cli.root), &args),
        Command::Pull(args) => image::pull(&root_dir(cli.root), &args),
        Command::Images(args) => image::images(&root_dir(cli.root), &args),
        Command::Rmi(args) => image::rmi(&root_dir(cli.root), &args),
        Command::Load(args) => image::load(&root_dir(cli.root), &args),
        Command::Push(args) => image::push(&root_dir(cli.root), &args),
        Command::Ps(args) => lifecycle::ps(&root_dir(cli.root), &args),
        Command::Logs(args) => lifecycle::logs(&root_dir(cli.root), &args),
        Command::Exec(args) => lifecycle::exec(&root_dir(cli.root), &args),
        Command::Stop(args) => lifecycle::stop(&root_dir(cli.root), &args),
        Command::Kill(args) => lifecycle::kill(&root_dir(cli.root), &args),
        Command::Pause(args) => lifecycle::pause(&root_dir(cli.root), &args, true),
        Command::Unpause(args) => lifecycle::pause(&root_dir(cli.root), &args, false),
        Command::Rm(args) => lifecycle::rm(&root_dir(cli.root), &args),
        Command::Inspect(args) => lifecycle::inspect(&root_dir(cli.root), &args),
        Command::Attach(args) => lifecycle::attach(&root_dir(cli.root), &args),
        Command::Cp(args) => copy::cp(&root_dir(cli.root), &args),
        Command::Stats(args) => stats::stats(&root_dir(cli.root), &args),
        Command::Top(args) => stats::top(&root_dir(cli.root), &args),
        Command::Wait(args) => lifecycle::wait(&root_dir(cli.root), &args),
        Command::Port(args) => lifecycle::port(&root_dir(cli.root), &args),
        Command::Rename(args) => lifecycle::rename(&root_dir(cli.root), &args),
        Command::Template(args) => template::run(&root_dir(cli.root), &args),
        Command::Snapshot(args) => snapshot::run(&root_dir(cli.root), &args),
    };
    report(result)
}

/// Logs go to stderr; `MVM_LOG=debug` (or info, warn, trace) turns them up. Default: warnings.
fn init_logging() {
    let level = std::env::var("MVM_LOG").unwrap_or_default();
    guest_agent::logger::init("mvm", guest_agent::logger::parse_level(&level));
}
