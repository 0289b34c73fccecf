//! Guest physical memory: the fixed layout of the boot structures, the RAM regions around the
//! 3-4 GiB MMIO gap, and the e820 map the guest kernel reads.
//!
//! Layout (guest-physical), shared with the test guests:
//!
//! | address | what |
//! | --- | --- |
//! | 0x500 | GDT (4 entries) |
//! | 0x520 | IDT (empty) |
//! | 0x7000 | zero page (`boot_params`) |
//! | 0x8ff0 | boot stack top |
//! | 0x9000 / 0xa000 / 0xb000 | PML4 / PDPTE / PDE (identity map of the first 1 GiB) |
//! | 0x20000 | kernel command line |
//! | 0x30000..0x9f000 | left to the guest (test guests put their AP trampoline there) |
//! | 0x9fc00 | MP table (EBDA), reserved up to 1 MiB |
//! | 0x100000 | start of high memory (kernels load here or above) |
//! | 0xc000_0000..0x1_0000_0000 | MMIO gap: virtio-mmio from 0xd000_0000, IOAPIC, LAPIC |

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// GDT of the boot CPU.
pub const GDT_ADDR: u64 = 0x500;
/// IDT of the boot CPU (empty: the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// The zero page (`struct boot_params`); the BSP starts with rsi pointing here.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Top of the boot stack (rsp and rbp of the BSP).
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Page-map level 4 table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// Page directory (2 MiB pages covering the first 1 GiB).
pub const PDE_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line, with its terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// Where kernels and initrds may be loaded (1 MiB).
pub const HIGHMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap; RAM beyond the gap continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First address handed to virtio-mmio devices.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT: u64 = 0x1000;
/// End (exclusive) of the virtio-mmio window.
pub const VIRTIO_MMIO_END: u64 = 0xfe00_0000;
/// Address KVM uses for the real-mode TSS (three pages, inside the MMIO gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Address KVM uses for the EPT identity map page (just below the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Smallest guest memory mvm accepts.
pub const MIN_MEM_SIZE: u64 = 2 << 20;

// The layout is fixed at compile time; these fail the build if it ever overlaps.
const _: () = {
    // The 4-entry GDT ends where the IDT starts.
    assert!(GDT_ADDR + 4 * 8 == IDT_ADDR);
    assert!(ZERO_PAGE_ADDR + 0x1000 <= BOOT_STACK_TOP + 0x10);
    assert!(BOOT_STACK_TOP < PML4_ADDR);
    assert!(PDE_ADDR + 0x1000 <= CMDLINE_ADDR);
    // Guest memory 0x30000..0x9f000 stays free for the guest.
    assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= 0x30000);
    assert!(VIRTIO_MMIO_START >= MMIO_GAP_START && VIRTIO_MMIO_END <= IOAPIC_ADDR as u64);
    assert!(KVM_IDENTITY_MAP_ADDR + 0x1000 == KVM_TSS_ADDR);
};

/// e820 entry type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 entry type: reserved.
pub const E820_RESERVED: u32 = 2;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is below [`MIN_MEM_SIZE`].
    #[error("guest memory of {0} bytes is too small (minimum {MIN_MEM_SIZE})")]
    TooSmall(u64),
    /// Mapping the memory failed.
    #[error("cannot map {0} bytes of guest memory")]
    Mmap(u64, #[source] vm_memory::mmap::FromRangesError),
}

/// One entry of the e820 memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The guest RAM ranges `(start, len)` for `mem_size` bytes: below the MMIO gap first, the rest
/// above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    let low = mem_size.min(MMIO_GAP_START);
    let mut ranges = vec![(0, low)];
    if mem_size > MMIO_GAP_START {
        ranges.push((MMIO_GAP_END, mem_size - MMIO_GAP_START));
    }
    ranges
}

/// End (exclusive) of the RAM below the MMIO gap.
pub fn low_mem_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// The e820 map for `mem_size` bytes of RAM (at least [`MIN_MEM_SIZE`]).
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIGHMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_ranges(mem_size) {
        let start = start.max(HIGHMEM_START);
        let end = if start == MMIO_GAP_END {
            start + len
        } else {
            low_mem_end(mem_size)
        };
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Maps `mem_size` bytes of anonymous guest memory (not yet registered with KVM).
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if mem_size < MIN_MEM_SIZE {
        return Err(MemoryError::TooSmall(mem_size));
    }
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| {
            (
                GuestAddress(start),
                usize::try_from(len).unwrap_or(usize::MAX),
            )
        })
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Mmap(mem_size, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_memory_has_one_region_and_a_reserved_hole_below_1m() {
        let mem = 256 << 20;
        assert_eq!(ram_ranges(mem), vec![(0, mem)]);
        assert_eq!(
            e820_map(mem),
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x100000,
                    size: mem - 0x100000,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn large_memory_is_split_around_the_mmio_gap() {
        let mem: u64 = 5 << 30;
        assert_eq!(ram_ranges(mem), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        let map = e820_map(mem);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0x100000,
                size: (3 << 30) - 0x100000,
                kind: E820_RAM
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 4 << 30,
                size: 2 << 30,
                kind: E820_RAM
            }
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, mem - (0x100000 - 0x9fc00));
        // Exactly 3 GiB: no region above 4 GiB.
        assert_eq!(ram_ranges(3 << 30).len(), 1);
        assert_eq!(e820_map(3 << 30).len(), 3);
    }

    #[test]
    fn guest_memory_matches_the_ranges() {
        assert!(matches!(
            create_guest_memory(1 << 20),
            Err(MemoryError::TooSmall(_))
        ));
        let mem = create_guest_memory(16 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let region = mem.iter().next().unwrap();
        assert_eq!(region.start_addr(), GuestAddress(0));
        assert_eq!(region.len(), 16 << 20);
    }
}
