//! What the loader handed over, read from the Linux zero page (`struct boot_params`) or from the
//! PVH `hvm_start_info`, into one shape: command line, memory map, initrd.

use super::read_phys;

/// How the guest was entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPath {
    /// Linux 64-bit boot protocol (rsi = boot_params).
    Linux,
    /// PVH 32-bit entry (ebx = hvm_start_info).
    Pvh,
}

impl EntryPath {
    /// The name printed on the serial line.
    pub fn name(self) -> &'static str {
        match self {
            EntryPath::Linux => "linux",
            EntryPath::Pvh => "pvh",
        }
    }
}

/// One memory map entry (e820 types: 1 RAM, 2 reserved, 3 ACPI, 4 NVS, 5 unusable).
#[derive(Debug, Clone, Copy, Default)]
pub struct MemRegion {
    /// Start, guest-physical.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// e820 type.
    pub kind: u32,
}

/// The most memory map entries kept (the zero page holds at most 128).
pub const MAX_REGIONS: usize = 128;
/// The longest command line read.
pub const MAX_CMDLINE: usize = 4096;

/// Everything the guests use from the loader.
#[derive(Debug)]
pub struct BootInfo {
    /// Entry path taken.
    #[allow(dead_code)]
    pub entry: EntryPath,
    /// Guest-physical address of the command line (0: none).
    pub cmdline_paddr: u64,
    /// Length of the command line in bytes, without the terminating NUL.
    pub cmdline_len: usize,
    /// Memory map entries, `regions[..region_count]`.
    pub regions: [MemRegion; MAX_REGIONS],
    /// Number of valid entries in `regions`.
    pub region_count: usize,
    /// Initial ramdisk as (guest-physical address, size), if one was loaded.
    pub initrd: Option<(u64, u64)>,
}

// struct boot_params offsets (Documentation/arch/x86/zero-page.rst, boot.rst).
const BP_EXT_RAMDISK_IMAGE: u64 = 0x0c0;
const BP_EXT_RAMDISK_SIZE: u64 = 0x0c4;
const BP_EXT_CMD_LINE_PTR: u64 = 0x0c8;
const BP_E820_ENTRIES: u64 = 0x1e8;
const BP_RAMDISK_IMAGE: u64 = 0x218;
const BP_RAMDISK_SIZE: u64 = 0x21c;
const BP_CMD_LINE_PTR: u64 = 0x228;
const BP_E820_TABLE: u64 = 0x2d0;
const E820_ENTRY_SIZE: u64 = 20;

// struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h).
const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_VERSION: u64 = 4;
const PVH_NR_MODULES: u64 = 12;
const PVH_MODLIST_PADDR: u64 = 16;
const PVH_CMDLINE_PADDR: u64 = 24;
const PVH_MEMMAP_PADDR: u64 = 40;
const PVH_MEMMAP_ENTRIES: u64 = 48;
const PVH_MEMMAP_ENTRY_SIZE: u64 = 24;

impl BootInfo {
    /// Reads the loader's structure at `info_paddr`; halts with an error line if it is unusable.
    pub fn read(entry: EntryPath, info_paddr: u64) -> BootInfo {
        let mut info = BootInfo {
            entry,
            cmdline_paddr: 0,
            cmdline_len: 0,
            regions: [MemRegion::default(); MAX_REGIONS],
            region_count: 0,
            initrd: None,
        };
        if info_paddr == 0 {
            super::fail("no boot information pointer");
        }
        match entry {
            EntryPath::Linux => info.read_zero_page(info_paddr),
            EntryPath::Pvh => info.read_start_info(info_paddr),
        }
        info.cmdline_len = c_string_len(info.cmdline_paddr);
        info
    }

    fn read_zero_page(&mut self, bp: u64) {
        // SAFETY: the Linux boot protocol puts a 4 KiB boot_params at rsi; all offsets are inside.
        unsafe {
            let lo: u32 = read_phys(bp + BP_CMD_LINE_PTR);
            let hi: u32 = read_phys(bp + BP_EXT_CMD_LINE_PTR);
            self.cmdline_paddr = (u64::from(hi) << 32) | u64::from(lo);
            let count: u8 = read_phys(bp + BP_E820_ENTRIES);
            let count = usize::from(count).min(MAX_REGIONS);
            for i in 0..count {
                let e = bp + BP_E820_TABLE + i as u64 * E820_ENTRY_SIZE;
                self.regions[i] = MemRegion {
                    addr: read_phys(e),
                    size: read_phys(e + 8),
                    kind: read_phys(e + 16),
                };
            }
            self.region_count = count;
            let image = u64::from(read_phys::<u32>(bp + BP_RAMDISK_IMAGE))
                | (u64::from(read_phys::<u32>(bp + BP_EXT_RAMDISK_IMAGE)) << 32);
            let size = u64::from(read_phys::<u32>(bp + BP_RAMDISK_SIZE))
                | (u64::from(read_phys::<u32>(bp + BP_EXT_RAMDISK_SIZE)) << 32);
            if image != 0 && size != 0 {
                self.initrd = Some((image, size));
            }
        }
    }

    fn read_start_info(&mut self, si: u64) {
        // SAFETY: the PVH loader puts hvm_start_info at ebx; the fields read exist in version 1.
        unsafe {
            let magic: u32 = read_phys(si);
            if magic != PVH_MAGIC {
                super::fail("bad hvm_start_info magic");
            }
            let version: u32 = read_phys(si + PVH_VERSION);
            self.cmdline_paddr = read_phys(si + PVH_CMDLINE_PADDR);
            if version >= 1 {
                let map: u64 = read_phys(si + PVH_MEMMAP_PADDR);
                let count: u32 = read_phys(si + PVH_MEMMAP_ENTRIES);
                let count = (count as usize).min(MAX_REGIONS);
                if map != 0 {
                    for i in 0..count {
                        let e = map + i as u64 * PVH_MEMMAP_ENTRY_SIZE;
                        self.regions[i] = MemRegion {
                            addr: read_phys(e),
                            size: read_phys(e + 8),
                            kind: read_phys(e + 16),
                        };
                    }
                    self.region_count = count;
                }
            }
            let modules: u32 = read_phys(si + PVH_NR_MODULES);
            let modlist: u64 = read_phys(si + PVH_MODLIST_PADDR);
            if modules > 0 && modlist != 0 {
                let addr: u64 = read_phys(modlist);
                let size: u64 = read_phys(modlist + 8);
                if addr != 0 && size != 0 {
                    self.initrd = Some((addr, size));
                }
            }
        }
    }

    /// The memory map entries.
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions[..self.region_count]
    }

    /// The command line bytes (without the NUL).
    pub fn cmdline(&self) -> &'static [u8] {
        if self.cmdline_paddr == 0 {
            return &[];
        }
        // SAFETY: the loader placed cmdline_len readable bytes at cmdline_paddr (counted by
        // c_string_len); the memory stays untouched for the guest's lifetime.
        unsafe { core::slice::from_raw_parts(self.cmdline_paddr as *const u8, self.cmdline_len) }
    }

    /// Whether the command line carries `mvm_test=WORD` (words may repeat or be comma separated).
    pub fn has_test_word(&self, word: &str) -> bool {
        for arg in self.cmdline().split(|&b| b == b' ') {
            if let Some(list) = arg.strip_prefix(b"mvm_test=") {
                if list.split(|&b| b == b',').any(|w| w == word.as_bytes()) {
                    return true;
                }
            }
        }
        false
    }

    /// The value of the first `key=value` argument on the command line.
    pub fn arg(&self, key: &str) -> Option<&'static [u8]> {
        self.cmdline().split(|&b| b == b' ').find_map(|arg| {
            arg.strip_prefix(key.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
        })
    }

    /// Every value of `key=value` arguments on the command line, in order.
    pub fn args(&self, key: &'static str) -> impl Iterator<Item = &'static [u8]> {
        self.cmdline().split(|&b| b == b' ').filter_map(move |arg| {
            arg.strip_prefix(key.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
        })
    }

    /// Total bytes of usable RAM (type 1) in the memory map.
    pub fn ram_bytes(&self) -> u64 {
        self.regions()
            .iter()
            .filter(|r| r.kind == 1)
            .map(|r| r.size)
            .sum()
    }
}

/// Length of the NUL-terminated string at `paddr`, at most [`MAX_CMDLINE`].
fn c_string_len(paddr: u64) -> usize {
    if paddr == 0 {
        return 0;
    }
    let mut n = 0;
    while n < MAX_CMDLINE {
        // SAFETY: the loader's command line is readable up to its NUL; we stop there.
        let b: u8 = unsafe { read_phys(paddr + n as u64) };
        if b == 0 {
            break;
        }
        n += 1;
    }
    n
}

/// Parses a number written in decimal or as `0x` hexadecimal.
pub fn parse_number(text: &[u8]) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for &b in digits {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        if u32::from(d) >= radix {
            return None;
        }
        value = value.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(value)
}
