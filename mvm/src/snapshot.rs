//! `mvm snapshot create|ls|rm`: snapshots of running VM containers, which `mvm run
//! --from-snapshot` starts forks of (see `engine::snapshot`).

use std::path::Path;

use clap::{Args, Subcommand};
use engine::snapshot::{self, SnapshotStore};
use engine::units::format_size;

use crate::error::from_engine;
use crate::output::table;

/// Flags of `mvm snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Save a running VM container (its memory, processes and writable layer) as SNAPSHOT;
    /// it runs on. `mvm run --from-snapshot SNAPSHOT` starts copies of it.
    Create {
        /// The container (name or id).
        container: String,
        /// The snapshot's name.
        snapshot: String,
    },
    /// List snapshots: NAME CONTAINER IMAGE MEMORY SIZE CREATED.
    Ls,
    /// Remove snapshots (forks running from one keep running).
    Rm {
        /// Snapshot names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Runs `mvm snapshot ...`.
pub fn run(root: &Path, args: &SnapshotArgs) -> anyhow::Result<i32> {
    match &args.command {
        SnapshotCommand::Create {
            container,
            snapshot,
        } => {
            let made = snapshot::create(root, container, snapshot).map_err(from_engine)?;
            log::info!(
                "snapshot {}: the VM stood still {} ms ({} pages of data)",
                made.info.name,
                made.info.paused_ms,
                made.info.data_pages
            );
            outln!("{}", made.info.name);
        }
        SnapshotCommand::Ls => {
            let store = SnapshotStore::open(root).map_err(from_engine)?;
            let mut rows =
                vec![["NAME", "CONTAINER", "IMAGE", "MEMORY", "SIZE", "CREATED"].map(String::from)];
            let now = engine::state::now();
            for s in store.list().map_err(from_engine)? {
                let size = format_size(s.disk_bytes);
                rows.push(match &s.info {
                    Some(i) => [
                        s.name,
                        i.container.clone(),
                        i.image.clone(),
                        format_size(i.spec.vm_memory()),
                        size,
                        format!(
                            "{} ago",
                            crate::lifecycle::human_duration(now.saturating_sub(i.created))
                        ),
                    ],
                    None => [
                        s.name,
                        String::new(),
                        String::new(),
                        String::new(),
                        size,
                        "broken".into(),
                    ],
                });
            }
            print!("{}", table(&rows));
        }
        SnapshotCommand::Rm { names } => {
            let store = SnapshotStore::open(root).map_err(from_engine)?;
            for name in names {
                store.remove(name).map_err(from_engine)?;
                outln!("{name}");
            }
        }
    }
    Ok(0)
}
