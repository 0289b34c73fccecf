//! The protocol server: accepts connections (vsock in the guest, a Unix socket on the host) and
//! runs containers for them with [`crate::runtime`].
//!
//! Each connection is served by its own thread, one request at a time. A process started by a
//! connection streams its stdout/stderr to that connection as frames; when it exits, the agent
//! sends every remaining output frame, then [`Event::Exited`]. If the connection goes away, the
//! output is drained and dropped so the process never blocks on a full pipe.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

use crate::protocol::{
    Event, Frame, FrameKind, ProcessSpec, ProtocolError, Request, Response, StdioMode,
    PROTOCOL_VERSION,
};
use crate::runtime::exec::{exec, ExecSpec};
use crate::runtime::{Container, ContainerSpec, StdioConfig, StdioMode as ProtoStdio};

use super::vsock::{VsockListener, VsockStream};

/// A bidirectional byte stream the agent serves.
pub trait Conn: Read + Write + Send + 'static {
    /// A second handle on the same connection, for the writer side.
    fn clone_conn(&self) -> io::Result<Box<dyn Conn>>;
}

impl Conn for UnixStream {
    fn clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Conn for VsockStream {
    fn clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
}

/// Where connections come from.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket (the agent on the host).
    Unix(UnixListener),
    /// A vsock port (the agent in the guest).
    Vsock(VsockListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Box<dyn Conn>> {
        Ok(match self {
            Listener::Unix(l) => Box::new(l.accept()?.0),
            Listener::Vsock(l) => Box::new(l.accept()?),
        })
    }
}

type Writer = Arc<Mutex<Option<Box<dyn Conn>>>>;

/// Pids of the processes the agent waits for itself. Held while a container starts, so the
/// orphan reaper never reaps a child whose pid is not yet recorded.
static MANAGED: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Reaps exited children that no container thread waits for (the agent as PID 1 inherits
/// orphans). Returns how many were reaped.
pub fn reap_orphans() -> usize {
    let managed = lock(&MANAGED);
    super::init::reap_unmanaged(&|pid| managed.contains(&pid)).len()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends a frame; a connection that fails is dropped so later sends are no-ops.
fn send(writer: &Writer, frame: &Frame) {
    let mut w = lock(writer);
    if let Some(conn) = w.as_mut() {
        if frame.write_to(conn).is_err() {
            *w = None;
        }
    }
}

#[derive(Debug, Default)]
struct ExitSlot {
    code: Mutex<Option<i32>>,
    done: Condvar,
}

impl ExitSlot {
    fn set(&self, code: i32) {
        *lock(&self.code) = Some(code);
        self.done.notify_all();
    }

    fn wait(&self) -> i32 {
        let mut code = lock(&self.code);
        loop {
            if let Some(c) = *code {
                return c;
            }
            code = self.done.wait(code).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[derive(Debug)]
struct Process {
    pid: i32,
    stdin: Option<File>,
    exit: Arc<ExitSlot>,
}

#[derive(Debug)]
struct Entry {
    spec: ContainerSpec,
    next_stream: u32,
    processes: HashMap<u32, Process>,
    cgroup_dirs: Vec<PathBuf>,
}

/// What the agent does once a shutdown request has been answered (the guest powers off).
type ShutdownHook = Box<dyn FnOnce() + Send>;

/// The agent's state: its containers.
#[derive(Default)]
pub struct Agent {
    containers: Mutex<HashMap<String, Entry>>,
    stopping: AtomicBool,
    on_shutdown: Mutex<Option<ShutdownHook>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("containers", &lock(&self.containers).len())
            .field("stopping", &self.stopping)
            .finish_non_exhaustive()
    }
}

/// What a connection's request loop should do next.
enum Next {
    Continue,
    Stop,
}

impl Agent {
    /// A new agent with no containers.
    pub fn new() -> Arc<Self> {
        Arc::new(Agent::default())
    }

    /// Runs `hook` on the session thread right after a shutdown request was answered and every
    /// container killed (the accept loop of a vsock listener cannot be woken; in the guest the
    /// hook powers the VM off).
    pub fn on_shutdown(&self, hook: impl FnOnce() + Send + 'static) {
        *lock(&self.on_shutdown) = Some(Box::new(hook));
    }

    /// Serves connections until a [`Request::Shutdown`] arrives; then every container is killed.
    pub fn serve(self: &Arc<Self>, listener: Listener) -> io::Result<()> {
        while !self.stopping.load(Ordering::SeqCst) {
            let conn = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let agent = self.clone();
            let wake = match &listener {
                Listener::Unix(l) => l
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(PathBuf::from)),
                Listener::Vsock(_) => None,
            };
            thread::spawn(move || {
                if let Err(e) = agent.session(conn) {
                    log::debug!("agent session ended: {e}");
                }
                // A shutdown request must also end the accept loop blocked in another thread.
                if agent.stopping.load(Ordering::SeqCst) {
                    let hook = lock(&agent.on_shutdown).take();
                    if let Some(hook) = hook {
                        hook();
                    }
                    if let Some(path) = wake {
                        let _ = UnixStream::connect(path);
                    }
                }
            });
        }
        self.kill_all();
        Ok(())
    }

    fn session(self: &Arc<Self>, mut conn: Box<dyn Conn>) -> Result<(), ProtocolError> {
        let writer: Writer = Arc::new(Mutex::new(Some(
            conn.clone_conn().map_err(ProtocolError::Io)?,
        )));
        // The session must open with Hello.
        let first = Frame::read_from(&mut conn)?;
        let hello = match (first.kind, first.parse::<Request>()) {
            (FrameKind::Request, Ok(Request::Hello { version })) => version,
            _ => {
                reply(&writer, &error("the session must start with hello"));
                return Ok(());
            }
        };
        if hello != PROTOCOL_VERSION {
            reply(
                &writer,
                &error(&format!(
                    "protocol version {hello} is not supported (agent speaks {PROTOCOL_VERSION})"
                )),
            );
            return Ok(());
        }
        reply(
            &writer,
            &Response::Hello {
                version: PROTOCOL_VERSION,
                agent: env!("CARGO_PKG_VERSION").to_string(),
            },
        );
        loop {
            let frame = Frame::read_from(&mut conn)?;
            match frame.kind {
                FrameKind::Request => {
                    let response = match frame.parse::<Request>() {
                        Ok(req) => {
                            let (resp, next) = self.handle(req, &writer);
                            reply(&writer, &resp);
                            if matches!(next, Next::Stop) {
                                return Ok(());
                            }
                            continue;
                        }
                        Err(e) => error(&format!("malformed request: {e}")),
                    };
                    reply(&writer, &response);
                }
                FrameKind::Stdin => self.feed_stdin(frame.stream, &frame.payload),
                other => return Err(ProtocolError::Unexpected(other)),
            }
        }
    }

    fn handle(self: &Arc<Self>, req: Request, writer: &Writer) -> (Response, Next) {
        log::debug!("request: {req:?}");
        let resp = match req {
            Request::Hello { .. } => error("hello was already sent"),
            Request::Create { id, spec } => self.create(id, spec),
            Request::Start { id } => self.start(&id, writer),
            Request::Exec { id, process } => self.exec(&id, process, writer),
            Request::Signal { id, stream, signal } => self.signal(&id, stream, signal),
            Request::Wait { id, stream } => self.wait(&id, stream),
            Request::Stats { id } => self.stats(&id),
            Request::Shutdown => {
                self.stopping.store(true, Ordering::SeqCst);
                self.kill_all();
                return (Response::Ok, Next::Stop);
            }
        };
        (resp, Next::Continue)
    }

    fn create(&self, id: String, spec: serde_json::Value) -> Response {
        let mut spec: ContainerSpec = match serde_json::from_value(spec) {
            Ok(s) => s,
            Err(e) => return error(&format!("invalid container spec: {e}")),
        };
        spec.id.clone_from(&id);
        if let crate::runtime::Rootfs::Overlay { upper, work, .. } = &spec.rootfs {
            // Fresh upper and work directories (on the guest's tmpfs in a VM).
            for dir in [upper, work] {
                if let Err(e) = fs::create_dir_all(dir) {
                    return error(&format!("cannot create {}: {e}", dir.display()));
                }
            }
        }
        if let Err(e) = spec.validate() {
            return error(&e.to_string());
        }
        let mut containers = lock(&self.containers);
        if containers.contains_key(&id) {
            return error(&format!("container {id} already exists"));
        }
        containers.insert(
            id,
            Entry {
                spec,
                next_stream: 2,
                processes: HashMap::new(),
                cgroup_dirs: Vec::new(),
            },
        );
        Response::Ok
    }

    fn start(&self, id: &str, writer: &Writer) -> Response {
        let spec = match lock(&self.containers).get(id) {
            Some(e) if e.processes.contains_key(&1) => {
                return error(&format!("container {id} was already started"))
            }
            Some(e) => e.spec.clone(),
            None => return error(&format!("no such container: {id}")),
        };
        let stdio = StdioConfig::piped();
        let mut managed = lock(&MANAGED);
        let mut container = match Container::start(&spec, &stdio) {
            Ok(c) => c,
            Err(e) => return error(&e.to_string()),
        };
        let pid = container.pid();
        managed.push(pid);
        drop(managed);
        let exit = Arc::new(ExitSlot::default());
        let pumps = [
            container
                .take_stdout()
                .map(|f| pump(f, FrameKind::Stdout, 1, writer.clone())),
            container
                .take_stderr()
                .map(|f| pump(f, FrameKind::Stderr, 1, writer.clone())),
        ];
        let cgroup_dirs = container
            .cgroup()
            .map(|c| c.dirs().to_vec())
            .unwrap_or_default();
        if let Some(e) = lock(&self.containers).get_mut(id) {
            e.cgroup_dirs = cgroup_dirs;
            e.processes.insert(
                1,
                Process {
                    pid,
                    stdin: container.take_stdin(),
                    exit: exit.clone(),
                },
            );
        }
        let (id, writer) = (id.to_string(), writer.clone());
        thread::spawn(move || {
            let code = match container.wait() {
                Ok(e) => {
                    if e.oom_killed {
                        let msg = b"mvm: the container was killed: out of memory (memory limit reached)\n";
                        send(
                            &writer,
                            &Frame {
                                kind: FrameKind::Stderr,
                                stream: 1,
                                payload: msg.to_vec(),
                            },
                        );
                    }
                    e.code
                }
                Err(e) => {
                    log::warn!("waiting for container {id}: {e}");
                    255
                }
            };
            lock(&MANAGED).retain(|p| *p != pid);
            for p in pumps.into_iter().flatten() {
                let _ = p.join();
            }
            exit.set(code);
            if let Ok(f) = Frame::json(
                FrameKind::Event,
                &Event::Exited {
                    id,
                    stream: 1,
                    code,
                },
            ) {
                send(&writer, &f);
            }
        });
        Response::Started { stream: 1, pid }
    }

    fn exec(&self, id: &str, process: ProcessSpec, writer: &Writer) -> Response {
        let (container_pid, cgroup_dirs, mut env, stream) = {
            let mut containers = lock(&self.containers);
            let Some(entry) = containers.get_mut(id) else {
                return error(&format!("no such container: {id}"));
            };
            let pid = match entry.processes.get(&1) {
                Some(p) if lock(&p.exit.code).is_none() => p.pid,
                _ => return error(&format!("container {id} is not running")),
            };
            let stream = entry.next_stream;
            entry.next_stream += 1;
            (
                pid,
                entry.cgroup_dirs.clone(),
                entry.spec.env.clone(),
                stream,
            )
        };
        // The process's variables override the container's.
        for var in &process.env {
            let key = var.split('=').next().unwrap_or_default();
            env.retain(|e| e.split('=').next() != Some(key));
            env.push(var.clone());
        }
        let spec = ExecSpec {
            args: process.args,
            env,
            cwd: process.cwd,
            user: process.user,
        };
        let (out, stdin) = match process.stdio {
            StdioMode::Stream => (ProtoStdio::Piped, process.stdin),
            StdioMode::Null => (ProtoStdio::Null, false),
        };
        let stdio = StdioConfig {
            stdin: if stdin {
                ProtoStdio::Piped
            } else {
                ProtoStdio::Null
            },
            stdout: out,
            stderr: out,
        };
        let managed = lock(&MANAGED);
        let mut child = match exec(container_pid, &cgroup_dirs, &spec, &stdio) {
            Ok(c) => c,
            Err(e) => return error(&e.to_string()),
        };
        let pid = child.pid();
        drop(managed);
        lock(&MANAGED).push(pid);
        let exit = Arc::new(ExitSlot::default());
        let pumps = [
            child
                .stdout
                .take()
                .map(|f| pump(f, FrameKind::Stdout, stream, writer.clone())),
            child
                .stderr
                .take()
                .map(|f| pump(f, FrameKind::Stderr, stream, writer.clone())),
        ];
        if let Some(e) = lock(&self.containers).get_mut(id) {
            e.processes.insert(
                stream,
                Process {
                    pid,
                    stdin: child.stdin.take(),
                    exit: exit.clone(),
                },
            );
        }
        let (id, writer) = (id.to_string(), writer.clone());
        thread::spawn(move || {
            let code = child.wait().unwrap_or(255);
            lock(&MANAGED).retain(|p| *p != pid);
            for p in pumps.into_iter().flatten() {
                let _ = p.join();
            }
            exit.set(code);
            if let Ok(f) = Frame::json(FrameKind::Event, &Event::Exited { id, stream, code }) {
                send(&writer, &f);
            }
        });
        Response::Started { stream, pid }
    }

    fn process<T>(
        &self,
        id: &str,
        stream: u32,
        f: impl FnOnce(&mut Process) -> T,
    ) -> Result<T, Response> {
        let mut containers = lock(&self.containers);
        let entry = containers
            .get_mut(id)
            .ok_or_else(|| error(&format!("no such container: {id}")))?;
        let p = entry
            .processes
            .get_mut(&stream)
            .ok_or_else(|| error(&format!("container {id} has no process {stream}")))?;
        Ok(f(p))
    }

    fn signal(&self, id: &str, stream: u32, signal: i32) -> Response {
        let pid = match self.process(id, stream, |p| (p.pid, p.exit.clone())) {
            Ok((pid, exit)) if lock(&exit.code).is_none() => pid,
            Ok(_) => return Response::Ok,
            Err(r) => return r,
        };
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child, so it cannot
        // have been reused.
        if unsafe { libc::kill(pid, signal) } < 0 {
            return error(&format!("signal {signal}: {}", io::Error::last_os_error()));
        }
        Response::Ok
    }

    fn wait(&self, id: &str, stream: u32) -> Response {
        match self.process(id, stream, |p| p.exit.clone()) {
            Ok(exit) => Response::Exited {
                stream,
                code: exit.wait(),
            },
            Err(r) => r,
        }
    }

    fn stats(&self, id: &str) -> Response {
        let dirs = match lock(&self.containers).get(id) {
            Some(e) => e.cgroup_dirs.clone(),
            None => return error(&format!("no such container: {id}")),
        };
        let read = |names: &[&str]| -> Option<String> {
            dirs.iter()
                .flat_map(|d| names.iter().map(move |n| d.join(n)))
                .find_map(|p| fs::read_to_string(p).ok())
        };
        let num = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
        let memory_bytes = num(read(&["memory.current", "memory.usage_in_bytes"]));
        let pids = num(read(&["pids.current"]));
        let cpu_usec = match read(&["cpu.stat"]) {
            Some(stat) if stat.contains("usage_usec") => stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0),
            _ => num(read(&["cpuacct.usage"])) / 1000,
        };
        Response::Stats {
            memory_bytes,
            cpu_usec,
            pids,
        }
    }

    fn feed_stdin(&self, stream: u32, data: &[u8]) {
        let mut containers = lock(&self.containers);
        for entry in containers.values_mut() {
            if let Some(p) = entry.processes.get_mut(&stream) {
                if data.is_empty() {
                    p.stdin = None; // closing our end gives the process end-of-file
                } else if let Some(stdin) = p.stdin.as_mut() {
                    if stdin.write_all(data).is_err() {
                        p.stdin = None;
                    }
                }
            }
        }
    }

    fn kill_all(&self) {
        let exits: Vec<_> = {
            let containers = lock(&self.containers);
            containers
                .values()
                .flat_map(|e| e.processes.values())
                .map(|p| (p.pid, p.exit.clone()))
                .collect()
        };
        for (pid, exit) in exits {
            if lock(&exit.code).is_none() {
                // SAFETY: kill has no memory preconditions; the pid is an unreaped child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                exit.wait();
            }
        }
    }
}

fn error(message: &str) -> Response {
    Response::Error {
        message: message.to_string(),
    }
}

fn reply(writer: &Writer, response: &Response) {
    if let Ok(f) = Frame::json(FrameKind::Response, response) {
        send(writer, &f);
    }
}

/// Copies a process's output pipe into frames until end-of-file.
fn pump(mut pipe: File, kind: FrameKind, stream: u32, writer: Writer) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => send(
                    &writer,
                    &Frame {
                        kind,
                        stream,
                        payload: buf[..n].to_vec(),
                    },
                ),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}
