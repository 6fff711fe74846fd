//! Host OS facilities other than KVM: the host scheduler's context switches
//! of our own threads through `perf_event_open` (see
//! ../shared/docs/RUNSTATE-SCHED.md for the measurements behind the choices).
//!
//! Rules: this layer imports no other xenkvm layer (it is below `xen/` and
//! `vmm/`, beside `kvm/`); its `unsafe` (the syscall, the ring mapping) stays
//! in this folder, each block with a `// SAFETY:` comment; it starts no
//! threads (the monitor thread is `vmm/`'s).

pub mod bpf;
pub mod cpu;
pub mod perf;
pub mod tap;
