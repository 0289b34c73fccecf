//! Building and running a VM in two steps, so other parts of mvm can attach devices between
//! VM creation and boot:
//!
//! ```no_run
//! # fn demo(cfg: vmm::config::VmConfig) -> Result<(), vmm::builder::BuildError> {
//! let mut builder = vmm::builder::VmBuilder::new(cfg)?;  // VM, memory, kernel, serial, i8042
//! // builder.attach_virtio_mmio(dev)?;                    // block, net, vsock, rng ...
//! let handle = builder.handle();                          // stop it from another thread
//! let vm = builder.start()?;                              // boot structures, vCPU threads
//! let exit = vm.wait();                                   // event loop until the VM ends
//! std::process::exit(exit.exit_code());
//! # }
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::SerialDevice;
use event_manager::SubscriberOps;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::Killable;

use crate::boot::loader::{self, LoadedKernel, LoaderError};
use crate::boot::{paging, regs};
use crate::config::{ConfigError, HostLimits, VmConfig};
use crate::console_log::ConsoleLog;
use crate::device_manager::{
    DeviceManager, DeviceManagerError, Subscriber, VirtioMmioDevice, VmEventManager,
};
use crate::event_loop::{self, ConsoleInput};
use crate::exit::{ExitState, PanicWatcher, VmExit, VmHandle};
use crate::mptable::{self, MptableError};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::take::{SnapshotPoint, VmController};
use crate::snapshot::{self, SnapshotError, SnapshotState};
use crate::vcpu::{self, Vcpu, VcpuControl, VcpuError, VcpuShared};
use crate::vm::{Vm, VmError};

/// Builds, starts and runs a VM with no extra devices until it ends.
pub fn run(config: VmConfig) -> Result<VmExit, BuildError> {
    Ok(VmBuilder::new(config)?.start()?.wait())
}

/// How long stopping the vCPU threads may take before mvm gives up on them.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a VM could not be built or started.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is wrong (bad input).
    #[error(transparent)]
    Config(ConfigError),
    /// Creating the KVM VM failed.
    #[error("cannot create the VM")]
    Vm(#[source] VmError),
    /// Loading the kernel, initrd or command line failed.
    #[error(transparent)]
    Loader(LoaderError),
    /// The serial output file cannot be opened.
    #[error("cannot open serial output {}", .0.display())]
    SerialOut(PathBuf, #[source] std::io::Error),
    /// Device setup failed.
    #[error("cannot set up devices")]
    Devices(#[source] DeviceManagerError),
    /// Writing the MP table failed.
    #[error("cannot set up SMP")]
    Mptable(#[source] MptableError),
    /// Writing the page tables failed.
    #[error("cannot set up paging")]
    Paging(#[source] paging::PagingError),
    /// Writing the GDT failed.
    #[error("cannot set up the boot CPU")]
    Regs(#[source] regs::RegsError),
    /// Creating or configuring a vCPU failed.
    #[error("cannot set up vCPU {0}")]
    Vcpu(u8, #[source] VcpuError),
    /// A vCPU thread could not be started, or an eventfd created.
    #[error("cannot start the VM")]
    Io(#[source] std::io::Error),
    /// The snapshot cannot be restored.
    #[error("cannot restore the snapshot")]
    Snapshot(#[source] SnapshotError),
}

impl BuildError {
    /// Whether the user's input caused the error (mvm exits with 2 for those).
    pub fn is_bad_input(&self) -> bool {
        match self {
            BuildError::Config(_) | BuildError::SerialOut(..) => true,
            BuildError::Loader(e) => !matches!(e, LoaderError::Memory(..)),
            BuildError::Devices(DeviceManagerError::Cmdline(_)) => true,
            BuildError::Snapshot(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// How a VM starts: booting a kernel, or where a snapshot left it.
enum Start {
    Boot {
        kernel: LoadedKernel,
        initrd: Option<(u64, u64)>,
    },
    Restore(Box<SnapshotState>),
}

/// A VM that is created but not yet running: attach devices, then [`VmBuilder::start`].
pub struct VmBuilder {
    config: VmConfig,
    vm: Vm,
    start: Start,
    devices: DeviceManager,
    exit: Arc<ExitState>,
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("config", &self.config)
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

impl VmBuilder {
    /// Validates `config`, creates the VM and its memory, loads the kernel and initrd, and sets
    /// up the serial console (to `config.serial_out`, a bounded [`ConsoleLog`], else stdout) and
    /// the i8042.
    pub fn new(config: VmConfig) -> Result<Self, BuildError> {
        let kvm = Vm::open_kvm().map_err(BuildError::Vm)?;
        config
            .validate(&HostLimits::probe(&kvm))
            .map_err(BuildError::Config)?;
        // Opened only once the input is known to be good: bad input leaves no file behind.
        let out: Box<dyn Write + Send> = match &config.serial_out {
            Some(path) => Box::new(
                ConsoleLog::create(path).map_err(|e| BuildError::SerialOut(path.clone(), e))?,
            ),
            None => Box::new(std::io::stdout()),
        };
        Self::build(kvm, config, out)
    }

    /// Like [`VmBuilder::new`], with the serial console written to `console`
    /// (`config.serial_out` is ignored).
    pub fn with_console(
        config: VmConfig,
        console: Box<dyn Write + Send>,
    ) -> Result<Self, BuildError> {
        let kvm = Vm::open_kvm().map_err(BuildError::Vm)?;
        config
            .validate(&HostLimits::probe(&kvm))
            .map_err(BuildError::Config)?;
        Self::build(kvm, config, console)
    }

    fn build(
        kvm: kvm_ioctls::Kvm,
        config: VmConfig,
        console: Box<dyn Write + Send>,
    ) -> Result<Self, BuildError> {
        let cmdline = loader::parse_cmdline(&config.cmdline).map_err(BuildError::Loader)?;
        let vm = Vm::new(kvm, config.mem_bytes).map_err(BuildError::Vm)?;
        let kernel =
            loader::load_kernel(vm.memory(), &config.kernel).map_err(BuildError::Loader)?;
        let initrd = match &config.initrd {
            Some(path) => Some(
                loader::load_initrd(vm.memory(), config.mem_bytes, path, &kernel)
                    .map_err(BuildError::Loader)?,
            ),
            None => None,
        };
        let exit = Arc::new(ExitState::new().map_err(BuildError::Io)?);
        let console = Box::new(PanicWatcher::new(console, exit.clone()));
        let devices = DeviceManager::new(vm.fd().clone(), cmdline, console, exit.clone())
            .map_err(BuildError::Devices)?;
        Ok(Self {
            config,
            vm,
            start: Start::Boot { kernel, initrd },
            devices,
            exit,
        })
    }

    /// A VM that continues where the snapshot in directory `dir` left its VM, with the serial
    /// console written to `console`. The snapshot is checked first (format, version, checksums,
    /// CPU); its memory file is mapped privately (shared with every other VM restored from
    /// it). Attach the same devices as the saved VM had, in the same order (their backends may
    /// differ), then [`VmBuilder::start`] restores them and the vCPUs.
    pub fn restore(dir: &Path, console: Box<dyn Write + Send>) -> Result<Self, BuildError> {
        let kvm = Vm::open_kvm().map_err(BuildError::Vm)?;
        let state = SnapshotState::read(dir).map_err(BuildError::Snapshot)?;
        state.check_host(&kvm).map_err(BuildError::Snapshot)?;
        let limits = HostLimits::probe(&kvm);
        if state.machine.vcpus > limits.max_vcpus {
            return Err(BuildError::Config(ConfigError::TooManyVcpus(
                state.machine.vcpus,
                limits.max_vcpus,
            )));
        }
        state.verify_memory(dir).map_err(BuildError::Snapshot)?;
        let mem = snapshot::memory::map(&snapshot::memory_path(dir), state.memory.size)
            .map_err(|e| BuildError::Snapshot(e.into()))?;
        let vm = Vm::with_memory(kvm, mem, state.machine.mem_bytes).map_err(BuildError::Vm)?;
        let mut config = VmConfig::new(dir);
        config.mem_bytes = state.machine.mem_bytes;
        config.vcpus = state.machine.vcpus;
        let exit = Arc::new(ExitState::new().map_err(BuildError::Io)?);
        let console = Box::new(PanicWatcher::new(console, exit.clone()));
        let cmdline = loader::parse_cmdline("").map_err(BuildError::Loader)?;
        let devices = DeviceManager::new(vm.fd().clone(), cmdline, console, exit.clone())
            .map_err(BuildError::Devices)?;
        Ok(Self {
            config,
            vm,
            start: Start::Restore(Box::new(state)),
            devices,
            exit,
        })
    }

    /// Guest memory, for devices that read and write it.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        self.vm.memory()
    }

    /// The KVM VM (for devices that need their own ioctls).
    pub fn vm_fd(&self) -> &Arc<kvm_ioctls::VmFd> {
        self.vm.fd()
    }

    /// The device manager.
    pub fn device_manager(&mut self) -> &mut DeviceManager {
        &mut self.devices
    }

    /// Attaches a virtio-mmio device; returns its MMIO base and IRQ.
    pub fn attach_virtio_mmio(&mut self, dev: VirtioMmioDevice) -> Result<(u64, u32), BuildError> {
        self.devices
            .attach_virtio_mmio(dev)
            .map_err(BuildError::Devices)
    }

    /// Adds an event-loop subscriber that is not a device.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.devices.add_subscriber(subscriber);
    }

    /// A handle that stops the VM from any thread, valid before and after `start`.
    pub fn handle(&self) -> VmHandle {
        VmHandle::new(self.exit.clone())
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Boots: writes the boot structures, creates and configures the vCPUs. Restores: checks
    /// the devices against the snapshot's, puts back the vCPUs, the VM's interrupt controllers,
    /// PIT and clock, then the devices. Then starts the vCPU threads.
    pub fn start(self) -> Result<RunningVm, BuildError> {
        let handles = self.devices.handles();
        let serial = self.devices.serial().clone();
        let (pio, mmio, cmdline, mut em) = self.devices.into_parts();
        let mem = self.vm.memory();
        let virt = crate::host::virtualization();
        let control = Arc::new(VcpuControl::default());
        let shared = VcpuShared {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit: self.exit.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            mem: mem.clone(),
            hardware_virt: virt.is_hardware(),
            control: control.clone(),
        };
        let mut vcpus = Vec::new();
        match &self.start {
            Start::Boot { kernel, initrd } => {
                let cmdline_len =
                    loader::write_cmdline(mem, &cmdline).map_err(BuildError::Loader)?;
                log::debug!(
                    "kernel command line: {:?}",
                    cmdline.as_cstring().unwrap_or_default()
                );
                let params =
                    loader::build_boot_params(kernel, cmdline_len, *initrd, self.vm.mem_size());
                loader::write_boot_params(mem, &params).map_err(BuildError::Loader)?;
                mptable::setup_mptable(mem, self.config.vcpus).map_err(BuildError::Mptable)?;
                paging::setup_page_tables(mem).map_err(BuildError::Paging)?;
                regs::write_gdt_idt(mem).map_err(BuildError::Regs)?;
                let template = vcpu::cpu_template(self.vm.kvm(), virt);
                for id in 0..self.config.vcpus {
                    let fd = self.vm.create_vcpu(id).map_err(BuildError::Vm)?;
                    vcpu::configure(
                        self.vm.kvm(),
                        &fd,
                        template,
                        id,
                        self.config.vcpus,
                        kernel.entry,
                    )
                    .map_err(|e| BuildError::Vcpu(id, e))?;
                    vcpus.push(Vcpu::new(id, fd, shared.clone()));
                }
            }
            Start::Restore(state) => {
                handles
                    .check_layout(&state.devices)
                    .map_err(|e| BuildError::Snapshot(e.into()))?;
                for saved in &state.vcpus {
                    let fd = self.vm.create_vcpu(saved.id).map_err(BuildError::Vm)?;
                    snapshot::take::restore_vcpu(&fd, saved).map_err(BuildError::Snapshot)?;
                    vcpus.push(Vcpu::new(saved.id, fd, shared.clone()));
                }
                state
                    .vm
                    .restore(self.vm.fd())
                    .map_err(|e| BuildError::Snapshot(SnapshotError::Vm(e)))?;
                handles
                    .restore(&state.devices)
                    .map_err(|e| BuildError::Snapshot(e.into()))?;
            }
        }
        if self.config.serial_stdin {
            em.add_subscriber(Arc::new(Mutex::new(ConsoleInput::stdin(serial.clone()))));
        }
        let point = SnapshotPoint::new(&self.vm, handles, control.clone(), self.config.vcpus)
            .map_err(BuildError::Snapshot)?;
        let controller = point.controller();
        em.add_subscriber(Arc::new(Mutex::new(point)));
        vcpu::install_kick_handler();
        let mut running = RunningVm {
            vm: self.vm,
            exit: self.exit,
            stop: shared.stop.clone(),
            control,
            em,
            serial,
            gate: Arc::new(VcpuGate::default()),
            held: false,
            controller,
        };
        // From here on SIGINT/SIGTERM end the VM: the guest may print (and a user may press
        // Ctrl-C) before `wait` runs the loop; the signal then sits in the exit eventfd.
        event_loop::wake_on_signals(&running.exit);
        for vcpu in vcpus {
            let gate = running.gate.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id()))
                .spawn(move || {
                    let exit = vcpu.exit_state();
                    let id = vcpu.id();
                    // Confined before the guest runs its first instruction here.
                    if let Err(e) = seccomp::confine(ThreadKind::Vcpu) {
                        exit.record(VmExit::VcpuError {
                            cpu: id,
                            message: format!("{e}"),
                        });
                        return;
                    }
                    gate.wait();
                    // A bug in a device must end the VM with a message, not leave it hanging.
                    let run = std::panic::AssertUnwindSafe(move || vcpu.run());
                    if std::panic::catch_unwind(run).is_err() {
                        exit.record(VmExit::VcpuError {
                            cpu: id,
                            message: "vCPU thread panicked".into(),
                        });
                    }
                });
            match thread {
                Ok(t) => running.control.add_thread(t),
                Err(e) => {
                    running.stop_vcpus();
                    return Err(BuildError::Io(e));
                }
            }
        }
        Ok(running)
    }
}

/// Where the vCPU threads wait, confined, until the VM may run: the guest runs its first
/// instruction only once every thread of the VMM has its seccomp filter.
#[derive(Debug, Default)]
struct VcpuGate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl VcpuGate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.opened.notify_all();
    }
}

/// Lets the vCPUs of a held VM run (see [`RunningVm::hold`]).
#[derive(Debug, Clone)]
pub struct VcpuRelease(Arc<VcpuGate>);

impl VcpuRelease {
    /// The guest starts running.
    pub fn release(&self) {
        self.0.open();
    }
}

/// A started VM: its vCPU threads exist (each confined by its seccomp filter) and run the guest
/// once [`RunningVm::wait`] runs the event loop, unless [`RunningVm::hold`] holds them for the
/// caller to release.
pub struct RunningVm {
    vm: Vm,
    exit: Arc<ExitState>,
    stop: Arc<AtomicBool>,
    control: Arc<VcpuControl>,
    em: VmEventManager,
    serial: Arc<Mutex<SerialDevice>>,
    gate: Arc<VcpuGate>,
    held: bool,
    controller: VmController,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vcpus", &self.control.running_threads())
            .finish_non_exhaustive()
    }
}

impl RunningVm {
    /// A handle that stops the VM from any thread.
    pub fn handle(&self) -> VmHandle {
        VmHandle::new(self.exit.clone())
    }

    /// Guest memory.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        self.vm.memory()
    }

    /// Pauses, resumes and snapshots the VM from other threads while [`RunningVm::wait`] runs.
    pub fn controller(&self) -> VmController {
        self.controller.clone()
    }

    /// Runs closures on the event-loop thread from other threads (e.g. to reach a device's
    /// subscriber while the VM runs).
    pub fn remote_endpoint(&self) -> event_manager::RemoteEndpoint<Subscriber> {
        self.em.remote_endpoint()
    }

    /// Keeps the vCPUs from running the guest until the returned handle releases them (the
    /// caller confines its own threads first), rather than when [`RunningVm::wait`] starts.
    pub fn hold(&mut self) -> VcpuRelease {
        self.held = true;
        VcpuRelease(self.gate.clone())
    }

    /// Runs the event loop on this thread until the VM ends (guest reset, failure, SIGINT or
    /// SIGTERM, or a [`VmHandle::stop`]), stops every vCPU and returns why it ended. The thread
    /// is confined by the device filter first (unless it already is); then the vCPUs run,
    /// unless they are held.
    pub fn wait(mut self) -> VmExit {
        let confined = match seccomp::current() {
            Some(ThreadKind::Device) => Ok(()),
            _ => seccomp::confine(ThreadKind::Device),
        };
        if let Err(e) = confined {
            self.exit.record(VmExit::EventLoop(format!("{e}")));
            self.stop_vcpus();
            return self.exit.exit().unwrap_or(VmExit::Stopped);
        }
        if !self.held {
            self.gate.open();
        }
        let exit = event_loop::run(&mut self.em, &self.exit);
        event_loop::stop_waking_on_signals();
        self.stop_vcpus();
        if let Err(e) = devices::bus::lock(&self.serial).flush() {
            log::debug!("flushing the console failed: {e}");
        }
        exit
    }

    /// Stops all vCPU threads: sets the stop flag and kicks each thread out of KVM_RUN (or
    /// wakes it where it is parked) until it has finished.
    fn stop_vcpus(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Held vCPUs see the stop flag as soon as they pass the gate.
        self.gate.open();
        self.control.wake();
        let mut threads = self.control.take_threads();
        let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
        loop {
            threads.retain(|t| !t.is_finished());
            if threads.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                log::warn!("{} vCPU thread(s) did not stop", threads.len());
                return;
            }
            for t in &threads {
                // A signal that lands outside KVM_RUN is lost; the loop sends it again.
                let _ = t.kill(vcpu::kick_signal());
            }
            self.control.wake();
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        event_loop::stop_waking_on_signals();
        self.stop_vcpus();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io;

    use super::*;

    /// A minimal ELF64 executable: one PT_LOAD segment with `code` at `addr`, entry at `addr`.
    pub(crate) fn tiny_elf(code: &[u8], addr: u64) -> Vec<u8> {
        let mut f = Vec::new();
        let hdr_len = 64u64 + 56;
        // e_ident: magic, 64-bit, little endian, version 1, System V.
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes()); // e_entry
        f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
        f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
        f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
        f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
        f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f.extend_from_slice(&7u32.to_le_bytes()); // RWX
        f.extend_from_slice(&hdr_len.to_le_bytes()); // p_offset
        f.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
        f.extend_from_slice(&addr.to_le_bytes()); // p_paddr
        f.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
        f.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
        f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
        f.extend_from_slice(code);
        f
    }

    #[derive(Clone, Default)]
    pub(crate) struct Capture(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Boots `code` (64-bit, entered in long mode at 1 MiB) and returns the exit and console.
    fn boot_code(code: &[u8], vcpus: u8) -> Option<(VmExit, Vec<u8>)> {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipping: no /dev/kvm on this host");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("guest.elf");
        std::fs::write(&kernel, tiny_elf(code, 0x10_0000)).unwrap();
        let mut cfg = VmConfig::new(&kernel);
        cfg.mem_bytes = 16 << 20;
        cfg.vcpus = vcpus;
        let out = Capture::default();
        let builder = VmBuilder::with_console(cfg, Box::new(out.clone())).unwrap();
        let handle = builder.handle();
        let vm = builder.start().unwrap();
        // A guest that never ends must not hang the test.
        let watchdog = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(30));
            handle.stop_with(VmExit::EventLoop("test watchdog".into()));
        });
        let exit = vm.wait();
        drop(watchdog);
        let console = out.0.lock().unwrap().clone();
        Some((exit, console))
    }

    /// cpuid(leaf 1); write ecx to COM1 byte by byte; reset through the i8042.
    const CPUID_GUEST: &[u8] = &[
        0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x31, 0xc9, // xor ecx, ecx
        0x0f, 0xa2, // cpuid
        0x89, 0xcb, // mov ebx, ecx
        0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
        0xb9, 0x04, 0x00, 0x00, 0x00, // mov ecx, 4
        0x88, 0xd8, // 1: mov al, bl
        0xee, // out dx, al
        0xc1, 0xeb, 0x08, // shr ebx, 8
        0xff, 0xc9, // dec ecx
        0x75, 0xf6, // jnz 1b
        0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al
        0xf4, // hlt
    ];

    #[test]
    fn guest_writes_to_serial_and_resets_through_i8042() {
        let Some((exit, console)) = boot_code(CPUID_GUEST, 1) else {
            return;
        };
        assert_eq!(exit, VmExit::Reset);
        assert_eq!(console.len(), 4, "console: {console:?}");
        let ecx = u32::from_le_bytes(console[..4].try_into().unwrap());
        assert_ne!(ecx & (1 << 31), 0, "hypervisor bit");
        if crate::host::virtualization().is_hardware() {
            // With VT-x/AMD-V the guest sees what KVM supports (cx16, popcnt, xsave, rdrand).
            let kvm = kvm_ioctls::Kvm::new().unwrap();
            let supported = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .unwrap();
            let host_ecx = supported
                .as_slice()
                .iter()
                .find(|e| e.function == 1)
                .unwrap()
                .ecx;
            for bit in [13, 23, 26, 30] {
                assert_eq!(
                    ecx & (1 << bit),
                    host_ecx & (1 << bit),
                    "leaf 1 ecx bit {bit}: the guest must see what KVM supports"
                );
            }
            let deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
            assert_eq!(ecx & (1 << 24) != 0, deadline, "TSC-deadline bit");
        } else {
            // PVM replaces leaf 1 with the host's bits whatever KVM_SET_CPUID2 says.
            eprintln!("not checking hidden CPUID bits: PVM host (guest sees ecx {ecx:#x})");
        }
    }

    #[test]
    fn triple_fault_is_reported_as_such() {
        // Load an empty IDT, then raise #UD: no handler means a triple fault.
        let code = [
            0x6a, 0x00, // push 0
            0x6a, 0x00, // push 0
            0x0f, 0x01, 0x1c, 0x24, // lidt [rsp]
            0x0f, 0x0b, // ud2
        ];
        let Some((exit, _)) = boot_code(&code, 1) else {
            return;
        };
        assert!(
            matches!(
                exit,
                VmExit::TripleFault { cpu: 0 } | VmExit::InternalError { .. }
            ),
            "{exit:?}"
        );
    }

    #[test]
    fn stop_handle_ends_a_spinning_guest_with_all_vcpus() {
        // jmp $ forever, on 2 vCPUs (the AP waits for SIPI inside KVM_RUN).
        let code = [0xeb, 0xfe];
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipping: no /dev/kvm on this host");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("spin.elf");
        std::fs::write(&kernel, tiny_elf(&code, 0x10_0000)).unwrap();
        let mut cfg = VmConfig::new(&kernel);
        cfg.mem_bytes = 16 << 20;
        cfg.vcpus = 2;
        let builder = VmBuilder::with_console(cfg, Box::new(io::sink())).unwrap();
        let handle = builder.handle();
        let vm = builder.start().unwrap();
        let t0 = Instant::now();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            handle.stop();
        });
        assert_eq!(vm.wait(), VmExit::Stopped);
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    /// A device with two queues and nothing else: its transport's first byte is 'v' (magic).
    #[derive(Debug)]
    struct FakeDevice;

    impl devices::virtio::VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            0x42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            0
        }
        fn ack_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: devices::virtio::ActivateContext,
        ) -> Result<(), devices::virtio::ActivateError> {
            Ok(())
        }
        fn reset(&mut self) -> bool {
            true
        }
    }

    fn fake_transport(mem: &GuestMemoryMmap) -> Arc<Mutex<devices::virtio::mmio::MmioTransport>> {
        let t = devices::virtio::mmio::MmioTransport::new(
            mem.clone(),
            Arc::new(Mutex::new(FakeDevice)),
        )
        .unwrap();
        Arc::new(Mutex::new(t))
    }

    struct NotifyCounter {
        evt: vmm_sys_util::eventfd::EventFd,
        notified: Arc<AtomicBool>,
    }

    impl event_manager::MutEventSubscriber for NotifyCounter {
        fn process(&mut self, _: event_manager::Events, _: &mut event_manager::EventOps) {
            if self.evt.read().is_ok() {
                self.notified.store(true, Ordering::SeqCst);
            }
        }
        fn init(&mut self, ops: &mut event_manager::EventOps) {
            ops.add(event_manager::Events::new(
                &self.evt,
                event_manager::EventSet::IN,
            ))
            .unwrap();
        }
    }

    fn mov_rax(v: u64) -> Vec<u8> {
        [vec![0x48, 0xb8], v.to_le_bytes().to_vec()].concat()
    }

    fn mov_rbx(v: u64) -> Vec<u8> {
        [vec![0x48, 0xbb], v.to_le_bytes().to_vec()].concat()
    }

    #[test]
    fn virtio_mmio_slot_gets_mmio_reads_ioeventfd_notifies_and_a_cmdline_entry() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipping: no /dev/kvm on this host");
            return;
        }
        // Map 0xd000_0000 with a 2 MiB page (PDPTE[3] -> PD at 0xc000), read the transport's
        // first byte to COM1, notify queue 1, reboot.
        let code = [
            mov_rax(0xc003),
            mov_rbx(0xa018),
            vec![0x48, 0x89, 0x03], // mov [rbx], rax
            mov_rax(0xd000_0083),
            mov_rbx(0xc000 + 0x80 * 8),
            vec![0x48, 0x89, 0x03],                   // mov [rbx], rax
            vec![0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8], // mov rax, cr3; mov cr3, rax
            mov_rbx(0xd000_0000),
            vec![0x8b, 0x03],             // mov eax, [rbx] (the magic "virt")
            vec![0x66, 0xba, 0xf8, 0x03], // mov dx, 0x3f8
            vec![0xee],                   // out dx, al
            mov_rbx(0xd000_0050),
            vec![0xb8, 0x01, 0, 0, 0], // mov eax, 1
            vec![0x89, 0x03],          // mov [rbx], eax
            vec![0xb0, 0xfe, 0xe6, 0x64, 0xf4],
        ]
        .concat();
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("virtio.elf");
        std::fs::write(&kernel, tiny_elf(&code, 0x10_0000)).unwrap();
        let mut cfg = VmConfig::new(&kernel);
        cfg.mem_bytes = 16 << 20;
        let out = Capture::default();
        let mut builder = VmBuilder::with_console(cfg, Box::new(out.clone())).unwrap();

        let new_evt = || vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let queue_evts = vec![new_evt(), new_evt()];
        let q0 = queue_evts[0].try_clone().unwrap();
        let q1 = queue_evts[1].try_clone().unwrap();
        let notified = Arc::new(AtomicBool::new(false));
        let dev = VirtioMmioDevice {
            transport: fake_transport(builder.guest_memory()),
            subscriber: Arc::new(Mutex::new(NotifyCounter {
                evt: queue_evts[1].try_clone().unwrap(),
                notified: notified.clone(),
            })),
            queue_evts,
            irq_evt: new_evt(),
        };
        assert_eq!(builder.attach_virtio_mmio(dev).unwrap(), (0xd000_0000, 5));
        let second = VirtioMmioDevice {
            transport: fake_transport(builder.guest_memory()),
            queue_evts: vec![new_evt()],
            irq_evt: new_evt(),
            subscriber: Arc::new(Mutex::new(NotifyCounter {
                evt: new_evt(),
                notified: Arc::new(AtomicBool::new(false)),
            })),
        };
        assert_eq!(
            builder.attach_virtio_mmio(second).unwrap(),
            (0xd000_1000, 6)
        );
        let cmdline = builder.device_manager().cmdline().as_cstring().unwrap();
        let cmdline = cmdline.to_str().unwrap();
        assert!(
            cmdline.contains("virtio_mmio.device=4K@0xd0000000:5"),
            "{cmdline}"
        );
        assert!(
            cmdline.contains("virtio_mmio.device=4K@0xd0001000:6"),
            "{cmdline}"
        );

        let exit = builder.start().unwrap().wait();
        assert_eq!(exit, VmExit::Reset);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"v");
        // Delivered to the subscriber, or still pending on the eventfd if the loop ended first.
        assert!(
            notified.load(Ordering::SeqCst) || q1.read().is_ok(),
            "queue 1 notification not delivered"
        );
        assert!(
            q0.read().is_err(),
            "queue 0 must not be notified (datamatch)"
        );
    }

    #[test]
    fn memory_above_the_mmio_gap_is_registered() {
        let Some(_) = boot_code(CPUID_GUEST, 1) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("big.elf");
        std::fs::write(&kernel, tiny_elf(CPUID_GUEST, 0x10_0000)).unwrap();
        let mut cfg = VmConfig::new(&kernel);
        cfg.mem_bytes = (3 << 30) + (64 << 20);
        let builder = VmBuilder::with_console(cfg, Box::new(io::sink())).unwrap();
        use vm_memory::GuestMemoryBackend;
        assert_eq!(builder.guest_memory().num_regions(), 2);
        assert_eq!(builder.start().unwrap().wait(), VmExit::Reset);
    }
}
