//! The device manager: the port I/O and MMIO buses, the legacy devices (COM1 serial, i8042),
//! and the attachment point for virtio-mmio devices built by other modules.
//!
//! A virtio device is handed over as a [`VirtioMmioDevice`]; [`DeviceManager::attach_virtio_mmio`]
//! gives it a 4 KiB MMIO slot from 0xd000_0000 and an IRQ from 5 upward, wires its queue eventfds
//! to KVM ioeventfds on QueueNotify (base + 0x50, datamatch = queue index) and its interrupt
//! eventfd to a KVM irqfd, registers its event subscriber, and tells the guest kernel where it is
//! (`virtio_mmio.device=4K@0x<base>:<irq>` on the command line).

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::legacy::{
    I8042Device, I8042State, SerialDevice, SerialSnapshot, I8042_PORT_BASE, I8042_PORT_LEN,
    SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN,
};
use devices::virtio::mmio::{MmioState, MmioTransport, PersistError};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::exit::ExitState;
use crate::memory::{VIRTIO_MMIO_END, VIRTIO_MMIO_SLOT, VIRTIO_MMIO_START};
use crate::mptable::IOAPIC_PINS;

/// Offset of the QueueNotify register in a virtio-mmio slot.
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;
/// First IRQ handed to virtio devices (0-4 belong to the timer, PIC cascade, COMs).
pub const FIRST_VIRTIO_IRQ: u32 = 5;

/// Something the event loop drives.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The event loop's manager type.
pub type VmEventManager = EventManager<Subscriber>;

/// A virtio-mmio device ready to be attached.
pub struct VirtioMmioDevice {
    /// The MMIO transport (register file) of the device.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// One eventfd per queue, signalled by KVM when the driver writes the queue's index to
    /// QueueNotify (the device keeps its own clones of these).
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt: written by the device, injected by KVM as an irqfd.
    pub irq_evt: EventFd,
    /// The device's event handling (queue eventfds, backend fds), run by the VMM's event loop.
    pub subscriber: Subscriber,
}

impl std::fmt::Debug for VirtioMmioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmioDevice")
            .field("queues", &self.queue_evts.len())
            .finish_non_exhaustive()
    }
}

/// Why a device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// The virtio-mmio window or the IOAPIC pins are used up.
    #[error("no free MMIO slot or IRQ left for another virtio device")]
    OutOfResources,
    /// The device's range collides with another one.
    #[error("cannot place a device on the bus")]
    Bus(#[source] BusError),
    /// Registering an eventfd with KVM failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The kernel command line has no room for the device.
    #[error("kernel command line too long to add the device")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The snapshot's devices are not the devices of this VM.
    #[error("the snapshot's devices do not match this VM's: {0}")]
    Layout(String),
    /// A device could not be saved or restored.
    #[error("virtio device at {0:#x}")]
    Persist(u64, #[source] PersistError),
    /// The serial console could not be restored.
    #[error("cannot restore the serial console")]
    Serial(#[source] std::io::Error),
}

/// One attached virtio-mmio device.
#[derive(Debug, Clone)]
pub struct VirtioSlot {
    /// MMIO base address.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
    /// The transport, with its device behind it.
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The devices of a VM that a snapshot saves (cheap to clone: shared handles).
#[derive(Debug, Clone)]
pub struct DeviceHandles {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The i8042.
    pub i8042: Arc<Mutex<I8042Device>>,
    /// The virtio devices, in attachment order.
    pub virtio: Vec<VirtioSlot>,
}

/// One virtio device as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioSlotState {
    /// MMIO base address.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
    /// Transport and device.
    pub transport: MmioState,
}

/// Every device of a VM, as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialSnapshot,
    /// The i8042.
    pub i8042: I8042State,
    /// The virtio devices, in attachment order.
    pub virtio: Vec<VirtioSlotState>,
}

impl DeviceHandles {
    /// Saves every device; the vCPUs and the event loop must not drive them meanwhile.
    pub fn save(&self) -> Result<DevicesState, DeviceManagerError> {
        let virtio = self
            .virtio
            .iter()
            .map(|slot| {
                Ok(VirtioSlotState {
                    base: slot.base,
                    irq: slot.irq,
                    transport: devices::bus::lock(&slot.transport)
                        .save_state()
                        .map_err(|e| DeviceManagerError::Persist(slot.base, e))?,
                })
            })
            .collect::<Result<Vec<_>, DeviceManagerError>>()?;
        Ok(DevicesState {
            serial: devices::bus::lock(&self.serial).state(),
            i8042: devices::bus::lock(&self.i8042).state(),
            virtio,
        })
    }

    /// Checks that `state` was saved from a VM with this device layout (same kinds of device at
    /// the same addresses and lines), before anything is restored.
    pub fn check_layout(&self, state: &DevicesState) -> Result<(), DeviceManagerError> {
        let now: Vec<(u64, u32, u32)> = self
            .virtio
            .iter()
            .map(|s| {
                let t = devices::bus::lock(&s.transport);
                (s.base, s.irq, t.device_type())
            })
            .collect();
        let saved: Vec<(u64, u32, u32)> = state
            .virtio
            .iter()
            .map(|s| (s.base, s.irq, s.transport.device_type))
            .collect();
        if now != saved {
            return Err(DeviceManagerError::Layout(format!(
                "saved {} (base, irq, type) {saved:x?}, now {now:x?}",
                saved.len()
            )));
        }
        Ok(())
    }

    /// Restores every device (after [`DeviceHandles::check_layout`], and after the VM's
    /// interrupt controllers: devices may raise interrupts here).
    pub fn restore(&self, state: &DevicesState) -> Result<(), DeviceManagerError> {
        self.check_layout(state)?;
        devices::bus::lock(&self.i8042).restore(&state.i8042);
        devices::bus::lock(&self.serial)
            .restore(&state.serial)
            .map_err(DeviceManagerError::Serial)?;
        for (slot, saved) in self.virtio.iter().zip(&state.virtio) {
            devices::bus::lock(&slot.transport)
                .restore_state(&saved.transport)
                .map_err(|e| DeviceManagerError::Persist(slot.base, e))?;
        }
        Ok(())
    }
}

/// Buses, devices and the event manager of one VM.
pub struct DeviceManager {
    vm: Arc<VmFd>,
    pio: Bus,
    mmio: Bus,
    next_mmio: u64,
    next_irq: u32,
    cmdline: Cmdline,
    event_manager: VmEventManager,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042Device>>,
    virtio: Vec<VirtioSlot>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .field("virtio", &self.virtio.len())
            .finish_non_exhaustive()
    }
}

impl DeviceManager {
    /// Sets up the buses with COM1 (output to `serial_out`) and the i8042 (a reset ends the VM
    /// through `exit`). `cmdline` is the guest command line devices append to.
    pub fn new(
        vm: Arc<VmFd>,
        cmdline: Cmdline,
        serial_out: devices::legacy::serial::SerialOutput,
        exit: Arc<ExitState>,
    ) -> Result<Self, DeviceManagerError> {
        let event_manager = VmEventManager::new()
            .map_err(|e| DeviceManagerError::EventFd(std::io::Error::other(format!("{e:?}"))))?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| DeviceManagerError::Kvm("IRQFD", e))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, serial_out)));
        let i8042 = Arc::new(Mutex::new(I8042Device::new(Box::new(move || {
            exit.request_reset()
        }))));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)
            .map_err(DeviceManagerError::Bus)?;
        pio.insert(i8042.clone(), I8042_PORT_BASE, I8042_PORT_LEN)
            .map_err(DeviceManagerError::Bus)?;
        Ok(Self {
            vm,
            pio,
            mmio: Bus::new(),
            next_mmio: VIRTIO_MMIO_START,
            next_irq: FIRST_VIRTIO_IRQ,
            cmdline,
            event_manager,
            serial,
            i8042,
            virtio: Vec::new(),
        })
    }

    /// Attaches a virtio-mmio device; returns its MMIO base address and IRQ (GSI).
    pub fn attach_virtio_mmio(
        &mut self,
        dev: VirtioMmioDevice,
    ) -> Result<(u64, u32), DeviceManagerError> {
        let base = self.next_mmio;
        let irq = self.next_irq;
        if base + VIRTIO_MMIO_SLOT > VIRTIO_MMIO_END || irq >= u32::from(IOAPIC_PINS) {
            return Err(DeviceManagerError::OutOfResources);
        }
        // Check the command line first: it is the only step that cannot be undone below.
        let mut cmdline = self.cmdline.clone();
        cmdline
            .add_virtio_mmio_device(VIRTIO_MMIO_SLOT, GuestAddress(base), irq, None)
            .map_err(DeviceManagerError::Cmdline)?;
        let notify = IoEventAddress::Mmio(base + VIRTIO_MMIO_QUEUE_NOTIFY);
        for (index, evt) in dev.queue_evts.iter().enumerate() {
            let index = u32::try_from(index).map_err(|_| DeviceManagerError::OutOfResources)?;
            self.vm
                .register_ioevent(evt, &notify, index)
                .map_err(|e| DeviceManagerError::Kvm("IOEVENTFD", e))?;
        }
        self.vm
            .register_irqfd(&dev.irq_evt, irq)
            .map_err(|e| DeviceManagerError::Kvm("IRQFD", e))?;
        self.mmio
            .insert(dev.transport.clone(), base, VIRTIO_MMIO_SLOT)
            .map_err(DeviceManagerError::Bus)?;
        self.event_manager.add_subscriber(dev.subscriber);
        self.cmdline = cmdline;
        self.next_mmio += VIRTIO_MMIO_SLOT;
        self.next_irq += 1;
        self.virtio.push(VirtioSlot {
            base,
            irq,
            transport: dev.transport,
        });
        log::debug!("virtio-mmio device at {base:#x}, irq {irq}");
        Ok((base, irq))
    }

    /// Adds an event subscriber that is not a virtio device (stdin, control sockets, timers).
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.event_manager.add_subscriber(subscriber);
    }

    /// The serial console (to feed it input).
    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    /// The guest command line, with the devices attached so far.
    pub fn cmdline(&self) -> &Cmdline {
        &self.cmdline
    }

    /// The (base, irq) of every virtio device attached so far.
    pub fn virtio_devices(&self) -> Vec<(u64, u32)> {
        self.virtio.iter().map(|s| (s.base, s.irq)).collect()
    }

    /// Handles on the devices a snapshot saves and restores.
    pub fn handles(&self) -> DeviceHandles {
        DeviceHandles {
            serial: self.serial.clone(),
            i8042: self.i8042.clone(),
            virtio: self.virtio.clone(),
        }
    }

    /// Hands the buses, command line and event manager over to the running VM.
    pub fn into_parts(self) -> (Bus, Bus, Cmdline, VmEventManager) {
        (self.pio, self.mmio, self.cmdline, self.event_manager)
    }

    /// Mutable access to the event manager (to add subscribers before the VM starts).
    pub fn event_manager(&mut self) -> &mut VmEventManager {
        &mut self.event_manager
    }
}
