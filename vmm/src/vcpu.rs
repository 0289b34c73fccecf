//! vCPUs: their boot configuration (CPUID template, registers) and the run loop each one runs
//! on its own thread, routing port and MMIO exits to the buses and turning every way a vCPU
//! can stop into a [`VmExit`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{paging, regs};
use crate::cpuid;
use crate::exit::{ExitState, VmExit};
use crate::snapshot::cpu::{CpuStateError, VcpuState};

/// Longest x86 instruction.
const MAX_INSN_LEN: usize = 15;
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;

/// Why a vCPU could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The CPU template could not be applied.
    #[error("cannot apply the CPU template")]
    Cpuid(#[source] cpuid::CpuidError),
    /// Setting the boot registers failed.
    #[error("cannot set the boot registers")]
    Regs(#[source] regs::RegsError),
}

/// The CPU template for this host: hide what a PVM emulator cannot run (only there), add the
/// TSC-deadline timer where KVM has it.
pub fn cpu_template(kvm: &Kvm, virt: crate::host::Virtualization) -> cpuid::CpuTemplate {
    cpuid::CpuTemplate {
        hide_unemulated: virt == crate::host::Virtualization::Pvm,
        tsc_deadline: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
    }
}

/// Configures vCPU `id` of `count` with `template`: CPUID, FPU, MSRs, LAPIC; the BSP (id 0)
/// also gets the long-mode boot state at `entry`. APs keep KVM's default state and wait for
/// INIT/SIPI.
pub fn configure(
    kvm: &Kvm,
    fd: &VcpuFd,
    template: cpuid::CpuTemplate,
    id: u8,
    count: u8,
    entry: u64,
) -> Result<(), VcpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VcpuError::Kvm("GET_SUPPORTED_CPUID", e))?;
    cpuid::apply_template(&mut cpuid, template, id, count).map_err(VcpuError::Cpuid)?;
    if id == 0 && log::log_enabled!(log::Level::Debug) {
        for e in cpuid.as_slice() {
            log::debug!(
                "cpuid {:#x}.{}: eax {:#010x} ebx {:#010x} ecx {:#010x} edx {:#010x}",
                e.function,
                e.index,
                e.eax,
                e.ebx,
                e.ecx,
                e.edx
            );
        }
    }
    fd.set_cpuid2(&cpuid)
        .map_err(|e| VcpuError::Kvm("SET_CPUID2", e))?;
    if id == 0 {
        warn_if_template_overridden(fd, &cpuid);
    }
    regs::setup_common(fd).map_err(VcpuError::Regs)?;
    if id == 0 {
        regs::setup_bsp(fd, entry).map_err(VcpuError::Regs)?;
    }
    Ok(())
}

/// PVM replaces leaves 1, 7 and 0xd with the host's values whatever KVM_SET_CPUID2 says; then
/// the guest kernel itself must hide what the emulator cannot run (`clearcpuid=`, `noxsave`).
fn warn_if_template_overridden(fd: &VcpuFd, wanted: &kvm_bindings::CpuId) {
    let leaf1 = |c: &kvm_bindings::CpuId| {
        c.as_slice()
            .iter()
            .find(|e| e.function == 1)
            .map_or(0, |e| e.ecx)
    };
    let Ok(actual) = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES) else {
        return;
    };
    if leaf1(&actual) != leaf1(wanted) {
        log::info!(
            "KVM overrides the CPU template (leaf 1 ecx {:#x}, wanted {:#x}): the guest kernel \
             must hide unsupported features itself",
            leaf1(&actual),
            leaf1(wanted)
        );
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of [`kick_signal`] so it interrupts KVM_RUN with EINTR instead
/// of killing the process.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
            log::warn!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// What parked vCPUs are asked to do, and what they report.
#[derive(Debug, Default)]
struct Park {
    /// vCPUs must leave KVM_RUN and wait.
    pause: bool,
    /// vCPUs waiting now.
    parked: usize,
    /// Raised to ask every parked vCPU to save its state (once per value).
    save_round: u64,
    /// MSRs to save.
    msrs: Vec<u32>,
    /// Each vCPU's saved state (or why it could not be saved), by id, for `save_round`.
    saved: Vec<Option<Result<VcpuState, String>>>,
}

/// Pauses, saves and stops the vCPU threads of one VM from other threads. It owns the threads:
/// a thread's handle stays valid (and may be signalled) for as long as it is here.
#[derive(Debug, Default)]
pub struct VcpuControl {
    park: Mutex<Park>,
    changed: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl VcpuControl {
    /// Takes over a started vCPU thread.
    pub fn add_thread(&self, thread: JoinHandle<()>) {
        devices::bus::lock(&self.threads).push(thread);
    }

    /// vCPU threads that have not ended.
    pub fn running_threads(&self) -> usize {
        let mut threads = devices::bus::lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.len()
    }

    fn kick_all(&self) {
        for t in devices::bus::lock(&self.threads).iter() {
            // A signal that lands outside KVM_RUN is lost; callers send it again.
            let _ = vmm_sys_util::signal::Killable::kill(t, kick_signal());
        }
    }

    /// Wakes parked vCPUs (to see the stop flag).
    pub fn wake(&self) {
        let _unused = devices::bus::lock(&self.park);
        self.changed.notify_all();
    }

    /// Parks every vCPU outside KVM_RUN (their pending I/O completed); returns once all
    /// `count` are parked, or an error if some did not within `limit` (the VM ended).
    pub fn pause(&self, count: usize, limit: Duration) -> Result<(), String> {
        devices::bus::lock(&self.park).pause = true;
        let deadline = Instant::now() + limit;
        loop {
            {
                let park = devices::bus::lock(&self.park);
                let (park, _) = self
                    .changed
                    .wait_timeout(park, Duration::from_millis(2))
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if park.parked >= count {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline || self.running_threads() < count {
                self.resume();
                return Err("the vCPUs did not pause (has the VM ended?)".into());
            }
            self.kick_all();
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        devices::bus::lock(&self.park).pause = false;
        self.changed.notify_all();
    }

    /// Asks every parked vCPU (all `count` must be) to save its state; returns them by id.
    pub fn save(&self, count: usize, msrs: Vec<u32>) -> Result<Vec<VcpuState>, String> {
        let mut park = devices::bus::lock(&self.park);
        if !park.pause || park.parked < count {
            return Err("the vCPUs are not paused".into());
        }
        park.save_round += 1;
        park.msrs = msrs;
        park.saved = (0..count).map(|_| None).collect();
        self.changed.notify_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        while park.saved.iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                return Err("the vCPUs did not save their state in time".into());
            }
            park = self
                .changed
                .wait_timeout(park, Duration::from_millis(50))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        park.saved
            .drain(..)
            .enumerate()
            .map(|(id, s)| {
                s.unwrap_or_else(|| Err("not saved".into()))
                    .map_err(|e| format!("vCPU {id}: {e}"))
            })
            .collect()
    }

    fn pause_requested(&self) -> bool {
        devices::bus::lock(&self.park).pause
    }

    /// Takes the joinable threads (to stop them).
    pub fn take_threads(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *devices::bus::lock(&self.threads))
    }
}

/// What a vCPU thread shares with the rest of the VM.
#[derive(Debug, Clone)]
pub struct VcpuShared {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where the vCPU reports how the VM ends.
    pub exit: Arc<ExitState>,
    /// Set when all vCPUs must stop.
    pub stop: Arc<AtomicBool>,
    /// Guest memory, to read instruction bytes after a failure.
    pub mem: GuestMemoryMmap,
    /// Whether the host has VT-x/AMD-V (for the emulation-failure hint).
    pub hardware_virt: bool,
    /// Pause and save requests.
    pub control: Arc<VcpuControl>,
}

/// One vCPU, ready to run on its own thread.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    shared: VcpuShared,
}

enum Step {
    Continue,
    Exit(VmExit),
    InternalError,
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(id: u8, fd: VcpuFd, shared: VcpuShared) -> Self {
        Self { id, fd, shared }
    }

    /// The vCPU's index (and APIC id).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Where this vCPU reports how the VM ends.
    pub fn exit_state(&self) -> Arc<ExitState> {
        self.shared.exit.clone()
    }

    /// Runs the guest until the VM stops; reports why to the exit state.
    pub fn run(mut self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            if self.shared.control.pause_requested() {
                self.park();
                continue;
            }
            let step = self.step();
            let exit = match step {
                Step::Continue => continue,
                Step::Exit(exit) => exit,
                Step::InternalError => self.internal_error(),
            };
            self.shared.exit.record(exit);
            break;
        }
        log::debug!("vCPU {} stopped", self.id);
    }

    fn step(&mut self) -> Step {
        let cpu = self.id;
        let shared = &self.shared;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                data.fill(0xff);
                if !shared.pio.read(u64::from(port), data) {
                    log::trace!("unhandled port read {port:#x}");
                }
                Step::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !shared.pio.write(u64::from(port), data) {
                    log::trace!("unhandled port write {port:#x}");
                }
                // A reset through the i8042 ends this vCPU at once: no guest code runs after it.
                if shared.exit.reset_requested() {
                    return Step::Exit(VmExit::Reset);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                data.fill(0xff);
                if !shared.mmio.read(addr, data) {
                    log::debug!("unhandled MMIO read {addr:#x}");
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !shared.mmio.write(addr, data) {
                    log::debug!("unhandled MMIO write {addr:#x}");
                }
                Step::Continue
            }
            Ok(VcpuExit::Shutdown) => Step::Exit(if shared.exit.reset_requested() {
                VmExit::Reset
            } else {
                VmExit::TripleFault { cpu }
            }),
            Ok(VcpuExit::FailEntry(reason, _)) => Step::Exit(VmExit::FailEntry { cpu, reason }),
            Ok(VcpuExit::InternalError) => Step::InternalError,
            Ok(VcpuExit::SystemEvent(kind, _)) => Step::Exit(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                KVM_SYSTEM_EVENT_CRASH => VmExit::GuestCrash { cpu },
                other => VmExit::VcpuError {
                    cpu,
                    message: format!("unexpected KVM system event {other}"),
                },
            }),
            // With the in-kernel LAPIC HLT is handled by KVM; if it does exit, resuming the
            // guest is a spurious wake-up it handles anyway.
            Ok(VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen) => Step::Continue,
            Ok(other) => Step::Exit(VmExit::VcpuError {
                cpu,
                message: format!("unexpected KVM exit {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::Exit(VmExit::VcpuError {
                cpu,
                message: format!("KVM_RUN failed: {e}"),
            }),
        }
    }

    /// Waits outside KVM_RUN while the VM is paused, saving this vCPU's state when asked.
    fn park(&mut self) {
        // An I/O or MMIO exit completes (a port read lands in rax) only when KVM_RUN is entered
        // again: enter it once with immediate_exit set, so what is saved is consistent.
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        let control = self.shared.control.clone();
        let mut park = devices::bus::lock(&control.park);
        park.parked += 1;
        control.changed.notify_all();
        let mut round = park.save_round;
        while park.pause && !self.shared.stop.load(Ordering::SeqCst) {
            if park.save_round != round {
                round = park.save_round;
                let saved =
                    VcpuState::save(&self.fd, self.id, &park.msrs).map_err(|e| error_chain(&e));
                if let Some(slot) = park.saved.get_mut(usize::from(self.id)) {
                    *slot = Some(saved);
                }
                control.changed.notify_all();
            }
            park = control
                .changed
                .wait_timeout(park, Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        park.parked -= 1;
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR: suberror, RIP and the instruction bytes there.
    fn internal_error(&mut self) -> VmExit {
        // SAFETY: KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so the kernel filled the `internal`
        // member of the exit union; it is plain data that is valid for any bit pattern.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let mut insn = insn_bytes_from_exit(internal.suberror, internal.ndata, &internal.data);
        if insn.is_empty() {
            insn = self.read_insn_at(rip);
        }
        VmExit::InternalError {
            cpu: self.id,
            suberror: internal.suberror,
            rip,
            insn,
            hardware_virt: self.shared.hardware_virt,
        }
    }

    /// Reads up to 15 bytes at `rip`, translating it through the guest's page tables.
    fn read_insn_at(&self, rip: u64) -> Vec<u8> {
        let Ok(sregs) = self.fd.get_sregs() else {
            return Vec::new();
        };
        let linear = rip.wrapping_add(sregs.cs.base);
        let phys = if sregs.cr0 & CR0_PG == 0 {
            Some(linear)
        } else if sregs.efer & EFER_LMA != 0 {
            paging::translate(&self.shared.mem, sregs.cr3, linear)
        } else {
            None
        };
        let Some(phys) = phys else {
            return Vec::new();
        };
        let mut bytes = Vec::new();
        for i in 0..MAX_INSN_LEN as u64 {
            match self.shared.mem.read_obj::<u8>(GuestAddress(phys + i)) {
                Ok(b) => bytes.push(b),
                Err(_) => break,
            }
        }
        bytes
    }
}

/// An error with its sources, on one line.
fn error_chain(e: &CpuStateError) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// The instruction bytes KVM put in an emulation-failure exit, if it did.
pub fn insn_bytes_from_exit(suberror: u32, ndata: u32, data: &[u64; 16]) -> Vec<u8> {
    // Layout: data[0] = flags, then insn_size (1 byte) and up to 15 instruction bytes.
    if suberror != KVM_INTERNAL_ERROR_EMULATION
        || ndata < 3
        || data[0] & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0
    {
        return Vec::new();
    }
    let mut raw = Vec::with_capacity(16);
    raw.extend_from_slice(&data[1].to_le_bytes());
    raw.extend_from_slice(&data[2].to_le_bytes());
    let len = usize::from(raw[0]).min(MAX_INSN_LEN);
    raw[1..=len].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_instruction_bytes_from_an_emulation_failure() {
        let mut data = [0u64; 16];
        data[0] = 1;
        // insn_size 3, bytes 0f c7 0e.
        data[1] = u64::from_le_bytes([3, 0x0f, 0xc7, 0x0e, 0, 0, 0, 0]);
        assert_eq!(insn_bytes_from_exit(1, 3, &data), vec![0x0f, 0xc7, 0x0e]);
        // No flag, wrong suberror, too little data, or a hostile size: nothing or at most 15.
        assert!(insn_bytes_from_exit(1, 1, &data).is_empty());
        assert!(insn_bytes_from_exit(2, 3, &data).is_empty());
        data[0] = 0;
        assert!(insn_bytes_from_exit(1, 3, &data).is_empty());
        data[0] = 1;
        data[1] = 0xff;
        assert_eq!(insn_bytes_from_exit(1, 3, &data).len(), 15);
    }
}
