//! `mvm version`.

use clap::Args;

/// Flags of `mvm version`.
#[derive(Debug, Args)]
pub struct VersionArgs {}

/// Prints the version of mvm and of the guest agent protocol.
pub fn run(_args: &VersionArgs) -> anyhow::Result<i32> {
    outln!("mvm {}", env!("CARGO_PKG_VERSION"));
    outln!(
        "target: {}-{}",
        std::env::consts::ARCH,
        std::env::consts::OS
    );
    Ok(0)
}
