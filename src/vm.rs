//! The KVM virtual machine: guest RAM, the in-kernel irqchip and PIT, the
//! user-space MSR filter that brings the hypercall-page MSR write to us,
//! vCPU creation (CPUID, TSC), the boot (PVH entry of an ELF, or the Linux
//! boot protocol's 64-bit entry of a bzImage, see `linux_boot`), and the
//! lifecycle that runs the vCPU threads until the guest powers off, crashes
//! or times out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_segment, kvm_userspace_memory_region, CpuId,
    KVM_CAP_X86_USER_SPACE_MSR, KVM_MAX_CPUID_ENTRIES, KVM_MSR_EXIT_REASON_FILTER,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd,
};
use vmm_sys_util::eventfd::EventFd;

use crate::boot;
use crate::clock::Clock;
use crate::cpuid::{self, CpuidConfig, CpuidEntry};
use crate::devices::{ConsoleOut, PortBus};
use crate::layout;
use crate::linux_boot::{self, LinuxKernel};
use crate::machine::{GuestExit, Machine};
use crate::vcpu::Vcpu;

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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM lacks {0}, which xenkvm needs")]
    MissingCap(&'static str),
    #[error("KVM ioctl {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("cannot allocate guest memory: {0}")]
    Memory(String),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    LinuxBoot(#[from] linux_boot::LinuxBootError),
    #[error("--vcpus must be between 1 and {max}, not {0}", max = crate::MAX_VCPUS)]
    BadVcpus(u32),
    #[error("--memory must be between 16 MiB and 64 GiB, not {0} MiB")]
    BadMemory(u64),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Other(String),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(what, e)
}

/// The boot vCPU's initial state.
#[derive(Debug, Clone, Copy)]
enum EntryState {
    Pvh { entry: u32, start_info: u64 },
    Linux64(LinuxKernel),
}

/// A created VM, ready to run.
pub struct Vm {
    pub machine: Arc<Machine>,
    vcpus: Vec<VcpuFd>,
    entry: EntryState,
    stdin_console: bool,
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

impl Vm {
    /// Creates the VM, loads the kernel and prepares the vCPUs.
    pub fn create(cfg: &VmConfig, console: Arc<ConsoleOut>) -> Result<Vm, VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > crate::MAX_VCPUS {
            return Err(VmError::BadVcpus(cfg.vcpus));
        }
        if !(16..=65536).contains(&cfg.mem_mib) {
            return Err(VmError::BadMemory(cfg.mem_mib));
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "an in-kernel irqchip"),
            (Cap::X86UserSpaceMsr, "user-space MSR exits"),
            (Cap::X86MsrFilter, "MSR filters"),
            (Cap::SyncRegs, "sync regs"),
            (Cap::VcpuEvents, "vCPU events"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Intel-only areas; harmless elsewhere. They sit in the MMIO hole.
        let _ = vm.set_tss_address(0xfffb_d000);
        let _ = vm.set_identity_map_address(0xfffb_c000);
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        enable_msr_exits(&vm)?;

        let map = create_memory(cfg.mem_mib)?;
        let mem = map.guest_memory().clone();
        for (slot, r) in map.ram_regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.guest_base.0,
                memory_size: r.size,
                userspace_addr: r.host_addr,
            };
            // SAFETY: the region is a live mapping owned by `map`, which the
            // Machine keeps for the VM's whole life (it outlives `vm`'s use).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let e820 = layout::e820(&mem);
        let rsdp = crate::acpi::write_tables(&mem, cfg.vcpus)
            .map_err(|e| VmError::Other(e.to_string()))?;
        let entry = match cfg.boot {
            BootProtocol::Pvh => {
                let kernel = boot::load_pvh_elf(&mem, &cfg.kernel)?;
                let start_info =
                    boot::write_start_info(&mem, &e820, &cfg.cmdline, cfg.initrd.as_deref(), rsdp)?;
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
                let k = linux_boot::load_bzimage(
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
        };

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmError::Other(format!("eventfd: {e}")))?;
        vm.register_irqfd(&serial_irq, 4)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let ports = PortBus::new(console.clone(), serial_irq);

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        let mut tsc_khz = 0;
        for id in 0..cfg.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            if id == 0 {
                tsc_khz = fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
            }
            let entries = cpuid::guest_cpuid(
                &from_kvm_cpuid(&supported),
                &CpuidConfig {
                    vcpu_id: id,
                    nr_vcpus: cfg.vcpus,
                    tsc_khz,
                    upcall_vector: true,
                },
            );
            fd.set_cpuid2(&to_kvm_cpuid(&entries)?)
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            vcpus.push(fd);
        }
        let offset = measure_tsc_offset(&vcpus[0]);
        let clock = Clock::new(tsc_khz, offset);
        tracing::info!(tsc_khz, offset, "guest clock");

        let machine = Machine::new(vm, map, clock, ports, console, cfg)?;
        Ok(Vm {
            machine,
            vcpus,
            entry,
            stdin_console: cfg.stdin_console,
        })
    }

    /// Runs the guest until it stops. Consumes the VM.
    pub fn run(self, timeout: Option<Duration>) -> GuestExit {
        let Vm {
            machine,
            vcpus,
            entry,
            stdin_console,
        } = self;
        crate::vcpu::install_kick_handler();
        let started = Instant::now();
        let mut handles = Vec::new();
        for (id, fd) in vcpus.into_iter().enumerate() {
            let id = id as u32;
            if id == 0 {
                let r = match entry {
                    EntryState::Pvh { entry, start_info } => {
                        set_pvh_entry_state(&fd, entry, start_info)
                    }
                    EntryState::Linux64(k) => set_linux64_entry_state(&fd, &k),
                };
                if let Err(e) = r {
                    return GuestExit::Error(format!("cannot set the boot vCPU's registers: {e}"));
                }
            }
            let vcpu = Vcpu::new(id, fd, machine.clone());
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu.run())
            {
                Ok(h) => handles.push(h),
                Err(e) => {
                    machine
                        .request_exit(GuestExit::Error(format!("cannot start vCPU thread: {e}")));
                    break;
                }
            }
        }
        machine.start_monitor();
        if stdin_console {
            spawn_console_input(&machine);
        }
        let exit = machine.wait_exit(timeout.map(|t| started + t));
        machine.stop_vcpus(&handles);
        for h in handles {
            let _ = h.join();
        }
        machine.console.flush();
        exit
    }
}

/// Reads the VMM's stdin and hands it to the guest's PV console. The thread
/// ends at EOF or when the guest is gone; it is detached because a read on a
/// terminal cannot be interrupted portably.
fn spawn_console_input(machine: &Arc<Machine>) {
    use std::io::Read;
    let weak = Arc::downgrade(machine);
    let r = std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || {
            let mut buf = [0u8; 512];
            let mut stdin = std::io::stdin();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let Some(m) = weak.upgrade() else { return };
                if m.stopping() {
                    return;
                }
                let mut off = 0;
                // The backend queues a bounded amount; wait for the guest to drain it.
                while off < n && !m.stopping() {
                    off += m.xen.console_input(&buf[off..n]);
                    if off < n {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        });
    if let Err(e) = r {
        tracing::warn!(%e, "cannot start the console input thread");
    }
}

/// Enables user-space exits for writes to the Xen hypercall MSR only.
fn enable_msr_exits(vm: &VmFd) -> Result<(), VmError> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER);
    vm.enable_cap(&cap)
        .map_err(kvm_err("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
    // A zero bit denies the access, which the cap turns into an exit.
    let bitmap = [0u8; 1];
    let mut ranges = vec![MsrFilterRange {
        flags: MsrFilterRangeFlags::WRITE,
        base: cpuid::XEN_HYPERCALL_MSR,
        msr_count: 1,
        bitmap: &bitmap,
    }];
    // The Viridian (Hyper-V) MSRs, which xenkvm does not offer: refused
    // with #GP as by KVM, but the VMM names what the guest wanted.
    let viridian = [0u8; (crate::exit::VIRIDIAN_MSR_COUNT as usize).div_ceil(8)];
    ranges.push(MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base: crate::exit::VIRIDIAN_MSR_FIRST,
        msr_count: crate::exit::VIRIDIAN_MSR_COUNT,
        bitmap: &viridian,
    });
    // Where `syscall` from CPL 3 does not reach CPL 0, LSTAR writes arm the
    // fix-up (crate::syscall_fix).
    let syscall = &crate::probe::HostProbe::get().user_syscall;
    if *syscall != crate::probe::Support::Native {
        tracing::info!(%syscall, "syscall at CPL 3 on this host");
        ranges.push(MsrFilterRange {
            flags: MsrFilterRangeFlags::WRITE,
            base: crate::syscall_fix::MSR_LSTAR,
            msr_count: 1,
            bitmap: &bitmap,
        });
    }
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(kvm_err("KVM_X86_SET_MSR_FILTER"))
}

fn from_kvm_cpuid(c: &CpuId) -> Vec<CpuidEntry> {
    c.as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

fn to_kvm_cpuid(v: &[CpuidEntry]) -> Result<CpuId, VmError> {
    let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = v
        .iter()
        .map(|e| kvm_bindings::kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    CpuId::from_entries(&entries).map_err(|e| VmError::Other(format!("CPUID table: {e:?}")))
}

/// Estimates guest TSC - host TSC by reading IA32_TSC bracketed by host
/// reads (the midpoint; error below the ioctl's duration, about a µs).
fn measure_tsc_offset(fd: &VcpuFd) -> u64 {
    use kvm_bindings::{kvm_msr_entry, Msrs};
    let mut best = (u64::MAX, 0u64);
    for _ in 0..5 {
        let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
            index: 0x10,
            ..Default::default()
        }]) else {
            return 0;
        };
        let t0 = crate::clock::host_tsc();
        let ok = fd.get_msrs(&mut msrs).is_ok();
        let t1 = crate::clock::host_tsc();
        if !ok {
            return 0;
        }
        let span = t1.wrapping_sub(t0);
        if span < best.0 {
            let mid = t0.wrapping_add(span / 2);
            best = (span, msrs.as_slice()[0].data.wrapping_sub(mid));
        }
    }
    best.1
}

/// Flat 4 GiB ring-0 code (`code`, 64-bit if `long`) and data (`data`)
/// segments in every segment register, and a busy 32-bit TSS at 0x20.
fn load_flat_segments(s: &mut kvm_bindings::kvm_sregs, code: u16, data: u16, long: bool) {
    let cs = crate::x86::flat_segment(code, 0xb, 0, long);
    let ds = crate::x86::flat_segment(data, 0x3, 0, long);
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
fn set_pvh_entry_state(fd: &VcpuFd, entry: u32, start_info: u64) -> Result<(), kvm_ioctls::Error> {
    let mut s = fd.get_sregs()?;
    load_flat_segments(&mut s, 0x10, 0x18, false);
    s.cr0 = 0x11; // PE | ET
    s.cr4 = 0;
    s.efer = 0;
    fd.set_sregs(&s)?;
    let mut r = fd.get_regs()?;
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
fn set_linux64_entry_state(fd: &VcpuFd, k: &LinuxKernel) -> Result<(), kvm_ioctls::Error> {
    let mut s = fd.get_sregs()?;
    load_flat_segments(&mut s, linux_boot::BOOT_CS, linux_boot::BOOT_DS, true);
    s.gdt.base = k.gdt_base;
    s.gdt.limit = k.gdt_limit;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr3 = k.cr3;
    s.cr4 = 0x20; // PAE
    s.cr0 = 0x8000_0031; // PG | NE | ET | PE
    s.efer = 0x500; // LMA | LME
    fd.set_sregs(&s)?;
    let mut r = fd.get_regs()?;
    r.rip = k.entry;
    r.rsi = k.zero_page;
    r.rsp = layout::BOOT_STACK_TOP;
    r.rflags = 2;
    fd.set_regs(&r)?;
    Ok(())
}
