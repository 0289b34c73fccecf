//! The result of `mvm compare` as data ([`Comparison`]): what the CLI prints as a table, writes
//! as JSON (these serde names are the schema) or renders as HTML.

use guest_agent::probe::{LimitResult, Probe, ProbeResult, SeccompMode};
use serde::{Deserialize, Serialize};

use crate::spec::Isolation;

/// Version of this format; bumped when a field changes meaning or is removed.
pub const COMPARISON_VERSION: u32 = 1;

/// One comparison: the same image, the same limits, one column per isolation mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Comparison {
    /// [`COMPARISON_VERSION`].
    pub version: u32,
    /// The image as given.
    pub image: String,
    /// The workload each run timed: the command after `--`, or the probe's `--hello` line.
    pub command: Vec<String>,
    /// The machine the comparison ran on.
    pub host: HostInfo,
    /// The limits every mode was given.
    pub limits: GivenLimits,
    /// Runs per mode; every cost is the median of the runs that gave it.
    pub runs: u32,
    /// When the comparison started (UTC, `YYYY-MM-DD HH:MM`).
    pub date: String,
    /// One entry per isolation mode, in the order asked for.
    pub modes: Vec<ModeReport>,
}

/// The host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    /// Kernel release.
    pub kernel: String,
    /// CPUs online.
    pub cpus: u32,
    /// Host name.
    pub hostname: String,
    /// What backs /dev/kvm (`VT-x/AMD-V`, `PVM`), or why there is none.
    pub virtualization: String,
}

/// The limits of every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GivenLimits {
    /// Memory, bytes (a VM's memory).
    pub memory_bytes: Option<u64>,
    /// Processes.
    pub pids: Option<u64>,
    /// CPUs (a VM gets them rounded up as vCPUs).
    pub cpus: Option<f64>,
}

/// Whether a mode ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeStatus {
    /// It ran; everything below was measured.
    Ok,
    /// It cannot run on this host (no KVM, no kernel, no static agent): never started.
    Unavailable,
    /// It was started and failed.
    Failed,
}

/// One isolation mode, measured in its own runs. Everything but `isolation`, `status` and
/// `reason` is `null` for a mode that did not run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeReport {
    /// `process`, `container` or `vm`.
    pub isolation: Isolation,
    /// Whether it ran.
    pub status: ModeStatus,
    /// Why it did not run (one line).
    pub reason: Option<String>,
    /// The kernel release the workload sees.
    pub kernel: Option<String>,
    /// Same kernel release and boot id as the host's: the workload runs on the host's kernel.
    pub shares_host_kernel: Option<bool>,
    /// What the workload sees.
    pub visible: Option<VisibleReport>,
    /// Whether the limits held.
    pub limits: Option<LimitsReport>,
    /// The attack surface.
    pub surface: Option<SurfaceReport>,
    /// The escape probes, the same names in the same order in every mode that ran.
    pub probes: Vec<Probe>,
    /// What the mode costs.
    pub cost: Option<CostReport>,
    /// The workload's output in the first run (at most [`OUTPUT_LIMIT`] bytes).
    pub output: Option<String>,
    /// The workload's exit code in the first run.
    pub exit_code: Option<i32>,
}

/// Most bytes of a workload's output kept in the report.
pub const OUTPUT_LIMIT: usize = 4096;

/// What the workload sees (from the probe).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisibleReport {
    /// Whether a host process (mvm's marker) is among the processes it sees.
    pub host_processes: Option<bool>,
    /// Processes it sees.
    pub processes: Option<u32>,
    /// Entries of its /dev.
    pub devices: Option<Vec<String>>,
    /// Mounts in its mount namespace.
    pub mounts: Option<u32>,
    /// Its network interfaces.
    pub interfaces: Option<Vec<String>>,
    /// Its hostname.
    pub hostname: String,
    /// Its pid (1: first process of its own PID namespace).
    pub pid: u32,
    /// CPUs it may run on.
    pub cpus: u32,
    /// Memory its kernel reports (`MemTotal`), bytes.
    pub memory_bytes: Option<u64>,
}

/// The limit checks: each `enforced`, `not-enforced`, `not-set` or `error` (inconclusive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsReport {
    /// Touching memory past the limit was refused or killed.
    pub memory: LimitResult,
    /// Forking past the pids limit was refused.
    pub pids: LimitResult,
    /// Busy processes got no more than the CPU limit (within 10%).
    pub cpu: LimitResult,
    /// One line per check: what was tried and measured.
    pub details: LimitDetails,
}

/// What each limit check tried and measured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitDetails {
    /// The memory check.
    pub memory: String,
    /// The pids check.
    pub pids: String,
    /// The CPU check.
    pub cpu: String,
}

/// The attack surface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SurfaceReport {
    /// The workload's seccomp mode.
    pub seccomp: Option<SeccompMode>,
    /// Its effective capabilities.
    pub capabilities: Option<Vec<String>>,
    /// `no_new_privs` is set.
    pub no_new_privs: bool,
    /// It runs in a user namespace of its own (its root is not the host's).
    pub user_namespace: Option<bool>,
    /// Distinct host-kernel system calls the workload can make directly: every one without a
    /// filter, what the filter lets through in a container, 0 in a VM (its calls reach the
    /// guest kernel). `null` when unknown (a filter mvm did not install).
    pub host_syscalls_direct: Option<u32>,
    /// VM only: distinct system calls the VMM's own seccomp filters allow (the host surface
    /// the guest reaches through the VMM); `null` when the VMM runs without a filter.
    pub vmm_filter_syscalls: Option<u32>,
    /// Where `host_syscalls_direct` and `vmm_filter_syscalls` come from.
    pub note: String,
}

/// What a mode costs: medians over the runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostReport {
    /// From starting the run to the workload's first byte on stdout, ms (`null`: it printed
    /// nothing).
    pub start_ms: Option<f64>,
    /// From starting the run to its end, less the probe's own time: what a run of the workload
    /// alone takes, ms.
    pub exit_ms: Option<f64>,
    /// Proportional set size of every host process the run started (mvm's run process, the
    /// container's processes, the VMM, passt) while the sandbox idles after the workload, KiB.
    pub memory_overhead_kib: Option<u64>,
    /// The plain process's time for a fixed compute loop over this mode's (1.0: as fast).
    pub cpu_relative: Option<f64>,
    /// Nanoseconds per system call (`getppid`).
    pub syscall_ns: Option<f64>,
    /// fork + exec + wait of a static binary, per second.
    pub fork_exec_per_s: Option<f64>,
    /// Writing a file and fsync, MiB/s (where the workload's writable directory lives).
    pub disk_write_mib_s: Option<f64>,
    /// TCP over 127.0.0.1 between two processes, MiB/s.
    pub tcp_loopback_mib_s: Option<f64>,
    /// Where the disk test wrote (inside the sandbox).
    pub disk_dir: Option<String>,
    /// Runs that gave a report.
    pub runs: u32,
    /// Measurements some run could not make, `"<field>: <reason>"`.
    pub errors: Vec<String>,
}

impl ModeReport {
    /// A mode that did not run, and why.
    pub fn not_run(isolation: Isolation, status: ModeStatus, reason: String) -> ModeReport {
        ModeReport {
            isolation,
            status,
            reason: Some(reason),
            kernel: None,
            shares_host_kernel: None,
            visible: None,
            limits: None,
            surface: None,
            probes: Vec::new(),
            cost: None,
            output: None,
            exit_code: None,
        }
    }

    /// How many escape probes were allowed.
    pub fn allowed(&self) -> usize {
        self.probes
            .iter()
            .filter(|p| p.result == ProbeResult::Allowed)
            .count()
    }
}

/// The median of the values given; `None` for none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// The median of whole numbers (the mean of the middle two for an even count); `None` for none.
pub fn median_u64(mut values: Vec<u64>) -> Option<u64> {
    values.sort_unstable();
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some(
            values[n / 2 - 1] / 2
                + values[n / 2] / 2
                + (values[n / 2 - 1] % 2 + values[n / 2] % 2) / 2,
        ),
    }
}

/// `YYYY-MM-DD HH:MM` (UTC) of a time in seconds since the epoch.
pub fn utc_minute(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Days to civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_take_the_middle_and_skip_what_is_missing() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median_u64(vec![]), None);
        assert_eq!(median_u64(vec![9, 1, 5]), Some(5));
        assert_eq!(median_u64(vec![3, 6]), Some(4));
        assert_eq!(median_u64(vec![u64::MAX, u64::MAX]), Some(u64::MAX));
    }

    #[test]
    fn dates_are_utc_minutes() {
        assert_eq!(utc_minute(0), "1970-01-01 00:00");
        assert_eq!(utc_minute(951_782_400 + 3_661), "2000-02-29 01:01");
        assert_eq!(utc_minute(1_767_225_600), "2026-01-01 00:00");
    }

    #[test]
    fn a_mode_that_did_not_run_has_nulls_and_a_reason() {
        let m = ModeReport::not_run(Isolation::Vm, ModeStatus::Unavailable, "no /dev/kvm".into());
        let v = serde_json::to_value(&m).unwrap_or_default();
        assert_eq!(v["isolation"], "vm");
        assert_eq!(v["status"], "unavailable");
        assert_eq!(v["reason"], "no /dev/kvm");
        assert!(v["visible"].is_null() && v["cost"].is_null());
        assert_eq!(m.allowed(), 0);
    }
}
