//! Unpacked root filesystems, cached by key (an image's manifest digest).
//!
//! `CACHE/KEY/` appears only once every layer is applied (see [`crate::unpack::stage_layers`]),
//! so its existence means it is complete and a second call returns at once. Next to it,
//! `CACHE/KEY.devices.json` lists the device nodes the layers carry ([`DeviceNode`]), which are
//! never created on the host; it is written before the tree is published, so a published tree
//! always has its list ([`device_nodes`] reads it, for the container runtime).

use std::path::{Path, PathBuf};

use crate::limits::LayerLimits;
use crate::rootdir;
use crate::unpack::{stage_layers, DeviceKind, DeviceNode, LayerMediaType, UnpackError};

/// Errors from preparing a root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The cache key cannot be used as a directory name.
    #[error("invalid rootfs cache key {0:?} (use letters, digits, '.', '_', '-', ':')")]
    BadKey(String),
    /// The cache directory could not be created.
    #[error("cannot create rootfs cache {}", .path.display())]
    Cache {
        /// The cache directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Unpacking the layers failed; nothing was cached.
    #[error("cannot unpack image layers for {key}")]
    Unpack {
        /// The cache key.
        key: String,
        /// Why.
        #[source]
        source: UnpackError,
    },
    /// The list of device nodes cannot be read or written.
    #[error("device node list {}", .path.display())]
    Devices {
        /// The list.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `key` is a safe single path component (digests like `sha256:ab12...` pass).
pub fn validate_key(key: &str) -> Result<(), RootfsError> {
    let ok = !key.is_empty()
        && key.len() <= 200
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RootfsError::BadKey(key.to_string()))
    }
}

/// The directory [`prepare_rootfs`] uses for `key` (whether or not it exists yet).
pub fn rootfs_path(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir.join(key)
}

/// Where the device nodes of the unpacked tree `rootfs` are listed: `ROOTFS.devices.json`.
pub fn device_list_path(rootfs: &Path) -> PathBuf {
    let mut name = rootfs.as_os_str().to_owned();
    name.push(".devices.json");
    PathBuf::from(name)
}

/// The device nodes the image unpacked at `rootfs` (a path [`prepare_rootfs`] returned) carries.
/// None was created on the host; the container runtime creates the ones it allows in the
/// container's own `/dev`.
pub fn device_nodes(rootfs: &Path) -> Result<Vec<DeviceNode>, RootfsError> {
    let path = device_list_path(rootfs);
    let bad = |source| RootfsError::Devices {
        path: path.clone(),
        source,
    };
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(bad(e)),
    };
    serde_json::from_slice(&data).map_err(|e| bad(e.into()))
}

/// Returns the unpacked root filesystem for `key`, unpacking `layers` (bottom first) into
/// `cache_dir/key` the first time. Concurrent callers may both unpack; one rename wins and the
/// other's copy is discarded. `cache_dir` is created root-only ([`rootdir::PRIVATE_DIR`] where it
/// is not one of the root's own directories).
pub fn prepare_rootfs(
    layers: &[(PathBuf, LayerMediaType)],
    cache_dir: &Path,
    key: &str,
) -> Result<PathBuf, RootfsError> {
    validate_key(key)?;
    let dest = rootfs_path(cache_dir, key);
    if dest.is_dir() {
        if !device_list_path(&dest).exists() {
            scrub_legacy(&dest)?;
        }
        return Ok(dest);
    }
    rootdir::create_dir_all(cache_dir, rootdir::PRIVATE_DIR).map_err(|e| RootfsError::Cache {
        path: cache_dir.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    let start = std::time::Instant::now();
    let unpack_err = |source| RootfsError::Unpack {
        key: key.to_string(),
        source,
    };
    let staged = match stage_layers(layers, &dest, &LayerLimits::default()) {
        Ok(s) => s,
        Err(UnpackError::DestinationExists(_)) => return Ok(dest),
        Err(e) => return Err(unpack_err(e)),
    };
    write_device_list(&dest, &staged.devices)?;
    let devices = staged.devices.len();
    match staged.publish() {
        Ok(stats) => {
            log::info!(
                "unpacked {} layer(s) for {key}: {} files, {} MiB, {devices} device node(s) \
                 recorded, in {:.1}s",
                layers.len(),
                stats.files,
                stats.bytes >> 20,
                start.elapsed().as_secs_f64()
            );
            Ok(dest)
        }
        Err(UnpackError::DestinationExists(_)) => Ok(dest),
        Err(source) => Err(unpack_err(source)),
    }
}

/// Writes the device list of `rootfs` (write a temp file, then rename).
fn write_device_list(rootfs: &Path, devices: &[DeviceNode]) -> Result<(), RootfsError> {
    let path = device_list_path(rootfs);
    let err = |source| RootfsError::Devices {
        path: path.clone(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let json = serde_json::to_vec_pretty(devices).map_err(|e| err(e.into()))?;
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        let mut f = rootdir::create_private_file(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// A tree an older mvm unpacked (no device list next to it) may hold device nodes on the host:
/// they are listed and removed, once.
fn scrub_legacy(rootfs: &Path) -> Result<(), RootfsError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RootfsError::Cache { path, source }
    };
    let mut found = Vec::new();
    let mut stack = vec![rootfs.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(err(&dir))? {
            let entry = entry.map_err(err(&dir))?;
            let path = entry.path();
            let meta = path.symlink_metadata().map_err(err(&path))?;
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                stack.push(path);
                continue;
            } else if ft.is_block_device() {
                DeviceKind::Block
            } else if ft.is_char_device() {
                DeviceKind::Char
            } else {
                continue;
            };
            let rel = path.strip_prefix(rootfs).unwrap_or(&path);
            let rdev = meta.rdev();
            found.push(DeviceNode {
                path: format!("/{}", rel.display()),
                kind,
                major: rustix::fs::major(rdev),
                minor: rustix::fs::minor(rdev),
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
            });
            std::fs::remove_file(&path).map_err(err(&path))?;
        }
    }
    if !found.is_empty() {
        log::info!(
            "removed {} device node(s) an older mvm unpacked into {}",
            found.len(),
            rootfs.display()
        );
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    write_device_list(rootfs, &found)
}

/// Removes the cached root filesystem for `key` (and then its device list), if any.
pub fn remove_rootfs(cache_dir: &Path, key: &str) -> Result<(), RootfsError> {
    validate_key(key)?;
    let dest = rootfs_path(cache_dir, key);
    match std::fs::remove_dir_all(&dest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(RootfsError::Cache { path: dest, source }),
    }
    let list = device_list_path(&dest);
    match std::fs::remove_file(&list) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RootfsError::Devices { path: list, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(dir: &Path, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, *data).unwrap();
        }
        let out = dir.join(name);
        std::fs::write(&out, b.into_inner().unwrap()).unwrap();
        out
    }

    #[test]
    fn rootfs_is_unpacked_once_and_then_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let l1 = layer(
            tmp.path(),
            "l1.tar",
            &[("etc/os-release", b"mvm"), ("bin/old", b"1")],
        );
        let l2 = layer(
            tmp.path(),
            "l2.tar",
            &[("bin/.wh.old", b""), ("bin/new", b"2")],
        );
        let cache = tmp.path().join("cache");
        let layers = [(l1.clone(), LayerMediaType::Tar), (l2, LayerMediaType::Tar)];
        let root = prepare_rootfs(&layers, &cache, "sha256:0123abcd").unwrap();
        assert_eq!(root, cache.join("sha256:0123abcd"));
        assert_eq!(std::fs::read(root.join("etc/os-release")).unwrap(), b"mvm");
        assert!(!root.join("bin/old").exists());
        assert!(root.join("bin/new").exists());

        // The second call does not read the layers at all: they may even be gone.
        std::fs::remove_file(&l1).unwrap();
        let start = std::time::Instant::now();
        assert_eq!(
            prepare_rootfs(&layers, &cache, "sha256:0123abcd").unwrap(),
            root
        );
        assert!(start.elapsed() < std::time::Duration::from_millis(100));

        remove_rootfs(&cache, "sha256:0123abcd").unwrap();
        assert!(!root.exists());
        assert!(prepare_rootfs(&layers, &cache, "sha256:0123abcd").is_err());
        assert!(!root.exists());
    }

    #[test]
    fn device_nodes_are_listed_next_to_the_tree_and_legacy_ones_scrubbed() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Block);
        h.set_device_major(8).unwrap();
        h.set_device_minor(1).unwrap();
        h.set_mode(0o660);
        h.set_size(0);
        h.set_cksum();
        b.append_data(&mut h, "dev/sda1", std::io::empty()).unwrap();
        let l = tmp.path().join("dev.tar");
        std::fs::write(&l, b.into_inner().unwrap()).unwrap();
        let cache = tmp.path().join("cache");
        let root = prepare_rootfs(&[(l, LayerMediaType::Tar)], &cache, "k").unwrap();
        assert!(!root.join("dev/sda1").exists());
        let nodes = device_nodes(&root).unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(
            (nodes[0].path.as_str(), nodes[0].kind, nodes[0].major),
            ("/dev/sda1", DeviceKind::Block, 8)
        );
        remove_rootfs(&cache, "k").unwrap();
        assert!(!device_list_path(&root).exists());

        // A tree an older mvm left, with a real node in it (made only where mknod is allowed).
        let old = cache.join("old");
        std::fs::create_dir_all(old.join("dev")).unwrap();
        std::fs::write(old.join("dev/file"), b"x").unwrap();
        let node = old.join("dev/null");
        let made = rustix::fs::mknodat(
            rustix::fs::CWD,
            &node,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .is_ok();
        assert_eq!(prepare_rootfs(&[], &cache, "old").unwrap(), old);
        assert!(!node.exists());
        assert!(old.join("dev/file").exists());
        let listed = device_nodes(&old).unwrap();
        assert_eq!(listed.len(), usize::from(made), "{listed:?}");
    }

    #[test]
    fn keys_that_are_not_one_path_component_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for key in ["", "..", "../x", "a/b", ".hidden", "sp ace"] {
            let err = prepare_rootfs(&[], tmp.path(), key).unwrap_err();
            assert!(matches!(err, RootfsError::BadKey(_)), "{key}: {err}");
        }
    }
}
