//! The sections added after the first version of the record (tags 7-10),
//! still body version 1: a reader that does not know them skips them, and
//! every one of them is optional. They carry what a restore needs beyond the
//! placement the first six sections describe:
//!
//! - 7 PAGE: kind u32 (0 shared_info, 1 grant frame, 2 grant status
//!   frame), index u32, 4096 bytes: a VMM page's contents (shared_info and
//!   the grant frames are VMM overlay pages, not guest RAM, so PAGE_DATA
//!   does not hold them: the page under an overlay is the RAM it hides);
//! - 8 DOMAIN_EXTRA: width u32 (0 not latched, 1 64-bit, 2 32-bit),
//!   reserved u32, vm_assist u64, count u32, count x {index u32, reserved
//!   u32, value u64}: the HVM params that are not 0 (all of them, not just
//!   those Xen's HVM_PARAMS record lists: `CALLBACK_IRQ`, the store and
//!   console pfns and ports);
//! - 9 VCPU_EXTRA: id u32, flags u32 (bit 0 up, 1 initialised, 2 a
//!   periodic timer's last event is given, 3 a FIFO control block, 4 a
//!   runstate area, 5 that area has the 32-bit layout), ns since the
//!   periodic timer's last event u64, FIFO control block gpa u64, 16 FIFO
//!   queue tails u32, piece count u32, pieces {gpa u64, len u64}: the
//!   runstate area as guest-physical pieces (it may straddle pages);
//! - 10 FIFO: count u32, count x event array gfn u64, count u32, count x
//!   {port u32, vcpu u32, priority u8, pending u8, reserved u16}: each
//!   port's last queue and its pending-without-a-word flag.

use std::collections::BTreeSet;

use super::{Cur, DecodeError, MAX_PORT, MAX_VCPUS};

/// Section tags of this module.
pub mod tag {
    /// A VMM page's contents.
    pub const PAGE: u32 = 7;
    /// Width, vm_assist, HVM params.
    pub const DOMAIN_EXTRA: u32 = 8;
    /// One vCPU's flags, FIFO registration and runstate area.
    pub const VCPU_EXTRA: u32 = 9;
    /// FIFO event arrays and per-port queue state.
    pub const FIFO: u32 = 10;
}

/// Bytes of a page.
pub const PAGE_LEN: usize = 4096;
/// Most pieces a runstate area is made of.
pub const MAX_PIECES: usize = 4;
/// Most FIFO event array pages (`EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES`).
pub const MAX_ARRAY_PAGES: usize = 128;
/// HVM param indexes are below this.
pub const MAX_PARAM: u32 = 64;

/// Which VMM page a PAGE section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageKind {
    /// shared_info.
    SharedInfo,
    /// Grant frame `n`.
    Grant(u32),
    /// Grant status frame `n` (v2).
    GrantStatus(u32),
}

/// A VMM page's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedPage {
    /// Which page.
    pub kind: PageKind,
    /// Its 4096 bytes.
    pub data: Vec<u8>,
}

/// Domain-wide state beyond placement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainExtra {
    /// 0: not latched, 1: 64-bit, 2: 32-bit.
    pub width: u32,
    /// `vm_assist` bits.
    pub vm_assist: u64,
    /// HVM params that are not 0: (index, value), indexes distinct.
    pub params: Vec<(u32, u64)>,
}

/// A runstate area as guest-physical pieces.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunstateAreaPieces {
    /// The 32-bit (compat) layout.
    pub compat32: bool,
    /// (gpa, len), in order.
    pub pieces: Vec<(u64, u64)>,
}

/// One vCPU's state beyond the VCPU section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VcpuExtra {
    /// vCPU id.
    pub id: u32,
    /// Up.
    pub up: bool,
    /// `is_initialised`.
    pub initialised: bool,
    /// Periodic timer: ns from its last event to the save.
    pub periodic_since_last_ns: Option<u64>,
    /// FIFO control block (guest-physical).
    pub fifo_control_gpa: Option<u64>,
    /// FIFO queue tails by priority.
    pub fifo_tails: [u32; 16],
    /// The runstate area.
    pub runstate_area: Option<RunstateAreaPieces>,
}

/// A port's FIFO queue state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FifoPort {
    /// Port.
    pub port: u32,
    /// Last queue's vCPU.
    pub vcpu: u32,
    /// Last queue's priority (0-15).
    pub priority: u8,
    /// Pending while it had no event word.
    pub pending: bool,
}

/// The FIFO ABI's event arrays and per-port state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FifoState {
    /// Event array page gfns, in order.
    pub array_gfns: Vec<u64>,
    /// Ports whose queue state is not the default.
    pub ports: Vec<FifoPort>,
}

fn opt(v: Option<u64>) -> u64 {
    v.unwrap_or(u64::MAX)
}

pub(super) fn encode_page(p: &SavedPage) -> Vec<u8> {
    let (kind, index) = match p.kind {
        PageKind::SharedInfo => (0u32, 0u32),
        PageKind::Grant(i) => (1, i),
        PageKind::GrantStatus(i) => (2, i),
    };
    let mut b = Vec::with_capacity(8 + PAGE_LEN);
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&index.to_le_bytes());
    let mut data = p.data.clone();
    data.resize(PAGE_LEN, 0);
    b.extend_from_slice(&data);
    b
}

pub(super) fn decode_page(c: &mut Cur) -> Result<SavedPage, DecodeError> {
    let at = c.at;
    let kind = c.u32("PAGE kind")?;
    let index = c.u32("PAGE index")?;
    let kind = match (kind, index) {
        (0, 0) => PageKind::SharedInfo,
        (1, i) if i < super::MAX_GRANT_FRAMES => PageKind::Grant(i),
        (2, i) if i < super::MAX_GRANT_FRAMES => PageKind::GrantStatus(i),
        (k, i) => {
            return Err(DecodeError {
                offset: at,
                why: format!("PAGE kind {k} index {i}"),
            })
        }
    };
    let data = c.take(PAGE_LEN, "PAGE data")?.to_vec();
    Ok(SavedPage { kind, data })
}

pub(super) fn encode_domain(d: &DomainExtra) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + 16 * d.params.len());
    b.extend_from_slice(&d.width.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&d.vm_assist.to_le_bytes());
    b.extend_from_slice(&(d.params.len() as u32).to_le_bytes());
    for (i, v) in &d.params {
        b.extend_from_slice(&i.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

pub(super) fn decode_domain(c: &mut Cur) -> Result<DomainExtra, DecodeError> {
    let at = c.at;
    let width = c.u32("DOMAIN_EXTRA width")?;
    if width > 2 {
        return Err(DecodeError {
            offset: at,
            why: format!("DOMAIN_EXTRA width {width} (0-2)"),
        });
    }
    c.u32("DOMAIN_EXTRA reserved")?;
    let vm_assist = c.u64("DOMAIN_EXTRA vm_assist")?;
    let n = c.count("DOMAIN_EXTRA params", 16, MAX_PARAM as usize)?;
    let mut seen = BTreeSet::new();
    let mut params = Vec::with_capacity(n);
    for _ in 0..n {
        let at = c.at;
        let i = c.u32("DOMAIN_EXTRA param index")?;
        c.u32("DOMAIN_EXTRA param reserved")?;
        let v = c.u64("DOMAIN_EXTRA param value")?;
        if i >= MAX_PARAM || !seen.insert(i) {
            return Err(DecodeError {
                offset: at,
                why: format!("DOMAIN_EXTRA param {i}: out of range or twice"),
            });
        }
        params.push((i, v));
    }
    Ok(DomainExtra {
        width,
        vm_assist,
        params,
    })
}

pub(super) fn encode_vcpu(v: &VcpuExtra) -> Vec<u8> {
    let area = v.runstate_area.as_ref();
    let flags = u32::from(v.up)
        | u32::from(v.initialised) << 1
        | u32::from(v.periodic_since_last_ns.is_some()) << 2
        | u32::from(v.fifo_control_gpa.is_some()) << 3
        | u32::from(area.is_some()) << 4
        | u32::from(area.is_some_and(|a| a.compat32)) << 5;
    let mut b = Vec::with_capacity(96);
    b.extend_from_slice(&v.id.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&v.periodic_since_last_ns.unwrap_or(0).to_le_bytes());
    b.extend_from_slice(&opt(v.fifo_control_gpa).to_le_bytes());
    for t in v.fifo_tails {
        b.extend_from_slice(&t.to_le_bytes());
    }
    let pieces: &[(u64, u64)] = area.map_or(&[], |a| &a.pieces);
    b.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
    for (gpa, len) in pieces {
        b.extend_from_slice(&gpa.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
    }
    b
}

pub(super) fn decode_vcpu(c: &mut Cur) -> Result<VcpuExtra, DecodeError> {
    let at = c.at;
    let id = c.u32("VCPU_EXTRA id")?;
    let flags = c.u32("VCPU_EXTRA flags")?;
    if id >= MAX_VCPUS || flags & !0x3f != 0 {
        return Err(DecodeError {
            offset: at,
            why: format!("VCPU_EXTRA id {id} flags {flags:#x}"),
        });
    }
    let since = c.u64("VCPU_EXTRA periodic since")?;
    let cb = c.u64("VCPU_EXTRA FIFO control block")?;
    let mut tails = [0u32; 16];
    for t in &mut tails {
        let at = c.at;
        *t = c.u32("VCPU_EXTRA FIFO tail")?;
        if *t > MAX_PORT {
            return Err(DecodeError {
                offset: at,
                why: format!("VCPU_EXTRA FIFO tail {t}"),
            });
        }
    }
    let n = c.count("VCPU_EXTRA runstate pieces", 16, MAX_PIECES)?;
    let mut pieces = Vec::with_capacity(n);
    for _ in 0..n {
        let at = c.at;
        let gpa = c.u64("VCPU_EXTRA piece gpa")?;
        let len = c.u64("VCPU_EXTRA piece len")?;
        if len == 0 || len > 48 || gpa.checked_add(len).is_none() {
            return Err(DecodeError {
                offset: at,
                why: format!("VCPU_EXTRA runstate piece {gpa:#x}+{len}"),
            });
        }
        pieces.push((gpa, len));
    }
    let has_area = flags & 16 != 0;
    if has_area == pieces.is_empty() {
        return Err(DecodeError {
            offset: at,
            why: format!(
                "VCPU_EXTRA {id}: runstate area flag {has_area} with {} pieces",
                pieces.len()
            ),
        });
    }
    Ok(VcpuExtra {
        id,
        up: flags & 1 != 0,
        initialised: flags & 2 != 0,
        periodic_since_last_ns: (flags & 4 != 0).then_some(since),
        fifo_control_gpa: (flags & 8 != 0).then_some(cb),
        fifo_tails: tails,
        runstate_area: has_area.then_some(RunstateAreaPieces {
            compat32: flags & 32 != 0,
            pieces,
        }),
    })
}

pub(super) fn encode_fifo(f: &FifoState) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 8 * f.array_gfns.len() + 12 * f.ports.len());
    b.extend_from_slice(&(f.array_gfns.len() as u32).to_le_bytes());
    for g in &f.array_gfns {
        b.extend_from_slice(&g.to_le_bytes());
    }
    b.extend_from_slice(&(f.ports.len() as u32).to_le_bytes());
    for p in &f.ports {
        b.extend_from_slice(&p.port.to_le_bytes());
        b.extend_from_slice(&p.vcpu.to_le_bytes());
        b.extend_from_slice(&[p.priority, u8::from(p.pending), 0, 0]);
    }
    b
}

pub(super) fn decode_fifo(c: &mut Cur) -> Result<FifoState, DecodeError> {
    let n = c.count("FIFO arrays", 8, MAX_ARRAY_PAGES)?;
    let mut array_gfns = Vec::with_capacity(n);
    for _ in 0..n {
        array_gfns.push(c.u64("FIFO array gfn")?);
    }
    let n = c.count("FIFO ports", 12, MAX_PORT as usize + 1)?;
    let mut ports = Vec::with_capacity(n);
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let at = c.at;
        let port = c.u32("FIFO port")?;
        let vcpu = c.u32("FIFO port vcpu")?;
        let priority = c.u8("FIFO port priority")?;
        let pending = c.u8("FIFO port pending")?;
        c.u16("FIFO port reserved")?;
        if port == 0
            || port > MAX_PORT
            || vcpu >= MAX_VCPUS
            || priority > 15
            || pending > 1
            || !seen.insert(port)
        {
            return Err(DecodeError {
                offset: at,
                why: format!(
                    "FIFO port {port}: vCPU {vcpu} priority {priority} pending {pending}, or twice"
                ),
            });
        }
        ports.push(FifoPort {
            port,
            vcpu,
            priority,
            pending: pending == 1,
        });
    }
    Ok(FifoState { array_gfns, ports })
}
