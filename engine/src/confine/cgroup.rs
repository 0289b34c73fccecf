//! The VMM's cgroup: `mvm-vmm/<name>` (v2 where the host's unified hierarchy has the memory,
//! cpu and pids controllers, else in each v1 hierarchy under mvm's own cgroup). The VMM joins
//! it before it executes (see `super::spawn`), so everything it allocates, the guest's memory
//! first, is charged to it, and so is passt, its child.
//!
//! Limits: memory = the guest's memory + [`MEMORY_OVERHEAD`] (no swap), pids from the threads a
//! VMM can have, cpu = `--cpus` when given. [`VmmCgroup::stats`] reads its counters.

use std::path::{Path, PathBuf};

use guest_agent::runtime::cgroups::{Cgroup, CgroupError, CgroupVersion};
use guest_agent::runtime::Limits;
use serde::{Deserialize, Serialize};

use super::ConfineError;

/// The parent of every VMM's cgroup.
pub const PARENT: &str = "mvm-vmm";
/// What a VMM may use beyond its guest's memory: its own heap and thread stacks, KVM's kernel
/// memory, passt, and the page cache of its disks (reclaimable).
pub const MEMORY_OVERHEAD: u64 = 128 << 20;
/// Tasks a VMM has besides its vCPUs and relays: its main, event-loop, control and timeout
/// threads, passt, with room to spare.
const BASE_TASKS: u64 = 32;

/// A VMM's limits: the guest's memory and vCPUs, `--cpus`, and `ports` published ports (each
/// with an accept thread and two threads per forwarded connection).
pub fn limits(guest_memory: u64, vcpus: u8, cpus: Option<f64>, ports: usize) -> Limits {
    let relay_tasks = 1 + 2 * crate::portfwd::MAX_FORWARDED as u64;
    Limits {
        memory_bytes: Some(guest_memory.saturating_add(MEMORY_OVERHEAD)),
        cpus,
        pids_max: Some(BASE_TASKS + u64::from(vcpus) + relay_tasks * ports as u64),
    }
}

/// A VMM's counters, for `mvm stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmStats {
    /// Memory charged now (the guest's touched memory included), in bytes.
    pub memory_bytes: u64,
    /// The memory limit, in bytes.
    pub memory_limit: Option<u64>,
    /// Tasks (threads and processes) now.
    pub tasks: u64,
    /// CPU time used, in nanoseconds.
    pub cpu_ns: u64,
}

/// The cgroup of one VMM; removed when dropped (after the VMM has ended).
#[derive(Debug)]
pub struct VmmCgroup {
    cgroup: Cgroup,
}

impl VmmCgroup {
    /// Creates the cgroup `mvm-vmm/<name>` with `limits`; `None` where the host has no usable
    /// cgroup hierarchy (or this user may not create one).
    pub fn create(name: &str, limits: &Limits) -> Result<Option<VmmCgroup>, ConfineError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            log::debug!("not root: the VMM gets no cgroup of its own");
            return Ok(None);
        }
        match Cgroup::create_with(name, Some(PARENT), limits, false) {
            Ok(cgroup) => Ok(cgroup.map(|cgroup| VmmCgroup { cgroup })),
            // No cgroup v2 here (or not in this mount namespace: `ip netns exec` mounts a sysfs
            // of its own): the VMM runs without its memory, pids and cpu limits, and says so.
            Err(CgroupError::ControllerMissing(controller, _)) => {
                eprintln!(
                    "mvm: warning: the {controller} cgroup controller is not available here: the \
                     VMM runs without a cgroup of its own (no memory, pids or cpu limit on it)"
                );
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The `cgroup.procs` files the VMM writes itself into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.cgroup
            .dirs()
            .iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// The cgroup's directories (kept in the container's record, so `rm` can remove them).
    pub fn dirs(&self) -> &[PathBuf] {
        self.cgroup.dirs()
    }

    /// The counters now.
    pub fn stats(&self) -> VmmStats {
        stats(self.cgroup.version(), self.cgroup.dirs())
    }

    /// Removes the cgroup (the VMM has ended).
    pub fn remove(self) -> Result<(), ConfineError> {
        Ok(self.cgroup.remove()?)
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn find(dirs: &[PathBuf], file: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(file)).find(|p| p.exists())
}

/// The counters of the cgroup in `dirs` (one directory for v2, one per hierarchy for v1).
pub fn stats(version: CgroupVersion, dirs: &[PathBuf]) -> VmmStats {
    let value = |file: &str| find(dirs, file).and_then(|p| read_u64(&p));
    match version {
        CgroupVersion::V2 => VmmStats {
            memory_bytes: value("memory.current").unwrap_or(0),
            memory_limit: value("memory.max"),
            tasks: value("pids.current").unwrap_or(0),
            cpu_ns: find(dirs, "cpu.stat")
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())
                })
                .map_or(0, |us| us.saturating_mul(1000)),
        },
        CgroupVersion::V1 => VmmStats {
            memory_bytes: value("memory.usage_in_bytes").unwrap_or(0),
            memory_limit: value("memory.limit_in_bytes"),
            tasks: value("pids.current").unwrap_or(0),
            cpu_ns: value("cpuacct.usage").unwrap_or(0),
        },
    }
}

/// The cgroup name of the VMM that `mvm boot` with process id `pid` supervises.
pub fn boot_name(pid: u32) -> String {
    format!("boot-{pid}")
}

/// Removes the cgroups of `mvm boot` supervisors that were killed (SIGKILL leaves no chance to
/// clean up, and no record names them): every empty `mvm-vmm/boot-<pid>` whose process is
/// gone, in each hierarchy under `cgroup_root` (/sys/fs/cgroup). One that still has a task, or
/// whose pid runs, is left alone.
pub fn prune_dead_boots(cgroup_root: &Path) {
    let mut parents = vec![cgroup_root.join(PARENT)];
    if let Ok(hierarchies) = std::fs::read_dir(cgroup_root) {
        parents.extend(hierarchies.flatten().map(|h| h.path().join(PARENT)));
    }
    for parent in parents {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("boot-"))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let tasks = std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
            if Path::new(&format!("/proc/{pid}")).exists() || !tasks.trim().is_empty() {
                continue;
            }
            if std::fs::remove_dir(e.path()).is_ok() {
                log::debug!(
                    "removed the cgroup of a killed mvm boot: {}",
                    e.path().display()
                );
            }
        }
    }
}

/// Removes what is left of a VMM's cgroup after its supervisor died (`mvm rm`): kills whatever
/// still runs in it (a VMM that outlived its supervisor, its passt), then removes the
/// directories once no task is left in them.
pub fn remove_leftover(dirs: &[PathBuf]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for d in dirs {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill has no memory preconditions; the pid is in the VMM's own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for d in dirs.iter().rev() {
        loop {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // A killed task leaves its cgroup a moment after it died.
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    log::warn!("cannot remove cgroup {}: {e}", d.display());
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm() {
        let l = limits(256 << 20, 2, Some(1.5), 1);
        assert_eq!(l.memory_bytes, Some((256 << 20) + MEMORY_OVERHEAD));
        assert_eq!(l.cpus, Some(1.5));
        assert_eq!(
            l.pids_max,
            Some(BASE_TASKS + 2 + 1 + 2 * crate::portfwd::MAX_FORWARDED as u64)
        );
        assert_eq!(limits(64 << 20, 1, None, 0).pids_max, Some(BASE_TASKS + 1));
    }

    #[test]
    fn counters_are_read_from_either_version() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        std::fs::write(d.join("memory.current"), "4096\n").unwrap();
        std::fs::write(d.join("memory.max"), "max\n").unwrap();
        std::fs::write(d.join("pids.current"), "7\n").unwrap();
        std::fs::write(d.join("cpu.stat"), "usage_usec 12\nuser_usec 10\n").unwrap();
        let s = stats(CgroupVersion::V2, std::slice::from_ref(&d));
        assert_eq!(
            s,
            VmmStats {
                memory_bytes: 4096,
                memory_limit: None,
                tasks: 7,
                cpu_ns: 12_000
            }
        );
        let (mem, cpu) = (dir.path().join("memory"), dir.path().join("cpuacct"));
        std::fs::create_dir(&mem).unwrap();
        std::fs::create_dir(&cpu).unwrap();
        std::fs::write(mem.join("memory.usage_in_bytes"), "8192").unwrap();
        std::fs::write(mem.join("memory.limit_in_bytes"), "1048576").unwrap();
        std::fs::write(cpu.join("cpuacct.usage"), "99").unwrap();
        let s = stats(CgroupVersion::V1, &[mem, cpu]);
        assert_eq!(
            (s.memory_bytes, s.memory_limit, s.cpu_ns),
            (8192, Some(1 << 20), 99)
        );
    }

    #[test]
    fn the_cgroup_of_a_killed_mvm_boot_is_pruned_and_a_live_ones_is_kept() {
        let root = tempfile::tempdir().unwrap();
        // A pid that cannot run: above the kernel's pid_max limit (2^22).
        let dead = boot_name(4_194_305);
        let live = boot_name(std::process::id());
        let v1 = root.path().join("pids").join(PARENT);
        let v2 = root.path().join(PARENT);
        for parent in [&v1, &v2] {
            std::fs::create_dir_all(parent.join(&dead)).unwrap();
            std::fs::create_dir_all(parent.join(&live)).unwrap();
        }
        std::fs::create_dir_all(v1.join("abcdef012345")).unwrap();
        prune_dead_boots(root.path());
        for parent in [&v1, &v2] {
            assert!(!parent.join(&dead).exists(), "{}", parent.display());
            assert!(parent.join(&live).exists(), "{}", parent.display());
        }
        assert!(
            v1.join("abcdef012345").exists(),
            "a container's is rm's to remove"
        );
    }
}
