//! `mvm run`: run a command from an image (or a plain root directory) in a microVM, a container
//! or a bare process.
//!
//! The flags follow `docker run`. Image resolution is one seam, [`resolve_source`]: everything
//! after it only needs a root filesystem (lower directories) and an image config.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use guest_agent::runtime::security::{IdMapping, Security};
use guest_agent::runtime::spec::BindMount;
use guest_agent::runtime::{
    self, command, spec, Container, ContainerError, ContainerSpec, ImageConfig, Limits, Network,
    Overrides, Rootfs, StdioConfig,
};

use super::bad_input;

/// How the command is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Isolation {
    /// Its own VM and guest kernel.
    Vm,
    /// A container on the host kernel (namespaces, overlay root, cgroup limits).
    Container,
    /// A plain process on the host: no namespaces, no limits.
    Process,
}

/// Flags of `mvm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Image to run.
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// Run this directory as the root filesystem instead of an image (it is never modified: the
    /// container writes to an overlay).
    #[arg(long, value_name = "DIR", conflicts_with = "image")]
    pub rootfs: Option<PathBuf>,
    /// Container name (default: a random id).
    #[arg(long)]
    pub name: Option<String>,
    /// Remove the container's files when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Run in the background and print the container id (--isolation vm).
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Memory limit, e.g. 256M or 1G.
    #[arg(long, short = 'm', visible_alias = "memory", value_name = "SIZE")]
    pub mem: Option<String>,
    /// CPU limit as a number of CPUs (fractions allowed).
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[arg(long, value_name = "N")]
    pub pids_limit: Option<u64>,
    /// Set an environment variable (KEY=VALUE, or KEY to copy it from here).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Replace the image's entrypoint ("" clears it).
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,
    /// User: uid, uid:gid, name or name:group.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Hostname inside the container.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Run a tiny init as PID 1 that forwards signals and reaps zombies.
    #[arg(long)]
    pub init: bool,
    /// Network. VM: user (rootless, passt), tap, tap:NAME[,IP/PREFIX] or none (default none).
    /// Container: none (loopback only, the default) or host.
    #[arg(long, value_name = "MODE")]
    pub network: Option<String>,
    /// Isolation: vm, container or process.
    #[arg(long, value_enum, default_value = "vm")]
    pub isolation: Isolation,
    /// Guest kernel for --isolation vm (default: <root>/kernel/vmlinux from scripts/build-kernel.sh).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Extra guest kernel arguments, appended to mvm's own (--isolation vm).
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub kernel_args: Option<String>,
    /// Publish a guest port on the host: [IP:]HOSTPORT:GUESTPORT[/tcp] (--isolation vm).
    #[arg(short = 'p', long = "publish", value_name = "HOST:GUEST")]
    pub publish: Vec<String>,
    /// Make a host directory visible inside: HOSTPATH:PATH[:ro]. A container sees the host
    /// directory itself; a VM gets a copy on a disk image made at start (never a live share).
    #[arg(short = 'v', long = "volume", value_name = "HOST:PATH[:ro]")]
    pub volumes: Vec<String>,
    /// Security option: seccomp=unconfined, seccomp=PROFILE.json (docker's format), or
    /// no-new-privileges[=true|false] (default true).
    #[arg(long = "security-opt", value_name = "OPT")]
    pub security_opt: Vec<String>,
    /// Add a capability to docker's default set (e.g. NET_ADMIN; ALL for every one).
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Drop a capability from docker's default set (ALL for every one).
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// User namespace (--isolation container): host (default), auto (root's range in
    /// /etc/subuid, else 100000:65536) or HOSTID:SIZE; container root is then that host id.
    #[arg(long, value_name = "MODE")]
    pub userns: Option<String>,
    /// Stop after this long (e.g. 30s, 5m) and exit 124 (--isolation vm).
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Command and arguments (after `--`); replace the image's Cmd.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// A root filesystem and the config to start it with.
#[derive(Debug)]
pub struct Source {
    /// Read-only lower directories, topmost first.
    pub lower: Vec<PathBuf>,
    /// The image config (empty for `--rootfs`).
    pub config: ImageConfig,
}

/// Resolves `--image` or `--rootfs` to a root filesystem and image config. The one place the
/// image store plugs in.
pub fn resolve_source(root: &Path, args: &RunArgs) -> anyhow::Result<Source> {
    match (&args.image, &args.rootfs) {
        (Some(image), _) => {
            let image = super::image::find_or_pull(root, image)?;
            let dir = super::image::image_rootfs(root, &image)?;
            let c = image.config;
            Ok(Source {
                lower: vec![dir],
                config: ImageConfig {
                    entrypoint: c.entrypoint.unwrap_or_default(),
                    cmd: c.cmd.unwrap_or_default(),
                    env: c.env.unwrap_or_default(),
                    working_dir: c.working_dir,
                    user: c.user,
                },
            })
        }
        (None, Some(dir)) => {
            let dir = std::fs::canonicalize(dir)
                .ok()
                .filter(|d| d.is_dir())
                .ok_or_else(|| {
                    bad_input(format!("--rootfs {}: no such directory", dir.display()))
                })?;
            Ok(Source {
                lower: vec![dir],
                config: ImageConfig::default(),
            })
        }
        (None, None) => Err(bad_input("give --image IMAGE or --rootfs DIR")),
    }
}

/// The network of a container on the host: none (the default) or host.
fn container_network(mode: Option<&str>) -> anyhow::Result<Network> {
    match mode.unwrap_or("none") {
        "none" => Ok(Network::None),
        "host" => Ok(Network::Host),
        other => Err(bad_input(format!(
            "--network {other}: a container on the host takes none or host"
        ))),
    }
}

/// Runs `mvm run`; returns the command's exit code.
pub fn run(root: &Path, args: &RunArgs) -> anyhow::Result<i32> {
    let limits = limits(args)?;
    if let Some(n) = &args.name {
        spec::validate_id(n).map_err(|e| bad_input(e.to_string()))?;
    }
    if let Some(h) = &args.hostname {
        spec::validate_hostname(h).map_err(|e| bad_input(e.to_string()))?;
    }
    if args.detach && args.isolation != Isolation::Vm {
        return Err(bad_input("-d (detach) needs --isolation vm"));
    }
    security(args)?;
    let source = resolve_source(root, args)?;
    let overrides = Overrides {
        entrypoint: args.entrypoint.clone(),
        cmd: args.command.clone(),
        env: args.env.clone(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
    };
    let process = command::resolve(&source.config, &overrides, |k| std::env::var(k).ok());
    if process.args.is_empty() {
        return Err(bad_input(spec::SpecError::NoCommand.to_string()));
    }
    match args.isolation {
        Isolation::Process => run_process(args, &limits, &process),
        Isolation::Vm => super::run_vm::run_vm(root, args, limits, source, process),
        Isolation::Container => run_container(root, args, limits, source, process),
    }
}

fn limits(args: &RunArgs) -> anyhow::Result<Limits> {
    let memory_bytes = args
        .mem
        .as_deref()
        .map(spec::parse_size)
        .transpose()
        .map_err(|e| bad_input(format!("--mem: {e}")))?;
    if let Some(c) = args.cpus {
        let have = std::thread::available_parallelism().map_or(1, usize::from);
        #[allow(clippy::cast_precision_loss)]
        let max = have as f64;
        if !(c.is_finite() && c >= 0.01 && c <= max) {
            return Err(bad_input(format!(
                "--cpus {c}: use a number from 0.01 to {have} (the CPUs available)"
            )));
        }
    }
    if args.pids_limit == Some(0) {
        return Err(bad_input("--pids-limit must be at least 1"));
    }
    Ok(Limits {
        memory_bytes,
        cpus: args.cpus,
        pids_max: args.pids_limit,
    })
}

fn random_id() -> String {
    let mut b = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    if b == [0; 6] {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The `--security-opt`, `--cap-add`, `--cap-drop` and `--userns` flags.
pub fn security(args: &RunArgs) -> anyhow::Result<Security> {
    let mut s = Security {
        cap_add: args.cap_add.clone(),
        cap_drop: args.cap_drop.clone(),
        ..Security::default()
    };
    for opt in &args.security_opt {
        s.apply_opt(opt).map_err(|e| bad_input(e.to_string()))?;
    }
    s.userns = match args.userns.as_deref() {
        None => None,
        Some(_) if args.isolation == Isolation::Vm => return Err(bad_input(
            "--userns works with --isolation container (a VM gives the container its own kernel)",
        )),
        Some(mode) => IdMapping::parse(mode).map_err(|e| bad_input(e.to_string()))?,
    };
    s.validate().map_err(|e| bad_input(e.to_string()))?;
    Ok(s)
}

/// The `-v` flags, with each host path made absolute and checked to exist.
pub fn volumes(args: &RunArgs) -> anyhow::Result<Vec<BindMount>> {
    args.volumes
        .iter()
        .map(|v| {
            let (host, rest) = v.split_once(':').unwrap_or((v, ""));
            let host = std::fs::canonicalize(host)
                .map_err(|e| bad_input(format!("-v {v}: {host}: {e}")))?;
            BindMount::parse(&format!("{}:{rest}", host.display()))
                .map_err(|e| bad_input(format!("-v {v}: {e}")))
        })
        .collect()
}

fn run_container(
    root: &Path,
    args: &RunArgs,
    limits: Limits,
    source: Source,
    process: command::Process,
) -> anyhow::Result<i32> {
    let network = container_network(args.network.as_deref())?;
    let mounts = volumes(args)?;
    let id = args.name.clone().unwrap_or_else(random_id);
    let dir = root.join("containers").join(&id);
    // Root-only, as all of the root: the kept layer may hold the container's setuid files.
    rootfs_builder::rootdir::prepare_root(root)?;
    match std::fs::DirBuilder::new()
        .mode(rootfs_builder::rootdir::PRIVATE_DIR)
        .create(&dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(bad_input(format!(
                "container name {id} is already in use (its files are in {})",
                dir.display()
            )))
        }
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let memory_limit = limits.memory_bytes;
    let security = security(args)?;
    let spec = ContainerSpec {
        id: id.clone(),
        rootfs: Rootfs::Overlay {
            lower: source.lower,
            upper: dir.join("upper"),
            work: dir.join("work"),
        },
        args: process.args,
        env: process.env,
        cwd: process.cwd,
        user: process.user,
        hostname: args.hostname.clone(),
        limits,
        terminal: false,
        network,
        init: args.init,
        cgroup_parent: None,
        mounts,
        security,
    };
    let result = (|| {
        for d in ["upper", "work"] {
            std::fs::create_dir(dir.join(d))
                .with_context(|| format!("cannot create {}", dir.join(d).display()))?;
        }
        if let Some(m) = &spec.security.userns {
            for d in ["upper", "work"] {
                std::os::unix::fs::chown(dir.join(d), Some(m.host_uid), Some(m.host_gid))
                    .with_context(|| {
                        format!("cannot hand {} to --userns", dir.join(d).display())
                    })?;
            }
        }
        runtime::block_forwarded_signals()?;
        // Never the terminal itself: a terminal is relayed through pipes.
        let mut container = Container::start(&spec, &StdioConfig::for_host(&spec))?;
        let relay = container.relay_stdio();
        let exit = container.wait_forwarding_signals()?;
        relay.finish();
        anyhow::Ok(exit)
    })();
    // The overlay's work directory is scratch; the upper is the container's writable layer,
    // kept without --rm (with the spec, for a later `mvm rm`) and removed with it.
    let started = result.is_ok();
    if args.rm || !started {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            log::warn!("cannot remove {}: {e}", dir.display());
        }
    } else {
        let _ = std::fs::remove_dir_all(dir.join("work"));
        if let Ok(json) = serde_json::to_vec_pretty(&spec) {
            let _ = std::fs::write(dir.join("spec.json"), json);
        }
    }
    let exit = match result {
        Ok(exit) => exit,
        Err(e) => return Err(map_start_error(e)),
    };
    if exit.oom_killed {
        let limit = memory_limit.map_or(String::new(), |m| format!(" (limit {})", human(m)));
        eprintln!("mvm: container {id}: a process was killed for running out of memory{limit}");
    }
    Ok(exit.code)
}

/// Exit codes as Docker: 127 for a missing command, 126 for one that cannot be executed.
fn map_start_error(e: anyhow::Error) -> anyhow::Error {
    match e.downcast_ref::<ContainerError>() {
        Some(ContainerError::CommandNotFound(_)) => CommandExit(127, e.to_string()).into(),
        Some(ContainerError::NotExecutable(_)) => CommandExit(126, e.to_string()).into(),
        Some(ContainerError::Spec(_) | ContainerError::User(_)) => bad_input(e.to_string()),
        _ => e,
    }
}

/// A failure that ends `mvm run` with a specific exit code (126, 127) after one error line.
#[derive(Debug, thiserror::Error)]
#[error("{1}")]
pub struct CommandExit(pub i32, pub String);

fn human(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{}G", bytes >> 30)
    } else if bytes % (1 << 20) == 0 {
        format!("{}M", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// `--isolation process`: the command straight on the host, with the same environment and
/// working directory rules but no namespaces and no limits.
fn run_process(args: &RunArgs, limits: &Limits, process: &command::Process) -> anyhow::Result<i32> {
    if limits.any() {
        log::warn!("--isolation process applies no limits (--mem, --cpus, --pids-limit ignored)");
    }
    let mut cmd = std::process::Command::new(&process.args[0]);
    cmd.args(&process.args[1..]).env_clear();
    for e in &process.env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    if let Some(w) = &args.workdir {
        cmd.current_dir(w);
    }
    runtime::block_forwarded_signals()?;
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CommandExit(
                127,
                format!("{}: executable file not found", process.args[0]),
            )
            .into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(CommandExit(126, format!("{}: permission denied", process.args[0])).into())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot start {}", process.args[0])),
    };
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    let status = runtime::wait_forwarding_signals(pid, "the process")?;
    Ok(if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(16 << 20), "16M");
        assert_eq!(human(2 << 30), "2G");
        assert_eq!(human(1000), "1000 bytes");
    }

    #[test]
    fn ids_are_twelve_hex_digits() {
        let id = random_id();
        assert_eq!(id.len(), 12);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, random_id());
    }
}
