//! Counters of one rng device, readable at any time as JSON.

use serde::Serialize;

use crate::virtio::chains::QueueMetrics;
use crate::virtio::metrics::{counters_json, Counter, DeviceMetrics};

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

impl DeviceMetrics for RngMetrics {
    fn to_json(&self) -> serde_json::Value {
        counters_json(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_every_counter_as_json() {
        let m = RngMetrics::default();
        m.bytes.add(64);
        let json = m.to_json();
        assert_eq!(json["bytes"], 64);
        assert_eq!(json.as_object().map(|o| o.len()), Some(8));
    }
}
