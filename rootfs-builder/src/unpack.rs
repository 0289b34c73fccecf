//! Applies OCI/Docker layer tarballs, in order, to a root directory.
//!
//! Every write is made relative to a directory file descriptor, never through a path string the
//! host kernel would resolve from `/`:
//! - an entry's parent directory is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`
//!   from the root, so a symlink in a parent is followed only while it stays inside the root
//!   (`lib -> usr/lib` works; `a -> /etc` or `a -> ../..` is refused). Where `openat2` is missing
//!   (Linux < 5.6) the walk opens one component at a time with `O_NOFOLLOW` and refuses every
//!   symlink in a parent;
//! - the last component is never followed: an existing symlink (or file, or directory) there is
//!   removed and replaced by the entry, so a symlink can never redirect a write.
//!
//! Entry names: a leading `/` is stripped (Docker's behaviour: names are relative to the image
//! root), `.` components are dropped, `..` is applied lexically and an entry that climbs above the
//! root is refused. Hard-link targets follow the same rules and must already exist in the root.
//! Whiteouts (`.wh.NAME`) remove the lower entry; an opaque marker (`.wh..wh..opq`) removes what
//! lower layers put in its directory. Ownership and xattrs (file capabilities among them) are
//! applied when running as root; otherwise ownership is left to the caller. Device nodes are never
//! created: they are recorded ([`DeviceNode`]) for the container runtime (see [`devices`]). Set-id
//! bits and capabilities stay, for the container: the tree lives under mvm's root-only directories
//! ([`crate::rootdir`]), where no other host user reaches it. Directory modes and mtimes are
//! applied after each layer, once their contents are written.
//!
//! Every layer is held to the [`LayerLimits`]: its compressed size, what it expands to (the tar
//! stream, and file data a sparse entry expands) and its entry count. Past a limit, unpacking stops
//! with [`UnpackError::Limit`] and nothing is published.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::limits::{Budget, LayerLimits, LimitError};

mod apply;
pub mod devices;

use apply::{Applier, ApplyError};
use devices::Devices;
pub use devices::{DeviceKind, DeviceNode};

/// The compression of a layer blob, from its OCI or Docker media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerMediaType {
    /// An uncompressed tar archive.
    Tar,
    /// A gzip-compressed tar archive (the Docker default).
    TarGzip,
    /// A zstd-compressed tar archive.
    TarZstd,
}

impl LayerMediaType {
    /// The OCI media type string for this layer format.
    pub fn as_oci(self) -> &'static str {
        match self {
            LayerMediaType::Tar => "application/vnd.oci.image.layer.v1.tar",
            LayerMediaType::TarGzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerMediaType::TarZstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// Parses an OCI or Docker layer media type (distributable or not).
    pub fn parse(media_type: &str) -> Result<Self, UnpackError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(LayerMediaType::Tar),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Ok(LayerMediaType::TarGzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Ok(LayerMediaType::TarZstd)
            }
            other => Err(UnpackError::UnsupportedMediaType(other.to_string())),
        }
    }
}

impl std::str::FromStr for LayerMediaType {
    type Err = UnpackError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Errors from unpacking layers.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The media type is not a tar layer mvm can read.
    #[error("unsupported layer media type {0:?} (mvm reads tar, tar+gzip and tar+zstd layers)")]
    UnsupportedMediaType(String),
    /// The layer blob could not be opened.
    #[error("cannot open layer {}", .path.display())]
    OpenLayer {
        /// The layer file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The blob is not a readable (compressed) tar archive.
    #[error("layer {} is not a valid tar archive", .path.display())]
    BadArchive {
        /// The layer file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An entry tried to reach outside the root; nothing was written for it.
    #[error("refused layer entry {entry:?}: {reason}")]
    Escape {
        /// The entry name as stored in the archive.
        entry: String,
        /// What it tried.
        reason: String,
    },
    /// An entry is malformed (bad hard link, bad whiteout, wrong parent type).
    #[error("invalid layer entry {entry:?}: {reason}")]
    BadEntry {
        /// The entry name as stored in the archive.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing an entry failed.
    #[error("cannot write layer entry {entry:?}")]
    Write {
        /// The entry name as stored in the archive.
        entry: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The layer is over one of the [`LayerLimits`]; nothing was published.
    #[error("layer {} refused", .path.display())]
    Limit {
        /// The layer file.
        path: PathBuf,
        /// The limit.
        #[source]
        source: LimitError,
    },
    /// The destination of [`unpack_layers`] already exists.
    #[error("{} already exists", .0.display())]
    DestinationExists(PathBuf),
    /// Preparing, syncing or renaming the destination failed.
    #[error("cannot create {}", .path.display())]
    Destination {
        /// The path involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What unpacking wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    /// Regular files written.
    pub files: u64,
    /// Directories created or updated.
    pub dirs: u64,
    /// Symbolic links created.
    pub symlinks: u64,
    /// Hard links created.
    pub hardlinks: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Device nodes recorded (never created on the host).
    pub devices: u64,
    /// Unknown entry types skipped.
    pub skipped: u64,
    /// Bytes of regular file data written.
    pub bytes: u64,
}

impl UnpackStats {
    fn add(&mut self, o: &UnpackStats) {
        self.files += o.files;
        self.dirs += o.dirs;
        self.symlinks += o.symlinks;
        self.hardlinks += o.hardlinks;
        self.whiteouts += o.whiteouts;
        self.devices += o.devices;
        self.skipped += o.skipped;
        self.bytes += o.bytes;
    }
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Set once `openat2` returned ENOSYS, so later lookups go straight to the fallback walk.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Unpacks `layers` (bottom first) into a new directory `dest`, with the default
/// [`LayerLimits`] (see [`stage_layers`] and [`StagedTree::publish`]).
pub fn unpack_layers(
    layers: &[(PathBuf, LayerMediaType)],
    dest: &Path,
) -> Result<UnpackStats, UnpackError> {
    stage_layers(layers, dest, &LayerLimits::default())?.publish()
}

/// Layers applied in a private directory next to their destination, not yet visible there.
/// Dropped unpublished, the directory is removed.
#[derive(Debug)]
pub struct StagedTree {
    tmp: PathBuf,
    dest: PathBuf,
    /// What the layers wrote.
    pub stats: UnpackStats,
    /// The device nodes the layers carry, by path (none was created).
    pub devices: Vec<DeviceNode>,
    published: bool,
}

/// Applies `layers` (bottom first) in a temporary directory next to `dest`, held to `limits`.
///
/// [`StagedTree::publish`] then renames it into place: a crash or an error never leaves a partial
/// `dest`. Fails with [`UnpackError::DestinationExists`] when `dest` is already there.
pub fn stage_layers(
    layers: &[(PathBuf, LayerMediaType)],
    dest: &Path,
    limits: &LayerLimits,
) -> Result<StagedTree, UnpackError> {
    let dest_err = |source| UnpackError::Destination {
        path: dest.to_path_buf(),
        source,
    };
    if dest.symlink_metadata().is_ok() {
        return Err(UnpackError::DestinationExists(dest.to_path_buf()));
    }
    let name = dest
        .file_name()
        .ok_or_else(|| dest_err(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".unpack-{}-{nanos}", std::process::id()));
    let tmp = parent_of(dest).join(tmp_name);
    std::fs::create_dir(&tmp).map_err(dest_err)?;
    let mut staged = StagedTree {
        tmp,
        dest: dest.to_path_buf(),
        stats: UnpackStats::default(),
        devices: Vec::new(),
        published: false,
    };
    let mut devices = Devices::default();
    for (path, media_type) in layers {
        let stats = apply_layer_to(&staged.tmp, path, *media_type, limits, &mut devices)?;
        staged.stats.add(&stats);
    }
    staged.devices = devices.into_nodes();
    Ok(staged)
}

impl StagedTree {
    /// Makes the tree durable and renames it to its destination. Fails with
    /// [`UnpackError::DestinationExists`] when another process got there first.
    pub fn publish(mut self) -> Result<UnpackStats, UnpackError> {
        let dest_err = |source| UnpackError::Destination {
            path: self.dest.clone(),
            source,
        };
        let root = open_root(&self.tmp).map_err(dest_err)?;
        rustix::fs::syncfs(&root).map_err(|e| dest_err(e.into()))?;
        let parent_fd = open_root(parent_of(&self.dest)).map_err(dest_err)?;
        let tmp_leaf = self.tmp.file_name().unwrap_or_default();
        let leaf = self.dest.file_name().unwrap_or_default();
        match rustix::fs::renameat_with(
            &parent_fd,
            tmp_leaf,
            &parent_fd,
            leaf,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {
                self.published = true;
                Ok(self.stats)
            }
            Err(Errno::EXIST) | Err(Errno::NOTEMPTY) => {
                Err(UnpackError::DestinationExists(self.dest.clone()))
            }
            Err(e) => Err(dest_err(e.into())),
        }
    }
}

impl Drop for StagedTree {
    fn drop(&mut self) {
        if !self.published {
            if let Err(e) = std::fs::remove_dir_all(&self.tmp) {
                log::warn!("cannot remove {}: {e}", self.tmp.display());
            }
        }
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Applies one layer to the existing directory `root`, with the default [`LayerLimits`]. Device
/// nodes are skipped (and counted).
pub fn apply_layer(
    root: &Path,
    layer: &Path,
    media_type: LayerMediaType,
) -> Result<UnpackStats, UnpackError> {
    let mut devices = Devices::default();
    apply_layer_to(
        root,
        layer,
        media_type,
        &LayerLimits::default(),
        &mut devices,
    )
}

fn apply_layer_to(
    root: &Path,
    layer: &Path,
    media_type: LayerMediaType,
    limits: &LayerLimits,
    devices: &mut Devices,
) -> Result<UnpackStats, UnpackError> {
    let (stream, budget) = open_layer(layer, media_type, limits)?;
    let root_fd = open_root(root).map_err(|source| UnpackError::OpenLayer {
        path: layer.to_path_buf(),
        source,
    })?;
    let mut applier = Applier::new(root_fd.as_fd(), true)
        .with_limits(*limits, budget.clone())
        .with_devices(std::mem::take(devices));
    let result = applier.apply(stream);
    *devices = applier.take_devices();
    result.map_err(|e| layer_error(layer, &budget, e))
}

/// The error of a failed layer: a limit when the budget ran out, whatever else went wrong with
/// the reading or writing.
fn layer_error(layer: &Path, budget: &Budget, e: ApplyError) -> UnpackError {
    let limit = |source| UnpackError::Limit {
        path: layer.to_path_buf(),
        source,
    };
    if let Some(source) = budget.tripped() {
        return limit(source);
    }
    match e {
        ApplyError::Archive(source) => UnpackError::BadArchive {
            path: layer.to_path_buf(),
            source,
        },
        ApplyError::Limit(source) => limit(source),
        ApplyError::Unpack(e) => e,
    }
}

/// The decompressed tar stream of a layer, counted against the budget its size allows.
fn open_layer(
    layer: &Path,
    media_type: LayerMediaType,
    limits: &LayerLimits,
) -> Result<(Box<dyn Read>, Budget), UnpackError> {
    let open_err = |source| UnpackError::OpenLayer {
        path: layer.to_path_buf(),
        source,
    };
    let file = File::open(layer).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    limits
        .check_compressed(size)
        .map_err(|source| UnpackError::Limit {
            path: layer.to_path_buf(),
            source,
        })?;
    let (bytes, over) = limits.budget(size);
    let budget = Budget::new(bytes, over);
    let reader = BufReader::with_capacity(256 * 1024, file);
    let stream: Box<dyn Read> = match media_type {
        LayerMediaType::Tar => Box::new(budget.reader(reader)),
        LayerMediaType::TarGzip => {
            Box::new(budget.reader(flate2::bufread::MultiGzDecoder::new(reader)))
        }
        LayerMediaType::TarZstd => Box::new(budget.reader(ZstdReader::new(reader))),
    };
    Ok((stream, budget))
}

/// What [`check_layer`] found in a layer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerCheck {
    /// Entries in the archive.
    pub entries: u64,
}

/// Reads a layer through without writing anything, holding it to `limits`: its size, what it
/// expands to and its entry count. A layer that passes unpacks within the same limits.
pub fn check_layer(
    layer: &Path,
    media_type: LayerMediaType,
    limits: &LayerLimits,
) -> Result<LayerCheck, UnpackError> {
    let (stream, budget) = open_layer(layer, media_type, limits)?;
    let mut found = LayerCheck::default();
    let result = (|| -> Result<(), ApplyError> {
        let mut archive = tar::Archive::new(stream);
        for entry in archive.entries().map_err(ApplyError::Archive)? {
            let mut entry = entry.map_err(ApplyError::Archive)?;
            found.entries += 1;
            limits
                .check_entries(found.entries)
                .map_err(ApplyError::Limit)?;
            let copied = if entry.header().entry_type().is_gnu_sparse() {
                // What the holes expand to counts as well.
                io::copy(&mut budget.reader(&mut entry), &mut io::sink())
            } else {
                io::copy(&mut entry, &mut io::sink())
            };
            copied.map_err(ApplyError::Archive)?;
        }
        Ok(())
    })();
    result.map_err(|e| layer_error(layer, &budget, e))?;
    Ok(found)
}

fn open_root(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Reads a stream of concatenated zstd frames.
pub(crate) struct ZstdReader<R: BufRead> {
    src: R,
    dec: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdReader<R> {
    pub(crate) fn new(src: R) -> Self {
        ZstdReader {
            src,
            dec: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let bad = |e: ruzstd::decoding::errors::FrameDecoderError| {
            io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"))
        };
        loop {
            if self.in_frame {
                let n = self.dec.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                if !self.dec.is_finished() {
                    let strategy = ruzstd::decoding::BlockDecodingStrategy::UptoBytes(1 << 20);
                    self.dec
                        .decode_blocks(&mut self.src, strategy)
                        .map_err(bad)?;
                    continue;
                }
                self.in_frame = false;
            }
            if self.src.fill_buf()?.is_empty() {
                return Ok(0);
            }
            self.dec.reset(&mut self.src).map_err(bad)?;
            self.in_frame = true;
        }
    }
}

#[cfg(test)]
mod tests;
