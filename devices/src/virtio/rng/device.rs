//! The virtio-rng device: every chain's device-writable buffers get fresh bytes from
//! `getrandom(2)`, at most [`MAX_REQUEST_BYTES`] per chain.

use std::io::{self, Write};
use std::sync::Arc;

use event_manager::{EventOps, Events};
use log::{debug, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::metrics::RngMetrics;
use super::{RngError, MAX_REQUEST_BYTES, QUEUE_SIZE};
use crate::virtio::glue::{DeviceEvent, DeviceEvents};
use crate::virtio::mmio::VIRTIO_RING_F_EVENT_IDX;
use crate::virtio::{
    device_type, ActivateContext, ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
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
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
    metrics: &RngMetrics,
) -> u32 {
    let mut writer: Writer<'_, ()> = match Writer::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            debug!("virtio-rng: dropping chain: {e}");
            RngMetrics::inc(&metrics.invalid_chains);
            return 0;
        }
    };
    let n = writer.available_bytes().min(buf.len());
    let bytes = &mut buf[..n];
    if let Err(e) = getrandom(bytes) {
        warn!("virtio-rng: getrandom failed: {e}");
        RngMetrics::inc(&metrics.entropy_errors);
        return 0;
    }
    if writer.write_all(bytes).is_err() {
        RngMetrics::inc(&metrics.invalid_chains);
        return 0;
    }
    bytes.fill(0);
    RngMetrics::inc(&metrics.requests);
    RngMetrics::add(&metrics.bytes, n as u64);
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
    let mut used_any = false;
    loop {
        queue.disable_notification(mem)?;
        let mut popped = false;
        while let Some(chain) = queue.iter(mem)?.next() {
            popped = true;
            let head = chain.head_index();
            let len = fill_chain(chain, mem, buf, metrics);
            match queue.add_used(mem, head, len) {
                Ok(()) => used_any = true,
                // A head index past the queue cannot be returned; the driver loses that entry.
                Err(virtio_queue::Error::InvalidDescriptorIndex) => {
                    RngMetrics::inc(&metrics.invalid_chains)
                }
                Err(e) => return Err(e),
            }
        }
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

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    acked_features: u64,
    active: Option<Active>,
    events: DeviceEvents,
    metrics: Arc<RngMetrics>,
    buf: Vec<u8>,
}

impl Rng {
    /// A device ready to be put behind a transport.
    pub fn new() -> Result<Self, RngError> {
        Ok(Self {
            acked_features: 0,
            active: None,
            events: DeviceEvents::new().map_err(RngError::EventFd)?,
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
        self.active.is_some()
    }

    pub(super) fn init_events(&self, ops: &mut EventOps) {
        self.events.init(ops);
    }

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
        RngMetrics::inc(&self.metrics.queue_events);
        match process_queue(&mut active.queue, &active.mem, &mut self.buf, &self.metrics) {
            Ok(true) => {
                RngMetrics::inc(&self.metrics.interrupts);
                if let Err(e) = active.interrupt.trigger(InterruptKind::Queue) {
                    warn!("virtio-rng: raising the queue interrupt failed: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => {
                warn!("virtio-rng: request queue unusable, waiting for a reset: {e}");
                RngMetrics::inc(&self.metrics.queue_errors);
                active.broken = true;
            }
        }
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
        debug!(
            "virtio-rng: ignoring config write of {} bytes at {offset:#x}",
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
        RngMetrics::inc(&self.metrics.activations);
        self.events.signal();
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.acked_features = 0;
        if self.active.take().is_some() {
            self.events.signal();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::virtio::test_utils::*;
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

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

    #[derive(Debug, Default)]
    struct Irq(Mutex<u32>);

    impl VirtioInterrupt for Irq {
        fn trigger(&self, _kind: InterruptKind) -> io::Result<()> {
            *self.0.lock().unwrap() += 1;
            Ok(())
        }
    }

    #[test]
    fn event_loop_serves_requests_after_activation() {
        let dev = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let notify = evt.try_clone().unwrap();
        let irq = Arc::new(Irq::default());
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues: vec![q.create_queue().unwrap()],
            queue_evts: vec![evt],
            interrupt: irq.clone(),
        };
        dev.lock().unwrap().activate(ctx).unwrap();
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
        add_chain(&q, 0, &[(0x2_0000, 16, true)]);
        notify.write(1).unwrap();
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
        assert_eq!(used(&q), vec![(0, 16)]);
        assert_eq!(*irq.0.lock().unwrap(), 1);
        assert_eq!(dev.lock().unwrap().metrics().to_json()["requests"], 1);
    }
}
