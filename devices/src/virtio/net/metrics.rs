//! Counters of one virtio-net device, readable as JSON while the device runs.

use serde::Serialize;

use crate::virtio::metrics::{Counter, Counters};

/// Counters of one virtio-net device. Shared (`Arc`) between the device and readers.
#[derive(Debug, Default, Serialize)]
pub struct NetMetrics {
    /// Frames the guest sent that reached the backend.
    pub tx_frames: Counter,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: Counter,
    /// Guest frames dropped: malformed chain, too short or larger than the maximum frame.
    pub tx_dropped: Counter,
    /// Frames the backend refused to send.
    pub tx_backend_errors: Counter,
    /// Frames delivered to the guest.
    pub rx_frames: Counter,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: Counter,
    /// Received frames dropped: larger than the guest's buffers or than the maximum frame.
    pub rx_dropped: Counter,
    /// Receive buffers the guest offered that the device could not use (unwritable, too small).
    pub rx_bad_buffers: Counter,
    /// Receive errors from the backend other than "nothing to read".
    pub rx_backend_errors: Counter,
    /// Times the device ran out of receive buffers with a frame pending.
    pub rx_no_buffers: Counter,
    /// Interrupts raised towards the guest.
    pub interrupts: Counter,
    /// Times the rate limiter held transmitting back.
    pub tx_throttled: Counter,
    /// Times the rate limiter held receiving back.
    pub rx_throttled: Counter,
}

impl Counters for NetMetrics {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::metrics::DeviceMetrics;

    #[test]
    fn metrics_serialise_as_json_numbers() {
        let m = NetMetrics::default();
        m.tx_bytes.add(42);
        let v = m.to_json();
        assert_eq!(v["tx_bytes"], 42);
        assert_eq!(v["rx_frames"], 0);
    }
}
