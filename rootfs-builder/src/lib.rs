//! mvm images: OCI references, registry pulls, the content-addressed store, safe layer unpacking,
//! root filesystem disk images and the agent's initramfs.
#![deny(missing_docs)]
pub mod disk;
pub mod examples;
pub mod initramfs;
pub mod oci_writer;
pub mod rootfs;
pub mod unpack;
