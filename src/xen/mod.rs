//! Glue between the vCPU threads and the Xen personality (`hypercalls`):
//! the [`Platform`] the domain calls back into (console, overlays through
//! gpc, time, upcall injection through the in-kernel LAPIC, timers, the
//! dom0-side xenstore and console backends), guest-virtual memory access
//! for handlers, and the hypercall page (its port is a device on the bus).
//!
//! The glue is handed narrow capabilities when it is built ([`XenCaps`]):
//! interrupt injection, the memslot allocator, a way to wake a vCPU and
//! the VM's stop flag; it never reaches back into the VMM. Backend work is
//! not done on the notifying vCPU: `notify_backend` writes the backend's
//! eventfd and the VMM's event loop calls [`Xen::backend_notified`].
//!
//! Lock order (outer first): `Xen::xenstore` then `Xen::blk`; `Xen::console_backend` (each
//! taken alone, never while a domain lock is held: the domain calls
//! `notify_backend` with no lock held); `XenPlatform::overlays` is a leaf;
//! the timers' lock is a leaf.

pub mod clock;
pub mod hcall_page;
mod saved;
pub mod sched;
pub mod timers;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use hypercalls::{
    Domain, DomainConfig, E820Entry, Errno, Gfn, GuestTime, GuestWidth, Hypercall, MemFault,
    Outcome, OverlayId, Platform, RunstateAreaSpec, RunstateInfo, SharedPage, VcpuAccess, VcpuId,
};
use kvm_bindings::{kvm_regs, kvm_sregs};
use parking_lot::Mutex;
use runstate::{Accounting, Layout, RunstateArea, State};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86;
use crate::backends::blkback::{BlkBackend, BlkConfig, BlkHost, SpawnFn};
use crate::backends::console::ConsoleBackend;
use crate::backends::netback::{NetBackend, NetConfig};
use crate::backends::xenstore::{self, RingPage, XenstoreServer};
use crate::boot::layout;
use crate::devices::ConsoleOut;
use crate::kvm::{Interrupts, MemSlots};
use crate::vmm::machine::{CrashCause, GuestExit, RebootCause};
use crate::vmm::VmConfig;
use crate::xen::clock::Clock;
use crate::GuestMem;
use timers::{TimerKind, XenTimers};

/// The VMM's ids for the dom0 ends of the service channels.
pub const REMOTE_STORE: u32 = 1;
pub const REMOTE_CONSOLE: u32 = 2;

/// Wakes a vCPU that waits in the VMM (`SCHEDOP_block`/`poll`).
pub trait VcpuWake: Send + Sync {
    fn wake(&self, vcpu: u32);
    /// Gets `vcpu` out of `KVM_RUN` (or makes its next entry return at once).
    fn kick(&self, vcpu: u32);
    /// On a thread of the VMM's own called `name` (the caller may be a vCPU
    /// thread, which cannot wait for itself to pause), runs `f(true)` while
    /// no vCPU runs guest code (each paused, as a save pauses them), then
    /// lets each go on as it was asked to before; `f(false)`, with the
    /// vCPUs running, if they did not all pause within `timeout` (neither,
    /// logged, if no thread could be started). Returns once the pause is
    /// asked for (or after a short wait if that thread cannot ask yet): a
    /// vCPU thread calling from a hypercall then pauses before it next
    /// enters the guest, its guest seeing nothing run in between.
    fn with_all_paused(&self, name: String, timeout: Duration, f: Box<dyn FnOnce(bool) + Send>);
}

/// What the Xen glue may do to the VM, handed to it when it is built.
#[derive(Clone)]
pub struct XenCaps {
    /// Upcall and NMI injection into the in-kernel irqchip.
    pub irq: Interrupts,
    /// Memslots for overlays outside RAM.
    pub slots: Arc<MemSlots>,
    /// Wake-ups for vCPUs waiting in the VMM.
    pub vcpus: Arc<dyn VcpuWake>,
}

/// How long an upcall may stay pending before it is sent again, while the
/// target vCPU has not yet taken one since it started (see
/// [`UpcallNet`]).
const UPCALL_RECHECK: Duration = Duration::from_millis(10);

/// The safety net for upcalls KVM drops. Xen re-delivers a pending upcall
/// when the guest sets its vector or callback (done in `hypercalls`),
/// unmasks a port (idem), and, like KVM's own Xen support, when the guest
/// software-enables its local APIC: an MSI to a software-disabled LAPIC is
/// dropped, and Linux registers an AP's upcall vector before it enables
/// that AP's LAPIC. That enable is handled inside KVM (no exit here), so
/// until a vCPU has shown that it takes upcalls (one was raised and the
/// guest cleared `evtchn_upcall_pending`), a still-pending upcall is sent
/// again every [`UPCALL_RECHECK`]. After that the LAPIC's IRR holds every
/// upcall until the guest takes it, and nothing is re-sent: re-sending to
/// a running vCPU only forces an exit (on a shadow-paging host, a refill
/// of the pages it touches next). A vCPU that goes down and up again is on
/// the net again; so is vCPU 0 while the callback is a GSI pulse.
struct UpcallNet {
    /// Per vCPU: an upcall was raised since it started.
    raised: Vec<AtomicBool>,
    /// Per vCPU: the guest took an upcall since it started.
    proven: Vec<AtomicBool>,
}

impl UpcallNet {
    fn new(vcpus: u32) -> Self {
        let flags = || (0..vcpus).map(|_| AtomicBool::new(false)).collect();
        UpcallNet {
            raised: flags(),
            proven: flags(),
        }
    }

    /// `vcpu` (re)started: its LAPIC starts software-disabled.
    fn reset(&self, vcpu: u32) {
        if let (Some(r), Some(p)) = (
            self.raised.get(vcpu as usize),
            self.proven.get(vcpu as usize),
        ) {
            r.store(false, Ordering::Relaxed);
            p.store(false, Ordering::Relaxed);
        }
    }

    /// An upcall was raised to `vcpu`: whether the re-check must watch it.
    fn raised(&self, vcpu: u32) -> bool {
        let i = vcpu as usize;
        if let Some(r) = self.raised.get(i) {
            r.store(true, Ordering::Relaxed);
        }
        !self
            .proven
            .get(i)
            .is_some_and(|p| p.load(Ordering::Relaxed))
    }

    /// At the re-check: `pending` is `evtchn_upcall_pending` now. Returns
    /// whether to send the upcall again.
    fn check(&self, vcpu: u32, pending: bool, gsi_route: bool) -> bool {
        let i = vcpu as usize;
        let (Some(r), Some(p)) = (self.raised.get(i), self.proven.get(i)) else {
            return false;
        };
        if !pending {
            if r.load(Ordering::Relaxed) {
                p.store(true, Ordering::Relaxed);
            }
            return false;
        }
        gsi_route || !p.load(Ordering::Relaxed)
    }
}

/// HVM params the VMM sets (hvm/params.h, from xen-abi).
const HVM_PARAM_STORE_PFN: u32 = xen_abi::HVM_PARAM_STORE_PFN;
const HVM_PARAM_STORE_EVTCHN: u32 = xen_abi::HVM_PARAM_STORE_EVTCHN;
const HVM_PARAM_CONSOLE_PFN: u32 = xen_abi::HVM_PARAM_CONSOLE_PFN;
const HVM_PARAM_CONSOLE_EVTCHN: u32 = xen_abi::HVM_PARAM_CONSOLE_EVTCHN;

/// The calling vCPU's state at a hypercall.
pub struct VcpuCtx {
    pub id: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

/// What the vCPU thread does after a hypercall.
#[derive(Debug)]
pub enum HypercallResult {
    Return(i64),
    Block {
        deadline: Option<Instant>,
        ports: Option<Vec<u32>>,
    },
    Yield,
    Exit(GuestExit),
}

pub struct Xen {
    pub domain: Arc<Domain>,
    platform: Arc<XenPlatform>,
    mem: GuestMem,
    clock: Clock,
    /// Written by `notify_backend`; the event loop serves the backend.
    store_event: EventFd,
    console_event: EventFd,
    /// Upcalls re-sent by the re-check (a count for the logs and tests).
    pub reasserted: AtomicU64,
    store_ring: u64,
    console_ring: u64,
    store_port: u32,
    console_port: u32,
    xenstore: Mutex<XenstoreServer>,
    console_backend: Mutex<ConsoleBackend>,
    /// The vbd backends (taken inside `xenstore`, never the other way).
    blk: Mutex<Option<BlkBackend>>,
    /// The vif backends (taken inside `xenstore`, never the other way).
    net: Mutex<Option<NetBackend>>,
}

/// Where the xenstore and console rings are (guest-physical addresses):
/// Xen's special pages ([`layout::special`]), or, for a guest restored from
/// an image without xenkvm's Xen-state record (a cooperative save, or an
/// image from a Xen host), the frames its `HVM_PARAM_STORE_PFN` and
/// `HVM_PARAM_CONSOLE_PFN` name: the guest keeps the rings mapped where
/// they were when it suspended (Linux re-reads only the event channels).
/// A frame that is not RAM here is refused with a warning and the default
/// used (the guest then loses that ring, as it would on Xen).
fn ring_frames(cfg: &VmConfig, mem: &GuestMem) -> (u64, u64) {
    let mut store = layout::special_page(layout::special::XENSTORE);
    let mut console = layout::special_page(layout::special::CONSOLE);
    if let Some((_, img)) = cfg.restore.as_ref().filter(|(_, i)| i.xen_state.is_none()) {
        for (param, name, ring) in [
            (HVM_PARAM_STORE_PFN, "STORE_PFN", &mut store),
            (HVM_PARAM_CONSOLE_PFN, "CONSOLE_PFN", &mut console),
        ] {
            let Some(&(_, pfn)) = img.params.iter().find(|(i, _)| *i == u64::from(param)) else {
                continue;
            };
            let gpa = pfn.saturating_mul(4096);
            if mem.check_range(GuestAddress(gpa), 4096) {
                if gpa != *ring {
                    tracing::info!(
                        param = name,
                        pfn = format_args!("{pfn:#x}"),
                        "restore: the ring stays where the image's param puts it"
                    );
                }
                *ring = gpa;
            } else {
                tracing::warn!(
                    param = name,
                    pfn = format_args!("{pfn:#x}"),
                    "restore: the image's ring frame is not RAM here; the ring moves to the default"
                );
            }
        }
    }
    (store, console)
}

impl Xen {
    pub fn new(
        cfg: &VmConfig,
        map: &gpc::MemoryMap,
        clock: Clock,
        console: Arc<ConsoleOut>,
        caps: XenCaps,
    ) -> Result<Self, String> {
        let mem = map.guest_memory().clone();
        let ev = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"));
        let (store_event, console_event) = (ev()?, ev()?);
        let platform = Arc::new(XenPlatform {
            map: map.clone(),
            mem: mem.clone(),
            clock,
            console: console.clone(),
            xen_console: crate::devices::XenConsole::new(
                cfg.xen_console,
                console.clone(),
                "console_io",
            ),
            overlays: Mutex::new(Overlays::default()),
            timers: XenTimers::new(cfg.vcpus, clock).map_err(|e| format!("timerfd: {e}"))?,
            backend_events: [
                store_event
                    .try_clone()
                    .map_err(|e| format!("eventfd: {e}"))?,
                console_event
                    .try_clone()
                    .map_err(|e| format!("eventfd: {e}"))?,
            ],
            blk_ports: Mutex::new(HashMap::new()),
            caps: caps.clone(),
            // vCPU 0 runs from the start; APs are offline until INIT/SIPI.
            runstates: (0..cfg.vcpus)
                .map(|id| {
                    let st = if id == 0 {
                        State::Running
                    } else {
                        State::Offline
                    };
                    Mutex::new(VcpuRunstate {
                        acct: Accounting::new(st, clock.system_time()),
                        area: None,
                        host: sched::HostTrack::default(),
                    })
                })
                .collect(),
            runstate_specs: Mutex::new(vec![None; cfg.vcpus as usize]),
            update_flag: OnceLock::new(),
            starts: crate::vcpu::updown::StartSlots::new(cfg.vcpus),
            sched: sched::SchedShared::new(cfg.vcpus).map_err(|e| format!("eventfd: {e}"))?,
            upcall_net: UpcallNet::new(cfg.vcpus),
            this: OnceLock::new(),
        });
        let _ = platform.this.set(Arc::downgrade(&platform));
        let dcfg = DomainConfig {
            domid: cfg.domid,
            vcpus: cfg.vcpus,
            handle: uuid_for(cfg),
            ..Default::default()
        };
        let domain = Arc::new(Domain::new(dcfg, platform.clone()).map_err(|e| e.to_string())?);
        let _ = platform.update_flag.set(Arc::downgrade(&domain));
        let (store_ring, console_ring) = ring_frames(cfg, &mem);
        let store_port = domain
            .bind_backend_port(REMOTE_STORE)
            .map_err(|e| e.to_string())?
            .get();
        let console_port = domain
            .bind_backend_port(REMOTE_CONSOLE)
            .map_err(|e| e.to_string())?
            .get();
        for (p, v) in [
            (HVM_PARAM_STORE_PFN, store_ring >> 12),
            (HVM_PARAM_STORE_EVTCHN, u64::from(store_port)),
            (HVM_PARAM_CONSOLE_PFN, console_ring >> 12),
            (HVM_PARAM_CONSOLE_EVTCHN, u64::from(console_port)),
        ] {
            domain.set_param_internal(p, v).map_err(|e| e.to_string())?;
        }
        let mut xcfg =
            xenstore::DomainConfig::new(cfg.domid, &cfg.name, uuid_for(cfg), cfg.mem_mib * 1024);
        xcfg.vcpus = cfg.vcpus;
        xcfg.store = Some(xenstore::RingRef {
            gfn: store_ring >> 12,
            port: store_port,
        });
        xcfg.console = Some(xenstore::RingRef {
            gfn: console_ring >> 12,
            port: console_port,
        });
        let mut xs = XenstoreServer::new_domain(&xcfg).map_err(|e| format!("xenstore: {e}"))?;
        let saved = cfg.restore.as_ref().and_then(|(_, i)| i.xen_state.as_ref());
        let (store_ring, console_ring, store_port, console_port) = match saved {
            // Issue 14: the guest continues with what it had; the rings are in its RAM.
            Some(st) => {
                let up = |v: u32| {
                    cfg.restore
                        .as_ref()
                        .is_some_and(|(_, i)| i.vcpus.get(v as usize).is_some_and(Option::is_some))
                };
                saved::apply(&domain, &platform, &mut xs, st, &up)?
            }
            None => {
                if cfg.restore.is_some() {
                    // The guest resumes here after its own suspend.
                    domain.mask_events_at_resume();
                }
                XenstoreServer::init_page(&GuestRing::new(&mem, store_ring));
                ConsoleBackend::init_page(&GuestRing::new(&mem, console_ring));
                (store_ring, console_ring, store_port, console_port)
            }
        };
        for v in 0..cfg.vcpus {
            if let Some(id) = domain.vcpu(v) {
                domain.update_vcpu_time(id);
            }
        }
        domain.update_wallclock();
        Ok(Xen {
            domain,
            platform,
            mem,
            clock,
            store_event,
            console_event,
            reasserted: AtomicU64::new(0),
            store_ring,
            console_ring,
            store_port,
            console_port,
            xenstore: Mutex::new(xs),
            console_backend: Mutex::new(ConsoleBackend::new()),
            blk: Mutex::new(None),
            net: Mutex::new(None),
        })
    }

    /// The backends' eventfds (remote id, fd), for the event loop.
    pub fn backend_fds(&self) -> [(u32, std::os::fd::RawFd); 2] {
        use std::os::fd::AsRawFd;
        [
            (REMOTE_STORE, self.store_event.as_raw_fd()),
            (REMOTE_CONSOLE, self.console_event.as_raw_fd()),
        ]
    }

    /// The event loop saw backend `remote`'s eventfd: consume it and serve.
    pub fn backend_event(&self, remote: u32) {
        let fd = match remote {
            REMOTE_STORE => &self.store_event,
            REMOTE_CONSOLE => &self.console_event,
            _ => return,
        };
        let _ = fd.read();
        self.backend_notified(remote);
    }

    /// The Xen timers' fds, for the event loop.
    pub fn timer_fds(&self) -> Vec<(TimerKind, std::os::fd::RawFd)> {
        self.platform.timers.fds()
    }

    /// The event loop saw timer `k` fire: what the guest sees of it. A
    /// watchdog that expired returns the shutdown the guest asked for.
    pub fn timer_event(&self, k: TimerKind, started: &dyn Fn(u32) -> bool) -> Option<GuestExit> {
        if !self.platform.timers.expired(k) {
            return None;
        }
        match k {
            TimerKind::Vcpu(v) => {
                if let Some(id) = self.domain.vcpu(v) {
                    tracing::trace!(vcpu = v, "timer fired");
                    self.domain.timer_expired(id);
                }
                None
            }
            TimerKind::Watchdog(wd) => self.domain.watchdog_expired(wd).map(|reason| {
                tracing::warn!(watchdog = wd, "the guest's watchdog expired");
                exit_for_shutdown(reason)
            }),
            TimerKind::UpcallCheck => {
                self.reassert_upcalls(started);
                None
            }
        }
    }

    /// vCPU timers fired so far and the sum of the host's lateness in
    /// firing them (ns from the deadline to the event loop seeing the
    /// timerfd); see [`XenTimers::vcpu_lateness`].
    pub fn timer_lateness(&self) -> (u64, u64) {
        self.platform.timers.vcpu_lateness()
    }

    /// True if `gpa` (the MSR value) names a RAM page the hypercall page can go to.
    pub fn hypercall_page_ok(&self, gpa: u64) -> bool {
        // Bits 11:0 select the page index; we have one page.
        gpa & 0xfff == 0 && self.mem.check_range(GuestAddress(gpa), 4096)
    }

    /// The hypercall-page MSR write: fill the page and latch the shared
    /// structures' layout from the guest's mode (Xen's hvm_latch_shinfo_size).
    pub fn write_hypercall_page(&self, gpa: u64, long: bool) {
        let page = crate::xen::hcall_page::build();
        if let Err(e) = self.mem.write_slice(&page, GuestAddress(gpa)) {
            tracing::warn!(%e, gpa, "cannot write the hypercall page");
        }
        self.domain.latch_width(if long {
            GuestWidth::Bits64
        } else {
            GuestWidth::Bits32
        });
        tracing::debug!(
            gpa = format_args!("{gpa:#x}"),
            long,
            "hypercall page written"
        );
    }

    pub fn hypercall(&self, ctx: &VcpuCtx) -> HypercallResult {
        let long = x86::is_64bit(&ctx.sregs);
        let r = &ctx.regs;
        let call = if long {
            Hypercall::from_regs64(r.rax, r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9)
        } else {
            let l = |v: u64| v as u32;
            Hypercall::from_regs32(
                l(r.rax),
                l(r.rbx),
                l(r.rcx),
                l(r.rdx),
                l(r.rsi),
                l(r.rdi),
                l(r.rbp),
            )
        };
        let access = GuestVcpu {
            ctx,
            mem: &self.mem,
            long,
        };
        let outcome = self.domain.dispatch(&access, &call);
        tracing::trace!(vcpu = ctx.id, ?call, ?outcome, "hypercall");
        match outcome {
            Outcome::Return(v) => HypercallResult::Return(v),
            Outcome::Block { deadline_ns } => HypercallResult::Block {
                deadline: deadline_ns.map(|d| self.instant_at(d)),
                ports: None,
            },
            Outcome::Poll { ports, deadline_ns } => HypercallResult::Block {
                deadline: deadline_ns.map(|d| self.instant_at(d)),
                ports: Some(ports),
            },
            Outcome::Yield => HypercallResult::Yield,
            Outcome::Shutdown { reason } => HypercallResult::Exit(exit_for_shutdown(reason)),
        }
    }

    /// The upcall re-check (see [`UpcallNet`]): re-sends the upcall to
    /// every started vCPU still on the net whose `evtchn_upcall_pending` is
    /// set, and takes off the net those that cleared it. Runs
    /// [`UPCALL_RECHECK`] after an upcall to a vCPU on the net (never while
    /// nothing is pending, so an idle guest costs no wake-ups); a duplicate
    /// is harmless: the guest finds nothing to do.
    pub fn reassert_upcalls(&self, started: &dyn Fn(u32) -> bool) {
        let gsi = matches!(self.domain.callback_via(), hypercalls::CallbackVia::Gsi(_));
        for i in 0..self.platform.caps_vcpus() {
            if !started(i) {
                continue;
            }
            if let Some(id) = self.domain.vcpu(i) {
                let pending = self.domain.upcall_pending(id);
                let gsi_route = gsi && i == 0 && self.domain.upcall_vector(id).is_none();
                if self.platform.upcall_net.check(i, pending, gsi_route) {
                    self.reasserted.fetch_add(1, Ordering::Relaxed);
                    self.platform.raise_upcall(id);
                }
            }
        }
    }

    /// An AP was started by INIT/SIPI (a state staged by `VCPUOP_initialise` is dropped).
    pub fn vcpu_started(&self, vcpu: u32) {
        self.platform.upcall_net.reset(vcpu);
        // An upcall raised before it started (Linux binds an AP's timer and
        // IPIs, and sets its vector, first) was dropped by its disabled
        // LAPIC and leaves `evtchn_upcall_pending` set, so no new event
        // raises it again: the re-check sends it until the guest takes it.
        self.platform
            .timers
            .set_if_idle(TimerKind::UpcallCheck, UPCALL_RECHECK);
        if let Some(id) = self.domain.vcpu(vcpu) {
            self.domain.vcpu_started(id);
        }
        let _ = self.platform.starts.take(vcpu);
    }

    /// Whether the domain has `vcpu` up (not down by `VCPUOP_down`, or never started).
    pub fn vcpu_is_up(&self, vcpu: u32) -> bool {
        self.domain
            .vcpu(vcpu)
            .is_some_and(|id| self.domain.vcpu_is_up(id))
    }

    /// The state `VCPUOP_initialise` gave `vcpu`, once `VCPUOP_up` brought it up (taken: the
    /// vCPU thread loads it, see [`crate::vcpu::updown`]).
    pub fn take_start(&self, vcpu: u32) -> Option<hypercalls::HvmVcpuState> {
        if !self.vcpu_is_up(vcpu) {
            return None;
        }
        self.platform.starts.take(vcpu)
    }

    /// Console input for the guest: queued in the PV console backend, which
    /// moves it into the ring's `in[]` and notifies the guest.
    pub fn console_input(&self, data: &[u8]) -> usize {
        let n = self.console_backend.lock().push_input(data);
        self.backend_notified(REMOTE_CONSOLE);
        n
    }

    /// Schedule in/out of `vcpu` (see [`XenPlatform::runstate_transition`]).
    pub fn runstate_transition(&self, vcpu: u32, state: State, run_delay: Option<u64>) {
        self.platform.runstate_transition(vcpu, state, run_delay);
    }

    /// `vcpu`'s time in each runstate so far (running, runnable, blocked,
    /// offline; ns), the current state's time counted up to now.
    pub fn runstate_times(&self, vcpu: u32) -> [u64; 4] {
        match VcpuId::new(vcpu, self.platform.runstates.len() as u32) {
            Some(v) => self.platform.runstate(v).time,
            None => [0; 4],
        }
    }

    /// `vcpu`'s runstate as the guest's runstate area shows it: the state,
    /// its entry time, and `time[]` up to that entry (not counting the
    /// current state's time since). For save (issue 14).
    pub fn runstate_at_entry(&self, vcpu: u32) -> Option<RunstateInfo> {
        let m = self.platform.runstates.get(vcpu as usize)?;
        // With `bpf-direct`, running the program published at a switch-in
        // the records do not hold yet (the area shows it: a restored guest
        // must not see its entry time go back).
        let d = self.platform.sched_direct_view(vcpu, &m.lock());
        Some(RunstateInfo {
            state: d.state.value(),
            state_entry_time: d.state_entry_time,
            time: d.time,
        })
    }

    /// The host instant of Xen system time `ns`.
    fn instant_at(&self, ns: u64) -> Instant {
        let now = self.clock.system_time();
        Instant::now() + Duration::from_nanos(ns.saturating_sub(now))
    }

    /// True when a vCPU blocked in the VMM must run again.
    pub fn wake_condition(&self, vcpu: u32, ports: Option<&[u32]>) -> bool {
        let Some(id) = self.domain.vcpu(vcpu) else {
            return true;
        };
        match ports {
            Some(p) => self.domain.poll_should_wake(id, p),
            None => self.domain.block_should_wake(id),
        }
    }

    /// Called when a vCPU leaves SCHEDOP_poll.
    pub fn end_block(&self, vcpu: u32, polled: bool) {
        if let (true, Some(id)) = (polled, self.domain.vcpu(vcpu)) {
            self.domain.end_poll(id);
        }
    }

    /// A dom0-side service was kicked by the guest.
    fn backend_notified(&self, remote: u32) {
        tracing::debug!(
            thread = std::thread::current().name().unwrap_or("?"),
            backend = if remote == REMOTE_STORE {
                "xenstore"
            } else {
                "console"
            },
            "backend request served"
        );
        let (notify, port) = match remote {
            REMOTE_STORE => (self.serve_store(), self.store_port),
            REMOTE_CONSOLE => {
                let mut out = ConsoleWriter(&self.platform.console);
                (
                    self.console_backend
                        .lock()
                        .process(&GuestRing::new(&self.mem, self.console_ring), &mut out),
                    self.console_port,
                )
            }
            _ => (false, 0),
        };
        if notify {
            if let Err(e) = self.domain.raise_port(port) {
                tracing::warn!(%e, port, "cannot notify the guest");
            }
        }
    }

    /// Serves the store ring, then the VMM's own watches (the vbd
    /// backends follow their frontends' state), and the ring again for what
    /// those changes fired. True if the guest must be notified.
    fn serve_store(&self) -> bool {
        let ring = GuestRing::new(&self.mem, self.store_ring);
        let mut xs = self.xenstore.lock();
        let mut notify = xs.process(&ring);
        // Each round answers the events of the last; a frontend cannot make
        // this loop forever (its writes arrive through the ring, read once).
        for _ in 0..8 {
            let evs = xs.take_events();
            if evs.is_empty() {
                break;
            }
            let mut blk = self.blk.lock();
            let rest = match blk.as_mut() {
                Some(b) => b.handle_events(&mut xs, evs),
                None => evs,
            };
            drop(blk);
            let mut net = self.net.lock();
            let rest = match net.as_mut() {
                Some(n) => n.handle_events(&mut xs, rest),
                None => rest,
            };
            drop(net);
            for ev in rest {
                tracing::trace!(path = %ev.path, token = %ev.token, "xenstore watch event (no user)");
            }
            notify |= xs.process(&ring);
        }
        notify
    }

    /// Whether the guest has PV disks or NICs (backends xenkvm serves).
    pub fn has_pv_devices(&self) -> bool {
        self.blk.lock().is_some() || self.net.lock().is_some()
    }

    /// A node of the guest's own xenstore directory (`rel` under
    /// `/local/domain/<domid>`), read as the toolstack; `None` if absent.
    pub fn toolstack_read(&self, rel: &str) -> Option<String> {
        let p = format!(
            "{}/{rel}",
            xenstore::domain_path(self.domain.config().domid)
        );
        self.xenstore.lock().read_string(&p).ok()
    }

    /// Whether the guest watches `rel` (under its own directory), itself or
    /// through an ancestor.
    pub fn guest_watches(&self, rel: &str) -> bool {
        let domid = self.domain.config().domid;
        let p = format!("{}/{rel}", xenstore::domain_path(domid));
        self.xenstore.lock().watched(domid, &p)
    }

    /// Writes a node of the guest's own directory as the toolstack (dom0),
    /// as libxl writes `control/shutdown`: the guest's watches on it fire
    /// and the guest is notified.
    pub fn toolstack_write(&self, rel: &str, value: &str) -> Result<(), String> {
        let p = format!(
            "{}/{rel}",
            xenstore::domain_path(self.domain.config().domid)
        );
        self.xenstore
            .lock()
            .write(&p, value.as_bytes())
            .map_err(|e| format!("xenstore {p}: {e}"))?;
        if self.serve_store() {
            if let Err(e) = self.domain.raise_port(self.store_port) {
                tracing::warn!(%e, port = self.store_port, "cannot notify the guest");
            }
        }
        Ok(())
    }

    /// Routes guest signals on a dom0 port to an I/O thread's eventfd
    /// (`None`: stop), for the block and network backends.
    fn port_router(&self) -> Arc<crate::backends::blkback::RouteFn> {
        let platform = Arc::downgrade(&self.platform);
        Arc::new(move |port, fd| {
            if let Some(p) = platform.upgrade() {
                let mut m = p.blk_ports.lock();
                match fd {
                    Some(fd) => m.insert(port, fd),
                    None => m.remove(&port),
                };
            }
        })
    }

    /// Publishes the guest's disks in xenstore (toolstack nodes, backend
    /// at InitWait) and serves them from I/O threads `spawn` starts.
    pub fn attach_disks(&self, disks: &[BlkConfig], spawn: Arc<SpawnFn>) -> Result<(), String> {
        if disks.is_empty() {
            return Ok(());
        }
        let host = BlkHost {
            spawn,
            route: self.port_router(),
        };
        let mut xs = self.xenstore.lock();
        let b = BlkBackend::new(
            disks,
            self.domain.config().domid,
            self.domain.clone(),
            self.platform.map.clone(),
            host,
            &mut xs,
        )?;
        *self.blk.lock() = Some(b);
        drop(xs);
        self.serve_store();
        Ok(())
    }

    /// Creates the guest's vifs (TAPs up, toolstack nodes, backend at
    /// InitWait) and serves them from I/O threads `spawn` starts.
    pub fn attach_nics(&self, nics: &[NetConfig], spawn: Arc<SpawnFn>) -> Result<(), String> {
        if nics.is_empty() {
            return Ok(());
        }
        let host = BlkHost {
            spawn,
            route: self.port_router(),
        };
        let mut xs = self.xenstore.lock();
        let b = NetBackend::new(
            nics,
            self.domain.config().domid,
            self.domain.clone(),
            self.platform.map.clone(),
            host,
            &mut xs,
        )?;
        *self.net.lock() = Some(b);
        drop(xs);
        self.serve_store();
        Ok(())
    }

    pub fn system_time(&self) -> u64 {
        self.clock.system_time()
    }
}

/// A stable domain handle derived from the name (a real UUID source is not
/// needed: the handle only has to be constant for one domain).
fn uuid_for(cfg: &VmConfig) -> [u8; 16] {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in cfg.name.bytes().chain(cfg.domid.to_le_bytes()) {
        h = (h ^ u128::from(b)).wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    let mut u = h.to_le_bytes();
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Guest-virtual memory of the calling vCPU.
struct GuestVcpu<'a> {
    ctx: &'a VcpuCtx,
    mem: &'a GuestMem,
    long: bool,
}

impl GuestVcpu<'_> {
    fn linear(&self, gva: u64) -> u64 {
        if self.long {
            gva
        } else {
            gva & 0xffff_ffff
        }
    }
}

impl VcpuAccess for GuestVcpu<'_> {
    fn vcpu_id(&self) -> u32 {
        self.ctx.id
    }
    fn cpl(&self) -> u8 {
        x86::cpl(&self.ctx.sregs)
    }
    fn width(&self) -> GuestWidth {
        if self.long {
            GuestWidth::Bits64
        } else {
            GuestWidth::Bits32
        }
    }
    fn read_virt(&self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let p = x86::Paging::from_sregs(&self.ctx.sregs);
        x86::read_linear(self.mem, &p, self.linear(gva), buf, x86::Access::READ)
            .map_err(|f| MemFault { gva: f.linear })
    }
    fn write_virt(&self, gva: u64, data: &[u8]) -> Result<(), MemFault> {
        let p = x86::Paging::from_sregs(&self.ctx.sregs);
        x86::write_linear(self.mem, &p, self.linear(gva), data, x86::Access::WRITE)
            .map_err(|f| MemFault { gva: f.linear })
    }
    fn translate(&self, gva: u64) -> Result<u64, MemFault> {
        let p = x86::Paging::from_sregs(&self.ctx.sregs);
        x86::translate(self.mem, &p, self.linear(gva), x86::Access::WRITE)
            .map_err(|f| MemFault { gva: f.linear })
    }
    fn interrupts_enabled(&self) -> bool {
        // RFLAGS.IF at the hypercall (a `sti` shadow is not visible here).
        self.ctx.regs.rflags & (1 << 9) != 0
    }
}

/// A ring page in guest RAM (xenstore, console), accessed with atomics for
/// the indexes.
pub struct GuestRing<'a> {
    mem: &'a GuestMem,
    gpa: u64,
}

impl<'a> GuestRing<'a> {
    pub fn new(mem: &'a GuestMem, gpa: u64) -> Self {
        GuestRing { mem, gpa }
    }
}

impl RingPage for GuestRing<'_> {
    fn load_u32(&self, off: usize) -> u32 {
        self.mem
            .load(GuestAddress(self.gpa + off as u64), Ordering::Acquire)
            .unwrap_or(0)
    }
    fn store_u32(&self, off: usize, v: u32) {
        let _ = self
            .mem
            .store(v, GuestAddress(self.gpa + off as u64), Ordering::Release);
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        if self
            .mem
            .read_slice(buf, GuestAddress(self.gpa + off as u64))
            .is_err()
        {
            buf.fill(0);
        }
    }
    fn write(&self, off: usize, data: &[u8]) {
        let _ = self
            .mem
            .write_slice(data, GuestAddress(self.gpa + off as u64));
    }
}

struct ConsoleWriter<'a>(&'a ConsoleOut);

impl std::io::Write for ConsoleWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush();
        Ok(())
    }
}

/// An overlay page (shared_info, grant frame) as the domain sees it.
struct OverlayShared(gpc::OverlayPage);

impl SharedPage for OverlayShared {
    fn load_u64(&self, off: usize, o: Ordering) -> u64 {
        self.0.load_u64(off, o).unwrap_or(0)
    }
    fn store_u64(&self, off: usize, v: u64, o: Ordering) {
        let _ = self.0.store_u64(off, v, o);
    }
    fn fetch_or_u64(&self, off: usize, v: u64, o: Ordering) -> u64 {
        self.0.fetch_or_u64(off, v, o).unwrap_or(0)
    }
    fn fetch_and_u64(&self, off: usize, v: u64, o: Ordering) -> u64 {
        self.0.fetch_and_u64(off, v, o).unwrap_or(0)
    }
    fn load_u32(&self, off: usize, o: Ordering) -> u32 {
        self.0.load_u32(off, o).unwrap_or(0)
    }
    fn store_u32(&self, off: usize, v: u32, o: Ordering) {
        let _ = self.0.store_u32(off, v, o);
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        let _ = self.0.read(off, buf);
    }
    fn write(&self, off: usize, data: &[u8]) {
        let _ = self.0.write(off, data);
    }
}

/// A guest RAM page (a relocated vcpu_info) through a gpc cache, so it
/// follows memory-map changes and marks what it writes dirty.
struct RamShared(gpc::Cache);

impl RamShared {
    fn with<T: Default>(&self, f: impl FnOnce(&gpc::Guard) -> gpc::Result<T>) -> T {
        match self.0.access() {
            Ok(g) => f(&g).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(%e, "guest page cache unusable");
                T::default()
            }
        }
    }
}

impl SharedPage for RamShared {
    fn load_u64(&self, off: usize, o: Ordering) -> u64 {
        self.with(|g| g.load_u64(off, o))
    }
    fn store_u64(&self, off: usize, v: u64, o: Ordering) {
        self.with(|g| g.store_u64(off, v, o))
    }
    fn fetch_or_u64(&self, off: usize, v: u64, o: Ordering) -> u64 {
        self.with(|g| g.fetch_or_u64(off, v, o))
    }
    fn fetch_and_u64(&self, off: usize, v: u64, o: Ordering) -> u64 {
        self.with(|g| g.fetch_and_u64(off, v, o))
    }
    fn load_u32(&self, off: usize, o: Ordering) -> u32 {
        self.with(|g| g.load_u32(off, o))
    }
    fn store_u32(&self, off: usize, v: u32, o: Ordering) {
        self.with(|g| g.store_u32(off, v, o))
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        self.with(|g| g.read(off, buf))
    }
    fn write(&self, off: usize, data: &[u8]) {
        self.with(|g| g.write(off, data))
    }
}

#[derive(Default)]
struct Overlays {
    pages: Vec<Arc<OverlayShared>>,
    placed: HashMap<OverlayId, gpc::Gfn>,
    /// Overlays placed at frames that are not RAM (grant frames in the
    /// platform device's BAR or in a hole the guest picked): each is its own
    /// KVM memslot. gfn -> (slot, page).
    holes: HashMap<u64, (u32, gpc::OverlayPage)>,
}

/// At most this many overlays outside RAM (KVM offers 509 user slots; the
/// largest user is the grant table, 64 frames by default, and its status frames).
const MAX_HOLE_OVERLAYS: u32 = 256;
/// Guest frames an overlay outside RAM may not take: the IOAPIC and LAPIC
/// pages, and anything at or above 2^40 (beyond what the guest's CPUID says
/// it can address on every host).
fn hole_frame_usable(gfn: u64) -> bool {
    let gpa = gfn << 12;
    gfn < (1u64 << 28)
        && !(0xfec0_0000..0xfed0_0000).contains(&gpa)
        && !(0xfee0_0000..0xfef0_0000).contains(&gpa)
}

/// The [`Platform`] the domain calls.
pub struct XenPlatform {
    map: gpc::MemoryMap,
    mem: GuestMem,
    clock: Clock,
    /// The guest's console (the PV console ring's output goes here).
    console: Arc<ConsoleOut>,
    /// Xen's own console (`console_io` writes).
    xen_console: crate::devices::XenConsole,
    overlays: Mutex<Overlays>,
    timers: XenTimers,
    /// Eventfds of the backends (store, console): `notify_backend` writes.
    backend_events: [EventFd; 2],
    /// dom0 ports of blkback and netback queues -> their I/O threads'
    /// eventfds (a leaf lock).
    blk_ports: Mutex<HashMap<u32, Arc<EventFd>>>,
    caps: XenCaps,
    /// One per vCPU. Leaf locks: taken by the vCPU thread at schedule in/out
    /// and by the runstate hypercalls, never while taking another lock; the
    /// scheduler monitor only try-locks them (see [`sched`]).
    runstates: Vec<Mutex<VcpuRunstate>>,
    /// Each vCPU's runstate area as registered (for save; a leaf lock).
    runstate_specs: Mutex<Vec<Option<RunstateAreaSpec>>>,
    /// The domain, for its `vm_assist` state when publishing.
    update_flag: OnceLock<Weak<Domain>>,
    /// Register states from `VCPUOP_initialise` waiting for `VCPUOP_up`
    /// (see [`crate::vcpu::updown`]).
    starts: crate::vcpu::updown::StartSlots,
    /// Host schedule tracking shared with the monitor thread (lock-free).
    sched: sched::SchedShared,
    /// Which vCPUs the upcall re-check still watches.
    upcall_net: UpcallNet,
    /// This platform (for work it hands to a thread of its own).
    this: OnceLock<Weak<XenPlatform>>,
}

/// A vCPU's runstate: the accounting (pure arithmetic), where it is
/// published in the guest (one gpc cache, even when the area straddles a
/// page or a region), and the host-schedule feed of its thread.
struct VcpuRunstate {
    acct: Accounting,
    area: Option<RunstateArea>,
    host: sched::HostTrack,
}

impl XenPlatform {
    /// Has a VMM thread pause the VM and place the BPF program's
    /// page under `vcpu`'s area at `gpa` (see [`sched`]): until then, and if
    /// that fails, running is republished after a kick.
    fn start_direct(&self, vcpu: u32, gpa: u64) {
        let Some(me) = self.this.get().and_then(Weak::upgrade) else {
            return;
        };
        let caps = me.caps.vcpus.clone();
        caps.with_all_paused(
            format!("vcpu{vcpu}-pub"),
            Duration::from_secs(2),
            Box::new(move |paused| {
                // The area may have moved before every vCPU paused.
                let same = || {
                    me.runstate_specs
                        .lock()
                        .get(vcpu as usize)
                        .and_then(|s| s.as_ref())
                        .is_some_and(|s| s.pieces.first().map(|p| p.0) == Some(gpa))
                };
                let result = match (paused, same()) {
                    (false, _) => Err("the vCPUs did not pause within 2 s".to_string()),
                    (true, false) => Err("the area moved meanwhile".into()),
                    (true, true) => me.sched_direct_on(vcpu, gpa),
                };
                if let Err(e) = result {
                    tracing::info!(vcpu, %e, "runstate: no publishing at switch-ins, running is republished after a kick");
                }
            }),
        );
    }

    fn update_flag(&self) -> bool {
        self.update_flag
            .get()
            .and_then(Weak::upgrade)
            .is_some_and(|d| d.runstate_update_flag())
    }

    fn publish(&self, r: &VcpuRunstate) {
        if let Some(a) = &r.area {
            if let Err(e) = a.publish(r.acct.data(), self.update_flag()) {
                tracing::warn!(%e, "cannot publish the runstate area");
            }
        }
    }

    /// Schedule in/out of `vcpu`, called on `vcpu`'s own thread: first the
    /// host's context-switch records of the thread (if tracked), then the
    /// time since the last change (with steal time from `run_delay` when
    /// given, less what the records already charged), then publish.
    pub fn runstate_transition(&self, vcpu: u32, state: State, run_delay: Option<u64>) {
        let Some(m) = self.runstates.get(vcpu as usize) else {
            return;
        };
        let mut r = m.lock();
        let tracked = r.host.tracked();
        if tracked {
            self.sched_apply(vcpu, &mut r, None);
        }
        let now = self.clock.system_time();
        if tracked {
            // This thread is on a CPU: any interval a switch-out opened is over.
            let VcpuRunstate { acct, host, .. } = &mut *r;
            host.merge.close_lost(acct, now);
        }
        match run_delay {
            Some(d) if tracked => {
                let ex = r.host.merge.take_unsampled_runnable();
                r.acct.transition_with_steal_excluding(state, now, d, ex)
            }
            Some(d) => r.acct.transition_with_steal(state, now, d),
            None => r.acct.transition(state, now),
        }
        self.publish(&r);
        if tracked && self.sched_take_pending(vcpu) {
            // The monitor found the lock taken meanwhile: its records are ours.
            self.sched_apply(vcpu, &mut r, None);
        }
    }
}

impl XenPlatform {
    /// Removes the overlay at `g`, in RAM (the RAM page comes back) or in a
    /// hole (its memslot goes).
    fn take_off(&self, o: &mut Overlays, g: gpc::Gfn) {
        if let Some((slot, _page)) = o.holes.remove(&g.0) {
            if let Err(e) = self.caps.slots.remove(slot) {
                tracing::warn!(%e, slot, gfn = g.0, "cannot delete an overlay memslot");
            }
        } else if let Err(e) = self.map.remove_overlay(g) {
            tracing::warn!(%e, gfn = g.0, "cannot remove an overlay");
        }
    }

    /// Shows `page` at `g`, a frame that is not RAM, through a memslot of its own.
    fn place_in_hole(
        &self,
        o: &mut Overlays,
        g: gpc::Gfn,
        page: &gpc::OverlayPage,
    ) -> Result<(), Errno> {
        if o.holes.len() >= MAX_HOLE_OVERLAYS as usize {
            tracing::warn!(gfn = g.0, "too many overlays outside RAM");
            return Err(Errno::ENOMEM);
        }
        // SAFETY: the page's mapping lives as long as the clone kept in
        // `holes`, and the slot is deleted (take_off) before that clone goes.
        let slot =
            unsafe { self.caps.slots.insert(g.0 << 12, 4096, page.host_addr()) }.map_err(|e| {
                tracing::warn!(%e, gfn = g.0, "cannot add an overlay memslot");
                Errno::ENOMEM
            })?;
        tracing::debug!(
            slot,
            gfn = format_args!("{:#x}", g.0),
            "overlay placed outside RAM"
        );
        o.holes.insert(g.0, (slot, page.clone()));
        Ok(())
    }

    fn domain(&self) -> Option<Arc<Domain>> {
        self.update_flag.get().and_then(Weak::upgrade)
    }

    fn caps_vcpus(&self) -> u32 {
        self.runstates.len() as u32
    }

    /// Sends the event-channel upcall `vector` to `vcpu` through the LAPIC
    /// (fixed delivery, physical destination = APIC id = vCPU id).
    fn inject_vector(&self, vcpu: u32, vector: u8, nmi: bool) {
        if let Err(e) = self.caps.irq.msi(vcpu, vector, nmi) {
            tracing::warn!(%e, vcpu, vector, "KVM_SIGNAL_MSI failed");
        }
    }
}

impl Platform for XenPlatform {
    fn console_write(&self, data: &[u8]) {
        self.xen_console.write(data);
    }
    fn console_read(&self, _buf: &mut [u8]) -> usize {
        0
    }
    fn new_shared_page(&self) -> Result<Arc<dyn SharedPage>, Errno> {
        let p = gpc::OverlayPage::new().map_err(|e| {
            tracing::error!(%e, "cannot allocate an overlay page");
            Errno::ENOMEM
        })?;
        let s = Arc::new(OverlayShared(p));
        self.overlays.lock().pages.push(s.clone());
        Ok(s)
    }
    fn place_overlay(
        &self,
        id: OverlayId,
        page: &Arc<dyn SharedPage>,
        gfn: Gfn,
    ) -> Result<(), Errno> {
        let mut o = self.overlays.lock();
        let want = Arc::as_ptr(page).cast::<u8>();
        let Some(ov) = o
            .pages
            .iter()
            .find(|p| Arc::as_ptr(p).cast::<u8>() == want)
            .cloned()
        else {
            return Err(Errno::EINVAL);
        };
        let g = gpc::Gfn(gfn.get());
        let in_ram = self.mem.check_range(GuestAddress(gfn.gpa()), 4096);
        if !in_ram && !hole_frame_usable(g.0) {
            return Err(Errno::EINVAL);
        }
        if let Some(old) = o.placed.remove(&id) {
            self.take_off(&mut o, old);
        }
        // Whatever sat at this frame is displaced.
        let displaced = if in_ram {
            matches!(self.map.overlay_at(g), Ok(Some(_)))
        } else {
            o.holes.contains_key(&g.0)
        };
        if displaced {
            self.take_off(&mut o, g);
            o.placed.retain(|_, v| *v != g);
        }
        if in_ram {
            self.map.place_overlay(g, &ov.0).map_err(|e| {
                tracing::warn!(%e, gfn = gfn.get(), "cannot place an overlay");
                Errno::EINVAL
            })?;
        } else {
            self.place_in_hole(&mut o, g, &ov.0)?;
        }
        o.placed.insert(id, g);
        Ok(())
    }
    fn map_guest_page(&self, gfn: Gfn) -> Result<Arc<dyn SharedPage>, Errno> {
        let c = gpc::Cache::new(&self.map);
        c.activate_range(GuestAddress(gfn.gpa()), 4096)
            .map_err(|_| Errno::EINVAL)?;
        Ok(Arc::new(RamShared(c)))
    }
    fn guest_time(&self) -> GuestTime {
        let (tsc, system_time_ns) = self.clock.now();
        GuestTime {
            tsc,
            system_time_ns,
        }
    }
    fn tsc_khz(&self) -> u32 {
        self.clock.tsc_khz
    }
    fn tsc_stable(&self) -> bool {
        crate::xen::clock::host_tsc_invariant()
    }
    fn wallclock_ns(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }
    fn memory_map(&self) -> Vec<E820Entry> {
        layout::e820(&self.mem)
            .into_iter()
            .map(|e| E820Entry {
                addr: e.addr,
                size: e.size,
                kind: e.kind,
            })
            .collect()
    }
    fn is_ram(&self, gpa: u64) -> bool {
        layout::is_ram(&self.mem, gpa)
    }
    fn notify_backend(&self, remote_port: u32) {
        let i = match remote_port {
            REMOTE_STORE => 0,
            REMOTE_CONSOLE => 1,
            _ => {
                if let Some(fd) = self.blk_ports.lock().get(&remote_port) {
                    if let Err(e) = fd.write(1) {
                        tracing::warn!(%e, remote_port, "cannot kick a backend queue");
                    }
                }
                return;
            }
        };
        if let Err(e) = self.backend_events[i].write(1) {
            tracing::warn!(%e, remote_port, "cannot notify a backend");
        }
    }
    fn raise_upcall(&self, vcpu: VcpuId) {
        let Some(d) = self.domain() else { return };
        let v = vcpu.get();
        tracing::trace!(vcpu = v, vector = ?d.upcall_vector(vcpu), via = ?d.callback_via(), "raise_upcall");
        if let Some(vec) = d.upcall_vector(vcpu) {
            self.inject_vector(v, vec, false);
        } else {
            match d.callback_via() {
                hypercalls::CallbackVia::Vector(vec) => self.inject_vector(v, vec, false),
                hypercalls::CallbackVia::Gsi(gsi) => {
                    if let Err(e) = self.caps.irq.pulse_gsi(gsi) {
                        tracing::warn!(%e, gsi, "cannot raise the callback GSI");
                    }
                }
                _ => {}
            }
        }
        self.caps.vcpus.wake(v);
        let gsi_route = d.upcall_vector(vcpu).is_none()
            && matches!(d.callback_via(), hypercalls::CallbackVia::Gsi(_));
        if self.upcall_net.raised(v) || gsi_route {
            self.timers
                .set_if_idle(TimerKind::UpcallCheck, UPCALL_RECHECK);
        }
    }
    fn kick_vcpu(&self, vcpu: VcpuId) {
        self.caps.vcpus.wake(vcpu.get());
    }
    fn set_timer(&self, vcpu: VcpuId, deadline_ns: Option<u64>) {
        tracing::trace!(
            vcpu = vcpu.get(),
            ?deadline_ns,
            now = self.clock.system_time(),
            "set_timer"
        );
        self.timers.set(TimerKind::Vcpu(vcpu.get()), deadline_ns);
    }
    fn vcpu_down(&self, vcpu: VcpuId) {
        tracing::info!(vcpu = vcpu.get(), "VCPUOP_down");
        // Out of KVM_RUN: the thread parks at its next pass (crate::vcpu::updown).
        self.caps.vcpus.kick(vcpu.get());
    }
    fn vcpu_up(&self, vcpu: VcpuId) {
        self.upcall_net.reset(vcpu.get());
        self.timers
            .set_if_idle(TimerKind::UpcallCheck, UPCALL_RECHECK);
        tracing::info!(
            vcpu = vcpu.get(),
            initialised_by_vcpu_op = self.starts.is_staged(vcpu.get()),
            "VCPUOP_up"
        );
        self.kick_vcpu(vcpu);
        self.caps.vcpus.kick(vcpu.get());
    }
    fn vcpu_initialise(&self, vcpu: VcpuId, state: &hypercalls::HvmVcpuState) -> Result<(), Errno> {
        tracing::debug!(vcpu = vcpu.get(), ?state, "VCPUOP_initialise");
        self.starts.stage(vcpu.get(), *state);
        Ok(())
    }
    fn send_nmi(&self, vcpu: VcpuId) {
        self.inject_vector(vcpu.get(), 2, true);
    }
    fn set_runstate_area(&self, vcpu: VcpuId, spec: Option<RunstateAreaSpec>) -> Result<(), Errno> {
        let Some(m) = self.runstates.get(vcpu.get() as usize) else {
            return Err(Errno::EINVAL);
        };
        // Whatever comes, the program stops writing the old area.
        if self.sched_direct_off(vcpu.get()) {
            self.caps.vcpus.kick(vcpu.get());
        }
        let direct = spec.as_ref().and_then(|s| match s.pieces.as_slice() {
            [(gpa, 48)]
                if s.width != GuestWidth::Bits32
                    && gpa % 8 == 0
                    && gpa % 4096 <= 4096 - 48
                    && self.sched_direct_possible(vcpu.get()) =>
            {
                Some(*gpa)
            }
            _ => None,
        });
        let saved_spec = spec.clone();
        let area = match spec {
            None => None,
            Some(s) => {
                let layout = if s.width == GuestWidth::Bits32 {
                    Layout::Compat32
                } else {
                    Layout::Native64
                };
                let segs: Vec<gpc::Segment> = s
                    .pieces
                    .iter()
                    .map(|&(gpa, len)| gpc::Segment {
                        gpa: GuestAddress(gpa),
                        len: len as usize,
                    })
                    .collect();
                let a = RunstateArea::new(&self.map);
                a.register(&segs, layout).map_err(|e| {
                    tracing::warn!(%e, vcpu = vcpu.get(), "runstate area refused");
                    Errno::EINVAL
                })?;
                Some(a)
            }
        };
        let mut r = m.lock();
        // The old area (if any) is dropped here and never written again.
        r.area = area;
        self.publish(&r);
        drop(r);
        if let Some(s) = self.runstate_specs.lock().get_mut(vcpu.get() as usize) {
            *s = saved_spec;
        }
        if let Some(gpa) = direct {
            self.start_direct(vcpu.get(), gpa);
        }
        Ok(())
    }
    fn set_watchdog(&self, id: u32, deadline_ns: Option<u64>) {
        self.timers.set(TimerKind::Watchdog(id), deadline_ns);
    }
    fn unplace_overlay(&self, id: OverlayId) -> Result<(), Errno> {
        let mut o = self.overlays.lock();
        let Some(gfn) = o.placed.remove(&id) else {
            return Err(Errno::ENOENT);
        };
        if o.holes.contains_key(&gfn.0) {
            self.take_off(&mut o, gfn);
            return Ok(());
        }
        self.map.remove_overlay(gfn).map(|_| ()).map_err(|e| {
            tracing::warn!(%e, "cannot remove an overlay");
            Errno::EINVAL
        })
    }
    fn release_pages(&self, gfns: &[Gfn]) {
        for (first, count) in runs(gfns) {
            if let Err(e) = self.map.balloon_out(gpc::Gfn(first), count) {
                tracing::warn!(%e, first, count, "cannot release ballooned pages");
            }
        }
    }
    fn populate_pages(&self, gfns: &[Gfn]) -> Result<(), Errno> {
        // Punching the hole again makes the pages zeroed RAM that is
        // allocated on first write (and tells the caches over them).
        for (first, count) in runs(gfns) {
            self.map.balloon_out(gpc::Gfn(first), count).map_err(|e| {
                tracing::warn!(%e, first, count, "cannot populate pages");
                Errno::EINVAL
            })?;
        }
        Ok(())
    }
    fn runstate(&self, vcpu: VcpuId) -> RunstateInfo {
        let Some(m) = self.runstates.get(vcpu.get() as usize) else {
            return RunstateInfo::default();
        };
        let d = {
            let r = m.lock();
            // bpf-direct: switch-ins wake nobody (the program publishes
            // running in the guest's area itself), so the accounting may
            // still hold a preemption that is over. The view, not the
            // accounting, follows what the program published (applying the
            // records here would take them from the watch thread, which then
            // could not show the next preemption).
            self.sched_direct_view(vcpu.get(), &r)
        };
        // As Xen's vcpu_runstate_get: the current state's time runs up to now.
        let mut time = d.time;
        let now = self.clock.system_time();
        let cur = d.state as usize;
        time[cur] = time[cur].wrapping_add(now.saturating_sub(d.state_entry_time));
        RunstateInfo {
            state: d.state.value(),
            state_entry_time: d.state_entry_time,
            time,
        }
    }
}

/// How the guest ended, from a Xen `SHUTDOWN_*` reason.
pub fn exit_for_shutdown(reason: u8) -> GuestExit {
    match reason {
        0 => GuestExit::Poweroff,
        1 => GuestExit::Reboot(RebootCause::GuestRequest),
        2 => GuestExit::Suspend,
        3 => GuestExit::Crash(CrashCause::GuestReported),
        4 => GuestExit::Crash(CrashCause::Watchdog),
        r => GuestExit::Crash(CrashCause::ShutdownReason(r)),
    }
}

/// Contiguous runs (first, count) of guest frames, in the given order.
fn runs(gfns: &[Gfn]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    for g in gfns {
        match v.last_mut() {
            Some((f, c)) if *f + *c == g.get() => *c += 1,
            _ => v.push((g.get(), 1)),
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upcall_net_resends_until_the_guest_takes_one_then_trusts_the_lapic() {
        let n = UpcallNet::new(2);
        // Raised while the LAPIC could not take it: still pending at the
        // re-check, so it is sent again, and again.
        assert!(n.raised(1), "an unproven vCPU is watched");
        assert!(n.check(1, true, false));
        assert!(n.check(1, true, false));
        // The guest took it (cleared evtchn_upcall_pending): proven, and
        // later upcalls are not watched or re-sent.
        assert!(!n.check(1, false, false));
        assert!(!n.raised(1), "a proven vCPU is not watched");
        assert!(!n.check(1, true, false));
        // vCPU 0 is independent.
        assert!(n.raised(0));
    }

    #[test]
    fn upcall_net_restarted_vcpu_is_watched_again_even_if_nothing_new_is_raised() {
        let n = UpcallNet::new(2);
        n.raised(1);
        n.check(1, false, false);
        assert!(!n.raised(1));
        // Down and up again (or INIT/SIPI): its LAPIC starts disabled. A
        // pending upcall from before is re-sent without a new raise.
        n.reset(1);
        assert!(n.check(1, true, false));
        // Not pending and never raised since the restart: not proof.
        assert!(!n.check(1, false, false));
        assert!(n.raised(1), "still unproven");
    }

    #[test]
    fn upcall_net_gsi_callback_is_always_rechecked() {
        let n = UpcallNet::new(1);
        n.raised(0);
        n.check(0, false, true);
        assert!(
            n.check(0, true, true),
            "a GSI pulse can be lost at any time"
        );
    }

    /// A relocated vcpu_info lives in guest RAM behind a gpc cache: what the
    /// domain stores through it must be what the guest reads at that GPA.
    #[test]
    fn ram_shared_page_writes_reach_guest_memory() {
        let map = gpc::MemoryMap::new(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let c = gpc::Cache::new(&map);
        c.activate_range(GuestAddress(0x5000), 4096).unwrap();
        let p = RamShared(c);
        p.store_u32(64 + 32, 3, Ordering::SeqCst);
        p.store_u64(64 + 40, 0x1122_3344_5566_7788, Ordering::SeqCst);
        p.write(64, &[1, 0]);
        let mem = map.guest_memory();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x5000 + 64 + 32)).unwrap(),
            3
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x5000 + 64 + 40)).unwrap(),
            0x1122_3344_5566_7788
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x5000 + 64)).unwrap(), 1);
        assert_eq!(p.load_u64(64 + 40, Ordering::SeqCst), 0x1122_3344_5566_7788);
        assert_eq!(p.fetch_or_u64(64 + 8, 1 << 5, Ordering::SeqCst), 0);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x5000 + 64 + 8)).unwrap(),
            1 << 5
        );
    }
}
