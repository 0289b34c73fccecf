use std::io::Write;

use super::*;
use crate::oci_writer::{ImageConfig as WriterConfig, LayerEntry, OciLayoutWriter};

fn layout(dir: &Path) -> PathBuf {
    let out = dir.join("layout");
    let mut w = OciLayoutWriter::new(&out).unwrap();
    w.add_layer_entries(&[
        LayerEntry::Dir("bin".into(), 0o755),
        LayerEntry::File("bin/hello".into(), 0o755, b"#!/bin/sh\necho hi\n".to_vec()),
    ])
    .unwrap();
    let config = WriterConfig {
        cmd: vec!["/bin/hello".into()],
        ..Default::default()
    };
    w.finish(&config, "latest").unwrap();
    out
}

fn tar_of(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A docker-archive as `docker save` (before Docker 25) writes it, as a directory.
fn docker_dir(dir: &Path, layer: &[u8], diff_id: &Digest, repo_tags: &[&str]) -> PathBuf {
    let out = dir.join("docker");
    std::fs::create_dir_all(out.join("abc123")).unwrap();
    std::fs::write(out.join("abc123/layer.tar"), layer).unwrap();
    let config = serde_json::json!({"architecture":"amd64","os":"linux",
        "config":{"Cmd":["sh"],"Env":["A=1"]},
        "rootfs":{"type":"layers","diff_ids":[diff_id]}});
    let config = serde_json::to_vec(&config).unwrap();
    let config_name = format!("{}.json", Digest::of_bytes(&config).hex());
    std::fs::write(out.join(&config_name), &config).unwrap();
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": repo_tags,
        "Layers": ["abc123/layer.tar"]}]);
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    out
}

fn store(dir: &Path) -> Store {
    Store::open(&dir.join("state")).unwrap()
}

fn tmp_is_empty(store: &Store) -> bool {
    std::fs::read_dir(store.dir().join("tmp")).unwrap().count() == 0
}

#[test]
fn oci_layout_directory_loads_under_the_given_name() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let loaded = load(&s, &layout(dir.path()), Some("localhost:5000/app:v1")).unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].reference.to_string(), "localhost:5000/app:v1");
    let image = s.resolve("localhost:5000/app:v1").unwrap();
    assert_eq!(image.manifest_digest, loaded[0].manifest_digest.to_string());
    assert_eq!(image.config.cmd, Some(vec!["/bin/hello".to_string()]));
    assert!(s.has_blob(&image.layers[0].digest));
    assert!(tmp_is_empty(&s));
}

#[test]
fn oci_layout_without_a_name_asks_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let err = load(&s, &layout(dir.path()), None).unwrap_err();
    assert!(matches!(err, LoadError::NoName), "{err}");
    assert!(s.list().unwrap().is_empty());
}

#[test]
fn tar_of_an_oci_layout_loads() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let archive = dir.path().join("image.tar");
    tar_of(&layout(dir.path()), &archive);
    load(&s, &archive, Some("app")).unwrap();
    assert!(s.resolve("app:latest").is_ok());
    assert!(tmp_is_empty(&s));
}

#[test]
fn docker_archive_tar_loads_with_its_repo_tags() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let layer = layer_tar(&[("etc/motd", b"hello")]);
    let docker = docker_dir(
        dir.path(),
        &layer,
        &Digest::of_bytes(&layer),
        &["busybox:latest", "busybox:1"],
    );
    let archive = dir.path().join("saved.tar");
    tar_of(&docker, &archive);
    let loaded = load(&s, &archive, None).unwrap();
    assert_eq!(loaded.len(), 2);
    let image = s.resolve("busybox").unwrap();
    assert_eq!(image.config.env, Some(vec!["A=1".to_string()]));
    assert_eq!(image.layers[0].media_type, manifest::OCI_LAYER_TAR);
    assert_eq!(image.layers[0].digest, Digest::of_bytes(&layer));
    assert_eq!(
        s.resolve("busybox:1").unwrap().manifest_digest,
        image.manifest_digest
    );
}

#[test]
fn docker_archive_with_gzip_layer_is_checked_against_diff_id() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let layer = layer_tar(&[("etc/motd", b"hello")]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer).unwrap();
    let gz = gz.finish().unwrap();
    let docker = docker_dir(dir.path(), &gz, &Digest::of_bytes(&layer), &["app:gz"]);
    load(&s, &docker, None).unwrap();
    let image = s.resolve("app:gz").unwrap();
    assert_eq!(image.layers[0].media_type, manifest::OCI_LAYER_TAR_GZIP);
    assert_eq!(image.layers[0].digest, Digest::of_bytes(&gz));
}

#[test]
fn docker_archive_layer_not_matching_diff_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let layer = layer_tar(&[("etc/motd", b"hello")]);
    let docker = docker_dir(dir.path(), &layer, &Digest::of_bytes(b"other"), &["app:1"]);
    let err = load(&s, &docker, None).unwrap_err();
    assert!(matches!(err, LoadError::Verify { .. }), "{err}");
    assert!(s.list().unwrap().is_empty());
    assert!(!s.has_blob(&Digest::of_bytes(&layer)));
}

#[test]
fn paths_escaping_the_archive_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    // manifest.json naming a file outside the archive.
    let layer = layer_tar(&[("x", b"x")]);
    let docker = docker_dir(dir.path(), &layer, &Digest::of_bytes(&layer), &["app:1"]);
    let manifest = serde_json::json!([{"Config": "../outside.json", "RepoTags": ["app:1"],
        "Layers": ["abc123/layer.tar"]}]);
    std::fs::write(dir.path().join("outside.json"), b"{}").unwrap();
    std::fs::write(
        docker.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let err = load(&s, &docker, None).unwrap_err();
    assert!(matches!(err, LoadError::Escape(_)), "{err}");

    // A tar entry climbing out of the extraction directory (written by hand: the tar crate
    // refuses such names).
    let archive = dir.path().join("evil.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_old();
    let name = b"../../../evil";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_size(4);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, &b"evil"[..]).unwrap();
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let err = load(&s, &archive, Some("app")).unwrap_err();
    assert!(matches!(err, LoadError::Escape(_)), "{err}");
    assert!(!s.dir().join("evil").exists() && !dir.path().join("evil").exists());

    // A symlink in the archive pointing outside it.
    let archive = dir.path().join("link.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "manifest.json", "/etc/passwd")
        .unwrap();
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    assert!(load(&s, &archive, Some("app")).is_err());
    assert!(s.list().unwrap().is_empty());
    assert!(tmp_is_empty(&s));
}

fn first_layer_blob(layout: &Path) -> PathBuf {
    let index: ImageIndex =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m: ImageManifest = serde_json::from_slice(
        &std::fs::read(layout_blob(layout, &index.manifests[0].digest)).unwrap(),
    )
    .unwrap();
    layout_blob(layout, &m.layers[0].digest)
}

#[test]
fn missing_blob_fails_and_tags_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let layout = layout(dir.path());
    std::fs::remove_file(first_layer_blob(&layout)).unwrap();
    let err = load(&s, &layout, Some("app")).unwrap_err();
    assert!(matches!(err, LoadError::Missing(_)), "{err}");
    assert!(
        err.to_string().contains("missing from the archive"),
        "{err}"
    );
    assert!(s.list().unwrap().is_empty());
}

#[test]
fn blob_not_matching_its_digest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let layout = layout(dir.path());
    let blob = first_layer_blob(&layout);
    let len = std::fs::metadata(&blob).unwrap().len();
    std::fs::write(&blob, vec![0x55u8; usize::try_from(len).unwrap()]).unwrap();
    let err = load(&s, &layout, Some("app")).unwrap_err();
    assert!(matches!(err, LoadError::Verify { .. }), "{err}");
    assert!(s.list().unwrap().is_empty());
    assert!(tmp_is_empty(&s));
    let name = blob.file_name().unwrap().to_str().unwrap();
    assert!(!s.has_blob(&Digest::parse(&format!("sha256:{name}")).unwrap()));
}

#[test]
fn unknown_layer_media_type_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let layout = layout(dir.path());
    let index_path = layout.join("index.json");
    let mut index: ImageIndex =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let mut m: ImageManifest = serde_json::from_slice(
        &std::fs::read(layout_blob(&layout, &index.manifests[0].digest)).unwrap(),
    )
    .unwrap();
    m.layers[0].media_type = "application/vnd.example.unknown".into();
    let body = serde_json::to_vec(&m).unwrap();
    let digest = Digest::of_bytes(&body);
    std::fs::write(layout_blob(&layout, &digest), &body).unwrap();
    index.manifests[0].digest = digest;
    index.manifests[0].size = body.len() as u64;
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let err = load(&s, &layout, Some("app")).unwrap_err();
    assert!(matches!(err, LoadError::Manifest { .. }), "{err}");
    assert!(s.list().unwrap().is_empty());
}

#[test]
fn input_that_is_no_image_archive_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = load(&s, &empty, None).unwrap_err();
    assert!(matches!(err, LoadError::UnknownFormat(_)), "{err}");
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, vec![7u8; 3000]).unwrap();
    let err = load(&s, &junk, None).unwrap_err();
    assert!(matches!(err, LoadError::NotArchive(..)), "{err}");
    let err = load(&s, &dir.path().join("absent.tar"), None).unwrap_err();
    assert!(matches!(err, LoadError::Io { .. }), "{err}");
    assert!(tmp_is_empty(&s));
}
