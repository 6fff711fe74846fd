//! The project's own test guest, built from `tests/guest/` by the package's build
//! script (freestanding C and GNU assembly compiled by the system gcc: no bare-metal
//! Rust target is available on the project's machines).
//!
//! It is a PVH kernel (an ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note, loaded at
//! 1 MiB) that finds Xen through CPUID, installs the hypercall page and checks from
//! inside a guest what xenkvm promises. `xenkvm demo` boots it.
//!
//! Output: lines starting with [`LINE_PREFIX`] on `console_io` (port 0xE9 only if that
//! fails), one `xenkvm-guest: check <name> ... ok (<what it saw>)` or
//! `... FAIL (<what it saw>)` per check, then `xenkvm-guest: N checks, M failed` and
//! `Test result: SUCCESS` (then `SCHEDOP_shutdown(poweroff)`) or `Test result: FAILURE`
//! (then `SCHEDOP_shutdown(crash)`). Unexpected exceptions print the vector, RIP and
//! error code and shut down with `crash`.
//!
//! Bench mode (the command line contains [`BENCH_CMDLINE`]): the guest loops reading
//! a command from port 0x511 (`inl`); for a command other than [`bench_cmd::STOP`] it
//! reads the iteration count N from 0x512, runs N iterations between two fenced
//! `rdtsc`s and writes the elapsed TSC cycles to 0x513 (`outl` low 32 bits, then high
//! 32 bits). [`bench_cmd::STOP`] powers the guest off.

/// The test guest's ELF image (PVH entry note, loaded at its physical addresses).
pub static TEST_GUEST_ELF: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/xenkvm-test-guest.elf"));

/// Every line the guest prints itself starts with this (except `Test result: ...`).
pub const LINE_PREFIX: &str = "xenkvm-guest: ";

/// A command line containing this word selects the bench mode.
pub const BENCH_CMDLINE: &str = "bench";

/// Bench-mode commands, read by the guest from port 0x511.
pub mod bench_cmd {
    /// Shut down with `SHUTDOWN_poweroff`.
    pub const STOP: u32 = 0;
    /// N bare I/O exits: `outl(0x514, 0)`.
    pub const IO_EXIT: u32 = 1;
    /// N `xen_version(XENVER_version)` hypercalls through the hypercall page.
    pub const XEN_VERSION: u32 = 2;
    /// N calls into a stub on its own page (shaped like a hypercall stub) that exits to
    /// [`super::BENCH_STUB_PORT`] and returns: a hypercall's footprint without the Xen work.
    pub const STUB_EXIT: u32 = 3;
    /// N `xen_version` calls through a copy of the hypercall stub on the stub page, which
    /// the guest places next to its stack (the hypercall page sits elsewhere).
    pub const STUB_XEN_VERSION: u32 = 4;
    /// N event-channel round trips: vCPU 0 sends to a port bound to vCPU 1, whose
    /// upcall handler sends back to vCPU 0 (needs 2 vCPUs).
    pub const EVTCHN_ROUND_TRIP: u32 = 5;
    /// N SCHEDOP_poll wake-ups: vCPU 1 polls, vCPU 0 sends; the result sums the
    /// times from each send to the poll's return (needs 2 vCPUs).
    pub const POLL_WAKEUP: u32 = 6;
}

/// The bench stub's `out` port; the VMM completes the stub's `ret` and does nothing else.
pub const BENCH_STUB_PORT: u16 = 0xe2;

#[cfg(test)]
mod tests {
    use super::TEST_GUEST_ELF;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// (p_type, p_flags, p_offset, p_paddr, p_filesz, p_memsz) of each program header.
    fn phdrs(elf: &[u8]) -> Vec<(u32, u32, usize, u64, u64, u64)> {
        let (phoff, phentsize, phnum) = (
            u64_at(elf, 0x20) as usize,
            u16_at(elf, 0x36),
            u16_at(elf, 0x38),
        );
        (0..usize::from(phnum))
            .map(|i| {
                let p = phoff + i * usize::from(phentsize);
                let (ty, flags) = (u32_at(elf, p), u32_at(elf, p + 4));
                (
                    ty,
                    flags,
                    u64_at(elf, p + 8) as usize,
                    u64_at(elf, p + 0x18),
                    u64_at(elf, p + 0x20),
                    u64_at(elf, p + 0x28),
                )
            })
            .collect()
    }

    #[test]
    fn test_guest_elf_pvh_note_points_into_executable_segment() {
        const PT_LOAD: u32 = 1;
        const PT_NOTE: u32 = 4;
        const PF_X: u32 = 1;
        let elf = TEST_GUEST_ELF;
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(u16_at(elf, 0x12), 62, "EM_X86_64");

        let ph = phdrs(elf);
        let mut entry = None;
        for &(_, _, off, _, filesz, _) in ph.iter().filter(|p| p.0 == PT_NOTE) {
            let mut n = off;
            while n + 12 <= off + filesz as usize {
                let (namesz, descsz, ty) = (
                    u32_at(elf, n) as usize,
                    u32_at(elf, n + 4) as usize,
                    u32_at(elf, n + 8),
                );
                let name = &elf[n + 12..n + 12 + namesz];
                let desc = n + 12 + namesz.next_multiple_of(4);
                if name == b"Xen\0" && ty == 18 && descsz == 4 {
                    entry = Some(u64::from(u32_at(elf, desc)));
                }
                n = desc + descsz.next_multiple_of(4);
            }
        }
        let entry = entry.expect("a Xen PHYS32_ENTRY note");
        assert_eq!(entry, u64_at(elf, 0x18), "the note agrees with e_entry");
        assert!(
            ph.iter()
                .any(|&(ty, flags, _, paddr, filesz, _)| ty == PT_LOAD
                    && flags & PF_X != 0
                    && (paddr..paddr + filesz).contains(&entry)),
            "entry 0x{entry:x} is in an executable loaded segment"
        );
    }

    #[test]
    fn test_guest_elf_load_segments_start_at_1mib_below_4gib() {
        let loads: Vec<_> = phdrs(TEST_GUEST_ELF)
            .into_iter()
            .filter(|p| p.0 == 1)
            .collect();
        assert!(!loads.is_empty());
        for (_, _, _, paddr, filesz, memsz) in loads {
            assert!(paddr >= 0x10_0000, "segment at 0x{paddr:x} below 1 MiB");
            assert!(
                filesz <= memsz && paddr + memsz <= 1 << 32,
                "segment at 0x{paddr:x} ends above 4 GiB"
            );
        }
    }
}
