//! `mvm run --isolation vm`: the root filesystem becomes a read-only ext4 disk, the static guest
//! agent becomes the initramfs's `/init`, and [`crate::microvm`] boots the guest kernel, starts the
//! container through the agent and streams its output (see [`super::runner`] for `-d` and the
//! container's record).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use devices::virtio::block::BlockConfig;
use guest_agent::protocol::GUEST_VOLUMES_DIR;
use guest_agent::runtime::spec::BindMount;
use guest_agent::runtime::{command, ContainerSpec, Limits, Network, Rootfs};
use rootfs_builder::initramfs::Initramfs;

use super::bad_input;
use super::run::{RunArgs, Source};
use super::runner::{self, LogSink, RunGuard};
use crate::microvm::{MicroVm, MicroVmSpec};
use crate::portfwd::PortMapping;
use crate::state::{ContainerRecord, StateError, StateStore};
use crate::virtio_devices::NetworkMode;

/// Where the guest agent mounts the image disk (see `mvm-agent`).
const GUEST_ROOTFS: &str = "/mnt/rootfs";

/// The guest network when `--network` is not given: rootless user networking where passt is
/// installed, else none.
fn default_network() -> &'static str {
    if devices::virtio::net::passt_available() {
        "user"
    } else {
        log::info!(
            "passt is not installed: the guest has no network (install passt for --network user)"
        );
        "none"
    }
}

/// Guest memory without `--mem`.
const DEFAULT_VM_MEMORY: u64 = 256 << 20;
/// The least guest memory the kernel and the agent start in.
const MIN_VM_MEMORY: u64 = 64 << 20;

/// Parses `--timeout`: seconds, or a number with s, m or h.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (num, unit) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)
        .ok_or_else(|| format!("invalid duration '{text}': use e.g. 30s, 5m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration '{text}': use e.g. 30s, 5m or 1h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// The static guest agent: `MVM_AGENT`, or the one `scripts/build-agent.sh` builds next to mvm.
fn find_agent() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MVM_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find mvm's own path")?;
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
fn agent_initramfs(root: &Path, agent: &Path) -> anyhow::Result<PathBuf> {
    let meta =
        std::fs::metadata(agent).with_context(|| format!("guest agent {}", agent.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let dir = root.join("cache");
    rootfs_builder::rootdir::prepare_root(root)?;
    let out = dir.join(format!("agent-{}-{mtime}.cpio", meta.len()));
    if !out.exists() {
        let mut cpio = Initramfs::new();
        cpio.dir("dev", 0o755)?
            .char_dev("dev/console", 0o600, 5, 1)?
            .dir("proc", 0o555)?
            .dir("sys", 0o555)?
            .dir("run", 0o755)?
            .dir("tmp", 0o1777)?
            .dir("mnt/rootfs", 0o755)?
            .host_file("init", 0o755, agent)?;
        cpio.write_file(&out)?;
    }
    Ok(out)
}

/// Runs the container in a microVM; returns its exit code.
pub fn run_vm(
    root: &Path,
    args: &RunArgs,
    limits: Limits,
    source: Source,
    process: command::Process,
) -> anyhow::Result<i32> {
    let [rootfs_dir] = source.lower.as_slice() else {
        return Err(bad_input("a VM runs one root filesystem directory"));
    };
    let security = super::run::security(args)?;
    let kernel = match &args.kernel {
        Some(k) => k.clone(),
        None => root.join("kernel/vmlinux"),
    };
    if !kernel.is_file() {
        return Err(bad_input(format!(
            "no guest kernel at {}: build it with scripts/build-kernel.sh or pass --kernel PATH",
            kernel.display()
        )));
    }
    // The VM gets the memory limit (256M by default); the container inside may use all of it.
    let mem_bytes = match limits.memory_bytes {
        Some(m) if m < MIN_VM_MEMORY => {
            return Err(bad_input(format!(
                "--mem {}: a microVM needs at least 64M",
                args.mem.as_deref().unwrap_or_default()
            )))
        }
        Some(m) => m,
        None => DEFAULT_VM_MEMORY,
    };
    if let Some(host) = crate::host::mem_total().filter(|h| mem_bytes > *h) {
        return Err(bad_input(format!(
            "--mem {}: more than this host's {} MiB of RAM",
            args.mem.as_deref().unwrap_or_default(),
            host >> 20
        )));
    }
    let network: NetworkMode = args
        .network
        .as_deref()
        .map_or_else(|| default_network().parse(), str::parse)
        .map_err(|e: crate::virtio_devices::DeviceSetupError| bad_input(e.to_string()))?;
    let ports = args
        .publish
        .iter()
        .map(|p| {
            p.parse::<PortMapping>()
                .map_err(|e| bad_input(e.to_string()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let timeout = args
        .timeout
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(bad_input)?;
    let agent = find_agent()?;
    let initrd = agent_initramfs(root, &agent)?;

    if args.detach && !runner::is_runner() {
        // The runner checks the name again (atomically); this only fails fast.
        if let Some(name) = &args.name {
            if let Ok(store) = StateStore::open(root) {
                if store.get(name).is_ok_and(|r| &r.name == name) {
                    return Err(bad_input(StateError::NameInUse(name.clone()).to_string()));
                }
            }
        }
        return runner::detach();
    }
    runner::catch_termination();
    let store = StateStore::open(root)?;
    let id = crate::state::new_id();
    let name = args.name.clone().unwrap_or_else(|| id[..12].to_string());
    let image = match (&args.image, &args.rootfs) {
        (Some(image), _) => image.clone(),
        (None, Some(dir)) => dir.display().to_string(),
        (None, None) => String::new(),
    };
    let record = ContainerRecord::new(
        id,
        name,
        image,
        "vm",
        process.args.clone(),
        args.publish.clone(),
    );
    let mut guard = RunGuard::create(store, record, args.rm).map_err(|e| match e {
        StateError::NameInUse(_) | StateError::InvalidName(_) => bad_input(e.to_string()),
        e => e.into(),
    })?;
    let run_dir = guard.dir().to_path_buf();
    let disk = rootfs_disk(root, rootfs_dir, &run_dir)?;
    let net_arg = crate::hostnet::guest_net_param(&network)
        .map(|p| format!("mvm.net={p}"))
        .unwrap_or_default();
    let (volume_disks, mounts, volume_args) = volume_disks(&super::run::volumes(args)?, &run_dir)?;

    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let vcpus = args.cpus.map_or(1, |c| c.ceil().clamp(1.0, 32.0) as u8);
    let container = ContainerSpec {
        id: "main".into(),
        rootfs: Rootfs::Overlay {
            lower: vec![PathBuf::from(GUEST_ROOTFS)],
            upper: PathBuf::from("/run/mvm/upper"),
            work: PathBuf::from("/run/mvm/work"),
        },
        args: process.args,
        env: process.env,
        cwd: process.cwd,
        user: process.user,
        hostname: args.hostname.clone(),
        limits: Limits {
            memory_bytes: None,
            cpus: None,
            pids_max: limits.pids_max,
        },
        terminal: false,
        network: Network::Host,
        init: args.init,
        cgroup_parent: None,
        mounts,
        security,
    };
    let spec = MicroVmSpec {
        kernel,
        kernel_args: format!(
            "{volume_args} {net_arg} {}",
            args.kernel_args.as_deref().unwrap_or_default()
        ),
        initrd,
        rootfs_disk: disk,
        volumes: volume_disks,
        mem_bytes,
        vcpus,
        network,
        ports,
        run_dir: run_dir.clone(),
        container: serde_json::to_value(&container)?,
        stdin: false,
        timeout,
        boot_timeout: Duration::from_secs(
            std::env::var("MVM_BOOT_TIMEOUT")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(300),
        ),
    };
    if let Some(sig) = runner::terminated() {
        let msg = format!("stopped by signal {sig} before the VM started");
        return Err(super::run::CommandExit(128 + sig, msg).into());
    }
    let vm = MicroVm::start(&spec)?;
    guard.running(vm.tap_name().map(str::to_string).into_iter().collect())?;
    if runner::is_runner() {
        runner::announce_ready(&guard.record().id, &run_dir)?;
    }
    let mut sink = LogSink::new(&run_dir.join("container.log"), !runner::is_runner())?;
    let code = vm.wait(&mut sink)?;
    guard.exited(code);
    Ok(code)
}

/// The read-only disk image of the root filesystem: an image's unpacked root (under the rootfs
/// cache) is converted once and cached by its digest; a `--rootfs DIR` is converted for this run.
fn rootfs_disk(root: &Path, rootfs_dir: &Path, run_dir: &Path) -> anyhow::Result<PathBuf> {
    let cache = super::image::rootfs_cache(root);
    let cached_key = rootfs_dir
        .strip_prefix(&cache)
        .ok()
        .and_then(|k| k.to_str())
        .filter(|k| !k.contains('/'));
    if let Some(key) = cached_key {
        return rootfs_builder::disk::rootfs_disk(
            rootfs_dir,
            &disk_cache(root),
            key,
            rootfs_builder::disk::DiskFormat::Ext4,
        )
        .with_context(|| format!("cannot make a disk image of {}", rootfs_dir.display()));
    }
    let disk = run_dir.join("rootfs.ext4");
    rootfs_builder::disk::disk_from_dir(rootfs_dir, &disk, true)
        .with_context(|| format!("cannot make a disk image of {}", rootfs_dir.display()))?;
    Ok(disk)
}

/// Most `-v` volumes of one VM (each is a virtio-blk device).
const MAX_VOLUMES: usize = 8;

/// Copies each `-v` directory onto a disk image in `run_dir` (the guest's /dev/vdb, vdc, ...):
/// returns the disks, the container's bind mounts from where the agent mounts them, and the
/// agent's `mvm.volume=` kernel arguments.
fn volume_disks(
    volumes: &[BindMount],
    run_dir: &Path,
) -> anyhow::Result<(Vec<BlockConfig>, Vec<BindMount>, String)> {
    if volumes.len() > MAX_VOLUMES {
        return Err(bad_input(format!(
            "at most {MAX_VOLUMES} volumes (-v) per VM"
        )));
    }
    let mut disks = Vec::new();
    let mut mounts = Vec::new();
    let mut kernel_args = Vec::new();
    for (i, v) in volumes.iter().enumerate() {
        if !v.source.is_dir() {
            return Err(bad_input(format!(
                "-v {}: a VM volume must be a directory",
                v.source.display()
            )));
        }
        // /dev/vda is the image; volumes follow in order.
        let dev = format!("vd{}", char::from(b'b' + u8::try_from(i).unwrap_or(0)));
        let path = run_dir.join(format!("volume-{i}.ext4"));
        rootfs_builder::disk::disk_from_dir(&v.source, &path, v.readonly)
            .with_context(|| format!("cannot copy {} onto a disk image", v.source.display()))?;
        disks.push(BlockConfig {
            path,
            read_only: v.readonly,
            serial: Some(format!("mvm-volume-{i}")),
        });
        kernel_args.push(format!(
            "mvm.volume={dev}{}",
            if v.readonly { ":ro" } else { "" }
        ));
        mounts.push(BindMount {
            source: Path::new(GUEST_VOLUMES_DIR).join(&dev),
            target: v.target.clone(),
            readonly: v.readonly,
        });
    }
    Ok((disks, mounts, kernel_args.join(" ")))
}

/// Where the disk images of image root filesystems are cached.
pub fn disk_cache(root: &Path) -> PathBuf {
    super::image::rootfs_cache(root).with_file_name("disks")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "0", "-1s", "1d", "abc", "1.5.2s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
