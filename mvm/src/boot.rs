//! `mvm boot`: boot a kernel directly (no image, no agent) and wait for the VM to end.
//!
//! As every VM, it runs in a VMM process of its own, confined (see `engine::confine`): this
//! process starts it with the flags as a [`BootJob`], forwards SIGINT and SIGTERM to it, writes
//! the metrics file it reports, and exits with its code. The VMM ([`vmm_main`]) builds the VM
//! and its devices, enters its jail and runs the guest.
//!
//! Exit codes: 0 when the guest resets (reboot) or the VM is stopped; 1 with one line on stderr
//! when it fails (guest panic, triple fault, KVM error, emulation failure, a forbidden system
//! call); 2 for bad input; 130 / 143 after SIGINT / SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use clap::Args;
use engine::confine::{self, cgroup, VmmCgroup, VmmEvent, VmmExit, VmmRequest, VmmSecurity};
use serde::{Deserialize, Serialize};

use devices::virtio::block::BlockConfig;

use engine::units::parse_size;
use vmm::builder::VmBuilder;
use vmm::config::{self, VmConfig};
use vmm::virtio_devices::{self, DevicesConfig, NetworkMode};

use crate::error::{bad_input, from_engine};

/// Flags of `mvm boot`.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
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
    /// A virtio-vsock device whose host side is this Unix socket. The guest's connections go to
    /// listeners at PATH_PORT, which the jailed VMM reaches as its own unprivileged user: their
    /// directory must let it through and the listener let it connect.
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// A virtio-rng entropy device fed from the host's getrandom.
    #[arg(long)]
    pub rng: bool,
    /// Write every device's counters as JSON to this file (every second and at exit).
    #[arg(long, value_name = "PATH")]
    pub metrics: Option<PathBuf>,
    /// The VMM's confinement: vmm-seccomp=off, vmm-jail=off (both for debugging only),
    /// vmm-user=UID[:GID] or vmm-user=range[:BASE:SIZE].
    #[arg(long = "security-opt", value_name = "OPT")]
    pub security_opt: Vec<String>,
    /// Rate limit of the network, each direction: BYTES[:PACKETS] per second (e.g. 1mb:1000).
    #[arg(long, value_name = "RATE")]
    pub network_rate: Option<String>,
}

impl BootArgs {
    /// The VM configuration these flags describe.
    pub fn to_config(&self) -> anyhow::Result<VmConfig> {
        let mem_bytes = parse_size(&self.mem).map_err(|e| bad_input(e.to_string()))?;
        Ok(VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            mem_bytes,
            vcpus: self.cpus,
            serial_out: self.serial_out.clone(),
            serial_stdin: true,
        })
    }
}

/// What `mvm boot` hands its VMM process.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootJob {
    /// The VM.
    pub config: VmConfig,
    /// Its devices.
    pub devices: DevicesConfig,
    /// Report the devices' counters (every second and at the end).
    pub metrics: bool,
}

/// How often the VMM reports the devices' counters.
const METRICS_EVERY: Duration = Duration::from_secs(1);

/// Starts the VMM process for the flags and returns mvm's exit code (the VMM's).
pub fn run(root: &Path, args: &BootArgs) -> anyhow::Result<i32> {
    let cfg = args.to_config()?;
    let network: NetworkMode = args
        .network
        .parse()
        .map_err(|e: virtio_devices::DeviceSetupError| bad_input(e.to_string()))?;
    let mut rates = engine::spec::RateLimits::default();
    if let Some(rate) = &args.network_rate {
        rates.apply_network(rate).map_err(from_engine)?;
    }
    let devices = DevicesConfig {
        disks: args.disks.clone(),
        network,
        vsock: args.vsock.clone(),
        rng: args.rng,
        net_limit: rates.network,
    };
    let mut security = VmmSecurity::default();
    for opt in &args.security_opt {
        if !security
            .apply_opt(opt)
            .map_err(|e| bad_input(e.to_string()))?
        {
            return Err(bad_input(format!(
                "--security-opt {opt}: mvm boot takes only the VMM's (vmm-...)"
            )));
        }
    }
    for w in security.warnings() {
        eprintln!("mvm: warning: {w}");
    }
    // Held until the VMM handles them, then forwarded to it.
    guest_agent::runtime::block_forwarded_signals()?;
    // The guest's vsock connections go to listeners next to the socket.
    let visible = args
        .vsock
        .as_ref()
        .and_then(|v| std::path::absolute(v).ok())
        .and_then(|v| v.parent().map(Path::to_path_buf));
    let limits = cgroup::limits(cfg.mem_bytes, cfg.vcpus, None, 0);
    let cgroup = VmmCgroup::create(&format!("boot-{}", std::process::id()), &limits)?;
    let plan = confine::plan(root, &security, visible)?;
    let job = BootJob {
        config: cfg,
        devices,
        metrics: args.metrics.is_some(),
    };
    let vmm = confine::spawn("boot", &job, plan, security.seccomp, cgroup.as_ref())?;
    let exit = vmm.wait(|event| {
        if let (VmmEvent::Metrics(m), Some(path)) = (event, &args.metrics) {
            if let Err(e) = write_metrics(path, &m) {
                log::warn!("cannot write {}: {e}", path.display());
            }
        }
    })?;
    // A confined VMM may not remove files: its vsock socket is removed here.
    if let Some(v) = &args.vsock {
        let _ = std::fs::remove_file(v);
    }
    if let Some(c) = cgroup {
        c.remove()?;
    }
    match exit {
        VmmExit::Code(code) => Ok(code),
        // The VMM printed the line that says which call its filter forbade.
        VmmExit::Signal(libc::SIGSYS) => Err(engine::CommandExit(1, String::new()).into()),
        VmmExit::Signal(sig) => Err(anyhow::anyhow!(
            "the VMM process was killed by signal {sig}"
        )),
    }
}

/// Writes the counters to `path` atomically (temp file, then rename).
fn write_metrics(path: &Path, metrics: &serde_json::Value) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(metrics)?)?;
    std::fs::rename(tmp, path)
}

/// The VMM process of `mvm boot`: builds the VM and its devices, enters the jail, runs the
/// guest until it ends and returns mvm's exit code.
pub fn vmm_main(req: &VmmRequest) -> anyhow::Result<i32> {
    vmm::signals::install();
    req.send(&VmmEvent::Started);
    let job: BootJob = req.job()?;
    let mut builder = VmBuilder::new(job.config).map_err(|e| {
        if e.is_bad_input() {
            bad_input(format!("{:#}", anyhow::Error::new(e)))
        } else {
            anyhow::Error::new(e)
        }
    })?;
    let attached = virtio_devices::attach(&mut builder, &job.devices).map_err(|e| {
        let msg = format!("{:#}", anyhow::Error::new(e));
        bad_input(msg)
    })?;
    if let Some(tap) = &attached.tap_name {
        log::info!("network: tap {tap}");
    }
    req.confine()?;
    let vm = builder.start()?;
    // The metrics reporter: one of the VMM's own threads, confined before the guest runs.
    let stop = Arc::new(AtomicBool::new(false));
    let reporter = if job.metrics {
        let (stop, attached) = (stop.clone(), Arc::new(attached));
        let (ready_tx, ready_rx) = mpsc::channel();
        let events = req.events();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                let confined = vmm::seccomp::confine(vmm::seccomp::ThreadKind::Runner);
                let ok = confined.is_ok();
                let _ = ready_tx.send(confined);
                while ok && !stop.load(Ordering::SeqCst) {
                    events.send(&VmmEvent::Metrics(attached.metrics_json()));
                    std::thread::sleep(METRICS_EVERY);
                }
                events.send(&VmmEvent::Metrics(attached.metrics_json()));
            })?;
        ready_rx.recv()??;
        Some(thread)
    } else {
        None
    };
    let exit = vm.wait();
    stop.store(true, Ordering::SeqCst);
    if let Some(t) = reporter {
        let _ = t.join();
    }
    if exit.is_failure() {
        eprintln!("mvm: {exit}");
    } else {
        log::info!("{exit}");
    }
    Ok(exit.exit_code())
}
