//! The virtio-net device: configuration space, feature negotiation and activation.

use std::io::Read;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::queues::NetQueues;
use super::{
    features, NetBackend, NetError, NetMetrics, Passt, PasstConfig, Tap, TapConfig, NAME,
    QUEUE_SIZE, RX_INDEX, TX_INDEX,
};
use crate::virtio::glue::{ignore_config_write, read_config_bytes, DeviceEvents};
use crate::virtio::rate_limiter::{Limit, Throttle};
use crate::virtio::{
    device_type, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// `VIRTIO_NET_S_LINK_UP` in the config space status field.
const LINK_UP: u16 = 1;

/// Which host backend carries the device's frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum NetBackendConfig {
    /// A tap interface (needs CAP_NET_ADMIN).
    Tap(TapConfig),
    /// passt, a rootless userspace network stack.
    User(PasstConfig),
}

/// How to build a virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Guest MAC address; `None` picks a random locally administered one.
    pub mac: Option<[u8; 6]>,
    /// The host backend.
    pub backend: NetBackendConfig,
    /// The rate limit of each direction (`--network-rate`).
    pub limit: Limit,
}

/// A virtio-net device and its backend.
#[derive(Debug)]
pub struct Net {
    pub(crate) backend: Box<dyn NetBackend>,
    tap_name: Option<String>,
    mac: [u8; 6],
    avail_features: u64,
    acked_features: u64,
    pub(crate) metrics: Arc<NetMetrics>,
    /// Activation and queue eventfds (see `virtio/glue.rs`).
    pub(crate) events: DeviceEvents,
    /// The queues, while a driver has the device activated.
    pub(crate) active: Option<NetQueues>,
    /// Whether the backend fd is registered with the event loop.
    pub(crate) backend_registered: bool,
    /// The backend failed for good (e.g. passt exited); never read it again.
    pub(crate) backend_failed: bool,
    /// Transmit (first) and receive (second) limits.
    pub(crate) throttle: Throttle,
}

/// A random locally administered unicast MAC address (02:xx:xx:xx:xx:xx).
fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut mac[1..]));
    if read.is_err() {
        // Fall back to something unique per process and time.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        mac[1..5].copy_from_slice(&(t ^ std::process::id()).to_le_bytes());
    }
    mac[0] = 0x02;
    mac
}

impl Net {
    /// Creates the backend described by `config` (tap or passt) and the device in front of it.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let mac = config.mac.unwrap_or_else(random_mac);
        match &config.backend {
            NetBackendConfig::Tap(tap) => {
                let tap = Tap::new(tap)?;
                let name = tap.name().to_string();
                let mut net = Self::with_backend(Box::new(tap), mac)?;
                net.tap_name = Some(name);
                net.limit(config.limit)?;
                Ok(net)
            }
            NetBackendConfig::User(passt) => {
                let mut net = Self::with_backend(Box::new(Passt::new(passt)?), mac)?;
                net.limit(config.limit)?;
                Ok(net)
            }
        }
    }

    /// Limits each direction to `limit`.
    pub fn limit(&mut self, limit: Limit) -> Result<(), NetError> {
        self.throttle = Throttle::new(limit, limit).map_err(NetError::EventFd)?;
        Ok(())
    }

    /// A device in front of an existing backend.
    pub fn with_backend(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Result<Self, NetError> {
        let avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << features::MAC)
            | (1u64 << features::STATUS)
            | (1u64 << features::MRG_RXBUF)
            | backend.offload_features();
        Ok(Self {
            backend,
            tap_name: None,
            mac,
            avail_features,
            acked_features: 0,
            metrics: Arc::new(NetMetrics::default()),
            events: DeviceEvents::new().map_err(NetError::EventFd)?,
            active: None,
            backend_registered: false,
            backend_failed: false,
            throttle: Throttle::new(Limit::default(), Limit::default())
                .map_err(NetError::EventFd)?,
        })
    }

    /// The guest's MAC address (as in the config space).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Name of the tap interface, for the tap backend.
    pub fn tap_name(&self) -> Option<&str> {
        self.tap_name.as_deref()
    }

    /// The device's counters (shared; read them any time, e.g. `metrics().to_json()`).
    pub fn metrics(&self) -> Arc<NetMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The config space: mac[6], status u16, max_virtqueue_pairs u16.
    fn config_space(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        ignore_config_write(NAME, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let a = ctx.expect_queues::<2>()?;
        self.backend
            .set_offloads(self.acked_features)
            .map_err(ActivateError::Io)?;
        debug_assert_eq!((RX_INDEX, TX_INDEX), (0, 1));
        let [rx, tx] = a.queues;
        let mrg = self.acked_features & (1u64 << features::MRG_RXBUF) != 0;
        let queues = NetQueues::new(a.mem, rx, tx, a.interrupt, mrg, self.metrics());
        self.active = Some(queues);
        self.events.activated(a.queue_evts);
        Ok(())
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(NetQueues::queue_states)
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        let _ = self.backend.set_offloads(0);
        // Let the event loop unregister the old queue eventfds and the backend.
        self.events.deactivated();
        true
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::virtio::net::backend::tests::PairBackend;
    use crate::virtio::net::tap::tests::in_netns;
    use crate::virtio::testing::{guest_memory, interrupt, GuestQueue};
    use vmm_sys_util::eventfd::EventFd;

    fn pair_net() -> Net {
        let (b, _peer) = PairBackend::new();
        Net::with_backend(Box::new(b), [2, 1, 2, 3, 4, 5]).expect("net")
    }

    #[test]
    fn config_space_holds_mac_and_link_up() {
        let net = pair_net();
        let mut c = [0xffu8; 12];
        net.read_config(0, &mut c);
        assert_eq!(&c[..6], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), LINK_UP);
        assert_eq!(&c[10..], &[0, 0], "past the end reads 0");
        let mut far = [0xffu8; 4];
        net.read_config(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn features_without_offloads_for_a_plain_backend() {
        let mut net = pair_net();
        let f = net.avail_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            features::MAC,
            features::STATUS,
            features::MRG_RXBUF,
        ] {
            assert_ne!(f & (1u64 << bit), 0, "bit {bit}");
        }
        assert_eq!(f & (1u64 << features::CSUM), 0);
        net.ack_features(u64::MAX);
        assert_eq!(net.acked_features, f, "acked features are masked");
    }

    #[test]
    fn tap_device_offers_checksum_and_tso() {
        in_netns(|| {
            let cfg = NetConfig {
                mac: None,
                backend: NetBackendConfig::Tap(TapConfig::default()),
                limit: Limit::default(),
            };
            let net = Net::new(&cfg).expect("tap net");
            let f = net.avail_features();
            for bit in [features::CSUM, features::GUEST_CSUM, features::HOST_TSO4] {
                assert_ne!(f & (1u64 << bit), 0, "bit {bit}");
            }
            let mac = net.mac();
            assert_eq!(mac[0] & 0x03, 0x02, "random MAC is local unicast");
        });
    }

    #[test]
    fn activate_with_wrong_queue_count_fails() {
        let mut net = pair_net();
        let mem = guest_memory();
        let q = GuestQueue::new(&mem, 0, 16);
        let err = net
            .activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![q.queue()],
                queue_evts: vec![EventFd::new(0).expect("evt")],
                interrupt: interrupt(),
            })
            .expect_err("one queue is not enough");
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                got: 1
            }
        ));
        assert!(net.active.is_none());
    }

    #[test]
    fn reset_forgets_queues_and_features() {
        let mut net = pair_net();
        let mem = guest_memory();
        let (a, b) = (
            GuestQueue::new(&mem, 0, 16),
            GuestQueue::new(&mem, 0x1_0000, 16),
        );
        net.ack_features(net.avail_features());
        net.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![a.queue(), b.queue()],
            queue_evts: vec![EventFd::new(0).expect("evt"), EventFd::new(0).expect("evt")],
            interrupt: interrupt(),
        })
        .expect("activate");
        assert!(net.active.is_some());
        assert!(net.reset());
        assert!(net.active.is_none());
        assert_eq!(net.acked_features, 0);
    }
}
