//! The CPUID a Xen HVM guest sees: the host's supported CPUID with KVM's own
//! hypervisor leaves replaced by Xen's (base 0x40000000), CX16 hidden (this
//! host cannot execute `cmpxchg16b`), the hypervisor bit set, per-vCPU APIC
//! ids, and ERMS/FSRM hidden on request (`XENKVM_FAST_STRINGS=hide`).
//!
//! Pure functions over a list of [`CpuidEntry`] so the policy is unit-tested
//! without KVM; `src/vm.rs` converts to and from `kvm_cpuid_entry2`.

/// Base of the Xen leaves and the hypercall-page MSR index.
pub const XEN_CPUID_BASE: u32 = 0x4000_0000;
/// MSR the guest writes the hypercall page address to (leaf 0x40000002 EBX).
pub const XEN_HYPERCALL_MSR: u32 = 0x4000_0000;
/// Highest Xen leaf we report (Xen 4.17 reports base + 5).
pub const XEN_CPUID_MAX: u32 = XEN_CPUID_BASE + 5;
/// Xen version reported in leaf 0x40000001: 4.17.
pub const XEN_VERSION: u32 = (4 << 16) | 17;

/// Leaf 0x40000004 EAX bits (arch-x86/cpuid.h).
pub mod hvm_feat {
    /// Virtualized x2APIC accesses.
    pub const X2APIC_VIRT: u32 = 1 << 1;
    /// EBX holds the vCPU id.
    pub const VCPU_ID_PRESENT: u32 = 1 << 3;
    /// `HVMOP_set_evtchn_upcall_vector` is available.
    pub const UPCALL_VECTOR: u32 = 1 << 6;
}

/// One CPUID leaf/subleaf, independent of kvm-bindings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` and friends, passed through.
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// What the guest's CPUID depends on besides the host.
#[derive(Clone, Copy, Debug)]
pub struct CpuidConfig {
    pub vcpu_id: u32,
    pub nr_vcpus: u32,
    pub tsc_khz: u32,
    /// Advertise the per-vCPU upcall vector (leaf 4 bit 6).
    pub upcall_vector: bool,
    /// Hide ERMS and FSRM (leaf 7.0), so that Linux copies and clears with
    /// `rep movsq`/`stosq` instead of `rep movsb`/`stosb`
    /// ([`crate::kvm::probe::hide_fast_strings`]).
    pub hide_fast_strings: bool,
}

const SIG_EBX: u32 = u32::from_le_bytes(*b"XenV");
const SIG_ECX: u32 = u32::from_le_bytes(*b"MMXe");
const SIG_EDX: u32 = u32::from_le_bytes(*b"nVMM");

/// Leaf 1 ECX bits.
const CPUID1_ECX_CX16: u32 = 1 << 13;
const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 7.0 EBX bit 9: enhanced `rep movsb`/`stosb` (ERMS).
const CPUID7_EBX_ERMS: u32 = 1 << 9;
/// Leaf 7.0 EDX bit 4: fast short `rep movsb` (FSRM).
const CPUID7_EDX_FSRM: u32 = 1 << 4;
/// Leaf 0x80000001 EDX bit 27: RDTSCP (cannot run on this host; hidden
/// where KVM lets us, emulated where it does not).
const CPUID_80000001_EDX_RDTSCP: u32 = 1 << 27;

/// Builds the guest CPUID from the host's supported list.
pub fn guest_cpuid(supported: &[CpuidEntry], cfg: &CpuidConfig) -> Vec<CpuidEntry> {
    let mut out: Vec<CpuidEntry> = supported
        .iter()
        // KVM's own paravirt leaves (KVMKVMKVM) must not be visible: the guest
        // picks the hypervisor by signature and would prefer KVM.
        .filter(|e| !(0x4000_0000..0x4001_0000).contains(&e.function))
        .copied()
        .collect();
    for e in &mut out {
        match e.function {
            1 => {
                e.ecx &= !CPUID1_ECX_CX16;
                e.ecx |= CPUID1_ECX_HYPERVISOR;
                // Initial APIC id in EBX[31:24], logical processor count in EBX[23:16].
                e.ebx = (e.ebx & 0x0000_ffff) | (cfg.vcpu_id << 24) | (cfg.nr_vcpus.min(255) << 16);
            }
            0xb | 0x1f => e.edx = cfg.vcpu_id,
            7 if e.index == 0 && cfg.hide_fast_strings => {
                e.ebx &= !CPUID7_EBX_ERMS;
                e.edx &= !CPUID7_EDX_FSRM;
            }
            0x8000_0001 => e.edx &= !CPUID_80000001_EDX_RDTSCP,
            _ => {}
        }
    }
    out.extend(xen_leaves(cfg));
    out
}

/// The Xen leaves at 0x40000000..=0x40000005.
pub fn xen_leaves(cfg: &CpuidConfig) -> Vec<CpuidEntry> {
    let leaf = |function: u32, eax, ebx, ecx, edx| CpuidEntry {
        function,
        index: 0,
        flags: 0,
        eax,
        ebx,
        ecx,
        edx,
    };
    let mut hvm = hvm_feat::VCPU_ID_PRESENT;
    if cfg.upcall_vector {
        hvm |= hvm_feat::UPCALL_VECTOR;
    }
    let mut v = vec![
        leaf(XEN_CPUID_BASE, XEN_CPUID_MAX, SIG_EBX, SIG_ECX, SIG_EDX),
        leaf(XEN_CPUID_BASE + 1, XEN_VERSION, 0, 0, 0),
        // One hypercall page, MSR base, no extra features.
        leaf(XEN_CPUID_BASE + 2, 1, XEN_HYPERCALL_MSR, 0, 0),
        leaf(XEN_CPUID_BASE + 4, hvm, cfg.vcpu_id, 0, 0),
        leaf(XEN_CPUID_BASE + 5, 0, 0, 0, 0),
    ];
    // Leaf 3 (time) has subleaves: 0 = {flags, tsc_mode, tsc_khz, incarnation},
    // 1 = {tsc offset lo/hi, mul, shift} (unused for HVM), 2 = {host tsc khz}.
    // tsc_mode 1 = native (no TSC emulation).
    let flag = 1; // KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    for (index, (eax, ebx, ecx)) in [(0u32, 1u32, cfg.tsc_khz), (0, 0, 0), (cfg.tsc_khz, 0, 0)]
        .into_iter()
        .enumerate()
    {
        v.push(CpuidEntry {
            function: XEN_CPUID_BASE + 3,
            index: index as u32,
            flags: flag,
            eax,
            ebx,
            ecx,
            edx: 0,
        });
    }
    v
}

/// Xen's `XEN_CPUID_NO_SUBLEAF`: a policy leaf without subleaves.
pub const NO_SUBLEAF: u32 = u32::MAX;

/// The guest's CPUID as Xen's toolstack records a domain's policy in a
/// migration stream (X86_CPUID_POLICY): every leaf but the hypervisor
/// leaves (Xen writes its own there on the other side), a subleaf only
/// where it is significant.
pub fn to_policy(entries: &[CpuidEntry]) -> Vec<(u32, u32, [u32; 4])> {
    entries
        .iter()
        .filter(|e| !(0x4000_0000..0x4001_0000).contains(&e.function))
        .map(|e| {
            let sub = if e.flags & 1 != 0 {
                e.index
            } else {
                NO_SUBLEAF
            };
            (e.function, sub, [e.eax, e.ebx, e.ecx, e.edx])
        })
        .collect()
}

/// The feature words a saved guest's policy limits on restore:
/// (leaf, subleaf, register 0-3 for EAX-EDX, name), and in each the bits
/// that are not features of the CPU but state (OSXSAVE, APIC, OSPKE: KVM
/// sets them from CR4 and the APIC base as the guest runs; the hypervisor
/// bit is xenkvm's to set) or that xenkvm
/// hides on hosts that cannot run them natively and emulates instead
/// (CX16, RDTSCP; see [`guest_cpuid`]).
const FEATURE_WORDS: &[(u32, u32, usize, &str, u32)] = &[
    (
        1,
        NO_SUBLEAF,
        2,
        "1 ECX",
        1 << 27 | CPUID1_ECX_CX16 | CPUID1_ECX_HYPERVISOR,
    ),
    (1, NO_SUBLEAF, 3, "1 EDX", 1 << 9),
    (7, 0, 1, "7.0 EBX", 0),
    (7, 0, 2, "7.0 ECX", 1 << 4),
    (7, 0, 3, "7.0 EDX", 0),
    (7, 1, 0, "7.1 EAX", 0),
    (0xd, 1, 0, "0xd.1 EAX", 0),
    (0x8000_0001, NO_SUBLEAF, 2, "0x80000001 ECX", 0),
    (
        0x8000_0001,
        NO_SUBLEAF,
        3,
        "0x80000001 EDX",
        CPUID_80000001_EDX_RDTSCP,
    ),
    (0x8000_0008, NO_SUBLEAF, 1, "0x80000008 EBX", 0),
];

/// Restricts `entries` (a vCPU's CPUID on this host) to the features a
/// restored guest had where it was saved (`policy`, its X86_CPUID_POLICY):
/// the guest must not find features appear under it (Xen sets the saved
/// policy on the new domain the same way). Returns the features the saved
/// guest had that this host does not offer, one "leaf REG bits 0x..." each
/// (Xen refuses such a stream; xenkvm warns and runs it: the guest faults
/// only if it uses one). A feature word the policy lacks is left alone.
pub fn restrict_to_policy(
    entries: &mut [CpuidEntry],
    policy: &[(u32, u32, [u32; 4])],
) -> Vec<String> {
    let mut missing = Vec::new();
    for &(leaf, sub, reg, name, ignore) in FEATURE_WORDS {
        let Some(saved) = policy
            .iter()
            .find(|(l, s, _)| *l == leaf && (*s == sub || sub == NO_SUBLEAF))
            .map(|(_, _, r)| r[reg])
        else {
            continue;
        };
        let ours = entries
            .iter_mut()
            .find(|e| e.function == leaf && (sub == NO_SUBLEAF || e.index == sub));
        let have = match ours {
            Some(e) => {
                let r = match reg {
                    0 => &mut e.eax,
                    1 => &mut e.ebx,
                    2 => &mut e.ecx,
                    _ => &mut e.edx,
                };
                let have = *r;
                *r &= saved | ignore;
                have
            }
            None => 0,
        };
        let lack = saved & !have & !ignore;
        if lack != 0 {
            missing.push(format!("{name} bits {lack:#x}"));
        }
    }
    missing
}

/// The CR4 and EFER bits a guest with CPUID `entries` may set (Xen's
/// `hvm_cr4_guest_valid_bits` and `hvm_efer_valid`; nested virtualisation is off, so
/// never VMXE or SVME), for `VCPUOP_initialise`.
pub fn cr_policy(entries: &[CpuidEntry]) -> hypercalls::CrPolicy {
    let leaf = |f: u32| {
        entries
            .iter()
            .find(|e| e.function == f && e.index == 0)
            .copied()
            .unwrap_or_default()
    };
    let (l1, l7, e1) = (leaf(1), leaf(7), leaf(0x8000_0001));
    let bit = |r: u32, b: u32| r & (1 << b) != 0;
    let mut cr4: u64 = 1 << 8; // PCE
    for (have, mask) in [
        (bit(l1.edx, 1), 0b11),                       // VME: VME | PVI
        (bit(l1.edx, 4), 1 << 2),                     // TSC: TSD
        (bit(l1.edx, 2), 1 << 3),                     // DE
        (bit(l1.edx, 3), 1 << 4),                     // PSE
        (bit(l1.edx, 6), 1 << 5),                     // PAE
        (bit(l1.edx, 7) || bit(l1.edx, 14), 1 << 6),  // MCE or MCA: MCE
        (bit(l1.edx, 13), 1 << 7),                    // PGE
        (bit(l1.edx, 24), 1 << 9),                    // FXSR: OSFXSR
        (bit(l1.edx, 25), 1 << 10),                   // SSE: OSXMMEXCPT
        (bit(l7.ecx, 2), 1 << 11),                    // UMIP
        (bit(l7.ebx, 0), 1 << 16),                    // FSGSBASE
        (bit(l1.ecx, 17), 1 << 17),                   // PCID: PCIDE
        (bit(l1.ecx, 26), 1 << 18),                   // XSAVE: OSXSAVE
        (bit(l7.ebx, 7), 1 << 20),                    // SMEP
        (bit(l7.ebx, 20), 1 << 21),                   // SMAP
        (bit(l7.ecx, 3), 1 << 22),                    // PKU: PKE
        (bit(l7.ecx, 7) || bit(l7.edx, 20), 1 << 23), // CET_SS or CET_IBT: CET
    ] {
        if have {
            cr4 |= mask;
        }
    }
    let mut efer = 0u64;
    for (have, mask) in [
        (bit(e1.edx, 11), 1),                    // SYSCALL: SCE
        (bit(e1.edx, 29), (1 << 8) | (1 << 10)), // LM: LME | LMA
        (bit(e1.edx, 20), 1 << 11),              // NX: NXE
        (bit(e1.edx, 25), 1 << 14),              // FFXSR: FFXSE
    ] {
        if have {
            efer |= mask;
        }
    }
    hypercalls::CrPolicy {
        cr4_valid: cr4,
        efer_valid: efer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Vec<CpuidEntry> {
        vec![
            CpuidEntry {
                function: 1,
                ecx: CPUID1_ECX_CX16 | 1,
                ebx: 0x0102_0800,
                ..Default::default()
            },
            CpuidEntry {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ebx: u32::from_le_bytes(*b"KVMK"),
                ..Default::default()
            },
            CpuidEntry {
                function: 0x4000_0001,
                eax: 0x1007efb,
                ..Default::default()
            },
        ]
    }

    fn cfg() -> CpuidConfig {
        CpuidConfig {
            vcpu_id: 2,
            nr_vcpus: 4,
            tsc_khz: 2_000_000,
            upcall_vector: true,
            hide_fast_strings: false,
        }
    }

    #[test]
    fn guest_cpuid_host_kvm_leaves_replaced_by_xen_signature() {
        let c = guest_cpuid(&host(), &cfg());
        let base: Vec<_> = c.iter().filter(|e| e.function == 0x4000_0000).collect();
        assert_eq!(base.len(), 1);
        let mut sig = Vec::new();
        for r in [base[0].ebx, base[0].ecx, base[0].edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"XenVMMXenVMM");
        assert!(base[0].eax >= 0x4000_0004);
        assert!(!c.iter().any(|e| e.eax == 0x1007efb));
    }

    #[test]
    fn policy_restricts_features_to_the_saved_guests_and_names_what_is_missing() {
        let e = |function, index, flags, ebx, ecx, edx| CpuidEntry {
            function,
            index,
            flags,
            eax: 0,
            ebx,
            ecx,
            edx,
        };
        let host = vec![
            e(1, 0, 0, 0, 0b1011 | CPUID1_ECX_HYPERVISOR, 0xff),
            e(7, 0, 1, 0xf0, 0, 0),
            e(0x4000_0000, 0, 0, 1, 2, 3),
        ];
        let policy = to_policy(&host);
        assert_eq!(policy.len(), 2, "no hypervisor leaves: {policy:x?}");
        assert_eq!(policy[0].1, NO_SUBLEAF);
        assert_eq!(policy[1].1, 0);
        // The same host: nothing changes, nothing is missing.
        let mut same = host.clone();
        assert!(restrict_to_policy(&mut same, &policy).is_empty());
        assert_eq!(same, host);
        // A guest saved with fewer features keeps having fewer; one saved
        // with a feature this host lacks gets it named. CX16 (emulated
        // here) and OSXSAVE (state) are not named.
        let saved = vec![
            (
                1,
                NO_SUBLEAF,
                [0, 0, 0b0001 | CPUID1_ECX_CX16 | 1 << 27, 0x1ff],
            ),
            (7, 0, [0, 0x1_00f0, 0, 0]),
        ];
        let mut v = host.clone();
        let missing = restrict_to_policy(&mut v, &saved);
        assert_eq!(v[0].ecx, 0b0001 | CPUID1_ECX_HYPERVISOR, "leaf 1 ECX");
        assert_eq!(v[0].edx, 0xff);
        assert_eq!(missing, vec!["1 EDX bits 0x100", "7.0 EBX bits 0x10000"]);
    }

    #[test]
    fn guest_cpuid_leaf1_cx16_hidden_hypervisor_bit_set() {
        let c = guest_cpuid(&host(), &cfg());
        let l1 = c.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ecx & CPUID1_ECX_CX16, 0);
        assert_ne!(l1.ecx & CPUID1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!(l1.ecx & 1, 1, "other bits pass through");
    }

    #[test]
    fn fast_strings_hidden_only_when_asked_and_nothing_else_in_leaf7_changes() {
        let mut h = host();
        h.push(CpuidEntry {
            function: 7,
            index: 0,
            flags: 1,
            ebx: CPUID7_EBX_ERMS | 0x21,
            edx: CPUID7_EDX_FSRM | 0x400,
            ..Default::default()
        });
        h.push(CpuidEntry {
            function: 7,
            index: 1,
            flags: 1,
            ebx: CPUID7_EBX_ERMS,
            edx: CPUID7_EDX_FSRM,
            ..Default::default()
        });
        let leaf7 = |c: &[CpuidEntry], index| {
            *c.iter()
                .find(|e| e.function == 7 && e.index == index)
                .unwrap()
        };
        let shown = guest_cpuid(&h, &cfg());
        assert_eq!(leaf7(&shown, 0).ebx, CPUID7_EBX_ERMS | 0x21);
        assert_eq!(leaf7(&shown, 0).edx, CPUID7_EDX_FSRM | 0x400);
        let hidden = guest_cpuid(
            &h,
            &CpuidConfig {
                hide_fast_strings: true,
                ..cfg()
            },
        );
        assert_eq!(leaf7(&hidden, 0).ebx, 0x21);
        assert_eq!(leaf7(&hidden, 0).edx, 0x400);
        assert_eq!(leaf7(&hidden, 1), leaf7(&shown, 1), "subleaf 1 untouched");
    }

    #[test]
    fn xen_leaves_version_msr_and_vcpu_id_reported() {
        let c = xen_leaves(&cfg());
        let get = |f: u32| c.iter().find(|e| e.function == f && e.index == 0).unwrap();
        assert_eq!(get(0x4000_0001).eax, 0x0004_0011);
        assert_eq!(get(0x4000_0002).ebx, 0x4000_0000);
        assert_eq!(get(0x4000_0002).eax, 1);
        let l4 = get(0x4000_0004);
        assert_ne!(l4.eax & hvm_feat::VCPU_ID_PRESENT, 0);
        assert_ne!(l4.eax & hvm_feat::UPCALL_VECTOR, 0);
        assert_eq!(l4.ebx, 2);
        assert_eq!(get(0x4000_0003).ecx, 2_000_000);
    }

    #[test]
    fn cr_policy_follows_cpuid_features() {
        let e = |function, ebx, ecx, edx| CpuidEntry {
            function,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        // PAE, PGE, FXSR, SSE; FSGSBASE, SMEP; LM, NX, SYSCALL.
        let p = cr_policy(&[
            e(1, 0, 0, (1 << 6) | (1 << 13) | (1 << 24) | (1 << 25)),
            e(7, 1 | (1 << 7), 0, 0),
            e(0x8000_0001, 0, 0, (1 << 29) | (1 << 20) | (1 << 11)),
        ]);
        let cr4 = (1 << 5) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 16) | (1 << 20);
        assert_eq!(p.cr4_valid, cr4);
        assert_eq!(p.efer_valid, 1 | (1 << 8) | (1 << 10) | (1 << 11));
        // No leaves: only CR4.PCE, no EFER bits (not even long mode).
        let p = cr_policy(&[]);
        assert_eq!((p.cr4_valid, p.efer_valid), (1 << 8, 0));
    }
}
