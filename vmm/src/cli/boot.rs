//! `mvm boot`: boot a kernel directly (no image, no agent) and wait for the VM to end.
//!
//! Exit codes: 0 when the guest resets (reboot) or the VM is stopped; 1 with one line on stderr
//! when it fails (guest panic, triple fault, KVM error, emulation failure); 2 for bad input;
//! 130 / 143 after SIGINT / SIGTERM.

use std::path::PathBuf;

use clap::Args;

use crate::builder::VmBuilder;
use crate::config::{self, VmConfig};

/// Flags of `mvm boot`.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk (initramfs cpio).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = config::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest memory: bytes or a size with K/M/G (e.g. 256M, 1G).
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub mem: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,
    /// Write the serial console to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub serial_out: Option<PathBuf>,
}

impl BootArgs {
    /// The VM configuration these flags describe.
    pub fn to_config(&self) -> anyhow::Result<VmConfig> {
        let mem_bytes =
            config::parse_mem_size(&self.mem).map_err(|e| super::bad_input(e.to_string()))?;
        Ok(VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            mem_bytes,
            vcpus: self.cpus,
            serial_out: self.serial_out.clone(),
            serial_stdin: true,
        })
    }
}

/// Boots the VM and returns mvm's exit code.
pub fn run(args: &BootArgs) -> anyhow::Result<i32> {
    let cfg = args.to_config()?;
    let builder = VmBuilder::new(cfg).map_err(|e| {
        if e.is_bad_input() {
            super::bad_input(format!("{:#}", anyhow::Error::new(e)))
        } else {
            anyhow::Error::new(e)
        }
    })?;
    let exit = builder.start()?.wait();
    if exit.is_failure() {
        eprintln!("mvm: {exit}");
    } else {
        log::info!("{exit}");
    }
    Ok(exit.exit_code())
}
