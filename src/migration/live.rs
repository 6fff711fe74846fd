//! Live migration (issue 15): the parts that need neither KVM nor a running
//! VM. xl's handshake strings, the pre-copy policy (when to stop iterating
//! and pause), a byte-counting, rate-limited writer, the receiver's intake
//! (a live stream's pages land in a staging memfd as they arrive, last copy
//! wins; every other record is kept, in order, in a small "tail" image that
//! `restore::load` then checks like any saved image) and the copy of the
//! staged pages into the new guest's RAM.
//!
//! The stream is an ordinary xl save image (`save` writes the same thing
//! in one pass): xl header with the JSON config, libxl v2, libxc v3 with
//! PAGE_DATA batches repeated for the pages that were written again, as
//! `xl migrate` sends.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::stream::image::{ImageReader, ImageWriter, Item};
use super::stream::libxc::{LibxcHeader, LibxcRecord, PageType, PAGE_SIZE};
use super::stream::libxl::LibxlRecord;
use super::stream::Src;
use crate::GuestMem;

/// The receiver's first words (xl's `migrate_receiver_banner`).
pub const BANNER: &[u8] = b"xl migration receiver ready, send binary domain data.\n";
/// The receiver has the whole domain (xl's `migrate_receiver_ready`).
pub const RECEIVED: &[u8] = b"domain received, ready to unpause\0";
/// The sender lets go (xl's `migrate_permission_to_go`).
pub const CLEARED: &[u8] = b"domain is yours, you are cleared to unpause\0";
/// The receiver's report, followed by one status byte, 0 = running
/// (xl's `migrate_report`).
pub const REPORT: &[u8] = b"my copy unpause results are as follows\0";

/// Why a live migration failed.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The other side said something else than the protocol expects.
    #[error("migration handshake: expected {expected:?}, got {got:?}")]
    Handshake {
        /// What xl's protocol says comes now.
        expected: String,
        /// What came (lossy text).
        got: String,
    },
    /// The transport failed.
    #[error("migration transport: {0}")]
    Io(#[from] std::io::Error),
    /// The stream is malformed or not one xenkvm can take.
    #[error("migration stream: {0}")]
    Stream(String),
}

/// Reads exactly `msg.len()` bytes and checks they are `msg`.
pub fn expect<R: Read>(r: &mut R, msg: &[u8]) -> Result<(), LiveError> {
    let mut got = vec![0u8; msg.len()];
    let mut n = 0;
    while n < got.len() {
        match r.read(&mut got[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if got[..n] != *msg {
        return Err(LiveError::Handshake {
            expected: String::from_utf8_lossy(msg).trim_end_matches('\0').into(),
            got: if n == 0 {
                "end of stream (the other side went away)".into()
            } else {
                String::from_utf8_lossy(&got[..n]).into_owned()
            },
        });
    }
    Ok(())
}

// ------------------------------------------------------------------ policy

/// When pre-copy stops and the guest is paused.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Pause once sending the remaining dirty pages is estimated to take
    /// at most this long.
    pub downtime: Duration,
    /// Pause after this many rounds whatever remains.
    pub max_rounds: u32,
    /// Pause when this many rounds in a row did not shrink the dirty set
    /// by at least 10% (the guest dirties as fast as we send).
    pub stall_rounds: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            downtime: Duration::from_millis(300),
            max_rounds: 30,
            stall_rounds: 3,
        }
    }
}

/// What a round looked like, for the policy and the progress line.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Round {
    /// 1 = the full pass.
    pub n: u32,
    /// Pages sent in it.
    pub pages: u64,
    /// Bytes sent in it.
    pub bytes: u64,
    /// How long it took.
    pub secs: f64,
    /// Pages dirtied while it ran (what the next round must send).
    pub dirty_after: u64,
}

impl Round {
    /// Send rate of this round, bytes/s (at least 1).
    pub fn rate(&self) -> f64 {
        (self.bytes as f64 / self.secs.max(1e-6)).max(1.0)
    }

    /// Pages dirtied per second while it ran.
    pub fn dirty_rate(&self) -> f64 {
        self.dirty_after as f64 / self.secs.max(1e-6)
    }

    /// The estimated pause if the guest were stopped now: the dirty pages
    /// at this round's send rate.
    pub fn est_downtime(&self) -> Duration {
        let bytes = self.dirty_after as f64 * (PAGE_SIZE as f64 + 8.0);
        Duration::from_secs_f64(bytes / self.rate())
    }
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send the dirty pages in another live round.
    Again,
    /// Pause and send the rest: why.
    Stop(StopWhy),
}

/// Why pre-copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhy {
    /// The remainder fits the downtime target.
    Converged,
    /// `max_rounds` reached.
    MaxRounds,
    /// The dirty set stopped shrinking.
    NotConverging,
}

impl std::fmt::Display for StopWhy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopWhy::Converged => "converged",
            StopWhy::MaxRounds => "round limit",
            StopWhy::NotConverging => "not converging",
        })
    }
}

impl Policy {
    /// The decision after `rounds` (the last is the one just finished).
    pub fn next(&self, rounds: &[Round]) -> Next {
        let Some(last) = rounds.last() else {
            return Next::Again;
        };
        if last.dirty_after == 0 || last.est_downtime() <= self.downtime {
            return Next::Stop(StopWhy::Converged);
        }
        if last.n >= self.max_rounds {
            return Next::Stop(StopWhy::MaxRounds);
        }
        let k = self.stall_rounds as usize;
        if k > 0 && rounds.len() > k {
            let tail = &rounds[rounds.len() - k - 1..];
            if tail
                .windows(2)
                .all(|w| w[1].dirty_after * 10 > w[0].dirty_after * 9)
            {
                return Next::Stop(StopWhy::NotConverging);
            }
        }
        Next::Again
    }
}

// --------------------------------------------------------- rate-limited sink

/// A writer that counts bytes and keeps under `limit` bytes/s (0: none).
pub struct Throttled<W> {
    inner: W,
    limit: u64,
    bytes: u64,
    start: Instant,
}

impl<W: Write> Throttled<W> {
    /// Wraps `inner`.
    pub fn new(inner: W, limit: u64) -> Self {
        Throttled {
            inner,
            limit,
            bytes: 0,
            start: Instant::now(),
        }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The rate limit (bytes/s, 0: none).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Counts `n` bytes written through [`get_mut`](Self::get_mut) (only
    /// without a limit: a limited writer must see every byte).
    pub fn count_unlimited(&mut self, n: u64) {
        debug_assert_eq!(self.limit, 0);
        self.bytes += n;
    }
}

impl<W: Write> Write for Throttled<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // At most 64 KiB per call, so the limit is kept smoothly.
        let n = self.inner.write(&buf[..buf.len().min(64 << 10)])?;
        self.bytes += n as u64;
        if self.limit > 0 {
            let due = Duration::from_secs_f64(self.bytes as f64 / self.limit as f64);
            let el = self.start.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

// ------------------------------------------------------------------ receiver

/// A reader that counts bytes and can stop the process at a given count
/// (a test knob: `XENKVM_TEST_RECEIVE_KILL_AT`, bytes, kills the receiver
/// with SIGKILL as a crash or `kill -9` would).
pub struct Counted<R> {
    inner: R,
    /// Bytes read so far.
    pub bytes: u64,
    kill_at: Option<u64>,
}

impl<R: Read> Counted<R> {
    /// Wraps `inner`; `kill_at` as above.
    pub fn new(inner: R, kill_at: Option<u64>) -> Self {
        Counted {
            inner,
            bytes: 0,
            kill_at,
        }
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        if self.kill_at.is_some_and(|k| self.bytes >= k) {
            tracing::warn!(bytes = self.bytes, "test knob: the receiver kills itself");
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
        }
        Ok(n)
    }
}

/// The receiving end of a live stream: a buffered reader over the
/// transport; page data goes through a reused 256 KiB buffer into guest RAM
/// ([`PageIn::read_pages`], [`pagein`](super::pagein): zero pages of fresh
/// frames are not written, the rest with `pwrite`). It counts bytes and can
/// stop the process at a given count (`XENKVM_TEST_RECEIVE_KILL_AT`, as
/// [`Counted`]).
pub struct StreamIn<F> {
    f: F,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// The page data buffer ([`PageIn::read_pages`]).
    pages: Vec<u8>,
    /// Bytes read so far.
    pub bytes: u64,
    kill_at: Option<u64>,
}

impl<F: Read + std::os::fd::AsFd> StreamIn<F> {
    /// Over `f`; `kill_at` as above. The record buffer is small (64 KiB):
    /// reads of page data bigger than it bypass it.
    pub fn new(f: F, kill_at: Option<u64>) -> Self {
        StreamIn {
            f,
            buf: vec![0; 64 << 10],
            pos: 0,
            end: 0,
            pages: vec![0; PAGE_BUF],
            bytes: 0,
            kill_at,
        }
    }

    fn account(&mut self, n: usize) {
        self.bytes += n as u64;
        if self.kill_at.is_some_and(|k| self.bytes >= k) {
            tracing::warn!(bytes = self.bytes, "test knob: the receiver kills itself");
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
        }
    }
}

impl<F: Read + std::os::fd::AsFd> Read for StreamIn<F> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.end {
            if out.len() >= self.buf.len() {
                let n = self.f.read(out)?;
                self.account(n);
                return Ok(n);
            }
            let n = self.f.read(&mut self.buf)?;
            self.pos = 0;
            self.end = n;
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.account(n);
        Ok(n)
    }
}

/// The buffer page data passes through on its way into RAM: small enough
/// to stay in the CPU's cache, large enough for few system calls.
const PAGE_BUF: usize = 256 << 10;

/// A stream source that can put page data into guest RAM.
pub trait PageIn: Read {
    /// Reads exactly the guest ranges `segs`, in order, into `map`'s RAM
    /// ([`pagein::store`](super::pagein::store): all-zero pages of frames
    /// `fresh(pfn)` says were never written are left out). This default
    /// reads through a buffer of its own.
    fn read_pages(
        &mut self,
        map: &gpc::MemoryMap,
        segs: &[gpc::Segment],
        fresh: &dyn Fn(u64) -> bool,
    ) -> std::io::Result<()> {
        let mut buf = vec![0u8; PAGE_BUF];
        read_pages_via(self, &mut buf, map, segs, fresh)
    }
}

/// [`PageIn::read_pages`] through `buf` (a multiple of the page size).
fn read_pages_via<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    map: &gpc::MemoryMap,
    segs: &[gpc::Segment],
    fresh: &dyn Fn(u64) -> bool,
) -> std::io::Result<()> {
    for s in segs {
        let mut at = 0;
        while at < s.len {
            let k = (s.len - at).min(buf.len());
            r.read_exact(&mut buf[..k])?;
            super::pagein::store(map, GuestAddress(s.gpa.0 + at as u64), &buf[..k], fresh)?;
            at += k;
        }
    }
    Ok(())
}

impl PageIn for &[u8] {}

impl<F: Read + std::os::fd::AsFd> PageIn for StreamIn<F> {
    fn read_pages(
        &mut self,
        map: &gpc::MemoryMap,
        segs: &[gpc::Segment],
        fresh: &dyn Fn(u64) -> bool,
    ) -> std::io::Result<()> {
        // What is buffered is copied out first, the rest is read straight
        // into the page buffer (`Read for StreamIn`).
        let mut buf = std::mem::take(&mut self.pages);
        let r = read_pages_via(self, &mut buf, map, segs, fresh);
        self.pages = buf;
        r
    }
}

/// Received guest pages, by frame, in guest RAM of their own (a
/// [`gpc::MemoryMap`] laid out as the new guest's: the VM takes it over as
/// its RAM, [`Staging::take_ram`], instead of copying).
pub struct Staging {
    map: parking_lot::Mutex<Option<gpc::MemoryMap>>,
    /// Frames received (bit per frame).
    have: Vec<u64>,
    /// Guest RAM as (first frame, frames).
    ram: Vec<(u64, u64)>,
    /// Guest RAM as given (start, length).
    ranges: Vec<(u64, u64)>,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("ram", &self.ranges)
            .field("pages", &self.pages())
            .finish()
    }
}

impl Staging {
    /// Staging for a guest whose RAM is `ram` (guest physical (start, len)).
    pub fn new(ram: &[(u64, u64)]) -> std::io::Result<Staging> {
        let regions: Vec<(GuestAddress, u64)> =
            ram.iter().map(|(s, l)| (GuestAddress(*s), *l)).collect();
        let map = gpc::MemoryMap::new(&regions).map_err(std::io::Error::other)?;
        let end = ram.iter().map(|(s, l)| s + l).max().unwrap_or(0);
        Ok(Staging {
            map: parking_lot::Mutex::new(Some(map)),
            have: vec![0; (end / PAGE_SIZE as u64).div_ceil(64) as usize],
            ram: ram
                .iter()
                .map(|(s, l)| (s / PAGE_SIZE as u64, l / PAGE_SIZE as u64))
                .collect(),
            ranges: ram.to_vec(),
        })
    }

    /// Stores one page.
    pub fn put(&mut self, pfn: u64, data: &[u8]) -> Result<(), LiveError> {
        if data.len() != PAGE_SIZE {
            return Err(LiveError::Stream("PAGE_DATA: a partial page".into()));
        }
        self.put_run(pfn, data)
    }

    /// Checks that frames `first..first + n` are RAM.
    fn check_run(&self, first: u64, n: u64) -> Result<(), String> {
        let last = first.saturating_add(n.saturating_sub(1));
        if n == 0 || !self.ram.iter().any(|(f, c)| first >= *f && last < f + c) {
            return Err(format!(
                "PAGE_DATA: pfns {first:#x}-{last:#x} are outside the guest's RAM"
            ));
        }
        Ok(())
    }

    fn mark(&mut self, first: u64, n: u64) {
        for pfn in first..first + n {
            self.have[(pfn / 64) as usize] |= 1 << (pfn % 64);
        }
    }

    /// Stores consecutive pages from frame `first` (`data`: whole pages).
    pub fn put_run(&mut self, first: u64, data: &[u8]) -> Result<(), LiveError> {
        let n = (data.len() / PAGE_SIZE) as u64;
        if n == 0 || data.len() % PAGE_SIZE != 0 {
            return Err(LiveError::Stream("PAGE_DATA: a partial page".into()));
        }
        self.check_run(first, n).map_err(LiveError::Stream)?;
        {
            let g = self.map.lock();
            let map = g
                .as_ref()
                .ok_or_else(|| LiveError::Stream("the staged RAM was handed over".into()))?;
            map.guest_memory()
                .write_slice(data, GuestAddress(first * PAGE_SIZE as u64))
                .map_err(|e| LiveError::Stream(e.to_string()))?;
        }
        self.mark(first, n);
        Ok(())
    }

    /// Reads one PAGE_DATA record's data pages (frames `pfns`, in order)
    /// from `r` straight into the staged RAM. Every frame is checked to be
    /// RAM before anything is read.
    pub fn read_from<P: PageIn + ?Sized>(
        &mut self,
        pfns: &[u64],
        r: &mut P,
    ) -> Result<u64, String> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < pfns.len() {
            let mut j = i + 1;
            while j < pfns.len() && pfns[j] == pfns[j - 1].wrapping_add(1) {
                j += 1;
            }
            self.check_run(pfns[i], (j - i) as u64)?;
            runs.push((pfns[i], (j - i) as u64));
            i = j;
        }
        let segs: Vec<gpc::Segment> = runs
            .iter()
            .map(|(f, n)| {
                gpc::Segment::new(GuestAddress(f * PAGE_SIZE as u64), *n as usize * PAGE_SIZE)
            })
            .collect();
        {
            let g = self.map.lock();
            let map = g.as_ref().ok_or("the staged RAM was handed over")?;
            let have = &self.have;
            let fresh = |pfn: u64| {
                have.get((pfn / 64) as usize)
                    .is_some_and(|w| w & (1 << (pfn % 64)) == 0)
            };
            r.read_pages(map, &segs, &fresh)
                .map_err(|e| e.to_string())?;
        }
        for (f, n) in runs {
            self.mark(f, n);
        }
        Ok(pfns.len() as u64)
    }

    /// Pages received (each counted once).
    pub fn pages(&self) -> u64 {
        self.have.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The staged RAM itself, for a guest whose RAM is laid out as
    /// `ranges` (guest physical (start, len)): it becomes that guest's RAM,
    /// nothing is copied. `None` if the layout differs or it was taken.
    pub fn take_ram(&self, ranges: &[(u64, u64)]) -> Option<gpc::MemoryMap> {
        if ranges != self.ranges.as_slice() {
            return None;
        }
        self.map.lock().take()
    }

    /// Copies every received page into `mem` (runs of frames at a time);
    /// for a guest whose RAM [`take_ram`](Self::take_ram) could not give.
    pub fn copy_into(&self, mem: &GuestMem) -> Result<u64, String> {
        let g = self.map.lock();
        let src = g
            .as_ref()
            .ok_or("the staged RAM was handed over")?
            .guest_memory();
        let mut n = 0;
        let mut buf = vec![0u8; 256 * PAGE_SIZE];
        let total = self.have.len() as u64 * 64;
        let mut pfn = 0u64;
        while pfn < total {
            if self.have[(pfn / 64) as usize] == 0 {
                pfn = (pfn / 64 + 1) * 64;
                continue;
            }
            if self.have[(pfn / 64) as usize] & (1 << (pfn % 64)) == 0 {
                pfn += 1;
                continue;
            }
            let start = pfn;
            while pfn < total
                && pfn - start < 256
                && self.have[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
            {
                pfn += 1;
            }
            let len = ((pfn - start) as usize) * PAGE_SIZE;
            src.read_slice(&mut buf[..len], GuestAddress(start * PAGE_SIZE as u64))
                .map_err(|e| format!("staged pages at pfn {start:#x}: {e}"))?;
            mem.write_slice(&buf[..len], GuestAddress(start * PAGE_SIZE as u64))
                .map_err(|e| format!("guest RAM at pfn {start:#x}: {e}"))?;
            n += pfn - start;
        }
        Ok(n)
    }
}

/// A received stream: its pages staged, its other records as a small
/// image of their own.
#[derive(Debug)]
pub struct Received {
    /// The pages.
    pub staging: Staging,
    /// The stream without its pages, as an xl image in a memfd (kept open:
    /// [`Received::tail_path`] names it).
    pub tail: std::fs::File,
    /// Stream bytes read.
    pub bytes: u64,
    /// PAGE_DATA entries with data (a page sent in several rounds counts
    /// each time).
    pub page_records: u64,
}

impl Received {
    /// A path that opens the tail image (`/proc/self/fd/N`).
    pub fn tail_path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.tail.as_raw_fd()))
    }
}

/// The guest RAM ranges the xl header's JSON config describes (memory from
/// `b_info.max_memkb`); `None` without one.
fn ram_of_config(cfg: &[u8]) -> Option<Vec<(u64, u64)>> {
    let v: serde_json::Value = serde_json::from_slice(cfg).ok()?;
    let kb = v["b_info"]["max_memkb"].as_u64()?;
    let mib = kb.div_ceil(1024);
    if !(16..=65536).contains(&mib) {
        return None;
    }
    Some(
        crate::boot::layout::ram_ranges(mib << 20)
            .into_iter()
            .map(|(a, l)| (a.0, l as u64))
            .collect(),
    )
}

/// Reads a live stream from `r` up to its END: pages into a [`Staging`]
/// sized from the xl header's config, everything else into the tail image.
/// Checks the stream's structure as it goes (the tail is checked again,
/// fully, by `restore::load`).
pub fn receive<R: PageIn>(r: R) -> Result<Received, LiveError> {
    let mut rd = ImageReader::new(r);
    let st = |e: super::stream::StreamError| LiveError::Stream(e.to_string());
    let mut staging: Option<Staging> = None;
    let mut config: Option<Vec<u8>> = None;
    let mut header: Option<LibxcHeader> = None;
    let mut records: Vec<LibxcRecord> = Vec::new();
    let mut libxl_tail: Vec<LibxlRecord> = Vec::new();
    let mut page_records = 0u64;
    loop {
        let mut pages = |pfns: &[(u64, PageType)],
                         src: &mut Src<R>|
         -> Result<(), super::stream::StreamError> {
            let at = src.offset();
            let bad = |why: String| {
                super::stream::StreamError::invalid("libxc", "record PAGE_DATA", at, why)
            };
            let s = staging
                .as_mut()
                .ok_or_else(|| bad("PAGE_DATA before the xl header's config".into()))?;
            let data: Vec<u64> = pfns
                .iter()
                .filter(|(_, t)| t.has_data())
                .map(|(p, _)| *p)
                .collect();
            let n = s.read_from(&data, src.get_mut()).map_err(bad)?;
            src.count(n * PAGE_SIZE as u64);
            page_records += n;
            Ok(())
        };
        let Some((_, item)) = rd.next_item_with(&mut pages).map_err(st)? else {
            return Err(LiveError::Stream("the stream ended before END".into()));
        };
        match item {
            Item::Xl(x) => {
                let cfg = x.config.ok_or_else(|| {
                    LiveError::Stream("the xl header has no domain config (memory size)".into())
                })?;
                let ram = ram_of_config(&cfg).ok_or_else(|| {
                    LiveError::Stream(
                        "the xl header's config gives no usable b_info.max_memkb".into(),
                    )
                })?;
                staging = Some(Staging::new(&ram)?);
                config = Some(cfg);
            }
            Item::LibxlHeader(_) | Item::LibxcEnd => {}
            Item::LibxcHeader(h) => header = Some(h),
            // Its pages are in the staging already.
            Item::Libxc(LibxcRecord::PageData(_)) => {}
            Item::Libxc(LibxcRecord::Checkpoint) => {
                return Err(LiveError::Stream(
                    "a checkpointed (Remus/COLO) stream".into(),
                ))
            }
            Item::Libxc(rec) => records.push(rec),
            Item::Libxl(l) => libxl_tail.push(l),
            Item::End => break,
        }
    }
    let (Some(staging), Some(config), Some(header)) = (staging, config, header) else {
        return Err(LiveError::Stream(
            "an xl image with a libxc stream is needed".into(),
        ));
    };
    let bytes = rd.offset();
    let fd = rustix::fs::memfd_create("xenkvm-migrate-tail", rustix::fs::MemfdFlags::empty())
        .map_err(std::io::Error::from)?;
    let mut tail = std::fs::File::from(fd);
    let cfg = String::from_utf8_lossy(&config).into_owned();
    let mut w = ImageWriter::begin(&mut tail, Some(Some(&cfg)), header)?;
    for rec in &records {
        w.libxc(rec)?;
    }
    w.finish(&libxl_tail)?;
    Ok(Received {
        staging,
        tail,
        bytes,
        page_records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(n: u32, dirty_after: u64, secs: f64) -> Round {
        Round {
            n,
            pages: 1000,
            bytes: 1000 * 4104,
            secs,
            dirty_after,
        }
    }

    #[test]
    fn live_policy_stops_when_the_rest_fits_the_downtime() {
        let p = Policy::default();
        // 4 MB/s; 100 dirty pages take ~0.1 s.
        assert_eq!(
            p.next(&[round(1, 100, 1.0)]),
            Next::Stop(StopWhy::Converged)
        );
        assert_eq!(p.next(&[round(1, 900, 1.0)]), Next::Again);
    }

    #[test]
    fn live_policy_stops_a_guest_that_dirties_as_fast_as_we_send() {
        let p = Policy::default();
        let rs: Vec<Round> = (1..=4).map(|n| round(n, 900, 1.0)).collect();
        assert_eq!(p.next(&rs), Next::Stop(StopWhy::NotConverging));
        let rs: Vec<Round> = (1..=4)
            .map(|n| round(n, 2000 - 300 * n as u64, 1.0))
            .collect();
        assert_eq!(p.next(&rs), Next::Again);
        let rs: Vec<Round> = (1..=30)
            .map(|n| round(n, 5000 - 100 * n as u64, 1.0))
            .collect();
        assert_eq!(p.next(&rs), Next::Stop(StopWhy::MaxRounds));
    }

    #[test]
    fn live_expect_names_what_came_instead() {
        let e = expect(&mut &b"nope"[..], BANNER).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("receiver ready"), "{e}");
        let e = expect(&mut &b""[..], RECEIVED).unwrap_err().to_string();
        assert!(e.contains("went away"), "{e}");
        expect(&mut &BANNER[..], BANNER).unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// A damaged or cut stream is refused (or, if the damage is in page
        /// data, taken): never a panic, never pages outside RAM.
        #[test]
        fn live_receive_damaged_stream_never_panics(
            at in 0usize..200_000,
            xor in 1u8..=255,
            cut in proptest::prelude::any::<bool>(),
        ) {
            let mut b = small_stream();
            let at = at % b.len();
            if cut {
                b.truncate(at);
            } else {
                b[at] ^= xor;
            }
            let _ = receive(&b[..]);
        }
    }

    fn small_stream() -> Vec<u8> {
        use crate::migration::convert::tests::{irqchip, long_mode_vcpu};
        use crate::migration::save::{write_image, SaveMeta};
        let mem = GuestMem::from_ranges(&crate::boot::layout::ram_ranges(16 << 20)).unwrap();
        mem.write_slice(&[0xAB; 64], GuestAddress(0x5000)).unwrap();
        let meta = SaveMeta {
            name: "t".into(),
            mem_mib: 16,
            tsc_khz: 1_000_000,
            system_time_ns: 1_000,
            xen_state: None,
            cpuid: Vec::new(),
        };
        let mut v = Vec::new();
        write_image(
            &mut v,
            &meta,
            1,
            &[(0, long_mode_vcpu(0))],
            &irqchip(),
            &mem,
            &[],
        )
        .unwrap();
        v
    }

    #[test]
    fn live_receive_takes_a_saved_image_and_its_tail_loads() {
        let rx = receive(&small_stream()[..]).unwrap();
        assert_eq!(
            rx.staging.pages(),
            4096 + crate::boot::layout::SPECIAL_PAGES
        );
        let img = crate::migration::restore::load(&rx.tail_path()).unwrap();
        assert_eq!((img.mem_mib, img.vcpus.len(), img.pages), (16, 1, 0));
        let mem = GuestMem::from_ranges(&crate::boot::layout::ram_ranges(16 << 20)).unwrap();
        rx.staging.copy_into(&mem).unwrap();
        let mut b = [0u8; 64];
        mem.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
        assert_eq!(b, [0xAB; 64]);
    }

    #[test]
    fn live_staging_refuses_pages_outside_ram_and_copies_the_rest() {
        let ram = [(0u64, 1u64 << 20)];
        let mut s = Staging::new(&ram).unwrap();
        assert!(s.put(0x100, &[0u8; PAGE_SIZE]).is_err());
        assert!(s.put_run(0xff, &[0u8; 2 * PAGE_SIZE]).is_err());
        s.put(3, &[7u8; PAGE_SIZE]).unwrap();
        s.put(4, &[8u8; PAGE_SIZE]).unwrap();
        s.put(3, &[9u8; PAGE_SIZE]).unwrap(); // last copy wins
        assert_eq!(s.pages(), 2);
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(s.copy_into(&mem).unwrap(), 2);
        let mut b = [0u8; 2];
        mem.read_slice(&mut b[..1], GuestAddress(3 * 4096)).unwrap();
        mem.read_slice(&mut b[1..], GuestAddress(4 * 4096)).unwrap();
        assert_eq!(b, [9, 8]);
    }

    #[test]
    fn live_receive_over_a_socket_stages_what_a_slice_does() {
        let mut b = small_stream();
        let rx0 = receive(&b[..]).unwrap();
        assert_eq!(rx0.bytes, b.len() as u64);
        let (w, r) = std::os::unix::net::UnixStream::pair().unwrap();
        let data = std::mem::take(&mut b);
        let t = std::thread::spawn(move || {
            let mut w = w;
            // Odd pieces: buffered and direct reads both happen.
            for c in data.chunks(77_777) {
                w.write_all(c).unwrap();
            }
            data
        });
        let rx = receive(StreamIn::new(&r, None)).unwrap();
        let data = t.join().unwrap();
        assert_eq!(rx.bytes, data.len() as u64);
        assert_eq!(
            (rx.staging.pages(), rx.page_records),
            (rx0.staging.pages(), rx0.page_records)
        );
        let dump = |rx: &Received| {
            let mem = GuestMem::from_ranges(&crate::boot::layout::ram_ranges(16 << 20)).unwrap();
            rx.staging.copy_into(&mem).unwrap();
            let mut v = vec![0u8; 16 << 20];
            mem.read_slice(&mut v, GuestAddress(0)).unwrap();
            v
        };
        assert!(dump(&rx) == dump(&rx0), "staged RAM differs");
        let ranges: Vec<(u64, u64)> = crate::boot::layout::ram_ranges(16 << 20)
            .into_iter()
            .map(|(a, l)| (a.0, l as u64))
            .collect();
        // The staged RAM is handed over once, and only for its own layout.
        assert!(rx.staging.take_ram(&[(0, 1 << 20)]).is_none());
        let map = rx.staging.take_ram(&ranges).unwrap();
        let mut x = [0u8; 64];
        map.guest_memory()
            .read_slice(&mut x, GuestAddress(0x5000))
            .unwrap();
        assert_eq!(x, [0xAB; 64]);
        assert!(rx.staging.take_ram(&ranges).is_none());
        assert!(rx.staging.copy_into(map.guest_memory()).is_err());
    }
}
