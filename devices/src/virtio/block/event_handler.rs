//! Connects a [`Block`] device to the VMM's event loop (see `virtio/glue.rs` for the pattern).

use super::device::process_queue_throttled;
use super::{Block, NAME};
use crate::virtio::glue::{event_subscriber, DeviceEvents, RequestDevice};
use crate::virtio::rate_limiter::Throttle;

impl RequestDevice for Block {
    const NAME: &'static str = NAME;

    fn device_events(&mut self) -> &mut DeviceEvents {
        self.queue.events()
    }

    fn process_request_queue(&mut self) {
        let (disk, m, throttle) = (&mut self.disk, &*self.metrics, &mut self.throttle);
        self.queue.serve(NAME, &m.queue, |queue, mem| {
            process_queue_throttled(queue, mem, disk, m, throttle)
        });
    }

    fn throttle(&mut self) -> Option<&mut Throttle> {
        Some(&mut self.throttle)
    }
}

event_subscriber!(Block);

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::virtio::block::{request_type, MemDisk};
    use crate::virtio::test_utils::*;
    use crate::virtio::testing::interrupt;
    use crate::virtio::{ActivateContext, VirtioDevice};

    fn flush_request(
        mem: &vm_memory::GuestMemoryMmap,
        q: &MockSplitQueue<vm_memory::GuestMemoryMmap>,
        first: u16,
        base: u64,
    ) {
        let mut h = request_type::FLUSH.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 12]);
        write_mem(mem, base, &h);
        write_mem(mem, base + 0x100, &[0xee]);
        add_chain(q, first, &[(base, 16, false), (base + 0x100, 1, true)]);
    }

    #[test]
    fn event_loop_serves_a_device_activated_from_another_thread() {
        let dev = Arc::new(Mutex::new(
            Block::with_backend(Box::new(MemDisk::new(1 << 16, false)), None).unwrap(),
        ));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);

        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        flush_request(&mem, &q, 0, 0x2_0000);
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let notify = evt.try_clone().unwrap();
        let irq = interrupt();
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues: vec![q.create_queue().unwrap()],
            queue_evts: vec![evt],
            interrupt: irq.clone(),
        };
        std::thread::scope(|s| {
            s.spawn(|| dev.lock().unwrap().activate(ctx).unwrap());
        });
        // The activation event registers the queue eventfd and serves what is already queued.
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
        assert_eq!(used(&q).len(), 1);
        assert_eq!(irq.queue_count(), 1);

        // A notification through the queue eventfd is served.
        flush_request(&mem, &q, 2, 0x3_0000);
        notify.write(1).unwrap();
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
        assert_eq!(used(&q).len(), 2);

        // After a reset the queue eventfd is no longer watched.
        assert!(dev.lock().unwrap().reset());
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
        notify.write(1).unwrap();
        assert_eq!(em.run_with_timeout(50).unwrap(), 0);
        assert_eq!(used(&q).len(), 2);
    }
}
