//! Test helpers shared by the virtio device tests: guest memory, a guest driver that fills
//! split queues built by `virtio_queue::mock::MockSplitQueue`, and an interrupt that counts.
#![allow(clippy::cast_possible_truncation)]

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{InterruptKind, VirtioInterrupt};

/// Size of the test guest memory.
pub(crate) const MEM_SIZE: usize = 16 << 20;
/// Where data buffers start (queues live below).
pub(crate) const DATA_START: u64 = 0x10_0000;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// 16 MiB of guest memory at address 0.
pub(crate) fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

/// An interrupt line that counts how often each kind fired.
#[derive(Debug, Default)]
pub(crate) struct TestInterrupt {
    pub queue: AtomicUsize,
    pub config: AtomicUsize,
}

impl TestInterrupt {
    pub(crate) fn queue_count(&self) -> usize {
        self.queue.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for TestInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        match kind {
            InterruptKind::Queue => self.queue.fetch_add(1, Ordering::SeqCst),
            InterruptKind::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }
}

/// One descriptor of a chain the test driver publishes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Desc {
    pub(crate) fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }
    pub(crate) fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// Plays the guest driver of one split queue.
pub(crate) struct GuestQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl<'a> GuestQueue<'a> {
    /// A queue of `size` entries whose rings start at `base`.
    pub(crate) fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        Self {
            mock: MockSplitQueue::create(mem, GuestAddress(base), size),
            mem,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The device side of this queue, as a transport would hand it over.
    pub(crate) fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue");
        q.set_size(self.size);
        q.set_ready(true);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.mock.desc_table_addr().0);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.mock.avail_addr().0);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used_addr());
        q.set_used_ring_address(lo, hi);
        q
    }

    /// The used ring, placed after the whole available ring (the mock's own placement
    /// overlaps the available ring for queues larger than a few entries).
    fn used_addr(&self) -> u64 {
        let avail_end = self.mock.avail_addr().0 + 6 + 2 * u64::from(self.size);
        avail_end.next_multiple_of(4)
    }

    /// Writes raw descriptors (links as given) at table index `at`, without publishing.
    pub(crate) fn write_raw(&self, at: u16, desc: Descriptor) {
        self.mock
            .desc_table()
            .store(at, RawDescriptor::from(desc))
            .expect("store descriptor");
    }

    /// Publishes descriptor `head` on the available ring.
    pub(crate) fn publish(&mut self, head: u16) {
        let avail = self.mock.avail_addr().0;
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + slot * 2))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(avail + 2))
            .expect("avail idx");
    }

    /// Builds a chain from `descs`, publishes it and returns its head index.
    pub(crate) fn add(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let mut flags = if d.writable { VRING_DESC_F_WRITE } else { 0 };
            let next = (idx + 1) % self.size;
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_raw(idx, Descriptor::new(d.addr, d.len, flags, next));
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// The buffer address of descriptor `idx` (e.g. the head of a used chain).
    pub(crate) fn desc_addr(&self, idx: u16) -> u64 {
        let at = self.mock.desc_table_addr().0 + u64::from(idx) * 16;
        self.mem.read_obj(GuestAddress(at)).expect("descriptor")
    }

    /// Used elements the device added since the last call: (head id, written length).
    pub(crate) fn take_used(&mut self) -> Vec<(u32, u32)> {
        let used = self.used_addr();
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let elem: VirtqUsedElem = self
                .mem
                .read_obj(GuestAddress(used + 4 + slot * 8))
                .expect("used elem");
            out.push((elem.id(), elem.len()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// Writes `data` into guest memory at `addr`.
pub(crate) fn write_mem(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(addr))
        .expect("write guest memory");
}

/// Reads `len` bytes of guest memory at `addr`.
pub(crate) fn read_mem(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr))
        .expect("read guest memory");
    v
}

/// An interrupt line for tests, shared with the device.
pub(crate) fn interrupt() -> Arc<TestInterrupt> {
    Arc::new(TestInterrupt::default())
}
