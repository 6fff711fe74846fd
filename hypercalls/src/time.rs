//! Guest time as the Xen ABI publishes it: `vcpu_time_info` (pvclock) and the wallclock in
//! shared_info, both under a version counter that is odd while an update is in progress.
//!
//! The pvclock formula the guest applies:
//! `system_time + ((((tsc - tsc_timestamp) << tsc_shift) * tsc_to_system_mul) >> 32)`
//! (a negative shift shifts right). [`time_scale`] chooses `mul`/`shift` the way Xen's
//! `set_time_scale()` does, so that `mul` keeps 32 significant bits.

use std::sync::atomic::{fence, Ordering};

use crate::abi::{self, shinfo};
use crate::shared::SharedPage;
use crate::types::GuestWidth;

/// pvclock scale: nanoseconds = ((ticks << shift) * mul_frac) >> 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeScale {
    pub mul_frac: u32,
    pub shift: i8,
}

impl TimeScale {
    /// Convert a TSC delta to nanoseconds with this scale (the guest's computation).
    pub fn ticks_to_ns(self, ticks: u64) -> u64 {
        let t = if self.shift >= 0 {
            ticks << self.shift
        } else {
            ticks >> -self.shift
        };
        ((u128::from(t) * u128::from(self.mul_frac)) >> 32) as u64
    }
}

/// The scale for a TSC running at `tsc_khz` (Xen's `set_time_scale`): normalise the tick rate
/// into (1e9, 2e9] ticks per second by shifting, then `mul_frac = 1e9 * 2^32 / rate`.
/// A rate of 0 (unknown) gives the identity-ish scale of a 1 GHz TSC.
pub fn time_scale(tsc_khz: u32) -> TimeScale {
    const NS_PER_S: u64 = 1_000_000_000;
    let mut tps = u64::from(tsc_khz).saturating_mul(1000);
    if tps == 0 {
        tps = NS_PER_S;
    }
    let mut shift: i32 = 0;
    while tps > 2 * NS_PER_S {
        tps >>= 1;
        shift -= 1;
    }
    while tps <= NS_PER_S {
        tps <<= 1;
        shift += 1;
    }
    // tps is in (1e9, 2e9], so the quotient is below 2^32.
    let mul = ((NS_PER_S << 32) / tps) as u32;
    TimeScale {
        mul_frac: mul,
        shift: shift as i8,
    }
}

/// The values of one `vcpu_time_info` update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeInfo {
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub scale: TimeScale,
    pub flags: u8,
}

/// Write a `vcpu_time_info` at `off` in `page` with the version protocol.
pub(crate) fn write_time_info(page: &dyn SharedPage, off: usize, t: &TimeInfo) {
    let ver = page.load_u32(off + shinfo::T_VERSION, Ordering::Relaxed);
    page.store_u32(
        off + shinfo::T_VERSION,
        ver.wrapping_add(1) | 1,
        Ordering::Relaxed,
    );
    fence(Ordering::Release);
    page.store_u64(
        off + shinfo::T_TSC_TIMESTAMP,
        t.tsc_timestamp,
        Ordering::Relaxed,
    );
    page.store_u64(
        off + shinfo::T_SYSTEM_TIME,
        t.system_time,
        Ordering::Relaxed,
    );
    page.store_u32(off + shinfo::T_MUL, t.scale.mul_frac, Ordering::Relaxed);
    let shift_flags = u32::from(t.scale.shift as u8) | (u32::from(t.flags) << 8);
    page.store_u32(off + shinfo::T_SHIFT_FLAGS, shift_flags, Ordering::Relaxed);
    page.store_u32(
        off + shinfo::T_VERSION,
        ver.wrapping_add(2) & !1,
        Ordering::Release,
    );
}

/// Write the wallclock (the wall time at Xen system time 0) into shared_info in `width`'s
/// layout, with the `wc_version` protocol.
pub(crate) fn write_wallclock(page: &dyn SharedPage, width: GuestWidth, boot_wall_ns: u64) {
    let (base, hi) = match width {
        GuestWidth::Bits64 => (shinfo::WC_VERSION_64, shinfo::WC_SEC_HI_64),
        GuestWidth::Bits32 => (shinfo::WC_VERSION_32, shinfo::WC_SEC_HI_32),
    };
    let sec = boot_wall_ns / 1_000_000_000;
    let nsec = (boot_wall_ns % 1_000_000_000) as u32;
    let ver = page.load_u32(base, Ordering::Relaxed);
    page.store_u32(base, ver.wrapping_add(1) | 1, Ordering::Relaxed);
    fence(Ordering::Release);
    page.store_u32(base + 4, sec as u32, Ordering::Relaxed);
    page.store_u32(base + 8, nsec, Ordering::Relaxed);
    page.store_u32(hi, (sec >> 32) as u32, Ordering::Relaxed);
    page.store_u32(base, ver.wrapping_add(2) & !1, Ordering::Release);
}

/// Flags for `vcpu_time_info.flags`.
pub(crate) fn pvclock_flags(tsc_stable: bool) -> u8 {
    if tsc_stable {
        abi::PVCLOCK_TSC_STABLE_BIT
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::VecPage;

    #[test]
    fn time_scale_common_frequencies_convert_one_second() {
        for khz in [
            1_000_000u32,
            2_100_000,
            2_999_999,
            3_600_000,
            25_000,
            10_000_000,
            4_294_967,
        ] {
            let s = time_scale(khz);
            let ns = s.ticks_to_ns(u64::from(khz) * 1000);
            let err = ns.abs_diff(1_000_000_000);
            assert!(err < 10, "khz {khz}: {ns} ns for one second ({s:?})");
        }
    }

    #[test]
    fn time_scale_mul_keeps_32_significant_bits() {
        for khz in [1u32, 999, 1_000_000, 1_000_001, 3_000_000, u32::MAX] {
            let s = time_scale(khz);
            assert!(s.mul_frac >= 1 << 31, "khz {khz}: {s:?}");
        }
    }

    #[test]
    fn write_time_info_version_even_and_fields_in_place() {
        let p = VecPage::new();
        let t = TimeInfo {
            tsc_timestamp: 0x1122_3344_5566_7788,
            system_time: 42,
            scale: TimeScale {
                mul_frac: 0xdead_beef,
                shift: -2,
            },
            flags: 1,
        };
        write_time_info(&p, 64 + 32, &t);
        write_time_info(&p, 64 + 32, &t);
        assert_eq!(p.load_u32(96, Ordering::SeqCst), 4);
        assert_eq!(p.load_u64(104, Ordering::SeqCst), t.tsc_timestamp);
        assert_eq!(p.load_u64(112, Ordering::SeqCst), 42);
        assert_eq!(p.load_u32(120, Ordering::SeqCst), 0xdead_beef);
        let mut b = [0u8; 4];
        p.read(124, &mut b);
        assert_eq!(b, [0xfe, 1, 0, 0]);
    }

    #[test]
    fn write_wallclock_compat_puts_sec_hi_in_arch_area() {
        let p = VecPage::new();
        let boot = ((1u64 << 32) + 5) * 1_000_000_000 + 7;
        write_wallclock(&p, GuestWidth::Bits32, boot);
        assert_eq!(p.load_u32(0x900, Ordering::SeqCst), 2);
        assert_eq!(p.load_u32(0x904, Ordering::SeqCst), 5);
        assert_eq!(p.load_u32(0x908, Ordering::SeqCst), 7);
        assert_eq!(p.load_u32(0x924, Ordering::SeqCst), 1);
        // The 64-bit wallclock area is untouched.
        assert_eq!(p.load_u64(0xc00, Ordering::SeqCst), 0);
    }
}
