//! Save and restore in Xen's own migration stream format (issue 14).
//!
//! Layers, outermost first (`../shared/docs/MIGRATION.md` has the facts and
//! their sources):
//! - [`stream`]: the byte formats, pure and KVM-free: the xl save-file header,
//!   the libxl v2 stream, the libxc v2/v3 stream for an x86 HVM domain, and a
//!   reader that walks a whole image and checks its record sequence;
//! - [`hvm_context`]: the typed records of Xen's `HVM_CONTEXT` blob
//!   (`public/arch-x86/hvm/save.h`): CPU, LAPIC, IOAPIC, PIC, PIT, RTC, MTRR,
//!   XSAVE, TSC_ADJUST, CPU_MSR;
//! - [`convert`]: KVM vCPU/irqchip state (the `kvm_bindings` structs, plain
//!   data; the ioctls stay in `src/kvm/`) to and from those records, refusing
//!   by name what cannot be represented;
//! - [`xenkvm_records`]: xenkvm's own optional records (type bit 31 set, so
//!   Xen skips them) for state Xen's format has no record for.
//!
//! Nothing here touches guest memory or KVM file descriptors; everything a
//! stream says is checked (lengths against limits, record order) before a
//! caller gets it, and no parser panics or allocates more than the stream
//! actually holds.
#![forbid(unsafe_code)]

pub mod convert;
pub mod hvm_context;
pub mod live;
pub mod pagefile;
pub mod pagein;
pub mod pageio;
pub mod restore;
pub mod save;
pub mod stream;
pub mod xenkvm_records;
