//! `mvm cp`: a file or a directory tree as a tar stream ([`pack`]), and a tar stream written into
//! a directory ([`unpack`]), with modes, times, symbolic and hard links kept.
//!
//! Every path is looked up from a root directory descriptor with `openat2(2)`, never by a plain
//! path, and every entry is created relative to a directory descriptor with `O_NOFOLLOW`, so no
//! symbolic link is followed out of the root:
//!
//! - In a container (`/proc/<pid>/root`, [`Confine::InRoot`]): paths resolve as the container
//!   sees them (`RESOLVE_IN_ROOT`: absolute links and `..` stay inside its root; magic links of
//!   /proc are refused), whatever the container changes meanwhile.
//! - On the host, writing what a container (or, in a VM, a guest agent mvm does not trust) sent
//!   ([`Confine::Beneath`]): each entry must lie under the destination without crossing a
//!   symbolic link (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), or the copy stops with an error;
//!   setuid and setgid bits are dropped, and device nodes, fifos and sockets are skipped.
//!
//! Paths follow `docker cp`: `SRC` names a file or directory copied with its name; `SRC/.` copies
//! a directory's contents. `DEST` that is a directory receives the copy inside it; a `DEST` that
//! does not exist is created (its parent must exist); a file `DEST` is replaced by a file.
//!
//! The archive's first entry is the top of the copy: its name (or `.` for contents), then every
//! entry below it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

/// Deepest directory tree [`pack`] walks (deeper ones are an error, not a stack overflow).
const MAX_DEPTH: usize = 256;

/// Errors of `mvm cp`.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The path does not exist (or cannot be reached without leaving the root).
    #[error("{0}: no such file or directory")]
    NotFound(String),
    /// The destination's directory does not exist.
    #[error("{0}: no such directory")]
    NoDirectory(String),
    /// A directory cannot replace a file.
    #[error("cannot copy a directory onto the file {0}")]
    DirOntoFile(String),
    /// An entry of the archive would leave the destination.
    #[error("refusing {0:?}: it leads outside the destination (through a symbolic link, `..` or an absolute path)")]
    Escape(String),
    /// The tree is deeper than [`MAX_DEPTH`].
    #[error("{0}: directory tree too deep")]
    TooDeep(String),
    /// The archive is not a tar stream this reads, or is empty.
    #[error("malformed archive")]
    Malformed(#[source] io::Error),
    /// A system call on a path failed.
    #[error("{path}: {source}")]
    Io {
        /// The path, as the user sees it.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &str) -> impl FnOnce(rustix::io::Errno) -> ArchiveError + '_ {
    move |e| ArchiveError::Io {
        path: path.to_string(),
        source: e.into(),
    }
}

/// How entries are placed relative to the root (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confine {
    /// Resolve as inside a container whose root is the root descriptor.
    InRoot,
    /// Never cross a symbolic link below the destination; refuse what would.
    Beneath,
}

/// Who owns what [`unpack`] creates: `base` plus, with `keep`, the ids the archive names (the
/// base is 0:0 for root, or a user namespace's first host ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Uid and gid added to every entry's (or given to every entry without `keep`).
    pub base: (u32, u32),
    /// Keep the archive's ids (`mvm cp -a`).
    pub keep: bool,
}

/// What [`pack`] and [`unpack`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Entries copied.
    pub entries: u64,
    /// Bytes of file data copied.
    pub bytes: u64,
    /// Entries skipped (devices, fifos, sockets; on the host also what cannot be created).
    pub skipped: u64,
}

fn resolve_flags(follow_last: bool) -> OFlags {
    if follow_last {
        OFlags::empty()
    } else {
        OFlags::NOFOLLOW
    }
}

/// `openat2` from `root` with `RESOLVE_IN_ROOT`: `path` as a process whose root is `root` sees
/// it. Magic links (/proc/PID/root and the like) are refused.
fn open_in_root(root: BorrowedFd<'_>, path: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    rustix::fs::openat2(
        root,
        rel,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// The name and trailing `/.` of a source path: `("dir", false)` for `/a/dir`, `(".", true)` for
/// `/a/dir/.` or `/`.
fn top_name(path: &str) -> (String, bool) {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() || trimmed.ends_with("/.") || trimmed == "." {
        return (".".into(), true);
    }
    let name = trimmed.rsplit('/').next().unwrap_or(trimmed);
    (name.to_string(), false)
}

/// Writes `path` (seen from `root` as from inside a container) as a tar stream to `out`. A
/// symbolic link named by `path` is copied as a link unless `follow` (`-L`) or the path ends
/// with `/`; links below it are always copied as links.
pub fn pack(
    root: BorrowedFd<'_>,
    path: &str,
    follow: bool,
    out: impl Write,
) -> Result<Summary, ArchiveError> {
    let (name, contents) = top_name(path);
    let follow = follow || path.ends_with('/') || contents;
    let top = open_in_root(root, path, OFlags::PATH | resolve_flags(follow))
        .map_err(|_| ArchiveError::NotFound(path.to_string()))?;
    let mut packer = Packer {
        tar: tar::Builder::new(out),
        summary: Summary::default(),
        links: HashMap::new(),
    };
    let st = rustix::fs::fstat(&top).map_err(io_err(path))?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {
            let dir = rustix::fs::openat(
                &top,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io_err(path))?;
            packer.dir(&dir, Path::new(&name), path, 0)?;
        }
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(&top, "", Vec::new()).map_err(io_err(path))?;
            packer.symlink(&st, Path::new(&name), OsStr::from_bytes(target.as_bytes()))?;
        }
        FileType::RegularFile => {
            let file = open_in_root(
                root,
                path,
                OFlags::RDONLY | OFlags::NONBLOCK | resolve_flags(follow),
            )
            .map_err(io_err(path))?;
            packer.file(file, Path::new(&name), path)?;
        }
        _ => return Err(ArchiveError::NotFound(path.to_string())),
    }
    let summary = packer.summary;
    packer
        .tar
        .into_inner()
        .and_then(|mut w| w.flush())
        .map_err(|e| ArchiveError::Io {
            path: "the archive".into(),
            source: e,
        })?;
    Ok(summary)
}

struct Packer<W: Write> {
    tar: tar::Builder<W>,
    summary: Summary,
    /// Files with several links, by (device, inode): the first name they were archived under.
    links: HashMap<(u64, u64), PathBuf>,
}

fn header(st: &rustix::fs::Stat, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(u64::from(st.st_uid));
    h.set_gid(u64::from(st.st_gid));
    h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    h.set_size(size);
    h
}

impl<W: Write> Packer<W> {
    fn write_err(e: io::Error) -> ArchiveError {
        ArchiveError::Io {
            path: "the archive".into(),
            source: e,
        }
    }

    fn dir(
        &mut self,
        dir: &OwnedFd,
        name: &Path,
        shown: &str,
        depth: usize,
    ) -> Result<(), ArchiveError> {
        if depth > MAX_DEPTH {
            return Err(ArchiveError::TooDeep(shown.to_string()));
        }
        let st = rustix::fs::fstat(dir).map_err(io_err(shown))?;
        let mut h = header(&st, tar::EntryType::Directory, 0);
        self.tar
            .append_data(&mut h, name, io::empty())
            .map_err(Self::write_err)?;
        self.summary.entries += 1;
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut entries = rustix::fs::Dir::read_from(dir).map_err(io_err(shown))?;
        for e in entries.by_ref() {
            let e = e.map_err(io_err(shown))?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
        names.sort();
        for n in names {
            let child = OsStr::from_bytes(&n);
            let path = name.join(child);
            let shown = format!("{shown}/{}", child.to_string_lossy());
            let st = match rustix::fs::statat(dir, child, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                // Gone meanwhile.
                Err(_) => continue,
            };
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => {
                    let sub = match rustix::fs::openat(
                        dir,
                        child,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    ) {
                        Ok(fd) => fd,
                        Err(_) => continue,
                    };
                    self.dir(&sub, &path, &shown, depth + 1)?;
                }
                FileType::RegularFile => {
                    let file = match rustix::fs::openat(
                        dir,
                        child,
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                        Mode::empty(),
                    ) {
                        Ok(fd) => fd,
                        Err(_) => continue,
                    };
                    self.file(file, &path, &shown)?;
                }
                FileType::Symlink => {
                    let Ok(target) = rustix::fs::readlinkat(dir, child, Vec::new()) else {
                        continue;
                    };
                    self.symlink(&st, &path, OsStr::from_bytes(target.as_bytes()))?;
                }
                _ => {
                    log::warn!("{shown}: not a file, directory or link: skipped");
                    self.summary.skipped += 1;
                }
            }
        }
        Ok(())
    }

    fn file(&mut self, file: OwnedFd, name: &Path, shown: &str) -> Result<(), ArchiveError> {
        // What the descriptor is, not what the name was a moment ago.
        let st = rustix::fs::fstat(&file).map_err(io_err(shown))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            self.summary.skipped += 1;
            return Ok(());
        }
        if st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                let mut h = header(&st, tar::EntryType::Link, 0);
                self.tar
                    .append_link(&mut h, name, first)
                    .map_err(Self::write_err)?;
                self.summary.entries += 1;
                return Ok(());
            }
            self.links.insert(key, name.to_path_buf());
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        // Blocking reads from here on (a regular file never blocks; NONBLOCK kept a fifo from
        // hanging the open).
        let _ = rustix::fs::fcntl_setfl(&file, OFlags::empty());
        let mut h = header(&st, tar::EntryType::Regular, size);
        // The file may change while it is read: exactly `size` bytes go into the archive.
        let data = ExactLen {
            inner: File::from(file).take(size),
            left: size,
        };
        self.tar
            .append_data(&mut h, name, data)
            .map_err(Self::write_err)?;
        self.summary.entries += 1;
        self.summary.bytes += size;
        Ok(())
    }

    fn symlink(
        &mut self,
        st: &rustix::fs::Stat,
        name: &Path,
        target: &OsStr,
    ) -> Result<(), ArchiveError> {
        let mut h = header(st, tar::EntryType::Symlink, 0);
        self.tar
            .append_link(&mut h, name, target)
            .map_err(Self::write_err)?;
        self.summary.entries += 1;
        Ok(())
    }
}

/// Reads exactly `left` bytes: the inner reader's, then zeros if it ends early.
struct ExactLen<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactLen<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = usize::try_from(self.left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = match self.inner.read(&mut buf[..want])? {
            0 => {
                buf[..want].fill(0);
                want
            }
            n => n,
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// How [`unpack`] places and owns what it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackOptions {
    /// How entries may be placed (see the module docs).
    pub confine: Confine,
    /// Who owns the new files.
    pub owner: Owner,
}

/// Where the archive goes: the directory entries are created in, and the name the top entry
/// takes there (None: its own; `.` for contents that go straight into the directory).
struct Target {
    dir: String,
    rename: Option<String>,
}

/// Writes the tar stream `input` to `dest` (seen from `root`; see the module docs for the path
/// rules and [`UnpackOptions`] for the rest).
pub fn unpack(
    root: BorrowedFd<'_>,
    dest: &str,
    input: impl Read,
    options: UnpackOptions,
) -> Result<Summary, ArchiveError> {
    let mut archive = tar::Archive::new(input);
    let mut entries = archive.entries().map_err(ArchiveError::Malformed)?;
    let Some(first) = entries.next() else {
        return Err(ArchiveError::Malformed(io::ErrorKind::UnexpectedEof.into()));
    };
    let first = first.map_err(ArchiveError::Malformed)?;
    let top_path = entry_path(&first)?;
    let top_is_dir = first.header().entry_type().is_dir();
    let contents = top_path.as_os_str().is_empty();
    let top = top_path.clone();
    if !contents && top.components().count() != 1 {
        return Err(ArchiveError::Escape(top.display().to_string()));
    }
    let target = target(root, dest, contents, top_is_dir)?;
    let mut w = Writer {
        root,
        target,
        options,
        top,
        contents,
        summary: Summary::default(),
        dirs: Vec::new(),
    };
    w.entry(first)?;
    for e in entries {
        let e = e.map_err(ArchiveError::Malformed)?;
        w.entry(e)?;
    }
    w.fix_dirs();
    Ok(w.summary)
}

/// The entry's path made relative and plain: `./` parts dropped; `..` or an absolute path is an
/// escape. The archive's top directory for contents (`.`) is the empty path.
fn entry_path<R: Read>(e: &tar::Entry<'_, R>) -> Result<PathBuf, ArchiveError> {
    let raw = e.path().map_err(ArchiveError::Malformed)?;
    plain(&raw)
}

fn plain(raw: &Path) -> Result<PathBuf, ArchiveError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return Err(ArchiveError::Escape(raw.display().to_string())),
        }
    }
    Ok(out)
}

fn parent_and_name(path: &str) -> (&str, &str) {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/", name),
        Some((parent, name)) => (parent, name),
        None => (".", trimmed),
    }
}

/// Where a copy of top `contents` (a directory when `top_is_dir`) goes for `dest`, as docker's.
fn target(
    root: BorrowedFd<'_>,
    dest: &str,
    contents: bool,
    top_is_dir: bool,
) -> Result<Target, ArchiveError> {
    let existing = open_in_root(root, dest, OFlags::PATH)
        .ok()
        .and_then(|fd| rustix::fs::fstat(&fd).ok());
    match existing {
        Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(Target {
            dir: dest.to_string(),
            rename: None,
        }),
        Some(_) if top_is_dir || contents => Err(ArchiveError::DirOntoFile(dest.to_string())),
        _ if dest.ends_with('/') && !top_is_dir => Err(ArchiveError::NoDirectory(dest.to_string())),
        _ => {
            let (parent, name) = parent_and_name(dest);
            let parent_ok = open_in_root(root, parent, OFlags::PATH | OFlags::DIRECTORY).is_ok();
            if !parent_ok || name.is_empty() || name == "." || name == ".." {
                return Err(ArchiveError::NoDirectory(parent.to_string()));
            }
            Ok(Target {
                dir: parent.to_string(),
                rename: Some(name.to_string()),
            })
        }
    }
}

struct Writer<'a> {
    root: BorrowedFd<'a>,
    target: Target,
    options: UnpackOptions,
    /// The archive's top entry (empty for contents).
    top: PathBuf,
    contents: bool,
    summary: Summary,
    /// Directories created, with what they get once everything in them is written.
    dirs: Vec<(PathBuf, u32, (u32, u32), u64)>,
}

impl Writer<'_> {
    /// The entry's path below the target directory (the top renamed as asked).
    fn place(&self, path: &Path) -> Result<PathBuf, ArchiveError> {
        if self.contents {
            return Ok(path.to_path_buf());
        }
        let rest = path
            .strip_prefix(&self.top)
            .map_err(|_| ArchiveError::Escape(path.display().to_string()))?;
        let top = match &self.target.rename {
            Some(name) => PathBuf::from(name),
            None => self.top.clone(),
        };
        Ok(if rest.as_os_str().is_empty() {
            top
        } else {
            top.join(rest)
        })
    }

    fn shown(&self, rel: &Path) -> String {
        format!(
            "{}/{}",
            self.target.dir.trim_end_matches('/'),
            rel.display()
        )
    }

    /// Opens the directory `rel` (below the target) for creating entries in it.
    fn open_dir(&self, rel: &Path) -> Result<OwnedFd, ArchiveError> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let shown = self.shown(rel);
        match self.options.confine {
            Confine::InRoot => {
                let full = format!("{}/{}", self.target.dir, rel.display());
                open_in_root(self.root, &full, OFlags::PATH | OFlags::DIRECTORY)
                    .map_err(|_| ArchiveError::NoDirectory(shown))
            }
            Confine::Beneath => {
                let base = open_in_root(
                    self.root,
                    &self.target.dir,
                    OFlags::PATH | OFlags::DIRECTORY,
                )
                .map_err(|_| ArchiveError::NoDirectory(self.target.dir.clone()))?;
                let rel = if rel.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    rel
                };
                rustix::fs::openat2(
                    &base,
                    rel,
                    flags,
                    Mode::empty(),
                    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
                )
                .map_err(|e| match e {
                    rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
                        ArchiveError::Escape(shown)
                    }
                    _ => ArchiveError::NoDirectory(shown),
                })
            }
        }
    }

    fn ids(&self, h: &tar::Header) -> (u32, u32) {
        let (bu, bg) = self.options.owner.base;
        if !self.options.owner.keep {
            return (bu, bg);
        }
        let id = |v: io::Result<u64>| u32::try_from(v.unwrap_or(0)).unwrap_or(0);
        (
            bu.saturating_add(id(h.uid())),
            bg.saturating_add(id(h.gid())),
        )
    }

    fn mode(&self, h: &tar::Header) -> u32 {
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        if self.options.confine == Confine::Beneath {
            // Never a setuid or setgid file on the host from what a container sent.
            mode & 0o1777
        } else {
            mode
        }
    }

    fn entry<R: Read>(&mut self, mut e: tar::Entry<'_, R>) -> Result<(), ArchiveError> {
        let path = entry_path(&e)?;
        let rel = self.place(&path)?;
        let kind = e.header().entry_type();
        let (ids, mode) = (self.ids(e.header()), self.mode(e.header()));
        let mtime = e.header().mtime().unwrap_or(0);
        if rel.as_os_str().is_empty() {
            // The target directory itself (contents): created if missing, then like any other.
            if kind.is_dir() {
                self.mkdir_target()?;
                self.dirs.push((rel, mode, ids, mtime));
                self.summary.entries += 1;
            }
            return Ok(());
        }
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let name = rel.file_name().unwrap_or_default();
        let shown = self.shown(&rel);
        let parent = self.open_dir(parent_rel)?;
        let times = Timestamps {
            last_access: Timespec {
                tv_sec: i64::try_from(mtime).unwrap_or(0),
                tv_nsec: 0,
            },
            last_modification: Timespec {
                tv_sec: i64::try_from(mtime).unwrap_or(0),
                tv_nsec: 0,
            },
        };
        let uid = Some(rustix::fs::Uid::from_raw(ids.0));
        let gid = Some(rustix::fs::Gid::from_raw(ids.1));
        match kind {
            tar::EntryType::Directory => {
                match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) => {}
                    Err(rustix::io::Errno::EXIST) => {
                        let st = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)
                            .map_err(io_err(&shown))?;
                        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                            remove(&parent, name, &shown)?;
                            rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))
                                .map_err(io_err(&shown))?;
                        }
                    }
                    Err(e) => return Err(io_err(&shown)(e)),
                }
                self.dirs.push((rel, mode, ids, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                replace(&parent, name, &shown)?;
                let fd = rustix::fs::openat(
                    &parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io_err(&shown))?;
                let mut file = File::from(fd);
                let n = io::copy(&mut e, &mut file).map_err(|source| ArchiveError::Io {
                    path: shown.clone(),
                    source,
                })?;
                rustix::fs::fchown(&file, uid, gid).map_err(io_err(&shown))?;
                rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(io_err(&shown))?;
                rustix::fs::futimens(&file, &times).map_err(io_err(&shown))?;
                self.summary.bytes += n;
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name()
                    .map_err(ArchiveError::Malformed)?
                    .ok_or_else(|| ArchiveError::Malformed(io::ErrorKind::InvalidData.into()))?;
                replace(&parent, name, &shown)?;
                rustix::fs::symlinkat(target.as_os_str(), &parent, name).map_err(io_err(&shown))?;
                rustix::fs::chownat(&parent, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io_err(&shown))?;
                rustix::fs::utimensat(&parent, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io_err(&shown))?;
            }
            tar::EntryType::Link => {
                let raw = e
                    .link_name()
                    .map_err(ArchiveError::Malformed)?
                    .ok_or_else(|| ArchiveError::Malformed(io::ErrorKind::InvalidData.into()))?;
                let to = self.place(&plain(&raw)?)?;
                let to_parent = self.open_dir(to.parent().unwrap_or(Path::new("")))?;
                let to_name = to.file_name().unwrap_or_default();
                let existing = rustix::fs::openat(
                    &to_parent,
                    to_name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|_| ArchiveError::NotFound(self.shown(&to)))?;
                replace(&parent, name, &shown)?;
                rustix::fs::linkat(&existing, "", &parent, name, AtFlags::EMPTY_PATH)
                    .map_err(io_err(&shown))?;
            }
            _ => {
                log::warn!("{shown}: not a file, directory or link: skipped");
                self.summary.skipped += 1;
                return Ok(());
            }
        }
        self.summary.entries += 1;
        Ok(())
    }

    /// Creates the target directory of a contents copy when it does not exist yet.
    fn mkdir_target(&mut self) -> Result<(), ArchiveError> {
        if let Some(name) = self.target.rename.take() {
            let parent = self.open_dir(Path::new(""))?;
            let shown = self.shown(Path::new(&name));
            match rustix::fs::mkdirat(&parent, name.as_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io_err(&shown)(e)),
            }
            self.target.dir = format!("{}/{name}", self.target.dir.trim_end_matches('/'));
        }
        Ok(())
    }

    /// Gives every directory written its mode, owner and time, deepest first (writing into a
    /// directory changes its time).
    fn fix_dirs(&mut self) {
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, mode, (uid, gid), mtime) in dirs.into_iter().rev() {
            let Ok(fd) = self.open_dir(&rel) else {
                continue;
            };
            let Ok(dir) = rustix::fs::openat(
                &fd,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                continue;
            };
            let t = Timespec {
                tv_sec: i64::try_from(mtime).unwrap_or(0),
                tv_nsec: 0,
            };
            let _ = rustix::fs::fchown(
                &dir,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            );
            let _ = rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode));
            let _ = rustix::fs::futimens(
                &dir,
                &Timestamps {
                    last_access: t,
                    last_modification: t,
                },
            );
        }
    }
}

/// Removes whatever non-directory is at `name` (a new file never writes through an old one or a
/// link); a directory there is an error.
fn replace(parent: &OwnedFd, name: &OsStr, shown: &str) -> Result<(), ArchiveError> {
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(_) => Ok(()),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            Err(ArchiveError::DirOntoFile(shown.to_string()))
        }
        Ok(_) => remove(parent, name, shown),
    }
}

fn remove(parent: &OwnedFd, name: &OsStr, shown: &str) -> Result<(), ArchiveError> {
    rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(io_err(shown))
}

/// Opens `path` as a root for [`pack`] and [`unpack`]: a directory (a container's
/// `/proc/<pid>/root`, or `/` on the host).
pub fn open_root(path: &Path) -> Result<OwnedFd, ArchiveError> {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err(&path.display().to_string()))
}

/// A copy the guest agent runs for `mvm cp` (see [`spawn`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyJob {
    /// [`pack`] `path` to stdout.
    Out {
        /// Path in the container.
        path: String,
        /// Follow a link `path` names.
        follow: bool,
    },
    /// [`unpack`] stdin to `path`.
    In {
        /// Destination in the container.
        path: String,
        /// Who owns what is written.
        owner: Owner,
    },
}

/// Runs `job` on the root of the container whose first process is `container_pid`, in a forked
/// child with piped stdio (the archive on stdout or stdin, an error line on stderr, exit code 0
/// or 1), so a large copy never blocks the caller's loop. Call it from a single-threaded process
/// (the guest agent): the child allocates.
pub fn spawn(
    container_pid: libc::pid_t,
    job: CopyJob,
) -> Result<super::exec::ExecProcess, super::ContainerError> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let os = |what| move |e: io::Error| super::ContainerError::Os(what, e);
    let pipe = || -> Result<(File, File), super::ContainerError> {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| super::ContainerError::Os("pipe", e.into()))?;
        Ok((File::from(r), File::from(w)))
    };
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let root_path = PathBuf::from(format!("/proc/{container_pid}/root"));
    // SAFETY: fork in a single-threaded process (see above); the child only runs `copy_child`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os("fork")(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: the child dies with its parent; prctl has no memory effects.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        for (fd, target) in [(&in_r, 0), (&out_w, 1), (&err_w, 2)] {
            // SAFETY: dup2 of a pipe end we own onto a standard descriptor.
            unsafe { libc::dup2(fd.as_raw_fd(), target) };
        }
        // Nothing of the agent's reaches the copy: only its stdio stays open.
        // SAFETY: close_range only closes descriptors of this forked, single-threaded process.
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
        // SAFETY: descriptors 0, 1 and 2 were just put there and are owned by nobody else here.
        let (stdin, stdout, mut stderr) = unsafe {
            (
                File::from_raw_fd(0),
                File::from_raw_fd(1),
                File::from_raw_fd(2),
            )
        };
        let result = open_root(&root_path).and_then(|root| {
            use std::os::fd::AsFd;
            match job {
                CopyJob::Out { path, follow } => {
                    pack(root.as_fd(), &path, follow, stdout).map(drop)
                }
                CopyJob::In { path, owner } => unpack(
                    root.as_fd(),
                    &path,
                    stdin,
                    UnpackOptions {
                        confine: Confine::InRoot,
                        owner,
                    },
                )
                .map(drop),
            }
        });
        let code = match result {
            Ok(()) => 0,
            Err(e) => {
                let _ = writeln!(stderr, "{}", crate::runtime::error_line(&e));
                1
            }
        };
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    drop((in_r, out_w, err_w));
    Ok(super::exec::ExecProcess::from_child(
        pid,
        Some(in_w),
        Some(out_r),
        Some(err_r),
    ))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn root_of(dir: &Path) -> OwnedFd {
        open_root(dir).unwrap()
    }

    /// A tree with a nested directory, an executable, a symlink and a hard link.
    fn tree(at: &Path) {
        std::fs::create_dir_all(at.join("a/b")).unwrap();
        std::fs::write(at.join("a/b/deep.txt"), b"deep").unwrap();
        std::fs::write(at.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(at.join("run.sh"), std::fs::Permissions::from_mode(0o751))
            .unwrap();
        std::os::unix::fs::symlink("a/b/deep.txt", at.join("link")).unwrap();
        std::fs::hard_link(at.join("run.sh"), at.join("run2.sh")).unwrap();
        let old = Timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 0,
        };
        let t = Timestamps {
            last_access: old,
            last_modification: old,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            at.join("a/b/deep.txt"),
            &t,
            AtFlags::empty(),
        )
        .unwrap();
    }

    fn host() -> UnpackOptions {
        UnpackOptions {
            confine: Confine::Beneath,
            owner: Owner {
                base: (0, 0),
                keep: false,
            },
        }
    }

    #[test]
    fn a_tree_round_trips_with_modes_times_and_links() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        std::fs::create_dir_all(src.join("tree")).unwrap();
        std::fs::create_dir(&dst).unwrap();
        tree(&src.join("tree"));
        let mut tar = Vec::new();
        let sroot = root_of(&src);
        let packed = pack(sroot.as_fd(), "/tree", false, &mut tar).unwrap();
        assert_eq!(
            packed.entries, 7,
            "tree, a, a/b, deep, link, run.sh, run2.sh"
        );
        let droot = root_of(d.path());
        // Into an existing directory: dst/tree.
        unpack(droot.as_fd(), "/dst", tar.as_slice(), host()).unwrap();
        let t = dst.join("tree");
        assert_eq!(std::fs::read(t.join("a/b/deep.txt")).unwrap(), b"deep");
        let meta = std::fs::metadata(t.join("a/b/deep.txt")).unwrap();
        assert_eq!(meta.mtime(), 1_000_000_000);
        assert_eq!(
            std::fs::metadata(t.join("run.sh")).unwrap().mode() & 0o7777,
            0o751
        );
        assert_eq!(
            std::fs::read_link(t.join("link")).unwrap(),
            Path::new("a/b/deep.txt")
        );
        assert_eq!(
            std::fs::metadata(t.join("run.sh")).unwrap().ino(),
            std::fs::metadata(t.join("run2.sh")).unwrap().ino()
        );
        // To a new name: dst/copy is the tree; its contents into an existing directory.
        unpack(droot.as_fd(), "/dst/copy", tar.as_slice(), host()).unwrap();
        assert!(dst.join("copy/a/b/deep.txt").is_file());
        let mut contents = Vec::new();
        pack(sroot.as_fd(), "/tree/.", false, &mut contents).unwrap();
        unpack(droot.as_fd(), "/dst/copy", contents.as_slice(), host()).unwrap();
        assert!(dst.join("copy/run.sh").is_file() && !dst.join("copy/tree").exists());
        // A file onto a file, and a directory onto a file is refused.
        let mut one = Vec::new();
        pack(sroot.as_fd(), "/tree/run.sh", false, &mut one).unwrap();
        unpack(droot.as_fd(), "/dst/copy/link", one.as_slice(), host()).unwrap();
        assert!(std::fs::symlink_metadata(dst.join("copy/link"))
            .unwrap()
            .is_file());
        assert!(matches!(
            unpack(droot.as_fd(), "/dst/copy/run.sh", tar.as_slice(), host()),
            Err(ArchiveError::DirOntoFile(_))
        ));
        assert!(matches!(
            unpack(droot.as_fd(), "/dst/nope/x", tar.as_slice(), host()),
            Err(ArchiveError::NoDirectory(_))
        ));
    }

    #[test]
    fn paths_in_a_container_never_leave_its_root() {
        let d = tempfile::tempdir().unwrap();
        let (root, outside) = (d.path().join("root"), d.path().join("outside"));
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"host").unwrap();
        // Links the container made: absolute and relative, both aimed at the host's directory.
        std::os::unix::fs::symlink(&outside, root.join("tmp/abs")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../../..", root.join("tmp/up")).unwrap();
        let r = root_of(&root);
        for through in ["/tmp/abs/secret", "/tmp/up/outside/secret"] {
            let mut tar = Vec::new();
            let e = pack(r.as_fd(), through, false, &mut tar);
            assert!(
                matches!(e, Err(ArchiveError::NotFound(_))),
                "{through}: {e:?}"
            );
        }
        // Writing through them lands inside the root, or nowhere.
        let mut one = Vec::new();
        std::fs::write(d.path().join("file"), b"x").unwrap();
        pack(root_of(d.path()).as_fd(), "/file", false, &mut one).unwrap();
        let inside = UnpackOptions {
            confine: Confine::InRoot,
            owner: Owner {
                base: (0, 0),
                keep: false,
            },
        };
        let e = unpack(r.as_fd(), "/tmp/abs/", one.as_slice(), inside);
        assert!(e.is_err());
        std::fs::create_dir_all(root.join(outside.strip_prefix("/").unwrap())).unwrap();
        unpack(r.as_fd(), "/tmp/abs/", one.as_slice(), inside).unwrap();
        assert!(!outside.join("file").exists());
        assert!(root
            .join(outside.strip_prefix("/").unwrap())
            .join("file")
            .exists());
    }

    /// A tar stream made by hand, as a hostile guest could send it.
    fn crafted(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o4755);
            h.set_size(if *kind == tar::EntryType::Regular {
                1
            } else {
                0
            });
            // Raw names: the builder would refuse `..`.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            if !link.is_empty() {
                h.set_link_name_literal(link).unwrap();
            }
            h.set_cksum();
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"x"
            } else {
                b""
            };
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn on_the_host_an_archive_cannot_write_outside_the_destination() {
        let d = tempfile::tempdir().unwrap();
        let (dst, outside) = (d.path().join("dst"), d.path().join("outside"));
        std::fs::create_dir(&dst).unwrap();
        std::fs::create_dir(&outside).unwrap();
        let r = root_of(d.path());
        let out = outside.display().to_string();
        let dir = tar::EntryType::Directory;
        let file = tar::EntryType::Regular;
        let cases = [
            // A link to the outside, then a file through it.
            crafted(&[
                ("t", dir, ""),
                ("t/l", tar::EntryType::Symlink, &out),
                ("t/l/pwned", file, ""),
            ]),
            // `..` and a sibling of the top.
            crafted(&[("t", dir, ""), ("t/../pwned", file, "")]),
            crafted(&[("t", dir, ""), ("pwned", file, "")]),
            // A hard link to a file outside.
            crafted(&[
                ("t", dir, ""),
                ("t/h", tar::EntryType::Link, "../outside/x"),
            ]),
        ];
        for (i, tar) in cases.iter().enumerate() {
            let e = unpack(r.as_fd(), "/dst", tar.as_slice(), host());
            assert!(matches!(e, Err(ArchiveError::Escape(_))), "case {i}: {e:?}");
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // Setuid bits never reach the host.
        let tar = crafted(&[("t", dir, ""), ("t/suid", file, "")]);
        unpack(r.as_fd(), "/dst", tar.as_slice(), host()).unwrap();
        let mode = std::fs::metadata(dst.join("t/suid")).unwrap().mode();
        assert_eq!(mode & 0o7777, 0o755);
    }
}
