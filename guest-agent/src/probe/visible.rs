//! What the workload sees: kernel, hostname, processes, devices, mounts, interfaces, CPUs and
//! memory.

use super::{sys, Visible};

/// Collects [`Visible`]; `host_processes` is the result of the marker scan, when a marker was
/// given.
pub fn collect(host_processes: Option<bool>) -> Visible {
    let (kernel, hostname) = sys::uname();
    Visible {
        kernel,
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string()),
        hostname,
        pid: std::process::id(),
        processes: count_processes(),
        host_processes,
        devices: devices(),
        mounts: std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .map(|t| count_u32(t.lines().filter(|l| !l.trim().is_empty()).count())),
        interfaces: std::fs::read_to_string("/proc/self/net/dev")
            .ok()
            .map(|t| parse_net_dev(&t)),
        cpus: sys::affinity_cpus(),
        memory_bytes: std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_mem_total(&t)),
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The pids listed in `/proc`.
pub fn pids() -> Option<Vec<i32>> {
    let rd = std::fs::read_dir("/proc").ok()?;
    Some(
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect(),
    )
}

fn count_processes() -> Option<u32> {
    pids().map(|p| count_u32(p.len()))
}

fn devices() -> Option<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir("/dev")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Some(names)
}

/// Interface names from `/proc/net/dev` (two header lines, then `name: counters...`).
pub fn parse_net_dev(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn parse_mem_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_names() {
        let text = "Inter-|   Receive                            |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes\n    \
            lo:  123 4 0 0 0 0 0 0 123 4 0 0 0 0 0 0\n  \
            eth0: 9 9 0 0 0 0 0 0 9 9 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(text), vec!["eth0", "lo"]);
        assert!(parse_net_dev("").is_empty());
    }

    #[test]
    fn mem_total_in_bytes() {
        let text = "MemTotal:        2030000 kB\nMemFree:          100 kB\n";
        assert_eq!(parse_mem_total(text), Some(2_030_000 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: x kB\n"), None);
    }

    #[test]
    fn this_process_is_visible() {
        let v = collect(None);
        assert!(!v.kernel.is_empty());
        assert!(v.processes.is_some_and(|n| n >= 1));
        assert!(pids().is_some_and(|p| p.contains(&i32::try_from(v.pid).expect("pid"))));
        assert!(v.interfaces.is_some_and(|i| i.contains(&"lo".to_string())));
        assert!(v.cpus >= 1);
    }
}
