//! The virtio-blk device: configuration, feature negotiation, and request execution.
//!
//! [`process_queue`] is the whole data path: it pops chains, parses and executes them against a
//! [`Disk`] and fills the used ring. It needs no KVM and no event loop, so the tests at the bottom
//! drive it through `virtio_queue::mock::MockSplitQueue` with hostile chains.

use std::sync::Arc;

use log::debug;
use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::backend::{DiskBackend, RawFile};
use super::disk::Disk;
use super::metrics::BlockMetrics;
use super::request::{Request, RequestKind};
use super::{
    features, BlockError, ID_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, NAME, QUEUE_SIZE, SEG_MAX,
    SIZE_MAX,
};
use crate::virtio::chains::{serve_queue_until, Chain, RequestQueue};
use crate::virtio::glue::{ignore_config_write, read_config_bytes};
use crate::virtio::mmio::VIRTIO_RING_F_EVENT_IDX;
use crate::virtio::rate_limiter::{Kind, Limit, Throttle};
use crate::virtio::{
    device_type, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};

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
    /// Rate limits of the guest's reads and writes (`--device-read-bps` and friends).
    #[serde(default)]
    pub limits: BlockLimits,
}

/// The rate limits of one disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockLimits {
    /// Reads: bytes and requests per second.
    #[serde(default)]
    pub read: Limit,
    /// Writes (and write-zeroes, discards): bytes and requests per second.
    #[serde(default)]
    pub write: Limit,
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
            limits: BlockLimits::default(),
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
    let mut unlimited = Throttle::new(Limit::default(), Limit::default()).map_err(|e| {
        debug!("virtio-blk: {e}");
        virtio_queue::Error::QueueNotReady
    })?;
    process_queue_throttled(queue, mem, disk, metrics, &mut unlimited)
}

/// [`process_queue`] under `throttle`: reads are its first kind, writes its second; once either
/// is in debt the rest of the queue waits for its timer.
pub fn process_queue_throttled(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &mut Disk,
    metrics: &BlockMetrics,
    throttle: &mut Throttle,
) -> Result<bool, virtio_queue::Error> {
    // A head index past the queue cannot be returned; its chain was empty, so it is already
    // counted as invalid.
    let throttled = std::cell::RefCell::new(throttle);
    serve_queue_until(
        queue,
        mem,
        None,
        || {
            let mut t = throttled.borrow_mut();
            let blocked = t.blocked(Kind::First) || t.blocked(Kind::Second);
            if blocked {
                metrics.throttled.inc();
            }
            blocked
        },
        |chain| execute_chain(chain, mem, disk, metrics, &mut throttled.borrow_mut()),
    )
}

/// Parses and executes one request, charging it to `throttle`; returns the used length.
fn execute_chain(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    disk: &mut Disk,
    m: &BlockMetrics,
    throttle: &mut Throttle,
) -> u32 {
    let head = chain.head_index();
    match Request::parse(chain, mem, usize::from(QUEUE_SIZE)) {
        Ok(mut req) => {
            let charge = match req.kind {
                RequestKind::In => Some((Kind::First, req.data.available_bytes())),
                RequestKind::Out | RequestKind::Discard | RequestKind::WriteZeroes => {
                    Some((Kind::Second, req.payload.available_bytes()))
                }
                _ => None,
            };
            let status = disk.execute(&mut req, m);
            if let Some((kind, bytes)) = charge {
                throttle.charge(kind, bytes as u64);
            }
            req.complete(status)
        }
        Err(e) => {
            debug!("virtio-blk: dropping chain {head}: {e}");
            m.invalid_chains.inc();
            0
        }
    }
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    pub(super) disk: Disk,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    pub(super) queue: RequestQueue,
    pub(super) metrics: Arc<BlockMetrics>,
    pub(super) throttle: Throttle,
}

impl Block {
    /// Opens the image named by `config` as a raw file.
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let backend = RawFile::open(&config.path, config.read_only)?;
        let mut block = Self::with_backend(Box::new(backend), config.serial.clone())?;
        if config.limits != BlockLimits::default() {
            block.throttle = Throttle::new(config.limits.read, config.limits.write)
                .map_err(BlockError::EventFd)?;
        }
        Ok(block)
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
            queue: RequestQueue::new().map_err(BlockError::EventFd)?,
            metrics: Arc::new(BlockMetrics::default()),
            throttle: Throttle::new(Limit::default(), Limit::default())
                .map_err(BlockError::EventFd)?,
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
        self.queue.is_active()
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
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        ignore_config_write(NAME, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.queue.activate(ctx, &self.metrics.queue)
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.queue.queue_states()
    }

    fn reset(&mut self) -> bool {
        self.acked_features = 0;
        self.disk.set_negotiated(false, false);
        self.queue.reset();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::backend::MemDisk;
    use crate::virtio::block::request_type as rt;
    use crate::virtio::block::status;
    use crate::virtio::block::test_support::*;
    use crate::virtio::glue::RequestDevice;
    use crate::virtio::metrics::DeviceMetrics;
    use crate::virtio::test_utils::*;
    use crate::virtio::testing::interrupt;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

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

    #[test]
    fn a_read_limit_holds_reads_back_and_leaves_writes_alone() {
        let (_f, mut disk) = image(false);
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        // Four 1 KiB reads, then a write.
        for i in 0..4u16 {
            push_req(
                &q,
                &mem,
                i * 3,
                0x2_0000 + u64::from(i) * 0x2000,
                (rt::IN, 0),
                &[(1024, true)],
            );
        }
        // 1 KiB per second: the bucket holds 102 bytes, the first read takes it into debt.
        let read = Limit {
            bytes_per_sec: Some(1024),
            ops_per_sec: None,
        };
        let mut throttle = Throttle::new(read, Limit::default()).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let m = BlockMetrics::default();
        process_queue_throttled(&mut queue, &mem, &mut disk, &m, &mut throttle).unwrap();
        assert_eq!(m.reads.get(), 1, "one read, then the rest waits");
        assert_eq!(m.throttled.get(), 1);
        assert!(throttle.waiting());
        // Serving again before the debt is paid serves nothing.
        process_queue_throttled(&mut queue, &mem, &mut disk, &m, &mut throttle).unwrap();
        assert_eq!(m.reads.get(), 1);
        // Writes are limited apart: an unlimited write throttle never holds them.
        let mut writes = Throttle::new(Limit::default(), Limit::default()).unwrap();
        assert!(!writes.blocked(Kind::Second));
        writes.charge(Kind::Second, 1 << 30);
        assert!(!writes.blocked(Kind::Second));
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
        let irq = interrupt();
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
        assert_eq!(irq.queue_count(), 1);
        assert_eq!(irq.config.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(dev.reset());
        assert!(!dev.is_active());
        dev.process_request_queue();
        assert_eq!(dev.metrics().to_json()["activations"], 1);
    }
}
