//! Direct kernel boot: loading the kernel, initrd and command line, and the boot-time CPU and
//! memory structures (GDT, page tables, zero page, registers) of the 64-bit boot protocol.

pub mod gdt;
pub mod loader;
pub mod paging;
pub mod regs;
