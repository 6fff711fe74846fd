//! One guest's xenstore connection: the byte streams over the shared ring
//! (`xenstore_domain_interface`), the partially received request, the
//! queue of replies and watch events waiting for ring space, the
//! connection's watches and its open transactions.
//!
//! The ring indexes are written by the guest, so every read of them is
//! checked: a producer more than a ring ahead of the consumer or a header
//! announcing more than `XENSTORE_PAYLOAD_MAX` bytes breaks the connection
//! (the error indicator at offset 2072 says why, as xenstored does) instead
//! of being followed.

use std::collections::{BTreeMap, VecDeque};

use super::path::is_child;
use super::ring::{ring_read, ring_write, RingPage};
use super::store::{Event, Store};
use super::wire::{Header, HEADER_LEN, PAYLOAD_MAX};
use super::RateLimiter;

/// Layout of `struct xenstore_domain_interface`.
pub mod layout {
    /// Size of each of the request and response buffers.
    pub const RING_SIZE: usize = 1024;
    /// `req[]`: requests from the guest.
    pub const REQ: usize = 0;
    /// `rsp[]`: replies and watch events to the guest.
    pub const RSP: usize = 1024;
    /// `req_cons` (server-owned).
    pub const REQ_CONS: usize = 2048;
    /// `req_prod` (guest-owned).
    pub const REQ_PROD: usize = 2052;
    /// `rsp_cons` (guest-owned).
    pub const RSP_CONS: usize = 2056;
    /// `rsp_prod` (server-owned).
    pub const RSP_PROD: usize = 2060;
    /// `server_features`.
    pub const SERVER_FEATURES: usize = 2064;
    /// `connection`.
    pub const CONNECTION: usize = 2068;
    /// `error` (connection error indicator).
    pub const ERROR: usize = 2072;
    /// `XENSTORE_SERVER_FEATURE_RECONNECTION`.
    pub const FEATURE_RECONNECTION: u32 = 1;
    /// `XENSTORE_SERVER_FEATURE_ERROR`.
    pub const FEATURE_ERROR: u32 = 2;
    /// `XENSTORE_CONNECTED`.
    pub const CONNECTED: u32 = 0;
    /// `XENSTORE_RECONNECT`: the guest asks for a ring reset.
    pub const RECONNECT: u32 = 1;
}

use layout::*;

/// Why the server stopped talking to a guest (the value written to the
/// ring's error indicator, `XENSTORE_ERROR_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ConnError {
    /// Communication problem (event channel not functional).
    Comm = 1,
    /// Inconsistent producer or consumer index.
    Ring = 2,
    /// Protocol violation (a payload longer than allowed).
    Proto = 3,
}

/// A complete request read from the ring.
#[derive(Debug)]
pub struct Request {
    /// The header.
    pub hdr: Header,
    /// The payload (`hdr.len` bytes).
    pub payload: Vec<u8>,
}

/// A registered watch.
#[derive(Clone, Debug)]
pub struct Watch {
    /// The path as registered (relative, absolute or `@special`).
    pub spec: String,
    /// The canonical absolute path, or the `@special` name.
    pub abs: String,
    /// The client's token.
    pub token: Vec<u8>,
    /// For a relative watch, the prefix (`/local/domain/<id>/`) stripped
    /// from event paths.
    pub rel_base: Option<String>,
}

impl Watch {
    /// The path to report for `ev`, if `ev` concerns this watch: the event
    /// path when it lies at or below the watch, the watch's own path when an
    /// ancestor of it was removed. Special events match only the same name.
    pub fn matches(&self, ev: &Event) -> Option<String> {
        let evp: &str = &ev.path;
        let special = evp.starts_with('@');
        if special || self.abs.starts_with('@') {
            return (special && evp == self.abs).then(|| self.spec.clone());
        }
        let p = if is_child(evp, &self.abs) {
            evp
        } else if ev.removed && is_child(&self.abs, evp) {
            return Some(self.spec.clone());
        } else {
            return None;
        };
        Some(match &self.rel_base {
            Some(base) => p.strip_prefix(base.as_str()).unwrap_or(p).to_owned(),
            None => p.to_owned(),
        })
    }
}

/// An open transaction: a private copy of the store and the events its
/// changes fire when it commits.
#[derive(Debug)]
pub struct Tx {
    /// The transaction's copy of the store.
    pub store: Store,
    /// Events to fire at commit.
    pub events: Vec<Event>,
    /// Reopened by a restore (its contents did not travel): it reads and
    /// writes like any, and its commit fails with `EAGAIN`.
    pub stale: bool,
}

/// A guest connection.
#[derive(Debug)]
pub struct Conn {
    /// The guest's domain id.
    pub domid: u16,
    /// `Some` once the connection is broken.
    pub error: Option<ConnError>,
    /// Bytes of the request being received (header, then payload).
    inbuf: Vec<u8>,
    /// Messages waiting for ring space; the first may be partly sent.
    out: VecDeque<Vec<u8>>,
    out_off: usize,
    out_bytes: usize,
    /// Watches, in registration order.
    pub watches: Vec<Watch>,
    /// Open transactions by id.
    pub txs: BTreeMap<u32, Tx>,
    /// Events dropped because the output queue was over its limit.
    pub dropped_events: u64,
    /// The last `process` call stopped at its request limit with requests
    /// possibly left in the ring.
    pub more: bool,
    warn: RateLimiter,
}

impl Conn {
    /// A fresh connection for `domid`.
    pub fn new(domid: u16) -> Self {
        Conn {
            domid,
            error: None,
            inbuf: Vec::new(),
            out: VecDeque::new(),
            out_off: 0,
            out_bytes: 0,
            watches: Vec::new(),
            txs: BTreeMap::new(),
            dropped_events: 0,
            more: false,
            warn: RateLimiter::default(),
        }
    }

    /// Whether messages are queued for the ring.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Queues a reply (never dropped: replies are bounded by the requests
    /// the server accepts, and it accepts none while output is pending).
    pub fn push_reply(&mut self, msg: Vec<u8>) {
        self.out_bytes += msg.len();
        self.out.push_back(msg);
    }

    /// Queues a watch event unless that would take the queue over `limit`
    /// bytes (a guest that does not read its ring loses events, as with
    /// xenstored's event quota).
    pub fn push_event(&mut self, msg: Vec<u8>, limit: usize) -> bool {
        if self.out_bytes.saturating_add(msg.len()) > limit {
            self.dropped_events += 1;
            if let Some(suppressed) = self.warn.allow() {
                tracing::warn!(
                    domid = self.domid,
                    suppressed,
                    "xenstore: guest not reading its ring, watch event dropped"
                );
            }
            return false;
        }
        self.push_reply(msg);
        true
    }

    /// Forgets watches, transactions and buffered bytes.
    pub fn reset(&mut self) {
        self.inbuf.clear();
        self.out.clear();
        self.out_off = 0;
        self.out_bytes = 0;
        self.watches.clear();
        self.txs.clear();
    }

    /// Breaks the connection: drops its state and tells the guest why.
    pub fn fail(&mut self, page: &dyn RingPage, e: ConnError) {
        if let Some(suppressed) = self.warn.allow() {
            tracing::error!(
                domid = self.domid,
                error = ?e,
                suppressed,
                "xenstore: guest broke the ring protocol; connection closed"
            );
        }
        self.reset();
        self.error = Some(e);
        page.store_u32(ERROR, e as u32);
    }

    /// Handles a guest's reconnect request: empties both rings, forgets all
    /// state and marks the ring connected again.
    pub fn reconnect(&mut self, page: &dyn RingPage) {
        if let Some(suppressed) = self.warn.allow() {
            tracing::info!(
                domid = self.domid,
                suppressed,
                "xenstore: guest reset its ring"
            );
        }
        self.reset();
        self.error = None;
        page.store_u32(REQ_CONS, page.load_u32(REQ_PROD));
        page.store_u32(RSP_PROD, page.load_u32(RSP_CONS));
        page.store_u32(ERROR, 0);
        page.store_u32(CONNECTION, CONNECTED);
    }

    /// Moves queued output into the response ring, as much as fits.
    /// Returns whether anything was written.
    pub fn flush(&mut self, page: &dyn RingPage) -> Result<bool, ConnError> {
        if self.out.is_empty() {
            return Ok(false);
        }
        let cons = page.load_u32(RSP_CONS);
        let mut prod = page.load_u32(RSP_PROD);
        let used = prod.wrapping_sub(cons) as usize;
        if used > RING_SIZE {
            return Err(ConnError::Ring);
        }
        let mut space = RING_SIZE - used;
        let mut wrote = false;
        while space > 0 {
            let Some(front) = self.out.front() else { break };
            let rest = &front[self.out_off..];
            let n = rest.len().min(space);
            ring_write(page, RSP, RING_SIZE, prod, &rest[..n]);
            prod = prod.wrapping_add(n as u32);
            space -= n;
            self.out_off += n;
            self.out_bytes -= n;
            wrote = true;
            if self.out_off == front.len() {
                self.out.pop_front();
                self.out_off = 0;
            }
        }
        if wrote {
            page.store_u32(RSP_PROD, prod);
        }
        Ok(wrote)
    }

    /// Reads request bytes until one message is complete or the ring is
    /// empty. Returns whether bytes were consumed (the guest may wait for
    /// space) and the message, if complete.
    pub fn read_request(
        &mut self,
        page: &dyn RingPage,
    ) -> Result<(bool, Option<Request>), ConnError> {
        let prod = page.load_u32(REQ_PROD);
        let mut cons = page.load_u32(REQ_CONS);
        let avail = prod.wrapping_sub(cons) as usize;
        if avail > RING_SIZE {
            return Err(ConnError::Ring);
        }
        let mut avail = avail;
        let mut consumed = false;
        let done = loop {
            let want = match self.header() {
                None => HEADER_LEN,
                Some(h) => HEADER_LEN + h.len as usize,
            };
            let need = want - self.inbuf.len();
            if need == 0 {
                break true;
            }
            if avail == 0 {
                // Publish what was consumed, then look at `req_prod` again.
                // The guest bumps `req_prod` and then notifies only if
                // `req_cons` had caught up with its old `req_prod` (Linux's
                // `xb_write`): bytes it wrote after our load of `req_prod`
                // but before it saw our `req_cons` come with no
                // notification, so they must be seen here (the final check
                // of ring.h's RING_FINAL_CHECK_FOR_REQUESTS).
                if consumed {
                    page.store_u32(REQ_CONS, cons);
                }
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                let more = page.load_u32(REQ_PROD).wrapping_sub(cons) as usize;
                if more == 0 {
                    break false;
                }
                if more > RING_SIZE {
                    return Err(ConnError::Ring);
                }
                avail = more;
                continue;
            }
            let n = need.min(avail);
            let start = self.inbuf.len();
            self.inbuf.resize(start + n, 0);
            ring_read(page, REQ, RING_SIZE, cons, &mut self.inbuf[start..]);
            cons = cons.wrapping_add(n as u32);
            avail -= n;
            consumed = true;
            if let Some(h) = self.header() {
                if h.len as usize > PAYLOAD_MAX {
                    return Err(ConnError::Proto);
                }
            }
        };
        if consumed {
            page.store_u32(REQ_CONS, cons);
        }
        if !done {
            return Ok((consumed, None));
        }
        let Some(hdr) = self.header() else {
            return Ok((consumed, None));
        };
        let mut msg = std::mem::take(&mut self.inbuf);
        let payload = msg.split_off(HEADER_LEN);
        Ok((consumed, Some(Request { hdr, payload })))
    }

    fn header(&self) -> Option<Header> {
        let h: &[u8; HEADER_LEN] = self.inbuf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Header::parse(h))
    }
}

#[cfg(test)]
mod tests {
    use super::super::perms::{PermKind, Perms};
    use super::*;
    use std::sync::Arc;

    fn ev(path: &str, removed: bool) -> Event {
        Event {
            path: Arc::from(path),
            removed,
            perms: Perms::new(0, PermKind::None),
        }
    }

    fn watch(spec: &str, abs: &str, rel: bool) -> Watch {
        Watch {
            spec: spec.into(),
            abs: abs.into(),
            token: b"t".to_vec(),
            rel_base: rel.then(|| "/local/domain/3/".to_string()),
        }
    }

    #[test]
    fn watch_child_change_reports_event_path() {
        let w = watch("/a", "/a", false);
        assert_eq!(w.matches(&ev("/a/b/c", false)).as_deref(), Some("/a/b/c"));
        assert_eq!(w.matches(&ev("/a", false)).as_deref(), Some("/a"));
        assert_eq!(w.matches(&ev("/ab", false)), None);
        assert_eq!(w.matches(&ev("/", false)), None);
    }

    #[test]
    fn watch_ancestor_removed_reports_watch_path() {
        let w = watch("control/shutdown", "/local/domain/3/control/shutdown", true);
        assert_eq!(
            w.matches(&ev("/local/domain/3/control", true)).as_deref(),
            Some("control/shutdown")
        );
        assert_eq!(w.matches(&ev("/local/domain/3/control", false)), None);
    }

    #[test]
    fn watch_relative_strips_domain_base() {
        let w = watch("device", "/local/domain/3/device", true);
        assert_eq!(
            w.matches(&ev("/local/domain/3/device/vbd/768", false))
                .as_deref(),
            Some("device/vbd/768")
        );
    }

    #[test]
    fn watch_special_matches_only_same_name() {
        let w = watch("@releaseDomain", "@releaseDomain", false);
        assert!(w.matches(&ev("@releaseDomain", false)).is_some());
        assert!(w.matches(&ev("@introduceDomain", false)).is_none());
        assert!(w.matches(&ev("/local", false)).is_none());
        let root = watch("/", "/", false);
        assert!(root.matches(&ev("@releaseDomain", false)).is_none());
    }
}
