//! `mvm boot`: boot a kernel directly (no image, no agent) and wait for the VM to end.
//!
//! As every VM, it runs in a VMM process of its own, confined (see `engine::confine`): this
//! process starts it with the flags as a [`BootJob`], forwards SIGINT and SIGTERM to it, writes
//! the metrics file it reports, and exits with its code. The VMM ([`vmm_main`]) builds the VM
//! and its devices (or restores a snapshot, `--restore`), enters its jail and runs the guest.
//!
//! `--snapshot DIR` saves the running VM once its trigger fires and ends it: this process
//! creates DIR, the VMM creates the snapshot's files in it before its jail and writes them
//! through their descriptors; a failed snapshot exits 1 with one line and leaves no DIR.
//!
//! Exit codes: 0 when the guest resets (reboot) or the VM is stopped; 1 with one line on stderr
//! when it fails (guest panic, triple fault, KVM error, emulation failure, a forbidden system
//! call); 2 for bad input; 130 / 143 after SIGINT / SIGTERM.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use clap::Args;
use engine::confine::{self, cgroup, VmmCgroup, VmmEvent, VmmExit, VmmRequest, VmmSecurity};
use serde::{Deserialize, Serialize};

use devices::virtio::block::BlockConfig;

use engine::units::parse_size;
use vmm::builder::VmBuilder;
use vmm::config::{self, VmConfig};
use vmm::snapshot::SnapshotFiles;
use vmm::virtio_devices::{self, DevicesConfig, NetworkMode};

use crate::error::{bad_input, from_engine};

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
    /// Continue the VM saved in this directory instead of booting `config`'s kernel.
    #[serde(default)]
    pub restore: Option<PathBuf>,
    /// Save the VM once this fires, then end it.
    #[serde(default)]
    pub snapshot: Option<SnapshotTrigger>,
}

/// When and where `--snapshot` saves the VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotTrigger {
    /// The snapshot's directory (created, empty, by the supervisor).
    pub dir: PathBuf,
    /// Save after the VM ran this many milliseconds.
    pub after_ms: Option<u64>,
    /// Save once the console file printed this text.
    pub on: Option<String>,
}

/// How often the VMM reports the devices' counters.
const METRICS_EVERY: Duration = Duration::from_secs(1);

/// Starts the VMM process for the flags and returns mvm's exit code (the VMM's).
pub fn run(root: &Path, args: &BootArgs) -> anyhow::Result<i32> {
    let trigger = snapshot_trigger(args)?;
    let mut cfg = args.to_config()?;
    if let Some(dir) = &args.restore {
        // The VM's size is the snapshot's (its cgroup is sized from it); the snapshot is
        // checked in full by the VMM.
        if let Ok(state) = vmm::snapshot::SnapshotState::read(dir) {
            cfg.mem_bytes = state.machine.mem_bytes;
            cfg.vcpus = state.machine.vcpus;
        }
    }
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
        ..DevicesConfig::default()
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
    // What killed supervisors before this one left (nothing names it anywhere else).
    cgroup::prune_dead_boots(Path::new("/sys/fs/cgroup"));
    let cgroup = VmmCgroup::create(&cgroup::boot_name(std::process::id()), &limits)?;
    let plan = confine::plan(root, &security, visible)?;
    if let Some(t) = &trigger {
        std::fs::create_dir(&t.dir)
            .map_err(|e| bad_input(format!("cannot create {}: {e}", t.dir.display())))?;
    }
    let job = BootJob {
        config: cfg,
        devices,
        metrics: args.metrics.is_some(),
        restore: args.restore.clone(),
        snapshot: trigger.clone(),
    };
    let vmm = confine::spawn("boot", &job, plan, security.seccomp, cgroup.as_ref());
    let vmm = vmm.inspect_err(|_| remove_snapshot(trigger.as_ref()))?;
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
    // A snapshot that was not saved leaves no directory (the VMM said why).
    if exit != VmmExit::Code(0) {
        remove_snapshot(trigger.as_ref());
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

/// The `--snapshot` flags, checked.
fn snapshot_trigger(args: &BootArgs) -> anyhow::Result<Option<SnapshotTrigger>> {
    let Some(dir) = &args.snapshot else {
        return Ok(None);
    };
    let after_ms = match &args.snapshot_after {
        Some(after) => {
            let d = engine::units::parse_duration(after).map_err(|e| bad_input(e.to_string()))?;
            Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        }
        None => None,
    };
    if after_ms.is_none() && args.snapshot_on.is_none() {
        return Err(bad_input(
            "--snapshot needs --snapshot-after or --snapshot-on",
        ));
    }
    let dir = std::path::absolute(dir)
        .map_err(|e| bad_input(format!("--snapshot {}: {e}", dir.display())))?;
    Ok(Some(SnapshotTrigger {
        dir,
        after_ms,
        on: args.snapshot_on.clone(),
    }))
}

fn remove_snapshot(trigger: Option<&SnapshotTrigger>) {
    if let Some(t) = trigger {
        let _ = std::fs::remove_dir_all(&t.dir);
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
    let t0 = Instant::now();
    let serial_out = job.config.serial_out.clone();
    let built = match &job.restore {
        Some(dir) => {
            let console: Box<dyn std::io::Write + Send> = match &serial_out {
                Some(path) => Box::new(
                    vmm::console_log::ConsoleLog::create(path)
                        .map_err(|e| bad_input(format!("cannot open {}: {e}", path.display())))?,
                ),
                None => Box::new(std::io::stdout()),
            };
            VmBuilder::restore(dir, console)
        }
        None => VmBuilder::new(job.config),
    };
    let mut builder = built.map_err(|e| {
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
    // The snapshot's files and the console it watches are opened before the jail.
    let snapshot = match job.snapshot {
        Some(trigger) => Some(SnapshotWatch::open(trigger, serial_out.as_deref())?),
        None => None,
    };
    req.confine()?;
    let vm = builder.start()?;
    if job.restore.is_some() {
        log::info!("restored in {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
    }
    let snapshot = match snapshot {
        Some(watch) => Some(watch.start(&vm)?),
        None => None,
    };
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
    if let Some(job) = snapshot {
        return Ok(job.finish());
    }
    Ok(exit.exit_code())
}

/// `--snapshot`, set up before the jail: the snapshot's files and the console file it watches.
struct SnapshotWatch {
    trigger: SnapshotTrigger,
    files: SnapshotFiles,
    console: Option<std::fs::File>,
}

impl SnapshotWatch {
    fn open(trigger: SnapshotTrigger, serial_out: Option<&Path>) -> anyhow::Result<Self> {
        let files = SnapshotFiles::create(&trigger.dir)?;
        let console = match (&trigger.on, serial_out) {
            (Some(_), Some(path)) => Some(std::fs::File::open(path)?),
            (Some(_), None) => return Err(bad_input("--snapshot-on needs --serial-out")),
            (None, _) => None,
        };
        Ok(Self {
            trigger,
            files,
            console,
        })
    }

    /// Watches for the trigger on a thread of the VMM's own (confined before the guest runs),
    /// which saves the VM and then ends it.
    fn start(self, vm: &vmm::builder::RunningVm) -> anyhow::Result<SnapshotJob> {
        let Self {
            trigger,
            files,
            mut console,
        } = self;
        let (controller, handle) = (vm.controller(), vm.handle());
        let ended = Arc::new(AtomicBool::new(false));
        let gone = ended.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let confined = vmm::seccomp::confine(vmm::seccomp::ThreadKind::Runner);
                let ok = confined.is_ok();
                let _ = ready_tx.send(confined);
                if !ok {
                    return Err("the snapshot thread could not be confined".to_string());
                }
                let t0 = Instant::now();
                let mut seen = Vec::new();
                let mut due = || match (trigger.after_ms, &trigger.on, console.as_mut()) {
                    (Some(ms), ..) => t0.elapsed() >= Duration::from_millis(ms),
                    (None, Some(text), Some(file)) => {
                        // Plain reads (the file grows; each goes on where the last stopped).
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = file.read(&mut buf) {
                            seen.extend_from_slice(&buf[..n]);
                        }
                        seen.windows(text.len()).any(|w| w == text.as_bytes())
                    }
                    _ => true,
                };
                while !due() {
                    if gone.load(Ordering::SeqCst) {
                        return Err("the VM ended before its snapshot was taken".to_string());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let saved = controller.snapshot(files);
                handle.stop();
                let r =
                    saved.map_err(|e| format!("snapshot failed: {:#}", anyhow::Error::new(e)))?;
                eprintln!(
                    "mvm: saved in {} (vCPUs paused {:.1} ms, {} pages of data)",
                    trigger.dir.display(),
                    r.paused_for.as_secs_f64() * 1000.0,
                    r.data_pages
                );
                Ok(())
            })?;
        ready_rx.recv()??;
        Ok(SnapshotJob { ended, thread })
    }
}

/// `--snapshot` under way.
struct SnapshotJob {
    ended: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl SnapshotJob {
    /// After the VM ended: 0 with the snapshot saved, else 1 with one line (the supervisor
    /// removes the directory).
    fn finish(self) -> i32 {
        self.ended.store(true, Ordering::SeqCst);
        let result = self
            .thread
            .join()
            .unwrap_or_else(|_| Err("snapshot failed".to_string()));
        match result {
            Ok(()) => 0,
            Err(why) => {
                eprintln!("mvm: {why}");
                1
            }
        }
    }
}
