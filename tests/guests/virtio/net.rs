//! virtio-net (virtio 1.2, section 5.1): raw Ethernet frames over the first network device.
//!
//! 1. Hello: the guest broadcasts a frame of EtherType [`ETHERTYPE_TEST`] whose payload is
//!    `mvm-guest-hello <mvm_nonce>` every ~0.2 s until a frame of that EtherType addressed to its
//!    MAC comes back (the host test answers on the tap), and prints that frame's payload.
//! 2. ARP (with `mvm_ip=A.B.C.D mvm_peer=E.F.G.H`): the guest asks who has the peer address
//!    and prints the answer; the host kernel answers for the address on its end of the tap.
//!
//! 3. Burst (with `mvm_burst=N`): after the hello, the host sends N frames back to back; the
//!    guest counts them (with `mvm_rx_buffers=K` only K receive buffers are ever posted, so the
//!    device has to wait for the guest to return buffers).
//!
//! Frames are 12 bytes of `virtio_net_hdr_v1` (all zero: no offloads negotiated) and the frame,
//! in one descriptor each way (two with `mvm_layout=split`: header, frame); [`RX_BUFFERS`]
//! receive buffers stay posted.
//!
//! Serial lines:
//!   mvm-test-guest: net mac=<xx:xx:xx:xx:xx:xx> link=<up|down>
//!   mvm-test-guest: net got src=<mac> hellos=<sent> payload="<text>"
//!   mvm-test-guest: net burst got=<N> in-order=<0|1>
//!   mvm-test-guest: net arp ip=<peer> mac=<mac> requests=<sent>
//!   mvm-test-guest: net frames rx=<dec> tx=<dec>

use crate::common::boot_info::{parse_number, BootInfo};
use crate::common::out::{line, Line};
use crate::common::rdtsc;
use crate::common::virtio::{
    copy_from, copy_to, dma_alloc, id, Buffer, Layout, Slots, Virtqueue, DESC_F_NEXT,
    DESC_F_WRITE, SECOND,
};
use crate::{check, fail};

const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;

/// `struct virtio_net_hdr_v1` with `num_buffers` (always present with VERSION_1).
const VNET_HDR: usize = 12;
/// Receive buffer size: header plus a full 1514-byte frame, rounded up.
const BUF_LEN: usize = 2048;
/// Receive buffers kept posted.
const RX_BUFFERS: u16 = 16;
/// IEEE 802 local experimental EtherType: nothing else on the link uses it.
pub const ETHERTYPE_TEST: u16 = 0x88b5;
const ETHERTYPE_ARP: u16 = 0x0806;
/// Shortest Ethernet frame (without FCS); shorter frames are padded with zeros.
const MIN_FRAME: usize = 60;
const BROADCAST: [u8; 6] = [0xff; 6];

struct Nic {
    mac: [u8; 6],
    rx: Virtqueue,
    tx: Virtqueue,
    rx_bufs: [u64; RX_BUFFERS as usize],
    tx_buf: u64,
    /// Header and frame in separate descriptors (`mvm_layout=split`).
    split: bool,
    rx_frames: u64,
    tx_frames: u64,
}

impl Nic {
    /// Sends one frame: `dst`, our MAC, `ethertype`, `payload` (padded to 60 bytes).
    fn send(&mut self, dst: &[u8; 6], ethertype: u16, payload: &[u8]) {
        let mut frame = [0u8; VNET_HDR + 1514];
        let f = &mut frame[VNET_HDR..];
        f[0..6].copy_from_slice(dst);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        let n = payload.len().min(1500);
        f[14..14 + n].copy_from_slice(&payload[..n]);
        let len = VNET_HDR + (14 + n).max(MIN_FRAME);
        copy_to(self.tx_buf, &frame[..len]);
        let whole = Buffer {
            addr: self.tx_buf,
            len: len as u32,
            writable: false,
        };
        let header = Buffer {
            len: VNET_HDR as u32,
            ..whole
        };
        let rest = Buffer {
            addr: self.tx_buf + VNET_HDR as u64,
            len: (len - VNET_HDR) as u32,
            writable: false,
        };
        let sent = if self.split {
            self.tx.request(&[header, rest], 5 * SECOND)
        } else {
            self.tx.request(&[whole], 5 * SECOND)
        };
        if sent.is_none() {
            fail("net: the device did not take a frame");
        }
        self.tx_frames += 1;
    }

    /// Waits at most `timeout` for a received frame, copies it (without the virtio header)
    /// into `out` and reposts the buffer. Returns the frame length.
    fn recv(&mut self, out: &mut [u8; 1514], timeout: u64) -> Option<usize> {
        let used = self.rx.wait(timeout)?;
        let per = if self.split { 2 } else { 1 };
        let buf = match self.rx_bufs.get((used.id / per) as usize) {
            Some(&buf) if used.id % per == 0 => buf,
            _ => fail("net: the device returned an unknown receive buffer"),
        };
        let len = (used.len as usize).saturating_sub(VNET_HDR).min(out.len());
        copy_from(buf + VNET_HDR as u64, &mut out[..len]);
        self.rx.publish(used.id as u16);
        self.rx.notify();
        self.rx_frames += 1;
        Some(len)
    }

    /// Receives frames for at most `timeout`; returns the length of the first one `accept`
    /// takes.
    fn recv_matching(
        &mut self,
        out: &mut [u8; 1514],
        timeout: u64,
        accept: impl Fn(&[u8]) -> bool,
    ) -> Option<usize> {
        let start = rdtsc();
        loop {
            let left = timeout.saturating_sub(rdtsc().wrapping_sub(start));
            if left == 0 {
                return None;
            }
            let len = self.recv(out, left)?;
            if len >= 14 && accept(&out[..len]) {
                return Some(len);
            }
        }
    }
}

fn mac_field(l: Line, mac: &[u8]) -> Line {
    let mut l = l;
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            l = l.s(":");
        }
        l = l.hex_bytes(&[*b]);
    }
    l
}

fn ip_field(l: Line, ip: &[u8; 4]) -> Line {
    l.dec(u64::from(ip[0]))
        .s(".")
        .dec(u64::from(ip[1]))
        .s(".")
        .dec(u64::from(ip[2]))
        .s(".")
        .dec(u64::from(ip[3]))
}

/// Parses a dotted IPv4 address.
fn parse_ip(text: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = text.split(|&b| b == b'.');
    for o in &mut ip {
        *o = u8::try_from(parse_number(parts.next()?)?).ok()?;
    }
    parts.next().is_none().then_some(ip)
}

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

/// Drives the network device.
pub fn run(boot: &BootInfo, slots: &Slots) {
    let Some(t) = slots.with_id(id::NET).next() else {
        fail("net: no network device announced");
    };
    let (offered, _) = check(t.negotiate(F_MAC | F_STATUS), "net negotiate");
    if offered & F_MAC == 0 {
        fail("net: the device has no MAC address");
    }
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = t.config_u8(i as u64);
    }
    let link_up = offered & F_STATUS == 0 || t.config_u8(6) & 1 != 0;
    let split = Layout::from_cmdline(boot) == Layout::Split;
    let per: u16 = if split { 2 } else { 1 };
    let mut rx = check(t.queue(0, RX_BUFFERS * per), "net rx queue");
    let tx = check(t.queue(1, 4), "net tx queue");
    let mut rx_bufs = [0u64; RX_BUFFERS as usize];
    let limit = boot.arg("mvm_rx_buffers").and_then(parse_number).unwrap_or(16);
    let posted = usize::from(rx.size() / per).min(limit as usize).max(1);
    for (i, slot) in rx_bufs.iter_mut().enumerate().take(posted) {
        *slot = dma_alloc(BUF_LEN, 64);
        let head = i as u16 * per;
        if split {
            // Header and frame in two chained descriptors over the same memory.
            rx.set_desc(head, *slot, VNET_HDR as u32, DESC_F_WRITE | DESC_F_NEXT, head + 1);
            let rest = (BUF_LEN - VNET_HDR) as u32;
            rx.set_desc(head + 1, *slot + VNET_HDR as u64, rest, DESC_F_WRITE, 0);
        } else {
            rx.set_desc(head, *slot, BUF_LEN as u32, DESC_F_WRITE, 0);
        }
        rx.publish(head);
    }
    check(t.driver_ok(), "net");
    rx.notify();
    let mut nic = Nic {
        mac,
        rx,
        tx,
        rx_bufs,
        tx_buf: dma_alloc(VNET_HDR + 1514, 64),
        split,
        rx_frames: 0,
        tx_frames: 0,
    };
    let l = mac_field(line().s("net mac="), &mac);
    l.s(" link=").s(if link_up { "up" } else { "down" }).end();

    hello(boot, &mut nic);
    if let Some(n) = boot.arg("mvm_burst").and_then(parse_number).filter(|&n| n > 0) {
        burst(&mut nic, n.min(64));
    }
    if let (Some(ip), Some(peer)) = (
        boot.arg("mvm_ip").and_then(parse_ip),
        boot.arg("mvm_peer").and_then(parse_ip),
    ) {
        arp(&mut nic, &ip, &peer);
    }
    line()
        .s("net frames rx=")
        .dec(nic.rx_frames)
        .s(" tx=")
        .dec(nic.tx_frames)
        .end();
}

fn hello(boot: &BootInfo, nic: &mut Nic) {
    let nonce = boot.arg("mvm_nonce").unwrap_or(b"none");
    let mut payload = [0u8; 80];
    let text = b"mvm-guest-hello ";
    payload[..text.len()].copy_from_slice(text);
    let n = nonce.len().min(payload.len() - text.len());
    payload[text.len()..text.len() + n].copy_from_slice(&nonce[..n]);
    let payload = &payload[..text.len() + n];
    let mac = nic.mac;
    let mut frame = [0u8; 1514];
    for sent in 1..=100u64 {
        nic.send(&BROADCAST, ETHERTYPE_TEST, payload);
        let got = nic.recv_matching(&mut frame, SECOND / 5, |f| {
            ethertype(f) == ETHERTYPE_TEST && f[0..6] == mac
        });
        if let Some(len) = got {
            let body = &frame[14..len];
            let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
            let l = mac_field(line().s("net got src="), &frame[6..12]);
            l.s(" hellos=")
                .dec(sent)
                .s(" payload=\"")
                .bytes(&body[..end])
                .s("\"")
                .end();
            return;
        }
    }
    fail("net: no answer to 100 hello frames");
}

/// Receives `n` frames `mvm-burst <i>` (i = 0..n) that the host sends back to back, with
/// perhaps fewer receive buffers posted than frames: the device must hold the rest until the
/// guest returns buffers, not drop them.
fn burst(nic: &mut Nic, n: u64) {
    let mac = nic.mac;
    let mut frame = [0u8; 1514];
    let mut seen: u64 = 0;
    let mut in_order = true;
    let mut next = 0;
    let mut got = 0;
    while got < n {
        let Some(len) = nic.recv_matching(&mut frame, 10 * SECOND, |f| {
            ethertype(f) == ETHERTYPE_TEST && f[0..6] == mac && f[14..].starts_with(b"mvm-burst ")
        }) else {
            line()
                .s("error net: burst frames missing, got ")
                .dec(got)
                .s(" of ")
                .dec(n)
                .end();
            crate::common::reset();
        };
        let digits = &frame[24..len];
        let end = digits.iter().position(|&b| b == 0).unwrap_or(digits.len());
        let Some(i) = parse_number(&digits[..end]).filter(|&i| i < n) else {
            fail("net: bad burst frame");
        };
        if seen & (1 << i) != 0 {
            fail("net: a burst frame arrived twice");
        }
        seen |= 1 << i;
        in_order &= i == next;
        next = i + 1;
        got += 1;
    }
    line()
        .s("net burst got=")
        .dec(got)
        .s(" in-order=")
        .dec(u64::from(in_order))
        .end();
}

fn arp(nic: &mut Nic, ip: &[u8; 4], peer: &[u8; 4]) {
    // Ethernet/IPv4 ARP request (RFC 826).
    let mut req = [0u8; 28];
    req[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    req[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    req[4] = 6;
    req[5] = 4;
    req[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    req[8..14].copy_from_slice(&nic.mac);
    req[14..18].copy_from_slice(ip);
    req[24..28].copy_from_slice(peer);
    let mut frame = [0u8; 1514];
    let mac = nic.mac;
    for sent in 1..=20u64 {
        nic.send(&BROADCAST, ETHERTYPE_ARP, &req);
        let got = nic.recv_matching(&mut frame, SECOND / 4, |f| {
            f.len() >= 42
                && ethertype(f) == ETHERTYPE_ARP
                && f[0..6] == mac
                && f[20..22] == 2u16.to_be_bytes()
                && f[28..32] == *peer
        });
        if got.is_some() {
            let l = ip_field(line().s("net arp ip="), peer);
            let l = mac_field(l.s(" mac="), &frame[22..28]);
            l.s(" requests=").dec(sent).end();
            return;
        }
    }
    fail("net: no ARP reply from the peer");
}
