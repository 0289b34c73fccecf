//! The control socket of a VM container's runner: `mvm pause` and `mvm unpause` from another
//! shell reach the process that holds the VM through `<container dir>/control.sock` (root-only,
//! like the directory it is in).
//!
//! One request per connection, one JSON line each way: a [`ControlRequest`], then a
//! [`ControlReply`]. The runner carries it out on the VM ([`vmm::snapshot::take::VmController`])
//! and records the container as paused or not before it answers.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm::snapshot::take::VmController;

use crate::error::{io_error, Error};

/// The socket in a container's directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Longest request line the runner reads.
const MAX_LINE: u64 = 4096;
/// How long a client waits for the runner's answer.
const REPLY_WAIT: Duration = Duration::from_secs(30);

/// What `mvm pause|unpause` asks of a runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Stop the vCPUs; memory and devices stay.
    Pause,
    /// Let the vCPUs run again.
    Resume,
}

/// The runner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlReply {
    /// None: done; else why not (one line).
    pub error: Option<String>,
}

/// Serves a runner's control socket on its own thread until dropped.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `dir/control.sock`; `paused(bool)` records the new state once the VM took it.
    pub fn start(
        dir: &Path,
        vm: VmController,
        paused: impl Fn(bool) -> Result<(), Error> + Send + 'static,
    ) -> Result<Self, Error> {
        let path = dir.join(CONTROL_SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(io_error("create", &path))?;
        listener
            .set_nonblocking(true)
            .map_err(io_error("create", &path))?;
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let thread = thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => serve(conn, &vm, &paused),
                        Err(_) => thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
            .map_err(io_error("start a thread for", &path))?;
        Ok(Self {
            path,
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
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(conn: UnixStream, vm: &VmController, paused: &impl Fn(bool) -> Result<(), Error>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let read = BufReader::new((&conn).take_limited()).read_line(&mut line);
    let reply = match read
        .ok()
        .and_then(|_| serde_json::from_str::<ControlRequest>(&line).ok())
    {
        None => ControlReply {
            error: Some("not a control request".into()),
        },
        Some(request) => {
            let (done, now_paused) = match request {
                ControlRequest::Pause => (vm.pause(), true),
                ControlRequest::Resume => (vm.resume(), false),
            };
            let error = match done {
                Ok(()) => paused(now_paused).err().map(|e| e.to_string()),
                Err(e) => Some(error_line(&e)),
            };
            ControlReply { error }
        }
    };
    if let Ok(mut json) = serde_json::to_vec(&reply) {
        json.push(b'\n');
        let _ = (&conn).write_all(&json);
    }
}

/// A reader that stops after [`MAX_LINE`] bytes.
trait TakeLimited: std::io::Read + Sized {
    fn take_limited(self) -> std::io::Take<Self> {
        self.take(MAX_LINE)
    }
}
impl<R: std::io::Read> TakeLimited for R {}

fn error_line(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// Sends `request` to the runner whose container directory is `dir` and waits for its answer.
pub fn request(dir: &Path, request: ControlRequest) -> Result<(), Error> {
    let path = dir.join(CONTROL_SOCKET);
    let failed = |why: String| Error::Failed(why);
    let mut conn = UnixStream::connect(&path)
        .map_err(|e| failed(format!("cannot reach the container's runner: {e}")))?;
    let _ = conn.set_read_timeout(Some(REPLY_WAIT));
    let mut json = serde_json::to_vec(&request).map_err(|e| failed(e.to_string()))?;
    json.push(b'\n');
    conn.write_all(&json)
        .map_err(|e| failed(format!("cannot reach the container's runner: {e}")))?;
    let mut line = String::new();
    BufReader::new(conn.take_limited())
        .read_line(&mut line)
        .map_err(|e| failed(format!("the container's runner did not answer: {e}")))?;
    let reply: ControlReply = serde_json::from_str(&line)
        .map_err(|_| failed("the container's runner did not answer".into()))?;
    match reply.error {
        None => Ok(()),
        Some(why) => Err(failed(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip_as_one_json_line() {
        for r in [ControlRequest::Pause, ControlRequest::Resume] {
            let json = serde_json::to_string(&r).unwrap();
            assert!(!json.contains('\n'));
            assert_eq!(serde_json::from_str::<ControlRequest>(&json).unwrap(), r);
        }
        assert_eq!(
            serde_json::to_string(&ControlRequest::Pause).unwrap(),
            "\"pause\""
        );
        let reply = ControlReply {
            error: Some("the VM is not running".into()),
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(serde_json::from_str::<ControlReply>(&json).unwrap(), reply);
        assert!(serde_json::from_str::<ControlRequest>("\"reboot\"").is_err());
    }

    #[test]
    fn a_client_without_a_runner_gets_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let e = request(dir.path(), ControlRequest::Pause).unwrap_err();
        assert!(e.to_string().contains("cannot reach"), "{e}");
        assert_eq!(e.to_string().lines().count(), 1);
    }
}
