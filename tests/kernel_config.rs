//! The guest kernel's config: every option `kernel-config/microvm.config` sets must still hold
//! in the `.config` that `scripts/build-kernel.sh` makes from Debian's linux-source-6.12
//! (`make tinyconfig`, the fragment merged, `make olddefconfig`). Kconfig drops an option
//! silently when a dependency is missing, so this is where a lost option shows up.
//!
//! The script reuses the cached `.config` of the same source version and fragment (also the one
//! beside a built vmlinux) or generates it (about 20 s). Where the source package cannot be
//! installed (script exit code 3) the tests print why and skip.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf()
}

fn script() -> PathBuf {
    repo_root().join("scripts/build-kernel.sh")
}

/// The `.config` for the current fragment, or `None` (after printing why) where the kernel
/// source cannot be installed on this machine.
fn generated_config() -> Option<PathBuf> {
    let out = Command::new("bash")
        .arg(script())
        .args(["--config-only", "--no-install"])
        .output()
        .expect("run scripts/build-kernel.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        eprintln!("skipping: the kernel source cannot be installed here: {stderr}");
        return None;
    }
    assert!(
        out.status.success(),
        "build-kernel.sh --config-only failed ({}): {stderr}",
        out.status
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_file(),
        "script printed {path:?}, which is not a file"
    );
    Some(path)
}

/// One fragment line: `CONFIG_X=value`, or `# CONFIG_X is not set` (value `None`).
fn fragment_options() -> Vec<(String, Option<String>)> {
    let text = std::fs::read_to_string(repo_root().join("kernel-config/microvm.config"))
        .expect("read kernel-config/microvm.config");
    let mut options = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# CONFIG_") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                options.push((format!("CONFIG_{name}"), None));
            }
        } else if line.starts_with("CONFIG_") {
            let (name, value) = line.split_once('=').expect("CONFIG_X=value");
            options.push((name.to_string(), Some(value.to_string())));
        }
    }
    options
}

/// The value `.config` gives an option: `None` when unset or not mentioned.
fn config_value<'a>(config: &'a str, name: &str) -> Option<&'a str> {
    config
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
}

#[test]
fn every_fragment_option_survives_olddefconfig() {
    let Some(path) = generated_config() else {
        return;
    };
    let config = std::fs::read_to_string(&path).expect("read generated .config");
    let options = fragment_options();
    assert!(
        options.len() > 50,
        "fragment has only {} options",
        options.len()
    );
    let lost: Vec<String> = options
        .iter()
        .filter(|(name, want)| config_value(&config, name) != want.as_deref())
        .map(|(name, want)| {
            format!(
                "{name}: wanted {}, got {}",
                want.as_deref().unwrap_or("not set"),
                config_value(&config, name).unwrap_or("not set")
            )
        })
        .collect();
    assert!(
        lost.is_empty(),
        "options lost in {}:\n{}",
        path.display(),
        lost.join("\n")
    );

    // The product's essentials, spelled out so a fragment edit cannot drop them unnoticed.
    for must in [
        "CONFIG_64BIT",
        "CONFIG_SMP",
        "CONFIG_X86_MPPARSE",
        "CONFIG_SERIAL_8250_CONSOLE",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "CONFIG_VIRTIO_BLK",
        "CONFIG_VIRTIO_NET",
        "CONFIG_VIRTIO_VSOCKETS",
        "CONFIG_HW_RANDOM_VIRTIO",
        "CONFIG_EXT4_FS",
        "CONFIG_OVERLAY_FS",
        "CONFIG_DEVTMPFS_MOUNT",
        "CONFIG_BLK_DEV_INITRD",
        "CONFIG_MEMCG",
        "CONFIG_CGROUP_PIDS",
        "CONFIG_USER_NS",
        "CONFIG_PID_NS",
        "CONFIG_NET_NS",
        "CONFIG_SECCOMP_FILTER",
        "CONFIG_NF_NAT",
        "CONFIG_BRIDGE",
        "CONFIG_VETH",
    ] {
        assert_eq!(
            config_value(&config, must),
            Some("y"),
            "{must} in {}",
            path.display()
        );
    }
    for absent in ["CONFIG_MODULES", "CONFIG_PCI", "CONFIG_ACPI"] {
        assert_eq!(config_value(&config, absent), None, "{absent} must be off");
    }
}

#[test]
fn check_config_names_each_option_that_did_not_survive() {
    let Some(path) = generated_config() else {
        return;
    };
    let good = std::fs::read_to_string(&path).expect("read generated .config");
    let check = |config: &str| {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join(".config");
        std::fs::write(&file, config).expect("write .config");
        Command::new("bash")
            .arg(script())
            .arg("--check-config")
            .arg(&file)
            .output()
            .expect("run build-kernel.sh --check-config")
    };
    let out = check(&good);
    assert!(
        out.status.success(),
        "the generated config fails the script's own check: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Lose two options the way olddefconfig does (one unset, one gone) and turn one on that the
    // fragment wants off.
    let bad = good
        .replace(
            "CONFIG_VIRTIO_VSOCKETS=y\n",
            "# CONFIG_VIRTIO_VSOCKETS is not set\n",
        )
        .replace("CONFIG_OVERLAY_FS=y\n", "")
        .replace("# CONFIG_PCI is not set\n", "CONFIG_PCI=y\n");
    let out = check(&bad);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "report: {report}");
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(
        lines,
        [
            "CONFIG_PCI: wanted not set, got y",
            "CONFIG_OVERLAY_FS: wanted y, got not set",
            "CONFIG_VIRTIO_VSOCKETS: wanted y, got not set",
        ]
    );
}
