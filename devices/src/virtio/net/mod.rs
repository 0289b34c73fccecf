//! virtio-net: an Ethernet device whose frames go to a host backend ([`NetBackend`]): a tap
//! device ([`Tap`]) or a userspace network stack, `passt` ([`Passt`]).
//!
//! Queue processing ([`queues`]) is kept apart from the event-loop glue ([`event_handler`]) so
//! that it runs in unit tests without KVM or an event loop.

mod backend;
mod device;
pub mod event_handler;
mod metrics;
mod passt;
pub mod queues;
mod tap;

use std::io;

pub use backend::NetBackend;
pub use device::{Net, NetBackendConfig, NetConfig};
pub use metrics::NetMetrics;
pub use passt::{passt_available, Passt, PasstConfig, PortForward};
pub use tap::{Tap, TapConfig};

/// Prefix of the device's log lines.
pub const NAME: &str = "virtio-net";
/// Size of `struct virtio_net_hdr_v1` (with `num_buffers`), the header in front of every frame.
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame accepted in either direction (64 KiB GSO frame + headers); bigger
/// frames are dropped and counted.
pub const MAX_FRAME_LEN: usize = 65562;
/// Queue size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_INDEX: usize = 0;
/// Index of the transmit queue.
pub const TX_INDEX: usize = 1;

/// Feature bits of virtio-net (virtio 1.2, 5.1.3).
pub mod features {
    /// Device handles packets with partial checksum.
    pub const CSUM: u32 = 0;
    /// Driver handles packets with partial checksum.
    pub const GUEST_CSUM: u32 = 1;
    /// Device has a MAC address in config space.
    pub const MAC: u32 = 5;
    /// Driver can receive TSOv4.
    pub const GUEST_TSO4: u32 = 7;
    /// Driver can receive TSOv6.
    pub const GUEST_TSO6: u32 = 8;
    /// Device can receive TSOv4.
    pub const HOST_TSO4: u32 = 11;
    /// Device can receive TSOv6.
    pub const HOST_TSO6: u32 = 12;
    /// Driver can merge receive buffers.
    pub const MRG_RXBUF: u32 = 15;
    /// Configuration status field is available.
    pub const STATUS: u32 = 16;
}

/// Why a network device or backend failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap interface name is not a valid Linux interface name.
    #[error("invalid tap name {0:?}: use 1-15 characters without '/', ':' or spaces")]
    TapName(String),
    /// Opening /dev/net/tun failed.
    #[error("cannot open /dev/net/tun (needs root or CAP_NET_ADMIN)")]
    OpenTun(#[source] io::Error),
    /// An ioctl on the tap or its interface failed.
    #[error("{0} on tap {1} failed")]
    TapIoctl(&'static str, String, #[source] io::Error),
    /// `passt` could not be started.
    #[error("cannot start passt (is the Debian package 'passt' installed?)")]
    PasstSpawn(#[source] io::Error),
    /// Creating an eventfd failed.
    #[error("cannot create eventfd")]
    EventFd(#[source] io::Error),
}
