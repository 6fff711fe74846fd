//! runstate: vCPU runstate accounting and publishing into the guest's area.
//!
//! Accounting ([`Accounting`]) is pure arithmetic per vCPU: current state,
//! entry time, `time[4]`, with `state_entry_time - sum(time[])` exactly
//! constant, plus steal time from the host scheduler ([`RunDelay`]).
//! Publishing ([`RunstateArea`]) writes the guest's registered area through
//! one gpc cache (the area may straddle a page, a memory region, or be the two
//! frames of a guest-virtual area), in the 64-bit or 32-bit compat layout,
//! following Xen's `XEN_RUNSTATE_UPDATE` protocol when the guest asked for it
//! (modelled on Linux's `kvm_xen_update_runstate_guest()`). Migration gets
//! and sets the data ([`Accounting::set_data`], [`Accounting::adjust`], like
//! KVM's `RUNSTATE_DATA`/`RUNSTATE_ADJUST`).
//!
//! The time base is the guest's Xen system time (the same as
//! `vcpu_time_info`); callers pass `now_ns` in it.

#![forbid(unsafe_code)]

mod accounting;
mod area;
mod layout;
mod sched;
mod steal;

pub use accounting::{Accounting, RunstateData, State};
pub use area::{publish_to, RunstateArea, Sink};
pub use layout::{Layout, VMASST_TYPE_RUNSTATE_UPDATE_FLAG, XEN_RUNSTATE_UPDATE};
pub use sched::{Applied, HostSched, SchedStats, Switch};
pub use steal::{parse_schedstat, RunDelay};

/// Errors of accounting and publishing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A state value outside 0..=3.
    #[error("runstate {0} is not one of running (0), runnable (1), blocked (2), offline (3)")]
    BadState(u32),
    /// Runstate data that would break `state_entry_time >= sum(time[])` or overflow.
    #[error("runstate data rejected: times overflow, go negative, or exceed state_entry_time")]
    BadData,
    /// The registered pieces do not add up to the layout's size.
    #[error("runstate area pieces add up to {got} bytes, the layout needs {expected}")]
    BadAreaSize {
        /// Layout size.
        expected: usize,
        /// Sum of the pieces.
        got: usize,
    },
    /// The cache could not map or access the area.
    #[error("runstate area: {0}")]
    Cache(#[from] gpc::Error),
}
