//! The process that keeps a VM container alive: `mvm run --isolation vm` in the foreground, or
//! the background runner `mvm run -d` re-executes itself as.
//!
//! `run -d` spawns `mvm` again with the same arguments and `MVM_RUNNER=1`, in a new session with
//! stdin from /dev/null and stdout and stderr on pipes. The runner registers the container, boots
//! the VM and starts the container; then it moves its own stdout and stderr to
//! `<dir>/runner.log` and writes the container id on the original stdout. The parent prints that
//! id and exits 0; if the runner exits first, the parent repeats the runner's error line and exits
//! with its code. Either way nothing is left behind on failure: [`RunGuard`] removes the record
//! of a container that never started.
//!
//! On every exit path after the start, [`RunGuard`] records the exit (code and time), removes
//! what only a running VM needs (sockets, the root filesystem disk) and, with `--rm`, the whole
//! record. The tap device and passt process belong to the VM's network device, which ends with
//! the VM. SIGINT and SIGTERM end the VM (the VMM's own handlers) and so reach the same path;
//! before the VM starts they are caught by [`catch_termination`] and checked with [`terminated`].

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::Context;
use guest_agent::agent::client::OutputSink;

use super::run::CommandExit;
use crate::state::{now, ContainerRecord, StateError, StateStore, Status};

/// Set in the environment of the background runner.
pub const RUNNER_ENV: &str = "MVM_RUNNER";

/// Files of a container directory that outlive its VM (until `mvm rm`).
const KEEP: &[&str] = &["state.json", "container.log", "console.log", "runner.log"];

/// Whether this process is the background runner of `run -d`.
pub fn is_runner() -> bool {
    std::env::var_os(RUNNER_ENV).is_some()
}

/// `run -d`: starts the background runner and waits until the container runs (prints its id,
/// returns 0) or the runner failed (returns its error and exit code).
pub fn detach() -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("cannot find mvm's own path")?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(RUNNER_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the background runner")?;
    let stdout = child.stdout.take().context("runner stdout")?;
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    if let Some(id) = line.strip_suffix('\n').filter(|l| !l.is_empty()) {
        outln!("{id}");
        return Ok(0);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().context("waiting for the background runner")?;
    let code = status.code().unwrap_or(super::EXIT_FAILURE);
    Err(runner_failure(&err, code))
}

/// The runner's last error line (it printed `mvm: ...`) as this process's error; earlier lines
/// (warnings) are repeated as they were.
fn runner_failure(stderr: &str, code: i32) -> anyhow::Error {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let Some((last, earlier)) = lines.split_last() else {
        return CommandExit(
            code.max(1),
            format!("the background runner exited with code {code} before the container started"),
        )
        .into();
    };
    for l in earlier {
        eprintln!("{l}");
    }
    let msg = last.strip_prefix("mvm: ").unwrap_or(last).to_string();
    CommandExit(code.max(1), msg).into()
}

/// In the runner, once the container runs: moves stdout and stderr to `<dir>/runner.log` and
/// tells the waiting parent the container id.
pub fn announce_ready(id: &str, dir: &Path) -> anyhow::Result<()> {
    let log_path = dir.join("runner.log");
    let log = rootfs_builder::rootdir::private_file()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    // SAFETY: dup and dup2 only operate on descriptors; fd 1 and the log file are open.
    let parent = unsafe {
        let parent = libc::dup(1);
        if parent < 0 {
            return Err(io::Error::last_os_error()).context("dup stdout");
        }
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
        parent
    };
    // SAFETY: `parent` is a descriptor dup() just returned; the File owns and closes it.
    let mut parent = unsafe { File::from_raw_fd(parent) };
    writeln!(parent, "{id}").context("cannot tell the parent the container started")?;
    Ok(())
}

static TERMINATED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_terminate(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATED.store(num, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM until the VM starts (the VMM then installs its own handlers), so
/// a signal during setup still ends in [`RunGuard`]'s cleanup.
pub fn catch_termination() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_terminate) {
            log::warn!("cannot handle signal {sig}: {e}");
        }
    }
}

/// The SIGINT or SIGTERM caught since [`catch_termination`], if any.
pub fn terminated() -> Option<i32> {
    match TERMINATED.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}

/// A VM container's record and directory while its runner lives; see the module docs.
#[derive(Debug)]
pub struct RunGuard {
    store: StateStore,
    record: ContainerRecord,
    dir: PathBuf,
    remove: bool,
}

impl RunGuard {
    /// Registers the container (its name must be free) and creates its directory.
    pub fn create(
        store: StateStore,
        record: ContainerRecord,
        remove: bool,
    ) -> Result<Self, StateError> {
        store.create(&record)?;
        let dir = store.container_dir(&record.id);
        Ok(RunGuard {
            store,
            record,
            dir,
            remove,
        })
    }

    /// The container's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The record as last saved.
    pub fn record(&self) -> &ContainerRecord {
        &self.record
    }

    /// The container runs.
    pub fn running(&mut self, taps: Vec<String>) -> Result<(), StateError> {
        self.record.status = Status::Running;
        self.record.started = Some(now());
        self.record.taps = taps;
        self.store.save(&self.record)
    }

    /// The container exited with `code`.
    pub fn exited(&mut self, code: i32) {
        self.record.exit_code = Some(code);
        self.finish();
    }

    fn finish(&mut self) {
        if self.record.status == Status::Exited {
            return;
        }
        self.record.status = Status::Exited;
        self.record.finished = Some(now());
        if let Err(e) = self.store.save(&self.record) {
            log::warn!("cannot record the exit of {}: {e}", self.record.name);
        }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if self.record.status == Status::Created || self.remove {
            // Never started (nothing to keep), or --rm.
            if let Err(e) = self.store.remove(&self.record) {
                log::warn!("cannot remove container {}: {e}", self.record.name);
            }
            return;
        }
        self.finish();
        clean_run_dir(&self.dir);
    }
}

/// Removes what only a running VM needs from a container directory (sockets, disks), keeping the
/// record and the logs.
pub fn clean_run_dir(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if KEEP.iter().any(|k| name.as_encoded_bytes() == k.as_bytes()) {
            continue;
        }
        let path = e.path();
        let result = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = result {
            log::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// The container's output: appended to `container.log` and, in the foreground, copied to mvm's
/// own stdout and stderr.
#[derive(Debug)]
pub struct LogSink {
    file: Option<File>,
    echo: bool,
}

impl LogSink {
    /// Opens (appends to) `path`; `echo` also writes to this process's stdout and stderr.
    pub fn new(path: &Path, echo: bool) -> anyhow::Result<Self> {
        let file = rootfs_builder::rootdir::private_file()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::new_id;

    fn record(name: &str) -> ContainerRecord {
        ContainerRecord::new(
            new_id(),
            name.into(),
            "nginx".into(),
            "vm",
            vec!["nginx".into()],
            vec!["8080:80".into()],
        )
    }

    #[test]
    fn a_container_that_never_started_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let guard = RunGuard::create(store.clone(), record("web"), false).unwrap();
        std::fs::write(guard.dir().join("rootfs.ext4"), b"disk").unwrap();
        drop(guard);
        assert!(matches!(store.get("web"), Err(StateError::NotFound(_))));
        assert_eq!(
            std::fs::read_dir(root.path().join("containers"))
                .unwrap()
                .count(),
            1
        );
    }

    #[test]
    fn an_exited_container_keeps_its_record_and_logs_but_not_its_sockets() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let mut guard = RunGuard::create(store.clone(), record("web"), false).unwrap();
        let dir = guard.dir().to_path_buf();
        for f in ["vsock.sock", "rootfs.ext4", "container.log", "console.log"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        guard.running(vec!["mvm-tap0".into()]).unwrap();
        assert_eq!(store.get("web").unwrap().status, Status::Running);
        guard.exited(3);
        drop(guard);
        let r = store.get("web").unwrap();
        assert_eq!((r.status, r.exit_code), (Status::Exited, Some(3)));
        assert!(r.started.is_some() && r.finished.is_some());
        assert_eq!(r.taps, ["mvm-tap0"]);
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["console.log", "container.log", "state.json"]);
    }

    #[test]
    fn a_runner_ending_without_an_exit_code_records_exited_and_rm_removes_all() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let mut guard = RunGuard::create(store.clone(), record("a"), false).unwrap();
        guard.running(vec![]).unwrap();
        drop(guard);
        let r = store.get("a").unwrap();
        assert_eq!((r.status, r.exit_code), (Status::Exited, None));

        // Not a hex digit: `get` also matches id prefixes, and ids are random hex.
        let mut guard = RunGuard::create(store.clone(), record("removed"), true).unwrap();
        guard.running(vec![]).unwrap();
        guard.exited(0);
        drop(guard);
        assert!(matches!(store.get("removed"), Err(StateError::NotFound(_))));
    }

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
    fn a_failed_runner_reports_its_last_line_and_code() {
        let err = runner_failure("mvm: warn: x\nmvm: the name 'web' is already in use\n", 2);
        let exit = err.downcast_ref::<CommandExit>().unwrap();
        assert_eq!(exit.0, 2);
        assert_eq!(exit.1, "the name 'web' is already in use");
        let err = runner_failure("", 0);
        assert_eq!(err.downcast_ref::<CommandExit>().unwrap().0, 1);
    }
}
