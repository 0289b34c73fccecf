//! Helpers for device unit tests: guest memory and hand-built descriptor chains on a
//! `virtio_queue::mock::MockSplitQueue`, including chains no honest driver would build.

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub(crate) use super::testing::{read_mem, write_mem};

/// Size of the test guest memory (one region at address 0).
pub const MEM_SIZE: usize = 0x10_0000;
/// Where tests put data buffers (the rings live below).
pub const BUF_BASE: u64 = 0x1_0000;

/// VRING_DESC_F_NEXT.
pub const F_NEXT: u16 = 1;
/// VRING_DESC_F_WRITE.
pub const F_WRITE: u16 = 2;

/// One descriptor as a test wants it: (address, length, device-writable).
pub type Desc = (u64, u32, bool);

/// Guest memory of [`MEM_SIZE`] bytes at address 0.
pub fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("test guest memory")
}

/// Stores a raw descriptor at `index` of the descriptor table.
pub fn store_desc(
    q: &MockSplitQueue<GuestMemoryMmap>,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
    q.desc_table()
        .store(index, d)
        .expect("descriptor index in table");
}

/// Publishes `head` in the available ring.
pub fn publish(q: &MockSplitQueue<GuestMemoryMmap>, head: u16) {
    let idx = q.avail().idx().load();
    let ring_len = u16::try_from(q.desc_table().total_size() / 16).unwrap_or(1);
    q.avail()
        .ring()
        .ref_at(usize::from(idx % ring_len))
        .expect("avail slot")
        .store(head);
    q.avail().idx().store(idx.wrapping_add(1));
}

/// Writes `descs` as one chain starting at table index `first` and publishes it.
pub fn add_chain(q: &MockSplitQueue<GuestMemoryMmap>, first: u16, descs: &[Desc]) {
    for (i, &(addr, len, writable)) in descs.iter().enumerate() {
        let index = first + u16::try_from(i).expect("short chain");
        let mut flags = if writable { F_WRITE } else { 0 };
        if i + 1 < descs.len() {
            flags |= F_NEXT;
        }
        store_desc(q, index, addr, len, flags, index.wrapping_add(1));
    }
    publish(q, first);
}

/// The used ring entries so far, as (head index, length).
pub fn used(q: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let n = q.used().idx().load();
    let ring_len = u16::try_from(q.desc_table().total_size() / 16).unwrap_or(1);
    (0..n)
        .map(|i| {
            let e = q
                .used()
                .ring()
                .ref_at(usize::from(i % ring_len))
                .expect("used slot")
                .load();
            (e.id(), e.len())
        })
        .collect()
}
