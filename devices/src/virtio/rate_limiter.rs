//! Rate limits for what a guest may push through a device: token buckets (as Firecracker's),
//! one for bytes and one for operations (requests, packets), refilled continuously at their
//! rate and holding at most [`BURST`] of it.
//!
//! A device asks [`Throttle::blocked`] before it takes the next request from a queue and charges
//! each request it served with [`Throttle::charge`]. A request is never refused for being larger
//! than the bucket: it is served when the bucket is not in debt and may take it below zero, and
//! nothing more is served until the debt is paid. So the rate holds over time, whatever the
//! request sizes, and a throttled device arms a timer ([`Throttle::timer`]) to resume exactly
//! when the debt is paid instead of polling.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// How much of its rate a bucket holds at most: a burst of this long at full speed.
pub const BURST: Duration = Duration::from_millis(100);

/// One direction's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Bytes per second.
    #[serde(default)]
    pub bytes_per_sec: Option<u64>,
    /// Operations (requests, packets) per second.
    #[serde(default)]
    pub ops_per_sec: Option<u64>,
}

impl Limit {
    /// Whether anything is limited.
    pub fn is_set(&self) -> bool {
        self.bytes_per_sec.is_some() || self.ops_per_sec.is_some()
    }
}

/// A token bucket that may go into debt (see the module docs).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    size: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilled at `rate` tokens per second (at least one).
    pub fn new(rate: u64, now: Instant) -> Self {
        #[allow(clippy::cast_precision_loss)]
        let rate = rate.max(1) as f64;
        let size = (rate * BURST.as_secs_f64()).max(1.0);
        TokenBucket {
            rate,
            size,
            tokens: size,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.size);
    }

    /// Takes `n` tokens (the bucket may go into debt).
    pub fn charge(&mut self, n: u64, now: Instant) {
        self.refill(now);
        #[allow(clippy::cast_precision_loss)]
        let n = n as f64;
        self.tokens -= n;
    }

    /// How long until the bucket is out of debt (zero when it is).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(-self.tokens / self.rate)
    }
}

/// The buckets of one [`Limit`].
#[derive(Debug, Clone)]
pub struct Buckets {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl Buckets {
    /// Full buckets for `limit`.
    pub fn new(limit: Limit, now: Instant) -> Self {
        Buckets {
            bytes: limit.bytes_per_sec.map(|r| TokenBucket::new(r, now)),
            ops: limit.ops_per_sec.map(|r| TokenBucket::new(r, now)),
        }
    }

    /// Charges one operation of `bytes` bytes.
    pub fn charge(&mut self, bytes: u64, now: Instant) {
        if let Some(b) = &mut self.bytes {
            b.charge(bytes, now);
        }
        if let Some(o) = &mut self.ops {
            o.charge(1, now);
        }
    }

    /// How long until both buckets are out of debt.
    pub fn wait(&mut self, now: Instant) -> Duration {
        let b = self.bytes.as_mut().map_or(Duration::ZERO, |b| b.wait(now));
        let o = self.ops.as_mut().map_or(Duration::ZERO, |o| o.wait(now));
        b.max(o)
    }
}

/// A device's limiter for up to two kinds of traffic (reads and writes, or receive and
/// transmit), with the timer that ends a throttled stretch.
#[derive(Debug)]
pub struct Throttle {
    kinds: [Buckets; 2],
    timer: Option<TimerFd>,
    /// When the armed timer fires (None: not armed). Both kinds share the timer, so it fires at
    /// the earlier of their waits: a long wait of one kind must not hold back the other.
    deadline: Option<Instant>,
}

/// Which kind of traffic a [`Throttle`] charges: the first or the second of its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Reads (block) or transmit (net: guest to host).
    First,
    /// Writes (block) or receive (net: host to guest).
    Second,
}

impl Throttle {
    /// A throttle for `first` and `second`; without any limit it never throttles and has no
    /// timer.
    pub fn new(first: Limit, second: Limit) -> std::io::Result<Self> {
        let now = Instant::now();
        let timer = if first.is_set() || second.is_set() {
            Some(TimerFd::new()?)
        } else {
            None
        };
        Ok(Throttle {
            kinds: [Buckets::new(first, now), Buckets::new(second, now)],
            timer,
            deadline: None,
        })
    }

    fn bucket(&mut self, kind: Kind) -> &mut Buckets {
        match kind {
            Kind::First => &mut self.kinds[0],
            Kind::Second => &mut self.kinds[1],
        }
    }

    /// Whether traffic of `kind` must wait now; if so the timer is armed for when it may go on.
    pub fn blocked(&mut self, kind: Kind) -> bool {
        if self.timer.is_none() {
            return false;
        }
        let now = Instant::now();
        let wait = self.bucket(kind).wait(now);
        if wait.is_zero() {
            return false;
        }
        self.arm(now, wait);
        true
    }

    /// Charges one operation of `bytes` bytes of `kind`.
    pub fn charge(&mut self, kind: Kind, bytes: u64) {
        if self.timer.is_some() {
            self.bucket(kind).charge(bytes, Instant::now());
        }
    }

    /// Arms the timer to fire `wait` after `now`, unless it already fires before that (the
    /// device serves both kinds when it fires, and a kind still in debt arms it again).
    fn arm(&mut self, now: Instant, wait: Duration) {
        let Some(timer) = &mut self.timer else {
            return;
        };
        // A zero duration would disarm the timer: wait at least a microsecond.
        let wait = wait.max(Duration::from_micros(1));
        let at = now + wait;
        if self.deadline.is_some_and(|d| d <= at) {
            return;
        }
        match timer.reset(wait, None) {
            Ok(()) => self.deadline = Some(at),
            Err(e) => crate::warn_limited!("rate limiter: cannot arm its timer: {e}"),
        }
    }

    /// Registers the timer with the event loop (nothing without limits).
    pub fn init(&self, ops: &mut EventOps) {
        if let Some(t) = &self.timer {
            if let Err(e) = ops.add(Events::new(t, EventSet::IN)) {
                crate::warn_limited!("rate limiter: cannot watch its timer: {e:?}");
            }
        }
    }

    /// Whether `events` is this throttle's timer; if so it is consumed (the device then serves
    /// what waited).
    pub fn timer(&mut self, events: &Events) -> bool {
        let Some(t) = &mut self.timer else {
            return false;
        };
        if events.fd() != t.as_raw_fd() {
            return false;
        }
        let _ = t.wait();
        self.deadline = None;
        true
    }

    /// Whether a throttled stretch is under way (the timer is armed).
    pub fn waiting(&self) -> bool {
        self.deadline.is_some()
    }

    /// When the armed timer fires, if it is armed.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_its_rate_over_time_whatever_the_request_sizes() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, t0);
        // A full bucket holds 100 ms of rate; one large request takes it into debt.
        assert_eq!(b.wait(t0), Duration::ZERO);
        b.charge(1_100_000, t0);
        assert_eq!(b.wait(t0), Duration::from_secs(1));
        assert_eq!(
            b.wait(t0 + Duration::from_millis(400)),
            Duration::from_millis(600)
        );
        assert_eq!(b.wait(t0 + Duration::from_secs(1)), Duration::ZERO);
        // Served only when out of debt: 10 MB in 64 KiB requests take 10 s less the burst.
        let mut b = TokenBucket::new(1_000_000, t0);
        let (mut now, mut sent) = (t0, 0u64);
        while sent < 10_000_000 {
            now += b.wait(now);
            b.charge(65_536, now);
            sent += 65_536;
        }
        let took = now.duration_since(t0).as_secs_f64();
        assert!((9.8..=10.0).contains(&took), "{took}");
        // Idle time refills at most one burst.
        assert_eq!(b.wait(now + Duration::from_secs(60)), Duration::ZERO);
        b.charge(100_001, now + Duration::from_secs(60));
        assert!(b.wait(now + Duration::from_secs(60)) > Duration::ZERO);
    }

    #[test]
    fn operations_and_bytes_are_limited_together_and_apart() {
        let t0 = Instant::now();
        let mut k = Buckets::new(
            Limit {
                bytes_per_sec: Some(1000),
                ops_per_sec: Some(10),
            },
            t0,
        );
        // One op of 100 bytes empties both buckets (burst: 100 bytes, 1 op).
        k.charge(100, t0);
        assert_eq!(k.wait(t0), Duration::ZERO);
        k.charge(1, t0);
        // The op bucket is a whole op in debt: 100 ms; the byte bucket only 1 ms.
        assert_eq!(k.wait(t0), Duration::from_millis(100));
        let mut unlimited = Buckets::new(Limit::default(), t0);
        unlimited.charge(u64::MAX, t0);
        assert_eq!(unlimited.wait(t0), Duration::ZERO);
    }

    #[test]
    fn a_throttle_without_limits_never_waits_and_one_with_limits_arms_its_timer() {
        let mut none = Throttle::new(Limit::default(), Limit::default()).unwrap();
        none.charge(Kind::First, 1 << 40);
        assert!(!none.blocked(Kind::First));
        assert!(!none.waiting());
        let write = Limit {
            bytes_per_sec: Some(1000),
            ops_per_sec: None,
        };
        let mut t = Throttle::new(Limit::default(), write).unwrap();
        t.charge(Kind::Second, 10_000);
        assert!(t.blocked(Kind::Second));
        assert!(t.waiting());
        assert!(!t.blocked(Kind::First), "reads are not limited");
    }

    #[test]
    fn a_long_wait_of_one_kind_does_not_delay_the_other_kinds_wake_up() {
        // Receive and transmit share one timer: transmit deep in debt (about 10 s) must not
        // push back receive's wake-up (about 10 ms), or receive stalls under its limit.
        let limit = Limit {
            bytes_per_sec: Some(100_000),
            ops_per_sec: None,
        };
        let mut t = Throttle::new(limit, limit).unwrap();
        t.charge(Kind::Second, 10_000 + 1_000);
        assert!(t.blocked(Kind::Second));
        let soon = t.deadline().unwrap();
        t.charge(Kind::First, 10_000 + 1_000_000);
        assert!(t.blocked(Kind::First));
        assert_eq!(t.deadline(), Some(soon), "the earlier wake-up stays");
        assert!(soon <= Instant::now() + Duration::from_millis(11));
        // The other order: a shorter wait after a longer one brings the wake-up forward.
        let mut t = Throttle::new(limit, limit).unwrap();
        t.charge(Kind::First, 10_000 + 1_000_000);
        assert!(t.blocked(Kind::First));
        let late = t.deadline().unwrap();
        t.charge(Kind::Second, 10_000 + 1_000);
        assert!(t.blocked(Kind::Second));
        assert!(t.deadline().unwrap() < late);
    }
}
