//! `mvm info`: what this host's KVM offers.

use clap::Args;

use crate::host;
use crate::vm::Vm;

/// Flags of `mvm info`.
#[derive(Debug, Args)]
pub struct InfoArgs {}

/// Prints the KVM API version, vCPU limits and what backs /dev/kvm.
pub fn run(_args: &InfoArgs) -> anyhow::Result<i32> {
    let kvm = Vm::open_kvm()?;
    let virt = host::virtualization();
    println!("kvm api version: {}", kvm.get_api_version());
    println!("max vcpus: {}", kvm.get_max_vcpus());
    println!("recommended vcpus: {}", kvm.get_nr_vcpus());
    println!("virtualization: {}", virt.describe());
    if !virt.is_hardware() {
        let hidden: Vec<_> = crate::cpuid::hidden_feature_names().collect();
        println!("hidden cpu features: {}", hidden.join(","));
    }
    if let Some(mem) = host::mem_total() {
        println!("host memory: {} MiB", mem >> 20);
    }
    Ok(0)
}
