//! `mvm-agent`: PID 1 of the mvm guest, or a container agent on the host.
//!
//! - In the guest (PID 1, no arguments): mounts /proc, /sys, /dev and cgroup2, brings up `lo`,
//!   mounts the disks its boot parameters name (`guest_agent::guest::BootParams`: the image
//!   read-only on /mnt/rootfs, volumes under /mnt/volumes), configures eth0, and serves the agent
//!   protocol on its vsock port until the host asks it to shut down; then powers the VM off.
//! - On the host: `mvm-agent --socket PATH` serves the same protocol on a Unix socket.
//! - Anywhere: `mvm-agent probe [OPTIONS]` prints a JSON report of what the calling process sees
//!   and can do (see `guest_agent::probe`). It is checked first: a probe may well be the first
//!   process of its PID namespace, and must not be taken for the guest's init.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use guest_agent::agent::portfwd::PortForwarder;
use guest_agent::agent::server::{Agent, Listener};
use guest_agent::agent::vsock::VsockListener;
use guest_agent::agent::{init, restored};
use guest_agent::logger;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(("probe", rest)) = args.split_first().map(|(a, r)| (a.as_str(), r)) {
        std::process::exit(guest_agent::probe::main(rest));
    }
    let level = std::env::var("MVM_AGENT_LOG").unwrap_or_default();
    logger::init("mvm-agent", logger::parse_level(&level));
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
    let params = init::params_from_proc().map_err(|e| e.to_string())?;
    if let Some(level) = &params.log {
        logger::init("mvm-agent", logger::parse_level(level));
    }
    if let Err(e) = init::interface_up("lo") {
        eprintln!("mvm-agent: {e}");
    }
    if !params.template {
        restored::apply(&params, false)?;
    }
    let port = params.agent_port();
    let listener = VsockListener::bind(port).map_err(|e| format!("vsock port {port}: {e}"))?;
    let mut agent = Agent::new();
    agent.reap_orphans();
    // A snapshot of this VM taken while its container runs may be restored as a fork.
    agent.on_resume(Box::new(restored::resume));
    if params.template {
        // Saved as a template from here on: the run's disks, network and ports come with the
        // setup request of each VM restored from it.
        agent.await_setup(Box::new(restored::setup));
    } else if !params.ports.is_empty() {
        agent.publish(PortForwarder::bind(&params.ports));
    }
    eprintln!("mvm-agent: ready on vsock port {port}");
    agent
        .serve(Listener::Vsock(listener))
        .map_err(|e| e.to_string())?;
    init::power_off()
}
