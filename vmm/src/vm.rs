//! The KVM VM: in-kernel irqchip and PIT, the TSS and identity-map addresses, and guest memory
//! registered as KVM memory slots.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::{self, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

/// Why the VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be mapped.
    #[error("cannot set up guest memory")]
    Memory(#[source] memory::MemoryError),
    /// A region's host address could not be found.
    #[error("guest memory region at {0:#x} has no host mapping")]
    HostAddress(u64),
}

/// A KVM VM with its guest memory.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    mem_size: u64,
}

impl Vm {
    /// Opens /dev/kvm.
    pub fn open_kvm() -> Result<Kvm, VmError> {
        // What backs /dev/kvm is found out now, with /dev/kvm: a VMM's jail hides /proc.
        let _ = crate::host::virtualization();
        Kvm::new().map_err(VmError::OpenKvm)
    }

    /// Creates a VM with `mem_size` bytes of RAM, an in-kernel irqchip and PIT.
    pub fn new(kvm: Kvm, mem_size: u64) -> Result<Self, VmError> {
        let mem = memory::create_guest_memory(mem_size).map_err(VmError::Memory)?;
        Self::with_memory(kvm, mem, mem_size)
    }

    /// Creates a VM over existing guest memory of `mem_size` bytes (e.g. a snapshot's file),
    /// with an in-kernel irqchip and PIT.
    pub fn with_memory(kvm: Kvm, mem: GuestMemoryMmap, mem_size: u64) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(|e| VmError::Kvm("CREATE_VM", e))?;
        let tss = usize::try_from(KVM_TSS_ADDR).unwrap_or(usize::MAX);
        fd.set_tss_address(tss)
            .map_err(|e| VmError::Kvm("SET_TSS_ADDR", e))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(|e| VmError::Kvm("SET_IDENTITY_MAP_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Kvm("CREATE_PIT2", e))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| VmError::HostAddress(region.start_addr().0))?;
            let kvm_region = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which
            // this Vm keeps (and every vCPU thread clones) for as long as the VM exists.
            unsafe { fd.set_user_memory_region(kvm_region) }
                .map_err(|e| VmError::Kvm("SET_USER_MEMORY_REGION", e))?;
        }
        Ok(Self {
            kvm,
            fd: Arc::new(fd),
            mem,
            mem_size,
        })
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor (for ioeventfds, irqfds, device setup).
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Guest memory (cheap to clone: regions are shared).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Guest RAM size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::Kvm("CREATE_VCPU", e))
    }
}
