//! Adding a host directory tree to an initramfs.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::{Initramfs, InitramfsError};

impl Initramfs {
    /// Adds everything below the host directory `host` (not following symlinks), under the
    /// archive directory `prefix` ("" for the root), in name order, keeping permission bits,
    /// link targets and device numbers. Owners are not kept: everything belongs to root.
    pub fn add_host_dir(
        &mut self,
        host: impl AsRef<Path>,
        prefix: &str,
    ) -> Result<&mut Self, InitramfsError> {
        let host = host.as_ref();
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            let mode = fs::metadata(host)
                .map_err(|source| InitramfsError::ReadHost {
                    path: host.to_path_buf(),
                    source,
                })?
                .mode();
            self.dir(prefix, mode)?;
        }
        self.add_dir_children(host, prefix)?;
        Ok(self)
    }

    fn add_dir_children(&mut self, host: &Path, prefix: &str) -> Result<(), InitramfsError> {
        let read_err = |source| InitramfsError::ReadHost {
            path: host.to_path_buf(),
            source,
        };
        let mut children = fs::read_dir(host)
            .map_err(read_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err)?;
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let host_path = child.path();
            let name = child.file_name();
            let Some(name) = name.to_str() else {
                return Err(InitramfsError::InvalidPath {
                    path: name.to_string_lossy().into_owned(),
                    reason: "file names must be UTF-8",
                });
            };
            let path = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}/{name}")
            };
            let meta =
                fs::symlink_metadata(&host_path).map_err(|source| InitramfsError::ReadHost {
                    path: host_path.clone(),
                    source,
                })?;
            let ft = meta.file_type();
            let mode = meta.mode();
            let (major, minor) = split_dev(meta.rdev());
            if ft.is_dir() {
                self.dir(&path, mode)?;
                self.add_dir_children(&host_path, &path)?;
            } else if ft.is_file() {
                self.host_file(&path, mode, &host_path)?;
            } else if ft.is_symlink() {
                let target =
                    fs::read_link(&host_path).map_err(|source| InitramfsError::ReadHost {
                        path: host_path.clone(),
                        source,
                    })?;
                let Some(target) = target.to_str() else {
                    return Err(InitramfsError::InvalidPath {
                        path,
                        reason: "link targets must be UTF-8",
                    });
                };
                self.symlink(&path, target)?;
            } else if ft.is_char_device() {
                self.char_dev(&path, mode, major, minor)?;
            } else if ft.is_block_device() {
                self.block_dev(&path, mode, major, minor)?;
            } else if ft.is_fifo() {
                self.fifo(&path, mode)?;
            } else {
                return Err(InitramfsError::Unsupported(host_path));
            }
        }
        Ok(())
    }
}

/// Splits a Linux `dev_t` into (major, minor), as glibc's `major()`/`minor()` do.
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (
        u32::try_from(major).unwrap_or(u32::MAX),
        u32::try_from(minor).unwrap_or(u32::MAX),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::tests::{archive, cpio};
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    #[test]
    fn host_dir_round_trips_through_cpio() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::create_dir_all(s.join("sbin")).unwrap();
        fs::create_dir_all(s.join("etc/empty.d")).unwrap();
        fs::write(s.join("sbin/agent"), vec![0xabu8; 10_001]).unwrap();
        fs::set_permissions(s.join("sbin/agent"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(s.join("etc/motd"), "hello\n").unwrap();
        std::os::unix::fs::symlink("sbin/agent", s.join("init")).unwrap();

        let mut c = Initramfs::new();
        c.add_host_dir(s, "")
            .unwrap()
            .char_dev("dev/console", 0o600, 5, 1)
            .unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        let written = c.write_file(file.path()).unwrap();
        let bytes = fs::read(file.path()).unwrap();
        assert_eq!(written, bytes.len() as u64);

        let dst = tempfile::tempdir().unwrap();
        let listing = cpio(&bytes, &["-t"], dst.path());
        assert_eq!(
            listing.lines().collect::<Vec<_>>(),
            [
                "etc",
                "etc/empty.d",
                "etc/motd",
                "init",
                "sbin",
                "sbin/agent",
                "dev",
                "dev/console"
            ]
        );
        cpio(
            &bytes,
            &[
                "-i",
                "-d",
                "--no-absolute-filenames",
                "--nonmatching",
                "dev/console",
            ],
            dst.path(),
        );
        let d = dst.path();
        assert_eq!(
            fs::read(d.join("sbin/agent")).unwrap(),
            vec![0xabu8; 10_001]
        );
        let mode = fs::metadata(d.join("sbin/agent"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            fs::read_link(d.join("init")).unwrap(),
            Path::new("sbin/agent")
        );
        assert_eq!(fs::read_to_string(d.join("etc/motd")).unwrap(), "hello\n");
        assert!(d.join("etc/empty.d").is_dir());
    }

    #[test]
    fn host_dir_under_a_prefix() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("x"), "x").unwrap();
        let mut c = Initramfs::new();
        c.add_host_dir(src.path(), "/opt/tool/").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let listing = cpio(&archive(&c), &["-t"], tmp.path());
        assert_eq!(
            listing.lines().collect::<Vec<_>>(),
            ["opt", "opt/tool", "opt/tool/x"]
        );
    }

    #[test]
    fn dev_numbers_split_like_glibc() {
        // makedev(5, 1) and makedev(259, 0x12345) as glibc encodes them.
        assert_eq!(split_dev(0x0501), (5, 1));
        let dev = (259u64 << 8) | 0x45 | ((0x12345u64 & !0xff) << 12);
        assert_eq!(split_dev(dev), (259, 0x12345));
    }
}
