//! Initial vCPU state for the 64-bit Linux boot protocol: general registers, control and
//! segment registers (long mode, boot GDT), FPU, boot MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{self, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use crate::memory::{BOOT_STACK_TOP, GDT_ADDR, IDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_MISC_ENABLE: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRR default type: MTRRs enabled, write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Why a vCPU's boot state could not be set.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM_SET_*/GET_* ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Writing the GDT or IDT into guest memory failed.
    #[error("cannot write the boot GDT/IDT")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// Building the MSR list failed.
    #[error("cannot build the boot MSR list")]
    MsrList,
}

/// General registers of the boot CPU: entry point, zero page in rsi, boot stack.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// Writes the boot GDT and an empty IDT to guest memory.
pub fn write_gdt_idt(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in gdt::boot_gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(RegsError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(RegsError::Memory)
}

/// Turns `sregs` (as read from KVM) into long mode with the boot GDT and page tables.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let table = gdt::boot_gdt();
    let code = gdt::segment_from_entry(table[usize::from(CODE_SELECTOR / 8)], CODE_SELECTOR);
    let data = gdt::segment_from_entry(table[usize::from(DATA_SELECTOR / 8)], DATA_SELECTOR);
    let tss = gdt::segment_from_entry(table[usize::from(TSS_SELECTOR / 8)], TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = u16::try_from(table.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// x87/SSE state after FNINIT: control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The boot MSRs and their values.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets LINT0 to ExtINT (the PIC) and LINT1 to NMI in a LAPIC register page.
pub fn set_lint_pins(lapic: &mut kvm_lapic_state) {
    for (reg, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let value = read_apic_reg(lapic, reg);
        write_apic_reg(lapic, reg, (value & !0x700) | (mode << 8));
    }
}

fn read_apic_reg(lapic: &kvm_lapic_state, reg: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i].to_ne_bytes()[0]);
    u32::from_le_bytes(bytes)
}

fn write_apic_reg(lapic: &mut kvm_lapic_state, reg: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[reg + i] = std::ffi::c_char::from_ne_bytes([b]);
    }
}

/// Sets the state every vCPU needs: FPU, boot MSRs and the LAPIC LINT pins.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu())
        .map_err(|e| RegsError::Kvm("SET_FPU", e))?;
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::MsrList)?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("SET_MSRS", e))?;
    if set != entries.len() {
        // KVM stops at the first MSR it refuses; the rest keep their reset values.
        let refused = entries.get(set).map_or(0, |e| e.index);
        log::warn!(
            "KVM accepted {set} of {} boot MSRs (refused {refused:#x})",
            entries.len()
        );
    }
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("GET_LAPIC", e))?;
    set_lint_pins(&mut lapic);
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("SET_LAPIC", e))
}

/// Puts the boot CPU in long mode at `entry` (GDT and page tables must already be in memory).
pub fn setup_bsp(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("GET_SREGS", e))?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(|e| RegsError::Kvm("SET_SREGS", e))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(|e| RegsError::Kvm("SET_REGS", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bsp_registers_follow_the_boot_protocol() {
        let regs = boot_regs(0x100_0000);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp, regs.rbp),
            (0x100_0000, 0x7000, 0x8ff0, 0x8ff0)
        );
        assert_eq!(regs.rflags, 2);
        let sregs = long_mode_sregs(kvm_sregs::default());
        assert_eq!(sregs.cr0 & 0x8000_0031, 0x8000_0031);
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(sregs.cr4 & 0x20, 0x20);
        assert_eq!(sregs.efer & 0x500, 0x500);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x10, 1));
        assert_eq!((sregs.ss.selector, sregs.ds.selector), (0x18, 0x18));
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (0x520, 7));
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn gdt_and_idt_land_at_their_addresses() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_gdt_idt(&mem).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(0x510)).unwrap();
        assert_eq!(code, 0x00af_9b00_0000_ffff);
        let idt: u64 = mem.read_obj(GuestAddress(0x520)).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn lint_pins_become_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        write_apic_reg(&mut lapic, APIC_LVT_LINT0, 0x0001_0000);
        set_lint_pins(&mut lapic);
        assert_eq!(read_apic_reg(&lapic, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(read_apic_reg(&lapic, APIC_LVT_LINT1), 0x400);
        let msrs = boot_msr_entries();
        assert!(msrs
            .iter()
            .any(|m| m.index == MSR_MTRR_DEF_TYPE && m.data == 0x806));
    }
}
