//! Event-channel latencies measured by the test guest with 2 vCPUs, next to a
//! bare I/O-port exit measured in the same run (interleaved rounds):
//! - send to upcall on another vCPU: half of a round trip vCPU 0 -> port
//!   bound to vCPU 1 -> its upcall handler sends back -> vCPU 0's upcall;
//! - SCHEDOP_poll wake-up: vCPU 0 sends on the port vCPU 1 polls, until the
//!   poll returns on vCPU 1.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, Criterion};
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
            eprintln!("SKIPPED evtchn bench: /dev/kvm is not usable");
            return None;
        }
        let cfg = VmConfig {
            kernel: TEST_GUEST_ELF.to_vec(),
            cmdline: BENCH_CMDLINE.into(),
            mem_mib: 64,
            vcpus: 2,
            stdin_console: false,
            ..Default::default()
        };
        let sink = xenkvm::devices::ConsoleOut::new(Box::new(std::io::sink()));
        let vm = Vm::create(&cfg, sink).expect("cannot create the bench VM");
        let machine = vm.machine.clone();
        let tsc_khz = u64::from(machine.clock.tsc_khz);
        std::thread::spawn(move || vm.run(None));
        Some(Guest { machine, tsc_khz })
    }

    /// Guest time per iteration of `cmd` (ns).
    fn measure(&self, cmd: u32, iters: u64) -> f64 {
        let b = &self.machine.xen.bench;
        let before = b.results.lock().len();
        b.requests.lock().push_back((cmd, iters as u32));
        b.request_cv.notify_all();
        let mut r = b.results.lock();
        while r.len() == before {
            if b.results_cv
                .wait_for(&mut r, Duration::from_secs(120))
                .timed_out()
            {
                panic!("the bench guest did not answer");
            }
        }
        let cycles = r[before];
        assert!(
            cycles > 0,
            "the guest could not run command {cmd} (needs 2 vCPUs)"
        );
        (cycles as f64 * 1_000_000.0 / self.tsc_khz as f64) / iters as f64
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(c: &mut Criterion) {
    let Some(g) = Guest::start() else { return };
    let mut group = c.benchmark_group("evtchn");
    for (name, cmd) in [
        ("bare_io_exit", bench_cmd::IO_EXIT),
        ("evtchn_round_trip_2_vcpus", bench_cmd::EVTCHN_ROUND_TRIP),
        ("poll_wakeup", bench_cmd::POLL_WAKEUP),
    ] {
        let g = &g;
        group.bench_function(name, move |b| {
            b.iter_custom(|iters| {
                Duration::from_nanos((g.measure(cmd, iters.clamp(1, 200)) * iters as f64) as u64)
            })
        });
    }
    group.finish();
    const ROUNDS: usize = 11;
    let (mut bare, mut rt, mut poll) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        bare.push(g.measure(bench_cmd::IO_EXIT, 5000));
        rt.push(g.measure(bench_cmd::EVTCHN_ROUND_TRIP, 100));
        poll.push(g.measure(bench_cmd::POLL_WAKEUP, 50));
    }
    let b = &g.machine.xen.bench;
    b.requests.lock().push_back((bench_cmd::STOP, 0));
    b.request_cv.notify_all();
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
