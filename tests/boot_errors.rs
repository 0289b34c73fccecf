//! `mvm boot` with bad input: each case prints one clear line, exits with 2 and leaves nothing
//! behind (no serial output file, no VM).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::MVM;

fn mvm(args: &[&str]) -> Output {
    Command::new(MVM)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run mvm")
}

/// Asserts exit code 2, exactly one stderr line containing `needle`, and no stdout.
fn assert_bad_input(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(stderr.starts_with("mvm: "), "{stderr}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "{stderr:?} does not mention {needle:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A file that passes the kernel format check (ELF magic) but is never booted in these tests,
/// because each test's other input is bad.
fn fake_elf(dir: &Path) -> PathBuf {
    let p = dir.join("vmlinux");
    std::fs::write(&p, b"\x7fELF\x02\x01\x01\0rest-of-an-elf").expect("write fake kernel");
    p
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

#[test]
fn boot_with_missing_kernel_says_it_cannot_read_it() {
    let out = mvm(&["boot", "--kernel", "/nonexistent/vmlinux"]);
    assert_bad_input(&out, "cannot read kernel /nonexistent/vmlinux");
}

#[test]
fn boot_with_a_directory_as_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = mvm(&["boot", "--kernel", s(dir.path())]);
    assert_bad_input(&out, "is a directory");
}

#[test]
fn boot_with_unreadable_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = fake_elf(dir.path());
    let root = running_as_root();
    if root {
        // Root reads any file regardless of its mode; a dangling symlink is unreadable for all.
        let link = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("gone"), &link).unwrap();
        let out = mvm(&["boot", "--kernel", s(&link)]);
        assert_bad_input(&out, "cannot read kernel");
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o000)).unwrap();
        let out = mvm(&["boot", "--kernel", s(&k)]);
        assert_bad_input(&out, "cannot read kernel");
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

#[test]
fn boot_with_a_file_that_is_not_a_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("notes.txt");
    std::fs::write(&k, "#!/bin/sh\necho this is not a kernel\n").unwrap();
    let out = mvm(&["boot", "--kernel", s(&k)]);
    assert_bad_input(&out, "is not a Linux kernel");
    // An empty file is not a kernel either.
    std::fs::write(&k, "").unwrap();
    assert_bad_input(&mvm(&["boot", "--kernel", s(&k)]), "is not a Linux kernel");
}

#[test]
fn boot_with_zero_or_malformed_memory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = fake_elf(dir.path());
    assert_bad_input(
        &mvm(&["boot", "--kernel", s(&k), "--mem", "0"]),
        "too small",
    );
    assert_bad_input(
        &mvm(&["boot", "--kernel", s(&k), "--mem", "lots"]),
        "invalid memory size",
    );
}

#[test]
fn boot_with_more_memory_than_the_host_has_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = fake_elf(dir.path());
    let out = mvm(&["boot", "--kernel", s(&k), "--mem", "64T"]);
    assert_bad_input(&out, "more than this host");
}

#[test]
fn boot_with_zero_or_too_many_cpus_is_refused() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipping: the vCPU limit comes from /dev/kvm, which this host lacks");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = fake_elf(dir.path());
    assert_bad_input(
        &mvm(&["boot", "--kernel", s(&k), "--cpus", "0"]),
        "at least 1",
    );
    assert_bad_input(
        &mvm(&["boot", "--kernel", s(&k), "--cpus", "200"]),
        "maximum",
    );
    assert_bad_input(
        &mvm(&["boot", "--kernel", s(&k), "--cpus", "1000"]),
        "--cpus",
    );
}

#[test]
fn boot_with_an_unknown_flag_is_refused() {
    let out = mvm(&["boot", "--kernel", "/x", "--turbo"]);
    assert_bad_input(&out, "--turbo");
}

#[test]
fn boot_with_missing_initrd_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = fake_elf(dir.path());
    let out = mvm(&[
        "boot",
        "--kernel",
        s(&k),
        "--initrd",
        "/nonexistent/initrd.cpio",
    ]);
    assert_bad_input(&out, "cannot read initrd /nonexistent/initrd.cpio");
}

#[test]
fn boot_with_a_too_long_cmdline_is_refused_and_leaves_no_serial_file() {
    let dir = tempfile::tempdir().unwrap();
    let k = fake_elf(dir.path());
    let serial = dir.path().join("console.log");
    let long = "x".repeat(5000);
    let out = mvm(&[
        "boot",
        "--kernel",
        s(&k),
        "--cmdline",
        &long,
        "--serial-out",
        s(&serial),
    ]);
    assert_bad_input(&out, "at most 4095");
    assert!(!serial.exists(), "bad input created {}", serial.display());
}

#[test]
fn boot_with_a_kernel_too_big_for_memory_is_refused() {
    if !common::have_kvm() {
        return;
    }
    // A valid one-segment ELF whose segment lies at 64 MiB, beyond the 8 MiB of guest RAM.
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("big.elf");
    std::fs::write(&k, common::tiny_elf(&[0xeb, 0xfe], 0x400_0000)).unwrap();
    let out = mvm(&["boot", "--kernel", s(&k), "--mem", "8M"]);
    assert_bad_input(&out, "does not fit in guest memory");
}
