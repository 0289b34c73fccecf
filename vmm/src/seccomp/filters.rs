//! The allow-lists of the VMM's threads, as data: what each kind of thread may call once it is
//! confined, and with which arguments where that matters. Anything else traps (see
//! [`super::report`]). Review a change here like a change to a firewall: each entry says why it
//! is there.
//!
//! Every list starts with [`COMMON`] (memory, locks, time, a thread's own end, the SIGSYS
//! report). Kinds that start threads ([`ThreadKind::Runner`], [`ThreadKind::Relay`]) also get
//! [`SPAWN`], and `clone3` answers ENOSYS to them ([`enosys`]), so glibc falls back to `clone`,
//! whose flags a filter can check: only a thread of this process can be created, never a
//! process or a namespace.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

use super::ThreadKind;

/// One allowed call: system call `nr`, when every condition in `when` holds (no conditions:
/// with any arguments). Several rules for one call allow it when any of them matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The x86_64 system call number.
    pub nr: i64,
    /// Conditions on its arguments, all of which must hold.
    pub when: &'static [Cond],
}

/// A condition on one argument: `(arg & mask) == value` (no mask: `arg == value`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cond {
    /// The argument's index (0-5).
    pub arg: u8,
    /// The mask applied first, if any.
    pub mask: Option<u64>,
    /// The value it must then equal.
    pub value: u64,
}

const fn any(nr: i64) -> Rule {
    Rule { nr, when: &[] }
}

const fn when(nr: i64, when: &'static [Cond]) -> Rule {
    Rule { nr, when }
}

const fn eq(arg: u8, value: u64) -> Cond {
    Cond {
        arg,
        mask: None,
        value,
    }
}

const fn masked(arg: u8, mask: u64, value: u64) -> Cond {
    Cond {
        arg,
        mask: Some(mask),
        value,
    }
}

/// An argument given as a C int; every one used here is positive.
#[allow(clippy::cast_sign_loss)]
const fn int(v: i32) -> u64 {
    v as u64
}

// ioctl numbers: _IO, _IOR and _IOW of <asm-generic/ioctl.h>.
const fn io(ty: u64, nr: u64) -> u64 {
    (ty << 8) | nr
}
const fn ior(ty: u64, nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const fn iow(ty: u64, nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const fn iowr(ty: u64, nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

const KVMIO: u64 = 0xAE;
/// Runs the vCPU until its next exit.
pub const KVM_RUN: u64 = io(KVMIO, 0x80);
/// Reads the vCPU's registers (to report an emulation failure).
pub const KVM_GET_REGS: u64 = ior(KVMIO, 0x81, std::mem::size_of::<kvm_regs>());
/// Reads the vCPU's special registers (to find the failing instruction).
pub const KVM_GET_SREGS: u64 = ior(KVMIO, 0x83, std::mem::size_of::<kvm_sregs>());
/// A snapshot: a vCPU's multiprocessing state.
pub const KVM_GET_MP_STATE: u64 = ior(KVMIO, 0x98, std::mem::size_of::<kvm_mp_state>());
/// A snapshot: a vCPU's FPU and extended state.
pub const KVM_GET_XSAVE: u64 = ior(KVMIO, 0xa4, std::mem::size_of::<kvm_xsave>());
/// A snapshot: a vCPU's extended control registers.
pub const KVM_GET_XCRS: u64 = ior(KVMIO, 0xa6, std::mem::size_of::<kvm_xcrs>());
/// A snapshot: a vCPU's debug registers.
pub const KVM_GET_DEBUGREGS: u64 = ior(KVMIO, 0xa1, std::mem::size_of::<kvm_debugregs>());
/// A snapshot: a vCPU's local APIC.
pub const KVM_GET_LAPIC: u64 = ior(KVMIO, 0x8e, std::mem::size_of::<kvm_lapic_state>());
/// A snapshot: a vCPU's pending events (exceptions, interrupts, NMIs).
pub const KVM_GET_VCPU_EVENTS: u64 = ior(KVMIO, 0x9f, std::mem::size_of::<kvm_vcpu_events>());
/// A snapshot: a vCPU's model-specific registers.
pub const KVM_GET_MSRS: u64 = iowr(KVMIO, 0x88, std::mem::size_of::<kvm_msrs>());
/// A snapshot: the CPUID a vCPU was given.
pub const KVM_GET_CPUID2: u64 = iowr(KVMIO, 0x91, std::mem::size_of::<kvm_cpuid2>());
/// A snapshot: a vCPU's TSC frequency.
pub const KVM_GET_TSC_KHZ: u64 = io(KVMIO, 0xa3);
/// A snapshot: the VM's interrupt controllers (both PICs, the IOAPIC).
pub const KVM_GET_IRQCHIP: u64 = iowr(KVMIO, 0x62, std::mem::size_of::<kvm_irqchip>());
/// A snapshot: the VM's PIT.
pub const KVM_GET_PIT2: u64 = ior(KVMIO, 0x9f, std::mem::size_of::<kvm_pit_state2>());
/// A snapshot: the VM's kvmclock.
pub const KVM_GET_CLOCK: u64 = ior(KVMIO, 0x7c, std::mem::size_of::<kvm_clock_data>());
/// Sets a tap's offloads, when the guest's network driver acknowledges its features.
pub const TUNSETOFFLOAD: u64 = iow(b'T' as u64, 208, std::mem::size_of::<u32>());
/// Makes a socket (non-)blocking (Rust's `set_nonblocking`).
pub const FIONBIO: u64 = 0x5421;

/// The vCPU kick signal (`vcpu::kick_signal`, glibc's SIGRTMIN).
pub const KICK_SIGNAL: i32 = 34;
/// The flags glibc's `pthread_create` passes to `clone`: a thread of this process.
pub const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

const NO_EXEC: u64 = libc::PROT_EXEC as u64;

/// What every thread may do.
pub const COMMON: &[Rule] = &[
    // Memory (the allocator, thread stacks): never new executable memory.
    any(libc::SYS_brk),
    when(libc::SYS_mmap, &[masked(2, NO_EXEC, 0)]),
    when(libc::SYS_mprotect, &[masked(2, NO_EXEC, 0)]),
    any(libc::SYS_munmap),
    any(libc::SYS_mremap),
    any(libc::SYS_madvise),
    // Locks, condition variables, channels.
    any(libc::SYS_futex),
    any(libc::SYS_sched_yield),
    // Clocks and sleeps (the vDSO answers most clock reads without a system call).
    any(libc::SYS_clock_gettime),
    any(libc::SYS_clock_nanosleep),
    any(libc::SYS_nanosleep),
    // Output (logs, the console, eventfds, sockets) and closing what a thread is done with.
    any(libc::SYS_write),
    any(libc::SYS_close),
    // HashMap seeds.
    any(libc::SYS_getrandom),
    // A thread's own end, a signal handler's return, a panic's abort.
    any(libc::SYS_exit),
    any(libc::SYS_exit_group),
    any(libc::SYS_rt_sigreturn),
    any(libc::SYS_rt_sigprocmask),
    any(libc::SYS_sigaltstack),
    // Answered ENOSYS by a filter of their own (see [`enosys`]); allowed here so that answer
    // wins. glibc opens files on its own (e.g. the CPU count for a new malloc arena) and copes
    // when it cannot; a jailed VMM has nothing it could open anyway.
    any(libc::SYS_open),
    any(libc::SYS_openat),
    // Debug builds of Rust's std check that a descriptor is open before closing it.
    when(libc::SYS_fcntl, &[eq(1, int(libc::F_GETFD))]),
    // The SIGSYS report (getpid, gettid, tgkill) and the vCPU kick.
    any(libc::SYS_getpid),
    any(libc::SYS_gettid),
    when(libc::SYS_tgkill, &[eq(2, int(libc::SIGSYS))]),
    when(libc::SYS_tgkill, &[eq(2, int(KICK_SIGNAL))]),
];

/// What a thread that starts threads needs (Rust's `thread::spawn` over glibc).
pub const SPAWN: &[Rule] = &[
    when(libc::SYS_clone, &[eq(0, THREAD_CLONE_FLAGS)]),
    // Answered ENOSYS by a filter of its own (see [`enosys`]); allowed here so that answer wins.
    any(libc::SYS_clone3),
    any(libc::SYS_set_robust_list),
    any(libc::SYS_rseq),
    when(libc::SYS_prctl, &[eq(0, int(libc::PR_SET_NAME))]),
    // A thread started here confines itself further under this filter, which it inherited (a
    // port's forwarder): it reads its name back for the SIGSYS report (`report::label_thread`)
    // and installs its own filter, which can only take calls away (no_new_privs is set already).
    when(libc::SYS_prctl, &[eq(0, int(libc::PR_GET_NAME))]),
    when(libc::SYS_prctl, &[eq(0, int(libc::PR_SET_NO_NEW_PRIVS))]),
    when(
        libc::SYS_seccomp,
        &[eq(0, libc::SECCOMP_SET_MODE_FILTER as u64)],
    ),
    any(libc::SYS_sched_getaffinity),
];

/// Sockets a thread reads and writes (Unix or TCP streams, already open or connected here).
const STREAMS: &[Rule] = &[
    any(libc::SYS_read),
    any(libc::SYS_recvfrom),
    any(libc::SYS_sendto),
    any(libc::SYS_shutdown),
    any(libc::SYS_poll),
    any(libc::SYS_ppoll),
    any(libc::SYS_setsockopt),
    when(libc::SYS_ioctl, &[eq(1, FIONBIO)]),
    any(libc::SYS_fcntl),
];

/// A connection to a Unix socket (the VM's own vsock socket, to reach the agent).
const UNIX_CONNECT: &[Rule] = &[
    when(libc::SYS_socket, &[eq(0, int(libc::AF_UNIX))]),
    any(libc::SYS_connect),
];

/// A vCPU.
pub const VCPU: &[Rule] = &[
    when(libc::SYS_ioctl, &[eq(1, KVM_RUN)]),
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_REGS)]),
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_SREGS)]),
    // A device activated by the guest's register write (on this thread): its queue eventfds
    // are duplicated for the event loop, a tap gets its offloads.
    when(libc::SYS_ioctl, &[eq(1, TUNSETOFFLOAD)]),
    when(libc::SYS_fcntl, &[eq(1, int(libc::F_DUPFD_CLOEXEC))]),
    // A vsock device reset by the guest (on this thread) unregisters its connections.
    any(libc::SYS_epoll_ctl),
    // Eventfds.
    any(libc::SYS_read),
    // A snapshot (pause, template, `mvm boot --snapshot`): each parked vCPU reads its own state
    // (`snapshot::cpu::VcpuState::save`); putting it back happens before any filter.
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_MP_STATE)]),
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_XSAVE)]),
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_XCRS)]),
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_DEBUGREGS)]),
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_LAPIC)]),
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_VCPU_EVENTS)]),
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_MSRS)]),
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_CPUID2)]),
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_TSC_KHZ)]),
];

/// The event loop with every device.
pub const DEVICE: &[Rule] = &[
    any(libc::SYS_epoll_wait),
    any(libc::SYS_epoll_pwait),
    any(libc::SYS_epoll_ctl),
    // Eventfds, disks, the tap, passt's and vsock's sockets.
    any(libc::SYS_read),
    any(libc::SYS_readv),
    any(libc::SYS_writev),
    any(libc::SYS_pread64),
    any(libc::SYS_pwrite64),
    any(libc::SYS_preadv),
    any(libc::SYS_pwritev),
    any(libc::SYS_lseek),
    any(libc::SYS_fsync),
    any(libc::SYS_fdatasync),
    any(libc::SYS_fallocate),
    any(libc::SYS_recvfrom),
    any(libc::SYS_sendto),
    any(libc::SYS_recvmsg),
    any(libc::SYS_sendmsg),
    any(libc::SYS_shutdown),
    // vsock: host connections accepted, the guest's connections to host listeners.
    any(libc::SYS_accept4),
    when(libc::SYS_socket, &[eq(0, int(libc::AF_UNIX))]),
    any(libc::SYS_connect),
    any(libc::SYS_fcntl),
    when(libc::SYS_ioctl, &[eq(1, FIONBIO)]),
    when(libc::SYS_ioctl, &[eq(1, TUNSETOFFLOAD)]),
    // Rate limiters' timers.
    any(libc::SYS_timerfd_settime),
    // A snapshot, taken on this thread (`snapshot::take::SnapshotPoint`): the VM's interrupt
    // controllers, PIT and clock, then the memory and state files it was handed, created
    // before the jail (sized, written, synced; none is opened here).
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_IRQCHIP)]),
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_PIT2)]),
    when(libc::SYS_ioctl, &[eq(1, KVM_GET_CLOCK)]),
    any(libc::SYS_ftruncate),
    // Answered ENOSYS by a filter of their own (see [`enosys`]); allowed here so that answer
    // wins.
    any(libc::SYS_unlink),
    any(libc::SYS_unlinkat),
    // passt's end with the network device.
    when(libc::SYS_kill, &[eq(1, int(libc::SIGKILL))]),
    any(libc::SYS_wait4),
];

/// The VMM's own thread.
pub const RUNNER: &[Rule] = &[
    // Published ports: their listeners are bound here.
    when(libc::SYS_socket, &[eq(0, int(libc::AF_INET))]),
    when(libc::SYS_socket, &[eq(0, int(libc::AF_INET6))]),
    any(libc::SYS_bind),
    any(libc::SYS_listen),
    any(libc::SYS_getsockname),
    // The VM's end: the event loop's thread is joined, passt reaped.
    any(libc::SYS_wait4),
    // A detached run's own output goes to its log once the container runs.
    any(libc::SYS_dup2),
    // The device counters (`mvm stats`), rewritten in place in a file opened before the jail.
    any(libc::SYS_pwrite64),
    // The container log's rotation: answered ENOSYS by a filter of their own (see [`enosys`]),
    // so a jailed VMM keeps its log at its size limit and stops logging instead of dying.
    any(libc::SYS_rename),
    any(libc::SYS_renameat),
    any(libc::SYS_renameat2),
    any(libc::SYS_unlink),
    any(libc::SYS_unlinkat),
    // Nothing here accepts; but a published port's forwarder is started by this thread and
    // runs under this filter as well as its own (filters stack), so it must let `accept4` by.
    any(libc::SYS_accept4),
];

/// The control socket's server.
pub const CONTROL: &[Rule] = &[
    any(libc::SYS_accept4),
    // A snapshot's files come with `mvm snapshot create`'s request (SCM_RIGHTS); the event
    // loop's thread writes them.
    any(libc::SYS_recvmsg),
];

/// A published port's forwarder and its connections.
pub const RELAY: &[Rule] = &[any(libc::SYS_accept4)];

/// The rules of `kind`, in order: [`COMMON`], then what the kind adds.
pub fn rules(kind: ThreadKind) -> Vec<Rule> {
    let own: &[&[Rule]] = match kind {
        ThreadKind::Vcpu => &[VCPU],
        ThreadKind::Device => &[DEVICE],
        ThreadKind::Runner => &[STREAMS, UNIX_CONNECT, SPAWN, RUNNER],
        ThreadKind::Control => &[STREAMS, UNIX_CONNECT, CONTROL],
        ThreadKind::Relay => &[STREAMS, UNIX_CONNECT, SPAWN, RELAY],
    };
    COMMON
        .iter()
        .chain(own.iter().flat_map(|r| r.iter()))
        .copied()
        .collect()
}

/// The calls answered ENOSYS for `kind` rather than allowed or trapped.
pub fn enosys(kind: ThreadKind) -> Vec<i64> {
    let own: &[i64] = match kind {
        ThreadKind::Runner => &[
            libc::SYS_clone3,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
        ],
        ThreadKind::Relay => &[libc::SYS_clone3],
        // The vsock device removes its socket when the VM is dropped; a confined VMM may not
        // remove files, so its supervisor does.
        ThreadKind::Device => &[libc::SYS_unlink, libc::SYS_unlinkat],
        _ => &[],
    };
    [libc::SYS_open, libc::SYS_openat]
        .into_iter()
        .chain(own.iter().copied())
        .collect()
}
