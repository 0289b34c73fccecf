//! Unpacked root filesystems, cached by key (an image's manifest digest).
//!
//! `CACHE/KEY/` appears only once every layer is applied (see [`crate::unpack::unpack_layers`]),
//! so its existence means it is complete and a second call returns at once.

use std::path::{Path, PathBuf};

use crate::unpack::{unpack_layers, LayerMediaType, UnpackError};

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

/// Returns the unpacked root filesystem for `key`, unpacking `layers` (bottom first) into
/// `cache_dir/key` the first time. Concurrent callers may both unpack; one rename wins and the
/// other's copy is discarded.
pub fn prepare_rootfs(
    layers: &[(PathBuf, LayerMediaType)],
    cache_dir: &Path,
    key: &str,
) -> Result<PathBuf, RootfsError> {
    validate_key(key)?;
    let dest = rootfs_path(cache_dir, key);
    if dest.is_dir() {
        return Ok(dest);
    }
    std::fs::create_dir_all(cache_dir).map_err(|source| RootfsError::Cache {
        path: cache_dir.to_path_buf(),
        source,
    })?;
    let start = std::time::Instant::now();
    match unpack_layers(layers, &dest) {
        Ok(stats) => {
            log::info!(
                "unpacked {} layer(s) for {key}: {} files, {} MiB in {:.1}s",
                layers.len(),
                stats.files,
                stats.bytes >> 20,
                start.elapsed().as_secs_f64()
            );
            Ok(dest)
        }
        Err(UnpackError::DestinationExists(_)) => Ok(dest),
        Err(source) => Err(RootfsError::Unpack {
            key: key.to_string(),
            source,
        }),
    }
}

/// Removes the cached root filesystem for `key`, if any.
pub fn remove_rootfs(cache_dir: &Path, key: &str) -> Result<(), RootfsError> {
    validate_key(key)?;
    let dest = rootfs_path(cache_dir, key);
    match std::fs::remove_dir_all(&dest) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RootfsError::Cache { path: dest, source }),
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
    fn keys_that_are_not_one_path_component_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for key in ["", "..", "../x", "a/b", ".hidden", "sp ace"] {
            let err = prepare_rootfs(&[], tmp.path(), key).unwrap_err();
            assert!(matches!(err, RootfsError::BadKey(_)), "{key}: {err}");
        }
    }
}
