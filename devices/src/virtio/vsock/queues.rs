//! virtio-vsock queue processing, independent of the event loop: guest packets from the TX
//! queue go to the [`Muxer`]; packets the muxer has for the guest fill the RX queue.
//!
//! Every chain comes from the guest and is treated as hostile: chains that point outside guest
//! memory, lack the right kind of descriptor, are too short for the header or claim a payload
//! they do not carry are dropped (TX) or returned empty (RX) and counted.
//!
//! Backpressure: while the muxer holds [`super::RX_BACKLOG_PAUSE`] control packets the guest has
//! not received, TX chains stay in the ring ([`VsockQueues::tx_paused`]); serving RX resumes them.

use std::io::{Read, Write};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::packet::{VsockHeader, HDR_LEN};
use super::{Muxer, VsockMetrics, MAX_PKT_DATA, NAME};
use crate::virtio::chains::{notify_guest, QueueIrq};
use crate::virtio::VirtioInterrupt;

/// `virtio_vsock_event.id` of a transport reset.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// The queues of an activated vsock device.
#[derive(Debug)]
pub struct VsockQueues {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    /// The event queue: the device sends one event, a transport reset after a restore.
    event: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<VsockMetrics>,
    buf: Vec<u8>,
    /// TX stopped because the guest does not take its packets; chains may wait in the ring.
    tx_paused: bool,
}

impl VsockQueues {
    /// Serves `rx`, `tx` and `event` in `mem`.
    pub fn new(
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        event: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
        metrics: Arc<VsockMetrics>,
    ) -> Self {
        Self {
            mem,
            rx,
            tx,
            event,
            interrupt,
            metrics,
            buf: vec![0; MAX_PKT_DATA],
            tx_paused: false,
        }
    }

    /// The receive, transmit and event queues' state (for a snapshot).
    pub fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        vec![self.rx.state(), self.tx.state(), self.event.state()]
    }

    /// Tells the driver that every connection is gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, in
    /// a buffer of the event queue): after a restore the host side of each is closed. The
    /// driver then also reads the guest CID again. Returns false when the driver left no
    /// buffer for the event.
    pub fn send_transport_reset(&mut self) -> bool {
        let Some(chain) = self.event.pop_descriptor_chain(&self.mem) else {
            return false;
        };
        let head = chain.head_index();
        let written = chain
            .writer(&self.mem)
            .ok()
            .filter(|w| w.available_bytes() >= 4)
            .and_then(|mut w| w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).ok())
            .is_some();
        let len = if written { 4 } else { 0 };
        let _ = self.event.add_used(&self.mem, head, len);
        notify_guest(&mut self.event, &self.mem, irq(&*self.interrupt));
        written
    }

    /// Whether TX processing stopped for backpressure and should resume once the guest has
    /// taken packets (see [`Muxer::accepts_guest_packets`]).
    pub fn tx_paused(&self) -> bool {
        self.tx_paused
    }

    /// Hands the packets the guest queued to the muxer, as long as it takes them.
    pub fn process_tx(&mut self, muxer: &mut Muxer) {
        let (mem, buf, m) = (&self.mem, &mut self.buf, &*self.metrics);
        let mut taken = false;
        self.tx_paused = false;
        loop {
            if !muxer.accepts_guest_packets() {
                self.tx_paused = true;
                m.tx_paused.inc();
                break;
            }
            let Some(chain) = self.tx.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let pkt = chain.reader(mem).ok().and_then(|mut r| {
                let mut hdr = [0u8; HDR_LEN];
                r.read_exact(&mut hdr).ok()?;
                let hdr = VsockHeader::from_bytes(&hdr);
                let len = usize::try_from(hdr.len).ok()?;
                if len > MAX_PKT_DATA || len > r.available_bytes() {
                    return None;
                }
                r.read_exact(&mut buf[..len]).ok()?;
                Some((hdr, len))
            });
            match pkt {
                Some((hdr, len)) => {
                    m.tx_packets.inc();
                    muxer.send_pkt(&hdr, &buf[..len]);
                }
                None => m.bad_packets.inc(),
            }
            // A head index the ring cannot hold is the guest's loss; nothing to return.
            let _ = self.tx.add_used(mem, head, 0);
            taken = true;
        }
        if taken {
            notify_guest(&mut self.tx, mem, irq(&*self.interrupt));
        }
    }

    /// Moves the muxer's packets into the guest's receive buffers. Returns true if packets
    /// are left because the guest has no buffers.
    pub fn process_rx(&mut self, muxer: &mut Muxer) -> bool {
        let mut used = false;
        let mut starved = false;
        while muxer.has_pending_rx() {
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                starved = true;
                break;
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(&self.mem) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                _ => {
                    self.metrics.bad_buffers.inc();
                    let _ = self.rx.add_used(&self.mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let cap = (writer.available_bytes() - HDR_LEN).min(MAX_PKT_DATA);
            let Some((hdr, n)) = muxer.recv_pkt(&mut self.buf[..cap]) else {
                // Nothing after all: give the buffer back to the ring untouched.
                self.rx.set_next_avail(self.rx.next_avail().wrapping_sub(1));
                break;
            };
            let ok = writer.write_all(&hdr.to_bytes()).is_ok()
                && writer.write_all(&self.buf[..n]).is_ok();
            let len = if ok { HDR_LEN + n } else { 0 };
            if ok {
                self.metrics.rx_packets.inc();
                self.metrics.rx_bytes.add(n as u64);
            } else {
                self.metrics.bad_buffers.inc();
            }
            let _ = self
                .rx
                .add_used(&self.mem, head, u32::try_from(len).unwrap_or(0));
            used = true;
        }
        if used {
            notify_guest(&mut self.rx, &self.mem, irq(&*self.interrupt));
        }
        starved
    }
}

/// How the device interrupts the guest (vsock counts no interrupts).
fn irq(interrupt: &dyn VirtioInterrupt) -> QueueIrq<'_> {
    QueueIrq {
        interrupt,
        counter: None,
        device: NAME,
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    use super::*;
    use crate::virtio::testing::{
        guest_memory, interrupt, read_mem, write_mem, Desc, GuestQueue, TestInterrupt, DATA_START,
        MEM_SIZE,
    };
    use crate::virtio::vsock::muxer::listener_path;
    use crate::virtio::vsock::packet::{op, TYPE_STREAM};
    use crate::virtio::vsock::{HOST_CID, RX_BACKLOG_PAUSE};

    struct Rig<'a> {
        mem: &'a GuestMemoryMmap,
        rxq: GuestQueue<'a>,
        txq: GuestQueue<'a>,
        q: VsockQueues,
        muxer: Muxer,
        metrics: Arc<VsockMetrics>,
        irq: Arc<TestInterrupt>,
        path: PathBuf,
        _dir: tempfile::TempDir,
    }

    fn rig(mem: &GuestMemoryMmap) -> Rig<'_> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = Muxer::new(&path, 3, metrics.clone()).expect("muxer");
        let rxq = GuestQueue::new(mem, 0, 16);
        let txq = GuestQueue::new(mem, 0x1_0000, 16);
        let evq = GuestQueue::new(mem, 0x2_0000, 16);
        let irq = interrupt();
        let q = VsockQueues::new(
            mem.clone(),
            rxq.queue(),
            txq.queue(),
            evq.queue(),
            irq.clone(),
            metrics.clone(),
        );
        Rig {
            mem,
            rxq,
            txq,
            q,
            muxer,
            metrics,
            irq,
            path,
            _dir: dir,
        }
    }

    fn request(src_port: u32, dst_port: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op: op::REQUEST,
            buf_alloc: 4096,
            ..VsockHeader::default()
        }
    }

    #[test]
    fn header_split_across_descriptors_is_understood() {
        let mem = guest_memory();
        let mut r = rig(&mem);
        let b = request(1000, 77).to_bytes();
        write_mem(r.mem, DATA_START, &b);
        r.txq.add(&[
            Desc::r(DATA_START, 10),
            Desc::r(DATA_START + 10, 30),
            Desc::r(DATA_START + 40, 4),
        ]);
        r.q.process_tx(&mut r.muxer);
        assert_eq!(r.txq.take_used(), vec![(0, 0)]);
        // No listener on port 77: the guest gets RST in its receive buffer.
        r.rxq.add(&[Desc::w(DATA_START + 0x1000, 4096)]);
        assert!(!r.q.process_rx(&mut r.muxer));
        assert_eq!(r.rxq.take_used(), vec![(0, HDR_LEN as u32)]);
        let mut hdr = [0u8; HDR_LEN];
        hdr.copy_from_slice(&read_mem(r.mem, DATA_START + 0x1000, HDR_LEN));
        let h = VsockHeader::from_bytes(&hdr);
        assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 77, 1000));
        assert!(r.irq.queue_count() >= 2);
    }

    #[test]
    fn hostile_tx_chains_are_dropped_and_counted() {
        let mem = guest_memory();
        let mut r = rig(&mem);
        let _l = UnixListener::bind(listener_path(&r.path, 80)).expect("listen");
        let size = MEM_SIZE as u64;
        let mut claims_more = request(1, 80);
        claims_more.len = 100; // but carries no payload
        write_mem(r.mem, DATA_START, &claims_more.to_bytes());
        let mut huge = request(2, 80);
        huge.len = u32::MAX;
        write_mem(r.mem, DATA_START + 0x1000, &huge.to_bytes());
        let chains: Vec<Vec<Desc>> = vec![
            vec![Desc::r(size - 20, 44)],                  // past the end of memory
            vec![Desc::r(u64::MAX - 10, 44)],              // wraps
            vec![Desc::w(DATA_START, 44)],                 // writable where readable is required
            vec![Desc::r(DATA_START, 0)],                  // empty
            vec![Desc::r(DATA_START, 43)],                 // header cut short
            vec![Desc::r(DATA_START, 44)],                 // payload claimed, missing
            vec![Desc::r(DATA_START + 0x1000, 0x10_0000)], // absurd length field
        ];
        for c in &chains {
            r.txq.add(c);
        }
        r.q.process_tx(&mut r.muxer);
        assert_eq!(r.txq.take_used().len(), chains.len());
        assert_eq!(r.metrics.bad_packets.get(), chains.len() as u64);
        assert!(!r.muxer.has_pending_rx(), "no connection was opened");
        assert_eq!(r.muxer.connection_count(), 0);
    }

    /// Reads the packet the device wrote into the used RX buffer with head `id`.
    fn rx_packet(r: &Rig<'_>, id: u32) -> (VsockHeader, Vec<u8>) {
        let addr = r.rxq.desc_addr(id as u16);
        let mut hdr = [0u8; HDR_LEN];
        hdr.copy_from_slice(&read_mem(r.mem, addr, HDR_LEN));
        let h = VsockHeader::from_bytes(&hdr);
        let data = read_mem(r.mem, addr + HDR_LEN as u64, h.len as usize);
        (h, data)
    }

    #[test]
    fn a_guest_that_sends_without_receiving_is_held_back_and_data_still_flows() {
        use std::io::Write as _;
        let mem = guest_memory();
        let mut r = rig(&mem);
        let listener = UnixListener::bind(listener_path(&r.path, 80)).expect("listen");
        write_mem(r.mem, DATA_START, &request(7, 80).to_bytes());
        r.txq.add(&[Desc::r(DATA_START, 44)]);
        r.q.process_tx(&mut r.muxer);
        let (mut host, _) = listener.accept().expect("accept");
        // Every CREDIT_REQUEST is answered with a CREDIT_UPDATE the guest never receives: it
        // gives no receive buffers and keeps its transmit ring full.
        let mut ask = request(7, 80);
        ask.op = op::CREDIT_REQUEST;
        write_mem(r.mem, DATA_START + 0x1000, &ask.to_bytes());
        let (mut added, mut used) = (1usize, 0usize);
        for _ in 0..1000 {
            while added - used < 16 {
                r.txq.add(&[Desc::r(DATA_START + 0x1000, 44)]);
                added += 1;
            }
            r.q.process_tx(&mut r.muxer);
            used += r.txq.take_used().len();
            if r.q.tx_paused() {
                break;
            }
        }
        assert!(r.q.tx_paused(), "TX never paused");
        assert_eq!(r.muxer.rx_backlog(), RX_BACKLOG_PAUSE);
        assert!(r.muxer.queued_bytes() <= RX_BACKLOG_PAUSE * 64);
        // More guest packets wait in the ring until it receives.
        while added - used < 16 {
            r.txq.add(&[Desc::r(DATA_START + 0x1000, 44)]);
            added += 1;
        }
        r.q.process_tx(&mut r.muxer);
        assert!(r.txq.take_used().is_empty(), "taken while paused");
        assert_eq!(r.muxer.rx_backlog(), RX_BACKLOG_PAUSE);
        assert!(r.metrics.tx_paused.get() >= 2);

        // Host data for the guest still flows once it gives buffers, and the held-back packets
        // are then taken (as the event loop does after serving RX).
        host.write_all(b"still flowing").expect("host write");
        std::thread::sleep(std::time::Duration::from_millis(20));
        r.muxer.process_host_events();
        let mut seen_data = false;
        for _ in 0..1000 {
            for i in 0..16 {
                r.rxq
                    .add(&[Desc::w(DATA_START + 0x10_000 + i * 0x1000, 4096)]);
            }
            r.q.process_rx(&mut r.muxer);
            while r.q.tx_paused() && r.muxer.accepts_guest_packets() {
                r.q.process_tx(&mut r.muxer);
                r.q.process_rx(&mut r.muxer);
            }
            used += r.txq.take_used().len();
            for (id, _) in r.rxq.take_used() {
                let (h, data) = rx_packet(&r, id);
                if h.op == op::RW {
                    assert_eq!(data, b"still flowing");
                    seen_data = true;
                }
            }
            assert!(r.muxer.rx_backlog() <= RX_BACKLOG_PAUSE + 1);
            if seen_data && used == added && !r.muxer.has_pending_rx() {
                break;
            }
        }
        assert!(seen_data, "host data never reached the guest");
        assert_eq!(used, added, "every held-back packet was taken in the end");
        assert!(!r.q.tx_paused());
    }

    #[test]
    fn unusable_rx_buffers_are_returned_empty() {
        let mem = guest_memory();
        let mut r = rig(&mem);
        write_mem(r.mem, DATA_START, &request(5, 6).to_bytes());
        r.txq.add(&[Desc::r(DATA_START, 44)]);
        r.q.process_tx(&mut r.muxer);
        let size = MEM_SIZE as u64;
        r.rxq.add(&[Desc::r(DATA_START + 0x1000, 4096)]); // readable only
        r.rxq.add(&[Desc::w(size - 8, 4096)]); // outside memory
        r.rxq.add(&[Desc::w(DATA_START + 0x1000, 20)]); // smaller than a header
        assert!(
            r.q.process_rx(&mut r.muxer),
            "RST still waits for a usable buffer"
        );
        assert_eq!(r.rxq.take_used(), vec![(0, 0), (1, 0), (2, 0)]);
        assert_eq!(r.metrics.bad_buffers.get(), 3);
        r.rxq.add(&[Desc::w(DATA_START + 0x2000, 44)]);
        assert!(!r.q.process_rx(&mut r.muxer));
        assert_eq!(r.rxq.take_used(), vec![(3, 44)]);
    }
}
