//! PID 1 duties inside the guest: the early mounts, the loopback interface, the boot parameters
//! meant for the agent ([`BootParams`]), and powering the VM off.

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::Path;

use crate::guest::{BootParams, BootParamsError, NetConfig};

/// Errors of guest initialisation.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount failed.
    #[error("mounting {fstype} on {target} failed")]
    Mount {
        /// File system type.
        fstype: String,
        /// Mount point.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Setting up a network interface failed.
    #[error("configuring interface {0} failed")]
    Interface(String, #[source] io::Error),
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// mount(2) with the given flags; an already-mounted target (EBUSY) is not an error.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), InitError> {
    let _ = fs::create_dir_all(target);
    let (src, tgt, fst) = (cstr(source), cstr(target), cstr(fstype));
    let data = data.map(cstr);
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
    // SAFETY: every pointer is a valid NUL-terminated string (or null for data) that outlives
    // the call.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fst.as_ptr(), flags, data_ptr) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(InitError::Mount {
                fstype: fstype.into(),
                target: target.into(),
                source: err,
            });
        }
    }
    Ok(())
}

/// The mounts every guest needs before anything else runs.
pub fn early_mounts() -> Result<(), InitError> {
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nodev, None)?;
    mount("sysfs", "/sys", "sysfs", nodev, None)?;
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount("tmpfs", "/dev/shm", "tmpfs", nodev, Some("mode=1777"))?;
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, None)?;
    Ok(())
}

/// The agent's boot parameters from /proc/cmdline.
pub fn params_from_proc() -> Result<BootParams, BootParamsError> {
    BootParams::parse(&fs::read_to_string("/proc/cmdline").unwrap_or_default())
}

/// IFF_UP as the `short` that `ifreq.ifr_flags` holds.
const IFF_UP: libc::c_short = 0x1;

/// Brings a network interface up (IFF_UP).
pub fn interface_up(name: &str) -> Result<(), InitError> {
    let err = |e| InitError::Interface(name.to_string(), e);
    // SAFETY: plain socket(2) call; checked below and closed at the end.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    // SAFETY: SIOCGIFFLAGS fills the union of the valid ifreq we own.
    let mut rc = unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &raw mut req) };
    if rc == 0 {
        // SAFETY: reading and writing the flags member that SIOCGIFFLAGS just filled in.
        unsafe {
            req.ifr_ifru.ifru_flags |= IFF_UP;
        }
        // SAFETY: SIOCSIFFLAGS reads the valid ifreq we own.
        rc = unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, &raw const req) };
    }
    let result = if rc < 0 {
        Err(err(io::Error::last_os_error()))
    } else {
        Ok(())
    };
    // SAFETY: closing the socket opened above, once.
    unsafe { libc::close(sock) };
    result
}

/// `struct rtentry` of the SIOCADDRT ioctl (glibc's libc crate does not define it).
#[repr(C)]
struct RtEntry {
    pad1: libc::c_ulong,
    dst: libc::sockaddr,
    gateway: libc::sockaddr,
    genmask: libc::sockaddr,
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: libc::c_ulong,
    pad4: *mut libc::c_void,
    metric: libc::c_short,
    dev: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: libc::c_ushort,
}

/// An IPv4 socket address in a generic `sockaddr`.
fn sockaddr_v4(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Gives an interface its IPv4 address and netmask, brings it up and adds the default route.
pub fn configure_ipv4(net: &NetConfig) -> Result<(), InitError> {
    let err = |e| InitError::Interface(net.dev.clone(), e);
    let mask = u32::MAX
        .checked_shl(32 - u32::from(net.prefix))
        .unwrap_or(0);
    // SAFETY: plain socket(2) call; checked below and closed at the end.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    let ifreq = |addr: std::net::Ipv4Addr| {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(net.dev.bytes()) {
            *dst = libc::c_char::from_ne_bytes([src]);
        }
        req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
        req
    };
    let result = (|| {
        for (req, what) in [
            (libc::SIOCSIFADDR, ifreq(net.addr)),
            (libc::SIOCSIFNETMASK, ifreq(std::net::Ipv4Addr::from(mask))),
        ] {
            // SAFETY: the request reads the valid ifreq we own.
            if unsafe { libc::ioctl(sock, req, &raw const what) } < 0 {
                return Err(err(io::Error::last_os_error()));
            }
        }
        interface_up(&net.dev)?;
        if let Some(gw) = net.gateway {
            let any = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
            let mut route = RtEntry {
                pad1: 0,
                dst: any,
                gateway: sockaddr_v4(gw),
                genmask: any,
                flags: libc::RTF_UP | libc::RTF_GATEWAY,
                pad2: 0,
                pad3: 0,
                pad4: std::ptr::null_mut(),
                metric: 0,
                dev: std::ptr::null_mut(),
                mtu: 0,
                window: 0,
                irtt: 0,
            };
            // SAFETY: SIOCADDRT reads the valid rtentry we own (no device name pointer).
            if unsafe { libc::ioctl(sock, libc::SIOCADDRT, &raw mut route) } < 0 {
                return Err(err(io::Error::last_os_error()));
            }
        }
        Ok(())
    })();
    // SAFETY: closing the socket opened above, once.
    unsafe { libc::close(sock) };
    result
}

/// Reaps exited children that `managed` does not claim, without blocking. Children it claims
/// are left for the thread that waits for them. Returns the pids reaped.
pub fn reap_unmanaged(managed: &dyn Fn(i32) -> bool) -> Vec<i32> {
    let mut reaped = Vec::new();
    loop {
        // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes into the valid siginfo we own; WNOWAIT leaves the child waitable.
        let rc = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &raw mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid to read after a successful waitid (0 when nothing exited).
        let pid = unsafe { info.si_pid() };
        if rc < 0 || pid <= 0 || managed(pid) {
            return reaped;
        }
        let mut status = 0;
        // SAFETY: reaps the one child that waitid reported.
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        reaped.push(pid);
    }
}

/// Flushes file systems and resets the VM (the VMM ends with exit code 0).
pub fn power_off() -> ! {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot takes no pointers; it only returns on failure.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // reboot failed (not PID 1, or no privilege): leave the process instead.
    std::process::exit(1)
}

/// Whether this process runs as the guest's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Whether the path exists as a block device node.
pub fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_can_be_brought_up() {
        // `lo` exists in every network namespace; bringing it up is idempotent.
        interface_up("lo").unwrap();
        assert!(matches!(
            interface_up("mvm-no-such-if"),
            Err(InitError::Interface(_, _))
        ));
    }
}
