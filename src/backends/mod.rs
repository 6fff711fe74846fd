//! dom0-side services xenkvm plays for its guest: the xenstore server and
//! the PV console backend. They know nothing of KVM (they reach guest pages
//! through `RingPage`) and contain no `unsafe`; the VMM drives them from its
//! event loop, never on the vCPU that sent the event.
#![forbid(unsafe_code)]

pub mod blkback;
pub mod blkif;
pub mod console;
pub mod netback;
pub mod netif;
pub mod worker;
pub mod xenstore;
