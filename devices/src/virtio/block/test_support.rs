//! Shared helpers for the block device tests: a patterned image file and request builders.

use std::io::Write as _;

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::backend::RawFile;
use super::device::process_queue;
use super::disk::Disk;
use super::metrics::BlockMetrics;
use crate::virtio::test_utils::*;

/// Size of the test image in sectors.
pub const SECTORS: u64 = 64;

/// A patterned image file (byte i = i % 253) and a disk over it with everything negotiated.
pub fn image(ro: bool) -> (tempfile::NamedTempFile, Disk) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..SECTORS * 512).map(|i| (i % 253) as u8).collect();
    f.write_all(&data).unwrap();
    let backend = RawFile::open(f.path(), ro).unwrap();
    let mut disk = Disk::new(Box::new(backend), Some("disk-serial".into())).unwrap();
    disk.set_negotiated(true, true);
    (f, disk)
}

/// Lays out one request at `base`: header, data descriptors after `base + 0x1000`, status at
/// `base + 0x100`. Returns the status address and the data addresses.
pub fn push_req(
    q: &MockSplitQueue<GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    first: u16,
    base: u64,
    (t, sector): (u32, u64),
    data: &[(u32, bool)],
) -> (u64, Vec<u64>) {
    let mut h = t.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    write_mem(mem, base, &h);
    write_mem(mem, base + 0x100, &[0xee]);
    let mut descs = vec![(base, 16, false)];
    let mut addrs = Vec::new();
    let mut at = base + 0x1000;
    for &(len, writable) in data {
        descs.push((at, len, writable));
        addrs.push(at);
        at += u64::from(len);
    }
    descs.push((base + 0x100, 1, true));
    add_chain(q, first, &descs);
    (base + 0x100, addrs)
}

/// Serves the queue once; returns whether an interrupt is due.
pub fn run(q: &MockSplitQueue<GuestMemoryMmap>, mem: &GuestMemoryMmap, disk: &mut Disk) -> bool {
    let mut queue: Queue = q.create_queue().unwrap();
    let m = BlockMetrics::default();
    process_queue(&mut queue, mem, disk, &m).unwrap()
}

/// The status byte at `addr`.
pub fn status_at(mem: &GuestMemoryMmap, addr: u64) -> u8 {
    read_mem(mem, addr, 1)[0]
}

/// One DISCARD/WRITE_ZEROES segment in wire form.
pub fn segment(sector: u64, num: u32, flags: u32) -> Vec<u8> {
    let mut v = sector.to_le_bytes().to_vec();
    v.extend_from_slice(&num.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}
