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
    let template = vmm::vcpu::cpu_template(&kvm, virt);
    outln!(
        "tsc-deadline timer: {}",
        if template.tsc_deadline { "yes" } else { "no" }
    );
    // Grouped by reason: "hidden cpu features: a,b (why); c (why)".
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for (name, why) in template.hidden_features() {
        match groups.iter_mut().find(|(w, _)| *w == why) {
            Some((_, names)) => names.push(name),
            None => groups.push((why, vec![name])),
        }
    }
    let groups: Vec<String> = groups
        .iter()
        .map(|(why, names)| format!("{} ({why})", names.join(",")))
        .collect();
    outln!("hidden cpu features: {}", groups.join("; "));
    if let Some(mem) = host::mem_total() {
        outln!("host memory: {} MiB", mem >> 20);
    }
    // The VMM's seccomp filters (vmm/src/seccomp/filters.rs), one per kind of thread.
    let filters = vmm::seccomp::Filters::compile()?;
    let sizes: Vec<String> = filters
        .iter()
        .map(|f| {
            format!(
                "{} {} syscalls/{} instructions",
                f.kind().name(),
                f.syscalls(),
                f.instructions()
            )
        })
        .collect();
    outln!("vmm seccomp filters: {}", sizes.join(", "));
    outln!(
        "vmm jail: user, pid, mount and ipc namespaces; its own user (uids from {}); no \
         capabilities; no_new_privs; --security-opt vmm-seccomp=off and vmm-jail=off are for \
         debugging only",
        engine::confine::DEFAULT_UID_BASE
    );
    Ok(0)
}
