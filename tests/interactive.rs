//! `mvm run -it` and `mvm exec -it` as a person uses them, typed into a real terminal (a tmux
//! pane) and read back from it: a prompt; `stty size` matches the pane and follows a resize;
//! Ctrl-C interrupts `sleep` and the shell stays (Ctrl-\ too); `exit 5` makes mvm exit 5; the
//! terminal's settings are what they were before (raw mode undone).
//!
//! A container on the host here (fast); tests/vm_tools.rs does the same in a microVM.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::time::Duration;

use common::container::{fixture, unique, Fixture};
use common::tmux::{Tmux, HOST_PROMPT};
use common::MVM;

/// Long enough for a slow, shared host.
const WAIT: Duration = Duration::from_secs(60);

/// The pane's `stty -g` (its settings), read through a marker line.
fn settings(t: &Tmux, tag: &str) -> String {
    t.type_line(&format!("echo {tag}=$(stty -g)"));
    let screen = t.wait_for(tag, WAIT, |s| {
        s.lines().any(|l| l.starts_with(&format!("{tag}=")))
    });
    screen
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{tag}=")))
        .unwrap()
        .trim()
        .to_string()
}

/// Runs the shell session every interactive test runs once a container shell shows its prompt
/// in `t`: size, resize, Ctrl-C, Ctrl-\, then `exit 5`. `top` lists the container's processes.
fn shell_session(t: &Tmux, top: &dyn Fn() -> String) {
    t.type_line("echo size=$(stty size)");
    t.wait_line("size=24 80", WAIT);
    t.resize(100, 30);
    // The new size reaches the container's terminal (SIGWINCH, then TIOCSWINSZ through mvm).
    t.wait_for("the new size", WAIT, |_| {
        t.type_line("echo size=$(stty size)");
        std::thread::sleep(Duration::from_millis(500));
        t.screen().lines().any(|l| l.trim_end() == "size=30 100")
    });
    for (key, label, code) in [("C-c", "int", 130), ("C-\\", "quit", 131)] {
        t.type_line("sleep 777");
        // The key only means something once sleep is the terminal's foreground job.
        let deadline = std::time::Instant::now() + WAIT;
        while !top().contains("sleep 777") {
            assert!(std::time::Instant::now() < deadline, "sleep never ran");
            std::thread::sleep(Duration::from_millis(200));
        }
        t.keys(&[key]);
        t.type_line(&format!("echo {label}=$?"));
        t.wait_line(&format!("{label}={code}"), WAIT);
    }
    t.type_line("exit 5");
}

fn top(f: &Fixture, name: &str) -> String {
    let out = std::process::Command::new(MVM)
        .arg("--root")
        .arg(&f.state)
        .args(["top", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host shell gets its prompt back: mvm's exit code, and the terminal as it was.
fn after_exit(t: &Tmux, before: &str, code: i32) {
    // Typed before mvm has exited, the line would go to the container (as with docker).
    t.wait_for("the host prompt", WAIT, |s| {
        s.trim_end().ends_with(HOST_PROMPT.trim_end())
    });
    t.type_line("echo rc=$?");
    t.wait_line(&format!("rc={code}"), WAIT);
    assert_eq!(
        settings(t, "after"),
        before,
        "the terminal was left changed"
    );
}

fn mvm_line(f: &Fixture, args: &str) -> String {
    format!("{MVM} --root {} {args}", f.state.display())
}

fn pane(dir: &Path) -> Option<Tmux> {
    Tmux::start(dir, 80, 24)
}

#[test]
fn run_it_in_a_container_is_a_terminal_that_follows_the_users() {
    let Some(f) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(t) = pane(dir.path()) else { return };
    let before = settings(&t, "before");
    let name = unique("it");
    t.type_line(&mvm_line(
        &f,
        &format!(
            "run -it --rm --name {name} --isolation container --rootfs {} -- sh",
            f.rootfs.display()
        ),
    ));
    t.wait_for("the container's prompt", WAIT, |s| {
        s.lines().any(|l| l.starts_with("/ # "))
    });
    t.type_line("echo tty=$(test -t 0 && echo yes) term=$TERM");
    t.wait_line("tty=yes term=xterm", WAIT);
    shell_session(&t, &|| top(&f, &name));
    after_exit(&t, &before, 5);
    // --rm: nothing is left of it.
    assert!(!f.state.join("containers").join(&name).exists());
}

#[test]
fn exec_it_into_a_detached_container_is_the_same_terminal() {
    let Some(f) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(t) = pane(dir.path()) else { return };
    let name = unique("bg");
    let out = f.run(&["-d", "--name", &name], &["sleep", "1000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = settings(&t, "before");
    t.type_line(&mvm_line(&f, &format!("exec -it {name} sh")));
    t.wait_for("the exec'd shell's prompt", WAIT, |s| {
        s.lines().any(|l| l.starts_with("/ # "))
    });
    shell_session(&t, &|| top(&f, &name));
    after_exit(&t, &before, 5);

    let out = std::process::Command::new(MVM)
        .arg("--root")
        .arg(&f.state)
        .args(["rm", "-f", &name])
        .output()
        .unwrap();
    assert!(out.status.success());
}
