//! The control socket of a running container: `<dir>/control.sock`, served by the process that
//! owns the run (the runner; for a microVM, the VMM), so `mvm stop`, `mvm kill` and `mvm ps` ask
//! the owner instead of reaching around it.
//!
//! The protocol is defined here once, for both sides: one connection carries one [`Request`]
//! (a JSON object on one line) and gets one [`Response`] (a JSON object on one line), then the
//! server closes it. Requests are small and bounded ([`MAX_REQUEST`]); a request that does not
//! parse gets [`Response::Error`]. New verbs are new [`Request`] variants; an older server
//! answers a verb it does not know with an error, never by guessing.
//!
//! `pause` and `unpause` stop and resume a microVM's vCPUs (its memory and devices stay); the
//! answer comes once the vCPUs are parked or run again. The caller records the container as
//! paused: the server of a microVM is its jailed VMM, which cannot write the record.
//!
//! `stop` does not wait for the container: the server starts the stop sequence (SIGTERM to the
//! container's first process, SIGKILL after the grace period, then ending the run itself after
//! [`AFTER_KILL`]) and answers at once; the caller waits for the owner to exit.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The control socket's file name in a container's directory.
pub const SOCKET: &str = "control.sock";
/// The longest request line the server reads.
pub const MAX_REQUEST: usize = 4096;
/// How long the run may take to end after SIGKILL reached the container before the server ends
/// it itself (powers the VM off, kills the process).
pub const AFTER_KILL: Duration = Duration::from_secs(10);
/// How long either side waits for the other's line.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the server looks at its stop flag and the stop sequence.
const TICK: Duration = Duration::from_millis(100);

/// Errors talking to a control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No server answers at that path (the run ended, or never had a control socket).
    #[error("no control socket answers at {0}")]
    Unreachable(PathBuf, #[source] io::Error),
    /// The conversation broke.
    #[error("control socket {0}")]
    Io(PathBuf, #[source] io::Error),
    /// The server's answer does not parse.
    #[error("control socket {0}: unreadable answer")]
    Protocol(PathBuf, #[source] serde_json::Error),
    /// The server refused the request.
    #[error("{0}")]
    Refused(String),
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Where the run stands.
    Status,
    /// Stop the container: SIGTERM to its first process, SIGKILL after `grace_ms`, then end the
    /// run after [`AFTER_KILL`]. Answered at once with [`Response::Ok`].
    Stop {
        /// Milliseconds between SIGTERM and SIGKILL.
        grace_ms: u64,
    },
    /// Send `signal` to the container's first process.
    Kill {
        /// The signal number.
        signal: i32,
    },
    /// Stop the VM's vCPUs; its memory and devices stay (`mvm pause`).
    Pause,
    /// Let a paused VM's vCPUs run again (`mvm unpause`).
    Unpause,
    /// Save the VM (`mvm snapshot create`) into the two files that come with the request
    /// (SCM_RIGHTS: the memory file, then the state file, created empty by the caller: a jailed
    /// VMM opens no file); answered with [`Response::Saved`] once written. The VM goes on
    /// afterwards, or stays paused if it was.
    Snapshot {
        /// The snapshot's directory, for messages.
        dir: PathBuf,
    },
    /// Debug builds only: the VMM thread of `thread` makes system call `nr`, which its seccomp
    /// filter may forbid (tests prove that a forbidden call ends the VMM with one line).
    DebugSyscall {
        /// The thread kind (`control`, `device`, `vcpu`, ...).
        thread: String,
        /// The system call number.
        nr: i64,
    },
}

/// The phase of a run, as its owner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Being set up (a VM booting, its agent not answering yet).
    Starting,
    /// The container runs.
    Running,
    /// A stop was asked for and is under way.
    Stopping,
}

/// The answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// Where the run stands.
    pub phase: Phase,
    /// The process that serves this socket.
    pub pid: u32,
}

/// What the server answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Done (or, for `stop`, started).
    Ok,
    /// The answer to `status`.
    Status(Status),
    /// The answer to `snapshot`.
    Saved {
        /// How long the vCPUs were stopped for it, in milliseconds.
        paused_ms: u64,
        /// Pages of guest memory that held data.
        data_pages: u64,
    },
    /// Refused, and why.
    Error {
        /// One line for the user.
        message: String,
    },
}

/// What the owner of a run lets the control socket do to it.
pub trait Controlled: Send + Sync {
    /// Whether the container runs yet.
    fn running(&self) -> bool;
    /// Sends `signal` to the container's first process.
    fn signal(&self, signal: i32) -> Result<(), String>;
    /// Ends the run now (powers the VM off, kills the process); the owner then records the exit.
    fn terminate(&self);
    /// Stops (`true`) or resumes (`false`) the VM's vCPUs; answers once they are parked or run.
    fn pause(&self, paused: bool) -> Result<(), String> {
        let _ = paused;
        Err("only a VM container can be paused".into())
    }
    /// Saves the VM into `memory` and `state` (see [`Request::Snapshot`]); returns how long
    /// its vCPUs were stopped, in milliseconds, and how many pages of memory held data.
    fn snapshot(
        &self,
        dir: PathBuf,
        memory: std::fs::File,
        state: std::fs::File,
    ) -> Result<(u64, u64), String> {
        let _ = (dir, memory, state);
        Err("only a VM container can be saved in a snapshot".into())
    }
    /// Makes system call `nr` on the thread of kind `thread` (debug builds; see
    /// [`Request::DebugSyscall`]).
    fn debug_syscall(&self, thread: &str, nr: i64) -> Result<(), String> {
        let _ = (thread, nr);
        Err("this run takes no debug requests".into())
    }
}

/// Sends `request` to the control socket at `path` and returns the answer; an
/// [`Response::Error`] comes back as [`ControlError::Refused`].
pub fn call(path: &Path, request: &Request) -> Result<Response, ControlError> {
    call_with(path, request, &[], IO_TIMEOUT)
}

/// Asks the VM whose control socket is `path` to save itself into `memory` and `state` (see
/// [`Request::Snapshot`]), waiting up to `limit` for the answer.
pub fn snapshot(
    path: &Path,
    dir: &Path,
    memory: &std::fs::File,
    state: &std::fs::File,
    limit: Duration,
) -> Result<Response, ControlError> {
    let request = Request::Snapshot {
        dir: dir.to_path_buf(),
    };
    call_with(
        path,
        &request,
        &[memory.as_raw_fd(), state.as_raw_fd()],
        limit,
    )
}

/// [`call`], with `fds` sent along with the request and `limit` for the answer.
fn call_with(
    path: &Path,
    request: &Request,
    fds: &[std::os::fd::RawFd],
    limit: Duration,
) -> Result<Response, ControlError> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut conn =
        UnixStream::connect(path).map_err(|e| ControlError::Unreachable(path.to_path_buf(), e))?;
    let io = |e| ControlError::Io(path.to_path_buf(), e);
    conn.set_read_timeout(Some(limit)).map_err(io)?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let mut line =
        serde_json::to_vec(request).map_err(|e| ControlError::Protocol(path.to_path_buf(), e))?;
    line.push(b'\n');
    if fds.is_empty() {
        conn.write_all(&line).map_err(io)?;
    } else {
        // The descriptors ride on the first byte; the rest follows as plain data.
        let sent = conn
            .send_with_fds(&[&line[..1]], fds)
            .map_err(|e| io(io::Error::from_raw_os_error(e.errno())))?;
        conn.write_all(&line[sent..]).map_err(io)?;
    }
    let mut answer = Vec::new();
    BufReader::new(conn.take(MAX_REQUEST as u64 * 16))
        .read_until(b'\n', &mut answer)
        .map_err(io)?;
    let response: Response = serde_json::from_slice(&answer)
        .map_err(|e| ControlError::Protocol(path.to_path_buf(), e))?;
    match response {
        Response::Error { message } => Err(ControlError::Refused(message)),
        r => Ok(r),
    }
}

/// A stop sequence under way.
#[derive(Debug, Clone, Copy)]
enum StopStep {
    /// SIGKILL at this instant.
    Kill(Instant),
    /// End the run at this instant.
    Terminate(Instant),
    /// Done: the run was told to end.
    Done,
}

/// The server: a thread that answers one connection at a time. Dropping it stops the thread
/// and removes the socket.
pub struct ControlServer {
    /// The socket file this server removes when it goes (none: its owner removes it).
    path: Option<PathBuf>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Binds `path` (a stale socket there is replaced) and serves `target` on a new thread;
    /// the socket goes with the server.
    pub fn start(path: &Path, target: Arc<dyn Controlled>) -> io::Result<ControlServer> {
        let listener = Self::bind(path)?;
        Self::serve(listener, target, Some(path))
    }

    /// Binds `path` without serving it yet (a stale socket there is replaced).
    pub fn bind(path: &Path) -> io::Result<UnixListener> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// Serves `target` on `listener` on a new thread, confined by the control thread's seccomp
    /// filter where the process has turned filtering on; returns once it serves. `remove`: the
    /// socket file to remove when the server goes.
    pub fn serve(
        listener: UnixListener,
        target: Arc<dyn Controlled>,
        remove: Option<&Path>,
    ) -> io::Result<ControlServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let confined = vmm::seccomp::confine(vmm::seccomp::ThreadKind::Control);
                let ok = confined.is_ok();
                let _ = ready_tx.send(confined);
                if ok {
                    serve_loop(&listener, target.as_ref(), &flag);
                }
            })?;
        match ready_rx.recv_timeout(IO_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(io::Error::other(e)),
            Err(_) => return Err(io::Error::other("the control thread did not start")),
        }
        Ok(ControlServer {
            path: remove.map(Path::to_path_buf),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Waits up to `timeout` for the listener to have a connection.
fn readable(listener: &UnixListener, timeout: Duration) -> bool {
    let mut fds = [libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: polls one valid pollfd that lives across the call.
    unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) > 0 }
}

fn serve_loop(listener: &UnixListener, target: &dyn Controlled, stop: &AtomicBool) {
    let mut step: Option<StopStep> = None;
    while !stop.load(Ordering::SeqCst) {
        step = step.map(|s| advance(s, target));
        if !readable(listener, TICK) {
            continue;
        }
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        if let Some(started) = answer(conn, target, step.is_some()) {
            step.get_or_insert(started);
        }
    }
}

/// Moves a stop sequence on when its time has come.
fn advance(step: StopStep, target: &dyn Controlled) -> StopStep {
    let now = Instant::now();
    match step {
        StopStep::Kill(at) if now >= at => {
            if let Err(e) = target.signal(libc::SIGKILL) {
                log::debug!("stop: SIGKILL: {e}");
            }
            StopStep::Terminate(now + AFTER_KILL)
        }
        StopStep::Terminate(at) if now >= at => {
            target.terminate();
            StopStep::Done
        }
        s => s,
    }
}

/// Reads one request from `conn` and answers it; returns the stop sequence a `stop` started.
fn answer(conn: UnixStream, target: &dyn Controlled, stopping: bool) -> Option<StopStep> {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let mut files = Vec::new();
    let read = read_request(&conn, &mut files);
    let mut started = None;
    let response = match read {
        Err(e) => Response::Error {
            message: format!("cannot read the request: {e}"),
        },
        Ok(line) if line.len() > MAX_REQUEST => Response::Error {
            message: format!("request longer than {MAX_REQUEST} bytes"),
        },
        Ok(line) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
            Ok(request) => {
                let (response, stop) = handle(request, target, stopping, files);
                started = stop;
                response
            }
        },
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let mut conn = conn;
    let _ = conn.write_all(&out);
    // Closing with unread input would reset the connection before the client read the answer:
    // drain what a client that sent too much still has in flight, briefly and boundedly.
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.set_read_timeout(Some(TICK));
    let _ = io::copy(&mut conn.take(MAX_REQUEST as u64 * 16), &mut io::sink());
    started
}

/// The most descriptors a request carries (a snapshot's two files).
const MAX_FDS: usize = 2;

/// Reads one request line (up to the newline, at most [`MAX_REQUEST`] + 1 bytes) and the
/// descriptors that came with it (at most [`MAX_FDS`]: the kernel discards the rest).
fn read_request(conn: &UnixStream, files: &mut Vec<std::fs::File>) -> io::Result<Vec<u8>> {
    use std::os::fd::FromRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut line = Vec::new();
    let mut buf = [0u8; 1024];
    while line.len() <= MAX_REQUEST && !line.contains(&b'\n') {
        let mut fds = [-1; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`, which we own and may be written with anything.
        let (n, nfds) = unsafe { conn.recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        for fd in fds.into_iter().take(nfds) {
            // SAFETY: recvmsg just installed this descriptor for us; nothing else owns it.
            let file = unsafe { std::fs::File::from_raw_fd(fd) };
            if files.len() < MAX_FDS {
                files.push(file);
            }
        }
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    if let Some(end) = line.iter().position(|b| *b == b'\n') {
        line.truncate(end + 1);
    }
    Ok(line)
}

fn handle(
    request: Request,
    target: &dyn Controlled,
    stopping: bool,
    files: Vec<std::fs::File>,
) -> (Response, Option<StopStep>) {
    let result = |r: Result<(), String>| match r {
        Ok(()) => Response::Ok,
        Err(message) => Response::Error { message },
    };
    match request {
        Request::Status => {
            let phase = match (stopping, target.running()) {
                (true, _) => Phase::Stopping,
                (false, true) => Phase::Running,
                (false, false) => Phase::Starting,
            };
            let status = Status {
                phase,
                pid: std::process::id(),
            };
            (Response::Status(status), None)
        }
        Request::Stop { grace_ms } => {
            if stopping {
                return (Response::Ok, None);
            }
            // Before the container runs there is nothing to signal: end the run at once.
            if !target.running() || target.signal(libc::SIGTERM).is_err() {
                target.terminate();
                return (Response::Ok, Some(StopStep::Done));
            }
            let kill_at = Instant::now() + Duration::from_millis(grace_ms);
            (Response::Ok, Some(StopStep::Kill(kill_at)))
        }
        Request::Kill { signal } => {
            if !target.running() {
                return (
                    Response::Error {
                        message: "the container is not running yet".into(),
                    },
                    None,
                );
            }
            (result(target.signal(signal)), None)
        }
        Request::Pause | Request::Unpause => {
            if !target.running() || stopping {
                let message = "the container is not running".to_string();
                return (Response::Error { message }, None);
            }
            (result(target.pause(request == Request::Pause)), None)
        }
        Request::Snapshot { dir } => {
            if !target.running() || stopping {
                let message = "the container is not running".to_string();
                return (Response::Error { message }, None);
            }
            let mut files = files.into_iter();
            let (Some(memory), Some(state)) = (files.next(), files.next()) else {
                let message = "a snapshot request comes with its memory and state files".into();
                return (Response::Error { message }, None);
            };
            match target.snapshot(dir, memory, state) {
                Ok((paused_ms, data_pages)) => (
                    Response::Saved {
                        paused_ms,
                        data_pages,
                    },
                    None,
                ),
                Err(message) => (Response::Error { message }, None),
            }
        }
        Request::DebugSyscall { thread, nr } => {
            if !cfg!(debug_assertions) {
                let message = "debug requests are only taken by debug builds".to_string();
                return (Response::Error { message }, None);
            }
            (result(target.debug_syscall(&thread, nr)), None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        running: AtomicBool,
        signals: Mutex<Vec<i32>>,
        terminated: AtomicBool,
        paused: Mutex<Vec<bool>>,
    }

    impl Controlled for Fake {
        fn running(&self) -> bool {
            self.running.load(Ordering::SeqCst)
        }
        fn signal(&self, signal: i32) -> Result<(), String> {
            self.signals.lock().unwrap().push(signal);
            Ok(())
        }
        fn terminate(&self) {
            self.terminated.store(true, Ordering::SeqCst);
        }
        fn pause(&self, paused: bool) -> Result<(), String> {
            self.paused.lock().unwrap().push(paused);
            Ok(())
        }
        fn snapshot(
            &self,
            _dir: PathBuf,
            mut memory: std::fs::File,
            mut state: std::fs::File,
        ) -> Result<(u64, u64), String> {
            // Writes through the descriptors it was handed, as the VMM does.
            memory.write_all(b"memory").map_err(|e| e.to_string())?;
            state.write_all(b"state").map_err(|e| e.to_string())?;
            Ok((12, 34))
        }
    }

    #[test]
    fn a_snapshot_request_hands_its_two_files_to_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        let target = Arc::new(Fake::default());
        let _server = ControlServer::start(&path, target.clone()).unwrap();
        let create = |name: &str| {
            std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(dir.path().join(name))
                .unwrap()
        };
        let (memory, state) = (create("memory"), create("state"));
        let limit = Duration::from_secs(10);
        let refused = snapshot(&path, dir.path(), &memory, &state, limit).unwrap_err();
        assert!(refused.to_string().contains("not running"), "{refused}");
        target.running.store(true, Ordering::SeqCst);
        let saved = snapshot(&path, dir.path(), &memory, &state, limit).unwrap();
        assert_eq!(
            saved,
            Response::Saved {
                paused_ms: 12,
                data_pages: 34
            }
        );
        assert_eq!(std::fs::read(dir.path().join("memory")).unwrap(), b"memory");
        assert_eq!(std::fs::read(dir.path().join("state")).unwrap(), b"state");
        // Without its files (a plain request line), a snapshot is refused.
        let request = Request::Snapshot {
            dir: dir.path().to_path_buf(),
        };
        let refused = call(&path, &request).unwrap_err();
        assert!(
            refused.to_string().contains("memory and state files"),
            "{refused}"
        );
    }

    #[test]
    fn pause_and_unpause_reach_a_running_target_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        let target = Arc::new(Fake::default());
        let _server = ControlServer::start(&path, target.clone()).unwrap();
        let refused = call(&path, &Request::Pause).unwrap_err();
        assert!(refused.to_string().contains("not running"), "{refused}");
        target.running.store(true, Ordering::SeqCst);
        assert_eq!(call(&path, &Request::Pause).unwrap(), Response::Ok);
        assert_eq!(call(&path, &Request::Unpause).unwrap(), Response::Ok);
        assert_eq!(*target.paused.lock().unwrap(), [true, false]);
    }

    #[test]
    fn requests_and_responses_round_trip_as_one_json_line_each() {
        let cases = [
            (Request::Status, r#"{"op":"status"}"#),
            (
                Request::Stop { grace_ms: 1500 },
                r#"{"op":"stop","grace_ms":1500}"#,
            ),
            (Request::Kill { signal: 9 }, r#"{"op":"kill","signal":9}"#),
            (Request::Pause, r#"{"op":"pause"}"#),
            (Request::Unpause, r#"{"op":"unpause"}"#),
        ];
        for (request, json) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), json);
            assert_eq!(serde_json::from_str::<Request>(json).unwrap(), request);
        }
        let status = Response::Status(Status {
            phase: Phase::Running,
            pid: 7,
        });
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(json, r#"{"result":"status","phase":"running","pid":7}"#);
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), status);
        // Unknown verbs and fields are refused, not guessed at.
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"kill","signal":9,"x":1}"#).is_err());
    }

    #[test]
    fn a_client_gets_status_kill_and_a_stop_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        let target = Arc::new(Fake::default());
        let server = ControlServer::start(&path, target.clone()).unwrap();

        let Response::Status(s) = call(&path, &Request::Status).unwrap() else {
            panic!("not a status")
        };
        assert_eq!(s.phase, Phase::Starting);
        assert_eq!(s.pid, std::process::id());
        let refused = call(&path, &Request::Kill { signal: 15 }).unwrap_err();
        assert!(refused.to_string().contains("not running"), "{refused}");

        target.running.store(true, Ordering::SeqCst);
        assert_eq!(
            call(&path, &Request::Kill { signal: 10 }).unwrap(),
            Response::Ok
        );
        assert_eq!(
            call(&path, &Request::Stop { grace_ms: 0 }).unwrap(),
            Response::Ok
        );
        let Response::Status(s) = call(&path, &Request::Status).unwrap() else {
            panic!("not a status")
        };
        assert_eq!(s.phase, Phase::Stopping);
        let deadline = Instant::now() + Duration::from_secs(10);
        while target.signals.lock().unwrap().len() < 3 {
            assert!(
                Instant::now() < deadline,
                "no SIGKILL after the grace period"
            );
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            *target.signals.lock().unwrap(),
            [10, libc::SIGTERM, libc::SIGKILL]
        );
        assert!(
            !target.terminated.load(Ordering::SeqCst),
            "not before AFTER_KILL"
        );
        drop(server);
        assert!(!path.exists(), "the socket goes with the server");
        assert!(matches!(
            call(&path, &Request::Status),
            Err(ControlError::Unreachable(..))
        ));
    }

    #[test]
    fn a_stop_before_the_container_runs_ends_the_run_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        let target = Arc::new(Fake::default());
        let _server = ControlServer::start(&path, target.clone()).unwrap();
        assert_eq!(
            call(&path, &Request::Stop { grace_ms: 10_000 }).unwrap(),
            Response::Ok
        );
        assert!(target.terminated.load(Ordering::SeqCst));
        assert!(target.signals.lock().unwrap().is_empty());
    }

    #[test]
    fn garbage_and_oversized_requests_get_an_error_and_the_server_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        let _server = ControlServer::start(&path, Arc::new(Fake::default())).unwrap();
        for bad in [b"not json\n".to_vec(), vec![b'{'; MAX_REQUEST + 10]] {
            let mut conn = UnixStream::connect(&path).unwrap();
            conn.write_all(&bad).unwrap();
            let _ = conn.shutdown(std::net::Shutdown::Write);
            let mut answer = String::new();
            conn.read_to_string(&mut answer).unwrap();
            let r: Response = serde_json::from_str(answer.trim()).unwrap();
            assert!(matches!(r, Response::Error { .. }), "{answer}");
        }
        assert!(matches!(
            call(&path, &Request::Status).unwrap(),
            Response::Status(_)
        ));
    }
}
