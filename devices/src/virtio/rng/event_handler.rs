//! Connects an [`Rng`] device to the VMM's event loop (see `virtio/glue.rs` for the pattern).

use super::{Rng, NAME};
use crate::virtio::glue::{event_subscriber, DeviceEvents, RequestDevice};

impl RequestDevice for Rng {
    const NAME: &'static str = NAME;

    fn device_events(&mut self) -> &mut DeviceEvents {
        &mut self.events
    }

    fn process_request_queue(&mut self) {
        Rng::process_request_queue(self);
    }
}

event_subscriber!(Rng);
