//! Where a container's output goes: appended to `<dir>/container.log` (what `mvm logs` prints)
//! and, in the foreground, copied to mvm's own stdout and stderr. A VM's output arrives as agent
//! frames ([`LogSink`] is the agent client's sink); a container's or a process's through pipes,
//! which [`Pumps`] read.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use guest_agent::agent::client::OutputSink;

use crate::error::{io_error, Error};

/// How long the pipes are still read after the process exited, for output a background child
/// of it keeps writing (the pipes stay open as long as it lives).
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// The container's output: appended to `container.log` and, in the foreground, copied to mvm's
/// own stdout and stderr.
#[derive(Debug)]
pub struct LogSink {
    file: Option<File>,
    echo: bool,
}

impl LogSink {
    /// Opens (appends to) `path`; `echo` also writes to this process's stdout and stderr.
    pub fn new(path: &Path, echo: bool) -> Result<Self, Error> {
        let file = rootfs_builder::rootdir::private_file()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_error("create", path))?;
        Ok(LogSink {
            file: Some(file),
            echo,
        })
    }

    fn log(&mut self, data: &[u8]) {
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = f.write_all(data) {
                log::warn!("container log: {e}; not logging any more");
                self.file = None;
            }
        }
    }
}

impl OutputSink for LogSink {
    fn stdout(&mut self, _stream: u32, data: &[u8]) {
        self.log(data);
        if self.echo {
            let mut out = io::stdout().lock();
            let _ = out.write_all(data);
            let _ = out.flush();
        }
    }
    fn stderr(&mut self, _stream: u32, data: &[u8]) {
        self.log(data);
        if self.echo {
            let _ = io::stderr().lock().write_all(data);
        }
    }
}

/// Threads that copy a process's stdout and stderr pipes into a [`LogSink`] each.
#[derive(Debug)]
pub struct Pumps {
    exited: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Pumps {
    /// Starts copying `stdout` and `stderr` (either may be absent) into `log`, echoed when
    /// `echo`.
    pub fn start(
        stdout: Option<File>,
        stderr: Option<File>,
        log: &Path,
        echo: bool,
    ) -> Result<Self, Error> {
        let exited = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (pipe, is_err) in [(stdout, false), (stderr, true)] {
            let Some(pipe) = pipe else { continue };
            let mut sink = LogSink::new(log, echo)?;
            let exited = exited.clone();
            let thread = thread::Builder::new()
                .name("output".into())
                .spawn(move || pump(pipe, &mut sink, is_err, &exited))
                .map_err(|e| Error::System("cannot start an output thread".into(), e))?;
            threads.push(thread);
        }
        Ok(Pumps { exited, threads })
    }

    /// The process exited: copies what its pipes still hold (for at most a second) and stops.
    pub fn finish(self) {
        self.exited.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Whether `file` has something to read (or reached end-of-file) within `timeout_ms`.
fn readable(file: &File, timeout_ms: i32) -> bool {
    let mut fds = [libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: polls one valid pollfd that lives across the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout_ms) };
    n > 0
}

fn pump(mut pipe: File, sink: &mut LogSink, is_err: bool, exited: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut deadline = None;
    loop {
        if exited.load(Ordering::SeqCst) {
            let end = *deadline.get_or_insert_with(|| Instant::now() + DRAIN_LIMIT);
            if Instant::now() >= end || !readable(&pipe, 0) {
                return;
            }
        } else if !readable(&pipe, 100) {
            continue;
        }
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) if is_err => sink.stderr(1, &buf[..n]),
            Ok(n) => sink.stdout(1, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("container output: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_sink_appends_both_streams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let mut sink = LogSink::new(&path, false).unwrap();
        sink.stdout(1, b"GET / 200\n");
        sink.stderr(1, b"notice\n");
        drop(sink);
        let mut sink = LogSink::new(&path, false).unwrap();
        sink.stdout(1, b"again\n");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "GET / 200\nnotice\nagain\n"
        );
    }

    #[test]
    fn pumps_copy_pipes_and_stop_though_a_writer_lingers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "echo out; echo err >&2; (sleep 30 &)"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child
            .stdout
            .take()
            .map(|p| File::from(std::os::fd::OwnedFd::from(p)));
        let err = child
            .stderr
            .take()
            .map(|p| File::from(std::os::fd::OwnedFd::from(p)));
        let pumps = Pumps::start(out, err, &path, false).unwrap();
        child.wait().unwrap();
        let started = Instant::now();
        pumps.finish();
        assert!(started.elapsed() < Duration::from_secs(5));
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.contains("out\n") && log.contains("err\n"), "{log}");
    }
}
