//! Guest physical memory layout.
//!
//! ```text
//! 0x0000_0000  RAM (low)            real-mode area, boot structures at 0x4000-0xefff
//! 0x000a_0000  reserved             legacy VGA/BIOS hole (e820 reserved, still RAM-backed)
//! 0x0010_0000  RAM                  kernels load here (XTF at 1 MiB, Linux at 16 MiB)
//! low_end      MMIO hole            up to 4 GiB (PCI, IOAPIC, LAPIC), except:
//! 0xfeff_8000  RAM, e820 reserved   Xen's 8 special pages (xenstore ring, console ring, ...)
//! 0x1_0000_0000 RAM (high)          the rest of --memory
//! ```
//!
//! The special pages are where Xen's toolstack puts them for every HVM and
//! PVH guest (libxc's `X86_HVM_END_SPECIAL_REGION` 0xff000, 8 pages, in
//! the order of its `SPECIALPAGE_*`), so that a guest saved or migrated on
//! a Xen host, whose rings stay mapped at these frames across the move,
//! finds them here as RAM, and an image xenkvm writes has Xen's shape. The
//! region is 32 KiB of its own memslot; it is not part of `--memory`.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::{E820Entry, E820_RAM, E820_RESERVED};

pub const PAGE_SIZE: u64 = 4096;
/// The boot GDT of the Linux 64-bit entry (32 bytes).
pub const BOOT_GDT: u64 = 0x4000;
/// The Linux zero page (`boot_params`, 4 KiB).
pub const ZERO_PAGE: u64 = 0x5000;
/// `hvm_start_info`.
pub const START_INFO: u64 = 0x6000;
/// The memory map (24-byte `hvm_memmap_table_entry`s).
pub const MEMMAP: u64 = 0x6100;
pub const MEMMAP_MAX: usize = 32;
/// `hvm_modlist_entry` array.
pub const MODLIST: u64 = 0x6800;
/// Kernel command line.
pub const CMDLINE: u64 = 0x7000;
pub const CMDLINE_MAX: usize = 4096;
/// Top of the stack the Linux 64-bit entry starts with (0x8000-0x8fff).
pub const BOOT_STACK_TOP: u64 = 0x9000;
/// Identity-map page tables of the Linux 64-bit entry (6 pages, to 0xefff).
pub const BOOT_PAGE_TABLES: u64 = 0x9000;
/// Lowest address an initrd may be placed at.
pub const INITRD_MIN: u64 = 0x10_0000;
/// Start of the legacy hole.
pub const LEGACY_HOLE: u64 = 0xa_0000;
/// End of the legacy hole.
pub const HIGH_START: u64 = 0x10_0000;
/// Where low RAM stops at the latest (the PCI/MMIO hole follows).
pub const LOW_RAM_MAX: u64 = 0xc000_0000;
/// 4 GiB: high RAM starts here.
pub const HIGH_RAM_BASE: u64 = 0x1_0000_0000;
/// Initial I/O address of the Xen platform PCI device's BAR0 (0x100 ports);
/// the guest may move it.
pub const PLATFORM_IO_BASE: u16 = 0xc000;
/// Initial address of the Xen platform PCI device's BAR1 (16 MiB, in the MMIO
/// hole below the IOAPIC at 0xfec0_0000 and LAPIC at 0xfee0_0000); the guest
/// may move it and places its grant-table frames there.
pub const PLATFORM_MMIO_BASE: u32 = 0xf000_0000;
/// Last address of the PCI memory window the DSDT gives the root bridge
/// (from [`LOW_RAM_MAX`] to just below the IOAPIC).
pub const PCI_MMIO_END: u32 = 0xfebf_ffff;
/// First special page (Xen's `X86_HVM_END_SPECIAL_REGION` 0xff000 less
/// [`SPECIAL_PAGES`], as a guest-physical address).
pub const SPECIAL_BASE: u64 = 0xfeff_8000;
/// Number of special pages (Xen's `X86_HVM_NR_SPECIAL_PAGES`).
pub const SPECIAL_PAGES: u64 = 8;

/// Index of each special page xenkvm uses (Xen's `SPECIALPAGE_*`: paging 0,
/// access 1, sharing 2, bufioreq 3, xenstore 4, ioreq 5, ident_pt 6,
/// console 7; the others stay zero).
pub mod special {
    /// The xenstore ring (`HVM_PARAM_STORE_PFN`).
    pub const XENSTORE: u64 = 4;
    /// The PV console ring (`HVM_PARAM_CONSOLE_PFN`).
    pub const CONSOLE: u64 = 7;
}

/// RAM ranges (guest base, size) for `mem_bytes` of guest memory, with
/// the special pages' region between low and high RAM.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_bytes.min(LOW_RAM_MAX);
    let mut v = vec![
        (GuestAddress(0), low as usize),
        (
            GuestAddress(SPECIAL_BASE),
            (SPECIAL_PAGES * PAGE_SIZE) as usize,
        ),
    ];
    if mem_bytes > low {
        v.push((GuestAddress(HIGH_RAM_BASE), (mem_bytes - low) as usize));
    }
    v
}

/// End of the RAM region that starts at 0.
pub fn low_end(mem: &crate::GuestMem) -> u64 {
    mem.find_region(GuestAddress(0))
        .map(|r| r.len())
        .unwrap_or(0)
}

/// GPA of special page `idx` (see [`special`]).
pub fn special_page(idx: u64) -> u64 {
    SPECIAL_BASE + idx * PAGE_SIZE
}

/// True if guest frame `pfn` is one of the special pages.
pub fn is_special_pfn(pfn: u64) -> bool {
    (SPECIAL_BASE / PAGE_SIZE..SPECIAL_BASE / PAGE_SIZE + SPECIAL_PAGES).contains(&pfn)
}

/// The guest's E820 map.
pub fn e820(mem: &crate::GuestMem) -> Vec<E820Entry> {
    let low = low_end(mem);
    let mut v = vec![
        E820Entry {
            addr: 0,
            size: LEGACY_HOLE,
            kind: E820_RAM,
        },
        E820Entry {
            addr: LEGACY_HOLE,
            size: HIGH_START - LEGACY_HOLE,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIGH_START,
            size: low - HIGH_START,
            kind: E820_RAM,
        },
    ];
    if mem.find_region(GuestAddress(SPECIAL_BASE)).is_some() {
        v.push(E820Entry {
            addr: SPECIAL_BASE,
            size: SPECIAL_PAGES * PAGE_SIZE,
            kind: E820_RESERVED,
        });
    }
    if let Some(r) = mem.find_region(GuestAddress(HIGH_RAM_BASE)) {
        v.push(E820Entry {
            addr: HIGH_RAM_BASE,
            size: r.len(),
            kind: E820_RAM,
        });
    }
    v
}

/// Whether `gpa` is RAM in [`e820`] (without building the map: asked for
/// every grant a backend maps).
pub fn is_ram(mem: &crate::GuestMem, gpa: u64) -> bool {
    gpa < LEGACY_HOLE
        || (HIGH_START..low_end(mem)).contains(&gpa)
        || (gpa >= HIGH_RAM_BASE
            && mem
                .find_region(GuestAddress(HIGH_RAM_BASE))
                .is_some_and(|r| gpa - HIGH_RAM_BASE < r.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_large_memory_split_around_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].1 as u64, LOW_RAM_MAX);
        assert_eq!(r[1], (GuestAddress(SPECIAL_BASE), 0x8000));
        assert_eq!(r[2].0, GuestAddress(HIGH_RAM_BASE));
        assert_eq!(r[0].1 as u64 + r[2].1 as u64, 4 << 30);
    }

    #[test]
    fn e820_special_pages_reserved_where_xen_puts_them() {
        let m = crate::GuestMem::from_ranges(&ram_ranges(64 << 20)).unwrap();
        let e = e820(&m);
        let last = e.last().unwrap();
        assert_eq!((last.addr, last.size), (0xfeff_8000, 0x8000));
        assert_eq!(last.kind, E820_RESERVED);
        // Xen's HVM_PARAM_STORE_PFN and HVM_PARAM_CONSOLE_PFN of every guest.
        assert_eq!(special_page(special::XENSTORE) >> 12, 0xfeffc);
        assert_eq!(special_page(special::CONSOLE) >> 12, 0xfefff);
        assert!(is_special_pfn(0xfeff8) && is_special_pfn(0xfefff));
        assert!(!is_special_pfn(0xfeff7) && !is_special_pfn(0xff000));
        // All of --memory is RAM to the guest but the legacy hole.
        let ram: u64 = e
            .iter()
            .filter(|x| x.kind == E820_RAM)
            .map(|x| x.size)
            .sum();
        assert_eq!(ram, (64 << 20) - (HIGH_START - LEGACY_HOLE));
        let high = crate::GuestMem::from_ranges(&ram_ranges(4 << 30)).unwrap();
        let e = e820(&high);
        assert!(e.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr));
        assert_eq!(e.last().unwrap().addr, HIGH_RAM_BASE);
    }

    #[test]
    fn is_ram_agrees_with_e820_at_every_boundary() {
        let m = crate::GuestMem::from_ranges(&[
            (GuestAddress(0), 64 << 20),
            (GuestAddress(HIGH_RAM_BASE), 16 << 20),
        ])
        .unwrap();
        let e = e820(&m);
        let in_e820 = |a: u64| {
            e.iter()
                .any(|x| x.kind == E820_RAM && a >= x.addr && a - x.addr < x.size)
        };
        for x in &e {
            for a in [x.addr, x.addr + x.size - 1, x.addr + x.size] {
                for a in [a.saturating_sub(1), a] {
                    assert_eq!(is_ram(&m, a), in_e820(a), "{a:#x}");
                }
            }
        }
        assert!(is_ram(&m, HIGH_RAM_BASE) && !is_ram(&m, HIGH_RAM_BASE + (16 << 20)));
    }
}
