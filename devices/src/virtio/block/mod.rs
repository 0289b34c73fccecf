//! virtio-blk (virtio 1.2, section 5.2) over a disk backend (a raw file by default).
//!
//! `request.rs` turns a descriptor chain into a [`request::Request`] without trusting any of it,
//! `device.rs` executes requests against a [`backend::DiskBackend`] and implements
//! [`VirtioDevice`](super::VirtioDevice), `event_handler.rs` connects the device to the event loop,
//! `metrics.rs` counts what happened.

use std::io;
use std::path::PathBuf;

pub mod backend;
pub mod device;
pub mod disk;
pub mod event_handler;
pub mod metrics;
pub mod request;
#[cfg(test)]
mod test_support;

pub use backend::{DiskBackend, MemDisk, RawFile};
pub use device::{Block, BlockConfig, BlockLimits};
pub use disk::Disk;
pub use metrics::BlockMetrics;

/// Prefix of the device's log lines.
pub const NAME: &str = "virtio-blk";
/// Bytes per virtio-blk sector (fixed by the spec, independent of the disk's block size).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the GET_ID serial.
pub const ID_LEN: usize = 20;
/// Most data segments per request (seg_max): the queue minus header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest single data segment (size_max).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most segments in one DISCARD or WRITE_ZEROES request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most sectors one DISCARD or WRITE_ZEROES segment may cover (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;

/// Feature bits (virtio 1.2, section 5.2.3).
pub mod features {
    /// size_max is valid.
    pub const SIZE_MAX: u32 = 1;
    /// seg_max is valid.
    pub const SEG_MAX: u32 = 2;
    /// The disk is read-only.
    pub const RO: u32 = 5;
    /// FLUSH is supported.
    pub const FLUSH: u32 = 9;
    /// DISCARD is supported.
    pub const DISCARD: u32 = 13;
    /// WRITE_ZEROES is supported.
    pub const WRITE_ZEROES: u32 = 14;
}

/// Request types (the `type` field of the request header).
pub mod request_type {
    /// Read sectors.
    pub const IN: u32 = 0;
    /// Write sectors.
    pub const OUT: u32 = 1;
    /// Make earlier writes durable.
    pub const FLUSH: u32 = 4;
    /// Read the 20-byte serial.
    pub const GET_ID: u32 = 8;
    /// Deallocate ranges.
    pub const DISCARD: u32 = 11;
    /// Zero ranges.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const IOERR: u8 = 1;
    /// The request type is not supported.
    pub const UNSUPP: u8 = 2;
}

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk image could not be opened.
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The disk image size could not be read.
    #[error("cannot read the size of disk image {}", path.display())]
    Metadata {
        /// The image path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The disk image is not a regular file or block device.
    #[error("disk image {} is not a regular file", path.display())]
    NotAFile {
        /// The image path.
        path: PathBuf,
    },
    /// A `--disk` value that is not `PATH[,ro][,serial=ID]`.
    #[error("invalid disk {0:?}: expected PATH[,ro][,serial=ID] (ID at most 20 bytes)")]
    BadSpec(String),
    /// The serial given by the user does not fit.
    #[error("disk serial {0:?} is longer than 20 bytes")]
    SerialTooLong(String),
    /// The activation eventfd could not be created.
    #[error("creating the block device eventfd failed")]
    EventFd(#[source] io::Error),
}
