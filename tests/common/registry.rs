//! A real OCI registry for tests: Debian's `docker-registry` (distribution v2) on 127.0.0.1 with a
//! free port and a throwaway storage directory, killed on drop; the busybox example image built
//! from Debian packages; and a throttling TCP proxy to slow a download down on purpose.
//!
//! Include with `#[path = "common/registry.rs"] mod registry_server;`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The registry binary Debian's `docker-registry` package installs.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running registry; killed (and its storage removed) on drop.
pub struct Registry {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// True once `GET /v2/` on `addr` answers 200.
fn answers(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && head.ends_with(b" 200")
}

impl Registry {
    /// Starts a registry, or says why it cannot (no `docker-registry` installed) and returns None.
    pub fn start() -> Option<Registry> {
        if !Path::new(REGISTRY_BIN).exists() {
            eprintln!("skipping: {REGISTRY_BIN} is missing (apt-get install docker-registry)");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..5 {
            let port = free_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: 127.0.0.1:{port}\n",
                    dir.path().join("storage").display()
                ),
            )
            .expect("write registry config");
            let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
            let mut child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start docker-registry");
            let addr = format!("127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if answers(&addr) {
                    return Some(Registry {
                        child: Some(child),
                        port,
                        dir,
                    });
                }
                if child.try_wait().ok().flatten().is_some() {
                    break; // lost the port race; try another
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
        panic!("docker-registry did not start: {log}");
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The file the registry serves for blob `digest` (`sha256:<hex>`).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Stops the registry now (its storage stays until drop).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The busybox example image (`mvm build-example busybox`), built once per test process into
/// `<target>/tmp/registry-test/busybox-oci`; None (with the reason printed) when Debian's package
/// lists are not available.
pub fn busybox_layout() -> Option<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let apt = Command::new("apt-cache")
            .args(["show", "--no-all-versions", "busybox-static"])
            .output();
        if !apt.is_ok_and(|o| o.status.success()) {
            return Err("apt package lists are not available".to_string());
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("registry-test");
        let out = dir.join("busybox-oci");
        rootfs_builder::examples::build_example_to("busybox", &dir.join("debs"), &out)
            .map(|_| out)
            .map_err(|e| format!("cannot build the busybox example: {e}"))
    });
    match built {
        Ok(p) => Some(p.clone()),
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

/// A TCP proxy to a registry that slows its answers to `rate` bytes per second while
/// [`Throttle::slow`] is set.
pub struct Throttle {
    port: u16,
    stop: Arc<AtomicBool>,
    slow: Arc<AtomicBool>,
    /// Bytes sent from the registry to clients so far.
    pub forwarded: Arc<AtomicU64>,
}

impl Throttle {
    /// Proxies 127.0.0.1:NEW_PORT to `target` (`host:port`).
    pub fn start(target: &str, rate: u64) -> Throttle {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let slow = Arc::new(AtomicBool::new(true));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (stop2, slow2, fwd2, target) = (
            stop.clone(),
            slow.clone(),
            forwarded.clone(),
            target.to_string(),
        );
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pipe(c2, s2, None));
                let (slow, fwd) = (slow2.clone(), fwd2.clone());
                std::thread::spawn(move || pipe(server, client, Some((slow, fwd, rate))));
            }
        });
        Throttle {
            port,
            stop,
            slow,
            forwarded,
        }
    }

    /// `127.0.0.1:PORT` of the proxy.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Lets everything through at full speed from now on.
    pub fn full_speed(&self) {
        self.slow.store(false, Ordering::Relaxed);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    limit: Option<(Arc<AtomicBool>, Arc<AtomicU64>, u64)>,
) {
    let chunk = limit
        .as_ref()
        .map_or(64 << 10, |(_, _, rate)| (rate / 20).max(1) as usize);
    let mut buf = vec![0u8; chunk];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some((slow, fwd, _)) = &limit {
            fwd.fetch_add(n as u64, Ordering::Relaxed);
            if slow.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
