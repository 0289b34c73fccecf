//! What the VMM confinement, rate-limit, soak and fault tests share: the busybox image in a
//! local registry, `mvm` runs under a test's own `--root`, the VMM process of a run and what a
//! run may leave behind on the host. A test file that uses it declares `mod common;` and
//! `#[path = "common/registry.rs"] mod registry_server;` first.

#![allow(dead_code)] // each test file uses part of it

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::common::vm::{
    boot_lock, mounts_under, taps, text, traced_processes, vm_parts, Reaper, VmParts, TRACE_ENV,
};
use crate::registry_server::{busybox_layout, Registry};

/// Path of the `mvm` binary under test.
pub const MVM: &str = env!("CARGO_BIN_EXE_mvm");

/// The VM parts, or None with the reason printed.
pub fn vm() -> Option<&'static VmParts> {
    static VM: OnceLock<Result<VmParts, String>> = OnceLock::new();
    match VM.get_or_init(vm_parts) {
        Ok(vm) => Some(vm),
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

/// A registry with the busybox example pushed as `HOST/test/busybox`. Dropped, it ends what
/// the test's runs under its directory left running.
pub struct Published {
    _reaper: Reaper,
    _reg: Registry,
    /// A scratch directory of the test.
    pub dir: tempfile::TempDir,
    /// The image's reference.
    pub busybox: String,
}

/// Starts a registry and pushes the busybox example to it (None, with the reason printed,
/// where it cannot).
pub fn published_busybox() -> Option<Published> {
    let layout = busybox_layout()?;
    let reg = Registry::start()?;
    let dir = tempfile::tempdir().expect("tempdir");
    let busybox = format!("{}/test/busybox", reg.host());
    push_layout(dir.path(), &layout, &busybox);
    Some(Published {
        _reaper: Reaper(dir.path().to_path_buf()),
        _reg: reg,
        dir,
        busybox,
    })
}

/// `mvm load` + `mvm push` of the OCI layout `layout` as `reference`, from a store in `dir`.
pub fn push_layout(dir: &Path, layout: &Path, reference: &str) {
    let builder = dir.join("builder");
    for args in [
        vec![
            "load",
            "-i",
            layout.to_str().expect("utf-8"),
            "-t",
            reference,
        ],
        vec!["push", "-q", reference],
    ] {
        let o = Command::new(MVM)
            .arg("--root")
            .arg(&builder)
            .args(&args)
            .output()
            .expect("run mvm");
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    }
}

/// A test's VM prerequisites, a registry with busybox, the boot lock and the user's `--root`.
pub struct Setup {
    /// Kernel, its arguments and the agent.
    pub vm: &'static VmParts,
    /// The registry.
    pub reg: Published,
    /// One guest boot at a time (unless the test runs several on purpose).
    pub one: Option<MutexGuard<'static, ()>>,
    /// The `--root` of the test's runs.
    pub root: PathBuf,
}

/// The setup, or None (with the reason printed) where a VM cannot run here.
pub fn setup() -> Option<Setup> {
    let vm = vm()?;
    let reg = published_busybox()?;
    let root = reg.dir.path().join("user");
    Some(Setup {
        vm,
        reg,
        one: Some(boot_lock()),
        root,
    })
}

/// `mvm --root ROOT ARGS...` with the test's agent and trace marker.
pub fn mvm_cmd(vm: &VmParts, root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(MVM);
    cmd.arg("--root")
        .arg(root)
        .args(args)
        .env("MVM_AGENT", &vm.agent)
        .env(TRACE_ENV, root);
    cmd
}

/// `mvm --root ROOT ARGS...`, waited for.
pub fn mvm(vm: &VmParts, root: &Path, args: &[&str]) -> Output {
    mvm_cmd(vm, root, args).output().expect("run mvm")
}

/// `mvm run` of a microVM with the test kernel: `mvm --root ROOT run --kernel K --kernel-args
/// A ARGS...` (as a command, to spawn or wait for).
pub fn run_cmd(vm: &VmParts, root: &Path, args: &[&str]) -> Command {
    let mut cmd = mvm_cmd(vm, root, &["run", "--kernel"]);
    cmd.arg(&vm.kernel)
        .args(["--kernel-args", &vm.kernel_args])
        .args(args);
    cmd
}

/// What a run may leave behind on the host, to compare before and after: the passt processes
/// this test's mvm started, taps, mounts under the test's root, the VMM cgroups of its records.
#[derive(Debug, PartialEq)]
pub struct HostTraces {
    /// passt processes carrying the test's trace marker.
    pub passt: Vec<u32>,
    /// mvm's taps on the host.
    pub taps: Vec<String>,
    /// Mounts under the root.
    pub mounts: usize,
    /// VMM processes (mvm carrying the trace marker that hold a VM).
    pub vmms: Vec<u32>,
}

/// The host traces of runs under `root` now.
pub fn host_traces(root: &Path) -> HostTraces {
    HostTraces {
        passt: traced_processes(root, "passt"),
        taps: taps(root),
        mounts: mounts_under(root),
        vmms: traced_processes(root, "mvm")
            .into_iter()
            .filter(|p| holds_a_vm(*p))
            .collect(),
    }
}

/// Whether process `pid` holds a KVM VM.
pub fn holds_a_vm(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().contains("kvm-vm"))
        })
    })
}

/// Waits (up to 15 s: passt and the VMM end a moment after their runner) until nothing of the
/// test's runs is left beyond `before`, then asserts it, and that no socket, disk or run
/// directory is left under the root.
pub fn assert_nothing_left(root: &Path, before: &HostTraces) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while host_traces(root) != *before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(&host_traces(root), before);
    assert_eq!(leftovers(root), Vec::<PathBuf>::new());
}

/// Sockets, disks, console logs and run directories left under the mvm root (the image store,
/// caches and VM templates are meant to stay).
pub fn leftovers(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ft) = e.file_type() else { continue };
            let kept = p.starts_with(root.join("images")) || p.starts_with(root.join("templates"));
            if ft.is_dir() && !kept {
                if p.parent() == Some(&*root.join("containers")) {
                    found.push(p.clone());
                }
                stack.push(p);
            } else if ft.is_socket()
                || name.ends_with(".sock")
                || name == "rootfs.ext4"
                || name == "console.log"
                || name.starts_with("volume-")
            {
                found.push(p);
            }
        }
    }
    found
}

/// The one container directory under `root` (panics unless there is exactly one).
pub fn only_container_dir(root: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(root.join("containers"))
        .expect("containers")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// Reads stdout of `child` until a line equal to `want`; panics after `limit`.
pub fn wait_for_line(out: &mut impl std::io::BufRead, want: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        if out.read_line(&mut line).expect("read") == 0 {
            panic!("output ended before {want:?}");
        }
        if line.trim_end() == want {
            return;
        }
    }
    panic!("no {want:?} within {limit:?}");
}

/// The children of `parent` (from /proc).
pub fn children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// The field `key` of `/proc/PID/task/TID/status` lines, for every thread of `pid`:
/// (thread name, value).
pub fn thread_status(pid: u32, key: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task")
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or_default()
            .trim()
            .to_string();
        if let Some(v) = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
        {
            out.push((name, v.trim().to_string()));
        }
    }
    out
}

/// Asserts that process `pid` is a VMM in its jail: every thread filtered by seccomp, not
/// root, no capability, no_new_privs, and namespaces (user, pid, mount, ipc) and a root of its
/// own. Returns its thread names.
pub fn assert_confined(pid: u32) -> Vec<String> {
    let threads = thread_status(pid, "Seccomp");
    assert!(threads.len() >= 2, "{threads:?}");
    for (name, v) in &threads {
        assert_eq!(v, "2", "thread {name} of the VMM has no seccomp filter");
    }
    for (name, uids) in thread_status(pid, "Uid") {
        assert!(
            uids.split_whitespace().all(|u| u != "0"),
            "thread {name} runs as uid {uids}"
        );
    }
    for key in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        for (name, caps) in thread_status(pid, key) {
            assert_eq!(caps, "0000000000000000", "{key} of thread {name}");
        }
    }
    for (name, nnp) in thread_status(pid, "NoNewPrivs") {
        assert_eq!(nnp, "1", "no_new_privs of thread {name}");
    }
    for ns in ["user", "pid", "mnt", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("ns");
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns");
        assert_ne!(
            theirs, ours,
            "the VMM shares the {ns} namespace with the host"
        );
    }
    // Its root is the jail's tmpfs, holding only what it uses (the run's directory).
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let root_line = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    assert!(root_line.contains(" - tmpfs mvm-jail "), "{root_line}");
    assert!(mounts.lines().count() <= 4, "{mounts}");
    threads.into_iter().map(|(n, _)| n).collect()
}

/// The gateway of the host's default route: with `--network user` (passt) the guest reaches the
/// host's loopback through it.
pub fn host_gateway() -> Option<String> {
    let out = Command::new("ip")
        .args(["-4", "route", "show", "default"])
        .output()
        .ok()?;
    text(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "via")
        .nth(1)
        .map(str::to_string)
}
