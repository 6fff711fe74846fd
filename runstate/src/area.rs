//! Publishing a vCPU's runstate into the guest's registered area, after
//! Linux's `kvm_xen_update_runstate_guest()`, through ONE gpc cache however
//! the area is split (page, region, or the two frames of a guest-virtual
//! area): the cache presents it as one contiguous range.
//!
//! With `VMASST_TYPE_runstate_update_flag` the guest reads the area like a
//! seqlock: publish sets `XEN_RUNSTATE_UPDATE` (bit 63) in
//! `state_entry_time`, release fence, writes the body, release fence, then
//! stores the final `state_entry_time` without the flag. The flag store and
//! the final store use the widest naturally aligned word that holds the top
//! byte of `state_entry_time`: the whole u64 (64-bit layout, 8-aligned), the
//! high 32-bit half (compat layout, where the u64 sits at offset 4; or a
//! 4-aligned 64-bit area), or the top byte alone (an area at any other
//! address, e.g. page end minus 15). Without the flag the body is written
//! first and `state_entry_time` last. Padding is written as zero; nothing
//! outside the area is touched.

use std::sync::atomic::{fence, AtomicU8, Ordering};

use gpc::{Cache, Guard, MemoryMap, OverlayPage, Segment};

use crate::layout::{Layout, XEN_RUNSTATE_UPDATE};
use crate::{Error, RunstateData};

/// Where `publish` can write: a cache guard, or (for baselines and tests) a
/// plain overlay page. Implemented by forwarding to gpc's accessors.
pub trait Sink {
    /// Natural alignment of `offset`.
    fn alignment(&self, offset: usize) -> usize;
    /// Volatile block store.
    fn write_array<const N: usize>(&self, offset: usize, data: &[u8; N]) -> Result<(), gpc::Error>;
    /// Atomic byte store.
    fn store_u8(&self, offset: usize, v: u8, order: Ordering) -> Result<(), gpc::Error>;
    /// Atomic 32-bit store.
    fn store_u32(&self, offset: usize, v: u32, order: Ordering) -> Result<(), gpc::Error>;
    /// Atomic 64-bit store.
    fn store_u64(&self, offset: usize, v: u64, order: Ordering) -> Result<(), gpc::Error>;
}

macro_rules! forward_sink {
    ($t:ty) => {
        impl Sink for $t {
            #[inline(always)]
            fn alignment(&self, offset: usize) -> usize {
                <$t>::alignment(self, offset)
            }
            #[inline(always)]
            fn write_array<const N: usize>(
                &self,
                offset: usize,
                data: &[u8; N],
            ) -> Result<(), gpc::Error> {
                <$t>::write_array(self, offset, data)
            }
            #[inline(always)]
            fn store_u8(&self, offset: usize, v: u8, order: Ordering) -> Result<(), gpc::Error> {
                <$t>::store_u8(self, offset, v, order)
            }
            #[inline(always)]
            fn store_u32(&self, offset: usize, v: u32, order: Ordering) -> Result<(), gpc::Error> {
                <$t>::store_u32(self, offset, v, order)
            }
            #[inline(always)]
            fn store_u64(&self, offset: usize, v: u64, order: Ordering) -> Result<(), gpc::Error> {
                <$t>::store_u64(self, offset, v, order)
            }
        }
    };
}

forward_sink!(Guard<'_>);
forward_sink!(OverlayPage);
forward_sink!(gpc::HostBuffer);

/// Stores the word holding the top byte of `state_entry_time` (see module docs).
#[inline(always)]
fn store_entry_top<S: Sink>(
    s: &S,
    base: usize,
    layout: Layout,
    entry: u64,
    order: Ordering,
) -> Result<(), gpc::Error> {
    let e = base + layout.entry_offset();
    if s.alignment(e) >= 8 {
        s.store_u64(e, entry, order)
    } else if s.alignment(e + 4) >= 4 {
        s.store_u32(e + 4, (entry >> 32) as u32, order)
    } else {
        s.store_u8(e + 7, (entry >> 56) as u8, order)
    }
}

/// Writes `data` in `layout` at `base` of `s`, following the update-flag
/// protocol if `update_flag`. The publishing path shared by the cache, the
/// tests and the benchmark floor.
#[inline(always)]
pub fn publish_to<S: Sink>(
    s: &S,
    base: usize,
    layout: Layout,
    data: &RunstateData,
    update_flag: bool,
) -> Result<(), Error> {
    let entry = data.state_entry_time & !XEN_RUNSTATE_UPDATE;
    match layout {
        Layout::Native64 if s.alignment(base) >= 8 => {
            // Aligned: word stores only (the same stores as the floor).
            let e = base + 8;
            if update_flag {
                s.store_u64(e, entry | XEN_RUNSTATE_UPDATE, Ordering::Relaxed)?;
                fence(Ordering::Release);
                s.store_u64(base, data.state.value().into(), Ordering::Relaxed)?;
                s.store_u64(e, entry | XEN_RUNSTATE_UPDATE, Ordering::Relaxed)?;
                for (i, t) in data.time.iter().enumerate() {
                    s.store_u64(base + 16 + 8 * i, *t, Ordering::Relaxed)?;
                }
                fence(Ordering::Release);
                s.store_u64(e, entry, Ordering::Relaxed)?;
            } else {
                for (i, t) in data.time.iter().enumerate() {
                    s.store_u64(base + 16 + 8 * i, *t, Ordering::Relaxed)?;
                }
                s.store_u64(base, data.state.value().into(), Ordering::Relaxed)?;
                fence(Ordering::Release);
                s.store_u64(e, entry, Ordering::Relaxed)?;
            }
        }
        Layout::Native64 => {
            let flag = if update_flag { XEN_RUNSTATE_UPDATE } else { 0 };
            publish_encoded(
                s,
                base,
                layout,
                &layout.encode64(data, entry | flag),
                entry,
                update_flag,
            )?;
        }
        Layout::Compat32 => {
            let flag = if update_flag { XEN_RUNSTATE_UPDATE } else { 0 };
            publish_encoded(
                s,
                base,
                layout,
                &layout.encode32(data, entry | flag),
                entry,
                update_flag,
            )?;
        }
    }
    Ok(())
}

/// No update flag: state and times first, `state_entry_time` last.
#[inline(always)]
/// Publishes an encoded area body (either layout). With the update flag:
/// entry time with XEN_RUNSTATE_UPDATE, release, body, release, entry time
/// without it; otherwise body first, then the entry time.
fn publish_encoded<S: Sink, const N: usize>(
    s: &S,
    base: usize,
    layout: Layout,
    body: &[u8; N],
    entry: u64,
    update_flag: bool,
) -> Result<(), Error> {
    if update_flag {
        store_entry_top(
            s,
            base,
            layout,
            entry | XEN_RUNSTATE_UPDATE,
            Ordering::Relaxed,
        )?;
        fence(Ordering::Release);
        s.write_array(base, body)?;
        fence(Ordering::Release);
        store_entry_top(s, base, layout, entry, Ordering::Relaxed)?;
        Ok(())
    } else {
        Ok(write_body_then_entry(s, base, layout, body, entry)?)
    }
}

fn write_body_then_entry<S: Sink, const N: usize>(
    s: &S,
    base: usize,
    layout: Layout,
    body: &[u8; N],
    entry: u64,
) -> Result<(), gpc::Error> {
    let e = layout.entry_offset();
    let t = layout.time_offset();
    let mut times = [0u8; 32];
    times.copy_from_slice(&body[t..t + 32]);
    s.write_array(base + t, &times)?;
    let mut head = [0u8; 4];
    head.copy_from_slice(&body[..4]);
    s.write_array(base, &head)?;
    if e == 8 {
        // Native: zero the padding too.
        s.write_array(base + 4, &[0u8; 4])?;
    }
    fence(Ordering::Release);
    if s.alignment(base + e) >= 8 {
        s.store_u64(base + e, entry, Ordering::Relaxed)
    } else {
        s.write_array(base + e, &entry.to_le_bytes())
    }
}

/// A vCPU's registered runstate area: one cache over the area's guest
/// memory (one or more pieces) and the layout it was registered with.
#[derive(Debug)]
pub struct RunstateArea {
    cache: Cache,
    layout: AtomicU8,
}

impl RunstateArea {
    /// An unregistered area over `map`.
    pub fn new(map: &MemoryMap) -> RunstateArea {
        RunstateArea {
            cache: Cache::new(map),
            layout: AtomicU8::new(0),
        }
    }

    /// Registers (or moves) the area: `segments` are its guest physical
    /// pieces in order (a guest-virtual area translated page by page; inner
    /// boundaries on page boundaries) and must add up to `layout.size()`.
    /// After this, writes go only to the new area. Publish once afterwards.
    pub fn register(&self, segments: &[Segment], layout: Layout) -> Result<(), Error> {
        let total = segments
            .iter()
            .try_fold(0usize, |a, s| a.checked_add(s.len));
        if total != Some(layout.size()) {
            return Err(Error::BadAreaSize {
                expected: layout.size(),
                got: total.unwrap_or(usize::MAX),
            });
        }
        self.layout.store(layout as u8, Ordering::Relaxed);
        self.cache.activate(segments)?;
        Ok(())
    }

    /// Stops writing to the area.
    pub fn unregister(&self) -> Result<(), Error> {
        self.cache.deactivate()?;
        Ok(())
    }

    /// True while an area is registered.
    pub fn is_registered(&self) -> bool {
        self.cache.is_active()
    }

    /// The layout the area was registered with.
    pub fn layout(&self) -> Layout {
        Layout::from_u8(self.layout.load(Ordering::Relaxed))
    }

    /// Locks the area's pages in RAM so publishing never faults.
    pub fn pin(&self) -> Result<(), Error> {
        self.cache.pin()?;
        Ok(())
    }

    /// The underlying cache (e.g. to listen for invalidations).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Writes `data` into the area (`update_flag`: the guest enabled
    /// `VMASST_TYPE_runstate_update_flag`). Refreshes the cache if the memory
    /// map changed. `Err(Error::Cache(gpc::Error::Inactive))` if no area is
    /// registered.
    #[inline]
    pub fn publish(&self, data: &RunstateData, update_flag: bool) -> Result<(), Error> {
        let g = match self.cache.guard() {
            Some(g) => g,
            None => self.cache.access()?,
        };
        publish_to(&g, 0, self.layout(), data, update_flag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::State;
    use std::cell::RefCell;

    /// A sink recording each operation, with a chosen virtual alignment.
    struct Rec {
        addr: usize,
        mem: RefCell<Vec<u8>>,
        ops: RefCell<Vec<(&'static str, usize, u64)>>,
    }

    impl Rec {
        fn new(addr: usize) -> Rec {
            Rec {
                addr,
                mem: RefCell::new(vec![0xCC; 64]),
                ops: RefCell::new(Vec::new()),
            }
        }
        fn put(&self, off: usize, b: &[u8]) {
            self.mem.borrow_mut()[off..off + b.len()].copy_from_slice(b);
        }
    }

    impl Sink for Rec {
        fn alignment(&self, offset: usize) -> usize {
            1 << (self.addr + offset).trailing_zeros().min(12)
        }
        fn write_array<const N: usize>(
            &self,
            offset: usize,
            data: &[u8; N],
        ) -> Result<(), gpc::Error> {
            self.ops.borrow_mut().push(("array", offset, N as u64));
            self.put(offset, data);
            Ok(())
        }
        fn store_u8(&self, offset: usize, v: u8, _: Ordering) -> Result<(), gpc::Error> {
            self.ops.borrow_mut().push(("u8", offset, v.into()));
            self.put(offset, &[v]);
            Ok(())
        }
        fn store_u32(&self, offset: usize, v: u32, _: Ordering) -> Result<(), gpc::Error> {
            assert_eq!((self.addr + offset) % 4, 0, "misaligned u32 store");
            self.ops.borrow_mut().push(("u32", offset, v.into()));
            self.put(offset, &v.to_le_bytes());
            Ok(())
        }
        fn store_u64(&self, offset: usize, v: u64, _: Ordering) -> Result<(), gpc::Error> {
            assert_eq!((self.addr + offset) % 8, 0, "misaligned u64 store");
            self.ops.borrow_mut().push(("u64", offset, v));
            self.put(offset, &v.to_le_bytes());
            Ok(())
        }
    }

    fn data() -> RunstateData {
        RunstateData {
            state: State::Runnable,
            state_entry_time: 0x0a0b_0c0d_0102_0304,
            time: [7, 0x0a0b_0c0d_0102_0304 - 7, 0, 0],
        }
    }

    const F: u64 = XEN_RUNSTATE_UPDATE;

    #[test]
    fn flag_protocol_native_aligned_sets_body_clears() {
        let r = Rec::new(0x1000);
        let d = data();
        publish_to(&r, 8, Layout::Native64, &d, true).unwrap();
        let m0 = r.mem.borrow().clone();
        let r4 = Rec::new(0x1004);
        publish_to(&r4, 8, Layout::Native64, &d, true).unwrap();
        let hi = d.state_entry_time >> 32;
        assert_eq!(
            *r4.ops.borrow(),
            vec![
                ("u32", 20, hi | (F >> 32)),
                ("array", 8, 48),
                ("u32", 20, hi)
            ]
        );
        assert_eq!(r4.mem.borrow()[8..56], m0[8..56]);
        let e = d.state_entry_time;
        let ops = r.ops.borrow();
        assert_eq!(ops.first(), Some(&("u64", 16, e | F)), "flag set first");
        assert_eq!(ops.last(), Some(&("u64", 16, e)), "flag cleared last");
        for op in &ops[1..ops.len() - 1] {
            assert!(
                op.1 >= 8 && op.1 + 8 <= 56,
                "store outside the area: {op:?}"
            );
            if op.1 == 16 {
                assert_eq!(
                    op.2,
                    e | F,
                    "entry time written without the flag mid-update"
                );
            }
        }
        let m = r.mem.borrow();
        assert_eq!(Layout::Native64.decode(&m[8..56]), Some(d));
        assert_eq!(
            (m[7], m[56]),
            (0xCC, 0xCC),
            "bytes around the area untouched"
        );
    }

    #[test]
    fn flag_protocol_compat_uses_high_half_at_8() {
        let r = Rec::new(0x1000);
        let d = data();
        publish_to(&r, 0, Layout::Compat32, &d, true).unwrap();
        let hi = d.state_entry_time >> 32;
        assert_eq!(
            *r.ops.borrow(),
            vec![("u32", 8, hi | (F >> 32)), ("array", 0, 44), ("u32", 8, hi)]
        );
        assert_eq!(Layout::Compat32.decode(&r.mem.borrow()[..44]), Some(d));
        assert_eq!(r.mem.borrow()[44], 0xCC);
    }

    #[test]
    fn flag_protocol_unaligned_uses_top_byte() {
        // Page end minus 15: odd address.
        let r = Rec::new(0x1ff1);
        let d = data();
        publish_to(&r, 0, Layout::Native64, &d, true).unwrap();
        let top = d.state_entry_time >> 56;
        assert_eq!(
            *r.ops.borrow(),
            vec![("u8", 15, top | 0x80), ("array", 0, 48), ("u8", 15, top)]
        );
        assert_eq!(Layout::Native64.decode(&r.mem.borrow()[..48]), Some(d));
    }

    #[test]
    fn no_flag_writes_entry_time_last() {
        let r = Rec::new(0x1000);
        let d = data();
        publish_to(&r, 0, Layout::Native64, &d, false).unwrap();
        let ops = r.ops.borrow();
        assert_eq!(ops.last(), Some(&("u64", 8, d.state_entry_time)));
        assert!(ops[..ops.len() - 1]
            .iter()
            .all(|(_, off, n)| *off + *n as usize <= 8 || *off >= 16));
        assert_eq!(Layout::Native64.decode(&r.mem.borrow()[..48]), Some(d));
    }
}
