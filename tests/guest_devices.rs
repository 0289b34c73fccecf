//! `mvm boot` with the freestanding virtio guest (`tests/guests/virtio.rs`): the guest's own
//! minimal virtio-mmio drivers use every device mvm offers, through real KVM exits (register
//! accesses, ioeventfd-backed queue notifies), and these tests check the results on the host
//! side: bytes in disk files, frames on a tap in a network namespace, data on vsock Unix
//! sockets, and random bytes. Beyond the plain paths they cover descriptor layouts the device
//! must accept (split and merged), a device reset and re-initialisation, a receive burst with
//! only two buffers posted, and a vsock transfer larger than the guest's advertised credit.
//! Each boot takes 0.1-0.5 s here (about a second more with `--metrics`, which mvm writes once a
//! second).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::guests::{field, fnv1a, test_guest, wait_with_deadline, Finished, PREFIX};
use common::netns::{self, NetNs};
use common::{have_kvm, MVM};
use devices::virtio::vsock::{host_connect, listener_path};

/// Generous for guests that need well under a second, even on a busy emulated host.
const DEADLINE: Duration = Duration::from_secs(30);

/// Starts `mvm boot` on the virtio guest (stdout and stderr piped); `prefix` runs mvm through
/// another program (e.g. `nsenter --net=...`).
fn start_guest(prefix: &[&str], cmdline: &str, extra: &[&str]) -> (Child, Instant) {
    let guest = test_guest("virtio");
    let mut argv: Vec<&str> = prefix.to_vec();
    argv.extend_from_slice(&[MVM, "boot", "--mem", "64M", "--cmdline", cmdline]);
    argv.extend_from_slice(&["--kernel", guest.to_str().expect("utf-8 path")]);
    argv.extend_from_slice(extra);
    let child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mvm");
    (child, Instant::now())
}

/// Waits for the guest and checks it ran to its reset without errors; prints the boot-to-exit
/// time.
fn finish(child: Child, started: Instant, what: &str) -> Finished {
    let run = wait_with_deadline(child, DEADLINE, what);
    eprintln!("{what}: boot to exit {:?}", started.elapsed());
    let dump = run.dump();
    assert_eq!(run.code, Some(0), "{dump}");
    assert!(run.stderr.is_empty(), "mvm complained:\n{dump}");
    assert!(
        !run.stdout.contains(&format!("{PREFIX}error")),
        "the guest reported an error:\n{dump}"
    );
    assert!(
        run.stdout.contains(&format!("{PREFIX}done"))
            && run.stdout.ends_with(&format!("{PREFIX}reset\n")),
        "the guest did not finish:\n{dump}"
    );
    run
}

/// Asserts the guest laid out its buffers as `layout` says (it prints what it read).
fn assert_layout(run: &Finished, layout: &str) {
    assert_eq!(
        one_line(run, "virtio layout"),
        format!("virtio layout={layout}"),
        "{}",
        run.dump()
    );
}

/// Boots the guest with `cmdline` and device flags `extra`, and waits for it.
fn boot(cmdline: &str, extra: &[&str], what: &str) -> Finished {
    let (child, started) = start_guest(&[], cmdline, extra);
    finish(child, started, what)
}

/// The guest's lines starting with `topic` (without the prefix).
fn lines<'a>(run: &'a Finished, topic: &str) -> Vec<&'a str> {
    run.stdout
        .lines()
        .filter_map(|l| l.strip_prefix(PREFIX))
        .filter(|l| l.starts_with(topic))
        .collect()
}

/// The one guest line starting with `topic`.
fn one_line<'a>(run: &'a Finished, topic: &str) -> &'a str {
    match lines(run, topic).as_slice() {
        [l] => l,
        other => panic!("{} lines '{topic}':\n{}", other.len(), run.dump()),
    }
}

/// The text of `key="..."` (running to the line's last quote).
fn quoted<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("{key}=\""))? + key.len() + 2;
    let end = line.rfind('"')?;
    (end >= start).then(|| &line[start..end])
}

/// Bytes as the guest prints them: printable ASCII as is, everything else (and `\`) as `\xNN`.
fn escaped(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if (0x20..0x7f).contains(&b) && b != b'\\' {
                char::from(b).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

/// The bytes the guest writes to disk `dev` for `mvm_seed=seed`: xorshift64 words from
/// `(seed + dev) * 0x9e3779b97f4a7c15` (1 if that is 0), little endian (tests/guests/virtio/blk.rs computes the same).
fn guest_pattern(seed: u64, dev: u64, len: usize) -> Vec<u8> {
    let mut x = match seed.wrapping_add(dev).wrapping_mul(0x9e37_79b9_7f4a_7c15) {
        0 => 1,
        x => x,
    };
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A value different in every test run.
fn nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            d.as_secs().wrapping_mul(1_000_000_007) ^ u64::from(d.subsec_nanos())
        });
    t ^ (u64::from(std::process::id()) << 32)
}

fn read_metrics(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read metrics")).expect("metrics JSON")
}

fn metric(m: &serde_json::Value, device: &str, name: &str) -> u64 {
    m[device][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no metric {device}.{name} in {m}"))
}

#[test]
fn guest_reads_a_disk_the_host_wrote_and_its_flushed_writes_land_in_the_file() {
    if have_kvm() {
        disk_read_write("plain");
    }
}

#[test]
fn guest_disk_requests_in_split_or_merged_descriptors_give_the_same_results() {
    if have_kvm() {
        disk_read_write("split");
        disk_read_write("merged");
    }
}

/// Boots the guest on a disk the test wrote; checks what it read, its GET_ID, and that its
/// flushed write is in the file afterwards. `layout`: how the guest lays out its requests.
fn disk_read_write(layout: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = dir.path().join("disk.img");
    let seed = nonce();
    let original = guest_pattern(seed ^ 0xa5a5, 7, 1 << 20);
    std::fs::write(&disk, &original).expect("write disk");
    let serial = format!("gv-{:x}", seed & 0xffff_ffff);
    let metrics = dir.path().join("metrics.json");
    let run = boot(
        &format!("mvm_test=blk mvm_seed={seed:#x} mvm_layout={layout}"),
        &[
            "--disk",
            &format!("{},serial={serial}", disk.display()),
            "--metrics",
            metrics.to_str().expect("utf-8 path"),
        ],
        &format!("blk read/write ({layout})"),
    );
    assert_layout(&run, layout);
    let dump = run.dump();

    assert_eq!(
        one_line(&run, "blk dev=0 capacity"),
        "blk dev=0 capacity=2048 ro=0 flush=1",
        "{dump}"
    );
    let id = one_line(&run, "blk dev=0 get-id");
    assert_eq!(field(id, "status"), Some("0"), "{dump}");
    assert_eq!(quoted(id, "id"), Some(serial.as_str()), "GET_ID\n{dump}");

    let read = one_line(&run, "blk dev=0 read sector=0");
    assert_eq!(field(read, "status"), Some("0"), "{dump}");
    let want_hash = format!("{:#010x}", fnv1a(&original[..4096]));
    assert_eq!(field(read, "fnv1a"), Some(want_hash.as_str()), "{dump}");
    assert_eq!(
        quoted(read, "head"),
        Some(escaped(&original[..16]).as_str()),
        "{dump}"
    );

    assert_eq!(
        field(one_line(&run, "blk dev=0 write"), "status"),
        Some("0"),
        "{dump}"
    );
    assert_eq!(
        one_line(&run, "blk dev=0 flush"),
        "blk dev=0 flush status=0",
        "{dump}"
    );
    assert_eq!(
        one_line(&run, "blk dev=0 readback"),
        "blk dev=0 readback sector=8 status=0 match=1",
        "{dump}"
    );
    // Past the end: IOERR.
    assert_eq!(
        one_line(&run, "blk dev=0 read-past-end"),
        "blk dev=0 read-past-end sector=2048 status=1",
        "{dump}"
    );

    // The file holds the guest's pattern at sectors 8..16 and nothing else changed.
    let after = std::fs::read(&disk).expect("read disk");
    assert_eq!(after.len(), original.len());
    assert!(
        after[4096..8192] == guest_pattern(seed, 0, 4096)[..],
        "the guest's write is not in the file"
    );
    assert!(after[..4096] == original[..4096] && after[8192..] == original[8192..]);

    let m = read_metrics(&metrics);
    for (name, want) in [
        ("reads", 2),
        ("writes", 1),
        ("flushes", 1),
        ("get_ids", 1),
        ("io_errors", 1),
        ("invalid_chains", 0),
    ] {
        assert_eq!(metric(&m, "block_vda", name), want, "{name}: {m}");
    }
    assert!(metric(&m, "block_vda", "queue_events") >= 1, "{m}");
}

#[test]
fn guest_writes_to_a_read_only_disk_fail_and_leave_the_file_unchanged() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = dir.path().join("ro.img");
    let original = guest_pattern(nonce(), 3, 64 * 1024);
    std::fs::write(&disk, &original).expect("write disk");
    let run = boot(
        "mvm_test=blk mvm_seed=42",
        &["--disk", &format!("{},ro", disk.display())],
        "blk read-only",
    );
    let dump = run.dump();
    assert_eq!(
        one_line(&run, "blk dev=0 capacity"),
        "blk dev=0 capacity=128 ro=1 flush=1",
        "{dump}"
    );
    let read = one_line(&run, "blk dev=0 read sector=0");
    let want_hash = format!("{:#010x}", fnv1a(&original[..4096]));
    assert_eq!(field(read, "status"), Some("0"), "{dump}");
    assert_eq!(field(read, "fnv1a"), Some(want_hash.as_str()), "{dump}");
    let id = one_line(&run, "blk dev=0 get-id");
    assert_eq!(field(id, "status"), Some("0"), "{dump}");
    assert!(
        quoted(id, "id").is_some_and(|s| !s.is_empty()),
        "no default serial\n{dump}"
    );
    // IOERR (1) or UNSUPP (2), never OK; no flush or read back follows a failed write.
    let write = field(one_line(&run, "blk dev=0 write"), "status");
    assert!(
        matches!(write, Some("1" | "2")),
        "write status {write:?}\n{dump}"
    );
    assert!(lines(&run, "blk dev=0 flush").is_empty(), "{dump}");
    assert_eq!(std::fs::read(&disk).expect("read disk"), original);
}

fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// EtherType the virtio guest uses for its test frames (IEEE 802 local experimental).
const ETHERTYPE_TEST: u16 = 0x88b5;

#[test]
fn guest_frames_reach_the_tap_and_host_frames_reach_the_guest() {
    if have_kvm() {
        tap_exchange("plain", 0, 16);
    }
}

#[test]
fn guest_with_two_receive_buffers_gets_every_frame_of_a_host_burst() {
    if have_kvm() {
        tap_exchange("plain", 40, 2);
    }
}

#[test]
fn guest_frames_with_header_and_frame_in_separate_descriptors_cross_the_tap() {
    if have_kvm() {
        tap_exchange("split", 0, 16);
    }
}

/// Boots the guest with a tap in a fresh network namespace; the test's raw socket there catches
/// the guest's hello and answers it, and the host kernel answers the guest's ARP request.
///
/// With `burst` > 0 the host then sends that many frames back to back while the guest keeps
/// only `rx_buffers` receive buffers posted; the guest must get every one.
fn tap_exchange(layout: &str, burst: u64, rx_buffers: u64) {
    let Some(ns) = NetNs::create() else {
        return;
    };
    let tap = "gvtap0";
    let guest_nonce = format!("{:x}", nonce());
    let host_nonce = format!("{:x}", nonce().rotate_left(17));
    let cmdline = format!(
        "mvm_test=net mvm_nonce={guest_nonce} mvm_ip=10.201.0.2 mvm_peer=10.201.0.1 \
         mvm_layout={layout} mvm_burst={burst} mvm_rx_buffers={rx_buffers}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let metrics = dir.path().join("metrics.json");
    let (child, started) = start_guest(
        // Only the network namespace (`ip netns exec` would also mount a sysfs of its own,
        // hiding the cgroup file system the VMM's cgroup is made in).
        &["nsenter", &format!("--net=/run/netns/{}", ns.0)],
        &cmdline,
        &[
            "--network",
            &format!("tap:{tap},10.201.0.1/30"),
            "--metrics",
            metrics.to_str().expect("utf-8 path"),
        ],
    );

    // The host end: wait for mvm's tap in the namespace, catch the guest's hello, answer it.
    let ns_name = ns.0.clone();
    let reply = format!("mvm-host-reply {host_nonce}");
    let host = std::thread::spawn(move || -> Result<(Vec<u8>, [u8; 6]), String> {
        netns::enter_netns(&ns_name).map_err(|e| format!("setns: {e}"))?;
        let index = netns::wait_for_interface(tap, DEADLINE).ok_or("the tap never appeared")?;
        let sock = netns::Socket::open(index, ETHERTYPE_TEST).map_err(|e| e.to_string())?;
        let tap_mac = netns::mac_of(tap).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let hello = loop {
            if start.elapsed() > DEADLINE {
                return Err("no hello frame from the guest".into());
            }
            match sock.recv().map_err(|e| e.to_string())? {
                Some(f) if f.len() >= 14 && f[..6] == [0xff; 6] => break f,
                _ => {}
            }
        };
        let mut frame = hello[6..12].to_vec();
        frame.extend_from_slice(&tap_mac);
        frame.extend_from_slice(&ETHERTYPE_TEST.to_be_bytes());
        frame.extend_from_slice(reply.as_bytes());
        frame.resize(60, 0);
        sock.send(&frame).map_err(|e| e.to_string())?;
        for i in 0..burst {
            frame.truncate(14);
            frame.extend_from_slice(format!("mvm-burst {i}").as_bytes());
            frame.resize(60, 0);
            sock.send(&frame).map_err(|e| e.to_string())?;
        }
        Ok((hello, tap_mac))
    });
    let run = finish(child, started, &format!("net tap ({layout})"));
    assert_layout(&run, layout);
    let dump = run.dump();
    let (hello, tap_mac) = host
        .join()
        .expect("host thread")
        .unwrap_or_else(|e| panic!("{e}\n{dump}"));

    // The guest's frame arrived on the tap, from the MAC the device gave it.
    let guest_mac = field(one_line(&run, "net mac="), "mac").expect("mac field");
    assert_eq!(mac_text(&hello[6..12]), guest_mac, "{dump}");
    assert_eq!(hello[12..14], ETHERTYPE_TEST.to_be_bytes());
    let text = format!("mvm-guest-hello {guest_nonce}");
    assert_eq!(&hello[14..14 + text.len()], text.as_bytes(), "{dump}");
    // The host's frame reached the guest.
    let got = one_line(&run, "net got");
    assert_eq!(
        field(got, "src"),
        Some(mac_text(&tap_mac).as_str()),
        "{dump}"
    );
    assert_eq!(
        quoted(got, "payload"),
        Some(format!("mvm-host-reply {host_nonce}").as_str()),
        "{dump}"
    );
    let m = read_metrics(&metrics);
    if burst > 0 {
        assert_eq!(
            one_line(&run, "net burst"),
            format!("net burst got={burst} in-order=1"),
            "{dump}"
        );
        // The device did run out of buffers on the way, and waited instead of dropping.
        assert!(metric(&m, "net", "rx_no_buffers") > 0, "{m}");
    }
    assert_eq!(metric(&m, "net", "rx_dropped"), 0, "{m}");
    assert_eq!(metric(&m, "net", "tx_dropped"), 0, "{m}");
    // The host kernel answered the guest's ARP request for its tap address.
    assert_eq!(
        field(one_line(&run, "net arp"), "mac"),
        Some(mac_text(&tap_mac).as_str()),
        "{dump}"
    );
    // The tap went away with mvm.
    let gone = Command::new("ip")
        .args(["-n", &ns.0, "link", "show", tap])
        .output()
        .expect("run ip");
    assert!(!gone.status.success(), "mvm left its tap behind");
}

/// Reads one line from a host-side vsock stream, with a timeout.
fn read_line(stream: &std::os::unix::net::UnixStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("read line");
    line
}

#[test]
fn host_program_connects_to_a_guest_vsock_port_and_both_sides_exchange_data() {
    if have_kvm() {
        host_connects("plain");
    }
}

#[test]
fn vsock_packets_with_header_and_payload_in_separate_descriptors_work_both_ways() {
    if have_kvm() {
        host_connects("split");
        guest_connects("split");
    }
}

/// What a host program does to reach guest port `port`: `CONNECT` through mvm's socket until the
/// guest accepts. Until the guest's driver is up the device refuses (a connection made before
/// the driver resets the device is closed), so it retries like any host program would.
fn connect_to_guest(sock: &Path, port: u32) -> std::os::unix::net::UnixStream {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match host_connect(sock, port, Duration::from_secs(5)) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot reach guest port {port}: {e}"),
        }
    }
}

#[test]
fn host_bulk_data_to_a_guest_vsock_port_stays_within_the_guest_credit() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("vsock.sock");
    // The guest offers 2 KiB of receive buffer and acknowledges only when the host pauses.
    let (child, started) = start_guest(
        &[],
        "mvm_test=vsock mvm_listen=5000 mvm_bulk=20000 mvm_credit=2048",
        &["--vsock", sock.to_str().expect("utf-8 path")],
    );
    let mut stream = connect_to_guest(&sock, 5000);
    let data = guest_pattern(nonce(), 5, 20000);
    stream.write_all(&data).expect("write to guest");
    let answer = read_line(&stream);
    drop(stream);
    let run = finish(child, started, "vsock bulk with credit");
    let dump = run.dump();
    let hash = format!("{:#010x}", fnv1a(&data));
    assert_eq!(answer, format!("fnv1a={hash}\n"), "{dump}");
    let bulk = one_line(&run, "vsock bulk");
    assert_eq!(field(bulk, "bytes"), Some("20000"), "{dump}");
    assert_eq!(field(bulk, "fnv1a"), Some(hash.as_str()), "{dump}");
    assert_eq!(field(bulk, "credit"), Some("2048"), "{dump}");
    let most: u64 = field(bulk, "most-unacked")
        .and_then(|v| v.parse().ok())
        .expect("most-unacked");
    assert!(most > 0 && most <= 2048, "{dump}");
}

/// A host program reaches the guest's port 5000 with `CONNECT 5000`, sends a line, reads the
/// guest's echo and closes.
fn host_connects(layout: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("vsock.sock");
    let (child, started) = start_guest(
        &[],
        &format!("mvm_test=vsock mvm_listen=5000 mvm_layout={layout}"),
        &["--vsock", sock.to_str().expect("utf-8 path")],
    );
    let mut stream = connect_to_guest(&sock, 5000);
    let text = format!("hello guest {:x}", nonce());
    stream
        .write_all(format!("{text}\n").as_bytes())
        .expect("write to guest");
    let answer = read_line(&stream);
    drop(stream);
    let run = finish(child, started, &format!("vsock host connect ({layout})"));
    assert_layout(&run, layout);
    let dump = run.dump();
    assert_eq!(answer, format!("echo: {text}\n"), "{dump}");
    assert_eq!(one_line(&run, "vsock cid="), "vsock cid=3", "{dump}");
    let accepted = one_line(&run, "vsock accepted");
    assert_eq!(field(accepted, "port"), Some("5000"), "{dump}");
    assert_eq!(
        quoted(one_line(&run, "vsock got"), "line"),
        Some(text.as_str()),
        "{dump}"
    );
    // The host closing its end reached the guest as SHUTDOWN.
    assert!(!lines(&run, "vsock host-shutdown").is_empty(), "{dump}");
    assert!(!sock.exists(), "mvm left its vsock socket behind");
}

#[test]
fn guest_connects_to_a_host_vsock_listener_and_both_sides_exchange_data() {
    if have_kvm() {
        guest_connects("plain");
    }
}

/// The VMM connects to a host listener as its jail's own user: the directory must let others
/// through and the listener let them connect.
fn open_to_the_vmm(dir: &std::path::Path, listener: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod dir");
    std::fs::set_permissions(listener, std::fs::Permissions::from_mode(0o777))
        .expect("chmod listener");
}

/// The guest connects to the host listener `<socket>_5001`, sends a line, reads the answer and
/// shuts the connection down; the listener sees end of file.
fn guest_connects(layout: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(listener_path(&sock, 5001)).expect("bind listener");
    open_to_the_vmm(dir.path(), &listener_path(&sock, 5001));
    let guest_nonce = format!("{:x}", nonce());
    let host_text = format!("pong {:x}", nonce().rotate_left(9));
    let reply = host_text.clone();
    let host = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let line = read_line(&conn);
        conn.write_all(format!("{reply}\n").as_bytes())
            .expect("answer");
        // The guest's SHUTDOWN ends the stream: end of file.
        let mut rest = Vec::new();
        let eof = conn.read_to_end(&mut rest).is_ok();
        (line, eof, rest)
    });
    let (child, started) = start_guest(
        &[],
        &format!("mvm_test=vsock mvm_connect=5001 mvm_nonce={guest_nonce} mvm_layout={layout}"),
        &["--vsock", sock.to_str().expect("utf-8 path")],
    );
    let run = finish(child, started, &format!("vsock guest connect ({layout})"));
    assert_layout(&run, layout);
    let dump = run.dump();
    let (line, eof, rest) = host.join().expect("host listener");
    assert_eq!(line, format!("ping {guest_nonce}\n"), "{dump}");
    assert!(eof && rest.is_empty(), "no clean end of file: {rest:?}");
    assert_eq!(
        field(one_line(&run, "vsock connected"), "port"),
        Some("5001")
    );
    assert_eq!(
        quoted(one_line(&run, "vsock host-said"), "line"),
        Some(host_text.as_str()),
        "{dump}"
    );
    assert_eq!(
        one_line(&run, "vsock closed"),
        "vsock closed rst=1",
        "{dump}"
    );
}

#[test]
fn guest_connect_to_a_vsock_port_nobody_listens_on_is_refused() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("vsock.sock");
    let run = boot(
        "mvm_test=vsock mvm_connect=5002",
        &["--vsock", sock.to_str().expect("utf-8 path")],
        "vsock refused",
    );
    assert_eq!(
        one_line(&run, "vsock refused"),
        "vsock refused port=5002",
        "{}",
        run.dump()
    );
}

#[test]
fn guest_reads_random_bytes_from_the_entropy_device() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let metrics = dir.path().join("metrics.json");
    let run = boot(
        "mvm_test=rng",
        &["--rng", "--metrics", metrics.to_str().expect("utf-8 path")],
        "rng",
    );
    let dump = run.dump();
    let reads = lines(&run, "rng read=");
    assert_eq!(reads.len(), 2, "{dump}");
    let hex: Vec<&str> = reads
        .iter()
        .map(|l| {
            assert_eq!(field(l, "len"), Some("32"), "{dump}");
            field(l, "hex").expect("hex field")
        })
        .collect();
    for h in &hex {
        assert_eq!(h.len(), 64, "{dump}");
        assert_ne!(*h, "0".repeat(64), "all-zero entropy\n{dump}");
    }
    assert_ne!(hex[0], hex[1], "two reads returned the same bytes\n{dump}");
    assert!(metric(&read_metrics(&metrics), "rng", "bytes") >= 64);
}

#[test]
fn guest_that_resets_and_reinitialises_its_devices_keeps_using_them() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, guest_pattern(nonce(), 1, 64 * 1024)).expect("write disk");
    let sock = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(listener_path(&sock, 5001)).expect("bind listener");
    open_to_the_vmm(dir.path(), &listener_path(&sock, 5001));
    let host = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().expect("accept");
            lines.push(read_line(&conn));
            conn.write_all(b"pong\n").expect("answer");
        }
        lines
    });
    let metrics = dir.path().join("metrics.json");
    // `twice`: the guest runs every driver two times; each run starts with a device reset.
    let run = boot(
        "mvm_test=blk,vsock,rng,twice mvm_seed=7 mvm_connect=5001 mvm_nonce=again",
        &[
            "--disk",
            disk.to_str().expect("utf-8 path"),
            "--vsock",
            sock.to_str().expect("utf-8 path"),
            "--rng",
            "--metrics",
            metrics.to_str().expect("utf-8 path"),
        ],
        "reset and reinitialise",
    );
    let dump = run.dump();
    assert_eq!(host.join().expect("host listener"), ["ping again\n"; 2]);
    assert_eq!(lines(&run, "round ").len(), 2, "{dump}");
    for (topic, want) in [
        ("blk dev=0 readback sector=8 status=0 match=1", 2),
        ("vsock closed rst=1", 2),
        ("rng read=2 status=ok len=32", 2),
    ] {
        assert_eq!(lines(&run, topic).len(), want, "{topic}\n{dump}");
    }
    let m = read_metrics(&metrics);
    assert_eq!(metric(&m, "block_vda", "activations"), 2, "{m}");
    assert_eq!(metric(&m, "rng", "activations"), 2, "{m}");
    assert_eq!(metric(&m, "vsock", "guest_connects"), 2, "{m}");
    let pattern = guest_pattern(7, 0, 4096);
    assert!(std::fs::read(&disk).expect("read disk")[4096..8192] == pattern[..]);
}
