//! `VCPUOP_initialise` for HVM vCPUs: `struct vcpu_hvm_context` (Xen's
//! `public/hvm/hvm_vcpu.h`) decoded and checked as Xen 4.17's `arch_set_info_hvm_guest`
//! (`xen/arch/x86/hvm/domain.c`) checks it, into the register state the VMM loads when the
//! vCPU comes up (`VCPUOP_up`).
//!
//! The context is 128 bytes in both widths: `mode` (u32), `pad` (u32, must be 0), then a union
//! of `vcpu_hvm_x86_32` (120 bytes) and `vcpu_hvm_x86_64` (112 bytes). Xen always copies the
//! whole 128 bytes. The header is not in `xen-abi`'s bindgen output, so the offsets are written
//! here from the header and checked by the unit tests below.
//!
//! Xen's checks, in its order (each failure `-EINVAL`):
//! - `pad` non-zero; `mode` not 0 (`VCPU_HVM_MODE_32B`) or 1 (`VCPU_HVM_MODE_64B`).
//! - 32-bit mode: `pad1` or `pad2[]` non-zero; each of CS, DS, SS, ES, TR (accessed bit, or
//!   for TR the busy bit, set first when present) fails `check_segment`: attribute bits 12-15
//!   set; null attributes for CS, SS or TR; TR not a (busy) 32-bit TSS or a code/data segment;
//!   CS/DS/SS/ES a system segment; not present; CS not code; SS not writable data; DS/ES
//!   execute-only code. Then EIP beyond the CS limit (scaled by CS.G), SS.DPL != CS.DPL,
//!   DS.DPL or ES.DPL (when present) above CS.DPL, EFER.LMA without EFER.LME.
//! - 64-bit mode: RIP not canonical (48-bit), CR0.PG clear, CR4.PAE clear, EFER.LME clear.
//!   The segments are Xen's fixed long-mode set: CS 0xa9b, DS/SS/ES 0xc93 (limit ~0, base 0),
//!   TR 0x8b (limit 0x67).
//! - Both: EFER.LME implies EFER.LMA; CR4 bits outside the domain's valid set
//!   (`hvm_cr4_guest_valid_bits`, from its CPUID); EFER bits outside the valid set
//!   (`hvm_efer_valid`: unknown bits, SCE/LME/LMA/NXE/FFXSE without the CPUID feature, SVME
//!   without nested virtualisation, which xenkvm never offers).
//!
//! Where xenkvm differs: Xen accepts some states that no VM entry can load (it then crashes
//! the domain at the first entry); the host's KVM refuses to load them at all
//! (`KVM_SET_SREGS`), so xenkvm refuses them at the hypercall with `-EINVAL` instead: CR0
//! bits 63:32, CR0.PG without CR0.PE, CR0.NW without CR0.CD, EFER.LME without CR0.PG and
//! CR4.PAE (Xen sets LMA for any LME), CS.L outside long mode, CS.L with CS.D, and RFLAGS
//! reserved bits. Xen's shadow-paging check of CR3 (a RAM frame) is not made: Xen 4.17
//! skips it under HAP, as on any current host.

use crate::abi::{get_u16, get_u32, get_u64};
use crate::errno::Errno;

/// `sizeof(struct vcpu_hvm_context)`.
pub const CONTEXT_LEN: usize = 128;

/// `VCPU_HVM_MODE_32B`.
pub const MODE_32B: u32 = 0;
/// `VCPU_HVM_MODE_64B`.
pub const MODE_64B: u32 = 1;

/// Offsets in `vcpu_hvm_context`.
mod off {
    pub const MODE: usize = 0;
    pub const PAD: usize = 4;
    /// `cpu_regs` (the union).
    pub const REGS: usize = 8;

    /// `vcpu_hvm_x86_32`, relative to [`REGS`]: eax, ecx, edx, ebx, esp, ebp, esi, edi, eip,
    /// eflags at 0..40, cr0/cr3/cr4 at 40/44/48, pad1 at 52, efer at 56, the five bases
    /// (cs, ds, ss, es, tr) at 64, the five limits at 84, the five `_ar` (u16) at 104,
    /// pad2[3] at 114.
    pub const R32_GPRS: usize = 0;
    pub const R32_EIP: usize = 32;
    pub const R32_EFLAGS: usize = 36;
    pub const R32_CR0: usize = 40;
    pub const R32_CR3: usize = 44;
    pub const R32_CR4: usize = 48;
    pub const R32_PAD1: usize = 52;
    pub const R32_EFER: usize = 56;
    pub const R32_BASE: usize = 64;
    pub const R32_LIMIT: usize = 84;
    pub const R32_AR: usize = 104;
    pub const R32_PAD2: usize = 114;
    pub const R32_LEN: usize = 120;

    /// `vcpu_hvm_x86_64`, relative to [`REGS`]: rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, rip,
    /// rflags, cr0, cr3, cr4, efer, 8 bytes each.
    pub const R64_RIP: usize = 64;
    pub const R64_RFLAGS: usize = 72;
    pub const R64_CR0: usize = 80;
    pub const R64_CR3: usize = 88;
    pub const R64_CR4: usize = 96;
    pub const R64_EFER: usize = 104;
    pub const R64_LEN: usize = 112;
}

const CR0_PE: u64 = 1;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bits that must be zero (3, 5, 15, 22-63); bit 1 is forced to 1 by the VMM.
const RFLAGS_RESERVED: u64 = !((1 << 22) - 1) | (1 << 15) | (1 << 5) | (1 << 3);

/// The control-register bits a domain may set, from its CPUID (Xen's
/// `hvm_cr4_guest_valid_bits` and `hvm_efer_valid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrPolicy {
    /// CR4 bits the guest may set.
    pub cr4_valid: u64,
    /// EFER bits the guest may set.
    pub efer_valid: u64,
}

impl Default for CrPolicy {
    /// A baseline x86-64 CPU: VME/PVI, TSD, DE, PSE, PAE, MCE, PGE, PCE, OSFXSR, OSXMMEXCPT;
    /// EFER SCE, LME, LMA, NXE. The VMM sets the policy from the guest's CPUID.
    fn default() -> Self {
        CrPolicy {
            cr4_valid: 0x7ff,
            efer_valid: 1 | EFER_LME | EFER_LMA | (1 << 11),
        }
    }
}

/// A segment as `arch_set_info_hvm_guest` loads it: selector 0, the byte-granular limit, and
/// the attributes in Xen's `_ar` layout (type 3:0, S 4, DPL 6:5, P 7, AVL 8, L 9, D/B 10,
/// G 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HvmSegment {
    pub base: u64,
    pub limit: u32,
    pub attr: u16,
}

impl HvmSegment {
    pub fn seg_type(&self) -> u8 {
        (self.attr & 0xf) as u8
    }
    /// Code or data (not a system segment).
    pub fn s(&self) -> bool {
        self.attr & (1 << 4) != 0
    }
    pub fn dpl(&self) -> u8 {
        ((self.attr >> 5) & 3) as u8
    }
    pub fn present(&self) -> bool {
        self.attr & (1 << 7) != 0
    }
    pub fn avl(&self) -> bool {
        self.attr & (1 << 8) != 0
    }
    /// 64-bit code.
    pub fn l(&self) -> bool {
        self.attr & (1 << 9) != 0
    }
    pub fn db(&self) -> bool {
        self.attr & (1 << 10) != 0
    }
    pub fn g(&self) -> bool {
        self.attr & (1 << 11) != 0
    }
}

/// The register state a vCPU starts with after `VCPUOP_initialise` + `VCPUOP_up`. Registers
/// not named here (R8-R15, FS, GS, LDTR, GDTR, IDTR, ...) keep their reset values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HvmVcpuState {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// With LMA set when LME is (as Xen does).
    pub efer: u64,
    pub cs: HvmSegment,
    pub ds: HvmSegment,
    pub ss: HvmSegment,
    pub es: HvmSegment,
    pub tr: HvmSegment,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Seg {
    Cs,
    Ds,
    Ss,
    Es,
    Tr,
}

/// Xen's `check_segment`.
fn check_segment(s: &HvmSegment, seg: Seg) -> Result<(), Errno> {
    if s.attr & 0xf000 != 0 {
        return Err(Errno::EINVAL);
    }
    if s.attr == 0 {
        return if matches!(seg, Seg::Ds | Seg::Es) {
            Ok(())
        } else {
            Err(Errno::EINVAL)
        };
    }
    if seg == Seg::Tr {
        // SYS_DESC_tss_busy: a busy 32-bit TSS.
        if s.s() || s.seg_type() != 11 {
            return Err(Errno::EINVAL);
        }
    } else if !s.s() {
        return Err(Errno::EINVAL);
    }
    if !s.present() {
        return Err(Errno::EINVAL);
    }
    let t = s.seg_type();
    let ok = match seg {
        Seg::Cs => t & 0x8 != 0,
        Seg::Ss => t & 0x8 == 0 && t & 0x2 != 0,
        Seg::Ds | Seg::Es => !(t & 0x8 != 0 && t & 0x2 == 0),
        Seg::Tr => true,
    };
    if ok {
        Ok(())
    } else {
        Err(Errno::EINVAL)
    }
}

fn canonical(a: u64) -> bool {
    ((a as i64) >> 47) == ((a as i64) >> 63)
}

/// Decode and check a `vcpu_hvm_context` (`b` is the 128 bytes the guest passed).
pub fn decode(b: &[u8; CONTEXT_LEN], policy: &CrPolicy) -> Result<HvmVcpuState, Errno> {
    if get_u32(b, off::PAD) != 0 {
        return Err(Errno::EINVAL);
    }
    let r = &b[off::REGS..];
    let mut st = match get_u32(b, off::MODE) {
        MODE_32B => decode32(&r[..off::R32_LEN])?,
        MODE_64B => decode64(&r[..off::R64_LEN])?,
        _ => return Err(Errno::EINVAL),
    };
    if st.efer & EFER_LME != 0 {
        st.efer |= EFER_LMA;
    }
    if st.cr4 & !policy.cr4_valid != 0 || st.efer & !policy.efer_valid != 0 {
        return Err(Errno::EINVAL);
    }
    host_loadable(&st)?;
    Ok(st)
}

fn decode32(r: &[u8]) -> Result<HvmVcpuState, Errno> {
    if get_u32(r, off::R32_PAD1) != 0 || (0..3).any(|i| get_u16(r, off::R32_PAD2 + 2 * i) != 0) {
        return Err(Errno::EINVAL);
    }
    let seg = |i: usize, which: Seg| {
        let mut s = HvmSegment {
            base: u64::from(get_u32(r, off::R32_BASE + 4 * i)),
            limit: get_u32(r, off::R32_LIMIT + 4 * i),
            attr: get_u16(r, off::R32_AR + 2 * i),
        };
        // "Set accessed / busy bit for present segments."
        if s.present() {
            s.attr |= if which == Seg::Tr { 2 } else { 1 };
        }
        s
    };
    let (cs, ds, ss, es, tr) = (
        seg(0, Seg::Cs),
        seg(1, Seg::Ds),
        seg(2, Seg::Ss),
        seg(3, Seg::Es),
        seg(4, Seg::Tr),
    );
    // Xen ORs the five results together and returns them as one errno; each is -EINVAL.
    for (s, which) in [
        (&cs, Seg::Cs),
        (&ds, Seg::Ds),
        (&ss, Seg::Ss),
        (&es, Seg::Es),
        (&tr, Seg::Tr),
    ] {
        check_segment(s, which)?;
    }
    let gpr = |i: usize| u64::from(get_u32(r, off::R32_GPRS + 4 * i));
    let eip = get_u32(r, off::R32_EIP);
    let limit = if cs.g() {
        (cs.limit << 12) | 0xfff
    } else {
        cs.limit
    };
    if eip > limit
        || ss.dpl() != cs.dpl()
        || (ds.present() && ds.dpl() > cs.dpl())
        || (es.present() && es.dpl() > cs.dpl())
    {
        return Err(Errno::EINVAL);
    }
    let efer = get_u64(r, off::R32_EFER);
    if efer & EFER_LMA != 0 && efer & EFER_LME == 0 {
        return Err(Errno::EINVAL);
    }
    Ok(HvmVcpuState {
        rax: gpr(0),
        rcx: gpr(1),
        rdx: gpr(2),
        rbx: gpr(3),
        rsp: gpr(4),
        rbp: gpr(5),
        rsi: gpr(6),
        rdi: gpr(7),
        rip: u64::from(eip),
        rflags: u64::from(get_u32(r, off::R32_EFLAGS)),
        cr0: u64::from(get_u32(r, off::R32_CR0)),
        cr3: u64::from(get_u32(r, off::R32_CR3)),
        cr4: u64::from(get_u32(r, off::R32_CR4)),
        efer,
        cs,
        ds,
        ss,
        es,
        tr,
    })
}

fn decode64(r: &[u8]) -> Result<HvmVcpuState, Errno> {
    let q = |o: usize| get_u64(r, o);
    let (rip, cr0, cr4, efer) = (
        q(off::R64_RIP),
        q(off::R64_CR0),
        q(off::R64_CR4),
        q(off::R64_EFER),
    );
    if !canonical(rip) || cr0 & CR0_PG == 0 || cr4 & CR4_PAE == 0 || efer & EFER_LME == 0 {
        return Err(Errno::EINVAL);
    }
    let data = HvmSegment {
        base: 0,
        limit: !0,
        attr: 0xc93,
    };
    Ok(HvmVcpuState {
        rax: q(0),
        rcx: q(8),
        rdx: q(16),
        rbx: q(24),
        rsp: q(32),
        rbp: q(40),
        rsi: q(48),
        rdi: q(56),
        rip,
        rflags: q(off::R64_RFLAGS),
        cr0,
        cr3: q(off::R64_CR3),
        cr4,
        efer,
        cs: HvmSegment {
            base: 0,
            limit: !0,
            attr: 0xa9b,
        },
        ds: data,
        ss: data,
        es: data,
        tr: HvmSegment {
            base: 0,
            limit: 0x67,
            attr: 0x8b,
        },
    })
}

/// The states Xen accepts but no VM entry (and not the host's `KVM_SET_SREGS`) can load; see
/// the module doc.
fn host_loadable(st: &HvmVcpuState) -> Result<(), Errno> {
    let pg = st.cr0 & CR0_PG != 0;
    let long = st.efer & EFER_LMA != 0;
    let bad = st.cr0 >> 32 != 0
        || (pg && st.cr0 & CR0_PE == 0)
        || (st.cr0 & CR0_NW != 0 && st.cr0 & CR0_CD == 0)
        || (long && (!pg || st.cr4 & CR4_PAE == 0))
        || (st.cs.l() && (!long || st.cs.db()))
        || st.rflags & RFLAGS_RESERVED != 0;
    if bad {
        Err(Errno::EINVAL)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_offsets_match_the_header() {
        // vcpu_hvm_x86_32: 10 u32 registers, cr0/cr3/cr4, pad1, u64 efer, 5 bases, 5 limits,
        // 5 u16 attributes, pad2[3].
        assert_eq!(off::R32_CR0, 10 * 4);
        assert_eq!(off::R32_PAD1, off::R32_CR4 + 4);
        assert_eq!(off::R32_EFER, off::R32_PAD1 + 4);
        assert_eq!(off::R32_BASE, off::R32_EFER + 8);
        assert_eq!(off::R32_LIMIT, off::R32_BASE + 5 * 4);
        assert_eq!(off::R32_AR, off::R32_LIMIT + 5 * 4);
        assert_eq!(off::R32_PAD2, off::R32_AR + 5 * 2);
        assert_eq!(off::R32_LEN, off::R32_PAD2 + 3 * 2);
        assert_eq!(off::R64_LEN, 14 * 8);
        assert_eq!(off::REGS + off::R32_LEN.max(off::R64_LEN), CONTEXT_LEN);
    }

    #[test]
    fn canonical_is_48_bit() {
        assert!(canonical(0x7fff_ffff_ffff));
        assert!(canonical(0xffff_8000_0000_0000));
        assert!(!canonical(0x8000_0000_0000));
        assert!(!canonical(0x0001_0000_0000_0000));
    }
}
