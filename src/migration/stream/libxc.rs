//! The libxc v2/v3 stream for an x86 HVM domain
//! (`docs/specs/libxc-migration-stream.pandoc`).
//!
//! Image header (24 bytes, big-endian): marker `0xFFFFFFFFFFFFFFFF`, id
//! `"XENF"`, version 2 or 3, options (bit 0: big-endian), reserved. Domain
//! header (16 bytes, stream byte order): type (2 = x86 HVM), page shift (12),
//! Xen major/minor. Then records until END.
//!
//! Order, as [`LibxcReader`] enforces it: in a v3 stream the static data
//! (X86_CPUID_POLICY, X86_MSR_POLICY) comes before STATIC_DATA_END and
//! everything else after it; a v2 stream has neither and behaves as if
//! STATIC_DATA_END came first. HVM_CONTEXT and HVM_PARAMS may come in either
//! order (the spec and real Xen disagree). Unknown optional records are
//! returned as [`LibxcRecord::Optional`] for the caller to use or skip; an
//! unknown mandatory record is refused.

use std::io::{Read, Write};

use super::{
    read_raw_record, write_raw_record, Le, RawRecord, Sink, Src, StreamError, REC_TYPE_OPTIONAL,
};

const LAYER: &str = "libxc";

/// Image header marker.
pub const MARKER: u64 = u64::MAX;
/// Image header id, "XENF".
pub const ID: u32 = 0x5845_4E46;
/// Domain type x86 PV.
pub const DHDR_TYPE_X86_PV: u32 = 1;
/// Domain type x86 HVM.
pub const DHDR_TYPE_X86_HVM: u32 = 2;
/// The page size of every x86 stream.
pub const PAGE_SHIFT: u16 = 12;
/// Bytes in a page.
pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;
/// Most pfns a PAGE_DATA batch may carry when xenkvm writes one (libxc's
/// `MAX_BATCH_SIZE`); reading accepts whatever fits in the record limit.
pub const MAX_BATCH: usize = 1024;
/// The pfn part of a PAGE_DATA entry (bits 51-0).
pub const PFN_MASK: u64 = (1 << 52) - 1;

/// Record type codes.
pub mod rec {
    /// END
    pub const END: u32 = 0x00;
    /// PAGE_DATA
    pub const PAGE_DATA: u32 = 0x01;
    /// X86_PV_INFO
    pub const X86_PV_INFO: u32 = 0x02;
    /// X86_PV_P2M_FRAMES
    pub const X86_PV_P2M_FRAMES: u32 = 0x03;
    /// X86_PV_VCPU_BASIC
    pub const X86_PV_VCPU_BASIC: u32 = 0x04;
    /// X86_PV_VCPU_EXTENDED
    pub const X86_PV_VCPU_EXTENDED: u32 = 0x05;
    /// X86_PV_VCPU_XSAVE
    pub const X86_PV_VCPU_XSAVE: u32 = 0x06;
    /// SHARED_INFO
    pub const SHARED_INFO: u32 = 0x07;
    /// X86_TSC_INFO
    pub const X86_TSC_INFO: u32 = 0x08;
    /// HVM_CONTEXT
    pub const HVM_CONTEXT: u32 = 0x09;
    /// HVM_PARAMS
    pub const HVM_PARAMS: u32 = 0x0A;
    /// TOOLSTACK (deprecated)
    pub const TOOLSTACK: u32 = 0x0B;
    /// X86_PV_VCPU_MSRS
    pub const X86_PV_VCPU_MSRS: u32 = 0x0C;
    /// VERIFY
    pub const VERIFY: u32 = 0x0D;
    /// CHECKPOINT
    pub const CHECKPOINT: u32 = 0x0E;
    /// CHECKPOINT_DIRTY_PFN_LIST
    pub const CHECKPOINT_DIRTY_PFN_LIST: u32 = 0x0F;
    /// STATIC_DATA_END
    pub const STATIC_DATA_END: u32 = 0x10;
    /// X86_CPUID_POLICY
    pub const X86_CPUID_POLICY: u32 = 0x11;
    /// X86_MSR_POLICY
    pub const X86_MSR_POLICY: u32 = 0x12;
}

/// The name of a libxc record type, for messages.
pub fn record_name(t: u32) -> String {
    let n = match t & !REC_TYPE_OPTIONAL {
        rec::END => "END",
        rec::PAGE_DATA => "PAGE_DATA",
        rec::X86_PV_INFO => "X86_PV_INFO",
        rec::X86_PV_P2M_FRAMES => "X86_PV_P2M_FRAMES",
        rec::X86_PV_VCPU_BASIC => "X86_PV_VCPU_BASIC",
        rec::X86_PV_VCPU_EXTENDED => "X86_PV_VCPU_EXTENDED",
        rec::X86_PV_VCPU_XSAVE => "X86_PV_VCPU_XSAVE",
        rec::SHARED_INFO => "SHARED_INFO",
        rec::X86_TSC_INFO => "X86_TSC_INFO",
        rec::HVM_CONTEXT => "HVM_CONTEXT",
        rec::HVM_PARAMS => "HVM_PARAMS",
        rec::TOOLSTACK => "TOOLSTACK",
        rec::X86_PV_VCPU_MSRS => "X86_PV_VCPU_MSRS",
        rec::VERIFY => "VERIFY",
        rec::CHECKPOINT => "CHECKPOINT",
        rec::CHECKPOINT_DIRTY_PFN_LIST => "CHECKPOINT_DIRTY_PFN_LIST",
        rec::STATIC_DATA_END => "STATIC_DATA_END",
        rec::X86_CPUID_POLICY => "X86_CPUID_POLICY",
        rec::X86_MSR_POLICY => "X86_MSR_POLICY",
        _ => return format!("{t:#010x}"),
    };
    if t & REC_TYPE_OPTIONAL != 0 {
        format!("{n} (optional)")
    } else {
        n.to_string()
    }
}

/// Image and domain header together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibxcHeader {
    /// Stream version, 2 or 3.
    pub version: u32,
    /// Domain type ([`DHDR_TYPE_X86_HVM`]).
    pub domain_type: u32,
    /// Xen major version of the sender (0 = converted legacy stream).
    pub xen_major: u32,
    /// Xen minor version of the sender.
    pub xen_minor: u32,
}

impl LibxcHeader {
    /// A v3 x86 HVM header claiming Xen `major.minor`.
    pub fn hvm_v3(xen_major: u32, xen_minor: u32) -> Self {
        LibxcHeader {
            version: 3,
            domain_type: DHDR_TYPE_X86_HVM,
            xen_major,
            xen_minor,
        }
    }

    /// Reads both headers after the 8-byte marker (read by the caller from `start`).
    pub fn read_after_marker<R: Read>(src: &mut Src<R>, start: u64) -> Result<Self, StreamError> {
        let mut b = [0u8; 16];
        src.exact(&mut b, LAYER, "image header", start)?;
        let id = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let version = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        let options = u16::from_be_bytes([b[8], b[9]]);
        let bad = |why: String| StreamError::invalid(LAYER, "image header", start, why);
        if id != ID {
            return Err(bad(format!("id {id:#010x} is not \"XENF\"")));
        }
        if version != 2 && version != 3 {
            return Err(bad(format!("version {version} (2 and 3 are supported)")));
        }
        if options & 1 != 0 {
            return Err(bad(
                "big-endian stream: only little-endian (x86) streams are supported".into(),
            ));
        }
        if options != 0 {
            return Err(bad(format!("unknown options {options:#x}")));
        }
        if b[10..16].iter().any(|x| *x != 0) {
            return Err(bad("reserved fields are not zero".into()));
        }
        let dstart = src.offset();
        let mut d = [0u8; 16];
        src.exact(&mut d, LAYER, "domain header", dstart)?;
        let le = Le(&d);
        let (domain_type, page_shift) = (le.u32(0), le.u16(4));
        let bad = |why: String| StreamError::invalid(LAYER, "domain header", dstart, why);
        match domain_type {
            DHDR_TYPE_X86_HVM => {}
            DHDR_TYPE_X86_PV => {
                return Err(bad(
                    "x86 PV domain: xenkvm runs HVM and PVH domains only".into()
                ))
            }
            t => return Err(bad(format!("domain type {t} (2 = x86 HVM is supported)"))),
        }
        if le.u16(6) != 0 {
            return Err(bad("reserved field is not zero".into()));
        }
        if page_shift != PAGE_SHIFT {
            return Err(bad(format!("page shift {page_shift} (x86 uses 12)")));
        }
        Ok(LibxcHeader {
            version,
            domain_type,
            xen_major: le.u32(8),
            xen_minor: le.u32(12),
        })
    }

    /// Reads both headers.
    pub fn read<R: Read>(src: &mut Src<R>) -> Result<Self, StreamError> {
        let start = src.offset();
        let mut m = [0u8; 8];
        src.exact(&mut m, LAYER, "image header", start)?;
        if u64::from_be_bytes(m) != MARKER {
            return Err(StreamError::invalid(
                LAYER,
                "image header",
                start,
                "bad marker (not a libxc stream)",
            ));
        }
        Self::read_after_marker(src, start)
    }

    /// Writes both headers (40 bytes).
    pub fn write<W: Write>(&self, sink: &mut Sink<W>) -> std::io::Result<()> {
        sink.put(&MARKER.to_be_bytes())?;
        sink.put(&ID.to_be_bytes())?;
        sink.put(&self.version.to_be_bytes())?;
        sink.put(&[0u8; 8])?; // options (LE), reserved
        sink.put(&self.domain_type.to_le_bytes())?;
        sink.put(&PAGE_SHIFT.to_le_bytes())?;
        sink.put(&[0u8; 2])?;
        sink.put(&self.xen_major.to_le_bytes())?;
        sink.put(&self.xen_minor.to_le_bytes())
    }
}

/// The type of one PAGE_DATA pfn entry (bits 63-60).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageType {
    /// A normal page; data follows.
    Normal,
    /// `BROKEN`: a page with a machine check; no data.
    Broken,
    /// `XALLOC`: allocate but send no data.
    XAlloc,
    /// `XTAB`: a hole; no data.
    XTab,
}

impl PageType {
    /// The nibble in bits 63-60.
    pub fn code(self) -> u64 {
        match self {
            PageType::Normal => 0x0,
            PageType::Broken => 0xD,
            PageType::XAlloc => 0xE,
            PageType::XTab => 0xF,
        }
    }

    /// Whether page data follows in the record.
    pub fn has_data(self) -> bool {
        self == PageType::Normal
    }

    fn from_code(c: u64) -> Option<Self> {
        Some(match c {
            0x0 => PageType::Normal,
            0xD => PageType::Broken,
            0xE => PageType::XAlloc,
            0xF => PageType::XTab,
            _ => return None,
        })
    }
}

/// One PAGE_DATA batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageData {
    /// (pfn, type) per entry.
    pub pfns: Vec<(u64, PageType)>,
    /// The data of every entry whose type has data, in order, 4096 bytes each.
    pub data: Vec<u8>,
}

impl PageData {
    /// The data pages with their pfns.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.pfns
            .iter()
            .filter(|(_, t)| t.has_data())
            .zip(self.data.chunks_exact(PAGE_SIZE))
            .map(|((pfn, _), d)| (*pfn, d))
    }
}

/// X86_TSC_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TscInfo {
    /// TSC mode (0 default, 1 always emulate, 2 never emulate).
    pub mode: u32,
    /// Guest TSC frequency in kHz.
    pub khz: u32,
    /// Elapsed nanoseconds (`tsc_offset`-related, see the spec).
    pub nsec: u64,
    /// Incarnation count.
    pub incarnation: u32,
}

/// One X86_CPUID_POLICY leaf (`xen_cpuid_leaf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuidLeaf {
    /// Leaf.
    pub leaf: u32,
    /// Subleaf, `0xFFFFFFFF` for none.
    pub subleaf: u32,
    /// eax, ebx, ecx, edx.
    pub regs: [u32; 4],
}

/// One X86_MSR_POLICY entry (`xen_msr_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsrEntry {
    /// MSR index.
    pub idx: u32,
    /// Flags (0).
    pub flags: u32,
    /// Value.
    pub val: u64,
}

impl PageData {
    /// Writes this batch as a PAGE_DATA record straight from its buffers
    /// (no intermediate body: a batch is 4 MiB).
    pub fn write<W: Write>(&self, sink: &mut Sink<W>) -> std::io::Result<()> {
        let head = page_data_head(&self.pfns, self.data.len())?;
        sink.put(&head)?;
        sink.put(&self.data)?;
        // The length is a multiple of 8: no padding.
        Ok(())
    }
}

/// The record header, count and pfn array of a PAGE_DATA record for
/// `pfns` followed by `data_len` bytes of page data (which must be 4096
/// per entry that has data): everything before the pages.
pub fn page_data_head(pfns: &[(u64, PageType)], data_len: usize) -> std::io::Result<Vec<u8>> {
    let ndata = pfns.iter().filter(|(_, t)| t.has_data()).count();
    let len = 8 + 8 * pfns.len() + data_len;
    if pfns.is_empty() || ndata * PAGE_SIZE != data_len || len > super::MAX_RECORD_BODY as usize {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "PAGE_DATA: {} pfns, {ndata} with data, {data_len} bytes of data",
                pfns.len(),
            ),
        ));
    }
    let mut head = Vec::with_capacity(16 + 8 * pfns.len());
    head.extend_from_slice(&rec::PAGE_DATA.to_le_bytes());
    head.extend_from_slice(&(len as u32).to_le_bytes());
    head.extend_from_slice(&(pfns.len() as u32).to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    for (pfn, t) in pfns {
        head.extend_from_slice(&((pfn & PFN_MASK) | (t.code() << 60)).to_le_bytes());
    }
    Ok(head)
}

/// The pfn entries of a PAGE_DATA record whose body is `len` bytes and
/// starts with `head` (at least the count and reserved words, and the whole
/// pfn array when it fits in `len`), checked as Xen's restore does; with
/// the offset where the page data starts.
pub(crate) fn page_data_pfns(
    head: &[u8],
    len: usize,
) -> Result<(Vec<(u64, PageType)>, usize), String> {
    if len < 8 {
        return Err(format!("body length {len} is shorter than 8"));
    }
    let le = Le(head);
    let count = le.u32(0) as usize;
    if count == 0 {
        return Err("count is 0".into());
    }
    if le.u32(4) != 0 {
        return Err("reserved field is not zero".into());
    }
    let pfn_end = count
        .checked_mul(8)
        .and_then(|n| n.checked_add(8))
        .filter(|n| *n <= len && *n <= head.len())
        .ok_or_else(|| format!("{count} pfns do not fit in a body of {len} bytes"))?;
    let mut pfns = Vec::with_capacity(count);
    for i in 0..count {
        let e = le.u64(8 + 8 * i);
        let code = e >> 60;
        let Some(t) = PageType::from_code(code) else {
            return Err(format!(
                "pfn entry {i} ({e:#018x}) has type {code:#x}, not valid for an HVM domain"
            ));
        };
        if e & !(PFN_MASK | (0xF << 60)) != 0 {
            return Err(format!(
                "pfn entry {i} ({e:#018x}) sets reserved bits 59-52"
            ));
        }
        pfns.push((e & PFN_MASK, t));
    }
    let ndata = pfns.iter().filter(|(_, t)| t.has_data()).count();
    let want = pfn_end + ndata * PAGE_SIZE;
    if len != want {
        return Err(format!(
            "body length {len} does not match {count} pfns with {ndata} data pages ({want})"
        ));
    }
    Ok((pfns, pfn_end))
}

/// Reads a PAGE_DATA record's page data itself, given its pfn entries
/// ([`LibxcReader::next_with`]).
pub type ReadPages<'a, R> =
    dyn FnMut(&[(u64, PageType)], &mut Src<R>) -> Result<(), StreamError> + 'a;

/// A decoded libxc record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibxcRecord {
    /// END.
    End,
    /// PAGE_DATA.
    PageData(PageData),
    /// X86_TSC_INFO.
    TscInfo(TscInfo),
    /// HVM_CONTEXT: the save.h blob (see [`crate::migration::hvm_context`]).
    HvmContext(Vec<u8>),
    /// HVM_PARAMS: (index, value) pairs.
    HvmParams(Vec<(u64, u64)>),
    /// VERIFY (debugging aid, no body).
    Verify,
    /// CHECKPOINT: end of one checkpoint.
    Checkpoint,
    /// CHECKPOINT_DIRTY_PFN_LIST: pfns.
    CheckpointDirtyPfnList(Vec<u64>),
    /// STATIC_DATA_END.
    StaticDataEnd,
    /// X86_CPUID_POLICY.
    CpuidPolicy(Vec<CpuidLeaf>),
    /// X86_MSR_POLICY.
    MsrPolicy(Vec<MsrEntry>),
    /// A record with the optional bit set that this module does not decode
    /// (xenkvm's own records among them): type with the bit, and body.
    Optional {
        /// Type, bit 31 set.
        rtype: u32,
        /// Body.
        body: Vec<u8>,
    },
}

fn le_u32s(v: &mut Vec<u8>, xs: &[u32]) {
    for x in xs {
        v.extend_from_slice(&x.to_le_bytes());
    }
}

impl LibxcRecord {
    /// Decodes `raw`, checking its body length and contents.
    pub fn decode(raw: &RawRecord) -> Result<Self, StreamError> {
        let name = record_name(raw.rtype);
        let b = &raw.body;
        let le = Le(b);
        let bad =
            |why: String| StreamError::invalid(LAYER, format!("record {name}"), raw.offset, why);
        let need_len = |n: usize| {
            if b.len() == n {
                Ok(())
            } else {
                Err(bad(format!("body length {} (must be {n})", b.len())))
            }
        };
        let multiple = |hdr: usize, each: usize| -> Result<usize, StreamError> {
            if b.len() < hdr || (b.len() - hdr) % each != 0 {
                Err(bad(format!(
                    "body length {} is not {hdr} + a multiple of {each}",
                    b.len()
                )))
            } else {
                Ok((b.len() - hdr) / each)
            }
        };
        Ok(match raw.rtype {
            rec::END => {
                need_len(0)?;
                LibxcRecord::End
            }
            rec::VERIFY => {
                need_len(0)?;
                LibxcRecord::Verify
            }
            rec::CHECKPOINT => {
                need_len(0)?;
                LibxcRecord::Checkpoint
            }
            rec::STATIC_DATA_END => {
                need_len(0)?;
                LibxcRecord::StaticDataEnd
            }
            rec::PAGE_DATA => {
                let (pfns, pfn_end) = page_data_pfns(b, b.len()).map_err(bad)?;
                LibxcRecord::PageData(PageData {
                    pfns,
                    data: b[pfn_end..].to_vec(),
                })
            }
            rec::X86_TSC_INFO => {
                need_len(24)?;
                if le.u32(20) != 0 {
                    return Err(bad("reserved field is not zero".into()));
                }
                LibxcRecord::TscInfo(TscInfo {
                    mode: le.u32(0),
                    khz: le.u32(4),
                    nsec: le.u64(8),
                    incarnation: le.u32(16),
                })
            }
            rec::HVM_CONTEXT => {
                if b.is_empty() {
                    return Err(bad("empty body".into()));
                }
                LibxcRecord::HvmContext(b.clone())
            }
            rec::HVM_PARAMS => {
                // Xen 4.6-4.8 may write an empty record.
                if b.is_empty() {
                    LibxcRecord::HvmParams(Vec::new())
                } else {
                    let n = multiple(8, 16)?;
                    if le.u32(4) != 0 {
                        return Err(bad("reserved field is not zero".into()));
                    }
                    if le.u32(0) as usize != n {
                        return Err(bad(format!(
                            "count {} does not match the body's {n} entries",
                            le.u32(0)
                        )));
                    }
                    LibxcRecord::HvmParams(
                        (0..n)
                            .map(|i| (le.u64(8 + 16 * i), le.u64(16 + 16 * i)))
                            .collect(),
                    )
                }
            }
            rec::CHECKPOINT_DIRTY_PFN_LIST => {
                let n = multiple(0, 8)?;
                LibxcRecord::CheckpointDirtyPfnList((0..n).map(|i| le.u64(8 * i)).collect())
            }
            rec::X86_CPUID_POLICY => {
                let n = multiple(0, 24)?;
                LibxcRecord::CpuidPolicy(
                    (0..n)
                        .map(|i| {
                            let o = 24 * i;
                            CpuidLeaf {
                                leaf: le.u32(o),
                                subleaf: le.u32(o + 4),
                                regs: [
                                    le.u32(o + 8),
                                    le.u32(o + 12),
                                    le.u32(o + 16),
                                    le.u32(o + 20),
                                ],
                            }
                        })
                        .collect(),
                )
            }
            rec::X86_MSR_POLICY => {
                let n = multiple(0, 16)?;
                LibxcRecord::MsrPolicy(
                    (0..n)
                        .map(|i| MsrEntry {
                            idx: le.u32(16 * i),
                            flags: le.u32(16 * i + 4),
                            val: le.u64(16 * i + 8),
                        })
                        .collect(),
                )
            }
            rec::X86_PV_INFO
            | rec::X86_PV_P2M_FRAMES
            | rec::X86_PV_VCPU_BASIC
            | rec::X86_PV_VCPU_EXTENDED
            | rec::X86_PV_VCPU_XSAVE
            | rec::X86_PV_VCPU_MSRS
            | rec::SHARED_INFO => return Err(bad("a PV-only record in an x86 HVM stream".into())),
            rec::TOOLSTACK => {
                return Err(bad(
                    "deprecated TOOLSTACK record (Xen 4.5 era): not supported".into(),
                ))
            }
            t if t & REC_TYPE_OPTIONAL != 0 => LibxcRecord::Optional {
                rtype: t,
                body: b.clone(),
            },
            t => return Err(bad(format!("unknown mandatory record type {t:#x}"))),
        })
    }

    /// The record's type and body.
    pub fn encode(&self) -> (u32, Vec<u8>) {
        match self {
            LibxcRecord::End => (rec::END, Vec::new()),
            LibxcRecord::Verify => (rec::VERIFY, Vec::new()),
            LibxcRecord::Checkpoint => (rec::CHECKPOINT, Vec::new()),
            LibxcRecord::StaticDataEnd => (rec::STATIC_DATA_END, Vec::new()),
            LibxcRecord::PageData(p) => {
                let mut v = Vec::with_capacity(8 + 8 * p.pfns.len() + p.data.len());
                le_u32s(&mut v, &[p.pfns.len() as u32, 0]);
                for (pfn, t) in &p.pfns {
                    v.extend_from_slice(&((pfn & PFN_MASK) | (t.code() << 60)).to_le_bytes());
                }
                v.extend_from_slice(&p.data);
                (rec::PAGE_DATA, v)
            }
            LibxcRecord::TscInfo(t) => {
                let mut v = Vec::with_capacity(24);
                le_u32s(&mut v, &[t.mode, t.khz]);
                v.extend_from_slice(&t.nsec.to_le_bytes());
                le_u32s(&mut v, &[t.incarnation, 0]);
                (rec::X86_TSC_INFO, v)
            }
            LibxcRecord::HvmContext(b) => (rec::HVM_CONTEXT, b.clone()),
            LibxcRecord::HvmParams(ps) => {
                let mut v = Vec::with_capacity(8 + 16 * ps.len());
                le_u32s(&mut v, &[ps.len() as u32, 0]);
                for (i, x) in ps {
                    v.extend_from_slice(&i.to_le_bytes());
                    v.extend_from_slice(&x.to_le_bytes());
                }
                (rec::HVM_PARAMS, v)
            }
            LibxcRecord::CheckpointDirtyPfnList(ps) => (
                rec::CHECKPOINT_DIRTY_PFN_LIST,
                ps.iter().flat_map(|p| p.to_le_bytes()).collect(),
            ),
            LibxcRecord::CpuidPolicy(ls) => {
                let mut v = Vec::with_capacity(24 * ls.len());
                for l in ls {
                    le_u32s(&mut v, &[l.leaf, l.subleaf]);
                    le_u32s(&mut v, &l.regs);
                }
                (rec::X86_CPUID_POLICY, v)
            }
            LibxcRecord::MsrPolicy(ms) => {
                let mut v = Vec::with_capacity(16 * ms.len());
                for m in ms {
                    le_u32s(&mut v, &[m.idx, m.flags]);
                    v.extend_from_slice(&m.val.to_le_bytes());
                }
                (rec::X86_MSR_POLICY, v)
            }
            LibxcRecord::Optional { rtype, body } => (rtype | REC_TYPE_OPTIONAL, body.clone()),
        }
    }

    /// Writes the record.
    pub fn write<W: Write>(&self, sink: &mut Sink<W>) -> std::io::Result<()> {
        let (t, b) = self.encode();
        write_raw_record(sink, t, &b)
    }
}

/// Where a libxc stream is, for the order checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// v3, before STATIC_DATA_END.
    Static,
    /// After STATIC_DATA_END (or from the start in v2).
    Dynamic,
    /// END seen.
    Done,
}

/// Reads libxc records and checks their order.
#[derive(Debug, Clone)]
pub struct LibxcReader {
    /// The headers.
    pub header: LibxcHeader,
    phase: Phase,
}

impl LibxcReader {
    /// Reads the headers from `src`.
    pub fn open<R: Read>(src: &mut Src<R>) -> Result<Self, StreamError> {
        Self::open_after_marker(src, None)
    }

    /// Reads the headers; `marker_at` is the offset of an 8-byte marker the
    /// caller has already consumed, if any.
    pub fn open_after_marker<R: Read>(
        src: &mut Src<R>,
        marker_at: Option<u64>,
    ) -> Result<Self, StreamError> {
        let header = match marker_at {
            Some(at) => LibxcHeader::read_after_marker(src, at)?,
            None => LibxcHeader::read(src)?,
        };
        Ok(LibxcReader {
            header,
            phase: if header.version >= 3 {
                Phase::Static
            } else {
                Phase::Dynamic
            },
        })
    }

    /// Whether END has been read.
    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Reads the next record; `Ok(None)` after END.
    pub fn next<R: Read>(
        &mut self,
        src: &mut Src<R>,
    ) -> Result<Option<(u64, LibxcRecord)>, StreamError> {
        if self.phase == Phase::Done {
            return Ok(None);
        }
        let raw = read_raw_record(src, LAYER, record_name)?;
        let r = LibxcRecord::decode(&raw)?;
        self.check_order(&raw, &r)?;
        Ok(Some((raw.offset, r)))
    }

    /// As [`next`](Self::next), but a PAGE_DATA record's page data is
    /// not read into memory: once its pfns are checked, `pages` is called
    /// with them and must read exactly the data (4096 bytes per entry that
    /// has data, in order) from `src` itself. The record comes back with
    /// empty `data`.
    pub fn next_with<R: Read>(
        &mut self,
        src: &mut Src<R>,
        pages: &mut ReadPages<'_, R>,
    ) -> Result<Option<(u64, LibxcRecord)>, StreamError> {
        if self.phase == Phase::Done {
            return Ok(None);
        }
        let (start, rtype, len) = super::read_record_header(src, LAYER, record_name)?;
        if rtype != rec::PAGE_DATA {
            let raw = super::read_record_rest(src, LAYER, record_name, (start, rtype, len))?;
            let r = LibxcRecord::decode(&raw)?;
            self.check_order(&raw, &r)?;
            return Ok(Some((raw.offset, r)));
        }
        let what = "record PAGE_DATA";
        let len = len as usize;
        let mut head = vec![0u8; len.min(8)];
        src.exact(&mut head, LAYER, what, start)?;
        let count = Le(&head).u32(0) as usize;
        if let Some(pfn_end) = count
            .checked_mul(8)
            .and_then(|n| n.checked_add(8))
            .filter(|n| len >= 8 && *n <= len)
        {
            // Grown as the bytes arrive (a lying count costs what is sent).
            let pfns = src.bytes((pfn_end - 8) as u64, LAYER, what, start)?;
            head.extend_from_slice(&pfns);
        }
        let (pfns, _) = page_data_pfns(&head, len)
            .map_err(|why| StreamError::invalid(LAYER, what, start, why))?;
        // The order is checked before any page is taken.
        let raw = RawRecord {
            rtype,
            offset: start,
            body: Vec::new(),
        };
        let r = LibxcRecord::PageData(PageData {
            pfns,
            data: Vec::new(),
        });
        self.check_order(&raw, &r)?;
        if let LibxcRecord::PageData(p) = &r {
            pages(&p.pfns, src)?;
        }
        // A valid PAGE_DATA body is a multiple of 8: no padding.
        Ok(Some((start, r)))
    }

    fn check_order(&mut self, raw: &RawRecord, r: &LibxcRecord) -> Result<(), StreamError> {
        let v = self.header.version;
        let bad = |why: String| {
            StreamError::invalid(
                LAYER,
                format!("record {}", record_name(raw.rtype)),
                raw.offset,
                why,
            )
        };
        match (r, self.phase) {
            (
                LibxcRecord::StaticDataEnd
                | LibxcRecord::CpuidPolicy(_)
                | LibxcRecord::MsrPolicy(_),
                _,
            ) if v < 3 => Err(bad(format!(
                "not allowed in a v{v} stream (v3 and later only)"
            ))),
            (LibxcRecord::StaticDataEnd, Phase::Static) => {
                self.phase = Phase::Dynamic;
                Ok(())
            }
            (LibxcRecord::StaticDataEnd, _) => Err(bad("a second STATIC_DATA_END".into())),
            (LibxcRecord::CpuidPolicy(_) | LibxcRecord::MsrPolicy(_), Phase::Static) => Ok(()),
            (LibxcRecord::CpuidPolicy(_) | LibxcRecord::MsrPolicy(_), _) => {
                Err(bad("static data after STATIC_DATA_END".into()))
            }
            (LibxcRecord::Optional { .. } | LibxcRecord::Verify, _) => Ok(()),
            (_, Phase::Static) => Err(bad("before STATIC_DATA_END".into())),
            (LibxcRecord::End, _) => {
                self.phase = Phase::Done;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
