//! `divss` under any MXCSR: the four rounding modes, FTZ, DAZ, and masked
//! or unmasked exceptions, computed with `rustc_apfloat` (see x87.rs for
//! why that crate) and the SDM's SSE rules on top (Vol. 1 11.5, Vol. 2
//! DIVSS):
//! - DAZ turns denormal sources into zeros of the same sign (no DE);
//! - an SNaN source is invalid (IE); a NaN result is the first source if it
//!   is a NaN, else the second, quieted; 0/0 and inf/inf give the default
//!   NaN 0xffc00000 with IE;
//! - a finite nonzero dividend over zero sets ZE (and not DE, as the CPU
//!   does), otherwise a denormal source sets DE;
//! - overflow (OE) and underflow (UE: tiny after rounding with an unbounded
//!   exponent, and inexact unless UE is unmasked) and precision (PE);
//!   FTZ with UE masked flushes a tiny result to zero (UE and PE set);
//! - an unmasked exception leaves the destination alone: the flags of the
//!   stage that raised it are set in MXCSR and the CPU raises #XM (#UD
//!   without CR4.OSXMMEXCPT). Pre-computation exceptions (IE, DE, ZE) stop
//!   before the post-computation ones are looked at.

use rustc_apfloat::ieee::Single;
use rustc_apfloat::{Float, Round, Status};

pub const IE: u32 = 1;
pub const DE: u32 = 1 << 1;
pub const ZE: u32 = 1 << 2;
pub const OE: u32 = 1 << 3;
pub const UE: u32 = 1 << 4;
pub const PE: u32 = 1 << 5;
const DAZ: u32 = 1 << 6;
const FTZ: u32 = 1 << 15;
const DEFAULT_NAN: u32 = 0xffc0_0000;

/// The outcome of a scalar SSE operation: the result (None when an
/// unmasked exception keeps the destination) and the flags to set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub value: Option<u32>,
    pub flags: u32,
}

fn rounding(mxcsr: u32) -> Round {
    match (mxcsr >> 13) & 3 {
        0 => Round::NearestTiesToEven,
        1 => Round::TowardNegative,
        2 => Round::TowardPositive,
        _ => Round::TowardZero,
    }
}

fn is_nan(b: u32) -> bool {
    b & 0x7f80_0000 == 0x7f80_0000 && b & 0x007f_ffff != 0
}

fn is_snan(b: u32) -> bool {
    is_nan(b) && b & (1 << 22) == 0
}

fn is_denormal(b: u32) -> bool {
    b & 0x7f80_0000 == 0 && b & 0x007f_ffff != 0
}

fn is_zero(b: u32) -> bool {
    b & 0x7fff_ffff == 0
}

fn is_inf(b: u32) -> bool {
    b & 0x7fff_ffff == 0x7f80_0000
}

/// `a / b` (single precision bits) under `mxcsr`.
pub fn divss(a: u32, b: u32, mxcsr: u32) -> Outcome {
    let masked = |f: u32| mxcsr & (f << 7) != 0;
    let stop = |flags: u32| Outcome { value: None, flags };
    let (mut a, mut b) = (a, b);
    if is_nan(a) || is_nan(b) {
        let v = if is_nan(a) { a } else { b } | (1 << 22);
        if is_snan(a) || is_snan(b) {
            return if masked(IE) {
                Outcome {
                    value: Some(v),
                    flags: IE,
                }
            } else {
                stop(IE)
            };
        }
        return Outcome {
            value: Some(v),
            flags: 0,
        };
    }
    if mxcsr & DAZ != 0 {
        if is_denormal(a) {
            a &= 0x8000_0000;
        }
        if is_denormal(b) {
            b &= 0x8000_0000;
        }
    }
    if (is_zero(a) && is_zero(b)) || (is_inf(a) && is_inf(b)) {
        return if masked(IE) {
            Outcome {
                value: Some(DEFAULT_NAN),
                flags: IE,
            }
        } else {
            stop(IE)
        };
    }
    // Zero divide (a finite dividend): no DE, as the CPU does.
    if is_zero(b) && !is_inf(a) {
        if !masked(ZE) {
            return stop(ZE);
        }
        let sign = (a ^ b) & 0x8000_0000;
        return Outcome {
            value: Some(sign | 0x7f80_0000),
            flags: ZE,
        };
    }
    let mut flags = 0;
    if is_denormal(a) || is_denormal(b) {
        flags |= DE;
        if !masked(DE) {
            return stop(flags);
        }
    }
    let (fa, fb) = (Single::from_bits(a.into()), Single::from_bits(b.into()));
    let rc = rounding(mxcsr);
    let r = fa.div_r(fb, rc);
    let mut value = r.value;
    let finite = !is_inf(a) && !is_inf(b) && !is_zero(b);
    let mut post = 0;
    if r.status.contains(Status::INEXACT) {
        post |= PE;
    }
    if finite && (value.is_infinite() || value.abs().bitwise_eq(Single::largest())) {
        // Overflow with an unbounded exponent (see x87.rs).
        let half = fa.scalbn(-1).div_r(fb, rc).value.abs();
        if half >= Single::from_u128(1).value.scalbn(127) {
            post |= OE | PE;
        }
    }
    // Tiny after rounding with an unbounded exponent: decided on the
    // quotient scaled up, which no finite single quotient can overflow.
    let tiny = finite && !is_zero(a) && {
        let wide = fa.scalbn(64).div_r(fb, rc).value.abs();
        wide < Single::smallest_normalized().scalbn(64)
    } || value.is_denormal();
    if tiny && (post & PE != 0 || !masked(UE)) {
        post |= UE;
    }
    if post & UE != 0 && masked(UE) && mxcsr & FTZ != 0 {
        value = Single::ZERO.copy_sign(value);
        post |= PE;
    }
    flags |= post;
    if post & !((mxcsr >> 7) & 0x3f) != 0 {
        return stop(flags);
    }
    Outcome {
        value: Some(value.to_bits() as u32),
        flags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divss_rounding_modes_change_the_last_bit() {
        let (one, three) = (1.0f32.to_bits(), 3.0f32.to_bits());
        let rn = divss(one, three, 0x1f80);
        assert_eq!(
            rn,
            Outcome {
                value: Some((1.0f32 / 3.0).to_bits()),
                flags: PE
            }
        );
        let up = divss(one, three, 0x1f80 | 2 << 13);
        let down = divss(one, three, 0x1f80 | 1 << 13);
        assert_eq!(up.value.unwrap(), down.value.unwrap() + 1);
    }

    #[test]
    fn divss_ftz_daz_and_unmasked_exceptions() {
        let tiny = f32::MIN_POSITIVE.to_bits();
        let two = 2.0f32.to_bits();
        // Masked underflow: a denormal, UE|PE unless exact.
        let r = divss(tiny | 1, two, 0x1f80);
        assert_eq!(r.flags, UE | PE);
        // FTZ: zero.
        assert_eq!(divss(tiny | 1, two, 0x9f80).value, Some(0));
        // DAZ: a denormal dividend is zero, no DE.
        assert_eq!(
            divss(1, two, 0x1fc0),
            Outcome {
                value: Some(0),
                flags: 0
            }
        );
        // Unmasked ZE: no result, ZE.
        assert_eq!(
            divss(two, 0, 0x1f80 & !(ZE << 7)),
            Outcome {
                value: None,
                flags: ZE
            }
        );
        // Unmasked PE: no result, PE.
        let r = divss(1.0f32.to_bits(), 3.0f32.to_bits(), 0x1f80 & !(PE << 7));
        assert_eq!(
            r,
            Outcome {
                value: None,
                flags: PE
            }
        );
    }
}
