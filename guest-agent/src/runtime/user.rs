//! Resolves a container's `user` (`uid`, `uid:gid`, `name`, `name:group`) against the root
//! filesystem's `/etc/passwd` and `/etc/group`, as Docker does.

use std::path::{Path, PathBuf};

/// Errors resolving a container user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The user name is not in the root filesystem's `/etc/passwd`.
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    /// The group name is not in the root filesystem's `/etc/group`.
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
    /// Reading a passwd or group file failed.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
}

/// The identity the container's process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (the primary group included).
    pub groups: Vec<u32>,
    /// Home directory from `/etc/passwd`, if the user is listed there.
    pub home: Option<String>,
}

impl Identity {
    /// Root, with `/root` as home.
    pub fn root() -> Self {
        Identity {
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: Some("/root".into()),
        }
    }
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect(),
            })
        })
        .collect()
}

/// Reads `rel` (e.g. `etc/passwd`) from the first of `dirs` that has it (an overlay's topmost
/// layer wins). A missing file reads as empty. Symlinks are not followed out of the rootfs:
/// a symlinked passwd file reads as empty.
fn read_layered(dirs: &[PathBuf], rel: &str) -> Result<String, UserError> {
    for d in dirs {
        let p = d.join(rel);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_file() => {
                return std::fs::read_to_string(&p).map_err(|e| UserError::Read(p, e));
            }
            Ok(_) => return Ok(String::new()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(UserError::Read(p, e)),
        }
    }
    Ok(String::new())
}

/// Resolves `user` against the passwd and group files found in `dirs` (topmost first).
pub fn resolve(user: Option<&str>, dirs: &[PathBuf]) -> Result<Identity, UserError> {
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return Ok(Identity::root());
    };
    let passwd = parse_passwd(&read_layered(dirs, "etc/passwd")?);
    let groups = parse_group(&read_layered(dirs, "etc/group")?);
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entry = match u.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|p| p.uid == uid),
        Err(_) => Some(
            passwd
                .iter()
                .find(|p| p.name == u)
                .ok_or_else(|| UserError::UnknownUser(u.to_string()))?,
        ),
    };
    let uid = match entry {
        Some(p) => p.uid,
        None => u.parse().unwrap_or(0),
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                groups
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?
                    .gid
            }
        },
        None => entry.map_or(0, |p| p.gid),
    };
    let mut supplementary = vec![gid];
    if let Some(p) = entry {
        for e in &groups {
            if e.members.contains(&p.name) && !supplementary.contains(&e.gid) {
                supplementary.push(e.gid);
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups: supplementary,
        home: entry.map(|p| p.home.clone()),
    })
}

/// Convenience for a single directory root.
pub fn resolve_in(user: Option<&str>, root: &Path) -> Result<Identity, UserError> {
    resolve(user, &[root.to_path_buf()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(d.path().join("etc")).expect("mkdir");
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33:www:/var/www:/bin/false\n\
             app:x:1000:1000::/home/app:/bin/sh\nbroken line\n",
        )
        .expect("write");
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\nwww:x:33:\napp:x:1000:\nvideo:x:44:app,www\n",
        )
        .expect("write");
        d
    }

    #[test]
    fn no_user_is_root() {
        assert_eq!(resolve(None, &[]).expect("root"), Identity::root());
    }

    #[test]
    fn names_resolve_through_passwd_and_group() {
        let d = rootfs();
        let id = resolve_in(Some("app"), d.path()).expect("app");
        assert_eq!((id.uid, id.gid), (1000, 1000));
        assert_eq!(id.groups, [1000, 44]);
        assert_eq!(id.home.as_deref(), Some("/home/app"));
        let id = resolve_in(Some("www:video"), d.path()).expect("www:video");
        assert_eq!((id.uid, id.gid), (33, 44));
    }

    #[test]
    fn numeric_ids_need_no_passwd_entry() {
        let d = rootfs();
        let id = resolve_in(Some("4242:77"), d.path()).expect("numeric");
        assert_eq!((id.uid, id.gid, id.home), (4242, 77, None));
        let id = resolve_in(Some("33"), d.path()).expect("33");
        assert_eq!((id.uid, id.gid), (33, 33));
        let id = resolve_in(Some("4242"), d.path()).expect("unlisted");
        assert_eq!((id.uid, id.gid), (4242, 0));
    }

    #[test]
    fn unknown_names_are_errors() {
        let d = rootfs();
        assert!(matches!(
            resolve_in(Some("nobody"), d.path()),
            Err(UserError::UnknownUser(_))
        ));
        assert!(matches!(
            resolve_in(Some("app:nogroup"), d.path()),
            Err(UserError::UnknownGroup(_))
        ));
    }

    #[test]
    fn upper_layer_passwd_wins() {
        let lower = rootfs();
        let upper = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(upper.path().join("etc")).expect("mkdir");
        std::fs::write(
            upper.path().join("etc/passwd"),
            "app:x:2000:2000::/a:/bin/sh\n",
        )
        .expect("write");
        let id = resolve(
            Some("app"),
            &[upper.path().to_path_buf(), lower.path().to_path_buf()],
        )
        .expect("app");
        assert_eq!(id.uid, 2000);
    }
}
