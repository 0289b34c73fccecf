//! `mvm compare`: the flags become an `engine::compare::CompareSpec`, the engine runs and
//! measures every mode, and the result is printed as a table ([`table`]), JSON (the engine's
//! `Comparison`) or a self-contained HTML page ([`html`]).

mod html;
mod rows;
mod table;

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use engine::compare::{CompareSpec, Comparison, Progress};
use engine::units::parse_size;
use guest_agent::runtime::Limits;

use crate::error::{bad_input, from_engine};
use crate::run::IsolationArg;

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned text: rows are measurements, columns are modes.
    Table,
    /// The comparison as JSON.
    Json,
    /// One self-contained HTML page with bar charts.
    Html,
}

/// Flags of `mvm compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Image to run in every mode.
    #[arg(long, value_name = "IMAGE", required_unless_present = "from")]
    pub image: Option<String>,
    /// Modes to compare, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "process,container,vm"
    )]
    pub isolation: Vec<IsolationArg>,
    /// Memory limit of every mode (a VM's memory).
    #[arg(long, short = 'm', value_name = "SIZE", default_value = "256M")]
    pub mem: String,
    /// CPU limit of every mode, in CPUs (a VM gets them rounded up as vCPUs).
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// Process limit of every mode (each fork of its check is slow in an emulated guest).
    #[arg(long, value_name = "N", default_value_t = engine::compare::DEFAULT_PIDS)]
    pub pids_limit: u64,
    /// Runs per mode; costs are their medians.
    #[arg(long, value_name = "N", default_value_t = engine::compare::DEFAULT_RUNS)]
    pub runs: u32,
    /// Guest kernel of the VM (default: <root>/kernel/vmlinux).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Extra guest kernel arguments of the VM.
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub kernel_args: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Write the output to FILE (the table is then printed as well).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Render a comparison saved with --format json instead of running one.
    #[arg(long, value_name = "FILE", conflicts_with = "image")]
    pub from: Option<PathBuf>,
    /// The workload to time (after `--`; default: the probe's one-line hello, which works in
    /// any image).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// The spec the flags describe.
pub fn to_spec(args: &CompareArgs) -> anyhow::Result<CompareSpec> {
    let image = args
        .image
        .clone()
        .ok_or_else(|| bad_input("give --image IMAGE"))?;
    let memory = parse_size(&args.mem).map_err(|e| bad_input(format!("--mem: {e}")))?;
    Ok(CompareSpec {
        command: args.command.clone(),
        isolations: args.isolation.iter().map(|&i| i.into()).collect(),
        limits: Limits {
            memory_bytes: Some(memory),
            cpus: args.cpus,
            pids_max: Some(args.pids_limit),
        },
        runs: args.runs,
        kernel: args.kernel.clone(),
        kernel_args: args.kernel_args.clone(),
        ..CompareSpec::new(image)
    })
}

/// Runs `mvm compare` (or renders `--from`); returns 0.
pub fn run(root: &Path, args: &CompareArgs) -> anyhow::Result<i32> {
    let comparison = match &args.from {
        Some(file) => load(file)?,
        None => {
            let spec = to_spec(args)?;
            engine::compare::compare(root, &spec, &mut show_progress).map_err(from_engine)?
        }
    };
    let text = match args.format {
        Format::Table => table::render(&comparison),
        Format::Json => {
            let mut j = serde_json::to_string_pretty(&comparison)?;
            j.push('\n');
            j
        }
        Format::Html => html::render(&comparison),
    };
    match &args.output {
        Some(file) => {
            std::fs::write(file, &text)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
            if args.format != Format::Table {
                print(&table::render(&comparison));
            }
            eprintln!("compare: wrote {}", file.display());
        }
        None => print(&text),
    }
    Ok(0)
}

fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        crate::output::stdout_failed(&e);
    }
}

/// A comparison saved as JSON.
fn load(file: &Path) -> anyhow::Result<Comparison> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| bad_input(format!("--from {}: {e}", file.display())))?;
    serde_json::from_str(&text).map_err(|e| {
        bad_input(format!(
            "--from {}: not a comparison saved with --format json: {e}",
            file.display()
        ))
    })
}

/// One line on stderr per run: the runs take from seconds to minutes.
fn show_progress(p: Progress) {
    match p {
        Progress::Unavailable { isolation, reason } => {
            eprintln!("compare: {isolation} cannot run here: {reason}");
        }
        Progress::Starting {
            isolation,
            run,
            runs,
        } => eprintln!("compare: {isolation} run {run}/{runs} ..."),
        Progress::Finished {
            isolation,
            took,
            error,
        } => match error {
            None => eprintln!("compare: {isolation} done in {:.1} s", took.as_secs_f64()),
            Some(e) => eprintln!(
                "compare: {isolation} failed after {:.1} s: {e}",
                took.as_secs_f64()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use engine::spec::Isolation;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        compare: CompareArgs,
    }

    fn parse(args: &[&str]) -> anyhow::Result<CompareArgs> {
        Ok(Cli::try_parse_from(std::iter::once("compare").chain(args.iter().copied()))?.compare)
    }

    #[test]
    fn flags_become_one_spec() {
        let a = parse(&[
            "--image",
            "busybox",
            "--isolation",
            "vm,process",
            "--mem",
            "128M",
            "--cpus",
            "1",
            "--runs",
            "5",
            "--",
            "uname",
            "-r",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let s = to_spec(&a).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.isolations, [Isolation::Vm, Isolation::Process]);
        assert_eq!(s.limits.memory_bytes, Some(128 << 20));
        assert_eq!(s.limits.cpus, Some(1.0));
        assert_eq!(s.limits.pids_max, Some(engine::compare::DEFAULT_PIDS));
        assert_eq!(
            (s.runs, s.command.as_slice()),
            (5, &["uname".to_string(), "-r".into()][..])
        );
        let d = to_spec(&parse(&["--image", "busybox"]).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d, CompareSpec::new("busybox"));
    }

    #[test]
    fn an_image_or_a_saved_comparison_is_needed() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--from", "x.json"]).is_ok());
        assert!(parse(&["--from", "x.json", "--image", "y"]).is_err());
        assert!(parse(&["--image", "y", "--isolation", "bogus"]).is_err());
    }
}
