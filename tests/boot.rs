//! `mvm boot` with the freestanding boot guest (`tests/guests/boot.rs`): the guest reports on its
//! serial console what it was handed and what it could do (64-bit mode, command line, e820 map,
//! initrd, MP table, APs started), and these tests check that against the flags given to mvm.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::guests::{fnv1a, run_mvm, test_guest, wait_with_deadline, Finished, GuestReport};
use common::{have_kvm, MVM};

/// Generous for a guest that needs well under a second, even on a busy emulated host.
const DEADLINE: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;

fn boot_guest(mem: &str, cpus: u32, cmdline: &str, extra: &[&str]) -> Finished {
    let guest = test_guest("boot");
    let cpus = cpus.to_string();
    let mut args = vec![
        "boot",
        "--kernel",
        guest.to_str().expect("utf-8 path"),
        "--mem",
        mem,
        "--cpus",
        &cpus,
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    run_mvm(&args, DEADLINE)
}

/// Asserts a clean run: exit 0, nothing on stderr, a complete report ending in a reset.
fn assert_clean_run(run: &Finished) -> GuestReport {
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert!(run.stderr.is_empty(), "{}", run.dump());
    let report = run.report();
    assert!(report.errors.is_empty(), "{}", run.dump());
    assert!(report.done && report.reset, "{}", run.dump());
    assert_eq!(report.entry.as_deref(), Some("linux"), "{}", run.dump());
    assert_eq!(report.mode.as_deref(), Some("64-bit"), "{}", run.dump());
    report
}

/// Start of the MMIO gap below 4 GiB: RAM beyond it continues at 4 GiB.
const GAP_START: u64 = 3 << 30;
const FOUR_GIB: u64 = 4 << 30;

/// Asserts the e820 map is sorted, free of overlaps, and that its RAM is `mem_bytes` less at most
/// the legacy hole under 1 MiB: up to 3 GiB from 1 MiB on, the rest from 4 GiB on.
fn assert_memory_map_fits(report: &GuestReport, mem_bytes: u64, dump: &str) {
    assert!(!report.e820.is_empty(), "no e820 entries\n{dump}");
    for pair in report.e820.windows(2) {
        assert!(
            pair[0].addr + pair[0].size <= pair[1].addr,
            "e820 entries unsorted or overlapping: {:?}\n{dump}",
            pair
        );
    }
    let ram: u64 = report.ram_regions().map(|e| e.size).sum();
    assert_eq!(report.ram_bytes, Some(ram), "{dump}");
    let top = report
        .ram_regions()
        .map(|e| e.addr + e.size)
        .max()
        .unwrap_or(0);
    let want_top = if mem_bytes <= GAP_START {
        mem_bytes
    } else {
        FOUR_GIB + mem_bytes - GAP_START
    };
    assert_eq!(top, want_top, "highest RAM byte does not fit --mem\n{dump}");
    assert!(
        report
            .ram_regions()
            .all(|e| e.addr + e.size <= GAP_START || e.addr >= FOUR_GIB),
        "RAM in the MMIO gap\n{dump}"
    );
    assert!(
        ram <= mem_bytes && ram >= mem_bytes - MIB,
        "RAM {ram} does not match --mem {mem_bytes}\n{dump}"
    );
    assert!(
        report
            .ram_regions()
            .any(|e| e.addr <= 0x10_0000 && e.addr + e.size > 0x10_0000),
        "no RAM at 1 MiB\n{dump}"
    );
}

fn assert_cpus_started(report: &GuestReport, cpus: u64, dump: &str) {
    assert_eq!(
        report.mp_cpus,
        Some(Some(cpus)),
        "MP table CPU count\n{dump}"
    );
    assert_eq!(report.cpus_started, Some((cpus, cpus)), "{dump}");
}

#[test]
fn boot_guest_on_one_cpu_sees_64_bit_mode_its_cmdline_and_memory() {
    if !have_kvm() {
        return;
    }
    let cmdline = "console=ttyS0 reboot=k mvm.label=\"two words\" x=1,2";
    let run = boot_guest("256M", 1, cmdline, &[]);
    let report = assert_clean_run(&run);
    let dump = run.dump();
    assert_eq!(report.cmdline.as_deref(), Some(cmdline), "{dump}");
    assert_memory_map_fits(&report, 256 * MIB, &dump);
    assert_eq!(report.initrd, Some(None), "{dump}");
    assert_cpus_started(&report, 1, &dump);
}

#[test]
fn boot_guest_with_two_cpus_starts_both() {
    if !have_kvm() {
        return;
    }
    let run = boot_guest("128M", 2, "console=ttyS0", &[]);
    let report = assert_clean_run(&run);
    assert_cpus_started(&report, 2, &run.dump());
}

#[test]
fn boot_guest_with_four_cpus_starts_all_four() {
    if !have_kvm() {
        return;
    }
    let run = boot_guest("128M", 4, "console=ttyS0", &[]);
    let report = assert_clean_run(&run);
    assert_cpus_started(&report, 4, &run.dump());
}

#[test]
fn boot_guest_memory_map_follows_the_mem_flag() {
    if !have_kvm() {
        return;
    }
    for (flag, bytes) in [("32M", 32 * MIB), ("1G", 1024 * MIB), ("4G", 4096 * MIB)] {
        let run = boot_guest(flag, 1, "mvm_test=no_smp", &[]);
        let report = assert_clean_run(&run);
        assert_memory_map_fits(&report, bytes, &run.dump());
    }
}

#[test]
fn boot_guest_runs_no_further_once_it_resets() {
    if !have_kvm() {
        return;
    }
    // Right after its i8042 write the guest prints another line and triple-faults (what it does
    // on machines without an i8042); mvm must stop the vCPU at the write itself.
    for _ in 0..3 {
        let run = boot_guest("32M", 1, "mvm_test=no_smp", &[]);
        assert_clean_run(&run);
        assert!(
            run.stdout.ends_with("mvm-test-guest: reset\n"),
            "the guest ran on after its reset request:\n{}",
            run.dump()
        );
    }
}

#[test]
fn boot_with_initrd_hands_the_guest_its_exact_bytes() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let initrd = dir.path().join("initrd.img");
    // Not a multiple of 4 KiB, with bytes that differ across the file.
    let bytes: Vec<u8> = (0..5000u32)
        .map(|i| (i * 7 + i / 251).to_le_bytes()[0])
        .collect();
    std::fs::write(&initrd, &bytes).expect("write initrd");
    let run = boot_guest(
        "64M",
        1,
        "mvm_test=no_smp",
        &["--initrd", initrd.to_str().expect("utf-8 path")],
    );
    let report = assert_clean_run(&run);
    let dump = run.dump();
    let Some(Some((addr, size, hash))) = report.initrd else {
        panic!("guest saw no initrd\n{dump}");
    };
    assert_eq!(size, bytes.len() as u64, "{dump}");
    assert_eq!(hash, fnv1a(&bytes), "initrd bytes differ\n{dump}");
    assert!(addr % 4096 == 0 && addr >= 0x10_0000, "{dump}");
    assert!(addr + size <= 64 * MIB, "initrd outside RAM\n{dump}");
}

#[test]
fn boot_guest_that_triple_faults_on_two_cpus_exits_1_with_one_error_line() {
    if !have_kvm() {
        return;
    }
    let run = boot_guest("64M", 2, "mvm_test=triple_fault", &[]);
    let dump = run.dump();
    assert_eq!(run.code, Some(1), "{dump}");
    assert_eq!(run.stderr.lines().count(), 1, "{dump}");
    assert!(run.stderr.starts_with("mvm: "), "{dump}");
    assert!(run.stderr.contains("triple fault"), "{dump}");
    let report = run.report();
    assert!(report.done && !report.reset, "{dump}");
    assert_cpus_started(&report, 2, &dump);
}

#[test]
fn boot_is_stopped_by_sigterm_while_every_cpu_halts() {
    if !have_kvm() {
        return;
    }
    let guest = test_guest("boot");
    let mut child = Command::new(MVM)
        .args([
            "boot",
            "--mem",
            "32M",
            "--cpus",
            "2",
            "--cmdline",
            "mvm_test=hang",
        ])
        .arg("--kernel")
        .arg(&guest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mvm");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut seen = String::new();
    let started = Instant::now();
    while !seen.ends_with("mvm-test-guest: hanging\n") {
        let mut line = String::new();
        let n = stdout.read_line(&mut line).expect("read console");
        assert!(n > 0, "console closed early:\n{seen}");
        assert!(started.elapsed() < DEADLINE, "no 'hanging' line:\n{seen}");
        seen.push_str(&line);
    }
    assert!(
        GuestReport::parse(&seen).cpus_started == Some((2, 2)),
        "{seen}"
    );
    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    child.stdout = Some(stdout.into_inner());
    let run = wait_with_deadline(child, Duration::from_secs(5), "mvm after SIGTERM");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "took {:?}",
        sent.elapsed()
    );
    assert_eq!(run.code, Some(143), "{}", run.dump());
}

#[test]
fn boot_guest_also_boots_under_qemu_microvm_through_pvh() {
    // Checks the guest's own PVH path, which scripts/bench-boot.sh relies on for QEMU.
    let qemu = "qemu-system-x86_64";
    if Command::new(qemu).arg("--version").output().is_err() {
        eprintln!("skipping: {qemu} is not installed");
        return;
    }
    let guest = test_guest("boot");
    let child = Command::new(qemu)
        .args(["-M", "microvm", "-accel", "tcg", "-m", "128M", "-smp", "2"])
        .args([
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .args(["-append", "console=ttyS0 from qemu"])
        .arg("-kernel")
        .arg(&guest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    let run = wait_with_deadline(child, DEADLINE, qemu);
    let dump = run.dump();
    assert_eq!(run.code, Some(0), "{dump}");
    let report = run.report();
    assert_eq!(report.entry.as_deref(), Some("pvh"), "{dump}");
    assert_eq!(
        report.cmdline.as_deref(),
        Some("console=ttyS0 from qemu"),
        "{dump}"
    );
    assert_eq!(report.cpus_started, Some((2, 2)), "{dump}");
    assert!(report.done && report.reset, "{dump}");
}

#[test]
fn guest_report_parser_reads_every_line_kind() {
    let serial = "noise\nmvm-test-guest: hello entry=linux mode=64-bit\r\n\
        mvm-test-guest: cmdline=\"a \"b\" c\"\n\
        mvm-test-guest: e820 addr=0x0000000000000000 size=0x000000000009fc00 type=1\n\
        mvm-test-guest: ram bytes=654336 mib=0\n\
        mvm-test-guest: initrd addr=0x3fff000 size=3 fnv1a=0x0000abcd\n\
        mvm-test-guest: mp-table addr=0x9fc00 cpus=2 lapic=0xfee00000 bsp-apic-id=0\n\
        mvm-test-guest: cpus started=2 expected=2\nmvm-test-guest: done\n\
        mvm-test-guest: error something\n";
    let r = GuestReport::parse(serial);
    assert_eq!(r.entry.as_deref(), Some("linux"));
    assert_eq!(r.mode.as_deref(), Some("64-bit"));
    assert_eq!(r.cmdline.as_deref(), Some("a \"b\" c"));
    assert_eq!(r.e820.len(), 1);
    assert_eq!(
        (r.e820[0].addr, r.e820[0].size, r.e820[0].kind),
        (0, 0x9fc00, 1)
    );
    assert_eq!(r.ram_bytes, Some(654336));
    assert_eq!(r.initrd, Some(Some((0x3fff000, 3, 0xabcd))));
    assert_eq!(r.mp_cpus, Some(Some(2)));
    assert_eq!(r.cpus_started, Some((2, 2)));
    assert!(r.done && !r.reset);
    assert_eq!(r.errors, vec!["error something".to_string()]);
    assert_eq!(fnv1a(b""), 0x811c_9dc5);
    assert_eq!(fnv1a(b"a"), 0xe40c_292c);
}
