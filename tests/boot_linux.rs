//! `mvm boot` with a real Linux kernel: the test kernel built by
//! `/work/shared/test-kernel/build.sh` on a PVM host, mvm's own kernel on a host with VT-x/AMD-V
//! (or `$MVM_TEST_KERNEL`; see tests/common/kernel.rs). Without a root filesystem the
//! kernel panics (mvm reports it in one line, exit 1); with a busybox initramfs `/init` runs on
//! two vCPUs and reboots (exit 0); without the emulator workarounds mvm names the emulation
//! failure.

mod common;

use std::path::PathBuf;
use std::process::Command;

const MVM: &str = env!("CARGO_BIN_EXE_mvm");

/// The guest kernel of this test layer (the test kernel on PVM hosts, mvm's own elsewhere).
fn test_kernel() -> Option<(PathBuf, String)> {
    match common::kernel::test_kernel() {
        Ok(k) => Some(k),
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

fn boot_linux(kernel: &std::path::Path, args: &[&str]) -> std::process::Output {
    let started = std::time::Instant::now();
    let out = Command::new(MVM)
        .args(["boot", "--mem", "128M", "--kernel"])
        .arg(kernel)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run mvm");
    eprintln!("mvm boot {args:?} took {:?}", started.elapsed());
    out
}

#[test]
fn boot_linux_without_root_fs_reports_the_guest_panic() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: no /dev/kvm on this host");
        return;
    }
    let Some((kernel, cmdline)) = test_kernel() else {
        return;
    };
    let out = boot_linux(&kernel, &["--cmdline", &cmdline]);
    let console = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
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
fn boot_linux_with_busybox_initramfs_on_two_cpus_runs_init_and_reboots_with_exit_0() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: no /dev/kvm on this host");
        return;
    }
    let Some((kernel, cmdline)) = test_kernel() else {
        return;
    };
    let busybox = std::path::Path::new("/bin/busybox");
    if !busybox.exists() || Command::new("cpio").arg("--version").output().is_err() {
        eprintln!("skipping: needs busybox-static and cpio");
        return;
    }
    // An uncompressed initramfs: /bin/busybox and an /init script that reboots.
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::copy(busybox, root.join("bin/busybox")).expect("copy busybox");
    let init = root.join("init");
    std::fs::write(
        &init,
        "#!/bin/busybox sh\n/bin/busybox echo init ran in the guest\n/bin/busybox reboot -f\n",
    )
    .expect("write init");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cpio = dir.path().join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            root.display(),
            cpio.display()
        ))
        .status()
        .expect("run cpio");
    assert!(status.success());
    // Without `quiet` the kernel also reports how many CPUs came up.
    let cmdline = cmdline.replace(" quiet", "");
    let out = boot_linux(
        &kernel,
        &[
            "--cmdline",
            &cmdline,
            "--cpus",
            "2",
            "--initrd",
            cpio.to_str().expect("utf-8"),
        ],
    );
    let console = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {stderr}\nconsole: {console}"
    );
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "console: {console}"
    );
    assert!(
        console.contains("init ran in the guest"),
        "console: {console}"
    );
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn boot_linux_without_the_emulator_workarounds_names_the_emulation_failure() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: no /dev/kvm on this host");
        return;
    }
    if !common::kernel::is_pvm_host() {
        eprintln!("skipping: this host has hardware virtualization; nothing fails to emulate");
        return;
    }
    let Some((kernel, _)) = test_kernel() else {
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
