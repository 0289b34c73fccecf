//! The image workflow against a real registry (Debian's `docker-registry` on 127.0.0.1): build the
//! busybox example from Debian packages, `mvm load` and `mvm push` it, then do what a user does:
//! `mvm pull`, `mvm images`, `mvm run --image`, `mvm rmi`, `mvm load` of a `docker save` archive,
//! and bad input of every kind, after which the store must be as it was and still work.
//!
//! Registry tests skip (with a reason) without `docker-registry` or Debian package lists; the
//! ones that run containers also need root.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

#[path = "common/registry.rs"]
mod registry_server;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use registry_server::{busybox_layout, Registry, Throttle};
use rootfs_builder::oci_writer::{ImageConfig, LayerEntry, OciLayoutWriter};

const MVM: &str = env!("CARGO_BIN_EXE_mvm");

fn mvm(root: &Path, args: &[&str]) -> Output {
    Command::new(MVM)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts success and returns stdout.
fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({:?}): {}{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// `mvm --root ROOT run --isolation container --rm FLAGS --image IMAGE -- CMD...`.
fn run_rm(root: &Path, flags: &[&str], image: &str, cmd: &[&str]) -> Output {
    let mut args = vec!["run", "--isolation", "container", "--rm"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--image", image, "--"]);
    args.extend_from_slice(cmd);
    mvm(root, &args)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: containers need root");
    }
    root
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The manifest of the single image in an OCI layout.
fn layout_manifest(layout: &Path) -> serde_json::Value {
    let index = json(&layout.join("index.json"));
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    json(&layout.join("blobs/sha256").join(&digest[7..]))
}

/// A registry with the busybox example pushed as `HOST/test/busybox`, and an empty store for
/// the user.
struct Env {
    reg: Registry,
    dir: tempfile::TempDir,
    /// The user's `--root`.
    user: PathBuf,
    /// `HOST/test/busybox`.
    busybox: String,
    /// Layer digests of the busybox image.
    busybox_layers: Vec<String>,
}

impl Env {
    fn new() -> Option<Env> {
        let layout = busybox_layout()?;
        let reg = Registry::start()?;
        let dir = tempfile::tempdir().unwrap();
        let busybox = format!("{}/test/busybox", reg.host());
        let env = Env {
            user: dir.path().join("user"),
            busybox_layers: layout_manifest(&layout)["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["digest"].as_str().unwrap().to_string())
                .collect(),
            reg,
            dir,
            busybox,
        };
        env.publish(&layout, &env.busybox);
        Some(env)
    }

    /// `mvm load` + `mvm push` of an OCI layout, from a store of its own.
    fn publish(&self, layout: &Path, name: &str) {
        let builder = self.dir.path().join("builder");
        ok(
            &mvm(
                &builder,
                &["load", "-i", layout.to_str().unwrap(), "-t", name],
            ),
            "load",
        );
        ok(&mvm(&builder, &["push", "-q", name]), "push");
    }

    fn user(&self, args: &[&str]) -> Output {
        mvm(&self.user, args)
    }

    fn images_json(&self) -> serde_json::Value {
        serde_json::from_str(&ok(&self.user(&["images", "--format", "json"]), "images")).unwrap()
    }

    fn blobs(&self) -> Vec<String> {
        let dir = self.user.join("images/blobs/sha256");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn tmp_files(&self) -> usize {
        std::fs::read_dir(self.user.join("images/tmp")).map_or(0, |d| d.count())
    }

    /// A small image (one file, no busybox), pulled first so the store is not empty.
    fn pull_tiny(&self) -> String {
        let layout = self.dir.path().join("tiny-oci");
        let mut w = OciLayoutWriter::new(&layout).unwrap();
        w.add_layer_entries(&[LayerEntry::File("hello".into(), 0o644, b"hi".to_vec())])
            .unwrap();
        w.finish(&ImageConfig::default(), "latest").unwrap();
        let name = format!("{}/test/tiny:v1", self.reg.host());
        self.publish(&layout, &name);
        ok(&self.user(&["pull", "-q", &name]), "pull tiny");
        name
    }

    /// A bad pull fails with one line and a non-zero code, leaving `mvm images` as it was and no
    /// temp files. Returns the error line.
    fn pull_fails_cleanly(&self, name: &str) -> String {
        let before = self.images_json();
        let o = self.user(&["pull", "-q", name]);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "pull {name} succeeded: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one error line: {err}");
        assert!(err.starts_with("mvm: "), "{err}");
        assert_eq!(self.images_json(), before, "the store's images changed");
        assert_eq!(self.tmp_files(), 0, "temp files left behind");
        err
    }

    /// A two-layer image on top of the busybox example: `lower` files are added to the busybox
    /// tree in layer one, `upper` is layer two.
    fn two_layer_image(
        &self,
        name: &str,
        lower: &[(&str, &[u8])],
        upper: &[LayerEntry],
        config: &ImageConfig,
    ) -> String {
        let layout = busybox_layout().unwrap();
        let manifest = layout_manifest(&layout);
        let blob = layout
            .join("blobs/sha256")
            .join(&manifest["layers"][0]["digest"].as_str().unwrap()[7..]);
        let tree = self.dir.path().join(format!("{name}-tree"));
        rootfs_builder::unpack::unpack_layers(
            &[(blob, rootfs_builder::unpack::LayerMediaType::TarGzip)],
            &tree,
        )
        .unwrap();
        for (path, data) in lower {
            let p = tree.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        let out = self.dir.path().join(format!("{name}-oci"));
        let mut w = OciLayoutWriter::new(&out).unwrap();
        w.add_layer_from_dir(&tree).unwrap();
        w.add_layer_entries(upper).unwrap();
        w.finish(config, "latest").unwrap();
        let reference = format!("{}/test/{name}", self.reg.host());
        self.publish(&out, &reference);
        reference
    }
}

#[test]
fn pull_lists_the_image_and_rmi_removes_it_with_its_blobs() {
    let Some(env) = Env::new() else { return };
    let start = Instant::now();
    let o = env.user(&["pull", &env.busybox]);
    assert_eq!(ok(&o, "pull").trim(), format!("{}:latest", env.busybox));
    let progress = text(&o.stderr);
    assert!(progress.contains("layer: pulled"), "{progress}");
    eprintln!("pull took {:?}", start.elapsed());

    let table = ok(&env.user(&["images"]), "images");
    let mut lines = table.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["REPOSITORY", "TAG", "DIGEST", "SIZE", "CREATED"]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row[..2], [env.busybox.as_str(), "latest"]);
    assert!(
        row[2].starts_with("sha256:") && row[2].len() == 19,
        "{table}"
    );
    assert_eq!(lines.next(), None);
    let list = env.images_json();
    assert_eq!(list[0]["reference"], format!("{}:latest", env.busybox));
    // Push and pull kept the manifest byte for byte: the digest is the one the layout names.
    let layout = json(&busybox_layout().unwrap().join("index.json"));
    assert_eq!(list[0]["digest"], layout["manifests"][0]["digest"]);
    for layer in &env.busybox_layers {
        assert!(env.blobs().contains(&layer[7..].to_string()));
    }

    let o = env.user(&["rmi", &env.busybox]);
    let out = ok(&o, "rmi");
    assert!(
        out.contains("Untagged:") && out.contains("Deleted:"),
        "{out}"
    );
    assert_eq!(env.images_json(), serde_json::json!([]));
    assert!(env.blobs().is_empty(), "blobs left: {:?}", env.blobs());
    let o = env.user(&["rmi", &env.busybox]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("not in the local store"));
}

#[test]
fn run_image_pulls_it_prints_output_and_exits_with_its_code() {
    if !is_root() {
        return;
    }
    let Some(env) = Env::new() else { return };
    let o = run_rm(
        &env.user,
        &[],
        &env.busybox,
        &["sh", "-c", "echo hi; exit 3"],
    );
    assert_eq!(text(&o.stdout), "hi\n", "stderr: {}", text(&o.stderr));
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stderr).contains("Unable to find image"));
    // The second run uses the stored image and the cached root filesystem.
    let start = Instant::now();
    let o = run_rm(&env.user, &[], &env.busybox, &["true"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(!text(&o.stderr).contains("Unable to find image"));
    eprintln!("second run took {:?}", start.elapsed());
    // rmi also drops the cached root filesystem.
    let cache = env.user.join("cache/rootfs");
    let cached = std::fs::read_dir(&cache).unwrap().count();
    assert_eq!(cached, 2, "the unpacked tree and its list of device nodes");
    ok(&env.user(&["rmi", &env.busybox]), "rmi");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
}

#[test]
fn run_image_applies_its_entrypoint_cmd_env_workdir_and_user() {
    if !is_root() {
        return;
    }
    let Some(env) = Env::new() else { return };
    let config = ImageConfig {
        entrypoint: vec!["sh".into(), "-c".into()],
        cmd: vec!["echo \"$GREETING\"; pwd; cat note; id -u".into()],
        env: vec!["GREETING=hello from the image".into(), "PATH=/bin".into()],
        working_dir: "/srv/app".into(),
        user: Some("1000:1000".into()),
        ..Default::default()
    };
    let upper = [
        LayerEntry::Dir("srv".into(), 0o755),
        LayerEntry::Dir("srv/app".into(), 0o755),
        LayerEntry::File("srv/app/note".into(), 0o644, b"note\n".to_vec()),
    ];
    let image = env.two_layer_image("configured", &[], &upper, &config);
    let base = ["run", "--isolation", "container", "--rm", "--image", &image];
    let o = env.user(&base);
    assert_eq!(
        ok(&o, "run"),
        "hello from the image\n/srv/app\nnote\n1000\n",
        "{}",
        text(&o.stderr)
    );
    // Arguments replace Cmd and keep the Entrypoint; -e overrides the image's Env.
    let mut args = base.to_vec();
    args.extend(["-e", "GREETING=overridden", "--", "echo $GREETING in $PWD"]);
    assert_eq!(ok(&env.user(&args), "run"), "overridden in /srv/app\n");
}

#[test]
fn run_image_with_mem_limit_kills_a_process_that_exceeds_it() {
    if !is_root() {
        return;
    }
    let Some(env) = Env::new() else { return };
    let o = run_rm(
        &env.user,
        &["--mem", "16M"],
        &env.busybox,
        &[
            "sh",
            "-c",
            "x=$(head -c 64000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    assert!(!text(&o.stdout).contains("survived"));
    assert_eq!(o.status.code(), Some(137), "stderr: {}", text(&o.stderr));
}

#[test]
fn run_image_whiteout_in_upper_layer_hides_a_lower_file() {
    if !is_root() {
        return;
    }
    let Some(env) = Env::new() else { return };
    let image = env.two_layer_image(
        "whiteout",
        &[("etc/secret", b"lower\n"), ("data/kept", b"kept\n")],
        &[LayerEntry::Whiteout("etc/secret".into())],
        &ImageConfig::default(),
    );
    let o = run_rm(
        &env.user,
        &[],
        &image,
        &[
            "sh",
            "-c",
            "cat /data/kept; test -e /etc/secret && echo visible || echo hidden",
        ],
    );
    assert_eq!(ok(&o, "run"), "kept\nhidden\n");
}

#[test]
fn pull_of_a_multi_platform_index_or_a_digest_gets_the_linux_amd64_image() {
    let Some(env) = Env::new() else { return };
    let layout = busybox_layout().unwrap();
    let entry = &json(&layout.join("index.json"))["manifests"][0];
    let digest = entry["digest"].as_str().unwrap();
    // An index listing the same manifest as arm64 first, then as amd64.
    let platform = |arch: &str| {
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": entry["size"], "platform": {"os": "linux", "architecture": arch}})
    };
    let index = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [platform("arm64"), platform("amd64")]});
    let client = rootfs_builder::registry::Client::new(
        &env.reg.host(),
        "test/busybox",
        &rootfs_builder::registry::PullOptions::default(),
        true,
    );
    client
        .put_manifest(
            "multi",
            "application/vnd.oci.image.index.v1+json",
            &serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    ok(
        &env.user(&["pull", "-q", &format!("{}:multi", env.busybox)]),
        "pull index",
    );
    assert_eq!(env.images_json()[0]["digest"], digest);
    let by_digest = format!("{}@{digest}", env.busybox);
    ok(&env.user(&["pull", "-q", &by_digest]), "pull by digest");
    let list = env.images_json();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert!(list.as_array().unwrap().iter().any(|i| i["tag"].is_null()));
    // Removing by digest removes every name of that repository pointing at it, and the blobs.
    ok(&env.user(&["rmi", &by_digest]), "rmi by digest");
    assert_eq!(env.images_json(), serde_json::json!([]));
    assert!(env.blobs().is_empty());
}

#[test]
fn pull_rejects_a_blob_whose_digest_does_not_match() {
    let Some(env) = Env::new() else { return };
    let tiny = env.pull_tiny();
    let file = env.reg.blob_file(&env.busybox_layers[0]);
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&file, &bad).unwrap();
    let err = env.pull_fails_cleanly(&env.busybox);
    assert!(err.contains("failed verification"), "{err}");
    assert!(err.contains("digest mismatch"), "{err}");
    assert!(!env
        .blobs()
        .contains(&env.busybox_layers[0][7..].to_string()));
    // The store still works: the old image is there and a good pull succeeds.
    std::fs::write(&file, &good).unwrap();
    ok(
        &env.user(&["pull", "-q", &env.busybox]),
        "pull after repair",
    );
    let list = env.images_json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[1]["reference"], tiny);
}

#[test]
fn pull_rejects_a_truncated_blob() {
    let Some(env) = Env::new() else { return };
    env.pull_tiny();
    let file = env.reg.blob_file(&env.busybox_layers[0]);
    let good = std::fs::read(&file).unwrap();
    std::fs::write(&file, &good[..good.len() / 3]).unwrap();
    let err = env.pull_fails_cleanly(&env.busybox);
    assert!(err.contains("size mismatch"), "{err}");
    std::fs::write(&file, &good).unwrap();
    ok(
        &env.user(&["pull", "-q", &env.busybox]),
        "pull after repair",
    );
}

#[test]
fn pull_rejects_an_unknown_layer_media_type() {
    let Some(env) = Env::new() else { return };
    env.pull_tiny();
    // The busybox manifest with its layer relabelled, stored under another tag.
    let layout = busybox_layout().unwrap();
    let mut manifest = layout_manifest(&layout);
    manifest["layers"][0]["mediaType"] = "application/vnd.example.unknown".into();
    let body = serde_json::to_vec(&manifest).unwrap();
    let client = rootfs_builder::registry::Client::new(
        &env.reg.host(),
        "test/busybox",
        &rootfs_builder::registry::PullOptions::default(),
        true,
    );
    client
        .put_manifest("odd", "application/vnd.oci.image.manifest.v1+json", &body)
        .unwrap();
    let err = env.pull_fails_cleanly(&format!("{}:odd", env.busybox));
    assert!(err.contains("unsupported layer media type"), "{err}");
}

#[test]
fn pull_of_a_missing_tag_fails_with_one_line() {
    let Some(env) = Env::new() else { return };
    env.pull_tiny();
    let err = env.pull_fails_cleanly(&format!("{}:no-such-tag", env.busybox));
    assert!(err.contains("not found"), "{err}");
    let err = env.pull_fails_cleanly(&format!("{}/test/no-such-repo", env.reg.host()));
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn pull_when_the_registry_is_down_fails_with_one_line() {
    let Some(mut env) = Env::new() else { return };
    env.pull_tiny();
    env.reg.stop();
    let err = env.pull_fails_cleanly(&env.busybox);
    assert!(err.contains("is not reachable"), "{err}");
}

#[test]
fn pull_killed_midway_completes_when_run_again() {
    let Some(env) = Env::new() else { return };
    // One 6 MB layer of noise (gzip cannot shrink it), sent at 1 MB/s through a proxy.
    let mut noise = vec![0u8; 6 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x.to_le_bytes()[0];
    }
    let layout = env.dir.path().join("big-oci");
    let mut w = OciLayoutWriter::new(&layout).unwrap();
    let big = w
        .add_layer_entries(&[LayerEntry::File("noise".into(), 0o644, noise)])
        .unwrap();
    w.finish(&ImageConfig::default(), "latest").unwrap();
    env.publish(&layout, &format!("{}/test/big", env.reg.host()));
    let proxy = Throttle::start(&env.reg.host(), 1 << 20);
    let name = format!("{}/test/big", proxy.host());

    let mut child = Command::new(MVM)
        .arg("--root")
        .arg(&env.user)
        .args(["pull", &name])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("pull ended before reporting progress: {seen}");
        }
        seen.push_str(&line);
        if line.contains("downloading") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    assert!(
        proxy.forwarded.load(std::sync::atomic::Ordering::Relaxed) < 6 << 20,
        "the download was not interrupted"
    );
    let hex = &big.descriptor.digest[7..];
    assert!(
        !env.blobs().contains(&hex.to_string()),
        "partial blob stored"
    );
    assert_eq!(env.images_json(), serde_json::json!([]));

    proxy.full_speed();
    let o = env.user(&["pull", "-q", &name]);
    ok(&o, "second pull");
    assert!(env.blobs().contains(&hex.to_string()));
    assert_eq!(env.images_json()[0]["reference"], format!("{name}:latest"));
    assert_eq!(env.tmp_files(), 0, "the killed pull's temp file is gone");
}

/// A docker-archive as `docker save` writes it: `manifest.json`, `<config hex>.json` and an
/// uncompressed `<id>/layer.tar` per layer.
fn docker_save(layout: &Path, out: &Path, repo_tag: &str) {
    let manifest = layout_manifest(layout);
    let blob = |d: &serde_json::Value| layout.join("blobs/sha256").join(&d.as_str().unwrap()[7..]);
    let config_digest = &manifest["config"]["digest"];
    let mut tar = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    };
    let config_name = format!("{}.json", &config_digest.as_str().unwrap()[7..]);
    add(&config_name, &std::fs::read(blob(config_digest)).unwrap());
    let mut layers = Vec::new();
    for (i, layer) in manifest["layers"].as_array().unwrap().iter().enumerate() {
        let mut gz =
            flate2::read::GzDecoder::new(std::fs::File::open(blob(&layer["digest"])).unwrap());
        let mut plain = Vec::new();
        gz.read_to_end(&mut plain).unwrap();
        let name = format!("layer{i}/layer.tar");
        add(&name, &plain);
        layers.push(name);
    }
    let m = serde_json::json!([{"Config": config_name, "RepoTags": [repo_tag], "Layers": layers}]);
    add("manifest.json", &serde_json::to_vec(&m).unwrap());
    tar.into_inner().unwrap().flush().unwrap();
}

#[test]
fn load_of_a_docker_save_archive_then_run_it() {
    let Some(layout) = busybox_layout() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("busybox.tar");
    docker_save(&layout, &archive, "mvm-test/busybox:saved");
    let root = dir.path().join("user");
    let o = mvm(&root, &["load", "-i", archive.to_str().unwrap()]);
    assert_eq!(ok(&o, "load"), "Loaded image: mvm-test/busybox:saved\n");
    let images = ok(&mvm(&root, &["images"]), "images");
    assert!(
        images.contains("mvm-test/busybox") && images.contains("saved"),
        "{images}"
    );
    // Loading the same archive again changes nothing; a corrupt one is refused.
    ok(
        &mvm(&root, &["load", "-i", archive.to_str().unwrap()]),
        "load again",
    );
    let mut data = std::fs::read(&archive).unwrap();
    let at = data.len() / 2;
    data[at] ^= 0xff;
    let corrupt = dir.path().join("corrupt.tar");
    std::fs::write(&corrupt, &data).unwrap();
    let o = mvm(
        &root,
        &["load", "-i", corrupt.to_str().unwrap(), "-t", "other"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr).trim_end().lines().count(), 1);
    assert_eq!(ok(&mvm(&root, &["images"]), "images"), images);
    if !is_root() {
        return;
    }
    let o = run_rm(&root, &[], "mvm-test/busybox:saved", &["echo", "loaded"]);
    assert_eq!(ok(&o, "run"), "loaded\n");
}
