//! The VM configuration: what the CLI (and later the API) maps onto, and its validation against
//! the host. Every [`ConfigError`] is the user's input being wrong.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::boot::loader;
use crate::memory::{CMDLINE_MAX_SIZE, MIN_MEM_SIZE};
use crate::mptable;

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Guest memory when none is given: 256 MiB.
pub const DEFAULT_MEM_BYTES: u64 = 256 << 20;

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

fn default_mem() -> u64 {
    DEFAULT_MEM_BYTES
}

fn default_vcpus() -> u8 {
    1
}

/// How to build one microVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: an uncompressed ELF `vmlinux` or a bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk (initramfs), loaded page-aligned at the top of memory below 3 GiB.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (at most 4095 bytes; virtio devices append to it).
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Guest RAM in bytes.
    #[serde(default = "default_mem")]
    pub mem_bytes: u64,
    /// Number of vCPUs (1 up to the smaller of KVM's limit and the MP table's 32).
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// File that receives the serial console output (created or truncated); mvm's stdout if
    /// unset.
    #[serde(default)]
    pub serial_out: Option<PathBuf>,
    /// Feed mvm's stdin to the serial console.
    #[serde(default)]
    pub serial_stdin: bool,
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            mem_bytes: default_mem(),
            vcpus: default_vcpus(),
            serial_out: None,
            serial_stdin: false,
        }
    }
}

/// What the host allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Host RAM in bytes (`MemTotal`).
    pub mem_total: u64,
    /// Most vCPUs per VM mvm can give (KVM's maximum, capped by the MP table).
    pub max_vcpus: u8,
}

impl HostLimits {
    /// Reads the limits of this host from /proc/meminfo and KVM.
    pub fn probe(kvm: &kvm_ioctls::Kvm) -> Self {
        let kvm_max = u8::try_from(kvm.get_max_vcpus()).unwrap_or(u8::MAX);
        Self {
            mem_total: crate::host::mem_total().unwrap_or(u64::MAX),
            max_vcpus: kvm_max.min(mptable::MAX_CPUS),
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Memory below the minimum.
    #[error("memory size {0} bytes is too small: at least {MIN_MEM_SIZE} bytes (2M) are needed")]
    MemTooSmall(u64),
    /// Memory that is not a whole number of pages.
    #[error("memory size {0} bytes is not a multiple of 4K")]
    MemUnaligned(u64),
    /// Memory above the host's RAM.
    #[error("memory size {0} bytes is more than this host's {1} bytes of RAM")]
    MemTooLarge(u64, u64),
    /// Zero vCPUs.
    #[error("the number of vCPUs must be at least 1")]
    NoVcpus,
    /// More vCPUs than allowed.
    #[error("{0} vCPUs is more than the maximum of {1} on this host")]
    TooManyVcpus(u8, u8),
    /// The kernel is missing, unreadable or not a kernel.
    #[error(transparent)]
    Kernel(loader::LoaderError),
    /// The initrd is missing or unreadable.
    #[error("cannot read initrd {}", .0.display())]
    Initrd(PathBuf, #[source] std::io::Error),
    /// The command line is too long or malformed.
    #[error("kernel command line is {0} bytes: at most {max} are allowed", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// The command line has characters the kernel does not accept.
    #[error("invalid kernel command line: {0}")]
    CmdlineInvalid(String),
}

fn check_readable(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(std::io::Error::other("is a directory"));
    }
    std::fs::File::open(path).map(|_| ())
}

impl VmConfig {
    /// Checks everything that can be checked before creating the VM.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        if self.mem_bytes < MIN_MEM_SIZE {
            return Err(ConfigError::MemTooSmall(self.mem_bytes));
        }
        if self.mem_bytes % 4096 != 0 {
            return Err(ConfigError::MemUnaligned(self.mem_bytes));
        }
        if self.mem_bytes > limits.mem_total {
            return Err(ConfigError::MemTooLarge(self.mem_bytes, limits.mem_total));
        }
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > limits.max_vcpus {
            return Err(ConfigError::TooManyVcpus(self.vcpus, limits.max_vcpus));
        }
        check_readable(&self.kernel).map_err(|e| {
            ConfigError::Kernel(loader::LoaderError::Read {
                what: "kernel",
                path: self.kernel.clone(),
                source: e,
            })
        })?;
        loader::detect_format(&self.kernel).map_err(ConfigError::Kernel)?;
        if let Some(initrd) = &self.initrd {
            check_readable(initrd).map_err(|e| ConfigError::Initrd(initrd.clone(), e))?;
        }
        if self.cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        loader::parse_cmdline(&self.cmdline).map_err(|e| {
            ConfigError::CmdlineInvalid(
                std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string()),
            )
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const LIMITS: HostLimits = HostLimits {
        mem_total: 8 << 30,
        max_vcpus: 32,
    };

    fn elf_file() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"\x7fELF\x02\x01\x01").unwrap();
        f
    }

    #[test]
    fn accepts_a_sane_config_and_refuses_bad_numbers() {
        let k = elf_file();
        let cfg = VmConfig::new(k.path());
        cfg.validate(&LIMITS).unwrap();
        let with = |f: &dyn Fn(&mut VmConfig)| {
            let mut c = cfg.clone();
            f(&mut c);
            c.validate(&LIMITS)
        };
        assert!(matches!(
            with(&|c| c.mem_bytes = 0),
            Err(ConfigError::MemTooSmall(0))
        ));
        assert!(matches!(
            with(&|c| c.mem_bytes = 16 << 30),
            Err(ConfigError::MemTooLarge(..))
        ));
        assert!(matches!(
            with(&|c| c.mem_bytes = (4 << 20) + 1),
            Err(ConfigError::MemUnaligned(_))
        ));
        assert!(matches!(with(&|c| c.vcpus = 0), Err(ConfigError::NoVcpus)));
        assert!(matches!(
            with(&|c| c.vcpus = 33),
            Err(ConfigError::TooManyVcpus(33, 32))
        ));
        assert!(matches!(
            with(&|c| c.cmdline = "x".repeat(4096)),
            Err(ConfigError::CmdlineTooLong(4096))
        ));
        assert!(with(&|c| c.cmdline = "x".repeat(4095)).is_ok());
        assert!(matches!(
            with(&|c| c.initrd = Some("/nonexistent/initrd".into())),
            Err(ConfigError::Initrd(..))
        ));
    }

    #[test]
    fn refuses_missing_or_non_kernel_files() {
        let cfg = VmConfig::new("/nonexistent/vmlinux");
        let msg = cfg.validate(&LIMITS).unwrap_err().to_string();
        assert!(msg.contains("/nonexistent/vmlinux"), "{msg}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"just text").unwrap();
        let msg = VmConfig::new(f.path())
            .validate(&LIMITS)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a Linux kernel"), "{msg}");
        let dir = tempfile::tempdir().unwrap();
        assert!(VmConfig::new(dir.path()).validate(&LIMITS).is_err());
    }

    #[test]
    fn serde_rejects_unknown_fields_and_fills_defaults() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel":"/k"}"#).unwrap();
        assert_eq!(c, VmConfig::new("/k"));
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","memory":1}"#).is_err());
    }
}
