//! State shared by the vCPU threads and the main thread: the VM, guest
//! memory, the clock, devices, the Xen personality, per-vCPU wake-ups, and
//! how the guest ended.
//!
//! Lock order (outer first): `Machine::exit` is a leaf; `Waker::lock` is a
//! leaf; the Xen domain's own locks are documented in `hypercalls` and are
//! never held while taking `exit`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use parking_lot::{Condvar, Mutex};

use crate::clock::Clock;
use crate::devices::{ConsoleOut, PortBus};
use crate::vm::{VmConfig, VmError};
use crate::xen::Xen;

/// How a guest run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off (SCHEDOP_shutdown poweroff or ACPI).
    Poweroff,
    /// The guest crashed (SHUTDOWN_crash, an unhandled exit, ...).
    Crash(String),
    /// The guest asked for a reboot (or triple-faulted, which Xen treats as
    /// a reboot request).
    Reboot(String),
    /// The guest suspended itself (SHUTDOWN_suspend) with nobody to resume it.
    Suspend,
    /// --timeout expired.
    Timeout(Duration),
    /// The VMM failed.
    Error(String),
    /// Stopped from outside the guest (a signal, a closed stdout): the
    /// string says why.
    Stopped(String),
}

/// Wakes a vCPU that waits in the VMM (SCHEDOP_block/poll).
#[derive(Default)]
pub struct Waker {
    lock: Mutex<bool>,
    cv: Condvar,
}

impl Waker {
    /// Marks work pending and wakes the waiter.
    pub fn wake(&self) {
        *self.lock.lock() = true;
        self.cv.notify_all();
    }

    /// Waits until woken or `deadline`. Returns true if woken. Consumes
    /// the wake-up.
    pub fn wait(&self, deadline: Option<Instant>) -> bool {
        let mut g = self.lock.lock();
        while !*g {
            match deadline {
                Some(d) => {
                    if self.cv.wait_until(&mut g, d).timed_out() {
                        break;
                    }
                }
                None => self.cv.wait(&mut g),
            }
        }
        std::mem::replace(&mut *g, false)
    }

    /// Clears a pending wake-up (before re-checking conditions).
    pub fn clear(&self) {
        *self.lock.lock() = false;
    }
}

pub struct Machine {
    pub vm: VmFd,
    pub map: gpc::MemoryMap,
    pub mem: crate::GuestMem,
    pub clock: Clock,
    pub ports: PortBus,
    pub console: Arc<ConsoleOut>,
    pub nr_vcpus: u32,
    pub wakers: Vec<Waker>,
    /// Per vCPU: host TSC when its thread entered KVM_RUN (0 outside).
    pub run_since: Vec<AtomicU64>,
    /// Per vCPU: the monitor kicked it for staying in KVM_RUN too long.
    pub stall_kicked: Vec<AtomicBool>,
    /// Per vCPU: it has run guest code (vCPU 0 from the start, APs after
    /// INIT/SIPI). The monitor leaves APs that wait for SIPI alone.
    pub started: Vec<AtomicBool>,
    /// Per vCPU: its thread (`pthread_t`), for kicks; 0 until it starts.
    pub threads: Vec<AtomicU64>,
    pub xen: Xen,
    /// VM exits (KVM_RUN returns) of all vCPUs, for the status line.
    pub exits: AtomicU64,
    /// Hypercalls of all vCPUs, for the status line.
    pub hypercalls: AtomicU64,
    stopping: AtomicBool,
    exit: Mutex<Option<GuestExit>>,
    exit_cv: Condvar,
}

impl Machine {
    pub fn new(
        vm: VmFd,
        map: gpc::MemoryMap,
        clock: Clock,
        ports: PortBus,
        console: Arc<ConsoleOut>,
        cfg: &VmConfig,
    ) -> Result<Arc<Machine>, VmError> {
        let xen = Xen::new(cfg, &map, clock, console.clone())
            .map_err(|e| VmError::Other(format!("cannot create the Xen domain: {e}")))?;
        let m = Arc::new(Machine {
            xen,
            vm,
            mem: map.guest_memory().clone(),
            map,
            clock,
            ports,
            console,
            nr_vcpus: cfg.vcpus,
            wakers: (0..cfg.vcpus).map(|_| Waker::default()).collect(),
            run_since: (0..cfg.vcpus).map(|_| AtomicU64::new(0)).collect(),
            stall_kicked: (0..cfg.vcpus).map(|_| AtomicBool::new(false)).collect(),
            threads: (0..cfg.vcpus).map(|_| AtomicU64::new(0)).collect(),
            started: (0..cfg.vcpus).map(|i| AtomicBool::new(i == 0)).collect(),
            exits: AtomicU64::new(0),
            hypercalls: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_cv: Condvar::new(),
        });
        m.xen.start(Arc::downgrade(&m));
        Ok(m)
    }

    /// Records how the guest ended (the first reason wins) and stops it.
    pub fn request_exit(&self, why: GuestExit) {
        let mut e = self.exit.lock();
        if e.is_none() {
            tracing::info!(?why, "guest stopping");
            *e = Some(why);
        }
        self.stopping.store(true, Ordering::Release);
        self.exit_cv.notify_all();
        drop(e);
        for w in &self.wakers {
            w.wake();
        }
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Waits for the guest to end or the deadline.
    pub fn wait_exit(&self, deadline: Option<Instant>) -> GuestExit {
        let start = Instant::now();
        let mut e = self.exit.lock();
        while e.is_none() {
            match deadline {
                Some(d) => {
                    if self.exit_cv.wait_until(&mut e, d).timed_out() && e.is_none() {
                        *e = Some(GuestExit::Timeout(start.elapsed()));
                    }
                }
                None => self.exit_cv.wait(&mut e),
            }
        }
        let out = e
            .clone()
            .unwrap_or(GuestExit::Error("no exit reason".into()));
        self.stopping.store(true, Ordering::Release);
        out
    }

    /// Starts the monitor that finds vCPUs stuck inside KVM_RUN: a guest
    /// `vmcall`/`vmmcall` on a KVM without Xen support never exits, it spins
    /// until a signal. A vCPU that stays in KVM_RUN longer than `STALL` is
    /// kicked; its thread then looks at the instruction at RIP.
    pub fn start_monitor(self: &Arc<Self>) {
        const STALL: Duration = Duration::from_millis(20);
        let weak = Arc::downgrade(self);
        let r = std::thread::Builder::new()
            .name("vcpu-monitor".into())
            .spawn(move || loop {
                std::thread::sleep(STALL / 2);
                let Some(m) = weak.upgrade() else { return };
                if m.stopping() {
                    return;
                }
                m.xen.reassert_upcalls(&m.started);
                let now = crate::clock::host_tsc();
                let stall = u64::from(m.clock.tsc_khz) * STALL.as_millis() as u64;
                for (i, since) in m.run_since.iter().enumerate() {
                    let s = since.load(Ordering::Relaxed);
                    let t = m.threads[i].load(Ordering::Relaxed);
                    // Kick on every tick while it stays stuck: a kick that lands
                    // just before the thread enters KVM_RUN is otherwise lost.
                    let up = m.started[i].load(Ordering::Acquire);
                    if up && s != 0 && t != 0 && now.saturating_sub(s) > stall {
                        m.stall_kicked[i].store(true, Ordering::Release);
                        // SAFETY: `t` is the pthread_t of a vCPU thread of this
                        // machine; the threads are joined only after the monitor
                        // sees `stopping`, and signalling a finished-but-unjoined
                        // thread is harmless. The signal's handler does nothing.
                        unsafe {
                            libc::pthread_kill(t as libc::pthread_t, crate::vcpu::kick_signal())
                        };
                    }
                }
            });
        if let Err(e) = r {
            tracing::warn!(%e, "cannot start the vCPU monitor: vmcall guests will hang");
        }
    }

    /// Stops every vCPU thread: sets the flag, wakes waiters and signals
    /// threads inside KVM_RUN until they have all left it.
    pub fn stop_vcpus(&self, handles: &[JoinHandle<()>]) {
        self.stopping.store(true, Ordering::Release);
        for w in &self.wakers {
            w.wake();
        }
        let until = Instant::now() + Duration::from_secs(5);
        while handles.iter().any(|h| !h.is_finished()) && Instant::now() < until {
            for h in handles.iter().filter(|h| !h.is_finished()) {
                crate::vcpu::kick(h);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
