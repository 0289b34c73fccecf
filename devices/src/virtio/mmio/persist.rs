//! Saving a virtio-mmio transport with its device, and restoring it into a transport built
//! afresh for the same kind of device (whose backend may be another file, socket or tap).
//!
//! The transport keeps what the driver wrote (status, features, queue layout); the device keeps
//! where it stands in each queue. Restoring replays the driver's side: the accepted features
//! reach the device through `ack_features`, and an active device is activated again with its
//! queues at their saved positions, then told it was restored ([`VirtioDevice::restored`]).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{status, MmioTransport};
use crate::bus::lock;
use crate::virtio::{ActivateContext, VirtioInterrupt};

/// One queue: its layout and positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in use.
    pub event_idx: bool,
    /// Size the driver chose.
    pub size: u16,
    /// The driver set QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A transport and its device, as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmioState {
    /// The device type (a restore refuses another kind).
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// The Status register.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Each queue as the driver configured it, with whether a value was refused.
    pub queues: Vec<(QueueSnapshot, bool)>,
    /// The device's own queues while it is active.
    pub active_queues: Option<Vec<QueueSnapshot>>,
    /// The device's configuration space as the driver last could read it.
    pub config: Vec<u8>,
}

/// Bytes of configuration space compared across a restore (every device of mvm has less).
const CONFIG_BYTES: usize = 256;

/// The configuration space of `device`, as a driver reads it.
fn config_space(device: &dyn crate::virtio::VirtioDevice) -> Vec<u8> {
    let mut out = vec![0u8; CONFIG_BYTES];
    for (i, word) in out.chunks_mut(4).enumerate() {
        device.read_config(i as u64 * 4, word);
    }
    out
}

/// Why a transport could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The device cannot report its queues while active.
    #[error("virtio device type {0} cannot be saved while active")]
    NotSaveable(u32),
    /// The saved device is of another kind, has other queues, or the driver accepted features
    /// this one does not offer.
    #[error("saved virtio device type {saved} with {saved_queues} queues does not fit device type {now} with {now_queues} (or its features)")]
    Mismatch {
        /// Saved type.
        saved: u32,
        /// Saved queue count.
        saved_queues: usize,
        /// Type now.
        now: u32,
        /// Queue count now.
        now_queues: usize,
    },
    /// A saved queue is not valid.
    #[error("saved queue {0} is invalid")]
    Queue(usize, #[source] virtio_queue::Error),
    /// Activating the device again failed.
    #[error("activating virtio device type {0} again failed: {1}")]
    Activate(u32, String),
}

impl MmioTransport {
    /// The transport's and its device's state. The device must not be serving its queues at
    /// the same time (the VM's vCPUs and event loop are paused).
    pub fn save_state(&self) -> Result<MmioState, PersistError> {
        let active_queues = if self.activated {
            let queues = lock(&self.device)
                .queue_states()
                .ok_or(PersistError::NotSaveable(self.device_type))?;
            Some(queues.into_iter().map(QueueSnapshot::from).collect())
        } else {
            None
        };
        Ok(MmioState {
            device_type: self.device_type,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self
                .queues
                .iter()
                .map(|s| (s.queue.state().into(), s.rejected))
                .collect(),
            active_queues,
            config: config_space(&*lock(&self.device)),
        })
    }

    /// Restores a saved state into this freshly built transport (nothing negotiated yet), for a
    /// VM whose memory and interrupt controllers are already restored.
    pub fn restore_state(&mut self, state: &MmioState) -> Result<(), PersistError> {
        let (now, now_queues) = (self.device_type, self.queues.len());
        let mismatch = || PersistError::Mismatch {
            saved: state.device_type,
            saved_queues: state.queues.len(),
            now,
            now_queues,
        };
        // A feature the driver relies on that this device does not offer (a read-only disk
        // where the saved one was writable, say) cannot be taken back from the driver.
        if state.device_type != self.device_type
            || state.queues.len() != self.queues.len()
            || state.acked_features & !self.avail_features != 0
        {
            return Err(mismatch());
        }
        for (index, (slot, (saved, rejected))) in
            self.queues.iter_mut().zip(&state.queues).enumerate()
        {
            if saved.max_size != slot.queue.max_size() {
                return Err(mismatch());
            }
            slot.queue = Queue::try_from(QueueState::from(*saved))
                .map_err(|e| PersistError::Queue(index, e))?;
            slot.rejected = *rejected;
        }
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features & self.avail_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.config_generation = state.config_generation;
        if self.status & status::FEATURES_OK != 0 {
            lock(&self.device).ack_features(self.acked_features);
        }
        if let Some(active) = &state.active_queues {
            self.reactivate(active)?;
        }
        self.interrupt.restore(state.interrupt_status);
        if self.activated {
            lock(&self.device).restored();
        }
        // The device behind the transport may be another one of the same kind (a disk whose
        // size differs, a new MAC or CID): tell the driver its configuration changed.
        if self.status & status::DRIVER_OK != 0
            && config_space(&*lock(&self.device)) != state.config
        {
            if let Err(e) = self.notify_config_change() {
                crate::warn_limited!("virtio-mmio: raising the config interrupt failed: {e}");
            }
        }
        Ok(())
    }

    fn reactivate(&mut self, active: &[QueueSnapshot]) -> Result<(), PersistError> {
        let failed = |e: String| PersistError::Activate(self.device_type, e);
        let mut queues = Vec::with_capacity(active.len());
        let mut queue_evts = Vec::with_capacity(active.len());
        for (index, saved) in active.iter().enumerate() {
            let queue = Queue::try_from(QueueState::from(*saved))
                .map_err(|e| PersistError::Queue(index, e))?;
            if !queue.is_valid(&self.mem) {
                return Err(failed(format!("queue {index} is outside guest memory")));
            }
            queues.push(queue);
            let evt = self
                .queue_evts
                .get(index)
                .ok_or_else(|| failed(format!("no queue {index}")))?
                .try_clone()
                .map_err(|e| failed(e.to_string()))?;
            queue_evts.push(evt);
        }
        let interrupt: std::sync::Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt,
        };
        lock(&self.device)
            .activate(ctx)
            .map_err(|e| failed(e.to_string()))?;
        self.activated = true;
        Ok(())
    }
}
