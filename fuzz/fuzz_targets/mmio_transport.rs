//! The virtio-mmio transport: a guest driver's register accesses, in any order and any width,
//! against a transport around a real device (virtio-rng, or virtio-blk over an in-memory disk)
//! served by a real event loop, with fuzzer-filled guest memory behind its queues.
//!
//! Status and feature negotiation, queue setup, activation, notifications (served by the device
//! through the event loop), interrupt acknowledgement, configuration space and reset must never
//! panic. Two rules of the transport are checked on the way: the magic value always reads back,
//! and DRIVER_OK is never set without FEATURES_OK. An op can also save the transport and restore
//! it into a fresh one (as a snapshot does); that must succeed whatever the driver did.
//!
//! Input: byte 0 picks the device (bit 0: block, else rng; bit 1: a read-only disk), byte 1 the
//! number of ops, then 7 bytes per op, then guest memory ([`mvm_fuzz::guest_memory`]). An op is
//! `kind, offset (le16), value (le32)`: kind bits 0-2 pick the access width (4, 1, 2, 8, 4, 3,
//! 0, 4 bytes), bit 3 a write (else a read), and a kind of 0xf0 or more saves and restores.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::virtio::block::{Block, MemDisk};
use devices::virtio::mmio::{status, MmioTransport};
use devices::virtio::rng::Rng;
use devices::virtio::VirtioDevice;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;

const OP_LEN: usize = 7;
const WIDTHS: [usize; 8] = [4, 1, 2, 8, 4, 3, 0, 4];
/// "virt" in little endian, the MagicValue register.
const MAGIC: u32 = 0x7472_6976;

/// A transport around a fresh device, the device registered with its own event loop.
struct Rig<D: VirtioDevice + MutEventSubscriber + Send + 'static> {
    transport: MmioTransport,
    em: EventManager<Arc<Mutex<D>>>,
}

impl<D: VirtioDevice + MutEventSubscriber + Send + 'static> Rig<D> {
    fn new(mem: &GuestMemoryMmap, device: D) -> Option<Self> {
        let device = Arc::new(Mutex::new(device));
        let mut em = EventManager::new().ok()?;
        em.add_subscriber(device.clone());
        let transport = MmioTransport::new(mem.clone(), device).ok()?;
        Some(Self { transport, em })
    }
}

fn drive<D, F>(ops: &[u8], mem: &GuestMemoryMmap, make: F)
where
    D: VirtioDevice + MutEventSubscriber + Send + 'static,
    F: Fn() -> Option<D>,
{
    let Some(mut rig) = make().and_then(|d| Rig::new(mem, d)) else {
        return;
    };
    for op in ops.chunks_exact(OP_LEN) {
        let kind = op[0];
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let value = [op[3], op[4], op[5], op[6]];
        if kind >= 0xf0 {
            let state = rig.transport.save_state().expect("an mmio transport saves");
            let Some(mut fresh) = make().and_then(|d| Rig::new(mem, d)) else {
                return;
            };
            if let Err(e) = fresh.transport.restore_state(&state) {
                panic!("a saved transport does not restore: {e}\n{state:?}");
            }
            rig = fresh;
        } else {
            let width = WIDTHS[usize::from(kind & 7)];
            let mut data = [0u8; 8];
            for (i, b) in data[..width].iter_mut().enumerate() {
                *b = value[i % 4];
            }
            if kind & 8 != 0 {
                rig.transport.write(offset, &data[..width]);
                // The event loop serves what the write started (an activation, a notification).
                rig.em.run_with_timeout(0).expect("event loop");
            } else {
                rig.transport.read(offset, &mut data[..width]);
                if offset == 0 && width == 4 {
                    assert_eq!(
                        u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                        MAGIC
                    );
                }
            }
        }
        let s = rig.transport.device_status();
        assert!(
            s & status::DRIVER_OK == 0 || s & status::FEATURES_OK != 0,
            "DRIVER_OK without FEATURES_OK: {s:#x}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&[flags, count], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (ops, memory) = rest.split_at(rest.len().min(usize::from(count) * OP_LEN));
    let Some(mem) = mvm_fuzz::guest_memory(memory) else {
        return;
    };
    if flags & 1 != 0 {
        let read_only = flags & 2 != 0;
        drive(ops, &mem, || {
            Block::with_backend(Box::new(MemDisk::new(64 * 1024, read_only)), None).ok()
        });
    } else {
        drive(ops, &mem, || Rng::new().ok());
    }
});
