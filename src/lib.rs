//! xenkvm: a userspace VMM on Linux KVM that runs unmodified Xen HVM and
//! PV-on-HVM guests. See ../README.md and the architecture notes.

pub mod acpi;
pub mod boot;
pub mod bzimage;
pub mod clock;
pub mod console;
pub mod coverage;
pub mod cpuid;
pub mod devices;
pub mod exit;
pub mod hcall_page;
pub mod layout;
pub mod linux_boot;
pub mod machine;
pub mod pci;
pub mod probe;
pub mod syscall_fix;
pub mod test_guest;
pub mod vcpu;
pub mod vm;
pub mod x86;
pub mod x86_more;
pub mod xen;
pub mod xenstore;

/// Guest RAM as vm-memory sees it (gpc's memfd-backed regions, with a
/// dirty bitmap for the VMM's own writes).
pub type GuestMem = gpc::GuestMem;

/// Most vCPUs a guest may have (the 2-level event channel ABI and
/// shared_info's vcpu_info array cover 32 without relocation).
pub const MAX_VCPUS: u32 = 32;
