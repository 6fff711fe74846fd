//! xenkvm's own optional libxc record, `XENKVM_XEN_STATE`: the Xen-side
//! state that Xen's stream format has no record for (on Xen it lives in the
//! hypervisor and is rebuilt by a cooperating guest after a suspend).
//!
//! Record type: [`REC_XENKVM_XEN_STATE`]. Bit 31 is the libxc spec's optional
//! bit ("Records": a reader that does not know an optional record skips it).
//! The spec names no vendor-private range; types `0x80000000..` are the
//! optional half of the type space, and xenkvm takes `0x80584B00` ("XK" in
//! the middle bytes), far above any type Xen has assigned (0x12 in 4.17).
//! Xen 4.17's `verify-stream-v2` refuses any type it does not list, optional
//! bit or not, so an image with this record does not pass that verifier.
//!
//! Why `xenkvm save` writes it only with `--xen-state`: an image written by
//! default must stay one Xen's own tools accept (the verifier test in
//! `tests/saverestore.rs`), and no place inside Xen's format carries it
//! cleanly: the verifier checks every libxc and libxl record type; libxl's
//! one opaque record, EMULATOR_CONTEXT (emulator id "unknown"), passes the
//! verifier but a real libxl hands its blob to the device model, which would
//! refuse it, while a real libxc skips this optional record and restores the
//! rest; the xl header's optional data is libxl's JSON config, which xl
//! parses and rewrites; a file beside the image splits one save into two
//! things to keep together. So the choice stays the user's: the default image is
//! Xen's format and restores the CPU and memory (enough for a guest that
//! does its own suspend/resume, as under Xen, where this state lives in the
//! hypervisor and a cooperating guest rebuilds it), and `--xen-state` adds
//! this record so that `xenkvm restore` continues any guest as it was.
//!
//! Body (little-endian, not padded; the libxc layer pads the record):
//!
//! ```text
//! magic   u64 = "XKVMXEN\0"
//! version u32 = 1
//! count   u32   number of sections
//! count x { tag u32, len u32, body[len] }
//! ```
//!
//! Sections (each at most once except VCPU; an unknown tag is skipped so a
//! later minor addition does not break an older reader):
//! - 1 CLOCK: tsc_khz u32, reserved u32, system_time_ns u64, guest_tsc u64:
//!   the Xen system time and the guest TSC read at the same instant of the
//!   save, so a restore can continue both;
//! - 2 DOMAIN: shared_info gfn u64 (`u64::MAX`: not placed);
//! - 3 VCPU: [`VcpuXenState`], 96 bytes;
//! - 4 EVTCHN: abi u32 (0: 2-level, 1: FIFO), count u32, count x 20-byte
//!   [`EvtchnPort`] (pending/masked bits live in shared_info or the FIFO
//!   event array, guest RAM, so only the port table travels);
//! - 5 GNTTAB: version u32, nr_frames u32, count u32, count x 16-byte
//!   [`GrantFrame`];
//! - 6 XENSTORE: ring gfn u64, port u32, node count u32, nodes, watch count
//!   u32, watches (strings: u32 length + bytes; the ring's indexes are in
//!   the ring page, guest RAM);
//! - 7-10 PAGE, DOMAIN_EXTRA, VCPU_EXTRA, FIFO: see [`extra`] (added later
//!   under the same version: an older reader skips them);
//! - 11 XS_TX: count u32, count x u32: the ids of the guest's open xenstore
//!   transactions (added later too; their contents do not travel: a
//!   restore reopens each id with a commit that fails with `EAGAIN`, the
//!   answer to any conflicting transaction, so the guest retries it).
//!
//! [`decode`] never panics: every length is checked against what is left of
//! the body before anything is read or allocated, counts are bounded by the
//! smallest encoding of one entry, and the values are checked (states,
//! duplicate vCPUs or ports, path syntax).

use std::collections::BTreeSet;

use super::stream::REC_TYPE_OPTIONAL;

pub mod extra;
pub use extra::{
    DomainExtra, FifoPort, FifoState, PageKind, RunstateAreaPieces, SavedPage, VcpuExtra,
};

/// The libxc record type of xenkvm's Xen-state record (optional bit set).
pub const REC_XENKVM_XEN_STATE: u32 = REC_TYPE_OPTIONAL | 0x0058_4B00;
/// First 8 bytes of the body.
pub const MAGIC: [u8; 8] = *b"XKVMXEN\0";
/// Body version this module writes and reads.
pub const VERSION: u32 = 1;

/// Section tags.
pub mod tag {
    /// Clock.
    pub const CLOCK: u32 = 1;
    /// Domain-wide placement.
    pub const DOMAIN: u32 = 2;
    /// One vCPU.
    pub const VCPU: u32 = 3;
    /// Event channel port table.
    pub const EVTCHN: u32 = 4;
    /// Grant table.
    pub const GNTTAB: u32 = 5;
    /// Xenstore contents.
    pub const XENSTORE: u32 = 6;
    /// Open xenstore transactions' ids.
    pub const XS_TX: u32 = 11;
}

/// Most vCPUs a record may describe (Xen's and the hypercalls crate's limit).
pub const MAX_VCPUS: u32 = 4096;
/// Highest event channel port (FIFO ABI: 2^17 channels).
pub const MAX_PORT: u32 = (1 << 17) - 1;
/// Longest xenstore path or watch token (XENSTORE_ABS_PATH_MAX is 3072).
pub const MAX_PATH: usize = 3072;
/// Longest xenstore value (XENSTORE_PAYLOAD_MAX).
pub const MAX_VALUE: usize = 4096;
/// Most permission entries on one node.
pub const MAX_PERMS: usize = 1024;
/// Most grant frames (the hypercalls crate's `max_grant_frames` limit).
pub const MAX_GRANT_FRAMES: u32 = 4096;

/// The clock at the save.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClockState {
    /// Guest TSC frequency.
    pub tsc_khz: u32,
    /// Xen system time (ns) at the save.
    pub system_time_ns: u64,
    /// The guest's TSC at the same instant.
    pub guest_tsc: u64,
}

/// A guest's `vcpu_runstate_info`, as xenkvm last published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Runstate {
    /// RUNSTATE_running (0), runnable (1), blocked (2), offline (3).
    pub state: u32,
    /// Xen system time the vCPU entered `state`.
    pub state_entry_time: u64,
    /// Time spent in each state (ns).
    pub time: [u64; 4],
}

impl Runstate {
    /// The runstate moved from a clock that read `old_now` at the save to
    /// one that reads `new_now` at the restore: the time spent in the
    /// current state so far is kept, so `state_entry_time - sum(time)`
    /// moves by exactly the clock difference and nothing jumps.
    pub fn rebased(&self, old_now: u64, new_now: u64) -> Runstate {
        let in_state = old_now.saturating_sub(self.state_entry_time);
        Runstate {
            state_entry_time: new_now.saturating_sub(in_state),
            ..*self
        }
    }
}

impl Runstate {
    /// The runstate restored on a clock that reads `new_now` where the saved
    /// one read `old_now`: the time in between (the guest was saved, not
    /// running) is counted as offline, which a guest takes as stolen time,
    /// and the entry moves by as much. So nothing in `time[]` decreases, the
    /// current state keeps the time it had, and `state_entry_time -
    /// sum(time[])` stays what it was (Xen keeps it constant for a vCPU's
    /// whole life; guests check it). A clock behind the saved one moves
    /// nothing.
    pub fn continued(&self, old_now: u64, new_now: u64) -> Runstate {
        let gap = new_now.saturating_sub(old_now);
        let mut time = self.time;
        time[3] = time[3].saturating_add(gap);
        Runstate {
            state: self.state,
            state_entry_time: self.state_entry_time.saturating_add(gap),
            time,
        }
    }
}

/// One vCPU's Xen-side state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VcpuXenState {
    /// vCPU id.
    pub id: u32,
    /// `VCPUOP_register_vcpu_info` placement (guest-physical address), if any.
    pub vcpu_info_gpa: Option<u64>,
    /// `VCPUOP_register_vcpu_time_memory_area` address, if any.
    pub time_area_gpa: Option<u64>,
    /// `VCPUOP_register_runstate_memory_area` address, if any.
    pub runstate_area_gpa: Option<u64>,
    /// The runstate.
    pub runstate: Runstate,
    /// `HVMOP_set_evtchn_upcall_vector` (0: none).
    pub upcall_vector: u8,
    /// One-shot timer (`VCPUOP_set_singleshot_timer`/`set_timer_op`):
    /// nanoseconds left at the save (0: due).
    pub oneshot_remaining_ns: Option<u64>,
    /// Periodic timer period (ns), if any.
    pub periodic_ns: Option<u64>,
}

/// One event channel port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EvtchnPort {
    /// Port number.
    pub port: u32,
    /// Xen's ECS_*: 1 reserved, 2 unbound, 3 interdomain, 4 pirq, 5 virq, 6 ipi.
    pub state: u8,
    /// FIFO priority.
    pub priority: u8,
    /// vCPU notified.
    pub vcpu: u32,
    /// Binding, by state: unbound: remote domid; interdomain: remote domid;
    /// pirq: pirq; virq: virq number.
    pub a: u32,
    /// Interdomain: remote port; otherwise 0.
    pub b: u32,
}

/// One grant table frame placed in the guest-physical space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GrantFrame {
    /// Frame index.
    pub index: u32,
    /// A status frame (v2) rather than a shared frame.
    pub status: bool,
    /// Where it sits.
    pub gfn: u64,
}

/// The grant table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GnttabState {
    /// Grant table version (1 or 2).
    pub version: u32,
    /// Frames in use.
    pub nr_frames: u32,
    /// Placed frames.
    pub frames: Vec<GrantFrame>,
}

/// One xenstore node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XsNode {
    /// Absolute path.
    pub path: String,
    /// Value.
    pub value: Vec<u8>,
    /// Permissions, first entry the owner: (domid, perm: b'n', b'r', b'w', b'b').
    pub perms: Vec<(u16, u8)>,
}

/// The guest's xenstore connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XenstoreState {
    /// The ring page's gfn (`u64::MAX`: none).
    pub ring_gfn: u64,
    /// The event channel port the guest uses.
    pub port: u32,
    /// Every node.
    pub nodes: Vec<XsNode>,
    /// The guest's watches: (path, token).
    pub watches: Vec<(String, String)>,
}

/// Everything the record carries. A `None` section was not written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XenState {
    /// Clock.
    pub clock: Option<ClockState>,
    /// shared_info gfn (`Some(None)`: the domain section says not placed).
    pub shared_info_gfn: Option<Option<u64>>,
    /// vCPUs, by id.
    pub vcpus: Vec<VcpuXenState>,
    /// Event channels: ABI (0: 2-level, 1: FIFO) and ports.
    pub evtchn: Option<(u32, Vec<EvtchnPort>)>,
    /// Grant table.
    pub gnttab: Option<GnttabState>,
    /// Xenstore.
    pub xenstore: Option<XenstoreState>,
    /// VMM pages' contents (shared_info, grant frames), by kind.
    pub pages: Vec<SavedPage>,
    /// Width, vm_assist, HVM params.
    pub domain_extra: Option<DomainExtra>,
    /// Per vCPU, by id: flags, FIFO registration, runstate area.
    pub vcpu_extra: Vec<VcpuExtra>,
    /// FIFO event arrays and per-port queue state.
    pub fifo: Option<FifoState>,
    /// The ids of the guest's open xenstore transactions (section XS_TX,
    /// written only when there is one).
    pub xs_transactions: Vec<u32>,
}

/// Why a body was refused: the byte offset in the body and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("byte {offset:#x} of the body: {why}")]
pub struct DecodeError {
    /// Offset in the record body.
    pub offset: usize,
    /// What.
    pub why: String,
}

const NONE: u64 = u64::MAX;
const VCPU_LEN: usize = 96;
const PORT_LEN: usize = 20;
const FRAME_LEN: usize = 16;

fn opt(v: Option<u64>) -> u64 {
    v.unwrap_or(NONE)
}

fn put_str(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&(s.len() as u32).to_le_bytes());
    b.extend_from_slice(s);
}

fn section(out: &mut Vec<u8>, n: &mut u32, tag: u32, body: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    *n += 1;
}

/// Encodes `s` as the record body.
pub fn encode(s: &XenState) -> Vec<u8> {
    let mut secs = Vec::new();
    let mut n = 0u32;
    if let Some(c) = &s.clock {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&c.tsc_khz.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&c.system_time_ns.to_le_bytes());
        b.extend_from_slice(&c.guest_tsc.to_le_bytes());
        section(&mut secs, &mut n, tag::CLOCK, &b);
    }
    if let Some(g) = s.shared_info_gfn {
        section(&mut secs, &mut n, tag::DOMAIN, &opt(g).to_le_bytes());
    }
    for v in &s.vcpus {
        let mut b = Vec::with_capacity(VCPU_LEN);
        let flags =
            u32::from(v.oneshot_remaining_ns.is_some()) | u32::from(v.periodic_ns.is_some()) << 1;
        b.extend_from_slice(&v.id.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&opt(v.vcpu_info_gpa).to_le_bytes());
        b.extend_from_slice(&opt(v.time_area_gpa).to_le_bytes());
        b.extend_from_slice(&opt(v.runstate_area_gpa).to_le_bytes());
        b.extend_from_slice(&v.runstate.state.to_le_bytes());
        b.extend_from_slice(&u32::from(v.upcall_vector).to_le_bytes());
        b.extend_from_slice(&v.runstate.state_entry_time.to_le_bytes());
        for t in v.runstate.time {
            b.extend_from_slice(&t.to_le_bytes());
        }
        b.extend_from_slice(&v.oneshot_remaining_ns.unwrap_or(0).to_le_bytes());
        b.extend_from_slice(&v.periodic_ns.unwrap_or(0).to_le_bytes());
        debug_assert_eq!(b.len(), VCPU_LEN);
        section(&mut secs, &mut n, tag::VCPU, &b);
    }
    if let Some((abi, ports)) = &s.evtchn {
        let mut b = Vec::with_capacity(8 + ports.len() * PORT_LEN);
        b.extend_from_slice(&abi.to_le_bytes());
        b.extend_from_slice(&(ports.len() as u32).to_le_bytes());
        for p in ports {
            b.extend_from_slice(&p.port.to_le_bytes());
            b.extend_from_slice(&[p.state, p.priority, 0, 0]);
            b.extend_from_slice(&p.vcpu.to_le_bytes());
            b.extend_from_slice(&p.a.to_le_bytes());
            b.extend_from_slice(&p.b.to_le_bytes());
        }
        section(&mut secs, &mut n, tag::EVTCHN, &b);
    }
    if let Some(g) = &s.gnttab {
        let mut b = Vec::with_capacity(12 + g.frames.len() * FRAME_LEN);
        b.extend_from_slice(&g.version.to_le_bytes());
        b.extend_from_slice(&g.nr_frames.to_le_bytes());
        b.extend_from_slice(&(g.frames.len() as u32).to_le_bytes());
        for f in &g.frames {
            b.extend_from_slice(&f.index.to_le_bytes());
            b.extend_from_slice(&u32::from(f.status).to_le_bytes());
            b.extend_from_slice(&f.gfn.to_le_bytes());
        }
        section(&mut secs, &mut n, tag::GNTTAB, &b);
    }
    if let Some(x) = &s.xenstore {
        let mut b = Vec::new();
        b.extend_from_slice(&x.ring_gfn.to_le_bytes());
        b.extend_from_slice(&x.port.to_le_bytes());
        b.extend_from_slice(&(x.nodes.len() as u32).to_le_bytes());
        for node in &x.nodes {
            put_str(&mut b, node.path.as_bytes());
            put_str(&mut b, &node.value);
            b.extend_from_slice(&(node.perms.len() as u32).to_le_bytes());
            for (dom, perm) in &node.perms {
                b.extend_from_slice(&dom.to_le_bytes());
                b.extend_from_slice(&[*perm, 0]);
            }
        }
        b.extend_from_slice(&(x.watches.len() as u32).to_le_bytes());
        for (p, t) in &x.watches {
            put_str(&mut b, p.as_bytes());
            put_str(&mut b, t.as_bytes());
        }
        section(&mut secs, &mut n, tag::XENSTORE, &b);
    }
    if !s.xs_transactions.is_empty() {
        let mut b = Vec::with_capacity(4 + 4 * s.xs_transactions.len());
        b.extend_from_slice(&(s.xs_transactions.len() as u32).to_le_bytes());
        for id in &s.xs_transactions {
            b.extend_from_slice(&id.to_le_bytes());
        }
        section(&mut secs, &mut n, tag::XS_TX, &b);
    }
    for p in &s.pages {
        section(&mut secs, &mut n, extra::tag::PAGE, &extra::encode_page(p));
    }
    if let Some(d) = &s.domain_extra {
        section(
            &mut secs,
            &mut n,
            extra::tag::DOMAIN_EXTRA,
            &extra::encode_domain(d),
        );
    }
    for v in &s.vcpu_extra {
        section(
            &mut secs,
            &mut n,
            extra::tag::VCPU_EXTRA,
            &extra::encode_vcpu(v),
        );
    }
    if let Some(f) = &s.fifo {
        section(&mut secs, &mut n, extra::tag::FIFO, &extra::encode_fifo(f));
    }
    let mut out = Vec::with_capacity(16 + secs.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&secs);
    out
}

/// A bounds-checked reader over a body.
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cur<'a> {
    fn err(&self, why: impl Into<String>) -> DecodeError {
        DecodeError {
            offset: self.at,
            why: why.into(),
        }
    }
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if n > self.left() {
            return Err(self.err(format!("{what}: needs {n} bytes, {} left", self.left())));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn opt(&mut self, what: &str) -> Result<Option<u64>, DecodeError> {
        let v = self.u64(what)?;
        Ok((v != NONE).then_some(v))
    }
    /// A count of entries at least `min` bytes each, checked against what is left.
    fn count(&mut self, what: &str, min: usize, max: usize) -> Result<usize, DecodeError> {
        let at = self.at;
        let n = self.u32(what)? as usize;
        if n > max || n.saturating_mul(min) > self.left() {
            return Err(DecodeError {
                offset: at,
                why: format!(
                    "{what}: {n} entries do not fit (at most {max}, {} bytes left)",
                    self.left()
                ),
            });
        }
        Ok(n)
    }
    fn bytes(&mut self, what: &str, max: usize) -> Result<&'a [u8], DecodeError> {
        let at = self.at;
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(DecodeError {
                offset: at,
                why: format!("{what}: {n} bytes (at most {max})"),
            });
        }
        self.take(n, what)
    }
    fn path(&mut self, what: &str) -> Result<String, DecodeError> {
        let at = self.at;
        let s = self.bytes(what, MAX_PATH)?;
        let bad = |why: &str| DecodeError {
            offset: at,
            why: format!("{what}: {why}"),
        };
        let s = std::str::from_utf8(s).map_err(|_| bad("not UTF-8"))?;
        if s.is_empty() || s.contains('\0') {
            return Err(bad("empty or holds a NUL"));
        }
        Ok(s.to_string())
    }
    fn end(&self, what: &str) -> Result<(), DecodeError> {
        if self.left() != 0 {
            return Err(self.err(format!("{what}: {} trailing bytes", self.left())));
        }
        Ok(())
    }
}

fn clock(c: &mut Cur) -> Result<ClockState, DecodeError> {
    let tsc_khz = c.u32("CLOCK tsc_khz")?;
    c.u32("CLOCK reserved")?;
    Ok(ClockState {
        tsc_khz,
        system_time_ns: c.u64("CLOCK system_time_ns")?,
        guest_tsc: c.u64("CLOCK guest_tsc")?,
    })
}

fn vcpu(c: &mut Cur) -> Result<VcpuXenState, DecodeError> {
    let at = c.at;
    let id = c.u32("VCPU id")?;
    if id >= MAX_VCPUS {
        return Err(DecodeError {
            offset: at,
            why: format!("VCPU id {id} (at most {})", MAX_VCPUS - 1),
        });
    }
    let fat = c.at;
    let flags = c.u32("VCPU flags")?;
    if flags & !3 != 0 {
        return Err(DecodeError {
            offset: fat,
            why: format!("VCPU flags {flags:#x}: unknown bits"),
        });
    }
    let vcpu_info_gpa = c.opt("VCPU vcpu_info")?;
    let time_area_gpa = c.opt("VCPU time area")?;
    let runstate_area_gpa = c.opt("VCPU runstate area")?;
    let sat = c.at;
    let state = c.u32("VCPU runstate state")?;
    if state > 3 {
        return Err(DecodeError {
            offset: sat,
            why: format!("VCPU runstate state {state} (0-3)"),
        });
    }
    let vat = c.at;
    let vector = c.u32("VCPU upcall vector")?;
    let upcall_vector = u8::try_from(vector).map_err(|_| DecodeError {
        offset: vat,
        why: format!("VCPU upcall vector {vector} (0-255)"),
    })?;
    let state_entry_time = c.u64("VCPU state_entry_time")?;
    let mut time = [0u64; 4];
    for t in &mut time {
        *t = c.u64("VCPU runstate time")?;
    }
    let oneshot = c.u64("VCPU one-shot timer")?;
    let periodic = c.u64("VCPU periodic timer")?;
    Ok(VcpuXenState {
        id,
        vcpu_info_gpa,
        time_area_gpa,
        runstate_area_gpa,
        runstate: Runstate {
            state,
            state_entry_time,
            time,
        },
        upcall_vector,
        oneshot_remaining_ns: (flags & 1 != 0).then_some(oneshot),
        periodic_ns: (flags & 2 != 0).then_some(periodic),
    })
}

fn evtchn(c: &mut Cur) -> Result<(u32, Vec<EvtchnPort>), DecodeError> {
    let at = c.at;
    let abi = c.u32("EVTCHN abi")?;
    if abi > 1 {
        return Err(DecodeError {
            offset: at,
            why: format!("EVTCHN abi {abi} (0: 2-level, 1: FIFO)"),
        });
    }
    let n = c.count("EVTCHN ports", PORT_LEN, MAX_PORT as usize + 1)?;
    let mut seen = BTreeSet::new();
    let mut ports = Vec::with_capacity(n);
    for _ in 0..n {
        let at = c.at;
        let port = c.u32("EVTCHN port")?;
        let state = c.u8("EVTCHN state")?;
        let priority = c.u8("EVTCHN priority")?;
        c.u16("EVTCHN reserved")?;
        let p = EvtchnPort {
            port,
            state,
            priority,
            vcpu: c.u32("EVTCHN vcpu")?,
            a: c.u32("EVTCHN binding")?,
            b: c.u32("EVTCHN binding")?,
        };
        let why = if port == 0 || port > MAX_PORT {
            Some(format!("port {port} (1-{MAX_PORT})"))
        } else if !(1..=6).contains(&state) {
            Some(format!("port {port}: state {state} (1-6)"))
        } else if p.vcpu >= MAX_VCPUS {
            Some(format!("port {port}: vCPU {}", p.vcpu))
        } else if !seen.insert(port) {
            Some(format!("port {port} appears twice"))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(DecodeError {
                offset: at,
                why: format!("EVTCHN {why}"),
            });
        }
        ports.push(p);
    }
    Ok((abi, ports))
}

fn gnttab(c: &mut Cur) -> Result<GnttabState, DecodeError> {
    let at = c.at;
    let version = c.u32("GNTTAB version")?;
    let nr_frames = c.u32("GNTTAB nr_frames")?;
    if !(1..=2).contains(&version) || nr_frames > MAX_GRANT_FRAMES {
        return Err(DecodeError {
            offset: at,
            why: format!(
                "GNTTAB version {version} (1-2), {nr_frames} frames (at most {MAX_GRANT_FRAMES})"
            ),
        });
    }
    let n = c.count("GNTTAB frames", FRAME_LEN, 2 * MAX_GRANT_FRAMES as usize)?;
    let mut frames = Vec::with_capacity(n);
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let at = c.at;
        let index = c.u32("GNTTAB frame index")?;
        let status = c.u32("GNTTAB frame kind")?;
        let gfn = c.u64("GNTTAB frame gfn")?;
        if status > 1 || index >= MAX_GRANT_FRAMES || !seen.insert((index, status)) {
            return Err(DecodeError {
                offset: at,
                why: format!("GNTTAB frame {index} kind {status}: out of range or twice"),
            });
        }
        frames.push(GrantFrame {
            index,
            status: status == 1,
            gfn,
        });
    }
    Ok(GnttabState {
        version,
        nr_frames,
        frames,
    })
}

fn xenstore(c: &mut Cur) -> Result<XenstoreState, DecodeError> {
    let ring_gfn = c.u64("XENSTORE ring gfn")?;
    let port = c.u32("XENSTORE port")?;
    // A node is at least 12 bytes (three u32 lengths), a watch 8.
    let n = c.count("XENSTORE nodes", 12, usize::MAX)?;
    let mut nodes = Vec::with_capacity(n);
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let at = c.at;
        let path = c.path("XENSTORE node path")?;
        if !path.starts_with('/') || !seen.insert(path.clone()) {
            return Err(DecodeError {
                offset: at,
                why: format!("XENSTORE node {path:?}: not absolute or twice"),
            });
        }
        let value = c.bytes("XENSTORE node value", MAX_VALUE)?.to_vec();
        let np = c.count("XENSTORE node perms", 4, MAX_PERMS)?;
        let mut perms = Vec::with_capacity(np);
        for _ in 0..np {
            let pat = c.at;
            let dom = c.u16("XENSTORE perm domid")?;
            let perm = c.u8("XENSTORE perm")?;
            c.u8("XENSTORE perm reserved")?;
            if !matches!(perm, b'n' | b'r' | b'w' | b'b') {
                return Err(DecodeError {
                    offset: pat,
                    why: format!("XENSTORE node {path:?}: permission {perm:#x}"),
                });
            }
            perms.push((dom, perm));
        }
        nodes.push(XsNode { path, value, perms });
    }
    let n = c.count("XENSTORE watches", 8, usize::MAX)?;
    let mut watches = Vec::with_capacity(n);
    for _ in 0..n {
        let p = c.path("XENSTORE watch path")?;
        let t = c.bytes("XENSTORE watch token", MAX_PATH)?;
        let t = std::str::from_utf8(t)
            .ok()
            .filter(|t| !t.contains('\0'))
            .ok_or_else(|| c.err("XENSTORE watch token: not UTF-8 or holds a NUL"))?;
        watches.push((p, t.to_string()));
    }
    Ok(XenstoreState {
        ring_gfn,
        port,
        nodes,
        watches,
    })
}

/// Most open transactions a record may list (the server allows 10 per
/// connection).
pub const MAX_XS_TX: usize = 64;

fn xs_transactions(c: &mut Cur) -> Result<Vec<u32>, DecodeError> {
    let n = c.count("XS_TX count", 4, MAX_XS_TX)?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let at = c.at;
        let id = c.u32("XS_TX id")?;
        if id == 0 || ids.contains(&id) {
            return Err(DecodeError {
                offset: at,
                why: format!("XS_TX id {id}: 0 or twice"),
            });
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Decodes and checks a record body.
pub fn decode(body: &[u8]) -> Result<XenState, DecodeError> {
    let mut c = Cur { b: body, at: 0 };
    if c.take(8, "magic")? != MAGIC {
        return Err(DecodeError {
            offset: 0,
            why: "not a xenkvm Xen-state body (magic)".into(),
        });
    }
    let version = c.u32("version")?;
    if version != VERSION {
        return Err(DecodeError {
            offset: 8,
            why: format!("version {version} (this xenkvm reads {VERSION})"),
        });
    }
    // A section is at least 8 bytes.
    let n = c.count("section count", 8, usize::MAX)?;
    let mut s = XenState::default();
    let mut vcpu_ids = BTreeSet::new();
    let mut seen_tx = false;
    for _ in 0..n {
        let at = c.at;
        let t = c.u32("section tag")?;
        let len = c.u32("section length")? as usize;
        let body = c.take(len, "section body")?;
        let dup = match t {
            tag::CLOCK => s.clock.is_some().then_some("CLOCK"),
            tag::DOMAIN => s.shared_info_gfn.is_some().then_some("DOMAIN"),
            tag::EVTCHN => s.evtchn.is_some().then_some("EVTCHN"),
            tag::GNTTAB => s.gnttab.is_some().then_some("GNTTAB"),
            tag::XENSTORE => s.xenstore.is_some().then_some("XENSTORE"),
            tag::XS_TX => seen_tx.then_some("XS_TX"),
            extra::tag::DOMAIN_EXTRA => s.domain_extra.is_some().then_some("DOMAIN_EXTRA"),
            extra::tag::FIFO => s.fifo.is_some().then_some("FIFO"),
            _ => None,
        };
        if let Some(name) = dup {
            return Err(DecodeError {
                offset: at,
                why: format!("section {name} appears twice"),
            });
        }
        let mut sc = Cur { b: body, at: 0 };
        // Offsets inside a section are relative to its body, 8 bytes after `at`.
        let rel = |e: DecodeError| DecodeError {
            offset: at + 8 + e.offset,
            why: e.why,
        };
        match t {
            tag::CLOCK => s.clock = Some(clock(&mut sc).map_err(rel)?),
            tag::DOMAIN => s.shared_info_gfn = Some(sc.opt("DOMAIN shared_info gfn").map_err(rel)?),
            tag::VCPU => {
                let v = vcpu(&mut sc).map_err(rel)?;
                if !vcpu_ids.insert(v.id) {
                    return Err(DecodeError {
                        offset: at,
                        why: format!("VCPU {} appears twice", v.id),
                    });
                }
                s.vcpus.push(v);
            }
            tag::EVTCHN => s.evtchn = Some(evtchn(&mut sc).map_err(rel)?),
            tag::GNTTAB => s.gnttab = Some(gnttab(&mut sc).map_err(rel)?),
            tag::XENSTORE => s.xenstore = Some(xenstore(&mut sc).map_err(rel)?),
            tag::XS_TX => {
                seen_tx = true;
                s.xs_transactions = xs_transactions(&mut sc).map_err(rel)?;
            }
            extra::tag::PAGE => {
                let p = extra::decode_page(&mut sc).map_err(rel)?;
                if s.pages.iter().any(|q| q.kind == p.kind) {
                    return Err(DecodeError {
                        offset: at,
                        why: format!("PAGE {:?} appears twice", p.kind),
                    });
                }
                s.pages.push(p);
            }
            extra::tag::DOMAIN_EXTRA => {
                s.domain_extra = Some(extra::decode_domain(&mut sc).map_err(rel)?)
            }
            extra::tag::VCPU_EXTRA => {
                let v = extra::decode_vcpu(&mut sc).map_err(rel)?;
                if s.vcpu_extra.iter().any(|w| w.id == v.id) {
                    return Err(DecodeError {
                        offset: at,
                        why: format!("VCPU_EXTRA {} appears twice", v.id),
                    });
                }
                s.vcpu_extra.push(v);
            }
            extra::tag::FIFO => s.fifo = Some(extra::decode_fifo(&mut sc).map_err(rel)?),
            _ => {
                tracing::info!(tag = t, len, "xenkvm Xen-state: unknown section skipped");
                continue;
            }
        }
        sc.end("section").map_err(rel)?;
    }
    c.end("record body")?;
    s.vcpus.sort_by_key(|v| v.id);
    s.vcpu_extra.sort_by_key(|v| v.id);
    s.pages.sort_by_key(|p| p.kind);
    Ok(s)
}

/// The record's content from what the hypercalls crate's `Domain` holds
/// ([`hypercalls::Domain::snapshot`]) and the clock read at the same save:
/// one-shot deadlines become remaining time (0 if already due), a periodic
/// timer's last event the time since it. `runstates` (by vCPU id; the VMM
/// keeps them outside `Domain`) as the guest's area shows them: `time[]` up
/// to `state_entry_time`. Not filled here (the VMM adds them): the runstate
/// areas ([`VcpuExtra::runstate_area`], [`VcpuXenState::runstate_area_gpa`])
/// and xenstore (nodes, watches, open transactions).
pub fn from_snapshot(
    snap: &hypercalls::DomainSnapshot,
    clock: ClockState,
    runstates: &[hypercalls::RunstateInfo],
) -> XenState {
    let now = clock.system_time_ns;
    let mut pages = Vec::new();
    if snap.shared_info.len() == extra::PAGE_LEN {
        pages.push(SavedPage {
            kind: PageKind::SharedInfo,
            data: snap.shared_info.clone(),
        });
    }
    for (i, status, data) in &snap.grant_pages {
        pages.push(SavedPage {
            kind: if *status {
                PageKind::GrantStatus(*i)
            } else {
                PageKind::Grant(*i)
            },
            data: data.clone(),
        });
    }
    pages.sort_by_key(|p| p.kind);
    XenState {
        clock: Some(clock),
        shared_info_gfn: Some(snap.shared_info_gfn),
        vcpus: snap
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, v)| VcpuXenState {
                id: i as u32,
                vcpu_info_gpa: v.vcpu_info_gpa,
                time_area_gpa: v.time_area_gpa,
                upcall_vector: v.upcall_vector,
                runstate: runstates
                    .get(i)
                    .map(|r| Runstate {
                        state: r.state.min(3),
                        state_entry_time: r.state_entry_time,
                        time: r.time,
                    })
                    .unwrap_or_default(),
                oneshot_remaining_ns: v.singleshot_deadline.map(|d| d.saturating_sub(now)),
                periodic_ns: v.periodic_ns,
                ..Default::default()
            })
            .collect(),
        evtchn: Some((
            u32::from(snap.fifo),
            snap.ports
                .iter()
                .map(|p| EvtchnPort {
                    port: p.port,
                    state: p.state,
                    priority: p.priority,
                    vcpu: p.vcpu,
                    a: p.a,
                    b: p.b,
                })
                .collect(),
        )),
        gnttab: Some(GnttabState {
            version: snap.grant_version,
            nr_frames: snap.grant_frames,
            frames: snap
                .grant_placed
                .iter()
                .map(|&(index, status, gfn)| GrantFrame { index, status, gfn })
                .collect(),
        }),
        xenstore: None,
        pages,
        domain_extra: Some(DomainExtra {
            width: match snap.width {
                None => 0,
                Some(hypercalls::GuestWidth::Bits64) => 1,
                Some(hypercalls::GuestWidth::Bits32) => 2,
            },
            vm_assist: snap.vm_assist,
            params: snap
                .params
                .iter()
                .copied()
                .filter(|(i, _)| *i < extra::MAX_PARAM)
                .collect(),
        }),
        vcpu_extra: snap
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, v)| VcpuExtra {
                id: i as u32,
                up: v.up,
                initialised: v.initialised,
                periodic_since_last_ns: v.periodic_last.map(|l| now.saturating_sub(l)),
                fifo_control_gpa: v.fifo_control_gpa,
                fifo_tails: v.fifo_tails,
                runstate_area: None,
            })
            .collect(),
        fifo: snap.fifo.then(|| FifoState {
            array_gfns: snap.fifo_array_gfns.clone(),
            ports: snap
                .ports
                .iter()
                .filter(|p| p.fifo_pending || p.last_q != (0, 0))
                .map(|p| FifoPort {
                    port: p.port,
                    vcpu: p.last_q.0,
                    priority: p.last_q.1,
                    pending: p.fifo_pending,
                })
                .collect(),
        }),
        xs_transactions: Vec::new(),
    }
}

/// The snapshot a restore hands to [`hypercalls::Domain::restore`]: the
/// inverse of [`from_snapshot`] on a clock that reads `now` (Xen system
/// time of the restored domain: a remaining time becomes `now + remaining`,
/// a time since the last periodic event `now - since`). Sections the record
/// lacks leave the domain's defaults (an image from an older xenkvm has no
/// page contents or vCPU flags: the vCPUs the image has CPU state for are
/// then up, as `vcpu_up` says).
pub fn to_snapshot(
    s: &XenState,
    now: u64,
    vcpu_up: &dyn Fn(u32) -> bool,
) -> hypercalls::DomainSnapshot {
    let nr = s
        .vcpus
        .iter()
        .map(|v| v.id + 1)
        .chain(s.vcpu_extra.iter().map(|v| v.id + 1))
        .max()
        .unwrap_or(0) as usize;
    let mut vcpus: Vec<hypercalls::VcpuSnapshot> = (0..nr as u32)
        .map(|i| hypercalls::VcpuSnapshot {
            up: vcpu_up(i),
            initialised: vcpu_up(i),
            ..Default::default()
        })
        .collect();
    for v in &s.vcpus {
        let d = &mut vcpus[v.id as usize];
        d.upcall_vector = v.upcall_vector;
        d.singleshot_deadline = v.oneshot_remaining_ns.map(|r| now.saturating_add(r));
        d.periodic_ns = v.periodic_ns;
        d.vcpu_info_gpa = v.vcpu_info_gpa;
        d.time_area_gpa = v.time_area_gpa;
    }
    for x in &s.vcpu_extra {
        let d = &mut vcpus[x.id as usize];
        d.up = x.up;
        d.initialised = x.initialised;
        d.periodic_last = x.periodic_since_last_ns.map(|p| now.saturating_sub(p));
        d.fifo_control_gpa = x.fifo_control_gpa;
        d.fifo_tails = x.fifo_tails;
    }
    let fifo_port = |port: u32| {
        s.fifo
            .as_ref()
            .and_then(|f| f.ports.iter().find(|p| p.port == port))
    };
    let (fifo, ports) = s.evtchn.clone().unwrap_or_default();
    let g = s.gnttab.clone().unwrap_or(GnttabState {
        version: 1,
        nr_frames: 1,
        frames: Vec::new(),
    });
    let d = s.domain_extra.clone().unwrap_or_default();
    hypercalls::DomainSnapshot {
        shared_info_gfn: s.shared_info_gfn.flatten(),
        grant_version: g.version,
        grant_frames: g.nr_frames.max(1),
        grant_placed: g
            .frames
            .iter()
            .map(|f| (f.index, f.status, f.gfn))
            .collect(),
        fifo: fifo == 1,
        ports: ports
            .iter()
            .map(|p| {
                let f = fifo_port(p.port);
                hypercalls::PortSnapshot {
                    port: p.port,
                    state: p.state,
                    vcpu: p.vcpu,
                    priority: p.priority,
                    a: p.a,
                    b: p.b,
                    fifo_pending: f.is_some_and(|f| f.pending),
                    last_q: f.map_or((0, 0), |f| (f.vcpu, f.priority)),
                }
            })
            .collect(),
        vcpus,
        width: match d.width {
            1 => Some(hypercalls::GuestWidth::Bits64),
            2 => Some(hypercalls::GuestWidth::Bits32),
            _ => None,
        },
        vm_assist: d.vm_assist,
        params: d.params,
        shared_info: s
            .pages
            .iter()
            .find(|p| p.kind == PageKind::SharedInfo)
            .map(|p| p.data.clone())
            .unwrap_or_default(),
        grant_pages: s
            .pages
            .iter()
            .filter_map(|p| match p.kind {
                PageKind::Grant(i) => Some((i, false, p.data.clone())),
                PageKind::GrantStatus(i) => Some((i, true, p.data.clone())),
                PageKind::SharedInfo => None,
            })
            .collect(),
        fifo_array_gfns: s
            .fifo
            .as_ref()
            .map(|f| f.array_gfns.clone())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests;
