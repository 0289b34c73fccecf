//! What the `mvm run` microVM tests share: their prerequisites, one boot at a time, and the
//! host state a run may leave behind.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::kernel::{static_agent, test_kernel};

/// What a microVM run needs.
#[derive(Debug)]
pub struct VmParts {
    /// The test kernel.
    pub kernel: PathBuf,
    /// Its command line (`--kernel-args`).
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
    let (kernel, kernel_args) = test_kernel()?;
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

/// mvm's tap devices on the host, sorted.
pub fn taps() -> Vec<String> {
    let mut taps: Vec<String> = std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("mvm"))
        .collect();
    taps.sort();
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
