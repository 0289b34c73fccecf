//! `--restart` as a docker user relies on it: a `-d` container whose command fails is run
//! again by its runner as the policy says, `ps` and `inspect` count the restarts, and `mvm
//! stop` ends an `always` container for good. On the host (`--isolation container` and
//! `process`): these runs take a second or two.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::container::{fixture, stderr, stdout, Fixture};
use common::MVM;

fn mvm(f: &Fixture, args: &[&str]) -> Output {
    Command::new(MVM)
        .arg("--root")
        .arg(&f.state)
        .args(args)
        .output()
        .unwrap()
}

fn ok(f: &Fixture, args: &[&str]) -> String {
    let out = mvm(f, args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stdout(&out)
}

fn inspect(f: &Fixture, name: &str) -> serde_json::Value {
    serde_json::from_str(&ok(f, &["inspect", name])).unwrap()
}

/// `ps -a --format json`'s line for `name`.
fn ps_line(f: &Fixture, name: &str) -> serde_json::Value {
    ok(f, &["ps", "-a", "--format", "json"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["Names"] == name)
        .unwrap_or_else(|| panic!("{name} is not in ps -a"))
}

/// Waits until `what` holds of the container's record.
fn wait_until(f: &Fixture, name: &str, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = inspect(f, name);
        if ok(&r) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never {what}: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn on_failure_restarts_a_failing_container_the_times_it_is_told() {
    let Some(f) = fixture() else { return };
    let started = Instant::now();
    let out = f.run(
        &["-d", "--name", "flaky", "--restart", "on-failure:2"],
        &["sh", "-c", "echo attempt; exit 3"],
    );
    assert!(out.status.success(), "run -d: {}", stderr(&out));
    // wait returns once the runner is done with it: after the last restart.
    let code = ok(&f, &["wait", "flaky"]);
    eprintln!("three runs took {:?}", started.elapsed());
    assert_eq!(code.trim(), "3");
    let r = inspect(&f, "flaky");
    assert_eq!(r["status"], "exited", "{r}");
    assert_eq!(r["exit_code"], 3, "{r}");
    assert_eq!(r["restart_count"], 2, "{r}");
    let ps = ps_line(&f, "flaky");
    assert!(
        ps["Status"].as_str().unwrap().starts_with("Exited (3)"),
        "{ps}"
    );
    assert_eq!(ps["RestartCount"], 2, "{ps}");
    // One log for the container, every run's output in it.
    assert_eq!(ok(&f, &["logs", "flaky"]), "attempt\n".repeat(3));

    // A success is not a failure: no restart.
    let out = f.run(
        &["-d", "--name", "fine", "--restart", "on-failure"],
        &["sh", "-c", "exit 0"],
    );
    assert!(out.status.success(), "run -d: {}", stderr(&out));
    assert_eq!(ok(&f, &["wait", "fine"]).trim(), "0");
    assert_eq!(inspect(&f, "fine")["restart_count"], 0);
}

#[test]
fn stop_ends_an_always_container_for_good() {
    let Some(f) = fixture() else { return };
    // stop finds it running (its PID 1 ignores SIGTERM: killed after a second, or done
    // sooner) or waiting to run again: either way it ends for good.
    let out = f.run(
        &["-d", "--name", "svc", "--restart", "always"],
        &["sh", "-c", "echo up; sleep 0.2"],
    );
    assert!(out.status.success(), "run -d: {}", stderr(&out));
    wait_until(&f, "svc", "restarted twice", |r| {
        r["restart_count"].as_u64() >= Some(2)
    });
    let started = Instant::now();
    ok(&f, &["stop", "-t", "1", "svc"]);
    eprintln!("stop took {:?}", started.elapsed());
    let r = inspect(&f, "svc");
    assert_eq!(r["status"], "exited", "{r}");
    let count = r["restart_count"].clone();
    std::thread::sleep(Duration::from_secs(1));
    let r = inspect(&f, "svc");
    assert_eq!(
        (&r["status"], &r["restart_count"]),
        (&"exited".into(), &count)
    );
    assert!(
        ps_line(&f, "svc")["Status"]
            .as_str()
            .unwrap()
            .starts_with("Exited"),
        "{r}"
    );
    assert!(!ok(&f, &["ps"]).contains("svc"), "ps shows only live ones");

    // The same with a plain process on the host, stopped while it runs.
    let out = mvm(
        &f,
        &[
            "run",
            "--isolation",
            "process",
            "--rootfs",
            f.rootfs.to_str().unwrap(),
            "-d",
            "--name",
            "proc",
            "--restart",
            "unless-stopped",
            "--",
            "/bin/sh",
            "-c",
            "sleep 1",
        ],
    );
    assert!(out.status.success(), "run -d: {}", stderr(&out));
    wait_until(&f, "proc", "restarted and ran", |r| {
        r["restart_count"].as_u64() >= Some(1) && r["status"] == "running"
    });
    ok(&f, &["stop", "proc"]);
    let r = inspect(&f, "proc");
    assert_eq!(
        (&r["status"], &r["exit_code"]),
        (&"exited".into(), &143.into())
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(inspect(&f, "proc")["status"], "exited");
}

#[test]
fn a_restart_policy_needs_d_and_a_known_name() {
    let Some(f) = fixture() else { return };
    for (flags, says) in [
        (&["--restart", "always"][..], "add -d"),
        (&["-d", "--rm", "--restart", "always"][..], "--rm conflict"),
        (&["-d", "--restart", "always:3"][..], "only on-failure"),
        (&["-d", "--restart", "sometimes"][..], "use no, on-failure"),
    ] {
        let out = f.run(flags, &["true"]);
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        assert!(stderr(&out).contains(says), "{flags:?}: {}", stderr(&out));
    }
}
