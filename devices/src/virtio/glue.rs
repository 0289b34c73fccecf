//! Event-loop glue shared by the virtio devices.
//!
//! Every device runs on the VMM's single `event-manager` loop, registered as
//! `Arc<Mutex<Device>>` where `Device: event_manager::MutEventSubscriber`. The queue eventfds only
//! reach the device when a vCPU thread calls [`VirtioDevice::activate`](super::VirtioDevice), and
//! a vCPU thread cannot touch the event loop's epoll set. So each device owns a [`DeviceEvents`]:
//!
//! 1. `init(ops)`: call [`DeviceEvents::init`], which registers the device's `activate_evt`.
//! 2. `activate(ctx)` (vCPU thread): keep `ctx` (queues, memory, interrupt, queue eventfds), then
//!    call [`DeviceEvents::signal`].
//! 3. `reset()` (vCPU thread): drop the queues and call [`DeviceEvents::signal`] again.
//! 4. `process(events, ops)`: call [`DeviceEvents::dispatch`] with the device's current queue
//!    eventfds (`None` while not active). It consumes the eventfd that fired and says what it
//!    was: on [`DeviceEvent::Activated`] the glue has already swapped the registered queue
//!    eventfds for the current ones (so a reset leaves no stale registration behind) and the
//!    device should process every queue once (the driver may have queued work before the loop saw
//!    the activation); on [`DeviceEvent::Queue`] process that queue.
//!
//! Queue processing itself stays out of this glue: each device has a plain function that takes
//! `&mut Queue` and guest memory, unit-tested through `virtio_queue::mock::MockSplitQueue`
//! without KVM or an event loop (see `block/device.rs`).

use std::io;

use event_manager::{EventOps, EventSet, Events};
use log::{debug, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What an event delivered to a device was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The device was activated or reset; registrations now match the current queues.
    Activated,
    /// The driver notified queue `n`.
    Queue(usize),
    /// An event this glue does not own (the device may have registered more fds itself).
    Other,
}

/// The activation eventfd of a device and the queue eventfds registered with the event loop.
#[derive(Debug)]
pub struct DeviceEvents {
    activate_evt: EventFd,
    registered: Vec<(usize, EventFd)>,
}

impl DeviceEvents {
    /// A fresh activation eventfd, nothing registered yet.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            registered: Vec::new(),
        })
    }

    /// The eventfd the device writes when its activation state changes.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Registers the activation eventfd; call from `MutEventSubscriber::init`.
    pub fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            warn!("registering a device activation eventfd failed: {e:?}");
        }
    }

    /// Tells the event loop that the device was activated or reset (any thread).
    pub fn signal(&self) {
        if let Err(e) = self.activate_evt.write(1) {
            warn!("signalling device activation failed: {e}");
        }
    }

    /// Consumes the event and classifies it; on activation changes, re-registers `queue_evts`.
    pub fn dispatch(
        &mut self,
        events: &Events,
        ops: &mut EventOps,
        queue_evts: Option<&[EventFd]>,
    ) -> DeviceEvent {
        use std::os::fd::AsRawFd;
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            self.resync(ops, queue_evts);
            return DeviceEvent::Activated;
        }
        match self.registered.iter().find(|(_, e)| e.as_raw_fd() == fd) {
            Some((index, evt)) => {
                // EAGAIN means another wake-up already drained it; the queue is processed anyway.
                let _ = evt.read();
                DeviceEvent::Queue(*index)
            }
            None => DeviceEvent::Other,
        }
    }

    fn resync(&mut self, ops: &mut EventOps, queue_evts: Option<&[EventFd]>) {
        for (_, evt) in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::new(&evt, EventSet::IN)) {
                debug!("unregistering a queue eventfd failed: {e:?}");
            }
        }
        for (index, evt) in queue_evts.unwrap_or_default().iter().enumerate() {
            let evt = match evt.try_clone() {
                Ok(evt) => evt,
                Err(e) => {
                    warn!("cloning a queue eventfd failed: {e}");
                    continue;
                }
            };
            match ops.add(Events::new(&evt, EventSet::IN)) {
                Ok(()) => self.registered.push((index, evt)),
                Err(e) => warn!("registering a queue eventfd failed: {e:?}"),
            }
        }
    }
}
