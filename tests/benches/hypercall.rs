//! Guest-measured round trip of a cheap hypercall (`xen_version`) through
//! the hypercall page, next to a bare I/O-port exit measured in the same
//! run by the same guest, and their ratio (target: at most 1.15).
//!
//! The project's test guest runs in bench mode: it reads a command and an
//! iteration count from I/O ports, runs the loop between two fenced
//! `rdtsc`s and reports the cycles. Criterion drives it with `iter_custom`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, Criterion};
use parking_lot::Mutex;
use xenkvm::machine::Machine;
use xenkvm::test_guest::{bench_cmd, BENCH_CMDLINE, TEST_GUEST_ELF};
use xenkvm::vm::{Vm, VmConfig};

struct Guest {
    machine: Arc<Machine>,
    tsc_khz: u64,
}

impl Guest {
    fn start() -> Option<Guest> {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            eprintln!("SKIPPED hypercall bench: /dev/kvm is not usable");
            return None;
        }
        let cfg = VmConfig {
            kernel: TEST_GUEST_ELF.to_vec(),
            cmdline: BENCH_CMDLINE.into(),
            mem_mib: 64,
            ..Default::default()
        };
        let sink = xenkvm::devices::ConsoleOut::new(Box::new(std::io::sink()));
        let vm = Vm::create(&cfg, sink).expect("cannot create the bench VM");
        let machine = vm.machine.clone();
        let tsc_khz = u64::from(machine.clock.tsc_khz);
        std::thread::spawn(move || vm.run(None));
        Some(Guest { machine, tsc_khz })
    }

    /// Runs `iters` iterations of `cmd` in the guest; returns guest time.
    fn measure(&self, cmd: u32, iters: u64) -> Duration {
        let b = &self.machine.xen.bench;
        let iters = iters.clamp(1, u64::from(u32::MAX)) as u32;
        let before = b.results.lock().len();
        b.requests.lock().push_back((cmd, iters));
        b.request_cv.notify_all();
        let mut r = b.results.lock();
        while r.len() == before {
            if b.results_cv
                .wait_for(&mut r, Duration::from_secs(60))
                .timed_out()
            {
                panic!("the bench guest did not answer");
            }
        }
        let cycles = r[before];
        Duration::from_nanos((u128::from(cycles) * 1_000_000 / u128::from(self.tsc_khz)) as u64)
    }

    fn stop(&self) {
        let b = &self.machine.xen.bench;
        b.requests.lock().push_back((bench_cmd::STOP, 0));
        b.request_cv.notify_all();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(c: &mut Criterion) {
    let Some(g) = Guest::start() else { return };
    let samples: [Mutex<Vec<f64>>; 3] = Default::default();
    let mut group = c.benchmark_group("guest_round_trip");
    for (i, (name, cmd)) in [
        ("bare_io_exit", bench_cmd::IO_EXIT),
        ("xen_version_hypercall", bench_cmd::XEN_VERSION),
        ("stub_page_exit_no_xen", bench_cmd::STUB_EXIT),
    ]
    .into_iter()
    .enumerate()
    {
        let s = &samples[i];
        let g = &g;
        group.bench_function(name, move |b| {
            b.iter_custom(|iters| {
                let d = g.measure(cmd, iters);
                s.lock().push(d.as_nanos() as f64 / iters as f64);
                d
            })
        });
    }
    group.finish();
    let bare = median(&mut samples[0].lock());
    let hc = median(&mut samples[1].lock());
    let stub = median(&mut samples[2].lock());
    println!("\nguest-measured round trip, criterion groups (median of per-sample means):");
    println!("  bare I/O-port exit                     {bare:>9.0} ns");
    println!("  xen_version through the hypercall page {hc:>9.0} ns");
    println!("  same call shape, stub page, no Xen     {stub:>9.0} ns");
    // The groups above run one after the other, so host drift between them
    // enters their ratio. The ratio is taken from interleaved rounds instead:
    // each round measures the three back to back, and the median of the
    // per-round ratios is reported.
    const ROUNDS: usize = 21;
    const N: u64 = 20_000;
    let (mut r_bare, mut r_stub) = (Vec::new(), Vec::new());
    let mut per = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        let t: Vec<f64> = [
            bench_cmd::IO_EXIT,
            bench_cmd::XEN_VERSION,
            bench_cmd::STUB_EXIT,
        ]
        .iter()
        .map(|&c| g.measure(c, N).as_nanos() as f64 / N as f64)
        .collect();
        r_bare.push(t[1] / t[0]);
        r_stub.push(t[1] / t[2]);
        for i in 0..3 {
            per[i].push(t[i]);
        }
    }
    println!("interleaved, {ROUNDS} rounds x {N} calls each (medians):");
    println!(
        "  bare {:.0} ns, xen_version {:.0} ns, no-Xen stub {:.0} ns",
        median(&mut per[0]),
        median(&mut per[1]),
        median(&mut per[2])
    );
    println!(
        "  ratio hypercall / bare exit            {:>9.3}   (target <= 1.15)",
        median(&mut r_bare)
    );
    println!(
        "  ratio hypercall / no-Xen stub exit     {:>9.3}   (xenkvm's own share)",
        median(&mut r_stub)
    );
    g.stop();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
