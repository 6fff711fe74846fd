//! Runstate from the host scheduler (issue 16): each vCPU thread's
//! context switches (a BPF program's events, [`crate::host::bpf`], or perf
//! context-switch records, [`crate::host::perf`]) are applied to its
//! accounting ([`runstate::HostSched`]) and published, so that the other
//! vCPUs see `RUNSTATE_runnable` while a vCPU thread is preempted, and a
//! vCPU halted in the in-kernel irqchip accumulates blocked.
//!
//! Who applies the records: whoever holds the vCPU's runstate lock. The
//! monitor thread (`vmm::sched_monitor`) only *tries* the lock (the vCPU
//! thread may hold it and be the very thread that was preempted); when it
//! fails it counts a deferral and flags the vCPU, and the vCPU thread
//! applies the records before it lets the lock go. The vCPU thread applies
//! them itself before each of its own transitions.
//!
//! Publishing `running` again: after it published `runnable`, the monitor
//! sets `needs_running` and kicks the vCPU (`immediate_exit` and a signal),
//! so the vCPU leaves `KVM_RUN` before running guest code and republishes
//! `running` (from its switch-in record) before its next entry, as KVM's
//! `kvm_xen_runstate_set_running()` does before VM entry.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use runstate::{Applied, HostSched, RunstateData, SchedStats, State, Switch};
use vmm_sys_util::eventfd::EventFd;

use crate::host::bpf::{self, SchedBpf};
use crate::host::perf::{self, PerfMode, Record, SwitchKind, SwitchRing};

use super::{VcpuRunstate, Xen, XenPlatform};

/// How the VMM learns of host context switches of vCPU threads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// The BPF program on `sched_switch`/`sched_wakeup` (root and kernel
    /// BTF): woken only for preemptions, Xen-exact split after wake-ups.
    Bpf,
    Perf(PerfMode),
    /// Neither perf nor BPF is permitted: `run_delay` sampled by each vCPU
    /// every 10 ms (steal time afterwards, no prompt `runnable`).
    Sampling {
        why: String,
    },
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mechanism::Bpf => f.write_str(
                "BPF on sched_switch/sched_wakeup (aya), woken at each preempt-out of a vCPU thread",
            ),
            Mechanism::Perf(m) => write!(f, "{m}"),
            Mechanism::Sampling { why } => {
                write!(f, "run_delay sampled every 10 ms ({why})")
            }
        }
    }
}

impl Mechanism {
    /// Short name for tables and JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Mechanism::Bpf => "bpf",
            Mechanism::Perf(PerfMode::WakeOnSwitchOut) => "perf",
            Mechanism::Perf(PerfMode::Batched) => "perf-batched",
            Mechanism::Sampling { .. } => "sampling",
        }
    }

    /// The mechanism `want` names (`bpf`, `bpf-direct`, `perf`,
    /// `perf-batched`, `sampling` (or `sample`), or `best`: the best this
    /// process may use, tried on the calling thread). `XENKVM_SCHED` in the
    /// environment is used when `want` is `None`; with neither,
    /// [`Mechanism::default_choice`]. A mechanism the host refuses falls back to
    /// the next one (BPF > perf > perf-batched > sampling), saying why.
    pub fn choose(want: Option<&str>) -> Mechanism {
        Mechanism::start(want).0
    }

    /// [`Mechanism::choose`], keeping the loaded BPF program for the VM.
    pub fn start(want: Option<&str>) -> (Mechanism, Option<Arc<SchedBpf>>) {
        Mechanism::start_with(want, || SchedBpf::load().map(Arc::new))
    }

    /// [`Mechanism::start`] with the BPF program loaded by `load_bpf`
    /// (called only if BPF is wanted): the VMM starts the load on another
    /// thread early ([`Mechanism::wants_bpf`]) and hands its result here,
    /// since loading (the kernel's BTF is read and parsed twice, about
    /// 80-100 ms here) would otherwise delay the guest's start.
    pub fn start_with(
        want: Option<&str>,
        load_bpf: impl FnOnce() -> Result<Arc<SchedBpf>, String>,
    ) -> (Mechanism, Option<Arc<SchedBpf>>) {
        Mechanism::choose_with(Mechanism::wanted(want), load_bpf, |m| {
            SwitchRing::open_current_thread(m).map(|r| r.mode)
        })
    }

    /// The mechanism asked for: `want` (`--sched`), else `XENKVM_SCHED`;
    /// [`Mechanism::default_choice`] if neither, or if the name is
    /// not in [`MECHANISMS`] (named in a warning).
    pub fn wanted(want: Option<&str>) -> Option<&'static str> {
        let env = std::env::var("XENKVM_SCHED").ok();
        let Some(w) = want.or(env.as_deref()) else {
            return Mechanism::default_choice();
        };
        let known = MECHANISMS.iter().find(|m| **m == w).copied();
        // Asked several times per VM (the BPF preload, the start, the
        // direct publishing): said once per process.
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if known.is_none() && !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                XENKVM_SCHED = w,
                "unknown schedule-tracking mechanism (best, bpf-direct, bpf, perf, perf-batched, sampling): the default"
            );
        }
        known.or_else(Mechanism::default_choice)
    }

    /// What neither `--sched` nor `XENKVM_SCHED` asks for: `sampling`
    /// (`None`) where guest kernel code is emulated, `best` elsewhere
    /// ([`default_why`]; the host is probed once per process).
    pub fn default_choice() -> Option<&'static str> {
        default_for(crate::kvm::probe::kernel_code_emulated())
    }

    /// Whether [`Mechanism::start`] with `want` (or `XENKVM_SCHED`) will
    /// try to load the BPF program.
    pub fn wants_bpf(want: Option<&str>) -> bool {
        matches!(Mechanism::wanted(want), Some("bpf" | "best" | "bpf-direct"))
    }

    /// Whether the BPF program, once loaded for `want`, also publishes
    /// running itself at switch-ins (`bpf-direct`, and `best`: no kick).
    pub fn wants_direct(want: Option<&str>) -> bool {
        matches!(Mechanism::wanted(want), Some("best" | "bpf-direct"))
    }

    /// The choice, with the loaders passed in (tests refuse them).
    pub fn choose_with<B>(
        want: Option<&str>,
        load_bpf: impl FnOnce() -> Result<B, String>,
        open_perf: impl Fn(PerfMode) -> std::io::Result<PerfMode>,
    ) -> (Mechanism, Option<B>) {
        let perf_best = |why_not_bpf: Option<String>| {
            let r = open_perf(PerfMode::WakeOnSwitchOut).or_else(|_| open_perf(PerfMode::Batched));
            match (r, why_not_bpf) {
                (Ok(m), _) => Mechanism::Perf(m),
                (Err(e), Some(b)) => Mechanism::Sampling {
                    why: format!("BPF refused ({b}); perf_event_open refused: {e}"),
                },
                (Err(e), None) => Mechanism::Sampling {
                    why: format!("perf_event_open refused: {e}"),
                },
            }
        };
        let sampling = |why: &str| Mechanism::Sampling { why: why.into() };
        match want {
            Some("sampling" | "sample") => (sampling("asked for"), None),
            Some("perf") => (
                open_perf(PerfMode::WakeOnSwitchOut)
                    .map(Mechanism::Perf)
                    .unwrap_or_else(|e| Mechanism::Sampling {
                        why: format!("perf_event_open refused: {e}"),
                    }),
                None,
            ),
            Some("perf-batched") => (
                open_perf(PerfMode::Batched)
                    .map(Mechanism::Perf)
                    .unwrap_or_else(|e| Mechanism::Sampling {
                        why: format!("perf_event_open refused: {e}"),
                    }),
                None,
            ),
            None => (sampling(&default_why()), None),
            // `best`, `bpf`, `bpf-direct`.
            _ => match load_bpf() {
                Ok(b) => (Mechanism::Bpf, Some(b)),
                Err(e) => {
                    if matches!(want, Some("bpf" | "bpf-direct")) {
                        tracing::warn!(why = %e, "BPF schedule tracking refused: falling back");
                    } else {
                        tracing::info!(why = %e, "BPF schedule tracking refused: falling back");
                    }
                    (perf_best(Some(e)), None)
                }
            },
        }
    }
}

/// The default for a host whose kernel-mode loop rate is `emulated`
/// ([`crate::kvm::probe::kernel_code_emulated`]).
fn default_for(emulated: Option<f64>) -> Option<&'static str> {
    match emulated {
        Some(_) => None,
        None => Some("best"),
    }
}

/// Why `sampling` is the default on a host that emulates guest kernel code
/// ([`crate::kvm::probe::kernel_code_emulated`], this project's `kvm_pvm`),
/// and `best` elsewhere ([`Mechanism::default_choice`]). There, Linux
/// boots under host contention can livelock: three of the four seen ran
/// `bpf-direct` (what `best` gives root), one `bpf`. The livelock is the
/// guest's own: right after `clocksource: Switched to clocksource xen`,
/// before each CPU's tick leaves periodic mode, `tick_handle_periodic`
/// catches up missed ticks in a loop with interrupts off, and a tick that
/// takes longer than a tick period (4 ms at HZ=250) of guest time keeps it
/// from ever catching up (found with `xenkvm debug-keys q` and the guest's
/// memory: both vCPUs in that loop, the tick device periodic and 52-57 s
/// behind the clock). Three boots at once on 2 CPUs, to that point:
/// `bpf-direct` livelocked 2 of 12 and passed 10 (in 292-558 s, the slow
/// ones while other work ran); `sampling` 3 of 3, `bpf` 6 of 6,
/// `bpf-direct`'s page without the program publishing 3 of 3, the program
/// publishing plus a kick 3 of 3 (286-327 s). Those counts do not show that
/// `bpf-direct` makes the livelock likelier, nor rule it out. `bpf` and
/// `perf` show each preemption with a kick, an extra exit, which costs an
/// emulating host refills of the guest pages touched after it (README,
/// "What does not work yet"). Where guest kernel code runs natively a tick
/// takes microseconds, not milliseconds, and an exit costs no refills:
/// neither reason holds, and the default is `best`. `--sched best` (or
/// `XENKVM_SCHED=best`) turns tracking on anywhere, `--sched sampling`
/// off.
pub fn default_why() -> String {
    match crate::kvm::probe::kernel_code_emulated() {
        Some(rate) => format!(
            "the default where guest kernel code is emulated (here {rate:.1e} kernel-mode loop \
             iterations/s): --sched best turns host schedule tracking on (README: why not by default here)"
        ),
        None => "the default".into(),
    }
}

/// The names `--sched` and `XENKVM_SCHED` take (`sample` is `sampling`).
pub const MECHANISMS: [&str; 7] = [
    "best",
    "bpf-direct",
    "bpf",
    "perf",
    "perf-batched",
    "sampling",
    "sample",
];

/// A vCPU's preempted switch-out this close (ns) to a switch-in of the
/// monitor on the same CPU is the same context switch: the monitor's own
/// preemption of that vCPU (it ends as soon as the monitor sleeps again).
const SELF_WINDOW_NS: u64 = 5_000;
/// Preemption samples kept per vCPU (for the benchmark).
const LOG_MAX: usize = 1 << 16;

/// One host event of a vCPU thread, from either source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rec {
    Sw {
        sw: Switch,
        /// CLOCK_MONOTONIC ns.
        t: u64,
        cpu: u32,
        /// BPF: preempted by the watch thread itself.
        by_watcher: bool,
        /// BPF, a switch-in: the program published running itself, at this
        /// guest time.
        published: Option<u64>,
    },
    /// Events lost (ring full).
    Lost(u64),
    /// BPF: the preemption that began at `t` (CLOCK_MONOTONIC ns) is still
    /// going on and is to be shown even if it began as the watch thread's
    /// own (the CPU went to another thread when the watch thread slept).
    Show { t: u64 },
}

/// Per-vCPU flags the monitor and the vCPU thread share without the lock.
#[derive(Default)]
struct Slot {
    /// BPF: the vCPU thread's id, and its events read from the shared ring
    /// but not applied yet.
    tid: AtomicU32,
    queue: Mutex<Vec<Rec>>,
    needs_running: AtomicBool,
    /// The monitor could not take the lock: the holder applies the records.
    pending: AtomicBool,
    deferred: AtomicU64,
    attached: AtomicBool,
    /// BPF: the program publishes running at this vCPU's switch-ins (its
    /// area is in one of `pub_pages`, placed over the guest's page).
    direct: AtomicBool,
    /// Preemptions shown with the program armed to publish running (no kick).
    direct_armed: AtomicU64,
    /// Preemptions whose switch-in came before the program was armed (kicked).
    direct_late: AtomicU64,
}

/// Shared by the platform, the vCPU threads and the monitor.
pub struct SchedShared {
    slots: Vec<Slot>,
    /// Written when a vCPU attaches its ring or the VM stops.
    event: EventFd,
    /// BPF: one per ring, written when a vCPU thread hands the ring's watch
    /// thread a switch-out it read first (only that CPU's watch thread wakes).
    ring_events: Vec<EventFd>,
    mechanism: OnceLock<Mechanism>,
    bpf: OnceLock<Arc<SchedBpf>>,
    /// The BPF program's lost counter as last seen.
    bpf_lost_seen: AtomicU64,
    /// Malformed BPF ring records (never expected).
    bpf_bad: AtomicU64,
    /// Times a reader found the BPF ring taken by another reader.
    bpf_busy: AtomicU64,
    /// Preemptions by a sibling vCPU that outlasted the program's delay
    /// (their deferred wake-up fired).
    bpf_still_out: AtomicU64,
    /// Times a vCPU thread took another vCPU's switch-out from the ring and
    /// woke the watch threads for it.
    bpf_handed_over: AtomicU64,
    /// The program's pages placed over guest RAM: `(gfn, page)`, page `i`
    /// of `pub_pages` at index `i`. They stay for the VM's life (an area
    /// registered elsewhere leaves its page where it was: it is still the
    /// guest's page, with the guest's bytes).
    pub_pages: Mutex<Vec<(u64, gpc::OverlayPage)>>,
    /// `bpf-direct`: publish running from the program where possible.
    direct_wanted: AtomicBool,
}

impl SchedShared {
    pub fn new(vcpus: u32) -> std::io::Result<SchedShared> {
        Ok(SchedShared {
            slots: (0..vcpus).map(|_| Slot::default()).collect(),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            ring_events: (0..bpf::NR_RINGS)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<std::io::Result<_>>()?,
            mechanism: OnceLock::new(),
            bpf: OnceLock::new(),
            bpf_lost_seen: AtomicU64::new(0),
            bpf_bad: AtomicU64::new(0),
            bpf_busy: AtomicU64::new(0),
            bpf_still_out: AtomicU64::new(0),
            bpf_handed_over: AtomicU64::new(0),
            pub_pages: Mutex::new(Vec::new()),
            direct_wanted: AtomicBool::new(false),
        })
    }
}

/// One host preemption of a vCPU thread, as the benchmark reports it.
#[derive(Clone, Copy, Debug)]
pub struct Preemption {
    /// Switch-out to switch-in (ns).
    pub dur_ns: u64,
    /// Switch-out to the area showing runnable, if it did before the
    /// switch-in.
    pub visible_after_ns: Option<u64>,
    /// Switch-in to the area showing running again (when it had shown runnable).
    pub running_after_ns: Option<u64>,
}

/// A vCPU's host-schedule tracking (under its runstate lock).
#[derive(Default)]
pub(super) struct HostTrack {
    pub(super) ring: Option<SwitchRing>,
    /// Watched by the BPF program (its events come through `Slot::queue`).
    pub(super) bpf: bool,
    pub(super) merge: HostSched,
    /// The open preemption: switch-out time (monotonic) and when runnable
    /// was published (monotonic), if it was.
    out: Option<(u64, Option<u64>)>,
    /// How the open preemption's switch-out was applied: when (monotonic),
    /// by the monitor or not, and whether as the monitor's own (for the
    /// debug log of a long preemption that was never shown).
    out_applied: (u64, bool, bool),
    log: Vec<Preemption>,
    /// Runnable published after the vCPU had already switched in.
    late: u64,
    buf: Vec<Rec>,
}

impl HostTrack {
    /// The host's context switches of this vCPU are tracked.
    pub(super) fn tracked(&self) -> bool {
        self.ring.is_some() || self.bpf
    }
}

/// What the monitor should do after a poll.
#[derive(Clone, Copy, Debug, Default)]
pub struct PollOutcome {
    /// Kick the vCPU: it must republish running before it enters the guest.
    pub kick: bool,
    /// The vCPU is halted (blocked in the in-kernel irqchip).
    pub halted: bool,
}

/// The monitor's own recent switch-ins (CPU, CLOCK_MONOTONIC ns), from its
/// own perf ring: for telling its own preemptions of vCPUs apart.
#[derive(Clone, Copy, Debug)]
pub struct MonitorView<'a> {
    pub switch_ins: &'a [(u32, u64)],
}

/// Tracking counters of one vCPU, for logs and the benchmark.
#[derive(Clone, Debug, Default)]
pub struct SchedReport {
    pub stats: SchedStats,
    pub deferred: u64,
    pub late: u64,
    pub preemptions: Vec<Preemption>,
    /// The program published running at switch-ins of this vCPU (no kick).
    pub direct: bool,
    /// Preemptions shown with the program armed to publish running.
    pub direct_armed: u64,
    /// Of the shown ones, those whose switch-in came first (kicked).
    pub direct_late: u64,
    /// Switch-ins at which the program published running.
    pub direct_published: u64,
    /// Switch-outs of this vCPU's thread the program saw with no switch-in
    /// seen since the one before.
    pub missed_in: u64,
    /// Switch-ins of this vCPU's thread `sched_switch` did not report,
    /// found at the end of `__schedule()` in the thread's context.
    pub late_in: u64,
}

impl XenPlatform {
    /// Clears and returns the monitor's deferral flag of `vcpu`.
    pub(super) fn sched_take_pending(&self, vcpu: u32) -> bool {
        self.sched
            .slots
            .get(vcpu as usize)
            .is_some_and(|s| s.pending.swap(false, Ordering::AcqRel))
    }

    /// After runnable was published for the open preemption: arms the
    /// program to publish running at the switch-in that ends it (see
    /// sched.bpf.c). True if it will (no kick needed); false if the vCPU
    /// has no direct publishing or had switched in already (then kick).
    fn sched_arm(&self, vcpu: u32, r: &VcpuRunstate) -> bool {
        let (Some(s), Some(b)) = (self.sched.slots.get(vcpu as usize), self.sched.bpf.get()) else {
            return false;
        };
        let (true, Some(c), Some((t_out, _))) = (
            s.direct.load(Ordering::Acquire),
            b.pub_slot(vcpu),
            r.host.out,
        ) else {
            return false;
        };
        let d = r.acct.data();
        c.entry.store(d.state_entry_time, Ordering::Relaxed);
        for (slot, t) in c.time.iter().zip(d.time) {
            slot.store(t, Ordering::Relaxed);
        }
        let (mono, sys) = (perf::monotonic_ns(), self.clock.system_time());
        c.offset
            .store(sys.wrapping_sub(mono) as i64, Ordering::Relaxed);
        c.flag
            .store(u32::from(self.update_flag()), Ordering::Relaxed);
        c.arm_out.store(t_out, Ordering::Relaxed);
        c.armed.store(1, Ordering::SeqCst);
        // Dekker with the program's switch-in (it clears `out`, then looks
        // at `armed`): still out in this very preemption, it will publish.
        if c.out.load(Ordering::SeqCst) == 1 && c.last_out.load(Ordering::SeqCst) == t_out {
            s.direct_armed.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        // Switched in meanwhile: if the program did not take `armed`, it did
        // not publish, and the vCPU must be kicked.
        if c.armed.swap(0, Ordering::SeqCst) == 1 {
            s.direct_late.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        s.direct_armed.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Stops publishing at `vcpu`'s switch-ins (its area is going away or
    /// moving); true if an arm was taken back (the caller kicks the vCPU:
    /// runnable may be showing).
    pub(super) fn sched_direct_off(&self, vcpu: u32) -> bool {
        let (Some(s), Some(b)) = (self.sched.slots.get(vcpu as usize), self.sched.bpf.get()) else {
            return false;
        };
        if !s.direct.swap(false, Ordering::AcqRel) {
            return false;
        }
        let Some(c) = b.pub_slot(vcpu) else {
            return false;
        };
        c.enabled.store(0, Ordering::SeqCst);
        let taken = c.armed.swap(0, Ordering::SeqCst) == 1;
        if taken {
            s.needs_running.store(true, Ordering::Release);
        }
        taken
    }

    /// Whether the program may publish running at `vcpu`'s switch-ins:
    /// the maps are mapped and `bpf-direct` (or `best`) was asked for. A
    /// switch-in `sched_switch` does not report (this project's host never
    /// reports switches away from its sandbox's supervisor threads) is found
    /// at the end of `__schedule()` (`sched_exit_tp`), before the thread runs
    /// its guest; a kernel without that tracepoint leaves the guest reading
    /// its own area as runnable until its next exit after one. What `best`
    /// gives where the maps can be mapped (the default only where guest kernel code runs natively: [`default_why`]).
    pub(super) fn sched_direct_possible(&self, vcpu: u32) -> bool {
        self.sched
            .bpf
            .get()
            .is_some_and(|b| b.pub_slot(vcpu).is_some())
            && self.sched.direct_wanted.load(Ordering::Acquire)
    }

    /// `vcpu`'s runstate as last published: the accounting, or, when the
    /// program published running at the switch-in that ended the open
    /// preemption and the records are not applied yet, that.
    pub(super) fn sched_direct_view(&self, vcpu: u32, r: &VcpuRunstate) -> RunstateData {
        if self.sched_direct(vcpu) {
            self.program_view(vcpu, r)
        } else {
            *r.acct.data()
        }
    }

    /// The accounting with running applied where the program published it
    /// at the switch-in that ended the open preemption (whether or not it
    /// still publishes).
    fn program_view(&self, vcpu: u32, r: &VcpuRunstate) -> RunstateData {
        let mut d = *r.acct.data();
        let (Some(c), Some((t_out, _))) = (
            self.sched.bpf.get().and_then(|b| b.pub_slot(vcpu)),
            r.host.out,
        ) else {
            return d;
        };
        let (in_host, in_guest) = (
            c.in_host.load(Ordering::Acquire),
            c.in_guest.load(Ordering::Acquire),
        );
        if d.state == State::Runnable && in_host > t_out && in_guest >= d.state_entry_time {
            d.time[State::Runnable as usize] =
                d.time[State::Runnable as usize].wrapping_add(in_guest - d.state_entry_time);
            d.state_entry_time = in_guest;
            d.state = State::Running;
        }
        d
    }

    /// Whether the program publishes running at `vcpu`'s switch-ins.
    pub(super) fn sched_direct(&self, vcpu: u32) -> bool {
        self.sched
            .slots
            .get(vcpu as usize)
            .is_some_and(|s| s.direct.load(Ordering::Acquire))
    }

    /// Places the program's page over the guest's page that holds `vcpu`'s
    /// area at `gpa` (copying the guest's bytes; every vCPU paused, the
    /// caller's `pause` runs it) and turns publishing at switch-ins on.
    pub(super) fn sched_direct_on(&self, vcpu: u32, gpa: u64) -> Result<(), String> {
        let (Some(s), Some(b)) = (self.sched.slots.get(vcpu as usize), self.sched.bpf.get()) else {
            return Err("no BPF program".into());
        };
        let c = b.pub_slot(vcpu).ok_or("no publishing slots")?;
        let gfn = gpa >> 12;
        let mut pages = self.sched.pub_pages.lock();
        if !self.sched.direct_wanted.load(Ordering::Acquire) {
            return Err("publishing at switch-ins was stopped (a save or migration)".into());
        }
        let idx = match pages.iter().position(|(g, _)| *g == gfn) {
            Some(i) => i,
            None => {
                if self
                    .map
                    .overlay_at(gpc::Gfn(gfn))
                    .map_err(|e| e.to_string())?
                    .is_some()
                {
                    return Err(format!("gfn {gfn:#x} is an overlay already"));
                }
                let (file, offset) = b.pub_page(pages.len() as u32)?;
                let page = gpc::OverlayPage::from_file(file, offset).map_err(|e| e.to_string())?;
                self.map
                    .place_overlay_copying(gpc::Gfn(gfn), &page)
                    .map_err(|e| e.to_string())?;
                pages.push((gfn, page));
                pages.len() - 1
            }
        };
        c.armed.store(0, Ordering::SeqCst);
        c.page.store(idx as u32, Ordering::Relaxed);
        c.off.store((gpa & 0xfff) as u32, Ordering::Relaxed);
        c.flag
            .store(u32::from(self.update_flag()), Ordering::Relaxed);
        c.enabled.store(1, Ordering::SeqCst);
        s.direct.store(true, Ordering::Release);
        tracing::info!(
            vcpu,
            gfn,
            page = idx,
            "runstate: running published by the BPF program at switch-ins (no kick)"
        );
        Ok(())
    }

    /// Applies `vcpu`'s pending records (caller holds its lock). `monitor`:
    /// called by the monitor thread, which may publish runnable.
    pub(super) fn sched_apply(
        &self,
        vcpu: u32,
        r: &mut VcpuRunstate,
        monitor: Option<MonitorView<'_>>,
    ) -> PollOutcome {
        let mut out = PollOutcome::default();
        for _ in 0..2 {
            // Every runnable shown (in either round: the second may show a
            // newer preemption) is followed by running: published by the
            // program at the switch-in, or by the vCPU after a kick.
            if !self.sched_drain_once(vcpu, r, monitor) {
                break;
            }
            if !self.sched_arm(vcpu, r) {
                if let Some(s) = self.sched.slots.get(vcpu as usize) {
                    s.needs_running.store(true, Ordering::Release);
                }
                out.kick = true;
            }
            // The vCPU may have switched in while we published: look again
            // at once, so running follows within microseconds.
        }
        out.halted = r.host.merge.open() == Some(State::Blocked);
        out
    }

    /// Reads the shared BPF ring into each vCPU's queue (whoever calls; the
    /// ring has its own lock). `reader`: the vCPU whose thread calls, `None`
    /// for a watch thread. A grown lost counter is reported to every
    /// vCPU (each falls back until its thread resynchronises); only a
    /// watch thread reads it (a map lookup is a system call, kept off the
    /// vCPU threads' path). A vCPU thread that takes another vCPU's
    /// switch-out from the ring hands it to the watch thread of the CPU it
    /// happened on (that ring's eventfd): the program woke that thread for
    /// it, but it would find the ring empty and never look at that vCPU's
    /// queue (measured: 96 of 450 long preemptions in a `bench sched` run
    /// shown late or never, applied 4-30 ms after the switch-out, before
    /// this).
    /// False if another thread was reading one of the rings.
    pub(super) fn bpf_pump(&self, reader: Option<u32>) -> bool {
        let Some(b) = self.sched.bpf.get() else {
            return true;
        };
        let slots = &self.sched.slots;
        let still_out = &self.sched.bpf_still_out;
        // Rings (bit per ring) whose watch thread must look at a queue.
        let mut hand_over = 0u32;
        let push = |e: bpf::Event| {
            let Some((i, s)) = slots
                .iter()
                .enumerate()
                .find(|(_, s)| s.tid.load(Ordering::Relaxed) == e.tid)
            else {
                return;
            };
            // What the program woke the watch thread for: a preemption that
            // neither it nor a sibling vCPU began, or one that went on.
            let woke = match e.kind {
                bpf::Kind::Preempted => !e.by_watcher && !e.by_vcpu,
                bpf::Kind::StillOut => true,
                _ => false,
            };
            if woke && reader.is_some_and(|r| r as usize != i) {
                hand_over |= 1 << (e.cpu as usize % bpf::NR_RINGS);
            }
            let sw = match e.kind {
                bpf::Kind::In => Switch::In,
                bpf::Kind::Preempted => Switch::OutPreempted,
                bpf::Kind::Blocked => Switch::OutVoluntary,
                bpf::Kind::Woken => Switch::Woken,
                // A wake-up: the switch-out it names is in a ring (a
                // sibling's preemption, shown when applied), or was applied
                // already as the watch thread's own (shown now).
                bpf::Kind::StillOut if e.by_watcher => {
                    s.queue.lock().push(Rec::Show { t: e.time_ns });
                    return;
                }
                bpf::Kind::StillOut => {
                    still_out.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            s.queue.lock().push(Rec::Sw {
                sw,
                t: e.time_ns,
                cpu: e.cpu,
                by_watcher: e.by_watcher,
                published: e.published,
            });
        };
        // Never wait for the ring: its reader may be a vCPU thread that was
        // preempted while reading it (and a vCPU thread must not wait for
        // another one). The reader distributes what it reads.
        let (bad, complete) = b.try_drain(push);
        if !complete {
            self.sched.bpf_busy.fetch_add(1, Ordering::Relaxed);
        }
        if bad > 0 {
            self.sched.bpf_bad.fetch_add(bad, Ordering::Relaxed);
        }
        if hand_over != 0 {
            self.sched.bpf_handed_over.fetch_add(1, Ordering::Relaxed);
            for (i, ev) in self.sched.ring_events.iter().enumerate() {
                if hand_over & (1 << i) != 0 {
                    let _ = ev.write(1);
                }
            }
        }
        if reader.is_some() {
            return complete;
        }
        let lost = b.lost();
        let seen = self.sched.bpf_lost_seen.swap(lost, Ordering::AcqRel);
        if lost > seen {
            tracing::debug!(
                lost = lost - seen,
                total = lost,
                "BPF events lost (ring full)"
            );
            for s in slots.iter().filter(|s| s.tid.load(Ordering::Relaxed) != 0) {
                s.queue.lock().push(Rec::Lost(lost - seen));
            }
        }
        complete
    }

    /// One pass over the vCPU's events; true if it published runnable.
    fn sched_drain_once(
        &self,
        vcpu: u32,
        r: &mut VcpuRunstate,
        monitor: Option<MonitorView<'_>>,
    ) -> bool {
        let VcpuRunstate {
            acct,
            area: _,
            host,
        } = r;
        host.buf.clear();
        if let Some(ring) = host.ring.as_mut() {
            let buf = &mut host.buf;
            ring.drain(|x| {
                buf.push(match x {
                    Record::Lost(n) => Rec::Lost(n),
                    Record::Switch { kind, time_ns, cpu } => Rec::Sw {
                        sw: match kind {
                            SwitchKind::In => Switch::In,
                            SwitchKind::OutPreempted => Switch::OutPreempted,
                            SwitchKind::OutVoluntary => Switch::OutVoluntary,
                        },
                        t: time_ns,
                        cpu,
                        by_watcher: false,
                        published: None,
                    },
                })
            });
        } else if host.bpf {
            if monitor.is_none() {
                // The vCPU thread: bring the shared ring up to date first.
                let _ = self.bpf_pump(Some(vcpu));
            }
            if let Some(s) = self.sched.slots.get(vcpu as usize) {
                host.buf.append(&mut s.queue.lock());
            }
        } else {
            return false;
        }
        if host.buf.is_empty() {
            return false;
        }
        // Two readers of different rings may have queued one thread's events
        // out of order: apply them in time order (`Lost` markers first).
        host.buf.sort_by_key(|r| match r {
            Rec::Lost(_) => 0,
            Rec::Sw { t, .. } | Rec::Show { t } => *t,
        });
        let mono_now = perf::monotonic_ns();
        let sys_now = self.clock.system_time();
        let to_sys = |t: u64| {
            if t <= mono_now {
                sys_now.saturating_sub(mono_now - t)
            } else {
                sys_now.saturating_add(t - mono_now)
            }
        };
        let mut changed = false;
        let mut show_runnable = false;
        let mut resumed_shown: Option<(u64, bool)> = None;
        for i in 0..host.buf.len() {
            let (sw, t, cpu, by_watcher, published) = match host.buf[i] {
                Rec::Lost(n) => {
                    host.merge.stats.lost += n;
                    continue;
                }
                Rec::Show { t } => {
                    // Still the open preemption, not shown yet, and the
                    // vCPU not back in (a later switch-in sorts after this
                    // and clears it again).
                    if monitor.is_some()
                        && host.out == Some((t, None))
                        && acct.state() == State::Runnable
                    {
                        host.merge.stats.self_shown_late += 1;
                        show_runnable = true;
                        changed = true;
                    }
                    continue;
                }
                Rec::Sw {
                    sw,
                    t,
                    cpu,
                    by_watcher,
                    published,
                } => (sw, t, cpu, by_watcher, published),
            };
            // A switch-in the program published: at exactly its time, so
            // that what is published next equals what it wrote.
            let applied = host
                .merge
                .apply(acct, sw, published.unwrap_or_else(|| to_sys(t)));
            match applied {
                Applied::Woken => {
                    // Waiting for a CPU after a halt: accounted, not shown
                    // (its switch-in follows; no kick).
                    show_runnable = false;
                    changed = true;
                }
                Applied::Preempted => {
                    let selfish = by_watcher
                        || monitor.is_some_and(|m| {
                            m.switch_ins
                                .iter()
                                .any(|&(c, ti)| c == cpu && ti.abs_diff(t) < SELF_WINDOW_NS)
                        });
                    if selfish {
                        host.merge.stats.self_inflicted += 1;
                    }
                    host.out = Some((t, None));
                    host.out_applied = (mono_now, monitor.is_some(), selfish);
                    show_runnable = monitor.is_some() && !selfish;
                    changed = true;
                }
                Applied::Halted => {
                    show_runnable = false;
                    changed = true;
                }
                Applied::Resumed | Applied::Stale if sw == Switch::In => {
                    if let Some((t_out, shown)) = host.out.take() {
                        if shown.is_some_and(|p| p > t) {
                            host.late += 1;
                        }
                        if shown.is_none() && t.saturating_sub(t_out) > 1_000_000 {
                            let (at, by_monitor, selfish) = host.out_applied;
                            tracing::debug!(
                                vcpu,
                                dur_us = t.saturating_sub(t_out) / 1000,
                                applied_after_us = at.saturating_sub(t_out) as i64 / 1000,
                                by_monitor,
                                selfish,
                                "a long preemption was never shown"
                            );
                        }
                        if host.log.len() < LOG_MAX {
                            host.log.push(Preemption {
                                dur_ns: t.saturating_sub(t_out),
                                visible_after_ns: shown
                                    .filter(|p| *p <= t)
                                    .map(|p| p.saturating_sub(t_out)),
                                running_after_ns: None,
                            });
                        }
                        if shown.is_some() {
                            // Published by the program at the switch-in
                            // itself: shown running after no time.
                            resumed_shown = Some((t, published.is_some()));
                        }
                    }
                    show_runnable = false;
                    changed |= applied == Applied::Resumed;
                }
                _ => {}
            }
        }
        if !changed {
            return false;
        }
        if r.acct.state() == State::Runnable && !show_runnable {
            // A preemption not to be shown (the monitor's own, or seen by the
            // vCPU thread itself): no kick follows, so publishing it could
            // leave the vCPU running under "runnable". The next publish
            // carries its time.
            return false;
        }
        if let Some(a) = &r.area {
            if let Err(e) = a.publish(r.acct.data(), self.update_flag()) {
                tracing::warn!(%e, "cannot publish the runstate area");
            }
        }
        let now = perf::monotonic_ns();
        if let (Some((t_in, by_program)), Some(last)) = (resumed_shown, r.host.log.last_mut()) {
            last.running_after_ns = Some(if by_program {
                0
            } else {
                now.saturating_sub(t_in)
            });
        }
        if show_runnable && r.acct.state() == State::Runnable {
            if let Some((t_out, _)) = r.host.out {
                r.host.out = Some((t_out, Some(now)));
            }
            r.host.merge.stats.published_runnable += 1;
            return true;
        }
        false
    }
}

impl Xen {
    /// The mechanism chosen for this VM (set once by the VMM at start).
    pub fn set_sched_mechanism(&self, m: Mechanism) {
        let _ = self.platform.sched.mechanism.set(m);
    }

    pub fn sched_mechanism(&self) -> Option<&Mechanism> {
        self.platform.sched.mechanism.get()
    }

    /// The vCPU thread hands over its own ring (opened on itself).
    pub fn attach_switch_ring(&self, vcpu: u32, ring: SwitchRing) {
        let Some(m) = self.platform.runstates.get(vcpu as usize) else {
            return;
        };
        m.lock().host.ring = Some(ring);
        if let Some(s) = self.platform.sched.slots.get(vcpu as usize) {
            s.attached.store(true, Ordering::Release);
        }
        let _ = self.platform.sched.event.write(1);
    }

    /// `bpf-direct` was chosen: the program publishes running at the
    /// switch-ins of vCPUs whose area allows it (set at start).
    pub fn set_sched_direct(&self, on: bool) {
        self.platform
            .sched
            .direct_wanted
            .store(on, Ordering::Release);
    }

    /// How many of the BPF program's pages are placed over guest RAM.
    pub fn sched_direct_pages(&self) -> usize {
        self.platform.sched.pub_pages.lock().len()
    }

    /// Takes the BPF program's pages back out of guest RAM, their bytes
    /// copied into the RAM pages they covered, and stops publishing at
    /// switch-ins for the rest of the VM's life (running is republished
    /// after a kick, as with `bpf`). For whatever reads guest RAM itself, not
    /// through the memory map's overlays: a save or a migration would
    /// otherwise send the page as it was when the program's page covered it.
    /// Every vCPU must be paused (the caller's); returns how many pages went
    /// back.
    pub fn sched_direct_release(&self) -> Result<usize, String> {
        let p = &self.platform;
        // Under the pages' lock: a placement still on its way (a helper
        // thread waiting to pause the vCPUs) finds `direct_wanted` clear.
        let mut pages = p.sched.pub_pages.lock();
        p.sched.direct_wanted.store(false, Ordering::Release);
        let mut was_direct = Vec::new();
        for v in 0..p.sched.slots.len() as u32 {
            if p.sched_direct(v) {
                was_direct.push(v);
            }
            if p.sched_direct_off(v) {
                // An arm taken back: running is republished before the
                // vCPU next enters the guest.
                p.caps.vcpus.kick(v);
            }
        }
        if pages.is_empty() {
            return Ok(0);
        }
        // A program run that read `enabled` and `armed` before they were
        // cleared may still be writing.
        bpf::SchedBpf::wait_for_runs_in_flight().map_err(|e| format!("membarrier: {e}"))?;
        // Running the program published at a switch-in whose record is not
        // applied yet: applied now, at the time it published, so the
        // accounting (what a save records, what is published from now on)
        // is what the area shows. Its record, when read, is stale.
        for v in was_direct {
            if let Some(m) = p.runstates.get(v as usize) {
                let mut r = m.lock();
                let seen = p.program_view(v, &r);
                if seen.state == State::Running && r.acct.state() == State::Runnable {
                    let VcpuRunstate { acct, host, .. } = &mut *r;
                    let t = seen.state_entry_time;
                    if host.merge.apply(acct, Switch::In, t) == Applied::Stale {
                        acct.transition(State::Running, t);
                    }
                }
            }
        }
        let n = pages.len();
        for (gfn, page) in pages.drain(..) {
            let mut bytes = [0u8; 4096];
            page.read(0, &mut bytes).map_err(|e| e.to_string())?;
            p.map
                .remove_overlay(gpc::Gfn(gfn))
                .map_err(|e| format!("gfn {gfn:#x}: {e}"))?;
            vm_memory::Bytes::write_slice(
                p.map.guest_memory(),
                &bytes,
                vm_memory::GuestAddress(gfn << 12),
            )
            .map_err(|e| format!("gfn {gfn:#x}: {e}"))?;
        }
        tracing::info!(
            pages = n,
            "runstate: the BPF program's pages are guest RAM again; running is republished after a kick from now on"
        );
        Ok(n)
    }

    /// Keeps the loaded BPF program for this VM (set once at start).
    pub fn set_sched_bpf(&self, b: Arc<SchedBpf>) {
        let _ = self.platform.sched.bpf.set(b);
    }

    /// The loaded BPF program, when the mechanism is BPF.
    pub fn sched_bpf(&self) -> Option<&Arc<SchedBpf>> {
        self.platform.sched.bpf.get()
    }

    /// The vCPU thread `tid` starts being watched by the BPF program.
    pub fn attach_bpf(&self, vcpu: u32, tid: u32) -> Result<(), String> {
        let (Some(m), Some(s), Some(b)) = (
            self.platform.runstates.get(vcpu as usize),
            self.platform.sched.slots.get(vcpu as usize),
            self.platform.sched.bpf.get(),
        ) else {
            return Err("no BPF program loaded".into());
        };
        s.tid.store(tid, Ordering::Release);
        b.watch_vcpu(tid, vcpu)?;
        m.lock().host.bpf = true;
        s.attached.store(true, Ordering::Release);
        let _ = self.platform.sched.event.write(1);
        Ok(())
    }

    /// The vCPU thread is about to exit: stop watching it.
    pub fn detach_bpf(&self, vcpu: u32) {
        if let (Some(s), Some(b)) = (
            self.platform.sched.slots.get(vcpu as usize),
            self.platform.sched.bpf.get(),
        ) {
            let tid = s.tid.swap(0, Ordering::AcqRel);
            if tid != 0 {
                b.unwatch(tid);
            }
        }
    }

    /// The monitor (BPF): reads the shared ring into the vCPUs' queues;
    /// returns the vCPUs with events waiting, and false if another thread
    /// was reading the ring (try again soon).
    pub fn bpf_pump(&self) -> (Vec<u32>, bool) {
        let pumped = self.platform.bpf_pump(None);
        let ready = self
            .platform
            .sched
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.queue.lock().is_empty())
            .map(|(i, _)| i as u32)
            .collect();
        (ready, pumped)
    }

    /// Times a vCPU thread handed another vCPU's switch-out to the watch
    /// threads (it had read it from the shared ring first).
    pub fn bpf_handed_over(&self) -> u64 {
        self.platform.sched.bpf_handed_over.load(Ordering::Relaxed)
    }

    /// Malformed BPF records seen (never expected; counted, skipped).
    pub fn bpf_bad_records(&self) -> u64 {
        self.platform.sched.bpf_bad.load(Ordering::Relaxed)
    }

    /// Times a reader found the shared BPF ring taken by another reader.
    pub fn bpf_ring_busy(&self) -> u64 {
        self.platform.sched.bpf_busy.load(Ordering::Relaxed)
    }

    /// Preemptions by a sibling vCPU thread shown only because they
    /// outlasted the BPF program's delay.
    pub fn bpf_still_out(&self) -> u64 {
        self.platform.sched.bpf_still_out.load(Ordering::Relaxed)
    }

    /// The monitor's control eventfd (a vCPU attached, or the VM stops).
    pub fn sched_event_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.platform.sched.event.as_raw_fd()
    }

    /// BPF: the eventfd through which vCPU threads hand ring `ring`'s watch
    /// thread switch-outs they read first.
    pub fn sched_ring_event_fd(&self, ring: usize) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.platform
            .sched
            .ring_events
            .get(ring)
            .map(|e| e.as_raw_fd())
    }

    /// Consumes ring `ring`'s hand-over eventfd.
    pub fn sched_ring_event_read(&self, ring: usize) {
        if let Some(e) = self.platform.sched.ring_events.get(ring) {
            let _ = e.read();
        }
    }

    /// Consumes the control eventfd.
    pub fn sched_event_read(&self) {
        let _ = self.platform.sched.event.read();
    }

    /// Wakes the monitor (to look at `stopping`).
    pub fn sched_event_signal(&self) {
        let _ = self.platform.sched.event.write(1);
    }

    /// The ring fd of every vCPU that attached one.
    pub fn switch_ring_fds(&self) -> Vec<(u32, std::os::fd::RawFd)> {
        self.platform
            .runstates
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.lock().host.ring.as_ref().map(|r| (i as u32, r.fd())))
            .collect()
    }

    /// The monitor: apply `vcpu`'s records if its lock is free, else leave
    /// them to the holder (counted).
    pub fn sched_poll(&self, vcpu: u32, view: MonitorView<'_>) -> PollOutcome {
        let (Some(m), Some(slot)) = (
            self.platform.runstates.get(vcpu as usize),
            self.platform.sched.slots.get(vcpu as usize),
        ) else {
            return PollOutcome::default();
        };
        match m.try_lock() {
            Some(mut r) => self.platform.sched_apply(vcpu, &mut r, Some(view)),
            None => {
                slot.deferred.fetch_add(1, Ordering::Relaxed);
                slot.pending.store(true, Ordering::Release);
                PollOutcome::default()
            }
        }
    }

    /// On the vCPU thread before it enters the guest: true if the monitor
    /// published runnable and running must be republished first.
    pub fn take_needs_running(&self, vcpu: u32) -> bool {
        self.platform
            .sched
            .slots
            .get(vcpu as usize)
            .is_some_and(|s| {
                s.needs_running.load(Ordering::Relaxed)
                    && s.needs_running.swap(false, Ordering::AcqRel)
                    || s.pending.load(Ordering::Relaxed) && s.pending.swap(false, Ordering::AcqRel)
            })
    }

    /// Counters and preemption samples of `vcpu`'s tracking.
    pub fn sched_report(&self, vcpu: u32) -> SchedReport {
        let (Some(m), Some(slot)) = (
            self.platform.runstates.get(vcpu as usize),
            self.platform.sched.slots.get(vcpu as usize),
        ) else {
            return SchedReport::default();
        };
        let r = m.lock();
        SchedReport {
            stats: r.host.merge.stats,
            deferred: slot.deferred.load(Ordering::Relaxed),
            late: r.host.late,
            preemptions: r.host.log.clone(),
            direct: slot.direct.load(Ordering::Relaxed),
            direct_armed: slot.direct_armed.load(Ordering::Relaxed),
            direct_late: slot.direct_late.load(Ordering::Relaxed),
            direct_published: self
                .sched_bpf()
                .and_then(|b| b.pub_slot(vcpu))
                .map_or(0, |c| c.published.load(Ordering::Relaxed)),
            missed_in: self
                .sched_bpf()
                .and_then(|b| b.pub_slot(vcpu))
                .map_or(0, |c| c.missed_in.load(Ordering::Relaxed)),
            late_in: self
                .sched_bpf()
                .and_then(|b| b.pub_slot(vcpu))
                .map_or(0, |c| c.late_in.load(Ordering::Relaxed)),
        }
    }
}

impl Xen {
    /// The `r` debug key (`xenkvm debug-keys`): per vCPU, the accounting,
    /// the runstate area as the guest reads it (from guest memory, through
    /// any overlay), and the host schedule tracking's counters.
    pub fn debug_runstate(&self) -> Vec<String> {
        let p = &self.platform;
        let mut out = vec![format!(
            "host schedule tracking: {}; guest time now {} ns",
            self.sched_mechanism().map_or("none", |m| m.name()),
            self.clock.system_time()
        )];
        let specs = p.runstate_specs.lock().clone();
        for v in 0..p.runstates.len() as u32 {
            let [run, runnable, blocked, offline] = self.runstate_times(v);
            let ms = |ns: u64| ns as f64 / 1e6;
            out.push(format!(
                "vcpu {v}: accounting running {:.3} ms, runnable {:.3} ms, blocked {:.3} ms, offline {:.3} ms",
                ms(run),
                ms(runnable),
                ms(blocked),
                ms(offline)
            ));
            match specs.get(v as usize).and_then(|s| s.as_ref()) {
                Some(spec) => {
                    let mut b = Vec::new();
                    for &(gpa, len) in &spec.pieces {
                        let mut piece = vec![0u8; len as usize];
                        if vm_memory::Bytes::read_slice(
                            &self.mem,
                            &mut piece,
                            vm_memory::GuestAddress(gpa),
                        )
                        .is_err()
                        {
                            piece.clear();
                        }
                        b.extend_from_slice(&piece);
                    }
                    let (entry_at, time_at) = match spec.width {
                        hypercalls::GuestWidth::Bits64 => (8, 16),
                        hypercalls::GuestWidth::Bits32 => (4, 12),
                    };
                    let u64_at = |o: usize| {
                        b.get(o..o + 8)
                            .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
                    };
                    let state = b
                        .get(0..4)
                        .map(|s| u32::from_le_bytes(s.try_into().unwrap_or([0; 4])));
                    match (state, u64_at(entry_at)) {
                        (Some(state), Some(entry)) => {
                            let t: Vec<String> = (0..4)
                                .map(|i| {
                                    u64_at(time_at + 8 * i).map_or("?".into(), |x| format!("{x}"))
                                })
                                .collect();
                            out.push(format!(
                                "vcpu {v}: area at {:#x} ({:?}) shows state {state}, state_entry_time {} (update flag {}), time [{}]",
                                spec.pieces.first().map_or(0, |p| p.0),
                                spec.width,
                                entry & !(1 << 63),
                                entry >> 63,
                                t.join(", ")
                            ));
                        }
                        _ => out.push(format!("vcpu {v}: area unreadable")),
                    }
                }
                None => out.push(format!("vcpu {v}: no runstate area registered")),
            }
            if self
                .sched_mechanism()
                .is_some_and(|m| m.name() != "sampling")
            {
                let r = self.sched_report(v);
                out.push(format!(
                    "vcpu {v}: tracking preempt_outs {} shown_runnable {} halts {} lost {} stale {} deferred {} late {} direct {} direct_armed {} direct_published {} missed_in {} late_in {}",
                    r.stats.preempt_outs,
                    r.stats.published_runnable,
                    r.stats.halts,
                    r.stats.lost,
                    r.stats.stale,
                    r.deferred,
                    r.late,
                    r.direct,
                    r.direct_armed,
                    r.direct_published,
                    r.missed_in,
                    r.late_in
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused<T>() -> Result<T, String> {
        Err("Operation not permitted (os error 1)".into())
    }

    #[test]
    fn choose_best_bpf_refused_falls_back_to_perf() {
        let (m, b) = Mechanism::choose_with(Some("best"), refused::<()>, Ok);
        assert_eq!(m, Mechanism::Perf(PerfMode::WakeOnSwitchOut));
        assert!(b.is_none());
        // An explicit `bpf` that is refused also gives a working VM.
        let (m, _) = Mechanism::choose_with(Some("bpf"), refused::<()>, |m| match m {
            PerfMode::WakeOnSwitchOut => Err(std::io::Error::from_raw_os_error(libc::EACCES)),
            PerfMode::Batched => Ok(m),
        });
        assert_eq!(m, Mechanism::Perf(PerfMode::Batched));
    }

    /// No `--sched`: `sampling` where guest kernel code is emulated (this
    /// project's host), `best` where it runs natively or the probe failed.
    #[test]
    fn default_is_best_unless_guest_kernel_code_is_emulated() {
        assert_eq!(default_for(Some(1.0e6)), None);
        assert_eq!(default_for(None), Some("best"));
        let (m, _) = Mechanism::choose_with(default_for(Some(1.0e6)), refused::<()>, Ok);
        assert_eq!(m.name(), "sampling");
        let (m, _) = Mechanism::choose_with(default_for(None), refused::<()>, Ok);
        assert_eq!(m, Mechanism::Perf(PerfMode::WakeOnSwitchOut));
    }

    #[test]
    fn choose_everything_refused_samples_and_says_why() {
        let (m, _) = Mechanism::choose_with(Some("best"), refused::<()>, |_| {
            Err(std::io::Error::from_raw_os_error(libc::EACCES))
        });
        match m {
            Mechanism::Sampling { why } => {
                assert!(why.contains("BPF refused"), "{why}");
                assert!(why.contains("perf_event_open refused"), "{why}");
            }
            other => panic!("expected sampling, got {other:?}"),
        }
    }

    #[test]
    fn choose_bpf_loaded_is_kept_and_named() {
        let (m, b) = Mechanism::choose_with(Some("best"), || Ok(7u8), Ok);
        assert_eq!((m.name(), b), ("bpf", Some(7)));
        let (m, b) = Mechanism::choose_with(Some("sample"), || Ok(7u8), Ok);
        assert_eq!((m.name(), b), ("sampling", None));
        let (m, b) = Mechanism::choose_with(None, || Ok(7u8), Ok);
        assert_eq!((m.name(), b), ("sampling", None));
    }
}
