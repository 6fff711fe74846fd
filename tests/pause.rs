//! The VMM's paused state and its idle cost, on the built-in test guest.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use xenkvm::devices::ConsoleOut;
use xenkvm::vcpu::Reported;
use xenkvm::vmm::machine::GuestExit;
use xenkvm::vmm::{Vm, VmConfig};

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

#[test]
fn pause_running_demo_guest_runs_no_guest_code_until_resumed() {
    if !common::kvm_available("pause_running_demo_guest_runs_no_guest_code_until_resumed") {
        return;
    }
    let out = Captured::default();
    let cfg = VmConfig {
        kernel: xenkvm::testing::TEST_GUEST_ELF.to_vec(),
        cmdline: "demo".into(),
        mem_mib: 64,
        vcpus: 2,
        name: "demo".into(),
        stdin_console: false,
        ..Default::default()
    };
    let vm = Vm::create(&cfg, ConsoleOut::new(Box::new(out.clone()))).unwrap();
    let o2 = out.clone();
    let mut paused_entries = None;
    let exit = vm.run_with(Some(Duration::from_secs(120)), |m| {
        // Pause while the guest is busy: once vCPU 1 is up and the upcall
        // checks run on both vCPUs.
        let until = Instant::now() + Duration::from_secs(60);
        while !o2.text().contains("check smp ") && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        m.pause(Duration::from_secs(10)).expect("the vCPUs pause");
        for h in &m.vcpus {
            assert_eq!(h.reported(), Reported::Paused, "vCPU {}", h.id);
        }
        let before: Vec<u64> = m.vcpus.iter().map(|h| h.entries()).collect();
        let text_before = o2.text();
        let times = |v: u32| m.xen.runstate_times(v);
        let rs_before: Vec<[u64; 4]> = (0..2).map(times).collect();
        std::thread::sleep(Duration::from_secs(1));
        let rs_after: Vec<[u64; 4]> = (0..2).map(times).collect();
        let after: Vec<u64> = m.vcpus.iter().map(|h| h.entries()).collect();
        // Xen: a paused domain's vCPUs are offline unless they were
        // blocked; never running or runnable (Linux counts offline as
        // stolen). The busy guest had at least one vCPU running.
        let grown = |v: usize, s: usize| rs_after[v][s] - rs_before[v][s];
        for v in 0..2 {
            assert_eq!(
                (grown(v, 0), grown(v, 1)),
                (0, 0),
                "vCPU {v} ran or waited while paused: {rs_before:?} -> {rs_after:?}"
            );
        }
        assert!(
            (0..2).any(|v| grown(v, 3) >= 900_000_000),
            "no vCPU offline while paused: {rs_before:?} -> {rs_after:?}"
        );
        paused_entries = Some((before.clone(), after.clone()));
        assert_eq!(before, after, "KVM_RUN was entered while paused");
        assert_eq!(text_before, o2.text(), "the guest printed while paused");
        m.resume();
    });
    let text = out.text();
    println!("{text}\nKVM_RUN entries at pause / after 1 s paused: {paused_entries:?}");
    assert_eq!(exit, GuestExit::Poweroff, "{text}");
    assert!(text.contains("Test result: SUCCESS"), "{text}");
    for check in ["shared_info", "virq_timer", "poll_wakeup", "ipi_pingpong"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("xenkvm-guest: check {check} ... ok"))),
            "{check} did not pass after the pause:\n{text}"
        );
    }
}

/// Voluntary context switches of every thread of process `pid`, by name.
fn ctxt_switches(pid: u32) -> Vec<(String, u64)> {
    switches(pid, "voluntary_ctxt_switches:")
}

/// `key`'s count (a `/proc/PID/task/TID/status` line) of every thread of
/// process `pid`, by name.
fn switches(pid: u32, key: &str) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return v;
    };
    for t in dir.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|s| s.trim().to_string())
        };
        if let (Some(name), Some(n)) = (field("Name:"), field(key)) {
            v.push((name, n.parse().unwrap_or(0)));
        }
    }
    v.sort();
    v
}

/// Host CPU time (user + system, clock ticks) of process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): state is 3,
    // utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| {
        f.get(i - 3)
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0)
    };
    n(14) + n(15)
}

/// What an idle run of the test guest cost the VMM over a window.
struct IdleCost {
    /// Voluntary context switches per thread name in the window.
    wakeups: Vec<(String, u64)>,
    /// Host preemptions (involuntary context switches) of the vCPU threads
    /// in the window: each may wake a schedule-tracking watch thread.
    vcpu_preemptions: u64,
    /// Host CPU time of the process in the window, in percent of one CPU.
    cpu_percent: f64,
    window: Duration,
    console: String,
}

impl IdleCost {
    fn total(&self) -> u64 {
        self.wakeups.iter().map(|(_, d)| d).sum()
    }
    fn of(&self, thread: &str) -> u64 {
        self.wakeups
            .iter()
            .filter(|(n, _)| n == thread)
            .map(|(_, d)| d)
            .sum()
    }
    /// Wake-ups of the schedule-tracking watch threads (`vcpu-schedN`).
    fn watch(&self) -> u64 {
        self.wakeups
            .iter()
            .filter(|(n, _)| n.starts_with("vcpu-sched"))
            .map(|(_, d)| d)
            .sum()
    }
    /// The watch threads wake only for host preemptions of vCPU threads
    /// (at most twice each: the program's wake-up and a vCPU thread's
    /// hand-over), never for an idle guest's own ticks.
    fn check_watch(&self) {
        assert!(
            self.watch() <= 2 * self.vcpu_preemptions + self.window.as_secs(),
            "the watch threads woke {} times for {} preemptions of vCPU threads",
            self.watch(),
            self.vcpu_preemptions
        );
    }
    fn print(&self) {
        let s = self.window.as_secs_f64();
        for (name, d) in &self.wakeups {
            println!("{name}: {d} wake-ups in {s} s ({:.1}/s)", *d as f64 / s);
        }
        println!(
            "total {:.1} wake-ups/s, host CPU {:.2}% of one CPU; {} host preemptions of the vCPU threads",
            self.total() as f64 / s,
            self.cpu_percent,
            self.vcpu_preemptions
        );
        println!("{}", self.console);
    }
}

/// Runs the test guest in `mode` (`idle` or `idle100`) with 2 vCPUs and
/// measures the VMM over `window` once the guest says it halts.
fn idle_cost(mode: &str, window: Duration) -> IdleCost {
    let path = std::env::temp_dir().join(format!("xenkvm-{mode}-{}.elf", std::process::id()));
    std::fs::write(&path, xenkvm::testing::TEST_GUEST_ELF).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_xenkvm"))
        .args([
            "run",
            "--kernel",
            path.to_str().unwrap(),
            "--cmdline",
            mode,
            // The test guest reports on Xen's console.
            "--xen-console",
            "console",
        ])
        .args(["--vcpus", "2", "--memory", "64", "--timeout", "60"])
        .env("XENKVM_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait for the guest to say it is idle.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("idle: halted") {
        use std::io::Read;
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "guest ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let preempted = || -> u64 {
        switches(pid, "nonvoluntary_ctxt_switches:")
            .iter()
            .filter(|(n, _)| n.starts_with("vcpu") && !n.starts_with("vcpu-sched"))
            .map(|(_, d)| d)
            .sum()
    };
    let (a, p_a, cpu_a, t) = (
        ctxt_switches(pid),
        preempted(),
        cpu_ticks(pid),
        Instant::now(),
    );
    std::thread::sleep(window);
    let (b, p_b, cpu_b, window) = (ctxt_switches(pid), preempted(), cpu_ticks(pid), t.elapsed());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let wakeups = b
        .iter()
        .map(|(name, n)| {
            let before = a.iter().find(|(m, _)| m == name).map_or(0, |(_, n)| *n);
            (name.clone(), n - before.min(*n))
        })
        .collect();
    IdleCost {
        wakeups,
        vcpu_preemptions: p_b.saturating_sub(p_a),
        cpu_percent: (cpu_b - cpu_a) as f64 / hz / window.as_secs_f64() * 100.0,
        window,
        console: String::from_utf8_lossy(&seen).into_owned(),
    }
}

/// The measuring window: 3 s, or `XENKVM_IDLE_SECS`.
fn idle_window() -> Duration {
    let secs = std::env::var("XENKVM_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    Duration::from_secs(secs)
}

#[test]
fn idle_two_vcpu_guest_wakes_the_vmm_less_than_once_a_second() {
    if !common::kvm_available("idle_two_vcpu_guest_wakes_the_vmm_less_than_once_a_second") {
        return;
    }
    let c = idle_cost("idle", idle_window());
    c.print();
    assert!(c.console.contains("vCPU 1 up"), "vCPU 1 did not come up");
    // An idle guest with no timers armed: nothing should wake the VMM but
    // the host's preemptions of its vCPU threads (the watch threads).
    c.check_watch();
    assert!(
        ((c.total() - c.watch()) as f64) < c.window.as_secs_f64(),
        "an idle guest woke the VMM {} times in {:?}",
        c.total(),
        c.window
    );
}

#[test]
fn idle_guest_with_100hz_timers_wakes_the_event_loop_once_per_tick() {
    if !common::kvm_available("idle_guest_with_100hz_timers_wakes_the_event_loop_once_per_tick") {
        return;
    }
    let c = idle_cost("idle100", idle_window());
    c.print();
    assert!(
        c.console.matches("has a 100 Hz VIRQ_TIMER (rc 0)").count() == 2,
        "both vCPUs must have their timer"
    );
    // Two 100 Hz timers: 200 timerfd expiries a second, at most one
    // wake-up of the event loop each (two timers due together are served
    // by one wake-up); the vCPU threads halt in KVM between ticks. No
    // other thread wakes. (Counts, not times: a loaded host delivers late
    // but not more often.)
    let secs = c.window.as_secs_f64();
    let events = c.of("xen-events") as f64;
    assert!(
        events <= 200.0 * secs * 1.1 && events >= 100.0 * secs * 0.5,
        "the event loop woke {events} times in {secs} s of two 100 Hz timers"
    );
    c.check_watch();
    let others = c.total() - c.of("xen-events") - c.of("vcpu0") - c.of("vcpu1") - c.watch();
    assert!(
        (others as f64) < secs,
        "threads other than the event loop and the vCPUs woke {others} times"
    );
}
