//! The mvm guest agent and the container runtime it shares with the host.
//!
//! - [`guest`]: the host-guest contract outside the protocol: boot parameters, guest paths, ids.
//! - [`protocol`]: the agent protocol (frames and typed messages) over vsock.
//! - [`agent`]: PID 1 in the guest and the protocol's server and client.
//! - [`runtime`]: the container runtime (namespaces, overlay root, cgroups), also used on the host.
//! - [`logger`]: the stderr logger of mvm's binaries.
//! - [`probe`]: `mvm-agent probe`, a report of what the calling process sees and can do.
#![deny(missing_docs)]
pub mod agent;
pub mod guest;
pub mod logger;
pub mod probe;
pub mod protocol;
pub mod runtime;
