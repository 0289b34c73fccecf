//! Privileged kernel operations, each tried in a way that changes nothing: arguments the kernel
//! rejects after its permission check, objects closed or removed at once, nothing written to
//! /proc, /sys or a terminal.

use std::ffi::CString;
use std::io::IsTerminal;
use std::os::unix::fs::OpenOptionsExt;

use super::{by_errno, probe, refused, Context};
use crate::probe::surface::status_field;
use crate::probe::sys::{self, io_name, Forked};
use crate::probe::{Probe, ProbeResult};

/// Verdict of a call that either creates something (closed again) or fails.
fn created<T>(name: &str, r: Result<T, sys::Errno>, what: &str) -> Probe {
    match r {
        Ok(_) => probe(name, ProbeResult::Allowed, format!("{what} (closed again)")),
        Err(e) => {
            let (r, d) = refused(e);
            probe(name, r, d)
        }
    }
}

/// `mount-filesystem`: a 4 KiB tmpfs on a fresh directory in the scratch dir, unmounted and
/// removed at once.
pub fn mount_filesystem(ctx: &Context) -> Probe {
    const NAME: &str = "mount-filesystem";
    let Some(dir) = ctx.scratch else {
        return probe(
            NAME,
            ProbeResult::Error,
            "no writable directory for a mount point",
        );
    };
    let target = dir.join(format!(".mvm-probe-mnt-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&target) {
        return probe(
            NAME,
            ProbeResult::Error,
            format!("mkdir {}: {}", target.display(), io_name(&e)),
        );
    }
    let Ok(ctarget) = CString::new(target.as_os_str().as_encoded_bytes()) else {
        let _ = std::fs::remove_dir(&target);
        return probe(NAME, ProbeResult::Error, "scratch path has a NUL byte");
    };
    let result = match sys::mount_tmpfs(&ctarget) {
        Ok(()) => {
            let unmounted = match sys::umount(&ctarget) {
                Ok(()) => "unmounted again".to_string(),
                Err(e) => format!("umount: {}", sys::errno_name(e)),
            };
            probe(
                NAME,
                ProbeResult::Allowed,
                format!("mounted a tmpfs on {} ({unmounted})", target.display()),
            )
        }
        Err(e) => {
            let (r, d) = refused(e);
            probe(NAME, r, format!("mount tmpfs: {d}"))
        }
    };
    let _ = std::fs::remove_dir(&target);
    result
}

/// `load-kernel-module`: init_module with an empty image.
pub fn load_module() -> Probe {
    const NAME: &str = "load-kernel-module";
    let (r, d) = by_errno(
        sys::init_module_empty(),
        &[libc::ENOEXEC, libc::EFAULT, libc::EINVAL],
        "init_module of an empty image got past CAP_SYS_MODULE",
    );
    probe(NAME, r, d)
}

/// `raw-socket`: socket(AF_INET, SOCK_RAW, IPPROTO_ICMP).
pub fn raw_socket() -> Probe {
    const NAME: &str = "raw-socket";
    match sys::raw_socket() {
        Err(libc::EAFNOSUPPORT) => probe(NAME, ProbeResult::Blocked, "no IPv4 (EAFNOSUPPORT)"),
        r => created(NAME, r, "opened a raw ICMP socket"),
    }
}

/// `set-clock`: adjtimex setting the tick to 0, which the kernel refuses after the
/// CAP_SYS_TIME check.
pub fn set_clock() -> Probe {
    const NAME: &str = "set-clock";
    let (r, d) = by_errno(
        sys::adjtimex_invalid_tick(),
        &[libc::EINVAL],
        "adjtimex(ADJ_TICK) got past CAP_SYS_TIME; nothing was set",
    );
    probe(NAME, r, d)
}

/// Opens `path` for writing and closes it without writing.
fn open_for_write(path: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map(drop)
}

fn write_verdict(e: &std::io::Error) -> ProbeResult {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES | libc::EROFS | libc::ENOENT) => ProbeResult::Blocked,
        _ => ProbeResult::Error,
    }
}

/// `write-sysrq-trigger`: /proc/sysrq-trigger opens for writing (nothing is written).
pub fn write_sysrq_trigger() -> Probe {
    const NAME: &str = "write-sysrq-trigger";
    const PATH: &str = "/proc/sysrq-trigger";
    match open_for_write(PATH) {
        Ok(()) => probe(
            NAME,
            ProbeResult::Allowed,
            format!("{PATH} opened for writing (nothing written)"),
        ),
        Err(e) => probe(NAME, write_verdict(&e), format!("{PATH}: {}", io_name(&e))),
    }
}

/// Kernel-wide sysfs files, the first that exists is opened for writing.
const SYS_FILES: [&str; 4] = [
    "/sys/kernel/uevent_helper",
    "/sys/kernel/mm/transparent_hugepage/enabled",
    "/sys/power/state",
    "/sys/kernel/profiling",
];

/// `write-sys`: a kernel-wide file under /sys opens for writing (nothing is written).
pub fn write_sys() -> Probe {
    const NAME: &str = "write-sys";
    let Some(path) = SYS_FILES
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        return probe(
            NAME,
            ProbeResult::Blocked,
            "none of the kernel-wide files under /sys exists (no sysfs?)",
        );
    };
    match open_for_write(path) {
        Ok(()) => probe(
            NAME,
            ProbeResult::Allowed,
            format!("{path} opened for writing (nothing written)"),
        ),
        Err(e) => probe(NAME, write_verdict(&e), format!("{path}: {}", io_name(&e))),
    }
}

/// `reboot`: reboot(2) with a wrong magic, refused after the CAP_SYS_BOOT check.
pub fn reboot() -> Probe {
    const NAME: &str = "reboot";
    let (r, d) = by_errno(
        sys::reboot_invalid_magic(),
        &[libc::EINVAL],
        "reboot with a wrong magic got past CAP_SYS_BOOT",
    );
    probe(NAME, r, d)
}

/// `keyctl`: the session keyring's id (nothing is created).
pub fn keyctl() -> Probe {
    const NAME: &str = "keyctl";
    match sys::keyctl_session_keyring() {
        Ok(id) => probe(
            NAME,
            ProbeResult::Allowed,
            format!("the kernel keyring answers (session keyring {id})"),
        ),
        Err(libc::ENOKEY) => probe(
            NAME,
            ProbeResult::Allowed,
            "the kernel keyring answers (ENOKEY: no session keyring yet)",
        ),
        Err(e) => {
            let (r, d) = refused(e);
            probe(NAME, r, d)
        }
    }
}

/// `unshare-user-namespace`: unshare(CLONE_NEWUSER) in a child (it would change the probe's own
/// credentials).
pub fn unshare_user_namespace() -> Probe {
    const NAME: &str = "unshare-user-namespace";
    let pid = match sys::fork() {
        Ok(Forked::Child) => sys::in_child(|| match sys::unshare_user() {
            Ok(()) => 0,
            Err(e) => e.clamp(1, 255),
        }),
        Ok(Forked::Parent(pid)) => pid,
        Err(e) => {
            return probe(
                NAME,
                ProbeResult::Error,
                format!("fork: {}", sys::errno_name(e)),
            )
        }
    };
    match sys::wait(pid) {
        Ok(sys::Exit { code: Some(0), .. }) => probe(
            NAME,
            ProbeResult::Allowed,
            "unshare(CLONE_NEWUSER) succeeded (in a child)",
        ),
        Ok(sys::Exit { code: Some(e), .. }) => {
            // EINVAL/ENOSPC/EUSERS: no user namespaces here (disabled, or the limit is 0).
            let r = match e {
                libc::EPERM
                | libc::EACCES
                | libc::ENOSYS
                | libc::ENOSPC
                | libc::EUSERS
                | libc::EINVAL => ProbeResult::Blocked,
                _ => ProbeResult::Error,
            };
            probe(
                NAME,
                r,
                format!("unshare(CLONE_NEWUSER): {}", sys::errno_name(e)),
            )
        }
        Ok(exit) => probe(
            NAME,
            ProbeResult::Error,
            format!("the child died: {exit:?}"),
        ),
        Err(e) => probe(
            NAME,
            ProbeResult::Error,
            format!("wait: {}", sys::errno_name(e)),
        ),
    }
}

/// `bpf`: BPF_MAP_CREATE of a one-entry array, closed at once.
pub fn bpf() -> Probe {
    created("bpf", sys::bpf_array_map(), "created a BPF array map")
}

/// `perf-event-open`: a disabled CPU-clock counter on this process, kernel included, closed at
/// once.
pub fn perf_event_open() -> Probe {
    const NAME: &str = "perf-event-open";
    match sys::perf_cpu_clock_self() {
        Err(e @ (libc::ENOENT | libc::ENODEV | libc::EOPNOTSUPP)) => probe(
            NAME,
            ProbeResult::Blocked,
            format!("no perf events in this kernel ({})", sys::errno_name(e)),
        ),
        r => created(NAME, r, "opened a CPU-clock perf event on this process"),
    }
}

/// Whether the process holds CAP_SYS_ADMIN in the initial user namespace (what TIOCSTI on a
/// foreign terminal, or with legacy TIOCSTI off, needs).
fn sys_admin_on_host() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status_field(&status, "CapEff")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or(0);
    let initial_ns = std::fs::read_to_string("/proc/self/uid_map")
        .ok()
        .and_then(|t| crate::probe::surface::parse_id_map(&t))
        .is_some_and(|m| crate::probe::surface::is_initial_map(&m));
    eff & (1 << CAP_SYS_ADMIN) != 0 && initial_ns
}

/// `tiocsti`: whether a terminal is reachable that TIOCSTI could push input into. Never calls
/// TIOCSTI: checks for a controlling terminal (/dev/tty), terminals on stdin/stdout/stderr, and
/// the kernel's `dev.tty.legacy_tiocsti`.
pub fn tiocsti() -> Probe {
    const NAME: &str = "tiocsti";
    let controlling = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open("/dev/tty");
    let std_ttys: Vec<&str> = [
        ("stdin", std::io::stdin().is_terminal()),
        ("stdout", std::io::stdout().is_terminal()),
        ("stderr", std::io::stderr().is_terminal()),
    ]
    .into_iter()
    .filter_map(|(n, t)| t.then_some(n))
    .collect();
    // Missing on kernels before 6.2, where TIOCSTI is always available.
    let legacy = std::fs::read_to_string("/proc/sys/dev/tty/legacy_tiocsti")
        .map(|s| s.trim() != "0")
        .unwrap_or(true);
    let admin = sys_admin_on_host();
    let Ok(_tty) = controlling.as_ref() else {
        let why = controlling.err().map_or_else(String::new, |e| io_name(&e));
        if std_ttys.is_empty() {
            return probe(
                NAME,
                ProbeResult::Blocked,
                format!("no terminal: /dev/tty: {why}; stdin, stdout and stderr are not terminals"),
            );
        }
        // TIOCSTI on a terminal other than the controlling one needs CAP_SYS_ADMIN.
        let (r, d) = if admin {
            (
                ProbeResult::Allowed,
                "CAP_SYS_ADMIN can push input into it (not tried)",
            )
        } else {
            (
                ProbeResult::Blocked,
                "it is not the controlling terminal and CAP_SYS_ADMIN is missing",
            )
        };
        return probe(
            NAME,
            r,
            format!(
                "{} is a terminal (no controlling one: {why}); {d}",
                std_ttys.join(", ")
            ),
        );
    };
    if legacy || admin {
        probe(
            NAME,
            ProbeResult::Allowed,
            "a controlling terminal is open (/dev/tty) and TIOCSTI is enabled (not tried)",
        )
    } else {
        probe(
            NAME,
            ProbeResult::Blocked,
            "a controlling terminal is open but dev.tty.legacy_tiocsti = 0",
        )
    }
}
