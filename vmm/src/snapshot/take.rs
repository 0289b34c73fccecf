//! Pausing and snapshotting a running VM, and putting a vCPU back.
//!
//! Requests come from any thread through a [`VmController`] and are carried out on the event
//! loop's thread by [`SnapshotPoint`], a subscriber of the loop: while it saves, no device
//! handler runs, and the vCPUs are parked outside KVM_RUN ([`VcpuControl`]). The order is the
//! vCPUs, the VM's interrupt controllers, PIT and clock, the devices, then the memory file and
//! last the state file (a directory without a readable state file is no snapshot).
//!
//! System calls on this path (for the seccomp filters, `crate::seccomp::filters`): on save, each
//! vCPU thread reads its own state (KVM vCPU GET_* ioctls, KVM_GET_TSC_KHZ) and the event loop's
//! thread the VM's (KVM_GET_IRQCHIP, KVM_GET_PIT2, KVM_GET_CLOCK), kicks the vCPUs (`tgkill`
//! with the kick signal), parks them (futex) and writes the files it was handed, created
//! beforehand ([`SnapshotFiles`]: `ftruncate`, `pwrite64`, `write`, `fsync`; no file is opened
//! by path). A restore (SET_* ioctls, `open`, `mmap` of the memory file) runs while the VM is
//! built, before any filter.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::cpu::{msrs_to_save, tsc_differs, VcpuState};
use super::{
    memory, CpuFingerprint, Machine, SnapshotError, SnapshotFiles, SnapshotState, VmState,
};
use crate::device_manager::DeviceHandles;
use crate::vcpu::VcpuControl;
use crate::vm::Vm;

/// How long the vCPUs may take to leave KVM_RUN.
const PAUSE_LIMIT: Duration = Duration::from_secs(10);
/// How long a request may take, a snapshot included.
const REPLY_LIMIT: Duration = Duration::from_secs(600);

/// What a [`VmController`] asks for.
#[derive(Debug)]
enum Request {
    Pause,
    Resume,
    Snapshot(SnapshotFiles),
}

type Reply = Result<SnapshotReport, SnapshotError>;

/// What a request did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotReport {
    /// How long the vCPUs were paused for it (zero for pause and resume).
    pub paused_for: Duration,
    /// Pages of memory that were not all zeros (snapshots only).
    pub data_pages: u64,
}

/// Pauses, resumes and snapshots a running VM from any thread (cheap to clone).
#[derive(Debug, Clone)]
pub struct VmController {
    requests: mpsc::Sender<(Request, mpsc::Sender<Reply>)>,
    wake: Arc<EventFd>,
}

impl VmController {
    fn ask(&self, request: Request) -> Reply {
        let gone = || SnapshotError::Stopped("the VM is not running".into());
        let (tx, rx) = mpsc::channel();
        self.requests.send((request, tx)).map_err(|_| gone())?;
        self.wake
            .write(1)
            .map_err(|e| SnapshotError::Io("event loop".into(), e))?;
        // The event loop answers at once unless the VM has ended (or takes its time writing
        // the memory file: allow for a slow disk).
        rx.recv_timeout(REPLY_LIMIT).map_err(|_| gone())?
    }

    /// Parks every vCPU (the guest stops; its memory and devices stay).
    pub fn pause(&self) -> Result<(), SnapshotError> {
        self.ask(Request::Pause).map(drop)
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) -> Result<(), SnapshotError> {
        self.ask(Request::Resume).map(drop)
    }

    /// Saves the VM into `files` (created empty beforehand); the VM then goes on (or stays
    /// paused, if it was).
    pub fn snapshot(&self, files: SnapshotFiles) -> Result<SnapshotReport, SnapshotError> {
        self.ask(Request::Snapshot(files))
    }
}

/// The event-loop side of [`VmController`].
pub struct SnapshotPoint {
    requests: mpsc::Receiver<(Request, mpsc::Sender<Reply>)>,
    controller: VmController,
    wake: Arc<EventFd>,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    devices: DeviceHandles,
    control: Arc<VcpuControl>,
    vcpus: u8,
    machine: Machine,
    cpu: CpuFingerprint,
    msrs: Vec<u32>,
    paused: bool,
}

impl std::fmt::Debug for SnapshotPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotPoint")
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

impl SnapshotPoint {
    /// The snapshot point of `vm` with `vcpus` vCPUs parked through `control`.
    pub fn new(
        vm: &Vm,
        devices: DeviceHandles,
        control: Arc<VcpuControl>,
        vcpus: u8,
    ) -> Result<Self, SnapshotError> {
        let wake = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|e| SnapshotError::Io("eventfd".into(), e))?,
        );
        let (tx, requests) = mpsc::channel();
        let msrs = msrs_to_save(vm.kvm()).map_err(SnapshotError::Vm)?;
        Ok(Self {
            requests,
            controller: VmController {
                requests: tx,
                wake: wake.clone(),
            },
            wake,
            vm: vm.fd().clone(),
            mem: vm.memory().clone(),
            devices,
            control,
            vcpus,
            machine: Machine {
                mem_bytes: vm.mem_size(),
                vcpus,
            },
            cpu: CpuFingerprint::host(vm.kvm()),
            msrs,
            paused: false,
        })
    }

    /// A handle for other threads.
    pub fn controller(&self) -> VmController {
        self.controller.clone()
    }

    fn pause(&mut self) -> Result<(), SnapshotError> {
        if !self.paused {
            self.control
                .pause(usize::from(self.vcpus), PAUSE_LIMIT)
                .map_err(SnapshotError::Stopped)?;
            self.paused = true;
        }
        Ok(())
    }

    fn resume(&mut self) {
        if self.paused {
            self.control.resume();
            self.paused = false;
        }
    }

    fn snapshot(&mut self, mut files: SnapshotFiles) -> Reply {
        let was_paused = self.paused;
        let t0 = Instant::now();
        self.pause()?;
        let result = self.save(&mut files);
        if !was_paused {
            self.resume();
        }
        result.map(|data_pages| SnapshotReport {
            paused_for: t0.elapsed(),
            data_pages,
        })
    }

    fn save(&self, files: &mut SnapshotFiles) -> Result<u64, SnapshotError> {
        let vcpus = self
            .control
            .save(usize::from(self.vcpus), self.msrs.clone())
            .map_err(SnapshotError::Stopped)?;
        let vm = VmState::save(&self.vm).map_err(SnapshotError::Vm)?;
        let devices = self.devices.save()?;
        let memory = memory::save(
            &self.mem,
            files.memory_file(),
            &super::memory_path(files.dir()),
        )?;
        let state = SnapshotState {
            mvm_version: super::mvm_version(),
            cpu: self.cpu.clone(),
            machine: self.machine,
            memory,
            vcpus,
            vm,
            devices,
        };
        state.write(files)?;
        Ok(memory.data_pages)
    }
}

impl MutEventSubscriber for SnapshotPoint {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.wake.read();
        while let Ok((request, reply)) = self.requests.try_recv() {
            let result = match request {
                Request::Pause => self.pause().map(|()| SnapshotReport::default()),
                Request::Resume => {
                    self.resume();
                    Ok(SnapshotReport::default())
                }
                Request::Snapshot(files) => self.snapshot(files),
            };
            let _ = reply.send(result);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.wake, EventSet::IN)) {
            log::warn!("cannot watch snapshot requests: {e:?}");
        }
    }
}

/// Restores one vCPU of a restored VM: scales its TSC to the saved frequency where this host's
/// differs, then puts its state back.
pub fn restore_vcpu(fd: &VcpuFd, saved: &VcpuState) -> Result<(), SnapshotError> {
    if let (Some(saved_khz), Ok(now_khz)) = (saved.tsc_khz, fd.get_tsc_khz()) {
        if tsc_differs(saved_khz, now_khz) {
            fd.set_tsc_khz(saved_khz).map_err(|e| {
                SnapshotError::Vcpu(saved.id, super::CpuStateError::Kvm("SET_TSC_KHZ", e))
            })?;
        }
    }
    saved
        .restore(fd)
        .map_err(|e| SnapshotError::Vcpu(saved.id, e))
}
