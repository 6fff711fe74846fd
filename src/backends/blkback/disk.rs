//! The host side of a virtual disk: a raw image file or a block device,
//! or a qcow2 image (through imago, [`super::qcow2`]), opened read-only or
//! read-write, with its size in 512-byte sectors. For raw disks data moves with `preadv`/`pwritev` straight into and out of guest RAM
//! (`gpc::MemoryMap::read_file_into`/`write_file_from`); flush is
//! `fdatasync`; discard punches a hole (`fallocate(PUNCH_HOLE |
//! KEEP_SIZE)`, which on a block device zeroes the range with the device's
//! discard or write-zeroes). A qcow2 disk moves the clusters it has in its
//! files the same way and the rest through imago (see [`super::qcow2`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use gpc::{MemoryMap, Segment};

use super::config::{BlkConfig, DiskFormat};
use super::qcow2::Qcow2Image;
use super::BlkError;

/// Opens `path` for reading (and writing if `write`) without access-time
/// updates (`O_NOATIME`): a guest's reads say nothing about when the image
/// was last used, and the kernel's atime check is a measurable share of a
/// 4 KiB read from the page cache (about 7 % here). `O_NOATIME` needs the
/// file's owner or `CAP_FOWNER`: refused (`EPERM`), the file is opened
/// without it.
pub(crate) fn open_noatime(path: &std::path::Path, write: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        r => r,
    }
}

/// 512-byte sector.
pub const SECTOR: u64 = 512;

/// An opened disk.
#[derive(Debug)]
pub struct Disk {
    file: File,
    /// The image, when it is qcow2 (`file` is then only held open).
    qcow2: Option<Qcow2Image>,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
    block_device: bool,
}

impl Drop for Disk {
    fn drop(&mut self) {
        if let Some(st) = self.qcow2_stats() {
            tracing::info!(path = %self.path.display(), direct_bytes = st.direct, zeroed_bytes = st.zeroed, bounced_bytes = st.bounced, "qcow2 disk closed");
        }
    }
}

impl Disk {
    /// Opens what `cfg` names. A raw image's size must be a multiple of
    /// 512 bytes (the tail is not exposed otherwise); a qcow2 image must
    /// have a valid header and tables (a missing or corrupt one is refused
    /// with imago's reason).
    pub fn open(cfg: &BlkConfig) -> Result<Disk, BlkError> {
        let err = |source: io::Error| BlkError::Open {
            path: cfg.path.clone(),
            source,
        };
        let file = open_noatime(&cfg.path, !cfg.readonly).map_err(err)?;
        let ft = file.metadata().map_err(err)?.file_type();
        let block_device = ft.is_block_device();
        if !block_device && !ft.is_file() {
            return Err(err(io::Error::other("not a regular file or block device")));
        }
        let (qcow2, bytes) = match cfg.format {
            DiskFormat::Raw => (None, (&file).seek(SeekFrom::End(0)).map_err(err)?),
            DiskFormat::Qcow2 => {
                let img = Qcow2Image::open(&cfg.path, cfg.readonly).map_err(|e| {
                    err(io::Error::new(
                        e.kind(),
                        format!("not a usable qcow2 image: {}", one_line(&e.to_string())),
                    ))
                })?;
                let size = img.size();
                (Some(img), size)
            }
        };
        Ok(Disk {
            file,
            qcow2,
            path: cfg.path.clone(),
            sectors: bytes / SECTOR,
            readonly: cfg.readonly,
            block_device,
        })
    }

    /// Size in 512-byte sectors (`sectors`).
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// A block device rather than a file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The open file, for batched I/O straight to it: `None` for an image
    /// format (its data is not at the guest's offsets).
    pub fn file(&self) -> Option<&File> {
        self.qcow2.is_none().then_some(&self.file)
    }

    /// The file the disk holds open (for a qcow2 disk the image file, whose
    /// data is not at the guest's offsets).
    pub fn held_file(&self) -> &File {
        &self.file
    }

    /// The qcow2 image, when the disk is one.
    pub fn qcow2(&self) -> Option<&Qcow2Image> {
        self.qcow2.as_ref()
    }

    /// A qcow2 image.
    pub fn is_qcow2(&self) -> bool {
        self.qcow2.is_some()
    }

    /// A qcow2 image's byte counts: moved directly between its files and
    /// guest RAM, zero-filled, and through imago's bounce buffer.
    pub fn qcow2_stats(&self) -> Option<super::qcow2::Qcow2Stats> {
        self.qcow2.as_ref().map(|q| q.stats())
    }

    /// Where it is.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Whether `count` sectors from `sector` lie inside the disk.
    pub fn in_range(&self, sector: u64, count: u64) -> bool {
        sector
            .checked_add(count)
            .is_some_and(|end| end <= self.sectors)
    }

    /// Reads from `sector` into the guest ranges `segs`.
    pub fn read(&self, map: &MemoryMap, sector: u64, segs: &[Segment]) -> io::Result<usize> {
        if let Some(q) = &self.qcow2 {
            return q.read(map, sector * SECTOR, segs);
        }
        map.read_file_into(&self.file, sector * SECTOR, segs)
    }

    /// Writes the guest ranges `segs` at `sector`.
    pub fn write(&self, map: &MemoryMap, sector: u64, segs: &[Segment]) -> io::Result<usize> {
        if let Some(q) = &self.qcow2 {
            return q.write(map, sector * SECTOR, segs);
        }
        map.write_file_from(&self.file, sector * SECTOR, segs)
    }

    /// Commits the host's cache for this disk.
    pub fn flush(&self) -> io::Result<()> {
        if let Some(q) = &self.qcow2 {
            return q.flush();
        }
        self.file.sync_data()
    }

    /// Discards `count` sectors from `sector` (they read as zeros after).
    pub fn discard(&self, sector: u64, count: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        if let Some(q) = &self.qcow2 {
            return q.discard(sector * SECTOR, count * SECTOR);
        }
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            sector * SECTOR,
            count * SECTOR,
        )
        .map_err(io::Error::from)
    }
}

/// `s` on one line (imago's errors may carry context over several).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
