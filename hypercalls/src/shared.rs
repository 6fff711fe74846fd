//! Pages the guest reads and writes while the domain updates them (shared_info, grant frames,
//! a registered vcpu_info): word-granular atomic access with an explicit [`Ordering`].
//!
//! The VMM implements [`SharedPage`] over its overlay pages; [`VecPage`] is a plain in-memory
//! implementation for tests and for pages nobody maps yet. Bit arrays in these pages
//! (`evtchn_pending`, `evtchn_mask`, `evtchn_pending_sel`) are little-endian arrays of
//! `xen_ulong_t`; bit `n` of such an array is bit `n % 64` of the `u64` at byte `8 * (n / 64)`
//! for both the 32- and 64-bit layout, so all bit operations use aligned `u64` words.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::abi::PAGE_SIZE;

/// A 4 KiB page shared with the guest. Offsets are byte offsets inside the page; `u64`
/// accesses are 8-byte aligned and `u32` accesses 4-byte aligned. Callers in this crate only
/// pass constant, in-page, aligned offsets; implementations may panic otherwise.
pub trait SharedPage: Send + Sync {
    fn load_u64(&self, off: usize, o: Ordering) -> u64;
    fn store_u64(&self, off: usize, v: u64, o: Ordering);
    /// Atomic OR, returning the previous value.
    fn fetch_or_u64(&self, off: usize, v: u64, o: Ordering) -> u64;
    /// Atomic AND, returning the previous value.
    fn fetch_and_u64(&self, off: usize, v: u64, o: Ordering) -> u64;
    fn load_u32(&self, off: usize, o: Ordering) -> u32;
    fn store_u32(&self, off: usize, v: u32, o: Ordering);
    /// Copy bytes out of the page (no atomicity across words).
    fn read(&self, off: usize, buf: &mut [u8]);
    /// Copy bytes into the page (no atomicity across words).
    fn write(&self, off: usize, data: &[u8]);
}

/// A [`SharedPage`] backed by 512 `AtomicU64`s.
pub struct VecPage {
    words: Vec<AtomicU64>,
}

impl Default for VecPage {
    fn default() -> Self {
        Self::new()
    }
}

impl VecPage {
    /// A zeroed page.
    pub fn new() -> Self {
        VecPage {
            words: (0..PAGE_SIZE / 8).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        &self.words[off / 8]
    }

    /// Replace the bytes of `mask` in the word at `off` with those of `val`, atomically.
    fn update_bits(&self, off: usize, mask: u64, val: u64, o: Ordering) {
        let _ = self
            .word(off)
            .fetch_update(o, Ordering::Relaxed, |w| Some((w & !mask) | (val & mask)));
    }
}

impl SharedPage for VecPage {
    fn load_u64(&self, off: usize, o: Ordering) -> u64 {
        assert!(off % 8 == 0);
        self.word(off).load(o)
    }

    fn store_u64(&self, off: usize, v: u64, o: Ordering) {
        assert!(off % 8 == 0);
        self.word(off).store(v, o)
    }

    fn fetch_or_u64(&self, off: usize, v: u64, o: Ordering) -> u64 {
        assert!(off % 8 == 0);
        self.word(off).fetch_or(v, o)
    }

    fn fetch_and_u64(&self, off: usize, v: u64, o: Ordering) -> u64 {
        assert!(off % 8 == 0);
        self.word(off).fetch_and(v, o)
    }

    fn load_u32(&self, off: usize, o: Ordering) -> u32 {
        assert!(off % 4 == 0);
        (self.word(off).load(o) >> ((off % 8) * 8)) as u32
    }

    fn store_u32(&self, off: usize, v: u32, o: Ordering) {
        assert!(off % 4 == 0);
        let sh = (off % 8) * 8;
        self.update_bits(off, 0xffff_ffff << sh, u64::from(v) << sh, o);
    }

    fn read(&self, off: usize, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = off + i;
            *b = (self.word(a).load(Ordering::Acquire) >> ((a % 8) * 8)) as u8;
        }
    }

    fn write(&self, off: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let a = off + i;
            let sh = (a % 8) * 8;
            self.update_bits(a, 0xff << sh, u64::from(*b) << sh, Ordering::Release);
        }
    }
}

fn bit_word(base: usize, bit: usize) -> (usize, u64) {
    (base + (bit / 64) * 8, 1u64 << (bit % 64))
}

/// Set bit `bit` of the bit array at `base`; returns whether it was already set.
pub(crate) fn test_and_set_bit(p: &dyn SharedPage, base: usize, bit: usize) -> bool {
    let (off, m) = bit_word(base, bit);
    p.fetch_or_u64(off, m, Ordering::SeqCst) & m != 0
}

/// Clear bit `bit` of the bit array at `base`; returns whether it was set.
pub(crate) fn test_and_clear_bit(p: &dyn SharedPage, base: usize, bit: usize) -> bool {
    let (off, m) = bit_word(base, bit);
    p.fetch_and_u64(off, !m, Ordering::SeqCst) & m != 0
}

pub(crate) fn test_bit(p: &dyn SharedPage, base: usize, bit: usize) -> bool {
    let (off, m) = bit_word(base, bit);
    p.load_u64(off, Ordering::SeqCst) & m != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vecpage_u32_store_keeps_neighbour_half() {
        let p = VecPage::new();
        p.store_u64(8, u64::MAX, Ordering::SeqCst);
        p.store_u32(12, 0x1234_5678, Ordering::SeqCst);
        assert_eq!(p.load_u64(8, Ordering::SeqCst), 0x1234_5678_ffff_ffff);
        assert_eq!(p.load_u32(12, Ordering::SeqCst), 0x1234_5678);
        assert_eq!(p.load_u32(8, Ordering::SeqCst), 0xffff_ffff);
    }

    #[test]
    fn vecpage_bytes_roundtrip_across_words() {
        let p = VecPage::new();
        let data: Vec<u8> = (1..=20).collect();
        p.write(5, &data);
        let mut out = [0u8; 20];
        p.read(5, &mut out);
        assert_eq!(&out[..], &data[..]);
        assert_eq!(p.load_u64(0, Ordering::SeqCst) & 0xff_ffff_ffff, 0);
    }

    #[test]
    fn bitops_high_bit_maps_to_later_word() {
        let p = VecPage::new();
        assert!(!test_and_set_bit(&p, 0x800, 130));
        assert!(test_and_set_bit(&p, 0x800, 130));
        assert_eq!(p.load_u64(0x810, Ordering::SeqCst), 1 << 2);
        assert!(test_bit(&p, 0x800, 130));
        assert!(test_and_clear_bit(&p, 0x800, 130));
        assert!(!test_bit(&p, 0x800, 130));
    }
}
