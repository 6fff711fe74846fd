//! Configuration as Xen users write it: the xl.cfg file ([`xlcfg`]), xl's
//! disk specification ([`disk::DiskSpec`]) and vif specification
//! ([`nic::NicSpec`]).
//!
//! Pure parsing of user input: no KVM, no threads, no `unsafe`, no I/O but
//! reading the config file. A top-level layer because both the VMM
//! (`VmConfig`, the CLI) and the device backends (`backends/`, which may not
//! import `vmm/`) consume the parsed specs.

#![forbid(unsafe_code)]

pub mod disk;
pub mod nic;
pub mod xlcfg;

pub use disk::{DiskFormat, DiskSpec, SpecError};
pub use nic::{Mac, NicSpec};
pub use xlcfg::{CfgError, GuestType, OnEvent, XlConfig};
