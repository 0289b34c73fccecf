//! Counters of one rng device, readable at any time as JSON.

use serde::Serialize;

use crate::virtio::chains::QueueMetrics;
use crate::virtio::metrics::{Counter, Counters};

/// What one rng device did since it was created.
#[derive(Debug, Default, Serialize)]
pub struct RngMetrics {
    /// Activation and queue counters, flattened into this object (`activations`,
    /// `queue_events`, `queue_errors`, `interrupts`).
    #[serde(flatten)]
    pub queue: QueueMetrics,
    /// Requests answered with entropy.
    pub requests: Counter,
    /// Random bytes written into guest memory.
    pub bytes: Counter,
    /// Chains with buffers outside guest memory (returned with length 0).
    pub invalid_chains: Counter,
    /// getrandom failures (request returned with length 0).
    pub entropy_errors: Counter,
}

impl Counters for RngMetrics {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::metrics::DeviceMetrics;

    #[test]
    fn serialises_every_counter_as_one_flat_object() {
        let m = RngMetrics::default();
        m.bytes.add(64);
        m.queue.activations.inc();
        let json = m.to_json();
        assert_eq!(
            (&json["bytes"], &json["activations"]),
            (&64.into(), &1.into())
        );
        assert_eq!(json.as_object().map(|o| o.len()), Some(8));
    }
}
