//! Event-loop and activation glue shared by the virtio devices.
//!
//! Every device runs on the VMM's single `event-manager` loop, registered as
//! `Arc<Mutex<Device>>` where `Device: event_manager::MutEventSubscriber`. The queue eventfds only
//! reach the device when a vCPU thread calls [`VirtioDevice::activate`](super::VirtioDevice), and
//! a vCPU thread cannot touch the event loop's epoll set. So each device owns a [`DeviceEvents`]
//! and implements [`EventDevice`]; `event_subscriber!` then makes it an
//! event-loop subscriber:
//!
//! 1. `activate(ctx)` (vCPU thread): check the queues with [`ActivateContext::expect_queues`],
//!    keep them, and hand the queue eventfds to [`DeviceEvents::activated`].
//! 2. `reset()` (vCPU thread): drop the queues and call [`DeviceEvents::deactivated`].
//! 3. The event loop sees the activation eventfd; the glue swaps the registered queue eventfds for
//!    the current ones (so a reset leaves no stale registration behind) and calls
//!    [`EventDevice::on_activation`], where the device processes every queue once (the driver may
//!    have queued work before the loop saw the activation).
//! 4. A queue eventfd fires: the glue consumes it and calls [`EventDevice::on_queue`].
//! 5. Any fd the device registered itself (a tap, a socket): [`EventDevice::on_other`].
//!
//! Devices with one request queue (block, rng) keep a
//! [`RequestQueue`](super::chains::RequestQueue), which does steps 1 and 2, and implement the
//! shorter [`RequestDevice`].
//!
//! Queue processing itself stays out of this glue: each device has plain functions over
//! `&mut Queue` and guest memory (built on `virtio/chains.rs`), unit-tested through
//! `virtio_queue::mock::MockSplitQueue` without KVM or an event loop.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use log::debug;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::rate_limiter::Throttle;
use super::{ActivateContext, ActivateError, VirtioInterrupt};

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

/// The activation eventfd of a device, its current queue eventfds, and the queue eventfds
/// registered with the event loop.
#[derive(Debug)]
pub struct DeviceEvents {
    activate_evt: EventFd,
    /// Queue eventfds of the current activation (`None` while not active).
    current: Option<Vec<EventFd>>,
    registered: Vec<(usize, EventFd)>,
}

impl DeviceEvents {
    /// A fresh activation eventfd, nothing registered yet.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            current: None,
            registered: Vec::new(),
        })
    }

    /// Registers the activation eventfd; call from `MutEventSubscriber::init`.
    pub fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            crate::warn_limited!("registering a device activation eventfd failed: {e:?}");
        }
    }

    /// The driver activated the device with these queue eventfds (vCPU thread); the event loop
    /// registers them when it sees the activation.
    pub fn activated(&mut self, queue_evts: Vec<EventFd>) {
        self.current = Some(queue_evts);
        self.signal();
    }

    /// The driver reset the device (vCPU thread); the event loop unregisters the queue eventfds.
    pub fn deactivated(&mut self) {
        if self.current.take().is_some() {
            self.signal();
        }
    }

    fn signal(&self) {
        if let Err(e) = self.activate_evt.write(1) {
            crate::warn_limited!("signalling device activation failed: {e}");
        }
    }

    /// Consumes the event and classifies it; on activation changes, re-registers the queue
    /// eventfds.
    pub fn dispatch(&mut self, events: &Events, ops: &mut EventOps) -> DeviceEvent {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            self.resync(ops);
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

    fn resync(&mut self, ops: &mut EventOps) {
        for (_, evt) in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::new(&evt, EventSet::IN)) {
                debug!("unregistering a queue eventfd failed: {e:?}");
            }
        }
        for (index, evt) in self.current.iter().flatten().enumerate() {
            // A clone keeps the fd open (and removable) after the device dropped its copy.
            let evt = match evt.try_clone() {
                Ok(evt) => evt,
                Err(e) => {
                    crate::warn_limited!("cloning a queue eventfd failed: {e}");
                    continue;
                }
            };
            match ops.add(Events::new(&evt, EventSet::IN)) {
                Ok(()) => self.registered.push((index, evt)),
                Err(e) => crate::warn_limited!("registering a queue eventfd failed: {e:?}"),
            }
        }
    }
}

/// A virtio device served from the event loop through its [`DeviceEvents`].
pub trait EventDevice {
    /// Prefix of the device's log lines, e.g. `virtio-blk`.
    const NAME: &'static str;
    /// The device's activation and queue eventfds.
    fn device_events(&mut self) -> &mut DeviceEvents;
    /// Registers the fds the device watches besides the glue's (none by default).
    fn init_other(&mut self, _ops: &mut EventOps) {}
    /// The device was activated or reset; serve every queue once if active.
    fn on_activation(&mut self, ops: &mut EventOps);
    /// The driver notified queue `index`.
    fn on_queue(&mut self, index: usize, ops: &mut EventOps);
    /// An fd the device registered itself fired; false if it is not one of them.
    fn on_other(&mut self, _events: &Events, _ops: &mut EventOps) -> bool {
        false
    }
}

/// A device with one request queue (block, rng), served on activation and on every
/// notification; it is an [`EventDevice`] through this trait.
pub trait RequestDevice {
    /// Prefix of the device's log lines, e.g. `virtio-blk`.
    const NAME: &'static str;
    /// The device's activation and queue eventfds.
    fn device_events(&mut self) -> &mut DeviceEvents;
    /// Serves the request queue (nothing while the device is not active).
    fn process_request_queue(&mut self);
    /// The device's rate limiter, whose timer resumes a throttled queue (none by default).
    fn throttle(&mut self) -> Option<&mut Throttle> {
        None
    }
}

impl<T: RequestDevice> EventDevice for T {
    const NAME: &'static str = T::NAME;

    fn device_events(&mut self) -> &mut DeviceEvents {
        RequestDevice::device_events(self)
    }

    fn on_activation(&mut self, _ops: &mut EventOps) {
        self.process_request_queue();
    }

    fn on_queue(&mut self, index: usize, _ops: &mut EventOps) {
        match index {
            0 => self.process_request_queue(),
            n => crate::warn_limited!("{}: event for unknown queue {n}", T::NAME),
        }
    }

    fn init_other(&mut self, ops: &mut EventOps) {
        if let Some(t) = self.throttle() {
            t.init(ops);
        }
    }

    fn on_other(&mut self, events: &Events, _ops: &mut EventOps) -> bool {
        let fired = self.throttle().is_some_and(|t| t.timer(events));
        if fired {
            self.process_request_queue();
        }
        fired
    }
}

/// `MutEventSubscriber::init` of an [`EventDevice`].
pub fn init<D: EventDevice>(device: &mut D, ops: &mut EventOps) {
    device.device_events().init(ops);
    device.init_other(ops);
}

/// `MutEventSubscriber::process` of an [`EventDevice`]: an fd nobody claims is unregistered.
pub fn process<D: EventDevice>(device: &mut D, events: Events, ops: &mut EventOps) {
    match device.device_events().dispatch(&events, ops) {
        DeviceEvent::Activated => device.on_activation(ops),
        DeviceEvent::Queue(index) => device.on_queue(index, ops),
        DeviceEvent::Other => {
            if !device.on_other(&events, ops) {
                crate::warn_limited!("{}: unexpected event on fd {}", D::NAME, events.fd());
                let _ = ops.remove(events);
            }
        }
    }
}

/// Implements `event_manager::MutEventSubscriber` for an [`EventDevice`] through [`init`] and
/// [`process`] (the trait is foreign, so a blanket impl is not allowed).
macro_rules! event_subscriber {
    ($device:ty) => {
        impl event_manager::MutEventSubscriber for $device {
            fn init(&mut self, ops: &mut event_manager::EventOps) {
                $crate::virtio::glue::init(self, ops);
            }

            fn process(
                &mut self,
                events: event_manager::Events,
                ops: &mut event_manager::EventOps,
            ) {
                $crate::virtio::glue::process(self, events, ops);
            }
        }
    };
}
pub(crate) use event_subscriber;

/// An [`ActivateContext`] whose queue count was checked: exactly `N` queues and eventfds.
#[derive(Debug)]
pub struct Activation<const N: usize> {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, in queue index order.
    pub queues: [Queue; N],
    /// One eventfd per queue (hand them to [`DeviceEvents::activated`]).
    pub queue_evts: Vec<EventFd>,
    /// Interrupt line of the device.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl ActivateContext {
    /// Checks that the driver set up exactly `N` queues (each with its eventfd).
    pub fn expect_queues<const N: usize>(self) -> Result<Activation<N>, ActivateError> {
        let got = self.queues.len();
        let wrong = ActivateError::QueueCount { expected: N, got };
        if self.queue_evts.len() != N {
            return Err(wrong);
        }
        let queues = <[Queue; N]>::try_from(self.queues).map_err(|_| wrong)?;
        Ok(Activation {
            mem: self.mem,
            queues,
            queue_evts: self.queue_evts,
            interrupt: self.interrupt,
        })
    }
}

/// Reads `data.len()` bytes of a configuration space `config` at `offset`; bytes past its end
/// read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
        *b = at.and_then(|a| config.get(a)).copied().unwrap_or(0);
    }
}

/// `VirtioDevice::write_config` of a device without writable configuration fields.
pub fn ignore_config_write(device: &str, offset: u64, data: &[u8]) {
    debug!(
        "{device}: ignoring config write of {} bytes at {offset:#x}",
        data.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{guest_memory, interrupt, GuestQueue};

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let mut d = [0xff; 4];
        read_config_bytes(&[1, 2, 3], 1, &mut d);
        assert_eq!(d, [2, 3, 0, 0]);
        read_config_bytes(&[1, 2, 3], u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn expect_queues_checks_queues_and_eventfds() {
        let mem = guest_memory();
        let ctx = |queues: usize, evts: usize| ActivateContext {
            mem: mem.clone(),
            queues: (0..queues)
                .map(|i| GuestQueue::new(&mem, i as u64 * 0x1_0000, 16).queue())
                .collect(),
            queue_evts: (0..evts).map(|_| EventFd::new(0).expect("evt")).collect(),
            interrupt: interrupt(),
        };
        assert!(ctx(2, 2).expect_queues::<2>().is_ok());
        for (q, e) in [(1, 1), (3, 3), (2, 1)] {
            let err = ctx(q, e).expect_queues::<2>().expect_err("wrong count");
            assert!(
                matches!(err, ActivateError::QueueCount { expected: 2, got } if got == q),
                "{err}"
            );
        }
    }
}
