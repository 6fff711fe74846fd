//! Batches of vectored file I/O into and out of guest RAM through
//! io_uring (the `io-uring` crate): a backend queues several
//! `readv`/`writev` of guest ranges and submits them with one system call.
//! The iovecs are built as in `fileio` (host addresses of RAM pages, pages
//! read into marked dirty) and kept alive until their completion; a single
//! piece goes as a plain `read`/`write` (no iovec for the kernel to import),
//! and a file registered with [`FileRing::register`] is used as a fixed
//! file (no file table lookup per I/O). The iovec buffers are reused from
//! batch to batch. Short transfers are completed with `preadv`/`pwritev`.
//! One batch may span several files ([`FileRing::queue_on`]: an image
//! format's clusters in the image and its backing files).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::cache::Segment;
use crate::map::MemoryMap;
use crate::Error;

struct Pending {
    /// Its own file ([`FileRing::queue_on`]); `None`: the one given to `run`.
    file: Option<Arc<File>>,
    iov: Vec<libc::iovec>,
    total: usize,
    offset: u64,
    write: bool,
    result: Option<io::Result<usize>>,
}

/// A ring of file I/O for one thread. Not `Sync`; owned by a backend queue.
pub struct FileRing {
    ring: io_uring::IoUring,
    map: MemoryMap,
    /// The batch: the first `len` entries; the rest are emptied entries
    /// of earlier batches, reused in place (their iovec buffers too).
    pending: Vec<Pending>,
    len: usize,
    /// The file registered as fixed file 0.
    registered: Option<std::os::fd::RawFd>,
    /// The registered file, when the ring keeps it open itself.
    registered_file: Option<Arc<File>>,
}

// SAFETY: the raw iovec pointers in `pending` point into guest RAM mappings
// owned by `map` (kept alive by the handle we hold) and into the heap
// buffers of the `iov` vectors we own; nothing is tied to the creating
// thread. The ring itself is an fd with its own mappings.
unsafe impl Send for FileRing {}

impl std::fmt::Debug for FileRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileRing")
            .field("pending", &self.len)
            .finish()
    }
}

impl FileRing {
    /// A ring with `entries` submission slots (io_uring may be absent or
    /// disabled: the error says so and the caller uses `preadv`).
    pub fn new(map: &MemoryMap, entries: u32) -> io::Result<FileRing> {
        Ok(FileRing {
            ring: io_uring::IoUring::new(entries)?,
            map: map.clone(),
            pending: Vec::new(),
            len: 0,
            registered: None,
            registered_file: None,
        })
    }

    /// Registers `file` as the ring's fixed file: [`run`](Self::run) on
    /// the same descriptor then spares the kernel a file table lookup per
    /// I/O. The kernel holds its own reference until the ring is dropped;
    /// the caller keeps `file` open as long as it runs I/O on this ring
    /// (a different file reusing the descriptor number would otherwise be
    /// mistaken for it).
    pub fn register(&mut self, file: &File) -> io::Result<()> {
        if self.registered.is_some() {
            self.ring.submitter().unregister_files()?;
            self.registered = None;
        }
        self.registered_file = None;
        self.ring.submitter().register_files(&[file.as_raw_fd()])?;
        self.registered = Some(file.as_raw_fd());
        Ok(())
    }

    /// [`register`](Self::register) a file the ring keeps open itself.
    pub fn register_shared(&mut self, file: &Arc<File>) -> io::Result<()> {
        self.register(file)?;
        self.registered_file = Some(file.clone());
        Ok(())
    }

    /// Queues a read of the file at `offset` into `segs` (or a write of
    /// `segs` there); returns its index in the batch. Nothing is submitted
    /// until [`run`](Self::run).
    pub fn queue(&mut self, offset: u64, segs: &[Segment], write: bool) -> Result<usize, Error> {
        self.push(None, offset, segs, write)
    }

    /// [`queue`](Self::queue) on `file` rather than the file given to
    /// [`run`](Self::run) (kept open by the ring until the batch is run).
    pub fn queue_on(
        &mut self,
        file: &Arc<File>,
        offset: u64,
        segs: &[Segment],
        write: bool,
    ) -> Result<usize, Error> {
        self.push(Some(file.clone()), offset, segs, write)
    }

    /// Whether a file is registered ([`register`](Self::register)).
    pub fn has_registered(&self) -> bool {
        self.registered.is_some()
    }

    fn push(
        &mut self,
        file: Option<Arc<File>>,
        offset: u64,
        segs: &[Segment],
        write: bool,
    ) -> Result<usize, Error> {
        if self.len == self.pending.len() {
            self.pending.push(Pending {
                file: None,
                iov: Vec::new(),
                total: 0,
                offset: 0,
                write: false,
                result: None,
            });
        }
        let p = &mut self.pending[self.len];
        p.iov.clear();
        if let Err(e) = self.map.iovecs_into(segs, &mut p.iov) {
            p.iov.clear();
            return Err(e);
        }
        p.total = p.iov.iter().map(|v| v.iov_len).sum();
        p.file = file;
        p.offset = offset;
        p.write = write;
        p.result = None;
        self.len += 1;
        Ok(self.len - 1)
    }

    /// Drops what was queued from index `from` on (not run).
    pub fn cancel_from(&mut self, from: usize) {
        while self.len > from {
            self.len -= 1;
            let p = &mut self.pending[self.len];
            p.file = None;
            p.iov.clear();
        }
    }

    /// Queued and not yet run.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Submits everything queued (on `file`, or on the file given to
    /// [`queue_on`](Self::queue_on)), waits for all of it and returns the
    /// results in queue order (bytes moved, always the whole length on
    /// success).
    pub fn run(&mut self, file: &File) -> Vec<io::Result<usize>> {
        let mut out = Vec::with_capacity(self.len);
        self.run_into(file, &mut out);
        out
    }

    /// [`run`](Self::run) with the results appended to `out` (a vector the
    /// caller reuses: no allocation per batch).
    pub fn run_into(&mut self, file: &File, out: &mut Vec<io::Result<usize>>) {
        let n = self.len;
        let mut next = 0usize;
        let mut done = 0usize;
        while done < n {
            // Fill the submission queue.
            {
                let mut sq = self.ring.submission();
                while next < n && !sq.is_full() {
                    let p = &self.pending[next];
                    let raw = p.file.as_deref().unwrap_or(file).as_raw_fd();
                    let fixed = self.registered == Some(raw);
                    let fd = io_uring::types::Fd(raw);
                    let e = entry(p, fd, fixed).user_data(next as u64);
                    // SAFETY: the iovec array (heap buffer of `p.iov`, or
                    // for one piece the guest range it names) and the
                    // guest pages it names stay valid until this entry
                    // completes: `pending` is not touched until every
                    // completion is reaped below, and the RAM mappings live
                    // as long as `self.map`.
                    if unsafe { sq.push(&e) }.is_err() {
                        break;
                    }
                    next += 1;
                }
            }
            let inflight = next - done;
            if let Err(e) = self.ring.submit_and_wait(inflight.max(1)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The kernel refused the batch: what is not reaped yet fails.
                for p in &mut self.pending[done..n] {
                    if p.result.is_none() {
                        p.result = Some(Err(io::Error::new(e.kind(), e.to_string())));
                    }
                }
                break;
            }
            for c in self.ring.completion() {
                let (ud, res) = (c.user_data(), c.result());
                let Some(p) = self.pending[..n].get_mut(ud as usize) else {
                    continue;
                };
                p.result = Some(if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as usize)
                });
                done += 1;
            }
        }
        out.reserve(n);
        for p in &mut self.pending[..n] {
            // What the ring read into guest RAM has landed: mark it dirty
            // now (not when queued: see `fileio`).
            if !p.write {
                self.map.mark_written(&p.iov);
            }
            out.push(match p.result.take() {
                Some(Ok(k)) if k < p.total => {
                    // Short: finish the rest synchronously.
                    let first = crate::fileio::advance(&mut p.iov, k);
                    let r = self
                        .map
                        .vectored(
                            p.file.as_deref().unwrap_or(file),
                            p.offset + k as u64,
                            &mut p.iov[first..],
                            !p.write,
                        )
                        .map(|m| k + m);
                    if !p.write {
                        self.map.mark_written(&p.iov[first..]);
                    }
                    r
                }
                Some(r) => r,
                None => Err(io::Error::other("io_uring request lost")),
            });
            // Complete: the entry (and the pointers into guest RAM its
            // buffer held) is emptied for the next batch.
            p.file = None;
            p.iov.clear();
        }
        self.len = 0;
    }
}

/// The submission entry of `p`: a plain read or write for one piece, else
/// a vectored one; on the fixed file when `fixed`.
fn entry(p: &Pending, fd: io_uring::types::Fd, fixed: bool) -> io_uring::squeue::Entry {
    use io_uring::opcode::{Read, Readv, Write, Writev};
    use io_uring::types::Fixed;
    let fits = |one: &libc::iovec| u32::try_from(one.iov_len).is_ok();
    macro_rules! op {
        ($fd:expr) => {
            match (p.iov.as_slice(), p.write) {
                ([one], false) if fits(one) => {
                    Read::new($fd, one.iov_base.cast(), one.iov_len as u32)
                        .offset(p.offset)
                        .build()
                }
                ([one], true) if fits(one) => {
                    Write::new($fd, one.iov_base.cast(), one.iov_len as u32)
                        .offset(p.offset)
                        .build()
                }
                (iov, false) => Readv::new($fd, iov.as_ptr(), iov.len() as u32)
                    .offset(p.offset)
                    .build(),
                (iov, true) => Writev::new($fd, iov.as_ptr(), iov.len() as u32)
                    .offset(p.offset)
                    .build(),
            }
        };
    }
    if fixed {
        op!(Fixed(0))
    } else {
        op!(fd)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn file_ring_batch_reads_and_writes_guest_ranges() {
        let map = MemoryMap::new(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut ring = match FileRing::new(&map, 8) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("SKIPPED file_ring test: io_uring unavailable: {e}");
                return;
            }
        };
        let mut f = crate::sys::memfd(c"uring-test", 0).unwrap();
        let data: Vec<u8> = (0..0x8000u32).map(|i| (i * 13) as u8).collect();
        f.write_all(&data).unwrap();
        // 20 reads (more than the 8 slots) of 512 bytes each.
        for i in 0..20u64 {
            let seg = [Segment::new(GuestAddress(i * 512), 512)];
            assert_eq!(ring.queue(i * 1024, &seg, false).unwrap(), i as usize);
        }
        let r = ring.run(&f);
        assert!(r.iter().all(|x| matches!(x, Ok(512))), "{r:?}");
        let mut got = vec![0u8; 512];
        map.guest_memory()
            .read_slice(&mut got, GuestAddress(5 * 512))
            .unwrap();
        assert_eq!(got, data[5 * 1024..5 * 1024 + 512]);
        // A write and a read past the end.
        ring.queue(0x7000, &[Segment::new(GuestAddress(0), 512)], true)
            .unwrap();
        ring.queue(0x9000, &[Segment::new(GuestAddress(0x1000), 512)], false)
            .unwrap();
        let r = ring.run(&f);
        assert_eq!(r[0].as_ref().unwrap(), &512);
        assert_eq!(
            r[1].as_ref().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(ring
            .queue(0, &[Segment::new(GuestAddress(0x20000), 512)], false)
            .is_err());
        // The file registered: a vectored and a single-piece read.
        ring.register(&f).unwrap();
        let two = [
            Segment::new(GuestAddress(0x8000), 0x200),
            Segment::new(GuestAddress(0x9000), 0x600),
        ];
        ring.queue(0x1000, &two, false).unwrap();
        ring.queue(0x2000, &[Segment::new(GuestAddress(0xa000), 0x800)], false)
            .unwrap();
        let r = ring.run(&f);
        assert!(matches!(r[..], [Ok(0x800), Ok(0x800)]), "{r:?}");
        let mut got = vec![0u8; 0x800];
        map.guest_memory()
            .read_slice(&mut got[..0x200], GuestAddress(0x8000))
            .unwrap();
        map.guest_memory()
            .read_slice(&mut got[0x200..], GuestAddress(0x9000))
            .unwrap();
        assert_eq!(got, data[0x1000..0x1800]);
        map.guest_memory()
            .read_slice(&mut got, GuestAddress(0xa000))
            .unwrap();
        assert_eq!(got, data[0x2000..0x2800]);
        // One batch over two files: the registered one (given to `run`) and
        // another queued with its own descriptor, registered afterwards too.
        let mut other = crate::sys::memfd(c"uring-test2", 0).unwrap();
        other.write_all(&[0xa5; 0x1000]).unwrap();
        let other = Arc::new(other);
        ring.queue(0x3000, &[Segment::new(GuestAddress(0xb000), 0x200)], false)
            .unwrap();
        ring.queue_on(
            &other,
            0x800,
            &[Segment::new(GuestAddress(0xc000), 0x200)],
            false,
        )
        .unwrap();
        let r = ring.run(&f);
        assert!(matches!(r[..], [Ok(0x200), Ok(0x200)]), "{r:?}");
        let guest = |gpa: u64, len: usize| {
            let mut b = vec![0u8; len];
            map.guest_memory()
                .read_slice(&mut b, GuestAddress(gpa))
                .unwrap();
            b
        };
        assert_eq!(guest(0xb000, 0x200), data[0x3000..0x3200]);
        assert!(
            guest(0xc000, 0x200).iter().all(|&b| b == 0xa5),
            "read from its own file"
        );
        ring.register_shared(&other).unwrap();
        assert!(ring.has_registered());
        ring.queue_on(
            &other,
            0,
            &[Segment::new(GuestAddress(0xd000), 0x400)],
            false,
        )
        .unwrap();
        ring.queue(0, &[Segment::new(GuestAddress(0xe000), 0x400)], false)
            .unwrap();
        let r = ring.run(&f);
        assert!(matches!(r[..], [Ok(0x400), Ok(0x400)]), "{r:?}");
        assert!(
            guest(0xd000, 0x400).iter().all(|&b| b == 0xa5),
            "through the fixed file"
        );
        assert_eq!(
            guest(0xe000, 0x400),
            data[..0x400],
            "the unregistered file by descriptor"
        );
        // A queued read marks its page only once the data has landed: a
        // `take_dirty` in between (a migration round) cannot consume the
        // mark and leave the page's new contents unsent.
        map.take_dirty().unwrap();
        ring.queue(0, &[Segment::new(GuestAddress(0xf000), 0x200)], false)
            .unwrap();
        ring.queue(0, &[Segment::new(GuestAddress(0xe000), 0x200)], true)
            .unwrap();
        assert_eq!(map.take_dirty().unwrap(), vec![], "marked before the read");
        let r = ring.run(&f);
        assert!(matches!(r[..], [Ok(0x200), Ok(0x200)]), "{r:?}");
        assert_eq!(
            map.take_dirty().unwrap(),
            vec![crate::Gfn(0xf)],
            "the read's page, not the written-from one"
        );
    }
}
