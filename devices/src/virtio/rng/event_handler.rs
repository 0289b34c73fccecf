//! Connects an [`Rng`] device to the VMM's event loop (see `virtio/glue.rs` for the pattern).

use super::device::process_queue;
use super::{Rng, NAME};
use crate::virtio::glue::{event_subscriber, DeviceEvents, RequestDevice};

impl RequestDevice for Rng {
    const NAME: &'static str = NAME;

    fn device_events(&mut self) -> &mut DeviceEvents {
        self.queue.events()
    }

    fn process_request_queue(&mut self) {
        let (buf, m) = (&mut self.buf, &*self.metrics);
        self.queue.serve(NAME, &m.queue, |queue, mem| {
            process_queue(queue, mem, buf, m)
        });
    }
}

event_subscriber!(Rng);
