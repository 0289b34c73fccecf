//! The virtio-blk device: configuration, feature negotiation, and request execution.
//!
//! [`process_queue`] is the whole data path: it pops chains, parses and executes them against a
//! [`Disk`] and fills the used ring. It needs no KVM and no event loop, so the tests at the bottom
//! drive it through `virtio_queue::mock::MockSplitQueue` with hostile chains.

use std::io::{Read, Write};
use std::sync::Arc;

use event_manager::{EventOps, Events};
use log::{debug, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{id_bytes, DiskBackend, RawFile};
use super::metrics::BlockMetrics;
use super::request::{DiscardSegment, Request, RequestKind, DISCARD_SEGMENT_LEN};
use super::{
    features, status, BlockError, ID_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, QUEUE_SIZE,
    SECTOR_SHIFT, SECTOR_SIZE, SEG_MAX, SIZE_MAX,
};
use crate::virtio::glue::{DeviceEvent, DeviceEvents};
use crate::virtio::mmio::VIRTIO_RING_F_EVENT_IDX;
use crate::virtio::{
    device_type, ActivateContext, ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

/// Bytes moved between the disk and guest memory per step (bounds host memory per request).
const BOUNCE_LEN: usize = 64 * 1024;
/// Length of the configuration space this device implements (up to write_zeroes_may_unmap).
const CONFIG_LEN: usize = 60;

/// How the VMM asks for a block device (`--disk PATH[,ro]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// Raw disk image (regular file or block device) on the host.
    pub path: std::path::PathBuf,
    /// Expose the disk read-only (VIRTIO_BLK_F_RO); the image is then opened read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Serial answered to GET_ID (at most 20 bytes); by default derived from the image's
    /// device and inode numbers.
    #[serde(default)]
    pub serial: Option<String>,
}

impl std::str::FromStr for BlockConfig {
    type Err = BlockError;

    /// Parses the CLI form `PATH[,ro][,serial=ID]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts.next().filter(|p| !p.is_empty());
        let Some(path) = path else {
            return Err(BlockError::BadSpec(s.to_owned()));
        };
        let mut config = Self {
            path: path.into(),
            read_only: false,
            serial: None,
        };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => config.read_only = true,
                Some(("serial", id)) if id.len() <= ID_LEN && !id.is_empty() => {
                    config.serial = Some(id.to_owned())
                }
                _ => return Err(BlockError::BadSpec(s.to_owned())),
            }
        }
        Ok(config)
    }
}

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
                    BlockMetrics::inc(&m.flushes);
                    status::OK
                }
                Err(e) => {
                    warn!("virtio-blk: flush failed: {e}");
                    status::IOERR
                }
            },
            RequestKind::GetId => {
                let n = req.data.available_bytes().min(ID_LEN);
                BlockMetrics::inc(&m.get_ids);
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
            status::IOERR => BlockMetrics::inc(&m.io_errors),
            status::UNSUPP => BlockMetrics::inc(&m.unsupported),
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
                warn!("virtio-blk: read at {offset:#x} failed: {e}");
                return status::IOERR;
            }
            if req.data.write_all(buf).is_err() {
                return status::IOERR;
            }
            offset += n as u64;
            left -= n as u64;
        }
        BlockMetrics::inc(&m.reads);
        BlockMetrics::add(&m.read_bytes, len);
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
                warn!("virtio-blk: write at {offset:#x} failed: {e}");
                return status::IOERR;
            }
            offset += n as u64;
            left -= n as u64;
        }
        BlockMetrics::inc(&m.writes);
        BlockMetrics::add(&m.write_bytes, len);
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
                warn!("virtio-blk: discard/write-zeroes at {offset:#x} failed: {e}");
                return status::IOERR;
            }
        }
        BlockMetrics::inc(if zero { &m.write_zeroes } else { &m.discards });
        status::OK
    }
}

/// Serves every available chain of `queue`; returns whether the driver must be interrupted.
///
/// Chains that cannot carry a status byte are returned with used length 0. A queue whose rings
/// are unusable yields an error and is left alone until the driver resets the device.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &mut Disk,
    metrics: &BlockMetrics,
) -> Result<bool, virtio_queue::Error> {
    let mut used_any = false;
    loop {
        queue.disable_notification(mem)?;
        let mut popped = false;
        while let Some(chain) = queue.iter(mem)?.next() {
            popped = true;
            let head = chain.head_index();
            let used_len = match Request::parse(chain, mem, usize::from(QUEUE_SIZE)) {
                Ok(mut req) => {
                    let status = disk.execute(&mut req, metrics);
                    req.complete(status)
                }
                Err(e) => {
                    debug!("virtio-blk: dropping chain {head}: {e}");
                    BlockMetrics::inc(&metrics.invalid_chains);
                    0
                }
            };
            match queue.add_used(mem, head, used_len) {
                Ok(()) => used_any = true,
                // A head index past the queue cannot be returned; the driver loses that entry.
                // (Its chain was empty, so it is already counted as invalid.)
                Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
                Err(e) => return Err(e),
            }
        }
        // enable_notification reports pending work; if none could be popped the avail ring is
        // lying, so stop rather than spin.
        if !queue.enable_notification(mem)? || !popped {
            break;
        }
    }
    Ok(used_any && queue.needs_notification(mem)?)
}

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<dyn VirtioInterrupt>,
    broken: bool,
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: Disk,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
    events: DeviceEvents,
    metrics: Arc<BlockMetrics>,
}

impl Block {
    /// Opens the image named by `config` as a raw file.
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let backend = RawFile::open(&config.path, config.read_only)?;
        Self::with_backend(Box::new(backend), config.serial.clone())
    }

    /// A device over any backend; `serial` overrides the backend's GET_ID serial.
    pub fn with_backend(
        backend: Box<dyn DiskBackend>,
        serial: Option<String>,
    ) -> Result<Self, BlockError> {
        let read_only = backend.read_only();
        let discard = backend.supports_discard() && !read_only;
        let disk = Disk::new(backend, serial)?;
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << features::SIZE_MAX)
            | (1 << features::SEG_MAX)
            | (1 << features::FLUSH);
        if read_only {
            avail_features |= 1 << features::RO;
        } else {
            avail_features |= 1 << features::WRITE_ZEROES;
        }
        if discard {
            avail_features |= 1 << features::DISCARD;
        }
        Ok(Self {
            config: config_space(disk.capacity()),
            disk,
            avail_features,
            acked_features: 0,
            active: None,
            events: DeviceEvents::new().map_err(BlockError::EventFd)?,
            metrics: Arc::new(BlockMetrics::default()),
        })
    }

    /// The device's counters (shared; read them at any time).
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// Whether a driver activated the device and has not reset it since.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Registers the activation eventfd with the event loop.
    pub(super) fn init_events(&self, ops: &mut EventOps) {
        self.events.init(ops);
    }

    /// Consumes an event-loop event and says what it was (see `virtio/glue.rs`).
    pub(super) fn dispatch(&mut self, events: &Events, ops: &mut EventOps) -> DeviceEvent {
        let queue_evts = self.active.as_ref().map(|a| a.queue_evts.as_slice());
        self.events.dispatch(events, ops, queue_evts)
    }

    /// Serves the request queue and interrupts the driver if it needs to know.
    pub fn process_request_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.broken {
            return;
        }
        BlockMetrics::inc(&self.metrics.queue_events);
        match process_queue(
            &mut active.queue,
            &active.mem,
            &mut self.disk,
            &self.metrics,
        ) {
            Ok(true) => {
                BlockMetrics::inc(&self.metrics.interrupts);
                if let Err(e) = active.interrupt.trigger(InterruptKind::Queue) {
                    warn!("virtio-blk: raising the queue interrupt failed: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => {
                warn!("virtio-blk: request queue unusable, waiting for a reset: {e}");
                BlockMetrics::inc(&self.metrics.queue_errors);
                active.broken = true;
            }
        }
    }
}

/// The virtio_blk_config structure for a disk of `capacity` sectors.
fn config_space(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &capacity.to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    // 16: geometry, 20: blk_size, 24: topology, 32: writeback: unused (features not offered).
    put(34, &1u16.to_le_bytes()); // num_queues
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_DISCARD_SEG.to_le_bytes());
    put(44, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
        let has = |bit: u32| self.acked_features & (1 << bit) != 0;
        let (discard, zeroes) = (has(features::DISCARD), has(features::WRITE_ZEROES));
        self.disk.set_negotiated(discard, zeroes);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = at.and_then(|a| self.config.get(a)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-blk: ignoring config write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let (Some(queue), Some(evt)) = (
            ctx.queues.into_iter().next(),
            ctx.queue_evts.into_iter().next(),
        ) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        if got != 1 {
            return Err(ActivateError::QueueCount { expected: 1, got });
        }
        self.active = Some(Active {
            mem: ctx.mem,
            queue,
            queue_evts: vec![evt],
            interrupt: ctx.interrupt,
            broken: false,
        });
        BlockMetrics::inc(&self.metrics.activations);
        self.events.signal();
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.acked_features = 0;
        self.disk.set_negotiated(false, false);
        if self.active.take().is_some() {
            self.events.signal();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::backend::MemDisk;
    use crate::virtio::block::request_type as rt;
    use crate::virtio::test_utils::*;
    use std::sync::Mutex;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const SECTORS: u64 = 64;

    fn image(ro: bool) -> (tempfile::NamedTempFile, Disk) {
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
    fn push_req(
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

    fn run(q: &MockSplitQueue<GuestMemoryMmap>, mem: &GuestMemoryMmap, disk: &mut Disk) -> bool {
        let mut queue: Queue = q.create_queue().unwrap();
        let m = BlockMetrics::default();
        process_queue(&mut queue, mem, disk, &m).unwrap()
    }

    fn status_at(mem: &GuestMemoryMmap, addr: u64) -> u8 {
        read_mem(mem, addr, 1)[0]
    }

    #[test]
    fn write_then_read_round_trips_through_the_file() {
        let (f, mut disk) = image(false);
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let (st_w, data_w) = push_req(
            &q,
            &mem,
            0,
            0x2_0000,
            (rt::OUT, 2),
            &[(700, false), (324, false)],
        );
        let payload: Vec<u8> = (0..1024u32)
            .map(|i| i.to_le_bytes()[0].wrapping_mul(7))
            .collect();
        write_mem(&mem, data_w[0], &payload[..700]);
        write_mem(&mem, data_w[1], &payload[700..]);
        let (st_r, data_r) = push_req(
            &q,
            &mem,
            4,
            0x4_0000,
            (rt::IN, 2),
            &[(512, true), (256, true), (256, true)],
        );
        assert!(run(&q, &mem, &mut disk));
        assert_eq!(status_at(&mem, st_w), status::OK);
        assert_eq!(status_at(&mem, st_r), status::OK);
        assert_eq!(used(&q), vec![(0, 1), (4, 1025)]);
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(&on_disk[1024..2048], &payload[..]);
        assert_eq!(on_disk[2048], (2048 % 253) as u8);
        let mut back = read_mem(&mem, data_r[0], 512);
        back.extend(read_mem(&mem, data_r[1], 256));
        back.extend(read_mem(&mem, data_r[2], 256));
        assert_eq!(back, payload);
    }

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

    fn segment(sector: u64, num: u32, flags: u32) -> Vec<u8> {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend_from_slice(&num.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
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

    #[test]
    fn hostile_chains_are_returned_empty_and_later_requests_still_work() {
        let mut disk = Disk::new(Box::new(MemDisk::new(8192, false)), None).unwrap();
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        // Status outside guest memory.
        add_chain(&q, 0, &[(0x2_0000, 16, false), (MEM_SIZE as u64, 1, true)]);
        // A loop of readable descriptors.
        store_desc(&q, 2, 0x2_0000, 16, F_NEXT, 3);
        store_desc(&q, 3, 0x2_0000, 16, F_NEXT, 2);
        publish(&q, 2);
        // A head index past the descriptor table.
        publish(&q, 999);
        // Data descriptor in read direction for a read request (device must write it).
        let (st, _) = push_req(&q, &mem, 4, 0x4_0000, (rt::IN, 0), &[(512, false)]);
        // A good write afterwards.
        let (ok, d) = push_req(&q, &mem, 8, 0x6_0000, (rt::OUT, 1), &[(512, false)]);
        write_mem(&mem, d[0], &[0x5a; 512]);
        // Canary right after guest-visible buffers must stay untouched.
        write_mem(&mem, 0x8_0000, &[0xcc; 64]);
        let m = BlockMetrics::default();
        let mut queue: Queue = q.create_queue().unwrap();
        assert!(process_queue(&mut queue, &mem, &mut disk, &m).unwrap());
        assert_eq!(used(&q), vec![(0, 0), (2, 0), (4, 1), (8, 1)]);
        assert_eq!(status_at(&mem, st), status::IOERR);
        assert_eq!(status_at(&mem, ok), status::OK);
        assert_eq!(read_mem(&mem, 0x8_0000, 64), vec![0xcc; 64]);
        assert_eq!(m.to_json()["invalid_chains"], 3);
        assert_eq!(m.to_json()["io_errors"], 1);
    }

    #[test]
    fn avail_index_beyond_queue_size_is_a_queue_error() {
        let mut disk = Disk::new(Box::new(MemDisk::new(4096, false)), None).unwrap();
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        q.avail().idx().store(100);
        let mut queue: Queue = q.create_queue().unwrap();
        let m = BlockMetrics::default();
        assert!(process_queue(&mut queue, &mem, &mut disk, &m).is_err());
    }

    #[derive(Debug, Default)]
    struct CountingInterrupt(Mutex<Vec<InterruptKind>>);

    impl VirtioInterrupt for CountingInterrupt {
        fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
            self.0.lock().unwrap().push(kind);
            Ok(())
        }
    }

    #[test]
    fn disk_spec_parses_path_ro_and_serial() {
        let c: BlockConfig = "/tmp/a.img,ro,serial=abc".parse().unwrap();
        assert_eq!(c.path, std::path::PathBuf::from("/tmp/a.img"));
        assert!(c.read_only);
        assert_eq!(c.serial.as_deref(), Some("abc"));
        let c: BlockConfig = "disk.img".parse().unwrap();
        assert!(!c.read_only && c.serial.is_none());
        for bad in [
            "",
            ",ro",
            "a.img,rw",
            "a.img,serial=",
            "a.img,serial=123456789012345678901",
        ] {
            let err = bad.parse::<BlockConfig>().unwrap_err();
            assert!(err.to_string().contains("PATH[,ro]"), "{bad}: {err}");
        }
    }

    #[test]
    fn block_device_config_features_and_activation() {
        let ro = Block::with_backend(Box::new(MemDisk::new(1 << 20, true)), None).unwrap();
        assert_ne!(ro.avail_features() & (1 << features::RO), 0);
        assert_eq!(ro.avail_features() & (1 << features::WRITE_ZEROES), 0);
        let mut cap = [0u8; 8];
        ro.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        let mut past = [0xffu8; 4];
        ro.read_config(u64::MAX - 1, &mut past);
        assert_eq!(past, [0; 4]);
        assert!(matches!(
            Block::with_backend(Box::new(MemDisk::new(512, false)), Some("x".repeat(21))),
            Err(BlockError::SerialTooLong(_))
        ));

        let mut dev = Block::with_backend(Box::new(MemDisk::new(1 << 20, false)), None).unwrap();
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let (st, _) = push_req(&q, &mem, 0, 0x2_0000, (rt::FLUSH, 0), &[]);
        let irq = Arc::new(CountingInterrupt::default());
        let bad = ActivateContext {
            mem: mem.clone(),
            queues: vec![],
            queue_evts: vec![],
            interrupt: irq.clone(),
        };
        assert!(dev.activate(bad).is_err());
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues: vec![q.create_queue().unwrap()],
            queue_evts: vec![EventFd::new(0).unwrap()],
            interrupt: irq.clone(),
        };
        dev.activate(ctx).unwrap();
        assert!(dev.is_active());
        dev.process_request_queue();
        assert_eq!(status_at(&mem, st), status::OK);
        assert_eq!(*irq.0.lock().unwrap(), vec![InterruptKind::Queue]);
        assert!(dev.reset());
        assert!(!dev.is_active());
        dev.process_request_queue();
        assert_eq!(dev.metrics().to_json()["activations"], 1);
    }
}
