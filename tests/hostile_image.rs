//! A hostile image, built as an attacker would: a setuid-root copy of busybox, a file with
//! capabilities (`security.capability`), the host's root disk as a block device node and
//! `/dev/mem` as a character node. mvm loads it and runs it in a container; afterwards another
//! host user (uid 65534, no groups) can reach none of it: not the cache, not the setuid binary,
//! and no device node exists anywhere under mvm's root. A decompression bomb and a layer over
//! the size limit are refused at `mvm load` with one line, and the store stays as it was.
//!
//! The root is put in a directory every user can traverse (as `/var/lib` is), so only mvm's own
//! modes protect it. Needs root, a static /bin/busybox and setpriv(1); skips with the reason.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rootfs_builder::oci_writer::{ImageConfig, LayerEntry, OciLayoutWriter};

const MVM: &str = env!("CARGO_BIN_EXE_mvm");
const NOBODY: &str = "65534";

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

/// Why this host cannot run the tests, if it cannot.
fn missing() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("loading and running images as the store's owner needs root");
    }
    let is_static = Command::new("ldd")
        .arg("/bin/busybox")
        .output()
        .map(|o| !o.status.success() || text(&o.stdout).contains("not a dynamic"))
        .unwrap_or(false);
    if !Path::new("/bin/busybox").exists() || !is_static {
        return Some("needs a static /bin/busybox (apt-get install busybox-static)");
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        return Some("needs setpriv (util-linux) to act as another user");
    }
    None
}

/// Runs `program args` as uid and gid 65534 with no supplementary groups. The program is
/// started by a shell that already runs as that user: setpriv keeps root's capabilities until
/// its own execve, which would otherwise find the program through directories uid 65534 cannot
/// search.
fn as_nobody(program: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
            "/bin/sh",
            "-c",
            "exec \"$0\" \"$@\"",
        ])
        .arg(program)
        .args(args)
        .output()
        .unwrap()
}

/// A directory like /var/lib: any user may traverse it, so mvm's modes alone protect the root.
fn open_parent() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// `security.capability` for cap_net_raw, effective and permitted (VFS_CAP_REVISION_2).
fn net_raw_capability() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes());
    v.extend_from_slice(&(1u32 << 13).to_le_bytes());
    v.extend_from_slice(&[0; 12]);
    v
}

/// The major and minor numbers of the device holding the host's `/`.
fn host_root_disk() -> (u32, u32) {
    let dev = std::fs::metadata("/").unwrap().dev();
    (libc::major(dev), libc::minor(dev))
}

fn hostile_layout(dir: &Path) -> PathBuf {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let (major, minor) = host_root_disk();
    let out = dir.join("hostile-oci");
    let mut w = OciLayoutWriter::new(&out).unwrap();
    w.add_layer_entries(&[
        LayerEntry::Dir("bin".into(), 0o755),
        LayerEntry::File("bin/busybox".into(), 0o755, busybox.clone()),
        LayerEntry::Symlink("bin/sh".into(), "busybox".into()),
        LayerEntry::Symlink("bin/true".into(), "busybox".into()),
        LayerEntry::Symlink("bin/id".into(), "busybox".into()),
        LayerEntry::File("bin/rootshell".into(), 0o4755, busybox.clone()),
        LayerEntry::FileWithXattrs(
            "bin/capped".into(),
            0o755,
            busybox,
            vec![("security.capability".into(), net_raw_capability())],
        ),
        LayerEntry::Dir("dev".into(), 0o755),
        LayerEntry::Device("dev/hostdisk".into(), true, 0o666, major, minor),
        LayerEntry::Device("dev/mem".into(), false, 0o666, 1, 1),
        LayerEntry::Dir("etc".into(), 0o755),
        LayerEntry::File(
            "etc/passwd".into(),
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n".to_vec(),
        ),
    ])
    .unwrap();
    let config = ImageConfig {
        cmd: vec!["/bin/sh".into()],
        ..Default::default()
    };
    w.finish(&config, "latest").unwrap();
    out
}

/// Every path under `root`, with its metadata (symlinks not followed).
fn walk(root: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let meta = p.symlink_metadata().unwrap();
            if meta.is_dir() {
                stack.push(p.clone());
            }
            out.push((p, meta));
        }
    }
    out
}

fn mode(meta: &std::fs::Metadata) -> u32 {
    meta.permissions().mode() & 0o7777
}

#[test]
fn a_hostile_image_gives_other_host_users_nothing() {
    if let Some(why) = missing() {
        eprintln!("skipping: {why}");
        return;
    }
    let parent = open_parent();
    let root = parent.path().join("mvm");
    let layout = hostile_layout(parent.path());
    ok(
        &mvm(
            &root,
            &["load", "-i", layout.to_str().unwrap(), "-t", "hostile:1"],
        ),
        "load",
    );
    let o = mvm(
        &root,
        &[
            "run",
            "--isolation",
            "container",
            "--rm",
            "--image",
            "hostile:1",
            "--",
            "true",
        ],
    );
    ok(&o, "run");
    // The user is told, in one line, that the image's device nodes were not created.
    let warning: Vec<String> = text(&o.stderr)
        .lines()
        .filter(|l| l.contains("are not created"))
        .map(str::to_string)
        .collect();
    assert_eq!(warning.len(), 1, "{}", text(&o.stderr));
    assert!(
        warning[0].contains("/dev/mem (char 1:1)") && warning[0].contains("(block "),
        "{warning:?}"
    );

    // The image is unpacked under cache/rootfs, set-id bit and capabilities kept for the
    // container, and its device nodes only listed.
    let cache = root.join("cache/rootfs");
    let tree = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .expect("an unpacked image");
    let shell = tree.join("bin/rootshell");
    let shell_meta = std::fs::metadata(&shell).unwrap();
    assert_eq!((mode(&shell_meta), shell_meta.uid()), (0o4755, 0));
    let capped = std::ffi::CString::new(tree.join("bin/capped").to_str().unwrap()).unwrap();
    let mut value = [0u8; 64];
    // SAFETY: both pointers are valid for the lengths given; the name is NUL-terminated.
    let n = unsafe {
        libc::lgetxattr(
            capped.as_ptr(),
            c"security.capability".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    assert_eq!(
        usize::try_from(n).ok(),
        Some(20),
        "capabilities kept: {}",
        std::io::Error::last_os_error()
    );
    let nodes = rootfs_builder::rootfs::device_nodes(&tree).unwrap();
    let listed: Vec<&str> = nodes.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(listed, ["/dev/hostdisk", "/dev/mem"]);
    assert_eq!((nodes[0].major, nodes[0].minor), host_root_disk());

    // Another user gets nowhere: not into the cache, not the setuid binary.
    let stat = as_nobody(Path::new("/usr/bin/stat"), &[cache.to_str().unwrap()]);
    assert!(!stat.status.success(), "uid 65534 can stat into the cache");
    assert!(text(&stat.stderr).contains("Permission denied"), "{stat:?}");
    let ls = as_nobody(Path::new("/bin/ls"), &[root.to_str().unwrap()]);
    assert!(!ls.status.success(), "uid 65534 can list the root");
    let exec = as_nobody(&shell, &[]);
    assert!(
        exec.status.code() == Some(126) && text(&exec.stderr).contains("Permission denied"),
        "uid 65534 could execute the image's setuid-root binary: {exec:?}"
    );
    let who = as_nobody(Path::new("/usr/bin/id"), &["-u"]);
    assert_eq!(
        text(&who.stdout).trim(),
        NOBODY,
        "the check runs as uid 65534"
    );

    // No device node anywhere under the root; mvm's own directories are 0700/0710 and its
    // files 0600 (the unpacked tree keeps the image's modes, behind them).
    let root_meta = std::fs::metadata(&root).unwrap();
    assert_eq!(mode(&root_meta), 0o710);
    for (path, meta) in walk(&root) {
        let ft = meta.file_type();
        assert!(
            !ft.is_block_device() && !ft.is_char_device(),
            "device node on the host: {}",
            path.display()
        );
        if path.starts_with(&tree) {
            continue;
        }
        if ft.is_dir() {
            assert!(
                [0o700, 0o710].contains(&mode(&meta)),
                "{} is {:o}",
                path.display(),
                mode(&meta)
            );
        } else if ft.is_file() {
            assert_eq!(mode(&meta), 0o600, "{}", path.display());
        }
    }
}

/// `mvm images --format json`.
fn images(root: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&mvm(root, &["images", "--format", "json"]), "images")).unwrap()
}

fn blobs(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("images/blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Loading `layout` fails with one line containing `expect`, and the store is as it was.
fn load_is_refused(root: &Path, layout: &Path, expect: &str) {
    let (before, blobs_before) = (images(root), blobs(root));
    let o = mvm(
        root,
        &["load", "-i", layout.to_str().unwrap(), "-t", "bad:1"],
    );
    let err = text(&o.stderr);
    assert!(!o.status.success(), "load succeeded: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("mvm: ") && err.contains(expect), "{err}");
    assert_eq!(images(root), before, "mvm images changed");
    assert_eq!(blobs(root), blobs_before, "blobs changed");
    let tmp = std::fs::read_dir(root.join("images/tmp")).unwrap().count();
    assert_eq!(tmp, 0, "temp files left");
}

#[test]
fn layer_limits_refuse_a_bomb_and_an_oversized_layer_with_one_line() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: the store's modes are checked for root");
        return;
    }
    let dir = open_parent();
    let root = dir.path().join("mvm");
    let tiny = dir.path().join("tiny-oci");
    let mut w = OciLayoutWriter::new(&tiny).unwrap();
    w.add_layer_entries(&[LayerEntry::File("hello".into(), 0o644, b"hi".to_vec())])
        .unwrap();
    w.finish(&ImageConfig::default(), "latest").unwrap();
    ok(
        &mvm(
            &root,
            &["load", "-i", tiny.to_str().unwrap(), "-t", "tiny:1"],
        ),
        "load tiny",
    );

    // 64 MiB of zeros gzip to about 64 KiB: a thousand times, where real layers stay far
    // below a hundred.
    let bomb = dir.path().join("bomb-oci");
    let mut w = OciLayoutWriter::new(&bomb).unwrap();
    w.add_layer_entries(&[LayerEntry::File("zeros".into(), 0o644, vec![0u8; 64 << 20])])
        .unwrap();
    w.finish(&ImageConfig::default(), "latest").unwrap();
    load_is_refused(&root, &bomb, "decompression bomb");

    // A manifest that announces a 9 GiB layer is refused before anything is read.
    let big = dir.path().join("big-oci");
    let mut w = OciLayoutWriter::new(&big).unwrap();
    w.add_layer_entries(&[LayerEntry::File("f".into(), 0o644, b"x".to_vec())])
        .unwrap();
    let desc = w.finish(&ImageConfig::default(), "latest").unwrap();
    let blob = |d: &str| big.join("blobs/sha256").join(&d[7..]);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&desc.digest)).unwrap()).unwrap();
    manifest["layers"][0]["size"] = (9u64 << 30).into();
    let body = serde_json::to_vec(&manifest).unwrap();
    let digest = rootfs_builder::digest::Digest::of_bytes(&body).to_string();
    std::fs::write(blob(&digest), &body).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest, "size": body.len()}]});
    std::fs::write(big.join("index.json"), index.to_string()).unwrap();
    load_is_refused(&root, &big, "over the limit");

    assert_eq!(images(&root).as_array().unwrap().len(), 1);
}
