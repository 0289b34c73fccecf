//! Popping descriptor chains, returning them through the used ring, and interrupting the guest:
//! the queue plumbing every device shares, whatever it does with a chain's buffers.
//!
//! - [`serve_queue`]: request queues (block, rng). Notifications are suppressed while the queue
//!   is served (EVENT_IDX aware) and a ring the device cannot read is an error, after which
//!   [`RequestQueue`] leaves the queue alone until the driver resets the device.
//! - [`drain_queue`]: transmit queues (net, vsock): best effort, every chain consumed and returned
//!   with used length 0.
//! - [`notify_guest`] / [`raise_queue_interrupt`]: the used ring changed, tell the guest.

use std::io;
use std::sync::Arc;

use serde::Serialize;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::glue::DeviceEvents;
use super::metrics::Counter;
use super::{ActivateContext, ActivateError, InterruptKind, VirtioInterrupt};

/// A chain popped from a queue of guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Serves every available chain of `queue`: `handle` answers each and says its used length.
/// Returns whether the driver must be interrupted.
///
/// A head index past the queue cannot be returned; the driver loses that entry and `lost` (if
/// given) counts it. A queue whose rings are unusable yields an error.
pub fn serve_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    lost: Option<&Counter>,
    handle: F,
) -> Result<bool, virtio_queue::Error>
where
    F: FnMut(Chain<'_>) -> u32,
{
    serve_queue_until(queue, mem, lost, || false, handle)
}

/// [`serve_queue`], stopping before the next chain once `stop` says so (a rate limiter: the
/// chains left wait in the avail ring until the device serves the queue again).
pub fn serve_queue_until<S, F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    lost: Option<&Counter>,
    mut stop: S,
    mut handle: F,
) -> Result<bool, virtio_queue::Error>
where
    S: FnMut() -> bool,
    F: FnMut(Chain<'_>) -> u32,
{
    let mut used_any = false;
    loop {
        queue.disable_notification(mem)?;
        let mut popped = false;
        if stop() {
            queue.enable_notification(mem)?;
            break;
        }
        while let Some(chain) = queue.iter(mem)?.next() {
            popped = true;
            let head = chain.head_index();
            let len = handle(chain);
            match queue.add_used(mem, head, len) {
                Ok(()) => used_any = true,
                Err(virtio_queue::Error::InvalidDescriptorIndex) => {
                    if let Some(lost) = lost {
                        lost.inc();
                    }
                }
                Err(e) => return Err(e),
            }
            if stop() {
                queue.enable_notification(mem)?;
                return Ok(used_any && queue.needs_notification(mem)?);
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

/// Pops every available chain of `queue`, lets `handle` consume it and returns it with used
/// length 0, then interrupts the guest if any chain was taken. Returns how many chains could
/// not be put in the used ring.
pub fn drain_queue<F>(queue: &mut Queue, mem: &GuestMemoryMmap, irq: QueueIrq<'_>, handle: F) -> u64
where
    F: FnMut(Chain<'_>),
{
    drain_queue_until(queue, mem, irq, || false, handle)
}

/// [`drain_queue`], stopping before the next chain once `stop` says so (a rate limiter: the
/// chains left wait in the avail ring until the device drains the queue again).
pub fn drain_queue_until<S, F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    irq: QueueIrq<'_>,
    mut stop: S,
    mut handle: F,
) -> u64
where
    S: FnMut() -> bool,
    F: FnMut(Chain<'_>),
{
    let (mut taken, mut unreturned) = (0u64, 0u64);
    while !stop() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        handle(chain);
        if queue.add_used(mem, head, 0).is_err() {
            unreturned += 1;
        }
        taken += 1;
    }
    if taken > 0 {
        notify_guest(queue, mem, irq);
    }
    unreturned
}

/// How a device interrupts the guest: its line, the counter of interrupts it keeps (if any) and
/// its name for log lines.
#[derive(Debug, Clone, Copy)]
pub struct QueueIrq<'a> {
    /// The device's interrupt line.
    pub interrupt: &'a dyn VirtioInterrupt,
    /// Counts every interrupt raised.
    pub counter: Option<&'a Counter>,
    /// Prefix of log lines, e.g. `virtio-net`.
    pub device: &'a str,
}

/// Interrupts the guest for a used-ring update of `queue` if the driver asked to be told; a
/// guest that scribbled over its ring gets the interrupt anyway.
pub fn notify_guest(queue: &mut Queue, mem: &GuestMemoryMmap, irq: QueueIrq<'_>) {
    if queue.needs_notification(mem).unwrap_or(true) {
        raise_queue_interrupt(irq);
    }
}

/// Raises the queue interrupt and counts it.
pub fn raise_queue_interrupt(irq: QueueIrq<'_>) {
    if let Some(counter) = irq.counter {
        counter.inc();
    }
    if let Err(e) = irq.interrupt.trigger(InterruptKind::Queue) {
        crate::warn_limited!("{}: raising the queue interrupt failed: {e}", irq.device);
    }
}

/// Counters every request-queue device keeps (flattened into its metrics).
#[derive(Debug, Default, Serialize)]
pub struct QueueMetrics {
    /// Times the device was activated by a driver.
    pub activations: Counter,
    /// Queue notifications handled.
    pub queue_events: Counter,
    /// Queue-level failures (unreadable rings, bad avail index).
    pub queue_errors: Counter,
    /// Interrupts raised towards the guest.
    pub interrupts: Counter,
}

/// The one queue of a request/response device (block, rng) and its event registrations.
#[derive(Debug)]
pub struct RequestQueue {
    events: DeviceEvents,
    active: Option<ActiveQueue>,
}

/// The queue while a driver has the device activated.
#[derive(Debug)]
struct ActiveQueue {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// The rings were unusable; the queue is left alone until the driver resets the device.
    broken: bool,
}

impl RequestQueue {
    /// Not active; creates the activation eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            events: DeviceEvents::new()?,
            active: None,
        })
    }

    /// The activation and queue eventfds, for the event loop.
    pub fn events(&mut self) -> &mut DeviceEvents {
        &mut self.events
    }

    /// Whether a driver activated the device and has not reset it since.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The queue's state while active (for a snapshot).
    pub fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }

    /// Takes the one queue of `ctx`, counts the activation and hands the queue eventfd to the
    /// event loop.
    pub fn activate(
        &mut self,
        ctx: ActivateContext,
        metrics: &QueueMetrics,
    ) -> Result<(), ActivateError> {
        let a = ctx.expect_queues::<1>()?;
        let [queue] = a.queues;
        self.active = Some(ActiveQueue {
            mem: a.mem,
            queue,
            interrupt: a.interrupt,
            broken: false,
        });
        metrics.activations.inc();
        self.events.activated(a.queue_evts);
        Ok(())
    }

    /// The driver reset the device: forget the queue.
    pub fn reset(&mut self) {
        self.active = None;
        self.events.deactivated();
    }

    /// Runs `process` (usually a device's `process_queue`) over the queue, if active and usable,
    /// and interrupts the driver if it needs to know. After a queue error the queue is left
    /// alone until the next activation.
    pub fn serve<F>(&mut self, device: &str, metrics: &QueueMetrics, process: F)
    where
        F: FnOnce(&mut Queue, &GuestMemoryMmap) -> Result<bool, virtio_queue::Error>,
    {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        metrics.queue_events.inc();
        match process(&mut active.queue, &active.mem) {
            Ok(true) => raise_queue_interrupt(QueueIrq {
                interrupt: &*active.interrupt,
                counter: Some(&metrics.interrupts),
                device,
            }),
            Ok(false) => {}
            Err(e) => {
                crate::warn_limited!("{device}: request queue unusable, waiting for a reset: {e}");
                metrics.queue_errors.inc();
                active.broken = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{guest_memory, interrupt, Desc, GuestQueue, DATA_START};
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn drain_queue_returns_every_chain_and_interrupts_once() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        let mut queue = gq.queue();
        gq.add(&[Desc::r(DATA_START, 8)]);
        gq.add(&[Desc::r(DATA_START + 8, 8), Desc::r(DATA_START + 16, 8)]);
        let irq = interrupt();
        let counter = Counter::default();
        let mut lens = Vec::new();
        let q_irq = QueueIrq {
            interrupt: &*irq,
            counter: Some(&counter),
            device: "test",
        };
        let lost = drain_queue(&mut queue, &mem, q_irq, |chain| {
            lens.push(chain.count());
        });
        assert_eq!((lost, lens), (0, vec![1, 2]));
        assert_eq!(gq.take_used(), vec![(0, 0), (1, 0)]);
        assert_eq!((irq.queue_count(), counter.get()), (1, 1));
        // Nothing available: no interrupt.
        drain_queue(&mut queue, &mem, q_irq, |_| {});
        assert_eq!(irq.queue_count(), 1);
    }

    #[test]
    fn request_queue_serves_only_while_active_and_usable() {
        let mem = guest_memory();
        let gq = GuestQueue::new(&mem, 0, 16);
        let irq = interrupt();
        let mut rq = RequestQueue::new().expect("eventfd");
        let m = QueueMetrics::default();
        rq.serve("test", &m, |_, _| Ok(true));
        assert_eq!(m.queue_events.get(), 0, "not active");
        let ctx = |queues: Vec<Queue>| ActivateContext {
            mem: mem.clone(),
            queue_evts: queues
                .iter()
                .map(|_| EventFd::new(0).expect("evt"))
                .collect(),
            queues,
            interrupt: irq.clone(),
        };
        assert!(rq.activate(ctx(vec![]), &m).is_err());
        rq.activate(ctx(vec![gq.queue()]), &m).expect("activate");
        assert!(rq.is_active());
        rq.serve("test", &m, |_, _| Ok(true));
        rq.serve("test", &m, |_, _| {
            Err(virtio_queue::Error::InvalidAvailRingIndex)
        });
        rq.serve("test", &m, |_, _| Ok(true));
        assert_eq!(irq.queue_count(), 1);
        assert_eq!(
            (
                m.queue_events.get(),
                m.interrupts.get(),
                m.queue_errors.get()
            ),
            (2, 1, 1)
        );
        assert_eq!(m.activations.get(), 1);
        rq.reset();
        assert!(!rq.is_active());
    }
}
