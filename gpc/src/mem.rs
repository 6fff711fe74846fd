//! Bounds-checked, volatile/atomic accessors over a raw host mapping.
//!
//! This is the one place that dereferences host pointers into guest memory.
//! No Rust reference to guest memory leaves this module: plain bytes are
//! copied with volatile accesses, words are accessed through atomics with the
//! caller's `Ordering` (the guest reads these words concurrently). Atomic
//! accesses must be naturally aligned in host memory (which equals guest
//! physical alignment, mappings being page aligned); misaligned ones are
//! refused rather than split.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8};

use crate::Error;

/// A host mapping `ptr..ptr+len` that stays mapped and writable for as long
/// as the owner of the `Raw` says (a cache guard or an overlay page).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Raw {
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
}

impl Raw {
    #[inline(always)]
    fn at(&self, offset: usize, size: usize) -> Result<*mut u8, Error> {
        match offset.checked_add(size) {
            Some(end) if end <= self.len => {
                // SAFETY: offset + size <= len, so the pointer stays inside the mapping.
                Ok(unsafe { self.ptr.add(offset) })
            }
            _ => Err(Error::OutOfBounds {
                offset,
                size,
                len: self.len,
            }),
        }
    }

    #[inline(always)]
    fn aligned(&self, offset: usize, size: usize) -> Result<*mut u8, Error> {
        let p = self.at(offset, size)?;
        if (p as usize) % size != 0 {
            return Err(Error::Misaligned {
                offset,
                align: size,
            });
        }
        Ok(p)
    }

    /// Copies `buf.len()` bytes from `offset` with volatile loads: bytes up
    /// to the first 8-aligned address, then aligned 8-byte words (a
    /// volatile load of a byte array or an unaligned word is split into
    /// byte loads, and the byte stores into `buf` then stall the loads
    /// that read it: a blkif ring entry copied bytewise was the largest
    /// user-space cost of a backend's 4 KiB read), then the tail bytes.
    pub(crate) fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), Error> {
        let p = self.at(offset, buf.len())?;
        let n = buf.len();
        let head = ((p as usize).wrapping_neg() % 8).min(n);
        let mut i = 0;
        while i < head {
            // SAFETY: p+i is inside the mapping (checked above).
            buf[i] = unsafe { std::ptr::read_volatile(p.add(i)) };
            i += 1;
        }
        while i + 8 <= n {
            // SAFETY: p+i..p+i+8 is inside the mapping (checked above) and
            // 8-aligned (p+head is).
            let v = unsafe { std::ptr::read_volatile(p.add(i).cast::<u64>()) };
            buf[i..i + 8].copy_from_slice(&v.to_ne_bytes());
            i += 8;
        }
        while i < n {
            // SAFETY: p+i is inside the mapping.
            buf[i] = unsafe { std::ptr::read_volatile(p.add(i)) };
            i += 1;
        }
        Ok(())
    }

    /// Copies `data` to `offset` with volatile stores (ascending addresses;
    /// aligned 8-byte words where they fit, as in [`read`](Self::read)).
    pub(crate) fn write(&self, offset: usize, data: &[u8]) -> Result<(), Error> {
        let p = self.at(offset, data.len())?;
        let n = data.len();
        let head = ((p as usize).wrapping_neg() % 8).min(n);
        let mut i = 0;
        while i < head {
            // SAFETY: p+i is inside the mapping (checked above).
            unsafe { std::ptr::write_volatile(p.add(i), data[i]) };
            i += 1;
        }
        while i + 8 <= n {
            let mut v = [0u8; 8];
            v.copy_from_slice(&data[i..i + 8]);
            // SAFETY: p+i..p+i+8 is inside the mapping (checked above) and
            // 8-aligned (p+head is).
            unsafe { std::ptr::write_volatile(p.add(i).cast::<u64>(), u64::from_ne_bytes(v)) };
            i += 8;
        }
        while i < n {
            // SAFETY: p+i is inside the mapping.
            unsafe { std::ptr::write_volatile(p.add(i), data[i]) };
            i += 1;
        }
        Ok(())
    }

    /// One volatile store of a fixed-size block (compiled to a few wide moves;
    /// the order of bytes within the block is unspecified).
    #[inline(always)]
    pub(crate) fn write_array<const N: usize>(
        &self,
        offset: usize,
        data: &[u8; N],
    ) -> Result<(), Error> {
        let p = self.at(offset, N)?;
        // SAFETY: p..p+N is inside the mapping; [u8; N] has alignment 1.
        unsafe { std::ptr::write_volatile(p.cast::<[u8; N]>(), *data) };
        Ok(())
    }

    /// One volatile load of a fixed-size block.
    #[inline(always)]
    pub(crate) fn read_array<const N: usize>(&self, offset: usize) -> Result<[u8; N], Error> {
        let p = self.at(offset, N)?;
        // SAFETY: p..p+N is inside the mapping; [u8; N] has alignment 1.
        Ok(unsafe { std::ptr::read_volatile(p.cast::<[u8; N]>()) })
    }

    #[inline(always)]
    pub(crate) fn u8(&self, offset: usize) -> Result<&AtomicU8, Error> {
        let p = self.at(offset, 1)?;
        // SAFETY: in bounds; AtomicU8 has alignment 1; the reference lives only
        // as long as `self` (the mapping's owner keeps it mapped) and is never
        // handed out of this crate.
        Ok(unsafe { AtomicU8::from_ptr(p) })
    }

    #[inline(always)]
    pub(crate) fn u32(&self, offset: usize) -> Result<&AtomicU32, Error> {
        let p = self.aligned(offset, 4)?;
        // SAFETY: in bounds and 4-byte aligned; see `u8`.
        Ok(unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    #[inline(always)]
    pub(crate) fn u64(&self, offset: usize) -> Result<&AtomicU64, Error> {
        let p = self.aligned(offset, 8)?;
        // SAFETY: in bounds and 8-byte aligned; see `u8`.
        Ok(unsafe { AtomicU64::from_ptr(p.cast()) })
    }
}

/// Expands the accessor API on a type with `fn raw(&self) -> Raw` and
/// `fn wrote(&self, offset: usize, len: usize)` (dirty tracking hook).
macro_rules! accessors {
    () => {
        /// Length of the accessible range in bytes.
        #[inline]
        pub fn len(&self) -> usize {
            self.raw().len
        }

        /// True if the range is empty (never for an active cache).
        #[inline]
        pub fn is_empty(&self) -> bool {
            self.raw().len == 0
        }

        /// Natural alignment of the byte at `offset` (a power of two, at most
        /// the page size; equal to its guest physical alignment). Lets callers
        /// pick word or byte accesses for guest structures at any address.
        #[inline]
        pub fn alignment(&self, offset: usize) -> usize {
            let a = (self.raw().ptr as usize).wrapping_add(offset);
            1usize << a.trailing_zeros().min($crate::PAGE_SHIFT)
        }

        /// Copies bytes from `offset` into `buf` (volatile loads).
        pub fn read(
            &self,
            offset: usize,
            buf: &mut [u8],
        ) -> std::result::Result<(), $crate::Error> {
            self.raw().read(offset, buf)
        }

        /// Copies `data` to `offset` (volatile stores, ascending addresses).
        pub fn write(&self, offset: usize, data: &[u8]) -> std::result::Result<(), $crate::Error> {
            self.raw().write(offset, data)?;
            self.wrote(offset, data.len());
            Ok(())
        }

        /// Loads `N` bytes at `offset` in one volatile access.
        #[inline]
        pub fn read_array<const N: usize>(
            &self,
            offset: usize,
        ) -> std::result::Result<[u8; N], $crate::Error> {
            self.raw().read_array(offset)
        }

        /// Stores `N` bytes at `offset` in one volatile access (a few wide moves;
        /// the order within the block is unspecified: use the word stores
        /// where order matters).
        #[inline]
        pub fn write_array<const N: usize>(
            &self,
            offset: usize,
            data: &[u8; N],
        ) -> std::result::Result<(), $crate::Error> {
            self.raw().write_array(offset, data)?;
            self.wrote(offset, N);
            Ok(())
        }

        /// Atomic byte load.
        #[inline]
        pub fn load_u8(
            &self,
            offset: usize,
            order: std::sync::atomic::Ordering,
        ) -> std::result::Result<u8, $crate::Error> {
            Ok(self.raw().u8(offset)?.load(order))
        }

        /// Atomic byte store.
        #[inline]
        pub fn store_u8(
            &self,
            offset: usize,
            v: u8,
            order: std::sync::atomic::Ordering,
        ) -> std::result::Result<(), $crate::Error> {
            self.raw().u8(offset)?.store(v, order);
            self.wrote(offset, 1);
            Ok(())
        }

        /// Atomic 32-bit load (offset must be 4-byte aligned in memory).
        #[inline]
        pub fn load_u32(
            &self,
            offset: usize,
            order: std::sync::atomic::Ordering,
        ) -> std::result::Result<u32, $crate::Error> {
            Ok(self.raw().u32(offset)?.load(order))
        }

        /// Atomic 32-bit store.
        #[inline]
        pub fn store_u32(
            &self,
            offset: usize,
            v: u32,
            order: std::sync::atomic::Ordering,
        ) -> std::result::Result<(), $crate::Error> {
            self.raw().u32(offset)?.store(v, order);
            self.wrote(offset, 4);
            Ok(())
        }

        /// Atomic 32-bit fetch-or; returns the previous value.
        #[inline]
        pub fn fetch_or_u32(
            &self,
            offset: usize,
            v: u32,
            order: std::sync::atomic::Ordering,
        ) -> std::result::Result<u32, $crate::Error> {
            let r = self.raw().u32(offset)?.fetch_or(v, order);
            self.wrote(offset, 4);
            Ok(r)
        }

        /// Atomic 32-bit fetch-and; returns the previous value.
        #[inline]
        pub fn fetch_and_u32(
            &self,
            offset: usize,
            v: u32,
            order: std::sync::atomic::Ordering,
        ) -> std::result::Result<u32, $crate::Error> {
            let r = self.raw().u32(offset)?.fetch_and(v, order);
            self.wrote(offset, 4);
            Ok(r)
        }

        /// Atomic 32-bit compare-exchange (strong).
        #[inline]
        pub fn compare_exchange_u32(
            &self,
            offset: usize,
            current: u32,
            new: u32,
            success: std::sync::atomic::Ordering,
            failure: std::sync::atomic::Ordering,
        ) -> std::result::Result<std::result::Result<u32, u32>, $crate::Error> {
            let r = self
                .raw()
                .u32(offset)?
                .compare_exchange(current, new, success, failure);
            if r.is_ok() {
                self.wrote(offset, 4);
            }
            Ok(r)
        }

        /// Atomic 64-bit load (offset must be 8-byte aligned in memory).
        #[inline]
        pub fn load_u64(
            &self,
            offset: usize,
            order: std::sync::atomic::Ordering,
        ) -> std::result::Result<u64, $crate::Error> {
            Ok(self.raw().u64(offset)?.load(order))
        }

        /// Atomic 64-bit store.
        #[inline]
        pub fn store_u64(
            &self,
            offset: usize,
            v: u64,
            order: std::sync::atomic::Ordering,
        ) -> std::result::Result<(), $crate::Error> {
            self.raw().u64(offset)?.store(v, order);
            self.wrote(offset, 8);
            Ok(())
        }

        /// Atomic 64-bit swap; returns the previous value.
        #[inline]
        pub fn swap_u64(
            &self,
            offset: usize,
            v: u64,
            order: std::sync::atomic::Ordering,
        ) -> std::result::Result<u64, $crate::Error> {
            let r = self.raw().u64(offset)?.swap(v, order);
            self.wrote(offset, 8);
            Ok(r)
        }

        /// Atomic 64-bit fetch-or; returns the previous value.
        #[inline]
        pub fn fetch_or_u64(
            &self,
            offset: usize,
            v: u64,
            order: std::sync::atomic::Ordering,
        ) -> std::result::Result<u64, $crate::Error> {
            let r = self.raw().u64(offset)?.fetch_or(v, order);
            self.wrote(offset, 8);
            Ok(r)
        }

        /// Atomic 64-bit fetch-and; returns the previous value.
        #[inline]
        pub fn fetch_and_u64(
            &self,
            offset: usize,
            v: u64,
            order: std::sync::atomic::Ordering,
        ) -> std::result::Result<u64, $crate::Error> {
            let r = self.raw().u64(offset)?.fetch_and(v, order);
            self.wrote(offset, 8);
            Ok(r)
        }

        /// Atomic 64-bit compare-exchange (strong).
        #[inline]
        pub fn compare_exchange_u64(
            &self,
            offset: usize,
            current: u64,
            new: u64,
            success: std::sync::atomic::Ordering,
            failure: std::sync::atomic::Ordering,
        ) -> std::result::Result<std::result::Result<u64, u64>, $crate::Error> {
            let r = self
                .raw()
                .u64(offset)?
                .compare_exchange(current, new, success, failure);
            if r.is_ok() {
                self.wrote(offset, 8);
            }
            Ok(r)
        }
    };
}

pub(crate) use accessors;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every start alignment and length (head bytes, words, tail bytes)
    /// reads and writes exactly the bytes asked for.
    #[test]
    fn raw_read_and_write_at_any_alignment_and_length() {
        let mut mem: Vec<u64> = vec![0; 16];
        let raw = Raw {
            ptr: mem.as_mut_ptr().cast::<u8>(),
            len: 128,
        };
        let pattern: Vec<u8> = (0..128u32).map(|i| (i * 7 + 3) as u8).collect();
        for off in 0..24 {
            for len in 0..=40 {
                raw.write(0, &[0xee; 128]).unwrap();
                raw.write(off, &pattern[..len]).unwrap();
                let mut all = [0u8; 128];
                raw.read(0, &mut all).unwrap();
                assert_eq!(&all[off..off + len], &pattern[..len], "off {off} len {len}");
                assert!(
                    all[..off]
                        .iter()
                        .chain(&all[off + len..])
                        .all(|&b| b == 0xee),
                    "off {off} len {len}: wrote outside"
                );
                let mut part = vec![0u8; len];
                raw.read(off, &mut part).unwrap();
                assert_eq!(part, &pattern[..len], "read at off {off} len {len}");
            }
        }
        assert!(raw.read(120, &mut [0u8; 9]).is_err());
        assert!(raw.write(121, &[0u8; 8]).is_err());
    }
}
