//! Container state kept under the mvm root, so `ps`, `logs`, `stop`, `rm` and `inspect` work from
//! any shell: `<root>/containers/<id>/state.json` per container, and `<root>/containers/names/<name>`
//! holding the id, created with O_EXCL so two `run --name web` cannot both win.
//!
//! A record names the mvm process that runs the container (pid plus its start time, so a reused
//! pid is not mistaken for it). A record that says running whose process is gone is shown as
//! exited: the VMM died (`kill -9`), and `rm` cleans up after it.

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
    /// A name that is not `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
    #[error("invalid container name '{0}': use letters, digits, '_', '.' and '-'")]
    InvalidName(String),
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

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
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
    /// Image reference as given.
    pub image: String,
    /// `vm`, `container` or `process`.
    pub isolation: String,
    /// The command that runs.
    pub command: Vec<String>,
    /// Published ports as given (`8080:80`).
    #[serde(default)]
    pub ports: Vec<String>,
    /// Seconds since the epoch.
    pub created: u64,
    /// Last known status.
    pub status: Status,
    /// Exit code once exited (None when the runner died without recording one).
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The mvm process that runs the container.
    #[serde(default)]
    pub pid: Option<i32>,
    /// Start time of `pid` (field 22 of /proc/PID/stat), to detect pid reuse.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// Control socket of the running container, if any.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Seconds since the epoch when the container started running.
    #[serde(default)]
    pub started: Option<u64>,
    /// Seconds since the epoch when it ended (None when the runner died without recording it).
    #[serde(default)]
    pub finished: Option<u64>,
    /// Tap devices the VM uses, removed by `rm` when the runner died without cleaning up.
    #[serde(default)]
    pub taps: Vec<String>,
}

impl ContainerRecord {
    /// The record of a container this process is about to run: created now, not started.
    pub fn new(
        id: String,
        name: String,
        image: String,
        isolation: &str,
        command: Vec<String>,
        ports: Vec<String>,
    ) -> Self {
        let pid = i32::try_from(std::process::id()).ok();
        ContainerRecord {
            id,
            name,
            image,
            isolation: isolation.into(),
            command,
            ports,
            created: now(),
            status: Status::Created,
            exit_code: None,
            pid,
            pid_start: pid.and_then(process_start_time),
            control_socket: None,
            started: None,
            finished: None,
            taps: Vec::new(),
        }
    }

    /// The status as seen now: a running record whose process is gone counts as exited.
    pub fn live_status(&self) -> Status {
        match (self.status, self.pid) {
            (Status::Running | Status::Created, Some(pid))
                if !process_alive(pid, self.pid_start) =>
            {
                Status::Exited
            }
            (s, _) => s,
        }
    }
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

    /// Directory of one container (logs, sockets and disks live there too).
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Registers a new container: reserves its name and writes its first record.
    pub fn create(&self, record: &ContainerRecord) -> Result<(), StateError> {
        validate_name(&record.name)?;
        let name_path = self.dir.join("names").join(&record.name);
        let mut f = match rootdir::private_file()
            .write(true)
            .create_new(true)
            .open(&name_path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateError::NameInUse(record.name.clone()))
            }
            Err(e) => return Err(io_err(&name_path)(e)),
        };
        f.write_all(record.id.as_bytes())
            .map_err(io_err(&name_path))?;
        let dir = self.container_dir(&record.id);
        rootdir::create_dir(&dir, rootdir::PRIVATE_DIR)?;
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

    fn load(&self, id: &str) -> Result<ContainerRecord, StateError> {
        let path = self.container_dir(id).join("state.json");
        let data = fs::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&data).map_err(|source| StateError::Corrupt { path, source })
    }

    /// Every container, oldest first. Unreadable records are skipped with a warning.
    pub fn list(&self) -> Result<Vec<ContainerRecord>, StateError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "names" {
                continue;
            }
            match self.load(&name) {
                Ok(r) => out.push(r),
                Err(e) => log::warn!("skipping container {name}: {e}"),
            }
        }
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    /// Finds a container by exact name, exact id or unique id prefix.
    pub fn get(&self, name_or_id: &str) -> Result<ContainerRecord, StateError> {
        if validate_name(name_or_id).is_ok() {
            if let Ok(id) = fs::read_to_string(self.dir.join("names").join(name_or_id)) {
                if let Ok(r) = self.load(id.trim()) {
                    return Ok(r);
                }
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

    /// Forgets a container: its directory (logs, sockets, disks) and its name.
    pub fn remove(&self, record: &ContainerRecord) -> Result<(), StateError> {
        let dir = self.container_dir(&record.id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        let name_path = self.dir.join("names").join(&record.name);
        match fs::read_to_string(&name_path) {
            Ok(id) if id.trim() == record.id => {
                fs::remove_file(&name_path).map_err(io_err(&name_path))?
            }
            _ => {}
        }
        Ok(())
    }
}

/// Checks a container name.
pub fn validate_name(name: &str) -> Result<(), StateError> {
    let ok = name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidName(name.to_string()))
    }
}

/// A fresh random container id (16 hex digits).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> ContainerRecord {
        let mut r = ContainerRecord::new(
            new_id(),
            name.into(),
            "busybox".into(),
            "vm",
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
    fn bad_names_are_refused() {
        for bad in ["", "-x", "a/b", "..", "a b", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        validate_name("web-1.prod_a").unwrap();
    }
}
