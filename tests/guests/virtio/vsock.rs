//! virtio-vsock (virtio 1.2, section 5.10): just enough of the stream protocol for one
//! connection at a time, both ways.
//!
//! 1. Accept (`mvm_listen=PORT`): wait for a REQUEST to PORT (a host program wrote
//!    `CONNECT PORT` to the VM's socket), answer RESPONSE, read one line, send a CREDIT_UPDATE,
//!    answer `echo: <line>`, then wait for the host to shut down and answer RST.
//!    With `mvm_bulk=N` the guest reads N bytes instead of a line, acknowledging them (CREDIT_UPDATE)
//!    only when the host pauses, checks the host never exceeds its credit (`mvm_credit=`
//!    bytes of `buf_alloc`), and answers `fnv1a=0x<8 hex>` of the bytes.
//! 2. Connect (`mvm_connect=PORT`): REQUEST to the host (CID 2) PORT (mvm connects to the host
//!    listener `<socket>_PORT`), send `ping <mvm_nonce>\n`, read one line back, then SHUTDOWN
//!    both ways and wait for the device's RST.
//!
//! A connection request the guest is not waiting for is answered with RST (port closed).
//! With `mvm_layout=split`, headers and payloads go in separate descriptors both ways.
//! Every packet the guest sends carries its receive credit (`buf_alloc`, `fwd_cnt`); it sends
//! data only within the credit the host gave it.
//!
//! Serial lines:
//!   mvm-test-guest: vsock cid=<dec>
//!   mvm-test-guest: vsock accepted port=<dec> host-port=<dec>
//!   mvm-test-guest: vsock got line="<text>"
//!   mvm-test-guest: vsock bulk bytes=<N> fnv1a=0x<8 hex> most-unacked=<dec> credit=<dec>
//!   mvm-test-guest: vsock host-shutdown flags=<dec>
//!   mvm-test-guest: vsock connected port=<dec> local-port=<dec>
//!   mvm-test-guest: vsock host-said line="<text>"
//!   mvm-test-guest: vsock closed rst=1
//!   mvm-test-guest: vsock refused port=<dec>              (RST instead of RESPONSE)

use crate::common::boot_info::{parse_number, BootInfo};
use crate::common::out::line;
use crate::common::rdtsc;
use crate::common::virtio::{
    copy_from, copy_to, dma_alloc, id, Buffer, Layout, Slots, Virtqueue, DESC_F_NEXT,
    DESC_F_WRITE, SECOND,
};
use crate::{check, fail};

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_BOTH: u32 = 3;
const TYPE_STREAM: u16 = 1;
const HOST_CID: u64 = 2;

const HDR_LEN: usize = 44;
/// Receive buffer size: header plus up to ~4 KiB of data.
const BUF_LEN: usize = 4096;
/// Receive buffers kept posted.
const RX_BUFFERS: u16 = 8;
/// What the guest says it can buffer per connection, unless `mvm_credit=` says otherwise.
const BUF_ALLOC: u32 = 64 * 1024;
/// Guest port for the guest-initiated connection.
const LOCAL_PORT: u32 = 49152;
/// Longest line handled.
const MAX_LINE: usize = 256;

/// `struct virtio_vsock_hdr` fields this driver uses.
#[derive(Debug, Clone, Copy, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Hdr {
    fn parse(b: &[u8; HDR_LEN]) -> Hdr {
        Hdr {
            src_cid: u64::from(le32(b, 0)) | (u64::from(le32(b, 4)) << 32),
            dst_cid: u64::from(le32(b, 8)) | (u64::from(le32(b, 12)) << 32),
            src_port: le32(b, 16),
            dst_port: le32(b, 20),
            len: le32(b, 24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: le32(b, 32),
            buf_alloc: le32(b, 36),
            fwd_cnt: le32(b, 40),
        }
    }

    fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// One stream connection's ports and credit.
#[derive(Debug, Default)]
struct Conn {
    local_port: u32,
    peer_port: u32,
    /// Bytes of the peer's data the guest has consumed.
    fwd_cnt: u32,
    /// Bytes the guest has sent.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl Conn {
    fn update_credit(&mut self, h: &Hdr) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// Bytes the peer can take now.
    fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn matches(&self, h: &Hdr) -> bool {
        h.src_port == self.peer_port && h.dst_port == self.local_port
    }
}

struct Vsock {
    cid: u64,
    rx: Virtqueue,
    tx: Virtqueue,
    rx_bufs: [u64; RX_BUFFERS as usize],
    tx_buf: u64,
    /// Header and payload in separate descriptors (`mvm_layout=split`).
    split: bool,
    /// The receive buffer the guest advertises per connection.
    buf_alloc: u32,
}

impl Vsock {
    fn send(&mut self, c: &mut Conn, op: u16, flags: u32, data: &[u8]) {
        let h = Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: c.local_port,
            dst_port: c.peer_port,
            len: data.len() as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: c.fwd_cnt,
        };
        copy_to(self.tx_buf, &h.bytes());
        copy_to(self.tx_buf + HDR_LEN as u64, data);
        let whole = Buffer {
            addr: self.tx_buf,
            len: (HDR_LEN + data.len()) as u32,
            writable: false,
        };
        let header = Buffer {
            len: HDR_LEN as u32,
            ..whole
        };
        let payload = Buffer {
            addr: self.tx_buf + HDR_LEN as u64,
            len: data.len() as u32,
            writable: false,
        };
        let sent = if self.split && !data.is_empty() {
            self.tx.request(&[header, payload], 5 * SECOND)
        } else {
            self.tx.request(&[whole], 5 * SECOND)
        };
        if sent.is_none() {
            fail("vsock: the device did not take a packet");
        }
        if op == OP_RW {
            c.tx_cnt = c.tx_cnt.wrapping_add(data.len() as u32);
        }
    }

    /// Waits at most `timeout` for a packet; its data (up to `data.len()` bytes) is copied out
    /// and the buffer reposted. Returns the header and the number of data bytes copied.
    fn recv(&mut self, data: &mut [u8], timeout: u64) -> Option<(Hdr, usize)> {
        let used = self.rx.wait(timeout)?;
        let per = if self.split { 2 } else { 1 };
        let buf = match self.rx_bufs.get((used.id / per) as usize) {
            Some(&buf) if used.id % per == 0 => buf,
            _ => fail("vsock: the device returned an unknown receive buffer"),
        };
        if (used.len as usize) < HDR_LEN {
            fail("vsock: received a packet shorter than its header");
        }
        let mut raw = [0u8; HDR_LEN];
        copy_from(buf, &mut raw);
        let h = Hdr::parse(&raw);
        let n = (h.len as usize)
            .min(used.len as usize - HDR_LEN)
            .min(data.len());
        copy_from(buf + HDR_LEN as u64, &mut data[..n]);
        self.rx.publish(used.id as u16);
        self.rx.notify();
        Some((h, n))
    }

    /// Waits for the next packet of connection `c` (others are reported and dropped), taking
    /// its credit information. `None` on timeout.
    fn recv_for(&mut self, c: &mut Conn, data: &mut [u8], timeout: u64) -> Option<(Hdr, usize)> {
        let start = rdtsc();
        loop {
            let left = timeout.saturating_sub(rdtsc().wrapping_sub(start));
            if left == 0 {
                return None;
            }
            let (h, n) = self.recv(data, left)?;
            if h.dst_cid != self.cid || h.src_cid != HOST_CID || !c.matches(&h) {
                self.refuse(&h);
                continue;
            }
            c.update_credit(&h);
            if h.op == OP_CREDIT_REQUEST {
                self.send(c, OP_CREDIT_UPDATE, 0, &[]);
                continue;
            }
            return Some((h, n));
        }
    }

    /// Reports a packet for no connection of ours; a connection request gets an RST, as a
    /// closed port answers.
    fn refuse(&mut self, h: &Hdr) {
        ignored(h);
        if h.op == OP_REQUEST && h.src_cid == HOST_CID {
            let mut c = Conn {
                local_port: h.dst_port,
                peer_port: h.src_port,
                ..Conn::default()
            };
            self.send(&mut c, OP_RST, 0, &[]);
        }
    }

    /// Reads RW packets of `c` until a newline; answers each with a CREDIT_UPDATE. Returns the
    /// line length (without the newline) in `out`.
    fn read_line(&mut self, c: &mut Conn, out: &mut [u8; MAX_LINE], what: &str) -> usize {
        let mut len = 0;
        let mut data = [0u8; BUF_LEN];
        loop {
            let Some((h, n)) = self.recv_for(c, &mut data, 10 * SECOND) else {
                line().s("error vsock: no data while waiting for ").s(what).end();
                crate::common::reset();
            };
            match h.op {
                OP_RW => {
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(h.len);
                    self.send(c, OP_CREDIT_UPDATE, 0, &[]);
                    for &b in &data[..n] {
                        if b == b'\n' {
                            return len;
                        }
                        if len < MAX_LINE {
                            out[len] = b;
                            len += 1;
                        }
                    }
                }
                OP_CREDIT_UPDATE => {}
                _ => {
                    line()
                        .s("error vsock: op ")
                        .dec(u64::from(h.op))
                        .s(" while waiting for ")
                        .s(what)
                        .end();
                    crate::common::reset();
                }
            }
        }
    }

    /// Sends `data` as RW packets within the peer's credit.
    fn write_all(&mut self, c: &mut Conn, data: &[u8]) {
        let mut sent = 0;
        let mut scratch = [0u8; 64];
        while sent < data.len() {
            let room = c.peer_free() as usize;
            if room == 0 {
                // Ask for credit and wait for the update.
                self.send(c, OP_CREDIT_REQUEST, 0, &[]);
                if self.recv_for(c, &mut scratch, 5 * SECOND).is_none() {
                    fail("vsock: no credit from the host");
                }
                continue;
            }
            let n = (data.len() - sent).min(room).min(BUF_LEN - HDR_LEN);
            self.send(c, OP_RW, 0, &data[sent..sent + n]);
            sent += n;
        }
    }
}

fn ignored(h: &Hdr) {
    line()
        .s("vsock ignored op=")
        .dec(u64::from(h.op))
        .s(" src-port=")
        .dec(u64::from(h.src_port))
        .s(" dst-port=")
        .dec(u64::from(h.dst_port))
        .end();
}

/// Drives the vsock device.
pub fn run(boot: &BootInfo, slots: &Slots) {
    let Some(t) = slots.with_id(id::VSOCK).next() else {
        fail("vsock: no socket device announced");
    };
    check(t.negotiate(0), "vsock negotiate");
    let cid = t.config_u64(0);
    let split = Layout::from_cmdline(boot) == Layout::Split;
    let per: u16 = if split { 2 } else { 1 };
    let mut rx = check(t.queue(0, RX_BUFFERS * per), "vsock rx queue");
    let tx = check(t.queue(1, 4), "vsock tx queue");
    let mut event = check(t.queue(2, 4), "vsock event queue");
    let mut rx_bufs = [0u64; RX_BUFFERS as usize];
    let posted = usize::from(rx.size() / per);
    for (i, slot) in rx_bufs.iter_mut().enumerate().take(posted) {
        *slot = dma_alloc(BUF_LEN, 64);
        let head = i as u16 * per;
        if split {
            // Header and payload in two chained descriptors over the same memory.
            rx.set_desc(head, *slot, HDR_LEN as u32, DESC_F_WRITE | DESC_F_NEXT, head + 1);
            let rest = (BUF_LEN - HDR_LEN) as u32;
            rx.set_desc(head + 1, *slot + HDR_LEN as u64, rest, DESC_F_WRITE, 0);
        } else {
            rx.set_desc(head, *slot, BUF_LEN as u32, DESC_F_WRITE, 0);
        }
        rx.publish(head);
    }
    // Event buffers (struct virtio_vsock_event, 4 bytes): posted as the driver must, unused.
    for i in 0..event.size() {
        event.set_desc(i, dma_alloc(8, 8), 8, DESC_F_WRITE, 0);
        event.publish(i);
    }
    check(t.driver_ok(), "vsock");
    rx.notify();
    event.notify();
    let mut v = Vsock {
        cid,
        rx,
        tx,
        rx_bufs,
        tx_buf: dma_alloc(BUF_LEN, 64),
        split,
        buf_alloc: boot
            .arg("mvm_credit")
            .and_then(parse_number)
            .map_or(BUF_ALLOC, |c| c.clamp(1, u64::from(BUF_ALLOC)) as u32),
    };
    line().s("vsock cid=").dec(cid).end();
    if let Some(port) = boot.arg("mvm_listen").and_then(parse_number) {
        let bulk = boot.arg("mvm_bulk").and_then(parse_number).unwrap_or(0);
        accept(&mut v, port as u32, bulk as u32);
    }
    if let Some(port) = boot.arg("mvm_connect").and_then(parse_number) {
        let nonce = boot.arg("mvm_nonce").unwrap_or(b"none");
        connect(&mut v, port as u32, nonce);
    }
}

/// Reads `total` bytes of RW data, telling the host about consumed bytes only once it goes
/// quiet, and checks the host never has more unacknowledged bytes in flight than the guest's
/// `buf_alloc`. Returns (FNV-1a of the bytes, most bytes ever unacknowledged).
fn read_bulk(v: &mut Vsock, c: &mut Conn, total: u32) -> (u32, u32) {
    let mut data = [0u8; BUF_LEN];
    let (mut got, mut unacked, mut most) = (0u32, 0u32, 0u32);
    let mut hash: u32 = 0x811c_9dc5;
    let mut quiet_since = rdtsc();
    while got < total {
        match v.recv_for(c, &mut data, SECOND / 50) {
            Some((h, n)) if h.op == OP_RW => {
                if n != h.len as usize {
                    fail("vsock: a data packet did not fit its buffer");
                }
                for &b in &data[..n] {
                    hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
                }
                got = got.wrapping_add(h.len);
                unacked = unacked.wrapping_add(h.len);
                most = most.max(unacked);
                if unacked > v.buf_alloc {
                    line()
                        .s("error vsock: host overran the credit: unacked=")
                        .dec(u64::from(unacked))
                        .s(" credit=")
                        .dec(u64::from(v.buf_alloc))
                        .end();
                    crate::common::reset();
                }
                quiet_since = rdtsc();
            }
            Some((h, _)) if h.op == OP_CREDIT_UPDATE => {}
            Some(_) => fail("vsock: unexpected packet during the bulk transfer"),
            None if unacked > 0 => {
                c.fwd_cnt = c.fwd_cnt.wrapping_add(unacked);
                unacked = 0;
                v.send(c, OP_CREDIT_UPDATE, 0, &[]);
                quiet_since = rdtsc();
            }
            None if rdtsc().wrapping_sub(quiet_since) > 10 * SECOND => {
                fail("vsock: the bulk data stopped coming");
            }
            None => {}
        }
    }
    c.fwd_cnt = c.fwd_cnt.wrapping_add(unacked);
    v.send(c, OP_CREDIT_UPDATE, 0, &[]);
    (hash, most)
}

fn hex_digit(n: u32) -> u8 {
    b"0123456789abcdef"[(n & 0xf) as usize]
}

fn accept(v: &mut Vsock, port: u32, bulk: u32) {
    let mut data = [0u8; BUF_LEN];
    let start = rdtsc();
    let mut c = loop {
        if rdtsc().wrapping_sub(start) > 30 * SECOND {
            fail("vsock: no connection request from the host");
        }
        let Some((h, _)) = v.recv(&mut data, SECOND) else {
            continue;
        };
        if h.op == OP_REQUEST && h.dst_port == port && h.type_ == TYPE_STREAM {
            let mut c = Conn {
                local_port: port,
                peer_port: h.src_port,
                ..Conn::default()
            };
            c.update_credit(&h);
            break c;
        }
        v.refuse(&h);
    };
    v.send(&mut c, OP_RESPONSE, 0, &[]);
    line()
        .s("vsock accepted port=")
        .dec(u64::from(port))
        .s(" host-port=")
        .dec(u64::from(c.peer_port))
        .end();
    if bulk > 0 {
        let (hash, most) = read_bulk(v, &mut c, bulk);
        line()
            .s("vsock bulk bytes=")
            .dec(u64::from(bulk))
            .s(" fnv1a=")
            .hex_digits(u64::from(hash), 8)
            .s(" most-unacked=")
            .dec(u64::from(most))
            .s(" credit=")
            .dec(u64::from(v.buf_alloc))
            .end();
        let mut reply = *b"fnv1a=0x00000000\n";
        for i in 0..8 {
            reply[8 + i] = hex_digit(hash >> (28 - 4 * i as u32));
        }
        v.write_all(&mut c, &reply);
    } else {
        let mut text = [0u8; MAX_LINE];
        let n = v.read_line(&mut c, &mut text, "the host's line");
        line().s("vsock got line=\"").bytes(&text[..n]).s("\"").end();
        let mut reply = [0u8; MAX_LINE + 8];
        reply[..6].copy_from_slice(b"echo: ");
        reply[6..6 + n].copy_from_slice(&text[..n]);
        reply[6 + n] = b'\n';
        v.write_all(&mut c, &reply[..7 + n]);
    }
    // The host closes its end: the device sends SHUTDOWN; the guest answers RST.
    loop {
        let Some((h, _)) = v.recv_for(&mut c, &mut data, 10 * SECOND) else {
            fail("vsock: the host did not shut the connection down");
        };
        match h.op {
            OP_SHUTDOWN => {
                line()
                    .s("vsock host-shutdown flags=")
                    .dec(u64::from(h.flags))
                    .end();
                v.send(&mut c, OP_RST, 0, &[]);
                return;
            }
            OP_RST => {
                line().s("vsock host-reset").end();
                return;
            }
            OP_CREDIT_UPDATE => {}
            OP_RW => fail("vsock: unexpected data after the echo"),
            _ => v.refuse(&h),
        }
    }
}

fn connect(v: &mut Vsock, port: u32, nonce: &[u8]) {
    let mut c = Conn {
        local_port: LOCAL_PORT,
        peer_port: port,
        ..Conn::default()
    };
    v.send(&mut c, OP_REQUEST, 0, &[]);
    let mut data = [0u8; BUF_LEN];
    let Some((h, _)) = v.recv_for(&mut c, &mut data, 10 * SECOND) else {
        fail("vsock: no answer to the connection request");
    };
    match h.op {
        OP_RESPONSE => {}
        OP_RST => {
            line().s("vsock refused port=").dec(u64::from(port)).end();
            return;
        }
        _ => fail("vsock: unexpected answer to the connection request"),
    }
    line()
        .s("vsock connected port=")
        .dec(u64::from(port))
        .s(" local-port=")
        .dec(u64::from(LOCAL_PORT))
        .end();
    let mut msg = [0u8; MAX_LINE];
    let n = nonce.len().min(MAX_LINE - 8);
    msg[..5].copy_from_slice(b"ping ");
    msg[5..5 + n].copy_from_slice(&nonce[..n]);
    msg[5 + n] = b'\n';
    v.write_all(&mut c, &msg[..6 + n]);
    let mut text = [0u8; MAX_LINE];
    let n = v.read_line(&mut c, &mut text, "the host's answer");
    line()
        .s("vsock host-said line=\"")
        .bytes(&text[..n])
        .s("\"")
        .end();
    v.send(&mut c, OP_SHUTDOWN, SHUTDOWN_BOTH, &[]);
    loop {
        let Some((h, _)) = v.recv_for(&mut c, &mut data, 10 * SECOND) else {
            fail("vsock: no RST after the guest's SHUTDOWN");
        };
        if h.op == OP_RST {
            line().s("vsock closed rst=1").end();
            return;
        }
    }
}
