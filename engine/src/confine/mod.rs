//! The VMM process and its confinement. A guest kernel is hostile, so the process that runs a
//! VM (the one holding /dev/kvm) is given as little as it needs: its own process, in new
//! user, pid, mount and ipc namespaces, as an unprivileged user with no capabilities and
//! no_new_privs, with a root holding only the directories it still uses, in a cgroup sized to
//! the VM, and a seccomp filter on every thread (`vmm::seccomp`).
//!
//! Two processes share the work:
//!
//! - the **supervisor** (the runner of `mvm run`, or `mvm boot` itself) keeps its privileges and
//!   holds no VM: it creates the VMM's cgroup, starts the VMM ([`spawn`]) with the job as
//!   typed JSON on a pipe ([`Handoff`]), forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to it,
//!   hears what it reports ([`VmmEvent`]) and, when it ends, records the exit and cleans up;
//! - the **VMM** (mvm started again with [`VMM_ENV`]) does the setup that needs privilege
//!   (opens /dev/kvm, the disks, the tap, starts passt, binds its sockets), then jails itself
//!   ([`jail::enter`]), turns seccomp on, starts the vCPUs and runs the guest. It is PID 1 of
//!   its pid namespace, so passt (its child) ends with it, and it dies with SIGKILL when the
//!   supervisor does.
//!
//! `--security-opt vmm-jail=off` and `vmm-seccomp=off` turn each half off, for debugging only
//! ([`VmmSecurity`]); `vmm-user=` picks the VMM's user.

pub mod cgroup;
pub mod jail;
pub mod spawn;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use cgroup::VmmCgroup;
pub use jail::JailPlan;
pub use spawn::{spawn, VmmExit, VmmProcess};

/// Set in the environment of a VMM process: which job it runs (`run`, `boot`).
pub const VMM_ENV: &str = "MVM_VMM";
/// The descriptor a VMM reads its [`Handoff`] from.
const HANDOFF_FD: i32 = 3;
/// The descriptor a VMM writes its [`VmmEvent`]s to.
const EVENTS_FD: i32 = 4;
/// The longest line either side reads from the other.
const MAX_LINE: u64 = 16 << 20;

/// The first uid (and gid) of the default range of per-VM users.
pub const DEFAULT_UID_BASE: u32 = 0x6000_0000;
/// How many ids the default range holds (every pid fits: the id is the supervisor's pid in it).
pub const DEFAULT_UID_RANGE: u32 = 1 << 22;

/// Errors starting or confining a VMM.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// A `--security-opt vmm-...` value mvm does not know.
    #[error("--security-opt {0:?}: use vmm-seccomp=off, vmm-jail=off (both for debugging only) or vmm-user=UID[:GID]|range[:BASE:SIZE]")]
    BadOpt(String),
    /// A system call of the setup failed.
    #[error("cannot {0}")]
    Os(String, #[source] io::Error),
    /// The handoff between the two processes broke.
    #[error("the VMM's handoff: {0}")]
    Handoff(String),
    /// The VMM's cgroup.
    #[error(transparent)]
    Cgroup(#[from] guest_agent::runtime::cgroups::CgroupError),
    /// The seccomp filters.
    #[error(transparent)]
    Seccomp(#[from] vmm::seccomp::SeccompError),
}

/// Shorthand for a failed system call in `map_err`.
pub(crate) fn os(what: impl Into<String>) -> impl FnOnce(io::Error) -> ConfineError {
    let what = what.into();
    move |e| ConfineError::Os(what, e)
}

/// The user a VMM runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VmmUser {
    /// Its own uid and gid from a range: `base` plus the supervisor's pid (unique while the VM
    /// runs), so no two VMMs share a user.
    Range {
        /// The first id.
        base: u32,
        /// How many ids.
        size: u32,
    },
    /// One dedicated user for every VMM.
    Fixed {
        /// Its uid.
        uid: u32,
        /// Its gid.
        gid: u32,
    },
}

impl Default for VmmUser {
    fn default() -> Self {
        VmmUser::Range {
            base: DEFAULT_UID_BASE,
            size: DEFAULT_UID_RANGE,
        }
    }
}

impl VmmUser {
    /// The uid and gid for the VMM of the supervisor `pid`.
    pub fn ids(&self, pid: u32) -> (u32, u32) {
        match *self {
            VmmUser::Range { base, size } => {
                let id = base.saturating_add(pid % size.max(1));
                (id, id)
            }
            VmmUser::Fixed { uid, gid } => (uid, gid),
        }
    }
}

fn yes() -> bool {
    true
}

/// How the VMM of a run is confined: all of it by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmSecurity {
    /// Seccomp filters on every VMM thread (`--security-opt vmm-seccomp=off`: debugging only).
    #[serde(default = "yes")]
    pub seccomp: bool,
    /// The jail: namespaces, an unprivileged user, no capabilities, a root of its own
    /// (`--security-opt vmm-jail=off`: debugging only).
    #[serde(default = "yes")]
    pub jail: bool,
    /// The user the VMM runs as (`--security-opt vmm-user=...`).
    #[serde(default)]
    pub user: VmmUser,
}

impl Default for VmmSecurity {
    fn default() -> Self {
        VmmSecurity {
            seccomp: true,
            jail: true,
            user: VmmUser::default(),
        }
    }
}

impl VmmSecurity {
    /// Applies one `--security-opt` value if it is about the VMM (`vmm-...`); returns whether
    /// it was. `vmm-seccomp=off|on`, `vmm-jail=off|on`, `vmm-user=UID[:GID]`,
    /// `vmm-user=range[:BASE:SIZE]`.
    pub fn apply_opt(&mut self, opt: &str) -> Result<bool, ConfineError> {
        let Some(rest) = opt.strip_prefix("vmm-") else {
            return Ok(false);
        };
        let bad = || ConfineError::BadOpt(opt.to_string());
        let (key, value) = rest.split_once(['=', ':']).ok_or_else(bad)?;
        let on_off = |v: &str| match v {
            "on" | "true" => Ok(true),
            "off" | "false" | "unconfined" => Ok(false),
            _ => Err(bad()),
        };
        match key {
            "seccomp" => self.seccomp = on_off(value)?,
            "jail" => self.jail = on_off(value)?,
            "user" => self.user = parse_user(value).ok_or_else(bad)?,
            _ => return Err(bad()),
        }
        Ok(true)
    }

    /// What the user should hear about a weakened VMM (one line each), if anything.
    pub fn warnings(&self) -> Vec<&'static str> {
        let mut w = Vec::new();
        if !self.seccomp {
            w.push("--security-opt vmm-seccomp=off: the VMM's threads run without seccomp filters (for debugging only)");
        }
        if !self.jail {
            w.push("--security-opt vmm-jail=off: the VMM runs with mvm's own privileges, outside its jail (for debugging only)");
        }
        w
    }
}

fn parse_user(v: &str) -> Option<VmmUser> {
    if v == "range" {
        return Some(VmmUser::default());
    }
    if let Some(r) = v.strip_prefix("range:") {
        let (base, size) = r.split_once(':')?;
        let (base, size): (u32, u32) = (base.parse().ok()?, size.parse().ok()?);
        return (base > 0 && size > 0 && base.checked_add(size).is_some())
            .then_some(VmmUser::Range { base, size });
    }
    let (uid, gid) = match v.split_once(':') {
        Some((u, g)) => (u.parse().ok()?, g.parse().ok()?),
        None => {
            let u: u32 = v.parse().ok()?;
            (u, u)
        }
    };
    // Root is what the jail takes away; -1 means "unchanged" to setresuid.
    (uid != 0 && gid != 0 && uid != u32::MAX && gid != u32::MAX)
        .then_some(VmmUser::Fixed { uid, gid })
}

/// What the supervisor hands a VMM: its job (typed by the caller) and how to confine itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handoff<J> {
    /// What to run.
    pub job: J,
    /// The jail to enter once set up.
    pub jail: JailPlan,
    /// Whether to turn seccomp on.
    pub seccomp: bool,
}

/// What a VMM tells its supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VmmEvent {
    /// It handles SIGINT and SIGTERM now: signals may be forwarded.
    Started,
    /// The container runs (`mvm run`).
    Running,
    /// The devices' counters (`mvm boot --metrics`).
    Metrics(serde_json::Value),
    /// A template VMM saved its VM (the boot to the agent took this long); the supervisor moves
    /// the template into place.
    TemplateSaved {
        /// Milliseconds from the start of the boot to the agent's answer.
        boot_ms: u64,
    },
    /// This host's KVM cannot save or restore a VM (what failed): the supervisor notes it and
    /// runs the VM cold.
    HostCannotSnapshot(String),
}

/// The VMM's side: its job, the jail plan and where it reports to.
#[derive(Debug)]
pub struct VmmRequest {
    /// The job's kind (the value of [`VMM_ENV`]).
    pub kind: String,
    /// The handoff pipe (kept open: it closes when the supervisor dies).
    lifeline: OwnedFd,
    /// The job, as JSON.
    handoff: Handoff<serde_json::Value>,
    events: EventSender,
}

/// Sends [`VmmEvent`]s to the supervisor, from any thread of the VMM.
#[derive(Debug, Clone)]
pub struct EventSender(Arc<Mutex<std::fs::File>>);

impl EventSender {
    /// Tells the supervisor `event` (a broken pipe means it is gone; the VMM dies with it).
    pub fn send(&self, event: &VmmEvent) {
        let Ok(mut line) = serde_json::to_vec(event) else {
            return;
        };
        line.push(b'\n');
        let mut events = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = events.write_all(&line) {
            log::debug!("cannot tell the supervisor {event:?}: {e}");
        }
    }
}

/// The VMM request of this process, if it is a VMM. Call it first thing (it takes the variable
/// out of the environment, so no child inherits it).
pub fn vmm_request() -> Option<Result<VmmRequest, ConfineError>> {
    let kind = std::env::var(VMM_ENV).ok()?;
    std::env::remove_var(VMM_ENV);
    Some(read_request(kind))
}

fn read_request(kind: String) -> Result<VmmRequest, ConfineError> {
    for fd in [HANDOFF_FD, EVENTS_FD] {
        // SAFETY: sets close-on-exec on a descriptor the supervisor set up for this process
        // (see `spawn`): passt must not inherit them.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(ConfineError::Handoff(format!(
                "descriptor {fd} is not open: a VMM is started by its supervisor only"
            )));
        }
    }
    // SAFETY: descriptors 3 and 4 are open (checked above) and owned here, once each.
    let (lifeline, events) = unsafe {
        (
            OwnedFd::from_raw_fd(HANDOFF_FD),
            std::fs::File::from_raw_fd(EVENTS_FD),
        )
    };
    let reader = std::fs::File::from(lifeline.try_clone().map_err(os("read the handoff"))?);
    let mut line = Vec::new();
    // The supervisor writes one line and keeps its end open: nothing follows it.
    BufReader::new(reader.take(MAX_LINE))
        .read_until(b'\n', &mut line)
        .map_err(os("read the handoff"))?;
    let handoff = serde_json::from_slice(&line)
        .map_err(|e| ConfineError::Handoff(format!("unreadable job: {e}")))?;
    Ok(VmmRequest {
        kind,
        lifeline,
        handoff,
        events: EventSender(Arc::new(Mutex::new(events))),
    })
}

impl VmmRequest {
    /// The job, typed.
    pub fn job<J: serde::de::DeserializeOwned>(&self) -> Result<J, ConfineError> {
        serde_json::from_value(self.handoff.job.clone())
            .map_err(|e| ConfineError::Handoff(format!("unreadable {} job: {e}", self.kind)))
    }

    /// The jail to enter.
    pub fn jail(&self) -> &JailPlan {
        &self.handoff.jail
    }

    /// Whether seccomp is to be turned on.
    pub fn seccomp(&self) -> bool {
        self.handoff.seccomp
    }

    /// Tells the supervisor `event`.
    pub fn send(&self, event: &VmmEvent) {
        self.events.send(event);
    }

    /// A sender of events for another thread.
    pub fn events(&self) -> EventSender {
        self.events.clone()
    }

    /// The descriptor that reads end-of-file once the supervisor has died.
    pub fn lifeline(&self) -> &OwnedFd {
        &self.lifeline
    }

    /// Enters the jail and turns seccomp on, as the handoff says.
    pub fn confine(&self) -> Result<(), ConfineError> {
        jail::enter(&self.handoff.jail, &self.lifeline)?;
        if self.handoff.seccomp {
            vmm::seccomp::enable(vmm::seccomp::Filters::compile()?)?;
        }
        Ok(())
    }
}

/// The directory (under the mvm root) each VMM mounts its jail's root on, in its own mount
/// namespace: empty, shared by every VMM, never written to.
pub fn jail_mountpoint(mvm_root: &Path) -> PathBuf {
    mvm_root.join("jail")
}

/// The jail of a VMM started by this process under the mvm root `mvm_root`, showing the
/// directories `visible`: as `security` asks (off with `vmm-jail=off`), as the user
/// `security.user` picks when this process is root, else as this process's own user in a user
/// namespace the supervisor makes.
pub fn plan(
    mvm_root: &Path,
    security: &VmmSecurity,
    visible: impl IntoIterator<Item = PathBuf>,
) -> Result<JailPlan, ConfineError> {
    if !security.jail {
        return Ok(JailPlan::off());
    }
    // SAFETY: geteuid, getuid and getgid have no preconditions.
    let (euid, uid, gid) = unsafe { (libc::geteuid(), libc::getuid(), libc::getgid()) };
    let root_user = euid == 0;
    let (uid, gid) = if root_user {
        security.user.ids(std::process::id())
    } else {
        (uid, gid)
    };
    let mountpoint = jail_mountpoint(mvm_root);
    rootfs_builder::rootdir::prepare_root(mvm_root).map_err(|e| {
        ConfineError::Os(
            format!("prepare {}", mvm_root.display()),
            io::Error::other(e),
        )
    })?;
    match std::fs::create_dir(&mountpoint) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(os(format!("create {}", mountpoint.display()))(e)),
    }
    Ok(JailPlan {
        enabled: true,
        uid,
        gid,
        userns_made: !root_user,
        mountpoint,
        visible: visible_dirs(visible),
    })
}

/// Lets the VMM's user reach its run directory (search only; root's and nothing more), for as
/// long as the returned guard lives; it is private again afterwards.
pub fn open_run_dir(dir: &Path, plan: &JailPlan) -> Result<RunDirAccess, ConfineError> {
    use std::os::unix::fs::PermissionsExt;
    let changed = plan.enabled && !plan.userns_made;
    if changed {
        std::os::unix::fs::chown(dir, Some(0), Some(plan.gid))
            .map_err(os(format!("hand {} to the VMM", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))
            .map_err(os(format!("hand {} to the VMM", dir.display())))?;
    }
    Ok(RunDirAccess {
        dir: dir.to_path_buf(),
        changed,
    })
}

/// See [`open_run_dir`].
#[derive(Debug)]
pub struct RunDirAccess {
    dir: PathBuf,
    changed: bool,
}

impl Drop for RunDirAccess {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        if self.changed {
            let _ = std::os::unix::fs::chown(&self.dir, Some(0), Some(0));
            let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
        }
    }
}

/// Hands the sockets a VMM binds to its jail's user, so that it (and root) can connect to
/// them once jailed. Call as root before entering the jail.
pub fn hand_over(plan: &JailPlan, paths: &[&Path]) -> Result<(), ConfineError> {
    if !plan.enabled || plan.userns_made {
        return Ok(());
    }
    for p in paths {
        if p.exists() {
            std::os::unix::fs::chown(p, Some(plan.uid), Some(plan.gid))
                .map_err(os(format!("hand {} to the VMM", p.display())))?;
        }
    }
    Ok(())
}

/// The paths a VMM's jail shows, deduplicated, parents before children.
pub fn visible_dirs(paths: impl IntoIterator<Item = PathBuf>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = paths.into_iter().filter(|p| p.is_absolute()).collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_options_parse_and_refuse_what_they_do_not_know() {
        let mut s = VmmSecurity::default();
        assert!(s.warnings().is_empty());
        assert!(
            !s.apply_opt("seccomp=unconfined").unwrap(),
            "the container's"
        );
        assert!(s.apply_opt("vmm-seccomp=off").unwrap());
        assert!(s.apply_opt("vmm-jail:off").unwrap());
        assert_eq!((s.seccomp, s.jail), (false, false));
        assert_eq!(s.warnings().len(), 2);
        assert!(s.warnings()[0].contains("debugging only"));
        s.apply_opt("vmm-user=1234").unwrap();
        assert_eq!(
            s.user,
            VmmUser::Fixed {
                uid: 1234,
                gid: 1234
            }
        );
        s.apply_opt("vmm-user=1234:99").unwrap();
        assert_eq!(s.user.ids(7), (1234, 99));
        s.apply_opt("vmm-user=range:100000:10").unwrap();
        assert_eq!(s.user.ids(25), (100_005, 100_005));
        s.apply_opt("vmm-user=range").unwrap();
        assert_eq!(s.user.ids(5).0, DEFAULT_UID_BASE + 5);
        for bad in [
            "vmm-seccomp=maybe",
            "vmm-user=0",
            "vmm-user=root",
            "vmm-user=range:1:0",
            "vmm-user=4294967295",
            "vmm-cgroup=off",
            "vmm-jail",
        ] {
            assert!(
                matches!(s.apply_opt(bad), Err(ConfineError::BadOpt(_))),
                "{bad}"
            );
        }
        let json = serde_json::to_string(&VmmSecurity::default()).unwrap();
        assert_eq!(
            serde_json::from_str::<VmmSecurity>(&json).unwrap(),
            VmmSecurity::default()
        );
        assert_eq!(
            serde_json::from_str::<VmmSecurity>("{}").unwrap(),
            VmmSecurity::default()
        );
    }

    #[test]
    fn events_round_trip_as_json_lines() {
        for e in [
            VmmEvent::Started,
            VmmEvent::Running,
            VmmEvent::Metrics(serde_json::json!({"rng": {"bytes": 64}})),
            VmmEvent::TemplateSaved { boot_ms: 1200 },
            VmmEvent::HostCannotSnapshot("save a VM: GET_XSAVE".into()),
        ] {
            let line = serde_json::to_string(&e).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<VmmEvent>(&line).unwrap(), e);
        }
    }
}
