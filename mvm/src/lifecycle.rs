//! `mvm ps`, `logs`, `exec`, `stop`, `kill`, `rm` and `inspect`: flags in, the engine's
//! `engine::lifecycle` acts on the registered container (of any isolation), results printed as
//! Docker prints them.

use std::path::Path;
use std::time::Duration;

use clap::Args;
use engine::lifecycle::{self, ExecOptions};
use engine::portfwd::PortMapping;
use engine::state::{ContainerRecord, Status};
use engine::terminal::{DetachKeys, DEFAULT_DETACH_KEYS};
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
    /// Only containers that match: name=TEXT (part of the name) or status=created|running|exited;
    /// repeated keys match any of their values.
    #[arg(short = 'f', long = "filter", value_name = "KEY=VALUE")]
    pub filter: Vec<String>,
    /// `table` (default) or `json` (one object per line).
    #[arg(long, value_name = "FORMAT", default_value = "table")]
    pub format: String,
}

/// Flags of `mvm logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing new output until the container exits.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only the last N lines (`all` for everything).
    #[arg(short = 'n', long, value_name = "N")]
    pub tail: Option<String>,
    /// Container name or id.
    pub name: String,
}

/// Flags of `mvm exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Feed this terminal's stdin to the command.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the command a terminal of its own, shown on this one.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Keys that detach from the command and leave it running (with -it).
    #[arg(long, value_name = "KEYS", default_value = DEFAULT_DETACH_KEYS)]
    pub detach_keys: String,
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

/// Flags of `mvm attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Keys that detach and leave the container running.
    #[arg(long, value_name = "KEYS", default_value = DEFAULT_DETACH_KEYS)]
    pub detach_keys: String,
    /// Do not feed this terminal's input to the container.
    #[arg(long)]
    pub no_stdin: bool,
    /// Container name or id.
    pub name: String,
}

/// Flags of `mvm wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Container names or ids.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// Flags of `mvm port`.
#[derive(Debug, Args)]
pub struct PortArgs {
    /// Container name or id.
    pub name: String,
    /// Only this container port (PORT or PORT/tcp).
    pub port: Option<String>,
}

/// Flags of `mvm rename`.
#[derive(Debug, Args)]
pub struct RenameArgs {
    /// Container name or id.
    pub name: String,
    /// The new name.
    pub new_name: String,
}

/// Flags of `mvm inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Container name or id.
    pub name: String,
}

/// `mvm ps`.
pub fn ps(root: &Path, args: &PsArgs) -> anyhow::Result<i32> {
    let filter = PsFilter::parse(&args.filter).map_err(bad_input)?;
    let json = match args.format.as_str() {
        "table" => false,
        "json" => true,
        other => {
            return Err(bad_input(format!(
                "invalid --format {other:?}: use table or json"
            )))
        }
    };
    let shown: Vec<_> = lifecycle::list(root)
        .map_err(from_engine)?
        .into_iter()
        .rev()
        .filter(|r| filter.matches(r, args.all))
        .collect();
    let now = engine::state::now();
    if args.quiet {
        for r in &shown {
            outln!("{}", short_id(&r.id));
        }
    } else if json {
        for r in &shown {
            outln!("{}", ps_json(r, now));
        }
    } else {
        print!("{}", ps_table(&shown, now));
    }
    Ok(0)
}

/// `ps -f`: keys AND-ed, the values of one key OR-ed.
#[derive(Debug, Default)]
struct PsFilter {
    names: Vec<String>,
    statuses: Vec<Status>,
}

impl PsFilter {
    fn parse(filters: &[String]) -> Result<Self, String> {
        let mut f = PsFilter::default();
        for text in filters {
            match text.split_once('=') {
                Some(("name", v)) => f.names.push(v.to_string()),
                Some(("status", v)) => f.statuses.push(match v {
                    "created" => Status::Created,
                    "running" => Status::Running,
                    "restarting" => Status::Restarting,
                    "exited" => Status::Exited,
                    _ => {
                        return Err(format!(
                        "invalid filter {text:?}: status is created, running, restarting or exited"
                    ))
                    }
                }),
                _ => {
                    return Err(format!(
                        "invalid filter {text:?}: use name=TEXT or status=STATUS"
                    ))
                }
            }
        }
        Ok(f)
    }

    /// A status filter shows what it names, running or not (as docker's).
    fn matches(&self, r: &ContainerRecord, all: bool) -> bool {
        let status = r.live_status();
        let status_ok = if self.statuses.is_empty() {
            all || matches!(status, Status::Running | Status::Restarting)
        } else {
            self.statuses.contains(&status)
        };
        let name_ok =
            self.names.is_empty() || self.names.iter().any(|n| r.name.contains(n.as_str()));
        status_ok && name_ok
    }
}

fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// How long ago, as docker says it: `Less than a second`, `1 second`, `5 seconds`, `About a
/// minute`, `3 minutes`, `About an hour`, `5 hours`, `3 days`, `2 weeks`, `3 months`, `2 years`.
pub fn human_duration(secs: u64) -> String {
    let hours = (secs + 1800) / 3600;
    match secs {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        2..=59 => format!("{secs} seconds"),
        60..=119 => "About a minute".into(),
        120..=3599 => format!("{} minutes", secs / 60),
        _ if hours == 1 => "About an hour".into(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", secs / 3600 / 24 / 365),
    }
}

/// `Up 3 minutes`, `Exited (0) 2 seconds ago`, `Restarting (3) 1 second ago`, `Created`.
fn status_text(r: &ContainerRecord, now: u64) -> String {
    let ended = |word: &str, code: Option<i32>| {
        let code = code.map_or("unknown".to_string(), |c| c.to_string());
        match r.finished {
            Some(t) => format!(
                "{word} ({code}) {} ago",
                human_duration(now.saturating_sub(t))
            ),
            None => format!("{word} ({code})"),
        }
    };
    match (r.live_status(), r.exit_code) {
        (Status::Created, _) => "Created".into(),
        (Status::Running, _) => {
            let since = r.started.unwrap_or(r.created);
            let up = format!("Up {}", human_duration(now.saturating_sub(since)));
            if r.paused {
                format!("{up} (Paused)")
            } else {
                up
            }
        }
        (Status::Restarting, code) => ended("Restarting", code),
        (Status::Exited, code) => ended("Exited", code),
    }
}

fn state_text(r: &ContainerRecord) -> &'static str {
    match r.live_status() {
        Status::Created => "created",
        Status::Running if r.paused => "paused",
        Status::Running => "running",
        Status::Restarting => "restarting",
        Status::Exited => "exited",
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

/// The command, quoted and cut at 20 characters as docker shows it.
fn command_text(r: &ContainerRecord) -> String {
    let full = r.command.join(" ");
    let cut: String = full.chars().take(20).collect();
    if cut.len() < full.len() {
        format!("\"{cut}…\"")
    } else {
        format!("\"{full}\"")
    }
}

/// The `ps` table: CONTAINER ID, IMAGE, COMMAND, CREATED, STATUS, PORTS, NAMES (newest first).
fn ps_table(records: &[ContainerRecord], now: u64) -> String {
    let mut rows = vec![[
        "CONTAINER ID",
        "IMAGE",
        "COMMAND",
        "CREATED",
        "STATUS",
        "PORTS",
        "NAMES",
    ]
    .map(String::from)];
    for r in records {
        rows.push([
            short_id(&r.id).to_string(),
            r.image.clone(),
            command_text(r),
            format!("{} ago", human_duration(now.saturating_sub(r.created))),
            status_text(r, now),
            ports_text(r),
            r.name.clone(),
        ]);
    }
    table(&rows)
}

/// One container as `ps --format json` prints it (docker's keys).
fn ps_json(r: &ContainerRecord, now: u64) -> String {
    serde_json::json!({
        "ID": short_id(&r.id),
        "Names": r.name,
        "Image": r.image,
        "Command": r.command.join(" "),
        "CreatedAt": r.created,
        "RunningFor": format!("{} ago", human_duration(now.saturating_sub(r.created))),
        "Ports": ports_text(r),
        "State": state_text(r),
        "Status": status_text(r, now),
        "RestartCount": r.restart_count,
        "Isolation": r.isolation,
    })
    .to_string()
}

/// `mvm logs`.
pub fn logs(root: &Path, args: &LogsArgs) -> anyhow::Result<i32> {
    let tail = match args.tail.as_deref() {
        None | Some("all") => None,
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            bad_input(format!(
                "invalid --tail {n:?}: use a number of lines or all"
            ))
        })?),
    };
    let mut out = std::io::stdout().lock();
    lifecycle::logs(root, &args.name, args.follow, tail, &mut out).map_err(from_engine)?;
    Ok(0)
}

/// `mvm exec`: runs a command in the running container; returns its exit code.
pub fn exec(root: &Path, args: &ExecArgs) -> anyhow::Result<i32> {
    if args.tty && args.interactive && !engine::terminal::stdin_is_terminal() {
        return Err(bad_input(
            "the input device is not a TTY: drop -t, or run from a terminal",
        ));
    }
    let options = ExecOptions {
        interactive: args.interactive,
        tty: args.tty,
        detach_keys: DetachKeys::parse(&args.detach_keys).map_err(from_engine)?,
    };
    let process = Process {
        args: args.command.clone(),
        env: args.env.clone(),
        cwd: args.workdir.clone().unwrap_or_else(|| "/".into()),
        user: args.user.clone(),
    };
    lifecycle::exec(root, &args.name, process, &options).map_err(from_engine)
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

/// `mvm attach`: the container's first process on this terminal until it exits (its code) or
/// the detach keys are typed.
pub fn attach(root: &Path, args: &AttachArgs) -> anyhow::Result<i32> {
    let keys = DetachKeys::parse(&args.detach_keys).map_err(from_engine)?;
    lifecycle::attach(root, &args.name, keys, args.no_stdin).map_err(from_engine)
}

/// `mvm wait`: waits for each container to exit and prints its exit code.
pub fn wait(root: &Path, args: &WaitArgs) -> anyhow::Result<i32> {
    for name in &args.names {
        match lifecycle::wait(root, name).map_err(from_engine)? {
            Some(code) => outln!("{code}"),
            // docker's code for a container whose end it could not learn.
            None => outln!("-1"),
        }
    }
    Ok(0)
}

/// `mvm port`: `80/tcp -> 127.0.0.1:8080`, one line per published port.
pub fn port(root: &Path, args: &PortArgs) -> anyhow::Result<i32> {
    let want = match args.port.as_deref() {
        None => None,
        Some(p) => Some(
            p.trim_end_matches("/tcp")
                .parse::<u16>()
                .map_err(|_| bad_input(format!("invalid port {p:?}: use PORT or PORT/tcp")))?,
        ),
    };
    let ports = lifecycle::ports(root, &args.name).map_err(from_engine)?;
    let shown: Vec<_> = ports
        .iter()
        .filter(|m| want.is_none_or(|p| m.guest_port == p))
        .collect();
    if let (Some(p), true) = (want, shown.is_empty()) {
        return Err(bad_input(format!(
            "no public port '{p}/tcp' published for {}",
            args.name
        )));
    }
    for m in shown {
        if want.is_some() {
            outln!("{}", m.host);
        } else {
            outln!("{}/tcp -> {}", m.guest_port, m.host);
        }
    }
    Ok(0)
}

/// `mvm rename`.
pub fn rename(root: &Path, args: &RenameArgs) -> anyhow::Result<i32> {
    lifecycle::rename(root, &args.name, &args.new_name).map_err(from_engine)?;
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
    use engine::state::testing::record;
    use engine::state::{now, StateError, StateStore};

    fn me() -> Option<i32> {
        Some(i32::try_from(std::process::id()).unwrap())
    }

    #[test]
    fn ps_shows_running_and_exited_containers_like_docker() {
        let web = record("web", Status::Running, me());
        let mut old = record("old", Status::Exited, None);
        old.exit_code = Some(137);
        old.finished = Some(1000 + 300);
        old.ports.clear();
        old.command = vec!["sh".into(), "-c".into(), "sleep 1000; echo done".into()];
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
            [
                "CONTAINER ID",
                "IMAGE",
                "COMMAND",
                "CREATED",
                "STATUS",
                "PORTS",
                "NAMES"
            ]
        );
        assert_eq!(
            cols(lines[1]),
            [
                "abcdef012345",
                "nginx",
                "\"nginx\"",
                "5 minutes ago",
                "Up 5 minutes",
                "127.0.0.1:8080->80/tcp",
                "web"
            ]
        );
        assert!(
            lines[2].contains("Exited (137) 12 seconds ago"),
            "{}",
            lines[2]
        );
        assert!(
            lines[2].contains("\"sh -c sleep 1000; ec…\""),
            "{}",
            lines[2]
        );
        assert!(lines[2].ends_with("old"));
        // Columns line up.
        assert_eq!(lines[0].find("STATUS"), lines[1].find("Up 5"));
    }

    #[test]
    fn ps_filters_and_json() {
        let web = record("web-1", Status::Running, me());
        let mut old = record("old", Status::Exited, None);
        old.exit_code = Some(0);
        let by = |f: &[&str], all: bool| {
            let f = PsFilter::parse(&f.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
            [&web, &old]
                .into_iter()
                .filter(|r| f.matches(r, all))
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(by(&[], false), ["web-1"]);
        assert_eq!(by(&[], true), ["web-1", "old"]);
        assert_eq!(by(&["status=exited"], false), ["old"]);
        assert_eq!(
            by(&["status=exited", "status=running"], false),
            ["web-1", "old"]
        );
        assert_eq!(by(&["name=web"], true), ["web-1"]);
        assert!(by(&["name=web", "status=exited"], true).is_empty());
        assert!(PsFilter::parse(&["status=paused".into()]).is_err());
        assert!(PsFilter::parse(&["label=x".into()]).is_err());
        let json: serde_json::Value = serde_json::from_str(&ps_json(&web, 1000 + 61)).unwrap();
        assert_eq!(json["Names"], "web-1");
        assert_eq!(json["State"], "running");
        assert_eq!(json["Status"], "Up About a minute");
        assert_eq!(json["Ports"], "127.0.0.1:8080->80/tcp");
    }

    #[test]
    fn a_restarting_container_is_listed_with_its_last_exit_and_restarts() {
        let mut r = record("svc", Status::Restarting, me());
        (r.exit_code, r.finished, r.restart_count) = (Some(3), Some(1990), 2);
        assert_eq!(status_text(&r, 2000), "Restarting (3) 10 seconds ago");
        assert!(lifecycle::is_live(&r));
        assert!(PsFilter::parse(&[]).unwrap().matches(&r, false));
        let json: serde_json::Value = serde_json::from_str(&ps_json(&r, 2000)).unwrap();
        assert_eq!(
            (&json["State"], &json["RestartCount"]),
            (&"restarting".into(), &2.into())
        );
        // Its runner gone, it is exited.
        r.pid = Some(i32::MAX);
        assert_eq!(status_text(&r, 2000), "Exited (3) 10 seconds ago");
    }

    #[test]
    fn a_running_record_whose_runner_died_is_listed_as_exited() {
        let r = record("web", Status::Running, Some(i32::MAX));
        assert_eq!(status_text(&r, 2000), "Exited (unknown)");
        assert!(!lifecycle::is_live(&r));
    }

    #[test]
    fn durations_read_as_dockers() {
        for (secs, text) in [
            (0, "Less than a second"),
            (1, "1 second"),
            (40, "40 seconds"),
            (90, "About a minute"),
            (312, "5 minutes"),
            (3700, "About an hour"),
            (5 * 3600, "5 hours"),
            (3 * 86400, "3 days"),
            (20 * 86400, "2 weeks"),
            (100 * 86400, "3 months"),
            (800 * 86400, "2 years"),
        ] {
            assert_eq!(human_duration(secs), text, "{secs}");
        }
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
                tail: None,
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
                detach_keys: DEFAULT_DETACH_KEYS.into(),
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
