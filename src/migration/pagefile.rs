//! How a saved image's page data reaches a restored guest's RAM (issue 14):
//! read from the image file with `pread` into a reused buffer and written
//! into the RAM's memfd with `pwrite`, skipping what is known to be zero.
//!
//! - The image's holes (a save leaves the pages a guest never touched as
//!   holes, see [`super::pageio::Direct`]) are found with `SEEK_DATA` /
//!   `SEEK_HOLE` and not read at all.
//! - A page that reads as all zeroes is not written when the RAM is fresh
//!   (a new memfd: every page reads as zero until written) and no earlier
//!   copy of its frame was written: the restored RAM stays as sparse as the
//!   saved guest's, and no host memory is spent on it.
//! - Any other page is written with `pwrite` at its offset in the memfd:
//!   the kernel allocates the page and copies into it without clearing it
//!   first and without a page fault per page (reading straight into the
//!   RAM mapping faulted, allocated and cleared every page first).
//!
//! The last copy of a frame wins, as with `write_slice` before.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::pagein::{outside, store_pages, FrameState, Frames};
use super::save::data_ranges;
use super::stream::libxc::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// Bytes read from the image per `pread`.
const CHUNK: usize = 1 << 20;

/// Copies page data from an image file into guest RAM (see the module docs).
pub struct PageLoader<'a> {
    image: &'a File,
    map: &'a gpc::MemoryMap,
    regions: Vec<gpc::RamRegion>,
    /// The RAM was all zeroes when the load began.
    fresh: bool,
    /// Frames written so far (a zero page of such a frame must be written).
    written: Vec<u64>,
    buf: Vec<u8>,
    /// Pages written, and pages left out as zero.
    pub stored: u64,
    /// Pages not written because they are zero (holes of the image, or
    /// read as zeroes) and the RAM already reads zero there.
    pub skipped: u64,
}

impl<'a> PageLoader<'a> {
    /// Pages from `image` into `map`; `fresh`: nothing has been written to
    /// the RAM yet (zero pages may be left out).
    pub fn new(image: &'a File, map: &'a gpc::MemoryMap, fresh: bool) -> Self {
        let regions = map.ram_regions();
        let frames = regions
            .iter()
            .map(|r| (r.guest_base.0 + r.size) / PAGE)
            .max()
            .unwrap_or(0);
        PageLoader {
            image,
            map,
            regions,
            fresh,
            written: vec![0; frames.div_ceil(64) as usize],
            buf: Vec::new(),
            stored: 0,
            skipped: 0,
        }
    }

    /// Whether frame `pfn` is in the guest's RAM.
    fn in_ram(&self, pfn: u64) -> bool {
        pfn.checked_mul(PAGE).is_some_and(|gpa| {
            self.regions
                .iter()
                .any(|r| gpa >= r.guest_base.0 && gpa - r.guest_base.0 < r.size)
        })
    }

    /// Whether a zero page of `pfn` can be left out.
    fn zero_is_free(&self, pfn: u64) -> bool {
        Marks::free(self.fresh, &self.written, pfn)
    }

    /// Writes `data` (whole pages) for the frames `pfns` (one per page, in
    /// order), [`store_pages`]: consecutive frames of one region go in one
    /// `pwrite`; zero pages that can be left out are.
    fn store(&mut self, pfns: &[u64], data: &[u8]) -> io::Result<()> {
        let mut marks = Marks {
            fresh: self.fresh,
            written: &mut self.written,
        };
        let done = store_pages(
            self.map,
            &self.regions,
            Frames::Each(pfns),
            data,
            &mut marks,
        )?;
        self.stored += done.written;
        self.skipped += done.skipped;
        Ok(())
    }

    /// Loads the pages of one PAGE_DATA record: `pfns` are its frames with
    /// data, in order, their 4096 bytes each at `offset` in the image.
    pub fn load(&mut self, offset: u64, pfns: &[u64]) -> io::Result<()> {
        let len = pfns.len() as u64 * PAGE;
        // Past the end of the file would look like a hole.
        if offset.saturating_add(len) > self.image.metadata()?.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "page data past the end of the image",
            ));
        }
        // Every frame in RAM, before anything is written ([`store_pages`]
        // does not look up the zero pages it leaves out).
        if let Some(&pfn) = pfns.iter().find(|&&p| !self.in_ram(p)) {
            return Err(outside(pfn));
        }
        // Which pages lie wholly in a hole of the image (they read as zero).
        let data = data_ranges(self.image, offset, len);
        let in_hole = |i: usize| -> bool {
            let (s, e) = (i as u64 * PAGE, (i as u64 + 1) * PAGE);
            data.as_ref()
                .is_some_and(|d| !d.iter().any(|&(ds, de)| ds < e && de > s))
        };
        let mut i = 0;
        while i < pfns.len() {
            if in_hole(i) {
                let pfn = pfns[i];
                if self.zero_is_free(pfn) {
                    self.skipped += 1;
                } else {
                    self.store(&[pfn], &[0u8; PAGE_SIZE])?;
                }
                i += 1;
                continue;
            }
            // A run of pages to read, up to the buffer's size.
            let mut j = i + 1;
            while j < pfns.len() && (j - i) * PAGE_SIZE < CHUNK && !in_hole(j) {
                j += 1;
            }
            let mut buf = std::mem::take(&mut self.buf);
            buf.resize((j - i) * PAGE_SIZE, 0);
            let r = self
                .image
                .read_exact_at(&mut buf, offset + i as u64 * PAGE)
                .and_then(|()| self.store(&pfns[i..j], &buf));
            self.buf = buf;
            r?;
            i = j;
        }
        Ok(())
    }
}

/// The loader's frames for [`store_pages`]: a zero page is free in fresh
/// RAM unless an earlier copy of its frame was written.
struct Marks<'a> {
    fresh: bool,
    /// A bit per frame written.
    written: &'a mut Vec<u64>,
}

impl Marks<'_> {
    fn free(fresh: bool, written: &[u64], pfn: u64) -> bool {
        fresh
            && written
                .get((pfn / 64) as usize)
                .is_none_or(|w| w & (1 << (pfn % 64)) == 0)
    }
}

impl FrameState for Marks<'_> {
    fn zero_is_free(&self, pfn: u64) -> bool {
        Marks::free(self.fresh, &self.written[..], pfn)
    }

    fn written(&mut self, first: u64, n: u64) {
        for pfn in first..first.saturating_add(n) {
            if let Some(w) = self.written.get_mut((pfn / 64) as usize) {
                *w |= 1 << (pfn % 64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    fn map() -> gpc::MemoryMap {
        gpc::MemoryMap::new(&[
            (GuestAddress(0), 16 * PAGE),
            (GuestAddress(32 * PAGE), 8 * PAGE),
        ])
        .unwrap()
    }

    fn page(v: u8) -> Vec<u8> {
        vec![v; PAGE_SIZE]
    }

    fn read(m: &gpc::MemoryMap, pfn: u64) -> Vec<u8> {
        let mut b = page(0xEE);
        m.guest_memory()
            .read_slice(&mut b, GuestAddress(pfn * PAGE))
            .unwrap();
        b
    }

    /// An image file: a page of something, then `pages`, with a hole
    /// (seeked over) for each `None`.
    fn image(pages: &[Option<Vec<u8>>]) -> File {
        let fd =
            rustix::fs::memfd_create("pagefile-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let mut f = File::from(fd);
        f.write_all(&page(7)).unwrap();
        for p in pages {
            match p {
                Some(d) => f.write_all(d).unwrap(),
                None => {
                    use std::io::Seek;
                    f.seek(io::SeekFrom::Current(PAGE as i64)).unwrap();
                }
            }
        }
        f.set_len((1 + pages.len() as u64) * PAGE).unwrap();
        f
    }

    #[test]
    fn pagefile_load_data_holes_and_zero_pages_read_back_as_saved() {
        let m = map();
        let f = image(&[
            Some(page(1)),
            None,
            Some(page(0)),
            Some(page(3)),
            Some(page(4)),
        ]);
        let mut l = PageLoader::new(&f, &m, true);
        l.load(PAGE, &[0, 1, 2, 15, 32]).unwrap();
        for (pfn, v) in [(0, 1), (1, 0), (2, 0), (15, 3), (32, 4), (33, 0)] {
            assert_eq!(read(&m, pfn), page(v), "pfn {pfn}");
        }
        assert_eq!((l.stored, l.skipped), (3, 2));
        // A later zero copy of a frame written before overwrites it.
        let z = image(&[None, Some(page(0))]);
        let mut l2 = PageLoader::new(&z, &m, true);
        l2.written = l.written.clone();
        l2.load(PAGE, &[0, 15]).unwrap();
        assert_eq!(read(&m, 0), page(0));
        assert_eq!(read(&m, 15), page(0));
        assert_eq!(read(&m, 32), page(4));
    }

    #[test]
    fn pagefile_load_into_used_ram_writes_zero_pages_too() {
        let m = map();
        m.guest_memory()
            .write_slice(&page(9), GuestAddress(3 * PAGE))
            .unwrap();
        m.guest_memory()
            .write_slice(&page(9), GuestAddress(4 * PAGE))
            .unwrap();
        let f = image(&[None, Some(page(0))]);
        let mut l = PageLoader::new(&f, &m, false);
        l.load(PAGE, &[3, 4]).unwrap();
        assert_eq!(read(&m, 3), page(0));
        assert_eq!(read(&m, 4), page(0));
    }

    #[test]
    fn pagefile_page_outside_ram_or_past_the_file_is_an_error() {
        let m = map();
        let f = image(&[Some(page(1)), Some(page(2))]);
        let e = PageLoader::new(&f, &m, true)
            .load(PAGE, &[0, 20])
            .unwrap_err();
        assert!(e.to_string().contains("pfn 0x14 is outside"), "{e}");
        assert!(PageLoader::new(&f, &m, true)
            .load(2 * PAGE, &[0, 1])
            .is_err());
    }
}
