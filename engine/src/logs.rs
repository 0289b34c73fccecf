//! Where a container's output goes: appended to `<dir>/container.log` (what `mvm logs` prints)
//! and, in the foreground, copied to mvm's own stdout and stderr. A VM's output arrives as agent
//! frames ([`LogSink`] is the agent client's sink); a container's or a process's through pipes,
//! which [`Pumps`] read.
//!
//! The log rotates as docker's `local` driver does by default ([`LogOptions`], `--log-opt
//! max-size=20m --log-opt max-file=5`): once `container.log` would grow past `max-size` it becomes
//! `container.log.1` (the older ones move up, the oldest goes), so a container that floods its
//! output keeps at most `max-size` x `max-file` on disk. [`read_log`] reads the files back in
//! order, oldest first, so `mvm logs` ends with the newest output.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use guest_agent::agent::client::OutputSink;
use serde::{Deserialize, Serialize};

use crate::error::{bad_input, io_error, Error};
use crate::units::{format_size, parse_size};

/// How long the pipes are still read after the process exited, for output a background child
/// of it keeps writing (the pipes stay open as long as it lives).
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// The container log's name in its directory.
pub const LOG_FILE: &str = "container.log";

/// Rotation of the container log (`--log-opt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogOptions {
    /// Bytes a log file may hold before it rotates; 0: never rotate (`max-size=-1`).
    pub max_size: u64,
    /// Files kept, the current one included (at least 1).
    pub max_file: u32,
}

impl Default for LogOptions {
    /// docker's `local` log driver: 20 MB per file, 5 files.
    fn default() -> Self {
        LogOptions {
            max_size: 20 << 20,
            max_file: 5,
        }
    }
}

impl LogOptions {
    /// Applies one `--log-opt KEY=VALUE`: `max-size=SIZE` (or -1 for no limit), `max-file=N`.
    pub fn apply(&mut self, opt: &str) -> Result<(), Error> {
        let bad = |why: &str| bad_input(format!("invalid --log-opt {opt:?}: {why}"));
        match opt.split_once('=') {
            Some(("max-size", "-1")) => self.max_size = 0,
            Some(("max-size", v)) => {
                let size = parse_size(v).map_err(|e| bad(&e.to_string()))?;
                if size < 1024 {
                    return Err(bad("max-size must be at least 1k"));
                }
                self.max_size = size;
            }
            Some(("max-file", v)) => {
                self.max_file = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| bad("max-file must be a number from 1 to 100"))?;
            }
            _ => return Err(bad("use max-size=SIZE or max-file=N")),
        }
        Ok(())
    }

    /// `max-size=20M max-file=5`, as `inspect` might show it.
    pub fn describe(&self) -> String {
        let size = if self.max_size == 0 {
            "-1".to_string()
        } else {
            format_size(self.max_size)
        };
        format!("max-size={size} max-file={}", self.max_file)
    }
}

/// The container log, rotating; one per container, shared by its writers.
#[derive(Debug, Clone)]
pub struct ContainerLog(Arc<Mutex<LogFile>>);

#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    options: LogOptions,
}

/// The name of rotated file `n` (1 is the newest) of the log at `path`.
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

fn open_log(path: &Path) -> Result<File, Error> {
    rootfs_builder::rootdir::private_file()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error("create", path))
}

impl ContainerLog {
    /// Opens (appends to) the log at `path`, rotating as `options` say.
    pub fn open(path: &Path, options: LogOptions) -> Result<Self, Error> {
        let file = open_log(path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(ContainerLog(Arc::new(Mutex::new(LogFile {
            path: path.to_path_buf(),
            file: Some(file),
            size,
            options,
        }))))
    }

    /// Appends `data`, rotating first if it would grow the file past its limit.
    pub fn write(&self, data: &[u8]) {
        let Ok(mut log) = self.0.lock() else { return };
        log.write(data);
    }
}

impl LogFile {
    fn write(&mut self, data: &[u8]) {
        if self.file.is_none() {
            return;
        }
        let limit = self.options.max_size;
        if limit > 0 && self.size > 0 && self.size + data.len() as u64 > limit {
            if let Err(e) = self.rotate() {
                log::warn!("container log: cannot rotate: {e}; not logging any more");
                self.file = None;
                return;
            }
        }
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = f.write_all(data) {
                log::warn!("container log: {e}; not logging any more");
                self.file = None;
                return;
            }
            self.size += data.len() as u64;
        }
    }

    fn rotate(&mut self) -> Result<(), Error> {
        let keep = self.options.max_file.max(1);
        self.file = None;
        if keep == 1 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            let _ = std::fs::remove_file(rotated(&self.path, keep - 1));
            for n in (1..keep - 1).rev() {
                let _ = std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1));
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))
                .map_err(io_error("rotate", &self.path))?;
        }
        self.file = Some(open_log(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

/// The files of the log at `path` that exist, oldest first (the current one last).
pub fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<(u32, PathBuf)> = (1..=100)
        .map(|n| (n, rotated(path, n)))
        .take_while(|(_, p)| p.exists())
        .collect();
    files.reverse();
    let mut out: Vec<PathBuf> = files.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        out.push(path.to_path_buf());
    }
    out
}

/// Where a reader of the log has got to: the current file (by inode) and the offset in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogCursor {
    inode: Option<u64>,
    offset: u64,
}

/// Copies what the log at `path` holds past `cursor` to `out` (everything, oldest first, from a
/// new cursor) and moves the cursor. A rotation since the last call is followed: the rest of the
/// file that was current is read from its new name first.
pub fn read_log(path: &Path, cursor: &mut LogCursor, out: &mut dyn Write) -> io::Result<()> {
    let copy_from = |p: &Path, offset: u64, out: &mut dyn Write| -> io::Result<u64> {
        let mut f = File::open(p)?;
        f.seek(SeekFrom::Start(offset))?;
        io::copy(&mut f, out)
    };
    match cursor.inode {
        None => {
            for p in log_files(path) {
                let inode = std::fs::metadata(&p).map(|m| m.ino()).ok();
                let n = copy_from(&p, 0, out)?;
                if p == path {
                    *cursor = LogCursor { inode, offset: n };
                }
            }
        }
        Some(ino) => {
            let now = std::fs::metadata(path).map(|m| m.ino()).ok();
            if now != Some(ino) {
                // Rotated: finish the old file under its new name, then the new one from 0.
                if let Some(old) = (1..=100)
                    .map(|n| rotated(path, n))
                    .take_while(|p| p.exists())
                    .find(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == ino))
                {
                    copy_from(&old, cursor.offset, out)?;
                }
                *cursor = LogCursor {
                    inode: now,
                    offset: 0,
                };
            }
            if cursor.inode.is_some() {
                cursor.offset += copy_from(path, cursor.offset, out)?;
            }
        }
    }
    Ok(())
}

/// The container's output: appended to its log and, in the foreground, copied to mvm's own
/// stdout and stderr.
#[derive(Debug)]
pub struct LogSink {
    log: ContainerLog,
    echo: bool,
}

impl LogSink {
    /// Writes to `log`; `echo` also writes to this process's stdout and stderr.
    pub fn new(log: ContainerLog, echo: bool) -> Self {
        LogSink { log, echo }
    }
}

impl OutputSink for LogSink {
    fn stdout(&mut self, _stream: u32, data: &[u8]) {
        self.log.write(data);
        if self.echo {
            let mut out = io::stdout().lock();
            let _ = out.write_all(data);
            let _ = out.flush();
        }
    }
    fn stderr(&mut self, _stream: u32, data: &[u8]) {
        self.log.write(data);
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
    /// Starts copying `stdout` and `stderr` (either may be absent; a terminal's master as
    /// `stdout`) into `log`, echoed when `echo`.
    pub fn start(
        stdout: Option<File>,
        stderr: Option<File>,
        log: &ContainerLog,
        echo: bool,
    ) -> Result<Self, Error> {
        let exited = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (pipe, is_err) in [(stdout, false), (stderr, true)] {
            let Some(pipe) = pipe else { continue };
            let mut sink = LogSink::new(log.clone(), echo);
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
        let log = || ContainerLog::open(&path, LogOptions::default()).unwrap();
        let mut sink = LogSink::new(log(), false);
        sink.stdout(1, b"GET / 200\n");
        sink.stderr(1, b"notice\n");
        drop(sink);
        let mut sink = LogSink::new(log(), false);
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
        let log = ContainerLog::open(&path, LogOptions::default()).unwrap();
        let pumps = Pumps::start(out, err, &log, false).unwrap();
        child.wait().unwrap();
        let started = Instant::now();
        pumps.finish();
        assert!(started.elapsed() < Duration::from_secs(5));
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.contains("out\n") && log.contains("err\n"), "{log}");
    }

    #[test]
    fn a_flooded_log_stays_within_its_files_and_reads_back_its_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let opts = LogOptions {
            max_size: 4096,
            max_file: 3,
        };
        let log = ContainerLog::open(&path, opts).unwrap();
        let mut cursor = LogCursor::default();
        let mut followed = Vec::new();
        for i in 0..2000 {
            log.write(format!("line {i:05}\n").as_bytes());
            if i % 300 == 0 {
                read_log(&path, &mut cursor, &mut followed).unwrap();
            }
        }
        let files = log_files(&path);
        assert_eq!(files.len(), 3, "{files:?}");
        let total: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum();
        assert!(total <= 3 * 4096, "{total} bytes kept");
        let mut all = Vec::new();
        read_log(&path, &mut LogCursor::default(), &mut all).unwrap();
        let text = String::from_utf8(all).unwrap();
        assert!(
            text.ends_with("line 01999\n"),
            "{}",
            &text[text.len() - 40..]
        );
        // Lines kept are whole and in order.
        let nums: Vec<u32> = text
            .lines()
            .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
            .collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1));
        // A reader that followed along saw the rotations through: every line up to where it
        // last looked, once.
        read_log(&path, &mut cursor, &mut followed).unwrap();
        let followed = String::from_utf8(followed).unwrap();
        let seen: Vec<&str> = followed.lines().collect();
        assert_eq!(seen.len(), 2000, "followed {} lines", seen.len());
        assert_eq!(seen[1999], "line 01999");
    }

    #[test]
    fn log_options_parse_like_dockers() {
        let mut o = LogOptions::default();
        assert_eq!(o.describe(), "max-size=20M max-file=5");
        o.apply("max-size=1m").unwrap();
        o.apply("max-file=2").unwrap();
        assert_eq!(
            o,
            LogOptions {
                max_size: 1 << 20,
                max_file: 2
            }
        );
        o.apply("max-size=-1").unwrap();
        assert_eq!(o.max_size, 0);
        for bad in [
            "max-size=10",
            "max-file=0",
            "max-file=x",
            "mode=fast",
            "max-size",
        ] {
            assert!(o.apply(bad).unwrap_err().is_bad_input(), "{bad}");
        }
    }
}
