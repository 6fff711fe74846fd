//! Persistently mapped grants (blkif.h's `feature-persistent`), used by a
//! queue when the disk offers them (`persistent-grants` in its spec) and
//! the frontend writes `feature-persistent = 1`.
//!
//! The protocol (xen/include/public/io/blkif.h): the frontend reuses the
//! same set of grants for all its I/O and lets the backend map every one
//! writable (even for writes, note 8), so the backend maps each grant once
//! and keeps it mapped instead of unmapping it after each request. How many
//! it keeps is up to the backend; beyond that it falls back to mapping per
//! request and should drop the least recently used ones (blkif.h asks for
//! an LRU). Linux's blkback keeps up to `max_persistent_grants` (1056 by
//! default) per ring, maps the rest per request, and every 100 ms, when it
//! had to do that, unmaps the excess plus 5% of its least recently used
//! grants so that the frontend's current ones can become persistent. This
//! table does the same (the purge runs between batches, when no I/O is in
//! flight).
//!
//! A grant the frontend made read-only cannot be mapped writable: such a
//! segment is mapped per request with the access the request needs (Linux's
//! blkback fails the request instead).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hypercalls::{Domain, GrantMapping};

/// Linux blkback's default `max_persistent_grants` per ring.
pub const MAX_PERSISTENT_GRANTS: usize = 1056;
/// How often an overflowing table is purged (Linux's `LRU_INTERVAL`).
const PURGE_INTERVAL: Duration = Duration::from_millis(100);
/// Share of the table dropped by a purge, beyond the excess (Linux's
/// `LRU_PERCENT_CLEAN`).
const PURGE_PERCENT: usize = 5;

/// One queue's persistently mapped grants.
#[derive(Debug)]
pub struct PersistentGrants {
    /// gref -> (mapping, last batch that used it).
    grants: HashMap<u32, (GrantMapping, u64)>,
    max: usize,
    /// The current batch (for the LRU order).
    tick: u64,
    /// A grant could not be kept since the last purge.
    overflow: bool,
    last_purge: Instant,
}

impl PersistentGrants {
    /// A table that keeps up to `max` grants mapped.
    pub fn new(max: usize) -> PersistentGrants {
        PersistentGrants {
            grants: HashMap::with_capacity(max.min(MAX_PERSISTENT_GRANTS)),
            max,
            tick: 0,
            overflow: false,
            last_purge: Instant::now(),
        }
    }

    /// Grants mapped now.
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    /// None mapped.
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// Starts a new batch (LRU clock).
    pub fn tick(&mut self) {
        self.tick = self.tick.wrapping_add(1);
    }

    /// The guest frame of `gref`, mapping it (writable) and keeping it when
    /// there is room. `None`: not kept (table full, or the grant cannot be
    /// mapped writable): map it per request.
    pub fn get(&mut self, domain: &Domain, domid: u16, gref: u32) -> Option<u64> {
        if let Some((m, used)) = self.grants.get_mut(&gref) {
            *used = self.tick;
            return Some(m.gfn.gpa());
        }
        if self.grants.len() >= self.max {
            self.overflow = true;
            return None;
        }
        let m = domain.grant_map(gref, domid, false).ok()?;
        self.grants.insert(gref, (m, self.tick));
        Some(m.gfn.gpa())
    }

    /// Between batches (nothing in flight): if grants had to be mapped per
    /// request and the last purge is `PURGE_INTERVAL` ago, unmaps the
    /// excess plus `PURGE_PERCENT`% of the table, least recently used
    /// first. Returns how many were unmapped.
    pub fn purge(&mut self, domain: &Domain) -> usize {
        if !self.overflow || self.last_purge.elapsed() < PURGE_INTERVAL {
            return 0;
        }
        self.overflow = false;
        self.last_purge = Instant::now();
        let n = (self.grants.len().saturating_sub(self.max) + self.max * PURGE_PERCENT / 100)
            .max(1)
            .min(self.grants.len());
        let mut by_age: Vec<(u64, u32)> = self.grants.iter().map(|(&g, &(_, t))| (t, g)).collect();
        by_age.sort_unstable();
        let handles: Vec<u32> = by_age[..n]
            .iter()
            .filter_map(|&(_, g)| self.grants.remove(&g).map(|(m, _)| m.handle))
            .collect();
        domain.grant_unmap_batch(handles);
        n
    }

    /// Unmaps every grant (disconnect).
    pub fn release(&mut self, domain: &Domain) {
        domain.grant_unmap_batch(self.grants.drain().map(|(_, (m, _))| m.handle));
    }
}
