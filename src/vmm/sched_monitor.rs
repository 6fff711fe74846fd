//! The scheduler monitor thread (`vcpu-sched`). With BPF ([`run_bpf`]) it
//! waits on the program's one ring buffer, woken only at a preempt-out of a
//! vCPU thread. With perf ([`run`]) it waits on the vCPU threads'
//! perf rings and applies their context-switch records
//! ([`crate::xen::sched`]): a preempted vCPU is published runnable and
//! kicked, so that it republishes running before it next enters the guest.
//!
//! Woken at each switch-out of a vCPU thread (privileged perf), never at a
//! switch-in (a wake-up there would preempt the vCPU it reports on, and
//! loop); unprivileged, it drains the rings every 1 ms while a vCPU runs
//! and every 20 ms while all are halted.

use std::collections::HashMap;
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::host::perf::{self, PerfMode};
use crate::vmm::machine::Machine;
use crate::xen::sched::MonitorView;

const CTL: u64 = u64::MAX;

/// The watch thread's SCHED_FIFO priority (when permitted): above a vCPU
/// thread someone made SCHED_FIFO 1 (`xenkvm bench sched --watcher-fifo`
/// does), so that it never queues behind the vCPUs it reports on.
pub const MONITOR_FIFO: i32 = 2;

/// The thread body.
pub fn run(m: Arc<Machine>, mode: PerfMode) {
    let ep = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(%e, "scheduler monitor: no epoll; runstate falls back to sampling");
            return;
        }
    };
    if let Err(e) = ep.ctl(
        ControlOperation::Add,
        m.xen.sched_event_fd(),
        EpollEvent::new(EventSet::IN, CTL),
    ) {
        tracing::warn!(%e, "scheduler monitor: cannot watch its control eventfd");
        return;
    }
    // Woken at a switch-out, the monitor must run at once, not at the next
    // tick: with every CPU busy a SCHED_OTHER waker often waits a slice.
    // It runs for microseconds per wake-up and never spins.
    match crate::host::cpu::set_fifo(MONITOR_FIFO) {
        Ok(()) => tracing::debug!("scheduler monitor runs SCHED_FIFO {MONITOR_FIFO}"),
        Err(e) => {
            tracing::info!(%e, "scheduler monitor stays SCHED_OTHER (runnable shows later under load)")
        }
    }
    // The monitor's own switch-ins, to tell its own preemptions of vCPUs
    // apart (never woken by them: a batched ring).
    let mut own = perf::SwitchRing::open_current_thread(PerfMode::Batched)
        .map_err(|e| tracing::info!(%e, "scheduler monitor: no ring of its own"))
        .ok();
    let mut ins: Vec<(u32, u64)> = Vec::new();
    let mut known: HashMap<u32, std::os::fd::RawFd> = HashMap::new();
    let mut events = vec![EpollEvent::default(); 64];
    let mut halted_all = false;
    loop {
        let timeout = match mode {
            PerfMode::WakeOnSwitchOut => -1,
            PerfMode::Batched if halted_all => 20,
            PerfMode::Batched => 1,
        };
        let n = match ep.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(%e, "scheduler monitor: epoll_wait failed");
                return;
            }
        };
        if let Some(r) = own.as_mut() {
            // Keep the last few: a vCPU's switch-out is applied at most a
            // few wake-ups after the monitor's switch-in that caused it.
            r.drain(|rec| {
                if let perf::Record::Switch {
                    kind: perf::SwitchKind::In,
                    time_ns,
                    cpu,
                } = rec
                {
                    ins.push((cpu, time_ns));
                }
            });
            if ins.len() > 64 {
                ins.drain(..ins.len() - 64);
            }
        }
        let view = MonitorView { switch_ins: &ins };
        let mut ready: Vec<u32> = Vec::new();
        for ev in &events[..n] {
            if ev.data() == CTL {
                m.xen.sched_event_read();
                if m.stopping() {
                    return;
                }
                for (v, fd) in m.xen.switch_ring_fds() {
                    if known.insert(v, fd).is_none() && mode == PerfMode::WakeOnSwitchOut {
                        if let Err(e) = ep.ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, u64::from(v)),
                        ) {
                            tracing::warn!(%e, vcpu = v, "scheduler monitor: cannot watch a vCPU");
                        }
                    }
                }
                continue;
            }
            let v = ev.data() as u32;
            if ev.event_set().contains(EventSet::HANG_UP) {
                // The vCPU thread is gone.
                if let Some(fd) = known.remove(&v) {
                    let _ = ep.ctl(ControlOperation::Delete, fd, *ev);
                }
                continue;
            }
            ready.push(v);
        }
        if mode == PerfMode::Batched {
            ready = known.keys().copied().collect();
        }
        if m.stopping() {
            return;
        }
        let mut halted = 0;
        for v in &ready {
            let o = m.xen.sched_poll(*v, view);
            if o.kick {
                if let Some(h) = m.vcpus.get(*v as usize) {
                    h.kicker().kick();
                }
            }
            halted += usize::from(o.halted);
        }
        halted_all = !ready.is_empty() && halted == ready.len();
    }
}

const RING: u64 = u64::MAX - 1;
const HANDED: u64 = u64::MAX - 2;

/// How many BPF watch threads to run: one per ring that can receive events
/// (rings are per CPU modulo [`crate::host::bpf::NR_RINGS`]).
pub fn bpf_rings() -> usize {
    crate::host::cpu::online_cpus().clamp(1, crate::host::bpf::NR_RINGS)
}

/// The CPUs whose events go into ring `ring`.
fn ring_cpus(ring: usize) -> Vec<usize> {
    (0..crate::host::cpu::online_cpus())
        .filter(|c| c % crate::host::bpf::NR_RINGS == ring)
        .collect()
}

/// The thread body with the BPF mechanism, one thread per ring `ring`
/// (see [`bpf_rings`]): pinned to that ring's CPUs, it waits on its ring,
/// readable only at a preempt-out of a vCPU thread on one of those CPUs that
/// did not hand the CPU to a watch thread (the program checks `next`
/// against the watchers' ids), 300 us after one that handed it to another
/// vCPU thread if it is still going on (a BPF timer), when one that began
/// as its own goes on after it sleeps, or when a quarter of the ring waits;
/// and on its hand-over eventfd when a vCPU thread read such a switch-out
/// from the ring before it did. So the
/// wake-up takes the CPU from whatever just preempted the vCPU, never from
/// another vCPU on another CPU. Each wake-up reads every ring (events of a
/// thread that changed CPUs sit in several). Other events (switch-ins,
/// halts, wake-ups) are read at the next wake-up or by the vCPU thread
/// before its next transition.
pub fn run_bpf(m: Arc<Machine>, ring: usize) {
    let Some(bpf) = m.xen.sched_bpf().cloned() else {
        tracing::warn!("scheduler monitor: no BPF program loaded");
        return;
    };
    let cpus = ring_cpus(ring);
    if let Err(e) = crate::host::cpu::pin_set(perf::gettid(), &cpus) {
        tracing::info!(%e, ring, ?cpus, "scheduler monitor not pinned to its ring's CPUs");
    }
    let ep = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(%e, "scheduler monitor: no epoll; runnable is not shown promptly");
            return;
        }
    };
    let handed = m.xen.sched_ring_event_fd(ring);
    for (fd, data, set) in [
        (Some(m.xen.sched_event_fd()), CTL, EventSet::IN),
        // Edge-triggered: readiness only when the program wakes us, not
        // whenever an unread (no-wake-up) event sits in the ring.
        (
            Some(bpf.fd(ring)),
            RING,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        ),
        // A vCPU thread read a switch-out of this ring first.
        (handed, HANDED, EventSet::IN),
    ] {
        let Some(fd) = fd else { continue };
        if let Err(e) = ep.ctl(ControlOperation::Add, fd, EpollEvent::new(set, data)) {
            tracing::warn!(%e, "scheduler monitor: cannot watch its fds");
            return;
        }
    }
    let me = perf::gettid() as u32;
    if let Err(e) = bpf.watch(me, crate::host::bpf::Role::Watcher) {
        tracing::info!(%e, "scheduler monitor: its own preemptions of vCPUs will wake it");
    }
    match crate::host::cpu::set_fifo(MONITOR_FIFO) {
        Ok(()) => tracing::debug!("scheduler monitor runs SCHED_FIFO {MONITOR_FIFO}"),
        Err(e) => {
            tracing::info!(%e, "scheduler monitor stays SCHED_OTHER (runnable shows later under load)")
        }
    }
    let view = MonitorView { switch_ins: &[] };
    let mut events = vec![EpollEvent::default(); 4];
    let mut timeout = -1;
    loop {
        let n = match ep.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(%e, "scheduler monitor: epoll_wait failed");
                break;
            }
        };
        // Stopping: leave the control eventfd readable for the other watch
        // threads (one read would hide it from them).
        if m.stopping() {
            break;
        }
        for ev in &events[..n] {
            match ev.data() {
                CTL => m.xen.sched_event_read(),
                HANDED => m.xen.sched_ring_event_read(ring),
                _ => {}
            }
        }
        // Another reader holds a ring for microseconds unless it was
        // preempted meanwhile: retry briefly, then look again in 1 ms.
        let mut pumped = m.xen.bpf_pump();
        for _ in 0..100 {
            if pumped.1 {
                break;
            }
            std::hint::spin_loop();
            pumped = m.xen.bpf_pump();
        }
        timeout = if pumped.1 { -1 } else { 1 };
        for v in pumped.0 {
            let o = m.xen.sched_poll(v, view);
            if o.kick {
                if let Some(h) = m.vcpus.get(v as usize) {
                    h.kicker().kick();
                }
            }
        }
    }
    bpf.unwatch(me);
}
