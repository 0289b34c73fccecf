//! Counters of one virtio-net device, readable as JSON while the device runs.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one virtio-net device. Shared (`Arc`) between the device and readers.
#[derive(Debug, Default, Serialize)]
pub struct NetMetrics {
    /// Frames the guest sent that reached the backend.
    pub tx_frames: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Guest frames dropped: malformed chain, too short or larger than the maximum frame.
    pub tx_dropped: AtomicU64,
    /// Frames the backend refused to send.
    pub tx_backend_errors: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// Received frames dropped: larger than the guest's buffers or than the maximum frame.
    pub rx_dropped: AtomicU64,
    /// Receive buffers the guest offered that the device could not use (unwritable, too small).
    pub rx_bad_buffers: AtomicU64,
    /// Receive errors from the backend other than "nothing to read".
    pub rx_backend_errors: AtomicU64,
    /// Times the device ran out of receive buffers with a frame pending.
    pub rx_no_buffers: AtomicU64,
    /// Interrupts raised towards the guest.
    pub interrupts: AtomicU64,
}

impl NetMetrics {
    /// Adds `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to `counter`.
    pub(crate) fn inc(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// All counters as a JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn metrics_serialise_as_json_numbers() {
        let m = NetMetrics::default();
        NetMetrics::add(&m.tx_bytes, 42);
        let v: serde_json::Value = serde_json::from_str(&m.to_json()).expect("json");
        assert_eq!(v["tx_bytes"], 42);
        assert_eq!(v["rx_frames"], 0);
    }
}
