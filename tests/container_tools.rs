//! The everyday commands around a running container on the host, as a docker user reaches for
//! them: `cp` both ways (a tree with a symbolic link, an executable and a nested directory; a
//! link that leads out of the container is not followed), `stats` (memory within 10% of what the
//! container allocated), `top`, `wait`, `rename`, `ps` filters and JSON, the /etc files a
//! container gets (`--dns`, `--add-host`, `--no-hosts`, `--dns none`), and a log flood that
//! stays within `--log-opt` while `logs` still ends with the newest line.
//!
//! tests/vm_tools.rs does the same through the guest agent of a microVM.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::container::{fixture, stderr, stdout, unique, Fixture};
use common::MVM;

fn mvm(f: &Fixture, args: &[&str]) -> Output {
    std::process::Command::new(MVM)
        .arg("--root")
        .arg(&f.state)
        .args(args)
        .output()
        .unwrap()
}

fn ok(f: &Fixture, args: &[&str]) -> String {
    let out = mvm(f, args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stdout(&out)
}

/// A detached container running `sleep 1000`.
fn detached(f: &Fixture, name: &str, flags: &[&str]) {
    let mut all = vec!["-d", "--name", name];
    all.extend_from_slice(flags);
    let out = f.run(&all, &["sleep", "1000"]);
    assert!(out.status.success(), "run -d: {}", stderr(&out));
}

/// A tree with a nested directory, an executable, a symbolic link and an old time.
fn tree(at: &Path) {
    std::fs::create_dir_all(at.join("nested/deeper")).unwrap();
    std::fs::write(at.join("nested/deeper/data.txt"), b"deep data\n").unwrap();
    std::fs::write(at.join("tool.sh"), b"#!/bin/sh\necho tool ran\n").unwrap();
    std::fs::set_permissions(at.join("tool.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("nested/deeper/data.txt", at.join("link")).unwrap();
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    std::fs::File::options()
        .write(true)
        .open(at.join("nested/deeper/data.txt"))
        .unwrap()
        .set_modified(old)
        .unwrap();
}

/// What a tree holds: each path with its kind, mode, mtime and content or link target.
fn describe(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let what = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {:o}", m.mode() & 0o7777)
            } else {
                format!(
                    "file {:o} {} {:?}",
                    m.mode() & 0o7777,
                    m.mtime(),
                    std::fs::read_to_string(&p).unwrap()
                )
            };
            out.push(format!("{rel}: {what}"));
        }
    }
    out.sort();
    out
}

#[test]
fn cp_round_trips_a_tree_and_never_follows_a_link_out_of_the_container() {
    let Some(f) = fixture() else { return };
    let name = unique("cp");
    detached(&f, &name, &[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    tree(&src);

    ok(
        &f,
        &["cp", src.to_str().unwrap(), &format!("{name}:/copied")],
    );
    // Inside, the tree works as it is: the executable runs, the link resolves.
    let inside = ok(
        &f,
        &[
            "exec",
            &name,
            "sh",
            "-c",
            "/copied/tool.sh; cat /copied/link",
        ],
    );
    assert_eq!(inside, "tool ran\ndeep data\n");
    let back = dir.path().join("back");
    ok(
        &f,
        &["cp", &format!("{name}:/copied"), back.to_str().unwrap()],
    );
    assert_eq!(describe(&back), describe(&src));

    // Links the container made that lead to the host's directory are resolved inside it.
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let script = format!(
        "mkdir -p /esc && ln -s {0} /esc/abs && ln -s ../../../../../../../..{0} /esc/up",
        outside.display()
    );
    ok(&f, &["exec", &name, "sh", "-c", &script]);
    let file = src.join("tool.sh");
    for through in ["/esc/abs/", "/esc/up/pwned"] {
        let out = mvm(
            &f,
            &["cp", file.to_str().unwrap(), &format!("{name}:{through}")],
        );
        assert_eq!(out.status.code(), Some(2), "{through}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no such directory"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    // Copying a link out copies the link, not what it points at.
    ok(
        &f,
        &[
            "cp",
            &format!("{name}:/esc/abs"),
            dir.path().join("abs").to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read_link(dir.path().join("abs")).unwrap(), outside);
    // A tar stream on stdout.
    let tar = mvm(&f, &["cp", &format!("{name}:/copied/tool.sh"), "-"]);
    assert!(tar.status.success() && tar.stdout.len() >= 1024);
    ok(&f, &["rm", "-f", &name]);
}

#[test]
fn stats_top_wait_rename_and_ps() {
    let Some(f) = fixture() else { return };
    let name = unique("st");
    detached(&f, &name, &["--mem", "256M"]);
    // 48 MiB in the container's tmpfs: its memory, charged to its cgroup.
    ok(
        &f,
        &[
            "exec",
            &name,
            "sh",
            "-c",
            "dd if=/dev/zero of=/dev/shm/blob bs=1M count=48 2>/dev/null",
        ],
    );
    let json = ok(&f, &["stats", "--no-stream", "--format", "json", &name]);
    let s: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let used = s["memory_bytes"].as_f64().unwrap();
    let allocated = f64::from(48u32 << 20);
    assert!(
        (used - allocated).abs() <= allocated * 0.1,
        "stats shows {used} bytes for {allocated} allocated: {json}"
    );
    assert_eq!(s["memory_limit"].as_u64(), Some(256 << 20));
    assert_eq!(s["pids"].as_u64(), Some(1));
    let table = ok(&f, &["stats", "--no-stream"]);
    assert!(table.starts_with("CONTAINER ID"), "{table}");
    assert!(table
        .lines()
        .any(|l| l.contains(&name) && l.contains("MiB / 256.0MiB")));

    let top = ok(&f, &["top", &name]);
    assert!(top.starts_with("UID"), "{top}");
    assert!(top.lines().any(|l| l.ends_with("sleep 1000")), "{top}");

    let renamed = unique("renamed");
    ok(&f, &["rename", &name, &renamed]);
    let ps = ok(
        &f,
        &["ps", "-f", &format!("name={renamed}"), "--format", "json"],
    );
    let row: serde_json::Value = serde_json::from_str(ps.trim()).unwrap();
    assert_eq!(
        (row["Names"].as_str(), row["State"].as_str()),
        (Some(renamed.as_str()), Some("running"))
    );
    assert!(row["Status"].as_str().unwrap().starts_with("Up "), "{row}");
    assert!(mvm(&f, &["top", &name]).status.code() == Some(2));

    // wait returns once the container exits, with its code.
    let waiter = std::process::Command::new(MVM)
        .arg("--root")
        .arg(&f.state)
        .args(["wait", &renamed])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    ok(&f, &["kill", "-s", "KILL", &renamed]);
    let out = waiter.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "137\n");
    let exited = ok(
        &f,
        &[
            "ps",
            "-q",
            "-f",
            "status=exited",
            "-f",
            &format!("name={renamed}"),
        ],
    );
    assert_eq!(exited.lines().count(), 1, "{exited}");
    assert!(
        ok(&f, &["ps", "-f", &format!("name={renamed}")])
            .lines()
            .count()
            == 1
    );
    ok(&f, &["rm", &renamed]);
}

#[test]
fn the_container_gets_its_name_resolvers_and_extra_hosts() {
    let Some(f) = fixture() else { return };
    let name = unique("dns");
    let out = f.run(
        &[
            "--rm",
            "--name",
            &name,
            "--dns",
            "192.0.2.53",
            "--add-host",
            "db.internal:10.9.8.7",
        ],
        &["sh", "-c", "cat /etc/resolv.conf /etc/hosts /etc/hostname"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("nameserver 192.0.2.53\n"), "{text}");
    assert!(text.contains("127.0.0.1\tlocalhost\n"), "{text}");
    assert!(text.contains(&format!("\t{name}\n")), "{text}");
    assert!(text.contains("10.9.8.7\tdb.internal\n"), "{text}");
    assert!(text.ends_with(&format!("{name}\n")), "{text}");

    // The image's own files when asked for.
    std::fs::write(f.rootfs.join("etc/hosts"), "10.0.0.1 from-the-image\n").unwrap();
    std::fs::write(f.rootfs.join("etc/resolv.conf"), "nameserver 10.0.0.2\n").unwrap();
    let out = f.run(
        &["--rm", "--no-hosts", "--dns", "none"],
        &["cat", "/etc/hosts", "/etc/resolv.conf"],
    );
    assert_eq!(
        stdout(&out),
        "10.0.0.1 from-the-image\nnameserver 10.0.0.2\n",
        "{}",
        stderr(&out)
    );
    let out = f.run(&["--rm", "--dns", "bogus"], &["true"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_log_flood_stays_within_its_files_and_logs_ends_with_the_newest_line() {
    let Some(f) = fixture() else { return };
    let name = unique("flood");
    // About 14 MB of output against 3 files of 1 MiB.
    let script = "i=0; while [ $i -lt 400000 ]; do echo \"line $i of the flood\"; i=$((i+1)); done; echo the-last-line";
    let out = f.run(
        &[
            "-d",
            "--name",
            &name,
            "--log-opt",
            "max-size=1m",
            "--log-opt",
            "max-file=3",
        ],
        &["sh", "-c", script],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    let dir = f.state.join("containers").join(&id);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut largest = 0u64;
    loop {
        let kept: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("container.log"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        largest = largest.max(kept);
        let status = ok(
            &f,
            &[
                "ps",
                "-a",
                "-q",
                "-f",
                "status=exited",
                "-f",
                &format!("name={name}"),
            ],
        );
        if !status.trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the flood never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Three files of at most 1 MiB (and one write over), whenever it was looked at.
    assert!(
        largest <= 3 * (1 << 20) + (64 << 10),
        "{largest} bytes of logs kept"
    );
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("container.log"))
        .collect();
    assert_eq!(files.len(), 3, "{files:?}");
    let logs = ok(&f, &["logs", &name]);
    assert!(logs.ends_with("line 399999 of the flood\nthe-last-line\n"));
    assert_eq!(
        ok(&f, &["logs", "--tail", "2", &name]),
        "line 399999 of the flood\nthe-last-line\n"
    );
    ok(&f, &["rm", &name]);
    assert!(!dir.exists());
}
