//! Counters of one rng device, readable at any time as JSON.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// What one rng device did since it was created.
#[derive(Debug, Default, Serialize)]
pub struct RngMetrics {
    /// Times the device was activated by a driver.
    pub activations: AtomicU64,
    /// Queue notifications handled.
    pub queue_events: AtomicU64,
    /// Requests answered with entropy.
    pub requests: AtomicU64,
    /// Random bytes written into guest memory.
    pub bytes: AtomicU64,
    /// Chains with buffers outside guest memory (returned with length 0).
    pub invalid_chains: AtomicU64,
    /// getrandom failures (request returned with length 0).
    pub entropy_errors: AtomicU64,
    /// Queue-level failures (unreadable rings, bad avail index).
    pub queue_errors: AtomicU64,
    /// Interrupts raised towards the guest.
    pub interrupts: AtomicU64,
}

impl RngMetrics {
    /// Adds `n` to a counter.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to a counter.
    pub(crate) fn inc(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    /// A JSON object with every counter.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_every_counter_as_json() {
        let m = RngMetrics::default();
        RngMetrics::add(&m.bytes, 64);
        let json = m.to_json();
        assert_eq!(json["bytes"], 64);
        assert_eq!(json.as_object().map(|o| o.len()), Some(8));
    }
}
