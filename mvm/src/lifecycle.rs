//! `mvm ps`, `logs`, `exec`, `stop`, `kill`, `rm` and `inspect`: flags in, the engine's
//! `engine::lifecycle` acts on the registered container (of any isolation), results printed as
//! Docker prints them.

use std::path::Path;
use std::time::Duration;

use clap::Args;
use engine::lifecycle;
use engine::portfwd::PortMapping;
use engine::state::{ContainerRecord, Status};
use guest_agent::runtime::Process;

use crate::error::{bad_input, from_engine};
use crate::output::table;

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
    /// Accepted for docker compatibility; there are no terminals, so output is not a tty.
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

/// Flags of `mvm pause` and `mvm unpause`.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// Container names or ids (VM containers).
    #[arg(required = true)]
    pub names: Vec<String>,
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

/// `mvm ps`.
pub fn ps(root: &Path, args: &PsArgs) -> anyhow::Result<i32> {
    let shown: Vec<_> = lifecycle::list(root)
        .map_err(from_engine)?
        .into_iter()
        .filter(|r| args.all || r.live_status() == Status::Running)
        .collect();
    if args.quiet {
        for r in &shown {
            outln!("{}", short_id(&r.id));
        }
    } else {
        print!("{}", ps_table(&shown, engine::state::now()));
    }
    Ok(0)
}

fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn status_text(r: &ContainerRecord) -> String {
    match (r.live_status(), r.exit_code) {
        (Status::Created, _) => "created".into(),
        (Status::Running, _) if r.paused => "paused".into(),
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

/// The `ps` table: ID NAME IMAGE STATUS PORTS UPTIME.
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
    table(&rows)
}

/// `mvm logs`.
pub fn logs(root: &Path, args: &LogsArgs) -> anyhow::Result<i32> {
    let mut out = std::io::stdout().lock();
    lifecycle::logs(root, &args.name, args.follow, &mut out).map_err(from_engine)?;
    Ok(0)
}

/// `mvm exec`: runs a command in the running container; returns its exit code.
pub fn exec(root: &Path, args: &ExecArgs) -> anyhow::Result<i32> {
    if args.tty {
        log::warn!("exec -t: there are no terminals; running without one");
    }
    let process = Process {
        args: args.command.clone(),
        env: args.env.clone(),
        cwd: args.workdir.clone().unwrap_or_else(|| "/".into()),
        user: args.user.clone(),
    };
    lifecycle::exec(root, &args.name, process, args.interactive).map_err(from_engine)
}

/// `mvm stop`.
pub fn stop(root: &Path, args: &StopArgs) -> anyhow::Result<i32> {
    lifecycle::stop(root, &args.name, Duration::from_secs(args.time)).map_err(from_engine)?;
    outln!("{}", args.name);
    Ok(0)
}

/// `mvm pause` (`paused`) and `mvm unpause`: stops or resumes each container's vCPUs.
pub fn pause(root: &Path, args: &PauseArgs, paused: bool) -> anyhow::Result<i32> {
    for name in &args.names {
        lifecycle::pause(root, name, paused).map_err(from_engine)?;
        outln!("{name}");
    }
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
    lifecycle::kill(root, &args.name, sig).map_err(from_engine)?;
    outln!("{}", args.name);
    Ok(0)
}

/// `mvm rm`.
pub fn rm(root: &Path, args: &RmArgs) -> anyhow::Result<i32> {
    lifecycle::remove(root, &args.name, args.force).map_err(from_engine)?;
    outln!("{}", args.name);
    Ok(0)
}

/// `mvm inspect`: the record as JSON, with the status as seen now.
pub fn inspect(root: &Path, args: &InspectArgs) -> anyhow::Result<i32> {
    let r = lifecycle::inspect(root, &args.name).map_err(from_engine)?;
    outln!("{}", serde_json::to_string_pretty(&r)?);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::spec::Isolation;
    use engine::state::{new_id, now, process_start_time, StateError, StateStore};

    fn record(name: &str, status: Status, pid: Option<i32>) -> ContainerRecord {
        let mut r = ContainerRecord::new(
            format!("abcdef012345{}", &new_id()[..4]),
            name.into(),
            "nginx".into(),
            Isolation::Vm,
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
        assert!(!lifecycle::is_live(&r));
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
            assert!(e.chain().any(|c| c.is::<crate::error::BadInput>()), "{e:#}");
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
