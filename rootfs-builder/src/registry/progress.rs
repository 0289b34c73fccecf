//! Pull/push progress on stderr: a line per finished blob; a live byte counter redrawn in place on
//! a tty, or a plain `label: downloading X / Y` line every few seconds when stderr is a file or
//! pipe (so logs show a long download is alive without filling up).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const REDRAW_EVERY: Duration = Duration::from_millis(200);
/// How often a download in progress is reported when stderr is not a terminal.
pub(crate) const LINE_EVERY: Duration = Duration::from_secs(2);

/// Progress printer; does nothing when disabled.
#[derive(Debug)]
pub(crate) struct Progress {
    enabled: bool,
    tty: bool,
    last_draw: Option<Instant>,
    drawn: bool,
    /// When the current blob's first bytes arrived (for periodic lines off a terminal).
    started: Option<Instant>,
}

impl Progress {
    pub(crate) fn new(enabled: bool) -> Self {
        Progress {
            enabled,
            tty: enabled && std::io::stderr().is_terminal(),
            last_draw: None,
            drawn: false,
            started: None,
        }
    }

    /// Reports `label: done / total`: redrawn in place at most every 200 ms on a terminal,
    /// otherwise as a new line every [`LINE_EVERY`].
    pub(crate) fn bytes(&mut self, label: &str, done: u64, total: u64) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if !self.tty {
            let since = *self.started.get_or_insert(now);
            let last = self.last_draw.unwrap_or(since);
            if now.duration_since(last) >= LINE_EVERY {
                self.last_draw = Some(now);
                let mut err = std::io::stderr().lock();
                let _ = writeln!(
                    err,
                    "{label}: downloading {} / {}",
                    human(done),
                    human(total)
                );
            }
            return;
        }
        if self
            .last_draw
            .is_some_and(|t| now.duration_since(t) < REDRAW_EVERY)
        {
            return;
        }
        self.last_draw = Some(now);
        self.drawn = true;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{label}: {} / {}\x1b[K", human(done), human(total));
        let _ = err.flush();
    }

    /// Prints one finished line (replacing a live counter).
    pub(crate) fn line(&mut self, text: &str) {
        if !self.enabled {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.drawn {
            let _ = write!(err, "\r\x1b[K");
            self.drawn = false;
        }
        self.last_draw = None;
        self.started = None;
        let _ = writeln!(err, "{text}");
    }
}

/// `1.5 MB` style sizes (decimal units, as Docker shows them).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(999), "999 B");
        assert_eq!(human(1500), "1.5 kB");
        assert_eq!(human(187_600_000), "187.6 MB");
    }
}
