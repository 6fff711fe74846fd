//! State shared by the vCPU threads, the event loop and the main thread:
//! guest memory, the clock, devices, the Xen personality, the vCPU handles,
//! and how the guest ended.
//!
//! Lock order (outer first): `Machine::exit` is a leaf; `VcpuHandle`'s
//! lock is a leaf; the Xen domain's own locks are documented in
//! `hypercalls` and are never held while taking `exit`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::devices::{ConsoleOut, PortBus};
use crate::kvm::{Interrupts, MemSlots};
use crate::vcpu::{Reported, Request, VcpuHandle};
use crate::vmm::{VmConfig, VmError};
use crate::xen::clock::Clock;
use crate::xen::{VcpuWake, Xen, XenCaps};

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
}

/// The vCPU handles as the Xen glue's wake-up capability.
struct VcpuSet(Vec<Arc<VcpuHandle>>);

impl VcpuWake for VcpuSet {
    fn wake(&self, vcpu: u32) {
        if let Some(h) = self.0.get(vcpu as usize) {
            h.wake();
        }
    }
}

pub struct Machine {
    pub map: gpc::MemoryMap,
    pub mem: crate::GuestMem,
    pub clock: Clock,
    pub ports: PortBus,
    pub console: Arc<ConsoleOut>,
    pub nr_vcpus: u32,
    /// One handle per vCPU (control, wake-up, kick, counters).
    pub vcpus: Vec<Arc<VcpuHandle>>,
    pub xen: Xen,
    stopping: Arc<AtomicBool>,
    exit: Mutex<Option<GuestExit>>,
    exit_cv: Condvar,
}

impl Machine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        map: gpc::MemoryMap,
        clock: Clock,
        ports: PortBus,
        console: Arc<ConsoleOut>,
        cfg: &VmConfig,
        vcpus: Vec<Arc<VcpuHandle>>,
        irq: Interrupts,
        slots: Arc<MemSlots>,
    ) -> Result<Arc<Machine>, VmError> {
        let stopping = Arc::new(AtomicBool::new(false));
        let caps = XenCaps {
            irq,
            slots,
            vcpus: Arc::new(VcpuSet(vcpus.clone())),
            stopping: stopping.clone(),
        };
        let xen = Xen::new(cfg, &map, clock, console.clone(), caps).map_err(VmError::XenDomain)?;
        Ok(Arc::new(Machine {
            xen,
            mem: map.guest_memory().clone(),
            map,
            clock,
            ports,
            console,
            nr_vcpus: cfg.vcpus,
            vcpus,
            stopping,
            exit: Mutex::new(None),
            exit_cv: Condvar::new(),
        }))
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
        for h in &self.vcpus {
            h.send(Request::Stop);
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
        drop(e);
        self.stopping.store(true, Ordering::Release);
        for h in &self.vcpus {
            h.send(Request::Stop);
        }
        out
    }

    /// Pauses every vCPU: none runs guest code until [`resume`](Self::resume).
    /// Each completes a pending I/O or MMIO exit first. Fails if a vCPU does
    /// not confirm within `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<(), VmError> {
        for h in &self.vcpus {
            h.send(Request::Pause);
        }
        let until = Instant::now() + timeout;
        for h in &self.vcpus {
            if !h.wait_reported(&[Reported::Paused, Reported::Stopped], until) {
                return Err(VmError::PauseTimeout {
                    vcpu: h.id,
                    state: h.reported(),
                });
            }
        }
        tracing::info!("VM paused");
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        for h in &self.vcpus {
            h.send(Request::Run);
        }
        tracing::info!("VM resumed");
    }
}
