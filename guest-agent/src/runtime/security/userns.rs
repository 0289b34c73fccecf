//! `--userns`: the container's ids as an unprivileged range of host ids.
//!
//! Container uid 0 is host uid `host_uid`, container uid 1 is `host_uid + 1`, and so on for
//! `size` ids (the same for gids). Files the container creates in its writable layer are owned
//! by those host ids, so a setuid-root file it leaves behind is setuid to an unprivileged host
//! user. The range comes from `/etc/subuid` and `/etc/subgid` (the entry for `root`) with
//! `--userns auto`, else [`DEFAULT_START`] and [`DEFAULT_SIZE`].
//!
//! How: the runtime makes the user namespace first ([`create`], held by a descriptor), the
//! container's first process builds its mounts as host root, with the image's layers mounted
//! id-mapped through that namespace (files owned by host root appear owned by container root),
//! then joins the namespace before it switches user. Its other namespaces stay owned by the
//! host's user namespace, so container root cannot mount, change the network or set the
//! hostname even with `--cap-add`; ports below 1024 are opened to it in its own network
//! namespace (`--network none`). A writable `Rootfs::Dir` is refused: writes through an
//! id-mapped mount would be stored as host root.

use std::os::fd::OwnedFd;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// First host id of the default range (as `useradd` and docker's userns-remap hand out).
pub const DEFAULT_START: u32 = 100_000;
/// Size of the default range: every 16-bit id.
pub const DEFAULT_SIZE: u32 = 65_536;

/// Errors in a `--userns` value.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    /// The value does not parse.
    #[error("--userns {0:?}: use host, auto, or HOSTID:SIZE (e.g. 100000:65536)")]
    Bad(String),
    /// Making the user namespace failed.
    #[error("cannot create the container's user namespace ({0})")]
    Create(&'static str, #[source] std::io::Error),
    /// The range includes host root or overflows.
    #[error("--userns: the host range {0}:{1} must start above 0 and end below 4294967295")]
    Range(u32, u32),
}

/// The id mapping of a container in its own user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdMapping {
    /// Host uid of container uid 0.
    pub host_uid: u32,
    /// Host gid of container gid 0.
    pub host_gid: u32,
    /// How many ids are mapped (container ids `0..size`).
    pub size: u32,
}

impl IdMapping {
    /// Parses a `--userns` value: `host` (none), `auto` (the `root` entries of `/etc/subuid`
    /// and `/etc/subgid`, else the default range) or `HOSTID:SIZE`.
    pub fn parse(text: &str) -> Result<Option<IdMapping>, UsernsError> {
        let m = match text {
            "host" | "" => return Ok(None),
            "auto" => IdMapping {
                host_uid: sub_range(Path::new("/etc/subuid")).map_or(DEFAULT_START, |r| r.0),
                host_gid: sub_range(Path::new("/etc/subgid")).map_or(DEFAULT_START, |r| r.0),
                size: match (
                    sub_range(Path::new("/etc/subuid")),
                    sub_range(Path::new("/etc/subgid")),
                ) {
                    (Some(u), Some(g)) => u.1.min(g.1),
                    _ => DEFAULT_SIZE,
                },
            },
            _ => {
                let bad = || UsernsError::Bad(text.to_string());
                let (start, size) = text.split_once(':').ok_or_else(bad)?;
                let start: u32 = start.parse().map_err(|_| bad())?;
                IdMapping {
                    host_uid: start,
                    host_gid: start,
                    size: size.parse().map_err(|_| bad())?,
                }
            }
        };
        m.check()?;
        Ok(Some(m))
    }

    /// The range starts above host root, is not empty and fits in 32 bits.
    pub fn check(&self) -> Result<(), UsernsError> {
        for start in [self.host_uid, self.host_gid] {
            let ok = start > 0
                && self.size > 0
                && start
                    .checked_add(self.size)
                    .is_some_and(|end| end < u32::MAX);
            if !ok {
                return Err(UsernsError::Range(start, self.size));
            }
        }
        Ok(())
    }

    /// The `uid_map` line.
    pub fn uid_map(&self) -> String {
        format!("0 {} {}\n", self.host_uid, self.size)
    }

    /// The `gid_map` line.
    pub fn gid_map(&self) -> String {
        format!("0 {} {}\n", self.host_gid, self.size)
    }
}

/// The helper that holds a new user namespace until the runtime has opened it, then is killed.
extern "C" fn hold(_: *mut libc::c_void) -> libc::c_int {
    // SAFETY: prctl with integer arguments: the helper never outlives the runtime.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    loop {
        // SAFETY: waits for a signal; no memory is touched.
        unsafe { libc::pause() };
    }
}

/// Makes a user namespace with `m` and returns a descriptor for it.
pub(crate) fn create(m: &IdMapping) -> Result<OwnedFd, UsernsError> {
    let os = |what| move |e| UsernsError::Create(what, e);
    // SAFETY: `hold` only waits for signals.
    let pid =
        unsafe { super::super::namespaces::spawn(libc::CLONE_NEWUSER, hold, std::ptr::null_mut()) }
            .map_err(os("clone"))?;
    let result = (|| {
        std::fs::write(format!("/proc/{pid}/uid_map"), m.uid_map()).map_err(os("uid_map"))?;
        std::fs::write(format!("/proc/{pid}/gid_map"), m.gid_map()).map_err(os("gid_map"))?;
        std::fs::File::open(format!("/proc/{pid}/ns/user"))
            .map(OwnedFd::from)
            .map_err(os("open"))
    })();
    let mut status = 0;
    // SAFETY: kills and reaps the helper, our own child; the descriptor keeps the namespace.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, &mut status, libc::__WALL);
    }
    result
}

/// The first range for `root` (or uid 0) in a subuid/subgid file: (start, size).
pub fn sub_range(path: &Path) -> Option<(u32, u32)> {
    parse_sub(&std::fs::read_to_string(path).ok()?)
}

fn parse_sub(text: &str) -> Option<(u32, u32)> {
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let (who, start, size) = (f.next()?, f.next()?, f.next()?);
        if who != "root" && who != "0" {
            return None;
        }
        let (start, size) = (start.parse().ok()?, size.parse().ok()?);
        (start > 0 && size > 0).then_some((start, size))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_ranges_parse_and_host_means_none() {
        assert!(matches!(IdMapping::parse("host"), Ok(None)));
        let m = IdMapping::parse("200000:1000")
            .expect("valid")
            .expect("some");
        assert_eq!((m.host_uid, m.host_gid, m.size), (200_000, 200_000, 1000));
        assert_eq!(m.uid_map(), "0 200000 1000\n");
    }

    #[test]
    fn ranges_that_reach_host_root_or_overflow_are_refused() {
        for bad in [
            "0:65536",
            "100000:0",
            "4294967000:65536",
            "x:1",
            "100000",
            "1:2:3",
        ] {
            assert!(IdMapping::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn auto_takes_roots_subuid_entry_or_the_default() {
        assert_eq!(
            parse_sub("alice:100000:65536\nroot:231072:65536\n"),
            Some((231_072, 65_536))
        );
        assert_eq!(parse_sub("alice:100000:65536\n"), None);
        let m = IdMapping::parse("auto").expect("auto").expect("some");
        assert!(m.host_uid > 0 && m.size > 0);
    }

    #[test]
    fn a_created_namespace_maps_root_to_the_range() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: writing an id map needs root");
            return;
        }
        let m = IdMapping {
            host_uid: 300_000,
            host_gid: 300_000,
            size: 1000,
        };
        let fd = create(&m).expect("create");
        let link = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .expect("readlink");
        assert!(link.to_string_lossy().starts_with("user:["), "{link:?}");
    }
}
