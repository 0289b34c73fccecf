//! `--isolation container`: the runtime of `guest_agent::runtime` on the host kernel, with the
//! image (or `--rootfs`) as the overlay's lower layer and the writable layer in the container's
//! directory (`upper/`, kept until `mvm rm`).

use std::sync::Arc;

use guest_agent::runtime::{
    Container, ContainerSpec, Network as RuntimeNetwork, Rootfs, StdioConfig, StdioMode,
};

use super::context::{Exit, HostProcess, Run};
use crate::dns::{self, Reach};
use crate::error::{io_error, Error};
use crate::logs::Pumps;
use crate::spec::Network;
use crate::terminal::{PipeInput, PtyInput};

/// Runs the container on the host; returns its exit.
pub(super) fn run(mut run: Run<'_>) -> Result<Exit, Error> {
    let spec = run.spec;
    let dir = run.guard.dir().to_path_buf();
    let network = match &spec.network {
        Some(Network::Host) => RuntimeNetwork::Host,
        // Anything else was refused by the spec's validation.
        _ => RuntimeNetwork::None,
    };
    // The static agent: the container's root may have no libraries for another.
    let agent = if spec.mount_agent {
        Some(super::vm::find_agent()?)
    } else {
        None
    };
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    // A restart (`--restart`) keeps the writable layer of the run before.
    match std::fs::create_dir(&upper) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && run.is_restart() => {}
        Err(e) => return Err(io_error("create", &upper)(e)),
        Ok(()) => {}
    }
    std::fs::create_dir(&work).map_err(io_error("create", &work))?;
    let container = ContainerSpec {
        // The name: it names the cgroup and is the default hostname.
        id: run.guard.record().name.clone(),
        rootfs: Rootfs::Overlay {
            lower: vec![run.rootfs.clone()],
            upper,
            work,
        },
        process: run.process.clone(),
        hostname: spec.hostname.clone(),
        limits: spec.limits.clone(),
        terminal: spec.tty,
        network,
        init: spec.init,
        cgroup_parent: None,
        mounts: agent
            .map(super::vm::agent_mount)
            .into_iter()
            .chain(spec.volumes.iter().cloned())
            .collect(),
        security: spec.security.clone(),
        etc_files: Vec::new(),
    };
    let mut container = container;
    let reach = match network {
        RuntimeNetwork::Host => Reach::Host,
        RuntimeNetwork::None => Reach::None,
    };
    container.etc_files = dns::etc_files(
        &spec.dns,
        &run.guard.record().name,
        container.effective_hostname(),
        reach,
        &dns::host_resolv_conf(),
    )?;
    if let Some(m) = &container.security.userns {
        if let Rootfs::Overlay { upper, work, .. } = &container.rootfs {
            for d in [upper, work] {
                std::os::unix::fs::chown(d, Some(m.host_uid), Some(m.host_gid))
                    .map_err(io_error("hand to --userns", d))?;
            }
        }
    }
    let mut c = if spec.tty {
        Container::start(&container, &StdioConfig::terminal(run.terminal_size()))?
    } else {
        // Output goes through pipes to the log (and the terminal); a terminal's input is
        // relayed too, so the container never holds the terminal (see `StdioConfig::for_host`).
        let stdio = StdioConfig {
            stdin: StdioConfig::for_host(&container).stdin,
            stdout: StdioMode::Piped,
            stderr: StdioMode::Piped,
            terminal: None,
        };
        Container::start(&container, &stdio)?
    };
    if let Some(cgroup) = c.cgroup() {
        run.guard.cgroups(cgroup.dirs().to_vec())?;
    }
    let control = Arc::new(HostProcess::default());
    let _server = run.serve_control(control.clone());
    control.set(c.pid());
    run.started(Vec::new(), Some(c.pid()))?;
    let log = run.log()?;
    let (pumps, relay, _raw) = match c.take_terminal() {
        Some(master) => {
            let output = master
                .try_clone()
                .map_err(|e| Error::System("dup the container's terminal".into(), e))?;
            let pumps = Pumps::start(Some(output), None, &log, !run.detached())?;
            let (relay, raw) = run.relay_terminal(Box::new(PtyInput(master)))?;
            (pumps, relay, raw)
        }
        None => {
            let relay = match c.take_stdin() {
                Some(w) => Some(run.relay_input(Box::new(PipeInput(Some(w))))?),
                None => None,
            };
            let pumps = Pumps::start(c.take_stdout(), c.take_stderr(), &log, !run.detached())?;
            (pumps, relay, None)
        }
    };
    let exit = c.wait_forwarding_signals();
    control.set(0);
    pumps.finish();
    drop(relay);
    let exit = exit?;
    Ok(run.exited(exit.code, exit.oom_killed))
}
