//! One container in its own microVM: boot the guest kernel with the agent as PID 1 and the image
//! as a read-only disk (or restore the run's template, see [`crate::template`], and hand the
//! agent the run's setup), talk to the agent over vsock, start the container, stream its output
//! and return its exit code; then power the VM off.
//!
//! Everything here runs in the VMM process (`crate::confine`): [`MicroVm::prepare`] and
//! [`TemplateVm::prepare`] before its jail (they open every file, the template's included),
//! [`MicroVm::start`] and [`TemplateVm::boot_and_save`] in it.

use std::io;
use std::net::IpAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use devices::virtio::block::{BlockConfig, BlockLimits};
use devices::virtio::rate_limiter::Limit;
use guest_agent::agent::client::{AgentClient, ClientError, OutputSink};
use guest_agent::guest::{BootParams, MAIN_CONTAINER, MAIN_STREAM, ROOTFS_DEVICE};
use guest_agent::protocol::{Setup, AGENT_VSOCK_PORT};
use guest_agent::runtime::{ContainerSpec, TermSize};
use vmm::builder::{BuildError, RunningVm, VcpuRelease, VmBuilder};
use vmm::config::VmConfig;
use vmm::exit::{VmExit, VmHandle};
use vmm::seccomp::{self, ThreadKind};
use vmm::snapshot::take::VmController;
use vmm::snapshot::SnapshotError;
use vmm::virtio_devices::{self, AttachedDevices, DeviceSetupError, DevicesConfig, NetworkMode};

use crate::control::{ControlServer, Controlled};
use crate::portfwd::{PortError, PortForwarder, PortMapping};
use crate::terminal::TerminalInput;

mod template;
pub use template::{template_key, TemplateJob, TemplateVm};

/// Exit code when `--timeout` runs out (as coreutils' `timeout`).
pub const EXIT_TIMEOUT: i32 = 124;

/// Kernel arguments mvm always passes (the agent's own are added to them).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

/// Errors running a container in a microVM.
#[derive(Debug, thiserror::Error)]
pub enum MicroVmError {
    /// The VM could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A device could not be set up.
    #[error(transparent)]
    Devices(#[from] DeviceSetupError),
    /// A port could not be published.
    #[error(transparent)]
    Port(#[from] PortError),
    /// The VM ended before its agent answered.
    #[error("the VM ended before its agent started: {exit}{console}")]
    EarlyExit {
        /// Why the VM ended.
        exit: VmExit,
        /// The last console line, if any (prefixed with "; console: ").
        console: String,
    },
    /// The agent did not answer in time.
    #[error("the guest agent did not answer within {0} s (see the console log {1})")]
    AgentTimeout(u64, PathBuf),
    /// The agent refused the container or the session broke.
    #[error("guest agent")]
    Agent(#[source] ClientError),
    /// A further session with the agent could not be opened.
    #[error("cannot reach the guest agent")]
    AgentConnect(#[source] devices::virtio::vsock::VsockError),
    /// The control socket could not be bound or served.
    #[error("control socket {0}")]
    Control(PathBuf, #[source] io::Error),
    /// A thread could not be confined.
    #[error(transparent)]
    Seccomp(#[from] vmm::seccomp::SeccompError),
    /// A template could not be made or restored.
    #[error("template {0}: {1}")]
    Template(String, String),
    /// A snapshot of a running container could not be restored (`mvm run --from-snapshot`).
    #[error("snapshot {0}: {1}")]
    Snapshot(String, String),
    /// This host's KVM cannot save or restore a VM (what failed); the run boots cold.
    #[error("this host's KVM cannot {0}")]
    HostCannotSnapshot(String),
}

/// What to run and how (handed to the VMM process as JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MicroVmSpec {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// The agent's boot parameters (the root disk, the agent's port and the published ports are
    /// filled in by [`MicroVm::prepare`]); in JSON as the kernel command line they become.
    #[serde(with = "boot_params")]
    pub boot: BootParams,
    /// Arguments appended to [`BASE_CMDLINE`] and the boot parameters (e.g. the test kernel's).
    pub kernel_args: String,
    /// The agent's initramfs.
    pub initrd: PathBuf,
    /// The image's root filesystem disk (attached read-only as /dev/vda).
    pub rootfs_disk: PathBuf,
    /// Further disks (volumes), /dev/vdb on.
    pub volumes: Vec<BlockConfig>,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The guest's network.
    pub network: NetworkMode,
    /// Published ports, forwarded over vsock.
    pub ports: Vec<PortMapping>,
    /// Directory for the VM's sockets and console log (created by the caller).
    pub run_dir: PathBuf,
    /// The container for the agent.
    pub container: ContainerSpec,
    /// Stop the VM and return [`EXIT_TIMEOUT`] after this long.
    pub timeout: Option<Duration>,
    /// How long the guest may take to boot to its agent.
    pub boot_timeout: Duration,
    /// The size of the container's terminal, when its spec asks for one.
    #[serde(default)]
    pub terminal: Option<TermSize>,
    /// With user networking, the resolvers passt advertises (its DHCP; the container's
    /// resolv.conf is [`crate::dns`]'s).
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// Rate limits of the root filesystem disk.
    #[serde(default)]
    pub rootfs_limits: BlockLimits,
    /// The network's rate limit, each direction.
    #[serde(default)]
    pub net_limit: Limit,
    /// The template to restore instead of booting the kernel (the runner picks it, and has it
    /// made first where there is none); `None`: a cold boot with the run's parameters on the
    /// kernel command line.
    #[serde(default)]
    pub restore: Option<Restore>,
    /// `restore` is a snapshot of a running container (`mvm run --from-snapshot`), not a
    /// template: its container runs on, so the run attaches to it instead of creating one.
    #[serde(default)]
    pub fork: bool,
}

/// A template a run restores.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restore {
    /// Its directory (`<root>/templates/<id>`).
    pub dir: PathBuf,
    /// Its id, for messages.
    pub id: String,
}

impl MicroVmSpec {
    /// The vsock socket of the VM (other processes reach the agent through it).
    pub fn vsock_path(&self) -> PathBuf {
        self.run_dir.join("vsock.sock")
    }

    /// The control socket of the run.
    pub fn control_path(&self) -> PathBuf {
        self.run_dir.join(crate::control::SOCKET)
    }

    /// The serial console log.
    pub fn console_path(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    /// The VMM's device counters, rewritten every [`METRICS_PERIOD`] (what `mvm stats` reads).
    pub fn metrics_path(&self) -> PathBuf {
        self.run_dir.join(METRICS_FILE)
    }
}

/// The device counters' file in a VM's directory.
pub const METRICS_FILE: &str = "metrics.json";
/// How often the device counters are written.
pub const METRICS_PERIOD: Duration = Duration::from_secs(1);

/// What the control socket may do to a microVM: signal its container through the agent, power
/// it off. It learns the VM once it is built and that the container runs once it does.
#[derive(Debug)]
pub struct VmControl {
    vsock: PathBuf,
    handle: Mutex<Option<VmHandle>>,
    controller: Mutex<Option<VmController>>,
    running: AtomicBool,
}

impl VmControl {
    /// The control of the VM whose vsock socket is `vsock`.
    pub fn new(vsock: PathBuf) -> Self {
        VmControl {
            vsock,
            handle: Mutex::new(None),
            controller: Mutex::new(None),
            running: AtomicBool::new(false),
        }
    }

    fn built(&self, handle: VmHandle) {
        *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    fn started(&self, controller: VmController) {
        *self.controller.lock().unwrap_or_else(|p| p.into_inner()) = Some(controller);
    }
}

impl Controlled for VmControl {
    fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    fn signal(&self, signal: i32) -> Result<(), String> {
        let conn = devices::virtio::vsock::host_connect(
            &self.vsock,
            AGENT_VSOCK_PORT,
            Duration::from_secs(10),
        )
        .map_err(|e| format!("cannot reach the guest agent: {e}"))?;
        let mut client = AgentClient::open(conn).map_err(|e| format!("guest agent: {e}"))?;
        client
            .signal(MAIN_CONTAINER, MAIN_STREAM, signal)
            .map_err(|e| format!("guest agent: {e}"))
    }

    fn terminate(&self) {
        if let Some(h) = self
            .handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            h.stop();
        }
    }

    fn pause(&self, paused: bool) -> Result<(), String> {
        let controller = self
            .controller
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| "the VM is not running yet".to_string())?;
        let done = if paused {
            controller.pause()
        } else {
            controller.resume()
        };
        done.map_err(|e| error_chain(&e))
    }

    fn snapshot(
        &self,
        dir: PathBuf,
        memory: std::fs::File,
        state: std::fs::File,
    ) -> Result<(u64, u64), String> {
        let controller = self
            .controller
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| "the VM is not running yet".to_string())?;
        let files = vmm::snapshot::SnapshotFiles::from_files(dir, memory, state);
        let report = controller.snapshot(files).map_err(|e| error_chain(&e))?;
        let paused_ms = u64::try_from(report.paused_for.as_millis()).unwrap_or(u64::MAX);
        Ok((paused_ms, report.data_pages))
    }

    fn debug_syscall(&self, thread: &str, nr: i64) -> Result<(), String> {
        if thread != seccomp::ThreadKind::Control.name() {
            return Err("only the control thread takes debug system calls".into());
        }
        // SAFETY: a test's request: the call gets null arguments, which the kernel checks
        // (a forbidden call never runs: the filter kills the process first).
        let r = unsafe { libc::syscall(nr, 0, 0, 0, 0, 0, 0) };
        log::debug!("debug system call {nr}: {r}");
        Ok(())
    }
}

/// A started microVM whose container runs.
pub struct MicroVm {
    handle: VmHandle,
    exit_rx: mpsc::Receiver<VmExit>,
    client: AgentClient<UnixStream>,
    stream: u32,
    _ports: Vec<PortForwarder>,
    _control: ControlServer,
    timed_out: Arc<AtomicBool>,
    console: ConsoleTail,
    tap_name: Option<String>,
    metrics: Option<MetricsWriter>,
}

/// A thread that writes the VMM's device counters to a file until the VM ends.
struct MetricsWriter {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl MetricsWriter {
    /// Rewrites `file` (opened before the jail) in place every [`METRICS_PERIOD`]; the thread
    /// inherits the caller's seccomp filter.
    fn start(devices: AttachedDevices, file: std::fs::File) -> Option<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                let mut written = 0;
                while !flag.load(Ordering::SeqCst) {
                    if let Err(e) = devices.write_metrics_to(&file, &mut written) {
                        log::debug!("device counters: {e}");
                    }
                    thread::park_timeout(METRICS_PERIOD);
                }
            })
            .ok()?;
        Some(MetricsWriter { stop, thread })
    }

    fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

impl std::fmt::Debug for MicroVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVm")
            .field("stream", &self.stream)
            .finish()
    }
}

/// The serial console log, opened for reading while the VM is built (a jailed VMM opens no file
/// by path), to quote its last line when the VM ends early.
#[derive(Debug)]
struct ConsoleTail {
    path: PathBuf,
    file: Option<std::fs::File>,
    tail: Vec<u8>,
}

impl ConsoleTail {
    /// How much of the log's end is kept.
    const KEEP: usize = 64 << 10;

    /// Opens the log at `path` (created by the VM's builder).
    fn open(path: PathBuf) -> Self {
        let file = std::fs::File::open(&path).ok();
        ConsoleTail {
            path,
            file,
            tail: Vec::new(),
        }
    }

    /// The last line the guest printed so far, if any, prefixed with "; console: ".
    fn last_line(&mut self) -> String {
        if let Some(file) = self.file.as_mut() {
            let mut buf = [0u8; 16 * 1024];
            // Plain reads, each going on where the last stopped (a confined thread may read).
            while let Ok(n @ 1..) = std::io::Read::read(file, &mut buf) {
                self.tail.extend_from_slice(&buf[..n]);
                if self.tail.len() > 2 * Self::KEEP {
                    self.tail.drain(..self.tail.len() - Self::KEEP);
                }
            }
        }
        String::from_utf8_lossy(&self.tail)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| format!("; console: {}", vmm::console_log::printable(l.trim())))
            .unwrap_or_default()
    }
}

/// [`BootParams`] in JSON as their kernel command-line words, which is what they are made for
/// (and which the agent parses back).
mod boot_params {
    use guest_agent::guest::BootParams;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &BootParams, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&p.to_cmdline())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BootParams, D::Error> {
        let text = String::deserialize(d)?;
        BootParams::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A microVM set up but not running: the VM with its memory and kernel (or the template's
/// state and memory), its devices (disks open, tap or passt up, the vsock socket bound) and its
/// control socket bound. This part needs mvm's privileges; [`MicroVm::start`] runs the rest, in
/// the jail.
pub struct PreparedVm {
    builder: VmBuilder,
    tap_name: Option<String>,
    mac: Option<[u8; 6]>,
    control: UnixListener,
    console: ConsoleTail,
    /// The devices' counters and the file they go to (`mvm stats`).
    metrics: Option<(AttachedDevices, std::fs::File)>,
    /// The id of the template it restores, if it does.
    restored: Option<String>,
}

impl std::fmt::Debug for PreparedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedVm")
            .field("tap_name", &self.tap_name)
            .field("restored", &self.restored)
            .finish_non_exhaustive()
    }
}

impl PreparedVm {
    /// The host tap device of the VM's network, with `--network tap`.
    pub fn tap_name(&self) -> Option<&str> {
        self.tap_name.as_deref()
    }
}

/// A VM whose event loop runs on a thread of its own, confined, and whose vCPUs wait for
/// `release`.
struct Launched {
    handle: VmHandle,
    controller: VmController,
    exit_rx: mpsc::Receiver<VmExit>,
    release: VcpuRelease,
}

impl Launched {
    /// Starts the event loop's thread (confined by the device filter before it serves a device).
    fn new(mut vm: RunningVm) -> Result<Self, MicroVmError> {
        let handle = vm.handle();
        let controller = vm.controller();
        let release = vm.hold();
        let (exit_tx, exit_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                // wait() reports a failure to confine this thread as the VM's end.
                let _ = seccomp::confine(ThreadKind::Device);
                let _ = ready_tx.send(());
                let _ = exit_tx.send(vm.wait());
            })
            .map_err(|e| MicroVmError::Build(BuildError::Io(e)))?;
        let launched = Launched {
            handle,
            controller,
            exit_rx,
            release,
        };
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let e = io::Error::other("the event loop did not start");
            return Err(launched.stop_with(MicroVmError::Build(BuildError::Io(e))));
        }
        Ok(launched)
    }

    /// Stops the VM and waits for its vCPUs to end, so the process never exits while a vCPU
    /// is still inside KVM_RUN.
    fn stop_and_wait(&self) {
        self.handle.stop();
        let _ = self.exit_rx.recv_timeout(Duration::from_secs(15));
    }

    fn stop_with(&self, e: MicroVmError) -> MicroVmError {
        self.stop_and_wait();
        e
    }

    /// Opens a session with the agent once it answers on `vsock`.
    fn agent(
        &self,
        vsock: &Path,
        console: &mut ConsoleTail,
        limit: Duration,
    ) -> Result<AgentClient<UnixStream>, MicroVmError> {
        let conn = match wait_for_agent(vsock, &self.exit_rx, limit) {
            Ok(conn) => conn,
            Err(AgentWait::Exited(exit)) => {
                return Err(MicroVmError::EarlyExit {
                    exit,
                    console: console.last_line(),
                })
            }
            Err(AgentWait::Timeout) => {
                return Err(self.stop_with(MicroVmError::AgentTimeout(
                    limit.as_secs(),
                    console.path.clone(),
                )))
            }
        };
        AgentClient::open(conn).map_err(|e| self.stop_with(MicroVmError::Agent(e)))
    }
}

impl MicroVm {
    /// Builds the VM (or restores its template) and its devices and binds its sockets (see
    /// [`PreparedVm`]).
    pub fn prepare(spec: &MicroVmSpec) -> Result<PreparedVm, MicroVmError> {
        let (mut builder, restored) = match &spec.restore {
            Some(r) => {
                let path = spec.console_path();
                let console = vmm::console_log::ConsoleLog::create(&path)
                    .map_err(|e| MicroVmError::Build(BuildError::SerialOut(path, e)))?;
                let builder = VmBuilder::restore(&r.dir, Box::new(console))
                    .map_err(|e| restore_error(&r.id, spec.fork, e))?;
                (builder, Some(r.id.clone()))
            }
            None => {
                let config = vm_config(spec, &run_boot(spec), spec.console_path());
                (VmBuilder::new(config)?, None)
            }
        };
        let attached = virtio_devices::attach(&mut builder, &run_devices(spec))?;
        let control = ControlServer::bind(&spec.control_path())
            .map_err(|e| MicroVmError::Control(spec.control_path(), e))?;
        // Opened here: a jailed VMM opens no file by path.
        let metrics_path = spec.metrics_path();
        let metrics = rootfs_builder::rootdir::private_file()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&metrics_path)
            .inspect_err(|e| log::warn!("no device counters in {}: {e}", metrics_path.display()))
            .ok();
        Ok(PreparedVm {
            builder,
            tap_name: attached.tap_name.clone(),
            mac: attached.mac,
            metrics: metrics.map(|file| (attached, file)),
            control,
            console: ConsoleTail::open(spec.console_path()),
            restored,
        })
    }

    /// Builds the VM, boots it, waits for its agent and starts the container (one process,
    /// no jail: [`MicroVm::prepare`], then [`MicroVm::start`]).
    pub fn run(spec: &MicroVmSpec, control: Arc<VmControl>) -> Result<MicroVm, MicroVmError> {
        let prepared = Self::prepare(spec)?;
        Self::start(prepared, spec, control)
    }

    /// Boots (or restores) the prepared VM, waits for its agent, hands a restored guest its
    /// run's setup and starts the container; `control` learns the VM as soon as it is built and
    /// that the container runs once it does, and answers on the control socket. Every thread is
    /// confined by its seccomp filter (where the process turned filtering on) before the guest
    /// runs: the vCPUs, the event loop, the control socket's server, then this thread.
    pub fn start(
        prepared: PreparedVm,
        spec: &MicroVmSpec,
        control: Arc<VmControl>,
    ) -> Result<MicroVm, MicroVmError> {
        let PreparedVm {
            builder,
            tap_name,
            mac,
            control: listener,
            mut console,
            restored,
            metrics,
        } = prepared;
        let vsock = spec.vsock_path();
        control.built(builder.handle());
        let t0 = Instant::now();
        let vm = builder.start().map_err(|e| match &restored {
            Some(id) => restore_error(id, spec.fork, e),
            None => MicroVmError::Build(e),
        })?;
        if let Some(id) = &restored {
            let what = if spec.fork { "snapshot" } else { "template" };
            log::debug!(
                "{what} {id}: VMM restored in {:.1} ms",
                t0.elapsed().as_secs_f64() * 1000.0
            );
        }
        let vm = Launched::new(vm)?;
        control.started(vm.controller.clone());
        // The socket file belongs to the run's directory, which the runner cleans.
        let server = ControlServer::serve(listener, control.clone(), None)
            .map_err(|e| vm.stop_with(MicroVmError::Control(spec.control_path(), e)))?;
        seccomp::confine(ThreadKind::Runner).map_err(|e| vm.stop_with(e.into()))?;
        // Confined as this thread is.
        let metrics = metrics.and_then(|(devices, file)| MetricsWriter::start(devices, file));
        vm.release.release();

        let mut client = vm
            .agent(&vsock, &mut console, spec.boot_timeout)
            .map_err(|e| match &restored {
                // Which of the two VMs of a template run failed (the template's own boot is
                // reported by its VMM).
                Some(id) if spec.fork => MicroVmError::Snapshot(
                    id.clone(),
                    format!("the VM restored from it: {}", error_chain(&e)),
                ),
                Some(id) => MicroVmError::Template(
                    id.clone(),
                    format!("the VM restored from it: {}", error_chain(&e)),
                ),
                None => e,
            })?;
        let stop_on_error = |e: ClientError| vm.stop_with(MicroVmError::Agent(e));
        // A restored guest's new identity: the run's network and ports, fresh randomness, the
        // time, its MAC (and for a template's guest, the run's disks).
        let identity = || Setup {
            boot: run_boot(spec).to_cmdline(),
            seed: fresh_seed(),
            time_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            mac,
        };
        if let (Some(id), true) = (&restored, spec.fork) {
            client.resume(identity()).map_err(stop_on_error)?;
            client
                .attach(MAIN_CONTAINER, MAIN_STREAM)
                .map_err(stop_on_error)?;
            log::debug!("snapshot {id}: restored, its container goes on");
        } else if let Some(id) = &restored {
            log::debug!("template {id}: restored, the agent answers");
            client.setup(identity()).map_err(stop_on_error)?;
            log::debug!("template {id}: the guest took its run's setup");
        }
        let stream = if spec.fork {
            MAIN_STREAM
        } else {
            client
                .create(MAIN_CONTAINER, &spec.container)
                .map_err(stop_on_error)?;
            client
                .start(MAIN_CONTAINER, spec.terminal)
                .map_err(stop_on_error)?
        };
        let ports = spec
            .ports
            .iter()
            .map(|m| PortForwarder::start(*m, &vsock))
            .collect::<Result<Vec<_>, _>>()
            .inspect_err(|_| vm.stop_and_wait())?;
        control.running.store(true, Ordering::SeqCst);
        let timed_out = Arc::new(AtomicBool::new(false));
        if let Some(limit) = spec.timeout {
            let (handle, flag) = (vm.handle.clone(), timed_out.clone());
            thread::spawn(move || {
                thread::sleep(limit);
                flag.store(true, Ordering::SeqCst);
                handle.stop();
            });
        }
        Ok(MicroVm {
            handle: vm.handle,
            exit_rx: vm.exit_rx,
            client,
            stream,
            _ports: ports,
            _control: server,
            timed_out,
            console,
            tap_name,
            metrics,
        })
    }

    /// The stream id of the container's first process.
    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// The host tap device of the VM's network, with `--network tap`.
    pub fn tap_name(&self) -> Option<&str> {
        self.tap_name.as_deref()
    }

    /// A handle that stops the VM from another thread.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// Streams the container's output into `sink` until it exits, powers the VM off and returns
    /// the container's exit code ([`EXIT_TIMEOUT`] when the timeout ran out; 128 + n when mvm got
    /// signal n).
    pub fn wait(mut self, sink: &mut dyn OutputSink) -> Result<i32, MicroVmError> {
        let result = self.client.stream_until_exit(self.stream, sink);
        if let Some(m) = self.metrics.take() {
            m.finish();
        }
        if self.timed_out.load(Ordering::SeqCst) {
            let _ = self.exit_rx.recv_timeout(Duration::from_secs(10));
            return Ok(EXIT_TIMEOUT);
        }
        match result {
            Ok(code) => {
                // The agent powers the guest off right after answering (its shutdown hook);
                // stop the VM ourselves if it does not.
                let _ = self.client.shutdown();
                if self.exit_rx.recv_timeout(Duration::from_secs(30)).is_err() {
                    self.handle.stop();
                    let _ = self.exit_rx.recv_timeout(Duration::from_secs(10));
                }
                Ok(code)
            }
            Err(e) => {
                // The session broke: the VM ended (signal, panic) or the agent died.
                let exit = self
                    .exit_rx
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap_or_else(|_| {
                        self.handle.stop();
                        VmExit::Stopped
                    });
                match exit {
                    VmExit::Signal(sig) => Ok(128 + sig),
                    VmExit::Reset | VmExit::Stopped => Err(MicroVmError::Agent(e)),
                    exit => Err(MicroVmError::EarlyExit {
                        exit,
                        console: self.console.last_line(),
                    }),
                }
            }
        }
    }
}

/// The boot parameters of a run: the spec's, with the root disk, the agent's port and the
/// published ports filled in (on the kernel command line of a cold boot, in the setup of a
/// restored template).
fn run_boot(spec: &MicroVmSpec) -> BootParams {
    BootParams {
        rootfs: Some(ROOTFS_DEVICE.into()),
        port: Some(AGENT_VSOCK_PORT),
        // The agent relays these vsock ports to the guest's TCP ports (its portfwd module).
        ports: spec.ports.iter().map(|p| p.guest_port).collect(),
        ..spec.boot.clone()
    }
}

/// The VM's configuration for a boot with `boot` on its command line.
fn vm_config(spec: &MicroVmSpec, boot: &BootParams, console: PathBuf) -> VmConfig {
    let mut cmdline = format!("{BASE_CMDLINE} {}", boot.to_cmdline());
    if !spec.kernel_args.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(spec.kernel_args.trim());
    }
    VmConfig {
        kernel: spec.kernel.clone(),
        initrd: Some(spec.initrd.clone()),
        cmdline,
        mem_bytes: spec.mem_bytes,
        vcpus: spec.vcpus,
        serial_out: Some(console),
        serial_stdin: false,
    }
}

/// The run's disks: the image read-only as /dev/vda, then the volumes.
fn run_disks(spec: &MicroVmSpec) -> Vec<BlockConfig> {
    let mut disks = vec![BlockConfig {
        path: spec.rootfs_disk.clone(),
        read_only: true,
        serial: Some("mvm-rootfs".into()),
        limits: spec.rootfs_limits,
    }];
    disks.extend(spec.volumes.iter().cloned());
    disks
}

/// The run's devices: its disks, network, the agent's vsock and an entropy source.
fn run_devices(spec: &MicroVmSpec) -> DevicesConfig {
    DevicesConfig {
        disks: run_disks(spec),
        network: spec.network.clone(),
        vsock: Some(spec.vsock_path()),
        rng: true,
        net_limit: spec.net_limit,
        // Unused: see crate::dns.
        dns_forward: None,
        dns: spec.dns.clone(),
    }
}

/// 64 fresh random bytes, hex.
fn fresh_seed() -> String {
    let mut seed = [0u8; 64];
    if devices::virtio::rng::device::getrandom(&mut seed).is_err() {
        // The guest still mixes in the time; this host has no getrandom (never on Linux 3.17+).
        log::warn!("getrandom failed: the guest's reseed is weak");
    }
    seed.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a failed restore of template `id` means for the user.
/// Why restoring template (or, `fork`, snapshot) `id` failed.
fn restore_error(id: &str, fork: bool, e: BuildError) -> MicroVmError {
    match e {
        BuildError::Snapshot(e) if e.is_bad_input() && fork => MicroVmError::Snapshot(
            id.to_string(),
            format!("{e} (remove it with `mvm snapshot rm {id}`)"),
        ),
        BuildError::Snapshot(e) if e.is_bad_input() => MicroVmError::Template(
            id.to_string(),
            format!("{e} (remove it with `mvm template rm {id}`, or run with --cold)"),
        ),
        BuildError::Snapshot(e) if kvm_cannot(&e) => {
            MicroVmError::HostCannotSnapshot(format!("restore a VM: {}", error_chain(&e)))
        }
        e => MicroVmError::Build(e),
    }
}

/// Whether KVM itself refused to hand out or take back a vCPU's or the VM's state (the host
/// cannot keep templates), not a file, a device or the snapshot.
fn kvm_cannot(e: &SnapshotError) -> bool {
    matches!(e, SnapshotError::Vcpu(..) | SnapshotError::Vm(_))
}

/// An error with its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

enum AgentWait {
    Exited(VmExit),
    Timeout,
}

/// Connects to the agent's vsock port, retrying while the guest boots.
fn wait_for_agent(
    vsock: &Path,
    exit_rx: &mpsc::Receiver<VmExit>,
    limit: Duration,
) -> Result<UnixStream, AgentWait> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(exit) = exit_rx.try_recv() {
            return Err(AgentWait::Exited(exit));
        }
        if let Ok(conn) =
            devices::virtio::vsock::host_connect(vsock, AGENT_VSOCK_PORT, Duration::from_secs(2))
        {
            return Ok(conn);
        }
        if Instant::now() >= deadline {
            return Err(AgentWait::Timeout);
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// The user's input for a process in a VM, over an agent session of its own (the process's
/// output stays on the session that started it): stdin frames, terminal sizes, end-of-file.
pub struct AgentInput {
    client: AgentClient<UnixStream>,
    stream: u32,
}

impl std::fmt::Debug for AgentInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentInput")
            .field("stream", &self.stream)
            .finish()
    }
}

impl AgentInput {
    /// Opens a session with the agent behind `vsock` for process `stream` of the container.
    pub fn connect(vsock: &std::path::Path, stream: u32) -> Result<AgentInput, MicroVmError> {
        let conn =
            devices::virtio::vsock::host_connect(vsock, AGENT_VSOCK_PORT, Duration::from_secs(10))
                .map_err(MicroVmError::AgentConnect)?;
        let client = AgentClient::open(conn).map_err(MicroVmError::Agent)?;
        Ok(AgentInput { client, stream })
    }
}

impl TerminalInput for AgentInput {
    fn input(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.client
            .stdin(self.stream, data)
            .map_err(std::io::Error::other)
    }
    fn resize(&mut self, size: TermSize) -> std::io::Result<()> {
        self.client
            .resize(MAIN_CONTAINER, self.stream, size)
            .map_err(std::io::Error::other)
    }
    fn end(&mut self) {
        let _ = self.client.stdin(self.stream, b"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_line_in_an_error_carries_no_terminal_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "booting\n\x1b]0;owned\x07panic: \x1b[2Jgone\r\n\n").unwrap();
        let line = ConsoleTail::open(path).last_line();
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert_eq!(
            line,
            "; console: \\u{1b}]0;owned\\u{7}panic: \\u{1b}[2Jgone"
        );
    }
}
