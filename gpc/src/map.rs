//! Guest RAM and its memory map: memfd-backed regions, overlays, balloon,
//! the generation counter and the dirty bitmap. See the crate docs for the
//! change protocol.

use std::collections::BTreeMap;
use std::fs::File;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use event_listener::{Event, EventListener};
use parking_lot::Mutex;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap};

use crate::cache::CacheShared;
use crate::mem::{accessors, Raw};
use crate::{rcu, sys, Error, Gfn, Result, PAGE_SHIFT, PAGE_SIZE};

/// Guest memory as vm-memory sees it (the same host mappings as the memory
/// map, so overlays are visible; vm-memory's own bitmap records `Bytes`
/// writes and is merged into [`MemoryMap::take_dirty`]).
pub type GuestMem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// What the VMM needs to register one KVM memslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest physical base.
    pub guest_base: GuestAddress,
    /// Size in bytes (page multiple).
    pub size: u64,
    /// Host virtual address of the region's mapping.
    pub host_addr: u64,
}

pub(crate) struct Region {
    pub(crate) base: u64,
    pub(crate) size: u64,
    /// Host address of the region's mapping (owned by vm-memory's region).
    pub(crate) host: usize,
    pub(crate) file: Arc<File>,
    /// One bit per page: written through a cache guard.
    pub(crate) dirty: Box<[AtomicU64]>,
}

impl Region {
    fn contains(&self, gpa: u64) -> bool {
        gpa >= self.base && gpa - self.base < self.size
    }
}

/// A cache's entry in the map's registry: the frames it covers.
pub(crate) struct Registered {
    pub(crate) id: u64,
    /// Inclusive frame ranges.
    pub(crate) frames: Vec<(u64, u64)>,
    pub(crate) cache: Weak<CacheShared>,
}

pub(crate) struct MapState {
    pub(crate) overlays: BTreeMap<u64, OverlayPage>,
    pub(crate) caches: Vec<Registered>,
}

pub(crate) struct MapInner {
    pub(crate) regions: Box<[Region]>,
    guest: GuestMem,
    pub(crate) generation: AtomicU64,
    /// Lock (1) of the crate's lock order.
    pub(crate) state: Mutex<MapState>,
    changed: Event,
}

/// Guest RAM and its memory map. Cheap to clone (a shared handle).
#[derive(Clone)]
pub struct MemoryMap {
    pub(crate) inner: Arc<MapInner>,
}

impl std::fmt::Debug for MemoryMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryMap")
            .field("regions", &self.ram_regions())
            .field("generation", &self.generation())
            .finish()
    }
}

impl MemoryMap {
    /// Creates guest RAM from `(guest base, size)` pairs: page-aligned,
    /// non-empty, non-overlapping (any order). Each region gets its own memfd.
    pub fn new(regions: &[(GuestAddress, u64)]) -> Result<MemoryMap> {
        let mut order: Vec<usize> = (0..regions.len()).collect();
        order.sort_by_key(|&i| regions[i].0 .0);
        if regions.is_empty() {
            return Err(Error::BadRegion {
                index: 0,
                base: 0,
                size: 0,
                why: "no RAM regions given",
            });
        }
        let mut built = Vec::with_capacity(regions.len());
        let mut vm_regions = Vec::with_capacity(regions.len());
        let mut prev_end = 0u64;
        for (n, &i) in order.iter().enumerate() {
            let (GuestAddress(base), size) = regions[i];
            let bad = |why| Error::BadRegion {
                index: i,
                base,
                size,
                why,
            };
            if size == 0 || base % PAGE_SIZE as u64 != 0 || size % PAGE_SIZE as u64 != 0 {
                return Err(bad(
                    "base and size must be non-zero multiples of the page size",
                ));
            }
            let end = base
                .checked_add(size)
                .ok_or_else(|| bad("base + size overflows"))?;
            if n > 0 && base < prev_end {
                return Err(bad("overlaps another region"));
            }
            prev_end = end;
            let len = usize::try_from(size).map_err(|_| bad("too large for this host"))?;
            let file = Arc::new(
                sys::memfd(c"xenkvm-ram", len).map_err(Error::os("memfd_create for guest RAM"))?,
            );
            let page = NonZeroUsize::new(PAGE_SIZE).expect("page size is non-zero");
            let mmap = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::new(len, page))
                .with_file_offset(FileOffset::from_arc(file.clone(), 0))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| Error::VmMemory(e.to_string()))?;
            let host = mmap.as_ptr() as usize;
            let gr = GuestRegionMmap::new(mmap, GuestAddress(base))
                .ok_or_else(|| bad("rejected by vm-memory"))?;
            let pages = (size >> PAGE_SHIFT) as usize;
            built.push(Region {
                base,
                size,
                host,
                file,
                dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            });
            vm_regions.push(gr);
        }
        let guest =
            GuestMem::from_regions(vm_regions).map_err(|e| Error::VmMemory(e.to_string()))?;
        Ok(MemoryMap {
            inner: Arc::new(MapInner {
                regions: built.into_boxed_slice(),
                guest,
                generation: AtomicU64::new(1),
                state: Mutex::new(MapState {
                    overlays: BTreeMap::new(),
                    caches: Vec::new(),
                }),
                changed: Event::new(),
            }),
        })
    }

    /// The regions to register as KVM memslots (sorted by guest address).
    pub fn ram_regions(&self) -> Vec<RamRegion> {
        self.inner
            .regions
            .iter()
            .map(|r| RamRegion {
                guest_base: GuestAddress(r.base),
                size: r.size,
                host_addr: r.host as u64,
            })
            .collect()
    }

    /// The memfd backing RAM region `index` (order of [`ram_regions`](Self::ram_regions)),
    /// for consumers that need the file itself (vhost-user, save/restore); it
    /// shows RAM pages, not overlays.
    pub fn ram_file(&self, index: usize) -> Option<&File> {
        self.inner.regions.get(index).map(|r| &*r.file)
    }

    /// Guest memory for vm-memory users (loaders, `Bytes`); same host pages.
    pub fn guest_memory(&self) -> &GuestMem {
        &self.inner.guest
    }

    /// The current generation; bumped by every change.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// A listener fired after the next memory-map change.
    pub fn listen(&self) -> EventListener {
        self.inner.changed.listen()
    }

    /// The overlay at `gfn`, if any (takes the map lock: not with a guard held).
    pub fn overlay_at(&self, gfn: Gfn) -> Result<Option<OverlayPage>> {
        if rcu::in_read_side() {
            return Err(Error::GuardHeld);
        }
        Ok(self.inner.state.lock().overlays.get(&gfn.0).cloned())
    }

    /// Maps `page` over the RAM page at `gfn` (the RAM page is kept underneath).
    /// The same page may be placed at several frames.
    pub fn place_overlay(&self, gfn: Gfn, page: &OverlayPage) -> Result<()> {
        self.place(gfn, page, false)
    }

    /// [`place_overlay`](Self::place_overlay), keeping what the guest had
    /// there: the RAM page's bytes are copied into the overlay page after
    /// every cache over it is invalid (no cache write is in flight, and a
    /// new one waits for the placement) and before the overlay replaces it.
    /// The guest's own writes through KVM are the caller's to keep out
    /// (every vCPU paused).
    pub fn place_overlay_copying(&self, gfn: Gfn, page: &OverlayPage) -> Result<()> {
        self.place(gfn, page, true)
    }

    fn place(&self, gfn: Gfn, page: &OverlayPage, copy: bool) -> Result<()> {
        if rcu::in_read_side() {
            return Err(Error::GuardHeld);
        }
        let mut st = self.inner.state.lock();
        let (host, _, _) = self.inner.locate(gfn)?;
        if st.overlays.contains_key(&gfn.0) {
            return Err(Error::OverlayExists(gfn.0));
        }
        self.inner.begin_change(&st, gfn.0, gfn.0);
        if copy {
            // SAFETY: whole pages: the RAM page of `gfn` (this map's) and the
            // overlay's own mapping, distinct mappings; no cache write is in
            // flight to either (see below).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    host as *const u8,
                    page.inner.host as *mut u8,
                    PAGE_SIZE,
                )
            };
        }
        // SAFETY: `host` is the page of `gfn` inside a region mapping this map
        // owns (kept alive by `self`); every cache covering it is invalid and
        // no read-side section started before the invalidation is still
        // running (begin_change), so no cache write is in flight to the old page.
        unsafe {
            sys::map_fixed(
                host as *mut u8,
                &page.inner.file,
                page.inner.offset,
                PAGE_SIZE,
            )
        }
        .map_err(Error::os("mmap of an overlay page over guest RAM"))?;
        st.overlays.insert(gfn.0, page.clone());
        drop(st);
        self.inner.changed.notify(usize::MAX);
        Ok(())
    }

    /// Maps the RAM page back at `gfn` and returns the overlay that was there.
    pub fn remove_overlay(&self, gfn: Gfn) -> Result<OverlayPage> {
        if rcu::in_read_side() {
            return Err(Error::GuardHeld);
        }
        let mut st = self.inner.state.lock();
        let (host, file, off) = self.inner.locate(gfn)?;
        if !st.overlays.contains_key(&gfn.0) {
            return Err(Error::NoOverlay(gfn.0));
        }
        self.inner.begin_change(&st, gfn.0, gfn.0);
        // SAFETY: as in `place_overlay`; this maps the region's own memfd page
        // back at its own place.
        unsafe { sys::map_fixed(host as *mut u8, file, off, PAGE_SIZE) }
            .map_err(Error::os("mmap of a RAM page back over an overlay"))?;
        let page = st.overlays.remove(&gfn.0).ok_or(Error::NoOverlay(gfn.0))?;
        drop(st);
        self.inner.changed.notify(usize::MAX);
        Ok(page)
    }

    /// Releases `count` RAM pages from `first` to the host (they read as zero
    /// afterwards and are allocated again when written). Overlays on those
    /// frames stay. All frames must be RAM.
    pub fn balloon_out(&self, first: Gfn, count: u64) -> Result<()> {
        if rcu::in_read_side() {
            return Err(Error::GuardHeld);
        }
        let last = first
            .0
            .checked_add(count)
            .and_then(|e| e.checked_sub(1))
            .filter(|_| count > 0)
            .ok_or(Error::BadLength {
                max_pages: usize::MAX,
            })?;
        // Check that every frame is RAM before changing anything.
        let mut pieces = Vec::new();
        let mut g = first.0;
        while g <= last {
            let gpa = g
                .checked_mul(PAGE_SIZE as u64)
                .ok_or(Error::NotMemfdBacked { gpa: u64::MAX })?;
            let r = self
                .inner
                .region_of(gpa)
                .ok_or(Error::NotMemfdBacked { gpa })?;
            let region_last = (r.base + r.size - 1) >> PAGE_SHIFT;
            let end = region_last.min(last);
            pieces.push((r, gpa - r.base, (end - g + 1) << PAGE_SHIFT));
            g = match end.checked_add(1) {
                Some(n) => n,
                None => break,
            };
        }
        let st = self.inner.state.lock();
        self.inner.begin_change(&st, first.0, last);
        for (r, off, len) in pieces {
            sys::punch_hole(&r.file, off, len)
                .map_err(Error::os("fallocate(PUNCH_HOLE) of ballooned RAM"))?;
        }
        drop(st);
        self.inner.changed.notify(usize::MAX);
        Ok(())
    }

    /// Frames written through cache guards or vm-memory `Bytes` since the last
    /// [`take_dirty`](Self::take_dirty), without clearing them.
    pub fn dirty_pages(&self) -> Vec<Gfn> {
        self.collect_dirty(false)
    }

    /// Frames written since the last call, clearing the log. When this
    /// returns, every write that the log does not show any more is visible to
    /// the caller (it waits for guards that were open), so copying the
    /// returned pages afterwards is safe for migration. Must not be called
    /// while holding a guard.
    pub fn take_dirty(&self) -> Result<Vec<Gfn>> {
        if rcu::in_read_side() {
            return Err(Error::GuardHeld);
        }
        let v = self.collect_dirty(true);
        rcu::synchronize();
        Ok(v)
    }

    fn collect_dirty(&self, clear: bool) -> Vec<Gfn> {
        let mut out = Vec::new();
        for (r, vr) in self.inner.regions.iter().zip(self.inner.guest.iter()) {
            let vm_words = if clear {
                std::ops::Deref::deref(vr).bitmap().get_and_reset()
            } else {
                Vec::new()
            };
            let first = r.base >> PAGE_SHIFT;
            let pages = r.size >> PAGE_SHIFT;
            for (w, word) in r.dirty.iter().enumerate() {
                let mut bits = if clear {
                    word.swap(0, Ordering::AcqRel)
                } else {
                    word.load(Ordering::Acquire)
                };
                bits |= vm_words.get(w).copied().unwrap_or(0);
                if !clear {
                    for b in 0..64u64 {
                        let p = w as u64 * 64 + b;
                        if p < pages && std::ops::Deref::deref(vr).bitmap().is_bit_set(p as usize) {
                            bits |= 1 << b;
                        }
                    }
                }
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let p = w as u64 * 64 + b;
                    if p < pages {
                        out.push(Gfn(first + p));
                    }
                }
            }
        }
        out
    }
}

impl MapInner {
    pub(crate) fn region_of(&self, gpa: u64) -> Option<&Region> {
        let i = self.regions.partition_point(|r| r.base <= gpa);
        let r = self.regions.get(i.checked_sub(1)?)?;
        r.contains(gpa).then_some(r)
    }

    pub(crate) fn region_index(&self, gpa: u64) -> Option<usize> {
        let i = self
            .regions
            .partition_point(|r| r.base <= gpa)
            .checked_sub(1)?;
        self.regions[i].contains(gpa).then_some(i)
    }

    /// Host address, memfd and file offset of the RAM page at `gfn`.
    fn locate(&self, gfn: Gfn) -> Result<(usize, &File, u64)> {
        let gpa = gfn.gpa().ok_or(Error::NotMemfdBacked { gpa: u64::MAX })?;
        let r = self
            .region_of(gpa.0)
            .ok_or(Error::NotMemfdBacked { gpa: gpa.0 })?;
        let off = gpa.0 - r.base;
        Ok((r.host + off as usize, &r.file, off))
    }

    /// Start of a change of frames `first..=last` (caller holds lock (1)):
    /// bump the generation, invalidate the covering caches, wait for readers.
    fn begin_change(&self, st: &MapState, first: u64, last: u64) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut any = false;
        for reg in &st.caches {
            if reg.frames.iter().any(|&(a, b)| a <= last && first <= b) {
                if let Some(c) = reg.cache.upgrade() {
                    any |= c.invalidate();
                }
            }
        }
        if any {
            rcu::synchronize();
        }
    }
}

struct OverlayInner {
    file: File,
    /// The page's offset in `file`.
    offset: u64,
    host: usize,
}

impl Drop for OverlayInner {
    fn drop(&mut self) {
        // SAFETY: `host` is this page's own mapping; the last handle is gone,
        // so nothing accesses it any more (placements hold their own mapping of
        // the memfd through the RAM region, unaffected by this munmap).
        unsafe { sys::unmap(self.host as *mut u8, PAGE_SIZE) };
    }
}

/// A VMM-owned page (its own memfd) that can be placed over a guest frame.
/// The VMM always reaches it through its own mapping with the accessors
/// below, wherever (and whether) it is placed. Clones share the page.
#[derive(Clone)]
pub struct OverlayPage {
    inner: Arc<OverlayInner>,
}

impl std::fmt::Debug for OverlayPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayPage")
            .field("host", &format_args!("{:#x}", self.inner.host))
            .finish()
    }
}

impl PartialEq for OverlayPage {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl OverlayPage {
    /// Allocates a zeroed page.
    pub fn new() -> Result<OverlayPage> {
        let file = sys::memfd(c"xenkvm-overlay", PAGE_SIZE)
            .map_err(Error::os("memfd_create for an overlay page"))?;
        let host = sys::map_shared(&file, 0, PAGE_SIZE)
            .map_err(Error::os("mmap of an overlay page"))? as usize;
        Ok(OverlayPage {
            inner: Arc::new(OverlayInner {
                file,
                offset: 0,
                host,
            }),
        })
    }

    /// The page at `offset` of `file`, which the caller shares with whoever
    /// else writes it (a BPF array map's page, say: any file whose pages
    /// `mmap(MAP_SHARED)` maps). Its content is the file's, not zeroed.
    pub fn from_file(file: File, offset: u64) -> Result<OverlayPage> {
        if offset % PAGE_SIZE as u64 != 0 {
            return Err(Error::os("an overlay page's offset")(
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let host = sys::map_shared(&file, offset, PAGE_SIZE)
            .map_err(Error::os("mmap of an overlay page"))? as usize;
        Ok(OverlayPage {
            inner: Arc::new(OverlayInner { file, offset, host }),
        })
    }

    pub(crate) fn offset(&self) -> u64 {
        self.inner.offset
    }

    pub(crate) fn file(&self) -> &File {
        &self.inner.file
    }

    /// Host address of the VMM's own mapping of the page (valid while any
    /// clone lives): what a KVM memslot needs to show the page to the guest
    /// at a frame that is not RAM.
    pub fn host_addr(&self) -> u64 {
        self.inner.host as u64
    }

    #[inline(always)]
    fn raw(&self) -> Raw {
        Raw {
            ptr: self.inner.host as *mut u8,
            len: PAGE_SIZE,
        }
    }

    #[inline(always)]
    fn wrote(&self, _offset: usize, _len: usize) {}

    accessors!();
}

/// Plain anonymous host memory (not guest memory) with the same accessors as
/// a guard: the baseline "plain buffer" for benchmarks and a scratch area for
/// tests of code written against the accessors.
pub struct HostBuffer {
    ptr: usize,
    len: usize,
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("len", &self.len)
            .finish()
    }
}

impl HostBuffer {
    /// A zeroed, page-aligned buffer of `len` bytes (rounded up to pages).
    pub fn new(len: usize) -> Result<HostBuffer> {
        let len = len.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let p = sys::anon(len).map_err(Error::os("mmap of a host buffer"))?;
        Ok(HostBuffer {
            ptr: p as usize,
            len,
        })
    }

    #[inline(always)]
    fn raw(&self) -> Raw {
        Raw {
            ptr: self.ptr as *mut u8,
            len: self.len,
        }
    }

    #[inline(always)]
    fn wrote(&self, _offset: usize, _len: usize) {}

    accessors!();
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: our own mapping; `&mut self` means no accessor is running.
        unsafe { sys::unmap(self.ptr as *mut u8, self.len) };
    }
}
