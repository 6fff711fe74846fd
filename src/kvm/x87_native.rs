//! The x87 emulation (`arch::x86::x87`) against this host's own x87: user
//! space runs natively here, so each case executes the same instruction on
//! the CPU (inline assembly, all exceptions masked: an unmasked one would
//! be SIGFPE) and compares the result register and the FSW flags. The
//! `unsafe` assembly lives in the KVM layer because `src/arch` forbids
//! `unsafe`.

use std::arch::asm;

use proptest::prelude::*;

use crate::arch::x86::testenv::{machine, run, Env, DATA};
use crate::arch::x86::{EmuEnv, Fixup};

/// Runs `fld tbyte [a]; <insn> [b]` natively under FCW `cw` and returns
/// ST0 (80 bits) and FSW after the operation.
macro_rules! native {
    ($insn:literal, $cw:expr, $a:expr, $b:expr) => {{
        let cw: u16 = $cw;
        let a: [u8; 16] = $a;
        let b: [u8; 8] = $b;
        let mut out = [0u8; 16];
        let mut sw: u16 = 0;
        // SAFETY: the asm reads `cw`, `a` (10 bytes), `b` (at most 8
        // bytes) and writes `sw` (2 bytes) and `out` (10 bytes), all live
        // locals of at least that size; it leaves the x87 stack empty and
        // FNINIT restores the default control word, as the Rust ABI
        // expects. All exceptions are masked by the callers' `cw`, so no
        // instruction traps.
        unsafe {
            asm!(
                "fninit",
                "fldcw word ptr [{cw}]",
                "fld tbyte ptr [{a}]",
                concat!($insn, " [{b}]"),
                "fnstsw word ptr [{sw}]",
                "fstp tbyte ptr [{o}]",
                "fninit",
                cw = in(reg) &cw,
                a = in(reg) a.as_ptr(),
                b = in(reg) b.as_ptr(),
                sw = in(reg) &mut sw,
                o = in(reg) out.as_mut_ptr(),
                options(nostack),
            );
        }
        (u128::from_le_bytes(out) & ((1 << 80) - 1), sw)
    }};
}

/// Runs `fld tbyte [a]; fistp <size> [o]` natively; the integer and FSW.
macro_rules! native_fistp {
    ($insn:literal, $cw:expr, $a:expr) => {{
        let cw: u16 = $cw;
        let a: [u8; 16] = $a;
        let mut out = [0u8; 8];
        let mut sw: u16 = 0;
        // SAFETY: as in `native!`: reads `cw` and 10 bytes of `a`, writes
        // at most 8 bytes of `out` and 2 of `sw`; the stack is left empty
        // and the exceptions are masked.
        unsafe {
            asm!(
                "fninit",
                "fldcw word ptr [{cw}]",
                "fld tbyte ptr [{a}]",
                concat!($insn, " [{o}]"),
                "fnstsw word ptr [{sw}]",
                "fninit",
                cw = in(reg) &cw,
                a = in(reg) a.as_ptr(),
                sw = in(reg) &mut sw,
                o = in(reg) out.as_mut_ptr(),
                options(nostack),
            );
        }
        (u64::from_le_bytes(out), sw)
    }};
}

/// The emulator: ST0 = `a`, FCW `cw`, `code` with its memory operand
/// (`[rbx]`) holding `b`; ST0 and FSW afterwards.
fn emulated(code: &[u8], cw: u16, a: u128, b: &[u8]) -> (u128, u16, Vec<u8>) {
    let (m, mut r, mut s) = machine(64);
    let env = Env::new();
    let mut f = env.fpu().unwrap();
    f.fcw = cw;
    f.fsw = 7 << 11;
    f.ftwx = 0x80;
    f.fpr[0][..10].copy_from_slice(&a.to_le_bytes()[..10]);
    assert!(env.set_fpu(&f));
    m.put(DATA, b);
    assert_eq!(run(&m, &env, &mut r, &mut s, code), Fixup::Resume);
    let f = env.fpu().unwrap();
    let mut st0 = [0u8; 16];
    st0[..10].copy_from_slice(&f.fpr[0][..10]);
    (u128::from_le_bytes(st0), f.fsw, m.get(DATA, 8))
}

/// FSW bits compared: the six exception flags and C1.
const FLAGS: u16 = 0x3f | (1 << 9);

/// 80-bit operands that reach every class: zeros, denormals, normals near
/// the extremes and near 1, infinities, NaNs, unsupported encodings.
fn ext80() -> impl Strategy<Value = u128> {
    let exp = prop_oneof![
        Just(0u128),
        Just(1),
        0x3fc0u128..0x4040,
        Just(0x7ffe),
        Just(0x7fff),
        0u128..0x8000,
    ];
    (any::<bool>(), exp, any::<u64>(), 0u8..8).prop_map(|(sign, e, sig, kind)| {
        let sig = match (e, kind) {
            (0, 0) => 0,
            (0, _) => sig >> 1,         // a denormal (J clear)
            (_, 1) => sig & !(1 << 63), // unnormal / pseudo-NaN: unsupported
            (0x7fff, 2) => 1 << 63,     // infinity
            _ => sig | 1 << 63,
        };
        (u128::from(sign) << 79) | (e << 64) | u128::from(sig)
    })
}

fn f64_bits() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        any::<f64>().prop_map(f64::to_bits),
        Just(0u64),
        Just(1),
        Just(0x7ff0_0000_0000_0000),
        Just(0x7ff0_0000_0000_0001),
        Just(0x7ff8_0000_0000_0000),
        Just(0x0010_0000_0000_0000),
    ]
}

fn rc_cw() -> impl Strategy<Value = u16> {
    (0u16..4).prop_map(|rc| 0x37f | (rc << 10))
}

macro_rules! compare_m64 {
    ($name:ident, $insn:literal, $modrm:expr) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]
            #[test]
            fn $name(a in ext80(), b in f64_bits(), cw in rc_cw()) {
                let (n_st0, n_sw) = native!($insn, cw, a.to_le_bytes(), b.to_le_bytes());
                let (e_st0, e_sw, _) = emulated(&[0xdc, $modrm], cw, a, &b.to_le_bytes());
                prop_assert_eq!(e_st0, n_st0, "a {:#x} b {:#x} cw {:#x}", a, b, cw);
                prop_assert_eq!(e_sw & FLAGS, n_sw & FLAGS, "a {:#x} b {:#x} cw {:#x}", a, b, cw);
            }
        }
    };
}

compare_m64!(x87_fadd_m64_matches_host_cpu, "fadd qword ptr", 0x03);
compare_m64!(x87_fmul_m64_matches_host_cpu, "fmul qword ptr", 0x0b);
compare_m64!(x87_fsub_m64_matches_host_cpu, "fsub qword ptr", 0x23);
compare_m64!(x87_fsubr_m64_matches_host_cpu, "fsubr qword ptr", 0x2b);
compare_m64!(x87_fdiv_m64_matches_host_cpu, "fdiv qword ptr", 0x33);
compare_m64!(x87_fdivr_m64_matches_host_cpu, "fdivr qword ptr", 0x3b);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn x87_fadd_m32_matches_host_cpu(a in ext80(), b in any::<u32>(), cw in rc_cw()) {
        let mut bb = [0u8; 8];
        bb[..4].copy_from_slice(&b.to_le_bytes());
        let (n_st0, n_sw) = native!("fadd dword ptr", cw, a.to_le_bytes(), bb);
        let (e_st0, e_sw, _) = emulated(&[0xd8, 0x03], cw, a, &bb);
        prop_assert_eq!(e_st0, n_st0, "a {:#x} b {:#x} cw {:#x}", a, b, cw);
        prop_assert_eq!(e_sw & FLAGS, n_sw & FLAGS, "a {:#x} b {:#x} cw {:#x}", a, b, cw);
    }

    #[test]
    fn x87_fistp_m32_m16_m64_match_host_cpu(a in ext80(), cw in rc_cw()) {
        let (n32, s32) = native_fistp!("fistp dword ptr", cw, a.to_le_bytes());
        let (_, e_sw, mem) = emulated(&[0xdb, 0x1b], cw, a, &[0; 8]);
        prop_assert_eq!(&mem[..4], &n32.to_le_bytes()[..4], "a {:#x} cw {:#x}", a, cw);
        prop_assert_eq!(e_sw & FLAGS, s32 & FLAGS, "a {:#x} cw {:#x}", a, cw);
        let (n16, s16) = native_fistp!("fistp word ptr", cw, a.to_le_bytes());
        let (_, e_sw, mem) = emulated(&[0xdf, 0x1b], cw, a, &[0; 8]);
        prop_assert_eq!(&mem[..2], &n16.to_le_bytes()[..2], "a {:#x} cw {:#x}", a, cw);
        prop_assert_eq!(e_sw & FLAGS, s16 & FLAGS, "a {:#x} cw {:#x}", a, cw);
        let (n64, s64) = native_fistp!("fistp qword ptr", cw, a.to_le_bytes());
        let (_, e_sw, mem) = emulated(&[0xdf, 0x3b], cw, a, &[0; 8]);
        prop_assert_eq!(&mem[..8], &n64.to_le_bytes()[..], "a {:#x} cw {:#x}", a, cw);
        prop_assert_eq!(e_sw & FLAGS, s64 & FLAGS, "a {:#x} cw {:#x}", a, cw);
    }
}

/// fld m64/m32 (conversion, SNaN, denormal) and fild against the CPU:
/// `fld tbyte [a]` then the load pushes; compare the new ST0.
#[test]
fn x87_fld_m64_special_values_match_host_cpu() {
    for b in [
        0u64,
        1,
        0x8000_0000_0000_0001,
        0x7ff0_0000_0000_0001,
        0xfff8_0000_0000_1234,
        0x7ff0_0000_0000_0000,
        0x3ff0_0000_0000_0001,
        0x000f_ffff_ffff_ffff,
    ] {
        let cw = 0x37fu16;
        let mut out = [0u8; 16];
        let mut sw: u16 = 0;
        // SAFETY: loads 8 bytes from `b`, stores 10 into `out` and 2 into
        // `sw` (live locals); the stack ends empty, exceptions are masked.
        unsafe {
            asm!(
                "fninit",
                "fldcw word ptr [{cw}]",
                "fld qword ptr [{b}]",
                "fnstsw word ptr [{sw}]",
                "fstp tbyte ptr [{o}]",
                "fninit",
                cw = in(reg) &cw,
                b = in(reg) &b,
                sw = in(reg) &mut sw,
                o = in(reg) out.as_mut_ptr(),
                options(nostack),
            );
        }
        let native = u128::from_le_bytes(out) & ((1 << 80) - 1);
        let (m, mut r, mut s) = machine(64);
        let env = Env::new();
        m.put(DATA, &b.to_le_bytes());
        assert_eq!(run(&m, &env, &mut r, &mut s, &[0xdd, 0x03]), Fixup::Resume);
        let f = env.fpu().unwrap();
        let mut st0 = [0u8; 16];
        st0[..10].copy_from_slice(&f.fpr[0][..10]);
        assert_eq!(u128::from_le_bytes(st0), native, "{b:#x}");
        assert_eq!(f.fsw & FLAGS, sw & FLAGS, "{b:#x}");
    }
}

/// Edge cases the random operands rarely reach: a tiny product that
/// rounds to the smallest normal (tininess after rounding), overflow to
/// the largest finite value under directed rounding, exact cancellation.
#[test]
fn x87_underflow_overflow_edges_match_host_cpu() {
    let cases: [(u128, u64, u8); 7] = [
        (0x7ffe_ffff_ffff_ffff_ffff, 0x0000_0000_0000_0001, 0x03), // + denormal
        (0x03fe_ffff_ffff_ffff_ffff, 0x0010_0000_0000_0000, 0x0b), // fmul
        (0x03fe_ffff_ffff_ffff_fffe, 0x0010_0000_0000_0000, 0x0b),
        (0x03ff_8000_0000_0000_0001, 0x3ff0_0000_0000_0001, 0x33), // fdiv
        (0x7ffe_ffff_ffff_ffff_ffff, 0x3ff0_0000_0000_0001, 0x0b),
        (0x7ffe_ffff_ffff_ffff_ffff, 0x7fe0_0000_0000_0000, 0x03), // fadd
        (0x3fff_8000_0000_0000_0000, 0x3ff0_0000_0000_0000, 0x23), // fsub
    ];
    for (a, b, modrm) in cases {
        for rc in 0..4u16 {
            let cw = 0x37f | (rc << 10);
            let (n_st0, n_sw) = match modrm {
                0x0b => native!("fmul qword ptr", cw, a.to_le_bytes(), b.to_le_bytes()),
                0x33 => native!("fdiv qword ptr", cw, a.to_le_bytes(), b.to_le_bytes()),
                0x03 => native!("fadd qword ptr", cw, a.to_le_bytes(), b.to_le_bytes()),
                _ => native!("fsub qword ptr", cw, a.to_le_bytes(), b.to_le_bytes()),
            };
            let (e_st0, e_sw, _) = emulated(&[0xdc, modrm], cw, a, &b.to_le_bytes());
            assert_eq!(e_st0, n_st0, "a {a:#x} b {b:#x} cw {cw:#x}");
            assert_eq!(e_sw & FLAGS, n_sw & FLAGS, "a {a:#x} b {b:#x} cw {cw:#x}");
        }
    }
}
