//! The mvm guest agent and the container runtime it shares with the host.
#![deny(missing_docs)]
pub mod agent;
pub mod probe;
pub mod protocol;
pub mod runtime;
