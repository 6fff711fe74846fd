//! The read side of the cache: an asymmetric, per-thread reader flag (the
//! "memb" flavour of userspace RCU).
//!
//! Why not a `parking_lot` read lock per access: on the project's machines an
//! uncontended `RwLock::read()` + unlock costs ~16 ns (two locked
//! read-modify-writes) while the whole runstate publish into a plain buffer
//! costs ~1.5 ns, so a lock per access cannot meet the "within 2x the raw
//! floor" target. Here a reader only does plain stores to its own
//! thread-local slot; the rare writer (a memory-map change, a cache refresh)
//! pays instead: it issues `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` (a
//! full barrier on every CPU running one of our threads) and then waits until
//! every reader that was inside a read-side section has left it
//! ([`synchronize`]).
//!
//! Protocol (Dekker with the reader's fence moved to the writer):
//! - reader enter: `slot.seq += 1` (odd = inside); compiler fence (or a full
//!   fence if membarrier is unavailable); then load the cache's `valid` flag.
//! - reader exit: `slot.seq += 1` with Release.
//! - writer: store `valid = false`; [`synchronize`]: membarrier (or a full
//!   fence), then for every slot whose `seq` is odd, wait until it changes
//!   (Acquire).
//!
//! After `synchronize` returns, every reader either left its section (and its
//! accesses happen-before the writer's next step) or will observe
//! `valid == false`. Sections nest (a thread may hold several guards); only
//! the outermost enter/exit touch the slot. A thread that is inside a section
//! must not call [`synchronize`] (it would wait for itself): callers check
//! [`in_read_side`] and refuse with `Error::GuardHeld`.

use std::cell::Cell;
use std::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicU64, AtomicU8, Ordering};

use parking_lot::Mutex;

use crate::sys;

/// One reader slot, owned by one thread at a time; cache-line sized so
/// readers on different CPUs do not share a line.
#[repr(align(64))]
struct Slot {
    /// Odd while the owning thread is inside a read-side section.
    seq: AtomicU64,
    /// Owned by a live thread.
    in_use: AtomicBool,
}

/// All slots ever created (slots are leaked and recycled, bounded by the
/// peak number of threads that ever used a cache at once).
static SLOTS: Mutex<Vec<&'static Slot>> = parking_lot::const_mutex(Vec::new());

/// 0 = not decided yet, 1 = membarrier, 2 = full fences on the read side.
static MODE: AtomicU8 = AtomicU8::new(0);
const MODE_MEMBARRIER: u8 = 1;
const MODE_FENCE: u8 = 2;

struct Local {
    nest: Cell<u32>,
    slot: Cell<Option<&'static Slot>>,
}

thread_local! {
    static LOCAL: Local = const { Local { nest: Cell::new(0), slot: Cell::new(None) } };
    static RELEASE: SlotRelease = const { SlotRelease };
}

/// Frees this thread's slot when the thread exits.
struct SlotRelease;

impl Drop for SlotRelease {
    fn drop(&mut self) {
        let _ = LOCAL.try_with(|l| {
            if let Some(s) = l.slot.take() {
                // A leaked guard would leave the slot odd: close the section.
                let v = s.seq.load(Ordering::Relaxed);
                if v & 1 == 1 {
                    s.seq.store(v.wrapping_add(1), Ordering::Release);
                }
                s.in_use.store(false, Ordering::Release);
            }
        });
    }
}

#[cold]
fn register() -> &'static Slot {
    let mut slots = SLOTS.lock();
    if MODE.load(Ordering::Relaxed) == 0 {
        let m = if sys::membarrier_register() {
            MODE_MEMBARRIER
        } else {
            MODE_FENCE
        };
        MODE.store(m, Ordering::Relaxed);
    }
    let slot = match slots.iter().find(|s| {
        s.in_use
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }) {
        Some(s) => *s,
        None => {
            let s: &'static Slot = Box::leak(Box::new(Slot {
                seq: AtomicU64::new(0),
                in_use: AtomicBool::new(true),
            }));
            slots.push(s);
            s
        }
    };
    drop(slots);
    RELEASE.with(|_| {});
    LOCAL.with(|l| l.slot.set(Some(slot)));
    slot
}

/// Enters a read-side section (nestable).
#[inline]
pub(crate) fn enter() {
    LOCAL.with(|l| {
        let n = l.nest.get();
        l.nest.set(n + 1);
        if n == 0 {
            let slot = match l.slot.get() {
                Some(s) => s,
                None => register(),
            };
            let v = slot.seq.load(Ordering::Relaxed);
            slot.seq.store(v.wrapping_add(1), Ordering::Relaxed);
            if MODE.load(Ordering::Relaxed) == MODE_MEMBARRIER {
                compiler_fence(Ordering::SeqCst);
            } else {
                fence(Ordering::SeqCst);
            }
        }
    });
}

/// Leaves a read-side section.
#[inline]
pub(crate) fn exit() {
    LOCAL.with(|l| {
        let n = l.nest.get() - 1;
        l.nest.set(n);
        if n == 0 {
            if let Some(slot) = l.slot.get() {
                let v = slot.seq.load(Ordering::Relaxed);
                slot.seq.store(v.wrapping_add(1), Ordering::Release);
            }
        }
    });
}

/// True while the calling thread is inside a read-side section (holds a guard).
pub(crate) fn in_read_side() -> bool {
    LOCAL.with(|l| l.nest.get() != 0)
}

/// Waits until every read-side section that may have observed state from
/// before this call has ended. Must not be called from inside a section.
pub(crate) fn synchronize() {
    debug_assert!(!in_read_side());
    if MODE.load(Ordering::Relaxed) == MODE_MEMBARRIER {
        if !sys::membarrier() {
            // Cannot happen once registered; a full fence alone would not be
            // enough against compiler-fence readers, so fail loudly.
            panic!("membarrier(PRIVATE_EXPEDITED) failed after registration");
        }
    } else {
        fence(Ordering::SeqCst);
    }
    let slots: Vec<&'static Slot> = SLOTS.lock().clone();
    for s in slots {
        let v = s.seq.load(Ordering::Acquire);
        if v & 1 == 0 {
            continue;
        }
        let mut spins = 0u32;
        while s.seq.load(Ordering::Acquire) == v {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
    fence(Ordering::SeqCst);
}
