//! `sched_op`: yield, block, poll, shutdown, and the domain watchdogs.
//!
//! Watchdogs (`SCHEDOP_watchdog`, two per domain as in Xen) are deadlines the domain keeps and
//! the VMM times ([`Platform::set_watchdog`](crate::Platform::set_watchdog)); when one fires
//! the VMM calls [`Domain::watchdog_expired`] and shuts the domain down with the reason given.
//!
//! Blocking is the VMM's: a handler records what the vCPU waits for and returns an
//! [`Outcome`]. For `SCHEDOP_poll` the vCPU is registered as a poller *before* its ports are
//! checked (as Xen's `do_poll` sets `poll_mask` first), so an event raised concurrently either
//! is seen by the check or kicks the vCPU ([`Platform::kick_vcpu`](crate::Platform::kick_vcpu)).
//! Every port, allocated or not, is checked against the valid range (`-EINVAL` beyond it,
//! XSA-221); `nr_ports` is capped at 128; the timeout is absolute Xen system time.

use std::sync::atomic::Ordering;

use crate::abi::{get_u32, get_u64, schedop};
use crate::domain::{Ctx, Domain};
use crate::errno::Errno;
use crate::evtchn::PollTarget;
use crate::types::{Outcome, VcpuId};

/// `NR_DOMAIN_WATCHDOG_TIMERS`.
pub(crate) const NR_WATCHDOGS: usize = 2;

impl Domain {
    /// `do_sched_op`.
    pub(crate) fn sched_op(&self, ctx: &Ctx, cmd: i32, arg: u64) -> Result<Outcome, Errno> {
        match cmd {
            schedop::YIELD => Ok(Outcome::Yield),
            schedop::BLOCK => {
                // vcpu_block_enable_events(): clear evtchn_upcall_mask first.
                if let Some((page, off)) = self.vcpu_info_loc(ctx.vcpu) {
                    page.write(off + crate::abi::shinfo::VI_UPCALL_MASK, &[0]);
                }
                // vcpu_block(): the VMM re-checks block_should_wake() before it sleeps.
                self.set_block_irqs(ctx.vcpu, ctx.g.interrupts_enabled());
                Ok(Outcome::Block { deadline_ns: None })
            }
            schedop::SHUTDOWN => {
                let b: [u8; 4] = ctx.g.read_arr(arg)?;
                Ok(self.shutdown(get_u32(&b, 0) as u8))
            }
            schedop::SHUTDOWN_CODE => {
                let b: [u8; 4] = ctx.g.read_arr(arg)?;
                let _ = self.shutdown_code.compare_exchange(
                    u32::MAX,
                    u32::from(get_u32(&b, 0) as u8),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                Ok(Outcome::Return(0))
            }
            schedop::POLL => self.poll(ctx, arg),
            schedop::REMOTE_SHUTDOWN => {
                // {domid_t domain_id; unsigned int reason;}: no domain may be shut down by a
                // domU (XSM_DM_PRIV), itself included.
                let b: [u8; 8] = ctx.g.read_arr(arg)?;
                // rcu_lock_domain_by_id: DOMID_SELF is not resolved here.
                let dom = crate::abi::get_u16(&b, 0);
                if dom == self.cfg.domid || dom == 0 {
                    Err(Errno::EPERM)
                } else {
                    Err(Errno::ESRCH)
                }
            }
            schedop::WATCHDOG => {
                // {id u32, timeout u32 (seconds)}
                let b: [u8; 8] = ctx.g.read_arr(arg)?;
                self.watchdog(get_u32(&b, 0), get_u32(&b, 4))
                    .map(Outcome::Return)
            }
            schedop::PIN_OVERRIDE => Err(Errno::EPERM),
            _ => Err(Errno::ENOSYS),
        }
    }

    /// `domain_watchdog`: id 0 takes the first free timer and returns its id + 1 (`-ENOSPC`
    /// when both are in use); id 1 or 2 re-arms that timer, or with a 0 timeout stops and
    /// frees it (`-EINVAL` if it is not in use); a larger id is `-EINVAL`.
    fn watchdog(&self, id: u32, timeout_s: u32) -> Result<i64, Errno> {
        if id > NR_WATCHDOGS as u32 {
            return Err(Errno::EINVAL);
        }
        let deadline = self
            .now_ns()
            .saturating_add(u64::from(timeout_s) * 1_000_000_000);
        let mut w = self.watchdogs.lock();
        if id == 0 {
            let Some(i) = w.iter().position(|d| d.is_none()) else {
                return Err(Errno::ENOSPC);
            };
            w[i] = Some(deadline);
            self.platform.set_watchdog(i as u32, Some(deadline));
            return Ok(i as i64 + 1);
        }
        let i = (id - 1) as usize;
        if w[i].is_none() {
            return Err(Errno::EINVAL);
        }
        if timeout_s == 0 {
            w[i] = None;
            self.platform.set_watchdog(i as u32, None);
        } else {
            w[i] = Some(deadline);
            self.platform.set_watchdog(i as u32, Some(deadline));
        }
        Ok(0)
    }

    /// The VMM's timer for watchdog `id` (0-based, as given to
    /// [`Platform::set_watchdog`](crate::Platform::set_watchdog)) fired. If that watchdog is
    /// still in use and due, the domain shuts down (`domain_watchdog_timeout`): the returned
    /// reason (`SHUTDOWN_watchdog`, or an earlier `shutdown_code`) is what the VMM acts on, as
    /// for [`Outcome::Shutdown`]. `None` for a stale or cancelled timer.
    pub fn watchdog_expired(&self, id: u32) -> Option<u8> {
        let due = {
            let w = self.watchdogs.lock();
            let d = (*w.get(id as usize)?)?;
            d <= self.now_ns()
        };
        if !due {
            return None;
        }
        match self.shutdown(crate::abi::shutdown::WATCHDOG) {
            Outcome::Shutdown { reason } => Some(reason),
            _ => None,
        }
    }

    /// `domain_shutdown`: the first reason recorded (`shutdown_code`) wins.
    pub(crate) fn shutdown(&self, reason: u8) -> Outcome {
        let _ = self.shutdown_code.compare_exchange(
            u32::MAX,
            u32::from(reason),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        let code = self.shutdown_code().unwrap_or(reason);
        tracing::info!(reason, code, "domain shutdown");
        Outcome::Shutdown { reason: code }
    }

    /// `do_poll`. `sched_poll`: native `{ports u64, nr_ports u32 @8, timeout u64 @16}`,
    /// compat `{ports u32, nr_ports u32 @4, timeout u64 @8}`.
    fn poll(&self, ctx: &Ctx, arg: u64) -> Result<Outcome, Errno> {
        let mut b = [0u8; 24];
        let (ports, nr, timeout) = if ctx.g.is_compat() {
            ctx.g.read(arg, &mut b[..16])?;
            (u64::from(get_u32(&b, 0)), get_u32(&b, 4), get_u64(&b, 8))
        } else {
            ctx.g.read(arg, &mut b)?;
            (get_u64(&b, 0), get_u32(&b, 8), get_u64(&b, 16))
        };
        if nr > schedop::POLL_MAX_PORTS {
            return Err(Errno::EINVAL);
        }
        // Copy the port list in before taking the event lock (no guest access under it);
        // a fault is reported where Xen's loop would meet it.
        let mut list = Vec::with_capacity(nr as usize);
        let mut fault = None;
        for i in 0..u64::from(nr) {
            match ctx
                .g
                .elem_addr(ports, i, 4)
                .and_then(|a| ctx.g.read_arr::<4>(a))
            {
                Ok(p) => list.push(u32::from_le_bytes(p)),
                Err(e) => {
                    fault = Some(e);
                    break;
                }
            }
        }
        let v = ctx.vcpu;
        let mut t = self.evtchn.lock();
        // Registered before the checks, so a concurrent event is either seen or kicks us.
        t.pollers[v.idx()] = Some(PollTarget::Any);
        let done = |t: &mut crate::evtchn::EvtchnTable, r: Result<Outcome, Errno>| {
            t.pollers[v.idx()] = None;
            r
        };
        // local_events_need_delivery(): for HVM an upcall the vCPU can take now, not
        // evtchn_upcall_pending alone (hvm_local_events_need_delivery).
        let irqs = ctx.g.interrupts_enabled();
        self.set_block_irqs(v, irqs);
        if self.events_need_delivery(v, irqs) {
            return done(&mut t, Ok(Outcome::Return(0)));
        }
        for &port in &list {
            // evtchn_port_poll: invalid -> -EINVAL, pending -> return at once.
            if t.get(port).is_none() {
                return done(&mut t, Err(Errno::EINVAL));
            }
            if self.port_pending(&t, port) {
                return done(&mut t, Ok(Outcome::Return(0)));
            }
        }
        if let Some(e) = fault {
            return done(&mut t, Err(e));
        }
        if nr == 1 {
            t.pollers[v.idx()] = Some(PollTarget::Port(list[0]));
        }
        // The poll timer is set to an absolute time: one already past fires at once
        // (poll_timer_fn), so the vCPU does not block.
        if timeout != 0 && timeout <= self.now_ns() {
            return done(&mut t, Ok(Outcome::Return(0)));
        }
        let deadline_ns = (timeout != 0).then_some(timeout);
        Ok(Outcome::Poll {
            ports: list,
            deadline_ns,
        })
    }

    /// For a vCPU blocked in [`Outcome::Poll`]: whether it should stop waiting now (a listed
    /// port is pending, an upcall it can take now is pending (see
    /// [`Domain::events_need_delivery`]: `evtchn_upcall_pending` alone is not enough), or a
    /// concurrent event already kicked it out of the poller set). Check it after arming the
    /// wake-up, before sleeping.
    pub fn poll_should_wake(&self, vcpu: VcpuId, ports: &[u32]) -> bool {
        let t = self.evtchn.lock();
        if t.pollers.get(vcpu.idx()).is_some_and(|p| p.is_none()) {
            return true;
        }
        self.block_should_wake(vcpu) || ports.iter().any(|&p| self.port_pending(&t, p))
    }

    /// The vCPU left `SCHEDOP_poll` (woken or timed out): it is no longer a poller.
    pub fn end_poll(&self, vcpu: VcpuId) {
        if let Some(p) = self.evtchn.lock().pollers.get_mut(vcpu.idx()) {
            *p = None;
        }
    }
}
