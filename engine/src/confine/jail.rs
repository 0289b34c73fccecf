//! The VMM's jail, entered by the VMM itself once its privileged setup is done (the VM, its
//! memory and devices exist, passt runs, the sockets are bound) and before any thread of it
//! touches the guest. In order:
//!
//! 1. new mount and ipc namespaces; every mount private, so nothing propagates either way;
//! 2. a root of its own: a small tmpfs mounted on [`JailPlan::mountpoint`] holding only the
//!    host directories the VMM still uses ([`JailPlan::visible`], bind-mounted at their own
//!    paths: the run directory with its sockets and disks), then `pivot_root` into it, the old
//!    root detached, the new root read-only;
//! 3. an unprivileged user: as root, the VMM's own uid and gid (groups dropped), then a new
//!    user namespace that maps only them; a VMM started by a user who is not root already is
//!    that user, in the user namespace its supervisor made ([`JailPlan::userns_made`]);
//! 4. no capabilities: the bounding set emptied, the securebits locked so none come back, the
//!    effective, permitted, inheritable and ambient sets cleared;
//! 5. no_new_privs, not dumpable (no core files, no ptrace by its user), and the parent death
//!    signal armed again (a uid change clears it): the VMM dies with its supervisor.
//!
//! The pid namespace was made by the supervisor when it started the VMM (`super::spawn`).

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::{CapabilitySet, CapabilitySets, UnshareFlags};
use serde::{Deserialize, Serialize};

use super::{os, ConfineError};

/// The jail of one VMM, planned by its supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailPlan {
    /// Whether to enter it at all (`--security-opt vmm-jail=off` for debugging).
    pub enabled: bool,
    /// The uid the VMM runs as.
    pub uid: u32,
    /// The gid the VMM runs as.
    pub gid: u32,
    /// The supervisor (not root) made the VMM's user namespace and wrote its id maps.
    pub userns_made: bool,
    /// An empty directory the jail's root is mounted on (in the VMM's mount namespace only).
    pub mountpoint: PathBuf,
    /// Host directories the jail shows at their own paths.
    pub visible: Vec<PathBuf>,
}

impl JailPlan {
    /// A plan that does nothing (the jail off).
    pub fn off() -> Self {
        JailPlan {
            enabled: false,
            uid: 0,
            gid: 0,
            userns_made: false,
            mountpoint: PathBuf::new(),
            visible: Vec::new(),
        }
    }
}

/// The highest capability number to drop from the bounding set (the kernel says EINVAL past
/// its own last one).
const LAST_CAP: u32 = 63;

fn errno(what: &str) -> impl FnOnce(rustix::io::Errno) -> ConfineError + '_ {
    move |e| ConfineError::Os(what.to_string(), io::Error::from(e))
}

/// Enters the jail `plan` describes (nothing when it is off). Must run while the process has one
/// thread. `lifeline` reads end-of-file once the supervisor is gone.
pub fn enter(plan: &JailPlan, lifeline: &OwnedFd) -> Result<(), ConfineError> {
    if !plan.enabled {
        return Ok(());
    }
    let threads = std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count);
    if threads != 1 {
        // A new user namespace takes a process with one thread; and a thread started before
        // the jail would run outside it.
        return Err(ConfineError::Handoff(format!(
            "the VMM has {threads} threads before its jail: it must have one"
        )));
    }
    // Opened while /proc is still there: the id maps are written through it later.
    let proc_self = rustix::fs::open(
        "/proc/self",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("open /proc/self"))?;
    // SAFETY: no FILES flag: the descriptor table stays shared with nothing (one thread).
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS | UnshareFlags::NEWIPC) }
        .map_err(errno("enter new mount and ipc namespaces"))?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(errno("make every mount private"))?;
    build_root(plan)?;
    if !plan.userns_made {
        become_user(plan, &proc_self)?;
    }
    drop(proc_self);
    drop_capabilities()?;
    rustix::thread::set_no_new_privs(true).map_err(errno("set no_new_privs"))?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(errno("make the VMM not dumpable"))?;
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(errno("arm the parent death signal"))?;
    if supervisor_gone(lifeline) {
        return Err(ConfineError::Handoff("the supervisor is gone".into()));
    }
    Ok(())
}

/// Mounts the tmpfs root on the mount point, shows the visible directories in it and pivots
/// into it.
fn build_root(plan: &JailPlan) -> Result<(), ConfineError> {
    let root = &plan.mountpoint;
    rustix::mount::mount(
        "mvm-jail",
        root,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        c"mode=0755,size=1m",
    )
    .map_err(errno("mount the jail's root"))?;
    for dir in &plan.visible {
        let inside = under(root, dir);
        std::fs::create_dir_all(&inside).map_err(os(format!("create {}", inside.display())))?;
        rustix::mount::mount_bind(dir, &inside).map_err(|e| {
            ConfineError::Os(format!("show {} in the jail", dir.display()), e.into())
        })?;
        // Nothing in them may be executed, become setuid or be a device.
        rustix::mount::mount_remount(
            &inside,
            MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            c"",
        )
        .map_err(errno("restrict a directory of the jail"))?;
    }
    rustix::process::chdir(root).map_err(errno("enter the jail's root"))?;
    rustix::process::pivot_root(".", ".").map_err(errno("pivot into the jail's root"))?;
    // The old root is stacked on the new one: detach it and everything under it.
    rustix::mount::unmount(".", UnmountFlags::DETACH).map_err(errno("detach the old root"))?;
    rustix::process::chdir("/").map_err(errno("enter the jail's root"))?;
    rustix::mount::mount_remount(
        "/",
        MountFlags::BIND
            | MountFlags::RDONLY
            | MountFlags::NOSUID
            | MountFlags::NODEV
            | MountFlags::NOEXEC,
        c"",
    )
    .map_err(errno("make the jail's root read-only"))?;
    Ok(())
}

/// `dir` (absolute) under `root`.
fn under(root: &Path, dir: &Path) -> PathBuf {
    root.join(dir.strip_prefix("/").unwrap_or(dir))
}

/// As root: switches to the plan's uid and gid, keeping the permitted capabilities for one more
/// step, and makes a user namespace that maps only them.
fn become_user(plan: &JailPlan, proc_self: &OwnedFd) -> Result<(), ConfineError> {
    let (uid, gid) = (plan.uid, plan.gid);
    rustix::thread::set_keep_capabilities(true).map_err(errno("keep capabilities"))?;
    rustix::thread::set_thread_groups(&[]).map_err(errno("drop supplementary groups"))?;
    // The process has one thread, so the thread's ids are the process's.
    let (ruid, rgid) = (
        rustix::process::Uid::from_raw(uid),
        rustix::process::Gid::from_raw(gid),
    );
    rustix::thread::set_thread_res_gid(rgid, rgid, rgid)
        .map_err(errno(&format!("switch to gid {gid}")))?;
    rustix::thread::set_thread_res_uid(ruid, ruid, ruid)
        .map_err(errno(&format!("switch to uid {uid}")))?;
    // The uid change made /proc/self root's; the maps below are written as this user.
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::Dumpable)
        .map_err(errno("reclaim /proc/self"))?;
    let mut caps = rustix::thread::capabilities(None).map_err(errno("read capabilities"))?;
    // CAP_SYS_ADMIN lets the namespace be made where unprivileged user namespaces are off.
    caps.effective = caps.permitted;
    rustix::thread::set_capabilities(None, caps).map_err(errno("raise capabilities"))?;
    // SAFETY: no FILES flag: the descriptor table is untouched.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER) }
        .map_err(errno("enter a new user namespace"))?;
    write_proc(proc_self, "setgroups", "deny")?;
    write_proc(proc_self, "uid_map", &format!("{uid} {uid} 1"))?;
    write_proc(proc_self, "gid_map", &format!("{gid} {gid} 1"))?;
    Ok(())
}

fn write_proc(proc_self: &OwnedFd, name: &str, text: &str) -> Result<(), ConfineError> {
    let what = || format!("write /proc/self/{name}");
    let fd = rustix::fs::openat(
        proc_self.as_fd(),
        name,
        OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ConfineError::Os(what(), e.into()))?;
    std::fs::File::from(fd)
        .write_all(text.as_bytes())
        .map_err(|e| ConfineError::Os(what(), e))
}

/// Empties every capability set and locks the securebits so none can come back.
fn drop_capabilities() -> Result<(), ConfineError> {
    use rustix::thread::CapabilitiesSecureBits as B;
    rustix::thread::set_capabilities_secure_bits(
        B::NO_ROOT
            | B::NO_ROOT_LOCKED
            | B::NO_SETUID_FIXUP
            | B::NO_SETUID_FIXUP_LOCKED
            | B::KEEP_CAPS_LOCKED
            | B::NO_CAP_AMBIENT_RAISE
            | B::NO_CAP_AMBIENT_RAISE_LOCKED,
    )
    .map_err(errno("lock the securebits"))?;
    for cap in 0..=LAST_CAP {
        let one = CapabilitySet::from_bits_retain(1 << cap);
        match rustix::thread::remove_capability_from_bounding_set(one) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::INVAL => break,
            Err(e) => return Err(errno("empty the bounding set")(e)),
        }
    }
    rustix::thread::clear_ambient_capability_set().map_err(errno("clear ambient capabilities"))?;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: CapabilitySet::empty(),
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(errno("clear capabilities"))
}

/// Whether the supervisor's end of the handoff pipe is closed.
fn supervisor_gone(lifeline: &OwnedFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: lifeline.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: polls one valid pollfd without waiting.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    n > 0 && fds[0].revents & libc::POLLHUP != 0
}

/// A path as a C string (for code that runs between clone and exec, where nothing allocates).
pub(crate) fn c_path(p: &Path) -> Result<CString, ConfineError> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| ConfineError::Handoff(format!("{} holds a NUL byte", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_directories_sit_at_their_own_paths_under_the_root() {
        assert_eq!(
            under(
                Path::new("/var/lib/mvm/jail"),
                Path::new("/var/lib/mvm/containers/ab")
            ),
            Path::new("/var/lib/mvm/jail/var/lib/mvm/containers/ab")
        );
        let plan = JailPlan::off();
        assert!(!plan.enabled);
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<JailPlan>(&json).unwrap(), plan);
    }
}
