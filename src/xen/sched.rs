//! Runstate from the host scheduler (issue 16): each vCPU thread's
//! context-switch records ([`crate::host::perf`]) are applied to its
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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use runstate::{Applied, HostSched, SchedStats, State, Switch};
use vmm_sys_util::eventfd::EventFd;

use crate::host::perf::{self, PerfMode, Record, SwitchKind, SwitchRing};

use super::{VcpuRunstate, Xen, XenPlatform};

/// How the VMM learns of host context switches of vCPU threads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mechanism {
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
            Mechanism::Perf(PerfMode::WakeOnSwitchOut) => "perf",
            Mechanism::Perf(PerfMode::Batched) => "perf-batched",
            Mechanism::Sampling { .. } => "sampling",
        }
    }

    /// The mechanism `want` names (`perf`, `perf-batched`, `sampling`, or
    /// `best`: the best this process may use, tried on the calling thread).
    /// `XENKVM_SCHED` in the environment is used when `want` is `None`; with
    /// neither, `sampling` ([`DEFAULT_WHY`]).
    pub fn choose(want: Option<&str>) -> Mechanism {
        let env = std::env::var("XENKVM_SCHED").ok();
        let want = want.or(env.as_deref());
        let open = |m| SwitchRing::open_current_thread(m).map(|r| Mechanism::Perf(r.mode));
        let r = match want {
            Some("sampling") => {
                return Mechanism::Sampling {
                    why: "asked for".into(),
                }
            }
            Some("perf") => open(PerfMode::WakeOnSwitchOut),
            Some("perf-batched") => open(PerfMode::Batched),
            Some("best") => SwitchRing::open_best().map(|r| Mechanism::Perf(r.mode)),
            other => {
                if let Some(o) = other {
                    tracing::warn!(XENKVM_SCHED = o, "unknown schedule-tracking mechanism (perf, perf-batched, sampling, best): sampling");
                }
                return Mechanism::Sampling {
                    why: DEFAULT_WHY.into(),
                };
            }
        };
        r.unwrap_or_else(|e| Mechanism::Sampling {
            why: format!("perf_event_open refused: {e}"),
        })
    }
}

/// Why `sampling` is the default: each preemption that perf tracking shows
/// costs the vCPU an extra exit, and on a host that emulates guest kernel
/// code every exit makes the guest refill its page mappings. Measured here:
/// a Linux boot's ftrace check ran about 2.5 times longer with `perf`
/// (still running at 310 s of guest time) than with `sampling` (done by
/// 180 s). Opt in with `XENKVM_SCHED=perf` (or `best`, `perf-batched`).
pub const DEFAULT_WHY: &str =
    "the default: perf tracking costs an exit per shown preemption (XENKVM_SCHED=perf or best turns it on)";

/// A vCPU's preempted switch-out this close (ns) to a switch-in of the
/// monitor on the same CPU is the same context switch: the monitor's own
/// preemption of that vCPU (it ends as soon as the monitor sleeps again).
const SELF_WINDOW_NS: u64 = 5_000;
/// Preemption samples kept per vCPU (for the benchmark).
const LOG_MAX: usize = 1 << 16;

/// Per-vCPU flags the monitor and the vCPU thread share without the lock.
#[derive(Default)]
struct Slot {
    needs_running: AtomicBool,
    /// The monitor could not take the lock: the holder applies the records.
    pending: AtomicBool,
    deferred: AtomicU64,
    attached: AtomicBool,
}

/// Shared by the platform, the vCPU threads and the monitor.
pub struct SchedShared {
    slots: Vec<Slot>,
    /// Written when a vCPU attaches its ring or the VM stops.
    event: EventFd,
    mechanism: OnceLock<Mechanism>,
}

impl SchedShared {
    pub fn new(vcpus: u32) -> std::io::Result<SchedShared> {
        Ok(SchedShared {
            slots: (0..vcpus).map(|_| Slot::default()).collect(),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            mechanism: OnceLock::new(),
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
    pub(super) merge: HostSched,
    /// The open preemption: switch-out time (monotonic) and when runnable
    /// was published (monotonic), if it was.
    out: Option<(u64, Option<u64>)>,
    log: Vec<Preemption>,
    /// Runnable published after the vCPU had already switched in.
    late: u64,
    buf: Vec<Record>,
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
}

impl XenPlatform {
    /// Clears and returns the monitor's deferral flag of `vcpu`.
    pub(super) fn sched_take_pending(&self, vcpu: u32) -> bool {
        self.sched
            .slots
            .get(vcpu as usize)
            .is_some_and(|s| s.pending.swap(false, Ordering::AcqRel))
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
        for round in 0..2 {
            let shown = self.sched_drain_once(r, monitor);
            if round == 0 && shown {
                if let Some(s) = self.sched.slots.get(vcpu as usize) {
                    s.needs_running.store(true, Ordering::Release);
                }
                out.kick = true;
                // The vCPU may have switched in while we published: look
                // again at once, so running follows within microseconds.
                continue;
            }
            break;
        }
        out.halted = r.host.merge.open() == Some(State::Blocked);
        out
    }

    /// One pass over the ring; true if it published runnable.
    fn sched_drain_once(&self, r: &mut VcpuRunstate, monitor: Option<MonitorView<'_>>) -> bool {
        let VcpuRunstate {
            acct,
            area: _,
            host,
        } = r;
        let Some(ring) = host.ring.as_mut() else {
            return false;
        };
        host.buf.clear();
        let buf = &mut host.buf;
        ring.drain(|x| buf.push(x));
        if host.buf.is_empty() {
            return false;
        }
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
        let mut resumed_shown: Option<u64> = None;
        for i in 0..host.buf.len() {
            let (kind, t, cpu) = match host.buf[i] {
                Record::Lost(n) => {
                    host.merge.stats.lost += n;
                    continue;
                }
                Record::Switch { kind, time_ns, cpu } => (kind, time_ns, cpu),
            };
            let sw = match kind {
                SwitchKind::In => Switch::In,
                SwitchKind::OutPreempted => Switch::OutPreempted,
                SwitchKind::OutVoluntary => Switch::OutVoluntary,
            };
            let applied = host.merge.apply(acct, sw, to_sys(t));
            match applied {
                Applied::Preempted => {
                    let selfish = monitor.is_some_and(|m| {
                        m.switch_ins
                            .iter()
                            .any(|&(c, ti)| c == cpu && ti.abs_diff(t) < SELF_WINDOW_NS)
                    });
                    if selfish {
                        host.merge.stats.self_inflicted += 1;
                    }
                    host.out = Some((t, None));
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
                            resumed_shown = Some(t);
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
        if let (Some(t_in), Some(last)) = (resumed_shown, r.host.log.last_mut()) {
            last.running_after_ns = Some(now.saturating_sub(t_in));
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

    /// The monitor's control eventfd (a vCPU attached, or the VM stops).
    pub fn sched_event_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.platform.sched.event.as_raw_fd()
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
        }
    }
}
