//! `mvm boot` with a real Linux kernel: the test kernel built by
//! `/work/shared/test-kernel/build.sh` (or `$MVM_TEST_KERNEL`). Without a root filesystem the
//! kernel panics; mvm must show the console, report the panic in one line and exit 1.

use std::path::PathBuf;
use std::process::Command;

const MVM: &str = env!("CARGO_BIN_EXE_mvm");

fn test_kernel() -> Option<(PathBuf, String)> {
    let kernel = match std::env::var_os("MVM_TEST_KERNEL") {
        Some(k) => PathBuf::from(k),
        None => {
            let cache = std::env::var_os("MVM_TEST_KERNEL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
                    PathBuf::from(home).join(".cache/mvm-test-kernel")
                });
            std::fs::read_dir(cache)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| {
                    let name = p
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    name.starts_with("vmlinux-") && !name.ends_with(".config")
                })?
        }
    };
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cmdline_file = [
        manifest.join("../../shared/test-kernel/cmdline"),
        PathBuf::from("/work/shared/test-kernel/cmdline"),
    ]
    .into_iter()
    .find(|p| p.exists())?;
    let cmdline = std::fs::read_to_string(cmdline_file)
        .ok()?
        .trim()
        .to_string();
    Some((kernel, cmdline))
}

#[test]
fn boot_linux_without_root_fs_reports_the_guest_panic_with_two_cpus() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: no /dev/kvm on this host");
        return;
    }
    let Some((kernel, cmdline)) = test_kernel() else {
        eprintln!("skipping: no test kernel (run /work/shared/test-kernel/build.sh)");
        return;
    };
    // Without `quiet` the kernel also reports how many CPUs came up.
    let cmdline = cmdline.replace(" quiet", "");
    let started = std::time::Instant::now();
    let out = Command::new(MVM)
        .args(["boot", "--kernel"])
        .arg(&kernel)
        .args(["--cmdline", &cmdline, "--mem", "128M", "--cpus", "2"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run mvm");
    let console = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("booted to panic in {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "console: {console}"
    );
    assert!(
        console.contains("VFS: Unable to mount root fs"),
        "console: {console}"
    );
    assert_eq!(
        stderr.trim(),
        "mvm: guest kernel panicked: VFS: Unable to mount root fs on unknown-block(0,0)"
    );
}

#[test]
fn boot_linux_without_the_emulator_workarounds_names_the_emulation_failure() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: no /dev/kvm on this host");
        return;
    }
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    if !pvm {
        eprintln!("skipping: this host has hardware virtualization; nothing fails to emulate");
        return;
    }
    let Some((kernel, _)) = test_kernel() else {
        eprintln!("skipping: no test kernel (run /work/shared/test-kernel/build.sh)");
        return;
    };
    // Without clearcpuid/noxsave the kernel uses xrstor, which this host's emulator lacks.
    let out = Command::new(MVM)
        .args(["boot", "--kernel"])
        .arg(&kernel)
        .args([
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 pci=off nokaslr quiet",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run mvm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("emulation failure"), "{stderr}");
    assert!(stderr.contains("rip 0x"), "{stderr}");
    assert!(stderr.contains("instruction bytes ["), "{stderr}");
    assert!(
        stderr.contains("no hardware virtualization on this host"),
        "{stderr}"
    );
}
