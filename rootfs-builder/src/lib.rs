//! mvm images: OCI references, registry pulls, the content-addressed store, safe layer unpacking,
//! root filesystem disk images and the agent's initramfs.
#![deny(missing_docs)]

pub mod digest;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod store;
