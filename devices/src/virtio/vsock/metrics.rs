//! Counters of one virtio-vsock device, readable as JSON while the device runs.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one virtio-vsock device. Shared (`Arc`) between the device and readers.
#[derive(Debug, Default, Serialize)]
pub struct VsockMetrics {
    /// Packets taken from the guest's transmit queue and handled.
    pub tx_packets: AtomicU64,
    /// Payload bytes the guest sent to host sockets.
    pub tx_bytes: AtomicU64,
    /// Packets delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Payload bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Guest packets dropped as malformed (bad chain, header, CID or length).
    pub bad_packets: AtomicU64,
    /// Receive buffers the guest offered that the device could not use.
    pub bad_buffers: AtomicU64,
    /// Connections a host program opened with `CONNECT <port>`.
    pub host_connects: AtomicU64,
    /// Connections the guest opened to a host listener.
    pub guest_connects: AtomicU64,
    /// Guest connections refused because no host program listens on the port.
    pub refused: AtomicU64,
    /// Connections refused because the connection limit was reached.
    pub limit_refused: AtomicU64,
    /// RST packets sent to the guest.
    pub resets_sent: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
}

impl VsockMetrics {
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
mod tests {
    use super::*;

    #[test]
    fn vsock_metrics_serialise_as_json() {
        let m = VsockMetrics::default();
        VsockMetrics::inc(&m.refused);
        let v: serde_json::Value = serde_json::from_str(&m.to_json()).expect("json");
        assert_eq!(v["refused"], 1);
    }
}
