//! Disk backends: where the sectors of a virtio-blk device live.
//!
//! The device only speaks [`DiskBackend`]; [`RawFile`] is a raw image file (or block device) on
//! the host, [`MemDisk`] a disk held in memory (scratch disks, fuzzing).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use log::debug;

use super::{BlockError, ID_LEN};

/// Largest chunk written at once when zeroes must be written out by hand.
const ZERO_CHUNK: usize = 64 * 1024;

/// Storage behind a virtio-blk device. Offsets and lengths are in bytes and already checked
/// against [`DiskBackend::len`] by the device.
pub trait DiskBackend: Send + std::fmt::Debug {
    /// Size of the disk in bytes.
    fn len(&self) -> u64;
    /// Whether the disk has zero length.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether writes must be refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Whether [`DiskBackend::discard`] can deallocate space.
    fn supports_discard(&self) -> bool;
    /// Deallocates `[offset, offset + len)`; the range may read back as anything afterwards.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes `[offset, offset + len)`, deallocating it if `may_unmap` and possible.
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;
    /// A stable identifier for GET_ID (at most 20 bytes are used).
    fn serial(&self) -> String;
}

/// Writes `len` zero bytes at `offset` through `write_at`.
fn write_zeroes_by_hand(
    len: u64,
    offset: u64,
    mut write_at: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(ZERO_CHUNK, |rest| rest.min(ZERO_CHUNK));
        write_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A raw disk image file on the host.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    len: u64,
    read_only: bool,
    serial: String,
    can_punch_hole: bool,
    can_zero_range: bool,
}

impl RawFile {
    /// Opens `path` (read-only if `read_only`) and probes which fallocate modes it supports.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Metadata {
            path: path.to_owned(),
            source,
        })?;
        let len = if meta.file_type().is_block_device() {
            let mut f = &file;
            io::Seek::seek(&mut f, io::SeekFrom::End(0)).map_err(|source| BlockError::Metadata {
                path: path.to_owned(),
                source,
            })?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(BlockError::NotAFile {
                path: path.to_owned(),
            });
        };
        let serial = format!("mvm{:x}.{:x}", meta.dev(), meta.ino());
        let mut disk = Self {
            file,
            len,
            read_only,
            serial,
            can_punch_hole: false,
            can_zero_range: false,
        };
        if !read_only && meta.is_file() {
            // Punching a hole past the end of the file (size kept) changes nothing but tells
            // whether the filesystem can punch holes at all.
            let probe_at = len.div_ceil(4096).saturating_add(1).saturating_mul(4096);
            disk.can_punch_hole = disk.fallocate(PUNCH_HOLE, probe_at, 4096).is_ok();
            disk.can_zero_range = true; // Probed on first use; falls back to writing zeroes.
        }
        debug!(
            "disk {}: {} bytes, ro={read_only}, punch_hole={}",
            path.display(),
            len,
            disk.can_punch_hole
        );
        Ok(disk)
    }

    /// The open image file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
        let offset = libc::off64_t::try_from(offset).map_err(|_| invalid())?;
        let len = libc::off64_t::try_from(len).map_err(|_| invalid())?;
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by self.file and
        // open for the duration of the call.
        let rc = unsafe { libc::fallocate64(self.file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl DiskBackend for RawFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn supports_discard(&self) -> bool {
        self.can_punch_hole && !self.read_only
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(PUNCH_HOLE, offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if may_unmap && self.can_punch_hole && self.fallocate(PUNCH_HOLE, offset, len).is_ok() {
            return Ok(());
        }
        if self.can_zero_range {
            match self.fallocate(ZERO_RANGE, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => self.can_zero_range = false,
                Err(e) => return Err(e),
            }
        }
        let file = &self.file;
        write_zeroes_by_hand(len, offset, |buf, at| file.write_all_at(buf, at))
    }

    fn serial(&self) -> String {
        self.serial.clone()
    }
}

/// A disk held in host memory, lost when the device goes away.
#[derive(Debug, Clone)]
pub struct MemDisk {
    data: Vec<u8>,
    read_only: bool,
}

impl MemDisk {
    /// A zero-filled disk of `len` bytes.
    pub fn new(len: usize, read_only: bool) -> Self {
        Self::from_bytes(vec![0; len], read_only)
    }

    /// A disk with the given contents.
    pub fn from_bytes(data: Vec<u8>, read_only: bool) -> Self {
        Self { data, read_only }
    }

    /// The disk contents.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok();
        start
            .and_then(|s| s.checked_add(len).map(|e| s..e))
            .filter(|r| r.end <= self.data.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
    }
}

impl DiskBackend for MemDisk {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        self.data[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn supports_discard(&self) -> bool {
        !self.read_only
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let r = self.range(offset, len)?;
        self.data[r].fill(0);
        Ok(())
    }

    fn serial(&self) -> String {
        format!("mvm-mem-{:x}", self.data.len())
    }
}

/// The GET_ID answer: the serial, truncated or NUL-padded to 20 bytes.
pub fn id_bytes(serial: &str) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let n = serial.len().min(ID_LEN);
    id[..n].copy_from_slice(&serial.as_bytes()[..n]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn raw_file_reads_writes_and_zeroes() {
        let f = image(64 * 1024);
        let mut disk = RawFile::open(f.path(), false).unwrap();
        assert_eq!(disk.len(), 64 * 1024);
        let mut buf = [0u8; 4];
        disk.read_at(&mut buf, 251).unwrap();
        assert_eq!(buf, [0, 1, 2, 3]);
        disk.write_at(&[9, 9], 0).unwrap();
        disk.flush().unwrap();
        disk.write_zeroes(4096, 8192, false).unwrap();
        let back = std::fs::read(f.path()).unwrap();
        assert_eq!(&back[..2], &[9, 9]);
        assert!(back[4096..12288].iter().all(|&b| b == 0));
        assert_eq!(back[12288], (12288 % 251) as u8);
        if disk.supports_discard() {
            disk.discard(16384, 4096).unwrap();
            let back = std::fs::read(f.path()).unwrap();
            assert!(back[16384..20480].iter().all(|&b| b == 0));
            assert_eq!(back.len(), 64 * 1024);
        } else {
            eprintln!("skipping discard check: filesystem cannot punch holes");
        }
    }

    #[test]
    fn raw_file_read_only_rejects_writes_at_the_os_level() {
        let f = image(4096);
        let mut disk = RawFile::open(f.path(), true).unwrap();
        assert!(disk.read_only());
        assert!(!disk.supports_discard());
        assert!(disk.write_at(&[1], 0).is_err());
    }

    #[test]
    fn raw_file_open_errors_name_the_path() {
        let err = RawFile::open(Path::new("/nonexistent/disk.img"), true).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk.img"));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            RawFile::open(dir.path(), true),
            Err(BlockError::NotAFile { .. }) | Err(BlockError::Open { .. })
        ));
    }

    #[test]
    fn mem_disk_bounds_are_checked() {
        let mut d = MemDisk::new(1024, false);
        assert!(d.write_at(&[1; 8], 1020).is_err());
        assert!(d.read_at(&mut [0; 1], u64::MAX).is_err());
        d.write_at(&[7; 4], 1020).unwrap();
        assert_eq!(&d.bytes()[1020..], &[7; 4]);
    }

    #[test]
    fn id_is_padded_or_truncated_to_20_bytes() {
        assert_eq!(&id_bytes("ab")[..3], b"ab\0");
        assert_eq!(
            &id_bytes("0123456789abcdefghijXYZ"),
            b"0123456789abcdefghij"
        );
    }
}
