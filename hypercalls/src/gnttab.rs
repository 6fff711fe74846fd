//! The grant table (version 1): shared frames owned by the domain, placed by the guest with
//! `XENMEM_add_to_physmap(XENMAPSPACE_grant_table)`, and the `GNTTABOP_*` an HVM guest may use.
//!
//! Frames are pages from [`Platform::new_shared_page`](crate::Platform::new_shared_page); the
//! table starts with one frame (`INITIAL_NR_GRANT_FRAMES`) and grows on demand up to
//! `max_grant_frames`, as Xen's `gnttab_grow_table`. `setup_table` reports each frame's
//! current GFN (`INVALID_GFN` while unplaced), as Xen's `gnttab_shared_gfn` does for HVM.
//!
//! Version 2 is refused the way a Xen with `max_grant_version = 1` refuses it (`-ENOSYS`).
//! TODO(issue 5): v2 and status frames, `GNTTABOP_copy`, and the dom0-side map/copy API.

use std::sync::Arc;

use crate::abi::{get_u16, get_u32, gnttabop, put_u16, put_u32};
use crate::domain::{Ctx, Domain, Lookup};
use crate::errno::Errno;
use crate::platform::{OverlayId, Platform};
use crate::shared::SharedPage;
use crate::Error;

pub(crate) struct GrantTable {
    pub version: u32,
    pub max_frames: u32,
    pub frames: Vec<Arc<dyn SharedPage>>,
}

impl GrantTable {
    pub fn new(p: &dyn Platform, max_frames: u32) -> Result<Self, Error> {
        let mut gt = GrantTable {
            version: 1,
            max_frames,
            frames: Vec::new(),
        };
        gt.grow(p, gnttabop::INITIAL_FRAMES)
            .map_err(Error::PageAllocation)?;
        Ok(gt)
    }

    /// `gnttab_grow_table`: allocate frames up to `n` (the caller checked `n <= max_frames`).
    pub fn grow(&mut self, p: &dyn Platform, n: u32) -> Result<(), Errno> {
        while (self.frames.len() as u32) < n {
            let page = p.new_shared_page().map_err(|_| Errno::ENOMEM)?;
            self.frames.push(page);
        }
        Ok(())
    }

    pub fn nr_frames(&self) -> u32 {
        self.frames.len() as u32
    }
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
            // TODO(issue 5): copy (for dom0-side services), map/unmap/swap of own grants.
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

    /// `gnttab_set_version`: v1 only; the current version is written back in every case.
    fn gnttab_set_version(&self, ctx: &Ctx, uop: u64) -> Result<i64, Errno> {
        let b: [u8; 4] = ctx.g.read_arr(uop)?;
        let want = get_u32(&b, 0);
        let res = match want {
            1 => Ok(0),
            // max_grant_version == 1: "Behave as before set_version was introduced."
            2 => Err(Errno::ENOSYS),
            _ => Err(Errno::EINVAL),
        };
        let cur = self.gnttab.lock().version;
        ctx.g.write(uop, &cur.to_le_bytes())?;
        res
    }

    /// `gnttab_get_version` `{dom u16, pad u16, version u32}`.
    fn gnttab_get_version(&self, ctx: &Ctx, uop: u64) -> Result<i64, Errno> {
        let b: [u8; 8] = ctx.g.read_arr(uop)?;
        self.target_self(get_u16(&b, 0))?;
        let v = self.gnttab.lock().version;
        ctx.g.write(uop + 4, &v.to_le_bytes())?;
        Ok(0)
    }

    /// `gnttab_map_frame_begin` + placement, for `XENMAPSPACE_grant_table`.
    pub(crate) fn map_grant_frame(&self, idx: u64, gfn: crate::types::Gfn) -> Result<(), Errno> {
        let mut gt = self.gnttab.lock();
        // v1 has no status frames: the index is a shared frame index (truncated to unsigned
        // int as in gnttab_get_shared_frame_mfn).
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
