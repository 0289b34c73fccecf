//! What can be done to a registered container from any shell, whatever its isolation: list,
//! logs, exec, stop, kill, remove and inspect (see [`crate::state`] and [`crate::runner`]).
//!
//! - `stop` and `kill` ask the process that owns the run through its control socket
//!   (`<dir>/control.sock`, [`crate::control`]): it signals the container's first process (in a
//!   VM through the agent) and, for `stop`, ends the run after the grace period. A run without
//!   a control socket (one that never got to serve it) is stopped and signalled directly: a VM's
//!   container through its own agent session over the VM's vsock socket, a container or process
//!   on the host through its first process (a child of the runner, named in the record).
//! - `exec` in a VM opens its own agent session (`<dir>/vsock.sock`; the agent serves several
//!   sessions); in a container it joins its namespaces and cgroup
//!   (`guest_agent::runtime::exec`). A plain process has nothing to exec into.
//!
//! When the container exits its runner records the exit code and tears down what it ran, so
//! `stop` only waits for the runner process (pid and start time from the record) to end. If the
//! run does not end, `stop` falls back to SIGTERM on the runner (which ends a VM through
//! `vmm::signals`), then SIGKILL; a runner that died without cleaning up (`kill -9`) is cleaned
//! up after by `rm`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use guest_agent::agent::client::{AgentClient, ClientError, InheritOutput};
use guest_agent::guest::{MAIN_CONTAINER, MAIN_STREAM};
use guest_agent::protocol::AGENT_VSOCK_PORT;
use guest_agent::runtime::{self, Process, StdioConfig, StdioMode};

use crate::control::{self, ControlError, Request};
use crate::error::{bad_input, io_error, CommandExit, Error};
use crate::spec::Isolation;
use crate::state::{process_alive, ContainerRecord, StateError, StateStore, Status};

/// How long `stop` waits for the runner after SIGKILL reached the container, before it stops the
/// runner itself (SIGTERM: a VM ends, the runner still records the exit).
const AFTER_KILL: Duration = Duration::from_secs(15);

/// How long a runner may take to end after SIGTERM.
const RUNNER_TERM: Duration = Duration::from_secs(30);

/// Finds a container without creating any state directory.
pub fn find(root: &Path, name: &str) -> Result<(StateStore, ContainerRecord), Error> {
    if !root.join("containers").is_dir() {
        return Err(StateError::NotFound(name.into()).into());
    }
    let store = StateStore::open(root)?;
    let record = store.get(name)?;
    Ok((store, record))
}

/// Every container, oldest first (none when nothing ever ran under `root`).
pub fn list(root: &Path) -> Result<Vec<ContainerRecord>, Error> {
    if !root.join("containers").is_dir() {
        return Ok(Vec::new());
    }
    Ok(StateStore::open(root)?.list()?)
}

/// Whether the container's runner still lives (it runs or is being set up).
pub fn is_live(r: &ContainerRecord) -> bool {
    matches!(r.live_status(), Status::Running | Status::Created)
}

fn require_running(r: &ContainerRecord) -> Result<(), Error> {
    if r.live_status() != Status::Running {
        Err(bad_input(format!("container {} is not running", r.name)))
    } else if r.paused {
        Err(bad_input(format!(
            "container {} is paused: `mvm unpause {}` first",
            r.name, r.name
        )))
    } else {
        Ok(())
    }
}

/// Stops (`paused`) or resumes the vCPUs of a VM container; its memory and devices stay.
pub fn pause(root: &Path, name: &str, paused: bool) -> Result<(), Error> {
    let (store, r) = find(root, name)?;
    if r.live_status() != Status::Running {
        return Err(bad_input(format!("container {} is not running", r.name)));
    }
    if r.isolation != Isolation::Vm {
        return Err(bad_input(format!(
            "container {} is not a VM: only --isolation vm containers can be paused",
            r.name
        )));
    }
    if r.paused == paused {
        let state = if paused { "paused" } else { "not paused" };
        return Err(bad_input(format!("container {} is {state}", r.name)));
    }
    let request = if paused {
        Request::Pause
    } else {
        Request::Unpause
    };
    // The VMM (jailed: it cannot write the record) answers once its vCPUs are parked or run
    // again; the record says so from then on (its runner's exit record clears it).
    let path = store.container_dir(&r.id).join(control::SOCKET);
    control::call(&path, &request).map_err(|e| match e {
        ControlError::Refused(msg) => Error::Failed(format!("{}: {msg}", r.name)),
        e => Error::Failed(format!("{}: {e}", r.name)),
    })?;
    let mut record = store.load(&r.id)?;
    record.paused = paused;
    Ok(store.save(&record)?)
}

/// A new agent session with the container's VM.
fn agent(store: &StateStore, r: &ContainerRecord) -> Result<AgentClient<UnixStream>, Error> {
    let vsock = store.container_dir(&r.id).join("vsock.sock");
    let conn =
        devices::virtio::vsock::host_connect(&vsock, AGENT_VSOCK_PORT, Duration::from_secs(10))
            .map_err(|e| Error::AgentUnreachable(r.name.clone(), e))?;
    AgentClient::open(conn).map_err(|source| Error::Agent {
        what: format!("guest agent of {}", r.name),
        source,
    })
}

/// Copies the container's log to `out`; with `follow`, goes on until the container has exited.
/// A reader that went away (a closed pipe) ends it quietly.
pub fn logs(root: &Path, name: &str, follow: bool, out: &mut dyn Write) -> Result<(), Error> {
    let (store, r) = find(root, name)?;
    let path = store.container_dir(&r.id).join("container.log");
    let mut offset = 0u64;
    loop {
        // Whether the runner still lives is checked before reading, so the last read after it
        // ended sees everything it wrote.
        let live = follow && is_live(&store.get(&r.id).unwrap_or_else(|_| r.clone()));
        if let Ok(mut f) = std::fs::File::open(&path) {
            let mut buf = Vec::new();
            f.seek(SeekFrom::Start(offset))
                .and_then(|_| f.read_to_end(&mut buf))
                .map_err(io_error("read", &path))?;
            offset += buf.len() as u64;
            if out.write_all(&buf).and_then(|()| out.flush()).is_err() {
                return Ok(());
            }
        }
        if !live {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `process` in the running container, its output on this process's stdout and stderr and,
/// when `interactive`, this process's stdin as its stdin; returns its exit code.
pub fn exec(root: &Path, name: &str, process: Process, interactive: bool) -> Result<i32, Error> {
    let (store, r) = find(root, name)?;
    require_running(&r)?;
    match r.isolation {
        Isolation::Vm => exec_in_vm(&store, &r, process, interactive),
        Isolation::Container => exec_in_container(&store, &r, process, interactive),
        Isolation::Process => Err(bad_input(format!(
            "container {} is a plain process (--isolation process): there is nothing to exec into",
            r.name
        ))),
    }
}

fn exec_in_vm(
    store: &StateStore,
    r: &ContainerRecord,
    process: Process,
    interactive: bool,
) -> Result<i32, Error> {
    let mut client = agent(store, r)?;
    let stream = match client.exec(MAIN_CONTAINER, process, interactive) {
        Ok(s) => s,
        // As docker: 127 for a command that is not there, 126 for one that cannot run.
        Err(ClientError::Refused(msg)) => {
            let code = if msg.contains("not found") { 127 } else { 126 };
            return Err(CommandExit(code, msg).into());
        }
        Err(source) => {
            return Err(Error::Agent {
                what: format!("exec in {}", r.name),
                source,
            })
        }
    };
    if interactive {
        crate::microvm::forward_stdin(&store.container_dir(&r.id).join("vsock.sock"), stream);
    }
    client
        .stream_until_exit(stream, &mut InheritOutput)
        .map_err(|source| Error::Agent {
            what: format!("exec in {}: the session broke", r.name),
            source,
        })
}

/// The first process of a container on the host, while its runner (whose child it is) lives.
fn host_process(r: &ContainerRecord) -> Option<i32> {
    let runner = r.pid?;
    r.process_pid.filter(|_| process_alive(runner, r.pid_start))
}

fn exec_in_container(
    store: &StateStore,
    r: &ContainerRecord,
    process: Process,
    interactive: bool,
) -> Result<i32, Error> {
    let pid =
        host_process(r).ok_or_else(|| bad_input(format!("container {} is not running", r.name)))?;
    // The container's environment (its first process's), with the process's own on top.
    let environ = std::fs::read(format!("/proc/{pid}/environ"))
        .map_err(io_error("read", format!("/proc/{pid}/environ")))?;
    let mut env: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect();
    for var in &process.env {
        let key = var.split('=').next().unwrap_or_default();
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(var.clone());
    }
    let process = Process { env, ..process };
    let stdio = StdioConfig {
        stdin: if interactive {
            StdioMode::Piped
        } else {
            StdioMode::Null
        },
        stdout: StdioMode::Inherit,
        stderr: StdioMode::Inherit,
    };
    let spec = crate::runner::read_spec(&store.container_dir(&r.id))?;
    let mut child = runtime::exec::exec(pid, &r.cgroup_dirs, &process, &spec.security, &stdio)?;
    if let Some(mut stdin) = child.stdin.take() {
        thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut stdin);
        });
    }
    Ok(child.wait()?)
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

/// Sends `sig` to the first process of a container or process on the host; false if there is
/// none to signal.
fn signal_host_process(r: &ContainerRecord, sig: i32) -> bool {
    let Some(pid) = host_process(r) else {
        return false;
    };
    // SAFETY: kill has no memory preconditions; the pid is an unreaped child of the live runner.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Asks the owner of the run through its control socket; `None` when nothing answers there (the
/// caller then acts directly).
fn ask(store: &StateStore, r: &ContainerRecord, request: &Request) -> Option<Result<(), Error>> {
    let path = store.container_dir(&r.id).join(control::SOCKET);
    match control::call(&path, request) {
        Ok(_) => Some(Ok(())),
        Err(ControlError::Refused(msg)) => Some(Err(Error::Failed(format!("{}: {msg}", r.name)))),
        Err(e) => {
            log::debug!("{e}: acting directly");
            None
        }
    }
}

/// Stops a live container: SIGTERM to its first process (through the agent in a VM), SIGKILL
/// after `grace`, then SIGTERM and at last SIGKILL to the runner if it has not ended; returns
/// once it has.
fn stop_container(store: &StateStore, r: &ContainerRecord, grace: Duration) -> Result<(), Error> {
    if !is_live(r) {
        return Ok(());
    }
    // A paused guest cannot take a signal: let it run to end.
    if r.paused {
        if let Some(Err(e)) = ask(store, r, &Request::Unpause) {
            log::debug!("unpause {} to stop it: {e}", r.name);
        }
    }
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    if let Some(Ok(())) = ask(store, r, &Request::Stop { grace_ms }) {
        // The owner signals, kills and at last ends the run itself.
        if wait_gone(r, grace + control::AFTER_KILL + AFTER_KILL) {
            return Ok(());
        }
        log::warn!("{} did not stop through its control socket", r.name);
    }
    let mut client = match r.isolation {
        Isolation::Vm => agent(store, r).ok(),
        _ => None,
    };
    for (sig, wait) in [(libc::SIGTERM, grace), (libc::SIGKILL, AFTER_KILL)] {
        match client.as_mut() {
            Some(c) if r.live_status() == Status::Running => {
                if let Err(e) = c.signal(MAIN_CONTAINER, MAIN_STREAM, sig) {
                    log::debug!("signal {sig} through the agent: {e}");
                    client = None;
                    signal_runner(r, libc::SIGTERM);
                }
            }
            _ if signal_host_process(r, sig) => {}
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
        return Err(Error::Failed(format!(
            "the runner of {} (pid {:?}) does not end",
            r.name, r.pid
        )));
    }
    clean_dead(store, r);
    Ok(())
}

/// Cleans up after a runner that died without doing so: taps named in the record, and what only
/// a running container needs in its directory.
fn clean_dead(store: &StateStore, r: &ContainerRecord) {
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
    crate::confine::cgroup::remove_leftover(&r.vmm_cgroup_dirs);
    crate::runner::clean_run_dir(&store.container_dir(&r.id));
}

/// Stops the container (SIGTERM, SIGKILL after `grace`) and waits until it has ended.
pub fn stop(root: &Path, name: &str, grace: Duration) -> Result<(), Error> {
    let (store, r) = find(root, name)?;
    stop_container(&store, &r, grace)
}

/// Sends signal `sig` to the container's first process.
pub fn kill(root: &Path, name: &str, sig: i32) -> Result<(), Error> {
    let (store, r) = find(root, name)?;
    require_running(&r)?;
    if let Some(result) = ask(&store, &r, &Request::Kill { signal: sig }) {
        return result;
    }
    if r.isolation == Isolation::Vm {
        return agent(&store, &r)?
            .signal(MAIN_CONTAINER, MAIN_STREAM, sig)
            .map_err(|source| Error::Agent {
                what: format!("cannot signal {}", r.name),
                source,
            });
    }
    if signal_host_process(&r, sig) {
        Ok(())
    } else {
        Err(Error::Failed(format!("cannot signal {}", r.name)))
    }
}

/// Removes the container: its record, directory and name. A live one is refused unless
/// `force`, which stops it first (SIGKILL).
pub fn remove(root: &Path, name: &str, force: bool) -> Result<(), Error> {
    let (store, r) = find(root, name)?;
    if is_live(&r) {
        if !force {
            return Err(bad_input(format!(
                "container {} is running: stop it first or use rm -f",
                r.name
            )));
        }
        stop_container(&store, &r, Duration::ZERO)?;
    }
    // A dead runner left its files (and maybe a tap); a --rm runner removed everything.
    match store.get(&r.id) {
        Ok(r) => {
            clean_dead(&store, &r);
            store.remove(&r)?;
        }
        Err(StateError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// The record, with the status as seen now.
pub fn inspect(root: &Path, name: &str) -> Result<ContainerRecord, Error> {
    let (_, mut r) = find(root, name)?;
    r.status = r.live_status();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{new_id, process_start_time};

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

    #[test]
    fn a_running_record_whose_runner_died_is_not_live() {
        let r = record("web", Status::Running, Some(i32::MAX));
        assert!(!is_live(&r));
        assert!(require_running(&r).is_err());
        assert!(wait_gone(&r, Duration::ZERO));
        assert_eq!(host_process(&r), None);
    }

    #[test]
    fn a_process_record_has_nothing_to_exec_into() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let me = i32::try_from(std::process::id()).ok();
        let mut r = record("plain", Status::Running, me);
        r.isolation = Isolation::Process;
        store.create(&r).unwrap();
        let e = exec(root.path(), "plain", Process::default(), false).unwrap_err();
        assert!(e.is_bad_input(), "{e}");
        assert!(e.to_string().contains("nothing to exec into"), "{e}");
    }
}
