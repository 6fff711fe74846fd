//! The grant table: shared frames (and, in version 2, status frames) owned by the domain,
//! placed by the guest with `XENMEM_add_to_physmap(XENMAPSPACE_grant_table)`, and the
//! `GNTTABOP_*` an HVM guest may use. Entry access, pins and the dom0-side API are in
//! `grant_access`.
//!
//! Frames are pages from [`Platform::new_shared_page`](crate::Platform::new_shared_page); the
//! table starts with one frame (`INITIAL_NR_GRANT_FRAMES`) and grows on demand up to
//! `max_grant_frames`, as Xen's `gnttab_grow_table`. `setup_table` and `get_status_frames`
//! report each frame's current GFN (`INVALID_GFN` while unplaced), as Xen's
//! `gnttab_shared_gfn`/`gnttab_status_gfn` do for HVM.
//!
//! Versions (`gnttab_set_version`, Xen's default `max_grant_version` 2): v1 entries are
//! 8 bytes `{flags, domid, frame u32}` (512 per frame) with GTF_reading/GTF_writing in `flags`;
//! v2 entries are 16 bytes `{flags, domid, union}` (256 per frame) with a separate `u16` status
//! per entry in status frames (2048 per frame, `ceil(frames / 8)` of them). Switching is
//! refused (`-EBUSY`) while a grant other than the 8 reserved ones is pinned; the reserved
//! entries are carried over in the new format, every other entry is cleared; going back to v1
//! refuses (`-ERANGE`) a reserved v2 entry v1 cannot express, and unplaces the status frames.
//!
//! `GNTTABOP_copy` works as Xen's for a domU: its own frames (`DOMID_SELF`, by GFN) and grants
//! its own table gives to itself; any other grant domain has no entries it could use
//! (`GNTST_bad_gntref` for dom0, `GNTST_bad_domain` for others). At most
//! [`COPY_BATCH`] operations run per call; when more remain the call returns how many (Xen's
//! value before it sets up a continuation; xenkvm has no continuations).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::abi::{get_u16, get_u32, gnttabop, put_u16, put_u32, xenmem};
use crate::domain::{Ctx, Domain, Lookup};
use crate::errno::Errno;
use crate::platform::{OverlayId, Platform};
use crate::shared::SharedPage;
use crate::Error;

/// `GNTTABOP_copy` operations handled per hypercall.
pub(crate) const COPY_BATCH: u32 = 512;

/// Pins of one grant (`struct active_grant_entry`): the grant is in use while either count
/// is non-zero, and its frame and range are the ones seen at the first pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Active {
    pub readers: u32,
    pub writers: u32,
    pub gfn: u64,
    pub start: u16,
    pub len: u16,
}

impl Active {
    fn in_use(&self) -> bool {
        self.readers + self.writers != 0
    }
}

/// The active entries, indexed by grant reference (as Xen keeps them, per
/// table frame): a pin and an unpin are an index each, where a hash map
/// cost a backend's 4 KiB read about 2 % of its CPU (`cargo bench --bench
/// blkback`: the map's insert was its largest single user-space cost). Grown
/// a frame's worth of entries (512) at a time up to the highest reference
/// pinned; the caller bounds references by the table's size, so a guest
/// grows it no further than its own table.
#[derive(Default)]
pub(crate) struct ActiveTable {
    entries: Vec<Active>,
}

impl ActiveTable {
    const CHUNK: usize = 512;

    /// The entry of `gref` if the grant is pinned.
    pub fn get(&self, gref: u32) -> Option<Active> {
        self.entries
            .get(gref as usize)
            .copied()
            .filter(Active::in_use)
    }

    /// The pinned entry of `gref`, to update in place.
    pub fn get_mut(&mut self, gref: u32) -> Option<&mut Active> {
        self.entries.get_mut(gref as usize).filter(|a| a.in_use())
    }

    /// Sets `gref`'s entry.
    pub fn set(&mut self, gref: u32, a: Active) {
        let i = gref as usize;
        if i >= self.entries.len() {
            self.entries
                .resize((i / Self::CHUNK + 1) * Self::CHUNK, Active::default());
        }
        self.entries[i] = a;
    }

    /// Frees `gref`'s entry.
    pub fn remove(&mut self, gref: u32) {
        if let Some(a) = self.entries.get_mut(gref as usize) {
            *a = Active::default();
        }
    }

    /// The pinned entries.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Active)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, a)| a.in_use())
            .map(|(i, a)| (i as u32, a))
    }
}

/// A mapping the dom0 side holds (`maptrack` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapEntry {
    pub gref: u32,
    pub readonly: bool,
}

/// Hashing for the grant-reference and handle keyed maps: a multiplicative hash of the
/// `u32` (keys are small integers; the default SipHash and a BTreeMap cost more than the
/// rest of a backend's grant map and unmap). Keys come from the guest (grant references),
/// but a guest can only fill the table with its own grants (bounded by its frames and
/// `MAX_MAPS`), so collisions cost it time, not the VMM's correctness.
#[derive(Default)]
pub(crate) struct U32Hasher(u64);

impl Hasher for U32Hasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub(crate) type U32Hash = BuildHasherDefault<U32Hasher>;

pub(crate) struct GrantTable {
    pub version: u32,
    pub max_frames: u32,
    pub frames: Vec<Arc<dyn SharedPage>>,
    /// Status frames (version 2 only; empty under v1).
    pub status: Vec<Arc<dyn SharedPage>>,
    pub active: ActiveTable,
    pub maps: HashMap<u32, MapEntry, U32Hash>,
    /// Pins held by `Domain::grant_pin_batch` (no handle; bounded with `maps`).
    pub pins: usize,
    pub next_handle: u32,
}

impl GrantTable {
    pub fn new(p: &dyn Platform, max_frames: u32) -> Result<Self, Error> {
        let mut gt = GrantTable {
            version: 1,
            max_frames,
            frames: Vec::new(),
            status: Vec::new(),
            active: ActiveTable::default(),
            maps: HashMap::default(),
            pins: 0,
            next_handle: 0,
        };
        gt.grow(p, gnttabop::INITIAL_FRAMES)
            .map_err(Error::PageAllocation)?;
        Ok(gt)
    }

    /// `gnttab_grow_table`: allocate frames up to `n` (the caller checked `n <= max_frames`),
    /// and under v2 the status frames they need.
    pub fn grow(&mut self, p: &dyn Platform, n: u32) -> Result<(), Errno> {
        while (self.frames.len() as u32) < n {
            let page = p.new_shared_page().map_err(|_| Errno::ENOMEM)?;
            self.frames.push(page);
        }
        if self.version == 2 {
            self.populate_status(p)?;
        }
        Ok(())
    }

    /// `gnttab_populate_status_frames` for the current number of shared frames.
    pub fn populate_status(&mut self, p: &dyn Platform) -> Result<(), Errno> {
        let want = status_frames_for(self.nr_frames());
        while (self.status.len() as u32) < want {
            let page = p.new_shared_page().map_err(|_| Errno::ENOMEM)?;
            self.status.push(page);
        }
        Ok(())
    }

    pub fn nr_frames(&self) -> u32 {
        self.frames.len() as u32
    }

    pub fn nr_status_frames(&self) -> u32 {
        self.status.len() as u32
    }
}

/// `grant_to_status_frames`: 256 v2 entries per shared frame, 2048 statuses per status frame.
pub(crate) fn status_frames_for(grant_frames: u32) -> u32 {
    grant_frames.div_ceil(8)
}

const INVALID_GFN_64: u64 = u64::MAX;

impl Domain {
    /// `hvm_grant_table_op` + `do_grant_table_op` / `compat_grant_table_op`.
    pub(crate) fn grant_table_op(
        &self,
        ctx: &Ctx,
        cmd: u32,
        uop: u64,
        count: u32,
    ) -> Result<i64, Errno> {
        match cmd {
            gnttabop::QUERY_SIZE
            | gnttabop::SETUP_TABLE
            | gnttabop::SET_VERSION
            | gnttabop::GET_VERSION
            | gnttabop::COPY
            | gnttabop::MAP_GRANT_REF
            | gnttabop::UNMAP_GRANT_REF
            | gnttabop::SWAP_GRANT_REF => {}
            // "All other commands need auditing."
            _ => return Err(Errno::ENOSYS),
        }
        if (count as i32) < 0 {
            return Err(Errno::EINVAL);
        }
        match cmd {
            gnttabop::QUERY_SIZE => self.gnttab_query_size(ctx, uop, count),
            gnttabop::SETUP_TABLE => self.gnttab_setup_table(ctx, uop, count),
            gnttabop::SET_VERSION => self.gnttab_set_version(ctx, uop),
            gnttabop::GET_VERSION => self.gnttab_get_version(ctx, uop),
            gnttabop::COPY => self.gnttab_copy(ctx, uop, count),
            // map/unmap/swap of other domains' grants: not offered to a domU here.
            // (GNTTABOP_get_status_frames is not in hvm_grant_table_op's list either: an HVM
            // guest maps status frames with XENMAPIDX_grant_table_status.)
            _ => Err(Errno::ENOSYS),
        }
    }

    /// Status for an operation on `dom`: GNTST_bad_domain or GNTST_permission_denied.
    fn gnttab_target(&self, dom: u16) -> Result<(), i16> {
        match self.lookup(dom) {
            Lookup::SelfDom => Ok(()),
            Lookup::Dom0 => Err(gnttabop::GNTST_PERMISSION_DENIED),
            Lookup::None => Err(gnttabop::GNTST_BAD_DOMAIN),
        }
    }

    /// `gnttab_query_size` (the same 16-byte layout in both widths).
    fn gnttab_query_size(&self, ctx: &Ctx, uop: u64, count: u32) -> Result<i64, Errno> {
        if count != 1 {
            return Err(Errno::EINVAL);
        }
        let mut b: [u8; 16] = ctx.g.read_arr(uop)?;
        let status = match self.gnttab_target(get_u16(&b, 0)) {
            Ok(()) => {
                let gt = self.gnttab.lock();
                put_u32(&mut b, 4, gt.nr_frames());
                put_u32(&mut b, 8, gt.max_frames);
                gnttabop::GNTST_OKAY
            }
            Err(st) => st,
        };
        put_u16(&mut b, 12, status as u16);
        ctx.g.write(uop, &b)?;
        Ok(0)
    }

    /// `gnttab_setup_table`. Native: `{dom u16, nr_frames u32 @4, status i16 @8, frame_list
    /// u64 @16}`, only `status` is written back. Compat: `{.., frame_list u32 @12}`, 32-bit frame
    /// numbers, the whole structure written back; a count of 0 does nothing.
    fn gnttab_setup_table(&self, ctx: &Ctx, uop: u64, count: u32) -> Result<i64, Errno> {
        let compat = ctx.g.is_compat();
        if compat && count == 0 {
            return Ok(0);
        }
        if count != 1 {
            return Err(Errno::EINVAL);
        }
        let mut b = [0u8; 24];
        let len = if compat { 16 } else { 24 };
        ctx.g.read(uop, &mut b[..len])?;
        let nr_frames = get_u32(&b, 4);
        let (list, elem) = if compat {
            (u64::from(get_u32(&b, 12)), 4u64)
        } else {
            (crate::abi::get_u64(&b, 16), 8u64)
        };
        let status = match self.gnttab_target(get_u16(&b, 0)) {
            Err(st) => st,
            Ok(()) => self.setup_table_frames(ctx, nr_frames, list, elem),
        };
        put_u16(&mut b, 8, status as u16);
        if compat {
            ctx.g.write(uop, &b[..16])?;
        } else {
            ctx.g.write(uop + 8, &b[8..10])?;
        }
        Ok(0)
    }

    /// Grow the table to `nr` frames and write their GFNs to the guest's list.
    fn setup_table_frames(&self, ctx: &Ctx, nr: u32, list: u64, elem: u64) -> i16 {
        let mut gt = self.gnttab.lock();
        if nr > gt.max_frames {
            return gnttabop::GNTST_GENERAL_ERROR;
        }
        if nr > gt.nr_frames() && gt.grow(&*self.platform, nr).is_err() {
            return gnttabop::GNTST_GENERAL_ERROR;
        }
        let physmap = self.physmap.lock();
        let mut status = gnttabop::GNTST_OKAY;
        for i in 0..nr {
            let gfn = physmap
                .get(&OverlayId::GrantFrame(i))
                .map_or(INVALID_GFN_64, |g| g.get());
            let r = ctx.g.elem_addr(list, u64::from(i), elem).and_then(|a| {
                if elem == 4 {
                    ctx.g.write(a, &(gfn as u32).to_le_bytes())
                } else {
                    ctx.g.write(a, &gfn.to_le_bytes())
                }
            });
            if r.is_err() {
                status = gnttabop::GNTST_BAD_VIRT_ADDR;
            }
        }
        status
    }

    /// `gnttab_set_version`; the current version is written back in every case.
    fn gnttab_set_version(&self, ctx: &Ctx, uop: u64) -> Result<i64, Errno> {
        let b: [u8; 4] = ctx.g.read_arr(uop)?;
        let want = get_u32(&b, 0);
        let res = match want {
            1 | 2 => self.set_version(want),
            _ => Err(Errno::EINVAL),
        };
        let cur = self.gnttab.lock().version;
        ctx.g.write(uop, &cur.to_le_bytes())?;
        res.map(|()| 0)
    }

    /// Switch the table to version `want` (1 or 2) as Xen does; see the module doc.
    pub(crate) fn set_version(&self, want: u32) -> Result<(), Errno> {
        let mut gt = self.gnttab.lock();
        if gt.version == want {
            return Ok(());
        }
        let reserved = gnttabop::NR_RESERVED_ENTRIES;
        if gt.active.iter().any(|(r, _)| r >= reserved) {
            return Err(Errno::EBUSY);
        }
        if gt.version == 1 {
            // Allocated before anything changes, so a failure leaves v1 intact.
            let mut staged = Vec::new();
            for _ in gt.nr_status_frames()..status_frames_for(gt.nr_frames()) {
                staged.push(self.platform.new_shared_page().map_err(|_| Errno::ENOMEM)?);
            }
            gt.status.extend(staged);
        } else {
            for r in 0..reserved {
                let e = crate::grant_access::read_entry(&gt, r);
                let ty = e.flags & gnttabop::GTF_TYPE_MASK;
                if ty == gnttabop::GTF_TRANSITIVE
                    || (ty == gnttabop::GTF_PERMIT_ACCESS && e.frame >> 32 != 0)
                {
                    return Err(Errno::ERANGE);
                }
            }
        }
        // The reserved entries in v1 form (flags with the status bits folded in).
        let saved: Vec<crate::grant_access::Entry> = (0..reserved)
            .map(|r| {
                let mut e = crate::grant_access::read_entry(&gt, r);
                if gt.version == 2 {
                    if e.flags & gnttabop::GTF_TYPE_MASK == gnttabop::GTF_PERMIT_ACCESS {
                        e.flags |= crate::grant_access::status_bits(&gt, r);
                    } else {
                        e = crate::grant_access::Entry::default();
                    }
                }
                e
            })
            .collect();
        if gt.version == 2 {
            // gnttab_unpopulate_status_frames: out of the guest's physmap, then freed.
            let n = gt.nr_status_frames();
            let mut map = self.physmap.lock();
            for i in 0..n {
                let id = OverlayId::GrantStatus(i);
                if map.remove(&id).is_some() {
                    if let Err(e) = self.platform.unplace_overlay(id) {
                        tracing::warn!(%e, i, "cannot unplace a grant status frame");
                    }
                }
            }
            gt.status.clear();
        }
        for f in &gt.frames {
            f.write(0, &[0u8; crate::abi::PAGE_SIZE]);
        }
        gt.version = want;
        for (r, e) in (0..reserved).zip(saved) {
            crate::grant_access::write_entry(&gt, r, &e);
        }
        Ok(())
    }

    /// `gnttab_get_version` `{dom u16, pad u16, version u32}`.
    fn gnttab_get_version(&self, ctx: &Ctx, uop: u64) -> Result<i64, Errno> {
        let b: [u8; 8] = ctx.g.read_arr(uop)?;
        self.target_self(get_u16(&b, 0))?;
        let v = self.gnttab.lock().version;
        ctx.g.write(uop + 4, &v.to_le_bytes())?;
        Ok(0)
    }

    /// `gnttab_map_frame` + placement, for `XENMAPSPACE_grant_table`: a shared frame, or under
    /// v2 with `XENMAPIDX_grant_table_status` a status frame. Either grows the table on demand.
    pub(crate) fn map_grant_frame(&self, idx: u64, gfn: crate::types::Gfn) -> Result<(), Errno> {
        let mut gt = self.gnttab.lock();
        if gt.version == 2 && idx & xenmem::MAPIDX_GRANT_TABLE_STATUS != 0 {
            let idx = idx & !xenmem::MAPIDX_GRANT_TABLE_STATUS;
            if idx >= u64::from(gt.nr_status_frames()) {
                // gnttab_get_status_frame_mfn: enough grant frames to make idx valid.
                let nr_status = u32::try_from(idx + 1).map_err(|_| Errno::EINVAL)?;
                let nr_grant = nr_status.checked_mul(8).ok_or(Errno::EINVAL)?;
                if nr_grant <= gt.max_frames {
                    let _ = gt.grow(&*self.platform, nr_grant);
                }
                if idx >= u64::from(gt.nr_status_frames()) {
                    return Err(Errno::EINVAL);
                }
            }
            let page = gt.status[idx as usize].clone();
            return self.place(OverlayId::GrantStatus(idx as u32), &page, gfn);
        }
        // A shared frame index (truncated to unsigned int as in gnttab_get_shared_frame_mfn).
        let idx = idx as u32;
        if idx >= gt.nr_frames() {
            let want = idx.checked_add(1).ok_or(Errno::EINVAL)?;
            if want <= gt.max_frames {
                let _ = gt.grow(&*self.platform, want);
            }
            if idx >= gt.nr_frames() {
                return Err(Errno::EINVAL);
            }
        }
        let page = gt.frames[idx as usize].clone();
        self.place(OverlayId::GrantFrame(idx), &page, gfn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_table_grows_to_the_pinned_reference_and_frees_entries() {
        let mut t = ActiveTable::default();
        assert_eq!(t.get(0), None);
        assert_eq!(
            t.get(u32::MAX),
            None,
            "beyond the table: not pinned, no panic"
        );
        let a = Active {
            readers: 1,
            writers: 0,
            gfn: 7,
            start: 0,
            len: 4096,
        };
        t.set(1500, a);
        assert_eq!(t.entries.len(), 1536, "grown a frame's worth at a time");
        assert_eq!(t.get(1500), Some(a));
        assert_eq!(t.get(1499), None);
        t.get_mut(1500).unwrap().writers = 2;
        assert_eq!(
            t.iter().map(|(r, e)| (r, e.writers)).collect::<Vec<_>>(),
            [(1500, 2)]
        );
        t.remove(1500);
        assert_eq!(t.get(1500), None);
        assert!(t.get_mut(1500).is_none());
        assert_eq!(t.iter().count(), 0);
        t.remove(1_000_000);
    }
}
