//! Guest memory in a snapshot: one file, the RAM regions one after the other, written sparse
//! (pages of zeros are holes), and mapped `MAP_PRIVATE` on restore: every VM restored from the
//! file shares its pages through the page cache until it writes one (copy on write).
//!
//! The checksum covers the pages that are not all zeros, each with its page number, so it is the
//! same whether a file system keeps the holes or fills them in, and checking it reads only the
//! file's data (`SEEK_DATA`/`SEEK_HOLE`), not the holes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::memory::ram_ranges;

/// Page size the file is written and checked in.
const PAGE: usize = 4096;
/// Bytes copied out of guest memory at a time while saving.
const CHUNK: usize = 256 * PAGE;

/// Why guest memory could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// Reading or writing the file failed.
    #[error("guest memory file {0}")]
    Io(String, #[source] io::Error),
    /// Reading guest memory failed.
    #[error("cannot read guest memory")]
    Guest(#[source] vm_memory::GuestMemoryError),
    /// The file is not as long as the snapshot says.
    #[error("guest memory file is {got} bytes, the snapshot needs {want}: truncated or replaced")]
    Size {
        /// Its length.
        got: u64,
        /// The length the state names.
        want: u64,
    },
    /// The checksum does not match.
    #[error("guest memory file is corrupted (checksum {got:08x}, expected {want:08x})")]
    Checksum {
        /// What the file hashes to.
        got: u32,
        /// What the state says.
        want: u32,
    },
    /// Mapping the file failed.
    #[error("cannot map the guest memory file")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// The regions do not form guest memory.
    #[error("cannot build guest memory from the file")]
    Regions(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MemoryFileError + '_ {
    move |e| MemoryFileError::Io(path.display().to_string(), e)
}

/// What the state file says about the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryInfo {
    /// Guest RAM in bytes (the file's length).
    pub size: u64,
    /// CRC-32 of the pages that are not all zeros, each after its page number.
    pub checksum: u32,
    /// Pages that are not all zeros.
    pub data_pages: u64,
}

fn is_zero(page: &[u8]) -> bool {
    // No early exit: the loop vectorizes, and a page with data is hashed whole anyway.
    page.iter().fold(0u8, |acc, b| acc | b) == 0
}

fn hash_page(hasher: &mut crc32fast::Hasher, index: u64, page: &[u8]) {
    hasher.update(&index.to_le_bytes());
    hasher.update(page);
}

/// Writes all of `mem` to `file` (new and empty; `path` names it in errors), sparse; syncs it.
pub fn save(
    mem: &GuestMemoryMmap,
    file: &File,
    path: &Path,
) -> Result<MemoryInfo, MemoryFileError> {
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(size).map_err(io_err(path))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut data_pages = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut file_off = 0u64;
    for region in mem.iter() {
        let mut done = 0u64;
        while done < region.len() {
            let len = usize::try_from((region.len() - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let chunk = &mut buf[..len];
            mem.read_slice(chunk, GuestAddress(region.start_addr().0 + done))
                .map_err(MemoryFileError::Guest)?;
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                if is_zero(page) {
                    continue;
                }
                let at = file_off + done + (i * PAGE) as u64;
                hash_page(&mut hasher, at / PAGE as u64, page);
                file.write_all_at(page, at).map_err(io_err(path))?;
                data_pages += 1;
            }
            done += len as u64;
        }
        file_off += region.len();
    }
    file.sync_all().map_err(io_err(path))?;
    Ok(MemoryInfo {
        size,
        checksum: hasher.finalize(),
        data_pages,
    })
}

/// `lseek` with SEEK_DATA or SEEK_HOLE; `None` past the last data.
fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from).map_err(|_| io::Error::other("offset too large"))?;
    // SAFETY: lseek on a descriptor this function borrows; it changes only the file offset.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if at < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(u64::try_from(at).ok())
}

/// Checks the file against `info`: its length, then the checksum of its data.
pub fn verify(path: &Path, info: &MemoryInfo) -> Result<(), MemoryFileError> {
    let file = File::open(path).map_err(io_err(path))?;
    let got = file.metadata().map_err(io_err(path))?.len();
    if got != info.size {
        return Err(MemoryFileError::Size {
            got,
            want: info.size,
        });
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < info.size {
        let Some(start) = seek(&file, pos, libc::SEEK_DATA).map_err(io_err(path))? else {
            break;
        };
        let end = seek(&file, start, libc::SEEK_HOLE)
            .map_err(io_err(path))?
            .unwrap_or(info.size)
            .min(info.size);
        // Data extents start and end on page boundaries for a file written page by page; round
        // outwards anyway so every page is hashed whole.
        let mut at = start - start % PAGE as u64;
        while at < end {
            let len = usize::try_from((end - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            let len = len.div_ceil(PAGE) * PAGE;
            let chunk = &mut buf[..len];
            let n = read_full_at(&file, chunk, at).map_err(io_err(path))?;
            for (i, page) in chunk[..n].chunks(PAGE).enumerate() {
                if !is_zero(page) {
                    hash_page(&mut hasher, at / PAGE as u64 + i as u64, page);
                }
            }
            at += len as u64;
        }
        pos = end.max(start + 1);
    }
    let got = hasher.finalize();
    if got != info.checksum {
        return Err(MemoryFileError::Checksum {
            got,
            want: info.checksum,
        });
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes at `at` (fewer only at the end of the file).
fn read_full_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // A short page at the end is zero-padded for hashing.
    let whole = (got.div_ceil(PAGE) * PAGE).min(buf.len());
    buf[got..whole].fill(0);
    Ok(whole)
}

/// Maps the file as guest memory of `size` bytes, privately: writes stay in this process.
pub fn map(path: &Path, size: u64) -> Result<GuestMemoryMmap, MemoryFileError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(size) {
        let len_usize =
            usize::try_from(len).map_err(|_| MemoryFileError::Regions("too large".into()))?;
        let file = file.try_clone().map_err(io_err(path))?;
        let mapping = MmapRegionBuilder::new(len_usize)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryFileError::Map)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryFileError::Regions("region overflows".into()))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryFileError::Regions(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_round_trips_sparse_and_corruption_or_truncation_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let mem = crate::memory::create_guest_memory(4 << 20).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1234)).unwrap();
        mem.write_obj(0xdead_beef_u64, GuestAddress(3 << 20))
            .unwrap();
        let path = dir.path().join("memory");
        let file = std::fs::File::create(&path).unwrap();
        let info = save(&mem, &file, &path).unwrap();
        assert_eq!((info.size, info.data_pages), (4 << 20, 2));
        verify(&path, &info).unwrap();
        // Sparse: the file takes far less than 4 MiB on disk.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);

        let restored = map(&path, info.size).unwrap();
        let mut hello = [0u8; 5];
        restored
            .read_slice(&mut hello, GuestAddress(0x1234))
            .unwrap();
        assert_eq!(&hello, b"hello");
        // Private: writes do not reach the file.
        restored.write_obj(7u8, GuestAddress(0x1234)).unwrap();
        verify(&path, &info).unwrap();
        assert_eq!(
            map(&path, info.size)
                .unwrap()
                .read_obj::<u8>(GuestAddress(0x1234))
                .unwrap(),
            b'h'
        );

        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"x", 0x1235).unwrap();
        assert!(matches!(
            verify(&path, &info),
            Err(MemoryFileError::Checksum { .. })
        ));
        f.write_all_at(b"e", 0x1235).unwrap();
        verify(&path, &info).unwrap();
        f.write_all_at(b"!", 2 << 20).unwrap();
        assert!(verify(&path, &info).is_err(), "a new page of data");
        f.set_len(info.size - 4096).unwrap();
        assert!(matches!(
            verify(&path, &info),
            Err(MemoryFileError::Size { .. })
        ));
    }
}
