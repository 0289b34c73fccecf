//! Container state kept under the mvm root, so `ps`, `logs`, `stop`, `rm` and `inspect` work from
//! any shell, for every isolation alike: one record per run.
//!
//! - `<root>/containers/<id>/`: the container's directory: `state.json` (its
//!   [`ContainerRecord`]), `spec.json` (the run spec), its logs and, while it runs, its sockets
//!   and disks; a container's writable layer (`upper/`).
//! - `<root>/containers/<name>`: a symlink to `<id>`, the name. Names and ids share one
//!   namespace; creating the link is atomic, so two `run --name web` cannot both win.
//!
//! A record names the mvm process that runs the container (pid plus its start time, so a reused
//! pid is not mistaken for it). A record that says running whose process is gone is shown as
//! exited: the runner died (`kill -9`), and `rm` cleans up after it.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rootfs_builder::rootdir;
use serde::{Deserialize, Serialize};

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the state directory failed.
    #[error("container state in {path}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A state file that does not parse.
    #[error("corrupt container state {path}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// `--name` already in use.
    #[error("the name '{0}' is already in use by another container (remove it with `mvm rm {0}`)")]
    NameInUse(String),
    /// A name that is not 1-64 characters of `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
    #[error(transparent)]
    InvalidName(#[from] guest_agent::runtime::spec::SpecError),
    /// No container by that name or id.
    #[error("no such container: {0}")]
    NotFound(String),
    /// An id prefix that matches several containers.
    #[error("'{0}' matches more than one container; give more of the id")]
    Ambiguous(String),
    /// The mvm root is not safe to use.
    #[error(transparent)]
    Root(#[from] rootdir::RootDirError),
}

impl StateError {
    /// Whether the error is the user's input being wrong (a name, an id).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            StateError::NameInUse(_)
                | StateError::InvalidName(_)
                | StateError::NotFound(_)
                | StateError::Ambiguous(_)
        )
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How the command is isolated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Its own VM and guest kernel.
    #[default]
    Vm,
    /// A container on the host kernel (namespaces, overlay root, cgroup limits).
    Container,
    /// A plain process on the host: no namespaces, no limits.
    Process,
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isolation::Vm => "vm",
            Isolation::Container => "container",
            Isolation::Process => "process",
        })
    }
}

/// Lifecycle state of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being set up.
    Created,
    /// Its process is running.
    Running,
    /// Its process exited and the runner starts it again (`--restart`).
    Restarting,
    /// It ended.
    Exited,
}

/// What `ps` and `inspect` show, persisted as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerRecord {
    /// 16 hex digits, unique.
    pub id: String,
    /// User-given or generated name, unique.
    pub name: String,
    /// Image reference as given (or the root directory).
    pub image: String,
    /// How it is isolated.
    pub isolation: Isolation,
    /// The command that runs.
    pub command: Vec<String>,
    /// Published ports (`127.0.0.1:8080:80`).
    #[serde(default)]
    pub ports: Vec<String>,
    /// Seconds since the epoch.
    pub created: u64,
    /// Last known status.
    pub status: Status,
    /// Exit code once exited (None when the runner died without recording one).
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The mvm process that runs the container (the foreground `mvm run`, or the runner).
    #[serde(default)]
    pub pid: Option<i32>,
    /// Start time of `pid` (field 22 of /proc/PID/stat), to detect pid reuse.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// The host pid of the container's first process (`--isolation container` and `process`):
    /// a child of `pid`, so it names that process for as long as `pid` lives.
    #[serde(default)]
    pub process_pid: Option<i32>,
    /// The container's cgroup directories (`--isolation container`), for `mvm exec` to join.
    #[serde(default)]
    pub cgroup_dirs: Vec<PathBuf>,
    /// Seconds since the epoch when the container started running.
    #[serde(default)]
    pub started: Option<u64>,
    /// Seconds since the epoch when it ended (None when the runner died without recording it).
    #[serde(default)]
    pub finished: Option<u64>,
    /// Tap devices the VM uses, removed by `rm` when the runner died without cleaning up.
    #[serde(default)]
    pub taps: Vec<String>,
    /// How many times the runner started it again (`--restart`).
    #[serde(default)]
    pub restart_count: u32,
    /// `mvm stop` (or `rm -f`) ended it: the runner does not restart it.
    #[serde(default)]
    pub stopped_by_user: bool,
    /// The VMM process of a microVM (a child of the runner `pid`, in its own pid namespace).
    #[serde(default)]
    pub vmm_pid: Option<i32>,
    /// The VMM's cgroup directories (`mvm stats`; removed by `rm` when the runner died first).
    #[serde(default)]
    pub vmm_cgroup_dirs: Vec<PathBuf>,
    /// The VM's vCPUs are stopped (`mvm pause`).
    #[serde(default)]
    pub paused: bool,
}

impl ContainerRecord {
    /// The record of a container this process is about to run: created now, not started.
    pub fn new(
        id: String,
        name: String,
        image: String,
        isolation: Isolation,
        command: Vec<String>,
        ports: Vec<String>,
    ) -> Self {
        let (pid, pid_start) = this_process();
        ContainerRecord {
            id,
            name,
            image,
            isolation,
            command,
            ports,
            created: now(),
            status: Status::Created,
            exit_code: None,
            pid,
            pid_start,
            process_pid: None,
            cgroup_dirs: Vec::new(),
            started: None,
            finished: None,
            taps: Vec::new(),
            restart_count: 0,
            stopped_by_user: false,
            vmm_pid: None,
            vmm_cgroup_dirs: Vec::new(),
            paused: false,
        }
    }

    /// The status as seen now: a running record whose process is gone counts as exited.
    pub fn live_status(&self) -> Status {
        match (self.status, self.pid) {
            (Status::Running | Status::Restarting | Status::Created, Some(pid))
                if !process_alive(pid, self.pid_start) =>
            {
                Status::Exited
            }
            (s, _) => s,
        }
    }
}

/// This process's pid and start time, as a record names the process that runs a container.
pub fn this_process() -> (Option<i32>, Option<u64>) {
    let pid = i32::try_from(std::process::id()).ok();
    (pid, pid.and_then(process_start_time))
}

/// Whether `pid` still runs and is the same process (same start time).
pub fn process_alive(pid: i32, start: Option<u64>) -> bool {
    match (process_start_time(pid), start) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Field 22 (starttime) of /proc/PID/stat; None when there is no such process or it is a zombie
/// (dead, waiting to be reaped by whoever adopted it).
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The mvm root where `--root` is not given: /var/lib/mvm for root, else `$XDG_DATA_HOME/mvm`
/// (`~/.local/share/mvm`). A given root is made absolute, so paths derived from it work as
/// overlay and mount options.
pub fn default_root(given: Option<PathBuf>) -> PathBuf {
    if let Some(root) = given {
        return std::path::absolute(&root).unwrap_or(root);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/mvm");
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("mvm"),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".local/share/mvm"),
    }
}

/// The container state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Opens (creating if needed) `<root>/containers`, root-only like the whole mvm root
    /// ([`rootdir::prepare_root`]).
    pub fn open(root: &Path) -> Result<Self, StateError> {
        rootdir::prepare_root(root)?;
        let dir = root.join("containers");
        Ok(StateStore { dir })
    }

    /// The store and container id of a container directory (`<root>/containers/<id>`).
    pub fn of_container_dir(dir: &Path) -> Option<(StateStore, String)> {
        let id = dir.file_name()?.to_str()?.to_string();
        let store = StateStore {
            dir: dir.parent()?.to_path_buf(),
        };
        Some((store, id))
    }

    /// The mvm root the store lives in.
    pub fn root(&self) -> &Path {
        self.dir.parent().unwrap_or(&self.dir)
    }

    /// Directory of one container (logs, sockets and disks live there too).
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Registers a new container: reserves its name, creates its directory and writes its first
    /// record.
    pub fn create(&self, record: &ContainerRecord) -> Result<(), StateError> {
        validate_name(&record.name)?;
        let name_path = self.dir.join(&record.name);
        match std::os::unix::fs::symlink(&record.id, &name_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateError::NameInUse(record.name.clone()))
            }
            Err(e) => return Err(io_err(&name_path)(e)),
        }
        let dir = self.container_dir(&record.id);
        if let Err(e) = rootdir::create_dir(&dir, rootdir::PRIVATE_DIR) {
            let _ = fs::remove_file(&name_path);
            return Err(e.into());
        }
        self.save(record)
    }

    /// Replaces a container's record atomically (write a temp file, then rename).
    pub fn save(&self, record: &ContainerRecord) -> Result<(), StateError> {
        let path = self.container_dir(&record.id).join("state.json");
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(record).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut f = rootdir::create_private_file(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&json).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// The record in container directory `id`.
    pub fn load(&self, id: &str) -> Result<ContainerRecord, StateError> {
        let path = self.container_dir(id).join("state.json");
        let data = fs::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&data).map_err(|source| StateError::Corrupt { path, source })
    }

    /// Every container, oldest first. Unreadable records are skipped with a warning.
    pub fn list(&self) -> Result<Vec<ContainerRecord>, StateError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            // Names are symlinks; a container is a directory with a record.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let id = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().join("state.json").exists() {
                log::debug!("{} holds no container record", entry.path().display());
                continue;
            }
            match self.load(&id) {
                Ok(r) => out.push(r),
                Err(e) => log::warn!("skipping container {id}: {e}"),
            }
        }
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    /// Finds a container by exact name, exact id or unique id prefix.
    pub fn get(&self, name_or_id: &str) -> Result<ContainerRecord, StateError> {
        if validate_name(name_or_id).is_ok() {
            let path = self.dir.join(name_or_id);
            if let Ok(id) = fs::read_link(&path) {
                if let Some(r) = id.to_str().and_then(|id| self.load(id).ok()) {
                    return Ok(r);
                }
            } else if path.join("state.json").is_file() {
                return self.load(name_or_id);
            }
        }
        let matches: Vec<_> = self
            .list()?
            .into_iter()
            .filter(|r| r.id.starts_with(name_or_id) && !name_or_id.is_empty())
            .collect();
        match matches.len() {
            0 => Err(StateError::NotFound(name_or_id.to_string())),
            1 => Ok(matches
                .into_iter()
                .next()
                .ok_or_else(|| StateError::NotFound(name_or_id.into()))?),
            _ => Err(StateError::Ambiguous(name_or_id.to_string())),
        }
    }

    /// Changes a record under the container directory's lock (so a runner saving its status and
    /// a `rename` never undo each other) and returns it as saved.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut ContainerRecord),
    ) -> Result<ContainerRecord, StateError> {
        let dir = self.container_dir(id);
        let lock = fs::File::open(&dir).map_err(io_err(&dir))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err(&dir)(e.into()))?;
        let mut record = self.load(id)?;
        change(&mut record);
        self.save(&record)?;
        Ok(record)
    }

    /// Gives container `record` the name `new` (free, and valid): the new name's link is made
    /// first (atomically, so two renames cannot take one name), then the record, then the old
    /// link goes.
    pub fn rename(&self, record: &ContainerRecord, new: &str) -> Result<(), StateError> {
        validate_name(new)?;
        let new_link = self.dir.join(new);
        match std::os::unix::fs::symlink(&record.id, &new_link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateError::NameInUse(new.to_string()))
            }
            Err(e) => return Err(io_err(&new_link)(e)),
        }
        let mut old = String::new();
        if let Err(e) = self.update(&record.id, |r| {
            old = std::mem::replace(&mut r.name, new.to_string());
        }) {
            let _ = fs::remove_file(&new_link);
            return Err(e);
        }
        let old_link = self.dir.join(&old);
        if fs::read_link(&old_link).is_ok_and(|id| id.as_os_str() == record.id.as_str()) {
            fs::remove_file(&old_link).map_err(io_err(&old_link))?;
        }
        Ok(())
    }

    /// Forgets a container: its directory (logs, sockets, disks, writable layer) and its name.
    pub fn remove(&self, record: &ContainerRecord) -> Result<(), StateError> {
        let dir = self.container_dir(&record.id);
        // The name as saved last (it may have been renamed since `record` was read).
        let name = self
            .load(&record.id)
            .map_or_else(|_| record.name.clone(), |r| r.name);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        let name_path = self.dir.join(&name);
        match fs::read_link(&name_path) {
            Ok(id) if id.as_os_str() == record.id.as_str() => {
                fs::remove_file(&name_path).map_err(io_err(&name_path))?
            }
            _ => {}
        }
        Ok(())
    }
}

/// Checks a container name: 1-64 characters of `[a-zA-Z0-9][a-zA-Z0-9_.-]*` (it also names
/// the container's cgroup and is its default hostname).
pub fn validate_name(name: &str) -> Result<(), StateError> {
    Ok(guest_agent::runtime::spec::validate_id(name)?)
}

/// A fresh random container id (16 hex digits): the one id generator of mvm.
pub fn new_id() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the valid buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != 8 {
        // Fall back to time and pid; ids only need to be unique on this host.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        bytes = (u64::from(t) << 32 | u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds since the epoch, now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Records for unit tests, here and in the crates that use the engine.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::{new_id, process_start_time, ContainerRecord, Status};
    use crate::spec::Isolation;

    /// An nginx VM container `name` with a port, created and started at time 1000, in
    /// `status`, with runner `pid` (its start time read, so a live pid is a live runner).
    pub fn record(name: &str, status: Status, pid: Option<i32>) -> ContainerRecord {
        let mut r = ContainerRecord::new(
            format!("abcdef012345{}", &new_id()[..4]),
            name.into(),
            "nginx".into(),
            Isolation::Vm,
            vec!["nginx".into()],
            vec!["8080:80".into()],
        );
        r.created = 1000;
        r.started = Some(1000);
        r.status = status;
        r.pid = pid;
        r.pid_start = pid.and_then(process_start_time);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> ContainerRecord {
        let mut r = ContainerRecord::new(
            new_id(),
            name.into(),
            "busybox".into(),
            Isolation::Vm,
            vec!["sh".into()],
            vec![],
        );
        r.status = Status::Running;
        r
    }

    #[test]
    fn names_are_unique_until_the_container_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let web = record("web");
        store.create(&web).unwrap();
        let err = store.create(&record("web")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the name 'web' is already in use by another container (remove it with `mvm rm web`)"
        );
        assert_eq!(store.get("web").unwrap(), web);
        assert_eq!(store.get(&web.id[..6]).unwrap(), web);
        store.remove(&web).unwrap();
        assert!(matches!(store.get("web"), Err(StateError::NotFound(_))));
        store.create(&record("web")).unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn a_runner_that_died_shows_as_exited() {
        let mut r = record("x");
        assert_eq!(r.live_status(), Status::Running);
        // Our own pid with a different start time: a reused pid, not our runner.
        r.pid_start = r.pid_start.map(|s| s + 1);
        assert_eq!(r.live_status(), Status::Exited);
        r.pid = Some(i32::MAX);
        r.pid_start = None;
        assert_eq!(r.live_status(), Status::Exited);
        // A killed child nobody reaped yet is a zombie: dead too.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!process_alive(pid, None));
        child.wait().unwrap();
    }

    #[test]
    fn ids_are_sixteen_hex_digits_and_their_first_twelve_make_a_name() {
        let id = new_id();
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, new_id());
        validate_name(&id[..12]).unwrap();
    }

    #[test]
    fn a_name_is_a_link_to_the_record_and_shares_the_ids_namespace() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let web = record("web");
        store.create(&web).unwrap();
        let link = root.path().join("containers/web");
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new(&web.id));
        assert_eq!(store.get(&web.id).unwrap(), web);
        // A name may not take another container's id.
        let mut other = record("x");
        other.name.clone_from(&web.id);
        assert!(matches!(
            store.create(&other),
            Err(StateError::NameInUse(_))
        ));
        assert_eq!(store.list().unwrap(), [web]);
    }

    #[test]
    fn rename_moves_the_name_and_keeps_everything_else() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::open(root.path()).unwrap();
        let web = record("web");
        store.create(&web).unwrap();
        store.create(&record("db")).unwrap();
        assert!(matches!(
            store.rename(&web, "db"),
            Err(StateError::NameInUse(_))
        ));
        store.rename(&web, "front").unwrap();
        assert!(matches!(store.get("web"), Err(StateError::NotFound(_))));
        let r = store.get("front").unwrap();
        assert_eq!((r.id.as_str(), r.name.as_str()), (web.id.as_str(), "front"));
        // A runner saving its status keeps the new name.
        let saved = store
            .update(&web.id, |r| r.status = Status::Exited)
            .unwrap();
        assert_eq!(saved.name, "front");
        // Removing with the old record removes the new name.
        store.remove(&web).unwrap();
        assert!(!root.path().join("containers/front").exists());
        assert!(store.get("db").is_ok());
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", "-x", "a/b", "..", "a b", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        validate_name("web-1.prod_a").unwrap();
    }
}
