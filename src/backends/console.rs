//! The PV console backend (the guest's `hvc0`).
//!
//! A Xen guest's primary console is a ring page (`HVM_PARAM_CONSOLE_PFN`)
//! with an event channel (`HVM_PARAM_CONSOLE_EVTCHN`), laid out as
//! `struct xencons_interface` (`io/console.h`): `in[1024]` (to the guest),
//! `out[2048]` (from the guest), then the free-running indexes `in_cons`,
//! `in_prod`, `out_cons`, `out_prod` at 0xc00. [`ConsoleBackend::process`]
//! copies what the guest wrote to a writer (stdout, a pty) and feeds queued
//! input into `in[]`. It knows nothing of KVM; the page is reached through
//! [`RingPage`].
//!
//! The indexes are guest-controlled. An output producer more than a ring
//! ahead of the consumer cannot be followed; the backend logs it
//! (rate-limited) and resynchronises by skipping to the producer, so a
//! confused guest loses some output but never stalls or crashes the VMM.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::Write;

use crate::backends::xenstore::{ring_read, ring_write, RateLimiter, RingPage};

/// Layout of `struct xencons_interface`.
pub mod layout {
    /// `in[]`: bytes to the guest.
    pub const IN: usize = 0;
    /// Size of `in[]`.
    pub const IN_SIZE: usize = 1024;
    /// `out[]`: bytes from the guest.
    pub const OUT: usize = 1024;
    /// Size of `out[]`.
    pub const OUT_SIZE: usize = 2048;
    /// `in_cons` (guest-owned).
    pub const IN_CONS: usize = 0xc00;
    /// `in_prod` (backend-owned).
    pub const IN_PROD: usize = 0xc04;
    /// `out_cons` (backend-owned).
    pub const OUT_CONS: usize = 0xc08;
    /// `out_prod` (guest-owned).
    pub const OUT_PROD: usize = 0xc0c;
}

use layout::*;

/// Default bound on input queued for the guest.
pub const DEFAULT_INPUT_LIMIT: usize = 64 * 1024;
/// Rounds of re-reading `out_prod` per `process` call (the guest kicks
/// again for anything it writes later).
const MAX_ROUNDS: usize = 4;

/// Counters for diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    /// Bytes copied from the guest to the writer.
    pub out_bytes: u64,
    /// Bytes delivered into the guest's input ring.
    pub in_bytes: u64,
    /// Input bytes refused because the queue was full.
    pub in_dropped: u64,
    /// Times the guest's indexes were inconsistent.
    pub resyncs: u64,
    /// Writes to the output writer that failed.
    pub write_errors: u64,
}

/// The console backend state: input waiting for room in the guest's ring.
#[derive(Debug)]
pub struct ConsoleBackend {
    input: VecDeque<u8>,
    input_limit: usize,
    stats: ConsoleStats,
    warn: RateLimiter,
}

impl Default for ConsoleBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl ConsoleBackend {
    /// A backend with the default input bound.
    pub fn new() -> Self {
        Self::with_input_limit(DEFAULT_INPUT_LIMIT)
    }

    /// A backend that queues at most `limit` bytes of input.
    pub fn with_input_limit(limit: usize) -> Self {
        ConsoleBackend {
            input: VecDeque::new(),
            input_limit: limit,
            stats: ConsoleStats::default(),
            warn: RateLimiter::default(),
        }
    }

    /// Prepares a fresh console page: all indexes zero. Call once before the
    /// guest starts, not on a restored page.
    pub fn init_page(page: &dyn RingPage) {
        for off in [IN_CONS, IN_PROD, OUT_CONS, OUT_PROD] {
            page.store_u32(off, 0);
        }
    }

    /// Queues console input for the guest; returns how many bytes were
    /// accepted (the rest does not fit the queue). [`process`](Self::process)
    /// moves it into the ring.
    pub fn push_input(&mut self, data: &[u8]) -> usize {
        let n = data
            .len()
            .min(self.input_limit.saturating_sub(self.input.len()));
        self.input.extend(&data[..n]);
        self.stats.in_dropped += (data.len() - n) as u64;
        n
    }

    /// Bytes of input still queued.
    pub fn pending_input(&self) -> usize {
        self.input.len()
    }

    /// Counters.
    pub fn stats(&self) -> ConsoleStats {
        self.stats
    }

    /// Copies the guest's output to `out` and queued input into the guest's
    /// ring. Returns whether the guest must be notified (output consumed or
    /// input delivered).
    pub fn process(&mut self, page: &dyn RingPage, out: &mut dyn Write) -> bool {
        let wrote = self.drain_output(page, out);
        let fed = self.feed_input(page);
        wrote || fed
    }

    fn drain_output(&mut self, page: &dyn RingPage, out: &mut dyn Write) -> bool {
        let mut buf = [0u8; OUT_SIZE];
        let mut any = false;
        for _ in 0..MAX_ROUNDS {
            let prod = page.load_u32(OUT_PROD);
            let cons = page.load_u32(OUT_CONS);
            let avail = prod.wrapping_sub(cons) as usize;
            if avail == 0 {
                break;
            }
            if avail > OUT_SIZE {
                self.stats.resyncs += 1;
                if let Some(suppressed) = self.warn.allow() {
                    tracing::warn!(
                        prod,
                        cons,
                        suppressed,
                        "console: guest output index out of range; output skipped"
                    );
                }
                page.store_u32(OUT_CONS, prod);
                any = true;
                break;
            }
            ring_read(page, OUT, OUT_SIZE, cons, &mut buf[..avail]);
            page.store_u32(OUT_CONS, prod);
            any = true;
            self.stats.out_bytes += avail as u64;
            if out
                .write_all(&buf[..avail])
                .and_then(|()| out.flush())
                .is_err()
            {
                self.stats.write_errors += 1;
                if let Some(suppressed) = self.warn.allow() {
                    tracing::warn!(suppressed, "console: writing guest output failed");
                }
            }
        }
        any
    }

    fn feed_input(&mut self, page: &dyn RingPage) -> bool {
        if self.input.is_empty() {
            return false;
        }
        let cons = page.load_u32(IN_CONS);
        let mut prod = page.load_u32(IN_PROD);
        let mut used = prod.wrapping_sub(cons) as usize;
        if used > IN_SIZE {
            self.stats.resyncs += 1;
            if let Some(suppressed) = self.warn.allow() {
                tracing::warn!(
                    prod,
                    cons,
                    suppressed,
                    "console: guest input index out of range; ring reset"
                );
            }
            prod = cons;
            used = 0;
        }
        let n = (IN_SIZE - used).min(self.input.len());
        if n == 0 {
            return false;
        }
        let chunk: Vec<u8> = self.input.drain(..n).collect();
        ring_write(page, IN, IN_SIZE, prod, &chunk);
        page.store_u32(IN_PROD, prod.wrapping_add(n as u32));
        self.stats.in_bytes += n as u64;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::xenstore::{MemRingPage, PAGE_SIZE};
    use proptest::prelude::*;

    /// The guest's side: writes output, reads input.
    fn guest_write(page: &MemRingPage, data: &[u8]) {
        let prod = page.load_u32(OUT_PROD);
        let cons = page.load_u32(OUT_CONS);
        assert!(prod.wrapping_sub(cons) as usize + data.len() <= OUT_SIZE);
        ring_write(page, OUT, OUT_SIZE, prod, data);
        page.store_u32(OUT_PROD, prod.wrapping_add(data.len() as u32));
    }

    fn guest_read(page: &MemRingPage) -> Vec<u8> {
        let prod = page.load_u32(IN_PROD);
        let cons = page.load_u32(IN_CONS);
        let n = prod.wrapping_sub(cons) as usize;
        assert!(n <= IN_SIZE);
        let mut v = vec![0; n];
        ring_read(page, IN, IN_SIZE, cons, &mut v);
        page.store_u32(IN_CONS, prod);
        v
    }

    #[test]
    fn console_output_copied_to_writer_and_consumed() {
        let page = MemRingPage::new();
        let mut c = ConsoleBackend::new();
        let mut out = Vec::new();
        assert!(!c.process(&page, &mut out), "nothing to do: no notify");
        guest_write(&page, b"Linux version 6.1\n");
        assert!(c.process(&page, &mut out));
        assert_eq!(out, b"Linux version 6.1\n");
        assert_eq!(page.load_u32(OUT_CONS), page.load_u32(OUT_PROD));
        assert_eq!(c.stats().out_bytes, 18);
    }

    #[test]
    fn console_output_across_wrap_is_in_order() {
        let page = MemRingPage::new();
        let start = u32::MAX - 10;
        page.store_u32(OUT_CONS, start);
        page.store_u32(OUT_PROD, start);
        let mut c = ConsoleBackend::new();
        let mut out = Vec::new();
        let mut want = Vec::new();
        for i in 0..20u8 {
            let line: Vec<u8> = (0..200)
                .map(|j| b'a' + ((i as usize + j) % 26) as u8)
                .collect();
            guest_write(&page, &line);
            want.extend_from_slice(&line);
            if i % 3 == 0 {
                c.process(&page, &mut out);
            }
        }
        c.process(&page, &mut out);
        assert_eq!(out, want);
    }

    #[test]
    fn console_full_output_ring_is_drained() {
        let page = MemRingPage::new();
        let mut c = ConsoleBackend::new();
        let data = vec![b'x'; OUT_SIZE];
        guest_write(&page, &data);
        let mut out = Vec::new();
        assert!(c.process(&page, &mut out));
        assert_eq!(out.len(), OUT_SIZE);
    }

    #[test]
    fn console_output_index_too_far_resyncs_without_output() {
        let page = MemRingPage::new();
        page.store_u32(OUT_PROD, OUT_SIZE as u32 + 1);
        let mut c = ConsoleBackend::new();
        let mut out = Vec::new();
        assert!(c.process(&page, &mut out));
        assert!(out.is_empty());
        assert_eq!(page.load_u32(OUT_CONS), OUT_SIZE as u32 + 1);
        assert_eq!(c.stats().resyncs, 1);
        guest_write(&page, b"ok");
        c.process(&page, &mut out);
        assert_eq!(out, b"ok");
    }

    #[test]
    fn console_input_delivered_up_to_ring_space() {
        let page = MemRingPage::new();
        let mut c = ConsoleBackend::new();
        let data: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(c.push_input(&data), 1500);
        let mut sink = Vec::new();
        assert!(c.process(&page, &mut sink));
        assert_eq!(c.pending_input(), 1500 - IN_SIZE);
        assert!(!c.process(&page, &mut sink), "ring full: nothing delivered");
        let mut got = guest_read(&page);
        assert!(c.process(&page, &mut sink));
        got.extend(guest_read(&page));
        assert_eq!(got, data);
        assert_eq!(c.stats().in_bytes, 1500);
    }

    #[test]
    fn console_input_over_limit_is_refused() {
        let mut c = ConsoleBackend::with_input_limit(10);
        assert_eq!(c.push_input(b"0123456"), 7);
        assert_eq!(c.push_input(b"789abc"), 3);
        assert_eq!(c.stats().in_dropped, 3);
    }

    #[test]
    fn console_input_index_corrupt_resets_ring() {
        let page = MemRingPage::new();
        page.store_u32(IN_CONS, 5000);
        let mut c = ConsoleBackend::new();
        c.push_input(b"hi");
        assert!(c.process(&page, &mut Vec::new()));
        assert_eq!(guest_read(&page), b"hi");
        assert_eq!(c.stats().resyncs, 1);
    }

    #[test]
    fn console_writer_error_still_consumes_output() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("closed"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let page = MemRingPage::new();
        let mut c = ConsoleBackend::new();
        guest_write(&page, b"lost");
        assert!(c.process(&page, &mut Broken));
        assert_eq!(page.load_u32(OUT_CONS), 4);
        assert_eq!(c.stats().write_errors, 1);
    }

    proptest! {
        #[test]
        fn prop_console_any_indexes_bounded_and_no_panic(
            bytes in prop::collection::vec(any::<u8>(), PAGE_SIZE),
            out_cons in any::<u32>(),
            out_prod in any::<u32>(),
            in_cons in any::<u32>(),
            in_prod in any::<u32>(),
            input in prop::collection::vec(any::<u8>(), 0..3000),
        ) {
            let page = MemRingPage::from_bytes(&bytes);
            page.store_u32(OUT_CONS, out_cons);
            page.store_u32(OUT_PROD, out_prod);
            page.store_u32(IN_CONS, in_cons);
            page.store_u32(IN_PROD, in_prod);
            let mut c = ConsoleBackend::new();
            c.push_input(&input);
            let mut out = Vec::new();
            c.process(&page, &mut out);
            prop_assert!(out.len() <= OUT_SIZE);
            prop_assert_eq!(page.load_u32(OUT_CONS), out_prod);
            if page.load_u32(IN_PROD) != in_prod {
                // The backend only produces input into a consistent ring.
                let used = page.load_u32(IN_PROD).wrapping_sub(page.load_u32(IN_CONS));
                prop_assert!(used as usize <= IN_SIZE);
                prop_assert!(!input.is_empty());
            }
            let expect = out_prod.wrapping_sub(out_cons) as usize;
            if expect <= OUT_SIZE {
                prop_assert_eq!(out.len(), expect);
            }
        }
    }
}
