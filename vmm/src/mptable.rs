//! The Intel MultiProcessor Specification 1.4 table, so a guest without ACPI finds its CPUs,
//! the IOAPIC and the interrupt routing. The floating pointer sits at the start of the EBDA
//! (0x9fc00) and the configuration table right after it, all within the EBDA's first KiB.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR};

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Pins of the IOAPIC (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
/// CPU signature in processor entries: family 6.
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags in processor entries: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
/// Room for the whole table: the EBDA's first KiB.
const TABLE_ROOM: usize = 1024;
/// The most vCPUs whose processor entries fit next to the fixed entries.
pub const MAX_CPUS: u8 = 32;

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table holds.
    #[error("{0} vCPUs do not fit in the MP table (maximum {MAX_CPUS})")]
    TooManyCpus(u8),
    /// Writing into guest memory failed.
    #[error("cannot write the MP table")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// The bytes of the floating pointer and configuration table for `cpus` vCPUs placed at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ n arrives on IOAPIC pin n as an ordinary interrupt, IRQ 0 (the PIT) included:
    // KVM's default routing sends GSI n to pin n. A guest that keeps the PIT as its clock event
    // (no TSC-deadline timer) routes the timer through pin 0; marking that pin ExtINT leaves
    // IRQ 0 without IOAPIC data and Linux's check_timer() then dereferences NULL.
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IOINT, INT_TYPE_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 = ExtINT and LINT1 = NMI on every local APIC (id 0xff = all).
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LINT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }

    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&u16::try_from(table_len).unwrap_or(u16::MAX).to_le_bytes());
    header.push(SPEC_REV);
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"MVM     ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = 0u8.wrapping_sub(checksum(&table));

    let table_addr = u32::try_from(base + FLOATING_LEN as u64).unwrap_or(0);
    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(SPEC_REV);
    floating.push(0); // checksum
    floating.extend_from_slice(&[0; 5]); // feature bytes: 0 = configuration table present
    floating[10] = 0u8.wrapping_sub(checksum(&floating));

    let mut out = floating;
    out.extend_from_slice(&table);
    debug_assert!(out.len() <= TABLE_ROOM);
    Ok(out)
}

/// Writes the MP table for `cpus` vCPUs at the start of the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_sum_to_zero_and_pointer_finds_the_table() {
        let bytes = build(2, EBDA_START).unwrap();
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(checksum(&bytes[..16]), 0);
        let ptr = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        assert_eq!(u64::from(ptr), EBDA_START + 16);
        let table = &bytes[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(checksum(table), 0);
        let lapic = u32::from_le_bytes(table[36..40].try_into().unwrap());
        assert_eq!(lapic, 0xfee0_0000);
    }

    #[test]
    fn one_processor_entry_per_vcpu_then_bus_ioapic_and_interrupts() {
        let bytes = build(3, EBDA_START).unwrap();
        let table = &bytes[16..];
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 3 + 1 + 1 + 24 + 2);
        let entries = &table[44..];
        for id in 0..3u8 {
            let e = &entries[usize::from(id) * 20..];
            assert_eq!((e[0], e[1]), (ENTRY_PROCESSOR, id));
            assert_eq!(e[3] & CPU_BOOTSTRAP != 0, id == 0);
        }
        let rest = &entries[60..];
        assert_eq!(&rest[..8], b"\x01\x00ISA   ");
        assert_eq!(&rest[8..12], &[ENTRY_IOAPIC, 3, IOAPIC_VERSION, 1]);
        assert_eq!(
            u32::from_le_bytes(rest[12..16].try_into().unwrap()),
            0xfec0_0000
        );
        assert_eq!(
            &rest[16 + 8 * 4..16 + 8 * 5],
            &[ENTRY_IOINT, 0, 0, 0, 0, 4, 3, 4]
        );
    }

    #[test]
    fn every_ioapic_pin_is_an_ordinary_interrupt_routed_one_to_one() {
        let cpus = 2u8;
        let bytes = build(cpus, EBDA_START).unwrap();
        let entries = &bytes[16 + HEADER_LEN..];
        // Processor entries (20 bytes each), then the bus (8) and the IOAPIC (8).
        let ioints = &entries[usize::from(cpus) * 20 + 16..];
        for pin in 0..IOAPIC_PINS {
            let e = &ioints[usize::from(pin) * 8..usize::from(pin) * 8 + 8];
            assert_eq!(e[0], ENTRY_IOINT, "pin {pin}");
            assert_eq!(e[1], INT_TYPE_INT, "pin {pin} must not be ExtINT");
            assert_eq!(
                (e[5], e[6], e[7]),
                (pin, cpus, pin),
                "IRQ {pin} -> pin {pin}"
            );
        }
        // The local APICs keep LINT0 = ExtINT (the PIC) and LINT1 = NMI.
        let lints = &ioints[usize::from(IOAPIC_PINS) * 8..];
        assert_eq!(&lints[..2], &[ENTRY_LINT, INT_TYPE_EXTINT]);
        assert_eq!(&lints[8..10], &[ENTRY_LINT, INT_TYPE_NMI]);
    }

    #[test]
    fn the_largest_table_fits_in_the_ebda_and_limits_hold() {
        assert!(build(MAX_CPUS, EBDA_START).unwrap().len() <= TABLE_ROOM);
        assert!(build(MAX_CPUS + 1, EBDA_START).is_err());
        assert!(build(0, EBDA_START).is_err());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 1).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
