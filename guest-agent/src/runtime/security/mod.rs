//! A container's security posture: the same on the host (`--isolation container`) and in the
//! guest, for the first process and for every `exec`.
//!
//! The defaults, each kept as data in its own module with a test per rule:
//! - [`caps`]: docker's default capability set (bounding, effective and permitted; inheritable
//!   and ambient empty); `--cap-add`, `--cap-drop` (ALL allowed).
//! - [`seccomp`]: docker's default profile; `--security-opt seccomp=unconfined|PROFILE.json`.
//! - no_new_privs off, as docker's default: a setuid binary of the image works for the
//!   container's own users (inside the container's capability bounds and seccomp filter);
//!   `--security-opt no-new-privileges` sets it on every process.
//! - [`paths`]: docker's masked and read-only paths under /proc and /sys.
//! - [`devices`]: the devices a container may open, enforced by its cgroup.
//! - [`userns`]: `--userns`: container root as an unprivileged range of host ids.
//! - every container starts a new session with no controlling terminal (`setsid`).
//!
//! Order in the new process: shrink the bounding set and keep capabilities across the user
//! switch ([`Prepared::drop_bounding`]), switch user, then [`Prepared::finish`]: set the
//! capability sets, clear the ambient set, set no_new_privs, and install the seccomp filters last
//! before `execve`.

pub mod caps;
pub mod devices;
pub mod paths;
pub mod seccomp;
pub mod userns;

use std::path::{Path, PathBuf};

use rustix::thread::{CapabilitySet, CapabilitySets};
use serde::{Deserialize, Serialize};

use caps::{CapError, CapSet};
use seccomp::{Profile, SeccompError, Target};
pub use userns::IdMapping;

/// Errors in security options.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A `--security-opt` value mvm does not know.
    #[error("--security-opt {0:?}: use seccomp=unconfined, seccomp=PROFILE.json or no-new-privileges[=true|false]")]
    BadOpt(String),
    /// A capability name is unknown.
    #[error(transparent)]
    Cap(#[from] CapError),
    /// The seccomp profile file cannot be read.
    #[error("--security-opt seccomp={0}: cannot read the profile")]
    ReadProfile(PathBuf, #[source] std::io::Error),
    /// The seccomp profile is not valid.
    #[error("--security-opt seccomp={0}: {1}")]
    Profile(PathBuf, String),
    /// The seccomp profile does not compile.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A user namespace mapping is invalid.
    #[error(transparent)]
    Userns(#[from] userns::UsernsError),
}

/// Which seccomp filter a container gets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seccomp {
    /// Docker's default profile ([`seccomp::default`]).
    #[default]
    Default,
    /// No filter.
    Unconfined,
    /// A profile given with `--security-opt seccomp=PROFILE.json`, already parsed.
    Profile(Box<Profile>),
}

/// The security settings of a container (part of its spec; travels to the guest agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// The seccomp filter.
    #[serde(default)]
    pub seccomp: Seccomp,
    /// Capabilities added to docker's default set (`--cap-add`; `ALL` for every one).
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// Capabilities taken from it (`--cap-drop`; `ALL` for every one).
    #[serde(default)]
    pub cap_drop: Vec<String>,
    /// Set no_new_privs on every process, so that setuid and file-capability binaries give no
    /// privileges (`--security-opt no-new-privileges[=true|false]`). Default false, as docker:
    /// setuid binaries work for the container's own users.
    #[serde(default)]
    pub no_new_privs: bool,
    /// Map container ids to an unprivileged range of host ids (`--userns`); host only.
    #[serde(default)]
    pub userns: Option<IdMapping>,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            seccomp: Seccomp::Default,
            cap_add: Vec::new(),
            cap_drop: Vec::new(),
            no_new_privs: false,
            userns: None,
        }
    }
}

impl Security {
    /// Applies one `--security-opt` value: `seccomp=unconfined`, `seccomp=PATH` (docker's JSON
    /// profile, read now), `no-new-privileges`, `no-new-privileges=true|false` (`:` works in
    /// place of `=`, as with docker).
    pub fn apply_opt(&mut self, opt: &str) -> Result<(), SecurityError> {
        let (key, value) = match opt.split_once(['=', ':']) {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (key, value) {
            ("seccomp", Some("unconfined")) => self.seccomp = Seccomp::Unconfined,
            ("seccomp", Some(path)) if !path.is_empty() => {
                let path = Path::new(path);
                let text = std::fs::read_to_string(path)
                    .map_err(|e| SecurityError::ReadProfile(path.to_path_buf(), e))?;
                let profile = Profile::from_json(&text)
                    .map_err(|e| SecurityError::Profile(path.to_path_buf(), e.to_string()))?;
                self.seccomp = Seccomp::Profile(Box::new(profile));
            }
            ("no-new-privileges", None | Some("true")) => self.no_new_privs = true,
            ("no-new-privileges", Some("false")) => self.no_new_privs = false,
            _ => return Err(SecurityError::BadOpt(opt.to_string())),
        }
        Ok(())
    }

    /// The capabilities of the container's processes.
    pub fn capabilities(&self) -> Result<CapSet, CapError> {
        CapSet::resolve(&self.cap_add, &self.cap_drop)
    }

    /// Checks the settings without touching the machine.
    pub fn validate(&self) -> Result<(), SecurityError> {
        self.capabilities()?;
        if let Seccomp::Profile(p) = &self.seccomp {
            p.check()?;
        }
        if let Some(m) = &self.userns {
            m.check()?;
        }
        Ok(())
    }

    /// How many distinct system calls a container with these settings can make on the kernel
    /// it runs on (see [`Profile::reachable`]): every one without a filter.
    pub fn direct_syscalls(&self) -> Result<usize, SecurityError> {
        let target = Target {
            caps: self.capabilities()?,
            kernel: seccomp::running_kernel(),
        };
        Ok(match &self.seccomp {
            Seccomp::Unconfined => seccomp::syscall_count(),
            Seccomp::Default => seccomp::default::profile().reachable(target).len(),
            Seccomp::Profile(p) => p.reachable(target).len(),
        })
    }

    /// Everything the new process needs, computed before it exists (it must not allocate).
    pub(crate) fn prepare(&self) -> Result<Prepared, SecurityError> {
        let last_cap = last_cap();
        let known = if last_cap >= 63 {
            u64::MAX
        } else {
            (1u64 << (last_cap + 1)) - 1
        };
        let caps = CapSet(self.capabilities()?.0 & known);
        let target = Target {
            caps,
            kernel: seccomp::running_kernel(),
        };
        let filters = match &self.seccomp {
            Seccomp::Unconfined => Vec::new(),
            Seccomp::Default => seccomp::default::profile().compile(target)?,
            Seccomp::Profile(p) => p.compile(target)?,
        };
        Ok(Prepared {
            caps,
            last_cap,
            no_new_privs: self.no_new_privs,
            filters,
        })
    }
}

/// `cap_last_cap` of the running kernel (40 when it cannot be read).
pub(crate) fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// The posture of one process, prepared before the clone or fork that starts it.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// Bounding set, and effective and permitted sets of a root process.
    pub caps: CapSet,
    last_cap: u32,
    no_new_privs: bool,
    /// Seccomp programs, in install order.
    filters: Vec<seccompiler::BpfProgram>,
}

/// CAP_SYS_ADMIN, which installing a filter without no_new_privs needs.
const CAP_SYS_ADMIN: u64 = 1 << 21;

impl Prepared {
    /// Whether a seccomp filter is installed.
    pub(crate) fn has_seccomp(&self) -> bool {
        !self.filters.is_empty()
    }

    /// First step, as root before the user switch: drops every other capability from the
    /// bounding set and keeps the permitted set across the switch. No allocation.
    pub(crate) fn drop_bounding(&self) -> Result<(), i32> {
        for cap in 0..=self.last_cap.min(63) {
            if !self.caps.has_number(cap) {
                let one = CapabilitySet::from_bits_retain(1 << cap);
                match rustix::thread::remove_capability_from_bounding_set(one) {
                    Ok(()) => {}
                    Err(e) if e == rustix::io::Errno::INVAL => {}
                    Err(e) => return Err(e.raw_os_error()),
                }
            }
        }
        rustix::thread::set_keep_capabilities(true).map_err(|e| e.raw_os_error())
    }

    /// Last step before `execve`, after the user switch: sets the capability sets (empty
    /// inheritable and ambient sets), no_new_privs, then the seccomp filters. `extra` is added
    /// to the effective and permitted sets (the init keeps CAP_KILL to forward signals). No
    /// allocation. Returns whether the failure was in seccomp, and the errno.
    pub(crate) fn finish(&self, extra: u64) -> Result<(), (bool, i32)> {
        let caps = self.caps.0 | extra;
        // Without no_new_privs only CAP_SYS_ADMIN may install a filter: hold it until then.
        let hold = !self.no_new_privs && self.has_seccomp() && caps & CAP_SYS_ADMIN == 0;
        let sets = |bits: u64| CapabilitySets {
            effective: CapabilitySet::from_bits_retain(bits),
            permitted: CapabilitySet::from_bits_retain(bits),
            inheritable: CapabilitySet::empty(),
        };
        let first = if hold { caps | CAP_SYS_ADMIN } else { caps };
        let os = |e: rustix::io::Errno| (false, e.raw_os_error());
        rustix::thread::set_capabilities(None, sets(first)).map_err(os)?;
        rustix::thread::clear_ambient_capability_set().map_err(os)?;
        if self.no_new_privs {
            rustix::thread::set_no_new_privs(true).map_err(os)?;
        }
        for f in &self.filters {
            seccomp::install(f).map_err(|e| (true, e))?;
        }
        if hold {
            rustix::thread::set_capabilities(None, sets(caps)).map_err(os)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_dockers() {
        let s = Security::default();
        assert_eq!(s.seccomp, Seccomp::Default);
        assert!(!s.no_new_privs);
        assert_eq!(s.capabilities().expect("caps").0, 0xa804_25fb);
        let parsed: Security = serde_json::from_str("{}").expect("parses");
        assert_eq!(parsed, s);
    }

    #[test]
    fn security_opts_parse_like_dockers() {
        let mut s = Security::default();
        s.apply_opt("seccomp=unconfined").expect("unconfined");
        assert_eq!(s.seccomp, Seccomp::Unconfined);
        s.apply_opt("no-new-privileges=false").expect("nnp off");
        assert!(!s.no_new_privs);
        s.apply_opt("no-new-privileges").expect("nnp on");
        assert!(s.no_new_privs);
        s.apply_opt("no-new-privileges:false").expect("colon form");
        assert!(!s.no_new_privs);
        for bad in [
            "apparmor=unconfined",
            "seccomp=",
            "no-new-privileges=maybe",
            "x",
        ] {
            let e = s.apply_opt(bad).expect_err(bad);
            assert_eq!(e.to_string().lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn a_profile_file_is_read_and_checked() {
        let d = tempfile::tempdir().expect("tempdir");
        let good = d.path().join("p.json");
        std::fs::write(
            &good,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_ERRNO"}]}"#,
        )
        .expect("write");
        let mut s = Security::default();
        s.apply_opt(&format!("seccomp={}", good.display()))
            .expect("good profile");
        assert!(matches!(s.seccomp, Seccomp::Profile(_)));
        let bad = d.path().join("bad.json");
        std::fs::write(&bad, r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#).expect("write");
        let e = s
            .apply_opt(&format!("seccomp={}", bad.display()))
            .expect_err("bad profile");
        assert!(e.to_string().contains("bad.json"), "{e}");
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
        let e = s
            .apply_opt("seccomp=/nonexistent/profile.json")
            .expect_err("missing file");
        assert!(matches!(e, SecurityError::ReadProfile(..)));
    }

    #[test]
    fn prepare_compiles_the_default_filter_and_masks_caps() {
        let p = Security::default().prepare().expect("prepare");
        assert!(p.has_seccomp());
        assert_eq!(p.caps.0, 0xa804_25fb);
        let s = Security {
            seccomp: Seccomp::Unconfined,
            ..Security::default()
        };
        assert!(!s.prepare().expect("prepare").has_seccomp());
        let s = Security {
            cap_add: vec!["ALL".into()],
            ..Security::default()
        };
        let p = s.prepare().expect("prepare");
        assert_eq!(p.caps.0 >> (last_cap() + 1), 0);
    }
}
