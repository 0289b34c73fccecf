use std::io::Read;
use std::os::fd::FromRawFd;

use super::filters::{self, FIONBIO, KVM_GET_REGS, KVM_GET_SREGS, KVM_RUN, TUNSETOFFLOAD};
use super::*;

#[test]
fn every_kind_compiles_and_says_its_size() {
    let filters = Filters::compile().unwrap();
    for kind in ThreadKind::ALL {
        let f = filters.get(kind);
        assert_eq!(f.kind(), kind);
        assert!(f.syscalls() > 10, "{kind:?}: {} calls", f.syscalls());
        assert!(f.instructions() > f.syscalls(), "{kind:?}");
        assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
    }
    // A vCPU gets no sockets and starts nothing; only the kinds that start threads may clone.
    // What goes through: the rules, less the calls answered ENOSYS.
    let calls = |kind| -> Vec<i64> {
        let refused = filters::enosys(kind);
        filters::rules(kind)
            .iter()
            .map(|r| r.nr)
            .filter(|nr| !refused.contains(nr))
            .collect()
    };
    for nr in [
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_clone,
        libc::SYS_openat,
    ] {
        assert!(!calls(ThreadKind::Vcpu).contains(&nr), "vcpu may call {nr}");
    }
    for kind in [ThreadKind::Vcpu, ThreadKind::Device, ThreadKind::Control] {
        assert!(
            !calls(kind).contains(&libc::SYS_clone),
            "{kind:?} may clone"
        );
    }
    // Nothing may exec, open files by path, mount, or reach another process.
    for kind in ThreadKind::ALL {
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_ptrace,
            libc::SYS_process_vm_writev,
            libc::SYS_fork,
            libc::SYS_vfork,
        ] {
            assert!(!calls(kind).contains(&nr), "{kind:?} may call {nr}");
        }
    }
}

#[test]
fn ioctl_numbers_are_the_kernels() {
    assert_eq!(KVM_RUN, 0xae80);
    assert_eq!(KVM_GET_REGS, 0x8090_ae81);
    assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
    // The snapshot ioctls, as <linux/kvm.h> defines them on x86_64.
    assert_eq!(filters::KVM_GET_MP_STATE, 0x8004_ae98);
    assert_eq!(filters::KVM_GET_XSAVE, 0x9000_aea4);
    assert_eq!(filters::KVM_GET_XCRS, 0x8188_aea6);
    assert_eq!(filters::KVM_GET_DEBUGREGS, 0x8080_aea1);
    assert_eq!(filters::KVM_GET_LAPIC, 0x8400_ae8e);
    assert_eq!(filters::KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
    assert_eq!(filters::KVM_GET_MSRS, 0xc008_ae88);
    assert_eq!(filters::KVM_GET_CPUID2, 0xc008_ae91);
    assert_eq!(filters::KVM_GET_TSC_KHZ, 0xaea3);
    assert_eq!(filters::KVM_GET_IRQCHIP, 0xc208_ae62);
    assert_eq!(filters::KVM_GET_PIT2, 0x8070_ae9f);
    assert_eq!(filters::KVM_GET_CLOCK, 0x8030_ae7c);
    assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
    assert_eq!(FIONBIO, libc::FIONBIO);
    assert_eq!(filters::KICK_SIGNAL, crate::vcpu::kick_signal());
    assert_eq!(syscall_name(libc::SYS_mkdir), Some("mkdir"));
    assert_eq!(syscall_number("clone3"), Some(libc::SYS_clone3));
}

/// Runs `f` in a child process (forked from this test) with stderr on a pipe; returns its wait
/// status and what it wrote to stderr.
fn in_child(f: impl FnOnce() -> i32) -> (i32, String) {
    let mut fds = [0; 2];
    // SAFETY: pipe fills two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only makes system calls (no allocation: the filters were compiled
    // before the fork) and ends with _exit or a signal.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: dup2 and close only operate on descriptors.
        unsafe {
            libc::dup2(fds[1], 2);
            libc::close(fds[0]);
        }
        let code = f();
        // SAFETY: ends the child without running the test harness's exit handlers.
        unsafe { libc::_exit(code) };
    }
    // SAFETY: the parent's copy of the write end is closed; the read end is owned by a File.
    let mut out = unsafe {
        libc::close(fds[1]);
        std::fs::File::from_raw_fd(fds[0])
    };
    let mut text = String::new();
    out.read_to_string(&mut text).unwrap();
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    (status, text)
}

#[test]
fn a_forbidden_call_kills_the_process_with_one_line_and_an_allowed_one_passes() {
    // Filtering is per process: only the forked children turn it on.
    let filters = Filters::compile().unwrap();
    let f = filters.clone();
    let (status, err) = in_child(move || {
        if enable(f).is_err() || confine(ThreadKind::Vcpu).is_err() {
            return 3;
        }
        // SAFETY: getpid and mkdir take no pointers the kernel would write; mkdir is refused
        // before it runs.
        unsafe {
            libc::getpid();
            libc::syscall(libc::SYS_mkdir, c"/nonexistent-mvm-seccomp".as_ptr(), 0o700);
        }
        0
    });
    assert!(
        libc::WIFSIGNALED(status),
        "status {status:#x}, stderr {err:?}"
    );
    assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(
        err.starts_with("mvm: the VMM's vcpu thread") && err.contains("mkdir (83)"),
        "{err:?}"
    );

    let f = filters.clone();
    let (status, err) = in_child(move || {
        if enable(f).is_err() || confine(ThreadKind::Runner).is_err() {
            return 3;
        }
        // clone3 is answered ENOSYS, so glibc falls back to clone with a thread's flags.
        // SAFETY: a null clone_args with size 0 is rejected before it is read.
        let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
        if r != -1 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
            return 4;
        }
        // Opening a file by path fails (glibc copes), rather than killing the process.
        let opened = std::fs::File::open("/proc/self/status").map(|_| ());
        if opened.map_err(|e| e.raw_os_error()) != Err(Some(libc::ENOSYS)) {
            return 6;
        }
        if !matches!(std::thread::spawn(|| 7).join(), Ok(7)) {
            return 5;
        }
        // A named thread started here confines itself in turn (as a port's forwarder does).
        let relay = std::thread::Builder::new()
            .name("relay-test".into())
            .spawn(|| {
                let confined = confine(ThreadKind::Relay).is_ok();
                // It may then do what its own kind may: accept (on no socket: EBADF).
                // SAFETY: accept4 on an invalid descriptor with null address pointers.
                let r = unsafe { libc::accept4(-1, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
                confined && r == -1
            })
            .map(|t| t.join());
        match relay {
            Ok(Ok(true)) => 0,
            _ => 8,
        }
    });
    assert!(
        libc::WIFEXITED(status),
        "status {status:#x}, stderr {err:?}"
    );
    assert_eq!(libc::WEXITSTATUS(status), 0, "{err}");
}
