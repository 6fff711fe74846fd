//! Exit decoding: a KVM exit copied out of `kvm_run` ([`Exit`]) and the
//! decision of what the vCPU thread does about it ([`decide`]), a plain
//! function unit-tested without KVM. The vCPU thread (`vcpu.rs`) only copies
//! the exit, applies the answers KVM expects inside `kvm_run` (port-read
//! data, MSR error flags, MMIO read data) and carries out the [`Action`].

use crate::cpuid::XEN_HYPERCALL_MSR;
use crate::hcall_page::HYPERCALL_PORT;
use crate::machine::GuestExit;
use crate::test_guest::BENCH_STUB_PORT;

/// `KVM_INTERNAL_ERROR_EMULATION`.
const INTERNAL_ERROR_EMULATION: u32 = 1;
/// `KVM_SYSTEM_EVENT_SHUTDOWN` / `_RESET` / `_CRASH`.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

/// A KVM exit, copied out of `kvm_run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    IoOut {
        port: u16,
        data: [u8; 4],
        len: usize,
    },
    IoIn {
        port: u16,
        len: usize,
    },
    MmioRead {
        addr: u64,
        len: usize,
    },
    MmioWrite {
        addr: u64,
        len: usize,
    },
    WrMsr {
        index: u32,
        data: u64,
    },
    RdMsr {
        index: u32,
    },
    Hlt,
    /// Triple fault.
    Shutdown,
    InternalError {
        suberror: u32,
    },
    SystemEvent(u32),
    /// KVM_RUN returned because of a signal (EINTR/EAGAIN) or `KVM_EXIT_INTR`.
    Interrupted,
    /// A debug exit: a hardware breakpoint xenkvm armed at a `vmcall`
    /// site fired, at linear address `pc`.
    Debug {
        pc: u64,
    },
    FailEntry {
        reason: u64,
    },
    /// KVM_RUN failed with this errno.
    RunError(i32),
    Unexpected(String),
}

/// What the vCPU thread does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing more to do: re-enter the guest.
    Resume,
    /// A hypercall through the hypercall page (`out` to [`HYPERCALL_PORT`]).
    Hypercall,
    /// The test guest's bench stub: complete the stub's `ret`, nothing else.
    BenchStubReturn,
    /// A port write for the devices or the bench ports.
    PortOut {
        port: u16,
        data: [u8; 4],
        len: usize,
    },
    /// A port read: the thread fills the data in `kvm_run` from the devices.
    PortIn { port: u16 },
    /// An MMIO read with nothing behind it: reads as all ones.
    MmioUnbacked { addr: u64, write: bool },
    /// Accept the hypercall-page MSR write and fill the page at `gpa`.
    HypercallPage { gpa: u64 },
    /// The guest wrote LSTAR (only filtered on hosts that need the
    /// [`crate::syscall_fix`]): write it and arm the #PF-handler breakpoint.
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

/// Decides what to do about an exit of vCPU `vcpu`.
pub fn decide(exit: &Exit, vcpu: u32, env: &dyn ExitEnv) -> Action {
    match *exit {
        Exit::IoOut {
            port: HYPERCALL_PORT,
            ..
        } => Action::Hypercall,
        Exit::IoOut {
            port: BENCH_STUB_PORT,
            ..
        } => Action::BenchStubReturn,
        Exit::IoOut { port, data, len } => Action::PortOut { port, data, len },
        Exit::IoIn { port, .. } => Action::PortIn { port },
        Exit::MmioRead { addr, .. } => Action::MmioUnbacked { addr, write: false },
        Exit::MmioWrite { addr, .. } => Action::MmioUnbacked { addr, write: true },
        // Bits 11:0 of the value select the page index; there is one page.
        Exit::WrMsr {
            index: XEN_HYPERCALL_MSR,
            data,
        } if env.hypercall_page_ok(data) => Action::HypercallPage { gpa: data },
        Exit::WrMsr {
            index: crate::syscall_fix::MSR_LSTAR,
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
        Exit::Shutdown => Action::Stop(GuestExit::Reboot(format!("triple fault on vCPU {vcpu}"))),
        Exit::InternalError {
            suberror: INTERNAL_ERROR_EMULATION,
        } => Action::Fixup,
        Exit::InternalError { suberror } => Action::Stop(GuestExit::Crash(format!(
            "vCPU {vcpu}: KVM internal error, suberror {suberror}"
        ))),
        Exit::SystemEvent(SYSTEM_EVENT_SHUTDOWN) => Action::Stop(GuestExit::Poweroff),
        Exit::SystemEvent(SYSTEM_EVENT_RESET) => {
            Action::Stop(GuestExit::Reboot("system reset".into()))
        }
        Exit::SystemEvent(SYSTEM_EVENT_CRASH) => {
            Action::Stop(GuestExit::Crash("KVM reported a guest crash".into()))
        }
        Exit::SystemEvent(t) => {
            Action::Stop(GuestExit::Crash(format!("unknown KVM system event {t}")))
        }
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
    fn decide_hypercall_port_write_is_hypercall() {
        let e = Exit::IoOut {
            port: HYPERCALL_PORT,
            data: [17, 0, 0, 0],
            len: 4,
        };
        assert_eq!(d(e), Action::Hypercall);
    }

    #[test]
    fn decide_other_port_writes_go_to_devices() {
        let e = Exit::IoOut {
            port: 0xe9,
            data: [b'x', 0, 0, 0],
            len: 1,
        };
        assert!(matches!(
            d(e),
            Action::PortOut {
                port: 0xe9,
                len: 1,
                ..
            }
        ));
        assert_eq!(
            d(Exit::IoIn { port: 0x71, len: 1 }),
            Action::PortIn { port: 0x71 }
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
            Action::Stop(GuestExit::Reboot(why)) => assert!(why.contains("vCPU 1"), "{why}"),
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
