//! `mvm boot` from start to end with tiny hand-assembled guests: console output, console input,
//! the ways a VM ends and the exit code each one gives.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest_file, have_kvm, print, MVM, RESET};

fn boot(kernel: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(MVM)
        .args(["boot", "--mem", "16M", "--kernel"])
        .arg(kernel)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run mvm")
}

#[test]
fn boot_guest_that_reboots_prints_its_console_and_exits_0() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let code = [print(b"hello from the guest\n"), RESET.to_vec()].concat();
    let k = guest_file(dir.path(), "hello.elf", &code);
    let out = boot(&k, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the guest\n"
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn boot_with_serial_out_writes_the_console_to_the_file() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let code = [print(b"to the log\n"), RESET.to_vec()].concat();
    let k = guest_file(dir.path(), "log.elf", &code);
    let log = dir.path().join("console.log");
    let out = boot(&k, &["--serial-out", log.to_str().unwrap(), "--cpus", "2"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "to the log\n");
}

#[test]
fn boot_guest_that_triple_faults_exits_1_with_one_line() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Load an empty IDT, then raise #UD: no handler, so the CPU shuts down.
    let code = [0x6a, 0x00, 0x6a, 0x00, 0x0f, 0x01, 0x1c, 0x24, 0x0f, 0x0b];
    let k = guest_file(dir.path(), "fault.elf", &code);
    let out = boot(&k, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("triple fault") || stderr.contains("KVM emulation failure"),
        "{stderr}"
    );
}

#[test]
fn boot_reports_a_guest_kernel_panic_seen_on_the_console() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = b"[    1.0] Kernel panic - not syncing: no init found\r\n[    1.1] Rebooting\r\n";
    let code = [print(text), RESET.to_vec()].concat();
    let k = guest_file(dir.path(), "panic.elf", &code);
    let out = boot(&k, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr, "mvm: guest kernel panicked: no init found\n");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Rebooting"));
}

/// Prints "ready\n", then spins forever.
fn spinner() -> Vec<u8> {
    [print(b"ready\n"), vec![0xeb, 0xfe]].concat()
}

fn signal_ends_vm(signal: &str, code: i32) {
    let dir = tempfile::tempdir().expect("temp dir");
    let k = guest_file(dir.path(), "spin.elf", &spinner());
    let mut child = Command::new(MVM)
        .args(["boot", "--mem", "16M", "--cpus", "2", "--kernel"])
        .arg(&k)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mvm");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read console");
    assert_eq!(line, "ready\n");
    let sent = Instant::now();
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let status = child.wait().expect("wait for mvm");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "took {:?}",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(code));
}

#[test]
fn boot_is_stopped_by_sigterm_with_exit_143() {
    if have_kvm() {
        signal_ends_vm("-TERM", 143);
    }
}

#[test]
fn boot_is_stopped_by_sigint_with_exit_130() {
    if have_kvm() {
        signal_ends_vm("-INT", 130);
    }
}

#[test]
fn boot_passes_stdin_to_the_guest_console() {
    if !have_kvm() {
        return;
    }
    // Echo every byte from COM1 back until a newline, then reboot.
    let code = [
        vec![
            0x66, 0xba, 0xfd, 0x03, // 0: mov dx, 0x3fd (line status)
            0xec, // 4: in al, dx
            0xa8, 0x01, // test al, 1 (data ready)
            0x74, 0xfb, // jz 4
            0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xec, // in al, dx
            0xee, // out dx, al
            0x3c, 0x0a, // cmp al, '\n'
            0x75, 0xed, // jne 0
        ],
        RESET.to_vec(),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let k = guest_file(dir.path(), "echo.elf", &code);
    let mut child = Command::new(MVM)
        .args(["boot", "--mem", "16M", "--kernel"])
        .arg(&k)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"ping\n").unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(out, "ping\n");
}

#[test]
fn boot_loads_the_initrd_and_points_the_zero_page_at_it() {
    if !have_kvm() {
        return;
    }
    // Print the initrd through the zero page's ramdisk_image/ramdisk_size, then reboot.
    let code = [
        vec![0x8b, 0x34, 0x25, 0x18, 0x72, 0x00, 0x00], // mov esi, [0x7218]
        vec![0x8b, 0x0c, 0x25, 0x1c, 0x72, 0x00, 0x00], // mov ecx, [0x721c]
        vec![0x66, 0xba, 0xf8, 0x03],                   // mov dx, 0x3f8
        vec![0xac, 0xee, 0xe2, 0xfc],                   // 1: lodsb; out dx, al; loop 1
        RESET.to_vec(),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let k = guest_file(dir.path(), "initrd.elf", &code);
    let initrd = dir.path().join("initrd.img");
    std::fs::write(&initrd, "initrd contents arrived\n").unwrap();
    let out = boot(&k, &["--initrd", initrd.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "initrd contents arrived\n"
    );
}

/// A minimal bzImage: one setup sector with the boot protocol header, then the "kernel" whose
/// 64-bit entry point (offset 0x200) is `code`.
fn tiny_bzimage(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 2 * 512];
    f[0x1f1] = 1; // setup_sects
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    f[0x211] = 1; // loadflags: LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    f[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    let mut kernel = vec![0u8; 0x200];
    kernel.extend_from_slice(code);
    f.extend_from_slice(&kernel);
    f
}

#[test]
fn boot_runs_a_bzimage_from_its_64_bit_entry_point() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("bzImage");
    let code = [print(b"bzImage entry\n"), RESET.to_vec()].concat();
    std::fs::write(&k, tiny_bzimage(&code)).unwrap();
    let out = boot(&k, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bzImage entry\n");
}

#[test]
fn info_describes_this_hosts_kvm() {
    if !have_kvm() {
        return;
    }
    let out = Command::new(MVM).arg("info").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for key in [
        "kvm api version: 12",
        "max vcpus: ",
        "recommended vcpus: ",
        "virtualization: ",
    ] {
        assert!(text.contains(key), "{key:?} missing in {text}");
    }
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    assert_eq!(text.contains("virtualization: PVM"), pvm, "{text}");
}

#[test]
fn info_into_a_closed_pipe_ends_quietly_like_other_tools() {
    if !have_kvm() {
        return;
    }
    // `mvm info | grep -q PVM`: the reader is gone before mvm writes.
    let mut fds = [0; 2];
    // SAFETY: pipe writes two new descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: closes the read end we own; the write end goes to mvm.
    unsafe { libc::close(fds[0]) };
    // SAFETY: fds[1] is a descriptor we own and hand over exactly once.
    let write_end = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) };
    let out = Command::new(MVM)
        .arg("info")
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}
