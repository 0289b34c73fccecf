//! The interrupt line of a virtio-mmio transport: the InterruptStatus register and the eventfd
//! that the VMM connects to a KVM irqfd.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::{InterruptKind, VirtioInterrupt};

/// InterruptStatus bit for a used-ring update.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit for a configuration change.
pub const INT_CONFIG: u32 = 2;

/// The interrupt line of one transport: InterruptStatus bits plus the eventfd behind the KVM irqfd.
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl MmioInterrupt {
    pub(super) fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd behind the KVM irqfd.
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }

    /// InterruptACK: clears the acknowledged bits.
    pub(super) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Device reset: no interrupt pending.
    pub(super) fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Restore: the saved InterruptStatus, without raising the interrupt again (the interrupt
    /// controllers' own state says whether it is pending).
    pub(super) fn restore(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// The InterruptStatus register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let bit = match kind {
            InterruptKind::Queue => INT_VRING,
            InterruptKind::Config => INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_sets_bits_and_signals_ack_clears() {
        let irq = MmioInterrupt::new().unwrap();
        irq.trigger(InterruptKind::Queue).unwrap();
        irq.trigger(InterruptKind::Config).unwrap();
        assert_eq!(irq.evt().read().unwrap(), 2);
        assert_eq!(irq.status(), INT_VRING | INT_CONFIG);
        irq.ack(INT_VRING);
        assert_eq!(irq.status(), INT_CONFIG);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }
}
