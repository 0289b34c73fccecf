//! Example images built from Debian packages are real: their layers unpack with mvm's unpacker
//! and the programs in them run (chroot, as root) with only what the image holds.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

use rootfs_builder::examples::{build_example, NGINX_INDEX};
use rootfs_builder::unpack::{unpack_layers, LayerMediaType};

fn can_run() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root for chroot".into());
    }
    let apt = Command::new("apt-cache")
        .args(["show", "--no-all-versions", "busybox-static"])
        .output();
    match apt {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err("apt package lists are not available".into()),
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The manifest digest and the (blob path, media type) of every layer of the layout's image.
fn layout_layers(layout: &Path) -> (String, Vec<(PathBuf, LayerMediaType)>, serde_json::Value) {
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index = json(&layout.join("index.json"));
    let desc = &index["manifests"][0];
    assert_eq!(
        desc["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
    let digest = desc["digest"].as_str().unwrap().to_string();
    let manifest = json(&blob(&digest));
    let config = json(&blob(manifest["config"]["digest"].as_str().unwrap()));
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let media_type = LayerMediaType::parse(l["mediaType"].as_str().unwrap()).unwrap();
            (blob(l["digest"].as_str().unwrap()), media_type)
        })
        .collect();
    (digest, layers, config)
}

#[test]
fn build_example_busybox_makes_an_image_whose_shell_runs() {
    if let Err(why) = can_run() {
        eprintln!("skipping: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("busybox-oci");
    let mvm = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .arg("--root")
        .arg(tmp.path().join("state"))
        .args(["build-example", "busybox", "-o"])
        .arg(&layout)
        .output()
        .unwrap();
    assert!(
        mvm.status.success(),
        "mvm build-example: {}",
        String::from_utf8_lossy(&mvm.stderr)
    );
    let (digest, layers, config) = layout_layers(&layout);
    assert!(String::from_utf8_lossy(&mvm.stdout).contains(&digest));
    assert_eq!(config["config"]["Cmd"][0], "sh");
    assert_eq!(layers.len(), 1);

    let rootfs = tmp.path().join("rootfs");
    unpack_layers(&layers, &rootfs).unwrap();
    let out = Command::new("chroot")
        .arg(&rootfs)
        .args(["/bin/sh", "-c", "echo hi; ls /bin/busybox"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n/bin/busybox\n");

    // Same packages, same digests: a rebuild (from the cached .debs) is bit-identical.
    let again = build_example("busybox", &tmp.path().join("state/cache")).unwrap();
    assert_eq!(layout_layers(&again).0, digest);
}

#[test]
fn build_example_nginx_makes_an_image_that_serves_its_page() {
    if let Err(why) = can_run() {
        eprintln!("skipping: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = build_example("nginx", tmp.path()).unwrap();
    let (_, layers, config) = layout_layers(&layout);
    assert_eq!(
        config["config"]["ExposedPorts"]["80/tcp"],
        serde_json::json!({})
    );
    let rootfs = tmp.path().join("rootfs");
    unpack_layers(&layers, &rootfs).unwrap();

    // Every shared library resolves inside the image: -V makes the loader map them all.
    let v = Command::new("chroot")
        .arg(&rootfs)
        .args(["/usr/sbin/nginx", "-V"])
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "nginx -V: {}",
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(String::from_utf8_lossy(&v.stderr).contains("nginx version: nginx/"));

    // Check the config and serve the page in a private network and mount namespace.
    let root = rootfs.display();
    let script = format!(
        "set -e; ip link set lo up; mount --rbind /dev {root}/dev; mount -t proc proc {root}/proc; \
         chroot {root} /usr/sbin/nginx -t -e stderr; \
         chroot {root} /usr/sbin/nginx -e stderr & pid=$!; \
         for i in $(seq 100); do curl -sf http://127.0.0.1/ && break; sleep 0.1; done; \
         kill -QUIT $pid; wait $pid || true"
    );
    let out = Command::new("unshare")
        .args(["--mount", "--net", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("unshare failed") {
        eprintln!("skipping the serve check: {stderr}");
        return;
    }
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("test is successful"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(NGINX_INDEX),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
