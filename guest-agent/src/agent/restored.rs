//! A guest restored from a template learns its run: the host's first request after the restore
//! is [`Setup`](crate::protocol::Setup). Before anything of the run happens the agent makes the
//! guest its own: the kernel's random number generator is reseeded with the host's fresh bytes
//! (and reseeded at once, not at its next scheduled reseed), the wall clock is stepped to the
//! host's, and the network interface takes its new MAC address. Then the run's disks are
//! mounted (waiting for the kernel to see their size: they were empty in the template) and its
//! network configured, as a cold boot does from the command line.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::guest::{BootParams, ROOTFS_DIR, VOLUMES_DIR};
use crate::protocol::Setup;

use super::init;
use super::portfwd::PortForwarder;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// How long a run's disk may take to show its size after the restore.
const DISK_WAIT: Duration = Duration::from_secs(10);

/// Decodes the seed's hex digits.
fn unhex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Mixes `seed` into the kernel's pool, credits it and reseeds the CRNG now.
pub fn reseed(seed: &[u8]) -> io::Result<()> {
    let random = fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    let words: Vec<u32> = seed
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_ne_bytes(w)
        })
        .collect();
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u32> = Vec::with_capacity(words.len() + 2);
    let bytes = u32::try_from(seed.len()).unwrap_or(0);
    info.push(bytes * 8);
    info.push(bytes);
    info.extend_from_slice(&words);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info header and `buf_size` bytes after it, all
    // inside `info`, which outlives the call.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the wall clock to `ns` nanoseconds since the epoch.
pub fn set_clock(ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(ns / 1_000_000_000).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::try_from(ns % 1_000_000_000).unwrap_or(0),
    };
    // SAFETY: clock_settime reads the valid timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &raw const ts) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives interface `dev` the MAC address `mac`.
pub fn set_mac(dev: &str, mac: [u8; 6]) -> io::Result<()> {
    // SAFETY: plain socket(2) call; checked below and closed at the end.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(dev.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    let mut addr: libc::sockaddr = libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: [0; 14],
    };
    for (dst, src) in addr.sa_data.iter_mut().zip(mac) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    req.ifr_ifru.ifru_hwaddr = addr;
    // SAFETY: SIOCSIFHWADDR reads the valid ifreq we own.
    let rc = unsafe { libc::ioctl(sock, libc::SIOCSIFHWADDR, &raw const req) };
    let result = if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: closing the socket opened above, once.
    unsafe { libc::close(sock) };
    result
}

/// Waits until the kernel sees a non-empty disk `dev` (`/sys/block/<dev>/size`): a disk that
/// was an empty placeholder in the template gets its size through a config-change interrupt.
fn wait_for_disk(dev: &str) -> Result<(), String> {
    let path = format!("/sys/block/{dev}/size");
    let deadline = Instant::now() + DISK_WAIT;
    loop {
        let size = fs::read_to_string(&path).unwrap_or_default();
        if size.trim().parse::<u64>().is_ok_and(|s| s > 0) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("disk {dev} is still empty after the restore"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Mounts the root disk and volumes `params` names, and configures its network.
pub fn apply(params: &BootParams, wait_for_disks: bool) -> Result<(), String> {
    if let Some(dev) = &params.rootfs {
        if wait_for_disks {
            wait_for_disk(dev.trim_start_matches("/dev/"))?;
        }
        init::mount(dev, ROOTFS_DIR, "ext4", libc::MS_RDONLY, None)
            .map_err(|e| format!("{e} ({dev})"))?;
    }
    for volume in &params.volumes {
        let dev = &volume.dev;
        if wait_for_disks {
            wait_for_disk(dev)?;
        }
        let target = format!("{VOLUMES_DIR}/{dev}");
        fs::create_dir_all(&target).map_err(|e| format!("cannot create {target}: {e}"))?;
        let flags = if volume.readonly { libc::MS_RDONLY } else { 0 };
        init::mount(&format!("/dev/{dev}"), &target, "ext4", flags, None)
            .map_err(|e| format!("{e} (volume {dev})"))?;
    }
    if let Some(net) = &params.net {
        if let Err(e) = init::configure_ipv4(net) {
            let why = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
            eprintln!("mvm-agent: {e}{why}");
        }
    }
    Ok(())
}

/// Makes a restored guest its own: reseeds its RNG with `seed` (hex), steps its clock to
/// `time_ns` and gives its interface `mac`; returns the run's boot parameters.
fn take_identity(
    seed: &str,
    time_ns: u64,
    mac: Option<[u8; 6]>,
    boot: &str,
) -> Result<BootParams, String> {
    let seed = unhex(seed)
        .filter(|s| s.len() >= 32)
        .ok_or("the seed is not 32 or more hex bytes")?;
    reseed(&seed).map_err(|e| format!("cannot reseed the guest's random number generator: {e}"))?;
    if let Err(e) = set_clock(time_ns) {
        eprintln!("mvm-agent: cannot set the clock: {e}");
    }
    let params = BootParams::parse(boot).map_err(|e| e.to_string())?;
    if let (Some(mac), Some(net)) = (mac, &params.net) {
        if let Err(e) = set_mac(&net.dev, mac) {
            eprintln!("mvm-agent: cannot set the MAC address of {}: {e}", net.dev);
        }
    }
    Ok(params)
}

/// Handles the run's [`Setup`] in a guest restored from a template.
pub fn setup(setup: &Setup) -> Result<PortForwarder, String> {
    let params = take_identity(&setup.seed, setup.time_ns, setup.mac, &setup.boot)?;
    apply(&params, true)?;
    Ok(PortForwarder::bind(&params.ports))
}

/// Handles [`crate::protocol::Request::Resume`] in a guest restored from a snapshot of a running
/// container: its disks stay mounted and its processes run on; the network takes the run's
/// address (the same address again is no error) and the published ports are the run's.
pub fn resume(resume: &Setup) -> Result<PortForwarder, String> {
    let params = take_identity(&resume.seed, resume.time_ns, resume.mac, &resume.boot)?;
    if let Some(net) = &params.net {
        if let Err(e) = init::configure_ipv4(net) {
            // The parent's default route is still there where the address did not change.
            let exists = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<io::Error>())
                .is_some_and(|s| s.raw_os_error() == Some(libc::EEXIST));
            if !exists {
                eprintln!("mvm-agent: {e}");
            }
        }
    }
    Ok(PortForwarder::bind(&params.ports))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode_from_hex() {
        assert_eq!(unhex("00ff10"), Some(vec![0, 0xff, 0x10]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }
}
