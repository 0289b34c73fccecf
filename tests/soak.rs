//! Many VMs at once, each in its jailed VMM process: 20 tiny test guests (`mvm boot`) started
//! together all finish, each with its own exit code, and leave nothing behind; so do four
//! Linux `mvm run --rm`s of the busybox image.
//!
//! Needs /dev/kvm and root (the Linux runs also the test kernel and the static agent); skips
//! where it cannot run. The four Linux runs take about 6 minutes on this 2-core host's
//! emulated-kernel-mode KVM while other work loads it (four guests booting at once, each to
//! make the run's template, then restoring it), so their boot timeout is 20 minutes rather than
//! mvm's 300 s. (They once failed to reach their agents at all: concurrent first runs under one
//! root wrote the agent's initramfs through one shared temporary file and truncated it under
//! each other's guests.)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
#[path = "common/registry.rs"]
mod registry_server;
#[path = "common/runs.rs"]
mod runs;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::guests::test_guest;
use common::vm::{boot_lock, text, TRACE_ENV};
use runs::*;

/// The boot timeout of each of the four Linux runs (mvm's default is 300 s).
const FOUR_BOOT_TIMEOUT: &str = "1200s";

/// Waits for every child, at most `limit` in all; returns (exit code, stdout, stderr) each.
fn wait_all(children: Vec<Child>, limit: Duration) -> Vec<(Option<i32>, String, String)> {
    let deadline = Instant::now() + limit;
    let mut pending: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut done: Vec<Option<(Option<i32>, String, String)>> = vec![None; pending.len()];
    while done.iter().any(Option::is_none) {
        for (i, slot) in pending.iter_mut().enumerate() {
            let Some(child) = slot.as_mut() else { continue };
            if child.try_wait().unwrap().is_some() {
                let out = slot.take().unwrap().wait_with_output().unwrap();
                done[i] = Some((out.status.code(), text(&out.stdout), text(&out.stderr)));
            }
        }
        if Instant::now() > deadline {
            for c in pending.iter_mut().flatten() {
                let _ = c.kill();
            }
            panic!("not every VM finished within {limit:?}: {done:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done.into_iter().map(Option::unwrap).collect()
}

#[test]
fn twenty_tiny_guests_at_once_all_finish_with_their_exit_codes() {
    if !common::have_kvm() {
        return;
    }
    let _one = boot_lock();
    let guest = test_guest("virtio");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let triple_fault = common::guest_file(
        dir.path(),
        "fault.elf",
        &[0x6a, 0x00, 0x6a, 0x00, 0x0f, 0x01, 0x1c, 0x24, 0x0f, 0x0b],
    );
    let before = host_traces(&root);
    let mut children = Vec::new();
    let mut expected = Vec::new();
    for i in 0..20 {
        let mut cmd = std::process::Command::new(MVM);
        cmd.arg("--root").arg(&root).args(["boot", "--mem", "64M"]);
        if i % 4 == 3 {
            // No IDT and #UD: a triple fault, which mvm reports and exits 1 for.
            cmd.arg("--kernel").arg(&triple_fault);
            expected.push(1);
        } else if i % 2 == 0 {
            let disk = dir.path().join(format!("disk{i}.img"));
            std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
            cmd.arg("--kernel")
                .arg(&guest)
                .args(["--cmdline", &format!("mvm_test=blk mvm_seed={i}"), "--disk"])
                .arg(&disk);
            expected.push(0);
        } else {
            cmd.arg("--kernel")
                .arg(&guest)
                .args(["--cmdline", "mvm_test=rng", "--rng"]);
            expected.push(0);
        }
        cmd.env(TRACE_ENV, &root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        children.push(cmd.spawn().unwrap());
    }
    let started = Instant::now();
    let results = wait_all(children, Duration::from_secs(600));
    eprintln!("20 tiny guests at once: {:?}", started.elapsed());
    for (i, ((code, out, err), want)) in results.iter().zip(&expected).enumerate() {
        assert_eq!(*code, Some(*want), "guest {i}:\n{out}\n{err}");
        if *want == 0 {
            assert!(
                out.contains("mvm-test-guest: done"),
                "guest {i}:\n{out}\n{err}"
            );
            assert!(err.is_empty(), "guest {i}: {err}");
        } else {
            assert_eq!(err.lines().count(), 1, "guest {i}: {err}");
            assert!(err.contains("triple fault"), "guest {i}: {err}");
        }
    }
    assert_nothing_left(&root, &before);
}

#[test]
fn four_linux_runs_at_once_under_the_jail_all_complete_with_their_exit_codes() {
    let Some(s) = setup() else { return };
    let before = host_traces(&s.root);
    let codes = [0, 3, 7, 42];
    let children: Vec<Child> = codes
        .iter()
        .map(|code| {
            run_cmd(
                s.vm,
                &s.root,
                &[
                    "--rm",
                    "--image",
                    &s.reg.busybox,
                    "--",
                    "sh",
                    "-c",
                    &format!("echo run {code}; exit {code}"),
                ],
            )
            // Four emulated kernels boot at once on a small host: far slower than one.
            .env("MVM_BOOT_TIMEOUT", FOUR_BOOT_TIMEOUT)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let started = Instant::now();
    let results = wait_all(children, Duration::from_secs(1500));
    eprintln!("4 Linux runs at once: {:?}", started.elapsed());
    for ((code, out, err), want) in results.iter().zip(codes) {
        assert_eq!(*code, Some(want), "run {want}:\n{out}\n{err}");
        assert!(
            out.contains(&format!("run {want}")),
            "run {want}:\n{out}\n{err}"
        );
    }
    assert_nothing_left(&s.root, &before);
}
