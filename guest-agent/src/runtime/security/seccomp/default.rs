//! Docker's default seccomp profile, as data, for x86_64: what a container may call whatever its
//! capabilities, what each capability adds, and the argument rules. Names that exist only on
//! other architectures (`chown32`, `_llseek`, the `*_time64` calls, ...) are left out; x86_64
//! has none of them.
//!
//! The effect matches docker's `profiles/seccomp/default.json`: anything not listed fails with
//! EPERM; `clone3` fails with ENOSYS (so that libc falls back to `clone`, whose flags a filter
//! can see); `clone` may not create namespaces and `unshare`, `setns` and `mount` are refused,
//! unless the container was given CAP_SYS_ADMIN; `socket` may never open AF_VSOCK.

use super::{Action, Arg, Filter, Op, Profile, SyscallRule};

/// System calls every container may make.
pub const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "clock_adjtime",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_waitv",
    "futimesat",
    "get_robust_list",
    "get_thread_area",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_setup",
    "io_submit",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioctl",
    "ioprio_get",
    "ioprio_set",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_tgsigqueueinfo",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "set_thread_area",
    "set_tid_address",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "setsid",
    "setsockopt",
    "setuid",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socketpair",
    "splice",
    "stat",
    "statfs",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "write",
    "writev",
];

/// Allowed on x86_64 only (thread-local storage and the LDT).
pub const ARCH_X86_64: &[&str] = &["arch_prctl", "modify_ldt"];

/// Allowed from Linux 4.8 on (before it, ptrace could be used to get around seccomp).
pub const PTRACE_FROM_4_8: &[&str] = &["process_vm_readv", "process_vm_writev", "ptrace"];

/// What each capability adds to the allowed calls: (capability, system calls).
pub const BY_CAPABILITY: &[(&str, &[&str])] = &[
    (
        "SYS_ADMIN",
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount2",
            "unshare",
        ],
    ),
    ("DAC_READ_SEARCH", &["open_by_handle_at"]),
    ("SYS_BOOT", &["reboot"]),
    ("SYS_CHROOT", &["chroot"]),
    (
        "SYS_MODULE",
        &["delete_module", "init_module", "finit_module"],
    ),
    ("SYS_PACCT", &["acct"]),
    (
        "SYS_PTRACE",
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    ("SYS_RAWIO", &["iopl", "ioperm"]),
    ("SYS_TIME", &["settimeofday", "clock_settime"]),
    ("SYS_TTY_CONFIG", &["vhangup"]),
    (
        "SYS_NICE",
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    ("SYSLOG", &["syslog"]),
    ("BPF", &["bpf"]),
    ("PERFMON", &["perf_event_open"]),
];

/// `personality` values a container may set: PER_LINUX, UNAME26, PER_LINUX32,
/// UNAME26|PER_LINUX32, and 0xffffffff (which only queries).
pub const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The `clone` flags that create namespaces (NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID,
/// NEWNET): refused without CAP_SYS_ADMIN.
pub const CLONE_NAMESPACE_FLAGS: u64 = 0x7e02_0000;

/// The socket family always refused: AF_VSOCK, which inside a VM reaches the guest agent and
/// the host.
pub const AF_VSOCK: u64 = 40;

/// ENOSYS, for `clone3`.
const ENOSYS: u32 = 38;

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn allow(list: &[&str]) -> SyscallRule {
    SyscallRule::new(names(list), Action::Allow)
}

/// Docker's default profile.
pub fn profile() -> Profile {
    let mut rules = vec![allow(ALLOWED)];
    rules.push(SyscallRule {
        includes: Filter {
            arches: names(&["amd64", "x32"]),
            ..Filter::default()
        },
        ..allow(ARCH_X86_64)
    });
    rules.push(SyscallRule {
        includes: Filter {
            min_kernel: Some("4.8".into()),
            ..Filter::default()
        },
        ..allow(PTRACE_FROM_4_8)
    });
    rules.push(SyscallRule {
        args: vec![Arg::new(0, AF_VSOCK, Op::NotEqual)],
        ..allow(&["socket"])
    });
    for value in PERSONALITIES {
        rules.push(SyscallRule {
            args: vec![Arg::new(0, value, Op::Equal)],
            ..allow(&["personality"])
        });
    }
    for (cap, calls) in BY_CAPABILITY {
        rules.push(SyscallRule {
            includes: Filter {
                caps: vec![format!("CAP_{cap}")],
                ..Filter::default()
            },
            ..allow(calls)
        });
    }
    let without_sys_admin = Filter {
        caps: vec!["CAP_SYS_ADMIN".into()],
        ..Filter::default()
    };
    rules.push(SyscallRule {
        args: vec![Arg {
            value_two: 0,
            ..Arg::new(0, CLONE_NAMESPACE_FLAGS, Op::MaskedEqual)
        }],
        excludes: without_sys_admin.clone(),
        ..allow(&["clone"])
    });
    rules.push(SyscallRule {
        errno_ret: Some(ENOSYS),
        excludes: without_sys_admin,
        ..SyscallRule::new(names(&["clone3"]), Action::Errno)
    });
    Profile {
        default_action: Action::Errno,
        default_errno_ret: Some(1),
        syscalls: rules,
        ..Profile::default()
    }
}
