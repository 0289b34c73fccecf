//! Namespaces: the clone that creates the container's first process in new mount, PID, UTS,
//! IPC and (optionally) network namespaces, and the few settings made inside them.
//!
//! The functions used in the new process ([`set_hostname`], [`loopback_up`]) make plain
//! system calls and do not allocate: the clone may have been made from a multi-threaded program.

use std::ffi::CStr;
use std::io;

use super::spec::Network;

/// Namespace flags for `clone`.
pub fn clone_flags(network: Network) -> libc::c_int {
    let mut f = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if network == Network::None {
        f |= libc::CLONE_NEWNET;
    }
    f
}

/// Size of the stack the cloned process starts on (its own copy; untouched pages cost nothing).
const STACK_SIZE: usize = 1 << 20;

/// Starts `child(arg)` in a new process with `flags` namespaces; it gets a copy of this
/// process's memory (no `CLONE_VM`) and sends `SIGCHLD` when it exits. Returns its pid.
///
/// # Safety
/// `child` runs in a copy of this process made while other threads may hold locks: it must
/// only make async-signal-safe calls (no allocation, no locks) until it executes a program.
/// `arg` must point to data that stays valid in the copy (any pointer into this process's
/// memory does).
pub unsafe fn spawn(
    flags: libc::c_int,
    child: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> io::Result<libc::pid_t> {
    // SAFETY: anonymous private mapping; no existing memory is touched.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the top of the mapping just made; the stack grows down from there (16-aligned
    // because the mapping is page aligned and the size a multiple of 16).
    let top = unsafe { stack.cast::<u8>().add(STACK_SIZE) }.cast::<libc::c_void>();
    // SAFETY: the caller guarantees `child` and `arg` are fit for a copied process; the stack
    // is ours and large enough; without CLONE_VM the child runs on its own copy of it.
    let pid = unsafe { libc::clone(child, top, flags | libc::SIGCHLD, arg) };
    let err = io::Error::last_os_error();
    // SAFETY: unmaps only our own mapping; the child has its own copy.
    unsafe { libc::munmap(stack, STACK_SIZE) };
    if pid < 0 {
        return Err(err);
    }
    Ok(pid)
}

/// Sets the hostname of the current UTS namespace. Returns the errno on failure.
pub fn set_hostname(name: &CStr) -> Result<(), i32> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    let r = unsafe { libc::sethostname(name.as_ptr(), name.to_bytes().len()) };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

/// Brings the loopback interface of the current network namespace up. Returns the errno on
/// failure.
pub fn loopback_up() -> Result<(), i32> {
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of a valid ifreq.
    let mut r = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
    if r == 0 {
        // SAFETY: the kernel filled ifru_flags; reading and setting the union's flags member.
        unsafe {
            req.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
        }
        // SAFETY: SIOCSIFFLAGS reads a valid ifreq.
        r = unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) };
    }
    let e = errno();
    // SAFETY: closing the socket made above.
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(e);
    }
    Ok(())
}

/// The calling thread's errno.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_none_adds_a_network_namespace() {
        assert_ne!(clone_flags(Network::None) & libc::CLONE_NEWNET, 0);
        assert_eq!(clone_flags(Network::Host) & libc::CLONE_NEWNET, 0);
        for f in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
        ] {
            assert_ne!(clone_flags(Network::Host) & f, 0);
        }
    }
}
