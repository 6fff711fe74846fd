//! Host context switches and wake-ups of vCPU threads from a BPF program
//! (`runstate/bpf/sched.bpf.c`, compiled CO-RE object checked in beside it
//! and embedded here), loaded with the pure-Rust `aya` crate: no clang or
//! libbpf at build or run time.
//!
//! The program runs on `tp_btf/sched_switch` and `tp_btf/sched_wakeup`,
//! filters on a hash map of watched thread ids, and writes one 24-byte event
//! per switch-in, switch-out and wake-up of a vCPU thread into the BPF ring
//! buffer of the CPU it happened on ([`NR_RINGS`] rings, CPU modulo
//! `NR_RINGS`). A ring's fd becomes readable only for a preempted
//! switch-out that did not hand the CPU to a watch thread itself (no
//! feedback loop); every other event waits for the next reader. The VMM
//! runs one watch thread per ring pinned to that ring's CPUs, so the
//! wake-up runs where the vCPU was just preempted. Needs CAP_BPF +
//! CAP_PERFMON (or root) and kernel BTF (`/sys/kernel/btf/vmlinux`).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64};

use aya::maps::{Array, HashMap, MapData, RingBuf};
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, EbpfLoader};
use parking_lot::Mutex;

#[repr(C, align(8))]
struct Aligned<T: ?Sized>(T);

/// The compiled program (`runstate/bpf/build.sh` rebuilds it).
static OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!("../../runstate/bpf/sched.bpf.o"));

/// Rings of the program (`NR_RINGS` of sched.bpf.c).
pub const NR_RINGS: usize = 8;

/// Where the kernel's BTF lives (CO-RE relocations need it).
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// What a watched thread is to the program (values of its `tids` map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A vCPU thread: its switches and wake-ups are reported.
    Vcpu = 1,
    /// The watch thread: a vCPU preempted in its favour does not wake it.
    Watcher = 2,
}

/// Slots of `pub_ctl` and pages of `pub_pages` (`XK_MAX_VCPUS` of sched.bpf.c).
pub const MAX_PUB: usize = 32;
const _: () = assert!(MAX_PUB == crate::MAX_VCPUS as usize);

/// One vCPU's slot for publishing `running` at its thread's switch-in
/// (`struct pub_ctl` of sched.bpf.c, in a memory-mapped BPF array shared
/// with the program). The VMM sets `page`, `off`, `flag` and `enabled` when
/// the vCPU's runstate area lies in a page of `pub_pages` placed over the
/// guest's RAM; the watch thread, after it published `runnable`, writes
/// `entry`, `time`, `offset` and `arm_out` (the switch-out's time) and then
/// sets `armed`; the program takes `armed` back at the switch-in that ends
/// that switch-out and publishes. `out`, `last_out` and the `in_*` fields
/// are the program's.
#[repr(C)]
#[derive(Debug)]
pub struct PubCtl {
    pub armed: AtomicU32,
    pub out: AtomicU32,
    pub page: AtomicU32,
    pub off: AtomicU32,
    pub enabled: AtomicU32,
    pub flag: AtomicU32,
    pub arm_out: AtomicU64,
    pub last_out: AtomicU64,
    pub entry: AtomicU64,
    pub time: [AtomicU64; 4],
    pub offset: AtomicI64,
    pub in_host: AtomicU64,
    pub in_guest: AtomicU64,
    pub published: AtomicU64,
    pub ins: AtomicU64,
    pub outs: AtomicU64,
    pub missed_in: AtomicU64,
    pub late_in: AtomicU64,
}
const _: () = assert!(std::mem::size_of::<PubCtl>() == 144);

/// The two shared maps, mapped into the VMM.
struct PubMaps {
    /// `MAX_PUB` slots in the VMM's mapping of `pub_ctl`.
    ctl: *mut PubCtl,
    ctl_len: usize,
    /// `pub_pages` (its page `i` at offset `i * 4096`).
    pages: std::fs::File,
}

// SAFETY: `ctl` points into a shared mapping this struct owns (unmapped on
// drop); the slots are atomics, shared with the program by design.
unsafe impl Send for PubMaps {}
// SAFETY: as above: every access goes through the atomics.
unsafe impl Sync for PubMaps {}

impl Drop for PubMaps {
    fn drop(&mut self) {
        // SAFETY: our own mapping of `ctl_len` bytes; the references handed
        // out borrow `self`.
        unsafe { libc::munmap(self.ctl.cast(), self.ctl_len) };
    }
}

impl PubMaps {
    fn new(ctl: &MapData, pages: &MapData) -> Result<PubMaps, String> {
        use std::os::fd::AsFd;
        let dup = |m: &MapData, what: &str| {
            m.fd()
                .as_fd()
                .try_clone_to_owned()
                .map(std::fs::File::from)
                .map_err(|e| err(what, e))
        };
        let ctl_file = dup(ctl, "pub_ctl")?;
        let ctl_len = (MAX_PUB * std::mem::size_of::<PubCtl>()).next_multiple_of(4096);
        let p = super::map_shared_rw(ctl_file.as_fd(), ctl_len)
            .map_err(|e| err("mmap of pub_ctl", e))?;
        Ok(PubMaps {
            ctl: p.cast(),
            ctl_len,
            pages: dup(pages, "pub_pages")?,
        })
    }
}

/// One event of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    In,
    /// Switched out still runnable (preempted, `sched_yield`).
    Preempted,
    /// Switched out to sleep.
    Blocked,
    /// Woken (made runnable) while asleep.
    Woken,
    /// A preemption went on past the point where it would have ended
    /// (`time_ns`: its switch-out, which is already in a ring): only a
    /// wake-up for the watch thread. `by_vcpu`: one by another vCPU thread,
    /// whose wake-up the program deferred, outlasted the delay.
    /// `by_watcher`: one by the watch thread itself did not end when the
    /// watch thread slept (the CPU went to another thread).
    StillOut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub tid: u32,
    pub kind: Kind,
    /// CLOCK_MONOTONIC ns (`bpf_ktime_get_ns`).
    pub time_ns: u64,
    pub cpu: u32,
    /// A preemption by the watch thread itself (it did not wake anyone).
    pub by_watcher: bool,
    /// A preemption by another vCPU thread: the watch thread is woken only
    /// if it lasts (a [`Kind::StillOut`] event follows).
    pub by_vcpu: bool,
    /// A switch-in at which the program published `running` itself
    /// ([`PubCtl`]): the guest time it published.
    pub published: Option<u64>,
    /// A switch-in `sched_switch` did not report, found at the end of
    /// `__schedule()` in the thread's context (its time is that moment's).
    pub late: bool,
}

/// Decodes one ring record (`struct ev` of sched.bpf.c); `None` if malformed.
pub fn decode(b: &[u8]) -> Option<Event> {
    if b.len() < 24 {
        return None;
    }
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&b[8..16]);
    let kind = match u32_at(4) {
        0 => Kind::In,
        1 => Kind::Preempted,
        2 => Kind::Blocked,
        3 => Kind::Woken,
        4 => Kind::StillOut,
        _ => return None,
    };
    Some(Event {
        tid: u32_at(0),
        kind,
        time_ns: u64::from_le_bytes(t),
        cpu: u32_at(16),
        by_watcher: u32_at(20) & 1 != 0,
        by_vcpu: u32_at(20) & 2 != 0,
        published: (u32_at(20) & 4 != 0 && b.len() >= 32).then(|| {
            t.copy_from_slice(&b[24..32]);
            u64::from_le_bytes(t)
        }),
        late: u32_at(20) & 8 != 0,
    })
}

/// Appends a ring's events to `out`; returns how many were malformed.
fn read_ring(ring: &mut RingBuf<MapData>, out: &mut Vec<Event>) -> u64 {
    let mut bad = 0;
    while let Some(item) = ring.next() {
        match decode(&item) {
            Some(e) => out.push(e),
            None => bad += 1,
        }
    }
    bad
}

/// Hands `all` (from several rings) over in time order: one thread's events
/// may sit in several rings when it changed CPUs.
fn deliver(mut all: Vec<Event>, mut f: impl FnMut(Event)) {
    all.sort_by_key(|e| e.time_ns);
    for e in all {
        f(e);
    }
}

/// The loaded, attached program and its maps.
pub struct SchedBpf {
    /// Owns the programs and their links (dropping it detaches them).
    _ebpf: Ebpf,
    tids: Mutex<HashMap<MapData, u32, u32>>,
    /// Per-thread deferred wake-up slots (`struct deferred`: a BPF timer
    /// and two words), removed with the thread.
    deferred: Mutex<HashMap<MapData, u32, [u64; 4]>>,
    rings: Vec<Mutex<RingBuf<MapData>>>,
    lost: Array<MapData, u64>,
    fds: Vec<RawFd>,
    /// Publishing at the switch-in (`None`: the maps could not be mapped;
    /// said in the log, and every preemption is kicked as before).
    pubs: Option<PubMaps>,
    /// Whether switch-ins `sched_switch` did not report are found at the
    /// end of `__schedule()` (`sched_exit_tp` attached).
    late_in: bool,
}

impl std::fmt::Debug for SchedBpf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedBpf")
            .field("ring_fds", &self.fds)
            .finish()
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl SchedBpf {
    /// Loads and attaches the program; the error says why not (no BTF,
    /// not permitted, verifier refusal).
    pub fn load() -> Result<SchedBpf, String> {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            return Err(format!("no kernel BTF ({VMLINUX_BTF})"));
        }
        let btf = Btf::from_sys_fs().map_err(|e| err("kernel BTF", e))?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .load(&OBJECT.0)
            .map_err(|e| err("BPF load", e))?;
        for (prog, tp) in [("on_switch", "sched_switch"), ("on_wakeup", "sched_wakeup")] {
            let p: &mut BtfTracePoint = ebpf
                .program_mut(prog)
                .ok_or_else(|| format!("BPF object has no {prog}"))?
                .try_into()
                .map_err(|e| err(prog, e))?;
            p.load(tp, &btf).map_err(|e| err(tp, e))?;
            p.attach().map_err(|e| err(tp, e))?;
        }
        // The fallback for switch-ins `sched_switch` does not report (the
        // end of `__schedule()`, kernel 6.16+): not needed where it reports
        // all, so an older kernel still gets the rest (said in the log).
        let late_in = ebpf
            .program_mut("on_sched_exit")
            .ok_or_else(|| "BPF object has no on_sched_exit".to_string())
            .and_then(|p| <&mut BtfTracePoint>::try_from(p).map_err(|e| err("on_sched_exit", e)))
            .and_then(|p| {
                p.load("sched_exit_tp", &btf)
                    .map_err(|e| err("sched_exit_tp", e))?;
                p.attach().map(drop).map_err(|e| err("sched_exit_tp", e))
            })
            .map_err(|e| tracing::info!(%e, "switch-ins sched_switch misses stay missed"))
            .is_ok();
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| format!("BPF object has no map {name}"))
        };
        let tids = HashMap::try_from(take(&mut ebpf, "tids")?).map_err(|e| err("tids", e))?;
        let deferred =
            HashMap::try_from(take(&mut ebpf, "deferred")?).map_err(|e| err("deferred", e))?;
        let mut rings = Vec::with_capacity(NR_RINGS);
        let mut fds = Vec::with_capacity(NR_RINGS);
        for i in 0..NR_RINGS {
            let name = format!("rb{i}");
            let ring = RingBuf::try_from(take(&mut ebpf, &name)?).map_err(|e| err(&name, e))?;
            fds.push(ring.as_raw_fd());
            rings.push(Mutex::new(ring));
        }
        let lost = Array::try_from(take(&mut ebpf, "lost")?).map_err(|e| err("lost", e))?;
        let pubs = match (ebpf.map("pub_ctl"), ebpf.map("pub_pages")) {
            (Some(aya::maps::Map::Array(c)), Some(aya::maps::Map::Array(p))) => PubMaps::new(c, p)
                .map_err(|e| tracing::info!(%e, "no publishing at the switch-in"))
                .ok(),
            _ => None,
        };
        Ok(SchedBpf {
            _ebpf: ebpf,
            tids: Mutex::new(tids),
            deferred: Mutex::new(deferred),
            rings,
            lost,
            fds,
            pubs,
            late_in,
        })
    }

    /// Starts reporting thread `tid` as `role`.
    pub fn watch(&self, tid: u32, role: Role) -> Result<(), String> {
        self.tids
            .lock()
            .insert(tid, role as u32, 0)
            .map_err(|e| err("tids insert", e))
    }

    /// Starts reporting vCPU `vcpu`'s thread `tid` (its [`PubCtl`] slot is
    /// `vcpu`'s).
    pub fn watch_vcpu(&self, tid: u32, vcpu: u32) -> Result<(), String> {
        if vcpu as usize >= MAX_PUB {
            return Err(format!("vCPU {vcpu} beyond the program's {MAX_PUB} slots"));
        }
        self.tids
            .lock()
            .insert(tid, Role::Vcpu as u32 | vcpu << 8, 0)
            .map_err(|e| err("tids insert", e))
    }

    /// `vcpu`'s slot for publishing at the switch-in, if the maps are mapped.
    pub fn pub_slot(&self, vcpu: u32) -> Option<&PubCtl> {
        let p = self.pubs.as_ref()?;
        if vcpu as usize >= MAX_PUB {
            return None;
        }
        // SAFETY: `vcpu < MAX_PUB` slots lie in the mapping, which lives as
        // long as `self`; `PubCtl` is all atomics (any bit pattern is valid).
        Some(unsafe { &*p.ctl.add(vcpu as usize) })
    }

    /// Page `i` of `pub_pages`, to be placed over guest RAM: the map's file
    /// and the page's offset in it.
    pub fn pub_page(&self, i: u32) -> Result<(std::fs::File, u64), String> {
        let p = self.pubs.as_ref().ok_or("no pub_pages")?;
        if i as usize >= MAX_PUB {
            return Err(format!("pub_pages has {MAX_PUB} pages, not {}", i + 1));
        }
        let f = p.pages.try_clone().map_err(|e| err("pub_pages", e))?;
        Ok((f, u64::from(i) * 4096))
    }

    /// Stops reporting thread `tid`.
    pub fn unwatch(&self, tid: u32) {
        let _ = self.tids.lock().remove(&tid);
        // Deleting the slot also cancels its timer.
        let _ = self.deferred.lock().remove(&tid);
    }

    /// Ring `i`'s fd: readable when a vCPU thread was preempted on one of
    /// its CPUs (`cpu % NR_RINGS == i`).
    pub fn fd(&self, i: usize) -> RawFd {
        self.fds[i % NR_RINGS]
    }

    /// Reads every event in every ring, oldest first (serialised per ring:
    /// waits for another reader). Returns how many were malformed.
    pub fn drain(&self, f: impl FnMut(Event)) -> u64 {
        let mut all = Vec::new();
        let mut bad = 0;
        for r in &self.rings {
            bad += read_ring(&mut r.lock(), &mut all);
        }
        deliver(all, f);
        bad
    }

    /// Like [`SchedBpf::drain`], but skips a ring another thread is
    /// reading: `(malformed, complete)`, `complete` false if one was
    /// skipped (its reader delivers those events).
    pub fn try_drain(&self, f: impl FnMut(Event)) -> (u64, bool) {
        let mut all = Vec::new();
        let mut bad = 0;
        let mut complete = true;
        for r in &self.rings {
            match r.try_lock() {
                Some(mut g) => bad += read_ring(&mut g, &mut all),
                None => complete = false,
            }
        }
        deliver(all, f);
        (bad, complete)
    }

    /// Whether switch-ins `sched_switch` did not report are found at the end
    /// of `__schedule()`, in the thread's context (`sched_exit_tp` attached).
    pub fn finds_late_switch_ins(&self) -> bool {
        self.late_in
    }

    /// Returns once every program run that started before the call has
    /// ended: tracepoint programs run inside RCU read-side sections, and a
    /// global membarrier is a `synchronize_rcu()`.
    pub fn wait_for_runs_in_flight() -> std::io::Result<()> {
        // SAFETY: membarrier(MEMBARRIER_CMD_GLOBAL, 0, 0) takes no pointers.
        if unsafe { libc::syscall(libc::SYS_membarrier, 1, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Events the program could not write (ring full) since it was loaded.
    pub fn lost(&self) -> u64 {
        self.lost.get(&0, 0).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The program, or `None` (said on stderr) where BPF is not permitted.
    fn load_or_skip() -> Option<SchedBpf> {
        SchedBpf::load()
            .map_err(|e| eprintln!("skipping: BPF not available here ({e})"))
            .ok()
    }

    /// `vcpu`'s publishing slot and page `page` of `pub_pages`, mapped; `None`
    /// (said on stderr) where the maps are not mapped.
    fn slot_and_page(bpf: &SchedBpf, vcpu: u32, page: u32) -> Option<(&PubCtl, gpc::OverlayPage)> {
        let Some(slot) = bpf.pub_slot(vcpu) else {
            eprintln!("skipping: the program's maps are not mapped here");
            return None;
        };
        let (file, offset) = bpf.pub_page(page).unwrap();
        Some((slot, gpc::OverlayPage::from_file(file, offset).unwrap()))
    }

    /// The `i`th 8-byte word of the area at `off` in `page`.
    fn word(page: &gpc::OverlayPage, off: usize, i: usize) -> u64 {
        let mut b = [0u8; 8];
        page.read(off + 8 * i, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    #[test]
    fn decode_ring_record_fields_and_unknown_kind_refused() {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&1234u32.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..16].copy_from_slice(&99_000u64.to_le_bytes());
        b[16..20].copy_from_slice(&1u32.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            decode(&b),
            Some(Event {
                tid: 1234,
                kind: Kind::Preempted,
                time_ns: 99_000,
                cpu: 1,
                by_watcher: true,
                by_vcpu: false,
                published: None,
                late: false,
            })
        );
        b[4] = 4;
        b[20] = 2;
        assert_eq!(
            decode(&b).map(|e| (e.kind, e.by_watcher, e.by_vcpu)),
            Some((Kind::StillOut, false, true))
        );
        b[4] = 0;
        b[20] = 8;
        assert_eq!(
            decode(&b).map(|e| (e.kind, e.late, e.published)),
            Some((Kind::In, true, None))
        );
        b[4] = 7;
        assert_eq!(decode(&b), None);
        assert_eq!(decode(&b[..20]), None);
    }

    #[test]
    fn bpf_watched_thread_beside_hog_reported_preempted_blocked_woken() {
        let Some(bpf) = load_or_skip() else {
            return;
        };
        use std::time::{Duration, Instant};
        // A spinner and a hog share CPU 0: the scheduler preempts the spinner
        // (switched out still runnable); then it sleeps (blocked) and is woken.
        let spin = |d: Duration| {
            let end = Instant::now() + d;
            while Instant::now() < end {
                std::hint::spin_loop();
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let go = std::sync::Arc::new(std::sync::Barrier::new(3));
        let (g1, g2) = (go.clone(), go.clone());
        let h = std::thread::spawn(move || {
            let tid = crate::host::perf::gettid();
            let _ = crate::host::cpu::pin(tid, 0);
            let _ = tx.send(tid as u32);
            g1.wait();
            spin(Duration::from_millis(150));
            std::thread::sleep(Duration::from_millis(2));
        });
        let hog = std::thread::spawn(move || {
            let _ = crate::host::cpu::pin(crate::host::perf::gettid(), 0);
            g2.wait();
            spin(Duration::from_millis(150));
        });
        let tid = rx.recv().unwrap();
        bpf.watch(tid, Role::Vcpu).unwrap();
        go.wait();
        h.join().unwrap();
        hog.join().unwrap();
        let mut seen = Vec::new();
        bpf.drain(|e| seen.push(e));
        bpf.unwatch(tid);
        let n = |k: Kind| seen.iter().filter(|e| e.kind == k).count();
        assert!(seen.iter().all(|e| e.tid == tid), "{seen:?}");
        assert!(
            n(Kind::Preempted) > 0,
            "no preemption beside the hog: {seen:?}"
        );
        assert!(
            n(Kind::Blocked) > 0,
            "no blocked switch-out for the sleep: {seen:?}"
        );
        assert!(n(Kind::Woken) > 0, "no wake-up: {seen:?}");
        assert!(n(Kind::In) > 0, "{seen:?}");
        assert!(
            seen.windows(2).all(|w| w[0].time_ns <= w[1].time_ns),
            "out of order: {seen:?}"
        );
        assert_eq!(bpf.lost(), 0);
    }

    /// The program's delay for a preemption by a sibling (SIBLING_DELAY_NS
    /// of sched.bpf.c).
    const SIBLING_DELAY_NS: u64 = 300_000;

    #[test]
    fn bpf_sibling_preemption_wakes_only_once_it_outlasts_the_delay() {
        let Some(bpf) = load_or_skip() else {
            return;
        };
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;
        use std::time::{Duration, Instant};
        // Two watched threads, SCHED_FIFO 1 on CPU 0, hand the CPU to each
        // other with sched_yield (a switch-out still runnable, to a sibling):
        // thread 1 keeps it 3 ms (longer than the delay) on odd turns and
        // 20 us on even ones; thread 0 hands it back at once.
        const TURNS: u32 = 16;
        let turn = Arc::new(AtomicU32::new(0));
        let all_ok = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let go = Arc::new(std::sync::Barrier::new(3));
        let player = |me: u32| {
            let (tx, go, turn, all_ok) = (tx.clone(), go.clone(), turn.clone(), all_ok.clone());
            std::thread::spawn(move || {
                let tid = crate::host::perf::gettid();
                let ok =
                    crate::host::cpu::pin(tid, 0).is_ok() && crate::host::cpu::set_fifo(1).is_ok();
                let _ = tx.send((tid as u32, ok));
                go.wait();
                if !all_ok.load(Ordering::Acquire) {
                    let _ = crate::host::cpu::set_fifo_tid(tid, 0);
                    return;
                }
                loop {
                    let t = turn.load(Ordering::Acquire);
                    if t >= 2 * TURNS {
                        break;
                    }
                    if t % 2 != me {
                        std::thread::yield_now();
                        continue;
                    }
                    if me == 1 {
                        let keep = if t % 4 == 1 {
                            Duration::from_millis(3)
                        } else {
                            Duration::from_micros(20)
                        };
                        let end = Instant::now() + keep;
                        while Instant::now() < end {
                            std::hint::spin_loop();
                        }
                    }
                    turn.store(t + 1, Ordering::Release);
                    std::thread::yield_now();
                }
                let _ = crate::host::cpu::set_fifo_tid(tid, 0);
            })
        };
        let (a, b) = (player(0), player(1));
        let (t0, t1) = (rx.recv().unwrap(), rx.recv().unwrap());
        all_ok.store(t0.1 && t1.1, Ordering::Release);
        if !(t0.1 && t1.1) {
            go.wait();
            a.join().unwrap();
            b.join().unwrap();
            eprintln!("skipping: cannot pin two SCHED_FIFO threads to CPU 0 here");
            return;
        }
        let tids = [t0.0, t1.0];
        for t in tids {
            bpf.watch(t, Role::Vcpu).unwrap();
        }
        go.wait();
        a.join().unwrap();
        b.join().unwrap();
        let mut seen = Vec::new();
        bpf.drain(|e| seen.push(e));
        for t in tids {
            bpf.unwatch(t);
        }
        let (mut long, mut short) = (0, 0);
        for p in seen
            .iter()
            .filter(|e| e.kind == Kind::Preempted && e.by_vcpu)
        {
            let Some(back) = seen
                .iter()
                .find(|e| e.tid == p.tid && e.kind == Kind::In && e.time_ns > p.time_ns)
            else {
                continue;
            };
            let out_ns = back.time_ns - p.time_ns;
            let woke = seen
                .iter()
                .any(|e| e.kind == Kind::StillOut && e.tid == p.tid && e.time_ns == p.time_ns);
            // One CPU: the timer and the switch-in cannot race, and a timer
            // never fires early.
            if out_ns < SIBLING_DELAY_NS {
                assert!(!woke, "woken for a preemption of {out_ns} ns: {seen:?}");
                short += 1;
            } else if out_ns > 1_000_000 {
                assert!(woke, "no wake-up for a preemption of {out_ns} ns: {seen:?}");
                long += 1;
            }
        }
        // Thread 1 keeps the CPU 8 times for 3 ms; thread 0 is preempted
        // briefly 8 times at least (a slot that could not be armed again
        // after a cancel would leave the later ones undeferred).
        assert!(
            long >= 4 && short >= 4,
            "{long} long, {short} short: {seen:?}"
        );
        for s in seen.iter().filter(|e| e.kind == Kind::StillOut) {
            assert!(
                seen.iter().any(|p| p.kind == Kind::Preempted
                    && p.by_vcpu
                    && p.tid == s.tid
                    && p.time_ns == s.time_ns),
                "{s:?} names no deferred switch-out"
            );
        }
        assert_eq!(bpf.lost(), 0);
    }

    /// Publishing at the switch-in: a watched vCPU thread on CPU 0 is
    /// preempted by a SCHED_FIFO thread; while it is out its slot is armed
    /// (as the watch thread does after publishing runnable); when the FIFO
    /// thread sleeps, the program writes running into the area at the
    /// switch-in, before the thread runs, and says so in the switch-in
    /// event. Armed for a switch-out that is not the thread's last, the
    /// next switch-in publishes nothing.
    #[test]
    fn bpf_publishes_running_at_the_switch_in_of_an_armed_vcpu_thread() {
        let Some(bpf) = load_or_skip() else {
            return;
        };
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        use std::sync::Arc;
        use std::time::{Duration, Instant};
        const VCPU: u32 = 5;
        const PAGE: u32 = 3;
        const OFF: usize = 64;
        let Some((slot, page)) = slot_and_page(&bpf, VCPU, PAGE) else {
            return;
        };
        let words = |i: usize| word(&page, OFF, i);
        // What the VMM published for the preemption: runnable since 1,000.
        page.write(OFF, &[1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        page.write(OFF + 8, &1_000u64.to_le_bytes()).unwrap();
        slot.page.store(PAGE, SeqCst);
        slot.off.store(OFF as u32, SeqCst);
        slot.flag.store(1, SeqCst);
        slot.enabled.store(1, SeqCst);
        let before = slot.published.load(SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        // The spinner counts its turns: a count that moved while `ins` did
        // not is a switch-in the host never reported to the program.
        let spins = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let v = {
            let (stop, spins) = (stop.clone(), spins.clone());
            std::thread::spawn(move || {
                let tid = crate::host::perf::gettid();
                let ok = crate::host::cpu::pin(tid, 0).is_ok();
                let _ = tx.send((tid as u32, ok));
                while !stop.load(SeqCst) {
                    spins.fetch_add(1, SeqCst);
                }
            })
        };
        let (tid, pinned) = rx.recv().unwrap();
        let _ = crate::host::cpu::pin(crate::host::perf::gettid(), 1);
        // A FIFO thread on CPU 0 that preempts the spinner until released.
        // It says when it runs there as FIFO: from then on until released
        // the spinner is out, and its last switch-out is the one to arm for
        // (`out` alone may be another test's thread taking CPU 0 a moment
        // before the hog, and the spinner back in before the arm).
        let hog = |release: Arc<AtomicBool>, hogging: Arc<AtomicBool>| {
            std::thread::spawn(move || {
                let me = crate::host::perf::gettid();
                let ok =
                    crate::host::cpu::pin(me, 0).is_ok() && crate::host::cpu::set_fifo(1).is_ok();
                hogging.store(ok, SeqCst);
                let end = Instant::now() + Duration::from_secs(5);
                while ok && !release.load(SeqCst) && Instant::now() < end {
                    std::hint::spin_loop();
                }
                let _ = crate::host::cpu::set_fifo_tid(me, 0);
                ok
            })
        };
        let wait = |what: &str, f: &dyn Fn() -> bool| {
            let end = Instant::now() + Duration::from_secs(5);
            while !f() {
                assert!(Instant::now() < end, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_micros(200));
            }
        };
        bpf.watch_vcpu(tid, VCPU).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        // Armed while out, as the watch thread does: armed, then `out` and
        // `last_out` checked again (Dekker with the program's locked add).
        // If the thread came back in before the arm (another test's thread
        // held CPU 0 for a moment, or the host throttled the FIFO hog), the
        // arm is taken back and the preemption tried again; if the program
        // took it first, it published.
        slot.entry.store(1_000, SeqCst);
        for (i, t) in [10u64, 20, 30, 40].iter().enumerate() {
            slot.time[i].store(*t, SeqCst);
        }
        slot.offset.store(500, SeqCst);
        let mut tries = 0;
        loop {
            tries += 1;
            let (release, hogging) = (Arc::new(AtomicBool::new(false)), Arc::default());
            let h = hog(release.clone(), Arc::clone(&hogging));
            if !pinned {
                release.store(true, SeqCst);
            }
            wait("the preemption", &|| {
                (hogging.load(SeqCst) && slot.out.load(SeqCst) == 1) || h.is_finished()
            });
            if !pinned || h.is_finished() {
                release.store(true, SeqCst);
                stop.store(true, SeqCst);
                let _ = (h.join(), v.join());
                bpf.unwatch(tid);
                eprintln!("skipping: cannot pin a SCHED_FIFO thread beside another on CPU 0");
                return;
            }
            let out_at = slot.last_out.load(SeqCst);
            slot.arm_out.store(out_at, SeqCst);
            slot.armed.store(1, SeqCst);
            let still_out = slot.out.load(SeqCst) == 1 && slot.last_out.load(SeqCst) == out_at;
            let taken_back = !still_out && slot.armed.swap(0, SeqCst) == 1;
            let (ins, spun) = (slot.ins.load(SeqCst), spins.load(SeqCst));
            release.store(true, SeqCst);
            assert!(h.join().unwrap());
            if !taken_back {
                // Published at the next switch-in (the program runs before
                // the spinner turns again), unless the host does not report
                // that one: then the spinner turns with `ins` still.
                wait("the switch-in", &|| {
                    slot.published.load(SeqCst) > before || spins.load(SeqCst) > spun + 1_000_000
                });
                if slot.published.load(SeqCst) > before {
                    break;
                }
                assert_eq!(
                    slot.ins.load(SeqCst),
                    ins,
                    "a reported switch-in after the arm published nothing"
                );
                eprintln!("the host did not report a switch-in; trying again");
                slot.armed.store(0, SeqCst);
            }
            assert!(
                tries < 20,
                "no armed preemption ended in a reported switch-in"
            );
        }
        wait("the publication", &|| slot.published.load(SeqCst) > before);
        let (in_host, in_guest) = (slot.in_host.load(SeqCst), slot.in_guest.load(SeqCst));
        assert_eq!(in_guest, in_host + 500);
        assert_eq!(slot.armed.load(SeqCst), 0, "the program took armed back");
        assert_eq!(words(0), 0, "state running");
        assert_eq!(words(1), in_guest, "entry time, update flag clear");
        assert_eq!(
            (words(2), words(3), words(4), words(5)),
            (10, 20 + in_guest - 1_000, 30, 40),
            "runnable grew by the wait"
        );
        // Armed for another switch-out than the thread's last one (the
        // watch thread was behind): nothing published, armed left for the
        // watch thread to take back (it then kicks).
        let published = slot.published.load(SeqCst);
        let (release, hogging) = (Arc::new(AtomicBool::new(false)), Arc::default());
        let h = hog(release.clone(), Arc::clone(&hogging));
        wait("the second preemption", &|| {
            hogging.load(SeqCst) && slot.out.load(SeqCst) == 1
        });
        slot.arm_out.store(slot.last_out.load(SeqCst) - 1, SeqCst);
        slot.armed.store(1, SeqCst);
        release.store(true, SeqCst);
        assert!(h.join().unwrap());
        wait("the switch-in", &|| slot.out.load(SeqCst) == 0);
        stop.store(true, SeqCst);
        v.join().unwrap();
        bpf.unwatch(tid);
        slot.enabled.store(0, SeqCst);
        assert_eq!(slot.published.load(SeqCst), published);
        assert_eq!(slot.armed.swap(0, SeqCst), 1, "armed left alone");
        assert_eq!(words(1), in_guest, "the area was left alone");
        let mut seen = Vec::new();
        bpf.drain(|e| seen.push(e));
        let pubs: Vec<_> = seen
            .iter()
            .filter(|e| e.tid == tid && e.kind == Kind::In && e.published.is_some())
            .collect();
        assert_eq!(pubs.len(), 1, "{seen:?}");
        assert_eq!(
            (pubs[0].time_ns, pubs[0].published),
            (in_host, Some(in_guest))
        );
    }

    /// A switch-in `sched_switch` did not report (this host's does not
    /// report switches away from some threads): the thread, still marked
    /// out, comes to the end of `__schedule()`, and the program switches it in there,
    /// before it runs on: armed, running is published. Made here by marking
    /// the running thread out and armed, as a missed switch-in leaves it, and
    /// yielding: a yield that finds no other thread to run returns from
    /// `__schedule()` without a switch (one that switches is reported, and
    /// clears the mark; then the test tries again).
    #[test]
    fn bpf_switch_in_the_tracepoint_missed_is_found_at_the_end_of_schedule() {
        let Some(bpf) = load_or_skip() else {
            return;
        };
        use std::sync::atomic::Ordering::SeqCst;
        if !bpf.finds_late_switch_ins() {
            eprintln!("skipping: no sched_exit_tp on this kernel (before 6.16)");
            return;
        }
        const VCPU: u32 = 6;
        const PAGE: u32 = 4;
        const OFF: usize = 128;
        let Some((slot, page)) = slot_and_page(&bpf, VCPU, PAGE) else {
            return;
        };
        let words = |i: usize| word(&page, OFF, i);
        slot.page.store(PAGE, SeqCst);
        slot.off.store(OFF as u32, SeqCst);
        slot.flag.store(1, SeqCst);
        slot.entry.store(1_000, SeqCst);
        for (i, t) in [10u64, 20, 30, 40].iter().enumerate() {
            slot.time[i].store(*t, SeqCst);
        }
        slot.offset.store(500, SeqCst);
        slot.enabled.store(1, SeqCst);
        // On a thread of its own, SCHED_FIFO on CPU 1 where it can be (the
        // other tests' FIFO threads are on CPU 0): its yields then find no
        // other thread to run even on a busy host, and return from
        // `__schedule()` without a switch.
        let (tid, found) = std::thread::scope(|sc| {
            sc.spawn(|| {
                let tid = crate::host::perf::gettid();
                let fifo = crate::host::cpu::online_cpus() >= 2
                    && crate::host::cpu::pin(tid, 1).is_ok()
                    && crate::host::cpu::set_fifo(1).is_ok();
                let tid = tid as u32;
                bpf.watch_vcpu(tid, VCPU).unwrap();
                let mut found = None;
                for _ in 0..1_000 {
                    // Runnable since 1,000, as the VMM published it.
                    page.write(OFF, &[1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
                    page.write(OFF + 8, &1_000u64.to_le_bytes()).unwrap();
                    let (late, published) =
                        (slot.late_in.load(SeqCst), slot.published.load(SeqCst));
                    slot.out.store(1, SeqCst);
                    slot.arm_out.store(slot.last_out.load(SeqCst), SeqCst);
                    slot.armed.store(1, SeqCst);
                    // SAFETY: no arguments; yields the calling thread.
                    unsafe { libc::sched_yield() };
                    if slot.late_in.load(SeqCst) > late {
                        assert_eq!(slot.published.load(SeqCst), published + 1);
                        assert_eq!(slot.out.load(SeqCst), 0, "switched in");
                        found = Some(slot.in_guest.load(SeqCst));
                        break;
                    }
                    slot.armed.store(0, SeqCst);
                }
                // Before the thread's last switch-out marks it out again.
                bpf.unwatch(tid);
                if fifo {
                    let _ = crate::host::cpu::set_fifo_tid(tid as i32, 0);
                }
                (tid, found)
            })
            .join()
            .unwrap()
        });
        slot.enabled.store(0, SeqCst);
        let Some(in_guest) = found else {
            panic!("every one of 1,000 yields switched (or __schedule() is not hooked)");
        };
        assert_eq!(slot.armed.load(SeqCst), 0, "the program took armed back");
        assert_eq!(words(0), 0, "state running");
        assert_eq!(words(1), in_guest, "entry time, update flag clear");
        assert_eq!(words(3), 20 + in_guest - 1_000, "runnable grew by the wait");
        let mut seen = Vec::new();
        bpf.drain(|e| seen.push(e));
        assert!(
            seen.iter().any(|e| e.tid == tid
                && e.kind == Kind::In
                && e.late
                && e.published == Some(in_guest)),
            "no late switch-in event: {seen:?}"
        );
    }

    #[test]
    fn bpf_watch_thread_preemption_wakes_it_again_only_if_the_cpu_goes_elsewhere() {
        let Some(bpf) = load_or_skip() else {
            return;
        };
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use std::time::{Duration, Instant};
        // On CPU 0: a spinning vCPU thread V, a watch thread W that wakes
        // every 5 ms and so preempts V, and a hog H (SCHED_FIFO 1, 3 and 2:
        // outside load cannot reorder them). On odd rounds W wakes H before
        // it sleeps again, so the CPU goes to H, not back to V, for 3 ms:
        // that preemption began as W's own and must wake W again (a StillOut
        // by the watcher). On even rounds it goes straight back to V: no
        // wake-up.
        const ROUNDS: u32 = 24;
        let stop = Arc::new(AtomicBool::new(false));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (hog_tx, hog_rx) = std::sync::mpsc::channel::<()>();
        let v = {
            let (stop, tid_tx) = (stop.clone(), tid_tx.clone());
            std::thread::spawn(move || {
                let tid = crate::host::perf::gettid();
                let ok =
                    crate::host::cpu::pin(tid, 0).is_ok() && crate::host::cpu::set_fifo(1).is_ok();
                let _ = tid_tx.send(('v', tid as u32, ok));
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let h = {
            let tid_tx = tid_tx.clone();
            std::thread::spawn(move || {
                let tid = crate::host::perf::gettid();
                let ok =
                    crate::host::cpu::pin(tid, 0).is_ok() && crate::host::cpu::set_fifo(2).is_ok();
                let _ = tid_tx.send(('h', tid as u32, ok));
                while hog_rx.recv().is_ok() {
                    let end = Instant::now() + Duration::from_millis(3);
                    while Instant::now() < end {
                        std::hint::spin_loop();
                    }
                }
                let _ = crate::host::cpu::set_fifo_tid(tid, 0);
            })
        };
        let (a, b) = (tid_rx.recv().unwrap(), tid_rx.recv().unwrap());
        let ((_, vt, vok), (_, _, hok)) = if a.0 == 'v' { (a, b) } else { (b, a) };
        let wtid = crate::host::perf::gettid();
        let wok = crate::host::cpu::pin(wtid, 0).is_ok() && crate::host::cpu::set_fifo(3).is_ok();
        let finish = |hog_tx: std::sync::mpsc::Sender<()>| {
            let _ = crate::host::cpu::set_fifo_tid(wtid, 0);
            let _ = crate::host::cpu::unpin(wtid);
            stop.store(true, Ordering::Relaxed);
            drop(hog_tx);
            v.join().unwrap();
            h.join().unwrap();
        };
        if !(vok && hok && wok) {
            finish(hog_tx);
            eprintln!("skipping: cannot pin SCHED_FIFO threads to CPU 0 here");
            return;
        }
        bpf.watch(vt, Role::Vcpu).unwrap();
        bpf.watch(wtid as u32, Role::Watcher).unwrap();
        for round in 0..ROUNDS {
            std::thread::sleep(Duration::from_millis(5));
            if round % 2 == 1 {
                let _ = hog_tx.send(());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
        bpf.unwatch(wtid as u32);
        bpf.unwatch(vt);
        finish(hog_tx);
        let mut seen = Vec::new();
        bpf.drain(|e| seen.push(e));
        let (mut long, mut short) = (0, 0);
        for p in seen
            .iter()
            .filter(|e| e.tid == vt && e.kind == Kind::Preempted && e.by_watcher)
        {
            let Some(back) = seen
                .iter()
                .find(|e| e.tid == vt && e.kind == Kind::In && e.time_ns > p.time_ns)
            else {
                continue;
            };
            let out_ns = back.time_ns - p.time_ns;
            let woke = seen.iter().any(|e| {
                e.kind == Kind::StillOut && e.by_watcher && e.tid == vt && e.time_ns == p.time_ns
            });
            if out_ns > 1_000_000 {
                assert!(
                    woke,
                    "not woken again for a {out_ns} ns preemption: {seen:?}"
                );
                long += 1;
            } else if out_ns < 50_000 && !woke {
                short += 1;
            }
        }
        assert!(
            long >= 4 && short >= 4,
            "{long} long (woken again), {short} short (not woken): {seen:?}"
        );
        for s in seen.iter().filter(|e| e.kind == Kind::StillOut) {
            assert!(
                s.by_watcher
                    && seen.iter().any(|p| p.kind == Kind::Preempted
                        && p.by_watcher
                        && p.tid == s.tid
                        && p.time_ns == s.time_ns),
                "{s:?} names no preemption by the watch thread"
            );
        }
        assert_eq!(bpf.lost(), 0);
    }
}
