//! Event-loop glue for virtio-net: which fds to watch and what to run when they fire.
//!
//! The device sits in the event loop as `Arc<Mutex<Net>>`. Its queue eventfds only exist after
//! the driver activated it on a vCPU thread, so `activate`/`reset` write `activate_evt` and the
//! event loop (re)registers the queue eventfds and the backend fd here. The backend fd is only
//! watched while the guest has receive buffers, so a full receive queue never spins the loop.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::queues::RxStop;
use super::{Net, RX_INDEX, TX_INDEX};

impl Net {
    fn watch_backend(&mut self, ops: &mut EventOps, on: bool) {
        let on = on && !self.backend_failed && self.active.is_some();
        if on == self.backend_registered {
            return;
        }
        let events = Events::new_raw(self.backend.raw_fd(), EventSet::IN);
        let res = if on {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match res {
            Ok(()) => self.backend_registered = on,
            Err(e) => log::error!("virtio-net: cannot (un)watch the backend: {e:?}"),
        }
    }

    fn on_activate(&mut self, ops: &mut EventOps) {
        let _ = self.activate_evt.read();
        for evt in self.retired_evts.drain(..) {
            let _ = ops.remove(Events::new(&evt, EventSet::IN));
        }
        if let (Some(active), false) = (&self.active, self.queues_registered) {
            for evt in &active.queue_evts {
                if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                    log::error!("virtio-net: cannot watch a queue eventfd: {e:?}");
                }
            }
            self.queues_registered = true;
        }
        if self.active.is_none() {
            self.watch_backend(ops, false);
            return;
        }
        self.run_tx();
        self.run_rx(ops);
    }

    fn run_tx(&mut self) {
        if let Some(active) = self.active.as_mut() {
            active.queues.process_tx(&mut *self.backend);
        }
    }

    fn run_rx(&mut self, ops: &mut EventOps) {
        if self.backend_failed {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let stop = active.queues.process_rx(&mut *self.backend);
        match stop {
            RxStop::Drained => self.watch_backend(ops, true),
            RxStop::NoBuffers => self.watch_backend(ops, false),
            RxStop::BackendFailed => {
                self.watch_backend(ops, false);
                self.backend_failed = true;
            }
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            log::error!("virtio-net: cannot watch the activate eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            self.on_activate(ops);
            return;
        }
        if self.backend_registered && fd == self.backend.raw_fd() {
            self.run_rx(ops);
            return;
        }
        let Some(active) = self.active.as_ref() else {
            return;
        };
        let which = active.queue_evts.iter().position(|e| e.as_raw_fd() == fd);
        if let Some(i) = which {
            let _ = active.queue_evts[i].read();
            match i {
                RX_INDEX => self.run_rx(ops),
                TX_INDEX => self.run_tx(),
                _ => {}
            }
        }
    }
}

use std::os::fd::AsRawFd;
