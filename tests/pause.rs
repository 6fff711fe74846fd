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
        std::thread::sleep(Duration::from_secs(1));
        let after: Vec<u64> = m.vcpus.iter().map(|h| h.entries()).collect();
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
        if let (Some(name), Some(n)) = (field("Name:"), field("voluntary_ctxt_switches:")) {
            v.push((name, n.parse().unwrap_or(0)));
        }
    }
    v.sort();
    v
}

#[test]
fn idle_two_vcpu_guest_wakes_the_vmm_less_than_once_a_second() {
    if !common::kvm_available("idle_two_vcpu_guest_wakes_the_vmm_less_than_once_a_second") {
        return;
    }
    let path = std::env::temp_dir().join(format!("xenkvm-idle-{}.elf", std::process::id()));
    std::fs::write(&path, xenkvm::testing::TEST_GUEST_ELF).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_xenkvm"))
        .args([
            "run",
            "--kernel",
            path.to_str().unwrap(),
            "--cmdline",
            "idle",
            // The test guest reports on Xen's console.
            "--xen-console",
            "console",
        ])
        .args(["--vcpus", "2", "--memory", "64", "--timeout", "30"])
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
    let a = ctxt_switches(pid);
    let window = Duration::from_secs(3);
    std::thread::sleep(window);
    let b = ctxt_switches(pid);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    let mut total = 0;
    for (name, n) in &b {
        let before = a
            .iter()
            .find(|(m, _)| m == name)
            .map(|(_, n)| *n)
            .unwrap_or(0);
        let d = n - before.min(*n);
        println!("{name}: {d} wake-ups in {} s", window.as_secs());
        total += d;
    }
    println!("{}", String::from_utf8_lossy(&seen));
    assert!(
        String::from_utf8_lossy(&seen).contains("vCPU 1 up"),
        "vCPU 1 did not come up"
    );
    // An idle guest with no timers armed: nothing should wake the VMM.
    assert!(
        total < window.as_secs(),
        "an idle guest woke the VMM {total} times in {} s",
        window.as_secs()
    );
}
