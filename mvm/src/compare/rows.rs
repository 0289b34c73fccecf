//! A [`Comparison`] as the rows both the table and the HTML report show: sections of
//! measurements, one cell per mode, a short verdict per row, and for each cost the numbers a
//! bar chart draws.

use engine::compare::{Comparison, CostReport, ModeReport, ModeStatus};
use engine::units::format_size;
use guest_agent::probe::{LimitResult, ProbeResult, SeccompMode};

/// A group of rows under a title.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    /// The title (`What the workload sees`, ...).
    pub title: String,
    /// The rows.
    pub rows: Vec<Row>,
}

/// One measurement across the modes.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What is measured.
    pub label: String,
    /// One cell per mode, in the report's order (`-` where a mode did not run or could not
    /// measure it).
    pub cells: Vec<String>,
    /// What the row says, in a few words.
    pub verdict: String,
    /// A longer explanation per mode (the probe's reason, the limit check's), if any.
    pub details: Vec<String>,
    /// For a cost: the values a bar chart draws.
    pub chart: Option<Chart>,
}

/// The numbers of one cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// One value per mode (`None`: not measured).
    pub values: Vec<Option<f64>>,
    /// Whether more is better (throughput) or less (time, memory).
    pub higher_is_better: bool,
}

/// What a reader should know besides the rows: modes that did not run and why, inconclusive
/// limit checks, measurements that failed.
pub fn notes(c: &Comparison) -> Vec<String> {
    let mut notes = Vec::new();
    for m in &c.modes {
        let mode = m.isolation;
        if let Some(reason) = &m.reason {
            let what = match m.status {
                ModeStatus::Unavailable => "cannot run here",
                _ => "failed",
            };
            notes.push(format!("{mode} {what}: {reason}"));
        }
        if let Some(l) = &m.limits {
            for (name, result, detail) in [
                ("memory", l.memory, &l.details.memory),
                ("pids", l.pids, &l.details.pids),
                ("cpu", l.cpu, &l.details.cpu),
            ] {
                if result == LimitResult::Error {
                    notes.push(format!("{mode}: {name} limit inconclusive: {detail}"));
                }
            }
        }
        if let Some(k) = &m.cost {
            for e in &k.errors {
                notes.push(format!("{mode}: {e}"));
            }
        }
    }
    notes
}

/// The column title of a mode: its name, and why it has no values if it has none.
pub fn column_title(m: &ModeReport) -> String {
    match m.status {
        ModeStatus::Ok => m.isolation.to_string(),
        ModeStatus::Unavailable => format!("{} (unavailable)", m.isolation),
        ModeStatus::Failed => format!("{} (failed)", m.isolation),
    }
}

/// The sections of a comparison.
pub fn sections(c: &Comparison) -> Vec<Section> {
    vec![
        Section {
            title: "What the workload sees".into(),
            rows: seen(c),
        },
        Section {
            title: format!("Limits enforced ({})", given_limits(c)),
            rows: limits(c),
        },
        Section {
            title: "Attack surface".into(),
            rows: surface(c),
        },
        Section {
            title: "Escape probes (allowed: the workload did it)".into(),
            rows: probes(c),
        },
        Section {
            title: format!(
                "Cost (median of {} run{})",
                c.runs,
                if c.runs == 1 { "" } else { "s" }
            ),
            rows: costs(c),
        },
    ]
}

/// `--mem 256M, --pids-limit 16, --cpus 1`, as the comparison was given them.
pub fn given_limits(c: &Comparison) -> String {
    let l = &c.limits;
    let mut parts = Vec::new();
    if let Some(m) = l.memory_bytes {
        parts.push(format!("--mem {}", format_size(m)));
    }
    if let Some(p) = l.pids {
        parts.push(format!("--pids-limit {p}"));
    }
    if let Some(cpus) = l.cpus {
        parts.push(format!("--cpus {cpus}"));
    }
    if parts.is_empty() {
        "no limits given".into()
    } else {
        parts.join(", ")
    }
}

const NONE: &str = "-";

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// A row from one cell per mode; modes that did not run get `-`.
fn row(
    c: &Comparison,
    label: &str,
    cell: impl Fn(&ModeReport) -> Option<String>,
    verdict: impl Fn(&[Option<String>]) -> String,
) -> Row {
    let values: Vec<Option<String>> = c
        .modes
        .iter()
        .map(|m| (m.status == ModeStatus::Ok).then(|| cell(m)).flatten())
        .collect();
    Row {
        label: label.into(),
        verdict: verdict(&values),
        cells: values
            .iter()
            .map(|v| v.clone().unwrap_or_else(|| NONE.into()))
            .collect(),
        details: Vec::new(),
        chart: None,
    }
}

/// The names of the modes whose cell is `want` ("process, vm").
fn modes_with(c: &Comparison, values: &[Option<String>], want: &str) -> Vec<String> {
    c.modes
        .iter()
        .zip(values)
        .filter(|(_, v)| v.as_deref() == Some(want))
        .map(|(m, _)| m.isolation.to_string())
        .collect()
}

/// "only process", "process, container", "none", or "all" (of the modes that ran).
fn which(c: &Comparison, values: &[Option<String>], want: &str) -> String {
    let ran = values.iter().filter(|v| v.is_some()).count();
    let hits = modes_with(c, values, want);
    match hits.len() {
        0 => "none".into(),
        n if n == ran && n > 1 => "all".into(),
        1 if ran > 1 => format!("only {}", hits[0]),
        _ => hits.join(", "),
    }
}

fn seen(c: &Comparison) -> Vec<Row> {
    let vis = |m: &ModeReport| m.visible.clone();
    vec![
        row(c, "kernel", |m| m.kernel.clone(), |_| String::new()),
        row(
            c,
            "shares the host's kernel",
            |m| m.shares_host_kernel.map(yes_no),
            |v| format!("own kernel: {}", which(c, v, "no")),
        ),
        row(
            c,
            "hostname",
            |m| vis(m).map(|v| v.hostname),
            |_| String::new(),
        ),
        row(
            c,
            "pid of the workload",
            |m| vis(m).map(|v| v.pid.to_string()),
            |v| format!("PID 1 of its own: {}", which(c, v, "1")),
        ),
        row(
            c,
            "processes visible",
            |m| vis(m).and_then(|v| v.processes).map(|n| n.to_string()),
            |_| String::new(),
        ),
        row(
            c,
            "host processes visible",
            |m| vis(m).and_then(|v| v.host_processes).map(yes_no),
            |v| format!("sees the host's: {}", which(c, v, "yes")),
        ),
        row(
            c,
            "devices in /dev",
            |m| vis(m).and_then(|v| v.devices).map(|d| d.len().to_string()),
            |_| String::new(),
        ),
        row(
            c,
            "mounts",
            |m| vis(m).and_then(|v| v.mounts).map(|n| n.to_string()),
            |_| String::new(),
        ),
        row(
            c,
            "network interfaces",
            |m| vis(m).and_then(|v| v.interfaces).map(|i| i.join(",")),
            |_| String::new(),
        ),
        row(
            c,
            "CPUs",
            |m| vis(m).map(|v| v.cpus.to_string()),
            |_| String::new(),
        ),
        row(
            c,
            "memory",
            |m| vis(m).and_then(|v| v.memory_bytes).map(mib_text),
            |_| String::new(),
        ),
        row(
            c,
            "workload output",
            |m| m.output.as_deref().map(first_line),
            |_| String::new(),
        ),
        row(
            c,
            "workload exit code",
            |m| Some(m.exit_code.map_or("-".into(), |x| x.to_string())),
            |_| String::new(),
        ),
    ]
}

fn first_line(text: &str) -> String {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut out: String = line.trim().chars().take(32).collect();
    if line.trim().chars().count() > 32 {
        out.push_str("...");
    }
    if out.is_empty() {
        out.push_str("(none)");
    }
    out
}

fn mib_text(bytes: u64) -> String {
    if bytes >= 10 << 30 {
        format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

fn limit_text(r: LimitResult) -> String {
    match r {
        LimitResult::Enforced => "enforced",
        LimitResult::NotEnforced => "not enforced",
        LimitResult::NotSet => "not set",
        LimitResult::Error => "error",
    }
    .into()
}

fn limits(c: &Comparison) -> Vec<Row> {
    type Pick = fn(&engine::compare::LimitsReport) -> (LimitResult, String);
    let checks: [(&str, Pick); 3] = [
        ("memory", |l| (l.memory, l.details.memory.clone())),
        ("pids", |l| (l.pids, l.details.pids.clone())),
        ("cpu", |l| (l.cpu, l.details.cpu.clone())),
    ];
    checks
        .into_iter()
        .map(|(label, pick)| {
            let mut r = row(
                c,
                label,
                |m| m.limits.as_ref().map(|l| limit_text(pick(l).0)),
                |v| {
                    if v.iter().flatten().all(|x| x == "not set") {
                        return "not set".into();
                    }
                    let errors = modes_with(c, v, "error");
                    let mut text = format!("enforced: {}", which(c, v, "enforced"));
                    if !errors.is_empty() {
                        text.push_str(&format!("; inconclusive: {}", errors.join(", ")));
                    }
                    text
                },
            );
            r.details = c
                .modes
                .iter()
                .map(|m| m.limits.as_ref().map(|l| pick(l).1).unwrap_or_default())
                .collect();
            r
        })
        .collect()
}

/// The verdict of a count where fewer is better: "fewest: vm (0)", every mode that ties named.
fn fewest(c: &Comparison, values: &[Option<String>]) -> String {
    let counts: Vec<(String, u64)> = c
        .modes
        .iter()
        .zip(values)
        .filter_map(|(m, v)| Some((m.isolation.to_string(), v.as_deref()?.parse::<u64>().ok()?)))
        .collect();
    let Some(min) = counts.iter().map(|(_, n)| *n).min() else {
        return String::new();
    };
    if counts.len() < 2 {
        return String::new();
    }
    let best: Vec<String> = counts
        .into_iter()
        .filter(|(_, n)| *n == min)
        .map(|(m, _)| m)
        .collect();
    format!("fewest: {} ({min})", best.join(", "))
}

fn surface(c: &Comparison) -> Vec<Row> {
    let sur = |m: &ModeReport| m.surface.clone();
    let mut rows = vec![
        row(
            c,
            "seccomp",
            |m| {
                sur(m).and_then(|s| s.seccomp).map(|s| {
                    match s {
                        SeccompMode::Disabled => "disabled",
                        SeccompMode::Strict => "strict",
                        SeccompMode::Filter => "filter",
                    }
                    .to_string()
                })
            },
            |v| format!("filtered: {}", which(c, v, "filter")),
        ),
        row(
            c,
            "effective capabilities",
            |m| {
                sur(m)
                    .and_then(|s| s.capabilities)
                    .map(|n| n.len().to_string())
            },
            |v| fewest(c, v),
        ),
        row(
            c,
            "no_new_privs",
            |m| sur(m).map(|s| yes_no(s.no_new_privs)),
            |_| String::new(),
        ),
        row(
            c,
            "user namespace",
            |m| sur(m).and_then(|s| s.user_namespace).map(yes_no),
            |_| String::new(),
        ),
        row(
            c,
            "host syscalls, direct",
            |m| {
                sur(m).map(|s| {
                    s.host_syscalls_direct
                        .map_or("unknown".into(), |n| n.to_string())
                })
            },
            |v| fewest(c, v),
        ),
        row(
            c,
            "VMM seccomp filter (syscalls)",
            |m| {
                use engine::spec::Isolation;
                (m.isolation == Isolation::Vm).then(|| {
                    sur(m)
                        .and_then(|s| s.vmm_filter_syscalls)
                        .map_or("none".into(), |n| n.to_string())
                })
            },
            |_| String::new(),
        ),
    ];
    for r in &mut rows[4..] {
        r.details = c
            .modes
            .iter()
            .map(|m| {
                m.surface
                    .as_ref()
                    .map(|s| s.note.clone())
                    .unwrap_or_default()
            })
            .collect();
    }
    rows
}

fn probe_text(r: ProbeResult) -> String {
    match r {
        ProbeResult::Blocked => "blocked",
        ProbeResult::Allowed => "allowed",
        ProbeResult::Error => "error",
    }
    .into()
}

fn probes(c: &Comparison) -> Vec<Row> {
    // The names, in the order of the first mode that ran (every mode runs the same list).
    let names: Vec<String> = c
        .modes
        .iter()
        .find(|m| !m.probes.is_empty())
        .map(|m| m.probes.iter().map(|p| p.name.clone()).collect())
        .unwrap_or_default();
    let mut rows: Vec<Row> = names
        .iter()
        .map(|name| {
            let find = |m: &ModeReport| m.probes.iter().find(|p| &p.name == name).cloned();
            let mut r = row(
                c,
                name,
                |m| find(m).map(|p| probe_text(p.result)),
                |v| {
                    let allowed = which(c, v, "allowed");
                    let errors = modes_with(c, v, "error");
                    let mut text = if allowed == "none" {
                        "blocked everywhere".to_string()
                    } else {
                        format!("allowed: {allowed}")
                    };
                    if !errors.is_empty() {
                        text.push_str(&format!("; undecided: {}", errors.join(", ")));
                    }
                    text
                },
            );
            r.details = c
                .modes
                .iter()
                .map(|m| find(m).map(|p| p.detail).unwrap_or_default())
                .collect();
            r
        })
        .collect();
    let mut total = row(
        c,
        "allowed, of all probes",
        |m| Some(m.allowed().to_string()),
        |v| fewest(c, v),
    );
    total.cells = c
        .modes
        .iter()
        .zip(&total.cells)
        .map(|(m, cell)| match m.status {
            ModeStatus::Ok => format!("{cell} of {}", m.probes.len()),
            _ => cell.clone(),
        })
        .collect();
    rows.push(total);
    rows
}

/// Milliseconds as `3.2 ms` or `7.41 s`.
pub fn ms_text(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

fn kib_text(kib: f64) -> String {
    if kib < 1024.0 {
        format!("{kib:.0} KiB")
    } else {
        format!("{:.1} MiB", kib / 1024.0)
    }
}

/// A cost row with its chart and a verdict naming the best mode and how far the others are.
fn cost_row(
    c: &Comparison,
    label: &str,
    higher_is_better: bool,
    value: impl Fn(&CostReport) -> Option<f64>,
    text: impl Fn(f64) -> String,
) -> Row {
    let values: Vec<Option<f64>> = c
        .modes
        .iter()
        .map(|m| m.cost.as_ref().and_then(&value))
        .collect();
    let mut r = row(
        c,
        label,
        |m| m.cost.as_ref().and_then(&value).map(&text),
        |_| String::new(),
    );
    let known: Vec<(String, f64)> = c
        .modes
        .iter()
        .zip(&values)
        .filter_map(|(m, v)| Some((m.isolation.to_string(), (*v)?)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    let better = |a: f64, b: f64| if higher_is_better { a > b } else { a < b };
    if known.len() < 2 {
        // Nothing to compare with.
    } else if let Some((best, best_v)) =
        known
            .iter()
            .cloned()
            .reduce(|a, b| if better(b.1, a.1) { b } else { a })
    {
        let others: Vec<String> = known
            .iter()
            .filter(|(m, _)| *m != best)
            .map(|(m, v)| {
                let ratio = if higher_is_better {
                    best_v / v
                } else {
                    v / best_v
                };
                format!("{m} x{}", ratio_text(ratio))
            })
            .collect();
        r.verdict = if others.is_empty() {
            format!("best: {best}")
        } else {
            format!("best: {best}; {}", others.join(", "))
        };
    }
    r.chart = Some(Chart {
        values,
        higher_is_better,
    });
    r
}

fn ratio_text(r: f64) -> String {
    digits(r)
}

/// A positive number with about three significant digits (no more decimals than that needs).
pub fn digits(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn costs(c: &Comparison) -> Vec<Row> {
    let mut rows = vec![
        cost_row(c, "start to first output", false, |k| k.start_ms, ms_text),
        cost_row(c, "run to exit", false, |k| k.exit_ms, ms_text),
        cost_row(
            c,
            "host memory (PSS)",
            false,
            |k| k.memory_overhead_kib.map(|n| n as f64),
            kib_text,
        ),
        cost_row(
            c,
            "CPU loop vs process",
            true,
            |k| k.cpu_relative,
            |x| format!("{x:.2}x"),
        ),
        cost_row(
            c,
            "syscall (getppid)",
            false,
            |k| k.syscall_ns,
            |n| {
                if n >= 10_000.0 {
                    format!("{:.1} us", n / 1000.0)
                } else {
                    format!("{n:.0} ns")
                }
            },
        ),
        cost_row(
            c,
            "fork+exec+wait",
            true,
            |k| k.fork_exec_per_s,
            |n| format!("{}/s", digits(n)),
        ),
        cost_row(
            c,
            "file write+fsync",
            true,
            |k| k.disk_write_mib_s,
            |n| format!("{} MiB/s", digits(n)),
        ),
        cost_row(
            c,
            "TCP over loopback",
            true,
            |k| k.tcp_loopback_mib_s,
            |n| format!("{} MiB/s", digits(n)),
        ),
    ];
    if let Some(r) = rows.get_mut(6) {
        r.details = c
            .modes
            .iter()
            .map(|m| {
                m.cost
                    .as_ref()
                    .and_then(|k| k.disk_dir.clone())
                    .map(|d| format!("written in {d} (inside the sandbox)"))
                    .unwrap_or_default()
            })
            .collect();
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_about_three_digits() {
        assert_eq!(digits(1234.6), "1235");
        assert_eq!(digits(12.345), "12.3");
        assert_eq!(digits(1.5), "1.50");
        assert_eq!(digits(0.39), "0.390");
        assert_eq!(ms_text(12.34), "12.3 ms");
        assert_eq!(ms_text(56_802.8), "56.80 s");
    }
}
