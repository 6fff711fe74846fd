//! The domain: all state the Xen personality owns for one guest, hypercall dispatch, and the
//! API the VMM's own code (vCPU loop, timers, dom0-side backends) calls.
//!
//! Handlers live in one module per hypercall (`version`, `console`, `memory`, `hvm`, `vcpu`,
//! `sched`, `evtchn`, `gnttab`) as `impl Domain` blocks; this module holds the state, its lock
//! order, and the dispatch table (Xen's `hvm64`/`hvm32` columns of `hypercall-defs.c`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::abi::{self, nr, shinfo};
use crate::errno::Errno;
use crate::evtchn::EvtchnTable;
use crate::gnttab::GrantTable;
use crate::guest::{Guest, VcpuAccess};
use crate::platform::{OverlayId, Platform};
use crate::shared::SharedPage;
use crate::time::{self, TimeInfo};
use crate::types::{Gfn, GuestWidth, Hypercall, HypercallNr, Outcome, VcpuId};
use crate::vcpu::VcpuTimers;
use crate::Error;

/// How the domain was configured by the VMM.
#[derive(Debug, Clone)]
pub struct DomainConfig {
    /// The domain id (1..0x7FF0; 0 is the VMM itself, playing dom0).
    pub domid: u16,
    /// Number of vCPUs (`max_vcpus`), at least 1.
    pub vcpus: u32,
    /// Grant table size limit in frames (Xen's default `gnttab_max_frames` is 64).
    pub max_grant_frames: u32,
    /// Highest event channel port the guest may allocate (`max_evtchn_port`); the ABI caps it
    /// further: 2-level at 4095 (64-bit) or 1023 (32-bit), FIFO at 2^17 - 1.
    pub max_evtchn_port: u32,
    /// The domain handle (UUID) returned by `XENVER_guest_handle`.
    pub handle: [u8; 16],
    /// `XENMEM_maximum_reservation` in pages; `None` means the RAM in the memory map.
    pub max_pages: Option<u64>,
}

impl Default for DomainConfig {
    fn default() -> Self {
        DomainConfig {
            domid: 1,
            vcpus: 1,
            max_grant_frames: 64,
            max_evtchn_port: 4095,
            handle: [0; 16],
            max_pages: None,
        }
    }
}

/// `HVM_PARAM_CALLBACK_IRQ` decoded (type in bits 63:56).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackVia {
    /// No callback configured (value 0).
    None,
    /// Type 0: an ISA/GSI interrupt line.
    Gsi(u32),
    /// Type 1: a PCI INTx line (`domain` 63:56 unused, bus 31:16, device 15:11, pin 1:0).
    PciIntx { bus: u8, device: u8, pin: u8 },
    /// Type 2: the global callback vector.
    Vector(u8),
    /// Any other type: Xen ignores it.
    Unknown(u64),
}

impl CallbackVia {
    pub(crate) fn decode(v: u64) -> Self {
        match v >> 56 {
            _ if v == 0 => CallbackVia::None,
            0 => CallbackVia::Gsi(v as u32),
            1 => CallbackVia::PciIntx {
                bus: ((v >> 16) & 0xff) as u8,
                device: ((v >> 11) & 0x1f) as u8,
                pin: (v & 3) as u8,
            },
            2 => CallbackVia::Vector(v as u8),
            _ => CallbackVia::Unknown(v),
        }
    }
}

/// A `vcpu_info` placed by `VCPUOP_register_vcpu_info`.
#[derive(Clone)]
pub(crate) struct VcpuInfoMap {
    pub page: Arc<dyn SharedPage>,
    pub off: usize,
    /// Guest-physical address of the area (for save).
    pub gpa: u64,
}

/// Per-vCPU flags read lock-free on the delivery paths.
pub(crate) struct VcpuFlags {
    /// `!(pause_flags & VPF_down)`.
    pub up: AtomicBool,
    /// `is_initialised`: vCPU 0 at creation, the others at INIT/SIPI (`vcpu_started`).
    pub initialised: AtomicBool,
    /// `HVMOP_set_evtchn_upcall_vector` (0: none).
    pub upcall_vector: AtomicU8,
    /// Interrupts were enabled at the vCPU's last `SCHEDOP_block`/`poll`
    /// (it cannot change while the vCPU waits).
    pub block_irqs: AtomicBool,
}

/// What a handler running for one vCPU sees.
pub(crate) struct Ctx<'a> {
    pub g: Guest<'a>,
    pub vcpu: VcpuId,
}

/// All domain state, shared by the vCPU threads and the VMM's event thread.
///
/// Lock order (outer first; a thread holding one may take only those after it):
/// `gnttab`, then `physmap`, then `balloon`, then `evtchn`, then `vcpu_info` (read on
/// delivery), then `timers`.
/// `timers` is never held while sending an event. `watchdogs` is a leaf. `vcpu_ctl` (Xen's
/// `domain_lock` around `VCPUOP_initialise`/`VCPUOP_up`) is taken alone, with no other domain
/// lock held or taken under it; `cr_policy` is a leaf. Platform methods other than
/// `console_*`/`notify_backend` may be called under these locks (see [`Platform`]).
pub struct Domain {
    pub(crate) cfg: DomainConfig,
    pub(crate) platform: Arc<dyn Platform>,
    pub(crate) shared_info: Arc<dyn SharedPage>,
    /// 0: 64-bit layouts, 1: 32-bit (`has_32bit_shinfo`).
    width: AtomicU8,
    width_latched: AtomicBool,
    /// Mask every 2-level event channel when the guest next places shared_info
    /// ([`Domain::mask_events_at_resume`]).
    pub(crate) resume_masked: AtomicBool,
    pub(crate) gnttab: Mutex<GrantTable>,
    /// Where each overlay currently sits in the guest-physical space.
    pub(crate) physmap: Mutex<BTreeMap<OverlayId, Gfn>>,
    /// RAM the guest gave back (balloon), see `memory`.
    pub(crate) balloon: Mutex<crate::memory::Balloon>,
    pub(crate) evtchn: Mutex<EvtchnTable>,
    pub(crate) vcpu_info: RwLock<Vec<Option<VcpuInfoMap>>>,
    /// `VCPUOP_register_vcpu_time_memory_area`: a second copy of each vCPU's
    /// `vcpu_time_info`, written at every time update (same lock level as
    /// `vcpu_info`).
    pub(crate) time_areas: RwLock<Vec<Option<VcpuInfoMap>>>,
    pub(crate) timers: Mutex<Vec<VcpuTimers>>,
    /// `SCHEDOP_watchdog` timers: the deadline of each one in use (`watchdog_inuse_map`).
    pub(crate) watchdogs: Mutex<[Option<u64>; crate::sched::NR_WATCHDOGS]>,
    pub(crate) vcpus: Vec<VcpuFlags>,
    /// Serialises `VCPUOP_initialise` and `VCPUOP_up` (the `is_initialised` check and what
    /// follows it), as Xen's `domain_lock` does.
    pub(crate) vcpu_ctl: Mutex<()>,
    /// The CR4/EFER bits `VCPUOP_initialise` accepts (from the guest's CPUID).
    pub(crate) cr_policy: Mutex<crate::vcpu_init::CrPolicy>,
    pub(crate) params: Vec<AtomicU64>,
    pub(crate) vm_assist: AtomicU64,
    /// `shutdown_code`: `u32::MAX` while unset (`SHUTDOWN_CODE_INVALID`).
    pub(crate) shutdown_code: AtomicU32,
    /// Hypercall numbers below 64 already reported as unknown; bit 63 also covers larger ones.
    unknown_logged: AtomicU64,
}

impl Domain {
    /// A domain with its shared_info page and initial grant frame allocated from `platform`.
    pub fn new(cfg: DomainConfig, platform: Arc<dyn Platform>) -> Result<Self, Error> {
        if cfg.domid == 0 || cfg.domid >= abi::domid::FIRST_RESERVED {
            return Err(Error::InvalidConfig(
                "domid must be in 1..0x7FF0 (0 is the VMM's dom0)",
            ));
        }
        if cfg.vcpus == 0 || cfg.vcpus > 4096 {
            return Err(Error::InvalidConfig("vcpus must be in 1..=4096"));
        }
        if cfg.max_grant_frames < abi::gnttabop::INITIAL_FRAMES || cfg.max_grant_frames > 4096 {
            return Err(Error::InvalidConfig("max_grant_frames must be in 1..=4096"));
        }
        let shared_info = platform.new_shared_page().map_err(Error::PageAllocation)?;
        let gnttab = GrantTable::new(&*platform, cfg.max_grant_frames)?;
        let n = cfg.vcpus as usize;
        let vcpus = (0..n)
            .map(|i| VcpuFlags {
                up: AtomicBool::new(i == 0),
                initialised: AtomicBool::new(i == 0),
                upcall_vector: AtomicU8::new(0),
                block_irqs: AtomicBool::new(true),
            })
            .collect();
        let d = Domain {
            evtchn: Mutex::new(EvtchnTable::new(
                cfg.vcpus,
                cfg.max_evtchn_port.min(crate::evtchn_fifo::NR_CHANNELS - 1),
            )),
            cfg,
            platform,
            shared_info,
            width: AtomicU8::new(0),
            width_latched: AtomicBool::new(false),
            resume_masked: AtomicBool::new(false),
            gnttab: Mutex::new(gnttab),
            physmap: Mutex::new(BTreeMap::new()),
            balloon: Mutex::new(crate::memory::Balloon::default()),
            vcpu_info: RwLock::new(vec![None; n]),
            time_areas: RwLock::new(vec![None; n]),
            timers: Mutex::new(vec![VcpuTimers::default(); n]),
            watchdogs: Mutex::new([None; crate::sched::NR_WATCHDOGS]),
            vcpus,
            vcpu_ctl: Mutex::new(()),
            cr_policy: Mutex::new(crate::vcpu_init::CrPolicy::default()),
            params: (0..abi::param::NR_PARAMS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            vm_assist: AtomicU64::new(0),
            shutdown_code: AtomicU32::new(u32::MAX),
            unknown_logged: AtomicU64::new(0),
        };
        d.update_wallclock();
        Ok(d)
    }

    /// The configuration the domain was created with.
    pub fn config(&self) -> &DomainConfig {
        &self.cfg
    }

    /// Handle one hypercall from `vcpu`.
    pub fn dispatch(&self, vcpu: &dyn VcpuAccess, call: &Hypercall) -> Outcome {
        // hvm_hypercall(): any CPL other than 0 gets -EPERM, whatever the number.
        if vcpu.cpl() != 0 {
            return Outcome::Return(Errno::EPERM.ret());
        }
        let Some(vid) = VcpuId::new(vcpu.vcpu_id(), self.cfg.vcpus) else {
            tracing::error!(
                vcpu = vcpu.vcpu_id(),
                "hypercall from a vCPU the domain does not have"
            );
            return Outcome::Return(Errno::EINVAL.ret());
        };
        let w = vcpu.width();
        if !self.width_latched.load(Ordering::Acquire) {
            // Guests that never write the hypercall MSR (Linux since 2024) latch the shared
            // structure layout at their first hypercall.
            self.latch_width(w);
        }
        let call = call.for_width(w);
        let _span = tracing::trace_span!("hypercall", vcpu = vid.get(), nr = call.nr).entered();
        let ctx = Ctx {
            g: Guest::new(vcpu, w),
            vcpu: vid,
        };
        let Some(nr) = HypercallNr::new(call.nr) else {
            self.log_unknown(vid, call.nr);
            return Outcome::Return(Errno::ENOSYS.ret());
        };
        let a = call.args;
        let r: Result<Outcome, Errno> = match nr.get() {
            nr::XEN_VERSION => self
                .xen_version(&ctx, a[0] as i32, a[1])
                .map(Outcome::Return),
            nr::CONSOLE_IO => self
                .console_io(&ctx, a[0] as u32, a[1] as u32, a[2])
                .map(Outcome::Return),
            nr::MEMORY_OP => self.memory_op(&ctx, a[0], a[1]).map(Outcome::Return),
            nr::HVM_OP => self.hvm_op(&ctx, a[0], a[1]).map(Outcome::Return),
            nr::VCPU_OP => self.vcpu_op(&ctx, a[0] as i32, a[1] as u32, a[2]),
            nr::SCHED_OP => self.sched_op(&ctx, a[0] as i32, a[1]),
            nr::EVENT_CHANNEL_OP => self
                .event_channel_op(&ctx, a[0] as i32, a[1])
                .map(Outcome::Return),
            nr::GRANT_TABLE_OP => self
                .grant_table_op(&ctx, a[0] as u32, a[1], a[2] as u32)
                .map(Outcome::Return),
            nr::VM_ASSIST => self
                .do_vm_assist(a[0] as u32, a[1] as u32)
                .map(Outcome::Return),
            nr::SET_TIMER_OP => {
                let timeout = match w {
                    GuestWidth::Bits64 => a[0] as i64,
                    // compat_set_timer_op(u32 lo, u32 hi)
                    GuestWidth::Bits32 => ((a[1] << 32) | (a[0] & 0xffff_ffff)) as i64,
                };
                Ok(Outcome::Return(self.set_timer_op(vid, timeout)))
            }
            // Privileged interfaces a domU reaches only to be refused (is_hardware_domain /
            // XSM_PRIV checks at their top).
            nr::PLATFORM_OP | nr::SYSCTL | nr::DOMCTL | nr::HYPFS_OP => Err(Errno::EPERM),
            // The vPMU is off (Xen's default `vpmu=0`).
            nr::XENPMU_OP => Err(Errno::EOPNOTSUPP),
            // multicall, mmuext_op, xsm_op (dummy XSM), physdev_op (no PIRQs), dm_op: not
            // provided. TODO(issue 5): multicall.
            other => {
                self.log_unknown(vid, other);
                Err(Errno::ENOSYS)
            }
        };
        r.unwrap_or_else(|e| Outcome::Return(e.ret()))
    }

    fn log_unknown(&self, vcpu: VcpuId, nr: u64) {
        let bit = 1u64 << nr.min(63);
        if self.unknown_logged.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            tracing::warn!(
                vcpu = vcpu.get(),
                nr,
                "unimplemented hypercall: -ENOSYS (logged once)"
            );
        }
    }

    // ---- guest width -------------------------------------------------------------------

    /// The layout of shared structures (`has_32bit_shinfo`).
    pub fn width(&self) -> GuestWidth {
        if self.width.load(Ordering::Acquire) == 1 {
            GuestWidth::Bits32
        } else {
            GuestWidth::Bits64
        }
    }

    /// Latch the shared-structure layout from the caller's mode (Xen's
    /// `hvm_latch_shinfo_size`): the VMM calls this at the hypercall-page MSR write; the domain
    /// also latches at `HVM_PARAM_CALLBACK_IRQ` and, if nothing latched before, at the first
    /// hypercall. The wallclock is rewritten in the new layout.
    pub fn latch_width(&self, w: GuestWidth) {
        self.width_latched.store(true, Ordering::Release);
        let v = u8::from(w == GuestWidth::Bits32);
        let _ = self.width.swap(v, Ordering::AcqRel);
        self.update_wallclock();
    }

    /// For a domain a guest resumes in after its own suspend (a restore
    /// or migration without the VMM's Xen-state record): when the guest
    /// places shared_info, every 2-level event channel in it starts
    /// masked. The resuming guest rebinds its ports and unmasks those it
    /// enables (Linux through its IRQs' forced resume); a port it keeps
    /// disabled stays masked, as Linux's spinlock kick must (it is only
    /// polled: delivered as an event it ends in `BUG()`, which a Debian
    /// 6.1 guest hit on a page with no mask bits set).
    pub fn mask_events_at_resume(&self) {
        self.resume_masked.store(true, Ordering::Release);
    }

    /// Whether the layout was latched (by the VMM or the guest).
    pub(crate) fn width_latched(&self) -> bool {
        self.width_latched.load(Ordering::Acquire)
    }

    /// Ports the 2-level ABI addresses for the current layout (`max_evtchns`).
    pub(crate) fn max_evtchns(&self) -> u32 {
        match self.width() {
            GuestWidth::Bits64 => 4096,
            GuestWidth::Bits32 => 1024,
        }
    }

    // ---- domain lookup -----------------------------------------------------------------

    /// `rcu_lock_domain_by_any_id` followed by an `XSM_TARGET` check, for a domU caller:
    /// itself is allowed, dom0 exists but is not the caller's to touch (`-EPERM`), any other id
    /// does not exist (`-ESRCH`).
    pub(crate) fn target_self(&self, domid: u16) -> Result<(), Errno> {
        match self.lookup(domid) {
            Lookup::SelfDom => Ok(()),
            Lookup::Dom0 => Err(Errno::EPERM),
            Lookup::None => Err(Errno::ESRCH),
        }
    }

    pub(crate) fn lookup(&self, domid: u16) -> Lookup {
        if domid == abi::domid::SELF || domid == self.cfg.domid {
            Lookup::SelfDom
        } else if domid == 0 {
            Lookup::Dom0
        } else {
            Lookup::None
        }
    }

    // ---- vcpu_info and time --------------------------------------------------------------

    /// Where `vcpu`'s `vcpu_info` is: a registered area, or its default slot in shared_info
    /// for vCPUs below 32; `None` for others (Xen's `dummy_vcpu_info`).
    pub(crate) fn vcpu_info_loc(&self, vcpu: VcpuId) -> Option<(Arc<dyn SharedPage>, usize)> {
        if let Some(m) = self
            .vcpu_info
            .read()
            .get(vcpu.idx())
            .and_then(|m| m.clone())
        {
            return Some((m.page, m.off));
        }
        (vcpu.get() < abi::LEGACY_MAX_VCPUS)
            .then(|| (self.shared_info.clone(), vcpu.idx() * shinfo::VCPU_INFO_LEN))
    }

    /// Publish `vcpu`'s `vcpu_time_info` from the platform's current guest time. The VMM calls
    /// this at start, after the vCPU migrates between host CPUs if the TSC is not stable, and
    /// periodically; the domain calls it when the `vcpu_info` moves.
    pub fn update_vcpu_time(&self, vcpu: VcpuId) {
        let Some((page, off)) = self.vcpu_info_loc(vcpu) else {
            return;
        };
        let now = self.platform.guest_time();
        let info = TimeInfo {
            tsc_timestamp: now.tsc,
            system_time: now.system_time_ns,
            scale: time::time_scale(self.platform.tsc_khz()),
            flags: time::pvclock_flags(self.platform.tsc_stable()),
        };
        time::write_time_info(&*page, off + shinfo::VI_TIME, &info);
        if let Some(Some(m)) = self.time_areas.read().get(vcpu.idx()) {
            time::write_time_info(&*m.page, m.off, &info);
        }
    }

    /// Rewrite the wallclock (wall time at system time 0) in shared_info.
    pub fn update_wallclock(&self) {
        let now = self.platform.guest_time();
        let boot = self
            .platform
            .wallclock_ns()
            .saturating_sub(now.system_time_ns);
        time::write_wallclock(&*self.shared_info, self.width(), boot);
    }

    /// Xen system time now (`NOW()`).
    pub(crate) fn now_ns(&self) -> u64 {
        self.platform.guest_time().system_time_ns
    }

    // ---- VMM-side API ------------------------------------------------------------------

    /// The shared_info page (the VMM maps it when the guest places it).
    pub fn shared_info(&self) -> &Arc<dyn SharedPage> {
        &self.shared_info
    }

    /// The GFN where `id` currently sits, if placed.
    pub fn overlay_gfn(&self, id: OverlayId) -> Option<Gfn> {
        self.physmap.lock().get(&id).copied()
    }

    /// Set an HVM parameter on the VMM's authority (store/console PFN and event channel),
    /// bypassing the guest's access rules.
    pub fn set_param_internal(&self, idx: u32, val: u64) -> Result<(), Error> {
        let p = self.params.get(idx as usize).ok_or(Error::BadParam(idx))?;
        p.store(val, Ordering::Release);
        Ok(())
    }

    /// Read an HVM parameter.
    pub fn param(&self, idx: u32) -> Option<u64> {
        self.params
            .get(idx as usize)
            .map(|p| p.load(Ordering::Acquire))
    }

    /// `HVM_PARAM_CALLBACK_IRQ`, decoded.
    pub fn callback_via(&self) -> CallbackVia {
        CallbackVia::decode(self.params[abi::param::CALLBACK_IRQ as usize].load(Ordering::Acquire))
    }

    /// The per-vCPU upcall vector (`HVMOP_set_evtchn_upcall_vector`), if set.
    pub fn upcall_vector(&self, vcpu: VcpuId) -> Option<u8> {
        let v = self
            .vcpus
            .get(vcpu.idx())?
            .upcall_vector
            .load(Ordering::Acquire);
        (v != 0).then_some(v)
    }

    /// Xen's `hvm_local_events_need_delivery` for the event-channel upcall:
    /// `evtchn_upcall_pending` is set AND the vCPU can take the upcall now:
    /// a route is configured (its per-vCPU vector, the callback vector, or,
    /// for vCPU 0 only, the callback GSI/INTx line: `hvm_assert_evtchn_irq`)
    /// and `irqs_enabled` (RFLAGS.IF at the hypercall). `evtchn_upcall_pending`
    /// alone (no callback, or interrupts off) is not an event to wake for.
    pub fn events_need_delivery(&self, vcpu: VcpuId, irqs_enabled: bool) -> bool {
        let routed = self.upcall_vector(vcpu).is_some()
            || match self.callback_via() {
                CallbackVia::Vector(v) => v != 0,
                CallbackVia::Gsi(_) | CallbackVia::PciIntx { .. } => vcpu.get() == 0,
                CallbackVia::None | CallbackVia::Unknown(_) => false,
            };
        routed && irqs_enabled && self.upcall_pending(vcpu)
    }

    /// Records whether the vCPU entering `SCHEDOP_block`/`poll` has interrupts enabled.
    pub(crate) fn set_block_irqs(&self, vcpu: VcpuId, on: bool) {
        if let Some(f) = self.vcpus.get(vcpu.idx()) {
            f.block_irqs.store(on, Ordering::Release);
        }
    }

    /// For a vCPU blocked in [`Outcome::Block`](crate::Outcome::Block): whether it must run
    /// again (an upcall it can take is pending; see [`Domain::events_need_delivery`]).
    pub fn block_should_wake(&self, vcpu: VcpuId) -> bool {
        let irqs = self
            .vcpus
            .get(vcpu.idx())
            .is_none_or(|f| f.block_irqs.load(Ordering::Acquire));
        self.events_need_delivery(vcpu, irqs)
    }

    /// `evtchn_upcall_pending` of `vcpu` (the guest clears it).
    pub fn upcall_pending(&self, vcpu: VcpuId) -> bool {
        match self.vcpu_info_loc(vcpu) {
            Some((page, off)) => page.load_u64(off, Ordering::Acquire) & 0xff != 0,
            None => false,
        }
    }

    /// The vCPU came up through INIT/SIPI (Xen's `hvm_vcpu_reset_state`): initialised, not down.
    pub fn vcpu_started(&self, vcpu: VcpuId) {
        if let Some(f) = self.vcpus.get(vcpu.idx()) {
            f.initialised.store(true, Ordering::Release);
            f.up.store(true, Ordering::Release);
        }
    }

    /// Set the CR4 and EFER bits `VCPUOP_initialise` accepts, from the guest's CPUID (Xen's
    /// `hvm_cr4_guest_valid_bits` and `hvm_efer_valid`). The default is a baseline x86-64 CPU.
    pub fn set_cr_policy(&self, policy: crate::vcpu_init::CrPolicy) {
        *self.cr_policy.lock() = policy;
    }

    /// Whether `vcpu` is up (`VCPUOP_is_up`).
    pub fn vcpu_is_up(&self, vcpu: VcpuId) -> bool {
        self.vcpus
            .get(vcpu.idx())
            .is_some_and(|f| f.up.load(Ordering::Acquire))
    }

    /// The code recorded by `SCHEDOP_shutdown_code` or the first shutdown, if any.
    pub fn shutdown_code(&self) -> Option<u8> {
        let c = self.shutdown_code.load(Ordering::Acquire);
        (c != u32::MAX).then_some(c as u8)
    }

    /// `domain_resume`: the domain runs on after a shutdown that was
    /// cancelled (a checkpoint's `SHUTDOWN_suspend`): the recorded code is
    /// forgotten, so a later shutdown reports its own reason.
    pub fn clear_shutdown(&self) {
        self.shutdown_code.store(u32::MAX, Ordering::Release);
    }

    /// Whether `VMASST_TYPE_runstate_update_flag` is enabled.
    pub fn runstate_update_flag(&self) -> bool {
        self.vm_assist.load(Ordering::Acquire) & (1 << abi::vmasst::TYPE_RUNSTATE_UPDATE_FLAG) != 0
    }

    /// A vCPU id of this domain, validated.
    pub fn vcpu(&self, raw: u32) -> Option<VcpuId> {
        VcpuId::new(raw, self.cfg.vcpus)
    }

    // ---- vm_assist -----------------------------------------------------------------------

    /// `do_vm_assist`: only the HVM-valid types; unknown commands -ENOSYS.
    fn do_vm_assist(&self, cmd: u32, ty: u32) -> Result<i64, Errno> {
        if ty >= 64 || abi::vmasst::HVM_VALID_MASK & (1 << ty) == 0 {
            return Err(Errno::EINVAL);
        }
        match cmd {
            abi::vmasst::CMD_ENABLE => {
                self.vm_assist.fetch_or(1 << ty, Ordering::AcqRel);
                Ok(0)
            }
            abi::vmasst::CMD_DISABLE => {
                self.vm_assist.fetch_and(!(1 << ty), Ordering::AcqRel);
                Ok(0)
            }
            _ => Err(Errno::ENOSYS),
        }
    }
}

/// Result of looking a domid up from a domU's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    SelfDom,
    Dom0,
    None,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Domain>();
    }

    #[test]
    fn callback_via_decodes_types() {
        assert_eq!(CallbackVia::decode(0), CallbackVia::None);
        assert_eq!(CallbackVia::decode(1), CallbackVia::Gsi(1));
        assert_eq!(
            CallbackVia::decode((2 << 56) | 0xf3),
            CallbackVia::Vector(0xf3)
        );
        assert_eq!(
            CallbackVia::decode((1 << 56) | (3 << 16) | (4 << 11) | 1),
            CallbackVia::PciIntx {
                bus: 3,
                device: 4,
                pin: 1
            }
        );
        assert_eq!(CallbackVia::decode(7 << 56), CallbackVia::Unknown(7 << 56));
    }

    #[test]
    fn new_rejects_bad_config() {
        let p: Arc<dyn Platform> = Arc::new(crate::testing::FakePlatform::default());
        for cfg in [
            DomainConfig {
                domid: 0,
                ..DomainConfig::default()
            },
            DomainConfig {
                domid: 0x7ff0,
                ..DomainConfig::default()
            },
            DomainConfig {
                vcpus: 0,
                ..DomainConfig::default()
            },
            DomainConfig {
                max_grant_frames: 0,
                ..DomainConfig::default()
            },
        ] {
            assert!(matches!(
                Domain::new(cfg, p.clone()),
                Err(Error::InvalidConfig(_))
            ));
        }
    }

    #[test]
    fn new_page_allocation_failure_reported() {
        let fp = crate::testing::FakePlatform::default();
        *fp.page_budget.lock() = 1;
        let p: Arc<dyn Platform> = Arc::new(fp);
        assert!(matches!(
            Domain::new(DomainConfig::default(), p),
            Err(Error::PageAllocation(_))
        ));
    }
}
