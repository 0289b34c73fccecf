//! The boot GDT and the segment registers built from it.
//!
//! Selectors follow the Linux 64-bit boot protocol (`__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18);
//! slot 1 (0x08) holds the TSS descriptor KVM needs for TR. Four entries fit exactly between
//! the GDT (0x500) and the IDT (0x520).

use kvm_bindings::kvm_segment;

/// Selector of the boot TSS.
pub const TSS_SELECTOR: u16 = 0x08;
/// Selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the flat data segment.
pub const DATA_SELECTOR: u16 = 0x18;

/// Packs a segment descriptor from `flags` (access byte in bits 0..7, flags nibble in 12..15),
/// `base` and `limit` (20 bits).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The four boot descriptors: null, TSS, 64-bit code, data.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0x808b, 0, 0xfffff),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
    ]
}

/// Unpacks a descriptor into the form KVM's `kvm_sregs` wants.
pub fn segment_from_entry(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| u8::from((entry >> n) & 1 == 1);
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = bit(55);
    // With G set the limit counts 4 KiB pages.
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_known_encodings() {
        let gdt = boot_gdt();
        assert_eq!(gdt[1], 0x008f_8b00_0000_ffff);
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn code_segment_is_64_bit_and_data_is_flat() {
        let gdt = boot_gdt();
        let cs = segment_from_entry(gdt[2], CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.type_, cs.s, cs.present), (1, 0, 0xb, 1, 1));
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
        let ds = segment_from_entry(gdt[3], DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_, ds.s), (0, 1, 3, 1));
        let tr = segment_from_entry(gdt[1], TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s, tr.present, tr.unusable), (0xb, 0, 1, 0));
        let null = segment_from_entry(0, 0);
        assert_eq!(null.unusable, 1);
    }
}
