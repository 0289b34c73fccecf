//! virtio-rng (virtio 1.2, section 5.4): two reads of [`LEN`] bytes into device-writable buffers.
//!
//! Serial lines:
//!   mvm-test-guest: rng read=<1|2> status=ok len=<dec> hex=<2*len hex digits>

use crate::common::out::line;
use crate::common::virtio::{copy_from, dma_alloc, id, Buffer, Slots, SECOND};
use crate::{check, fail};

/// Bytes asked for per read.
const LEN: usize = 32;

/// Reads the entropy device twice and prints both results.
pub fn run(slots: &Slots) {
    let Some(t) = slots.with_id(id::RNG).next() else {
        fail("rng: no entropy device announced");
    };
    check(t.negotiate(0), "rng negotiate");
    let mut q = check(t.queue(0, 4), "rng queue");
    check(t.driver_ok(), "rng");
    for read in 1..=2u64 {
        let buf = dma_alloc(LEN, 8);
        let b = Buffer {
            addr: buf,
            len: LEN as u32,
            writable: true,
        };
        let Some(len) = q.request(&[b], 5 * SECOND) else {
            fail("rng: the device did not answer");
        };
        let mut bytes = [0u8; LEN];
        let n = (len as usize).min(LEN);
        copy_from(buf, &mut bytes[..n]);
        line()
            .s("rng read=")
            .dec(read)
            .s(" status=ok len=")
            .dec(u64::from(len))
            .s(" hex=")
            .hex_bytes(&bytes[..n])
            .end();
    }
}
