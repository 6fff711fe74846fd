//! How PAGE_DATA's page bytes reach the output (issues 14 and 15): a
//! [`PageOut`] is a `Write` for the stream's small records that also takes
//! a batch's header and its pages.
//!
//! - [`Copying`] copies each page out of guest memory (any `Write`: tests,
//!   in-memory images).
//! - [`Direct`] writes to a file descriptor with `writev`, the record header
//!   and pfn array from a small buffer and the pages straight from guest RAM
//!   (gpc's [`gpc::MemoryMap::write_all_parts`]: no copy in user space);
//!   pages known to be zero (never touched) come from one zero page, or, in
//!   a regular file, are skipped with `lseek` (the file reads the same bytes,
//!   but those blocks are never written: a sparse file).
//!
//! The bytes are the same whichever writes them (tested below).

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};

use vm_memory::{Bytes, GuestAddress};

use super::stream::libxc::PAGE_SIZE;
use crate::GuestMem;

/// One page of a batch: its frame, and whether it is known to be zero
/// (then it is not read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSrc {
    /// Guest frame.
    pub pfn: u64,
    /// Known to be all zeroes (a page never touched).
    pub zero: bool,
}

/// A stream output that can write guest pages.
pub trait PageOut: Write {
    /// Writes `head`, then 4096 bytes for each of `pages`, in order.
    fn write_pages(&mut self, head: &[u8], pages: &[PageSrc]) -> io::Result<()>;
}

impl<T: PageOut + ?Sized> PageOut for &mut T {
    fn write_pages(&mut self, head: &[u8], pages: &[PageSrc]) -> io::Result<()> {
        (**self).write_pages(head, pages)
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

fn gpa(pfn: u64) -> GuestAddress {
    GuestAddress(pfn * PAGE_SIZE as u64)
}

fn mem_err(pfn: u64, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!(
        "guest memory at {:#x}: {e}",
        pfn * PAGE_SIZE as u64
    ))
}

/// Pages copied out of guest memory into a batch buffer, then written.
pub struct Copying<'a, W> {
    w: W,
    mem: &'a GuestMem,
    buf: Vec<u8>,
}

impl<'a, W: Write> Copying<'a, W> {
    /// Over `w`, pages from `mem`.
    pub fn new(w: W, mem: &'a GuestMem) -> Self {
        Copying {
            w,
            mem,
            buf: Vec::new(),
        }
    }

    /// The wrapped writer.
    pub fn into_inner(self) -> W {
        self.w
    }
}

impl<W: Write> Write for Copying<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

impl<W: Write> PageOut for Copying<'_, W> {
    fn write_pages(&mut self, head: &[u8], pages: &[PageSrc]) -> io::Result<()> {
        self.buf.clear();
        self.buf.resize(pages.len() * PAGE_SIZE, 0);
        for (p, dst) in pages.iter().zip(self.buf.chunks_exact_mut(PAGE_SIZE)) {
            if !p.zero {
                self.mem
                    .read_slice(dst, gpa(p.pfn))
                    .map_err(|e| mem_err(p.pfn, e))?;
            }
        }
        self.w.write_all(head)?;
        self.w.write_all(&self.buf)
    }
}

/// Small records gathered before a write (a batch's pages go straight out).
const SMALL: usize = 64 << 10;

/// `writev` to a file descriptor, pages straight from guest RAM.
pub struct Direct<'a, F: AsFd> {
    fd: F,
    map: &'a gpc::MemoryMap,
    /// Small records not written yet.
    buf: Vec<u8>,
    /// Skip known-zero pages with `lseek` (a regular file).
    sparse: bool,
    /// Bytes skipped and not yet seeked over.
    skip: u64,
}

impl<'a, F: AsFd> Direct<'a, F> {
    /// Over `fd`; pages from `map`. A regular file gets holes for the
    /// pages known to be zero.
    pub fn new(fd: F, map: &'a gpc::MemoryMap) -> Self {
        let sparse = rustix::fs::fstat(fd.as_fd())
            .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_file())
            .unwrap_or(false);
        Direct {
            fd,
            map,
            buf: Vec::with_capacity(SMALL),
            sparse,
            skip: 0,
        }
    }

    /// Whether known-zero pages become holes.
    pub fn sparse(&self) -> bool {
        self.sparse
    }

    /// Flushes and returns the descriptor.
    pub fn finish(mut self) -> io::Result<F> {
        self.flush()?;
        Ok(self.fd)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Seeks over the skipped bytes, if any.
    fn settle(&mut self) -> io::Result<()> {
        if self.skip > 0 {
            let n = i64::try_from(self.skip).map_err(io::Error::other)?;
            rustix::fs::seek(self.fd.as_fd(), rustix::fs::SeekFrom::Current(n))?;
            self.skip = 0;
        }
        Ok(())
    }

    /// Seeks over a pending hole, then writes what is buffered and
    /// `parts` in one go.
    fn put(&mut self, parts: &[gpc::IoPart<'_>]) -> io::Result<()> {
        if self.buf.is_empty() && parts.is_empty() {
            return Ok(());
        }
        // Buffered bytes always come after a pending hole: a hole is only
        // left after everything before it was written.
        self.settle()?;
        let mut all = Vec::with_capacity(parts.len() + 1);
        if !self.buf.is_empty() {
            all.push(gpc::IoPart::Bytes(&self.buf));
        }
        all.extend_from_slice(parts);
        let r = self.map.write_all_parts(self.fd.as_fd(), &all);
        drop(all);
        self.buf.clear();
        r.map(|_| ())
    }
}

impl<F: AsFd> Write for Direct<'_, F> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.buf.len() + b.len() > SMALL {
            self.put(&[gpc::IoPart::Bytes(b)])?;
        } else {
            self.buf.extend_from_slice(b);
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // A trailing hole: the file must still be that long.
        if self.buf.is_empty() && self.skip > 0 {
            let pos = rustix::fs::seek(self.fd(), rustix::fs::SeekFrom::Current(0))?;
            let end = pos + self.skip;
            if (rustix::fs::fstat(self.fd())?.st_size as u64) < end {
                rustix::fs::ftruncate(self.fd(), end)?;
            }
            self.settle()?;
        }
        self.put(&[])
    }
}

impl<F: AsFd> PageOut for Direct<'_, F> {
    fn write_pages(&mut self, head: &[u8], pages: &[PageSrc]) -> io::Result<()> {
        let mut parts: Vec<gpc::IoPart<'_>> = Vec::with_capacity(pages.len() + 2);
        parts.push(gpc::IoPart::Bytes(head));
        let mut i = 0;
        while i < pages.len() {
            // A run of consecutive frames, all zero or all to read.
            let z = pages[i].zero;
            let mut j = i + 1;
            while j < pages.len()
                && pages[j].zero == z
                && (z || pages[j].pfn == pages[j - 1].pfn + 1)
            {
                j += 1;
            }
            let n = j - i;
            if !z {
                parts.push(gpc::IoPart::Ram(gpc::Segment::new(
                    gpa(pages[i].pfn),
                    n * PAGE_SIZE,
                )));
            } else if self.sparse {
                // Write what comes before the hole, then remember the hole.
                self.put(&parts)?;
                parts.clear();
                self.skip += (n * PAGE_SIZE) as u64;
            } else {
                parts.extend(std::iter::repeat_n(gpc::IoPart::Bytes(&ZERO_PAGE), n));
            }
            i = j;
        }
        self.put(&parts)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek};

    use super::*;

    fn map() -> gpc::MemoryMap {
        let map = gpc::MemoryMap::new(&[
            (GuestAddress(0), 16 * PAGE_SIZE as u64),
            (GuestAddress(32 * PAGE_SIZE as u64), 8 * PAGE_SIZE as u64),
        ])
        .unwrap();
        for pfn in [0u64, 1, 2, 7, 15, 32, 33, 39] {
            let v: Vec<u8> = (0..PAGE_SIZE).map(|i| (i as u64 * 3 + pfn) as u8).collect();
            map.guest_memory().write_slice(&v, gpa(pfn)).unwrap();
        }
        map
    }

    fn batch() -> Vec<PageSrc> {
        let p = |pfn, zero| PageSrc { pfn, zero };
        vec![
            p(0, false),
            p(1, false),
            p(2, false),
            p(3, true),
            p(4, true),
            p(7, false),
            p(15, false),
            p(32, false),
            p(33, false),
            p(34, true),
            p(39, false),
            p(38, true),
        ]
    }

    fn via<O: PageOut>(o: &mut O) {
        o.write_all(b"small record").unwrap();
        o.write_pages(b"HEAD", &batch()).unwrap();
        o.write_all(&[9u8; 100_000]).unwrap();
        o.write_pages(b"H2", &batch()[3..5]).unwrap();
        o.write_all(b"end").unwrap();
        o.flush().unwrap();
    }

    #[test]
    fn pageio_direct_file_socket_and_copying_write_the_same_bytes() {
        let m = map();
        let mut want = Vec::new();
        via(&mut Copying::new(&mut want, m.guest_memory()));
        assert_eq!(
            want.len(),
            12 + 4 + 12 * PAGE_SIZE + 100_000 + 2 + 2 * PAGE_SIZE + 3
        );
        // A regular file: sparse, reads back the same.
        let fd = rustix::fs::memfd_create("pageio-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let mut f = std::fs::File::from(fd);
        let mut d = Direct::new(&f, &m);
        assert!(d.sparse());
        via(&mut d);
        d.finish().unwrap();
        f.rewind().unwrap();
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert!(got == want, "file differs");
        // A socket: zero pages written out.
        let (wr, mut rd) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            rd.read_to_end(&mut v).unwrap();
            v
        });
        let mut d = Direct::new(&wr, &m);
        assert!(!d.sparse());
        via(&mut d);
        d.finish().unwrap();
        drop(wr);
        assert!(reader.join().unwrap() == want, "pipe differs");
    }

    #[test]
    fn pageio_trailing_hole_keeps_the_file_length() {
        let m = map();
        let fd = rustix::fs::memfd_create("pageio-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let f = std::fs::File::from(fd);
        let mut d = Direct::new(&f, &m);
        d.write_pages(b"x", &[PageSrc { pfn: 5, zero: true }])
            .unwrap();
        d.finish().unwrap();
        assert_eq!(f.metadata().unwrap().len(), 1 + PAGE_SIZE as u64);
    }

    #[test]
    fn pageio_page_outside_ram_is_an_error_not_a_panic() {
        let m = map();
        let mut v = Vec::new();
        let bad = [PageSrc {
            pfn: 20,
            zero: false,
        }];
        assert!(Copying::new(&mut v, m.guest_memory())
            .write_pages(b"h", &bad)
            .is_err());
        let fd = rustix::fs::memfd_create("pageio-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let f = std::fs::File::from(fd);
        assert!(Direct::new(&f, &m).write_pages(b"h", &bad).is_err());
    }
}
