//! The benchmarks' guest side works: every bench command of the test guest
//! (`cargo bench --bench hypercall|evtchn`) answers with a measurement. A
//! broken port range or guest loop shows up here, not only when somebody
//! runs the benchmarks (which take minutes).

mod common;

// The benchmarks use more of the driver than this test does.
#[allow(dead_code)]
#[path = "benches/bench_guest.rs"]
mod bench_guest;

use xenkvm::testing::bench_cmd as cmd;

#[test]
fn bench_guest_every_command_returns_a_measurement() {
    if !common::kvm_available("bench_guest_every_command_returns_a_measurement") {
        return;
    }
    let g = bench_guest::BenchGuest::start(2).expect("/dev/kvm is usable");
    for (name, c, n) in [
        ("IO_EXIT", cmd::IO_EXIT, 10),
        ("XEN_VERSION", cmd::XEN_VERSION, 10),
        ("STUB_EXIT", cmd::STUB_EXIT, 10),
        ("STUB_XEN_VERSION", cmd::STUB_XEN_VERSION, 10),
        ("EVTCHN_ROUND_TRIP", cmd::EVTCHN_ROUND_TRIP, 3),
        ("POLL_WAKEUP", cmd::POLL_WAKEUP, 3),
        ("LAPIC_ROUND_TRIP", cmd::LAPIC_ROUND_TRIP, 3),
        ("LAPIC_ROUND_TRIP_RUNNING", cmd::LAPIC_ROUND_TRIP_RUNNING, 3),
        (
            "EVTCHN_ROUND_TRIP_RUNNING",
            cmd::EVTCHN_ROUND_TRIP_RUNNING,
            3,
        ),
        ("EVTCHN_SELF", cmd::EVTCHN_SELF, 3),
        ("LAPIC_SELF", cmd::LAPIC_SELF, 3),
        ("TIMER_LATENESS", cmd::TIMER_LATENESS, 3),
        ("LAPIC_TIMER_LATENESS", cmd::LAPIC_TIMER_LATENESS, 3),
        ("SELF_MARKED_LAPIC", cmd::SELF_MARKED_LAPIC, 3),
    ] {
        // measure() panics (with the guest's console) if the guest gives
        // no answer or reports that it could not run the command.
        let d = g.measure(c, n);
        println!("{name}: {n} iterations, {d:?}");
    }
    let (fired, _) = g.machine.xen.timer_lateness();
    assert!(fired >= 3, "the VMM saw {fired} vCPU timers fire");
    g.stop();
}
