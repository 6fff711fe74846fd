//! Cooperative suspend, as libxl does it for a guest with Xen drivers
//! (issue 14): the toolstack writes `control/shutdown = "suspend"`, the
//! guest acknowledges by clearing the node, quiesces itself and makes
//! `SCHEDOP_shutdown(SHUTDOWN_suspend)`; the domain is then saved with that
//! hypercall about to return. Its return value tells the guest where it
//! wakes up: 0 in a new domain (a restore: it registers shared_info,
//! vcpu_info, runstate areas, event channels, grant frames and xenstore
//! watches again and its frontends reconnect), 1 in the same domain (a
//! checkpoint, or a save that failed: the suspend is cancelled and the
//! guest carries on with what it had).
//!
//! [`SuspendGate`] is the meeting point of the control thread that asks and
//! the vCPU thread that makes the hypercall. The vCPU thread asks
//! [`SuspendGate::guest_suspended`] what to do with the hypercall: hold
//! (return 0 and pause, the save goes on), cancel (return 1 at once: the
//! toolstack gave up waiting) or end the VM (nobody asked: as before, a
//! guest that suspends itself unprompted has nobody to resume it).

use std::time::Instant;

use parking_lot::{Condvar, Mutex};

/// Where a cooperative suspend stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// No suspend asked for.
    Idle,
    /// `control/shutdown = "suspend"` written; waiting for the hypercall.
    Requested,
    /// vCPU `vcpu` made the hypercall and holds, paused, until the save
    /// decides what it returns.
    Suspended { vcpu: u32 },
    /// The toolstack stopped waiting: a suspend that comes now is cancelled.
    Abandoned,
}

/// What the vCPU thread does with a `SHUTDOWN_suspend` hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendAnswer {
    /// Return 0 and pause: the save is under way.
    Hold,
    /// Return 1 (suspend cancelled) and run on.
    Cancel,
    /// Nobody asked for it: the guest ends (`GuestExit::Suspend`).
    End,
}

pub struct SuspendGate {
    stage: Mutex<Stage>,
    cv: Condvar,
}

impl Default for SuspendGate {
    fn default() -> Self {
        Self::new()
    }
}

impl SuspendGate {
    pub fn new() -> Self {
        SuspendGate {
            stage: Mutex::new(Stage::Idle),
            cv: Condvar::new(),
        }
    }

    /// The toolstack side: a suspend is being asked for. False if one is
    /// already in progress.
    pub fn request(&self) -> bool {
        let mut s = self.stage.lock();
        match *s {
            Stage::Idle | Stage::Abandoned => {
                *s = Stage::Requested;
                true
            }
            _ => false,
        }
    }

    /// The toolstack side: waits until a vCPU holds in the hypercall
    /// (its id) or `deadline` passes (`None`).
    pub fn wait(&self, deadline: Instant) -> Option<u32> {
        let mut s = self.stage.lock();
        loop {
            if let Stage::Suspended { vcpu } = *s {
                return Some(vcpu);
            }
            if self.cv.wait_until(&mut s, deadline).timed_out() {
                return match *s {
                    Stage::Suspended { vcpu } => Some(vcpu),
                    _ => None,
                };
            }
        }
    }

    /// The toolstack side: stops waiting. A suspend that comes later is
    /// cancelled; one that came just now is returned (the vCPU holds: go on
    /// with it or cancel it, then [`finish`](Self::finish)).
    pub fn abandon(&self) -> Option<u32> {
        let mut s = self.stage.lock();
        match *s {
            Stage::Suspended { vcpu } => Some(vcpu),
            Stage::Requested => {
                *s = Stage::Abandoned;
                None
            }
            _ => None,
        }
    }

    /// The toolstack side: the save is over (the held vCPU has been told
    /// what to return, or the VM ends).
    pub fn finish(&self) {
        *self.stage.lock() = Stage::Idle;
    }

    /// The vCPU side, at `SCHEDOP_shutdown(SHUTDOWN_suspend)` from `vcpu`.
    pub fn guest_suspended(&self, vcpu: u32) -> SuspendAnswer {
        let mut s = self.stage.lock();
        match *s {
            Stage::Requested => {
                *s = Stage::Suspended { vcpu };
                self.cv.notify_all();
                SuspendAnswer::Hold
            }
            // A second vCPU suspending while one holds, or a suspend after
            // the toolstack stopped waiting: the guest carries on.
            Stage::Suspended { .. } | Stage::Abandoned => {
                if *s == Stage::Abandoned {
                    *s = Stage::Idle;
                }
                SuspendAnswer::Cancel
            }
            Stage::Idle => SuspendAnswer::End,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn suspend_unasked_ends_the_guest_asked_holds_it() {
        let g = SuspendGate::new();
        assert_eq!(g.guest_suspended(0), SuspendAnswer::End);
        assert!(g.request());
        assert!(!g.request(), "one suspend at a time");
        assert_eq!(g.guest_suspended(1), SuspendAnswer::Hold);
        assert_eq!(g.wait(Instant::now() + Duration::from_secs(5)), Some(1));
        assert_eq!(g.abandon(), Some(1), "a held vCPU is not abandoned");
        // Another vCPU suspending meanwhile is told to carry on.
        assert_eq!(g.guest_suspended(0), SuspendAnswer::Cancel);
        g.finish();
        assert_eq!(g.guest_suspended(0), SuspendAnswer::End);
    }

    #[test]
    fn suspend_after_the_toolstack_gave_up_is_cancelled_once_and_a_wait_alone_gives_nothing_up() {
        let g = SuspendGate::new();
        assert!(g.request());
        assert_eq!(g.wait(Instant::now()), None);
        assert_eq!(g.guest_suspended(0), SuspendAnswer::Hold, "still asked for");
        g.finish();
        assert!(g.request());
        assert_eq!(g.abandon(), None);
        assert_eq!(g.guest_suspended(0), SuspendAnswer::Cancel);
        assert_eq!(g.guest_suspended(0), SuspendAnswer::End);
    }

    #[test]
    fn suspend_wait_wakes_when_a_vcpu_suspends() {
        let g = Arc::new(SuspendGate::new());
        assert!(g.request());
        let g2 = g.clone();
        let t = std::thread::spawn(move || g2.wait(Instant::now() + Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.guest_suspended(3), SuspendAnswer::Hold);
        assert_eq!(t.join().unwrap(), Some(3));
    }
}
