//! A container in a microVM as a person uses it, typed into a real terminal (a tmux pane): `mvm
//! run -it --rm --image busybox sh` gives a prompt, `stty size` matches the pane and follows a
//! resize, Ctrl-C interrupts `sleep` and the shell stays, `exit 5` makes mvm exit 5 and the
//! terminal is as it was; the same with `exec -it` into a `-d` container, whose shell the detach
//! keys leave running, and with `attach` to that container's own shell. Around that container:
//! `cp` both ways (a tree with a link, an executable and a nested directory; a link out of the
//! container is not followed), `stats` (memory within 10% of what it allocated), `top`, and a
//! name served by a DNS server this test starts on the host (Debian's dnsmasq), resolved with
//! `--network user` (the guest's queries leave from the host, through passt).
//!
//! A container that fails boots again as its `--restart on-failure:1` says (twice in all).
//!
//! Four boots, one at a time (tens of seconds each on this host, where every guest system call
//! is emulated: the deadlines are generous). The tests skip with a reason without /dev/kvm,
//! root, the test kernel, the static guest agent, tmux or Debian's package lists.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
#[path = "common/registry.rs"]
mod registry_server;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::tmux::{Tmux, HOST_PROMPT};
use common::vm::{boot_lock, text, vm_parts, VmParts, TRACE_ENV};
use registry_server::busybox_layout;

const MVM: &str = env!("CARGO_BIN_EXE_mvm");

/// A boot on this host: the guest kernel's mode is emulated.
const BOOT: Duration = Duration::from_secs(600);
/// One command typed in the guest (a fork and exec take about a second here, more under load).
const STEP: Duration = Duration::from_secs(180);

/// A root with the busybox example loaded as `busybox`, the VM's parts and a script that runs
/// `mvm run` with them (what the pane types).
struct Setup {
    vm: VmParts,
    dir: tempfile::TempDir,
    root: PathBuf,
    /// `mvm-run ARGS...`: `mvm --root ROOT run --kernel K --kernel-args A ARGS...`.
    run: PathBuf,
}

impl Setup {
    fn new() -> Option<Setup> {
        let vm = match vm_parts() {
            Ok(vm) => vm,
            Err(why) => {
                eprintln!("skipping: {why}");
                return None;
            }
        };
        let layout = busybox_layout()?;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let s = Setup {
            run: dir.path().join("mvm-run"),
            vm,
            dir,
            root,
        };
        let out = s.mvm(&["load", "-i", layout.to_str().unwrap(), "-t", "busybox"]);
        assert!(out.status.success(), "load: {}", text(&out.stderr));
        let script = format!(
            "#!/bin/sh\nexec env MVM_AGENT='{}' {}='{}' '{MVM}' --root '{}' run --kernel '{}' --kernel-args '{}' \"$@\"\n",
            s.vm.agent.display(),
            TRACE_ENV,
            s.root.display(),
            s.root.display(),
            s.vm.kernel.display(),
            s.vm.kernel_args
        );
        std::fs::write(&s.run, script).unwrap();
        std::fs::set_permissions(&s.run, std::fs::Permissions::from_mode(0o755)).unwrap();
        Some(s)
    }

    fn mvm(&self, args: &[&str]) -> Output {
        Command::new(MVM)
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .env("MVM_AGENT", &self.vm.agent)
            .env(TRACE_ENV, &self.root)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.mvm(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    fn top(&self, name: &str) -> String {
        text(&self.mvm(&["top", name]).stdout)
    }
}

impl Drop for Setup {
    /// What a failed test left running under its root ends with it.
    fn drop(&mut self) {
        let marker = format!("{TRACE_ENV}={}", self.root.display());
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.trim() == "mvm" && env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()) {
                // SAFETY: kill has no memory preconditions; the pid is an mvm of this test.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// The pane's `stty -g`, read through a marker line.
fn settings(t: &Tmux, tag: &str) -> String {
    t.type_line(&format!("echo {tag}=$(stty -g)"));
    let screen = t.wait_for(tag, STEP, |s| {
        s.lines().any(|l| l.starts_with(&format!("{tag}=")))
    });
    screen
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{tag}=")))
        .unwrap()
        .trim()
        .to_string()
}

/// Size, resize, Ctrl-C, then `exit 5`, in a container shell at its prompt in `t`.
fn shell_session(t: &Tmux, top: &dyn Fn() -> String) {
    t.type_line("echo size=$(stty size)");
    t.wait_line("size=24 80", STEP);
    t.resize(100, 30);
    t.type_line("echo size=$(stty size)");
    t.wait_line("size=30 100", STEP);
    t.type_line("sleep 777");
    let deadline = Instant::now() + STEP;
    while !top().contains("sleep 777") {
        assert!(Instant::now() < deadline, "sleep never ran");
        std::thread::sleep(Duration::from_millis(500));
    }
    t.keys(&["C-c"]);
    t.type_line("echo int=$?");
    t.wait_line("int=130", STEP);
    t.type_line("exit 5");
}

/// mvm's exit code and the terminal as it was, once the host shell has its prompt back.
fn after_exit(t: &Tmux, before: &str, code: i32) {
    t.wait_for("the host prompt", STEP, |s| {
        s.trim_end().ends_with(HOST_PROMPT.trim_end())
    });
    t.type_line("echo rc=$?");
    t.wait_line(&format!("rc={code}"), STEP);
    assert_eq!(
        settings(t, "after"),
        before,
        "the terminal was left changed"
    );
}

fn prompt(t: &Tmux, limit: Duration) {
    t.wait_for("the container's prompt", limit, |s| {
        s.lines().any(|l| l.starts_with("/ # "))
    });
}

#[test]
fn run_it_in_a_microvm_is_a_terminal_that_follows_the_users() {
    let Some(s) = Setup::new() else { return };
    let Some(t) = Tmux::start(s.dir.path(), 80, 24) else {
        return;
    };
    let _one = boot_lock();
    let before = settings(&t, "before");
    t.type_line(&format!(
        "{} -it --rm --name shell --image busybox sh",
        s.run.display()
    ));
    prompt(&t, BOOT);
    shell_session(&t, &|| s.top("shell"));
    after_exit(&t, &before, 5);
    assert!(!s.root.join("containers/shell").exists(), "--rm left it");
}

/// dnsmasq serving one name on an address of this host's own (added to `lo` for the test, in
/// the range kept for tests: the guest is given the host's main address, so it would be talking
/// to itself there), which the guest reaches through passt; or None with the reason printed.
struct Dnsmasq {
    child: Child,
    addr: String,
    added: bool,
}

impl Dnsmasq {
    const NAME: &'static str = "mvm-dns-test.example";
    const ADDR: &'static str = "10.11.12.13";

    fn start(dir: &Path) -> Option<Dnsmasq> {
        let table = std::fs::read_to_string("/proc/net/route").ok()?;
        if engine::hostnet::default_route(&table).is_none() {
            eprintln!("skipping the DNS check: this host has no default route for passt");
            return None;
        }
        let addr = "198.18.53.53";
        let ip = Command::new("ip")
            .args(["addr", "add", &format!("{addr}/32"), "dev", "lo"])
            .output();
        let added = match ip {
            Ok(o) if o.status.success() => true,
            Ok(o) if text(&o.stderr).contains("already assigned") => false,
            Ok(o) => {
                eprintln!(
                    "skipping the DNS check: ip addr add {addr}: {}",
                    text(&o.stderr)
                );
                return None;
            }
            Err(e) => {
                eprintln!("skipping the DNS check: no ip command ({e})");
                return None;
            }
        };
        let log = dir.join("dnsmasq.log");
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--port=53",
                &format!("--listen-address={addr}"),
                &format!("--host-record={},{}", Self::NAME, Self::ADDR),
                "--log-queries",
                &format!("--log-facility={}", log.display()),
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipping the DNS check: no dnsmasq ({e}; scripts/deps.sh installs it)");
                return None;
            }
        };
        std::thread::sleep(Duration::from_millis(500));
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            eprintln!("skipping the DNS check: dnsmasq on {addr}:53 {status}: {err}");
            return None;
        }
        Some(Dnsmasq {
            child,
            addr: addr.to_string(),
            added,
        })
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.added {
            let _ = Command::new("ip")
                .args(["addr", "del", &format!("{}/32", self.addr), "dev", "lo"])
                .output();
        }
    }
}

fn tree(at: &Path) {
    std::fs::create_dir_all(at.join("nested/deeper")).unwrap();
    std::fs::write(at.join("nested/deeper/data.txt"), b"deep data\n").unwrap();
    std::fs::write(at.join("tool.sh"), b"#!/bin/sh\necho tool ran\n").unwrap();
    std::fs::set_permissions(at.join("tool.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("nested/deeper/data.txt", at.join("link")).unwrap();
}

#[test]
fn a_detached_microvm_container_takes_exec_it_cp_stats_top_and_dns() {
    let Some(s) = Setup::new() else { return };
    let Some(t) = Tmux::start(s.dir.path(), 80, 24) else {
        return;
    };
    let _one = boot_lock();
    let dns = Dnsmasq::start(s.dir.path());
    let mut flags = vec!["-d", "-it", "--name", "box", "--mem", "256M"];
    if let Some(d) = &dns {
        flags.extend(["--network", "user", "--dns", &d.addr]);
    } else {
        flags.extend(["--network", "none"]);
    }
    flags.extend(["--image", "busybox", "sh"]);
    let started = Instant::now();
    let out = Command::new(&s.run).args(&flags).output().unwrap();
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    eprintln!("the container ran after {:?}", started.elapsed());

    // exec -it: the same terminal as run -it.
    let before = settings(&t, "before");
    let exec = format!("{MVM} --root {} exec -it box sh", s.root.display());
    t.type_line(&exec);
    prompt(&t, STEP);
    shell_session(&t, &|| s.top("box"));
    after_exit(&t, &before, 5);
    // The detach keys leave the exec'd shell running; mvm says so and exits 1, as docker.
    t.resize(80, 24);
    t.type_line(&exec);
    t.type_line("echo second-shell");
    t.wait_line("second-shell", STEP);
    t.keys(&["C-p", "C-q"]);
    t.wait_for("detaching", STEP, |sc| sc.contains("read escape sequence"));
    after_exit(&t, &before, 1);
    let procs = s.top("box");
    assert_eq!(
        procs.lines().filter(|l| l.ends_with(" sh")).count(),
        2,
        "the container's shell and the detached one: {procs}"
    );

    // attach: the container's own shell on this terminal; the detach keys leave it running.
    t.type_line(&format!("{MVM} --root {} attach box", s.root.display()));
    t.type_line("echo attached-$((6*7))");
    t.wait_line("attached-42", STEP);
    t.keys(&["C-p", "C-q"]);
    t.wait_for("detaching from attach", STEP, |sc| {
        sc.matches("read escape sequence").count() == 2
    });
    t.type_line("echo attach-rc=$?");
    t.wait_line("attach-rc=1", STEP);
    assert_eq!(
        settings(&t, "after-attach"),
        before,
        "attach left the terminal changed"
    );
    assert!(
        s.top("box").lines().any(|l| l.ends_with(" sh")),
        "attach ended the shell"
    );

    // cp both ways.
    let src = s.dir.path().join("src");
    tree(&src);
    s.ok(&["cp", src.to_str().unwrap(), "box:/copied"]);
    let inside = s.ok(&[
        "exec",
        "box",
        "sh",
        "-c",
        "/copied/tool.sh; cat /copied/link; mkdir /esc; ln -s /tmp /esc/abs",
    ]);
    assert_eq!(inside, "tool ran\ndeep data\n");
    let back = s.dir.path().join("back");
    s.ok(&["cp", "box:/copied", back.to_str().unwrap()]);
    for f in ["tool.sh", "link", "nested/deeper/data.txt"] {
        let (a, b) = (src.join(f), back.join(f));
        assert_eq!(
            std::fs::symlink_metadata(&a).unwrap().permissions(),
            std::fs::symlink_metadata(&b).unwrap().permissions(),
            "{f}"
        );
    }
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        Path::new("nested/deeper/data.txt")
    );
    assert_eq!(
        std::fs::read(back.join("nested/deeper/data.txt")).unwrap(),
        b"deep data\n"
    );
    // A link inside the VM is the VM's own: copying through it stays in the container.
    let out = s.mvm(&["cp", src.join("tool.sh").to_str().unwrap(), "box:/esc/abs/"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        s.ok(&["exec", "box", "cat", "/tmp/tool.sh"]),
        "#!/bin/sh\necho tool ran\n"
    );
    let out = s.mvm(&["cp", src.to_str().unwrap(), "box:/nowhere/at/all"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no such directory"),
        "{}",
        text(&out.stderr)
    );

    // stats: 48 MiB in the container's /dev/shm are its memory.
    s.ok(&[
        "exec",
        "box",
        "sh",
        "-c",
        "dd if=/dev/zero of=/dev/shm/blob bs=1M count=48 2>/dev/null",
    ]);
    let json = s.ok(&["stats", "--no-stream", "--format", "json", "box"]);
    let st: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let used = st["memory_bytes"].as_f64().unwrap();
    let allocated = f64::from(48u32 << 20);
    assert!(
        (used - allocated).abs() <= allocated * 0.1,
        "stats shows {used} bytes for {allocated} allocated: {json}"
    );
    assert!(st["block_read_bytes"].as_u64().unwrap() > 0, "{json}");
    let top = s.top("box");
    assert!(
        top.starts_with("UID") && top.lines().any(|l| l.ends_with(" sh")),
        "{top}"
    );

    if let Some(d) = &dns {
        let out = s.mvm(&["exec", "box", "nslookup", "-type=a", Dnsmasq::NAME]);
        let answer = text(&out.stdout);
        assert!(
            answer.contains(&format!("Address: {}", Dnsmasq::ADDR)),
            "{answer}{}; dnsmasq: {}",
            text(&out.stderr),
            std::fs::read_to_string(s.dir.path().join("dnsmasq.log")).unwrap_or_default()
        );
        let resolv = s.ok(&["exec", "box", "cat", "/etc/resolv.conf"]);
        assert!(
            resolv.contains(&format!("nameserver {}", d.addr)),
            "{resolv}"
        );
    }
    s.ok(&["rm", "-f", "box"]);
}

#[test]
fn a_failing_microvm_container_boots_again_as_its_restart_policy_says() {
    let Some(s) = Setup::new() else { return };
    let _one = boot_lock();
    let started = Instant::now();
    let out = Command::new(&s.run)
        .args([
            "-d",
            "--name",
            "flaky",
            "--network",
            "none",
            "--restart",
            "on-failure:1",
            "--image",
            "busybox",
            "sh",
            "-c",
            "echo booted; exit 3",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    assert_eq!(s.ok(&["wait", "flaky"]).trim(), "3");
    eprintln!("two boots took {:?}", started.elapsed());
    let r: serde_json::Value = serde_json::from_str(&s.ok(&["inspect", "flaky"])).unwrap();
    assert_eq!(
        (&r["status"], &r["exit_code"], &r["restart_count"]),
        (&"exited".into(), &3.into(), &1.into()),
        "{r}"
    );
    assert_eq!(s.ok(&["logs", "flaky"]), "booted\nbooted\n");
    s.ok(&["rm", "flaky"]);
}
