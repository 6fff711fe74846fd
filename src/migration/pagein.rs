//! How a live stream's page data reaches the staged guest RAM (issue 15):
//! through a small reused buffer, then `pwrite` into the RAM's memfd, with
//! the all-zero pages of frames that were never received left out.
//!
//! The staged RAM is a fresh memfd: a page never written reads as zeroes
//! and holds no host memory. Writing the stream's pages through the RAM
//! mapping (`readv` into it) allocated, cleared and mapped every page with
//! a page fault each, zero pages too, and most of a guest's pages are
//! usually zero (never touched: the source sends them as zeroes). Here:
//!
//! - a zero page of a frame not received before is not written at all
//!   (it stays a hole: it already reads as zeroes; the destination's RAM
//!   stays as sparse as the source's);
//! - any other page is written with `pwrite` at its offset in the memfd:
//!   the kernel allocates the page cache page and copies into it, without
//!   clearing it first and without mapping it into this process (KVM and
//!   the VMM map what they use later);
//! - a zero page of a frame received before (its older copy had data) is
//!   written, so the last copy wins as always.
//!
//! [`store_pages`] does this for both the live receiver ([`store`]) and a
//! restore from an image file ([`super::pagefile::PageLoader`]).

use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::GuestAddress;

use super::stream::libxc::PAGE_SIZE;

/// Whether `page` is all zeroes (64-byte blocks OR-ed together, which the
/// compiler vectorises; stops at the first non-zero block).
pub fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Writes `data` (whole pages) into `map`'s RAM at guest address `gpa`,
/// leaving out the all-zero pages whose frame `fresh(pfn)` says was never
/// written (see the module docs): [`store_pages`] for consecutive frames.
/// A page to write outside RAM is an error (the pages before it are
/// written).
pub fn store(
    map: &gpc::MemoryMap,
    gpa: GuestAddress,
    data: &[u8],
    fresh: &dyn Fn(u64) -> bool,
) -> io::Result<()> {
    if gpa.0 % PAGE_SIZE as u64 != 0 {
        return Err(io::Error::other("page data: not whole pages"));
    }
    let mut frames = FreshFrames(fresh);
    store_pages(
        map,
        &map.ram_regions(),
        Frames::From(gpa.0 / PAGE_SIZE as u64),
        data,
        &mut frames,
    )
    .map(|_| ())
}

/// The frames of the pages given to [`store_pages`], in order.
#[derive(Debug, Clone, Copy)]
pub enum Frames<'a> {
    /// Consecutive frames from this one.
    From(u64),
    /// One frame per page.
    Each(&'a [u64]),
}

impl Frames<'_> {
    /// The frame of page `i` (`None` past the end, or past the last frame).
    fn get(&self, i: usize) -> Option<u64> {
        match self {
            Frames::From(first) => first.checked_add(i as u64),
            Frames::Each(v) => v.get(i).copied(),
        }
    }
}

/// What [`store_pages`] needs to know, and tells, about frames.
pub trait FrameState {
    /// Whether an all-zero page of `pfn` may be left out: the RAM already
    /// reads zeroes there (a fresh memfd, and no earlier copy written).
    fn zero_is_free(&self, pfn: u64) -> bool;
    /// The `n` frames from `first` were written.
    fn written(&mut self, _first: u64, _n: u64) {}
}

/// [`FrameState`] from a "never written" predicate (the live receiver's:
/// it keeps the frames received itself).
struct FreshFrames<'a>(&'a dyn Fn(u64) -> bool);

impl FrameState for FreshFrames<'_> {
    fn zero_is_free(&self, pfn: u64) -> bool {
        (self.0)(pfn)
    }
}

/// What [`store_pages`] did, in pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stored {
    /// Written.
    pub written: u64,
    /// Left out (zero, and free per [`FrameState::zero_is_free`]).
    pub skipped: u64,
}

/// Writes `data` (whole pages, for `frames` in order) into the memfds of
/// `map`'s RAM (`regions`: [`gpc::MemoryMap::ram_regions`]) with `pwrite`:
/// consecutive frames of one region in one `pwrite`; an all-zero page
/// whose frame `state` says reads zeroes already is left out, without
/// looking where it is (see the module docs). A page to write outside RAM
/// is an error; the pages before it are written.
pub fn store_pages(
    map: &gpc::MemoryMap,
    regions: &[gpc::RamRegion],
    frames: Frames<'_>,
    data: &[u8],
    state: &mut dyn FrameState,
) -> io::Result<Stored> {
    let n = data.len() / PAGE_SIZE;
    let whole = data.len() % PAGE_SIZE == 0
        && match frames {
            Frames::From(f) => f.checked_add(n as u64).is_some(),
            Frames::Each(v) => v.len() == n,
        };
    if !whole {
        return Err(io::Error::other("page data: not whole pages"));
    }
    let page = |i: usize| &data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
    let pfn = |i: usize| frames.get(i).unwrap_or(u64::MAX);
    let left_out =
        |state: &dyn FrameState, i: usize| state.zero_is_free(pfn(i)) && is_zero(page(i));
    let mut done = Stored::default();
    let mut i = 0usize;
    while i < n {
        if left_out(&*state, i) {
            done.skipped += 1;
            i += 1;
            continue;
        }
        // A run of pages to write, inside one region.
        let first = pfn(i);
        let at = first
            .checked_mul(PAGE_SIZE as u64)
            .ok_or_else(|| outside(first))?;
        let (ri, r) = regions
            .iter()
            .enumerate()
            .find(|(_, r)| at >= r.guest_base.0 && at - r.guest_base.0 < r.size)
            .ok_or_else(|| outside(first))?;
        let off = at - r.guest_base.0;
        let mut j = i + 1;
        while j < n
            && pfn(j) == pfn(j - 1).wrapping_add(1)
            && off + page_bytes(j - i) < r.size
            && !left_out(&*state, j)
        {
            j += 1;
        }
        let file = map
            .ram_file(ri)
            .ok_or_else(|| io::Error::other("guest RAM without its memfd"))?;
        file.write_all_at(&data[i * PAGE_SIZE..j * PAGE_SIZE], off)?;
        state.written(first, (j - i) as u64);
        done.written += (j - i) as u64;
        i = j;
    }
    Ok(done)
}

/// Bytes of `n` pages.
fn page_bytes(n: usize) -> u64 {
    n as u64 * PAGE_SIZE as u64
}

/// A frame the guest's RAM does not have.
pub fn outside(pfn: u64) -> io::Error {
    io::Error::other(format!("pfn {pfn:#x} is outside the guest's RAM"))
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    fn map() -> gpc::MemoryMap {
        gpc::MemoryMap::new(&[
            (GuestAddress(0), 8 * PAGE_SIZE as u64),
            (GuestAddress(8 * PAGE_SIZE as u64), 4 * PAGE_SIZE as u64),
            (GuestAddress(32 * PAGE_SIZE as u64), 4 * PAGE_SIZE as u64),
        ])
        .unwrap()
    }

    fn ram(m: &gpc::MemoryMap, pfn: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n * PAGE_SIZE];
        m.guest_memory()
            .read_slice(&mut v, GuestAddress(pfn * PAGE_SIZE as u64))
            .unwrap();
        v
    }

    fn allocated(m: &gpc::MemoryMap, region: usize) -> u64 {
        // st_blocks: 512-byte units actually held.
        m.ram_file(region)
            .unwrap()
            .metadata()
            .map(|md| {
                use std::os::unix::fs::MetadataExt;
                md.blocks() * 512
            })
            .unwrap()
    }

    #[test]
    fn pagein_is_zero_sees_one_byte_anywhere() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        for at in [0, 63, 64, 2049, PAGE_SIZE - 1] {
            p[at] = 1;
            assert!(!is_zero(&p), "{at}");
            p[at] = 0;
        }
    }

    #[test]
    fn pagein_store_skips_fresh_zero_pages_and_writes_the_rest_across_regions() {
        let m = map();
        // Frames 6..10 span regions 0 and 1: data, zero, data, zero.
        let mut d = vec![0u8; 4 * PAGE_SIZE];
        d[..PAGE_SIZE].fill(0x11);
        d[2 * PAGE_SIZE..3 * PAGE_SIZE].fill(0x33);
        store(&m, GuestAddress(6 * PAGE_SIZE as u64), &d, &|_| true).unwrap();
        // Only the data pages hold memory (checked before reading through
        // the mapping, which allocates the holes it reads).
        assert_eq!(allocated(&m, 0), PAGE_SIZE as u64);
        assert_eq!(allocated(&m, 1), PAGE_SIZE as u64);
        assert_eq!(ram(&m, 6, 4), d);
        // A zero page for a frame that had data: written (last copy wins).
        store(
            &m,
            GuestAddress(6 * PAGE_SIZE as u64),
            &[0u8; PAGE_SIZE],
            &|p| p != 6,
        )
        .unwrap();
        assert_eq!(ram(&m, 6, 1), vec![0u8; PAGE_SIZE]);
        // Not RAM: an error, not a panic.
        assert!(store(
            &m,
            GuestAddress(12 * PAGE_SIZE as u64),
            &d[..PAGE_SIZE],
            &|_| true
        )
        .is_err());
        assert!(store(&m, GuestAddress(6 * PAGE_SIZE as u64), &d[..100], &|_| true).is_err());
        // Fresh zero pages outside RAM are simply not written.
        store(
            &m,
            GuestAddress(20 * PAGE_SIZE as u64),
            &[0u8; PAGE_SIZE],
            &|_| true,
        )
        .unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever is stored where, RAM reads as if every page had been
        /// copied in (fresh frames read as zeroes already).
        #[test]
        fn pagein_store_reads_back_as_a_plain_copy(
            ops in proptest::collection::vec((0u64..16, 1u64..5, 0u8..4), 1..12),
        ) {
            let m = map();
            let want = gpc::MemoryMap::new(&[(GuestAddress(0), 36 * PAGE_SIZE as u64)]).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            for (at, n, kind) in ops {
                // Frames 0..12 (two adjacent regions) or 32..36.
                let (pfn, end) = if at < 12 { (at, 12) } else { (at + 20, 36) };
                let n = n.min(end - pfn) as usize;
                let mut d = vec![0u8; n * PAGE_SIZE];
                for (k, p) in d.chunks_mut(PAGE_SIZE).enumerate() {
                    if (k as u8 + kind) % 2 == 1 {
                        p[(pfn as usize * 7 + k) % PAGE_SIZE] = kind + 1;
                    }
                }
                let gpa = GuestAddress(pfn * PAGE_SIZE as u64);
                proptest::prop_assert!(store(&m, gpa, &d, &|p| !seen.contains(&p)).is_ok());
                want.guest_memory().write_slice(&d, gpa).unwrap();
                seen.extend(pfn..pfn + n as u64);
            }
            for p in (0..12).chain(32..36) {
                proptest::prop_assert_eq!(ram(&m, p, 1), ram(&want, p, 1));
            }
        }
    }
}
