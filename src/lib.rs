//! xenkvm: a userspace VMM on Linux KVM that runs unmodified Xen HVM and
//! PV-on-HVM guests. See ../README.md and the architecture notes.
//!
//! The modules, in reading order (each folder's `mod.rs` says what it owns
//! and what it may import; `tests/layers.rs` checks the rules):

/// Host OS facilities other than KVM: the host scheduler's context switches of our threads (perf).
pub mod host;

/// Composition and lifecycle: builds the VM, owns the vCPU handles, the event loop and the one thread spawner.
pub mod vmm;

/// The only user of `kvm_ioctls`: VM and vCPU file descriptors, memslots, interrupts, the host probe.
pub mod kvm;

/// The vCPU thread: its state machine, its handle, exit decisions, VCPUOP_initialise/up/down.
pub mod vcpu;

/// Pure x86: registers and modes, the page walk, instruction fix-ups, CPUID policy (no ioctls).
pub mod arch;

/// Loading a guest: PVH, the Linux boot protocol, bzImage, ACPI, the guest-physical layout.
pub mod boot;

/// Emulated platform devices on the port/MMIO bus: serial, CMOS, debug ports, ACPI PM, PCI.
pub mod devices;

/// The KVM side of the Xen personality: hypercall transport, the `Platform`, overlays, timers, clock.
pub mod xen;

/// dom0-side services with no KVM in them: xenstore and the PV console.
pub mod backends;

/// Configuration as Xen users write it: xl.cfg files, xl's disk and vif specifications (pure parsing).
pub mod config;

/// Save and restore in Xen's migration stream format: stream reader/writer, HVM context records, KVM conversions.
pub mod migration;

/// The built-in test guest and its benchmark ports.
pub mod testing;

/// Log set-up for the command line (`XENKVM_LOG`, `--log-level`, `--log-file`).
pub mod logging;

/// Guest RAM as vm-memory sees it (gpc's memfd-backed regions, with a
/// dirty bitmap for the VMM's own writes).
pub type GuestMem = gpc::GuestMem;

/// Most vCPUs a guest may have (the 2-level event channel ABI and
/// shared_info's vcpu_info array cover 32 without relocation).
pub const MAX_VCPUS: u32 = 32;
