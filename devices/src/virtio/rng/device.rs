//! The virtio-rng device: every chain's device-writable buffers get fresh bytes from
//! `getrandom(2)`, at most [`MAX_REQUEST_BYTES`] per chain.

use std::io::{self, Write};
use std::sync::Arc;

use log::debug;
use virtio_queue::{Queue, Writer};
use vm_memory::GuestMemoryMmap;

use super::metrics::RngMetrics;
use super::{RngError, MAX_REQUEST_BYTES, NAME, QUEUE_SIZE};
use crate::virtio::chains::{serve_queue, Chain, RequestQueue};
use crate::virtio::glue::ignore_config_write;
use crate::virtio::mmio::VIRTIO_RING_F_EVENT_IDX;
use crate::virtio::{
    device_type, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Fills `buf` from the host kernel's entropy pool.
pub fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live buffer borrowed exclusively
        // here; the kernel writes at most `rest.len()` bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Answers one chain; returns the used length.
fn fill_chain(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
    metrics: &RngMetrics,
) -> u32 {
    let mut writer: Writer<'_, ()> = match Writer::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            debug!("{NAME}: dropping chain: {e}");
            metrics.invalid_chains.inc();
            return 0;
        }
    };
    let n = writer.available_bytes().min(buf.len());
    let bytes = &mut buf[..n];
    if let Err(e) = getrandom(bytes) {
        crate::warn_limited!("{NAME}: getrandom failed: {e}");
        metrics.entropy_errors.inc();
        return 0;
    }
    if writer.write_all(bytes).is_err() {
        metrics.invalid_chains.inc();
        return 0;
    }
    bytes.fill(0);
    metrics.requests.inc();
    metrics.bytes.add(n as u64);
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Serves every available chain of `queue`; returns whether the driver must be interrupted.
/// `buf` is scratch space whose length caps the bytes per request.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
    metrics: &RngMetrics,
) -> Result<bool, virtio_queue::Error> {
    // A head index past the queue cannot be returned: the driver loses that entry.
    serve_queue(queue, mem, Some(&metrics.invalid_chains), |chain| {
        fill_chain(chain, mem, buf, metrics)
    })
}

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    acked_features: u64,
    pub(super) queue: RequestQueue,
    pub(super) metrics: Arc<RngMetrics>,
    pub(super) buf: Vec<u8>,
}

impl Rng {
    /// A device ready to be put behind a transport.
    pub fn new() -> Result<Self, RngError> {
        Ok(Self {
            acked_features: 0,
            queue: RequestQueue::new().map_err(RngError::EventFd)?,
            metrics: Arc::new(RngMetrics::default()),
            buf: vec![0; MAX_REQUEST_BYTES],
        })
    }

    /// The device's counters (shared; read them at any time).
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }

    /// Whether a driver activated the device and has not reset it since.
    pub fn is_active(&self) -> bool {
        self.queue.is_active()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
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
        self.queue.reset();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::metrics::DeviceMetrics;
    use crate::virtio::test_utils::*;
    use crate::virtio::testing::{guest_memory, Desc, LoopRig, DATA_START};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn run(q: &MockSplitQueue<GuestMemoryMmap>, mem: &GuestMemoryMmap) -> RngMetrics {
        let mut queue: Queue = q.create_queue().unwrap();
        let m = RngMetrics::default();
        let mut buf = vec![0; MAX_REQUEST_BYTES];
        assert!(process_queue(&mut queue, mem, &mut buf, &m).unwrap());
        m
    }

    #[test]
    fn fills_buffers_with_fresh_random_bytes() {
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        add_chain(&q, 0, &[(0x2_0000, 64, true)]);
        add_chain(&q, 1, &[(0x3_0000, 32, true), (0x3_1000, 32, true)]);
        let m = run(&q, &mem);
        assert_eq!(used(&q), vec![(0, 64), (1, 64)]);
        let a = read_mem(&mem, 0x2_0000, 64);
        let mut b = read_mem(&mem, 0x3_0000, 32);
        b.extend(read_mem(&mem, 0x3_1000, 32));
        assert!(a.iter().any(|&x| x != 0));
        assert!(b.iter().any(|&x| x != 0));
        assert_ne!(a, b);
        assert_eq!(m.to_json()["bytes"], 128);
    }

    #[test]
    fn caps_each_request_and_skips_readable_buffers() {
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        add_chain(&q, 0, &[(0x2_0000, 0x2_0000, true)]);
        write_mem(&mem, 0x5_0000, &[0xcc; 16]);
        add_chain(&q, 1, &[(0x5_0000, 16, false)]);
        run(&q, &mem);
        let cap = u32::try_from(MAX_REQUEST_BYTES).unwrap();
        assert_eq!(used(&q), vec![(0, cap), (1, 0)]);
        // Past the cap and in the readable buffer nothing was written.
        let tail = 0x2_0000 + MAX_REQUEST_BYTES as u64;
        assert_eq!(read_mem(&mem, tail, 64), vec![0; 64]);
        assert_eq!(read_mem(&mem, 0x5_0000, 16), vec![0xcc; 16]);
    }

    #[test]
    fn hostile_chains_get_zero_length() {
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        add_chain(&q, 0, &[(MEM_SIZE as u64 - 8, 16, true)]);
        add_chain(&q, 1, &[(u64::MAX - 4, 8, true)]);
        store_desc(&q, 2, 0x2_0000, 8, F_NEXT | F_WRITE, 3);
        store_desc(&q, 3, 0x2_0000, 8, F_NEXT | F_WRITE, 2);
        publish(&q, 2);
        publish(&q, 300);
        let m = run(&q, &mem);
        let u = used(&q);
        assert_eq!(&u[..2], &[(0, 0), (1, 0)]);
        // The loop is cut at the queue size: 16 descriptors of 8 bytes each.
        assert_eq!(u[2], (2, 16 * 8));
        assert_eq!(u.len(), 3, "head index 300 cannot be returned");
        assert_eq!(m.to_json()["invalid_chains"], 3);
    }

    #[test]
    fn event_loop_serves_requests_after_activation() {
        let mem = guest_memory();
        let mut rig = LoopRig::activate(&mem, Rng::new().unwrap(), 0);
        assert_eq!(rig.run(100), 1);
        rig.queues[0].add(&[Desc::w(DATA_START, 16)]);
        rig.notify(0);
        assert_eq!(rig.run(100), 1);
        assert_eq!(rig.queues[0].take_used(), vec![(0, 16)]);
        assert_eq!(rig.irq.queue_count(), 1);
        assert_eq!(rig.dev.lock().unwrap().metrics().to_json()["requests"], 1);
    }
}
