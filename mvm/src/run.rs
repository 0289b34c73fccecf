//! `mvm run`: the flags (as `docker run`'s) become one `engine::RunSpec`, and the engine runs it.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use engine::confine::VmmSecurity;
use engine::dns::{Dns, HostEntry};
use engine::logs::LogOptions;
use engine::spec::{self, DeviceLimit, Isolation, Network, RateLimits, RunSpec, Source};
use engine::units::{format_size, parse_duration, parse_size};
use engine::{Exit, RunOutcome};
use guest_agent::runtime::command::Overrides;
use guest_agent::runtime::security::{IdMapping, Security};
use guest_agent::runtime::Limits;

use crate::error::{bad_input, from_engine};

/// `--isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IsolationArg {
    /// Its own VM and guest kernel.
    Vm,
    /// A container on the host kernel (namespaces, overlay root, cgroup limits).
    Container,
    /// A plain process on the host: no namespaces, no limits.
    Process,
}

impl From<IsolationArg> for Isolation {
    fn from(a: IsolationArg) -> Self {
        match a {
            IsolationArg::Vm => Isolation::Vm,
            IsolationArg::Container => Isolation::Container,
            IsolationArg::Process => Isolation::Process,
        }
    }
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
    /// Start a copy of the container saved as this snapshot (`mvm snapshot create`): its
    /// processes go on where they were; the image, command, memory and disks are the
    /// snapshot's, the network too unless --network gives the fork its own (of the same kind:
    /// an interface, user or tap, or none).
    #[arg(
        long,
        value_name = "SNAPSHOT",
        conflicts_with_all = [
            "image", "rootfs", "command", "mem", "cpus", "pids_limit", "env", "workdir",
            "entrypoint", "user", "hostname", "init", "kernel", "kernel_args", "cold",
            "volumes", "security_opt", "cap_add", "cap_drop", "userns", "dns", "add_host",
            "no_hosts", "device_read_bps", "device_write_bps", "device_read_iops",
            "device_write_iops", "network_rate",
        ]
    )]
    pub from_snapshot: Option<String>,
    /// Container name (default: the first 12 digits of its id).
    #[arg(long)]
    pub name: Option<String>,
    /// Remove the container's files when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Run in the background and print the container id.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// With -d, start the container again when it exits: no, on-failure[:N] (at most N
    /// times), always or unless-stopped (as always: there is no daemon). mvm stop ends it.
    #[arg(long, value_name = "POLICY", default_value = "no")]
    pub restart: String,
    /// Keep stdin open and feed it to the container.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the container a terminal of its own, shown on this one (raw mode with -i; the size
    /// follows this terminal's).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// A DNS server for the container (repeatable; the host's non-loopback resolvers by
    /// default), or `none` to keep the image's /etc/resolv.conf. With --network user queries
    /// reach it from the host, through passt.
    #[arg(long = "dns", value_name = "IP")]
    pub dns: Vec<String>,
    /// Add a line to the container's /etc/hosts: NAME:IP (IP may be host-gateway).
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,
    /// Keep the image's /etc/hosts (no name lines written by mvm).
    #[arg(long)]
    pub no_hosts: bool,
    /// Container log rotation: max-size=SIZE (-1: none) or max-file=N (default 20m and 5, as
    /// docker's local driver).
    #[arg(long = "log-opt", value_name = "KEY=VALUE")]
    pub log_opt: Vec<String>,
    /// Memory limit, e.g. 256M, 1.5G (a VM's memory; 256M by default).
    #[arg(long, short = 'm', visible_alias = "memory", value_name = "SIZE")]
    pub mem: Option<String>,
    /// CPU limit as a number of CPUs (fractions allowed; a VM gets it rounded up as vCPUs).
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
    /// Network. VM: user (rootless, passt), tap, tap:NAME[,IP/PREFIX] or none (default: user
    /// where passt is installed, else none). Container: none (loopback only, the default) or host.
    #[arg(long, value_name = "MODE")]
    pub network: Option<String>,
    /// Isolation: vm, container or process.
    #[arg(long, value_enum, default_value = "vm")]
    pub isolation: IsolationArg,
    /// Guest kernel for --isolation vm (default: <root>/kernel/vmlinux from scripts/build-kernel.sh).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Extra guest kernel arguments, appended to mvm's own (--isolation vm).
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub kernel_args: Option<String>,
    /// Boot the guest kernel instead of restoring the VM's template (--isolation vm; a first
    /// run of a shape boots cold and saves its template, later runs restore it).
    #[arg(long)]
    pub cold: bool,
    /// Publish a guest port on the host: [IP:]HOSTPORT:GUESTPORT[/tcp] (--isolation vm).
    #[arg(short = 'p', long = "publish", value_name = "HOST:GUEST")]
    pub publish: Vec<String>,
    /// Make a host directory visible inside: HOSTPATH:PATH[:ro]. A container sees the host
    /// directory itself; a VM gets a copy on a disk image made at start (never a live share).
    #[arg(short = 'v', long = "volume", value_name = "HOST:PATH[:ro]")]
    pub volumes: Vec<String>,
    /// Security option: seccomp=unconfined, seccomp=PROFILE.json (docker's format), or
    /// no-new-privileges[=true|false] (default false, as docker), for the container; for a VM's
    /// VMM process: vmm-seccomp=off, vmm-jail=off (both for debugging only), vmm-user=UID[:GID]
    /// or vmm-user=range[:BASE:SIZE] (its own user from a range, the default).
    #[arg(long = "security-opt", value_name = "OPT")]
    pub security_opt: Vec<String>,
    /// Limit reads from a VM's disk: DEVICE:RATE, e.g. /dev/vda:10mb (vda is the image, vdb...
    /// the volumes).
    #[arg(long = "device-read-bps", value_name = "DEVICE:RATE")]
    pub device_read_bps: Vec<String>,
    /// Limit writes to a VM's disk: DEVICE:RATE, e.g. /dev/vdb:10mb.
    #[arg(long = "device-write-bps", value_name = "DEVICE:RATE")]
    pub device_write_bps: Vec<String>,
    /// Limit read requests on a VM's disk: DEVICE:N per second, e.g. /dev/vda:1000.
    #[arg(long = "device-read-iops", value_name = "DEVICE:N")]
    pub device_read_iops: Vec<String>,
    /// Limit write requests on a VM's disk: DEVICE:N per second.
    #[arg(long = "device-write-iops", value_name = "DEVICE:N")]
    pub device_write_iops: Vec<String>,
    /// Limit a VM's network, each direction: BYTES[:PACKETS] per second, e.g. 1mb or 1mb:1000.
    #[arg(long = "network-rate", value_name = "RATE")]
    pub network_rate: Option<String>,
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

/// The spec the flags describe. Values are parsed here (sizes, durations, ports, networks,
/// volumes, `-e KEY` from this environment); the engine validates the whole.
pub fn to_spec(args: &RunArgs) -> anyhow::Result<RunSpec> {
    let source = match (&args.image, &args.rootfs) {
        // The snapshot's own replaces it (engine::snapshot::fork_spec).
        _ if args.from_snapshot.is_some() => Source::Rootfs {
            path: PathBuf::from("/"),
        },
        (Some(image), _) => Source::Image {
            reference: image.clone(),
            digest: None,
        },
        (None, Some(dir)) => Source::Rootfs {
            path: std::fs::canonicalize(dir)
                .ok()
                .filter(|d| d.is_dir())
                .ok_or_else(|| {
                    bad_input(format!("--rootfs {}: no such directory", dir.display()))
                })?,
        },
        (None, None) => {
            return Err(bad_input(
                "give --image IMAGE, --rootfs DIR or --from-snapshot SNAPSHOT",
            ))
        }
    };
    let memory_bytes = args
        .mem
        .as_deref()
        .map(parse_size)
        .transpose()
        .map_err(|e| bad_input(format!("--mem: {e}")))?;
    let env = args
        .env
        .iter()
        .filter_map(|e| {
            if e.contains('=') {
                Some(e.clone())
            } else {
                std::env::var(e).ok().map(|v| format!("{e}={v}"))
            }
        })
        .collect();
    let engine_err = |e: engine::Error| from_engine(e);
    Ok(RunSpec {
        name: args.name.clone(),
        source,
        isolation: args.isolation.into(),
        command: Overrides {
            entrypoint: args.entrypoint.clone(),
            cmd: args.command.clone(),
            env,
            workdir: args.workdir.clone(),
            user: args.user.clone(),
        },
        hostname: args.hostname.clone(),
        init: args.init,
        limits: Limits {
            memory_bytes,
            cpus: args.cpus,
            pids_max: args.pids_limit,
        },
        network: args
            .network
            .as_deref()
            .map(str::parse::<Network>)
            .transpose()
            .map_err(engine_err)?,
        publish: args
            .publish
            .iter()
            .map(|p| {
                p.parse()
                    .map_err(|e: engine::portfwd::PortError| bad_input(e.to_string()))
            })
            .collect::<anyhow::Result<_>>()?,
        volumes: args
            .volumes
            .iter()
            .map(|v| spec::parse_volume(v).map_err(engine_err))
            .collect::<anyhow::Result<_>>()?,
        security: security(args)?,
        vmm: vmm_security(args)?,
        rate_limits: rate_limits(args)?,
        timeout: args
            .timeout
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| bad_input(e.to_string()))?,
        remove: args.rm,
        detach: args.detach,
        restart: args.restart.parse().map_err(engine_err)?,
        interactive: args.interactive,
        tty: args.tty,
        dns: dns(args)?,
        log: {
            let mut log = LogOptions::default();
            for opt in &args.log_opt {
                log.apply(opt).map_err(engine_err)?;
            }
            log
        },
        kernel: args.kernel.clone(),
        kernel_args: args.kernel_args.clone(),
        mount_agent: false,
        cold: args.cold,
        from_snapshot: args.from_snapshot.clone(),
    })
}

/// The `--dns`, `--add-host` and `--no-hosts` flags.
fn dns(args: &RunArgs) -> anyhow::Result<Dns> {
    let mut dns = Dns {
        image_hosts: args.no_hosts,
        ..Dns::default()
    };
    for server in &args.dns {
        dns.add_server(server).map_err(from_engine)?;
    }
    for entry in &args.add_host {
        dns.add_hosts
            .push(entry.parse::<HostEntry>().map_err(from_engine)?);
    }
    Ok(dns)
}

/// The `--security-opt`, `--cap-add`, `--cap-drop` and `--userns` flags (the engine checks
/// the whole).
fn security(args: &RunArgs) -> anyhow::Result<Security> {
    let mut s = Security {
        cap_add: args.cap_add.clone(),
        cap_drop: args.cap_drop.clone(),
        ..Security::default()
    };
    for opt in args.security_opt.iter().filter(|o| !o.starts_with("vmm-")) {
        s.apply_opt(opt).map_err(|e| bad_input(e.to_string()))?;
    }
    s.userns = match args.userns.as_deref() {
        None => None,
        Some(mode) => IdMapping::parse(mode).map_err(|e| bad_input(e.to_string()))?,
    };
    Ok(s)
}

/// The VMM's `--security-opt vmm-...` values.
fn vmm_security(args: &RunArgs) -> anyhow::Result<VmmSecurity> {
    let mut s = VmmSecurity::default();
    for opt in &args.security_opt {
        s.apply_opt(opt).map_err(|e| bad_input(e.to_string()))?;
    }
    Ok(s)
}

/// The `--device-...` and `--network-rate` flags.
fn rate_limits(args: &RunArgs) -> anyhow::Result<RateLimits> {
    let mut r = RateLimits::default();
    for (which, values) in [
        (DeviceLimit::ReadBps, &args.device_read_bps),
        (DeviceLimit::WriteBps, &args.device_write_bps),
        (DeviceLimit::ReadIops, &args.device_read_iops),
        (DeviceLimit::WriteIops, &args.device_write_iops),
    ] {
        for v in values {
            r.apply_device(which, v).map_err(from_engine)?;
        }
    }
    if let Some(rate) = &args.network_rate {
        r.apply_network(rate).map_err(from_engine)?;
    }
    Ok(r)
}

/// Runs `mvm run`; returns the command's exit code (0 after `-d`, with the id printed).
pub fn run(root: &Path, args: &RunArgs) -> anyhow::Result<i32> {
    let spec = to_spec(args)?;
    if spec.tty && spec.interactive && !spec.detach && !engine::terminal::stdin_is_terminal() {
        return Err(bad_input(
            "the input device is not a TTY: drop -t, or run from a terminal",
        ));
    }
    let memory_limit = spec.limits.memory_bytes;
    match engine::run(root, spec).map_err(from_engine)? {
        RunOutcome::Detached(id) => {
            outln!("{id}");
            Ok(0)
        }
        RunOutcome::Exited(exit) => Ok(report_exit(&exit, memory_limit)),
    }
}

/// How a run ended, for the user: a line when the OOM killer struck; returns the exit code.
pub fn report_exit(exit: &Exit, memory_limit: Option<u64>) -> i32 {
    if exit.oom_killed {
        let limit = memory_limit.map_or(String::new(), |m| format!(" (limit {})", format_size(m)));
        eprintln!(
            "mvm: container {}: a process was killed for running out of memory{limit}",
            exit.name
        );
    }
    exit.code
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn spec(args: &[&str]) -> anyhow::Result<RunSpec> {
        let cli = Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))?;
        to_spec(&cli.run)
    }

    #[test]
    fn flags_become_one_spec() {
        std::env::set_var("MVM_TEST_FROM_HERE", "x");
        let s = spec(&[
            "--image",
            "busybox",
            "--mem",
            "1.5G",
            "-p",
            "8080:80",
            "--timeout",
            "2m",
            "--network",
            "tap:t0",
            "-e",
            "MVM_TEST_FROM_HERE",
            "-e",
            "MVM_TEST_UNSET_VAR",
            "-e",
            "A=1",
            "--",
            "echo",
            "hi",
        ])
        .unwrap();
        assert_eq!(s.limits.memory_bytes, Some(3 << 29));
        assert_eq!(s.publish[0].to_string(), "127.0.0.1:8080:80");
        assert_eq!(s.timeout, Some(std::time::Duration::from_secs(120)));
        assert_eq!(
            s.network.as_ref().map(ToString::to_string).as_deref(),
            Some("tap:t0")
        );
        assert_eq!(s.command.env, ["MVM_TEST_FROM_HERE=x", "A=1"]);
        assert_eq!(s.command.cmd, ["echo", "hi"]);
        assert_eq!(s.isolation, Isolation::Vm);
        let s = spec(&[
            "-it",
            "--image",
            "busybox",
            "--dns",
            "10.0.0.53",
            "--add-host",
            "db:10.0.0.7",
            "--log-opt",
            "max-size=1m",
            "--log-opt",
            "max-file=3",
            "sh",
        ])
        .unwrap();
        assert!(s.interactive && s.tty);
        assert_eq!(
            s.dns.servers,
            ["10.0.0.53".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(s.dns.add_hosts[0].to_string(), "db:10.0.0.7");
        assert_eq!((s.log.max_size, s.log.max_file), (1 << 20, 3));
    }

    #[test]
    fn bad_values_are_bad_input_with_one_line() {
        for flags in [
            &["--image", "x", "--mem", "lots"][..],
            &["--image", "x", "-p", "8080"],
            &["--image", "x", "--timeout", "1d"],
            &["--image", "x", "--network", "bogus"],
            &["--image", "x", "-v", "/nonexistent/dir:/data"],
            &["--rootfs", "/nonexistent/dir"],
            &["--image", "x", "--dns", "not-an-ip"],
            &["--image", "x", "--add-host", "nocolon"],
            &["--image", "x", "--log-opt", "max-file=0"],
            &[],
        ] {
            let e = spec(flags).unwrap_err();
            assert!(
                e.chain().any(|c| c.is::<crate::error::BadInput>()),
                "{flags:?}: {e:#}"
            );
            assert_eq!(format!("{e:#}").lines().count(), 1, "{flags:?}");
        }
    }
}
