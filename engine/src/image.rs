//! Images for runs and for the image commands, over the store in `<root>/images`: pull, push,
//! list, remove and load; and [`resolve`], which turns a run's image into an unpacked root
//! filesystem and image config (pulling the image first when it is not stored, as `docker run`
//! does) and says which digest it found.
//!
//! Caches under `<root>/cache`: `rootfs/<key>` (unpacked root filesystems) and `disks/<key>.ext4`
//! (their disk images for VMs), both keyed by manifest digest ([`cache_key`]); `agent-*.cpio` (the
//! agent's initramfs, see `run::vm`).

use std::path::{Path, PathBuf};

use guest_agent::runtime::security::devices::{self, Kind};
use guest_agent::runtime::ImageConfig;
use rootfs_builder::digest::{Digest, DigestError};
use rootfs_builder::load::LoadError;
use rootfs_builder::reference::{Reference, ReferenceError};
use rootfs_builder::registry::{self, PullOptions, RegistryError};
use rootfs_builder::rootfs::{self, RootfsError};
use rootfs_builder::store::{Image, ImageSummary, Removed, Store, StoreError};
use rootfs_builder::unpack::{DeviceKind, DeviceNode, LayerMediaType, UnpackError};

/// Errors of the image store, registries and root filesystem caches.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A reference that does not parse.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// A pinned digest that does not parse.
    #[error("image digest")]
    Digest(#[from] DigestError),
    /// The local store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Pulling from a registry.
    #[error("pull {reference}")]
    Pull {
        /// The image, as Docker names it.
        reference: String,
        /// Why.
        #[source]
        source: Box<RegistryError>,
    },
    /// Pushing to a registry.
    #[error("push {reference}")]
    Push {
        /// The image, as Docker names it.
        reference: String,
        /// Why.
        #[source]
        source: Box<RegistryError>,
    },
    /// An archive or layout that cannot be loaded.
    #[error("load {}", input.display())]
    Load {
        /// What was loaded.
        input: PathBuf,
        /// Why.
        #[source]
        source: LoadError,
    },
    /// A layer of an unknown kind.
    #[error(transparent)]
    Layer(#[from] UnpackError),
    /// Unpacking or caching a root filesystem.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
}

impl ImageError {
    /// Whether the error is the user's input being wrong: a reference, or a file to load that is
    /// not an image.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ImageError::Reference(_) | ImageError::Digest(_) => true,
            ImageError::Store(StoreError::Reference(_)) => true,
            ImageError::Load { source, .. } => {
                !matches!(source, LoadError::Io { .. } | LoadError::Store(_))
            }
            _ => false,
        }
    }
}

/// Where unpacked root filesystems are cached, one directory per manifest digest. Absolute, as
/// overlay lower directories must be.
pub fn rootfs_cache(root: &Path) -> PathBuf {
    std::path::absolute(root)
        .unwrap_or_else(|_| root.to_path_buf())
        .join("cache/rootfs")
}

/// Where the disk images of cached root filesystems are kept.
pub fn disk_cache(root: &Path) -> PathBuf {
    rootfs_cache(root).with_file_name("disks")
}

/// The cache key of a manifest digest: `sha256-<hex>` (overlay options cannot hold a `:`).
pub fn cache_key(digest: &str) -> String {
    digest.replace(':', "-")
}

fn open_store(root: &Path) -> Result<Store, ImageError> {
    Ok(Store::open(root)?)
}

/// Registry options from the `--insecure-registry` and `--quiet` flags of pull and push.
fn registry_options(insecure: &[String], quiet: bool) -> PullOptions {
    PullOptions {
        insecure_registries: insecure.to_vec(),
        progress: !quiet,
        ..Default::default()
    }
}

/// Pulls `text` into the store; returns its canonical reference. Progress goes to stderr unless
/// `quiet`; `insecure` registries are reached over plain HTTP (local addresses always are).
pub fn pull(
    root: &Path,
    text: &str,
    insecure: &[String],
    quiet: bool,
) -> Result<Reference, ImageError> {
    let reference = Reference::parse(text)?;
    let store = open_store(root)?;
    registry::pull(&store, &reference, &registry_options(insecure, quiet)).map_err(|source| {
        ImageError::Pull {
            reference: reference.familiar(),
            source: Box::new(source),
        }
    })?;
    Ok(reference)
}

/// Pushes the stored image `text` to the registry its name gives; returns the manifest digest.
pub fn push(
    root: &Path,
    text: &str,
    insecure: &[String],
    quiet: bool,
) -> Result<String, ImageError> {
    let reference = Reference::parse(text)?;
    let store = open_store(root)?;
    let digest = registry::push(&store, &reference, &registry_options(insecure, quiet)).map_err(
        |source| ImageError::Push {
            reference: reference.familiar(),
            source: Box::new(source),
        },
    )?;
    Ok(digest.to_string())
}

/// The stored images, sorted by reference.
pub fn list(root: &Path) -> Result<Vec<ImageSummary>, ImageError> {
    Ok(open_store(root)?.list()?)
}

/// Untags `text` and deletes the blobs nothing uses any more, with the root filesystems and
/// disk images cached for them.
pub fn remove(root: &Path, text: &str) -> Result<Removed, ImageError> {
    let reference = Reference::parse(text)?;
    let removed = open_store(root)?.remove(&reference)?;
    for digest in &removed.blobs {
        // Only manifest digests have cached root filesystems; others are no-ops.
        let key = cache_key(digest.as_str());
        if let Err(e) = rootfs::remove_rootfs(&rootfs_cache(root), &key) {
            log::warn!("{e}");
        }
        let disk = rootfs_builder::disk::rootfs_disk_path(
            &disk_cache(root),
            &key,
            rootfs_builder::disk::DiskFormat::Ext4,
        );
        if let Err(e) = std::fs::remove_file(&disk) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", disk.display());
            }
        }
    }
    Ok(removed)
}

/// Loads the images of an OCI layout (directory or tar) or a `docker save` archive, naming them
/// `tag` where the archive does not; returns their references.
pub fn load(root: &Path, input: &Path, tag: Option<&str>) -> Result<Vec<Reference>, ImageError> {
    let store = open_store(root)?;
    let loaded =
        rootfs_builder::load::load(&store, input, tag).map_err(|source| ImageError::Load {
            input: input.to_path_buf(),
            source,
        })?;
    Ok(loaded.into_iter().map(|i| i.reference).collect())
}

/// An image's root filesystem and the config to start it with.
#[derive(Debug)]
pub struct Resolved {
    /// The unpacked root directory in the cache (read-only: the container's lower layer).
    pub dir: PathBuf,
    /// The image config.
    pub config: ImageConfig,
    /// The manifest digest of the image.
    pub digest: String,
}

/// Resolves image `reference` to its unpacked root filesystem and config: found in the store
/// (pulled when it is not there; progress on stderr) and unpacked into the cache. With `digest`
/// (what an earlier resolve found), exactly that image, whatever the tag names now, and never
/// pulled.
pub fn resolve(root: &Path, reference: &str, digest: Option<&str>) -> Result<Resolved, ImageError> {
    let image = match digest {
        Some(d) => pinned(root, reference, d)?,
        None => find_or_pull(root, reference)?,
    };
    let dir = image_rootfs(root, &image)?;
    warn_skipped_devices(&dir);
    let c = image.config;
    Ok(Resolved {
        dir,
        config: ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir,
            user: c.user,
        },
        digest: image.manifest_digest,
    })
}

/// The image `text` from the store, pulled first when it is not there.
fn find_or_pull(root: &Path, text: &str) -> Result<Image, ImageError> {
    let reference = Reference::parse(text)?;
    let store = open_store(root)?;
    match store.resolve(&reference) {
        Ok(image) => Ok(image),
        Err(StoreError::NotFound(_)) => {
            eprintln!("Unable to find image '{}' locally", reference.familiar());
            let opts = PullOptions {
                progress: true,
                ..Default::default()
            };
            registry::pull(&store, &reference, &opts).map_err(|source| ImageError::Pull {
                reference: reference.familiar(),
                source: Box::new(source),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The stored image with manifest `digest`, whatever its tag names now.
fn pinned(root: &Path, text: &str, digest: &str) -> Result<Image, ImageError> {
    let reference = Reference::parse(text)?;
    let digest = Digest::parse(digest)?;
    let store = open_store(root)?;
    Ok(store.image(reference.with_digest(digest.clone()).to_string(), &digest)?)
}

/// Device nodes of an image are never created (not on the host, not in the container): the
/// container's `/dev` holds only the devices the runtime allows (null, zero, full, random,
/// urandom, tty, console, ptmx, pts). Returns the image's nodes that are not one of those at its
/// usual path, which the container therefore does not get.
fn skipped_devices(nodes: &[DeviceNode]) -> Vec<&DeviceNode> {
    nodes
        .iter()
        .filter(|n| {
            let kind = match n.kind {
                DeviceKind::Char => Kind::Char,
                DeviceKind::Block => Kind::Block,
            };
            let allowed = devices::allowed(kind, n.major, n.minor, devices::READ | devices::WRITE);
            !(allowed && n.path.starts_with("/dev/"))
        })
        .collect()
}

/// Warns, in one line, about the image's device nodes the container does not get.
fn warn_skipped_devices(rootfs_dir: &Path) {
    let nodes = match rootfs::device_nodes(rootfs_dir) {
        Ok(nodes) => nodes,
        Err(e) => {
            log::warn!("{e}");
            return;
        }
    };
    let skipped = skipped_devices(&nodes);
    if skipped.is_empty() {
        return;
    }
    let list: Vec<String> = skipped
        .iter()
        .take(5)
        .map(|n| {
            let kind = if n.kind == DeviceKind::Block {
                "block"
            } else {
                "char"
            };
            format!("{} ({kind} {}:{})", n.path, n.major, n.minor)
        })
        .collect();
    let more = skipped.len().saturating_sub(list.len());
    log::warn!(
        "the image's device nodes {}{} are not created: a container gets only the devices \
         mvm allows (null, zero, full, random, urandom, tty, console, ptmx)",
        list.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    );
}

/// The unpacked root filesystem of `image`, cached by manifest digest under `<root>/cache/rootfs`.
fn image_rootfs(root: &Path, image: &Image) -> Result<PathBuf, ImageError> {
    let store = open_store(root)?;
    let layers = image
        .layers
        .iter()
        .map(|l| {
            Ok((
                store.blob_path(&l.digest),
                LayerMediaType::parse(&l.media_type)?,
            ))
        })
        .collect::<Result<Vec<_>, UnpackError>>()?;
    Ok(rootfs::prepare_rootfs(
        &layers,
        &rootfs_cache(root),
        &cache_key(&image.manifest_digest),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(path: &str, kind: DeviceKind, major: u32, minor: u32) -> DeviceNode {
        DeviceNode {
            path: path.into(),
            kind,
            major,
            minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn only_allowed_devices_at_their_place_are_not_reported() {
        let nodes = [
            node("/dev/null", DeviceKind::Char, 1, 3),
            node("/dev/tty", DeviceKind::Char, 5, 0),
            node("/dev/sda", DeviceKind::Block, 8, 0),
            node("/dev/mem", DeviceKind::Char, 1, 1),
            node("/opt/null", DeviceKind::Char, 1, 3),
        ];
        let skipped: Vec<&str> = skipped_devices(&nodes)
            .iter()
            .map(|n| n.path.as_str())
            .collect();
        assert_eq!(skipped, ["/dev/sda", "/dev/mem", "/opt/null"]);
    }

    #[test]
    fn cache_keys_hold_no_colon() {
        assert_eq!(cache_key("sha256:ab"), "sha256-ab");
        let root = Path::new("/var/lib/mvm");
        assert_eq!(disk_cache(root), Path::new("/var/lib/mvm/cache/disks"));
    }

    #[test]
    fn a_pinned_digest_that_is_not_stored_is_not_pulled() {
        let root = tempfile::tempdir().unwrap();
        let zero = format!("sha256:{}", "0".repeat(64));
        let e = resolve(root.path(), "busybox", Some(&zero)).unwrap_err();
        assert!(matches!(e, ImageError::Store(_)), "{e}");
        assert!(resolve(root.path(), "busybox", Some("md5:x"))
            .unwrap_err()
            .is_bad_input());
    }
}
