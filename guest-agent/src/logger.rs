//! The one logger of mvm's binaries: records at or above a level go to stderr, one line each,
//! as `<program>: <level>: <message>`. `mvm` takes its level from `MVM_LOG`; the guest agent from
//! `MVM_AGENT_LOG` on the host, or `mvm.log=` on the guest kernel's command line
//! (`mvm run --kernel-args mvm.log=debug`).

use std::sync::OnceLock;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLog {
    program: OnceLock<&'static str>,
}

impl Log for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "{}: {}: {}",
                self.program.get().copied().unwrap_or("mvm"),
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLog = StderrLog {
    program: OnceLock::new(),
};

/// Parses a level name (`off`, `error`, `warn`, `info`, `debug`, `trace`, any case); unknown
/// names give `warn`.
pub fn parse_level(name: &str) -> LevelFilter {
    name.parse().unwrap_or(LevelFilter::Warn)
}

/// Installs the logger for `program` at `level` (a second call only changes the level).
pub fn init(program: &'static str, level: LevelFilter) {
    let _ = LOGGER.program.set(program);
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
