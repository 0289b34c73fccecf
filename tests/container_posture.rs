//! The security posture of `mvm run --isolation container`, each attack on it as a test (see
//! guest-agent/src/runtime/security/): docker's seccomp filter and capabilities for the
//! container and its children, the flags that change them, the device allow-list and nodev
//! against mknod of the host's disk, no nested namespaces, docker's masked paths, setuid with and
//! unless no_new_privileges, `--userns`, TIOCSTI from a container run in a terminal, and no
//! descriptor but stdio. Needs root; skips with a reason otherwise. The probe for what busybox
//! cannot do is tests/linux/posture_probe.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::container::{fixture, stderr, stdout, unique, wait_for, Fixture};

/// `tests/linux/posture_probe.rs`, built once (static, setuid root) for the posture tests.
fn posture_probe() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
            let out = dir.join("posture_probe");
            let tmp = dir.join(format!("posture_probe.{}", std::process::id()));
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/linux/posture_probe.rs");
            let o = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
                .args([
                    "--edition",
                    "2021",
                    "-O",
                    "-C",
                    "target-feature=+crt-static",
                ])
                .args(["--target", "x86_64-unknown-linux-gnu", "-o"])
                .arg(&tmp)
                .arg(&src)
                .output()
                .expect("run rustc");
            assert!(
                o.status.success(),
                "rustc could not build posture_probe.rs: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            // Setuid root: with no_new_privs off it shows that setuid works in a container.
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o4755))
                .expect("chmod");
            std::fs::rename(&tmp, &out).expect("rename");
            out
        })
        .clone()
}

impl Fixture {
    /// Puts the posture probe into the root filesystem as /bin/probe.
    fn with_probe(self) -> Self {
        let dst = self.rootfs.join("bin/probe");
        std::fs::hard_link(posture_probe(), &dst)
            .or_else(|_| std::fs::copy(posture_probe(), &dst).map(drop))
            .expect("probe");
        self
    }
}

/// The `Name:\tvalue` lines of a /proc/PID/status, as `(file, name, value)`.
fn status_fields(out: &str) -> Vec<(String, String, String)> {
    out.lines()
        .filter_map(|l| {
            let (file, rest) = l.split_once(':')?;
            let (name, value) = rest.split_once(':')?;
            Some((file.into(), name.into(), value.trim().into()))
        })
        .collect()
}

#[test]
fn container_and_its_children_get_dockers_seccomp_and_capabilities() {
    let Some(f) = fixture() else { return };
    let o = f.run(
        &["--rm"],
        &[
            "sh",
            "-c",
            "grep -E '^(Seccomp|CapEff|CapPrm|CapBnd|CapInh|CapAmb|NoNewPrivs):' /proc/1/status /proc/self/status",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let fields = status_fields(&stdout(&o));
    for file in ["/proc/1/status", "/proc/self/status"] {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(f, n, _)| f == file && n == name)
                .map(|(_, _, v)| v.clone())
                .unwrap_or_else(|| panic!("{file} {name} missing: {}", stdout(&o)))
        };
        assert_eq!(get("Seccomp"), "2", "{file}");
        assert_eq!(
            get("NoNewPrivs"),
            "0",
            "{file}: off by default, as docker's"
        );
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(get(set), "00000000a80425fb", "{file} {set}");
        }
        assert_eq!(get("CapInh"), "0000000000000000", "{file}");
        assert_eq!(get("CapAmb"), "0000000000000000", "{file}");
    }
}

#[test]
fn security_flags_change_seccomp_capabilities_and_no_new_privs() {
    let Some(f) = fixture() else { return };
    let o = f.run(
        &[
            "--rm",
            "--security-opt",
            "seccomp=unconfined",
            "--security-opt",
            "no-new-privileges",
            "--cap-drop",
            "ALL",
            "--cap-add",
            "chown",
        ],
        &[
            "sh",
            "-c",
            "grep -E '^(Seccomp|CapEff|NoNewPrivs):' /proc/self/status",
        ],
    );
    assert_eq!(
        stdout(&o),
        "CapEff:\t0000000000000001\nNoNewPrivs:\t1\nSeccomp:\t0\n",
        "stderr: {}",
        stderr(&o)
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = dir.path().join("profile.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}"#,
    )
    .expect("write profile");
    let opt = format!("seccomp={}", profile.display());
    let o = f.run(
        &["--rm", "--security-opt", &opt],
        &[
            "sh",
            "-c",
            "mkdir /made || echo refused; grep ^Seccomp: /proc/self/status",
        ],
    );
    assert_eq!(
        stdout(&o),
        "refused\nSeccomp:\t2\n",
        "stderr: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("Permission denied"), "{}", stderr(&o));
    std::fs::write(&profile, r#"{"defaultAction": "SCMP_ACT_SOMETIMES"}"#).expect("write");
    for flags in [
        &["--security-opt", opt.as_str()][..],
        &["--security-opt", "seccomp=/nonexistent.json"],
        &["--security-opt", "apparmor=unconfined"],
        &["--cap-add", "NET_WIZARD"],
        &["--userns", "0:65536"],
    ] {
        let o = f.run(flags, &["true"]);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{flags:?}: {}", stderr(&o));
    }
}

#[test]
fn mknod_of_the_hosts_disk_cannot_be_opened() {
    let Some(f) = fixture() else { return };
    let dev = std::fs::metadata("/").map(|m| std::os::unix::fs::MetadataExt::dev(&m));
    let (major, minor) = match dev {
        Ok(d) if libc::major(d) != 0 => (libc::major(d), libc::minor(d)),
        _ => {
            eprintln!("skipping: the host's root is not on a block device");
            return;
        }
    };
    // In /dev (a tmpfs that must allow devices) the cgroup refuses the open; on the root
    // filesystem (nodev) the mount does too.
    let script = format!(
        "for n in /dev/hostdisk /hostdisk; do mknod $n b {major} {minor} || echo mknod-failed; \
         head -c 512 $n | wc -c; done"
    );
    let o = f.run(&["--rm"], &["sh", "-c", &script]);
    assert_eq!(stdout(&o), "0\n0\n", "stderr: {}", stderr(&o));
    let err = stderr(&o);
    // EPERM from the device cgroup, EACCES from nodev.
    assert!(
        err.contains("/dev/hostdisk: Operation not permitted"),
        "{err}"
    );
    assert!(err.contains("/hostdisk: Permission denied"), "{err}");
}

#[test]
fn nested_namespaces_and_mounts_are_refused() {
    let Some(f) = fixture() else { return };
    let o = f.run(
        &["--rm"],
        &[
            "sh",
            "-c",
            "unshare -U true && echo userns; unshare -r true && echo rootless; \
             unshare -m true && echo mountns; mount -t tmpfs t /mnt && echo mounted; \
             nsenter -t 1 -U true && echo entered; echo done",
        ],
    );
    assert_eq!(stdout(&o), "done\n", "stderr: {}", stderr(&o));
}

#[test]
fn dockers_masked_paths_are_hidden() {
    let Some(f) = fixture() else { return };
    let o = f.run(
        &["--rm"],
        &[
            "sh",
            "-c",
            "for p in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/latency_stats \
             /proc/timer_stats; do [ -e $p ] && echo $p $(wc -c < $p); done; \
             for d in /proc/acpi /proc/scsi /proc/asound /sys/firmware /sys/devices/virtual/powercap; do \
             [ -d $d ] && echo $d $(ls -A $d | wc -l); done; \
             echo x > /proc/sysrq-trigger 2>/dev/null && echo sysrq-written; \
             touch /sys/firmware/x 2>/dev/null && echo firmware-written; echo done",
        ],
    );
    let out = stdout(&o);
    assert!(
        out.ends_with("done\n"),
        "stdout: {out} stderr: {}",
        stderr(&o)
    );
    for line in out.lines().filter(|l| *l != "done") {
        let (path, size) = line.rsplit_once(' ').expect("path size");
        assert_eq!(size, "0", "{path} is visible: {out}");
    }
    // The host has these (so they were masked, not missing).
    if Path::new("/sys/firmware")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some())
    {
        assert!(out.contains("/sys/firmware 0"), "{out}");
    }
    if Path::new("/proc/timer_list").exists() {
        assert!(out.contains("/proc/timer_list 0"), "{out}");
    }
}

#[test]
fn setuid_binaries_work_for_container_users_unless_no_new_privileges() {
    let Some(f) = fixture().map(Fixture::with_probe) else {
        return;
    };
    // By default (as docker) a setuid-root binary of the image works for a container user.
    let o = f.run(&["--rm", "-u", "app"], &["/bin/probe", "ids"]);
    assert_eq!(stdout(&o), "uid=1000 euid=0\n", "stderr: {}", stderr(&o));
    // With no_new_privs the setuid bit gives nothing.
    let o = f.run(
        &["--rm", "-u", "app", "--security-opt", "no-new-privileges"],
        &["/bin/probe", "ids"],
    );
    assert_eq!(stdout(&o), "uid=1000 euid=1000\n", "stderr: {}", stderr(&o));
}

#[test]
fn userns_maps_container_root_to_an_unprivileged_host_range() {
    let Some(f) = fixture() else { return };
    let name = unique("userns");
    let o = f.run(
        &["--name", &name, "--userns", "200000:65536"],
        &[
            "sh",
            "-c",
            "id -u; stat -c %u /bin/busybox; cp /bin/busybox /suid && chmod 4755 /suid && echo hi > /etc/motd; \
             grep -E '^(Seccomp|CapEff):' /proc/self/status; cat /proc/self/uid_map; \
             echo reopened > /dev/stdout",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    // Inside: root, and the image's files belong to root.
    assert!(out.starts_with("0\n0\n"), "stdout: {out}");
    assert!(
        out.contains("Seccomp:\t2") && out.contains("CapEff:\t00000000a80425fb"),
        "{out}"
    );
    assert!(out.contains("200000"), "{out}");
    // Its stdio are pipes it owns: it may reopen them (nginx logs to /dev/stdout).
    assert!(out.ends_with("reopened\n"), "{out}");
    // Outside: what the container left in its layer belongs to the unprivileged range.
    let upper = f.state.join("containers").join(&name).join("upper");
    for file in ["suid", "etc/motd"] {
        let m = std::fs::metadata(upper.join(file)).expect(file);
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&m), 200_000, "{file}");
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&m), 200_000, "{file}");
    }
    // The image itself is unchanged.
    let m = std::fs::metadata(f.rootfs.join("bin/busybox")).expect("busybox");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&m), 0);
}

/// A pseudo-terminal pair: (master, slave).
fn openpty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors; the other arguments may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just made and are owned here.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

#[test]
fn tiocsti_in_a_container_cannot_type_into_the_users_terminal() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let Some(f) = fixture().map(Fixture::with_probe) else {
        return;
    };
    let (master, slave) = openpty();
    let mut cmd = f.cmd(&["--rm"], &["/bin/probe", "tiocsti"]);
    for (i, stream) in ["stdin", "stdout", "stderr"].iter().enumerate() {
        let fd = slave.try_clone().expect(stream);
        match i {
            0 => cmd.stdin(Stdio::from(fd)),
            1 => cmd.stdout(Stdio::from(fd)),
            _ => cmd.stderr(Stdio::from(fd)),
        };
    }
    // mvm runs as a user's shell would run it: a session whose controlling terminal is the pty.
    // SAFETY: setsid and ioctl are async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn mvm");
    // Keep the terminal's output flowing while mvm runs, and keep what it showed.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = {
        let done = done.clone();
        let mut reader = std::fs::File::from(master);
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match std::io::Read::read(&mut reader, &mut buf) {
                    Ok(n) if n > 0 => out.extend_from_slice(&buf[..n]),
                    _ if done.load(std::sync::atomic::Ordering::Relaxed) => break,
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let status = wait_for(&mut child, Duration::from_secs(30)).expect("mvm exits");
    std::thread::sleep(Duration::from_millis(100));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let shown = drain.join().expect("drain");
    // Whatever was pushed would be waiting in the terminal's input queue (a whole line).
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(slave.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut pending = [0u8; 256];
    let n = std::io::Read::read(&mut std::fs::File::from(slave), &mut pending);
    let injected = match n {
        Ok(n) => String::from_utf8_lossy(&pending[..n]).into_owned(),
        Err(e) => {
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
            String::new()
        }
    };
    assert_eq!(
        injected, "",
        "the container typed into the terminal; it showed: {shown}"
    );
    assert_eq!(status.code(), Some(0), "the probe says: {shown}");
    assert!(shown.contains("stdin: refused"), "{shown}");
}

#[test]
fn only_stdio_reaches_the_container() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let Some(f) = fixture() else { return };
    // A descriptor mvm's caller leaks to it (no close-on-exec), as a shell's terminal might be.
    let leaked = std::fs::File::open("/dev/null").expect("open");
    let fd = leaked.as_raw_fd();
    // No pipeline: the shell's own pipe ends would show up while it starts the commands.
    let mut cmd = f.cmd(&["--rm"], &["sh", "-c", "ls /proc/$$/fd; true"]);
    // SAFETY: dup2 is async-signal-safe; the duplicate on 9 has no close-on-exec flag.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().expect("run mvm");
    assert_eq!(stdout(&o), "0\n1\n2\n", "stderr: {}", stderr(&o));
    // With --init, the init (PID 1, reachable through /proc/1/fd) keeps none either.
    let mut cmd = f.cmd(&["--rm", "--init"], &["sh", "-c", "ls /proc/1/fd; true"]);
    // SAFETY: as above.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().expect("run mvm");
    assert_eq!(stdout(&o), "0\n1\n2\n", "stderr: {}", stderr(&o));
}
