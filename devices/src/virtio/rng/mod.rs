//! virtio-rng (virtio 1.2, section 5.4): the guest's entropy source, fed from the host kernel's
//! `getrandom(2)`.
//!
//! `device.rs` fills request buffers and implements [`VirtioDevice`](super::VirtioDevice),
//! `event_handler.rs` connects it to the event loop, `metrics.rs` counts what happened.

use std::io;

pub mod device;
pub mod event_handler;
pub mod metrics;

pub use device::Rng;
pub use metrics::RngMetrics;

/// Prefix of the device's log lines.
pub const NAME: &str = "virtio-rng";
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request, however large the guest's buffers.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Why an rng device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The activation eventfd could not be created.
    #[error("creating the rng device eventfd failed")]
    EventFd(#[source] io::Error),
}
