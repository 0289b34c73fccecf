//! The Linux test kernel: `$MVM_TEST_KERNEL`, else the kernel built (once, then cached) by
//! `<repo>/../shared/test-kernel/build.sh`, booted with the arguments in
//! `shared/test-kernel/cmdline`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository root (the workspace above `vmm/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf()
}

/// `<repo>/../shared`, or /work/shared where the repository is not next to it.
fn shared_dir() -> Option<PathBuf> {
    [repo_root().join("../shared"), PathBuf::from("/work/shared")]
        .into_iter()
        .find(|d| d.join("test-kernel/build.sh").is_file())
}

/// The test kernel and its command line, or why a test cannot boot it here.
pub fn test_kernel() -> Result<(PathBuf, String), String> {
    let shared = shared_dir().ok_or("no shared/test-kernel next to the repository or in /work")?;
    let cmdline_file = shared.join("test-kernel/cmdline");
    let cmdline = std::fs::read_to_string(&cmdline_file)
        .map_err(|e| format!("cannot read {}: {e}", cmdline_file.display()))?
        .trim()
        .to_string();
    if let Some(k) = std::env::var_os("MVM_TEST_KERNEL") {
        return Ok((PathBuf::from(k), cmdline));
    }
    let script = shared.join("test-kernel/build.sh");
    eprintln!(
        "getting the test kernel from {} (first build: about 5 minutes)",
        script.display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let kernel = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !kernel.is_file() {
        return Err(format!("build.sh printed {kernel:?}, which is not a file"));
    }
    Ok((kernel, cmdline))
}

/// The static guest agent for `mvm run --isolation vm`: `$MVM_AGENT`, else the one
/// `scripts/build-agent.sh` builds (and prints).
pub fn static_agent() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("MVM_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let script = repo_root().join("scripts/build-agent.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/build-agent.sh failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}
