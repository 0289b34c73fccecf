//! The mvm virtual machine monitor: KVM, guest memory, direct kernel boot, vCPUs, the device
//! manager and the event loop.
#![deny(missing_docs)]

pub mod cli;
pub mod portfwd;
pub mod state;
