//! One thread per vCPU. The thread is a small state machine
//! (`Running` -> `Blocked` -> `Running` ... -> `Stopped`); each state is a
//! method that returns the next. Exits are handled with the registers KVM
//! syncs into `kvm_run` (no `KVM_GET_REGS` on the hot path: it costs ~7 µs
//! on this host); the slow paths (emulation-failure fix-ups) use the full
//! ioctls.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_vcpu_events;
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::PortEvent;
use crate::exit::{decide, Action, Exit, ExitEnv};
use crate::machine::{GuestExit, Machine};
use crate::x86::{self, Fixup};
use crate::xen::{HypercallResult, VcpuCtx};

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for the kick signal; KVM_RUN returns EINTR.
pub fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), noop_handler) {
            tracing::error!(%e, "cannot install the vCPU kick signal handler");
        }
    });
}

/// Interrupts a vCPU thread's KVM_RUN.
pub fn kick<T>(h: &std::thread::JoinHandle<T>) {
    let _ = h.kill(kick_signal());
}

/// What the vCPU thread does next.
#[derive(Debug)]
enum State {
    Running,
    /// Waiting in the VMM: SCHEDOP_block or SCHEDOP_poll.
    Blocked {
        deadline: Option<Instant>,
        ports: Option<Vec<u32>>,
    },
    Stopped,
}

/// How often the running vCPU samples its thread's run_delay for steal time.
const STEAL_SAMPLE_MS: u64 = 10;

pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    m: Arc<Machine>,
    run_delay: Option<runstate::RunDelay>,
    next_steal_sample: u64,
    /// Set at the vCPU's first exit (for APs: after INIT/SIPI).
    started: bool,
    /// Linear addresses of `vmcall` sites with a hardware breakpoint armed.
    bp_sites: Vec<u64>,
    /// The guest's syscall entry and #PF handler, on hosts that need the
    /// [`crate::syscall_fix`] (set when the guest writes LSTAR).
    syscall: Option<crate::syscall_fix::SyscallSetup>,
    /// RIP of the last emulation failure retried unchanged, and how many.
    retry_rip: Option<u64>,
    retried: u64,
}

/// The VM facts [`decide`] needs.
struct ExitCtx<'a>(&'a Machine);

impl ExitEnv for ExitCtx<'_> {
    fn hypercall_page_ok(&self, gpa: u64) -> bool {
        self.0.xen.hypercall_page_ok(gpa)
    }
}

impl Vcpu {
    pub fn new(id: u32, fd: VcpuFd, m: Arc<Machine>) -> Self {
        Vcpu {
            id,
            fd,
            m,
            run_delay: None,
            next_steal_sample: 0,
            started: false,
            bp_sites: Vec::new(),
            syscall: None,
            retry_rip: None,
            retried: 0,
        }
    }

    /// The thread body.
    pub fn run(mut self) {
        let span = tracing::info_span!("vcpu", id = self.id);
        let _e = span.enter();
        self.fd.set_sync_valid_reg(SyncReg::Register);
        self.fd.set_sync_valid_reg(SyncReg::SystemRegister);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.m.threads[self.id as usize].store(me as u64, Ordering::Relaxed);
        // Steal time: run_delay of this thread, sampled every STEAL_SAMPLE_MS.
        self.run_delay = runstate::RunDelay::open().ok();
        if self.id == 0 {
            self.m
                .xen
                .runstate_transition(0, runstate::State::Running, self.sample_run_delay());
        }
        let mut state = State::Running;
        loop {
            state = match state {
                State::Running => self.run_once(),
                State::Blocked { deadline, ports } => self.block(deadline, ports),
                State::Stopped => break,
            };
        }
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
    }

    fn sample_run_delay(&self) -> Option<u64> {
        self.run_delay.as_ref().and_then(|r| r.sample().ok())
    }

    fn run_once(&mut self) -> State {
        if self.m.stopping() {
            return State::Stopped;
        }
        let first_exit = !self.started;
        // Cheap on the exit path: one TSC read and a compare.
        let t = crate::clock::host_tsc();
        if t >= self.next_steal_sample {
            self.next_steal_sample = t + u64::from(self.m.clock.tsc_khz) * STEAL_SAMPLE_MS;
            self.m.xen.runstate_transition(
                self.id,
                runstate::State::Running,
                self.sample_run_delay(),
            );
        }
        let m = &self.m;
        let env = ExitCtx(m);
        // Copy the exit out of kvm_run, decide, and give KVM the answers it
        // expects inside kvm_run before the borrow ends.
        let since = &self.m.run_since[self.id as usize];
        since.store(crate::clock::host_tsc(), Ordering::Relaxed);
        let result = self.fd.run();
        since.store(0, Ordering::Relaxed);
        let action = match result {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut d = [0u8; 4];
                let len = data.len().min(4);
                d[..len].copy_from_slice(&data[..len]);
                decide(&Exit::IoOut { port, data: d, len }, self.id, &env)
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let a = decide(
                    &Exit::IoIn {
                        port,
                        len: data.len(),
                    },
                    self.id,
                    &env,
                );
                if !m.xen.bench_io_in(port, data) {
                    m.ports.io_in(port, data);
                }
                a
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                data.fill(0xff);
                decide(
                    &Exit::MmioRead {
                        addr,
                        len: data.len(),
                    },
                    self.id,
                    &env,
                )
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => decide(
                &Exit::MmioWrite {
                    addr,
                    len: data.len(),
                },
                self.id,
                &env,
            ),
            Ok(VcpuExit::X86Wrmsr(w)) => {
                let a = decide(
                    &Exit::WrMsr {
                        index: w.index,
                        data: w.data,
                    },
                    self.id,
                    &env,
                );
                *w.error = u8::from(a == Action::MsrFault);
                a
            }
            Ok(VcpuExit::X86Rdmsr(r)) => {
                let a = decide(&Exit::RdMsr { index: r.index }, self.id, &env);
                *r.error = u8::from(a == Action::MsrFault);
                a
            }
            Ok(VcpuExit::Hlt) => decide(&Exit::Hlt, self.id, &env),
            Ok(VcpuExit::Shutdown) => decide(&Exit::Shutdown, self.id, &env),
            Ok(VcpuExit::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the union is the one KVM wrote.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                decide(&Exit::InternalError { suberror }, self.id, &env)
            }
            Ok(VcpuExit::SystemEvent(t, _)) => decide(&Exit::SystemEvent(t), self.id, &env),
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {
                decide(&Exit::Interrupted, self.id, &env)
            }
            Ok(VcpuExit::Debug(d)) => decide(&Exit::Debug { pc: d.pc }, self.id, &env),
            Ok(VcpuExit::FailEntry(reason, _cpu)) => {
                decide(&Exit::FailEntry { reason }, self.id, &env)
            }
            Ok(other) => decide(&Exit::Unexpected(format!("{other:?}")), self.id, &env),
            Err(e) => decide(&Exit::RunError(e.errno()), self.id, &env),
        };
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
            self.m.started[self.id as usize].store(true, Ordering::Release);
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
            Action::Resume | Action::PortIn { .. } | Action::MsrFault => State::Running,
            Action::Interrupted => {
                if self.m.stall_kicked[self.id as usize].swap(false, Ordering::AcqRel) {
                    self.stalled()
                } else {
                    State::Running
                }
            }
            Action::LstarWrite { data } => self.lstar_written(data),
            Action::HypercallTrap { pc } if self.syscall.is_some_and(|s| s.pf_handler == pc) => {
                self.pf_trap()
            }
            Action::HypercallTrap { pc } => {
                if self.bp_sites.contains(&pc) {
                    let sr = self.fd.sync_regs();
                    let (regs, sregs) = (sr.regs, sr.sregs);
                    let (regs, next) = self.trapped_hypercall(regs, sregs);
                    self.fd.sync_regs_mut().regs = regs;
                    self.fd.set_sync_dirty_reg(SyncReg::Register);
                    next
                } else {
                    tracing::debug!(
                        pc = format_args!("{pc:#x}"),
                        "debug exit at an unknown site"
                    );
                    State::Running
                }
            }
            Action::MmioUnbacked { addr, write } => {
                tracing::debug!(
                    addr = format_args!("{addr:#x}"),
                    write,
                    "access to unbacked MMIO"
                );
                State::Running
            }
            Action::Hypercall => self.hypercall(),
            Action::BenchStubReturn => {
                // The test guest's bench stub: complete its `ret` as for a hypercall.
                let mut regs = self.fd.sync_regs().regs;
                let sregs = self.fd.sync_regs().sregs;
                x86::complete_stub_return(&self.m.mem, &mut regs, &sregs, 0);
                self.fd.sync_regs_mut().regs = regs;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
                State::Running
            }
            Action::PortOut { port, data, len } => self.io_out(port, &data[..len]),
            Action::HypercallPage { gpa } => {
                let long = x86::is_64bit(&self.fd.sync_regs().sregs);
                self.m.xen.write_hypercall_page(gpa, long);
                State::Running
            }
            Action::Fixup => self.internal_error(),
            Action::Stop(why) => {
                let why = match why {
                    GuestExit::Reboot(r) if r.starts_with("triple fault") => {
                        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                        GuestExit::Reboot(format!("{r} at RIP {rip:#x}"))
                    }
                    w => w,
                };
                self.m.request_exit(why);
                State::Stopped
            }
        }
    }

    fn io_out(&mut self, port: u16, data: &[u8]) -> State {
        if self.m.xen.bench_io_out(port, data) {
            return State::Running;
        }
        match self.m.ports.io_out(port, data) {
            PortEvent::None => State::Running,
            PortEvent::Reset => {
                self.m
                    .request_exit(GuestExit::Reboot("reset through an I/O port".into()));
                State::Stopped
            }
            PortEvent::PowerOff => {
                self.m.request_exit(GuestExit::Poweroff);
                State::Stopped
            }
        }
    }

    /// A hypercall through the hypercall page: decode from the synced
    /// registers, dispatch, then complete the stub (see `hcall_page`).
    fn hypercall(&mut self) -> State {
        let sr = self.fd.sync_regs();
        let ctx = VcpuCtx {
            id: self.id,
            regs: sr.regs,
            sregs: sr.sregs,
        };
        let (v, next) = self.outcome(self.m.xen.hypercall(&ctx));
        let mut regs = ctx.regs;
        x86::complete_stub_return(&self.m.mem, &mut regs, &ctx.sregs, v);
        self.fd.sync_regs_mut().regs = regs;
        self.fd.set_sync_dirty_reg(SyncReg::Register);
        next
    }

    /// The RAX value and next state for a hypercall's result.
    fn outcome(&self, r: HypercallResult) -> (i64, State) {
        match r {
            HypercallResult::Return(v) => (v, State::Running),
            HypercallResult::Block { deadline, ports } => (0, State::Blocked { deadline, ports }),
            HypercallResult::Yield => {
                std::thread::yield_now();
                (0, State::Running)
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
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return State::Running;
        };
        match x86::fetch(&self.m.mem, &regs, &sregs).map(|i| i.code()) {
            Ok(iced_x86::Code::Vmcall) | Ok(iced_x86::Code::Vmmcall) => {}
            _ => return State::Running,
        }
        let pc = x86::linear_rip(&regs, &sregs);
        let (regs, next) = self.trapped_hypercall(regs, sregs);
        if let Err(e) = self.fd.set_regs(&regs) {
            self.m.request_exit(GuestExit::Error(format!(
                "vCPU {}: cannot complete a vmcall: {e}",
                self.id
            )));
            return State::Stopped;
        }
        self.fd.get_kvm_run().kvm_dirty_regs = 0;
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

    /// Arms an instruction breakpoint at linear address `pc` (up to four
    /// sites, three when the syscall fix-up holds one; the oldest is replaced).
    fn arm_breakpoint(&mut self, pc: u64) {
        if self.bp_sites.contains(&pc) {
            return;
        }
        let max = if self.syscall.is_some() { 3 } else { 4 };
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
    fn program_breakpoints(&mut self) -> Result<(), kvm_ioctls::Error> {
        let mut dbg = kvm_bindings::kvm_guest_debug {
            control: kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP,
            ..Default::default()
        };
        let sites = self
            .bp_sites
            .iter()
            .copied()
            .chain(self.syscall.map(|s| s.pf_handler));
        let mut dr7 = 0u64;
        for (i, site) in sites.take(4).enumerate() {
            dbg.arch.debugreg[i] = site;
            dr7 |= 1 << (2 * i); // local enable, execute, length 1
        }
        dbg.arch.debugreg[7] = dr7;
        self.fd.set_guest_debug(&dbg)
    }

    /// The guest wrote LSTAR on a host whose `syscall` stays at CPL 3:
    /// write it, and trap the guest's #PF handler (see [`crate::syscall_fix`]).
    fn lstar_written(&mut self, lstar: u64) -> State {
        use crate::syscall_fix::*;
        let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_LSTAR,
            data: lstar,
            ..Default::default()
        }]);
        if !matches!(msrs.map(|m| self.fd.set_msrs(&m)), Ok(Ok(1))) {
            self.m.request_exit(GuestExit::Error(format!(
                "vCPU {}: cannot write LSTAR",
                self.id
            )));
            return State::Stopped;
        }
        let sregs = self.fd.sync_regs().sregs;
        let star = read_msr(&self.fd, MSR_STAR).unwrap_or(0);
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
        while self.bp_sites.len() > 3 {
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
        use crate::syscall_fix::*;
        let Some(setup) = self.syscall else {
            return State::Running;
        };
        let sr = self.fd.sync_regs();
        let (mut regs, mut sregs) = (sr.regs, sr.sregs);
        let paging = x86::Paging::from_sregs(&sregs);
        let mut raw = [0u8; 48];
        let frame = x86::read_linear(&self.m.mem, &paging, regs.rsp, &mut raw, x86::Access::READ)
            .ok()
            .map(|()| Frame::parse(&raw));
        if let Some(f) = frame.filter(|f| f.is_broken_syscall(&setup, sregs.cr2)) {
            complete_syscall(&mut regs, &mut sregs, &f, setup.star);
            let sr = self.fd.sync_regs_mut();
            sr.regs = regs;
            sr.sregs = sregs;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
            return State::Running;
        }
        match x86::fetch(&self.m.mem, &regs, &sregs) {
            Ok(insn) if step_over(&insn, &mut regs) => {
                self.fd.sync_regs_mut().regs = regs;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
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

    /// SCHEDOP_block / SCHEDOP_poll: wait in the VMM until an event for this
    /// vCPU (or one of `ports`) is pending, or the deadline.
    fn block(&mut self, deadline: Option<Instant>, ports: Option<Vec<u32>>) -> State {
        let waker = &self.m.wakers[self.id as usize];
        let polled = ports.is_some();
        self.m
            .xen
            .runstate_transition(self.id, runstate::State::Blocked, self.sample_run_delay());
        loop {
            if self.m.stopping() {
                return State::Stopped;
            }
            waker.clear();
            if self.m.xen.wake_condition(self.id, ports.as_deref())
                || deadline.is_some_and(|d| Instant::now() >= d)
            {
                self.m.xen.end_block(self.id, polled);
                self.m.xen.runstate_transition(
                    self.id,
                    runstate::State::Running,
                    self.sample_run_delay(),
                );
                return State::Running;
            }
            // Bounded waits so a lost wake-up costs at most 100 ms.
            let d = deadline.unwrap_or_else(|| Instant::now() + Duration::from_millis(100));
            waker.wait(Some(d.min(Instant::now() + Duration::from_millis(100))));
        }
    }

    /// An emulation failure: fix up what this host cannot execute.
    fn internal_error(&mut self) -> State {
        let fail = |m: &Machine, id: u32, msg: String| {
            m.request_exit(GuestExit::Crash(format!("vCPU {id}: {msg}")));
            State::Stopped
        };
        let (mut regs, mut sregs) = match (self.fd.get_regs(), self.fd.get_sregs()) {
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
            fd: &self.fd,
            m: &self.m,
        };
        let fix = x86::fixup(&self.m.mem, &env, &mut regs, &mut sregs);
        tracing::trace!(
            ?fix,
            rip = format_args!("{:#x}", regs.rip),
            "emulation-failure fix-up"
        );
        let inject =
            |fd: &VcpuFd, f: &dyn Fn(&mut kvm_vcpu_events)| -> Result<(), kvm_ioctls::Error> {
                let mut ev = fd.get_vcpu_events()?;
                f(&mut ev);
                fd.set_vcpu_events(&ev)
            };
        let r = match &fix {
            Fixup::Resume => Ok(()),
            Fixup::Exception { vector, error_code } => inject(&self.fd, &|ev| {
                ev.exception.injected = 1;
                ev.exception.nr = *vector;
                ev.exception.has_error_code = u8::from(error_code.is_some());
                ev.exception.error_code = error_code.unwrap_or(0);
            }),
            Fixup::SoftInt { vector } => inject(&self.fd, &|ev| {
                ev.interrupt.injected = 1;
                ev.interrupt.nr = *vector;
                ev.interrupt.soft = 1;
            }),
            Fixup::PageFault(pf) => {
                sregs.cr2 = pf.linear;
                inject(&self.fd, &|ev| {
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
            .and_then(|_| self.fd.set_regs(&regs))
            .and_then(|_| self.fd.set_sregs(&sregs));
        if let Err(e) = r {
            return fail(&self.m, self.id, format!("cannot apply a fix-up: {e}"));
        }
        // The synced copy in kvm_run is stale now; make sure it is not
        // written back over what we just set.
        self.fd.get_kvm_run().kvm_dirty_regs = 0;
        State::Running
    }
}

struct EmuHost<'a> {
    fd: &'a VcpuFd,
    m: &'a Machine,
}

impl x86::EmuEnv for EmuHost<'_> {
    fn fpu(&self) -> Option<kvm_bindings::kvm_fpu> {
        fpu_state(self.fd)
    }
    fn set_fpu(&self, f: &kvm_bindings::kvm_fpu) -> bool {
        set_fpu_state(self.fd, f)
    }
    fn rdtsc(&self) -> u64 {
        self.m.clock.guest_tsc()
    }
    fn tsc_aux(&self) -> u64 {
        read_msr(self.fd, 0xc000_0103).unwrap_or(0)
    }
    fn fpu_status(&self) -> u16 {
        fpu_state(self.fd).map(|f| f.fsw).unwrap_or(0)
    }
    fn mxcsr(&self) -> u32 {
        fpu_state(self.fd).map(|f| f.mxcsr).unwrap_or(0x1f80)
    }
    fn xmm(&self, n: usize) -> Option<[u8; 16]> {
        fpu_state(self.fd).and_then(|f| f.xmm.get(n).copied())
    }
    fn set_xmm(&self, n: usize, v: [u8; 16]) -> bool {
        match fpu_state(self.fd) {
            Some(mut f) if n < f.xmm.len() => {
                f.xmm[n] = v;
                set_fpu_state(self.fd, &f)
            }
            _ => false,
        }
    }
    fn set_mxcsr(&self, v: u32) -> bool {
        match fpu_state(self.fd) {
            Some(mut f) => {
                f.mxcsr = v;
                set_fpu_state(self.fd, &f)
            }
            None => false,
        }
    }
    fn xcr0(&self) -> u64 {
        self.fd
            .get_xcrs()
            .ok()
            .and_then(|x| {
                x.xcrs
                    .iter()
                    .take(x.nr_xcrs as usize)
                    .find(|x| x.xcr == 0)
                    .map(|x| x.value)
            })
            .unwrap_or(1)
    }
}

/// Byte offsets in the legacy (FXSAVE) region of KVM's XSAVE layout.
const XSAVE_FCW: usize = 0;
const XSAVE_MXCSR: usize = 24;
const XSAVE_ST0: usize = 32;
const XSAVE_XMM0: usize = 160;
/// XSTATE_BV in the XSAVE header.
const XSAVE_XSTATE_BV: usize = 512;

/// The vCPU's x87/SSE state as the guest sees it. Read through KVM_GET_XSAVE
/// when the host has it: a component in its initial state (XSTATE_BV bit
/// clear) reads as its initial values there, while KVM_GET_FPU would return
/// stale bytes.
pub fn fpu_state(fd: &VcpuFd) -> Option<kvm_bindings::kvm_fpu> {
    let Ok(x) = fd.get_xsave() else {
        return fd.get_fpu().ok();
    };
    let b: Vec<u8> = x.region.iter().flat_map(|w| w.to_le_bytes()).collect();
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let mut f = kvm_bindings::kvm_fpu {
        fcw: u16_at(XSAVE_FCW),
        fsw: u16_at(XSAVE_FCW + 2),
        ftwx: b[4],
        last_opcode: u16_at(6),
        last_ip: u64::from_le_bytes(b[8..16].try_into().ok()?),
        last_dp: u64::from_le_bytes(b[16..24].try_into().ok()?),
        mxcsr: u32::from_le_bytes(b[XSAVE_MXCSR..XSAVE_MXCSR + 4].try_into().ok()?),
        ..Default::default()
    };
    for (i, r) in f.fpr.iter_mut().enumerate() {
        r.copy_from_slice(&b[XSAVE_ST0 + 16 * i..XSAVE_ST0 + 16 * i + 16]);
    }
    for (i, r) in f.xmm.iter_mut().enumerate() {
        r.copy_from_slice(&b[XSAVE_XMM0 + 16 * i..XSAVE_XMM0 + 16 * i + 16]);
    }
    Some(f)
}

/// Sets the vCPU's x87/SSE state. Through KVM_SET_XSAVE when the host has
/// it, marking x87 and SSE in use (XSTATE_BV bits 0 and 1): KVM_SET_FPU
/// writes the legacy area only, and a component whose XSTATE_BV bit is
/// clear is loaded as its initial state, losing what was written.
pub fn set_fpu_state(fd: &VcpuFd, f: &kvm_bindings::kvm_fpu) -> bool {
    let Ok(mut x) = fd.get_xsave() else {
        return fd.set_fpu(f).is_ok();
    };
    let mut b: Vec<u8> = x.region.iter().flat_map(|w| w.to_le_bytes()).collect();
    b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    b[4] = f.ftwx;
    b[6..8].copy_from_slice(&f.last_opcode.to_le_bytes());
    b[8..16].copy_from_slice(&f.last_ip.to_le_bytes());
    b[16..24].copy_from_slice(&f.last_dp.to_le_bytes());
    b[XSAVE_MXCSR..XSAVE_MXCSR + 4].copy_from_slice(&f.mxcsr.to_le_bytes());
    for (i, r) in f.fpr.iter().enumerate() {
        b[XSAVE_ST0 + 16 * i..XSAVE_ST0 + 16 * i + 16].copy_from_slice(r);
    }
    for (i, r) in f.xmm.iter().enumerate() {
        b[XSAVE_XMM0 + 16 * i..XSAVE_XMM0 + 16 * i + 16].copy_from_slice(r);
    }
    b[XSAVE_XSTATE_BV] |= 3;
    for (w, c) in x.region.iter_mut().zip(b.chunks(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    // SAFETY: `x` is the kvm_xsave KVM_GET_XSAVE just returned for this
    // vCPU (4096 bytes; no dynamically enabled state such as AMX, which
    // xenkvm never enables), with only the legacy region and XSTATE_BV's
    // x87/SSE bits changed, so KVM reads nothing past the struct.
    unsafe { fd.set_xsave(&x) }.is_ok()
}

fn read_msr(fd: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    (fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
}
