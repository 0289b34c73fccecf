//! What a container uses (`mvm stats`) and which processes it runs (`mvm top`), read from its
//! cgroup and /proc. The same code runs on the host for a container there and in the guest agent
//! for the container in a VM (where the VMM adds its device counters on the host's side).
//!
//! Both cgroup versions: each counter is read from whichever of the container's cgroup
//! directories has the file (v2: one directory; v1: one per hierarchy).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A container's resource use at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerStats {
    /// CPU time used by every process of the container so far, in microseconds.
    pub cpu_usec: u64,
    /// Memory in use as docker counts it: the cgroup's charge less its inactive file cache.
    pub memory_bytes: u64,
    /// The container's memory limit, if it has one.
    #[serde(default)]
    pub memory_limit: Option<u64>,
    /// The memory of the machine it runs on (the guest's in a VM): its limit when it has none.
    pub memory_total: u64,
    /// Processes (and threads) in the container.
    pub pids: u64,
    /// Bytes received on its network interfaces (loopback excepted).
    pub net_rx_bytes: u64,
    /// Bytes sent on its network interfaces (loopback excepted).
    pub net_tx_bytes: u64,
    /// Bytes read from block devices, where the kernel accounts them per cgroup.
    #[serde(default)]
    pub block_read_bytes: Option<u64>,
    /// Bytes written to block devices, where the kernel accounts them per cgroup.
    #[serde(default)]
    pub block_write_bytes: Option<u64>,
    /// CPUs online on the machine it runs on.
    pub online_cpus: u32,
}

/// Reads the stats of the container whose cgroup directories are `cgroup_dirs` and whose first
/// process is `pid` (its network namespace's counters come from `/proc/<pid>/net/dev`).
pub fn read(cgroup_dirs: &[PathBuf], pid: i32) -> ContainerStats {
    let file = |name: &str| -> Option<String> {
        cgroup_dirs
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join(name)).ok())
    };
    let number = |name: &str| file(name).and_then(|s| s.trim().parse::<u64>().ok());
    let cpu_usec = file("cpu.stat")
        .and_then(|s| keyed(&s, "usage_usec"))
        .or_else(|| number("cpuacct.usage").map(|ns| ns / 1000))
        .unwrap_or(0);
    let (current, stat, limit) = match number("memory.current") {
        Some(current) => (
            current,
            file("memory.stat").unwrap_or_default(),
            file("memory.max").and_then(|s| s.trim().parse::<u64>().ok()),
        ),
        None => (
            number("memory.usage_in_bytes").unwrap_or(0),
            file("memory.stat").unwrap_or_default(),
            // v1 says "no limit" with a huge number.
            number("memory.limit_in_bytes").filter(|l| *l < 1 << 62),
        ),
    };
    let inactive = keyed(&stat, "inactive_file")
        .or_else(|| keyed(&stat, "total_inactive_file"))
        .unwrap_or(0);
    let (block_read_bytes, block_write_bytes) = match file("io.stat") {
        Some(s) => (
            Some(io_stat_sum(&s, "rbytes")),
            Some(io_stat_sum(&s, "wbytes")),
        ),
        None => match file("blkio.throttle.io_service_bytes") {
            Some(s) => (Some(blkio_sum(&s, "Read")), Some(blkio_sum(&s, "Write"))),
            None => (None, None),
        },
    };
    let (net_rx_bytes, net_tx_bytes) = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .map(|s| net_dev(&s))
        .unwrap_or((0, 0));
    ContainerStats {
        cpu_usec,
        memory_bytes: current.saturating_sub(inactive),
        memory_limit: limit,
        memory_total: mem_total().unwrap_or(0),
        pids: number("pids.current")
            .unwrap_or_else(|| procs(cgroup_dirs).len().try_into().unwrap_or(u64::MAX)),
        net_rx_bytes,
        net_tx_bytes,
        block_read_bytes,
        block_write_bytes,
        online_cpus: std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
    }
}

/// `key value` lines (cpu.stat, memory.stat): the value of `key`.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// io.stat (`MAJ:MIN rbytes=N wbytes=N ...` per device): the sum of `key` over devices.
fn io_stat_sum(text: &str, key: &str) -> u64 {
    text.split_whitespace()
        .filter_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
        .sum()
}

/// blkio.throttle.io_service_bytes (`MAJ:MIN Read N` lines): the sum for operation `op`.
fn blkio_sum(text: &str, op: &str) -> u64 {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[1] == op).then(|| f[2].parse::<u64>().ok())?
        })
        .sum()
}

/// /proc/net/dev: received and sent bytes over every interface but loopback.
fn net_dev(text: &str) -> (u64, u64) {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            if name.trim() == "lo" {
                return None;
            }
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            Some((*f.first()?, *f.get(8)?))
        })
        .fold((0, 0), |(r, t), (a, b)| (r + a, t + b))
}

/// MemTotal of this machine, in bytes.
fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = text.lines().find_map(|l| {
        l.strip_prefix("MemTotal:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()
    })?;
    Some(kb * 1024)
}

/// The processes in the container's cgroup, sorted.
pub fn procs(cgroup_dirs: &[PathBuf]) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroup_dirs
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// One process of a container, as `mvm top` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessInfo {
    /// Its pid (in the runtime's pid namespace: the host's, or the guest's in a VM).
    pub pid: i32,
    /// Its parent's pid.
    pub ppid: i32,
    /// Its real user id.
    pub uid: u32,
    /// When it started, in seconds since the epoch.
    pub started: u64,
    /// CPU time it used (user + system), in milliseconds.
    pub cpu_ms: u64,
    /// Its command line (or `[name]` when it has none).
    pub command: String,
}

/// What `mvm top` shows: every process in the container's cgroup that can still be read.
pub fn top(cgroup_dirs: &[PathBuf]) -> Vec<ProcessInfo> {
    let boot = boot_time().unwrap_or(0);
    procs(cgroup_dirs)
        .into_iter()
        .filter_map(|pid| process_info(&Path::new("/proc").join(pid.to_string()), pid, boot))
        .collect()
}

/// Clock ticks per second, as /proc/PID/stat counts time.
fn ticks() -> u64 {
    // SAFETY: sysconf has no memory preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// The system's boot time, in seconds since the epoch (`btime` of /proc/stat).
fn boot_time() -> Option<u64> {
    keyed(&std::fs::read_to_string("/proc/stat").ok()?, "btime")
}

fn process_info(dir: &Path, pid: i32, boot: u64) -> Option<ProcessInfo> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    // Fields after the name, from field 3 (state) on.
    let f: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let ppid = f.get(1).and_then(|v| v.parse().ok())?;
    let cpu_ticks = field(14)? + field(15)?;
    let start_ticks = field(22)?;
    let uid = std::fs::read_to_string(dir.join("status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })?;
    let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
    let command = if cmdline.is_empty() {
        format!("[{name}]")
    } else {
        String::from_utf8_lossy(&cmdline)
            .trim_end_matches('\0')
            .replace('\0', " ")
    };
    let tck = ticks();
    Some(ProcessInfo {
        pid,
        ppid,
        uid,
        started: boot + start_ticks / tck,
        cpu_ms: cpu_ticks * 1000 / tck,
        command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_from_both_cgroup_versions() {
        assert_eq!(
            keyed("usage_usec 1500\nuser_usec 1000\n", "usage_usec"),
            Some(1500)
        );
        assert_eq!(
            keyed(
                "anon 5\ninactive_file 4096\nactive_file 1\n",
                "inactive_file"
            ),
            Some(4096)
        );
        let io = "254:0 rbytes=4096 wbytes=512 rios=1 wios=1\n254:16 rbytes=100 wbytes=0\n";
        assert_eq!(
            (io_stat_sum(io, "rbytes"), io_stat_sum(io, "wbytes")),
            (4196, 512)
        );
        let blkio = "8:0 Read 10\n8:0 Write 20\n8:0 Total 30\n8:16 Read 5\nTotal 35\n";
        assert_eq!(
            (blkio_sum(blkio, "Read"), blkio_sum(blkio, "Write")),
            (15, 20)
        );
        let dev = "Inter-|   Receive\n face |bytes packets\n    lo: 999 9 0 0 0 0 0 0 999 9 0 0 0 0 0 0\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n";
        assert_eq!(net_dev(dev), (1000, 2000));
    }

    #[test]
    fn a_cgroup_directory_gives_usage_and_processes() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        std::fs::write(dir.join("cpu.stat"), "usage_usec 2500000\n").unwrap();
        std::fs::write(dir.join("memory.current"), "10485760\n").unwrap();
        std::fs::write(dir.join("memory.stat"), "inactive_file 1048576\n").unwrap();
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        std::fs::write(dir.join("pids.current"), "3\n").unwrap();
        let me = std::process::id();
        std::fs::write(dir.join("cgroup.procs"), format!("{me}\n1\n{me}\n")).unwrap();
        let s = read(std::slice::from_ref(&dir), i32::try_from(me).unwrap());
        assert_eq!(s.cpu_usec, 2_500_000);
        assert_eq!(s.memory_bytes, 9 << 20);
        assert_eq!(s.memory_limit, None);
        assert!(s.memory_total > 0 && s.online_cpus >= 1);
        assert_eq!(s.pids, 3);
        assert_eq!(s.block_read_bytes, None);
        assert_eq!(
            procs(std::slice::from_ref(&dir)),
            [1, i32::try_from(me).unwrap()]
        );
        let mine = top(&[dir])
            .into_iter()
            .find(|p| p.pid == i32::try_from(me).unwrap())
            .unwrap();
        assert!(mine.command.contains("guest_agent") || !mine.command.is_empty());
        assert!(mine.started > 1_600_000_000, "{mine:?}");
    }
}
