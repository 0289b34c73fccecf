//! virtio-vsock in userspace (no vhost): guest sockets reach host Unix sockets.
//!
//! Host side: one Unix socket per VM, bound by mvm at a path the caller gives. A host program
//! connects to it and writes `CONNECT <port>\n`; once the guest accepts, it reads
//! `OK <hostport>\n` and then raw bytes flow both ways. A guest `connect()` to CID 2 port P
//! reaches a host program listening on the Unix socket `<path>_<P>`.
//!
//! The connection table and packet state machine ([`muxer`]) is pure and unit-tested with real
//! Unix sockets; queue processing ([`queues`]) is apart from the event-loop glue.

mod connection;
mod device;
pub mod event_handler;
mod metrics;
pub mod muxer;
pub mod packet;
pub mod queues;

use std::io;

pub use device::Vsock;
pub use metrics::VsockMetrics;
pub use muxer::{host_connect, listener_path, Muxer};

/// Prefix of the device's log lines.
pub const NAME: &str = "vsock";
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Smallest context id a guest may have.
pub const MIN_GUEST_CID: u64 = 3;
/// Queue size of all three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive (device to driver) queue.
pub const RX_INDEX: usize = 0;
/// Index of the transmit (driver to device) queue.
pub const TX_INDEX: usize = 1;
/// Index of the event queue.
pub const EVT_INDEX: usize = 2;
/// Largest payload of one packet in either direction.
pub const MAX_PKT_DATA: usize = 64 * 1024;
/// Receive buffer the device advertises per connection (`buf_alloc`).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Most connections at once; more are refused with RST (guest) or closed (host).
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets (RST, RESPONSE, credit updates) waiting for the guest's receive buffers at
/// which the device stops taking packets from the guest's transmit queue, until the guest has
/// taken some: each guest packet makes at most one, so a guest that sends without receiving
/// is held here instead of growing the queue.
pub const RX_BACKLOG_PAUSE: usize = QUEUE_SIZE as usize;
/// Most control packets waiting for the guest, whatever made them (host programs connecting and
/// closing too); past it, new ones are dropped and counted (`rx_dropped`).
pub const MAX_RX_BACKLOG: usize = 4096;
/// Most guest data buffered for slow host sockets, all connections together (64 MiB; each one
/// also stays within its credit, [`CONN_BUF_ALLOC`]). A guest packet that would go past it
/// resets its connection.
pub const MAX_TX_BUFFERED: usize = 64 << 20;

/// Why the vsock device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved.
    #[error("invalid guest CID {0}: use a number from 3 to 4294967294")]
    Cid(u64),
    /// Another process is listening on the socket path.
    #[error("vsock socket {0} is in use by another process")]
    InUse(String),
    /// Binding the host Unix socket failed.
    #[error("cannot bind vsock socket {0}")]
    Bind(String, #[source] io::Error),
    /// A host connection to a guest port failed.
    #[error("cannot connect to guest port {0} through {1}")]
    HostConnect(u32, String, #[source] io::Error),
    /// Creating the muxer's epoll or an eventfd failed.
    #[error("cannot set up vsock event handling")]
    Setup(#[source] io::Error),
}
