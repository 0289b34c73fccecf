//! Event-loop glue for virtio-vsock: which fds to watch and what to run when they fire.
//!
//! The device sits in the event loop as `Arc<Mutex<Vsock>>`. The muxer's epoll fd (all host
//! sockets) is watched from the start, so host programs can connect before the guest driver is
//! up; the queue eventfds are (re)registered by the shared glue (`virtio/glue.rs`) when the
//! driver activates or resets the device.

use event_manager::{EventOps, EventSet, Events};

use super::{Vsock, EVT_INDEX, NAME, RX_INDEX, TX_INDEX};
use crate::virtio::glue::{event_subscriber, DeviceEvents, EventDevice};

impl Vsock {
    fn run_tx(&mut self) {
        if let Some(queues) = self.active.as_mut() {
            queues.process_tx(&mut self.muxer);
        }
    }

    /// Fills the guest's receive buffers; where that made room, takes the packets TX held back
    /// (backpressure), and so on while both move.
    fn run_rx(&mut self) {
        if self.reset_pending {
            return;
        }
        if let Some(queues) = self.active.as_mut() {
            queues.process_rx(&mut self.muxer);
            while queues.tx_paused() && self.muxer.accepts_guest_packets() {
                queues.process_tx(&mut self.muxer);
                queues.process_rx(&mut self.muxer);
            }
        }
    }
}

impl EventDevice for Vsock {
    const NAME: &'static str = NAME;

    fn device_events(&mut self) -> &mut DeviceEvents {
        &mut self.events
    }

    fn init_other(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.muxer.epoll_fd(), EventSet::IN)) {
            log::error!("{NAME}: cannot register with the event loop: {e:?}");
        }
    }

    fn on_activation(&mut self, _ops: &mut EventOps) {
        self.run_tx();
        self.run_rx();
    }

    fn on_queue(&mut self, index: usize, _ops: &mut EventOps) {
        match index {
            RX_INDEX => self.run_rx(),
            TX_INDEX => {
                self.run_tx();
                self.run_rx();
            }
            // The driver gave an event buffer back: it has handled the transport reset.
            EVT_INDEX => {
                self.reset_pending = false;
                self.run_rx();
            }
            _ => {}
        }
    }

    fn on_other(&mut self, events: &Events, _ops: &mut EventOps) -> bool {
        if events.fd() != self.muxer.epoll_fd() {
            return false;
        }
        self.muxer.process_host_events();
        self.run_rx();
        true
    }
}

event_subscriber!(Vsock);

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Duration;

    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::virtio::testing::{guest_memory, GuestDriver};
    use crate::virtio::vsock::muxer::listener_path;
    use crate::virtio::vsock::packet::{op, VsockHeader, HDR_LEN, TYPE_STREAM};
    use crate::virtio::vsock::HOST_CID;

    const CID: u64 = 42;
    const BUF_LEN: u32 = 4096;

    /// Plays the guest's vsock driver over the queues, with the device in a real event loop.
    struct Guest<'a>(GuestDriver<'a, Vsock>);

    impl<'a> Guest<'a> {
        fn start(mem: &'a GuestMemoryMmap, dev: Vsock) -> Self {
            Self::start_with(mem, dev, 16)
        }

        fn start_with(mem: &'a GuestMemoryMmap, dev: Vsock, rx_buffers: u64) -> Self {
            Self(GuestDriver::start(mem, dev, u64::MAX, rx_buffers, BUF_LEN))
        }

        fn send(&mut self, op: u16, src_port: u32, dst_port: u32, data: &[u8], fwd_cnt: u32) {
            let hdr = VsockHeader {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: data.len() as u32,
                type_: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 64 * 1024,
                fwd_cnt,
            };
            // Header and payload in separate descriptors, as Linux does.
            self.0.send(&[&hdr.to_bytes(), data]);
        }

        fn recv(&mut self) -> (VsockHeader, Vec<u8>) {
            let pkt = self.0.recv();
            let mut h = [0u8; HDR_LEN];
            h.copy_from_slice(&pkt[..HDR_LEN]);
            (VsockHeader::from_bytes(&h), pkt[HDR_LEN..].to_vec())
        }
    }

    fn device(dir: &tempfile::TempDir) -> Vsock {
        Vsock::new(&dir.path().join("vm.sock"), CID).expect("vsock")
    }

    #[test]
    fn host_connect_reaches_guest_listener_through_the_queues() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = device(&dir);
        let path = dev.socket_path().to_path_buf();
        let metrics = dev.metrics();
        let mem = guest_memory();
        let mut guest = Guest::start(&mem, dev);

        let mut host = UnixStream::connect(&path).expect("host connects");
        host.write_all(b"CONNECT 1024\n").expect("write");
        let (req, _) = guest.recv();
        assert_eq!(
            (req.op, req.dst_cid, req.dst_port, req.src_cid),
            (op::REQUEST, CID, 1024, 2)
        );
        guest.send(op::RESPONSE, 1024, req.src_port, &[], 0);
        let mut line = String::new();
        host.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        BufReader::new(&host).read_line(&mut line).expect("OK line");
        assert_eq!(line, format!("OK {}\n", req.src_port));

        host.write_all(b"ping from host").expect("write");
        let (h, data) = guest.recv();
        assert_eq!((h.op, data.as_slice()), (op::RW, &b"ping from host"[..]));
        guest.send(
            op::RW,
            1024,
            req.src_port,
            b"pong from guest",
            data.len() as u32,
        );
        let mut buf = [0u8; 15];
        host.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"pong from guest");
        guest.send(op::RST, 1024, req.src_port, &[], 0);
        assert_eq!(host.read(&mut buf).expect("eof after RST"), 0);
        assert_eq!(metrics.rx_bytes.get(), 14);
        assert_eq!(metrics.tx_bytes.get(), 15);
    }

    #[test]
    fn guest_connect_reaches_host_listener_and_refused_port_gets_rst() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = device(&dir);
        let path = dev.socket_path().to_path_buf();
        let mem = guest_memory();
        let mut guest = Guest::start(&mem, dev);
        let listener = UnixListener::bind(listener_path(&path, 9000)).expect("host listener");

        guest.send(op::REQUEST, 50000, 9000, &[], 0);
        let (resp, _) = guest.recv();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (op::RESPONSE, 9000, 50000)
        );
        let (mut host, _) = listener.accept().expect("accept");
        guest.send(op::RW, 50000, 9000, b"hello host", 0);
        let mut buf = [0u8; 10];
        host.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hello host");
        host.write_all(b"hello guest").expect("write");
        let (h, data) = guest.recv();
        assert_eq!((h.op, data.as_slice()), (op::RW, &b"hello guest"[..]));

        guest.send(op::REQUEST, 50001, 9001, &[], 0);
        let (rst, _) = guest.recv();
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, 9001, 50001));
    }

    #[test]
    fn bulk_host_to_guest_transfer_follows_credit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = device(&dir);
        let path = dev.socket_path().to_path_buf();
        let mem = guest_memory();
        let mut guest = Guest::start(&mem, dev);
        let mut host = UnixStream::connect(&path).expect("connect");
        host.write_all(b"CONNECT 1\n").expect("write");
        let (req, _) = guest.recv();
        guest.send(op::RESPONSE, 1, req.src_port, &[], 0);
        let total = 1 << 20;
        let payload: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
        let sent = payload.clone();
        let writer = std::thread::spawn(move || host.write_all(&sent).map(|_| host));
        let mut got = Vec::with_capacity(total);
        while got.len() < total {
            let (h, data) = guest.recv();
            assert_eq!(h.op, op::RW);
            assert!(data.len() <= BUF_LEN as usize - HDR_LEN);
            got.extend_from_slice(&data);
            // The guest consumes at once and says so now and then.
            if got.len() % (32 * 1024) < data.len() {
                guest.send(op::CREDIT_UPDATE, 1, req.src_port, &[], got.len() as u32);
            }
        }
        let _host = writer
            .join()
            .expect("writer")
            .expect("host wrote everything");
        assert_eq!(got, payload);
    }

    #[test]
    fn packets_wait_for_rx_buffers_without_spinning() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = device(&dir);
        let path = dev.socket_path().to_path_buf();
        let mem = guest_memory();
        let mut guest = Guest::start_with(&mem, dev, 0);
        guest.0.run(50); // activation
        let mut host = UnixStream::connect(&path).expect("connect");
        host.write_all(b"CONNECT 8\n").expect("write");
        // Accept and read the line; the REQUEST then waits for a buffer.
        for _ in 0..5 {
            guest.0.run(20);
        }
        for _ in 0..3 {
            assert_eq!(guest.0.run(20), 0, "event loop spins");
        }
        guest.0.give_rx_buffer();
        let (req, _) = guest.recv();
        assert_eq!((req.op, req.dst_port), (op::REQUEST, 8));
    }

    #[test]
    fn after_a_restore_nothing_reaches_the_guest_until_it_handled_the_transport_reset() {
        use crate::virtio::testing::Desc;
        use crate::virtio::VirtioDevice;
        const EVENT_BUF: u64 = 0x60_0000;
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = device(&dir);
        let path = dev.socket_path().to_path_buf();
        let mem = guest_memory();
        let mut guest = Guest::start(&mem, dev);
        guest.0.rig.queues[EVT_INDEX].add(&[Desc::w(EVENT_BUF, 4)]);
        guest.0.rig.dev.lock().expect("lock").restored();
        // The reset event went into the event buffer: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (0).
        assert_eq!(guest.0.rig.queues[EVT_INDEX].take_used(), vec![(0, 4)]);

        let mut host = UnixStream::connect(&path).expect("host connects");
        host.write_all(b"CONNECT 1024\n").expect("write");
        for _ in 0..5 {
            guest.0.run(20);
        }
        assert!(
            guest.0.rig.queues[RX_INDEX].take_used().is_empty(),
            "a packet reached the guest before it handled the reset"
        );
        // The driver handled the reset and gives the event buffer back.
        guest.0.rig.queues[EVT_INDEX].add(&[Desc::w(EVENT_BUF, 4)]);
        guest.0.rig.notify(EVT_INDEX);
        let (req, _) = guest.recv();
        assert_eq!((req.op, req.dst_port), (op::REQUEST, 1024));
    }

    #[test]
    fn host_connect_helper_returns_a_ready_stream_or_refusal() {
        use crate::virtio::vsock::host_connect;
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = device(&dir);
        let path = dev.socket_path().to_path_buf();
        let mem = guest_memory();
        let mut guest = Guest::start(&mem, dev);
        let p = path.clone();
        let ok = std::thread::spawn(move || host_connect(&p, 1025, Duration::from_secs(5)));
        let (req, _) = guest.recv();
        guest.send(op::RESPONSE, 1025, req.src_port, &[], 0);
        guest.send(op::RW, 1025, req.src_port, b"agent ready", 0);
        let mut stream = ok.join().expect("thread").expect("connected");
        let mut buf = [0u8; 11];
        stream.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"agent ready", "no data lost after the OK line");

        let p = path.clone();
        let refused = std::thread::spawn(move || host_connect(&p, 1026, Duration::from_secs(5)));
        let (req, _) = guest.recv();
        guest.send(op::RST, 1026, req.src_port, &[], 0);
        for _ in 0..5 {
            guest.0.run(10);
        }
        let err = refused.join().expect("thread").expect_err("refused");
        assert!(err.to_string().contains("guest port 1026"), "{err}");
    }
}
