//! Event channels: the port table, `EVTCHNOP_*`, and delivery under the 2-level ABI (the
//! FIFO ABI is in `evtchn_fifo`; every delivery primitive here dispatches on the active ABI).
//!
//! Ports are allocated in buckets of 64 as Xen does (`EVTCHNS_PER_BUCKET`); a port is *valid*
//! once its bucket exists, whatever its state, and only valid ports may be polled, closed,
//! unmasked or queried (`-EINVAL` otherwise). The table holds at most `max_evtchn_port + 1`
//! ports and never more than the ABI addresses: 4096 for a 64-bit 2-level layout, 1024 for
//! 32-bit, 2^17 under FIFO.
//!
//! Delivery (`evtchn_2l_set_pending`): set the pending bit; if it was clear and the port is
//! unmasked, set the selector bit of the port's word in the bound vCPU's `evtchn_pending_sel`;
//! if that was clear, set `evtchn_upcall_pending`; on its 0->1 transition call
//! [`Platform::raise_upcall`](crate::Platform::raise_upcall). Pollers of the port are woken
//! whenever a pending bit goes 0->1, masked or not.
//!
//! The dom0 side (xenstore, console, block and net backends in the VMM) appears as domain 0:
//! a port bound to it is `Interdomain` with a remote port id the VMM chose; a send on it calls
//! [`Platform::notify_backend`](crate::Platform::notify_backend).

use crate::abi::{self, evtchnop, get_u16, get_u32, get_u64, put_u16, put_u32, shinfo, virq};
use crate::domain::{Ctx, Domain, Lookup};
use crate::errno::Errno;
use crate::evtchn_fifo::Fifo;
use crate::shared::{test_and_clear_bit, test_and_set_bit, test_bit};
use crate::types::{EvtchnPort, Gfn, GuestWidth, VcpuId};
use crate::Error;

/// `EVTCHNS_PER_BUCKET` in Xen 4.17 (a 4 KiB page of 64-byte `struct evtchn`).
pub(crate) const BUCKET: u32 = 64;

/// The other end of an interdomain channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Remote {
    /// A dom0-side service in the VMM, identified by the VMM's remote port id.
    Dom0(u32),
    /// A port of this same domain (loopback).
    Local(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Free,
    Reserved,
    Unbound { remote_dom: u16 },
    Interdomain(Remote),
    Virq(u32),
    Ipi,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Channel {
    pub state: State,
    /// `notify_vcpu_id`.
    pub vcpu: u32,
    /// FIFO priority (0 highest, 15 lowest; `EVTCHN_FIFO_PRIORITY_DEFAULT` when bound).
    pub priority: u8,
    /// FIFO: raised while the port had no event word yet (`evtchn->pending`); re-raised when
    /// `expand_array` adds the word.
    pub fifo_pending: bool,
    /// FIFO: the queue (vCPU, priority) the port was last linked on (`fifo_lastq`). Kept
    /// across close and re-bind: that queue's tail may still name this port.
    pub last_q: (u32, u8),
}

impl Channel {
    const FREE: Channel = Channel {
        state: State::Free,
        vcpu: 0,
        priority: crate::evtchn_fifo::PRIORITY_DEFAULT,
        fifo_pending: false,
        last_q: (0, 0),
    };

    /// Bind the port (`evtchn_port_init`: default priority, nothing saved pending).
    pub fn bind(&mut self, state: State, vcpu: u32) {
        self.state = state;
        self.vcpu = vcpu;
        self.priority = crate::evtchn_fifo::PRIORITY_DEFAULT;
        self.fifo_pending = false;
    }
}

/// A dom0 port the VMM's services hold (dom0's side of an interdomain channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dom0Port {
    /// Opened with [`Domain::backend_alloc_unbound`] (or left by a guest close): the guest may
    /// bind to it with `EVTCHNOP_bind_interdomain`.
    Unbound,
    /// Connected to the guest's port.
    Bound(u32),
}

/// Which port a polling vCPU waits for (`poll_evtchn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PollTarget {
    /// More than one port (or none): any pending transition wakes it.
    Any,
    Port(u32),
}

pub(crate) struct EvtchnTable {
    /// One entry per valid port; the length is a multiple of [`BUCKET`].
    chans: Vec<Channel>,
    max_port: u32,
    /// `virq_to_evtchn` per vCPU (0: unbound).
    virq: Vec<[u32; virq::NR_VIRQS as usize]>,
    /// vCPUs inside `SCHEDOP_poll` (`poll_mask` + `poll_evtchn`).
    pub(crate) pollers: Vec<Option<PollTarget>>,
    /// The FIFO ABI's state once `init_control` succeeded; `None` under 2-level.
    pub(crate) fifo: Option<Fifo>,
    /// dom0's ports toward this domain, by the VMM's port id (at most [`MAX_DOM0_PORTS`]).
    dom0: std::collections::BTreeMap<u32, Dom0Port>,
}

/// dom0 ports a VMM may hold toward one guest (a bound on the dom0 table).
pub(crate) const MAX_DOM0_PORTS: usize = 4096;

impl EvtchnTable {
    pub fn new(vcpus: u32, max_port: u32) -> Self {
        let mut t = EvtchnTable {
            chans: Vec::new(),
            max_port,
            virq: vec![[0; virq::NR_VIRQS as usize]; vcpus as usize],
            pollers: vec![None; vcpus as usize],
            fifo: None,
            dom0: std::collections::BTreeMap::new(),
        };
        t.grow_to(0);
        // evtchn_init: port 0 is reserved.
        t.chans[0].state = State::Reserved;
        t
    }

    /// Allocate buckets until `port` is valid.
    fn grow_to(&mut self, port: u32) {
        while self.chans.len() as u32 <= port {
            let n = self.chans.len() + BUCKET as usize;
            self.chans.resize(n, Channel::FREE);
        }
    }

    /// `port_is_valid`.
    pub fn get(&self, port: u32) -> Option<&Channel> {
        self.chans.get(port as usize)
    }

    /// Every port with its channel, in port order (free ones included).
    pub(crate) fn bound_ports(&self) -> impl Iterator<Item = (u32, &Channel)> {
        self.chans.iter().enumerate().map(|(i, c)| (i as u32, c))
    }

    pub(crate) fn get_mut(&mut self, port: u32) -> Option<&mut Channel> {
        self.chans.get_mut(port as usize)
    }

    /// `max_evtchns`: the ports the current ABI addresses (`width` selects the 2-level size).
    pub fn limit(&self, width: GuestWidth) -> u32 {
        match (&self.fifo, width) {
            (Some(_), _) => crate::evtchn_fifo::NR_CHANNELS,
            (None, GuestWidth::Bits64) => 4096,
            (None, GuestWidth::Bits32) => 1024,
        }
    }

    /// `evtchn_is_busy`: a FIFO port whose event word is still LINKED.
    fn is_busy(&self, port: u32) -> bool {
        self.fifo
            .as_ref()
            .is_some_and(|f| f.word_bit(port, crate::evtchn_fifo::LINKED))
    }

    /// `evtchn_allocate_port`.
    fn allocate_port(&mut self, port: u32, max_evtchns: u32) -> Result<(), Errno> {
        if port > self.max_port || port >= max_evtchns {
            return Err(Errno::ENOSPC);
        }
        match self.get(port) {
            Some(c) if c.state != State::Free || self.is_busy(port) => Err(Errno::EBUSY),
            Some(_) => Ok(()),
            None => {
                self.grow_to(port);
                Ok(())
            }
        }
    }

    /// `get_free_port`: the lowest free port (bounded by `max_port` < 2^17).
    fn get_free_port(&mut self, max_evtchns: u32) -> Result<u32, Errno> {
        for port in 0..=self.max_port {
            match self.allocate_port(port, max_evtchns) {
                Ok(()) => return Ok(port),
                Err(Errno::EBUSY) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Errno::ENOSPC)
    }

    /// Mark a port free (`evtchn_free`; the caller clears its pending bit).
    fn free(&mut self, port: u32) {
        if let Some(c) = self.get_mut(port) {
            c.bind(State::Free, 0);
        }
    }

    pub fn valid_ports(&self) -> u32 {
        self.chans.len() as u32
    }

    /// Restore (issue 14): bind `port` exactly as a save recorded it, with the VIRQ and dom0
    /// tables that go with its state. The port must be free and addressable by the ABI.
    pub(crate) fn restore_port(
        &mut self,
        port: u32,
        state: State,
        vcpu: u32,
        max_evtchns: u32,
    ) -> Result<(), Errno> {
        if port == 0 || vcpu as usize >= self.virq.len() {
            return Err(Errno::EINVAL);
        }
        // As `allocate_port` but for a FIFO word still LINKED: the restored queue holds it.
        if port > self.max_port || port >= max_evtchns {
            return Err(Errno::ENOSPC);
        }
        self.grow_to(port);
        if self.get(port).is_some_and(|c| c.state != State::Free) {
            return Err(Errno::EBUSY);
        }
        match state {
            State::Virq(v) => {
                let slot = self.virq[vcpu as usize]
                    .get_mut(v as usize)
                    .ok_or(Errno::EINVAL)?;
                *slot = port;
            }
            State::Interdomain(Remote::Dom0(p)) => {
                if self.dom0.len() >= MAX_DOM0_PORTS {
                    return Err(Errno::ENOSPC);
                }
                self.dom0.insert(p, Dom0Port::Bound(port));
            }
            State::Free => return Err(Errno::EINVAL),
            _ => {}
        }
        if let Some(c) = self.get_mut(port) {
            c.bind(state, vcpu);
        }
        Ok(())
    }
}

/// Bits per `xen_ulong_t` selector word.
fn word_bits(w: GuestWidth) -> u32 {
    match w {
        GuestWidth::Bits64 => 64,
        GuestWidth::Bits32 => 32,
    }
}

fn mask_base(w: GuestWidth) -> usize {
    match w {
        GuestWidth::Bits64 => shinfo::EVTCHN_MASK_64,
        GuestWidth::Bits32 => shinfo::EVTCHN_MASK_32,
    }
}

/// `(base, bit)` of selector bit `word` in a `vcpu_info` at `off`: a u64 at +8, or a u32 at +4
/// (bits 32..63 of the u64 at +0).
fn sel_bit(w: GuestWidth, off: usize, word: u32) -> (usize, usize) {
    match w {
        GuestWidth::Bits64 => (off + shinfo::VI_PENDING_SEL_64, word as usize),
        GuestWidth::Bits32 => (off, 32 + word as usize),
    }
}

/// `virq_is_global`: per-vCPU VIRQs are TIMER, DEBUG, XENOPROF, XENPMU (x86 arch VIRQs are
/// global).
fn virq_is_global(v: u32) -> bool {
    !matches!(v, virq::TIMER | virq::DEBUG | virq::XENOPROF | virq::XENPMU)
}

impl Domain {
    /// `get_free_port` under the current ABI's limit.
    fn free_port(&self, t: &mut EvtchnTable) -> Result<u32, Errno> {
        let limit = t.limit(self.width());
        t.get_free_port(limit)
    }

    // ---- delivery ------------------------------------------------------------------------

    /// `evtchn_port_set_pending` for `port` bound to `vcpu`, with the table locked.
    pub(crate) fn set_pending_locked(&self, t: &mut EvtchnTable, port: u32, vcpu: u32) {
        if t.fifo.is_some() {
            return self.fifo_set_pending(t, port, vcpu);
        }
        let w = self.width();
        if port >= self.max_evtchns() {
            return;
        }
        let si = &*self.shared_info;
        if test_and_set_bit(si, shinfo::EVTCHN_PENDING, port as usize) {
            return;
        }
        if !test_bit(si, mask_base(w), port as usize) {
            if let Some(v) = self.vcpu(vcpu) {
                self.mark_selector(v, port / word_bits(w));
            }
        }
        self.check_pollers(t, port);
    }

    /// Set the selector bit for `word`; on its 0->1 transition mark events pending.
    fn mark_selector(&self, vcpu: VcpuId, word: u32) {
        let Some((page, off)) = self.vcpu_info_loc(vcpu) else {
            return;
        };
        let (base, bit) = sel_bit(self.width(), off, word);
        if !test_and_set_bit(&*page, base, bit) {
            self.mark_events_pending(vcpu);
        }
    }

    /// `vcpu_mark_events_pending`: set `evtchn_upcall_pending`, and raise the upcall on 0->1.
    pub(crate) fn mark_events_pending(&self, vcpu: VcpuId) {
        let Some((page, off)) = self.vcpu_info_loc(vcpu) else {
            return;
        };
        if !test_and_set_bit(&*page, off + shinfo::VI_UPCALL_PENDING, 0) {
            self.platform.raise_upcall(vcpu);
        }
    }

    /// `evtchn_check_pollers`: wake vCPUs polling this port (or any port).
    pub(crate) fn check_pollers(&self, t: &mut EvtchnTable, port: u32) {
        for (i, p) in t.pollers.iter_mut().enumerate() {
            let hit = match *p {
                Some(PollTarget::Any) => true,
                Some(PollTarget::Port(q)) => q == port,
                None => false,
            };
            if hit {
                *p = None;
                if let Some(v) = self.vcpu(i as u32) {
                    self.platform.kick_vcpu(v);
                }
            }
        }
    }

    /// `evtchn_port_clear_pending`.
    fn clear_pending(&self, t: &EvtchnTable, port: u32) {
        if let Some(f) = &t.fifo {
            f.clear_word_bit(port, crate::evtchn_fifo::PENDING);
        } else if port < self.max_evtchns() {
            test_and_clear_bit(&*self.shared_info, shinfo::EVTCHN_PENDING, port as usize);
        }
    }

    /// `evtchn_port_is_pending`.
    pub(crate) fn port_pending(&self, t: &EvtchnTable, port: u32) -> bool {
        match &t.fifo {
            Some(f) => f.word_bit(port, crate::evtchn_fifo::PENDING),
            None => self.l2_pending(port),
        }
    }

    /// The 2-level pending bit of `port` in shared_info.
    pub(crate) fn l2_pending(&self, port: u32) -> bool {
        port < self.max_evtchns()
            && test_bit(&*self.shared_info, shinfo::EVTCHN_PENDING, port as usize)
    }

    /// Sets every 2-level mask bit of the current layout (see
    /// [`Domain::mask_events_at_resume`]).
    pub(crate) fn mask_all_2l(&self) {
        let w = self.width();
        let base = mask_base(w);
        let words = self.max_evtchns() as usize / 64;
        for i in 0..words {
            self.shared_info.store_u64(
                base + 8 * i,
                u64::MAX,
                std::sync::atomic::Ordering::Release,
            );
        }
    }

    /// `evtchn_port_unmask`.
    fn unmask_locked(&self, t: &mut EvtchnTable, port: u32) {
        if t.fifo.is_some() {
            return self.fifo_unmask(t, port);
        }
        let w = self.width();
        if port >= self.max_evtchns() {
            return;
        }
        let si = &*self.shared_info;
        let vcpu = t.get(port).map_or(0, |c| c.vcpu);
        if test_and_clear_bit(si, mask_base(w), port as usize)
            && test_bit(si, shinfo::EVTCHN_PENDING, port as usize)
        {
            if let Some(v) = self.vcpu(vcpu) {
                self.mark_selector(v, port / word_bits(w));
            }
        }
    }

    /// `send_guest_vcpu_virq` / `send_guest_global_virq`.
    pub fn send_virq(&self, vcpu: VcpuId, v: u32) {
        if v >= virq::NR_VIRQS {
            return;
        }
        let mut t = self.evtchn.lock();
        let owner = if virq_is_global(v) { 0 } else { vcpu.idx() };
        let port = t.virq[owner][v as usize];
        if port == 0 {
            return;
        }
        let target = if virq_is_global(v) {
            t.get(port).map_or(0, |c| c.vcpu)
        } else {
            vcpu.get()
        };
        self.set_pending_locked(&mut t, port, target);
    }

    // ---- VMM (dom0-side) API ---------------------------------------------------------------

    /// Create a channel from the guest to a dom0-side service: a free port bound
    /// `Interdomain` to dom0's `remote_port`, notifying vCPU 0 (what the toolstack and xenstored
    /// set up for the store and console channels). Returns the guest's port, which the VMM
    /// publishes in `HVM_PARAM_STORE_EVTCHN`/`CONSOLE_EVTCHN`.
    pub fn bind_backend_port(&self, remote_port: u32) -> Result<EvtchnPort, Error> {
        let mut t = self.evtchn.lock();
        let port = self.free_port(&mut t).map_err(Error::Evtchn)?;
        let c = t.get_mut(port).ok_or(Error::Evtchn(Errno::EINVAL))?;
        c.bind(State::Interdomain(Remote::Dom0(remote_port)), 0);
        t.dom0.insert(remote_port, Dom0Port::Bound(port));
        Ok(EvtchnPort::new(port, u32::MAX).expect("u32::MAX bounds every port"))
    }

    /// dom0's `EVTCHNOP_alloc_unbound` toward this domain: a new dom0 port (the lowest id not
    /// in use, from 1) that the guest can bind with `EVTCHNOP_bind_interdomain {remote_dom 0,
    /// remote_port}`. The VMM publishes the id (in xenstore) and is told of sends on it through
    /// [`Platform::notify_backend`](crate::Platform::notify_backend). `remote_domid` must be
    /// this domain (`-ESRCH` otherwise); `-ENOSPC` past 4096 dom0 ports.
    pub fn backend_alloc_unbound(&self, remote_domid: u16) -> Result<u32, Error> {
        if remote_domid != self.cfg.domid {
            return Err(Error::Evtchn(Errno::ESRCH));
        }
        let mut t = self.evtchn.lock();
        if t.dom0.len() >= MAX_DOM0_PORTS {
            return Err(Error::Evtchn(Errno::ENOSPC));
        }
        // The map holds fewer than MAX_DOM0_PORTS ids, so one of 1..=MAX_DOM0_PORTS is free.
        let id = (1..=MAX_DOM0_PORTS as u32)
            .find(|id| !t.dom0.contains_key(id))
            .ok_or(Error::Evtchn(Errno::ENOSPC))?;
        t.dom0.insert(id, Dom0Port::Unbound);
        Ok(id)
    }

    /// The guest port bound to dom0's port `dom0_port`, if the guest has bound it.
    pub fn backend_peer(&self, dom0_port: u32) -> Option<EvtchnPort> {
        match self.evtchn.lock().dom0.get(&dom0_port) {
            Some(Dom0Port::Bound(p)) => EvtchnPort::new(*p, u32::MAX),
            _ => None,
        }
    }

    /// dom0 closes its port (`evtchn_close` from dom0's side): a guest port bound to it goes
    /// back to `Unbound` for dom0, as Xen leaves the surviving end. `-EINVAL` for an unknown id.
    pub fn backend_close(&self, dom0_port: u32) -> Result<(), Error> {
        let mut t = self.evtchn.lock();
        match t.dom0.remove(&dom0_port) {
            None => Err(Error::Evtchn(Errno::EINVAL)),
            Some(Dom0Port::Unbound) => Ok(()),
            Some(Dom0Port::Bound(gp)) => {
                if let Some(c) = t.get_mut(gp) {
                    if c.state == State::Interdomain(Remote::Dom0(dom0_port)) {
                        c.state = State::Unbound { remote_dom: 0 };
                    }
                }
                Ok(())
            }
        }
    }

    /// A backend binds to a port the guest allocated with `alloc_unbound` for dom0
    /// (`bind_interdomain` from dom0's side). Xen marks the guest's port pending at once.
    pub fn backend_bind(&self, guest_port: u32, remote_port: u32) -> Result<(), Error> {
        let mut t = self.evtchn.lock();
        let c = t.get_mut(guest_port).ok_or(Error::Evtchn(Errno::EINVAL))?;
        if c.state != (State::Unbound { remote_dom: 0 }) {
            return Err(Error::Evtchn(Errno::EINVAL));
        }
        c.state = State::Interdomain(Remote::Dom0(remote_port));
        let vcpu = c.vcpu;
        t.dom0.insert(remote_port, Dom0Port::Bound(guest_port));
        self.set_pending_locked(&mut t, guest_port, vcpu);
        Ok(())
    }

    /// A backend notifies the guest on `port` (which must be bound to dom0): 2-level delivery
    /// to the port's vCPU.
    pub fn raise_port(&self, port: u32) -> Result<(), Error> {
        let mut t = self.evtchn.lock();
        let c = *t.get(port).ok_or(Error::Evtchn(Errno::EINVAL))?;
        if !matches!(c.state, State::Interdomain(Remote::Dom0(_))) {
            return Err(Error::Evtchn(Errno::EINVAL));
        }
        self.set_pending_locked(&mut t, port, c.vcpu);
        Ok(())
    }

    /// Whether `port` is pending (in shared_info, or in its FIFO event word).
    pub fn is_port_pending(&self, port: u32) -> bool {
        let t = self.evtchn.lock();
        self.port_pending(&t, port)
    }

    // ---- EVTCHNOP_* ----------------------------------------------------------------------

    /// `do_event_channel_op`.
    pub(crate) fn event_channel_op(&self, ctx: &Ctx, cmd: i32, arg: u64) -> Result<i64, Errno> {
        let g = &ctx.g;
        match cmd {
            evtchnop::ALLOC_UNBOUND => {
                let mut b: [u8; 8] = g.read_arr(arg)?;
                let port = self.alloc_unbound(get_u16(&b, 0), get_u16(&b, 2))?;
                put_u32(&mut b, 4, port);
                g.write(arg, &b)?;
                Ok(0)
            }
            evtchnop::BIND_INTERDOMAIN => {
                let mut b: [u8; 12] = g.read_arr(arg)?;
                let port = self.bind_interdomain(get_u16(&b, 0), get_u32(&b, 4))?;
                put_u32(&mut b, 8, port);
                g.write(arg, &b)?;
                Ok(0)
            }
            evtchnop::BIND_VIRQ => {
                let mut b: [u8; 12] = g.read_arr(arg)?;
                let port = self.bind_virq(get_u32(&b, 0), get_u32(&b, 4))?;
                put_u32(&mut b, 8, port);
                g.write(arg, &b)?;
                Ok(0)
            }
            evtchnop::BIND_IPI => {
                let mut b: [u8; 8] = g.read_arr(arg)?;
                let port = self.bind_ipi(get_u32(&b, 0))?;
                put_u32(&mut b, 4, port);
                g.write(arg, &b)?;
                Ok(0)
            }
            // HVM domUs have no PIRQs here (`nr_pirqs` is 0): every pirq is out of range.
            evtchnop::BIND_PIRQ => {
                let _: [u8; 12] = g.read_arr(arg)?;
                Err(Errno::EINVAL)
            }
            evtchnop::CLOSE => {
                let b: [u8; 4] = g.read_arr(arg)?;
                self.close(get_u32(&b, 0)).map(|()| 0)
            }
            evtchnop::SEND => {
                let b: [u8; 4] = g.read_arr(arg)?;
                self.send(get_u32(&b, 0)).map(|()| 0)
            }
            evtchnop::STATUS => {
                let mut b: [u8; 24] = g.read_arr(arg)?;
                self.status(&mut b)?;
                g.write(arg, &b)?;
                Ok(0)
            }
            evtchnop::BIND_VCPU => {
                let b: [u8; 8] = g.read_arr(arg)?;
                self.bind_vcpu(get_u32(&b, 0), get_u32(&b, 4)).map(|()| 0)
            }
            evtchnop::UNMASK => {
                let b: [u8; 4] = g.read_arr(arg)?;
                self.unmask(get_u32(&b, 0)).map(|()| 0)
            }
            evtchnop::RESET | evtchnop::RESET_CONT => {
                let b: [u8; 2] = g.read_arr(arg)?;
                self.target_self(get_u16(&b, 0))?;
                // A reset never stops half-way here, so there is nothing to continue: Xen
                // answers reset_cont without a preempted reset with -EBUSY.
                if cmd == evtchnop::RESET_CONT {
                    return Err(Errno::EBUSY);
                }
                self.reset();
                Ok(0)
            }
            evtchnop::INIT_CONTROL => {
                // {control_gfn u64, offset u32, vcpu u32, link_bits u8 @16 (out), pad}; the
                // structure is copied back only on success.
                let mut b: [u8; 24] = g.read_arr(arg)?;
                let bits = self.init_control(get_u64(&b, 0), get_u32(&b, 8), get_u32(&b, 12))?;
                b[16] = bits;
                g.write(arg, &b)?;
                Ok(0)
            }
            evtchnop::EXPAND_ARRAY => {
                let b: [u8; 8] = g.read_arr(arg)?;
                self.expand_array(get_u64(&b, 0)).map(|()| 0)
            }
            // Under 2-level: -EINVAL for an invalid port, else -ENOSYS (no set_priority op).
            evtchnop::SET_PRIORITY => {
                let b: [u8; 8] = g.read_arr(arg)?;
                self.set_priority(get_u32(&b, 0), get_u32(&b, 4))
                    .map(|()| 0)
            }
            _ => Err(Errno::ENOSYS),
        }
    }

    /// `evtchn_alloc_unbound`.
    fn alloc_unbound(&self, dom: u16, remote: u16) -> Result<u32, Errno> {
        self.target_self(dom)?;
        let mut t = self.evtchn.lock();
        let port = self.free_port(&mut t)?;
        let remote_dom = if remote == abi::domid::SELF {
            self.cfg.domid
        } else {
            remote
        };
        if let Some(c) = t.get_mut(port) {
            c.bind(State::Unbound { remote_dom }, 0);
        }
        Ok(port)
    }

    /// `evtchn_bind_interdomain` to this domain's own unbound port (loopback) or to a dom0
    /// port the VMM opened for this domain with [`Domain::backend_alloc_unbound`]. Anything
    /// else that exists is `-EINVAL` (not unbound for us), as in Xen.
    fn bind_interdomain(&self, rdom: u16, rport: u32) -> Result<u32, Errno> {
        let lookup = self.lookup(rdom);
        if lookup == Lookup::None {
            return Err(Errno::ESRCH);
        }
        let mut t = self.evtchn.lock();
        let lport = self.free_port(&mut t)?;
        if lookup == Lookup::Dom0 {
            if t.dom0.get(&rport) != Some(&Dom0Port::Unbound) {
                return Err(Errno::EINVAL);
            }
            if let Some(c) = t.get_mut(lport) {
                c.bind(State::Interdomain(Remote::Dom0(rport)), 0);
            }
            t.dom0.insert(rport, Dom0Port::Bound(lport));
            self.set_pending_locked(&mut t, lport, 0);
            return Ok(lport);
        }
        let ok = lookup == Lookup::SelfDom
            && lport != rport
            && matches!(t.get(rport), Some(c) if c.state == State::Unbound { remote_dom: self.cfg.domid });
        if !ok {
            // check_free_port: the port we found stays free.
            return Err(Errno::EINVAL);
        }
        if let Some(c) = t.get_mut(lport) {
            c.bind(State::Interdomain(Remote::Local(rport)), 0);
        }
        if let Some(c) = t.get_mut(rport) {
            c.state = State::Interdomain(Remote::Local(lport));
        }
        // "We may have lost notifications on the remote unbound port": pend the local port.
        self.set_pending_locked(&mut t, lport, 0);
        Ok(lport)
    }

    /// `evtchn_bind_virq`.
    fn bind_virq(&self, v: u32, vcpu: u32) -> Result<u32, Errno> {
        if v >= virq::NR_VIRQS {
            return Err(Errno::EINVAL);
        }
        if virq_is_global(v) && vcpu != 0 {
            return Err(Errno::EINVAL);
        }
        let vid = self.vcpu(vcpu).ok_or(Errno::ENOENT)?;
        let mut t = self.evtchn.lock();
        if t.virq[vid.idx()][v as usize] != 0 {
            return Err(Errno::EEXIST);
        }
        let port = self.free_port(&mut t)?;
        if let Some(c) = t.get_mut(port) {
            c.bind(State::Virq(v), vcpu);
        }
        t.virq[vid.idx()][v as usize] = port;
        Ok(port)
    }

    /// `evtchn_bind_ipi`.
    fn bind_ipi(&self, vcpu: u32) -> Result<u32, Errno> {
        self.vcpu(vcpu).ok_or(Errno::ENOENT)?;
        let mut t = self.evtchn.lock();
        let port = self.free_port(&mut t)?;
        if let Some(c) = t.get_mut(port) {
            c.bind(State::Ipi, vcpu);
        }
        Ok(port)
    }

    /// `evtchn_close` from the guest.
    fn close(&self, port: u32) -> Result<(), Errno> {
        let mut t = self.evtchn.lock();
        self.close_locked(&mut t, port)
    }

    fn close_locked(&self, t: &mut EvtchnTable, port: u32) -> Result<(), Errno> {
        let c = *t.get(port).ok_or(Errno::EINVAL)?;
        match c.state {
            State::Free | State::Reserved => return Err(Errno::EINVAL),
            State::Unbound { .. } | State::Ipi => {}
            State::Virq(v) => {
                let owner = if virq_is_global(v) {
                    0
                } else {
                    c.vcpu as usize
                };
                if let Some(slot) = t.virq.get_mut(owner).and_then(|a| a.get_mut(v as usize)) {
                    *slot = 0;
                }
            }
            State::Interdomain(Remote::Local(r)) => {
                // The other end goes back to waiting for us.
                if let Some(rc) = t.get_mut(r) {
                    rc.state = State::Unbound {
                        remote_dom: self.cfg.domid,
                    };
                }
            }
            // dom0's end survives, unbound for us again (the VMM sees no more notifications).
            State::Interdomain(Remote::Dom0(r)) => {
                if let Some(d) = t.dom0.get_mut(&r) {
                    if *d == Dom0Port::Bound(port) {
                        *d = Dom0Port::Unbound;
                    }
                }
            }
        }
        self.clear_pending(t, port);
        t.free(port);
        Ok(())
    }

    /// `evtchn_send`.
    fn send(&self, port: u32) -> Result<(), Errno> {
        let mut t = self.evtchn.lock();
        let c = *t.get(port).ok_or(Errno::EINVAL)?;
        match c.state {
            State::Interdomain(Remote::Local(r)) => {
                let rv = t.get(r).map_or(0, |rc| rc.vcpu);
                self.set_pending_locked(&mut t, r, rv);
            }
            State::Interdomain(Remote::Dom0(remote)) => {
                drop(t);
                self.platform.notify_backend(remote);
            }
            State::Ipi => self.set_pending_locked(&mut t, port, c.vcpu),
            // Silently dropped.
            State::Unbound { .. } => {}
            _ => return Err(Errno::EINVAL),
        }
        Ok(())
    }

    /// `evtchn_status` on a 24-byte `evtchn_status` buffer.
    fn status(&self, b: &mut [u8; 24]) -> Result<(), Errno> {
        self.target_self(get_u16(b, 0))?;
        let port = get_u32(b, 4);
        let t = self.evtchn.lock();
        let c = *t.get(port).ok_or(Errno::EINVAL)?;
        let st = match c.state {
            State::Free | State::Reserved => evtchnop::STAT_CLOSED,
            State::Unbound { remote_dom } => {
                put_u16(b, 16, remote_dom);
                evtchnop::STAT_UNBOUND
            }
            State::Interdomain(r) => {
                let (dom, rport) = match r {
                    Remote::Dom0(p) => (0, p),
                    Remote::Local(p) => (self.cfg.domid, p),
                };
                put_u16(b, 16, dom);
                put_u32(b, 20, rport);
                evtchnop::STAT_INTERDOMAIN
            }
            State::Virq(v) => {
                put_u32(b, 16, v);
                evtchnop::STAT_VIRQ
            }
            State::Ipi => evtchnop::STAT_IPI,
        };
        put_u32(b, 8, st);
        put_u32(b, 12, c.vcpu);
        Ok(())
    }

    /// `evtchn_bind_vcpu`.
    fn bind_vcpu(&self, port: u32, vcpu: u32) -> Result<(), Errno> {
        self.vcpu(vcpu).ok_or(Errno::ENOENT)?;
        let mut t = self.evtchn.lock();
        let c = t.get_mut(port).ok_or(Errno::EINVAL)?;
        match c.state {
            State::Virq(v) if virq_is_global(v) => c.vcpu = vcpu,
            State::Unbound { .. } | State::Interdomain(_) => c.vcpu = vcpu,
            _ => return Err(Errno::EINVAL),
        }
        Ok(())
    }

    /// `evtchn_unmask`.
    fn unmask(&self, port: u32) -> Result<(), Errno> {
        let mut t = self.evtchn.lock();
        t.get(port).ok_or(Errno::EINVAL)?;
        self.unmask_locked(&mut t, port);
        Ok(())
    }

    /// `evtchn_reset` of this domain: close every port.
    ///
    /// Afterwards no port is bound (this domain has no Xen-consumed ports, which Xen keeps), so
    /// a FIFO domain switches back to 2-level (`evtchn_fifo_destroy` + `evtchn_2l_init`).
    fn reset(&self) {
        let mut t = self.evtchn.lock();
        for port in 1..t.valid_ports() {
            let _ = self.close_locked(&mut t, port);
        }
        let bound = (1..t.valid_ports()).any(|p| t.get(p).is_some_and(|c| c.state != State::Free));
        if !bound {
            t.fifo = None;
        }
    }

    /// Whether `gfn` is RAM in the guest's memory map.
    pub(crate) fn is_ram(&self, gfn: Gfn) -> bool {
        self.platform.is_ram(gfn.gpa())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_new_reserves_port_zero_and_one_bucket() {
        let t = EvtchnTable::new(2, 4095);
        assert_eq!(t.valid_ports(), BUCKET);
        assert_eq!(t.get(0).map(|c| c.state), Some(State::Reserved));
        assert!(t.get(BUCKET).is_none());
    }

    #[test]
    fn table_get_free_port_grows_by_buckets_and_stops_at_limit() {
        let mut t = EvtchnTable::new(1, 4095);
        for want in 1..4096u32 {
            let p = t.get_free_port(4096).expect("port");
            assert_eq!(p, want);
            t.chans[p as usize].state = State::Ipi;
        }
        assert_eq!(t.valid_ports(), 4096);
        assert_eq!(t.get_free_port(4096), Err(Errno::ENOSPC));
    }

    #[test]
    fn table_allocate_port_above_abi_limit_enospc() {
        let mut t = EvtchnTable::new(1, 4095);
        assert_eq!(t.allocate_port(1024, 1024), Err(Errno::ENOSPC));
        assert_eq!(t.allocate_port(1023, 1024), Ok(()));
        assert_eq!(t.valid_ports(), 1024);
    }

    #[test]
    fn sel_bit_compat_uses_upper_half_of_first_word() {
        assert_eq!(sel_bit(GuestWidth::Bits32, 128, 3), (128, 35));
        assert_eq!(sel_bit(GuestWidth::Bits64, 128, 3), (136, 3));
    }
}
