//! A qcow2 image behind a virtual disk, through the `imago` crate (its
//! synchronous build: no async runtime, the queue's I/O thread does the
//! work). The disk's size is the image's virtual size; reads, writes,
//! flushes and discards go through imago, which follows the image's L1/L2
//! tables, allocates clusters, keeps refcounts and opens a backing file the
//! image names.
//!
//! Not zero-copy, unlike raw disks: the data moves through a bounce buffer
//! between imago and guest RAM (`vm_memory::Bytes` on the gpc map, which
//! marks the pages written dirty). imago takes its buffers as Rust slices
//! (`&[u8]`/`&mut [u8]`, or vm-memory slices turned into such slices inside
//! imago); a reference to guest RAM, which the guest may change at any time,
//! is what this VMM never makes (`gpc::fileio` hands the kernel raw iovecs
//! instead), and imago's own conversion would bypass gpc's dirty log. One
//! copy per byte is the cost; a cluster's host offset could be looked up
//! (`FormatAccess::get_mapping`) and served with `preadv` into guest RAM,
//! which is left for later.
//!
//! Metadata updates in imago are serialised by imago itself; discards take
//! the image exclusively (imago requires `&mut` for them, because they may
//! drop clusters a concurrent read is using).

use std::io;
use std::path::Path;

use gpc::{MemoryMap, Segment};
use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};
use parking_lot::RwLock;
use vm_memory::Bytes;

/// An open qcow2 image.
pub struct Qcow2Image {
    img: RwLock<FormatAccess<ImagoFile>>,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image").finish_non_exhaustive()
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
            img: RwLock::new(FormatAccess::new(q)),
        })
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.img.read().size()
    }

    /// Reads from `offset` into the guest ranges `segs` (in order).
    pub fn read(&self, map: &MemoryMap, offset: u64, segs: &[Segment]) -> io::Result<usize> {
        let mut buf = vec![0u8; total(segs)?];
        self.img.read().read(&mut buf, offset)?;
        let mem = map.guest_memory();
        let mut pos = 0;
        for s in segs {
            mem.write_slice(&buf[pos..pos + s.len], s.gpa)
                .map_err(io::Error::other)?;
            pos += s.len;
        }
        Ok(buf.len())
    }

    /// Writes the guest ranges `segs` (in order) at `offset`.
    pub fn write(&self, map: &MemoryMap, offset: u64, segs: &[Segment]) -> io::Result<usize> {
        let mut buf = vec![0u8; total(segs)?];
        let mem = map.guest_memory();
        let mut pos = 0;
        for s in segs {
            mem.read_slice(&mut buf[pos..pos + s.len], s.gpa)
                .map_err(io::Error::other)?;
            pos += s.len;
        }
        self.img.read().write(&buf, offset)?;
        Ok(buf.len())
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
