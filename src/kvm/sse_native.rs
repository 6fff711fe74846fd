//! `divss` emulation (`arch::x86::sse_fp`) against this host's own SSE:
//! the same division runs natively under the same MXCSR (rounding, FTZ,
//! DAZ; exceptions masked, an unmasked one would be SIGFPE) and the result
//! and the MXCSR flags are compared. In the KVM layer because `src/arch`
//! forbids `unsafe`.

use std::arch::asm;

use proptest::prelude::*;

use crate::arch::x86::sse_fp;

fn native_divss(a: u32, b: u32, mxcsr: u32) -> (u32, u32) {
    let mut old = 0u32;
    let mut after = 0u32;
    let q: u32;
    // SAFETY: saves MXCSR to `old`, loads `mxcsr` (reserved bits clear,
    // every exception masked: no trap), divides in xmm0/xmm1 (declared
    // clobbered), stores the flags to `after` and restores the old MXCSR;
    // the pointers are live locals.
    unsafe {
        asm!(
            "stmxcsr dword ptr [{old}]",
            "ldmxcsr dword ptr [{new}]",
            "movd xmm0, {a:e}",
            "movd xmm1, {b:e}",
            "divss xmm0, xmm1",
            "movd {q:e}, xmm0",
            "stmxcsr dword ptr [{after}]",
            "ldmxcsr dword ptr [{old}]",
            old = in(reg) &mut old,
            new = in(reg) &mxcsr,
            after = in(reg) &mut after,
            a = in(reg) a,
            b = in(reg) b,
            q = out(reg) q,
            out("xmm0") _,
            out("xmm1") _,
            options(nostack),
        );
    }
    (q, after & 0x3f)
}

fn single() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        any::<u32>().prop_map(|x| x & 0x807f_ffff), // zero or denormal
        any::<u32>().prop_map(|x| x & 0x80ff_ffff), // tiny normal
        any::<u32>().prop_map(|x| x | 0x7f00_0000), // huge, inf, NaN
        any::<u32>().prop_map(|x| (x & 0x807f_ffff) | 0x3f80_0000), // near 1
        Just(0u32),
        Just(0x7f80_0000),
        Just(0x7fa0_0000),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    #[test]
    fn divss_any_rounding_ftz_daz_matches_host_cpu(
        a in single(),
        b in single(),
        rc in 0u32..4,
        ftz in any::<bool>(),
        daz in any::<bool>(),
    ) {
        let mxcsr = 0x1f80 | (rc << 13) | (u32::from(ftz) << 15) | (u32::from(daz) << 6);
        let (q, flags) = native_divss(a, b, mxcsr);
        let e = sse_fp::divss(a, b, mxcsr);
        prop_assert_eq!(e.value, Some(q), "a {:#x} b {:#x} mxcsr {:#x}", a, b, mxcsr);
        prop_assert_eq!(e.flags, flags, "a {:#x} b {:#x} mxcsr {:#x}", a, b, mxcsr);
    }
}
