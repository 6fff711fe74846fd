//! One thread per vCPU. The thread is a small state machine
//! (`Running`, `Blocked`, `Paused`, `Stopped`); each state is a method that
//! returns the next, and the VMM steers it through its [`VcpuHandle`]. Exits are handled with the registers KVM
//! syncs into `kvm_run` (no `KVM_GET_REGS` on the hot path: it costs ~7 µs
//! on this host); the slow paths (emulation-failure fix-ups) use the full
//! ioctls.

pub mod exit;
mod handle;
pub mod updown;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::arch::x86::{self, Fixup};
use crate::devices::BusEvent;
use crate::kvm::{CpuTimeKick, Exit, KvmError, KvmVcpu};
use crate::vcpu::exit::{decide, device_action, Action, ExitEnv};
use crate::vmm::machine::{CrashCause, GuestExit, Machine, RebootCause};
use crate::xen::{HypercallResult, VcpuCtx};

pub use handle::{Reported, Request, VcpuHandle};

/// What the vCPU thread does next.
#[derive(Debug)]
enum State {
    Running,
    /// Waiting in the VMM: SCHEDOP_block or SCHEDOP_poll.
    Blocked {
        deadline: Option<Instant>,
        ports: Option<Vec<u32>>,
    },
    /// Paused by the VMM; `then` is the state to return to.
    Paused {
        then: Box<State>,
    },
    /// Down by `VCPUOP_down`: parked in the VMM until `VCPUOP_up` (see [`updown`]).
    Offline,
    Stopped,
}

/// How often the running vCPU samples its thread's run_delay for steal time.
const STEAL_SAMPLE_MS: u64 = 10;

/// CPU time a vCPU may spend inside one KVM_RUN before its thread looks for
/// a `vmcall` at RIP (which this host's KVM never completes).
const STALL: Duration = Duration::from_millis(20);

pub struct Vcpu {
    id: u32,
    kvm: KvmVcpu,
    m: Arc<Machine>,
    handle: Arc<VcpuHandle>,
    run_delay: Option<runstate::RunDelay>,
    next_steal_sample: u64,
    /// Set at the vCPU's first exit (for APs: after INIT/SIPI).
    started: bool,
    /// Host TSC when the current KVM_RUN started.
    run_start: u64,
    /// Linear addresses of `vmcall` sites with a hardware breakpoint armed.
    bp_sites: Vec<u64>,
    /// The guest's syscall entry and #PF handler, on hosts that need the
    /// [`crate::arch::x86::syscall_fix`] (set when the guest writes LSTAR).
    syscall: Option<crate::arch::x86::syscall_fix::SyscallSetup>,
    /// The #UD-handler trap for `int n` at CPL 3 ([`crate::arch::x86::cpl3`]), on
    /// hosts whose probe shows that bug; `ud_next_check` is the TSC of the
    /// next re-read of IDT gate 6.
    ud_trap: Option<crate::arch::x86::cpl3::UdTrap>,
    ud_next_check: u64,
    /// RIP of the last emulation failure retried unchanged, and how many.
    retry_rip: Option<u64>,
    retried: u64,
    /// Unclaimed port/MMIO addresses already logged.
    unclaimed_logged: std::collections::HashSet<(bool, u64)>,
    /// Diagnostic (`XENKVM_TRACE_SYSCALL=N`): instructions left to
    /// single-step after a completed `syscall`, and completed syscalls left to trace.
    sstep: u32,
    sstep_syscalls: u32,
}

/// The VM facts [`decide`] needs.
struct ExitCtx<'a>(&'a Machine);

impl ExitEnv for ExitCtx<'_> {
    fn hypercall_page_ok(&self, gpa: u64) -> bool {
        self.0.xen.hypercall_page_ok(gpa)
    }
}

impl Vcpu {
    pub fn new(kvm: KvmVcpu, m: Arc<Machine>, handle: Arc<VcpuHandle>) -> Self {
        Vcpu {
            id: handle.id,
            kvm,
            m,
            handle,
            run_delay: None,
            next_steal_sample: 0,
            started: false,
            run_start: 0,
            bp_sites: Vec::new(),
            syscall: None,
            ud_trap: crate::kvm::probe::HostProbe::get()
                .user_int_n_needs_fixup()
                .then(Default::default),
            ud_next_check: 0,
            retry_rip: None,
            retried: 0,
            unclaimed_logged: Default::default(),
            sstep: 0,
            sstep_syscalls: std::env::var("XENKVM_TRACE_SYSCALL")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }
    }

    /// The thread body.
    pub fn run(mut self) {
        let span = tracing::info_span!("vcpu", id = self.id);
        let _e = span.enter();
        self.kvm.enable_sync_regs();
        self.handle.kicker().bind_current_thread();
        self.handle.set_tid(crate::host::perf::gettid());
        // A vCPU spinning in KVM_RUN (a vmcall this KVM never completes) is
        // interrupted after STALL of CPU time; a halted one is never woken.
        let _stall_timer = CpuTimeKick::start(STALL)
            .map_err(|e| tracing::warn!(%e, "no CPU-time timer: vmcall guests will hang"))
            .ok();
        // Steal time: run_delay of this thread, sampled every STEAL_SAMPLE_MS.
        self.run_delay = runstate::RunDelay::open().ok();
        // Host schedule tracking: this thread's context-switch records.
        match self.m.xen.sched_mechanism() {
            Some(crate::xen::sched::Mechanism::Perf(mode)) => {
                match crate::host::perf::SwitchRing::open_current_thread(*mode) {
                    Ok(r) => self.m.xen.attach_switch_ring(self.id, r),
                    Err(e) => tracing::warn!(%e, "no context-switch records for this vCPU"),
                }
            }
            Some(crate::xen::sched::Mechanism::Bpf) => {
                let tid = crate::host::perf::gettid() as u32;
                if let Err(e) = self.m.xen.attach_bpf(self.id, tid) {
                    tracing::warn!(%e, "this vCPU's context switches are not watched by BPF");
                }
            }
            _ => {}
        }
        // vCPU 0 runs from the start; so does a restored AP that is up (its
        // record may say offline: saved while paused).
        if self.id == 0 || (self.handle.started() && self.m.xen.vcpu_is_up(self.id)) {
            self.m.xen.runstate_transition(
                self.id,
                runstate::State::Running,
                self.sample_run_delay(),
            );
        }
        self.handle.report(Reported::Running);
        let mut state = self.rearm_syscall_fixup();
        loop {
            state = match state {
                State::Running => self.run_once(),
                State::Blocked { deadline, ports } => self.block(deadline, ports),
                State::Paused { then } => self.paused(*then),
                State::Offline => self.offline(),
                State::Stopped => break,
            };
        }
        self.handle.kicker().unbind();
        self.m.xen.detach_bpf(self.id);
        self.handle.report(Reported::Stopped);
        // Steal time is checkable from outside: runnable should track the
        // thread's run_delay (it is built from it).
        let [running, runnable, blocked, offline] = self.m.xen.runstate_times(self.id);
        let ms = |ns: u64| ns / 1_000_000;
        tracing::info!(
            running_ms = ms(running),
            runnable_ms = ms(runnable),
            blocked_ms = ms(blocked),
            offline_ms = ms(offline),
            thread_run_delay_ms = self.sample_run_delay().map(ms),
            "vCPU runstate at exit"
        );
        if self
            .m
            .xen
            .sched_mechanism()
            .is_some_and(|m| m.name() != "sampling")
        {
            let r = self.m.xen.sched_report(self.id);
            tracing::info!(
                preempt_outs = r.stats.preempt_outs,
                shown_runnable = r.stats.published_runnable,
                halts = r.stats.halts,
                self_inflicted = r.stats.self_inflicted,
                self_shown_late = r.stats.self_shown_late,
                stale = r.stats.stale,
                lost = r.stats.lost,
                deferred = r.deferred,
                late = r.late,
                bpf_ring_busy = self.m.xen.bpf_ring_busy(),
                bpf_sibling_still_out = self.m.xen.bpf_still_out(),
                bpf_handed_over = self.m.xen.bpf_handed_over(),
                direct = r.direct,
                direct_armed = r.direct_armed,
                direct_late = r.direct_late,
                direct_published = r.direct_published,
                missed_in = r.missed_in,
                late_in = r.late_in,
                "host schedule tracking at exit"
            );
        }
    }

    /// The VMM's request, looked at before every entry: `Some` state to go
    /// to instead of running.
    fn requested(&self, current: State) -> Result<State, State> {
        match self.handle.request() {
            Request::Run => Err(current),
            Request::Stop => Ok(State::Stopped),
            Request::Pause => Ok(State::Paused {
                then: Box::new(current),
            }),
        }
    }

    /// Paused: complete a pending I/O or MMIO exit (one KVM_RUN with
    /// `immediate_exit` set, as the KVM API requires before state is read),
    /// report, and wait for the VMM.
    fn paused(&mut self, then: State) -> State {
        // Also when blocked or offline: the result of the hypercall that
        // blocked it (RAX) is still in the synced copy, which only the next
        // entry applies; a save must see it (a restored guest got the
        // hypercall number back from SCHEDOP_poll).
        if !matches!(then, State::Stopped) {
            self.handle.kicker().kick();
            let _ = self.kvm.run();
        }
        // Xen's schedule() makes a vCPU that is neither runnable nor blocked
        // (a paused domain's running vCPU) offline, and Linux counts offline
        // time as stolen: so is a pause here, not a halt (the records see
        // the thread's sleep, stale against offline).
        let was_running = matches!(then, State::Running) && self.started;
        if was_running {
            self.m.xen.runstate_transition(
                self.id,
                runstate::State::Offline,
                self.sample_run_delay(),
            );
        }
        // The state a save writes, read here on the thread that owns the
        // vCPU fd, before the VMM hears that the vCPU is paused.
        self.handle
            .set_saved_state(Some(self.kvm.save_state().map_err(|e| e.to_string())));
        self.handle.report(Reported::Paused);
        tracing::debug!("paused");
        let r = self.handle.wait_unpaused();
        self.handle.set_saved_state(None);
        tracing::debug!(?r, "unpaused");
        match r {
            Request::Stop => State::Stopped,
            _ => {
                if let Some(v) = self.handle.take_resume_rax() {
                    // The pause ran KVM_RUN once, so the synced copy is current.
                    let mut regs = self.kvm.synced_regs();
                    regs.rax = v;
                    self.kvm.put_synced_regs(&regs);
                    tracing::info!(
                        rax = v,
                        "returning to the guest with the hypercall's result"
                    );
                }
                if was_running {
                    // Offline since the pause (records of the sleep and its
                    // end applied first): running before the guest runs.
                    self.m.xen.runstate_transition(
                        self.id,
                        runstate::State::Running,
                        self.sample_run_delay(),
                    );
                }
                self.handle.report(match then {
                    State::Blocked { .. } => Reported::Blocked,
                    _ => Reported::Running,
                });
                then
            }
        }
    }

    fn sample_run_delay(&self) -> Option<u64> {
        self.run_delay.as_ref().and_then(|r| r.sample().ok())
    }

    fn run_once(&mut self) -> State {
        if let Ok(next) = self.requested(State::Running) {
            return next;
        }
        if let Some(next) = self.vcpu_op_up_down() {
            return next;
        }
        let first_exit = !self.started;
        // Cheap on the exit path: one TSC read and a compare.
        let t = crate::xen::clock::host_tsc();
        if !self.started && !self.handle.started() {
            // An AP waiting for INIT/SIPI is down: offline, as under Xen
            // (its first real exit makes it running), whatever its thread
            // does in KVM_RUN meanwhile (sampled, it read as running; from
            // the records, as blocked).
        } else if self.m.xen.take_needs_running(self.id) {
            // Shown runnable while this thread was off its CPU: running again
            // before the guest runs (KVM's kvm_xen_runstate_set_running).
            self.m.xen.runstate_transition(
                self.id,
                runstate::State::Running,
                self.sample_run_delay(),
            );
        } else if t >= self.next_steal_sample {
            self.next_steal_sample = t + u64::from(self.m.clock.tsc_khz) * STEAL_SAMPLE_MS;
            self.m.xen.runstate_transition(
                self.id,
                runstate::State::Running,
                self.sample_run_delay(),
            );
        }
        if self.ud_trap.is_some() {
            self.check_ud_trap();
        }
        self.run_start = crate::xen::clock::host_tsc();
        let pre_run = self.run_start.saturating_sub(t);
        let exit = self.kvm.run();
        let exited = crate::xen::clock::host_tsc();
        if self.sstep > 0 {
            let (r, s) = (self.kvm.synced_regs(), self.kvm.synced_sregs());
            let ev = self.kvm.events().ok();
            tracing::info!(
                vcpu = self.id,
                ?exit,
                rip = format_args!("{:#x}", r.rip),
                rsp = format_args!("{:#x}", r.rsp),
                rflags = format_args!("{:#x}", r.rflags),
                cs = format_args!("{:#x}/{}", s.cs.selector, s.cs.dpl),
                ss = format_args!("{:#x}", s.ss.selector),
                cr2 = format_args!("{:#x}", s.cr2),
                gs = format_args!("{:#x}", s.gs.base),
                exc = ?ev.map(|e| (e.exception.injected, e.exception.pending, e.exception.nr, e.exception.error_code, e.interrupt.injected, e.interrupt.nr)),
                "syscall trace step"
            );
            self.sstep -= 1;
            if self.sstep == 0 {
                let _ = self.program_breakpoints();
            }
            if let Exit::Debug { pc } = exit {
                if !self.fixed_traps().any(|t| t == pc) {
                    return State::Running;
                }
            }
        }
        let m = &self.m;
        m.exits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::trace!(vcpu = self.id, ?exit, "vCPU exit");
        // Devices first: decide() sees only what no device claimed.
        let claimed = match &exit {
            Exit::IoOut { port, data, len } => m.pio.write(u64::from(*port), &data[..*len]),
            Exit::IoIn { port, len } => {
                let mut d = [0xffu8; 4];
                let d = &mut d[..(*len).min(4)];
                let c = m.pio.read(u64::from(*port), d);
                self.kvm.complete_pio_in(d);
                c.then_some(BusEvent::None)
            }
            Exit::MmioRead { addr, len } => {
                let mut d = [0xffu8; 8];
                let d = &mut d[..(*len).min(8)];
                let c = m.mmio.read(*addr, d);
                self.kvm.complete_mmio_read(d);
                c.then_some(BusEvent::None)
            }
            Exit::MmioWrite { addr, data, len } => m.mmio.write(*addr, &data[..*len]),
            _ => None,
        };
        let action = match claimed {
            Some(ev) => device_action(ev),
            None => decide(&exit, self.id, &ExitCtx(m)),
        };
        // The VMM's own time for this exit: before the entry and from the
        // exit to the decision (hypercalls, devices, fix-ups included;
        // waiting in SCHEDOP_block/poll is not: that comes after).
        m.vmm_cycles.fetch_add(
            pre_run + crate::xen::clock::host_tsc().saturating_sub(exited),
            std::sync::atomic::Ordering::Relaxed,
        );
        if let (Exit::WrMsr { .. } | Exit::RdMsr { .. }, a) = (&exit, &action) {
            self.kvm.complete_msr(*a == Action::MsrFault, 0);
        }
        // Only a real exit proves the AP runs: a signal (a stop request, a
        // kick) also interrupts an AP still waiting for INIT/SIPI.
        if action != Action::Fixup {
            self.retry_rip = None;
        }
        let real_exit = !matches!(action, Action::Stop(_) | Action::Interrupted);
        if first_exit && real_exit && !self.m.stopping() {
            // An AP leaves KVM_RUN only once INIT/SIPI started it (the in-kernel
            // LAPIC holds it until then): from here on it is up and running.
            self.started = true;
            self.handle.set_started();
            if self.id != 0 {
                self.m.xen.vcpu_started(self.id);
                self.m.xen.runstate_transition(
                    self.id,
                    runstate::State::Running,
                    self.sample_run_delay(),
                );
            }
        }
        match action {
            Action::Resume | Action::MsrFault => State::Running,
            Action::Interrupted => {
                // The CPU-time timer (or a kick) interrupted a long KVM_RUN.
                let stall = u64::from(self.m.clock.tsc_khz) * STALL.as_millis() as u64;
                if self.handle.started()
                    && crate::xen::clock::host_tsc().saturating_sub(self.run_start) >= stall
                {
                    self.stalled()
                } else {
                    State::Running
                }
            }
            Action::LstarWrite { data } => self.lstar_written(data),
            Action::HypercallTrap { pc } if self.syscall.is_some_and(|s| s.pf_handler == pc) => {
                self.pf_trap()
            }
            Action::HypercallTrap { pc }
                if self.ud_trap.is_some_and(|t| t.handler == pc && pc != 0) =>
            {
                self.ud_trap_hit(crate::arch::x86::cpl3::handle_ud)
            }
            Action::HypercallTrap { pc }
                if self.ud_trap.is_some_and(|t| t.bp_handler == pc && pc != 0) =>
            {
                self.ud_trap_hit(crate::arch::x86::gates::handle_bp)
            }
            Action::HypercallTrap { pc }
                if self.ud_trap.is_some_and(|t| t.df_handler == pc && pc != 0) =>
            {
                self.ud_trap_hit(crate::arch::x86::gates::handle_df)
            }
            Action::HypercallTrap { pc }
                if self.ud_trap.is_some_and(|t| t.ss_handler == pc && pc != 0) =>
            {
                self.ud_trap_hit(crate::arch::x86::gates::handle_ss)
            }
            Action::HypercallTrap { pc } => {
                if self.bp_sites.contains(&pc) {
                    let (regs, sregs) = (self.kvm.synced_regs(), self.kvm.synced_sregs());
                    let (regs, next) = self.trapped_hypercall(regs, sregs);
                    self.kvm.put_synced_regs(&regs);
                    next
                } else {
                    tracing::debug!(
                        pc = format_args!("{pc:#x}"),
                        "debug exit at an unknown site"
                    );
                    State::Running
                }
            }
            Action::Unclaimed { mmio, addr, write } => {
                if self.unclaimed_logged.insert((mmio, addr)) {
                    tracing::debug!(
                        mmio,
                        addr = format_args!("{addr:#x}"),
                        write,
                        "access nothing emulates (logged once)"
                    );
                }
                State::Running
            }
            Action::Hypercall => self.hypercall(),
            Action::BenchStubReturn => {
                // The test guest's bench stub: complete its `ret` as for a hypercall.
                let mut regs = self.kvm.synced_regs();
                let sregs = self.kvm.synced_sregs();
                x86::complete_stub_return(&self.m.mem, &mut regs, &sregs, 0);
                self.kvm.put_synced_regs(&regs);
                State::Running
            }
            Action::HypercallPage { gpa } => {
                let long = x86::is_64bit(&self.kvm.synced_sregs());
                self.m.xen.write_hypercall_page(gpa, long);
                State::Running
            }
            Action::Fixup => self.internal_error(),
            Action::Stop(why) => {
                let why = match why {
                    GuestExit::Reboot(RebootCause::TripleFault { vcpu, rip: None }) => {
                        let rip = self.kvm.regs().map(|r| r.rip).ok();
                        GuestExit::Reboot(RebootCause::TripleFault { vcpu, rip })
                    }
                    w => w,
                };
                self.m.request_exit(why);
                State::Stopped
            }
        }
    }

    /// A hypercall through the hypercall page: decode from the synced
    /// registers, dispatch, then complete the stub (see `hcall_page`).
    fn hypercall(&mut self) -> State {
        let ctx = VcpuCtx {
            id: self.id,
            regs: self.kvm.synced_regs(),
            sregs: self.kvm.synced_sregs(),
        };
        let (v, next) = self.outcome(self.m.xen.hypercall(&ctx));
        let mut regs = ctx.regs;
        x86::complete_stub_return(&self.m.mem, &mut regs, &ctx.sregs, v);
        self.kvm.put_synced_regs(&regs);
        next
    }

    /// The RAX value and next state for a hypercall's result.
    fn outcome(&self, r: HypercallResult) -> (i64, State) {
        self.m
            .hypercalls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match r {
            HypercallResult::Return(v) => (v, State::Running),
            HypercallResult::Block { deadline, ports } => (0, State::Blocked { deadline, ports }),
            HypercallResult::Yield => {
                std::thread::yield_now();
                (0, State::Running)
            }
            HypercallResult::Exit(GuestExit::Suspend) => {
                use crate::vmm::suspend::SuspendAnswer;
                match self.m.suspend.guest_suspended(self.id) {
                    // A save asked for it: the hypercall returns 0 (which
                    // a restore keeps: "resumed in a new domain") and the
                    // vCPU holds paused until the save decides.
                    SuspendAnswer::Hold => {
                        tracing::info!("guest suspended (SHUTDOWN_suspend): held for the save");
                        {
                            // Not undone by a pause of the Xen glue's in progress.
                            let _g = self.m.pause_lock.lock();
                            self.handle.send(crate::vcpu::Request::Pause);
                        }
                        (
                            0,
                            State::Paused {
                                then: Box::new(State::Running),
                            },
                        )
                    }
                    SuspendAnswer::Cancel => {
                        tracing::warn!("SHUTDOWN_suspend after the save stopped waiting: cancelled (returns 1)");
                        self.m.xen.domain.clear_shutdown();
                        (1, State::Running)
                    }
                    SuspendAnswer::End => {
                        self.m.request_exit(GuestExit::Suspend);
                        (0, State::Stopped)
                    }
                }
            }
            HypercallResult::Exit(why) => {
                self.m.request_exit(why);
                (0, State::Stopped)
            }
        }
    }

    /// The monitor kicked this vCPU out of a long KVM_RUN: if it sits on a
    /// `vmcall`/`vmmcall` (which this KVM never completes), handle the
    /// hypercall and arm a hardware breakpoint there so later calls at the
    /// same site exit at once.
    fn stalled(&mut self) -> State {
        let (Ok(regs), Ok(sregs)) = (self.kvm.regs(), self.kvm.sregs()) else {
            return State::Running;
        };
        match x86::fetch(&self.m.mem, &regs, &sregs).map(|i| i.code()) {
            Ok(iced_x86::Code::Vmcall) | Ok(iced_x86::Code::Vmmcall) => {}
            _ => return State::Running,
        }
        let pc = x86::linear_rip(&regs, &sregs);
        let (regs, next) = self.trapped_hypercall(regs, sregs);
        if let Err(e) = self.kvm.set_regs(&regs) {
            self.m.request_exit(GuestExit::Error(format!(
                "vCPU {}: cannot complete a vmcall: {e}",
                self.id
            )));
            return State::Stopped;
        }
        self.kvm.discard_synced_changes();
        self.arm_breakpoint(pc);
        next
    }

    /// A `vmcall`/`vmmcall` hypercall (3 bytes): dispatch, put the result
    /// in RAX, step over the instruction.
    fn trapped_hypercall(
        &mut self,
        mut regs: kvm_bindings::kvm_regs,
        sregs: kvm_bindings::kvm_sregs,
    ) -> (kvm_bindings::kvm_regs, State) {
        let ctx = VcpuCtx {
            id: self.id,
            regs,
            sregs,
        };
        let (v, next) = self.outcome(self.m.xen.hypercall(&ctx));
        let long = x86::is_64bit(&sregs);
        regs.rax = if long {
            v as u64
        } else {
            u64::from(v as i32 as u32)
        };
        regs.rip = if long {
            regs.rip.wrapping_add(3)
        } else {
            regs.rip.wrapping_add(3) & 0xffff_ffff
        };
        (regs, next)
    }

    /// The handler breakpoints that hold a debug register for good: the
    /// #PF handler (syscall fix-up) and the #UD handler (`int n` at CPL 3).
    ///
    /// How DR0-DR3 are allotted: these fixed traps first (the #PF and #UD
    /// handlers; the #BP and #DF handlers only while the guest's IDT has a
    /// DPL-0 `int3` gate or an absent gate 1/3, which Linux never has; the
    /// #SS handler only while that leaves a slot free), and the remaining
    /// slots to `vmcall` sites, oldest replaced.
    fn fixed_traps(&self) -> impl Iterator<Item = u64> {
        let t = self.ud_trap.unwrap_or_default();
        self.syscall
            .map(|s| s.pf_handler)
            .into_iter()
            .chain([t.handler, t.bp_handler, t.df_handler, t.ss_handler])
            .filter(|&h| h != 0)
    }

    /// Arms an instruction breakpoint at linear address `pc` (the slots the
    /// fixed traps leave; the oldest site is replaced).
    fn arm_breakpoint(&mut self, pc: u64) {
        if self.bp_sites.contains(&pc) {
            return;
        }
        let max = 4usize.saturating_sub(self.fixed_traps().count());
        if max == 0 {
            return;
        }
        while self.bp_sites.len() >= max {
            self.bp_sites.remove(0);
        }
        self.bp_sites.push(pc);
        match self.program_breakpoints() {
            Ok(()) => tracing::debug!(
                pc = format_args!("{pc:#x}"),
                sites = self.bp_sites.len(),
                "hypercall breakpoint armed"
            ),
            Err(e) => tracing::warn!(%e, "cannot arm a hypercall breakpoint; vmcalls stay slow"),
        }
    }

    /// Loads DR0-DR3/DR7 with the hypercall sites and the #PF handler.
    fn program_breakpoints(&mut self) -> Result<(), KvmError> {
        let fixed: Vec<u64> = self.fixed_traps().collect();
        let keep = 4usize.saturating_sub(fixed.len());
        let sites: Vec<u64> = fixed
            .into_iter()
            .chain(self.bp_sites.iter().rev().take(keep).copied())
            .collect();
        self.kvm.set_hw_breakpoints(&sites)
    }

    /// A vCPU that starts with LSTAR already set (restored from an image or
    /// received by migration: the guest wrote it before the save, and no
    /// write exit will come) gets the syscall fix-up armed as if it had just
    /// written it. Without this the restored guest's first system call from
    /// user space faults on a host whose `syscall` stays at CPL 3 (a Linux
    /// guest restored at its shell stopped this way).
    fn rearm_syscall_fixup(&mut self) -> State {
        use crate::arch::x86::syscall_fix::MSR_LSTAR;
        if crate::kvm::probe::HostProbe::get().user_syscall == crate::kvm::probe::Support::Native {
            return State::Running;
        }
        match self.kvm.read_msr(MSR_LSTAR) {
            Some(lstar) if lstar != 0 => self.lstar_written(lstar),
            _ => State::Running,
        }
    }

    /// The guest wrote LSTAR on a host whose `syscall` stays at CPL 3:
    /// write it, and trap the guest's #PF handler (see [`crate::arch::x86::syscall_fix`]).
    fn lstar_written(&mut self, lstar: u64) -> State {
        use crate::arch::x86::syscall_fix::*;
        if !self.kvm.write_msr(MSR_LSTAR, lstar) {
            self.m.request_exit(GuestExit::Error(format!(
                "vCPU {}: cannot write LSTAR",
                self.id
            )));
            return State::Stopped;
        }
        // From KVM itself, not the synced copy: a restored vCPU gets here
        // before its first KVM_RUN (see `rearm_syscall_fixup`), when that
        // copy is not filled in yet. LSTAR writes are rare.
        let sregs = self.kvm.sregs().unwrap_or_else(|_| self.kvm.synced_sregs());
        let star = self.kvm.read_msr(MSR_STAR).unwrap_or(0);
        let mut gate = [0u8; 16];
        let paging = x86::Paging::from_sregs(&sregs);
        let handler = x86::read_linear(
            &self.m.mem,
            &paging,
            sregs.idt.base.wrapping_add(14 * 16),
            &mut gate,
            x86::Access::READ,
        )
        .ok()
        .and_then(|()| gate_target(&gate));
        let Some(pf_handler) = handler else {
            tracing::warn!(
                "LSTAR written before a #PF handler is in the IDT: system calls will fault"
            );
            return State::Running;
        };
        self.syscall = Some(SyscallSetup {
            lstar,
            star,
            pf_handler,
        });
        let keep = 4usize.saturating_sub(self.fixed_traps().count());
        while self.bp_sites.len() > keep {
            self.bp_sites.remove(0);
        }
        if let Err(e) = self.program_breakpoints() {
            tracing::warn!(%e, "cannot trap the #PF handler: system calls will fault");
            self.syscall = None;
        } else {
            tracing::info!(
                lstar = format_args!("{lstar:#x}"),
                pf_handler = format_args!("{pf_handler:#x}"),
                "syscall fix-up armed (this host runs syscall without the switch to CPL 0)"
            );
        }
        State::Running
    }

    /// The breakpoint on the guest's #PF handler fired: complete a broken
    /// `syscall`, or step over the handler's first instruction.
    fn pf_trap(&mut self) -> State {
        use crate::arch::x86::syscall_fix::*;
        let Some(setup) = self.syscall else {
            return State::Running;
        };
        let (mut regs, mut sregs) = (self.kvm.synced_regs(), self.kvm.synced_sregs());
        let paging = x86::Paging::from_sregs(&sregs);
        let mut raw = [0u8; 48];
        let frame = x86::read_linear(&self.m.mem, &paging, regs.rsp, &mut raw, x86::Access::READ)
            .ok()
            .map(|()| Frame::parse(&raw));
        if let Some(f) = frame.filter(|f| f.is_broken_syscall(&setup, sregs.cr2)) {
            let cur = sregs;
            if self.sstep_syscalls > 0 {
                let ev = self.kvm.events().ok();
                tracing::info!(
                    vcpu = self.id,
                    cs = format_args!("{:#x}/{}/l{}", cur.cs.selector, cur.cs.dpl, cur.cs.l),
                    ss = format_args!("{:#x}/{}", cur.ss.selector, cur.ss.dpl),
                    bitmap = ?cur.interrupt_bitmap,
                    events = ?ev,
                    "broken syscall at the #PF trap"
                );
            }
            complete_syscall(&mut regs, &mut sregs, &f, setup.star);
            self.kvm.put_synced_regs(&regs);
            if segments_changed(&cur, &sregs) {
                self.kvm.put_synced_sregs(&sregs);
            }
            if self.sstep_syscalls > 0 {
                self.sstep_syscalls -= 1;
                self.sstep = 24;
                let sites: Vec<u64> = self.fixed_traps().collect();
                let _ = self.kvm.set_hw_breakpoints_step(&sites, true);
                tracing::info!(
                    vcpu = self.id,
                    ?f,
                    "syscall completed: tracing the next steps"
                );
            }
            return State::Running;
        }
        if let Some(f) = frame {
            if let Some(next) = self.unpatched_hypercall(&f, regs, sregs) {
                return next;
            }
        }
        match x86::fetch(&self.m.mem, &regs, &sregs) {
            Ok(insn) if step_over(&insn, &mut regs) => {
                self.kvm.put_synced_regs(&regs);
            }
            other => {
                tracing::warn!(
                    insn = ?other.map(|i| i.code()),
                    "cannot step over the #PF handler's first instruction: syscall fix-up off"
                );
                self.syscall = None;
                let _ = self.program_breakpoints();
            }
        }
        State::Running
    }

    /// At the #PF-handler trap: if the fault is the host's failed rewrite
    /// of a hypercall instruction (see [`crate::arch::x86::hcall_patch`]),
    /// drop the exception, handle the hypercall and trap its site.
    fn unpatched_hypercall(
        &mut self,
        f: &crate::arch::x86::syscall_fix::Frame,
        mut regs: kvm_bindings::kvm_regs,
        sregs: kvm_bindings::kvm_sregs,
    ) -> Option<State> {
        use crate::arch::x86::hcall_patch::{
            is_unpatched_hypercall, unwind, writes_own_instruction,
        };
        // Every kernel #PF comes here: fetch the instruction only for a
        // write inside it.
        if !writes_own_instruction(f, sregs.cr2) {
            return None;
        }
        let mut at = regs;
        at.rip = f.rip;
        let insn = x86::fetch(&self.m.mem, &at, &sregs).ok()?;
        if !is_unpatched_hypercall(f, sregs.cr2, insn.code()) {
            return None;
        }
        unwind(&mut regs, f);
        let pc = x86::linear_rip(&regs, &sregs);
        tracing::info!(
            vcpu = self.id,
            pc = format_args!("{pc:#x}"),
            "hypercall the host could not rewrite (read-only text): handled, site trapped"
        );
        let (regs, next) = self.trapped_hypercall(regs, sregs);
        self.kvm.put_synced_regs(&regs);
        self.arm_breakpoint(pc);
        Some(next)
    }

    /// Keeps the #UD-handler breakpoint on the guest's current #UD handler:
    /// IDTR is compared at every exit (KVM syncs it into `kvm_run`), gate 6
    /// re-read when it changed and at most every 10 ms otherwise. Gates 1
    /// and 3 of a long-mode IDT are read at every exit (one 48-byte read at
    /// a cached guest-physical address) for the #BP/#DF traps of
    /// [`crate::arch::x86::gates`].
    fn check_ud_trap(&mut self) {
        use crate::arch::x86::cpl3::{handler, ud_handler};
        let Some(trap) = self.ud_trap else { return };
        let sregs = self.kvm.synced_sregs();
        let idt = sregs.idt;
        let now = crate::xen::clock::host_tsc();
        let changed = idt.base != trap.idt_base || idt.limit != trap.idt_limit;
        let mut new = trap;
        if changed || now >= self.ud_next_check {
            self.ud_next_check = now + u64::from(self.m.clock.tsc_khz) * STEAL_SAMPLE_MS;
            new.idt_base = idt.base;
            new.idt_limit = idt.limit;
            new.handler = ud_handler(&self.m.mem, &sregs).unwrap_or(0);
            new.idt_gpa = crate::arch::x86::gates::idt_gpa(&self.m.mem, &sregs);
        }
        let (bp, df) = new
            .idt_gpa
            .map(|gpa| crate::arch::x86::gates::traps_wanted_at(&self.m.mem, gpa))
            .unwrap_or((false, false));
        // Only where the probe shows the host skips those gate checks.
        let probe = crate::kvm::probe::HostProbe::get();
        let fixed = crate::kvm::probe::Support::FixedUp;
        let bp = bp && probe.user_int3_gate_dpl == fixed;
        let df = df && probe.not_present_gate == fixed;
        // A handler address is looked up when the trap is wanted anew or the
        // IDT was just re-read.
        let reread = new.idt_gpa != trap.idt_gpa || new.handler != trap.handler || changed;
        let resolve = |want: bool, old: u64, v: u8| match (want, old) {
            (false, _) => 0,
            (true, h) if h != 0 && !reread => h,
            (true, _) => handler(&self.m.mem, &sregs, v).unwrap_or(0),
        };
        new.bp_handler = resolve(bp, trap.bp_handler, 3);
        new.df_handler = resolve(df, trap.df_handler, 8);
        // The #SS trap has the lowest priority: held only while a debug
        // register stays free for a `vmcall` site after the others.
        let others = usize::from(self.syscall.is_some())
            + [new.handler, new.bp_handler, new.df_handler]
                .iter()
                .filter(|&&h| h != 0)
                .count();
        let ss =
            probe.user_ss_override_noncanonical == fixed && others <= 2 && new.idt_gpa.is_some();
        new.ss_handler = resolve(ss, trap.ss_handler, 12);
        if new == trap {
            return;
        }
        self.ud_trap = Some(new);
        let moved = (new.handler, new.bp_handler, new.df_handler, new.ss_handler)
            != (
                trap.handler,
                trap.bp_handler,
                trap.df_handler,
                trap.ss_handler,
            );
        if moved {
            let keep = 4usize.saturating_sub(self.fixed_traps().count());
            while self.bp_sites.len() > keep {
                self.bp_sites.remove(0);
            }
            match self.program_breakpoints() {
                Ok(()) => tracing::debug!(
                    ud = format_args!("{:#x}", new.handler),
                    bp = format_args!("{:#x}", new.bp_handler),
                    df = format_args!("{:#x}", new.df_handler),
                    "exception handlers trapped (this host mis-delivers user software interrupts)"
                ),
                Err(e) => {
                    tracing::warn!(%e, "cannot trap the #UD handler: int n from user mode will fault");
                    self.ud_trap = None;
                }
            }
        }
    }

    /// The breakpoint on the guest's #UD handler fired: deliver a user
    /// software interrupt, or let the handler run (see [`crate::arch::x86::cpl3`]).
    /// `handle` is the decision for the trapped handler: #UD
    /// ([`crate::arch::x86::cpl3::handle_ud`]), #BP or #DF ([`crate::arch::x86::gates`]).
    fn ud_trap_hit(
        &mut self,
        handle: fn(
            &dyn x86::PhysMem,
            &mut kvm_bindings::kvm_regs,
            &mut kvm_bindings::kvm_sregs,
        ) -> crate::arch::x86::cpl3::UdOutcome,
    ) -> State {
        use crate::arch::x86::cpl3::*;
        let (mut regs, mut sregs) = (self.kvm.synced_regs(), self.kvm.synced_sregs());
        let outcome = handle(&self.m.mem, &mut regs, &mut sregs);
        tracing::trace!(
            ?outcome,
            rip = format_args!("{:#x}", regs.rip),
            "exception-handler trap"
        );
        match outcome {
            UdOutcome::Delivered { .. } | UdOutcome::Resumed => {
                self.kvm.put_synced_regs(&regs);
                self.kvm.put_synced_sregs(&sregs);
                return State::Running;
            }
            UdOutcome::NotOurs => {}
            UdOutcome::Refused(why) => {
                tracing::warn!(%why, "cannot deliver a software interrupt from user mode; the guest gets #UD");
            }
        }
        let (mut regs, sregs) = (self.kvm.synced_regs(), self.kvm.synced_sregs());
        match x86::fetch(&self.m.mem, &regs, &sregs) {
            Ok(insn) if step_over_entry(&self.m.mem, &insn, &mut regs, &sregs) => {
                self.kvm.put_synced_regs(&regs);
            }
            other => {
                tracing::warn!(
                    insn = ?other.map(|i| i.code()),
                    "cannot step over the #UD handler's first instruction: int n fix-up off"
                );
                self.ud_trap = None;
                let _ = self.program_breakpoints();
            }
        }
        State::Running
    }

    /// SCHEDOP_block / SCHEDOP_poll: wait in the VMM until an event for this
    /// vCPU (or one of `ports`) is pending, or the deadline.
    fn block(&mut self, deadline: Option<Instant>, ports: Option<Vec<u32>>) -> State {
        let polled = ports.is_some();
        self.m
            .xen
            .runstate_transition(self.id, runstate::State::Blocked, self.sample_run_delay());
        self.handle.report(Reported::Blocked);
        loop {
            match self.handle.request() {
                Request::Run => {}
                Request::Stop => return State::Stopped,
                Request::Pause => {
                    return State::Paused {
                        then: Box::new(State::Blocked { deadline, ports }),
                    }
                }
            }
            self.handle.clear_wake();
            if self.m.xen.wake_condition(self.id, ports.as_deref())
                || deadline.is_some_and(|d| Instant::now() >= d)
            {
                self.m.xen.end_block(self.id, polled);
                if !self.m.xen.vcpu_is_up(self.id) {
                    return State::Offline; // VCPUOP_down while blocked
                }
                self.m.xen.runstate_transition(
                    self.id,
                    runstate::State::Running,
                    self.sample_run_delay(),
                );
                self.handle.report(Reported::Running);
                return State::Running;
            }
            // Every event that can satisfy the wake condition wakes the
            // handle (raise_upcall, kick_vcpu), so the wait needs no poll.
            self.handle.wait_event(deadline);
        }
    }

    /// `VCPUOP_initialise` + `VCPUOP_up` and `VCPUOP_down` (see [`crate::vcpu_updown`]):
    /// load a staged start state, or park a started vCPU that is down. `None`: run the guest.
    fn vcpu_op_up_down(&mut self) -> Option<State> {
        // The hot path: a running vCPU (it cannot have a staged state: it is initialised).
        if self.handle.started() {
            return (!self.m.xen.vcpu_is_up(self.id)).then_some(State::Offline);
        }
        if let Some(st) = self.m.xen.take_start(self.id) {
            if let Err(e) = updown::apply(&self.kvm, &st) {
                self.m
                    .request_exit(GuestExit::Crash(CrashCause::Unemulated {
                        vcpu: self.id,
                        what: format!("KVM refused the state from VCPUOP_initialise: {e}"),
                    }));
                return Some(State::Stopped);
            }
            // The synced copy in kvm_run is stale now.
            self.kvm.discard_synced_changes();
            tracing::info!(
                rip = format_args!("{:#x}", st.rip),
                "started by VCPUOP_initialise + VCPUOP_up"
            );
            self.started = true;
            self.handle.set_started();
            self.m.xen.vcpu_started(self.id);
            self.m.xen.runstate_transition(
                self.id,
                runstate::State::Running,
                self.sample_run_delay(),
            );
        }
        // An AP still waiting for INIT/SIPI is down too, but stays in KVM_RUN for them.
        None
    }

    /// Down (`VCPUOP_down`): runstate offline, wait in the VMM until up again.
    fn offline(&mut self) -> State {
        self.m
            .xen
            .runstate_transition(self.id, runstate::State::Offline, self.sample_run_delay());
        tracing::debug!("offline (VCPUOP_down)");
        loop {
            match self.handle.request() {
                Request::Run => {}
                Request::Stop => return State::Stopped,
                Request::Pause => {
                    return State::Paused {
                        then: Box::new(State::Offline),
                    }
                }
            }
            self.handle.clear_wake();
            if self.m.xen.vcpu_is_up(self.id) {
                self.m.xen.runstate_transition(
                    self.id,
                    runstate::State::Running,
                    self.sample_run_delay(),
                );
                tracing::debug!("up again (VCPUOP_up)");
                return State::Running;
            }
            // VCPUOP_up wakes the handle.
            self.handle.wait_event(None);
        }
    }

    /// An emulation failure: fix up what this host cannot execute.
    fn internal_error(&mut self) -> State {
        let fail = |m: &Machine, id: u32, msg: String| {
            m.request_exit(GuestExit::Crash(CrashCause::Unemulated {
                vcpu: id,
                what: msg,
            }));
            State::Stopped
        };
        let (mut regs, mut sregs) = match (self.kvm.regs(), self.kvm.sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            _ => {
                return fail(
                    &self.m,
                    self.id,
                    "cannot read registers after an emulation failure".into(),
                )
            }
        };
        let env = EmuHost {
            kvm: &self.kvm,
            m: &self.m,
        };
        let fix = x86::fixup(&self.m.mem, &env, &mut regs, &mut sregs);
        tracing::trace!(
            ?fix,
            rip = format_args!("{:#x}", regs.rip),
            "emulation-failure fix-up"
        );
        let kvm = &self.kvm;
        let inject = |f: &dyn Fn(&mut kvm_bindings::kvm_vcpu_events)| kvm.edit_events(f);
        let r = match &fix {
            Fixup::Resume => Ok(()),
            Fixup::Exception { vector, error_code } => inject(&|ev| {
                ev.exception.injected = 1;
                ev.exception.nr = *vector;
                ev.exception.has_error_code = u8::from(error_code.is_some());
                ev.exception.error_code = error_code.unwrap_or(0);
            }),
            Fixup::SoftInt { vector } => inject(&|ev| {
                ev.interrupt.injected = 1;
                ev.interrupt.nr = *vector;
                ev.interrupt.soft = 1;
            }),
            Fixup::PageFault(pf) => {
                sregs.cr2 = pf.linear;
                inject(&|ev| {
                    ev.exception.injected = 1;
                    ev.exception.nr = x86::PF;
                    ev.exception.has_error_code = 1;
                    ev.exception.error_code = pf.error_code;
                })
            }
            Fixup::Unhandled(what) => {
                // KVM sometimes emulates an instruction it could run natively
                // (after a shadow-paging refill, say). Retry it once as is;
                // fail only if the same instruction stops KVM again at once.
                if self.retry_rip != Some(regs.rip) {
                    self.retry_rip = Some(regs.rip);
                    self.retried += 1;
                    tracing::debug!(rip = format_args!("{:#x}", regs.rip), %what, "emulation failure retried");
                    return State::Running;
                }
                return fail(
                    &self.m,
                    self.id,
                    format!("KVM cannot emulate {what}, and neither can xenkvm"),
                );
            }
        };
        let r = r
            .and_then(|_| self.kvm.set_regs(&regs))
            .and_then(|_| self.kvm.set_sregs(&sregs));
        if let Err(e) = r {
            return fail(&self.m, self.id, format!("cannot apply a fix-up: {e}"));
        }
        // The synced copy in kvm_run is stale now; make sure it is not
        // written back over what we just set.
        self.kvm.discard_synced_changes();
        State::Running
    }
}

struct EmuHost<'a> {
    kvm: &'a KvmVcpu,
    m: &'a Machine,
}

impl x86::EmuEnv for EmuHost<'_> {
    fn fpu(&self) -> Option<kvm_bindings::kvm_fpu> {
        self.kvm.fpu().ok()
    }
    fn set_fpu(&self, f: &kvm_bindings::kvm_fpu) -> bool {
        self.kvm.set_fpu(f).is_ok()
    }
    fn rdtsc(&self) -> u64 {
        self.m.clock.guest_tsc()
    }
    fn tsc_aux(&self) -> u64 {
        self.kvm.read_msr(0xc000_0103).unwrap_or(0)
    }
    fn fpu_status(&self) -> u16 {
        self.kvm.fpu().map(|f| f.fsw).unwrap_or(0)
    }
    fn mxcsr(&self) -> u32 {
        self.kvm.fpu().map(|f| f.mxcsr).unwrap_or(0x1f80)
    }
    fn xmm(&self, n: usize) -> Option<[u8; 16]> {
        self.kvm.fpu().ok().and_then(|f| f.xmm.get(n).copied())
    }
    fn set_xmm(&self, n: usize, v: [u8; 16]) -> bool {
        match self.kvm.fpu() {
            Ok(mut f) if n < f.xmm.len() => {
                f.xmm[n] = v;
                self.kvm.set_fpu(&f).is_ok()
            }
            _ => false,
        }
    }
    fn vex128_move(&self, dst: usize, src: usize) -> bool {
        // The standard (non-compacted) XSAVE layout KVM uses: XMM registers
        // at byte 160, the upper halves of the YMM registers at 576.
        if dst >= 16 || src >= 16 {
            return false;
        }
        self.kvm.edit_xsave(&mut |bytes| {
            let (xd, xs, yd) = (160 + 16 * dst, 160 + 16 * src, 576 + 16 * dst);
            bytes.copy_within(xs..xs + 16, xd);
            bytes[yd..yd + 16].fill(0);
        })
    }
    fn set_mxcsr(&self, v: u32) -> bool {
        match self.kvm.fpu() {
            Ok(mut f) => {
                f.mxcsr = v;
                self.kvm.set_fpu(&f).is_ok()
            }
            Err(_) => false,
        }
    }
    fn xcr0(&self) -> u64 {
        self.kvm.xcr0()
    }
    fn xsave_area(&self) -> Option<Vec<u8>> {
        self.kvm.xsave_bytes()
    }
    fn set_xsave_area(&self, area: &[u8]) -> bool {
        self.kvm.set_xsave_bytes(area)
    }
    fn xss(&self) -> u64 {
        self.kvm.read_msr(0xda0).unwrap_or(0)
    }
    fn xstate_layout(&self) -> x86::xsave::XstateLayout {
        crate::kvm::vcpu::xstate_layout()
    }
    fn flush_guest_tlb(&self) -> bool {
        self.kvm.flush_guest_tlb()
    }
}
