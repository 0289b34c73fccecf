//! Connects an [`Rng`] device to the VMM's event loop (see `virtio/glue.rs` for the pattern).

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::warn;

use super::device::Rng;
use crate::virtio::glue::DeviceEvent;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.init_events(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.dispatch(&events, ops) {
            DeviceEvent::Activated | DeviceEvent::Queue(0) => self.process_request_queue(),
            DeviceEvent::Queue(n) => warn!("virtio-rng: event for unknown queue {n}"),
            DeviceEvent::Other => {
                warn!("virtio-rng: unexpected event on fd {}", events.fd());
                let _ = ops.remove(events);
            }
        }
    }
}
