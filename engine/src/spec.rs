//! [`RunSpec`]: one `mvm run`, as typed data. The CLI builds it from its flags (or an API from
//! JSON), [`crate::run::run`] checks it once with [`RunSpec::validate`] and runs it; the `-d`
//! runner reads the same spec back from the container's directory (`spec.json`), with the image
//! digest the parent resolved.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use guest_agent::runtime::command::Overrides;
use guest_agent::runtime::security::Security;
use guest_agent::runtime::spec::{self, BindMount};
use guest_agent::runtime::Limits;
use rootfs_builder::reference::Reference;
use serde::{Deserialize, Serialize};
use vmm::virtio_devices::NetworkMode;

use crate::confine::VmmSecurity;
use crate::dns::Dns;
use crate::error::{bad_input, Error};
use crate::logs::LogOptions;
use crate::portfwd::PortMapping;
pub use crate::restart::RestartPolicy;
use crate::state;
pub use crate::state::Isolation;
use crate::units::{format_size, parse_size};
use devices::virtio::block::BlockLimits;
use devices::virtio::rate_limiter::Limit;

/// Guest memory of a VM without a memory limit.
pub const DEFAULT_VM_MEMORY: u64 = 256 << 20;
/// The least guest memory the kernel and the agent start in.
pub const MIN_VM_MEMORY: u64 = 64 << 20;
/// Most `-v` volumes of one VM (each is a virtio-blk device).
pub const MAX_VM_VOLUMES: usize = 8;

/// Where the container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// An image from the local store, pulled first when it is not there.
    Image {
        /// The reference as given (`busybox`, `127.0.0.1:5000/app:v1`, `app@sha256:...`).
        reference: String,
        /// The manifest digest it resolved to, once it did: a runner runs exactly this image
        /// even if the tag has moved since.
        #[serde(default)]
        digest: Option<String>,
    },
    /// A directory used as the root (never modified: the container writes to an overlay).
    Rootfs {
        /// Absolute path of the directory.
        path: PathBuf,
    },
}

impl Source {
    /// What `ps` shows as the image: the reference as given, or the directory.
    pub fn label(&self) -> String {
        match self {
            Source::Image { reference, .. } => reference.clone(),
            Source::Rootfs { path } => path.display().to_string(),
        }
    }
}

/// The network of the container (or of the VM it runs in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Network {
    /// Loopback only.
    None,
    /// The host's own network namespace (`--isolation container`).
    Host,
    /// Rootless user-mode networking through passt (`--isolation vm`).
    User,
    /// A tap device on the host (`--isolation vm`).
    Tap {
        /// Interface name (`mvm-tapN` when absent).
        #[serde(default)]
        name: Option<String>,
        /// The host side's address and prefix length, e.g. 172.30.0.1/24.
        #[serde(default)]
        host_ip: Option<(Ipv4Addr, u8)>,
    },
}

impl FromStr for Network {
    type Err = Error;

    /// `none`, `host`, `user`, `tap` or `tap:NAME[,IP/PREFIX]`.
    fn from_str(s: &str) -> Result<Self, Error> {
        if s == "host" {
            return Ok(Network::Host);
        }
        let mode: NetworkMode = s
            .parse()
            .map_err(|e: vmm::virtio_devices::DeviceSetupError| bad_input(e.to_string()))?;
        Ok(match mode {
            NetworkMode::None => Network::None,
            NetworkMode::User => Network::User,
            NetworkMode::Tap { name, host_ip } => Network::Tap { name, host_ip },
        })
    }
}

impl fmt::Display for Network {
    /// The `--network` value that gives this network.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Network::None => f.write_str("none"),
            Network::Host => f.write_str("host"),
            Network::User => f.write_str("user"),
            Network::Tap {
                name: None,
                host_ip: None,
            } => f.write_str("tap"),
            Network::Tap { name, host_ip } => {
                write!(f, "tap:{}", name.as_deref().unwrap_or_default())?;
                if let Some((ip, prefix)) = host_ip {
                    write!(f, ",{ip}/{prefix}")?;
                }
                Ok(())
            }
        }
    }
}

impl Network {
    /// The VM's network device for this network, if a VM can have it.
    pub fn vm_mode(&self) -> Option<NetworkMode> {
        match self {
            Network::None => Some(NetworkMode::None),
            Network::User => Some(NetworkMode::User),
            Network::Tap { name, host_ip } => Some(NetworkMode::Tap {
                name: name.clone(),
                host_ip: *host_ip,
            }),
            Network::Host => None,
        }
    }
}

/// One `mvm run`: everything the engine needs, nothing from the command line's syntax.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// The container's name, unique among the containers of every isolation; the first 12
    /// digits of its id when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// The root filesystem: an image or a directory.
    pub source: Source,
    /// How the command is isolated.
    #[serde(default)]
    pub isolation: Isolation,
    /// The command, environment, working directory and user, over the image's config. `-e KEY`
    /// entries without a value were already filled in from the caller's environment.
    #[serde(default)]
    pub command: Overrides,
    /// Hostname inside the container (default: its name; in a VM, the agent's default).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Run a tiny init as PID 1 that forwards signals and reaps zombies.
    #[serde(default)]
    pub init: bool,
    /// Resource limits. In a VM, the memory limit is the guest's memory ([`DEFAULT_VM_MEMORY`]
    /// without one) and the CPU limit its number of vCPUs (rounded up).
    #[serde(default)]
    pub limits: Limits,
    /// The network; the isolation's default when absent (a VM: `user` where passt is installed,
    /// else `none`; a container: `none`; a process: the host's).
    #[serde(default)]
    pub network: Option<Network>,
    /// Guest ports published on the host (`--isolation vm`).
    #[serde(default)]
    pub publish: Vec<PortMapping>,
    /// Host paths made visible inside, host side absolute (a VM gets a copy of each directory on
    /// a disk image; a container sees the host's directory itself).
    #[serde(default)]
    pub volumes: Vec<BindMount>,
    /// Seccomp, capabilities, no_new_privs and (`--isolation container`) the user namespace;
    /// docker's defaults when absent. In a VM they apply to the container inside the guest.
    #[serde(default)]
    pub security: Security,
    /// Stop after this long and exit 124 (`--isolation vm`).
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Remove the container's record and files when it exits.
    #[serde(default)]
    pub remove: bool,
    /// Run in the background: return the id once the container runs.
    #[serde(default)]
    pub detach: bool,
    /// When the background runner starts the container again after it exits (`--restart`,
    /// with `-d`).
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Keep the container's stdin open and feed it this process's (`-i`).
    #[serde(default)]
    pub interactive: bool,
    /// Give the container's first process a terminal of its own (`-t`); mvm shows it on the
    /// user's terminal.
    #[serde(default)]
    pub tty: bool,
    /// /etc/resolv.conf and /etc/hosts of the container (`--dns`, `--add-host`).
    #[serde(default)]
    pub dns: Dns,
    /// Rotation of the container log (`--log-opt`).
    #[serde(default)]
    pub log: LogOptions,
    /// Guest kernel (`--isolation vm`; default `<root>/kernel/vmlinux`).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Guest kernel arguments appended to mvm's own (`--isolation vm`).
    #[serde(default)]
    pub kernel_args: Option<String>,
    /// Put mvm's static agent into the container, read-only at
    /// [`guest_agent::guest::AGENT_IN_CONTAINER`]: bind-mounted from the host, or in a VM from
    /// the guest's own agent. `mvm compare` runs its probe from there. A plain process runs it
    /// from its host path and needs nothing.
    #[serde(default)]
    pub mount_agent: bool,
    /// How the VMM process is confined (`--security-opt vmm-...`; `--isolation vm`).
    #[serde(default)]
    pub vmm: VmmSecurity,
    /// Rate limits of the VM's disks and network (`--device-read-bps` and friends,
    /// `--network-rate`; `--isolation vm`).
    #[serde(default)]
    pub rate_limits: RateLimits,
    /// Boot the guest kernel instead of restoring the VM's template, and make none
    /// (`--isolation vm`).
    #[serde(default)]
    pub cold: bool,
    /// `mvm run --from-snapshot NAME`: the VM restores snapshot NAME of a running container
    /// and its container goes on (the spec is the snapshot's, see
    /// [`crate::snapshot::fork_spec`]).
    #[serde(default)]
    pub from_snapshot: Option<String>,
}

/// The rate limits of a VM's devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Per guest disk (`vda` is the image, `vdb`... the volumes in order).
    #[serde(default)]
    pub disks: BTreeMap<String, BlockLimits>,
    /// The network, each direction.
    #[serde(default)]
    pub network: Limit,
}

/// Which limit a `--device-...` flag sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceLimit {
    /// `--device-read-bps`.
    ReadBps,
    /// `--device-write-bps`.
    WriteBps,
    /// `--device-read-iops`.
    ReadIops,
    /// `--device-write-iops`.
    WriteIops,
}

impl RateLimits {
    /// Applies one `--device-read-bps` (and friends) value: `DEVICE:RATE`, where DEVICE is the
    /// guest's disk (`/dev/vda` or `vda`; the image is vda, volumes follow) and RATE a size per
    /// second (`1mb`, `512k`) or, for iops, a number.
    pub fn apply_device(&mut self, which: DeviceLimit, text: &str) -> Result<(), Error> {
        let flag = match which {
            DeviceLimit::ReadBps => "--device-read-bps",
            DeviceLimit::WriteBps => "--device-write-bps",
            DeviceLimit::ReadIops => "--device-read-iops",
            DeviceLimit::WriteIops => "--device-write-iops",
        };
        let bad = |why: &str| bad_input(format!("{flag} {text}: {why}"));
        let (dev, rate) = text
            .rsplit_once(':')
            .ok_or_else(|| bad("expected DEVICE:RATE, e.g. /dev/vda:1mb"))?;
        let dev = dev.strip_prefix("/dev/").unwrap_or(dev);
        let valid =
            dev.len() == 3 && dev.starts_with("vd") && dev.as_bytes()[2].is_ascii_lowercase();
        if !valid {
            return Err(bad(
                "DEVICE is a guest disk: /dev/vda (the image), /dev/vdb... (volumes)",
            ));
        }
        let value = match which {
            DeviceLimit::ReadBps | DeviceLimit::WriteBps => {
                parse_size(rate).map_err(|e| bad(&e.to_string()))?
            }
            DeviceLimit::ReadIops | DeviceLimit::WriteIops => rate
                .parse()
                .map_err(|_| bad("RATE is a number of operations per second"))?,
        };
        if value == 0 {
            return Err(bad("the rate must be at least 1"));
        }
        let limits = self.disks.entry(dev.to_string()).or_default();
        match which {
            DeviceLimit::ReadBps => limits.read.bytes_per_sec = Some(value),
            DeviceLimit::WriteBps => limits.write.bytes_per_sec = Some(value),
            DeviceLimit::ReadIops => limits.read.ops_per_sec = Some(value),
            DeviceLimit::WriteIops => limits.write.ops_per_sec = Some(value),
        }
        Ok(())
    }

    /// Applies `--network-rate BYTES[:PACKETS]`: bytes (a size) and optionally packets per
    /// second, each direction.
    pub fn apply_network(&mut self, text: &str) -> Result<(), Error> {
        let bad = |why: &str| bad_input(format!("--network-rate {text}: {why}"));
        let (bytes, packets) = match text.split_once(':') {
            Some((b, p)) => (b, Some(p)),
            None => (text, None),
        };
        let bytes = parse_size(bytes).map_err(|e| bad(&e.to_string()))?;
        let packets = packets
            .map(|p| {
                p.parse::<u64>()
                    .map_err(|_| bad("PACKETS is a number per second"))
            })
            .transpose()?;
        if bytes == 0 || packets == Some(0) {
            return Err(bad("the rate must be at least 1"));
        }
        self.network = Limit {
            bytes_per_sec: Some(bytes),
            ops_per_sec: packets,
        };
        Ok(())
    }

    /// The limits of guest disk `dev` (`vda`, ...).
    pub fn disk(&self, dev: &str) -> BlockLimits {
        self.disks.get(dev).copied().unwrap_or_default()
    }

    /// Whether anything is limited.
    pub fn any(&self) -> bool {
        !self.disks.is_empty() || self.network.is_set()
    }
}

impl RunSpec {
    /// A spec that runs `source` with everything else at its default.
    pub fn new(source: Source) -> Self {
        RunSpec {
            name: None,
            source,
            isolation: Isolation::default(),
            command: Overrides::default(),
            hostname: None,
            init: false,
            limits: Limits::default(),
            network: None,
            publish: Vec::new(),
            volumes: Vec::new(),
            security: Security::default(),
            timeout: None,
            remove: false,
            detach: false,
            restart: RestartPolicy::No,
            interactive: false,
            tty: false,
            dns: Dns::default(),
            log: LogOptions::default(),
            kernel: None,
            kernel_args: None,
            mount_agent: false,
            vmm: VmmSecurity::default(),
            rate_limits: RateLimits::default(),
            cold: false,
            from_snapshot: None,
        }
    }

    /// The guest kernel of a VM under the mvm root `root`.
    pub fn kernel_path(&self, root: &Path) -> PathBuf {
        self.kernel
            .clone()
            .unwrap_or_else(|| root.join("kernel/vmlinux"))
    }

    /// The guest memory of a VM.
    pub fn vm_memory(&self) -> u64 {
        self.limits.memory_bytes.unwrap_or(DEFAULT_VM_MEMORY)
    }

    /// The vCPUs of a VM: the CPU limit rounded up, 1 without one.
    pub fn vm_vcpus(&self) -> u8 {
        // Validated to be finite and at most the host's CPUs; clamped to the MP table's 32.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        self.limits
            .cpus
            .map_or(1, |c| c.ceil().clamp(1.0, 32.0) as u8)
    }

    /// Checks everything that can be checked before anything is created, against this host and
    /// the mvm root `root`. Every error is bad input.
    pub fn validate(&self, root: &Path) -> Result<(), Error> {
        if let Some(name) = &self.name {
            state::validate_name(name).map_err(|e| bad_input(e.to_string()))?;
        }
        if let Some(h) = &self.hostname {
            spec::validate_hostname(h).map_err(|e| bad_input(e.to_string()))?;
        }
        match &self.source {
            Source::Image { reference, digest } => {
                Reference::parse(reference).map_err(|e| bad_input(e.to_string()))?;
                if let Some(d) = digest {
                    rootfs_builder::digest::Digest::parse(d)
                        .map_err(|e| bad_input(format!("image digest {d}: {e}")))?;
                }
            }
            Source::Rootfs { path } if !path.is_absolute() || !path.is_dir() => {
                return Err(bad_input(format!(
                    "--rootfs {}: no such directory",
                    path.display()
                )))
            }
            Source::Rootfs { .. } => {}
        }
        self.validate_limits()?;
        self.validate_restart()?;
        self.dns.validate()?;
        self.security
            .validate()
            .map_err(|e| bad_input(e.to_string()))?;
        for v in &self.volumes {
            if !v.source.is_absolute() {
                return Err(bad_input(format!(
                    "-v {}: the host path must be absolute",
                    v.source.display()
                )));
            }
        }
        match self.isolation {
            Isolation::Vm => self.validate_vm(root),
            _ if self.rate_limits.any() => Err(bad_input(
                "--device-read-bps, --device-write-bps, --device-read-iops, --device-write-iops \
                 and --network-rate limit a VM's devices (--isolation vm)",
            )),
            Isolation::Container => match &self.network {
                None | Some(Network::None | Network::Host) => Ok(()),
                Some(other) => Err(bad_input(format!(
                    "--network {other}: a container on the host takes none or host"
                ))),
            },
            Isolation::Process => Ok(()),
        }
    }

    fn validate_restart(&self) -> Result<(), Error> {
        if !self.restart.any() {
            return Ok(());
        }
        if !self.detach {
            return Err(bad_input(format!(
                "--restart {}: the background runner keeps the policy: add -d",
                self.restart
            )));
        }
        if self.remove {
            return Err(bad_input(format!(
                "--restart {} and --rm conflict: a container that restarts is not removed when it exits",
                self.restart
            )));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), Error> {
        if let Some(c) = self.limits.cpus {
            let have = std::thread::available_parallelism().map_or(1, usize::from);
            #[allow(clippy::cast_precision_loss)]
            let max = have as f64;
            if !(c.is_finite() && c >= 0.01 && c <= max) {
                return Err(bad_input(format!(
                    "--cpus {c}: use a number from 0.01 to {have} (the CPUs available)"
                )));
            }
        }
        if self.limits.pids_max == Some(0) {
            return Err(bad_input("--pids-limit must be at least 1"));
        }
        Ok(())
    }

    fn validate_vm(&self, root: &Path) -> Result<(), Error> {
        if self.security.userns.is_some() {
            return Err(bad_input(
                "--userns works with --isolation container (a VM gives the container its own kernel)",
            ));
        }
        let kernel = self.kernel_path(root);
        if !kernel.is_file() {
            return Err(bad_input(format!(
                "no guest kernel at {}: build it with scripts/build-kernel.sh or pass --kernel PATH",
                kernel.display()
            )));
        }
        let mem = self.vm_memory();
        if mem < MIN_VM_MEMORY {
            return Err(bad_input(format!(
                "--mem {}: a microVM needs at least {}",
                format_size(mem),
                format_size(MIN_VM_MEMORY)
            )));
        }
        if let Some(host) = vmm::host::mem_total().filter(|h| mem > *h) {
            return Err(bad_input(format!(
                "--mem {}: more than this host's {} MiB of RAM",
                format_size(mem),
                host >> 20
            )));
        }
        if let Some(network) = &self.network {
            if network.vm_mode().is_none() {
                return Err(bad_input(format!(
                    "invalid --network '{network}': use user, tap, tap:NAME or none"
                )));
            }
        }
        let user_network = matches!(self.network, None | Some(Network::User));
        if let Some(ip) = self.dns.servers.iter().find(|ip| ip.is_loopback()) {
            if user_network {
                return Err(bad_input(format!(
                    "--dns {ip}: with --network user the guest reaches resolvers through passt \
                     from the host, not on a loopback address: give one the host reaches on an \
                     interface"
                )));
            }
        }
        for dev in self.rate_limits.disks.keys() {
            let index = usize::from(dev.as_bytes()[2].saturating_sub(b'a'));
            if index > self.volumes.len() {
                return Err(bad_input(format!(
                    "a rate limit for /dev/{dev}: the VM has {} disk(s), /dev/vda to /dev/vd{}",
                    self.volumes.len() + 1,
                    char::from(b'a' + u8::try_from(self.volumes.len()).unwrap_or(0))
                )));
            }
        }
        if self.volumes.len() > MAX_VM_VOLUMES {
            return Err(bad_input(format!(
                "at most {MAX_VM_VOLUMES} volumes (-v) per VM"
            )));
        }
        for v in &self.volumes {
            if !v.source.is_dir() {
                return Err(bad_input(format!(
                    "-v {}: a VM volume must be a directory",
                    v.source.display()
                )));
            }
        }
        Ok(())
    }
}

/// A `-v HOSTPATH:PATH[:ro]` flag, with the host path made absolute and checked to exist.
pub fn parse_volume(text: &str) -> Result<BindMount, Error> {
    let (host, rest) = text.split_once(':').unwrap_or((text, ""));
    let host =
        std::fs::canonicalize(host).map_err(|e| bad_input(format!("-v {text}: {host}: {e}")))?;
    BindMount::parse(&format!("{}:{rest}", host.display()))
        .map_err(|e| bad_input(format!("-v {text}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_spec(dir: &Path) -> RunSpec {
        RunSpec {
            name: Some("web".into()),
            source: Source::Image {
                reference: "nginx:1.25".into(),
                digest: Some(format!("sha256:{}", "ab".repeat(32))),
            },
            isolation: Isolation::Vm,
            command: Overrides {
                entrypoint: Some(String::new()),
                cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
                env: vec!["A=1".into()],
                workdir: Some("/srv".into()),
                user: Some("www-data".into()),
            },
            hostname: Some("web1".into()),
            init: true,
            limits: Limits {
                memory_bytes: Some(512 << 20),
                cpus: Some(1.5),
                pids_max: Some(64),
            },
            network: Some(Network::Tap {
                name: Some("mvm-web".into()),
                host_ip: Some((Ipv4Addr::new(172, 30, 0, 1), 24)),
            }),
            publish: vec!["0.0.0.0:8080:80".parse().unwrap()],
            volumes: vec![BindMount {
                source: dir.to_path_buf(),
                target: "/data".into(),
                readonly: true,
            }],
            security: Security {
                cap_add: vec!["NET_ADMIN".into()],
                no_new_privs: true,
                ..Security::default()
            },
            timeout: Some(Duration::from_millis(1500)),
            remove: false,
            detach: true,
            restart: RestartPolicy::OnFailure {
                max_retries: Some(3),
            },
            interactive: true,
            tty: true,
            dns: Dns {
                servers: vec!["10.0.0.53".parse().unwrap()],
                image_resolv_conf: false,
                add_hosts: vec!["db:10.0.0.7".parse().unwrap()],
                image_hosts: false,
            },
            log: LogOptions {
                max_size: 1 << 20,
                max_file: 2,
            },
            kernel: Some(dir.join("vmlinux")),
            kernel_args: Some("mvm.log=debug".into()),
            mount_agent: true,
            vmm: VmmSecurity::default(),
            rate_limits: RateLimits::default(),
            cold: true,
            from_snapshot: Some("base".into()),
        }
    }

    #[test]
    fn a_run_spec_round_trips_through_json() {
        let dir = tempfile::tempdir().unwrap();
        let spec = full_spec(dir.path());
        let json = serde_json::to_string_pretty(&spec).unwrap();
        assert_eq!(serde_json::from_str::<RunSpec>(&json).unwrap(), spec);
        // Only the source is required; everything else has a default.
        let min: RunSpec =
            serde_json::from_str(r#"{"source":{"rootfs":{"path":"/srv/root"}}}"#).unwrap();
        assert_eq!(
            min,
            RunSpec::new(Source::Rootfs {
                path: "/srv/root".into()
            })
        );
        let back: RunSpec = serde_json::from_str(&serde_json::to_string(&min).unwrap()).unwrap();
        assert_eq!(back, min);
        // Unknown fields are refused, at the top and inside.
        assert!(serde_json::from_str::<RunSpec>(
            r#"{"source":{"rootfs":{"path":"/r"}},"privileged":true}"#
        )
        .is_err());
        assert!(serde_json::from_str::<RunSpec>(
            r#"{"source":{"image":{"reference":"a","tag":"b"}}}"#
        )
        .is_err());
    }

    #[test]
    fn validation_refuses_what_the_isolation_cannot_do() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("vmlinux"), b"\x7fELF").unwrap();
        let mut spec = full_spec(root);
        spec.limits.cpus = Some(1.0);
        spec.validate(root).unwrap();
        let refused = |f: &dyn Fn(&mut RunSpec)| {
            let mut s = spec.clone();
            f(&mut s);
            let e = s.validate(root).unwrap_err();
            assert!(e.is_bad_input(), "{e}");
            e.to_string()
        };
        assert_eq!(
            refused(&|s| s.limits.memory_bytes = Some(16 << 20)),
            "--mem 16M: a microVM needs at least 64M"
        );
        assert!(refused(&|s| s.network = Some(Network::Host)).contains("'host'"));
        assert!(refused(&|s| s.kernel = Some(root.join("missing"))).contains("no guest kernel"));
        assert!(refused(&|s| s.name = Some("../x".into())).contains("../x"));
        assert!(refused(&|s| {
            s.network = Some(Network::User);
            s.dns.servers = vec!["127.0.0.53".parse().unwrap()];
        })
        .contains("loopback"));
        assert!(refused(&|s| s.remove = true).contains("--rm conflict"));
        assert!(refused(&|s| s.detach = false).contains("add -d"));
        refused(&|s| s.limits.cpus = Some(0.0));
        refused(&|s| s.limits.pids_max = Some(0));
        refused(&|s| s.security.cap_add = vec!["NOT_A_CAP".into()]);
        refused(&|s| {
            s.source = Source::Image {
                reference: "UPPER".into(),
                digest: None,
            }
        });
        spec.isolation = Isolation::Container;
        spec.network = Some(Network::User);
        assert_eq!(
            spec.validate(root).unwrap_err().to_string(),
            "--network user: a container on the host takes none or host"
        );
        spec.network = Some(Network::Host);
        spec.validate(root).unwrap();
    }

    #[test]
    fn networks_parse_and_print_as_the_flag_gives_them() {
        for text in [
            "none",
            "host",
            "user",
            "tap",
            "tap:t0",
            "tap:t0,172.30.0.1/24",
        ] {
            assert_eq!(text.parse::<Network>().unwrap().to_string(), text);
        }
        assert!("bogus".parse::<Network>().unwrap_err().is_bad_input());
    }

    #[test]
    fn rate_limit_flags_parse_like_dockers_and_name_a_disk_the_vm_has() {
        let mut r = RateLimits::default();
        r.apply_device(DeviceLimit::ReadBps, "/dev/vda:1mb")
            .unwrap();
        r.apply_device(DeviceLimit::WriteIops, "vdb:200").unwrap();
        r.apply_network("512k:1000").unwrap();
        assert_eq!(r.disk("vda").read.bytes_per_sec, Some(1 << 20));
        assert_eq!(r.disk("vdb").write.ops_per_sec, Some(200));
        assert_eq!(r.disk("vdc"), BlockLimits::default());
        assert_eq!(
            (r.network.bytes_per_sec, r.network.ops_per_sec),
            (Some(512 << 10), Some(1000))
        );
        for bad in ["1mb", "/dev/sda:1mb", "vda:0", "vda:fast", "/dev/vda1:1mb"] {
            let e = r.apply_device(DeviceLimit::ReadBps, bad).unwrap_err();
            assert!(
                e.is_bad_input() && e.to_string().starts_with("--device-read-bps"),
                "{e}"
            );
        }
        assert!(r.apply_device(DeviceLimit::ReadIops, "vda:1k").is_err());
        assert!(r.apply_network("0").is_err());

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("vmlinux"), b"\x7fELF").unwrap();
        let mut spec = RunSpec::new(Source::Rootfs { path: "/".into() });
        spec.kernel = Some(root.join("vmlinux"));
        spec.rate_limits = r.clone();
        let e = spec.validate(root).unwrap_err();
        assert!(e.to_string().contains("/dev/vdb"), "{e}");
        spec.volumes.push(BindMount {
            source: root.to_path_buf(),
            target: "/data".into(),
            readonly: false,
        });
        spec.validate(root).unwrap();
        spec.isolation = Isolation::Container;
        assert!(spec
            .validate(root)
            .unwrap_err()
            .to_string()
            .contains("--isolation vm"));
    }

    #[test]
    fn vcpus_round_the_cpu_limit_up() {
        let mut spec = RunSpec::new(Source::Rootfs { path: "/".into() });
        assert_eq!((spec.vm_vcpus(), spec.vm_memory()), (1, DEFAULT_VM_MEMORY));
        spec.limits.cpus = Some(1.2);
        assert_eq!(spec.vm_vcpus(), 2);
    }
}
