//! Exit decoding: a KVM exit copied out of `kvm_run` ([`Exit`]) and the
//! decision of what the vCPU thread does about it ([`decide`]), a plain
//! function unit-tested without KVM. The vCPU thread (`vcpu.rs`) only copies
//! the exit, applies the answers KVM expects inside `kvm_run` (port-read
//! data, MSR error flags, MMIO read data) and carries out the [`Action`].

use crate::arch::x86::cpuid::XEN_HYPERCALL_MSR;
use crate::devices::BusEvent;
use crate::vmm::machine::{CrashCause, GuestExit, RebootCause};

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION as INTERNAL_ERROR_EMULATION,
    KVM_SYSTEM_EVENT_CRASH as SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET as SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN as SYSTEM_EVENT_SHUTDOWN,
};

pub use crate::kvm::Exit;

/// What the vCPU thread does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing more to do: re-enter the guest.
    Resume,
    /// A hypercall through the hypercall page (the port device at
    /// `HYPERCALL_PORT` asked for it).
    Hypercall,
    /// The test guest's bench stub: complete the stub's `ret`, nothing else.
    BenchStubReturn,
    /// An I/O-port or MMIO access no device claimed: reads give all ones,
    /// writes are dropped (logged once per address).
    Unclaimed { mmio: bool, addr: u64, write: bool },
    /// Accept the hypercall-page MSR write and fill the page at `gpa`.
    HypercallPage { gpa: u64 },
    /// The guest wrote LSTAR (only filtered on hosts that need the
    /// [`crate::arch::x86::syscall_fix`]): write it and arm the #PF-handler breakpoint.
    LstarWrite { data: u64 },
    /// Refuse the MSR access: the guest gets #GP.
    MsrFault,
    /// KVM could not emulate an instruction: decode and fix it up.
    Fixup,
    /// KVM_RUN was interrupted by a signal: if the vCPU monitor kicked it
    /// because it stayed inside KVM_RUN too long, look for a `vmcall` at RIP.
    Interrupted,
    /// A breakpoint at linear address `pc` fired: a `vmcall`/`vmmcall`
    /// site that was armed before.
    HypercallTrap { pc: u64 },
    /// Stop the guest with this reason.
    Stop(GuestExit),
}

/// The first Viridian (Hyper-V) MSR; the range ends at 0x400000ff. Xen's
/// own hypercall MSR is 0x40000000 when viridian is off.
pub const VIRIDIAN_MSR_FIRST: u32 = 0x4000_0001;
pub const VIRIDIAN_MSR_COUNT: u32 = 0xff;

/// True for an MSR of the Viridian (Hyper-V) range.
pub fn is_viridian_msr(index: u32) -> bool {
    (VIRIDIAN_MSR_FIRST..VIRIDIAN_MSR_FIRST + VIRIDIAN_MSR_COUNT).contains(&index)
}

/// What `decide` needs to know about the VM.
pub trait ExitEnv {
    /// True if `gpa` is a page of guest RAM the hypercall page can go to.
    fn hypercall_page_ok(&self, gpa: u64) -> bool;
}

/// What a device's answer to an access asks of the vCPU thread.
pub fn device_action(ev: BusEvent) -> Action {
    match ev {
        BusEvent::None => Action::Resume,
        BusEvent::Reset => Action::Stop(GuestExit::Reboot(RebootCause::PortReset)),
        BusEvent::PowerOff => Action::Stop(GuestExit::Poweroff),
        BusEvent::Hypercall => Action::Hypercall,
        BusEvent::StubReturn => Action::BenchStubReturn,
    }
}

/// Decides what to do about an exit of vCPU `vcpu` that no device claimed
/// (port and MMIO accesses go to the buses first).
pub fn decide(exit: &Exit, vcpu: u32, env: &dyn ExitEnv) -> Action {
    let unclaimed = |mmio, addr, write| Action::Unclaimed { mmio, addr, write };
    match *exit {
        Exit::IoOut { port, .. } => unclaimed(false, u64::from(port), true),
        Exit::IoIn { port, .. } => unclaimed(false, u64::from(port), false),
        Exit::MmioRead { addr, .. } => unclaimed(true, addr, false),
        Exit::MmioWrite { addr, .. } => unclaimed(true, addr, true),
        // Bits 11:0 of the value select the page index; there is one page.
        Exit::WrMsr {
            index: XEN_HYPERCALL_MSR,
            data,
        } if env.hypercall_page_ok(data) => Action::HypercallPage { gpa: data },
        Exit::WrMsr {
            index: crate::arch::x86::syscall_fix::MSR_LSTAR,
            data,
        } => Action::LstarWrite { data },
        // Viridian (Hyper-V) MSRs: Xen offers them only with the domain
        // option `viridian`; xenkvm never does. #GP, as on Xen without it,
        // and say what the guest wanted.
        Exit::WrMsr { index, .. } | Exit::RdMsr { index } if is_viridian_msr(index) => {
            // Once per process (one VM), then quietly: guests that scan MSR
            // ranges (XTF `msr`) touch hundreds of them.
            static ONCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !ONCE.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    msr = format_args!("{index:#x}"),
                    "guest needs viridian (Hyper-V enlightenments, Xen's `viridian` domain option), which xenkvm does not offer"
                );
            } else {
                tracing::debug!(msr = format_args!("{index:#x}"), "Viridian MSR refused");
            }
            Action::MsrFault
        }
        // The filter only sends the hypercall MSR here; anything else the
        // guest gets #GP for, as on Xen.
        Exit::WrMsr { .. } | Exit::RdMsr { .. } => Action::MsrFault,
        // With the in-kernel irqchip HLT does not exit; if it does, resume.
        Exit::Hlt => Action::Resume,
        Exit::Interrupted => Action::Interrupted,
        Exit::Debug { pc } => Action::HypercallTrap { pc },
        Exit::Shutdown => Action::Stop(GuestExit::Reboot(RebootCause::TripleFault {
            vcpu,
            rip: None,
        })),
        Exit::InternalError {
            suberror: INTERNAL_ERROR_EMULATION,
        } => Action::Fixup,
        Exit::InternalError { suberror } => {
            Action::Stop(GuestExit::Crash(CrashCause::KvmInternal { vcpu, suberror }))
        }
        Exit::SystemEvent(SYSTEM_EVENT_SHUTDOWN) => Action::Stop(GuestExit::Poweroff),
        Exit::SystemEvent(SYSTEM_EVENT_RESET) => {
            Action::Stop(GuestExit::Reboot(RebootCause::SystemReset))
        }
        Exit::SystemEvent(SYSTEM_EVENT_CRASH) => {
            Action::Stop(GuestExit::Crash(CrashCause::KvmCrashEvent))
        }
        Exit::SystemEvent(t) => Action::Stop(GuestExit::Crash(CrashCause::UnknownSystemEvent(t))),
        Exit::FailEntry { reason } => Action::Stop(GuestExit::Error(format!(
            "vCPU {vcpu}: KVM_EXIT_FAIL_ENTRY, hardware entry failure reason {reason:#x}"
        ))),
        Exit::RunError(e) if e == libc::EINTR || e == libc::EAGAIN => Action::Interrupted,
        Exit::RunError(e) => Action::Stop(GuestExit::Error(format!(
            "vCPU {vcpu}: KVM_RUN failed: {}",
            std::io::Error::from_raw_os_error(e)
        ))),
        Exit::Unexpected(ref what) => Action::Stop(GuestExit::Error(format!(
            "vCPU {vcpu}: unexpected KVM exit {what}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Env;
    impl ExitEnv for Env {
        fn hypercall_page_ok(&self, gpa: u64) -> bool {
            gpa & 0xfff == 0 && gpa < 0x100_0000
        }
    }

    fn d(e: Exit) -> Action {
        decide(&e, 1, &Env)
    }

    #[test]
    fn device_action_events_map_to_actions() {
        assert_eq!(device_action(BusEvent::Hypercall), Action::Hypercall);
        assert_eq!(device_action(BusEvent::StubReturn), Action::BenchStubReturn);
        assert_eq!(device_action(BusEvent::None), Action::Resume);
        assert_eq!(
            device_action(BusEvent::PowerOff),
            Action::Stop(GuestExit::Poweroff)
        );
        assert_eq!(
            device_action(BusEvent::Reset),
            Action::Stop(GuestExit::Reboot(RebootCause::PortReset))
        );
    }

    #[test]
    fn decide_unclaimed_accesses_are_reported_as_such() {
        let e = Exit::IoOut {
            port: 0x1234,
            data: [b'x', 0, 0, 0],
            len: 1,
        };
        assert_eq!(
            d(e),
            Action::Unclaimed {
                mmio: false,
                addr: 0x1234,
                write: true
            }
        );
        assert_eq!(
            d(Exit::IoIn { port: 0x71, len: 1 }),
            Action::Unclaimed {
                mmio: false,
                addr: 0x71,
                write: false
            }
        );
        assert_eq!(
            d(Exit::MmioRead {
                addr: 0xfed0_0000,
                len: 4
            }),
            Action::Unclaimed {
                mmio: true,
                addr: 0xfed0_0000,
                write: false
            }
        );
    }

    #[test]
    fn decide_hypercall_msr_valid_page_accepted_else_gp() {
        let w = |index, data| Exit::WrMsr { index, data };
        assert_eq!(
            d(w(XEN_HYPERCALL_MSR, 0x11_0000)),
            Action::HypercallPage { gpa: 0x11_0000 }
        );
        assert_eq!(
            d(w(XEN_HYPERCALL_MSR, 0x11_0001)),
            Action::MsrFault,
            "page index 1 does not exist"
        );
        assert_eq!(
            d(w(XEN_HYPERCALL_MSR, 0x4000_0000_0000)),
            Action::MsrFault,
            "not RAM"
        );
        assert_eq!(d(w(0x1234, 0)), Action::MsrFault);
        assert_eq!(
            d(Exit::RdMsr {
                index: XEN_HYPERCALL_MSR
            }),
            Action::MsrFault
        );
    }

    #[test]
    fn decide_emulation_failure_fixed_up_other_internal_errors_crash() {
        assert_eq!(d(Exit::InternalError { suberror: 1 }), Action::Fixup);
        assert!(matches!(
            d(Exit::InternalError { suberror: 3 }),
            Action::Stop(GuestExit::Crash(_))
        ));
    }

    #[test]
    fn decide_triple_fault_is_a_reboot_naming_the_vcpu() {
        match d(Exit::Shutdown) {
            Action::Stop(GuestExit::Reboot(RebootCause::TripleFault { vcpu, .. })) => {
                assert_eq!(vcpu, 1)
            }
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn decide_system_events_map_to_guest_exits() {
        assert_eq!(
            d(Exit::SystemEvent(SYSTEM_EVENT_SHUTDOWN)),
            Action::Stop(GuestExit::Poweroff)
        );
        assert!(matches!(
            d(Exit::SystemEvent(SYSTEM_EVENT_RESET)),
            Action::Stop(GuestExit::Reboot(_))
        ));
        assert!(matches!(
            d(Exit::SystemEvent(99)),
            Action::Stop(GuestExit::Crash(_))
        ));
    }

    #[test]
    fn decide_signals_resume_real_errors_stop() {
        assert_eq!(d(Exit::RunError(libc::EINTR)), Action::Interrupted);
        assert_eq!(d(Exit::RunError(libc::EAGAIN)), Action::Interrupted);
        assert!(matches!(
            d(Exit::RunError(libc::EFAULT)),
            Action::Stop(GuestExit::Error(_))
        ));
        assert!(matches!(
            d(Exit::FailEntry { reason: 0x21 }),
            Action::Stop(GuestExit::Error(_))
        ));
        assert_eq!(d(Exit::Interrupted), Action::Interrupted);
    }

    #[test]
    fn decide_debug_exit_is_a_hypercall_trap_at_pc() {
        assert_eq!(
            d(Exit::Debug {
                pc: 0xffff_8000_0000_1000
            }),
            Action::HypercallTrap {
                pc: 0xffff_8000_0000_1000
            }
        );
    }
}
