//! Xen system time: nanoseconds since the domain started, derived from the
//! TSC with the pvclock formula the guest itself uses, so that the VMM's
//! timestamps (runstate, timers) and the guest's reading of
//! `vcpu_time_info` agree to the nanosecond.
//!
//! The guest's TSC equals the host's TSC plus a per-VM offset that the VMM
//! measures once ([`Clock::new`]); one fixed reference point
//! (`tsc_timestamp = tsc0`, `system_time = 0`) is published, so the
//! formula never changes under the guest.

/// pvclock scale: `ns = ((tsc_delta << shift) * mul) >> 32` (a negative
/// shift shifts right).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TscScale {
    pub mul: u32,
    pub shift: i8,
}

impl TscScale {
    /// The scale for a TSC of `tsc_khz`.
    pub fn for_khz(tsc_khz: u32) -> Self {
        let hz = u128::from(tsc_khz.max(1)) * 1000;
        let mut mul = (1_000_000_000u128 << 32) / hz;
        let mut shift = 0i8;
        while mul >= 1 << 32 {
            mul >>= 1;
            shift += 1;
        }
        while mul < 1 << 31 {
            mul <<= 1;
            shift -= 1;
        }
        TscScale {
            mul: mul as u32,
            shift,
        }
    }

    /// Converts TSC ticks to nanoseconds exactly as a Xen guest does.
    pub fn scale(&self, delta: u64) -> u64 {
        let d = if self.shift >= 0 {
            delta << self.shift
        } else {
            delta >> (-self.shift)
        };
        ((u128::from(d) * u128::from(self.mul)) >> 32) as u64
    }
}

/// The domain's clock.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub tsc_khz: u32,
    pub scale: TscScale,
    /// Guest TSC at system time 0.
    pub tsc0: u64,
    /// guest TSC = host TSC + offset (wrapping).
    pub guest_tsc_offset: u64,
    /// Wall-clock time (ns since the epoch) at system time 0.
    pub wall0_ns: u64,
}

impl Clock {
    /// A clock starting now. `guest_tsc_offset` is what KVM adds to the host
    /// TSC for this VM.
    pub fn new(tsc_khz: u32, guest_tsc_offset: u64) -> Self {
        let wall0_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let tsc0 = host_tsc().wrapping_add(guest_tsc_offset);
        Clock {
            tsc_khz,
            scale: TscScale::for_khz(tsc_khz),
            tsc0,
            guest_tsc_offset,
            wall0_ns,
        }
    }

    /// A restored domain's clock (issue 14): it reads `system_time_ns` (the
    /// saved clock's last reading) now, with the same TSC-to-time mapping,
    /// so Xen system time neither goes back nor counts the time the guest
    /// spent saved. That is what a guest sees from KVM's kvmclock after a
    /// restore, and from Xen where it restores the guest TSC. The guest TSC
    /// itself may have moved on (this project's `kvm_pvm` host keeps it at
    /// the host's): anchoring at the TSC now, not at the saved TSC, keeps
    /// that jump out of system time, so a guest restored an hour later
    /// does not find an hour of uptime, and of steal time, it never ran.
    /// The wallclock stays right: wall time at system time 0 is now less the
    /// system time now (the guest's own clock lags by the gap until it
    /// resynchronises, as after any restore). A TSC too small to hold the
    /// saved time gives a clock starting at 0 now, as [`Clock::new`].
    pub fn continuing(tsc_khz: u32, guest_tsc_offset: u64, system_time_ns: u64) -> Self {
        let mut c = Clock::new(tsc_khz, guest_tsc_offset);
        let anchor = c.guest_tsc();
        let ticks = (u128::from(system_time_ns) * u128::from(tsc_khz.max(1)) / 1_000_000) as u64;
        let Some(mut tsc0) = anchor.checked_sub(ticks) else {
            return c;
        };
        // Rounding: never read less than the saved time at the anchor.
        for _ in 0..8 {
            let at = c.scale.scale(anchor.wrapping_sub(tsc0));
            if at >= system_time_ns {
                break;
            }
            let short =
                (u128::from(system_time_ns - at) * u128::from(tsc_khz.max(1))).div_ceil(1_000_000);
            tsc0 = tsc0.saturating_sub(short as u64 + 1);
        }
        c.tsc0 = tsc0;
        let now = c.system_time();
        c.wall0_ns = c.wall0_ns.saturating_sub(now);
        c
    }

    /// The guest's TSC now.
    pub fn guest_tsc(&self) -> u64 {
        host_tsc().wrapping_add(self.guest_tsc_offset)
    }

    /// Xen system time at guest TSC `tsc`.
    pub fn system_time_at(&self, tsc: u64) -> u64 {
        self.scale.scale(tsc.wrapping_sub(self.tsc0))
    }

    /// (guest TSC, Xen system time) now.
    pub fn now(&self) -> (u64, u64) {
        let t = self.guest_tsc();
        (t, self.system_time_at(t))
    }

    /// Xen system time now.
    pub fn system_time(&self) -> u64 {
        self.now().1
    }
}

/// True if the host TSC is constant-rate and keeps running in deep idle
/// (`constant_tsc` and `nonstop_tsc` in /proc/cpuinfo), so one offset and
/// scale hold for every vCPU (the pvclock TSC_STABLE bit).
pub fn host_tsc_invariant() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        info.lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| {
                l.split_whitespace().any(|f| f == "constant_tsc")
                    && l.split_whitespace().any(|f| f == "nonstop_tsc")
            })
    })
}

/// The host TSC.
pub fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; it is available on every x86_64
    // CPU KVM runs on.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_scale_common_frequencies_within_1ppm() {
        for khz in [1_000_000u32, 2_100_000, 2_999_999, 3_700_000, 100_000] {
            let s = TscScale::for_khz(khz);
            let one_s_ticks = u64::from(khz) * 1000;
            let ns = s.scale(one_s_ticks);
            assert!((ns as i64 - 1_000_000_000).abs() <= 1000, "{khz}: {ns}");
        }
    }

    #[test]
    fn clock_continuing_reads_the_saved_time_now_not_the_gap() {
        for (khz, sys) in [
            (2_596_140u32, 1_234_567_891u64),
            (1_000_000, 7),
            (3_700_001, 86_400_000_000_000),
        ] {
            let offset = 1u64 << 60;
            let c = Clock::continuing(khz, offset, sys);
            let now = c.system_time();
            assert!(now >= sys, "{khz}: {now} < {sys}");
            // Whatever the guest TSC did while the guest was saved (an hour
            // here would be 3.6e12 ns), the clock reads the saved time plus
            // only the moments since it was built.
            assert!(
                now - sys < 1_000_000_000,
                "{khz}: {now} is {} ns ahead",
                now - sys
            );
        }
        // A TSC that cannot hold the saved time: a fresh clock.
        let c = Clock::continuing(1_000_000, 0u64.wrapping_sub(host_tsc()), 1_000_000_000);
        assert!(c.system_time() < 1_000_000_000);
    }

    #[test]
    fn tsc_scale_monotonic_in_delta() {
        let s = TscScale::for_khz(2_893_000);
        let mut last = 0;
        for d in (0..10_000_000u64).step_by(9973) {
            let ns = s.scale(d);
            assert!(ns >= last);
            last = ns;
        }
    }
}
