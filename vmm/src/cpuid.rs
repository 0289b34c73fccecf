//! The CPU template: what each vCPU sees in CPUID. Starts from KVM_GET_SUPPORTED_CPUID, sets the
//! APIC id and topology of each vCPU, the KVM hypervisor leaf, and hides the features the
//! host's PVM emulator cannot execute, so a guest never uses them.
//!
//! Hidden (same bits as `clearcpuid=`/`noxsave`/`nofsgsbase` in the test kernel's cmdline):
//! popcnt, cx16 (cmpxchg16b), xsave/osxsave (xrstor), fsgsbase, rdrand, rdseed, smap, erms,
//! fsrm. AVX and its family depend on XSAVE and go with it; leaf 0xd (XSAVE state) is emptied.

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

/// Features the emulator cannot execute, and what depends on them.
const HIDDEN: &[Hidden] = &[
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

/// Hypervisor present (leaf 1, ecx).
const ECX_HYPERVISOR: u32 = 1 << 31;
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

/// Names of the features the template hides (for `mvm info` and logs).
pub fn hidden_feature_names() -> impl Iterator<Item = &'static str> {
    HIDDEN.iter().map(|h| h.name)
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

/// Applies the template for vCPU `id` of `count` (one core per vCPU, one package) to `cpuid`.
pub fn apply_template(cpuid: &mut CpuId, id: u8, count: u8) -> Result<(), CpuidError> {
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
    for entry in cpuid.as_mut_slice() {
        for h in HIDDEN {
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
            0xd => {
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

    fn host_like() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(1, 0, [0x906ea, 0x0001_0800, u32::MAX, u32::MAX]),
            entry(4, 0, [0x121, 0, 0, 0]),
            entry(4, 3, [0x163, 0, 0, 0]),
            entry(7, 0, [0, u32::MAX, 0, u32::MAX]),
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
        apply_template(&mut c, 0, 1).unwrap();
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
        assert!(hidden_feature_names().any(|n| n == "popcnt"));
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_topology() {
        let mut c = host_like();
        apply_template(&mut c, 2, 4).unwrap();
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
        apply_template(&mut c, 0, 1).unwrap();
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
}
