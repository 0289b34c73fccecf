//! VM templates: a guest booted once to "agent ready" and saved, so later runs of the same
//! shape restore it instead of booting.
//!
//! A template is made for one (kernel, agent, memory, vCPUs, kernel arguments, device layout):
//! [`TemplateKey`] hashes those, the kernel and the agent's initramfs named by path, size and
//! modification time, so a changed kernel or agent makes another key and the old template is
//! never restored again (`mvm template prune` removes it, `ls` shows it as stale).
//!
//! Nothing particular to a run lives in a template: the guest boots with `mvm.template=1`, its
//! disks are empty placeholders with the features of the run's (read-only image disk, writable
//! volumes), and the agent mounts nothing and configures no network until the host's setup
//! request after the restore (see `guest_agent::agent::restored`). Each run attaches its own
//! disks, network backend and vsock socket to the restored devices.
//!
//! On disk, `<root>/templates/<key>/`: the snapshot (`state`, `memory`), `template.json`
//! ([`TemplateInfo`]) and the template boot's `console.log`. A template is made in a
//! `.tmp-...` directory and renamed into place once complete, so a killed run leaves no
//! half-written template that `ls` lists or a run restores (`prune` removes the leftovers).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{bad_input, io_error, Error};

/// The template directory under the mvm root.
pub const TEMPLATES_DIR: &str = "templates";
/// The template's description in its directory.
pub const INFO_FILE: &str = "template.json";
/// In the template directory: why this host's KVM cannot save or restore a VM, found by a run
/// (for one mvm version and host kernel); runs then boot cold without trying again.
const UNSUPPORTED_FILE: &str = ".unsupported";

/// What the `.unsupported` note holds for: this mvm on this host kernel.
fn host_id() -> String {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{} {}", vmm::snapshot::mvm_version(), release.trim())
}

/// A file a template depends on, named by what changes when it is replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileId {
    /// Absolute path.
    pub path: PathBuf,
    /// Length in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: u128,
}

impl FileId {
    /// The identity of the file at `path` now.
    pub fn of(path: &Path) -> Result<Self, Error> {
        let path = fs::canonicalize(path).map_err(io_error("read", path))?;
        let meta = fs::metadata(&path).map_err(io_error("read", &path))?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(Self {
            path,
            size: meta.len(),
            mtime_ns,
        })
    }

    /// Whether the file is still the same one.
    pub fn unchanged(&self) -> bool {
        Self::of(&self.path).is_ok_and(|now| now == *self)
    }
}

/// Everything a template depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateKey {
    /// mvm's snapshot version.
    pub mvm_version: String,
    /// The guest kernel.
    pub kernel: FileId,
    /// The agent's initramfs.
    pub initrd: FileId,
    /// Extra kernel arguments.
    pub kernel_args: String,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The disks in order, `ro` or `rw` each.
    pub disks: Vec<String>,
    /// The network kind: none, user or tap.
    pub network: String,
}

impl TemplateKey {
    /// The key's id: 16 hex digits of its SHA-256.
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(json);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `template.json`: the key and when and from what the template was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateInfo {
    /// The key.
    pub key: TemplateKey,
    /// Seconds since the epoch.
    pub created: u64,
    /// Milliseconds the cold boot took to the agent.
    pub boot_ms: u64,
}

impl TemplateInfo {
    /// Whether the kernel and agent the template was made from are still there, unchanged,
    /// and the template is of this mvm.
    pub fn stale(&self) -> bool {
        self.key.mvm_version != vmm::snapshot::mvm_version()
            || !self.key.kernel.unchanged()
            || !self.key.initrd.unchanged()
    }
}

/// The templates under one mvm root.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    dir: PathBuf,
}

/// One template as `ls` shows it.
#[derive(Debug, Clone)]
pub struct TemplateEntry {
    /// Its id.
    pub id: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its description (None: unreadable).
    pub info: Option<TemplateInfo>,
    /// Bytes its files take on disk.
    pub disk_bytes: u64,
}

/// Bytes the files in `dir` take on disk.
pub(crate) fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// The entries of store folder `dir` by name, with their paths: its directories but those
/// being made (`.tmp-...`); none where the folder does not exist.
pub(crate) fn store_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("read", dir)(e)),
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(name, _)| !name.starts_with('.'))
        .collect();
    out.sort();
    Ok(out)
}

/// Removes the `.tmp-<pid>-<id>` directories in `dir` whose maker (process `pid`) is gone: what
/// a killed run left of a template or snapshot it was making.
pub(crate) fn remove_dead_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(".tmp-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok());
        if pid.is_some_and(|pid| !crate::state::process_alive(pid, None)) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// The store folder `name` under the mvm root `root` (created when first needed, root-only like
/// the rest of the root).
pub(crate) fn store_dir(root: &Path, name: &str) -> Result<PathBuf, Error> {
    rootfs_builder::rootdir::prepare_root(root)?;
    let dir = root.join(name);
    if !dir.is_dir() {
        rootfs_builder::rootdir::create_dir(&dir, rootfs_builder::rootdir::PRIVATE_DIR)?;
    }
    Ok(dir)
}

impl TemplateStore {
    /// The store of `root` (created when first needed, root-only like the rest of the root).
    pub fn open(root: &Path) -> Result<Self, Error> {
        Ok(Self {
            dir: store_dir(root, TEMPLATES_DIR)?,
        })
    }

    /// Why this host cannot keep templates, if an earlier run found out (with this mvm and
    /// this host kernel).
    pub fn unsupported(&self) -> Option<String> {
        let text = fs::read_to_string(self.dir.join(UNSUPPORTED_FILE)).ok()?;
        let (host, why) = text.split_once('\n')?;
        (host == host_id()).then(|| why.trim().to_string())
    }

    /// Notes that this host cannot keep templates, and why (best effort: a run that cannot
    /// write it tries again next time).
    pub fn mark_unsupported(&self, why: &str) {
        let why = why.replace('\n', " ");
        let _ = fs::write(
            self.dir.join(UNSUPPORTED_FILE),
            format!("{}\n{why}\n", host_id()),
        );
    }

    /// The directory of template `id` (it may not exist).
    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The complete template for `key`, if there is one.
    pub fn find(&self, key: &TemplateKey) -> Option<PathBuf> {
        let dir = self.path(&key.id());
        let info = read_info(&dir)?;
        (info.key == *key).then_some(dir)
    }

    /// A fresh directory to make a template in (not listed until [`TemplateStore::commit`]).
    pub fn begin(&self, key: &TemplateKey) -> Result<PathBuf, Error> {
        // Short: the VM's vsock socket is made in it (Unix socket paths are short).
        let _ = key;
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            &crate::state::new_id()[..8]
        ));
        rootfs_builder::rootdir::create_dir(&tmp, rootfs_builder::rootdir::PRIVATE_DIR)?;
        Ok(tmp)
    }

    /// Writes `info` into the finished template in `tmp` and moves it into place; if another
    /// run made the same template meanwhile, keeps that one. Returns the template's directory.
    pub fn commit(&self, tmp: &Path, info: &TemplateInfo) -> Result<PathBuf, Error> {
        let path = tmp.join(INFO_FILE);
        let json = serde_json::to_vec_pretty(info)
            .map_err(|e| io_error("write", &path)(io::Error::other(e)))?;
        fs::write(&path, json).map_err(io_error("write", &path))?;
        let dest = self.path(&info.key.id());
        if read_info(&dest).is_some() {
            let _ = fs::remove_dir_all(tmp);
            return Ok(dest);
        }
        // A directory there without a readable description is a broken template: replace it.
        let _ = fs::remove_dir_all(&dest);
        match fs::rename(tmp, &dest) {
            Ok(()) => Ok(dest),
            Err(_) if read_info(&dest).is_some() => {
                let _ = fs::remove_dir_all(tmp);
                Ok(dest)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(tmp);
                Err(io_error("create", &dest)(e))
            }
        }
    }

    /// Every complete template, by id.
    pub fn list(&self) -> Result<Vec<TemplateEntry>, Error> {
        let out = store_entries(&self.dir)?
            .into_iter()
            .map(|(id, dir)| TemplateEntry {
                info: read_info(&dir),
                disk_bytes: disk_usage(&dir),
                id,
                dir,
            })
            .collect();
        Ok(out)
    }

    /// Removes template `id` (a unique prefix is enough).
    pub fn remove(&self, id: &str) -> Result<String, Error> {
        let matches: Vec<TemplateEntry> = self
            .list()?
            .into_iter()
            .filter(|t| !id.is_empty() && t.id.starts_with(id))
            .collect();
        match matches.as_slice() {
            [one] => {
                fs::remove_dir_all(&one.dir).map_err(io_error("remove", &one.dir))?;
                Ok(one.id.clone())
            }
            [] => Err(bad_input(format!("no such template: {id}"))),
            _ => Err(bad_input(format!(
                "'{id}' matches more than one template; give more of the id"
            ))),
        }
    }

    /// Removes stale and broken templates and the leftovers of runs killed while making one;
    /// `all`: every template, and the note that this host cannot keep them (the next run
    /// tries again). Returns the ids removed.
    pub fn prune(&self, all: bool) -> Result<Vec<String>, Error> {
        let mut removed = Vec::new();
        if all {
            let _ = fs::remove_file(self.dir.join(UNSUPPORTED_FILE));
        }
        for t in self.list()? {
            let stale = t.info.as_ref().is_none_or(TemplateInfo::stale);
            if all || stale {
                fs::remove_dir_all(&t.dir).map_err(io_error("remove", &t.dir))?;
                removed.push(t.id);
            }
        }
        remove_dead_leftovers(&self.dir);
        Ok(removed)
    }
}

fn read_info(dir: &Path) -> Option<TemplateInfo> {
    let data = fs::read(dir.join(INFO_FILE)).ok()?;
    serde_json::from_slice(&data).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &Path) -> TemplateKey {
        let kernel = dir.join("vmlinux");
        let initrd = dir.join("agent.cpio");
        fs::write(&kernel, b"kernel").unwrap();
        fs::write(&initrd, b"initrd").unwrap();
        TemplateKey {
            mvm_version: vmm::snapshot::mvm_version(),
            kernel: FileId::of(&kernel).unwrap(),
            initrd: FileId::of(&initrd).unwrap(),
            kernel_args: String::new(),
            mem_bytes: 256 << 20,
            vcpus: 1,
            disks: vec!["ro".into()],
            network: "none".into(),
        }
    }

    #[test]
    fn a_template_is_listed_only_once_complete_and_a_changed_kernel_makes_it_stale() {
        let root = tempfile::tempdir().unwrap();
        let files = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(root.path()).unwrap();
        let key = key(files.path());
        let tmp = store.begin(&key).unwrap();
        fs::write(tmp.join("state"), b"s").unwrap();
        assert!(store.list().unwrap().is_empty(), "half-made: not listed");
        assert!(store.find(&key).is_none());
        let info = TemplateInfo {
            key: key.clone(),
            created: 1,
            boot_ms: 2,
        };
        let dir = store.commit(&tmp, &info).unwrap();
        assert_eq!(store.find(&key), Some(dir));
        let list = store.list().unwrap();
        assert_eq!(list.len(), 1);
        assert!(!list[0].info.as_ref().unwrap().stale());
        // Another key for another memory size.
        let mut other = key.clone();
        other.mem_bytes *= 2;
        assert_ne!(other.id(), key.id());
        assert!(store.find(&other).is_none());
        // The kernel changes: stale, pruned.
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(files.path().join("vmlinux"), b"kernel 2").unwrap();
        assert!(store.list().unwrap()[0].info.as_ref().unwrap().stale());
        // A killed run's leftovers go too.
        let dead = root
            .path()
            .join(TEMPLATES_DIR)
            .join(format!(".tmp-{}-x", i32::MAX));
        fs::create_dir(&dead).unwrap();
        assert_eq!(store.prune(false).unwrap(), vec![key.id()]);
        assert!(!dead.exists());
        assert!(store.list().unwrap().is_empty());
        assert!(store.remove("nope").is_err());
    }

    #[test]
    fn a_host_that_cannot_keep_templates_is_noted_until_prune_all() {
        let root = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(root.path()).unwrap();
        assert_eq!(store.unsupported(), None);
        store.mark_unsupported("KVM_GET_XSAVE failed\nsecond line");
        assert_eq!(
            store.unsupported().as_deref(),
            Some("KVM_GET_XSAVE failed second line")
        );
        assert!(store.list().unwrap().is_empty(), "the note is no template");
        // Another mvm or host kernel tries again.
        let note = root.path().join(TEMPLATES_DIR).join(UNSUPPORTED_FILE);
        fs::write(&note, "mvm 0.0.1 other\nwhy\n").unwrap();
        assert_eq!(store.unsupported(), None);
        store.mark_unsupported("why");
        store.prune(true).unwrap();
        assert_eq!(store.unsupported(), None);
    }
}
