//! The process that owns a run: the runner. Every microVM has one, and so does every `-d` run
//! of any isolation; a foreground container or process runs inside `mvm run` itself.
//!
//! `mvm run` validates the spec, resolves the image and registers the container (the name is
//! taken then, once), writes the spec with the image digest it resolved to `<dir>/spec.json`,
//! and starts mvm again with [`RUNNER_ENV`] naming that directory, in a new session. The runner
//! (`crate::run::resume`) takes the record over ([`RunGuard::adopt`]), reads the spec, starts
//! the container and serves its control socket (`crate::control`).
//!
//! - `-d` ([`detach`]): the runner's stdin is /dev/null and its stdout and stderr are pipes; once
//!   the container runs it moves them to `<dir>/runner.log` and writes the container id on the
//!   original stdout. The parent returns that id; if the runner exits first, the parent repeats
//!   the runner's error line and exits with its code.
//! - foreground ([`foreground`], with [`FOREGROUND_ENV`]): the runner inherits the terminal's
//!   stdin, stdout and stderr, so the container's output and the runner's error line reach the
//!   user as they are written; `mvm run` forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to it,
//!   exits with its exit code, and takes the runner with it should it die (the runner's parent
//!   death signal is SIGTERM).
//!
//! Either way nothing is left behind on failure: [`RunGuard`] removes the record of a container
//! that never started, in the runner or, should the runner die first, in `mvm run`.
//!
//! With a `--restart` policy the runner runs the container again after it exits (see
//! [`crate::restart`]): [`RunGuard::exited`] records it as restarting, the restart as running
//! again, and the count in the record.
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
use std::process::Stdio;

use crate::error::{io_error, CommandExit, Error, EXIT_FAILURE};
use crate::restart::RestartPolicy;
use crate::spec::{Isolation, RunSpec};
use crate::state::{now, this_process, ContainerRecord, StateError, StateStore, Status};

/// Set in the environment of the runner: the container's directory.
pub const RUNNER_ENV: &str = "MVM_RUNNER";
/// Set (to `1`) in the environment of the runner of a foreground `mvm run`: its output goes to
/// the terminal it inherited, and it ends the run when its client dies.
pub const FOREGROUND_ENV: &str = "MVM_RUNNER_FOREGROUND";

/// The run spec in a container's directory.
pub const SPEC_FILE: &str = "spec.json";

/// What a container directory keeps after its run (until `mvm rm`): the record, the spec, the
/// logs (rotated ones too) and a container's writable layer.
const KEEP: &[&str] = &[
    "state.json",
    SPEC_FILE,
    "container.log",
    "console.log",
    "runner.log",
    "upper",
];

/// What a runner process was started for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerRequest {
    /// The container's directory.
    pub dir: PathBuf,
    /// For a foreground `mvm run` (its client waits), not `-d`.
    pub foreground: bool,
}

/// The container this process is the runner of, if it is one. Call it first thing (it takes
/// the variables out of the environment, so no child inherits them).
pub fn requested() -> Option<RunnerRequest> {
    let dir = std::env::var_os(RUNNER_ENV)?;
    let foreground = std::env::var_os(FOREGROUND_ENV).is_some_and(|v| v == "1");
    std::env::remove_var(RUNNER_ENV);
    std::env::remove_var(FOREGROUND_ENV);
    Some(RunnerRequest {
        dir: PathBuf::from(dir),
        foreground,
    })
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
    let mut cmd = crate::selfexec::command();
    cmd.env(RUNNER_ENV, guard.dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setsid and the signal mask calls are async-signal-safe and touch no memory of
    // the parent.
    unsafe {
        cmd.pre_exec(|| {
            unblock_all_signals()?;
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

/// A foreground `mvm run`: starts the runner on the container `guard` registered, with this
/// process's stdin, stdout and stderr, and waits for it, forwarding SIGINT, SIGTERM, SIGHUP and
/// SIGQUIT (blocked by the caller before anything started, so none is lost). Returns the
/// runner's exit code, which is the container's (the runner printed any error line itself).
///
/// The runner gets its own session, so a terminal's signals reach it only through this process,
/// and dies with SIGTERM when this process does (it then stops the run and cleans up as after a
/// user's SIGTERM).
pub(crate) fn foreground(mut guard: RunGuard) -> Result<i32, Error> {
    let client = std::process::id();
    let mut cmd = crate::selfexec::command();
    cmd.env(RUNNER_ENV, guard.dir()).env(FOREGROUND_ENV, "1");
    // SAFETY: setsid, prctl, getppid and the signal mask calls are async-signal-safe and touch
    // no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            // The signals this process holds for forwarding must reach the runner itself.
            unblock_all_signals()?;
            if libc::setsid() < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // The client died before the death signal was armed: there is nobody to run for.
            if u32::try_from(libc::getppid()).ok() != Some(client) {
                return Err(io::Error::other("the client exited"));
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::System("cannot start the runner".into(), e))?;
    let status = wait_forwarding(&mut child)
        .map_err(|e| Error::System("waiting for the runner".into(), e))?;
    // The runner recorded the exit (or removed the record with --rm); should it have died
    // without doing so, the guard does it now.
    guard.refresh();
    let name = guard.record().name.clone();
    drop(guard);
    match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => Ok(code),
        (None, Some(sig)) => Err(CommandExit(
            128 + sig,
            format!("the runner of {name} was killed by signal {sig}"),
        )
        .into()),
        (None, None) => Ok(EXIT_FAILURE),
    }
}

/// Waits for `child`, forwarding the signals the caller blocked
/// (`guest_agent::runtime::FORWARDED_SIGNALS`) to it as they come.
fn wait_forwarding(child: &mut std::process::Child) -> io::Result<std::process::ExitStatus> {
    let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
    let set = forwarded_set();
    let tick = libc::timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: `set` and `tick` are valid; the siginfo is not needed.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &tick) };
        if sig > 0 {
            log::debug!("forwarding signal {sig} to the runner");
            // SAFETY: kill has no memory preconditions; `pid` is our unreaped child.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// Empties this thread's signal mask (a child inherits its parent's across fork and exec).
/// Async-signal-safe.
fn unblock_all_signals() -> io::Result<()> {
    // SAFETY: sigemptyset initialises `set`; pthread_sigmask reads it and changes only this
    // thread's mask.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds valid signal numbers to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in guest_agent::runtime::FORWARDED_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        // A terminal's size changes, for a runner with `-t` (blocked only then: unblocked, the
        // default disposition drops them).
        libc::sigaddset(&mut set, libc::SIGWINCH);
        set
    }
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
    restart: RestartPolicy,
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
            restart: RestartPolicy::No,
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
            restart: RestartPolicy::No,
        })
    }

    /// Rereads the record another process (the runner) may have changed; forgets it if that
    /// process removed it.
    pub(crate) fn refresh(&mut self) {
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

    /// The container runs (`process_pid`: its first process on the host, if it is one); after
    /// [`RunGuard::restarting`], once more.
    pub fn running(
        &mut self,
        taps: Vec<String>,
        process_pid: Option<i32>,
    ) -> Result<(), StateError> {
        if self.record.status == Status::Restarting {
            self.record.restart_count += 1;
        }
        self.record.status = Status::Running;
        self.record.started = Some(now());
        self.record.exit_code = None;
        self.record.finished = None;
        self.record.taps = taps;
        self.record.process_pid = process_pid;
        self.save()
    }

    /// The runner runs the container again after it exits, as `policy` says (see
    /// [`RunGuard::exited`]).
    pub fn restart_policy(&mut self, policy: RestartPolicy) {
        self.restart = policy;
    }

    /// Whether the container exited and the runner is to run it again: it shows as restarting.
    pub fn restarts(&self) -> bool {
        self.record.status == Status::Restarting
    }

    /// Between two runs (`--restart`): what only a running container needs goes, as after any
    /// run; the record, the writable layer and the logs stay.
    pub fn clean_between_runs(&self) {
        clean_run_dir(&self.dir);
    }

    /// Whether the runner is to end instead of running the container again: the user stopped
    /// it (`mvm stop`, `rm -f`) or removed its record, or the runner itself got SIGINT or
    /// SIGTERM while no container ran.
    pub fn told_to_stop(&self) -> bool {
        let stopped = self
            .store
            .load(&self.record.id)
            .map_or(true, |r| r.stopped_by_user);
        stopped || signalled(self.record.isolation)
    }

    /// Records a microVM's VMM cgroup as soon as it exists, before a VMM runs in it: should
    /// this process die from then on, whoever cleans up after it (`mvm run`, `mvm rm`) finds it.
    pub fn vmm_cgroup(&mut self, cgroup_dirs: Vec<PathBuf>) -> Result<(), StateError> {
        self.record.vmm_cgroup_dirs = cgroup_dirs;
        self.store.save(&self.record)
    }

    /// Records a microVM's VMM process and its cgroup.
    pub fn vmm(&mut self, pid: i32, cgroup_dirs: Vec<PathBuf>) -> Result<(), StateError> {
        self.record.vmm_pid = Some(pid);
        self.record.vmm_cgroup_dirs = cgroup_dirs;
        self.store.save(&self.record)
    }

    /// Records where the container's cgroup is (so `mvm exec` can join it).
    pub fn cgroups(&mut self, dirs: Vec<PathBuf>) -> Result<(), StateError> {
        self.record.cgroup_dirs = dirs;
        self.save()
    }

    /// Saves what the runner knows; the name and a stop by the user are the store's (`mvm
    /// rename` and `mvm stop` change them there).
    fn save(&mut self) -> Result<(), StateError> {
        let mine = self.record.clone();
        let saved = self.store.update(&self.record.id, |r| {
            let name = std::mem::take(&mut r.name);
            let stopped_by_user = r.stopped_by_user;
            *r = ContainerRecord {
                name,
                stopped_by_user,
                ..mine
            };
        })?;
        self.record = saved;
        Ok(())
    }

    /// The container exited with `code`: it shows as exited, or as restarting when its restart
    /// policy runs it again (decided here, so no reader ever sees it exited in between).
    pub fn exited(&mut self, code: i32) {
        self.record.exit_code = Some(code);
        let again = self.restart.any()
            && !self.told_to_stop()
            && self
                .restart
                .restarts(code, self.record.restart_count, false);
        if !again {
            self.finish();
            return;
        }
        self.record.status = Status::Restarting;
        self.record.finished = Some(now());
        self.record.process_pid = None;
        self.record.cgroup_dirs.clear();
        if let Err(e) = self.save() {
            log::warn!("cannot record the exit of {}: {e}", self.record.name);
        }
    }

    fn finish(&mut self) {
        if self.record.status == Status::Exited {
            return;
        }
        self.record.status = Status::Exited;
        self.record.finished = Some(now());
        if let Err(e) = self.save() {
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
            // Never started (nothing to keep), or --rm. A runner that died on the way (SIGKILL)
            // may have left its VMM's cgroup, which only the record names.
            crate::confine::cgroup::remove_leftover(&self.record.vmm_cgroup_dirs);
            if let Err(e) = self.store.remove(&self.record) {
                log::warn!("cannot remove container {}: {e}", self.record.name);
            }
            return;
        }
        self.finish();
        clean_run_dir(&self.dir);
    }
}

/// Whether this process got SIGINT or SIGTERM while no container ran: blocked and pending (a
/// container or process on the host), or recorded by the handler (a VM).
fn signalled(isolation: Isolation) -> bool {
    match isolation {
        Isolation::Vm => vmm::signals::received().is_some(),
        Isolation::Container | Isolation::Process => {
            guest_agent::runtime::forwarded_signal_pending()
        }
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
        let rotated_log = name
            .to_str()
            .and_then(|n| n.strip_prefix(crate::logs::LOG_FILE)?.strip_prefix('.'))
            .is_some_and(|n| n.parse::<u32>().is_ok());
        if rotated_log || KEEP.iter().any(|k| name.as_encoded_bytes() == k.as_bytes()) {
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
    fn a_container_that_never_started_leaves_no_vmm_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let mut guard = RunGuard::create(store.clone(), record("early"), false).unwrap();
        // The runner made its VMM's cgroup and recorded it, then died (SIGKILL) before the
        // container ran: the guard of `mvm run` removes the record, and the cgroup with it.
        let cgroup = root.path().join("mvm-vmm-early");
        std::fs::create_dir(&cgroup).unwrap();
        guard.vmm_cgroup(vec![cgroup.clone()]).unwrap();
        drop(guard);
        assert!(matches!(store.get("early"), Err(StateError::NotFound(_))));
        assert!(!cgroup.exists());
    }

    #[test]
    fn an_exited_container_keeps_its_record_and_logs_but_not_its_sockets() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let mut guard = RunGuard::create(store.clone(), record("web"), false).unwrap();
        let dir = guard.dir().to_path_buf();
        for f in [
            "vsock.sock",
            "rootfs.ext4",
            "container.log",
            "container.log.1",
            "console.log",
        ] {
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
        assert_eq!(
            left,
            [
                "console.log",
                "container.log",
                "container.log.1",
                "state.json"
            ]
        );
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
    fn a_restart_policy_shows_the_exit_as_restarting_until_the_user_stops_it() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let mut guard = RunGuard::create(store.clone(), record("svc"), false).unwrap();
        guard.restart_policy(RestartPolicy::OnFailure {
            max_retries: Some(1),
        });
        guard.running(vec![], Some(7)).unwrap();
        guard.exited(3);
        let r = store.get("svc").unwrap();
        assert!(guard.restarts());
        assert_eq!(
            (r.status, r.exit_code, r.process_pid),
            (Status::Restarting, Some(3), None)
        );
        guard.running(vec![], Some(8)).unwrap();
        let r = store.get("svc").unwrap();
        assert_eq!(
            (r.status, r.exit_code, r.restart_count),
            (Status::Running, None, 1)
        );
        // The one restart it was allowed is spent.
        guard.exited(3);
        assert!(!guard.restarts());
        assert_eq!(store.get("svc").unwrap().status, Status::Exited);

        // `mvm stop` marks the record; the runner's own saves keep the mark, and it does not
        // restart what the user stopped.
        let mut guard = RunGuard::create(store.clone(), record("always"), false).unwrap();
        guard.restart_policy(RestartPolicy::Always);
        guard.running(vec![], Some(9)).unwrap();
        store
            .update(&guard.record().id, |r| r.stopped_by_user = true)
            .unwrap();
        guard.cgroups(vec![]).unwrap();
        assert!(store.get("always").unwrap().stopped_by_user);
        guard.exited(143);
        assert!(!guard.restarts());
        let r = store.get("always").unwrap();
        assert_eq!((r.status, r.restart_count), (Status::Exited, 0));
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
