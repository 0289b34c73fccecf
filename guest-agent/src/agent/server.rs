//! The protocol server: accepts connections (vsock in the guest, a Unix socket on the host) and
//! runs containers for them with [`crate::runtime`].
//!
//! One thread serves everything through one poll loop ([`super::poll`] says why): connections,
//! the output pipes of every process, their stdin, child exits (a `SIGCHLD` signalfd) and the
//! published-port relays. Each connection's requests are answered one at a time, in order. A
//! process started by a connection streams its stdout/stderr to that connection as frames; once
//! it has exited and its pipes reached end-of-file, the agent sends [`Event::Exited`]. If the
//! connection goes away, the output is read and dropped so the process never blocks on a full
//! pipe. Output is only read while its connection has room (backpressure).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::guest::MAIN_STREAM;
use crate::protocol::{
    ClientFrame, Event, Frame, FrameKind, ProtocolError, Request, Response, Setup, HEADER_LEN,
    MAX_PAYLOAD, PROTOCOL_VERSION,
};
use crate::runtime::archive::{self, CopyJob, Owner};
use crate::runtime::exec::{exec, ExecProcess};
use crate::runtime::{stats, Container, ContainerSpec, Process, StdioConfig, StdioMode, TermSize};

use super::poll::{read_some, set_nonblocking, write_some, Poller, READ, WRITE};
use super::portfwd::{PortForwarder, PortToken};
use super::vsock::{peer_allowed, VsockListener, VsockStream, VMADDR_CID_HOST};

/// A bidirectional byte stream the agent serves.
pub trait Conn: Read + Write + AsRawFd + 'static {}

impl Conn for UnixStream {}

impl Conn for VsockStream {}

/// Where connections come from.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket (the agent on the host).
    Unix(UnixListener),
    /// A vsock port (the agent in the guest).
    Vsock(VsockListener),
}

impl Listener {
    /// The next connection; `None` for one from a peer the agent does not answer (on vsock,
    /// anything but the host: see [`VsockAddr::is_host`]), which is closed at once.
    fn accept(&self) -> io::Result<Option<Box<dyn Conn>>> {
        Ok(match self {
            Listener::Unix(l) => Some(Box::new(l.accept()?.0)),
            Listener::Vsock(l) => {
                let (stream, peer) = l.accept()?;
                if !peer_allowed(peer) {
                    log::debug!(
                        "closing an agent connection from {peer:?}: the agent answers the host \
                         (CID {VMADDR_CID_HOST}) only"
                    );
                    return Ok(None);
                }
                Some(Box::new(stream))
            }
        })
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Vsock(l) => l.as_raw_fd(),
        }
    }
}

/// Bytes waiting for a connection beyond which the agent stops reading its processes' output.
const OUT_HIGH: usize = 1 << 20;
/// Bytes waiting for a process's stdin beyond which the agent stops reading its connection.
const STDIN_HIGH: usize = 1 << 20;
/// Bytes received from a connection and not yet handled beyond which the agent stops reading
/// it: one frame of the largest size (so a whole frame always fits, and is handled before more
/// is read).
const IN_HIGH: usize = HEADER_LEN + MAX_PAYLOAD as usize;
/// Largest read from a pipe or a connection at a time.
const CHUNK: usize = 32 * 1024;
/// How long a terminal is still read after its process exited, for output a background process
/// that keeps the terminal open goes on writing (a pipe's end-of-file cannot be waited for then).
const TERMINAL_DRAIN: Duration = Duration::from_secs(1);

/// What a descriptor in the poll set is.
#[derive(Debug, Clone)]
enum Token {
    Listener,
    Session(u64),
    Stdout(u64),
    Stderr(u64),
    Stdin(u64),
    Children,
    Port(PortToken),
}

/// One connection.
struct Session {
    conn: Box<dyn Conn>,
    /// Bytes received and not yet handled: `inbuf[inpos..]` (what is handled is removed once
    /// the whole frames are, see `Server::requests`).
    inbuf: Vec<u8>,
    inpos: usize,
    /// Bytes to send.
    out: Vec<u8>,
    greeted: bool,
    /// Close once `out` is sent (a refused hello).
    closing: bool,
    /// The peer closed its end: what it sent is still handled, then the session goes.
    eof: bool,
    /// The connection failed or the peer broke the protocol: forget the session.
    dead: bool,
}

impl Session {
    fn send(&mut self, frame: &Frame) {
        if self.dead {
            return;
        }
        if let Err(e) = frame.encode_into(&mut self.out) {
            log::warn!("cannot send a frame: {e}");
        }
        self.flush();
    }

    fn reply(&mut self, response: &Response) {
        if let Ok(f) = Frame::json(FrameKind::Response, response) {
            self.send(&f);
        }
    }

    fn flush(&mut self) {
        if self.out.is_empty() || self.dead {
            return;
        }
        match write_some(&mut self.conn, &self.out) {
            Ok(n) => {
                self.out.drain(..n);
            }
            Err(e) => {
                log::debug!("agent session ended: {e}");
                self.dead = true;
            }
        }
    }

    /// Whether the bytes received and not yet handled reached [`IN_HIGH`].
    fn in_full(&self) -> bool {
        self.inbuf.len() - self.inpos >= IN_HIGH
    }

    /// Reads what has arrived, up to [`IN_HIGH`] not yet handled. End-of-file or an error ends
    /// the session.
    fn receive(&mut self) {
        let mut buf = [0u8; CHUNK];
        while !self.in_full() {
            match read_some(&mut self.conn, &mut buf) {
                Ok(Some(0)) => {
                    log::debug!("agent session ended: connection closed");
                    self.eof = true;
                    return;
                }
                Ok(Some(n)) => self.inbuf.extend_from_slice(&buf[..n]),
                Ok(None) => return,
                Err(e) => {
                    log::debug!("agent session ended: {e}");
                    self.dead = true;
                    return;
                }
            }
        }
    }
}

/// The write end of a process's stdin, with what is still to be written.
struct Stdin {
    file: File,
    buf: Vec<u8>,
    /// Close once `buf` is written (an empty stdin frame).
    close: bool,
    /// The session that sent the bytes (it is not read while `buf` is full).
    fed_by: Option<u64>,
}

enum Handle {
    Main(Container),
    Exec(ExecProcess),
}

impl Handle {
    fn pid(&self) -> i32 {
        match self {
            Handle::Main(c) => c.pid(),
            Handle::Exec(e) => e.pid(),
        }
    }
}

/// A process of a container: the first one (stream 1) or one started by `exec`.
struct Proc {
    container: String,
    stream: u32,
    /// The session its output and exit go to.
    session: Option<u64>,
    /// Sessions attached to it later (`mvm attach`): they get its output and exit too.
    watchers: Vec<u64>,
    /// The master of its terminal (`-t`), which its stdin and stdout also are.
    terminal: Option<File>,
    /// When its exit was seen (a terminal is drained for [`TERMINAL_DRAIN`] after).
    exited_at: Option<Instant>,
    handle: Handle,
    stdin: Option<Stdin>,
    stdout: Option<File>,
    stderr: Option<File>,
    exit: Option<i32>,
    oom_killed: bool,
    /// Its exit was reported (after all of its output).
    reported: bool,
}

struct Entry {
    spec: ContainerSpec,
    next_stream: u32,
    /// Stream id to process key.
    processes: HashMap<u32, u64>,
    cgroup_dirs: Vec<PathBuf>,
}

/// What the agent does with [`Request::Setup`]: prepare the guest for the run (in a guest
/// restored from a template) and return the published ports to relay.
pub type SetupHook = Box<dyn FnMut(&Setup) -> Result<PortForwarder, String>>;

/// What the agent does with [`Request::Resume`]: make a guest restored from a snapshot of a
/// running container this run's, and return the published ports to relay.
pub type ResumeHook = Box<dyn FnMut(&Setup) -> Result<PortForwarder, String>>;

/// The agent's state: containers, their processes, connections and published ports.
#[derive(Default)]
pub struct Agent {
    /// Set while a [`Request::Setup`] is awaited (taken when it arrives).
    setup: Option<SetupHook>,
    /// How a guest restored from a snapshot of a running container takes its run (a guest
    /// only).
    resume: Option<ResumeHook>,
    containers: HashMap<String, Entry>,
    procs: HashMap<u64, Proc>,
    sessions: HashMap<u64, Session>,
    next_key: u64,
    ports: PortForwarder,
    reap_orphans: bool,
    stopping: bool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("containers", &self.containers.len())
            .field("processes", &self.procs.len())
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// A new agent with no containers.
    pub fn new() -> Self {
        Agent::default()
    }

    /// Also reaps children no container waits for (the agent as PID 1 inherits orphans).
    pub fn reap_orphans(&mut self) {
        self.reap_orphans = true;
    }

    /// Relays the published ports' vsock connections (see [`PortForwarder`]).
    pub fn publish(&mut self, ports: PortForwarder) {
        self.ports = ports;
    }

    /// Waits for one [`Request::Setup`] before any container may be created, and runs `hook`
    /// with it (a guest booted as a template).
    pub fn await_setup(&mut self, hook: SetupHook) {
        self.setup = Some(hook);
    }

    /// Takes [`Request::Resume`] with `hook` (a guest: a VM may be restored from a snapshot
    /// taken while its containers ran).
    pub fn on_resume(&mut self, hook: ResumeHook) {
        self.resume = Some(hook);
    }

    /// Serves connections until a [`Request::Shutdown`] arrives: answers it, kills every
    /// container and returns. Blocks `SIGCHLD` in this (single-threaded) process to hear child
    /// exits on a signalfd.
    pub fn serve(mut self, listener: Listener) -> io::Result<()> {
        set_nonblocking(listener.fd(), true)?;
        let children = child_signals()?;
        let mut poller = Poller::default();
        while !self.stopping {
            poller.clear();
            poller.add(listener.fd(), READ, Token::Listener);
            poller.add(children.as_raw_fd(), READ, Token::Children);
            self.interest(&mut poller);
            let timeout = if self.draining_terminals() { 100 } else { -1 };
            for (token, events) in poller.wait(timeout)? {
                match token {
                    Token::Listener => self.accept(&listener),
                    Token::Session(id) => {
                        if let Some(s) = self.sessions.get_mut(&id) {
                            if events & WRITE != 0 {
                                s.flush();
                            }
                            if events & READ != 0 {
                                s.receive();
                            }
                        }
                    }
                    Token::Stdout(key) => self.pump(key, false),
                    Token::Stderr(key) => self.pump(key, true),
                    Token::Stdin(key) => self.write_stdin(key),
                    Token::Children => {
                        drain_signals(&children);
                        self.reap();
                    }
                    Token::Port(t) => self.ports.ready(t),
                }
            }
            self.report_exits();
            let ids: Vec<u64> = self.sessions.keys().copied().collect();
            for id in ids {
                self.requests(id);
            }
            self.drop_dead_sessions();
        }
        self.kill_all();
        Ok(())
    }

    /// Adds every descriptor that has something to wait for.
    fn interest(&self, poller: &mut Poller<Token>) {
        for (&id, s) in &self.sessions {
            let stdin_full = self.procs.values().any(|p| {
                p.stdin
                    .as_ref()
                    .is_some_and(|i| i.fed_by == Some(id) && i.buf.len() > STDIN_HIGH)
            });
            let read = !s.closing && !stdin_full && !s.in_full();
            let ev = (if read { READ } else { 0 }) | (if s.out.is_empty() { 0 } else { WRITE });
            poller.add(s.conn.as_raw_fd(), ev, Token::Session(id));
        }
        for (&key, p) in &self.procs {
            let room = p
                .session
                .iter()
                .chain(&p.watchers)
                .filter_map(|id| self.sessions.get(id))
                .all(|s| s.out.len() < OUT_HIGH);
            // A container's first process that no session hears (a VM restored from a snapshot
            // taken while it ran, before its new host attaches) keeps its output in its pipes:
            // it waits there, up to their size, rather than being lost.
            let unheard = p.stream == MAIN_STREAM && p.session.is_none() && p.watchers.is_empty();
            if room && !unheard {
                if let Some(f) = &p.stdout {
                    poller.add(f.as_raw_fd(), READ, Token::Stdout(key));
                }
                if let Some(f) = &p.stderr {
                    poller.add(f.as_raw_fd(), READ, Token::Stderr(key));
                }
            }
            if let Some(i) = p.stdin.as_ref().filter(|i| !i.buf.is_empty()) {
                poller.add(i.file.as_raw_fd(), WRITE, Token::Stdin(key));
            }
        }
        self.ports
            .interest(&mut |fd, ev, t| poller.add(fd, ev, Token::Port(t)));
    }

    fn accept(&mut self, listener: &Listener) {
        let conn = match listener.accept() {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return
            }
            Err(e) => return log::warn!("accepting a connection: {e}"),
        };
        if let Err(e) = set_nonblocking(conn.as_raw_fd(), true) {
            return log::warn!("accepting a connection: {e}");
        }
        self.next_key += 1;
        self.sessions.insert(
            self.next_key,
            Session {
                conn,
                inbuf: Vec::new(),
                inpos: 0,
                out: Vec::new(),
                greeted: false,
                closing: false,
                eof: false,
                dead: false,
            },
        );
    }

    /// Handles the whole frames a session has received, one request at a time.
    fn requests(&mut self, id: u64) {
        loop {
            let Some(s) = self.sessions.get_mut(&id) else {
                return;
            };
            if s.closing || s.dead {
                return;
            }
            let frame = match Frame::first_in(&s.inbuf[s.inpos..]) {
                Ok(Some((f, used))) => {
                    s.inpos += used;
                    f
                }
                Ok(None) => {
                    // Every whole frame is handled: drop them at once.
                    s.inbuf.drain(..s.inpos);
                    s.inpos = 0;
                    return;
                }
                Err(e) => {
                    log::debug!("agent session ended: {e}");
                    s.dead = true;
                    return;
                }
            };
            let frame = ClientFrame::decode(frame);
            if !s.greeted {
                greet(s, &frame);
                continue;
            }
            match frame {
                Ok(ClientFrame::Request(req)) => {
                    let response = match req {
                        Ok(req) => self.handle(id, req),
                        Err(e) => error(&format!("malformed request: {e}")),
                    };
                    if let Some(s) = self.sessions.get_mut(&id) {
                        s.reply(&response);
                    }
                }
                Ok(ClientFrame::Stdin { stream, data }) => self.feed_stdin(id, stream, &data),
                Err(e) => {
                    log::debug!("agent session ended: {e}");
                    s.dead = true;
                }
            }
        }
    }

    /// Answers a request.
    fn handle(&mut self, session: u64, req: Request) -> Response {
        log::debug!("request: {req:?}");
        match req {
            Request::Hello { .. } => error("hello was already sent"),
            Request::Setup(setup) => match self.setup.take() {
                Some(mut hook) => match hook(&setup) {
                    Ok(ports) => {
                        self.publish(ports);
                        Response::Ok
                    }
                    Err(e) => error(&e),
                },
                None => error("this agent takes no setup (it was not booted as a template)"),
            },
            Request::Resume(resume) => {
                let Some(hook) = self.resume.as_mut() else {
                    return error("this agent runs on no VM that can be restored");
                };
                // The parent's ports go first: the run may publish the same ones.
                self.ports = PortForwarder::default();
                match hook(&resume) {
                    Ok(ports) => {
                        self.publish(ports);
                        Response::Ok
                    }
                    Err(e) => error(&e),
                }
            }
            Request::Create { .. } if self.setup.is_some() => {
                error("the agent awaits its setup before any container")
            }
            Request::Create { id, spec } => self.create(id, *spec),
            Request::Start { id, terminal } => self.start(&id, terminal, session),
            Request::Exec {
                id,
                process,
                stdin,
                terminal,
            } => self.exec(&id, process, stdin, terminal, session),
            Request::Signal { id, stream, signal } => self.signal(&id, stream, signal),
            Request::Resize { id, stream, size } => self.resize(&id, stream, size),
            Request::Attach { id, stream } => self.attach(&id, stream, session),
            Request::Stats { id } => self.stats(&id),
            Request::Top { id } => match self.running(&id) {
                Ok((_, dirs)) => Response::Processes {
                    processes: stats::top(&dirs),
                },
                Err(r) => r,
            },
            Request::CopyOut { id, path, follow } => {
                self.copy(&id, CopyJob::Out { path, follow }, session)
            }
            Request::CopyIn {
                id,
                path,
                keep_owner,
            } => {
                let owner = Owner {
                    base: (0, 0),
                    keep: keep_owner,
                };
                self.copy(&id, CopyJob::In { path, owner }, session)
            }
            Request::Shutdown => {
                self.stopping = true;
                Response::Ok
            }
        }
    }

    fn create(&mut self, id: String, mut spec: ContainerSpec) -> Response {
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
        if self.containers.contains_key(&id) {
            return error(&format!("container {id} already exists"));
        }
        self.containers.insert(
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

    fn start(&mut self, id: &str, terminal: Option<TermSize>, session: u64) -> Response {
        let spec = match self.containers.get(id) {
            Some(e) if e.processes.contains_key(&MAIN_STREAM) => {
                return error(&format!("container {id} was already started"))
            }
            Some(e) => e.spec.clone(),
            None => return error(&format!("no such container: {id}")),
        };
        let stdio = if spec.terminal {
            StdioConfig::terminal(terminal.unwrap_or_default())
        } else {
            StdioConfig::piped()
        };
        let mut container = match Container::start(&spec, &stdio) {
            Ok(c) => c,
            Err(e) => return error(&e.to_string()),
        };
        let pid = container.pid();
        let cgroup_dirs = container
            .cgroup()
            .map(|c| c.dirs().to_vec())
            .unwrap_or_default();
        let stdio = [
            container.take_stdin(),
            container.take_stdout(),
            container.take_stderr(),
        ];
        let terminal = container.take_terminal();
        let key = self.add_proc(
            id,
            MAIN_STREAM,
            session,
            Handle::Main(container),
            stdio,
            terminal,
        );
        if let Some(e) = self.containers.get_mut(id) {
            e.cgroup_dirs = cgroup_dirs;
            e.processes.insert(MAIN_STREAM, key);
        }
        Response::Started {
            stream: MAIN_STREAM,
            pid,
        }
    }

    /// The pid of a running container's first process and its cgroup directories.
    fn running(&self, id: &str) -> Result<(i32, Vec<PathBuf>), Response> {
        let Some(entry) = self.containers.get(id) else {
            return Err(error(&format!("no such container: {id}")));
        };
        let main = entry
            .processes
            .get(&MAIN_STREAM)
            .and_then(|k| self.procs.get(k));
        match main {
            Some(p) if p.exit.is_none() => Ok((p.handle.pid(), entry.cgroup_dirs.clone())),
            _ => Err(error(&format!("container {id} is not running"))),
        }
    }

    fn exec(
        &mut self,
        id: &str,
        mut process: Process,
        stdin: bool,
        terminal: Option<TermSize>,
        session: u64,
    ) -> Response {
        let (container_pid, cgroup_dirs) = match self.running(id) {
            Ok(r) => r,
            Err(r) => return r,
        };
        let (mut env, security) = match self.containers.get(id) {
            Some(e) => (e.spec.process.env.clone(), e.spec.security.clone()),
            None => return error(&format!("no such container: {id}")),
        };
        // The process's variables override the container's.
        for var in &process.env {
            let key = var.split('=').next().unwrap_or_default();
            env.retain(|e| e.split('=').next() != Some(key));
            env.push(var.clone());
        }
        process.env = env;
        let stdio = StdioConfig {
            stdin: if stdin {
                StdioMode::Piped
            } else {
                StdioMode::Null
            },
            stdout: StdioMode::Piped,
            stderr: StdioMode::Piped,
            terminal,
        };
        match exec(container_pid, &cgroup_dirs, &process, &security, &stdio) {
            Ok(child) => self.add_exec(id, child, session),
            Err(e) => error(&e.to_string()),
        }
    }

    /// Records a process started in container `id` under its next stream id.
    fn add_exec(&mut self, id: &str, mut child: ExecProcess, session: u64) -> Response {
        let pid = child.pid();
        let pipes = [child.stdin.take(), child.stdout.take(), child.stderr.take()];
        let terminal = child.terminal.take();
        let Some(entry) = self.containers.get_mut(id) else {
            return error(&format!("no such container: {id}"));
        };
        let stream = entry.next_stream;
        entry.next_stream += 1;
        let key = self.add_proc(id, stream, session, Handle::Exec(child), pipes, terminal);
        if let Some(e) = self.containers.get_mut(id) {
            e.processes.insert(stream, key);
        }
        Response::Started { stream, pid }
    }

    /// `mvm cp`: a forked copy of the agent packs or unpacks the container's files.
    fn copy(&mut self, id: &str, job: CopyJob, session: u64) -> Response {
        let (pid, _) = match self.running(id) {
            Ok(r) => r,
            Err(r) => return r,
        };
        let copy_in = matches!(job, CopyJob::In { .. });
        match archive::spawn(pid, job) {
            Ok(mut child) => {
                if !copy_in {
                    child.stdin = None;
                }
                self.add_exec(id, child, session)
            }
            Err(e) => error(&e.to_string()),
        }
    }

    fn stats(&self, id: &str) -> Response {
        match self.running(id) {
            Ok((pid, dirs)) => Response::Stats {
                stats: stats::read(&dirs, pid),
            },
            Err(r) => r,
        }
    }

    fn resize(&self, id: &str, stream: u32, size: TermSize) -> Response {
        let p = match self.find(id, stream) {
            Ok(key) => &self.procs[&key],
            Err(r) => return r,
        };
        match &p.terminal {
            Some(t) => match size.apply(t) {
                Ok(()) => Response::Ok,
                Err(e) => error(&format!("resize: {e}")),
            },
            None => error(&format!("process {stream} of {id} has no terminal")),
        }
    }

    fn attach(&mut self, id: &str, stream: u32, session: u64) -> Response {
        let key = match self.find(id, stream) {
            Ok(key) => key,
            Err(r) => return r,
        };
        let Some(p) = self.procs.get_mut(&key) else {
            return error(&format!("container {id} has no process {stream}"));
        };
        if p.reported {
            return error(&format!("process {stream} of {id} has exited"));
        }
        if p.session != Some(session) && !p.watchers.contains(&session) {
            p.watchers.push(session);
        }
        Response::Ok
    }

    /// Records a started process; its pipes become non-blocking. Returns its key.
    fn add_proc(
        &mut self,
        container: &str,
        stream: u32,
        session: u64,
        handle: Handle,
        [stdin, stdout, stderr]: [Option<File>; 3],
        terminal: Option<File>,
    ) -> u64 {
        let pid = handle.pid();
        // A terminal is the process's stdin and stdout at once.
        let (stdin, stdout) = match &terminal {
            Some(t) => (t.try_clone().ok(), t.try_clone().ok()),
            None => (stdin, stdout),
        };
        let nonblocking = |f: Option<File>| {
            f.filter(|f| match set_nonblocking(f.as_raw_fd(), true) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("process {pid}: {e}");
                    false
                }
            })
        };
        self.next_key += 1;
        self.procs.insert(
            self.next_key,
            Proc {
                container: container.to_string(),
                stream,
                session: Some(session),
                watchers: Vec::new(),
                terminal: nonblocking(terminal),
                exited_at: None,
                handle,
                stdin: nonblocking(stdin).map(|file| Stdin {
                    file,
                    buf: Vec::new(),
                    close: false,
                    fed_by: None,
                }),
                stdout: nonblocking(stdout),
                stderr: nonblocking(stderr),
                exit: None,
                oom_killed: false,
                reported: false,
            },
        );
        self.next_key
    }

    fn find(&self, id: &str, stream: u32) -> Result<u64, Response> {
        let entry = self
            .containers
            .get(id)
            .ok_or_else(|| error(&format!("no such container: {id}")))?;
        entry
            .processes
            .get(&stream)
            .copied()
            .ok_or_else(|| error(&format!("container {id} has no process {stream}")))
    }

    fn signal(&self, id: &str, stream: u32, signal: i32) -> Response {
        let p = match self.find(id, stream) {
            Ok(key) => &self.procs[&key],
            Err(r) => return r,
        };
        if p.exit.is_some() {
            return Response::Ok;
        }
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child, so it cannot
        // have been reused.
        if unsafe { libc::kill(p.handle.pid(), signal) } < 0 {
            return error(&format!("signal {signal}: {}", io::Error::last_os_error()));
        }
        Response::Ok
    }

    /// Stdin bytes for the process with this stream id, preferably one the session started
    /// (`mvm` may feed stdin over a second connection); empty closes its stdin.
    fn feed_stdin(&mut self, session: u64, stream: u32, data: &[u8]) {
        let open = |p: &Proc| p.stream == stream && p.stdin.is_some();
        let key = self
            .procs
            .iter()
            .find(|(_, p)| open(p) && p.session == Some(session))
            .or_else(|| self.procs.iter().find(|(_, p)| open(p)))
            .map(|(&k, _)| k);
        let Some((key, p)) = key.and_then(|k| Some((k, self.procs.get_mut(&k)?))) else {
            return;
        };
        if let Some(stdin) = p.stdin.as_mut() {
            stdin.fed_by = Some(session);
            if data.is_empty() {
                stdin.close = true;
            } else {
                stdin.buf.extend_from_slice(data);
            }
        }
        self.write_stdin(key);
    }

    fn write_stdin(&mut self, key: u64) {
        let Some(p) = self.procs.get_mut(&key) else {
            return;
        };
        let Some(stdin) = p.stdin.as_mut() else {
            return;
        };
        match write_some(&mut stdin.file, &stdin.buf) {
            Ok(n) => {
                stdin.buf.drain(..n);
                if stdin.buf.is_empty() && stdin.close {
                    p.stdin = None; // closing our end gives the process end-of-file
                }
            }
            // The process closed its stdin or exited: drop what it will never read.
            Err(_) => p.stdin = None,
        }
    }

    /// Copies what a process wrote into frames for its session (or drops it without one).
    fn pump(&mut self, key: u64, stderr: bool) {
        let Some(p) = self.procs.get_mut(&key) else {
            return;
        };
        let slot = if stderr { &mut p.stderr } else { &mut p.stdout };
        let Some(pipe) = slot.as_mut() else {
            return;
        };
        let mut buf = vec![0u8; CHUNK];
        let n = match read_some(pipe, &mut buf) {
            Ok(None) => return,
            Ok(Some(n)) => n,
            Err(e) => {
                log::debug!("reading process {}: {e}", p.handle.pid());
                0
            }
        };
        if n == 0 {
            *slot = None;
            return;
        }
        buf.truncate(n);
        let kind = if stderr {
            FrameKind::Stderr
        } else {
            FrameKind::Stdout
        };
        let frame = Frame {
            kind,
            stream: p.stream,
            payload: buf,
        };
        for id in p.session.iter().chain(&p.watchers) {
            if let Some(s) = self.sessions.get_mut(id) {
                s.send(&frame);
            }
        }
    }

    /// Whether a terminal of a process that exited is still being read (the loop then wakes up
    /// to stop reading it in time).
    fn draining_terminals(&self) -> bool {
        self.procs
            .values()
            .any(|p| p.terminal.is_some() && p.exited_at.is_some() && p.stdout.is_some())
    }

    /// Collects the exit status of every process that ended; as PID 1 also reaps orphans.
    fn reap(&mut self) {
        for p in self.procs.values_mut().filter(|p| p.exit.is_none()) {
            let exit = match &mut p.handle {
                Handle::Main(c) => c.try_wait().map(|e| {
                    e.map(|e| {
                        p.oom_killed = e.oom_killed;
                        e.code
                    })
                }),
                Handle::Exec(e) => e.try_wait(),
            };
            match exit {
                Ok(Some(code)) => {
                    p.exit = Some(code);
                    p.exited_at = Some(Instant::now());
                }
                Ok(None) => {}
                Err(e) => {
                    log::warn!("waiting for process {}: {e}", p.handle.pid());
                    p.exit = Some(255);
                }
            }
        }
        if self.reap_orphans {
            let running: Vec<i32> = self
                .procs
                .values()
                .filter(|p| p.exit.is_none())
                .map(|p| p.handle.pid())
                .collect();
            super::init::reap_unmanaged(&|pid| running.contains(&pid));
        }
    }

    /// Reports each process that exited and whose output has all been read: its `exited`
    /// event, and the answer to any `wait` for it.
    fn report_exits(&mut self) {
        for p in self.procs.values_mut() {
            // A terminal a background process still holds open: stop reading it in time.
            if p.terminal.is_some() && p.exited_at.is_some_and(|t| t.elapsed() >= TERMINAL_DRAIN) {
                p.stdout = None;
            }
            let (Some(code), None, None, false) = (p.exit, &p.stdout, &p.stderr, p.reported) else {
                continue;
            };
            p.reported = true;
            p.stdin = None;
            p.terminal = None;
            let event = Event::Exited {
                id: p.container.clone(),
                stream: p.stream,
                code,
            };
            for id in p.session.iter().chain(&p.watchers) {
                let Some(s) = self.sessions.get_mut(id) else {
                    continue;
                };
                if p.oom_killed {
                    let msg =
                        b"mvm: the container was killed: out of memory (memory limit reached)\n";
                    s.send(&Frame {
                        kind: FrameKind::Stderr,
                        stream: p.stream,
                        payload: msg.to_vec(),
                    });
                }
                if let Ok(f) = Frame::json(FrameKind::Event, &event) {
                    s.send(&f);
                }
            }
        }
    }

    fn drop_dead_sessions(&mut self) {
        for s in self.sessions.values_mut() {
            // Every whole frame of a closed peer was handled this turn (see `requests`).
            if s.eof || (s.closing && s.out.is_empty()) {
                s.dead = true;
            }
        }
        let dead: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.dead)
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            self.sessions.remove(&id);
            for p in self.procs.values_mut() {
                p.watchers.retain(|w| *w != id);
                if p.session == Some(id) {
                    p.session = None;
                    // A terminal's input is shared with the sessions attached to it.
                    if p.terminal.is_none() {
                        p.stdin = None;
                    }
                }
            }
        }
    }

    /// After a shutdown request: sends the answers still queued (for at most a few seconds: a
    /// client that stops reading cannot keep the VM up), then kills and reaps every process.
    fn kill_all(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut poller = Poller::default();
        loop {
            poller.clear();
            for (&id, s) in self.sessions.iter().filter(|(_, s)| !s.dead) {
                let ev = if s.out.is_empty() { 0 } else { WRITE };
                poller.add(s.conn.as_raw_fd(), ev, id);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if poller.is_empty() || left.is_zero() {
                break;
            }
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            match poller.wait(ms) {
                Ok(ready) => {
                    for (id, _) in ready {
                        if let Some(s) = self.sessions.get_mut(&id) {
                            s.flush();
                        }
                    }
                }
                Err(_) => break,
            }
        }
        for p in self.procs.values_mut().filter(|p| p.exit.is_none()) {
            // SAFETY: kill has no memory preconditions; the pid is an unreaped child.
            unsafe { libc::kill(p.handle.pid(), libc::SIGKILL) };
            let _ = match &mut p.handle {
                Handle::Main(c) => c.wait().map(|e| e.code),
                Handle::Exec(e) => e.wait(),
            };
        }
    }
}

/// Handles the first frame of a session: it must be a hello of our protocol version.
fn greet(s: &mut Session, frame: &Result<ClientFrame, ProtocolError>) {
    let version = match frame {
        Ok(ClientFrame::Request(Ok(Request::Hello { version }))) => *version,
        _ => {
            s.reply(&error("the session must start with hello"));
            s.closing = true;
            return;
        }
    };
    if version != PROTOCOL_VERSION {
        s.reply(&error(&format!(
            "protocol version {version} is not supported (agent speaks {PROTOCOL_VERSION})"
        )));
        s.closing = true;
        return;
    }
    s.greeted = true;
    s.reply(&Response::Hello {
        version: PROTOCOL_VERSION,
        agent: env!("CARGO_PKG_VERSION").to_string(),
    });
}

fn error(message: &str) -> Response {
    Response::Error {
        message: message.to_string(),
    }
}

/// Blocks `SIGCHLD` and returns a non-blocking signalfd that reads it.
fn child_signals() -> io::Result<OwnedFd> {
    // SAFETY: zeroed memory is valid storage for a sigset_t; it is initialised right below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid storage.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
    }
    // SAFETY: blocks SIGCHLD for this thread, the only one; the set is valid.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a valid set; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads every pending signal off a non-blocking signalfd.
fn drain_signals(fd: &OwnedFd) {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    loop {
        // SAFETY: reads at most `info.len()` bytes into the buffer we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        if n <= 0 {
            return;
        }
    }
}
