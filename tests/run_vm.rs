//! `mvm run` in a microVM, in the foreground, as a CI system uses it: an image pushed to a real
//! registry (Debian's `docker-registry` on 127.0.0.1) runs in its own VM with the Linux test
//! kernel, its output streams to mvm's stdout and mvm exits with the command's exit code; the
//! flags reach the container; `--timeout` ends a command that runs too long with 124; and every
//! run leaves nothing behind (run directories, sockets, mounts, taps, passt processes).
//!
//! Each boot takes tens of seconds on this host (guest kernel mode is emulated), so the boots
//! run one at a time and the tests are few. They skip with a reason without /dev/kvm, root, the
//! test kernel, the static guest agent or Debian's package lists.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
#[path = "common/registry.rs"]
mod registry_server;

#[path = "common/runs.rs"]
mod runs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::vm::{text, VmParts, TRACE_ENV};
use runs::{
    assert_nothing_left, host_traces, leftovers, push_layout, setup, vm, Published, Setup, MVM,
};

/// Runs `mvm --root ROOT run --isolation vm --kernel K --kernel-args A ARGS...`.
fn run_vm(vm: &VmParts, root: &Path, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(MVM)
        .arg("--root")
        .arg(root)
        .args(["run", "--isolation", "vm", "--kernel"])
        .arg(&vm.kernel)
        .args(["--kernel-args", &vm.kernel_args])
        .args(args)
        .env("MVM_AGENT", &vm.agent)
        .env(TRACE_ENV, root)
        .output()
        .unwrap();
    (out, started.elapsed())
}

/// The gateway of the host's default route: with `--network user` (passt) the guest reaches the
/// host's loopback through it.
fn host_gateway() -> Option<String> {
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

/// Serves one HTTP request on 127.0.0.1 with `body`; returns the port.
fn serve_once(body: &'static str) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn run_image_in_a_microvm_prints_its_output_and_exits_with_its_code() {
    let Some(Setup {
        vm,
        reg,
        one: _one,
        root,
    }) = setup()
    else {
        return;
    };
    let before = host_traces(&root);
    // The default network is rootless user networking (passt): the guest reaches a server on
    // the host's loopback through the gateway address.
    let fetch = match host_gateway() {
        Some(gw) => format!(
            "wget -q -O- http://{gw}:{}/; echo",
            serve_once("from the host")
        ),
        None => {
            eprintln!("no IPv4 default route here: not checking the user network");
            "echo from the host".to_string()
        }
    };
    let (out, took) = run_vm(
        vm,
        &root,
        &[
            "--rm",
            "--image",
            &reg.busybox,
            "--",
            "sh",
            "-c",
            &format!(
                "echo hi; echo oops >&2; {fetch}; \
                 grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; exit 3"
            ),
        ],
    );
    let stderr = text(&out.stderr);
    eprintln!("run took {took:?}");
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    // The container in the VM gets docker's posture, as on the host.
    assert_eq!(
        text(&out.stdout),
        "hi\nfrom the host\nCapEff:\t00000000a80425fb\nNoNewPrivs:\t0\nSeccomp:\t2\n"
    );
    assert!(stderr.contains("oops"), "{stderr}");
    assert_nothing_left(&root, &before);
}

#[test]
fn run_in_a_microvm_applies_env_workdir_hostname_memory_and_volumes() {
    let Some(Setup {
        vm,
        reg,
        one: _one,
        root,
    }) = setup()
    else {
        return;
    };
    let shared = reg.dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("input.txt"), "from the host\n").unwrap();
    let scratch = reg.dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let volume_ro = format!("{}:/data:ro", shared.display());
    let volume_rw = format!("{}:/scratch", scratch.display());
    let (out, _) = run_vm(
        vm,
        &root,
        &[
            "--rm",
            "--mem",
            "192M",
            "-e",
            "GREETING=from the guest",
            "-w",
            "/srv/work",
            "--hostname",
            "sandbox",
            "--network",
            "none",
            "-v",
            &volume_ro,
            "-v",
            &volume_rw,
            "--image",
            &reg.busybox,
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\"; pwd; hostname; grep MemTotal /proc/meminfo; \
             touch /new-file && echo writable; uname -r; cat /data/input.txt; \
             touch /data/x 2>/dev/null && echo data-rw || echo data-ro; \
             echo guest > /scratch/out && cat /scratch/out",
        ],
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..3], ["from the guest", "/srv/work", "sandbox"]);
    // The guest kernel sees about the VM's memory (minus what the kernel reserves), not the host's.
    let kib: u64 = lines[3].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((100_000..=196_608).contains(&kib), "MemTotal {kib} kB");
    // The root is an overlay over the read-only image disk: writes work.
    assert_eq!(lines[4], "writable");
    // It runs on the guest kernel, not the host's.
    let host_release = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
    assert_ne!(lines[5], host_release.trim());
    // Volumes are copies on disk images: visible, read-only when asked, writable otherwise,
    // and never a live share (the host directories are unchanged).
    assert_eq!(lines[6..], ["from the host", "data-ro", "guest"]);
    assert!(!shared.join("x").exists());
    assert!(!scratch.join("out").exists());
    assert_eq!(leftovers(&root), Vec::<PathBuf>::new());
}

#[test]
fn run_in_a_microvm_with_timeout_stops_a_long_command_with_124() {
    let Some(Setup {
        vm,
        reg,
        one: _one,
        root,
    }) = setup()
    else {
        return;
    };
    let before = host_traces(&root);
    let (out, took) = run_vm(
        vm,
        &root,
        &[
            "--rm",
            "--timeout",
            "5s",
            "--image",
            &reg.busybox,
            "--",
            "sh",
            "-c",
            "echo started; sleep 1000",
        ],
    );
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "started\n");
    // Boot (tens of seconds here) plus the 5 s limit, far from the 1000 s sleep.
    assert!(took < Duration::from_secs(400), "took {took:?}");
    assert_nothing_left(&root, &before);
}

#[test]
fn run_in_a_microvm_whose_kernel_dies_fails_fast_with_one_line() {
    let Some(vm) = vm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    // A "kernel" that executes an undefined instruction with no IDT: a triple fault.
    let kernel = common::guest_file(dir.path(), "dies.elf", &[0x0f, 0x0b]);
    let root = dir.path().join("root");
    let started = Instant::now();
    let out = Command::new(MVM)
        .arg("--root")
        .arg(&root)
        .args([
            "run",
            "--isolation",
            "vm",
            "--rm",
            "--network",
            "none",
            "--kernel",
        ])
        .arg(&kernel)
        .arg("--rootfs")
        .arg(&rootfs)
        .args(["--", "/bin/true"])
        .env("MVM_AGENT", &vm.agent)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("mvm: "), "{stderr}");
    assert!(stderr.contains("triple fault"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(leftovers(&root), Vec::<PathBuf>::new());
}

#[test]
fn run_in_a_microvm_without_a_kernel_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let root = dir.path().join("root");
    let out = Command::new(MVM)
        .arg("--root")
        .arg(&root)
        .args([
            "run",
            "--isolation",
            "vm",
            "--kernel",
            "/nonexistent/vmlinux",
        ])
        .arg("--rootfs")
        .arg(&rootfs)
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/vmlinux"), "{stderr}");
    assert_eq!(leftovers(&root), Vec::<PathBuf>::new());
}

#[test]
fn ctrl_c_during_a_microvm_run_exits_130_and_leaves_nothing() {
    use std::io::BufRead;
    let Some(s) = setup() else { return };
    let before = host_traces(&s.root);
    let mut child = Command::new(MVM)
        .arg("--root")
        .arg(&s.root)
        .args(["run", "--rm", "--kernel"])
        .arg(&s.vm.kernel)
        .args(["--kernel-args", &s.vm.kernel_args])
        .args([
            "--image",
            &s.reg.busybox,
            "--",
            "sh",
            "-c",
            "echo started; sleep 1000",
        ])
        .env("MVM_AGENT", &s.vm.agent)
        .env(TRACE_ENV, &s.root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: sends SIGINT to the mvm process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert_nothing_left(&s.root, &before);
}

#[test]
fn run_with_bad_flags_fails_with_one_line_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    // Any file passes the kernel check; every case must fail before a VM is built.
    let kernel = common::guest_file(dir.path(), "never-booted.elf", common::RESET);
    let root = dir.path().join("root");
    let cases: [&[&str]; 9] = [
        &["-p", "99999:80"],
        &["-p", "8080"],
        &["--timeout", "1d"],
        &["--network", "bogus"],
        &["-v", "/nonexistent/dir:/data"],
        &["-v", "relative:/data"],
        &["--mem", "0"],
        &["--mem", "64T"],
        &["--cpus", "0"],
    ];
    for flags in cases {
        let out = Command::new(MVM)
            .arg("--root")
            .arg(&root)
            .args(["run", "--isolation", "vm", "--rm", "--kernel"])
            .arg(&kernel)
            .arg("--rootfs")
            .arg(&rootfs)
            .args(flags)
            .args(["--", "/bin/true"])
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{flags:?}: {stderr}");
        assert!(stderr.starts_with("mvm: "), "{flags:?}: {stderr}");
        assert_eq!(leftovers(&root), Vec::<PathBuf>::new(), "{flags:?}");
        let containers = std::fs::read_dir(root.join("containers"))
            .map(|d| d.flatten().filter(|e| e.file_name() != "names").count())
            .unwrap_or(0);
        assert_eq!(containers, 0, "{flags:?} left a container record");
    }
}

/// An image holding only `/probe`, `tests/linux/vsock_probe.rs` built static, pushed next to
/// busybox; returns its reference.
fn published_probe(reg: &Published) -> String {
    let dir = reg.dir.path();
    let probe = dir.join("vsock_probe");
    let out = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
        ])
        .args(["-C", "target-feature=+crt-static"])
        .args(["--target", "x86_64-unknown-linux-gnu", "-o"])
        .arg(&probe)
        .arg(common::kernel::repo_root().join("tests/linux/vsock_probe.rs"))
        .output()
        .unwrap();
    assert!(out.status.success(), "rustc: {}", text(&out.stderr));
    let layout = dir.join("probe-oci");
    let mut w = rootfs_builder::oci_writer::OciLayoutWriter::new(&layout).unwrap();
    w.add_layer_entries(&[rootfs_builder::oci_writer::LayerEntry::File(
        "probe".into(),
        0o755,
        std::fs::read(&probe).unwrap(),
    )])
    .unwrap();
    w.finish(&Default::default(), "latest").unwrap();
    let reference = reg.busybox.replace("/test/busybox", "/test/probe");
    push_layout(dir, &layout, &reference);
    reference
}

#[test]
fn a_container_in_a_microvm_cannot_reach_the_agent_through_vsock_loopback() {
    let Some(Setup {
        vm,
        reg,
        one: _one,
        root,
    }) = setup()
    else {
        return;
    };
    let image = published_probe(&reg);
    // CID 1 is vsock loopback, 3 the guest's own CID (mvm's GUEST_CID). The test kernel has
    // the loopback transport, so the connection is made; the agent must not answer it.
    let (out, took) = run_vm(
        vm,
        &root,
        &[
            "--rm",
            "--network",
            "none",
            "--image",
            &image,
            "--",
            "/probe",
            "1",
            "3",
        ],
    );
    let stdout = text(&out.stdout);
    eprintln!("run took {took:?}\n{stdout}");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("probe ")).collect();
    let tried: Vec<String> = lines
        .iter()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        tried,
        [
            "probe uid=0 cid=1",
            "probe uid=0 cid=3",
            "probe uid=65534 cid=1",
            "probe uid=65534 cid=3"
        ],
        "{stdout}"
    );
    for line in &lines {
        assert!(
            !line.contains("answered"),
            "the agent answered a container: {line}"
        );
    }
    assert_eq!(leftovers(&root), Vec::<PathBuf>::new());
}
