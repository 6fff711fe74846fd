//! Stream I/O (sockets, pipes, files at their current position) straight
//! into and out of guest RAM, for save and live migration: `writev` of
//! private bytes (record headers, pfn arrays) interleaved with RAM ranges,
//! and `readv` of RAM ranges, each retried until everything is through.
//! As in `fileio`, the kernel reads or writes the pages; no Rust reference
//! to guest memory is made.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::cache::Segment;
use crate::fileio::{advance, MAX_IO_PIECES};
use crate::map::MemoryMap;

/// One piece of a vectored stream write.
#[derive(Clone, Copy, Debug)]
pub enum IoPart<'a> {
    /// Private bytes.
    Bytes(&'a [u8]),
    /// Guest RAM (must be RAM).
    Ram(Segment),
}

impl MemoryMap {
    /// Writes `parts` in order to `fd` with `writev` (at most
    /// [`MAX_IO_PIECES`] pieces a call), retrying short writes and `EINTR`.
    /// Returns the bytes written (all of them). Every `Ram` part must be
    /// guest RAM (checked before anything is written).
    pub fn write_all_parts(&self, fd: BorrowedFd<'_>, parts: &[IoPart<'_>]) -> io::Result<usize> {
        let mut iov = Vec::with_capacity(parts.len() + 4);
        for p in parts {
            match p {
                IoPart::Bytes(b) => {
                    if !b.is_empty() {
                        iov.push(libc::iovec {
                            iov_base: b.as_ptr() as *mut libc::c_void,
                            iov_len: b.len(),
                        })
                    }
                }
                IoPart::Ram(s) => iov.extend(
                    self.iovecs(std::slice::from_ref(s))
                        .map_err(io::Error::other)?,
                ),
            }
        }
        // SAFETY: `Bytes` iovecs point into slices borrowed for this call
        // and are only read; `Ram` ones point into RAM region mappings owned
        // by `self.inner` (alive: we hold `self`), inside the regions
        // (checked by `iovecs`), MAP_SHARED memfd pages that stay mapped
        // (see `fileio::vectored`). The kernel only reads them.
        unsafe { self.stream_vectored(fd, iov, false) }
    }

    /// Reads exactly the guest ranges `segs` (in order) from `fd` with
    /// `readv`, retrying short reads and `EINTR`; the end of the stream
    /// before they are full is `UnexpectedEof`. The pages are marked dirty.
    pub fn read_exact_parts(&self, fd: BorrowedFd<'_>, segs: &[Segment]) -> io::Result<usize> {
        let mut iov = Vec::with_capacity(segs.len() + 4);
        for s in segs {
            iov.extend(
                self.iovecs(std::slice::from_ref(s))
                    .map_err(io::Error::other)?,
            );
        }
        // SAFETY: every iovec points into a RAM region mapping owned by
        // `self.inner` (alive: we hold `self`), inside the region (checked
        // by `iovecs`), MAP_SHARED memfd pages that stay mapped (see
        // `fileio::vectored`). No Rust reference to that memory exists.
        let r = unsafe { self.stream_vectored(fd, iov, true) };
        // Marked once the read has returned (see `fileio`).
        self.mark_written_segs(segs);
        r
    }

    /// `readv`/`writev` of all of `iov` on `fd`, [`MAX_IO_PIECES`] at a time.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for the transfer (readable
    /// for a write, writable and not otherwise referenced for a read) for
    /// the whole call.
    unsafe fn stream_vectored(
        &self,
        fd: BorrowedFd<'_>,
        mut iov: Vec<libc::iovec>,
        read: bool,
    ) -> io::Result<usize> {
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut done = 0usize;
        let mut first = 0usize;
        while done < total {
            let rest = &iov[first..];
            let n = rest.len().min(MAX_IO_PIECES);
            // SAFETY: the caller's contract; `rest[..n]` is in bounds.
            let r = unsafe {
                if read {
                    libc::readv(fd.as_raw_fd(), rest.as_ptr(), n as libc::c_int)
                } else {
                    libc::writev(fd.as_raw_fd(), rest.as_ptr(), n as libc::c_int)
                }
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(if read {
                    io::Error::from(io::ErrorKind::UnexpectedEof)
                } else {
                    io::Error::from(io::ErrorKind::WriteZero)
                });
            }
            let r = r as usize;
            done += r;
            first += advance(&mut iov[first..], r);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn write_all_parts_interleaves_bytes_and_ram_across_regions() {
        let map =
            MemoryMap::new(&[(GuestAddress(0), 0x2000), (GuestAddress(0x2000), 0x2000)]).unwrap();
        let mem = map.guest_memory();
        let data: Vec<u8> = (0..0x4000u32).map(|i| (i * 13 + 1) as u8).collect();
        mem.write_slice(&data, GuestAddress(0)).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            b.read_to_end(&mut v).unwrap();
            v
        });
        // 2000 pieces: more than one writev's worth.
        let mut parts = vec![IoPart::Bytes(b"head")];
        for i in 0..1000 {
            parts.push(IoPart::Ram(Segment::new(GuestAddress(0x1ff0), 0x20)));
            parts.push(IoPart::Bytes(if i % 2 == 0 { b"x" } else { b"" }));
        }
        let n = map.write_all_parts(a.as_fd(), &parts).unwrap();
        drop(a);
        let got = reader.join().unwrap();
        let mut want = b"head".to_vec();
        for i in 0..1000 {
            want.extend_from_slice(&data[0x1ff0..0x2010]);
            if i % 2 == 0 {
                want.push(b'x');
            }
        }
        assert_eq!((n, got), (want.len(), want));
        // Not RAM: refused before anything is written.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let bad = [IoPart::Ram(Segment::new(GuestAddress(0x3000), 0x2000))];
        assert!(map.write_all_parts(a.as_fd(), &bad).is_err());
    }

    #[test]
    fn read_exact_parts_fills_ram_and_reports_a_short_stream() {
        let map = MemoryMap::new(&[(GuestAddress(0), 0x4000)]).unwrap();
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..0x1800u32).map(|i| (i * 7) as u8).collect();
        let d2 = data.clone();
        let w = std::thread::spawn(move || {
            // In small pieces: the reads come back short.
            for c in d2.chunks(100) {
                a.write_all(c).unwrap();
            }
        });
        let segs = [
            Segment::new(GuestAddress(0x3000), 0x800),
            Segment::new(GuestAddress(0x100), 0x1000),
        ];
        assert_eq!(map.read_exact_parts(b.as_fd(), &segs).unwrap(), 0x1800);
        w.join().unwrap();
        let mut got = vec![0u8; 0x800];
        map.guest_memory()
            .read_slice(&mut got, GuestAddress(0x3000))
            .unwrap();
        assert_eq!(got, data[..0x800]);
        let mut got = vec![0u8; 0x1000];
        map.guest_memory()
            .read_slice(&mut got, GuestAddress(0x100))
            .unwrap();
        assert_eq!(got, data[0x800..]);
        // The other end closes early.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(a);
        let e = map
            .read_exact_parts(b.as_fd(), &[Segment::new(GuestAddress(0), 0x1000)])
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
