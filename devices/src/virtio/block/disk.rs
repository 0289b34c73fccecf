//! Executing parsed virtio-blk requests against a [`DiskBackend`].

use std::io::{Read, Write};

use log::debug;

use super::backend::{id_bytes, DiskBackend};
use super::metrics::BlockMetrics;
use super::request::{DiscardSegment, Request, RequestKind, DISCARD_SEGMENT_LEN};
use super::{
    status, BlockError, ID_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SHIFT, SECTOR_SIZE,
};

/// Bytes moved between the disk and guest memory per step (bounds host memory per request).
const BOUNCE_LEN: usize = 64 * 1024;

/// The disk as the data path sees it: backend, geometry and negotiated request types.
#[derive(Debug)]
pub struct Disk {
    backend: Box<dyn DiskBackend>,
    capacity: u64,
    id: [u8; ID_LEN],
    discard: bool,
    write_zeroes: bool,
    bounce: Vec<u8>,
}

impl Disk {
    /// Wraps a backend; DISCARD/WRITE_ZEROES stay off until negotiated.
    pub fn new(backend: Box<dyn DiskBackend>, serial: Option<String>) -> Result<Self, BlockError> {
        let serial = match serial {
            Some(s) if s.len() > ID_LEN => return Err(BlockError::SerialTooLong(s)),
            Some(s) => s,
            None => backend.serial(),
        };
        Ok(Self {
            capacity: backend.len() >> SECTOR_SHIFT,
            id: id_bytes(&serial),
            backend,
            discard: false,
            write_zeroes: false,
            bounce: vec![0; BOUNCE_LEN],
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Enables the request types the driver accepted.
    pub fn set_negotiated(&mut self, discard: bool, write_zeroes: bool) {
        self.discard = discard && self.backend.supports_discard() && !self.backend.read_only();
        self.write_zeroes = write_zeroes && !self.backend.read_only();
    }

    /// Byte offset of `sector` if `[sector, sector + len bytes)` is whole sectors on the disk.
    fn byte_offset(&self, sector: u64, len: u64) -> Option<u64> {
        if len % SECTOR_SIZE != 0 {
            return None;
        }
        let end = sector.checked_add(len >> SECTOR_SHIFT)?;
        (end <= self.capacity).then_some(sector << SECTOR_SHIFT)
    }

    /// Executes one parsed request and returns its status byte.
    pub fn execute(&mut self, req: &mut Request<'_, ()>, m: &BlockMetrics) -> u8 {
        let status = match req.kind {
            RequestKind::In => self.read(req, m),
            RequestKind::Out => self.write(req, m),
            RequestKind::Flush => match self.backend.flush() {
                Ok(()) => {
                    m.flushes.inc();
                    status::OK
                }
                Err(e) => {
                    crate::warn_limited!("virtio-blk: flush failed: {e}");
                    status::IOERR
                }
            },
            RequestKind::GetId => {
                let n = req.data.available_bytes().min(ID_LEN);
                m.get_ids.inc();
                match req.data.write_all(&self.id[..n]) {
                    Ok(()) => status::OK,
                    Err(_) => status::IOERR,
                }
            }
            RequestKind::Discard if self.discard => self.discard_or_zero(req, false, m),
            RequestKind::WriteZeroes if self.write_zeroes => self.discard_or_zero(req, true, m),
            RequestKind::Discard | RequestKind::WriteZeroes | RequestKind::Unsupported(_) => {
                debug!("virtio-blk: unsupported request {:?}", req.kind);
                status::UNSUPP
            }
            RequestKind::Malformed => status::IOERR,
        };
        match status {
            status::IOERR => m.io_errors.inc(),
            status::UNSUPP => m.unsupported.inc(),
            _ => {}
        }
        status
    }

    fn read(&mut self, req: &mut Request<'_, ()>, m: &BlockMetrics) -> u8 {
        if req.payload.available_bytes() != 0 {
            // Device-readable data buffers on a read: the driver got the direction wrong.
            return status::IOERR;
        }
        let len = req.data.available_bytes() as u64;
        let Some(mut offset) = self.byte_offset(req.sector, len) else {
            return status::IOERR;
        };
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left).map_or(BOUNCE_LEN, |l| l.min(BOUNCE_LEN));
            let buf = &mut self.bounce[..n];
            if let Err(e) = self.backend.read_at(buf, offset) {
                crate::warn_limited!("virtio-blk: read at {offset:#x} failed: {e}");
                return status::IOERR;
            }
            if req.data.write_all(buf).is_err() {
                return status::IOERR;
            }
            offset += n as u64;
            left -= n as u64;
        }
        m.reads.inc();
        m.read_bytes.add(len);
        status::OK
    }

    fn write(&mut self, req: &mut Request<'_, ()>, m: &BlockMetrics) -> u8 {
        if self.backend.read_only() || req.data.available_bytes() != 0 {
            return status::IOERR;
        }
        let len = req.payload.available_bytes() as u64;
        let Some(mut offset) = self.byte_offset(req.sector, len) else {
            return status::IOERR;
        };
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left).map_or(BOUNCE_LEN, |l| l.min(BOUNCE_LEN));
            let buf = &mut self.bounce[..n];
            if req.payload.read_exact(buf).is_err() {
                return status::IOERR;
            }
            if let Err(e) = self.backend.write_at(buf, offset) {
                crate::warn_limited!("virtio-blk: write at {offset:#x} failed: {e}");
                return status::IOERR;
            }
            offset += n as u64;
            left -= n as u64;
        }
        m.writes.inc();
        m.write_bytes.add(len);
        status::OK
    }

    fn discard_or_zero(&mut self, req: &mut Request<'_, ()>, zero: bool, m: &BlockMetrics) -> u8 {
        let len = req.payload.available_bytes();
        let count = len / DISCARD_SEGMENT_LEN;
        if len == 0 || len % DISCARD_SEGMENT_LEN != 0 || count > MAX_DISCARD_SEG as usize {
            return status::IOERR;
        }
        let mut ranges = Vec::with_capacity(count);
        for _ in 0..count {
            let Ok(raw) = req.payload.read_obj::<[u8; DISCARD_SEGMENT_LEN]>() else {
                return status::IOERR;
            };
            let seg = DiscardSegment::from_bytes(&raw);
            // Bit 0 (unmap) is only defined for WRITE_ZEROES; anything else is reserved.
            let allowed = if zero { 1 } else { 0 };
            if seg.flags & !allowed != 0 {
                return status::UNSUPP;
            }
            let bytes = u64::from(seg.num_sectors) << SECTOR_SHIFT;
            match self.byte_offset(seg.sector, bytes) {
                Some(off) if seg.num_sectors <= MAX_DISCARD_SECTORS => {
                    ranges.push((off, bytes, seg.flags & 1 != 0))
                }
                _ => return status::IOERR,
            }
        }
        for (offset, len, may_unmap) in ranges {
            let r = if zero {
                self.backend.write_zeroes(offset, len, may_unmap)
            } else {
                self.backend.discard(offset, len)
            };
            if let Err(e) = r {
                crate::warn_limited!("virtio-blk: discard/write-zeroes at {offset:#x} failed: {e}");
                return status::IOERR;
            }
        }
        (if zero { &m.write_zeroes } else { &m.discards }).inc();
        status::OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::device::process_queue;
    use crate::virtio::block::request_type as rt;
    use crate::virtio::block::test_support::*;
    use crate::virtio::metrics::DeviceMetrics;
    use crate::virtio::test_utils::*;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    #[test]
    fn flush_get_id_and_unknown_types() {
        let (_f, mut disk) = image(false);
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let (st_flush, _) = push_req(&q, &mem, 0, 0x2_0000, (rt::FLUSH, 0), &[]);
        let (st_id, id) = push_req(&q, &mem, 2, 0x4_0000, (rt::GET_ID, 0), &[(20, true)]);
        let (st_bad, _) = push_req(&q, &mem, 5, 0x6_0000, (99, 0), &[]);
        let m = BlockMetrics::default();
        let mut queue: Queue = q.create_queue().unwrap();
        process_queue(&mut queue, &mem, &mut disk, &m).unwrap();
        assert_eq!(status_at(&mem, st_flush), status::OK);
        assert_eq!(status_at(&mem, st_id), status::OK);
        assert_eq!(read_mem(&mem, id[0], 20), b"disk-serial\0\0\0\0\0\0\0\0\0");
        assert_eq!(status_at(&mem, st_bad), status::UNSUPP);
        let json = m.to_json();
        assert_eq!(
            (json["flushes"].clone(), json["get_ids"].clone()),
            (1.into(), 1.into())
        );
        assert_eq!(json["unsupported"], 1);
    }

    #[test]
    fn read_only_disk_rejects_writes_and_zeroing() {
        let (f, mut disk) = image(true);
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let (st_w, d) = push_req(&q, &mem, 0, 0x2_0000, (rt::OUT, 0), &[(512, false)]);
        write_mem(&mem, d[0], &[0x55; 512]);
        let (st_z, z) = push_req(&q, &mem, 3, 0x4_0000, (rt::WRITE_ZEROES, 0), &[(16, false)]);
        write_mem(
            &mem,
            z[0],
            &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        );
        let (st_f, _) = push_req(&q, &mem, 6, 0x6_0000, (rt::FLUSH, 0), &[]);
        run(&q, &mem, &mut disk);
        assert_eq!(status_at(&mem, st_w), status::IOERR);
        assert_eq!(status_at(&mem, st_z), status::UNSUPP);
        assert_eq!(status_at(&mem, st_f), status::OK);
        assert_eq!(std::fs::read(f.path()).unwrap()[0], 0);
        assert_eq!(std::fs::read(f.path()).unwrap()[1], 1);
    }

    #[test]
    fn requests_outside_the_disk_or_not_whole_sectors_fail() {
        let (_f, mut disk) = image(false);
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let (a, _) = push_req(
            &q,
            &mem,
            0,
            0x2_0000,
            (rt::IN, SECTORS - 1),
            &[(1024, true)],
        );
        let (b, _) = push_req(&q, &mem, 3, 0x4_0000, (rt::OUT, u64::MAX), &[(512, false)]);
        let (c, _) = push_req(&q, &mem, 6, 0x6_0000, (rt::IN, 0), &[(100, true)]);
        let (d, _) = push_req(&q, &mem, 9, 0x8_0000, (rt::IN, SECTORS - 1), &[(512, true)]);
        run(&q, &mem, &mut disk);
        assert_eq!(status_at(&mem, a), status::IOERR);
        assert_eq!(status_at(&mem, b), status::IOERR);
        assert_eq!(status_at(&mem, c), status::IOERR);
        assert_eq!(status_at(&mem, d), status::OK);
    }

    #[test]
    fn write_zeroes_and_discard_ranges() {
        let (f, mut disk) = image(false);
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let (a, z) = push_req(&q, &mem, 0, 0x2_0000, (rt::WRITE_ZEROES, 0), &[(32, false)]);
        let mut segs = segment(1, 2, 0);
        segs.extend(segment(10, 1, 1));
        write_mem(&mem, z[0], &segs);
        let (b, s) = push_req(&q, &mem, 3, 0x4_0000, (rt::DISCARD, 0), &[(16, false)]);
        write_mem(&mem, s[0], &segment(20, 1, 1));
        let (c, s) = push_req(&q, &mem, 6, 0x6_0000, (rt::WRITE_ZEROES, 0), &[(16, false)]);
        write_mem(&mem, s[0], &segment(SECTORS, 1, 0));
        let (d, s) = push_req(&q, &mem, 9, 0x8_0000, (rt::WRITE_ZEROES, 0), &[(15, false)]);
        write_mem(&mem, s[0], &[0; 15]);
        run(&q, &mem, &mut disk);
        assert_eq!(status_at(&mem, a), status::OK);
        assert_eq!(
            status_at(&mem, b),
            status::UNSUPP,
            "unmap flag is reserved for DISCARD"
        );
        assert_eq!(status_at(&mem, c), status::IOERR);
        assert_eq!(status_at(&mem, d), status::IOERR);
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(on_disk[511], (511 % 253) as u8);
        assert!(on_disk[512..1536].iter().all(|&x| x == 0));
        assert!(on_disk[5120..5632].iter().all(|&x| x == 0));
        assert_eq!(on_disk[1536], (1536 % 253) as u8);
        assert_eq!(on_disk.len() as u64, SECTORS * 512);
    }
}
