//! `mvm-agent probe`: what a workload sees and can do, measured from inside its sandbox.
//!
//! mvm places the static agent binary into the sandbox (a bare process on the host, a
//! shared-kernel container, or a container inside a microVM) and runs `mvm-agent probe`; the
//! probe prints one JSON [`ProbeReport`] and exits 0, whatever the individual checks found.
//! `mvm compare` reads the reports of the modes and puts them side by side.
//!
//! - [`visible`]: kernel, hostname, processes, devices, mounts, interfaces, CPUs, memory.
//! - [`surface`]: seccomp, capabilities, no_new_privs, user namespace.
//! - [`escapes`]: the escape probes, the same list in every mode ([`escapes::NAMES`]).
//! - [`limits`]: whether the memory, pids and CPU limits hold.
//! - [`cost`]: CPU loop, syscall latency, fork+exec, disk and loopback TCP throughput.
//!
//! Host identity comes from nonces the host hands over (see [`Options`]): a probe says
//! `allowed` only when it reached the real host resource, never a look-alike inside a VM.
//!
//! For `mvm compare` the probe also runs the workload the host times (`-- CMD ARGS...`, or
//! `mvm-agent probe --hello` where the image has nothing to run): first the workload, then a
//! line with `--mark`'s token and its exit code, then a pause (`--hold-ms`) in which the host
//! measures the sandbox's memory, then the probe and its report.
//!
//! Every check is harmless even when the probe runs as root directly on the host: privileged
//! system calls are made with arguments the kernel rejects right after its permission check
//! (the errno tells which check failed), nothing is written to /proc, /sys or a device, and
//! what is created (a mount, a device node, a file) is removed again.
//!
//! The probe is single-threaded on purpose: it forks helper processes (never threads), which
//! is also what keeps it safe in guests that corrupt multi-threaded processes around fork.

pub mod cost;
pub mod escapes;
pub mod limits;
mod options;
pub mod surface;
mod sys;
pub mod visible;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use options::{Command, Options, OptionsError, USAGE};
pub use sys::uname;

/// Version of the report format; bumped when a field changes meaning or is removed.
pub const REPORT_VERSION: u32 = 1;

/// Everything one probe run found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeReport {
    /// [`REPORT_VERSION`] of the probe that wrote the report.
    pub version: u32,
    /// What the workload sees.
    pub visible: Visible,
    /// The attack surface the workload has on its kernel.
    pub surface: Surface,
    /// The escape probes, in the order of [`escapes::NAMES`].
    pub probes: Vec<Probe>,
    /// Whether the resource limits the host asked for hold.
    pub limits: LimitsReport,
    /// What running here costs.
    pub cost: Cost,
}

/// What the workload sees of the machine. A field that could not be read is `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Visible {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// `/proc/sys/kernel/random/boot_id`: with `kernel`, tells the host whether the workload
    /// runs on the host's own kernel.
    pub boot_id: Option<String>,
    /// Hostname (`uname -n`).
    pub hostname: String,
    /// The probe's own pid (1 when it is the first process of a PID namespace).
    pub pid: u32,
    /// Processes listed in `/proc`.
    pub processes: Option<u32>,
    /// Whether the host's marker process (`--marker-cmdline`) is among them; `null` when no
    /// marker was given.
    pub host_processes: Option<bool>,
    /// Entries of `/dev` (names, sorted).
    pub devices: Option<Vec<String>>,
    /// Mounts in the probe's mount namespace (lines of `/proc/self/mountinfo`).
    pub mounts: Option<u32>,
    /// Network interfaces of the probe's network namespace (from `/proc/self/net/dev`).
    pub interfaces: Option<Vec<String>>,
    /// CPUs the probe may run on (its affinity mask).
    pub cpus: u32,
    /// `MemTotal` of `/proc/meminfo`, in bytes.
    pub memory_bytes: Option<u64>,
}

/// Seccomp mode of the probe (`Seccomp:` in `/proc/self/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompMode {
    /// No seccomp: every system call reaches the kernel.
    Disabled,
    /// Strict mode (read, write, exit, sigreturn only).
    Strict,
    /// One or more BPF filters.
    Filter,
}

/// A capability set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilitySet {
    /// The set as 16 hex digits, as `/proc/self/status` shows it.
    pub hex: String,
    /// The capabilities in it (`CAP_CHOWN`, ...; `CAP_<n>` for one this probe has no name
    /// for), in bit order.
    pub names: Vec<String>,
}

/// One line of `/proc/self/uid_map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdMapping {
    /// First id inside the namespace.
    pub inside: u32,
    /// The id it is outside (in the parent user namespace).
    pub outside: u32,
    /// How many consecutive ids.
    pub count: u32,
}

/// The attack surface: how much of its kernel the workload can reach, and with which rights.
/// The host side adds what only it can know (how many host system calls are direct).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Surface {
    /// Seccomp mode; `null` when `/proc/self/status` is unreadable.
    pub seccomp: Option<SeccompMode>,
    /// Number of seccomp filters installed (`Seccomp_filters:`, Linux 5.9+).
    pub seccomp_filters: Option<u32>,
    /// Effective capabilities.
    pub capabilities: Option<CapabilitySet>,
    /// Bounding set: what the process and its children can ever gain.
    pub capabilities_bounding: Option<CapabilitySet>,
    /// `no_new_privs` is set (setuid binaries and file capabilities grant nothing).
    pub no_new_privs: bool,
    /// The probe runs in a user namespace other than the initial one (its uid map is not the
    /// identity map of all ids), so its root is not the host's root.
    pub user_namespace: Option<bool>,
    /// The uid map itself.
    pub uid_map: Option<Vec<IdMapping>>,
}

/// Outcome of one escape probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeResult {
    /// The sandbox stopped it.
    Blocked,
    /// The workload did it (for a host resource: reached the real one, proven by its nonce).
    Allowed,
    /// The probe could not decide (an input was not given, or an unexpected error).
    Error,
}

/// One escape probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// Stable name, one of [`escapes::NAMES`].
    pub name: String,
    /// What happened.
    pub result: ProbeResult,
    /// One line: why (the errno, what was reached, what was missing).
    pub detail: String,
}

/// Outcome of a limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LimitResult {
    /// Going past the limit was refused or killed.
    Enforced,
    /// The workload went past the limit.
    NotEnforced,
    /// No limit was given to check.
    NotSet,
    /// The check itself failed or could not be made here.
    Error,
}

/// One limit check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitCheck {
    /// What happened.
    pub result: LimitResult,
    /// One line: what was tried and measured.
    pub detail: String,
}

/// The limit checks (`--mem`, `--pids`, `--cpus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsReport {
    /// A child touches memory past `--mem`.
    pub memory: LimitCheck,
    /// A child forks past `--pids`.
    pub pids: LimitCheck,
    /// Busy children for about a second against `--cpus`.
    pub cpu: LimitCheck,
}

/// What running here costs; a measurement that failed is `null` with its reason in `errors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cost {
    /// Nanoseconds for a fixed compute loop (best of three): compare across modes.
    pub cpu_loop_ns: Option<u64>,
    /// Nanoseconds per `getppid` system call.
    pub syscall_ns: Option<f64>,
    /// fork + exec of the probe binary (a no-op) + wait, per second.
    pub fork_exec_per_s: Option<f64>,
    /// Writing a file (up to [`cost::DISK_MIB`] MiB, for about 0.3 s) and fsync, in MiB/s.
    pub disk_write_mib_s: Option<f64>,
    /// Where the disk test wrote.
    pub disk_dir: Option<String>,
    /// TCP over 127.0.0.1 between two processes (up to [`cost::TCP_MIB`] MiB, for about
    /// 0.3 s), in MiB/s.
    pub tcp_loopback_mib_s: Option<f64>,
    /// Why a measurement is missing, `"<field>: <reason>"` each.
    pub errors: Vec<String>,
}

/// Runs every part of the probe and returns the report.
pub fn run(opts: &Options) -> ProbeReport {
    let scratch = scratch_dir(opts);
    let marker = escapes::find_marker(opts);
    let visible = visible::collect(marker.as_ref().map(|m| m.pid.is_some()));
    let surface = surface::collect();
    let ctx = escapes::Context {
        opts,
        scratch: scratch.as_deref(),
        marker: marker.as_ref(),
    };
    let probes = escapes::run_all(&ctx);
    let limits = limits::check(opts);
    let cost = cost::measure(scratch.as_deref());
    sys::reap_orphans();
    ProbeReport {
        version: REPORT_VERSION,
        visible,
        surface,
        probes,
        limits,
        cost,
    }
}

/// A writable directory for the temporary files of the probes: `--dir`, else the first of
/// `$TMPDIR`, `/tmp`, `/var/tmp` and the working directory where a file can be created.
fn scratch_dir(opts: &Options) -> Option<PathBuf> {
    if let Some(d) = &opts.dir {
        return Some(d.clone());
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(t) = std::env::var_os("TMPDIR") {
        candidates.push(PathBuf::from(t));
    }
    candidates.extend(["/tmp", "/var/tmp"].map(PathBuf::from));
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd);
    }
    candidates.into_iter().find(|d| writable(d))
}

fn writable(dir: &Path) -> bool {
    let path = dir.join(format!(".mvm-probe-{}", std::process::id()));
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .is_ok();
    if ok {
        let _ = std::fs::remove_file(&path);
    }
    ok
}

/// The line of `--hello`: where this process runs, as a workload that needs nothing from its
/// image.
pub fn hello() -> String {
    let (kernel, hostname) = sys::uname();
    format!(
        "hello from {hostname}: kernel {kernel}, pid {}",
        std::process::id()
    )
}

/// Runs the workload with this process's stdio and waits for it: its exit code (128 + n after
/// signal n; 127 when it is not found, 126 when it cannot be executed). `Command` spawns it
/// without copying this process's memory (vfork), which matters in guests where a fork is slow.
fn run_workload(cmd: &[String]) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    let Some((program, args)) = cmd.split_first() else {
        return 0;
    };
    match std::process::Command::new(program).args(args).status() {
        Ok(status) => status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(1),
        Err(e) => {
            eprintln!("mvm-agent probe: {program}: {e}");
            if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            }
        }
    }
}

/// Writes `text` to stdout at once; false when stdout is gone.
fn print_flushed(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

/// `mvm-agent probe ARGS...`: returns the process exit code (0, or 2 for bad arguments).
pub fn main(args: &[String]) -> i32 {
    match options::parse(args) {
        Ok(Command::Noop) => 0,
        Ok(Command::Help) => {
            println!("{USAGE}");
            0
        }
        Ok(Command::Hello) => {
            println!("{}", hello());
            0
        }
        Ok(Command::CpuLoop) => {
            println!("{}", cost::cpu_loop_ns());
            0
        }
        Ok(Command::Probe(opts)) => {
            let code = (!opts.workload.is_empty()).then(|| run_workload(&opts.workload));
            if let Some(mark) = &opts.mark {
                let code = code.map_or("-".to_string(), |c| c.to_string());
                if !print_flushed(&format!("\n{mark} {code}\n")) {
                    return 1;
                }
            }
            if opts.hold_ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(opts.hold_ms));
            }
            let report = run(&opts);
            let text = if opts.pretty {
                serde_json::to_string_pretty(&report)
            } else {
                serde_json::to_string(&report)
            };
            match text {
                Ok(t) => {
                    println!("{t}");
                    0
                }
                Err(e) => {
                    eprintln!("mvm-agent probe: cannot encode the report: {e}");
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("mvm-agent probe: {e}\n{USAGE}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ProbeReport {
        ProbeReport {
            version: REPORT_VERSION,
            visible: Visible {
                kernel: "6.12.0".into(),
                boot_id: Some("a1b2".into()),
                hostname: "box".into(),
                pid: 1,
                processes: Some(3),
                host_processes: Some(false),
                devices: Some(vec!["null".into(), "zero".into()]),
                mounts: Some(9),
                interfaces: Some(vec!["lo".into()]),
                cpus: 2,
                memory_bytes: Some(1 << 30),
            },
            surface: Surface {
                seccomp: Some(SeccompMode::Filter),
                seccomp_filters: Some(1),
                capabilities: Some(CapabilitySet {
                    hex: "0000000000000001".into(),
                    names: vec!["CAP_CHOWN".into()],
                }),
                capabilities_bounding: None,
                no_new_privs: true,
                user_namespace: Some(false),
                uid_map: Some(vec![IdMapping {
                    inside: 0,
                    outside: 0,
                    count: u32::MAX,
                }]),
            },
            probes: vec![Probe {
                name: "raw-socket".into(),
                result: ProbeResult::Blocked,
                detail: "EPERM".into(),
            }],
            limits: LimitsReport {
                memory: LimitCheck {
                    result: LimitResult::NotEnforced,
                    detail: "x".into(),
                },
                pids: LimitCheck {
                    result: LimitResult::NotSet,
                    detail: String::new(),
                },
                cpu: LimitCheck {
                    result: LimitResult::Enforced,
                    detail: String::new(),
                },
            },
            cost: Cost {
                cpu_loop_ns: Some(5),
                syscall_ns: Some(80.5),
                fork_exec_per_s: None,
                disk_write_mib_s: None,
                disk_dir: None,
                tcp_loopback_mib_s: Some(1000.0),
                errors: vec!["fork_exec_per_s: EPERM".into()],
            },
        }
    }

    #[test]
    fn report_round_trips_through_json() {
        let r = sample();
        let text = serde_json::to_string(&r).expect("encode");
        let back: ProbeReport = serde_json::from_str(&text).expect("decode");
        assert_eq!(back, r);
    }

    #[test]
    fn report_uses_the_issue_schema_names() {
        let v = serde_json::to_value(sample()).expect("encode");
        assert_eq!(v["surface"]["seccomp"], "filter");
        assert_eq!(v["probes"][0]["result"], "blocked");
        assert_eq!(v["limits"]["memory"]["result"], "not-enforced");
        assert_eq!(v["limits"]["pids"]["result"], "not-set");
        for k in [
            "host_processes",
            "processes",
            "devices",
            "mounts",
            "interfaces",
        ] {
            assert!(v["visible"].get(k).is_some(), "visible.{k}");
        }
        for k in [
            "cpu_loop_ns",
            "syscall_ns",
            "fork_exec_per_s",
            "disk_write_mib_s",
            "tcp_loopback_mib_s",
        ] {
            assert!(v["cost"].get(k).is_some(), "cost.{k}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let mut v = serde_json::to_value(sample()).expect("encode");
        v["visible"]["extra"] = serde_json::json!(1);
        assert!(serde_json::from_value::<ProbeReport>(v).is_err());
    }
}
