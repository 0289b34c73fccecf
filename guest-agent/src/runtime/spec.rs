//! The container description: what to run, on which root filesystem, with which limits.
//!
//! A [`ContainerSpec`] is plain data (serde, unknown fields rejected) so the host can hand it to
//! the guest agent unchanged. [`ContainerSpec::validate`] checks everything that can be checked
//! without touching the machine; the runtime calls it before it creates anything.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::security::Security;

/// Longest container id (it names the cgroup and the default hostname).
pub const MAX_ID_LEN: usize = 64;
/// Longest hostname the kernel accepts.
pub const MAX_HOSTNAME_LEN: usize = 64;

/// Errors in a [`ContainerSpec`] or in a value given on the command line for one.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// The id is empty, too long or has characters other than `[A-Za-z0-9_.-]`.
    #[error("invalid container name {0:?}: use 1-64 characters from [A-Za-z0-9_.-], starting with a letter or digit")]
    BadId(String),
    /// The hostname is empty, too long or has a character other than `[A-Za-z0-9.-]`.
    #[error("invalid hostname {0:?}: use 1-64 characters from [A-Za-z0-9.-]")]
    BadHostname(String),
    /// No command to run.
    #[error("no command to run: give one after `--` (or use an image with an Entrypoint or Cmd)")]
    NoCommand,
    /// A string handed to the kernel contains a NUL byte.
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// An environment entry is not `KEY=VALUE`.
    #[error("invalid environment entry {0:?}: expected KEY=VALUE")]
    BadEnv(String),
    /// The working directory is not absolute.
    #[error("working directory {0:?} must be an absolute path")]
    RelativeCwd(String),
    /// A root filesystem path is unusable.
    #[error("root filesystem path {0:?} must be absolute and must not contain ':' or ','")]
    BadRootfsPath(PathBuf),
    /// An overlay root filesystem without lower directories.
    #[error("an overlay root filesystem needs at least one lower directory")]
    NoLowerDirs,
    /// Memory limit below what any process needs.
    #[error("memory limit {0} bytes is too small: use at least 4M")]
    MemoryTooSmall(u64),
    /// CPU limit out of range.
    #[error("cpus {0} is out of range: use a number from 0.01 to the number of CPUs")]
    BadCpus(f64),
    /// Pids limit of zero.
    #[error("pids limit must be at least 1")]
    BadPids,
    /// A file for /etc is not named by a plain file name.
    #[error("invalid /etc file name {0:?}: use a plain file name")]
    BadEtcFile(String),
    /// A memory size that does not parse.
    #[error("invalid size {0:?}: use a number with an optional unit b, k, m, g or t (e.g. 256M)")]
    BadSize(String),
    /// A bind mount's source is not absolute or its target is not an absolute path of plain
    /// names.
    #[error("invalid mount {0:?}: the source must be an absolute path and the target an absolute path without '..'")]
    BadMount(String),
    /// A capability, seccomp profile or id mapping is invalid.
    #[error("{0}")]
    Security(String),
    /// The cgroup parent is not a relative path of plain names.
    #[error("invalid cgroup parent {0:?}: use a relative path such as \"mvm\"")]
    BadCgroupParent(String),
}

/// Everything the runtime needs to create and start one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// Container id: names the cgroup (`<cgroup parent>/<id>`) and is the default hostname.
    /// 1-64 characters from `[A-Za-z0-9_.-]`, starting with a letter or digit.
    pub id: String,
    /// The root filesystem.
    pub rootfs: Rootfs,
    /// The container's first process (already resolved from Entrypoint/Cmd). Its working
    /// directory is created when missing (as Docker does).
    pub process: Process,
    /// Hostname in the container's UTS namespace; defaults to the id.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Resource limits, applied through a cgroup.
    #[serde(default)]
    pub limits: Limits,
    /// The first process gets a terminal of its own (`-t`): the runtime keeps its master (the
    /// agent relays it as the process's stdout and stdin frames).
    #[serde(default)]
    pub terminal: bool,
    /// Network namespace.
    #[serde(default)]
    pub network: Network,
    /// Run a tiny init as PID 1 that forwards signals to the command and reaps zombies (as
    /// `docker run --init`). When false the command itself is PID 1, as with Docker and crun by
    /// default; the kernel then drops the signals it has no handler for.
    #[serde(default)]
    pub init: bool,
    /// Parent of the container's cgroup, relative to the cgroup root (v2: `/sys/fs/cgroup`;
    /// v1: the runtime's own cgroup in each hierarchy). Default `mvm`.
    #[serde(default)]
    pub cgroup_parent: Option<String>,
    /// Directories or files bind-mounted into the container, in order, after its root.
    #[serde(default)]
    pub mounts: Vec<BindMount>,
    /// Seccomp, capabilities, no_new_privs and the user namespace (docker's defaults when
    /// absent).
    #[serde(default)]
    pub security: Security,
    /// Files written to `/etc` in the container's writable layer before it starts (its
    /// resolv.conf, hosts and hostname); an overlay root only.
    #[serde(default)]
    pub etc_files: Vec<EtcFile>,
}

/// A file the runtime writes to the container's `/etc` (in its writable layer, so the container
/// may change it, as with docker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcFile {
    /// The file's name in `/etc` (`hosts`).
    pub name: String,
    /// Its content.
    pub content: String,
}

/// One process: a container's first, or one `exec` starts in a running container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    /// The command and its arguments. `args[0]` without a `/` is looked up in the `PATH` of
    /// `env`.
    pub args: Vec<String>,
    /// Environment, `KEY=VALUE` each. Nothing is inherited from the runtime's own environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory inside the container (`/` when empty).
    #[serde(default = "default_cwd")]
    pub cwd: String,
    /// `uid`, `uid:gid`, `name` or `name:group`; names are looked up in the container's
    /// `/etc/passwd` and `/etc/group`. `None` runs as root.
    #[serde(default)]
    pub user: Option<String>,
}

impl Default for Process {
    fn default() -> Self {
        Process {
            args: Vec::new(),
            env: Vec::new(),
            cwd: default_cwd(),
            user: None,
        }
    }
}

/// A path of the runtime's filesystem made visible inside the container (`-v SRC:DST[:ro]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindMount {
    /// Absolute path on the runtime's side (the host, or in a VM the mounted volume disk).
    pub source: PathBuf,
    /// Absolute path inside the container; created when missing.
    pub target: String,
    /// Read-only inside the container.
    #[serde(default)]
    pub readonly: bool,
}

impl BindMount {
    /// Parses `SRC:DST[:ro|:rw]`; SRC must be absolute.
    pub fn parse(text: &str) -> Result<BindMount, SpecError> {
        let bad = || SpecError::BadMount(text.to_string());
        let mut parts = text.split(':');
        let (src, dst) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
        let readonly = match parts.next() {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(_) => return Err(bad()),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        let m = BindMount {
            source: PathBuf::from(src),
            target: dst.to_string(),
            readonly,
        };
        m.check().map_err(|_| bad())?;
        Ok(m)
    }

    fn check(&self) -> Result<(), SpecError> {
        let target_ok = self.target.starts_with('/')
            && self.target != "/"
            && self.target.split('/').all(|c| c != ".." && c != ".")
            && !self.target.contains('\0');
        let source_ok = self.source.is_absolute() && !self.source.to_string_lossy().contains('\0');
        if target_ok && source_ok {
            Ok(())
        } else {
            Err(SpecError::BadMount(format!(
                "{}:{}",
                self.source.display(),
                self.target
            )))
        }
    }
}

fn default_cwd() -> String {
    "/".to_string()
}

/// The container's root filesystem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Rootfs {
    /// One directory used as the root, like an OCI bundle's rootfs: writes land in it unless
    /// `readonly`.
    Dir {
        /// Absolute path of the directory.
        path: PathBuf,
        /// Mount it read-only.
        #[serde(default)]
        readonly: bool,
    },
    /// An overlay: read-only lower directories (topmost first) and a writable upper; the lower
    /// directories are never modified.
    Overlay {
        /// Lower directories, topmost first (the image layers or one unpacked image).
        lower: Vec<PathBuf>,
        /// Writable upper directory (empty for a new container).
        upper: PathBuf,
        /// Overlay work directory, empty, on the same filesystem as `upper`.
        work: PathBuf,
    },
}

impl Rootfs {
    /// Directories to read `/etc/passwd` and friends from, topmost first.
    pub fn read_dirs(&self) -> Vec<PathBuf> {
        match self {
            Rootfs::Dir { path, .. } => vec![path.clone()],
            Rootfs::Overlay { lower, upper, .. } => {
                let mut dirs = vec![upper.clone()];
                dirs.extend(lower.iter().cloned());
                dirs
            }
        }
    }
}

/// Resource limits. `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory limit in bytes (cgroup `memory.max`; swap is disabled for the container).
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// CPU time as a number of CPUs, fractions allowed (cgroup `cpu.max` quota per 100 ms).
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads (cgroup `pids.max`).
    #[serde(default)]
    pub pids_max: Option<u64>,
}

impl Limits {
    /// True when any limit is set.
    pub fn any(&self) -> bool {
        self.memory_bytes.is_some() || self.cpus.is_some() || self.pids_max.is_some()
    }
}

/// The container's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// Share the runtime's network namespace.
    Host,
    /// A new network namespace with only the loopback interface, up.
    #[default]
    None,
}

/// Smallest memory limit accepted.
const MIN_MEMORY: u64 = 4 << 20;
/// CFS period used for the CPU limit, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

impl ContainerSpec {
    /// Checks the spec without touching the machine.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_id(&self.id)?;
        if let Some(h) = &self.hostname {
            validate_hostname(h)?;
        }
        let p = &self.process;
        if p.args.is_empty() {
            return Err(SpecError::NoCommand);
        }
        if p.args.iter().any(|a| a.contains('\0')) {
            return Err(SpecError::Nul("the command"));
        }
        for e in &p.env {
            if e.contains('\0') {
                return Err(SpecError::Nul("the environment"));
            }
            match e.split_once('=') {
                Some((k, _)) if !k.is_empty() => {}
                _ => return Err(SpecError::BadEnv(e.clone())),
            }
        }
        if !p.cwd.starts_with('/') {
            return Err(SpecError::RelativeCwd(p.cwd.clone()));
        }
        if p.cwd.contains('\0') {
            return Err(SpecError::Nul("the working directory"));
        }
        if p.user.as_deref().is_some_and(|u| u.contains('\0')) {
            return Err(SpecError::Nul("the user"));
        }
        match &self.rootfs {
            Rootfs::Dir { path, .. } => check_rootfs_path(path)?,
            Rootfs::Overlay { lower, upper, work } => {
                if lower.is_empty() {
                    return Err(SpecError::NoLowerDirs);
                }
                for p in lower.iter().chain([upper, work]) {
                    check_rootfs_path(p)?;
                }
            }
        }
        if let Some(m) = self.limits.memory_bytes {
            if m < MIN_MEMORY {
                return Err(SpecError::MemoryTooSmall(m));
            }
        }
        if let Some(c) = self.limits.cpus {
            if !(c.is_finite() && c >= 0.01) {
                return Err(SpecError::BadCpus(c));
            }
        }
        if self.limits.pids_max == Some(0) {
            return Err(SpecError::BadPids);
        }
        for f in &self.etc_files {
            let plain = !f.name.is_empty()
                && f.name != "."
                && f.name != ".."
                && !f.name.contains(['/', '\0']);
            if !plain || f.content.contains('\0') {
                return Err(SpecError::BadEtcFile(f.name.clone()));
            }
        }
        for m in &self.mounts {
            m.check()?;
        }
        self.security
            .validate()
            .map_err(|e| SpecError::Security(e.to_string()))?;
        if self.security.userns.is_some()
            && matches!(
                self.rootfs,
                Rootfs::Dir {
                    readonly: false,
                    ..
                }
            )
        {
            return Err(SpecError::Security(
                "--userns needs an overlay or a read-only root directory".into(),
            ));
        }
        if let Some(p) = &self.cgroup_parent {
            let ok = !p.is_empty()
                && !p.starts_with('/')
                && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
                && !p.contains('\0');
            if !ok {
                return Err(SpecError::BadCgroupParent(p.clone()));
            }
        }
        Ok(())
    }

    /// The hostname the container gets.
    pub fn effective_hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.id)
    }

    /// The `cpu.max` quota in microseconds per [`CPU_PERIOD_US`], if a CPU limit is set.
    pub fn cpu_quota_us(&self) -> Option<u64> {
        // Validated to be finite and >= 0.01, so the product is a small positive number.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        self.limits
            .cpus
            .map(|c| ((c * CPU_PERIOD_US as f64).round() as u64).max(1000))
    }
}

fn check_rootfs_path(p: &std::path::Path) -> Result<(), SpecError> {
    let s = p.to_string_lossy();
    if !p.is_absolute() || s.contains(':') || s.contains(',') || s.contains('\0') {
        return Err(SpecError::BadRootfsPath(p.to_path_buf()));
    }
    Ok(())
}

/// Checks a container id (also used for `--name`).
pub fn validate_id(id: &str) -> Result<(), SpecError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadId(id.to_string()))
    }
}

/// Checks a hostname.
pub fn validate_hostname(h: &str) -> Result<(), SpecError> {
    let ok = !h.is_empty()
        && h.len() <= MAX_HOSTNAME_LEN
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadHostname(h.to_string()))
    }
}

/// Parses a size such as `256M`, `1g`, `1.5G`, `512KiB` or `1048576` into bytes (units are
/// powers of 1024, as Docker's `--memory`).
pub fn parse_size(text: &str) -> Result<u64, SpecError> {
    let bad = || SpecError::BadSize(text.to_string());
    let t = text.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') {
        return Err(bad());
    }
    match num.split_once('.') {
        None => {
            let n: u64 = num.parse().map_err(|_| bad())?;
            n.checked_mul(1u64 << shift).ok_or_else(bad)
        }
        Some((int, frac)) => {
            let whole: u64 = int.parse().map_err(|_| bad())?;
            if frac.contains('.') || frac.len() > 9 {
                return Err(bad());
            }
            let frac_n: u64 = frac.parse().map_err(|_| bad())?;
            let scale = 10u64.pow(u32::try_from(frac.len()).map_err(|_| bad())?);
            let unit = 1u64 << shift;
            let w = whole.checked_mul(unit).ok_or_else(bad)?;
            let f = u128::from(frac_n) * u128::from(unit) / u128::from(scale);
            w.checked_add(u64::try_from(f).map_err(|_| bad())?)
                .ok_or_else(bad)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            id: "c1".into(),
            rootfs: Rootfs::Dir {
                path: "/r".into(),
                readonly: false,
            },
            process: Process {
                args: vec!["sh".into()],
                env: vec!["A=1".into()],
                cwd: "/".into(),
                user: None,
            },
            hostname: None,
            limits: Limits::default(),
            terminal: false,
            network: Network::None,
            init: false,
            cgroup_parent: None,
            mounts: Vec::new(),
            security: Security::default(),
            etc_files: Vec::new(),
        }
    }

    #[test]
    fn spec_parses_from_json_with_defaults() {
        let s: ContainerSpec = serde_json::from_str(
            r#"{"id":"web","rootfs":{"overlay":{"lower":["/l"],"upper":"/u","work":"/w"}},
                "process":{"args":["nginx"]},"limits":{"memory_bytes":268435456,"cpus":1.5}}"#,
        )
        .expect("parses");
        assert_eq!(s.process.cwd, "/");
        assert_eq!(s.network, Network::None);
        assert_eq!(s.limits.memory_bytes, Some(256 << 20));
        assert_eq!(s.cpu_quota_us(), Some(150_000));
        assert_eq!(s.effective_hostname(), "web");
        s.validate().expect("valid");
    }

    #[test]
    fn spec_rejects_unknown_fields() {
        let r: Result<ContainerSpec, _> = serde_json::from_str(
            r#"{"id":"a","rootfs":{"dir":{"path":"/r"}},"process":{"args":["x"]},"privileged":true}"#,
        );
        assert!(r.is_err());
        let r: Result<ContainerSpec, _> = serde_json::from_str(
            r#"{"id":"a","rootfs":{"dir":{"path":"/r"}},"process":{"args":["x"]},"limits":{"swap":1}}"#,
        );
        assert!(r.is_err());
    }

    #[test]
    fn validate_rejects_bad_values() {
        let mut s = spec();
        s.id = "../x".into();
        assert!(matches!(s.validate(), Err(SpecError::BadId(_))));
        let mut s = spec();
        s.process.args.clear();
        assert_eq!(s.validate(), Err(SpecError::NoCommand));
        let mut s = spec();
        s.process.env.push("NOEQUALS".into());
        assert!(matches!(s.validate(), Err(SpecError::BadEnv(_))));
        let mut s = spec();
        s.process.cwd = "rel".into();
        assert!(matches!(s.validate(), Err(SpecError::RelativeCwd(_))));
        let mut s = spec();
        s.rootfs = Rootfs::Overlay {
            lower: vec!["/a:b".into()],
            upper: "/u".into(),
            work: "/w".into(),
        };
        assert!(matches!(s.validate(), Err(SpecError::BadRootfsPath(_))));
        let mut s = spec();
        s.limits.memory_bytes = Some(1000);
        assert!(matches!(s.validate(), Err(SpecError::MemoryTooSmall(_))));
        let mut s = spec();
        s.limits.cpus = Some(f64::NAN);
        assert!(matches!(s.validate(), Err(SpecError::BadCpus(_))));
        let mut s = spec();
        s.etc_files = vec![EtcFile {
            name: "../passwd".into(),
            content: String::new(),
        }];
        assert!(matches!(s.validate(), Err(SpecError::BadEtcFile(_))));
        let mut s = spec();
        s.cgroup_parent = Some("../escape".into());
        assert!(matches!(s.validate(), Err(SpecError::BadCgroupParent(_))));
        let mut s = spec();
        s.hostname = Some("bad host".into());
        assert!(matches!(s.validate(), Err(SpecError::BadHostname(_))));
        spec().validate().expect("the base spec is valid");
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("16mb"), Ok(16 << 20));
        for bad in [
            "",
            "M",
            "12X",
            "1.2.3G",
            ".5G",
            "-1M",
            "99999999999999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn volume_flags_parse_and_bad_ones_are_refused() {
        let m = BindMount::parse("/srv/data:/data:ro").unwrap();
        assert_eq!(m.source, PathBuf::from("/srv/data"));
        assert_eq!(m.target, "/data");
        assert!(m.readonly);
        assert!(!BindMount::parse("/srv/data:/data").unwrap().readonly);
        assert!(!BindMount::parse("/srv/data:/data:rw").unwrap().readonly);
        for bad in [
            "relative:/data",
            "/srv/data",
            "/srv/data:data",
            "/srv/data:/",
            "/srv/data:/a/../etc",
            "/srv/data:/data:rx",
            "/srv/data:/data:ro:x",
        ] {
            assert!(BindMount::parse(bad).is_err(), "{bad}");
        }
    }
}
