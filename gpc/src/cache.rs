//! The guest-physical cache: a guest range resolved once to a host mapping,
//! checked cheaply on every access and refreshed when the memory map changes.
//! See the crate docs for the protocol and lock order.

use std::cell::{Cell, UnsafeCell};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use event_listener::{Event, EventListener};
use parking_lot::Mutex;

use crate::map::{MapInner, MemoryMap, OverlayPage, Registered};
use crate::mem::{accessors, Raw};
use crate::{rcu, sys, Error, GuestAddress, Result, PAGE_SHIFT, PAGE_SIZE};

/// Most pages one cache maps (bounds guest-controlled allocations; one bit
/// per page in a guard's dirty mask).
pub const MAX_CACHE_PAGES: usize = 64;

/// Optimistic refresh attempts before resolving and installing under the
/// memory-map lock.
const OPTIMISTIC_TRIES: u32 = 4;

/// One piece of a cached range: `len` bytes of guest physical memory at `gpa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First guest physical address.
    pub gpa: GuestAddress,
    /// Length in bytes.
    pub len: usize,
}

impl Segment {
    /// A piece of `len` bytes at `gpa`.
    pub fn new(gpa: GuestAddress, len: usize) -> Segment {
        Segment { gpa, len }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A window: reserved address space filled with memfd pages. Unmapped on drop.
struct Window {
    base: *mut u8,
    len: usize,
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the window is owned by its cache; it is dropped only after
        // readers of it are gone (see `install`) or when it was never published.
        unsafe { sys::unmap(self.base, self.len) };
    }
}

/// Dirty bit of one page of a mapping: region index, word index, bit mask.
#[derive(Clone, Copy)]
struct DirtyBit {
    region: u32,
    word: u32,
    mask: u64,
}

/// What readers see. Written only under lock (2), while `valid` is false and
/// after a grace period (so no reader can be looking at it).
struct Fields {
    ptr: *mut u8,
    len: usize,
    dirty: Vec<DirtyBit>,
    generation: u64,
}

struct State {
    /// The active range, `None` when inactive.
    segments: Option<Vec<Segment>>,
    /// Bumped by every activate/deactivate.
    activation: u64,
    window: Option<Window>,
    pinned: bool,
    /// `fields` were published since the last grace period.
    published: bool,
}

pub(crate) struct CacheShared {
    id: u64,
    valid: AtomicBool,
    /// Generation of the installed mapping (informational).
    resolved_gen: AtomicU64,
    /// A range is active.
    active: AtomicBool,
    /// Lock (2) of the crate's lock order.
    state: Mutex<State>,
    fields: UnsafeCell<Fields>,
    invalidated: Event,
}

// SAFETY: `fields` is written only under `state`'s lock with `valid == false`
// after `rcu::synchronize()` (no reader can be inside a section that saw
// `valid == true`), and read only by readers that observed `valid == true`
// inside a read-side section; the raw pointers in it point to mappings owned
// by the cache (window) or the memory map (kept alive by `Cache::map`).
unsafe impl Sync for CacheShared {}
// SAFETY: see above; nothing in it is tied to a thread.
unsafe impl Send for CacheShared {}

impl CacheShared {
    /// Clears `valid` (caller holds no lock (2)); true if it was set.
    pub(crate) fn invalidate(&self) -> bool {
        let _st = self.state.lock();
        let was = self.valid.swap(false, Ordering::AcqRel);
        if was {
            self.invalidated.notify(usize::MAX);
        }
        was
    }
}

/// A cached guest range. Shareable between threads (`&Cache` is enough for
/// every operation); see [`Cache::access`] for the usual pattern.
pub struct Cache {
    shared: Arc<CacheShared>,
    map: MemoryMap,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("id", &self.shared.id)
            .field("active", &self.shared.active.load(Ordering::Relaxed))
            .field("valid", &self.shared.valid.load(Ordering::Relaxed))
            .finish()
    }
}

impl Cache {
    /// An inactive cache over `map`.
    pub fn new(map: &MemoryMap) -> Cache {
        Cache {
            shared: Arc::new(CacheShared {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                valid: AtomicBool::new(false),
                resolved_gen: AtomicU64::new(0),
                active: AtomicBool::new(false),
                state: Mutex::new(State {
                    segments: None,
                    activation: 0,
                    window: None,
                    pinned: false,
                    published: false,
                }),
                fields: UnsafeCell::new(Fields {
                    ptr: std::ptr::null_mut(),
                    len: 0,
                    dirty: Vec::new(),
                    generation: 0,
                }),
                invalidated: Event::new(),
            }),
            map: map.clone(),
        }
    }

    /// The memory map this cache resolves against.
    pub fn memory_map(&self) -> &MemoryMap {
        &self.map
    }

    /// Caches one contiguous guest range (see [`activate`](Self::activate)).
    pub fn activate_range(&self, gpa: GuestAddress, len: usize) -> Result<()> {
        self.activate(&[Segment::new(gpa, len)])
    }

    /// Caches the concatenation of `segments` as one contiguous range and
    /// resolves it. Inner boundaries between pieces must be page boundaries
    /// (true for the pages of a guest-virtual range). Replaces a previous
    /// range. Fails (and leaves the cache inactive) when a piece is not RAM.
    pub fn activate(&self, segments: &[Segment]) -> Result<()> {
        if rcu::in_read_side() {
            return Err(Error::GuardHeld);
        }
        validate(segments)?;
        {
            let mut st = self.shared.state.lock();
            st.segments = Some(segments.to_vec());
            self.shared.active.store(true, Ordering::Release);
            st.activation = st.activation.wrapping_add(1);
            st.pinned = false;
            self.shared.valid.store(false, Ordering::Release);
        }
        let r = self.refresh();
        if r.is_err() {
            let _ = self.deactivate();
        }
        r
    }

    /// Drops the range and its mapping; later `check`s fail.
    pub fn deactivate(&self) -> Result<()> {
        if rcu::in_read_side() {
            return Err(Error::GuardHeld);
        }
        let old = {
            let mut st = self.shared.state.lock();
            st.segments = None;
            self.shared.active.store(false, Ordering::Release);
            st.activation = st.activation.wrapping_add(1);
            self.shared.valid.store(false, Ordering::Release);
            if st.published {
                rcu::synchronize();
                st.published = false;
            }
            st.window.take()
        };
        drop(old);
        let mut ms = self.map.inner.state.lock();
        ms.caches.retain(|r| r.id != self.shared.id);
        Ok(())
    }

    /// True if a range is active (valid or not).
    pub fn is_active(&self) -> bool {
        self.shared.active.load(Ordering::Acquire)
    }

    /// The cheap test: is the mapping still valid for the current memory map?
    #[inline]
    pub fn check(&self) -> bool {
        self.guard().is_some()
    }

    /// Opens a guard if the cache is valid (the fast path: no lock, no
    /// read-modify-write). `None` means: call [`refresh`](Self::refresh).
    #[inline]
    pub fn guard(&self) -> Option<Guard<'_>> {
        rcu::enter();
        if self.shared.valid.load(Ordering::Acquire) {
            // SAFETY: `valid` was observed true inside a read-side section, so
            // `fields` is not written until this section ends (see CacheShared).
            let f = unsafe { &*self.shared.fields.get() };
            Some(Guard {
                raw: Raw {
                    ptr: f.ptr,
                    len: f.len,
                },
                cache: self,
                written: Cell::new(0),
                _not_send: PhantomData,
            })
        } else {
            rcu::exit();
            None
        }
    }

    /// `guard()`, refreshing as needed (the usual way in). Fails if the range
    /// cannot be mapped any more (e.g. inactive), or if the map keeps changing
    /// for 16 attempts in a row.
    pub fn access(&self) -> Result<Guard<'_>> {
        for _ in 0..16 {
            if let Some(g) = self.guard() {
                return Ok(g);
            }
            self.refresh()?;
        }
        Err(Error::Inactive)
    }

    /// Keeps the mapping locked in RAM from now on (a private window is used so
    /// other users of the pages are unaffected), so accesses never fault.
    pub fn pin(&self) -> Result<()> {
        if rcu::in_read_side() {
            return Err(Error::GuardHeld);
        }
        {
            let mut st = self.shared.state.lock();
            if st.segments.is_none() {
                return Err(Error::Inactive);
            }
            if st.pinned {
                return Ok(());
            }
            st.pinned = true;
            self.shared.valid.store(false, Ordering::Release);
        }
        self.refresh()
    }

    /// The memory-map generation the current mapping was resolved at.
    pub fn generation(&self) -> Option<u64> {
        self.shared
            .valid
            .load(Ordering::Acquire)
            .then(|| self.shared.resolved_gen.load(Ordering::Relaxed))
    }

    /// A listener fired when a memory-map change invalidates this cache.
    pub fn listen_invalidated(&self) -> EventListener {
        self.shared.invalidated.listen()
    }

    /// Re-resolves the range against the current memory map (after pfncache's
    /// `kvm_gpc_refresh`): resolve under the map lock, build the mapping
    /// outside it, install it if the generation did not move, else retry.
    /// After a few lost races everything happens under the map lock, which
    /// cannot lose. Returns at once if the cache is already valid.
    pub fn refresh(&self) -> Result<()> {
        if rcu::in_read_side() {
            return Err(Error::GuardHeld);
        }
        let map: &MapInner = &self.map.inner;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let (segments, activation, pinned) = {
                let st = self.shared.state.lock();
                if self.shared.valid.load(Ordering::Acquire) {
                    return Ok(());
                }
                match &st.segments {
                    Some(s) => (s.clone(), st.activation, st.pinned),
                    None => return Err(Error::Inactive),
                }
            };
            let mut ms = Some(map.state.lock());
            let (generation, plan, dirty, len) = {
                let m = ms.as_mut().expect("map lock just taken");
                let generation = map.generation.load(Ordering::Acquire);
                register(&mut m.caches, &self.shared, &segments);
                let (plan, dirty, len) = resolve(map, &m.overlays, &segments, pinned)?;
                (generation, plan, dirty, len)
            };
            if tries <= OPTIMISTIC_TRIES {
                // Optimistic: the slow mmaps happen without the map lock.
                ms = None;
            }
            let built = build(plan, pinned)?;
            let mut st = self.shared.state.lock();
            if st.activation != activation {
                if st.segments.is_none() {
                    return Err(Error::Inactive);
                }
                continue;
            }
            if map.generation.load(Ordering::Acquire) != generation {
                continue;
            }
            if self.shared.valid.load(Ordering::Acquire) {
                return Ok(());
            }
            if st.published {
                rcu::synchronize();
            }
            // SAFETY: we hold lock (2), `valid` is false, and a grace period
            // has passed since it became false (or nothing was published since
            // the last one): no reader is looking at `fields`.
            let f = unsafe { &mut *self.shared.fields.get() };
            f.ptr = built.ptr;
            f.len = len;
            f.dirty = dirty;
            f.generation = generation;
            self.shared
                .resolved_gen
                .store(generation, Ordering::Relaxed);
            let old = std::mem::replace(&mut st.window, built.window);
            st.published = true;
            self.shared.valid.store(true, Ordering::Release);
            drop(st);
            drop(ms);
            // No reader can use the old window: the grace period above ended
            // every section that saw it.
            drop(old);
            return Ok(());
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if !rcu::in_read_side() {
            let _ = self.deactivate();
        } else {
            // Cannot wait for ourselves; the registry entry is a Weak and the
            // window is unmapped when the last Arc goes (no guard of this
            // cache can exist: guards borrow it).
            self.shared.valid.store(false, Ordering::Release);
        }
    }
}

fn validate(segments: &[Segment]) -> Result<()> {
    let bad = Error::BadLength {
        max_pages: MAX_CACHE_PAGES,
    };
    if segments.is_empty() || segments.len() > MAX_CACHE_PAGES {
        return Err(bad);
    }
    let mut pages = 0usize;
    let last = segments.len() - 1;
    for (i, s) in segments.iter().enumerate() {
        if s.len == 0 {
            return Err(bad);
        }
        let end = s.gpa.0.checked_add(s.len as u64).ok_or(Error::BadLength {
            max_pages: MAX_CACHE_PAGES,
        })?;
        if (i < last && end % PAGE_SIZE as u64 != 0) || (i > 0 && s.gpa.0 % PAGE_SIZE as u64 != 0) {
            return Err(Error::UnalignedPiece { index: i });
        }
        let span = ((end - 1) >> PAGE_SHIFT) - (s.gpa.0 >> PAGE_SHIFT) + 1;
        pages = pages.saturating_add(usize::try_from(span).unwrap_or(usize::MAX));
        if pages > MAX_CACHE_PAGES {
            return Err(Error::BadLength {
                max_pages: MAX_CACHE_PAGES,
            });
        }
    }
    Ok(())
}

/// Records (or updates) the frames a cache covers in the map's registry.
fn register(caches: &mut Vec<Registered>, shared: &Arc<CacheShared>, segments: &[Segment]) {
    let frames: Vec<(u64, u64)> = segments
        .iter()
        .map(|s| {
            (
                s.gpa.0 >> PAGE_SHIFT,
                (s.gpa.0 + s.len as u64 - 1) >> PAGE_SHIFT,
            )
        })
        .collect();
    caches.retain(|r| r.cache.strong_count() > 0);
    match caches.iter_mut().find(|r| r.id == shared.id) {
        Some(r) => r.frames = frames,
        None => caches.push(Registered {
            id: shared.id,
            frames,
            cache: Arc::downgrade(shared),
        }),
    }
}

enum Backing<'a> {
    Ram(&'a std::fs::File),
    Overlay(OverlayPage),
}

impl Backing<'_> {
    fn file(&self) -> &std::fs::File {
        match self {
            Backing::Ram(f) => f,
            Backing::Overlay(p) => p.file(),
        }
    }
}

/// A planned piece of a window: `pages` pages of a memfd at `offset`.
struct Run<'a> {
    backing: Backing<'a>,
    offset: u64,
    pages: usize,
}

enum Plan<'a> {
    Direct(*mut u8),
    Window {
        runs: Vec<Run<'a>>,
        first_offset: usize,
    },
}

struct Built {
    ptr: *mut u8,
    window: Option<Window>,
}

/// Resolves validated segments to a plan, the dirty bits of each page, and
/// the total length. Caller holds lock (1).
fn resolve<'a>(
    map: &'a MapInner,
    overlays: &std::collections::BTreeMap<u64, OverlayPage>,
    segments: &[Segment],
    pinned: bool,
) -> Result<(Plan<'a>, Vec<DirtyBit>, usize)> {
    let mut dirty = Vec::new();
    let mut runs: Vec<Run<'a>> = Vec::new();
    let mut regions_seen: Option<usize> = None;
    let mut one_region = true;
    let mut len = 0usize;
    for s in segments {
        len += s.len;
        let first = s.gpa.0 >> PAGE_SHIFT;
        let last = (s.gpa.0 + s.len as u64 - 1) >> PAGE_SHIFT;
        for gfn in first..=last {
            let page_gpa = gfn << PAGE_SHIFT;
            let ri = map.region_index(page_gpa).ok_or(Error::NotMemfdBacked {
                gpa: page_gpa.max(s.gpa.0),
            })?;
            let r = &map.regions[ri];
            if regions_seen.is_some_and(|x| x != ri) {
                one_region = false;
            }
            regions_seen = Some(ri);
            let p = (page_gpa - r.base) >> PAGE_SHIFT;
            dirty.push(DirtyBit {
                region: ri as u32,
                word: (p / 64) as u32,
                mask: 1 << (p % 64),
            });
            match overlays.get(&gfn) {
                Some(o) => runs.push(Run {
                    backing: Backing::Overlay(o.clone()),
                    offset: o.offset(),
                    pages: 1,
                }),
                None => {
                    let off = page_gpa - r.base;
                    if let Some(prev) = runs.last_mut() {
                        if let Backing::Ram(f) = prev.backing {
                            if std::ptr::eq(f, &*r.file)
                                && prev.offset + (prev.pages << PAGE_SHIFT) as u64 == off
                            {
                                prev.pages += 1;
                                continue;
                            }
                        }
                    }
                    runs.push(Run {
                        backing: Backing::Ram(&r.file),
                        offset: off,
                        pages: 1,
                    });
                }
            }
        }
    }
    let first_gpa = segments[0].gpa.0;
    if segments.len() == 1 && one_region && !pinned {
        let ri = regions_seen.expect("a segment has at least one page");
        let r = &map.regions[ri];
        return Ok((
            Plan::Direct((r.host + (first_gpa - r.base) as usize) as *mut u8),
            dirty,
            len,
        ));
    }
    Ok((
        Plan::Window {
            runs,
            first_offset: (first_gpa as usize) & (PAGE_SIZE - 1),
        },
        dirty,
        len,
    ))
}

/// Makes the host mapping for a plan (the slow part: mmaps).
fn build(plan: Plan<'_>, pinned: bool) -> Result<Built> {
    match plan {
        Plan::Direct(ptr) => Ok(Built { ptr, window: None }),
        Plan::Window { runs, first_offset } => {
            let pages: usize = runs.iter().map(|r| r.pages).sum();
            let len = pages << PAGE_SHIFT;
            let base = sys::reserve(len).map_err(Error::os("mmap reserving a cache window"))?;
            let window = Window { base, len };
            let mut at = 0usize;
            for r in &runs {
                let bytes = r.pages << PAGE_SHIFT;
                // SAFETY: `base+at..base+at+bytes` lies inside the window we
                // just reserved and own; nothing else uses it yet.
                unsafe { sys::map_fixed(base.add(at), r.backing.file(), r.offset, bytes) }
                    .map_err(Error::os("mmap of guest memory into a cache window"))?;
                at += bytes;
            }
            if pinned {
                sys::mlock(base, len).map_err(Error::os("mlock of a pinned cache window"))?;
            }
            // SAFETY: first_offset < PAGE_SIZE <= len.
            let ptr = unsafe { base.add(first_offset) };
            Ok(Built {
                ptr,
                window: Some(window),
            })
        }
    }
}

/// Access to a valid cache: a read-side section (no lock taken). Writes mark
/// the frames dirty when the guard is dropped (after the data is written).
/// Not `Send`; never hold one across `KVM_RUN` or a blocking wait.
pub struct Guard<'a> {
    raw: Raw,
    cache: &'a Cache,
    /// Pages of the mapping written through this guard (bit i = page i).
    written: Cell<u64>,
    _not_send: PhantomData<*const ()>,
}

impl Guard<'_> {
    #[inline(always)]
    fn raw(&self) -> Raw {
        self.raw
    }

    #[inline(always)]
    fn wrote(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        // In bounds (checked by the accessor), so last < MAX_CACHE_PAGES <= 64.
        let start = (self.raw.ptr as usize & (PAGE_SIZE - 1)) + offset;
        let first = start >> PAGE_SHIFT;
        let last = (start + len - 1) >> PAGE_SHIFT;
        let m = if len <= PAGE_SIZE {
            // At most two pages: the cheap common case (word stores).
            (1u64 << first) | (1u64 << last)
        } else {
            (u64::MAX >> (63 - last)) & (u64::MAX << first)
        };
        self.written.set(self.written.get() | m);
    }

    accessors!();
}

impl Drop for Guard<'_> {
    #[inline]
    fn drop(&mut self) {
        let mut m = self.written.get();
        if m != 0 {
            // SAFETY: still inside the read-side section that saw `valid`.
            let f = unsafe { &*self.cache.shared.fields.get() };
            let regions = &self.cache.map.inner.regions;
            while m != 0 {
                let i = m.trailing_zeros() as usize;
                m &= m - 1;
                if let Some(d) = f.dirty.get(i) {
                    let w = &regions[d.region as usize].dirty[d.word as usize];
                    // Test first: the common case (already dirty) stays a load.
                    // take_dirty's grace period makes a stale "already set" safe.
                    if w.load(Ordering::Relaxed) & d.mask == 0 {
                        w.fetch_or(d.mask, Ordering::Relaxed);
                    }
                }
            }
        }
        rcu::exit();
    }
}
