//! The Xen personality of xenkvm: hypercall decoding, dispatch, and the domain state the
//! handlers own (shared_info, vcpu_info, event channels, grant table, HVM params, timers).
//!
//! There is no KVM in this crate. The VMM decodes a hypercall from the vCPU's registers into a
//! [`Hypercall`], hands it to [`Domain::dispatch`] together with a [`VcpuAccess`] (identity,
//! privilege, guest-virtual memory), and acts on the returned [`Outcome`]. Everything the domain
//! needs from the VMM (console, overlay pages, time, upcall injection, timers) goes through the
//! [`Platform`] trait. Unit tests drive the whole surface with fakes (see [`testing`]).
//!
//! Semantics and error numbers follow Xen 4.17 for an HVM domU (`xen/common/*.c`,
//! `xen/arch/x86/hvm/*.c`), not Linux's expectations of them; where xenkvm deliberately differs,
//! the handler's doc says so.
//!
//! Guest input never panics, loops unboundedly or allocates unboundedly: every length is
//! bounded, every pointer goes through [`VcpuAccess`] and faults become `-EFAULT`.

#![forbid(unsafe_code)]

mod abi;
mod console;
mod debug;
mod domain;
mod errno;
mod evtchn;
mod evtchn_fifo;
mod gnttab;
mod grant_access;
mod guest;
mod hvm;
mod memory;
mod platform;
mod restore;
mod sched;
mod shared;
mod snapshot;
pub mod testing;
mod time;
mod types;
mod vcpu;
mod vcpu_init;
mod version;

pub use domain::{CallbackVia, Domain, DomainConfig};
pub use errno::Errno;
pub use grant_access::GrantMapping;
pub use guest::{MemFault, VcpuAccess};
pub use platform::{E820Entry, GuestTime, OverlayId, Platform, RunstateAreaSpec, RunstateInfo};
pub use shared::{SharedPage, VecPage};
pub use snapshot::{DomainSnapshot, PortSnapshot, VcpuSnapshot};
pub use time::{time_scale, TimeScale};
pub use types::{EvtchnPort, Gfn, GuestWidth, Hypercall, HypercallNr, Outcome, VcpuId};
pub use vcpu_init::{CrPolicy, HvmSegment, HvmVcpuState};

/// Errors of this crate's library API (not of guest hypercalls, which return an [`Errno`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The domain configuration cannot describe a Xen HVM domU.
    #[error("invalid domain configuration: {0}")]
    InvalidConfig(&'static str),
    /// The VMM could not provide a page the domain needs (shared_info, a grant frame).
    #[error("the platform could not allocate a shared page (Xen errno {0})")]
    PageAllocation(Errno),
    /// An HVM parameter index outside `0..HVM_NR_PARAMS`.
    #[error("HVM parameter index {0} is out of range (Xen 4.17 has 39)")]
    BadParam(u32),
    /// A vCPU id at or above the configured number of vCPUs.
    #[error("vCPU {0} does not exist in this domain")]
    BadVcpu(u32),
    /// An event channel operation the VMM asked for failed.
    #[error("event channel operation failed (Xen errno {0})")]
    Evtchn(Errno),
    /// A dom0-side grant operation failed with this `GNTST_*` status (-1 general error, -2 bad
    /// domain, -3 bad grant reference, -4 bad handle, -7 no space, -9 bad page, -10 bad copy
    /// argument).
    #[error("grant operation failed (GNTST {0})")]
    Grant(i16),
    /// A saved Xen-side state that cannot be applied to this domain (restore, issue 14).
    #[error("cannot restore the Xen state: {0}")]
    Restore(String),
}
