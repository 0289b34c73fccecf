//! Loading the guest: kernel (ELF vmlinux or bzImage) through linux-loader, the initrd at the
//! top of low memory, the command line, and the zero page with the e820 map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{self, CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIGHMEM_START, ZERO_PAGE_ADDR};

/// Offset of the 64-bit entry point in a loaded bzImage (`startup_64`).
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// "HdrS", the magic of the boot protocol header.
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "Undefined" boot loader id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Where initrds may end when the kernel does not say (`initrd_addr_max` of 64-bit kernels).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const PAGE_SIZE: u64 = 4096;

/// Why the guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel or initrd file cannot be opened or read.
    #[error("cannot read {what} {}", path.display())]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither ELF nor bzImage.
    #[error("{} is not a Linux kernel (neither an ELF vmlinux nor a bzImage)", .0.display())]
    NotAKernel(PathBuf),
    /// linux-loader refused the kernel.
    #[error("kernel {} does not fit in guest memory (try a larger --mem) or is malformed", .0.display())]
    Kernel(PathBuf, #[source] linux_loader::loader::Error),
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x} (kernel ends at {kernel_end:#x}): give the VM more memory")]
    InitrdTooBig {
        /// Initrd size in bytes.
        size: u64,
        /// End of the kernel image.
        kernel_end: u64,
        /// Highest address the initrd may end at.
        limit: u64,
    },
    /// Writing into guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    Memory(&'static str, #[source] vm_memory::GuestMemoryError),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line cannot be written to guest memory.
    #[error("cannot write the kernel command line")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
}

/// The kinds of kernel image mvm boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux` (or any 64-bit ELF with physical load addresses).
    Elf,
    /// A bzImage (boot protocol 2.x).
    BzImage,
}

/// Tells ELF from bzImage by their magic numbers.
pub fn detect_format(path: &Path) -> Result<KernelFormat, LoaderError> {
    let read_err = |e| LoaderError::Read {
        what: "kernel",
        path: path.to_path_buf(),
        source: e,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let mut head = [0u8; 0x206];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]).map_err(read_err)? {
            0 => break,
            n => got += n,
        }
    }
    format_of(&head[..got]).ok_or_else(|| LoaderError::NotAKernel(path.to_path_buf()))
}

/// The format of an image from its first bytes.
pub fn format_of(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        return Some(KernelFormat::Elf);
    }
    let magic = head.get(0x202..0x206)?;
    (u32::from_le_bytes(magic.try_into().ok()?) == HDRS_MAGIC).then_some(KernelFormat::BzImage)
}

/// Where the kernel landed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point (guest-physical).
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage's setup header, to copy into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let format = detect_format(path)?;
    let mut file = File::open(path).map_err(|e| LoaderError::Read {
        what: "kernel",
        path: path.to_path_buf(),
        source: e,
    })?;
    let highmem = Some(GuestAddress(HIGHMEM_START));
    let load_err = |e| LoaderError::Kernel(path.to_path_buf(), e);
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, highmem).map_err(load_err)?,
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?,
    };
    let entry = match format {
        KernelFormat::Elf => result.kernel_load.0,
        KernelFormat::BzImage => result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
    };
    Ok(LoadedKernel {
        entry,
        end: result.kernel_end,
        setup_header: result.setup_header,
    })
}

/// Where an initrd of `size` bytes goes: page aligned, as high as possible below `limit`
/// (exclusive end), above `kernel_end`.
pub fn initrd_address(size: u64, kernel_end: u64, limit: u64) -> Result<u64, LoaderError> {
    let too_big = LoaderError::InitrdTooBig {
        size,
        kernel_end,
        limit,
    };
    let start = limit.checked_sub(size).ok_or(too_big)? & !(PAGE_SIZE - 1);
    if start < kernel_end.max(HIGHMEM_START) {
        return Err(LoaderError::InitrdTooBig {
            size,
            kernel_end,
            limit,
        });
    }
    Ok(start)
}

/// Loads the initrd at `path` at the top of low memory; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(u64, u64), LoaderError> {
    let read_err = |e| LoaderError::Read {
        what: "initrd",
        path: path.to_path_buf(),
        source: e,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    file.rewind().map_err(read_err)?;
    let max_addr = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let limit = memory::low_mem_end(mem_size).min(max_addr + 1);
    let addr = initrd_address(size, kernel.end, limit)?;
    let len = usize::try_from(size).map_err(|_| LoaderError::InitrdTooBig {
        size,
        kernel_end: kernel.end,
        limit,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| LoaderError::Memory("initrd", e))?;
    Ok((addr, size))
}

/// Parses a command line the way the kernel will receive it (at most 4095 bytes + NUL).
pub fn parse_cmdline(raw: &str) -> Result<Cmdline, LoaderError> {
    Cmdline::try_from(raw, CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)
}

/// Writes the command line to [`CMDLINE_ADDR`]; returns its length with the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<u32, LoaderError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(LoaderError::CmdlineWrite)?;
    let len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes_with_nul().len())
        .unwrap_or(0);
    Ok(u32::try_from(len).unwrap_or(u32::MAX))
}

/// Builds the zero page for a kernel, command line, optional initrd and `mem_size` bytes of RAM.
pub fn build_boot_params(
    kernel: &LoadedKernel,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
    mem_size: u64,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = BOOT_FLAG_MAGIC;
        params.hdr.header = HDRS_MAGIC;
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).unwrap_or_default();
    params.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        // Both fit in 32 bits: the initrd lives below the 3 GiB MMIO gap.
        params.hdr.ramdisk_image = u32::try_from(addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
    }
    let map = memory::e820_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = u8::try_from(map.len()).unwrap_or(0);
    params
}

/// Writes the zero page to [`ZERO_PAGE_ADDR`].
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), LoaderError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| LoaderError::Memory("zero page", e))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn tells_elf_from_bzimage_from_garbage() {
        assert_eq!(format_of(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(format_of(&bz), Some(KernelFormat::BzImage));
        assert_eq!(format_of(b"#!/bin/sh\necho hi\n"), None);
        assert_eq!(format_of(&[]), None);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"not a kernel").unwrap();
        assert!(matches!(
            detect_format(f.path()),
            Err(LoaderError::NotAKernel(_))
        ));
        assert!(matches!(
            detect_format(Path::new("/nonexistent/vmlinux")),
            Err(LoaderError::Read { .. })
        ));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory_page_aligned() {
        let limit = 256 << 20;
        assert_eq!(
            initrd_address(4096, 0x200_0000, limit).unwrap(),
            limit - 4096
        );
        assert_eq!(
            initrd_address(100, 0x200_0000, limit).unwrap(),
            limit - 4096
        );
        assert_eq!(
            initrd_address(5000, 0x200_0000, limit).unwrap(),
            limit - 8192
        );
        assert!(initrd_address(limit, 0x200_0000, limit).is_err());
        assert!(initrd_address(limit - 0x100_0000, 0x200_0000, limit).is_err());
        assert!(initrd_address(u64::MAX, 0, limit).is_err());
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let kernel = LoadedKernel {
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: None,
        };
        let p = build_boot_params(&kernel, 20, Some((0x7000_0000, 0x1234)), 5 << 30);
        let hdr = p.hdr;
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 20);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x7000_0000, 0x1234)
        );
        assert_eq!(({ hdr.boot_flag }, { hdr.header }), (0xaa55, HDRS_MAGIC));
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(p.e820_entries, 4);
        let last = p.e820_table[3];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (4 << 30, 2 << 30, 1)
        );
    }

    #[test]
    fn cmdline_is_written_with_its_nul_and_length_limit() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cl = parse_cmdline("console=ttyS0 panic=1").unwrap();
        assert_eq!(write_cmdline(&mem, &cl).unwrap(), 22);
        let mut buf = [0u8; 22];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 panic=1\0");
        assert!(parse_cmdline(&"a".repeat(4095)).is_ok());
        assert!(parse_cmdline(&"a".repeat(4096)).is_err());
    }
}
