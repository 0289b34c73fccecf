//! Counters of one virtio-vsock device, readable as JSON while the device runs.

use serde::Serialize;

use crate::virtio::metrics::{Counter, Counters};

/// Counters of one virtio-vsock device. Shared (`Arc`) between the device and readers.
#[derive(Debug, Default, Serialize)]
pub struct VsockMetrics {
    /// Packets taken from the guest's transmit queue and handled.
    pub tx_packets: Counter,
    /// Payload bytes the guest sent to host sockets.
    pub tx_bytes: Counter,
    /// Packets delivered to the guest.
    pub rx_packets: Counter,
    /// Payload bytes delivered to the guest.
    pub rx_bytes: Counter,
    /// Guest packets dropped as malformed (bad chain, header, CID or length).
    pub bad_packets: Counter,
    /// Receive buffers the guest offered that the device could not use.
    pub bad_buffers: Counter,
    /// Connections a host program opened with `CONNECT <port>`.
    pub host_connects: Counter,
    /// Connections the guest opened to a host listener.
    pub guest_connects: Counter,
    /// Guest connections refused because no host program listens on the port.
    pub refused: Counter,
    /// Connections refused because the connection limit was reached.
    pub limit_refused: Counter,
    /// RST packets sent to the guest.
    pub resets_sent: Counter,
    /// Connections open now.
    pub connections: Counter,
    /// Control packets for the guest dropped because [`super::MAX_RX_BACKLOG`] were waiting.
    pub rx_dropped: Counter,
    /// Times the device stopped taking the guest's packets until it drained its receive queue.
    pub tx_paused: Counter,
    /// Connections reset because guest data for host sockets reached [`super::MAX_TX_BUFFERED`].
    pub tx_overflow_resets: Counter,
    /// Guest data buffered for host sockets now, in bytes.
    pub tx_buffered: Counter,
}

impl Counters for VsockMetrics {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::metrics::DeviceMetrics;

    #[test]
    fn vsock_metrics_serialise_as_json() {
        let m = VsockMetrics::default();
        m.refused.inc();
        let v = m.to_json();
        assert_eq!(v["refused"], 1);
    }
}
