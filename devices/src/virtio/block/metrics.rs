//! Counters of one block device, readable at any time as JSON.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// What one block device did since it was created.
#[derive(Debug, Default, Serialize)]
pub struct BlockMetrics {
    /// Times the device was activated by a driver.
    pub activations: AtomicU64,
    /// Queue notifications handled.
    pub queue_events: AtomicU64,
    /// Read requests completed successfully.
    pub reads: AtomicU64,
    /// Bytes read from the disk into guest memory.
    pub read_bytes: AtomicU64,
    /// Write requests completed successfully.
    pub writes: AtomicU64,
    /// Bytes written from guest memory to the disk.
    pub write_bytes: AtomicU64,
    /// Flush requests completed successfully.
    pub flushes: AtomicU64,
    /// GET_ID requests answered.
    pub get_ids: AtomicU64,
    /// Discard requests completed successfully.
    pub discards: AtomicU64,
    /// Write-zeroes requests completed successfully.
    pub write_zeroes: AtomicU64,
    /// Requests answered with IOERR (bad range, read-only disk, I/O error, malformed request).
    pub io_errors: AtomicU64,
    /// Requests answered with UNSUPP.
    pub unsupported: AtomicU64,
    /// Descriptor chains so broken that no status could be written (returned with length 0).
    pub invalid_chains: AtomicU64,
    /// Queue-level failures (unreadable rings, bad avail index).
    pub queue_errors: AtomicU64,
    /// Interrupts raised towards the guest.
    pub interrupts: AtomicU64,
}

impl BlockMetrics {
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
        let m = BlockMetrics::default();
        BlockMetrics::add(&m.read_bytes, 4096);
        BlockMetrics::inc(&m.reads);
        let json = m.to_json();
        assert_eq!(json["read_bytes"], 4096);
        assert_eq!(json["reads"], 1);
        assert_eq!(json["io_errors"], 0);
        assert_eq!(json.as_object().map(|o| o.len()), Some(15));
    }
}
