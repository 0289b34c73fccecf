//! virtio-net queue processing, independent of the event loop: move frames between the guest's
//! queues and a [`NetBackend`].
//!
//! Every chain comes from the guest and is treated as hostile: chains that point outside guest
//! memory, lack the right kind of descriptor or have absurd lengths are returned to the guest
//! (used length 0) and counted; nothing here panics or touches memory outside the guest.

use std::io::{self, Read, Write};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT, Writer};
use vm_memory::GuestMemoryMmap;

use super::{NetBackend, NetMetrics, MAX_FRAME_LEN, NAME, VNET_HDR_LEN};
use crate::virtio::chains::{drain_queue_until, notify_guest, Chain, QueueIrq};
use crate::virtio::rate_limiter::{Kind, Throttle};
use crate::virtio::VirtioInterrupt;

/// Smallest frame the device forwards: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// What stopped a receive pass.
#[derive(Debug, PartialEq, Eq)]
pub enum RxStop {
    /// The backend has nothing more to read.
    Drained,
    /// A frame is waiting but the guest has no receive buffers: stop reading the backend until
    /// the guest notifies the receive queue.
    NoBuffers,
    /// The backend failed (e.g. passt exited); stop reading it.
    BackendFailed,
    /// The rate limiter holds receiving back: stop reading the backend until its timer fires.
    Throttled,
}

/// The queues of an activated virtio-net device and the frame buffers that serve them.
#[derive(Debug)]
pub struct NetQueues {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    mrg_rxbuf: bool,
    metrics: Arc<NetMetrics>,
    rx_frame: Vec<u8>,
    /// Length (header included) of a received frame still waiting for guest buffers; 0 if none.
    rx_pending: usize,
    tx_frame: Vec<u8>,
}

enum Deliver {
    Done,
    NoBuffers,
    Dropped,
}

impl NetQueues {
    /// The receive and transmit queues' state (for a snapshot).
    pub fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        vec![self.rx.state(), self.tx.state()]
    }

    /// Serves `rx` and `tx` in `mem`; `mrg_rxbuf` is whether the driver accepted
    /// VIRTIO_NET_F_MRG_RXBUF.
    pub fn new(
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
        mrg_rxbuf: bool,
        metrics: Arc<NetMetrics>,
    ) -> Self {
        Self {
            mem,
            rx,
            tx,
            interrupt,
            mrg_rxbuf,
            metrics,
            // One byte more than the largest frame, to notice frames that are too big.
            rx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN + 1],
            rx_pending: 0,
            tx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
        }
    }

    /// Sends every frame the guest queued for transmission to `backend`, as far as `throttle`
    /// lets it (transmit is its first kind).
    pub fn process_tx(&mut self, backend: &mut dyn NetBackend, throttle: &mut Throttle) {
        let irq = irq(&*self.interrupt, &self.metrics);
        let (m, frame_buf) = (&*self.metrics, &mut self.tx_frame);
        let throttle = std::cell::RefCell::new(throttle);
        let stop = || {
            let blocked = throttle.borrow_mut().blocked(Kind::First);
            if blocked {
                m.tx_throttled.inc();
            }
            blocked
        };
        let unreturned = drain_queue_until(&mut self.tx, &self.mem, irq, stop, |chain| {
            let Some(len) = read_tx_frame(&self.mem, chain, frame_buf) else {
                m.tx_dropped.inc();
                return;
            };
            let (hdr, frame) = frame_buf[..len].split_at(VNET_HDR_LEN);
            throttle
                .borrow_mut()
                .charge(Kind::First, frame.len() as u64);
            match backend.send(hdr, frame) {
                Ok(()) => {
                    m.tx_frames.inc();
                    m.tx_bytes.add(frame.len() as u64);
                }
                Err(e) => {
                    log::debug!("virtio-net: backend send failed: {e}");
                    m.tx_backend_errors.inc();
                }
            }
        });
        m.tx_dropped.add(unreturned);
    }

    /// Moves frames from `backend` into the guest's receive buffers until one side runs dry or
    /// `throttle` holds receiving back (receive is its second kind).
    pub fn process_rx(&mut self, backend: &mut dyn NetBackend, throttle: &mut Throttle) -> RxStop {
        let m = Arc::clone(&self.metrics);
        let mut delivered = false;
        let stop = loop {
            if self.rx_pending == 0 {
                if throttle.blocked(Kind::Second) {
                    m.rx_throttled.inc();
                    break RxStop::Throttled;
                }
                match backend.recv(&mut self.rx_frame) {
                    Ok(n)
                        if !(VNET_HDR_LEN + MIN_FRAME_LEN..=VNET_HDR_LEN + MAX_FRAME_LEN)
                            .contains(&n) =>
                    {
                        m.rx_dropped.inc();
                        continue;
                    }
                    Ok(n) => self.rx_pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxStop::Drained,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        crate::warn_limited!(
                            "virtio-net: backend receive failed, stopping receive: {e}"
                        );
                        m.rx_backend_errors.inc();
                        break RxStop::BackendFailed;
                    }
                }
            }
            let len = self.rx_pending;
            let outcome = if self.mrg_rxbuf {
                self.deliver_merged(len)
            } else {
                self.deliver_single(len)
            };
            match outcome {
                Deliver::Done => {
                    m.rx_frames.inc();
                    m.rx_bytes.add((len - VNET_HDR_LEN) as u64);
                    throttle.charge(Kind::Second, (len - VNET_HDR_LEN) as u64);
                    self.rx_pending = 0;
                    delivered = true;
                }
                Deliver::Dropped => {
                    m.rx_dropped.inc();
                    self.rx_pending = 0;
                    delivered = true;
                }
                Deliver::NoBuffers => {
                    m.rx_no_buffers.inc();
                    break RxStop::NoBuffers;
                }
            }
        };
        if delivered {
            notify_guest(&mut self.rx, &self.mem, irq(&*self.interrupt, &m));
        }
        stop
    }

    /// Whether a received frame is waiting for guest buffers.
    pub fn rx_pending(&self) -> bool {
        self.rx_pending != 0
    }

    /// Returns a chain the device cannot use to the guest, empty.
    fn give_back(&mut self, head: u16) {
        self.metrics.rx_bad_buffers.inc();
        let _ = self.rx.add_used(&self.mem, head, 0);
    }

    /// Without MRG_RXBUF the frame must fit one chain.
    fn deliver_single(&mut self, len: usize) -> Deliver {
        loop {
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                return Deliver::NoBuffers;
            };
            let head = chain.head_index();
            let mut writer: Writer<'_> = match chain.writer(&self.mem) {
                Ok(w) if w.available_bytes() >= VNET_HDR_LEN => w,
                _ => {
                    self.give_back(head);
                    continue;
                }
            };
            if writer.available_bytes() < len {
                let _ = self.rx.add_used(&self.mem, head, 0);
                return Deliver::Dropped;
            }
            self.rx_frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            let written = match writer.write_all(&self.rx_frame[..len]) {
                Ok(()) => u32::try_from(len).unwrap_or(0),
                Err(_) => 0,
            };
            let _ = self.rx.add_used(&self.mem, head, written);
            return if written == 0 {
                Deliver::Dropped
            } else {
                Deliver::Done
            };
        }
    }

    /// With MRG_RXBUF the frame spreads over as many chains as it needs; `num_buffers` says how
    /// many. If the guest has not offered enough, nothing is consumed.
    fn deliver_merged(&mut self, len: usize) -> Deliver {
        let start = self.rx.next_avail();
        let mut bufs: Vec<(u16, Writer<'_>)> = Vec::new();
        let mut capacity = 0usize;
        let mut bad = Vec::new();
        while capacity < len {
            if bufs.len() >= usize::from(self.rx.size()) {
                break;
            }
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            let min = if bufs.is_empty() { VNET_HDR_LEN } else { 1 };
            match chain.writer(&self.mem) {
                Ok(w) if w.available_bytes() >= min => {
                    capacity = capacity.saturating_add(w.available_bytes());
                    bufs.push((head, w));
                }
                _ => bad.push(head),
            }
        }
        if capacity < len && bufs.len() < usize::from(self.rx.size()) && bad.is_empty() {
            // Wait for the guest to offer more buffers; consume nothing.
            drop(bufs);
            self.rx.set_next_avail(start);
            return Deliver::NoBuffers;
        }
        let heads: Vec<u16> = bufs.iter().map(|(h, _)| *h).collect();
        let mut written = Vec::with_capacity(bufs.len());
        let ok = capacity >= len;
        if ok {
            let count = u16::try_from(bufs.len()).unwrap_or(u16::MAX);
            self.rx_frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&count.to_le_bytes());
            let mut off = 0;
            for (_, w) in bufs.iter_mut() {
                let n = w.available_bytes().min(len - off);
                let res = w.write_all(&self.rx_frame[off..off + n]);
                written.push(if res.is_ok() { n } else { 0 });
                off += n;
            }
        }
        drop(bufs);
        for head in bad {
            self.give_back(head);
        }
        for (i, head) in heads.into_iter().enumerate() {
            let n = written.get(i).copied().unwrap_or(0);
            let _ = self
                .rx
                .add_used(&self.mem, head, u32::try_from(n).unwrap_or(0));
        }
        if ok && !written.contains(&0) {
            Deliver::Done
        } else {
            Deliver::Dropped
        }
    }
}

/// How the device interrupts the guest, counted in `interrupts`.
fn irq<'a>(interrupt: &'a dyn VirtioInterrupt, metrics: &'a NetMetrics) -> QueueIrq<'a> {
    QueueIrq {
        interrupt,
        counter: Some(&metrics.interrupts),
        device: NAME,
    }
}

/// Gathers a transmit chain (header + frame) into `buf`; `None` if the chain is unusable.
fn read_tx_frame(mem: &GuestMemoryMmap, chain: Chain<'_>, buf: &mut [u8]) -> Option<usize> {
    let mut reader = chain.reader(mem).ok()?;
    let len = reader.available_bytes();
    if len < VNET_HDR_LEN + MIN_FRAME_LEN || len > buf.len() {
        return None;
    }
    reader.read_exact(&mut buf[..len]).ok()?;
    Some(len)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use virtio_queue::desc::split::Descriptor;

    use super::*;
    use crate::virtio::metrics::DeviceMetrics;
    use crate::virtio::net::backend::tests::PairBackend;
    use crate::virtio::testing::{
        guest_memory, interrupt, read_mem, write_mem, Desc, GuestQueue, TestInterrupt, DATA_START,
        MEM_SIZE,
    };

    struct Rig<'a> {
        mem: &'a GuestMemoryMmap,
        rxq: GuestQueue<'a>,
        txq: GuestQueue<'a>,
        queues: NetQueues,
        backend: PairBackend,
        peer: UnixDatagram,
        irq: Arc<TestInterrupt>,
        metrics: Arc<NetMetrics>,
        throttle: Throttle,
    }

    fn unlimited() -> Throttle {
        Throttle::new(Default::default(), Default::default()).unwrap()
    }

    fn rig(mem: &GuestMemoryMmap, mrg: bool) -> Rig<'_> {
        let rxq = GuestQueue::new(mem, 0, 16);
        let txq = GuestQueue::new(mem, 0x1_0000, 16);
        let irq = interrupt();
        let metrics = Arc::new(NetMetrics::default());
        let queues = NetQueues::new(
            mem.clone(),
            rxq.queue(),
            txq.queue(),
            irq.clone(),
            mrg,
            metrics.clone(),
        );
        let (backend, peer) = PairBackend::new();
        Rig {
            mem,
            rxq,
            txq,
            queues,
            backend,
            peer,
            irq,
            metrics,
            throttle: unlimited(),
        }
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn tx_frame_with_split_header_reaches_backend() {
        let mem = guest_memory();
        let mut r = rig(&mem, true);
        let f = frame(100);
        let mut pkt = vec![0u8; VNET_HDR_LEN];
        pkt[0] = 1; // flags survive to the backend
        pkt.extend_from_slice(&f);
        write_mem(r.mem, DATA_START, &pkt);
        // Header split over two descriptors, frame over two more.
        r.txq.add(&[
            Desc::r(DATA_START, 5),
            Desc::r(DATA_START + 5, 7),
            Desc::r(DATA_START + 12, 50),
            Desc::r(DATA_START + 62, 50),
        ]);
        r.queues.process_tx(&mut r.backend, &mut r.throttle);
        let mut buf = vec![0u8; 4096];
        let n = r.peer.recv(&mut buf).expect("frame on backend");
        assert_eq!(&buf[..n], &pkt[..]);
        assert_eq!(r.txq.take_used(), vec![(0, 0)]);
        assert_eq!(r.metrics.tx_frames.get(), 1);
        assert_eq!(r.metrics.tx_bytes.get(), 100);
        assert_eq!(r.irq.queue_count(), 1);
    }

    #[test]
    fn tx_hostile_chains_are_dropped_and_counted() {
        let mem = guest_memory();
        let mut r = rig(&mem, true);
        let size = MEM_SIZE as u64;
        let hostile: Vec<Vec<Desc>> = vec![
            vec![Desc::r(size - 10, 100)],        // runs past the end of memory
            vec![Desc::r(u64::MAX - 5, 64)],      // address wraps
            vec![Desc::w(DATA_START, 100)],       // writable where readable is required
            vec![Desc::r(DATA_START, 0)],         // zero length
            vec![Desc::r(DATA_START, 20)],        // shorter than header + Ethernet header
            vec![Desc::r(DATA_START, 0x10_0000)], // larger than the largest frame
            vec![Desc::r(DATA_START, u32::MAX)],  // huge
        ];
        for chain in &hostile {
            r.txq.add(chain);
        }
        r.queues.process_tx(&mut r.backend, &mut r.throttle);
        assert_eq!(r.txq.take_used().len(), hostile.len());
        assert_eq!(r.metrics.tx_dropped.get(), hostile.len() as u64);
        let mut buf = [0u8; 64];
        assert!(r.peer.set_nonblocking(true).is_ok());
        assert!(
            r.peer.recv(&mut buf).is_err(),
            "nothing reaches the backend"
        );

        // A descriptor that chains to itself: the chain ends after queue-size descriptors.
        write_mem(r.mem, DATA_START, &[0u8; 64]);
        r.txq.write_raw(15, Descriptor::new(DATA_START, 64, 1, 15));
        r.txq.publish(15);
        r.queues.process_tx(&mut r.backend, &mut r.throttle);
        assert_eq!(r.txq.take_used().len(), 1);
        let n = r
            .peer
            .recv(&mut vec![0u8; 4096])
            .expect("bounded loop frame");
        assert_eq!(n, 16 * 64, "the loop stops after queue-size descriptors");

        // The queue still works afterwards.
        let mut pkt = vec![0u8; VNET_HDR_LEN];
        pkt.extend_from_slice(&frame(60));
        write_mem(r.mem, DATA_START, &pkt);
        r.txq.add(&[Desc::r(DATA_START, pkt.len() as u32)]);
        r.queues.process_tx(&mut r.backend, &mut r.throttle);
        let n = r
            .peer
            .recv(&mut vec![0u8; 4096])
            .expect("valid frame after hostile ones");
        assert_eq!(n, pkt.len());
    }

    fn send_from_host(peer: &UnixDatagram, f: &[u8]) -> Vec<u8> {
        let mut pkt = vec![0u8; VNET_HDR_LEN];
        pkt.extend_from_slice(f);
        peer.send(&pkt).expect("host send");
        pkt
    }

    #[test]
    fn rx_frame_spreads_over_merged_buffers_with_num_buffers() {
        let mem = guest_memory();
        let mut r = rig(&mem, true);
        let f = frame(3000);
        send_from_host(&r.peer, &f);
        for i in 0..3 {
            r.rxq.add(&[Desc::w(DATA_START + i * 0x1000, 1500)]);
        }
        assert_eq!(
            r.queues.process_rx(&mut r.backend, &mut r.throttle),
            RxStop::Drained
        );
        let used = r.rxq.take_used();
        assert_eq!(used, vec![(0, 1500), (1, 1500), (2, 12)]);
        let hdr = read_mem(r.mem, DATA_START, VNET_HDR_LEN);
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 3, "num_buffers");
        let mut got = read_mem(r.mem, DATA_START + VNET_HDR_LEN as u64, 1500 - VNET_HDR_LEN);
        got.extend(read_mem(r.mem, DATA_START + 0x1000, 1500));
        got.extend(read_mem(r.mem, DATA_START + 0x2000, 12));
        assert_eq!(got, f);
        assert_eq!(r.metrics.rx_frames.get(), 1);
        assert_eq!(r.irq.queue_count(), 1);
    }

    #[test]
    fn rx_waits_for_buffers_without_consuming_any() {
        let mem = guest_memory();
        let mut r = rig(&mem, true);
        send_from_host(&r.peer, &frame(3000));
        r.rxq.add(&[Desc::w(DATA_START, 1500)]);
        assert_eq!(
            r.queues.process_rx(&mut r.backend, &mut r.throttle),
            RxStop::NoBuffers
        );
        assert!(r.queues.rx_pending());
        assert!(
            r.rxq.take_used().is_empty(),
            "no partial frame is handed over"
        );
        r.rxq.add(&[Desc::w(DATA_START + 0x1000, 1500)]);
        r.rxq.add(&[Desc::w(DATA_START + 0x2000, 1500)]);
        assert_eq!(
            r.queues.process_rx(&mut r.backend, &mut r.throttle),
            RxStop::Drained
        );
        assert_eq!(r.rxq.take_used().len(), 3);
        assert_eq!(r.metrics.rx_frames.get(), 1);
    }

    #[test]
    fn rx_hostile_buffers_are_returned_empty_and_frame_uses_good_one() {
        let mem = guest_memory();
        let mut r = rig(&mem, true);
        let f = frame(200);
        send_from_host(&r.peer, &f);
        let size = MEM_SIZE as u64;
        r.rxq.add(&[Desc::r(DATA_START, 1500)]); // readable where writable is required
        r.rxq.add(&[Desc::w(size - 8, 1500)]); // outside guest memory
        r.rxq.add(&[Desc::w(DATA_START, 4)]); // too small for the header
        r.rxq.add(&[Desc::w(DATA_START + 0x4000, 1500)]);
        assert_eq!(
            r.queues.process_rx(&mut r.backend, &mut r.throttle),
            RxStop::Drained
        );
        let used = r.rxq.take_used();
        assert_eq!(used, vec![(0, 0), (1, 0), (2, 0), (3, 212)]);
        assert_eq!(r.metrics.rx_bad_buffers.get(), 3);
        assert_eq!(read_mem(r.mem, DATA_START + 0x4000 + 12, 200), f);
    }

    #[test]
    fn rx_without_mrg_drops_frames_larger_than_the_buffer() {
        let mem = guest_memory();
        let mut r = rig(&mem, false);
        send_from_host(&r.peer, &frame(2000));
        let small = send_from_host(&r.peer, &frame(100));
        r.rxq.add(&[Desc::w(DATA_START, 1500)]);
        r.rxq.add(&[Desc::w(DATA_START + 0x1000, 1500)]);
        assert_eq!(
            r.queues.process_rx(&mut r.backend, &mut r.throttle),
            RxStop::Drained
        );
        assert_eq!(r.rxq.take_used(), vec![(0, 0), (1, 112)]);
        let mut got = read_mem(r.mem, DATA_START + 0x1000, 112);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        got[10] = 0;
        assert_eq!(got, small);
        assert_eq!(r.metrics.rx_dropped.get(), 1);
    }

    #[test]
    fn rx_frames_over_the_maximum_are_dropped() {
        let mem = guest_memory();
        let mut r = rig(&mem, true);
        send_from_host(&r.peer, &frame(MAX_FRAME_LEN + 10));
        send_from_host(&r.peer, &frame(5)); // runt
        for i in 0..16 {
            r.rxq.add(&[Desc::w(DATA_START + i * 0x1_0000, 0x1_0000)]);
        }
        assert_eq!(
            r.queues.process_rx(&mut r.backend, &mut r.throttle),
            RxStop::Drained
        );
        let used = r.rxq.take_used();
        assert!(used.is_empty(), "{used:?} {}", r.metrics.to_json());
        assert_eq!(r.metrics.rx_dropped.get(), 2);
    }

    #[test]
    fn a_throttled_queue_sends_what_its_limit_allows_and_the_rest_waits() {
        let mem = guest_memory();
        let mut r = rig(&mem, true);
        // 10 packets per second: the bucket holds one; a second takes it into debt.
        let limit = crate::virtio::rate_limiter::Limit {
            bytes_per_sec: None,
            ops_per_sec: Some(10),
        };
        r.throttle = Throttle::new(limit, limit).unwrap();
        let mut pkt = vec![0u8; VNET_HDR_LEN];
        pkt.extend_from_slice(&frame(60));
        for i in 0..6u64 {
            let at = DATA_START + i * 0x100;
            write_mem(&mem, at, &pkt);
            r.txq.add(&[Desc::r(at, pkt.len() as u32)]);
        }
        r.queues.process_tx(&mut r.backend, &mut r.throttle);
        assert_eq!(r.metrics.tx_frames.get(), 2);
        assert!(r.throttle.waiting(), "the timer resumes the queue");
        assert_eq!(r.metrics.tx_throttled.get(), 1);
        // Once the debt is paid (100 ms) and the bucket refilled (100 ms more), two more go.
        std::thread::sleep(std::time::Duration::from_millis(250));
        r.queues.process_tx(&mut r.backend, &mut r.throttle);
        assert_eq!(r.metrics.tx_frames.get(), 4);
    }
}
