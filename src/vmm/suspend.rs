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

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::vmm::machine::Machine;

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

/// Whether the guest's Xen drivers take suspend requests: it set
/// `control/feature-suspend = 1` (Linux's xen-manage does when it starts),
/// or it watches `control/shutdown` (a guest restored after its own
/// suspend comes back to a new domain's xenstore and only re-registers its
/// watches; libxl asks any guest with PV drivers).
pub fn has_suspend_support(m: &Machine) -> bool {
    m.xen.toolstack_read("control/feature-suspend").as_deref() == Some("1")
        || m.xen.guest_watches("control/shutdown")
}

/// The longest a guest may take to take a suspend request (clear
/// `control/shutdown`): one whose drivers watch the node but do not
/// suspend never does.
const ACK_WAIT: Duration = Duration::from_secs(60);

/// vCPU `v` holds in the suspend: from here on any resume is a cancelled
/// suspend (a checkpoint, or a save or migration that failed), so its
/// hypercall returns 1 then. An image keeps the 0 read when it paused.
fn held(m: &Machine, v: u32) {
    if let Some(h) = m.vcpus.get(v as usize) {
        h.set_resume_rax(1);
    }
}

/// After [`ask_guest`] held a vCPU: the VM ran again with the suspend
/// cancelled (`cancelled`: a checkpoint or a failure; the held vCPU was
/// told to return 1 before the VM resumed) or it ends.
pub fn finish(m: &Machine, cancelled: bool) {
    if cancelled {
        m.xen.domain.clear_shutdown();
    }
    m.suspend.finish();
}

/// How long a save waits for a guest with Xen drivers to suspend itself
/// unless the request says (`+wait=SECS`). libxl allows 60 s; a Linux
/// guest on a host whose KVM emulates guest kernel code needs minutes to
/// freeze its tasks and devices.
pub const SUSPEND_WAIT: Duration = Duration::from_secs(300);

/// Cooperative suspend before a save or the last round of a migration, as
/// libxl does for a guest with Xen drivers: if the guest advertises
/// `control/feature-suspend = 1` (Linux's xen-manage does), write
/// `control/shutdown = suspend`, wait up to `wait` for the guest to take the
/// request (it clears the node) and make `SCHEDOP_shutdown(SHUTDOWN_suspend)`.
/// `Ok(Some(vcpu))`: that vCPU holds, paused, in the hypercall, whose
/// result (0) the image keeps. `Ok(None)`: the guest has no such drivers
/// (saved as it is). A guest that does not suspend in time keeps running
/// (its late suspend is cancelled) and the save fails with one line.
pub fn ask_guest(m: &Machine, wait: Duration) -> Result<Option<u32>, String> {
    if !has_suspend_support(m) {
        return Ok(None);
    }
    if !m.suspend.request() {
        return Err("a suspend is already in progress".into());
    }
    let t0 = Instant::now();
    let deadline = t0 + wait;
    if let Err(e) = m.xen.toolstack_write("control/shutdown", "suspend") {
        m.suspend.abandon();
        return Err(e);
    }
    tracing::info!("asked the guest to suspend (control/shutdown = suspend)");
    let give_up = |why: String| -> Result<Option<u32>, String> {
        match m.suspend.abandon() {
            // It suspended just now: go on with the save.
            Some(v) => {
                held(m, v);
                Ok(Some(v))
            }
            None => Err(why),
        }
    };
    // The guest takes the request by clearing the node (as libxl, wait for
    // that first: a guest that never does has no suspend support).
    let ack_wait = wait.min(ACK_WAIT);
    while m.xen.toolstack_read("control/shutdown").as_deref() == Some("suspend") {
        if t0.elapsed() >= ack_wait || m.stopping() {
            let _ = m.xen.toolstack_write("control/shutdown", "");
            return give_up(format!(
                "the guest did not take the suspend request (control/shutdown) within {} s: it keeps running; save --xen-state saves it as it is",
                ack_wait.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let acked = t0.elapsed();
    loop {
        let slice = (Instant::now() + Duration::from_millis(200)).min(deadline);
        if let Some(v) = m.suspend.wait(slice) {
            held(m, v);
            tracing::info!(
                vcpu = v,
                acked_ms = acked.as_millis() as u64,
                suspended_ms = t0.elapsed().as_millis() as u64,
                "guest suspended itself for the save"
            );
            return Ok(Some(v));
        }
        if Instant::now() >= deadline || m.stopping() {
            return give_up(format!(
                "the guest took the suspend request but did not suspend within {} s (no SCHEDOP_shutdown(SHUTDOWN_suspend)): it keeps running, and a suspend it makes later is cancelled",
                wait.as_secs()
            ));
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
