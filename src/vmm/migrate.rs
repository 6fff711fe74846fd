//! Live migration between xenkvm processes (issue 15), as `xl migrate`:
//!
//! - [`send`] runs in the source VM's process (the control socket's
//!   `migrate` request brings the transport's file descriptors): KVM dirty
//!   logging on the RAM slots plus the VMM's own dirty bitmap (gpc's; KVM
//!   does not see the VMM's writes), a full pass of guest RAM and rounds of
//!   the pages written since, until the rest fits the downtime target (or
//!   stops shrinking); then pause, the last pages, CPU/irqchip/Xen state
//!   (always with the XENKVM_XEN_STATE record) and END, and xl's handshake:
//!   the source lets go only once the destination says it has the domain;
//!   any failure before that resumes the guest here.
//! - [`client`] is `xenkvm migrate`: it opens the transport (TCP, or a
//!   command's stdin/stdout as `xl migrate`'s ssh), hands it to the VM over
//!   the control socket and shows the progress the VM reports.
//! - [`Incoming`] is the destination's side of the handshake, which the
//!   runner calls between building the received guest and starting it.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::migration::live::{self, Next, Policy, Round, Throttled};
use crate::migration::pageio::{Copying, PageOut, PageSrc};
use crate::migration::save::{config_json, SaveMeta, STREAM_PARAMS, XEN_VERSION};
use crate::migration::stream::image::ImageWriter;
use crate::migration::stream::libxc::{
    LibxcHeader, LibxcRecord, PageType, TscInfo, MAX_BATCH, PAGE_SIZE,
};
use crate::migration::{convert, hvm_context, xenkvm_records};
use crate::vmm::machine::Machine;

/// What `xenkvm migrate` asks for.
#[derive(Debug, Clone)]
pub struct MigrateOpts {
    /// Where to (for messages).
    pub dest: String,
    /// Bytes/s, 0 = unlimited.
    pub bandwidth: u64,
    /// Downtime target.
    pub downtime: Duration,
    /// Round limit.
    pub max_rounds: u32,
    /// Merge the VMM's dirty bitmap (off only to show what it is for).
    pub vmm_dirty: bool,
}

impl MigrateOpts {
    /// As the request line's `key=value` words.
    pub fn to_words(&self) -> String {
        format!(
            "bw={} downtime_ms={} rounds={} vmm_dirty={} dest={}",
            self.bandwidth,
            self.downtime.as_millis(),
            self.max_rounds,
            u8::from(self.vmm_dirty),
            self.dest.replace(char::is_whitespace, "_")
        )
    }

    /// From the request line's words.
    pub fn from_words(s: &str) -> Result<MigrateOpts, String> {
        let mut o = MigrateOpts {
            dest: "?".into(),
            bandwidth: 0,
            downtime: Policy::default().downtime,
            max_rounds: Policy::default().max_rounds,
            vmm_dirty: true,
        };
        for w in s.split_whitespace() {
            let (k, v) = w.split_once('=').ok_or(format!("bad option {w:?}"))?;
            let num = || v.parse::<u64>().map_err(|_| format!("bad number in {w:?}"));
            match k {
                "bw" => o.bandwidth = num()?,
                "downtime_ms" => o.downtime = Duration::from_millis(num()?),
                "rounds" => o.max_rounds = num()?.clamp(1, 1000) as u32,
                "vmm_dirty" => o.vmm_dirty = num()? != 0,
                "dest" => o.dest = v.to_string(),
                _ => return Err(format!("unknown option {k:?}")),
            }
        }
        Ok(o)
    }
}

/// The result of a migration, as the source saw it.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// From the request to the destination's report.
    pub total: Duration,
    /// Rounds, the final (paused) one included.
    pub rounds: u32,
    /// Stream bytes.
    pub bytes: u64,
    /// Pages sent (a page sent in several rounds counts each time).
    pub pages: u64,
    /// From the pause to the destination's "running" report.
    pub downtime: Duration,
    /// Pages sent while paused.
    pub final_pages: u64,
    /// Stream bytes sent while paused: the last pages, then the CPU,
    /// device and Xen state and END.
    pub final_bytes: u64,
    /// From the pause to the last of those bytes flushed.
    pub final_send: Duration,
    /// Why pre-copy ended.
    pub why: String,
    /// From the banner to the last byte of the stream flushed.
    pub stream: Duration,
}

impl Report {
    /// One line, `key=value` words (the control reply; the client parses it).
    pub fn line(&self) -> String {
        format!(
            "migrated total_ms={} stream_ms={} rounds={} bytes={} pages={} downtime_ms={:.1} final_pages={} final_bytes={} final_send_ms={:.1} stop={}",
            self.total.as_millis(),
            self.stream.as_millis(),
            self.rounds,
            self.bytes,
            self.pages,
            self.downtime.as_secs_f64() * 1e3,
            self.final_pages,
            self.final_bytes,
            self.final_send.as_secs_f64() * 1e3,
            self.why.replace(' ', "_")
        )
    }
}

/// How a migration ended.
#[derive(Debug)]
pub enum Outcome {
    /// The destination runs the guest.
    Migrated(Report),
    /// Failed before the source let go: the guest is to run on here.
    Failed(String),
    /// Failed after the source let go and before the destination reported:
    /// the guest may be running there; it stays paused here.
    Ambiguous(String),
}

/// A progress report from the source.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Round (1 = full pass).
    pub round: u32,
    /// Pages of this round sent / to send.
    pub done: u64,
    /// Pages in this round.
    pub of: u64,
    /// Total stream bytes so far.
    pub bytes: u64,
    /// Pages/s the guest dirtied in the previous round.
    pub dirty_rate: f64,
    /// Estimated downtime if paused after the previous round (ms).
    pub est_ms: f64,
    /// Paused (the final round).
    pub paused: bool,
}

impl Progress {
    /// As a `progress ...` line.
    pub fn line(&self) -> String {
        format!(
            "progress round={} done={} of={} bytes={} dirty_rate={:.0} est_ms={:.1} paused={}",
            self.round,
            self.done,
            self.of,
            self.bytes,
            self.dirty_rate,
            self.est_ms,
            u8::from(self.paused)
        )
    }

    /// From a `progress ...` line.
    pub fn parse(l: &str) -> Option<Progress> {
        let mut p = Progress::default();
        for w in l.strip_prefix("progress ")?.split_whitespace() {
            let (k, v) = w.split_once('=')?;
            match k {
                "round" => p.round = v.parse().ok()?,
                "done" => p.done = v.parse().ok()?,
                "of" => p.of = v.parse().ok()?,
                "bytes" => p.bytes = v.parse().ok()?,
                "dirty_rate" => p.dirty_rate = v.parse().ok()?,
                "est_ms" => p.est_ms = v.parse().ok()?,
                "paused" => p.paused = v == "1",
                _ => {}
            }
        }
        Some(p)
    }
}

/// Waits until `fd` is readable (or hung up), checking `alive` every 100 ms.
fn wait_readable(fd: &OwnedFd, timeout: Duration, alive: &dyn Fn() -> bool) -> Result<(), String> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let until = Instant::now() + timeout;
    loop {
        if !alive() {
            return Err("the migrate command went away (interrupted?)".into());
        }
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        let t = Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        match poll(&mut fds, Some(&t)) {
            Ok(n) if n > 0 => return Ok(()),
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        if Instant::now() > until {
            return Err(format!(
                "the destination did not answer within {} s",
                timeout.as_secs()
            ));
        }
    }
}

/// Guest RAM as (start, length) ranges, sorted.
fn ram_ranges(m: &Machine) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = m.mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    v.sort();
    v
}

/// A set of frames, as a bitmap over guest-physical frames.
struct FrameSet {
    words: Vec<u64>,
}

impl FrameSet {
    fn new(end_pfn: u64) -> FrameSet {
        FrameSet {
            words: vec![0; end_pfn.div_ceil(64) as usize],
        }
    }
    fn add(&mut self, pfn: u64) {
        if let Some(w) = self.words.get_mut((pfn / 64) as usize) {
            *w |= 1 << (pfn % 64);
        }
    }
    fn merge_words(&mut self, first_pfn: u64, bits: &[u64]) {
        for (i, w) in bits.iter().enumerate() {
            let mut b = *w;
            while b != 0 {
                let k = b.trailing_zeros() as u64;
                b &= b - 1;
                self.add(first_pfn + i as u64 * 64 + k);
            }
        }
    }
    fn take(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter_mut().enumerate() {
            let mut b = std::mem::take(w);
            while b != 0 {
                let k = b.trailing_zeros() as u64;
                b &= b - 1;
                out.push(i as u64 * 64 + k);
            }
        }
        out
    }
}

/// Sends `pfns` (all in RAM) as PAGE_DATA batches; `hole(pfn)` says a page
/// never held data (sent as zeroes without reading it, which would
/// allocate it). `tick` is called after each batch with the pages sent so
/// far and may abort. The output takes the pages from guest RAM itself
/// ([`SendSink`]: `writev` straight from RAM).
fn send_pages<W: PageOut>(
    img: &mut ImageWriter<W>,
    pfns: &[u64],
    hole: &dyn Fn(u64) -> bool,
    tick: &mut dyn FnMut(u64) -> Result<(), String>,
) -> Result<(), String> {
    let mut batch: Vec<(u64, PageType)> = Vec::with_capacity(MAX_BATCH);
    let mut pages: Vec<PageSrc> = Vec::with_capacity(MAX_BATCH);
    let mut sent = 0u64;
    for chunk in pfns.chunks(MAX_BATCH) {
        batch.clear();
        pages.clear();
        for &pfn in chunk {
            batch.push((pfn, PageType::Normal));
            pages.push(PageSrc {
                pfn,
                zero: hole(pfn),
            });
        }
        img.page_batch(&batch, &pages)
            .map_err(|e| format!("sending pages: {e}"))?;
        sent += chunk.len() as u64;
        tick(sent)?;
    }
    Ok(())
}

/// Where the guest's memfd-backed RAM has holes (pages never written:
/// zeroes, sent without reading them), as of when it was read.
struct Holes(Vec<(u64, u64, Option<crate::migration::save::DataRanges>)>);

impl Holes {
    fn read(m: &Machine) -> Holes {
        Holes(
            m.mem
                .iter()
                .map(|r| {
                    let d = r.file_offset().and_then(|fo| {
                        crate::migration::save::data_ranges(fo.file(), fo.start(), r.len())
                    });
                    (r.start_addr().0, r.len(), d)
                })
                .collect(),
        )
    }

    fn is_hole(&self, pfn: u64) -> bool {
        let gpa = pfn * PAGE_SIZE as u64;
        self.0.iter().any(|(s, l, d)| {
            gpa >= *s
                && gpa < s + l
                && d.as_ref().is_some_and(|d| {
                    let off = gpa - s;
                    let i = d.partition_point(|(a, _)| *a <= off);
                    i == 0 || d[i - 1].1 <= off
                })
        })
    }
}

/// The machine's CPU, irqchip, params and Xen state, read while paused.
struct Tail {
    blob: Vec<u8>,
    params: Vec<(u64, u64)>,
    tsc: TscInfo,
    xen_state: xenkvm_records::XenState,
}

fn read_tail(m: &Machine) -> Result<Tail, String> {
    let mut recs = Vec::new();
    for h in m.vcpus.iter().filter(|h| h.started()) {
        let st = match h.saved_state() {
            Some(Ok(st)) => st,
            Some(Err(e)) => return Err(format!("vCPU {}: {e}", h.id)),
            None => return Err(format!("vCPU {} has no saved state (it stopped)", h.id)),
        };
        let (r, extra) = convert::vcpu_to_records(h.id as u16, &st).map_err(|e| e.to_string())?;
        if extra != convert::EventsExtra::default() {
            tracing::warn!(
                vcpu = h.id,
                ?extra,
                "vCPU event state Xen's CPU record cannot hold is not sent"
            );
        }
        recs.extend(r);
    }
    let irq = m.irq.save_irqchip().map_err(|e| e.to_string())?;
    recs.extend(convert::irqchip_to_records(&irq));
    let blob = hvm_context::build(
        hvm_context::SaveHeader {
            changeset: 0,
            cpuid: 0,
            gtsc_khz: m.clock.tsc_khz,
        },
        recs,
    );
    let params: Vec<(u64, u64)> = STREAM_PARAMS
        .iter()
        .map(|i| (u64::from(*i), m.xen.domain.param(*i).unwrap_or(0)))
        .filter(|(_, v)| *v != 0)
        .collect();
    let (guest_tsc, system_time_ns) = m.clock.now();
    // Everything xenkvm's Xen-state record carries (shared_info and grant
    // pages, areas, xenstore...), as `save --xen-state` writes it.
    let xen_state = m.xen.xen_state(xenkvm_records::ClockState {
        tsc_khz: m.clock.tsc_khz,
        system_time_ns,
        guest_tsc,
    });
    Ok(Tail {
        blob,
        params,
        tsc: TscInfo {
            mode: 0,
            khz: m.clock.tsc_khz,
            nsec: system_time_ns,
            incarnation: 0,
        },
        xen_state,
    })
}

/// Writes guest RAM, region after region, to `path` (the
/// `XENKVM_TEST_MIGRATE_DUMP` test knob: source and destination copies
/// compared byte for byte).
pub fn dump_ram(mem: &crate::GuestMem, path: &std::path::Path) -> Result<(), String> {
    let mut f = BufWriter::new(std::fs::File::create(path).map_err(|e| e.to_string())?);
    let mut regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    regions.sort();
    let mut buf = vec![0u8; 1 << 20];
    for (s, l) in regions {
        let mut at = 0;
        while at < l {
            let n = (l - at).min(buf.len() as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(s + at))
                .map_err(|e| e.to_string())?;
            f.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            at += n as u64;
        }
    }
    f.flush().map_err(|e| e.to_string())
}

/// The live migration of `m` (source side): see the module docs. `rd` and
/// `wr` are the transport; `alive` says whether the requester is still
/// there; `progress` is called a few times a second. The caller resumes
/// the guest after [`Outcome::Failed`] if it was running, and ends it after
/// [`Outcome::Migrated`].
#[allow(clippy::too_many_arguments)]
pub fn send(
    m: &Machine,
    name: &str,
    mem_mib: u64,
    was_paused: bool,
    opts: &MigrateOpts,
    rd: OwnedFd,
    wr: OwnedFd,
    alive: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&Progress),
) -> Outcome {
    let t0 = Instant::now();
    let mut paused_at: Option<Instant> = None;
    let mut report = Report::default();
    let mut held = None;
    let r = send_inner(
        m,
        name,
        mem_mib,
        was_paused,
        opts,
        &rd,
        wr,
        alive,
        progress,
        &mut paused_at,
        &mut report,
        &mut held,
    );
    let downtime = paused_at.map(|t| t.elapsed()).unwrap_or_default();
    if held.is_some() {
        // Failed before the destination took it: the caller resumes the
        // guest and its suspend returns "cancelled".
        crate::vmm::suspend::finish(m, !matches!(r, Ok(()) | Err(SendErr::After(_))));
        tracing::info!("the guest suspended itself for the migration's last round");
    }
    match r {
        Ok(()) => {
            report.total = t0.elapsed();
            report.downtime = downtime;
            Outcome::Migrated(report)
        }
        Err(SendErr::Before(e)) => {
            if paused_at.is_some() && !was_paused {
                tracing::warn!(
                    "migration failed before the destination took the guest: it runs on here"
                );
            }
            Outcome::Failed(e)
        }
        Err(SendErr::After(e)) => Outcome::Ambiguous(e),
    }
}

enum SendErr {
    /// Before the source let go.
    Before(String),
    /// After it did.
    After(String),
}

impl From<String> for SendErr {
    fn from(s: String) -> Self {
        SendErr::Before(s)
    }
}

/// `bpf-direct`'s pages placed over guest RAM go back into it (the guest
/// paused for that if it runs): a migration sends guest RAM itself, and the
/// page under one of those is the guest's page as it was when covered.
fn release_direct_pages(m: &Machine, was_paused: bool) -> Result<(), String> {
    if m.xen.sched_direct_pages() == 0 {
        return Ok(());
    }
    if !was_paused {
        if let Err(e) = m.pause(Duration::from_secs(10)) {
            m.resume();
            return Err(e.to_string());
        }
    }
    let r = m.xen.sched_direct_release();
    if !was_paused {
        m.resume();
    }
    r.map(drop)
}

#[allow(clippy::too_many_arguments)]
fn send_inner(
    m: &Machine,
    name: &str,
    mem_mib: u64,
    was_paused: bool,
    opts: &MigrateOpts,
    rd: &OwnedFd,
    wr: OwnedFd,
    alive: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&Progress),
    paused_at: &mut Option<Instant>,
    report: &mut Report,
    held: &mut Option<u32>,
) -> Result<(), SendErr> {
    let mut rfile = std::fs::File::from(rd.try_clone().map_err(|e| e.to_string())?);
    // The banner: the receiver is there and wants the domain.
    wait_readable(rd, Duration::from_secs(60), alive)?;
    live::expect(&mut rfile, live::BANNER).map_err(|e| e.to_string())?;

    let stream_start = Instant::now();
    tracing::debug!("migration: the receiver is ready, the stream starts");
    release_direct_pages(m, was_paused)?;
    let ram = ram_ranges(m);
    let end_pfn = ram
        .iter()
        .map(|(s, l)| (s + l) / PAGE_SIZE as u64)
        .max()
        .unwrap_or(0);
    let log = crate::kvm::dirty::DirtyLog::start(&m.slots, &ram).map_err(|e| e.to_string())?;
    // From here the VMM's bitmap counts too: drop what it gathered before.
    let _ = m.map.take_dirty();
    let mut dirty = FrameSet::new(end_pfn);
    let collect = |dirty: &mut FrameSet| -> Result<(), String> {
        for (first, bits) in log.take().map_err(|e| e.to_string())? {
            dirty.merge_words(first, &bits);
        }
        let vmm = m.map.take_dirty().map_err(|e| e.to_string())?;
        if opts.vmm_dirty {
            for g in vmm {
                dirty.add(g.0);
            }
        }
        Ok(())
    };

    let meta = SaveMeta {
        name: name.to_string(),
        mem_mib,
        tsc_khz: m.clock.tsc_khz,
        system_time_ns: 0,
        xen_state: None,
        cpuid: m.cpuid_policy.clone(),
    };
    let cfg = config_json(&meta, m.vcpus.len());
    let out = Throttled::new(
        BufWriter::with_capacity(1 << 20, std::fs::File::from(wr)),
        opts.bandwidth,
    );
    let out: Out = Arc::new(Mutex::new(out));
    let sink = SendSink {
        out: out.clone(),
        map: &m.map,
    };
    let mut img = ImageWriter::begin(
        sink,
        Some(Some(&cfg)),
        LibxcHeader::hvm_v3(XEN_VERSION.0, XEN_VERSION.1),
    )
    .map_err(|e| e.to_string())?;
    for r in crate::migration::save::policy_records(&meta.cpuid) {
        img.libxc(&r).map_err(|e| e.to_string())?;
    }
    img.libxc(&LibxcRecord::StaticDataEnd)
        .map_err(|e| e.to_string())?;

    // Pages of memfd-backed RAM never touched are holes: zeroes, not read.
    // Read again for every round: a page first written during the
    // migration is a hole only until then.
    let mut holes = Holes::read(m);
    let policy = Policy {
        downtime: opts.downtime,
        max_rounds: opts.max_rounds,
        ..Policy::default()
    };
    let mut rounds: Vec<Round> = Vec::new();
    let mut pfns: Vec<u64> = ram
        .iter()
        .flat_map(|(s, l)| (s / PAGE_SIZE as u64)..((s + l) / PAGE_SIZE as u64))
        .collect();
    let mut last_tick = Instant::now();
    let why;
    loop {
        let n = rounds.len() as u32 + 1;
        let prev = rounds.last().copied();
        let (b0, t) = (out.lock().bytes(), Instant::now());
        let of = pfns.len() as u64;
        let mut tick = |done: u64| -> Result<(), String> {
            if !alive() {
                return Err("the migrate command went away (interrupted?)".into());
            }
            if last_tick.elapsed() >= Duration::from_millis(200) || done == of {
                last_tick = Instant::now();
                progress(&Progress {
                    round: n,
                    done,
                    of,
                    bytes: out.lock().bytes(),
                    dirty_rate: prev.map_or(0.0, |p| p.dirty_rate()),
                    est_ms: prev.map_or(0.0, |p| p.est_downtime().as_secs_f64() * 1e3),
                    paused: false,
                });
            }
            Ok(())
        };
        send_pages(&mut img, &pfns, &|p| holes.is_hole(p), &mut tick)?;
        collect(&mut dirty)?;
        holes = Holes::read(m);
        pfns = dirty.take();
        let r = Round {
            n,
            pages: of,
            bytes: out.lock().bytes() - b0,
            secs: t.elapsed().as_secs_f64(),
            dirty_after: pfns.len() as u64,
        };
        tracing::info!(
            ?r,
            est_ms = r.est_downtime().as_secs_f64() * 1e3,
            "migration round"
        );
        report.pages += of;
        rounds.push(r);
        match policy.next(&rounds) {
            Next::Again => {}
            Next::Stop(w) => {
                why = w;
                break;
            }
        }
    }
    // Stop and copy.
    for p in &pfns {
        dirty.add(*p);
    }
    // A guest with PV devices and Xen drivers suspends itself first, as
    // `xl migrate` asks it: the destination's backends are new, and its
    // frontends reconnect to them only after a suspend. The downtime counts
    // from the request. Any other guest is paused as it is and continues at
    // the destination with xenkvm's record of its Xen side.
    if !was_paused && m.xen.has_pv_devices() {
        *paused_at = Some(Instant::now());
        *held = crate::vmm::suspend::ask_guest(m, crate::vmm::suspend::SUSPEND_WAIT)?;
        if held.is_none() {
            tracing::warn!("the guest's PV devices do not move: its drivers take no suspend requests (control/feature-suspend)");
        }
    }
    if !was_paused {
        m.pause(Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
    }
    // The final set's send starts here (after a guest's own suspend).
    let paused = Instant::now();
    if paused_at.is_none() {
        *paused_at = Some(paused);
    }
    let paused_bytes = out.lock().bytes();
    let tail = read_tail(m)?;
    collect(&mut dirty)?;
    let last = dirty.take();
    let n = rounds.len() as u32 + 1;
    let of = last.len() as u64;
    let mut tick = |done: u64| -> Result<(), String> {
        if !alive() {
            return Err("the migrate command went away (interrupted?)".into());
        }
        if done == of {
            progress(&Progress {
                round: n,
                done,
                of,
                bytes: out.lock().bytes(),
                paused: true,
                ..Default::default()
            });
        }
        Ok(())
    };
    // Holes as they are now, with the guest stopped.
    let holes = Holes::read(m);
    send_pages(&mut img, &last, &|p| holes.is_hole(p), &mut tick)?;
    report.pages += of;
    report.final_pages = of;
    report.rounds = n;
    report.why = why.to_string();
    drop(log);
    let io = |e: std::io::Error| e.to_string();
    img.libxc(&LibxcRecord::TscInfo(tail.tsc)).map_err(io)?;
    img.libxc(&LibxcRecord::HvmContext(tail.blob)).map_err(io)?;
    if !tail.params.is_empty() {
        img.libxc(&LibxcRecord::HvmParams(tail.params))
            .map_err(io)?;
    }
    // A guest that suspended itself sets its Xen side up again at the
    // destination: the stream has only what Xen writes.
    if held.is_none() {
        img.libxc(&LibxcRecord::Optional {
            rtype: xenkvm_records::REC_XENKVM_XEN_STATE,
            body: xenkvm_records::encode(&tail.xen_state),
        })
        .map_err(io)?;
    }
    img.finish(&[]).map_err(io)?;
    out.lock().flush().map_err(io)?;
    report.bytes = out.lock().bytes();
    report.final_bytes = report.bytes - paused_bytes;
    report.final_send = paused.elapsed();
    report.stream = stream_start.elapsed();
    if let Ok(dir) = std::env::var("XENKVM_TEST_MIGRATE_DUMP") {
        dump_ram(&m.mem, &std::path::Path::new(&dir).join("source.ram"))?;
    }
    // xl's handshake: the destination has it all and built the domain.
    wait_readable(rd, Duration::from_secs(120), alive)?;
    live::expect(&mut rfile, live::RECEIVED).map_err(|e| e.to_string())?;
    // The point of no return: from here the destination owns the guest.
    {
        let mut o = out.lock();
        o.write_all(live::CLEARED)
            .and_then(|_| o.flush())
            .map_err(|e| SendErr::After(format!("sending the go-ahead: {e}")))?;
    }
    let never = || true;
    wait_readable(rd, Duration::from_secs(60), &never).map_err(SendErr::After)?;
    live::expect(&mut rfile, live::REPORT).map_err(|e| SendErr::After(e.to_string()))?;
    let mut st = [0u8; 1];
    rfile
        .read_exact(&mut st)
        .map_err(|e| SendErr::After(format!("the destination's unpause status: {e}")))?;
    if st[0] != 0 {
        return Err(SendErr::After(format!(
            "the destination could not unpause the guest (status {})",
            st[0]
        )));
    }
    Ok(())
}

/// The transport, shared between the image writer and the handshake.
type Out = Arc<Mutex<Throttled<BufWriter<std::fs::File>>>>;

/// A writer shared between the image writer and the handshake; pages go
/// out with `writev` straight from guest RAM (copied through the
/// rate-limited writer when there is a bandwidth limit).
struct SendSink<'a> {
    out: Out,
    map: &'a gpc::MemoryMap,
}

impl Write for SendSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.lock().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.lock().flush()
    }
}

impl PageOut for SendSink<'_> {
    fn write_pages(&mut self, head: &[u8], pages: &[PageSrc]) -> std::io::Result<()> {
        let mut o = self.out.lock();
        if o.limit() > 0 {
            return Copying::new(&mut *o, self.map.guest_memory()).write_pages(head, pages);
        }
        // What the buffer holds goes first.
        o.get_mut().flush()?;
        let mut parts = Vec::with_capacity(pages.len() + 1);
        parts.push(gpc::IoPart::Bytes(head));
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            if pages[i].zero {
                parts.push(gpc::IoPart::Bytes(&ZERO_PAGE));
            } else {
                while j < pages.len() && !pages[j].zero && pages[j].pfn == pages[j - 1].pfn + 1 {
                    j += 1;
                }
                parts.push(gpc::IoPart::Ram(gpc::Segment::new(
                    GuestAddress(pages[i].pfn * PAGE_SIZE as u64),
                    (j - i) * PAGE_SIZE,
                )));
            }
            i = j;
        }
        let n = self
            .map
            .write_all_parts(o.get_mut().get_ref().as_fd(), &parts)?;
        o.count_unlimited(n as u64);
        Ok(())
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

// ------------------------------------------------------------ destination

/// The destination's side of xl's handshake, called by the runner: after
/// the received guest is built ([`Incoming::ready`]: "received", then the
/// source's go-ahead) and once it runs ([`Incoming::started`]: the report).
#[derive(Clone)]
pub struct Incoming {
    inner: Arc<Mutex<Option<(std::fs::File, std::fs::File)>>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Incoming")
    }
}

impl Incoming {
    /// Over the transport `(read, write)`.
    pub fn new(rd: std::fs::File, wr: std::fs::File) -> Incoming {
        Incoming {
            inner: Arc::new(Mutex::new(Some((rd, wr)))),
        }
    }

    /// The guest is built: tells the source and waits for its go-ahead.
    /// An error means the guest must be discarded.
    pub fn ready(&self) -> Result<(), String> {
        let mut g = self.inner.lock();
        let Some((rd, wr)) = g.as_mut() else {
            return Ok(()); // a restart after the migration: nothing to say
        };
        wr.write_all(live::RECEIVED)
            .and_then(|_| wr.flush())
            .map_err(|e| format!("telling the source: {e}"))?;
        // A source that went silent (a cut link without a reset) is given
        // up after two minutes; it keeps the guest then.
        let fd = rd.try_clone().map_err(|e| e.to_string())?;
        wait_readable(&OwnedFd::from(fd), Duration::from_secs(120), &|| true)?;
        live::expect(rd, live::CLEARED).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The guest runs: the report (status 0), and the transport is closed.
    pub fn started(&self) {
        if let Some((_, mut wr)) = self.inner.lock().take() {
            let mut msg = live::REPORT.to_vec();
            msg.push(0);
            if let Err(e) = wr.write_all(&msg).and_then(|_| wr.flush()) {
                tracing::warn!(%e, "cannot report to the migration source");
            }
        }
    }
}

// ------------------------------------------------------------ the client

/// What the client printed at the end.
#[derive(Debug, Clone)]
pub struct ClientResult {
    /// The VM's final line (`migrated ...`).
    pub line: String,
}

/// Sends the request and the transport descriptors to VM `name`.
fn send_request(sock: &UnixStream, line: &str, fds: &[&OwnedFd]) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    anc.push(SendAncillaryMessage::ScmRights(&borrowed));
    let bytes = line.as_bytes();
    let n = sendmsg(
        sock,
        &[std::io::IoSlice::new(bytes)],
        &mut anc,
        SendFlags::empty(),
    )?;
    (&*sock).write_all(&bytes[n..])
}

/// `xenkvm migrate NAME DEST` / `--pipe CMD`: opens the transport, hands it
/// to the VM and follows its progress (`on_progress`) to the end.
pub fn client(
    name: &str,
    tcp: Option<&str>,
    pipe: Option<&str>,
    opts: &MigrateOpts,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<ClientResult, String> {
    let (rd, wr, child): (OwnedFd, OwnedFd, Option<std::process::Child>) = match (tcp, pipe) {
        (Some(addr), None) => {
            let s = std::net::TcpStream::connect(addr)
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            let _ = s.set_nodelay(true);
            let w = s.try_clone().map_err(|e| e.to_string())?;
            (OwnedFd::from(s), OwnedFd::from(w), None)
        }
        (None, Some(cmd)) => {
            let mut c = std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
            let w = OwnedFd::from(c.stdin.take().ok_or("no stdin pipe")?);
            let r = OwnedFd::from(c.stdout.take().ok_or("no stdout pipe")?);
            (r, w, Some(c))
        }
        _ => return Err("give DEST (HOST:PORT) or --pipe COMMAND, not both".into()),
    };
    let path = crate::vmm::control::socket_path(name);
    let sock = UnixStream::connect(&path).map_err(|e| {
        format!(
            "no running VM {name} (no control socket at {}: {e})",
            path.display()
        )
    })?;
    send_request(
        &sock,
        &format!("migrate {}\n", opts.to_words()),
        &[&rd, &wr],
    )
    .map_err(|e| format!("{name}: {e}"))?;
    // The VM has its own copies now.
    drop(rd);
    drop(wr);
    let mut result = Err(format!(
        "{name}: the VM closed the connection without a result"
    ));
    for line in BufReader::new(&sock).lines() {
        let Ok(line) = line else { break };
        if let Some(p) = Progress::parse(&line) {
            on_progress(&p);
        } else if let Some(r) = line.strip_prefix("ok ") {
            result = Ok(ClientResult {
                line: r.to_string(),
            });
            break;
        } else if let Some(e) = line.strip_prefix("error ") {
            result = Err(format!("{name}: {e}"));
            break;
        }
    }
    // A receiver started by --pipe runs the guest now (or has ended):
    // it is not waited for.
    drop(child);
    result
}

/// A `key=value` field of a report line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_opts_round_trip_through_the_request_words() {
        let o = MigrateOpts {
            dest: "host b:1".into(),
            bandwidth: 1 << 20,
            downtime: Duration::from_millis(50),
            max_rounds: 7,
            vmm_dirty: false,
        };
        let p = MigrateOpts::from_words(&o.to_words()).unwrap();
        assert_eq!(
            (
                p.bandwidth,
                p.downtime,
                p.max_rounds,
                p.vmm_dirty,
                p.dest.as_str()
            ),
            (1 << 20, Duration::from_millis(50), 7, false, "host_b:1")
        );
        assert!(MigrateOpts::from_words("nope=1").is_err());
    }

    #[test]
    fn migrate_progress_line_parses_back() {
        let p = Progress {
            round: 3,
            done: 10,
            of: 20,
            bytes: 12345,
            dirty_rate: 99.0,
            est_ms: 1.5,
            paused: true,
        };
        let q = Progress::parse(&p.line()).unwrap();
        assert_eq!(
            (q.round, q.done, q.of, q.bytes, q.paused),
            (3, 10, 20, 12345, true)
        );
        assert_eq!(field("migrated rounds=4 bytes=9", "bytes"), Some("9"));
        // The report line: every field a parser looks up by key, `stop` last.
        let r = Report {
            final_pages: 7,
            final_bytes: 28_700,
            why: "fits the target".into(),
            ..Default::default()
        };
        let l = r.line();
        assert!(l.starts_with("migrated total_ms="), "{l}");
        assert_eq!(field(&l, "final_pages"), Some("7"));
        assert_eq!(field(&l, "final_bytes"), Some("28700"));
        assert_eq!(field(&l, "bytes"), Some("0"));
        assert!(l.ends_with(" stop=fits_the_target"), "{l}");
    }

    #[test]
    fn migrate_frame_set_merges_kvm_words_and_single_frames() {
        let mut s = FrameSet::new(256);
        s.merge_words(64, &[0b101, 1 << 63]);
        s.add(3);
        s.add(64);
        s.add(10_000); // outside: ignored
        assert_eq!(s.take(), vec![3, 64, 66, 191]);
        assert!(s.take().is_empty());
    }
}
