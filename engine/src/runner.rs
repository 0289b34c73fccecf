//! The process that keeps a container alive, whatever its isolation: `mvm run` itself in the
//! foreground, or the background runner of `mvm run -d`.
//!
//! `run -d` validates the spec, resolves the image and registers the container (the name is
//! taken then, once), writes the spec with the image digest it resolved to `<dir>/spec.json`, and
//! starts mvm again with [`RUNNER_ENV`] naming that directory, in a new session with stdin from
//! /dev/null and stdout and stderr on pipes. The runner (`crate::run::resume`) takes the record
//! over ([`RunGuard::adopt`]), reads the spec, starts the container; then it moves its own stdout
//! and stderr to `<dir>/runner.log` and writes the container id on the original stdout. The parent returns that id; if the runner
//! exits first, the parent repeats the runner's error line and exits with its code. Either way
//! nothing is left behind on failure: [`RunGuard`] removes the record of a container that never
//! started.
//!
//! On every exit path after the start, [`RunGuard`] records the exit (code and time), removes
//! what only a running container needs (sockets, the root filesystem disk, the overlay's work
//! directory) and, with `--rm`, the whole record. The tap device and passt process belong to the
//! VM's network device, which ends with the VM. SIGINT and SIGTERM end a VM (see
//! `vmm::signals`) or are forwarded to a container or process, and so reach the same path.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{io_error, CommandExit, Error, EXIT_FAILURE};
use crate::spec::RunSpec;
use crate::state::{now, this_process, ContainerRecord, StateError, StateStore, Status};

/// Set in the environment of the background runner: the container's directory.
pub const RUNNER_ENV: &str = "MVM_RUNNER";

/// The run spec in a container's directory.
pub const SPEC_FILE: &str = "spec.json";

/// What a container directory keeps after its run (until `mvm rm`): the record, the spec, the
/// logs and a container's writable layer.
const KEEP: &[&str] = &[
    "state.json",
    SPEC_FILE,
    "container.log",
    "console.log",
    "runner.log",
    "upper",
];

/// The container directory this process is the runner of, if it is one. Call it first thing
/// (it takes the variable out of the environment, so no child inherits it).
pub fn requested() -> Option<PathBuf> {
    let dir = std::env::var_os(RUNNER_ENV)?;
    std::env::remove_var(RUNNER_ENV);
    Some(PathBuf::from(dir))
}

/// Writes the spec into the container's directory.
pub(crate) fn write_spec(dir: &Path, spec: &RunSpec) -> Result<(), Error> {
    let path = dir.join(SPEC_FILE);
    let json = serde_json::to_vec_pretty(spec)
        .map_err(|e| io_error("write", &path)(io::Error::other(e)))?;
    std::fs::write(&path, json).map_err(io_error("write", &path))
}

/// Reads the spec from a container's directory.
pub fn read_spec(dir: &Path) -> Result<RunSpec, Error> {
    let path = dir.join(SPEC_FILE);
    let data = std::fs::read(&path).map_err(io_error("read", &path))?;
    serde_json::from_slice(&data).map_err(|e| io_error("read", &path)(io::Error::other(e)))
}

/// `run -d`: starts the background runner on the container `guard` registered and waits until
/// the container runs (returns its id) or the runner failed (returns its error and exit code).
pub(crate) fn detach(mut guard: RunGuard) -> Result<String, Error> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::System("cannot find mvm's own path".into(), e))?;
    let mut cmd = Command::new(exe);
    cmd.env(RUNNER_ENV, guard.dir())
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
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::System("cannot start the background runner".into(), e))?;
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = BufReader::new(stdout).read_line(&mut line);
    }
    if let Some(id) = line.strip_suffix('\n').filter(|l| !l.is_empty()) {
        // The runner owns the record now.
        guard.release();
        return Ok(id.to_string());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child
        .wait()
        .map_err(|e| Error::System("waiting for the background runner".into(), e))?;
    let code = status.code().unwrap_or(EXIT_FAILURE);
    // The runner removed the record of a container that never started (should it have died
    // before it could, the guard does), or recorded how the one it started ended.
    guard.refresh();
    Err(runner_failure(&err, code))
}

/// The runner's last error line (it printed `mvm: ...`) as this process's error; earlier lines
/// (warnings) are repeated as they were.
fn runner_failure(stderr: &str, code: i32) -> Error {
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
pub(crate) fn announce_ready(id: &str, dir: &Path) -> Result<(), Error> {
    let log_path = dir.join("runner.log");
    let log = rootfs_builder::rootdir::private_file()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_error("create", &log_path))?;
    // SAFETY: dup and dup2 only operate on descriptors; fd 1 and the log file are open.
    let parent = unsafe {
        let parent = libc::dup(1);
        if parent < 0 {
            return Err(Error::System(
                "dup stdout".into(),
                io::Error::last_os_error(),
            ));
        }
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
        parent
    };
    // SAFETY: `parent` is a descriptor dup() just returned; the File owns and closes it.
    let mut parent = unsafe { File::from_raw_fd(parent) };
    writeln!(parent, "{id}")
        .map_err(|e| Error::System("cannot tell the parent the container started".into(), e))?;
    Ok(())
}

/// A container's record and directory while the process that runs it lives; see the module
/// docs.
#[derive(Debug)]
pub struct RunGuard {
    store: StateStore,
    record: ContainerRecord,
    dir: PathBuf,
    remove: bool,
    released: bool,
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
            released: false,
        })
    }

    /// Takes over a registered container that has not started: this process runs it now.
    pub fn adopt(
        store: StateStore,
        mut record: ContainerRecord,
        remove: bool,
    ) -> Result<Self, StateError> {
        (record.pid, record.pid_start) = this_process();
        store.save(&record)?;
        let dir = store.container_dir(&record.id);
        Ok(RunGuard {
            store,
            record,
            dir,
            remove,
            released: false,
        })
    }

    /// Rereads the record another process (the runner) may have changed; forgets it if that
    /// process removed it.
    fn refresh(&mut self) {
        match self.store.load(&self.record.id) {
            Ok(r) => self.record = r,
            Err(_) => self.released = true,
        }
    }

    /// Hands the record to another process (the runner) without touching it.
    pub(crate) fn release(&mut self) {
        self.released = true;
    }

    /// The container's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state store the record is in.
    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// The record as last saved.
    pub fn record(&self) -> &ContainerRecord {
        &self.record
    }

    /// The container runs (`process_pid`: its first process on the host, if it is one).
    pub fn running(
        &mut self,
        taps: Vec<String>,
        process_pid: Option<i32>,
    ) -> Result<(), StateError> {
        self.record.status = Status::Running;
        self.record.started = Some(now());
        self.record.taps = taps;
        self.record.process_pid = process_pid;
        self.store.save(&self.record)
    }

    /// Records where the container's cgroup is (so `mvm exec` can join it).
    pub fn cgroups(&mut self, dirs: Vec<PathBuf>) -> Result<(), StateError> {
        self.record.cgroup_dirs = dirs;
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
        if self.released {
            return;
        }
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

/// Removes what only a running container needs from its directory (sockets, disks, the
/// overlay's work directory), keeping the record, the spec, the logs and the writable layer.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Isolation;
    use crate::state::new_id;

    fn record(name: &str) -> ContainerRecord {
        ContainerRecord::new(
            new_id(),
            name.into(),
            "nginx".into(),
            Isolation::Vm,
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
        // Not even the name: names are links next to the records (there is no index).
        assert_eq!(
            std::fs::read_dir(root.path().join("containers"))
                .unwrap()
                .count(),
            0
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
        guard.running(vec!["mvm-tap0".into()], None).unwrap();
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
        guard.running(vec![], None).unwrap();
        drop(guard);
        let r = store.get("a").unwrap();
        assert_eq!((r.status, r.exit_code), (Status::Exited, None));

        // Not a hex digit: `get` also matches id prefixes, and ids are random hex.
        let mut guard = RunGuard::create(store.clone(), record("removed"), true).unwrap();
        guard.running(vec![], None).unwrap();
        guard.exited(0);
        drop(guard);
        assert!(matches!(store.get("removed"), Err(StateError::NotFound(_))));
    }

    #[test]
    fn a_runner_takes_over_a_registered_container_and_the_parent_lets_go() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let mut parent = RunGuard::create(store.clone(), record("bg"), false).unwrap();
        let mut spec = RunSpec::new(crate::spec::Source::Rootfs { path: "/".into() });
        spec.name = Some("bg".into());
        write_spec(parent.dir(), &spec).unwrap();
        let dir = parent.dir().to_path_buf();
        parent.release();
        drop(parent);
        let (store, id) = StateStore::of_container_dir(&dir).unwrap();
        assert_eq!(store.root(), root.path());
        let mut runner = RunGuard::adopt(store.clone(), store.load(&id).unwrap(), false).unwrap();
        assert_eq!(read_spec(&dir).unwrap(), spec);
        runner.running(vec![], Some(1)).unwrap();
        runner.exited(0);
        drop(runner);
        let r = store.get("bg").unwrap();
        assert_eq!((r.status, r.process_pid), (Status::Exited, Some(1)));
        assert!(dir.join(SPEC_FILE).exists());
    }

    #[test]
    fn a_failed_runner_reports_its_last_line_and_code() {
        let err = runner_failure("mvm: warn: x\nmvm: the name 'web' is already in use\n", 2);
        let Error::Exit(exit) = err else {
            panic!("not an exit: {err}")
        };
        assert_eq!(exit.0, 2);
        assert_eq!(exit.1, "the name 'web' is already in use");
        let err = runner_failure("", 0);
        assert_eq!(err.exit_code(), 1);
    }
}
