//! Example OCI images built from Debian packages, offline except for Debian's package mirror.
//!
//! - `busybox`: `busybox-static`'s `/bin/busybox` plus a symlink per applet, `Cmd ["sh"]`.
//! - `nginx`: Debian's `nginx` binary and the shared libraries it needs (its dependencies whose
//!   Debian section is `libs`, followed recursively), a config that serves
//!   `/usr/share/nginx/html/index.html` on port 80 in the foreground and logs to stdout/stderr.
//!
//! Packages come from `apt-get download` (cached per version in a directory) and are extracted
//! with `dpkg-deb -x`; the result is one deterministic gzip layer, so the same package versions
//! always give the same digests.

use std::collections::{BTreeSet, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::oci_writer::{Descriptor, ImageConfig, OciLayoutWriter, OciWriteError};

/// The examples [`build_example`] knows.
pub const EXAMPLES: &[&str] = &["busybox", "nginx"];
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Directories of a Debian package tree that an image does not need.
const DROPPED: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/lintian",
    "usr/share/info",
];

/// Errors from building an example image.
#[derive(Debug, thiserror::Error)]
pub enum ExampleError {
    /// Not one of [`EXAMPLES`].
    #[error("unknown example {0:?} (choose busybox or nginx)")]
    Unknown(String),
    /// A host tool failed (apt-get, apt-cache, dpkg-deb, busybox).
    #[error("{cmd} failed: {message}")]
    Tool {
        /// The command line, shortened.
        cmd: String,
        /// Its last line of error output.
        message: String,
    },
    /// A file operation failed.
    #[error("cannot write {}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The output directory holds something that is not an OCI layout.
    #[error("{} exists and is not an OCI image layout; choose another output directory", .0.display())]
    OutputNotLayout(PathBuf),
    /// Writing the layout failed.
    #[error(transparent)]
    Layout(#[from] OciWriteError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExampleError + '_ {
    move |source| ExampleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds the example `name` under `work_dir`: `.deb` files are cached in `work_dir/debs` and
/// the layout is written to `work_dir/NAME-oci`, whose path is returned.
pub fn build_example(name: &str, work_dir: &Path) -> Result<PathBuf, ExampleError> {
    let out = work_dir.join(format!("{name}-oci"));
    build_example_to(name, &work_dir.join("debs"), &out)?;
    Ok(out)
}

/// Builds the example `name` into the OCI layout directory `out` (replacing an earlier layout
/// there), caching `.deb` files in `deb_cache`. Returns the manifest descriptor; the index names
/// it `latest`.
pub fn build_example_to(
    name: &str,
    deb_cache: &Path,
    out: &Path,
) -> Result<Descriptor, ExampleError> {
    if !EXAMPLES.contains(&name) {
        return Err(ExampleError::Unknown(name.to_string()));
    }
    if out.exists() && !out.join("oci-layout").is_file() {
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(ExampleError::OutputNotLayout(out.to_path_buf()));
        }
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    std::fs::create_dir_all(deb_cache).map_err(io_err(deb_cache))?;
    let staging = parent.join(format!(".{name}-build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = build_in(name, deb_cache, &staging, out);
    if let Err(e) = std::fs::remove_dir_all(&staging) {
        log::warn!("cannot remove {}: {e}", staging.display());
    }
    result
}

fn build_in(
    name: &str,
    deb_cache: &Path,
    staging: &Path,
    out: &Path,
) -> Result<Descriptor, ExampleError> {
    let rootfs = staging.join("rootfs");
    let config = if name == "busybox" {
        busybox_rootfs(deb_cache, staging, &rootfs)?
    } else {
        nginx_rootfs(deb_cache, &rootfs)?
    };
    let layout = staging.join("oci");
    let mut writer = OciLayoutWriter::new(&layout)?;
    writer.add_layer_from_dir(&rootfs)?;
    let manifest = writer.finish(&config, "latest")?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io_err(out))?;
    }
    std::fs::rename(&layout, out).map_err(io_err(out))?;
    Ok(manifest)
}

fn busybox_rootfs(
    deb_cache: &Path,
    staging: &Path,
    rootfs: &Path,
) -> Result<ImageConfig, ExampleError> {
    let info = apt_show("busybox-static")?.ok_or_else(|| no_package("busybox-static"))?;
    let debs = download(&[("busybox-static".to_string(), info)], deb_cache)?;
    let extract = staging.join("extract");
    for deb in &debs {
        dpkg_extract(deb, &extract)?;
    }
    skeleton(rootfs)?;
    let bin = rootfs.join("bin/busybox");
    std::fs::copy(extract.join("bin/busybox"), &bin).map_err(io_err(&bin))?;
    set_mode(&bin, 0o755)?;
    let list = run(Command::new(&bin).arg("--list-full"))?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "bin/busybox")
    {
        let link = rootfs.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(dir) = link.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link).map_err(io_err(&link))?;
    }
    Ok(ImageConfig {
        cmd: vec!["sh".into()],
        env: vec![PATH_ENV.into()],
        working_dir: "/".into(),
        ..Default::default()
    })
}

const NGINX_CONF: &str = r#"# mvm example: serve /usr/share/nginx/html on port 80, in the foreground, logging to stdout/stderr.
user www-data;
worker_processes 1;
daemon off;
pid /run/nginx.pid;
error_log stderr notice;

events {
    worker_connections 256;
}

http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /dev/stdout;
    sendfile on;
    keepalive_timeout 65;

    server {
        listen 80 default_server;
        root /usr/share/nginx/html;
        index index.html;
        location / {
            try_files $uri $uri/ =404;
        }
    }
}
"#;

const MIME_TYPES: &str = "types {\n    text/html html htm;\n    text/css css;\n    text/plain txt;\n    \
application/javascript js;\n    application/json json;\n    image/png png;\n    image/svg+xml svg;\n}\n";

/// The page the nginx example serves.
pub const NGINX_INDEX: &str =
    "<!DOCTYPE html>\n<html><body><h1>Hello from mvm</h1></body></html>\n";

fn nginx_rootfs(deb_cache: &Path, rootfs: &Path) -> Result<ImageConfig, ExampleError> {
    let debs = download(&closure_infos("nginx")?, deb_cache)?;
    for deb in &debs {
        dpkg_extract(deb, rootfs)?;
    }
    for dropped in DROPPED {
        let p = rootfs.join(dropped);
        if p.exists() {
            std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
        }
    }
    skeleton(rootfs)?;
    write(rootfs, "etc/nginx/nginx.conf", NGINX_CONF, 0o644)?;
    write(rootfs, "etc/nginx/mime.types", MIME_TYPES, 0o644)?;
    write(
        rootfs,
        "usr/share/nginx/html/index.html",
        NGINX_INDEX,
        0o644,
    )?;
    write(
        rootfs,
        "etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files dns\n",
        0o644,
    )?;
    write(
        rootfs,
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        0o644,
    )?;
    write(
        rootfs,
        "etc/group",
        "root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n",
        0o644,
    )?;
    for dir in ["var/log/nginx", "var/lib/nginx", "var/www"] {
        mkdir(rootfs, dir, 0o755)?;
    }
    Ok(ImageConfig {
        cmd: vec!["/usr/sbin/nginx".into(), "-e".into(), "stderr".into()],
        env: vec![PATH_ENV.into()],
        working_dir: "/".into(),
        exposed_ports: vec!["80/tcp".into()],
        stop_signal: Some("SIGQUIT".into()),
        ..Default::default()
    })
}

/// The base directories and account files every example has.
fn skeleton(rootfs: &Path) -> Result<(), ExampleError> {
    for (dir, mode) in [
        ("", 0o755),
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("var/tmp", 0o1777),
        ("root", 0o700),
    ] {
        mkdir(rootfs, dir, mode)?;
    }
    if !rootfs.join("etc/passwd").exists() {
        write(
            rootfs,
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
            0o644,
        )?;
        write(rootfs, "etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    }
    Ok(())
}

fn mkdir(rootfs: &Path, rel: &str, mode: u32) -> Result<(), ExampleError> {
    let p = rootfs.join(rel);
    std::fs::create_dir_all(&p).map_err(io_err(&p))?;
    set_mode(&p, mode)
}

fn write(rootfs: &Path, rel: &str, text: &str, mode: u32) -> Result<(), ExampleError> {
    let p = rootfs.join(rel);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    std::fs::write(&p, text).map_err(io_err(&p))?;
    set_mode(&p, mode)
}

fn set_mode(p: &Path, mode: u32) -> Result<(), ExampleError> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(io_err(p))
}

/// What `apt-cache show` says about the candidate version of a package.
struct PackageInfo {
    version: String,
    arch: String,
    section: String,
    depends: Vec<String>,
}

fn apt_show(pkg: &str) -> Result<Option<PackageInfo>, ExampleError> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", pkg])
        .output()
        .map_err(|e| tool_err("apt-cache show", &e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.trim().is_empty() {
        return Ok(None);
    }
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(": ")))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let mut depends = Vec::new();
    for list in [field("Pre-Depends"), field("Depends")] {
        for group in list.split(',').filter(|g| !g.trim().is_empty()) {
            let first = group.split('|').next().unwrap_or("");
            let name = first.split('(').next().unwrap_or("").trim();
            let name = name.split(':').next().unwrap_or("").trim();
            if !name.is_empty() {
                depends.push(name.to_string());
            }
        }
    }
    Ok(Some(PackageInfo {
        version: field("Version"),
        arch: field("Architecture"),
        section: field("Section"),
        depends,
    }))
}

/// `root` and, recursively, every dependency in Debian's `libs` section: the shared libraries
/// a program needs, without the maintainer-script machinery (debconf, perl) around it.
pub fn library_closure(root: &str) -> Result<Vec<String>, ExampleError> {
    Ok(closure_infos(root)?
        .into_iter()
        .map(|(name, _)| name)
        .collect())
}

fn closure_infos(root: &str) -> Result<Vec<(String, PackageInfo)>, ExampleError> {
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    let mut queue = VecDeque::from([root.to_string()]);
    while let Some(pkg) = queue.pop_front() {
        if !seen.insert(pkg.clone()) {
            continue;
        }
        let Some(info) = apt_show(&pkg)? else {
            if pkg == root {
                return Err(no_package(root));
            }
            log::debug!("dependency {pkg} is virtual or unknown; skipped");
            continue;
        };
        let is_lib = info
            .section
            .rsplit('/')
            .next()
            .is_some_and(|s| s == "libs" || s == "oldlibs");
        if pkg != root && !is_lib {
            continue;
        }
        queue.extend(info.depends.iter().filter(|d| !seen.contains(*d)).cloned());
        found.push((pkg, info));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

fn no_package(pkg: &str) -> ExampleError {
    tool_err(
        "apt-cache show",
        &format!("no package {pkg} (run apt-get update)"),
    )
}

/// Downloads the candidate version of each package into `cache` unless it is there already.
fn download(
    packages: &[(String, PackageInfo)],
    cache: &Path,
) -> Result<Vec<PathBuf>, ExampleError> {
    let mut debs = Vec::new();
    let mut missing = Vec::new();
    for (pkg, info) in packages {
        let file = cache.join(format!(
            "{pkg}_{}_{}.deb",
            info.version.replace(':', "%3a"),
            info.arch
        ));
        if !file.is_file() {
            missing.push(pkg.clone());
        }
        debs.push(file);
    }
    if !missing.is_empty() {
        eprintln!(
            "mvm: downloading {} Debian package(s): {}",
            missing.len(),
            missing.join(" ")
        );
        let mut cmd = Command::new("apt-get");
        cmd.current_dir(cache).arg("download").arg("-q");
        if rustix::process::geteuid().is_root() {
            // apt's _apt sandbox user may not be able to write the cache directory.
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        run(cmd.args(&missing))?;
    }
    for deb in &debs {
        if !deb.is_file() {
            return Err(tool_err(
                "apt-get download",
                &format!("{} was not downloaded", deb.display()),
            ));
        }
    }
    Ok(debs)
}

fn dpkg_extract(deb: &Path, dest: &Path) -> Result<(), ExampleError> {
    std::fs::create_dir_all(dest).map_err(io_err(dest))?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest)).map(|_| ())
}

fn run(cmd: &mut Command) -> Result<String, ExampleError> {
    let name = format!("{:?}", cmd.get_program());
    let name = name.trim_matches('"').to_string();
    let out = cmd.output().map_err(|e| tool_err(&name, &e.to_string()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        return Err(tool_err(
            &name,
            &format!("{} ({})", last.trim(), out.status),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tool_err(cmd: &str, message: &str) -> ExampleError {
    ExampleError::Tool {
        cmd: cmd.to_string(),
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apt_available() -> bool {
        apt_show("busybox-static").ok().flatten().is_some()
    }

    #[test]
    fn unknown_examples_are_refused_before_any_work() {
        let tmp = tempfile::tempdir().unwrap();
        let err = build_example("alpine", tmp.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown example \"alpine\" (choose busybox or nginx)"
        );
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn nginx_library_closure_has_its_libraries_and_no_tooling() {
        if !apt_available() {
            eprintln!("skipping: apt package lists are not available");
            return;
        }
        let pkgs = library_closure("nginx").unwrap();
        for needed in [
            "nginx",
            "libc6",
            "libssl3",
            "libpcre2-8-0",
            "zlib1g",
            "libcrypt1",
        ] {
            assert!(
                pkgs.iter().any(|p| p == needed),
                "{needed} missing from {pkgs:?}"
            );
        }
        for unwanted in ["nginx-common", "iproute2", "debconf", "perl-base"] {
            assert!(
                !pkgs.iter().any(|p| p == unwanted),
                "{unwanted} in {pkgs:?}"
            );
        }
    }

    #[test]
    fn an_output_dir_that_is_not_a_layout_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("mine");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("precious"), b"x").unwrap();
        let err = build_example_to("busybox", &tmp.path().join("debs"), &out).unwrap_err();
        assert!(matches!(err, ExampleError::OutputNotLayout(_)), "{err}");
        assert!(out.join("precious").exists());
    }
}
