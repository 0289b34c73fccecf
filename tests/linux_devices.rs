//! A real Linux guest (the test kernel) uses mvm's virtio devices: it mounts a read-only ext4
//! disk the test wrote and reads a file from it, reads the entropy device, reaches a TCP server on
//! the host side of a tap device, and talks to the host over vsock in both directions. One boot (tens of seconds on a PVM host).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::kernel::{repo_root, test_kernel};
use devices::virtio::vsock::{host_connect, listener_path};

const MVM: &str = env!("CARGO_BIN_EXE_mvm");
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Compiles tests/linux/devices_init.rs (static) and packs it as the initramfs's /init.
fn initramfs(dir: &Path) -> PathBuf {
    let init = dir.join("init");
    let out = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .args(["--edition", "2021", "-O", "-C", "panic=abort"])
        .args(["-C", "target-feature=+crt-static"])
        .args(["--target", "x86_64-unknown-linux-gnu", "-o"])
        .arg(&init)
        .arg(repo_root().join("tests/linux/devices_init.rs"))
        .output()
        .expect("run rustc");
    assert!(
        out.status.success(),
        "rustc could not build devices_init.rs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cpio = rootfs_builder::initramfs::Initramfs::new();
    cpio.host_file("init", 0o755, &init)
        .and_then(|c| c.char_dev("dev/console", 0o600, 5, 1))
        .and_then(|c| c.dir("proc", 0o555))
        .and_then(|c| c.dir("sys", 0o555))
        .and_then(|c| c.dir("mnt", 0o755))
        .expect("initramfs entries");
    let path = dir.join("initramfs.cpio");
    cpio.write_file(&path).expect("write initramfs");
    path
}

#[test]
fn linux_guest_uses_block_tap_net_rng_and_vsock_devices() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipping: no /dev/kvm on this host");
        return;
    }
    let (kernel, cmdline) = match test_kernel() {
        Ok(k) => k,
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs(dir.path());

    // The disk: an ext4 image holding a payload the guest must read back.
    let payload = format!(
        "payload-{}-{:x}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ 0x5eed
    );
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("payload"), &payload).unwrap();
    let disk = dir.path().join("disk.ext4");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&disk)
        .arg("8M")
        .status()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(mkfs.success());

    // The host side of vsock: a listener the guest connects to (port 5000).
    let sock = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(listener_path(&sock, 5000)).unwrap();
    let host_listener = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        reader.get_mut().write_all(b"pong from host\n").unwrap();
        line
    });

    // The host side of the tap: mvm creates `mvmtest0` with 172.30.99.1/30; the guest is .2.
    let tap_server = std::thread::spawn(|| {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let listener = loop {
            match std::net::TcpListener::bind("172.30.99.1:7000") {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => panic!("cannot listen on the tap address: {e}"),
            }
        };
        let (conn, peer) = listener.accept().unwrap();
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        reader.get_mut().write_all(b"tap pong\n").unwrap();
        (line, peer.ip().to_string())
    });

    let metrics = dir.path().join("metrics.json");
    let mut child = Command::new(MVM)
        .arg("boot")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", &cmdline, "--mem", "256M", "--rng"])
        .arg("--disk")
        .arg(format!("{},ro", disk.display()))
        .arg("--vsock")
        .arg(&sock)
        .args(["--network", "tap:mvmtest0,172.30.99.1/30"])
        .arg("--metrics")
        .arg(&metrics)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mvm");
    let mut stdout = child.stdout.take().unwrap();
    let console = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });

    // The host connects to the guest's port 6000 once the guest listens.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut guest_answer = String::new();
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if let Ok(mut conn) = host_connect(&sock, 6000, Duration::from_secs(2)) {
            conn.write_all(b"hello guest\n").unwrap();
            BufReader::new(conn).read_line(&mut guest_answer).unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let console = console.join().unwrap();
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    let context = format!("console:\n{console}\nstderr:\n{stderr}");

    assert_eq!(status.code(), Some(0), "{context}");
    assert!(
        console.contains(&format!("MVM-DEV block payload={payload}")),
        "{context}"
    );
    assert!(
        console.contains("MVM-DEV block write-refused=true"),
        "{context}"
    );
    let rng_line = console
        .lines()
        .find_map(|l| l.strip_prefix("MVM-DEV rng bytes="))
        .unwrap_or_else(|| panic!("no rng line; {context}"));
    assert_eq!(rng_line.trim().len(), 64, "{context}");
    assert_ne!(rng_line.trim(), "0".repeat(64), "{context}");
    assert!(
        console.contains("MVM-DEV vsock host-replied=pong from host"),
        "{context}"
    );
    assert_eq!(host_listener.join().unwrap(), "ping from guest\n");
    assert!(
        console.contains("MVM-DEV vsock guest-got=hello guest"),
        "{context}"
    );
    assert_eq!(guest_answer, "HELLO GUEST\n", "{context}");

    assert!(
        console.contains("MVM-DEV net host-replied=tap pong"),
        "{context}"
    );
    let (line, peer) = tap_server.join().unwrap();
    assert_eq!(
        (line.as_str(), peer.as_str()),
        ("hello over the tap\n", "172.30.99.2")
    );

    // The counters saw the traffic.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert!(m["block_vda"]["reads"].as_u64().unwrap() > 0, "{m}");
    assert!(m["rng"]["bytes"].as_u64().unwrap() >= 32, "{m}");
    // Nothing left behind: the vsock socket is removed when mvm exits.
    assert!(!sock.exists(), "mvm left its vsock socket behind");
    assert!(
        !Path::new("/sys/class/net/mvmtest0").exists(),
        "mvm left its tap device behind"
    );
}
