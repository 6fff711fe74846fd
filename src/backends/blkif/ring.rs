//! The shared ring of `io/ring.h` as a block backend sees it: the header
//! (`req_prod @0, req_event @4, rsp_prod @8, rsp_event @12`, entries from
//! offset 64), the entry count (rounded down to a power of two), the
//! backend's private indexes (`BACK_RING_INIT`), and the index arithmetic of
//! `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`, `RING_FINAL_CHECK_FOR_REQUESTS`
//! and the overflow checks.
//!
//! The frontend initialises the header (`SHARED_RING_INIT`); the backend
//! never does (it would lose queued requests). Every index read from the
//! ring is guest-controlled: a producer more than a ring ahead of the
//! backend's responses is a broken frontend ([`RingError::Overflow`]), which
//! the caller answers by refusing the device, not by spinning.

use std::sync::atomic::{fence, Ordering};

/// Offset of `req_prod`.
pub const REQ_PROD: usize = 0;
/// Offset of `req_event`.
pub const REQ_EVENT: usize = 4;
/// Offset of `rsp_prod`.
pub const RSP_PROD: usize = 8;
/// Offset of `rsp_event`.
pub const RSP_EVENT: usize = 12;
/// Where the entries start (after `pvt` and `__pad`).
pub const ENTRIES: usize = 64;
/// A Xen page.
pub const PAGE: usize = 4096;

/// The memory of a shared ring (one or more pages, seen contiguously).
/// Implemented over guest memory by the engine and over a buffer in tests.
pub trait RingMem {
    /// Size in bytes.
    fn len(&self) -> usize;
    /// Whether it is empty (never, for a mapped ring).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Loads the `u32` at `off` (4-aligned) with `Acquire` ordering.
    fn load_u32(&self, off: usize) -> u32;
    /// Stores `v` at `off` (4-aligned) with `Release` ordering.
    fn store_u32(&self, off: usize, v: u32);
    /// Copies bytes out of the ring (zeros where it cannot).
    fn read(&self, off: usize, buf: &mut [u8]);
    /// Copies bytes into the ring.
    fn write(&self, off: usize, data: &[u8]);
}

/// A ring over a plain buffer (tests, benches, the proptests).
#[derive(Debug)]
pub struct VecRing(pub parking_lot::Mutex<Vec<u8>>);

impl VecRing {
    /// A zeroed ring of `pages` pages.
    pub fn new(pages: usize) -> Self {
        VecRing(parking_lot::Mutex::new(vec![0; pages * PAGE]))
    }
}

impl RingMem for VecRing {
    fn len(&self) -> usize {
        self.0.lock().len()
    }
    fn load_u32(&self, off: usize) -> u32 {
        let b = self.0.lock();
        b.get(off..off + 4)
            .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn store_u32(&self, off: usize, v: u32) {
        if let Some(s) = self.0.lock().get_mut(off..off + 4) {
            s.copy_from_slice(&v.to_le_bytes());
        }
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        let b = self.0.lock();
        match off.checked_add(buf.len()).and_then(|e| b.get(off..e)) {
            Some(s) => buf.copy_from_slice(s),
            None => buf.fill(0),
        }
    }
    fn write(&self, off: usize, data: &[u8]) {
        let mut b = self.0.lock();
        if let Some(s) = off.checked_add(data.len()).and_then(|e| b.get_mut(off..e)) {
            s.copy_from_slice(data);
        }
    }
}

/// Entries of a ring of `bytes` bytes whose slots are `slot` bytes
/// (`__RING_SIZE`: what fits after the header, rounded down to a power of
/// two). 0 if nothing fits.
pub fn ring_entries(bytes: usize, slot: usize) -> u32 {
    if slot == 0 || bytes <= ENTRIES {
        return 0;
    }
    let n = (bytes - ENTRIES) / slot;
    if n == 0 {
        return 0;
    }
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    u32::try_from(p).unwrap_or(1 << 31)
}

/// The ring indexes are inconsistent: the device must be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `req_prod` is more than a ring ahead of the responses.
    #[error(
        "req_prod {req_prod} is more than {size} entries ahead of rsp_prod_pvt {rsp_prod_pvt}"
    )]
    Overflow {
        req_prod: u32,
        rsp_prod_pvt: u32,
        size: u32,
    },
}

/// The backend's private view (`struct blkif_back_ring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackRing {
    /// Next request to consume.
    pub req_cons: u32,
    /// Responses produced but perhaps not yet pushed.
    pub rsp_prod_pvt: u32,
    /// Entries (a power of two).
    pub size: u32,
    /// Slot size in bytes.
    pub slot: usize,
}

impl BackRing {
    /// `BACK_RING_INIT` (or `BACK_RING_ATTACH` at `start`) for a ring of
    /// `bytes` bytes with `slot`-byte entries; `None` if no entry fits.
    pub fn new(bytes: usize, slot: usize, start: u32) -> Option<Self> {
        let size = ring_entries(bytes, slot);
        (size > 0).then_some(BackRing {
            req_cons: start,
            rsp_prod_pvt: start,
            size,
            slot,
        })
    }

    /// Byte offset of entry `idx` (free-running) in the ring.
    pub fn slot_offset(&self, idx: u32) -> usize {
        ENTRIES + (idx & (self.size - 1)) as usize * self.slot
    }

    /// Requests ready to consume given the frontend's `req_prod`, checked
    /// as `RING_REQUEST_PROD_OVERFLOW` does: the producer may not be more
    /// than a ring ahead of the responses already produced.
    pub fn unconsumed(&self, req_prod: u32) -> Result<u32, RingError> {
        let ahead = req_prod.wrapping_sub(self.rsp_prod_pvt);
        // Also refused: a producer that went back behind what was consumed.
        if ahead > self.size || ahead < self.req_cons.wrapping_sub(self.rsp_prod_pvt) {
            return Err(RingError::Overflow {
                req_prod,
                rsp_prod_pvt: self.rsp_prod_pvt,
                size: self.size,
            });
        }
        // Consistent with the check above: req_cons is between rsp_prod_pvt
        // and req_prod (we only advance it up to a checked req_prod).
        Ok(req_prod.wrapping_sub(self.req_cons))
    }

    /// Copies out up to `max` waiting requests (each read once, into
    /// private memory) as long as each will have a response slot. The
    /// producer index is read once; an inconsistent one is an error and
    /// nothing is consumed.
    pub fn take_requests(
        &mut self,
        ring: &dyn RingMem,
        max: usize,
        out: &mut Vec<[u8; 112]>,
    ) -> Result<usize, RingError> {
        let first = out.len();
        out.resize(first + max, [0; 112]);
        let r = self.take_requests_into(ring, &mut out[first..]);
        out.truncate(first + *r.as_ref().unwrap_or(&0));
        r
    }

    /// [`take_requests`](Self::take_requests) into the first entries of
    /// `out` (at most `out.len()`; the first slot-size bytes of each are
    /// written): a caller that keeps its entries from batch to batch
    /// neither clears nor zeroes them per request. The requests are copied
    /// straight into place (a copy through a local array made the wide
    /// loads of the move after it stall on the word stores of the copy).
    pub fn take_requests_into(
        &mut self,
        ring: &dyn RingMem,
        out: &mut [[u8; 112]],
    ) -> Result<usize, RingError> {
        let prod = ring.load_u32(REQ_PROD);
        let n = self.unconsumed(prod)?;
        let slot = self.slot.min(112);
        let mut taken = 0usize;
        for b in out.iter_mut() {
            if (taken as u32) >= n || !self.can_consume() {
                break;
            }
            self.copy_request(ring, &mut b[..slot]);
            taken += 1;
        }
        Ok(taken)
    }

    /// Room for another response (`RING_REQUEST_CONS_OVERFLOW` false):
    /// never more responses outstanding than the ring holds.
    pub fn can_consume(&self) -> bool {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt) < self.size
    }

    /// Copies request `req_cons` out of the ring (`RING_COPY_REQUEST`)
    /// into `buf` (the slot size) and advances `req_cons`.
    pub fn copy_request(&mut self, ring: &dyn RingMem, buf: &mut [u8]) {
        let off = self.slot_offset(self.req_cons);
        let n = buf.len().min(self.slot);
        ring.read(off, &mut buf[..n]);
        self.req_cons = self.req_cons.wrapping_add(1);
    }

    /// Writes the next response (`RING_GET_RESPONSE` at `rsp_prod_pvt`, the
    /// whole slot written so padding is zero) and advances `rsp_prod_pvt`.
    pub fn put_response(&mut self, ring: &dyn RingMem, rsp: &[u8]) {
        let off = self.slot_offset(self.rsp_prod_pvt);
        ring.write(off, rsp);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publish `rsp_prod` and say
    /// whether the frontend asked to be notified of it.
    pub fn push_responses(&self, ring: &dyn RingMem) -> bool {
        let old = ring.load_u32(RSP_PROD);
        let new = self.rsp_prod_pvt;
        // The responses are written before rsp_prod (Release in store_u32).
        ring.store_u32(RSP_PROD, new);
        fence(Ordering::SeqCst);
        let event = ring.load_u32(RSP_EVENT);
        push_notify(old, new, event)
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: true if requests are waiting;
    /// otherwise ask to be notified of the next one (`req_event`) and
    /// check again.
    pub fn final_check(&self, ring: &dyn RingMem) -> bool {
        if ring.load_u32(REQ_PROD) != self.req_cons {
            return true;
        }
        ring.store_u32(REQ_EVENT, self.req_cons.wrapping_add(1));
        fence(Ordering::SeqCst);
        ring.load_u32(REQ_PROD) != self.req_cons
    }
}

/// The notify test of `RING_PUSH_*_AND_CHECK_NOTIFY`: the event index lies
/// in `(old, new]`.
pub fn push_notify(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_entries_rounds_down_to_power_of_two() {
        assert_eq!(ring_entries(PAGE, 112), 32);
        assert_eq!(ring_entries(PAGE, 108), 32);
        assert_eq!(ring_entries(16 * PAGE, 112), 512);
        assert_eq!(ring_entries(2 * PAGE, 112), 64);
        assert_eq!(ring_entries(64, 112), 0);
        assert_eq!(ring_entries(PAGE, 0), 0);
    }

    #[test]
    fn unconsumed_producer_beyond_ring_is_overflow() {
        let r = BackRing::new(PAGE, 112, 0).unwrap();
        assert_eq!(r.unconsumed(32), Ok(32));
        assert!(r.unconsumed(33).is_err());
        assert!(r.unconsumed(u32::MAX).is_err());
        let mut c = r;
        c.req_cons = 10;
        assert!(c.unconsumed(5).is_err(), "producer moved back");
        let w = BackRing::new(PAGE, 112, u32::MAX - 3).unwrap();
        assert_eq!(w.unconsumed(5), Ok(9), "indexes wrap");
    }

    #[test]
    fn push_notify_only_when_event_in_range() {
        assert!(push_notify(0, 1, 1));
        assert!(!push_notify(1, 2, 1));
        assert!(push_notify(u32::MAX, 1, 0));
        assert!(!push_notify(5, 5, 5));
    }
}
