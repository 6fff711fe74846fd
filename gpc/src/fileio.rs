//! File I/O straight into and out of guest RAM: `preadv`/`pwritev` with an
//! iovec of host addresses of RAM pages, for backends that must not copy
//! (blkback). The kernel reads or writes the pages; no Rust reference to
//! guest memory is made. Pages read into are marked dirty in the map's own
//! bitmap, as a cache guard's writes are, once the read has returned: a
//! mark set before would let a `take_dirty` between the mark and the write
//! clear it, and a migration copy the page before the data arrived with
//! nothing left to send it again (a guard's write is ordered by the RCU
//! wait in `take_dirty` instead; an I/O holds no guard).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use crate::cache::Segment;
use crate::map::MemoryMap;
use crate::{Error, PAGE_SHIFT};

/// Most pieces one call takes (Linux's `IOV_MAX`).
pub const MAX_IO_PIECES: usize = 1024;

impl MemoryMap {
    /// Host iovecs of `segs` (each split at region boundaries).
    pub(crate) fn iovecs(&self, segs: &[Segment]) -> Result<Vec<libc::iovec>, Error> {
        let mut v = Vec::with_capacity(segs.len());
        self.iovecs_into(segs, &mut v)?;
        Ok(v)
    }

    /// Marks the RAM pages `iov` (host iovecs made by
    /// [`iovecs_into`](Self::iovecs_into)) dirty: call it after the I/O that
    /// wrote them has returned (see the module docs). A page already marked
    /// costs a load, not a locked write.
    pub(crate) fn mark_written(&self, iov: &[libc::iovec]) {
        for v in iov {
            let (start, len) = (v.iov_base as usize, v.iov_len);
            if len == 0 {
                continue;
            }
            let Some(r) = self
                .inner
                .regions
                .iter()
                .find(|r| start >= r.host && start - r.host < r.size as usize)
            else {
                continue;
            };
            let off = (start - r.host) as u64;
            mark_pages(r, off, (len as u64).min(r.size - off));
        }
    }

    /// [`mark_written`](Self::mark_written) by guest range (RAM only; the
    /// rest is skipped).
    pub(crate) fn mark_written_segs(&self, segs: &[Segment]) {
        for s in segs {
            let (mut gpa, end) = (s.gpa.0, s.gpa.0.saturating_add(s.len as u64));
            while gpa < end {
                let Some(r) = self.inner.region_of(gpa) else {
                    break;
                };
                let n = (end - gpa).min(r.base + r.size - gpa);
                mark_pages(r, gpa - r.base, n);
                gpa += n;
            }
        }
    }

    /// [`iovecs`](Self::iovecs) appended to `v` (a buffer the caller
    /// reuses: no allocation per I/O); on an error `v` holds a prefix.
    pub(crate) fn iovecs_into(
        &self,
        segs: &[Segment],
        v: &mut Vec<libc::iovec>,
    ) -> Result<(), Error> {
        let first = v.len();
        for s in segs {
            let mut gpa = s.gpa.0;
            let end = gpa.checked_add(s.len as u64).ok_or(Error::BadLength {
                max_pages: MAX_IO_PIECES,
            })?;
            while gpa < end {
                let r = self
                    .inner
                    .region_of(gpa)
                    .ok_or(Error::NotMemfdBacked { gpa })?;
                let n = (end - gpa).min(r.base + r.size - gpa);
                let off = gpa - r.base;
                v.push(libc::iovec {
                    iov_base: (r.host + off as usize) as *mut libc::c_void,
                    iov_len: n as usize,
                });
                gpa += n;
            }
        }
        if v.len() - first > MAX_IO_PIECES {
            return Err(Error::BadLength {
                max_pages: MAX_IO_PIECES,
            });
        }
        Ok(())
    }

    /// Reads `file` at `offset` into the guest ranges `segs` (in order)
    /// with `preadv`, retrying short reads; end of file before the ranges
    /// are full is `UnexpectedEof`. Every range must be guest RAM.
    pub fn read_file_into(&self, file: &File, offset: u64, segs: &[Segment]) -> io::Result<usize> {
        self.with_iovecs(segs, true, |iov| self.vectored(file, offset, iov, true))
    }

    /// Writes the guest ranges `segs` (in order) to `file` at `offset` with
    /// `pwritev`, retrying short writes. Every range must be guest RAM.
    pub fn write_file_from(&self, file: &File, offset: u64, segs: &[Segment]) -> io::Result<usize> {
        self.with_iovecs(segs, false, |iov| self.vectored(file, offset, iov, false))
    }

    /// Runs `f` over the iovecs of `segs`, built in this thread's scratch
    /// buffer (a backend's I/O thread makes no allocation per I/O).
    fn with_iovecs<R>(
        &self,
        segs: &[Segment],
        mark_dirty: bool,
        f: impl FnOnce(&mut [libc::iovec]) -> io::Result<R>,
    ) -> io::Result<R> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<libc::iovec>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|cell| {
            // A nested call (none today) gets its own buffer.
            let mut own = Vec::new();
            let mut borrowed = cell.try_borrow_mut();
            let v = match borrowed.as_deref_mut() {
                Ok(v) => v,
                Err(_) => &mut own,
            };
            v.clear();
            let built = self.iovecs_into(segs, v).map_err(io::Error::other);
            let ok = built.is_ok();
            let r = built.and_then(|()| f(v));
            if mark_dirty && ok {
                // After the I/O, whatever it returned (part may have landed).
                self.mark_written_segs(segs);
            }
            // The pointers into guest RAM are not kept past the call.
            v.clear();
            r
        })
    }

    /// Writes `head` (private bytes) and then the guest ranges `segs` to
    /// `fd` in one `writev`: one datagram for a socket or a TAP (which takes
    /// a frame per call, so there is no retry of a short write). The guest
    /// pages go to the kernel straight from RAM, no copy in between. Every
    /// range must be guest RAM.
    pub fn writev_with_head(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        head: &[u8],
        segs: &[Segment],
    ) -> io::Result<usize> {
        let mut iov = Vec::with_capacity(segs.len() + 1);
        iov.push(libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
        iov.extend(self.iovecs(segs).map_err(io::Error::other)?);
        if iov.len() > MAX_IO_PIECES {
            return Err(io::Error::other(Error::BadLength {
                max_pages: MAX_IO_PIECES,
            }));
        }
        // SAFETY: the first iovec is `head`, borrowed for the call and only
        // read by writev; the others point into RAM region mappings owned by
        // `self.inner` (alive: we hold `self`), inside the regions (checked by
        // `iovecs`), MAP_SHARED memfd pages that stay mapped for the call
        // (see `vectored`). The kernel only reads them; no Rust reference to
        // that memory exists.
        let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Reads one datagram from `fd` into `head` (private bytes) and then
    /// the guest ranges `segs` in one `readv` (a TAP hands over a frame per
    /// call; what does not fit is lost). The guest pages are marked dirty.
    /// Returns the bytes read. Every range must be guest RAM.
    pub fn readv_with_head(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        head: &mut [u8],
        segs: &[Segment],
    ) -> io::Result<usize> {
        let mut iov = Vec::with_capacity(segs.len() + 1);
        iov.push(libc::iovec {
            iov_base: head.as_mut_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
        iov.extend(self.iovecs(segs).map_err(io::Error::other)?);
        if iov.len() > MAX_IO_PIECES {
            return Err(io::Error::other(Error::BadLength {
                max_pages: MAX_IO_PIECES,
            }));
        }
        // SAFETY: the first iovec is `head`, mutably borrowed for the call;
        // the others point into RAM region mappings owned by `self.inner`
        // (alive: we hold `self`), inside the regions (checked by `iovecs`),
        // MAP_SHARED memfd pages that stay mapped for the call (see
        // `vectored`). No Rust reference to that memory exists.
        let n = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        self.mark_written(&iov[1..]);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    pub(crate) fn vectored(
        &self,
        file: &File,
        offset: u64,
        iov: &mut [libc::iovec],
        read: bool,
    ) -> io::Result<usize> {
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut done = 0usize;
        let mut first = 0usize;
        while done < total {
            let pos = offset
                .checked_add(done as u64)
                .and_then(|p| libc::off_t::try_from(p).ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let rest = &iov[first..];
            // One piece left: pread/pwrite (the kernel then skips
            // importing an iovec array, a measurable share of a 4 KiB I/O).
            // SAFETY: every iovec (and so the single piece given to
            // pread/pwrite) points into a RAM region mapping owned by
            // `self.inner` (alive for this call: we hold `self`), inside the
            // region (checked by `iovecs`); the mappings are MAP_SHARED memfd
            // pages that stay mapped (overlays and balloon replace pages in
            // place, never unmap the range), so the kernel's access is to
            // valid memory. No Rust reference to that memory exists.
            let n = unsafe {
                if rest.len() == 1 {
                    if read {
                        libc::pread(file.as_raw_fd(), rest[0].iov_base, rest[0].iov_len, pos)
                    } else {
                        libc::pwrite(file.as_raw_fd(), rest[0].iov_base, rest[0].iov_len, pos)
                    }
                } else if read {
                    libc::preadv(
                        file.as_raw_fd(),
                        rest.as_ptr(),
                        rest.len() as libc::c_int,
                        pos,
                    )
                } else {
                    libc::pwritev(
                        file.as_raw_fd(),
                        rest.as_ptr(),
                        rest.len() as libc::c_int,
                        pos,
                    )
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            let n = n as usize;
            done += n;
            first += advance(&mut iov[first..], n);
        }
        Ok(total)
    }
}

/// Sets the dirty bits of the pages of `len` bytes from `off` in `r` (a
/// page already marked costs a load, not a locked write).
fn mark_pages(r: &crate::map::Region, off: u64, len: u64) {
    if len == 0 {
        return;
    }
    for p in (off >> PAGE_SHIFT)..=((off + len - 1) >> PAGE_SHIFT) {
        if let Some(w) = r.dirty.get((p / 64) as usize) {
            let bit = 1u64 << (p % 64);
            if w.load(Ordering::Relaxed) & bit == 0 {
                w.fetch_or(bit, Ordering::Release);
            }
        }
    }
}

/// Skips `n` transferred bytes of `iov`: returns how many entries are
/// now fully done (the next one is trimmed in place).
pub(crate) fn advance(iov: &mut [libc::iovec], mut n: usize) -> usize {
    let mut first = 0;
    while n > 0 && first < iov.len() {
        let l = iov[first].iov_len;
        if n >= l {
            n -= l;
            iov[first].iov_len = 0;
            first += 1;
        } else {
            iov[first].iov_base = (iov[first].iov_base as usize + n) as *mut libc::c_void;
            iov[first].iov_len -= n;
            n = 0;
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn read_file_into_fills_guest_pages_and_marks_dirty() {
        let map =
            MemoryMap::new(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10000), 0x2000)]).unwrap();
        let mut f = tempfile();
        let data: Vec<u8> = (0..0x3000u32).map(|i| (i * 7) as u8).collect();
        f.write_all(&data).unwrap();
        let _ = map.take_dirty();
        let segs = [
            Segment::new(GuestAddress(0x1200), 0x200),
            Segment::new(GuestAddress(0x10000), 0x1e00),
        ];
        assert_eq!(map.read_file_into(&f, 0x100, &segs).unwrap(), 0x2000);
        let mut got = vec![0u8; 0x200];
        map.guest_memory()
            .read_slice(&mut got, GuestAddress(0x1200))
            .unwrap();
        assert_eq!(got, data[0x100..0x300]);
        let mut got = vec![0u8; 0x1e00];
        map.guest_memory()
            .read_slice(&mut got, GuestAddress(0x10000))
            .unwrap();
        assert_eq!(got, data[0x300..0x2100]);
        let d = map.take_dirty().unwrap();
        assert!(
            d.contains(&crate::Gfn(1))
                && d.contains(&crate::Gfn(0x10))
                && d.contains(&crate::Gfn(0x11))
        );
        // Back out to the file, elsewhere.
        assert_eq!(map.write_file_from(&f, 0x10000, &segs).unwrap(), 0x2000);
        let mut back = vec![0u8; 0x2000];
        f.seek(SeekFrom::Start(0x10000)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert_eq!(back, data[0x100..0x2100]);
    }

    #[test]
    fn read_file_into_outside_ram_refused() {
        let map = MemoryMap::new(&[(GuestAddress(0), 0x1000)]).unwrap();
        let f = tempfile();
        let e = map
            .read_file_into(&f, 0, &[Segment::new(GuestAddress(0x800), 0x1000)])
            .unwrap_err();
        assert!(e.to_string().contains("not RAM"), "{e}");
        let e = map
            .read_file_into(&f, 0, &[Segment::new(GuestAddress(0), 0x1000)])
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn writev_with_head_sends_one_datagram_of_head_and_guest_ranges() {
        use std::os::fd::AsFd;
        let map =
            MemoryMap::new(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10000), 0x2000)]).unwrap();
        let data: Vec<u8> = (0..0x2000u32).map(|i| (i * 11) as u8).collect();
        map.guest_memory()
            .write_slice(&data, GuestAddress(0x10000))
            .unwrap();
        map.guest_memory()
            .write_slice(&data[..0x100], GuestAddress(0x3f00))
            .unwrap();
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let segs = [
            Segment::new(GuestAddress(0x3f80), 0x80),
            Segment::new(GuestAddress(0x10010), 0x1000),
        ];
        let n = map.writev_with_head(a.as_fd(), b"HEAD", &segs).unwrap();
        assert_eq!(n, 4 + 0x80 + 0x1000);
        let mut got = vec![0u8; 0x3000];
        let m = b.recv(&mut got).unwrap();
        assert_eq!(m, n, "one datagram");
        assert_eq!(&got[..4], b"HEAD");
        assert_eq!(&got[4..0x84], &data[0x80..0x100]);
        assert_eq!(&got[0x84..m], &data[0x10..0x1010]);
        let e = map
            .writev_with_head(a.as_fd(), b"", &[Segment::new(GuestAddress(0x5000), 1)])
            .unwrap_err();
        assert!(e.to_string().contains("not RAM"), "{e}");
    }

    #[test]
    fn readv_with_head_fills_head_then_guest_ranges() {
        use std::os::fd::AsFd;
        let map =
            MemoryMap::new(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10000), 0x2000)]).unwrap();
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let data: Vec<u8> = (0..0x1100u32).map(|i| (i * 5) as u8).collect();
        a.send(&data).unwrap();
        let _ = map.take_dirty();
        let mut head = [0u8; 0x10];
        let segs = [
            Segment::new(GuestAddress(0x3ff0), 0x10),
            Segment::new(GuestAddress(0x10000), 0x2000),
        ];
        let n = map.readv_with_head(b.as_fd(), &mut head, &segs).unwrap();
        assert_eq!(n, 0x1100);
        assert_eq!(&head[..], &data[..0x10]);
        let mut got = vec![0u8; 0x10];
        map.guest_memory()
            .read_slice(&mut got, GuestAddress(0x3ff0))
            .unwrap();
        assert_eq!(got, data[0x10..0x20]);
        let mut got = vec![0u8; 0x10e0];
        map.guest_memory()
            .read_slice(&mut got, GuestAddress(0x10000))
            .unwrap();
        assert_eq!(got, data[0x20..]);
        assert!(map.take_dirty().unwrap().contains(&crate::Gfn(0x10)));
    }

    fn tempfile() -> File {
        crate::sys::memfd(c"gpc-io-test", 0).unwrap()
    }
}
