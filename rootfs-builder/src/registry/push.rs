//! `push`: uploads a stored image's blobs (skipping those the registry has) and then its
//! manifest, byte for byte, so the pushed image keeps its digest.

use super::client::Client;
use super::progress::{human, Progress};
use super::{PullOptions, RegistryError};
use crate::digest::Digest;
use crate::manifest::{self, Manifest};
use crate::reference::Reference;
use crate::store::Store;

/// Pushes the stored image `reference` to the registry it names. Returns the manifest digest.
pub fn push(
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
) -> Result<Digest, RegistryError> {
    let image = store.resolve(reference)?;
    let manifest_digest =
        Digest::parse(&image.manifest_digest).map_err(crate::store::StoreError::from)?;
    let body = store.read_blob(&manifest_digest, manifest::MAX_MANIFEST_BYTES)?;
    let media_type = match manifest::parse_manifest(None, &body) {
        Ok(Manifest::Image(m)) => m
            .media_type
            .unwrap_or_else(|| manifest::OCI_MANIFEST.to_string()),
        _ => manifest::OCI_MANIFEST.to_string(),
    };
    let client = Client::new(reference.api_host(), reference.repository(), opts, true);
    let mut progress = Progress::new(opts.progress);
    let config_size =
        std::fs::metadata(store.blob_path(&image.config_digest)).map_or(0, |m| m.len());
    let blobs = image
        .layers
        .iter()
        .map(|l| (&l.digest, l.size, "layer"))
        .chain(std::iter::once((
            &image.config_digest,
            config_size,
            "config",
        )));
    for (digest, size, kind) in blobs {
        let label = format!("{} {kind}", digest.short());
        if client.has_blob(digest)? {
            progress.line(&format!("{label}: already exists"));
            continue;
        }
        client.upload_blob(&store.blob_path(digest), digest, size)?;
        progress.line(&format!("{label}: pushed {}", human(size)));
    }
    let target = match (reference.tag(), reference.digest()) {
        (Some(t), _) => t.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) => crate::reference::DEFAULT_TAG.to_string(),
    };
    client.put_manifest(&target, &media_type, &body)?;
    progress.line(&format!(
        "{}: digest: {manifest_digest}",
        reference.familiar()
    ));
    Ok(manifest_digest)
}
