//! `mvm-agent`: PID 1 of the mvm guest, or a container agent on the host.
//!
//! - In the guest (PID 1, no arguments): mounts /proc, /sys, /dev and cgroup2, brings up `lo`,
//!   mounts the image disk named by `mvm.rootfs=` on /mnt/rootfs (read-only), and serves the agent
//!   protocol on vsock port `mvm.port=` (default 1024) until the host asks it to shut down; then
//!   powers the VM off.
//! - On the host: `mvm-agent --socket PATH` serves the same protocol on a Unix socket.
//! - Anywhere: `mvm-agent probe [OPTIONS]` prints a JSON report of what the calling process sees
//!   and can do (see `guest_agent::probe`). It is checked first: a probe may well be the first
//!   process of its PID namespace, and must not be taken for the guest's init.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use guest_agent::agent::portfwd::{parse_ports, PortForwarder};
use guest_agent::agent::server::{Agent, Listener};
use guest_agent::agent::vsock::VsockListener;
use guest_agent::agent::{init, logger};
use guest_agent::protocol::AGENT_VSOCK_PORT;

/// Where volume disks are mounted in the guest (`guest_agent::protocol::GUEST_VOLUMES_DIR`).
const VOLUMES_DIR: &str = guest_agent::protocol::GUEST_VOLUMES_DIR;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(("probe", rest)) = args.split_first().map(|(a, r)| (a.as_str(), r)) {
        std::process::exit(guest_agent::probe::main(rest));
    }
    let level = std::env::var("MVM_AGENT_LOG").unwrap_or_default();
    logger::init(logger::parse_level(&level));
    // As PID 1 the kernel passes the boot words it did not understand as arguments: ignore them.
    let result = match args.as_slice() {
        _ if init::is_pid1() => guest_main(),
        [flag, path] if flag == "--socket" => serve_unix(PathBuf::from(path)),
        [flag] if flag == "--version" => {
            println!("mvm-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        _ => Err(
            "usage: mvm-agent --socket PATH | probe [OPTIONS] (or run as the guest's PID 1)"
                .to_string(),
        ),
    };
    if let Err(e) = result {
        eprintln!("mvm-agent: {e}");
        if init::is_pid1() {
            init::power_off();
        }
        std::process::exit(1);
    }
}

fn serve_unix(path: PathBuf) -> Result<(), String> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let result = Agent::new().serve(Listener::Unix(listener));
    let _ = std::fs::remove_file(&path);
    result.map_err(|e| e.to_string())
}

fn guest_main() -> Result<(), String> {
    init::early_mounts().map_err(|e| e.to_string())?;
    let params = init::params_from_proc();
    let param = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    if let Err(e) = init::interface_up("lo") {
        eprintln!("mvm-agent: {e}");
    }
    if let Some(dev) = param("rootfs") {
        init::mount(&dev, "/mnt/rootfs", "ext4", libc::MS_RDONLY, None)
            .map_err(|e| format!("{e} ({dev})"))?;
    }
    // Volumes: `mvm.volume=vdb[:ro]`, each a disk mounted at /mnt/volumes/<dev> for containers
    // to bind-mount.
    for (_, value) in params.iter().filter(|(k, _)| k == "volume") {
        let (dev, ro) = match value.split_once(':') {
            Some((d, "ro")) => (d, true),
            _ => (value.as_str(), false),
        };
        if dev.is_empty() || dev.contains('/') {
            return Err(format!("invalid mvm.volume={value}"));
        }
        let target = format!("{VOLUMES_DIR}/{dev}");
        std::fs::create_dir_all(&target).map_err(|e| format!("cannot create {target}: {e}"))?;
        let flags = if ro { libc::MS_RDONLY } else { 0 };
        init::mount(&format!("/dev/{dev}"), &target, "ext4", flags, None)
            .map_err(|e| format!("{e} (volume {dev})"))?;
    }
    if let Some(net) = param("net") {
        let net = init::NetConfig::parse(&net).ok_or(format!("invalid mvm.net={net}"))?;
        if let Err(e) = init::configure_ipv4(&net) {
            let why = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
            eprintln!("mvm-agent: {e}{why}");
        }
    }
    if let Some(level) = param("log") {
        logger::init(logger::parse_level(&level));
    }
    let port = param("port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(AGENT_VSOCK_PORT);
    let listener = VsockListener::bind(port).map_err(|e| format!("vsock port {port}: {e}"))?;
    let mut agent = Agent::new();
    agent.reap_orphans();
    if let Some(ports) = param("ports") {
        agent.publish(PortForwarder::bind(&parse_ports(&ports)));
    }
    eprintln!("mvm-agent: ready on vsock port {port}");
    agent
        .serve(Listener::Vsock(listener))
        .map_err(|e| e.to_string())?;
    init::power_off()
}
