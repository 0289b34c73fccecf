//! `mvm boot`: boot a kernel directly (no image, no agent) and wait for the VM to end.
//!
//! Exit codes: 0 when the guest resets (reboot) or the VM is stopped; 1 with one line on stderr
//! when it fails (guest panic, triple fault, KVM error, emulation failure); 2 for bad input;
//! 130 / 143 after SIGINT / SIGTERM.

use std::path::PathBuf;

use clap::Args;

use devices::virtio::block::BlockConfig;

use engine::units::parse_size;
use vmm::builder::VmBuilder;
use vmm::config::{self, VmConfig};
use vmm::virtio_devices::{self, DevicesConfig, NetworkMode};

use crate::error::bad_input;

/// Flags of `mvm boot`.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "restore")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (initramfs cpio).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = config::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest memory: bytes or a size with K/M/G/T (e.g. 256M, 1.5G), as `run --mem`.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub mem: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,
    /// Write the serial console to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub serial_out: Option<PathBuf>,
    /// A virtio-blk disk from a raw image: PATH[,ro][,serial=ID]; repeat for more (vda, vdb, ...).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    pub disks: Vec<BlockConfig>,
    /// Guest network: user (rootless, passt), tap, tap:NAME[,HOSTIP/PREFIX] or none.
    #[arg(long, value_name = "MODE", default_value = "none")]
    pub network: String,
    /// A virtio-vsock device whose host side is this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// A virtio-rng entropy device fed from the host's getrandom.
    #[arg(long)]
    pub rng: bool,
    /// Write every device's counters as JSON to this file (every second and at exit).
    #[arg(long, value_name = "PATH")]
    pub metrics: Option<PathBuf>,
    /// Save the running VM into this directory (created; must not exist) after
    /// --snapshot-after or once the console printed --snapshot-on, then end it.
    #[arg(long, value_name = "DIR")]
    pub snapshot: Option<PathBuf>,
    /// How long the VM runs before --snapshot saves it (e.g. 20s).
    #[arg(long, value_name = "DURATION", requires = "snapshot")]
    pub snapshot_after: Option<String>,
    /// Save the VM (--snapshot) once its console printed this text (needs --serial-out).
    #[arg(long, value_name = "TEXT", requires_all = ["snapshot", "serial_out"], conflicts_with = "snapshot_after")]
    pub snapshot_on: Option<String>,
    /// Continue the VM saved in this directory instead of booting a kernel; give it the same
    /// devices (--disk, --network, --vsock, --rng) in the same order. Its memory is mapped
    /// from the snapshot, shared with every other VM restored from it.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "snapshot"])]
    pub restore: Option<PathBuf>,
}

impl BootArgs {
    /// The VM configuration these flags describe.
    pub fn to_config(&self) -> anyhow::Result<VmConfig> {
        let mem_bytes = parse_size(&self.mem).map_err(|e| bad_input(e.to_string()))?;
        Ok(VmConfig {
            kernel: self.kernel.clone().unwrap_or_default(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            mem_bytes,
            vcpus: self.cpus,
            serial_out: self.serial_out.clone(),
            serial_stdin: true,
        })
    }
}

/// Boots the VM and returns mvm's exit code.
pub fn run(args: &BootArgs) -> anyhow::Result<i32> {
    if args.snapshot.is_some() && args.snapshot_after.is_none() && args.snapshot_on.is_none() {
        return Err(bad_input(
            "--snapshot needs --snapshot-after or --snapshot-on",
        ));
    }
    let cfg = args.to_config()?;
    let network: NetworkMode = args
        .network
        .parse()
        .map_err(|e: virtio_devices::DeviceSetupError| bad_input(e.to_string()))?;
    let devices = DevicesConfig {
        disks: args.disks.clone(),
        network,
        vsock: args.vsock.clone(),
        rng: args.rng,
    };
    let t0 = std::time::Instant::now();
    let built = match &args.restore {
        Some(dir) => {
            let console: Box<dyn std::io::Write + Send> = match &args.serial_out {
                Some(path) => Box::new(
                    vmm::console_log::ConsoleLog::create(path)
                        .map_err(|e| bad_input(format!("cannot open {}: {e}", path.display())))?,
                ),
                None => Box::new(std::io::stdout()),
            };
            VmBuilder::restore(dir, console)
        }
        None => VmBuilder::new(cfg),
    };
    let mut builder = built.map_err(|e| {
        if e.is_bad_input() {
            bad_input(format!("{:#}", anyhow::Error::new(e)))
        } else {
            anyhow::Error::new(e)
        }
    })?;
    let attached = virtio_devices::attach(&mut builder, &devices).map_err(|e| {
        let msg = format!("{:#}", anyhow::Error::new(e));
        bad_input(msg)
    })?;
    if let Some(tap) = &attached.tap_name {
        log::info!("network: tap {tap}");
    }
    let metrics = args.metrics.clone();
    let vm = builder.start()?;
    if args.restore.is_some() {
        log::info!("restored in {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
    }
    let snapshot = match &args.snapshot {
        Some(dir) => Some(SnapshotJob::start(args, dir, &vm)?),
        None => None,
    };
    let stop_metrics = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = metrics.clone().map(|path| {
        let stop = stop_metrics.clone();
        let snapshot = std::sync::Arc::new(attached);
        let shared = snapshot.clone();
        let thread = std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = shared.write_metrics(&path);
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            let _ = shared.write_metrics(&path);
        });
        (thread, snapshot)
    });
    let exit = vm.wait();
    stop_metrics.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some((thread, _)) = writer {
        let _ = thread.join();
    }
    if exit.is_failure() {
        eprintln!("mvm: {exit}");
    } else {
        log::info!("{exit}");
    }
    if let Some(job) = snapshot {
        return job.finish();
    }
    Ok(exit.exit_code())
}

/// `--snapshot DIR`: saves the VM once its trigger fires, then ends it.
struct SnapshotJob {
    dir: PathBuf,
    ended: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl SnapshotJob {
    fn start(
        args: &BootArgs,
        dir: &std::path::Path,
        vm: &vmm::builder::RunningVm,
    ) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        use std::time::{Duration, Instant};
        let (after, on) = match (&args.snapshot_after, &args.snapshot_on) {
            (Some(after), None) => (
                Some(engine::units::parse_duration(after).map_err(|e| bad_input(e.to_string()))?),
                None,
            ),
            (None, Some(text)) => (
                None,
                Some((text.clone(), args.serial_out.clone().unwrap_or_default())),
            ),
            _ => {
                return Err(bad_input(
                    "--snapshot needs --snapshot-after or --snapshot-on",
                ))
            }
        };
        std::fs::create_dir(dir)
            .map_err(|e| bad_input(format!("cannot create {}: {e}", dir.display())))?;
        let (controller, handle) = (vm.controller(), vm.handle());
        let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (gone, target) = (ended.clone(), dir.to_path_buf());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let due = || match (&after, &on) {
                (Some(after), _) => t0.elapsed() >= *after,
                (None, Some((text, console))) => std::fs::read(console)
                    .is_ok_and(|c| c.windows(text.len()).any(|w| w == text.as_bytes())),
                (None, None) => true,
            };
            while !due() {
                if gone.load(Ordering::SeqCst) {
                    return Err("the VM ended before its snapshot was taken".to_string());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let saved = controller.snapshot(&target);
            handle.stop();
            let r = saved.map_err(|e| format!("snapshot failed: {:#}", anyhow::Error::new(e)))?;
            eprintln!(
                "mvm: saved in {} (vCPUs paused {:.1} ms, {} pages of data)",
                target.display(),
                r.paused_for.as_secs_f64() * 1000.0,
                r.data_pages
            );
            Ok(())
        });
        Ok(Self {
            dir: dir.to_path_buf(),
            ended,
            thread,
        })
    }

    /// After the VM ended: 0 with the snapshot saved, else 1 with one line and no directory.
    fn finish(self) -> anyhow::Result<i32> {
        self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
        let result = self
            .thread
            .join()
            .unwrap_or_else(|_| Err("snapshot failed".to_string()));
        match result {
            Ok(()) => Ok(0),
            Err(why) => {
                let _ = std::fs::remove_dir_all(&self.dir);
                eprintln!("mvm: {why}");
                Ok(1)
            }
        }
    }
}
