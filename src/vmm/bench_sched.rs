//! `xenkvm bench sched`: schedule-out visibility on the built-in test guest
//! (issue 16). The guest's vCPU 0 spins while its vCPU 1 watches vCPU 0's
//! runstate area (`schedwatch` mode of tests/guest); a hog thread pinned to
//! vCPU 0's CPU preempts it in bursts. Reported: how many host preemptions
//! vCPU 1 saw as runnable and how late (from the guest, against the area's
//! own entry time, and from the host's records), running after switch-in,
//! whether vCPU 0 ever saw itself runnable while it ran, runnable against
//! the thread's `run_delay`, and the guest's throughput.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::devices::ConsoleOut;
use crate::host::cpu;
use crate::vmm::threads::{self, ThreadKind};
use crate::vmm::{Vm, VmConfig};

/// What to run.
#[derive(Clone, Debug)]
pub struct SchedBench {
    /// Seconds vCPU 1 watches.
    pub secs: u32,
    /// The hog runs this long...
    pub hog_on_ms: u32,
    /// ...then sleeps this long (0 on: no hog).
    pub hog_off_ms: u32,
    /// `bpf`, `perf`, `perf-batched`, `sampling` or `None` (best).
    pub mechanism: Option<String>,
    /// Make vCPU 1's thread (the watcher) SCHED_FIFO 1 for the run, so that
    /// the numbers show the mechanism rather than how long vCPU 1 itself
    /// waits for a CPU on a loaded host.
    pub watcher_fifo: bool,
}

/// One run's numbers.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SchedResult {
    pub mechanism: String,
    pub hog: String,
    /// From the guest (vCPU 1 reading vCPU 0's area).
    pub guest_runnable_seen: u64,
    pub guest_runnable_p50_us: f64,
    pub guest_runnable_p99_us: f64,
    /// Of those, seen while vCPU 1 had stayed on its CPU since the
    /// switch-out (no gap of 300 us between its polls): the mechanism's
    /// latency without vCPU 1's own wait for a CPU.
    pub guest_awake_seen: u64,
    pub guest_awake_p50_us: f64,
    pub guest_awake_p99_us: f64,
    pub guest_running_seen: u64,
    pub guest_running_p50_us: f64,
    pub guest_running_p99_us: f64,
    /// vCPU 0 read its own area saying runnable while it ran.
    pub guest_self_runnable: u64,
    pub guest_iters_per_ms: u64,
    /// vCPU 1's polling loop rate (the floor of what it can see).
    pub guest_watch_loops_per_ms: u64,
    pub invariant_ok: bool,
    /// Host: preemptions of vCPU 0's thread in the window (`nonvoluntary_ctxt_switches`).
    pub host_preemptions: u64,
    /// From the records (perf only): preemptions longer than 1 ms, and of
    /// those the ones shown runnable before they ended.
    pub host_over_1ms: u64,
    pub host_over_1ms_visible: u64,
    pub host_visible_p50_us: f64,
    pub host_visible_p99_us: f64,
    pub host_running_p50_us: f64,
    pub host_running_p99_us: f64,
    pub self_inflicted: u64,
    /// Of those, shown once they went on after the watch thread slept.
    pub self_shown_late: u64,
    pub deferred: u64,
    pub lost: u64,
    pub late: u64,
    /// vCPU 0: runnable accounted vs its thread's run_delay over the window (ms).
    pub runnable_ms: f64,
    pub run_delay_ms: f64,
    pub accounting_error_pct: f64,
    /// vCPU 1 (the watcher): its thread's run_delay and involuntary
    /// switches over the window: while it waits for a CPU it sees nothing.
    pub watcher_run_delay_ms: f64,
    pub watcher_preemptions: u64,
    /// Window length (ms).
    pub window_ms: f64,
    /// `bpf-direct`: switch-ins at which the program published running
    /// (no kick), and shown preemptions that were kicked instead (the
    /// switch-in came before the program was armed).
    pub direct_published: u64,
    pub direct_kicked: u64,
    /// BPF: switch-outs of vCPU 0's thread with no switch-in reported
    /// since the one before (the kernel's `sched_switch` did not name it).
    pub missed_in: u64,
    /// BPF: switch-ins of vCPU 0's thread `sched_switch` did not report,
    /// found at the end of `__schedule()` (before the thread ran on).
    pub late_in: u64,
    /// Visibility latencies (µs) for the plot: guest-seen runnable.
    #[serde(skip)]
    pub samples_us: Vec<f64>,
}

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

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_ascii_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize]
}

/// Runs one measurement.
pub fn run(b: &SchedBench) -> Result<SchedResult, String> {
    let out = Captured::default();
    let cfg = VmConfig {
        kernel: crate::testing::TEST_GUEST_ELF.to_vec(),
        cmdline: format!("schedwatch={}", b.secs),
        mem_mib: 64,
        vcpus: 2,
        name: "schedwatch".into(),
        stdin_console: false,
        sched: b.mechanism.clone(),
        ..Default::default()
    };
    let vm = Vm::create(&cfg, ConsoleOut::new(Box::new(out.clone()))).map_err(|e| e.to_string())?;
    let mechanism = vm
        .machine
        .xen
        .sched_mechanism()
        .map(|m| m.name().to_string())
        .unwrap_or_default();
    let o2 = out.clone();
    let hog_on = b.hog_on_ms;
    let hog_off = b.hog_off_ms;
    let watcher_fifo = b.watcher_fifo;
    let mut window = None;
    let mut report = None;
    let exit = vm.run_with(Some(Duration::from_secs(u64::from(b.secs) + 60)), |m| {
        let until = Instant::now() + Duration::from_secs(30);
        let (mut t0, mut t1) = (None, None);
        while Instant::now() < until && (t0.is_none() || t1.is_none()) {
            t0 = m.vcpus.first().and_then(|h| h.tid());
            t1 = m.vcpus.get(1).and_then(|h| h.tid());
            std::thread::sleep(Duration::from_millis(1));
        }
        let (Some(t0), Some(t1)) = (t0, t1) else {
            return;
        };
        let ncpu = cpu::online_cpus();
        let _ = cpu::pin(t0, 0);
        let _ = cpu::pin(t1, 1 % ncpu);
        if watcher_fifo {
            if let Err(e) = cpu::set_fifo_tid(t1, 1) {
                tracing::warn!(%e, "bench sched: vCPU 1 stays SCHED_OTHER");
            }
        }
        while !o2.text().contains("watches its area") && !m.stopping() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let hog = if hog_on > 0 {
            let s = stop.clone();
            threads::spawn(
                ThreadKind::BenchHog,
                "bench-hog".into(),
                Arc::new(|_| {}),
                move || {
                    let _ = cpu::pin(crate::host::perf::gettid(), 0);
                    while !s.load(Ordering::Relaxed) {
                        let end = Instant::now() + Duration::from_millis(u64::from(hog_on));
                        while Instant::now() < end {
                            std::hint::spin_loop();
                        }
                        if hog_off > 0 {
                            std::thread::sleep(Duration::from_millis(u64::from(hog_off)));
                        }
                    }
                },
            )
            .ok()
        } else {
            None
        };
        let sample = || {
            (
                m.xen.runstate_times(0)[1],
                cpu::run_delay(t0).unwrap_or(0),
                cpu::preemptions(t0).unwrap_or(0),
                cpu::run_delay(t1).unwrap_or(0),
                cpu::preemptions(t1).unwrap_or(0),
                Instant::now(),
            )
        };
        let first = sample();
        let mut last = first;
        while !o2.text().contains("schedwatch-result") && !m.stopping() {
            last = sample();
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(h) = hog {
            let _ = h.join();
        }
        window = Some((first, last));
        report = Some(m.xen.sched_report(0));
    });
    let text = out.text();
    let line = text
        .lines()
        .find(|l| l.contains("schedwatch-result"))
        .ok_or_else(|| format!("the guest gave no result ({exit:?}):\n{text}"))?
        .to_string();
    let f = |k: &str| field(&line, k).unwrap_or(0);
    let us = |ns: u64| ns as f64 / 1000.0;
    let mut r = SchedResult {
        mechanism,
        hog: if hog_on > 0 {
            format!(
                "{hog_on} ms on / {hog_off} ms off, pinned beside vCPU 0{}",
                if b.watcher_fifo {
                    "; vCPU 1 (the watcher) SCHED_FIFO 1"
                } else {
                    ""
                }
            )
        } else {
            "none".into()
        },
        guest_runnable_seen: f("runnable_seen"),
        guest_runnable_p50_us: us(f("runnable_p50_ns")),
        guest_runnable_p99_us: us(f("runnable_p99_ns")),
        guest_awake_seen: f("awake_seen"),
        guest_awake_p50_us: us(f("awake_p50_ns")),
        guest_awake_p99_us: us(f("awake_p99_ns")),
        guest_running_seen: f("running_seen"),
        guest_running_p50_us: us(f("running_p50_ns")),
        guest_running_p99_us: us(f("running_p99_ns")),
        guest_self_runnable: f("self_runnable"),
        guest_iters_per_ms: f("iters_per_ms"),
        guest_watch_loops_per_ms: f("watch_loops_per_ms"),
        invariant_ok: f("invariant_ok") == 1,
        ..Default::default()
    };
    if let Some(((rn0, rd0, p0, wd0, wp0, i0), (rn1, rd1, p1, wd1, wp1, i1))) = window {
        r.host_preemptions = p1.saturating_sub(p0);
        r.watcher_run_delay_ms = wd1.saturating_sub(wd0) as f64 / 1e6;
        r.watcher_preemptions = wp1.saturating_sub(wp0);
        r.window_ms = i1.duration_since(i0).as_secs_f64() * 1e3;
        r.runnable_ms = rn1.saturating_sub(rn0) as f64 / 1e6;
        r.run_delay_ms = rd1.saturating_sub(rd0) as f64 / 1e6;
        if r.run_delay_ms > 0.0 {
            r.accounting_error_pct =
                (r.runnable_ms - r.run_delay_ms).abs() / r.run_delay_ms * 100.0;
        }
    }
    if let Some(rep) = report {
        add_report(&mut r, &rep);
    }
    Ok(r)
}

/// Fills in the host-record numbers of `r` from `report` (vCPU 0's).
fn add_report(r: &mut SchedResult, rep: &crate::xen::sched::SchedReport) {
    let long: Vec<_> = rep
        .preemptions
        .iter()
        .filter(|p| p.dur_ns > 1_000_000)
        .collect();
    r.host_over_1ms = long.len() as u64;
    r.host_over_1ms_visible = long.iter().filter(|p| p.visible_after_ns.is_some()).count() as u64;
    let mut vis: Vec<f64> = rep
        .preemptions
        .iter()
        .filter_map(|p| p.visible_after_ns)
        .map(|n| n as f64 / 1000.0)
        .collect();
    r.host_visible_p50_us = pct(&mut vis, 50.0);
    r.host_visible_p99_us = pct(&mut vis, 99.0);
    r.samples_us = vis;
    let mut run: Vec<f64> = rep
        .preemptions
        .iter()
        .filter_map(|p| p.running_after_ns)
        .map(|n| n as f64 / 1000.0)
        .collect();
    r.host_running_p50_us = pct(&mut run, 50.0);
    r.host_running_p99_us = pct(&mut run, 99.0);
    r.self_inflicted = rep.stats.self_inflicted;
    r.self_shown_late = rep.stats.self_shown_late;
    r.deferred = rep.deferred;
    r.lost = rep.stats.lost;
    r.late = rep.late;
    r.direct_published = rep.direct_published;
    r.direct_kicked = rep.direct_late;
    r.missed_in = rep.missed_in;
    r.late_in = rep.late_in;
    if rep.direct && r.mechanism == "bpf" {
        r.mechanism = "bpf-direct".into();
    }
}

/// The host facts that matter for these numbers.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HostFacts {
    pub cpus: usize,
    pub clocksource: String,
    pub kvm_cap_xen_hvm: i32,
    pub perf_event_paranoid: String,
    pub euid: u32,
    /// What this process would choose.
    pub best_mechanism: String,
}

impl HostFacts {
    pub fn get() -> HostFacts {
        HostFacts {
            cpus: cpu::online_cpus(),
            clocksource: cpu::clocksource(),
            kvm_cap_xen_hvm: crate::kvm::probe::xen_hvm_cap(),
            perf_event_paranoid: std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into()),
            euid: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Uid:"))
                        .and_then(|v| v.split_ascii_whitespace().nth(1)?.parse().ok())
                })
                .unwrap_or(u32::MAX),
            best_mechanism: crate::xen::sched::Mechanism::choose(Some("best")).to_string(),
        }
    }
}

/// Everything one `xenkvm bench sched` measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Suite {
    pub host: HostFacts,
    /// With the hog, per mechanism and round (interleaved).
    pub preempted: Vec<SchedResult>,
    /// Without a hog: the guest's throughput per mechanism and round.
    pub idle_host: Vec<SchedResult>,
    /// (b) ns per context switch of a watched thread (pipe ping-pong on one
    /// CPU), per mechanism ("none": not watched), interleaved rounds.
    pub switch_ns: Vec<(String, f64)>,
}

/// Every mechanism this process may use here, best first, sampling last.
pub fn available() -> Vec<String> {
    use crate::host::perf::{PerfMode, SwitchRing};
    let mut v = Vec::new();
    if crate::host::bpf::SchedBpf::load().is_ok() {
        v.push("bpf".to_string());
        v.push("bpf-direct".to_string());
    }
    for (m, name) in [
        (PerfMode::WakeOnSwitchOut, "perf"),
        (PerfMode::Batched, "perf-batched"),
    ] {
        if SwitchRing::open_current_thread(m).is_ok() {
            v.push(name.to_string());
        }
    }
    v.push("sampling".to_string());
    v
}

/// Runs `rounds` interleaved rounds of every mechanism in `mechs`, with the
/// hog and without it.
pub fn suite(base: &SchedBench, mechs: &[String], rounds: u32) -> Result<Suite, String> {
    let mut s = Suite {
        host: HostFacts::get(),
        preempted: Vec::new(),
        idle_host: Vec::new(),
        switch_ns: Vec::new(),
    };
    for _ in 0..rounds.max(3) {
        let bpf_extra = mechs.iter().any(|m| m == "bpf").then_some("bpf-unwatched");
        for m in mechs
            .iter()
            .map(String::as_str)
            .chain(bpf_extra)
            .chain(["none"])
        {
            let watch = match m {
                "perf" => Watch::Perf(crate::host::perf::PerfMode::WakeOnSwitchOut),
                "perf-batched" => Watch::Perf(crate::host::perf::PerfMode::Batched),
                "bpf" => Watch::Bpf { watched: true },
                "bpf-unwatched" => Watch::Bpf { watched: false },
                "none" => Watch::None,
                _ => continue,
            };
            match switch_cost(watch, 20_000) {
                Ok(ns) => s.switch_ns.push((m.to_string(), ns)),
                // Refused here (no BPF): the VM runs fell back; say so.
                Err(e) if matches!(watch, Watch::Bpf { .. }) => {
                    tracing::warn!(%e, "bench sched: no per-switch cost for {m}")
                }
                Err(e) => return Err(e),
            }
        }
    }
    for _ in 0..rounds {
        for m in mechs {
            let b = SchedBench {
                mechanism: Some(m.clone()),
                ..base.clone()
            };
            s.preempted.push(run(&b)?);
            s.idle_host.push(run(&SchedBench { hog_on_ms: 0, ..b })?);
        }
    }
    Ok(s)
}

/// The table people read.
pub fn table(s: &Suite) -> String {
    use std::fmt::Write as _;
    let h = &s.host;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "host: {} CPUs, clocksource {}, KVM_CAP_XEN_HVM {}, perf_event_paranoid {}, euid {}\nbest mechanism here: {}",
        h.cpus, h.clocksource, h.kvm_cap_xen_hvm, h.perf_event_paranoid, h.euid, h.best_mechanism
    );
    if let Some(r) = s.preempted.first() {
        let _ = writeln!(o, "hog: {}", r.hog);
    }
    let _ = writeln!(
        o,
        "\n{:<13} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>6} {:>9} {:>9} {:>6}",
        "mechanism",
        "preempt",
        ">1ms",
        "seen",
        "guest",
        "p50 us",
        "p99 us",
        "running",
        "p50 us",
        "p99 us",
        "self",
        "runnable",
        "run_delay",
        "err %"
    );
    let _ = writeln!(
        o,
        "{:<13} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>6} {:>9} {:>9} {:>6}",
        "",
        "(host)",
        "(records)",
        "(records)",
        "saw",
        "(guest)",
        "(guest)",
        "saw",
        "(guest)",
        "(guest)",
        "",
        "ms",
        "ms",
        ""
    );
    for r in &s.preempted {
        let _ = writeln!(
            o,
            "{:<13} {:>7} {:>9} {:>9} {:>9} {:>9.1} {:>9.1} {:>10} {:>9.1} {:>9.1} {:>6} {:>9.1} {:>9.1} {:>6.2}",
            r.mechanism,
            r.host_preemptions,
            r.host_over_1ms,
            r.host_over_1ms_visible,
            r.guest_runnable_seen,
            r.guest_runnable_p50_us,
            r.guest_runnable_p99_us,
            r.guest_running_seen,
            r.guest_running_p50_us,
            r.guest_running_p99_us,
            r.guest_self_runnable,
            r.runnable_ms,
            r.run_delay_ms,
            r.accounting_error_pct
        );
    }
    let _ = writeln!(
        o,
        "\nhost-side (records): visible after switch-out p50/p99 us, running after switch-in p50/p99 us, self-inflicted (of those shown when they went on), deferred, lost, late; \
         bpf-direct: running published by the program at the switch-in, kicked instead; switch-ins sched_switch did not report: found at the end of __schedule(), missed by both"
    );
    for r in &s.preempted {
        let _ = writeln!(
            o,
            "{:<13} {:>8.1} {:>8.1}   {:>8.1} {:>8.1}   {:>5} ({:>4}) {:>5} {:>5} {:>5}   {:>5} {:>5}   {:>5} {:>5}",
            r.mechanism,
            r.host_visible_p50_us,
            r.host_visible_p99_us,
            r.host_running_p50_us,
            r.host_running_p99_us,
            r.self_inflicted,
            r.self_shown_late,
            r.deferred,
            r.lost,
            r.late,
            r.direct_published,
            r.direct_kicked,
            r.late_in,
            r.missed_in
        );
    }
    let mut names: Vec<&str> = s.switch_ns.iter().map(|(n, _)| n.as_str()).collect();
    names.dedup();
    names.sort();
    names.dedup();
    let _ = writeln!(
        o,
        "\n(b) context switch of a watched thread (socket ping-pong on one CPU), ns per switch: median (all rounds)"
    );
    for n in names {
        let mut v: Vec<f64> = s
            .switch_ns
            .iter()
            .filter(|(m, _)| m == n)
            .map(|(_, x)| *x)
            .collect();
        let all: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
        let _ = writeln!(
            o,
            "{:<13} {:>8.0}  ({})",
            n,
            pct(&mut v, 50.0),
            all.join(", ")
        );
    }
    let _ = writeln!(
        o,
        "\nthe watcher (vCPU 1's thread): run_delay ms / window ms, involuntary switches; \
         runnable seen while it stayed on its CPU since the switch-out: count, p50 us, p99 us"
    );
    for r in &s.preempted {
        let _ = writeln!(
            o,
            "{:<13} {:>8.1} / {:>8.1}   {:>6}   {:>6} {:>9.1} {:>9.1}",
            r.mechanism,
            r.watcher_run_delay_ms,
            r.window_ms,
            r.watcher_preemptions,
            r.guest_awake_seen,
            r.guest_awake_p50_us,
            r.guest_awake_p99_us
        );
    }
    let _ = writeln!(
        o,
        "\nguest throughput (loop iterations per ms on vCPU 0) without / with the hog; vCPU 1's polls per ms:"
    );
    for (a, b) in s.idle_host.iter().zip(&s.preempted) {
        let _ = writeln!(
            o,
            "{:<13} {:>10} {:>10} {:>10}",
            a.mechanism, a.guest_iters_per_ms, b.guest_iters_per_ms, b.guest_watch_loops_per_ms
        );
    }
    o
}

/// An SVG of the visibility-latency CDF per mechanism (guest-side samples
/// are summarised by the guest; the host's per-preemption samples are drawn).
pub fn svg(s: &Suite) -> String {
    use std::fmt::Write as _;
    let (w, h, pad) = (640.0, 400.0, 50.0);
    let mut by: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for r in &s.preempted {
        by.entry(&r.mechanism).or_default().extend(&r.samples_us);
    }
    let max = by
        .values()
        .flat_map(|v| v.iter().copied())
        .fold(1.0f64, f64::max)
        .log10()
        .ceil()
        .max(1.0);
    let x = |us: f64| pad + (us.max(1.0).log10() / max) * (w - 2.0 * pad);
    let y = |f: f64| h - pad - f * (h - 2.0 * pad);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        o,
        r#"<text x="{}" y="20">runnable visible after host switch-out (CDF, log µs)</text>"#,
        pad
    );
    let _ = writeln!(
        o,
        r#"<line x1="{pad}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{0}" stroke="black"/>"#,
        h - pad,
        w - pad
    );
    for d in 0..=(max as i32) {
        let v = 10f64.powi(d);
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}">{}</text>"#,
            x(v) - 8.0,
            h - pad + 16.0,
            v
        );
    }
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    for (i, (name, v)) in by.iter_mut().enumerate() {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let c = colors[i % colors.len()];
        let label = if v.is_empty() {
            format!("{name}: never visible")
        } else {
            format!("{name} ({} samples)", v.len())
        };
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" fill="{c}">{label}</text>"#,
            w - pad - 200.0,
            pad + 16.0 * i as f64
        );
        if v.is_empty() {
            continue;
        }
        let pts: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(k, us)| format!("{:.1},{:.1}", x(*us), y((k + 1) as f64 / v.len() as f64)))
            .collect();
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{c}" points="{}"/>"#,
            pts.join(" ")
        );
    }
    o.push_str("</svg>\n");
    o
}

/// How the ping-pong threads of [`switch_cost`] are watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    None,
    Perf(crate::host::perf::PerfMode),
    /// The BPF program attached; `watched: false`: the threads are not in
    /// its map (the cost every other context switch on the host pays).
    Bpf {
        watched: bool,
    },
}

/// (b) What tracking adds to each context switch of a watched thread: two
/// threads pinned to one CPU ping-pong a byte `rounds` times over Unix
/// sockets (2 switches per round), both watched as `watch` says with a
/// drainer thread as the monitor. Nanoseconds per switch.
pub fn switch_cost(watch: Watch, rounds: u32) -> Result<f64, String> {
    let mode = match watch {
        Watch::Perf(m) => Some(m),
        _ => None,
    };
    let bpf = match watch {
        Watch::Bpf { .. } => Some(Arc::new(crate::host::bpf::SchedBpf::load()?)),
        _ => None,
    };
    let bpf_watch = matches!(watch, Watch::Bpf { watched: true });
    use crate::host::perf::{PerfMode, SwitchRing};
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    let (a1, b1) = UnixStream::pair().map_err(|e| e.to_string())?;
    let (a2, b2) = UnixStream::pair().map_err(|e| e.to_string())?;
    let (ring_tx, ring_rx) = mpsc::channel::<SwitchRing>();
    let stop = Arc::new(AtomicBool::new(false));
    let quiet = Arc::new(|_: String| {}) as threads::OnPanic;
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        threads::spawn(ThreadKind::BenchHog, name.into(), quiet.clone(), f)
            .map_err(|e| e.to_string())
    };
    let make_open = |bpf_open: Option<Arc<crate::host::bpf::SchedBpf>>| {
        move |tx: &mpsc::Sender<SwitchRing>| {
            let _ = cpu::pin(crate::host::perf::gettid(), 0);
            if let (Some(b), true) = (&bpf_open, bpf_watch) {
                let _ = b.watch(
                    crate::host::perf::gettid() as u32,
                    crate::host::bpf::Role::Vcpu,
                );
            }
            if let Some(m) = mode {
                if let Ok(r) = SwitchRing::open_current_thread(m) {
                    let _ = tx.send(r);
                }
            }
        }
    };
    let (open, open_here) = (make_open(bpf.clone()), make_open(bpf.clone()));
    let (tx1, tx2) = (ring_tx.clone(), ring_tx);
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let ready2 = ready_tx.clone();
    let echo = spawn(
        "bench-echo",
        Box::new(move || {
            open(&tx1);
            let _ = ready2.send(());
            let (mut rx, mut tx) = (b1, a2);
            let mut b = [0u8; 1];
            while rx.read_exact(&mut b).is_ok() && b[0] != 0 {
                if tx.write_all(&b).is_err() {
                    break;
                }
            }
        }),
    )?;
    let st = stop.clone();
    let bpf_drain = bpf.clone();
    let drainer = spawn(
        "bench-drain",
        Box::new(move || {
            let mut rings: Vec<SwitchRing> = Vec::new();
            let ep = Epoll::new().ok();
            let mut evs = vec![EpollEvent::default(); 4];
            if let (Some(b), Some(ep)) = (&bpf_drain, &ep) {
                let _ = b.watch(
                    crate::host::perf::gettid() as u32,
                    crate::host::bpf::Role::Watcher,
                );
                // The ping-pong runs on CPU 0: its ring.
                let _ = ep.ctl(
                    ControlOperation::Add,
                    b.fd(0),
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
                );
            }
            while !st.load(Ordering::Relaxed) {
                if let (Some(b), Some(ep)) = (&bpf_drain, &ep) {
                    let _ = ep.wait(10, &mut evs);
                    b.drain(|_| {});
                    continue;
                }
                while let Ok(r) = ring_rx.try_recv() {
                    if let (Some(ep), PerfMode::WakeOnSwitchOut) = (&ep, r.mode) {
                        let _ = ep.ctl(
                            ControlOperation::Add,
                            r.fd(),
                            EpollEvent::new(EventSet::IN, 0),
                        );
                    }
                    rings.push(r);
                }
                match (mode, &ep) {
                    (Some(PerfMode::WakeOnSwitchOut), Some(ep)) => {
                        let _ = ep.wait(10, &mut evs);
                    }
                    _ => std::thread::sleep(Duration::from_millis(1)),
                }
                for r in &mut rings {
                    r.drain(|_| {});
                }
            }
        }),
    )?;
    open_here(&tx2);
    let _ = ready_rx.recv_timeout(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(20));
    let (mut tx, mut rx) = (a1, b2);
    let mut b = [1u8; 1];
    let t = Instant::now();
    for _ in 0..rounds {
        tx.write_all(&[1]).map_err(|e| e.to_string())?;
        rx.read_exact(&mut b).map_err(|e| e.to_string())?;
    }
    let ns = t.elapsed().as_nanos() as f64 / (2.0 * f64::from(rounds));
    let _ = tx.write_all(&[0]);
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    let _ = drainer.join();
    let _ = cpu::unpin(crate::host::perf::gettid());
    Ok(ns)
}
