//! Builds the virtio devices a VM asks for (block, net, vsock, rng), puts each behind a
//! virtio-mmio transport and attaches it to the VM; collects their metrics as JSON.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::metrics::DeviceMetrics;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::{Net, NetBackendConfig, NetConfig, PasstConfig, TapConfig};
use devices::virtio::rate_limiter::Limit;
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;
use serde::{Deserialize, Serialize};

use crate::builder::VmBuilder;
use crate::device_manager::{Subscriber, VirtioMmioDevice};

/// Guest CID given to the VM's vsock device.
pub const GUEST_CID: u64 = 3;

/// Errors building or attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    /// A disk could not be opened.
    #[error("disk {path}")]
    Block {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: devices::virtio::block::BlockError,
    },
    /// The network device could not be set up.
    #[error("network")]
    Net(#[source] devices::virtio::net::NetError),
    /// The vsock device could not be set up.
    #[error("vsock socket {path}")]
    Vsock {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: devices::virtio::vsock::VsockError,
    },
    /// The rng device could not be set up.
    #[error("entropy device")]
    Rng(#[source] devices::virtio::rng::RngError),
    /// The MMIO transport could not be built.
    #[error("virtio-mmio transport")]
    Transport(#[source] devices::virtio::mmio::MmioError),
    /// The VM had no room for the device.
    #[error("attaching a device")]
    Attach(#[source] crate::builder::BuildError),
    /// An eventfd could not be duplicated for KVM.
    #[error("duplicating a device eventfd")]
    EventFd(#[source] std::io::Error),
    /// `--network` value that does not parse.
    #[error("invalid --network '{0}': use user, tap, tap:NAME or none")]
    NetworkMode(String),
}

/// The guest's network.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum NetworkMode {
    /// No network device.
    #[default]
    None,
    /// Rootless user-mode networking through passt.
    User,
    /// A tap device on the host, optionally with a name and a host address.
    Tap {
        /// Interface name (`mvm-tapN` when absent).
        name: Option<String>,
        /// Host side address, e.g. 172.30.0.1/24.
        host_ip: Option<(Ipv4Addr, u8)>,
    },
}

impl std::str::FromStr for NetworkMode {
    type Err = DeviceSetupError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DeviceSetupError::NetworkMode(s.to_string());
        match s {
            "none" => Ok(NetworkMode::None),
            "user" => Ok(NetworkMode::User),
            "tap" => Ok(NetworkMode::Tap {
                name: None,
                host_ip: None,
            }),
            _ => {
                let rest = s.strip_prefix("tap:").ok_or_else(bad)?;
                let (name, ip) = match rest.split_once(',') {
                    Some((n, ip)) => (n, Some(ip)),
                    None => (rest, None),
                };
                let host_ip = ip
                    .map(|ip| {
                        let (addr, prefix) = ip.split_once('/').unwrap_or((ip, "24"));
                        Ok::<_, DeviceSetupError>((
                            addr.parse().map_err(|_| bad())?,
                            prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?,
                        ))
                    })
                    .transpose()?;
                if name.is_empty() || name.len() > 15 {
                    return Err(bad());
                }
                Ok(NetworkMode::Tap {
                    name: Some(name.to_string()),
                    host_ip,
                })
            }
        }
    }
}

/// The devices of one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesConfig {
    /// Disks, in order: the first is /dev/vda.
    #[serde(default)]
    pub disks: Vec<BlockConfig>,
    /// The network.
    #[serde(default)]
    pub network: NetworkMode,
    /// Host Unix socket of the vsock device.
    #[serde(default)]
    pub vsock: Option<PathBuf>,
    /// Attach an entropy device.
    #[serde(default)]
    pub rng: bool,
    /// With user networking, the guest address passt answers DNS on (`--dns-forward`).
    #[serde(default)]
    pub dns_forward: Option<std::net::Ipv4Addr>,
    /// The resolvers passt forwards those queries to; the host's when empty.
    #[serde(default)]
    pub dns: Vec<std::net::IpAddr>,
    /// The network device's rate limit, each direction (`--network-rate`).
    #[serde(default)]
    pub net_limit: Limit,
}

/// The devices attached to a VM: their metrics, and what the caller may need to know (the tap).
pub struct AttachedDevices {
    /// Each device's counters under its key in the metrics JSON (`block_vda`, `net`, ...).
    metrics: Vec<(String, Arc<dyn DeviceMetrics>)>,
    /// Name of the tap interface, with `--network tap`.
    pub tap_name: Option<String>,
    /// Guest MAC address, when there is a network device.
    pub mac: Option<[u8; 6]>,
}

impl std::fmt::Debug for AttachedDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedDevices")
            .field("devices", &self.metrics.len())
            .field("tap_name", &self.tap_name)
            .finish()
    }
}

impl AttachedDevices {
    /// Every device's counters, as one JSON object keyed by device.
    pub fn metrics_json(&self) -> serde_json::Value {
        let out = self
            .metrics
            .iter()
            .map(|(key, m)| (key.clone(), m.to_json()));
        serde_json::Value::Object(out.collect())
    }

    /// Writes [`AttachedDevices::metrics_json`] over the start of `file` with one positioned
    /// write (no path, no rename: a jailed VMM may do this), padded with spaces to the length
    /// `written` of the last write, which JSON readers skip; `written` becomes the new length.
    pub fn write_metrics_to(
        &self,
        file: &std::fs::File,
        written: &mut usize,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut json = serde_json::to_vec_pretty(&self.metrics_json())?;
        json.push(b'\n');
        let len = json.len();
        json.resize(len.max(*written), b' ');
        file.write_all_at(&json, 0)?;
        *written = json.len();
        Ok(())
    }
}

/// Builds every device of `config` and attaches it to the VM being built.
pub fn attach(
    builder: &mut VmBuilder,
    config: &DevicesConfig,
) -> Result<AttachedDevices, DeviceSetupError> {
    let mut attached = AttachedDevices {
        metrics: Vec::new(),
        tap_name: None,
        mac: None,
    };
    for (i, disk) in config.disks.iter().enumerate() {
        let block = Block::new(disk).map_err(|source| DeviceSetupError::Block {
            path: disk.path.clone(),
            source,
        })?;
        let id = char::from(b'a' + u8::try_from(i % 26).unwrap_or(0));
        attached
            .metrics
            .push((format!("block_vd{id}"), block.metrics()));
        attach_one(builder, Arc::new(Mutex::new(block)))?;
    }
    let backend = match &config.network {
        NetworkMode::None => None,
        // Published ports go over vsock (the engine's port forwarder), not through passt.
        NetworkMode::User => Some(NetBackendConfig::User(PasstConfig {
            tcp_ports: Vec::new(),
            udp_ports: Vec::new(),
            dns_forward: config.dns_forward,
            dns: config.dns.clone(),
        })),
        NetworkMode::Tap { name, host_ip } => Some(NetBackendConfig::Tap(TapConfig {
            name: name.clone(),
            host_ip: host_ip.map(|(ip, _)| ip),
            prefix_len: host_ip.map_or(24, |(_, p)| p),
        })),
    };
    if let Some(backend) = backend {
        let net = Net::new(&NetConfig {
            mac: None,
            backend,
            limit: config.net_limit,
        })
        .map_err(DeviceSetupError::Net)?;
        attached.tap_name = net.tap_name().map(str::to_string);
        attached.mac = Some(net.mac());
        attached.metrics.push(("net".to_string(), net.metrics()));
        attach_one(builder, Arc::new(Mutex::new(net)))?;
    }
    if let Some(path) = &config.vsock {
        let vsock = Vsock::new(path, GUEST_CID).map_err(|source| DeviceSetupError::Vsock {
            path: path.clone(),
            source,
        })?;
        attached
            .metrics
            .push(("vsock".to_string(), vsock.metrics()));
        attach_one(builder, Arc::new(Mutex::new(vsock)))?;
    }
    if config.rng {
        let rng = Rng::new().map_err(DeviceSetupError::Rng)?;
        attached.metrics.push(("rng".to_string(), rng.metrics()));
        attach_one(builder, Arc::new(Mutex::new(rng)))?;
    }
    Ok(attached)
}

fn attach_one<D>(builder: &mut VmBuilder, device: Arc<Mutex<D>>) -> Result<(), DeviceSetupError>
where
    D: VirtioDevice + event_manager::MutEventSubscriber + Send + 'static,
{
    let transport = MmioTransport::new(builder.guest_memory().clone(), device.clone())
        .map_err(DeviceSetupError::Transport)?;
    let queue_evts = transport
        .queue_evts()
        .iter()
        .map(|e| e.try_clone())
        .collect::<Result<Vec<_>, _>>()
        .map_err(DeviceSetupError::EventFd)?;
    let irq_evt = transport
        .irq_evt()
        .try_clone()
        .map_err(DeviceSetupError::EventFd)?;
    let subscriber: Subscriber = device;
    builder
        .attach_virtio_mmio(VirtioMmioDevice {
            transport: Arc::new(Mutex::new(transport)),
            queue_evts,
            irq_evt,
            subscriber,
        })
        .map_err(DeviceSetupError::Attach)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_json_has_one_object_of_counters_per_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![0u8; 4096]).expect("image");
        let block = Block::new(&BlockConfig {
            path: img,
            read_only: false,
            serial: None,
            limits: Default::default(),
        })
        .expect("block");
        let vsock = Vsock::new(&dir.path().join("v.sock"), GUEST_CID).expect("vsock");
        let rng = Rng::new().expect("rng");
        let attached = AttachedDevices {
            metrics: vec![
                ("block_vda".to_string(), block.metrics()),
                ("vsock".to_string(), vsock.metrics()),
                ("rng".to_string(), rng.metrics()),
            ],
            tap_name: None,
            mac: None,
        };
        let json = attached.metrics_json();
        let keys = |dev: &str| -> Vec<String> {
            let obj = json[dev].as_object().expect("an object per device");
            assert!(obj.values().all(|v| v.as_u64() == Some(0)), "{obj:?}");
            obj.keys().cloned().collect()
        };
        assert_eq!(json.as_object().map(|o| o.len()), Some(3));
        assert_eq!(
            keys("block_vda"),
            [
                "activations",
                "discards",
                "flushes",
                "get_ids",
                "interrupts",
                "invalid_chains",
                "io_errors",
                "queue_errors",
                "queue_events",
                "read_bytes",
                "reads",
                "throttled",
                "unsupported",
                "write_bytes",
                "write_zeroes",
                "writes"
            ]
        );
        assert_eq!(
            keys("rng"),
            [
                "activations",
                "bytes",
                "entropy_errors",
                "interrupts",
                "invalid_chains",
                "queue_errors",
                "queue_events",
                "requests"
            ]
        );
        assert_eq!(
            keys("vsock"),
            [
                "bad_buffers",
                "bad_packets",
                "connections",
                "guest_connects",
                "host_connects",
                "limit_refused",
                "refused",
                "resets_sent",
                "rx_bytes",
                "rx_dropped",
                "rx_packets",
                "tx_buffered",
                "tx_bytes",
                "tx_overflow_resets",
                "tx_packets",
                "tx_paused"
            ]
        );
    }

    #[test]
    fn network_modes_parse() {
        assert_eq!("none".parse::<NetworkMode>().unwrap(), NetworkMode::None);
        assert_eq!("user".parse::<NetworkMode>().unwrap(), NetworkMode::User);
        assert_eq!(
            "tap:mvm0,172.30.0.1/24".parse::<NetworkMode>().unwrap(),
            NetworkMode::Tap {
                name: Some("mvm0".into()),
                host_ip: Some(([172, 30, 0, 1].into(), 24))
            }
        );
        for bad in [
            "bridge",
            "tap:",
            "tap:x,300.0.0.1",
            "tap:a,1.2.3.4/40",
            "tap:waytoolonginterfacename",
        ] {
            assert!(bad.parse::<NetworkMode>().is_err(), "{bad}");
        }
    }
}
