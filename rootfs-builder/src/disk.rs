//! Filesystem disk images for the VM mode: the image's root filesystem (read-only), scratch
//! space and host directories for volumes.
//!
//! ext4 is the default: the guest kernels (product and test) have it built in. It is made with
//! e2fsprogs' `mkfs.ext4 -d DIR`, which copies a tree into a new filesystem without mounting
//! anything, so it works unprivileged and in containers. erofs (`mkfs.erofs`, erofs-utils) is
//! smaller and made for read-only images, but the test kernel here is built without
//! `CONFIG_EROFS_FS`, so it is only used when asked for.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::rootdir;
use crate::rootfs::validate_key;

/// The filesystem label of root filesystem disks.
pub const ROOTFS_LABEL: &str = "mvm-rootfs";
/// The filesystem label of scratch disks.
pub const SCRATCH_LABEL: &str = "mvm-scratch";
const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;

/// A root filesystem disk format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskFormat {
    /// ext4 without a journal (the default; every mvm guest kernel has ext4).
    #[default]
    Ext4,
    /// erofs, read-only and compact; needs a guest kernel with `CONFIG_EROFS_FS`.
    Erofs,
}

impl DiskFormat {
    /// The file extension of cached images of this format.
    pub fn extension(self) -> &'static str {
        match self {
            DiskFormat::Ext4 => "ext4",
            DiskFormat::Erofs => "erofs",
        }
    }
}

/// Errors from making disk images.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Reading the source tree failed.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The path that failed.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Creating or renaming the image file failed.
    #[error("cannot write disk image {}", .path.display())]
    Write {
        /// The image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The formatting tool is not installed.
    #[error("{tool} not found: install {package}")]
    ToolMissing {
        /// The program.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// The formatting tool failed.
    #[error("{tool} failed for {}: {message}", .path.display())]
    Tool {
        /// The program.
        tool: &'static str,
        /// The image being made.
        path: PathBuf,
        /// The last line it printed.
        message: String,
    },
    /// The requested size is too small for a filesystem.
    #[error("disk size {0} bytes is too small (minimum 1 MiB)")]
    TooSmall(u64),
    /// The cache key is invalid.
    #[error(transparent)]
    Key(#[from] crate::rootfs::RootfsError),
}

/// What a directory tree needs on disk.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeUsage {
    /// Data blocks in bytes (files, directories, long symlink targets), 4 KiB granular.
    pub bytes: u64,
    /// Inodes (hard links counted once).
    pub inodes: u64,
}

/// Measures `dir` without following symlinks.
pub fn tree_usage(dir: &Path) -> Result<TreeUsage, DiskError> {
    let mut usage = TreeUsage::default();
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DiskError::Read { path, source }
    };
    while let Some(d) = stack.pop() {
        let mut entries = 0u64;
        for entry in std::fs::read_dir(&d).map_err(err(&d))? {
            let entry = entry.map_err(err(&d))?;
            entries += entry.file_name().len() as u64 + 12;
            let path = entry.path();
            let meta = path.symlink_metadata().map_err(err(&path))?;
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            usage.inodes += 1;
            let ft = meta.file_type();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                // Data rounded to blocks, plus one extent block per 128 MiB.
                usage.bytes +=
                    meta.len().div_ceil(BLOCK) * BLOCK + meta.len() / (128 * MIB) * BLOCK;
            } else if ft.is_symlink() && meta.len() >= 60 {
                usage.bytes += BLOCK;
            }
        }
        usage.bytes += (entries + 24).div_ceil(BLOCK) * BLOCK;
    }
    usage.inodes += 1;
    Ok(usage)
}

/// Filesystem size and inode count for a tree: read-only images get 10% + 8 MiB of headroom,
/// writable ones twice the data + 64 MiB.
pub fn ext4_geometry(usage: TreeUsage, read_only: bool) -> (u64, u64) {
    let inodes = if read_only {
        usage.inodes + usage.inodes / 10 + 64
    } else {
        usage.inodes * 2 + 1024
    };
    let data = usage.bytes + inodes * 256;
    let size = if read_only {
        data + data / 10 + 8 * MIB
    } else {
        data * 2 + 64 * MIB
    };
    (size.div_ceil(MIB) * MIB, inodes)
}

/// Where [`rootfs_disk`] caches the disk image for `key`.
pub fn rootfs_disk_path(cache_dir: &Path, key: &str, format: DiskFormat) -> PathBuf {
    cache_dir.join(format!("{key}.{}", format.extension()))
}

/// Returns the cached disk image of `rootfs` for `key`, making `cache_dir/KEY.EXT` the first
/// time (one progress line on stderr) and returning at once afterwards.
pub fn rootfs_disk(
    rootfs: &Path,
    cache_dir: &Path,
    key: &str,
    format: DiskFormat,
) -> Result<PathBuf, DiskError> {
    validate_key(key)?;
    let out = rootfs_disk_path(cache_dir, key, format);
    if out.is_file() {
        return Ok(out);
    }
    rootdir::create_dir_all(cache_dir, rootdir::PRIVATE_DIR).map_err(|e| DiskError::Write {
        path: cache_dir.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    let usage = tree_usage(rootfs)?;
    eprintln!(
        "mvm: making {} disk image of {key} ({} files, {} MiB)",
        format.extension(),
        usage.inodes,
        usage.bytes / MIB
    );
    let start = std::time::Instant::now();
    let uuid = uuid_for(key);
    match format {
        DiskFormat::Ext4 => write_ext4(rootfs, &out, usage, true, ROOTFS_LABEL, Some(&uuid))?,
        DiskFormat::Erofs => write_erofs(rootfs, &out, &uuid)?,
    };
    log::info!(
        "made {} in {:.1}s",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// Makes an ext4 image of `dir` at `out` (replacing it), sized for the tree: tight when
/// `read_only`, with room to write otherwise. Returns the image size in bytes.
pub fn disk_from_dir(dir: &Path, out: &Path, read_only: bool) -> Result<u64, DiskError> {
    let usage = tree_usage(dir)?;
    let label = if read_only {
        "mvm-volume-ro"
    } else {
        "mvm-volume"
    };
    write_ext4(dir, out, usage, read_only, label, None)
}

/// Creates a sparse, empty ext4 filesystem of `size` bytes at `path` for writable space.
pub fn scratch_disk(path: &Path, size: u64) -> Result<(), DiskError> {
    if size < MIB {
        return Err(DiskError::TooSmall(size));
    }
    let tmp = temp_path(path);
    let werr = |source| DiskError::Write {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let file = rootdir::create_private_file(&tmp).map_err(werr)?;
        file.set_len(size / BLOCK * BLOCK).map_err(werr)?;
        drop(file);
        let mut cmd = Command::new("mkfs.ext4");
        cmd.args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-m",
            "0",
            "-L",
            SCRATCH_LABEL,
        ]);
        cmd.args(["-O", "^has_journal", "-E", "root_owner=0:0"]);
        cmd.arg(&tmp);
        run_tool(cmd, "mkfs.ext4", "e2fsprogs", path)?;
        std::fs::rename(&tmp, path).map_err(werr)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_ext4(
    dir: &Path,
    out: &Path,
    usage: TreeUsage,
    read_only: bool,
    label: &str,
    uuid: Option<&str>,
) -> Result<u64, DiskError> {
    let (mut size, inodes) = ext4_geometry(usage, read_only);
    let tmp = temp_path(out);
    let werr = |source| DiskError::Write {
        path: out.to_path_buf(),
        source,
    };
    // The estimate is generous; if mke2fs still runs out of blocks, grow and try again.
    let mut attempt = 0;
    let result = loop {
        // Made here, private, before the tool writes into it.
        rootdir::create_private_file(&tmp).map_err(werr)?;
        let mut cmd = Command::new("mkfs.ext4");
        cmd.args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", label,
        ]);
        cmd.arg("-N").arg(inodes.to_string());
        cmd.args(["-O", "^has_journal"]);
        let mut ext = String::from("root_owner=0:0");
        if let Some(uuid) = uuid {
            cmd.args(["-U", uuid]);
            ext.push_str(&format!(",hash_seed={uuid}"));
        }
        cmd.arg("-E").arg(ext).arg("-d").arg(dir).arg(&tmp);
        cmd.arg(format!("{}k", size / 1024));
        match run_tool(cmd, "mkfs.ext4", "e2fsprogs", out) {
            Ok(()) => break Ok(size),
            Err(DiskError::Tool { .. }) if attempt < 2 => {
                attempt += 1;
                size = (size + size / 2).div_ceil(MIB) * MIB;
                log::info!(
                    "mkfs.ext4 ran out of space; retrying with {} MiB",
                    size / MIB
                );
            }
            Err(e) => break Err(e),
        }
    };
    match result {
        Ok(size) => {
            keep_private(&tmp).map_err(werr)?;
            std::fs::rename(&tmp, out).map_err(werr)?;
            Ok(size)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_erofs(dir: &Path, out: &Path, uuid: &str) -> Result<u64, DiskError> {
    let tmp = temp_path(out);
    rootdir::create_private_file(&tmp).map_err(|source| DiskError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let mut cmd = Command::new("mkfs.erofs");
    cmd.args(["--quiet", "-T0", "-U", uuid]).arg(&tmp).arg(dir);
    if let Err(e) = run_tool(cmd, "mkfs.erofs", "erofs-utils", out) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let size = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
    keep_private(&tmp)
        .and_then(|()| std::fs::rename(&tmp, out))
        .map_err(|source| DiskError::Write {
            path: out.to_path_buf(),
            source,
        })?;
    Ok(size)
}

/// A tool that replaced the file it was given may have made it with its own mode: back to 0600.
fn keep_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata(path)?.mode() & 0o7777 != rootdir::PRIVATE_FILE {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(rootdir::PRIVATE_FILE))?;
    }
    Ok(())
}

fn run_tool(
    mut cmd: Command,
    tool: &'static str,
    package: &'static str,
    out: &Path,
) -> Result<(), DiskError> {
    let output = cmd.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DiskError::ToolMissing { tool, package },
        _ => DiskError::Write {
            path: out.to_path_buf(),
            source: e,
        },
    })?;
    if output.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&output.stderr);
    let message = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .trim()
        .to_string();
    Err(DiskError::Tool {
        tool,
        path: out.to_path_buf(),
        message: format!("{message} ({})", output.status),
    })
}

fn temp_path(out: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(out.file_name().unwrap_or_default());
    name.push(format!(".tmp-{}", std::process::id()));
    out.with_file_name(name)
}

/// A stable UUID for an image key, so the same image always gives the same disk.
fn uuid_for(key: &str) -> String {
    let h = Sha256::digest(key.as_bytes());
    let x = hex::encode(&h[..16]);
    format!(
        "{}-{}-4{}-8{}-{}",
        &x[0..8],
        &x[8..12],
        &x[13..16],
        &x[17..20],
        &x[20..32]
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn debugfs(img: &Path, request: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", request])
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "debugfs {request}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("-V").output().is_ok()
    }

    fn sample_tree(dir: &Path) {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("etc/deep/er")).unwrap();
        std::fs::write(dir.join("etc/hostname"), b"mvm-disk-test\n").unwrap();
        std::fs::write(dir.join("etc/deep/er/big"), vec![0x5a; 3 * 1024 * 1024]).unwrap();
        std::fs::write(dir.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            dir.join("bin/tool"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::fs::hard_link(dir.join("bin/tool"), dir.join("bin/tool2")).unwrap();
        std::os::unix::fs::symlink("tool", dir.join("bin/sh")).unwrap();
    }

    #[test]
    fn rootfs_disk_holds_the_tree_and_is_cached() {
        if !have("mkfs.ext4") || !have("debugfs") {
            eprintln!("skipping: e2fsprogs (mkfs.ext4, debugfs) not installed");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        sample_tree(&tree);
        let cache = tmp.path().join("disks");
        let img = rootfs_disk(&tree, &cache, "sha256:feedbeef", DiskFormat::Ext4).unwrap();
        assert_eq!(img, cache.join("sha256:feedbeef.ext4"));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&img), 0o600, "disk images are private");
        assert_eq!(mode(&cache), 0o700);

        let fsck = Command::new("fsck.ext4")
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        assert_eq!(debugfs(&img, "cat /etc/hostname"), "mvm-disk-test\n");
        let listing = debugfs(&img, "ls -l /bin");
        assert!(listing.contains("104755"), "setuid mode kept: {listing}");
        assert!(debugfs(&img, "stat /bin/sh").contains("Fast link dest: \"tool\""));
        assert!(debugfs(&img, "stat /bin/tool").contains("Links: 2"));
        let big = debugfs(&img, "stat /etc/deep/er/big");
        assert!(big.contains("Size: 3145728"), "{big}");
        let sb = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&img)
            .output()
            .unwrap();
        let sb = String::from_utf8_lossy(&sb.stdout);
        assert!(sb.contains("Filesystem volume name:   mvm-rootfs"), "{sb}");
        assert!(!sb.contains("has_journal"), "{sb}");

        // Second call: no conversion, the same file untouched.
        let before = std::fs::metadata(&img).unwrap().modified().unwrap();
        std::fs::remove_dir_all(&tree).unwrap();
        assert_eq!(
            rootfs_disk(&tree, &cache, "sha256:feedbeef", DiskFormat::Ext4).unwrap(),
            img
        );
        assert_eq!(std::fs::metadata(&img).unwrap().modified().unwrap(), before);
    }

    #[test]
    fn erofs_image_checks_clean() {
        if Command::new("fsck.erofs").arg("--help").output().is_err() {
            eprintln!("skipping: erofs-utils not installed");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        sample_tree(&tree);
        let img = rootfs_disk(&tree, tmp.path(), "k", DiskFormat::Erofs).unwrap();
        let out = Command::new("fsck.erofs").arg(&img).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn scratch_disk_is_sparse_and_empty() {
        if !have("mkfs.ext4") {
            eprintln!("skipping: e2fsprogs not installed");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("scratch.img");
        scratch_disk(&img, 1 << 30).unwrap();
        let meta = std::fs::metadata(&img).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert!(
            meta.blocks() * 512 < 64 * MIB,
            "allocated {} bytes",
            meta.blocks() * 512
        );
        let fsck = Command::new("fsck.ext4")
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        assert!(fsck.status.success());
        assert!(debugfs(&img, "ls /").contains("lost+found"));
        assert!(matches!(
            scratch_disk(&img, 4096),
            Err(DiskError::TooSmall(4096))
        ));
    }

    #[test]
    fn volume_disks_have_room_to_write_when_writable() {
        if !have("mkfs.ext4") {
            eprintln!("skipping: e2fsprogs not installed");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("vol");
        sample_tree(&tree);
        let ro = disk_from_dir(&tree, &tmp.path().join("ro.img"), true).unwrap();
        let rw = disk_from_dir(&tree, &tmp.path().join("rw.img"), false).unwrap();
        assert!(rw >= ro + 48 * MIB, "ro {ro} rw {rw}");
        assert_eq!(
            debugfs(&tmp.path().join("rw.img"), "cat /etc/hostname"),
            "mvm-disk-test\n"
        );
        let err = disk_from_dir(&tmp.path().join("missing"), &tmp.path().join("x.img"), true);
        assert!(matches!(err, Err(DiskError::Read { .. })));
        assert!(!tmp.path().join("x.img").exists());
    }
}
