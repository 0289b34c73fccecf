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

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use guest_agent::agent::client::{AgentClient, ClientError, InheritOutput};
use guest_agent::guest::{MAIN_CONTAINER, MAIN_STREAM};
use guest_agent::protocol::AGENT_VSOCK_PORT;
use guest_agent::runtime::{self, Process, StdioConfig, StdioMode};

use crate::control::{self, ControlError, Request};
use crate::error::{bad_input, io_error, CommandExit, Error};
use crate::logs::{read_log, LogCursor, LOG_FILE};
use crate::microvm::AgentInput;
use crate::portfwd::PortMapping;
use crate::spec::Isolation;
use crate::state::{process_alive, ContainerRecord, StateError, StateStore, Status};
use crate::terminal::{self, DetachKeys, InputRelay, PipeInput, PtyInput, RawMode, TerminalInput};

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
    matches!(
        r.live_status(),
        Status::Running | Status::Restarting | Status::Created
    )
}

pub(crate) fn require_running(r: &ContainerRecord) -> Result<(), Error> {
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
pub(crate) fn agent(
    store: &StateStore,
    r: &ContainerRecord,
) -> Result<AgentClient<UnixStream>, Error> {
    let vsock = store.container_dir(&r.id).join("vsock.sock");
    let conn =
        devices::virtio::vsock::host_connect(&vsock, AGENT_VSOCK_PORT, Duration::from_secs(10))
            .map_err(|e| Error::AgentUnreachable(r.name.clone(), e))?;
    AgentClient::open(conn).map_err(|source| Error::Agent {
        what: format!("guest agent of {}", r.name),
        source,
    })
}

/// Copies the container's log (rotated files first) to `out`, or its last `tail` lines; with
/// `follow`, goes on until the container has exited. A reader that went away (a closed pipe)
/// ends it quietly.
pub fn logs(
    root: &Path,
    name: &str,
    follow: bool,
    tail: Option<usize>,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let (store, r) = find(root, name)?;
    let path = store.container_dir(&r.id).join(LOG_FILE);
    let mut cursor = LogCursor::default();
    let mut first = true;
    loop {
        // Whether the runner still lives is checked before reading, so the last read after it
        // ended sees everything it wrote.
        let live = follow && is_live(&store.get(&r.id).unwrap_or_else(|_| r.clone()));
        let written = match (first, tail) {
            (true, Some(n)) => {
                let mut all = Vec::new();
                read_log(&path, &mut cursor, &mut all).map_err(io_error("read", &path))?;
                out.write_all(last_lines(&all, n))
            }
            _ => read_log(&path, &mut cursor, &mut *out),
        };
        first = false;
        if written.and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
        if !live {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The last `n` lines of `data` (a last line without its newline counts).
fn last_lines(data: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let start = body
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(n - 1)
        .map_or(0, |(i, _)| i + 1);
    &data[start..]
}

/// How `exec` connects the command to the user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// This process's stdin is the command's (`-i`).
    pub interactive: bool,
    /// The command gets a terminal of its own, shown on the user's (`-t`).
    pub tty: bool,
    /// Keys that detach from the command and leave it running (`--detach-keys`, with `-it`).
    pub detach_keys: Option<DetachKeys>,
}

/// What `exec` and `attach` return when the user detached (as docker: a message, code 1).
fn detached() -> Error {
    CommandExit(1, "read escape sequence".into()).into()
}

/// Runs `process` in the running container, its output on this process's stdout and stderr (or
/// its terminal on the user's, with `tty`) and, when `interactive`, this process's stdin as its
/// stdin; returns its exit code.
pub fn exec(
    root: &Path,
    name: &str,
    process: Process,
    options: &ExecOptions,
) -> Result<i32, Error> {
    let (store, r) = find(root, name)?;
    require_running(&r)?;
    if options.tty {
        // Before any thread starts, so every thread leaves SIGWINCH to the relay.
        terminal::block_winch()?;
    }
    match r.isolation {
        Isolation::Vm => exec_in_vm(&store, &r, process, options),
        Isolation::Container => exec_in_container(&store, &r, process, options),
        Isolation::Process => Err(bad_input(format!(
            "container {} is a plain process (--isolation process): there is nothing to exec into",
            r.name
        ))),
    }
}

/// The user's terminal for an `exec -t` or `attach`: raw mode (with input), the relay of input
/// and size changes. `on_detach` ends the wait when the detach keys are typed.
/// What the detach keys do: set `flag` and shut the agent session down, which ends the wait
/// for the process (it goes on in the container).
fn detach_hook(
    client: &AgentClient<UnixStream>,
    flag: &Arc<AtomicBool>,
) -> Result<Box<dyn FnOnce() + Send>, Error> {
    let conn = client
        .conn()
        .try_clone()
        .map_err(|e| Error::System("dup the agent connection".into(), e))?;
    let flag = flag.clone();
    Ok(Box::new(move || {
        flag.store(true, Ordering::SeqCst);
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }))
}

fn show_terminal(
    input: Box<dyn TerminalInput>,
    options: &ExecOptions,
    on_detach: Box<dyn FnOnce() + Send>,
) -> Result<(InputRelay, Option<RawMode>), Error> {
    let raw = if options.tty && options.interactive {
        RawMode::enter()?
    } else {
        None
    };
    let detach = if options.tty {
        options.detach_keys.clone()
    } else {
        None
    };
    let relay = InputRelay::start(input, options.interactive, detach, on_detach)?;
    Ok((relay, raw))
}

fn exec_in_vm(
    store: &StateStore,
    r: &ContainerRecord,
    process: Process,
    options: &ExecOptions,
) -> Result<i32, Error> {
    let mut client = agent(store, r)?;
    let size = options.tty.then(|| terminal::size().unwrap_or_default());
    let stream = match client.exec(MAIN_CONTAINER, process, options.interactive, size) {
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
    let detached_flag = Arc::new(AtomicBool::new(false));
    let (relay, raw) = if options.interactive || options.tty {
        let vsock = store.container_dir(&r.id).join("vsock.sock");
        let input = AgentInput::connect(&vsock, stream)?;
        let on_detach = detach_hook(&client, &detached_flag)?;
        let (relay, raw) = show_terminal(Box::new(input), options, on_detach)?;
        (Some(relay), raw)
    } else {
        (None, None)
    };
    let result = client.stream_until_exit(stream, &mut InheritOutput);
    drop(relay);
    drop(raw);
    if detached_flag.load(Ordering::SeqCst) {
        return Err(detached());
    }
    result.map_err(|source| Error::Agent {
        what: format!("exec in {}: the session broke", r.name),
        source,
    })
}

/// The first process of a container on the host, while its runner (whose child it is) lives.
pub(crate) fn host_process(r: &ContainerRecord) -> Option<i32> {
    let runner = r.pid?;
    r.process_pid.filter(|_| process_alive(runner, r.pid_start))
}

fn exec_in_container(
    store: &StateStore,
    r: &ContainerRecord,
    process: Process,
    options: &ExecOptions,
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
    let stdio = if options.tty {
        StdioConfig::terminal(terminal::size().unwrap_or_default())
    } else {
        StdioConfig {
            stdin: if options.interactive {
                StdioMode::Piped
            } else {
                StdioMode::Null
            },
            stdout: StdioMode::Inherit,
            stderr: StdioMode::Inherit,
            terminal: None,
        }
    };
    let spec = crate::runner::read_spec(&store.container_dir(&r.id))?;
    let mut child = runtime::exec::exec(pid, &r.cgroup_dirs, &process, &spec.security, &stdio)?;
    let detached_flag = Arc::new(AtomicBool::new(false));
    let flag = detached_flag.clone();
    let on_detach = Box::new(move || flag.store(true, Ordering::SeqCst));
    let mut output = None;
    let (relay, raw) = match child.terminal.take() {
        Some(master) => {
            let mut from = master
                .try_clone()
                .map_err(|e| Error::System("dup the terminal".into(), e))?;
            output = Some(thread::spawn(move || {
                // Ends with EIO once the command and everything holding its terminal are gone.
                let _ = std::io::copy(&mut from, &mut TerminalOut);
            }));
            // mvm holds the only master: detaching would hang the command up, so there are no
            // detach keys here (a VM's agent keeps its terminal).
            let options = ExecOptions {
                detach_keys: None,
                ..options.clone()
            };
            let (relay, raw) = show_terminal(Box::new(PtyInput(master)), &options, on_detach)?;
            (Some(relay), raw)
        }
        None => match child.stdin.take() {
            Some(stdin) => (
                Some(InputRelay::start(
                    Box::new(PipeInput(Some(stdin))),
                    true,
                    None,
                    on_detach,
                )?),
                None,
            ),
            None => (None, None),
        },
    };
    let code = loop {
        if detached_flag.load(Ordering::SeqCst) {
            break None;
        }
        if let Some(code) = child.try_wait()? {
            break Some(code);
        }
        thread::sleep(Duration::from_millis(20));
    };
    drop(relay);
    if let (Some(out), Some(_)) = (output, code) {
        let _ = out.join();
    }
    drop(raw);
    code.ok_or_else(detached)
}

/// Shows the output of a running container's first process here and, unless `no_stdin`, feeds
/// it this terminal's input (`mvm attach`); returns its exit code, or the detach error when the
/// detach keys were typed (the container goes on).
pub fn attach(
    root: &Path,
    name: &str,
    detach_keys: Option<DetachKeys>,
    no_stdin: bool,
) -> Result<i32, Error> {
    let (store, r) = find(root, name)?;
    require_running(&r)?;
    let spec = crate::runner::read_spec(&store.container_dir(&r.id))?;
    let options = ExecOptions {
        interactive: spec.interactive && !no_stdin,
        tty: spec.tty,
        detach_keys,
    };
    if options.tty {
        terminal::block_winch()?;
    }
    match r.isolation {
        Isolation::Vm => attach_vm(&store, &r, &options),
        _ => Err(bad_input(format!(
            "container {} runs on the host: attach works with containers in a microVM for now \
             (use mvm logs -f and mvm exec -it)",
            r.name
        ))),
    }
}

fn attach_vm(store: &StateStore, r: &ContainerRecord, options: &ExecOptions) -> Result<i32, Error> {
    let mut client = agent(store, r)?;
    client
        .attach(MAIN_CONTAINER, MAIN_STREAM)
        .map_err(|source| Error::Agent {
            what: format!("attach to {}", r.name),
            source,
        })?;
    let detached_flag = Arc::new(AtomicBool::new(false));
    let vsock = store.container_dir(&r.id).join("vsock.sock");
    let mut input = AgentInput::connect(&vsock, MAIN_STREAM)?;
    if options.tty {
        // Its terminal takes this one's size now (as after a resize).
        if let Some(size) = terminal::size() {
            let _ = input.resize(size);
        }
    }
    let on_detach = detach_hook(&client, &detached_flag)?;
    let (relay, raw) = show_terminal(Box::new(input), options, on_detach)?;
    let result = client.stream_until_exit(MAIN_STREAM, &mut InheritOutput);
    drop(relay);
    drop(raw);
    if detached_flag.load(Ordering::SeqCst) {
        return Err(detached());
    }
    result.map_err(|source| Error::Agent {
        what: format!("attach to {}: the session broke", r.name),
        source,
    })
}

/// This process's stdout, flushed after every write (a terminal's output as it comes).
struct TerminalOut;

impl Write for TerminalOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
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
    // Its runner does not restart it (`--restart`) once it ends.
    store.update(&r.id, |r| r.stopped_by_user = true)?;
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

/// Waits until the container has exited (`mvm wait`); returns its exit code (None when its
/// runner died without recording one).
pub fn wait(root: &Path, name: &str) -> Result<Option<i32>, Error> {
    let (store, r) = find(root, name)?;
    loop {
        let now = match store.load(&r.id) {
            Ok(now) => now,
            // Removed meanwhile (`--rm`): its code went with it.
            Err(_) => return Ok(None),
        };
        if !is_live(&now) {
            return Ok(now.exit_code);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The container's published ports (`mvm port`).
pub fn ports(root: &Path, name: &str) -> Result<Vec<PortMapping>, Error> {
    let (_, r) = find(root, name)?;
    Ok(r.ports.iter().filter_map(|p| p.parse().ok()).collect())
}

/// Gives the container a new name (`mvm rename`), running or not.
pub fn rename(root: &Path, name: &str, new: &str) -> Result<(), Error> {
    let (store, r) = find(root, name)?;
    store.rename(&r, new).map_err(|e| match e {
        StateError::InvalidName(e) => bad_input(e.to_string()),
        e => e.into(),
    })
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
    use crate::state::testing::record;

    #[test]
    fn a_running_record_whose_runner_died_is_not_live() {
        let r = record("web", Status::Running, Some(i32::MAX));
        assert!(!is_live(&r));
        assert!(require_running(&r).is_err());
        assert!(wait_gone(&r, Duration::ZERO));
        assert_eq!(host_process(&r), None);
    }

    #[test]
    fn the_tail_is_the_last_lines() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 1), b"c");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\n", 0), b"");
    }

    #[test]
    fn a_process_record_has_nothing_to_exec_into() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let me = i32::try_from(std::process::id()).ok();
        let mut r = record("plain", Status::Running, me);
        r.isolation = Isolation::Process;
        store.create(&r).unwrap();
        let e = exec(
            root.path(),
            "plain",
            Process::default(),
            &ExecOptions::default(),
        )
        .unwrap_err();
        assert!(e.is_bad_input(), "{e}");
        assert!(e.to_string().contains("nothing to exec into"), "{e}");
    }
}
