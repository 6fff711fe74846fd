//! PVH boot: load an ELF that carries `XEN_ELFNOTE_PHYS32_ENTRY` at its
//! physical addresses and build the `hvm_start_info` it is entered with.
//!
//! linux-loader's ELF loader handles only ELF64, and XTF images are ELF32
//! (`elf32-x86-64` and `elf32-i386`), so the program headers are read with
//! `goblin`, which parses both classes; the copying is a few lines here.

pub mod acpi;
pub mod bzimage;
pub mod initrd;
pub mod layout;
pub mod linux;

use goblin::elf::{program_header::PT_LOAD, program_header::PT_NOTE, Elf};
use vm_memory::{Bytes, GuestAddress};

/// `XEN_ELFNOTE_PHYS32_ENTRY`.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// `XEN_HVM_START_MAGIC_VALUE`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
/// E820 types used in the memory map.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot parse the kernel as ELF: {0}")]
    Elf(#[from] goblin::error::Error),
    #[error("the kernel has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); xenkvm boots PVH ELF images")]
    NoPvhNote,
    #[error("ELF segment at {addr:#x} (+{len:#x}) does not fit in guest RAM; give the guest more --memory")]
    SegmentOutsideRam { addr: u64, len: u64 },
    #[error("ELF segment file range is outside the file")]
    SegmentOutsideFile,
    #[error("the command line is {0} bytes; at most {max} fit", max = layout::CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("the initrd ({0} bytes) does not fit in guest RAM below the special pages")]
    InitrdTooLarge(usize),
    #[error("guest memory access failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A loaded PVH kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 32-bit protected-mode entry point.
    pub entry: u32,
    /// Lowest and highest (exclusive) physical address loaded.
    pub start: u64,
    pub end: u64,
}

/// Loads the PT_LOAD segments at their physical addresses and returns the
/// PVH entry point.
pub fn load_pvh_elf(mem: &crate::GuestMem, image: &[u8]) -> Result<LoadedKernel, BootError> {
    let elf = Elf::parse(image)?;
    let mut entry = None;
    if let Some(notes) = elf.iter_note_headers(image) {
        for note in notes.flatten() {
            if note.name == "Xen" && note.n_type == XEN_ELFNOTE_PHYS32_ENTRY {
                let d = note.desc;
                entry = match d.len() {
                    4.. => Some(u32::from_le_bytes([d[0], d[1], d[2], d[3]])),
                    _ => None,
                };
            }
        }
    }
    let entry = entry.ok_or(BootError::NoPvhNote)?;
    let (mut start, mut end) = (u64::MAX, 0u64);
    for ph in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
        let addr = ph.p_paddr;
        let fits = addr
            .checked_add(ph.p_memsz)
            .filter(|&e| e <= layout::low_end(mem) && ph.p_filesz <= ph.p_memsz);
        let Some(seg_end) = fits else {
            return Err(BootError::SegmentOutsideRam {
                addr,
                len: ph.p_memsz,
            });
        };
        let off = usize::try_from(ph.p_offset).map_err(|_| BootError::SegmentOutsideFile)?;
        let len = usize::try_from(ph.p_filesz).map_err(|_| BootError::SegmentOutsideFile)?;
        let data = off
            .checked_add(len)
            .and_then(|e| image.get(off..e))
            .ok_or(BootError::SegmentOutsideFile)?;
        mem.write_slice(data, GuestAddress(addr))?;
        let zero_len =
            usize::try_from(ph.p_memsz - ph.p_filesz).map_err(|_| BootError::SegmentOutsideFile)?;
        if zero_len > 0 {
            zero(mem, addr + ph.p_filesz, zero_len)?;
        }
        start = start.min(addr);
        end = end.max(seg_end);
    }
    Ok(LoadedKernel { entry, start, end })
}

fn zero(mem: &crate::GuestMem, addr: u64, len: usize) -> Result<(), BootError> {
    const Z: [u8; 4096] = [0; 4096];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(Z.len());
        mem.write_slice(&Z[..n], GuestAddress(addr + done as u64))?;
        done += n;
    }
    Ok(())
}

/// One E820 / `hvm_memmap_table_entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Writes `hvm_start_info` (version 1), its memory map, command line and
/// the initrd module. Returns the GPA of the start info (EBX at entry).
pub fn write_start_info(
    mem: &crate::GuestMem,
    e820: &[E820Entry],
    cmdline: &str,
    initrd: Option<&[u8]>,
    rsdp: u64,
) -> Result<u64, BootError> {
    if cmdline.len() >= layout::CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(layout::CMDLINE))?;
    for (i, e) in e820.iter().enumerate().take(layout::MEMMAP_MAX) {
        let at = layout::MEMMAP + (i as u64) * 24;
        mem.write_obj(e.addr, GuestAddress(at))?;
        mem.write_obj(e.size, GuestAddress(at + 8))?;
        mem.write_obj(e.kind, GuestAddress(at + 16))?;
        mem.write_obj(0u32, GuestAddress(at + 20))?;
    }
    let mut nr_modules = 0u32;
    if let Some(rd) = initrd {
        // Highest page-aligned spot at the top of low RAM that is above
        // the kernel: guests take their initrd from the module list.
        let top = layout::low_end(mem);
        let len = rd.len() as u64;
        let addr = top
            .checked_sub(len)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= layout::INITRD_MIN)
            .ok_or(BootError::InitrdTooLarge(rd.len()))?;
        mem.write_slice(rd, GuestAddress(addr))?;
        let m = layout::MODLIST;
        mem.write_obj(addr, GuestAddress(m))?;
        mem.write_obj(len, GuestAddress(m + 8))?;
        mem.write_obj(0u64, GuestAddress(m + 16))?;
        mem.write_obj(0u64, GuestAddress(m + 24))?;
        nr_modules = 1;
    }
    let s = layout::START_INFO;
    mem.write_obj(HVM_START_MAGIC, GuestAddress(s))?;
    mem.write_obj(1u32, GuestAddress(s + 4))?; // version
    mem.write_obj(0u32, GuestAddress(s + 8))?; // flags
    mem.write_obj(nr_modules, GuestAddress(s + 12))?;
    mem.write_obj(
        if nr_modules > 0 { layout::MODLIST } else { 0 },
        GuestAddress(s + 16),
    )?;
    mem.write_obj(layout::CMDLINE, GuestAddress(s + 24))?;
    mem.write_obj(rsdp, GuestAddress(s + 32))?;
    mem.write_obj(layout::MEMMAP, GuestAddress(s + 40))?;
    mem.write_obj(
        e820.len().min(layout::MEMMAP_MAX) as u32,
        GuestAddress(s + 48),
    )?;
    mem.write_obj(0u32, GuestAddress(s + 52))?;
    Ok(s)
}

/// Builds a minimal ELF32 with one PT_LOAD segment (`payload` at `load_at`,
/// followed by `bss` zero bytes) and a Xen PVH entry note. For tests and
/// tools that need a tiny guest.
pub fn build_pvh_elf32(entry: u32, load_at: u32, payload: &[u8], bss: u32) -> Vec<u8> {
    let mut f = vec![0u8; 0x100];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 1; // ELFCLASS32
    f[5] = 1; // little endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // EXEC
    f[18..20].copy_from_slice(&3u16.to_le_bytes()); // 386
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..28].copy_from_slice(&entry.to_le_bytes());
    f[28..32].copy_from_slice(&52u32.to_le_bytes()); // phoff
    f[40..42].copy_from_slice(&52u16.to_le_bytes()); // ehsize
    f[42..44].copy_from_slice(&32u16.to_le_bytes()); // phentsize
    f[44..46].copy_from_slice(&2u16.to_le_bytes()); // phnum
    let note_off = 0xc0u32;
    let data_off = 0x100u32;
    let ph = |f: &mut Vec<u8>, at: usize, v: [u32; 8]| {
        for (i, x) in v.iter().enumerate() {
            f[at + i * 4..at + i * 4 + 4].copy_from_slice(&x.to_le_bytes());
        }
    };
    let len = payload.len() as u32;
    ph(
        &mut f,
        52,
        [PT_LOAD, data_off, load_at, load_at, len, len + bss, 7, 4],
    );
    ph(&mut f, 84, [PT_NOTE, note_off, 0, 0, 20, 20, 4, 4]);
    let n = note_off as usize;
    f[n..n + 4].copy_from_slice(&4u32.to_le_bytes());
    f[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes());
    f[n + 8..n + 12].copy_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    f[n + 12..n + 16].copy_from_slice(b"Xen\0");
    f[n + 16..n + 20].copy_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// True if the first bytes look like an ELF image.
pub fn is_elf(image: &[u8]) -> bool {
    image.starts_with(b"\x7fELF")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> crate::GuestMem {
        crate::GuestMem::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn elf32(entry: u32, load_at: u32, payload: &[u8], bss: u32) -> Vec<u8> {
        build_pvh_elf32(entry, load_at, payload, bss)
    }

    #[test]
    fn load_pvh_elf_elf32_segments_loaded_and_bss_zeroed() {
        let m = mem();
        m.write_slice(&[0xaa; 64], GuestAddress(0x100000 + 4))
            .unwrap();
        let k = load_pvh_elf(&m, &elf32(0x100010, 0x100000, &[1, 2, 3, 4], 64)).unwrap();
        assert_eq!(k.entry, 0x100010);
        let mut b = [0u8; 8];
        m.read_slice(&mut b, GuestAddress(0x100000)).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 0, 0, 0, 0]);
        assert_eq!(k.end, 0x100000 + 4 + 64);
    }

    #[test]
    fn load_pvh_elf_segment_beyond_ram_refused() {
        let m = mem();
        let e = load_pvh_elf(&m, &elf32(0x100010, 0xfff_0000, &[1], 0x10_0000)).unwrap_err();
        assert!(matches!(e, BootError::SegmentOutsideRam { .. }), "{e}");
    }

    #[test]
    fn load_pvh_elf_without_note_refused() {
        let m = mem();
        let mut img = elf32(0x100010, 0x100000, &[1], 0);
        img[0xc0 + 8] = 17; // different note type
        assert!(matches!(load_pvh_elf(&m, &img), Err(BootError::NoPvhNote)));
    }

    #[test]
    fn load_pvh_elf_garbage_refused_without_panic() {
        let m = mem();
        for n in [0usize, 4, 52, 200] {
            let mut g = vec![0x41u8; n];
            if n >= 4 {
                g[..4].copy_from_slice(b"\x7fELF");
            }
            assert!(load_pvh_elf(&m, &g).is_err());
        }
    }

    #[test]
    fn write_start_info_fields_at_abi_offsets() {
        let m = mem();
        let e820 = [E820Entry {
            addr: 0,
            size: 16 << 20,
            kind: E820_RAM,
        }];
        let s = write_start_info(&m, &e820, "console=hvc0", Some(&[9u8; 100]), 0xe0000).unwrap();
        assert_eq!(m.read_obj::<u32>(GuestAddress(s)).unwrap(), HVM_START_MAGIC);
        assert_eq!(m.read_obj::<u32>(GuestAddress(s + 12)).unwrap(), 1);
        let cmd = m.read_obj::<u64>(GuestAddress(s + 24)).unwrap();
        let mut c = [0u8; 13];
        m.read_slice(&mut c, GuestAddress(cmd)).unwrap();
        assert_eq!(&c, b"console=hvc0\0");
        assert_eq!(m.read_obj::<u32>(GuestAddress(s + 48)).unwrap(), 1);
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(s + 32)).unwrap(),
            0xe0000,
            "rsdp"
        );
        let modl = m.read_obj::<u64>(GuestAddress(s + 16)).unwrap();
        let rd = m.read_obj::<u64>(GuestAddress(modl)).unwrap();
        assert_eq!(rd & 0xfff, 0);
        assert_eq!(m.read_obj::<u8>(GuestAddress(rd)).unwrap(), 9);
    }
}
