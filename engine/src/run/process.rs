//! `--isolation process`: the command straight on the host, with the same environment and
//! working directory rules as a container but no namespaces and no limits.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::Arc;

use guest_agent::runtime;

use super::context::{Exit, HostProcess, Run};
use crate::error::{CommandExit, Error};
use crate::logs::Pumps;

/// Runs the command as a plain process; returns its exit.
pub(super) fn run(mut run: Run<'_>) -> Result<Exit, Error> {
    let spec = run.spec;
    if spec.limits.any() {
        log::warn!("--isolation process applies no limits (--mem, --cpus, --pids-limit ignored)");
    }
    let program = run.process.args[0].clone();
    let mut cmd = Command::new(&program);
    cmd.args(&run.process.args[1..])
        .env_clear()
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for e in &run.process.env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    if let Some(w) = &spec.command.workdir {
        cmd.current_dir(w);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let msg = format!("{program}: executable file not found");
            return Err(CommandExit(127, msg).into());
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(CommandExit(126, format!("{program}: permission denied")).into())
        }
        Err(e) => return Err(Error::System(format!("cannot start {program}"), e)),
    };
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let control = Arc::new(HostProcess::default());
    let _server = run.serve_control(control.clone());
    control.set(pid);
    run.started(Vec::new(), Some(pid))?;
    let stdout = child.stdout.take().map(|p| File::from(OwnedFd::from(p)));
    let stderr = child.stderr.take().map(|p| File::from(OwnedFd::from(p)));
    let pumps = Pumps::start(stdout, stderr, &run.log()?, !run.detached())?;
    let status = runtime::wait_forwarding_signals(pid, "the process");
    control.set(0);
    pumps.finish();
    let status = status?;
    let code = if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    };
    Ok(run.exited(code, false))
}
