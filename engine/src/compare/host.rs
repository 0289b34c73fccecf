//! The host resources the escape probes look for, each identified by a nonce that only mvm and
//! the probe's command line know: a marker process, a root-only secret file, a service on the
//! host's 127.0.0.1, a line in the host's kernel log, the host's root disk and an entry in mvm's
//! state directory. A probe says `allowed` only when it reached the real one. Nothing here is
//! shared with a container or VM; everything is removed when the [`HostFixture`] is dropped.

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::{io_error, Error};
use crate::state::new_id;

/// A fresh nonce: `mvm-<tag>-` and 16 random hex digits.
pub(super) fn nonce(tag: &str) -> String {
    format!("mvm-{tag}-{}", new_id())
}

/// The host resources, alive while this lives.
#[derive(Debug)]
pub(super) struct HostFixture {
    /// A private directory for this comparison (the secret, the runs' specs).
    pub work: PathBuf,
    marker: Child,
    state_entry: PathBuf,
    loopback: Option<Loopback>,
    /// The probe's options that name the resources.
    pub args: Vec<String>,
    /// Resources that could not be made (their probes say `error`, "not given").
    pub missing: Vec<String>,
}

impl HostFixture {
    /// Creates every resource; `root` is mvm's root (its state directory is probed). What is
    /// made before a failure is removed again.
    pub fn start(root: &Path) -> Result<HostFixture, Error> {
        let work = root.join("compare").join(new_id());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&work)
            .map_err(io_error("create", &work))?;
        let marker_nonce = nonce("marker");
        let marker = match spawn_marker(&marker_nonce) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&work);
                return Err(e);
            }
        };
        let mut f = HostFixture {
            args: vec![
                "--marker-cmdline".into(),
                marker_nonce,
                "--marker-pid".into(),
                marker.id().to_string(),
            ],
            work,
            marker,
            state_entry: PathBuf::new(),
            loopback: None,
            missing: Vec::new(),
        };

        // A root-only file holding a secret, in a root-only directory.
        let secret_nonce = nonce("secret");
        let secret = f.work.join("secret");
        rootfs_builder::rootdir::create_private_file(&secret)
            .and_then(|mut file| file.write_all(secret_nonce.as_bytes()))
            .map_err(io_error("write", &secret))?;
        f.args.extend([
            "--secret-file".into(),
            secret.display().to_string(),
            "--secret".into(),
            secret_nonce,
        ]);

        let loopback = Loopback::start()?;
        f.args.extend([
            "--loopback-port".into(),
            loopback.port.to_string(),
            "--loopback-nonce".into(),
            loopback.nonce.clone(),
        ]);
        f.loopback = Some(loopback);

        // A line in the kernel log (root only).
        let kmsg_nonce = nonce("kmsg");
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/kmsg")
            .and_then(|mut k| k.write_all(format!("mvm compare: {kmsg_nonce}\n").as_bytes()));
        match written {
            Ok(()) => f.args.extend(["--kmsg-nonce".into(), kmsg_nonce]),
            Err(e) => f
                .missing
                .push(format!("a kernel log line (/dev/kmsg: {e})")),
        }

        match root_disk() {
            Some((dev, size)) => f.args.extend([
                "--host-disk".into(),
                dev,
                "--host-disk-size".into(),
                size.to_string(),
            ]),
            None => f.missing.push("the root filesystem's block device".into()),
        }

        // An empty root-only entry in mvm's state directory, named by its nonce.
        let state_nonce = nonce("state");
        let entry = root.join(&state_nonce);
        rootfs_builder::rootdir::create_private_file(&entry).map_err(io_error("create", &entry))?;
        f.state_entry = entry;
        f.args.extend([
            "--state-dir".into(),
            root.display().to_string(),
            "--state-nonce".into(),
            state_nonce,
        ]);
        Ok(f)
    }
}

/// `sleep` with `nonce` as its argv[0]; it dies with this process should mvm be killed.
fn spawn_marker(nonce: &str) -> Result<Child, Error> {
    let mut cmd = Command::new("sleep");
    cmd.arg0(nonce)
        .arg("86400")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| Error::System("cannot start the marker process (sleep)".into(), e))
}

impl Drop for HostFixture {
    fn drop(&mut self) {
        let _ = self.marker.kill();
        let _ = self.marker.wait();
        if !self.state_entry.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.state_entry);
        }
        let _ = std::fs::remove_dir_all(&self.work);
        if let Some(parent) = self.work.parent() {
            // Only when no other comparison uses it.
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// A TCP service on the host's 127.0.0.1 that writes its nonce to every connection.
#[derive(Debug)]
struct Loopback {
    port: u16,
    nonce: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Loopback {
    fn start() -> Result<Loopback, Error> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| Error::System("cannot listen on 127.0.0.1".into(), e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::System("cannot listen on 127.0.0.1".into(), e))?
            .port();
        let nonce = nonce("loopback");
        let stop = Arc::new(AtomicBool::new(false));
        let (answer, flag) = (nonce.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("compare-loopback".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(mut c) = conn {
                        let _ = c.write_all(answer.as_bytes());
                    }
                }
            })
            .map_err(|e| Error::System("cannot start the loopback service".into(), e))?;
        Ok(Loopback {
            port,
            nonce,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The block device of the host's root filesystem (`MAJ:MIN`) and its size in bytes.
fn root_disk() -> Option<(String, u64)> {
    let dev = std::fs::metadata("/").ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sectors: u64 = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some((format!("{major}:{minor}"), sectors.checked_mul(512)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_long_and_distinct() {
        let (a, b) = (nonce("x"), nonce("x"));
        assert_ne!(a, b);
        assert!(
            a.starts_with("mvm-x-") && a.len() == "mvm-x-".len() + 16,
            "{a}"
        );
    }

    #[test]
    fn the_loopback_service_answers_with_its_nonce_and_stops() {
        use std::io::Read;
        let l = Loopback::start().unwrap_or_else(|e| panic!("{e}"));
        let mut got = String::new();
        TcpStream::connect((Ipv4Addr::LOCALHOST, l.port))
            .and_then(|mut c| c.read_to_string(&mut got))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, l.nonce);
        let port = l.port;
        drop(l);
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
    }
}
