//! The VMM's one event loop, run on the main thread: device subscribers, console input from
//! stdin, and the wake-ups that end the VM (a recorded exit reason, SIGINT/SIGTERM).

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::SerialDevice;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::device_manager::VmEventManager;
use crate::exit::{ExitState, VmExit};
use crate::signals;

/// How long after a guest panic the VM may take to reset before mvm ends it.
pub const PANIC_GRACE: Duration = Duration::from_secs(5);
/// How often the loop wakes up to check timers without events.
const TICK_MS: i32 = 100;

/// Routes SIGINT and SIGTERM to `exit` (see [`crate::signals`]): the loop then ends the VM with
/// [`VmExit::Signal`]. The eventfd of `exit` must stay open while the VM runs (the caller keeps
/// the Arc).
pub fn wake_on_signals(exit: &ExitState) {
    signals::wake(exit.eventfd().as_raw_fd());
}

/// Stops routing signals to a VM (the handlers stay, with nothing to wake).
pub fn stop_waking_on_signals() {
    signals::stop_waking();
}

/// Drains the exit eventfd so the loop does not spin; the reason itself is in [`ExitState`].
struct ExitWaker {
    exit: Arc<ExitState>,
}

impl MutEventSubscriber for ExitWaker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.eventfd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            log::warn!("cannot watch the exit eventfd: {e:?}");
        }
    }
}

/// Feeds bytes from an input fd (mvm's stdin) to the serial console.
pub struct ConsoleInput {
    fd: RawFd,
    serial: Arc<Mutex<SerialDevice>>,
}

impl std::fmt::Debug for ConsoleInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleInput")
            .field("fd", &self.fd)
            .finish()
    }
}

impl ConsoleInput {
    /// Input from mvm's stdin.
    pub fn stdin(serial: Arc<Mutex<SerialDevice>>) -> Self {
        Self {
            fd: std::io::stdin().as_raw_fd(),
            serial,
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            std::io::stdin().lock().read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            // EOF, hang-up or error: stop watching, the guest keeps running.
            let _ = ops.remove(Events::empty_raw(self.fd));
            return;
        }
        let taken = devices::bus::lock(&self.serial).enqueue_input(&buf[..n]);
        if taken < n {
            log::debug!(
                "console input: guest FIFO full, dropped {} bytes",
                n - taken
            );
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Regular files and /dev/null cannot be polled: then there is simply no input.
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            log::debug!("console input not watched: {e:?}");
        }
    }
}

/// Runs the event loop until the VM ends; returns why.
pub fn run(em: &mut VmEventManager, exit: &Arc<ExitState>) -> VmExit {
    em.add_subscriber(Arc::new(Mutex::new(ExitWaker { exit: exit.clone() })));
    loop {
        if let Some(reason) = exit.exit() {
            return reason;
        }
        if let Some(sig) = signals::take() {
            exit.record(VmExit::Signal(sig));
        }
        exit.check_panic_timeout(PANIC_GRACE);
        if let Err(e) = em.run_with_timeout(TICK_MS) {
            // EINTR (a signal arrived) is reported as Ok(0); anything else is fatal.
            exit.record(VmExit::EventLoop(format!("{e:?}")));
        }
    }
}
