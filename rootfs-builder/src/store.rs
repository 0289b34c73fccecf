//! The content-addressed image store under `<root>/images/`:
//!
//! ```text
//! images/blobs/sha256/<hex>   every manifest, config and layer, named by its digest
//! images/index.json           canonical reference -> manifest digest
//! images/tmp/<pid>.<n>        downloads in progress
//! images/index.lock, gc.lock  flock(2) locks
//! ```
//!
//! Crash safety: content is written to `tmp/`, checked against its digest, fsynced and only
//! then renamed into `blobs/`; a reference is added to `index.json` (write-temp + fsync + rename)
//! only after all its blobs are in place. So a process killed at any point leaves either the old
//! state or the new one visible, plus perhaps a file in `tmp/`, which [`Store::open`] removes
//! once the process that wrote it is gone. Writers (pull, load) hold `gc.lock` shared; `remove`
//! holds it exclusively while it deletes unreferenced blobs, so it never deletes the blobs of a
//! pull in progress.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestError, DigestWriter};
use crate::limits::{LayerLimits, LimitError};
pub use crate::manifest::ImageConfig;
use crate::manifest::{self, ImageConfigFile, Manifest, ManifestError};
use crate::reference::{Reference, ReferenceError};
use crate::rootdir::{self, RootDirError};
use crate::unpack::{self, LayerMediaType, UnpackError};

/// Errors from the image store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The reference does not parse.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// No image by that name is stored.
    #[error("image {0} is not in the local store (pull it first: mvm pull {0})")]
    NotFound(String),
    /// A stored blob is missing.
    #[error("blob {0} is missing from the store (remove the image and pull it again)")]
    MissingBlob(Digest),
    /// A stored manifest is not an image manifest.
    #[error("stored manifest {digest} is unusable")]
    BadManifest {
        /// The manifest's digest.
        digest: Digest,
        /// Why.
        #[source]
        source: ManifestError,
    },
    /// A stored config does not parse.
    #[error("stored image config {digest} is malformed")]
    BadConfig {
        /// The config's digest.
        digest: Digest,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The index file is corrupt.
    #[error("image index {0} is corrupt")]
    BadIndex(PathBuf, #[source] serde_json::Error),
    /// Content did not match its digest.
    #[error("content check failed")]
    Digest(#[from] DigestError),
    /// The root directory is not safe to use.
    #[error(transparent)]
    Root(#[from] RootDirError),
    /// A layer is over one of the limits every layer is held to.
    #[error("layer {digest} refused")]
    LayerLimit {
        /// The layer's digest.
        digest: Digest,
        /// The limit.
        #[source]
        source: LimitError,
    },
    /// A layer cannot be read as a layer.
    #[error("layer {digest} is unusable")]
    Layer {
        /// The layer's digest.
        digest: Digest,
        /// Why.
        #[source]
        source: UnpackError,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A layer of a stored image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Digest of the (possibly compressed) layer blob; its file is [`Store::blob_path`].
    pub digest: Digest,
    /// Media type, e.g. `application/vnd.oci.image.layer.v1.tar+gzip`.
    pub media_type: String,
    /// Blob size in bytes.
    pub size: u64,
}

/// A stored image, resolved from a reference.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Image {
    /// The canonical reference it was found under (`docker.io/library/nginx:latest`).
    pub reference: String,
    /// Digest of its (single-platform) manifest, `sha256:<hex>`.
    pub manifest_digest: String,
    /// Digest of its config blob.
    pub config_digest: Digest,
    /// Runtime defaults: entrypoint, cmd, env, working dir, user, exposed ports.
    pub config: ImageConfig,
    /// Layers, base first.
    pub layers: Vec<Layer>,
    /// Creation time from the config (RFC 3339), if recorded.
    pub created: Option<String>,
    /// Sum of the layer blob sizes, in bytes.
    pub size: u64,
}

/// One line of `mvm images`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// Canonical reference.
    pub reference: String,
    /// Repository as Docker shows it (`nginx`, `localhost:5000/app`).
    pub repository: String,
    /// Tag, if the reference has one.
    pub tag: Option<String>,
    /// Manifest digest.
    pub manifest_digest: String,
    /// Sum of layer sizes.
    pub size: u64,
    /// Creation time from the config.
    pub created: Option<String>,
}

/// What [`Store::remove`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// References removed from the index.
    pub references: Vec<String>,
    /// Blobs deleted because nothing referenced them any more.
    pub blobs: Vec<Digest>,
}

/// Anything [`Store::resolve`] accepts: a [`Reference`] or reference text.
pub trait AsReference {
    /// Parses (or clones) into a reference.
    fn to_reference(&self) -> std::result::Result<Reference, ReferenceError>;
}

impl AsReference for Reference {
    fn to_reference(&self) -> std::result::Result<Reference, ReferenceError> {
        Ok(self.clone())
    }
}

impl AsReference for str {
    fn to_reference(&self) -> std::result::Result<Reference, ReferenceError> {
        Reference::parse(self)
    }
}

impl AsReference for String {
    fn to_reference(&self) -> std::result::Result<Reference, ReferenceError> {
        Reference::parse(self)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    images: BTreeMap<String, IndexEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IndexEntry {
    manifest: Digest,
}

/// The image store. Cheap to open; safe to use from several processes at once.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// A held `flock`; released on drop (and by the kernel if the process dies).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// A file being written in `tmp/`; deleted on drop unless committed.
#[derive(Debug)]
pub struct TempBlob {
    path: PathBuf,
    file: File,
    committed: bool,
}

impl TempBlob {
    /// The file to write to.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) the store under `<root>/images` and removes temp files left
    /// by processes that no longer run. The root and its directories are created root-only, and
    /// checked (see [`rootdir::prepare_root`]).
    pub fn open(root: &Path) -> Result<Store> {
        rootdir::prepare_root(root)?;
        let dir = root.join("images");
        let store = Store { dir };
        store.clean_stale_temp();
        Ok(store)
    }

    /// The `images/` directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob with `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    /// True if the blob is stored. Blobs only enter the store after their digest was checked.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Reads a whole blob (manifests and configs; at most `limit` bytes).
    pub fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob(digest.clone()))
            }
            Err(e) => return Err(io_err("cannot open", &path)(e)),
        };
        let mut data = Vec::new();
        file.take(limit)
            .read_to_end(&mut data)
            .map_err(io_err("cannot read", &path))?;
        Ok(data)
    }

    /// A new temp file in `tmp/`, named after this process so a later `open` can tell if it is
    /// stale.
    pub fn temp_blob(&self) -> Result<TempBlob> {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join("tmp")
            .join(format!("{}.{n}", std::process::id()));
        let file = rootdir::private_file()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("cannot create", &path))?;
        Ok(TempBlob {
            path,
            file,
            committed: false,
        })
    }

    /// Moves a temp file whose content was checked against `digest` into `blobs/`, durably.
    pub fn commit_blob(&self, mut temp: TempBlob, digest: &Digest) -> Result<PathBuf> {
        let dest = self.blob_path(digest);
        temp.file
            .sync_all()
            .map_err(io_err("cannot sync", &temp.path))?;
        if dest.exists() {
            return Ok(dest); // temp removed on drop
        }
        fs::rename(&temp.path, &dest).map_err(io_err("cannot rename into", &dest))?;
        temp.committed = true;
        sync_dir(dest.parent().unwrap_or(&self.dir));
        Ok(dest)
    }

    /// Stores `data` as a blob and returns its digest.
    pub fn write_blob(&self, data: &[u8]) -> Result<Digest> {
        let digest = Digest::of_bytes(data);
        if self.has_blob(&digest) {
            return Ok(digest);
        }
        let mut temp = self.temp_blob()?;
        let path = temp.path.clone();
        temp.file()
            .write_all(data)
            .map_err(io_err("cannot write", &path))?;
        self.commit_blob(temp, &digest)?;
        Ok(digest)
    }

    /// Copies `reader` into the store, checking it against `digest` (and `size` when known).
    pub fn import(
        &self,
        reader: &mut dyn Read,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<PathBuf> {
        self.import_checked(reader, digest, size, |_| Ok(()))
    }

    /// Like [`Store::import`], and `check` reads the complete, digest-checked file before it
    /// enters the store: what `check` refuses is never stored.
    pub fn import_checked(
        &self,
        reader: &mut dyn Read,
        digest: &Digest,
        size: Option<u64>,
        check: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        if self.has_blob(digest) {
            return Ok(self.blob_path(digest));
        }
        let mut temp = self.temp_blob()?;
        let path = temp.path.clone();
        let limit = size.unwrap_or(u64::MAX);
        let mut writer = DigestWriter::with_limit(temp.file(), limit);
        match io::copy(reader, &mut writer) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(DigestError::SizeMismatch {
                    digest: digest.clone(),
                    expected: limit,
                    actual: limit.saturating_add(1),
                }
                .into())
            }
            Err(e) => return Err(io_err("cannot copy into", &path)(e)),
        }
        writer.finish(digest, size)?;
        check(&path)?;
        self.commit_blob(temp, digest)
    }

    /// Takes the lock that keeps garbage collection away: hold it while adding content.
    pub fn lock_shared(&self) -> Result<StoreLock> {
        self.lock("gc.lock", libc::LOCK_SH)
    }

    fn lock(&self, name: &str, op: libc::c_int) -> Result<StoreLock> {
        let path = self.dir.join(name);
        let file = rootdir::private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("cannot open", &path))?;
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(StoreLock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("cannot lock", &path)(err));
            }
        }
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    fn read_index(&self) -> Result<IndexFile> {
        let path = self.index_path();
        match fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data).map_err(|e| StoreError::BadIndex(path, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(IndexFile {
                version: 1,
                ..Default::default()
            }),
            Err(e) => Err(io_err("cannot read", &path)(e)),
        }
    }

    fn write_index(&self, index: &IndexFile) -> Result<()> {
        let path = self.index_path();
        let tmp = self
            .dir
            .join(format!("index.json.tmp-{}", std::process::id()));
        let data =
            serde_json::to_vec_pretty(index).map_err(|e| StoreError::BadIndex(path.clone(), e))?;
        let write = || -> io::Result<()> {
            let mut f = rootdir::create_private_file(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("cannot write", &path)(e));
        }
        sync_dir(&self.dir);
        Ok(())
    }

    /// Points `reference` at the stored manifest `manifest` (whose blobs must all be stored).
    pub fn tag(&self, reference: &Reference, manifest: &Digest) -> Result<()> {
        let _lock = self.lock("index.lock", libc::LOCK_EX)?;
        let mut index = self.read_index()?;
        index.version = 1;
        index.images.insert(
            reference.to_string(),
            IndexEntry {
                manifest: manifest.clone(),
            },
        );
        self.write_index(&index)
    }

    /// Finds a stored image by reference (`nginx`, `localhost:5000/app:v1`, `app@sha256:...`).
    pub fn resolve<R: AsReference + ?Sized>(&self, reference: &R) -> Result<Image> {
        let reference = reference.to_reference()?;
        let index = self.read_index()?;
        let key = reference.to_string();
        if let Some(entry) = index.images.get(&key) {
            return self.image(key, &entry.manifest);
        }
        if let Some(digest) = reference.digest() {
            let name = reference.name();
            let found = index.images.iter().find(|(k, e)| {
                &e.manifest == digest && Reference::parse(k).is_ok_and(|r| r.name() == name)
            });
            if found.is_some() {
                return self.image(key, digest);
            }
        }
        Err(StoreError::NotFound(reference.familiar()))
    }

    /// Builds the [`Image`] for a stored manifest.
    pub fn image(&self, reference: String, manifest_digest: &Digest) -> Result<Image> {
        let body = self.read_blob(manifest_digest, manifest::MAX_MANIFEST_BYTES)?;
        let bad = |source| StoreError::BadManifest {
            digest: manifest_digest.clone(),
            source,
        };
        let manifest = match manifest::parse_manifest(None, &body).map_err(bad)? {
            Manifest::Image(m) => m,
            Manifest::Index(_) => {
                return Err(bad(ManifestError::UnsupportedMediaType(
                    manifest::OCI_INDEX.to_string(),
                )))
            }
        };
        let config_digest = manifest.config.digest.clone();
        let config_body = self.read_blob(&config_digest, manifest::MAX_CONFIG_BYTES)?;
        let config_file: ImageConfigFile =
            serde_json::from_slice(&config_body).map_err(|source| StoreError::BadConfig {
                digest: config_digest.clone(),
                source,
            })?;
        let layers: Vec<Layer> = manifest
            .layers
            .iter()
            .map(|l| Layer {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size,
            })
            .collect();
        for layer in &layers {
            if !self.has_blob(&layer.digest) {
                return Err(StoreError::MissingBlob(layer.digest.clone()));
            }
        }
        Ok(Image {
            reference,
            manifest_digest: manifest_digest.to_string(),
            config_digest,
            config: config_file.config.unwrap_or_default(),
            size: layers.iter().map(|l| l.size).sum(),
            layers,
            created: config_file.created,
        })
    }

    /// All stored images, sorted by reference. Entries whose blobs are unreadable are skipped
    /// with a warning.
    pub fn list(&self) -> Result<Vec<ImageSummary>> {
        let index = self.read_index()?;
        let mut out = Vec::new();
        for (key, entry) in &index.images {
            let image = match self.image(key.clone(), &entry.manifest) {
                Ok(i) => i,
                Err(e) => {
                    log::warn!("skipping {key}: {e}");
                    continue;
                }
            };
            let parsed = Reference::parse(key).ok();
            out.push(ImageSummary {
                reference: key.clone(),
                repository: parsed
                    .as_ref()
                    .map_or_else(|| key.clone(), Reference::familiar_name),
                tag: parsed.as_ref().and_then(|r| r.tag().map(str::to_string)),
                manifest_digest: image.manifest_digest,
                size: image.size,
                created: image.created,
            });
        }
        Ok(out)
    }

    /// Removes `reference` from the index, then deletes every blob no remaining image uses.
    /// A digest reference (`app@sha256:...`) removes every tag of that repository pointing at it.
    pub fn remove<R: AsReference + ?Sized>(&self, reference: &R) -> Result<Removed> {
        let reference = reference.to_reference()?;
        let _gc = self.lock("gc.lock", libc::LOCK_EX)?;
        let _lock = self.lock("index.lock", libc::LOCK_EX)?;
        let mut index = self.read_index()?;
        let key = reference.to_string();
        let mut removed = Removed::default();
        if index.images.remove(&key).is_some() {
            removed.references.push(key);
        }
        if let Some(digest) = reference.digest() {
            let name = reference.name();
            let matching: Vec<String> = index
                .images
                .iter()
                .filter(|(k, e)| {
                    &e.manifest == digest && Reference::parse(k).is_ok_and(|r| r.name() == name)
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in matching {
                index.images.remove(&k);
                removed.references.push(k);
            }
        }
        if removed.references.is_empty() {
            return Err(StoreError::NotFound(reference.familiar()));
        }
        self.write_index(&index)?;
        removed.blobs = self.collect_garbage(&index)?;
        Ok(removed)
    }

    /// Deletes blobs that no indexed image references. Caller holds both locks.
    fn collect_garbage(&self, index: &IndexFile) -> Result<Vec<Digest>> {
        let mut keep = BTreeSet::new();
        for entry in index.images.values() {
            keep.insert(entry.manifest.clone());
            let Ok(body) = self.read_blob(&entry.manifest, manifest::MAX_MANIFEST_BYTES) else {
                continue;
            };
            if let Ok(Manifest::Image(m)) = manifest::parse_manifest(None, &body) {
                keep.insert(m.config.digest);
                keep.extend(m.layers.into_iter().map(|l| l.digest));
            }
        }
        let dir = self.dir.join("blobs/sha256");
        let mut deleted = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("cannot list", &dir))? {
            let entry = entry.map_err(io_err("cannot list", &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
                continue;
            };
            if !keep.contains(&digest) {
                fs::remove_file(entry.path()).map_err(io_err("cannot remove", &entry.path()))?;
                deleted.push(digest);
            }
        }
        sync_dir(&dir);
        Ok(deleted)
    }

    /// Removes `tmp/` entries whose writer process is gone.
    fn clean_stale_temp(&self) {
        let dir = self.dir.join("tmp");
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.split('.').next())
                .and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if alive {
                continue;
            }
            let path = entry.path();
            log::debug!("removing stale temp file {}", path.display());
            let _ = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
    }
}

/// Holds the layer blob at `path` (not yet in the store) to the [`LayerLimits`] every layer
/// must keep: its size, what it expands to and its entry count.
pub fn check_layer_file(path: &Path, digest: &Digest, media_type: &str) -> Result<()> {
    let refused = |e| match e {
        UnpackError::Limit { source, .. } => StoreError::LayerLimit {
            digest: digest.clone(),
            source,
        },
        source => StoreError::Layer {
            digest: digest.clone(),
            source,
        },
    };
    let media_type = LayerMediaType::parse(media_type).map_err(refused)?;
    unpack::check_layer(path, media_type, &LayerLimits::default()).map_err(refused)?;
    Ok(())
}

/// fsync a directory so a rename in it is durable; failures only weaken durability.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Descriptor, ImageManifest, OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST};

    fn put_image(store: &Store, reference: &str, layers: &[&[u8]]) -> Digest {
        let config = serde_json::json!({"architecture":"amd64","os":"linux",
            "config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":[]}});
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = store.write_blob(&config).unwrap();
        let layers = layers
            .iter()
            .map(|l| Descriptor::new(OCI_LAYER_TAR, store.write_blob(l).unwrap(), l.len() as u64))
            .collect();
        let m = ImageManifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.to_string()),
            config: Descriptor::new(OCI_CONFIG, config_digest, config.len() as u64),
            layers,
            annotations: None,
        };
        let digest = store.write_blob(&serde_json::to_vec(&m).unwrap()).unwrap();
        store
            .tag(&Reference::parse(reference).unwrap(), &digest)
            .unwrap();
        digest
    }

    #[test]
    fn resolve_finds_tagged_image() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = put_image(&store, "localhost:5000/app:v1", &[b"layer-one"]);
        let image = store.resolve("localhost:5000/app:v1").unwrap();
        assert_eq!(image.manifest_digest, digest.to_string());
        assert_eq!(image.reference, "localhost:5000/app:v1");
        assert_eq!(image.config.cmd, Some(vec!["/bin/sh".to_string()]));
        assert_eq!(image.size, 9);
        assert_eq!(
            std::fs::read(store.blob_path(&image.layers[0].digest)).unwrap(),
            b"layer-one"
        );
        let by_digest = store
            .resolve(&format!("localhost:5000/app@{digest}"))
            .unwrap();
        assert_eq!(by_digest.manifest_digest, image.manifest_digest);
        let err = store
            .resolve("localhost:5000/app:v2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not in the local store"), "{err}");
    }

    #[test]
    fn remove_collects_only_unshared_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        put_image(&store, "a:1", &[b"shared", b"only-a"]);
        put_image(&store, "b:1", &[b"shared", b"only-b"]);
        assert_eq!(store.list().unwrap().len(), 2);
        let removed = store.remove("a:1").unwrap();
        assert_eq!(
            removed.references,
            vec!["docker.io/library/a:1".to_string()]
        );
        // a's manifest and its own layer; the config is shared (same bytes).
        assert_eq!(removed.blobs.len(), 2);
        assert!(!store.has_blob(&Digest::of_bytes(b"only-a")));
        assert!(store.has_blob(&Digest::of_bytes(b"shared")));
        assert!(store.resolve("b:1").is_ok());
        store.remove("b:1").unwrap();
        assert_eq!(
            std::fs::read_dir(store.dir().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
        assert!(matches!(store.remove("b:1"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn remove_by_digest_removes_every_name_of_that_repository() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = put_image(&store, "reg:5000/app:v1", &[b"layer"]);
        put_image(&store, "reg:5000/app:v2", &[b"layer"]);
        put_image(&store, "reg:5000/other:v1", &[b"layer"]);
        let by_digest = Reference::parse(&format!("reg:5000/app@{digest}")).unwrap();
        store.tag(&by_digest, &digest).unwrap();
        let removed = store.remove(&by_digest).unwrap();
        assert_eq!(removed.references.len(), 3, "{:?}", removed.references);
        assert!(removed.blobs.is_empty(), "other still uses them");
        let left: Vec<String> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|i| i.reference)
            .collect();
        assert_eq!(left, vec!["reg:5000/other:v1".to_string()]);
    }

    #[test]
    fn import_checks_digest_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = Digest::of_bytes(b"content");
        assert!(store.import(&mut &b"c0ntent"[..], &good, Some(7)).is_err());
        assert!(store
            .import(&mut &b"content-and-more"[..], &good, Some(7))
            .is_err());
        assert!(!store.has_blob(&good));
        assert_eq!(
            std::fs::read_dir(store.dir().join("tmp")).unwrap().count(),
            0
        );
        store.import(&mut &b"content"[..], &good, Some(7)).unwrap();
        assert!(store.has_blob(&good));
    }

    #[test]
    fn the_store_is_private_and_a_refused_layer_never_enters_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let store = Store::open(&root).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&root), 0o710);
        assert_eq!(mode(&store.dir().join("blobs/sha256")), 0o700);
        put_image(&store, "a:1", &[b"layer"]);
        assert_eq!(mode(&store.blob_path(&Digest::of_bytes(b"layer"))), 0o600);
        assert_eq!(mode(&store.dir().join("index.json")), 0o600);

        // Not a tar archive: refused before it is stored.
        let data = b"not a layer at all";
        let digest = Digest::of_bytes(data);
        let err = store
            .import_checked(&mut &data[..], &digest, None, |p| {
                check_layer_file(p, &digest, crate::manifest::OCI_LAYER_TAR_GZIP)
            })
            .unwrap_err();
        assert!(err.to_string().starts_with("layer sha256:"), "{err}");
        assert!(!store.has_blob(&digest));
        assert_eq!(fs::read_dir(store.dir().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn open_removes_stale_temp_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tmp = store.dir().join("tmp");
        // pid 0 never names a live writer; our own pid does.
        std::fs::write(tmp.join("0.1"), b"half").unwrap();
        std::fs::write(tmp.join("garbage"), b"x").unwrap();
        let live = store.temp_blob().unwrap();
        Store::open(dir.path()).unwrap();
        let left: Vec<_> = std::fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(left, vec![live.path().to_path_buf()]);
        drop(live);
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    }
}
