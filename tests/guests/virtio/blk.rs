//! virtio-blk (virtio 1.2, section 5.2): for every block device, in command-line order (`dev=0`
//! is vda): GET_ID, a read of the first [`SECTORS`] sectors, a write of a pattern derived from
//! `mvm_seed=` (plus the device number) at sector [`WRITE_SECTOR`], FLUSH, a read back, and a
//! read past the end. `mvm_layout=split|merged` spreads every request differently over
//! descriptors (see [`Layout`]); the results must not change.
//!
//! Serial lines, per device N (`status=` is the request's status byte: 0 OK, 1 IOERR, 2 UNSUPP):
//!   mvm-test-guest: blk dev=N capacity=<sectors> ro=<0|1> flush=<0|1>
//!   mvm-test-guest: blk dev=N get-id status=S id="<serial>"
//!   mvm-test-guest: blk dev=N read sector=0 count=8 status=S fnv1a=0x<8 hex> head="<16 bytes>"
//!   mvm-test-guest: blk dev=N write sector=8 count=8 status=S
//!   mvm-test-guest: blk dev=N flush status=S                     (only after a good write)
//!   mvm-test-guest: blk dev=N readback sector=8 status=S match=<0|1>   (only after a good write)
//!   mvm-test-guest: blk dev=N read-past-end sector=<capacity> status=S
//!   mvm-test-guest: blk devices=<count>

use crate::common::boot_info::{parse_number, BootInfo};
use crate::common::out::line;
use crate::common::virtio::{
    copy_from, dma_alloc, id, Buffer, Layout, Slots, Transport, Virtqueue, SECOND,
};
use crate::common::{read_phys, write_phys};
use crate::{check, fail};

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Sectors per read and write.
const SECTORS: u32 = 8;
/// Bytes per read and write.
const DATA_LEN: u32 = SECTORS * 512;
/// Where the pattern goes.
const WRITE_SECTOR: u64 = 8;
/// Status byte value written before a request, so an unanswered one stands out.
const NO_STATUS: u8 = 0xff;

struct Disk {
    n: u64,
    q: Virtqueue,
    layout: Layout,
    /// Header (16 bytes), then data ([`DATA_LEN`]), then the status byte, back to back.
    hdr: u64,
    data: u64,
    status: u64,
}

/// Up to 16 buffers of one request.
struct Chain {
    bufs: [Buffer; 16],
    n: usize,
}

impl Chain {
    fn push(&mut self, addr: u64, len: u32, writable: bool) {
        self.bufs[self.n] = Buffer {
            addr,
            len,
            writable,
        };
        self.n += 1;
    }
}

impl Disk {
    /// One request: header, optional data of `len` bytes, status byte, laid out in descriptors
    /// as `self.layout` says. Returns the status.
    fn request(&mut self, kind: u32, sector: u64, len: u32, device_writes: bool) -> u8 {
        let merged_status = self.layout == Layout::Merged && len > 0 && device_writes;
        // With data and status in one buffer, the status byte follows the data directly.
        let status = if merged_status {
            self.data + u64::from(len)
        } else {
            self.status
        };
        // SAFETY: hdr (16 bytes), data and status lie in this disk's arena block.
        unsafe {
            write_phys(self.hdr, kind);
            write_phys(self.hdr + 4, 0u32);
            write_phys(self.hdr + 8, sector);
            write_phys(status, NO_STATUS);
        }
        let mut c = Chain {
            bufs: [Buffer {
                addr: 0,
                len: 0,
                writable: false,
            }; 16],
            n: 0,
        };
        match self.layout {
            Layout::Plain => {
                c.push(self.hdr, 16, false);
                if len > 0 {
                    c.push(self.data, len, device_writes);
                }
                c.push(status, 1, true);
            }
            Layout::Split => {
                c.push(self.hdr, 8, false);
                c.push(self.hdr + 8, 8, false);
                let mut off = 0;
                while off < len {
                    let piece = (len - off).min(512);
                    c.push(self.data + u64::from(off), piece, device_writes);
                    off += piece;
                }
                c.push(status, 1, true);
            }
            Layout::Merged => {
                if len == 0 {
                    c.push(self.hdr, 16, false);
                    c.push(status, 1, true);
                } else if device_writes {
                    c.push(self.hdr, 16, false);
                    c.push(self.data, len + 1, true);
                } else {
                    c.push(self.hdr, 16 + len, false);
                    c.push(status, 1, true);
                }
            }
        }
        if self.q.request(&c.bufs[..c.n], 5 * SECOND).is_none() {
            line().s("blk dev=").dec(self.n).s(" request timed out").end();
            fail("blk: the device did not answer");
        }
        // SAFETY: the status byte of this request.
        unsafe { read_phys(status) }
    }

    fn data_byte(&self, i: u32) -> u8 {
        // SAFETY: data is DATA_LEN bytes from the arena; callers pass i < DATA_LEN.
        unsafe { read_phys(self.data + u64::from(i)) }
    }
}

/// FNV-1a (32-bit).
fn fnv1a(bytes: impl Iterator<Item = u8>) -> u32 {
    bytes.fold(0x811c_9dc5, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// The xorshift64 state the pattern starts from: non-zero, and different for neighbouring seeds.
fn pattern_start(seed: u64) -> u64 {
    match seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) {
        0 => 1,
        x => x,
    }
}

/// The pattern written to a disk: xorshift64 words from [`pattern_start`], little endian. The
/// host test computes the same bytes.
fn pattern_word(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// Exercises every block device.
pub fn run(boot: &BootInfo, slots: &Slots) {
    let seed = boot.arg("mvm_seed").and_then(parse_number).unwrap_or(1);
    let layout = Layout::from_cmdline(boot);
    let mut n = 0;
    for t in slots.with_id(id::BLOCK) {
        exercise(n, &t, seed.wrapping_add(n), layout);
        n += 1;
    }
    line().s("blk devices=").dec(n).end();
}

fn exercise(n: u64, t: &Transport, seed: u64, layout: Layout) {
    let (offered, _) = check(t.negotiate(F_RO | F_FLUSH), "blk negotiate");
    let capacity = t.config_u64(0);
    let q = check(t.queue(0, 16), "blk queue");
    check(t.driver_ok(), "blk");
    let block = dma_alloc(16 + DATA_LEN as usize + 1, 16);
    let mut d = Disk {
        n,
        q,
        layout,
        hdr: block,
        data: block + 16,
        status: block + 16 + u64::from(DATA_LEN),
    };
    line()
        .s("blk dev=")
        .dec(n)
        .s(" capacity=")
        .dec(capacity)
        .s(" ro=")
        .dec(u64::from(offered & F_RO != 0))
        .s(" flush=")
        .dec(u64::from(offered & F_FLUSH != 0))
        .end();

    let s = d.request(T_GET_ID, 0, 20, true);
    let mut serial = [0u8; 20];
    copy_from(d.data, &mut serial);
    let end = serial.iter().position(|&b| b == 0).unwrap_or(20);
    line()
        .s("blk dev=")
        .dec(n)
        .s(" get-id status=")
        .dec(u64::from(s))
        .s(" id=\"")
        .bytes(&serial[..end])
        .s("\"")
        .end();

    let s = d.request(T_IN, 0, DATA_LEN, true);
    let mut head = [0u8; 16];
    copy_from(d.data, &mut head);
    line()
        .s("blk dev=")
        .dec(n)
        .s(" read sector=0 count=")
        .dec(u64::from(SECTORS))
        .s(" status=")
        .dec(u64::from(s))
        .s(" fnv1a=")
        .hex_digits(u64::from(fnv1a((0..DATA_LEN).map(|i| d.data_byte(i)))), 8)
        .s(" head=\"")
        .bytes(&head)
        .s("\"")
        .end();

    let mut state = pattern_start(seed);
    for w in 0..u64::from(DATA_LEN / 8) {
        // SAFETY: DATA_LEN / 8 words fit in the data buffer.
        unsafe { write_phys(d.data + 8 * w, pattern_word(&mut state)) };
    }
    let expected = fnv1a((0..DATA_LEN).map(|i| d.data_byte(i)));
    let s = d.request(T_OUT, WRITE_SECTOR, DATA_LEN, false);
    line()
        .s("blk dev=")
        .dec(n)
        .s(" write sector=")
        .dec(WRITE_SECTOR)
        .s(" count=")
        .dec(u64::from(SECTORS))
        .s(" status=")
        .dec(u64::from(s))
        .end();
    if s == 0 {
        let s = d.request(T_FLUSH, 0, 0, false);
        line()
            .s("blk dev=")
            .dec(n)
            .s(" flush status=")
            .dec(u64::from(s))
            .end();
        // Clear the buffer so the read back cannot see the old bytes.
        for w in 0..u64::from(DATA_LEN / 8) {
            // SAFETY: as above.
            unsafe { write_phys(d.data + 8 * w, 0u64) };
        }
        let s = d.request(T_IN, WRITE_SECTOR, DATA_LEN, true);
        let got = fnv1a((0..DATA_LEN).map(|i| d.data_byte(i)));
        line()
            .s("blk dev=")
            .dec(n)
            .s(" readback sector=")
            .dec(WRITE_SECTOR)
            .s(" status=")
            .dec(u64::from(s))
            .s(" match=")
            .dec(u64::from(got == expected))
            .end();
    }

    let s = d.request(T_IN, capacity, 512, true);
    line()
        .s("blk dev=")
        .dec(n)
        .s(" read-past-end sector=")
        .dec(capacity)
        .s(" status=")
        .dec(u64::from(s))
        .end();
}
