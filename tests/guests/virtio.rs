//! The virtio test guest: drives mvm's virtio-mmio devices with its own minimal drivers
//! (`common/virtio.rs` plus one module per device in `virtio/`) and reports on serial what came
//! back, so the host side can check it against what it put in.
//!
//! The command line chooses the work: `mvm_test=blk,net,vsock,rng` (any of them, in that order);
//! with the word `twice` the whole pass runs two times (each driver starts with a device reset,
//! so the second pass checks that devices come back after a reset).
//! Devices are found through the `virtio_mmio.device=SIZE@BASE:IRQ` arguments mvm adds.
//! Other arguments a device module reads are documented there (`mvm_seed=`, `mvm_nonce=`,
//! `mvm_ip=`, `mvm_peer=`, `mvm_listen=`, `mvm_connect=`).
//!
//! Serial lines (besides the common `hello`):
//!   mvm-test-guest: virtio slot base=0x<hex> size=<dec> irq=<dec> id=<dec>   (one per device)
//!   mvm-test-guest: virtio layout=<plain|split|merged>   (`mvm_layout=`, see common/virtio.rs)
//!   mvm-test-guest: round <1|2>                  (only with `twice`)
//!   ... the device modules' lines ...
//!   mvm-test-guest: done cycles=<dec>          (TSC ticks spent in the device work)
//!   mvm-test-guest: reset
//! Any failure prints `error <what>` and resets at once, so mvm exits without waiting.
#![no_std]
#![no_main]

mod common;
#[path = "virtio/blk.rs"]
mod blk;
#[path = "virtio/net.rs"]
mod net;
#[path = "virtio/rng.rs"]
mod rng;
#[path = "virtio/vsock.rs"]
mod vsock;

use common::boot_info::BootInfo;
use common::out::line;
use common::rdtsc;
use common::virtio::{Layout, Slots, Transport};

fn main(boot: &BootInfo) -> ! {
    let slots = Slots::from_cmdline(boot);
    for slot in slots.all() {
        let l = line()
            .s("virtio slot base=")
            .hex(slot.base)
            .s(" size=")
            .dec(slot.size)
            .s(" irq=")
            .dec(slot.irq)
            .s(" id=");
        match Transport::probe(slot.base) {
            Ok(t) => l.dec(u64::from(t.device_id())).end(),
            Err(why) => l.s("none error=").s(why).end(),
        }
    }
    line()
        .s("virtio layout=")
        .s(Layout::from_cmdline(boot).name())
        .end();
    let start = rdtsc();
    let rounds = if boot.has_test_word("twice") { 2 } else { 1 };
    for round in 1..=rounds {
        if rounds > 1 {
            line().s("round ").dec(round).end();
        }
        run_devices(boot, &slots);
    }
    line()
        .s("done cycles=")
        .dec(rdtsc().wrapping_sub(start))
        .end();
    common::reset()
}

/// One pass over the devices the command line asks for; each driver starts with a reset.
fn run_devices(boot: &BootInfo, slots: &Slots) {
    if boot.has_test_word("blk") {
        blk::run(boot, slots);
    }
    if boot.has_test_word("net") {
        net::run(boot, slots);
    }
    if boot.has_test_word("vsock") {
        vsock::run(boot, slots);
    }
    if boot.has_test_word("rng") {
        rng::run(slots);
    }
}

/// Prints `error <what>` and resets: a failed check ends the run at once.
pub fn fail(what: &str) -> ! {
    line().s("error ").s(what).end();
    common::reset()
}

/// Unwraps a driver step or fails with `<context>: <why>`.
pub fn check<T>(r: Result<T, &'static str>, context: &str) -> T {
    match r {
        Ok(v) => v,
        Err(why) => {
            line().s("error ").s(context).s(": ").s(why).end();
            common::reset()
        }
    }
}
