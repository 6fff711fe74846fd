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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::devices::{Bus, BusDevice, BusError, BusEvent};

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
    /// N LAPIC fixed-IPI round trips vCPU 0 -> vCPU 1 (halted) -> vCPU 0, one ICR
    /// write each way: the floor of [`EVTCHN_ROUND_TRIP`].
    pub const LAPIC_ROUND_TRIP: u32 = 7;
    /// [`LAPIC_ROUND_TRIP`] with vCPU 1 running (spinning with interrupts on).
    pub const LAPIC_ROUND_TRIP_RUNNING: u32 = 8;
    /// [`EVTCHN_ROUND_TRIP`] with vCPU 1 running.
    pub const EVTCHN_ROUND_TRIP_RUNNING: u32 = 9;
    /// N `EVTCHNOP_send`s on vCPU 0's own port, each until its upcall handler ran.
    pub const EVTCHN_SELF: u32 = 10;
    /// N LAPIC self IPIs, each until the handler ran: the floor of [`EVTCHN_SELF`].
    pub const LAPIC_SELF: u32 = 11;
    /// N `VIRQ_TIMER` one-shots 500 us ahead with vCPU 0 halted: the result is the
    /// SUM of their lateness (upcall minus deadline), not the time the loop took.
    pub const TIMER_LATENESS: u32 = 12;
    /// [`TIMER_LATENESS`] with the guest's LAPIC timer (one-shot, in KVM): its floor.
    pub const LAPIC_TIMER_LATENESS: u32 = 13;
    /// [`EVTCHN_SELF`] without Xen: the guest marks its own port pending in shared_info
    /// and sends itself the upcall vector by a LAPIC self IPI (the same handler runs).
    pub const SELF_MARKED_LAPIC: u32 = 14;
}

/// The bench stub's `out` port; the VMM completes the stub's `ret` and does nothing else.
pub const BENCH_STUB_PORT: u16 = 0xe5; // a 4-byte `out` at the hypercall port 0xe1 covers 0xe1..0xe4

/// The ports the test guest's bench mode talks to (see tests/guest):
/// IN 0x511 = command, IN 0x512 = iterations, OUT 0x513 = cycles (low, then
/// high), OUT 0x514 = a bare exit that does nothing.
pub struct BenchPorts {
    /// Set when the VM stops (a guest waiting for a command gives up).
    stopping: Arc<AtomicBool>,
    /// Requests from the benchmark: (command, iterations); taken by the guest.
    pub requests: Mutex<std::collections::VecDeque<(u32, u32)>>,
    pub request_cv: Condvar,
    pending_iters: AtomicU64,
    low: AtomicU64,
    /// Results: elapsed guest TSC cycles per request.
    pub results: Mutex<Vec<u64>>,
    pub results_cv: Condvar,
}

pub const BENCH_CMD: u16 = 0x511;
pub const BENCH_ITERS: u16 = 0x512;
pub const BENCH_RESULT: u16 = 0x513;
pub const BENCH_BARE: u16 = 0x514;

impl BenchPorts {
    pub fn new(stopping: Arc<AtomicBool>) -> Self {
        BenchPorts {
            stopping,
            requests: Default::default(),
            request_cv: Default::default(),
            pending_iters: AtomicU64::new(0),
            low: AtomicU64::new(u64::MAX),
            results: Default::default(),
            results_cv: Default::default(),
        }
    }
}

impl BusDevice for BenchPorts {
    fn read(&self, addr: u64, data: &mut [u8]) {
        let stopping = || self.stopping.load(Ordering::Acquire);
        let port = addr as u16;
        match port {
            BENCH_CMD => {
                let mut q = self.requests.lock();
                // Wait for the benchmark to ask for something (bounded so a
                // guest in bench mode without a driver still ends).
                let deadline = Instant::now() + Duration::from_secs(30);
                while q.is_empty() && !stopping() && Instant::now() < deadline {
                    let slice = Instant::now() + Duration::from_millis(50);
                    self.request_cv.wait_until(&mut q, slice.min(deadline));
                }
                let (cmd, n) = q.pop_front().unwrap_or((0, 0));
                self.pending_iters.store(u64::from(n), Ordering::Relaxed);
                put(data, cmd);
            }
            BENCH_ITERS => put(data, self.pending_iters.load(Ordering::Relaxed) as u32),
            _ => {}
        }
    }

    fn write(&self, addr: u64, data: &[u8]) -> BusEvent {
        match addr as u16 {
            BENCH_BARE => {}
            BENCH_RESULT => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                let v = u64::from(u32::from_le_bytes(b));
                let low = self.low.swap(u64::MAX, Ordering::Relaxed);
                if low == u64::MAX {
                    self.low.store(v, Ordering::Relaxed);
                } else {
                    self.results.lock().push(low | (v << 32));
                    self.results_cv.notify_all();
                }
            }
            _ => {}
        }
        BusEvent::None
    }
}

/// The bench stub's port: the VMM completes the stub's `ret` (see
/// [`BusEvent::StubReturn`]) and does nothing else.
pub struct BenchStub;

impl BusDevice for BenchStub {
    fn read(&self, _: u64, _: &mut [u8]) {}
    fn write(&self, _: u64, _: &[u8]) -> BusEvent {
        BusEvent::StubReturn
    }
}

impl BenchPorts {
    /// Registers the bench ports and the stub port on `pio`.
    pub fn register(self: &Arc<Self>, pio: &Bus) -> Result<(), BusError> {
        // The guest uses 4-byte `in`/`out` at each port: the ranges cover
        // the last port's four bytes (the bus claims whole accesses only).
        pio.insert(
            u64::from(BENCH_CMD),
            u64::from(BENCH_BARE - BENCH_CMD) + 4,
            self.clone(),
        )?;
        pio.insert(u64::from(BENCH_STUB_PORT), 4, Arc::new(BenchStub))
    }
}

fn put(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b[..n]);
}

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
