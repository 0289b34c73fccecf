//! Unit tests for the layer unpacker: hostile archives built byte by byte with `tar`'s header API.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use super::apply::{Applier, ApplyError};
use super::*;
use crate::limits::{LayerLimits, LimitError};

/// One archive entry, written with raw names so hostile paths survive `tar`'s own checks.
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    Link(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Fifo(&'a str),
    Char(&'a str, u32, u32),
    Block(&'a str, u32, u32),
}

fn tar_bytes(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let (name, link, data, kind, mode): (&str, &str, &[u8], tar::EntryType, u32) = match e {
            E::Dir(n, m) => (n, "", b"", tar::EntryType::Directory, *m),
            E::File(n, d, m) => (n, "", d, tar::EntryType::Regular, *m),
            E::Link(n, t) => (n, t, b"", tar::EntryType::Symlink, 0o777),
            E::Hard(n, t) => (n, t, b"", tar::EntryType::Link, 0o644),
            E::Fifo(n) => (n, "", b"", tar::EntryType::Fifo, 0o644),
            E::Char(n, _, _) => (n, "", b"", tar::EntryType::Char, 0o666),
            E::Block(n, _, _) => (n, "", b"", tar::EntryType::Block, 0o660),
        };
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_000_000);
        h.set_uid(1234);
        h.set_gid(4321);
        if let E::Char(_, major, minor) | E::Block(_, major, minor) = e {
            h.set_device_major(*major).unwrap();
            h.set_device_minor(*minor).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
    outside: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_path_buf();
    let root = base.join("root");
    let outside = base.join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"host data").unwrap();
    Fixture {
        _tmp: tmp,
        base,
        root,
        outside,
    }
}

impl Fixture {
    fn layer(&self, name: &str, entries: &[E<'_>]) -> PathBuf {
        let path = self.base.join(name);
        fs::write(&path, tar_bytes(entries)).unwrap();
        path
    }

    fn apply(&self, entries: &[E<'_>]) -> Result<UnpackStats, UnpackError> {
        let layer = self.layer("layer.tar", entries);
        apply_layer(&self.root, &layer, LayerMediaType::Tar)
    }

    fn apply_walk(&self, entries: &[E<'_>]) -> Result<UnpackStats, UnpackError> {
        let layer = self.layer("layer.tar", entries);
        let root_fd = open_root(&self.root).unwrap();
        let mut applier = Applier::new(root_fd.as_fd(), false);
        applier
            .apply(File::open(layer).unwrap())
            .map_err(|e| match e {
                ApplyError::Archive(e) => panic!("archive error {e}"),
                ApplyError::Limit(e) => panic!("limit {e}"),
                ApplyError::Unpack(e) => e,
            })
    }

    /// The host side stays as the fixture made it: only `secret`, unchanged.
    fn assert_outside_untouched(&self) {
        let mut names: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["secret"]);
        assert_eq!(fs::read(self.outside.join("secret")).unwrap(), b"host data");
        let mut top: Vec<_> = fs::read_dir(&self.base)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.ends_with(".tar"))
            .collect();
        top.sort();
        assert_eq!(top, ["outside", "root"]);
    }
}

fn assert_escape(result: Result<UnpackStats, UnpackError>, entry: &str) {
    match result {
        Err(UnpackError::Escape { entry: e, reason }) => {
            assert_eq!(e, entry, "reason: {reason}");
            let msg = UnpackError::Escape { entry: e, reason }.to_string();
            assert!(!msg.contains('\n'), "{msg}");
        }
        other => panic!("expected escape for {entry}, got {other:?}"),
    }
}

#[test]
fn dotdot_that_leaves_the_root_is_refused() {
    let f = fixture();
    assert_escape(f.apply(&[E::File("../evil", b"x", 0o644)]), "../evil");
    assert_escape(
        f.apply(&[E::File("a/../../evil", b"x", 0o644)]),
        "a/../../evil",
    );
    assert_escape(
        f.apply(&[E::File("./../outside/secret", b"x", 0o644)]),
        "./../outside/secret",
    );
    f.assert_outside_untouched();
    assert!(!f.root.join("a").exists());
}

#[test]
fn dotdot_that_stays_inside_is_applied_lexically() {
    let f = fixture();
    f.apply(&[E::File("a/../b", b"inside", 0o644)]).unwrap();
    assert_eq!(fs::read(f.root.join("b")).unwrap(), b"inside");
}

#[test]
fn absolute_names_are_relative_to_the_root() {
    let f = fixture();
    let name = format!("{}/abs", f.outside.display());
    f.apply(&[E::File(&name, b"in root", 0o644)]).unwrap();
    let inside = f
        .root
        .join(f.outside.strip_prefix("/").unwrap())
        .join("abs");
    assert_eq!(fs::read(inside).unwrap(), b"in root");
    f.assert_outside_untouched();
}

#[test]
fn writing_through_an_absolute_symlink_is_refused() {
    let f = fixture();
    let target = f.outside.to_str().unwrap();
    let r = f.apply(&[E::Link("a", target), E::File("a/passwd", b"pwned", 0o644)]);
    assert_escape(r, "a/passwd");
    let r = f.apply(&[
        E::Link("etc", "/etc"),
        E::File("etc/mvm-unpack-test", b"x", 0o644),
    ]);
    assert_escape(r, "etc/mvm-unpack-test");
    assert!(!Path::new("/etc/mvm-unpack-test").exists());
    f.assert_outside_untouched();
}

#[test]
fn writing_through_a_relative_symlink_that_climbs_out_is_refused() {
    let f = fixture();
    let r = f.apply(&[
        E::Dir("d", 0o755),
        E::Link("d/up", "../../outside"),
        E::File("d/up/secret", b"pwned", 0o644),
    ]);
    assert_escape(r, "d/up/secret");
    let r = f.apply(&[E::Link("x", "../outside"), E::Dir("x/newdir", 0o755)]);
    assert_escape(r, "x/newdir");
    f.assert_outside_untouched();
}

#[test]
fn symlinks_inside_the_root_are_followed_for_parents() {
    let f = fixture();
    f.apply(&[
        E::Dir("usr", 0o755),
        E::Dir("usr/lib", 0o755),
        E::Link("lib", "usr/lib"),
        E::File("lib/libx.so", b"elf", 0o644),
    ])
    .unwrap();
    assert_eq!(fs::read(f.root.join("usr/lib/libx.so")).unwrap(), b"elf");
    assert!(f
        .root
        .join("lib")
        .symlink_metadata()
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn the_fallback_walk_refuses_every_symlink_in_a_parent() {
    let f = fixture();
    let r = f.apply_walk(&[
        E::Dir("usr", 0o755),
        E::Link("lib", "usr"),
        E::File("lib/x", b"x", 0o644),
    ]);
    assert_escape(r, "lib/x");
    let r = f.apply_walk(&[
        E::Link("a", f.outside.to_str().unwrap()),
        E::File("a/s", b"x", 0o644),
    ]);
    assert_escape(r, "a/s");
    f.apply_walk(&[E::File("deep/er/file", b"ok", 0o644)])
        .unwrap();
    assert_eq!(fs::read(f.root.join("deep/er/file")).unwrap(), b"ok");
    f.assert_outside_untouched();
}

#[test]
fn a_symlink_is_replaced_not_followed() {
    let f = fixture();
    let secret = f.outside.join("secret");
    let outside = f.outside.to_str().unwrap();
    f.apply(&[
        E::Link("file", secret.to_str().unwrap()),
        E::File("file", b"replaced", 0o644),
        E::Link("dir", outside),
        E::Dir("dir", 0o755),
        E::File("dir/secret", b"in root", 0o644),
    ])
    .unwrap();
    assert!(f.root.join("file").symlink_metadata().unwrap().is_file());
    assert_eq!(fs::read(f.root.join("file")).unwrap(), b"replaced");
    assert!(f.root.join("dir").symlink_metadata().unwrap().is_dir());
    assert_eq!(fs::read(f.root.join("dir/secret")).unwrap(), b"in root");
    f.assert_outside_untouched();
}

#[test]
fn symlink_targets_are_stored_as_is() {
    let f = fixture();
    f.apply(&[
        E::Link("bin/sh", "/bin/busybox"),
        E::Link("up", "../../../etc"),
    ])
    .unwrap();
    assert_eq!(
        fs::read_link(f.root.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(
        fs::read_link(f.root.join("up")).unwrap(),
        Path::new("../../../etc")
    );
}

#[test]
fn hard_links_outside_the_root_are_refused() {
    let f = fixture();
    assert_escape(f.apply(&[E::Hard("h", "../outside/secret")]), "h");
    let outside = f.outside.to_str().unwrap();
    assert_escape(
        f.apply(&[E::Link("s", outside), E::Hard("h2", "s/secret")]),
        "h2",
    );
    // An absolute target names a path in the root, which does not hold /etc/passwd.
    match f.apply(&[E::Hard("h3", "/etc/passwd")]) {
        Err(UnpackError::BadEntry { entry, .. }) => assert_eq!(entry, "h3"),
        other => panic!("expected a bad entry, got {other:?}"),
    }
    for name in ["h", "h2", "h3"] {
        assert!(
            f.root.join(name).symlink_metadata().is_err(),
            "{name} was written"
        );
    }
    assert_eq!(fs::metadata(f.outside.join("secret")).unwrap().nlink(), 1);
    f.assert_outside_untouched();
}

#[test]
fn hard_links_inside_the_root_share_the_inode() {
    let f = fixture();
    let stats = f
        .apply(&[E::File("bin/a", b"data", 0o755), E::Hard("bin/b", "bin/a")])
        .unwrap();
    assert_eq!(stats.hardlinks, 1);
    let a = fs::metadata(f.root.join("bin/a")).unwrap();
    let b = fs::metadata(f.root.join("bin/b")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
}

#[test]
fn whiteouts_remove_lower_entries_and_cannot_name_dot_dot() {
    let f = fixture();
    f.apply(&[
        E::File("d/a", b"a", 0o644),
        E::File("d/b", b"b", 0o644),
        E::File("x/y", b"y", 0o644),
    ])
    .unwrap();
    let stats = f
        .apply(&[E::File("d/.wh.a", b"", 0o644), E::File(".wh.x", b"", 0o644)])
        .unwrap();
    assert_eq!(stats.whiteouts, 2);
    assert!(!f.root.join("d/a").exists());
    assert!(!f.root.join("x").exists());
    assert!(!f.root.join("d/.wh.a").exists());
    assert_eq!(fs::read(f.root.join("d/b")).unwrap(), b"b");
    match f.apply(&[E::File("d/.wh..", b"", 0o644)]) {
        Err(UnpackError::BadEntry { entry, .. }) => assert_eq!(entry, "d/.wh.."),
        other => panic!("expected a bad entry, got {other:?}"),
    }
    assert!(f.root.join("d/b").exists());
}

#[test]
fn a_whiteout_does_not_follow_a_symlink_out() {
    let f = fixture();
    let outside = f.outside.to_str().unwrap();
    f.apply(&[E::Link("s", outside)]).unwrap();
    assert_escape(
        f.apply(&[E::File("s/.wh.secret", b"", 0o644)]),
        "s/.wh.secret",
    );
    // Whiting out the symlink itself removes the link, not what it points to.
    f.apply(&[E::File(".wh.s", b"", 0o644)]).unwrap();
    assert!(f.root.join("s").symlink_metadata().is_err());
    f.assert_outside_untouched();
}

#[test]
fn an_opaque_directory_hides_lower_contents_but_keeps_its_own_layer() {
    let f = fixture();
    f.apply(&[
        E::File("d/a", b"a", 0o644),
        E::File("d/sub/c", b"c", 0o644),
        E::File("d/keep/old", b"old", 0o644),
    ])
    .unwrap();
    // Same layer wrote d/new and d/keep/fresh before the marker: those stay.
    f.apply(&[
        E::File("d/new", b"n", 0o644),
        E::File("d/keep/fresh", b"f", 0o644),
        E::File("d/.wh..wh..opq", b"", 0o644),
    ])
    .unwrap();
    let mut names: Vec<_> = fs::read_dir(f.root.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["keep", "new"]);
    assert!(!f.root.join("d/keep/old").exists());
    assert!(f.root.join("d/keep/fresh").exists());
}

#[test]
fn modes_setuid_and_mtimes_are_applied_and_dirs_fixed_last() {
    let f = fixture();
    f.apply(&[
        E::Dir("d", 0o750),
        E::File("d/su", b"#!", 0o4755),
        E::File("d/ro", b"r", 0o400),
        E::Fifo("d/fifo"),
    ])
    .unwrap();
    let d = fs::metadata(f.root.join("d")).unwrap();
    assert_eq!(d.permissions().mode() & 0o7777, 0o750);
    assert_eq!(
        d.mtime(),
        1_000_000,
        "directory mtime survives its contents"
    );
    let su = fs::metadata(f.root.join("d/su")).unwrap();
    assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(su.mtime(), 1_000_000);
    assert_eq!(
        fs::metadata(f.root.join("d/ro"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o400
    );
    assert!(fs::metadata(f.root.join("d/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    if rustix::process::geteuid().is_root() {
        assert_eq!(su.uid(), 1234);
        assert_eq!(su.gid(), 4321);
        assert_eq!(d.uid(), 1234);
    }
}

/// Every path below `dir` that is a device node.
fn device_nodes_below(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let ft = p.symlink_metadata().unwrap().file_type();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_char_device() || ft.is_block_device() {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn device_nodes_are_recorded_and_never_created() {
    let f = fixture();
    let lower = f.layer(
        "lower.tar",
        &[
            E::Char("dev/null", 1, 3),
            E::Block("dev/sda", 8, 0),
            E::Hard("dev/disk", "dev/sda"),
            E::Char("opt/fuse", 10, 229),
            E::Char("gone/x", 4, 1),
            E::Fifo("run/fifo"),
        ],
    );
    // The upper layer whites one out, hides another behind an opaque directory and replaces a
    // third with a file.
    let upper = f.layer(
        "upper.tar",
        &[
            E::File("gone/.wh.x", b"", 0o644),
            E::File("opt/.wh..wh..opq", b"", 0o644),
            E::File("dev/disk", b"a file now", 0o644),
        ],
    );
    let dest = f.base.join("rootfs");
    let layers = [(lower, LayerMediaType::Tar), (upper, LayerMediaType::Tar)];
    let staged = stage_layers(&layers, &dest, &LayerLimits::default()).unwrap();
    let nodes: Vec<(String, DeviceKind, u32, u32)> = staged
        .devices
        .iter()
        .map(|d| (d.path.clone(), d.kind, d.major, d.minor))
        .collect();
    assert_eq!(
        nodes,
        [
            ("/dev/null".into(), DeviceKind::Char, 1, 3),
            ("/dev/sda".into(), DeviceKind::Block, 8, 0),
        ]
    );
    assert_eq!(
        (staged.devices[1].mode, staged.devices[1].uid),
        (0o660, 1234)
    );
    assert_eq!(staged.stats.devices, 5);
    staged.publish().unwrap();
    assert_eq!(device_nodes_below(&dest), Vec::<PathBuf>::new());
    assert!(!dest.join("dev/null").exists());
    assert_eq!(fs::read(dest.join("dev/disk")).unwrap(), b"a file now");
    let fifo = dest.join("run/fifo").symlink_metadata().unwrap();
    assert!(fifo.file_type().is_fifo(), "fifos are not devices and stay");
}

/// A gzip layer holding one file of `size` zero bytes.
fn zeros_layer(f: &Fixture, size: usize) -> PathBuf {
    let tar = tar_bytes(&[E::File("zeros", &vec![0u8; size], 0o644)]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let path = f.base.join("zeros-gz.tar");
    fs::write(&path, gz.finish().unwrap()).unwrap();
    path
}

#[test]
fn a_decompression_bomb_is_refused_and_nothing_is_published() {
    let f = fixture();
    // 64 MiB of zeros is about 64 KiB of gzip: 1000 times, past the 16 MiB anything may take.
    let bomb = zeros_layer(&f, 64 << 20);
    let limits = LayerLimits::default();
    let err = check_layer(&bomb, LayerMediaType::TarGzip, &limits).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::Limit {
                source: LimitError::Ratio { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let dest = f.base.join("rootfs");
    let err = unpack_layers(&[(bomb, LayerMediaType::TarGzip)], &dest).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::Limit {
                source: LimitError::Ratio { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        chain.contains("decompression bomb") && !chain.contains('\n'),
        "{chain}"
    );
    assert!(!dest.exists());
    f.assert_outside_untouched();
    // Zeros within the free allowance are fine.
    let small = zeros_layer(&f, 8 << 20);
    check_layer(&small, LayerMediaType::TarGzip, &limits).unwrap();
}

#[test]
fn too_many_entries_or_too_large_a_blob_is_refused() {
    let f = fixture();
    let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let entries: Vec<E<'_>> = names.iter().map(|n| E::File(n, b"", 0o644)).collect();
    let layer = f.layer("many.tar", &entries);
    let few = LayerLimits {
        entries: 49,
        ..LayerLimits::default()
    };
    let err = check_layer(&layer, LayerMediaType::Tar, &few).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::Limit {
                source: LimitError::Entries { limit: 49 },
                ..
            }
        ),
        "{err:?}"
    );
    let dest = f.base.join("rootfs");
    let err = stage_layers(&[(layer.clone(), LayerMediaType::Tar)], &dest, &few).unwrap_err();
    assert!(matches!(err, UnpackError::Limit { .. }), "{err:?}");
    assert!(fs::read_dir(&f.base).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".rootfs")));
    let enough = LayerLimits {
        entries: 50,
        ..LayerLimits::default()
    };
    assert_eq!(
        check_layer(&layer, LayerMediaType::Tar, &enough)
            .unwrap()
            .entries,
        50
    );
    let tiny = LayerLimits {
        compressed: 1024,
        ..LayerLimits::default()
    };
    let err = check_layer(&layer, LayerMediaType::Tar, &tiny).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::Limit {
                source: LimitError::Compressed { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn gzip_and_multi_frame_zstd_layers_unpack() {
    let f = fixture();
    let tar = tar_bytes(&[E::File("g/file", b"gzip data", 0o644)]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let gz_path = f.base.join("l.tar.gz");
    fs::write(&gz_path, gz.finish().unwrap()).unwrap();
    apply_layer(&f.root, &gz_path, LayerMediaType::TarGzip).unwrap();
    assert_eq!(fs::read(f.root.join("g/file")).unwrap(), b"gzip data");

    let tar = tar_bytes(&[E::File("z/file", &[7u8; 300_000], 0o644)]);
    let (head, tail) = tar.split_at(100_000);
    let level = ruzstd::encoding::CompressionLevel::Fastest;
    let mut zst = ruzstd::encoding::compress_to_vec(head, level);
    zst.extend(ruzstd::encoding::compress_to_vec(tail, level));
    let zst_path = f.base.join("l.tar.zst");
    fs::write(&zst_path, zst).unwrap();
    apply_layer(&f.root, &zst_path, LayerMediaType::TarZstd).unwrap();
    assert_eq!(fs::read(f.root.join("z/file")).unwrap(), vec![7u8; 300_000]);
}

#[test]
fn media_types_parse_and_unknown_ones_are_refused() {
    assert_eq!(
        LayerMediaType::parse("application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(),
        LayerMediaType::TarGzip
    );
    for t in [
        LayerMediaType::Tar,
        LayerMediaType::TarGzip,
        LayerMediaType::TarZstd,
    ] {
        assert_eq!(LayerMediaType::parse(t.as_oci()).unwrap(), t);
    }
    let err = LayerMediaType::parse("application/vnd.oci.image.layer.v1.tar+bzip2").unwrap_err();
    assert!(err.to_string().contains("tar+bzip2"), "{err}");
}

#[test]
fn a_corrupt_layer_is_a_clear_error() {
    let f = fixture();
    let path = f.base.join("bad.tar.gz");
    fs::write(&path, b"this is not gzip").unwrap();
    let err = apply_layer(&f.root, &path, LayerMediaType::TarGzip).unwrap_err();
    assert!(matches!(err, UnpackError::BadArchive { .. }), "{err:?}");
}

#[test]
fn unpack_layers_is_all_or_nothing() {
    let f = fixture();
    let good = f.layer("good.tar", &[E::File("etc/hostname", b"mvm", 0o644)]);
    let evil = f.layer("evil.tar", &[E::File("../escape", b"x", 0o644)]);
    let dest = f.base.join("rootfs");
    let layers = [
        (good.clone(), LayerMediaType::Tar),
        (evil, LayerMediaType::Tar),
    ];
    assert!(unpack_layers(&layers, &dest).is_err());
    assert!(!dest.exists());
    f.assert_outside_untouched();
    // No temporary directory is left next to the destination either.
    assert!(fs::read_dir(&f.base).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".rootfs")));

    let stats = unpack_layers(&[(good.clone(), LayerMediaType::Tar)], &dest).unwrap();
    assert_eq!(stats.files, 1);
    assert_eq!(fs::read(dest.join("etc/hostname")).unwrap(), b"mvm");
    let again = unpack_layers(&[(good, LayerMediaType::Tar)], &dest);
    assert!(
        matches!(again, Err(UnpackError::DestinationExists(_))),
        "{again:?}"
    );
}

#[test]
fn a_directory_swapped_for_an_escaping_symlink_is_not_written_through() {
    let f = fixture();
    let outside = f.outside.to_str().unwrap();
    let r = f.apply(&[
        E::Dir("a", 0o755),
        E::File("a/inner", b"x", 0o644),
        E::Link("a", outside),
        E::File("a/secret", b"pwned", 0o644),
    ]);
    assert_escape(r, "a/secret");
    f.assert_outside_untouched();
}

#[test]
fn a_hard_link_to_an_escaping_symlink_links_the_symlink_itself() {
    let f = fixture();
    let secret = f.outside.join("secret");
    f.apply(&[E::Link("s", secret.to_str().unwrap()), E::Hard("h", "s")])
        .unwrap();
    let h = f.root.join("h").symlink_metadata().unwrap();
    assert!(h.file_type().is_symlink());
    assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1);
    f.assert_outside_untouched();
}

#[test]
fn long_names_and_the_root_entry_are_applied() {
    let f = fixture();
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(150));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o711);
    h.set_size(0);
    h.set_mtime(42);
    h.set_cksum();
    b.append_data(&mut h, "./", std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, &long, &b"long"[..]).unwrap();
    let layer = f.base.join("long.tar");
    fs::write(&layer, b.into_inner().unwrap()).unwrap();
    apply_layer(&f.root, &layer, LayerMediaType::Tar).unwrap();
    assert_eq!(fs::read(f.root.join(&long)).unwrap(), b"long");
    let root = fs::metadata(&f.root).unwrap();
    assert_eq!(root.permissions().mode() & 0o7777, 0o711);
    assert_eq!(root.mtime(), 42);
}

fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len += 1;
    }
    format!("{len}{body}")
}

#[test]
fn pax_xattrs_uid_and_mtime_are_applied_as_root() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping: xattrs and ownership are applied only as root");
        return;
    }
    let f = fixture();
    let mut b = tar::Builder::new(Vec::new());
    let pax = pax_record("SCHILY.xattr.user.mvm", "yes")
        + &pax_record("uid", "70000")
        + &pax_record("mtime", "1234.5");
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_size(pax.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "PaxHeaders/file", pax.as_bytes())
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_mtime(1);
    h.set_cksum();
    b.append_data(&mut h, "file", &b"x"[..]).unwrap();
    let layer = f.base.join("pax.tar");
    fs::write(&layer, b.into_inner().unwrap()).unwrap();
    apply_layer(&f.root, &layer, LayerMediaType::Tar).unwrap();
    let meta = fs::metadata(f.root.join("file")).unwrap();
    assert_eq!(meta.uid(), 70000);
    assert_eq!(meta.mtime(), 1234);
    let mut buf = [0u8; 16];
    match rustix::fs::getxattr(f.root.join("file"), "user.mvm", &mut buf[..]) {
        Ok(n) => assert_eq!(&buf[..n], b"yes"),
        Err(e) => eprintln!("filesystem without user xattrs ({e}); ownership and mtime checked"),
    }
}
