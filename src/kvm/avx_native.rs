//! The AVX fix-ups (`arch::x86::avx`) against this host's own AVX/AVX-512:
//! the same instruction runs natively on the same register values and the
//! destination is compared. In the KVM layer because `src/arch` forbids
//! `unsafe`. Skipped (with a printed reason) on a CPU without AVX-512VL.

use std::arch::asm;

use proptest::prelude::*;

use crate::arch::x86::testenv::{machine, run, Env};
use crate::arch::x86::{EmuEnv, Fixup};

fn avx512vl() -> bool {
    std::arch::is_x86_feature_detected!("avx512vl")
}

/// The emulator: YMM1, YMM2 and YMM3 loaded with `a`, `b`, `c` and YMM0
/// with `c` (the merge target), as `native!` does, k1 = `k`, then `code`; YMM0..3 afterwards.
fn emulated(code: &[u8], a: [u8; 32], b: [u8; 32], c: [u8; 32], k: u8) -> [[u8; 32]; 4] {
    let (m, mut r, mut s) = machine(64);
    let mut env = Env::new();
    env.xcr0 = 0xe7;
    {
        let mut area = env.xsave_area().unwrap();
        for (n, v) in [(0usize, c), (1, a), (2, b), (3, c)] {
            area[160 + 16 * n..176 + 16 * n].copy_from_slice(&v[..16]);
            area[576 + 16 * n..592 + 16 * n].copy_from_slice(&v[16..]);
        }
        area[1088 + 8] = k;
        area[512] |= 0x26;
        assert!(env.set_xsave_area(&area));
    }
    assert_eq!(run(&m, &env, &mut r, &mut s, code), Fixup::Resume);
    let area = env.xsave_area().unwrap();
    std::array::from_fn(|n| {
        let mut v = [0u8; 32];
        v[..16].copy_from_slice(&area[160 + 16 * n..176 + 16 * n]);
        v[16..].copy_from_slice(&area[576 + 16 * n..592 + 16 * n]);
        v
    })
}

/// Runs `$insn` natively with ymm1..3 = a, b, c (ymm0 = c too, as the
/// merge target), k1 = k; returns ymm0, ymm3.
macro_rules! native {
    ($insn:literal, $a:expr, $b:expr, $c:expr, $k:expr) => {{
        let (a, b, c): ([u8; 32], [u8; 32], [u8; 32]) = ($a, $b, $c);
        let k: u32 = $k;
        let mut out0 = [0u8; 32];
        let mut out3 = [0u8; 32];
        // SAFETY: loads 32 bytes from each of `a`, `b`, `c` and stores 32
        // bytes to each of `out0`, `out3` (live locals); ymm0-3 and k1 are
        // declared clobbered; the caller checked AVX-512VL.
        unsafe {
            asm!(
                "vmovdqu ymm1, [{a}]",
                "vmovdqu ymm2, [{b}]",
                "vmovdqu ymm3, [{c}]",
                "vmovdqu ymm0, [{c}]",
                "kmovw k1, {k:e}",
                $insn,
                "vmovdqu [{o0}], ymm0",
                "vmovdqu [{o3}], ymm3",
                "vzeroupper",
                a = in(reg) a.as_ptr(),
                b = in(reg) b.as_ptr(),
                c = in(reg) c.as_ptr(),
                k = in(reg) k,
                o0 = in(reg) out0.as_mut_ptr(),
                o3 = in(reg) out3.as_mut_ptr(),
                out("ymm0") _,
                out("ymm1") _,
                out("ymm2") _,
                out("ymm3") _,
                out("k1") _,
                options(nostack),
            );
        }
        (out0, out3)
    }};
}

fn enc(
    f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> Vec<u8> {
    let mut a = iced_x86::code_asm::CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(0x1000).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn avx_forms_match_host_cpu(
        a in proptest::array::uniform32(any::<u8>()),
        b in proptest::array::uniform32(any::<u8>()),
        c in proptest::array::uniform32(any::<u8>()),
        k in any::<u8>(),
    ) {
        if !avx512vl() {
            eprintln!("SKIPPED avx_forms_match_host_cpu: this CPU has no AVX-512VL");
            return Ok(());
        }
        use iced_x86::code_asm::*;
        let e = emulated(&enc(|x| x.vpshufd(ymm0, ymm1, 0x4e)), a, b, c, k);
        prop_assert_eq!(e[0], native!("vpshufd ymm0, ymm1, 0x4e", a, b, c, 0).0);
        let e = emulated(&enc(|x| x.vpaddq(ymm0, ymm1, ymm2)), a, b, c, k);
        prop_assert_eq!(e[0], native!("vpaddq ymm0, ymm1, ymm2", a, b, c, 0).0);
        let e = emulated(&enc(|x| x.vpandn(ymm0, ymm1, ymm2)), a, b, c, k);
        prop_assert_eq!(e[0], native!("vpandn ymm0, ymm1, ymm2", a, b, c, 0).0);
        let e = emulated(&enc(|x| x.vextracti128(xmm0, ymm1, 1)), a, b, c, k);
        prop_assert_eq!(e[0], native!("vextracti128 xmm0, ymm1, 1", a, b, c, 0).0);
        let e = emulated(&enc(|x| x.vprord(ymm0.k1(), ymm1, 13)), a, b, c, k);
        prop_assert_eq!(e[0], native!("vprord ymm0{{k1}}, ymm1, 13", a, b, c, u32::from(k)).0);
        let e = emulated(&enc(|x| x.vprold(ymm0.k1().z(), ymm1, 7)), a, b, c, k);
        prop_assert_eq!(e[0], native!("vprold ymm0{{k1}}{{z}}, ymm1, 7", a, b, c, u32::from(k)).0);
        let e = emulated(&enc(|x| x.vpermi2d(ymm3.k1(), ymm1, ymm2)), a, b, c, k);
        prop_assert_eq!(e[3], native!("vpermi2d ymm3{{k1}}, ymm1, ymm2", a, b, c, u32::from(k)).1);
    }
}
