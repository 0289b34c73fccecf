//! `mvm run --isolation container` end to end, on a real root filesystem made from Debian's
//! busybox-static. Needs root (namespaces, mounts, cgroups); skips with a reason otherwise.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::container::{fixture, stderr, stdout, unique, wait_for, Fixture};
use common::MVM;

/// Every directory named `name` under /sys/fs/cgroup (a few levels deep).
fn cgroup_dirs_named(name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![(PathBuf::from("/sys/fs/cgroup"), 0)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if e.file_name() == name {
                    found.push(e.path());
                }
                if depth < 6 {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    found
}

fn mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .map(|l| l.split(' ').skip(3).collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn run_prints_output_and_exits_with_the_containers_code() {
    let Some(f) = fixture() else { return };
    let o = f.run(&["--rm"], &["sh", "-c", "echo hi; exit 3"]);
    assert_eq!(stdout(&o), "hi\n", "stderr: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(3));
}

#[test]
fn run_applies_env_workdir_user_and_hostname() {
    let Some(f) = fixture() else { return };
    let o = f.run(
        &[
            "--rm",
            "-e",
            "GREETING=hello",
            "-w",
            "/srv/app",
            "--hostname",
            "box1",
            "-u",
            "app",
        ],
        &[
            "sh",
            "-c",
            "echo $GREETING $PWD $(hostname) $(id -u):$(id -g) $HOME",
        ],
    );
    assert_eq!(
        stdout(&o),
        "hello /srv/app box1 1000:1000 /home/app\n",
        "stderr: {}",
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn container_sees_itself_as_pid_1_with_its_own_hostname() {
    let Some(f) = fixture() else { return };
    let name = unique("pid1");
    let o = f.run(
        &["--rm", "--name", &name],
        &["sh", "-c", "echo $$; hostname; ls /proc | grep -c '^[0-9]'"],
    );
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "stdout: {out} stderr: {}", stderr(&o));
    assert_eq!(lines[0], "1");
    assert_eq!(lines[1], name);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert_ne!(lines[1], host.trim());
    // Only the shell and the `ls` it runs are visible.
    assert!(
        lines[2].parse::<u32>().expect("count") <= 3,
        "processes: {}",
        lines[2]
    );
}

#[test]
fn network_none_has_only_loopback_up() {
    let Some(f) = fixture() else { return };
    let o = f.run(
        &["--rm"],
        &[
            "sh",
            "-c",
            "ls /sys/class/net; cat /sys/class/net/lo/operstate /sys/class/net/lo/flags",
        ],
    );
    let out = stdout(&o);
    assert!(
        out.starts_with("lo\n"),
        "stdout: {out} stderr: {}",
        stderr(&o)
    );
    // IFF_UP is bit 0 of the flags.
    let flags = out.lines().last().expect("flags").trim_start_matches("0x");
    assert_eq!(u32::from_str_radix(flags, 16).expect("hex") & 1, 1);
}

#[test]
fn memory_limit_kills_a_process_that_exceeds_it() {
    let Some(f) = fixture() else { return };
    let o = f.run(
        &["--rm", "--mem", "16M"],
        &[
            "sh",
            "-c",
            "x=$(head -c 64000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    assert!(!stdout(&o).contains("survived"));
    assert_eq!(o.status.code(), Some(137), "stderr: {}", stderr(&o));
    assert!(
        stderr(&o).contains("out of memory"),
        "stderr: {}",
        stderr(&o)
    );
}

#[test]
fn memory_within_the_limit_is_fine() {
    let Some(f) = fixture() else { return };
    let o = f.run(
        &["--rm", "--mem", "64M"],
        &[
            "sh",
            "-c",
            "x=$(head -c 4000000 /dev/zero | tr '\\0' a); echo ${#x}",
        ],
    );
    assert_eq!(stdout(&o), "4000000\n", "stderr: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn pids_limit_stops_forks_beyond_it() {
    let Some(f) = fixture() else { return };
    let script =
        "n=0; for i in 1 2 3 4 5 6 7 8 9 10; do sleep 3 & n=$((n+1)); done; echo started $n";
    let o = f.run(&["--rm", "--pids-limit", "4"], &["sh", "-c", script]);
    assert!(stderr(&o).contains("can't fork"), "stderr: {}", stderr(&o));
    assert!(!stdout(&o).contains("started 10"));
    let o = f.run(&["--rm", "--pids-limit", "64"], &["sh", "-c", script]);
    assert!(stdout(&o).contains("started 10"), "stderr: {}", stderr(&o));
}

#[test]
fn files_written_in_the_container_do_not_reach_the_rootfs() {
    let Some(f) = fixture() else { return };
    let o = f.run(
        &["--rm"],
        &["sh", "-c", "echo data > /written; rm /bin/ls; cat /written"],
    );
    assert_eq!(stdout(&o), "data\n", "stderr: {}", stderr(&o));
    assert!(!f.rootfs.join("written").exists());
    assert!(f.rootfs.join("bin/ls").symlink_metadata().is_ok());
}

#[test]
fn run_leaves_no_mounts_cgroups_or_temp_dirs() {
    let Some(f) = fixture() else { return };
    let name = unique("clean");
    let before = mounts();
    let o = f.run(
        &[
            "--rm",
            "--name",
            &name,
            "--mem",
            "64M",
            "--pids-limit",
            "32",
            "--cpus",
            "0.5",
        ],
        &["sh", "-c", "mount | grep -c . ; exit 0"],
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(mounts(), before);
    assert!(
        cgroup_dirs_named(&name).is_empty(),
        "left: {:?}",
        cgroup_dirs_named(&name)
    );
    let left: Vec<_> = std::fs::read_dir(f.state.join("containers"))
        .expect("containers dir")
        .flatten()
        .filter(|e| e.file_name() != "names")
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left: {left:?}");
}

#[test]
fn run_without_rm_keeps_only_the_writable_layer() {
    let Some(f) = fixture() else { return };
    let name = unique("keep");
    let o = f.run(&["--name", &name], &["sh", "-c", "echo x > /kept"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let dir = f.state.join("containers").join(&name);
    assert_eq!(
        std::fs::read_to_string(dir.join("upper/kept")).expect("kept"),
        "x\n"
    );
    assert!(dir.join("spec.json").exists());
    assert!(!dir.join("work").exists());
    let o = f.run(&["--name", &name], &["true"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("already in use"),
        "stderr: {}",
        stderr(&o)
    );
}

#[test]
fn sigterm_to_mvm_reaches_the_container() {
    let Some(f) = fixture() else { return };
    let mut child = f
        .cmd(
            &["--rm"],
            &[
                "sh",
                "-c",
                "trap 'echo got TERM; exit 7' TERM; echo ready; sleep 30 & wait",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut buf).expect("ready");
    assert_eq!(&buf, b"ready\n");
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signalling the mvm process this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = wait_for(&mut child, Duration::from_secs(10)).expect("mvm exits");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("read");
    assert_eq!(rest, "got TERM\n");
    assert_eq!(status.code(), Some(7));
}

#[test]
fn init_forwards_sigterm_and_reaps_zombies() {
    let Some(f) = fixture() else { return };
    // The command is PID 2 under the init; an orphaned zombie would show up as "Z" in ps.
    let o = f.run(
        &["--rm", "--init"],
        &[
            "sh",
            "-c",
            "echo $$; (sleep 0 &) ; sleep 0.3; ps -o stat | grep -c Z",
        ],
    );
    assert_eq!(stdout(&o), "2\n0\n", "stderr: {}", stderr(&o));
    let mut child = f
        .cmd(&["--rm", "--init"], &["sh", "-c", "echo ready; sleep 30"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut buf).expect("ready");
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signalling the mvm process this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = wait_for(&mut child, Duration::from_secs(10)).expect("mvm exits");
    // sh has no TERM handler: it dies of the signal, which only reaches it through the init.
    assert_eq!(status.code(), Some(143));
}

#[test]
fn missing_command_exits_127_with_one_line() {
    let Some(f) = fixture() else { return };
    let o = f.run(&["--rm"], &["no-such-command"]);
    assert_eq!(o.status.code(), Some(127));
    assert_eq!(stderr(&o).lines().count(), 1, "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("no-such-command"));
}

#[test]
fn bad_flags_exit_2_and_create_nothing() {
    let Some(f) = fixture() else { return };
    for flags in [
        &["--mem", "lots"][..],
        &["--cpus", "0"],
        &["--name", "../x"],
        &["-u", "ghost"],
    ] {
        let o = f.run(flags, &["true"]);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{flags:?}: {}", stderr(&o));
    }
    let left = std::fs::read_dir(f.state.join("containers")).map_or(0, |d| {
        d.flatten().filter(|e| e.file_name() != "names").count()
    });
    assert_eq!(left, 0);
}

#[test]
fn isolation_process_runs_the_command_on_the_host() {
    let Some(f) = fixture() else { return };
    // A process run is a record too: under the fixture's root, not the host's /var/lib/mvm.
    let o = Command::new(MVM)
        .arg("--root")
        .arg(&f.state)
        .args(["run", "--isolation", "process", "--rootfs"])
        .arg(&f.rootfs)
        .args([
            "-e",
            "X=42",
            "-w",
            "/",
            "--",
            "/bin/sh",
            "-c",
            "echo $X $PWD; exit 5",
        ])
        .output()
        .expect("run");
    assert_eq!(stdout(&o), "42 /\n", "stderr: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(5));
}

#[test]
fn container_cannot_change_host_kernel_settings() {
    let Some(f) = fixture() else { return };
    let o = f.run(
        &["--rm"],
        &["sh", "-c", "echo 1 > /proc/sys/vm/drop_caches && echo wrote; cat /proc/kcore | wc -c; mount -t tmpfs t /mnt || echo no-mount"],
    );
    let out = stdout(&o);
    assert!(!out.contains("wrote"), "stdout: {out}");
    assert!(out.contains("no-mount"), "stdout: {out}");
    assert_eq!(
        out.lines().next().map(str::trim),
        Some("0"),
        "stdout: {out}"
    );
}

#[test]
fn volumes_show_the_host_directory_read_only_when_asked() {
    let Some(f) = fixture() else { return };
    let host = tempfile::tempdir().expect("temp dir");
    std::fs::write(host.path().join("in.txt"), "host data\n").expect("write");
    let rw = format!("{}:/work", host.path().display());
    let ro = format!("{}:/srv/ro:ro", host.path().display());
    let o = f.run(
        &["--rm", "-v", &rw, "-v", &ro],
        &[
            "sh",
            "-c",
            "cat /work/in.txt; echo out > /work/out.txt; \
             touch /srv/ro/x 2>/dev/null && echo ro-writable || echo ro-refused",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "host data\nro-refused\n");
    // A container volume is the host directory itself (as with docker -v).
    assert_eq!(
        std::fs::read_to_string(host.path().join("out.txt")).expect("out.txt"),
        "out\n"
    );
    assert!(!host.path().join("x").exists());
    // The mount point was made in the writable layer, not in the image's root.
    assert!(!f.rootfs.join("work").exists());
}

#[test]
fn volume_through_a_symlink_in_the_image_is_refused() {
    let Some(f) = fixture() else { return };
    let host = tempfile::tempdir().expect("temp dir");
    let outside = tempfile::tempdir().expect("temp dir");
    let link = f.rootfs.join("escape");
    std::os::unix::fs::symlink(outside.path(), &link).expect("symlink");
    let v = format!("{}:/escape/mnt", host.path().display());
    let o = f.run(&["--rm", "-v", &v], &["true"]);
    std::fs::remove_file(&link).expect("remove symlink");
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("mounting volumes"), "{}", stderr(&o));
    assert!(!outside.path().join("mnt").exists());
}

#[test]
fn volume_of_a_missing_host_path_is_refused_with_one_line() {
    let Some(f) = fixture() else { return };
    let o = f.run(&["--rm", "-v", "/nonexistent/dir:/data"], &["true"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("/nonexistent/dir"), "{}", stderr(&o));
}

/// `mvm --root STATE ARGS...` for the commands that act on a container.
fn mvm(f: &Fixture, args: &[&str]) -> Output {
    Command::new(MVM)
        .arg("--root")
        .arg(&f.state)
        .args(args)
        .output()
        .expect("run mvm")
}

#[test]
fn a_container_run_without_rm_is_a_record_that_ps_lists_and_rm_removes() {
    let Some(f) = fixture() else { return };
    let name = unique("rec");
    let o = f.run(&["--name", &name], &["sh", "-c", "echo logged; exit 4"]);
    assert_eq!(o.status.code(), Some(4), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "logged\n");

    // Listed (with no warning), as exited with its code; not among the running ones.
    let ps = mvm(&f, &["ps", "-a"]);
    assert!(ps.status.success(), "{}", stderr(&ps));
    assert_eq!(stderr(&ps), "");
    let line = stdout(&ps)
        .lines()
        .find(|l| l.contains(&name))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(line.contains("Exited (4)"), "{}", stdout(&ps));
    assert!(!stdout(&mvm(&f, &["ps"])).contains(&name));
    assert_eq!(stdout(&mvm(&f, &["logs", &name])), "logged\n");
    let inspect = mvm(&f, &["inspect", &name]);
    let record: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("json");
    assert_eq!(record["isolation"], "container");
    assert_eq!(record["exit_code"], 4);

    let rm = mvm(&f, &["rm", &name]);
    assert!(rm.status.success(), "rm: {}", stderr(&rm));
    assert_eq!(stdout(&mvm(&f, &["ps", "-a"])).lines().count(), 1);
    let left: Vec<_> = std::fs::read_dir(f.state.join("containers"))
        .expect("containers dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left: {left:?}");
    // The name is free again.
    let o = f.run(&["--rm", "--name", &name], &["true"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
}

#[test]
fn a_detached_container_runs_execs_logs_and_stops() {
    let Some(f) = fixture() else { return };
    let name = unique("bg");
    let o = f
        .cmd(
            &["-d", "--name", &name],
            &[
                "sh",
                "-c",
                "echo ready; trap 'echo bye; exit 0' TERM; sleep 60 & wait",
            ],
        )
        .output()
        .expect("run -d");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let id = stdout(&o).trim().to_string();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id:?}"
    );
    let ps = stdout(&mvm(&f, &["ps"]));
    assert!(
        ps.lines()
            .any(|l| l.starts_with(&id[..12]) && l.contains(" Up ")),
        "{ps}"
    );

    // exec joins the container: its hostname, its environment, its PID namespace.
    let o = mvm(
        &f,
        &[
            "exec",
            "-e",
            "X=1",
            &name,
            "--",
            "sh",
            "-c",
            "echo $(hostname) $X $PATH; exit 3",
        ],
    );
    assert_eq!(o.status.code(), Some(3), "stderr: {}", stderr(&o));
    assert!(
        stdout(&o).starts_with(&format!("{name} 1 /")),
        "{}",
        stdout(&o)
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while !stdout(&mvm(&f, &["logs", &name])).contains("ready") {
        assert!(Instant::now() < deadline, "no output logged");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = mvm(&f, &["stop", "-t", "5", &name]);
    assert!(o.status.success(), "stop: {}", stderr(&o));
    assert_eq!(stdout(&mvm(&f, &["logs", &name])), "ready\nbye\n");
    let all = stdout(&mvm(&f, &["ps", "-a"]));
    assert!(
        all.lines()
            .any(|l| l.contains(&name) && l.contains("Exited (0)")),
        "{all}"
    );
    assert!(mvm(&f, &["rm", &name]).status.success());
}
