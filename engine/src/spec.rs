//! [`RunSpec`]: one `mvm run`, as typed data. The CLI builds it from its flags (or an API from
//! JSON), [`crate::run::run`] checks it once with [`RunSpec::validate`] and runs it; the `-d`
//! runner reads the same spec back from the container's directory (`spec.json`), with the image
//! digest the parent resolved.

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

use crate::error::{bad_input, Error};
use crate::portfwd::PortMapping;
use crate::state;
pub use crate::state::Isolation;
use crate::units::format_size;

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
    /// Guest kernel (`--isolation vm`; default `<root>/kernel/vmlinux`).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Guest kernel arguments appended to mvm's own (`--isolation vm`).
    #[serde(default)]
    pub kernel_args: Option<String>,
    /// Boot the guest kernel instead of restoring the VM's template, and make none
    /// (`--isolation vm`).
    #[serde(default)]
    pub cold: bool,
    /// Put mvm's static agent into the container, read-only at
    /// [`guest_agent::guest::AGENT_IN_CONTAINER`]: bind-mounted from the host, or in a VM from
    /// the guest's own agent. `mvm compare` runs its probe from there. A plain process runs it
    /// from its host path and needs nothing.
    #[serde(default)]
    pub mount_agent: bool,
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
            kernel: None,
            kernel_args: None,
            cold: false,
            mount_agent: false,
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
            Isolation::Container => match &self.network {
                None | Some(Network::None | Network::Host) => Ok(()),
                Some(other) => Err(bad_input(format!(
                    "--network {other}: a container on the host takes none or host"
                ))),
            },
            Isolation::Process => Ok(()),
        }
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
            remove: true,
            detach: true,
            kernel: Some(dir.join("vmlinux")),
            kernel_args: Some("mvm.log=debug".into()),
            cold: true,
            mount_agent: true,
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
    fn vcpus_round_the_cpu_limit_up() {
        let mut spec = RunSpec::new(Source::Rootfs { path: "/".into() });
        assert_eq!((spec.vm_vcpus(), spec.vm_memory()), (1, DEFAULT_VM_MEMORY));
        spec.limits.cpus = Some(1.2);
        assert_eq!(spec.vm_vcpus(), 2);
    }
}
