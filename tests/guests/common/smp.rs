//! Multiprocessor start-up: find the Intel MP table (MultiProcessor Specification 1.4), then wake
//! every application processor it lists with INIT-SIPI-SIPI through the xAPIC. Each AP runs the
//! real-mode trampoline from entry.S, reaches long mode and checks in by bumping a counter.

use core::sync::atomic::{AtomicU32, Ordering};

use super::{rdtsc, read_phys, write_phys};

/// Where the AP trampoline is copied (4 KiB aligned, below 1 MiB, free in the mvm layout).
pub const TRAMPOLINE_PADDR: u64 = 0x30000;
/// The local APIC's default MMIO base (mapped uncached by entry.S).
pub const LAPIC_DEFAULT: u64 = 0xfee0_0000;
/// The most processors the guest keeps track of.
pub const MAX_CPUS: usize = 32;

const LAPIC_ID: u64 = 0x20;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ESR: u64 = 0x280;
const LAPIC_ICR_LO: u64 = 0x300;
const LAPIC_ICR_HI: u64 = 0x310;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_INIT_ASSERT: u32 = 0x0000_4500;
const ICR_STARTUP: u32 = 0x0000_4600;

const MP_FLOATING_SIG: u32 = u32::from_le_bytes(*b"_MP_");
const MP_CONFIG_SIG: u32 = u32::from_le_bytes(*b"PCMP");
const MP_ENTRY_PROCESSOR: u8 = 0;
const MP_CPU_ENABLED: u8 = 1;
const MP_CPU_BSP: u8 = 2;

/// Processors the MP table lists.
#[derive(Debug, Clone, Copy)]
pub struct MpInfo {
    /// Guest-physical address of the MP floating pointer structure.
    pub floating_paddr: u64,
    /// Local APIC MMIO base from the configuration table.
    pub lapic_paddr: u64,
    /// APIC IDs of the enabled processors, `apic_ids[..cpu_count]`.
    pub apic_ids: [u8; MAX_CPUS],
    /// Number of enabled processors listed (possibly more than `MAX_CPUS`).
    pub cpu_count: usize,
    /// APIC ID of the processor marked as bootstrap processor, if any.
    pub bsp_apic_id: Option<u8>,
}

impl MpInfo {
    /// The APIC IDs kept (at most [`MAX_CPUS`]).
    pub fn ids(&self) -> &[u8] {
        &self.apic_ids[..self.cpu_count.min(MAX_CPUS)]
    }
}

/// Searches the places the MP specification names (EBDA, top of base memory, BIOS ROM) and the
/// mvm layout's 0x9fc00 for a valid MP floating pointer and parses its configuration table.
pub fn find_mp_table() -> Option<MpInfo> {
    // SAFETY: the BIOS data area is in the identity-mapped first page of RAM.
    let (ebda_segment, base_kib): (u16, u16) = unsafe { (read_phys(0x40e), read_phys(0x413)) };
    let ebda = u64::from(ebda_segment) << 4;
    let top = u64::from(base_kib) * 1024;
    let candidates = [
        (ebda, 1024),
        (top.saturating_sub(1024), 1024),
        (0x9fc00, 1024),
        (0xf0000, 0x10000),
    ];
    for (start, len) in candidates {
        if !(0x400..0x10_0000).contains(&start) {
            continue;
        }
        let mut p = start;
        while p + 16 <= start + len {
            if let Some(info) = parse_floating(p) {
                return Some(info);
            }
            p += 16;
        }
    }
    None
}

/// Byte sum of `len` bytes at `paddr`.
fn checksum(paddr: u64, len: u64) -> u8 {
    let mut sum = 0u8;
    for i in 0..len {
        // SAFETY: callers only pass ranges inside the identity-mapped first 4 GiB.
        sum = sum.wrapping_add(unsafe { read_phys::<u8>(paddr + i) });
    }
    sum
}

fn parse_floating(p: u64) -> Option<MpInfo> {
    // SAFETY: p is inside one of the low-memory search ranges, identity mapped.
    let sig: u32 = unsafe { read_phys(p) };
    if sig != MP_FLOATING_SIG {
        return None;
    }
    // SAFETY: as above; the floating structure is 16 bytes.
    let (config, length, feature1): (u32, u8, u8) =
        unsafe { (read_phys(p + 4), read_phys(p + 8), read_phys(p + 11)) };
    if length == 0 || checksum(p, u64::from(length) * 16) != 0 {
        return None;
    }
    let mut info = MpInfo {
        floating_paddr: p,
        lapic_paddr: LAPIC_DEFAULT,
        apic_ids: [0; MAX_CPUS],
        cpu_count: 0,
        bsp_apic_id: None,
    };
    if feature1 != 0 || config == 0 {
        // A default configuration: two processors, APIC IDs 0 (BSP) and 1.
        info.apic_ids[0] = 0;
        info.apic_ids[1] = 1;
        info.cpu_count = 2;
        info.bsp_apic_id = Some(0);
        return Some(info);
    }
    let table = u64::from(config);
    if table >= 0x1_0000_0000 - 0x1_0000 {
        return None;
    }
    // SAFETY: the configuration table address came from a checksummed floating pointer and is
    // below 4 GiB; its header is 44 bytes.
    let (csig, base_len, lapic): (u32, u16, u32) = unsafe {
        (
            read_phys(table),
            read_phys(table + 4),
            read_phys(table + 36),
        )
    };
    if csig != MP_CONFIG_SIG || base_len < 44 || checksum(table, u64::from(base_len)) != 0 {
        return None;
    }
    info.lapic_paddr = u64::from(lapic);
    let end = table + u64::from(base_len);
    // Walk the entries by the table length: some firmware (QEMU's qboot) leaves the entry
    // count at zero.
    let mut e = table + 44;
    while e < end {
        // SAFETY: e is inside the checksummed base table.
        let kind: u8 = unsafe { read_phys(e) };
        if kind == MP_ENTRY_PROCESSOR {
            if e + 20 > end {
                break;
            }
            // SAFETY: a processor entry is 20 bytes and fits in the table (checked above).
            let (id, flags): (u8, u8) = unsafe { (read_phys(e + 1), read_phys(e + 3)) };
            if flags & MP_CPU_ENABLED != 0 {
                if info.cpu_count < MAX_CPUS {
                    info.apic_ids[info.cpu_count] = id;
                }
                info.cpu_count += 1;
                if flags & MP_CPU_BSP != 0 {
                    info.bsp_apic_id = Some(id);
                }
            }
            e += 20;
        } else if kind <= 4 {
            e += 8;
        } else {
            break;
        }
    }
    Some(info)
}

/// Application processors that reached long mode.
static AP_CHECKED_IN: AtomicU32 = AtomicU32::new(0);

/// Records that one more AP reached long mode (called on the AP itself).
pub fn ap_checked_in(_index: u64) {
    AP_CHECKED_IN.fetch_add(1, Ordering::SeqCst);
}

/// How many APs have checked in so far.
pub fn aps_checked_in() -> u32 {
    AP_CHECKED_IN.load(Ordering::SeqCst)
}

fn lapic_read(base: u64, reg: u64) -> u32 {
    // SAFETY: the local APIC page is mapped uncached; its registers are 32-bit, 16-byte aligned.
    unsafe { read_phys(base + reg) }
}

fn lapic_write(base: u64, reg: u64, value: u32) {
    // SAFETY: as for lapic_read; writes to ID/SVR/ESR/ICR only affect interrupt delivery.
    unsafe { write_phys(base + reg, value) }
}

/// This processor's local APIC ID.
pub fn own_apic_id(lapic: u64) -> u8 {
    (lapic_read(lapic, LAPIC_ID) >> 24) as u8
}

/// Spins for about `cycles` TSC ticks.
pub fn spin_cycles(cycles: u64) {
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}

/// Sends one IPI and waits (bounded) until the APIC has delivered it. Returns false on timeout.
fn send_ipi(lapic: u64, apic_id: u8, icr_low: u32) -> bool {
    lapic_write(lapic, LAPIC_ESR, 0);
    lapic_write(lapic, LAPIC_ICR_HI, u32::from(apic_id) << 24);
    lapic_write(lapic, LAPIC_ICR_LO, icr_low);
    let start = rdtsc();
    while lapic_read(lapic, LAPIC_ICR_LO) & ICR_DELIVERY_PENDING != 0 {
        if rdtsc().wrapping_sub(start) > 100_000_000 {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

/// Copies the trampoline to [`TRAMPOLINE_PADDR`] and wakes each AP in `ap_ids` with
/// INIT-SIPI-SIPI; then waits until all have checked in or `timeout_cycles` TSC ticks passed.
/// Returns how many checked in, or `None` if an IPI was never delivered.
pub fn start_aps(lapic: u64, ap_ids: &[u8], timeout_cycles: u64) -> Option<u32> {
    let (start, end) = (
        &raw const ap_tramp_start as u64,
        &raw const ap_tramp_end as u64,
    );
    let len = end - start;
    // SAFETY: the trampoline is `len` bytes inside the image; 0x30000.. is free RAM in the mvm
    // layout and under PVH loaders, and not used by anything else in this guest.
    unsafe {
        core::ptr::copy_nonoverlapping(
            start as *const u8,
            TRAMPOLINE_PADDR as *mut u8,
            len as usize,
        );
    }
    // Software-enable the local APIC (spurious vector 0xff).
    lapic_write(lapic, LAPIC_SVR, 0x1ff);
    let vector = (TRAMPOLINE_PADDR >> 12) as u32;
    for &id in ap_ids {
        if !send_ipi(lapic, id, ICR_INIT_ASSERT) {
            return None;
        }
        spin_cycles(1_000_000);
        for _ in 0..2 {
            if !send_ipi(lapic, id, ICR_STARTUP | vector) {
                return None;
            }
            spin_cycles(100_000);
        }
    }
    let want = ap_ids.len() as u32;
    let begin = rdtsc();
    while aps_checked_in() < want && rdtsc().wrapping_sub(begin) < timeout_cycles {
        core::hint::spin_loop();
    }
    Some(aps_checked_in())
}
