//! The boot test guest: reports on serial what the loader handed over (entry path, command line,
//! memory map, initrd), starts every processor the MP table lists, and resets the machine.
//!
//! Serial lines (one fact each, `key=value` fields, in this order):
//!   mvm-test-guest: hello entry=linux|pvh mode=64-bit
//!   mvm-test-guest: cmdline="<bytes, non-printable as \xNN>"
//!   mvm-test-guest: e820 addr=0x<16 hex> size=0x<16 hex> type=<n>     (one per entry)
//!   mvm-test-guest: ram bytes=<dec> mib=<dec>
//!   mvm-test-guest: initrd addr=0x<hex> size=<dec> fnv1a=0x<8 hex>   | initrd none
//!   mvm-test-guest: mp-table addr=0x<hex> cpus=<n> lapic=0x<hex> bsp-apic-id=<n> | mp-table none
//!   mvm-test-guest: cpus started=<n> expected=<n>
//!   mvm-test-guest: done
//!   mvm-test-guest: reset
//! Test words on the command line (`mvm_test=a,b`): `triple_fault` (after the report, instead of
//! resetting), `hang` (after the report, halt forever), `no_smp` (skip AP start-up).
#![no_std]
#![no_main]

mod common;

use common::boot_info::BootInfo;
use common::out::line;
use common::smp;

/// TSC ticks to wait for APs to check in (about a second on current hosts).
const AP_TIMEOUT_CYCLES: u64 = 3_000_000_000;

fn main(boot: &BootInfo) -> ! {
    line().s("cmdline=\"").bytes(boot.cmdline()).s("\"").end();
    for r in boot.regions() {
        line()
            .s("e820 addr=")
            .hex_digits(r.addr, 16)
            .s(" size=")
            .hex_digits(r.size, 16)
            .s(" type=")
            .dec(u64::from(r.kind))
            .end();
    }
    let ram = boot.ram_bytes();
    line()
        .s("ram bytes=")
        .dec(ram)
        .s(" mib=")
        .dec(ram >> 20)
        .end();
    report_initrd(boot);
    if !boot.has_test_word("no_smp") {
        start_processors();
    }
    line().s("done").end();
    if boot.has_test_word("triple_fault") {
        common::triple_fault();
    }
    if boot.has_test_word("hang") {
        line().s("hanging").end();
        common::halt_forever();
    }
    common::reset()
}

fn report_initrd(boot: &BootInfo) {
    let Some((addr, size)) = boot.initrd else {
        line().s("initrd none").end();
        return;
    };
    // FNV-1a (32-bit) over the whole initrd, so the host can check the bytes arrived intact.
    let mut hash: u32 = 0x811c_9dc5;
    for i in 0..size {
        // SAFETY: the loader placed `size` bytes of initrd at `addr`, inside guest RAM.
        let b: u8 = unsafe { common::read_phys(addr + i) };
        hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    line()
        .s("initrd addr=")
        .hex(addr)
        .s(" size=")
        .dec(size)
        .s(" fnv1a=")
        .hex_digits(u64::from(hash), 8)
        .end();
}

fn start_processors() {
    let Some(mp) = smp::find_mp_table() else {
        line().s("mp-table none").end();
        line().s("cpus started=1 expected=1").end();
        return;
    };
    let lapic = mp.lapic_paddr;
    let own = smp::own_apic_id(lapic);
    let mut l = line()
        .s("mp-table addr=")
        .hex(mp.floating_paddr)
        .s(" cpus=")
        .dec(mp.cpu_count as u64)
        .s(" lapic=")
        .hex(lapic)
        .s(" bsp-apic-id=");
    l = match mp.bsp_apic_id {
        Some(id) => l.dec(u64::from(id)),
        None => l.s("none"),
    };
    l.end();
    let mut aps = [0u8; smp::MAX_CPUS];
    let mut n = 0;
    for &id in mp.ids() {
        if id != own {
            aps[n] = id;
            n += 1;
        }
    }
    let expected = n as u64 + 1;
    match smp::start_aps(lapic, &aps[..n], AP_TIMEOUT_CYCLES) {
        Some(started) => line()
            .s("cpus started=")
            .dec(u64::from(started) + 1)
            .s(" expected=")
            .dec(expected)
            .end(),
        None => line().s("error ipi not delivered").end(),
    }
}
