//! A vCPU file descriptor as the rest of the VMM sees it: `KVM_RUN` that
//! returns a made-up [`Exit`] copied out of `kvm_run`, the answers KVM
//! expects inside `kvm_run` before the next entry (port and MMIO read data,
//! MSR results), register access through the synced copy or the ioctls,
//! event injection, hardware breakpoints, and the [`Kicker`] that gets a
//! vCPU out of `KVM_RUN` without ever losing the kick.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_guest_debug, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, Msrs,
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::x86::cpuid::CpuidEntry;

/// An error from a KVM ioctl.
pub type KvmError = kvm_ioctls::Error;

/// A KVM exit, copied out of `kvm_run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    IoOut {
        port: u16,
        data: [u8; 4],
        len: usize,
    },
    IoIn {
        port: u16,
        len: usize,
    },
    MmioRead {
        addr: u64,
        len: usize,
    },
    MmioWrite {
        addr: u64,
        data: [u8; 8],
        len: usize,
    },
    WrMsr {
        index: u32,
        data: u64,
    },
    RdMsr {
        index: u32,
    },
    Hlt,
    /// Triple fault.
    Shutdown,
    InternalError {
        suberror: u32,
    },
    SystemEvent(u32),
    /// KVM_RUN returned because of a signal (EINTR/EAGAIN), `immediate_exit`
    /// or `KVM_EXIT_INTR`.
    Interrupted,
    /// A debug exit: a hardware breakpoint xenkvm armed fired at linear
    /// address `pc`.
    Debug {
        pc: u64,
    },
    FailEntry {
        reason: u64,
    },
    /// KVM_RUN failed with this errno.
    RunError(i32),
    Unexpected(String),
}

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

/// One vCPU's file descriptor. Owned by its thread.
pub struct KvmVcpu {
    pub(super) fd: VcpuFd,
    /// `KVM_RUN` entries so far (read by the VMM and tests).
    entries: Arc<AtomicU64>,
}

impl KvmVcpu {
    pub(super) fn new(fd: VcpuFd) -> Self {
        KvmVcpu {
            fd,
            entries: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The counter of `KVM_RUN` entries of this vCPU.
    pub fn entries(&self) -> Arc<AtomicU64> {
        self.entries.clone()
    }

    /// Asks KVM to sync the general and system registers into `kvm_run` at
    /// every exit (no `KVM_GET_REGS` on the hot path).
    pub fn enable_sync_regs(&mut self) {
        self.fd.set_sync_valid_reg(SyncReg::Register);
        self.fd.set_sync_valid_reg(SyncReg::SystemRegister);
    }

    /// A second mapping of this vCPU's `kvm_run` for kicking it from other
    /// threads (it stays valid however long the [`Kicker`] lives).
    pub fn kicker(&self, mmap_size: usize) -> Result<Kicker, std::io::Error> {
        use std::os::fd::AsRawFd;
        // SAFETY: mapping a vCPU fd's kvm_run area shared, at offset 0, with
        // the size KVM reported; the result is checked, and owned by the Kicker
        // which unmaps it on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mmap_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Kicker {
            run: p.cast(),
            size: mmap_size,
            thread: AtomicU64::new(0),
        })
    }

    /// Runs the guest until the next exit and copies it out.
    pub fn run(&mut self) -> Exit {
        self.entries.fetch_add(1, Ordering::Relaxed);
        let exit = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut d = [0u8; 4];
                let len = data.len().min(4);
                d[..len].copy_from_slice(&data[..len]);
                Exit::IoOut { port, data: d, len }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                data.fill(0xff);
                Exit::IoIn {
                    port,
                    len: data.len(),
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                data.fill(0xff);
                Exit::MmioRead {
                    addr,
                    len: data.len(),
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let mut d = [0u8; 8];
                let len = data.len().min(8);
                d[..len].copy_from_slice(&data[..len]);
                Exit::MmioWrite { addr, data: d, len }
            }
            Ok(VcpuExit::X86Wrmsr(w)) => Exit::WrMsr {
                index: w.index,
                data: w.data,
            },
            Ok(VcpuExit::X86Rdmsr(r)) => Exit::RdMsr { index: r.index },
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the union is the one KVM wrote.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                Exit::InternalError { suberror }
            }
            Ok(VcpuExit::SystemEvent(t, _)) => Exit::SystemEvent(t),
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Exit::Interrupted,
            Ok(VcpuExit::Debug(d)) => Exit::Debug { pc: d.pc },
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Exit::FailEntry { reason },
            Ok(other) => Exit::Unexpected(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Err(e) => Exit::RunError(e.errno()),
        };
        // KVM leaves immediate_exit as userspace set it: clear it before
        // the VMM looks at its control state, so a kick sent after that look
        // sets it again and the next entry returns at once.
        self.fd.set_kvm_immediate_exit(0);
        fence(Ordering::SeqCst);
        exit
    }

    /// The answer to the last [`Exit::IoIn`]: KVM copies it into the guest's
    /// register at the next entry.
    pub fn complete_pio_in(&mut self, data: &[u8]) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO (the caller only calls this
        // after Exit::IoIn), so `io` is the union member KVM wrote; its data
        // lies at data_offset inside the kvm_run mapping, size*count bytes,
        // and we write at most that many.
        unsafe {
            let io = (*run).__bindgen_anon_1.io;
            let cap = usize::from(io.size) * io.count as usize;
            let dst = run.cast::<u8>().add(io.data_offset as usize);
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len().min(cap));
        }
    }

    /// The answer to the last [`Exit::MmioRead`].
    pub fn complete_mmio_read(&mut self, data: &[u8]) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_MMIO (the caller only calls this
        // after Exit::MmioRead), so `mmio` is the member KVM wrote.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let n = data.len().min(mmio.data.len()).min(mmio.len as usize);
        mmio.data[..n].copy_from_slice(&data[..n]);
    }

    /// The answer to the last [`Exit::WrMsr`] or [`Exit::RdMsr`]: `error`
    /// makes the guest take #GP; `data` is what RDMSR returns.
    pub fn complete_msr(&mut self, error: bool, data: u64) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_X86_RDMSR/WRMSR (the caller
        // only calls this after Exit::RdMsr/WrMsr), so `msr` is the member
        // KVM wrote.
        let msr = unsafe { &mut run.__bindgen_anon_1.msr };
        msr.error = u8::from(error);
        msr.data = data;
    }

    /// The registers KVM synced into `kvm_run` at this exit.
    pub fn synced_regs(&self) -> kvm_regs {
        self.fd.sync_regs().regs
    }

    pub fn synced_sregs(&self) -> kvm_sregs {
        self.fd.sync_regs().sregs
    }

    /// Changes the general registers through the synced copy (applied at
    /// the next entry).
    pub fn put_synced_regs(&mut self, regs: &kvm_regs) {
        self.fd.sync_regs_mut().regs = *regs;
        self.fd.set_sync_dirty_reg(SyncReg::Register);
    }

    /// Changes the segment and control registers through the synced copy
    /// (applied at the next entry). Its `interrupt_bitmap` is cleared:
    /// `KVM_SET_SREGS` queues the interrupt a set bit names as injected
    /// (delivered at the next entry whatever RFLAGS.IF says), and the copy
    /// KVM stored at the exit can still name an interrupt that was already
    /// delivered. Measured on `kvm_pvm`: at the syscall fix-up's #PF trap
    /// the copy had the Xen upcall vector 0xf3 set while
    /// `KVM_GET_VCPU_EVENTS` said no interrupt was injected; writing it
    /// back delivered 0xf3 again at LSTAR on the user's stack, a double
    /// fault in every Linux boot at init's first system call. xenkvm
    /// never injects interrupts through this path.
    pub fn put_synced_sregs(&mut self, sregs: &kvm_sregs) {
        let mut s = *sregs;
        s.interrupt_bitmap = [0; 4];
        self.fd.sync_regs_mut().sregs = s;
        self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
    }

    /// After registers were set with the ioctls, the synced copy is stale:
    /// make sure it is not written back over them.
    pub fn discard_synced_changes(&mut self) {
        self.fd.get_kvm_run().kvm_dirty_regs = 0;
    }

    pub fn regs(&self) -> Result<kvm_regs, KvmError> {
        self.fd.get_regs()
    }
    pub fn set_regs(&self, r: &kvm_regs) -> Result<(), KvmError> {
        self.fd.set_regs(r)
    }
    pub fn sregs(&self) -> Result<kvm_sregs, KvmError> {
        self.fd.get_sregs()
    }
    pub fn set_sregs(&self, s: &kvm_sregs) -> Result<(), KvmError> {
        self.fd.set_sregs(s)
    }
    /// The x87/SSE state as the guest sees it (see [`fpu_state`]).
    pub fn fpu(&self) -> Result<kvm_fpu, KvmError> {
        fpu_state(&self.fd).ok_or_else(|| KvmError::new(libc::EIO))
    }
    /// Sets the x87/SSE state (see [`set_fpu_state`]).
    pub fn set_fpu(&self, f: &kvm_fpu) -> Result<(), KvmError> {
        if set_fpu_state(&self.fd, f) {
            Ok(())
        } else {
            Err(KvmError::new(libc::EIO))
        }
    }

    /// XCR0, or 1 (x87 only) when it cannot be read.
    pub fn xcr0(&self) -> u64 {
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

    /// The pending-event state (`KVM_GET_VCPU_EVENTS`).
    pub fn events(&self) -> Result<kvm_vcpu_events, KvmError> {
        self.fd.get_vcpu_events()
    }

    /// Changes the pending-event state (`KVM_GET/SET_VCPU_EVENTS`).
    pub fn edit_events(&self, f: &dyn Fn(&mut kvm_vcpu_events)) -> Result<(), KvmError> {
        let mut ev = self.fd.get_vcpu_events()?;
        f(&mut ev);
        self.fd.set_vcpu_events(&ev)
    }

    /// Loads DR0-DR3/DR7 with instruction breakpoints at `sites` (at most
    /// four; extra sites are ignored).
    pub fn set_hw_breakpoints(&self, sites: &[u64]) -> Result<(), KvmError> {
        self.set_hw_breakpoints_step(sites, false)
    }

    /// [`Self::set_hw_breakpoints`], with single-stepping on or off.
    pub fn set_hw_breakpoints_step(&self, sites: &[u64], step: bool) -> Result<(), KvmError> {
        let mut dbg = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE
                | KVM_GUESTDBG_USE_HW_BP
                | if step {
                    kvm_bindings::KVM_GUESTDBG_SINGLESTEP
                } else {
                    0
                },
            ..Default::default()
        };
        let mut dr7 = 0u64;
        for (i, site) in sites.iter().take(4).enumerate() {
            dbg.arch.debugreg[i] = *site;
            dr7 |= 1 << (2 * i); // local enable, execute, length 1
        }
        dbg.arch.debugreg[7] = dr7;
        self.fd.set_guest_debug(&dbg)
    }

    pub fn read_msr(&self, index: u32) -> Option<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()?;
        (self.fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
    }

    pub fn write_msr(&self, index: u32, data: u64) -> bool {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }]);
        matches!(msrs.map(|m| self.fd.set_msrs(&m)), Ok(Ok(1)))
    }

    /// Changes the legacy (4 KiB) XSAVE area: `f` edits its bytes, which
    /// are written back. False if either ioctl fails.
    pub fn edit_xsave(&self, f: &mut dyn FnMut(&mut [u8; 4096])) -> bool {
        let Ok(mut x) = self.fd.get_xsave() else {
            return false;
        };
        let mut bytes = [0u8; 4096];
        for (c, w) in bytes.chunks_exact_mut(4).zip(x.region.iter()) {
            c.copy_from_slice(&w.to_le_bytes());
        }
        f(&mut bytes);
        for (w, c) in x.region.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        // SAFETY: `x` is the full kvm_xsave this vCPU's KVM_GET_XSAVE just
        // filled (xenkvm enables no dynamically sized XSTATE features, so
        // 4096 bytes hold all of it); `f` changed bytes inside it only.
        unsafe { self.fd.set_xsave(&x) }.is_ok()
    }

    /// The whole XSAVE state (see [`xsave_bytes`]).
    pub fn xsave_bytes(&self) -> Option<Vec<u8>> {
        xsave_bytes(&self.fd)
    }
    /// Loads the whole XSAVE state (see [`set_xsave_bytes`]).
    pub fn set_xsave_bytes(&self, b: &[u8]) -> bool {
        set_xsave_bytes(&self.fd, b)
    }
    /// Flushes the guest's TLB (see [`flush_guest_tlb`]).
    pub fn flush_guest_tlb(&self) -> bool {
        flush_guest_tlb(&self.fd)
    }

    /// Makes the vCPU runnable (out of the wait for INIT/SIPI).
    pub fn set_runnable(&self) -> Result<(), KvmError> {
        self.fd.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        })
    }

    /// Puts an AP that never ran in the wait-for-SIPI state
    /// (`KVM_MP_STATE_INIT_RECEIVED`): after a restore, the guest may have
    /// sent its INIT before the save and sends only the SIPI after it, which
    /// KVM ignores in the initial state.
    pub fn set_wait_for_sipi(&self) -> Result<(), KvmError> {
        self.fd.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_INIT_RECEIVED,
        })
    }

    /// Sets the CPUID table the guest sees.
    pub fn set_cpuid(&self, cpuid: &[CpuidEntry]) -> Result<(), KvmError> {
        let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = cpuid
            .iter()
            .map(|e| kvm_bindings::kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let table =
            kvm_bindings::CpuId::from_entries(&entries).map_err(|_| KvmError::new(libc::E2BIG))?;
        self.fd.set_cpuid2(&table)
    }

    /// The TSC frequency KVM gives this vCPU, in kHz.
    pub fn tsc_khz(&self) -> Result<u32, KvmError> {
        self.fd.get_tsc_khz()
    }
}

/// Gets a vCPU out of `KVM_RUN` from another thread: sets `immediate_exit`
/// in the vCPU's `kvm_run` and then signals its thread. A kick that lands
/// before the thread enters `KVM_RUN` makes that entry return at once, so
/// no kick is ever lost and none has to be repeated.
pub struct Kicker {
    run: *mut kvm_run,
    size: usize,
    /// The vCPU thread's `pthread_t` (0 before it starts).
    thread: AtomicU64,
}

// SAFETY: `run` points to a shared mapping owned by this Kicker (unmapped
// only on drop); the only access is a single-byte volatile write, which is
// what KVM's own API expects from other threads.
unsafe impl Send for Kicker {}
// SAFETY: as above; `thread` is atomic.
unsafe impl Sync for Kicker {}

impl Kicker {
    /// Records the calling thread as the vCPU's (call on the vCPU thread).
    pub fn bind_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.thread.store(me as u64, Ordering::Release);
    }

    /// Forgets the thread (call on the vCPU thread before it ends).
    pub fn unbind(&self) {
        self.thread.store(0, Ordering::Release);
    }

    pub fn kick(&self) {
        // SAFETY: `run` is our own live mapping of kvm_run (see the type).
        unsafe { std::ptr::addr_of_mut!((*self.run).immediate_exit).write_volatile(1) };
        fence(Ordering::SeqCst);
        let t = self.thread.load(Ordering::Acquire);
        if t != 0 {
            // SAFETY: `t` is the pthread_t of a live vCPU thread: it unbinds
            // itself before it ends, and the handle joins it only after that.
            unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
        }
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping of `size` bytes, once.
        unsafe { libc::munmap(self.run.cast(), self.size) };
    }
}

/// A timer that sends the calling thread the kick signal: on its CPU time
/// ([`ThreadKick::cpu_time`], periodic) or on the monotonic clock
/// ([`ThreadKick::monotonic`], armed per use).
///
/// The CPU-time form finds a vCPU spinning inside `KVM_RUN` (a `vmcall` on
/// a KVM without Xen support never exits): a vCPU halted in the in-kernel
/// irqchip uses no CPU and is never woken by it, one that spins is
/// interrupted within `period` of CPU time.
pub struct ThreadKick(libc::timer_t);

/// The CPU-time kick of the vCPU threads.
pub type CpuTimeKick = ThreadKick;

impl ThreadKick {
    fn create(clock: libc::clockid_t) -> Result<Self, std::io::Error> {
        // SAFETY: an all-zero sigevent is a valid starting value; the fields
        // set below are the ones SIGEV_THREAD_ID reads.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        ev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: valid pointers to initialised values; the result is checked.
        if unsafe { libc::timer_create(clock, &mut ev, &mut timer) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ThreadKick(timer))
    }

    fn set(
        &self,
        value: std::time::Duration,
        interval: std::time::Duration,
    ) -> std::io::Result<()> {
        let ts = |d: std::time::Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: ts(interval),
            it_value: ts(value),
        };
        // SAFETY: `self.0` is a live timer (deleted only on drop); `spec` is
        // initialised.
        if unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Kicks the calling thread each time it has used `period` of CPU.
    pub fn start(period: std::time::Duration) -> Result<Self, std::io::Error> {
        Self::cpu_time(period)
    }

    /// See [`ThreadKick::start`].
    pub fn cpu_time(period: std::time::Duration) -> Result<Self, std::io::Error> {
        let t = Self::create(libc::CLOCK_THREAD_CPUTIME_ID)?;
        t.set(period, period)?;
        Ok(t)
    }

    /// A disarmed monotonic-clock kick of the calling thread.
    pub fn monotonic() -> Result<Self, std::io::Error> {
        Self::create(libc::CLOCK_MONOTONIC)
    }

    /// Kicks once after `after` (replacing an earlier arming).
    pub fn arm(&self, after: std::time::Duration) -> std::io::Result<()> {
        self.set(
            after.max(std::time::Duration::from_nanos(1)),
            std::time::Duration::ZERO,
        )
    }

    /// Cancels a pending kick.
    pub fn disarm(&self) -> std::io::Result<()> {
        self.set(std::time::Duration::ZERO, std::time::Duration::ZERO)
    }
}

impl Drop for ThreadKick {
    fn drop(&mut self) {
        // SAFETY: deleting the timer this value owns, once.
        unsafe { libc::timer_delete(self.0) };
    }
}

/// Byte offsets in the legacy (FXSAVE) region of KVM's XSAVE layout.
const XSAVE_FCW: usize = 0;
const XSAVE_MXCSR: usize = 24;
const XSAVE_ST0: usize = 32;
const XSAVE_XMM0: usize = 160;
/// XSTATE_BV in the XSAVE header.
const XSAVE_XSTATE_BV: usize = 512;

/// A vCPU's x87/SSE state as the guest sees it. Read through KVM_GET_XSAVE
/// when the host has it: a component in its initial state (XSTATE_BV bit
/// clear) reads as its initial values there, while KVM_GET_FPU would return
/// stale bytes.
pub fn fpu_state(fd: &VcpuFd) -> Option<kvm_fpu> {
    let Ok(x) = fd.get_xsave() else {
        return fd.get_fpu().ok();
    };
    let b: Vec<u8> = x.region.iter().flat_map(|w| w.to_le_bytes()).collect();
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let mut f = kvm_fpu {
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

/// Sets a vCPU's x87/SSE state. Through KVM_SET_XSAVE when the host has
/// it, marking x87 and SSE in use (XSTATE_BV bits 0 and 1): KVM_SET_FPU
/// writes the legacy area only, and a component whose XSTATE_BV bit is
/// clear is loaded as its initial state, losing what was written.
pub fn set_fpu_state(fd: &VcpuFd, f: &kvm_fpu) -> bool {
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

/// The vCPU's whole XSAVE state as KVM_GET_XSAVE returns it (the standard
/// format, 4096 bytes: xenkvm enables no dynamically sized state).
pub fn xsave_bytes(fd: &VcpuFd) -> Option<Vec<u8>> {
    let x = fd.get_xsave().ok()?;
    Some(x.region.iter().flat_map(|w| w.to_le_bytes()).collect())
}

/// Loads the vCPU's whole XSAVE state (KVM_SET_XSAVE) from `b` (at least
/// 4096 bytes, the standard format); false if KVM refused it.
pub fn set_xsave_bytes(fd: &VcpuFd, b: &[u8]) -> bool {
    let Ok(mut x) = fd.get_xsave() else {
        return false;
    };
    if b.len() < x.region.len() * 4 {
        return false;
    }
    for (w, c) in x.region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    // SAFETY: `x` is the kvm_xsave KVM_GET_XSAVE just returned for this
    // vCPU (4096 bytes; no dynamically enabled state such as AMX, which
    // xenkvm never enables), its region overwritten in place, so KVM reads
    // nothing past the struct.
    unsafe { fd.set_xsave(&x) }.is_ok()
}

/// Flushes the guest's whole TLB: KVM_SET_SREGS with CR4.PGE toggled and
/// then as it was. A changed CR0/CR3/CR4/EFER makes KVM reset the vCPU's
/// MMU context (on shadow paging: unload and resync the roots) and request
/// a guest TLB flush, as a guest toggling CR4.PGE does. False if an ioctl
/// failed (the second is retried once so the registers are not left
/// toggled).
pub fn flush_guest_tlb(fd: &VcpuFd) -> bool {
    let Ok(s) = fd.get_sregs() else {
        return false;
    };
    let mut toggled = s;
    toggled.cr4 ^= 1 << 7;
    if fd.set_sregs(&toggled).is_err() {
        return false;
    }
    fd.set_sregs(&s).is_ok() || fd.set_sregs(&s).is_ok()
}

/// IA32_XSS (0xda0) of the vCPU, 0 when it cannot be read.
pub fn xss(fd: &VcpuFd) -> u64 {
    let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
        index: 0xda0,
        ..Default::default()
    }]) else {
        return 0;
    };
    match fd.get_msrs(&mut msrs) {
        Ok(1) => msrs.as_slice()[0].data,
        _ => 0,
    }
}

/// The XSAVE component layout this host's KVM offers (KVM_GET_SUPPORTED_CPUID
/// leaf 0xD; xenkvm passes it through to guests), or the SDM's table.
pub fn xstate_layout() -> crate::arch::x86::xsave::XstateLayout {
    use crate::arch::x86::xsave::XstateLayout;
    static L: std::sync::OnceLock<XstateLayout> = std::sync::OnceLock::new();
    L.get_or_init(|| {
        let cpuid = kvm_ioctls::Kvm::new()
            .and_then(|k| k.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES));
        match cpuid {
            Ok(c) => XstateLayout::from_cpuid(|i| {
                c.as_slice()
                    .iter()
                    .find(|e| e.function == 0xd && e.index == i)
                    .map(|e| (e.eax, e.ebx, e.ecx))
            }),
            Err(_) => XstateLayout::sdm(),
        }
    })
    .clone()
}
