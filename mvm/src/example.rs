//! `mvm build-example {busybox|nginx} [-o DIR]`: builds an example OCI image from Debian packages.

use std::path::PathBuf;

use clap::Args;

use crate::error::bad_input;
use engine::state::default_root as root_dir;

/// Flags of `mvm build-example`.
#[derive(Debug, Args)]
pub struct BuildExampleArgs {
    /// Which example: busybox or nginx.
    #[arg(value_parser = ["busybox", "nginx"])]
    pub name: String,
    /// Output OCI image layout directory (default: ./NAME-oci).
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub output: Option<PathBuf>,
}

/// Builds the example into an OCI layout; `.deb` files are cached under ROOT/cache/debs.
pub fn run(args: &BuildExampleArgs, root: Option<PathBuf>) -> anyhow::Result<i32> {
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}-oci", args.name)));
    let cache = root_dir(root).join("cache/debs");
    let manifest = rootfs_builder::examples::build_example_to(&args.name, &cache, &out).map_err(
        |e| match e {
            rootfs_builder::examples::ExampleError::OutputNotLayout(_)
            | rootfs_builder::examples::ExampleError::Unknown(_) => bad_input(e.to_string()),
            other => anyhow::Error::new(other),
        },
    )?;
    outln!("{} {} {}", out.display(), args.name, manifest.digest);
    Ok(0)
}
