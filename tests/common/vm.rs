//! What the `mvm run` microVM tests share: their prerequisites, one boot at a time, and the
//! host state a run may leave behind.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::kernel::{run_kernel_args, static_agent, test_kernel};

/// What a microVM run needs.
#[derive(Debug)]
pub struct VmParts {
    /// The guest kernel of this test layer (tests/common/kernel.rs).
    pub kernel: PathBuf,
    /// What it needs beyond mvm's own arguments (`--kernel-args`; empty for mvm's kernel).
    pub kernel_args: String,
    /// The static guest agent (`MVM_AGENT`).
    pub agent: PathBuf,
}

/// The parts of a microVM run, or why none can run here (no /dev/kvm, not root, no test
/// kernel or static agent).
pub fn vm_parts() -> Result<VmParts, String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm on this host".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("VM runs need root (taps, mounts)".into());
    }
    let (kernel, _) = test_kernel()?;
    let kernel_args = run_kernel_args()?;
    Ok(VmParts {
        kernel,
        kernel_args,
        agent: static_agent()?,
    })
}

/// One guest boot at a time: two cores cannot run several emulated kernels usefully.
pub fn boot_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The environment variable a test sets on every mvm it starts, to the test's own `--root`:
/// mvm's children (passt) inherit it, so a test finds its own processes and never counts
/// another test's (one still ending, say).
pub const TRACE_ENV: &str = "MVM_TEST_TRACE";

/// Ends, when dropped, every process a test's runs under `dir` left (a test that failed half-way
/// leaves a `-d` runner, a foreground run or a VMM): those marked with [`TRACE_ENV`] or run as
/// a runner (`MVM_RUNNER`) under `dir`. SIGKILL of a runner ends its VMM too (its parent-death
/// signal), and the VMM's passt with it.
#[derive(Debug)]
pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let dir = self.0.display().to_string();
        let marks = [format!("{TRACE_ENV}={dir}"), format!("MVM_RUNNER={dir}")];
        kill_processes(|_, env| {
            env.split(|b| *b == 0).any(|kv| {
                marks.iter().any(|m| {
                    kv.starts_with(m.as_bytes()) && matches!(kv.get(m.len()), None | Some(b'/'))
                })
            })
        });
    }
}

/// SIGKILLs every process for which `ours(cmdline, environ)` holds (the raw /proc files).
pub fn kill_processes(ours: impl Fn(&[u8], &[u8]) -> bool) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if ours(&cmd, &env) {
            // SAFETY: kill has no memory preconditions; the caller picked the process as its own.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Pids of the processes whose name starts with `name` and that carry this test's trace marker
/// ([`TRACE_ENV`] set to `root`).
pub fn traced_processes(root: &Path, name: &str) -> Vec<u32> {
    let marker = format!("{TRACE_ENV}={}", root.display());
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        if !comm.trim().starts_with(name) {
            return None;
        }
        let env = std::fs::read(e.path().join("environ")).ok()?;
        env.split(|b| *b == 0)
            .any(|kv| kv == marker.as_bytes())
            .then_some(pid)
    })
    .collect()
}

/// Every network interface on the host whose name starts with mvm's tap prefix, sorted (for a
/// test to look up the taps named after its own containers' ids).
pub fn host_taps() -> Vec<String> {
    let mut taps: Vec<String> = std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("mvm"))
        .collect();
    taps.sort();
    taps
}

/// The tap devices the processes of runs under `root` hold open (their VMMs, and anything
/// those passed a tap to), sorted. mvm's taps are not persistent: a tap lives exactly as long as
/// a process holds it, so a tap left behind is one of these. Another test's taps are not.
pub fn taps(root: &Path) -> Vec<String> {
    let mut taps: Vec<String> = traced_processes(root, "")
        .into_iter()
        .flat_map(|pid| {
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd"));
            fds.into_iter().flatten().flatten().filter_map(move |fd| {
                let target = std::fs::read_link(fd.path()).ok()?;
                if target != Path::new("/dev/net/tun") {
                    return None;
                }
                let info = std::fs::read_to_string(format!(
                    "/proc/{pid}/fdinfo/{}",
                    fd.file_name().to_string_lossy()
                ))
                .ok()?;
                info.lines()
                    .find_map(|l| l.strip_prefix("iff:"))
                    .map(|name| name.trim().to_string())
            })
        })
        .collect();
    taps.sort();
    taps.dedup();
    taps
}

/// How many mounts lie under `root`.
pub fn mounts_under(root: &Path) -> usize {
    let root = root.display().to_string();
    std::fs::read_to_string("/proc/mounts")
        .expect("/proc/mounts")
        .lines()
        .filter(|l| l.contains(&root))
        .count()
}
