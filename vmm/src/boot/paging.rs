//! The boot page tables (identity map of the first 1 GiB with 2 MiB pages) and a page-table
//! walker used to find the guest's instruction bytes when something goes wrong.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{PDE_ADDR, PDPTE_ADDR, PML4_ADDR};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Physical address bits of a page-table entry (bits 12..51).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Why the page tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// Guest memory does not cover the page tables.
    #[error("cannot write the boot page tables")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Writes PML4 -> PDPTE -> PDE identity-mapping [0, 1 GiB) with 2 MiB pages; CR3 = PML4.
pub fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), PagingError> {
    let table_flags = PRESENT | WRITABLE;
    mem.write_obj(PDPTE_ADDR | table_flags, GuestAddress(PML4_ADDR))
        .map_err(PagingError::Write)?;
    mem.write_obj(PDE_ADDR | table_flags, GuestAddress(PDPTE_ADDR))
        .map_err(PagingError::Write)?;
    let mut pde = [0u8; 4096];
    for (i, entry) in pde.chunks_exact_mut(8).enumerate() {
        let value = ((i as u64) << 21) | PRESENT | WRITABLE | PAGE_SIZE_BIT;
        entry.copy_from_slice(&value.to_le_bytes());
    }
    mem.write_slice(&pde, GuestAddress(PDE_ADDR))
        .map_err(PagingError::Write)
}

/// Translates a guest virtual address through 4-level paging rooted at `cr3`; `None` when an
/// entry is missing or unreadable. Used only for diagnostics, so it never fails loudly.
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, gva: u64) -> Option<u64> {
    let mut table = cr3 & ADDR_MASK;
    // Levels: PML4 (bits 39..47), PDPT (30..38), PD (21..29), PT (12..20).
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let index = (gva >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        let large = (level == 1 || level == 2) && entry & PAGE_SIZE_BIT != 0;
        if large || level == 3 {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (gva & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn identity_maps_the_first_gigabyte() {
        let m = mem();
        setup_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, 0xa003);
        let pdpte: u64 = m.read_obj(GuestAddress(PDPTE_ADDR)).unwrap();
        assert_eq!(pdpte, 0xb003);
        let last: u64 = m.read_obj(GuestAddress(PDE_ADDR + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
        for gva in [0u64, 0x1234, 0x100_0000, (1 << 30) - 1] {
            assert_eq!(translate(&m, PML4_ADDR, gva), Some(gva));
        }
        assert_eq!(translate(&m, PML4_ADDR, 1 << 30), None);
    }

    #[test]
    fn walks_4k_pages_and_survives_garbage() {
        let m = mem();
        setup_page_tables(&m).unwrap();
        // Map virtual 0xffff_8000_0000_1000 -> physical 0x20_3000 through a 4 KiB page table.
        let gva: u64 = 0xffff_8000_0000_1abc;
        let (pml4_i, pdpt_i, pd_i, pt_i) = (
            (gva >> 39) & 0x1ff,
            (gva >> 30) & 0x1ff,
            (gva >> 21) & 0x1ff,
            (gva >> 12) & 0x1ff,
        );
        m.write_obj(0x10_1000u64 | 3, GuestAddress(PML4_ADDR + pml4_i * 8))
            .unwrap();
        m.write_obj(0x10_2000u64 | 3, GuestAddress(0x10_1000 + pdpt_i * 8))
            .unwrap();
        m.write_obj(0x10_3000u64 | 3, GuestAddress(0x10_2000 + pd_i * 8))
            .unwrap();
        m.write_obj(0x20_3000u64 | 3, GuestAddress(0x10_3000 + pt_i * 8))
            .unwrap();
        assert_eq!(translate(&m, PML4_ADDR, gva), Some(0x20_3abc));
        // A table pointer outside guest memory yields None, not a panic.
        m.write_obj(0xdead_0000_0000u64 | 3, GuestAddress(PML4_ADDR + 8))
            .unwrap();
        assert_eq!(translate(&m, PML4_ADDR, 1 << 39), None);
        assert_eq!(translate(&m, u64::MAX, 0), None);
    }
}
