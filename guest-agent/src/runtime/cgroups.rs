//! The container's cgroup: created before the process starts, limits written, the process moved
//! in before it executes anything, removed after the container exits.
//!
//! cgroup v2 (the guest, and most current hosts): `/sys/fs/cgroup/<parent>/<id>`, with the
//! `memory`, `cpu` and `pids` controllers enabled through `cgroup.subtree_control` of the root and
//! the parent. cgroup v1 (older or hybrid hosts, where those controllers are bound to v1
//! hierarchies): `<hierarchy>/<runtime's own cgroup>/<parent>/<id>` in each of the memory, cpu
//! and pids hierarchies, so the container stays inside whatever limits the runtime itself has.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::security::devices;
use super::spec::{Limits, CPU_PERIOD_US};

/// Default parent of container cgroups.
pub const DEFAULT_PARENT: &str = "mvm";

/// Errors creating, filling or removing a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A controller a limit needs is not available.
    #[error("the {0} cgroup controller is not available on this host (needed for {1}); run without that limit")]
    ControllerMissing(&'static str, &'static str),
    /// The cgroup already exists and has processes in it.
    #[error("cgroup {0} already exists and is in use: is a container with this name running?")]
    InUse(PathBuf),
    /// A cgroup file could not be read or written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// A cgroup directory could not be created.
    #[error("cannot create cgroup {0}")]
    Create(PathBuf, #[source] std::io::Error),
    /// A cgroup directory could not be removed.
    #[error("cannot remove cgroup {0}")]
    Remove(PathBuf, #[source] std::io::Error),
    /// The device allow-list could not be applied.
    #[error(transparent)]
    Devices(#[from] devices::DeviceError),
    /// `/proc/self/mountinfo` or `/proc/self/cgroup` could not be read.
    #[error("cannot read {0}")]
    Proc(&'static str, #[source] std::io::Error),
}

/// Which cgroup interface a [`Cgroup`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Unified hierarchy.
    V2,
    /// Legacy per-controller hierarchies.
    V1,
}

/// A mounted cgroup hierarchy found in mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The cgroup path the mount shows as its root (not `/` inside cgroup namespaces).
    pub mount_root: String,
    /// v1 controllers bound to it; empty for v2.
    pub controllers: Vec<String>,
    /// v2 or v1.
    pub version: CgroupVersion,
}

/// Parses `/proc/self/mountinfo` into the cgroup hierarchies it lists.
pub fn parse_mountinfo(text: &str) -> Vec<Hierarchy> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let (root, mountpoint) = (pre[3], pre[4]);
        let version = match post[0] {
            "cgroup2" => CgroupVersion::V2,
            "cgroup" => CgroupVersion::V1,
            _ => continue,
        };
        let controllers = if version == CgroupVersion::V1 {
            post[2]
                .split(',')
                .filter(|o| ["memory", "cpu", "pids", "devices"].contains(o))
                .map(String::from)
                .collect()
        } else {
            Vec::new()
        };
        out.push(Hierarchy {
            mountpoint: PathBuf::from(mountpoint),
            mount_root: root.to_string(),
            controllers,
            version,
        });
    }
    out
}

/// The runtime's own cgroup path in the hierarchy with `controller` (`""` for v2), from
/// `/proc/self/cgroup`.
pub fn own_path(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let hit = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_string())
    })
}

/// The directory of a container's cgroup in a v1 hierarchy: the runtime's own cgroup (seen
/// relative to the mount's root) joined with `parent/id`.
pub fn v1_dir(h: &Hierarchy, own: &str, parent: &str, id: &str) -> PathBuf {
    let rel = own.strip_prefix(h.mount_root.as_str()).unwrap_or(own);
    let mut dir = h.mountpoint.clone();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        dir.push(part);
    }
    dir.join(parent).join(id)
}

/// The directory of a container's cgroup in the v2 hierarchy.
pub fn v2_dir(h: &Hierarchy, parent: &str, id: &str) -> PathBuf {
    h.mountpoint.join(parent).join(id)
}

/// A container's cgroup (one directory for v2, one per hierarchy for v1).
#[derive(Debug)]
pub struct Cgroup {
    version: CgroupVersion,
    dirs: Vec<PathBuf>,
    memory_dir: Option<PathBuf>,
    removed: bool,
}

fn write(path: PathBuf, value: &str) -> Result<(), CgroupError> {
    std::fs::write(&path, value).map_err(|e| CgroupError::Write(path, e))
}

/// Creates `dir`; an existing empty cgroup (left by a crash) is reused, a busy one is an error.
fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    if let Some(p) = dir.parent() {
        std::fs::create_dir_all(p).map_err(|e| CgroupError::Create(p.to_path_buf(), e))?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                log::debug!("reusing empty cgroup {}", dir.display());
                Ok(())
            } else {
                Err(CgroupError::InUse(dir.to_path_buf()))
            }
        }
        Err(e) => Err(CgroupError::Create(dir.to_path_buf(), e)),
    }
}

impl Cgroup {
    /// Creates the cgroup `parent/id` (parent defaults to [`DEFAULT_PARENT`]) and writes the
    /// limits. Returns `None` when the host has no usable cgroup hierarchy and no limit was asked
    /// for.
    pub fn create(
        id: &str,
        parent: Option<&str>,
        limits: &Limits,
    ) -> Result<Option<Cgroup>, CgroupError> {
        Self::create_with(id, parent, limits, true)
    }

    /// Like [`Cgroup::create`], without the container's device allow-list when `devices` is
    /// false (for a process that opens host devices itself, such as a VMM and /dev/kvm).
    pub fn create_with(
        id: &str,
        parent: Option<&str>,
        limits: &Limits,
        devices: bool,
    ) -> Result<Option<Cgroup>, CgroupError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| CgroupError::Proc("/proc/self/mountinfo", e))?;
        let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| CgroupError::Proc("/proc/self/cgroup", e))?;
        let hierarchies = parse_mountinfo(&mountinfo);
        let parent = parent.unwrap_or(DEFAULT_PARENT);
        let needed = needed_controllers(limits);

        // v2 when a cgroup2 mount offers every controller the limits need.
        let v2 = hierarchies.iter().find(|h| {
            h.version == CgroupVersion::V2 && {
                let have = std::fs::read_to_string(h.mountpoint.join("cgroup.controllers"))
                    .unwrap_or_default();
                let have: Vec<&str> = have.split_whitespace().collect();
                let full = ["memory", "cpu", "pids"].iter().all(|c| have.contains(c));
                needed.iter().all(|(c, _)| have.contains(c)) && (full || !needed.is_empty())
            }
        });
        if let Some(h) = v2 {
            return Self::create_v2(h, parent, id, limits, devices).map(Some);
        }
        let v1: Vec<&Hierarchy> = hierarchies
            .iter()
            .filter(|h| h.version == CgroupVersion::V1 && !h.controllers.is_empty())
            .collect();
        for (c, why) in &needed {
            if !v1.iter().any(|h| h.controllers.iter().any(|x| x == c)) {
                return Err(CgroupError::ControllerMissing(c, why));
            }
        }
        if v1.is_empty() {
            log::debug!(
                "no cgroup hierarchy with memory, cpu, pids or devices: running without a cgroup \
                 (no device allow-list; mounts but /dev are nodev)"
            );
            return Ok(None);
        }
        if !v1
            .iter()
            .any(|h| h.controllers.iter().any(|c| c == "devices"))
        {
            log::debug!(
                "no devices cgroup controller: no device allow-list; mounts but /dev are nodev"
            );
        }
        Self::create_v1(&v1, &proc_cgroup, parent, id, limits, devices).map(Some)
    }

    fn create_v2(
        h: &Hierarchy,
        parent: &str,
        id: &str,
        limits: &Limits,
        devices: bool,
    ) -> Result<Cgroup, CgroupError> {
        let available =
            std::fs::read_to_string(h.mountpoint.join("cgroup.controllers")).unwrap_or_default();
        let enable: Vec<&str> = ["memory", "cpu", "pids"]
            .into_iter()
            .filter(|c| available.split_whitespace().any(|a| a == *c))
            .collect();
        // Enable the controllers on the way down: root, then each level of the parent.
        let mut level = h.mountpoint.clone();
        let parts: Vec<&str> = parent.split('/').collect();
        for i in 0..=parts.len() {
            let control = level.join("cgroup.subtree_control");
            let current = std::fs::read_to_string(&control).unwrap_or_default();
            for c in &enable {
                if !current.split_whitespace().any(|x| x == *c) {
                    write(control.clone(), &format!("+{c}"))?;
                }
            }
            if let Some(p) = parts.get(i) {
                level.push(p);
                match std::fs::create_dir(&level) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(CgroupError::Create(level, e)),
                }
            }
        }
        let dir = v2_dir(h, parent, id);
        make_dir(&dir)?;
        let mut cg = Cgroup {
            version: CgroupVersion::V2,
            dirs: vec![dir.clone()],
            memory_dir: enable.contains(&"memory").then(|| dir.clone()),
            removed: false,
        };
        let r = (|| {
            if let Some(m) = limits.memory_bytes {
                write(dir.join("memory.max"), &m.to_string())?;
                if dir.join("memory.swap.max").exists() {
                    write(dir.join("memory.swap.max"), "0")?;
                }
            }
            if let Some(q) = cpu_quota(limits) {
                write(dir.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
            }
            if let Some(p) = limits.pids_max {
                write(dir.join("pids.max"), &p.to_string())?;
            }
            if !devices {
                return Ok(());
            }
            match devices::attach_v2(&dir) {
                Ok(()) => Ok(()),
                Err(devices::DeviceError::Unsupported(e)) => {
                    log::debug!(
                        "no device allow-list: this kernel cannot attach cgroup device \
                         programs ({e}); mounts but /dev are nodev"
                    );
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        })();
        if let Err(e) = r {
            let _ = cg.remove_inner();
            return Err(e);
        }
        Ok(cg)
    }

    fn create_v1(
        hierarchies: &[&Hierarchy],
        proc_cgroup: &str,
        parent: &str,
        id: &str,
        limits: &Limits,
        devices: bool,
    ) -> Result<Cgroup, CgroupError> {
        let mut cg = Cgroup {
            version: CgroupVersion::V1,
            dirs: Vec::new(),
            memory_dir: None,
            removed: false,
        };
        let r = (|| {
            for h in hierarchies {
                let own = own_path(proc_cgroup, &h.controllers[0]).unwrap_or_else(|| "/".into());
                let dir = v1_dir(h, &own, parent, id);
                make_dir(&dir)?;
                cg.dirs.push(dir.clone());
                let has = |c: &str| h.controllers.iter().any(|x| x == c);
                if has("memory") {
                    cg.memory_dir = Some(dir.clone());
                    if let Some(m) = limits.memory_bytes {
                        write(dir.join("memory.limit_in_bytes"), &m.to_string())?;
                        if dir.join("memory.memsw.limit_in_bytes").exists() {
                            write(dir.join("memory.memsw.limit_in_bytes"), &m.to_string())?;
                        }
                    }
                }
                if has("cpu") {
                    if let Some(q) = cpu_quota(limits) {
                        write(dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                        write(dir.join("cpu.cfs_quota_us"), &q.to_string())?;
                    }
                }
                if has("pids") {
                    if let Some(p) = limits.pids_max {
                        write(dir.join("pids.max"), &p.to_string())?;
                    }
                }
                if devices && has("devices") {
                    devices::apply_v1(&dir)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            let _ = cg.remove_inner();
            return Err(e);
        }
        Ok(cg)
    }

    /// v1 or v2.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The cgroup's directories (one for v2, one per hierarchy for v1).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves process `pid` (and so everything it starts later) into the cgroup.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write(d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// How many processes the kernel's OOM killer has killed in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let Some(d) = &self.memory_dir else { return 0 };
        let file = match self.version {
            CgroupVersion::V2 => "memory.events",
            CgroupVersion::V1 => "memory.oom_control",
        };
        std::fs::read_to_string(d.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Removes the cgroup, killing anything still in it.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.remove_inner()
    }

    fn remove_inner(&mut self) -> Result<(), CgroupError> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        let mut first_err = None;
        for d in self.dirs.iter().rev() {
            if let Err(e) = remove_dir(d) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove_inner() {
            log::warn!("{e}");
        }
    }
}

/// Removes one cgroup directory. The kernel lets a cgroup go only once its last task is fully
/// gone, which can trail the parent's `waitpid` a little: retry for up to a second, killing any
/// stragglers.
fn remove_dir(d: &Path) -> Result<(), CgroupError> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        match std::fs::remove_dir(d) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(1) => {
                return Err(CgroupError::Remove(d.to_path_buf(), e))
            }
            Err(_) => {
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: kill has no memory preconditions; the pid is in our container's cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}

fn cpu_quota(limits: &Limits) -> Option<u64> {
    // Same rounding as ContainerSpec::cpu_quota_us; cpus is validated finite and >= 0.01.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    limits
        .cpus
        .map(|c| ((c * CPU_PERIOD_US as f64).round() as u64).max(1000))
}

fn needed_controllers(limits: &Limits) -> Vec<(&'static str, &'static str)> {
    let mut v = Vec::new();
    if limits.memory_bytes.is_some() {
        v.push(("memory", "a memory limit"));
    }
    if limits.cpus.is_some() {
        v.push(("cpu", "a CPU limit"));
    }
    if limits.pids_max.is_some() {
        v.push(("pids", "a pids limit"));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime shared:5 - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PROC_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/1117
1:cpu,cpuacct:/
0::/user.slice
";

    #[test]
    fn mountinfo_lists_v1_and_v2_hierarchies() {
        let h = parse_mountinfo(HYBRID);
        assert_eq!(h.len(), 5);
        assert_eq!(h[0].controllers, ["cpu"]);
        assert_eq!(h[1].controllers, ["memory"]);
        assert_eq!(h[2].mountpoint, Path::new("/sys/fs/cgroup/pids"));
        assert!(h[3].controllers.is_empty());
        assert_eq!(h[4].version, CgroupVersion::V2);
    }

    #[test]
    fn own_path_matches_controller_lists() {
        assert_eq!(
            own_path(PROC_CGROUP, "memory").as_deref(),
            Some("/process_api/1117")
        );
        assert_eq!(own_path(PROC_CGROUP, "cpu").as_deref(), Some("/"));
        assert_eq!(own_path(PROC_CGROUP, "").as_deref(), Some("/user.slice"));
        assert_eq!(own_path(PROC_CGROUP, "hugetlb"), None);
    }

    #[test]
    fn v1_dirs_nest_under_the_runtimes_own_cgroup() {
        let h = parse_mountinfo(HYBRID);
        assert_eq!(
            v1_dir(&h[1], "/process_api/1117", "mvm", "web"),
            Path::new("/sys/fs/cgroup/memory/process_api/1117/mvm/web")
        );
        assert_eq!(
            v1_dir(&h[2], "/", "mvm", "web"),
            Path::new("/sys/fs/cgroup/pids/mvm/web")
        );
        // Inside a cgroup namespace the mount's root is a prefix of our own path.
        let ns = Hierarchy {
            mount_root: "/outer".into(),
            ..h[1].clone()
        };
        assert_eq!(
            v1_dir(&ns, "/outer/inner", "a/b", "x"),
            Path::new("/sys/fs/cgroup/memory/inner/a/b/x")
        );
    }

    #[test]
    fn v2_dir_is_under_the_hierarchy_root() {
        let h = parse_mountinfo("1 0 0:1 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(
            v2_dir(&h[0], "mvm", "c1"),
            Path::new("/sys/fs/cgroup/mvm/c1")
        );
    }

    #[test]
    fn needed_controllers_follow_limits() {
        let l = Limits {
            memory_bytes: Some(1 << 30),
            cpus: None,
            pids_max: Some(10),
        };
        let n: Vec<_> = needed_controllers(&l).into_iter().map(|(c, _)| c).collect();
        assert_eq!(n, ["memory", "pids"]);
        assert_eq!(
            cpu_quota(&Limits {
                cpus: Some(0.5),
                ..Limits::default()
            }),
            Some(50_000)
        );
    }
}
