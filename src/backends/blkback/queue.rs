//! One blkif ring (a queue) being served: the frontend's ring grants mapped
//! and seen contiguously through a gpc cache (so 108/112-byte entries that
//! straddle pages of a multi-page ring are whole), its event channel bound
//! to a dom0 port, and the request loop.
//!
//! For each request: copy it out of the ring once, parse and check it
//! (`blkif::parse_request`), pin each granted segment
//! (`Domain::grant_pin_batch`: the status bits a mapping sets, without a
//! handle; writable only for reads into the guest; the reads and writes
//! of a batch are checked first and their grants pinned under one lock,
//! each request's again on its own if one cannot be), hand the host I/O an
//! iovec of the guest frames (`preadv`/`pwritev`, or `readv`/`writev` through
//! io_uring, one submission per batch), unpin every grant, and only then write
//! the response. Reads and writes of consecutive sectors are merged into
//! one host I/O. Responses are pushed per batch and the frontend is
//! notified only when `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY` says so.
//! Bad requests get `BLKIF_RSP_ERROR` (or `EOPNOTSUPP`); bad ring indexes
//! stop this queue with an error the caller logs (the device is refused);
//! nothing here panics on guest input.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use gpc::{Cache, GuestAddress, MemoryMap, Segment as GpaRange};
use hypercalls::{Domain, Gfn, GrantMapping};
use vm_memory::Bytes;

use super::disk::Disk;
use super::persistent::PersistentGrants;
use super::qcow2::{Piece, Qcow2Hold};
use super::BlkError;
use crate::backends::blkif::request::{
    OP_DISCARD, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY, SECTOR, SEGS_PER_INDIRECT_PAGE,
};
use crate::backends::blkif::ring::PAGE;
use crate::backends::blkif::{
    encode_response, parse_indirect_segments, parse_request_reusing, Abi, BackRing, Request,
    RingMem, RwOp, Segment,
};
use crate::backends::xenstore::RateLimiter;

/// Largest `ring-page-order` offered (16 pages, 512 entries).
pub const MAX_RING_ORDER: u32 = 4;
/// Requests copied out per batch.
const BATCH: usize = 32;
/// Batches per `process` call before it returns (the thread calls again).
const MAX_BATCHES: usize = 64;
/// A segment whose grant is mapped for its request only.
const NOT_KEPT: u64 = u64::MAX;

/// What the frontend published for one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingSetup {
    /// `ring-ref` or `ring-ref0..N-1` (N a power of two up to 16).
    pub refs: Vec<u32>,
    /// The frontend's event channel port.
    pub port: u32,
    pub abi: Abi,
}

/// Device parameters a queue needs.
#[derive(Debug, Clone, Copy)]
pub struct QueueParams {
    /// Advertised `feature-max-indirect-segments` (0 refuses indirect).
    pub max_indirect: usize,
    /// Discard offered.
    pub discard: bool,
    /// Which host I/O of a batch is submitted through io_uring (falls back to
    /// `preadv`/`pwritev` where the host has none).
    pub uring: UringUse,
    /// Persistent grants negotiated (`feature-persistent` offered and
    /// written by the frontend): how many to keep mapped (0: none, every
    /// grant is unmapped after its request).
    pub persistent: usize,
}

/// Which reads and writes of a raw disk go through io_uring (one submission
/// per batch) rather than `preadv`/`pwritev` on the queue's thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UringUse {
    /// None.
    Off,
    /// Reads (the default): a page-cache hit is copied inside the
    /// submission, so a batch of reads costs one system call instead of one
    /// each (measured about 10% less CPU per 4 KiB read than `pread`), and
    /// reads that miss the cache run in parallel on io_uring's workers.
    #[default]
    Reads,
    /// Reads and writes (buffered writes mostly go to io_uring's worker
    /// threads: no cheaper than `pwritev`, see the README).
    All,
}

impl UringUse {
    fn covers(self, rw: RwOp) -> bool {
        match rw {
            RwOp::Read => self != UringUse::Off,
            RwOp::Write => self == UringUse::All,
            RwOp::Barrier | RwOp::Flush => false,
        }
    }
}

/// A merged I/O queued on the io_uring, waiting for its completion. Its
/// requests and pinned grants are kept in the queue's flat
/// `inflight_members` and `inflight_pins` (no vectors per group).
struct Inflight {
    /// How many of `inflight_members` are its requests (in queue order).
    members: usize,
    write: bool,
    start: u64,
    end: u64,
    /// Its entries on the ring (a qcow2 group may have several files'
    /// pieces, or none when it all reads as zeros).
    entries: usize,
    /// Bytes it read as zeros (a qcow2 group's unallocated clusters),
    /// written into guest RAM when it was queued.
    zeroed: u64,
}

/// A read or write (or a flush or barrier with data) checked and waiting
/// for its grants: [`Queue::pin_staged`] pins the grants of every staged
/// request under one lock, then joins them to groups in order. Its segments
/// and grants are the next `segs` of `staged_segs` and `staged_gpas` and the
/// next `refs` of `staged_refs`.
#[derive(Debug, Clone, Copy)]
struct Staged {
    id: u64,
    op: u8,
    rw: RwOp,
    sector: u64,
    sectors: u64,
    segs: usize,
    refs: usize,
}

/// A ring over a cache guard (held only while the ring is touched).
struct GuardRing<'a, 'b> {
    g: &'a gpc::Guard<'b>,
    len: usize,
}

impl RingMem for GuardRing<'_, '_> {
    fn len(&self) -> usize {
        self.len
    }
    fn load_u32(&self, off: usize) -> u32 {
        self.g.load_u32(off, Ordering::Acquire).unwrap_or(0)
    }
    fn store_u32(&self, off: usize, v: u32) {
        let _ = self.g.store_u32(off, v, Ordering::Release);
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        if self.g.read(off, buf).is_err() {
            buf.fill(0);
        }
    }
    fn write(&self, off: usize, data: &[u8]) {
        let _ = self.g.write(off, data);
    }
}

/// Counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    pub requests: u64,
    pub errors: u64,
    pub notifications: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Grants kept mapped now (persistent grants).
    pub persistent_grants: u64,
}

/// A connected queue.
pub struct Queue {
    domain: Arc<Domain>,
    domid: u16,
    map: MemoryMap,
    disk: Arc<Disk>,
    params: QueueParams,
    ring_maps: Vec<GrantMapping>,
    cache: Cache,
    ring_len: usize,
    back: BackRing,
    abi: Abi,
    guest_port: u32,
    dom0_port: u32,
    /// The batch's requests, copied out of the ring (`BATCH` entries kept
    /// from batch to batch; the first `taken` are the batch's).
    raw: Vec<[u8; 112]>,
    segs: Vec<Segment>,
    /// The pending group's pinned grants `(gref, readonly)`, given back
    /// (`grant_unpin_batch`) before its requests are answered.
    pins: Vec<(u32, bool)>,
    /// Scratch: the frames of the grants just pinned.
    gfns: Vec<Gfn>,
    /// Scratch: the part of an indirect page in use.
    indirect: Vec<u8>,
    ranges: Vec<GpaRange>,
    /// Requests whose I/O is merged into one (consecutive sectors, same op).
    group: Vec<(u64, u8)>,
    group_rw: RwOp,
    group_start: u64,
    group_next: u64,
    /// Batched host I/O (io_uring), when the host has it and it is wanted.
    uring: Option<gpc::FileRing>,
    /// Groups queued on `uring`, answered by `drain`.
    inflight: Vec<Inflight>,
    /// The requests `(id, operation)` of the groups in `inflight`, in order.
    inflight_members: Vec<(u64, u8)>,
    /// The pinned grants `(gref, readonly)` of the groups in `inflight`.
    inflight_pins: Vec<(u32, bool)>,
    /// How many of the groups in `inflight` write.
    inflight_writes: usize,
    /// A qcow2 disk's mapping held from the first planned group of a batch
    /// until `drain` completes it (no discard frees a cluster under it).
    qcow2_hold: Option<Qcow2Hold>,
    /// Responses pushed that the frontend asked to be notified of.
    notify_pending: bool,
    /// Persistently mapped grants, when negotiated.
    persistent: Option<PersistentGrants>,
    /// Requests checked and waiting for their grants (`pin_staged`).
    staged: Vec<Staged>,
    /// The staged requests' segments, in order.
    staged_segs: Vec<Segment>,
    /// Each staged segment's guest address if its grant is kept mapped
    /// (persistent), else `NOT_KEPT` (pinned per request).
    staged_gpas: Vec<u64>,
    /// The staged grants to pin `(gref, readonly)`, in order.
    staged_refs: Vec<(u32, bool)>,
    /// Scratch: responses of a group.
    done: Vec<(u64, u8, i16)>,
    /// Scratch: the io_uring results of a batch.
    results: Vec<std::io::Result<usize>>,
    warn: RateLimiter,
    stats: QueueStats,
    name: String,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.name)
            .field("ring", &self.back)
            .field("guest_port", &self.guest_port)
            .field("dom0_port", &self.dom0_port)
            .finish()
    }
}

impl Queue {
    /// Maps the ring grants, checks the ring, binds the event channel.
    /// Everything taken is given back if a step fails.
    pub fn connect(
        name: String,
        domain: Arc<Domain>,
        domid: u16,
        map: MemoryMap,
        disk: Arc<Disk>,
        params: QueueParams,
        setup: &RingSetup,
    ) -> Result<Queue, BlkError> {
        let n = setup.refs.len();
        if n == 0 || !n.is_power_of_two() || n > 1 << MAX_RING_ORDER {
            return Err(BlkError::Frontend(format!(
                "{name}: {n} ring pages (1, 2, 4, 8 or 16 allowed)"
            )));
        }
        let mut ring_maps = Vec::with_capacity(n);
        let unmap = |ms: &[GrantMapping]| {
            for m in ms {
                let _ = domain.grant_unmap(m.handle);
            }
        };
        for &gref in &setup.refs {
            match domain.grant_map(gref, domid, false) {
                Ok(m) => ring_maps.push(m),
                Err(e) => {
                    unmap(&ring_maps);
                    return Err(BlkError::Frontend(format!(
                        "{name}: ring page grant {gref} cannot be mapped: {e}"
                    )));
                }
            }
        }
        let pieces: Vec<GpaRange> = ring_maps
            .iter()
            .map(|m| GpaRange::new(GuestAddress(m.gfn.gpa()), PAGE))
            .collect();
        let cache = Cache::new(&map);
        if let Err(e) = cache.activate(&pieces) {
            unmap(&ring_maps);
            return Err(BlkError::Frontend(format!(
                "{name}: ring pages unusable: {e}"
            )));
        }
        let ring_len = n * PAGE;
        let Some(back) = BackRing::new(ring_len, setup.abi.slot(), 0) else {
            unmap(&ring_maps);
            return Err(BlkError::Frontend(format!("{name}: ring too small")));
        };
        let dom0_port = match domain.backend_alloc_unbound(domid) {
            Ok(p) => p,
            Err(e) => {
                unmap(&ring_maps);
                return Err(BlkError::Evtchn(format!("{name}: {e}")));
            }
        };
        if let Err(e) = domain.backend_bind(setup.port, dom0_port) {
            let _ = domain.backend_close(dom0_port);
            unmap(&ring_maps);
            return Err(BlkError::Frontend(format!(
                "{name}: event channel {} cannot be bound: {e}",
                setup.port
            )));
        }
        // io_uring moves data between the file and guest RAM: at the
        // guest's offsets for a raw disk, at the clusters' for a qcow2 one
        // (its file registered at the first batch).
        let uring = if params.uring != UringUse::Off && (disk.file().is_some() || disk.is_qcow2()) {
            match gpc::FileRing::new(&map, 64) {
                Ok(mut r) => {
                    // The disk's file stays open as long as the queue (it
                    // holds the disk).
                    if let Some(Err(e)) = disk.file().map(|f| r.register(f)) {
                        tracing::debug!(queue = %name, %e, "io_uring: file not registered");
                    }
                    Some(r)
                }
                Err(e) => {
                    tracing::info!(queue = %name, %e, "no io_uring: preadv/pwritev on the queue's thread");
                    None
                }
            }
        } else {
            None
        };
        tracing::info!(queue = %name, pages = n, uring = uring.is_some(), persistent = params.persistent, entries = back.size, port = setup.port, dom0_port, abi = ?setup.abi, "blkback queue connected");
        Ok(Queue {
            domain,
            domid,
            map,
            disk,
            params,
            ring_maps,
            cache,
            ring_len,
            back,
            abi: setup.abi,
            guest_port: setup.port,
            dom0_port,
            raw: vec![[0; 112]; BATCH],
            segs: Vec::new(),
            pins: Vec::new(),
            gfns: Vec::new(),
            indirect: vec![0; PAGE],
            ranges: Vec::new(),
            group: Vec::new(),
            group_rw: RwOp::Read,
            group_start: 0,
            group_next: 0,
            uring,
            inflight: Vec::new(),
            inflight_members: Vec::new(),
            inflight_pins: Vec::new(),
            inflight_writes: 0,
            qcow2_hold: None,
            notify_pending: false,
            persistent: (params.persistent > 0).then(|| PersistentGrants::new(params.persistent)),
            staged: Vec::new(),
            staged_segs: Vec::new(),
            staged_gpas: Vec::new(),
            staged_refs: Vec::new(),
            done: Vec::new(),
            results: Vec::new(),
            warn: RateLimiter::default(),
            stats: QueueStats::default(),
            name,
        })
    }

    /// The dom0 port the guest notifies (route it to this queue's thread).
    pub fn dom0_port(&self) -> u32 {
        self.dom0_port
    }

    /// Counters so far.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            persistent_grants: self.persistent.as_ref().map_or(0, |p| p.len() as u64),
            ..self.stats
        }
    }

    /// Entries in the ring.
    pub fn ring_entries(&self) -> u32 {
        self.back.size
    }

    /// Serves what the frontend queued. `Ok(true)`: more may be waiting
    /// (call again before sleeping); `Ok(false)`: the ring is empty and
    /// `req_event` is armed. An error means the frontend broke the ring
    /// protocol: stop serving this queue and refuse the device.
    pub fn process(&mut self) -> Result<bool, BlkError> {
        match self.process_polling()? {
            true => Ok(true),
            false => self.arm(),
        }
    }

    /// [`process`](Self::process) without arming `req_event` when the ring
    /// is empty: for a caller that polls the ring for a while (the frontend
    /// then has no reason to notify) and calls [`arm`](Self::arm) before
    /// it sleeps.
    pub fn process_polling(&mut self) -> Result<bool, BlkError> {
        let r = self.process_batches();
        // After whole batches nothing is in flight: an overflowing
        // persistent table may drop its least recently used grants. (After
        // an error the queue is refused and everything goes at its drop.)
        if r.is_ok() {
            if let Some(p) = self.persistent.as_mut() {
                p.purge(&self.domain);
            }
        }
        r
    }

    fn process_batches(&mut self) -> Result<bool, BlkError> {
        for _ in 0..MAX_BATCHES {
            if let Some(p) = self.persistent.as_mut() {
                p.tick();
            }
            // Left only by a batch that failed (the queue then stops).
            self.staged.clear();
            self.staged_segs.clear();
            self.staged_gpas.clear();
            self.staged_refs.clear();
            let taken = {
                let g = self.cache.access().map_err(|e| self.ring_gone(e))?;
                let r = GuardRing {
                    g: &g,
                    len: self.ring_len,
                };
                self.back
                    .take_requests_into(&r, &mut self.raw)
                    .map_err(|e| BlkError::Frontend(format!("{}: {e}", self.name)))?
            };
            let raw = std::mem::take(&mut self.raw);
            let mut r = Ok(());
            for b in &raw[..taken] {
                r = self
                    .handle(&b[..self.abi.slot()])
                    .and_then(|done| match done {
                        // The staged requests before it first (their own
                        // refusals keep their order; rare: no lock per
                        // request in the common case).
                        Some(d) => self.pin_staged().and_then(|()| self.respond(&[d])),
                        None => Ok(()),
                    });
                if r.is_err() {
                    break;
                }
            }
            self.raw = raw;
            r?;
            self.pin_staged()?;
            self.run_group()?;
            self.drain()?;
            self.send_notify()?;
            if taken == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: asks the frontend to notify the
    /// next request (`req_event`); `Ok(true)` if requests came meanwhile
    /// (serve them before sleeping).
    pub fn arm(&mut self) -> Result<bool, BlkError> {
        let g = self.cache.access().map_err(|e| self.ring_gone(e))?;
        let r = GuardRing {
            g: &g,
            len: self.ring_len,
        };
        Ok(self.back.final_check(&r))
    }

    /// The notification responses pushed in this batch asked for (one per
    /// batch at most).
    fn send_notify(&mut self) -> Result<(), BlkError> {
        if std::mem::take(&mut self.notify_pending) {
            self.notify()?;
        }
        Ok(())
    }

    fn notify(&mut self) -> Result<(), BlkError> {
        self.stats.notifications += 1;
        self.domain
            .raise_port(self.guest_port)
            .map_err(|e| BlkError::Evtchn(format!("{}: notify: {e}", self.name)))
    }

    /// Writes responses and publishes them (each response as soon as its
    /// I/O is done, so the frontend refills while the rest is served); the
    /// notify check keeps interrupts to what the frontend asked for, and
    /// the notification itself is sent once, at the end of the batch
    /// (`send_notify`).
    fn respond(&mut self, done: &[(u64, u8, i16)]) -> Result<(), BlkError> {
        let notify = {
            let g = self.cache.access().map_err(|e| self.ring_gone(e))?;
            let r = GuardRing {
                g: &g,
                len: self.ring_len,
            };
            for &(id, op, st) in done {
                self.stats.requests += 1;
                if st != RSP_OKAY {
                    self.stats.errors += 1;
                }
                let (rsp, n) = encode_response(self.abi, id, op, st);
                self.back.put_response(&r, &rsp[..n]);
            }
            self.back.push_responses(&r)
        };
        self.notify_pending |= notify;
        Ok(())
    }

    /// Whether the frontend queued requests not yet taken (a cheap look
    /// at `req_prod`, for polling before sleeping).
    pub fn has_requests(&self) -> bool {
        match self.cache.access() {
            Ok(g) => {
                g.load_u32(crate::backends::blkif::ring::REQ_PROD, Ordering::Acquire)
                    .unwrap_or(self.back.req_cons)
                    != self.back.req_cons
            }
            Err(_) => true,
        }
    }

    fn ring_gone(&self, e: gpc::Error) -> BlkError {
        BlkError::Frontend(format!("{}: ring mapping unusable: {e}", self.name))
    }

    fn refuse(&mut self, id: u64, op: u8, st: i16, why: &str) -> (u64, u8, i16) {
        if let Some(suppressed) = self.warn.allow() {
            tracing::warn!(queue = %self.name, id, op, status = st, suppressed, "blkif request refused: {why}");
        }
        (id, op, st)
    }

    /// One request: `Some((id, operation, status))` when it is done,
    /// `None` when its I/O joined the pending group (answered by
    /// [`run_group`](Self::run_group)). Reads and writes of consecutive
    /// sectors are merged into one host I/O; anything else first completes
    /// the group, so flushes, barriers and discards keep their order.
    fn handle(&mut self, raw: &[u8]) -> Result<Option<(u64, u8, i16)>, BlkError> {
        // The segment list is built in `self.segs` and handed back below.
        let req =
            match parse_request_reusing(self.abi, raw, self.params.max_indirect, &mut self.segs) {
                Ok(r) => r,
                Err(e) => return Ok(Some(self.refuse(e.id, e.operation, e.status, e.why))),
            };
        let (id, op) = (req.id(), req.operation());
        if !matches!(
            req,
            Request::Indirect { .. }
                | Request::Rw {
                    op: RwOp::Read | RwOp::Write,
                    ..
                }
        ) {
            self.pin_staged()?;
            self.run_group()?;
            self.drain()?;
            // Flushes and discards can take long: notify what is done first.
            self.send_notify()?;
        }
        Ok(match req {
            Request::Discard {
                sector,
                nr_sectors,
                secure,
                ..
            } => {
                if !self.params.discard || secure {
                    return Ok(Some(self.refuse(
                        id,
                        OP_DISCARD,
                        RSP_EOPNOTSUPP,
                        "discard not offered",
                    )));
                }
                if self.disk.readonly() {
                    return Ok(Some(self.refuse(
                        id,
                        op,
                        RSP_ERROR,
                        "discard on a read-only disk",
                    )));
                }
                if !self.disk.in_range(sector, nr_sectors) {
                    return Ok(Some(self.refuse(
                        id,
                        op,
                        RSP_ERROR,
                        "discard past the end of the disk",
                    )));
                }
                Some(match self.disk.discard(sector, nr_sectors) {
                    Ok(()) => (id, op, RSP_OKAY),
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        self.refuse(id, op, RSP_EOPNOTSUPP, "the host cannot discard here")
                    }
                    Err(e) => {
                        tracing::warn!(queue = %self.name, %e, "discard failed");
                        (id, op, RSP_ERROR)
                    }
                })
            }
            Request::Rw {
                op: rw,
                sector,
                segs,
                ..
            } => {
                self.segs = segs;
                self.data(id, op, rw, sector)?
            }
            Request::Indirect {
                op: rw,
                sector,
                nr_segments,
                pages,
                ..
            } => {
                let mut segs = std::mem::take(&mut self.segs);
                segs.clear();
                let mut page = std::mem::take(&mut self.indirect);
                page.resize(PAGE, 0);
                let mut left = usize::from(nr_segments);
                for gref in pages {
                    // One private copy of the part of each indirect page in use.
                    let n = left.min(SEGS_PER_INDIRECT_PAGE);
                    if let Err(e) = self.copy_granted_page(gref, &mut page[..n * 8]) {
                        self.segs = segs;
                        self.indirect = page;
                        return Ok(Some(self.refuse(
                            id,
                            op,
                            RSP_ERROR,
                            &format!("indirect page grant {gref}: {e}"),
                        )));
                    }
                    if let Err(why) = parse_indirect_segments(&page[..n * 8], n, &mut segs) {
                        self.segs = segs;
                        self.indirect = page;
                        return Ok(Some(self.refuse(id, op, RSP_ERROR, why)));
                    }
                    left -= n;
                }
                self.segs = segs;
                self.indirect = page;
                self.data(id, op, rw, sector)?
            }
        })
    }

    /// Copies the start of granted page `gref` (read-only access) into `buf`.
    fn copy_granted_page(&mut self, gref: u32, buf: &mut [u8]) -> Result<(), String> {
        if let Some(gpa) = self
            .persistent
            .as_mut()
            .and_then(|p| p.get(&self.domain, self.domid, gref))
        {
            return self
                .map
                .guest_memory()
                .read_slice(buf, GuestAddress(gpa))
                .map_err(|e| e.to_string());
        }
        self.gfns.clear();
        self.domain
            .grant_pin_batch(&[(gref, true)], self.domid, &mut self.gfns)
            .map_err(|(_, e)| e.to_string())?;
        let r = match self.gfns.first() {
            Some(g) => self
                .map
                .guest_memory()
                .read_slice(buf, GuestAddress(g.gpa()))
                .map_err(|e| e.to_string()),
            None => Err("not pinned".into()),
        };
        self.domain.grant_unpin_batch([(gref, true)]);
        r
    }

    /// A data request over `self.segs`. Reads and writes join the
    /// pending group (`None`); flush and barrier run at once.
    fn data(
        &mut self,
        id: u64,
        op: u8,
        rw: RwOp,
        sector: u64,
    ) -> Result<Option<(u64, u8, i16)>, BlkError> {
        let writes = rw.writes() && !self.segs.is_empty();
        if writes && self.disk.readonly() {
            return Ok(Some(self.refuse(
                id,
                op,
                RSP_ERROR,
                "write to a read-only disk",
            )));
        }
        let sectors: u64 = self.segs.iter().map(|s| s.len() as u64 / SECTOR).sum();
        // A flush or barrier without data names no sector: Linux sends its
        // block layer's "no position" (-1), which is not past the end.
        let sector = if self.segs.is_empty() { 0 } else { sector };
        if !self.disk.in_range(sector, sectors) {
            return Ok(Some(self.refuse(
                id,
                op,
                RSP_ERROR,
                "sectors past the end of the disk",
            )));
        }
        // Persistent grants are looked up now; the others are pinned for
        // the whole batch at once (`pin_staged`; reads write into the
        // guest: writable).
        let mut refs = 0;
        for s in &self.segs {
            let kept = match self.persistent.as_mut() {
                Some(p) => p.get(&self.domain, self.domid, s.gref),
                None => None,
            };
            self.staged_gpas.push(kept.unwrap_or(NOT_KEPT));
            if kept.is_none() {
                self.staged_refs.push((s.gref, writes));
                refs += 1;
            }
        }
        self.staged_segs.extend_from_slice(&self.segs);
        self.staged.push(Staged {
            id,
            op,
            rw,
            sector,
            sectors,
            segs: self.segs.len(),
            refs,
        });
        if !matches!(rw, RwOp::Read | RwOp::Write) {
            // Flush or barrier: in order, now.
            self.pin_staged()?;
        }
        Ok(None)
    }

    /// Pins the grants of the staged requests (one lock for all of them)
    /// and joins each request to the pending group, in order. A grant that
    /// cannot be pinned fails only its own request: the pins are then taken
    /// again one request at a time.
    fn pin_staged(&mut self) -> Result<(), BlkError> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let mut staged = std::mem::take(&mut self.staged);
        let mut segs = std::mem::take(&mut self.staged_segs);
        let mut gpas = std::mem::take(&mut self.staged_gpas);
        let mut refs = std::mem::take(&mut self.staged_refs);
        let mut gfns = std::mem::take(&mut self.gfns);
        gfns.clear();
        let all = refs.is_empty()
            || self
                .domain
                .grant_pin_batch(&refs, self.domid, &mut gfns)
                .is_ok();
        let (mut s0, mut r0) = (0, 0);
        let mut r = Ok(());
        for st in &staged {
            let (s1, r1) = (s0 + st.segs, r0 + st.refs);
            let (my_segs, my_gpas, my_refs) = (&segs[s0..s1], &gpas[s0..s1], &refs[r0..r1]);
            let first = if all { r0 } else { 0 };
            (s0, r0) = (s1, r1);
            if r.is_err() {
                // The queue stops: give back what was pinned for the rest.
                if all {
                    self.domain.grant_unpin_batch(my_refs.iter().copied());
                }
                continue;
            }
            if !all && !my_refs.is_empty() {
                gfns.clear();
                if let Err((i, e)) = self.domain.grant_pin_batch(my_refs, self.domid, &mut gfns) {
                    let gref = my_refs.get(i).map_or(0, |r| r.0);
                    let d = self.refuse(
                        st.id,
                        st.op,
                        RSP_ERROR,
                        &format!("segment grant {gref}: {e}"),
                    );
                    r = self.respond(&[d]);
                    continue;
                }
            }
            let my_gfns = gfns.get(first..first + my_refs.len()).unwrap_or(&[]);
            r = self.join_group(st, my_segs, my_gpas, my_refs, my_gfns);
        }
        staged.clear();
        segs.clear();
        gpas.clear();
        refs.clear();
        (
            self.staged,
            self.staged_segs,
            self.staged_gpas,
            self.staged_refs,
            self.gfns,
        ) = (staged, segs, gpas, refs, gfns);
        r
    }

    /// Joins staged request `st` (its grants `refs` pinned at `gfns`) to
    /// the pending group, after running the group if it cannot merge; a
    /// flush or barrier runs alone at once.
    fn join_group(
        &mut self,
        st: &Staged,
        segs: &[Segment],
        gpas: &[u64],
        refs: &[(u32, bool)],
        gfns: &[Gfn],
    ) -> Result<(), BlkError> {
        let merge = matches!(st.rw, RwOp::Read | RwOp::Write);
        if !self.group.is_empty()
            && (!merge
                || self.group_rw != st.rw
                || self.group_next != st.sector
                || self.ranges.len() + segs.len() > gpc::MAX_IO_PIECES)
        {
            if let Err(e) = self.run_group() {
                self.domain.grant_unpin_batch(refs.iter().copied());
                return Err(e);
            }
        }
        self.pins.extend_from_slice(refs);
        let mut mapped = gfns.iter();
        for (&gpa, s) in gpas.iter().zip(segs) {
            let gpa = if gpa == NOT_KEPT {
                match mapped.next() {
                    Some(g) => g.gpa(),
                    None => break,
                }
            } else {
                gpa
            };
            self.ranges.push(GpaRange::new(
                GuestAddress(gpa + s.offset() as u64),
                s.len(),
            ));
        }
        if self.group.is_empty() {
            self.group_rw = st.rw;
            self.group_start = st.sector;
        }
        self.group_next = st.sector + st.sectors;
        self.group.push((st.id, st.op));
        if merge {
            return Ok(());
        }
        // Flush or barrier: alone, in order.
        self.drain()?;
        let status = self.io(st.rw);
        self.answer_group(status)
    }

    /// Runs the pending group's I/O and answers its requests.
    fn run_group(&mut self) -> Result<(), BlkError> {
        if self.group.is_empty() {
            return Ok(());
        }
        let rw = self.group_rw;
        if self.params.uring.covers(rw) && self.uring.is_some() {
            let (start, end, write) = (self.group_start, self.group_next, rw == RwOp::Write);
            // Overlapping I/O waits for what is queued (a read after a write
            // of the same sectors sees it); reads among reads only need no
            // look at each group.
            if (write || self.inflight_writes > 0)
                && self
                    .inflight
                    .iter()
                    .any(|g| (g.write || write) && g.start < end && start < g.end)
            {
                self.drain()?;
            }
            if let Some((entries, zeroed)) = self.queue_group(write) {
                let members = self.group.len();
                self.inflight_members.append(&mut self.group);
                self.inflight_pins.append(&mut self.pins);
                self.inflight_writes += usize::from(write);
                self.inflight.push(Inflight {
                    members,
                    write,
                    start,
                    end,
                    entries,
                    zeroed,
                });
                self.ranges.clear();
                return Ok(());
            }
        }
        // Synchronous I/O: nothing in flight, no qcow2 hold kept (the disk
        // takes the image's lock itself).
        self.drain()?;
        let st = self.io(rw);
        self.answer_group(st)
    }

    /// Queues the group's I/O over `self.ranges` on the io_uring: the
    /// number of ring entries it took and the bytes it read as zeros (done
    /// at once), or `None` (nothing queued) when it must run synchronously
    /// (the ring refused it; a qcow2 group that needs imago).
    fn queue_group(&mut self, write: bool) -> Option<(usize, u64)> {
        let offset = self.group_start * SECTOR;
        let ring = self.uring.as_mut()?;
        let Some(q) = self.disk.qcow2() else {
            return match ring.queue(offset, &self.ranges, write) {
                Ok(_) => Some((1, 0)),
                Err(e) => {
                    tracing::debug!(queue = %self.name, %e, "io_uring queue refused: synchronous I/O");
                    None
                }
            };
        };
        // Only this queue's own groups are in flight, all under its hold:
        // taking one when there is none cannot wait on itself.
        let hold = self.qcow2_hold.get_or_insert_with(|| q.hold());
        let pieces = match q.plan(hold, offset, &self.ranges, write) {
            Ok(Some(p)) => p,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(queue = %self.name, %e, "qcow2 mapping not planned: synchronous I/O");
                return None;
            }
        };
        let first = ring.len();
        let mut entries = 0;
        for p in &pieces {
            let Piece::File { file, offset, segs } = p else {
                continue;
            };
            if !ring.has_registered() {
                if let Err(e) = ring.register_shared(file) {
                    tracing::debug!(queue = %self.name, %e, "io_uring: qcow2 file not registered");
                }
            }
            if let Err(e) = ring.queue_on(file, *offset, segs, write) {
                tracing::debug!(queue = %self.name, %e, "io_uring queue refused: synchronous I/O");
                ring.cancel_from(first);
                return None;
            }
            entries += 1;
        }
        let mut zeroed = 0;
        for p in &pieces {
            if let Piece::Zero(segs) = p {
                zeroed += segs.iter().map(|s| s.len as u64).sum::<u64>();
                if let Err(e) = q.zero(&self.map, segs) {
                    tracing::debug!(queue = %self.name, %e, "qcow2 zeros not written: synchronous I/O");
                    ring.cancel_from(first);
                    return None;
                }
            }
        }
        Some((entries, zeroed))
    }

    /// Submits the queued groups (one system call for the batch), waits for
    /// them, gives their grants back and answers their requests.
    fn drain(&mut self) -> Result<(), BlkError> {
        if self.inflight.is_empty() {
            return Ok(());
        }
        let disk = self.disk.clone();
        let mut all = std::mem::take(&mut self.results);
        all.clear();
        if let Some(r) = self.uring.as_mut() {
            r.run_into(disk.held_file(), &mut all);
        }
        // Every queued I/O is complete: the image's clusters may change.
        self.qcow2_hold = None;
        let mut results = all.drain(..);
        let mut inflight = std::mem::take(&mut self.inflight);
        self.inflight_writes = 0;
        // Grants go back before the responses are pushed (one lock for the batch).
        self.domain.grant_unpin_batch(self.inflight_pins.drain(..));
        let mut done = std::mem::take(&mut self.done);
        done.clear();
        let mut members = self.inflight_members.drain(..);
        for g in inflight.drain(..) {
            // All of the group's entries must have moved their bytes.
            let mut moved = Ok(g.zeroed);
            for _ in 0..g.entries {
                let r = results
                    .next()
                    .unwrap_or_else(|| Err(std::io::Error::other("io_uring result missing")));
                moved = match (moved, r) {
                    (Ok(a), Ok(n)) => Ok(a + n as u64),
                    (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                };
            }
            let st = match moved {
                Ok(n) => {
                    if let Some(q) = disk.qcow2() {
                        q.note_batched(n - g.zeroed);
                    }
                    if g.write {
                        self.stats.bytes_written += n;
                    } else {
                        self.stats.bytes_read += n;
                    }
                    RSP_OKAY
                }
                Err(e) => {
                    if let Some(suppressed) = self.warn.allow() {
                        tracing::warn!(queue = %self.name, %e, sector = g.start, suppressed, "disk I/O failed");
                    }
                    RSP_ERROR
                }
            };
            done.extend(
                members
                    .by_ref()
                    .take(g.members)
                    .map(|(id, op)| (id, op, st)),
            );
        }
        drop(members);
        drop(results);
        self.results = all;
        self.inflight = inflight;
        let r = self.respond(&done);
        self.done = done;
        r
    }

    /// Gives the group's grants back, then answers every member.
    fn answer_group(&mut self, st: i16) -> Result<(), BlkError> {
        // Grants go back before the responses are pushed.
        self.domain.grant_unpin_batch(self.pins.drain(..));
        self.ranges.clear();
        let mut done = std::mem::take(&mut self.done);
        done.clear();
        done.extend(self.group.drain(..).map(|(id, op)| (id, op, st)));
        let r = self.respond(&done);
        self.done = done;
        r
    }

    /// The host I/O of the group over `self.ranges`: status.
    fn io(&mut self, rw: RwOp) -> i16 {
        let sector = self.group_start;
        let writes = rw.writes();
        let r = if self.ranges.is_empty() {
            Ok(0)
        } else if writes {
            if rw == RwOp::Barrier {
                // Earlier writes are complete (served in order); make them durable first.
                if let Err(e) = self.disk.flush() {
                    tracing::warn!(queue = %self.name, %e, "flush before barrier failed");
                }
            }
            self.disk.write(&self.map, sector, &self.ranges)
        } else {
            self.disk.read(&self.map, sector, &self.ranges)
        };
        let r = r.and_then(|n| {
            if matches!(rw, RwOp::Flush | RwOp::Barrier) {
                self.disk.flush().map(|()| n)
            } else {
                Ok(n)
            }
        });
        match r {
            Ok(n) => {
                if writes {
                    self.stats.bytes_written += n as u64;
                } else {
                    self.stats.bytes_read += n as u64;
                }
                RSP_OKAY
            }
            Err(e) => {
                if let Some(suppressed) = self.warn.allow() {
                    tracing::warn!(queue = %self.name, %e, sector, suppressed, "disk I/O failed");
                }
                RSP_ERROR
            }
        }
    }

    /// Gives back the ring grants and the event channel.
    pub fn disconnect(self) {
        drop(self);
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.inflight.clear();
        self.domain.grant_unpin_batch(self.inflight_pins.drain(..));
        self.domain.grant_unpin_batch(self.pins.drain(..));
        if let Some(p) = self.persistent.as_mut() {
            p.release(&self.domain);
        }
        let _ = self.cache.deactivate();
        for m in self.ring_maps.drain(..) {
            let _ = self.domain.grant_unmap(m.handle);
        }
        let _ = self.domain.backend_close(self.dom0_port);
        tracing::info!(queue = %self.name, stats = ?self.stats, "blkback queue disconnected");
    }
}
