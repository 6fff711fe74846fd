//! `sched_op`: yield, block, poll, and shutdown.
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
                // TODO(issue 5): domain watchdogs (SCHEDOP_watchdog timers).
                let _: [u8; 8] = ctx.g.read_arr(arg)?;
                Err(Errno::ENOSYS)
            }
            schedop::PIN_OVERRIDE => Err(Errno::EPERM),
            _ => Err(Errno::ENOSYS),
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
        // local_events_need_delivery()
        if self.upcall_pending(v) {
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
        let deadline_ns = (timeout != 0).then_some(timeout);
        Ok(Outcome::Poll {
            ports: list,
            deadline_ns,
        })
    }

    /// For a vCPU blocked in [`Outcome::Poll`]: whether it should stop waiting now (a listed
    /// port is pending, an upcall is pending, or a concurrent event already kicked it out of
    /// the poller set). Check it after arming the wake-up, before sleeping.
    pub fn poll_should_wake(&self, vcpu: VcpuId, ports: &[u32]) -> bool {
        let t = self.evtchn.lock();
        if t.pollers.get(vcpu.idx()).is_some_and(|p| p.is_none()) {
            return true;
        }
        self.upcall_pending(vcpu) || ports.iter().any(|&p| self.port_pending(&t, p))
    }

    /// The vCPU left `SCHEDOP_poll` (woken or timed out): it is no longer a poller.
    pub fn end_poll(&self, vcpu: VcpuId) {
        if let Some(p) = self.evtchn.lock().pollers.get_mut(vcpu.idx()) {
            *p = None;
        }
    }
}
