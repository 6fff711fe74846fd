//! Xen timers as host timerfds: one per vCPU (`set_timer_op`,
//! `VCPUOP_set_singleshot_timer`, the periodic timer), the domain's two
//! `SCHEDOP_watchdog` timers, and the upcall re-check. Deadlines are kept
//! in Xen system time (ns, the guest's `vcpu_time_info` clock); a timerfd
//! is armed for the host interval to that deadline, and when it fires the
//! deadline is compared with system time again (re-armed if the host clock
//! ran ahead). The event loop owns the waiting: this module has no thread.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use vmm_sys_util::timerfd::TimerFd;

use super::clock::Clock;

/// Watchdog timers a domain may have (Xen's NR_DOMAIN_WATCHDOG_TIMERS).
pub const WATCHDOGS: usize = 2;

/// Which timer a slot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    Vcpu(u32),
    Watchdog(u32),
    /// The upcall re-check (see `Xen::reassert_upcalls`).
    UpcallCheck,
}

struct Slot {
    fd: TimerFd,
    /// Xen system time (ns) the timer is armed for.
    deadline: Option<u64>,
}

pub struct XenTimers {
    clock: Clock,
    vcpus: usize,
    /// Raw fds, fixed at creation (for the event loop).
    raw: Vec<RawFd>,
    /// Leaf lock.
    slots: Mutex<Vec<Slot>>,
    /// vCPU timers that fired, and the sum of their lateness (ns from the
    /// deadline to the event loop seeing the timerfd): the host's own
    /// timer lateness, the floor of a `VIRQ_TIMER`'s.
    vcpu_fired: AtomicU64,
    vcpu_late_ns: AtomicU64,
}

impl XenTimers {
    pub fn new(vcpus: u32, clock: Clock) -> std::io::Result<Self> {
        let n = vcpus as usize + WATCHDOGS + 1;
        let slots = (0..n)
            .map(|_| TimerFd::new().map(|fd| Slot { fd, deadline: None }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(XenTimers {
            clock,
            vcpus: vcpus as usize,
            raw: slots.iter().map(|s| s.fd.as_raw_fd()).collect(),
            slots: Mutex::new(slots),
            vcpu_fired: AtomicU64::new(0),
            vcpu_late_ns: AtomicU64::new(0),
        })
    }

    fn slot(&self, k: TimerKind) -> Option<usize> {
        match k {
            TimerKind::Vcpu(v) if (v as usize) < self.vcpus => Some(v as usize),
            TimerKind::Watchdog(w) if (w as usize) < WATCHDOGS => Some(self.vcpus + w as usize),
            TimerKind::UpcallCheck => Some(self.vcpus + WATCHDOGS),
            _ => None,
        }
    }

    /// Every timer with its fd, for the event loop.
    pub fn fds(&self) -> Vec<(TimerKind, RawFd)> {
        let mut v: Vec<TimerKind> = (0..self.vcpus as u32).map(TimerKind::Vcpu).collect();
        v.extend((0..WATCHDOGS as u32).map(TimerKind::Watchdog));
        v.push(TimerKind::UpcallCheck);
        v.into_iter()
            .filter_map(|k| self.slot(k).map(|s| (k, self.raw[s])))
            .collect()
    }

    /// Arms timer `k` for Xen system time `deadline_ns`, or disarms it.
    pub fn set(&self, k: TimerKind, deadline_ns: Option<u64>) {
        let Some(s) = self.slot(k) else { return };
        let mut slots = self.slots.lock();
        slots[s].deadline = deadline_ns;
        self.arm(&mut slots[s]);
    }

    /// Arms `k` for `after` from now unless it is armed already.
    pub fn set_if_idle(&self, k: TimerKind, after: Duration) {
        let Some(s) = self.slot(k) else { return };
        let mut slots = self.slots.lock();
        if slots[s].deadline.is_none() {
            let at = self
                .clock
                .system_time()
                .saturating_add(after.as_nanos() as u64);
            slots[s].deadline = Some(at);
            self.arm(&mut slots[s]);
        }
    }

    /// Programs the timerfd for the slot's deadline. timerfd_settime also
    /// resets the fd's expiry count, so a stale expiry never stays readable.
    fn arm(&self, slot: &mut Slot) {
        let r = match slot.deadline {
            None => slot.fd.clear(),
            Some(at) => {
                let now = self.clock.system_time();
                // A zero interval would disarm: a deadline already past fires
                // after 1 ns.
                let ns = at.saturating_sub(now).max(1);
                slot.fd.reset(Duration::from_nanos(ns), None)
            }
        };
        if let Err(e) = r {
            tracing::warn!(%e, "cannot arm a timerfd");
        }
    }

    /// vCPU timers fired so far and the sum of their host lateness (ns).
    pub fn vcpu_lateness(&self) -> (u64, u64) {
        (
            self.vcpu_fired.load(Ordering::Relaxed),
            self.vcpu_late_ns.load(Ordering::Relaxed),
        )
    }

    /// The event loop saw timer `k`'s fd readable: true if its deadline has
    /// passed (the timer is then disarmed); false if it is early (re-armed)
    /// or was cancelled meanwhile.
    pub fn expired(&self, k: TimerKind) -> bool {
        let Some(s) = self.slot(k) else { return false };
        let mut slots = self.slots.lock();
        let slot = &mut slots[s];
        let now = self.clock.system_time();
        let fired = slot.deadline.is_some_and(|at| now >= at);
        if fired {
            if let (TimerKind::Vcpu(_), Some(at)) = (k, slot.deadline) {
                self.vcpu_fired.fetch_add(1, Ordering::Relaxed);
                self.vcpu_late_ns.fetch_add(now - at, Ordering::Relaxed);
            }
            slot.deadline = None;
        }
        self.arm(slot);
        fired
    }
}
