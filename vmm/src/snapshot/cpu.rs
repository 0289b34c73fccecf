//! One vCPU's KVM state: what is saved while it is parked outside KVM_RUN, and the order it is
//! put back in.
//!
//! Saved (in this order, as KVM's own advice and Firecracker's experience have it): MP state
//! first (KVM_GET_MP_STATE may accept pending APIC events), general and special registers,
//! XSAVE (the FPU and SSE state with it), XCRs, debug registers, the LAPIC, the TSC frequency,
//! CPUID, the MSRs, and the pending events last.
//!
//! Restored: CPUID (before anything that depends on it), MP state, registers (SET_REGS clears
//! pending exceptions, so before the events), special registers (they carry the APIC base, so
//! before the LAPIC), XSAVE, XCRs, debug registers, the LAPIC (before the MSRs: the TSC-deadline
//! MSR only sticks with the LAPIC configured), the MSRs with IA32_TSC before IA32_TSC_DEADLINE,
//! the pending events, and finally KVM_KVMCLOCK_CTRL so the guest's soft-lockup watchdog does
//! not count the time the VM was saved.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: restored after IA32_TSC, or KVM may prime no timer (or a wrong one).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The paravirtual MSRs of KVM (kvmclock, async page faults, steal time, PV EOI, ...).
const MSR_KVM_RANGE: std::ops::RangeInclusive<u32> = 0x4b56_4d00..=0x4b56_4dff;
/// The two legacy kvmclock MSRs.
const MSR_KVM_LEGACY: [u32; 2] = [0x11, 0x12];

/// MSRs a running Linux guest depends on and KVM lets userspace save and restore: the
/// architectural ones of the boot protocol and of `syscall`/`sysenter`, TSC and its deadline,
/// PAT and the MTRRs, the speculation controls, and KVM's paravirtual MSRs. Others KVM lists
/// (performance counters, machine checks, VMX capabilities) are not part of mvm's CPU template.
fn serializable(index: u32) -> bool {
    const ARCH: &[u32] = &[
        MSR_IA32_TSC,
        0x3b,  // IA32_TSC_ADJUST
        0x48,  // IA32_SPEC_CTRL
        0x174, // IA32_SYSENTER_CS
        0x175, // IA32_SYSENTER_ESP
        0x176, // IA32_SYSENTER_EIP
        0x1a0, // IA32_MISC_ENABLE
        0x277, // IA32_PAT
        0x2ff, // IA32_MTRR_DEF_TYPE
        MSR_IA32_TSC_DEADLINE,
        0xc000_0081, // STAR
        0xc000_0082, // LSTAR
        0xc000_0083, // CSTAR
        0xc000_0084, // SYSCALL_MASK
        0xc000_0100, // FS_BASE
        0xc000_0101, // GS_BASE
        0xc000_0102, // KERNEL_GS_BASE
        0xc000_0103, // TSC_AUX
    ];
    // Variable and fixed-range MTRRs.
    let mtrr = (0x200..=0x20f).contains(&index)
        || matches!(index, 0x250 | 0x258 | 0x259)
        || (0x268..=0x26f).contains(&index);
    ARCH.contains(&index)
        || mtrr
        || MSR_KVM_RANGE.contains(&index)
        || MSR_KVM_LEGACY.contains(&index)
}

/// Why a vCPU's state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum CpuStateError {
    /// A KVM ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Building a CPUID or MSR list failed.
    #[error("cannot build the {0} list")]
    List(&'static str),
    /// KVM took only part of the MSRs.
    #[error("KVM restored {set} of {total} MSRs (refused {refused:#x})")]
    MsrsIncomplete {
        /// MSRs KVM accepted.
        set: usize,
        /// MSRs given.
        total: usize,
        /// The first one it refused.
        refused: u32,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuStateError {
    move |e| CpuStateError::Kvm(what, e)
}

/// Everything KVM keeps about one vCPU.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// Its index (and APIC id).
    pub id: u8,
    /// The CPUID it saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// MSRs, IA32_TSC_DEADLINE last.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// TSC frequency in kHz, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// The MSRs to save: what KVM lists, less what mvm does not restore, IA32_TSC_DEADLINE last.
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, CpuStateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("GET_MSR_INDEX_LIST"))?;
    let mut msrs: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|i| serializable(*i))
        .collect();
    // IA32_TSC_DEADLINE is not always listed, but restoring it keeps a pending timer.
    if !msrs.contains(&MSR_IA32_TSC_DEADLINE) {
        msrs.push(MSR_IA32_TSC_DEADLINE);
    }
    msrs.sort_by_key(|i| *i == MSR_IA32_TSC_DEADLINE);
    Ok(msrs)
}

/// Reads every MSR of `indices` that KVM lets this vCPU read (KVM stops at the first one it
/// refuses: that one is dropped and the rest read again).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, CpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| CpuStateError::List("MSR"))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(rest.len())]);
        if n < rest.len() {
            log::debug!("KVM refuses to read MSR {:#x}; not saved", rest[n]);
        }
        rest = rest.get(n + 1..).unwrap_or_default();
    }
    Ok(out)
}

impl VcpuState {
    /// Saves vCPU `id`; it must be out of KVM_RUN with its pending I/O completed (see
    /// `Vcpu::park`), and every other vCPU of the VM as well.
    pub fn save(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<Self, CpuStateError> {
        let mp_state = fd.get_mp_state().map_err(kvm_err("GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm_err("GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err("GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(kvm_err("GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(kvm_err("GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(kvm_err("GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(kvm_err("GET_LAPIC"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = read_msrs(fd, msr_indices)?;
        let events = fd.get_vcpu_events().map_err(kvm_err("GET_VCPU_EVENTS"))?;
        Ok(Self {
            id,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    /// Puts the state back into a fresh vCPU of a VM whose memory and in-kernel devices exist.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), CpuStateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| CpuStateError::List("CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm_err("SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm_err("SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(kvm_err("SET_SREGS"))?;
        // SAFETY: `xsave` is the 4 KiB legacy buffer KVM_GET_XSAVE filled; mvm never enables
        // KVM_CAP_XSAVE2, so KVM_SET_XSAVE reads exactly that much.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm_err("SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm_err("SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm_err("SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm_err("SET_LAPIC"))?;
        let mut ordered = self.msrs.clone();
        ordered.sort_by_key(|m| m.index == MSR_IA32_TSC_DEADLINE);
        let msrs = Msrs::from_entries(&ordered).map_err(|_| CpuStateError::List("MSR"))?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err("SET_MSRS"))?;
        if set < ordered.len() {
            return Err(CpuStateError::MsrsIncomplete {
                set,
                total: ordered.len(),
                refused: ordered[set].index,
            });
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm_err("SET_VCPU_EVENTS"))?;
        // Without kvmclock in the guest this fails; the guest then has no watchdog to calm.
        if let Err(e) = fd.kvmclock_ctrl() {
            log::debug!("KVM_KVMCLOCK_CTRL: {e}");
        }
        Ok(())
    }
}

/// The TSC frequencies differ by more than 250 parts per million (calibration noise).
pub fn tsc_differs(saved_khz: u32, now_khz: u32) -> bool {
    let diff = (i64::from(saved_khz) - i64::from(now_khz)).abs();
    diff * 1_000_000 > i64::from(saved_khz) * 250
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_deadline_comes_after_the_tsc_and_unknown_msrs_are_left_out() {
        assert!(serializable(MSR_IA32_TSC));
        assert!(serializable(0x4b56_4d01), "kvmclock");
        assert!(serializable(0x206), "variable MTRR");
        assert!(!serializable(0x186), "perf event select");
        assert!(!serializable(0x480), "VMX capabilities");
        let mut list = [MSR_IA32_TSC_DEADLINE, 0x174, MSR_IA32_TSC];
        list.sort_by_key(|i| *i == MSR_IA32_TSC_DEADLINE);
        assert_eq!(list.last(), Some(&MSR_IA32_TSC_DEADLINE));
        assert!(!tsc_differs(2_000_000, 2_000_400));
        assert!(tsc_differs(2_000_000, 2_001_000));
    }
}
