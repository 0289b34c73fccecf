//! `mvm compare`: the same image with the same limits as a plain process, a container and a
//! microVM, side by side: what the workload sees, which limits hold, the attack surface, the
//! escape probes and what each mode costs, all measured in the runs themselves.
//!
//! Every run is one `mvm run` of the image in a process of its own ([`child`]) whose command is
//! the static agent's probe (`mvm-agent probe`, see `guest_agent::probe`) with the workload
//! after `--`: the command given, or the probe's `--hello` line, which needs nothing from the
//! image. mvm puts the agent into every sandbox: a process runs it from the host, a container
//! gets it bind-mounted read-only, a VM's agent (the guest's `/init`) bind-mounts itself into
//! the container ([`RunSpec::mount_agent`]). The probe looks for host resources that only mvm
//! and it know by their nonces ([`host`]). Runs alternate between the modes (each round starts
//! with the next mode), costs are medians. A mode that cannot run here is reported with the
//! reason and the others run.
//!
//! Nothing here prints: the caller gets [`Progress`] as runs start and end, and the
//! [`Comparison`] to print.

mod child;
mod host;
mod memory;
pub mod report;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_agent::guest::AGENT_IN_CONTAINER;
use guest_agent::probe::{LimitCheck, LimitResult, ProbeReport, SeccompMode};
use guest_agent::runtime::command::Overrides;
use guest_agent::runtime::security::{seccomp, Security};
use guest_agent::runtime::Limits;
use rootfs_builder::reference::Reference;
use serde::{Deserialize, Serialize};

use child::Sample;
pub use child::{requested, run_child, CHILD_ENV};
use host::HostFixture;
pub use report::*;

use crate::error::{bad_input, CommandExit, Error};
use crate::image;
use crate::spec::{Isolation, RunSpec, Source};

/// Runs per mode without `--runs`.
pub const DEFAULT_RUNS: u32 = 3;
/// Most runs per mode.
pub const MAX_RUNS: u32 = 100;
/// Memory limit without `--mem` (a VM's default memory).
pub const DEFAULT_MEMORY: u64 = crate::spec::DEFAULT_VM_MEMORY;
/// Pids limit: small, as every fork of the pids check costs time in a slow guest.
pub const DEFAULT_PIDS: u64 = 16;
/// How long the probe waits after the workload, while mvm measures the run's memory.
pub const HOLD_MS: u64 = 1000;
/// Longest one run may take (a VM on a host that emulates guest kernel mode is slow).
const RUN_LIMIT: Duration = Duration::from_secs(30 * 60);

/// What to compare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareSpec {
    /// The image (pulled when it is not stored).
    pub image: String,
    /// The workload; empty: the probe's `--hello` line.
    #[serde(default)]
    pub command: Vec<String>,
    /// The modes, in the order of the report.
    pub isolations: Vec<Isolation>,
    /// The limits of every run.
    pub limits: Limits,
    /// Runs per mode.
    pub runs: u32,
    /// Guest kernel of the VM (default: mvm's, see [`RunSpec::kernel`]).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Guest kernel arguments of the VM.
    #[serde(default)]
    pub kernel_args: Option<String>,
}

impl CompareSpec {
    /// Every mode, the default limits and runs, the `--hello` workload.
    pub fn new(image: impl Into<String>) -> CompareSpec {
        CompareSpec {
            image: image.into(),
            command: Vec::new(),
            isolations: vec![Isolation::Process, Isolation::Container, Isolation::Vm],
            limits: Limits {
                memory_bytes: Some(DEFAULT_MEMORY),
                cpus: None,
                pids_max: Some(DEFAULT_PIDS),
            },
            runs: DEFAULT_RUNS,
            kernel: None,
            kernel_args: None,
        }
    }

    /// Checks what does not depend on a mode (each mode's run spec is checked on its own).
    pub fn validate(&self) -> Result<(), Error> {
        Reference::parse(&self.image).map_err(|e| bad_input(e.to_string()))?;
        if self.isolations.is_empty() {
            return Err(bad_input(
                "--isolation: name at least one of process, container, vm",
            ));
        }
        for (i, iso) in self.isolations.iter().enumerate() {
            if self.isolations[..i].contains(iso) {
                return Err(bad_input(format!("--isolation: {iso} is named twice")));
            }
        }
        if !(1..=MAX_RUNS).contains(&self.runs) {
            return Err(bad_input(format!("--runs: use 1 to {MAX_RUNS}")));
        }
        Ok(())
    }

    /// The workload as the report names it.
    fn workload_label(&self) -> Vec<String> {
        if self.command.is_empty() {
            ["mvm-agent", "probe", "--hello"].map(String::from).to_vec()
        } else {
            self.command.clone()
        }
    }
}

/// How a comparison goes, for the caller to show.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// A mode cannot run here.
    Unavailable {
        /// The mode.
        isolation: Isolation,
        /// Why.
        reason: String,
    },
    /// A run starts.
    Starting {
        /// The mode.
        isolation: Isolation,
        /// Which run (1-based) ...
        run: u32,
        /// ... of how many.
        runs: u32,
    },
    /// A run ended.
    Finished {
        /// The mode.
        isolation: Isolation,
        /// How long it took.
        took: Duration,
        /// Why it gave no report, if it did not.
        error: Option<String>,
    },
}

/// One mode while the comparison runs.
#[derive(Debug)]
struct Mode {
    isolation: Isolation,
    /// The run spec, or why the mode cannot run here.
    spec: Result<RunSpec, String>,
    samples: Vec<Sample>,
    /// Why runs failed (a mode whose first run fails is not run again).
    failures: Vec<String>,
}

impl Mode {
    fn runnable(&self) -> Option<&RunSpec> {
        let gave_up = self.samples.is_empty() && !self.failures.is_empty();
        self.spec.as_ref().ok().filter(|_| !gave_up)
    }
}

/// Runs the comparison under the mvm root `root`.
pub fn compare(
    root: &Path,
    spec: &CompareSpec,
    progress: &mut dyn FnMut(Progress),
) -> Result<Comparison, Error> {
    spec.validate()?;
    // SIGINT and SIGTERM end the run under way (it cleans up as `mvm run` does) and then the
    // comparison, which removes its host resources.
    vmm::signals::install();
    let started = crate::state::now();
    let resolved = image::resolve(root, &spec.image, None)?;
    let fixture = HostFixture::start(root)?;
    let mark = host::nonce("mark");
    let agent = crate::run::find_agent().map_err(|e| e.to_string());
    let mut modes: Vec<Mode> = spec
        .isolations
        .iter()
        .map(|&isolation| Mode {
            isolation,
            spec: mode_spec(
                root,
                spec,
                isolation,
                &resolved.digest,
                &agent,
                &fixture,
                &mark,
            ),
            samples: Vec::new(),
            failures: Vec::new(),
        })
        .collect();
    for m in &mut modes {
        if let Err(reason) = &m.spec {
            progress(Progress::Unavailable {
                isolation: m.isolation,
                reason: reason.clone(),
            });
        } else if m.isolation == Isolation::Vm {
            // The image's disk and the agent's initramfs are made once and cached: made now, so
            // that no run's start includes them.
            if let Err(e) = crate::run::warm_vm_caches(root, &resolved.dir) {
                m.failures.push(crate::error::one_line(&e));
            }
        }
    }
    let n = modes.len();
    let stop = || vmm::signals::received().is_some();
    for round in 0..spec.runs {
        for k in 0..n {
            if stop() {
                break;
            }
            let m = &mut modes[(round as usize + k) % n];
            let Some(run_spec) = m.runnable() else {
                continue;
            };
            progress(Progress::Starting {
                isolation: m.isolation,
                run: round + 1,
                runs: spec.runs,
            });
            let file = fixture
                .work
                .join(format!("run-{}-{round}.json", m.isolation));
            let t = Instant::now();
            let result = child::run(&file, root, run_spec, &mark, RUN_LIMIT, &stop);
            let _ = std::fs::remove_file(&file);
            progress(Progress::Finished {
                isolation: m.isolation,
                took: t.elapsed(),
                error: result.as_ref().err().cloned(),
            });
            match result {
                Ok(s) => m.samples.push(s),
                Err(e) => m.failures.push(e),
            }
        }
    }
    if let Some(sig) = vmm::signals::received() {
        return Err(CommandExit(128 + sig, format!("stopped by signal {sig}")).into());
    }
    drop(fixture);

    let host = host_info();
    let host_boot_id = read_trimmed("/proc/sys/kernel/random/boot_id");
    let baseline = cpu_baseline(&modes, agent.as_deref().ok());
    let modes = modes
        .iter()
        .map(|m| mode_report(m, &host.kernel, host_boot_id.as_deref(), baseline))
        .collect();
    Ok(Comparison {
        version: COMPARISON_VERSION,
        image: spec.image.clone(),
        command: spec.workload_label(),
        host,
        limits: GivenLimits {
            memory_bytes: spec.limits.memory_bytes,
            pids: spec.limits.pids_max,
            cpus: spec.limits.cpus,
        },
        runs: spec.runs,
        date: utc_minute(started),
        modes,
    })
}

/// The run spec of one mode, or why the mode cannot run here.
fn mode_spec(
    root: &Path,
    spec: &CompareSpec,
    isolation: Isolation,
    digest: &str,
    agent: &Result<PathBuf, String>,
    fixture: &HostFixture,
    mark: &str,
) -> Result<RunSpec, String> {
    let agent = agent.as_ref().map_err(Clone::clone)?;
    if isolation == Isolation::Vm {
        kvm_usable()?;
    }
    // The agent's path as the workload sees it.
    let probe = match isolation {
        Isolation::Process => agent.display().to_string(),
        Isolation::Container | Isolation::Vm => AGENT_IN_CONTAINER.to_string(),
    };
    let mut cmd = vec![probe.clone(), "probe".into()];
    cmd.extend(fixture.args.iter().cloned());
    if let Some(m) = spec.limits.memory_bytes {
        cmd.extend(["--mem".into(), m.to_string()]);
    }
    if let Some(p) = spec.limits.pids_max {
        cmd.extend(["--pids".into(), p.to_string()]);
    }
    if let Some(c) = spec.limits.cpus {
        cmd.extend(["--cpus".into(), c.to_string()]);
    }
    if isolation == Isolation::Vm {
        // CID 2 is mvm from inside a VM.
        cmd.push("--vsock-host".into());
    }
    cmd.extend(["--mark".into(), mark.to_string()]);
    cmd.extend(["--hold-ms".into(), HOLD_MS.to_string(), "--".into()]);
    if spec.command.is_empty() {
        cmd.extend([probe, "probe".into(), "--hello".into()]);
    } else {
        cmd.extend(spec.command.iter().cloned());
    }
    let mut run = RunSpec::new(Source::Image {
        reference: spec.image.clone(),
        digest: Some(digest.to_string()),
    });
    run.isolation = isolation;
    run.limits = spec.limits.clone();
    run.remove = true;
    run.mount_agent = isolation != Isolation::Process;
    run.command = Overrides {
        entrypoint: Some(String::new()),
        cmd,
        ..Overrides::default()
    };
    if isolation == Isolation::Vm {
        run.kernel = spec.kernel.clone();
        run.kernel_args = spec.kernel_args.clone();
    }
    run.validate(root).map_err(|e| crate::error::one_line(&e))?;
    Ok(run)
}

/// Whether this process can use /dev/kvm.
fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm: {e} (a microVM needs KVM)"))
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn host_info() -> HostInfo {
    let (kernel, hostname) = guest_agent::probe::uname();
    HostInfo {
        kernel,
        cpus: std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(usize::from(n)).unwrap_or(u32::MAX)),
        hostname,
        virtualization: vmm::host::virtualization().describe().to_string(),
    }
}

/// The plain process's compute loop, ns: the process mode's median, else the median of three
/// runs of the same static agent on the host (`probe --cpu-loop`).
fn cpu_baseline(modes: &[Mode], agent: Option<&Path>) -> Option<f64> {
    let process: Vec<f64> = modes
        .iter()
        .filter(|m| m.isolation == Isolation::Process)
        .flat_map(|m| &m.samples)
        .filter_map(|s| s.report.cost.cpu_loop_ns)
        .map(|n| n as f64)
        .collect();
    median(&process).or_else(|| {
        let agent = agent?;
        let here: Vec<f64> = (0..3)
            .filter_map(|_| {
                let out = std::process::Command::new(agent)
                    .args(["probe", "--cpu-loop"])
                    .stdin(std::process::Stdio::null())
                    .output()
                    .ok()?;
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .collect();
        median(&here)
    })
}

/// One mode's column.
fn mode_report(
    m: &Mode,
    host_kernel: &str,
    host_boot_id: Option<&str>,
    cpu_baseline: Option<f64>,
) -> ModeReport {
    let Some(first) = m.samples.first() else {
        return match &m.spec {
            Err(reason) => {
                ModeReport::not_run(m.isolation, ModeStatus::Unavailable, reason.clone())
            }
            Ok(_) => ModeReport::not_run(
                m.isolation,
                ModeStatus::Failed,
                m.failures
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "it did not run".into()),
            ),
        };
    };
    let r = &first.report;
    let v = &r.visible;
    let reports: Vec<&ProbeReport> = m.samples.iter().map(|s| &s.report).collect();
    let output = first.output.chars().take(OUTPUT_LIMIT).collect::<String>();
    ModeReport {
        isolation: m.isolation,
        status: ModeStatus::Ok,
        reason: None,
        kernel: Some(v.kernel.clone()),
        shares_host_kernel: Some(v.kernel == host_kernel && v.boot_id.as_deref() == host_boot_id),
        visible: Some(VisibleReport {
            host_processes: v.host_processes,
            processes: v.processes,
            devices: v.devices.clone(),
            mounts: v.mounts,
            interfaces: v.interfaces.clone(),
            hostname: v.hostname.clone(),
            pid: v.pid,
            cpus: v.cpus,
            memory_bytes: v.memory_bytes,
        }),
        limits: Some(limits(&reports)),
        surface: Some(surface(m.isolation, r)),
        probes: r.probes.clone(),
        cost: Some(cost(&m.samples, &m.failures, cpu_baseline)),
        output: Some(output),
        exit_code: first.exit_code,
    }
}

/// The limit checks over every run: the verdict the conclusive runs agree on; `error` when
/// none was conclusive or they disagree.
fn limits(reports: &[&ProbeReport]) -> LimitsReport {
    let combine = |pick: &dyn Fn(&ProbeReport) -> &LimitCheck| -> LimitCheck {
        let checks: Vec<&LimitCheck> = reports.iter().map(|r| pick(r)).collect();
        let conclusive: Vec<&LimitCheck> = checks
            .iter()
            .copied()
            .filter(|c| c.result != LimitResult::Error)
            .collect();
        match conclusive.first() {
            None => checks.first().map_or_else(
                || LimitCheck {
                    result: LimitResult::Error,
                    detail: "no run".into(),
                },
                |c| (*c).clone(),
            ),
            Some(c) if conclusive.iter().all(|x| x.result == c.result) => (*c).clone(),
            Some(_) => LimitCheck {
                result: LimitResult::Error,
                detail: format!(
                    "runs disagree: {}",
                    conclusive
                        .iter()
                        .map(|c| c.detail.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            },
        }
    };
    let (memory, pids, cpu) = (
        combine(&|r| &r.limits.memory),
        combine(&|r| &r.limits.pids),
        combine(&|r| &r.limits.cpu),
    );
    LimitsReport {
        memory: memory.result,
        pids: pids.result,
        cpu: cpu.result,
        details: LimitDetails {
            memory: memory.detail,
            pids: pids.detail,
            cpu: cpu.detail,
        },
    }
}

/// The attack surface: the probe's view plus what only the host knows.
fn surface(isolation: Isolation, r: &ProbeReport) -> SurfaceReport {
    let s = &r.surface;
    let count = |n: usize| Some(u32::try_from(n).unwrap_or(u32::MAX));
    let all = count(seccomp::syscall_count());
    let (direct, vmm_filter, note) = match (isolation, s.seccomp) {
        (Isolation::Vm, _) => {
            let vmm = vmm_filter_syscalls();
            let note = match vmm {
                Some(_) => "the workload's calls reach the guest kernel; the host kernel sees \
                            the VMM's, as its seccomp filters allow"
                    .to_string(),
                None => "the workload's calls reach the guest kernel; the host kernel sees the \
                         VMM's, which runs without a seccomp filter"
                    .to_string(),
            };
            (Some(0), vmm, note)
        }
        (_, Some(SeccompMode::Disabled)) => (
            all,
            None,
            "no seccomp filter: every system call of the host kernel".into(),
        ),
        (Isolation::Container, Some(SeccompMode::Filter)) => {
            match Security::default().direct_syscalls() {
                Ok(n) => (
                    count(n),
                    None,
                    format!(
                        "docker's default profile for the container's capabilities ({} of {} calls)",
                        n,
                        seccomp::syscall_count()
                    ),
                ),
                Err(e) => (None, None, format!("the container's filter: {e}")),
            }
        }
        _ => (
            None,
            None,
            "a seccomp filter mvm did not install: its size is unknown".into(),
        ),
    };
    SurfaceReport {
        seccomp: s.seccomp,
        capabilities: s.capabilities.as_ref().map(|c| c.names.clone()),
        no_new_privs: s.no_new_privs,
        user_namespace: s.user_namespace,
        host_syscalls_direct: direct,
        vmm_filter_syscalls: vmm_filter,
        note,
    }
}

/// Distinct system calls the VMM's seccomp filters let through, over all its kinds of thread
/// (`vmm::seccomp::filters`; the calls they answer ENOSYS do not count). The runs compared
/// keep the VMM's default confinement, so its filters are on.
fn vmm_filter_syscalls() -> Option<u32> {
    use vmm::seccomp::{filters, ThreadKind};
    let mut calls = std::collections::BTreeSet::new();
    for kind in ThreadKind::ALL {
        let refused = filters::enosys(kind);
        calls.extend(
            filters::rules(kind)
                .iter()
                .map(|r| r.nr)
                .filter(|nr| !refused.contains(nr)),
        );
    }
    u32::try_from(calls.len()).ok()
}

/// The medians of every cost over the runs.
fn cost(samples: &[Sample], failures: &[String], cpu_baseline: Option<f64>) -> CostReport {
    let of = |f: &dyn Fn(&Sample) -> Option<f64>| {
        median(&samples.iter().filter_map(f).collect::<Vec<_>>())
    };
    let cpu_loop = of(&|s| s.report.cost.cpu_loop_ns.map(|n| n as f64));
    let mut errors: Vec<String> = Vec::new();
    for e in samples
        .iter()
        .flat_map(|s| &s.report.cost.errors)
        .chain(failures.iter())
    {
        if !errors.contains(e) {
            errors.push(e.clone());
        }
    }
    CostReport {
        start_ms: of(&|s| s.start_ms),
        exit_ms: of(&|s| Some(s.exit_ms)),
        memory_overhead_kib: median_u64(samples.iter().filter_map(|s| s.pss_kib).collect()),
        cpu_relative: cpu_baseline.zip(cpu_loop).map(|(b, c)| b / c.max(1.0)),
        syscall_ns: of(&|s| s.report.cost.syscall_ns),
        fork_exec_per_s: of(&|s| s.report.cost.fork_exec_per_s),
        disk_write_mib_s: of(&|s| s.report.cost.disk_write_mib_s),
        tcp_loopback_mib_s: of(&|s| s.report.cost.tcp_loopback_mib_s),
        disk_dir: samples.first().and_then(|s| s.report.cost.disk_dir.clone()),
        runs: u32::try_from(samples.len()).unwrap_or(u32::MAX),
        errors,
    }
}
