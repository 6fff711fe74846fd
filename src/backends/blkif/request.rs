//! `blkif_request`/`blkif_response` of `io/blkif.h`, both ABIs, as bytes
//! copied once out of the ring.
//!
//! 64-bit (`x86_64-abi`, 112-byte slots): `operation u8 @0`, then per op:
//! read/write/flush/barrier `nr_segments u8 @1, handle u16 @2, id u64 @8,
//! sector_number u64 @16, seg[11] @24`; discard `flag u8 @1, handle @2,
//! id @8, sector_number @16, nr_sectors u64 @24`; indirect `indirect_op u8
//! @1, nr_segments u16 @2, id @8, sector_number @16, handle u16 @24,
//! indirect_grefs[8] u32 @28`. 32-bit (`x86_32-abi`, packed, 108 bytes):
//! the same fields with `id` at 4 and everything after it 4 bytes earlier
//! (indirect: `handle @20, indirect_grefs @24`). A segment is `gref u32,
//! first_sect u8, last_sect u8, pad u16`: bytes `[first_sect*512,
//! (last_sect+1)*512)` of one granted frame. An indirect page holds 512.
//! Responses: `id u64 @0, operation u8 @8, status i16 @10` (16 bytes, or
//! 12 in the 32-bit ABI), written whole with the padding zeroed.
//!
//! Parsing checks everything that does not need the disk or the grant
//! table: segment counts, `first_sect <= last_sect <= 7`, the indirect
//! inner op and page count. A request that fails keeps its `id` and
//! `operation` so it can be answered with an error.

/// `BLKIF_OP_READ`.
pub const OP_READ: u8 = 0;
/// `BLKIF_OP_WRITE`.
pub const OP_WRITE: u8 = 1;
/// `BLKIF_OP_WRITE_BARRIER`.
pub const OP_WRITE_BARRIER: u8 = 2;
/// `BLKIF_OP_FLUSH_DISKCACHE`.
pub const OP_FLUSH_DISKCACHE: u8 = 3;
/// `BLKIF_OP_DISCARD`.
pub const OP_DISCARD: u8 = 5;
/// `BLKIF_OP_INDIRECT`.
pub const OP_INDIRECT: u8 = 6;

/// `BLKIF_RSP_OKAY`.
pub const RSP_OKAY: i16 = 0;
/// `BLKIF_RSP_ERROR`.
pub const RSP_ERROR: i16 = -1;
/// `BLKIF_RSP_EOPNOTSUPP`.
pub const RSP_EOPNOTSUPP: i16 = -2;

/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`.
pub const MAX_SEGMENTS: usize = 11;
/// Indirect segments this backend accepts (`feature-max-indirect-segments`).
pub const MAX_INDIRECT_SEGMENTS: usize = 256;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`.
pub const MAX_INDIRECT_PAGES: usize = 8;
/// Segments in one indirect page.
pub const SEGS_PER_INDIRECT_PAGE: usize = 512;
/// A sector, the unit of every blkif offset and length.
pub const SECTOR: u64 = 512;
/// `BLKIF_DISCARD_SECURE`.
pub const DISCARD_SECURE: u8 = 1;

/// The request/response layout the frontend uses (`protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Abi {
    /// `x86_64-abi` (the default for a 64-bit backend).
    #[default]
    X86_64,
    /// `x86_32-abi`.
    X86_32,
}

impl Abi {
    /// From the frontend's `protocol` key (absent = native).
    pub fn from_protocol(p: Option<&str>) -> Option<Abi> {
        match p {
            None | Some("") | Some("x86_64-abi") => Some(Abi::X86_64),
            Some("x86_32-abi") => Some(Abi::X86_32),
            _ => None,
        }
    }
    /// Ring slot size: the larger of request and response.
    pub fn slot(self) -> usize {
        match self {
            Abi::X86_64 => 112,
            Abi::X86_32 => 108,
        }
    }
    /// Response size.
    pub fn response_len(self) -> usize {
        match self {
            Abi::X86_64 => 16,
            Abi::X86_32 => 12,
        }
    }
    /// Offset of `id` (fields after it follow at the same distances).
    fn id_off(self) -> usize {
        match self {
            Abi::X86_64 => 8,
            Abi::X86_32 => 4,
        }
    }
}

/// One data segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub gref: u32,
    pub first_sect: u8,
    pub last_sect: u8,
}

impl Segment {
    /// Decodes 8 bytes (no checks).
    pub fn decode(b: &[u8]) -> Segment {
        Segment {
            gref: get_u32(b, 0),
            first_sect: get_u8(b, 4),
            last_sect: get_u8(b, 5),
        }
    }
    /// Encodes 8 bytes (padding zero).
    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.gref.to_le_bytes());
        b[4] = self.first_sect;
        b[5] = self.last_sect;
        b
    }
    /// `first_sect <= last_sect <= 7`.
    pub fn valid(&self) -> bool {
        self.first_sect <= self.last_sect && self.last_sect <= 7
    }
    /// Byte offset in the frame.
    pub fn offset(&self) -> usize {
        usize::from(self.first_sect) * SECTOR as usize
    }
    /// Bytes (for a valid segment).
    pub fn len(&self) -> usize {
        (usize::from(self.last_sect) + 1 - usize::from(self.first_sect.min(self.last_sect)))
            * SECTOR as usize
    }
    /// Whether it is empty (never, for a valid segment).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a data request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RwOp {
    Read,
    Write,
    /// Write barrier: earlier writes complete first (data optional).
    Barrier,
    /// Flush the disk cache (after writing the data, if any).
    Flush,
}

impl RwOp {
    /// Wire value.
    pub fn code(self) -> u8 {
        match self {
            RwOp::Read => OP_READ,
            RwOp::Write => OP_WRITE,
            RwOp::Barrier => OP_WRITE_BARRIER,
            RwOp::Flush => OP_FLUSH_DISKCACHE,
        }
    }
    /// Whether data goes to the disk.
    pub fn writes(self) -> bool {
        !matches!(self, RwOp::Read)
    }
}

/// A request that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read, write, barrier or flush with 0..=11 direct segments.
    Rw {
        op: RwOp,
        handle: u16,
        id: u64,
        sector: u64,
        segs: Vec<Segment>,
    },
    /// Discard `nr_sectors` from `sector`.
    Discard {
        handle: u16,
        id: u64,
        sector: u64,
        nr_sectors: u64,
        secure: bool,
    },
    /// Read or write whose `nr_segments` segments live in the granted
    /// pages `pages` (`ceil(nr_segments / 512)` of them).
    Indirect {
        op: RwOp,
        handle: u16,
        id: u64,
        sector: u64,
        nr_segments: u16,
        pages: Vec<u32>,
    },
}

impl Request {
    /// The id to echo.
    pub fn id(&self) -> u64 {
        match self {
            Request::Rw { id, .. } | Request::Discard { id, .. } | Request::Indirect { id, .. } => {
                *id
            }
        }
    }
    /// The operation to echo in the response: for an indirect request its
    /// inner operation (`indirect_op`), as Linux's blkback answers and as
    /// Linux's blkfront checks (since the 2021 hardening it disables a disk
    /// whose response to an indirect write says `BLKIF_OP_INDIRECT`).
    pub fn operation(&self) -> u8 {
        match self {
            Request::Rw { op, .. } | Request::Indirect { op, .. } => op.code(),
            Request::Discard { .. } => OP_DISCARD,
        }
    }

    /// Encodes into a slot-sized buffer (the frontend's side; tests and
    /// benches). `buf` must be `abi.slot()` long.
    pub fn encode(&self, abi: Abi, buf: &mut [u8]) {
        buf.fill(0);
        let i = abi.id_off();
        match self {
            Request::Rw {
                op,
                handle,
                id,
                sector,
                segs,
            } => {
                buf[0] = op.code();
                buf[1] = segs.len() as u8;
                buf[2..4].copy_from_slice(&handle.to_le_bytes());
                buf[i..i + 8].copy_from_slice(&id.to_le_bytes());
                buf[i + 8..i + 16].copy_from_slice(&sector.to_le_bytes());
                for (k, s) in segs.iter().take(MAX_SEGMENTS).enumerate() {
                    let o = i + 16 + k * 8;
                    buf[o..o + 8].copy_from_slice(&s.encode());
                }
            }
            Request::Discard {
                handle,
                id,
                sector,
                nr_sectors,
                secure,
            } => {
                buf[0] = OP_DISCARD;
                buf[1] = if *secure { DISCARD_SECURE } else { 0 };
                buf[2..4].copy_from_slice(&handle.to_le_bytes());
                buf[i..i + 8].copy_from_slice(&id.to_le_bytes());
                buf[i + 8..i + 16].copy_from_slice(&sector.to_le_bytes());
                buf[i + 16..i + 24].copy_from_slice(&nr_sectors.to_le_bytes());
            }
            Request::Indirect {
                op,
                handle,
                id,
                sector,
                nr_segments,
                pages,
            } => {
                buf[0] = OP_INDIRECT;
                buf[1] = op.code();
                buf[2..4].copy_from_slice(&nr_segments.to_le_bytes());
                buf[i..i + 8].copy_from_slice(&id.to_le_bytes());
                buf[i + 8..i + 16].copy_from_slice(&sector.to_le_bytes());
                buf[i + 16..i + 18].copy_from_slice(&handle.to_le_bytes());
                for (k, g) in pages.iter().take(MAX_INDIRECT_PAGES).enumerate() {
                    let o = i + 20 + k * 4;
                    buf[o..o + 4].copy_from_slice(&g.to_le_bytes());
                }
            }
        }
    }
}

/// A request refused by the parser, with what to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub id: u64,
    pub operation: u8,
    /// `RSP_ERROR` or `RSP_EOPNOTSUPP`.
    pub status: i16,
    pub why: &'static str,
}

fn get_u8(b: &[u8], o: usize) -> u8 {
    b.get(o).copied().unwrap_or(0)
}
fn get_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([get_u8(b, o), get_u8(b, o + 1)])
}
fn get_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([
        get_u8(b, o),
        get_u8(b, o + 1),
        get_u8(b, o + 2),
        get_u8(b, o + 3),
    ])
}
fn get_u64(b: &[u8], o: usize) -> u64 {
    u64::from(get_u32(b, o)) | (u64::from(get_u32(b, o + 4)) << 32)
}

/// Decodes and checks one request copied out of the ring (`raw` is the
/// private copy; shorter input reads as zeros). `max_indirect` is the
/// advertised `feature-max-indirect-segments` (0: indirect refused).
pub fn parse_request(abi: Abi, raw: &[u8], max_indirect: usize) -> Result<Request, Refused> {
    parse_request_reusing(abi, raw, max_indirect, &mut Vec::new())
}

/// [`parse_request`] that builds a direct request's segment list in
/// `spare` (taken, cleared; left in place when the request is refused or
/// has no such list): a backend that hands the list back after each
/// request parses without allocating.
pub fn parse_request_reusing(
    abi: Abi,
    raw: &[u8],
    max_indirect: usize,
    spare: &mut Vec<Segment>,
) -> Result<Request, Refused> {
    let op = get_u8(raw, 0);
    let i = abi.id_off();
    let id = get_u64(raw, i);
    let sector = get_u64(raw, i + 8);
    // A refused indirect read or write is answered with its inner operation
    // too (see `Request::operation`).
    let echo = match (op, get_u8(raw, 1)) {
        (OP_INDIRECT, inner @ (OP_READ | OP_WRITE)) => inner,
        _ => op,
    };
    let refuse = |status, why| Refused {
        id,
        operation: echo,
        status,
        why,
    };
    match op {
        OP_READ | OP_WRITE | OP_WRITE_BARRIER | OP_FLUSH_DISKCACHE => {
            let rw = match op {
                OP_READ => RwOp::Read,
                OP_WRITE => RwOp::Write,
                OP_WRITE_BARRIER => RwOp::Barrier,
                _ => RwOp::Flush,
            };
            let n = usize::from(get_u8(raw, 1));
            if n > MAX_SEGMENTS {
                return Err(refuse(RSP_ERROR, "nr_segments over 11"));
            }
            if n == 0 && matches!(rw, RwOp::Read | RwOp::Write) {
                return Err(refuse(RSP_ERROR, "read or write without segments"));
            }
            let mut segs = std::mem::take(spare);
            segs.clear();
            segs.reserve(n);
            for k in 0..n {
                let o = i + 16 + k * 8;
                let s = Segment::decode(raw.get(o..o + 8).unwrap_or(&[0; 8]));
                if !s.valid() {
                    segs.clear();
                    *spare = segs;
                    return Err(refuse(
                        RSP_ERROR,
                        "segment with first_sect > last_sect or past 7",
                    ));
                }
                segs.push(s);
            }
            Ok(Request::Rw {
                op: rw,
                handle: get_u16(raw, 2),
                id,
                sector,
                segs,
            })
        }
        OP_DISCARD => Ok(Request::Discard {
            handle: get_u16(raw, 2),
            id,
            sector,
            nr_sectors: get_u64(raw, i + 16),
            secure: get_u8(raw, 1) & DISCARD_SECURE != 0,
        }),
        OP_INDIRECT => {
            if max_indirect == 0 {
                return Err(refuse(RSP_EOPNOTSUPP, "indirect requests not offered"));
            }
            let inner = match get_u8(raw, 1) {
                OP_READ => RwOp::Read,
                OP_WRITE => RwOp::Write,
                _ => return Err(refuse(RSP_ERROR, "indirect op other than read or write")),
            };
            let n = get_u16(raw, 2);
            if n == 0
                || usize::from(n) > max_indirect.min(MAX_INDIRECT_PAGES * SEGS_PER_INDIRECT_PAGE)
            {
                return Err(refuse(RSP_ERROR, "indirect nr_segments out of range"));
            }
            let npages = usize::from(n).div_ceil(SEGS_PER_INDIRECT_PAGE);
            let pages = (0..npages).map(|k| get_u32(raw, i + 20 + k * 4)).collect();
            Ok(Request::Indirect {
                op: inner,
                handle: get_u16(raw, i + 16),
                id,
                sector,
                nr_segments: n,
                pages,
            })
        }
        _ => Err(refuse(RSP_EOPNOTSUPP, "unknown operation")),
    }
}

/// Decodes and checks the segments `[first, first + n)` of an indirect
/// page copied into `page` (4096 bytes).
pub fn parse_indirect_segments(
    page: &[u8],
    n: usize,
    out: &mut Vec<Segment>,
) -> Result<(), &'static str> {
    for k in 0..n.min(SEGS_PER_INDIRECT_PAGE) {
        let s = Segment::decode(page.get(k * 8..k * 8 + 8).unwrap_or(&[0; 8]));
        if !s.valid() {
            return Err("indirect segment with first_sect > last_sect or past 7");
        }
        out.push(s);
    }
    Ok(())
}

/// A response, fully initialised (padding zero), in `abi`'s layout.
pub fn encode_response(abi: Abi, id: u64, operation: u8, status: i16) -> ([u8; 16], usize) {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8] = operation;
    b[10..12].copy_from_slice(&status.to_le_bytes());
    (b, abi.response_len())
}

/// Decodes a response (the frontend's side).
pub fn decode_response(b: &[u8]) -> (u64, u8, i16) {
    (get_u64(b, 0), get_u8(b, 8), get_u16(b, 10) as i16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_request_64bit_read_layout_decodes() {
        let mut b = [0u8; 112];
        b[0] = OP_READ;
        b[1] = 2;
        b[2..4].copy_from_slice(&51712u16.to_le_bytes());
        b[8..16].copy_from_slice(&7u64.to_le_bytes());
        b[16..24].copy_from_slice(&100u64.to_le_bytes());
        b[24..32].copy_from_slice(
            &Segment {
                gref: 9,
                first_sect: 1,
                last_sect: 7,
            }
            .encode(),
        );
        b[32..40].copy_from_slice(
            &Segment {
                gref: 10,
                first_sect: 0,
                last_sect: 0,
            }
            .encode(),
        );
        let r = parse_request(Abi::X86_64, &b, 256).unwrap();
        let Request::Rw {
            op,
            handle,
            id,
            sector,
            segs,
        } = r
        else {
            panic!()
        };
        assert_eq!((op, handle, id, sector), (RwOp::Read, 51712, 7, 100));
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].offset(), 512);
        assert_eq!(segs[0].len(), 3584);
        assert_eq!(segs[1].len(), 512);
    }

    #[test]
    fn parse_request_32bit_layout_has_id_at_4() {
        let mut b = [0u8; 108];
        b[0] = OP_WRITE;
        b[1] = 1;
        b[4..12].copy_from_slice(&0x1122u64.to_le_bytes());
        b[12..20].copy_from_slice(&5u64.to_le_bytes());
        b[20..28].copy_from_slice(
            &Segment {
                gref: 3,
                first_sect: 0,
                last_sect: 7,
            }
            .encode(),
        );
        let r = parse_request(Abi::X86_32, &b, 256).unwrap();
        assert_eq!(r.id(), 0x1122);
        let Request::Rw { sector, segs, .. } = r else {
            panic!()
        };
        assert_eq!(sector, 5);
        assert_eq!(segs[0].gref, 3);
    }

    #[test]
    fn parse_request_bad_segments_refused_with_id() {
        let mut b = [0u8; 112];
        b[0] = OP_READ;
        b[1] = 12;
        b[8] = 42;
        let e = parse_request(Abi::X86_64, &b, 256).unwrap_err();
        assert_eq!((e.id, e.operation, e.status), (42, OP_READ, RSP_ERROR));
        b[1] = 1;
        b[24..32].copy_from_slice(
            &Segment {
                gref: 1,
                first_sect: 5,
                last_sect: 4,
            }
            .encode(),
        );
        assert!(parse_request(Abi::X86_64, &b, 256).is_err());
        b[24..32].copy_from_slice(
            &Segment {
                gref: 1,
                first_sect: 0,
                last_sect: 8,
            }
            .encode(),
        );
        assert!(parse_request(Abi::X86_64, &b, 256).is_err());
        b[0] = 99;
        assert_eq!(
            parse_request(Abi::X86_64, &b, 256).unwrap_err().status,
            RSP_EOPNOTSUPP
        );
    }

    #[test]
    fn parse_request_indirect_limits_checked() {
        for abi in [Abi::X86_64, Abi::X86_32] {
            let r = Request::Indirect {
                op: RwOp::Write,
                handle: 1,
                id: 3,
                sector: 8,
                nr_segments: 256,
                pages: vec![11],
            };
            let mut b = vec![0u8; abi.slot()];
            r.encode(abi, &mut b);
            assert_eq!(parse_request(abi, &b, 256), Ok(r));
            b[2..4].copy_from_slice(&257u16.to_le_bytes());
            assert!(parse_request(abi, &b, 256).is_err());
            b[2..4].copy_from_slice(&1u16.to_le_bytes());
            b[1] = OP_DISCARD;
            assert!(parse_request(abi, &b, 256).is_err());
        }
    }

    #[test]
    fn encode_response_pads_with_zero() {
        let (b, n) = encode_response(Abi::X86_64, u64::MAX, 1, -1);
        assert_eq!(n, 16);
        assert_eq!(b[9], 0);
        assert_eq!(&b[12..], &[0, 0, 0, 0]);
        assert_eq!(decode_response(&b), (u64::MAX, 1, -1));
        assert_eq!(encode_response(Abi::X86_32, 1, 0, 0).1, 12);
    }
}
