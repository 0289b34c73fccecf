//! Facts about the host that decide what mvm accepts and how it explains failures: memory,
//! and what serves /dev/kvm (hardware virtualization or the PVM module).

use std::path::Path;

/// What backs /dev/kvm on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Virtualization {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
    /// The `kvm_pvm` module: nested virtualization without hardware support.
    Pvm,
    /// Neither was found.
    Unknown,
}

impl Virtualization {
    /// A short description for `mvm info`.
    pub fn describe(self) -> &'static str {
        match self {
            Virtualization::Vmx => "hardware (Intel VT-x)",
            Virtualization::Svm => "hardware (AMD-V)",
            Virtualization::Pvm => "PVM (kvm_pvm, no VT-x/AMD-V: guest kernel mode is emulated)",
            Virtualization::Unknown => "unknown (no vmx/svm CPU flag, no kvm_pvm module)",
        }
    }

    /// Whether the CPU runs guests in hardware.
    pub fn is_hardware(self) -> bool {
        matches!(self, Virtualization::Vmx | Virtualization::Svm)
    }
}

/// Reads `/proc/cpuinfo`, `/proc/modules` and `/sys/module` to tell what serves /dev/kvm, once
/// per process: a VM is built before the VMM's jail, which shows none of those files, so the
/// answer is kept for the vCPUs (their CPU template) and snapshots (their CPU fingerprint)
/// made in it.
pub fn virtualization() -> Virtualization {
    static PROBED: std::sync::OnceLock<Virtualization> = std::sync::OnceLock::new();
    *PROBED.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
        classify(
            &cpuinfo,
            &modules,
            Path::new("/sys/module/kvm_pvm").exists(),
        )
    })
}

/// The decision behind [`virtualization`], from the files' contents.
pub fn classify(cpuinfo: &str, modules: &str, pvm_sysfs: bool) -> Virtualization {
    let pvm = pvm_sysfs
        || modules
            .lines()
            .any(|l| l.split_whitespace().next() == Some("kvm_pvm"));
    if pvm {
        return Virtualization::Pvm;
    }
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    if has("vmx") {
        Virtualization::Vmx
    } else if has("svm") {
        Virtualization::Svm
    } else {
        Virtualization::Unknown
    }
}

/// Total host memory in bytes (`MemTotal` of /proc/meminfo), if readable.
pub fn mem_total() -> Option<u64> {
    parse_mem_total(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// Parses `MemTotal:  123 kB`.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_pvm_from_hardware() {
        let vmx = "processor : 0\nflags\t\t: fpu vme vmx sse\n";
        assert_eq!(classify(vmx, "", false), Virtualization::Vmx);
        assert_eq!(
            classify("flags : fpu svm\n", "", false),
            Virtualization::Svm
        );
        let pvm_mod = "kvm_pvm 123 0 - Live 0x0\nkvm 1 1 kvm_pvm, Live 0x0\n";
        assert_eq!(
            classify("flags : fpu\n", pvm_mod, false),
            Virtualization::Pvm
        );
        assert_eq!(classify("flags : fpu\n", "", true), Virtualization::Pvm);
        assert_eq!(
            classify("flags : fpu vmxx\n", "kvm 1 0\n", false),
            Virtualization::Unknown
        );
        assert!(!Virtualization::Pvm.is_hardware());
    }

    #[test]
    fn reads_mem_total() {
        let m = "MemTotal:       24000000 kB\nMemFree: 1 kB\n";
        assert_eq!(parse_mem_total(m), Some(24_000_000 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert!(mem_total().unwrap_or(0) > 0);
    }
}
