//! A real Linux guest (the test kernel) uses mvm's virtio devices: it mounts a read-only ext4
//! disk the test wrote and reads a file from it, reads the entropy device, reaches a TCP server on
//! the host side of a tap device, and talks to the host over vsock in both directions. A second
//! boot proves `--network user`: the guest reaches a TCP server on the host's loopback through
//! passt, and passt is gone when mvm exits. Each boot takes tens of seconds on a PVM host.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::kernel::{static_init, test_kernel};
use devices::virtio::vsock::{host_connect, listener_path};

const MVM: &str = env!("CARGO_BIN_EXE_mvm");
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Compiles `tests/linux/<source>` (static) and packs it as the initramfs's /init.
fn initramfs(dir: &Path, source: &str) -> PathBuf {
    let init = static_init(source, &[]);
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
    let initrd = initramfs(dir.path(), "devices_init.rs");

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
    // The VMM connects as its jail's own user: the directory must let others through and the
    // listener let them connect.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    std::fs::set_permissions(
        listener_path(&sock, 5000),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
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

/// What passt hands the guest: the IPv4 address, prefix and default gateway of the host's
/// default-route interface, which it copies (passt(1), "DHCP: assign ... router ..."), or why
/// there is none.
fn passt_addressing() -> Result<(String, String, String), String> {
    let ip = |args: &[&str]| -> Result<String, String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let after = |text: &str, key: &str| -> Option<String> {
        let mut words = text.split_whitespace();
        words.find(|w| *w == key)?;
        words.next().map(str::to_string)
    };
    let route = ip(&["-4", "-o", "route", "show", "default"])?;
    let (Some(gw), Some(dev)) = (after(&route, "via"), after(&route, "dev")) else {
        return Err("the host has no IPv4 default route, so passt has no address to copy".into());
    };
    let addr = ip(&["-4", "-o", "addr", "show", "dev", &dev])?;
    let inet = after(&addr, "inet").ok_or(format!("no IPv4 address on {dev}"))?;
    let (guest_ip, prefix) = inet.split_once('/').unwrap_or((&inet, "32"));
    Ok((guest_ip.to_string(), prefix.to_string(), gw))
}

/// The parent of `pid`, if it runs.
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Pids of the passt processes started by `parent`'s VMM process (its child; Debian's `passt`
/// may exec `passt.avx2`).
fn passt_children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let comm = stat.split_once('(').and_then(|(_, r)| r.rsplit_once(')'));
            let Some((comm, rest)) = comm else {
                return false;
            };
            let ppid = rest.split_whitespace().nth(1);
            let vmm = ppid.and_then(|p| p.parse::<u32>().ok());
            comm.starts_with("passt") && vmm.and_then(self::ppid) == Some(parent)
        })
        .collect()
}

fn passt_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains("(passt"))
}

fn tmp_passt_entries() -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("passt"))
                .collect()
        })
        .unwrap_or_default()
}

const USER_BULK: usize = 200_000;

fn pattern(i: usize) -> u8 {
    u8::try_from(i * 7 % 251).unwrap_or(0)
}

/// The host's TCP server on the loopback `listener`: reads the guest's hello line and bulk bytes,
/// answers with a line and bulk bytes of its own. Returns (line, peer ip, bulk intact).
fn loopback_server(listener: std::net::TcpListener, nonce: String) -> (String, String, bool) {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let (conn, peer) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return (format!("no connection: {e}"), String::new(), false),
        }
    };
    conn.set_nonblocking(false).expect("blocking connection");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    let mut bulk = vec![0u8; USER_BULK];
    if reader.read_line(&mut line).is_err() || reader.read_exact(&mut bulk).is_err() {
        return (line, peer.ip().to_string(), false);
    }
    let intact = bulk.iter().enumerate().all(|(i, b)| *b == pattern(i));
    let mut reply = format!("host got {USER_BULK} bytes for {nonce}\n").into_bytes();
    reply.extend((0..USER_BULK).map(|i| pattern(i + 1)));
    let _ = reader.get_mut().write_all(&reply);
    (line, peer.ip().to_string(), intact)
}

#[test]
fn linux_guest_reaches_host_server_over_user_network() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipping: no /dev/kvm on this host");
        return;
    }
    let has_passt = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("passt").is_file()));
    if !has_passt {
        eprintln!("skipping: passt is not installed (Debian package 'passt')");
        return;
    }
    let (kernel, cmdline) = match test_kernel() {
        Ok(k) => k,
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let (guest_ip, prefix, gw) = match passt_addressing() {
        Ok(a) => a,
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs(dir.path(), "user_net_init.rs");
    let tmp_before = tmp_passt_entries();

    // passt maps connections to the guest's default gateway onto the host's loopback.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let nonce = format!("{:x}", std::process::id() ^ 0x00c0_ffee);
    let server = {
        let nonce = nonce.clone();
        std::thread::spawn(move || loopback_server(listener, nonce))
    };

    let cmdline = format!(
        "{cmdline} user_ip={guest_ip} user_prefix={prefix} user_gw={gw} user_port={port} \
         user_nonce={nonce}"
    );
    let mut child = Command::new(MVM)
        .arg("boot")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", &cmdline, "--mem", "256M", "--network", "user"])
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

    // Watch for mvm's passt while the VM runs.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut passts = Vec::new();
    let status = loop {
        for pid in passt_children(child.id()) {
            if !passts.contains(&pid) {
                passts.push(pid);
            }
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = console.join().unwrap();
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    let context = format!("console:\n{console}\nstderr:\n{stderr}");

    assert_eq!(status.code(), Some(0), "{context}");
    assert!(
        console.contains(&format!("MVM-NET eth0 {guest_ip}/{prefix} via {gw}")),
        "{context}"
    );
    assert!(
        console.contains(&format!(
            "MVM-NET host-replied=host got {USER_BULK} bytes for {nonce}"
        )),
        "{context}"
    );
    assert!(console.contains("MVM-NET bulk-intact=true"), "{context}");
    let (line, peer, intact) = server.join().unwrap();
    assert_eq!(line, format!("hello from the guest {nonce}\n"), "{context}");
    assert_eq!(peer, "127.0.0.1", "passt connects from the host's loopback");
    assert!(intact, "the guest's bulk bytes arrived changed");

    // Nothing left behind: mvm started passt and it is gone, with no socket file.
    assert!(!passts.is_empty(), "mvm never started passt; {context}");
    for pid in passts {
        assert!(!passt_running(pid), "passt {pid} outlived mvm");
    }
    assert_eq!(
        tmp_passt_entries(),
        tmp_before,
        "passt left files in the temp dir"
    );
}
