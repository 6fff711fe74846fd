//! blkback throughput against plain I/O of the same file, in one run,
//! interleaved (pread, io_uring, backend, twice per workload).
//!
//! No guest: the in-process frontend of `tests/common/blkfront.rs` drives a
//! real ring through the real grant table, event channels and gpc guest
//! RAM; the backend is the real queue engine (grant map per segment,
//! `pread`/`preadv`/`pwrite`/`pwritev` into guest RAM, unmap, response,
//! notification), either inline (called by the frontend's thread after
//! each push) or on its own I/O thread, woken through the event channel, as
//! in the VMM. The frontend keeps 32 requests in flight; 64 KiB requests
//! are indirect (16 segments), 4 KiB ones direct.
//!
//! The baseline, plain I/O of the same file (opened as the backend opens
//! its disks, with `O_NOATIME`) with the same sizes and
//! offsets into 32 rotating buffers in a memfd mapping (4 KiB pages, the
//! kind of memory guest RAM is, the same 2 MiB footprint as the
//! frontend's data pages; `XENKVM_BENCH_PLAIN=heap` uses heap buffers for
//! `pread`, which copies faster than any guest RAM can be filled), done
//! two ways, each measured in every round: one thread calling
//! `pread`/`pwrite`, one I/O at a time, and the same 32 I/Os in flight as
//! the backend's through io_uring (`gpc::FileRing`, the file registered,
//! one submission per 32, as the backend submits a batch). The ratios are
//! against the better of the two (the higher IOPS, the lower CPU per
//! I/O). The file (256 MiB, in the system's temp dir) is in the page
//! cache, so every read is a copy by the CPU inside the system call:
//! depth gains nothing but fewer system calls, which io_uring's batch
//! gives plain I/O too. The backend's one gain plain I/O of the same
//! request sizes cannot have is merging: consecutive sectors in one batch
//! become one host I/O (the sequential workloads).
//!
//! Columns: `ratio` is the wall-clock IOPS ratio (backend / plain). On a
//! busy host (this project's has 2 cores and other builds) the I/O thread's
//! wall clock mostly measures the scheduler (both threads must be on a CPU
//! for the hand-off), so the CPU time is measured too: `be us`, `fe us` and
//! `pl us` are CPU microseconds per I/O of the backend, of the in-process
//! frontend, and of plain I/O; `cpu ratio` is `pl us / be us`. Inline, the
//! backend's CPU is the thread's CPU inside `Queue::process` (read around
//! one call in 8 and scaled: see `CPU_SAMPLE`; the frontend's is the rest), so the frontend's cost is not counted as the
//! backend's, plus the CPU of the process's other threads (io_uring's
//! workers, which run the I/O the submission could not complete); on the
//! I/O thread it is the process's CPU minus the frontend thread's (it
//! includes the thread's ring polling and io_uring's workers). The
//! frontend's wall-clock share inline is what cannot be taken out of
//! `ratio` (it is small: `fe us`).
//!
//! Runs `XENKVM_BENCH_SECS` seconds per measurement (default 1.5).
//! `cargo bench --bench blkback` (`XENKVM_BENCH_ONLY=rand` runs the
//! workloads whose name contains the text; `XENKVM_BENCH_MODE=inline` or
//! `thread` one mode; `XENKVM_BENCH_PERSISTENT=1` uses persistent grants
//! (the frontend's slots are its persistent pool; a real frontend then
//! copies each I/O to or from them, which this one does not);
//! `XENKVM_BLK_URING=0` serves reads with `pread`/`preadv` instead of
//! io_uring, `=1` writes through io_uring too; `XENKVM_BENCH_FORMAT=qcow2`
//! serves a qcow2 copy of the file, made with `qemu-img convert`, through
//! imago, next to plain I/O of the raw file; `XENKVM_BENCH_NO_PLAIN=1`
//! skips the plain runs, for profiling).

#[path = "../common/blkfront.rs"]
mod blkfront;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkfront::*;
use xenkvm::backends::blkback::{BlkConfig, Disk, Queue, QueueParams, RingSetup};
use xenkvm::backends::blkif::request::RSP_OKAY;
use xenkvm::backends::blkif::{Abi, Request, RwOp, Segment};

const FILE_BYTES: u64 = 256 << 20;
const QD: usize = 32;

#[derive(Clone, Copy)]
struct Work {
    name: &'static str,
    bytes: usize,
    write: bool,
    random: bool,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Offsets of a workload: sequential wraps around the file; random is
/// aligned to the request size.
struct Offsets {
    w: Work,
    next: u64,
    rng: Rng,
}
impl Offsets {
    fn new(w: Work) -> Self {
        Offsets {
            w,
            next: 0,
            rng: Rng(0x1234_5678_9abc_def1),
        }
    }
    fn get(&mut self) -> u64 {
        let n = self.w.bytes as u64;
        if self.w.random {
            (self.rng.next() % (FILE_BYTES / n)) * n
        } else {
            let o = self.next;
            self.next = (self.next + n) % FILE_BYTES;
            o
        }
    }
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`) or of the
/// whole process (`CLOCK_PROCESS_CPUTIME_ID`).
fn cpu(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, a live local.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(r, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn thread_cpu() -> Duration {
    cpu(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn process_cpu() -> Duration {
    cpu(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// One measurement: I/Os, wall time, and CPU time (the measuring thread's,
/// the backend's, the frontend's, as applies).
#[derive(Default, Clone, Copy)]
struct Run {
    bytes: u64,
    ops: u64,
    wall: Duration,
    /// Plain: the thread's CPU. Backend: the backend's CPU (inline: the
    /// thread's CPU inside `process`; I/O thread: the process's CPU minus
    /// the frontend thread's).
    cpu: Duration,
    /// The frontend's CPU (zero for plain).
    fe_cpu: Duration,
}

impl std::ops::AddAssign for Run {
    fn add_assign(&mut self, o: Run) {
        self.bytes += o.bytes;
        self.ops += o.ops;
        self.wall += o.wall;
        self.cpu += o.cpu;
        self.fe_cpu += o.fe_cpu;
    }
}

/// `XENKVM_BENCH_PERSISTENT=1`: the frontend and backend use persistent
/// grants (the frontend's slots are its persistent pool).
fn persistent_wanted() -> bool {
    std::env::var("XENKVM_BENCH_PERSISTENT").is_ok_and(|v| v == "1")
}

fn secs() -> Duration {
    Duration::from_secs_f64(
        std::env::var("XENKVM_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1.5),
    )
}

/// Where the plain baseline reads to and writes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PlainBuf {
    /// QD rotating heap buffers.
    Heap,
    /// QD rotating buffers in a memfd mapping of 4 KiB pages, the kind of
    /// memory guest RAM is (gpc's `MemoryMap`), with the same footprint as
    /// the frontend's data pages.
    Memfd,
}

/// Plain I/O through io_uring: QD reads or writes of the workload's
/// offsets into the QD buffers per submission, the file registered.
fn plain_uring(file: &std::fs::File, w: Work, d: Duration) -> Run {
    let d = if std::env::var_os("XENKVM_BENCH_NO_PLAIN").is_some() {
        Duration::from_millis(1)
    } else {
        d
    };
    let map = gpc::MemoryMap::new(&[(gpc::GuestAddress(0), (QD * w.bytes) as u64)]).unwrap();
    let mut ring = gpc::FileRing::new(&map, 64).expect("io_uring");
    ring.register(file).expect("io_uring file registration");
    let mut off = Offsets::new(w);
    let start = Instant::now();
    let cpu0 = process_cpu();
    let mut ops = 0u64;
    while start.elapsed() < d {
        for _ in 0..2 {
            for i in 0..QD {
                let seg = gpc::Segment::new(gpc::GuestAddress((i * w.bytes) as u64), w.bytes);
                ring.queue(off.get(), &[seg], w.write).unwrap();
            }
            for r in ring.run(file) {
                assert_eq!(r.unwrap(), w.bytes);
            }
            ops += QD as u64;
        }
    }
    // The process's CPU: io_uring's workers run what the submission could not.
    let (wall, cpu) = (start.elapsed(), process_cpu() - cpu0);
    Run {
        bytes: ops * w.bytes as u64,
        ops,
        wall,
        cpu,
        fe_cpu: Duration::ZERO,
    }
}

/// Plain pread/pwrite into QD rotating buffers.
fn plain(file: &std::fs::File, w: Work, d: Duration, kind: PlainBuf) -> Run {
    // For profiling the backend alone.
    let d = if std::env::var_os("XENKVM_BENCH_NO_PLAIN").is_some() {
        Duration::from_millis(1)
    } else {
        d
    };
    let map = gpc::MemoryMap::new(&[(gpc::GuestAddress(0), (QD * w.bytes) as u64)]).unwrap();
    let host = map.ram_regions()[0].host_addr as *mut u8;
    let mut heap = vec![vec![0x5au8; w.bytes]; QD];
    let mut off = Offsets::new(w);
    let start = Instant::now();
    let cpu0 = thread_cpu();
    let mut ops = 0u64;
    while start.elapsed() < d {
        for i in 0..64 {
            let o = off.get();
            let buf: &mut [u8] = match kind {
                PlainBuf::Heap => &mut heap[i % QD],
                // SAFETY: the bench's own memfd mapping of QD * bytes bytes,
                // alive while `map` is (this function); no other thread or
                // reference touches it; slot `i % QD` is in bounds.
                PlainBuf::Memfd => unsafe {
                    std::slice::from_raw_parts_mut(host.add((i % QD) * w.bytes), w.bytes)
                },
            };
            if w.write {
                file.write_all_at(buf, o).unwrap();
            } else {
                file.read_exact_at(buf, o).unwrap();
            }
            ops += 1;
        }
    }
    let (wall, cpu) = (start.elapsed(), thread_cpu() - cpu0);
    std::hint::black_box(&heap);
    drop(map);
    Run {
        bytes: ops * w.bytes as u64,
        ops,
        wall,
        cpu,
        fe_cpu: Duration::ZERO,
    }
}

/// One request slot of the frontend: its data pages' grants and, for
/// indirect requests, the granted indirect page.
struct Slot {
    segs: Vec<Segment>,
    indirect: Option<u32>,
}

/// Where the backend's queue runs.
enum Mode {
    /// On its own I/O thread, woken through the event channel (as in the VMM).
    Thread(#[allow(dead_code)] xenkvm::backends::blkback::QueueThread),
    /// Called by the frontend's thread after each push: the engine's own
    /// cost per I/O, without the hand-off between two threads (which on a
    /// loaded two-core host mostly measures the scheduler).
    Inline(Box<Queue>),
}

struct Backend {
    g: Arc<Guest>,
    fr: FrontRing,
    slots: Vec<Slot>,
    mode: Mode,
    /// Inline mode: CPU time spent inside the backend's `process` (the
    /// rest of the thread's is the frontend's), read around every
    /// `CPU_SAMPLE`th call (`sampled` of the `kicks` so far) and scaled.
    engine: Duration,
    kicks: u64,
    sampled: u64,
}

/// Inline mode reads the thread's CPU time around one `process` call in
/// this many (chosen pseudo-randomly). Reading it is a system call (about as costly as a ring
/// round); around every call it added about 2% to the backend's side, in
/// both its CPU and its wall-clock time, which the backend does not pay in
/// the VMM.
const CPU_SAMPLE: u64 = 8;

impl Backend {
    fn new(path: &Path, format: &str, threaded: bool) -> Backend {
        let g = Guest::new();
        let spec = format!("format={format},vdev=xvda,target={}", path.display());
        let disk = Arc::new(Disk::open(&BlkConfig::parse(&spec).unwrap()).unwrap());
        let fr = FrontRing::new(&g, 1, Abi::X86_64, true);
        assert!(fr.size as usize >= QD);
        let q = Queue::connect(
            "bench".into(),
            g.d.clone(),
            DOMID,
            g.map.clone(),
            disk,
            QueueParams {
                max_indirect: 256,
                discard: true,
                uring: xenkvm::backends::blkback::xenbus::uring_wanted(),
                persistent: if persistent_wanted() {
                    xenkvm::backends::blkback::persistent::MAX_PERSISTENT_GRANTS
                } else {
                    0
                },
            },
            &RingSetup {
                refs: fr.refs.clone(),
                port: fr.port,
                abi: Abi::X86_64,
            },
        )
        .unwrap();
        let mode = if threaded {
            Mode::Thread(start_queue(&g, q))
        } else {
            Mode::Inline(Box::new(q))
        };
        let slots = (0..QD)
            .map(|_| {
                let pages = g.alloc_pages(16);
                let segs: Vec<Segment> = pages
                    .iter()
                    .map(|&f| Segment {
                        gref: g.grant(f, false),
                        first_sect: 0,
                        last_sect: 7,
                    })
                    .collect();
                let ind = g.alloc_pages(1)[0];
                let mut page = vec![0u8; 4096];
                for (i, s) in segs.iter().enumerate() {
                    page[i * 8..i * 8 + 8].copy_from_slice(&s.encode());
                }
                g.write_mem(ind * 4096, &page);
                Slot {
                    segs,
                    // Persistent grants: the frontend lets the backend map
                    // every grant writable (blkif.h note 8).
                    indirect: Some(g.grant(ind, !persistent_wanted())),
                }
            })
            .collect();
        Backend {
            g,
            fr,
            slots,
            mode,
            engine: Duration::ZERO,
            kicks: 0,
            sampled: 0,
        }
    }

    fn request(&self, slot: usize, w: Work, off: u64) -> Request {
        let op = if w.write { RwOp::Write } else { RwOp::Read };
        let n = w.bytes / 4096;
        let s = &self.slots[slot];
        if n <= 11 {
            Request::Rw {
                op,
                handle: 0,
                id: slot as u64,
                sector: off / 512,
                segs: s.segs[..n].to_vec(),
            }
        } else {
            Request::Indirect {
                op,
                handle: 0,
                id: slot as u64,
                sector: off / 512,
                nr_segments: n as u16,
                pages: vec![s.indirect.unwrap()],
            }
        }
    }

    /// Inline mode: serve what was pushed.
    fn kick(&mut self) {
        if let Mode::Inline(q) = &mut self.mode {
            self.kicks += 1;
            // Pseudo-random calls, not every n-th: the loop's rounds may
            // alternate between kinds of call.
            let mut x = self.kicks.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^= x >> 29;
            if x % CPU_SAMPLE == 0 {
                let t = thread_cpu();
                while q.process().expect("ring") {}
                self.engine += thread_cpu() - t;
                self.sampled += 1;
            } else {
                while q.process().expect("ring") {}
            }
        }
    }

    /// Through the backend at queue depth QD.
    fn run(&mut self, w: Work, d: Duration) -> Run {
        let mut off = Offsets::new(w);
        let mut reqs: Vec<Request> = (0..QD).map(|s| self.request(s, w, 0)).collect();
        for (s, r) in reqs.iter_mut().enumerate() {
            *r = self.request(s, w, off.get());
            self.fr.queue(r);
        }
        self.fr.push();
        self.kick();
        let start = Instant::now();
        (self.engine, self.kicks, self.sampled) = (Duration::ZERO, 0, 0);
        let (me0, all0) = (thread_cpu(), process_cpu());
        let mut ops = 0u64;
        let mut out = Vec::with_capacity(QD);
        let mut draining = false;
        let mut rounds = 0u64;
        let mut outstanding = QD;
        while outstanding > 0 {
            out.clear();
            if self.fr.responses(&mut out) == 0 {
                self.g.deliver();
                if let Mode::Inline(_) = self.mode {
                    self.kick();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            for &(id, _, st) in &out {
                assert_eq!(st, RSP_OKAY, "backend error in the bench");
                ops += 1;
                outstanding -= 1;
                if !draining {
                    // The slot's request again at a new offset (no
                    // allocation: the frontend's cost is not the backend's).
                    let r = &mut reqs[id as usize];
                    let o = off.get();
                    match r {
                        Request::Rw { sector, .. } | Request::Indirect { sector, .. } => {
                            *sector = o / 512
                        }
                        _ => unreachable!("the bench builds only reads and writes"),
                    }
                    self.fr.queue(r);
                    outstanding += 1;
                }
            }
            if !draining {
                self.fr.push();
                self.kick();
                // The clock every 64 rounds (a clock read costs about as much as a ring round).
                rounds += 1;
                draining = rounds % 64 == 0 && start.elapsed() >= d;
            }
        }
        let wall = start.elapsed();
        let (me, all) = (thread_cpu() - me0, process_cpu() - all0);
        if self.sampled > 0 {
            self.engine = self.engine.mul_f64(self.kicks as f64 / self.sampled as f64);
        }
        let (cpu, fe_cpu) = match self.mode {
            Mode::Inline(_) => (
                self.engine + all.saturating_sub(me),
                me.saturating_sub(self.engine),
            ),
            Mode::Thread(_) => (all.saturating_sub(me), me),
        };
        Run {
            bytes: ops * w.bytes as u64,
            ops,
            wall,
            cpu,
            fe_cpu,
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let dir = std::env::temp_dir().join(format!("xenkvm-blkbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    {
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 31) as u8).collect();
        for _ in 0..FILE_BYTES >> 20 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    // Opened as the backend opens its disks (`O_NOATIME`: the bench's own
    // file), so that plain I/O does not pay for access-time checks the
    // backend skips.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOATIME)
            .open(&path)
            .unwrap()
    };
    let works = [
        Work {
            name: "64KiB seq read",
            bytes: 65536,
            write: false,
            random: false,
        },
        Work {
            name: "64KiB seq write",
            bytes: 65536,
            write: true,
            random: false,
        },
        Work {
            name: "4KiB rand read QD32",
            bytes: 4096,
            write: false,
            random: true,
        },
        Work {
            name: "4KiB rand write QD32",
            bytes: 4096,
            write: true,
            random: true,
        },
    ];
    let d = secs();
    let kind = if std::env::var("XENKVM_BENCH_PLAIN").as_deref() == Ok("heap") {
        PlainBuf::Heap
    } else {
        PlainBuf::Memfd
    };

    let format = std::env::var("XENKVM_BENCH_FORMAT").unwrap_or_else(|_| "raw".into());
    let served = if format == "qcow2" {
        let q = dir.join("disk.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&path)
            .arg(&q)
            .status()
            .expect("qemu-img (apt-get install qemu-utils)");
        assert!(st.success(), "qemu-img convert failed");
        q
    } else {
        path.clone()
    };
    let mut inline = Backend::new(&served, &format, false);
    let mut threaded = Backend::new(&served, &format, true);
    // Warm-up: the page cache and the paths.
    plain(&file, works[0], Duration::from_millis(300), PlainBuf::Memfd);
    inline.run(works[0], Duration::from_millis(300));
    threaded.run(works[0], Duration::from_millis(300));
    println!(
        "blkback ({format}) vs plain I/O ({} buffers for pread), file {} MiB in {}, {:.1} s per run, 2 interleaved rounds",
        if kind == PlainBuf::Heap { "heap" } else { "memfd" },
        FILE_BYTES >> 20,
        dir.display(),
        d.as_secs_f64()
    );
    println!(
        "ratio: backend IOPS / plain IOPS (wall clock); cpu ratio: plain CPU per I/O / backend CPU per I/O;\n\
         plain: the better of pread/pwrite one at a time and io_uring with 32 in flight (its MB/s and IOPS shown);\n\
         us/IO: CPU microseconds per I/O of the backend (be), the in-process frontend (fe), pread (pr) and io_uring (ur)"
    );
    println!(
        "{:<32} {:>9} {:>9} {:>10} {:>10} {:>7} {:>9} {:>6} {:>6} {:>6} {:>6}",
        "workload",
        "be MB/s",
        "be IOPS",
        "plain MB/s",
        "plain IOPS",
        "ratio",
        "cpu ratio",
        "be us",
        "fe us",
        "pr us",
        "ur us"
    );
    let only = std::env::var("XENKVM_BENCH_ONLY").unwrap_or_default();
    let mode = std::env::var("XENKVM_BENCH_MODE").unwrap_or_default();
    for (w, threads) in works
        .iter()
        .filter(|w| w.name.contains(only.as_str()))
        .flat_map(|w| [(*w, false), (*w, true)])
        .filter(|&(_, t)| mode.is_empty() || (mode == "thread") == t)
    {
        let be = if threads { &mut threaded } else { &mut inline };
        let (mut b, mut p, mut u) = (Run::default(), Run::default(), Run::default());
        for _ in 0..2 {
            p += plain(&file, w, d, kind);
            u += plain_uring(&file, w, d);
            b += be.run(w, d);
        }
        let mbs = |r: &Run| r.bytes as f64 / 1e6 / r.wall.as_secs_f64();
        let iops = |r: &Run| r.ops as f64 / r.wall.as_secs_f64();
        let us = |t: Duration, r: &Run| t.as_secs_f64() * 1e6 / r.ops as f64;
        // The better plain I/O: for the wall clock, and for the CPU.
        let fast = if iops(&u) > iops(&p) { u } else { p };
        let (pr_us, ur_us) = (us(p.cpu, &p), us(u.cpu, &u));
        let pl_us = pr_us.min(ur_us);
        let p = fast;
        println!(
            "{:<32} {:>9.1} {:>9.0} {:>10.1} {:>10.0} {:>6.2}x {:>8.2}x {:>6.2} {:>6.2} {:>6.2} {:>6.2}",
            format!(
                "{} ({})",
                w.name,
                if threads { "I/O thread" } else { "inline" }
            ),
            mbs(&b),
            iops(&b),
            mbs(&p),
            iops(&p),
            iops(&b) / iops(&p),
            pl_us / us(b.cpu, &b),
            us(b.cpu, &b),
            us(b.fe_cpu, &b),
            pr_us,
            ur_us,
        );
    }
    drop(inline);
    drop(threaded);
    let _ = std::fs::remove_dir_all(&dir);
}
