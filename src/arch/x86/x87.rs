//! x87 arithmetic and load/store forms this host's KVM cannot emulate,
//! computed exactly in 80-bit extended precision:
//! - `fadd`, `fsub`, `fsubr`, `fmul`, `fdiv`, `fdivr` with an m32fp/m64fp
//!   operand or ST(i) (and the popping `...p` forms);
//! - `fld` m32fp/m64fp/m80fp/ST(i), `fild` m16/m32/m64;
//! - `fist`/`fistp` m16/m32, `fistp` m64.
//!
//! The arithmetic is `rustc_apfloat` (the rust-lang port of LLVM's APFloat,
//! maintained for rustc and Miri): it has the x87 80-bit format
//! (`X87DoubleExtended`), the four rounding modes and IEEE status flags, so
//! nothing here does floating-point rounding by hand. The soft-float C
//! ports on crates.io (`softfloat-*`) are either unmaintained or wrap C.
//! What the x87 adds on top is done here from the SDM (Vol. 1 ch. 8,
//! Vol. 2 per instruction): the register stack (TOP, the abridged tag
//! word, registers stored in ST order as FXSAVE does), stack overflow and
//! underflow (IE+SF, C1 = 1 / 0), the x87 NaN rules (an SNaN is quieted;
//! of two NaNs the larger significand wins; a QNaN beats an SNaN),
//! unsupported encodings (pseudo-NaN/-infinity, unnormals) as invalid,
//! the denormal-operand flag, C1 = "rounded up" when inexact, tininess
//! after rounding for UE, FOP/FIP/FDP, and #MF for an unmasked exception
//! left pending (FSW.ES) by an earlier instruction.
//!
//! Masked exceptions get the SDM's masked response. Unmasked invalid,
//! denormal and zero-divide set their flag, ES and B and leave the operands
//! unchanged (the #MF comes at the next waiting x87 instruction, as on the
//! CPU); unmasked precision stores the result and sets ES. Refused by name
//! (the guest stops): unmasked overflow/underflow (the CPU stores a result
//! scaled by 2^±24576), precision control other than 64 bits (FCW.PC != 3;
//! Linux and Xen guests run with 0x37f), and other x87 forms.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use rustc_apfloat::ieee::{Double, Single, X87DoubleExtended as Ext};
use rustc_apfloat::{Float, FloatConvert, Round, Status};

use crate::arch::x86::{
    cpl, operand_address, read_linear, write_linear, Access, EmuEnv, Fixup, Paging, PhysMem, MF,
};

/// The x87 "real indefinite": the QNaN an invalid masked operation returns.
pub const INDEFINITE: u128 = 0xffff_c000_0000_0000_0000;
const MASK80: u128 = (1 << 80) - 1;

/// FSW/FCW exception bits.
const IE: u16 = 1;
const DE: u16 = 1 << 1;
const ZE: u16 = 1 << 2;
const OE: u16 = 1 << 3;
const UE: u16 = 1 << 4;
const PE: u16 = 1 << 5;
const SF: u16 = 1 << 6;
const ES: u16 = 1 << 7;
const C1: u16 = 1 << 9;
const B: u16 = 1 << 15;

/// What an 80-bit register holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Zero,
    Denormal,
    Normal,
    Inf,
    QNan,
    SNan,
    /// Pseudo-NaN, pseudo-infinity, unnormal: invalid operands.
    Unsupported,
}

fn class(b: u128) -> Class {
    let exp = (b >> 64) & 0x7fff;
    let sig = b as u64;
    let j = sig >> 63 == 1;
    match exp {
        0 if sig == 0 => Class::Zero,
        0 => Class::Denormal, // also pseudo-denormals (J set)
        0x7fff if !j => Class::Unsupported,
        0x7fff if sig << 1 == 0 => Class::Inf,
        0x7fff if sig & (1 << 62) != 0 => Class::QNan,
        0x7fff => Class::SNan,
        _ if !j => Class::Unsupported,
        _ => Class::Normal,
    }
}

fn is_nan(c: Class) -> bool {
    matches!(c, Class::QNan | Class::SNan)
}

fn quiet(b: u128) -> u128 {
    b | (1 << 62)
}

/// An m32fp/m64fp operand in 80 bits (exact), and whether it was a
/// denormal in its own format. NaNs keep their payload and signalling bit.
fn widen(bits: u64, double: bool) -> (u128, bool) {
    let (sign, exp_all_ones, frac, denormal) = if double {
        let e = (bits >> 52) & 0x7ff;
        let f = bits & ((1 << 52) - 1);
        (bits >> 63, e == 0x7ff, f << 11, e == 0 && f != 0)
    } else {
        let b = bits as u32;
        let e = (b >> 23) & 0xff;
        let f = u64::from(b & ((1 << 23) - 1));
        (u64::from(b >> 31), e == 0xff, f << 40, e == 0 && f != 0)
    };
    if exp_all_ones && frac != 0 {
        let v = (u128::from(sign) << 79) | (0x7fff << 64) | u128::from((1 << 63) | frac);
        return (v, false);
    }
    let v: Ext = if double {
        Double::from_bits(u128::from(bits))
            .convert(&mut false)
            .value
    } else {
        Single::from_bits(u128::from(bits as u32))
            .convert(&mut false)
            .value
    };
    (v.to_bits() & MASK80, denormal)
}

fn rounding(fcw: u16) -> Round {
    match (fcw >> 10) & 3 {
        0 => Round::NearestTiesToEven,
        1 => Round::TowardNegative,
        2 => Round::TowardPositive,
        _ => Round::TowardZero,
    }
}

/// The x87 result of an operation with a NaN operand: the quieted NaN, the
/// larger significand of two (the destination on a tie), a QNaN before an
/// SNaN.
fn nan_result(a: u128, b: u128) -> u128 {
    let (ca, cb) = (class(a), class(b));
    match (is_nan(ca), is_nan(cb)) {
        (true, false) => quiet(a),
        (false, true) => quiet(b),
        _ => match (ca, cb) {
            (Class::QNan, Class::SNan) => a,
            (Class::SNan, Class::QNan) => b,
            _ if (b as u64 & !(1 << 62)) > (a as u64 & !(1 << 62)) => quiet(b),
            _ => quiet(a),
        },
    }
}

/// The outcome of one x87 computation: the value to store (None when an
/// unmasked pre-computation exception leaves the destination alone), the
/// exception flags raised and C1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub value: Option<u128>,
    pub flags: u16,
    pub c1: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

fn apply(op: ArithOp, a: Ext, b: Ext, r: Round) -> rustc_apfloat::StatusAnd<Ext> {
    match op {
        ArithOp::Add => a.add_r(b, r),
        ArithOp::Sub => a.sub_r(b, r),
        ArithOp::Mul => a.mul_r(b, r),
        ArithOp::Div => a.div_r(b, r),
    }
}

/// `a op b` in 80 bits under `fcw` (rounding control and masks), with the
/// denormal-operand flag already known for operands from memory
/// (`denormal_src`). Precision control must be 64 bits (checked by the
/// caller).
pub fn arith(op: ArithOp, a: u128, b: u128, denormal_src: bool, fcw: u16) -> Outcome {
    let (a, b) = (a & MASK80, b & MASK80);
    let (ca, cb) = (class(a), class(b));
    let invalid = |value| Outcome {
        value: (fcw & IE != 0).then_some(value),
        flags: IE,
        c1: false,
    };
    if ca == Class::Unsupported || cb == Class::Unsupported {
        return invalid(INDEFINITE);
    }
    if is_nan(ca) || is_nan(cb) {
        let v = nan_result(a, b);
        if ca == Class::SNan || cb == Class::SNan {
            return invalid(v);
        }
        return Outcome {
            value: Some(v),
            flags: 0,
            c1: false,
        };
    }
    let sign_a = a >> 79 == 1;
    let sign_b = b >> 79 == 1;
    let bad = match op {
        ArithOp::Add => ca == Class::Inf && cb == Class::Inf && sign_a != sign_b,
        ArithOp::Sub => ca == Class::Inf && cb == Class::Inf && sign_a == sign_b,
        ArithOp::Mul => {
            (ca == Class::Zero && cb == Class::Inf) || (ca == Class::Inf && cb == Class::Zero)
        }
        ArithOp::Div => {
            (ca == Class::Zero && cb == Class::Zero) || (ca == Class::Inf && cb == Class::Inf)
        }
    };
    if bad {
        return invalid(INDEFINITE);
    }
    // Zero divide (a finite dividend): no denormal flag, as the CPU does.
    if op == ArithOp::Div && cb == Class::Zero && ca != Class::Inf {
        let inf = (u128::from(sign_a != sign_b) << 79) | (0x7fff << 64) | (1 << 63);
        return Outcome {
            value: (fcw & ZE != 0).then_some(inf),
            flags: ZE,
            c1: false,
        };
    }
    let mut flags = 0;
    if denormal_src || ca == Class::Denormal || cb == Class::Denormal {
        flags |= DE;
        if fcw & DE == 0 {
            return Outcome {
                value: None,
                flags,
                c1: false,
            };
        }
    }
    let (fa, fb) = (Ext::from_bits(a), Ext::from_bits(b));
    let rc = rounding(fcw);
    let r = apply(op, fa, fb, rc);
    let value = r.value;
    // Overflow is the rounded result, with an unbounded exponent, reaching
    // 2^16384. APFloat flags it only when it returns infinity, not when a
    // directed rounding gives the largest finite value: decide it on the
    // operation scaled down by 2 (exact, except that a denormal operand of
    // an addition is halved away from zero so it still counts as sticky).
    let finite = ca != Class::Inf && cb != Class::Inf;
    if finite && (value.is_infinite() || value.abs().bitwise_eq(Ext::largest())) {
        let halve = |x: Ext| {
            let away = if x.is_negative() {
                Round::TowardNegative
            } else {
                Round::TowardPositive
            };
            x.scalbn_r(-1, away)
        };
        let (sa, sb) = match op {
            ArithOp::Add | ArithOp::Sub => (halve(fa), halve(fb)),
            ArithOp::Mul | ArithOp::Div => (fa.scalbn(-1), fb),
        };
        let half = apply(op, sa, sb, rc).value.abs();
        if half >= Ext::from_u128(1).value.scalbn(16383) {
            flags |= OE | PE;
        }
    }
    if r.status.contains(Status::INEXACT) {
        flags |= PE;
        // APFloat detects tininess on the denormalised result; the x87
        // after rounding with an unbounded exponent. They differ only when
        // rounding reached the smallest normal: redo it scaled up.
        if !r.status.contains(Status::UNDERFLOW) && value.is_smallest_normalized() {
            let k = 256;
            let (sa, sb) = match op {
                ArithOp::Add | ArithOp::Sub => (fa.scalbn(k), fb.scalbn(k)),
                ArithOp::Mul | ArithOp::Div => (fa.scalbn(k), fb),
            };
            let wide = apply(op, sa, sb, rc).value.abs();
            if wide < Ext::smallest_normalized().scalbn(k) {
                flags |= UE;
            }
        }
    }
    if r.status.contains(Status::UNDERFLOW) {
        flags |= UE | PE;
    }
    // Unmasked, UE is raised for any tiny result, exact or not.
    if fcw & UE == 0 && (value.is_denormal() || flags & UE != 0) {
        flags |= UE;
    }
    let mut c1 = false;
    if flags & PE != 0 {
        let toward_zero = apply(op, fa, fb, Round::TowardZero).value;
        c1 = !value.bitwise_eq(toward_zero);
    }
    Outcome {
        value: Some(value.to_bits() & MASK80),
        flags,
        c1,
    }
}

/// FIST/FISTP: ST(0) to a `width`-bit integer under the rounding control.
/// Invalid (NaN, infinity, out of range): IE, masked: the integer
/// indefinite (the most negative value). Returns the integer's bits.
pub fn to_int(v: u128, width: usize, fcw: u16) -> (Option<u64>, u16, bool) {
    let indefinite = 1u64 << (width - 1);
    let invalid = || ((fcw & IE != 0).then_some(indefinite), IE, false);
    let c = class(v);
    if matches!(
        c,
        Class::Unsupported | Class::QNan | Class::SNan | Class::Inf
    ) {
        return invalid();
    }
    let x = Ext::from_bits(v & MASK80);
    let mut exact = true;
    let r = x.to_i128_r(width, rounding(fcw), &mut exact);
    if r.status.contains(Status::INVALID_OP) {
        return invalid();
    }
    let mut flags = 0;
    let mut c1 = false;
    if r.status.contains(Status::INEXACT) {
        flags |= PE;
        let back = Ext::from_i128(r.value).value;
        c1 = back.abs() > x.abs();
    }
    let mask = if width == 64 {
        u64::MAX
    } else {
        (1 << width) - 1
    };
    (Some(r.value as u64 & mask), flags, c1)
}

/// A 16/32/64-bit integer in 80 bits (always exact).
pub fn from_int(i: i64) -> u128 {
    Ext::from_i128(i128::from(i)).value.to_bits() & MASK80
}

/// The x87 register stack inside a `kvm_fpu` (FXSAVE layout: `fpr[i]` is
/// ST(i); `ftwx` has one bit per physical register, 1 = not empty).
struct Stack<'a>(&'a mut kvm_fpu);

impl Stack<'_> {
    fn top(&self) -> u16 {
        (self.0.fsw >> 11) & 7
    }
    fn set_top(&mut self, t: u16) {
        self.0.fsw = (self.0.fsw & !(7 << 11)) | ((t & 7) << 11);
    }
    fn phys(&self, i: usize) -> u8 {
        ((self.top() as usize + i) & 7) as u8
    }
    fn empty(&self, i: usize) -> bool {
        self.0.ftwx & (1 << self.phys(i)) == 0
    }
    fn get(&self, i: usize) -> u128 {
        let mut b = [0u8; 16];
        b[..10].copy_from_slice(&self.0.fpr[i & 7][..10]);
        u128::from_le_bytes(b)
    }
    fn set(&mut self, i: usize, v: u128) {
        let b = v.to_le_bytes();
        self.0.fpr[i & 7] = [0; 16];
        self.0.fpr[i & 7][..10].copy_from_slice(&b[..10]);
        self.0.ftwx |= 1 << self.phys(i);
    }
    fn push(&mut self, v: u128) {
        self.0.fpr.rotate_right(1);
        self.set_top(self.top().wrapping_sub(1));
        self.set(0, v);
    }
    fn pop(&mut self) {
        self.0.ftwx &= !(1 << self.phys(0));
        self.0.fpr[0] = [0; 16];
        self.0.fpr.rotate_left(1);
        self.set_top(self.top() + 1);
    }
}

/// Whether `insn` is an x87 form handled here.
pub fn handles(insn: &Instruction) -> bool {
    use Mnemonic::*;
    matches!(
        insn.mnemonic(),
        Fadd | Faddp
            | Fsub
            | Fsubp
            | Fsubr
            | Fsubrp
            | Fmul
            | Fmulp
            | Fdiv
            | Fdivp
            | Fdivr
            | Fdivrp
            | Fld
            | Fild
            | Fist
            | Fistp
    ) && (0..insn.op_count()).all(|n| match insn.op_kind(n) {
        OpKind::Memory => true,
        OpKind::Register => insn.op_register(n).is_st(),
        _ => false,
    })
}

fn st_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::ST0 as usize) & 7
}

fn unhandled(what: String) -> Fixup {
    Fixup::Unhandled(what)
}

/// Emulates an x87 form (CR0.EM and CR0.TS are clear: the caller raised
/// #NM otherwise). The caller advances RIP.
pub fn emulate(
    mem: &dyn PhysMem,
    env: &dyn EmuEnv,
    regs: &kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    if !handles(insn) {
        return Err(unhandled(format!("x87 form {:?}", insn.code())));
    }
    let mut f = env
        .fpu()
        .ok_or_else(|| unhandled("x87 state unavailable".into()))?;
    if f.fsw & ES != 0 {
        return Err(Fixup::Exception {
            vector: MF,
            error_code: None,
        });
    }
    let p = Paging::from_sregs(s);
    let user = cpl(s) == 3;
    let mem_op = (0..insn.op_count()).find(|&n| insn.op_kind(n) == OpKind::Memory);
    let lin = match mem_op {
        Some(n) => Some(operand_address(regs, s, insn, n)?),
        None => None,
    };
    let load = |size: usize| -> Result<u128, Fixup> {
        let mut b = [0u8; 16];
        let at = lin.ok_or_else(|| unhandled("x87 memory operand".into()))?;
        read_linear(mem, &p, at, &mut b[..size], Access { write: false, user })
            .map_err(Fixup::PageFault)?;
        Ok(u128::from_le_bytes(b))
    };
    let size = insn.memory_size().size();
    let fcw = f.fcw;
    let m = insn.mnemonic();
    // (flags, c1, whether the result was stored)
    let (flags, c1) = match m {
        Mnemonic::Fld | Mnemonic::Fild => {
            let (value, mut flags) = if m == Mnemonic::Fild {
                let raw = load(size)? as u64;
                let i = match size {
                    2 => i64::from(raw as u16 as i16),
                    4 => i64::from(raw as u32 as i32),
                    _ => raw as i64,
                };
                (from_int(i), 0)
            } else if let Some(r) = (mem_op.is_none()).then(|| insn.op0_register()) {
                let st = Stack(&mut f);
                if st.empty(st_index(r)) {
                    (INDEFINITE, IE | SF)
                } else {
                    (st.get(st_index(r)), 0)
                }
            } else if size == 10 {
                (load(10)? & MASK80, 0)
            } else {
                let (v, den) = widen(load(size)? as u64, size == 8);
                match class(v) {
                    Class::SNan => (quiet(v), IE),
                    _ if den => (v, DE),
                    _ => (v, 0),
                }
            };
            let mut st = Stack(&mut f);
            let overflow = !st.empty(7);
            if overflow {
                flags = IE | SF;
            }
            let masked = flags & !fcw & 0x3f == 0;
            if masked {
                st.push(if overflow { INDEFINITE } else { value });
            }
            (flags, overflow)
        }
        Mnemonic::Fist | Mnemonic::Fistp => {
            let width = size * 8;
            if !matches!(width, 16 | 32 | 64) {
                return Err(unhandled(format!("{:?}", insn.code())));
            }
            let mut st = Stack(&mut f);
            let (int, flags, c1) = if st.empty(0) {
                let ind = 1u64 << (width - 1);
                ((fcw & IE != 0).then_some(ind), IE | SF, false)
            } else {
                to_int(st.get(0), width, fcw)
            };
            if let Some(v) = int {
                let at = lin.ok_or_else(|| unhandled("fist operand".into()))?;
                write_linear(
                    mem,
                    &p,
                    at,
                    &v.to_le_bytes()[..size],
                    Access { write: true, user },
                )
                .map_err(Fixup::PageFault)?;
                if m == Mnemonic::Fistp {
                    st.pop();
                }
            }
            (flags, c1)
        }
        _ => {
            if (fcw >> 8) & 3 != 3 {
                return Err(unhandled(format!(
                    "{:?} with x87 precision control {} (FCW {fcw:#x})",
                    insn.code(),
                    (fcw >> 8) & 3
                )));
            }
            let op = match m {
                Mnemonic::Fadd | Mnemonic::Faddp => ArithOp::Add,
                Mnemonic::Fmul | Mnemonic::Fmulp => ArithOp::Mul,
                Mnemonic::Fsub | Mnemonic::Fsubp | Mnemonic::Fsubr | Mnemonic::Fsubrp => {
                    ArithOp::Sub
                }
                _ => ArithOp::Div,
            };
            let reverse = matches!(
                m,
                Mnemonic::Fsubr | Mnemonic::Fsubrp | Mnemonic::Fdivr | Mnemonic::Fdivrp
            );
            let pop = matches!(
                m,
                Mnemonic::Faddp
                    | Mnemonic::Fsubp
                    | Mnemonic::Fsubrp
                    | Mnemonic::Fmulp
                    | Mnemonic::Fdivp
                    | Mnemonic::Fdivrp
            );
            // Destination register and source (register or memory).
            let regs_st: Vec<usize> = (0..insn.op_count())
                .filter(|&n| insn.op_kind(n) == OpKind::Register)
                .map(|n| st_index(insn.op_register(n)))
                .collect();
            let dst = regs_st.first().copied().unwrap_or(0);
            let (src_val, src_den, src_reg) = if mem_op.is_some() {
                let (v, den) = widen(load(size)? as u64, size == 8);
                (Some(v), den, None)
            } else {
                let sr = match regs_st.get(1) {
                    Some(&r) => r,
                    // One-operand register forms: ST(0) op ST(i) into ST(i).
                    None => 0,
                };
                (None, false, Some(sr))
            };
            let mut st = Stack(&mut f);
            let underflow = st.empty(dst) || src_reg.is_some_and(|r| st.empty(r));
            let out = if underflow {
                Outcome {
                    value: (fcw & IE != 0).then_some(INDEFINITE),
                    flags: IE | SF,
                    c1: false,
                }
            } else {
                let d = st.get(dst);
                let sv = src_val.unwrap_or_else(|| st.get(src_reg.unwrap_or(0)));
                let (a, b) = if reverse { (sv, d) } else { (d, sv) };
                arith(op, a, b, src_den, fcw)
            };
            let unmasked = out.flags & !fcw & 0x3f;
            if unmasked & (OE | UE) != 0 {
                return Err(unhandled(format!(
                    "{:?} with unmasked x87 overflow/underflow (FCW {fcw:#x})",
                    insn.code()
                )));
            }
            if let Some(v) = out.value {
                st.set(dst, v);
                if pop {
                    st.pop();
                }
            }
            (out.flags, out.c1)
        }
    };
    f.fsw = (f.fsw & !C1) | flags | if c1 { C1 } else { 0 };
    if flags & !fcw & 0x3f != 0 {
        f.fsw |= ES | B;
    }
    // FOP (the opcode's low 3 bits and ModRM), FIP, FDP.
    let mut bytes = [0u8; 15];
    let n = insn.len().min(15);
    let rip = crate::arch::x86::linear_rip(regs, s);
    if read_linear(mem, &p, rip, &mut bytes[..n], Access { write: false, user }).is_ok() {
        if let Some(k) = bytes[..n].iter().position(|b| (0xd8..=0xdf).contains(b)) {
            if k + 1 < n {
                f.last_opcode = (u16::from(bytes[k] & 7) << 8) | u16::from(bytes[k + 1]);
            }
        }
    }
    f.last_ip = regs.rip;
    if let Some(at) = lin {
        f.last_dp = at;
    }
    if env.set_fpu(&f) {
        Ok(())
    } else {
        Err(unhandled("the host refused the x87 state".into()))
    }
}

#[cfg(test)]
mod tests;
