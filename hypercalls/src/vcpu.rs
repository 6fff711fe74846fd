//! `vcpu_op`, the per-vCPU Xen timers (`set_singleshot_timer`, `set_periodic_timer`,
//! `set_timer_op`), and `VCPUOP_register_vcpu_info`.
//!
//! Timers: the domain keeps each vCPU's single-shot deadline and periodic timer and asks the
//! VMM to arm one host timer per vCPU at the earliest deadline
//! ([`Platform::set_timer`](crate::Platform::set_timer)); when it fires the VMM calls
//! [`Domain::timer_expired`], which raises `VIRQ_TIMER` on that vCPU with Xen's rules.
//!
//! `VCPUOP_initialise` takes an HVM context (`vcpu_init`); the VMM loads it at `VCPUOP_up`.
//! `VCPUOP_down` takes a vCPU offline until `VCPUOP_up` (the VMM parks its thread); the last
//! vCPU going down powers the domain off. The runstate area is published by the VMM (see
//! [`crate::Platform::set_runstate_area`]).

use std::sync::atomic::Ordering;

use crate::abi::{self, get_u32, get_u64, shinfo, vcpuop, virq};
use crate::domain::{Ctx, Domain, VcpuInfoMap};
use crate::errno::Errno;
use crate::platform::RunstateAreaSpec;
use crate::types::{Gfn, GuestWidth, Outcome, VcpuId};
use crate::vcpu_init;

/// `MILLISECS(1)`: the shortest periodic timer Xen accepts.
const MIN_PERIOD_NS: u64 = 1_000_000;
/// `STIME_DELTA_MAX`.
const MAX_PERIOD_NS: u64 = i64::MAX as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Periodic {
    pub period: u64,
    pub last: u64,
}

/// One vCPU's Xen timers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct VcpuTimers {
    pub singleshot: Option<u64>,
    pub periodic: Option<Periodic>,
}

impl VcpuTimers {
    pub(crate) fn earliest(&self) -> Option<u64> {
        let p = self.periodic.map(|p| p.last.saturating_add(p.period));
        match (self.singleshot, p) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Domain {
    /// `do_vcpu_op` + `common_vcpu_op`.
    pub(crate) fn vcpu_op(
        &self,
        ctx: &Ctx,
        cmd: i32,
        vcpuid: u32,
        arg: u64,
    ) -> Result<Outcome, Errno> {
        let v = self.vcpu(vcpuid).ok_or(Errno::ENOENT)?;
        let ret = |r: i64| Ok(Outcome::Return(r));
        match cmd {
            vcpuop::SEND_NMI => {
                if arg != 0 {
                    return Err(Errno::EINVAL);
                }
                self.platform.send_nmi(v);
                ret(0)
            }
            // Only a hardware domain's pinned vCPUs have a physical id.
            vcpuop::GET_PHYSID => Err(Errno::EINVAL),
            // arch_initialise_vcpu for HVM: a vCPU with a vcpu_info (the dummy one: -EINVAL),
            // the whole context copied (-EFAULT), not yet initialised (-EEXIST), then the
            // checks of arch_set_info_hvm_guest (-EINVAL, see `vcpu_init`). It stays down
            // until VCPUOP_up.
            vcpuop::INITIALISE => {
                if self.vcpu_info_loc(v).is_none() {
                    return Err(Errno::EINVAL);
                }
                let mut b = [0u8; vcpu_init::CONTEXT_LEN];
                ctx.g.read(arg, &mut b)?;
                let _l = self.vcpu_ctl.lock();
                let f = &self.vcpus[v.idx()];
                if f.initialised.load(Ordering::Acquire) {
                    return Err(Errno::EEXIST);
                }
                let policy = *self.cr_policy.lock();
                let state = vcpu_init::decode(&b, &policy)?;
                self.platform.vcpu_initialise(v, &state)?;
                f.initialised.store(true, Ordering::Release);
                ret(0)
            }
            vcpuop::UP => {
                let _l = self.vcpu_ctl.lock();
                let f = &self.vcpus[v.idx()];
                if !f.initialised.load(Ordering::Acquire) {
                    return Err(Errno::EINVAL);
                }
                if !f.up.swap(true, Ordering::AcqRel) {
                    self.platform.vcpu_up(v);
                }
                ret(0)
            }
            vcpuop::DOWN => {
                let others_up = self
                    .vcpus
                    .iter()
                    .enumerate()
                    .any(|(i, f)| i != v.idx() && f.up.load(Ordering::Acquire));
                if !others_up {
                    // Last vCPU going down: the domain powers off.
                    return Ok(self.shutdown(abi::shutdown::POWEROFF));
                }
                if self.vcpus[v.idx()].up.swap(false, Ordering::AcqRel) {
                    self.platform.vcpu_down(v);
                }
                ret(0)
            }
            vcpuop::IS_UP => ret(i64::from(self.vcpu_is_up(v))),
            vcpuop::GET_RUNSTATE_INFO
            | vcpuop::REGISTER_RUNSTATE_MEMORY_AREA
            | vcpuop::REGISTER_RUNSTATE_PHYS_AREA => self.runstate_op(ctx, cmd, v, arg),
            vcpuop::SET_PERIODIC_TIMER => {
                let b: [u8; 8] = ctx.g.read_arr(arg)?;
                let period = get_u64(&b, 0);
                if !(MIN_PERIOD_NS..=MAX_PERIOD_NS).contains(&period) {
                    return Err(Errno::EINVAL);
                }
                self.set_periodic(v, Some(period));
                ret(0)
            }
            vcpuop::STOP_PERIODIC_TIMER => {
                self.set_periodic(v, None);
                ret(0)
            }
            vcpuop::SET_SINGLESHOT_TIMER => {
                if v != ctx.vcpu {
                    return Err(Errno::EINVAL);
                }
                // {uint64_t timeout_abs_ns; uint32_t flags;}: 16 bytes, 12 for compat. Xen
                // 4.17 ignores the flags (no -ETIME for VCPU_SSHOTTMR_future).
                let mut b = [0u8; 16];
                let len = if ctx.g.is_compat() { 12 } else { 16 };
                ctx.g.read(arg, &mut b[..len])?;
                let timeout = get_u64(&b, 0);
                if timeout < self.now_ns() {
                    // "Simplify the logic if the timeout has already expired and just inject
                    // the event."
                    self.set_singleshot(v, None);
                    self.send_virq(v, virq::TIMER);
                } else {
                    self.set_singleshot(v, Some(timeout));
                }
                ret(0)
            }
            vcpuop::STOP_SINGLESHOT_TIMER => {
                if v != ctx.vcpu {
                    return Err(Errno::EINVAL);
                }
                self.set_singleshot(v, None);
                ret(0)
            }
            vcpuop::REGISTER_VCPU_INFO => {
                let b: [u8; 16] = ctx.g.read_arr(arg)?;
                self.map_vcpu_info(ctx, v, get_u64(&b, 0), get_u32(&b, 8))?;
                ret(0)
            }
            // A guest-virtual copy of vcpu_time_info written at every update, translated
            // once at registration. Unlike Xen, the 32-byte area must be 8-aligned (so it
            // never straddles a page): -EINVAL otherwise. Address 0 unregisters.
            vcpuop::REGISTER_VCPU_TIME_MEMORY_AREA => {
                let b: [u8; 8] = ctx.g.read_arr(arg)?;
                let mut gva = get_u64(&b, 0);
                if ctx.g.is_compat() {
                    gva &= 0xffff_ffff;
                }
                if gva == 0 {
                    self.time_areas.write()[v.idx()] = None;
                    return ret(0);
                }
                if gva % 8 != 0 {
                    return Err(Errno::EINVAL);
                }
                let pieces = ctx.g.phys_pieces(gva, 32)?;
                let gpa = pieces.first().map(|p| p.0).ok_or(Errno::EFAULT)?;
                let gfn = Gfn::new(gpa >> 12).ok_or(Errno::EINVAL)?;
                let page = self.platform.map_guest_page(gfn)?;
                self.time_areas.write()[v.idx()] = Some(VcpuInfoMap {
                    page,
                    off: (gpa & 0xfff) as usize,
                    gpa,
                });
                self.update_vcpu_time(v);
                ret(0)
            }
            _ => Err(Errno::ENOSYS),
        }
    }

    /// The runstate operations. The area is translated once, at registration (as KVM does),
    /// into guest-physical pieces; the VMM keeps it exact from then on (the `runstate` crate,
    /// through one gpc cache even when it straddles a page).
    /// - `register_runstate_memory_area` `{addr}` (a guest-virtual address; 32-bit handle for
    ///   compat guests): 0 unregisters; an unmapped area is `-EFAULT`.
    /// - `register_runstate_phys_area` `{addr}` (Xen 4.18, a guest-physical address): as Xen,
    ///   the area must not cross a page (`-ENXIO`) and must be RAM (`-EINVAL`).
    /// - `get_runstate_info`: the current `vcpu_runstate_info` copied to the guest.
    fn runstate_op(&self, ctx: &Ctx, cmd: i32, v: VcpuId, arg: u64) -> Result<Outcome, Errno> {
        let width = self.width();
        let size: usize = if width == GuestWidth::Bits32 { 44 } else { 48 };
        match cmd {
            vcpuop::GET_RUNSTATE_INFO => {
                let r = self.platform.runstate(v);
                let mut b = [0u8; 48];
                b[0..4].copy_from_slice(&r.state.to_le_bytes());
                let (entry, time) = if size == 44 { (4, 12) } else { (8, 16) };
                b[entry..entry + 8].copy_from_slice(&r.state_entry_time.to_le_bytes());
                for (i, t) in r.time.iter().enumerate() {
                    b[time + 8 * i..time + 8 * i + 8].copy_from_slice(&t.to_le_bytes());
                }
                ctx.g.write(arg, &b[..size])?;
                Ok(Outcome::Return(0))
            }
            vcpuop::REGISTER_RUNSTATE_MEMORY_AREA => {
                let b: [u8; 8] = ctx.g.read_arr(arg)?;
                let mut addr = get_u64(&b, 0);
                if ctx.g.is_compat() {
                    addr &= 0xffff_ffff;
                }
                if addr == 0 {
                    self.platform.set_runstate_area(v, None)?;
                    return Ok(Outcome::Return(0));
                }
                let pieces = ctx.g.phys_pieces(addr, size)?;
                self.platform
                    .set_runstate_area(v, Some(RunstateAreaSpec { pieces, width }))?;
                Ok(Outcome::Return(0))
            }
            vcpuop::REGISTER_RUNSTATE_PHYS_AREA => {
                let b: [u8; 8] = ctx.g.read_arr(arg)?;
                let gpa = get_u64(&b, 0);
                if gpa == 0 {
                    self.platform.set_runstate_area(v, None)?;
                    return Ok(Outcome::Return(0));
                }
                let end = gpa.checked_add(size as u64 - 1).ok_or(Errno::EINVAL)?;
                if (gpa ^ end) >> 12 != 0 {
                    return Err(Errno::ENXIO);
                }
                let spec = RunstateAreaSpec {
                    pieces: vec![(gpa, size as u64)],
                    width,
                };
                self.platform.set_runstate_area(v, Some(spec))?;
                Ok(Outcome::Return(0))
            }
            _ => Err(Errno::ENOSYS),
        }
    }

    /// `map_vcpu_info`: move `v`'s vcpu_info into guest RAM at `gfn`+`offset`.
    fn map_vcpu_info(&self, ctx: &Ctx, v: VcpuId, gfn: u64, offset: u32) -> Result<(), Errno> {
        let len = shinfo::VCPU_INFO_LEN;
        let w = self.width();
        let align = if w == GuestWidth::Bits32 { 4 } else { 8 };
        let off = offset as usize;
        if off > abi::PAGE_SIZE - len || off % align != 0 {
            return Err(Errno::ENXIO);
        }
        if self.vcpu_info.read()[v.idx()].is_some() {
            return Err(Errno::EINVAL);
        }
        // "Run this command on yourself or on other offline VCPUS."
        if v != ctx.vcpu && self.vcpu_is_up(v) {
            return Err(Errno::EINVAL);
        }
        let gfn = Gfn::new(gfn).ok_or(Errno::EINVAL)?;
        let page = self
            .platform
            .map_guest_page(gfn)
            .map_err(|_| Errno::EINVAL)?;
        let mut body = [0u8; shinfo::VCPU_INFO_LEN];
        match self.vcpu_info_loc(v) {
            Some((old, old_off)) => old.read(old_off, &mut body),
            // From dummy_vcpu_info: a clean area with events masked (XEN_HAVE_PV_UPCALL_MASK).
            None => body[shinfo::VI_UPCALL_MASK] = 1,
        }
        page.write(off, &body);
        {
            let mut slots = self.vcpu_info.write();
            if slots[v.idx()].is_some() {
                return Err(Errno::EINVAL);
            }
            slots[v.idx()] = Some(VcpuInfoMap {
                page: page.clone(),
                off,
                gpa: (gfn.get() << 12) | off as u64,
            });
        }
        // "Mark everything as being pending just to make sure nothing gets lost."
        match w {
            GuestWidth::Bits64 => {
                page.store_u64(off + shinfo::VI_PENDING_SEL_64, u64::MAX, Ordering::SeqCst)
            }
            GuestWidth::Bits32 => {
                page.store_u32(off + shinfo::VI_PENDING_SEL_32, u32::MAX, Ordering::SeqCst)
            }
        }
        self.mark_events_pending(v);
        self.update_vcpu_time(v);
        Ok(())
    }

    // ---- timers --------------------------------------------------------------------------

    fn rearm(&self, v: VcpuId, t: &VcpuTimers) {
        self.platform.set_timer(v, t.earliest());
    }

    fn set_singleshot(&self, v: VcpuId, deadline: Option<u64>) {
        let mut timers = self.timers.lock();
        let t = &mut timers[v.idx()];
        t.singleshot = deadline;
        self.rearm(v, t);
    }

    /// `vcpu_set_periodic_timer`: a new period fires at once if a period has already passed
    /// since the last periodic event.
    fn set_periodic(&self, v: VcpuId, period: Option<u64>) {
        let fire = {
            let mut timers = self.timers.lock();
            let t = &mut timers[v.idx()];
            let last = t.periodic.map_or(0, |p| p.last);
            let mut fire = false;
            t.periodic = period.map(|period| {
                let now = self.now_ns();
                if now >= last.saturating_add(period) {
                    fire = true;
                    Periodic { period, last: now }
                } else {
                    Periodic { period, last }
                }
            });
            self.rearm(v, t);
            fire
        };
        if fire {
            self.send_virq(v, virq::TIMER);
        }
    }

    /// `do_set_timer_op`: 0 stops the single-shot timer; a negative or absurdly far timeout
    /// (more than 2^50 ns ahead) fires in 100 ms (Xen's "Linux workaround").
    pub(crate) fn set_timer_op(&self, v: VcpuId, timeout: i64) -> i64 {
        if timeout == 0 {
            self.set_singleshot(v, None);
            return 0;
        }
        let now = self.now_ns();
        let offset = (timeout as i128) - i128::from(now);
        let deadline = if timeout < 0 || (offset > 0 && (offset >> 50) as u32 != 0) {
            now.saturating_add(100_000_000)
        } else {
            timeout as u64
        };
        self.set_singleshot(v, Some(deadline));
        0
    }

    /// The VMM's host timer for `vcpu` fired: raise `VIRQ_TIMER` for every Xen timer that is
    /// due (single-shot: once; periodic: and schedule the next period from now), then re-arm.
    pub fn timer_expired(&self, vcpu: VcpuId) {
        let Some(_) = self.vcpus.get(vcpu.idx()) else {
            return;
        };
        let now = self.now_ns();
        let mut fire = false;
        {
            let mut timers = self.timers.lock();
            let t = &mut timers[vcpu.idx()];
            if t.singleshot.is_some_and(|d| d <= now) {
                t.singleshot = None;
                fire = true;
            }
            if let Some(p) = t.periodic.as_mut() {
                if now >= p.last.saturating_add(p.period) {
                    p.last = now;
                    fire = true;
                }
            }
            self.rearm(vcpu, t);
        }
        if fire {
            self.send_virq(vcpu, virq::TIMER);
        }
    }

    /// The earliest pending Xen timer deadline of `vcpu` (for the VMM's bookkeeping).
    pub fn timer_deadline(&self, vcpu: VcpuId) -> Option<u64> {
        self.timers
            .lock()
            .get(vcpu.idx())
            .and_then(|t| t.earliest())
    }
}
