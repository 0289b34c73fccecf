//! Writes OCI image layouts: deterministic gzip layers, the image config, the manifest,
//! `index.json` and `oci-layout`. Same input, same digests: entries are sorted, owners are root,
//! mtimes are fixed and the gzip header carries no time or name.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of the gzip layers written here.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Annotation holding a manifest's reference name in `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// The mtime given to every entry of a written layer (2024-01-01T00:00:00Z).
pub const FIXED_MTIME: u64 = 1_704_067_200;

/// Errors from writing an OCI layout.
#[derive(Debug, thiserror::Error)]
pub enum OciWriteError {
    /// Reading the source tree failed.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Writing into the layout failed.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A blob in the layout: what a manifest or index points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Descriptor {
    /// The blob's media type.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<hex>` of the blob bytes.
    pub digest: String,
    /// Blob size in bytes.
    pub size: u64,
    /// Optional annotations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// A written layer: its descriptor and the digest of its uncompressed tar (the config's diff_id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// The compressed blob.
    pub descriptor: Descriptor,
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: String,
}

/// One entry of a hand-made layer (see [`OciLayoutWriter::add_layer_entries`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerEntry {
    /// A directory with a mode.
    Dir(String, u32),
    /// A regular file with its mode and contents.
    File(String, u32, Vec<u8>),
    /// A symbolic link and its target.
    Symlink(String, String),
    /// A whiteout: hides the path from lower layers.
    Whiteout(String),
    /// An opaque marker: hides everything lower layers put in this directory.
    Opaque(String),
    /// A device node: its path, whether it is a block (else character) device, mode, major
    /// and minor numbers (for tests of what mvm does with an image's device nodes).
    Device(String, bool, u32, u32, u32),
    /// A regular file with its mode, contents and extended attributes, written as pax
    /// `SCHILY.xattr.<name>` records (`security.capability` holds file capabilities).
    FileWithXattrs(String, u32, Vec<u8>, Vec<(String, Vec<u8>)>),
}

/// The runtime part of an image config (the fields mvm uses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// Entrypoint argv prefix.
    pub entrypoint: Vec<String>,
    /// Default arguments.
    pub cmd: Vec<String>,
    /// `KEY=value` environment.
    pub env: Vec<String>,
    /// Working directory.
    pub working_dir: String,
    /// Exposed ports such as `80/tcp`.
    pub exposed_ports: Vec<String>,
    /// Signal that stops the container gracefully, such as `SIGQUIT`.
    pub stop_signal: Option<String>,
    /// `user[:group]` the process runs as (names or numbers); root when absent.
    pub user: Option<String>,
}

/// Builds one OCI image layout directory.
#[derive(Debug)]
pub struct OciLayoutWriter {
    dir: PathBuf,
    layers: Vec<LayerBlob>,
}

impl OciLayoutWriter {
    /// Starts a layout in `dir` (created if missing; existing blobs are kept).
    pub fn new(dir: &Path) -> Result<Self, OciWriteError> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(|source| OciWriteError::Write {
            path: blobs,
            source,
        })?;
        Ok(OciLayoutWriter {
            dir: dir.to_path_buf(),
            layers: Vec::new(),
        })
    }

    /// The file holding the blob with `digest` (`sha256:<hex>`).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// Adds a layer holding the tree at `root` (sorted, root-owned, fixed mtimes; hard links kept).
    pub fn add_layer_from_dir(&mut self, root: &Path) -> Result<LayerBlob, OciWriteError> {
        let mut paths = Vec::new();
        collect(root, Path::new(""), &mut paths)?;
        let mut first_link: HashMap<(u64, u64), PathBuf> = HashMap::new();
        self.add_layer_with(|b| {
            for rel in &paths {
                let full = root.join(rel);
                let meta = full
                    .symlink_metadata()
                    .map_err(|source| OciWriteError::Read {
                        path: full.clone(),
                        source,
                    })?;
                let rerr = |source| OciWriteError::Read {
                    path: full.clone(),
                    source,
                };
                let mut h = header(meta.mode() & 0o7777);
                let ft = meta.file_type();
                if ft.is_dir() {
                    h.set_entry_type(tar::EntryType::Directory);
                    b.append_data(&mut h, rel, io::empty()).map_err(rerr)?;
                } else if ft.is_symlink() {
                    let target = std::fs::read_link(&full).map_err(rerr)?;
                    h.set_entry_type(tar::EntryType::Symlink);
                    b.append_link(&mut h, rel, target).map_err(rerr)?;
                } else if ft.is_file() {
                    if meta.nlink() > 1 {
                        if let Some(first) = first_link.get(&(meta.dev(), meta.ino())) {
                            h.set_entry_type(tar::EntryType::Link);
                            b.append_link(&mut h, rel, first).map_err(rerr)?;
                            continue;
                        }
                        first_link.insert((meta.dev(), meta.ino()), rel.clone());
                    }
                    h.set_size(meta.len());
                    let file = std::fs::File::open(&full).map_err(rerr)?;
                    b.append_data(&mut h, rel, file).map_err(rerr)?;
                } else {
                    log::warn!(
                        "not adding {} to the layer: not a file, directory or symlink",
                        full.display()
                    );
                }
            }
            Ok(())
        })
    }

    /// Adds a layer made of `entries` in the given order (for whiteout and opaque tests).
    pub fn add_layer_entries(
        &mut self,
        entries: &[LayerEntry],
    ) -> Result<LayerBlob, OciWriteError> {
        self.add_layer_with(|b| {
            let werr = |source| OciWriteError::Write {
                path: PathBuf::from("layer"),
                source,
            };
            for e in entries {
                match e {
                    LayerEntry::Dir(p, mode) => {
                        let mut h = header(*mode);
                        h.set_entry_type(tar::EntryType::Directory);
                        b.append_data(&mut h, p, io::empty()).map_err(werr)?;
                    }
                    LayerEntry::File(p, mode, data) => {
                        let mut h = header(*mode);
                        h.set_size(data.len() as u64);
                        b.append_data(&mut h, p, data.as_slice()).map_err(werr)?;
                    }
                    LayerEntry::Symlink(p, target) => {
                        let mut h = header(0o777);
                        h.set_entry_type(tar::EntryType::Symlink);
                        b.append_link(&mut h, p, target).map_err(werr)?;
                    }
                    LayerEntry::Whiteout(p) => {
                        let path = Path::new(p);
                        let name = path
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        let wh = path.with_file_name(format!(".wh.{name}"));
                        b.append_data(&mut header(0o644), wh, io::empty())
                            .map_err(werr)?;
                    }
                    LayerEntry::Opaque(dir) => {
                        let wh = Path::new(dir).join(".wh..wh..opq");
                        b.append_data(&mut header(0o644), wh, io::empty())
                            .map_err(werr)?;
                    }
                    LayerEntry::Device(p, block, mode, major, minor) => {
                        let mut h = header(*mode);
                        h.set_entry_type(if *block {
                            tar::EntryType::Block
                        } else {
                            tar::EntryType::Char
                        });
                        h.set_device_major(*major).map_err(werr)?;
                        h.set_device_minor(*minor).map_err(werr)?;
                        b.append_data(&mut h, p, io::empty()).map_err(werr)?;
                    }
                    LayerEntry::FileWithXattrs(p, mode, data, xattrs) => {
                        let records = pax_records(xattrs);
                        let mut h = header(0o644);
                        h.set_entry_type(tar::EntryType::XHeader);
                        h.set_size(records.len() as u64);
                        let name = format!("PaxHeaders/{}", p.trim_start_matches('/'));
                        b.append_data(&mut h, name, records.as_slice())
                            .map_err(werr)?;
                        let mut h = header(*mode);
                        h.set_size(data.len() as u64);
                        b.append_data(&mut h, p, data.as_slice()).map_err(werr)?;
                    }
                }
            }
            Ok(())
        })
    }

    fn add_layer_with(
        &mut self,
        fill: impl FnOnce(
            &mut tar::Builder<Hashing<flate2::write::GzEncoder<Hashing<std::fs::File>>>>,
        ) -> Result<(), OciWriteError>,
    ) -> Result<LayerBlob, OciWriteError> {
        let tmp = self
            .dir
            .join(format!("blobs/sha256/.layer-{}.tmp", std::process::id()));
        let werr = |source| OciWriteError::Write {
            path: tmp.clone(),
            source,
        };
        let file = std::fs::File::create(&tmp).map_err(werr)?;
        let gz = flate2::GzBuilder::new().write(Hashing::new(file), flate2::Compression::new(6));
        let mut builder = tar::Builder::new(Hashing::new(gz));
        builder.mode(tar::HeaderMode::Complete);
        let result = fill(&mut builder).and_then(|()| {
            let tar = builder.into_inner().map_err(werr)?;
            let diff_id = tar.digest();
            let gz = tar.inner.finish().map_err(werr)?;
            let size = gz.count;
            let digest = gz.digest();
            gz.inner.sync_all().map_err(werr)?;
            Ok((diff_id, digest, size))
        });
        let (diff_id, digest, size) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, self.blob_path(&digest)).map_err(werr)?;
        let layer = LayerBlob {
            descriptor: Descriptor {
                media_type: LAYER_MEDIA_TYPE.into(),
                digest,
                size,
                annotations: None,
            },
            diff_id,
        };
        self.layers.push(layer.clone());
        Ok(layer)
    }

    /// Writes the config, the manifest, `index.json` (one manifest, annotated with `ref_name`)
    /// and `oci-layout`. Returns the manifest's descriptor.
    pub fn finish(self, config: &ImageConfig, ref_name: &str) -> Result<Descriptor, OciWriteError> {
        let config_json = config_json(config, &self.layers);
        let config_desc = self.write_blob(CONFIG_MEDIA_TYPE, &config_json)?;
        #[derive(Serialize)]
        struct Manifest<'a> {
            #[serde(rename = "schemaVersion")]
            schema_version: u32,
            #[serde(rename = "mediaType")]
            media_type: &'a str,
            config: &'a Descriptor,
            layers: Vec<&'a Descriptor>,
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: MANIFEST_MEDIA_TYPE,
            config: &config_desc,
            layers: self.layers.iter().map(|l| &l.descriptor).collect(),
        };
        let manifest_json =
            serde_json::to_vec(&manifest).map_err(|e| self.werr("manifest", e.into()))?;
        let mut manifest_desc = self.write_blob(MANIFEST_MEDIA_TYPE, &manifest_json)?;
        manifest_desc.annotations =
            Some([(REF_NAME_ANNOTATION.to_string(), ref_name.to_string())].into());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [manifest_desc],
        });
        self.write_file("index.json", index.to_string().as_bytes())?;
        self.write_file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        manifest_desc.annotations = None;
        Ok(manifest_desc)
    }

    fn write_blob(&self, media_type: &str, data: &[u8]) -> Result<Descriptor, OciWriteError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let path = self.blob_path(&digest);
        std::fs::write(&path, data).map_err(|source| OciWriteError::Write { path, source })?;
        Ok(Descriptor {
            media_type: media_type.into(),
            digest,
            size: data.len() as u64,
            annotations: None,
        })
    }

    fn write_file(&self, name: &str, data: &[u8]) -> Result<(), OciWriteError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, data)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| OciWriteError::Write { path, source })
    }

    fn werr(&self, name: &str, source: io::Error) -> OciWriteError {
        OciWriteError::Write {
            path: self.dir.join(name),
            source,
        }
    }
}

fn config_json(c: &ImageConfig, layers: &[LayerBlob]) -> Vec<u8> {
    let mut cfg = serde_json::Map::new();
    if !c.entrypoint.is_empty() {
        cfg.insert("Entrypoint".into(), c.entrypoint.clone().into());
    }
    if !c.cmd.is_empty() {
        cfg.insert("Cmd".into(), c.cmd.clone().into());
    }
    cfg.insert("Env".into(), c.env.clone().into());
    cfg.insert("WorkingDir".into(), c.working_dir.clone().into());
    if !c.exposed_ports.is_empty() {
        let ports: serde_json::Map<_, _> = c
            .exposed_ports
            .iter()
            .map(|p| (p.clone(), serde_json::json!({})))
            .collect();
        cfg.insert("ExposedPorts".into(), ports.into());
    }
    if let Some(sig) = &c.stop_signal {
        cfg.insert("StopSignal".into(), sig.clone().into());
    }
    if let Some(user) = &c.user {
        cfg.insert("User".into(), user.clone().into());
    }
    let diff_ids: Vec<_> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let json = serde_json::json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": cfg,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    json.to_string().into_bytes()
}

/// Pax records (`<len> SCHILY.xattr.<name>=<value>\n`, the length counting itself) for
/// `xattrs`; values may be binary.
fn pax_records(xattrs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in xattrs {
        let body_len = 1 + "SCHILY.xattr.".len() + name.len() + 1 + value.len() + 1;
        let mut len = body_len + 1;
        while len.to_string().len() + body_len != len {
            len += 1;
        }
        out.extend_from_slice(format!("{len} SCHILY.xattr.{name}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

fn header(mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(FIXED_MTIME);
    h.set_size(0);
    h
}

/// All paths below `root`, relative, sorted so parents come before their contents.
fn collect(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), OciWriteError> {
    let dir = root.join(rel);
    let rerr = |source| OciWriteError::Read {
        path: dir.clone(),
        source,
    };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(rerr)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(rerr)?;
    names.sort();
    for name in names {
        let child = rel.join(&name);
        out.push(child.clone());
        let is_dir = root
            .join(&child)
            .symlink_metadata()
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if is_dir {
            collect(root, &child, out)?;
        }
    }
    Ok(())
}

/// A writer that hashes and counts what passes through it.
#[derive(Debug)]
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unpack::{apply_layer, LayerMediaType};

    #[test]
    fn layers_are_deterministic_and_digests_match_the_blobs() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
        std::fs::write(tree.join("usr/bin/app"), b"binary").unwrap();
        std::fs::hard_link(tree.join("usr/bin/app"), tree.join("usr/bin/app2")).unwrap();
        std::os::unix::fs::symlink("../usr/bin/app", tree.join("usr/app")).unwrap();
        let mut digests = Vec::new();
        for out in ["a", "b"] {
            let mut w = OciLayoutWriter::new(&tmp.path().join(out)).unwrap();
            let layer = w.add_layer_from_dir(&tree).unwrap();
            let blob = std::fs::read(w.blob_path(&layer.descriptor.digest)).unwrap();
            assert_eq!(blob.len() as u64, layer.descriptor.size);
            assert_eq!(
                format!("sha256:{}", hex::encode(Sha256::digest(&blob))),
                layer.descriptor.digest
            );
            let config = ImageConfig {
                cmd: vec!["/usr/bin/app".into()],
                ..Default::default()
            };
            let manifest = w.finish(&config, "latest").unwrap();
            digests.push((layer.descriptor.digest, manifest.digest));
        }
        assert_eq!(digests[0], digests[1]);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join("a/index.json")).unwrap())
                .unwrap();
        assert_eq!(
            index["manifests"][0]["annotations"][REF_NAME_ANNOTATION],
            "latest"
        );
        assert_eq!(index["manifests"][0]["digest"], digests[0].1.as_str());
    }

    #[test]
    fn device_and_xattr_entries_round_trip_through_the_unpacker() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = OciLayoutWriter::new(&tmp.path().join("oci")).unwrap();
        let cap = vec![
            1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let layer = w
            .add_layer_entries(&[
                LayerEntry::Device("dev/sda".into(), true, 0o660, 8, 0),
                LayerEntry::FileWithXattrs(
                    "bin/ping".into(),
                    0o755,
                    b"binary".to_vec(),
                    vec![
                        ("user.mvm".into(), b"yes".to_vec()),
                        ("user.bin".into(), cap),
                    ],
                ),
            ])
            .unwrap();
        let blob = w.blob_path(&layer.descriptor.digest);
        let dest = tmp.path().join("root");
        let staged = crate::unpack::stage_layers(
            &[(blob, LayerMediaType::TarGzip)],
            &dest,
            &crate::limits::LayerLimits::default(),
        )
        .unwrap();
        assert_eq!(staged.devices.len(), 1);
        assert_eq!(staged.devices[0].path, "/dev/sda");
        staged.publish().unwrap();
        assert_eq!(std::fs::read(dest.join("bin/ping")).unwrap(), b"binary");
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let mut buf = [0u8; 32];
        match rustix::fs::getxattr(dest.join("bin/ping"), "user.bin", &mut buf[..]) {
            Ok(n) => assert_eq!(buf[..n].len(), 20, "binary value kept whole"),
            Err(e) => eprintln!("filesystem without user xattrs ({e})"),
        }
    }

    #[test]
    fn a_whiteout_in_an_upper_layer_hides_the_lower_file() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = OciLayoutWriter::new(&tmp.path().join("oci")).unwrap();
        let lower = w
            .add_layer_entries(&[
                LayerEntry::Dir("etc".into(), 0o755),
                LayerEntry::File("etc/motd".into(), 0o644, b"hello".to_vec()),
                LayerEntry::File("etc/keep".into(), 0o644, b"kept".to_vec()),
                LayerEntry::File("var/cache/x".into(), 0o644, b"x".to_vec()),
            ])
            .unwrap();
        let upper = w
            .add_layer_entries(&[
                LayerEntry::Whiteout("etc/motd".into()),
                LayerEntry::Opaque("var/cache".into()),
            ])
            .unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        for layer in [&lower, &upper] {
            apply_layer(
                &root,
                &w.blob_path(&layer.descriptor.digest),
                LayerMediaType::TarGzip,
            )
            .unwrap();
        }
        assert!(!root.join("etc/motd").exists());
        assert_eq!(std::fs::read(root.join("etc/keep")).unwrap(), b"kept");
        assert!(root.join("var/cache").is_dir());
        assert!(!root.join("var/cache/x").exists());
    }
}
