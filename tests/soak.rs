//! Many VMs at once, each in its jailed VMM process: 20 tiny test guests (`mvm boot`) started
//! together all finish, each with its own exit code, and leave nothing behind.
//!
//! Needs /dev/kvm and root; skips where it cannot run. (Four concurrent Linux `mvm run`s are
//! not here yet: on this 2-core host, loaded by other work, they did not reach their agents
//! within the 300 s boot timeout.)
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
