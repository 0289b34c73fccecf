//! `mvm`: run OCI images in KVM microVMs, containers or plain processes. The command line only:
//! each subcommand's module parses its flags into the engine's types (`mvm run` into an
//! `engine::RunSpec`), calls the engine (or, for `boot` and `info`, the `vmm` crate) and prints
//! the result; this module dispatches and turns errors into one line and an exit code.
//!
//! Exit codes: a command's own code on success (for `run`, the container's); 2 for bad input
//! (flags, paths, files that are not what they claim to be); 1 for anything that failed later.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[macro_use]
mod output;

mod boot;
mod example;
mod image;
mod info;
mod lifecycle;
mod run;
mod version;

/// Exit code for bad input: wrong flags, missing or malformed files.
pub const EXIT_BAD_INPUT: i32 = engine::error::EXIT_BAD_INPUT;
/// Exit code for failures after the input was accepted.
pub const EXIT_FAILURE: i32 = engine::error::EXIT_FAILURE;

/// An error caused by what the user asked for rather than by the machine: exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Shorthand for returning a [`BadInput`] error.
pub fn bad_input(msg: impl Into<String>) -> anyhow::Error {
    BadInput(msg.into()).into()
}

/// An engine error as this binary reports it: bad input and command exits keep their exit code.
pub fn from_engine(e: engine::Error) -> anyhow::Error {
    match e {
        engine::Error::Exit(exit) => exit.into(),
        e if e.is_bad_input() => BadInput(engine::error::one_line(&e)).into(),
        e => e.into(),
    }
}

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
    Boot(boot::BootArgs),
    /// Show what this host's KVM offers.
    Info(info::InfoArgs),
    /// Build an example OCI image (busybox or nginx) from Debian packages.
    BuildExample(example::BuildExampleArgs),
    /// Run a command from an image in a microVM, a container or a plain process.
    Run(Box<run::RunArgs>),
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
    /// Remove a container (-f: stop it first).
    Rm(lifecycle::RmArgs),
    /// Print a container's record as JSON.
    Inspect(lifecycle::InspectArgs),
}

fn main() {
    std::process::exit(run_main());
}

/// Parses the command line, runs the command and returns the process exit code.
fn run_main() -> i32 {
    // The background runner of `run -d` (see `engine::runner`): no command line to parse.
    if let Some(dir) = engine::runner::requested() {
        init_logging();
        return report(engine::runner::serve(&dir).map_err(from_engine));
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
        Command::Boot(args) => boot::run(&args),
        Command::Info(args) => info::run(&args),
        Command::BuildExample(args) => example::run(&args, cli.root),
        Command::Run(args) => run::run(&root_dir(cli.root), &args),
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
        Command::Rm(args) => lifecycle::rm(&root_dir(cli.root), &args),
        Command::Inspect(args) => lifecycle::inspect(&root_dir(cli.root), &args),
    };
    report(result)
}

/// A command's exit code, or its error on one line and the code that says what kind it was.
fn report(result: anyhow::Result<i32>) -> i32 {
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("mvm: {err:#}");
            if let Some(engine::CommandExit(code, _)) = err.downcast_ref::<engine::CommandExit>() {
                return *code;
            }
            if let Some(e) = err.downcast_ref::<engine::Error>() {
                return e.exit_code();
            }
            if err.chain().any(|e| e.is::<BadInput>()) {
                EXIT_BAD_INPUT
            } else {
                EXIT_FAILURE
            }
        }
    }
}

/// The store and state directory: `--root`, else the default for this user.
pub fn root_dir(root: Option<PathBuf>) -> PathBuf {
    if let Some(root) = root {
        // Absolute, so paths derived from it work as overlay and mount options.
        return std::path::absolute(&root).unwrap_or(root);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/mvm");
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("mvm"),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".local/share/mvm"),
    }
}

/// Logs go to stderr; `MVM_LOG=debug` (or info, warn, trace) turns them up. Default: warnings.
fn init_logging() {
    let level = std::env::var("MVM_LOG").unwrap_or_default();
    guest_agent::logger::init("mvm", guest_agent::logger::parse_level(&level));
}
