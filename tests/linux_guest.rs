//! `mvm boot` of a real Linux guest: kernel + initramfs whose `/init` is a tiny static Rust
//! program (tests/linux/init.rs) that prints what the guest sees and reboots.
//!
//! Kernel: `$MVM_TEST_KERNEL`, else the test kernel built (once, then cached) by
//! `<repo>/../shared/test-kernel/build.sh`, booted with the arguments in `shared/test-kernel/cmdline`.
//! Where no kernel can be had, or there is no /dev/kvm, the tests print why and skip.
//! Boots run one at a time (each is 15-30 s of emulated kernel work on a PVM host).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::kernel::{static_init, test_kernel};
use rootfs_builder::initramfs::Initramfs;

const MVM: &str = env!("CARGO_BIN_EXE_mvm");
/// mvm is killed (and the test fails) when a boot takes longer than this.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// The line /init prints first.
const MARKER: &str = "MVM-GUEST-INIT ";

/// Kernel, its command line and the initramfs, or why the tests cannot run here.
struct Guest {
    kernel: PathBuf,
    cmdline: String,
    initrd: PathBuf,
}

/// Boots are serialized; the guest is prepared once per test binary.
static BOOT_LOCK: Mutex<()> = Mutex::new(());
static GUEST: OnceLock<Result<Guest, String>> = OnceLock::new();

/// Compiles tests/linux/init.rs into a static binary and packs it as `/init` with
/// `/dev/console` and the mount points it needs.
fn build_initramfs() -> Result<PathBuf, String> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("linux-guest");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let init = static_init("init.rs", &[]);
    let mut cpio = Initramfs::new();
    cpio.host_file("init", 0o755, &init)
        .and_then(|c| c.char_dev("dev/console", 0o600, 5, 1))
        .and_then(|c| c.dir("sys", 0o555))
        .and_then(|c| c.dir("proc", 0o555))
        .map_err(|e| format!("initramfs: {e}"))?;
    let initrd = dir.join("initramfs.cpio");
    cpio.write_file(&initrd)
        .map_err(|e| format!("cannot write {}: {e}", initrd.display()))?;
    Ok(initrd)
}

/// The guest, or `None` after printing why the tests skip.
fn guest() -> Option<&'static Guest> {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipping: no /dev/kvm on this host");
        return None;
    }
    let guest = GUEST.get_or_init(|| {
        let (kernel, cmdline) = test_kernel()?;
        let initrd = build_initramfs()?;
        Ok(Guest {
            kernel,
            cmdline,
            initrd,
        })
    });
    match guest {
        Ok(g) => Some(g),
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

/// What one `mvm boot` did.
struct Boot {
    status: ExitStatus,
    console: String,
    stderr: String,
    /// From starting mvm to the marker line on the console.
    to_init: Option<Duration>,
    elapsed: Duration,
}

/// Runs `mvm boot` with the guest and `extra_cmdline`, killing it after [`BOOT_TIMEOUT`].
fn boot(guest: &Guest, cpus: u8, extra_cmdline: &str) -> Boot {
    let _one_at_a_time = BOOT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cmdline = format!("{} {extra_cmdline}", guest.cmdline);
    let started = Instant::now();
    let mut child = Command::new(MVM)
        .arg("boot")
        .arg("--kernel")
        .arg(&guest.kernel)
        .arg("--initrd")
        .arg(&guest.initrd)
        .args([
            "--cmdline",
            cmdline.trim(),
            "--mem",
            "256M",
            "--cpus",
            &cpus.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mvm");
    // Collects a pipe to its end, noting when the marker first shows up in it.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let (mut buf, mut chunk, mut seen) = (Vec::new(), [0u8; 4096], None);
            while let Ok(n @ 1..) = r.read(&mut chunk) {
                buf.extend_from_slice(&chunk[..n]);
                let tail = &buf[buf.len().saturating_sub(n + MARKER.len())..];
                if seen.is_none() && tail.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()) {
                    seen = Some(started.elapsed());
                }
            }
            (String::from_utf8_lossy(&buf).into_owned(), seen)
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for mvm") {
            break status;
        }
        if started.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mvm boot ran over {BOOT_TIMEOUT:?}; killed it. console:\n{}\nstderr:\n{}",
                stdout.join().unwrap_or_default().0,
                stderr.join().unwrap_or_default().0
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (console, to_init) = stdout.join().expect("console reader");
    let boot = Boot {
        status,
        console,
        stderr: stderr.join().expect("stderr reader").0,
        to_init,
        elapsed: started.elapsed(),
    };
    eprintln!(
        "mvm boot --cpus {cpus} {extra_cmdline}: /init reported after {}, {} after {:.1} s",
        boot.to_init
            .map_or("never".to_string(), |t| format!("{:.1} s", t.as_secs_f64())),
        boot.status,
        boot.elapsed.as_secs_f64()
    );
    boot
}

/// The `Linux version <release> ...` banner compiled into the kernel image.
fn release_in_image(kernel: &Path) -> String {
    let image = std::fs::read(kernel).expect("read kernel image");
    let needle = b"Linux version ";
    let at = image
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("kernel image has a Linux version banner");
    let rest = &image[at + needle.len()..];
    let end = rest.iter().position(|&b| b == b' ' || b == 0).unwrap_or(0);
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

/// The fields of the marker line: `online=..`, `cpus=..`, `release=..`.
fn marker_fields(b: &Boot) -> Vec<(String, String)> {
    let line = b
        .console
        .lines()
        .find_map(|l| {
            l.trim_end_matches('\r')
                .split_once(MARKER)
                .map(|(_, rest)| rest.to_string())
        })
        .unwrap_or_else(|| {
            panic!(
                "no {MARKER:?} line; console:\n{}\nstderr:\n{}",
                b.console, b.stderr
            )
        });
    line.split_whitespace()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("marker has no {key}= in {fields:?}"))
}

fn assert_booted_with(guest: &Guest, cpus: u8, online: &str) {
    let b = boot(guest, cpus, "");
    let fields = marker_fields(&b);
    assert_eq!(field(&fields, "online"), online, "console:\n{}", b.console);
    assert_eq!(
        field(&fields, "cpus"),
        cpus.to_string(),
        "console:\n{}",
        b.console
    );
    assert_eq!(
        field(&fields, "release"),
        release_in_image(&guest.kernel),
        "console:\n{}",
        b.console
    );
    assert_eq!(
        b.status.code(),
        Some(0),
        "guest rebooted, so mvm must exit 0; stderr: {}",
        b.stderr
    );
    assert!(b.stderr.trim().is_empty(), "mvm complained: {}", b.stderr);
}

#[test]
fn boot_linux_guest_with_one_cpu_runs_init_and_exits_zero_on_reboot() {
    let Some(guest) = guest() else {
        return;
    };
    assert_booted_with(guest, 1, "0");
}

#[test]
fn boot_linux_guest_with_two_cpus_sees_both_and_exits_zero_on_reboot() {
    let Some(guest) = guest() else {
        return;
    };
    assert_booted_with(guest, 2, "0-1");
}

#[test]
fn boot_linux_guest_whose_init_exits_fails_with_the_panic_reason() {
    let Some(guest) = guest() else {
        return;
    };
    let b = boot(guest, 1, "-- exit 7");
    assert!(
        b.console.contains("MVM-GUEST-INIT exiting 7"),
        "init did not run; console:\n{}\nstderr:\n{}",
        b.console,
        b.stderr
    );
    assert_eq!(b.status.code(), Some(1), "stderr: {}", b.stderr);
    let stderr = b.stderr.trim();
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(
        stderr.contains("guest kernel panicked: Attempted to kill init! exitcode=0x00000700"),
        "{stderr}"
    );
}
