//! The VM-wide KVM state: the in-kernel PIC pair and IOAPIC, the PIT, and the kvmclock.
//!
//! Restored after the vCPUs (as Firecracker does): the PIT, then the clock, then the
//! interrupt controllers. The clock is put back where it stood when the VM was saved, so the
//! guest's monotonic time goes on from there and no timer of it fires all at once; the guest's
//! wall clock is then stepped by the guest itself (mvm's agent does it when it learns it was
//! restored).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::cpu::CpuStateError;

/// KVM_CLOCK_TSC_STABLE: a flag KVM_GET_CLOCK reports and KVM_SET_CLOCK does not take.
const KVM_CLOCK_FLAGS_SETTABLE: u32 = 0;

/// The in-kernel devices and clock of one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

fn chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, CpuStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(|e| CpuStateError::Kvm("GET_IRQCHIP", e))?;
    Ok(chip)
}

impl VmState {
    /// Saves the VM's state; its vCPUs must be parked.
    pub fn save(fd: &VmFd) -> Result<Self, CpuStateError> {
        Ok(Self {
            pic_master: chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: fd
                .get_pit2()
                .map_err(|e| CpuStateError::Kvm("GET_PIT2", e))?,
            clock: fd
                .get_clock()
                .map_err(|e| CpuStateError::Kvm("GET_CLOCK", e))?,
        })
    }

    /// Puts the state back into a VM with an irqchip and a PIT, after its vCPUs' state.
    pub fn restore(&self, fd: &VmFd) -> Result<(), CpuStateError> {
        fd.set_pit2(&self.pit)
            .map_err(|e| CpuStateError::Kvm("SET_PIT2", e))?;
        let clock = kvm_clock_data {
            flags: KVM_CLOCK_FLAGS_SETTABLE,
            ..self.clock
        };
        fd.set_clock(&clock)
            .map_err(|e| CpuStateError::Kvm("SET_CLOCK", e))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip)
                .map_err(|e| CpuStateError::Kvm("SET_IRQCHIP", e))?;
        }
        Ok(())
    }
}
