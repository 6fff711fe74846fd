//! gpc: guest RAM, its memory map, and a guest-physical cache.
//!
//! Three pieces, none of which knows anything about Xen:
//!
//! - [`MemoryMap`] owns guest RAM: one memfd per RAM region, mapped
//!   `MAP_SHARED` once (the VMM registers these host ranges as KVM memslots
//!   and never changes them) and also offered as a `vm_memory::GuestMemoryMmap`
//!   for loaders and `Bytes` accesses. Pages the ABI places at a guest-chosen
//!   frame (shared_info, grant frames) are [`OverlayPage`]s mapped over the RAM
//!   page's host address with `MAP_FIXED`, so KVM's MMU notifier drops one
//!   translation instead of a memslot split zapping the MMU. Every change
//!   (overlay placed/removed, balloon) bumps a generation and invalidates the
//!   caches covering the changed frames.
//! - [`Cache`], after Linux's `virt/kvm/pfncache.c`: `activate` a guest
//!   physical range (one range, or several pieces such as the two frames of a
//!   guest-virtual area straddling a page), `check`, `refresh`, `deactivate`.
//!   A range inside one RAM region uses the region's host mapping directly; a
//!   range that crosses regions or is made of pieces is mapped again,
//!   contiguously, into a reserved window (each page mapped from its memfd,
//!   RAM or overlay), so the user always sees one contiguous range.
//! - [`Guard`] and [`OverlayPage`] accessors: bounds-checked volatile copies and
//!   atomics with explicit `Ordering`; no Rust reference to guest memory leaves
//!   the crate. Writes through a guard mark the frames dirty in the map's own
//!   bitmap ([`MemoryMap::take_dirty`]) because KVM's dirty log does not see
//!   userspace writes.
//!
//! # Concurrency protocol and lock order
//!
//! Locks, outermost first:
//! 1. `MemoryMap` state mutex (overlay table, cache registry). Held by every
//!    map change and by a cache's resolve step.
//! 2. A cache's state mutex (its range, window, activation count). Held while
//!    a cache installs a new mapping and while a map change invalidates it.
//!
//! Readers take no lock: a guard is a read-side section of the asymmetric
//! reader protocol in `rcu.rs` (a per-thread flag; the writer side uses
//! `membarrier`), because an uncontended `parking_lot` read lock costs ~16 ns
//! here, ten times the runstate publish itself. `check()`/`guard()` is: enter
//! the section, load the cache's `valid` flag.
//!
//! A map change: lock (1); bump the generation; for each registered cache whose
//! frames intersect the change: lock (2), clear `valid`, unlock, notify its
//! listeners; then wait until every read-side section that may have seen
//! `valid == true` has ended (`synchronize`); only then replace the pages
//! (`mmap MAP_FIXED`, hole punch). So a write through a cache either completes
//! before the page changes or finds the cache invalid and must refresh; no
//! write ever lands in a page that has gone away.
//!
//! A refresh (after pfncache's `kvm_gpc_refresh`): under (2) read the range;
//! under (1) register the range and resolve it to memfd pieces, noting the
//! generation; outside both build the window (the slow `mmap`s); under (2)
//! install it only if the generation is unchanged, otherwise throw it away and
//! retry. After a few lost races the resolve, build and install happen under
//! (1), which cannot lose, so a guest that keeps moving overlays cannot starve
//! a refresh. Installing waits for readers of the old mapping first (they may
//! still hold a guard from before the invalidation), then unmaps it.
//!
//! A thread holding a guard must not refresh, (de)activate, change the map or
//! take the dirty log: it would wait for itself; these return
//! [`Error::GuardHeld`]. Guards are `!Send` and must not be held across
//! `KVM_RUN` or a blocking wait (they would stall map changes).

mod cache;
mod fileio;
mod map;
mod mem;
mod rcu;
mod streamio;
mod sys;
mod uring;

pub use cache::{Cache, Guard, Segment, MAX_CACHE_PAGES};
pub use fileio::MAX_IO_PIECES;
pub use map::{GuestMem, HostBuffer, MemoryMap, OverlayPage, RamRegion};
pub use streamio::IoPart;
pub use sys::{PAGE_SHIFT, PAGE_SIZE};
pub use uring::FileRing;
pub use vm_memory::GuestAddress;

use std::io;

/// A guest frame number (guest physical address >> 12).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gfn(pub u64);

impl Gfn {
    /// The frame containing `gpa`.
    pub fn of(gpa: GuestAddress) -> Gfn {
        Gfn(gpa.0 >> PAGE_SHIFT)
    }

    /// The frame's first guest physical address, or `None` on overflow.
    pub fn gpa(self) -> Option<GuestAddress> {
        self.0.checked_mul(PAGE_SIZE as u64).map(GuestAddress)
    }
}

/// Errors of the memory map and the cache.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A RAM region given to [`MemoryMap::new`] is unusable.
    #[error("RAM region {index} (base {base:#x}, size {size:#x}) is invalid: {why}")]
    BadRegion {
        /// Position in the list given.
        index: usize,
        /// Guest physical base.
        base: u64,
        /// Size in bytes.
        size: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// Part of a range is not guest RAM (no memfd to map), so it cannot be cached.
    #[error(
        "guest physical address {gpa:#x} is not RAM backed by a memfd; the cache refuses to map it"
    )]
    NotMemfdBacked {
        /// First unbacked address.
        gpa: u64,
    },
    /// Empty range, arithmetic overflow, or more pages than a cache maps.
    #[error("guest range is empty, overflows or spans more than {max_pages} pages")]
    BadLength {
        /// Maximum number of pages per cache.
        max_pages: usize,
    },
    /// A multi-piece range whose inner boundaries are not page boundaries
    /// cannot be one contiguous mapping.
    #[error(
        "piece {index} of a multi-piece range must end (and the next start) on a page boundary"
    )]
    UnalignedPiece {
        /// Index of the offending piece.
        index: usize,
    },
    /// An access outside the cached range.
    #[error("access of {size} bytes at offset {offset} is outside the {len}-byte range")]
    OutOfBounds {
        /// Offset asked for.
        offset: usize,
        /// Access size.
        size: usize,
        /// Length of the range.
        len: usize,
    },
    /// An atomic access that is not naturally aligned.
    #[error("atomic access at offset {offset} is not {align}-byte aligned")]
    Misaligned {
        /// Offset asked for.
        offset: usize,
        /// Required alignment.
        align: usize,
    },
    /// The cache has no active range.
    #[error("the cache is not active")]
    Inactive,
    /// The calling thread holds a guard and would wait for itself.
    #[error("the calling thread holds a cache guard; drop it before refreshing, activating or changing the memory map")]
    GuardHeld,
    /// An overlay already occupies the frame.
    #[error("frame {0:#x} already has an overlay; remove it first")]
    OverlayExists(u64),
    /// No overlay at the frame.
    #[error("frame {0:#x} has no overlay")]
    NoOverlay(u64),
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// vm-memory refused a region.
    #[error("vm-memory: {0}")]
    VmMemory(String),
}

impl Error {
    pub(crate) fn os(op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Os { op, source }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
