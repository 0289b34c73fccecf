//! `mvm info`: what this host's KVM offers.

use clap::Args;

use vmm::host;
use vmm::vm::Vm;

/// Flags of `mvm info`.
#[derive(Debug, Args)]
pub struct InfoArgs {}

/// Prints the KVM API version, vCPU limits and what backs /dev/kvm.
pub fn run(_args: &InfoArgs) -> anyhow::Result<i32> {
    let kvm = Vm::open_kvm()?;
    let virt = host::virtualization();
    outln!("kvm api version: {}", kvm.get_api_version());
    outln!("max vcpus: {}", kvm.get_max_vcpus());
    outln!("recommended vcpus: {}", kvm.get_nr_vcpus());
    outln!("virtualization: {}", virt.describe());
    if !virt.is_hardware() {
        let hidden: Vec<_> = vmm::cpuid::hidden_feature_names().collect();
        outln!("hidden cpu features: {}", hidden.join(","));
    }
    if let Some(mem) = host::mem_total() {
        outln!("host memory: {} MiB", mem >> 20);
    }
    Ok(0)
}
