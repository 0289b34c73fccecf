//! The mvm virtual machine monitor: KVM, guest memory, direct kernel boot, vCPUs, the device
//! manager and the event loop. It knows nothing of containers, images or the command line: the
//! `engine` crate drives it to run a container in a microVM, and `mvm boot` drives it directly.
//!
//! Start with [`builder::VmBuilder`]: it turns a [`config::VmConfig`] into a VM, lets devices be
//! attached ([`virtio_devices::attach`]), and runs it until it ends with a [`exit::VmExit`].
#![deny(missing_docs)]

pub mod boot;
pub mod builder;
pub mod config;
pub mod console_log;
pub mod cpuid;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod host;
pub mod memory;
pub mod mptable;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod vcpu;
pub mod virtio_devices;
pub mod vm;
