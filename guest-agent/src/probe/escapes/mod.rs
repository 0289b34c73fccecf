//! The escape probes: the same list, in the same order, in every mode.
//!
//! - [`host`]: probes of host resources, identified by the nonces the host hands over (a
//!   process, a secret file, the disk, a loopback service, the kernel log, mvm's control plane).
//! - [`kernel`]: privileged kernel operations, each tried in a way that changes nothing.
//!
//! A probe is `allowed` when the operation passed the kernel's permission check (or, for a host
//! resource, when the real one was reached), `blocked` when a check (seccomp, capabilities,
//! namespaces, a read-only mount, a missing device) stopped it, and `error` when it could not be
//! decided: its input was not given, or the kernel answered something unexpected.

pub mod host;
pub mod kernel;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use super::surface::status_field;
use super::sys::{self, Errno, Forked};
use super::{Options, Probe, ProbeResult};

/// Names of the probes, in report order.
pub const NAMES: [&str; 21] = [
    "see-host-process",
    "signal-host-process",
    "ptrace-host-process",
    "read-host-secret",
    "mount-filesystem",
    "load-kernel-module",
    "open-host-disk",
    "raw-socket",
    "set-clock",
    "write-sysrq-trigger",
    "write-sys",
    "reboot",
    "keyctl",
    "unshare-user-namespace",
    "bpf",
    "perf-event-open",
    "reach-host-loopback",
    "reach-agent-vsock",
    "read-state-dir",
    "tiocsti",
    "read-kernel-log",
];

/// What the probes share.
#[derive(Debug)]
pub struct Context<'a> {
    /// The command line.
    pub opts: &'a Options,
    /// A writable directory for mount points and device nodes.
    pub scratch: Option<&'a Path>,
    /// The result of the marker scan, when a marker was given.
    pub marker: Option<&'a Marker>,
}

/// Where the host's marker process was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// Its pid as this process sees it, when visible.
    pub pid: Option<i32>,
    /// How many processes were looked at (`None`: /proc is unreadable).
    pub scanned: Option<usize>,
}

/// Looks for the host's marker process: one whose command line has the nonce in an argument,
/// other than this process and its ancestors (whose command lines carry the nonce as the
/// probe's own argument). `--marker-pid` is tried first.
pub fn find_marker(opts: &Options) -> Option<Marker> {
    let nonce = opts.marker.as_deref()?;
    let excluded = self_and_ancestors();
    let has_nonce = |pid: i32| !excluded.contains(&pid) && cmdline_has(pid, nonce);
    if let Some(pid) = opts.marker_pid.filter(|p| has_nonce(*p)) {
        return Some(Marker {
            pid: Some(pid),
            scanned: Some(1),
        });
    }
    let Some(pids) = super::visible::pids() else {
        return Some(Marker {
            pid: None,
            scanned: None,
        });
    };
    Some(Marker {
        pid: pids.iter().copied().find(|p| has_nonce(*p)),
        scanned: Some(pids.len()),
    })
}

/// This process and its ancestors, by pid.
fn self_and_ancestors() -> Vec<i32> {
    let mut pids = vec![i32::try_from(std::process::id()).unwrap_or(0)];
    let mut pid = i32::try_from(sys::getppid_raw()).unwrap_or(0);
    while pid > 0 && !pids.contains(&pid) && pids.len() < 256 {
        pids.push(pid);
        pid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat_ppid(&s))
            .unwrap_or(0);
    }
    pids
}

/// The parent pid from `/proc/<pid>/stat` (`pid (comm) state ppid ...`; comm may hold spaces
/// and parentheses, so fields are counted from the last `)`).
pub fn parse_stat_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether one argument of process `pid` contains `nonce`.
fn cmdline_has(pid: i32, nonce: &str) -> bool {
    use std::io::Read;
    let Ok(f) = std::fs::File::open(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut buf = Vec::new();
    if f.take(1 << 16).read_to_end(&mut buf).is_err() {
        return false;
    }
    args_contain(&buf, nonce)
}

/// Whether one NUL-separated argument contains `nonce`.
pub fn args_contain(cmdline: &[u8], nonce: &str) -> bool {
    cmdline
        .split(|b| *b == 0)
        .any(|a| String::from_utf8_lossy(a).contains(nonce))
}

/// Builds one report entry.
pub fn probe(name: &str, result: ProbeResult, detail: impl Into<String>) -> Probe {
    Probe {
        name: name.to_string(),
        result,
        detail: detail.into(),
    }
}

/// The verdict for a refused system call: permission errors and a filtered (or missing) call
/// are `blocked`; anything else is unexpected.
pub fn refused(e: Errno) -> (ProbeResult, String) {
    let name = sys::errno_name(e);
    match e {
        libc::EPERM | libc::EACCES => (ProbeResult::Blocked, name),
        libc::ENOSYS => (ProbeResult::Blocked, format!("{name} ({})", why_enosys())),
        _ => (ProbeResult::Error, format!("unexpected {name}")),
    }
}

/// Why a system call may have failed with ENOSYS: without seccomp only the kernel can say so.
fn why_enosys() -> &'static str {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match status_field(&status, "Seccomp").as_deref() {
        Some("0") => "this kernel does not have it",
        _ => "filtered by seccomp, or this kernel does not have it",
    }
}

/// The verdict for a system call made with an argument the kernel rejects after the permission
/// check: one of `past_check` means it got through the check.
pub fn by_errno(e: Errno, past_check: &[Errno], allowed_detail: &str) -> (ProbeResult, String) {
    if past_check.contains(&e) {
        (
            ProbeResult::Allowed,
            format!(
                "{allowed_detail} ({} after the permission check)",
                sys::errno_name(e)
            ),
        )
    } else {
        refused(e)
    }
}

/// Longest a probe may take (the vsock probe waits up to 2 s per CID).
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// A probe and how to run it.
type Step<'a> = (&'static str, &'a dyn Fn() -> Probe);

/// Runs every probe, in the order of [`NAMES`], in forked children (see [`run_isolated`]).
pub fn run_all(ctx: &Context) -> Vec<Probe> {
    let steps: [Step; 21] = [
        (NAMES[0], &|| host::see_process(ctx)),
        (NAMES[1], &|| host::signal_process(ctx)),
        (NAMES[2], &|| host::ptrace_process(ctx)),
        (NAMES[3], &|| host::read_secret(ctx)),
        (NAMES[4], &|| kernel::mount_filesystem(ctx)),
        (NAMES[5], &kernel::load_module),
        (NAMES[6], &|| host::open_disk(ctx)),
        (NAMES[7], &kernel::raw_socket),
        (NAMES[8], &kernel::set_clock),
        (NAMES[9], &kernel::write_sysrq_trigger),
        (NAMES[10], &kernel::write_sys),
        (NAMES[11], &kernel::reboot),
        (NAMES[12], &kernel::keyctl),
        (NAMES[13], &kernel::unshare_user_namespace),
        (NAMES[14], &kernel::bpf),
        (NAMES[15], &kernel::perf_event_open),
        (NAMES[16], &|| host::reach_loopback(ctx)),
        (NAMES[17], &|| host::reach_agent_vsock(ctx)),
        (NAMES[18], &|| host::read_state_dir(ctx)),
        (NAMES[19], &kernel::tiocsti),
        (NAMES[20], &|| host::read_kernel_log(ctx)),
    ];
    run_isolated(&steps, PROBE_TIMEOUT)
}

/// Runs the probes in a forked child that sends each result back as one JSON line, so that a
/// seccomp filter that kills instead of failing the call (SIGSYS), a crash or a hang costs one
/// probe only, and nothing a probe does touches the probe process itself. When the child dies
/// (or a probe takes longer than `timeout`), the probe it was in gets the verdict from its death
/// and a new child goes on with the next one. One fork in the usual case: in an emulated guest
/// kernel each fork is expensive.
fn run_isolated(steps: &[Step], timeout: Duration) -> Vec<Probe> {
    let mut done: Vec<Probe> = Vec::with_capacity(steps.len());
    while let Some(&(name, _)) = steps.get(done.len()) {
        let rest = &steps[done.len()..];
        let (from_child, mut to_parent) = match sys::pipe() {
            Ok(p) => p,
            Err(e) => {
                done.push(probe(
                    name,
                    ProbeResult::Error,
                    format!("pipe: {}", sys::io_name(&e)),
                ));
                continue;
            }
        };
        let pid = match sys::fork() {
            Ok(Forked::Child) => sys::in_child(|| {
                drop(from_child);
                for (_, run) in rest {
                    let mut line = serde_json::to_vec(&run()).unwrap_or_default();
                    line.push(b'\n');
                    if to_parent.write_all(&line).is_err() {
                        return 1;
                    }
                }
                0
            }),
            Ok(Forked::Parent(pid)) => pid,
            Err(e) => {
                done.push(probe(
                    name,
                    ProbeResult::Error,
                    format!("fork: {}", sys::errno_name(e)),
                ));
                continue;
            }
        };
        drop(to_parent);
        let ended = receive_lines(from_child, timeout, |line| {
            let (name, _) = steps[done.len()];
            let mut p = serde_json::from_slice(line)
                .unwrap_or_else(|_| probe(name, ProbeResult::Error, "the probe sent no result"));
            // A probe reports under its own name, whatever the child sent.
            p.name = name.to_string();
            done.push(p);
            done.len() < steps.len()
        });
        if ended.is_err() {
            let _ = sys::kill(pid);
        }
        let exit = sys::wait(pid);
        // Every round adds at least one entry: the results sent, or this verdict.
        if let Some(&(name, _)) = steps.get(done.len()) {
            done.push(death_verdict(name, ended, exit));
        }
    }
    done
}

/// The verdict for the probe a child was running when it ended without its result.
fn death_verdict(name: &str, ended: Result<(), String>, exit: Result<sys::Exit, Errno>) -> Probe {
    match (ended, exit) {
        (Err(why), _) => probe(name, ProbeResult::Error, why),
        (
            _,
            Ok(sys::Exit {
                signal: Some(libc::SIGSYS),
                ..
            }),
        ) => probe(
            name,
            ProbeResult::Blocked,
            "killed by SIGSYS (a seccomp filter that kills)",
        ),
        (
            _,
            Ok(sys::Exit {
                signal: Some(sig), ..
            }),
        ) => probe(
            name,
            ProbeResult::Error,
            format!("the probe died with signal {sig}"),
        ),
        (_, exit) => probe(
            name,
            ProbeResult::Error,
            format!("the probe ended without a result ({exit:?})"),
        ),
    }
}

/// Hands each line read from `r` to `line` (which returns whether more are expected) until
/// EOF; an error when no line came for `timeout`.
fn receive_lines(
    mut r: std::fs::File,
    timeout: Duration,
    mut line: impl FnMut(&[u8]) -> bool,
) -> Result<(), String> {
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    let mut deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sys::wait_readable(r.as_raw_fd(), left) {
            Ok(true) => {}
            Ok(false) => return Err("timed out".to_string()),
            Err(e) => return Err(format!("poll: {}", sys::errno_name(e))),
        }
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read: {}", sys::io_name(&e))),
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let more = line(&pending[..end]);
            pending.drain(..=end);
            deadline = Instant::now() + timeout;
            if !more {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppid_from_stat_with_odd_comm() {
        assert_eq!(parse_stat_ppid("42 (sleep) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parse_stat_ppid("42 (a) b (c) R 9 1 1"), Some(9));
        assert_eq!(parse_stat_ppid("42 sleep S 7"), None);
    }

    #[test]
    fn nonce_must_be_inside_one_argument() {
        let cmd = b"sleep\x00600\x00mvm-marker-abcdef12\x00";
        assert!(args_contain(cmd, "abcdef12"));
        assert!(!args_contain(cmd, "600mvm"));
        assert!(!args_contain(b"", "abcdef12"));
    }

    #[test]
    fn verdicts_from_errnos() {
        assert_eq!(refused(libc::EPERM).0, ProbeResult::Blocked);
        assert_eq!(refused(libc::ENOSYS).0, ProbeResult::Blocked);
        assert_eq!(refused(libc::EBADF).0, ProbeResult::Error);
        let (r, d) = by_errno(libc::ENOEXEC, &[libc::ENOEXEC], "loaded");
        assert_eq!(r, ProbeResult::Allowed);
        assert_eq!(d, "loaded (ENOEXEC after the permission check)");
        assert_eq!(
            by_errno(libc::EPERM, &[libc::ENOEXEC], "x").0,
            ProbeResult::Blocked
        );
    }

    #[test]
    fn this_process_is_not_its_own_marker() {
        // The test binary's own command line does not matter: the probe skips itself and its
        // ancestors, and nothing else carries this nonce.
        let opts = Options {
            marker: Some(format!("no-such-marker-{}", std::process::id())),
            ..Options::default()
        };
        let m = find_marker(&opts).expect("marker given");
        assert_eq!(m.pid, None);
        assert!(m.scanned.is_some_and(|n| n > 0));
        assert_eq!(find_marker(&Options::default()), None);
    }

    #[test]
    fn probes_run_in_a_child_and_report_in_order() {
        let a = || probe("a", ProbeResult::Allowed, "fine");
        let b = || probe("wrong name", ProbeResult::Blocked, "EPERM");
        let steps: [Step; 2] = [("a", &a), ("b", &b)];
        let got = run_isolated(&steps, Duration::from_secs(5));
        assert_eq!(
            got,
            [
                probe("a", ProbeResult::Allowed, "fine"),
                probe("b", ProbeResult::Blocked, "EPERM"),
            ]
        );
    }

    #[test]
    fn a_probe_killed_by_seccomp_is_blocked_a_crash_or_hang_is_an_error_and_the_rest_run() {
        let ok = || probe("ok", ProbeResult::Allowed, "fine");
        let sigsys = || {
            // SAFETY: raise has no preconditions; it ends this forked child.
            unsafe { libc::raise(libc::SIGSYS) };
            probe("sigsys", ProbeResult::Allowed, "unreachable")
        };
        let panics = || -> Probe { panic!("probe bug") };
        let hangs = || {
            std::thread::sleep(Duration::from_secs(30));
            probe("hangs", ProbeResult::Allowed, "late")
        };
        let steps: [Step; 5] = [
            ("sigsys", &sigsys),
            ("ok", &ok),
            ("panics", &panics),
            ("hangs", &hangs),
            ("last", &ok),
        ];
        let start = Instant::now();
        let got = run_isolated(&steps, Duration::from_millis(300));
        assert!(start.elapsed() < Duration::from_secs(10));
        let names: Vec<&str> = got.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["sigsys", "ok", "panics", "hangs", "last"]);
        let results: Vec<ProbeResult> = got.iter().map(|p| p.result).collect();
        assert_eq!(
            results,
            [
                ProbeResult::Blocked,
                ProbeResult::Allowed,
                ProbeResult::Error,
                ProbeResult::Error,
                ProbeResult::Allowed
            ]
        );
        assert!(got[0].detail.contains("SIGSYS"), "{}", got[0].detail);
        assert_eq!(got[3].detail, "timed out");
    }

    #[test]
    fn every_probe_runs_and_is_named_in_order() {
        let opts = Options::default();
        let ctx = Context {
            opts: &opts,
            scratch: None,
            marker: None,
        };
        let probes = run_all(&ctx);
        let names: Vec<&str> = probes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, NAMES);
        // Inputs that were not given are errors that say so.
        let secret = &probes[3];
        assert_eq!(secret.result, ProbeResult::Error);
        assert!(secret.detail.contains("not given"), "{}", secret.detail);
    }
}
