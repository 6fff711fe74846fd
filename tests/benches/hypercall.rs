//! Guest-measured round trip of a cheap hypercall (`xen_version`) through
//! the hypercall page, next to a bare I/O-port exit measured in the same
//! run by the same guest, and their ratio (target: at most 1.15).
//!
//! The project's test guest runs in bench mode: it reads a command and an
//! iteration count from I/O ports, runs the loop between two fenced
//! `rdtsc`s and reports the cycles. Criterion drives it with `iter_custom`.

use std::time::Duration;

use criterion::{criterion_group, Criterion};
use xenkvm::testing::bench_cmd;

#[path = "bench_guest.rs"]
mod bench_guest;
use bench_guest::{median, BenchGuest};

/// The variants, in the order they are measured.
const VARIANTS: [(&str, u32, &str); 4] = [
    (
        "bare_io_exit",
        bench_cmd::IO_EXIT,
        "bare I/O-port exit (outl)",
    ),
    (
        "xen_version_hypercall_page",
        bench_cmd::XEN_VERSION,
        "xen_version via the hypercall page",
    ),
    (
        "xen_version_stub_near_stack",
        bench_cmd::STUB_XEN_VERSION,
        "xen_version via a stub next to the stack",
    ),
    (
        "no_xen_stub_near_stack",
        bench_cmd::STUB_EXIT,
        "same stub shape, no Xen work",
    ),
];

fn bench(c: &mut Criterion) {
    let Some(g) = BenchGuest::start(1) else {
        return;
    };
    let mut group = c.benchmark_group("guest_round_trip");
    for (name, cmd, _) in VARIANTS {
        let g = &g;
        group.bench_function(name, move |b| b.iter_custom(|iters| g.measure(cmd, iters)));
    }
    group.finish();
    // Criterion's groups run one after the other, so host drift between them
    // would enter a ratio of their results. The ratios are taken from
    // interleaved rounds instead: each round measures every variant back to
    // back; the median of the per-round ratios is reported.
    const ROUNDS: usize = 21;
    const N: u64 = 20_000;
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut vmm: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    for _ in 0..ROUNDS {
        let t: Vec<(f64, f64)> = VARIANTS
            .iter()
            .map(|&(_, cmd, _)| g.ns_and_vmm_per_iter(cmd, N))
            .collect();
        for i in 0..VARIANTS.len() {
            per[i].push(t[i].0);
            vmm[i].push(t[i].1);
            ratios[i].push(t[i].0 / t[0].0);
        }
    }
    g.stop();
    println!("\nguest-measured round trips, interleaved, {ROUNDS} rounds x {N} calls (medians):");
    println!(
        "  {:<44} {:>9} {:>9} {:>9}",
        "variant", "ns", "VMM ns", "vs bare"
    );
    for (i, (_, _, label)) in VARIANTS.iter().enumerate() {
        println!(
            "  {label:<44} {:>9.0} {:>9.0} {:>9.3}",
            median(&mut per[i]),
            median(&mut vmm[i]),
            median(&mut ratios[i])
        );
    }
    println!("  (VMM ns: the vCPU thread's own handling of the exit, in the same calls)");
    println!("  target: xen_version / bare exit <= 1.15");
    println!("  (on a shadow-paging host every page block touched after an exit costs a refill:");
    println!("   the hypercall page sits in a block of its own, the stub page shares the stack's)");
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
