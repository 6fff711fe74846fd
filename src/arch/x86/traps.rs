//! Instructions this host's KVM stops on (emulation failure) whose outcome
//! is an exception the CPU would raise, decided as the CPU does. Hooked into
//! [`crate::arch::x86::fixup`] for instructions it does not handle itself.
//!
//! - `icebp` (F1, INT1) at CPL 0: a #DB trap that ignores the gate's DPL
//!   (unlike `int $1`); a gate beyond the IDT limit or not present raises
//!   #GP/#NP with error code `1*8+2+EXT` (EXT set: the event counts as
//!   external). The same at CPL 3 is delivered by [`crate::arch::x86::cpl3`].
//! - x87 instructions: #NM when CR0.EM or CR0.TS is set; `fnop` runs
//!   otherwise. MMX: #UD with CR0.EM, #NM with CR0.TS. SSE: #UD without
//!   CR4.OSFXSR or with CR0.EM, #NM with CR0.TS; register-to-register
//!   `movups`/`movaps` run. AVX (VEX): #UD without CR4.OSXSAVE or with XCR0
//!   lacking SSE/YMM state, #NM with CR0.TS (CR0.EM does not apply).
//! - VMX instructions raise #UD while CR4.VMXE is clear, SVM instructions
//!   while EFER.SVME is clear: exactly what a CPU without VMX/SVM (the guest
//!   CPUID on a host without them) or with them disabled does. xenkvm offers
//!   no nested virtualisation, so the guest can never set either bit.
//! - A far `jmp`/`call` to a TSS or task gate: a hardware task switch,
//!   emulated by [`crate::arch::x86::task`].

use iced_x86::{Code, CpuidFeature, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::arch::x86::{self, Access, EmuEnv, Fixup, Paging, PhysMem};

const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_VMXE: u64 = 1 << 13;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_SVME: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// Exception vectors used here.
const DB: u8 = 1;

fn exception(vector: u8) -> Fixup {
    Fixup::Exception {
        vector,
        error_code: None,
    }
}

/// The instruction class that decides its device-not-available and
/// invalid-opcode rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FpClass {
    X87,
    Mmx,
    Sse,
    Avx,
    Other,
}

/// Classifies `insn` by the CPUID features it needs (iced-x86's tables).
pub fn fp_class(insn: &Instruction) -> FpClass {
    use CpuidFeature as F;
    let feats = insn.cpuid_features();
    let vex = insn.encoding() != iced_x86::EncodingKind::Legacy;
    if vex
        && feats
            .iter()
            .any(|f| matches!(f, F::AVX | F::AVX2 | F::FMA | F::F16C))
    {
        return FpClass::Avx;
    }
    if feats
        .iter()
        .any(|f| matches!(f, F::FPU | F::FPU287 | F::FPU387 | F::FPU287XL_ONLY))
        && insn.mnemonic() != Mnemonic::Wait
    {
        return FpClass::X87;
    }
    // MMX forms: an MMX register operand.
    let mm = (0..insn.op_count())
        .any(|i| insn.op_kind(i) == OpKind::Register && insn.op_register(i).is_mm());
    if mm {
        return FpClass::Mmx;
    }
    let sse = feats.iter().any(|f| {
        matches!(
            f,
            F::SSE | F::SSE2 | F::SSE3 | F::SSSE3 | F::SSE4_1 | F::SSE4_2 | F::PCLMULQDQ | F::AES
        )
    });
    if sse && !vex {
        return FpClass::Sse;
    }
    FpClass::Other
}

/// The exception an x87/MMX/SSE/AVX instruction raises from CR0/CR4/XCR0,
/// if any (the CPU's order: #UD conditions before #NM).
pub fn fp_exception(class: FpClass, cr0: u64, cr4: u64, xcr0: u64) -> Option<u8> {
    match class {
        FpClass::X87 => (cr0 & (CR0_EM | CR0_TS) != 0).then_some(x86::NM),
        FpClass::Mmx => {
            if cr0 & CR0_EM != 0 {
                Some(x86::UD)
            } else if cr0 & CR0_TS != 0 {
                Some(x86::NM)
            } else {
                None
            }
        }
        FpClass::Sse => {
            if cr4 & CR4_OSFXSR == 0 || cr0 & CR0_EM != 0 {
                Some(x86::UD)
            } else if cr0 & CR0_TS != 0 {
                Some(x86::NM)
            } else {
                None
            }
        }
        FpClass::Avx => {
            if cr4 & CR4_OSXSAVE == 0 || xcr0 & 6 != 6 {
                Some(x86::UD)
            } else if cr0 & CR0_TS != 0 {
                Some(x86::NM)
            } else {
                None
            }
        }
        FpClass::Other => None,
    }
}

/// True for VMX instructions other than `vmcall` (the hypercall path).
fn is_vmx(insn: &Instruction) -> bool {
    insn.cpuid_features().contains(&CpuidFeature::VMX)
        && !matches!(insn.code(), Code::Vmcall | Code::Vmfunc)
}

/// True for SVM instructions other than `vmmcall` (the hypercall path).
fn is_svm(insn: &Instruction) -> bool {
    insn.cpuid_features().contains(&CpuidFeature::SVM) && insn.code() != Code::Vmmcall
}

/// The hook: the outcome for `insn` at CS:RIP, or None when this module
/// does not know the instruction either.
pub fn fixup(
    mem: &dyn PhysMem,
    env: &dyn EmuEnv,
    regs: &mut kvm_regs,
    s: &mut kvm_sregs,
    insn: &Instruction,
) -> Option<Fixup> {
    let next = {
        let n = regs.rip.wrapping_add(insn.len() as u64);
        if x86::code_bits(s) == 64 {
            n
        } else {
            n & 0xffff_ffff
        }
    };
    if insn.code() == Code::Int1 {
        return Some(match icebp_gate_fault(mem, s) {
            Some(f) => f,
            None => {
                regs.rip = next;
                exception(DB)
            }
        });
    }
    if is_vmx(insn) {
        return (s.cr4 & CR4_VMXE == 0).then(|| exception(x86::UD));
    }
    if is_svm(insn) {
        return (s.efer & EFER_SVME == 0).then(|| exception(x86::UD));
    }
    let vm86_ok = || crate::kvm::probe::HostProbe::get().vm86.works();
    if let Some(f) = crate::arch::x86::task::far_task_switch(mem, regs, s, insn, next, &vm86_ok) {
        return Some(f);
    }
    let class = fp_class(insn);
    if class == FpClass::Other {
        return None;
    }
    let xcr0 = if class == FpClass::Avx { env.xcr0() } else { 0 };
    if let Some(v) = fp_exception(class, s.cr0, s.cr4, xcr0) {
        return Some(exception(v));
    }
    // Neither EM nor TS: the few forms that need no FPU state change.
    match insn.code() {
        Code::Fnop => {
            regs.rip = next;
            Some(Fixup::Resume)
        }
        Code::Movups_xmm_xmmm128 | Code::Movaps_xmm_xmmm128
            if insn.op1_kind() == OpKind::Register =>
        {
            let idx = |r: Register| (r as usize).wrapping_sub(Register::XMM0 as usize);
            let (d, src) = (idx(insn.op0_register()), idx(insn.op1_register()));
            let v = env.xmm(src)?;
            if !env.set_xmm(d, v) {
                return None;
            }
            regs.rip = next;
            Some(Fixup::Resume)
        }
        Code::VEX_Vmovups_xmm_xmmm128
        | Code::VEX_Vmovaps_xmm_xmmm128
        | Code::VEX_Vmovdqu_xmm_xmmm128
        | Code::VEX_Vmovdqa_xmm_xmmm128
            if insn.op1_kind() == OpKind::Register =>
        {
            let idx = |r: Register| (r as usize).wrapping_sub(Register::XMM0 as usize);
            if !env.vex128_move(idx(insn.op0_register()), idx(insn.op1_register())) {
                return None;
            }
            regs.rip = next;
            Some(Fixup::Resume)
        }
        _ => None,
    }
}

/// The fault `icebp` raises from its own gate (vector 1), if any: beyond
/// the IDT limit #GP, not present #NP, with error code 1*8+2+EXT. No DPL
/// check (that is what makes `icebp` differ from `int $1`).
fn icebp_gate_fault(mem: &dyn PhysMem, s: &kvm_sregs) -> Option<Fixup> {
    if s.cr0 & 1 == 0 {
        return None;
    }
    let code = Some(u32::from(DB) * 8 + 3);
    let size: u64 = if s.efer & EFER_LMA != 0 { 16 } else { 8 };
    if u64::from(DB) * size + size - 1 > u64::from(s.idt.limit) {
        return Some(Fixup::Exception {
            vector: x86::GP,
            error_code: code,
        });
    }
    let mut g = [0u8; 8];
    if let Err(pf) = x86::read_linear(
        mem,
        &Paging::from_sregs(s),
        s.idt.base.wrapping_add(u64::from(DB) * size),
        &mut g,
        Access::READ,
    ) {
        return Some(Fixup::PageFault(pf));
    }
    (g[5] & 0x80 == 0).then_some(Fixup::Exception {
        vector: x86::NP,
        error_code: code,
    })
}

#[cfg(test)]
mod tests;
