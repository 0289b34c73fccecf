//! `mvm-agent probe` run as a plain process on the host and inside a container made by the
//! project's own runtime, against host resources this test creates (a marker process, a secret
//! file, a loopback service, a kernel log line). The assertions are facts known without the
//! probe: root on the host reaches all of them; a container with its own PID and network
//! namespaces and its own root reaches none of them. Needs root; skips otherwise.
#![allow(clippy::unwrap_used)] // test helpers fail the test on any setup error

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use guest_agent::probe::escapes::NAMES;
use guest_agent::probe::{ProbeReport, ProbeResult, SeccompMode};
use guest_agent::runtime::{
    Container, ContainerSpec, Limits, Network, Process, Rootfs, StdioConfig, StdioMode,
};

const AGENT: &str = env!("CARGO_BIN_EXE_mvm-agent");
const MIB: u64 = 1 << 20;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn nonce(tag: &str) -> String {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    format!("mvm-probe-{tag}-{:016x}", u64::from_le_bytes(b))
}

/// The host resources the probe looks for, each identified by a nonce.
struct Host {
    dir: tempfile::TempDir,
    marker: Child,
    args: Vec<String>,
}

impl Host {
    fn start() -> Host {
        let dir = tempfile::tempdir().unwrap();
        // A marker process whose command line carries the nonce (as its argv[0]).
        let marker_nonce = nonce("marker");
        let marker = Command::new("sleep")
            .arg0(format!("marker-{marker_nonce}"))
            .arg("600")
            .spawn()
            .unwrap();
        // A root-only secret file.
        let secret_nonce = nonce("secret");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, &secret_nonce).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A service on the host's loopback that answers with its nonce.
        let loopback_nonce = nonce("loopback");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let answer = loopback_nonce.clone();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let _ = conn.write_all(answer.as_bytes());
            }
        });
        // A line in the host's kernel log.
        let kmsg_nonce = nonce("kmsg");
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/kmsg")
            .unwrap()
            .write_all(format!("mvm probe test {kmsg_nonce}\n").as_bytes())
            .unwrap();
        let mut args = vec![
            "--marker-cmdline".to_string(),
            marker_nonce,
            "--marker-pid".into(),
            marker.id().to_string(),
            "--secret-file".into(),
            secret.display().to_string(),
            "--secret".into(),
            secret_nonce,
            "--loopback-port".into(),
            port.to_string(),
            "--loopback-nonce".into(),
            loopback_nonce,
            "--kmsg-nonce".into(),
            kmsg_nonce,
            "--mem".into(),
            (64 * MIB).to_string(),
            "--pids".into(),
            "32".into(),
        ];
        if let Some((dev, size)) = root_disk() {
            args.extend(["--host-disk".into(), dev, "--host-disk-size".into(), size]);
        }
        Host { dir, marker, args }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.marker.kill();
        let _ = self.marker.wait();
    }
}

/// The block device holding the host's root filesystem, `MAJ:MIN`, and its size in bytes.
fn root_disk() -> Option<(String, String)> {
    let dev = std::fs::metadata("/").ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sectors: u64 = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some((format!("{major}:{minor}"), (sectors * 512).to_string()))
}

/// Whether this test can open the root disk's device node (`DEVNAME` in its uevent).
fn root_disk_opens() -> Option<bool> {
    let (dev, _) = root_disk()?;
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{dev}/uevent")).ok()?;
    let name = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
    Some(std::fs::File::open(format!("/dev/{name}")).is_ok())
}

fn status_field(name: &str) -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    guest_agent::probe::surface::status_field(&status, name).unwrap()
}

fn result(r: &ProbeReport, name: &str) -> ProbeResult {
    r.probes.iter().find(|p| p.name == name).unwrap().result
}

fn show(mode: &str, r: &ProbeReport) {
    eprintln!("--- {mode}");
    for p in &r.probes {
        eprintln!("{:24} {:8} {}", p.name, format!("{:?}", p.result), p.detail);
    }
    eprintln!("limits: {:?}", r.limits);
    eprintln!("cost: {:?}", r.cost);
}

fn run_as_process(host: &Host) -> ProbeReport {
    let out = Command::new(AGENT)
        .arg("probe")
        .args(&host.args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A root filesystem with the agent binary and the shared libraries it links (from `ldd`).
fn agent_rootfs(dir: &Path) -> Option<PathBuf> {
    let root = dir.join("rootfs");
    for d in ["bin", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let dst = root.join("bin/mvm-agent");
    // A hard link, not a copy: a copy's write descriptor can leak into a child another test
    // thread forks, and exec then fails with ETXTBSY.
    std::fs::hard_link(AGENT, &dst)
        .or_else(|_| std::fs::copy(AGENT, &dst).map(drop))
        .unwrap();
    let ldd = Command::new("ldd").arg(AGENT).output().ok()?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let target = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        // The file itself, not a symlink to it (which would dangle in the new root).
        let source = std::fs::canonicalize(lib).unwrap();
        std::fs::hard_link(&source, &target)
            .or_else(|_| std::fs::copy(&source, &target).map(drop))
            .unwrap();
    }
    Some(root)
}

fn run_in_container(host: &Host, root: &Path) -> (ProbeReport, bool) {
    let mut args = vec!["/bin/mvm-agent".to_string(), "probe".into()];
    args.extend(host.args.iter().cloned());
    let spec = ContainerSpec {
        id: format!("probe-test-{}", std::process::id()),
        rootfs: Rootfs::Dir {
            path: root.to_path_buf(),
            readonly: false,
        },
        process: Process {
            args,
            env: Vec::new(),
            cwd: "/".into(),
            user: None,
        },
        hostname: Some("probe-box".into()),
        limits: Limits {
            memory_bytes: Some(64 * MIB),
            cpus: None,
            pids_max: Some(32),
        },
        terminal: false,
        network: Network::None,
        init: false,
        cgroup_parent: None,
        mounts: Vec::new(),
        security: Default::default(),
        etc_files: Vec::new(),
    };
    let stdio = StdioConfig {
        stdin: StdioMode::Null,
        stdout: StdioMode::Piped,
        stderr: StdioMode::Piped,
        terminal: None,
    };
    let mut c = Container::start(&spec, &stdio).unwrap();
    let limited = c.cgroup().is_some();
    let mut out = Vec::new();
    c.take_stdout().unwrap().read_to_end(&mut out).unwrap();
    let mut err = String::new();
    c.take_stderr().unwrap().read_to_string(&mut err).unwrap();
    let exit = c.wait().unwrap();
    assert_eq!(exit.code, 0, "probe in the container failed: {err}");
    (serde_json::from_slice(&out).unwrap(), limited)
}

#[test]
fn probe_reaches_host_resources_as_a_process_but_not_from_a_container() {
    if !is_root() {
        eprintln!("skipping: needs root (a root-only secret, containers, the kernel log)");
        return;
    }
    let host = Host::start();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();

    // As a plain root process on the host.
    let p = run_as_process(&host);
    show("process", &p);
    let names: Vec<&str> = p.probes.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, NAMES);
    assert_eq!(p.visible.kernel, kernel.trim());
    assert_eq!(p.visible.boot_id.as_deref(), Some(boot_id.trim()));
    assert_eq!(p.visible.host_processes, Some(true));
    assert_ne!(p.visible.pid, 1);
    for name in [
        "see-host-process",
        "signal-host-process",
        "read-host-secret",
        "reach-host-loopback",
        "read-kernel-log",
    ] {
        assert_eq!(result(&p, name), ProbeResult::Allowed, "process: {name}");
    }
    if let Some(open) = root_disk_opens() {
        // Some hosts (this sandbox among them) refuse even root the raw disk.
        let want = if open {
            ProbeResult::Allowed
        } else {
            ProbeResult::Blocked
        };
        assert_eq!(result(&p, "open-host-disk"), want);
    }
    // The probe inherits this test's seccomp mode and, as root, its capabilities.
    let own_seccomp = guest_agent::probe::surface::parse_seccomp(&status_field("Seccomp"));
    assert_eq!(p.surface.seccomp, own_seccomp);
    if own_seccomp == Some(SeccompMode::Disabled) {
        assert_eq!(result(&p, "ptrace-host-process"), ProbeResult::Allowed);
    }
    assert_eq!(
        p.surface.capabilities.as_ref().map(|c| c.hex.as_str()),
        Some(status_field("CapEff").as_str())
    );
    assert_eq!(p.surface.user_namespace, Some(false));
    // No limits on the host: going past them works.
    assert_eq!(
        p.limits.memory.result,
        guest_agent::probe::LimitResult::NotEnforced
    );
    let cost = &p.cost;
    assert!(cost.errors.is_empty(), "{:?}", cost.errors);
    assert!(cost.cpu_loop_ns.is_some_and(|n| n > 0));
    assert!(cost.fork_exec_per_s.is_some_and(|n| n > 0.0));

    // Inside a container: own root, PID, network and UTS namespaces.
    let Some(root) = agent_rootfs(host.dir.path()) else {
        eprintln!("skipping the container half: no ldd");
        return;
    };
    let (c, limited) = run_in_container(&host, &root);
    show("container", &c);
    let names: Vec<&str> = c.probes.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, NAMES, "the same probes in every mode");
    assert_eq!(
        c.visible.kernel,
        kernel.trim(),
        "a container shares the kernel"
    );
    assert_eq!(c.visible.boot_id.as_deref(), Some(boot_id.trim()));
    assert_eq!(c.visible.hostname, "probe-box");
    assert_eq!(c.visible.pid, 1, "the probe is PID 1 of its PID namespace");
    assert_eq!(
        c.visible.interfaces.as_deref(),
        Some(&["lo".to_string()][..])
    );
    assert_eq!(c.visible.host_processes, Some(false));
    assert!(c.visible.processes < p.visible.processes);
    for name in [
        "see-host-process",
        "signal-host-process",
        "ptrace-host-process",
        "read-host-secret",
        "reach-host-loopback",
    ] {
        assert_eq!(result(&c, name), ProbeResult::Blocked, "container: {name}");
    }
    if limited {
        assert_eq!(
            c.limits.memory.result,
            guest_agent::probe::LimitResult::Enforced,
            "{}",
            c.limits.memory.detail
        );
    }
    let allowed = |r: &ProbeReport| {
        r.probes
            .iter()
            .filter(|x| x.result == ProbeResult::Allowed)
            .count()
    };
    assert!(allowed(&p) > allowed(&c), "process mode allows more");
}
