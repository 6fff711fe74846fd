//! A `vmcall`/`vmmcall` that this host's instruction emulator tried to
//! "fix" and could not.
//!
//! On `kvm_pvm` the guest kernel runs in KVM's instruction emulator, whose
//! hypercall handler rewrites the instruction at RIP into the host vendor's
//! form (`vmmcall` <-> `vmcall`) through the guest's own page tables before
//! it re-executes it. While the page is writable that write succeeds and
//! the vCPU spins in KVM_RUN on the instruction, which the VMM's stall
//! check finds (`Vcpu::stalled`) and then traps with a hardware breakpoint.
//! Once the kernel has made its text read-only, the write faults instead
//! and the guest receives a supervisor write #PF at RIP, with CR2 inside
//! the instruction. Linux oopses on it (`BUG: unable to handle page fault
//! for address: <xen_hypercall_amd>`).
//!
//! A running guest meets this rarely (its hypercall sites are trapped
//! during boot, while its text is still writable); a guest restored from an
//! image or received by migration meets it at its first hypercall, because
//! the breakpoints of the source are not part of the stream. The VMM
//! already traps the guest's #PF handler on such a host (see
//! [`super::syscall_fix`]); at that trap a frame that matches
//! [`is_unpatched_hypercall`] is dropped ([`unwind`]), the hypercall is
//! handled, and the site gets its breakpoint.

use iced_x86::Code;
use kvm_bindings::kvm_regs;

use super::syscall_fix::Frame;

const PF_PRESENT: u64 = 1 << 0;
const PF_WRITE: u64 = 1 << 1;
const PF_USER: u64 = 1 << 2;
const PF_FETCH: u64 = 1 << 4;
/// `vmcall` and `vmmcall` are both 3 bytes long.
const HYPERCALL_LEN: u64 = 3;

/// True if the #PF in `f` (with CR2 `cr2`) is a kernel-mode write to a
/// present page inside the first bytes of the faulting instruction: the
/// cheap part of [`is_unpatched_hypercall`], checked before the
/// instruction is fetched (every kernel #PF reaches the trap on this host).
pub fn writes_own_instruction(f: &Frame, cr2: u64) -> bool {
    let kernel = f.cs & 3 == 0;
    let protection_write =
        f.error & (PF_PRESENT | PF_WRITE | PF_USER | PF_FETCH) == PF_PRESENT | PF_WRITE;
    let inside = cr2.wrapping_sub(f.rip) < HYPERCALL_LEN;
    kernel && protection_write && inside
}

/// True if the #PF in `f` (with CR2 `cr2`) is the host's failed rewrite of
/// the hypercall instruction `insn` found at the frame's RIP: a kernel-mode
/// write to a present page, inside the instruction itself.
pub fn is_unpatched_hypercall(f: &Frame, cr2: u64, insn: Code) -> bool {
    writes_own_instruction(f, cr2) && matches!(insn, Code::Vmcall | Code::Vmmcall)
}

/// The state before the exception: RIP, RSP and RFLAGS from the frame. CS
/// and SS need no change (a kernel-mode #PF without IST stays on the same
/// privilege level). CR2 keeps the fault address, as after any #PF the
/// kernel handled.
pub fn unwind(regs: &mut kvm_regs, f: &Frame) {
    regs.rip = f.rip;
    regs.rsp = f.rsp;
    regs.rflags = f.rflags | 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(error: u64, rip: u64, cs: u64) -> Frame {
        Frame {
            error,
            rip,
            cs,
            rflags: 0x86,
            rsp: 0xffff_c900_000c_ca68,
            ss: 0x18,
        }
    }

    const RIP: u64 = 0xffff_ffff_81a0_3db0;

    #[test]
    fn hcall_patch_kernel_write_at_vmcall_is_recognised() {
        // The frame Linux reported: error 0x3, CR2 = RIP = xen_hypercall_amd.
        let f = frame(0x3, RIP, 0x10);
        assert!(is_unpatched_hypercall(&f, RIP, Code::Vmcall));
        assert!(is_unpatched_hypercall(&f, RIP + 2, Code::Vmmcall));
    }

    #[test]
    fn hcall_patch_other_faults_are_left_to_the_guest() {
        let f = frame(0x3, RIP, 0x10);
        // Outside the instruction, or another instruction at RIP.
        assert!(!is_unpatched_hypercall(&f, RIP + 3, Code::Vmcall));
        assert!(!is_unpatched_hypercall(&f, RIP - 1, Code::Vmcall));
        assert!(!is_unpatched_hypercall(&f, RIP, Code::Nopd));
        // A read, a not-present page, a user-mode or fetch fault.
        assert!(!is_unpatched_hypercall(
            &frame(0x1, RIP, 0x10),
            RIP,
            Code::Vmcall
        ));
        assert!(!is_unpatched_hypercall(
            &frame(0x2, RIP, 0x10),
            RIP,
            Code::Vmcall
        ));
        assert!(!is_unpatched_hypercall(
            &frame(0x7, RIP, 0x33),
            RIP,
            Code::Vmcall
        ));
        assert!(!is_unpatched_hypercall(
            &frame(0x13, RIP, 0x10),
            RIP,
            Code::Vmcall
        ));
        // A user-mode code segment.
        assert!(!is_unpatched_hypercall(
            &frame(0x3, RIP, 0x33),
            RIP,
            Code::Vmcall
        ));
    }

    #[test]
    fn hcall_patch_unwind_restores_the_interrupted_state() {
        let f = frame(0x3, RIP, 0x10);
        let mut regs = kvm_regs {
            rip: 0xffff_ffff_81c0_0be0,
            rsp: 0xffff_c900_000c_ca38,
            rflags: 0x2,
            rax: 0x20,
            ..Default::default()
        };
        unwind(&mut regs, &f);
        assert_eq!((regs.rip, regs.rsp, regs.rflags), (RIP, f.rsp, 0x86));
        assert_eq!(regs.rax, 0x20, "the hypercall's arguments are untouched");
    }
}
