//! The container's filesystem view, built inside its new mount namespace: the root (an overlay
//! or a bind-mounted directory), `/proc`, a read-only `/sys`, a small `/dev` on tmpfs with the
//! usual device nodes, `/dev/pts` (a new instance), `/dev/shm`, volumes, docker's masked and
//! read-only paths, then `pivot_root` into it. Every mount but `/dev` (and `/dev/pts` in it) is
//! `nodev`: a device node in the image or a volume cannot be opened.
//!
//! Everything here runs in the freshly cloned process and therefore only makes system calls on
//! prepared C strings or literals: no allocation (see `namespaces::spawn`). All mounts live and
//! die with the mount namespace; the first step makes every mount private so that nothing made
//! here can propagate back to the host.

use std::ffi::{CStr, CString};

use super::namespaces::errno;
use super::security::paths;
use super::step::{trace, Fail, Step};

/// How the root filesystem is mounted, prepared by the parent.
#[derive(Debug)]
pub(crate) enum RootMount {
    /// Bind `path` onto itself (optionally read-only) and use it as the root.
    Bind { path: CString, readonly: bool },
    /// Mount an overlay with `options` on `target` (the topmost lower directory: it is covered
    /// only inside the container's mount namespace).
    Overlay { options: CString, target: CString },
}

impl RootMount {
    /// Builds the overlay mount options; paths were validated (absolute, no `:` or `,`).
    pub(crate) fn overlay(
        lower: &[std::path::PathBuf],
        upper: &std::path::Path,
        work: &std::path::Path,
    ) -> Option<RootMount> {
        let lowers: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowers.join(":"),
            upper.display(),
            work.display()
        );
        Some(RootMount::Overlay {
            options: CString::new(options).ok()?,
            target: CString::new(lowers.first()?.clone()).ok()?,
        })
    }
}

fn check(r: libc::c_int, step: Step) -> Result<(), Fail> {
    if r < 0 {
        Err(Fail {
            step,
            errno: errno(),
        })
    } else {
        Ok(())
    }
}

fn mount(
    src: &CStr,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
    step: Step,
) -> Result<(), Fail> {
    trace(step);
    // SAFETY: all pointers are valid NUL-terminated strings or null, as mount(2) expects.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.map_or(std::ptr::null(), CStr::as_ptr),
            flags,
            data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    check(r, step)
}

/// mkdir that accepts an existing directory.
fn mkdir(path: &CStr, mode: libc::mode_t, step: Step) -> Result<(), Fail> {
    // SAFETY: path is a valid C string.
    if unsafe { libc::mkdir(path.as_ptr(), mode) } < 0 && errno() != libc::EEXIST {
        return Err(Fail {
            step,
            errno: errno(),
        });
    }
    Ok(())
}

/// Creates `path` and its missing parents (mode 0755), without allocating.
pub(crate) fn mkdir_p(path: &CStr) -> Result<(), i32> {
    let bytes = path.to_bytes();
    let mut buf = [0u8; 4096];
    if bytes.len() >= buf.len() {
        return Err(libc::ENAMETOOLONG);
    }
    buf[..bytes.len()].copy_from_slice(bytes);
    for i in 1..=bytes.len() {
        if i == bytes.len() || buf[i] == b'/' {
            let saved = buf[i];
            buf[i] = 0;
            // SAFETY: buf holds a NUL-terminated prefix of the path.
            let r = unsafe { libc::mkdir(buf.as_ptr().cast(), 0o755) };
            if r < 0 && errno() != libc::EEXIST {
                return Err(errno());
            }
            buf[i] = saved;
        }
    }
    Ok(())
}

/// Character devices every container gets: (path in the new root, host path, major, minor).
const DEVICES: [(&CStr, &CStr, u32, u32); 6] = [
    (c"dev/null", c"/dev/null", 1, 3),
    (c"dev/zero", c"/dev/zero", 1, 5),
    (c"dev/full", c"/dev/full", 1, 7),
    (c"dev/random", c"/dev/random", 1, 8),
    (c"dev/urandom", c"/dev/urandom", 1, 9),
    (c"dev/tty", c"/dev/tty", 5, 0),
];

/// Symlinks in `/dev`: (link, target).
const DEV_LINKS: [(&CStr, &CStr); 5] = [
    (c"dev/ptmx", c"pts/ptmx"),
    (c"dev/fd", c"/proc/self/fd"),
    (c"dev/stdin", c"/proc/self/fd/0"),
    (c"dev/stdout", c"/proc/self/fd/1"),
    (c"dev/stderr", c"/proc/self/fd/2"),
];

/// Makes docker's read-only paths read-only and hides its masked paths (see
/// [`paths`]). Paths this kernel does not have are skipped.
fn protect_paths() -> Result<(), Fail> {
    let ro = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for p in paths::READ_ONLY {
        match mount(p, p, None, libc::MS_BIND | libc::MS_REC, None, Step::Proc) {
            Err(f) if f.errno == libc::ENOENT => continue,
            r => r?,
        }
        mount(
            p,
            p,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | ro,
            None,
            Step::Proc,
        )?;
    }
    for p in paths::MASKED {
        // SAFETY: all-zero is a valid stat buffer; `p` is a valid C string.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; lstat writes into `st`.
        if unsafe { libc::lstat(p.as_ptr(), &raw mut st) } < 0 {
            if errno() == libc::ENOENT {
                continue;
            }
            return Err(Fail {
                step: Step::Proc,
                errno: errno(),
            });
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            mount(c"tmpfs", p, Some(c"tmpfs"), ro, None, Step::Proc)?;
        } else {
            mount(c"dev/null", p, None, libc::MS_BIND, None, Step::Proc)?;
        }
    }
    Ok(())
}

/// Remounts the bind mount at `path` with `flags` added to the ones it has (nodev, read-only).
fn remount_bind(path: &CStr, flags: libc::c_ulong, step: Step) -> Result<(), Fail> {
    // SAFETY: all-zero is a valid statvfs buffer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string; statvfs writes into `st`.
    check(unsafe { libc::statvfs(path.as_ptr(), &raw mut st) }, step)?;
    let mut keep = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
    ] {
        if st.f_flag & st_flag != 0 {
            keep |= ms_flag;
        }
    }
    mount(
        c"none",
        path,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | keep | flags,
        None,
        step,
    )
}

/// Makes one device node; where mknod is not allowed, bind-mounts the host's node instead.
fn make_device(path: &CStr, host: &CStr, major: u32, minor: u32) -> Result<(), Fail> {
    // SAFETY: path is a valid C string; makedev has no preconditions.
    let r = unsafe {
        libc::mknod(
            path.as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(major, minor),
        )
    };
    if r == 0 {
        // mknod's mode is filtered by the umask: set it exactly.
        // SAFETY: path is a valid C string.
        return check(unsafe { libc::chmod(path.as_ptr(), 0o666) }, Step::Devices);
    }
    if errno() != libc::EPERM {
        return Err(Fail {
            step: Step::Devices,
            errno: errno(),
        });
    }
    // SAFETY: path is a valid C string; the new file is closed at once.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o666,
        )
    };
    check(fd, Step::Devices)?;
    // SAFETY: fd was just opened.
    unsafe { libc::close(fd) };
    mount(host, path, None, libc::MS_BIND, None, Step::Devices)
}

/// A bind mount prepared by the parent: `source` (absolute, outside the container) onto
/// `target`, relative to the new root.
#[derive(Debug)]
pub(crate) struct VolumeMount {
    pub source: CString,
    pub target: CString,
    /// The source is a directory (else a file: the mount point is an empty file).
    pub dir: bool,
    pub readonly: bool,
}

impl VolumeMount {
    /// Prepares `m`; its source must exist.
    pub(crate) fn prepare(m: &super::spec::BindMount) -> std::io::Result<VolumeMount> {
        let meta = std::fs::metadata(&m.source)?;
        let nul = |_| std::io::Error::from(std::io::ErrorKind::InvalidInput);
        Ok(VolumeMount {
            source: CString::new(m.source.as_os_str().as_encoded_bytes()).map_err(nul)?,
            target: CString::new(m.target.trim_start_matches('/')).map_err(nul)?,
            dir: meta.is_dir(),
            readonly: m.readonly,
        })
    }
}

/// Creates the mount point `target` (relative to the current directory, the new root) one
/// component at a time, refusing symlinks: the image must not redirect a volume out of its root.
fn volume_mount_point(target: &CStr, dir: bool) -> Result<(), Fail> {
    let bytes = target.to_bytes();
    let mut buf = [0u8; 4096];
    let fail = |errno| Fail {
        step: Step::Volumes,
        errno,
    };
    if bytes.len() >= buf.len() {
        return Err(fail(libc::ENAMETOOLONG));
    }
    buf[..bytes.len()].copy_from_slice(bytes);
    for i in 1..=bytes.len() {
        if i < bytes.len() && buf[i] != b'/' {
            continue;
        }
        let last = i == bytes.len();
        let saved = buf[i];
        buf[i] = 0;
        // SAFETY: all-zero is a valid stat buffer; buf holds a NUL-terminated prefix.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; lstat writes into st.
        let r = unsafe { libc::lstat(buf.as_ptr().cast(), &raw mut st) };
        if r == 0 {
            if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                return Err(fail(libc::ELOOP));
            }
        } else if errno() != libc::ENOENT {
            return Err(fail(errno()));
        } else if last && !dir {
            // SAFETY: creates an empty file at a NUL-terminated path without following links.
            let fd = unsafe {
                libc::open(
                    buf.as_ptr().cast(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_WRONLY
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd < 0 {
                return Err(fail(errno()));
            }
            // SAFETY: fd was just opened.
            unsafe { libc::close(fd) };
        } else {
            // SAFETY: mkdir on a NUL-terminated path.
            if unsafe { libc::mkdir(buf.as_ptr().cast(), 0o755) } < 0 && errno() != libc::EEXIST {
                return Err(fail(errno()));
            }
        }
        buf[i] = saved;
    }
    Ok(())
}

/// Bind-mounts every volume into the new root (the current directory).
fn mount_volumes(volumes: &[VolumeMount]) -> Result<(), Fail> {
    for v in volumes {
        volume_mount_point(&v.target, v.dir)?;
        mount(
            &v.source,
            &v.target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
            Step::Volumes,
        )?;
        let ro = if v.readonly { libc::MS_RDONLY } else { 0 };
        remount_bind(&v.target, libc::MS_NODEV | ro, Step::Volumes)?;
    }
    Ok(())
}

/// With `--userns`: the image's directories to show id-mapped, and the user namespace whose
/// mapping they get (host root's files then belong to container root).
#[derive(Debug)]
pub(crate) struct IdMapped {
    pub userns_fd: libc::c_int,
    pub paths: Vec<CString>,
    /// Let container root bind ports below 1024 in its own network namespace.
    pub low_ports: bool,
}

/// Replaces the mount at `path` (in this mount namespace) by a copy of it whose file owners are
/// mapped through the user namespace `userns_fd`.
fn idmap_onto(path: &CStr, userns_fd: libc::c_int) -> Result<(), Fail> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    let fail = || Fail {
        step: Step::RootMount,
        errno: errno(),
    };
    trace(Step::RootMount);
    // SAFETY: `path` is a valid C string; the flags ask for a detached copy of its mount.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    let tree = libc::c_int::try_from(tree).map_err(|_| fail())?;
    if tree < 0 {
        return Err(fail());
    }
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::try_from(userns_fd).unwrap_or(u64::MAX),
    };
    // SAFETY: `attr` is a valid mount_attr of the size passed; "" with AT_EMPTY_PATH means
    // the detached mount itself.
    let mut r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &raw const attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r == 0 {
        // SAFETY: moves the detached mount onto `path`, a valid C string.
        r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree,
                c"".as_ptr(),
                libc::AT_FDCWD,
                path.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
    }
    let result = if r < 0 { Err(fail()) } else { Ok(()) };
    // SAFETY: closes the descriptor open_tree returned.
    unsafe { libc::close(tree) };
    result
}

/// Builds the root and pivots into it. Runs in the container's first process, inside its new
/// mount (and PID) namespace.
pub(crate) fn enter_rootfs(
    root: &RootMount,
    volumes: &[VolumeMount],
    idmapped: Option<&IdMapped>,
) -> Result<(), Fail> {
    // Nothing below may reach the host: make every mount private first.
    mount(
        c"none",
        c"/",
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        Step::MakePrivate,
    )?;
    if let Some(m) = idmapped {
        for p in &m.paths {
            idmap_onto(p, m.userns_fd)?;
        }
    }
    let (target, readonly) = match root {
        RootMount::Overlay { options, target } => {
            mount(
                c"overlay",
                target,
                Some(c"overlay"),
                libc::MS_NODEV,
                Some(options),
                Step::RootMount,
            )?;
            (target.as_c_str(), false)
        }
        RootMount::Bind { path, readonly } => {
            mount(
                path,
                path,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
                Step::RootMount,
            )?;
            remount_bind(path, libc::MS_NODEV, Step::RootMount)?;
            (path.as_c_str(), *readonly)
        }
    };
    // SAFETY: target is a valid C string.
    check(unsafe { libc::chdir(target.as_ptr()) }, Step::RootMount)?;

    let nodev_nosuid_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mkdir(c"proc", 0o555, Step::Proc)?;
    mount(
        c"proc",
        c"proc",
        Some(c"proc"),
        nodev_nosuid_noexec,
        None,
        Step::Proc,
    )?;
    mkdir(c"sys", 0o555, Step::Sys)?;
    mount(
        c"sysfs",
        c"sys",
        Some(c"sysfs"),
        nodev_nosuid_noexec | libc::MS_RDONLY,
        None,
        Step::Sys,
    )?;
    mkdir(c"dev", 0o755, Step::Dev)?;
    mount(
        c"tmpfs",
        c"dev",
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        Some(c"mode=755,size=65536k"),
        Step::Dev,
    )?;
    for (path, host, major, minor) in DEVICES {
        make_device(path, host, major, minor)?;
    }
    mkdir(c"dev/pts", 0o755, Step::DevPts)?;
    mount(
        c"devpts",
        c"dev/pts",
        Some(c"devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(c"newinstance,ptmxmode=0666,mode=0620,gid=5"),
        Step::DevPts,
    )?;
    mkdir(c"dev/shm", 0o1777, Step::DevShm)?;
    mount(
        c"shm",
        c"dev/shm",
        Some(c"tmpfs"),
        nodev_nosuid_noexec,
        Some(c"mode=1777,size=65536k"),
        Step::DevShm,
    )?;
    for (link, to) in DEV_LINKS {
        // SAFETY: both are valid C strings.
        let r = unsafe { libc::symlink(to.as_ptr(), link.as_ptr()) };
        check(r, Step::Dev)?;
    }
    mount_volumes(volumes)?;
    if idmapped.is_some_and(|m| m.low_ports) {
        // Container root is not privileged in the network namespace (the host's user namespace
        // owns it): let it bind ports below 1024 there, as it may with docker.
        let path = c"proc/sys/net/ipv4/ip_unprivileged_port_start";
        // SAFETY: valid C string; the file is closed right after the write.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        check(fd, Step::Loopback)?;
        // SAFETY: writes one byte from a literal to the descriptor just opened.
        let n = unsafe { libc::write(fd, c"0".as_ptr().cast(), 1) };
        // SAFETY: closes it.
        unsafe { libc::close(fd) };
        check(i32::try_from(n).unwrap_or(-1), Step::Loopback)?;
    }
    protect_paths()?;
    if readonly {
        remount_bind(c".", libc::MS_RDONLY, Step::RootMount)?;
    }
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves the
    // new root alone (the method runc uses, no put_old directory needed).
    trace(Step::PivotRoot);
    // SAFETY: both arguments are valid C strings.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    if r < 0 {
        let e = errno();
        if e != libc::EINVAL {
            return Err(Fail {
                step: Step::PivotRoot,
                errno: e,
            });
        }
        // The current root is the initial ramfs (the guest agent as PID 1), which cannot be
        // pivoted away: move the new root over `/` and chroot into it instead, as
        // switch_root does. The old root stays reachable only to this mount namespace's root
        // user through its open descriptors, and the container holds none.
        // SAFETY: valid C strings; null fstype and data are allowed for MS_MOVE.
        let r = unsafe {
            libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            )
        };
        check(r, Step::PivotRoot)?;
        // SAFETY: valid C string.
        check(unsafe { libc::chroot(c".".as_ptr()) }, Step::PivotRoot)?;
        // SAFETY: valid C string.
        return check(unsafe { libc::chdir(c"/".as_ptr()) }, Step::PivotRoot);
    }
    // SAFETY: valid C string.
    let r = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
    check(r, Step::PivotRoot)?;
    // SAFETY: valid C string.
    check(unsafe { libc::chdir(c"/".as_ptr()) }, Step::PivotRoot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_list_lowers_topmost_first() {
        let m = RootMount::overlay(
            &["/l/top".into(), "/l/base".into()],
            "/c/upper".as_ref(),
            "/c/work".as_ref(),
        )
        .expect("options");
        match m {
            RootMount::Overlay { options, target } => {
                assert_eq!(
                    options.to_str().expect("utf8"),
                    "lowerdir=/l/top:/l/base,upperdir=/c/upper,workdir=/c/work"
                );
                assert_eq!(target.to_str().expect("utf8"), "/l/top");
            }
            RootMount::Bind { .. } => panic!("expected an overlay"),
        }
    }

    #[test]
    fn mkdir_p_creates_parents() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a/b/c");
        let c = CString::new(p.to_str().expect("utf8")).expect("cstring");
        mkdir_p(&c).expect("mkdir -p");
        assert!(p.is_dir());
        mkdir_p(&c).expect("again is fine");
    }
}
