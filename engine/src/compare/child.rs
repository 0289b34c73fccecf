//! One run of one mode, in a process of its own: mvm starts itself again with [`CHILD_ENV`]
//! naming a file that holds the run's spec, and the child runs it in the foreground as `mvm run`
//! would ([`run_child`]). Everything that child starts (the container's processes, the VMM,
//! passt) is below it in the process tree, so its memory can be measured, and its stdout is a
//! pipe whose first byte can be timed.
//!
//! The run's command is the probe with the workload after `--` (see `guest_agent::probe`): the
//! workload's output, then a line `\nMARK CODE` when it is done, a pause (`--hold-ms`) during
//! which the host measures the tree's memory, then the probe's JSON report. From the times the
//! bytes arrive:
//! - start: spawn to the workload's first byte;
//! - exit: spawn to the mark, plus the report's last byte to the child's end (the teardown):
//!   the run without the probe's own time.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_agent::probe::ProbeReport;
use serde::{Deserialize, Serialize};

use super::memory::tree_pss_kib;
use crate::error::{io_error, Error};
use crate::run::RunOutcome;
use crate::spec::RunSpec;

/// Set in the environment of a comparison's run: the file with its [`ChildRun`].
pub const CHILD_ENV: &str = "MVM_COMPARE_RUN";

/// Most bytes kept of a run's stdout and of its stderr.
const CAPTURE_LIMIT: usize = 4 << 20;
/// How long a run's stdout may stay open after the run ended (a leftover process holding it).
const EOF_GRACE: Duration = Duration::from_secs(5);
/// How long a run has after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(20);

/// What the child runs.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChildRun {
    /// The mvm root.
    root: PathBuf,
    /// The run.
    spec: RunSpec,
}

/// The run file this process is the child of a comparison for, if it is one. Call it first
/// thing (it takes the variable out of the environment, so no child inherits it).
pub fn requested() -> Option<PathBuf> {
    let file = std::env::var_os(CHILD_ENV)?;
    std::env::remove_var(CHILD_ENV);
    Some(PathBuf::from(file))
}

/// The child's side: runs the spec in `file` in the foreground; returns the run's exit code.
pub fn run_child(file: &Path) -> Result<i32, Error> {
    let data = std::fs::read(file).map_err(io_error("read", file))?;
    let run: ChildRun = serde_json::from_slice(&data)
        .map_err(|e| io_error("read", file)(std::io::Error::other(e)))?;
    match crate::run::run(&run.root, run.spec)? {
        RunOutcome::Exited(exit) => Ok(exit.code),
        RunOutcome::Detached(_) => Err(Error::Failed(
            "a comparison's run went to the background".into(),
        )),
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub(super) struct Sample {
    /// Spawn to the workload's first byte, ms; `None` when it printed nothing.
    pub start_ms: Option<f64>,
    /// The run without the probe's own time, ms.
    pub exit_ms: f64,
    /// PSS of the run's process tree during the hold, KiB.
    pub pss_kib: Option<u64>,
    /// The workload's output.
    pub output: String,
    /// The workload's exit code.
    pub exit_code: Option<i32>,
    /// The probe's report.
    pub report: ProbeReport,
}

/// What the reader of the run's stdout saw.
#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    first: Option<Instant>,
    marked: Option<Instant>,
    last: Option<Instant>,
}

enum Event {
    Marked,
    Eof,
    Exited(std::io::Result<ExitStatus>, Instant),
}

/// Runs `spec` as a child of this process and measures it. `mark` is the token of the probe's
/// `--mark`; `limit` bounds the whole run; `stop` says whether to give up (a signal came). The
/// error is one line: why the run gave no report.
pub(super) fn run(
    file: &Path,
    root: &Path,
    spec: &RunSpec,
    mark: &str,
    limit: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<Sample, String> {
    let json = serde_json::to_vec(&ChildRun {
        root: root.to_path_buf(),
        spec: spec.clone(),
    })
    .map_err(|e| format!("cannot encode the run: {e}"))?;
    rootfs_builder::rootdir::create_private_file(file)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &json))
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    let t0 = Instant::now();
    let mut child = crate::selfexec::command()
        .env(CHILD_ENV, file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start mvm: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let captured = Arc::new(Mutex::new(Captured::default()));
    if let Some(mut out) = child.stdout.take() {
        let (tx, captured) = (tx.clone(), captured.clone());
        let needle = format!("\n{mark} ");
        std::thread::spawn(move || {
            let mut buf = [0u8; 64 << 10];
            loop {
                let n = match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let now = Instant::now();
                let mut c = captured.lock().unwrap_or_else(|p| p.into_inner());
                c.first.get_or_insert(now);
                c.last = Some(now);
                if c.bytes.len() < CAPTURE_LIMIT {
                    c.bytes.extend_from_slice(&buf[..n]);
                }
                if c.marked.is_none() && mark_complete(&c.bytes, &needle) {
                    c.marked = Some(now);
                    let _ = tx.send(Event::Marked);
                }
            }
            let _ = tx.send(Event::Eof);
        });
    }
    let (err_tx, err_rx) = mpsc::channel();
    if let Some(mut err) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = err
                .by_ref()
                .take(CAPTURE_LIMIT as u64)
                .read_to_end(&mut text);
            let _ = err_tx.send(String::from_utf8_lossy(&text).into_owned());
        });
    }
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send(Event::Exited(status, Instant::now()));
        });
    }
    drop(tx);

    let deadline = t0 + limit;
    let mut pss = None;
    let mut eof = false;
    let mut exited: Option<(std::io::Result<ExitStatus>, Instant)> = None;
    let mut terminated: Option<Instant> = None;
    let mut gave_up = None;
    loop {
        if exited.is_some() && eof {
            break;
        }
        let now = Instant::now();
        if let Some((_, at)) = &exited {
            if now > *at + EOF_GRACE {
                break;
            }
        }
        if exited.is_none() {
            let why = if stop() {
                Some("stopped by a signal".to_string())
            } else if now > deadline {
                Some(format!("no result within {} s", limit.as_secs()))
            } else {
                None
            };
            if let Some(why) = why {
                // SIGTERM first: the run then cleans up as `mvm run` does on SIGTERM.
                let sig = match terminated {
                    Some(at) if now > at + TERM_GRACE => libc::SIGKILL,
                    Some(_) => 0,
                    None => libc::SIGTERM,
                };
                if sig != 0 {
                    // SAFETY: kill(2) with a pid this process started and has not reaped (the
                    // waiter thread has not reported its exit).
                    unsafe { libc::kill(i32::try_from(pid).unwrap_or(i32::MAX), sig) };
                    terminated.get_or_insert(now);
                }
                gave_up.get_or_insert(why);
            }
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Marked) => pss = tree_pss_kib(pid),
            Ok(Event::Eof) => eof = true,
            Ok(Event::Exited(status, at)) => exited = Some((status, at)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let stderr = err_rx.recv_timeout(EOF_GRACE).unwrap_or_default();
    if let Some(why) = gave_up {
        return Err(why);
    }
    let (status, end) = match exited {
        Some((Ok(s), at)) => (s, at),
        Some((Err(e), _)) => return Err(format!("waiting for the run: {e}")),
        None => return Err("the run did not end".into()),
    };
    let c = std::mem::take(&mut *captured.lock().unwrap_or_else(|p| p.into_inner()));
    let parsed = parse_output(&c.bytes, mark).ok_or_else(|| failure(&stderr, status))?;
    let report: ProbeReport = serde_json::from_str(parsed.report)
        .map_err(|e| format!("the probe's report does not parse: {e}"))?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let marked = c.marked.unwrap_or(end);
    let teardown = end.saturating_duration_since(c.last.unwrap_or(end));
    Ok(Sample {
        start_ms: (!parsed.output.is_empty())
            .then(|| c.first.map(|f| ms(f - t0)))
            .flatten(),
        exit_ms: ms(marked - t0) + ms(teardown),
        pss_kib: pss,
        output: parsed.output.to_string(),
        exit_code: parsed.code,
        report,
    })
}

/// Whether `bytes` hold the whole mark line.
fn mark_complete(bytes: &[u8], needle: &str) -> bool {
    let n = needle.as_bytes();
    bytes
        .windows(n.len())
        .position(|w| w == n)
        .is_some_and(|at| bytes[at + n.len()..].contains(&b'\n'))
}

/// A run's stdout taken apart.
#[derive(Debug, PartialEq)]
struct Parsed<'a> {
    /// The workload's output.
    output: std::borrow::Cow<'a, str>,
    /// Its exit code (`None`: no workload, or an unreadable code).
    code: Option<i32>,
    /// The text after the mark line: the probe's report.
    report: &'a str,
}

/// Splits a run's stdout at the mark line; `None` when there is none.
fn parse_output<'a>(bytes: &'a [u8], mark: &str) -> Option<Parsed<'a>> {
    let needle = format!("\n{mark} ");
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?;
    let after = std::str::from_utf8(&bytes[at + needle.len()..]).ok()?;
    let (code, report) = after.split_once('\n')?;
    Some(Parsed {
        output: String::from_utf8_lossy(&bytes[..at]),
        code: code.trim().parse().ok(),
        report: report.trim(),
    })
}

/// Why a run gave no report: mvm's last error line, else its exit status.
fn failure(stderr: &str, status: ExitStatus) -> String {
    let last = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.strip_prefix("mvm: ").unwrap_or(l).to_string());
    match last {
        Some(line) => line,
        None => format!("the run ended ({status}) without the probe's report"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_splits_at_the_mark_line() {
        let out = b"hello\n\nmvm-mark-1234 3\n{\"a\":1}\n";
        let p = parse_output(out, "mvm-mark-1234").unwrap_or_else(|| panic!("no mark"));
        assert_eq!(
            p,
            Parsed {
                output: "hello\n".into(),
                code: Some(3),
                report: "{\"a\":1}"
            }
        );
        // No workload output, no code.
        let p = parse_output(b"\nmvm-mark-1234 -\n{}\n", "mvm-mark-1234");
        assert_eq!(
            p.map(|p| (p.output.into_owned(), p.code)),
            Some((String::new(), None))
        );
        // The mark as part of a line of the workload's is not the mark line.
        assert_eq!(
            parse_output(b"say mvm-mark-1234 1\n", "mvm-mark-1234"),
            None
        );
        assert!(!mark_complete(b"x\nmvm-mark-1234 0", "\nmvm-mark-1234 "));
        assert!(mark_complete(b"x\nmvm-mark-1234 0\n", "\nmvm-mark-1234 "));
    }

    #[test]
    fn a_failure_is_mvms_last_error_line() {
        use std::os::unix::process::ExitStatusExt;
        let status = ExitStatus::from_raw(1 << 8);
        assert_eq!(
            failure("warning\nmvm: no guest kernel at /k\n\n", status),
            "no guest kernel at /k"
        );
        assert!(failure("", status).contains("without the probe's report"));
    }
}
