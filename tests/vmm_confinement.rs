//! The VMM process runs confined: while a VM runs, every thread of the process that holds it is
//! filtered by seccomp, none is root or holds a capability, and the process has its own user,
//! pid, mount and ipc namespaces with a root of its own (`engine::confine`, `vmm::seccomp`).
//! A forbidden system call from a VMM thread ends the VMM with one line naming it; with
//! `--security-opt vmm-seccomp=off` (debugging only, and mvm says so) the same call goes
//! through.
//!
//! The `mvm boot` test needs only /dev/kvm and root; the `mvm run` tests boot the Linux test
//! kernel with the busybox image from a local registry, and skip with a reason where that
//! cannot run.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
#[path = "common/registry.rs"]
mod registry_server;
#[path = "common/runs.rs"]
mod runs;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::vm::{text, traced_processes, TRACE_ENV};
use runs::*;

/// Boots a guest that spins forever, with every kind of device, and checks its VMM process.
#[test]
fn a_booted_vms_vmm_runs_confined_in_every_thread() {
    if !common::have_kvm() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: the jail of a root user's VMM is checked as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = common::guest_file(dir.path(), "spin.elf", &[0xeb, 0xfe]);
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let root = dir.path().join("root");
    let vsock = dir.path().join("v.sock");
    let metrics = dir.path().join("metrics.json");
    let mut args = vec![
        "boot".to_string(),
        "--mem".into(),
        "64M".into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--disk".into(),
        disk.display().to_string(),
        "--rng".into(),
        "--vsock".into(),
        vsock.display().to_string(),
        "--metrics".into(),
        metrics.display().to_string(),
    ];
    let passt = devices::virtio::net::passt_available();
    if passt {
        args.extend(["--network".into(), "user".into()]);
    } else {
        eprintln!("passt is not installed: not checking the network device");
    }
    let mut child = std::process::Command::new(MVM)
        .arg("--root")
        .arg(&root)
        .args(&args)
        .env(TRACE_ENV, &root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let supervisor = child.id();
    // The VMM: the child of `mvm boot` that holds the VM.
    let deadline = Instant::now() + Duration::from_secs(30);
    let vmm = loop {
        if let Some(p) = children(supervisor).into_iter().find(|p| holds_a_vm(*p)) {
            if thread_status(p, "Name").iter().any(|(n, _)| n == "vcpu0") && metrics.exists() {
                break p;
            }
        }
        assert!(Instant::now() < deadline, "no VMM process holds a VM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!holds_a_vm(supervisor), "the supervisor holds no VM");
    let names = assert_confined(vmm);
    for t in ["vcpu0", "metrics"] {
        assert!(names.iter().any(|n| n == t), "{names:?}");
    }
    if passt {
        // passt is the VMM's child, in its pid namespace: it ends with it.
        let p = traced_processes(&root, "passt");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            std::fs::read_link(format!("/proc/{}/ns/pid", p[0])).unwrap(),
            std::fs::read_link(format!("/proc/{vmm}/ns/pid")).unwrap()
        );
    }
    // The VMM's cgroup holds it (where the host has one): memory = guest + overhead.
    let cgroup = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    assert!(
        cgroup.contains("/mvm-vmm/boot-") || !cgroup.contains("memory"),
        "{cgroup}"
    );
    // SAFETY: signals the mvm boot this test started.
    unsafe { libc::kill(i32::try_from(supervisor).unwrap(), libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(err.is_empty(), "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while (!traced_processes(&root, "passt").is_empty()
        || Path::new(&format!("/proc/{vmm}")).exists())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !Path::new(&format!("/proc/{vmm}")).exists(),
        "the VMM outlived mvm boot"
    );
    assert!(traced_processes(&root, "passt").is_empty());
    assert!(!cgroup_leftover(&cgroup), "{cgroup}");
}

/// Whether a VMM cgroup named in `/proc/PID/cgroup` text is still on the host.
fn cgroup_leftover(proc_cgroup: &str) -> bool {
    proc_cgroup.lines().any(|l| {
        let path = l.splitn(3, ':').nth(2).unwrap_or_default();
        path.contains("/mvm-vmm/")
            && ["memory", "pids", "unified", ""].iter().any(|h| {
                Path::new("/sys/fs/cgroup")
                    .join(h)
                    .join(&path[1..])
                    .exists()
            })
    })
}

#[test]
fn a_microvm_runs_under_the_jail_and_every_command_still_reaches_it() {
    let Some(s) = setup() else { return };
    let before = host_traces(&s.root);
    let out = run_cmd(
        s.vm,
        &s.root,
        &[
            "-d",
            "--name",
            "jailed",
            "--image",
            &s.reg.busybox,
            "--",
            "sleep",
            "1000",
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let record: serde_json::Value =
        serde_json::from_slice(&mvm(s.vm, &s.root, &["inspect", "jailed"]).stdout).unwrap();
    assert_eq!(record["status"], "running");
    let vmm = u32::try_from(record["vmm_pid"].as_i64().unwrap()).unwrap();
    let runner = u32::try_from(record["pid"].as_i64().unwrap()).unwrap();
    assert!(!holds_a_vm(runner), "the runner holds no VM");
    let names = assert_confined(vmm);
    for t in ["vcpu0", "vmm", "control"] {
        assert!(names.iter().any(|n| n == t), "{names:?}");
    }
    // The guest's memory is charged to the VMM's cgroup, limited to it plus an overhead.
    if let Some(dir) = record["vmm_cgroup_dirs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| Path::new(d.as_str().unwrap()).to_path_buf())
        .find(|d| d.join("memory.limit_in_bytes").exists() || d.join("memory.max").exists())
    {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        let limit = read("memory.limit_in_bytes")
            .or_else(|| read("memory.max"))
            .unwrap();
        let used = read("memory.usage_in_bytes")
            .or_else(|| read("memory.current"))
            .unwrap();
        let (limit, used): (u64, u64) =
            (limit.trim().parse().unwrap(), used.trim().parse().unwrap());
        assert_eq!(
            limit,
            (256 << 20) + engine::confine::cgroup::MEMORY_OVERHEAD
        );
        assert!(
            used > 16 << 20,
            "the booted guest's memory is charged: {used}"
        );
    } else {
        eprintln!("no memory cgroup here: not checking the VMM's memory accounting");
    }
    // exec, kill and stop still reach the container through the jailed VMM.
    let out = mvm(
        s.vm,
        &s.root,
        &["exec", "jailed", "--", "sh", "-c", "echo inside"],
    );
    assert_eq!(text(&out.stdout), "inside\n", "{}", text(&out.stderr));
    let out = mvm(s.vm, &s.root, &["stop", "-t", "5", "jailed"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = mvm(s.vm, &s.root, &["rm", "jailed"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_nothing_left(&s.root, &before);
}

/// Sends one control request to the run under `root`; returns the answer line (empty when
/// the connection closed without one).
fn control(root: &Path, request: &str) -> String {
    let sock = only_container_dir(root).join("control.sock");
    let mut conn = UnixStream::connect(&sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = BufReader::new(conn).read_line(&mut answer);
    answer
}

/// What a run printed on stderr after getting its image ready (the pull and the disk image
/// come first, on a fresh root).
fn after_image(err: &str) -> String {
    let lines: Vec<&str> = err.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| l.starts_with("mvm: making ext4 disk image") || l.starts_with("digest: "))
        .map_or(0, |i| i + 1);
    lines[start..].iter().map(|l| format!("{l}\n")).collect()
}

/// Starts a foreground run whose container says `ready` and sleeps; returns it once ready.
fn start_sleeper(s: &Setup, extra: &[&str]) -> std::process::Child {
    let mut args = vec!["--rm"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--image",
        &s.reg.busybox,
        "--",
        "sh",
        "-c",
        "echo ready; sleep 1000",
    ]);
    let mut child = run_cmd(s.vm, &s.root, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for_line(&mut out, "ready", Duration::from_secs(600));
    }));
    if waited.is_err() {
        let _ = child.kill();
        let end = child.wait_with_output().unwrap();
        panic!(
            "the run ended before its container was ready ({:?}): {}",
            end.status,
            text(&end.stderr)
        );
    }
    child
}

#[test]
fn a_forbidden_system_call_from_a_vmm_thread_kills_the_vmm_with_one_line() {
    if !cfg!(debug_assertions) {
        eprintln!("skipping: the debug request that makes the call is taken by debug builds");
        return;
    }
    let Some(s) = setup() else { return };
    let before = host_traces(&s.root);
    let child = start_sleeper(&s, &[]);
    // mkdir: no VMM thread may create files.
    let answer = control(
        &s.root,
        &format!(
            r#"{{"op":"debug_syscall","thread":"control","nr":{}}}"#,
            libc::SYS_mkdir
        ),
    );
    assert_eq!(answer, "", "the VMM answered instead of dying: {answer}");
    let out = child.wait_with_output().unwrap();
    let err = after_image(&text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(
            "mvm: the VMM's control thread 'control' made a forbidden system call, mkdir (83)"
        ),
        "{err}"
    );
    assert_nothing_left(&s.root, &before);
}

#[test]
fn with_vmm_seccomp_off_mvm_says_so_and_the_call_goes_through() {
    if !cfg!(debug_assertions) {
        eprintln!("skipping: the debug request that makes the call is taken by debug builds");
        return;
    }
    let Some(s) = setup() else { return };
    let before = host_traces(&s.root);
    let child = start_sleeper(&s, &["--security-opt", "vmm-seccomp=off"]);
    let vmm = traced_processes(&s.root, "mvm")
        .into_iter()
        .find(|p| holds_a_vm(*p))
        .unwrap();
    assert!(thread_status(vmm, "Seccomp").iter().all(|(_, v)| v == "0"));
    let answer = control(
        &s.root,
        &format!(
            r#"{{"op":"debug_syscall","thread":"control","nr":{}}}"#,
            libc::SYS_mkdir
        ),
    );
    assert_eq!(answer.trim(), r#"{"result":"ok"}"#);
    let name = std::fs::read_to_string(only_container_dir(&s.root).join("state.json")).unwrap();
    let name: serde_json::Value = serde_json::from_str(&name).unwrap();
    let out = mvm(
        s.vm,
        &s.root,
        &["stop", "-t", "2", name["name"].as_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = child.wait_with_output().unwrap();
    let err = after_image(&text(&out.stderr));
    // sh, the container's first process, ignores SIGTERM: the stop ends it with SIGKILL.
    assert_eq!(out.status.code(), Some(137), "{err}");
    assert_eq!(
        err.lines().next().unwrap_or_default(),
        "mvm: warning: --security-opt vmm-seccomp=off: the VMM's threads run without seccomp \
         filters (for debugging only)"
    );
    assert_nothing_left(&s.root, &before);
}

/// A user who is not root: uid and gid 65534 (nobody).
const NOBODY: u32 = 65534;

/// `mvm ARGS...` as `nobody`, in a mount namespace of the test's own where /dev/kvm is a node
/// `nobody` may open (as a host whose /dev/kvm belongs to group kvm gives its members): nothing
/// else of the host changes. mvm, the kernel and the agent are copies `nobody` can read.
fn as_nobody(work: &Path, root: &Path, args: &[&str]) -> std::process::Command {
    let script = format!(
        "mount -t tmpfs -o mode=0755 dev {w}/dev && mknod -m 0666 {w}/dev/kvm c 10 232 && \
         mount --bind {w}/dev/kvm /dev/kvm && \
         exec setpriv --reuid {NOBODY} --regid {NOBODY} --clear-groups \"$@\"",
        w = work.display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        &script,
        "sh",
    ])
    .arg(work.join("mvm"))
    .arg("--root")
    .arg(root)
    .args(args)
    .env("MVM_AGENT", work.join("mvm-agent"))
    .env("HOME", work)
    .env(TRACE_ENV, root)
    .stdin(Stdio::null());
    cmd
}

#[test]
fn a_user_who_is_not_root_runs_a_microvm_with_user_networking_and_its_vmm_is_jailed() {
    let Some(s) = setup() else { return };
    if !devices::virtio::net::passt_available() {
        eprintln!("skipping: --network user needs passt");
        return;
    }
    let work = s.reg.dir.path().join("nobody");
    std::fs::create_dir_all(work.join("dev")).unwrap();
    for (from, to) in [
        (Path::new(MVM), "mvm"),
        (s.vm.kernel.as_path(), "vmlinux"),
        (s.vm.agent.as_path(), "mvm-agent"),
    ] {
        std::fs::copy(from, work.join(to)).unwrap();
    }
    let root = work.join("root");
    std::fs::create_dir(&root).unwrap();
    std::os::unix::fs::chown(&root, Some(NOBODY), Some(NOBODY)).unwrap();
    // The scratch directories above it: traversable by nobody.
    for d in [s.reg.dir.path(), work.as_path()] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let before = host_traces(&root);
    let kernel = work.join("vmlinux");
    let kernel = kernel.to_str().unwrap();
    let run = |extra: &[&str], cmd: &[&str]| {
        let mut args = vec![
            "run",
            "--network",
            "user",
            "--kernel",
            kernel,
            "--kernel-args",
            &s.vm.kernel_args,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--image", &s.reg.busybox, "--"]);
        args.extend_from_slice(cmd);
        as_nobody(&work, &root, &args).output().unwrap()
    };

    // The foreground run: output and exit code, as for root.
    let out = run(&["--rm"], &["sh", "-c", "echo $((6 * 7)); exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "42\n", "{}", text(&out.stderr));

    // A detached one: its VMM is jailed as it is for root, and runs as nobody outside.
    let out = run(&["-d", "--name", "unprivileged"], &["sleep", "1000"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let inspect = as_nobody(&work, &root, &["inspect", "unprivileged"])
        .output()
        .unwrap();
    let record: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let vmm = u32::try_from(record["vmm_pid"].as_i64().unwrap()).unwrap();
    let runner = u32::try_from(record["pid"].as_i64().unwrap()).unwrap();
    assert_confined(vmm);
    for pid in [vmm, runner] {
        for (name, uids) in thread_status(pid, "Uid") {
            let nobody = NOBODY.to_string();
            assert!(
                uids.split_whitespace().all(|u| u == nobody),
                "thread {name} of {pid} runs as {uids}"
            );
        }
        for (name, caps) in thread_status(pid, "CapEff") {
            assert_eq!(caps, "0000000000000000", "thread {name} of {pid}");
        }
    }
    let out = as_nobody(&work, &root, &["exec", "unprivileged", "echo", "inside"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "inside\n", "{}", text(&out.stderr));
    let out = as_nobody(&work, &root, &["rm", "-f", "unprivileged"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_nothing_left(&root, &before);
}
