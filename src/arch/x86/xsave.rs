//! The XSAVE family (`xsave`, `xsaveopt`, `xsavec`, `xsaves`, `xrstor`,
//! `xrstors`, with and without REX.W) on the vCPU's real state, which the
//! VMM reads and writes as KVM's XSAVE buffer (KVM_GET/SET_XSAVE: the
//! standard, non-compacted format, XSTATE_BV = the components in use).
//!
//! Layout and rules follow the SDM (Vol. 1 ch. 13, Vol. 2 XSAVE*/XRSTOR*):
//! - the legacy region (bytes 0-511: x87 state, MXCSR and MXCSR_MASK, XMM
//!   registers), the XSAVE header (512-575: XSTATE_BV, XCOMP_BV, reserved),
//!   and the extended region: components at their CPUID leaf 0xD offsets
//!   (standard format) or packed in XCOMP_BV order, each 64-byte aligned
//!   when leaf 0xD says so (compacted format, `xsavec`/`xsaves`);
//! - RFBM = EDX:EAX & XCR0 (`xsaves`/`xrstors`: & (XCR0 | IA32_XSS));
//! - `xsave` writes every RFBM component and XSTATE_BV[i] = XINUSE[i] for i
//!   in RFBM, leaving the rest of the header; `xsaveopt` the same but skips
//!   components not in use (the init optimization; the modified
//!   optimization is optional and not done); `xsavec`/`xsaves` write only
//!   in-use components in the compacted format, XSTATE_BV = XINUSE & RFBM
//!   and XCOMP_BV = RFBM | bit 63. MXCSR (and MXCSR_MASK) is written
//!   whenever RFBM has SSE or AVX;
//! - `xrstor` standard form: #GP if XSTATE_BV has a bit outside XCR0 or
//!   header bytes 8-23 are not zero, MXCSR loaded when RFBM has SSE or AVX;
//!   compacted form (XCOMP_BV bit 63, always for `xrstors`): #GP if
//!   XCOMP_BV has a bit outside XCR0 (| XSS), XSTATE_BV one outside
//!   XCOMP_BV, or header bytes 16-63 are not zero, MXCSR loaded from memory
//!   when XSTATE_BV has SSE, else set to 0x1f80; a reserved MXCSR bit
//!   (outside MXCSR_MASK) is #GP. For i in RFBM, XSTATE_BV[i] = 0 loads the
//!   component's initial state, 1 loads it from memory;
//! - #UD without CR4.OSXSAVE or with a LOCK prefix, #NM with CR0.TS, #GP(0)
//!   for an operand not 64-byte aligned and for `xsaves`/`xrstors` above
//!   CPL 0, #PF through the guest's page tables (every page of the area is
//!   checked before anything is written or loaded).
//!
//! XINUSE is KVM's XSTATE_BV. The image is written by one read-modify-write
//! of the area (not atomic against other vCPUs, as the CPU's is not
//! either). Whether the guest's CPUID offers XSAVEOPT/XSAVEC/XSAVES is not
//! checked here (xenkvm's CPUID passes the host's leaf 0xD through).
//! Supervisor components (IA32_XSS bits) whose size leaf 0xD does not give
//! are refused by name.

use iced_x86::{Instruction, Mnemonic};
use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::arch::x86::{
    cpl, operand_address, read_linear, write_linear, Access, EmuEnv, Fixup, Paging, PhysMem, GP,
    NM, UD,
};

const CR0_TS: u64 = 1 << 3;
const CR4_OSXSAVE: u64 = 1 << 18;

/// Offsets in an XSAVE area.
const MXCSR: usize = 24;
const MXCSR_MASK: usize = 28;
const XMM: usize = 160;
const HEADER: usize = 512;
const EXTENDED: usize = 576;
/// KVM's XSAVE buffer (`struct kvm_xsave`, without dynamic features).
pub const KVM_AREA: usize = 4096;

/// One state component's place: its standard-format offset, size, and
/// whether the compacted format aligns it to 64 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XComp {
    pub offset: u32,
    pub size: u32,
    pub align64: bool,
}

/// Where state components 2..63 live (CPUID leaf 0xD sub-leaves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XstateLayout {
    comps: [XComp; 64],
}

impl XstateLayout {
    /// The user components as every x86 CPU with them enumerates them in
    /// CPUID leaf 0xD (the SDM's table of standard offsets): AVX, MPX,
    /// AVX-512 (opmask, ZMM_Hi256, Hi16_ZMM), PKRU. No supervisor component.
    pub fn sdm() -> XstateLayout {
        let mut comps = [XComp::default(); 64];
        for (i, offset, size) in [
            (2, 576, 256),
            (3, 960, 64),
            (4, 1024, 64),
            (5, 1088, 64),
            (6, 1152, 512),
            (7, 1664, 1024),
            (9, 2688, 8),
        ] {
            comps[i] = XComp {
                offset,
                size,
                align64: false,
            };
        }
        XstateLayout { comps }
    }

    /// From CPUID leaf 0xD: `sub(i)` is (EAX, EBX, ECX) of sub-leaf `i`
    /// (size, standard offset, bit 1: 64-byte aligned when compacted).
    pub fn from_cpuid(sub: impl Fn(u32) -> Option<(u32, u32, u32)>) -> XstateLayout {
        let mut comps = [XComp::default(); 64];
        for (i, c) in comps.iter_mut().enumerate().skip(2) {
            if let Some((eax, ebx, ecx)) = sub(i as u32) {
                *c = XComp {
                    offset: ebx,
                    size: eax,
                    align64: ecx & 2 != 0,
                };
            }
        }
        XstateLayout { comps }
    }

    /// Component `i` (2..63), if it has a size.
    pub fn component(&self, i: u32) -> Option<XComp> {
        self.comps.get(i as usize).copied().filter(|c| c.size != 0)
    }

    /// Compacted-format offsets of the components in `xcomp` (bits 2..62),
    /// and the area's end; None if one has no known size.
    fn compacted(&self, xcomp: u64) -> Option<([usize; 64], usize)> {
        let mut at = [0usize; 64];
        let mut end = EXTENDED;
        for (i, slot) in at.iter_mut().enumerate().take(63).skip(2) {
            if xcomp & (1 << i) == 0 {
                continue;
            }
            let c = self.component(i as u32)?;
            if c.align64 {
                end = end.checked_add(63)? & !63;
            }
            *slot = end;
            end = end.checked_add(c.size as usize)?;
        }
        Some((at, end))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Save,
    SaveOpt,
    SaveC,
    SaveS,
    Restore,
    RestoreS,
}

fn op_of(m: Mnemonic) -> Option<(Op, bool)> {
    use Mnemonic::*;
    Some(match m {
        Xsave => (Op::Save, false),
        Xsave64 => (Op::Save, true),
        Xsaveopt => (Op::SaveOpt, false),
        Xsaveopt64 => (Op::SaveOpt, true),
        Xsavec => (Op::SaveC, false),
        Xsavec64 => (Op::SaveC, true),
        Xsaves => (Op::SaveS, false),
        Xsaves64 => (Op::SaveS, true),
        Xrstor => (Op::Restore, false),
        Xrstor64 => (Op::Restore, true),
        Xrstors => (Op::RestoreS, false),
        Xrstors64 => (Op::RestoreS, true),
        _ => return None,
    })
}

/// Whether `insn` is one of the XSAVE family handled here.
pub fn is_xsave_family(insn: &Instruction) -> bool {
    op_of(insn.mnemonic()).is_some()
}

fn exc(vector: u8) -> Fixup {
    Fixup::Exception {
        vector,
        error_code: None,
    }
}

fn gp0() -> Fixup {
    Fixup::Exception {
        vector: GP,
        error_code: Some(0),
    }
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(w)
}

/// Emulates an XSAVE-family instruction (the caller advances RIP).
pub fn emulate(
    mem: &dyn PhysMem,
    env: &dyn EmuEnv,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    let Some((op, rex_w)) = op_of(insn.mnemonic()) else {
        return Err(Fixup::Unhandled(format!("{:?} is not XSAVE", insn.code())));
    };
    if s.cr4 & CR4_OSXSAVE == 0 || insn.has_lock_prefix() {
        return Err(exc(UD));
    }
    if s.cr0 & CR0_TS != 0 {
        return Err(exc(NM));
    }
    let lin = operand_address(regs, s, insn, 0)?;
    if lin & 63 != 0 || (matches!(op, Op::SaveS | Op::RestoreS) && cpl(s) != 0) {
        return Err(gp0());
    }
    let mut kvm = env
        .xsave_area()
        .filter(|a| a.len() >= KVM_AREA)
        .ok_or_else(|| Fixup::Unhandled("XSAVE state unavailable".into()))?;
    let supervisor = matches!(op, Op::SaveS | Op::RestoreS);
    let enabled = env.xcr0() | if supervisor { env.xss() } else { 0 };
    let rfbm = ((regs.rdx << 32) | (regs.rax & 0xffff_ffff)) & enabled;
    let layout = env.xstate_layout();
    let p = Paging::from_sregs(s);
    let user = cpl(s) == 3;
    match op {
        Op::Restore | Op::RestoreS => {
            restore(
                mem, &p, user, lin, &mut kvm, rfbm, enabled, op, rex_w, &layout,
            )?;
            if env.set_xsave_area(&kvm) {
                Ok(())
            } else {
                // Only a value KVM finds invalid gets here (the checks above
                // mirror the CPU's): the CPU's answer is #GP.
                Err(gp0())
            }
        }
        _ => save(mem, &p, user, lin, &kvm, rfbm, op, rex_w, &layout),
    }
}

/// Where each component of `rfbm` goes in the guest's area, and its end.
fn guest_offsets(
    layout: &XstateLayout,
    rfbm: u64,
    compacted: bool,
) -> Result<([usize; 64], usize), Fixup> {
    let unknown = || Fixup::Unhandled(format!("XSAVE components {rfbm:#x}: a size is unknown"));
    if compacted {
        return layout.compacted(rfbm).ok_or_else(unknown);
    }
    let mut at = [0usize; 64];
    let mut end = EXTENDED;
    for (i, slot) in at.iter_mut().enumerate().take(63).skip(2) {
        if rfbm & (1 << i) == 0 {
            continue;
        }
        let c = layout.component(i as u32).ok_or_else(unknown)?;
        *slot = c.offset as usize;
        end = end.max(c.offset as usize + c.size as usize);
    }
    Ok((at, end))
}

/// Where component `i` is in KVM's (standard-format) buffer.
fn kvm_range(layout: &XstateLayout, i: usize) -> Result<std::ops::Range<usize>, Fixup> {
    let c = layout
        .component(i as u32)
        .filter(|c| c.offset != 0)
        .ok_or_else(|| {
            Fixup::Unhandled(format!("XSAVE component {i} has no place in KVM's buffer"))
        })?;
    let (o, n) = (c.offset as usize, c.size as usize);
    if o + n > KVM_AREA {
        return Err(Fixup::Unhandled(format!(
            "XSAVE component {i} lies beyond KVM's {KVM_AREA}-byte buffer"
        )));
    }
    Ok(o..o + n)
}

/// Copies the x87 part of the legacy region (bytes 0-23 and the ST
/// registers at 32-159) between formats: KVM's buffer holds FIP/FDP as 64
/// bits; without REX.W the guest's image has 32-bit offsets and the FCS/FDS
/// selectors (written as 0, as CPUs that deprecate them do).
fn x87_to_guest(kvm: &[u8], img: &mut [u8], rex_w: bool) {
    img[..8].copy_from_slice(&kvm[..8]);
    if rex_w {
        img[8..24].copy_from_slice(&kvm[8..24]);
    } else {
        img[8..12].copy_from_slice(&kvm[8..12]);
        img[12..16].fill(0);
        img[16..20].copy_from_slice(&kvm[16..20]);
        img[20..24].fill(0);
    }
    img[32..160].copy_from_slice(&kvm[32..160]);
}

fn x87_from_guest(img: &[u8], kvm: &mut [u8], rex_w: bool) {
    kvm[..8].copy_from_slice(&img[..8]);
    if rex_w {
        kvm[8..24].copy_from_slice(&img[8..24]);
    } else {
        kvm[8..12].copy_from_slice(&img[8..12]);
        kvm[12..16].fill(0);
        kvm[16..20].copy_from_slice(&img[16..20]);
        kvm[20..24].fill(0);
    }
    kvm[32..160].copy_from_slice(&img[32..160]);
}

/// The x87 initial state: FCW 0x37f, everything else 0.
fn x87_init(kvm: &mut [u8]) {
    kvm[..24].fill(0);
    kvm[..2].copy_from_slice(&0x37fu16.to_le_bytes());
    kvm[32..160].fill(0);
}

#[allow(clippy::too_many_arguments)]
fn save(
    mem: &dyn PhysMem,
    p: &Paging,
    user: bool,
    lin: u64,
    kvm: &[u8],
    rfbm: u64,
    op: Op,
    rex_w: bool,
    layout: &XstateLayout,
) -> Result<(), Fixup> {
    let compacted = matches!(op, Op::SaveC | Op::SaveS);
    let init_opt = op != Op::Save;
    let xinuse = u64_at(kvm, HEADER);
    let (at, end) = guest_offsets(layout, rfbm, compacted)?;
    let acc = Access { write: true, user };
    let mut img = vec![0u8; end];
    // Every page is checked for write before anything is written.
    read_linear(mem, p, lin, &mut img, acc).map_err(Fixup::PageFault)?;
    let wanted = |i: u64| rfbm & (1 << i) != 0 && (!init_opt || xinuse & (1 << i) != 0);
    if wanted(0) {
        x87_to_guest(kvm, &mut img, rex_w);
    }
    if rfbm & 6 != 0 {
        img[MXCSR..MXCSR + 8].copy_from_slice(&kvm[MXCSR..MXCSR + 8]);
    }
    if wanted(1) {
        img[XMM..XMM + 256].copy_from_slice(&kvm[XMM..XMM + 256]);
    }
    for (i, &dst) in at.iter().enumerate().take(63).skip(2) {
        if !wanted(i as u64) {
            continue;
        }
        let r = kvm_range(layout, i)?;
        let n = r.len();
        img[dst..dst + n].copy_from_slice(&kvm[r]);
    }
    if compacted {
        img[HEADER..HEADER + 8].copy_from_slice(&(xinuse & rfbm).to_le_bytes());
        img[HEADER + 8..HEADER + 16].copy_from_slice(&(rfbm | 1 << 63).to_le_bytes());
    } else {
        let bv = (u64_at(&img, HEADER) & !rfbm) | (xinuse & rfbm);
        img[HEADER..HEADER + 8].copy_from_slice(&bv.to_le_bytes());
    }
    write_linear(mem, p, lin, &img, acc).map_err(Fixup::PageFault)
}

#[allow(clippy::too_many_arguments)]
fn restore(
    mem: &dyn PhysMem,
    p: &Paging,
    user: bool,
    lin: u64,
    kvm: &mut [u8],
    rfbm: u64,
    enabled: u64,
    op: Op,
    rex_w: bool,
    layout: &XstateLayout,
) -> Result<(), Fixup> {
    let acc = Access { write: false, user };
    let mut head = [0u8; EXTENDED];
    read_linear(mem, p, lin, &mut head, acc).map_err(Fixup::PageFault)?;
    let bv = u64_at(&head, HEADER);
    let xcomp = u64_at(&head, HEADER + 8);
    let compacted = xcomp >> 63 == 1;
    if op == Op::RestoreS && !compacted {
        return Err(gp0());
    }
    let reserved_nonzero = |from: usize| head[HEADER + from..EXTENDED].iter().any(|&b| b != 0);
    if compacted {
        let comp = xcomp & !(1 << 63);
        if comp & !enabled != 0 || bv & !comp != 0 || reserved_nonzero(16) {
            return Err(gp0());
        }
    } else if bv & !enabled != 0 || head[HEADER + 8..HEADER + 24].iter().any(|&b| b != 0) {
        return Err(gp0());
    }
    let (at, end) = if compacted {
        guest_offsets(layout, xcomp & !(1 << 63), true)?
    } else {
        guest_offsets(layout, rfbm & bv, false)?
    };
    let mut img = vec![0u8; end.max(EXTENDED)];
    read_linear(mem, p, lin, &mut img, acc).map_err(Fixup::PageFault)?;
    // MXCSR first: an illegal value is #GP before anything is loaded.
    let mask = match u32_at(kvm, MXCSR_MASK) {
        0 => 0xffbf, // FXSAVE's rule: MXCSR_MASK 0 means 0xffbf
        m => m,
    };
    let mxcsr = if compacted {
        (rfbm & 2 != 0).then(|| {
            if bv & 2 != 0 {
                u32_at(&img, MXCSR)
            } else {
                0x1f80
            }
        })
    } else {
        (rfbm & 6 != 0).then(|| u32_at(&img, MXCSR))
    };
    if mxcsr.is_some_and(|m| m & !mask != 0) {
        return Err(gp0());
    }
    let mut inuse = u64_at(kvm, HEADER);
    if rfbm & 1 != 0 {
        if bv & 1 != 0 {
            x87_from_guest(&img, kvm, rex_w);
        } else {
            x87_init(kvm);
        }
    }
    if rfbm & 2 != 0 {
        if bv & 2 != 0 {
            kvm[XMM..XMM + 256].copy_from_slice(&img[XMM..XMM + 256]);
        } else {
            kvm[XMM..XMM + 256].fill(0);
        }
    }
    if let Some(m) = mxcsr {
        kvm[MXCSR..MXCSR + 4].copy_from_slice(&m.to_le_bytes());
    }
    for (i, &src) in at.iter().enumerate().take(63).skip(2) {
        if rfbm & (1 << i) == 0 {
            continue;
        }
        let r = kvm_range(layout, i)?;
        let n = r.len();
        if bv & (1 << i) != 0 {
            kvm[r].copy_from_slice(&img[src..src + n]);
        } else {
            // Every component other than x87 starts as zeros.
            kvm[r].fill(0);
        }
    }
    inuse = (inuse & !rfbm) | (bv & rfbm);
    // KVM loads MXCSR only with x87, SSE or AVX marked in use; its XMM
    // bytes are explicit (zeros when initialised), so marking SSE is exact.
    if mxcsr.is_some() && inuse & 7 == 0 {
        inuse |= 2;
    }
    kvm[HEADER..HEADER + 8].copy_from_slice(&inuse.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests;
