//! `mvm stats` and `mvm top`: what running containers use and run.
//!
//! A container on the host is read from its cgroup and /proc (`guest_agent::runtime::stats`).
//! A VM's container is read the same way by its agent, in the guest; its network and block I/O
//! are the VMM's own device counters instead (what crossed the VM's boundary, written by the VMM
//! to `<dir>/metrics.json` every second, see [`crate::microvm::METRICS_FILE`]), and a VM without
//! a memory limit inside counts the guest's memory as its limit.
//!
//! CPU % is the CPU time used between two samples over the time between them (100% is one CPU
//! busy), as docker computes it.

use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::guest::MAIN_CONTAINER;
use guest_agent::runtime::stats::{self, ContainerStats, ProcessInfo};

use crate::error::{bad_input, Error};
use crate::lifecycle::{agent, find, host_process, list};
use crate::microvm::METRICS_FILE;
use crate::spec::Isolation;
use crate::state::{ContainerRecord, StateStore, Status};

/// One container's line of `mvm stats`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StatsRow {
    /// The container id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// CPU use since the previous sample, in percent of one CPU.
    pub cpu_percent: f64,
    /// Memory in use, in bytes.
    pub memory_bytes: u64,
    /// Its memory limit (the machine's memory when it has none), in bytes.
    pub memory_limit: u64,
    /// Memory in use, in percent of the limit.
    pub memory_percent: f64,
    /// Bytes received over the network.
    pub net_rx_bytes: u64,
    /// Bytes sent over the network.
    pub net_tx_bytes: u64,
    /// Bytes read from disk.
    pub block_read_bytes: u64,
    /// Bytes written to disk.
    pub block_write_bytes: u64,
    /// Processes (and threads).
    pub pids: u64,
}

/// One reading of a container.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    stats: ContainerStats,
}

/// Reads containers repeatedly, keeping the previous reading for CPU %.
#[derive(Debug)]
pub struct Sampler {
    root: std::path::PathBuf,
    names: Vec<String>,
    previous: Vec<(String, Sample)>,
}

impl Sampler {
    /// Samples `names`, or every running container when `names` is empty.
    pub fn new(root: &Path, names: Vec<String>) -> Self {
        Sampler {
            root: root.to_path_buf(),
            names,
            previous: Vec::new(),
        }
    }

    /// The containers sampled now.
    fn records(&self) -> Result<Vec<(StateStore, ContainerRecord)>, Error> {
        if self.names.is_empty() {
            let all = list(&self.root)?;
            let store = StateStore::open(&self.root)?;
            return Ok(all
                .into_iter()
                .filter(|r| r.live_status() == Status::Running && r.isolation != Isolation::Process)
                .map(|r| (store.clone(), r))
                .collect());
        }
        self.names.iter().map(|n| find(&self.root, n)).collect()
    }

    /// A line per container; CPU % from the previous call (or from a first reading taken
    /// `first_interval` earlier, the first time).
    pub fn sample(&mut self, first_interval: Duration) -> Result<Vec<StatsRow>, Error> {
        let records = self.records()?;
        if self.previous.is_empty() {
            for (store, r) in &records {
                if let Ok(s) = read(store, r) {
                    self.previous.push((r.id.clone(), s));
                }
            }
            std::thread::sleep(first_interval);
        }
        let mut rows = Vec::new();
        let mut now = Vec::new();
        for (store, r) in &records {
            let s = match read(store, r) {
                Ok(s) => s,
                // Named: say why; listed: it ended meanwhile.
                Err(e) if !self.names.is_empty() => return Err(e),
                Err(_) => continue,
            };
            let before = self
                .previous
                .iter()
                .find(|(id, _)| *id == r.id)
                .map(|p| &p.1);
            rows.push(row(r, before, &s));
            now.push((r.id.clone(), s));
        }
        self.previous = now;
        Ok(rows)
    }
}

fn row(r: &ContainerRecord, before: Option<&Sample>, s: &Sample) -> StatsRow {
    let cpu_percent = before.map_or(0.0, |b| {
        let wall = s.at.duration_since(b.at).as_micros();
        let used = s.stats.cpu_usec.saturating_sub(b.stats.cpu_usec);
        #[allow(clippy::cast_precision_loss)]
        if wall == 0 {
            0.0
        } else {
            used as f64 * 100.0 / wall as f64
        }
    });
    let limit = s
        .stats
        .memory_limit
        .unwrap_or(s.stats.memory_total)
        .min(s.stats.memory_total.max(1));
    #[allow(clippy::cast_precision_loss)]
    let memory_percent = if limit == 0 {
        0.0
    } else {
        s.stats.memory_bytes as f64 * 100.0 / limit as f64
    };
    StatsRow {
        id: r.id.clone(),
        name: r.name.clone(),
        cpu_percent,
        memory_bytes: s.stats.memory_bytes,
        memory_limit: limit,
        memory_percent,
        net_rx_bytes: s.stats.net_rx_bytes,
        net_tx_bytes: s.stats.net_tx_bytes,
        block_read_bytes: s.stats.block_read_bytes.unwrap_or(0),
        block_write_bytes: s.stats.block_write_bytes.unwrap_or(0),
        pids: s.stats.pids,
    }
}

/// What the container uses now.
fn read(store: &StateStore, r: &ContainerRecord) -> Result<Sample, Error> {
    let stats = match r.isolation {
        Isolation::Vm => {
            let mut stats =
                agent(store, r)?
                    .stats(MAIN_CONTAINER)
                    .map_err(|source| Error::Agent {
                        what: format!("stats of {}", r.name),
                        source,
                    })?;
            vm_devices(&store.container_dir(&r.id), &mut stats);
            stats
        }
        Isolation::Container => {
            let pid = host_process(r)
                .ok_or_else(|| bad_input(format!("container {} is not running", r.name)))?;
            stats::read(&r.cgroup_dirs, pid)
        }
        Isolation::Process => {
            return Err(bad_input(format!(
                "container {} is a plain process (--isolation process): it has no cgroup to read",
                r.name
            )))
        }
    };
    Ok(Sample {
        at: Instant::now(),
        stats,
    })
}

/// The VMM's device counters of the VM in `dir`: its network and disk traffic.
fn vm_devices(dir: &Path, stats: &mut ContainerStats) {
    let Some(json) = std::fs::read(dir.join(METRICS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return;
    };
    let Some(devices) = json.as_object() else {
        return;
    };
    let counter = |dev: &serde_json::Value, key: &str| dev[key].as_u64().unwrap_or(0);
    if let Some(net) = devices.get("net") {
        // The device's receive side is what the guest received.
        stats.net_rx_bytes = counter(net, "rx_bytes");
        stats.net_tx_bytes = counter(net, "tx_bytes");
    }
    let disks: Vec<&serde_json::Value> = devices
        .iter()
        .filter(|(k, _)| k.starts_with("block_"))
        .map(|(_, v)| v)
        .collect();
    if !disks.is_empty() {
        stats.block_read_bytes = Some(disks.iter().map(|d| counter(d, "read_bytes")).sum());
        stats.block_write_bytes = Some(disks.iter().map(|d| counter(d, "write_bytes")).sum());
    }
}

/// The processes of a running container (`mvm top`), by pid.
pub fn top(root: &Path, name: &str) -> Result<Vec<ProcessInfo>, Error> {
    let (store, r) = find(root, name)?;
    crate::lifecycle::require_running(&r)?;
    match r.isolation {
        Isolation::Vm => agent(&store, &r)?
            .top(MAIN_CONTAINER)
            .map_err(|source| Error::Agent {
                what: format!("top of {}", r.name),
                source,
            }),
        Isolation::Container => Ok(stats::top(&r.cgroup_dirs)),
        Isolation::Process => Err(bad_input(format!(
            "container {} is a plain process (--isolation process): use ps on the host",
            r.name
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vms_io_comes_from_its_device_counters() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(METRICS_FILE),
            r#"{"block_vda":{"read_bytes":4096,"write_bytes":0},"block_vdb":{"read_bytes":1,"write_bytes":2},"net":{"rx_bytes":100,"tx_bytes":50},"rng":{}}"#,
        )
        .unwrap();
        let mut s = ContainerStats::default();
        vm_devices(dir.path(), &mut s);
        assert_eq!((s.net_rx_bytes, s.net_tx_bytes), (100, 50));
        assert_eq!(
            (s.block_read_bytes, s.block_write_bytes),
            (Some(4097), Some(2))
        );
    }

    #[test]
    fn cpu_is_the_time_used_over_the_time_between_samples() {
        let r = ContainerRecord::new(
            "0123456789abcdef".into(),
            "c".into(),
            "i".into(),
            Isolation::Container,
            vec![],
            vec![],
        );
        let t = Instant::now();
        let stats = |cpu, mem| ContainerStats {
            cpu_usec: cpu,
            memory_bytes: mem,
            memory_limit: Some(100 << 20),
            memory_total: 1 << 30,
            ..ContainerStats::default()
        };
        let a = Sample {
            at: t,
            stats: stats(1_000_000, 0),
        };
        let b = Sample {
            at: t + Duration::from_secs(2),
            stats: stats(2_000_000, 25 << 20),
        };
        let row = row(&r, Some(&a), &b);
        assert!((row.cpu_percent - 50.0).abs() < 1e-9, "{}", row.cpu_percent);
        assert_eq!(row.memory_limit, 100 << 20);
        assert!((row.memory_percent - 25.0).abs() < 1e-9);
    }
}
