//! Helpers shared by the `mvm boot` integration tests: tiny hand-assembled guests wrapped in a
//! minimal ELF, and running the `mvm` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub mod container;
pub mod guests;
pub mod kernel;
pub mod netns;
pub mod tmux;
pub mod vm;

/// Path of the `mvm` binary under test.
pub const MVM: &str = env!("CARGO_BIN_EXE_mvm");

/// A minimal ELF64 executable: one PT_LOAD segment with `code` at physical `addr`, entry at
/// `addr`. mvm enters it in 64-bit mode with the first 1 GiB identity-mapped.
pub fn tiny_elf(code: &[u8], addr: u64) -> Vec<u8> {
    let len = code.len() as u64;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    f.extend_from_slice(&addr.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&7u32.to_le_bytes()); // RWX
    for v in [120u64, addr, addr, len, len, 0x1000] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(code);
    f
}

/// Writes a guest made of `code` (loaded at 1 MiB) into `dir`.
pub fn guest_file(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, tiny_elf(code, 0x10_0000)).expect("write guest");
    p
}

/// Whether KVM is usable here; prints why not.
pub fn have_kvm() -> bool {
    let ok = Path::new("/dev/kvm").exists();
    if !ok {
        eprintln!("skipping: no /dev/kvm on this host");
    }
    ok
}

/// `mov al, 0xfe; out 0x64, al; hlt`: reset through the i8042 (the guest's "reboot").
pub const RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4];

/// Code that prints `text` on COM1.
pub fn print(text: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &b in text {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code
}
