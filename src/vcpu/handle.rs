//! One handle per vCPU, shared by its thread and the rest of the VMM: the
//! control channel (run, pause, stop), the state the thread reports back,
//! the wake-up for a vCPU waiting in the VMM (`SCHEDOP_block`/`poll`), the
//! [`Kicker`] and the count of `KVM_RUN` entries.
//!
//! Lock order: `VcpuHandle::ctl` is a leaf.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::kvm::Kicker;

/// What the VMM asks of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Run,
    Pause,
    Stop,
}

/// What a vCPU thread reports it is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// Not started yet.
    Created,
    /// Running guest code or handling an exit.
    Running,
    /// Waiting in the VMM for an event (SCHEDOP_block/poll).
    Blocked,
    /// Paused: no guest code runs until resumed. A pending I/O or MMIO exit
    /// was completed first.
    Paused,
    Stopped,
}

struct Ctl {
    request: Request,
    reported: Reported,
    /// A wake-up for a vCPU waiting in the VMM is pending.
    woken: bool,
}

pub struct VcpuHandle {
    pub id: u32,
    kicker: Kicker,
    entries: Arc<AtomicU64>,
    /// It has run guest code (vCPU 0 from the start, APs after INIT/SIPI).
    started: AtomicBool,
    /// The vCPU thread's id (0 before it starts).
    tid: std::sync::atomic::AtomicI32,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// The KVM state the thread read when it last paused (a leaf lock);
    /// cleared when it runs again.
    saved: Mutex<Option<Result<crate::migration::convert::KvmVcpuState, String>>>,
    /// A value the thread puts in RAX when it leaves its pause (a leaf
    /// lock): the result of a hypercall decided while it was paused (a
    /// cancelled `SHUTDOWN_suspend` returns 1).
    resume_rax: Mutex<Option<u64>>,
}

impl VcpuHandle {
    pub fn new(id: u32, kicker: Kicker, entries: Arc<AtomicU64>) -> Self {
        VcpuHandle {
            id,
            kicker,
            entries,
            started: AtomicBool::new(id == 0),
            tid: std::sync::atomic::AtomicI32::new(0),
            ctl: Mutex::new(Ctl {
                request: Request::Run,
                reported: Reported::Created,
                woken: false,
            }),
            cv: Condvar::new(),
            saved: Mutex::new(None),
            resume_rax: Mutex::new(None),
        }
    }

    /// The thread records its KVM state (on pausing) or clears it (on running again).
    pub fn set_saved_state(
        &self,
        s: Option<Result<crate::migration::convert::KvmVcpuState, String>>,
    ) {
        *self.saved.lock() = s;
    }

    /// The KVM state read when this vCPU paused (`None` while it runs).
    pub fn saved_state(&self) -> Option<Result<crate::migration::convert::KvmVcpuState, String>> {
        self.saved.lock().clone()
    }

    /// Sets the RAX the paused thread returns to the guest with.
    pub fn set_resume_rax(&self, v: u64) {
        *self.resume_rax.lock() = Some(v);
    }

    /// The RAX to return with, if one was set (the thread, on leaving its pause).
    pub fn take_resume_rax(&self) -> Option<u64> {
        self.resume_rax.lock().take()
    }

    pub fn kicker(&self) -> &Kicker {
        &self.kicker
    }

    /// `KVM_RUN` entries so far.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// The vCPU thread's id, once it runs.
    pub fn tid(&self) -> Option<i32> {
        let t = self.tid.load(Ordering::Acquire);
        (t != 0).then_some(t)
    }

    /// The thread records its id (call on the vCPU thread).
    pub fn set_tid(&self, tid: i32) {
        self.tid.store(tid, Ordering::Release);
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    pub fn set_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// The current request (read by the vCPU thread at each loop turn).
    pub fn request(&self) -> Request {
        self.ctl.lock().request
    }

    pub fn reported(&self) -> Reported {
        self.ctl.lock().reported
    }

    /// The thread reports its state.
    pub fn report(&self, r: Reported) {
        let mut c = self.ctl.lock();
        if c.reported != r {
            c.reported = r;
            self.cv.notify_all();
        }
    }

    /// Asks the thread to pause, run or stop, and gets it out of `KVM_RUN`
    /// or its wait to look.
    pub fn send(&self, r: Request) {
        {
            let mut c = self.ctl.lock();
            if c.request == Request::Stop {
                return;
            }
            c.request = r;
            c.woken = true;
            self.cv.notify_all();
        }
        self.kicker.kick();
    }

    /// Waits until the thread reports one of `states` or `deadline` passes.
    pub fn wait_reported(&self, states: &[Reported], deadline: Instant) -> bool {
        let mut c = self.ctl.lock();
        while !states.contains(&c.reported) {
            if self.cv.wait_until(&mut c, deadline).timed_out() {
                return states.contains(&c.reported);
            }
        }
        true
    }

    /// Wakes the vCPU if it waits in the VMM (an event arrived).
    pub fn wake(&self) {
        let mut c = self.ctl.lock();
        c.woken = true;
        self.cv.notify_all();
    }

    /// Clears a pending wake-up (before re-checking conditions).
    pub fn clear_wake(&self) {
        self.ctl.lock().woken = false;
    }

    /// The vCPU thread waits until woken, a request other than `Run`
    /// arrives, or `deadline`. Consumes the wake-up.
    pub fn wait_event(&self, deadline: Option<Instant>) {
        let mut c = self.ctl.lock();
        while !c.woken && c.request == Request::Run {
            match deadline {
                Some(d) => {
                    if self.cv.wait_until(&mut c, d).timed_out() {
                        break;
                    }
                }
                None => self.cv.wait(&mut c),
            }
        }
        c.woken = false;
    }

    /// The vCPU thread, paused, waits for a request other than `Pause`.
    pub fn wait_unpaused(&self) -> Request {
        let mut c = self.ctl.lock();
        while c.request == Request::Pause {
            self.cv.wait(&mut c);
        }
        c.request
    }
}
