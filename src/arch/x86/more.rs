//! More fix-ups for instructions this host's KVM fails to emulate, found by
//! decoding the guest kernels (`xenkvm probe --coverage`, see coverage.rs).
//! [`crate::arch::x86::fixup`] hands every form it does not know to [`fixup`].
//!
//! Each form follows the SDM, exceptions included:
//! - descriptor queries `lsl`, `lar`, `verr`, `verw` (Linux's paranoid NMI,
//!   #DB and #MC entry reads the CPU number with `lsl`; `verw` clears CPU
//!   buffers on return to user mode);
//! - SSE integer and logic forms on XMM registers (`pxor`, `paddd`,
//!   `pshufd`, ...), with the CR0.EM/TS and CR4.OSFXSR checks and the
//!   alignment #GP of 128-bit memory operands;
//! - `cmpxchg16b` (not atomic against other vCPUs: the VMM stops only this
//!   one; guests see CX16 hidden in CPUID), BMI2 `shlx`/`shrx`/`sarx`;
//! - `fnop`, `fnclex`, `emms`; `monitor`/`mwait` (and the AMD `x` forms) as
//!   no-ops after their operand checks, as KVM itself runs them; `clwb`;
//! - forms that raise #UD on this virtual CPU: `ud0`/`ud1`, `xend` (no
//!   RTM), `encls` (no SGX), `pvalidate`/`rmpadjust` (not an SEV-SNP
//!   guest), `tilerelease` without AMX state in XCR0, `rdpkru`/`wrpkru`
//!   without CR4.PKE, and VEX/EVEX forms when CR4.OSXSAVE or the XCR0 state
//!   they need is off (a guest booted with `noxsave`).
//!
//! - `invpcid`/`vmfunc` (invpcid.rs), the XSAVE family (xsave.rs), x87
//!   arithmetic, loads and integer stores (x87.rs), AVX/AVX-512 moves,
//!   logic, adds, shuffles and `vzeroupper` on the real vector state
//!   (avx.rs); `(u)comiss`/`(u)comisd`, and `divss` under any MXCSR
//!   (sse_fp.rs).
//!
//! Everything else is [`Fixup::Unhandled`]: the VMM stops the guest with
//! the form's name rather than guess.

use iced_x86::{Code, EncodingKind, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::arch::x86::{
    code_bits, cpl, gpr_read, gpr_write, is_64bit, operand_address, read_linear, read_operand,
    write_linear, Access, EmuEnv, Fixup, Paging, PhysMem, GP, MF, NM, UD,
};

const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_PKE: u64 = 1 << 22;
const RFLAGS_ZF: u64 = 1 << 6;

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

/// Emulates `insn` (at `regs.rip`), or says why not.
pub fn fixup(
    mem: &dyn PhysMem,
    env: &dyn EmuEnv,
    regs: &mut kvm_regs,
    s: &mut kvm_sregs,
    insn: &Instruction,
) -> Fixup {
    match emulate(mem, env, regs, s, insn) {
        Ok(()) => {
            let next = regs.rip.wrapping_add(insn.len() as u64);
            regs.rip = if code_bits(s) == 64 {
                next
            } else {
                next & 0xffff_ffff
            };
            Fixup::Resume
        }
        Err(f) => f,
    }
}

fn unhandled(regs: &kvm_regs, insn: &Instruction) -> Fixup {
    Fixup::Unhandled(format!(
        "{:?} at {:#x} ({:?})",
        insn.code(),
        regs.rip,
        insn.mnemonic()
    ))
}

fn emulate(
    mem: &dyn PhysMem,
    env: &dyn EmuEnv,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    // VEX/EVEX forms need CR4.OSXSAVE and their state enabled in XCR0.
    match insn.encoding() {
        EncodingKind::VEX | EncodingKind::EVEX if !is_bmi(insn) => {
            let need: u64 = if insn.encoding() == EncodingKind::EVEX {
                0xe6
            } else {
                0x6
            };
            if s.cr4 & CR4_OSXSAVE == 0 || env.xcr0() & need != need {
                return Err(exc(UD));
            }
        }
        _ => {}
    }
    match insn.mnemonic() {
        Mnemonic::Lsl | Mnemonic::Lar => lsl_lar(mem, regs, s, insn),
        Mnemonic::Verr | Mnemonic::Verw => verr_verw(mem, regs, s, insn),
        Mnemonic::Ud0 | Mnemonic::Ud1 | Mnemonic::Ud2 => Err(exc(UD)),
        // Features this virtual CPU does not have: RTM, SGX, SEV-SNP.
        Mnemonic::Xend | Mnemonic::Xabort | Mnemonic::Xtest => Err(exc(UD)),
        Mnemonic::Encls | Mnemonic::Enclu => Err(exc(UD)),
        Mnemonic::Pvalidate | Mnemonic::Rmpadjust => Err(exc(UD)),
        Mnemonic::Tilerelease => {
            if env.xcr0() & (3 << 17) != 3 << 17 || !is_64bit(s) {
                Err(exc(UD))
            } else {
                Err(unhandled(regs, insn))
            }
        }
        Mnemonic::Rdpkru | Mnemonic::Wrpkru => {
            if s.cr4 & CR4_PKE == 0 {
                Err(exc(UD))
            } else {
                Err(unhandled(regs, insn))
            }
        }
        Mnemonic::Monitor | Mnemonic::Monitorx => {
            // No extensions are supported: ECX must be 0. The address is
            // only a hint; nothing is armed, so mwait returns at once.
            if cpl(s) != 0 {
                return Err(exc(UD));
            }
            if regs.rcx & 0xffff_ffff != 0 {
                return Err(gp0());
            }
            Ok(())
        }
        Mnemonic::Mwait | Mnemonic::Mwaitx => {
            // mwait may return at any time; ECX may only ask for
            // interrupts as break events (and, for mwaitx, the timer).
            if cpl(s) != 0 {
                return Err(exc(UD));
            }
            let allowed = if insn.mnemonic() == Mnemonic::Mwait {
                1
            } else {
                3
            };
            if regs.rcx & 0xffff_ffff & !allowed != 0 {
                return Err(gp0());
            }
            Ok(())
        }
        Mnemonic::Clwb | Mnemonic::Clflush | Mnemonic::Clflushopt => {
            // Write-back or flush of one line: nothing to do for guest
            // RAM, but the address must translate (#PF as a read).
            let lin = operand_address(regs, s, insn, 0)?;
            let mut b = [0u8; 1];
            let acc = Access {
                write: false,
                user: cpl(s) == 3,
            };
            read_linear(mem, &Paging::from_sregs(s), lin, &mut b, acc).map_err(Fixup::PageFault)
        }
        Mnemonic::Fnop | Mnemonic::Fnclex | Mnemonic::Emms => x87_control(env, s, insn),
        Mnemonic::Cmpxchg16b => cmpxchg16b(mem, regs, s, insn),
        Mnemonic::Shlx | Mnemonic::Shrx | Mnemonic::Sarx => shift_x(mem, regs, s, insn),
        Mnemonic::Ucomiss | Mnemonic::Comiss | Mnemonic::Ucomisd | Mnemonic::Comisd
            if insn.encoding() == EncodingKind::Legacy =>
        {
            compare_scalar(mem, env, regs, s, insn)
        }
        Mnemonic::Divss if insn.encoding() == EncodingKind::Legacy => {
            divss(mem, env, regs, s, insn)
        }
        Mnemonic::Vmfunc => Err(crate::arch::x86::invpcid::vmfunc()),
        Mnemonic::Invpcid => crate::arch::x86::invpcid::invpcid(mem, env, regs, s, insn),
        _ if crate::arch::x86::xsave::is_xsave_family(insn) => {
            crate::arch::x86::xsave::emulate(mem, env, regs, s, insn)
        }
        _ if crate::arch::x86::avx::handles(insn) => {
            crate::arch::x86::avx::emulate(mem, env, regs, s, insn)
        }
        _ if crate::arch::x86::x87::handles(insn) => {
            crate::arch::x86::x87::emulate(mem, env, regs, s, insn)
        }
        _ => match sse_op(insn.code()) {
            Some(op) => sse(mem, env, regs, s, insn, op),
            None => Err(unhandled(regs, insn)),
        },
    }
}

/// Forms this host's KVM fails on that xenkvm does not emulate yet: VMX
/// instructions and `int1` (their #UD and #DB delivery are separate
/// fix-ups), and the AVX/AVX-512 forms avx.rs does not know when their
/// state is enabled (without it they raise #UD here, as the CPU would). The
/// probe marks them. (`invpcid`, `vmfunc`, the XSAVE family, the x87 forms
/// and the AVX forms in avx.rs are handled.)
pub fn not_emulated_yet(insn: &Instruction) -> bool {
    use Mnemonic::*;
    let avx = matches!(insn.encoding(), EncodingKind::VEX | EncodingKind::EVEX)
        && !is_bmi(insn)
        && !crate::arch::x86::avx::handles(insn);
    avx || matches!(
        insn.mnemonic(),
        Vmread
            | Vmwrite
            | Vmptrld
            | Vmptrst
            | Vmxon
            | Vmxoff
            | Vmclear
            | Vmlaunch
            | Vmresume
            | Invept
            | Invvpid
            | Int1
    )
}

/// VEX-encoded general-purpose forms (BMI1/2) need no XSAVE state.
fn is_bmi(insn: &Instruction) -> bool {
    matches!(
        insn.mnemonic(),
        Mnemonic::Shlx
            | Mnemonic::Shrx
            | Mnemonic::Sarx
            | Mnemonic::Rorx
            | Mnemonic::Andn
            | Mnemonic::Bextr
            | Mnemonic::Blsi
            | Mnemonic::Blsmsk
            | Mnemonic::Blsr
            | Mnemonic::Bzhi
            | Mnemonic::Mulx
            | Mnemonic::Pdep
            | Mnemonic::Pext
    )
}

/// The 8 bytes of descriptor `sel` in the GDT or LDT, `None` if the
/// selector is null or the descriptor (`len` bytes) lies beyond the limit.
fn descriptor(mem: &dyn PhysMem, s: &kvm_sregs, sel: u16, len: u64) -> Result<Option<u64>, Fixup> {
    if sel & 0xfffc == 0 {
        return Ok(None);
    }
    let (base, limit) = if sel & 4 != 0 {
        if s.ldt.unusable != 0 || s.ldt.present == 0 {
            return Ok(None);
        }
        (s.ldt.base, u64::from(s.ldt.limit))
    } else {
        (s.gdt.base, u64::from(s.gdt.limit))
    };
    let off = u64::from(sel & 0xfff8);
    if off + len - 1 > limit {
        return Ok(None);
    }
    let mut d = [0u8; 8];
    read_linear(
        mem,
        &Paging::from_sregs(s),
        base.wrapping_add(off),
        &mut d,
        Access::READ,
    )
    .map_err(Fixup::PageFault)?;
    Ok(Some(u64::from_le_bytes(d)))
}

/// The selector operand (register or 16-bit memory) of lsl/lar/verr/verw.
fn selector_operand(
    mem: &dyn PhysMem,
    regs: &kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
    op: u32,
) -> Result<u16, Fixup> {
    Ok(read_operand(mem, regs, s, insn, op, 2)? as u16)
}

/// Whether descriptor `d` (selector `sel`) is visible at the current
/// privilege for lsl/lar/verr/verw: conforming code always, else
/// DPL >= CPL and DPL >= RPL.
fn visible(s: &kvm_sregs, sel: u16, d: u64) -> bool {
    let dpl = ((d >> 45) & 3) as u8;
    let code_conforming = (d >> 44) & 1 == 1 && (d >> 43) & 1 == 1 && (d >> 42) & 1 == 1;
    code_conforming || (dpl >= cpl(s) && dpl >= (sel & 3) as u8)
}

fn set_zf(regs: &mut kvm_regs, zf: bool) {
    if zf {
        regs.rflags |= RFLAGS_ZF;
    } else {
        regs.rflags &= !RFLAGS_ZF;
    }
}

/// lsl/lar: the segment limit (scaled by G) or the access rights of a
/// descriptor the current privilege may see; ZF says whether it was loaded.
fn lsl_lar(
    mem: &dyn PhysMem,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    if s.cr0 & 1 == 0 || regs.rflags & (1 << 17) != 0 {
        return Err(exc(UD));
    }
    let long = s.efer & (1 << 10) != 0;
    let sel = selector_operand(mem, regs, s, insn, 1)?;
    let lar = insn.mnemonic() == Mnemonic::Lar;
    let Some(d) = descriptor(mem, s, sel, 8)? else {
        set_zf(regs, false);
        return Ok(());
    };
    let system = (d >> 44) & 1 == 0;
    let ty = (d >> 40) & 0xf;
    let valid_type = if !system {
        true
    } else if long {
        // LDT, available/busy 64-bit TSS; lar also 64-bit call gates.
        matches!(ty, 2 | 9 | 0xb) || (lar && ty == 0xc)
    } else {
        matches!(ty, 1 | 2 | 3 | 9 | 0xb) || (lar && matches!(ty, 4 | 5 | 0xc))
    };
    // 16-byte system descriptors in long mode must fit in the table.
    let fits = !(long && system) || descriptor(mem, s, sel, 16)?.is_some();
    if !valid_type || !fits || !visible(s, sel, d) {
        set_zf(regs, false);
        return Ok(());
    }
    let dst = insn.op0_register();
    let val = if lar {
        let ar = (d >> 32) & 0x00f0_ff00;
        if dst.size() == 2 {
            ar & 0xff00
        } else {
            ar
        }
    } else {
        let raw = (d & 0xffff) | ((d >> 32) & 0xf_0000);
        if (d >> 55) & 1 == 1 {
            (raw << 12) | 0xfff
        } else {
            raw
        }
    };
    gpr_write(regs, dst, val);
    set_zf(regs, true);
    Ok(())
}

/// verr/verw: ZF=1 if the segment is readable/writable at the current
/// privilege.
fn verr_verw(
    mem: &dyn PhysMem,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    if s.cr0 & 1 == 0 || regs.rflags & (1 << 17) != 0 {
        return Err(exc(UD));
    }
    let sel = selector_operand(mem, regs, s, insn, 0)?;
    let ok = match descriptor(mem, s, sel, 8)? {
        None => false,
        Some(d) => {
            let code_or_data = (d >> 44) & 1 == 1;
            let code = (d >> 43) & 1 == 1;
            let rw = (d >> 41) & 1 == 1; // readable code / writable data
            let conforming_code = code && (d >> 42) & 1 == 1;
            let access = if insn.mnemonic() == Mnemonic::Verr {
                !code || rw
            } else {
                !code && rw
            };
            // Conforming code is readable at any privilege.
            code_or_data && access && (conforming_code || visible(s, sel, d))
        }
    };
    set_zf(regs, ok);
    Ok(())
}

/// fnop, fnclex, emms: #UD (emms) / #NM on CR0.EM and CR0.TS, #MF for a
/// pending x87 exception (not fnclex, a no-wait form).
fn x87_control(env: &dyn EmuEnv, s: &kvm_sregs, insn: &Instruction) -> Result<(), Fixup> {
    let m = insn.mnemonic();
    if m == Mnemonic::Emms && s.cr0 & CR0_EM != 0 {
        return Err(exc(UD));
    }
    if s.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Err(exc(NM));
    }
    let mut f = env
        .fpu()
        .ok_or_else(|| Fixup::Unhandled("x87 state unavailable".into()))?;
    if m != Mnemonic::Fnclex && f.fsw & 0x80 != 0 {
        return Err(exc(MF));
    }
    match m {
        Mnemonic::Fnclex => f.fsw &= !0x80ff, // PE..SF, ES, B
        Mnemonic::Emms => f.ftwx = 0,         // every register empty
        _ => return Ok(()),
    }
    if env.set_fpu(&f) {
        Ok(())
    } else {
        Err(Fixup::Unhandled("the host refused the x87 state".into()))
    }
}

/// cmpxchg16b m128: compare RDX:RAX with the 16-byte operand; equal: store
/// RCX:RBX and set ZF; else load it into RDX:RAX and clear ZF. The operand
/// must be 16-byte aligned (#GP(0)); it is written back either way.
fn cmpxchg16b(
    mem: &dyn PhysMem,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    let lin = operand_address(regs, s, insn, 0)?;
    if lin & 15 != 0 {
        return Err(gp0());
    }
    let p = Paging::from_sregs(s);
    let acc = Access {
        write: true,
        user: cpl(s) == 3,
    };
    let mut cur = [0u8; 16];
    // Check writability first, as the locked read-modify-write does.
    read_linear(mem, &p, lin, &mut cur, acc).map_err(Fixup::PageFault)?;
    let lo = u64::from_le_bytes(cur[..8].try_into().unwrap_or([0; 8]));
    let hi = u64::from_le_bytes(cur[8..].try_into().unwrap_or([0; 8]));
    let equal = lo == regs.rax && hi == regs.rdx;
    let mut new = cur;
    if equal {
        new[..8].copy_from_slice(&regs.rbx.to_le_bytes());
        new[8..].copy_from_slice(&regs.rcx.to_le_bytes());
    } else {
        regs.rax = lo;
        regs.rdx = hi;
    }
    write_linear(mem, &p, lin, &new, acc).map_err(Fixup::PageFault)?;
    set_zf(regs, equal);
    Ok(())
}

/// shlx/shrx/sarx: shift by the count register masked to the operand
/// width; no flags change.
fn shift_x(
    mem: &dyn PhysMem,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    let dst = insn.op0_register();
    let wide = dst.size() == 8;
    let size = if wide { 8 } else { 4 };
    let src = read_operand(mem, regs, s, insn, 1, size)?;
    let count = gpr_read(regs, insn.op2_register())
        .ok_or_else(|| Fixup::Unhandled("shift count register".into()))?
        & if wide { 63 } else { 31 };
    let val = match insn.mnemonic() {
        Mnemonic::Shlx => src << count,
        Mnemonic::Shrx => src >> count,
        _ if wide => ((src as i64) >> count) as u64,
        _ => (((src as u32) as i32) >> count) as u32 as u64,
    };
    gpr_write(regs, dst, val);
    Ok(())
}

/// SSE prelude: #UD without CR4.OSFXSR or with CR0.EM, #NM with CR0.TS.
fn sse_available(s: &kvm_sregs) -> Result<(), Fixup> {
    if s.cr0 & CR0_EM != 0 || s.cr4 & CR4_OSFXSR == 0 {
        return Err(exc(UD));
    }
    if s.cr0 & CR0_TS != 0 {
        return Err(exc(NM));
    }
    Ok(())
}

/// A scalar float as the compare sees it: NaN, signalling NaN, denormal.
#[derive(Clone, Copy, Debug)]
struct Scalar {
    value: f64,
    nan: bool,
    snan: bool,
    denormal: bool,
}

fn scalar(bits: u64, double: bool) -> Scalar {
    if double {
        let v = f64::from_bits(bits);
        Scalar {
            value: v,
            nan: v.is_nan(),
            snan: v.is_nan() && bits & (1 << 51) == 0,
            denormal: v.is_subnormal(),
        }
    } else {
        let b = bits as u32;
        let v = f32::from_bits(b);
        Scalar {
            value: f64::from(v),
            nan: v.is_nan(),
            snan: v.is_nan() && b & (1 << 22) == 0,
            denormal: v.is_subnormal(),
        }
    }
}

/// (u)comiss/(u)comisd: ZF, PF, CF from an ordered compare (111 unordered,
/// 000 greater, 001 less, 100 equal; OF, SF, AF cleared). Invalid for a
/// signalling NaN (comis*: any NaN), denormal for a denormal operand unless
/// MXCSR.DAZ; a flagged exception sets its MXCSR bit and, when unmasked,
/// raises #XM (#UD without CR4.OSXMMEXCPT) instead of the compare.
fn compare_scalar(
    mem: &dyn PhysMem,
    env: &dyn EmuEnv,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    sse_available(s)?;
    let double = matches!(insn.mnemonic(), Mnemonic::Ucomisd | Mnemonic::Comisd);
    let size = if double { 8 } else { 4 };
    let mut f = env
        .fpu()
        .ok_or_else(|| Fixup::Unhandled("SSE state unavailable".into()))?;
    let low = |x: &[u8; 16]| u64::from_le_bytes(x[..8].try_into().unwrap_or([0; 8]));
    let a_bits = xmm_index(insn.op0_register())
        .map(|n| low(&f.xmm[n]))
        .ok_or_else(|| Fixup::Unhandled("compare destination".into()))?;
    let b_bits = match insn.op1_kind() {
        OpKind::Register => xmm_index(insn.op1_register())
            .map(|n| low(&f.xmm[n]))
            .ok_or_else(|| Fixup::Unhandled("compare source".into()))?,
        _ => read_operand(mem, regs, s, insn, 1, size)?,
    };
    let daz = f.mxcsr & (1 << 6) != 0;
    let load = |bits| {
        let mut x = scalar(bits, double);
        if daz && x.denormal {
            x.value = 0.0;
            x.denormal = false;
        }
        x
    };
    let (a, b) = (load(a_bits), load(b_bits));
    let quiet = matches!(insn.mnemonic(), Mnemonic::Ucomiss | Mnemonic::Ucomisd);
    let invalid = if quiet {
        a.snan || b.snan
    } else {
        a.nan || b.nan
    };
    let denormal = !invalid && (a.denormal || b.denormal);
    let (flag, mask) = if invalid {
        (1u32, 1u32 << 7)
    } else if denormal {
        (1 << 1, 1 << 8)
    } else {
        (0, 0)
    };
    if flag != 0 {
        f.mxcsr |= flag;
        if !env.set_fpu(&f) {
            return Err(Fixup::Unhandled("the host refused the SSE state".into()));
        }
        if f.mxcsr & mask == 0 {
            return Err(if s.cr4 & (1 << 10) != 0 {
                exc(19)
            } else {
                exc(UD)
            });
        }
    }
    let (zf, pf, cf) = if a.nan || b.nan {
        (1, 1, 1)
    } else if a.value > b.value {
        (0, 0, 0)
    } else if a.value < b.value {
        (0, 0, 1)
    } else {
        (1, 0, 0)
    };
    // CF (0), PF (2), AF (4), ZF (6), SF (7), OF (11).
    regs.rflags &= !((1 << 0) | (1 << 2) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 11));
    regs.rflags |= cf | (pf << 2) | (zf << 6);
    Ok(())
}

/// divss: the low single of the destination divided by the source, upper
/// bits kept, under any MXCSR (rounding, FTZ, DAZ, masks): computed by
/// [`crate::arch::x86::sse_fp::divss`]. An unmasked exception sets its
/// MXCSR flags, keeps the destination and raises #XM (#UD without
/// CR4.OSXMMEXCPT).
fn divss(
    mem: &dyn PhysMem,
    env: &dyn EmuEnv,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    sse_available(s)?;
    let mut f = env
        .fpu()
        .ok_or_else(|| Fixup::Unhandled("SSE state unavailable".into()))?;
    let dst = xmm_index(insn.op0_register())
        .ok_or_else(|| Fixup::Unhandled("divss destination".into()))?;
    let low = |x: &[u8; 16]| u32::from_le_bytes([x[0], x[1], x[2], x[3]]);
    let a_bits = low(&f.xmm[dst]);
    let b_bits = match insn.op1_kind() {
        OpKind::Register => xmm_index(insn.op1_register())
            .map(|n| low(&f.xmm[n]))
            .ok_or_else(|| Fixup::Unhandled("divss source".into()))?,
        _ => read_operand(mem, regs, s, insn, 1, 4)? as u32,
    };
    let out = crate::arch::x86::sse_fp::divss(a_bits, b_bits, f.mxcsr);
    if let Some(q) = out.value {
        f.xmm[dst][..4].copy_from_slice(&q.to_le_bytes());
    }
    f.mxcsr |= out.flags;
    if !env.set_fpu(&f) {
        return Err(Fixup::Unhandled("the host refused the SSE state".into()));
    }
    match out.value {
        Some(_) => Ok(()),
        None if s.cr4 & (1 << 10) != 0 => Err(exc(19)),
        None => Err(exc(UD)),
    }
}

/// The SSE integer and logic operations handled here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SseOp {
    Xor,
    Or,
    And,
    AndNot,
    AddD,
    AddQ,
    SubD,
    SubQ,
    UnpackLowD,
    UnpackLowQ,
    UnpackHighD,
    UnpackHighQ,
    ShuffleD,
    ShuffleB,
    ShiftLeftD,
    ShiftRightD,
    ShiftLeftQ,
    ShiftRightQ,
}

fn sse_op(code: Code) -> Option<SseOp> {
    use SseOp::*;
    Some(match code {
        Code::Pxor_xmm_xmmm128 | Code::Xorps_xmm_xmmm128 | Code::Xorpd_xmm_xmmm128 => Xor,
        Code::Por_xmm_xmmm128 | Code::Orps_xmm_xmmm128 | Code::Orpd_xmm_xmmm128 => Or,
        Code::Pand_xmm_xmmm128 | Code::Andps_xmm_xmmm128 | Code::Andpd_xmm_xmmm128 => And,
        Code::Pandn_xmm_xmmm128 | Code::Andnps_xmm_xmmm128 | Code::Andnpd_xmm_xmmm128 => AndNot,
        Code::Paddd_xmm_xmmm128 => AddD,
        Code::Paddq_xmm_xmmm128 => AddQ,
        Code::Psubd_xmm_xmmm128 => SubD,
        Code::Psubq_xmm_xmmm128 => SubQ,
        Code::Punpckldq_xmm_xmmm128 => UnpackLowD,
        Code::Punpcklqdq_xmm_xmmm128 => UnpackLowQ,
        Code::Punpckhdq_xmm_xmmm128 => UnpackHighD,
        Code::Punpckhqdq_xmm_xmmm128 => UnpackHighQ,
        Code::Pshufd_xmm_xmmm128_imm8 => ShuffleD,
        Code::Pshufb_xmm_xmmm128 => ShuffleB,
        Code::Pslld_xmm_imm8 => ShiftLeftD,
        Code::Psrld_xmm_imm8 => ShiftRightD,
        Code::Psllq_xmm_imm8 => ShiftLeftQ,
        Code::Psrlq_xmm_imm8 => ShiftRightQ,
        _ => return None,
    })
}

fn xmm_index(r: Register) -> Option<usize> {
    r.is_xmm()
        .then(|| (r as usize).wrapping_sub(Register::XMM0 as usize))
        .filter(|&n| n < 16)
}

fn dwords(v: &[u8; 16]) -> [u32; 4] {
    let mut d = [0u32; 4];
    for (i, x) in d.iter_mut().enumerate() {
        *x = u32::from_le_bytes([v[i * 4], v[i * 4 + 1], v[i * 4 + 2], v[i * 4 + 3]]);
    }
    d
}

fn from_dwords(d: [u32; 4]) -> [u8; 16] {
    let mut v = [0u8; 16];
    for (i, x) in d.iter().enumerate() {
        v[i * 4..i * 4 + 4].copy_from_slice(&x.to_le_bytes());
    }
    v
}

fn qwords(v: &[u8; 16]) -> [u64; 2] {
    let d = dwords(v);
    [
        u64::from(d[0]) | (u64::from(d[1]) << 32),
        u64::from(d[2]) | (u64::from(d[3]) << 32),
    ]
}

fn from_qwords(q: [u64; 2]) -> [u8; 16] {
    from_dwords([
        q[0] as u32,
        (q[0] >> 32) as u32,
        q[1] as u32,
        (q[1] >> 32) as u32,
    ])
}

/// Computes `op` on destination `a` and source `b` (or immediate `imm`).
fn sse_compute(op: SseOp, a: [u8; 16], b: [u8; 16], imm: u8) -> [u8; 16] {
    use SseOp::*;
    let zip = |f: fn(u8, u8) -> u8| {
        let mut r = [0u8; 16];
        for i in 0..16 {
            r[i] = f(a[i], b[i]);
        }
        r
    };
    let (da, db) = (dwords(&a), dwords(&b));
    let (qa, qb) = (qwords(&a), qwords(&b));
    match op {
        Xor => zip(|x, y| x ^ y),
        Or => zip(|x, y| x | y),
        And => zip(|x, y| x & y),
        AndNot => zip(|x, y| !x & y),
        AddD => from_dwords(std::array::from_fn(|i| da[i].wrapping_add(db[i]))),
        SubD => from_dwords(std::array::from_fn(|i| da[i].wrapping_sub(db[i]))),
        AddQ => from_qwords([qa[0].wrapping_add(qb[0]), qa[1].wrapping_add(qb[1])]),
        SubQ => from_qwords([qa[0].wrapping_sub(qb[0]), qa[1].wrapping_sub(qb[1])]),
        UnpackLowD => from_dwords([da[0], db[0], da[1], db[1]]),
        UnpackHighD => from_dwords([da[2], db[2], da[3], db[3]]),
        UnpackLowQ => from_qwords([qa[0], qb[0]]),
        UnpackHighQ => from_qwords([qa[1], qb[1]]),
        ShuffleD => from_dwords(std::array::from_fn(|i| {
            db[usize::from((imm >> (2 * i)) & 3)]
        })),
        ShuffleB => std::array::from_fn(|i| {
            if b[i] & 0x80 != 0 {
                0
            } else {
                a[usize::from(b[i] & 0xf)]
            }
        }),
        ShiftLeftD | ShiftRightD => from_dwords(std::array::from_fn(|i| match imm {
            32.. => 0,
            n if op == ShiftLeftD => da[i] << n,
            n => da[i] >> n,
        })),
        ShiftLeftQ | ShiftRightQ => from_qwords(std::array::from_fn(|i| match imm {
            64.. => 0,
            n if op == ShiftLeftQ => qa[i] << n,
            n => qa[i] >> n,
        })),
    }
}

/// A legacy-SSE form on XMM registers: #UD without CR4.OSFXSR or with
/// CR0.EM, #NM with CR0.TS, #GP(0) for a misaligned 128-bit memory operand.
fn sse(
    mem: &dyn PhysMem,
    env: &dyn EmuEnv,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
    op: SseOp,
) -> Result<(), Fixup> {
    if s.cr0 & CR0_EM != 0 || s.cr4 & CR4_OSFXSR == 0 {
        return Err(exc(UD));
    }
    if s.cr0 & CR0_TS != 0 {
        return Err(exc(NM));
    }
    let mut f = env
        .fpu()
        .ok_or_else(|| Fixup::Unhandled("SSE state unavailable".into()))?;
    let dst =
        xmm_index(insn.op0_register()).ok_or_else(|| Fixup::Unhandled("SSE destination".into()))?;
    let a = f.xmm[dst];
    let (b, imm) = match insn.op1_kind() {
        OpKind::Register => {
            let n = xmm_index(insn.op1_register())
                .ok_or_else(|| Fixup::Unhandled("SSE source".into()))?;
            (f.xmm[n], insn.immediate8())
        }
        OpKind::Memory => {
            let lin = operand_address(regs, s, insn, 1)?;
            if lin & 15 != 0 {
                return Err(gp0());
            }
            let mut b = [0u8; 16];
            let acc = Access {
                write: false,
                user: cpl(s) == 3,
            };
            read_linear(mem, &Paging::from_sregs(s), lin, &mut b, acc).map_err(Fixup::PageFault)?;
            (b, insn.immediate8())
        }
        OpKind::Immediate8 => ([0; 16], insn.immediate8()),
        k => return Err(Fixup::Unhandled(format!("SSE operand kind {k:?}"))),
    };
    f.xmm[dst] = sse_compute(op, a, b, imm);
    if env.set_fpu(&f) {
        Ok(())
    } else {
        Err(Fixup::Unhandled("the host refused the SSE state".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86::fixup as fix;
    use proptest::prelude::*;
    use std::cell::RefCell;

    const RAM: usize = 0x30_0000;
    const GDT: u64 = 0x5000;
    const CODE: u64 = 0x1000;
    const DATA: u64 = 0x20_0000;

    struct Mem(RefCell<Vec<u8>>);

    impl Mem {
        fn new() -> Mem {
            Mem(RefCell::new(vec![0; RAM]))
        }
        fn put(&self, gpa: u64, data: &[u8]) {
            self.0.borrow_mut()[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
        }
        fn get(&self, gpa: u64, n: usize) -> Vec<u8> {
            self.0.borrow()[gpa as usize..gpa as usize + n].to_vec()
        }
    }

    impl PhysMem for Mem {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let m = self.0.borrow();
            let Some(src) = usize::try_from(gpa)
                .ok()
                .and_then(|a| m.get(a..a.checked_add(buf.len())?))
            else {
                return false;
            };
            buf.copy_from_slice(src);
            true
        }
        fn write(&self, gpa: u64, data: &[u8]) -> bool {
            let mut m = self.0.borrow_mut();
            let Some(dst) = usize::try_from(gpa)
                .ok()
                .and_then(|a| m.get_mut(a..a.checked_add(data.len())?))
            else {
                return false;
            };
            dst.copy_from_slice(data);
            true
        }
    }

    struct Env {
        fpu: RefCell<kvm_bindings::kvm_fpu>,
        xcr0: u64,
    }

    impl Env {
        fn new() -> Env {
            Env {
                fpu: RefCell::new(kvm_bindings::kvm_fpu {
                    fcw: 0x37f,
                    mxcsr: 0x1f80,
                    ..Default::default()
                }),
                xcr0: 7,
            }
        }
    }

    impl EmuEnv for Env {
        fn rdtsc(&self) -> u64 {
            1000
        }
        fn tsc_aux(&self) -> u64 {
            1
        }
        fn xcr0(&self) -> u64 {
            self.xcr0
        }
        fn fpu_status(&self) -> u16 {
            self.fpu.borrow().fsw
        }
        fn mxcsr(&self) -> u32 {
            self.fpu.borrow().mxcsr
        }
        fn set_mxcsr(&self, v: u32) -> bool {
            self.fpu.borrow_mut().mxcsr = v;
            true
        }
        fn xmm(&self, n: usize) -> Option<[u8; 16]> {
            self.fpu.borrow().xmm.get(n).copied()
        }
        fn set_xmm(&self, n: usize, v: [u8; 16]) -> bool {
            self.fpu.borrow_mut().xmm[n] = v;
            true
        }
        fn fpu(&self) -> Option<kvm_bindings::kvm_fpu> {
            Some(*self.fpu.borrow())
        }
        fn set_fpu(&self, f: &kvm_bindings::kvm_fpu) -> bool {
            *self.fpu.borrow_mut() = *f;
            true
        }
    }

    /// A CPL-0 machine in `bits` mode, paging off (identity), a GDT with
    /// Linux's layout where it matters: 0x10 kernel code, 0x18 kernel
    /// data, 0x33 user code, 0x7b the per-CPU "CPUNODE" segment (DPL 3,
    /// limit = node << 12 | cpu).
    fn machine(bits: u32) -> (Mem, kvm_regs, kvm_sregs) {
        let m = Mem::new();
        let mut s = kvm_sregs::default();
        let long = bits == 64;
        s.cs = crate::arch::x86::flat_segment(0x10, 0xb, 0, long);
        for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
            *d = crate::arch::x86::flat_segment(0x18, 0x3, 0, long);
        }
        s.cr0 = 0x11;
        s.cr4 = CR4_OSFXSR | CR4_OSXSAVE;
        if long {
            s.efer = 0x500;
        }
        s.gdt.base = GDT;
        s.gdt.limit = 16 * 8 - 1;
        s.ldt.unusable = 1;
        let w = |i: u64, d: u64| m.put(GDT + i * 8, &d.to_le_bytes());
        w(2, 0x00af_9b00_0000_ffff); // kernel code
        w(3, 0x00cf_9300_0000_ffff); // kernel data
        w(6, 0x00af_fb00_0000_ffff); // user code
        w(15, 0x0040_f500_0000_1003); // CPUNODE: data, DPL 3, limit 0x1003
        let r = kvm_regs {
            rip: CODE,
            rflags: 2,
            rbx: DATA,
            rsp: 0x9000,
            ..Default::default()
        };
        (m, r, s)
    }

    fn run(m: &Mem, env: &Env, r: &mut kvm_regs, s: &mut kvm_sregs, code: &[u8]) -> Fixup {
        m.put(r.rip, code);
        fix(m, env, r, s)
    }

    #[test]
    fn lsl_cpunode_segment_loads_limit_and_sets_zf() {
        // Linux's paranoid entry: movl $__CPUNODE_SEG, %eax; lsl %eax, %eax.
        let (m, mut r, mut s) = machine(64);
        r.rax = 0x7b;
        assert_eq!(
            run(&m, &Env::new(), &mut r, &mut s, &[0x0f, 0x03, 0xc0]),
            Fixup::Resume
        );
        assert_eq!(r.rax, 0x1003);
        assert_ne!(r.rflags & RFLAGS_ZF, 0);
        assert_eq!(r.rip, CODE + 3);
    }

    #[test]
    fn lsl_null_or_beyond_limit_clears_zf_and_keeps_destination() {
        for sel in [0u64, 3, 0x80 | 3, 0xfff8] {
            let (m, mut r, mut s) = machine(64);
            r.rax = 0x1234_0000_0000_0000 | sel;
            r.rflags |= RFLAGS_ZF;
            assert_eq!(
                run(&m, &Env::new(), &mut r, &mut s, &[0x0f, 0x03, 0xc0]),
                Fixup::Resume
            );
            assert_eq!(r.rax, 0x1234_0000_0000_0000 | sel, "selector {sel:#x}");
            assert_eq!(r.rflags & RFLAGS_ZF, 0);
        }
    }

    #[test]
    fn lsl_granular_limit_scaled_and_privilege_checked() {
        let (m, mut r, mut s) = machine(32);
        // Kernel data (DPL 0, G=1): visible with RPL 0, not with RPL 3.
        r.rcx = 0x18;
        assert_eq!(
            run(&m, &Env::new(), &mut r, &mut s, &[0x0f, 0x03, 0xc1]),
            Fixup::Resume
        );
        assert_eq!(r.rax, 0xffff_ffff);
        assert_ne!(r.rflags & RFLAGS_ZF, 0);
        let (m, mut r, mut s) = machine(32);
        r.rcx = 0x1b;
        r.rax = 5;
        run(&m, &Env::new(), &mut r, &mut s, &[0x0f, 0x03, 0xc1]);
        assert_eq!((r.rax, r.rflags & RFLAGS_ZF), (5, 0));
    }

    #[test]
    fn lar_code_segment_returns_access_rights() {
        let (m, mut r, mut s) = machine(64);
        r.rcx = 0x33;
        assert_eq!(
            run(&m, &Env::new(), &mut r, &mut s, &[0x0f, 0x02, 0xc1]),
            Fixup::Resume
        );
        assert_eq!(r.rax, 0x00a0_fb00);
        assert_ne!(r.rflags & RFLAGS_ZF, 0);
    }

    #[test]
    fn lsl_real_mode_raises_ud() {
        let (m, mut r, mut s) = machine(32);
        s.cr0 = 0;
        assert_eq!(
            run(&m, &Env::new(), &mut r, &mut s, &[0x0f, 0x03, 0xc0]),
            exc(UD)
        );
        assert_eq!(r.rip, CODE);
    }

    #[test]
    fn verw_memory_operand_writable_data_sets_zf_code_clears() {
        // Linux's CPU-buffer clearing: verw of the kernel data selector.
        let (m, mut r, mut s) = machine(64);
        m.put(DATA, &0x18u16.to_le_bytes());
        assert_eq!(
            run(&m, &Env::new(), &mut r, &mut s, &[0x0f, 0x00, 0x2b]),
            Fixup::Resume
        );
        assert_ne!(r.rflags & RFLAGS_ZF, 0);
        let (m, mut r, mut s) = machine(64);
        m.put(DATA, &0x10u16.to_le_bytes());
        r.rflags |= RFLAGS_ZF;
        run(&m, &Env::new(), &mut r, &mut s, &[0x0f, 0x00, 0x2b]);
        assert_eq!(r.rflags & RFLAGS_ZF, 0);
        // verr of the readable code segment: ZF=1.
        let (m, mut r, mut s) = machine(64);
        r.rax = 0x10;
        run(&m, &Env::new(), &mut r, &mut s, &[0x0f, 0x00, 0xe0]);
        assert_ne!(r.rflags & RFLAGS_ZF, 0);
    }

    #[test]
    fn verw_unmapped_operand_page_faults() {
        let (m, mut r, mut s) = machine(64);
        r.rbx = 0x4000_0000;
        assert!(matches!(
            run(&m, &Env::new(), &mut r, &mut s, &[0x0f, 0x00, 0x2b]),
            Fixup::PageFault(_)
        ));
    }

    #[test]
    fn sse_pxor_paddd_pshufd_computed() {
        let (m, mut r, mut s) = machine(64);
        let env = Env::new();
        env.set_xmm(0, from_dwords([1, 2, 3, 0xffff_ffff]));
        env.set_xmm(1, from_dwords([0x10, 0x20, 0x30, 2]));
        // paddd xmm0, xmm1
        assert_eq!(
            run(&m, &env, &mut r, &mut s, &[0x66, 0x0f, 0xfe, 0xc1]),
            Fixup::Resume
        );
        assert_eq!(dwords(&env.xmm(0).unwrap()), [0x11, 0x22, 0x33, 1]);
        // pshufd xmm2, xmm0, 0x1b (reverse)
        r.rip = CODE;
        run(&m, &env, &mut r, &mut s, &[0x66, 0x0f, 0x70, 0xd0, 0x1b]);
        assert_eq!(dwords(&env.xmm(2).unwrap()), [1, 0x33, 0x22, 0x11]);
        // pxor xmm0, [rbx] with [rbx] = xmm0's value: zero.
        m.put(DATA, &env.xmm(0).unwrap());
        r.rip = CODE;
        run(&m, &env, &mut r, &mut s, &[0x66, 0x0f, 0xef, 0x03]);
        assert_eq!(env.xmm(0).unwrap(), [0; 16]);
    }

    #[test]
    fn sse_misaligned_operand_gp_and_ts_nm_and_no_osfxsr_ud() {
        let (m, mut r, mut s) = machine(64);
        r.rbx = DATA + 8;
        assert_eq!(
            run(&m, &Env::new(), &mut r, &mut s, &[0x66, 0x0f, 0xef, 0x03]),
            gp0()
        );
        let (m, mut r, mut s) = machine(64);
        s.cr0 |= CR0_TS;
        assert_eq!(
            run(&m, &Env::new(), &mut r, &mut s, &[0x66, 0x0f, 0xef, 0xc1]),
            exc(NM)
        );
        let (m, mut r, mut s) = machine(64);
        s.cr4 &= !CR4_OSFXSR;
        assert_eq!(
            run(&m, &Env::new(), &mut r, &mut s, &[0x66, 0x0f, 0xef, 0xc1]),
            exc(UD)
        );
    }

    #[test]
    fn sse_shifts_and_unpack_and_pshufb() {
        let a = from_dwords([0x8000_0001, 2, 3, 4]);
        let b = from_dwords([5, 6, 7, 8]);
        assert_eq!(
            dwords(&sse_compute(SseOp::ShiftLeftD, a, [0; 16], 1)),
            [2, 4, 6, 8]
        );
        assert_eq!(
            dwords(&sse_compute(SseOp::ShiftRightD, a, [0; 16], 40)),
            [0; 4]
        );
        assert_eq!(
            dwords(&sse_compute(SseOp::UnpackLowD, a, b, 0)),
            [0x8000_0001, 5, 2, 6]
        );
        assert_eq!(
            dwords(&sse_compute(SseOp::UnpackLowQ, a, b, 0)),
            [0x8000_0001, 2, 5, 6]
        );
        let mut sel = [0x80u8; 16];
        sel[0] = 4;
        let r = sse_compute(SseOp::ShuffleB, a, sel, 0);
        assert_eq!(r[0], 2);
        assert!(r[1..].iter().all(|&x| x == 0));
    }

    #[test]
    fn ucomiss_orders_and_flags_nan_comiss_invalid_unmasked_raises_xm() {
        let (m, mut r, mut s) = machine(64);
        s.cr4 |= 1 << 10;
        let env = Env::new();
        let set = |n: usize, v: u32| {
            let mut x = [0u8; 16];
            x[..4].copy_from_slice(&v.to_le_bytes());
            env.set_xmm(n, x);
        };
        let flags = |r: &kvm_regs| r.rflags & 0x45;
        // ucomiss xmm0, xmm1
        let code = [0x0f, 0x2e, 0xc1];
        for (a, b, want) in [
            (1.0f32, 2.0f32, 0x01),
            (2.0, 1.0, 0x00),
            (-0.0, 0.0, 0x40),
            (f32::NAN, 1.0, 0x45),
        ] {
            set(0, a.to_bits());
            set(1, b.to_bits());
            r.rip = CODE;
            assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
            assert_eq!(flags(&r), want, "{a} vs {b}");
        }
        assert_eq!(env.mxcsr() & 1, 0, "a quiet NaN is not invalid for ucomiss");
        // comiss with a QNaN and IE unmasked: #XM, MXCSR.IE set.
        env.set_mxcsr(0x1f80 & !(1 << 7));
        r.rip = CODE;
        assert_eq!(run(&m, &env, &mut r, &mut s, &[0x0f, 0x2f, 0xc1]), exc(19));
        assert_eq!(env.mxcsr() & 1, 1);
        assert_eq!(r.rip, CODE);
    }

    #[test]
    fn divss_quotient_and_mxcsr_flags() {
        let (m, mut r, mut s) = machine(64);
        let env = Env::new();
        let set = |n: usize, v: f32| {
            let mut x = env.xmm(n).unwrap();
            x[..4].copy_from_slice(&v.to_bits().to_le_bytes());
            env.set_xmm(n, x);
        };
        let get = || {
            f32::from_bits(u32::from_le_bytes(
                env.xmm(0).unwrap()[..4].try_into().unwrap(),
            ))
        };
        // divss xmm0, xmm1
        let code = [0xf3, 0x0f, 0x5e, 0xc1];
        let mut upper = [0u8; 16];
        upper[4..].fill(0xab);
        env.set_xmm(0, upper);
        set(0, 6.0);
        set(1, 4.0);
        assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
        assert_eq!(get(), 1.5);
        assert_eq!(&env.xmm(0).unwrap()[4..], &[0xab; 12]);
        assert_eq!(env.mxcsr(), 0x1f80);
        set(1, 3.0);
        r.rip = CODE;
        run(&m, &env, &mut r, &mut s, &code);
        assert_eq!((get(), env.mxcsr()), (0.5, 0x1f80), "exact: no PE");
        set(0, 1.0);
        r.rip = CODE;
        run(&m, &env, &mut r, &mut s, &code);
        assert_eq!(
            (get(), env.mxcsr()),
            (1.0f32 / 3.0, 0x1f80 | 0x20),
            "inexact: PE"
        );
        set(1, 0.0);
        r.rip = CODE;
        run(&m, &env, &mut r, &mut s, &code);
        assert_eq!((get(), env.mxcsr() & 4), (f32::INFINITY, 4), "x/0: ZE");
        // Unmasked zero divide: MXCSR.ZE, destination kept, #XM.
        set(0, 1.0);
        env.set_mxcsr(0x1d80);
        r.rip = CODE;
        s.cr4 |= 1 << 10;
        assert_eq!(
            run(&m, &env, &mut r, &mut s, &code),
            Fixup::Exception {
                vector: 19,
                error_code: None
            }
        );
        assert_eq!((get(), env.mxcsr()), (1.0, 0x1d84));
        assert_eq!(r.rip, CODE);
    }

    #[test]
    fn cmpxchg16b_equal_stores_unequal_loads() {
        let (m, mut r, mut s) = machine(64);
        m.put(DATA, &[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
        (r.rax, r.rdx, r.rbx, r.rcx) = (1, 2, 0x33, 0x44);
        r.rbx = DATA;
        // cmpxchg16b [rbx] compares with RDX:RAX and stores RCX:RBX; here
        // RBX is the address too, so the stored low half is DATA.
        let code = [0x48, 0x0f, 0xc7, 0x0b];
        assert_eq!(run(&m, &Env::new(), &mut r, &mut s, &code), Fixup::Resume);
        assert_ne!(r.rflags & RFLAGS_ZF, 0);
        assert_eq!(m.get(DATA, 8), DATA.to_le_bytes());
        assert_eq!(m.get(DATA + 8, 8), 0x44u64.to_le_bytes());
        r.rip = CODE;
        (r.rax, r.rdx) = (0, 0);
        run(&m, &Env::new(), &mut r, &mut s, &code);
        assert_eq!(r.rflags & RFLAGS_ZF, 0);
        assert_eq!((r.rax, r.rdx), (DATA, 0x44));
        r.rip = CODE;
        r.rbx = DATA + 8;
        assert_eq!(run(&m, &Env::new(), &mut r, &mut s, &code), gp0());
    }

    #[test]
    fn shlx_shrx_shift_by_masked_count_without_flags() {
        let (m, mut r, mut s) = machine(64);
        (r.rbx, r.rcx) = (0x8000_0001, 33);
        // shlx eax, ebx, ecx (count 33 & 31 = 1)
        let f = r.rflags;
        run(
            &m,
            &Env::new(),
            &mut r,
            &mut s,
            &[0xc4, 0xe2, 0x71, 0xf7, 0xc3],
        );
        assert_eq!((r.rax, r.rflags), (2, f));
    }

    #[test]
    fn vex_without_osxsave_or_avx_state_raises_ud() {
        // vpxor xmm0, xmm0, xmm0
        let (m, mut r, mut s) = machine(64);
        s.cr4 &= !CR4_OSXSAVE;
        assert_eq!(
            run(&m, &Env::new(), &mut r, &mut s, &[0xc5, 0xf9, 0xef, 0xc0]),
            exc(UD)
        );
        let (m, mut r, mut s) = machine(64);
        let mut env = Env::new();
        env.xcr0 = 3;
        assert_eq!(
            run(&m, &env, &mut r, &mut s, &[0xc5, 0xf9, 0xef, 0xc0]),
            exc(UD)
        );
    }

    #[test]
    fn fnclex_clears_exception_flags_emms_empties_tags() {
        let (m, mut r, mut s) = machine(64);
        let env = Env::new();
        env.fpu.borrow_mut().fsw = 0x80bf | 0x3800;
        env.fpu.borrow_mut().ftwx = 0xff;
        assert_eq!(run(&m, &env, &mut r, &mut s, &[0xdb, 0xe2]), Fixup::Resume);
        assert_eq!(env.fpu_status(), 0x3800);
        r.rip = CODE;
        run(&m, &env, &mut r, &mut s, &[0x0f, 0x77]);
        assert_eq!(env.fpu.borrow().ftwx, 0);
        s.cr0 |= CR0_TS;
        r.rip = CODE;
        assert_eq!(run(&m, &env, &mut r, &mut s, &[0x0f, 0x77]), exc(NM));
    }

    /// Every form on the checked-in list of this host's failures (written
    /// by `xenkvm probe --coverage --write-list`) gets a fix-up here,
    /// in a machine set up like the probe's (operand at RBX, XCR0 with
    /// x87/SSE/AVX/AVX-512), except the known gaps.
    #[test]
    fn fixup_every_listed_host_failure_handled_except_known_gaps() {
        let list = include_str!("../../../tests/data/kvm-emulation-failures.txt");
        let mut handled = 0;
        for line in list
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (bits, code, _, bytes) = crate::kvm::coverage::parse_list_line(line)
                .unwrap_or_else(|| panic!("bad list line {line:?}"));
            let (m, mut r, mut s) = machine(bits);
            let mut env = crate::arch::x86::testenv::Env::new();
            env.xcr0 = 0xe7;
            r.rax = 0x1100;
            r.rcx = 8;
            m.put(r.rip, &bytes);
            let insn = crate::arch::x86::fetch(&m, &r, &s)
                .unwrap_or_else(|_| panic!("{line}: does not decode"));
            assert_eq!(format!("{:?}", insn.code()), code, "{line}");
            let f = fix(&m, &env, &mut r, &mut s);
            if not_emulated_yet(&insn) {
                continue;
            }
            assert!(!matches!(f, Fixup::Unhandled(_)), "{line}: {f:?}");
            handled += 1;
        }
        assert!(handled > 0, "the list names no handled form");
    }

    proptest! {
        /// Any 15 guest bytes at RIP, any registers and any GDT contents:
        /// the fix-up returns (a Fixup) and never panics.
        #[test]
        fn fixup_arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 15),
            gdt in proptest::collection::vec(any::<u8>(), 128),
            regs in proptest::array::uniform8(any::<u64>()),
            long in any::<bool>(),
            cr0 in prop_oneof![Just(0x11u64), Just(0x1du64), Just(0x15u64), Just(0u64)],
        ) {
            let (m, mut r, mut s) = machine(if long { 64 } else { 32 });
            m.put(GDT, &gdt);
            s.cr0 = cr0 | if long { 1 } else { 0 };
            r.rax = regs[0];
            r.rcx = regs[1];
            r.rdx = regs[2];
            r.rbx = regs[3];
            r.rsi = regs[4];
            r.rdi = regs[5];
            r.rbp = regs[6];
            r.rsp = regs[7];
            let _ = run(&m, &Env::new(), &mut r, &mut s, &bytes);
            // Again with the whole XSAVE state and AVX-512 enabled, so the
            // XSAVE, x87 and AVX handlers see the bytes too.
            let mut env = crate::arch::x86::testenv::Env::new();
            env.xcr0 = 0xe7;
            m.put(r.rip, &bytes);
            let _ = fix(&m, &env, &mut r, &mut s);
        }

        /// The forms handled here, with random operands: no panic.
        #[test]
        fn fixup_handled_forms_random_operands_never_panic(
            form in prop_oneof![
                Just(vec![0x0fu8, 0x03]), Just(vec![0x48, 0x0f, 0x03]), Just(vec![0x0f, 0x02]),
                Just(vec![0x0f, 0x00]), Just(vec![0x48, 0x0f, 0xc7]), Just(vec![0x66, 0x0f, 0xef]),
                Just(vec![0x66, 0x0f, 0x70]), Just(vec![0x66, 0x0f, 0x38, 0x00]),
                Just(vec![0x66, 0x0f, 0x72]), Just(vec![0xc4, 0xe2, 0x71, 0xf7]),
            ],
            tail in proptest::collection::vec(any::<u8>(), 8),
            regs in proptest::array::uniform4(any::<u64>()),
            sel in any::<u16>(),
        ) {
            let (m, mut r, mut s) = machine(64);
            let mut code = form.clone();
            code.extend_from_slice(&tail);
            (r.rax, r.rbx, r.rcx, r.rdx) = (regs[0], regs[1], regs[2], regs[3]);
            m.put(DATA, &sel.to_le_bytes());
            let _ = run(&m, &Env::new(), &mut r, &mut s, &code);
        }
    }
}
