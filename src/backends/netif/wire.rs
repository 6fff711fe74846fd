//! The netif ring entries (`xen/include/public/io/netif.h`), little-endian:
//!
//! - `netif_tx_request` (12 bytes): `gref u32 @0, offset u16 @4, flags u16
//!   @6, id u16 @8, size u16 @10`. The first slot of a packet carries the
//!   whole packet's size; `NETTXF_more_data` chains further slots, each with
//!   its own fragment size; `NETTXF_extra_info` says extra info slots follow
//!   the first request.
//! - `netif_extra_info` (8 bytes, at the start of a tx request slot or in
//!   an rx response slot): `type u8 @0, flags u8 @1`, then for GSO `size
//!   u16 @2, type u8 @4, pad u8 @5, features u16 @6`, for multicast `addr
//!   [u8; 6] @2`.
//! - `netif_tx_response` (4 bytes): `id u16 @0, status i16 @2`.
//! - `netif_rx_request` (8 bytes): `id u16 @0, pad u16 @2, gref u32 @4`.
//! - `netif_rx_response` (8 bytes): `id u16 @0, offset u16 @2, flags u16
//!   @4, status i16 @6` (status > 0 is the byte count in this slot).
//!
//! A tx slot is 12 bytes (the union of request and response), an rx slot
//! 8: one page holds 256 of either.

/// Bytes per tx ring slot.
pub const TX_SLOT: usize = 12;
/// Bytes per rx ring slot.
pub const RX_SLOT: usize = 8;
/// Bytes of a `netif_extra_info`.
pub const EXTRA_LEN: usize = 8;

/// `NETTXF_csum_blank`: the protocol checksum is to be filled in.
pub const TXF_CSUM_BLANK: u16 = 1 << 0;
/// `NETTXF_data_validated`: the checksum is known good.
pub const TXF_DATA_VALIDATED: u16 = 1 << 1;
/// `NETTXF_more_data`: the packet continues in the next slot.
pub const TXF_MORE_DATA: u16 = 1 << 2;
/// `NETTXF_extra_info`: extra info slots follow this request.
pub const TXF_EXTRA_INFO: u16 = 1 << 3;

/// `NETRXF_data_validated`.
pub const RXF_DATA_VALIDATED: u16 = 1 << 0;
/// `NETRXF_csum_blank`.
pub const RXF_CSUM_BLANK: u16 = 1 << 1;
/// `NETRXF_more_data`.
pub const RXF_MORE_DATA: u16 = 1 << 2;
/// `NETRXF_extra_info`.
pub const RXF_EXTRA_INFO: u16 = 1 << 3;

/// `XEN_NETIF_RSP_DROPPED`.
pub const RSP_DROPPED: i16 = -2;
/// `XEN_NETIF_RSP_ERROR`.
pub const RSP_ERROR: i16 = -1;
/// `XEN_NETIF_RSP_OKAY`.
pub const RSP_OKAY: i16 = 0;
/// `XEN_NETIF_RSP_NULL`: the response to an extra info slot.
pub const RSP_NULL: i16 = 1;

/// `XEN_NETIF_EXTRA_TYPE_*`.
pub const EXTRA_NONE: u8 = 0;
pub const EXTRA_GSO: u8 = 1;
pub const EXTRA_MCAST_ADD: u8 = 2;
pub const EXTRA_MCAST_DEL: u8 = 3;
pub const EXTRA_HASH: u8 = 4;
/// Types defined by netif.h (`XEN_NETIF_EXTRA_TYPE_MAX`).
pub const EXTRA_TYPE_MAX: u8 = 5;
/// `XEN_NETIF_EXTRA_FLAG_MORE`: another extra info slot follows.
pub const EXTRA_FLAG_MORE: u8 = 1 << 0;

/// `XEN_NETIF_GSO_TYPE_*`.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 2;

/// `XEN_NETIF_NR_SLOTS_MIN`: slots per packet a backend must accept
/// (Linux netback refuses a frontend that uses more).
pub const MAX_SLOTS: usize = 18;
/// `XEN_NETIF_MAX_TX_SIZE`: the largest packet.
pub const MAX_PACKET: usize = 0xffff;
/// A Xen page: no fragment may cross it.
pub const PAGE: usize = 4096;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// One tx slot as a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxRequest {
    pub gref: u32,
    pub offset: u16,
    pub flags: u16,
    pub id: u16,
    pub size: u16,
}

impl TxRequest {
    /// Decodes a copied slot (`None` if shorter than a slot).
    pub fn parse(b: &[u8]) -> Option<TxRequest> {
        let b = b.get(..TX_SLOT)?;
        Some(TxRequest {
            gref: u32_at(b, 0),
            offset: u16_at(b, 4),
            flags: u16_at(b, 6),
            id: u16_at(b, 8),
            size: u16_at(b, 10),
        })
    }
    /// Encodes into a slot.
    pub fn encode(&self) -> [u8; TX_SLOT] {
        let mut b = [0u8; TX_SLOT];
        b[0..4].copy_from_slice(&self.gref.to_le_bytes());
        b[4..6].copy_from_slice(&self.offset.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..10].copy_from_slice(&self.id.to_le_bytes());
        b[10..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }
    pub fn more_data(&self) -> bool {
        self.flags & TXF_MORE_DATA != 0
    }
    pub fn extra_info(&self) -> bool {
        self.flags & TXF_EXTRA_INFO != 0
    }
    pub fn csum_blank(&self) -> bool {
        self.flags & TXF_CSUM_BLANK != 0
    }
    pub fn data_validated(&self) -> bool {
        self.flags & TXF_DATA_VALIDATED != 0
    }
    /// The fragment stays inside its page (`offset + len <= 4096`).
    pub fn fits_page(&self, len: usize) -> bool {
        usize::from(self.offset) + len <= PAGE
    }
}

/// An extra info segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    /// `XEN_NETIF_EXTRA_TYPE_GSO`.
    Gso { size: u16, kind: u8, features: u16 },
    /// `XEN_NETIF_EXTRA_TYPE_MCAST_ADD`.
    McastAdd([u8; 6]),
    /// `XEN_NETIF_EXTRA_TYPE_MCAST_DEL`.
    McastDel([u8; 6]),
    /// Any other type in range (kept raw: hash, none).
    Other { kind: u8, data: [u8; 6] },
}

impl Extra {
    /// Decodes a slot: the segment and whether another follows
    /// (`XEN_NETIF_EXTRA_FLAG_MORE`). `Err` for a type netif.h does not
    /// define (0 and >= `XEN_NETIF_EXTRA_TYPE_MAX`), which Linux netback
    /// treats as a fatal frontend error.
    pub fn parse(b: &[u8]) -> Result<(Extra, bool), &'static str> {
        let b = b.get(..EXTRA_LEN).ok_or("short extra info slot")?;
        let kind = b[0];
        let more = b[1] & EXTRA_FLAG_MORE != 0;
        let mut addr = [0u8; 6];
        addr.copy_from_slice(&b[2..8]);
        let e = match kind {
            EXTRA_GSO => Extra::Gso {
                size: u16_at(b, 2),
                kind: b[4],
                features: u16_at(b, 6),
            },
            EXTRA_MCAST_ADD => Extra::McastAdd(addr),
            EXTRA_MCAST_DEL => Extra::McastDel(addr),
            k if k == EXTRA_NONE || k >= EXTRA_TYPE_MAX => {
                return Err("extra info of unknown type")
            }
            k => {
                let mut data = [0u8; 6];
                data.copy_from_slice(&b[2..8]);
                Extra::Other { kind: k, data }
            }
        };
        Ok((e, more))
    }
    /// Encodes (`more` sets the chain flag); the rest of a tx slot is
    /// padding.
    pub fn encode(&self, more: bool) -> [u8; EXTRA_LEN] {
        let mut b = [0u8; EXTRA_LEN];
        b[1] = if more { EXTRA_FLAG_MORE } else { 0 };
        match *self {
            Extra::Gso {
                size,
                kind,
                features,
            } => {
                b[0] = EXTRA_GSO;
                b[2..4].copy_from_slice(&size.to_le_bytes());
                b[4] = kind;
                b[6..8].copy_from_slice(&features.to_le_bytes());
            }
            Extra::McastAdd(a) => {
                b[0] = EXTRA_MCAST_ADD;
                b[2..8].copy_from_slice(&a);
            }
            Extra::McastDel(a) => {
                b[0] = EXTRA_MCAST_DEL;
                b[2..8].copy_from_slice(&a);
            }
            Extra::Other { kind, data } => {
                b[0] = kind;
                b[2..8].copy_from_slice(&data);
            }
        }
        b
    }
}

/// A tx response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxResponse {
    pub id: u16,
    pub status: i16,
}

impl TxResponse {
    pub fn encode(&self) -> [u8; 4] {
        let mut b = [0u8; 4];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.status.to_le_bytes());
        b
    }
    pub fn parse(b: &[u8]) -> Option<TxResponse> {
        let b = b.get(..4)?;
        Some(TxResponse {
            id: u16_at(b, 0),
            status: u16_at(b, 2) as i16,
        })
    }
}

/// An rx request: a page the frontend posts for the backend to fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxRequest {
    pub id: u16,
    pub gref: u32,
}

impl RxRequest {
    pub fn parse(b: &[u8]) -> Option<RxRequest> {
        let b = b.get(..RX_SLOT)?;
        Some(RxRequest {
            id: u16_at(b, 0),
            gref: u32_at(b, 4),
        })
    }
    pub fn encode(&self) -> [u8; RX_SLOT] {
        let mut b = [0u8; RX_SLOT];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[4..8].copy_from_slice(&self.gref.to_le_bytes());
        b
    }
}

/// An rx response (a data slot; an extra info slot is written with
/// [`Extra::encode`] in its place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxResponse {
    pub id: u16,
    pub offset: u16,
    pub flags: u16,
    pub status: i16,
}

impl RxResponse {
    pub fn encode(&self) -> [u8; RX_SLOT] {
        let mut b = [0u8; RX_SLOT];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.offset.to_le_bytes());
        b[4..6].copy_from_slice(&self.flags.to_le_bytes());
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b
    }
    pub fn parse(b: &[u8]) -> Option<RxResponse> {
        let b = b.get(..RX_SLOT)?;
        Some(RxResponse {
            id: u16_at(b, 0),
            offset: u16_at(b, 2),
            flags: u16_at(b, 4),
            status: u16_at(b, 6) as i16,
        })
    }
}

/// A whole tx packet as the backend checked it: the slots it used (the
/// first request, its extra info slots, the more_data chain) and what they
/// say. Built by [`TxPacket::gather`] from slots already copied out of the
/// ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    /// Data slots in order: first, then each `more_data` fragment.
    pub frags: Vec<TxRequest>,
    /// Bytes of each fragment (the first's is its size minus the rest).
    pub lens: Vec<usize>,
    /// Extra info segments (GSO at most once).
    pub gso: Option<(u16, u8)>,
    /// Slots consumed in all (data plus extra info).
    pub slots: usize,
    /// Extra info slots among them, each right after the first request.
    pub extras: usize,
    /// The packet's total size (the first request's `size`).
    pub total: usize,
}

/// Why a packet is refused: `slots` slots were consumed (each gets a
/// response), `fatal` means the frontend broke the protocol so badly the
/// device must be refused (Linux netback's `xenvif_fatal_tx_err`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxRefused {
    pub slots: usize,
    /// Extra info slots among them (right after the first).
    pub extras: usize,
    pub fatal: bool,
    pub why: &'static str,
}

impl TxPacket {
    /// Gathers one packet from `avail` copied slots (the first is a data
    /// request). `Ok(None)`: the packet continues beyond `avail` (wait for
    /// the frontend to post the rest). Checked: extra info types, one GSO
    /// at most, `max_slots` data slots, fragments inside their page, sizes
    /// that add up (the first slot's size covers every fragment), at most
    /// [`MAX_PACKET`] bytes.
    pub fn gather(
        avail: &[[u8; TX_SLOT]],
        max_slots: usize,
    ) -> Result<Option<TxPacket>, TxRefused> {
        let Some(first) = avail.first().and_then(|b| TxRequest::parse(b)) else {
            return Ok(None);
        };
        let mut p = TxPacket {
            frags: vec![first],
            lens: vec![0],
            gso: None,
            slots: 1,
            extras: 0,
            total: usize::from(first.size),
        };
        let refuse = |slots: usize, extras: usize, fatal: bool, why: &'static str| TxRefused {
            slots,
            extras,
            fatal,
            why,
        };
        if first.extra_info() {
            loop {
                let Some(b) = avail.get(p.slots) else {
                    return Ok(None);
                };
                p.slots += 1;
                p.extras += 1;
                let (e, more) = match Extra::parse(b) {
                    Ok(x) => x,
                    Err(why) => return Err(refuse(p.slots, p.extras, true, why)),
                };
                if let Extra::Gso { size, kind, .. } = e {
                    if p.gso.is_some() {
                        return Err(refuse(
                            p.slots,
                            p.extras,
                            true,
                            "two GSO extra info segments",
                        ));
                    }
                    p.gso = Some((size, kind));
                }
                if !more {
                    break;
                }
                if p.extras >= usize::from(EXTRA_TYPE_MAX) {
                    return Err(refuse(
                        p.slots,
                        p.extras,
                        true,
                        "too many extra info segments",
                    ));
                }
            }
        }
        let mut last = first;
        while last.more_data() {
            let Some(b) = avail.get(p.slots) else {
                return Ok(None);
            };
            let Some(r) = TxRequest::parse(b) else {
                return Ok(None);
            };
            p.slots += 1;
            p.frags.push(r);
            p.lens.push(usize::from(r.size));
            last = r;
            if p.frags.len() > max_slots {
                // Consume the whole chain so the ring stays in step? Linux
                // treats more than the fatal limit as a broken frontend.
                return Err(refuse(
                    p.slots,
                    p.extras,
                    true,
                    "packet uses more slots than allowed",
                ));
            }
        }
        let rest: usize = p.lens[1..].iter().sum();
        if rest > p.total {
            return Err(refuse(
                p.slots,
                p.extras,
                false,
                "fragments larger than the packet",
            ));
        }
        p.lens[0] = p.total - rest;
        if p.total > MAX_PACKET {
            return Err(refuse(p.slots, p.extras, false, "packet over 64 KiB"));
        }
        for (r, &len) in p.frags.iter().zip(&p.lens) {
            if !r.fits_page(len) {
                return Err(refuse(p.slots, p.extras, true, "fragment crosses its page"));
            }
        }
        if p.total < 14 {
            return Err(refuse(
                p.slots,
                p.extras,
                false,
                "packet shorter than an Ethernet header",
            ));
        }
        if let Some((size, kind)) = p.gso {
            if size == 0 || !matches!(kind, GSO_TCPV4 | GSO_TCPV6) {
                return Err(refuse(
                    p.slots,
                    p.extras,
                    false,
                    "GSO of unknown type or size 0",
                ));
            }
        }
        Ok(Some(p))
    }
}
