//! `mvm cp`: copy files between the host and a running container, as `docker cp`.

use std::path::Path;

use clap::Args;
use engine::copy::{self, CopyEnd, CopyOptions};

use crate::error::from_engine;

/// Flags of `mvm cp`.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// Keep the owners (uid/gid) of the source.
    #[arg(short = 'a', long)]
    pub archive: bool,
    /// Follow a symbolic link the source path names.
    #[arg(short = 'L', long)]
    pub follow_link: bool,
    /// CONTAINER:PATH, a host path, or `-` (a tar stream on stdin).
    pub src: String,
    /// CONTAINER:PATH, a host path, or `-` (a tar stream on stdout).
    pub dst: String,
}

/// `mvm cp SRC DST`.
pub fn cp(root: &Path, args: &CpArgs) -> anyhow::Result<i32> {
    let options = CopyOptions {
        archive: args.archive,
        follow: args.follow_link,
    };
    copy::copy(
        root,
        &CopyEnd::parse(&args.src),
        &CopyEnd::parse(&args.dst),
        options,
    )
    .map_err(from_engine)?;
    Ok(0)
}
