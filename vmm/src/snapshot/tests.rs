//! Round trips of whole VMs through snapshots, with a tiny guest that keeps counting in memory
//! and prints to the serial console, on every vCPU.

use std::path::Path;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::builder::tests::{tiny_elf, Capture};
use crate::builder::{BuildError, VmBuilder};
use crate::config::VmConfig;
use crate::exit::VmExit;

/// Where vCPU n keeps its counter.
const COUNTER: u64 = 0x20_0000;
const MIB: u64 = 1 << 20;

/// `lock inc qword [COUNTER + 8 * apic id]` forever; every 2^12 steps vCPU 0 writes 'c' to
/// COM1. The APs never start (no SIPI), so only vCPU 0 counts; they are saved and restored
/// waiting.
fn counting_guest() -> Vec<u8> {
    let mut code = vec![0x48, 0xbb]; // mov rbx, COUNTER
    code.extend_from_slice(&COUNTER.to_le_bytes());
    code.extend_from_slice(&[
        0xf0, 0x48, 0xff, 0x03, // 1: lock inc qword [rbx]
        0x48, 0x8b, 0x03, // mov rax, [rbx]
        0xa9, 0xff, 0x0f, 0x00, 0x00, // test eax, 0xfff
        0x75, 0xf2, // jnz 1b
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'c', // mov al, 'c'
        0xee, // out dx, al
        0xeb, 0xe9, // jmp 1b
    ]);
    code
}

fn have_kvm() -> bool {
    let ok = Path::new("/dev/kvm").exists();
    if !ok {
        eprintln!("skipping: no /dev/kvm on this host");
    }
    ok
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots the counting guest, lets it count, snapshots it into `dir`; returns the counter as
/// saved (read back from the memory file).
fn boot_and_snapshot(dir: &Path, vcpus: u8) -> u64 {
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, tiny_elf(&counting_guest(), 0x10_0000)).unwrap();
    let mut cfg = VmConfig::new(&kernel);
    cfg.mem_bytes = 16 * MIB;
    cfg.vcpus = vcpus;
    let out = Capture::default();
    let vm = VmBuilder::with_console(cfg, Box::new(out.clone()))
        .unwrap()
        .start()
        .unwrap();
    let controller = vm.controller();
    let handle = vm.handle();
    let waiter = std::thread::spawn(move || vm.wait());
    wait_for("the guest to print", Duration::from_secs(60), || {
        out.0.lock().unwrap().len() >= 2
    });
    let snap = dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let files = super::SnapshotFiles::create(&snap).unwrap();
    let report = controller.snapshot(files).unwrap();
    assert!(report.data_pages > 0);
    // The VM goes on after a snapshot.
    let printed = out.0.lock().unwrap().len();
    wait_for("the guest to go on", Duration::from_secs(60), || {
        out.0.lock().unwrap().len() > printed
    });
    handle.stop();
    assert_eq!(waiter.join().unwrap(), VmExit::Stopped);
    let mem = memory::map(&memory_path(&snap), 16 * MIB).unwrap();
    mem.read_obj(GuestAddress(COUNTER)).unwrap()
}

/// A VM restored from `snap`, its event loop running on a thread of its own.
struct Restored {
    controller: crate::snapshot::take::VmController,
    handle: crate::exit::VmHandle,
    mem: vm_memory::GuestMemoryMmap,
    out: Capture,
    waiter: std::thread::JoinHandle<VmExit>,
}

impl Restored {
    fn counter(&self) -> u64 {
        self.mem.read_obj(GuestAddress(COUNTER)).unwrap()
    }

    fn stop(self) -> VmExit {
        self.handle.stop();
        self.waiter.join().unwrap()
    }
}

fn restore(snap: &Path) -> Restored {
    let out = Capture::default();
    let vm = VmBuilder::restore(snap, Box::new(out.clone()))
        .unwrap()
        .start()
        .unwrap();
    Restored {
        controller: vm.controller(),
        handle: vm.handle(),
        mem: vm.guest_memory().clone(),
        out,
        waiter: std::thread::spawn(move || vm.wait()),
    }
}

#[test]
fn a_restored_vm_goes_on_counting_from_where_it_was_saved() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let saved = boot_and_snapshot(dir.path(), 2);
    assert!(
        saved >= 0x1000,
        "the guest counted before the snapshot: {saved}"
    );
    let snap = dir.path().join("snap");
    // Two VMs from one snapshot, at once: each starts from the saved count and goes on.
    let a = restore(&snap);
    let b = restore(&snap);
    for vm in [&a, &b] {
        let start = vm.counter();
        assert!(start >= saved, "restored at {start}, saved at {saved}");
        wait_for(
            "the restored guest to print",
            Duration::from_secs(60),
            || vm.out.0.lock().unwrap().len() >= 2,
        );
        assert!(vm.counter() > saved);
    }
    // Pause stops it; resume lets it go on.
    a.controller.pause().unwrap();
    let paused_at = a.counter();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(a.counter(), paused_at, "a paused VM does not run");
    a.controller.resume().unwrap();
    wait_for(
        "the resumed guest to count",
        Duration::from_secs(60),
        || a.counter() > paused_at,
    );
    // Private mappings: neither VM's writes reach the file or the other VM.
    let file = memory::map(&memory_path(&snap), 16 * MIB).unwrap();
    assert_eq!(file.read_obj::<u64>(GuestAddress(COUNTER)).unwrap(), saved);
    assert_eq!(a.stop(), VmExit::Stopped);
    assert_eq!(b.stop(), VmExit::Stopped);
}

fn restore_error(snap: &Path) -> SnapshotError {
    match VmBuilder::restore(snap, Box::new(std::io::sink())) {
        Err(BuildError::Snapshot(e)) => e,
        Err(other) => panic!("not a snapshot error: {other}"),
        Ok(_) => panic!("restored a damaged snapshot"),
    }
}

#[test]
fn damaged_or_foreign_snapshots_are_refused_with_one_line() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    boot_and_snapshot(dir.path(), 1);
    let snap = dir.path().join("snap");
    let state = std::fs::read(state_path(&snap)).unwrap();
    let memory = std::fs::read(memory_path(&snap)).unwrap();
    let put = |state: &[u8], memory: &[u8]| {
        std::fs::write(state_path(&snap), state).unwrap();
        std::fs::write(memory_path(&snap), memory).unwrap();
    };
    let check = |e: SnapshotError, want: &str| {
        let msg = e.to_string();
        assert!(msg.contains(want), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(e.is_bad_input(), "{msg}");
    };

    let mut bad = state.clone();
    bad[100] ^= 1;
    put(&bad, &memory);
    check(restore_error(&snap), "corrupted or truncated");
    put(&state[..state.len() - 10], &memory);
    check(restore_error(&snap), "corrupted or truncated");
    put(b"#!/bin/sh\necho not a snapshot\n", &memory);
    check(restore_error(&snap), "is not an mvm snapshot");
    // Another format version (with a valid checksum).
    let mut other = state[..state.len() - 4].to_vec();
    other[8] = 99;
    let crc = crc32fast::hash(&other);
    other.extend_from_slice(&crc.to_le_bytes());
    put(&other, &memory);
    check(restore_error(&snap), "snapshot format 99");
    // Another mvm version, another CPU.
    let mut parsed = SnapshotState::decode(&state, "s").unwrap();
    parsed.mvm_version = "0.0.1+format1".into();
    put(&parsed.encode().unwrap(), &memory);
    check(restore_error(&snap), "taken by mvm 0.0.1");
    let mut parsed = SnapshotState::decode(&state, "s").unwrap();
    parsed.cpu.vendor = "OtherVendor".into();
    put(&parsed.encode().unwrap(), &memory);
    check(restore_error(&snap), "another CPU");
    // The memory file: truncated, then one byte changed.
    put(&state, &memory[..memory.len() - 4096]);
    check(restore_error(&snap), "truncated or replaced");
    let mut mem = memory.clone();
    let at = mem.iter().position(|b| *b != 0).unwrap();
    mem[at] ^= 0x40;
    put(&state, &mem);
    check(restore_error(&snap), "guest memory file is corrupted");
    // Put back, it restores.
    put(&state, &memory);
    assert_eq!(restore(&snap).stop(), VmExit::Stopped);
}
