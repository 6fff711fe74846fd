//! Per-vCPU runstate accounting: pure arithmetic, no I/O.
//!
//! `state_entry_time - sum(time[])` is an invariant: every transition adds
//! the same `delta` to the entry time and to exactly one (or, with steal
//! time, split over two) of the `time[]` counters. All arithmetic wraps, so
//! the invariant holds exactly even for values set by a restore.

use crate::Error;

/// A Xen runstate (`RUNSTATE_*` in `xen/include/public/vcpu.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum State {
    /// In `KVM_RUN` or handling an exit.
    Running = 0,
    /// Ready but kept off a CPU by the host scheduler (steal time).
    Runnable = 1,
    /// Waiting: HLT, `SCHEDOP_block`, `SCHEDOP_poll`.
    Blocked = 2,
    /// Down.
    Offline = 3,
}

impl State {
    /// All states, indexed by their value.
    pub const ALL: [State; 4] = [
        State::Running,
        State::Runnable,
        State::Blocked,
        State::Offline,
    ];

    /// The ABI value.
    pub const fn value(self) -> u32 {
        self as u32
    }
}

impl TryFrom<u32> for State {
    type Error = Error;
    fn try_from(v: u32) -> Result<State, Error> {
        State::ALL
            .get(v as usize)
            .copied()
            .ok_or(Error::BadState(v))
    }
}

/// A vCPU's runstate as the guest and migration see it (Xen's
/// `vcpu_runstate_info`; KVM's `KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunstateData {
    /// Current state.
    pub state: State,
    /// Xen system time (ns) when `state` was entered.
    pub state_entry_time: u64,
    /// Time spent in each state (ns), indexed by [`State::value`].
    pub time: [u64; 4],
}

impl RunstateData {
    /// `state_entry_time - sum(time[])`, the constant of the invariant.
    pub fn offset(&self) -> u64 {
        self.time
            .iter()
            .fold(self.state_entry_time, |a, t| a.wrapping_sub(*t))
    }
}

/// Per-vCPU accounting. Owned by the vCPU; no locking inside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accounting {
    data: RunstateData,
    /// Last `run_delay` sample of the vCPU thread (ns), for steal time.
    last_run_delay: Option<u64>,
}

impl Accounting {
    /// A vCPU entering `state` at `now_ns` with all counters zero.
    pub fn new(state: State, now_ns: u64) -> Accounting {
        Accounting {
            data: RunstateData {
                state,
                state_entry_time: now_ns,
                time: [0; 4],
            },
            last_run_delay: None,
        }
    }

    /// The current data.
    pub fn data(&self) -> &RunstateData {
        &self.data
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.data.state
    }

    /// Moves to `new` at `now_ns`: the time since the last transition is
    /// charged to the old state. A `now_ns` before the entry time (a clock
    /// that went backwards) charges nothing and keeps the entry time.
    pub fn transition(&mut self, new: State, now_ns: u64) {
        let delta = now_ns.saturating_sub(self.data.state_entry_time);
        self.charge(delta, 0);
        self.data.state = new;
    }

    /// Like [`transition`](Self::transition), also accounting steal time:
    /// `run_delay_ns` is the vCPU thread's current `run_delay` (see
    /// [`crate::RunDelay`]). Its growth since the last sample, while the vCPU
    /// was running, was spent waiting for a host CPU, so it is charged to
    /// runnable instead of running (at most the elapsed time). The first
    /// sample only sets the baseline.
    pub fn transition_with_steal(&mut self, new: State, now_ns: u64, run_delay_ns: u64) {
        let delta = now_ns.saturating_sub(self.data.state_entry_time);
        let steal = match self.last_run_delay {
            Some(prev) if self.data.state == State::Running => {
                run_delay_ns.saturating_sub(prev).min(delta)
            }
            _ => 0,
        };
        self.last_run_delay = Some(run_delay_ns);
        self.charge(delta, steal);
        self.data.state = new;
    }

    /// Like [`transition_with_steal`](Self::transition_with_steal) for a
    /// vCPU whose preemptions are also tracked from host context-switch
    /// records: `excluded_ns` is the runnable time those records charged
    /// since the last sample (part of the `run_delay` growth, so not charged
    /// twice). The rest of the growth is waiting for a CPU after a wake-up,
    /// which the records do not see: it is charged to runnable out of the
    /// interval that ends now when that is running, blocked or offline (a
    /// vCPU leaving `SCHEDOP_block`, a pause or `VCPUOP_down` waited for its
    /// CPU at the end of that interval: Xen's split, where the wake-up makes
    /// it runnable); what does not fit is carried to the next sample instead
    /// of being dropped, so runnable keeps tracking `run_delay`.
    pub fn transition_with_steal_excluding(
        &mut self,
        new: State,
        now_ns: u64,
        run_delay_ns: u64,
        excluded_ns: u64,
    ) {
        let delta = now_ns.saturating_sub(self.data.state_entry_time);
        let (steal, base) = match self.last_run_delay {
            Some(prev) => {
                let grown = run_delay_ns.saturating_sub(prev);
                let residual = grown.saturating_sub(excluded_ns);
                // Records that charged more than `run_delay` grew: an
                // earlier sample charged part of their preemption already
                // (its switch-in record came after that sample). The excess
                // is carried as well, against the next growth.
                let over = excluded_ns.saturating_sub(grown);
                let steal = match self.data.state {
                    State::Running | State::Blocked | State::Offline => residual.min(delta),
                    _ => 0,
                };
                (
                    steal,
                    (run_delay_ns - (residual - steal)).saturating_add(over),
                )
            }
            None => (0, run_delay_ns),
        };
        self.last_run_delay = Some(base);
        self.charge(delta, steal);
        self.data.state = new;
    }

    fn charge(&mut self, delta: u64, steal: u64) {
        let d = &mut self.data;
        let cur = d.state as usize;
        d.time[cur] = d.time[cur].wrapping_add(delta - steal);
        d.time[State::Runnable as usize] = d.time[State::Runnable as usize].wrapping_add(steal);
        d.state_entry_time = d.state_entry_time.wrapping_add(delta);
    }

    /// Replaces the data (restore; KVM's `RUNSTATE_DATA` set). Refused if the
    /// entry time is before the sum of the times (as KVM refuses it).
    pub fn set_data(&mut self, data: RunstateData) -> Result<(), Error> {
        let sum = data
            .time
            .iter()
            .try_fold(0u64, |a, t| a.checked_add(*t))
            .ok_or(Error::BadData)?;
        if data.state_entry_time < sum {
            return Err(Error::BadData);
        }
        self.data = data;
        self.last_run_delay = None;
        Ok(())
    }

    /// Adds signed deltas (KVM's `RUNSTATE_ADJUST`): `entry_delta` to the
    /// entry time and `time_delta[i]` to each counter, optionally changing
    /// the state. Refused (nothing changed) if a counter would go negative or
    /// overflow, or if the invariant's constant would change (the deltas must
    /// satisfy `entry_delta == sum(time_delta)`).
    pub fn adjust(
        &mut self,
        new_state: Option<State>,
        entry_delta: i64,
        time_delta: [i64; 4],
    ) -> Result<(), Error> {
        let sum = time_delta
            .iter()
            .try_fold(0i64, |a, t| a.checked_add(*t))
            .ok_or(Error::BadData)?;
        if sum != entry_delta {
            return Err(Error::BadData);
        }
        let mut d = self.data;
        for (t, dt) in d.time.iter_mut().zip(time_delta) {
            *t = t.checked_add_signed(dt).ok_or(Error::BadData)?;
        }
        d.state_entry_time = d
            .state_entry_time
            .checked_add_signed(entry_delta)
            .ok_or(Error::BadData)?;
        if let Some(s) = new_state {
            d.state = s;
        }
        self.data = d;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn transition_charges_old_state() {
        let mut a = Accounting::new(State::Offline, 100);
        a.transition(State::Running, 150);
        a.transition(State::Blocked, 400);
        a.transition(State::Running, 1000);
        let d = a.data();
        assert_eq!(d.state, State::Running);
        assert_eq!(d.state_entry_time, 1000);
        assert_eq!(d.time, [250, 0, 600, 50]);
        assert_eq!(d.offset(), 100);
    }

    #[test]
    fn transition_clock_backwards_charges_nothing() {
        let mut a = Accounting::new(State::Running, 500);
        a.transition(State::Blocked, 400);
        assert_eq!(a.data().time, [0; 4]);
        assert_eq!(a.data().state_entry_time, 500);
        assert_eq!(a.state(), State::Blocked);
    }

    #[test]
    fn steal_first_sample_sets_baseline_then_moves_to_runnable() {
        let mut a = Accounting::new(State::Running, 0);
        a.transition_with_steal(State::Running, 100, 5_000);
        assert_eq!(a.data().time, [100, 0, 0, 0]);
        a.transition_with_steal(State::Blocked, 300, 5_030);
        assert_eq!(a.data().time, [270, 30, 0, 0]);
        // Run delay grown while blocked is not steal.
        a.transition_with_steal(State::Running, 400, 5_100);
        assert_eq!(a.data().time, [270, 30, 100, 0]);
        // Steal larger than the elapsed time is clamped.
        a.transition_with_steal(State::Running, 410, 9_000);
        assert_eq!(a.data().time, [270, 40, 100, 0]);
        assert_eq!(a.data().offset(), 0);
    }

    #[test]
    fn steal_excluding_records_charges_residual_and_carries_rest() {
        let mut a = Accounting::new(State::Running, 0);
        a.transition_with_steal_excluding(State::Running, 100, 1_000, 0);
        // run_delay grew 500, records already charged 300: residual 200, but
        // only 50 ns ran since the last transition; 150 carried.
        a.transition_with_steal_excluding(State::Running, 150, 1_500, 300);
        assert_eq!(a.data().time, [100, 50, 0, 0]);
        a.transition_with_steal_excluding(State::Running, 1_150, 1_500, 0);
        assert_eq!(a.data().time, [950, 200, 0, 0]);
        assert_eq!(a.data().offset(), 0);
    }

    #[test]
    fn steal_excluding_charges_the_wait_after_offline_to_it_not_to_the_next_block() {
        // Paused (offline) 0..5,000; woken, the thread waited 3,000 for a
        // CPU: run_delay grew 3,000, which is the end of the offline
        // interval (Xen: the wake-up makes it runnable). The 1,000 ns
        // SCHEDOP_poll after it stays blocked. (Charged only out of running
        // and blocked, the 3,000 was carried into the poll: blocked +0,
        // runnable +1,000, what the test guest's runstate check caught.)
        let mut a = Accounting::new(State::Running, 0);
        a.transition_with_steal_excluding(State::Offline, 0, 10_000, 0);
        a.transition_with_steal_excluding(State::Running, 5_000, 13_000, 0);
        assert_eq!(a.data().time, [0, 3_000, 0, 2_000]);
        a.transition_with_steal_excluding(State::Blocked, 5_100, 13_000, 0);
        a.transition_with_steal_excluding(State::Running, 6_100, 13_000, 0);
        assert_eq!(a.data().time, [100, 3_000, 1_000, 2_000]);
        assert_eq!(a.data().offset(), 0);
    }

    #[test]
    fn steal_excluding_carries_records_that_charged_more_than_run_delay_grew() {
        // A sample charges a 2,000 ns preemption as steal before its
        // switch-in record is applied; the record then charges it again
        // (2,000 excluded from a sample in which run_delay did not grow).
        // The excess is taken off the next growth: of 3,000 more, only
        // 1,000 is new. Steal charged: 2,000 + 1,000; with the record's
        // 2,000, runnable is 5,000, run_delay's growth (3,000 more without
        // the carry).
        let mut a = Accounting::new(State::Running, 0);
        a.transition_with_steal_excluding(State::Running, 1_000, 0, 0);
        a.transition_with_steal_excluding(State::Running, 5_000, 2_000, 0);
        assert_eq!(a.data().time[State::Runnable as usize], 2_000);
        a.transition_with_steal_excluding(State::Running, 9_000, 2_000, 2_000);
        assert_eq!(a.data().time[State::Runnable as usize], 2_000);
        a.transition_with_steal_excluding(State::Running, 13_000, 5_000, 0);
        assert_eq!(a.data().time[State::Runnable as usize], 3_000);
        assert_eq!(a.data().offset(), 0);
    }

    #[test]
    fn set_data_entry_before_sum_refused() {
        let mut a = Accounting::new(State::Running, 0);
        let bad = RunstateData {
            state: State::Blocked,
            state_entry_time: 5,
            time: [3, 3, 0, 0],
        };
        assert!(matches!(a.set_data(bad), Err(Error::BadData)));
        let good = RunstateData {
            state: State::Blocked,
            state_entry_time: 10,
            time: [3, 3, 0, 0],
        };
        a.set_data(good).unwrap();
        assert_eq!(*a.data(), good);
    }

    #[test]
    fn adjust_keeps_invariant_or_refuses() {
        let mut a = Accounting::new(State::Running, 1000);
        a.transition(State::Blocked, 1500);
        let before = a.clone();
        assert!(matches!(
            a.adjust(None, 10, [5, 0, 0, 0]),
            Err(Error::BadData)
        ));
        assert!(matches!(
            a.adjust(None, -600, [-600, 0, 0, 0]),
            Err(Error::BadData)
        ));
        assert_eq!(a, before);
        a.adjust(Some(State::Runnable), 30, [-20, 50, 0, 0])
            .unwrap();
        assert_eq!(a.data().time, [480, 50, 0, 0]);
        assert_eq!(a.data().state_entry_time, 1530);
        assert_eq!(a.state(), State::Runnable);
        assert_eq!(a.data().offset(), before.data().offset());
    }

    #[test]
    fn state_try_from_out_of_range_refused() {
        assert_eq!(State::try_from(2).unwrap(), State::Blocked);
        assert!(matches!(State::try_from(4), Err(Error::BadState(4))));
    }

    fn any_state() -> impl Strategy<Value = State> {
        (0u32..4).prop_map(|v| State::try_from(v).unwrap())
    }

    proptest! {
        #[test]
        fn transitions_any_sequence_invariant_exact(
            start in any::<u64>(),
            steps in proptest::collection::vec((any_state(), 0u64..1_000_000_000, any::<bool>(), 0u64..2_000_000_000), 0..200),
        ) {
            let start = start / 2;
            let mut a = Accounting::new(State::Offline, start);
            let k = a.data().offset();
            let mut now = start;
            let mut rd = 0u64;
            let mut prev_times = a.data().time;
            for (s, dt, steal, drd) in steps {
                now = now.saturating_add(dt);
                rd = rd.saturating_add(drd);
                if steal { a.transition_with_steal(s, now, rd) } else { a.transition(s, now) }
                prop_assert_eq!(a.data().offset(), k);
                prop_assert_eq!(a.data().state, s);
                prop_assert_eq!(a.data().state_entry_time, now);
                for (t, p) in a.data().time.iter().zip(prev_times) { prop_assert!(*t >= p); }
                prev_times = a.data().time;
            }
        }
    }
}
