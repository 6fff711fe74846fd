//! Context-switch records of one thread (`PERF_RECORD_SWITCH`), read from a
//! perf ring buffer mapped into the VMM.
//!
//! One event per vCPU thread, opened by the thread on itself
//! (`pid = 0, cpu = -1`), with `context_switch = 1`, `sample_id_all` and
//! `CLOCK_MONOTONIC` time stamps. Two ways to be woken, chosen by what the
//! host permits ([`PerfMode`]):
//! - [`PerfMode::WakeOnSwitchOut`] (CAP_PERFMON or `perf_event_paranoid` <= 1):
//!   a `PERF_COUNT_SW_CONTEXT_SWITCHES` sample with period 1 and
//!   `wakeup_events = 1` wakes the reader at each switch-out, never at a
//!   switch-in (a wake-up per record would preempt the vCPU it reports on,
//!   and loop);
//! - [`PerfMode::Batched`] (unprivileged, paranoid 2): the dummy event with
//!   `exclude_kernel`, no wake-ups (`wakeup_events = 1` never wakes for
//!   switch records); the reader drains the ring on a timer.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, Ordering};

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_CONTEXT_SWITCHES: u64 = 3;
const PERF_COUNT_SW_DUMMY: u64 = 9;
const PERF_SAMPLE_TID: u64 = 1 << 1;
const PERF_SAMPLE_TIME: u64 = 1 << 2;
const PERF_SAMPLE_CPU: u64 = 1 << 7;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// `PERF_ATTR_SIZE_VER5`: every field this module sets is in it.
const ATTR_SIZE: usize = 112;
const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_SWITCH: u32 = 14;
const MISC_SWITCH_OUT: u16 = 1 << 13;
const MISC_SWITCH_OUT_PREEMPT: u16 = 1 << 14;
/// Offsets in `struct perf_event_mmap_page`.
const MMAP_DATA_HEAD: usize = 1024;
const MMAP_DATA_TAIL: usize = 1032;
const MMAP_DATA_OFFSET: usize = 1040;
const MMAP_DATA_SIZE: usize = 1048;
/// Data pages per ring: 32 KiB, 1024 switch records (the unprivileged
/// `perf_event_mlock_kb` budget is 516 KiB per user).
const DATA_PAGES: usize = 8;

/// How the reader learns that records arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerfMode {
    /// Readable at each switch-out (privileged).
    WakeOnSwitchOut,
    /// Never readable: drain on a timer (unprivileged).
    Batched,
}

impl std::fmt::Display for PerfMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PerfMode::WakeOnSwitchOut => "perf context-switch records, woken at each switch-out",
            PerfMode::Batched => "perf context-switch records, drained every 1 ms (unprivileged)",
        })
    }
}

/// A context switch of the watched thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchKind {
    In,
    OutPreempted,
    OutVoluntary,
}

/// One record of the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Switch {
        kind: SwitchKind,
        /// CLOCK_MONOTONIC ns.
        time_ns: u64,
        cpu: u32,
    },
    /// The kernel dropped this many records (ring full).
    Lost(u64),
}

/// The perf event of one thread and its mapped ring.
pub struct SwitchRing {
    fd: OwnedFd,
    base: *mut u8,
    len: usize,
    data_off: usize,
    data_size: usize,
    pub mode: PerfMode,
}

// SAFETY: `base` is a shared mapping owned by this value (unmapped only on
// drop); the reader is whoever holds `&mut SwitchRing` (callers keep it
// under a lock), the kernel is the only other writer.
unsafe impl Send for SwitchRing {}

fn attr(mode: PerfMode) -> [u8; ATTR_SIZE] {
    let mut a = [0u8; ATTR_SIZE];
    let put32 = |a: &mut [u8; ATTR_SIZE], off: usize, v: u32| {
        a[off..off + 4].copy_from_slice(&v.to_le_bytes())
    };
    let put64 = |a: &mut [u8; ATTR_SIZE], off: usize, v: u64| {
        a[off..off + 8].copy_from_slice(&v.to_le_bytes())
    };
    put32(&mut a, 0, PERF_TYPE_SOFTWARE);
    put32(&mut a, 4, ATTR_SIZE as u32);
    put64(
        &mut a,
        24,
        PERF_SAMPLE_TID | PERF_SAMPLE_TIME | PERF_SAMPLE_CPU,
    );
    // Flag bits (offset 40): exclude_kernel 5, exclude_hv 6, watermark 14,
    // sample_id_all 18, use_clockid 25, context_switch 26.
    let mut flags: u64 = (1 << 18) | (1 << 25) | (1 << 26);
    match mode {
        PerfMode::WakeOnSwitchOut => {
            put64(&mut a, 8, PERF_COUNT_SW_CONTEXT_SWITCHES);
            put64(&mut a, 16, 1); // sample_period
            put32(&mut a, 48, 1); // wakeup_events
        }
        PerfMode::Batched => {
            put64(&mut a, 8, PERF_COUNT_SW_DUMMY);
            flags |= (1 << 5) | (1 << 6) | (1 << 14);
            // wakeup_watermark: more than the ring holds, so never.
            put32(&mut a, 48, (DATA_PAGES * 4096 * 2) as u32);
        }
    }
    put64(&mut a, 40, flags);
    put32(&mut a, 92, libc::CLOCK_MONOTONIC as u32); // clockid
    a
}

impl SwitchRing {
    /// Opens the calling thread's context-switch records in `mode`.
    pub fn open_current_thread(mode: PerfMode) -> io::Result<SwitchRing> {
        let a = attr(mode);
        // SAFETY: perf_event_open reads `size` (ATTR_SIZE) bytes of a valid
        // attribute buffer; pid 0 / cpu -1 = this thread on any CPU, no group.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                a.as_ptr(),
                0 as libc::pid_t,
                -1 as libc::c_int,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor the syscall just returned, owned from here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let len = (1 + DATA_PAGES) * 4096;
        // The metadata page and the ring, read-write so that data_tail can
        // be written back.
        let base = super::map_shared_rw(std::os::fd::AsFd::as_fd(&fd), len)?;
        let mut r = SwitchRing {
            fd,
            base,
            len,
            data_off: 4096,
            data_size: DATA_PAGES * 4096,
            mode,
        };
        let (off, size) = (r.meta_u64(MMAP_DATA_OFFSET), r.meta_u64(MMAP_DATA_SIZE));
        if off != 0 && size != 0 {
            r.data_off = off as usize;
            r.data_size = size as usize;
        }
        Ok(r)
    }

    /// Opens the best mode the host permits for the calling thread.
    pub fn open_best() -> io::Result<SwitchRing> {
        SwitchRing::open_current_thread(PerfMode::WakeOnSwitchOut)
            .or_else(|_| SwitchRing::open_current_thread(PerfMode::Batched))
    }

    fn meta_u64(&self, off: usize) -> u64 {
        // SAFETY: `off` is one of the aligned u64 fields of the metadata page
        // at the start of our live mapping.
        unsafe { self.base.add(off).cast::<u64>().read_volatile() }
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads every record in the ring (oldest first) and frees its space.
    pub fn drain(&mut self, mut f: impl FnMut(Record)) {
        let head = self.meta_u64(MMAP_DATA_HEAD);
        fence(Ordering::Acquire);
        let mut tail = self.meta_u64(MMAP_DATA_TAIL);
        let mut buf = [0u8; 64];
        while tail < head {
            let mut hdr = [0u8; 8];
            self.copy_out(tail, &mut hdr);
            let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
            let misc = u16::from_le_bytes([hdr[4], hdr[5]]);
            let size = u16::from_le_bytes([hdr[6], hdr[7]]) as u64;
            if size < 8 || tail + size > head {
                // A corrupt header: drop the rest rather than loop.
                f(Record::Lost(1));
                tail = head;
                break;
            }
            let n = (size as usize).min(buf.len());
            self.copy_out(tail, &mut buf[..n]);
            let u64_at = |o: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[o..o + 8]);
                u64::from_le_bytes(b)
            };
            match ty {
                // header, {pid, tid}, time, {cpu, res}
                PERF_RECORD_SWITCH if n >= 32 => {
                    let kind = if misc & MISC_SWITCH_OUT == 0 {
                        SwitchKind::In
                    } else if misc & MISC_SWITCH_OUT_PREEMPT != 0 {
                        SwitchKind::OutPreempted
                    } else {
                        SwitchKind::OutVoluntary
                    };
                    f(Record::Switch {
                        kind,
                        time_ns: u64_at(16),
                        cpu: u64_at(24) as u32,
                    });
                }
                // header, id, lost, sample_id
                PERF_RECORD_LOST if n >= 24 => f(Record::Lost(u64_at(16))),
                _ => {} // samples (the wake-up event) and anything else
            }
            tail += size;
        }
        fence(Ordering::Release);
        // SAFETY: data_tail is an aligned u64 of the metadata page of our
        // live, writable mapping; the kernel reads it to find free space.
        unsafe {
            self.base
                .add(MMAP_DATA_TAIL)
                .cast::<u64>()
                .write_volatile(tail)
        };
    }

    /// Copies `out.len()` bytes at ring position `pos` (wrapping).
    fn copy_out(&self, pos: u64, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            let at = self.data_off + ((pos as usize + i) % self.data_size);
            // SAFETY: `at` is inside the data area of our live mapping
            // (data_off + data_size <= len).
            *b = unsafe { self.base.add(at).read_volatile() };
        }
    }
}

impl Drop for SwitchRing {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping of `len` bytes, once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// CLOCK_MONOTONIC now, in ns (the perf records' clock).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The CPU the calling thread runs on.
pub fn current_cpu() -> Option<u32> {
    // SAFETY: no arguments, no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    (c >= 0).then_some(c as u32)
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: no preconditions.
    unsafe { libc::gettid() }
}

/// The best mode this process may use, tried on the calling thread
/// (`None`: perf_event_open is refused; fall back to sampling run_delay).
pub fn probe() -> Result<PerfMode, io::Error> {
    SwitchRing::open_best().map(|r| r.mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_ring_sees_own_sleep_as_voluntary_switch_out_and_in() {
        let mut r = match SwitchRing::open_best() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipping: perf_event_open refused ({e})");
                return;
            }
        };
        let t0 = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut got = Vec::new();
        r.drain(|rec| got.push(rec));
        let outs: Vec<_> = got
            .iter()
            .filter_map(|x| match x {
                Record::Switch {
                    kind: SwitchKind::OutVoluntary,
                    time_ns,
                    ..
                } => Some(*time_ns),
                _ => None,
            })
            .collect();
        assert!(!outs.is_empty(), "no voluntary switch-out seen: {got:?}");
        assert!(outs[0] >= t0, "record time before the sleep started");
        assert!(
            got.iter().any(|x| matches!(
                x,
                Record::Switch {
                    kind: SwitchKind::In,
                    ..
                }
            )),
            "{got:?}"
        );
        // Drained: nothing left.
        let mut again = 0;
        r.drain(|_| again += 1);
        assert!(again <= 2, "ring not freed ({again} records again)");
    }
}
