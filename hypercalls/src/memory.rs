//! `memory_op` for an HVM domU: placing shared_info and grant frames
//! (`XENMEM_add_to_physmap`), removing them (`remove_from_physmap`), the memory map, the
//! reservation queries, and the balloon (`decrease_reservation`, `populate_physmap`,
//! `increase_reservation`).
//!
//! The command word carries a continuation extent in its upper bits (`MEMOP_EXTENT_SHIFT`);
//! the queries reject a non-zero extent as Xen does, the reservation operations start there.
//! `get_vnumainfo` is `-EOPNOTSUPP` (no vNUMA topology), as Xen answers a domain without one.
//!
//! Balloon: RAM is the memory map's; a RAM frame the guest gives back (`decrease_reservation`,
//! or `remove_from_physmap` of RAM) is released to the host ([`Platform::release_pages`]) and
//! remembered as ballooned; `populate_physmap` brings frames back
//! ([`Platform::populate_pages`]: fresh, zeroed RAM, even for a frame that was present, as
//! Xen's new page is) within `max_pages`. As in Xen the reservation operations return the
//! number of extents done and stop at the first they cannot do (a hole, a frame already given
//! back, a fault); malformed arguments (too many extents, an order above 9, a domain other
//! than itself) return the starting extent. Xen preempts long calls and continues them;
//! xenkvm does at most [`MAX_EXTENTS_PER_CALL`] extents per call and returns the count done,
//! which a guest sees as a short count (Linux's balloon asks for at most 512 at a time).
//! An overlay at a frame being given back or populated is unplaced first.
//!
//! [`Platform::release_pages`]: crate::Platform::release_pages
//! [`Platform::populate_pages`]: crate::Platform::populate_pages
//!
//! Deliberate difference: `XENMEM_maximum_ram_page` returns the guest's highest RAM frame + 1
//! instead of the host's `max_page`, so no host detail leaks.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::abi::{self, get_u16, get_u32, get_u64, put_u32, xenmem};
use crate::domain::{Ctx, Domain};
use crate::errno::Errno;
use crate::platform::{E820Entry, OverlayId};
use crate::shared::SharedPage;
use crate::types::Gfn;

/// More entries than any real memory map has; bounds the copy-out loop.
const MAX_E820_ENTRIES: usize = 128;

/// Extents one reservation call handles (see the module doc).
pub(crate) const MAX_EXTENTS_PER_CALL: u64 = 512;
/// `max_order()` of a domU (`CONFIG_DOMU_MAX_ORDER`).
const DOMU_MAX_ORDER: u32 = 9;
/// `XENMEMF_populate_on_demand`, `XENMEMF_exact_node_request`, `XENMEMF_vnode`.
const MEMF_POD: u32 = xen_abi::XENMEMF_populate_on_demand;
const MEMF_EXACT_NODE: u32 = 1 << 17;
const MEMF_VNODE: u32 = 1 << 18;

/// The balloon's state: RAM frames given back, and pages `increase_reservation` added without
/// a place in the physmap (an HVM guest's pages from that call are never mapped, as in Xen).
#[derive(Debug, Default)]
pub(crate) struct Balloon {
    pub out: BTreeSet<u64>,
    pub unmapped: u64,
}

impl Domain {
    /// `hvm_memory_op` + `do_memory_op`/`compat_memory_op` + `arch_memory_op`.
    pub(crate) fn memory_op(&self, ctx: &Ctx, cmd: u64, arg: u64) -> Result<i64, Errno> {
        let op = (cmd & xenmem::MEMOP_CMD_MASK) as u32;
        let start_extent = cmd >> xenmem::MEMOP_EXTENT_SHIFT;
        match op {
            xenmem::MAXIMUM_RAM_PAGE => {
                if start_extent != 0 {
                    return Err(Errno::EINVAL);
                }
                Ok(self.max_ram_pfn() as i64)
            }
            xenmem::CURRENT_RESERVATION | xenmem::MAXIMUM_RESERVATION | xenmem::MAXIMUM_GPFN => {
                if start_extent != 0 {
                    return Err(Errno::EINVAL);
                }
                let b: [u8; 2] = ctx.g.read_arr(arg)?;
                self.target_self(get_u16(&b, 0))?;
                Ok(match op {
                    xenmem::CURRENT_RESERVATION => self.tot_pages(),
                    xenmem::MAXIMUM_RESERVATION => self.max_pages(),
                    _ => self.max_gpfn(),
                } as i64)
            }
            xenmem::ADD_TO_PHYSMAP => {
                // "Check for malicious or buggy input": the extent must fit xatp.size (u16).
                if start_extent > u64::from(u16::MAX) {
                    return Err(Errno::EDOM);
                }
                self.add_to_physmap(ctx, arg).map(|()| 0)
            }
            xenmem::MEMORY_MAP if start_extent == 0 => self.memory_map(ctx, arg).map(|()| 0),
            // hvm_memory_op refuses these outright.
            xenmem::MACHINE_MEMORY_MAP | xenmem::MACHPHYS_MAPPING => Err(Errno::ENOSYS),
            xenmem::SET_MEMORY_MAP => Err(Errno::EPERM),
            xenmem::GET_VNUMAINFO => {
                // xen_vnuma_topology_info (40 bytes both widths): this domain has no vNUMA
                // topology, which Xen reports as -EOPNOTSUPP after the argument checks.
                if start_extent != 0 {
                    return Err(Errno::EINVAL);
                }
                let b: [u8; 40] = ctx.g.read_arr(arg)?;
                if get_u16(&b, 2) != 0 {
                    return Err(Errno::EINVAL);
                }
                self.target_self(get_u16(&b, 0))?;
                Err(Errno::EOPNOTSUPP)
            }
            xenmem::INCREASE_RESERVATION
            | xenmem::DECREASE_RESERVATION
            | xenmem::POPULATE_PHYSMAP => Ok(self.reservation(ctx, op, start_extent, arg) as i64),
            xenmem::REMOVE_FROM_PHYSMAP => {
                if start_extent != 0 {
                    return Err(Errno::EINVAL);
                }
                self.remove_from_physmap(ctx, arg).map(|()| 0)
            }
            _ => Err(Errno::ENOSYS),
        }
    }

    /// `XENMEM_add_to_physmap`. Native `{domid u16, size u16, space u32, idx u64 @8, gpfn
    /// u64 @16}`; compat `{.., idx u32 @8, gpfn u32 @12}`.
    fn add_to_physmap(&self, ctx: &Ctx, arg: u64) -> Result<(), Errno> {
        let mut b = [0u8; 24];
        let (idx, gpfn) = if ctx.g.is_compat() {
            ctx.g.read(arg, &mut b[..16])?;
            (u64::from(get_u32(&b, 8)), u64::from(get_u32(&b, 12)))
        } else {
            ctx.g.read(arg, &mut b)?;
            (get_u64(&b, 8), get_u64(&b, 16))
        };
        let space = get_u32(&b, 4);
        if space == xenmem::MAPSPACE_GMFN_FOREIGN {
            return Err(Errno::ENOSYS);
        }
        self.target_self(get_u16(&b, 0))?;
        if space == xenmem::MAPSPACE_DEV_MMIO {
            return Err(Errno::EACCES);
        }
        // INVALID_GFN, or a frame no p2m can hold. (A compat gpfn is zero-extended by the
        // argument translation, so it is always a candidate frame.)
        let gfn = Gfn::new(gpfn).ok_or(Errno::EINVAL)?;
        match space {
            xenmem::MAPSPACE_SHARED_INFO => {
                if idx != 0 {
                    return Err(Errno::EINVAL);
                }
                let page = self.shared_info.clone();
                if self
                    .resume_masked
                    .swap(false, std::sync::atomic::Ordering::AcqRel)
                {
                    self.mask_all_2l();
                }
                self.place(OverlayId::SharedInfo, &page, gfn)
            }
            xenmem::MAPSPACE_GRANT_TABLE => self.map_grant_frame(idx, gfn),
            // Moving RAM frames around the physmap is not offered (memory is fixed memslots).
            xenmem::MAPSPACE_GMFN | xenmem::MAPSPACE_GMFN_RANGE => {
                tracing::debug!(space, "add_to_physmap of RAM frames is not supported");
                Err(Errno::EOPNOTSUPP)
            }
            // xenmem_add_to_physmap_one: an unknown space has no MFN.
            _ => Err(Errno::EINVAL),
        }
    }

    /// Place an overlay and record where it is; an overlay displaced from `gfn` is unplaced.
    pub(crate) fn place(
        &self,
        id: OverlayId,
        page: &Arc<dyn SharedPage>,
        gfn: Gfn,
    ) -> Result<(), Errno> {
        let mut map = self.physmap.lock();
        self.platform.place_overlay(id, page, gfn)?;
        map.retain(|k, g| *k == id || *g != gfn);
        map.insert(id, gfn);
        Ok(())
    }

    /// `XENMEM_memory_map`: `{nr_entries u32, buffer handle}` (handle u64 @8, or u32 @4 for
    /// compat); copies at most `nr_entries` packed 20-byte entries and writes the count back.
    fn memory_map(&self, ctx: &Ctx, arg: u64) -> Result<(), Errno> {
        let compat = ctx.g.is_compat();
        let mut b = [0u8; 16];
        let len = if compat { 8 } else { 16 };
        ctx.g.read(arg, &mut b[..len])?;
        let map = self.platform.memory_map();
        if map.is_empty() {
            // "Backwards compatibility": no map set.
            return Err(Errno::ENOSYS);
        }
        let buf = if compat {
            u64::from(get_u32(&b, 4))
        } else {
            get_u64(&b, 8)
        };
        let n = (get_u32(&b, 0) as usize)
            .min(map.len())
            .min(MAX_E820_ENTRIES);
        let mut out = Vec::with_capacity(n * xenmem::E820_ENTRY_LEN);
        for e in &map[..n] {
            out.extend_from_slice(&e.addr.to_le_bytes());
            out.extend_from_slice(&e.size.to_le_bytes());
            out.extend_from_slice(&e.kind.to_le_bytes());
        }
        ctx.g.write(buf, &out)?;
        put_u32(&mut b, 0, n as u32);
        ctx.g.write(arg, &b[..len])
    }

    fn ram_entries(&self) -> impl Iterator<Item = E820Entry> {
        self.platform
            .memory_map()
            .into_iter()
            .filter(|e| e.kind == E820Entry::RAM)
    }

    /// `domain_tot_pages`: RAM in the memory map, less what the balloon gave back, plus pages
    /// `increase_reservation` added.
    fn tot_pages(&self) -> u64 {
        let b = self.balloon.lock();
        (self.ram_pages() - (b.out.len() as u64).min(self.ram_pages())).saturating_add(b.unmapped)
    }

    fn max_pages(&self) -> u64 {
        self.cfg.max_pages.unwrap_or_else(|| self.ram_pages())
    }

    /// Pages of RAM in the memory map.
    fn ram_pages(&self) -> u64 {
        self.ram_entries()
            .map(|e| e.size >> abi::PAGE_SHIFT)
            .fold(0, u64::saturating_add)
    }

    /// One past the highest RAM frame.
    fn max_ram_pfn(&self) -> u64 {
        self.ram_entries()
            .map(|e| {
                e.addr
                    .saturating_add(e.size)
                    .div_ceil(abi::PAGE_SIZE as u64)
            })
            .max()
            .unwrap_or(0)
    }

    /// `domain_get_maximum_gpfn`: the highest frame mapped, RAM or overlay.
    fn max_gpfn(&self) -> u64 {
        let ram = self.max_ram_pfn().saturating_sub(1);
        let ov = self
            .physmap
            .lock()
            .values()
            .map(|g| g.get())
            .max()
            .unwrap_or(0);
        ram.max(ov)
    }
}

impl Domain {
    /// `increase_reservation` / `decrease_reservation` / `populate_physmap`.
    /// `xen_memory_reservation`: native `{extent_start u64, nr_extents u64 @8, extent_order
    /// u32 @16, mem_flags u32 @20, domid u16 @24}`; compat `{u32, u32 @4, @8, @12, @16}`.
    /// Returns the extent reached (the start for malformed arguments).
    fn reservation(&self, ctx: &Ctx, op: u32, start: u64, arg: u64) -> u64 {
        let compat = ctx.g.is_compat();
        let mut b = [0u8; 32];
        let len = if compat { 20 } else { 32 };
        if ctx.g.read(arg, &mut b[..len]).is_err() {
            return start;
        }
        let (list, nr, order, flags, dom) = if compat {
            (
                u64::from(get_u32(&b, 0)),
                u64::from(get_u32(&b, 4)),
                get_u32(&b, 8),
                get_u32(&b, 12),
                get_u16(&b, 16),
            )
        } else {
            (
                get_u64(&b, 0),
                get_u64(&b, 8),
                get_u32(&b, 16),
                get_u32(&b, 20),
                get_u16(&b, 24),
            )
        };
        // "Is size too large for us to encode a continuation?"
        if nr > u64::from(u32::MAX >> xenmem::MEMOP_EXTENT_SHIFT) || start >= nr {
            return start;
        }
        // rcu_lock_domain_by_any_id + xsm_memory_adjust_reservation (XSM_TARGET).
        if self.target_self(dom).is_err() {
            return start;
        }
        // construct_memop_from_reservation: address bits within a page, or an exact node.
        let bits = xen_abi::consts::xenmemf_get_address_bits(flags);
        if bits != 0 && bits <= abi::PAGE_SHIFT {
            return start;
        }
        let node = xen_abi::consts::xenmemf_get_node(flags);
        if flags & MEMF_VNODE == 0 && node != 0xff && flags & MEMF_EXACT_NODE != 0 {
            return start;
        }
        if order > DOMU_MAX_ORDER {
            return start;
        }
        // Disallow populating PoD pages on oneself.
        if op == xenmem::POPULATE_PHYSMAP && flags & MEMF_POD != 0 {
            return start;
        }
        let end = nr.min(start.saturating_add(MAX_EXTENTS_PER_CALL));
        let pages = 1u64 << order;
        let mut i = start;
        while i < end {
            if op == xenmem::INCREASE_RESERVATION {
                // Pages for an HVM guest that nothing maps: only accounted.
                if self.tot_pages().saturating_add(pages) > self.max_pages() {
                    break;
                }
                self.balloon.lock().unmapped += pages;
                i += 1;
                continue;
            }
            let elem = if compat { 4 } else { 8 };
            let Ok(gfn) = ctx
                .g
                .elem_addr(list, i, elem)
                .and_then(|a| ctx.g.read(a, &mut b[..elem as usize]))
                .map(|()| {
                    if compat {
                        u64::from(get_u32(&b, 0))
                    } else {
                        get_u64(&b, 0)
                    }
                })
            else {
                break;
            };
            let ok = if op == xenmem::DECREASE_RESERVATION {
                self.give_back(gfn, pages)
            } else {
                self.populate(gfn, pages)
            };
            if !ok {
                break;
            }
            i += 1;
        }
        i
    }

    /// The frames of an extent, if it is aligned, inside the p2m, and all RAM.
    fn extent(&self, gfn: u64, pages: u64) -> Option<Vec<Gfn>> {
        if gfn % pages != 0 {
            return None;
        }
        let last = gfn.checked_add(pages - 1)?;
        Gfn::new(last)?;
        // One RAM entry of the memory map holds the whole extent.
        let (start, end) = (gfn << abi::PAGE_SHIFT, (last + 1) << abi::PAGE_SHIFT);
        self.ram_entries()
            .any(|e| start >= e.addr && end <= e.addr.saturating_add(e.size))
            .then(|| (gfn..=last).filter_map(Gfn::new).collect())
    }

    /// Unplace any overlay sitting on one of `gfns` (the domain forgets it, the VMM unmaps it).
    fn unplace_overlays_at(
        &self,
        map: &mut std::collections::BTreeMap<OverlayId, Gfn>,
        gfns: &[Gfn],
    ) {
        let hit: Vec<OverlayId> = map
            .iter()
            .filter(|(_, g)| gfns.binary_search(g).is_ok())
            .map(|(id, _)| *id)
            .collect();
        for id in hit {
            map.remove(&id);
            if let Err(e) = self.platform.unplace_overlay(id) {
                tracing::warn!(%e, ?id, "cannot unplace an overlay");
            }
        }
    }

    /// `guest_remove_page` for each frame of an extent: all must be present RAM.
    fn give_back(&self, gfn: u64, pages: u64) -> bool {
        let Some(frames) = self.extent(gfn, pages) else {
            return false;
        };
        let mut map = self.physmap.lock();
        let mut bal = self.balloon.lock();
        if frames.iter().any(|g| bal.out.contains(&g.get())) {
            return false;
        }
        self.unplace_overlays_at(&mut map, &frames);
        bal.out.extend(frames.iter().map(|g| g.get()));
        self.platform.release_pages(&frames);
        true
    }

    /// `populate_physmap` of one extent: fresh RAM at every frame, within `max_pages`.
    fn populate(&self, gfn: u64, pages: u64) -> bool {
        let Some(frames) = self.extent(gfn, pages) else {
            return false;
        };
        let mut map = self.physmap.lock();
        // The new pages are allocated (within max_pages) before any old ones at these frames
        // are freed, as alloc_domheap_pages runs before guest_physmap_add_page.
        if self.tot_pages().saturating_add(pages) > self.max_pages() {
            return false;
        }
        if self.platform.populate_pages(&frames).is_err() {
            return false;
        }
        self.unplace_overlays_at(&mut map, &frames);
        let mut bal = self.balloon.lock();
        for g in &frames {
            bal.out.remove(&g.get());
        }
        true
    }

    /// `XENMEM_remove_from_physmap` `{domid u16, gpfn xen_pfn_t @8 (compat: u32 @4)}`: an
    /// overlay there is unplaced (the RAM under it comes back); a present RAM frame is given
    /// back as by `decrease_reservation`; anything else is `-ENOENT`.
    fn remove_from_physmap(&self, ctx: &Ctx, arg: u64) -> Result<(), Errno> {
        let mut b = [0u8; 16];
        let gpfn = if ctx.g.is_compat() {
            ctx.g.read(arg, &mut b[..8])?;
            u64::from(get_u32(&b, 4))
        } else {
            ctx.g.read(arg, &mut b)?;
            get_u64(&b, 8)
        };
        self.target_self(get_u16(&b, 0))?;
        let gfn = Gfn::new(gpfn).ok_or(Errno::ENOENT)?;
        {
            let mut map = self.physmap.lock();
            if map.values().any(|g| *g == gfn) {
                self.unplace_overlays_at(&mut map, &[gfn]);
                return Ok(());
            }
        }
        if self.give_back(gpfn, 1) {
            Ok(())
        } else {
            Err(Errno::ENOENT)
        }
    }
}
