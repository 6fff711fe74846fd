//! Shared-page ring access.
//!
//! The xenstore and console rings live in a guest page that the guest writes
//! concurrently. Everything the backends read from it is untrusted, and it is
//! only touched through [`RingPage`]: the VMM implements it over the guest
//! page (volatile copies and atomic index words), tests over memory
//! ([`MemRingPage`]). Indexes are free-running `u32` counters; a buffer of
//! size `2^k` holds byte `i` of the stream at `i mod 2^k`.

use parking_lot::Mutex;

/// Size of a ring page.
pub const PAGE_SIZE: usize = 4096;

/// Access to one shared ring page. Offsets are byte offsets into the page;
/// callers in this crate keep every access within [`PAGE_SIZE`] and index
/// words 4-byte aligned.
pub trait RingPage {
    /// Loads the `u32` at `off` with `Acquire` ordering: data the other side
    /// wrote before publishing this index is visible afterwards.
    fn load_u32(&self, off: usize) -> u32;
    /// Stores `v` at `off` with `Release` ordering: everything written
    /// before is visible to a side that loads this index.
    fn store_u32(&self, off: usize, v: u32);
    /// Copies `buf.len()` bytes starting at `off` out of the page.
    fn read(&self, off: usize, buf: &mut [u8]);
    /// Copies `data` into the page at `off`.
    fn write(&self, off: usize, data: &[u8]);
}

/// Copies `buf.len()` (at most `size`) bytes of the circular buffer at
/// `base` (of power-of-two `size`) starting at stream index `idx`.
pub fn ring_read(page: &dyn RingPage, base: usize, size: usize, idx: u32, buf: &mut [u8]) {
    debug_assert!(size.is_power_of_two() && buf.len() <= size);
    let len = buf.len().min(size);
    let off = idx as usize & (size - 1);
    let first = len.min(size - off);
    page.read(base + off, &mut buf[..first]);
    if first < len {
        page.read(base, &mut buf[first..len]);
    }
}

/// Copies `data` (at most `size` bytes) into the circular buffer at `base`
/// starting at stream index `idx`.
pub fn ring_write(page: &dyn RingPage, base: usize, size: usize, idx: u32, data: &[u8]) {
    debug_assert!(size.is_power_of_two() && data.len() <= size);
    let len = data.len().min(size);
    let off = idx as usize & (size - 1);
    let first = len.min(size - off);
    page.write(base + off, &data[..first]);
    if first < len {
        page.write(base, &data[first..len]);
    }
}

/// A ring page in ordinary memory, for tests and for tools that drive a
/// backend without a guest. A mutex stands in for the guest's atomicity.
#[derive(Debug)]
pub struct MemRingPage {
    bytes: Mutex<Vec<u8>>,
}

impl Default for MemRingPage {
    fn default() -> Self {
        Self::new()
    }
}

impl MemRingPage {
    /// A zeroed page.
    pub fn new() -> Self {
        MemRingPage {
            bytes: Mutex::new(vec![0; PAGE_SIZE]),
        }
    }

    /// A page with the given contents (truncated or zero-padded to a page).
    pub fn from_bytes(b: &[u8]) -> Self {
        let mut v = b.to_vec();
        v.resize(PAGE_SIZE, 0);
        MemRingPage {
            bytes: Mutex::new(v),
        }
    }

    /// A copy of the page.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().clone()
    }
}

impl RingPage for MemRingPage {
    fn load_u32(&self, off: usize) -> u32 {
        let b = self.bytes.lock();
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    fn store_u32(&self, off: usize, v: u32) {
        self.bytes.lock()[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn read(&self, off: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.bytes.lock()[off..off + buf.len()]);
    }

    fn write(&self, off: usize, data: &[u8]) {
        self.bytes.lock()[off..off + data.len()].copy_from_slice(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_write_across_end_wraps_to_start() {
        let p = MemRingPage::new();
        ring_write(&p, 1024, 1024, 1020 + 1024 * 7, b"abcdefgh");
        let s = p.snapshot();
        assert_eq!(&s[1024 + 1020..2048], b"abcd");
        assert_eq!(&s[1024..1028], b"efgh");
        let mut back = [0u8; 8];
        ring_read(&p, 1024, 1024, 1020, &mut back);
        assert_eq!(&back, b"abcdefgh");
    }

    #[test]
    fn mem_page_u32_is_little_endian() {
        let p = MemRingPage::new();
        p.store_u32(0x800, 0x0403_0201);
        assert_eq!(&p.snapshot()[0x800..0x804], &[1, 2, 3, 4]);
        assert_eq!(p.load_u32(0x800), 0x0403_0201);
    }
}
