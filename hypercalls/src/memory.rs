//! `memory_op` for an HVM domU: placing shared_info and grant frames
//! (`XENMEM_add_to_physmap`), the memory map, and the reservation queries.
//!
//! The command word carries a continuation extent in its upper bits (`MEMOP_EXTENT_SHIFT`);
//! the queries here reject a non-zero extent as Xen does. Balloon operations
//! (`increase/decrease_reservation`, `populate_physmap`) and `remove_from_physmap` are
//! issue 5's; until then they, like every other command, are `-ENOSYS`. `get_vnumainfo` is
//! `-EOPNOTSUPP` (no vNUMA topology), as Xen answers a domain without one.
//!
//! Deliberate difference: `XENMEM_maximum_ram_page` returns the guest's highest RAM frame + 1
//! instead of the host's `max_page`, so no host detail leaks.

use std::sync::Arc;

use crate::abi::{self, get_u16, get_u32, get_u64, put_u32, xenmem};
use crate::domain::{Ctx, Domain};
use crate::errno::Errno;
use crate::platform::{E820Entry, OverlayId};
use crate::shared::SharedPage;
use crate::types::Gfn;

/// More entries than any real memory map has; bounds the copy-out loop.
const MAX_E820_ENTRIES: usize = 128;

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
                    xenmem::CURRENT_RESERVATION => self.ram_pages(),
                    xenmem::MAXIMUM_RESERVATION => {
                        self.cfg.max_pages.unwrap_or_else(|| self.ram_pages())
                    }
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
            // TODO(issue 5): balloon (increase/decrease_reservation, populate_physmap),
            // remove_from_physmap.
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

    /// Pages of RAM in the memory map (`domain_tot_pages`).
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
