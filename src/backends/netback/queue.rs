//! One netif queue being served: the frontend's tx and rx rings mapped
//! (one granted page each) and seen through gpc caches, its event
//! channel(s) bound to dom0 ports, and the TAP it shares with the device.
//!
//! TX (guest -> host): the waiting slots are copied out of the ring once
//! into private memory, a packet is gathered and checked there
//! ([`TxPacket::gather`]: extra info, slot count, sizes, pages), its
//! granted fragments are mapped read-only and written after a
//! `virtio_net_hdr` (`csum_blank` -> `NEEDS_CSUM` with the L4 offsets read
//! from the copied headers, GSO extra info -> `gso_type`/`gso_size`), the
//! grants are given back, the frame goes to the TAP in one write, and every
//! slot the packet used gets its response in its own slot (`RSP_NULL` for
//! extra info). RX (host -> guest): a frame read from the TAP (up to 64
//! KiB plus the vnet header) waits until the frontend has posted enough rx
//! requests (one per 4 KiB, one more for GSO extra info), then is copied
//! into the posted pages (each mapped writable, unmapped after the copy),
//! with `csum_blank`/`data_validated`, `more_data`, and a GSO extra info
//! slot after the first response when the frame is a TSO segment. After a
//! frame of more than two pages, and with 17 requests posted, the next
//! frame is read straight into the posted pages (`NetQueue::rx_direct`).
//! TX writes a packet's headers (copied and parsed privately) and then its
//! fragments from guest RAM in one `writev`.
//!
//! Bad requests get an error response; a frontend that breaks the ring
//! protocol (indexes beyond the ring, a malformed packet Linux netback
//! treats as fatal) makes [`NetQueue::process`] return an error: the caller
//! refuses the device. Nothing here panics on guest input.

use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use gpc::{Cache, GuestAddress, MemoryMap, Segment as GpaRange};
use hypercalls::{Domain, GrantMapping};
use vm_memory::Bytes;

use super::NetError;
use crate::backends::blkif::ring::{BackRing, RingMem, REQ_EVENT, REQ_PROD};
use crate::backends::netif::frame::{
    checksum_fill, l4_offsets, VnetHdr, VNET_F_DATA_VALID, VNET_F_NEEDS_CSUM, VNET_GSO_ECN,
    VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_HDR_LEN,
};
use crate::backends::netif::wire::{
    Extra, RxRequest, RxResponse, TxPacket, TxResponse, GSO_TCPV4, GSO_TCPV6, MAX_SLOTS, PAGE,
    RSP_DROPPED, RSP_ERROR, RSP_NULL, RSP_OKAY, RXF_CSUM_BLANK, RXF_DATA_VALIDATED, RXF_EXTRA_INFO,
    RXF_MORE_DATA, RX_SLOT, TX_SLOT,
};
use crate::backends::xenstore::RateLimiter;
use crate::host::tap::Tap;

/// Packets or frames per direction per `process` call.
const BUDGET: usize = 64;
/// Bytes of a tx packet's first fragment copied into private memory (its
/// headers: Ethernet, VLAN, IP with options or IPv6 extension headers, TCP
/// with options); the rest goes from guest RAM to the TAP.
pub const TX_COPY_LEN: usize = 256;
/// Largest frame read from the TAP (64 KiB of TSO plus headers).
pub const MAX_FRAME: usize = 65536 + 256;

/// What the frontend published for one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRingSetup {
    pub tx_ref: u32,
    pub rx_ref: u32,
    /// Event channel for tx (and rx when not split).
    pub tx_port: u32,
    /// Event channel for rx (the same as `tx_port` when not split).
    pub rx_port: u32,
}

/// What the frontend accepts on its rx path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxFeatures {
    /// `feature-gso-tcpv4` (with `feature-sg`).
    pub gso4: bool,
    /// `feature-gso-tcpv6` (with `feature-sg`).
    pub gso6: bool,
    /// `feature-no-csum-offload`: every checksum must be filled in.
    pub no_csum: bool,
}

/// Counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames from the TAP dropped (too big, GSO the frontend cannot take).
    pub rx_dropped: u64,
    pub notifications: u64,
}

/// A ring over a cache guard (held only while the ring is touched).
struct GuardRing<'a, 'b>(&'a gpc::Guard<'b>);

impl RingMem for GuardRing<'_, '_> {
    fn len(&self) -> usize {
        PAGE
    }
    fn load_u32(&self, off: usize) -> u32 {
        self.0.load_u32(off, Ordering::Acquire).unwrap_or(0)
    }
    fn store_u32(&self, off: usize, v: u32) {
        let _ = self.0.store_u32(off, v, Ordering::Release);
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        if self.0.read(off, buf).is_err() {
            buf.fill(0);
        }
    }
    fn write(&self, off: usize, data: &[u8]) {
        let _ = self.0.write(off, data);
    }
}

/// One mapped one-page ring.
struct Ring {
    map: Option<GrantMapping>,
    cache: Cache,
    back: BackRing,
}

impl Ring {
    fn connect(
        domain: &Domain,
        domid: u16,
        map: &MemoryMap,
        gref: u32,
        slot: usize,
        what: &str,
    ) -> Result<Ring, NetError> {
        let m = domain.grant_map(gref, domid, false).map_err(|e| {
            NetError::Frontend(format!("{what} ring grant {gref} cannot be mapped: {e}"))
        })?;
        let cache = Cache::new(map);
        if let Err(e) = cache.activate(&[GpaRange::new(GuestAddress(m.gfn.gpa()), PAGE)]) {
            let _ = domain.grant_unmap(m.handle);
            return Err(NetError::Frontend(format!("{what} ring unusable: {e}")));
        }
        let back = BackRing::new(PAGE, slot, 0).ok_or_else(|| NetError::Frontend("ring".into()))?;
        Ok(Ring {
            map: Some(m),
            cache,
            back,
        })
    }
    fn release(&mut self, domain: &Domain) {
        let _ = self.cache.deactivate();
        if let Some(m) = self.map.take() {
            let _ = domain.grant_unmap(m.handle);
        }
    }
}

/// Pages that hold the largest frame (a TAP's MTU is at most 65521).
const DIRECT_PAGES: usize = 16;

/// What `NetQueue::rx_direct` did.
enum Direct {
    /// Not possible now: use the buffered path.
    NotNow,
    /// The TAP has no frame.
    Empty,
    /// A frame was answered (or dropped); true: notify the frontend.
    Delivered(bool),
}

/// A frame read from the TAP waiting for rx slots.
struct RxFrame {
    len: usize,
    hdr: VnetHdr,
    gso: Option<(u16, u8)>,
    slots: u32,
}

/// A connected queue.
pub struct NetQueue {
    name: String,
    domain: Arc<Domain>,
    domid: u16,
    map: MemoryMap,
    tap: Arc<Tap>,
    tx: Ring,
    rx: Ring,
    setup: NetRingSetup,
    dom0_tx: u32,
    dom0_rx: u32,
    features: RxFeatures,
    /// Tx slots copied out of the ring, not yet answered.
    tx_slots: Vec<[u8; TX_SLOT]>,
    tx_frame: Vec<u8>,
    maps: Vec<GrantMapping>,
    rx_buf: Vec<u8>,
    rx_frame: Option<RxFrame>,
    /// After a TAP read error (the link down, say), when to try again.
    tap_retry: Option<std::time::Instant>,
    /// The last frame took several pages: read the next straight into the
    /// posted pages (mapping 16 of them costs more than copying a small
    /// frame once).
    rx_big: bool,
    warn: RateLimiter,
    stats: NetStats,
}

impl std::fmt::Debug for NetQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetQueue")
            .field("name", &self.name)
            .field("setup", &self.setup)
            .field("dom0_tx", &self.dom0_tx)
            .field("dom0_rx", &self.dom0_rx)
            .finish()
    }
}

impl NetQueue {
    /// Maps both rings and binds the event channel(s). Everything taken is
    /// given back if a step fails.
    pub fn connect(
        name: String,
        domain: Arc<Domain>,
        domid: u16,
        map: MemoryMap,
        tap: Arc<Tap>,
        features: RxFeatures,
        setup: &NetRingSetup,
    ) -> Result<NetQueue, NetError> {
        let ctx = |e: NetError| match e {
            NetError::Frontend(m) => NetError::Frontend(format!("{name}: {m}")),
            e => e,
        };
        let mut tx =
            Ring::connect(&domain, domid, &map, setup.tx_ref, TX_SLOT, "tx").map_err(ctx)?;
        let mut rx = match Ring::connect(&domain, domid, &map, setup.rx_ref, RX_SLOT, "rx") {
            Ok(r) => r,
            Err(e) => {
                tx.release(&domain);
                return Err(ctx(e));
            }
        };
        let mut bound: Vec<u32> = Vec::new();
        let undo = |tx: &mut Ring, rx: &mut Ring, bound: &[u32]| {
            for &p in bound {
                let _ = domain.backend_close(p);
            }
            tx.release(&domain);
            rx.release(&domain);
        };
        let ports: Vec<u32> = if setup.tx_port == setup.rx_port {
            vec![setup.tx_port]
        } else {
            vec![setup.tx_port, setup.rx_port]
        };
        for &port in &ports {
            let dom0 = match domain.backend_alloc_unbound(domid) {
                Ok(p) => p,
                Err(e) => {
                    undo(&mut tx, &mut rx, &bound);
                    return Err(NetError::Evtchn(format!("{name}: {e}")));
                }
            };
            bound.push(dom0);
            if let Err(e) = domain.backend_bind(port, dom0) {
                undo(&mut tx, &mut rx, &bound);
                return Err(NetError::Frontend(format!(
                    "{name}: event channel {port} cannot be bound: {e}"
                )));
            }
        }
        let dom0_tx = bound[0];
        let dom0_rx = *bound.last().unwrap_or(&dom0_tx);
        tracing::info!(queue = %name, ?setup, dom0_tx, dom0_rx, ?features, "netback queue connected");
        Ok(NetQueue {
            name,
            domain,
            domid,
            map,
            tap,
            tx,
            rx,
            setup: setup.clone(),
            dom0_tx,
            dom0_rx,
            features,
            tx_slots: Vec::new(),
            tx_frame: Vec::with_capacity(VNET_HDR_LEN + TX_COPY_LEN),
            maps: Vec::new(),
            rx_buf: vec![0; MAX_FRAME],
            rx_frame: None,
            tap_retry: None,
            rx_big: false,
            warn: RateLimiter::default(),
            stats: NetStats::default(),
        })
    }

    /// The dom0 ports the guest notifies (one, or tx and rx when split).
    pub fn dom0_ports(&self) -> Vec<u32> {
        if self.dom0_tx == self.dom0_rx {
            vec![self.dom0_tx]
        } else {
            vec![self.dom0_tx, self.dom0_rx]
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The TAP.
    pub fn tap(&self) -> &Arc<Tap> {
        &self.tap
    }

    /// Whether a TAP frame waits for rx slots (then the TAP need not be
    /// polled until the frontend posts more).
    pub fn rx_blocked(&self) -> bool {
        self.rx_frame.is_some()
            || self
                .tap_retry
                .is_some_and(|t| std::time::Instant::now() < t)
    }

    /// Whether the frontend queued tx requests not yet taken (a cheap look
    /// at `req_prod`, for polling before sleeping).
    pub fn has_tx_requests(&self) -> bool {
        match self.tx.cache.access() {
            Ok(g) => g.load_u32(REQ_PROD, Ordering::Acquire).unwrap_or(0) != self.tx.back.req_cons,
            Err(_) => true,
        }
    }

    /// Serves both directions. `Ok(true)`: more may be waiting; `Ok(false)`:
    /// idle (tx `req_event` armed; rx waiting for the TAP or for rx
    /// requests). An error means the frontend broke the protocol: stop
    /// serving this queue and refuse the device.
    pub fn process(&mut self) -> Result<bool, NetError> {
        let t = self.process_tx()?;
        let r = self.process_rx()?;
        Ok(t || r)
    }

    fn ring_gone(&self, e: gpc::Error) -> NetError {
        NetError::Frontend(format!("{}: ring mapping unusable: {e}", self.name))
    }

    fn notify(&mut self, port: u32) -> Result<(), NetError> {
        self.stats.notifications += 1;
        self.domain
            .raise_port(port)
            .map_err(|e| NetError::Evtchn(format!("{}: notify: {e}", self.name)))
    }

    fn log_refusal(&mut self, why: &str) {
        if let Some(suppressed) = self.warn.allow() {
            tracing::warn!(queue = %self.name, suppressed, "netif: {why}");
        }
    }

    /// Copies every waiting tx slot out of the ring (once). Err: bad
    /// indexes.
    fn take_tx_slots(&mut self) -> Result<(), NetError> {
        let g = self.tx.cache.access().map_err(|e| self.ring_gone(e))?;
        let r = GuardRing(&g);
        let prod = r.load_u32(REQ_PROD);
        let n = self
            .tx
            .back
            .unconsumed(prod)
            .map_err(|e| NetError::Frontend(format!("{}: tx ring: {e}", self.name)))?;
        for _ in 0..n {
            if !self.tx.back.can_consume() {
                break;
            }
            let mut b = [0u8; TX_SLOT];
            self.tx.back.copy_request(&r, &mut b);
            self.tx_slots.push(b);
        }
        Ok(())
    }

    fn process_tx(&mut self) -> Result<bool, NetError> {
        let mut answered = Vec::new();
        let mut fatal = None;
        let mut busy = false;
        for round in 0..BUDGET {
            self.take_tx_slots()?;
            let p = match TxPacket::gather(&self.tx_slots, MAX_SLOTS) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(r) => {
                    self.stats.tx_errors += 1;
                    self.log_refusal(&format!("tx packet refused: {}", r.why));
                    for (i, b) in self.tx_slots.drain(..r.slots).enumerate() {
                        let st = if i >= 1 && i <= r.extras {
                            RSP_NULL
                        } else {
                            RSP_ERROR
                        };
                        let id = u16::from_le_bytes([b[8], b[9]]);
                        answered.push(TxResponse { id, status: st });
                    }
                    if r.fatal {
                        fatal = Some(r.why);
                        break;
                    }
                    continue;
                }
            };
            let st = self.send(&p);
            self.tx_slots.drain(..p.slots);
            // Responses in the order of the slots: first, extras, fragments.
            answered.push(TxResponse {
                id: p.frags[0].id,
                status: st,
            });
            for _ in 0..p.extras {
                answered.push(TxResponse {
                    id: 0,
                    status: RSP_NULL,
                });
            }
            for f in &p.frags[1..] {
                answered.push(TxResponse {
                    id: f.id,
                    status: st,
                });
            }
            if round + 1 == BUDGET {
                busy = true;
            }
        }
        if !answered.is_empty() {
            let notify = {
                let g = self.tx.cache.access().map_err(|e| self.ring_gone(e))?;
                let r = GuardRing(&g);
                for a in &answered {
                    self.tx.back.put_response(&r, &a.encode());
                }
                self.tx.back.push_responses(&r)
            };
            if notify {
                let port = self.setup.tx_port;
                self.notify(port)?;
            }
        }
        if let Some(why) = fatal {
            return Err(NetError::Frontend(format!("{}: {why}", self.name)));
        }
        if busy {
            return Ok(true);
        }
        // Nothing more: arm req_event and look once more.
        let g = self.tx.cache.access().map_err(|e| self.ring_gone(e))?;
        let more = self.tx.back.final_check(&GuardRing(&g));
        Ok(more)
    }

    /// Writes packet `p` to the TAP: its headers (up to [`TX_COPY_LEN`]
    /// bytes of the first fragment) copied once into private memory and
    /// read there, after a vnet header made from them; the rest of the
    /// granted fragments straight from guest RAM (one `writev`, no copy).
    /// The status of its responses.
    fn send(&mut self, p: &TxPacket) -> i16 {
        let mut head = std::mem::take(&mut self.tx_frame);
        let st = self.send_with(p, &mut head);
        self.tx_frame = head;
        st
    }

    fn send_with(&mut self, p: &TxPacket, head: &mut Vec<u8>) -> i16 {
        let refs: Vec<(u32, bool)> = p.frags.iter().map(|f| (f.gref, true)).collect();
        self.maps.clear();
        if let Err((i, e)) = self
            .domain
            .grant_map_batch(&refs, self.domid, &mut self.maps)
        {
            let gref = refs.get(i).map_or(0, |r| r.0);
            self.log_refusal(&format!("tx fragment grant {gref}: {e}"));
            self.stats.tx_errors += 1;
            return RSP_ERROR;
        }
        let st = self.write_mapped(p, head);
        // Grants go back before the responses are written.
        self.domain
            .grant_unmap_batch(self.maps.drain(..).map(|m| m.handle));
        if st == RSP_ERROR {
            self.stats.tx_errors += 1;
        }
        st
    }

    /// [`send`](Self::send) once the fragments are mapped (`self.maps`).
    fn write_mapped(&mut self, p: &TxPacket, head: &mut Vec<u8>) -> i16 {
        let first = p.frags[0];
        let copy = p.lens[0].min(TX_COPY_LEN);
        head.clear();
        head.resize(VNET_HDR_LEN + copy, 0);
        let gpa0 = self.maps[0].gfn.gpa() + u64::from(first.offset);
        if self
            .map
            .guest_memory()
            .read_slice(&mut head[VNET_HDR_LEN..], GuestAddress(gpa0))
            .is_err()
        {
            self.log_refusal("tx fragment outside guest RAM");
            return RSP_ERROR;
        }
        let mut hdr = VnetHdr::default();
        let l4 = l4_offsets(&head[VNET_HDR_LEN..]);
        if first.csum_blank() || p.gso.is_some() {
            match l4 {
                Some(i) => {
                    hdr.flags = VNET_F_NEEDS_CSUM;
                    hdr.csum_start = i.l4 as u16;
                    hdr.csum_offset = i.csum_offset as u16;
                }
                None if p.gso.is_some() => {
                    self.log_refusal("GSO packet without TCP headers in its first fragment");
                    return RSP_ERROR;
                }
                // Not TCP/UDP over IP: nothing a checksum offload could fill.
                None => {}
            }
        } else if first.data_validated() {
            hdr.flags = VNET_F_DATA_VALID;
        }
        if let (Some((size, kind)), Some(i)) = (p.gso, l4) {
            if i.proto != crate::backends::netif::frame::IPPROTO_TCP || i.v6 != (kind == GSO_TCPV6)
            {
                self.log_refusal("GSO type does not match the packet's headers");
                return RSP_ERROR;
            }
            hdr.gso_type = if kind == GSO_TCPV4 {
                VNET_GSO_TCPV4
            } else {
                VNET_GSO_TCPV6
            };
            hdr.gso_size = size;
            hdr.hdr_len = (i.l4 + i.l4_len) as u16;
        }
        head[..VNET_HDR_LEN].copy_from_slice(&hdr.encode());
        // The rest of the first fragment, then the others, from guest RAM.
        let mut segs: Vec<GpaRange> = Vec::with_capacity(p.frags.len());
        segs.push(GpaRange::new(
            GuestAddress(gpa0 + copy as u64),
            p.lens[0] - copy,
        ));
        for ((m, f), &len) in self.maps.iter().zip(&p.frags).zip(&p.lens).skip(1) {
            segs.push(GpaRange::new(
                GuestAddress(m.gfn.gpa() + u64::from(f.offset)),
                len,
            ));
        }
        match self.map.writev_with_head(self.tap.as_fd(), head, &segs) {
            Ok(_) => {
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += p.total as u64;
                RSP_OKAY
            }
            Err(e) if e.kind() == ErrorKind::Other => {
                self.log_refusal(&format!("tx fragment unusable: {e}"));
                RSP_ERROR
            }
            Err(e) => {
                if let Some(suppressed) = self.warn.allow() {
                    tracing::debug!(queue = %self.name, %e, suppressed, "TAP write failed: dropped");
                }
                RSP_DROPPED
            }
        }
    }

    /// Reads the next TAP frame into `rx_buf` (None: none waiting).
    fn read_tap(&mut self) -> Option<RxFrame> {
        if self
            .tap_retry
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            return None;
        }
        self.tap_retry = None;
        loop {
            let n = match self.tap.read_frame(&mut self.rx_buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Polling a TAP in this state would not sleep: back off.
                    self.tap_retry =
                        Some(std::time::Instant::now() + std::time::Duration::from_millis(100));
                    if let Some(suppressed) = self.warn.allow() {
                        tracing::info!(queue = %self.name, %e, suppressed, "TAP read failed (link down?): retrying in 100 ms");
                    }
                    return None;
                }
            };
            let Some(mut hdr) = VnetHdr::parse(&self.rx_buf[..n]) else {
                continue;
            };
            let len = n.saturating_sub(VNET_HDR_LEN);
            if len < 14 {
                self.stats.rx_dropped += 1;
                continue;
            }
            let gso = match hdr.gso_type & !0x80 {
                VNET_GSO_NONE => None,
                VNET_GSO_TCPV4 if self.features.gso4 => Some((hdr.gso_size, GSO_TCPV4)),
                VNET_GSO_TCPV6 if self.features.gso6 => Some((hdr.gso_size, GSO_TCPV6)),
                _ => {
                    self.stats.rx_dropped += 1;
                    continue;
                }
            };
            if hdr.flags & VNET_F_NEEDS_CSUM != 0 && self.features.no_csum && gso.is_none() {
                // The frontend takes no blank checksums: fill it in here.
                checksum_fill(&mut self.rx_buf[VNET_HDR_LEN..n]);
                hdr.flags = VNET_F_DATA_VALID;
            }
            let data_slots = len.div_ceil(PAGE) as u32;
            self.rx_big = data_slots > 2;
            let slots = data_slots + u32::from(gso.is_some());
            if slots > self.rx.back.size {
                self.stats.rx_dropped += 1;
                continue;
            }
            return Some(RxFrame {
                len,
                hdr,
                gso,
                slots,
            });
        }
    }

    /// Receives one frame straight into the posted pages when the frontend
    /// has posted enough for the largest frame: the requests are copied
    /// once (not yet consumed), their pages mapped, the TAP read into them
    /// with one `readv`, and only the requests the frame used are consumed
    /// and answered. `NotNow`: use the buffered path (too few requests, a
    /// bad grant among them).
    fn rx_direct(&mut self) -> Result<Direct, NetError> {
        if self
            .tap_retry
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            return Ok(Direct::Empty);
        }
        let gso_ok = self.features.gso4 || self.features.gso6;
        // 16 pages hold the largest frame; GSO adds the extra info slot.
        let want = DIRECT_PAGES + usize::from(gso_ok);
        let mut reqs: Vec<RxRequest> = Vec::with_capacity(want);
        {
            let g = self.rx.cache.access().map_err(|e| self.ring_gone(e))?;
            let r = GuardRing(&g);
            let avail = self
                .rx
                .back
                .unconsumed(r.load_u32(REQ_PROD))
                .map_err(|e| NetError::Frontend(format!("{}: rx ring: {e}", self.name)))?;
            if (avail as usize) < want {
                return Ok(Direct::NotNow);
            }
            for i in 0..want {
                let mut raw = [0u8; RX_SLOT];
                let off = self
                    .rx
                    .back
                    .slot_offset(self.rx.back.req_cons.wrapping_add(i as u32));
                r.read(off, &mut raw);
                reqs.push(RxRequest::parse(&raw).unwrap_or(RxRequest { id: 0, gref: 0 }));
            }
        }
        let refs: Vec<(u32, bool)> = reqs.iter().map(|q| (q.gref, false)).collect();
        self.maps.clear();
        if self
            .domain
            .grant_map_batch(&refs, self.domid, &mut self.maps)
            .is_err()
        {
            return Ok(Direct::NotNow);
        }
        // Data goes to the first page, then (with GSO possible) past the
        // slot the extra info may take.
        let data_idx: Vec<usize> = if gso_ok {
            std::iter::once(0).chain(2..want).collect()
        } else {
            (0..want).collect()
        };
        let segs: Vec<GpaRange> = data_idx
            .iter()
            .map(|&i| GpaRange::new(GuestAddress(self.maps[i].gfn.gpa()), PAGE))
            .collect();
        let mut head = [0u8; VNET_HDR_LEN];
        let n = match self.map.readv_with_head(self.tap.as_fd(), &mut head, &segs) {
            Ok(n) => n,
            Err(e) => {
                self.domain
                    .grant_unmap_batch(self.maps.drain(..).map(|m| m.handle));
                return Ok(match e.kind() {
                    ErrorKind::WouldBlock => Direct::Empty,
                    ErrorKind::Interrupted | ErrorKind::Other => Direct::NotNow,
                    _ => {
                        self.tap_retry =
                            Some(std::time::Instant::now() + std::time::Duration::from_millis(100));
                        if let Some(suppressed) = self.warn.allow() {
                            tracing::info!(queue = %self.name, %e, suppressed, "TAP read failed (link down?): retrying in 100 ms");
                        }
                        Direct::Empty
                    }
                });
            }
        };
        let hdr = VnetHdr::parse(&head).unwrap_or_default();
        let len = n.saturating_sub(VNET_HDR_LEN);
        let gso = match hdr.gso_type & !VNET_GSO_ECN {
            VNET_GSO_NONE => Some(None),
            VNET_GSO_TCPV4 if self.features.gso4 => Some(Some((hdr.gso_size, GSO_TCPV4))),
            VNET_GSO_TCPV6 if self.features.gso6 => Some(Some((hdr.gso_size, GSO_TCPV6))),
            _ => None,
        };
        let chunks = len.div_ceil(PAGE);
        self.rx_big = chunks > 2;
        let Some(gso) = gso.filter(|_| len >= 14 && chunks <= DIRECT_PAGES) else {
            // Not for this frontend: the posted pages were only scribbled on.
            self.domain
                .grant_unmap_batch(self.maps.drain(..).map(|m| m.handle));
            self.stats.rx_dropped += 1;
            return Ok(Direct::Delivered(false));
        };
        // A frame without GSO in the GSO layout: move its pages after the
        // first back by one, into the slots its responses take.
        let mem = self.map.guest_memory();
        let mut ok = true;
        if gso.is_none() && gso_ok && chunks > 1 {
            let mut page = [0u8; PAGE];
            for k in 1..chunks {
                let clen = (len - k * PAGE).min(PAGE);
                let from = GuestAddress(self.maps[k + 1].gfn.gpa());
                let to = GuestAddress(self.maps[k].gfn.gpa());
                ok &= mem.read_slice(&mut page[..clen], from).is_ok()
                    && mem.write_slice(&page[..clen], to).is_ok();
            }
        }
        self.domain
            .grant_unmap_batch(self.maps.drain(..).map(|m| m.handle));
        let slots = chunks + usize::from(gso.is_some());
        let data_reqs: Vec<RxRequest> = if gso.is_some() {
            data_idx.iter().take(chunks).map(|&i| reqs[i]).collect()
        } else {
            reqs[..chunks].to_vec()
        };
        let mut first_flags = 0u16;
        if hdr.flags & VNET_F_NEEDS_CSUM != 0 {
            first_flags |= RXF_CSUM_BLANK | RXF_DATA_VALIDATED;
        } else if hdr.flags & VNET_F_DATA_VALID != 0 {
            first_flags |= RXF_DATA_VALIDATED;
        }
        if gso.is_some() {
            first_flags |= RXF_EXTRA_INFO;
        }
        let g = self.rx.cache.access().map_err(|e| self.ring_gone(e))?;
        let r = GuardRing(&g);
        self.rx.back.req_cons = self.rx.back.req_cons.wrapping_add(slots as u32);
        for (k, q) in data_reqs.iter().enumerate() {
            let mut flags = if k == 0 { first_flags } else { 0 };
            if k + 1 < chunks {
                flags |= RXF_MORE_DATA;
            }
            let status = if ok {
                (len - k * PAGE).min(PAGE) as i16
            } else {
                RSP_ERROR
            };
            let rsp = RxResponse {
                id: q.id,
                offset: 0,
                flags,
                status,
            };
            self.rx.back.put_response(&r, &rsp.encode());
            if k == 0 {
                if let Some((size, kind)) = gso {
                    let e = Extra::Gso {
                        size,
                        kind,
                        features: 0,
                    };
                    self.rx.back.put_response(&r, &e.encode(false));
                }
            }
        }
        if ok {
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += len as u64;
        } else {
            self.stats.rx_dropped += 1;
        }
        Ok(Direct::Delivered(self.rx.back.push_responses(&r)))
    }

    fn process_rx(&mut self) -> Result<bool, NetError> {
        let mut notify = false;
        let mut busy = false;
        for round in 0..BUDGET {
            if round + 1 == BUDGET {
                busy = true;
            }
            if self.rx_frame.is_none() && self.rx_big && !self.features.no_csum {
                match self.rx_direct()? {
                    Direct::Empty => {
                        busy = false;
                        break;
                    }
                    Direct::Delivered(n) => {
                        notify |= n;
                        continue;
                    }
                    Direct::NotNow => {}
                }
            }
            let f = match self.rx_frame.take() {
                Some(f) => f,
                None => match self.read_tap() {
                    Some(f) => f,
                    None => {
                        busy = false;
                        break;
                    }
                },
            };
            // Enough rx requests posted? Else ask to be told when there are.
            let avail =
                {
                    let g = self.rx.cache.access().map_err(|e| self.ring_gone(e))?;
                    let r = GuardRing(&g);
                    let prod = r.load_u32(REQ_PROD);
                    let mut n =
                        self.rx.back.unconsumed(prod).map_err(|e| {
                            NetError::Frontend(format!("{}: rx ring: {e}", self.name))
                        })?;
                    if n < f.slots {
                        r.store_u32(REQ_EVENT, self.rx.back.req_cons.wrapping_add(f.slots));
                        fence(Ordering::SeqCst);
                        n = self.rx.back.unconsumed(r.load_u32(REQ_PROD)).map_err(|e| {
                            NetError::Frontend(format!("{}: rx ring: {e}", self.name))
                        })?;
                    }
                    n
                };
            if avail < f.slots {
                self.rx_frame = Some(f);
                busy = false;
                break;
            }
            notify |= self.deliver(&f)?;
        }
        if notify {
            let port = self.setup.rx_port;
            self.notify(port)?;
        }
        Ok(busy)
    }

    /// Copies the frame in `rx_buf` into the posted rx pages and writes
    /// its responses; true if the frontend asked to be notified.
    fn deliver(&mut self, f: &RxFrame) -> Result<bool, NetError> {
        let g = self.rx.cache.access().map_err(|e| self.ring_gone(e))?;
        let r = GuardRing(&g);
        let data = &self.rx_buf[VNET_HDR_LEN..VNET_HDR_LEN + f.len];
        let chunks = f.len.div_ceil(PAGE);
        let mut first_flags = 0u16;
        if f.hdr.flags & VNET_F_NEEDS_CSUM != 0 {
            first_flags |= RXF_CSUM_BLANK | RXF_DATA_VALIDATED;
        } else if f.hdr.flags & VNET_F_DATA_VALID != 0 {
            first_flags |= RXF_DATA_VALIDATED;
        }
        if f.gso.is_some() {
            first_flags |= RXF_EXTRA_INFO;
        }
        // Every request this frame takes, copied once, in ring order: the
        // first data page, the extra info slot (GSO), the other pages.
        let mut reqs: Vec<RxRequest> = Vec::with_capacity(f.slots as usize);
        for _ in 0..f.slots {
            let mut raw = [0u8; RX_SLOT];
            self.rx.back.copy_request(&r, &mut raw);
            reqs.push(RxRequest::parse(&raw).unwrap_or(RxRequest { id: 0, gref: 0 }));
        }
        let extra_at = f.gso.map(|_| 1usize);
        let data_reqs: Vec<RxRequest> = reqs
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != extra_at)
            .map(|(_, q)| *q)
            .collect();
        let mem = self.map.guest_memory();
        let mut status: Vec<i16> = Vec::with_capacity(chunks);
        // The pages mapped writable in one batch; one bad grant: each page
        // on its own so only the bad ones get an error status.
        let refs: Vec<(u32, bool)> = data_reqs.iter().map(|q| (q.gref, false)).collect();
        self.maps.clear();
        if self
            .domain
            .grant_map_batch(&refs, self.domid, &mut self.maps)
            .is_ok()
        {
            for (k, m) in self.maps.iter().enumerate() {
                let chunk = &data[k * PAGE..((k + 1) * PAGE).min(f.len)];
                status.push(match mem.write_slice(chunk, GuestAddress(m.gfn.gpa())) {
                    Ok(()) => chunk.len() as i16,
                    Err(_) => RSP_ERROR,
                });
            }
            self.domain
                .grant_unmap_batch(self.maps.drain(..).map(|m| m.handle));
        } else {
            for (k, q) in data_reqs.iter().enumerate() {
                let chunk = &data[k * PAGE..((k + 1) * PAGE).min(f.len)];
                status.push(match self.domain.grant_map(q.gref, self.domid, false) {
                    Ok(m) => {
                        let w = mem.write_slice(chunk, GuestAddress(m.gfn.gpa()));
                        let _ = self.domain.grant_unmap(m.handle);
                        if w.is_ok() {
                            chunk.len() as i16
                        } else {
                            RSP_ERROR
                        }
                    }
                    Err(_) => RSP_ERROR,
                });
            }
        }
        let errors = status.iter().filter(|&&s| s < 0).count();
        for (k, (q, &st)) in data_reqs.iter().zip(&status).enumerate() {
            let mut flags = if k == 0 { first_flags } else { 0 };
            if k + 1 < chunks {
                flags |= RXF_MORE_DATA;
            }
            let rsp = RxResponse {
                id: q.id,
                offset: 0,
                flags,
                status: st,
            };
            self.rx.back.put_response(&r, &rsp.encode());
            if k == 0 {
                if let Some((size, kind)) = f.gso {
                    // The extra info in the slot of the request after the first.
                    let e = Extra::Gso {
                        size,
                        kind,
                        features: 0,
                    };
                    self.rx.back.put_response(&r, &e.encode(false));
                }
            }
        }
        if errors > 0 {
            self.stats.rx_dropped += 1;
            drop(g);
            self.log_refusal("rx request with a bad grant: the frame is answered with an error");
            let g = self.rx.cache.access().map_err(|e| self.ring_gone(e))?;
            return Ok(self.rx.back.push_responses(&GuardRing(&g)));
        }
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += f.len as u64;
        Ok(self.rx.back.push_responses(&r))
    }
}

impl Drop for NetQueue {
    fn drop(&mut self) {
        for m in self.maps.drain(..) {
            let _ = self.domain.grant_unmap(m.handle);
        }
        self.tx.release(&self.domain);
        self.rx.release(&self.domain);
        for p in self.dom0_ports() {
            let _ = self.domain.backend_close(p);
        }
        tracing::info!(queue = %self.name, stats = ?self.stats, "netback queue disconnected");
    }
}
