//! The per-entry work of applying one layer: path resolution beneath the root, writes relative
//! to directory descriptors, whiteouts and the directory fix-ups at the end.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::io::Errno;

use super::devices::{DeviceKind, DeviceNode, Devices};
use super::{UnpackError, UnpackStats, NO_OPENAT2, OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::limits::{Budget, LayerLimits, LimitError};

pub(super) enum ApplyError {
    /// The archive itself is unreadable.
    Archive(io::Error),
    /// The layer is over a limit.
    Limit(LimitError),
    /// An entry was refused or could not be written.
    Unpack(UnpackError),
}

impl From<UnpackError> for ApplyError {
    fn from(e: UnpackError) -> Self {
        ApplyError::Unpack(e)
    }
}

/// A normalized entry path: components below the root, no `.`, `..` or empty parts.
type RelPath = Vec<OsString>;

/// Mode, owner and mtime of a directory, applied once the layer is done.
struct DirFixup {
    mode: u32,
    owner: Option<(u32, u32)>,
    mtime: i64,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

pub(super) struct Applier<'a> {
    root: BorrowedFd<'a>,
    use_openat2: Cell<bool>,
    is_root: bool,
    /// Paths this layer wrote, for opaque directories that come after their contents.
    written: HashSet<RelPath>,
    dirs: HashMap<RelPath, DirFixup>,
    stats: UnpackStats,
    /// Device nodes of this layer and the ones below it.
    devices: Devices,
    limits: LayerLimits,
    /// What this layer may still expand to (file data of sparse entries counts).
    budget: Option<Budget>,
    entries: u64,
}

impl<'a> Applier<'a> {
    pub(super) fn new(root: BorrowedFd<'a>, use_openat2: bool) -> Self {
        Applier {
            root,
            use_openat2: Cell::new(use_openat2 && !NO_OPENAT2.load(Ordering::Relaxed)),
            is_root: rustix::process::geteuid().is_root(),
            written: HashSet::new(),
            dirs: HashMap::new(),
            stats: UnpackStats::default(),
            devices: Devices::default(),
            limits: LayerLimits::default(),
            budget: None,
            entries: 0,
        }
    }

    /// Holds the layer to `limits`; `budget` is what it may still expand to.
    pub(super) fn with_limits(mut self, limits: LayerLimits, budget: Budget) -> Self {
        self.limits = limits;
        self.budget = Some(budget);
        self
    }

    /// Continues the device records of the layers below.
    pub(super) fn with_devices(mut self, devices: Devices) -> Self {
        self.devices = devices;
        self
    }

    /// The device records, with this layer's changes.
    pub(super) fn take_devices(&mut self) -> Devices {
        std::mem::take(&mut self.devices)
    }

    pub(super) fn apply(&mut self, stream: impl Read) -> Result<UnpackStats, ApplyError> {
        let mut archive = tar::Archive::new(stream);
        let entries = archive.entries().map_err(ApplyError::Archive)?;
        for entry in entries {
            let mut entry = entry.map_err(ApplyError::Archive)?;
            self.entries += 1;
            self.limits
                .check_entries(self.entries)
                .map_err(ApplyError::Limit)?;
            self.entry(&mut entry)?;
        }
        self.fix_dirs();
        Ok(self.stats)
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ApplyError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let rel = normalize(&raw).map_err(|reason| UnpackError::Escape {
            entry: name.clone(),
            reason,
        })?;
        let meta = EntryMeta::read(entry).map_err(ApplyError::Archive)?;
        let Some((leaf, parent_rel)) = rel.split_last() else {
            // The root itself ("./"): only a directory entry makes sense, for its metadata.
            if kind.is_dir() {
                self.dirs.insert(Vec::new(), meta.dir_fixup(self.is_root));
                return Ok(());
            }
            return Err(bad(&name, "names the root directory").into());
        };
        let leaf_str = leaf.to_string_lossy();
        if leaf_str.starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(&name, parent_rel, leaf).map_err(Into::into);
        }
        let parent = self.open_dir(&name, parent_rel, true)?;
        let werr = |source: io::Error| UnpackError::Write {
            entry: name.clone(),
            source,
        };
        if !kind.is_hard_link() {
            // Whatever this entry is replaces a device node a lower layer recorded there.
            self.devices.forget(&rel);
        }
        if kind.is_dir() {
            self.make_dir(parent.as_fd(), leaf).map_err(werr)?;
            self.dirs.insert(rel.clone(), meta.dir_fixup(self.is_root));
            self.stats.dirs += 1;
        } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            remove_existing(parent.as_fd(), leaf).map_err(werr)?;
            let n = self
                .write_file(parent.as_fd(), leaf, entry, &meta)
                .map_err(werr)?;
            self.stats.files += 1;
            self.stats.bytes += n;
        } else if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|t| t.into_owned())
                .unwrap_or_default();
            if target.is_empty() {
                return Err(bad(&name, "symlink without a target").into());
            }
            remove_existing(parent.as_fd(), leaf).map_err(werr)?;
            rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent, leaf.as_os_str())
                .map_err(|e| werr(e.into()))?;
            self.finish_at(parent.as_fd(), leaf, &meta).map_err(werr)?;
            self.stats.symlinks += 1;
        } else if kind.is_hard_link() {
            self.hard_link(&name, &rel, entry, parent.as_fd(), leaf)?;
        } else if kind.is_character_special() || kind.is_block_special() {
            remove_existing(parent.as_fd(), leaf).map_err(werr)?;
            self.record_device(&rel, kind, &meta);
        } else if kind.is_fifo() {
            self.fifo(parent.as_fd(), leaf, &meta).map_err(werr)?;
        } else {
            log::warn!("skipping layer entry {name:?} of unsupported type {kind:?}");
            self.stats.skipped += 1;
            return Ok(());
        }
        self.written.insert(rel);
        Ok(())
    }

    /// Opens the directory `rel` below the root without leaving it; with `nofollow_last` the
    /// last component must not be a symlink at all.
    fn lookup(&self, rel: &[OsString], nofollow_last: bool) -> Result<OwnedFd, Errno> {
        if self.use_openat2.get() {
            let path: PathBuf = rel.iter().collect();
            let path = if rel.is_empty() {
                Path::new(".")
            } else {
                path.as_path()
            };
            let mut flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
            if nofollow_last {
                flags |= OFlags::NOFOLLOW;
            }
            let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
            let mut tries = 0;
            loop {
                match rustix::fs::openat2(self.root, path, flags, Mode::empty(), resolve) {
                    Err(Errno::AGAIN) if tries < 8 => tries += 1,
                    Err(Errno::NOSYS) => {
                        NO_OPENAT2.store(true, Ordering::Relaxed);
                        self.use_openat2.set(false);
                        break;
                    }
                    other => return other,
                }
            }
        }
        self.open_nofollow_walk(rel)
    }

    /// Opens the directory `rel` below the root, creating missing components when `create`.
    fn open_dir(&self, name: &str, rel: &[OsString], create: bool) -> Result<OwnedFd, UnpackError> {
        let mut created_upto = 0;
        loop {
            let path: PathBuf = rel.iter().collect();
            match self.lookup(rel, false) {
                Ok(fd) => return Ok(fd),
                Err(Errno::XDEV) | Err(Errno::LOOP) => {
                    return Err(UnpackError::Escape {
                        entry: name.to_string(),
                        reason: format!(
                        "its parent {:?} goes through a symlink that leaves the root (or loops)",
                        path.display().to_string()
                    ),
                    })
                }
                Err(Errno::NOTDIR) => {
                    return Err(bad(name, "a parent component is not a directory"));
                }
                Err(Errno::NOENT) if create && created_upto < rel.len() => {
                    // Create the first missing component, then retry the whole lookup.
                    created_upto = self.create_first_missing(name, rel)?;
                }
                Err(e) => {
                    return Err(UnpackError::Write {
                        entry: name.to_string(),
                        source: e.into(),
                    })
                }
            }
        }
    }

    /// Fallback without `openat2`: one component at a time, never following a symlink.
    fn open_nofollow_walk(&self, rel: &[OsString]) -> Result<OwnedFd, Errno> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut cur = rustix::fs::openat(self.root, ".", flags, Mode::empty())?;
        for comp in rel {
            cur = match rustix::fs::openat(&cur, comp.as_os_str(), flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                    let st = rustix::fs::statat(&cur, comp.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?;
                    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                        return Err(Errno::XDEV);
                    }
                    return Err(Errno::NOTDIR);
                }
                Err(e) => return Err(e),
            };
        }
        Ok(cur)
    }

    /// Creates the first missing directory of `rel` and returns how many components now exist.
    fn create_first_missing(&self, name: &str, rel: &[OsString]) -> Result<usize, UnpackError> {
        let werr = |e: Errno| UnpackError::Write {
            entry: name.to_string(),
            source: e.into(),
        };
        for i in 0..rel.len() {
            match self.lookup(&rel[..=i], false) {
                Ok(_) => continue,
                Err(Errno::NOENT) => {
                    let parent = self.open_dir(name, &rel[..i], false)?;
                    match rustix::fs::mkdirat(
                        &parent,
                        rel[i].as_os_str(),
                        Mode::from_raw_mode(0o755),
                    ) {
                        Ok(()) | Err(Errno::EXIST) => return Ok(i + 1),
                        Err(e) => return Err(werr(e)),
                    }
                }
                // Let the caller's lookup report symlink escapes and non-directories.
                Err(_) => return Ok(rel.len()),
            }
        }
        Ok(rel.len())
    }

    fn make_dir(&self, parent: BorrowedFd<'_>, leaf: &OsStr) -> io::Result<()> {
        match rustix::fs::statat(parent, leaf, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => return Ok(()),
            Ok(_) => rustix::fs::unlinkat(parent, leaf, AtFlags::empty())?,
            Err(Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        rustix::fs::mkdirat(parent, leaf, Mode::from_raw_mode(0o755))?;
        Ok(())
    }

    fn write_file<R: Read>(
        &self,
        parent: BorrowedFd<'_>,
        leaf: &OsStr,
        entry: &mut tar::Entry<'_, R>,
        meta: &EntryMeta,
    ) -> io::Result<u64> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(parent, leaf, flags, Mode::from_raw_mode(0o600))?;
        let mut file = File::from(fd);
        let n = match &self.budget {
            // A sparse entry expands its holes: that counts as well.
            Some(b) if entry.header().entry_type().is_gnu_sparse() => {
                io::copy(&mut b.reader(entry), &mut file)?
            }
            _ => io::copy(entry, &mut file)?,
        };
        if self.is_root {
            rustix::fs::fchown(&file, Some(uid(meta.uid)), Some(gid(meta.gid)))?;
            set_xattrs(file.as_fd(), &meta.xattrs);
        }
        // After chown, which clears set-user-ID and set-group-ID bits.
        rustix::fs::fchmod(&file, Mode::from_raw_mode(meta.mode & 0o7777))?;
        rustix::fs::futimens(&file, &times(meta.mtime))?;
        Ok(n)
    }

    /// Ownership and mtime for an entry without an open descriptor (symlinks, device nodes).
    fn finish_at(&self, parent: BorrowedFd<'_>, leaf: &OsStr, meta: &EntryMeta) -> io::Result<()> {
        if self.is_root {
            rustix::fs::chownat(
                parent,
                leaf,
                Some(uid(meta.uid)),
                Some(gid(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        rustix::fs::utimensat(parent, leaf, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(())
    }

    fn hard_link<R: Read>(
        &mut self,
        name: &str,
        rel: &[OsString],
        entry: &tar::Entry<'_, R>,
        parent: BorrowedFd<'_>,
        leaf: &OsStr,
    ) -> Result<(), UnpackError> {
        let raw = entry
            .link_name_bytes()
            .map(|t| t.into_owned())
            .unwrap_or_default();
        let target = normalize(&raw).map_err(|reason| UnpackError::Escape {
            entry: name.to_string(),
            reason: format!(
                "hard link target {:?} {reason}",
                String::from_utf8_lossy(&raw)
            ),
        })?;
        if let Some(node) = self.devices.get(&target).cloned() {
            // A link to a device node is one more device node, recorded the same way.
            self.devices.record(rel, node);
            self.stats.devices += 1;
            return Ok(());
        }
        self.devices.forget(rel);
        let Some((tleaf, tparent_rel)) = target.split_last() else {
            return Err(bad(name, "hard link to the root directory"));
        };
        let tparent = self
            .open_dir(name, tparent_rel, false)
            .map_err(|e| match e {
                UnpackError::Escape { .. } => UnpackError::Escape {
                    entry: name.to_string(),
                    reason: "hard link target goes through a symlink that leaves the root".into(),
                },
                UnpackError::Write { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                    bad(name, "hard link target is not in the layers (yet)")
                }
                other => other,
            })?;
        let werr = |source: io::Error| UnpackError::Write {
            entry: name.to_string(),
            source,
        };
        let tst = match rustix::fs::statat(&tparent, tleaf.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => {
                return Err(bad(name, "hard link target is not in the layers (yet)"));
            }
            Err(e) => return Err(werr(e.into())),
        };
        if FileType::from_raw_mode(tst.st_mode) == FileType::Directory {
            return Err(bad(name, "hard link to a directory"));
        }
        if let Ok(st) = rustix::fs::statat(parent, leaf, AtFlags::SYMLINK_NOFOLLOW) {
            if st.st_ino == tst.st_ino && st.st_dev == tst.st_dev {
                return Ok(());
            }
        }
        remove_existing(parent, leaf).map_err(werr)?;
        rustix::fs::linkat(&tparent, tleaf.as_os_str(), parent, leaf, AtFlags::empty())
            .map_err(|e| werr(e.into()))?;
        self.stats.hardlinks += 1;
        Ok(())
    }

    /// Records a device node; it is never created on the host.
    fn record_device(&mut self, rel: &[OsString], kind: tar::EntryType, meta: &EntryMeta) {
        let node = DeviceNode {
            path: String::new(),
            kind: if kind.is_block_special() {
                DeviceKind::Block
            } else {
                DeviceKind::Char
            },
            major: meta.dev.0,
            minor: meta.dev.1,
            mode: meta.mode & 0o7777,
            uid: meta.uid,
            gid: meta.gid,
        };
        log::debug!(
            "device node {:?} ({:?} {}:{}) recorded, not created",
            rel,
            node.kind,
            node.major,
            node.minor
        );
        self.devices.record(rel, node);
        self.stats.devices += 1;
    }

    fn fifo(&mut self, parent: BorrowedFd<'_>, leaf: &OsStr, meta: &EntryMeta) -> io::Result<()> {
        remove_existing(parent, leaf)?;
        let mode = Mode::from_raw_mode(meta.mode & 0o7777);
        rustix::fs::mknodat(parent, leaf, FileType::Fifo, mode, 0)?;
        self.finish_at(parent, leaf, meta)?;
        self.stats.files += 1;
        Ok(())
    }

    fn whiteout(
        &mut self,
        name: &str,
        parent_rel: &[OsString],
        leaf: &OsStr,
    ) -> Result<(), UnpackError> {
        let parent = match self.open_dir(name, parent_rel, false) {
            Ok(fd) => fd,
            // Whiting out something inside a directory no lower layer has: nothing to hide.
            Err(UnpackError::Write { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                self.stats.whiteouts += 1;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let werr = |source: io::Error| UnpackError::Write {
            entry: name.to_string(),
            source,
        };
        let leaf_bytes = leaf.as_bytes();
        if leaf_bytes == OPAQUE_MARKER.as_bytes() {
            self.make_opaque(parent.as_fd(), parent_rel.to_vec())
                .map_err(werr)?;
            let written = &self.written;
            self.devices
                .forget_below_unless(parent_rel, |k| written.contains(k));
        } else if leaf_bytes.starts_with(b".wh..wh.") {
            // Other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): not part of the image.
            return Ok(());
        } else {
            let hidden = &leaf_bytes[WHITEOUT_PREFIX.len()..];
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(bad(name, "whiteout without a valid name"));
            }
            remove_all_at(parent.as_fd(), OsStr::from_bytes(hidden)).map_err(werr)?;
            let mut gone = parent_rel.to_vec();
            gone.push(OsString::from_vec(hidden.to_vec()));
            self.devices.forget(&gone);
        }
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// Removes everything in `dir` that this layer did not write.
    fn make_opaque(&self, dir: BorrowedFd<'_>, dir_rel: RelPath) -> io::Result<()> {
        for name in list_dir(dir)? {
            let mut child = dir_rel.clone();
            child.push(name.clone());
            let kept_by_layer = self.written.iter().any(|w| w.starts_with(&child));
            if !kept_by_layer {
                remove_all_at(dir, &name)?;
                continue;
            }
            let st = rustix::fs::statat(dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?;
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let sub = rustix::fs::openat(dir, name.as_os_str(), flags, Mode::empty())?;
                self.make_opaque(sub.as_fd(), child)?;
            }
        }
        Ok(())
    }

    /// Applies directory modes, owners and mtimes, deepest first.
    fn fix_dirs(&mut self) {
        let mut dirs: Vec<_> = self.dirs.drain().collect();
        dirs.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        for (rel, fix) in dirs {
            let path: PathBuf = rel.iter().collect();
            let fd = self.lookup(&rel, true);
            // A later entry of this layer replaced the directory: nothing to fix.
            let Ok(fd) = fd else { continue };
            let result = (|| -> io::Result<()> {
                if let Some((u, g)) = fix.owner {
                    rustix::fs::fchown(&fd, Some(uid(u)), Some(gid(g)))?;
                }
                set_xattrs(fd.as_fd(), &fix.xattrs);
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(fix.mode & 0o7777))?;
                rustix::fs::futimens(&fd, &times(fix.mtime))?;
                Ok(())
            })();
            if let Err(e) = result {
                log::warn!("cannot set metadata of directory {}: {e}", path.display());
            }
        }
    }
}

/// The metadata of one tar entry, with pax overrides applied.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    dev: (u32, u32),
    xattrs: Vec<(OsString, Vec<u8>)>,
}

impl EntryMeta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Self> {
        let h = entry.header();
        let mut meta = EntryMeta {
            // Like Go's archive/tar (which wrote most layers), an empty numeric field reads as 0.
            mode: h.mode().unwrap_or(0o644),
            uid: h
                .uid()
                .ok()
                .and_then(|u| u32::try_from(u).ok())
                .unwrap_or(0),
            gid: h
                .gid()
                .ok()
                .and_then(|g| u32::try_from(g).ok())
                .unwrap_or(0),
            mtime: h
                .mtime()
                .ok()
                .and_then(|t| i64::try_from(t).ok())
                .unwrap_or(0),
            dev: (
                h.device_major().ok().flatten().unwrap_or(0),
                h.device_minor().ok().flatten().unwrap_or(0),
            ),
            xattrs: Vec::new(),
        };
        if let Some(pax) = entry.pax_extensions()? {
            for ext in pax {
                let ext = ext?;
                let (Ok(key), value) = (ext.key(), ext.value_bytes()) else {
                    continue;
                };
                let text = std::str::from_utf8(value).unwrap_or("");
                match key {
                    "uid" => meta.uid = text.parse().unwrap_or(meta.uid),
                    "gid" => meta.gid = text.parse().unwrap_or(meta.gid),
                    "mtime" => {
                        let secs = text.split('.').next().unwrap_or("");
                        meta.mtime = secs.parse().unwrap_or(meta.mtime);
                    }
                    k => {
                        if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                            meta.xattrs.push((OsString::from(name), value.to_vec()));
                        }
                    }
                }
            }
        }
        Ok(meta)
    }

    fn dir_fixup(&self, is_root: bool) -> DirFixup {
        DirFixup {
            mode: self.mode,
            owner: is_root.then_some((self.uid, self.gid)),
            mtime: self.mtime,
            xattrs: if is_root {
                self.xattrs.clone()
            } else {
                Vec::new()
            },
        }
    }
}

/// Sets pax `SCHILY.xattr.*` attributes; failures (unsupported, not permitted) are warnings.
fn set_xattrs(fd: BorrowedFd<'_>, xattrs: &[(OsString, Vec<u8>)]) {
    for (key, value) in xattrs {
        if let Err(e) =
            rustix::fs::fsetxattr(fd, key.as_os_str(), value, rustix::fs::XattrFlags::empty())
        {
            log::warn!("cannot set xattr {key:?}: {e}");
        }
    }
}

fn bad(entry: &str, reason: &str) -> UnpackError {
    UnpackError::BadEntry {
        entry: entry.to_string(),
        reason: reason.to_string(),
    }
}

fn uid(u: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(u)
}

fn gid(g: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(g)
}

fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Splits an entry name into components below the root (see the module docs for the rules).
fn normalize(raw: &[u8]) -> Result<RelPath, String> {
    let mut out: RelPath = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err("climbs out of the root with '..'".into());
                }
            }
            c => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    Ok(out)
}

/// Removes whatever is at `leaf` (a directory with its contents) before a non-directory entry.
fn remove_existing(parent: BorrowedFd<'_>, leaf: &OsStr) -> io::Result<()> {
    remove_all_at(parent, leaf)
}

fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for entry in rustix::fs::Dir::read_from(&fd)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    }
    Ok(names)
}

/// Removes `leaf` in `parent` and, for a directory, everything below it, never following
/// symlinks. A missing entry is not an error.
fn remove_all_at(parent: BorrowedFd<'_>, leaf: &OsStr) -> io::Result<()> {
    let st = match rustix::fs::statat(parent, leaf, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let dir = rustix::fs::openat(parent, leaf, flags, Mode::empty())?;
        // A read-only directory from an image must still be emptied.
        let _ = rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700));
        for name in list_dir(dir.as_fd())? {
            remove_all_at(dir.as_fd(), &name)?;
        }
        rustix::fs::unlinkat(parent, leaf, AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(parent, leaf, AtFlags::empty())?;
    }
    Ok(())
}
