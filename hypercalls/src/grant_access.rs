//! Using grants: reading entries in either version, pinning them (setting GTF_reading and
//! GTF_writing as Xen's `_set_status_v1/v2` do, clearing them when the last pin goes), the
//! dom0-side API the VMM's backends call ([`Domain::grant_map`], [`Domain::grant_unmap`],
//! [`Domain::grant_pin_batch`] for an I/O's duration, [`Domain::grant_copy_from`],
//! [`Domain::grant_copy_to`]), and `GNTTABOP_copy`.
//!
//! A grant is usable by domain `L` when its type is `GTF_permit_access` (no `GTF_sub_page`
//! for a mapping), its `domid` is `L` (0 for the VMM's backends), and for write access it is
//! not `GTF_readonly`. The first pin checks this; later pins reuse the frame seen then (Xen's
//! active entry), and a first write pin on a read-pinned grant checks `GTF_readonly` again.
//! Transitive grants are refused (`GNTST_general_error`), as with Xen's
//! `transitive_grants=false`.
//!
//! Xen sets the status bits with a `cmpxchg` loop on the entry (v1) or sets them and then
//! re-reads the entry (v2). [`SharedPage`] has no compare-exchange, so both versions set the
//! bits with an atomic OR, re-check the entry, and take back exactly the bits they added if
//! the guest changed or revoked it meanwhile: a guest revoking with `cmpxchg` either sees the
//! bits (and keeps the grant) or wins and the pin fails.
//!
//! Frames the grants name are accessed through [`Platform::map_guest_page`] (guest RAM only,
//! `GNTST_bad_page` otherwise); copies are bounded by the page and, for a v2 sub-page grant,
//! by its range.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::abi::{domid, get_u16, get_u32, get_u64, gnttabop, put_u16};
use crate::domain::{Ctx, Domain, Lookup};
use crate::errno::Errno;
use crate::gnttab::{Active, GrantTable, MapEntry, COPY_BATCH};
use crate::shared::SharedPage;
use crate::types::Gfn;
use crate::Error;

const PAGE: usize = crate::abi::PAGE_SIZE;
/// dom0 mappings a VMM may hold at once toward one guest (the maptrack limit).
pub(crate) const MAX_MAPS: usize = 1 << 16;

/// One grant entry, decoded (v1 entries have no sub-page range: `start` 0, `len` 4096).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    pub flags: u16,
    pub domid: u16,
    pub frame: u64,
    pub start: u16,
    pub len: u16,
}

/// Records a pinned grant as a dom0 mapping under the next free handle.
fn record_map(gt: &mut GrantTable, gref: u32, gfn: Gfn, readonly: bool) -> GrantMapping {
    let mut handle = gt.next_handle;
    while gt.maps.contains_key(&handle) {
        handle = handle.wrapping_add(1);
    }
    gt.next_handle = handle.wrapping_add(1);
    gt.maps.insert(handle, MapEntry { gref, readonly });
    GrantMapping {
        handle,
        gref,
        gfn,
        readonly,
    }
}

/// Where entry `gref` is: its frame and byte offset (the caller checked `gref`).
/// Borrowed from the table (no reference count traffic on the per-I/O path).
fn entry_loc(gt: &GrantTable, gref: u32) -> Option<(&dyn SharedPage, usize)> {
    let (per, size) = if gt.version == 2 { (256, 16) } else { (512, 8) };
    let f = gt.frames.get((gref / per) as usize)?;
    Some((&**f, (gref % per) as usize * size))
}

/// Where the v2 status of `gref` is.
fn status_loc(gt: &GrantTable, gref: u32) -> Option<(&dyn SharedPage, usize)> {
    let f = gt.status.get((gref / 2048) as usize)?;
    Some((&**f, (gref % 2048) as usize * 2))
}

/// Entries the table holds (`nr_grant_entries`).
pub(crate) fn nr_entries(gt: &GrantTable) -> u32 {
    gt.nr_frames() * if gt.version == 2 { 256 } else { 512 }
}

pub(crate) fn read_entry(gt: &GrantTable, gref: u32) -> Entry {
    let Some((p, off)) = entry_loc(gt, gref) else {
        return Entry::default();
    };
    if gt.version != 2 {
        // The whole 8-byte entry in one load.
        return entry_v1(p.load_u64(off, Ordering::Acquire));
    }
    let hdr = p.load_u32(off, Ordering::Acquire);
    let flags = hdr as u16;
    let domid = (hdr >> 16) as u16;
    if gt.version == 2 {
        let sub = p.load_u32(off + 4, Ordering::Acquire);
        let frame = p.load_u64(off + 8, Ordering::Acquire);
        let (start, len) = if flags & gnttabop::GTF_SUB_PAGE != 0 {
            (sub as u16, (sub >> 16) as u16)
        } else {
            (0, PAGE as u16)
        };
        Entry {
            flags,
            domid,
            frame,
            start,
            len,
        }
    } else {
        Entry {
            flags,
            domid,
            frame: u64::from(p.load_u32(off + 4, Ordering::Acquire)),
            start: 0,
            len: PAGE as u16,
        }
    }
}

/// A v1 entry from its 8-byte word.
fn entry_v1(w: u64) -> Entry {
    Entry {
        flags: w as u16,
        domid: (w >> 16) as u16,
        frame: w >> 32,
        start: 0,
        len: PAGE as u16,
    }
}

/// Write a full-page entry in the current format (reading/writing go to the status under v2).
pub(crate) fn write_entry(gt: &GrantTable, gref: u32, e: &Entry) {
    let Some((p, off)) = entry_loc(gt, gref) else {
        return;
    };
    let rw = gnttabop::GTF_READING | gnttabop::GTF_WRITING;
    if gt.version == 2 {
        if let Some((sp, soff)) = status_loc(gt, gref) {
            let (o, sh) = (soff & !7, (soff % 8) * 8);
            sp.fetch_and_u64(o, !(0xffffu64 << sh), Ordering::SeqCst);
            sp.fetch_or_u64(o, u64::from(e.flags & rw) << sh, Ordering::SeqCst);
        }
        p.store_u64(off + 8, e.frame, Ordering::Release);
        p.store_u32(off + 4, 0, Ordering::Release);
        p.store_u32(
            off,
            u32::from(e.flags & !rw) | (u32::from(e.domid) << 16),
            Ordering::Release,
        );
    } else {
        p.store_u64(
            off,
            u64::from(e.flags) | (u64::from(e.domid) << 16) | ((e.frame & 0xffff_ffff) << 32),
            Ordering::Release,
        );
    }
}

/// GTF_reading/GTF_writing of `gref` as the guest sees them (entry flags or v2 status).
pub(crate) fn status_bits(gt: &GrantTable, gref: u32) -> u16 {
    let rw = gnttabop::GTF_READING | gnttabop::GTF_WRITING;
    if gt.version == 2 {
        status_loc(gt, gref).map_or(0, |(p, off)| {
            (p.load_u64(off & !7, Ordering::Acquire) >> ((off % 8) * 8)) as u16 & rw
        })
    } else {
        read_entry(gt, gref).flags & rw
    }
}

/// The `u64` word and shift of the status bits of `gref`.
fn status_word(gt: &GrantTable, gref: u32) -> Option<(&dyn SharedPage, usize, usize)> {
    let (p, off) = if gt.version == 2 {
        status_loc(gt, gref)?
    } else {
        entry_loc(gt, gref)?
    };
    Some((p, off & !7, (off % 8) * 8))
}

fn set_bits(gt: &GrantTable, gref: u32, bits: u16) -> u16 {
    status_word(gt, gref).map_or(0, |(p, o, sh)| {
        (p.fetch_or_u64(o, u64::from(bits) << sh, Ordering::SeqCst) >> sh) as u16
    })
}

/// [`set_bits`], and the entry as it is once they are set. Under v1 the
/// bits are in the entry's own word, so the atomic OR returns the whole
/// entry as it was at that instant (what Xen's `cmpxchg` on the entry
/// checks): no second read. Under v2 the entry is read again after the
/// status is set.
fn set_bits_entry(gt: &GrantTable, gref: u32, bits: u16) -> (u16, Entry) {
    if gt.version != 2 {
        if let Some((p, off)) = entry_loc(gt, gref) {
            let w = p.fetch_or_u64(off, u64::from(bits), Ordering::SeqCst);
            return (w as u16, entry_v1(w | u64::from(bits)));
        }
    }
    let old = set_bits(gt, gref, bits);
    (old, read_entry(gt, gref))
}

fn clear_bits(gt: &GrantTable, gref: u32, bits: u16) {
    if let Some((p, o, sh)) = status_word(gt, gref) {
        p.fetch_and_u64(o, !(u64::from(bits) << sh), Ordering::SeqCst);
    }
}

/// Whether `e` lets `ldomid` use it: `GTF_permit_access` (no sub-page when mapping), the
/// right domid, and writable when asked.
fn usable(e: &Entry, ldomid: u16, readonly: bool, map: bool) -> bool {
    let mut mask = gnttabop::GTF_TYPE_MASK;
    if map {
        mask |= gnttabop::GTF_SUB_PAGE;
    }
    e.flags & mask == gnttabop::GTF_PERMIT_ACCESS
        && e.domid == ldomid
        && (readonly || e.flags & gnttabop::GTF_READONLY == 0)
}

/// Pin `gref` for `ldomid` (`_set_status` + the active entry). Returns the pinned grant.
pub(crate) fn pin(
    gt: &mut GrantTable,
    gref: u32,
    ldomid: u16,
    readonly: bool,
    map: bool,
) -> Result<Active, i16> {
    if gref >= nr_entries(gt) {
        return Err(gnttabop::GNTST_BAD_GNTREF);
    }
    let act = gt.active.get(gref);
    let first = act.is_none_or(|a| a.readers + a.writers == 0);
    let first_writer = !readonly && act.is_none_or(|a| a.writers == 0);
    let mut a = match act {
        Some(a) if !first => a,
        _ => Active {
            readers: 0,
            writers: 0,
            gfn: 0,
            start: 0,
            len: 0,
        },
    };
    if first || first_writer {
        let e = read_entry(gt, gref);
        // A later pin reuses the active entry; only a new writer re-checks GTF_readonly.
        let ok = if first {
            usable(&e, ldomid, readonly, map)
        } else {
            e.flags & gnttabop::GTF_READONLY == 0
        };
        if !ok {
            return Err(gnttabop::GNTST_GENERAL_ERROR);
        }
        let want = gnttabop::GTF_READING | if readonly { 0 } else { gnttabop::GTF_WRITING };
        let (old, e2) = set_bits_entry(gt, gref, want);
        let added = want & !old;
        let still = if first {
            usable(&e2, ldomid, readonly, map) && e2.frame == e.frame
        } else {
            e2.flags & gnttabop::GTF_READONLY == 0
        };
        if !still {
            clear_bits(gt, gref, added);
            return Err(gnttabop::GNTST_GENERAL_ERROR);
        }
        if first {
            let end = u32::from(e.start) + u32::from(e.len);
            if end > PAGE as u32 {
                clear_bits(gt, gref, added);
                return Err(gnttabop::GNTST_GENERAL_ERROR);
            }
            a.gfn = e.frame;
            a.start = e.start;
            a.len = e.len;
        }
    }
    if readonly {
        a.readers += 1;
    } else {
        a.writers += 1;
    }
    gt.active.set(gref, a);
    Ok(a)
}

/// Drop one pin of `gref`: GTF_writing goes with the last writer, GTF_reading with the last
/// pin (`unmap_common_complete` / `release_grant_for_copy`).
pub(crate) fn unpin(gt: &mut GrantTable, gref: u32, readonly: bool) -> bool {
    let Some(a) = gt.active.get_mut(gref) else {
        return false;
    };
    if readonly {
        a.readers = a.readers.saturating_sub(1);
    } else {
        a.writers = a.writers.saturating_sub(1);
    }
    let mut clear = 0;
    if a.writers == 0 {
        clear |= gnttabop::GTF_WRITING;
    }
    if a.readers + a.writers == 0 {
        clear |= gnttabop::GTF_READING;
        gt.active.remove(gref);
    }
    clear_bits(gt, gref, clear);
    true
}

/// A grant mapped by the dom0 side ([`Domain::grant_map`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantMapping {
    /// The handle to give [`Domain::grant_unmap`].
    pub handle: u32,
    /// The grant reference.
    pub gref: u32,
    /// The guest frame the grant names (guest RAM).
    pub gfn: Gfn,
    /// Mapped read-only.
    pub readonly: bool,
}

impl Domain {
    /// Grant table shared frame `idx`, if allocated (what the guest sees when it maps it).
    pub fn grant_frame(&self, idx: u32) -> Option<Arc<dyn SharedPage>> {
        self.gnttab.lock().frames.get(idx as usize).cloned()
    }

    /// Grant table v2 status frame `idx`, if allocated.
    pub fn grant_status_frame(&self, idx: u32) -> Option<Arc<dyn SharedPage>> {
        self.gnttab.lock().status.get(idx as usize).cloned()
    }

    /// The grant table version (1 or 2).
    pub fn grant_version(&self) -> u32 {
        self.gnttab.lock().version
    }

    /// The frame of a pinned grant, if it is guest RAM.
    fn grant_page(&self, gfn: u64) -> Result<Arc<dyn SharedPage>, i16> {
        let gfn = Gfn::new(gfn).ok_or(gnttabop::GNTST_BAD_PAGE)?;
        if !self.is_ram(gfn) {
            return Err(gnttabop::GNTST_BAD_PAGE);
        }
        self.platform
            .map_guest_page(gfn)
            .map_err(|_| gnttabop::GNTST_BAD_PAGE)
    }

    fn check_granter(&self, domid: u16) -> Result<(), Error> {
        if domid == self.cfg.domid {
            Ok(())
        } else {
            Err(Error::Grant(gnttabop::GNTST_BAD_DOMAIN))
        }
    }

    /// dom0's `GNTTABOP_map_grant_ref` of grant `gref` of domain `domid` (which must be this
    /// domain): the grant must be `GTF_permit_access` for domid 0, full-page, and writable
    /// unless `readonly`; it stays pinned (GTF_reading, and GTF_writing unless `readonly`, set
    /// in the guest's view) until [`Domain::grant_unmap`]. The VMM accesses the returned GFN
    /// itself. Errors carry Xen's `GNTST_*` status.
    pub fn grant_map(&self, gref: u32, domid: u16, readonly: bool) -> Result<GrantMapping, Error> {
        self.check_granter(domid)?;
        let mut gt = self.gnttab.lock();
        if gt.maps.len() >= MAX_MAPS {
            return Err(Error::Grant(gnttabop::GNTST_NO_DEVICE_SPACE));
        }
        let a = pin(&mut gt, gref, 0, readonly, true).map_err(Error::Grant)?;
        let gfn = match Gfn::new(a.gfn).filter(|g| self.is_ram(*g)) {
            Some(g) => g,
            None => {
                unpin(&mut gt, gref, readonly);
                return Err(Error::Grant(gnttabop::GNTST_BAD_PAGE));
            }
        };
        Ok(record_map(&mut gt, gref, gfn, readonly))
    }

    /// [`Domain::grant_map`] of several grants under one lock (a backend maps all the segments
    /// of a request at once): each `(gref, readonly)` is mapped in order and appended to `out`.
    /// On the first failure the ones this call mapped are unmapped again and the error comes
    /// with the failing grant's position in `refs`.
    pub fn grant_map_batch(
        &self,
        refs: &[(u32, bool)],
        domid: u16,
        out: &mut Vec<GrantMapping>,
    ) -> Result<(), (usize, Error)> {
        self.check_granter(domid).map_err(|e| (0, e))?;
        let is_ram = |g: &Gfn| self.is_ram(*g);
        let mut gt = self.gnttab.lock();
        let first = out.len();
        for (i, &(gref, readonly)) in refs.iter().enumerate() {
            let r = (|| {
                if gt.maps.len() >= MAX_MAPS {
                    return Err(gnttabop::GNTST_NO_DEVICE_SPACE);
                }
                let a = pin(&mut gt, gref, 0, readonly, true)?;
                let Some(gfn) = Gfn::new(a.gfn).filter(is_ram) else {
                    unpin(&mut gt, gref, readonly);
                    return Err(gnttabop::GNTST_BAD_PAGE);
                };
                Ok(record_map(&mut gt, gref, gfn, readonly))
            })();
            match r {
                Ok(m) => out.push(m),
                Err(st) => {
                    for m in out.drain(first..) {
                        if let Some(e) = gt.maps.remove(&m.handle) {
                            unpin(&mut gt, e.gref, e.readonly);
                        }
                    }
                    return Err((i, Error::Grant(st)));
                }
            }
        }
        Ok(())
    }

    /// Pins several grants of domain `domid` (this domain) for an access that ends before the
    /// caller answers the guest (a backend's I/O into or out of the granted pages), under one
    /// lock: each `(gref, readonly)` is checked and pinned as [`Domain::grant_map`] does
    /// (GTF_reading, and GTF_writing unless `readonly`, set in the guest's view) and its frame
    /// appended to `out`, but no handle is recorded: the caller gives each pin back exactly
    /// once with [`Domain::grant_unpin_batch`] and the same `(gref, readonly)`. Cheaper than
    /// a map and unmap (no handle table). Pins count against the same limit as mappings. On
    /// the first failure the pins this call took are dropped again and the error comes with
    /// the failing grant's position in `refs`.
    pub fn grant_pin_batch(
        &self,
        refs: &[(u32, bool)],
        domid: u16,
        out: &mut Vec<Gfn>,
    ) -> Result<(), (usize, Error)> {
        self.check_granter(domid).map_err(|e| (0, e))?;
        let mut gt = self.gnttab.lock();
        let first = out.len();
        for (i, &(gref, readonly)) in refs.iter().enumerate() {
            let r = (|| {
                if gt.maps.len() + gt.pins >= MAX_MAPS {
                    return Err(gnttabop::GNTST_NO_DEVICE_SPACE);
                }
                let a = pin(&mut gt, gref, 0, readonly, true)?;
                let Some(gfn) = Gfn::new(a.gfn).filter(|g| self.is_ram(*g)) else {
                    unpin(&mut gt, gref, readonly);
                    return Err(gnttabop::GNTST_BAD_PAGE);
                };
                gt.pins += 1;
                Ok(gfn)
            })();
            match r {
                Ok(g) => out.push(g),
                Err(st) => {
                    out.truncate(first);
                    for &(gref, readonly) in &refs[..i] {
                        unpin(&mut gt, gref, readonly);
                        gt.pins = gt.pins.saturating_sub(1);
                    }
                    return Err((i, Error::Grant(st)));
                }
            }
        }
        Ok(())
    }

    /// Gives back pins taken by [`Domain::grant_pin_batch`], under one lock (a grant not
    /// pinned is skipped); a grant's status bits clear with its last pin.
    pub fn grant_unpin_batch(&self, refs: impl IntoIterator<Item = (u32, bool)>) {
        let mut gt = self.gnttab.lock();
        for (gref, readonly) in refs {
            if unpin(&mut gt, gref, readonly) {
                gt.pins = gt.pins.saturating_sub(1);
            }
        }
    }

    /// [`Domain::grant_unmap`] of several handles under one lock (unknown handles are
    /// skipped).
    pub fn grant_unmap_batch(&self, handles: impl IntoIterator<Item = u32>) {
        let mut gt = self.gnttab.lock();
        for h in handles {
            if let Some(m) = gt.maps.remove(&h) {
                unpin(&mut gt, m.gref, m.readonly);
            }
        }
    }

    /// dom0's `GNTTABOP_unmap_grant_ref`: drop the mapping `handle` (`GNTST_bad_handle` if
    /// unknown); the grant's status bits clear with its last pin.
    pub fn grant_unmap(&self, handle: u32) -> Result<(), Error> {
        let mut gt = self.gnttab.lock();
        let m = gt
            .maps
            .remove(&handle)
            .ok_or(Error::Grant(gnttabop::GNTST_BAD_HANDLE))?;
        unpin(&mut gt, m.gref, m.readonly);
        Ok(())
    }

    /// dom0's `GNTTABOP_copy` from grant `gref` (granted to domid 0, read access) at `offset`
    /// into `buf`. The range must lie inside the page and the grant's sub-page range
    /// (`GNTST_bad_copy_arg` / `GNTST_general_error`).
    pub fn grant_copy_from(&self, gref: u32, offset: usize, buf: &mut [u8]) -> Result<(), Error> {
        self.grant_copy(gref, offset, buf.len(), true, |p, off| p.read(off, buf))
    }

    /// dom0's `GNTTABOP_copy` of `data` into grant `gref` (granted writable to domid 0) at
    /// `offset`, with the same bounds as [`Domain::grant_copy_from`].
    pub fn grant_copy_to(&self, gref: u32, offset: usize, data: &[u8]) -> Result<(), Error> {
        self.grant_copy(gref, offset, data.len(), false, |p, off| p.write(off, data))
    }

    fn grant_copy(
        &self,
        gref: u32,
        offset: usize,
        len: usize,
        readonly: bool,
        f: impl FnOnce(&dyn SharedPage, usize),
    ) -> Result<(), Error> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= PAGE)
            .ok_or(Error::Grant(gnttabop::GNTST_BAD_COPY_ARG))?;
        let mut gt = self.gnttab.lock();
        let a = pin(&mut gt, gref, 0, readonly, false).map_err(Error::Grant)?;
        let r = (|| {
            if offset < usize::from(a.start) || end > usize::from(a.start) + usize::from(a.len) {
                return Err(gnttabop::GNTST_GENERAL_ERROR);
            }
            let page = self.grant_page(a.gfn)?;
            f(&*page, offset);
            Ok(())
        })();
        unpin(&mut gt, gref, readonly);
        r.map_err(Error::Grant)
    }

    /// `gnttab_copy` for a domU caller. Native op: `{source {u u64, domid u16 @8, offset u16
    /// @10}, dest @16, len u16 @32, flags u16 @34, status i16 @36}` (40 bytes); compat: `{u
    /// u32, domid @4, offset @6}` pointers, `len @16, flags @18, status @20` (24 bytes).
    pub(crate) fn gnttab_copy(&self, ctx: &Ctx, uop: u64, count: u32) -> Result<i64, Errno> {
        let compat = ctx.g.is_compat();
        let (size, ptr, len_off) = if compat {
            (24u64, 8, 16)
        } else {
            (40u64, 16, 32)
        };
        for i in 0..count {
            if i == COPY_BATCH {
                return Ok(i64::from(count - i));
            }
            let at = ctx.g.elem_addr(uop, u64::from(i), size)?;
            let mut b = [0u8; 40];
            ctx.g.read(at, &mut b[..size as usize])?;
            let side = |k: usize| -> (u64, u16, u16) {
                let base = k * ptr;
                if compat {
                    (
                        u64::from(get_u32(&b, base)),
                        get_u16(&b, base + 4),
                        get_u16(&b, base + 6),
                    )
                } else {
                    (
                        get_u64(&b, base),
                        get_u16(&b, base + 8),
                        get_u16(&b, base + 10),
                    )
                }
            };
            let src = side(0);
            let dst = side(1);
            let len = get_u16(&b, len_off);
            let flags = get_u16(&b, len_off + 2);
            let st = match self.copy_one(src, dst, len, flags) {
                Ok(()) => gnttabop::GNTST_OKAY,
                Err(s) => s,
            };
            put_u16(&mut b, len_off + 4, st as u16);
            ctx.g
                .write(at + len_off as u64 + 4, &b[len_off + 4..len_off + 6])?;
        }
        Ok(0)
    }

    /// One copy: `(frame or gref, domid, offset)` for each side.
    fn copy_one(
        &self,
        src: (u64, u16, u16),
        dst: (u64, u16, u16),
        len: u16,
        flags: u16,
    ) -> Result<(), i16> {
        let sg = flags & gnttabop::GNTCOPY_SOURCE_GREF != 0;
        let dg = flags & gnttabop::GNTCOPY_DEST_GREF != 0;
        // gnttab_copy_lock_domain: only DOMID_SELF may name a frame.
        for (d, g) in [(src.1, sg), (dst.1, dg)] {
            if d != domid::SELF && !g {
                return Err(gnttabop::GNTST_PERMISSION_DENIED);
            }
            if self.lookup(d) == Lookup::None {
                return Err(gnttabop::GNTST_BAD_DOMAIN);
            }
        }
        let me = self.cfg.domid;
        let mut gt = self.gnttab.lock();
        let mut pins: Vec<(u32, bool)> = Vec::new();
        // gnttab_copy_claim_buf for each side: (gfn, start, len).
        let mut claim = |gt: &mut GrantTable, p: (u64, u16, u16), gref: bool, ro: bool| {
            if !gref {
                return Ok((p.0, 0u16, PAGE as u16));
            }
            if self.lookup(p.1) != Lookup::SelfDom {
                // dom0 has no grant table entries to give.
                return Err(gnttabop::GNTST_BAD_GNTREF);
            }
            let a = pin(gt, p.0 as u32, me, ro, false)?;
            pins.push((p.0 as u32, ro));
            Ok((a.gfn, a.start, a.len))
        };
        let r = (|| {
            let s = claim(&mut gt, src, sg, true)?;
            let d = claim(&mut gt, dst, dg, false)?;
            let (so, doff, n) = (usize::from(src.2), usize::from(dst.2), usize::from(len));
            if so + n > PAGE || doff + n > PAGE {
                return Err(gnttabop::GNTST_BAD_COPY_ARG);
            }
            for ((_, start, glen), off) in [(s, so), (d, doff)] {
                if off < usize::from(start) || off + n > usize::from(start) + usize::from(glen) {
                    return Err(gnttabop::GNTST_GENERAL_ERROR);
                }
            }
            let sp = self.grant_page(s.0)?;
            let dp = self.grant_page(d.0)?;
            let mut tmp = vec![0u8; n];
            sp.read(so, &mut tmp);
            dp.write(doff, &tmp);
            Ok(())
        })();
        for (g, ro) in pins {
            unpin(&mut gt, g, ro);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_checks_type_domid_readonly_and_subpage() {
        let e = Entry {
            flags: gnttabop::GTF_PERMIT_ACCESS | gnttabop::GTF_READONLY,
            domid: 0,
            frame: 5,
            start: 0,
            len: 4096,
        };
        assert!(usable(&e, 0, true, true));
        assert!(!usable(&e, 0, false, true), "read-only grant");
        assert!(!usable(&e, 1, true, true), "wrong domid");
        let sub = Entry {
            flags: gnttabop::GTF_PERMIT_ACCESS | gnttabop::GTF_SUB_PAGE,
            ..e
        };
        assert!(!usable(&sub, 0, true, true), "no sub-page mappings");
        assert!(usable(&sub, 0, true, false), "sub-page copies");
        let tr = Entry {
            flags: gnttabop::GTF_TRANSITIVE,
            ..e
        };
        assert!(!usable(&tr, 0, true, false));
    }
}
