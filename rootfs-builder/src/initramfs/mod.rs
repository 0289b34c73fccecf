//! Initramfs writer: an uncompressed cpio archive in the "newc" format (magic `070701`), the
//! format the Linux kernel unpacks into its rootfs at boot.
//!
//! Entries are collected in memory ([`Initramfs::dir`], [`Initramfs::file`],
//! [`Initramfs::symlink`], [`Initramfs::char_dev`], ...) or copied from a host directory
//! ([`Initramfs::add_host_dir`]), then written in one pass with [`Initramfs::write_to`] or
//! [`Initramfs::write_file`]. Missing parent directories are added (mode 0755) ahead of their
//! children, because the kernel does not create them. Owners are root and all times are zero, so
//! the same entries always give the same bytes.
//!
//! ```no_run
//! # fn main() -> Result<(), rootfs_builder::initramfs::InitramfsError> {
//! use rootfs_builder::initramfs::Initramfs;
//! let mut cpio = Initramfs::new();
//! cpio.host_file("init", 0o755, "target/agent")?
//!     .char_dev("dev/console", 0o600, 5, 1)?
//!     .dir("proc", 0o555)?;
//! cpio.write_file("target/initramfs.cpio")?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

mod host;
mod newc;

use newc::{pad4, write_header, write_trailer, CountingWriter, Header};

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;
const S_IFIFO: u32 = 0o010_000;
/// Permission bits (including setuid, setgid and sticky) kept from a given mode.
const PERM_MASK: u32 = 0o7777;

/// Errors from building or writing an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// An archive path is empty, has `..`, `.` or empty components, or a NUL byte.
    #[error("invalid path {path:?} in initramfs: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The same path was added twice.
    #[error("{0:?} is already in the initramfs")]
    Duplicate(String),
    /// A path's parent is already in the archive but is not a directory.
    #[error("cannot add {path:?}: its parent {parent:?} is not a directory")]
    ParentNotDir {
        /// The path being added.
        path: String,
        /// Its parent, which is a file, link or device.
        parent: String,
    },
    /// A file or link target does not fit the format's 32-bit size field.
    #[error("{0:?} is too large for a cpio newc archive (4 GiB limit)")]
    TooLarge(String),
    /// A host directory holds a socket, which a cpio archive cannot carry.
    #[error("{} is a socket; initramfs cannot hold sockets", .0.display())]
    Unsupported(PathBuf),
    /// A host file or directory could not be read.
    #[error("cannot read {}", .path.display())]
    ReadHost {
        /// The host path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A host file changed size between being added and being written.
    #[error("{} changed size while the initramfs was being written", .0.display())]
    HostFileChanged(PathBuf),
    /// Writing the archive failed.
    #[error("cannot write the initramfs")]
    Write(#[source] io::Error),
}

/// Where a regular file's bytes come from.
#[derive(Debug, Clone)]
enum Data {
    /// Held in memory.
    Bytes(Vec<u8>),
    /// Streamed from a host file of this length when the archive is written.
    Host(PathBuf, u32),
}

/// What an entry is.
#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File(Data),
    Symlink(String),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
}

impl Kind {
    fn type_bits(&self) -> u32 {
        match self {
            Kind::Dir => S_IFDIR,
            Kind::File(_) => S_IFREG,
            Kind::Symlink(_) => S_IFLNK,
            Kind::CharDev(..) => S_IFCHR,
            Kind::BlockDev(..) => S_IFBLK,
            Kind::Fifo => S_IFIFO,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    path: String,
    mode: u32,
    kind: Kind,
    /// Added only because a child needed it; an explicit `dir` may still set its mode.
    implicit: bool,
}

/// An initramfs being put together: an ordered list of entries, parents before children.
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

impl Initramfs {
    /// An empty archive (writing it gives just the trailer).
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries, including directories added for parents (not the trailer).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was added yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a directory. If it was added before only as a parent, sets its mode instead.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, InitramfsError> {
        let path = normalize(path)?;
        if let Some(&i) = self.index.get(&path) {
            let entry = &mut self.entries[i];
            if matches!(entry.kind, Kind::Dir) && entry.implicit {
                entry.mode = mode & PERM_MASK;
                entry.implicit = false;
                return Ok(self);
            }
            return Err(InitramfsError::Duplicate(path));
        }
        self.push(path, mode, Kind::Dir)
    }

    /// Adds a regular file with the given contents.
    pub fn file(
        &mut self,
        path: &str,
        mode: u32,
        data: impl Into<Vec<u8>>,
    ) -> Result<&mut Self, InitramfsError> {
        let path = normalize(path)?;
        let data = data.into();
        if u32::try_from(data.len()).is_err() {
            return Err(InitramfsError::TooLarge(path));
        }
        self.push(path, mode, Kind::File(Data::Bytes(data)))
    }

    /// Adds a regular file whose contents are read from `host` when the archive is written.
    pub fn host_file(
        &mut self,
        path: &str,
        mode: u32,
        host: impl AsRef<Path>,
    ) -> Result<&mut Self, InitramfsError> {
        let path = normalize(path)?;
        let host = host.as_ref().to_path_buf();
        let meta = fs::metadata(&host).map_err(|source| InitramfsError::ReadHost {
            path: host.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(InitramfsError::ReadHost {
                path: host,
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let len = u32::try_from(meta.len()).map_err(|_| InitramfsError::TooLarge(path.clone()))?;
        self.push(path, mode, Kind::File(Data::Host(host, len)))
    }

    /// Adds a symbolic link pointing at `target` (stored as given, relative or absolute).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        let path = normalize(path)?;
        if target.is_empty() || target.contains('\0') {
            return Err(InitramfsError::InvalidPath {
                path: target.to_string(),
                reason: "a link target must be non-empty and have no NUL byte",
            });
        }
        self.push(path, 0o777, Kind::Symlink(target.to_string()))
    }

    /// Adds a character device node, e.g. `char_dev("dev/console", 0o600, 5, 1)`.
    pub fn char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, InitramfsError> {
        let path = normalize(path)?;
        self.push(path, mode, Kind::CharDev(major, minor))
    }

    /// Adds a block device node.
    pub fn block_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, InitramfsError> {
        let path = normalize(path)?;
        self.push(path, mode, Kind::BlockDev(major, minor))
    }

    /// Adds a named pipe.
    pub fn fifo(&mut self, path: &str, mode: u32) -> Result<&mut Self, InitramfsError> {
        let path = normalize(path)?;
        self.push(path, mode, Kind::Fifo)
    }

    /// Writes the archive (entries, then the trailer) and returns the number of bytes written.
    pub fn write_to<W: Write>(&self, out: W) -> Result<u64, InitramfsError> {
        let mut out = CountingWriter {
            inner: out,
            count: 0,
            failed: false,
        };
        for (i, entry) in self.entries.iter().enumerate() {
            // Inode 0 is not used: some readers treat it as "no inode".
            let ino =
                u32::try_from(i + 1).map_err(|_| InitramfsError::TooLarge(entry.path.clone()))?;
            write_entry(&mut out, ino, entry)?;
        }
        write_trailer(&mut out).map_err(InitramfsError::Write)?;
        out.flush().map_err(InitramfsError::Write)?;
        Ok(out.count)
    }

    /// Writes the archive to `path` through a temporary file beside it, so a reader never sees
    /// half an archive and a failure leaves any earlier file in place. The temporary file is
    /// this writer's own: several runs that find the same cache file missing write it at once,
    /// and one must not truncate the file another is renaming into place.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<u64, InitramfsError> {
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let path = path.as_ref();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = PathBuf::from(tmp);
        let result = fs::File::create(&tmp)
            .map_err(InitramfsError::Write)
            .and_then(|f| {
                let mut w = BufWriter::new(f);
                let n = self.write_to(&mut w)?;
                let f = w
                    .into_inner()
                    .map_err(|e| InitramfsError::Write(e.into_error()))?;
                f.sync_all().map_err(InitramfsError::Write)?;
                Ok(n)
            })
            .and_then(|n| {
                fs::rename(&tmp, path)
                    .map(|()| n)
                    .map_err(InitramfsError::Write)
            });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Appends an entry after adding its missing parents as implicit directories.
    fn push(&mut self, path: String, mode: u32, kind: Kind) -> Result<&mut Self, InitramfsError> {
        if self.index.contains_key(&path) {
            return Err(InitramfsError::Duplicate(path));
        }
        let mut parent_end = 0;
        while let Some(off) = path[parent_end..].find('/') {
            parent_end += off;
            let parent = &path[..parent_end];
            match self.index.get(parent) {
                Some(&i) if matches!(self.entries[i].kind, Kind::Dir) => {}
                Some(_) => {
                    return Err(InitramfsError::ParentNotDir {
                        parent: parent.to_string(),
                        path,
                    })
                }
                None => {
                    self.index.insert(parent.to_string(), self.entries.len());
                    self.entries.push(Entry {
                        path: parent.to_string(),
                        mode: 0o755,
                        kind: Kind::Dir,
                        implicit: true,
                    });
                }
            }
            parent_end += 1;
        }
        self.index.insert(path.clone(), self.entries.len());
        self.entries.push(Entry {
            path,
            mode: mode & PERM_MASK,
            kind,
            implicit: false,
        });
        Ok(self)
    }
}

/// Turns a user-given path into the archive form: relative, `/`-separated, no `.`/`..`.
fn normalize(path: &str) -> Result<String, InitramfsError> {
    let invalid = |reason| InitramfsError::InvalidPath {
        path: path.to_string(),
        reason,
    };
    if path.contains('\0') {
        return Err(invalid("NUL byte"));
    }
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(invalid("the root itself cannot be an entry"));
    }
    for part in trimmed.split('/') {
        match part {
            "" => return Err(invalid("empty path component")),
            "." | ".." => return Err(invalid("`.` and `..` are not allowed")),
            _ => {}
        }
    }
    Ok(trimmed.to_string())
}

fn write_entry<W: Write>(
    out: &mut CountingWriter<W>,
    ino: u32,
    entry: &Entry,
) -> Result<(), InitramfsError> {
    let (size, rdev) = match &entry.kind {
        Kind::File(Data::Bytes(b)) => (len32(b.len(), &entry.path)?, (0, 0)),
        Kind::File(Data::Host(_, len)) => (*len, (0, 0)),
        Kind::Symlink(target) => (len32(target.len(), &entry.path)?, (0, 0)),
        Kind::CharDev(major, minor) | Kind::BlockDev(major, minor) => (0, (*major, *minor)),
        Kind::Dir | Kind::Fifo => (0, (0, 0)),
    };
    let header = Header {
        ino,
        mode: entry.kind.type_bits() | entry.mode,
        nlink: if matches!(entry.kind, Kind::Dir) {
            2
        } else {
            1
        },
        size,
        rdev,
    };
    write_header(out, &header, &entry.path).map_err(InitramfsError::Write)?;
    match &entry.kind {
        Kind::File(Data::Bytes(b)) => out.write_all(b).map_err(InitramfsError::Write)?,
        Kind::Symlink(target) => out
            .write_all(target.as_bytes())
            .map_err(InitramfsError::Write)?,
        Kind::File(Data::Host(host, len)) => {
            let read_err = |source| InitramfsError::ReadHost {
                path: host.clone(),
                source,
            };
            let file = fs::File::open(host).map_err(read_err)?;
            let mut limited = file.take(u64::from(*len));
            let copied = io::copy(&mut limited, out).map_err(|e| {
                // io::copy reports read and write errors alike; tell them apart by the writer.
                if out.failed {
                    InitramfsError::Write(e)
                } else {
                    read_err(e)
                }
            })?;
            let mut probe = [0u8; 1];
            let longer = limited.into_inner().read(&mut probe).map_err(read_err)? > 0;
            if copied != u64::from(*len) || longer {
                return Err(InitramfsError::HostFileChanged(host.clone()));
            }
        }
        Kind::Dir | Kind::CharDev(..) | Kind::BlockDev(..) | Kind::Fifo => {}
    }
    pad4(out, size as usize).map_err(InitramfsError::Write)
}

fn len32(len: usize, path: &str) -> Result<u32, InitramfsError> {
    u32::try_from(len).map_err(|_| InitramfsError::TooLarge(path.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    /// Runs GNU cpio with `args` on `archive` as stdin, in `dir`; returns stdout. Panics with
    /// cpio's stderr if it fails or complains.
    pub(super) fn cpio(archive: &[u8], args: &[&str], dir: &Path) -> String {
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cpio is installed (Debian package cpio)");
        child.stdin.take().unwrap().write_all(archive).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "cpio {args:?} failed: {stderr}");
        // GNU cpio prints "N blocks" on stderr; anything else is a warning about the archive.
        for line in stderr.lines() {
            assert!(
                line.ends_with(" blocks") || line.ends_with(" block"),
                "cpio warned: {line}"
            );
        }
        String::from_utf8(out.stdout).unwrap()
    }

    pub(super) fn archive(cpio: &Initramfs) -> Vec<u8> {
        let mut buf = Vec::new();
        let n = cpio.write_to(&mut buf).unwrap();
        assert_eq!(n, buf.len() as u64);
        assert_eq!(buf.len() % 4, 0);
        buf
    }

    fn sample() -> Initramfs {
        let mut c = Initramfs::new();
        c.dir("dev", 0o755)
            .unwrap()
            .char_dev("/dev/console", 0o600, 5, 1)
            .unwrap()
            .block_dev("dev/vda", 0o660, 254, 0)
            .unwrap()
            .file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap()
            .file("etc/hostname", 0o644, "mvm\n")
            .unwrap()
            .file("empty", 0o600, Vec::new())
            .unwrap()
            .symlink("bin/sh", "/init")
            .unwrap()
            .fifo("run/pipe", 0o620)
            .unwrap()
            .dir("tmp", 0o1777)
            .unwrap();
        c
    }

    #[test]
    fn writers_of_the_same_file_at_once_each_rename_a_whole_archive_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("agent.cpio");
        let want = archive(&sample());
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..20 {
                        sample().write_file(&out).unwrap();
                        // Whatever a reader opens is complete.
                        let seen = fs::read(&out).unwrap();
                        assert!(seen == want, "a reader saw {} bytes", seen.len());
                    }
                });
            }
        });
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn cpio_lists_every_entry_with_parents_first() {
        let tmp = tempfile::tempdir().unwrap();
        let listing = cpio(&archive(&sample()), &["-t"], tmp.path());
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "dev/vda",
                "init",
                "etc",
                "etc/hostname",
                "empty",
                "bin",
                "bin/sh",
                "run",
                "run/pipe",
                "tmp"
            ]
        );
    }

    #[test]
    fn cpio_sees_modes_device_numbers_and_link_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let listing = cpio(&archive(&sample()), &["-tv"], tmp.path());
        let line = |name: &str| {
            listing
                .lines()
                .find(|l| l.ends_with(&format!(" {name}")) || l.contains(&format!(" {name} -> ")))
                .unwrap_or_else(|| panic!("{name} not in {listing}"))
                .to_string()
        };
        let console = line("dev/console");
        assert!(console.starts_with("crw-------"), "{console}");
        assert!(
            console.contains("5,") && console.contains(" 1 "),
            "{console}"
        );
        let vda = line("dev/vda");
        assert!(
            vda.starts_with("brw-rw----") && vda.contains("254,"),
            "{vda}"
        );
        assert!(line("init").starts_with("-rwxr-xr-x"));
        assert!(line("bin/sh").starts_with("lrwxrwxrwx") && line("bin/sh").ends_with("-> /init"));
        assert!(line("run/pipe").starts_with("prw--w----"));
        assert!(line("tmp").starts_with("drwxrwxrwt"));
        assert!(line("etc").starts_with("drwxr-xr-x"));
    }

    #[test]
    fn cpio_extracts_the_same_files() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = Initramfs::new();
        c.file("init", 0o750, b"\x7fELF and more".to_vec())
            .unwrap()
            .file("a/b/c/deep.txt", 0o640, "deep\n")
            .unwrap()
            .file("odd", 0o644, vec![1u8; 4097])
            .unwrap()
            .symlink("a/link", "b/c/deep.txt")
            .unwrap();
        cpio(
            &archive(&c),
            &["-i", "-d", "--no-absolute-filenames"],
            tmp.path(),
        );
        let root = tmp.path();
        assert_eq!(fs::read(root.join("init")).unwrap(), b"\x7fELF and more");
        let mode = fs::metadata(root.join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o750);
        assert_eq!(fs::read_to_string(root.join("a/link")).unwrap(), "deep\n");
        assert_eq!(
            fs::read_link(root.join("a/link")).unwrap(),
            Path::new("b/c/deep.txt")
        );
        assert_eq!(fs::read(root.join("odd")).unwrap(), vec![1u8; 4097]);
    }

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let bytes = archive(&Initramfs::new());
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(&bytes[110..120], b"TRAILER!!!");
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(cpio(&bytes, &["-t"], tmp.path()), "");
    }

    #[test]
    fn same_entries_give_the_same_bytes() {
        assert_eq!(archive(&sample()), archive(&sample()));
    }

    #[test]
    fn bad_paths_are_refused() {
        let mut c = Initramfs::new();
        for bad in ["", "/", "a/../b", "..", "./x", "a//b", "nul\0byte"] {
            assert!(
                matches!(
                    c.file(bad, 0o644, "x"),
                    Err(InitramfsError::InvalidPath { .. })
                ),
                "{bad:?} accepted"
            );
        }
        assert!(c.symlink("l", "").is_err());
        assert!(
            c.is_empty(),
            "a refused entry must not leave anything behind"
        );
    }

    #[test]
    fn duplicates_and_files_as_parents_are_refused() {
        let mut c = Initramfs::new();
        c.file("init", 0o755, "x").unwrap();
        assert!(matches!(
            c.file("/init", 0o755, "y"),
            Err(InitramfsError::Duplicate(_))
        ));
        assert!(matches!(
            c.dir("init", 0o755),
            Err(InitramfsError::Duplicate(_))
        ));
        assert!(matches!(
            c.file("init/x", 0o644, "y"),
            Err(InitramfsError::ParentNotDir { .. })
        ));
        // An explicit dir after an implicit parent sets its mode; a second explicit one is refused.
        c.file("etc/passwd", 0o644, "").unwrap();
        c.dir("etc", 0o700).unwrap();
        assert!(matches!(
            c.dir("etc", 0o700),
            Err(InitramfsError::Duplicate(_))
        ));
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn host_file_that_grew_is_an_error() {
        let f = tempfile::NamedTempFile::new().unwrap();
        fs::write(f.path(), "short").unwrap();
        let mut c = Initramfs::new();
        c.host_file("f", 0o644, f.path()).unwrap();
        fs::write(f.path(), "much longer now").unwrap();
        let mut sink = Vec::new();
        assert!(matches!(
            c.write_to(&mut sink),
            Err(InitramfsError::HostFileChanged(_))
        ));
    }

    #[test]
    fn missing_host_paths_are_errors() {
        let mut c = Initramfs::new();
        assert!(matches!(
            c.host_file("x", 0o644, "/nonexistent/mvm-file"),
            Err(InitramfsError::ReadHost { .. })
        ));
        assert!(matches!(
            c.add_host_dir("/nonexistent/mvm-dir", ""),
            Err(InitramfsError::ReadHost { .. })
        ));
    }
}
