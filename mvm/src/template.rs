//! `mvm template ls|rm|prune`: the VM templates under the mvm root (see `engine::template`).

use std::path::Path;

use clap::{Args, Subcommand};
use engine::template::TemplateStore;
use engine::units::format_size;

use crate::error::from_engine;
use crate::output::table;

/// Flags of `mvm template`.
#[derive(Debug, Args)]
pub struct TemplateArgs {
    #[command(subcommand)]
    command: TemplateCommand,
}

#[derive(Debug, Subcommand)]
enum TemplateCommand {
    /// List templates: ID KERNEL MEMORY CPUS DISKS NETWORK SIZE BOOT STATUS.
    Ls,
    /// Remove templates (a unique id prefix is enough).
    Rm {
        /// Template ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove stale templates (their kernel or agent changed) and leftovers of killed runs.
    Prune {
        /// Remove every template.
        #[arg(short = 'a', long)]
        all: bool,
    },
}

/// Runs `mvm template ...`.
pub fn run(root: &Path, args: &TemplateArgs) -> anyhow::Result<i32> {
    let store = TemplateStore::open(root).map_err(from_engine)?;
    match &args.command {
        TemplateCommand::Ls => {
            let mut rows = vec![[
                "ID", "KERNEL", "MEMORY", "CPUS", "DISKS", "NETWORK", "SIZE", "BOOT", "STATUS",
            ]
            .map(String::from)];
            for t in store.list().map_err(from_engine)? {
                let size = format_size(t.disk_bytes);
                rows.push(match &t.info {
                    Some(i) => [
                        t.id,
                        i.key.kernel.path.display().to_string(),
                        format_size(i.key.mem_bytes),
                        i.key.vcpus.to_string(),
                        i.key.disks.join(","),
                        i.key.network.clone(),
                        size,
                        format!("{:.1}s", i.boot_ms as f64 / 1000.0),
                        if i.stale() { "stale" } else { "ok" }.into(),
                    ],
                    None => {
                        let mut row = [const { String::new() }; 9];
                        row[0] = t.id;
                        row[6] = size;
                        row[8] = "broken".into();
                        row
                    }
                });
            }
            print!("{}", table(&rows));
        }
        TemplateCommand::Rm { ids } => {
            for id in ids {
                outln!("{}", store.remove(id).map_err(from_engine)?);
            }
        }
        TemplateCommand::Prune { all } => {
            for id in store.prune(*all).map_err(from_engine)? {
                outln!("{id}");
            }
        }
    }
    Ok(0)
}
