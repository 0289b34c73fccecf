//! Unpacks an image archive (a tar) into a private directory in the store's `tmp/`.
//!
//! Only what an image archive needs is written: regular files and directories, at normalized
//! paths below the directory (an absolute name or a `..` is refused, not rewritten). Hard and
//! symbolic links are never created: each is resolved inside the archive (a symlink relative to
//! its own directory) and becomes a copy of its target, so nothing read later can lead outside.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{inside, io_err, LoadError, Result};
use crate::store::Store;

/// Links followed in a row before a chain is called a loop.
const MAX_LINK_HOPS: usize = 16;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A directory removed (with its contents) on drop.
#[derive(Debug)]
pub(crate) struct ScratchDir(PathBuf);

impl ScratchDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            log::warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}

/// Normalizes an archive entry name: `./a//b/` becomes `a/b`; absolute names and `..` fail.
fn normalize(name: &str) -> Result<String> {
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(LoadError::Escape(name.to_string())),
            p => parts.push(p),
        }
    }
    if name.starts_with('/') || parts.is_empty() {
        return Err(LoadError::Escape(name.to_string()));
    }
    Ok(parts.join("/"))
}

/// Where a symlink at `link` pointing to `target` leads, as an archive path.
fn symlink_target(link: &str, target: &str) -> Result<String> {
    if target.starts_with('/') {
        return Err(LoadError::Escape(format!("{link} -> {target}")));
    }
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(LoadError::Escape(format!("{link} -> {target}")));
                }
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(LoadError::Escape(format!("{link} -> {target}")));
    }
    Ok(parts.join("/"))
}

/// Unpacks the tar at `archive` into a new directory under the store's `tmp/`.
pub(crate) fn extract_tar(archive: &Path, store: &Store) -> Result<ScratchDir> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = store
        .dir()
        .join("tmp")
        .join(format!("{}.load-{n}", std::process::id()));
    std::fs::create_dir(&dir).map_err(io_err("create", &dir))?;
    let scratch = ScratchDir(dir);
    let file = File::open(archive).map_err(io_err("open", archive))?;
    let bad = |e| LoadError::NotArchive(archive.to_path_buf(), e);
    let mut tar = tar::Archive::new(io::BufReader::with_capacity(256 << 10, file));
    // name -> (target, is_symlink)
    let mut links: BTreeMap<String, (String, bool)> = BTreeMap::new();
    let mut files = 0usize;
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        if kind.is_dir() && raw.split('/').all(|p| p.is_empty() || p == ".") {
            continue; // the archive's own root, `./`
        }
        let name = normalize(&raw)?;
        let dest = inside(scratch.path(), &name)?;
        if kind.is_dir() {
            std::fs::create_dir_all(&dest).map_err(io_err("create", &dest))?;
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(io_err("create", parent))?;
            }
            let _ = std::fs::remove_file(&dest);
            let mut out = File::create(&dest).map_err(io_err("create", &dest))?;
            io::copy(&mut entry, &mut out).map_err(bad)?;
            files += 1;
        } else if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name_bytes()
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .ok_or_else(|| LoadError::Escape(format!("{raw} -> (nothing)")))?;
            let target = if kind.is_symlink() {
                symlink_target(&name, &target)?
            } else {
                normalize(&target)?
            };
            links.insert(name, (target, kind.is_symlink()));
        } else {
            log::debug!("load: ignoring archive entry {raw:?} of type {kind:?}");
        }
    }
    if files == 0 {
        return Err(bad(io::Error::new(
            io::ErrorKind::InvalidData,
            "no files in it",
        )));
    }
    for (name, (first, _)) in &links {
        let mut target = first.clone();
        let mut hops = 0;
        while let Some((next, _)) = links.get(&target) {
            hops += 1;
            if hops > MAX_LINK_HOPS {
                return Err(LoadError::Escape(format!("{name} (link loop)")));
            }
            target = next.clone();
        }
        let from = inside(scratch.path(), &target)?;
        let to = inside(scratch.path(), name)?;
        if !from.is_file() {
            // A link to nothing (or to a directory) is not an image file; leave it out.
            log::debug!("load: link {name} -> {target} does not lead to a file");
            continue;
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        let _ = std::fs::remove_file(&to);
        std::fs::hard_link(&from, &to)
            .or_else(|_| std::fs::copy(&from, &to).map(drop))
            .map_err(io_err("copy", &to))?;
    }
    Ok(scratch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized_and_escapes_refused() {
        assert_eq!(normalize("./index.json").unwrap(), "index.json");
        assert_eq!(normalize("blobs//sha256/ab/").unwrap(), "blobs/sha256/ab");
        for bad in ["/etc/passwd", "../x", "a/../../x", "a/..", ".", ""] {
            assert!(normalize(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn symlinks_resolve_inside_the_archive_only() {
        assert_eq!(
            symlink_target("abc/layer.tar", "../def/layer.tar").unwrap(),
            "def/layer.tar"
        );
        assert_eq!(symlink_target("a/b", "c").unwrap(), "a/c");
        for (link, target) in [("a/b", "../../x"), ("a", "/etc/passwd"), ("a/b", "..")] {
            assert!(symlink_target(link, target).is_err(), "{link} -> {target}");
        }
    }
}
