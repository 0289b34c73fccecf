//! A terminal a test can type into and read back, as a person uses mvm: a private tmux server
//! (its own socket, no user config) with one pane running `sh`, whose prompt is `host$ `.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The host shell's prompt in the pane.
pub const HOST_PROMPT: &str = "host$ ";

/// One tmux server with one window.
pub struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// A new pane of `cols` x `rows` running `sh` in `dir`, or None (with the reason printed)
    /// where tmux is not installed.
    pub fn start(dir: &Path, cols: u16, rows: u16) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            eprintln!("skipping: tmux is not installed (scripts/deps.sh installs it)");
            return None;
        }
        let t = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let out = t.tmux(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            "env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "TERM=xterm",
            &format!("PS1={HOST_PROMPT}"),
            "sh",
        ]);
        assert!(out.status.success(), "tmux: {}", text(&out.stderr));
        // A big history, so nothing a test looks for scrolls away.
        t.tmux(&["set-option", "-g", "history-limit", "10000"]);
        t.wait_for("the host shell", Duration::from_secs(30), |s| {
            s.contains(HOST_PROMPT)
        });
        Some(t)
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux")
    }

    /// Types `line` and Enter.
    pub fn type_line(&self, line: &str) {
        let out = self.tmux(&["send-keys", "-t", "t", "-l", line]);
        assert!(out.status.success(), "send-keys: {}", text(&out.stderr));
        self.keys(&["Enter"]);
    }

    /// Presses keys by tmux's names (`C-c`, `Enter`, `C-\\`).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        let out = self.tmux(&args);
        assert!(out.status.success(), "send-keys: {}", text(&out.stderr));
    }

    /// Resizes the window (the pane follows; its terminal's size changes, SIGWINCH follows).
    pub fn resize(&self, cols: u16, rows: u16) {
        let out = self.tmux(&[
            "resize-window",
            "-t",
            "t",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
        ]);
        assert!(out.status.success(), "resize-window: {}", text(&out.stderr));
    }

    /// What the pane shows, with its history, lines joined where they wrapped.
    pub fn screen(&self) -> String {
        let out = self.tmux(&["capture-pane", "-p", "-J", "-S", "-", "-t", "t"]);
        text(&out.stdout)
    }

    /// Waits until the pane shows what `done` looks for; panics with the screen after `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.screen();
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "waited {limit:?} for {what}; the terminal shows:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until a line of the pane is exactly `line` (a marker a command printed).
    pub fn wait_line(&self, line: &str, limit: Duration) -> String {
        self.wait_for(line, limit, |s| s.lines().any(|l| l.trim_end() == line))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
