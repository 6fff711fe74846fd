//! The host side of a virtual disk: a raw image file or a block device,
//! opened read-only or read-write, with its size in 512-byte sectors.
//! Data moves with `preadv`/`pwritev` straight into and out of guest RAM
//! (`gpc::MemoryMap::read_file_into`/`write_file_from`); flush is
//! `fdatasync`; discard punches a hole (`fallocate(PUNCH_HOLE |
//! KEEP_SIZE)`, which on a block device zeroes the range with the device's
//! discard or write-zeroes).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use gpc::{MemoryMap, Segment};

use super::config::{BlkConfig, DiskFormat};
use super::BlkError;

/// 512-byte sector.
pub const SECTOR: u64 = 512;

/// An opened disk.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
    block_device: bool,
}

impl Disk {
    /// Opens what `cfg` names. A qcow2 image is refused (not supported
    /// yet); a raw image's size must be a multiple of 512 bytes (the tail
    /// is not exposed otherwise).
    pub fn open(cfg: &BlkConfig) -> Result<Disk, BlkError> {
        let err = |source: io::Error| BlkError::Open {
            path: cfg.path.clone(),
            source,
        };
        if cfg.format != DiskFormat::Raw {
            return Err(BlkError::Unsupported(format!(
                "{}: format {} is not supported (only raw)",
                cfg.path.display(),
                cfg.format.name()
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .open(&cfg.path)
            .map_err(err)?;
        let ft = file.metadata().map_err(err)?.file_type();
        let block_device = ft.is_block_device();
        if !block_device && !ft.is_file() {
            return Err(err(io::Error::other("not a regular file or block device")));
        }
        let bytes = (&file).seek(SeekFrom::End(0)).map_err(err)?;
        Ok(Disk {
            file,
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

    /// The open file (for batched I/O).
    pub fn file(&self) -> &File {
        &self.file
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
        map.read_file_into(&self.file, sector * SECTOR, segs)
    }

    /// Writes the guest ranges `segs` at `sector`.
    pub fn write(&self, map: &MemoryMap, sector: u64, segs: &[Segment]) -> io::Result<usize> {
        map.write_file_from(&self.file, sector * SECTOR, segs)
    }

    /// Commits the host's cache for this disk.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Discards `count` sectors from `sector` (they read as zeros after).
    pub fn discard(&self, sector: u64, count: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            sector * SECTOR,
            count * SECTOR,
        )
        .map_err(io::Error::from)
    }
}
