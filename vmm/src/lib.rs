//! The mvm virtual machine monitor: KVM, guest memory, direct kernel boot, vCPUs, the device
//! manager and the event loop.
//!
//! Start with [`builder::VmBuilder`]: it turns a [`config::VmConfig`] into a VM, lets devices be
//! attached, and runs it until it ends with a [`exit::VmExit`].
#![deny(missing_docs)]

pub mod boot;
pub mod builder;
pub mod cli;
pub mod config;
pub mod console_log;
pub mod cpuid;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod host;
pub mod hostnet;
pub mod memory;
pub mod microvm;
pub mod mptable;
pub mod portfwd;
pub mod state;
pub mod vcpu;
pub mod virtio_devices;
pub mod vm;
