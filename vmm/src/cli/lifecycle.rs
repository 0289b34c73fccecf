//! `mvm ps`, `logs`, `exec`, `stop`, `kill`, `rm` and `inspect`: the docker-like commands on VM
//! containers that `mvm run` registered (see [`crate::state`] and [`super::runner`]).
//!
//! There is no control socket: `exec`, `stop` and `kill` open their own agent session over the
//! VM's vsock socket (`<root>/containers/<id>/vsock.sock`; the agent serves several sessions) and
//! signal the container's first process there. When it exits the runner records the exit code
//! and tears the VM down, so `stop` only waits for the runner process (pid and start time from
//! the record) to end. If the agent does not answer, `stop` falls back to SIGTERM on the runner
//! (which ends the VM through the VMM's signal handling), then SIGKILL; a runner that died
//! without cleaning up (`kill -9`) is cleaned up after by `rm`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use guest_agent::agent::client::{AgentClient, ClientError, InheritOutput};
use guest_agent::guest::{MAIN_CONTAINER as AGENT_CONTAINER, MAIN_STREAM};
use guest_agent::protocol::AGENT_VSOCK_PORT;
use guest_agent::runtime::Process;

use super::bad_input;
use super::run::CommandExit;
use crate::portfwd::PortMapping;
use crate::state::{process_alive, ContainerRecord, StateError, StateStore, Status};

/// How long `stop` waits for the runner after SIGKILL reached the container, before it stops the
/// VM itself (SIGTERM to the runner: the VM ends, the runner still records the exit).
const AFTER_KILL: Duration = Duration::from_secs(15);

/// How long a runner may take to end after SIGTERM.
const RUNNER_TERM: Duration = Duration::from_secs(30);

/// Flags of `mvm ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Show every container (default: only running ones).
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Only print ids.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// Flags of `mvm logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing new output until the container exits.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Container name or id.
    pub name: String,
}

/// Flags of `mvm exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Feed this terminal's stdin to the command.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Accepted for docker compatibility; the agent has no terminals, so output is not a tty.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Set an environment variable (KEY=VALUE).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User: uid, uid:gid, name or name:group.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Container name or id.
    pub name: String,
    /// Command and arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// Flags of `mvm stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(short = 't', long = "time", default_value_t = 10, value_name = "SECS")]
    pub time: u64,
    /// Container name or id.
    pub name: String,
}

/// Flags of `mvm kill`.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// Signal: a name (TERM, SIGHUP) or number.
    #[arg(
        short = 's',
        long = "signal",
        default_value = "KILL",
        value_name = "SIG"
    )]
    pub signal: String,
    /// Container name or id.
    pub name: String,
}

/// Flags of `mvm rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Stop a running container first (SIGKILL).
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Container name or id.
    pub name: String,
}

/// Flags of `mvm inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Container name or id.
    pub name: String,
}

/// Finds a container without creating any state directory.
fn find(root: &Path, name: &str) -> anyhow::Result<(StateStore, ContainerRecord)> {
    if !root.join("containers").is_dir() {
        return Err(bad_input(StateError::NotFound(name.into()).to_string()));
    }
    let store = StateStore::open(root)?;
    match store.get(name) {
        Ok(r) => Ok((store, r)),
        Err(e @ (StateError::NotFound(_) | StateError::Ambiguous(_))) => {
            Err(bad_input(e.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

fn is_live(r: &ContainerRecord) -> bool {
    matches!(r.live_status(), Status::Running | Status::Created)
}

fn require_running(r: &ContainerRecord) -> anyhow::Result<()> {
    if r.live_status() == Status::Running {
        Ok(())
    } else {
        Err(bad_input(format!("container {} is not running", r.name)))
    }
}

/// A new agent session with the container's VM.
fn agent(
    store: &StateStore,
    r: &ContainerRecord,
) -> anyhow::Result<AgentClient<std::os::unix::net::UnixStream>> {
    let vsock = store.container_dir(&r.id).join("vsock.sock");
    let conn =
        devices::virtio::vsock::host_connect(&vsock, AGENT_VSOCK_PORT, Duration::from_secs(10))
            .with_context(|| format!("cannot reach the guest agent of {}", r.name))?;
    AgentClient::open(conn).with_context(|| format!("guest agent of {}", r.name))
}

/// `mvm ps`.
pub fn ps(root: &Path, args: &PsArgs) -> anyhow::Result<i32> {
    let records = if root.join("containers").is_dir() {
        StateStore::open(root)?.list()?
    } else {
        Vec::new()
    };
    let shown: Vec<_> = records
        .into_iter()
        .filter(|r| args.all || r.live_status() == Status::Running)
        .collect();
    if args.quiet {
        for r in &shown {
            outln!("{}", short_id(&r.id));
        }
    } else {
        print!("{}", ps_table(&shown, crate::state::now()));
    }
    Ok(0)
}

fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn status_text(r: &ContainerRecord) -> String {
    match (r.live_status(), r.exit_code) {
        (Status::Created, _) => "created".into(),
        (Status::Running, _) => "running".into(),
        (Status::Exited, Some(code)) => format!("exited ({code})"),
        (Status::Exited, None) => "exited (unknown)".into(),
    }
}

fn ports_text(r: &ContainerRecord) -> String {
    r.ports
        .iter()
        .map(|p| match p.parse::<PortMapping>() {
            Ok(m) => format!("{}->{}/tcp", m.host, m.guest_port),
            Err(_) => p.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `1h02m`, `5m12s`, `40s`.
fn duration_text(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h >= 24 {
        format!("{}d{:02}h", h / 24, h % 24)
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// The `ps` table: ID NAME IMAGE STATUS PORTS UPTIME, columns as wide as their widest cell.
fn ps_table(records: &[ContainerRecord], now: u64) -> String {
    let mut rows = vec![["ID", "NAME", "IMAGE", "STATUS", "PORTS", "UPTIME"].map(String::from)];
    for r in records {
        let uptime = match (r.live_status(), r.started) {
            (Status::Running, Some(t)) => duration_text(now.saturating_sub(t)),
            _ => "-".into(),
        };
        rows.push([
            short_id(&r.id).to_string(),
            r.name.clone(),
            r.image.clone(),
            status_text(r),
            ports_text(r),
            uptime,
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `mvm logs`.
pub fn logs(root: &Path, args: &LogsArgs) -> anyhow::Result<i32> {
    let (store, r) = find(root, &args.name)?;
    let path = store.container_dir(&r.id).join("container.log");
    let mut offset = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        // Whether the runner still lives is checked before reading, so the last read after it
        // ended sees everything it wrote.
        let live = args.follow && is_live(&store.get(&r.id).unwrap_or_else(|_| r.clone()));
        if let Ok(mut f) = std::fs::File::open(&path) {
            f.seek(SeekFrom::Start(offset))
                .with_context(|| format!("cannot read {}", path.display()))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
            offset += buf.len() as u64;
            if out.write_all(&buf).and_then(|()| out.flush()).is_err() {
                return Ok(0); // the reader went away (a closed pipe)
            }
        }
        if !live {
            return Ok(0);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `mvm exec`: runs a command in the running container; returns its exit code.
pub fn exec(root: &Path, args: &ExecArgs) -> anyhow::Result<i32> {
    let (store, r) = find(root, &args.name)?;
    require_running(&r)?;
    if args.tty {
        log::warn!("exec -t: the guest agent has no terminals; running without one");
    }
    let mut client = agent(&store, &r)?;
    let process = Process {
        args: args.command.clone(),
        env: args.env.clone(),
        cwd: args.workdir.clone().unwrap_or_else(|| "/".into()),
        user: args.user.clone(),
    };
    let stream = match client.exec(AGENT_CONTAINER, process, args.interactive) {
        Ok(s) => s,
        // As docker: 127 for a command that is not there, 126 for one that cannot run.
        Err(ClientError::Refused(msg)) => {
            let code = if msg.contains("not found") { 127 } else { 126 };
            return Err(CommandExit(code, msg).into());
        }
        Err(e) => return Err(e).context(format!("exec in {}", r.name)),
    };
    if args.interactive {
        crate::microvm::forward_stdin(&store.container_dir(&r.id).join("vsock.sock"), stream);
    }
    client
        .stream_until_exit(stream, &mut InheritOutput)
        .with_context(|| format!("exec in {}: the session broke", r.name))
}

/// Waits until the runner of `r` has ended; false if it still runs after `limit`.
fn wait_gone(r: &ContainerRecord, limit: Duration) -> bool {
    let Some(pid) = r.pid else { return true };
    let deadline = Instant::now() + limit;
    loop {
        if !process_alive(pid, r.pid_start) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `sig` to the runner process itself, if it is still the one the record names.
fn signal_runner(r: &ContainerRecord, sig: i32) {
    if let Some(pid) = r.pid.filter(|p| process_alive(*p, r.pid_start)) {
        // SAFETY: kill has no memory preconditions; the pid was checked against its start time.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Stops a live container: SIGTERM to its process through the agent, SIGKILL after `grace`,
/// then SIGTERM and at last SIGKILL to the runner if it has not ended; returns once it has.
fn stop_container(store: &StateStore, r: &ContainerRecord, grace: Duration) -> anyhow::Result<()> {
    if !is_live(r) {
        return Ok(());
    }
    let mut client = agent(store, r).ok();
    for (sig, wait) in [(libc::SIGTERM, grace), (libc::SIGKILL, AFTER_KILL)] {
        match client.as_mut() {
            Some(c) if r.live_status() == Status::Running => {
                if let Err(e) = c.signal(AGENT_CONTAINER, MAIN_STREAM, sig) {
                    log::debug!("signal {sig} through the agent: {e}");
                    client = None;
                    signal_runner(r, libc::SIGTERM);
                }
            }
            _ => signal_runner(r, libc::SIGTERM),
        }
        if wait_gone(r, wait) {
            return Ok(());
        }
    }
    signal_runner(r, libc::SIGTERM);
    if wait_gone(r, RUNNER_TERM) {
        return Ok(());
    }
    signal_runner(r, libc::SIGKILL);
    if !wait_gone(r, Duration::from_secs(5)) {
        anyhow::bail!("the runner of {} (pid {:?}) does not end", r.name, r.pid);
    }
    clean_dead(store, r)
}

/// Cleans up after a runner that died without doing so: taps named in the record, then the
/// record and its directory.
fn clean_dead(store: &StateStore, r: &ContainerRecord) -> anyhow::Result<()> {
    for tap in &r.taps {
        if Path::new("/sys/class/net").join(tap).exists() {
            let ok = std::process::Command::new("ip")
                .args(["link", "delete", tap])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                log::warn!("cannot delete tap {tap} of {}", r.name);
            }
        }
    }
    super::runner::clean_run_dir(&store.container_dir(&r.id));
    Ok(())
}

/// `mvm stop`.
pub fn stop(root: &Path, args: &StopArgs) -> anyhow::Result<i32> {
    let (store, r) = find(root, &args.name)?;
    stop_container(&store, &r, Duration::from_secs(args.time))?;
    outln!("{}", args.name);
    Ok(0)
}

/// A signal by name (`TERM`, `SIGTERM`, case-insensitive) or number.
pub fn parse_signal(text: &str) -> Result<i32, String> {
    const NAMES: &[(&str, i32)] = &[
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("KILL", libc::SIGKILL),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("TERM", libc::SIGTERM),
        ("CONT", libc::SIGCONT),
        ("STOP", libc::SIGSTOP),
        ("WINCH", libc::SIGWINCH),
    ];
    if let Ok(n) = text.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("invalid signal {n}: use 1 to 64"))
        };
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| format!("unknown signal '{text}'"))
}

/// `mvm kill`.
pub fn kill(root: &Path, args: &KillArgs) -> anyhow::Result<i32> {
    let sig = parse_signal(&args.signal).map_err(bad_input)?;
    let (store, r) = find(root, &args.name)?;
    require_running(&r)?;
    agent(&store, &r)?
        .signal(AGENT_CONTAINER, MAIN_STREAM, sig)
        .with_context(|| format!("cannot signal {}", r.name))?;
    outln!("{}", args.name);
    Ok(0)
}

/// `mvm rm`.
pub fn rm(root: &Path, args: &RmArgs) -> anyhow::Result<i32> {
    let (store, r) = find(root, &args.name)?;
    if is_live(&r) {
        if !args.force {
            return Err(bad_input(format!(
                "container {} is running: stop it first or use rm -f",
                r.name
            )));
        }
        stop_container(&store, &r, Duration::ZERO)?;
    }
    // A dead runner left its VM's files (and maybe a tap); a --rm runner removed everything.
    match store.get(&r.id) {
        Ok(r) => {
            clean_dead(&store, &r)?;
            store.remove(&r)?;
        }
        Err(StateError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    outln!("{}", args.name);
    Ok(0)
}

/// `mvm inspect`: the record as JSON, with the status as seen now.
pub fn inspect(root: &Path, args: &InspectArgs) -> anyhow::Result<i32> {
    let (_, mut r) = find(root, &args.name)?;
    r.status = r.live_status();
    outln!("{}", serde_json::to_string_pretty(&r)?);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{new_id, now, process_start_time};

    fn record(name: &str, status: Status, pid: Option<i32>) -> ContainerRecord {
        let mut r = ContainerRecord::new(
            format!("abcdef012345{}", &new_id()[..4]),
            name.into(),
            "nginx".into(),
            "vm",
            vec!["nginx".into()],
            vec!["8080:80".into()],
        );
        r.created = 1000;
        r.started = Some(1000);
        r.status = status;
        r.pid = pid;
        r.pid_start = pid.and_then(process_start_time);
        r
    }

    fn me() -> Option<i32> {
        Some(i32::try_from(std::process::id()).unwrap())
    }

    #[test]
    fn ps_shows_running_and_exited_containers_like_docker() {
        let web = record("web", Status::Running, me());
        let mut old = record("old", Status::Exited, None);
        old.exit_code = Some(137);
        old.ports.clear();
        let table = ps_table(&[web, old], 1000 + 312);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        let cols = |l: &str| {
            l.split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cols(lines[0]),
            ["ID", "NAME", "IMAGE", "STATUS", "PORTS", "UPTIME"]
        );
        assert_eq!(
            cols(lines[1]),
            [
                "abcdef012345",
                "web",
                "nginx",
                "running",
                "127.0.0.1:8080->80/tcp",
                "5m12s"
            ]
        );
        assert!(lines[2].contains("exited (137)"), "{}", lines[2]);
        assert!(lines[2].trim_end().ends_with('-'));
        // Columns line up.
        assert_eq!(lines[0].find("STATUS"), lines[1].find("running"));
    }

    #[test]
    fn a_running_record_whose_runner_died_is_listed_as_exited() {
        let r = record("web", Status::Running, Some(i32::MAX));
        assert_eq!(status_text(&r), "exited (unknown)");
        assert!(!is_live(&r));
        assert!(require_running(&r).is_err());
        assert!(wait_gone(&r, Duration::ZERO));
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(duration_text(40), "40s");
        assert_eq!(duration_text(312), "5m12s");
        assert_eq!(duration_text(3720), "1h02m");
        assert_eq!(duration_text(90000), "1d01h");
    }

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("TERM"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("sigkill"), Ok(libc::SIGKILL));
        assert_eq!(parse_signal("1"), Ok(1));
        for bad in ["", "0", "65", "TERMINATE", "-9"] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn commands_on_an_unknown_name_fail_with_bad_input_and_create_nothing() {
        let root = tempfile::tempdir().unwrap();
        let bad = |e: anyhow::Error| {
            assert!(e.chain().any(|c| c.is::<super::super::BadInput>()), "{e:#}");
            e.to_string()
        };
        let msg = bad(logs(
            root.path(),
            &LogsArgs {
                follow: false,
                name: "nope".into(),
            },
        )
        .unwrap_err());
        assert_eq!(msg, "no such container: nope");
        assert!(!root.path().join("containers").exists());
        StateStore::open(root.path()).unwrap();
        bad(stop(
            root.path(),
            &StopArgs {
                time: 1,
                name: "nope".into(),
            },
        )
        .unwrap_err());
        bad(rm(
            root.path(),
            &RmArgs {
                force: true,
                name: "nope".into(),
            },
        )
        .unwrap_err());
        bad(inspect(
            root.path(),
            &InspectArgs {
                name: "nope".into(),
            },
        )
        .unwrap_err());
    }

    #[test]
    fn rm_refuses_a_running_container_and_cleans_up_after_a_dead_runner() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let live = record("live", Status::Running, me());
        store.create(&live).unwrap();
        let e = rm(
            root.path(),
            &RmArgs {
                force: false,
                name: "live".into(),
            },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "container live is running: stop it first or use rm -f"
        );
        assert_eq!(store.get("live").unwrap(), live);
        let e = exec(
            root.path(),
            &ExecArgs {
                interactive: false,
                tty: false,
                env: vec![],
                workdir: None,
                user: None,
                name: "live".into(),
                command: vec!["true".into()],
            },
        );
        // No VM behind this record: the agent cannot be reached, and nothing changes.
        assert!(format!("{:#}", e.unwrap_err()).contains("cannot reach the guest agent of live"));

        let mut dead = record("dead", Status::Running, Some(i32::MAX));
        dead.taps = vec!["mvmnosuchtap0".into()];
        store.create(&dead).unwrap();
        let dir = store.container_dir(&dead.id);
        std::fs::write(dir.join("vsock.sock"), b"").unwrap();
        std::fs::write(dir.join("rootfs.ext4"), b"").unwrap();
        rm(
            root.path(),
            &RmArgs {
                force: false,
                name: "dead".into(),
            },
        )
        .unwrap();
        assert!(!dir.exists());
        assert!(matches!(store.get("dead"), Err(StateError::NotFound(_))));
        assert!(store.get("live").is_ok());
        let _ = now();
    }
}
