//! Event channels and Xen timers next to the LAPIC deliveries they ride on,
//! measured by the test guest (2 vCPUs) in one run, in interleaved rounds
//! (issue 12). Each Xen path has a floor that the same host charges for the
//! same delivery without Xen:
//! - event-channel send to the upcall on the other vCPU (halted, running):
//!   half of a round trip vCPU 0 -> vCPU 1's port -> its upcall handler
//!   sends back -> vCPU 0's upcall; floor: the same round trip with LAPIC
//!   fixed IPIs (one ICR write each way, as one `EVTCHNOP_send` each way);
//! - a send on the vCPU's own port until its upcall ran; floor: a LAPIC
//!   self IPI until its handler ran; and, to split delivery from the
//!   guest's upcall handling, the same event marked pending by the guest
//!   itself and delivered by a LAPIC self IPI on the upcall vector (the
//!   same handler runs, no hypercall, no VMM);
//! - `SCHEDOP_poll` wake-up (send on vCPU 0 until the poll returns on vCPU
//!   1); floor: the one-way LAPIC IPI to a halted vCPU;
//! - `VIRQ_TIMER` one-shot lateness (upcall minus deadline, guest-measured);
//!   floor: the host's own timerfd lateness (deadline to the VMM's event
//!   loop seeing the timerfd, measured by the VMM for the same timers) plus
//!   one exit; and the guest's own LAPIC timer (one-shot, run by KVM)
//!   measured the same way: the same delivery without Xen.
//!
//! Criterion lines run exactly the iteration count criterion asks for and
//! report guest time (the timer line: the mean lateness per one-shot).

use std::time::Duration;

use criterion::{criterion_group, Criterion};
use xenkvm::testing::bench_cmd as cmd;

#[path = "bench_guest.rs"]
mod bench_guest;
use bench_guest::{median, BenchGuest};

fn bench(c: &mut Criterion) {
    let Some(g) = BenchGuest::start(2) else {
        return;
    };
    let mut group = c.benchmark_group("evtchn");
    for (name, cmd) in [
        ("bare_io_exit", cmd::IO_EXIT),
        ("lapic_ipi_round_trip_halted", cmd::LAPIC_ROUND_TRIP),
        ("evtchn_round_trip_halted", cmd::EVTCHN_ROUND_TRIP),
        (
            "lapic_ipi_round_trip_running",
            cmd::LAPIC_ROUND_TRIP_RUNNING,
        ),
        ("evtchn_round_trip_running", cmd::EVTCHN_ROUND_TRIP_RUNNING),
        ("lapic_self_ipi", cmd::LAPIC_SELF),
        ("evtchn_self_event", cmd::EVTCHN_SELF),
        ("poll_wakeup", cmd::POLL_WAKEUP),
        ("virq_timer_oneshot_lateness", cmd::TIMER_LATENESS),
        ("lapic_timer_oneshot_lateness", cmd::LAPIC_TIMER_LATENESS),
        ("self_event_marked_by_guest_lapic", cmd::SELF_MARKED_LAPIC),
    ] {
        let g = &g;
        group.bench_function(name, move |b| b.iter_custom(|iters| g.measure(cmd, iters)));
    }
    group.finish();

    const ROUNDS: usize = 11;
    // (guest ns, VMM ns) per delivery, per row; rows in the table's order.
    let mut v: Vec<[Vec<f64>; 2]> = (0..11).map(|_| Default::default()).collect();
    let mut host_timer = Vec::new();
    let mut push = |i: usize, (ns, vmm): (f64, f64), per: f64| {
        v[i][0].push(ns / per);
        v[i][1].push(vmm / per);
    };
    for _ in 0..ROUNDS {
        push(0, g.ns_and_vmm_per_iter(cmd::IO_EXIT, 5000), 1.0);
        push(1, g.ns_and_vmm_per_iter(cmd::LAPIC_ROUND_TRIP, 100), 2.0);
        push(2, g.ns_and_vmm_per_iter(cmd::EVTCHN_ROUND_TRIP, 100), 2.0);
        push(
            3,
            g.ns_and_vmm_per_iter(cmd::LAPIC_ROUND_TRIP_RUNNING, 100),
            2.0,
        );
        push(
            4,
            g.ns_and_vmm_per_iter(cmd::EVTCHN_ROUND_TRIP_RUNNING, 100),
            2.0,
        );
        push(5, g.ns_and_vmm_per_iter(cmd::LAPIC_SELF, 100), 1.0);
        push(6, g.ns_and_vmm_per_iter(cmd::EVTCHN_SELF, 100), 1.0);
        push(7, g.ns_and_vmm_per_iter(cmd::POLL_WAKEUP, 50), 1.0);
        let (n0, late0) = g.machine.xen.timer_lateness();
        push(8, g.ns_and_vmm_per_iter(cmd::TIMER_LATENESS, 50), 1.0);
        let (n1, late1) = g.machine.xen.timer_lateness();
        host_timer.push((late1 - late0) as f64 / (n1 - n0).max(1) as f64);
        push(9, g.ns_and_vmm_per_iter(cmd::LAPIC_TIMER_LATENESS, 50), 1.0);
        push(10, g.ns_and_vmm_per_iter(cmd::SELF_MARKED_LAPIC, 100), 1.0);
    }
    g.stop();
    let m: Vec<(f64, f64)> = v.iter_mut().map(|[a, b]| (median(a), median(b))).collect();
    let (bare, host_timer) = (m[0].0, median(&mut host_timer));
    println!(
        "\nevent channels and Xen timers, 2 vCPUs, {ROUNDS} interleaved rounds \
         (medians, ns per delivery; VMM = the vCPU threads' own exit handling)"
    );
    println!(
        "  {:<40} {:>8} {:>7}   {:<20} {:>8} {:>7}   {:>6}",
        "delivery", "Xen", "VMM", "floor", "", "VMM", "ratio"
    );
    let row = |name: &str, x: (f64, f64), floor_name: &str, f: (f64, f64)| {
        println!(
            "  {name:<40} {:>8.0} {:>7.0}   {floor_name:<20} {:>8.0} {:>7.0}   {:>5.2}x",
            x.0,
            x.1,
            f.0,
            f.1,
            x.0 / f.0
        );
    };
    row(
        "send -> upcall, other vCPU halted",
        m[2],
        "LAPIC IPI, halted",
        m[1],
    );
    row(
        "send -> upcall, other vCPU running",
        m[4],
        "LAPIC IPI, running",
        m[3],
    );
    row("send -> upcall, own vCPU", m[6], "LAPIC self IPI", m[5]);
    row(
        "send -> upcall, own vCPU",
        m[6],
        "guest-marked + LAPIC",
        m[10],
    );
    row(
        "SCHEDOP_poll wake-up (send -> return)",
        m[7],
        "LAPIC IPI, halted",
        m[1],
    );
    row(
        "VIRQ_TIMER one-shot lateness",
        m[8],
        "host timerfd + exit",
        (host_timer + bare, m[0].1),
    );
    row(
        "VIRQ_TIMER one-shot lateness",
        m[8],
        "LAPIC timer one-shot",
        m[9],
    );
    println!(
        "  (bare I/O-port exit {bare:.0} ns, of which VMM {:.0} ns; host timerfd lateness {host_timer:.0} ns)",
        m[0].1
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
