//! Devices of the mvm microVM: legacy serial and i8042, the virtio-mmio transport, and the virtio
//! block, net, vsock and rng devices. Everything here is driven by the guest, so every value read
//! from guest memory or a device register is treated as hostile input.
#![deny(missing_docs)]

pub mod bus;
pub mod legacy;
pub mod ratelimit;
pub mod virtio;
