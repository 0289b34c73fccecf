//! `--isolation vm`: the root filesystem becomes a read-only ext4 disk, the static guest agent
//! becomes the initramfs's `/init`, and [`crate::microvm`] boots the guest kernel, starts the
//! container through the agent and streams its output.

use std::path::{Path, PathBuf};
use std::time::Duration;

use devices::virtio::block::BlockConfig;
use guest_agent::guest::{self, BootParams, VolumeParam};
use guest_agent::runtime::spec::BindMount;
use guest_agent::runtime::{ContainerSpec, Limits, Network, Rootfs};
use rootfs_builder::initramfs::{Initramfs, InitramfsError};
use vmm::virtio_devices::NetworkMode;

use super::context::{Exit, Run};
use crate::control::ControlServer;
use crate::error::{bad_input, io_error, CommandExit, Error};
use crate::image;
use crate::logs::LogSink;
use crate::microvm::{MicroVm, MicroVmSpec};
use crate::template::TemplateStore;
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

/// Where the VM's template is kept, unless the run boots cold: with `--cold` and where
/// `MVM_TEMPLATES=0` (a host whose KVM cannot save or restore a VM is found out, noted and
/// booted cold by `MicroVm::start`).
fn templates(root: &Path, spec: &crate::spec::RunSpec) -> Result<Option<TemplateStore>, Error> {
    if spec.cold || std::env::var("MVM_TEMPLATES").is_ok_and(|v| v == "0") {
        return Ok(None);
    }
    Ok(Some(TemplateStore::open(root)?))
}

/// Runs the container in a microVM; returns its exit code.
pub(super) fn run(mut run: Run<'_>) -> Result<Exit, Error> {
    let spec = run.spec;
    let agent = find_agent()?;
    let initrd = agent_initramfs(run.root, &agent)?;
    let network = match &spec.network {
        Some(n) => n
            .vm_mode()
            .ok_or_else(|| bad_input(format!("invalid --network '{n}'")))?,
        None => default_network(),
    };
    let run_dir = run.guard.dir().to_path_buf();
    let disk = rootfs_disk(run.root, &run.rootfs, &run_dir)?;
    let volumes = volume_disks(&spec.volumes, &run_dir)?;
    let boot = BootParams {
        net: crate::hostnet::guest_net_param(&network),
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
        hostname: spec.hostname.clone(),
        // The VM gets the memory and CPUs; the container inside may use all of them.
        limits: Limits {
            memory_bytes: None,
            cpus: None,
            pids_max: spec.limits.pids_max,
        },
        terminal: false,
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
        templates: templates(run.root, spec)?,
    };
    if let Some(sig) = vmm::signals::received() {
        let msg = format!("stopped by signal {sig} before the VM started");
        return Err(CommandExit(128 + sig, msg).into());
    }
    let vm = MicroVm::start(&vm_spec)?;
    run.started(
        vm.tap_name().map(str::to_string).into_iter().collect(),
        None,
    )?;
    let (store, id) = (run.guard.store().clone(), run.guard.record().id.clone());
    let control = ControlServer::start(&run_dir, vm.controller(), move |paused| {
        let mut record = store.load(&id)?;
        record.paused = paused;
        Ok(store.save(&record)?)
    })?;
    let mut sink = LogSink::new(&run.log_path(), !run.runner)?;
    let code = vm.wait(&mut sink);
    // No pause is recorded after this: the exit is.
    drop(control);
    Ok(run.exited(code?, false))
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

/// Copies each volume directory onto a disk image in `run_dir` (the guest's /dev/vdb, vdc, ...).
fn volume_disks(volumes: &[BindMount], run_dir: &Path) -> Result<VolumeDisks, Error> {
    let VolumeDisks {
        mut disks,
        mut mounts,
        mut params,
    } = VolumeDisks::default();
    for (i, v) in volumes.iter().enumerate() {
        // /dev/vda is the image; volumes follow in order.
        let dev = format!("vd{}", char::from(b'b' + u8::try_from(i).unwrap_or(0)));
        let path = run_dir.join(format!("volume-{i}.ext4"));
        rootfs_builder::disk::disk_from_dir(&v.source, &path, v.readonly).map_err(|e| {
            Error::Disk(format!("copy {} onto a disk image", v.source.display()), e)
        })?;
        disks.push(BlockConfig {
            path,
            read_only: v.readonly,
            serial: Some(format!("mvm-volume-{i}")),
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
