//! Runstate from the host scheduler's context switches of a vCPU thread
//! (perf context-switch records or BPF events), merged with the vCPU
//! thread's own transitions. Pure arithmetic, no I/O.
//!
//! Two writers change one vCPU's [`Accounting`], both under the caller's
//! per-vCPU lock: the vCPU thread (at `now`: blocking in the VMM, waking,
//! its periodic steal sample) and the host-schedule feed (at the *record's*
//! time, which lies in the past). A record is applied only if it is not
//! older than the current state's entry time and the state is the one it
//! expects, so the two never disagree and nothing published decreases:
//! - switch-out, preempted, while Running: Runnable from the record's time
//!   (the caller publishes it and has the vCPU republish Running before it
//!   next enters the guest);
//! - switch-out, voluntary, while Running: the thread went to sleep without
//!   leaving the VMM's Running state, i.e. it halted in the in-kernel
//!   irqchip (or slept in the VMM): Blocked from the record's time;
//! - switch-in, while in a state a switch-out above opened: Running from
//!   the record's time.
//!
//! Steal time stays anchored on the thread's `run_delay`: what the records
//! charged to runnable is excluded from the next `run_delay` sample, and
//! only the rest (the wait between a wake-up and getting the CPU, which
//! switch records cannot see) is charged from that sample
//! ([`Accounting::transition_with_steal_excluding`]).

use crate::{Accounting, State};

/// One context switch of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    /// Switched in (got a CPU).
    In,
    /// Switched out while still runnable (preempted, or `sched_yield`).
    OutPreempted,
    /// Switched out to sleep (halt in the in-kernel irqchip, a futex wait...).
    OutVoluntary,
    /// Woken from a sleep (BPF `sched_wakeup`; perf records cannot see it):
    /// from here until it switches in, a halted vCPU waits for a CPU.
    Woken,
}

/// What [`HostSched::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The vCPU became Runnable (publish; the vCPU must republish Running).
    Preempted,
    /// The vCPU became Blocked (halted).
    Halted,
    /// The vCPU is Running again after an interval a switch-out opened.
    Resumed,
    /// A halted vCPU was woken: Runnable (not published: it is waiting for
    /// a CPU, and its switch-in follows) until it switches in.
    Woken,
    /// Nothing: the record is older than the current state, or does not
    /// fit it (the vCPU thread changed the state since).
    Stale,
}

/// Counters of a vCPU's host-schedule tracking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStats {
    /// Preempted switch-outs seen.
    pub preempt_outs: u64,
    /// Of those, made visible as Runnable.
    pub published_runnable: u64,
    /// Voluntary switch-outs while Running (halts) accounted as Blocked.
    pub halts: u64,
    /// Records that did not apply (older than the state, or not fitting it).
    pub stale: u64,
    /// Records the kernel lost (ring full): accounting fell back to `run_delay`.
    pub lost: u64,
    /// Times the feed could not take the vCPU's lock and left the records to
    /// the vCPU thread (which applies them when it next takes the lock).
    pub deferred: u64,
    /// Preemptions the monitor caused itself (it was switched in on that CPU
    /// as the vCPU went out): accounted, not published.
    pub self_inflicted: u64,
    /// Of those, the ones that went on after the monitor slept (the CPU went
    /// to another thread) and were shown then.
    pub self_shown_late: u64,
    /// Runnable ns charged from records.
    pub record_runnable_ns: u64,
}

/// Per-vCPU merge state of the host-schedule feed.
#[derive(Clone, Debug, Default)]
pub struct HostSched {
    /// The state a switch-out opened (Runnable or Blocked), if any.
    open: Option<State>,
    /// Runnable ns charged from records since the last `run_delay` sample.
    unsampled_runnable: u64,
    pub stats: SchedStats,
}

impl HostSched {
    pub fn new() -> HostSched {
        HostSched::default()
    }

    /// Applies one switch at `t_ns` (Xen system time). The caller decides
    /// what to publish: a preemption the monitor caused itself, say, is
    /// accounted here but need not be shown (its switch-in follows at once).
    pub fn apply(&mut self, acct: &mut Accounting, sw: Switch, t_ns: u64) -> Applied {
        let fresh = t_ns >= acct.data().state_entry_time;
        let r = match sw {
            Switch::OutPreempted => {
                self.stats.preempt_outs += 1;
                if fresh && acct.state() == State::Running {
                    acct.transition(State::Runnable, t_ns);
                    self.open = Some(State::Runnable);
                    Applied::Preempted
                } else {
                    Applied::Stale
                }
            }
            Switch::OutVoluntary => {
                if fresh && acct.state() == State::Running {
                    acct.transition(State::Blocked, t_ns);
                    self.open = Some(State::Blocked);
                    self.stats.halts += 1;
                    Applied::Halted
                } else {
                    Applied::Stale
                }
            }
            Switch::Woken => match self.open {
                Some(State::Blocked) if fresh && acct.state() == State::Blocked => {
                    acct.transition(State::Runnable, t_ns);
                    self.open = Some(State::Runnable);
                    Applied::Woken
                }
                // Woken from a sleep the records did not open (blocked in the
                // VMM: the vCPU thread accounts that itself).
                _ => return Applied::Stale,
            },
            Switch::In => match self.open {
                Some(s) if fresh && acct.state() == s => {
                    let before = acct.data().time[State::Runnable as usize];
                    acct.transition(State::Running, t_ns);
                    let charged = acct.data().time[State::Runnable as usize].wrapping_sub(before);
                    self.unsampled_runnable = self.unsampled_runnable.wrapping_add(charged);
                    self.stats.record_runnable_ns =
                        self.stats.record_runnable_ns.wrapping_add(charged);
                    self.open = None;
                    Applied::Resumed
                }
                _ => Applied::Stale,
            },
        };
        if r == Applied::Stale {
            self.stats.stale += 1;
            if sw == Switch::In {
                self.open = None;
            }
        }
        r
    }

    /// The state a switch-out opened and no switch-in closed yet.
    pub fn open(&self) -> Option<State> {
        self.open
    }

    /// Called by the vCPU thread (which is on a CPU, so any switch-out is
    /// over) after applying every record it could read: an interval still
    /// open means its switch-in was lost. It is closed at `now_ns` (the
    /// time since is charged to the open state; `run_delay` corrects steal)
    /// and counted. Runnable time it charges is excluded from the next
    /// `run_delay` sample like a record's (that sample already holds the
    /// preemption: charging both counted it twice, 0.5-1.6 % too much
    /// runnable in `bench sched` with `bpf`, whose vCPU threads sometimes
    /// find the ring taken by a watch thread).
    pub fn close_lost(&mut self, acct: &mut Accounting, now_ns: u64) {
        if let Some(s) = self.open.take() {
            if acct.state() == s {
                let before = acct.data().time[State::Runnable as usize];
                acct.transition(State::Running, now_ns);
                let charged = acct.data().time[State::Runnable as usize].wrapping_sub(before);
                self.unsampled_runnable = self.unsampled_runnable.wrapping_add(charged);
                self.stats.record_runnable_ns = self.stats.record_runnable_ns.wrapping_add(charged);
            }
            self.stats.lost += 1;
        }
    }

    /// Runnable ns charged from records since the last call (to exclude
    /// from the next `run_delay` sample).
    pub fn take_unsampled_runnable(&mut self) -> u64 {
        std::mem::take(&mut self.unsampled_runnable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn preempt_then_in_charges_runnable_exactly() {
        let mut a = Accounting::new(State::Running, 1000);
        let mut h = HostSched::new();
        assert_eq!(
            h.apply(&mut a, Switch::OutPreempted, 1500),
            Applied::Preempted
        );
        assert_eq!(a.state(), State::Runnable);
        assert_eq!(a.data().state_entry_time, 1500);
        assert_eq!(h.apply(&mut a, Switch::In, 4500), Applied::Resumed);
        assert_eq!(a.data().time, [500, 3000, 0, 0]);
        assert_eq!(h.take_unsampled_runnable(), 3000);
        assert_eq!(h.take_unsampled_runnable(), 0);
    }

    #[test]
    fn halt_wake_in_splits_blocked_then_runnable_as_xen() {
        let mut a = Accounting::new(State::Running, 0);
        let mut h = HostSched::new();
        assert_eq!(h.apply(&mut a, Switch::OutVoluntary, 100), Applied::Halted);
        assert_eq!(h.apply(&mut a, Switch::Woken, 600), Applied::Woken);
        assert_eq!(a.state(), State::Runnable);
        assert_eq!(h.apply(&mut a, Switch::In, 900), Applied::Resumed);
        assert_eq!(a.data().time, [100, 300, 500, 0]);
        // The wait after the wake-up came from the events: not charged again
        // from run_delay.
        assert_eq!(h.take_unsampled_runnable(), 300);
        assert_eq!(h.stats.stale, 0);
    }

    #[test]
    fn wake_of_vmm_blocked_vcpu_changes_nothing() {
        let mut a = Accounting::new(State::Running, 0);
        let mut h = HostSched::new();
        a.transition(State::Blocked, 50);
        assert_eq!(h.apply(&mut a, Switch::Woken, 80), Applied::Stale);
        assert_eq!(a.state(), State::Blocked);
        assert_eq!(h.stats.stale, 0);
    }

    #[test]
    fn voluntary_out_while_running_is_blocked_until_in() {
        let mut a = Accounting::new(State::Running, 0);
        let mut h = HostSched::new();
        assert_eq!(h.apply(&mut a, Switch::OutVoluntary, 100), Applied::Halted);
        assert_eq!(h.apply(&mut a, Switch::In, 900), Applied::Resumed);
        assert_eq!(a.data().time, [100, 0, 800, 0]);
        assert_eq!(h.stats.halts, 1);
    }

    #[test]
    fn record_older_than_vcpu_transition_is_stale() {
        let mut a = Accounting::new(State::Running, 0);
        let mut h = HostSched::new();
        // The vCPU thread blocked in the VMM at 500; a switch-out record
        // from 400 arrives later and must not change anything.
        a.transition(State::Blocked, 500);
        let before = a.clone();
        assert_eq!(h.apply(&mut a, Switch::OutPreempted, 400), Applied::Stale);
        // A voluntary switch-out while Blocked in the VMM (its futex wait).
        assert_eq!(h.apply(&mut a, Switch::OutVoluntary, 600), Applied::Stale);
        assert_eq!(h.apply(&mut a, Switch::In, 700), Applied::Stale);
        assert_eq!(a, before);
        assert_eq!(h.stats.stale, 3);
    }

    #[test]
    fn vcpu_republished_running_before_the_in_record() {
        let mut a = Accounting::new(State::Running, 0);
        let mut h = HostSched::new();
        h.apply(&mut a, Switch::OutPreempted, 100);
        // The kicked vCPU thread republishes Running itself at 300...
        a.transition(State::Running, 300);
        // ...and the switch-in record at 250 arrives later: stale.
        assert_eq!(h.apply(&mut a, Switch::In, 250), Applied::Stale);
        assert_eq!(a.data().time, [100, 200, 0, 0]);
        assert_eq!(h.open(), None);
    }

    #[test]
    fn lost_switch_in_closed_at_now_and_counted() {
        let mut a = Accounting::new(State::Running, 0);
        let mut h = HostSched::new();
        h.apply(&mut a, Switch::OutVoluntary, 10);
        h.close_lost(&mut a, 50);
        assert_eq!(a.state(), State::Running);
        assert_eq!(a.data().time, [10, 0, 40, 0]);
        assert_eq!(h.stats.lost, 1);
    }

    #[test]
    fn lost_switch_in_runnable_not_charged_again_from_run_delay() {
        // Preempted 100..400 (the host's run_delay grows by 300), the
        // switch-in record not readable when the vCPU thread next runs
        // (at 420): the preemption is charged once, not again as steal.
        let mut a = Accounting::new(State::Running, 0);
        let mut h = HostSched::new();
        a.transition_with_steal_excluding(State::Running, 0, 1_000, 0);
        h.apply(&mut a, Switch::OutPreempted, 100);
        h.close_lost(&mut a, 420);
        let ex = h.take_unsampled_runnable();
        assert_eq!(ex, 320);
        a.transition_with_steal_excluding(State::Running, 900, 1_300, ex);
        assert_eq!(a.data().time[State::Runnable as usize], 320);
        a.transition_with_steal_excluding(State::Running, 2_000, 1_300, 0);
        assert_eq!(a.data().time[State::Runnable as usize], 320);
        assert_eq!(h.stats.record_runnable_ns, 320);
    }

    fn any_switch() -> impl Strategy<Value = Switch> {
        prop_oneof![
            Just(Switch::In),
            Just(Switch::OutPreempted),
            Just(Switch::OutVoluntary)
        ]
    }

    proptest! {
        /// Records in any order, interleaved with the vCPU thread's own
        /// transitions: the invariant holds exactly and no counter, nor the
        /// entry time, ever decreases.
        #[test]
        fn merge_any_interleaving_never_decreases(
            steps in proptest::collection::vec((any::<bool>(), any_switch(), 0u64..1_000_000, 0u64..4), 0..300),
        ) {
            let mut a = Accounting::new(State::Running, 1_000_000);
            let mut h = HostSched::new();
            let k = a.data().offset();
            let mut now = 1_000_000u64;
            let mut prev = *a.data();
            for (from_vcpu, sw, dt, st) in steps {
                now += dt;
                if from_vcpu {
                    a.transition_with_steal_excluding(State::ALL[st as usize], now, now / 3, h.take_unsampled_runnable());
                } else {
                    // Records may lag by up to 1 ms.
                    h.apply(&mut a, sw, now.saturating_sub(dt / 2));
                }
                let d = *a.data();
                prop_assert_eq!(d.offset(), k);
                prop_assert!(d.state_entry_time >= prev.state_entry_time);
                for (t, p) in d.time.iter().zip(prev.time) { prop_assert!(*t >= p); }
                prev = d;
            }
        }
    }
}
