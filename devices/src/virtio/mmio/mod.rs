//! The virtio-mmio transport (virtio 1.2, section 4.2), modern interface only (Version 2).
//!
//! [`MmioTransport`] is the register file a guest driver sees at one MMIO window: it negotiates
//! features, collects the queue layout and, when the driver sets DRIVER_OK, validates the queues
//! and hands them to the [`VirtioDevice`] through [`VirtioDevice::activate`]. Every register value
//! comes from the guest, so nothing here trusts it: odd sizes and offsets are ignored, state
//! changes out of order are ignored, and invalid queues make activation fail with
//! DEVICE_NEEDS_RESET instead of reaching the device.

use std::io;
use std::sync::{Arc, Mutex};

use log::debug;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateContext, InterruptKind, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

mod interrupt;
mod persist;
use crate::bus::{lock, BusDevice};
pub use interrupt::{MmioInterrupt, INT_CONFIG, INT_VRING};
pub use persist::{MmioState, PersistError, QueueSnapshot};

/// Size of the MMIO window of one device (registers + configuration space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, for KVM ioeventfds (datamatch = queue index).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Offset of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// "virt" in little endian.
const MMIO_MAGIC: u32 = 0x7472_6976;
/// Version 2 = virtio 1.x (modern) register layout.
const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("mvm\0").
const VENDOR_ID: u32 = 0x006d_766d;

/// VIRTIO_RING_F_EVENT_IDX: the transport turns on event-index suppression in the queues it
/// hands out when the driver accepted this feature.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Why a transport could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be created.
    #[error("creating an eventfd failed")]
    EventFd(#[source] io::Error),
    /// The device asked for a queue size virtio does not allow.
    #[error("device queue {index} has invalid maximum size {size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// The offending size.
        size: u16,
    },
}

/// Per-queue state the transport keeps next to the `Queue` itself.
#[derive(Debug)]
struct QueueSlot {
    queue: Queue,
    /// The driver wrote a size or an address the queue refused (kept for DRIVER_OK validation).
    rejected: bool,
}

/// A virtio device behind the virtio-mmio register interface.
#[derive(Debug)]
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    device_type: u32,
    avail_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueSlot>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<MmioInterrupt>,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// A transport for `device`, with one notification eventfd per device queue and one
    /// interrupt eventfd.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let (device_type, avail_features, max_sizes) = {
            let dev = lock(&device);
            (
                dev.device_type(),
                dev.avail_features() | (1u64 << VIRTIO_F_VERSION_1),
                dev.queue_max_sizes().to_vec(),
            )
        };
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for (index, &size) in max_sizes.iter().enumerate() {
            let queue = Queue::new(size).map_err(|_| MmioError::QueueSize { index, size })?;
            queues.push(QueueSlot {
                queue,
                rejected: false,
            });
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            device_type,
            avail_features,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            queue_evts,
            interrupt: Arc::new(MmioInterrupt::new().map_err(MmioError::EventFd)?),
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// One eventfd per queue, for KVM ioeventfds on `base + NOTIFY_REG_OFFSET` with
    /// datamatch = queue index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt eventfd, for a KVM irqfd on this device's interrupt line.
    pub fn irq_evt(&self) -> &EventFd {
        self.interrupt.evt()
    }

    /// The interrupt line (shared with the device once it is activated).
    pub fn interrupt(&self) -> Arc<MmioInterrupt> {
        self.interrupt.clone()
    }

    /// The device behind this transport.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// The virtio device type behind the transport.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The Status register value.
    pub fn device_status(&self) -> u32 {
        self.status
    }

    /// Tells the driver that the configuration space changed (e.g. a resized disk).
    pub fn notify_config_change(&mut self) -> io::Result<()> {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.trigger(InterruptKind::Config)
    }

    fn selected_queue(&mut self) -> Option<&mut QueueSlot> {
        let index = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(index)
    }

    fn has_status(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.has_status(status::FEATURES_OK)
            && !self.has_status(status::DRIVER_OK)
            && !self.has_status(status::FAILED)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i));
        match offset {
            0x00 => MMIO_MAGIC,
            0x04 => MMIO_VERSION,
            0x08 => self.device_type,
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_sel {
                0 => low_half(self.avail_features),
                1 => high_half(self.avail_features),
                _ => 0,
            },
            0x34 => queue.map_or(0, |q| u32::from(q.queue.max_size())),
            0x44 => queue.map_or(0, |q| u32::from(q.queue.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            // Shared memory regions: none. ShmLen reads as all ones ("no such region").
            0xb0 | 0xb4 => u32::MAX,
            0xfc => self.config_generation,
            _ => {
                debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            0x14 => self.device_features_sel = value,
            0x20 => self.write_driver_features(value),
            0x24 => self.driver_features_sel = value,
            0x30 => self.queue_sel = value,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                self.write_queue_reg(offset, value)
            }
            0x50 => self.notify_queue(value),
            0x64 => {
                self.interrupt.ack(value);
            }
            0x70 => self.write_status(value),
            _ => debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if !self.has_status(status::DRIVER) || self.has_status(status::FEATURES_OK) {
            crate::warn_limited!(
                "virtio-mmio: driver features written outside negotiation, ignored"
            );
            return;
        }
        let (shift, mask) = match self.driver_features_sel {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffff_0000_0000u64),
            _ => return,
        };
        let offered = u64::from(value) << shift & self.avail_features;
        self.acked_features = (self.acked_features & !mask) | offered;
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            crate::warn_limited!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x}, ignored",
                self.status
            );
            return;
        }
        let Some(slot) = self.selected_queue() else {
            return;
        };
        let q = &mut slot.queue;
        let ok = match offset {
            0x38 => u16::try_from(value)
                .ok()
                .is_some_and(|size| q.try_set_size(size).is_ok()),
            0x44 => {
                q.set_ready(value == 1);
                true
            }
            0x80 => set_low(q.desc_table(), value, |a| q.try_set_desc_table_address(a)),
            0x84 => set_high(q.desc_table(), value, |a| q.try_set_desc_table_address(a)),
            0x90 => set_low(q.avail_ring(), value, |a| q.try_set_avail_ring_address(a)),
            0x94 => set_high(q.avail_ring(), value, |a| q.try_set_avail_ring_address(a)),
            0xa0 => set_low(q.used_ring(), value, |a| q.try_set_used_ring_address(a)),
            0xa4 => set_high(q.used_ring(), value, |a| q.try_set_used_ring_address(a)),
            _ => true,
        };
        if !ok {
            crate::warn_limited!(
                "virtio-mmio: invalid value {value:#x} for queue register {offset:#x}"
            );
            slot.rejected = true;
        }
    }

    fn notify_queue(&self, value: u32) {
        // Normally KVM consumes this write through an ioeventfd; this path serves a VMM that did
        // not register one (or a guest that wrote a non-matching width).
        let evt = usize::try_from(value)
            .ok()
            .and_then(|i| self.queue_evts.get(i));
        match evt {
            Some(evt) if self.activated => {
                if let Err(e) = evt.write(1) {
                    crate::warn_limited!("virtio-mmio: signalling queue {value} failed: {e}");
                }
            }
            Some(_) => debug!("virtio-mmio: notify for queue {value} before DRIVER_OK, ignored"),
            None => crate::warn_limited!("virtio-mmio: notify for unknown queue {value}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if old & !value != 0 {
            crate::warn_limited!("virtio-mmio: status {old:#x} -> {value:#x} clears bits, ignored");
            return;
        }
        let added = value & !old;
        if added & status::FAILED != 0 {
            self.status |= status::FAILED;
        }
        if added & status::ACKNOWLEDGE != 0 {
            self.status |= status::ACKNOWLEDGE;
        }
        if added & status::DRIVER != 0 && self.has_status(status::ACKNOWLEDGE) {
            self.status |= status::DRIVER;
        }
        if added & status::FEATURES_OK != 0 && self.has_status(status::DRIVER) {
            if self.acked_features & (1u64 << VIRTIO_F_VERSION_1) != 0 {
                lock(&self.device).ack_features(self.acked_features);
                self.status |= status::FEATURES_OK;
            } else {
                // The driver reads FEATURES_OK back, sees it missing and gives up.
                crate::warn_limited!(
                    "virtio-mmio: driver did not accept VERSION_1 (legacy drivers unsupported)"
                );
            }
        }
        if added & status::DRIVER_OK != 0 && self.has_status(status::FEATURES_OK) {
            self.status |= status::DRIVER_OK;
            if let Err(e) = self.activate() {
                crate::warn_limited!(
                    "virtio-mmio: activating device type {} failed: {e}",
                    self.device_type
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                    crate::warn_limited!("virtio-mmio: raising the config interrupt failed: {e}");
                }
            }
        }
        if self.status != value {
            debug!(
                "virtio-mmio: status write {value:#x} accepted as {:#x}",
                self.status
            );
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        if self.has_status(status::FAILED) {
            return Err("the driver marked the device FAILED".into());
        }
        let ready = self.queues.iter().take_while(|s| s.queue.ready()).count();
        if self.queues[ready..].iter().any(|s| s.queue.ready()) {
            return Err("ready queues are not contiguous from queue 0".into());
        }
        let event_idx = self.acked_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(ready);
        let mut queue_evts = Vec::with_capacity(ready);
        for (index, slot) in self.queues[..ready].iter_mut().enumerate() {
            if slot.rejected || !slot.queue.is_valid(&self.mem) {
                return Err(format!("queue {index} is invalid"));
            }
            slot.queue.set_event_idx(event_idx);
            let queue = Queue::try_from(slot.queue.state())
                .map_err(|e| format!("copying queue {index}: {e}"))?;
            queues.push(queue);
            let evt = self.queue_evts[index]
                .try_clone()
                .map_err(|e| format!("cloning queue eventfd: {e}"))?;
            queue_evts.push(evt);
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
        };
        lock(&self.device)
            .activate(ctx)
            .map_err(|e| e.to_string())?;
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        let device_ok = lock(&self.device).reset();
        for slot in &mut self.queues {
            slot.queue.reset();
            slot.rejected = false;
        }
        for evt in &self.queue_evts {
            // Drop notifications that were pending for the old queues.
            let _ = evt.read();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
        self.activated = self.activated && !device_ok;
        self.status = if device_ok {
            0
        } else {
            crate::warn_limited!(
                "virtio-mmio: device type {} cannot be reset",
                self.device_type
            );
            status::DEVICE_NEEDS_RESET
        };
    }
}

fn low_half(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

fn high_half(v: u64) -> u32 {
    (v >> 32) as u32
}

fn set_low<E>(
    cur: u64,
    low: u32,
    set: impl FnOnce(vm_memory::GuestAddress) -> Result<(), E>,
) -> bool {
    set(vm_memory::GuestAddress(
        (cur & !0xffff_ffff) | u64::from(low),
    ))
    .is_ok()
}

fn set_high<E>(
    cur: u64,
    high: u32,
    set: impl FnOnce(vm_memory::GuestAddress) -> Result<(), E>,
) -> bool {
    set(vm_memory::GuestAddress(
        (cur & 0xffff_ffff) | (u64::from(high) << 32),
    ))
    .is_ok()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let Some(end) = offset.checked_add(data.len() as u64) else {
                data.fill(0);
                return;
            };
            if end > MMIO_WINDOW_SIZE || !matches!(data.len(), 1 | 2 | 4 | 8) {
                data.fill(0);
                return;
            }
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset % 4 == 0 => *word = self.read_reg(offset).to_le_bytes(),
            _ => {
                debug!(
                    "virtio-mmio: {}-byte read at {offset:#x} ignored",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let in_window = offset
                .checked_add(data.len() as u64)
                .is_some_and(|end| end <= MMIO_WINDOW_SIZE);
            if in_window && matches!(data.len(), 1 | 2 | 4 | 8) {
                lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => self.write_reg(offset, u32::from_le_bytes(word)),
            _ => debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use vm_memory::GuestAddress;

    #[derive(Debug, Default)]
    struct TestDevice {
        acked: u64,
        activations: Vec<(usize, bool)>,
        resets: usize,
        config: [u8; 8],
        refuse_activate: bool,
    }

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            0x42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | (1 << 5) | (1 << VIRTIO_RING_F_EVENT_IDX)
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                let at = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .saturating_add(i);
                *b = self.config.get(at).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if offset == 0 && data.len() == 1 {
                self.config[0] = data[0];
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.refuse_activate {
                return Err(ActivateError::QueueCount {
                    expected: 2,
                    got: ctx.queues.len(),
                });
            }
            let event_idx = ctx.queues.iter().all(|q| q.event_idx_enabled());
            assert_eq!(ctx.queues.len(), ctx.queue_evts.len());
            self.activations.push((ctx.queues.len(), event_idx));
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            self.acked = 0;
            true
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<TestDevice>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(TestDevice {
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            ..Default::default()
        }));
        let t = MmioTransport::new(mem, dev.clone()).unwrap();
        (t, dev)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the driver side of initialisation up to FEATURES_OK.
    fn negotiate(t: &mut MmioTransport, low: u32, high: u32) {
        wr(t, 0x70, status::ACKNOWLEDGE);
        wr(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, 0x24, 0);
        wr(t, 0x20, low);
        wr(t, 0x24, 1);
        wr(t, 0x20, high);
        wr(
            t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        wr(t, 0x30, index);
        wr(t, 0x38, size);
        wr(t, 0x80, u32::try_from(base).unwrap());
        wr(t, 0x84, 0);
        wr(t, 0x90, u32::try_from(base + 0x1000).unwrap());
        wr(t, 0x94, 0);
        wr(t, 0xa0, u32::try_from(base + 0x2000).unwrap());
        wr(t, 0xa4, 0);
        wr(t, 0x44, 1);
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers_read_as_virtio_mmio_v2() {
        let (mut t, _) = setup();
        assert_eq!(rd(&mut t, 0x00), 0x7472_6976);
        assert_eq!(rd(&mut t, 0x04), 2);
        assert_eq!(rd(&mut t, 0x08), 0x42);
        assert_eq!(rd(&mut t, 0x0c), VENDOR_ID);
        wr(&mut t, 0x14, 0);
        assert_eq!(rd(&mut t, 0x10), (1 << 5) | (1 << VIRTIO_RING_F_EVENT_IDX));
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1);
        wr(&mut t, 0x14, 7);
        assert_eq!(rd(&mut t, 0x10), 0);
        wr(&mut t, 0x30, 1);
        assert_eq!(rd(&mut t, 0x34), 8);
        wr(&mut t, 0x30, 9);
        assert_eq!(rd(&mut t, 0x34), 0);
    }

    #[test]
    fn odd_sized_or_misaligned_accesses_are_ignored() {
        let (mut t, _) = setup();
        let mut b2 = [0xffu8; 2];
        t.read(0x00, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b4 = [0xffu8; 4];
        t.read(0x02, &mut b4);
        assert_eq!(b4, [0; 4]);
        let mut b8 = [0xffu8; 8];
        t.read(0x00, &mut b8);
        assert_eq!(b8, [0; 8]);
        let mut empty = [0u8; 0];
        t.read(0x00, &mut empty);
        t.write(0x70, &[1]);
        t.write(0x71, &[1, 0, 0, 0]);
        t.write(0x70, &[]);
        assert_eq!(rd(&mut t, 0x70), 0);
        // Past the window and at the very end of the address space.
        let mut b = [0xffu8; 4];
        t.read(u64::MAX - 1, &mut b);
        assert_eq!(b, [0; 4]);
        t.write(u64::MAX - 1, &[1, 2, 3, 4]);
        t.read(MMIO_WINDOW_SIZE - 2, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn config_space_reads_any_width_and_writes_reach_device() {
        let (mut t, dev) = setup();
        let mut b = [0u8; 2];
        t.read(0x102, &mut b);
        assert_eq!(b, [3, 4]);
        let mut b8 = [0u8; 8];
        t.read(0x100, &mut b8);
        assert_eq!(b8, [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut b3 = [9u8; 3];
        t.read(0x100, &mut b3);
        assert_eq!(b3, [0; 3]);
        t.write(0x100, &[0xaa]);
        assert_eq!(dev.lock().unwrap().config[0], 0xaa);
    }

    #[test]
    fn full_init_activates_with_ready_queues_and_event_idx() {
        let (mut t, dev) = setup();
        negotiate(
            &mut t,
            1 << VIRTIO_RING_F_EVENT_IDX | 1 << 5 | 1 << 3,
            1 | 1 << 4,
        );
        assert_eq!(rd(&mut t, 0x70) & status::FEATURES_OK, status::FEATURES_OK);
        // Bit 3 and high bit 4 were not offered: masked away.
        assert_eq!(
            dev.lock().unwrap().acked,
            (1 << VIRTIO_F_VERSION_1) | (1 << 5) | (1 << VIRTIO_RING_F_EVENT_IDX)
        );
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x2_0000);
        assert_eq!(rd(&mut t, 0x44), 1);
        wr(&mut t, 0x70, ALL_OK);
        assert_eq!(rd(&mut t, 0x70), ALL_OK);
        assert_eq!(dev.lock().unwrap().activations, vec![(2, true)]);

        // QueueNotify by MMIO write signals the queue eventfd.
        wr(&mut t, 0x50, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        wr(&mut t, 0x50, 5);

        // Interrupts: status bits set by the device side, cleared by InterruptACK.
        t.interrupt().trigger(InterruptKind::Queue).unwrap();
        t.interrupt().trigger(InterruptKind::Config).unwrap();
        assert_eq!(t.irq_evt().read().unwrap(), 2);
        assert_eq!(rd(&mut t, 0x60), INT_VRING | INT_CONFIG);
        wr(&mut t, 0x64, INT_VRING);
        assert_eq!(rd(&mut t, 0x60), INT_CONFIG);

        // Queue registers are frozen after DRIVER_OK.
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x44, 0);
        assert_eq!(rd(&mut t, 0x44), 1);

        // Reset clears everything and tells the device.
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(rd(&mut t, 0x60), 0);
        assert_eq!(rd(&mut t, 0x44), 0);
        assert!(dev.lock().unwrap().resets >= 1);
        assert_eq!(dev.lock().unwrap().acked, 0);
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let (mut t, dev) = setup();
        negotiate(&mut t, 1 << 5, 0);
        assert_eq!(rd(&mut t, 0x70), status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, 0x70, ALL_OK);
        assert_eq!(rd(&mut t, 0x70) & status::DRIVER_OK, 0);
        assert!(dev.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn out_of_order_status_writes_are_ignored() {
        let (mut t, dev) = setup();
        // DRIVER without ACKNOWLEDGE, FEATURES_OK without DRIVER, DRIVER_OK without FEATURES_OK.
        wr(&mut t, 0x70, status::DRIVER);
        assert_eq!(rd(&mut t, 0x70), 0);
        wr(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(rd(&mut t, 0x70), status::ACKNOWLEDGE);
        // Features written before DRIVER are ignored.
        wr(&mut t, 0x20, 1 << 5);
        negotiate(&mut t, 0, 1);
        assert_eq!(dev.lock().unwrap().acked, 1 << VIRTIO_F_VERSION_1);
        // Clearing bits without a full reset is ignored.
        wr(&mut t, 0x70, status::ACKNOWLEDGE);
        assert_eq!(
            rd(&mut t, 0x70),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
        // Features are frozen after FEATURES_OK.
        wr(&mut t, 0x24, 0);
        wr(&mut t, 0x20, 1 << 5);
        assert_eq!(dev.lock().unwrap().acked, 1 << VIRTIO_F_VERSION_1);
    }

    #[test]
    fn invalid_queues_set_needs_reset_and_raise_config_interrupt() {
        type Configure = fn(&mut MmioTransport);
        let cases: [(&str, Configure); 5] = [
            ("size not a power of two", |t| {
                setup_queue(t, 0, 16, 0x1_0000);
                wr(t, 0x38, 12);
            }),
            ("size above max", |t| setup_queue(t, 0, 32, 0x1_0000)),
            ("ring outside guest memory", |t| {
                setup_queue(t, 0, 16, 0x1_0000);
                wr(t, 0xa4, 0x10);
            }),
            ("misaligned descriptor table", |t| {
                setup_queue(t, 0, 16, 0x1_0000);
                wr(t, 0x80, 0x1_0004);
            }),
            ("gap in ready queues", |t| setup_queue(t, 1, 8, 0x1_0000)),
        ];
        for (name, configure) in cases {
            let (mut t, dev) = setup();
            negotiate(&mut t, 0, 1);
            configure(&mut t);
            wr(&mut t, 0x70, ALL_OK);
            assert_eq!(
                rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET,
                status::DEVICE_NEEDS_RESET,
                "{name}"
            );
            assert_eq!(rd(&mut t, 0x60), INT_CONFIG, "{name}");
            assert!(dev.lock().unwrap().activations.is_empty(), "{name}");
            // A reset recovers the device.
            wr(&mut t, 0x70, 0);
            assert_eq!(rd(&mut t, 0x70), 0, "{name}");
        }
    }

    #[test]
    fn device_refusing_activation_sets_needs_reset() {
        let (mut t, dev) = setup();
        dev.lock().unwrap().refuse_activate = true;
        negotiate(&mut t, 0, 1);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        wr(&mut t, 0x70, ALL_OK);
        assert_eq!(
            rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET,
            status::DEVICE_NEEDS_RESET
        );
        // Notifications of a device that never started are dropped.
        wr(&mut t, 0x50, 0);
        assert!(t.queue_evts()[0].read().is_err());
    }

    #[test]
    fn queue_registers_ignored_before_features_ok() {
        let (mut t, _) = setup();
        setup_queue(&mut t, 0, 16, 0x1_0000);
        assert_eq!(rd(&mut t, 0x44), 0);
    }
}
