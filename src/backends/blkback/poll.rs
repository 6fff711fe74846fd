//! How long an idle queue thread polls its ring before it sleeps: adaptive,
//! as KVM's halt polling is. Polling saves the frontend its notification
//! (for a guest, a hypercall and a VM exit) and the thread a wake-up, but a
//! poll that finds nothing only burns a CPU, which on a small host is the
//! CPU the guest's vCPU (the frontend) needs. Measured with the bench on
//! this project's 2-core, busy host: a fixed 50 us poll doubled the
//! backend's CPU per 4 KiB read (3.0 us against 1.4 us without polling)
//! and halved its throughput.
//!
//! The window doubles (from [`GROW_START`], up to the maximum) after a
//! poll that found requests, or after a sleep shorter than the maximum (a
//! poll would have caught it); it halves after a poll that found nothing
//! (below [`GROW_START`] it is zero: no polling).
//!
//! Before it sleeps, the thread yields its CPU once and looks at the ring
//! again (`serve`): a frontend on the same CPU (a loaded host's scheduler
//! puts the two there) cannot refill the ring while the thread spins, so
//! each of its polls missed and the sleep after it was short, which grew
//! the window again: the window stayed wide, spun in vain every round, and
//! every round ended in a sleep and a notified wake-up (the bench's I/O
//! thread mode, 4 KiB random reads: about 17,000 sleeps a second). After
//! the yield the frontend has refilled; the window shrinks to zero and the
//! hand-off is a yield each way (about 200 sleeps a second; backend CPU
//! per I/O 0.80-0.82 us against 0.82-0.98 us).

use std::time::Duration;

/// The first non-zero window.
pub const GROW_START: Duration = Duration::from_micros(2);

/// An adaptive poll window.
#[derive(Debug, Clone, Copy)]
pub struct PollWindow {
    now: Duration,
    max: Duration,
}

impl PollWindow {
    /// Starts at zero; never above `max` (zero: never poll).
    pub fn new(max: Duration) -> PollWindow {
        PollWindow {
            now: Duration::ZERO,
            max,
        }
    }

    /// How long to poll now.
    pub fn get(&self) -> Duration {
        self.now
    }

    fn grow(&mut self) {
        self.now = (self.now * 2).max(GROW_START).min(self.max);
    }

    /// A poll found requests.
    pub fn hit(&mut self) {
        self.grow();
    }

    /// A poll of the whole window found nothing.
    pub fn miss(&mut self) {
        self.now /= 2;
        if self.now < GROW_START {
            self.now = Duration::ZERO;
        }
    }

    /// The thread yielded its CPU before sleeping and found requests after
    /// `away`. A frontend on the same CPU refills in a few microseconds (a
    /// spin would not have found it: no change); away for the whole
    /// window or longer, another thread had this CPU and the frontend
    /// refilled from elsewhere, which a poll (keeping the CPU) would have
    /// caught: grow.
    pub fn yielded(&mut self, away: Duration) {
        if away >= self.max {
            self.grow();
        }
    }

    /// The thread slept for `slept` before its wake-up.
    pub fn slept(&mut self, slept: Duration) {
        if slept < self.max {
            self.grow();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    #[test]
    fn poll_window_grows_on_hits_and_short_sleeps_up_to_max() {
        let mut w = PollWindow::new(MAX);
        assert_eq!(w.get(), Duration::ZERO);
        w.slept(Duration::from_micros(5));
        assert_eq!(w.get(), GROW_START);
        for _ in 0..10 {
            w.hit();
        }
        assert_eq!(w.get(), MAX);
    }

    #[test]
    fn poll_window_shrinks_to_zero_on_misses_and_long_sleeps_do_not_grow_it() {
        let mut w = PollWindow::new(MAX);
        for _ in 0..10 {
            w.hit();
        }
        for _ in 0..10 {
            w.miss();
        }
        assert_eq!(w.get(), Duration::ZERO);
        w.slept(Duration::from_millis(5));
        assert_eq!(w.get(), Duration::ZERO);
    }

    #[test]
    fn poll_window_grows_after_a_long_yield_only() {
        let mut w = PollWindow::new(MAX);
        w.yielded(Duration::from_micros(5));
        assert_eq!(w.get(), Duration::ZERO, "a frontend on this CPU");
        w.yielded(Duration::from_millis(2));
        assert_eq!(w.get(), GROW_START, "another thread had the CPU");
    }

    #[test]
    fn poll_window_zero_max_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        w.hit();
        w.slept(Duration::ZERO);
        assert_eq!(w.get(), Duration::ZERO);
    }
}
