//! The Linux x86 boot protocol for a bzImage, entered at its 64-bit entry.
//!
//! This is the path an unmodified bzImage takes as a Xen PV-on-HVM guest:
//! the protected-mode part of the image (the in-guest decompressor and the
//! compressed kernel) is loaded at its preferred, aligned address, a zero
//! page (`struct boot_params`) describes memory (E820), the command line, the
//! initrd and the ACPI RSDP, and vCPU 0 starts in long mode at
//! `load address + 0x200` (`startup_64`) with RSI pointing at the zero page
//! (Documentation/arch/x86/boot.rst, "64-bit boot protocol").
//! `hardware_subarch` stays 0 (PC): the kernel then detects Xen through
//! CPUID and runs as an HVM guest, not in PVH mode.
//!
//! The structures come from linux-loader's bindgen of `bootparam.h`; its
//! `BzImage` loader copies the protected-mode part. What it does not do
//! (the 64-bit entry checks, placement against `init_size` and the special
//! pages, the zero page itself, the identity map and GDT of the 64-bit
//! entry state) is here. The register state is set by `vm.rs`.

use std::io::Cursor;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::boot::layout;
use crate::boot::E820Entry;

/// Where the setup header starts in the image and in the zero page.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// `"HdrS"`.
const HDR_MAGIC: u32 = 0x5372_6448;
/// The 64-bit entry (and `xloadflags`) exist from protocol 2.12 on.
const MIN_PROTOCOL: u16 = 0x020c;
/// `xloadflags`: the kernel has the 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// `loadflags`: the protected-mode code is loaded at 1 MiB or above.
const LOADED_HIGH: u8 = 1 << 0;
/// `loadflags`: `heap_end_ptr` is valid.
const CAN_USE_HEAP: u8 = 1 << 7;
/// `type_of_loader` for a loader without an assigned id.
const LOADER_UNDEFINED: u8 = 0xff;
/// Offset of `startup_64` from the load address.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// `heap_end_ptr` as boot loaders set it: the end of the real-mode heap
/// (0xfe00 after the setup code) minus 0x200.
const HEAP_END_PTR: u16 = 0xfe00 - 0x200;
/// Entries in `boot_params.e820_table`.
const E820_MAX: usize = 128;
/// The lowest load address we use (the protocol default for a
/// non-relocatable 64-bit kernel is also 16 MiB).
const MIN_LOAD: u64 = 0x100_0000;

/// Selectors of the boot GDT, as the 64-bit protocol requires
/// (`__BOOT_CS`, `__BOOT_DS`).
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
/// The boot GDT: null, null, flat 64-bit code, flat data.
const GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
/// Bytes of identity map: the first 4 GiB (the kernel, zero page, command
/// line and initrd are all below 4 GiB here).
const IDENTITY_MAPPED: u64 = 4 << 30;
/// Page-table entry bits.
const PTE_PRESENT_RW: u64 = 0x3;
const PTE_LARGE: u64 = 0x80;

#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error("not a bzImage (no \"HdrS\" setup header); --boot linux needs a Linux bzImage")]
    NotBzImage,
    #[error("the bzImage is truncated: {0}")]
    Truncated(&'static str),
    #[error("the bzImage uses boot protocol {}.{}; the 64-bit entry needs 2.12 or later", .0 >> 8, .0 & 0xff)]
    OldProtocol(u16),
    #[error("the bzImage's setup header ends at {0:#x}, before the fields of protocol 2.12")]
    ShortHeader(usize),
    #[error("the bzImage has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    No64BitEntry,
    #[error(
        "the bzImage does not load high (loadflags lacks LOADED_HIGH): a zImage is not supported"
    )]
    NotLoadedHigh,
    #[error("the bzImage's kernel_alignment {0:#x} is not a power of two")]
    BadAlignment(u32),
    #[error("the kernel needs {need:#x} bytes at {at:#x} (init_size), but RAM below the special pages ends at {limit:#x}; give the guest more --memory")]
    KernelTooLarge { at: u64, need: u64, limit: u64 },
    #[error("the command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the initrd ({0} bytes) does not fit between the kernel and min(initrd_addr_max, the special pages)")]
    InitrdTooLarge(usize),
    #[error("the E820 map has {0} entries; the zero page holds at most {E820_MAX}")]
    TooManyE820(usize),
    #[error("cannot load the bzImage: {0}")]
    Load(#[from] linux_loader::loader::Error),
    #[error("guest memory access failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A checked bzImage setup header.
#[derive(Debug, Clone, Copy)]
pub struct BzHeader {
    /// The header bytes the image carries, as the zero page's `hdr`.
    pub hdr: setup_header,
    /// Offset of the protected-mode part in the file.
    pub setup_size: usize,
    /// Bytes of protected-mode code in the file.
    pub pm_size: usize,
}

impl BzHeader {
    /// Parses and checks the setup header of `image` for a 64-bit entry.
    pub fn parse(image: &[u8]) -> Result<BzHeader, LinuxBootError> {
        let magic = image.get(0x202..0x206).ok_or(LinuxBootError::NotBzImage)?;
        if magic != HDR_MAGIC.to_le_bytes() {
            return Err(LinuxBootError::NotBzImage);
        }
        // The header ends where the 2-byte jump at 0x200 lands.
        let jump = *image.get(0x201).ok_or(LinuxBootError::NotBzImage)?;
        let hdr_end = 0x202 + usize::from(jump);
        let mut hdr = setup_header::default();
        let n = (hdr_end - SETUP_HEADER_OFFSET).min(hdr.as_slice().len());
        let src = image
            .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + n)
            .ok_or(LinuxBootError::Truncated("setup header"))?;
        hdr.as_mut_slice()[..n].copy_from_slice(src);

        let version = hdr.version;
        if version < MIN_PROTOCOL {
            return Err(LinuxBootError::OldProtocol(version));
        }
        // Protocol 2.12's fields run to 0x268 (`handover_offset`).
        if n < 0x268 - SETUP_HEADER_OFFSET {
            return Err(LinuxBootError::ShortHeader(hdr_end));
        }
        if hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(LinuxBootError::No64BitEntry);
        }
        if hdr.loadflags & LOADED_HIGH == 0 {
            return Err(LinuxBootError::NotLoadedHigh);
        }
        let align = hdr.kernel_alignment;
        if !align.is_power_of_two() {
            return Err(LinuxBootError::BadAlignment(align));
        }
        let setup_sects = match hdr.setup_sects {
            0 => 4,
            s => usize::from(s),
        };
        let setup_size = (setup_sects + 1) * 512;
        let pm_size = image
            .len()
            .checked_sub(setup_size)
            .filter(|&s| s > ENTRY_64_OFFSET as usize)
            .ok_or(LinuxBootError::Truncated("protected-mode kernel"))?;
        Ok(BzHeader {
            hdr,
            setup_size,
            pm_size,
        })
    }

    /// Bytes the kernel needs from its load address on, while it
    /// decompresses and runs (at least the image itself).
    pub fn init_size(&self) -> u64 {
        u64::from(self.hdr.init_size).max(self.pm_size as u64)
    }

    /// The load address: `pref_address` rounded up to `kernel_alignment`
    /// for a relocatable kernel (at least 16 MiB), `pref_address` itself for
    /// one that is not. `limit` is the end of usable low RAM.
    pub fn load_address(&self, limit: u64) -> Result<u64, LinuxBootError> {
        let align = u64::from(self.hdr.kernel_alignment);
        let pref = self.hdr.pref_address;
        let at = if self.hdr.relocatable_kernel != 0 {
            pref.max(MIN_LOAD)
                .checked_next_multiple_of(align)
                .unwrap_or(u64::MAX)
        } else {
            pref
        };
        let need = self.init_size();
        match at.checked_add(need) {
            Some(end) if end <= limit && at >= layout::HIGH_START => Ok(at),
            _ => Err(LinuxBootError::KernelTooLarge { at, need, limit }),
        }
    }

    /// Longest command line (without its NUL) the kernel accepts.
    pub fn cmdline_max(&self) -> usize {
        (self.hdr.cmdline_size as usize).min(layout::CMDLINE_MAX - 1)
    }
}

/// Highest page-aligned address for an initrd of `len` bytes that lies at
/// or above `kernel_end` and ends at or below `limit`.
pub fn place_initrd(len: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    let kernel_end = kernel_end.checked_next_multiple_of(layout::PAGE_SIZE)?;
    let at = limit.checked_sub(len)? & !(layout::PAGE_SIZE - 1);
    (at >= kernel_end).then_some(at)
}

/// What the zero page says besides the copied header.
#[derive(Debug, Clone)]
pub struct ZeroPageParams<'a> {
    pub load_addr: u64,
    pub cmdline_addr: u64,
    /// (address, size) of the initrd.
    pub initrd: Option<(u64, u64)>,
    pub e820: &'a [E820Entry],
    pub rsdp: u64,
}

/// Builds `boot_params` for `h` as a boot loader of the 64-bit protocol does.
pub fn build_zero_page(
    h: &BzHeader,
    p: &ZeroPageParams<'_>,
) -> Result<boot_params, LinuxBootError> {
    if p.e820.len() > E820_MAX {
        return Err(LinuxBootError::TooManyE820(p.e820.len()));
    }
    let mut bp = boot_params {
        hdr: h.hdr,
        ..Default::default()
    };
    bp.hdr.type_of_loader = LOADER_UNDEFINED;
    bp.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    bp.hdr.heap_end_ptr = HEAP_END_PTR;
    bp.hdr.code32_start = p.load_addr as u32;
    bp.hdr.cmd_line_ptr = p.cmdline_addr as u32;
    bp.ext_cmd_line_ptr = (p.cmdline_addr >> 32) as u32;
    let (rd_addr, rd_size) = p.initrd.unwrap_or((0, 0));
    bp.hdr.ramdisk_image = rd_addr as u32;
    bp.hdr.ramdisk_size = rd_size as u32;
    bp.ext_ramdisk_image = (rd_addr >> 32) as u32;
    bp.ext_ramdisk_size = (rd_size >> 32) as u32;
    // PC, not Xen PV / PVH: the kernel must run its HVM guest path.
    bp.hdr.hardware_subarch = 0;
    bp.hdr.hardware_subarch_data = 0;
    bp.acpi_rsdp_addr = p.rsdp;
    for (slot, e) in bp.e820_table.iter_mut().zip(p.e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    bp.e820_entries = p.e820.len() as u8;
    Ok(bp)
}

/// A bzImage loaded for its 64-bit entry.
#[derive(Debug, Clone, Copy)]
pub struct LinuxKernel {
    /// `startup_64`.
    pub entry: u64,
    pub load_addr: u64,
    /// End of the kernel's `init_size` area.
    pub init_end: u64,
    pub zero_page: u64,
    /// (address, size) of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// CR3 of the identity map.
    pub cr3: u64,
    /// Base and limit of the boot GDT.
    pub gdt_base: u64,
    pub gdt_limit: u16,
}

/// Loads `image` with its command line, initrd and zero page into `mem`,
/// and writes the identity map and GDT the 64-bit entry state refers to.
pub fn load_bzimage(
    mem: &crate::GuestMem,
    image: &[u8],
    cmdline: &str,
    initrd: Option<&[u8]>,
    e820: &[E820Entry],
    rsdp: u64,
) -> Result<LinuxKernel, LinuxBootError> {
    let h = BzHeader::parse(image)?;
    if cmdline.len() > h.cmdline_max() {
        return Err(LinuxBootError::CmdlineTooLong {
            len: cmdline.len(),
            max: h.cmdline_max(),
        });
    }
    let limit = layout::low_end(mem);
    let load_addr = h.load_address(limit)?;
    let init_end = load_addr + h.init_size();
    let loaded = BzImage::load(
        mem,
        Some(GuestAddress(load_addr)),
        &mut Cursor::new(image),
        None,
    )?;
    debug_assert_eq!(loaded.kernel_load.0, load_addr);

    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(layout::CMDLINE))?;

    let initrd = match initrd {
        Some(rd) => {
            let len = rd.len() as u64;
            let top = limit.min(u64::from(h.hdr.initrd_addr_max) + 1);
            let at =
                place_initrd(len, init_end, top).ok_or(LinuxBootError::InitrdTooLarge(rd.len()))?;
            mem.write_slice(rd, GuestAddress(at))?;
            Some((at, len))
        }
        None => None,
    };

    let bp = build_zero_page(
        &h,
        &ZeroPageParams {
            load_addr,
            cmdline_addr: layout::CMDLINE,
            initrd,
            e820,
            rsdp,
        },
    )?;
    mem.write_obj(bp, GuestAddress(layout::ZERO_PAGE))?;
    let cr3 = write_identity_map(mem, layout::BOOT_PAGE_TABLES)?;
    let (gdt_base, gdt_limit) = write_boot_gdt(mem, layout::BOOT_GDT)?;
    Ok(LinuxKernel {
        entry: load_addr + ENTRY_64_OFFSET,
        load_addr,
        init_end,
        zero_page: layout::ZERO_PAGE,
        initrd,
        cr3,
        gdt_base,
        gdt_limit,
    })
}

/// Bytes of page tables [`write_identity_map`] writes.
pub const IDENTITY_MAP_BYTES: u64 = (2 + IDENTITY_MAPPED.div_ceil(1 << 30)) * layout::PAGE_SIZE;

/// Writes 4-level page tables at `base` that identity-map the first 4 GiB
/// with 2 MiB pages (PML4, one PDPT, four page directories: 6 pages).
/// Returns the PML4's address (CR3).
pub fn write_identity_map(mem: &crate::GuestMem, base: u64) -> Result<u64, LinuxBootError> {
    let pml4 = base;
    let pdpt = base + layout::PAGE_SIZE;
    let pd0 = base + 2 * layout::PAGE_SIZE;
    let nr_pd = IDENTITY_MAPPED.div_ceil(1 << 30);
    let mut page = vec![0u8; layout::PAGE_SIZE as usize];
    page[..8].copy_from_slice(&(pdpt | PTE_PRESENT_RW).to_le_bytes());
    mem.write_slice(&page, GuestAddress(pml4))?;
    page.fill(0);
    for i in 0..nr_pd {
        let e = (pd0 + i * layout::PAGE_SIZE) | PTE_PRESENT_RW;
        page[i as usize * 8..][..8].copy_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&page, GuestAddress(pdpt))?;
    for i in 0..nr_pd {
        for (j, slot) in page.chunks_exact_mut(8).enumerate() {
            let addr = ((i << 30) + ((j as u64) << 21)) | PTE_PRESENT_RW | PTE_LARGE;
            slot.copy_from_slice(&addr.to_le_bytes());
        }
        mem.write_slice(&page, GuestAddress(pd0 + i * layout::PAGE_SIZE))?;
    }
    Ok(pml4)
}

/// Writes the boot GDT at `at`; returns its base and limit.
pub fn write_boot_gdt(mem: &crate::GuestMem, at: u64) -> Result<(u64, u16), LinuxBootError> {
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(at + i as u64 * 8))?;
    }
    Ok((at, (GDT.len() * 8 - 1) as u16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::{E820_RAM, E820_RESERVED};

    /// A bzImage-shaped file with a protocol-2.15 header like Debian 6.1's.
    fn image() -> Vec<u8> {
        let mut f = vec![0u8; 5 * 512 + 0x1000];
        f[0x1f1] = 4; // setup_sects
        f[0x201] = 0x6a; // jump over the header to 0x26c
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        f[0x211] = LOADED_HIGH;
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        f[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        f[0x234] = 1; // relocatable
        f[0x236..0x238].copy_from_slice(&0x7fu16.to_le_bytes()); // xloadflags
        f[0x238..0x23c].copy_from_slice(&0x7ffu32.to_le_bytes()); // cmdline_size
        f[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        f[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size
        let pm = 5 * 512;
        f[pm + 0x200] = 0xe8; // a marker at startup_64
        f
    }

    fn mem(mib: u64) -> crate::GuestMem {
        crate::GuestMem::from_ranges(&layout::ram_ranges(mib << 20)).unwrap()
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn parse_debian_like_header_fields_read() {
        let h = BzHeader::parse(&image()).unwrap();
        assert_eq!(h.setup_size, 5 * 512);
        assert_eq!(h.pm_size, 0x1000);
        assert_eq!({ h.hdr.version }, 0x20f);
        assert_eq!({ h.hdr.pref_address }, 0x100_0000);
        assert_eq!(h.init_size(), 0x40_0000);
        assert_eq!(h.cmdline_max(), 0x7ff);
        assert_eq!(h.load_address(64 << 20).unwrap(), 0x100_0000);
    }

    #[test]
    fn parse_bad_headers_refused() {
        let mut img = image();
        img[0x202] = b'X';
        assert!(matches!(
            BzHeader::parse(&img),
            Err(LinuxBootError::NotBzImage)
        ));
        let mut img = image();
        img[0x206..0x208].copy_from_slice(&0x20bu16.to_le_bytes());
        assert!(matches!(
            BzHeader::parse(&img),
            Err(LinuxBootError::OldProtocol(0x20b))
        ));
        let mut img = image();
        img[0x236] = 0x7e;
        assert!(matches!(
            BzHeader::parse(&img),
            Err(LinuxBootError::No64BitEntry)
        ));
        let mut img = image();
        img[0x211] = 0;
        assert!(matches!(
            BzHeader::parse(&img),
            Err(LinuxBootError::NotLoadedHigh)
        ));
        let mut img = image();
        img[0x230..0x234].copy_from_slice(&0x30_0000u32.to_le_bytes());
        assert!(matches!(
            BzHeader::parse(&img),
            Err(LinuxBootError::BadAlignment(0x30_0000))
        ));
        // A short jump: the header stops before the 2.12 fields.
        let mut img = image();
        img[0x201] = 0x20;
        assert!(matches!(
            BzHeader::parse(&img),
            Err(LinuxBootError::ShortHeader(0x222))
        ));
    }

    #[test]
    fn parse_truncated_or_garbage_input_refused_without_panic() {
        let img = image();
        for n in [
            0,
            0x1f0,
            0x203,
            0x206,
            0x230,
            0x26b,
            5 * 512,
            5 * 512 + 0x100,
        ] {
            assert!(BzHeader::parse(&img[..n]).is_err(), "{n} bytes");
        }
        // Pseudo-random bytes with the magic planted: any verdict, no panic.
        let mut x = 0x1234_5678u32;
        for len in [0x206usize, 0x300, 0x2000] {
            for _ in 0..200 {
                let mut g: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect();
                g[0x202..0x206].copy_from_slice(b"HdrS");
                if let Ok(h) = BzHeader::parse(&g) {
                    let _ = h.load_address(64 << 20);
                    let _ = h.cmdline_max();
                }
            }
        }
    }

    #[test]
    fn load_address_unaligned_pref_rounded_up_and_room_checked() {
        let mut img = image();
        img[0x258..0x260].copy_from_slice(&0x110_0000u64.to_le_bytes());
        let h = BzHeader::parse(&img).unwrap();
        assert_eq!(h.load_address(64 << 20).unwrap(), 0x120_0000);
        // init_size 4 MiB at 18 MiB needs 22 MiB of RAM.
        assert!(matches!(
            h.load_address(0x150_0000),
            Err(LinuxBootError::KernelTooLarge { .. })
        ));
        assert!(h.load_address(0x160_0000).is_ok());
        let mut img = image();
        img[0x234] = 0; // not relocatable: exactly pref_address
        img[0x258..0x260].copy_from_slice(&0x110_0000u64.to_le_bytes());
        let h = BzHeader::parse(&img).unwrap();
        assert_eq!(h.load_address(64 << 20).unwrap(), 0x110_0000);
        img[0x258..0x260].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(BzHeader::parse(&img)
            .unwrap()
            .load_address(64 << 20)
            .is_err());
    }

    #[test]
    fn place_initrd_highest_page_below_limit_above_kernel() {
        assert_eq!(
            place_initrd(0x1800, 0x100_0000, 0x200_0000),
            Some(0x1ff_e000)
        );
        assert_eq!(place_initrd(0x1000, 0x1ff_f001, 0x200_0000), None);
        assert_eq!(
            place_initrd(0x1000, 0x1ff_f000, 0x200_0000),
            Some(0x1ff_f000)
        );
        assert_eq!(place_initrd(u64::MAX, 0, 0x200_0000), None);
        assert_eq!(place_initrd(1, u64::MAX, u64::MAX), None);
    }

    #[test]
    fn build_zero_page_fields_at_abi_offsets() {
        let h = BzHeader::parse(&image()).unwrap();
        let e820 = [
            E820Entry {
                addr: 0,
                size: 0xa_0000,
                kind: E820_RAM,
            },
            E820Entry {
                addr: 0x1_0000_0000,
                size: 0x1000,
                kind: E820_RESERVED,
            },
        ];
        let bp = build_zero_page(
            &h,
            &ZeroPageParams {
                load_addr: 0x100_0000,
                cmdline_addr: 0x7000,
                initrd: Some((0x1_2345_6000, 0x2_0000_0001)),
                e820: &e820,
                rsdp: 0xe_0000,
            },
        )
        .unwrap();
        let b = bp.as_slice();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[0x202..0x206], b"HdrS");
        assert_eq!(b[0x1f1], 4, "setup_sects copied");
        assert_eq!(b[0x210], 0xff, "type_of_loader");
        assert_eq!(b[0x211], LOADED_HIGH | CAN_USE_HEAP, "loadflags");
        assert_eq!(u32_at(b, 0x214), 0x100_0000, "code32_start");
        assert_eq!(u32_at(b, 0x218), 0x2345_6000, "ramdisk_image");
        assert_eq!(u32_at(b, 0x21c), 1, "ramdisk_size");
        assert_eq!(u32_at(b, 0xc0), 1, "ext_ramdisk_image");
        assert_eq!(u32_at(b, 0xc4), 2, "ext_ramdisk_size");
        assert_eq!(
            u16::from_le_bytes([b[0x224], b[0x225]]),
            0xfc00,
            "heap_end_ptr"
        );
        assert_eq!(u32_at(b, 0x228), 0x7000, "cmd_line_ptr");
        assert_eq!(u32_at(b, 0xc8), 0, "ext_cmd_line_ptr");
        assert_eq!(u32_at(b, 0x23c), 0, "hardware_subarch");
        assert_eq!(u64_at(b, 0x70), 0xe_0000, "acpi_rsdp_addr");
        assert_eq!(b[0x1e8], 2, "e820_entries");
        assert_eq!(u64_at(b, 0x2d0 + 20), 0x1_0000_0000, "e820[1].addr");
        assert_eq!(u64_at(b, 0x2d0 + 28), 0x1000, "e820[1].size");
        assert_eq!(u32_at(b, 0x2d0 + 36), E820_RESERVED, "e820[1].type");
        assert_eq!(b[0x1ef], 0, "sentinel");
    }

    #[test]
    fn build_zero_page_too_many_e820_entries_refused() {
        let h = BzHeader::parse(&image()).unwrap();
        let e = vec![
            E820Entry {
                addr: 0,
                size: 1,
                kind: E820_RAM
            };
            129
        ];
        let p = ZeroPageParams {
            load_addr: 0x100_0000,
            cmdline_addr: 0x7000,
            initrd: None,
            e820: &e,
            rsdp: 0,
        };
        assert!(matches!(
            build_zero_page(&h, &p),
            Err(LinuxBootError::TooManyE820(129))
        ));
        assert!(build_zero_page(
            &h,
            &ZeroPageParams {
                e820: &e[..128],
                ..p
            }
        )
        .is_ok());
    }

    #[test]
    fn load_bzimage_kernel_initrd_cmdline_and_zero_page_placed() {
        let m = mem(64);
        let img = image();
        let e820 = layout::e820(&m);
        let rd = vec![0x5au8; 0x3000];
        let k = load_bzimage(&m, &img, "console=hvc0", Some(&rd), &e820, 0xe_0000).unwrap();
        assert_eq!(k.load_addr, 0x100_0000);
        assert_eq!(k.entry, 0x100_0200);
        assert_eq!(m.read_obj::<u8>(GuestAddress(k.entry)).unwrap(), 0xe8);
        let (rd_at, rd_len) = k.initrd.unwrap();
        assert_eq!(rd_len, 0x3000);
        assert!(rd_at >= k.init_end && rd_at + rd_len <= layout::low_end(&m));
        assert_eq!(rd_at % layout::PAGE_SIZE, 0);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(rd_at + 0x2fff)).unwrap(),
            0x5a
        );
        let bp: boot_params = m.read_obj(GuestAddress(k.zero_page)).unwrap();
        assert_eq!({ bp.hdr.ramdisk_image }, rd_at as u32);
        assert_eq!(bp.e820_entries as usize, e820.len());
        let mut c = [0u8; 13];
        m.read_slice(&mut c, GuestAddress(u64::from(bp.hdr.cmd_line_ptr)))
            .unwrap();
        assert_eq!(&c, b"console=hvc0\0");
        // Boot structures do not overlap each other or the kernel.
        let areas = [
            (k.gdt_base, u64::from(k.gdt_limit) + 1),
            (k.zero_page, layout::PAGE_SIZE),
            (layout::CMDLINE, layout::CMDLINE_MAX as u64),
            (k.cr3, IDENTITY_MAP_BYTES),
            (k.load_addr, k.init_end - k.load_addr),
            (rd_at, rd_len),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:x?} {b:x?}");
            }
        }
        assert!(IDENTITY_MAP_BYTES + k.cr3 <= layout::LEGACY_HOLE);
    }

    #[test]
    fn load_bzimage_memory_too_small_or_cmdline_too_long_refused() {
        let img = image();
        let m = mem(16);
        let e820 = layout::e820(&m);
        // 16 MiB load + 4 MiB init_size does not fit in 16 MiB.
        assert!(matches!(
            load_bzimage(&m, &img, "", None, &e820, 0),
            Err(LinuxBootError::KernelTooLarge { .. })
        ));
        let m = mem(24);
        let e820 = layout::e820(&m);
        assert!(matches!(
            load_bzimage(&m, &img, "", Some(&vec![0; 8 << 20]), &e820, 0),
            Err(LinuxBootError::InitrdTooLarge(_))
        ));
        let long = "x".repeat(0x800);
        assert!(matches!(
            load_bzimage(&m, &img, &long, None, &e820, 0),
            Err(LinuxBootError::CmdlineTooLong { max: 0x7ff, .. })
        ));
    }

    #[test]
    fn write_identity_map_translates_first_4g_identically() {
        let m = mem(64);
        let cr3 = write_identity_map(&m, layout::BOOT_PAGE_TABLES).unwrap();
        let walk = |va: u64| -> u64 {
            let rd = |a: u64| m.read_obj::<u64>(GuestAddress(a)).unwrap();
            let l4 = rd(cr3 + ((va >> 39) & 511) * 8);
            assert_eq!(l4 & 1, 1);
            let l3 = rd((l4 & !0xfff) + ((va >> 30) & 511) * 8);
            assert_eq!(l3 & 0x81, 1, "present, not a 1 GiB page");
            let l2 = rd((l3 & !0xfff) + ((va >> 21) & 511) * 8);
            assert_eq!(l2 & 0x83, 0x83);
            (l2 & !0x1f_ffff & 0x000f_ffff_ffff_f000) | (va & 0x1f_ffff)
        };
        for va in [
            0u64,
            0x1234,
            0x100_0200,
            0x3fff_ffff,
            0x4000_0000,
            0xffff_fff8,
        ] {
            assert_eq!(walk(va), va);
        }
        let (base, limit) = write_boot_gdt(&m, layout::BOOT_GDT).unwrap();
        assert_eq!(limit, 31);
        let cs: u64 = m.read_obj(GuestAddress(base + u64::from(BOOT_CS))).unwrap();
        assert_eq!((cs >> 53) & 1, 1, "L bit of __BOOT_CS");
        let ds: u64 = m.read_obj(GuestAddress(base + u64::from(BOOT_DS))).unwrap();
        assert_eq!((ds >> 40) & 0x9a, 0x92, "present writable data");
    }
}
