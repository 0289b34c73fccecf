//! `mvm load`: images from an OCI image layout (a directory, or a tar of one) or from a
//! docker-archive tar as `docker save` writes it (`manifest.json`, a config and layer tars).
//!
//! Every blob is checked before it enters the store: OCI blobs against the digest and size their
//! descriptor names; docker-archive configs and layers against the file names that carry digests
//! and each layer's uncompressed content against the config's `diff_ids`. Paths named inside the
//! input must stay inside it. References are added to the store's index only after every image in
//! the input was checked and stored, so bad input leaves the index as it was (blobs that passed
//! their checks may stay until the next garbage collection).
//!
//! A tar input is first unpacked into the store's `tmp/` (regular files and directories only;
//! links are resolved inside the archive and become copies of their targets).

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::digest::{Digest, DigestError, DigestWriter};
use crate::manifest::{
    self, Descriptor, ImageConfigFile, ImageIndex, ImageManifest, Manifest, ManifestError,
};
use crate::reference::{Reference, ReferenceError};
use crate::store::{self, Store, StoreError};

mod extract;

/// Annotation containerd and Docker put on a layout's index entries: the full image name.
pub const IMAGE_NAME_ANNOTATION: &str = "io.containerd.image.name";
/// The OCI annotation naming an index entry (usually just a tag).
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Errors from loading an image archive.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read or written.
    #[error("cannot {what} {}", .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The input is a file but not a tar archive.
    #[error("{} is not a tar archive or an image directory", .0.display())]
    NotArchive(PathBuf, #[source] io::Error),
    /// Neither `index.json` + `oci-layout` nor `manifest.json` is there.
    #[error(
        "{} is neither an OCI image layout nor a docker-archive (no index.json or manifest.json)",
        .0.display()
    )]
    UnknownFormat(PathBuf),
    /// A path inside the input points outside it.
    #[error("path {0:?} in the archive escapes it")]
    Escape(String),
    /// A file the input's metadata names is not there.
    #[error("{0} is missing from the archive")]
    Missing(String),
    /// A metadata file does not parse.
    #[error("malformed {what}")]
    BadJson {
        /// Which file.
        what: String,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A manifest that cannot be used.
    #[error("{what} is unusable")]
    Manifest {
        /// Which manifest.
        what: String,
        /// Why.
        #[source]
        source: ManifestError,
    },
    /// Content does not match its digest or size.
    #[error("{what} failed verification")]
    Verify {
        /// Which blob.
        what: String,
        /// The mismatch.
        #[source]
        source: DigestError,
    },
    /// The config's `diff_ids` do not match the layer list.
    #[error("the image config lists {diff_ids} layers but the manifest has {layers}")]
    LayerCount {
        /// Entries in `rootfs.diff_ids`.
        diff_ids: usize,
        /// Layers in the manifest.
        layers: usize,
    },
    /// The input does not name its image and no name was given.
    #[error("the archive does not name its image: give a name with --tag NAME")]
    NoName,
    /// A name given to several images.
    #[error("the archive holds {0} images: --tag names exactly one")]
    TagAmbiguous(usize),
    /// The input holds no image.
    #[error("the archive holds no images")]
    Empty,
    /// A name in the input (or the one given) does not parse.
    #[error("image name {name:?} is invalid")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: ReferenceError,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T> = std::result::Result<T, LoadError>;

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LoadError + 'a {
    move |source| LoadError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// An image `load` stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The name it was tagged with.
    pub reference: Reference,
    /// Its manifest's digest.
    pub manifest_digest: Digest,
}

/// An image checked and stored, not yet tagged.
struct Staged {
    names: Vec<String>,
    manifest_digest: Digest,
}

/// Loads every image in `input` (a directory or a tar file) into `store`. `tag` names the image
/// when the input holds exactly one; otherwise the names inside the input are used.
pub fn load(store: &Store, input: &Path, tag: Option<&str>) -> Result<Vec<Loaded>> {
    let tag = tag
        .map(|t| {
            Reference::parse(t).map_err(|source| LoadError::BadName {
                name: t.to_string(),
                source,
            })
        })
        .transpose()?;
    let meta = std::fs::metadata(input).map_err(io_err("read", input))?;
    let _gc = store.lock_shared()?;
    let extracted;
    let root = if meta.is_dir() {
        input.to_path_buf()
    } else {
        extracted = extract::extract_tar(input, store)?;
        extracted.path().to_path_buf()
    };
    let staged = if root.join("index.json").is_file() && root.join("oci-layout").is_file() {
        load_oci_layout(store, &root)?
    } else if root.join("manifest.json").is_file() {
        load_docker_archive(store, &root)?
    } else {
        return Err(LoadError::UnknownFormat(input.to_path_buf()));
    };
    if staged.is_empty() {
        return Err(LoadError::Empty);
    }
    let mut plan = Vec::new();
    match &tag {
        Some(_) if staged.len() > 1 => return Err(LoadError::TagAmbiguous(staged.len())),
        Some(t) => plan.push((t.clone(), staged[0].manifest_digest.clone())),
        None => {
            for image in &staged {
                if image.names.is_empty() {
                    return Err(LoadError::NoName);
                }
                for name in &image.names {
                    let reference =
                        Reference::parse(name).map_err(|source| LoadError::BadName {
                            name: name.clone(),
                            source,
                        })?;
                    plan.push((reference, image.manifest_digest.clone()));
                }
            }
        }
    }
    let mut loaded = Vec::new();
    for (reference, digest) in plan {
        store.tag(&reference, &digest)?;
        loaded.push(Loaded {
            reference,
            manifest_digest: digest,
        });
    }
    Ok(loaded)
}

/// `rel` (a path named inside the input) as a path under `root`, refusing anything that could
/// leave it: absolute paths and `..`.
pub(crate) fn inside(root: &Path, rel: &str) -> Result<PathBuf> {
    let mut out = root.to_path_buf();
    let mut depth = 0;
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(p) => {
                out.push(p);
                depth += 1;
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(LoadError::Escape(rel.to_string()))
            }
        }
    }
    if depth == 0 {
        return Err(LoadError::Escape(rel.to_string()));
    }
    Ok(out)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path, what: &str, limit: u64) -> Result<T> {
    let data = read_limited(path, what, limit)?;
    serde_json::from_slice(&data).map_err(|source| LoadError::BadJson {
        what: what.to_string(),
        source,
    })
}

fn read_limited(path: &Path, what: &str, limit: u64) -> Result<Vec<u8>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(LoadError::Missing(what.to_string()))
        }
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let mut data = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(io_err("read", path))?;
    if data.len() as u64 > limit {
        return Err(LoadError::Io {
            what: "read (too large)",
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, "file too large"),
        });
    }
    Ok(data)
}

fn layout_blob(root: &Path, digest: &Digest) -> PathBuf {
    root.join("blobs")
        .join(digest.algorithm())
        .join(digest.hex())
}

/// Reads a small blob of a layout, checked against its descriptor.
fn read_layout_blob(root: &Path, desc: &Descriptor, what: &str, limit: u64) -> Result<Vec<u8>> {
    let data = read_limited(
        &layout_blob(root, &desc.digest),
        &format!("{what} {}", desc.digest),
        limit,
    )?;
    let verify = |source| LoadError::Verify {
        what: format!("{what} {}", desc.digest),
        source,
    };
    if data.len() as u64 != desc.size {
        return Err(verify(DigestError::SizeMismatch {
            digest: desc.digest.clone(),
            expected: desc.size,
            actual: data.len() as u64,
        }));
    }
    let actual = Digest::of_bytes(&data);
    if actual != desc.digest {
        return Err(verify(DigestError::Mismatch {
            expected: desc.digest.clone(),
            actual,
        }));
    }
    Ok(data)
}

/// Copies a layout layer into the store, checking digest and size on the way and the layer
/// limits before it is stored.
fn import_layout_blob(store: &Store, root: &Path, desc: &Descriptor, what: &str) -> Result<()> {
    if store.has_blob(&desc.digest) {
        return Ok(());
    }
    let path = layout_blob(root, &desc.digest);
    let mut file = match File::open(&path) {
        Ok(f) => BufReader::new(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(LoadError::Missing(format!("{what} {}", desc.digest)))
        }
        Err(e) => return Err(io_err("open", &path)(e)),
    };
    let check = |path: &Path| store::check_layer_file(path, &desc.digest, &desc.media_type);
    match store.import_checked(&mut file, &desc.digest, Some(desc.size), check) {
        Ok(_) => Ok(()),
        Err(StoreError::Digest(source)) => Err(LoadError::Verify {
            what: format!("{what} {}", desc.digest),
            source,
        }),
        Err(e) => Err(e.into()),
    }
}

fn load_oci_layout(store: &Store, root: &Path) -> Result<Vec<Staged>> {
    let index: ImageIndex = read_json(
        &root.join("index.json"),
        "index.json",
        manifest::MAX_MANIFEST_BYTES,
    )?;
    let mut staged = Vec::new();
    for entry in &index.manifests {
        let annotation = |key: &str| entry.annotations.as_ref().and_then(|a| a.get(key)).cloned();
        // A ref.name that is only a tag (`latest`) does not name an image.
        let names: Vec<String> = annotation(IMAGE_NAME_ANNOTATION)
            .or_else(|| annotation(REF_NAME_ANNOTATION).filter(|n| n.contains(['/', ':'])))
            .into_iter()
            .collect();
        let what = format!("manifest {}", entry.digest);
        let body = read_layout_blob(root, entry, "manifest", manifest::MAX_MANIFEST_BYTES)?;
        let unusable = |what: &str, source| LoadError::Manifest {
            what: what.to_string(),
            source,
        };
        let (body, digest, image) = match manifest::parse_manifest(Some(&entry.media_type), &body)
            .map_err(|e| unusable(&what, e))?
        {
            Manifest::Image(m) => (body, entry.digest.clone(), m),
            Manifest::Index(inner) => {
                let pick = manifest::select_platform(&inner, "linux", "amd64")
                    .map_err(|e| unusable(&what, e))?;
                let what = format!("manifest {}", pick.digest);
                let body = read_layout_blob(root, pick, "manifest", manifest::MAX_MANIFEST_BYTES)?;
                match manifest::parse_manifest(Some(&pick.media_type), &body)
                    .map_err(|e| unusable(&what, e))?
                {
                    Manifest::Image(m) => (body, pick.digest.clone(), m),
                    Manifest::Index(_) => {
                        return Err(unusable(
                            &what,
                            ManifestError::UnsupportedMediaType(manifest::OCI_INDEX.into()),
                        ))
                    }
                }
            }
        };
        let config = read_layout_blob(root, &image.config, "config", manifest::MAX_CONFIG_BYTES)?;
        serde_json::from_slice::<ImageConfigFile>(&config).map_err(|source| {
            LoadError::BadJson {
                what: format!("image config {}", image.config.digest),
                source,
            }
        })?;
        // Layers first: one refused (a bomb, say) leaves no config behind either.
        for layer in &image.layers {
            import_layout_blob(store, root, layer, "layer")?;
        }
        store.write_blob(&config)?;
        store.write_blob(&body)?;
        staged.push(Staged {
            names,
            manifest_digest: digest,
        });
    }
    Ok(staged)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The digest a docker-archive path carries in its name, if any: `blobs/sha256/<hex>` or
/// `<hex>.json`.
fn digest_in_name(path: &str) -> Option<Digest> {
    let name = Path::new(path).file_name()?.to_str()?;
    let hex = name.strip_suffix(".json").unwrap_or(name);
    let parent = Path::new(path)
        .parent()
        .and_then(Path::to_str)
        .unwrap_or("");
    if hex.len() == 64 && (name.ends_with(".json") || parent.ends_with("sha256")) {
        Digest::parse(&format!("sha256:{hex}")).ok()
    } else {
        None
    }
}

fn load_docker_archive(store: &Store, root: &Path) -> Result<Vec<Staged>> {
    let entries: Vec<ArchiveEntry> = read_json(
        &root.join("manifest.json"),
        "manifest.json",
        manifest::MAX_MANIFEST_BYTES,
    )?;
    let mut staged = Vec::new();
    for entry in entries {
        let config_path = inside(root, &entry.config)?;
        let config = read_limited(&config_path, &entry.config, manifest::MAX_CONFIG_BYTES)?;
        let config_digest = Digest::of_bytes(&config);
        if let Some(named) = digest_in_name(&entry.config) {
            if named != config_digest {
                return Err(LoadError::Verify {
                    what: format!("config {}", entry.config),
                    source: DigestError::Mismatch {
                        expected: named,
                        actual: config_digest,
                    },
                });
            }
        }
        let config_file: ImageConfigFile =
            serde_json::from_slice(&config).map_err(|source| LoadError::BadJson {
                what: format!("image config {}", entry.config),
                source,
            })?;
        let diff_ids = config_file.rootfs.map(|r| r.diff_ids).unwrap_or_default();
        if diff_ids.len() != entry.layers.len() {
            return Err(LoadError::LayerCount {
                diff_ids: diff_ids.len(),
                layers: entry.layers.len(),
            });
        }
        let mut layers = Vec::new();
        for (name, diff_id) in entry.layers.iter().zip(&diff_ids) {
            layers.push(import_archive_layer(store, root, name, diff_id)?);
        }
        let config_digest = store.write_blob(&config)?;
        let image = ImageManifest {
            schema_version: 2,
            media_type: Some(manifest::OCI_MANIFEST.to_string()),
            config: Descriptor::new(manifest::OCI_CONFIG, config_digest, config.len() as u64),
            layers,
            annotations: None,
        };
        manifest::validate_image_manifest(&image).map_err(|source| LoadError::Manifest {
            what: "manifest.json".to_string(),
            source,
        })?;
        let body = serde_json::to_vec(&image).map_err(|source| LoadError::BadJson {
            what: "generated manifest".to_string(),
            source,
        })?;
        let manifest_digest = store.write_blob(&body)?;
        staged.push(Staged {
            names: entry.repo_tags.unwrap_or_default(),
            manifest_digest,
        });
    }
    Ok(staged)
}

/// Checks one docker-archive layer (its uncompressed content against `diff_id`, and its name
/// when that is a digest) and stores it. Returns its descriptor.
fn import_archive_layer(
    store: &Store,
    root: &Path,
    name: &str,
    diff_id: &Digest,
) -> Result<Descriptor> {
    let path = inside(root, name)?;
    let open = || match File::open(&path) {
        Ok(f) => Ok(BufReader::with_capacity(256 << 10, f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(LoadError::Missing(format!("layer {name}")))
        }
        Err(e) => Err(io_err("open", &path)(e)),
    };
    let mut magic = [0u8; 4];
    let got = open()?.read(&mut magic).map_err(io_err("read", &path))?;
    let media_type = match &magic[..got] {
        [0x1f, 0x8b, ..] => manifest::OCI_LAYER_TAR_GZIP,
        [0x28, 0xb5, 0x2f, 0xfd] => manifest::OCI_LAYER_TAR_ZSTD,
        _ => manifest::OCI_LAYER_TAR,
    };
    // First pass: the blob's own digest, and the uncompressed digest checked against diff_id.
    let mut blob = DigestWriter::new(io::sink());
    let mut tee = TeeReader {
        inner: open()?,
        copy: &mut blob,
    };
    let uncompressed = {
        let mut out = DigestWriter::new(io::sink());
        let bad = |source| LoadError::Verify {
            what: format!("layer {name}"),
            source: DigestError::Io(source),
        };
        match media_type {
            manifest::OCI_LAYER_TAR_GZIP => {
                let mut dec = flate2::read::MultiGzDecoder::new(&mut tee);
                io::copy(&mut dec, &mut out).map_err(bad)?;
            }
            manifest::OCI_LAYER_TAR_ZSTD => {
                let mut dec = crate::unpack::ZstdReader::new(BufReader::new(&mut tee));
                io::copy(&mut dec, &mut out).map_err(bad)?;
            }
            _ => {
                io::copy(&mut tee, &mut out).map_err(bad)?;
            }
        }
        // Count whatever follows the compressed stream, too.
        io::copy(&mut tee, &mut io::sink()).map_err(io_err("read", &path))?;
        out.into_digest().map_err(|source| LoadError::Verify {
            what: format!("layer {name}"),
            source,
        })?
    };
    let verify = |source| LoadError::Verify {
        what: format!("layer {name}"),
        source,
    };
    if &uncompressed.0 != diff_id {
        return Err(verify(DigestError::Mismatch {
            expected: diff_id.clone(),
            actual: uncompressed.0,
        }));
    }
    let (digest, size, _) = blob.into_digest().map_err(verify)?;
    if let Some(named) = digest_in_name(name) {
        if named != digest {
            return Err(verify(DigestError::Mismatch {
                expected: named,
                actual: digest,
            }));
        }
    }
    // Second pass: into the store, checked again (the file could change in between).
    if !store.has_blob(&digest) {
        let check = |path: &Path| store::check_layer_file(path, &digest, media_type);
        match store.import_checked(&mut open()?, &digest, Some(size), check) {
            Ok(_) => {}
            Err(StoreError::Digest(source)) => return Err(verify(source)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Descriptor::new(media_type, digest, size))
}

/// Copies everything read through it into `copy`.
struct TeeReader<'a, R: Read, W: io::Write> {
    inner: R,
    copy: &'a mut W,
}

impl<R: Read, W: io::Write> Read for TeeReader<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
