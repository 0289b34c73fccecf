//! Snapshots of running microVM containers (`mvm snapshot create|ls|rm`) and the forks started
//! from them (`mvm run --from-snapshot`).
//!
//! `create` stops the container's vCPUs, has its VMM write the VM (vCPUs, devices, memory:
//! the container's processes and its writable layer, which lives on the guest's tmpfs) into
//! files this process created and handed it over the control socket (a jailed VMM opens no
//! file), copies the VM's writable disks (its volumes) while the guest stands still, and lets
//! it run again. A snapshot is made in a `.tmp-<pid>-...` directory and renamed into place
//! when whole, so a killed `create` leaves nothing `ls` lists or a fork restores (the next
//! `create` or `rm` removes the leftover).
//!
//! A fork is a new container whose VM restores the snapshot: its memory file is mapped
//! privately (copy on write), so every fork of one snapshot shares its pages until it writes
//! them; its container goes on where the parent's was, with fresh randomness, the time, a new
//! MAC and its own published ports. The disks it attaches must be those the snapshot was
//! taken with: the image's disk is named by path, size and modification time
//! ([`FileId`]), and a changed one is refused with one line.
//!
//! On disk, `<root>/snapshots/<name>/`: `state`, `memory`, `snapshot.json`
//! ([`SnapshotInfo`]) and `volume-N.ext4` copies.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::{self, ControlError, Request, Response};
use crate::error::{bad_input, io_error, Error};
use crate::lifecycle;
use crate::spec::{Isolation, Network, RunSpec};
use crate::state::{ContainerRecord, StateStore, Status};
use crate::template::FileId;

/// The snapshot directory under the mvm root.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// A snapshot's description in its directory.
pub const INFO_FILE: &str = "snapshot.json";
/// How long a VMM may take to write a snapshot (its memory file on a slow disk).
const SAVE_LIMIT: Duration = Duration::from_secs(600);

/// `snapshot.json`: what a snapshot was taken of and what a fork needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// The container it was taken of (name and id then).
    pub container: String,
    /// That container's id.
    pub container_id: String,
    /// The image, as `ps` shows it.
    pub image: String,
    /// The container's run spec (its image digest pinned): a fork runs the same.
    pub spec: RunSpec,
    /// The root filesystem disk the VM had attached (the image's cached disk).
    pub rootfs_disk: FileId,
    /// The copies of its volume disks in the snapshot's directory, in order.
    pub volumes: Vec<FileId>,
    /// mvm's snapshot version.
    pub mvm_version: String,
    /// Milliseconds the container's vCPUs stood still while its VMM wrote the snapshot.
    pub paused_ms: u64,
    /// Pages of guest memory that held data.
    pub data_pages: u64,
}

/// One snapshot as `ls` shows it.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    /// Its name.
    pub name: String,
    /// Its description; `None` for a broken snapshot.
    pub info: Option<SnapshotInfo>,
    /// Bytes its files take on disk.
    pub disk_bytes: u64,
}

/// The snapshots under one mvm root.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
}

fn read_info(dir: &Path) -> Option<SnapshotInfo> {
    let bytes = fs::read(dir.join(INFO_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl SnapshotStore {
    /// The store of `root` (created when first needed, root-only like the rest of the root).
    pub fn open(root: &Path) -> Result<Self, Error> {
        Ok(Self {
            dir: crate::template::store_dir(root, SNAPSHOTS_DIR)?,
        })
    }

    /// Snapshot `name`'s directory and description; one line where there is none.
    pub fn find(&self, name: &str) -> Result<(PathBuf, SnapshotInfo), Error> {
        crate::state::validate_name(name)
            .map_err(|e| bad_input(format!("snapshot name {name:?}: {e}")))?;
        let dir = self.dir.join(name);
        match read_info(&dir) {
            Some(info) if info.mvm_version == vmm::snapshot::mvm_version() => Ok((dir, info)),
            Some(info) => Err(bad_input(format!(
                "snapshot {name} was taken by mvm {} (this is {}): start the container afresh",
                info.mvm_version,
                vmm::snapshot::mvm_version()
            ))),
            None if dir.exists() => Err(bad_input(format!(
                "snapshot {name} is broken (no readable {INFO_FILE}): `mvm snapshot rm {name}`"
            ))),
            None => Err(bad_input(format!("no such snapshot: {name}"))),
        }
    }

    /// Every snapshot, by name (leftovers of killed `create`s are not listed).
    pub fn list(&self) -> Result<Vec<SnapshotEntry>, Error> {
        Ok(crate::template::store_entries(&self.dir)?
            .into_iter()
            .map(|(name, dir)| SnapshotEntry {
                info: read_info(&dir),
                disk_bytes: crate::template::disk_usage(&dir),
                name,
            })
            .collect())
    }

    /// Removes snapshot `name` (forks running from it keep its memory: their mappings hold
    /// the file).
    pub fn remove(&self, name: &str) -> Result<(), Error> {
        self.prune_leftovers();
        crate::state::validate_name(name)
            .map_err(|e| bad_input(format!("snapshot name {name:?}: {e}")))?;
        let dir = self.dir.join(name);
        if !dir.is_dir() {
            return Err(bad_input(format!("no such snapshot: {name}")));
        }
        fs::remove_dir_all(&dir).map_err(io_error("remove", &dir))
    }

    /// Removes what killed `create`s left (`.tmp-<pid>-...` of a process that is gone).
    fn prune_leftovers(&self) {
        crate::template::remove_dead_leftovers(&self.dir);
    }

    /// A fresh directory to make snapshot `name` in (not listed until renamed into place).
    fn begin(&self, name: &str) -> Result<PathBuf, Error> {
        self.prune_leftovers();
        crate::state::validate_name(name)
            .map_err(|e| bad_input(format!("snapshot name {name:?}: {e}")))?;
        if self.dir.join(name).exists() {
            return Err(bad_input(format!(
                "a snapshot named {name} exists: `mvm snapshot rm {name}` first"
            )));
        }
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            &crate::state::new_id()[..8]
        ));
        rootfs_builder::rootdir::create_dir(&tmp, rootfs_builder::rootdir::PRIVATE_DIR)?;
        Ok(tmp)
    }

    /// Writes `info` into the finished snapshot in `tmp` and moves it into place.
    fn commit(&self, tmp: &Path, info: &SnapshotInfo) -> Result<PathBuf, Error> {
        let path = tmp.join(INFO_FILE);
        let json = serde_json::to_vec_pretty(info)
            .map_err(|e| io_error("write", &path)(io::Error::other(e)))?;
        let mut file = rootfs_builder::rootdir::private_file()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(io_error("create", &path))?;
        io::Write::write_all(&mut file, &json).map_err(io_error("write", &path))?;
        let dest = self.dir.join(&info.name);
        if dest.exists() {
            return Err(bad_input(format!(
                "a snapshot named {} was made meanwhile",
                info.name
            )));
        }
        fs::rename(tmp, &dest).map_err(io_error("create", &dest))?;
        Ok(dest)
    }
}

/// What `mvm snapshot create` did.
#[derive(Debug, Clone)]
pub struct Created {
    /// The snapshot's description.
    pub info: SnapshotInfo,
    /// Its directory.
    pub dir: PathBuf,
}

/// Takes snapshot `name` of running VM container `container` (see the module).
pub fn create(root: &Path, container: &str, name: &str) -> Result<Created, Error> {
    let (store, r) = lifecycle::find(root, container)?;
    if r.isolation != Isolation::Vm {
        return Err(bad_input(format!(
            "container {} is not a VM: only --isolation vm containers have snapshots",
            r.name
        )));
    }
    if r.live_status() != Status::Running {
        return Err(bad_input(format!("container {} is not running", r.name)));
    }
    let snapshots = SnapshotStore::open(root)?;
    let dir = store.container_dir(&r.id);
    let spec = crate::runner::read_spec(&dir)?;
    let disks = crate::run::vm_disks(root, &spec, &dir)?;
    let tmp = snapshots.begin(name)?;
    let made = take(&store, &r, &disks, &tmp);
    let made = made.and_then(|(rootfs_disk, volumes, saved)| {
        let info = SnapshotInfo {
            name: name.to_string(),
            created: crate::state::now(),
            container: r.name.clone(),
            container_id: r.id.clone(),
            image: r.image.clone(),
            spec,
            rootfs_disk,
            volumes,
            mvm_version: vmm::snapshot::mvm_version(),
            paused_ms: saved.0,
            data_pages: saved.1,
        };
        let dir = snapshots.commit(&tmp, &info)?;
        Ok(Created { info, dir })
    });
    if made.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    made
}

/// The disks of a running VM container: its root filesystem disk and its volumes' disks.
#[derive(Debug, Clone)]
pub struct VmDisks {
    /// The root filesystem disk (read-only).
    pub rootfs: PathBuf,
    /// The volume disks, /dev/vdb on.
    pub volumes: Vec<PathBuf>,
}

type Taken = (FileId, Vec<FileId>, (u64, u64));

/// Saves the VM into `tmp` and copies its disks there, its vCPUs stopped throughout (they
/// run again afterwards unless the container was paused before).
fn take(
    store: &StateStore,
    r: &ContainerRecord,
    disks: &VmDisks,
    tmp: &Path,
) -> Result<Taken, Error> {
    let control_path = store.container_dir(&r.id).join(control::SOCKET);
    let snapshots_dir = tmp.parent().map(Path::to_path_buf).unwrap_or_default();
    let refused = |e: ControlError| match e {
        ControlError::Refused(msg) => Error::Failed(format!("{}: {msg}", r.name)),
        e => Error::Failed(format!("{}: {e}", r.name)),
    };
    let pause = !r.paused && !disks.volumes.is_empty();
    if pause {
        // The record says paused first: a `create` killed before it resumed the VM leaves a
        // container `mvm unpause` resumes.
        store.update(&r.id, |r| r.paused = true)?;
        if let Err(e) = control::call(&control_path, &Request::Pause) {
            let _ = store.update(&r.id, |r| r.paused = false);
            return Err(refused(e));
        }
    }
    let taken = (|| {
        let create = |path: PathBuf| {
            rootfs_builder::rootdir::private_file()
                .create_new(true)
                .write(true)
                .open(&path)
                .map_err(io_error("create", &path))
        };
        let memory = create(vmm::snapshot::memory_path(tmp))?;
        let state = create(vmm::snapshot::state_path(tmp))?;
        let saved = match control::snapshot(&control_path, tmp, &memory, &state, SAVE_LIMIT)
            .map_err(refused)?
        {
            Response::Saved {
                paused_ms,
                data_pages,
            } => (paused_ms, data_pages),
            other => {
                return Err(Error::Failed(format!(
                    "{}: unexpected answer to a snapshot: {other:?}",
                    r.name
                )))
            }
        };
        let mut volumes = Vec::new();
        for (i, disk) in disks.volumes.iter().enumerate() {
            let copy = tmp.join(format!("volume-{i}.ext4"));
            fs::copy(disk, &copy).map_err(io_error("copy", disk))?;
            volumes.push(FileId::of(&copy)?);
        }
        // A disk made for this container alone (`--rootfs DIR`, or the copy in the snapshot
        // a fork runs from) goes with the snapshot; an image's cached disk is named.
        let own = [store.container_dir(&r.id), snapshots_dir.clone()];
        let rootfs = if own.iter().any(|d| disks.rootfs.starts_with(d)) {
            let copy = tmp.join("rootfs.ext4");
            fs::copy(&disks.rootfs, &copy).map_err(io_error("copy", &disks.rootfs))?;
            FileId::of(&copy)?
        } else {
            FileId::of(&disks.rootfs)?
        };
        Ok((rootfs, volumes, saved))
    })();
    if pause {
        match control::call(&control_path, &Request::Unpause) {
            Ok(_) => {
                let _ = store.update(&r.id, |r| r.paused = false);
            }
            Err(e) => log::warn!("{}: cannot resume it: {e}", r.name),
        }
    }
    taken
}

/// The spec of a fork of snapshot `name`: the snapshot's container's spec, with what is
/// particular to this run taken from `run` (name, `--rm`, `-d`, `-i`, `-t`, published ports,
/// timeout, restart policy, log options, and its network where given: see [`fork_network`]).
pub fn fork_spec(root: &Path, name: &str, run: RunSpec) -> Result<RunSpec, Error> {
    let (_, info) = SnapshotStore::open(root)?.find(name)?;
    check_disks(name, &info)?;
    let network = fork_network(name, run.network, info.spec.network.clone())?;
    Ok(RunSpec {
        network,
        name: run.name,
        remove: run.remove,
        detach: run.detach,
        interactive: run.interactive,
        tty: run.tty,
        publish: run.publish,
        timeout: run.timeout,
        restart: run.restart,
        log: run.log,
        from_snapshot: Some(name.to_string()),
        cold: false,
        ..info.spec
    })
}

/// A fork's network: its own (`--network`) where given, of the same kind of device as its
/// snapshot's (a network interface or none: the guest's devices are the snapshot's); else the
/// snapshot's, unless that names a tap or its address (the parent's own).
fn fork_network(
    name: &str,
    own: Option<Network>,
    parent: Option<Network>,
) -> Result<Option<Network>, Error> {
    let has_nic = |n: &Option<Network>| match n {
        Some(Network::None | Network::Host) => false,
        Some(Network::User | Network::Tap { .. }) => true,
        None => devices::virtio::net::passt_available(),
    };
    match own {
        Some(n) if has_nic(&Some(n.clone())) != has_nic(&parent) => {
            let (has, kinds) = match has_nic(&parent) {
                true => ("has a", "user or tap"),
                false => ("has no", "none"),
            };
            Err(bad_input(format!(
                "snapshot {name}: its VM {has} network interface: a fork takes --network {kinds}"
            )))
        }
        Some(n) => Ok(Some(n)),
        None => match parent {
            Some(Network::Tap { name: tap, host_ip }) if tap.is_some() || host_ip.is_some() => {
                Err(bad_input(format!(
                    "snapshot {name}: its container's tap and address are its own: give the fork \
                     --network user, tap or tap:NAME,IP/PREFIX"
                )))
            }
            parent => Ok(parent),
        },
    }
}

/// Refuses a snapshot whose disks are not those it was taken with.
fn check_disks(name: &str, info: &SnapshotInfo) -> Result<(), Error> {
    for disk in std::iter::once(&info.rootfs_disk).chain(&info.volumes) {
        if !disk.unchanged() {
            return Err(bad_input(format!(
                "snapshot {name}: disk {} changed since the snapshot was taken",
                disk.path.display()
            )));
        }
    }
    Ok(())
}

/// What a fork of snapshot `name` restores and attaches: the snapshot's directory and its
/// disks, each checked to be the one the snapshot was taken with; the volumes are copied into
/// `run_dir` (each fork writes its own).
pub fn fork_disks(root: &Path, name: &str, run_dir: &Path) -> Result<(PathBuf, VmDisks), Error> {
    let (dir, info) = SnapshotStore::open(root)?.find(name)?;
    check_disks(name, &info)?;
    let mut volumes = Vec::new();
    for (i, disk) in info.volumes.iter().enumerate() {
        let copy = run_dir.join(format!("volume-{i}.ext4"));
        fs::copy(&disk.path, &copy).map_err(io_error("copy", &disk.path))?;
        volumes.push(copy);
    }
    Ok((
        dir,
        VmDisks {
            rootfs: info.rootfs_disk.path,
            volumes,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Source;

    fn info(name: &str, disk: &Path) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            created: 1,
            container: "web".into(),
            container_id: "0123456789abcdef".into(),
            image: "busybox".into(),
            spec: RunSpec::new(Source::Image {
                reference: "busybox".into(),
                digest: None,
            }),
            rootfs_disk: FileId::of(disk).unwrap(),
            volumes: Vec::new(),
            mvm_version: vmm::snapshot::mvm_version(),
            paused_ms: 2,
            data_pages: 3,
        }
    }

    #[test]
    fn a_snapshot_is_listed_only_once_whole_and_leftovers_of_dead_creates_go() {
        let root = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(root.path()).unwrap();
        let disk = root.path().join("disk");
        fs::write(&disk, b"ext4").unwrap();
        // A leftover of a `create` whose process is gone (pid 0 is nobody's).
        let dead = root.path().join(SNAPSHOTS_DIR).join(".tmp-0-deadbeef");
        fs::create_dir(&dead).unwrap();

        let tmp = store.begin("one").unwrap();
        assert!(!dead.exists(), "a dead create's directory is removed");
        assert!(store.list().unwrap().is_empty(), "not listed while made");
        let err = store.find("one").unwrap_err().to_string();
        assert!(err.contains("no such snapshot: one"), "{err}");
        store.commit(&tmp, &info("one", &disk)).unwrap();
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "one");
        assert_eq!(listed[0].info.as_ref().unwrap().container, "web");
        let (dir, found) = store.find("one").unwrap();
        assert_eq!(found.data_pages, 3);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join(INFO_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "snapshot.json is its owner's alone");

        let err = store.begin("one").unwrap_err().to_string();
        assert!(err.contains("a snapshot named one exists"), "{err}");
        let err = store.begin("../x").unwrap_err().to_string();
        assert!(err.contains("snapshot name"), "{err}");

        // Another mvm's snapshot and a broken one: one line each.
        let mut other = info("old", &disk);
        other.mvm_version = "0.0.0-other".into();
        let tmp = store.begin("old").unwrap();
        store.commit(&tmp, &other).unwrap();
        let err = store.find("old").unwrap_err().to_string();
        assert!(err.contains("taken by mvm 0.0.0-other"), "{err}");
        fs::write(dir.join(INFO_FILE), b"{").unwrap();
        let err = store.find("one").unwrap_err().to_string();
        assert!(err.contains("broken"), "{err}");
        store.remove("one").unwrap();
        store.remove("old").unwrap();
        assert!(store.list().unwrap().is_empty());
        let err = store.remove("one").unwrap_err().to_string();
        assert!(err.contains("no such snapshot"), "{err}");
    }

    #[test]
    fn a_changed_disk_makes_the_snapshot_refused() {
        let root = tempfile::tempdir().unwrap();
        let disk = root.path().join("disk");
        fs::write(&disk, b"ext4").unwrap();
        let i = info("one", &disk);
        check_disks("one", &i).unwrap();
        fs::write(&disk, b"ext4 changed").unwrap();
        let err = check_disks("one", &i).unwrap_err().to_string();
        assert!(
            err.contains("changed since the snapshot was taken"),
            "{err}"
        );
    }

    #[test]
    fn a_fork_keeps_its_snapshots_kind_of_network() {
        let tap = |name: Option<&str>| Network::Tap {
            name: name.map(String::from),
            host_ip: None,
        };
        let user = Some(Network::User);
        assert_eq!(fork_network("s", None, user.clone()).unwrap(), user);
        assert_eq!(
            fork_network("s", Some(tap(None)), user.clone()).unwrap(),
            Some(tap(None))
        );
        let err = fork_network("s", Some(Network::None), user.clone()).unwrap_err();
        assert!(err.to_string().contains("has a network interface"), "{err}");
        let err = fork_network("s", Some(Network::User), Some(Network::None)).unwrap_err();
        assert!(
            err.to_string().contains("has no network interface"),
            "{err}"
        );
        let err = fork_network("s", None, Some(tap(Some("t0")))).unwrap_err();
        assert!(err.to_string().contains("are its own"), "{err}");
        assert_eq!(
            fork_network("s", Some(Network::User), Some(tap(Some("t0")))).unwrap(),
            user
        );
    }
}
