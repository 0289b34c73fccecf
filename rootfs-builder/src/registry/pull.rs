//! `pull`: manifest (through an index if need be), config and layers into the store; the
//! reference is added to the index last, so an interrupted pull leaves the store as it was.

use super::client::Client;
use super::progress::{human, Progress};
use super::{PullOptions, RegistryError};
use crate::manifest::{self, Descriptor, ImageConfigFile, Manifest};
use crate::reference::Reference;
use crate::store::{self, Image, Store};

/// Pulls `reference` into `store` and returns the stored image.
pub fn pull(
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
) -> Result<Image, RegistryError> {
    let _gc = store.lock_shared()?;
    let client = Client::new(reference.api_host(), reference.repository(), opts, false);
    let mut progress = Progress::new(opts.progress);
    let what = match (reference.digest(), reference.tag()) {
        (Some(d), _) => format!("manifest {d}"),
        (None, Some(t)) => format!("tag {t:?}"),
        (None, None) => "manifest".to_string(),
    };
    let (body, digest, content_type) =
        client.get_manifest(reference.object(), reference.digest(), &what)?;
    let unusable = |what: &str, source| RegistryError::Manifest {
        what: what.to_string(),
        host: client.host().to_string(),
        source,
    };
    let (body, digest, image) = match manifest::parse_manifest(content_type.as_deref(), &body)
        .map_err(|e| unusable(&what, e))?
    {
        Manifest::Image(m) => (body, digest, m),
        Manifest::Index(index) => {
            let entry = manifest::select_platform(&index, &opts.os, &opts.architecture)
                .map_err(|e| unusable(&what, e))?;
            let what = format!("manifest {}", entry.digest);
            let (body, digest, content_type) =
                client.get_manifest(entry.digest.as_str(), Some(&entry.digest), &what)?;
            match manifest::parse_manifest(content_type.as_deref(), &body)
                .map_err(|e| unusable(&what, e))?
            {
                Manifest::Image(m) => (body, digest, m),
                Manifest::Index(_) => {
                    return Err(unusable(
                        &what,
                        manifest::ManifestError::UnsupportedMediaType(manifest::OCI_INDEX.into()),
                    ))
                }
            }
        }
    };
    progress.line(&format!(
        "{}: pulling from {}",
        reference.familiar(),
        reference.registry()
    ));

    fetch(store, &client, &image.config, "config", &mut progress)?;
    let config_body = store.read_blob(&image.config.digest, manifest::MAX_CONFIG_BYTES)?;
    serde_json::from_slice::<ImageConfigFile>(&config_body).map_err(|source| {
        RegistryError::BadConfig {
            digest: image.config.digest.to_string(),
            source,
        }
    })?;
    for layer in &image.layers {
        fetch(store, &client, layer, "layer", &mut progress)?;
    }
    let stored = store.write_blob(&body)?;
    debug_assert_eq!(stored, digest);
    store.tag(reference, &digest)?;
    progress.line(&format!("digest: {digest}"));
    Ok(store.image(reference.to_string(), &digest)?)
}

fn fetch(
    store: &Store,
    client: &Client,
    desc: &Descriptor,
    kind: &str,
    progress: &mut Progress,
) -> Result<(), RegistryError> {
    let label = format!("{} {}", desc.digest.short(), kind);
    if store.has_blob(&desc.digest) {
        progress.line(&format!("{label}: already exists"));
        return Ok(());
    }
    let mut temp = store.temp_blob()?;
    client.fetch_blob(desc, &mut temp, &label, progress)?;
    if kind == "layer" {
        // Held to the layer limits before it enters the store (a bomb never does).
        store::check_layer_file(temp.path(), &desc.digest, &desc.media_type)?;
    }
    store.commit_blob(temp, &desc.digest)?;
    progress.line(&format!("{label}: pulled {}", human(desc.size)));
    Ok(())
}
