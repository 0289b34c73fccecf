//! `mvm stats` and `mvm top`: what running containers use, and the processes they run.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use clap::Args;
use engine::stats::{Sampler, StatsRow};
use guest_agent::runtime::stats::ProcessInfo;

use crate::error::{bad_input, from_engine};
use crate::output::table;

/// Flags of `mvm stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print one sample and exit (default: refresh every second).
    #[arg(long)]
    pub no_stream: bool,
    /// `table` (default) or `json` (one object per line).
    #[arg(long, value_name = "FORMAT", default_value = "table")]
    pub format: String,
    /// Containers (default: every running one).
    pub names: Vec<String>,
}

/// Flags of `mvm top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Container name or id.
    pub name: String,
}

/// `mvm stats`.
pub fn stats(root: &Path, args: &StatsArgs) -> anyhow::Result<i32> {
    let json = match args.format.as_str() {
        "table" => false,
        "json" => true,
        other => {
            return Err(bad_input(format!(
                "invalid --format {other:?}: use table or json"
            )))
        }
    };
    let mut sampler = Sampler::new(root, args.names.clone());
    loop {
        let rows = sampler
            .sample(Duration::from_secs(1))
            .map_err(from_engine)?;
        let text = if json {
            rows.iter()
                .map(|r| format!("{}\n", serde_json::json!(r)))
                .collect::<String>()
        } else {
            stats_table(&rows)
        };
        if args.no_stream {
            print!("{text}");
            return Ok(0);
        }
        // Clear the screen and show the new sample, as docker does.
        let mut out = std::io::stdout().lock();
        if write!(out, "\x1b[2J\x1b[H{text}")
            .and_then(|()| out.flush())
            .is_err()
        {
            return Ok(0);
        }
        drop(out);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Memory sizes in binary units, as docker prints them (`64.0MiB`).
fn size(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let b = bytes as f64;
    match bytes {
        0..=1023 => format!("{bytes}B"),
        1024..=1_048_575 => format!("{:.1}KiB", b / 1024.0),
        1_048_576..=1_073_741_823 => format!("{:.1}MiB", b / 1_048_576.0),
        _ => format!("{:.2}GiB", b / 1_073_741_824.0),
    }
}

/// Network and block I/O use decimal units, as docker prints them.
fn io(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let b = bytes as f64;
    match bytes {
        0..=999 => format!("{bytes}B"),
        1000..=999_999 => format!("{:.1}kB", b / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}MB", b / 1e6),
        _ => format!("{:.2}GB", b / 1e9),
    }
}

/// CONTAINER ID, NAME, CPU %, MEM USAGE / LIMIT, MEM %, NET I/O, BLOCK I/O, PIDS.
fn stats_table(rows: &[StatsRow]) -> String {
    let mut out = vec![[
        "CONTAINER ID",
        "NAME",
        "CPU %",
        "MEM USAGE / LIMIT",
        "MEM %",
        "NET I/O",
        "BLOCK I/O",
        "PIDS",
    ]
    .map(String::from)];
    for r in rows {
        out.push([
            r.id.get(..12).unwrap_or(&r.id).to_string(),
            r.name.clone(),
            format!("{:.2}%", r.cpu_percent),
            format!("{} / {}", size(r.memory_bytes), size(r.memory_limit)),
            format!("{:.2}%", r.memory_percent),
            format!("{} / {}", io(r.net_rx_bytes), io(r.net_tx_bytes)),
            format!("{} / {}", io(r.block_read_bytes), io(r.block_write_bytes)),
            r.pids.to_string(),
        ]);
    }
    table(&out)
}

/// `mvm top`.
pub fn top(root: &Path, args: &TopArgs) -> anyhow::Result<i32> {
    let procs = engine::stats::top(root, &args.name).map_err(from_engine)?;
    print!("{}", top_table(&procs));
    Ok(0)
}

/// UID PID PPID STIME TIME CMD, as `ps -ef` (docker's `top`) shows them.
fn top_table(procs: &[ProcessInfo]) -> String {
    let mut out = vec![["UID", "PID", "PPID", "STIME", "TIME", "CMD"].map(String::from)];
    for p in procs {
        let t = p.cpu_ms / 1000;
        out.push([
            p.uid.to_string(),
            p.pid.to_string(),
            p.ppid.to_string(),
            clock(p.started),
            format!("{:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60),
            p.command.clone(),
        ]);
    }
    table(&out)
}

/// `HH:MM` (UTC) of a time in seconds since the epoch.
fn clock(secs: u64) -> String {
    format!("{:02}:{:02}", secs / 3600 % 24, secs / 60 % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stats_table_reads_like_dockers() {
        let row = StatsRow {
            id: "0123456789abcdef".into(),
            name: "web".into(),
            cpu_percent: 12.345,
            memory_bytes: 64 << 20,
            memory_limit: 256 << 20,
            memory_percent: 25.0,
            net_rx_bytes: 1500,
            net_tx_bytes: 0,
            block_read_bytes: 4_200_000,
            block_write_bytes: 0,
            pids: 3,
        };
        let t = stats_table(&[row]);
        let line = t.lines().nth(1).unwrap();
        for part in [
            "0123456789ab",
            "web",
            "12.35%",
            "64.0MiB / 256.0MiB",
            "25.00%",
            "1.5kB / 0B",
            "4.2MB / 0B",
        ] {
            assert!(line.contains(part), "{part}: {line}");
        }
        assert!(line.ends_with(" 3"));
    }

    #[test]
    fn top_shows_ps_columns() {
        let t = top_table(&[ProcessInfo {
            pid: 7,
            ppid: 1,
            uid: 0,
            started: 3600 * 25 + 60 * 7,
            cpu_ms: 65_000,
            command: "sleep 100".into(),
        }]);
        let line = t.lines().nth(1).unwrap();
        assert!(
            line.contains("01:07") && line.contains("00:01:05"),
            "{line}"
        );
        assert!(line.ends_with("sleep 100"));
    }
}
