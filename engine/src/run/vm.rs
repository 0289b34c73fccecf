//! `--isolation vm`: the root filesystem becomes a read-only ext4 disk, the static guest agent
//! becomes the initramfs's `/init`, and [`crate::microvm`] boots the guest kernel, starts the
//! container through the agent and streams its output.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devices::virtio::block::BlockConfig;
use guest_agent::guest::{self, BootParams, VolumeParam, MAIN_STREAM};
use guest_agent::runtime::spec::BindMount;
use guest_agent::runtime::{ContainerSpec, Limits, Network, Rootfs};
use rootfs_builder::initramfs::{Initramfs, InitramfsError};
use serde::{Deserialize, Serialize};
use vmm::virtio_devices::NetworkMode;

use super::context::{Exit, Run};
use super::template;
use crate::confine::{self, cgroup, ConfineError, VmmCgroup, VmmEvent, VmmExit, VmmRequest};
use crate::dns::{self, Reach};
use crate::error::{bad_input, io_error, CommandExit, Error, EXIT_FAILURE};
use crate::image;
use crate::logs::{ContainerLog, LogOptions, LogSink, LOG_FILE};
use crate::microvm::Restore;
use crate::microvm::{AgentInput, MicroVm, MicroVmError, MicroVmSpec, VmControl};
use crate::snapshot;
use crate::terminal::{InputRelay, RawMode};
use crate::units::parse_duration;

/// How long a guest may take to boot to its agent without `MVM_BOOT_TIMEOUT`.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The guest network when the spec names none: rootless user networking where passt is
/// installed, else none.
fn default_network() -> NetworkMode {
    if devices::virtio::net::passt_available() {
        NetworkMode::User
    } else {
        log::info!(
            "passt is not installed: the guest has no network (install passt for --network user)"
        );
        NetworkMode::None
    }
}

/// The static guest agent: `MVM_AGENT`, or the one `scripts/build-agent.sh` builds next to mvm.
pub(crate) fn find_agent() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("MVM_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::System("cannot find mvm's own path".into(), e))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [
        dir.join("mvm-agent-static"),
        dir.join("../x86_64-unknown-linux-gnu/release/mvm-agent"),
        dir.join("../../x86_64-unknown-linux-gnu/release/mvm-agent"),
        dir.join("../x86_64-unknown-linux-gnu/debug/mvm-agent"),
        dir.join("../../x86_64-unknown-linux-gnu/debug/mvm-agent"),
        PathBuf::from("/usr/local/lib/mvm/mvm-agent"),
    ];
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        bad_input(
            "the static guest agent was not found: run scripts/build-agent.sh (or set MVM_AGENT)",
        )
    })
}

/// The agent's initramfs, cached under the mvm root by the agent binary's size and mtime.
fn agent_initramfs(root: &Path, agent: &Path) -> Result<PathBuf, Error> {
    let meta = std::fs::metadata(agent).map_err(io_error("read the guest agent", agent))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let dir = root.join("cache");
    rootfs_builder::rootdir::prepare_root(root)?;
    let out = dir.join(format!("agent-{}-{mtime}.cpio", meta.len()));
    if !out.exists() {
        let build = || -> Result<(), InitramfsError> {
            let mut cpio = Initramfs::new();
            cpio.dir("dev", 0o755)?
                .char_dev("dev/console", 0o600, 5, 1)?
                .dir("proc", 0o555)?
                .dir("sys", 0o555)?
                .dir("run", 0o755)?
                .dir("tmp", 0o1777)?
                .dir(guest::ROOTFS_DIR.trim_start_matches('/'), 0o755)?
                .host_file("init", 0o755, agent)?;
            cpio.write_file(&out).map(drop)
        };
        build()?;
    }
    Ok(out)
}

/// Makes what a VM of the unpacked image `rootfs_dir` takes from the caches under `root` (the
/// agent's initramfs, the image's disk), so that a later run finds them there.
pub(crate) fn warm_vm_caches(root: &Path, rootfs_dir: &Path) -> Result<(), Error> {
    agent_initramfs(root, &find_agent()?)?;
    if rootfs_dir.starts_with(image::rootfs_cache(root)) {
        // A cached image never touches the run directory.
        rootfs_disk(root, rootfs_dir, Path::new("/nonexistent"))?;
    }
    Ok(())
}

/// How long the guest may take to boot: `MVM_BOOT_TIMEOUT` (a duration), else 300 s.
fn boot_timeout() -> Duration {
    std::env::var("MVM_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| parse_duration(&s).ok())
        .unwrap_or(BOOT_TIMEOUT)
}

/// Runs the container in a microVM; returns its exit code.
pub(super) fn run(run: Run<'_>) -> Result<Exit, Error> {
    let spec = run.spec;
    let agent = find_agent()?;
    let initrd = agent_initramfs(run.root, &agent)?;
    let mut network = match &spec.network {
        Some(n) => n
            .vm_mode()
            .ok_or_else(|| bad_input(format!("invalid --network '{n}'")))?,
        None => default_network(),
    };
    // The runner names the tap, so the record knows it whatever the VMM does.
    if let NetworkMode::Tap {
        name: name @ None, ..
    } = &mut network
    {
        *name = Some(format!("mvm{}", &run.guard.record().id[..12]));
    }
    let run_dir = run.guard.dir().to_path_buf();
    // A fork restores its snapshot with the disks the snapshot was taken with.
    let (disk, mut volumes, restore) = match &spec.from_snapshot {
        Some(name) => {
            let (dir, disks) = snapshot::fork_disks(run.root, name, &run_dir)?;
            let volumes = volume_disks(&spec.volumes, &run_dir, Some(&disks.volumes))?;
            let restore = Restore {
                dir,
                id: name.clone(),
            };
            (disks.rootfs, volumes, Some(restore))
        }
        None => (
            rootfs_disk(run.root, &run.rootfs, &run_dir)?,
            volume_disks(&spec.volumes, &run_dir, None)?,
            None,
        ),
    };
    for (i, d) in volumes.disks.iter_mut().enumerate() {
        let dev = format!("vd{}", char::from(b'b' + u8::try_from(i).unwrap_or(0)));
        d.limits = spec.rate_limits.disk(&dev);
    }
    let net = crate::hostnet::guest_net_param(&network);
    let name = run.guard.record().name.clone();
    let hostname = spec.hostname.clone().unwrap_or_else(|| name.clone());
    let reach = match (&network, &net) {
        (NetworkMode::User, n) => Reach::User {
            addr: n.as_ref().map(|n| n.addr),
            gateway: n.as_ref().and_then(|n| n.gateway),
        },
        (NetworkMode::Tap { .. }, n) => Reach::Tap {
            addr: n.as_ref().map(|n| n.addr),
            gateway: n.as_ref().and_then(|n| n.gateway),
        },
        (NetworkMode::None, _) => Reach::None,
    };
    let etc_files = dns::etc_files(&spec.dns, &name, &hostname, reach, &dns::host_resolv_conf())?;
    let boot = BootParams {
        net,
        volumes: volumes.params,
        ..BootParams::default()
    };
    let container = ContainerSpec {
        id: guest::MAIN_CONTAINER.into(),
        rootfs: Rootfs::Overlay {
            lower: vec![PathBuf::from(guest::ROOTFS_DIR)],
            upper: PathBuf::from(guest::UPPER_DIR),
            work: PathBuf::from(guest::WORK_DIR),
        },
        process: run.process.clone(),
        // The container's name, as on the host (the agent's id is always `main`).
        hostname: Some(hostname),
        // The VM gets the memory and CPUs; the container inside may use all of them.
        limits: Limits {
            memory_bytes: None,
            cpus: None,
            pids_max: spec.limits.pids_max,
        },
        terminal: spec.tty,
        network: Network::Host,
        init: spec.init,
        cgroup_parent: None,
        mounts: (spec
            .mount_agent
            .then(|| agent_mount(PathBuf::from(guest::AGENT_BINARY))))
        .into_iter()
        .chain(volumes.mounts)
        .collect(),
        security: spec.security.clone(),
        etc_files,
    };
    let vm_spec = MicroVmSpec {
        kernel: spec.kernel_path(run.root),
        boot,
        kernel_args: spec.kernel_args.clone().unwrap_or_default(),
        initrd,
        rootfs_disk: disk,
        volumes: volumes.disks,
        mem_bytes: spec.vm_memory(),
        vcpus: spec.vm_vcpus(),
        network,
        ports: spec.publish.clone(),
        run_dir: run_dir.clone(),
        container,
        timeout: spec.timeout,
        boot_timeout: boot_timeout(),
        terminal: spec.tty.then(|| run.terminal_size()),
        dns: spec.dns.servers.clone(),
        rootfs_limits: spec.rate_limits.disk("vda"),
        net_limit: spec.rate_limits.network,
        fork: restore.is_some(),
        restore,
    };
    if let Some(sig) = pending_signal() {
        let msg = format!("stopped by signal {sig} before the VM started");
        return Err(CommandExit(128 + sig, msg).into());
    }
    supervise(run, vm_spec)
}

/// What the runner hands its VMM process: the VM, and where its container's output goes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunJob {
    /// The VM and its container.
    pub spec: MicroVmSpec,
    /// The container log.
    pub log: PathBuf,
    /// How the container log rotates.
    pub log_options: LogOptions,
    /// Echo the container's output on the VMM's stdout and stderr (a foreground run).
    pub echo: bool,
    /// Where the VMM's own stdout and stderr go once the container runs (`-d`).
    pub runner_log: Option<PathBuf>,
}

/// A SIGINT or SIGTERM that reached the runner and waits to be forwarded, if any (it stays
/// pending: the VMM gets it once it runs).
fn pending_signal() -> Option<i32> {
    // SAFETY: sigpending fills a valid set; sigismember reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut set);
        [libc::SIGINT, libc::SIGTERM]
            .into_iter()
            .find(|s| libc::sigismember(&set, *s) == 1)
    }
}

/// The runner's part: the VM's cgroup and jail, its VMM process started and waited for, the
/// record kept, and what the VMM leaves cleaned up.
fn supervise(mut run: Run<'_>, mut vm_spec: MicroVmSpec) -> Result<Exit, Error> {
    let spec = run.spec;
    let id = run.guard.record().id.clone();
    let run_dir = vm_spec.run_dir.clone();
    for w in spec.vmm.warnings() {
        eprintln!("mvm: warning: {w}");
    }
    let taps: Vec<String> = match &vm_spec.network {
        NetworkMode::Tap { name: Some(n), .. } => vec![n.clone()],
        _ => Vec::new(),
    };
    let limits = cgroup::limits(
        vm_spec.mem_bytes,
        vm_spec.vcpus,
        spec.limits.cpus,
        vm_spec.ports.len(),
    );
    let cgroup = VmmCgroup::create(&id, &limits).map_err(confine_error)?;
    if let Some(c) = &cgroup {
        run.guard.vmm_cgroup(c.dirs().to_vec())?;
    }
    let plan = confine::plan(run.root, &spec.vmm, [run_dir.clone()]).map_err(confine_error)?;
    let access = confine::open_run_dir(&run_dir, &plan).map_err(confine_error)?;
    // A fork restores its snapshot, never a template.
    let store = match vm_spec.fork {
        true => None,
        false => template::store(run.root, spec)?,
    };
    let vsock = vm_spec.vsock_path();
    let ended = (|| -> Result<(VmmExit, bool, Option<Error>), Error> {
        if let Some(store) = &store {
            vm_spec.restore = template::pick(&mut run, store, &vm_spec, &plan, cgroup.as_ref())?;
        }
        loop {
            let job = RunJob {
                log: run.guard.dir().join(LOG_FILE),
                log_options: spec.log,
                echo: !run.detached(),
                runner_log: run.detached().then(|| run_dir.join("runner.log")),
                spec: vm_spec.clone(),
            };
            let vmm = confine::spawn("run", &job, plan.clone(), spec.vmm.seccomp, cgroup.as_ref())
                .map_err(confine_error)?;
            let dirs = cgroup
                .as_ref()
                .map(|c| c.dirs().to_vec())
                .unwrap_or_default();
            run.guard.vmm(vmm.pid(), dirs)?;
            let mut running = false;
            let mut failed = None;
            let mut cannot = None;
            let mut relay = None;
            let exit = vmm
                .wait(|event| match event {
                    VmmEvent::Running if !running => {
                        running = true;
                        if let Err(e) = run.started(taps.clone(), None) {
                            failed = Some(e);
                        }
                        // The user's input (-i) and terminal size (-t) go over a session of
                        // their own, from here (the VMM is jailed).
                        if (spec.interactive || spec.tty) && !run.detached() {
                            match relay_input(&run, &vsock) {
                                Ok(r) => relay = Some(r),
                                Err(e) => log::warn!("no input for the container: {e}"),
                            }
                        }
                    }
                    VmmEvent::HostCannotSnapshot(why) => cannot = Some(why),
                    _ => {}
                })
                .map_err(confine_error)?;
            drop(relay);
            // A template this host's KVM cannot restore: the run starts again, cold.
            if let (Some(why), Some(store), false) = (&cannot, &store, running) {
                if vm_spec.restore.take().is_some() {
                    template::host_cannot(store, why);
                    continue;
                }
            }
            // A fork has nothing to fall back on.
            if let (Some(why), None) = (cannot, &store) {
                return Err(Error::Failed(format!("this host's KVM cannot {why}")));
            }
            return Ok((exit, running, failed));
        }
    })();
    drop(access);
    if let Some(c) = cgroup {
        if let Err(e) = c.remove() {
            log::warn!("{e}");
        }
    }
    let (exit, running, failed) = ended?;
    if let Some(e) = failed {
        return Err(e);
    }
    match exit {
        VmmExit::Code(code) if running => Ok(run.exited(code, false)),
        // The VMM said why on stderr, which is the user's (or the -d client's).
        VmmExit::Code(code) => Err(CommandExit(code.max(1), String::new()).into()),
        VmmExit::Signal(libc::SIGSYS) => Err(CommandExit(EXIT_FAILURE, String::new()).into()),
        VmmExit::Signal(sig) => Err(Error::Failed(format!(
            "the VMM process was killed by signal {sig}"
        ))),
    }
}

/// A relay of this terminal's input (and, with `-t`, its size) to the container's first process
/// and, with `-t` on a terminal, raw mode: both end when it is dropped.
type Relay = (Option<InputRelay>, Option<RawMode>);

fn relay_input(run: &Run<'_>, vsock: &Path) -> Result<Relay, Error> {
    let input = AgentInput::connect(vsock, MAIN_STREAM)?;
    if run.spec.tty {
        run.relay_terminal(Box::new(input))
    } else {
        Ok((Some(run.relay_input(Box::new(input))?), None))
    }
}

pub(super) fn confine_error(e: ConfineError) -> Error {
    Error::Failed(format!("{:#}", anyhow_like(&e)))
}

/// An error and its sources on one line (`a: b: c`).
fn anyhow_like(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The VMM process of `mvm run` (see [`crate::confine`]): sets the VM up, enters its jail,
/// runs the container and returns its exit code.
pub fn vmm_main(req: &VmmRequest) -> Result<i32, Error> {
    vmm::signals::install();
    req.send(&VmmEvent::Started);
    let job: RunJob = req.job().map_err(confine_error)?;
    let spec = &job.spec;
    let Some(prepared) = template::prepare_run(req, spec)? else {
        return Ok(EXIT_FAILURE);
    };
    let mut sink = LogSink::new(ContainerLog::open(&job.log, job.log_options)?, job.echo);
    let runner_log = match &job.runner_log {
        Some(path) => Some(
            rootfs_builder::rootdir::private_file()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io_error("create", path))?,
        ),
        None => None,
    };
    let (vsock, control) = (spec.vsock_path(), spec.control_path());
    confine::hand_over(req.jail(), &[&vsock, &control]).map_err(confine_error)?;
    req.confine().map_err(confine_error)?;
    if let Some(sig) = vmm::signals::received() {
        let msg = format!("stopped by signal {sig} before the VM started");
        return Err(CommandExit(128 + sig, msg).into());
    }
    let vm = match MicroVm::start(prepared, spec, Arc::new(VmControl::new(vsock))) {
        Err(MicroVmError::HostCannotSnapshot(why)) => {
            req.send(&VmmEvent::HostCannotSnapshot(why));
            return Ok(EXIT_FAILURE);
        }
        vm => vm?,
    };
    if let Some(log) = &runner_log {
        // SAFETY: dup2 only operates on descriptors; the log file is open.
        unsafe {
            libc::dup2(log.as_raw_fd(), 1);
            libc::dup2(log.as_raw_fd(), 2);
        }
    }
    req.send(&VmmEvent::Running);
    Ok(vm.wait(&mut sink)?)
}

/// The read-only bind mount of mvm's agent `source` at [`guest::AGENT_IN_CONTAINER`].
pub(crate) fn agent_mount(source: PathBuf) -> BindMount {
    BindMount {
        source,
        target: guest::AGENT_IN_CONTAINER.into(),
        readonly: true,
    }
}

/// The read-only disk image of the root filesystem: an image's unpacked root (under the rootfs
/// cache) is converted once and cached by its digest; a `--rootfs DIR` is converted for this run.
fn rootfs_disk(root: &Path, rootfs_dir: &Path, run_dir: &Path) -> Result<PathBuf, Error> {
    let cache = image::rootfs_cache(root);
    let cached_key = rootfs_dir
        .strip_prefix(&cache)
        .ok()
        .and_then(|k| k.to_str())
        .filter(|k| !k.contains('/'));
    let failed = |e| Error::Disk(format!("make a disk image of {}", rootfs_dir.display()), e);
    if let Some(key) = cached_key {
        return rootfs_builder::disk::rootfs_disk(
            rootfs_dir,
            &image::disk_cache(root),
            key,
            rootfs_builder::disk::DiskFormat::Ext4,
        )
        .map_err(failed);
    }
    let disk = run_dir.join("rootfs.ext4");
    rootfs_builder::disk::disk_from_dir(rootfs_dir, &disk, true).map_err(failed)?;
    Ok(disk)
}

/// A VM's volumes, each on its own disk.
#[derive(Debug, Default)]
struct VolumeDisks {
    /// The disks, /dev/vdb on.
    disks: Vec<BlockConfig>,
    /// The container's bind mounts, from where the agent mounts the disks.
    mounts: Vec<BindMount>,
    /// The agent's `mvm.volume=` boot parameters.
    params: Vec<VolumeParam>,
}

/// The disks of the VM container whose spec is `spec` and directory `run_dir` (see
/// [`snapshot::VmDisks`]): nothing is made; an image's disk is the cached one.
pub(crate) fn vm_disks(
    root: &Path,
    spec: &crate::spec::RunSpec,
    run_dir: &Path,
) -> Result<snapshot::VmDisks, Error> {
    let rootfs = match &spec.source {
        // Made for the container at its start (a fork's is its snapshot's).
        crate::spec::Source::Rootfs { .. } if spec.from_snapshot.is_none() => {
            run_dir.join("rootfs.ext4")
        }
        _ if spec.from_snapshot.is_some() => {
            let name = spec.from_snapshot.as_deref().unwrap_or_default();
            let (_, info) = snapshot::SnapshotStore::open(root)?.find(name)?;
            info.rootfs_disk.path
        }
        source => {
            let mut source = source.clone();
            let dir = super::resolve_source(root, &mut source)?.dir;
            rootfs_disk(root, &dir, run_dir)?
        }
    };
    let volumes = (0..spec.volumes.len())
        .map(|i| run_dir.join(format!("volume-{i}.ext4")))
        .collect();
    Ok(snapshot::VmDisks { rootfs, volumes })
}

/// Copies each volume directory onto a disk image in `run_dir` (the guest's /dev/vdb, vdc, ...),
/// or with `made`, takes those disk images (a fork's copies of its snapshot's).
fn volume_disks(
    volumes: &[BindMount],
    run_dir: &Path,
    made: Option<&[PathBuf]>,
) -> Result<VolumeDisks, Error> {
    let VolumeDisks {
        mut disks,
        mut mounts,
        mut params,
    } = VolumeDisks::default();
    for (i, v) in volumes.iter().enumerate() {
        // /dev/vda is the image; volumes follow in order.
        let dev = format!("vd{}", char::from(b'b' + u8::try_from(i).unwrap_or(0)));
        let path = match made.and_then(|m| m.get(i)) {
            Some(disk) => disk.clone(),
            None => {
                let path = run_dir.join(format!("volume-{i}.ext4"));
                rootfs_builder::disk::disk_from_dir(&v.source, &path, v.readonly).map_err(|e| {
                    Error::Disk(format!("copy {} onto a disk image", v.source.display()), e)
                })?;
                path
            }
        };
        disks.push(BlockConfig {
            path,
            read_only: v.readonly,
            serial: Some(format!("mvm-volume-{i}")),
            limits: Default::default(),
        });
        params.push(VolumeParam {
            dev: dev.clone(),
            readonly: v.readonly,
        });
        mounts.push(BindMount {
            source: Path::new(guest::VOLUMES_DIR).join(&dev),
            target: v.target.clone(),
            readonly: v.readonly,
        });
    }
    Ok(VolumeDisks {
        disks,
        mounts,
        params,
    })
}
