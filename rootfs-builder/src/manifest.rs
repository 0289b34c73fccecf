//! OCI and Docker v2 manifest, index and image config types, media types, validation and
//! platform selection. Shared by the registry client, the store and `load`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list (the Docker twin of the OCI index).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Uncompressed OCI layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Gzip-compressed OCI layer.
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Zstd-compressed OCI layer.
pub const OCI_LAYER_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker gzip layer.
pub const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker uncompressed layer (as found in some `docker save` outputs).
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// The `Accept` header for manifest requests: every manifest kind we understand.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";
/// Largest manifest or index accepted (registries cap them at 4 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest image config accepted.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
const MAX_LAYERS: usize = 1000;

/// A manifest that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The JSON does not parse as the type it claims.
    #[error("malformed {what}")]
    Malformed {
        /// What was being parsed.
        what: &'static str,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A media type we do not handle.
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    /// Docker schema 1 manifests are long deprecated.
    #[error(
        "Docker schema 1 manifests are not supported: push the image again with a current client"
    )]
    Schema1,
    /// The manifest is valid but describes something other than a container image.
    #[error("not a container image: config media type is {0:?}")]
    NotAnImage(String),
    /// A layer in a media type we cannot unpack.
    #[error("unsupported layer media type {0:?}")]
    UnsupportedLayer(String),
    /// The schema version is not 2.
    #[error("unsupported manifest schemaVersion {0}")]
    SchemaVersion(u32),
    /// More layers than any real image has.
    #[error("manifest lists {0} layers (at most {MAX_LAYERS} are accepted)")]
    TooManyLayers(usize),
    /// A layer over the size limit of every layer.
    #[error("layer {digest} refused")]
    LayerLimit {
        /// The layer's digest.
        digest: Digest,
        /// The limit it is over.
        #[source]
        source: crate::limits::LimitError,
    },
    /// The index has no entry for the platform we run.
    #[error("no {wanted} image in the index (it has: {available})")]
    NoPlatform {
        /// `os/arch` wanted.
        wanted: String,
        /// The platforms the index offers, comma separated.
        available: String,
    },
}

/// A content descriptor: what a manifest says about a blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Platform, in index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (for example `org.opencontainers.image.ref.name` in a layout's index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    /// A descriptor without platform or annotations.
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            platform: None,
            annotations: None,
        }
    }
}

/// The platform of an index entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture, Go names: `amd64`, `arm64`.
    pub architecture: String,
    /// Operating system: `linux`.
    pub os: String,
    /// CPU variant: `v8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest's own media type; optional in OCI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image config blob.
    pub config: Descriptor,
    /// Layer blobs, base first.
    pub layers: Vec<Descriptor>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image index or Docker manifest list.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// Always 2.
    pub schema_version: u32,
    /// The index's own media type; optional in OCI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests it lists.
    pub manifests: Vec<Descriptor>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A parsed manifest document.
#[derive(Clone, Debug)]
pub enum Manifest {
    /// One image.
    Image(ImageManifest),
    /// A list of per-platform images.
    Index(ImageIndex),
}

/// The runtime part of an image config (the `config` object of the OCI image config).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// Program and leading arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments (or program when there is no entrypoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `KEY=value` environment entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Working directory of the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `user[:group]`, names or numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Ports as `80/tcp` keys (the values are empty objects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Signal that stops the container, e.g. `SIGQUIT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

/// The image config file (the blob the manifest's `config` points at), the parts mvm uses.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ImageConfigFile {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// RFC 3339 creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Runtime defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ImageConfig>,
    /// Uncompressed layer digests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootFs>,
}

/// The `rootfs` section of an image config.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Digests of the uncompressed layer tars.
    pub diff_ids: Vec<Digest>,
}

/// True for layer media types mvm can unpack.
pub fn is_layer_media_type(media_type: &str) -> bool {
    let base = media_type.replace(".nondistributable", "");
    [
        OCI_LAYER_TAR,
        OCI_LAYER_TAR_GZIP,
        OCI_LAYER_TAR_ZSTD,
        DOCKER_LAYER_TAR_GZIP,
        DOCKER_LAYER_TAR,
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ]
    .contains(&base.as_str())
}

/// Parses a manifest body. The body's own `mediaType` wins; else the HTTP `Content-Type`; else
/// the shape (an OCI document may omit its media type).
pub fn parse_manifest(content_type: Option<&str>, body: &[u8]) -> Result<Manifest, ManifestError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        schema_version: u32,
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(body).map_err(|source| ManifestError::Malformed {
        what: "manifest",
        source,
    })?;
    if probe.schema_version == 1 {
        return Err(ManifestError::Schema1);
    }
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim())
        .filter(|c| !c.is_empty() && *c != "application/json" && *c != "application/octet-stream");
    let media_type = match (&probe.media_type, header) {
        (Some(m), _) => m.clone(),
        (None, Some(h)) => h.to_string(),
        (None, None) if probe.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None) if probe.layers.is_some() => OCI_MANIFEST.to_string(),
        (None, None) => return Err(ManifestError::UnsupportedMediaType("(none)".to_string())),
    };
    match media_type.as_str() {
        OCI_INDEX | DOCKER_MANIFEST_LIST => {
            let index: ImageIndex =
                serde_json::from_slice(body).map_err(|source| ManifestError::Malformed {
                    what: "image index",
                    source,
                })?;
            if index.schema_version != 2 {
                return Err(ManifestError::SchemaVersion(index.schema_version));
            }
            Ok(Manifest::Index(index))
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let manifest: ImageManifest =
                serde_json::from_slice(body).map_err(|source| ManifestError::Malformed {
                    what: "image manifest",
                    source,
                })?;
            validate_image_manifest(&manifest)?;
            Ok(Manifest::Image(manifest))
        }
        "application/vnd.docker.distribution.manifest.v1+json"
        | "application/vnd.docker.distribution.manifest.v1+prettyjws" => {
            Err(ManifestError::Schema1)
        }
        other => Err(ManifestError::UnsupportedMediaType(other.to_string())),
    }
}

/// Checks that an image manifest describes a container image mvm can unpack.
pub fn validate_image_manifest(manifest: &ImageManifest) -> Result<(), ManifestError> {
    if manifest.schema_version != 2 {
        return Err(ManifestError::SchemaVersion(manifest.schema_version));
    }
    let config_type = manifest.config.media_type.as_str();
    if config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
        return Err(ManifestError::NotAnImage(config_type.to_string()));
    }
    if manifest.layers.len() > MAX_LAYERS {
        return Err(ManifestError::TooManyLayers(manifest.layers.len()));
    }
    if let Some(layer) = manifest
        .layers
        .iter()
        .find(|l| !is_layer_media_type(&l.media_type))
    {
        return Err(ManifestError::UnsupportedLayer(layer.media_type.clone()));
    }
    let limits = crate::limits::LayerLimits::default();
    for layer in &manifest.layers {
        limits
            .check_compressed(layer.size)
            .map_err(|source| ManifestError::LayerLimit {
                digest: layer.digest.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Picks the entry for `os/architecture` from an index. Entries without a platform (attestations
/// and the like) are skipped.
pub fn select_platform<'a>(
    index: &'a ImageIndex,
    os: &str,
    architecture: &str,
) -> Result<&'a Descriptor, ManifestError> {
    let image_entries = index
        .manifests
        .iter()
        .filter(|d| d.media_type == OCI_MANIFEST || d.media_type == DOCKER_MANIFEST);
    let mut available = Vec::new();
    for entry in image_entries {
        let Some(p) = &entry.platform else { continue };
        if p.os == os && p.architecture == architecture {
            return Ok(entry);
        }
        let name = match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        };
        if !available.contains(&name) {
            available.push(name);
        }
    }
    Err(ManifestError::NoPlatform {
        wanted: format!("{os}/{architecture}"),
        available: if available.is_empty() {
            "none".to_string()
        } else {
            available.join(", ")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of_bytes(&[n])
    }

    fn manifest_json(config_type: &str, layer_type: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": d(1), "size": 10},
            "layers": [{"mediaType": layer_type, "digest": d(2), "size": 20}],
        }))
        .unwrap()
    }

    fn entry(os: &str, arch: &str, variant: Option<&str>, n: u8) -> serde_json::Value {
        let mut p = serde_json::json!({"os": os, "architecture": arch});
        if let Some(v) = variant {
            p["variant"] = v.into();
        }
        serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d(n), "size": 100, "platform": p})
    }

    #[test]
    fn parses_image_manifest() {
        let Manifest::Image(m) =
            parse_manifest(None, &manifest_json(OCI_CONFIG, OCI_LAYER_TAR_GZIP)).unwrap()
        else {
            panic!("not an image")
        };
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.config.digest, d(1));
    }

    #[test]
    fn media_type_from_header_or_shape_when_body_has_none() {
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [entry("linux", "amd64", None, 3)],
        }))
        .unwrap();
        assert!(matches!(
            parse_manifest(None, &body),
            Ok(Manifest::Index(_))
        ));
        assert!(matches!(
            parse_manifest(
                Some("application/vnd.docker.distribution.manifest.list.v2+json; charset=utf-8"),
                &body
            ),
            Ok(Manifest::Index(_))
        ));
        let err = parse_manifest(Some("application/x-weird"), &body).unwrap_err();
        assert!(
            matches!(err, ManifestError::UnsupportedMediaType(t) if t == "application/x-weird")
        );
    }

    #[test]
    fn rejects_unknown_and_non_image_manifests() {
        let helm = manifest_json("application/vnd.cncf.helm.config.v1+json", OCI_LAYER_TAR);
        assert!(matches!(
            parse_manifest(None, &helm),
            Err(ManifestError::NotAnImage(_))
        ));
        let odd_layer = manifest_json(OCI_CONFIG, "application/x-squashfs");
        assert!(matches!(
            parse_manifest(None, &odd_layer),
            Err(ManifestError::UnsupportedLayer(_))
        ));
        let v1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(matches!(
            parse_manifest(None, v1),
            Err(ManifestError::Schema1)
        ));
        let other = br#"{"schemaVersion":2,"mediaType":"application/vnd.example+json"}"#;
        assert!(matches!(
            parse_manifest(None, other),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
        assert!(matches!(
            parse_manifest(None, b"not json"),
            Err(ManifestError::Malformed { .. })
        ));
    }

    #[test]
    fn nondistributable_and_docker_layers_are_accepted() {
        assert!(is_layer_media_type(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        ));
        assert!(is_layer_media_type(DOCKER_LAYER_TAR_GZIP));
        assert!(!is_layer_media_type("application/octet-stream"));
    }

    #[test]
    fn selects_linux_amd64_from_index() {
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                entry("linux", "arm64", Some("v8"), 1),
                {"mediaType": OCI_MANIFEST, "digest": d(9), "size": 5,
                 "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
                entry("linux", "amd64", None, 2),
                entry("windows", "amd64", None, 3),
            ],
        }))
        .unwrap();
        let Manifest::Index(index) = parse_manifest(None, &body).unwrap() else {
            panic!()
        };
        assert_eq!(
            select_platform(&index, "linux", "amd64").unwrap().digest,
            d(2)
        );
        let err = select_platform(&index, "linux", "riscv64")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "no linux/riscv64 image in the index (it has: linux/arm64/v8, linux/amd64, windows/amd64)"
        );
    }

    #[test]
    fn image_config_reads_docker_field_names() {
        let json = br#"{"architecture":"amd64","os":"linux","created":"2024-01-01T00:00:00Z",
            "config":{"Entrypoint":["/docker-entrypoint.sh"],"Cmd":["nginx","-g","daemon off;"],
            "Env":["PATH=/usr/bin"],"WorkingDir":"/","User":"101","ExposedPorts":{"80/tcp":{}},
            "StopSignal":"SIGQUIT","Volumes":null},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let file: ImageConfigFile = serde_json::from_slice(json).unwrap();
        let c = file.config.unwrap();
        assert_eq!(c.cmd.unwrap()[0], "nginx");
        assert_eq!(c.user.as_deref(), Some("101"));
        assert!(c.exposed_ports.unwrap().contains_key("80/tcp"));
        assert_eq!(file.created.as_deref(), Some("2024-01-01T00:00:00Z"));
    }
}
