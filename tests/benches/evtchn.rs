//! Event-channel latencies measured by the test guest with 2 vCPUs, next to a
//! bare I/O-port exit measured in the same run (interleaved rounds):
//! - send to upcall on another vCPU: half of a round trip vCPU 0 -> port
//!   bound to vCPU 1 -> its upcall handler sends back -> vCPU 0's upcall;
//! - SCHEDOP_poll wake-up: vCPU 0 sends on the port vCPU 1 polls, until the
//!   poll returns on vCPU 1.

use std::time::Duration;

use criterion::{criterion_group, Criterion};
use xenkvm::testing::bench_cmd;

#[path = "bench_guest.rs"]
mod bench_guest;
use bench_guest::{median, BenchGuest};

fn bench(c: &mut Criterion) {
    let Some(g) = BenchGuest::start(2) else {
        return;
    };
    let mut group = c.benchmark_group("evtchn");
    for (name, cmd) in [
        ("bare_io_exit", bench_cmd::IO_EXIT),
        ("evtchn_round_trip_2_vcpus", bench_cmd::EVTCHN_ROUND_TRIP),
        ("poll_wakeup", bench_cmd::POLL_WAKEUP),
    ] {
        let g = &g;
        // The guest runs exactly the iteration count criterion asks for and reports the
        // guest time it took (poll_wakeup: the sum of the wake-ups, without the 200 us gap
        // the guest leaves before each send).
        group.bench_function(name, move |b| b.iter_custom(|iters| g.measure(cmd, iters)));
    }
    group.finish();
    const ROUNDS: usize = 11;
    let (mut bare, mut rt, mut poll) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        bare.push(g.ns_per_iter(bench_cmd::IO_EXIT, 5000));
        rt.push(g.ns_per_iter(bench_cmd::EVTCHN_ROUND_TRIP, 100));
        poll.push(g.ns_per_iter(bench_cmd::POLL_WAKEUP, 50));
    }
    g.stop();
    let (bare, rt, poll) = (median(&mut bare), median(&mut rt), median(&mut poll));
    println!("\nevent channels, 2 vCPUs, interleaved {ROUNDS} rounds (medians, guest-measured):");
    println!("  bare I/O-port exit                         {bare:>10.0} ns   1.0x");
    println!(
        "  send -> upcall on the other vCPU (rt / 2)  {:>10.0} ns   {:.1}x",
        rt / 2.0,
        rt / 2.0 / bare
    );
    println!(
        "  SCHEDOP_poll wake-up (send -> return)      {poll:>10.0} ns   {:.1}x",
        poll / bare
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    targets = bench
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
