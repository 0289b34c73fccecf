//! Event-loop glue for virtio-net: which fds to watch and what to run when they fire.
//!
//! The device sits in the event loop as `Arc<Mutex<Net>>`; the queue eventfds are (re)registered
//! by the shared glue (`virtio/glue.rs`) when the driver activates or resets the device. The
//! backend fd is only watched while the guest has receive buffers, so a full receive queue never
//! spins the loop.

use event_manager::{EventOps, EventSet, Events};

use super::queues::RxStop;
use super::{Net, NAME, RX_INDEX, TX_INDEX};
use crate::virtio::glue::{event_subscriber, DeviceEvents, EventDevice};

impl Net {
    fn watch_backend(&mut self, ops: &mut EventOps, on: bool) {
        let on = on && !self.backend_failed && self.active.is_some();
        if on == self.backend_registered {
            return;
        }
        let events = Events::new_raw(self.backend.raw_fd(), EventSet::IN);
        let res = if on {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match res {
            Ok(()) => self.backend_registered = on,
            Err(e) => crate::error_limited!("{NAME}: cannot (un)watch the backend: {e:?}"),
        }
    }

    fn run_tx(&mut self) {
        if let Some(queues) = self.active.as_mut() {
            queues.process_tx(&mut *self.backend, &mut self.throttle);
        }
    }

    fn run_rx(&mut self, ops: &mut EventOps) {
        if self.backend_failed {
            return;
        }
        let Some(queues) = self.active.as_mut() else {
            return;
        };
        match queues.process_rx(&mut *self.backend, &mut self.throttle) {
            RxStop::Drained => self.watch_backend(ops, true),
            RxStop::NoBuffers | RxStop::Throttled => self.watch_backend(ops, false),
            RxStop::BackendFailed => {
                self.watch_backend(ops, false);
                self.backend_failed = true;
            }
        }
    }
}

impl EventDevice for Net {
    const NAME: &'static str = NAME;

    fn device_events(&mut self) -> &mut DeviceEvents {
        &mut self.events
    }

    fn on_activation(&mut self, ops: &mut EventOps) {
        if self.active.is_none() {
            self.watch_backend(ops, false);
            return;
        }
        self.run_tx();
        self.run_rx(ops);
    }

    fn on_queue(&mut self, index: usize, ops: &mut EventOps) {
        match index {
            RX_INDEX => self.run_rx(ops),
            TX_INDEX => self.run_tx(),
            _ => {}
        }
    }

    fn init_other(&mut self, ops: &mut EventOps) {
        self.throttle.init(ops);
    }

    fn on_other(&mut self, events: &Events, ops: &mut EventOps) -> bool {
        if self.throttle.timer(events) {
            self.run_tx();
            self.run_rx(ops);
            return true;
        }
        if events.fd() != self.backend.raw_fd() {
            return false;
        }
        if self.backend_registered {
            self.run_rx(ops);
        }
        true
    }
}

event_subscriber!(Net);

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::net::{Ipv4Addr, UdpSocket};
    use std::time::{Duration, Instant};

    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::virtio::net::backend::tests::PairBackend;
    use crate::virtio::net::passt::tests::{arp_request, passt_installed};
    use crate::virtio::net::tap::tests::in_netns;
    use crate::virtio::net::{
        features, NetBackendConfig, NetConfig, PasstConfig, TapConfig, VNET_HDR_LEN,
    };
    use crate::virtio::testing::{guest_memory, GuestDriver};
    use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

    const GUEST_MAC: [u8; 6] = [0x02, 0x6d, 0x76, 0, 0, 1];
    const BUF_LEN: u32 = 2048;

    /// A guest driver for one virtio-net device inside a real event loop.
    struct Guest<'a>(GuestDriver<'a, Net>);

    impl<'a> Guest<'a> {
        fn start(mem: &'a GuestMemoryMmap, net: Net) -> Self {
            Self::start_with(mem, net, 16)
        }

        fn start_with(mem: &'a GuestMemoryMmap, net: Net, rx_buffers: u64) -> Self {
            let wanted = (1u64 << VIRTIO_F_VERSION_1)
                | (1u64 << features::MAC)
                | (1u64 << features::STATUS)
                | (1u64 << features::MRG_RXBUF);
            Self(GuestDriver::start(mem, net, wanted, rx_buffers, BUF_LEN))
        }

        fn send(&mut self, frame: &[u8]) {
            let mut pkt = vec![0u8; VNET_HDR_LEN];
            pkt.extend_from_slice(frame);
            self.0.send(&[&pkt]);
        }

        /// Runs the event loop until a received frame satisfies `want`.
        fn recv_until(&mut self, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                let data = self.0.recv();
                assert_eq!(u16::from_le_bytes([data[10], data[11]]), 1, "num_buffers");
                let frame = data[VNET_HDR_LEN..].to_vec();
                if want(&frame) {
                    return frame;
                }
            }
            panic!("no matching frame within 5 s");
        }
    }

    fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
        let mut a = vec![0, 1, 0x08, 0, 6, 4];
        a.extend_from_slice(&op.to_be_bytes());
        a.extend_from_slice(&sha);
        a.extend_from_slice(&spa.octets());
        a.extend_from_slice(&tha);
        a.extend_from_slice(&tpa.octets());
        a
    }

    fn udp4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&src.0.octets());
        ip.extend_from_slice(&dst.0.octets());
        let sum: u32 = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        let csum = !(((folded & 0xffff) + (folded >> 16)) as u16);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        ip.extend_from_slice(&src.1.to_be_bytes());
        ip.extend_from_slice(&dst.1.to_be_bytes());
        ip.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0]); // no UDP checksum
        ip.extend_from_slice(payload);
        ip
    }

    #[test]
    fn guest_and_host_exchange_udp_over_a_tap_in_a_netns() {
        in_netns(|| {
            let host_ip = Ipv4Addr::new(10, 7, 0, 1);
            let guest_ip = Ipv4Addr::new(10, 7, 0, 2);
            let cfg = NetConfig {
                mac: Some(GUEST_MAC),
                backend: NetBackendConfig::Tap(TapConfig {
                    name: None,
                    host_ip: Some(host_ip),
                    prefix_len: 24,
                }),
                limit: Default::default(),
            };
            let net = Net::new(&cfg).expect("net with tap");
            assert!(net.tap_name().expect("tap name").starts_with("mvm-tap"));
            assert_eq!(net.mac(), GUEST_MAC);
            let metrics = net.metrics();
            let mem = guest_memory();
            let mut guest = Guest::start(&mem, net);

            let host = UdpSocket::bind((host_ip, 6000)).expect("bind");
            host.send_to(b"ping", (guest_ip, 5000))
                .expect("send to guest");
            // The host kernel first asks who has the guest's address.
            let req = guest.recv_until(|f| {
                f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[38..42] == guest_ip.octets()
            });
            let tap_mac: [u8; 6] = req[6..12].try_into().expect("mac");
            let reply = arp(2, GUEST_MAC, guest_ip, tap_mac, host_ip);
            guest.send(&eth(tap_mac, GUEST_MAC, 0x0806, &reply));
            let ping = guest.recv_until(|f| f[12..14] == [0x08, 0x00] && f[23] == 17);
            assert_eq!(&ping[0..6], &GUEST_MAC);
            assert_eq!(&ping[42..46], b"ping");

            let pong = udp4((guest_ip, 5000), (host_ip, 6000), b"pong");
            guest.send(&eth(tap_mac, GUEST_MAC, 0x0800, &pong));
            host.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut buf = [0u8; 64];
            let (n, from) = host
                .recv_from(&mut buf)
                .expect("host receives the guest's reply");
            assert_eq!(&buf[..n], b"pong");
            assert_eq!(from, (guest_ip, 5000).into());
            assert!(metrics.tx_frames.get() >= 2);
            assert!(metrics.rx_frames.get() >= 2);
        });
    }

    #[test]
    fn guest_arp_request_is_answered_by_passt() {
        if !passt_installed() {
            return;
        }
        let cfg = NetConfig {
            mac: Some(GUEST_MAC),
            backend: NetBackendConfig::User(PasstConfig::default()),
            limit: Default::default(),
        };
        let net = Net::new(&cfg).expect("net with passt");
        assert_eq!(net.tap_name(), None);
        assert_eq!(
            net.avail_features() & (1 << features::CSUM),
            0,
            "no offloads with passt"
        );
        let mem = guest_memory();
        let mut guest = Guest::start(&mem, net);
        guest.send(&arp_request(GUEST_MAC));
        let reply = guest.recv_until(|f| f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]);
        assert_eq!(&reply[0..6], &GUEST_MAC);
        assert_eq!(&reply[28..32], &[192, 0, 2, 1]);
    }

    #[test]
    fn rx_pauses_without_buffers_and_resumes_on_notify() {
        let (backend, peer) = PairBackend::new();
        let net = Net::with_backend(Box::new(backend), GUEST_MAC).expect("net");
        let metrics = net.metrics();
        let mem = guest_memory();
        let mut guest = Guest::start_with(&mem, net, 0);
        guest.0.run(50); // activation
        let mut pkt = vec![0u8; VNET_HDR_LEN];
        pkt.extend_from_slice(&arp_request(GUEST_MAC));
        peer.send(&pkt).expect("host frame");
        guest.0.run(50);
        assert_eq!(metrics.rx_no_buffers.get(), 1);
        // The frame waits; the backend is no longer watched, so the loop stays idle.
        for _ in 0..3 {
            assert_eq!(guest.0.run(20), 0, "event loop spins");
        }
        guest.0.give_rx_buffer();
        let frame = guest.recv_until(|_| true);
        assert_eq!(frame, arp_request(GUEST_MAC));
        assert_eq!(metrics.rx_frames.get(), 1);
        // Reading resumed: the next frame goes straight through.
        peer.send(&pkt).expect("host frame");
        guest.recv_until(|_| true);
    }
}
