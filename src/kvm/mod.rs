//! The KVM boundary: the only module that imports `kvm_ioctls`, and the home
//! of every `unsafe` block that talks to KVM. Above it, the VMM sees KVM
//! through the types defined here: [`KvmVm`] (the VM, memslots, interrupts),
//! [`KvmVcpu`] (`KVM_RUN` returning a copied-out [`Exit`], registers,
//! events, breakpoints) and [`Kicker`] (`immediate_exit` plus a signal).

#[cfg(test)]
mod avx_native;
pub mod coverage;
pub mod dirty;
pub mod migration;
pub mod probe;
#[cfg(test)]
mod sse_native;
pub mod vcpu;
pub mod vm;
#[cfg(test)]
mod x87_native;

pub use vcpu::{
    install_kick_handler, kick_signal, CpuTimeKick, Exit, Kicker, KvmError, KvmVcpu, ThreadKick,
};
pub use vm::{open_kvm, open_kvm_at, Interrupts, KvmVm, KvmVmError, MemSlots, MsrTrap};
