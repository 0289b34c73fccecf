//! The Linux guest kernel of the Linux-guest tests, chosen by the test layer this host is:
//!
//! - a PVM host (this workplace's KVM: guest kernel mode emulated): the **test kernel** built
//!   (once, then cached) by `<repo>/../shared/test-kernel/build.sh`, booted with the arguments in
//!   `shared/test-kernel/cmdline` (it hides what the emulator cannot run);
//! - a host with VT-x/AMD-V (real hardware, or the emulated AMD-V host of `scripts/vt-host.sh`):
//!   mvm's **product kernel** from `scripts/build-kernel.sh`, with no extra arguments.
//!
//! `MVM_TEST_KERNEL=PATH` names the kernel instead, `MVM_TEST_KERNEL_ARGS` the arguments it needs
//! beyond mvm's own (when unset: the test kernel's on a PVM host, none elsewhere).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository root (the workspace above the crate that runs the tests).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate folder has a parent")
        .to_path_buf()
}

/// `<repo>/../shared`, or /work/shared where the repository is not next to it.
fn shared_dir() -> Option<PathBuf> {
    [repo_root().join("../shared"), PathBuf::from("/work/shared")]
        .into_iter()
        .find(|d| d.join("test-kernel/build.sh").is_file())
}

/// Which kernel a Linux-guest test boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// The test kernel on this workplace's PVM-backed KVM.
    PvmTestKernel,
    /// mvm's own kernel on a host with hardware virtualization.
    ProductKernel,
}

/// Whether /dev/kvm here is served by the PVM module (guest kernel mode emulated).
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The layer of this host: the product kernel wherever the CPU virtualizes in hardware.
pub fn layer() -> Layer {
    if is_pvm_host() {
        Layer::PvmTestKernel
    } else {
        Layer::ProductKernel
    }
}

/// What `mvm boot` tests put on the command line of a kernel that needs nothing extra (mvm's
/// own kernel arguments, as `mvm run` passes them).
const BOOT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

/// The guest kernel for this host and a whole command line for `mvm boot --cmdline`, or why a
/// test cannot boot one here.
pub fn test_kernel() -> Result<(PathBuf, String), String> {
    let kernel = kernel_path()?;
    let extra = run_kernel_args()?;
    // The test kernel's arguments are a whole command line already.
    let cmdline = if layer() == Layer::PvmTestKernel && extra.contains("console=") {
        extra
    } else {
        format!("{BOOT_CMDLINE} {extra}").trim().to_string()
    };
    Ok((kernel, cmdline))
}

/// The arguments the guest kernel needs beyond mvm's own (`mvm run --kernel-args`): the test
/// kernel's on a PVM host, none for mvm's kernel.
pub fn run_kernel_args() -> Result<String, String> {
    match std::env::var("MVM_TEST_KERNEL_ARGS") {
        Ok(args) => Ok(args),
        Err(_) if layer() == Layer::PvmTestKernel => test_kernel_cmdline(),
        Err(_) => Ok(String::new()),
    }
}

/// The kernel image: `$MVM_TEST_KERNEL`, else the one this layer builds (once, cached).
fn kernel_path() -> Result<PathBuf, String> {
    if let Some(k) = std::env::var_os("MVM_TEST_KERNEL") {
        return Ok(PathBuf::from(k));
    }
    match layer() {
        Layer::PvmTestKernel => build_test_kernel(),
        Layer::ProductKernel => build_product_kernel(),
    }
}

/// The arguments the test kernel needs on a PVM host (`shared/test-kernel/cmdline`).
fn test_kernel_cmdline() -> Result<String, String> {
    let shared = shared_dir().ok_or("no shared/test-kernel next to the repository or in /work")?;
    let file = shared.join("test-kernel/cmdline");
    std::fs::read_to_string(&file)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read {}: {e}", file.display()))
}

fn build_test_kernel() -> Result<PathBuf, String> {
    let shared = shared_dir().ok_or("no shared/test-kernel next to the repository or in /work")?;
    let script = shared.join("test-kernel/build.sh");
    eprintln!(
        "getting the test kernel from {} (first build: about 5 minutes)",
        script.display()
    );
    run_kernel_script(Command::new("bash").arg(&script))
}

fn build_product_kernel() -> Result<PathBuf, String> {
    let script = repo_root().join("scripts/build-kernel.sh");
    eprintln!(
        "getting mvm's kernel from {} (first build: about 7 minutes)",
        script.display()
    );
    run_kernel_script(Command::new("bash").arg(&script).arg("--no-install"))
}

/// Runs a kernel build script that prints the kernel's path.
fn run_kernel_script(cmd: &mut Command) -> Result<PathBuf, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let kernel = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !kernel.is_file() {
        return Err(format!("{cmd:?} printed {kernel:?}, which is not a file"));
    }
    Ok(kernel)
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

/// Compiles `tests/linux/<source>` into a static binary (a guest's `/init`) with `rustc_args`
/// added, cached under the target directory by the source's contents and the arguments: the
/// emulated VT host reuses what the host built. Panics with rustc's output if the build fails:
/// a guest that does not build is a failed test.
pub fn static_init(source: &str, rustc_args: &[&str]) -> PathBuf {
    let src = repo_root().join("tests/linux").join(source);
    let text = std::fs::read(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    rustc.hash(&mut h);
    rustc_args.hash(&mut h);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("static-inits");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let stem = source.trim_end_matches(".rs");
    let out = dir.join(format!("{stem}-{:016x}", h.finish()));
    if out.is_file() {
        return out;
    }
    let tmp = dir.join(format!("{stem}.tmp-{}", std::process::id()));
    let built = Command::new(&rustc)
        .args(["--edition", "2021", "-O", "-C", "panic=abort"])
        .args(["-C", "strip=symbols", "-C", "target-feature=+crt-static"])
        .args(rustc_args)
        .args(["--target", "x86_64-unknown-linux-gnu", "-o"])
        .arg(&tmp)
        .arg(&src)
        .output()
        .expect("run rustc");
    assert!(
        built.status.success(),
        "rustc could not build tests/linux/{source}: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    std::fs::rename(&tmp, &out).expect("move the built init into place");
    out
}
