//! Composition and lifecycle: builds the VM in named steps (memory and
//! memslots, firmware tables and the kernel, devices, vCPUs, the Xen
//! personality), owns the vCPU handles and the event loop, and runs the
//! guest until it powers off, crashes or times out. The only module that
//! starts threads (through [`threads::spawn`]).

pub mod bench_sched;
pub mod console_attach;
pub mod console_client;
pub mod console_dest;
pub mod console_input;
pub mod control;
pub mod debug_keys;
pub mod event_loop;
pub mod machine;
pub mod migrate;
pub mod runner;
pub mod sched_monitor;
pub mod suspend;
pub mod threads;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_segment;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86::cpuid::{self, CpuidConfig};
use crate::boot;
use crate::boot::layout;
use crate::boot::linux::{self, LinuxKernel};
use crate::devices::{Bus, ConsoleOut, PlatformDevices};
use crate::kvm::{KvmError, KvmVcpu, KvmVm, KvmVmError, MsrTrap};
use crate::vcpu::{Vcpu, VcpuHandle};
use crate::vmm::event_loop::{EventLoop, Next};
use crate::vmm::machine::{Buses, GuestExit, Machine};
use crate::vmm::threads::{OnPanic, ThreadKind};
use crate::xen::clock::Clock;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BootProtocol {
    /// `kernel` is an ELF with a Xen PVH entry note: 32-bit protected mode,
    /// EBX = `hvm_start_info`.
    #[default]
    Pvh,
    /// `kernel` is a Linux bzImage: the x86 boot protocol's 64-bit entry
    /// with a zero page, as an HVM guest (`hardware_subarch` 0).
    Linux,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: Vec<u8>,
    pub boot: BootProtocol,
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u32,
    pub timeout: Option<Duration>,
    pub domid: u16,
    pub name: String,
    /// Feed the VMM's stdin into the PV console ring (hvc0 input).
    pub stdin_console: bool,
    /// Feed this instead (a `--console pty` master); stdin is then not read.
    pub console_in: Option<Arc<std::os::fd::OwnedFd>>,
    /// Register the test guest's bench ports (`testing::BenchPorts`).
    pub bench_ports: bool,
    /// Host schedule tracking to use: `perf`, `perf-batched` or `sampling`
    /// (`None`: the best the host permits; see `xen::sched::Mechanism`).
    pub sched: Option<String>,
    /// Where Xen's own console (`console_io`, ports 0xE9/0x12) goes.
    pub xen_console: crate::devices::XenConsoleTo,
    // --- PV disks and NICs (xl's `disk =`/`vif =`, `--disk`/`--net`).
    /// Disks for the PV block backend.
    pub disks: Vec<crate::config::DiskSpec>,
    /// NICs for the PV network backend.
    pub nics: Vec<crate::config::NicSpec>,
    /// Restore this image (read and checked by `migration::restore::load`)
    /// instead of booting `kernel`.
    pub restore: Option<(
        std::path::PathBuf,
        Arc<crate::migration::restore::RestoreImage>,
    )>,
    /// With `restore`: the pages of a live migration's stream, copied into
    /// RAM after the image's own (`xenkvm migrate-receive`).
    pub incoming_pages: Option<Arc<crate::migration::live::Received>>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: Vec::new(),
            boot: BootProtocol::Pvh,
            initrd: None,
            cmdline: String::new(),
            mem_mib: 256,
            vcpus: 1,
            timeout: None,
            domid: 1,
            name: "xenkvm-guest".into(),
            stdin_console: true,
            console_in: None,
            bench_ports: false,
            sched: None,
            xen_console: Default::default(),
            disks: Vec::new(),
            nics: Vec::new(),
            restore: None,
            incoming_pages: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] KvmVmError),
    #[error("cannot allocate guest memory: {0}")]
    Memory(String),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    LinuxBoot(#[from] linux::LinuxBootError),
    #[error("cannot write the ACPI tables: {0}")]
    Acpi(String),
    #[error("--vcpus must be between 1 and {max}, not {0}", max = crate::MAX_VCPUS)]
    BadVcpus(u32),
    #[error("--memory must be between 16 MiB and 64 GiB, not {0} MiB")]
    BadMemory(u64),
    #[error("cannot create the Xen domain: {0}")]
    XenDomain(String),
    #[error("cannot set vCPU {vcpu}'s registers: {err}")]
    VcpuSetup {
        vcpu: u32,
        err: crate::kvm::KvmError,
    },
    #[error("cannot create the {0}: {1}")]
    Os(&'static str, std::io::Error),
    #[error("device layout: {0}")]
    Bus(#[from] crate::devices::BusError),
    /// A configured device whose backend xenkvm does not have yet.
    #[error("{0}")]
    NoBackend(String),
    #[error("restore: {0}")]
    Restore(String),
    #[error("vCPU {vcpu} did not pause (it reports {state:?})")]
    PauseTimeout {
        vcpu: u32,
        state: crate::vcpu::Reported,
    },
}

/// The boot vCPU's initial state.
#[derive(Debug, Clone, Copy)]
enum EntryState {
    Pvh {
        entry: u32,
        start_info: u64,
    },
    Linux64(LinuxKernel),
    /// The vCPUs' state came from a saved image.
    Restored,
}

/// A created VM, ready to run.
pub struct Vm {
    pub machine: Arc<Machine>,
    /// Owns the VM fd and memslots; dropped after the vCPU threads end.
    _kvm: KvmVm,
    vcpus: Vec<KvmVcpu>,
    entry: EntryState,
    stdin_console: bool,
    console_in: Option<Arc<std::os::fd::OwnedFd>>,
    events: Arc<EventLoop>,
}

/// Guest RAM: memfd-backed regions owned by gpc's memory map (overlays and
/// caches spanning regions depend on the memfds).
fn create_memory(mem_mib: u64) -> Result<gpc::MemoryMap, VmError> {
    let ranges: Vec<_> = layout::ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(a, l)| (a, l as u64))
        .collect();
    gpc::MemoryMap::new(&ranges).map_err(|e| VmError::Memory(e.to_string()))
}

/// The MSR accesses that exit to the VMM: writes of the Xen hypercall-page
/// MSR; the Viridian (Hyper-V) range, which xenkvm does not offer, refused
/// with #GP as KVM would but with the VMM naming what the guest wanted; and
/// writes of LSTAR where `syscall` from CPL 3 does not reach CPL 0 (the
/// fix-up in `arch::x86::syscall_fix`).
fn trapped_msrs() -> Vec<MsrTrap> {
    let write = |base| MsrTrap {
        base,
        count: 1,
        reads: false,
    };
    let mut v = vec![
        write(cpuid::XEN_HYPERCALL_MSR),
        MsrTrap {
            base: crate::vcpu::exit::VIRIDIAN_MSR_FIRST,
            count: crate::vcpu::exit::VIRIDIAN_MSR_COUNT,
            reads: true,
        },
    ];
    let syscall = &crate::kvm::probe::HostProbe::get().user_syscall;
    if *syscall != crate::kvm::probe::Support::Native {
        tracing::info!(%syscall, "syscall at CPL 3 on this host");
        v.push(write(crate::arch::x86::syscall_fix::MSR_LSTAR));
    }
    v
}

/// Loads the schedule-tracking BPF program on a thread of its own; the
/// result arrives on the channel (an error if the thread cannot start).
fn preload_sched_bpf() -> std::sync::mpsc::Receiver<Result<Arc<crate::host::bpf::SchedBpf>, String>>
{
    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    let started = threads::spawn(
        ThreadKind::SchedMonitor,
        "bpf-load".into(),
        Arc::new(|msg| tracing::warn!(%msg, "loading the BPF program")),
        move || {
            let _ = tx2.send(crate::host::bpf::SchedBpf::load().map(Arc::new));
        },
    );
    if let Err(e) = started {
        let _ = tx.send(Err(format!("cannot start the BPF loading thread: {e}")));
    }
    rx
}

impl Vm {
    /// Creates the VM, loads the kernel and prepares the vCPUs.
    pub fn create(cfg: &VmConfig, console: Arc<ConsoleOut>) -> Result<Vm, VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > crate::MAX_VCPUS {
            return Err(VmError::BadVcpus(cfg.vcpus));
        }
        if !(16..=65536).contains(&cfg.mem_mib) {
            return Err(VmError::BadMemory(cfg.mem_mib));
        }
        // --- PV disks: checked before KVM is touched; NICs: their TAPs are
        // created when the machine exists (errors name the vif).
        let disks = cfg
            .disks
            .iter()
            .map(crate::backends::blkback::BlkConfig::from_spec)
            .collect::<Result<Vec<_>, _>>()
            .map_err(VmError::NoBackend)?;
        let nics: Vec<crate::backends::netback::NetConfig> = cfg
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| crate::backends::netback::NetConfig::from_spec(n, i as u32, cfg.domid))
            .collect();
        // The BPF program (if wanted) loads while the VM is built.
        let bpf_load =
            crate::xen::sched::Mechanism::wants_bpf(cfg.sched.as_deref()).then(preload_sched_bpf);
        let kvm = KvmVm::create(&trapped_msrs())?;
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));

        // Step 1: guest RAM and its memslots.
        // A migrated guest's RAM is the memory its pages were received into.
        let received = cfg.incoming_pages.as_ref().and_then(|rx| {
            let ranges: Vec<(u64, u64)> = layout::ram_ranges(cfg.mem_mib << 20)
                .into_iter()
                .map(|(a, l)| (a.0, l as u64))
                .collect();
            rx.staging.take_ram(&ranges)
        });
        let in_place = received.is_some();
        let map = match received {
            Some(m) => m,
            None => create_memory(cfg.mem_mib)?,
        };
        let mem = map.guest_memory().clone();
        let slots = kvm.slots();
        for r in map.ram_regions() {
            // SAFETY: the region is a live mapping owned by `map`, which the
            // Machine keeps for the VM's whole life (it outlives the VM fd).
            unsafe { slots.insert(r.guest_base.0, r.size, r.host_addr) }?;
        }

        // Step 2: firmware tables and the kernel, or a saved guest's memory.
        let entry = if let Some((path, img)) = &cfg.restore {
            // Fresh RAM unless it is a migration's received RAM.
            let n = crate::migration::restore::apply_pages(path, &map, !in_place)
                .map_err(|e| VmError::Restore(e.to_string()))?;
            tracing::info!(pages = n, of = img.pages, "guest memory restored");
            if let Some(rx) = &cfg.incoming_pages {
                if in_place {
                    tracing::info!(pages = rx.staging.pages(), "migrated guest memory in place");
                } else {
                    let n = rx.staging.copy_into(&mem).map_err(VmError::Restore)?;
                    tracing::info!(pages = n, "migrated guest memory copied");
                }
                if let Ok(dir) = std::env::var("XENKVM_TEST_MIGRATE_DUMP") {
                    migrate::dump_ram(&mem, &std::path::Path::new(&dir).join("dest.ram"))
                        .map_err(VmError::Restore)?;
                }
            }
            EntryState::Restored
        } else {
            let e820 = layout::e820(&mem);
            let rsdp = crate::boot::acpi::write_tables(&mem, cfg.vcpus)
                .map_err(|e| VmError::Acpi(e.to_string()))?;
            match cfg.boot {
                BootProtocol::Pvh => {
                    let kernel = boot::load_pvh_elf(&mem, &cfg.kernel)?;
                    let start_info = boot::write_start_info(
                        &mem,
                        &e820,
                        &cfg.cmdline,
                        cfg.initrd.as_deref(),
                        rsdp,
                    )?;
                    tracing::info!(
                        entry = format_args!("{:#x}", kernel.entry),
                        start = format_args!("{:#x}", kernel.start),
                        end = format_args!("{:#x}", kernel.end),
                        "PVH kernel loaded"
                    );
                    EntryState::Pvh {
                        entry: kernel.entry,
                        start_info,
                    }
                }
                BootProtocol::Linux => {
                    let k = linux::load_bzimage(
                        &mem,
                        &cfg.kernel,
                        &cfg.cmdline,
                        cfg.initrd.as_deref(),
                        &e820,
                        rsdp,
                    )?;
                    tracing::info!(
                        entry = format_args!("{:#x}", k.entry),
                        init_end = format_args!("{:#x}", k.init_end),
                        initrd = ?k.initrd,
                        "bzImage loaded for the 64-bit boot protocol"
                    );
                    EntryState::Linux64(k)
                }
            }
        };

        // Step 3: devices on the buses.
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Os("serial eventfd", e))?;
        kvm.register_irqfd(&serial_irq, 4)?;
        let pio = Arc::new(Bus::new());
        let devices =
            PlatformDevices::register(&pio, console.clone(), cfg.xen_console, serial_irq)?;
        pio.insert(
            u64::from(crate::xen::hcall_page::HYPERCALL_PORT),
            4,
            Arc::new(crate::xen::hcall_page::HypercallPort),
        )?;
        let bench = if cfg.bench_ports {
            let b = Arc::new(crate::testing::BenchPorts::new(stopping.clone()));
            b.register(&pio)?;
            Some(b)
        } else {
            None
        };
        let buses = Buses {
            pio,
            mmio: Arc::new(Bus::new()),
            devices,
            bench,
        };

        // Step 4: vCPUs and their handles.
        let supported = kvm.supported_cpuid()?;
        let mut vcpus: Vec<KvmVcpu> = Vec::new();
        let mut handles = Vec::new();
        let mut tsc_khz = 0;
        let mut cr_policy = None;
        let mut cpuid_policy = Vec::new();
        // A restored guest keeps the CPU features it was saved with.
        let saved_policy = cfg
            .restore
            .as_ref()
            .and_then(|(_, img)| img.cpuid.as_deref());
        for id in 0..cfg.vcpus {
            let v = kvm.create_vcpu(id)?;
            if id == 0 {
                tsc_khz = v
                    .tsc_khz()
                    .map_err(|e| KvmVmError::Ioctl("KVM_GET_TSC_KHZ", e))?;
            }
            let mut entries = cpuid::guest_cpuid(
                &supported,
                &CpuidConfig {
                    vcpu_id: id,
                    nr_vcpus: cfg.vcpus,
                    tsc_khz,
                    upcall_vector: true,
                    hide_fast_strings: crate::kvm::probe::hide_fast_strings(),
                },
            );
            if let Some(policy) = saved_policy {
                let policy: Vec<_> = policy.iter().map(|l| (l.leaf, l.subleaf, l.regs)).collect();
                let missing = cpuid::restrict_to_policy(&mut entries, &policy);
                if id == 0 && !missing.is_empty() {
                    tracing::warn!(
                        missing = missing.join(", "),
                        "restore: the guest was saved on a CPU with features this host does not \
                         offer; it faults if it uses them"
                    );
                }
            }
            if id == 0 {
                cpuid_policy = cpuid::to_policy(&entries)
                    .into_iter()
                    .map(
                        |(leaf, subleaf, regs)| crate::migration::stream::libxc::CpuidLeaf {
                            leaf,
                            subleaf,
                            regs,
                        },
                    )
                    .collect();
            }
            v.set_cpuid(&entries)
                .map_err(|e| KvmVmError::Ioctl("KVM_SET_CPUID2", e))?;
            let restored = cfg
                .restore
                .as_ref()
                .is_some_and(|(_, img)| matches!(img.vcpus.get(id as usize), Some(Some(_))));
            // VCPUOP_initialise checks CR4/EFER against what CPUID offers.
            cr_policy.get_or_insert_with(|| cpuid::cr_policy(&entries));
            let kicker = v
                .kicker(kvm.vcpu_mmap_size())
                .map_err(|e| VmError::Os("kick mapping", e))?;
            let handle = Arc::new(VcpuHandle::new(id, kicker, v.entries()));
            if restored {
                handle.set_started();
            }
            handles.push(handle);
            vcpus.push(v);
        }
        if let Some((_, img)) = &cfg.restore {
            // Once every vCPU exists (so the in-kernel LAPICs all know each
            // other: restoring vCPU 0's before vCPU 1 was created left
            // vCPU 1 deaf to INIT/SIPI).
            for (id, v) in vcpus.iter().enumerate() {
                if let Some(Some(state)) = img.vcpus.get(id) {
                    v.restore_state(state)
                        .map_err(|e| VmError::Restore(format!("vCPU {id}: {e}")))?;
                    v.set_runnable().map_err(|e| {
                        VmError::Restore(format!("vCPU {id}: KVM_SET_MP_STATE: {e}"))
                    })?;
                } else if id != 0 {
                    v.set_wait_for_sipi().map_err(|e| {
                        VmError::Restore(format!("vCPU {id}: KVM_SET_MP_STATE: {e}"))
                    })?;
                }
            }
            kvm.restore_irqchip(&img.irqchip)
                .map_err(|e| VmError::Restore(e.to_string()))?;
        }
        let offset = measure_tsc_offset(&vcpus[0]);
        let saved_clock = cfg
            .restore
            .as_ref()
            .and_then(|(_, img)| img.xen_state.as_ref()?.clock);
        let clock = match saved_clock {
            // Issue 14: Xen system time continues from the save.
            Some(c) => Clock::continuing(tsc_khz, offset, c.system_time_ns),
            None => Clock::new(tsc_khz, offset),
        };
        tracing::info!(tsc_khz, offset, "guest clock");

        // Step 5: the Xen personality, with the capabilities it may use.
        let machine = Machine::new(
            map,
            clock,
            buses,
            stopping,
            console,
            cfg,
            handles,
            kvm.interrupts(),
            kvm.slots(),
            cpuid_policy,
        )?;
        if let Some(p) = cr_policy {
            machine.xen.domain.set_cr_policy(p);
        }
        // A restored vCPU with CPU state was up (as Xen, a vCPU that is down
        // has no CPU record): the Xen side must say so too, or its thread
        // parks it offline.
        if let Some((_, img)) = &cfg.restore {
            for (v, st) in img.vcpus.iter().enumerate() {
                if st.is_some() {
                    machine.xen.vcpu_started(v as u32);
                }
            }
        }
        if !cfg.disks.is_empty() {
            let weak = Arc::downgrade(&machine);
            let spawn: Arc<crate::backends::blkback::SpawnFn> = Arc::new(move |name, f| {
                let w = weak.clone();
                let on_panic: OnPanic = Arc::new(move |msg| {
                    if let Some(m) = w.upgrade() {
                        m.request_exit(GuestExit::Error(msg));
                    }
                });
                threads::spawn(ThreadKind::BlkIo, name, on_panic, f)
            });
            machine
                .xen
                .attach_disks(&disks, spawn)
                .map_err(VmError::XenDomain)?;
        }
        if !nics.is_empty() {
            let weak = Arc::downgrade(&machine);
            let spawn: Arc<crate::backends::blkback::SpawnFn> = Arc::new(move |name, f| {
                let w = weak.clone();
                let on_panic: OnPanic = Arc::new(move |msg| {
                    if let Some(m) = w.upgrade() {
                        m.request_exit(GuestExit::Error(msg));
                    }
                });
                threads::spawn(ThreadKind::NetIo, name, on_panic, f)
            });
            machine
                .xen
                .attach_nics(&nics, spawn)
                .map_err(VmError::NoBackend)?;
        }
        let events = Arc::new(EventLoop::new().map_err(|e| VmError::Os("event loop", e))?);
        let (mechanism, bpf) =
            crate::xen::sched::Mechanism::start_with(cfg.sched.as_deref(), || match bpf_load {
                Some(rx) => rx
                    .recv()
                    .unwrap_or_else(|_| Err("the BPF loading thread failed".into())),
                None => crate::host::bpf::SchedBpf::load().map(Arc::new),
            });
        tracing::info!(mechanism = mechanism.name(), %mechanism, "host schedule tracking");
        if let Some(b) = bpf {
            machine.xen.set_sched_bpf(b);
            // `best` (asked for, or the default where guest kernel code
            // runs natively) is the best the host allows: BPF publishing
            // running itself where the maps can be mapped (no kick).
            machine
                .xen
                .set_sched_direct(crate::xen::sched::Mechanism::wants_direct(
                    cfg.sched.as_deref(),
                ));
        }
        machine.xen.set_sched_mechanism(mechanism);
        Ok(Vm {
            machine,
            _kvm: kvm,
            vcpus,
            entry,
            stdin_console: cfg.stdin_console,
            console_in: cfg.console_in.clone(),
            events,
        })
    }

    /// Registers the event sources: the backends' eventfds and the Xen
    /// timers.
    fn register_events(&self) -> std::io::Result<()> {
        let l = &self.events;
        for (remote, fd) in self.machine.xen.backend_fds() {
            let m = self.machine.clone();
            l.add(
                fd,
                Box::new(move || {
                    m.xen.backend_event(remote);
                    Next::Keep
                }),
            )?;
        }
        for (kind, fd) in self.machine.xen.timer_fds() {
            let m = self.machine.clone();
            l.add(
                fd,
                Box::new(move || {
                    let started = |v: u32| m.vcpus.get(v as usize).is_some_and(|h| h.started());
                    if let Some(why) = m.xen.timer_event(kind, &started) {
                        m.request_exit(why);
                    }
                    Next::Keep
                }),
            )?;
        }
        Ok(())
    }

    /// Runs the guest until it ends or `timeout`.
    pub fn run(self, timeout: Option<Duration>) -> GuestExit {
        self.run_with(timeout, |_| {})
    }

    /// Runs the guest; `with` is called with the running machine on the
    /// caller's thread (to pause it, say) before waiting for the end.
    pub fn run_with(
        self,
        timeout: Option<Duration>,
        with: impl FnOnce(&Arc<Machine>),
    ) -> GuestExit {
        crate::kvm::install_kick_handler();
        if let Err(e) = self.register_events() {
            return GuestExit::Error(format!("cannot set up the event loop: {e}"));
        }
        let Vm {
            machine,
            _kvm,
            vcpus,
            entry,
            events,
            stdin_console,
            console_in,
        } = self;
        let started = Instant::now();
        let m2 = machine.clone();
        let on_panic: OnPanic = Arc::new(move |msg| m2.request_exit(GuestExit::Error(msg)));
        let mut threads = Vec::new();
        let ev = events.clone();
        match threads::spawn(
            ThreadKind::EventLoop,
            "xen-events".into(),
            on_panic.clone(),
            move || ev.run(),
        ) {
            Ok(h) => threads.push(h),
            Err(e) => return GuestExit::Error(format!("cannot start the event loop: {e}")),
        }
        // The scheduler monitor: one thread with perf, one per ring (CPU)
        // with BPF (see sched_monitor::run_bpf).
        let mut monitors: Vec<(String, Box<dyn FnOnce() + Send>)> = Vec::new();
        match machine.xen.sched_mechanism() {
            Some(crate::xen::sched::Mechanism::Perf(mode)) => {
                let (m, mode) = (machine.clone(), *mode);
                monitors.push((
                    "vcpu-sched".into(),
                    Box::new(move || sched_monitor::run(m, mode)),
                ));
            }
            Some(crate::xen::sched::Mechanism::Bpf) => {
                for ring in 0..sched_monitor::bpf_rings() {
                    let m = machine.clone();
                    monitors.push((
                        format!("vcpu-sched{ring}"),
                        Box::new(move || sched_monitor::run_bpf(m, ring)),
                    ));
                }
            }
            _ => {}
        }
        for (name, body) in monitors {
            match threads::spawn(ThreadKind::SchedMonitor, name, on_panic.clone(), body) {
                Ok(h) => threads.push(h),
                Err(e) => {
                    tracing::warn!(%e, "no scheduler monitor: runnable is not shown promptly")
                }
            }
        }
        for (id, kvm_vcpu) in vcpus.into_iter().enumerate() {
            let id = id as u32;
            if id == 0 {
                let r = match entry {
                    EntryState::Pvh { entry, start_info } => {
                        set_pvh_entry_state(&kvm_vcpu, entry, start_info)
                    }
                    EntryState::Linux64(k) => set_linux64_entry_state(&kvm_vcpu, &k),
                    EntryState::Restored => Ok(()),
                };
                if let Err(err) = r {
                    machine.request_exit(GuestExit::Error(
                        VmError::VcpuSetup { vcpu: 0, err }.to_string(),
                    ));
                    break;
                }
            }
            let vcpu = Vcpu::new(
                kvm_vcpu,
                machine.clone(),
                machine.vcpus[id as usize].clone(),
            );
            match threads::spawn(
                ThreadKind::Vcpu,
                format!("vcpu{id}"),
                on_panic.clone(),
                move || vcpu.run(),
            ) {
                Ok(h) => threads.push(h),
                Err(e) => {
                    machine.request_exit(GuestExit::Error(format!(
                        "cannot start vCPU thread {id}: {e}"
                    )));
                    break;
                }
            }
        }
        // Console input: a thread of its own (a terminal read must not stop
        // the process in the background; see `console_input`), ended
        // through `input_stop` with the VM.
        let input_stop = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
        );
        let feeds = stdin_console || console_in.is_some();
        if let (true, Ok(stop)) = (feeds, input_stop.as_ref()) {
            let (weak, stop) = (Arc::downgrade(&machine), stop.try_clone());
            match stop.map(|stop| {
                threads::spawn(
                    ThreadKind::ConsoleInput,
                    "console-input".into(),
                    on_panic.clone(),
                    move || console_input::feed(weak, &stop, console_in.as_deref()),
                )
            }) {
                // Not joined: a read on a terminal cannot be interrupted
                // portably; the thread ends at its next wake-up.
                Ok(Ok(_detached)) => {}
                Ok(Err(e)) | Err(e) => {
                    tracing::warn!(%e, "cannot start the console input thread: no console input")
                }
            }
        }
        with(&machine);
        let exit = machine.wait_exit(timeout.map(|t| started + t));
        if let Ok(stop) = input_stop.as_ref() {
            let _ = rustix::io::write(stop, &1u64.to_ne_bytes());
        }
        events.stop();
        machine.xen.sched_event_signal();
        for h in threads {
            let _ = h.join();
        }
        machine.console.flush();
        tracing::info!(
            reasserted = machine
                .xen
                .reasserted
                .load(std::sync::atomic::Ordering::Relaxed),
            "upcalls sent again by the 10 ms re-check"
        );
        exit
    }
}

/// Estimates guest TSC - host TSC by reading IA32_TSC bracketed by host
/// reads (the midpoint; error below the ioctl's duration, about a µs).
fn measure_tsc_offset(fd: &KvmVcpu) -> u64 {
    let mut best = (u64::MAX, 0u64);
    for _ in 0..5 {
        let t0 = crate::xen::clock::host_tsc();
        let tsc = fd.read_msr(0x10);
        let t1 = crate::xen::clock::host_tsc();
        let Some(tsc) = tsc else { return 0 };
        let span = t1.wrapping_sub(t0);
        if span < best.0 {
            let mid = t0.wrapping_add(span / 2);
            best = (span, tsc.wrapping_sub(mid));
        }
    }
    best.1
}

/// Flat 4 GiB ring-0 code (`code`, 64-bit if `long`) and data (`data`)
/// segments in every segment register, and a busy 32-bit TSS at 0x20.
fn load_flat_segments(s: &mut kvm_bindings::kvm_sregs, code: u16, data: u16, long: bool) {
    let cs = crate::arch::x86::flat_segment(code, 0xb, 0, long);
    let ds = crate::arch::x86::flat_segment(data, 0x3, 0, long);
    s.cs = cs;
    s.ds = ds;
    s.es = ds;
    s.fs = ds;
    s.gs = ds;
    s.ss = ds;
    s.tr = kvm_segment {
        selector: 0x20,
        limit: 0x67,
        type_: 0xb,
        s: 0,
        db: 0,
        l: 0,
        g: 0,
        ..cs
    };
}

/// The PVH entry state: 32-bit protected mode, paging off, flat segments,
/// EBX = `hvm_start_info`.
fn set_pvh_entry_state(fd: &KvmVcpu, entry: u32, start_info: u64) -> Result<(), KvmError> {
    let mut s = fd.sregs()?;
    load_flat_segments(&mut s, 0x10, 0x18, false);
    s.cr0 = 0x11; // PE | ET
    s.cr4 = 0;
    s.efer = 0;
    fd.set_sregs(&s)?;
    let mut r = fd.regs()?;
    r.rip = u64::from(entry);
    r.rbx = start_info;
    r.rflags = 2;
    r.rsp = 0;
    fd.set_regs(&r)?;
    Ok(())
}

/// The Linux boot protocol's 64-bit entry state: long mode with the
/// identity map `k.cr3`, the boot GDT with flat `__BOOT_CS` (64-bit code)
/// and `__BOOT_DS`, interrupts off, RSI = zero page, RIP = `startup_64`.
fn set_linux64_entry_state(fd: &KvmVcpu, k: &LinuxKernel) -> Result<(), KvmError> {
    let mut s = fd.sregs()?;
    load_flat_segments(&mut s, linux::BOOT_CS, linux::BOOT_DS, true);
    s.gdt.base = k.gdt_base;
    s.gdt.limit = k.gdt_limit;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr3 = k.cr3;
    s.cr4 = 0x20; // PAE
    s.cr0 = 0x8000_0031; // PG | NE | ET | PE
    s.efer = 0x500; // LMA | LME
    fd.set_sregs(&s)?;
    let mut r = fd.regs()?;
    r.rip = k.entry;
    r.rsi = k.zero_page;
    r.rsp = layout::BOOT_STACK_TOP;
    r.rflags = 2;
    fd.set_regs(&r)?;
    Ok(())
}
