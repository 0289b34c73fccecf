//! The one shape every device's metrics take: a serde struct of [`Counter`]s, shared as
//! `Arc<XMetrics>` between the device and readers, marked [`Counters`] and so read as JSON
//! through [`DeviceMetrics`].

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A monotonic (or, for gauges, up-and-down) count; serialises as a plain JSON number.
#[derive(Debug, Default, Serialize)]
#[serde(transparent)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Sets the value (for gauges).
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters of one device, readable at any time (by the VMM's `--metrics` writer).
pub trait DeviceMetrics: Send + Sync + std::fmt::Debug {
    /// Every counter as one JSON object, keyed by field name.
    fn to_json(&self) -> serde_json::Value;
}

/// Marks a serde struct of [`Counter`]s as a device's metrics; it then is a [`DeviceMetrics`].
pub trait Counters: Serialize + Send + Sync + std::fmt::Debug {}

impl<T: Counters> DeviceMetrics for T {
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize)]
    struct Two {
        a: Counter,
        b: Counter,
    }

    impl Counters for Two {}

    #[test]
    fn counters_serialise_as_numbers_under_their_field_names() {
        let m = Two::default();
        m.a.add(40);
        m.a.inc();
        m.a.inc();
        assert_eq!(m.to_json(), serde_json::json!({"a": 42, "b": 0}));
        m.b.set(7);
        assert_eq!(m.b.get(), 7);
    }
}
