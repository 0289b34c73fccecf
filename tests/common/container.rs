//! A busybox root filesystem and a throwaway `--root` for `mvm run --isolation container`
//! tests (the same fixture as tests/container.rs), and helpers to read what mvm printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::MVM;

/// A busybox root filesystem and a throwaway `--root` for mvm.
pub struct Fixture {
    _dir: tempfile::TempDir,
    /// The busybox root filesystem.
    pub rootfs: PathBuf,
    /// mvm's `--root`.
    pub state: PathBuf,
}

pub fn fixture() -> Option<Fixture> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: containers need root");
        return None;
    }
    let busybox = Path::new("/bin/busybox");
    let static_ok = Command::new("ldd")
        .arg(busybox)
        .output()
        .map(|o| {
            !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("not a dynamic")
        })
        .unwrap_or(true);
    if !busybox.exists() || !static_ok {
        eprintln!("skipping: needs a static /bin/busybox (apt-get install busybox-static)");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir");
    std::fs::create_dir_all(rootfs.join("etc")).expect("mkdir");
    // A hard link, not a copy: a copy's write descriptor can leak into a child another test
    // thread forks, and exec then fails with ETXTBSY.
    let dst = rootfs.join("bin/busybox");
    std::fs::hard_link(busybox, &dst)
        .or_else(|_| std::fs::copy(busybox, &dst).map(drop))
        .expect("copy busybox");
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("symlink");
        }
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\napp:x:1000:\n").expect("group");
    let state = dir.path().join("state");
    Some(Fixture {
        _dir: dir,
        rootfs,
        state,
    })
}

impl Drop for Fixture {
    /// A test that failed half-way may leave mvm running under its root (a `-d` runner, a
    /// foreground `run -it` whose terminal went away): end them, so nothing outlives the test.
    fn drop(&mut self) {
        let marker = format!("--root\0{}\0", self.state.display());
        // A `-d` runner has no arguments: its environment names its container's directory.
        let runner = format!("MVM_RUNNER={}/", self.state.display());
        super::vm::kill_processes(|cmd, env| {
            String::from_utf8_lossy(cmd).contains(&marker)
                || String::from_utf8_lossy(env).contains(&runner)
        });
    }
}

impl Fixture {
    pub fn cmd(&self, flags: &[&str], command: &[&str]) -> Command {
        let mut c = Command::new(MVM);
        c.arg("run")
            .arg("--root")
            .arg(&self.state)
            .args(["--isolation", "container", "--rootfs"])
            .arg(&self.rootfs)
            .args(flags)
            .arg("--")
            .args(command);
        c
    }

    pub fn run(&self, flags: &[&str], command: &[&str]) -> Output {
        self.cmd(flags, command).output().expect("run mvm")
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{:x}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ u128::from(rand_u32())
    )
}

pub fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u32::from_le_bytes(b)
}

/// Waits at most `limit` for `child`; kills it and returns None on overrun.
pub fn wait_for(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}
