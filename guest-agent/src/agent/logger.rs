//! The agent's log: records at or above a level go to stderr (the guest console), prefixed with
//! `mvm-agent`. In the guest the level comes from `mvm.log=` on the kernel command line
//! (`mvm run --kernel-args mvm.log=debug`), on the host from `MVM_AGENT_LOG`.

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLog;

impl Log for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "mvm-agent: {} {}",
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLog = StderrLog;

/// Parses a level name (`off`, `error`, `warn`, `info`, `debug`, `trace`); unknown names give
/// `warn`.
pub fn parse_level(name: &str) -> LevelFilter {
    name.parse().unwrap_or(LevelFilter::Warn)
}

/// Installs the logger at `level` (a second call only changes the level).
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_names_parse_and_unknown_ones_fall_back_to_warn() {
        assert_eq!(parse_level("debug"), LevelFilter::Debug);
        assert_eq!(parse_level("off"), LevelFilter::Off);
        assert_eq!(parse_level("loud"), LevelFilter::Warn);
    }
}
