//! Whether the resource limits hold, each tried by forked children so that the probe itself
//! stays small: memory (touch pages past `--mem`), pids (fork past `--pids`, never more than
//! two past it) and CPU (busy children for a second against `--cpus`).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::sys::{self, Forked};
use super::{LimitCheck, LimitResult, LimitsReport, Options};

const MIB: u64 = 1 << 20;
/// Exit code of the memory child when the allocation itself was refused.
const REFUSED: i32 = 3;
/// Highest pids limit tested: the probe never forks more than this plus two.
pub const MAX_PIDS_TESTED: u64 = 4096;
/// How long the CPU children spin.
const SPIN: Duration = Duration::from_secs(1);
/// Tolerance of the CPU check.
const CPU_TOLERANCE: f64 = 0.10;

/// Runs the checks for the limits that were given.
pub fn check(opts: &Options) -> LimitsReport {
    LimitsReport {
        memory: opts.mem.map_or_else(not_set, memory),
        pids: opts.pids.map_or_else(not_set, pids),
        cpu: opts.cpus.map_or_else(not_set, cpu),
    }
}

fn not_set() -> LimitCheck {
    verdict(LimitResult::NotSet, "no limit given")
}

fn verdict(result: LimitResult, detail: impl Into<String>) -> LimitCheck {
    LimitCheck {
        result,
        detail: detail.into(),
    }
}

fn error(what: &str, e: sys::Errno) -> LimitCheck {
    verdict(
        LimitResult::Error,
        format!("{what}: {}", sys::errno_name(e)),
    )
}

/// How far past the limit the memory child goes: a quarter of it, at least 32 MiB.
pub fn memory_target(limit: u64) -> u64 {
    limit.saturating_add((limit / 4).max(32 * MIB))
}

/// A child (the OOM killer's first choice) allocates [`memory_target`] bytes and touches them a
/// MiB at a time, reporting each MiB through a pipe.
fn memory(limit: u64) -> LimitCheck {
    let target = memory_target(limit);
    let Ok(size) = usize::try_from(target) else {
        return verdict(LimitResult::Error, "limit larger than the address space");
    };
    let (mut progress_r, mut progress_w) = match sys::pipe() {
        Ok(p) => p,
        Err(e) => return verdict(LimitResult::Error, format!("pipe: {e}")),
    };
    let pid = match sys::fork() {
        Ok(Forked::Child) => sys::in_child(|| {
            sys::die_with_parent();
            let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
            let mut block: Vec<u8> = Vec::new();
            if block.try_reserve_exact(size).is_err() {
                return REFUSED;
            }
            while block.len() < size {
                let step = (size - block.len()).min(1 << 20);
                block.resize(block.len() + step, 0x5a);
                if progress_w.write_all(&[1]).is_err() {
                    return 1;
                }
            }
            std::hint::black_box(&block);
            0
        }),
        Ok(Forked::Parent(pid)) => pid,
        Err(e) => return error("fork", e),
    };
    drop(progress_w);
    let mut touched = Vec::new();
    let _ = progress_r.read_to_end(&mut touched);
    let touched = touched.len();
    let exit = match sys::wait(pid) {
        Ok(x) => x,
        Err(e) => return error("wait", e),
    };
    let mib = |b: u64| b / MIB;
    // Past the machine's own memory nothing tells the limit from the machine's size (in a VM
    // the machine's size is the limit).
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| super::visible::parse_mem_total(&t))
        .filter(|total| target > *total)
        .map_or(String::new(), |total| {
            format!("; more than the machine's {} MiB", mib(total))
        });
    match (exit.code, exit.signal) {
        (Some(0), _) => verdict(
            LimitResult::NotEnforced,
            format!(
                "touched {} MiB, past the {} MiB limit",
                mib(target),
                mib(limit)
            ),
        ),
        (Some(REFUSED), _) => verdict(
            LimitResult::Enforced,
            format!("an allocation of {} MiB was refused{machine}", mib(target)),
        ),
        (_, Some(sig)) => verdict(
            LimitResult::Enforced,
            format!(
                "killed by signal {sig} after touching {touched} of {} MiB (limit {} MiB{machine})",
                mib(target),
                mib(limit)
            ),
        ),
        (code, _) => verdict(
            LimitResult::Error,
            format!("the memory child exited with {code:?} after {touched} MiB"),
        ),
    }
}

/// A child forks up to `limit + 2` sleeping grandchildren, stops at the first refused fork,
/// kills and reaps them, and reports how many it made and why it stopped.
fn pids(limit: u64) -> LimitCheck {
    if limit > MAX_PIDS_TESTED {
        return verdict(
            LimitResult::Error,
            format!("not tested: {limit} is above the {MAX_PIDS_TESTED} processes the probe forks at most"),
        );
    }
    let target = limit + 2;
    let (mut report_r, mut report_w) = match sys::pipe() {
        Ok(p) => p,
        Err(e) => return verdict(LimitResult::Error, format!("pipe: {e}")),
    };
    let pid = match sys::fork() {
        Ok(Forked::Child) => sys::in_child(|| {
            sys::die_with_parent();
            let mut made = Vec::new();
            let mut failed = 0;
            while (made.len() as u64) < target {
                match sys::fork() {
                    Ok(Forked::Child) => sys::in_child(|| {
                        sys::die_with_parent();
                        std::thread::sleep(Duration::from_secs(60));
                        0
                    }),
                    Ok(Forked::Parent(p)) => made.push(p),
                    Err(e) => {
                        failed = e;
                        break;
                    }
                }
            }
            for p in &made {
                let _ = sys::kill(*p);
                let _ = sys::wait(*p);
            }
            let count = u32::try_from(made.len()).unwrap_or(u32::MAX);
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&count.to_le_bytes());
            msg[4..].copy_from_slice(&failed.to_le_bytes());
            i32::from(report_w.write_all(&msg).is_err())
        }),
        Ok(Forked::Parent(pid)) => pid,
        Err(e) => return error("fork", e),
    };
    drop(report_w);
    let mut msg = [0u8; 8];
    let got = report_r.read_exact(&mut msg);
    let _ = sys::wait(pid);
    if got.is_err() {
        return verdict(LimitResult::Error, "the pids child did not report");
    }
    let made = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
    let failed = i32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
    match failed {
        0 => verdict(
            LimitResult::NotEnforced,
            format!("forked {made} processes, past the limit of {limit}"),
        ),
        libc::EAGAIN => verdict(
            LimitResult::Enforced,
            format!("fork refused (EAGAIN) after {made} more processes (limit {limit})"),
        ),
        e => verdict(
            LimitResult::Error,
            format!(
                "fork failed with {} after {made} processes",
                sys::errno_name(e)
            ),
        ),
    }
}

/// Keeps a CPU busy until `deadline`.
fn spin_until(deadline: Instant) {
    let mut x = 1u64;
    while Instant::now() < deadline {
        for _ in 0..10_000 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
    }
}

/// The CPU verdict from the CPUs `used` by `busy` spinning processes against `limit`: enforced
/// when within 10% of the limit, not enforced above that; below it the machine did not even
/// give the limit's worth of CPU (other load), so the check says nothing.
pub fn cpu_verdict(limit: f64, busy: u32, used: f64) -> LimitCheck {
    let ceiling = limit * (1.0 + CPU_TOLERANCE);
    let floor = limit * (1.0 - CPU_TOLERANCE);
    let what = format!("{busy} busy processes used {used:.2} CPUs (limit {limit})");
    if f64::from(busy) <= ceiling {
        return verdict(
            LimitResult::Enforced,
            format!("{what}: only {busy} CPUs are visible, which cannot exceed the limit"),
        );
    }
    if used > ceiling {
        verdict(LimitResult::NotEnforced, what)
    } else if used >= floor {
        verdict(LimitResult::Enforced, what)
    } else {
        verdict(
            LimitResult::Error,
            format!("{what}: inconclusive, the machine gave less than the limit (other load?)"),
        )
    }
}

/// `ceil(limit) + 1` children (no more than the visible CPUs) spin for a second; their CPU time
/// over the wall time is the CPUs used.
fn cpu(limit: f64) -> LimitCheck {
    let visible = sys::affinity_cpus();
    // A small positive number of CPUs: the cast cannot truncate meaningfully.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let wanted = limit.ceil().min(f64::from(u16::MAX)) as u32 + 1;
    let busy = wanted.min(visible);
    let start = Instant::now();
    let deadline = start + SPIN;
    let mut children = Vec::new();
    for _ in 0..busy {
        match sys::fork() {
            Ok(Forked::Child) => sys::in_child(|| {
                sys::die_with_parent();
                spin_until(deadline);
                0
            }),
            Ok(Forked::Parent(p)) => children.push(p),
            Err(e) => {
                for p in &children {
                    let _ = sys::wait(*p);
                }
                return error("fork", e);
            }
        }
    }
    let mut cpu_time = Duration::ZERO;
    for p in &children {
        match sys::wait(*p) {
            Ok(x) => cpu_time += x.cpu,
            Err(e) => return error("wait", e),
        }
    }
    let used = cpu_time.as_secs_f64() / start.elapsed().as_secs_f64();
    cpu_verdict(limit, busy, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_goes_well_past_the_limit() {
        assert_eq!(memory_target(256 * MIB), 320 * MIB);
        assert_eq!(memory_target(16 * MIB), 48 * MIB);
        assert_eq!(memory_target(u64::MAX), u64::MAX);
    }

    #[test]
    fn cpu_verdicts() {
        assert_eq!(cpu_verdict(0.5, 2, 0.52).result, LimitResult::Enforced);
        assert_eq!(cpu_verdict(0.5, 2, 0.46).result, LimitResult::Enforced);
        assert_eq!(cpu_verdict(1.0, 2, 0.76).result, LimitResult::Error);
        assert_eq!(cpu_verdict(0.5, 2, 0.6).result, LimitResult::NotEnforced);
        assert_eq!(cpu_verdict(1.0, 2, 1.98).result, LimitResult::NotEnforced);
        // Two visible CPUs cannot exceed a limit of two.
        let v = cpu_verdict(2.0, 2, 1.99);
        assert_eq!(v.result, LimitResult::Enforced);
        assert!(v.detail.contains("only 2 CPUs"), "{}", v.detail);
        assert_eq!(cpu_verdict(2.0, 2, 1.2).result, LimitResult::Enforced);
    }

    #[test]
    fn nothing_given_is_not_set() {
        let r = check(&Options::default());
        for c in [r.memory, r.pids, r.cpu] {
            assert_eq!(c.result, LimitResult::NotSet);
        }
    }

    #[test]
    fn unlimited_memory_and_pids_are_not_enforced() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // An unprivileged user may have a low RLIMIT_NPROC.
            return;
        }
        let r = check(&Options {
            mem: Some(16 * MIB),
            pids: Some(8),
            ..Options::default()
        });
        assert_eq!(
            r.memory.result,
            LimitResult::NotEnforced,
            "{}",
            r.memory.detail
        );
        assert_eq!(r.pids.result, LimitResult::NotEnforced, "{}", r.pids.detail);
        assert!(r.pids.detail.contains("forked 10"), "{}", r.pids.detail);
    }
}
