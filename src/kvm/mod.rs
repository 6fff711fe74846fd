//! The KVM boundary: the only module that imports `kvm_ioctls`, and the home
//! of every `unsafe` block that talks to KVM. Above it, the VMM sees KVM
//! through the types defined here.

pub mod probe;
