//! Glue between the vCPU threads and the Xen personality (`hypercalls`):
//! decoding a hypercall from the synced registers, guest-virtual memory
//! access for handlers, the hypercall page, and the benchmark ports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::clock::Clock;
use crate::devices::ConsoleOut;
use crate::machine::{GuestExit, Machine};
use crate::vm::VmConfig;
use crate::x86;

/// The calling vCPU's state at a hypercall.
pub struct VcpuCtx {
    pub id: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

/// What the vCPU thread does after a hypercall.
#[derive(Debug)]
pub enum HypercallResult {
    Return(i64),
    Block {
        deadline: Option<Instant>,
        ports: Option<Vec<u32>>,
    },
    Yield,
    Exit(GuestExit),
}

pub struct Xen {
    mem: GuestMemoryMmap,
    clock: Clock,
    console: Arc<ConsoleOut>,
    machine: Weak<Machine>,
    pub bench: BenchPorts,
}

impl Xen {
    pub fn new(_cfg: &VmConfig, mem: &GuestMemoryMmap, clock: Clock, console: Arc<ConsoleOut>, machine: Weak<Machine>) -> Self {
        Xen {
            mem: mem.clone(),
            clock,
            console,
            machine,
            bench: BenchPorts::default(),
        }
    }

    /// True if `gpa` (the MSR value) names a RAM page the hypercall page can go to.
    pub fn hypercall_page_ok(&self, gpa: u64) -> bool {
        // Bits 11:0 select the page index; we have one page.
        gpa & 0xfff == 0 && self.mem.check_range(GuestAddress(gpa), 4096)
    }

    pub fn write_hypercall_page(&self, gpa: u64, long: bool) {
        let page = crate::hcall_page::build();
        if let Err(e) = self.mem.write_slice(&page, GuestAddress(gpa)) {
            tracing::warn!(%e, gpa, "cannot write the hypercall page");
        }
        tracing::debug!(gpa = format_args!("{gpa:#x}"), long, "hypercall page written");
    }

    pub fn hypercall(&self, ctx: &VcpuCtx) -> HypercallResult {
        let long = x86::is_64bit(&ctx.sregs);
        let (nr, a) = x86::hypercall_args(&ctx.regs, long);
        if x86::cpl(&ctx.sregs) != 0 {
            return HypercallResult::Return(-1);
        }
        let p = x86::Paging::from_sregs(&ctx.sregs);
        match nr {
            18 if a[0] == 0 => {
                let len = (a[1] as usize).min(1 << 16);
                let mut buf = vec![0u8; len];
                if x86::read_linear(&self.mem, &p, a[2], &mut buf, x86::Access::READ).is_err() {
                    return HypercallResult::Return(-14);
                }
                self.console.write(&buf);
                HypercallResult::Return(0)
            }
            29 if a[0] == 2 => {
                let mut r = [0u8; 4];
                let _ = x86::read_linear(&self.mem, &p, a[1], &mut r, x86::Access::READ);
                let why = match u32::from_le_bytes(r) {
                    0 => GuestExit::Poweroff,
                    1 => GuestExit::Reboot("guest requested".into()),
                    2 => GuestExit::Suspend,
                    _ => GuestExit::Crash("guest crashed".into()),
                };
                HypercallResult::Exit(why)
            }
            _ => HypercallResult::Return(-38),
        }
    }

    pub fn wake_condition(&self, _vcpu: u32, _ports: Option<&[u32]>) -> bool {
        false
    }

    pub fn bench_io_in(&self, port: u16, data: &mut [u8]) -> bool {
        let stopping = || self.machine.upgrade().is_none_or(|m| m.stopping());
        self.bench.io_in(port, data, &stopping)
    }

    pub fn bench_io_out(&self, port: u16, data: &[u8]) -> bool {
        self.bench.io_out(port, data)
    }

    pub fn system_time(&self) -> u64 {
        self.clock.system_time()
    }
}

/// The ports the test guest's bench mode talks to (see tests/guest):
/// IN 0x511 = command, IN 0x512 = iterations, OUT 0x513 = cycles (low, then
/// high), OUT 0x514 = a bare exit that does nothing.
pub struct BenchPorts {
    /// Requests from the benchmark: (command, iterations); taken by the guest.
    pub requests: parking_lot::Mutex<std::collections::VecDeque<(u32, u32)>>,
    pub request_cv: parking_lot::Condvar,
    pending_iters: AtomicU64,
    low: AtomicU64,
    /// Results: elapsed guest TSC cycles per request.
    pub results: parking_lot::Mutex<Vec<u64>>,
    pub results_cv: parking_lot::Condvar,
}

pub const BENCH_CMD: u16 = 0x511;
pub const BENCH_ITERS: u16 = 0x512;
pub const BENCH_RESULT: u16 = 0x513;
pub const BENCH_BARE: u16 = 0x514;

impl Default for BenchPorts {
    fn default() -> Self {
        BenchPorts {
            requests: Default::default(),
            request_cv: Default::default(),
            pending_iters: AtomicU64::new(0),
            low: AtomicU64::new(u64::MAX),
            results: Default::default(),
            results_cv: Default::default(),
        }
    }
}

impl BenchPorts {
    fn io_in(&self, port: u16, data: &mut [u8], stopping: &dyn Fn() -> bool) -> bool {
        match port {
            BENCH_CMD => {
                let mut q = self.requests.lock();
                // Wait for the benchmark to ask for something (bounded so a
                // guest in bench mode without a driver still ends).
                let deadline = Instant::now() + std::time::Duration::from_secs(30);
                while q.is_empty() && !stopping() && Instant::now() < deadline {
                    let slice = Instant::now() + std::time::Duration::from_millis(50);
                    self.request_cv.wait_until(&mut q, slice.min(deadline));
                }
                let (cmd, n) = q.pop_front().unwrap_or((0, 0));
                self.pending_iters.store(u64::from(n), Ordering::Relaxed);
                put(data, cmd);
                true
            }
            BENCH_ITERS => {
                put(data, self.pending_iters.load(Ordering::Relaxed) as u32);
                true
            }
            _ => false,
        }
    }

    fn io_out(&self, port: u16, data: &[u8]) -> bool {
        match port {
            BENCH_BARE => true,
            BENCH_RESULT => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                let v = u64::from(u32::from_le_bytes(b));
                let low = self.low.swap(u64::MAX, Ordering::Relaxed);
                if low == u64::MAX {
                    self.low.store(v, Ordering::Relaxed);
                } else {
                    self.results.lock().push(low | (v << 32));
                    self.results_cv.notify_all();
                }
                true
            }
            _ => false,
        }
    }
}

fn put(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b[..n]);
}

