//! One container in its own microVM: boot the guest kernel with the agent as PID 1 and the image
//! as a read-only disk, talk to the agent over vsock, start the container, stream its output and
//! return its exit code; then power the VM off.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use devices::virtio::block::BlockConfig;
use guest_agent::agent::client::{AgentClient, ClientError, OutputSink};
use guest_agent::guest::{BootParams, MAIN_CONTAINER, ROOTFS_DEVICE};
use guest_agent::protocol::{Setup, AGENT_VSOCK_PORT};
use guest_agent::runtime::ContainerSpec;
use vmm::builder::{BuildError, RunningVm, VmBuilder};
use vmm::config::VmConfig;
use vmm::exit::{VmExit, VmHandle};
use vmm::snapshot::take::VmController;
use vmm::virtio_devices::{self, AttachedDevices, DeviceSetupError, DevicesConfig, NetworkMode};

use crate::portfwd::{PortError, PortForwarder, PortMapping};
use crate::template::{FileId, TemplateInfo, TemplateKey, TemplateStore};

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
    /// A template could not be made or restored.
    #[error("template {0}: {1}")]
    Template(String, String),
    /// This host's KVM cannot save or restore a VM (what failed); the run boots cold.
    #[error("this host's KVM cannot {0}")]
    HostCannotSnapshot(String),
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct MicroVmSpec {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// The agent's boot parameters (the root disk, the agent's port and the published ports are
    /// filled in by [`MicroVm::start`]).
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
    /// Where templates live: the VM is restored from its template (made first, by a cold
    /// boot, if there is none). `None`: a cold boot with the run's parameters on the command
    /// line, no template made or used.
    pub templates: Option<TemplateStore>,
}

impl MicroVmSpec {
    /// The vsock socket of the VM (other processes reach the agent through it).
    pub fn vsock_path(&self) -> PathBuf {
        self.run_dir.join("vsock.sock")
    }

    /// The serial console log.
    pub fn console_path(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
}

/// A started microVM whose container runs.
pub struct MicroVm {
    handle: VmHandle,
    controller: VmController,
    exit_rx: mpsc::Receiver<VmExit>,
    client: AgentClient<UnixStream>,
    stream: u32,
    _ports: Vec<PortForwarder>,
    timed_out: Arc<AtomicBool>,
    console: PathBuf,
    tap_name: Option<String>,
}

impl std::fmt::Debug for MicroVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVm")
            .field("stream", &self.stream)
            .finish()
    }
}

fn last_console_line(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| format!("; console: {}", l.trim()))
        })
        .unwrap_or_default()
}

impl MicroVm {
    /// Boots the VM (or restores its template), waits for its agent and starts the container.
    /// Where this host's KVM cannot save or restore a VM, says so once (and notes it in the
    /// template store) and boots cold.
    pub fn start(spec: &MicroVmSpec) -> Result<MicroVm, MicroVmError> {
        let boot = BootParams {
            rootfs: Some(ROOTFS_DEVICE.into()),
            port: Some(AGENT_VSOCK_PORT),
            // The agent relays these vsock ports to the guest's TCP ports (its portfwd module).
            ports: spec.ports.iter().map(|p| p.guest_port).collect(),
            ..spec.boot.clone()
        };
        let Some(store) = &spec.templates else {
            return Self::boot_cold(spec, &boot);
        };
        if let Some(why) = store.unsupported() {
            log::info!("no template: {why}; booting cold");
            return Self::boot_cold(spec, &boot);
        }
        match Self::restore_template(spec, store, &boot) {
            Err(MicroVmError::HostCannotSnapshot(why)) => {
                eprintln!("mvm: note: this host's KVM cannot {why}; booting cold (templates stay off here until `mvm template prune -a`)");
                store.mark_unsupported(&why);
                Self::boot_cold(spec, &boot)
            }
            result => result,
        }
    }

    /// Boots the guest kernel with the run's parameters on its command line.
    fn boot_cold(spec: &MicroVmSpec, boot: &BootParams) -> Result<MicroVm, MicroVmError> {
        let config = vm_config(spec, boot, spec.console_path());
        let builder = VmBuilder::new(config)?;
        let (vm, attached) = attach_run_devices(builder, spec)?;
        let started = Started::new(vm, spec)?;
        let client = started.agent(spec)?;
        started.run_container(spec, client, attached)
    }

    /// Restores the run's template (made first by a cold boot if there is none) and hands the
    /// agent the run's setup.
    fn restore_template(
        spec: &MicroVmSpec,
        store: &TemplateStore,
        boot: &BootParams,
    ) -> Result<MicroVm, MicroVmError> {
        let key = template_key(spec, store)?;
        let dir = match store.find(&key) {
            Some(dir) => dir,
            None => make_template(spec, store, &key)?,
        };
        let id = key.id();
        let failed = |e: BuildError| match e {
            BuildError::Snapshot(e) if e.is_bad_input() => MicroVmError::Template(
                id.clone(),
                format!("{e} (remove it with `mvm template rm {id}`, or run with --cold)"),
            ),
            BuildError::Snapshot(e) if kvm_cannot(&e) => {
                MicroVmError::HostCannotSnapshot(format!("restore a VM: {}", error_chain(&e)))
            }
            e => MicroVmError::Build(e),
        };
        let console = vmm::console_log::ConsoleLog::create(&spec.console_path())
            .map_err(|e| MicroVmError::Build(BuildError::SerialOut(spec.console_path(), e)))?;
        let t0 = Instant::now();
        let mut builder = VmBuilder::restore(&dir, Box::new(console)).map_err(failed)?;
        let attached = virtio_devices::attach(&mut builder, &run_devices(spec))?;
        let vm = builder.start().map_err(failed)?;
        log::debug!(
            "template {id}: VMM restored in {:.1} ms",
            t0.elapsed().as_secs_f64() * 1000.0
        );
        let started = Started::new(vm, spec)?;
        let mut client = started.agent(spec)?;
        log::debug!("template {id}: restored, the agent answers");
        let setup = Setup {
            boot: boot.to_cmdline(),
            seed: fresh_seed(),
            time_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            mac: attached.mac,
        };
        if let Err(e) = client.setup(setup) {
            started.stop_and_wait();
            return Err(MicroVmError::Agent(e));
        }
        log::debug!("template {id}: the guest took its run's setup");
        started.run_container(spec, client, attached)
    }

    /// The host tap device of the VM's network, with `--network tap`.
    pub fn tap_name(&self) -> Option<&str> {
        self.tap_name.as_deref()
    }

    /// A handle that stops the VM from another thread.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// Pauses, resumes and snapshots the VM from another thread.
    pub fn controller(&self) -> VmController {
        self.controller.clone()
    }

    /// Streams the container's output into `sink` until it exits, powers the VM off and returns
    /// the container's exit code ([`EXIT_TIMEOUT`] when the timeout ran out; 128 + n when mvm got
    /// signal n).
    pub fn wait(mut self, sink: &mut dyn OutputSink) -> Result<i32, MicroVmError> {
        let result = self.client.stream_until_exit(self.stream, sink);
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
                        console: last_console_line(&self.console),
                    }),
                }
            }
        }
    }
}

/// A VM whose event loop runs on its own thread.
struct Started {
    handle: VmHandle,
    controller: VmController,
    exit_rx: mpsc::Receiver<VmExit>,
}

impl Started {
    fn new(vm: RunningVm, _spec: &MicroVmSpec) -> Result<Self, MicroVmError> {
        let handle = vm.handle();
        let controller = vm.controller();
        let (exit_tx, exit_rx) = mpsc::channel();
        thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                let _ = exit_tx.send(vm.wait());
            })
            .map_err(|e| MicroVmError::Build(BuildError::Io(e)))?;
        Ok(Self {
            handle,
            controller,
            exit_rx,
        })
    }

    /// Stops the VM and waits for its vCPUs to end, so the process never exits while a vCPU
    /// is still inside KVM_RUN.
    fn stop_and_wait(&self) {
        self.handle.stop();
        let _ = self.exit_rx.recv_timeout(Duration::from_secs(15));
    }

    /// Opens a session with the agent once it answers.
    fn agent(&self, spec: &MicroVmSpec) -> Result<AgentClient<UnixStream>, MicroVmError> {
        let conn = match wait_for_agent(&spec.vsock_path(), &self.exit_rx, spec.boot_timeout) {
            Ok(conn) => conn,
            Err(AgentWait::Exited(exit)) => {
                return Err(MicroVmError::EarlyExit {
                    exit,
                    console: last_console_line(&spec.console_path()),
                })
            }
            Err(AgentWait::Timeout) => {
                self.handle.stop();
                let _ = self.exit_rx.recv_timeout(Duration::from_secs(10));
                return Err(MicroVmError::AgentTimeout(
                    spec.boot_timeout.as_secs(),
                    spec.console_path(),
                ));
            }
        };
        AgentClient::open(conn).map_err(|e| {
            self.stop_and_wait();
            MicroVmError::Agent(e)
        })
    }

    /// Creates and starts the container, publishes its ports, arms the timeout.
    fn run_container(
        self,
        spec: &MicroVmSpec,
        mut client: AgentClient<UnixStream>,
        attached: AttachedDevices,
    ) -> Result<MicroVm, MicroVmError> {
        let stop_on_error = |e: ClientError| {
            self.stop_and_wait();
            MicroVmError::Agent(e)
        };
        client
            .create(MAIN_CONTAINER, &spec.container)
            .map_err(stop_on_error)?;
        let stream = client.start(MAIN_CONTAINER).map_err(stop_on_error)?;
        log::debug!("container started");
        let vsock = spec.vsock_path();
        let ports = spec
            .ports
            .iter()
            .map(|m| PortForwarder::start(*m, &vsock))
            .collect::<Result<Vec<_>, _>>()
            .inspect_err(|_| self.stop_and_wait())?;
        let timed_out = Arc::new(AtomicBool::new(false));
        if let Some(limit) = spec.timeout {
            let (handle, flag) = (self.handle.clone(), timed_out.clone());
            thread::spawn(move || {
                thread::sleep(limit);
                flag.store(true, Ordering::SeqCst);
                handle.stop();
            });
        }
        Ok(MicroVm {
            handle: self.handle,
            controller: self.controller,
            exit_rx: self.exit_rx,
            client,
            stream,
            _ports: ports,
            timed_out,
            console: spec.console_path(),
            tap_name: attached.tap_name,
        })
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
    }
}

/// Attaches the run's devices and boots the VM.
fn attach_run_devices(
    mut builder: VmBuilder,
    spec: &MicroVmSpec,
) -> Result<(RunningVm, AttachedDevices), MicroVmError> {
    let attached = virtio_devices::attach(&mut builder, &run_devices(spec))?;
    Ok((builder.start()?, attached))
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

/// The template a run of `spec` restores.
fn template_key(spec: &MicroVmSpec, _store: &TemplateStore) -> Result<TemplateKey, MicroVmError> {
    let id = |path: &std::path::Path| {
        FileId::of(path).map_err(|e| MicroVmError::Template("key".into(), e.to_string()))
    };
    Ok(TemplateKey {
        mvm_version: vmm::snapshot::mvm_version(),
        kernel: id(&spec.kernel)?,
        initrd: id(&spec.initrd)?,
        kernel_args: spec.kernel_args.trim().to_string(),
        mem_bytes: spec.mem_bytes,
        vcpus: spec.vcpus,
        disks: run_disks(spec)
            .iter()
            .map(|d| if d.read_only { "ro" } else { "rw" }.to_string())
            .collect(),
        network: match &spec.network {
            NetworkMode::None => "none",
            NetworkMode::User => "user",
            NetworkMode::Tap { .. } => "tap",
        }
        .to_string(),
    })
}

/// Boots a guest for `key` to its agent with empty placeholder disks and nothing of the run,
/// saves it as a template and returns the template's directory.
fn make_template(
    spec: &MicroVmSpec,
    store: &TemplateStore,
    key: &TemplateKey,
) -> Result<PathBuf, MicroVmError> {
    let failed = |what: &str, e: String| MicroVmError::Template(key.id(), format!("{what}: {e}"));
    let tmp = store
        .begin(key)
        .map_err(|e| failed("cannot create it", e.to_string()))?;
    let result = (|| {
        let t0 = Instant::now();
        let boot = BootParams {
            port: Some(AGENT_VSOCK_PORT),
            log: spec.boot.log.clone(),
            template: true,
            ..BootParams::default()
        };
        let mut builder = VmBuilder::new(vm_config(spec, &boot, tmp.join("console.log")))?;
        let mut disks = run_disks(spec);
        for (i, disk) in disks.iter_mut().enumerate() {
            let placeholder = tmp.join(format!("placeholder-{i}.img"));
            std::fs::write(&placeholder, b"")
                .map_err(|e| failed("cannot create a placeholder disk", e.to_string()))?;
            disk.path = placeholder;
        }
        let vsock = tmp.join("vsock.sock");
        virtio_devices::attach(
            &mut builder,
            &DevicesConfig {
                disks,
                network: spec.network.clone(),
                vsock: Some(vsock.clone()),
                rng: true,
            },
        )?;
        let vm = builder.start()?;
        let controller = vm.controller();
        let started = Started::new(vm, spec)?;
        let wait = wait_for_agent(&vsock, &started.exit_rx, spec.boot_timeout);
        let conn = match wait {
            Ok(conn) => conn,
            Err(AgentWait::Exited(exit)) => {
                return Err(MicroVmError::EarlyExit {
                    exit,
                    console: last_console_line(&tmp.join("console.log")),
                })
            }
            Err(AgentWait::Timeout) => {
                started.stop_and_wait();
                return Err(MicroVmError::AgentTimeout(
                    spec.boot_timeout.as_secs(),
                    tmp.join("console.log"),
                ));
            }
        };
        // The agent answers: it is ready and waits for a setup. Save it as it is.
        let client = AgentClient::open(conn).map_err(|e| {
            started.stop_and_wait();
            MicroVmError::Agent(e)
        })?;
        let boot_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        let saved = controller.snapshot(&tmp);
        drop(client);
        started.stop_and_wait();
        let report = saved.map_err(|e| match e {
            e if kvm_cannot(&e) => {
                MicroVmError::HostCannotSnapshot(format!("save a VM: {}", error_chain(&e)))
            }
            e => failed("cannot save it", error_chain(&e)),
        })?;
        log::debug!(
            "template {}: booted in {boot_ms} ms, saved in {} ms ({} pages of data)",
            key.id(),
            report.paused_for.as_millis(),
            report.data_pages
        );
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("placeholder-") || name == "vsock.sock" {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let info = TemplateInfo {
            key: key.clone(),
            created: crate::state::now(),
            boot_ms,
        };
        store
            .commit(&tmp, &info)
            .map_err(|e| failed("cannot store it", e.to_string()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Whether KVM itself refused to hand out or take back a vCPU's or the VM's state (the host
/// cannot keep templates), not a file, a device or the snapshot.
fn kvm_cannot(e: &vmm::snapshot::SnapshotError) -> bool {
    matches!(
        e,
        vmm::snapshot::SnapshotError::Vcpu(..) | vmm::snapshot::SnapshotError::Vm(_)
    )
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
    vsock: &std::path::Path,
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

/// Copies this process's stdin to the container's stdin over a second agent session.
pub fn forward_stdin(vsock: &std::path::Path, stream: u32) {
    let Ok(conn) =
        devices::virtio::vsock::host_connect(vsock, AGENT_VSOCK_PORT, Duration::from_secs(5))
    else {
        return;
    };
    thread::spawn(move || {
        use std::io::Read;
        let Ok(mut client) = AgentClient::open(conn) else {
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = client.stdin(stream, b"");
                    return;
                }
                Ok(n) => {
                    if client.stdin(stream, &buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
}
