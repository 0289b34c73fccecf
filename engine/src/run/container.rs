//! `--isolation container`: the runtime of `guest_agent::runtime` on the host kernel, with the
//! image (or `--rootfs`) as the overlay's lower layer and the writable layer in the container's
//! directory (`upper/`, kept until `mvm rm`).

use guest_agent::runtime::{
    Container, ContainerSpec, Network as RuntimeNetwork, Rootfs, StdioConfig, StdioMode,
};

use super::context::{Exit, Run};
use crate::error::{io_error, Error};
use crate::logs::Pumps;
use crate::spec::Network;

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
    for d in [&upper, &work] {
        std::fs::create_dir(d).map_err(io_error("create", d))?;
    }
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
        terminal: false,
        network,
        init: spec.init,
        cgroup_parent: None,
        mounts: agent
            .map(super::vm::agent_mount)
            .into_iter()
            .chain(spec.volumes.iter().cloned())
            .collect(),
        security: spec.security.clone(),
    };
    if let Some(m) = &container.security.userns {
        if let Rootfs::Overlay { upper, work, .. } = &container.rootfs {
            for d in [upper, work] {
                std::os::unix::fs::chown(d, Some(m.host_uid), Some(m.host_gid))
                    .map_err(io_error("hand to --userns", d))?;
            }
        }
    }
    // Output goes through pipes to the log (and the terminal); a terminal's input is relayed
    // too, so the container never holds the terminal (see `StdioConfig::for_host`).
    let stdio = StdioConfig {
        stdin: StdioConfig::for_host(&container).stdin,
        stdout: StdioMode::Piped,
        stderr: StdioMode::Piped,
    };
    let mut c = Container::start(&container, &stdio)?;
    if let Some(mut w) = c.take_stdin() {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut w);
        });
    }
    if let Some(cgroup) = c.cgroup() {
        run.guard.cgroups(cgroup.dirs().to_vec())?;
    }
    run.started(Vec::new(), Some(c.pid()))?;
    let pumps = Pumps::start(
        c.take_stdout(),
        c.take_stderr(),
        &run.log_path(),
        !run.runner,
    )?;
    let exit = c.wait_forwarding_signals();
    pumps.finish();
    let exit = exit?;
    Ok(run.exited(exit.code, exit.oom_killed))
}
