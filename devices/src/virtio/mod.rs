//! Virtio devices over the MMIO transport (virtio 1.x, modern only).
//!
//! A device implements [`VirtioDevice`]; the transport (`mmio.rs`) owns the register file,
//! feature negotiation, queue setup and the interrupt status, and hands the device its queues
//! when the driver sets DRIVER_OK. The VMM wires each transport's queue eventfds to KVM
//! ioeventfds on the QueueNotify register and its interrupt eventfd to a KVM irqfd.
//!
//! Every device follows the same shape: one folder with `mod.rs` (errors, constants),
//! `device.rs` (the [`VirtioDevice`] impl), queue processing as plain functions over `&mut Queue`
//! and guest memory (built on [`chains`]: pop, complete, interrupt), `event_handler.rs` (an
//! [`glue::EventDevice`] impl, whose docs describe the activation handshake) and `metrics.rs` (a
//! serde struct of [`metrics::Counter`]s behind [`metrics::DeviceMetrics`]). Unit tests drive the
//! queue functions through `virtio_queue::mock::MockSplitQueue`; `test_utils.rs` and `testing.rs`
//! build hostile chains and play the guest driver.

use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub mod block;
pub mod chains;
pub mod glue;
pub mod metrics;
pub mod mmio;
pub mod net;
pub mod rate_limiter;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;
#[cfg(test)]
pub(crate) mod testing;
pub mod vsock;

/// Feature bit every modern device offers: VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device type ids (virtio 1.2, section 5).
pub mod device_type {
    /// virtio-net.
    pub const NET: u32 = 1;
    /// virtio-blk.
    pub const BLOCK: u32 = 2;
    /// virtio-rng (entropy).
    pub const RNG: u32 = 4;
    /// virtio-vsock.
    pub const VSOCK: u32 = 19;
}

/// Why an interrupt is raised (the bits of the MMIO InterruptStatus register).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// A queue's used ring was updated.
    Queue,
    /// The configuration space changed.
    Config,
}

/// How a device tells the guest that something happened.
pub trait VirtioInterrupt: Send + Sync + std::fmt::Debug {
    /// Sets the matching InterruptStatus bit and injects the interrupt.
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
}

/// Everything a device needs to start serving its queues.
#[derive(Debug)]
pub struct ActivateContext {
    /// Guest memory (cheap to clone; regions are shared).
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them, in queue index order.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver notifies that queue.
    pub queue_evts: Vec<EventFd>,
    /// Interrupt line of this device.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a number of queues the device cannot work with.
    #[error("expected {expected} queues, driver set up {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues the driver made ready.
        got: usize,
    },
    /// Setting up the device's backend or event handling failed.
    #[error("activating the device failed")]
    Io(#[source] io::Error),
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The virtio device type id ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (already masked by `avail_features`).
    fn ack_features(&mut self, features: u64);
    /// Reads the device-specific configuration space; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space; writes outside writable fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues. Called once per driver initialisation, on DRIVER_OK.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// The driver reset the device: stop using the queues and forget negotiated state.
    /// Returns false if the device cannot be reset (the transport then sets NEEDS_RESET).
    fn reset(&mut self) -> bool;
    /// The queues as the device serves them now (their positions move as it does), in queue
    /// index order, for a snapshot; `None` while not active, or for a device that cannot be
    /// saved while active.
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        None
    }
    /// The device was activated again from a snapshot (its queues at their saved positions):
    /// tell the driver what it must know (vsock: every connection is gone). Runs after the
    /// VM's interrupt controllers are restored, so an interrupt raised here reaches the guest.
    fn restored(&mut self) {}
}
