//! An in-process netfront for tests and benches, over the in-process guest
//! of `blkfront.rs` (the real grant table and event channels, guest RAM in
//! gpc's memory map): a tx and an rx ring of one page each laid out as
//! Linux's `xen-netfront` does, tx buffers granted read-only, 256 rx pages
//! posted (request id = ring index), packets split into page fragments with
//! `more_data`, optional `csum_blank` and GSO extra info, and rx frames put
//! back together from their responses (extra info slots included).

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::blkfront::Guest;
use xenkvm::backends::netif::wire::*;

const PAGE: usize = 4096;

/// One single-page shared ring from the frontend's side.
pub struct Ring {
    pub g: Arc<Guest>,
    pub gfn: u64,
    pub gref: u32,
    pub slot: usize,
    pub size: u32,
    pub req_prod_pvt: u32,
    pub rsp_cons: u32,
}

impl Ring {
    pub fn new(g: &Arc<Guest>, slot: usize) -> Ring {
        let gfn = g.alloc_pages(1)[0];
        let gref = g.grant(gfn, false);
        let r = Ring {
            g: g.clone(),
            gfn,
            gref,
            slot,
            size: xenkvm::backends::blkif::ring_entries(PAGE, slot),
            req_prod_pvt: 0,
            rsp_cons: 0,
        };
        g.write_mem(gfn * 4096, &[0u8; 4096]);
        g.store_u32(r.addr(4), 1);
        g.store_u32(r.addr(12), 1);
        r
    }
    pub fn addr(&self, off: usize) -> u64 {
        self.gfn * 4096 + off as u64
    }
    fn slot_off(&self, idx: u32) -> usize {
        64 + (idx & (self.size - 1)) as usize * self.slot
    }
    pub fn queue_raw(&mut self, b: &[u8]) {
        let off = self.slot_off(self.req_prod_pvt);
        self.g.write_mem(self.addr(off), b);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
    }
    /// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, and the notification on `port`.
    pub fn push(&mut self, port: u32) -> bool {
        let old = self.g.load_u32(self.addr(0));
        let new = self.req_prod_pvt;
        self.g.store_u32(self.addr(0), new);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let ev = self.g.load_u32(self.addr(4));
        let notify = new.wrapping_sub(ev) < new.wrapping_sub(old);
        if notify {
            self.g.send(port);
        }
        notify
    }
    /// Sets req_prod to anything (a broken frontend) and signals.
    pub fn set_req_prod(&self, v: u32, port: u32) {
        self.g.store_u32(self.addr(0), v);
        self.g.send(port);
    }
    /// The next response's bytes, if one arrived (arms rsp_event if not).
    pub fn next_response(&mut self) -> Option<Vec<u8>> {
        let prod = self.g.load_u32(self.addr(8));
        if self.rsp_cons == prod {
            self.g
                .store_u32(self.addr(12), self.rsp_cons.wrapping_add(1));
            return None;
        }
        let mut b = vec![0u8; self.slot];
        let off = self.slot_off(self.rsp_cons);
        self.g.read_mem(self.addr(off), &mut b);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Some(b)
    }
}

/// How a packet is sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct TxOpts {
    pub csum_blank: bool,
    pub data_validated: bool,
    /// GSO extra info: (mss, XEN_NETIF_GSO_TYPE_*).
    pub gso: Option<(u16, u8)>,
    /// Fragment size (at most a page).
    pub frag: usize,
}

/// A received frame.
#[derive(Debug, Clone)]
pub struct RxFrame {
    pub data: Vec<u8>,
    pub flags: u16,
    pub gso: Option<Extra>,
    /// Some slot had an error status.
    pub error: bool,
}

pub struct NetFront {
    pub g: Arc<Guest>,
    pub tx: Ring,
    pub rx: Ring,
    pub tx_port: u32,
    pub rx_port: u32,
    /// Tx buffer pages (gfn, read-only grant), used round-robin.
    pub tx_bufs: Vec<(u64, u32)>,
    next_tx: usize,
    next_id: u16,
    /// Rx pages by request id.
    pub rx_bufs: Vec<(u64, u32)>,
}

impl NetFront {
    /// Rings, ports (split when `split`), 256 tx pages, 256 rx pages posted.
    pub fn new(g: &Arc<Guest>, split: bool) -> NetFront {
        let tx = Ring::new(g, TX_SLOT);
        let rx = Ring::new(g, RX_SLOT);
        let tx_port = g.alloc_port();
        let rx_port = if split { g.alloc_port() } else { tx_port };
        let tx_bufs = g
            .alloc_pages(256)
            .into_iter()
            .map(|f| (f, g.grant(f, true)))
            .collect();
        let rx_bufs: Vec<(u64, u32)> = g
            .alloc_pages(256)
            .into_iter()
            .map(|f| (f, g.grant(f, false)))
            .collect();
        let mut f = NetFront {
            g: g.clone(),
            tx,
            rx,
            tx_port,
            rx_port,
            tx_bufs,
            next_tx: 0,
            next_id: 0,
            rx_bufs,
        };
        for _ in 0..f.rx.size {
            f.post_rx();
        }
        f.rx.push(f.rx_port);
        f
    }

    /// The xenstore keys netfront writes for these rings.
    pub fn keys(&self) -> Vec<(&'static str, String)> {
        let mut k = vec![
            ("tx-ring-ref", self.tx.gref.to_string()),
            ("rx-ring-ref", self.rx.gref.to_string()),
            ("request-rx-copy", "1".into()),
            ("feature-rx-notify", "1".into()),
            ("feature-sg", "1".into()),
            ("feature-gso-tcpv4", "1".into()),
            ("feature-gso-tcpv6", "1".into()),
        ];
        if self.tx_port == self.rx_port {
            k.push(("event-channel", self.tx_port.to_string()));
        } else {
            k.push(("event-channel-tx", self.tx_port.to_string()));
            k.push(("event-channel-rx", self.rx_port.to_string()));
        }
        k
    }

    /// Posts the rx request for ring index `req_prod_pvt` (id = index).
    pub fn post_rx(&mut self) {
        let id = (self.rx.req_prod_pvt % self.rx.size) as u16;
        let r = RxRequest {
            id,
            gref: self.rx_bufs[usize::from(id)].1,
        };
        self.rx.queue_raw(&r.encode());
    }

    /// Queues raw tx slots and pushes them.
    pub fn send_raw(&mut self, slots: &[[u8; TX_SLOT]]) {
        for s in slots {
            self.tx.queue_raw(s);
        }
        self.tx.push(self.tx_port);
    }

    /// Puts `frame` into tx pages and sends it: the ids of its data slots.
    pub fn send(&mut self, frame: &[u8], o: TxOpts) -> Vec<u16> {
        let frag = if o.frag == 0 { PAGE } else { o.frag.min(PAGE) };
        let chunks: Vec<&[u8]> = frame.chunks(frag).collect();
        let mut slots = Vec::new();
        let mut ids = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let (gfn, gref) = self.tx_bufs[self.next_tx % self.tx_bufs.len()];
            self.next_tx += 1;
            self.g.write_mem(gfn * 4096, c);
            let mut flags = 0;
            if i + 1 < chunks.len() {
                flags |= TXF_MORE_DATA;
            }
            if i == 0 {
                if o.csum_blank {
                    flags |= TXF_CSUM_BLANK | TXF_DATA_VALIDATED;
                } else if o.data_validated {
                    flags |= TXF_DATA_VALIDATED;
                }
                if o.gso.is_some() {
                    flags |= TXF_EXTRA_INFO;
                }
            }
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            ids.push(id);
            let size = if i == 0 { frame.len() } else { c.len() } as u16;
            slots.push(
                TxRequest {
                    gref,
                    offset: 0,
                    flags,
                    id,
                    size,
                }
                .encode(),
            );
            if i == 0 {
                if let Some((mss, kind)) = o.gso {
                    let mut s = [0u8; TX_SLOT];
                    s[..EXTRA_LEN].copy_from_slice(
                        &Extra::Gso {
                            size: mss,
                            kind,
                            features: 0,
                        }
                        .encode(false),
                    );
                    slots.push(s);
                }
            }
        }
        self.send_raw(&slots);
        ids
    }

    /// Waits for `n` tx responses: (id, status).
    pub fn tx_responses(&mut self, n: usize) -> Vec<(u16, i16)> {
        let mut out = Vec::new();
        let start = Instant::now();
        while out.len() < n {
            match self.tx.next_response() {
                Some(b) => {
                    let r = TxResponse::parse(&b).unwrap();
                    out.push((r.id, r.status));
                }
                None => {
                    assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "only {} of {n} tx responses after 20 s",
                        out.len()
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        out
    }

    /// Whether any tx response arrives within `ms`.
    pub fn tx_response_within(&mut self, ms: u64) -> bool {
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {
            if self.tx.next_response().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// The next whole rx frame, if one arrives within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<RxFrame> {
        let start = Instant::now();
        let mut cur: Option<RxFrame> = None;
        let mut want_extra = false;
        let mut nslots = 0;
        loop {
            let Some(b) = self.rx.next_response() else {
                if start.elapsed() > timeout {
                    return None;
                }
                std::thread::sleep(Duration::from_micros(200));
                continue;
            };
            let idx = self.rx.rsp_cons.wrapping_sub(1);
            // The buffer of this slot is free again: re-post it.
            self.post_rx();
            if want_extra {
                want_extra = false;
                let e = Extra::parse(&b).ok().map(|(e, _)| e);
                if let Some(f) = cur.as_mut() {
                    f.gso = e;
                }
                if cur.as_ref().is_some_and(|f| f.flags & RXF_MORE_DATA == 0) {
                    self.rx.push(self.rx_port);
                    return cur;
                }
                continue;
            }
            let r = RxResponse::parse(&b).unwrap();
            assert_eq!(
                u32::from(r.id),
                idx % self.rx.size,
                "response in the request's slot"
            );
            let f = cur.get_or_insert_with(|| RxFrame {
                data: Vec::new(),
                flags: r.flags,
                gso: None,
                error: false,
            });
            if r.status < 0 {
                f.error = true;
            } else {
                let (gfn, _) = self.rx_bufs[usize::from(r.id)];
                let mut d = vec![0u8; r.status as usize];
                self.g.read_mem(gfn * 4096 + u64::from(r.offset), &mut d);
                f.data.extend_from_slice(&d);
            }
            nslots += 1;
            if nslots == 1 && r.flags & RXF_EXTRA_INFO != 0 {
                want_extra = true;
                continue;
            }
            if r.flags & RXF_MORE_DATA == 0 {
                self.rx.push(self.rx_port);
                return cur;
            }
        }
    }

    /// The next frame for which `pick` is true (others are dropped).
    pub fn recv_matching(
        &mut self,
        timeout: Duration,
        pick: impl Fn(&RxFrame) -> bool,
    ) -> Option<RxFrame> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let f = self.recv(left)?;
            if pick(&f) {
                return Some(f);
            }
        }
    }
}
