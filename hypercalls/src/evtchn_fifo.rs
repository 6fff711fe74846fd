//! The FIFO event channel ABI (`xen/common/event_fifo.c`): per-vCPU control blocks and the
//! event array in guest RAM, `EVTCHNOP_init_control`, `expand_array`, `set_priority`, and
//! FIFO delivery.
//!
//! The domain starts with the 2-level ABI. The first successful `init_control` (for any vCPU)
//! switches it to FIFO: ports already bound keep their pending state (saved and re-raised when
//! the event array page holding their word arrives) and get the default priority 7. A failing
//! first `init_control` (a control GFN that is not RAM, XSA-188) leaves the domain on 2-level,
//! so it can be retried and fails the same way. `EVTCHNOP_reset` switches back to 2-level.
//!
//! Event words (`event_word_t`, 32 bits): PENDING (31), MASKED (30), LINKED (29), BUSY (28),
//! and a 17-bit LINK to the next port of the queue. Each vCPU has 16 queues, one per priority;
//! the control block holds `ready` (a bit per non-empty queue) and the 16 queue heads. Delivery
//! (`evtchn_fifo_set_pending`): set PENDING; if the word is unmasked and was not LINKED, link
//! it: to the queue's tail word if that is still LINKED, else write the queue head; then, if
//! the queue was empty (the event was not linked to a tail), set the queue's READY bit and on
//! its 0->1 transition mark the vCPU's events pending (`evtchn_upcall_pending`, upcall on
//! 0->1). Pollers are woken whenever PENDING goes 0->1. `EVTCHNOP_unmask` clears MASKED and
//! re-runs delivery if the word is pending. A port whose word is still LINKED is busy and is
//! not reallocated (`evtchn_is_busy`).
//!
//! Differences in mechanism, not in what the guest sees: all FIFO state lives under the
//! domain's event lock (Xen's per-queue locks only matter for its concurrency), and Xen's
//! `cmpxchg` on the tail word becomes two atomic bit operations (clear LINK, OR the new link;
//! the OR's old value tells whether the word was still LINKED, and a link written into a word
//! the guest had just unlinked is taken back out). [`SharedPage`] offers no compare-exchange,
//! and the guest may only clear LINKED/LINK, PENDING and flip MASKED on a linked word, so the
//! outcome is the one Xen's loop reaches without retries; xenkvm never has to hold a word
//! BUSY, and clears BUSY when it writes a link, as Xen's new value does.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::abi::{self, evtchnop};
use crate::domain::Domain;
use crate::errno::Errno;
use crate::evtchn::EvtchnTable;
use crate::shared::{test_and_set_bit, SharedPage};
use crate::types::Gfn;

/// `EVTCHN_FIFO_PRIORITY_DEFAULT`.
pub(crate) const PRIORITY_DEFAULT: u8 = xen_abi::EVTCHN_FIFO_PRIORITY_DEFAULT as u8;
/// `EVTCHN_FIFO_PRIORITY_MIN` (the lowest priority, the highest number).
pub(crate) const PRIORITY_MIN: u32 = xen_abi::EVTCHN_FIFO_PRIORITY_MIN;
const QUEUES: usize = xen_abi::EVTCHN_FIFO_MAX_QUEUES as usize;
/// `EVTCHN_FIFO_NR_CHANNELS`: 2^17 ports.
pub(crate) const NR_CHANNELS: u32 = xen_abi::EVTCHN_FIFO_NR_CHANNELS;
const WORDS_PER_PAGE: u32 = (abi::PAGE_SIZE / 4) as u32;
/// `EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES`.
pub(crate) const MAX_ARRAY_PAGES: usize = (NR_CHANNELS / WORDS_PER_PAGE) as usize;

pub(crate) const PENDING: u32 = xen_abi::EVTCHN_FIFO_PENDING;
pub(crate) const MASKED: u32 = xen_abi::EVTCHN_FIFO_MASKED;
pub(crate) const LINKED: u32 = xen_abi::EVTCHN_FIFO_LINKED;
pub(crate) const BUSY: u32 = xen_abi::EVTCHN_FIFO_BUSY;
const LINK_MASK: u32 = xen_abi::EVTCHN_FIFO_LINK_MASK;

/// Offset of `head[0]` in `evtchn_fifo_control_block` (after `ready` and `_rsvd`).
const CB_HEAD: usize = 8;

/// One vCPU's FIFO state.
#[derive(Clone, Default)]
pub(crate) struct FifoVcpu {
    /// The control block: the guest RAM page and the block's offset in it.
    pub(crate) cb: Option<(Arc<dyn SharedPage>, usize)>,
    /// The control block's guest-physical address (for save).
    pub(crate) cb_gpa: u64,
    /// Queue tails by priority (`evtchn_fifo_queue.tail`, 0: none).
    pub(crate) tail: [u32; QUEUES],
}

/// The domain's FIFO state (`struct evtchn_fifo_domain` and the per-vCPU queues).
pub(crate) struct Fifo {
    /// Event array pages in guest RAM, [`WORDS_PER_PAGE`] event words each.
    pages: Vec<Arc<dyn SharedPage>>,
    /// The event array pages' gfns, in order (for save).
    pub(crate) page_gfns: Vec<u64>,
    pub(crate) vcpus: Vec<FifoVcpu>,
}

impl Fifo {
    pub(crate) fn new(vcpus: usize) -> Self {
        Fifo {
            pages: Vec::new(),
            page_gfns: Vec::new(),
            vcpus: vec![FifoVcpu::default(); vcpus],
        }
    }

    /// Restore: append an event array page (no events re-raised; their words are in RAM).
    pub(crate) fn push_page(&mut self, page: Arc<dyn SharedPage>, gfn: u64) -> Result<(), Errno> {
        if self.pages.len() >= MAX_ARRAY_PAGES {
            return Err(Errno::ENOSPC);
        }
        self.pages.push(page);
        self.page_gfns.push(gfn);
        Ok(())
    }

    /// Ports that have an event word (`num_evtchns`).
    pub fn num_evtchns(&self) -> u32 {
        self.pages.len() as u32 * WORDS_PER_PAGE
    }

    /// `evtchn_fifo_word_from_port`: the page and byte offset of `port`'s event word.
    pub fn word(&self, port: u32) -> Option<(Arc<dyn SharedPage>, usize)> {
        let page = self.pages.get((port / WORDS_PER_PAGE) as usize)?;
        Some((page.clone(), (port % WORDS_PER_PAGE) as usize * 4))
    }

    /// Whether `port`'s event word has `bit` set (false without a word).
    pub fn word_bit(&self, port: u32, bit: u32) -> bool {
        self.word(port)
            .is_some_and(|(p, off)| word_test(&*p, off, bit))
    }

    /// Clear `bit` in `port`'s event word, if it has one.
    pub fn clear_word_bit(&self, port: u32, bit: u32) {
        if let Some((p, off)) = self.word(port) {
            word_clear(&*p, off, bit);
        }
    }
}

/// The aligned `u64` holding the `u32` at `off`, and the shift of that `u32` inside it.
fn word_loc(off: usize) -> (usize, u32) {
    (off & !7, ((off & 4) * 8) as u32)
}

fn word_test_and_set(p: &dyn SharedPage, off: usize, bit: u32) -> bool {
    let (o, sh) = word_loc(off);
    let m = 1u64 << (sh + bit);
    p.fetch_or_u64(o, m, Ordering::SeqCst) & m != 0
}

fn word_clear(p: &dyn SharedPage, off: usize, bit: u32) {
    let (o, sh) = word_loc(off);
    p.fetch_and_u64(o, !(1u64 << (sh + bit)), Ordering::SeqCst);
}

fn word_test(p: &dyn SharedPage, off: usize, bit: u32) -> bool {
    p.load_u32(off, Ordering::SeqCst) & (1 << bit) != 0
}

/// `evtchn_fifo_set_link`: make the word at `off` link to `link` iff it is still LINKED.
/// Returns whether it was (the new event is then reachable from the old tail).
fn set_link(p: &dyn SharedPage, off: usize, link: u32) -> bool {
    let (o, sh) = word_loc(off);
    if p.load_u32(off, Ordering::SeqCst) & (1 << LINKED) == 0 {
        return false;
    }
    // As Xen's new value: BUSY and the old LINK cleared.
    p.fetch_and_u64(
        o,
        !(u64::from(LINK_MASK | (1 << BUSY)) << sh),
        Ordering::SeqCst,
    );
    let link = u64::from(link & LINK_MASK) << sh;
    let old = p.fetch_or_u64(o, link, Ordering::SeqCst);
    if (old >> sh) & (1 << LINKED) != 0 {
        true
    } else {
        // The guest unlinked the word in between: it is not part of the queue any more.
        p.fetch_and_u64(o, !link, Ordering::SeqCst);
        false
    }
}

impl Domain {
    /// `evtchn_fifo_set_pending` for `port`, notifying `vcpu`, with the table locked.
    pub(crate) fn fifo_set_pending(&self, t: &mut EvtchnTable, port: u32, vcpu: u32) {
        let Some(c) = t.get(port).copied() else {
            return;
        };
        let Some(fifo) = t.fifo.as_mut() else {
            return;
        };
        let Some((page, off)) = fifo.word(port) else {
            // No event word yet: remember it for expand_array.
            if let Some(c) = t.get_mut(port) {
                c.fifo_pending = true;
            }
            return;
        };
        let Some(v) = self.vcpu(vcpu) else {
            return;
        };
        let was_pending = word_test_and_set(&*page, off, PENDING);
        let prio = usize::from(c.priority).min(QUEUES - 1);
        let cb = fifo.vcpus[v.idx()].cb.clone();
        let mut linked = true;
        let mut last_q = c.last_q;
        // Without a control block the guest cannot have unmasked anything: the event stays
        // pending, unlinked.
        if let Some((cbp, cboff)) = &cb {
            if !word_test(&*page, off, MASKED) && !word_test_and_set(&*page, off, LINKED) {
                // If the port was the tail of its previous queue, that queue is empty now.
                let (ov, op) = c.last_q;
                if let Some(t) = fifo
                    .vcpus
                    .get_mut(ov as usize)
                    .and_then(|q| q.tail.get_mut(usize::from(op)))
                {
                    if *t == port {
                        *t = 0;
                    }
                }
                last_q = (v.get(), prio as u8);
                linked = false;
                let tail = fifo.vcpus[v.idx()].tail[prio];
                if tail != 0 {
                    if let Some((tp, toff)) = fifo.word(tail) {
                        linked = set_link(&*tp, toff, port);
                    }
                }
                if !linked {
                    cbp.store_u32(cboff + CB_HEAD + 4 * prio, port, Ordering::SeqCst);
                }
                fifo.vcpus[v.idx()].tail[prio] = port;
            }
            if !linked && !test_and_set_bit(&**cbp, *cboff, prio) {
                self.mark_events_pending(v);
            }
        }
        if let Some(c) = t.get_mut(port) {
            c.last_q = last_q;
        }
        if !was_pending {
            self.check_pollers(t, port);
        }
    }

    /// `evtchn_fifo_unmask`: clear MASKED; relink if pending.
    pub(crate) fn fifo_unmask(&self, t: &mut EvtchnTable, port: u32) {
        let Some(c) = t.get(port).copied() else {
            return;
        };
        let Some((page, off)) = t.fifo.as_ref().and_then(|f| f.word(port)) else {
            return;
        };
        word_clear(&*page, off, MASKED);
        if word_test(&*page, off, PENDING) {
            self.fifo_set_pending(t, port, c.vcpu);
        }
    }

    /// `evtchn_fifo_init_control`. Returns `EVTCHN_FIFO_LINK_BITS` for the guest's copy.
    pub(crate) fn init_control(&self, gfn: u64, offset: u32, vcpu: u32) -> Result<u8, Errno> {
        let v = self.vcpu(vcpu).ok_or(Errno::ENOENT)?;
        if offset > (abi::PAGE_SIZE - evtchnop::FIFO_CONTROL_BLOCK_LEN) as u32 || offset & 7 != 0 {
            return Err(Errno::EINVAL);
        }
        let mut t = self.evtchn.lock();
        if t.fifo.is_none() {
            // Latched before the switch changes the limit.
            let prev = self.max_evtchns();
            t.fifo = Some(Fifo::new(self.cfg.vcpus as usize));
            if let Err(e) = self.map_control_block(&mut t, v.idx(), gfn, offset) {
                // evtchn_fifo_destroy: back to 2-level, nothing half set up.
                t.fifo = None;
                return Err(e);
            }
            self.fifo_setup_ports(&mut t, prev);
        } else {
            self.map_control_block(&mut t, v.idx(), gfn, offset)?;
        }
        Ok(evtchnop::FIFO_LINK_BITS)
    }

    pub(crate) fn map_control_block(
        &self,
        t: &mut EvtchnTable,
        v: usize,
        gfn: u64,
        offset: u32,
    ) -> Result<(), Errno> {
        let fifo = t.fifo.as_mut().ok_or(Errno::EINVAL)?;
        if fifo.vcpus[v].cb.is_some() {
            return Err(Errno::EINVAL);
        }
        let page = self.map_ram_page(gfn)?;
        fifo.vcpus[v].cb = Some((page, offset as usize));
        fifo.vcpus[v].cb_gpa = (gfn << 12) | u64::from(offset);
        Ok(())
    }

    /// `map_guest_page`: a writable RAM page of the guest, `-EINVAL` otherwise.
    pub(crate) fn map_ram_page(&self, gfn: u64) -> Result<Arc<dyn SharedPage>, Errno> {
        let gfn = Gfn::new(gfn).ok_or(Errno::EINVAL)?;
        if !self.is_ram(gfn) {
            return Err(Errno::EINVAL);
        }
        self.platform.map_guest_page(gfn).map_err(|_| Errno::EINVAL)
    }

    /// `setup_ports`: ports bound under 2-level keep their pending state and get the default
    /// priority.
    fn fifo_setup_ports(&self, t: &mut EvtchnTable, prev: u32) {
        for port in 1..prev.min(t.valid_ports()) {
            let pending = self.l2_pending(port);
            if let Some(c) = t.get_mut(port) {
                c.fifo_pending |= pending;
                c.priority = PRIORITY_DEFAULT;
            }
        }
    }

    /// `evtchn_fifo_expand_array`: add the next event array page.
    pub(crate) fn expand_array(&self, gfn: u64) -> Result<(), Errno> {
        let mut t = self.evtchn.lock();
        let fifo = t.fifo.as_mut().ok_or(Errno::EOPNOTSUPP)?;
        if fifo.pages.len() >= MAX_ARRAY_PAGES {
            return Err(Errno::ENOSPC);
        }
        let page = self.map_ram_page(gfn)?;
        let start = fifo.num_evtchns();
        fifo.pages.push(page);
        fifo.page_gfns.push(gfn);
        let end = fifo.num_evtchns().min(t.valid_ports());
        // Re-raise events that were pending while this page was missing.
        for port in start..end {
            let Some(c) = t.get_mut(port) else { break };
            if c.fifo_pending {
                c.fifo_pending = false;
                let vcpu = c.vcpu;
                self.fifo_set_pending(&mut t, port, vcpu);
            }
        }
        Ok(())
    }

    /// `evtchn_set_priority`.
    pub(crate) fn set_priority(&self, port: u32, priority: u32) -> Result<(), Errno> {
        let mut t = self.evtchn.lock();
        t.get(port).ok_or(Errno::EINVAL)?;
        if t.fifo.is_none() {
            return Err(Errno::ENOSYS);
        }
        if priority > PRIORITY_MIN {
            return Err(Errno::EINVAL);
        }
        if let Some(c) = t.get_mut(port) {
            // Only future events use the new queue.
            c.priority = priority as u8;
        }
        Ok(())
    }

    /// Whether the domain uses the FIFO ABI.
    pub fn evtchn_fifo_active(&self) -> bool {
        self.evtchn.lock().fifo.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::VecPage;

    #[test]
    fn set_link_unlinked_word_refused_and_untouched() {
        let p = VecPage::new();
        p.store_u32(12, 1 << PENDING, Ordering::SeqCst);
        assert!(!set_link(&p, 12, 77));
        assert_eq!(p.load_u32(12, Ordering::SeqCst), 1 << PENDING);
    }

    #[test]
    fn set_link_linked_word_replaces_link_clears_busy_keeps_flags_and_neighbour() {
        let p = VecPage::new();
        p.store_u32(8, 0xdead_beef, Ordering::SeqCst);
        p.store_u32(
            12,
            (1 << LINKED) | (1 << MASKED) | (1 << BUSY) | 5,
            Ordering::SeqCst,
        );
        assert!(set_link(&p, 12, 0x1_2345));
        assert_eq!(
            p.load_u32(12, Ordering::SeqCst),
            (1 << LINKED) | (1 << MASKED) | 0x1_2345
        );
        assert_eq!(p.load_u32(8, Ordering::SeqCst), 0xdead_beef);
    }

    #[test]
    fn word_bits_low_half_independent_of_high_half() {
        let p = VecPage::new();
        assert!(!word_test_and_set(&p, 16, PENDING));
        assert!(word_test_and_set(&p, 16, PENDING));
        assert!(!word_test(&p, 20, PENDING));
        word_clear(&p, 16, PENDING);
        assert_eq!(p.load_u64(16, Ordering::SeqCst), 0);
    }

    #[test]
    fn fifo_word_beyond_array_none() {
        let mut f = Fifo::new(1);
        assert!(f.word(0).is_none());
        f.pages.push(Arc::new(VecPage::new()));
        assert_eq!(f.word(1023).map(|w| w.1), Some(4092));
        assert!(f.word(1024).is_none());
        assert_eq!(MAX_ARRAY_PAGES, 128);
    }
}
