//! mvm images: OCI references, registry pulls, the content-addressed store, safe layer unpacking,
//! root filesystem disk images and the agent's initramfs.
#![deny(missing_docs)]
pub mod digest;
pub mod disk;
pub mod examples;
pub mod initramfs;
pub mod limits;
pub mod load;
pub mod manifest;
pub mod oci_writer;
pub mod reference;
pub mod registry;
pub mod rootdir;
pub mod rootfs;
pub mod store;
pub mod unpack;
