//! Counters of one block device, readable at any time as JSON.

use serde::Serialize;

use crate::virtio::chains::QueueMetrics;
use crate::virtio::metrics::{Counter, Counters};

/// What one block device did since it was created.
#[derive(Debug, Default, Serialize)]
pub struct BlockMetrics {
    /// Activation and queue counters, flattened into this object (`activations`,
    /// `queue_events`, `queue_errors`, `interrupts`).
    #[serde(flatten)]
    pub queue: QueueMetrics,
    /// Read requests completed successfully.
    pub reads: Counter,
    /// Bytes read from the disk into guest memory.
    pub read_bytes: Counter,
    /// Write requests completed successfully.
    pub writes: Counter,
    /// Bytes written from guest memory to the disk.
    pub write_bytes: Counter,
    /// Flush requests completed successfully.
    pub flushes: Counter,
    /// GET_ID requests answered.
    pub get_ids: Counter,
    /// Discard requests completed successfully.
    pub discards: Counter,
    /// Write-zeroes requests completed successfully.
    pub write_zeroes: Counter,
    /// Requests answered with IOERR (bad range, read-only disk, I/O error, malformed request).
    pub io_errors: Counter,
    /// Requests answered with UNSUPP.
    pub unsupported: Counter,
    /// Descriptor chains so broken that no status could be written (returned with length 0).
    pub invalid_chains: Counter,
    /// Times the rate limiter held the rest of the queue back.
    pub throttled: Counter,
}

impl Counters for BlockMetrics {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::metrics::DeviceMetrics;

    #[test]
    fn serialises_every_counter_as_json() {
        let m = BlockMetrics::default();
        m.read_bytes.add(4096);
        m.reads.inc();
        m.queue.interrupts.add(3);
        let json = m.to_json();
        assert_eq!(json["read_bytes"], 4096);
        assert_eq!(json["reads"], 1);
        assert_eq!(json["io_errors"], 0);
        assert_eq!(json["interrupts"], 3, "queue counters sit at the top level");
        assert_eq!(json.as_object().map(|o| o.len()), Some(16));
    }
}
