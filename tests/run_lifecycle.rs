//! The docker-like lifecycle of a container in a microVM: `mvm run -d` starts nginx in its own VM
//! with a published port, and `ps`, `logs`, `exec`, `stop`, `rm` and `inspect` work on it from
//! other processes; `exec -i` feeds stdin to a command in a busybox VM, whose runner, killed with
//! `kill -9`, shows as exited (its passt ends too) and `rm` cleans up after it.
//! Afterwards no process, socket, tap, mount, listening port or container directory is left.
//!
//! Each boot takes tens of seconds on this host (guest kernel mode is emulated), so there are two
//! boots, one at a time. The tests skip with a reason without /dev/kvm, root, the test kernel, the
//! static guest agent or Debian's package lists (the nginx image is built from them).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::vm::{boot_lock, mounts_under, taps, text, vm_parts, Reaper, VmParts};
use rootfs_builder::examples::NGINX_INDEX;

const MVM: &str = env!("CARGO_BIN_EXE_mvm");

/// Everything a VM run needs.
struct Setup {
    kernel: PathBuf,
    kernel_args: String,
    agent: PathBuf,
    /// An OCI layout of the nginx example.
    nginx: PathBuf,
    _dir: tempfile::TempDir,
}

fn setup() -> Option<&'static Setup> {
    static SETUP: OnceLock<Result<Setup, String>> = OnceLock::new();
    let setup = SETUP.get_or_init(|| {
        let VmParts {
            kernel,
            kernel_args,
            agent,
        } = vm_parts()?;
        let apt = Command::new("apt-cache")
            .args(["show", "--no-all-versions", "nginx"])
            .output();
        if !apt.is_ok_and(|o| o.status.success()) {
            return Err("apt package lists are not available (the nginx image needs them)".into());
        }
        let dir = tempfile::tempdir().unwrap();
        let nginx = dir.path().join("nginx-oci");
        let out = Command::new(MVM)
            .arg("--root")
            .arg(dir.path().join("builder"))
            .args(["build-example", "nginx", "-o"])
            .arg(&nginx)
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!("build-example nginx: {}", text(&out.stderr).trim()));
        }
        Ok(Setup {
            kernel,
            kernel_args,
            agent,
            nginx,
            _dir: dir,
        })
    });
    match setup {
        Ok(s) => Some(s),
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

/// `mvm --root ROOT ARGS...`.
fn mvm(s: &Setup, root: &Path, args: &[&str]) -> Output {
    Command::new(MVM)
        .arg("--root")
        .arg(root)
        .args(args)
        .env("MVM_AGENT", &s.agent)
        .env("MVM_BOOT_TIMEOUT", "300")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A root with the nginx example loaded as `nginx-test`.
fn root_with_nginx(s: &Setup) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let out = mvm(
        s,
        root.path(),
        &["load", "-i", s.nginx.to_str().unwrap(), "-t", "nginx-test"],
    );
    assert!(out.status.success(), "load: {}", text(&out.stderr));
    root
}

/// `mvm run -d --name NAME --isolation vm` with the test kernel, then `rest` (flags, the image or
/// root filesystem, a command).
fn run_detached(s: &Setup, root: &Path, name: &str, rest: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "-d",
        "--name",
        name,
        "--isolation",
        "vm",
        "--kernel",
        s.kernel.to_str().unwrap(),
        "--kernel-args",
        &s.kernel_args,
    ];
    args.extend_from_slice(rest);
    mvm(s, root, &args)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET / on the port; the body, or None while nothing answers.
fn http_get(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut got = String::new();
    s.read_to_string(&mut got).ok()?;
    got.starts_with("HTTP/1.1 200").then_some(got)
}

/// What a container may leave behind on the host.
#[derive(Debug, PartialEq)]
struct HostTraces {
    processes: Vec<String>,
    taps: Vec<String>,
    mounts: usize,
    files: Vec<PathBuf>,
}

fn host_traces(root: &Path) -> HostTraces {
    let root_text = root.display().to_string();
    let me = std::process::id().to_string();
    let processes = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid = e.file_name().into_string().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = text(&cmd).replace('\0', " ");
            (pid != me && cmd.contains(&root_text)).then(|| format!("{pid}: {cmd}"))
        })
        .collect();
    // Everything under containers/ except the (empty) names directory, and any socket.
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() && !p.starts_with(root.join("images")) {
                stack.push(p.clone());
            }
            let in_containers = p.starts_with(root.join("containers"))
                && p != root.join("containers")
                && p != root.join("containers/names");
            if ft.is_socket() || in_containers {
                files.push(p);
            }
        }
    }
    HostTraces {
        processes,
        taps: taps(root),
        mounts: mounts_under(root),
        files,
    }
}

fn ps(s: &Setup, root: &Path, all: bool) -> String {
    let out = mvm(s, root, if all { &["ps", "-a"] } else { &["ps"] });
    assert!(out.status.success(), "ps: {}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn run_detached_nginx_then_ps_exec_logs_stop_and_rm_like_docker() {
    let Some(s) = setup() else { return };
    let _lock = boot_lock();
    let root = root_with_nginx(s);
    let root = root.path();
    let _reaper = Reaper(root.to_path_buf());
    let before = host_traces(root);
    let port = free_port();
    let publish = format!("{port}:80");

    let started = Instant::now();
    let out = run_detached(s, root, "web", &["-p", &publish, "--image", "nginx-test"]);
    let boot = started.elapsed();
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "run -d printed {id:?}"
    );
    eprintln!("run -d returned after {boot:?}");

    // nginx starts a little after the container does.
    let deadline = Instant::now() + Duration::from_secs(180);
    let page = loop {
        if let Some(p) = http_get(port) {
            break p;
        }
        assert!(Instant::now() < deadline, "no answer on port {port}");
        std::thread::sleep(Duration::from_secs(1));
    };
    eprintln!("first HTTP answer after {:?}", started.elapsed());
    assert!(page.contains(NGINX_INDEX.trim()), "{page}");

    let table = ps(s, root, false);
    let line = table.lines().find(|l| l.ends_with(" web")).unwrap_or("");
    assert!(line.starts_with(&id[..12]), "{table}");
    assert!(
        line.contains("nginx-test") && line.contains(" Up "),
        "{table}"
    );
    assert!(
        line.contains(&format!("127.0.0.1:{port}->80/tcp")),
        "{table}"
    );

    // The name is taken: one clear line, exit 2, nothing changes.
    let out = run_detached(s, root, "web", &["--image", "nginx-test"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "mvm: the name 'web' is already in use by another container (remove it with `mvm rm web`)\n"
    );
    assert_eq!(ps(s, root, true).lines().count(), 2);

    let out = mvm(s, root, &["exec", "web", "--", "/usr/sbin/nginx", "-t"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("syntax is ok"),
        "{}",
        text(&out.stderr)
    );
    let out = mvm(
        s,
        root,
        &["exec", "web", "--", "/usr/sbin/nginx", "-s", "bogus"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let out = mvm(s, root, &["exec", "web", "--", "/no/such/command"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));

    let out = mvm(s, root, &["logs", "web"]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("\"GET / HTTP/1.1\" 200"),
        "logs: {}",
        text(&out.stdout)
    );

    let out = mvm(s, root, &["rm", "web"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "mvm: container web is running: stop it first or use rm -f\n"
    );

    // `logs -f` follows until the container exits.
    let follow = Command::new(MVM)
        .arg("--root")
        .arg(root)
        .args(["logs", "-f", "web"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stopping = Instant::now();
    let out = mvm(s, root, &["stop", "web"]);
    eprintln!("stop took {:?}", stopping.elapsed());
    assert!(out.status.success(), "stop: {}", text(&out.stderr));
    let followed = follow.wait_with_output().unwrap();
    assert!(followed.status.success());
    assert!(text(&followed.stdout).contains("\"GET / HTTP/1.1\" 200"));

    assert!(!ps(s, root, false).lines().any(|l| l.ends_with(" web")));
    let all = ps(s, root, true);
    assert!(
        all.lines()
            .any(|l| l.ends_with(" web") && l.contains("Exited (0)")),
        "{all}"
    );
    let out = mvm(s, root, &["inspect", "web"]);
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["status"], "exited");
    assert_eq!(record["exit_code"], 0);
    assert_eq!(record["id"], id.as_str());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port still open"
    );

    let out = mvm(s, root, &["rm", "web"]);
    assert!(out.status.success(), "rm: {}", text(&out.stderr));
    assert_eq!(ps(s, root, true).lines().count(), 1);
    let out = mvm(s, root, &["logs", "web"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stderr), "mvm: no such container: web\n");
    assert_eq!(host_traces(root), before);
}

/// A root directory with the host's static busybox (Debian's busybox-static) as sh, cat, sleep.
fn busybox_rootfs(dir: &Path) -> Option<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    let static_bin = Command::new("file")
        .arg(busybox)
        .output()
        .is_ok_and(|o| text(&o.stdout).contains("statically linked"));
    if !static_bin {
        eprintln!("skipping: no static /bin/busybox (apt-get install busybox-static)");
        return None;
    }
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "sleep", "grep", "mount", "unshare"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    Some(root)
}

#[test]
fn exec_with_stdin_then_rm_cleans_up_after_a_runner_killed_with_sigkill() {
    let Some(s) = setup() else { return };
    let _lock = boot_lock();
    let root = tempfile::tempdir().unwrap();
    let Some(rootfs) = busybox_rootfs(root.path()) else {
        return;
    };
    let root = root.path().join("state");
    let root = root.as_path();
    let _reaper = Reaper(root.to_path_buf());
    let before = host_traces(root);
    let port = format!("{}:80", free_port());
    let rest = [
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--network",
        "user",
        "-p",
        &port,
        "--",
        "sh",
        "-c",
        "while true; do sleep 1; done",
    ];
    let out = run_detached(s, root, "doomed", &rest);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));

    // exec -i: stdin reaches the command, and its end reaches it too (cat ends).
    let mut cat = Command::new(MVM)
        .arg("--root")
        .arg(root)
        .args(["exec", "-i", "doomed", "--", "cat"])
        .env("MVM_AGENT", &s.agent)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    cat.stdin
        .take()
        .unwrap()
        .write_all(b"through the agent\n")
        .unwrap();
    let out = cat.wait_with_output().unwrap();
    if out.status.code() != Some(0) {
        for e in std::fs::read_dir(root.join("containers"))
            .unwrap()
            .flatten()
        {
            let log = std::fs::read_to_string(e.path().join("console.log")).unwrap_or_default();
            eprintln!("console of {}:\n{log}", e.path().display());
        }
    }
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "through the agent\n");

    // An exec'd process gets docker's posture, as the container's first process does: seccomp
    // filter, docker's capabilities, no mount, no nested user namespace.
    let out = mvm(
        s,
        root,
        &[
            "exec",
            "doomed",
            "--",
            "sh",
            "-c",
            "grep -E '^(CapEff|Seccomp):' /proc/self/status /proc/1/status; \
             mount -t tmpfs t /mnt 2>/dev/null || echo no-mount; \
             unshare -U true 2>/dev/null || echo no-userns",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "/proc/self/status:CapEff:\t00000000a80425fb\n/proc/self/status:Seccomp:\t2\n\
         /proc/1/status:CapEff:\t00000000a80425fb\n/proc/1/status:Seccomp:\t2\n\
         no-mount\nno-userns\n"
    );

    let out = mvm(s, root, &["inspect", "doomed"]);
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["status"], "running");
    let pid = i32::try_from(record["pid"].as_i64().unwrap()).unwrap();
    // passt is started by the VM's VMM process (a child of the runner), before its jail.
    let vmm = i32::try_from(record["vmm_pid"].as_i64().unwrap()).unwrap();
    assert!(
        children_named(pid, "mvm").contains(&vmm),
        "the runner's VMM"
    );
    let passt = children_named(vmm, "passt");
    assert_eq!(passt.len(), 1, "--network user runs one passt");
    // SAFETY: kill has no memory preconditions; the pid is the runner this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ps(s, root, true).contains("Exited (unknown)") {
        assert!(Instant::now() < deadline, "{}", ps(s, root, true));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!ps(s, root, false).contains("doomed"));
    let out = mvm(s, root, &["rm", "doomed"]);
    assert!(out.status.success(), "rm: {}", text(&out.stderr));
    assert_eq!(ps(s, root, true).lines().count(), 1);
    assert_eq!(host_traces(root), before);
    // passt ends by itself once the runner's end of its socket closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while passt.iter().any(|p| running(*p)) {
        assert!(
            Instant::now() < deadline,
            "passt {passt:?} outlived its runner"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `pid` runs (a zombie does not).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        !state.is_some_and(|r| r.starts_with('Z') || r.starts_with('X'))
    })
}

/// Children of `parent` whose command name starts with `name`.
fn children_named(parent: i32, name: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1;
            let ppid: i32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent && comm.starts_with(name)).then_some(pid)
        })
        .collect()
}
