//! Issue 16: runstate on real host scheduling, on the built-in test guest.
//! Run with `-- --nocapture` to see the numbers.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use xenkvm::devices::ConsoleOut;
use xenkvm::vmm::bench_sched::{self, SchedBench};
use xenkvm::vmm::machine::GuestExit;
use xenkvm::vmm::{Vm, VmConfig};
use xenkvm::xen::sched::Mechanism;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One VM at a time: the benchmark pins threads and a hog to CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

fn field(text: &str, key: &str) -> i64 {
    text.lines()
        .find(|l| l.contains("rscheck-result"))
        .and_then(|l| {
            l.split_ascii_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("no {key} in the guest's result:\n{text}"))
}

/// The test guest in `mode` (also the VM's name), 2 vCPUs, with `mechanism`.
fn guest_cfg(mode: &str, mechanism: &str) -> VmConfig {
    VmConfig {
        kernel: xenkvm::testing::TEST_GUEST_ELF.to_vec(),
        cmdline: mode.into(),
        mem_mib: 64,
        vcpus: 2,
        name: mode.into(),
        stdin_console: false,
        sched: Some(mechanism.into()),
        ..Default::default()
    }
}

fn rscheck(mechanism: &str) -> String {
    let _one = SERIAL.lock();
    let out = Captured::default();
    let cfg = guest_cfg("rscheck", mechanism);
    let vm = Vm::create(&cfg, ConsoleOut::new(Box::new(out.clone()))).unwrap();
    let exit = vm.run(Some(Duration::from_secs(120)));
    let text = String::from_utf8_lossy(&out.0.lock()).into_owned();
    assert_eq!(exit, GuestExit::Poweroff, "{text}");
    println!(
        "{mechanism}: {}",
        text.lines()
            .find(|l| l.contains("rscheck-result"))
            .unwrap_or("")
    );
    text
}

/// Acceptance 2b: evtchn_upcall_pending set, no callback: a 20 ms poll on an
/// unbound port blocks until its timeout and is accounted blocked.
#[test]
fn sched_poll_unrouted_upcall_pending_blocks_until_timeout() {
    if !common::kvm_available("sched_poll_unrouted_upcall_pending_blocks_until_timeout") {
        return;
    }
    let t = rscheck("sampling");
    assert_eq!(
        field(&t, "upcall_pending"),
        1,
        "the guest did not set up the case"
    );
    assert_eq!(field(&t, "poll_rc"), 0);
    // The timeout is a deadline: the poll cannot return before it.
    assert!(field(&t, "poll_ns") >= 20_000_000, "{t}");
    // The blocked interval starts after the call reads the time and ends
    // after the deadline: at least the 20 ms less the call's own entry.
    assert!(field(&t, "poll_blocked_ns") >= 19_000_000, "{t}");
    assert_eq!(field(&t, "invariant_ok"), 1);
}

/// An AP that INIT/SIPI has not started is down: Xen counts its time
/// offline, whatever its thread does in KVM_RUN meanwhile (sampled, it read
/// as running; from context-switch records, its wait read as blocked).
#[test]
fn sched_ap_not_started_yet_is_offline() {
    if !common::kvm_available("sched_ap_not_started_yet_is_offline") {
        return;
    }
    let best = Mechanism::choose(Some("best")).name();
    for mech in [best, "sampling"] {
        let _one = SERIAL.lock();
        let out = Captured::default();
        // Prints and never starts vCPU 1.
        let cfg = guest_cfg("chatter", mech);
        let vm = Vm::create(&cfg, ConsoleOut::new(Box::new(out.clone()))).unwrap();
        let mut times = None;
        vm.run_with(Some(Duration::from_secs(60)), |m| {
            let o = out.clone();
            let until = std::time::Instant::now() + Duration::from_secs(30);
            while !String::from_utf8_lossy(&o.0.lock()).contains("chatter 20")
                && std::time::Instant::now() < until
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            times = Some((m.xen.runstate_times(0), m.xen.runstate_times(1)));
            m.request_exit(GuestExit::Poweroff);
        });
        let (t0, t1) = times.unwrap();
        let text = String::from_utf8_lossy(&out.0.lock()).into_owned();
        assert!(
            text.contains("chatter 20"),
            "{mech}: the guest did not run:\n{text}"
        );
        assert!(t0[0] > 0, "{mech}: vCPU 0 ran: {t0:?}");
        assert_eq!(
            &t1[..3],
            &[0, 0, 0],
            "{mech}: vCPU 1, never started, shows running/runnable/blocked time: {t1:?}"
        );
        assert!(
            t1[3] >= t0[0],
            "{mech}: vCPU 1 offline less than vCPU 0 ran: {t1:?} {t0:?}"
        );
    }
}

/// Acceptance 2a: a vCPU halted in the in-kernel irqchip accumulates blocked
/// (with context-switch records; sampling cannot see in-kernel halts).
#[test]
fn sched_idle_vcpu_halted_in_kernel_accumulates_blocked() {
    if !common::kvm_available("sched_idle_vcpu_halted_in_kernel_accumulates_blocked") {
        return;
    }
    let m = Mechanism::choose(Some("best"));
    if matches!(m, Mechanism::Sampling { .. }) {
        eprintln!("SKIPPED: no context-switch records here ({m})");
        return;
    }
    let t = rscheck(m.name());
    let (blocked, running) = (field(&t, "idle_blocked_ns"), field(&t, "idle_running_ns"));
    assert_eq!(
        field(&t, "idle_state"),
        2,
        "vCPU 1 halted but not shown blocked:\n{t}"
    );
    assert!(blocked > running, "halted vCPU counted running: {t}");
    assert_eq!(field(&t, "invariant_ok"), 1);
}

/// Acceptance 1 (what can be asserted without timing): with a hog beside
/// vCPU 0, the guest never reads its own area saying runnable while it runs,
/// the invariant holds, and with records some preemption was shown runnable.
#[test]
fn sched_hog_beside_vcpu0_preemption_shown_never_to_itself() {
    if !common::kvm_available("sched_hog_beside_vcpu0_preemption_shown_never_to_itself") {
        return;
    }
    let _one = SERIAL.lock();
    for mech in [Mechanism::choose(Some("best")).name(), "sampling"] {
        let r = bench_sched::run(&SchedBench {
            secs: 2,
            hog_on_ms: 20,
            hog_off_ms: 30,
            mechanism: Some(mech.into()),
            watcher_fifo: false,
        })
        .unwrap();
        println!(
            "{mech}: preemptions >1 ms {} shown {} (host p50 {:.1} us p99 {:.1} us); guest saw {} \
             (p50 {:.1} us p99 {:.1} us); self-runnable {}; runnable {:.1} ms vs run_delay {:.1} ms",
            r.host_over_1ms,
            r.host_over_1ms_visible,
            r.host_visible_p50_us,
            r.host_visible_p99_us,
            r.guest_runnable_seen,
            r.guest_runnable_p50_us,
            r.guest_runnable_p99_us,
            r.guest_self_runnable,
            r.runnable_ms,
            r.run_delay_ms
        );
        assert_eq!(
            r.guest_self_runnable, 0,
            "{mech}: the guest saw itself runnable"
        );
        assert!(r.invariant_ok, "{mech}");
        if mech != "sampling" && r.host_over_1ms > 0 {
            assert!(
                r.host_over_1ms_visible > 0,
                "{mech}: no preemption shown: {r:?}"
            );
        }
    }
}

/// `bench sched` for 2 s with `mechanism`, a hog 20 ms on / 30 ms off
/// beside vCPU 0; `None` (said as a skip) without KVM or BPF here.
fn bpf_hog_run(test: &str, mechanism: &str) -> Option<bench_sched::SchedResult> {
    if !common::kvm_available(test) {
        return None;
    }
    if let Err(e) = xenkvm::host::bpf::SchedBpf::load() {
        common::skip(
            test,
            &format!(
                "BPF not permitted here (needs root/CAP_BPF+CAP_PERFMON and {}): {e}",
                xenkvm::host::bpf::VMLINUX_BTF
            ),
        );
        return None;
    }
    let _one = SERIAL.lock();
    Some(
        bench_sched::run(&SchedBench {
            secs: 2,
            hog_on_ms: 20,
            hog_off_ms: 30,
            mechanism: Some(mechanism.into()),
            watcher_fifo: false,
        })
        .unwrap(),
    )
}

/// The BPF mechanism (root and kernel BTF): a hog pinned beside vCPU 0's
/// thread preempts it, the program reports it, and the area shows runnable
/// to vCPU 1.
#[test]
fn sched_bpf_hog_beside_vcpu0_preemption_seen_and_shown() {
    let Some(r) = bpf_hog_run(
        "sched_bpf_hog_beside_vcpu0_preemption_seen_and_shown",
        "bpf",
    ) else {
        return;
    };
    println!(
        "bpf: preemptions >1 ms {} shown {} (host p50 {:.1} us p99 {:.1} us), self-inflicted {}, lost {}; \
         guest saw {}; runnable {:.1} ms vs run_delay {:.1} ms",
        r.host_over_1ms,
        r.host_over_1ms_visible,
        r.host_visible_p50_us,
        r.host_visible_p99_us,
        r.self_inflicted,
        r.lost,
        r.guest_runnable_seen,
        r.runnable_ms,
        r.run_delay_ms
    );
    assert_eq!(r.mechanism, "bpf", "BPF loaded but the VM did not use it");
    assert!(
        r.host_over_1ms > 0,
        "the program saw no preemption of vCPU 0: {r:?}"
    );
    assert!(
        r.host_over_1ms_visible > 0,
        "no preemption shown runnable: {r:?}"
    );
    assert!(
        r.guest_runnable_seen > 0,
        "vCPU 1 never saw vCPU 0 runnable: {r:?}"
    );
    assert_eq!(r.guest_self_runnable, 0, "the guest saw itself runnable");
    assert!(r.invariant_ok);
    // With vCPU 1 on a CPU of its own, it also sees vCPU 0 running again
    // after a preemption (never while both vCPUs shared CPU 0: the bench's
    // main thread was left pinned there and every thread inherited it).
    if xenkvm::host::cpu::online_cpus() >= 2 {
        assert!(
            r.guest_running_seen > 0,
            "vCPU 1 never saw vCPU 0 running again after runnable: {r:?}"
        );
    }
}

/// `bpf-direct`: the program writes running into vCPU 0's area at its
/// thread's switch-in (the area's page is the program's, placed over the
/// guest's page), so shown preemptions need no kick. vCPU 1 sees runnable
/// and running again; accounting stays with `run_delay`. The guest may see
/// itself runnable only after a switch-in neither `sched_switch` nor
/// `sched_exit_tp` reported (`missed_in`: none seen since the second was
/// added; this host's `sched_switch` alone misses a few, `late_in`).
#[test]
fn sched_bpf_direct_publishes_running_at_the_switch_in_without_kicks() {
    let Some(r) = bpf_hog_run(
        "sched_bpf_direct_publishes_running_at_the_switch_in_without_kicks",
        "bpf-direct",
    ) else {
        return;
    };
    println!(
        "bpf-direct: preemptions >1 ms {} shown {}; running published by the program {}, kicked {}; \
         switch-ins found late {}, not reported {}; guest saw runnable {} running {}, itself runnable {}; runnable {:.1} ms vs run_delay {:.1} ms",
        r.host_over_1ms,
        r.host_over_1ms_visible,
        r.direct_published,
        r.direct_kicked,
        r.late_in,
        r.missed_in,
        r.guest_runnable_seen,
        r.guest_running_seen,
        r.guest_self_runnable,
        r.runnable_ms,
        r.run_delay_ms
    );
    assert_eq!(
        r.mechanism, "bpf-direct",
        "the program did not take over: {r:?}"
    );
    assert!(r.host_over_1ms_visible > 0, "nothing shown: {r:?}");
    assert!(
        r.direct_published * 2 > r.host_over_1ms_visible,
        "most shown preemptions end with the program's running: {r:?}"
    );
    assert!(r.guest_runnable_seen > 0, "{r:?}");
    if xenkvm::host::cpu::online_cpus() >= 2 {
        assert!(r.guest_running_seen > 0, "{r:?}");
    }
    assert!(r.invariant_ok);
    if r.missed_in == 0 {
        assert_eq!(r.guest_self_runnable, 0, "the guest saw itself runnable");
    }
    // A switch-in found late (after a switch `sched_switch` did not report,
    // away from the sandbox's own threads) ends a wait the kernel's
    // `run_delay` counts differently: runnable came out 0.2-1.7 % above it
    // in such runs (0-3 late a run), exactly on it in runs without.
    if r.missed_in == 0 && r.late_in == 0 {
        assert!(
            r.accounting_error_pct < 1.0,
            "runnable {:.1} ms vs run_delay {:.1} ms",
            r.runnable_ms,
            r.run_delay_ms
        );
    }
}

/// Without CAP_BPF/CAP_PERFMON/CAP_SYS_ADMIN the BPF load is refused: the
/// VM falls back (unprivileged perf here, or sampling) and still runs.
#[test]
fn sched_bpf_refused_without_caps_falls_back_and_runs() {
    let name = "sched_bpf_refused_without_caps_falls_back_and_runs";
    if !common::kvm_available(name) {
        return;
    }
    if xenkvm::host::bpf::SchedBpf::load().is_err() {
        common::skip(
            name,
            "BPF is refused here already (see the privileged test)",
        );
        return;
    }
    let Ok(capsh) = which("capsh") else {
        common::skip(name, "no capsh (libcap2-bin) to drop capabilities");
        return;
    };
    let _one = SERIAL.lock();
    let bin = common::xenkvm_bin();
    let out = std::process::Command::new(capsh)
        .arg("--drop=cap_bpf,cap_perfmon,cap_sys_admin")
        .arg("--")
        .arg("-c")
        .arg(format!(
            "XENKVM_SCHED=bpf exec {} bench sched --secs 1 --mechanism bpf --json",
            bin.display()
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let mech = v["preempted"][0]["mechanism"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    println!(
        "without caps: the VM used {mech}; best: {}",
        v["host"]["best_mechanism"]
    );
    assert_ne!(mech, "bpf", "BPF used without the capabilities");
    assert!(
        ["perf-batched", "sampling"].contains(&mech.as_str()),
        "{mech}"
    );
    assert!(!v["host"]["best_mechanism"]
        .as_str()
        .unwrap_or("")
        .contains("BPF"));
}

fn which(cmd: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .ok_or(())
}

/// `bpf-direct` with the test guest's own checks (24 of them): the page
/// placed under a newly registered area pauses every vCPU, and the guest
/// must not notice. Before, 6 runs in 8 failed the runstate check: the
/// pause came after the registration returned, between the guest reading
/// the clock and polling (a 1 ms poll ended after 0.2 ms), and once the
/// pause was taken before the guest ran again, the records' view of the
/// pause (a sleep: blocked) was still published when it did (the guest read
/// its own area as blocked). Three runs: the race showed in most runs.
#[test]
fn sched_bpf_direct_test_guest_passes_every_check() {
    let name = "sched_bpf_direct_test_guest_passes_every_check";
    if !common::kvm_available(name) {
        return;
    }
    if let Err(e) = xenkvm::host::bpf::SchedBpf::load() {
        common::skip(name, &format!("BPF not permitted here: {e}"));
        return;
    }
    let _one = SERIAL.lock();
    for run in 0..3 {
        let out = std::process::Command::new(common::xenkvm_bin())
            .args(["demo", "--timeout", "60", "--console-input", "none"])
            .env("XENKVM_SCHED", "bpf-direct")
            .env("XENKVM_LOG", "info")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("running published by the BPF program at switch-ins"),
            "run {run}: the program's page was not placed:\n{text}"
        );
        assert!(
            out.status.success() && text.contains("24 checks, 0 failed"),
            "run {run}:\n{text}"
        );
    }
}
