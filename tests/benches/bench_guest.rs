//! The test guest in bench mode, driven from a criterion benchmark: the
//! guest reads a command and an iteration count from I/O ports, runs the
//! loop between two fenced `rdtsc`s and reports the elapsed cycles (see
//! tests/guest and `xenkvm::testing::bench_cmd`).

use std::sync::Arc;
use std::time::Duration;

use xenkvm::testing::{bench_cmd, BENCH_CMDLINE, TEST_GUEST_ELF};
use xenkvm::vmm::machine::Machine;
use xenkvm::vmm::{Vm, VmConfig};

pub struct BenchGuest {
    pub machine: Arc<Machine>,
    tsc_khz: u64,
    /// The guest's console, shown when it stops answering.
    console: Arc<parking_lot::Mutex<Vec<u8>>>,
}

/// Keeps what the guest prints (bounded to its last 64 KiB).
struct Keep(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Keep {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut v = self.0.lock();
        v.extend_from_slice(b);
        let excess = v.len().saturating_sub(64 << 10);
        v.drain(..excess);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl BenchGuest {
    /// Boots the guest with `vcpus` vCPUs; `None` (with a printed reason)
    /// when /dev/kvm is not usable.
    pub fn start(vcpus: u32) -> Option<BenchGuest> {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            eprintln!("SKIPPED benchmark: /dev/kvm is not usable");
            return None;
        }
        let cfg = VmConfig {
            kernel: TEST_GUEST_ELF.to_vec(),
            cmdline: BENCH_CMDLINE.into(),
            mem_mib: 64,
            vcpus,
            stdin_console: false,
            bench_ports: true,
            ..Default::default()
        };
        let console = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = xenkvm::devices::ConsoleOut::new(Box::new(Keep(console.clone())));
        let vm = Vm::create(&cfg, sink).expect("cannot create the bench VM");
        let machine = vm.machine.clone();
        let tsc_khz = u64::from(machine.clock.tsc_khz);
        std::thread::spawn(move || vm.run(None));
        Some(BenchGuest {
            machine,
            tsc_khz,
            console,
        })
    }

    /// Guest time for exactly `iters` iterations of `cmd` (the guest counts in u32: larger
    /// counts run as several commands whose times add up; 0 iterations take no time).
    pub fn measure(&self, cmd: u32, iters: u64) -> Duration {
        let mut left = iters;
        let mut total = Duration::ZERO;
        while left > 0 {
            let n = left.min(u64::from(u32::MAX)) as u32;
            total += self.measure_u32(cmd, n);
            left -= u64::from(n);
        }
        total
    }

    fn measure_u32(&self, cmd: u32, iters: u32) -> Duration {
        let b = self.machine.bench.as_ref().expect("bench ports registered");
        let before = b.results.lock().len();
        b.requests.lock().push_back((cmd, iters));
        b.request_cv.notify_all();
        let mut r = b.results.lock();
        while r.len() == before {
            if b.results_cv
                .wait_for(&mut r, Duration::from_secs(30))
                .timed_out()
            {
                panic!(
                    "the bench guest did not answer command {cmd}; its console:\n{}",
                    String::from_utf8_lossy(&self.console.lock())
                );
            }
        }
        let cycles = r[before];
        assert!(cycles > 0, "the guest could not run command {cmd}");
        Duration::from_nanos((u128::from(cycles) * 1_000_000 / u128::from(self.tsc_khz)) as u64)
    }

    /// Guest nanoseconds per iteration of `cmd`.
    pub fn ns_per_iter(&self, cmd: u32, iters: u64) -> f64 {
        self.measure(cmd, iters).as_nanos() as f64 / iters as f64
    }

    /// Guest nanoseconds per iteration of `cmd`, and the VMM's own time
    /// per iteration (exit handling on the vCPU threads, waits excluded;
    /// see `Machine::vmm_cycles`) in nanoseconds.
    pub fn ns_and_vmm_per_iter(&self, cmd: u32, iters: u64) -> (f64, f64) {
        let c = || {
            self.machine
                .vmm_cycles
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let before = c();
        let ns = self.ns_per_iter(cmd, iters);
        let vmm = (c() - before) as f64 * 1e6 / self.tsc_khz as f64 / iters as f64;
        (ns, vmm)
    }

    /// Powers the guest off.
    pub fn stop(&self) {
        let b = self.machine.bench.as_ref().expect("bench ports registered");
        b.requests.lock().push_back((bench_cmd::STOP, 0));
        b.request_cv.notify_all();
    }
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
