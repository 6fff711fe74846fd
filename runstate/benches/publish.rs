//! Schedule-out publish latency through the gpc cache, against two baselines
//! measured in the same run: the raw floor (the same stores and fences into
//! a plain heap buffer) and the naive path (resolve the GPA through vm-memory
//! on every update and write field by field with `write_obj`). Also the cache
//! `check` hit and the cost of a memory-map change with N caches over the changed frame
//! (ratio against N = 1 in the same run).
//!
//! Criterion measures each case; afterwards a short manual timing loop (median
//! of batch means) gives the numbers for the ratio table printed at the end.

use std::hint::black_box;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use gpc::{Cache, Gfn, GuestAddress, HostBuffer, MemoryMap, OverlayPage, Segment, PAGE_SIZE};
use runstate::{Layout, RunstateArea, RunstateData, State, XEN_RUNSTATE_UPDATE};
use vm_memory::Bytes;

const PS: u64 = PAGE_SIZE as u64;

fn map() -> MemoryMap {
    MemoryMap::new(&[
        (GuestAddress(0), 64 * PS),
        (GuestAddress(64 * PS), 64 * PS),
        (GuestAddress(256 * PS), 64 * PS),
    ])
    .unwrap()
}

fn data() -> RunstateData {
    RunstateData {
        state: State::Running,
        state_entry_time: 1 << 40,
        time: [1 << 39, 1 << 38, 1 << 37, 0],
    }
}

/// Next data: a schedule-out style change (entry time and one counter move).
#[inline(always)]
fn step(d: &mut RunstateData) {
    d.state_entry_time += 1000;
    d.time[0] += 1000;
}

/// The raw floor: the same stores with the same fences into a heap buffer.
#[inline(always)]
fn raw_floor(buf: &[AtomicU64; 6], d: &RunstateData) {
    let e = d.state_entry_time;
    buf[1].store(e | XEN_RUNSTATE_UPDATE, Ordering::Relaxed);
    fence(Ordering::Release);
    buf[0].store(d.state.value() as u64, Ordering::Relaxed);
    buf[1].store(e | XEN_RUNSTATE_UPDATE, Ordering::Relaxed);
    for i in 0..4 {
        buf[2 + i].store(d.time[i], Ordering::Relaxed);
    }
    fence(Ordering::Release);
    buf[1].store(e, Ordering::Relaxed);
}

/// The naive path: vm-memory resolves the GPA on every field write.
#[inline(always)]
fn naive(m: &MemoryMap, gpa: u64, layout: Layout, d: &RunstateData) {
    let g = m.guest_memory();
    let e = gpa + layout.entry_offset() as u64;
    let t = gpa + layout.time_offset() as u64;
    let entry = d.state_entry_time;
    g.write_obj(entry | XEN_RUNSTATE_UPDATE, GuestAddress(e))
        .unwrap();
    fence(Ordering::Release);
    g.write_obj(d.state.value(), GuestAddress(gpa)).unwrap();
    if layout == Layout::Native64 {
        g.write_obj(0u32, GuestAddress(gpa + 4)).unwrap();
    }
    g.write_obj(entry | XEN_RUNSTATE_UPDATE, GuestAddress(e))
        .unwrap();
    for i in 0..4 {
        g.write_obj(d.time[i], GuestAddress(t + 8 * i as u64))
            .unwrap();
    }
    fence(Ordering::Release);
    g.write_obj(entry, GuestAddress(e)).unwrap();
}

/// KVM's `kvm_xen_update_runstate_guest()` re-implemented on the same memory
/// as a baseline (RUNSTATE-SCHED.md section 6): gpc1 holds the part in the
/// area's first page, gpc2 the rest; each cache sits behind a rwlock; the
/// schedule-out path (`atomic`) only try-locks and silently drops the update
/// when it cannot get a lock or the cache is stale (counted here).
struct KvmBaseline {
    gpc1: Cache,
    lock1: parking_lot::RwLock<()>,
    gpc2: Cache,
    lock2: parking_lot::RwLock<()>,
    len1: usize,
    len2: usize,
    layout: Layout,
    dropped: AtomicU64,
}

impl KvmBaseline {
    fn new(m: &MemoryMap, gpa: u64, layout: Layout) -> KvmBaseline {
        let len = if layout == Layout::Native64 { 48 } else { 44 };
        let off = (gpa % PS) as usize;
        let (len1, len2) = if off + len >= PAGE_SIZE {
            (PAGE_SIZE - off, len - (PAGE_SIZE - off))
        } else {
            (len, 0)
        };
        let gpc1 = Cache::new(m);
        gpc1.activate_range(GuestAddress(gpa), len1).unwrap();
        let gpc2 = Cache::new(m);
        if len2 > 0 {
            gpc2.activate_range(GuestAddress(gpa + len1 as u64), len2)
                .unwrap();
        }
        KvmBaseline {
            gpc1,
            lock1: Default::default(),
            gpc2,
            lock2: Default::default(),
            len1,
            len2,
            layout,
            dropped: AtomicU64::new(0),
        }
    }

    #[inline(always)]
    fn publish(&self, d: &RunstateData, atomic: bool) {
        let drop_it = || {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        };
        let _l1 = if atomic {
            match self.lock1.try_read() {
                Some(l) => l,
                None => return drop_it(),
            }
        } else {
            self.lock1.read()
        };
        let Some(c1) = self.gpc1.guard() else {
            return drop_it();
        };
        let entry = d.state_entry_time & !XEN_RUNSTATE_UPDATE;
        // Assembled on the stack, as KVM does.
        let mut buf = [0u8; 48];
        let times_ofs = if self.layout == Layout::Native64 {
            buf = self.layout.encode64(d, entry | XEN_RUNSTATE_UPDATE);
            8
        } else {
            buf[..44].copy_from_slice(&self.layout.encode32(d, entry | XEN_RUNSTATE_UPDATE));
            4
        };
        let body = &buf[..self.len1 + self.len2];
        let set = ((entry | XEN_RUNSTATE_UPDATE) >> 56) as u8;
        let clear = (entry >> 56) as u8;
        if self.len2 == 0 {
            c1.store_u8(times_ofs + 7, set, Ordering::Relaxed).unwrap();
            fence(Ordering::Release);
            c1.write(0, body).unwrap();
            fence(Ordering::Release);
            c1.store_u8(times_ofs + 7, clear, Ordering::Relaxed)
                .unwrap();
            fence(Ordering::Release);
            return;
        }
        let _l2 = if atomic {
            match self.lock2.try_read() {
                Some(l) => l,
                None => return drop_it(),
            }
        } else {
            self.lock2.read()
        };
        let Some(c2) = self.gpc2.guard() else {
            return drop_it();
        };
        let in1 = self.len1 >= times_ofs + 8;
        let flag = |v: u8| {
            if in1 {
                c1.store_u8(times_ofs + 7, v, Ordering::Relaxed).unwrap()
            } else {
                c2.store_u8(times_ofs + 7 - self.len1, v, Ordering::Relaxed)
                    .unwrap()
            }
        };
        flag(set);
        fence(Ordering::Release);
        c1.write(0, &body[..self.len1]).unwrap();
        c2.write(0, &body[self.len1..]).unwrap();
        fence(Ordering::Release);
        flag(clear);
        fence(Ordering::Release);
    }
}

struct Variant {
    name: &'static str,
    layout: Layout,
    segs: Vec<Segment>,
    /// GPA for the naive path (single-piece variants).
    naive_gpa: Option<u64>,
}

impl Variant {
    /// Offset in a page-aligned plain buffer with the same in-page placement.
    fn floor_offset(&self) -> usize {
        (self.segs[0].gpa.0 % PS) as usize
    }
}

fn variants() -> Vec<Variant> {
    vec![
        Variant {
            name: "same_page",
            layout: Layout::Native64,
            segs: vec![Segment::new(GuestAddress(PS + 64), 48)],
            naive_gpa: Some(PS + 64),
        },
        Variant {
            name: "page_straddle",
            layout: Layout::Native64,
            segs: vec![Segment::new(GuestAddress(3 * PS - 15), 48)],
            naive_gpa: Some(3 * PS - 15),
        },
        Variant {
            name: "region_straddle",
            layout: Layout::Native64,
            segs: vec![Segment::new(GuestAddress(64 * PS - 15), 48)],
            naive_gpa: Some(64 * PS - 15),
        },
        Variant {
            name: "two_pieces",
            layout: Layout::Native64,
            segs: vec![
                Segment::new(GuestAddress(5 * PS - 15), 15),
                Segment::new(GuestAddress(260 * PS), 33),
            ],
            naive_gpa: None,
        },
        Variant {
            name: "compat32",
            layout: Layout::Compat32,
            segs: vec![Segment::new(GuestAddress(2 * PS + 64), 44)],
            naive_gpa: Some(2 * PS + 64),
        },
    ]
}

fn bench_publish(c: &mut Criterion) {
    let m = map();
    let mut g = c.benchmark_group("publish");
    let buf: [AtomicU64; 6] = Default::default();
    let mut d = data();
    g.bench_function("raw_floor_heap", |b| {
        b.iter(|| {
            step(&mut d);
            raw_floor(black_box(&buf), &d)
        })
    });
    let page = OverlayPage::new().unwrap();
    g.bench_function("raw_page_no_cache", |b| {
        b.iter(|| {
            step(&mut d);
            runstate::publish_to(black_box(&page), 64, Layout::Native64, &d, true).unwrap()
        })
    });
    let hb = HostBuffer::new(2 * PAGE_SIZE).unwrap();
    for v in variants() {
        let area = RunstateArea::new(&m);
        area.register(&v.segs, v.layout).unwrap();
        let off = v.floor_offset();
        g.bench_function(format!("floor_{}", v.name), |b| {
            b.iter(|| {
                step(&mut d);
                runstate::publish_to(black_box(&hb), off, v.layout, &d, true).unwrap()
            })
        });
        if let Some(gpa) = v.naive_gpa {
            let k = KvmBaseline::new(&m, gpa, v.layout);
            g.bench_function(format!("kvm_atomic_{}", v.name), |b| {
                let mut d = data();
                b.iter(|| {
                    step(&mut d);
                    black_box(&k).publish(&d, true)
                })
            });
        }
        g.bench_function(format!("cache_{}", v.name), |b| {
            b.iter(|| {
                step(&mut d);
                black_box(&area).publish(&d, true).unwrap()
            })
        });
        if let Some(gpa) = v.naive_gpa {
            g.bench_function(format!("naive_{}", v.name), |b| {
                b.iter(|| {
                    step(&mut d);
                    naive(black_box(&m), gpa, v.layout, &d)
                })
            });
        }
    }
    let cache = Cache::new(&m);
    cache.activate_range(GuestAddress(PS + 64), 48).unwrap();
    g.bench_function("cache_check_hit", |b| b.iter(|| black_box(&cache).check()));
    g.finish();
}

/// N caches over the frame that changes (guest frame 0, each a 48-byte area at its own
/// offset in that page), and one memory-map change there: place an overlay over the frame and
/// remove it again (each invalidates all N caches), then refresh every cache (what each
/// cache's user does at its next access).
struct MapChange {
    m: MemoryMap,
    caches: Vec<Cache>,
    page: OverlayPage,
}

impl MapChange {
    fn new(n: usize) -> Self {
        let m = MemoryMap::new(&[(GuestAddress(0), 512 * PS)]).unwrap();
        let caches: Vec<Cache> = (0..n)
            .map(|i| {
                let c = Cache::new(&m);
                let off = 8 + (i as u64 * 48) % (PS - 56);
                c.activate_range(GuestAddress(off), 48).unwrap();
                c
            })
            .collect();
        MapChange {
            m,
            caches,
            page: OverlayPage::new().unwrap(),
        }
    }

    fn run(&self) {
        self.m.place_overlay(Gfn(0), &self.page).unwrap();
        self.m.remove_overlay(Gfn(0)).unwrap();
        for c in &self.caches {
            assert!(
                !c.check(),
                "the change must invalidate every cache over the frame"
            );
            c.refresh().unwrap();
        }
    }
}

const MAP_CHANGE_N: [usize; 3] = [1, 16, 256];

fn bench_map_change(c: &mut Criterion) {
    let mut g = c.benchmark_group("map_change");
    for n in MAP_CHANGE_N {
        let mc = MapChange::new(n);
        g.bench_function(format!("overlay_place_remove_refresh_n{n}"), |b| {
            b.iter(|| mc.run())
        });
    }
    g.finish();
}

/// Median ns per call over `batches` batches of `iters` calls.
fn median_ns(mut f: impl FnMut(), iters: u32, batches: usize) -> f64 {
    for _ in 0..iters {
        f();
    }
    let mut v: Vec<f64> = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn table() {
    let m = map();
    let buf: [AtomicU64; 6] = Default::default();
    let mut d = data();
    let (it, ba) = (20_000, 101);
    let floor = median_ns(
        || {
            step(&mut d);
            raw_floor(black_box(&buf), &d)
        },
        it,
        ba,
    );
    let page = OverlayPage::new().unwrap();
    let raw_page = median_ns(
        || {
            step(&mut d);
            runstate::publish_to(black_box(&page), 64, Layout::Native64, &d, true).unwrap()
        },
        it,
        ba,
    );
    let cache = Cache::new(&m);
    cache.activate_range(GuestAddress(PS + 64), 48).unwrap();
    let check = median_ns(|| assert!(black_box(&cache).check()), it, ba);
    let hb = HostBuffer::new(2 * PAGE_SIZE).unwrap();
    println!();
    println!("runstate publish (update flag on), median of {ba} batches x {it} calls");
    println!("floor = publish_to() into a plain buffer at the same in-page offset; heap floor = 8 aligned word stores + fences");
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>11} {:>9}",
        "variant", "cache ns", "floor ns", "x floor", "x heapflr", "naive/x"
    );
    let mut naive_same = None;
    for v in variants() {
        let area = RunstateArea::new(&m);
        area.register(&v.segs, v.layout).unwrap();
        let off = v.floor_offset();
        let fl = median_ns(
            || {
                step(&mut d);
                runstate::publish_to(black_box(&hb), off, v.layout, &d, true).unwrap()
            },
            it,
            ba,
        );
        let t = median_ns(
            || {
                step(&mut d);
                black_box(&area).publish(&d, true).unwrap()
            },
            it,
            ba,
        );
        let n = v.naive_gpa.map(|gpa| {
            median_ns(
                || {
                    step(&mut d);
                    naive(black_box(&m), gpa, v.layout, &d)
                },
                it,
                ba,
            )
        });
        if v.name == "same_page" {
            naive_same = n;
        }
        // Two pieces has no single GPA for vm-memory: compared with the same-page naive path.
        let nref = n.or(naive_same).unwrap_or(f64::NAN);
        println!(
            "{:<22} {:>9.2} {:>9.2} {:>9.2} {:>11.2} {:>5.0} {:>3.0}x",
            v.name,
            t,
            fl,
            t / fl,
            t / floor,
            nref,
            nref / t
        );
    }
    println!("heap floor {floor:.2} ns; raw page (no cache, aligned) {raw_page:.2} ns");
    // (c) KVM's algorithm as a baseline on the same memory.
    println!();
    println!(
        "vs KVM's kvm_xen_update_runstate_guest (two caches when split, trylock when atomic):"
    );
    println!(
        "{:<22} {:>9} {:>12} {:>12}",
        "variant", "xenkvm ns", "kvm atomic", "kvm sleeping"
    );
    for v in variants().into_iter().filter(|v| v.naive_gpa.is_some()) {
        let gpa = v.naive_gpa.unwrap_or(0);
        let area = RunstateArea::new(&m);
        area.register(&v.segs, v.layout).unwrap();
        let k = KvmBaseline::new(&m, gpa, v.layout);
        let ours = median_ns(
            || {
                step(&mut d);
                black_box(&area).publish(&d, true).unwrap()
            },
            it,
            ba,
        );
        let ka = median_ns(
            || {
                step(&mut d);
                black_box(&k).publish(&d, true)
            },
            it,
            ba,
        );
        let ks = median_ns(
            || {
                step(&mut d);
                black_box(&k).publish(&d, false)
            },
            it,
            ba,
        );
        println!("{:<22} {:>9.2} {:>12.2} {:>12.2}", v.name, ours, ka, ks);
    }
    // Contention: another thread takes the cache lock for writing (KVM's
    // invalidation path) in a loop while the schedule-out path publishes.
    let k = std::sync::Arc::new(KvmBaseline::new(&m, PS + 64, Layout::Native64));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (k2, s2) = (k.clone(), stop.clone());
    let w = std::thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            let _g = k2.lock1.write();
            std::hint::spin_loop();
        }
    });
    let n = 2_000_000u64;
    for _ in 0..n {
        step(&mut d);
        k.publish(&d, true);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = w.join();
    println!(
        "kvm atomic path under a writer hammering gpc1's lock: {} of {n} updates dropped ({:.1} %); xenkvm drops none (the monitor defers to the vCPU thread instead)",
        k.dropped.load(Ordering::Relaxed),
        k.dropped.load(Ordering::Relaxed) as f64 * 100.0 / n as f64
    );
    println!("cache_check_hit {check:.2} ns");
    let mut base = None;
    for n in MAP_CHANGE_N {
        let mc = MapChange::new(n);
        let t = median_ns(|| mc.run(), 200, 21);
        let b = *base.get_or_insert(t);
        println!(
            "{:<24} {:>10.0} ns per place+remove+refresh, {n} caches over the changed frame, {:>6.1}x n1, {:>8.0} ns per cache",
            format!("map_change_n{n}"),
            t,
            t / b,
            t / n as f64
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = bench_publish, bench_map_change
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    table();
}
