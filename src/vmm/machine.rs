//! State shared by the vCPU threads, the event loop and the main thread:
//! guest memory, the clock, devices, the Xen personality, the vCPU handles,
//! and how the guest ended.
//!
//! Lock order (outer first): `Machine::exit` is a leaf; `VcpuHandle`'s
//! lock is a leaf; the Xen domain's own locks are documented in
//! `hypercalls` and are never held while taking `exit`.

use crate::migration::stream::libxc::CpuidLeaf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::devices::{Bus, ConsoleOut, PlatformDevices};
use crate::kvm::{Interrupts, MemSlots};
use crate::testing::BenchPorts;
use crate::vcpu::{Reported, Request, VcpuHandle};
use crate::vmm::threads::{self, ThreadKind};
use crate::vmm::{VmConfig, VmError};
use crate::xen::clock::Clock;
use crate::xen::{VcpuWake, Xen, XenCaps};

/// How a guest run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off (SCHEDOP_shutdown poweroff or ACPI).
    Poweroff,
    /// The guest crashed (SHUTDOWN_crash, an unhandled exit, ...).
    Crash(CrashCause),
    /// The guest asked for a reboot (or triple-faulted, which Xen treats as
    /// a reboot request).
    Reboot(RebootCause),
    /// The guest suspended itself (SHUTDOWN_suspend) with nobody to resume it.
    Suspend,
    /// --timeout expired.
    Timeout(Duration),
    /// The VMM failed (the message says how and what to do).
    Error(String),
    /// Stopped from outside the guest (a signal, a closed stdout): the
    /// string says why.
    Stopped(String),
    /// Saved to this file by `xenkvm save` and stopped (as `xl save`).
    Saved(String),
    /// Migrated away (`xenkvm migrate`): the destination runs it now; the
    /// string says where.
    Migrated(String),
}

/// Why the guest rebooted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RebootCause {
    #[error("the guest asked for a reboot (SHUTDOWN_reboot)")]
    GuestRequest,
    #[error("triple fault on vCPU {vcpu}{}", rip.map(|r| format!(" at RIP {r:#x}")).unwrap_or_default())]
    TripleFault { vcpu: u32, rip: Option<u64> },
    #[error("system reset")]
    SystemReset,
    #[error("reset through an I/O port")]
    PortReset,
}

/// Why the guest crashed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrashCause {
    #[error("the guest reported a crash (SHUTDOWN_crash)")]
    GuestReported,
    #[error("the guest's watchdog fired (SHUTDOWN_watchdog)")]
    Watchdog,
    #[error("the guest shut down with reason {0}")]
    ShutdownReason(u8),
    #[error("vCPU {vcpu}: KVM internal error, suberror {suberror}")]
    KvmInternal { vcpu: u32, suberror: u32 },
    #[error("KVM reported a guest crash")]
    KvmCrashEvent,
    #[error("unknown KVM system event {0}")]
    UnknownSystemEvent(u32),
    #[error("vCPU {vcpu}: {what}")]
    Unemulated { vcpu: u32, what: String },
}

/// The buses and what is registered on them.
pub struct Buses {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub devices: PlatformDevices,
    pub bench: Option<Arc<BenchPorts>>,
}

/// The vCPU handles as the Xen glue's wake-up capability.
#[derive(Clone)]
struct VcpuSet {
    vcpus: Vec<Arc<VcpuHandle>>,
    /// Held while requests are changed for a pause and back, here across
    /// the whole pause and in [`Machine::pause`]/[`Machine::resume`] while
    /// they send theirs (a leaf lock): a pause here never lets a vCPU run
    /// that the user paused meanwhile.
    pause_lock: Arc<Mutex<()>>,
}

impl VcpuWake for VcpuSet {
    fn wake(&self, vcpu: u32) {
        if let Some(h) = self.vcpus.get(vcpu as usize) {
            h.wake();
        }
    }
    fn kick(&self, vcpu: u32) {
        if let Some(h) = self.vcpus.get(vcpu as usize) {
            h.kicker().kick();
        }
    }
    fn with_all_paused(&self, name: String, timeout: Duration, f: Box<dyn FnOnce(bool) + Send>) {
        let set = self.clone();
        let (asked_tx, asked_rx) = std::sync::mpsc::channel::<()>();
        let started = threads::spawn(
            ThreadKind::SchedMonitor,
            name,
            Arc::new(|msg| tracing::warn!(%msg, "a pause of every vCPU")),
            move || {
                let mut f = Some(f);
                let paused = set.paused_for(
                    timeout,
                    &mut || {
                        let _ = asked_tx.send(());
                    },
                    &mut || {
                        if let Some(f) = f.take() {
                            f(true)
                        }
                    },
                );
                if let (false, Some(f)) = (paused, f) {
                    f(false)
                }
            },
        );
        match started {
            // A user's pause holding the lock waits for the caller too: do
            // not wait long for the ask then.
            Ok(_) => {
                let _ = asked_rx.recv_timeout(ASK_WAIT);
            }
            // `f` went with the closure: nothing was paused or changed.
            Err(e) => tracing::warn!(%e, "no thread to pause the vCPUs on: nothing done"),
        }
    }
}

/// How long [`VcpuWake::with_all_paused`] waits for its thread to ask every
/// vCPU to pause.
const ASK_WAIT: Duration = Duration::from_millis(100);

impl VcpuSet {
    /// Runs `f` with every vCPU paused (see [`VcpuWake::with_all_paused`]);
    /// false, and `f` not run, if they did not all pause within `timeout`.
    fn paused_for(
        &self,
        timeout: Duration,
        asked_cb: &mut dyn FnMut(),
        f: &mut dyn FnMut(),
    ) -> bool {
        let _g = self.pause_lock.lock();
        // Only those asked to run are paused and let go again (a VM paused
        // by the user stays paused).
        let asked: Vec<bool> = self
            .vcpus
            .iter()
            .map(|h| h.request() == Request::Run)
            .collect();
        for (h, _) in self.vcpus.iter().zip(&asked).filter(|(_, a)| **a) {
            h.send(Request::Pause);
        }
        asked_cb();
        let until = Instant::now() + timeout;
        let ok = self
            .vcpus
            .iter()
            .all(|h| h.wait_reported(&[Reported::Paused, Reported::Stopped], until));
        if ok {
            f();
        }
        for (h, _) in self.vcpus.iter().zip(&asked).filter(|(_, a)| **a) {
            h.send(Request::Run);
        }
        ok
    }
}

pub struct Machine {
    pub map: gpc::MemoryMap,
    pub mem: crate::GuestMem,
    pub clock: Clock,
    /// The port-I/O and MMIO buses.
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub devices: PlatformDevices,
    /// The test guest's bench ports, when the VM was built with them.
    pub bench: Option<Arc<BenchPorts>>,
    pub console: Arc<ConsoleOut>,
    pub nr_vcpus: u32,
    /// One handle per vCPU (control, wake-up, kick, counters).
    pub vcpus: Vec<Arc<VcpuHandle>>,
    pub xen: Xen,
    /// The in-kernel irqchip (a save reads the PIC, IOAPIC and PIT).
    pub irq: Interrupts,
    /// The memslots (a live migration logs the RAM slots' dirty pages).
    pub slots: Arc<MemSlots>,
    /// VM exits (KVM_RUN returns) of all vCPUs, for the status line.
    pub exits: AtomicU64,
    /// Hypercalls of all vCPUs, for the status line.
    pub hypercalls: AtomicU64,
    /// Host TSC cycles the vCPU threads spent handling exits (from
    /// `KVM_RUN`'s return to the exit's decision, plus the work before each
    /// entry), waits excluded: the VMM's share of a guest's exit costs.
    pub vmm_cycles: AtomicU64,
    /// Where a cooperative suspend for a save stands.
    pub suspend: crate::vmm::suspend::SuspendGate,
    /// The guest's CPUID as a save or migration stream records it
    /// (X86_CPUID_POLICY; vCPU 0's, as Xen's domain-wide policy).
    pub cpuid_policy: Vec<CpuidLeaf>,
    stopping: Arc<AtomicBool>,
    exit: Mutex<Option<GuestExit>>,
    exit_cv: Condvar,
    /// Shared with the Xen glue's pauses (see `VcpuSet::pause_lock`); also
    /// taken by a vCPU that holds itself paused for a save.
    pub(crate) pause_lock: Arc<Mutex<()>>,
}

impl Machine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        map: gpc::MemoryMap,
        clock: Clock,
        buses: Buses,
        stopping: Arc<AtomicBool>,
        console: Arc<ConsoleOut>,
        cfg: &VmConfig,
        vcpus: Vec<Arc<VcpuHandle>>,
        irq: Interrupts,
        slots: Arc<MemSlots>,
        cpuid_policy: Vec<CpuidLeaf>,
    ) -> Result<Arc<Machine>, VmError> {
        let irqchip = irq.clone();
        let pause_lock = Arc::new(Mutex::new(()));
        let caps = XenCaps {
            irq,
            slots: slots.clone(),
            vcpus: Arc::new(VcpuSet {
                vcpus: vcpus.clone(),
                pause_lock: pause_lock.clone(),
            }),
        };
        let xen = Xen::new(cfg, &map, clock, console.clone(), caps).map_err(VmError::XenDomain)?;
        Ok(Arc::new(Machine {
            xen,
            irq: irqchip,
            slots,
            mem: map.guest_memory().clone(),
            map,
            clock,
            pio: buses.pio,
            mmio: buses.mmio,
            devices: buses.devices,
            bench: buses.bench,
            console,
            nr_vcpus: cfg.vcpus,
            vcpus,
            exits: AtomicU64::new(0),
            hypercalls: AtomicU64::new(0),
            vmm_cycles: AtomicU64::new(0),
            suspend: crate::vmm::suspend::SuspendGate::new(),
            cpuid_policy,
            stopping,
            exit: Mutex::new(None),
            exit_cv: Condvar::new(),
            pause_lock,
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
        {
            let _g = self.pause_lock.lock();
            for h in &self.vcpus {
                h.send(Request::Pause);
            }
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
        let _g = self.pause_lock.lock();
        for h in &self.vcpus {
            h.send(Request::Run);
        }
        tracing::info!("VM resumed");
    }
}
