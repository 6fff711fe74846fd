//! A qcow2 image behind a virtual disk, through the `imago` crate (its
//! synchronous build: no async runtime, the queue's I/O thread does the
//! work). The disk's size is the image's virtual size; reads, writes,
//! flushes and discards go through imago, which follows the image's L1/L2
//! tables, allocates clusters, keeps refcounts and opens a backing file the
//! image names.
//!
//! Zero-copy where the image allows it, like raw disks: a request asks
//! imago where its bytes live (`FormatAccess::get_mapping`, which follows
//! the L1/L2 tables and backing files) and moves each piece that lies in a
//! file as is (`Mapping::Raw`) with `preadv`/`pwritev` between that file
//! and guest RAM (`gpc::fileio`: raw iovecs handed to the kernel, the guest
//! pages marked dirty; never a Rust reference to guest RAM, which the guest
//! may change at any time). Reads of unallocated or zeroed clusters fill
//! the guest's pages with zeros. What needs imago itself goes through a
//! bounce buffer: a write to a cluster that is not allocated and writable
//! in this image (allocation, copy-on-write from a backing file; imago
//! orders the data write before the metadata update), and compressed or
//! otherwise encoded clusters. The files are opened a second time by the
//! names imago reports (one descriptor per file, kept; the page cache is
//! shared with imago's own descriptor, and `flush` syncs the inode).
//!
//! Batched like raw disks too: a queue whose group of requests maps
//! entirely onto file clusters (or zeros) gets the pieces from
//! [`Qcow2Image::plan`] and queues them on its io_uring with the reads and
//! writes of the rest of its batch (one submission per batch), instead of
//! one `preadv` per piece on its thread.
//!
//! Metadata updates in imago are serialised by imago itself; discards take
//! the image exclusively (imago requires `&mut` for them, because they may
//! drop clusters a concurrent read is using). A batch's planned pieces name
//! clusters by their file offsets, so the queue keeps a shared hold on the
//! image ([`Qcow2Hold`]) from the plan until the batch completes: a discard
//! from another queue waits for it, and no cluster is freed (and reused,
//! say for an L2 table) under an I/O still in flight.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use gpc::{MemoryMap, Segment};
use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, PermissiveImplicitOpenGate, Storage};
use parking_lot::{ArcRwLockReadGuard, Mutex, RawRwLock, RwLock};
use vm_memory::{Bytes, GuestAddress};

/// Bytes moved each way, for the log and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Qcow2Stats {
    /// Between a file and guest RAM directly.
    pub direct: u64,
    /// Zeros written into guest RAM (unallocated or zeroed clusters).
    pub zeroed: u64,
    /// Through imago and a bounce buffer.
    pub bounced: u64,
    /// Of `direct`, what went through a queue's io_uring batch.
    pub batched: u64,
}

/// A shared hold on a qcow2 image's mapping (its L1/L2 tables): while it
/// lives, no discard can free a cluster that [`Qcow2Image::plan`] named.
/// Never taken twice by one thread, nor kept while waiting for the image
/// otherwise (a waiting discard blocks new holds).
pub struct Qcow2Hold(ArcRwLockReadGuard<RawRwLock, FormatAccess<ImagoFile>>);

impl std::fmt::Debug for Qcow2Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Qcow2Hold")
    }
}

/// Where one part of a planned I/O goes ([`Qcow2Image::plan`]).
#[derive(Debug)]
pub enum Piece {
    /// Bytes at `offset` of `file` (the image's or a backing file's),
    /// moved as is to or from the guest ranges `segs`.
    File {
        file: Arc<File>,
        offset: u64,
        segs: Vec<Segment>,
    },
    /// Reads as zeros (unallocated, zeroed): the guest ranges `segs`.
    Zero(Vec<Segment>),
}

/// An open qcow2 image.
pub struct Qcow2Image {
    img: Arc<RwLock<FormatAccess<ImagoFile>>>,
    writable: bool,
    /// Our own descriptors of the files imago's mappings point into, by the
    /// address of imago's storage object (it lives as long as the image),
    /// so a request looks its file up without building a path; `None`: imago
    /// names no file for it.
    files: Mutex<HashMap<usize, Option<Arc<File>>>>,
    direct: AtomicU64,
    zeroed: AtomicU64,
    bounced: AtomicU64,
    batched: AtomicU64,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Qcow2Image {
    /// Opens the qcow2 image at `path` (and the backing file it names,
    /// read-only), writable unless `readonly`.
    pub fn open(path: &Path, readonly: bool) -> io::Result<Qcow2Image> {
        let q = Qcow2::<ImagoFile>::builder_path(path)
            .write(!readonly)
            .open(PermissiveImplicitOpenGate::default())?;
        Ok(Qcow2Image {
            img: Arc::new(RwLock::new(FormatAccess::new(q))),
            writable: !readonly,
            files: Mutex::new(HashMap::new()),
            direct: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            bounced: AtomicU64::new(0),
            batched: AtomicU64::new(0),
        })
    }

    /// Bytes moved directly, zeroed, and through the bounce buffer so far.
    pub fn stats(&self) -> Qcow2Stats {
        Qcow2Stats {
            direct: self.direct.load(Ordering::Relaxed),
            zeroed: self.zeroed.load(Ordering::Relaxed),
            bounced: self.bounced.load(Ordering::Relaxed),
            batched: self.batched.load(Ordering::Relaxed),
        }
    }

    /// A shared hold on the image's mapping, waiting for a discard in
    /// progress (see [`Qcow2Hold`] for the rule that keeps this from
    /// deadlocking).
    pub fn hold(&self) -> Qcow2Hold {
        Qcow2Hold(self.img.read_arc())
    }

    /// Where the `segs.len()` bytes from `offset` are, for a caller that
    /// moves them itself (a queue's io_uring batch) while it keeps `hold`:
    /// `None` when some part needs imago (a write that allocates or copies
    /// on write, a compressed cluster, a file imago names no path for); the
    /// caller then uses [`read`](Self::read) or [`write`](Self::write). A
    /// read's pieces may be `Zero`; a write's are all writable clusters of
    /// this image. Count what the caller moves with
    /// [`note_batched`](Self::note_batched) and zeros with
    /// [`zero`](Self::zero).
    pub fn plan(
        &self,
        hold: &Qcow2Hold,
        offset: u64,
        segs: &[Segment],
        write: bool,
    ) -> io::Result<Option<Vec<Piece>>> {
        let mut pieces = Vec::new();
        let mut ok = true;
        each_mapping(&hold.0, offset, segs, |m, _, piece| {
            if !ok {
                return Ok(());
            }
            match m {
                Mapping::Raw {
                    storage,
                    offset: host,
                    writable,
                    ..
                } if writable || !write => match self.file_of(storage)? {
                    Some(file) => pieces.push(Piece::File {
                        file,
                        offset: host,
                        segs: piece.to_vec(),
                    }),
                    None => ok = false,
                },
                Mapping::Zero { .. } | Mapping::Eof { .. } if !write => {
                    pieces.push(Piece::Zero(piece.to_vec()))
                }
                _ => ok = false,
            }
            Ok(())
        })?;
        Ok(ok.then_some(pieces))
    }

    /// Bytes a caller moved between a planned `Piece::File` and guest RAM.
    pub fn note_batched(&self, n: u64) {
        self.direct.fetch_add(n, Ordering::Relaxed);
        self.batched.fetch_add(n, Ordering::Relaxed);
    }

    /// Fills a planned `Piece::Zero`'s guest ranges with zeros.
    pub fn zero(&self, map: &MemoryMap, segs: &[Segment]) -> io::Result<()> {
        zero_fill(map, segs)?;
        let n: usize = segs.iter().map(|s| s.len).sum();
        self.zeroed.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Our descriptor of the file behind `storage`, opened once: read-write
    /// if the image is writable and the file lets us (a backing file may
    /// not: then read-only; imago only ever marks the top image's
    /// mappings writable); `None` if imago names no file.
    fn file_of(&self, storage: &ImagoFile) -> io::Result<Option<Arc<File>>> {
        let key = storage as *const ImagoFile as usize;
        let mut files = self.files.lock();
        if let Some(f) = files.get(&key) {
            return Ok(f.clone());
        }
        let f = match storage.get_filename() {
            Some(name) => Some(Arc::new(self.open_file(&name)?)),
            None => None,
        };
        files.insert(key, f.clone());
        Ok(f)
    }

    fn open_file(&self, name: &Path) -> io::Result<File> {
        let open = |write: bool| super::disk::open_noatime(name, write);
        if self.writable {
            open(true).or_else(|_| open(false))
        } else {
            open(false)
        }
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", name.display())))
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.img.read().size()
    }

    /// Reads from `offset` into the guest ranges `segs` (in order).
    pub fn read(&self, map: &MemoryMap, offset: u64, segs: &[Segment]) -> io::Result<usize> {
        let img = self.img.read();
        each_mapping(&img, offset, segs, |m, at, piece| {
            let n: usize = piece.iter().map(|s| s.len).sum();
            match m {
                Mapping::Raw {
                    storage,
                    offset: host,
                    ..
                } => match self.file_of(storage)? {
                    Some(f) => {
                        map.read_file_into(&f, host, piece)?;
                        self.direct.fetch_add(n as u64, Ordering::Relaxed);
                        Ok(())
                    }
                    None => self.bounce_read(&img, map, at, piece),
                },
                // Eof cannot follow a bounds-checked request; zeros if it does.
                Mapping::Zero { .. } | Mapping::Eof { .. } => self.zero(map, piece),
                _ => self.bounce_read(&img, map, at, piece),
            }
        })
    }

    /// Writes the guest ranges `segs` (in order) at `offset`.
    pub fn write(&self, map: &MemoryMap, offset: u64, segs: &[Segment]) -> io::Result<usize> {
        let img = self.img.read();
        each_mapping(&img, offset, segs, |m, at, piece| match m {
            // Allocated in this image and writable: in place.
            Mapping::Raw {
                storage,
                offset: host,
                writable: true,
                ..
            } => match self.file_of(storage)? {
                Some(f) => {
                    let n = map.write_file_from(&f, host, piece)?;
                    self.direct.fetch_add(n as u64, Ordering::Relaxed);
                    Ok(())
                }
                None => self.bounce_write(&img, map, at, piece),
            },
            Mapping::Eof { .. } => Err(io::Error::other("qcow2: write past the image's end")),
            _ => self.bounce_write(&img, map, at, piece),
        })
    }

    /// Reads through imago into a buffer, then into guest RAM.
    fn bounce_read(
        &self,
        img: &FormatAccess<ImagoFile>,
        map: &MemoryMap,
        offset: u64,
        segs: &[Segment],
    ) -> io::Result<()> {
        let mut buf = vec![0u8; segs.iter().map(|s| s.len).sum()];
        img.read(&mut buf, offset)?;
        let mem = map.guest_memory();
        let mut pos = 0;
        for s in segs {
            mem.write_slice(&buf[pos..pos + s.len], s.gpa)
                .map_err(io::Error::other)?;
            pos += s.len;
        }
        self.bounced.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Copies guest RAM into a buffer and writes it through imago.
    fn bounce_write(
        &self,
        img: &FormatAccess<ImagoFile>,
        map: &MemoryMap,
        offset: u64,
        segs: &[Segment],
    ) -> io::Result<()> {
        let mut buf = vec![0u8; segs.iter().map(|s| s.len).sum()];
        let mem = map.guest_memory();
        let mut pos = 0;
        for s in segs {
            mem.read_slice(&mut buf[pos..pos + s.len], s.gpa)
                .map_err(io::Error::other)?;
            pos += s.len;
        }
        img.write(&buf, offset)?;
        self.bounced.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Writes imago's cached metadata to the file and makes it durable.
    pub fn flush(&self) -> io::Result<()> {
        let img = self.img.read();
        img.flush()?;
        img.sync()
    }

    /// Discards `len` bytes from `offset` (they read as zeros after).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.img.write().discard_to_zero(offset, len)
    }
}

/// The bytes `segs` cover (refused past the merge limit, 4 MiB of pages).
fn total(segs: &[Segment]) -> io::Result<usize> {
    let n: usize = segs.iter().map(|s| s.len).sum();
    if n > gpc::MAX_IO_PIECES * 4096 {
        return Err(io::Error::other("I/O larger than the merge limit"));
    }
    Ok(n)
}

/// Walks imago's mappings of the image bytes from `offset` that `segs`
/// cover: `f` gets each mapping, its image offset and the guest ranges it
/// covers (all the rest for a zero-length one, the end of the image).
/// Returns the bytes covered.
fn each_mapping(
    img: &FormatAccess<ImagoFile>,
    offset: u64,
    segs: &[Segment],
    mut f: impl FnMut(Mapping<'_, ImagoFile>, u64, &[Segment]) -> io::Result<()>,
) -> io::Result<usize> {
    let total = total(segs)?;
    let mut done = 0usize;
    while done < total {
        let at = offset + done as u64;
        let (m, len) = img.get_mapping(at, (total - done) as u64)?;
        let len = match (len as usize).min(total - done) {
            0 => total - done,
            n => n,
        };
        f(m, at, &window(segs, done, len))?;
        done += len;
    }
    Ok(total)
}

/// The part of `segs` (taken as one byte stream) from byte `from`, `len`
/// bytes long (shorter if `segs` end first).
fn window(segs: &[Segment], from: usize, len: usize) -> Vec<Segment> {
    let mut out = Vec::new();
    let (mut skip, mut want) = (from, len);
    for s in segs {
        if want == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(want);
        out.push(Segment {
            gpa: GuestAddress(s.gpa.0 + skip as u64),
            len: n,
        });
        want -= n;
        skip = 0;
    }
    out
}

/// Fills the guest ranges `segs` with zeros (pages marked dirty).
fn zero_fill(map: &MemoryMap, segs: &[Segment]) -> io::Result<()> {
    static ZEROS: [u8; 4096] = [0; 4096];
    let mem = map.guest_memory();
    for s in segs {
        let mut at = 0;
        while at < s.len {
            let n = (s.len - at).min(ZEROS.len());
            mem.write_slice(&ZEROS[..n], GuestAddress(s.gpa.0 + at as u64))
                .map_err(io::Error::other)?;
            at += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(gpa: u64, len: usize) -> Segment {
        Segment {
            gpa: GuestAddress(gpa),
            len,
        }
    }

    #[test]
    fn window_cuts_the_byte_stream_across_segments() {
        let segs = [seg(0x1000, 512), seg(0x5200, 1024), seg(0x9000, 4096)];
        assert_eq!(window(&segs, 0, 512), [seg(0x1000, 512)]);
        assert_eq!(
            window(&segs, 256, 512),
            [seg(0x1100, 256), seg(0x5200, 256)]
        );
        assert_eq!(
            window(&segs, 1536, 10_000),
            [seg(0x9000, 4096)],
            "clipped at the end"
        );
        assert_eq!(
            window(&segs, 1000, 3000),
            [seg(0x5200 + 488, 536), seg(0x9000, 2464)]
        );
        assert!(window(&segs, 5632, 1).is_empty());
    }
}
