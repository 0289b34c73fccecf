//! Snapshots and templates of a Linux guest, as a user meets them:
//!
//! - `mvm boot --snapshot DIR --snapshot-on TEXT` saves a guest (tests/linux/snapshot_init.rs,
//!   which counts in memory and in a file) while it runs, and `mvm boot --restore DIR` goes on
//!   counting from where it was saved; a corrupted, truncated or foreign snapshot is refused
//!   with one line and a non-zero exit.
//! - `mvm run --rm --image busybox` makes a template on its first run and restores it on the
//!   next ones: the output and the exit code are the command's, two restored runs read
//!   different bytes from /dev/urandom, a damaged template is refused with one line and leaves
//!   nothing behind, and a template whose kernel changed is not used again.
//!
//! Each cold boot takes tens of seconds on a PVM host (guest kernel mode is emulated) and 5-15 s
//! on the emulated AMD-V host (scripts/test-vt.sh snapshot), so the boots run one at a time and
//! are few. The tests skip with a reason without /dev/kvm, root, the test kernel, the static
//! guest agent or Debian's package lists.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
#[path = "common/registry.rs"]
mod registry_server;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::kernel::{static_init, test_kernel};
use common::vm::{boot_lock, text, vm_parts, VmParts, TRACE_ENV};
use registry_server::busybox_layout;
use rootfs_builder::initramfs::Initramfs;

const MVM: &str = env!("CARGO_BIN_EXE_mvm");
/// Longest a boot to the point a test waits for may take (a loaded PVM host is slow).
const BOOT_LIMIT: Duration = Duration::from_secs(600);

/// CRC-32 (IEEE), as the state file's trailer.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A state file's bytes with its checksum made right again (after an edit of the body).
fn reseal(state: &mut [u8]) {
    let end = state.len() - 4;
    let crc = crc32(&state[..end]);
    state[end..].copy_from_slice(&crc.to_le_bytes());
}

/// The number after `key=` in `line`.
fn num(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The complete `MVM-SNAP` lines of a console: (tick, file).
fn ticks(console: &str) -> Vec<(u64, u64)> {
    console
        .lines()
        .filter_map(|l| l.split_once("MVM-SNAP ").map(|(_, rest)| rest))
        .filter(|rest| rest.contains(" time="))
        .filter_map(|rest| Some((num(rest, "tick")?, num(rest, "file")?)))
        .collect()
}

/// Kills `child` once `done(console)` holds or [`BOOT_LIMIT`] passed; its stderr.
fn run_until(mut child: Child, console: &Path, done: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    let mut finished = false;
    while started.elapsed() < BOOT_LIMIT {
        if done(&std::fs::read_to_string(console).unwrap_or_default()) {
            finished = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        finished,
        "the guest did not get there in time; console:\n{}\nstderr:\n{err}",
        std::fs::read_to_string(console).unwrap_or_default()
    );
    err
}

/// `mvm boot --restore DIR --rng` of a snapshot the test damaged: must fail with one line.
fn assert_refused(dir: &Path, expect: &str) {
    let out = Command::new(MVM)
        .args(["boot", "--rng", "--restore"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "restored a bad snapshot: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(expect), "{expect:?} not in: {err}");
}

#[test]
fn a_linux_guest_saved_while_it_runs_goes_on_counting_after_restore() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipping: no /dev/kvm on this host");
        return;
    }
    let (kernel, cmdline) = match test_kernel() {
        Ok(k) => k,
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let _one = boot_lock();
    let dir = tempfile::tempdir().unwrap();
    let init = static_init("snapshot_init.rs", &[]);
    let initrd = dir.path().join("initramfs.cpio");
    let mut cpio = Initramfs::new();
    cpio.host_file("init", 0o755, &init)
        .and_then(|c| c.char_dev("dev/console", 0o600, 5, 1))
        .unwrap();
    cpio.write_file(&initrd).unwrap();

    let snap = dir.path().join("snap");
    let console = dir.path().join("boot.log");
    let t0 = Instant::now();
    let out = Command::new(MVM)
        .arg("boot")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", &format!("{cmdline} tick_ms=200"), "--rng"])
        .arg("--serial-out")
        .arg(&console)
        .arg("--snapshot")
        .arg(&snap)
        .args(["--snapshot-on", "tick=3 "])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let saved_after = t0.elapsed();
    assert!(
        out.status.success(),
        "{}\nconsole:\n{}",
        text(&out.stderr),
        std::fs::read_to_string(&console).unwrap_or_default()
    );
    assert!(snap.join("state").is_file() && snap.join("memory").is_file());

    let restored_console = dir.path().join("restore.log");
    let t1 = Instant::now();
    let child = Command::new(MVM)
        .args(["boot", "--rng", "--restore"])
        .arg(&snap)
        .arg("--serial-out")
        .arg(&restored_console)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    run_until(child, &restored_console, |c| ticks(c).len() >= 2);
    let first_tick = t1.elapsed();
    let after = ticks(&std::fs::read_to_string(&restored_console).unwrap());
    let (tick, file) = after[0];
    assert!(
        (4..=8).contains(&tick) && file == tick,
        "the restored guest counts on from 3 in memory and in its file: {after:?}"
    );
    eprintln!(
        "booted and saved in {:.1} s; restored to its next tick in {:.2} s",
        saved_after.as_secs_f64(),
        first_tick.as_secs_f64()
    );

    // Damaged copies of the snapshot are refused, each with one line.
    let state_path = snap.join("state");
    let good = std::fs::read(&state_path).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x20;
    std::fs::write(&state_path, &flipped).unwrap();
    assert_refused(&snap, "corrupted or truncated");
    std::fs::write(&state_path, &good[..good.len() - 100]).unwrap();
    assert_refused(&snap, "corrupted or truncated");
    let mut format = good.clone();
    format[8..12].copy_from_slice(&99u32.to_le_bytes());
    reseal(&mut format);
    std::fs::write(&state_path, &format).unwrap();
    assert_refused(&snap, "snapshot format 99 cannot be read");
    // Another mvm's snapshot: its version replaced in place (same length, checksum redone).
    let key = b"\"mvm_version\":\"";
    let at = good.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    let len = good[at..].iter().position(|&b| b == b'"').unwrap();
    let other = format!("{:x<len$}", "0.0.0-other");
    assert_eq!(
        other.len(),
        len,
        "mvm's version is shorter than the test's stand-in"
    );
    let mut foreign = good.clone();
    foreign[at..at + len].copy_from_slice(other.as_bytes());
    reseal(&mut foreign);
    std::fs::write(&state_path, &foreign).unwrap();
    assert_refused(&snap, "snapshot was taken by mvm 0.0.0-other");
    std::fs::write(&state_path, &good).unwrap();
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory"))
        .unwrap();
    let len = memory.metadata().unwrap().len();
    memory.set_len(len - 4096).unwrap();
    assert_refused(&snap, "memory");
}

/// A `--root` with the busybox example loaded as `busybox`, and the kernel copied where the
/// test may change it.
struct Templates {
    vm: &'static VmParts,
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

impl Templates {
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `mvm ARGS` under this root, with the test's agent and trace marker.
    fn command(&self, args: &[&str], debug: bool) -> Command {
        let mut cmd = Command::new(MVM);
        cmd.arg("--root")
            .arg(self.root())
            .args(args)
            .env("MVM_AGENT", &self.vm.agent)
            .env(TRACE_ENV, self.root())
            .stdin(Stdio::null());
        if debug {
            cmd.env("MVM_LOG", "debug");
        } else {
            cmd.env_remove("MVM_LOG");
        }
        cmd
    }

    fn mvm(&self, args: &[&str], debug: bool) -> Output {
        self.command(args, debug).output().unwrap()
    }

    /// `mvm run --rm` of busybox with this test's kernel, running CMD.
    fn run_command(&self, cmd: &[&str], debug: bool) -> Command {
        let kernel = self.kernel.to_str().unwrap().to_string();
        let mut args = vec![
            "run",
            "--rm",
            "--kernel",
            &kernel,
            "--kernel-args",
            &self.vm.kernel_args,
            "--image",
            "busybox",
            "--",
        ];
        args.extend_from_slice(cmd);
        self.command(&args, debug)
    }

    /// `mvm run -d --cold --name NAME` of busybox running `sh -c SCRIPT`, asserted started.
    fn run_detached(&self, name: &str, script: &str) {
        let kernel = self.kernel.to_str().unwrap().to_string();
        let args = [
            "run",
            "-d",
            "--cold",
            "--name",
            name,
            "--kernel",
            &kernel,
            "--kernel-args",
            &self.vm.kernel_args,
            "--image",
            "busybox",
            "--",
            "sh",
            "-c",
            script,
        ];
        let out = self.mvm(&args, false);
        assert!(out.status.success(), "run -d {name}: {}", text(&out.stderr));
    }

    /// `mvm run --rm` of busybox printing hi and 16 random bytes, exiting 3.
    fn run(&self, debug: bool) -> (Output, Duration) {
        let t0 = Instant::now();
        let out = self
            .run_command(
                &[
                    "sh",
                    "-c",
                    "echo hi; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; exit 3",
                ],
                debug,
            )
            .output()
            .unwrap();
        (out, t0.elapsed())
    }

    /// The rows of `mvm template ls` (no header).
    fn templates(&self) -> Vec<String> {
        let out = self.mvm(&["template", "ls"], false);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .skip(1)
            .map(String::from)
            .collect()
    }

    /// Containers `ps -a` lists, and what is left under the templates directory but templates.
    fn leftovers(&self) -> (Vec<String>, Vec<String>) {
        let ps = self.mvm(&["ps", "-a"], false);
        let containers = text(&ps.stdout).lines().skip(1).map(String::from).collect();
        let half_made = std::fs::read_dir(self.root().join("templates"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".tmp-"))
                    .collect()
            })
            .unwrap_or_default();
        (containers, half_made)
    }
}

fn templates() -> Option<Templates> {
    static VM: OnceLock<Result<VmParts, String>> = OnceLock::new();
    let vm = match VM.get_or_init(vm_parts) {
        Ok(vm) => vm,
        Err(why) => {
            eprintln!("skipping: {why}");
            return None;
        }
    };
    let layout = busybox_layout()?;
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::copy(&vm.kernel, &kernel).unwrap();
    let t = Templates { vm, dir, kernel };
    let out = t.mvm(
        &["load", "-i", layout.to_str().unwrap(), "-t", "busybox"],
        false,
    );
    assert!(out.status.success(), "load: {}", text(&out.stderr));
    Some(t)
}

/// The run printed hi and its random bytes and exited 3; returns the bytes.
fn random_of(out: &Output) -> String {
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("hi"), "{stdout}");
    let hex = lines.next().unwrap_or_default().to_string();
    assert_eq!(hex.len(), 32, "{stdout}");
    hex
}

#[test]
fn run_restores_its_template_and_refuses_a_damaged_one() {
    let Some(t) = templates() else {
        return;
    };
    let _one = boot_lock();

    let (cold, cold_took) = t.run(false);
    let first = random_of(&cold);
    let listed = t.templates();
    assert_eq!(listed.len(), 1, "one template made: {listed:?}");
    assert!(listed[0].trim_end().ends_with("ok"), "{listed:?}");
    let id = listed[0].split_whitespace().next().unwrap().to_string();

    let (warm, warm_took) = t.run(true);
    let second = random_of(&warm);
    assert!(
        text(&warm.stderr).contains(&format!("template {id}: restored")),
        "the second run restores the template: {}",
        text(&warm.stderr)
    );
    let (again, again_took) = t.run(false);
    let third = random_of(&again);
    assert_ne!(
        second, third,
        "two restored runs read the same random bytes"
    );
    assert_ne!(first, second);
    eprintln!(
        "first run (cold boot, template made): {:.1} s; restored runs: {:.1} s, {:.1} s",
        cold_took.as_secs_f64(),
        warm_took.as_secs_f64(),
        again_took.as_secs_f64()
    );
    assert_eq!(t.leftovers(), (vec![], vec![]));

    // A damaged template is refused with one line, and the run leaves nothing.
    let dir = t.root().join("templates").join(&id);
    let state = dir.join("state");
    let good = std::fs::read(&state).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    std::fs::write(&state, &flipped).unwrap();
    let (bad, _) = t.run(false);
    let err = text(&bad.stderr);
    assert!(
        !bad.status.success() && bad.status.code() != Some(3),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("corrupted or truncated") && err.contains(&id),
        "{err}"
    );
    assert!(text(&bad.stdout).is_empty(), "{}", text(&bad.stdout));
    assert_eq!(t.leftovers(), (vec![], vec![]));
    std::fs::write(&state, &good).unwrap();
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory"))
        .unwrap();
    memory
        .set_len(memory.metadata().unwrap().len() / 2)
        .unwrap();
    let (cut, _) = t.run(false);
    let err = text(&cut.stderr);
    assert!(
        !cut.status.success() && cut.status.code() != Some(3),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(&id), "{err}");
    assert_eq!(t.leftovers(), (vec![], vec![]));

    // The kernel changes: the old template is not used (a new one is made, the old is stale).
    let kernel = std::fs::read(&t.kernel).unwrap();
    std::fs::remove_file(&t.kernel).unwrap();
    std::fs::write(&t.kernel, kernel).unwrap();
    let (changed, _) = t.run(true);
    random_of(&changed);
    assert!(
        !text(&changed.stderr).contains(&format!("template {id}")),
        "the template of the old kernel was used: {}",
        text(&changed.stderr)
    );
    let listed = t.templates();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let old = listed.iter().find(|l| l.starts_with(&id)).unwrap();
    assert!(old.trim_end().ends_with("stale"), "{listed:?}");
    assert_eq!(t.leftovers(), (vec![], vec![]));
}

#[test]
fn a_run_killed_while_its_template_is_made_leaves_no_template_behind() {
    let Some(t) = templates() else {
        return;
    };
    let _one = boot_lock();
    let _reaper = common::vm::Reaper(t.root());
    // The first run of this shape makes a template: SIGKILL it while the template's VM boots.
    let mut run = t
        .run_command(&["echo", "hi"], false)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let half_made = loop {
        let (_, half_made) = t.leftovers();
        if !half_made.is_empty() {
            break half_made;
        }
        assert!(
            run.try_wait().unwrap().is_none(),
            "the run ended before it began a template"
        );
        assert!(Instant::now() < deadline, "no template was begun");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Into the template VM's boot (the jailed VMM boots it; the run waits for it).
    std::thread::sleep(Duration::from_secs(1));
    run.kill().unwrap();
    run.wait().unwrap();
    drop(_reaper);

    // Nothing half-made is listed or restored; prune removes it, `rm -f` the killed run.
    assert!(t.templates().is_empty(), "{:?}", t.templates());
    let ids = t.mvm(&["ps", "-a", "-q"], false);
    for id in text(&ids.stdout).split_whitespace() {
        let out = t.mvm(&["rm", "-f", id], false);
        assert!(out.status.success(), "rm -f {id}: {}", text(&out.stderr));
    }
    let out = t.mvm(&["template", "prune"], false);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(t.leftovers(), (vec![], vec![]), "after {half_made:?}");
    // The next run makes the template afresh and runs.
    let (next, _) = t.run(false);
    random_of(&next);
    let listed = t.templates();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].trim_end().ends_with("ok"), "{listed:?}");
    assert_eq!(t.leftovers(), (vec![], vec![]));
}

#[test]
fn pause_stops_a_vm_container_and_unpause_lets_it_go_on() {
    let Some(t) = templates() else {
        return;
    };
    let _one = boot_lock();
    t.run_detached(
        "counter",
        "i=0; while true; do i=$((i+1)); echo $i; sleep 0.2; done",
    );
    let lines = || {
        text(&t.mvm(&["logs", "counter"], false).stdout)
            .lines()
            .count()
    };
    let wait_for_more = |than: usize| {
        let t0 = Instant::now();
        while lines() <= than {
            assert!(t0.elapsed() < BOOT_LIMIT, "the counter does not count");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // `ps` as docker's `--format json` reports it: State is "running" or "paused".
    let state = || {
        let ps = text(
            &t.mvm(&["ps", "-f", "name=counter", "--format", "json"], false)
                .stdout,
        );
        let row: serde_json::Value = serde_json::from_str(ps.trim()).unwrap_or_default();
        row["State"].as_str().unwrap_or_default().to_string()
    };
    wait_for_more(1);

    let out = t.mvm(&["pause", "counter"], false);
    assert!(out.status.success(), "pause: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "counter");
    assert_eq!(state(), "paused");
    let held = lines();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lines(), held, "a paused VM went on printing");
    let out = t.mvm(&["exec", "counter", "true"], false);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("is paused"), "{err}");
    let out = t.mvm(&["pause", "counter"], false);
    assert!(!out.status.success(), "paused twice");

    let out = t.mvm(&["unpause", "counter"], false);
    assert!(out.status.success(), "unpause: {}", text(&out.stderr));
    assert_eq!(state(), "running");
    wait_for_more(held);

    // A paused container still stops and is removed.
    let out = t.mvm(&["pause", "counter"], false);
    assert!(out.status.success(), "pause: {}", text(&out.stderr));
    let out = t.mvm(&["rm", "-f", "counter"], false);
    assert!(out.status.success(), "rm -f: {}", text(&out.stderr));
    assert_eq!(t.leftovers(), (vec![], vec![]));
}

/// The numbers a counter container printed (one per line), from `mvm logs`.
fn counted(t: &Templates, name: &str) -> Vec<u64> {
    text(&t.mvm(&["logs", name], false).stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Waits until container `name` printed a number above `than`; its numbers.
fn count_past(t: &Templates, name: &str, than: u64) -> Vec<u64> {
    let t0 = Instant::now();
    loop {
        let seen = counted(t, name);
        if seen.last().is_some_and(|n| *n > than) {
            return seen;
        }
        assert!(
            t0.elapsed() < BOOT_LIMIT,
            "{name} does not count past {than}: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `mvm exec NAME CMD...`: its stdout, after asserting it succeeded.
fn exec_out(t: &Templates, name: &str, cmd: &[&str]) -> String {
    let mut args = vec!["exec", name];
    args.extend_from_slice(cmd);
    let out = t.mvm(&args, false);
    assert!(
        out.status.success(),
        "exec {name} {cmd:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_string()
}

#[test]
fn forks_of_a_running_container_go_on_where_it_was_each_their_own() {
    let Some(t) = templates() else {
        return;
    };
    let _one = boot_lock();
    // A counter in the shell's memory and in a file of the container's writable layer.
    t.run_detached(
        "parent",
        "mkdir /www; echo parent > /www/index.html; httpd -p 80 -h /www; \
         i=0; while true; do i=$((i+1)); echo $i > /count; echo $i; sleep 0.3; done",
    );
    count_past(&t, "parent", 3);

    // A client that hands the VMM descriptors it cannot save into (a socket, a file open for
    // reading only) gets the reason, and the container runs on.
    let control = t.root().join("containers/parent/control.sock");
    let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let socket = std::fs::File::from(std::os::fd::OwnedFd::from(socket));
    let read_only = std::fs::File::open(&t.kernel).unwrap();
    let limit = Duration::from_secs(300);
    let refused = engine::control::snapshot(&control, &t.root(), &socket, &read_only, limit)
        .unwrap_err()
        .to_string();
    assert_eq!(refused.lines().count(), 1, "{refused}");
    let at = counted(&t, "parent").last().copied().unwrap();
    count_past(&t, "parent", at + 1);

    let out = t.mvm(&["snapshot", "create", "parent", "snap"], true);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "snap");
    let at = counted(&t, "parent").last().copied().unwrap();
    let ls = text(&t.mvm(&["snapshot", "ls"], false).stdout);
    assert!(
        ls.lines().nth(1).is_some_and(|l| l.starts_with("snap ")
            && l.contains("parent")
            && l.contains("busybox")),
        "{ls}"
    );
    // The parent runs on after its snapshot.
    count_past(&t, "parent", at + 2);

    let mut firsts = Vec::new();
    // fork1 publishes the parent's web server on a port of its own.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let publish = format!("127.0.0.1:{port}:80");
    for fork in ["fork1", "fork2"] {
        let mut args = vec!["run", "-d", "--from-snapshot", "snap", "--name", fork];
        if fork == "fork1" {
            args.extend(["-p", &publish]);
        }
        let out = t.mvm(&args, true);
        assert!(
            out.status.success(),
            "run --from-snapshot: {}",
            text(&out.stderr)
        );
        // Its counter goes on from where the parent's was when the snapshot was taken: the
        // numbers it prints follow on, without starting over.
        let seen = count_past(&t, fork, 2);
        let first = seen[0];
        assert!(
            first >= 4 && first <= at + 1,
            "{fork} started counting at {first} (the parent was at {at} after the snapshot): {seen:?}"
        );
        assert!(
            seen.windows(2).all(|w| w[1] == w[0] + 1),
            "{fork} counts one by one: {seen:?}"
        );
        let file: u64 = exec_out(&t, fork, &["cat", "/count"]).parse().unwrap();
        assert!(
            file >= first,
            "{fork}'s file says {file}, its count {seen:?}"
        );
        firsts.push(first);
    }
    assert_eq!(firsts[0], firsts[1], "both forks go on from one point");
    // Each has its own writable layer: what the parent writes now, no fork sees.
    exec_out(
        &t,
        "parent",
        &["sh", "-c", "echo changed > /www/index.html"],
    );
    let page = Command::new("curl")
        .args(["-sS", "-m", "30", &format!("http://127.0.0.1:{port}/")])
        .output()
        .unwrap();
    assert_eq!(
        text(&page.stdout).trim(),
        "parent",
        "fork1's server on its own port: {}",
        text(&page.stderr)
    );
    assert_eq!(exec_out(&t, "fork2", &["cat", "/www/index.html"]), "parent");
    let random = |name| {
        exec_out(
            &t,
            name,
            &["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"],
        )
    };
    assert_ne!(
        random("fork1"),
        random("fork2"),
        "two forks of one snapshot read the same random bytes"
    );
    let parent_now = counted(&t, "parent").last().copied().unwrap();
    let fork_now = counted(&t, "fork1").last().copied().unwrap();
    assert!(
        parent_now > at,
        "the parent's count went on ({parent_now}); fork1's is its own ({fork_now})"
    );

    // A `create` killed while the VMM writes leaves nothing listed, and the next one cleans up.
    let mut killed = t
        .command(&["snapshot", "create", "parent", "half"], false)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    killed.kill().unwrap();
    killed.wait().unwrap();
    let listed = || {
        text(&t.mvm(&["snapshot", "ls"], false).stdout)
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(listed(), ["snap"]);
    let out = t.mvm(&["snapshot", "create", "parent", "whole"], false);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    assert_eq!(listed(), ["snap", "whole"]);
    let tmp: Vec<String> = std::fs::read_dir(t.root().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(tmp.is_empty(), "a killed create's files are left: {tmp:?}");
    let out = t.mvm(&["snapshot", "rm", "whole"], false);
    assert!(out.status.success(), "{}", text(&out.stderr));

    for name in ["parent", "fork1", "fork2"] {
        let out = t.mvm(&["rm", "-f", name], false);
        assert!(out.status.success(), "rm -f {name}: {}", text(&out.stderr));
    }

    // A disk changed under the snapshot: refused with one line, nothing made.
    let info: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.root().join("snapshots/snap/snapshot.json")).unwrap(),
    )
    .unwrap();
    let disk = PathBuf::from(info["rootfs_disk"]["path"].as_str().unwrap());
    let disk_file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let mtime = disk_file.metadata().unwrap().modified().unwrap();
    disk_file
        .set_modified(mtime + Duration::from_secs(1))
        .unwrap();
    let out = t.mvm(&["run", "--rm", "--from-snapshot", "snap"], false);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("changed since the snapshot was taken"),
        "{err}"
    );
    disk_file.set_modified(mtime).unwrap();

    // A corrupted snapshot: one line, nothing left.
    let state = t.root().join("snapshots/snap/state");
    let good = std::fs::read(&state).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    std::fs::write(&state, &flipped).unwrap();
    let out = t.mvm(&["run", "--rm", "--from-snapshot", "snap"], false);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("corrupted or truncated") && err.contains("mvm snapshot rm snap"),
        "{err}"
    );
    assert_eq!(t.leftovers().0, Vec::<String>::new());

    let out = t.mvm(&["snapshot", "rm", "snap"], false);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ls = text(&t.mvm(&["snapshot", "ls"], false).stdout);
    assert_eq!(ls.lines().count(), 1, "{ls}");
}
