//! Rate-limited log lines for what a guest can trigger at will: a hostile guest must not fill the
//! host's logs (or slow the VMM down writing them). Each call site of [`warn_limited!`] or
//! [`error_limited!`] has its own limiter: [`BURST`] lines per [`WINDOW`], then silence, and the
//! first line after a quiet window says how many were suppressed.
//!
//! [`warn_limited!`]: crate::warn_limited
//! [`error_limited!`]: crate::error_limited

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site may log per window.
pub const BURST: u32 = 5;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

/// The limiter of one call site.
#[derive(Debug)]
pub struct RateLimit {
    state: Mutex<State>,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    /// A limiter with nothing logged yet (usable in a `static`).
    pub const fn new() -> Self {
        RateLimit {
            state: Mutex::new(State {
                window_start: None,
                in_window: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged at `now`: `Some(n)` with the number of lines suppressed
    /// since the last one logged, or `None` to stay quiet.
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let fresh = s
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW);
        if fresh {
            s.window_start = Some(now);
            s.in_window = 0;
        }
        if s.in_window >= BURST {
            s.suppressed += 1;
            return None;
        }
        s.in_window += 1;
        Some(std::mem::take(&mut s.suppressed))
    }

    /// [`RateLimit::allow_at`] now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }
}

/// `log::warn!` for lines a guest can trigger: at most [`BURST`] per second from each call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if log::log_enabled!(log::Level::Warn) {
            if let Some(suppressed) = LIMIT.allow() {
                if suppressed > 0 {
                    log::warn!("({suppressed} similar lines suppressed)");
                }
                log::warn!($($arg)+);
            }
        }
    }};
}

/// `log::error!` for lines a guest can trigger: at most [`BURST`] per second from each call site.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if log::log_enabled!(log::Level::Error) {
            if let Some(suppressed) = LIMIT.allow() {
                if suppressed > 0 {
                    log::error!("({suppressed} similar lines suppressed)");
                }
                log::error!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_silence_then_the_count() {
        let limit = RateLimit::new();
        let t0 = Instant::now();
        let allowed: Vec<_> = (0..1000).map(|_| limit.allow_at(t0)).collect();
        assert_eq!(
            allowed.iter().filter(|a| a.is_some()).count(),
            BURST as usize
        );
        assert!(allowed[..BURST as usize].iter().all(|a| *a == Some(0)));
        // The next window: the first line reports the rest.
        let later = t0 + WINDOW;
        assert_eq!(limit.allow_at(later), Some(1000 - u64::from(BURST)));
        assert_eq!(limit.allow_at(later), Some(0));
    }

    #[test]
    fn the_macro_logs_and_each_site_has_its_own_limit() {
        for _ in 0..100 {
            crate::warn_limited!("guest did something odd {}", 1);
            crate::error_limited!("guest did something worse");
        }
    }
}
