//! mvm's root directory (`/var/lib/mvm`, or `--root`) is root-only: it holds unpacked image
//! layers (setuid binaries, files with capabilities), container layers, disk images, logs and
//! sockets, none of which another host user may reach. (For an unprivileged mvm, "root" is the
//! user running it.)
//!
//! The modes are data, in one place: [`DIRS`] for the directories mvm keeps, [`PRIVATE_DIR`] and
//! [`PRIVATE_FILE`] for what it creates below them. 0710 (as Docker's `/var/lib/docker`) is used
//! where a path must stay traversable for a group (a remapped container root, later); everything
//! else is 0700 and files are 0600.
//!
//! Directories are created with their mode: `mkdir(2)` under the process umask can only remove
//! bits, and a bit the umask removed that the table wants is added back afterwards, so none is
//! ever more open than its final mode. [`prepare_root`] runs before anything under the root is
//! used: it creates what is missing, tightens what an older mvm created wider (0755), and refuses,
//! with one line, a root or directory that another user owns or may write to.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of the root directory itself.
pub const ROOT_MODE: u32 = 0o710;
/// Mode of every other directory mvm creates under its root.
pub const PRIVATE_DIR: u32 = 0o700;
/// Mode of every file mvm creates under its root (disk images, logs, records, blobs).
pub const PRIVATE_FILE: u32 = 0o600;

/// The directories mvm keeps under its root (relative paths; `""` is the root) and their modes,
/// parents first. Other code names the same paths (`cache/rootfs` for unpacked images,
/// `cache/disks` for their disk images, `containers` for the state store).
pub const DIRS: &[(&str, u32)] = &[
    ("", ROOT_MODE),
    ("images", PRIVATE_DIR),
    ("images/blobs", PRIVATE_DIR),
    ("images/blobs/sha256", PRIVATE_DIR),
    ("images/tmp", PRIVATE_DIR),
    ("cache", 0o710),
    ("cache/rootfs", 0o710),
    ("cache/disks", PRIVATE_DIR),
    ("containers", 0o710),
];

/// A root directory mvm cannot use safely.
#[derive(Debug, thiserror::Error)]
pub enum RootDirError {
    /// Creating or inspecting a directory failed.
    #[error("cannot {what} {}", .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another user owns it.
    #[error(
        "{} is owned by uid {owner}, not by this user (uid {me}): mvm keeps root-only data \
         there; use a directory of your own (--root DIR)",
        .path.display()
    )]
    Owner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The effective uid of this process.
        me: u32,
    },
    /// Other users may write to it.
    #[error(
        "{} is writable by other users (mode {mode:04o}): make it {want:04o} (chmod {want:o} \
         {}) or use another --root",
        .path.display(), .path.display()
    )]
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its mode.
        mode: u32,
        /// The mode mvm wants.
        want: u32,
    },
    /// It is not a directory.
    #[error("{} is not a directory", .0.display())]
    NotDir(PathBuf),
}

/// Creates (where missing) and checks the root and every directory of [`DIRS`] under it.
pub fn prepare_root(root: &Path) -> Result<(), RootDirError> {
    if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
        // Above the root is not mvm's: created as any directory would be.
        fs::create_dir_all(parent).map_err(|source| RootDirError::Io {
            what: "create",
            path: parent.to_path_buf(),
            source,
        })?;
    }
    for (rel, mode) in DIRS {
        let path = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        create_dir(&path, *mode)?;
        check_dir(&path, *mode)?;
    }
    Ok(())
}

/// Creates the directory `path` with exactly `mode` (an existing one is left as it is).
pub fn create_dir(path: &Path, mode: u32) -> Result<(), RootDirError> {
    let err = |what| {
        move |source| RootDirError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    match DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(err("create")(e)),
    }
    let got = fs::symlink_metadata(path).map_err(err("inspect"))?.mode() & 0o7777;
    if got != mode {
        // The umask removed bits the mode wants: add exactly those back.
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(err("set the mode of"))?;
    }
    Ok(())
}

/// Creates `path` and its missing parents, each with `mode` (see [`create_dir`]).
pub fn create_dir_all(path: &Path, mode: u32) -> Result<(), RootDirError> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all(parent, mode)?;
    }
    create_dir(path, mode)
}

/// Checks that `path` is a directory this user owns and nobody else may write to, and takes away
/// what `mode` does not grant (an older mvm made its directories 0755).
pub fn check_dir(path: &Path, mode: u32) -> Result<(), RootDirError> {
    let meta = fs::metadata(path).map_err(|source| RootDirError::Io {
        what: "inspect",
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(RootDirError::NotDir(path.to_path_buf()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(RootDirError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let got = meta.mode() & 0o7777;
    if got & 0o022 != 0 {
        return Err(RootDirError::Writable {
            path: path.to_path_buf(),
            mode: got,
            want: mode,
        });
    }
    if got & !mode != 0 {
        let tight = got & mode;
        log::info!(
            "tightening {} from {got:04o} to {tight:04o}",
            path.display()
        );
        fs::set_permissions(path, fs::Permissions::from_mode(tight)).map_err(|source| {
            RootDirError::Io {
                what: "set the mode of",
                path: path.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Options that create a file readable and writable by its owner only ([`PRIVATE_FILE`]).
pub fn private_file() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(PRIVATE_FILE);
    o
}

/// Creates (or truncates) `path` as a private file for writing.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_new_root_gets_the_modes_of_the_table() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b/root");
        prepare_root(&root).unwrap();
        for (rel, want) in DIRS {
            assert_eq!(mode(&root.join(rel)), *want, "{rel:?}");
        }
        // Twice is the same.
        prepare_root(&root).unwrap();
        assert_eq!(mode(&root), ROOT_MODE);
    }

    #[test]
    fn wide_directories_of_this_user_are_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("cache/rootfs")).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root.join("cache/rootfs"), fs::Permissions::from_mode(0o755)).unwrap();
        prepare_root(&root).unwrap();
        assert_eq!(mode(&root), 0o710);
        assert_eq!(mode(&root.join("cache/rootfs")), 0o710);
        // Narrower than the table is left alone.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        prepare_root(&root).unwrap();
        assert_eq!(mode(&root), 0o700);
    }

    #[test]
    fn a_root_others_may_write_to_is_refused_with_one_line() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_root(&root).unwrap_err();
        assert!(
            matches!(err, RootDirError::Writable { mode: 0o777, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(!msg.contains('\n') && msg.contains("chmod 710"), "{msg}");
        assert!(!root.join("images").exists(), "nothing created under it");
        // A writable subdirectory too.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir(root.join("cache")).unwrap();
        fs::set_permissions(root.join("cache"), fs::Permissions::from_mode(0o773)).unwrap();
        assert!(matches!(
            prepare_root(&root),
            Err(RootDirError::Writable { .. })
        ));
    }

    #[test]
    fn a_root_owned_by_another_user_is_refused() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping: needs root to give a directory away");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir(&root).unwrap();
        std::os::unix::fs::chown(&root, Some(65534), Some(65534)).unwrap();
        let err = prepare_root(&root).unwrap_err();
        assert!(
            matches!(err, RootDirError::Owner { owner: 65534, .. }),
            "{err}"
        );
    }

    #[test]
    fn private_files_and_dirs_get_their_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("x/y");
        create_dir_all(&d, PRIVATE_DIR).unwrap();
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&tmp.path().join("x")), 0o700);
        let f = tmp.path().join("f");
        create_private_file(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
    }
}
