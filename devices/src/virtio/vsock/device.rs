//! The virtio-vsock device: configuration space (guest CID), activation and reset.

use std::path::Path;
use std::sync::Arc;

use super::queues::VsockQueues;
use super::{Muxer, VsockError, VsockMetrics, EVT_INDEX, NAME, QUEUE_SIZE, RX_INDEX, TX_INDEX};
use crate::virtio::glue::{ignore_config_write, read_config_bytes, DeviceEvents};
use crate::virtio::{
    device_type, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// A virtio-vsock device whose host side is a Unix socket.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    pub(crate) muxer: Muxer,
    acked_features: u64,
    pub(crate) metrics: Arc<VsockMetrics>,
    /// Activation and queue eventfds (see `virtio/glue.rs`).
    pub(crate) events: DeviceEvents,
    /// The queues, while a driver has the device activated.
    pub(crate) active: Option<VsockQueues>,
    /// A transport reset was sent after a restore and the driver has not yet given the event
    /// buffer back: until it does, nothing goes to the guest, or a connection made now would
    /// be dropped by the guest's late handling of the reset.
    pub(crate) reset_pending: bool,
}

impl Vsock {
    /// Binds the host socket at `socket_path` (removed again on drop) for a guest with context
    /// id `guest_cid` (3 or more). A stale socket file nobody listens on is replaced.
    pub fn new(socket_path: &Path, guest_cid: u64) -> Result<Self, VsockError> {
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = Muxer::new(socket_path, guest_cid, Arc::clone(&metrics))?;
        Ok(Self {
            guest_cid,
            muxer,
            acked_features: 0,
            metrics,
            events: DeviceEvents::new().map_err(VsockError::Setup)?,
            active: None,
            reset_pending: false,
        })
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The host Unix socket path.
    pub fn socket_path(&self) -> &Path {
        self.muxer.path()
    }

    /// The device's counters (shared; read them any time, e.g. `metrics().to_json()`).
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        Arc::clone(&self.metrics)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        ignore_config_write(NAME, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let a = ctx.expect_queues::<3>()?;
        debug_assert_eq!((RX_INDEX, TX_INDEX, EVT_INDEX), (0, 1, 2));
        let [rx, tx, ev] = a.queues;
        let queues = VsockQueues::new(a.mem, rx, tx, ev, a.interrupt, self.metrics());
        self.active = Some(queues);
        self.events.activated(a.queue_evts);
        Ok(())
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(VsockQueues::queue_states)
    }

    fn restored(&mut self) {
        // The host sockets of the saved connections are not in this process: the guest must
        // drop its ends (a restored agent goes on listening, and the host connects anew).
        if let Some(queues) = self.active.as_mut() {
            self.reset_pending = queues.send_transport_reset();
            if !self.reset_pending {
                log::warn!("{NAME}: no event buffer for the transport reset after a restore");
            }
        }
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.reset_pending = false;
        self.events.deactivated();
        self.muxer.reset();
        self.acked_features = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::virtio::testing::{guest_memory, interrupt, GuestQueue};
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn config_space_is_the_guest_cid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = Vsock::new(&dir.path().join("s"), 0x1234_5678).expect("vsock");
        let mut c = [0xffu8; 10];
        dev.read_config(0, &mut c);
        assert_eq!(&c[..8], &0x1234_5678u64.to_le_bytes());
        assert_eq!(&c[8..], &[0, 0]);
        let mut hi = [0u8; 4];
        dev.read_config(4, &mut hi);
        assert_eq!(hi, [0; 4]);
        assert_eq!(dev.avail_features(), 1u64 << VIRTIO_F_VERSION_1);
        assert_eq!(dev.device_type(), device_type::VSOCK);
    }

    #[test]
    fn reserved_cids_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32] {
            let err = Vsock::new(&dir.path().join("s"), cid).expect_err("reserved");
            assert!(matches!(err, VsockError::Cid(c) if c == cid));
        }
        assert!(!dir.path().join("s").exists(), "nothing bound on error");
    }

    #[test]
    fn activate_needs_three_queues_and_reset_closes_connections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut dev = Vsock::new(&dir.path().join("s"), 3).expect("vsock");
        let mem = guest_memory();
        let qs: Vec<GuestQueue<'_>> = (0..3)
            .map(|i| GuestQueue::new(&mem, i * 0x1_0000, 16))
            .collect();
        let err = dev
            .activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![qs[0].queue(), qs[1].queue()],
                queue_evts: vec![EventFd::new(0).expect("e"), EventFd::new(0).expect("e")],
                interrupt: interrupt(),
            })
            .expect_err("two queues");
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 3,
                got: 2
            }
        ));

        let mut host = UnixStream::connect(dir.path().join("s")).expect("connect");
        host.write_all(b"CONNECT 5\n").expect("write");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while dev.muxer.connection_count() == 0 {
            assert!(std::time::Instant::now() < deadline);
            dev.muxer.process_host_events();
        }
        assert!(dev.reset());
        assert_eq!(dev.muxer.connection_count(), 0);
        let mut buf = [0u8; 1];
        assert_eq!(
            host.read(&mut buf).expect("eof"),
            0,
            "host connection closed on reset"
        );
    }
}
