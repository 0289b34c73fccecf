//! Test helpers shared by the virtio device tests: guest memory, a guest driver that fills
//! split queues built by `virtio_queue::mock::MockSplitQueue`, an interrupt that counts, and a
//! device activated inside a real event loop ([`LoopRig`]) with a driver that sends and receives
//! packets through it ([`GuestDriver`]).
#![allow(clippy::cast_possible_truncation)]

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, InterruptKind, VirtioDevice, VirtioInterrupt};

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

/// A device activated inside a real event loop, with the guest's side of its queues: queue `i`
/// has 16 entries and its rings at `i * 0x1_0000`.
pub(crate) struct LoopRig<'a, D: MutEventSubscriber> {
    pub dev: Arc<Mutex<D>>,
    pub em: EventManager<Arc<Mutex<D>>>,
    pub queues: Vec<GuestQueue<'a>>,
    pub irq: Arc<TestInterrupt>,
    notify: Vec<EventFd>,
}

impl<'a, D: VirtioDevice + MutEventSubscriber> LoopRig<'a, D> {
    /// Puts `dev` in a new event loop, acks `features` (of those it offers) and activates it with
    /// all its queues. The loop has not run yet: it sees the activation on its first run.
    pub(crate) fn activate(mem: &'a GuestMemoryMmap, dev: D, features: u64) -> Self {
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::new().expect("event manager");
        em.add_subscriber(Arc::clone(&dev));
        let count = dev.lock().expect("lock").queue_max_sizes().len();
        let queues: Vec<GuestQueue<'a>> = (0..count)
            .map(|i| GuestQueue::new(mem, i as u64 * 0x1_0000, 16))
            .collect();
        let evts: Vec<EventFd> = (0..count)
            .map(|_| EventFd::new(0).expect("eventfd"))
            .collect();
        let notify = evts.iter().map(|e| e.try_clone().expect("clone")).collect();
        let irq = interrupt();
        {
            let mut d = dev.lock().expect("lock");
            let offered = d.avail_features();
            d.ack_features(offered & features);
            d.activate(ActivateContext {
                mem: mem.clone(),
                queues: queues.iter().map(GuestQueue::queue).collect(),
                queue_evts: evts,
                interrupt: irq.clone(),
            })
            .expect("activate");
        }
        Self {
            dev,
            em,
            queues,
            irq,
            notify,
        }
    }

    /// The driver notifies queue `index`.
    pub(crate) fn notify(&self, index: usize) {
        self.notify[index].write(1).expect("notify");
    }

    /// One event-loop run of at most `ms` milliseconds; returns the events handled.
    pub(crate) fn run(&mut self, ms: i32) -> usize {
        self.em.run_with_timeout(ms).expect("event loop")
    }
}

/// Where [`GuestDriver`] puts its receive buffers (one after the other).
const DRIVER_RX_BUF: u64 = 0x20_0000;
/// Where [`GuestDriver`] puts what it sends: 16 slots of 64 KiB, used in turn.
const DRIVER_TX_BUF: u64 = 0x40_0000;

/// Plays the guest driver of a packet device (net, vsock) in a [`LoopRig`]: receive buffers on
/// queue 0, packets sent on queue 1.
pub(crate) struct GuestDriver<'a, D: MutEventSubscriber> {
    pub mem: &'a GuestMemoryMmap,
    pub rig: LoopRig<'a, D>,
    buf_len: u32,
    tx_slot: u64,
    received: VecDeque<Vec<u8>>,
}

impl<'a, D: VirtioDevice + MutEventSubscriber> GuestDriver<'a, D> {
    /// Activates `dev` with `features` and offers `rx_buffers` receive buffers of `buf_len`
    /// bytes; the event loop has not run yet.
    pub(crate) fn start(
        mem: &'a GuestMemoryMmap,
        dev: D,
        features: u64,
        rx_buffers: u64,
        buf_len: u32,
    ) -> Self {
        let mut rig = LoopRig::activate(mem, dev, features);
        for i in 0..rx_buffers {
            let addr = DRIVER_RX_BUF + i * u64::from(buf_len);
            rig.queues[0].add(&[Desc::w(addr, buf_len)]);
        }
        Self {
            mem,
            rig,
            buf_len,
            tx_slot: 0,
            received: VecDeque::new(),
        }
    }

    /// One event-loop run of at most `ms` milliseconds; returns the events handled.
    pub(crate) fn run(&mut self, ms: i32) -> usize {
        self.rig.run(ms)
    }

    /// Offers one more receive buffer and notifies the receive queue.
    pub(crate) fn give_rx_buffer(&mut self) {
        self.rig.queues[0].add(&[Desc::w(DRIVER_RX_BUF, self.buf_len)]);
        self.rig.notify(0);
    }

    /// Sends `parts` as one chain (a descriptor per non-empty part) on the transmit queue,
    /// notifies it and runs the event loop once.
    pub(crate) fn send(&mut self, parts: &[&[u8]]) {
        let mut addr = DRIVER_TX_BUF + (self.tx_slot % 16) * 0x1_0000;
        self.tx_slot += 1;
        let mut chain = Vec::new();
        for part in parts.iter().filter(|p| !p.is_empty()) {
            write_mem(self.mem, addr, part);
            chain.push(Desc::r(addr, part.len() as u32));
            addr += part.len() as u64;
        }
        self.rig.queues[1].add(&chain);
        self.rig.notify(1);
        self.run(50);
    }

    /// The next receive buffer the device filled (running the event loop for at most 5 s); the
    /// buffer is offered again.
    pub(crate) fn recv(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(data) = self.received.pop_front() {
                return data;
            }
            for (head, len) in self.rig.queues[0].take_used() {
                let addr = self.rig.queues[0].desc_addr(head as u16);
                self.received
                    .push_back(read_mem(self.mem, addr, len as usize));
                self.rig.queues[0].add(&[Desc::w(addr, self.buf_len)]);
                self.rig.notify(0);
            }
            if self.received.is_empty() {
                assert!(Instant::now() < deadline, "nothing received within 5 s");
                self.run(50);
            }
        }
    }
}
