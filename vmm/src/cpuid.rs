//! The CPU template: what each vCPU sees in CPUID. Starts from KVM_GET_SUPPORTED_CPUID and
//! normalizes it as a VMM must on every host (the checklist Firecracker documents as "CPUID
//! normalization"): the APIC id and topology of each vCPU, the hypervisor bit and KVM's signature
//! leaf, the TSC-deadline timer where KVM has it (KVM never reports that bit itself), and no
//! performance-monitoring features mvm does not emulate. Everything else KVM supports reaches the
//! guest unchanged, the XSAVE leaf included.
//!
//! Only on a PVM host ([`CpuTemplate::hide_unemulated`]) does the template also hide what that
//! host's instruction emulator cannot execute (the same bits as `clearcpuid=`/`noxsave`/
//! `nofsgsbase` in the test kernel's command line): popcnt, cx16 (cmpxchg16b), xsave/osxsave
//! (xrstor), fsgsbase, rdrand, rdseed, smap, erms, fsrm; AVX and its family depend on XSAVE and
//! go with it; leaf 0xd (XSAVE state) is emptied.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// A register bit to clear in a leaf.
struct Hidden {
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u32,
    name: &'static str,
}

#[derive(Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

const fn hide(leaf: u32, subleaf: u32, reg: Reg, bit: u32, name: &'static str) -> Hidden {
    Hidden {
        leaf,
        subleaf,
        reg,
        bit,
        name,
    }
}

/// Features a PVM host's emulator cannot execute, and what depends on them.
const HIDDEN_ON_PVM: &[Hidden] = &[
    hide(1, 0, Reg::Ecx, 12, "fma"),
    hide(1, 0, Reg::Ecx, 13, "cx16"),
    hide(1, 0, Reg::Ecx, 23, "popcnt"),
    hide(1, 0, Reg::Ecx, 26, "xsave"),
    hide(1, 0, Reg::Ecx, 27, "osxsave"),
    hide(1, 0, Reg::Ecx, 28, "avx"),
    hide(1, 0, Reg::Ecx, 29, "f16c"),
    hide(1, 0, Reg::Ecx, 30, "rdrand"),
    hide(7, 0, Reg::Ebx, 0, "fsgsbase"),
    hide(7, 0, Reg::Ebx, 5, "avx2"),
    hide(7, 0, Reg::Ebx, 9, "erms"),
    hide(7, 0, Reg::Ebx, 16, "avx512f"),
    hide(7, 0, Reg::Ebx, 18, "rdseed"),
    hide(7, 0, Reg::Ebx, 20, "smap"),
    hide(7, 0, Reg::Edx, 4, "fsrm"),
];

/// Features hidden on every host: mvm emulates no performance-monitoring hardware.
const ALWAYS_HIDDEN: &[Hidden] = &[
    // Perfmon and Debug Capability: IA32_PERF_CAPABILITIES, which mvm does not offer.
    hide(1, 0, Reg::Ecx, 15, "pdcm"),
];

/// Hypervisor present (leaf 1, ecx).
const ECX_HYPERVISOR: u32 = 1 << 31;
/// TSC-deadline mode of the local APIC timer (leaf 1, ecx).
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// IA32_ARCH_CAPABILITIES present (leaf 7, edx): AMD CPUs have no such MSR.
const EDX_ARCH_CAPABILITIES: u32 = 1 << 29;
/// Architectural performance monitoring leaf.
const PERFMON_LEAF: u32 = 0xa;
/// "AuthenticAMD" as ebx (leaf 0).
const VENDOR_AMD_EBX: u32 = 0x6874_7541;
/// Hyper-threading / multi-core package (leaf 1, edx).
const EDX_HTT: u32 = 1 << 28;
/// KVM's CPUID signature leaf.
const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// "KVMKVMKVM\0\0\0" as ebx, ecx, edx.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Why the template could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The CPUID list cannot grow by the entries the template adds.
    #[error("too many CPUID entries")]
    TooManyEntries,
}

/// What the host can run, which decides what the template hides and adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTemplate {
    /// Hide the features a PVM host's instruction emulator cannot execute. Only for PVM hosts:
    /// with VT-x/AMD-V the guest sees every feature KVM supports.
    pub hide_unemulated: bool,
    /// KVM has KVM_CAP_TSC_DEADLINE_TIMER: advertise the TSC-deadline timer (CPUID.1:ECX[24]),
    /// which KVM_GET_SUPPORTED_CPUID never reports. Without it a guest falls back to the PIT as
    /// its clock event.
    pub tsc_deadline: bool,
}

impl CpuTemplate {
    /// The features this template hides from guests, with the reason for each group.
    pub fn hidden_features(&self) -> Vec<(&'static str, &'static str)> {
        let mut out: Vec<_> = ALWAYS_HIDDEN
            .iter()
            .map(|h| (h.name, "not emulated by mvm"))
            .collect();
        out.push(("arch_perfmon", "not emulated by mvm"));
        if self.hide_unemulated {
            out.extend(
                HIDDEN_ON_PVM
                    .iter()
                    .map(|h| (h.name, "this host's PVM emulator cannot execute it")),
            );
        }
        out
    }
}

/// Bits a shift must cover to hold `n` distinct ids.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// Applies `template` for vCPU `id` of `count` (one core per vCPU, one package) to `cpuid`.
pub fn apply_template(
    cpuid: &mut CpuId,
    template: CpuTemplate,
    id: u8,
    count: u8,
) -> Result<(), CpuidError> {
    let apic_id = u32::from(id);
    let n = u32::from(count.max(1));
    if !cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == KVM_SIGNATURE_LEAF)
    {
        cpuid
            .push(kvm_cpuid_entry2 {
                function: KVM_SIGNATURE_LEAF,
                ..Default::default()
            })
            .map_err(|_| CpuidError::TooManyEntries)?;
    }
    let amd = cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 0 && e.ebx == VENDOR_AMD_EBX);
    let hidden = ALWAYS_HIDDEN.iter().chain(if template.hide_unemulated {
        HIDDEN_ON_PVM
    } else {
        &[]
    });
    let hidden: Vec<&Hidden> = hidden.collect();
    for entry in cpuid.as_mut_slice() {
        for h in &hidden {
            let subleaf_matches =
                entry.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || entry.index == h.subleaf;
            if entry.function == h.leaf && subleaf_matches {
                *reg_mut(entry, h.reg) &= !(1 << h.bit);
            }
        }
        match entry.function {
            1 => {
                // ebx: [31:24] initial APIC id, [23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((n & 0xff) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if template.tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if n > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            4 => {
                // Deterministic cache parameters: cores per package in [31:26]; caches are
                // private except the last level, shared by all cores.
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { n - 1 } else { 0 };
                entry.eax =
                    (entry.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((n - 1) & 0x3f) << 26);
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread per core), level 1 = cores.
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = id_bits(n);
                        entry.ebx = n;
                        entry.ecx = (2 << 8) | 1;
                    }
                    i => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = i;
                    }
                }
            }
            7 if amd && entry.index == 0 => entry.edx &= !EDX_ARCH_CAPABILITIES,
            PERFMON_LEAF => {
                // No architectural performance monitoring: mvm sets up no vPMU for guests.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0xd if template.hide_unemulated => {
                // XSAVE is hidden: no XSAVE state components.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            KVM_SIGNATURE_LEAF => {
                entry.eax = entry.eax.max(KVM_SIGNATURE_LEAF + 1);
                [entry.ebx, entry.ecx, entry.edx] = KVM_SIGNATURE;
            }
            0x8000_001e => {
                // AMD extended APIC id; compute unit (core) id; node 0.
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx = 0;
            }
            0x8000_001d => {
                // AMD cache topology: cores sharing each cache in eax[25:14]; only the last level
                // is shared.
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { n - 1 } else { 0 };
                entry.eax = (entry.eax & !(0xfff << 14)) | ((sharing & 0xfff) << 14);
            }
            0x8000_0008 => {
                // AMD: number of cores - 1 in ecx[7:0], APIC id size in ecx[15:12].
                entry.ecx = (entry.ecx & !0xf0ff) | ((n - 1) & 0xff) | (id_bits(n) << 12);
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 4 | 7 | 0xb | 0xd) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    const PVM: CpuTemplate = CpuTemplate {
        hide_unemulated: true,
        tsc_deadline: false,
    };
    const HARDWARE: CpuTemplate = CpuTemplate {
        hide_unemulated: false,
        tsc_deadline: true,
    };

    fn host_like() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(1, 0, [0x906ea, 0x0001_0800, u32::MAX, u32::MAX]),
            entry(4, 0, [0x121, 0, 0, 0]),
            entry(4, 3, [0x163, 0, 0, 0]),
            entry(7, 0, [0, u32::MAX, 0, u32::MAX]),
            entry(0xa, 0, [0x0703_0802, 0, 0, 0x603]),
            entry(7, 1, [0, u32::MAX, 0, 0]),
            entry(0xb, 0, [1, 2, 0x100, 9]),
            entry(0xb, 1, [4, 8, 0x201, 9]),
            entry(0xd, 0, [7, 0x340, 0x340, 0]),
            entry(0x8000_0008, 0, [0x3027, 0, 0, 0]),
            entry(0x8000_001e, 0, [5, 0x105, 0x300, 0]),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn hides_the_features_the_emulator_cannot_run() {
        let mut c = host_like();
        apply_template(&mut c, PVM, 0, 1).unwrap();
        let l1 = find(&c, 1, 0);
        for bit in [13, 23, 26, 27, 30] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        let l7 = find(&c, 7, 0);
        for bit in [0, 9, 18, 20] {
            assert_eq!(l7.ebx & (1 << bit), 0, "leaf 7 ebx bit {bit}");
        }
        assert_eq!(l7.edx & (1 << 4), 0);
        // Only subleaf 0 of leaf 7 carries these bits.
        assert_eq!(find(&c, 7, 1).ebx, u32::MAX);
        assert_eq!(find(&c, 0xd, 0).eax, 0);
        assert!(PVM.hidden_features().iter().any(|(n, _)| *n == "popcnt"));
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_topology() {
        let mut c = host_like();
        apply_template(&mut c, PVM, 2, 4).unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "clflush size kept");
        assert_ne!(l1.edx & EDX_HTT, 0);
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
        assert_eq!(find(&c, 4, 0).eax >> 26, 3);
        assert_eq!((find(&c, 4, 3).eax >> 14) & 0xfff, 3);
        assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xff, 3);
        let amd = find(&c, 0x8000_001e, 0);
        assert_eq!((amd.eax, amd.ebx, amd.ecx), (2, 2, 0));
    }

    #[test]
    fn adds_the_kvm_signature_leaf() {
        let mut c = host_like();
        apply_template(&mut c, PVM, 0, 1).unwrap();
        let sig = find(&c, KVM_SIGNATURE_LEAF, 0);
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert!(sig.eax > KVM_SIGNATURE_LEAF);
        assert_eq!(find(&c, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(5), 3);
    }

    #[test]
    fn hardware_hosts_keep_every_feature_kvm_supports() {
        let mut c = host_like();
        apply_template(&mut c, HARDWARE, 0, 1).unwrap();
        let l1 = find(&c, 1, 0);
        // cx16, popcnt, xsave, avx, fma, sse4_2: what x86-64-v2/v3 programs need.
        for bit in [12, 13, 20, 23, 26, 28] {
            assert_ne!(l1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit} kept");
        }
        let l7 = find(&c, 7, 0);
        for bit in [0, 5, 9, 18, 20] {
            assert_ne!(l7.ebx & (1 << bit), 0, "leaf 7 ebx bit {bit} kept");
        }
        assert_eq!(find(&c, 0xd, 0).eax, 7, "XSAVE leaf intact");
        assert_eq!(find(&c, 0xd, 0).ebx, 0x340);
        assert!(!HARDWARE
            .hidden_features()
            .iter()
            .any(|(n, _)| *n == "popcnt"));
    }

    #[test]
    fn tsc_deadline_is_advertised_only_when_kvm_has_the_timer() {
        let mut c = host_like();
        // The host's bit is on in host_like(); KVM never reports it, so start from it off.
        c.as_mut_slice()
            .iter_mut()
            .filter(|e| e.function == 1)
            .for_each(|e| e.ecx &= !ECX_TSC_DEADLINE);
        let mut without = c.clone();
        apply_template(&mut c, HARDWARE, 0, 1).unwrap();
        assert_ne!(find(&c, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        let no_timer = CpuTemplate {
            tsc_deadline: false,
            ..HARDWARE
        };
        apply_template(&mut without, no_timer, 0, 1).unwrap();
        assert_eq!(find(&without, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn perfmon_is_hidden_on_every_host() {
        for template in [PVM, HARDWARE] {
            let mut c = host_like();
            apply_template(&mut c, template, 0, 1).unwrap();
            assert_eq!(find(&c, 1, 0).ecx & (1 << 15), 0, "pdcm");
            let pmu = find(&c, 0xa, 0);
            assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        }
    }

    #[test]
    fn amd_guests_see_no_arch_capabilities_msr_and_their_cache_sharing() {
        let mut c = CpuId::from_entries(&[
            entry(0, 0, [0x10, VENDOR_AMD_EBX, 0x444d_4163, 0x6974_6e65]),
            entry(1, 0, [0x830f10, 0x0001_0800, u32::MAX, u32::MAX]),
            entry(7, 0, [0, u32::MAX, 0, u32::MAX]),
            entry(0x8000_001d, 0, [0x121 | (7 << 14), 0, 0, 0]),
            entry(0x8000_001d, 3, [0x163 | (15 << 14), 0, 0, 0]),
        ])
        .unwrap();
        apply_template(&mut c, HARDWARE, 1, 2).unwrap();
        assert_eq!(find(&c, 7, 0).edx & EDX_ARCH_CAPABILITIES, 0);
        assert_eq!((find(&c, 0x8000_001d, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&c, 0x8000_001d, 3).eax >> 14) & 0xfff, 1);
        // An Intel host keeps the bit (its MSR exists).
        let mut intel = host_like();
        apply_template(&mut intel, HARDWARE, 0, 1).unwrap();
        assert_ne!(find(&intel, 7, 0).edx & EDX_ARCH_CAPABILITIES, 0);
    }
}
