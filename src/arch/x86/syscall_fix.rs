//! Fix-up for hosts whose KVM runs a guest's `syscall` from CPL 3 without
//! the switch to CPL 0: RIP goes to LSTAR, RCX/R11/RFLAGS are set, but CS
//! and SS stay the user's. `kvm_pvm` does this with an unmodified guest
//! kernel (`xenkvm probe` tests it). The kernel entry then faults on its
//! own supervisor page: the guest gets a #PF with CS = user, RIP = CR2 =
//! LSTAR, and Linux kills init at its first system call.
//!
//! xenkvm catches that #PF where the guest's IDT sends it: an instruction
//! breakpoint (`KVM_SET_GUEST_DEBUG`) on the #PF handler, armed when the
//! guest writes LSTAR (the MSR filter sends that write to the VMM). At the
//! breakpoint:
//! - if the exception frame is the broken `syscall`, the frame is dropped
//!   and the state a real `syscall` leaves is set: RIP = LSTAR, RSP = the
//!   user's, RFLAGS from the frame (already masked with SFMASK), CS/SS
//!   from STAR[47:32], CPL 0;
//! - otherwise it is a real page fault: the handler's first instruction
//!   (`endbr64`, a `nop` or `clac`) is stepped over here, because this host
//!   ignores RFLAGS.RF and resuming at the breakpoint would trap again.
//!
//! Each user system call costs one exit to the VMM on such a host.

use iced_x86::Code;
use kvm_bindings::{kvm_regs, kvm_sregs};

pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_AC: u64 = 1 << 18;

/// What the fix-up needs to know about one vCPU's syscall setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallSetup {
    pub lstar: u64,
    pub star: u64,
    /// The #PF handler's linear address (IDT vector 14).
    pub pf_handler: u64,
}

/// The handler address of a 16-byte long-mode IDT gate, if it is a present
/// interrupt or trap gate.
pub fn gate_target(gate: &[u8; 16]) -> Option<u64> {
    let kind = gate[5] & 0x0f;
    let present = gate[5] & 0x80 != 0;
    if !present || !(kind == 0xe || kind == 0xf) {
        return None;
    }
    let lo = u64::from(u16::from_le_bytes([gate[0], gate[1]]));
    let mid = u64::from(u16::from_le_bytes([gate[6], gate[7]]));
    let hi = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
    Some(lo | (mid << 16) | (hi << 32))
}

/// A long-mode exception frame with an error code, as the handler sees it
/// at its first instruction (RSP points at the error code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl Frame {
    pub fn parse(b: &[u8; 48]) -> Frame {
        let q = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Frame {
            error: q(0),
            rip: q(1),
            cs: q(2),
            rflags: q(3),
            rsp: q(4),
            ss: q(5),
        }
    }

    /// True if this #PF is a `syscall` that reached LSTAR still at CPL 3.
    pub fn is_broken_syscall(&self, setup: &SyscallSetup, cr2: u64) -> bool {
        self.cs & 3 == 3 && self.rip == setup.lstar && cr2 == setup.lstar
    }
}

/// The state a real `syscall` would have left, from the broken one's frame.
pub fn complete_syscall(regs: &mut kvm_regs, sregs: &mut kvm_sregs, f: &Frame, star: u64) {
    let cs = ((star >> 32) & 0xfffc) as u16;
    regs.rip = f.rip;
    regs.rsp = f.rsp;
    regs.rflags = (f.rflags & !RFLAGS_RF) | 2;
    sregs.cs = crate::arch::x86::flat_segment(cs, 0xb, 0, true);
    sregs.ss = crate::arch::x86::flat_segment(cs.wrapping_add(8), 0x3, 0, true);
}

/// Whether the completed syscall's code segment differs from the one the
/// #PF delivery already loaded (`cur`): only then must the VMM write the
/// segment registers. At the #PF handler the vCPU already runs at CPL 0 on
/// the kernel's CS, so the fix-up normally writes the general registers
/// only and leaves the host's segment, control-register and
/// pending-interrupt state untouched (`KVM_SET_SREGS` re-queues the
/// interrupt in `interrupt_bitmap`, reloads CR0/CR4/EFER and, on
/// `kvm_pvm`, may switch the vCPU's execution mode). SS then keeps the
/// NULL selector the delivery loaded instead of STAR's kernel SS: both
/// are valid at CPL 0 in 64-bit mode, and the kernel's exit loads the
/// user's SS either way (`sysret` from STAR, `iret` from its frame).
pub fn segments_changed(cur: &kvm_sregs, new: &kvm_sregs) -> bool {
    let key = |s: &kvm_bindings::kvm_segment| (s.selector, s.dpl, s.l, s.db, s.present);
    key(&cur.cs) != key(&new.cs)
}

/// Steps over the #PF handler's first instruction when it has no effect
/// this VMM cannot reproduce; false if it is anything else.
pub fn step_over(insn: &iced_x86::Instruction, regs: &mut kvm_regs) -> bool {
    match insn.code() {
        Code::Endbr64
        | Code::Nopd
        | Code::Nopw
        | Code::Nopq
        | Code::Nop_rm16
        | Code::Nop_rm32
        | Code::Nop_rm64 => {}
        Code::Clac => regs.rflags &= !RFLAGS_AC,
        _ => return false,
    }
    regs.rip = regs.rip.wrapping_add(insn.len() as u64);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(target: u64, type_attr: u8) -> [u8; 16] {
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&(target as u16).to_le_bytes());
        g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        g[5] = type_attr;
        g[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
        g
    }

    #[test]
    fn gate_target_present_interrupt_gate_decoded_else_none() {
        assert_eq!(
            gate_target(&gate(0xffff_ffff_81c0_1230, 0x8e)),
            Some(0xffff_ffff_81c0_1230)
        );
        assert_eq!(gate_target(&gate(0x1234, 0x8f)), Some(0x1234));
        assert_eq!(gate_target(&gate(0x1234, 0x0e)), None, "not present");
        assert_eq!(gate_target(&gate(0x1234, 0x85)), None, "task gate");
    }

    fn frame(rip: u64, cs: u64) -> Frame {
        let mut b = [0u8; 48];
        for (i, v) in [5, rip, cs, 0x10246, 0x7ffe_0000, 0x2b].iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        Frame::parse(&b)
    }

    const SETUP: SyscallSetup = SyscallSetup {
        lstar: 0xffff_ffff_81c0_0080,
        star: 0x0023_0010_0000_0000,
        pf_handler: 0xffff_ffff_81c0_1230,
    };

    #[test]
    fn frame_user_fault_at_lstar_is_broken_syscall_others_are_not() {
        let f = frame(SETUP.lstar, 0x33);
        assert_eq!(f.error, 5);
        assert_eq!(f.rsp, 0x7ffe_0000);
        assert!(f.is_broken_syscall(&SETUP, SETUP.lstar));
        assert!(!f.is_broken_syscall(&SETUP, 0x1000), "fault elsewhere");
        assert!(!frame(SETUP.lstar, 0x10).is_broken_syscall(&SETUP, SETUP.lstar));
        assert!(!frame(0x40_1000, 0x33).is_broken_syscall(&SETUP, SETUP.lstar));
    }

    #[test]
    fn complete_syscall_sets_kernel_segments_from_star_and_user_rsp() {
        let f = frame(SETUP.lstar, 0x33);
        let (mut r, mut s) = (kvm_regs::default(), kvm_sregs::default());
        r.rsp = 0xffff_c900_0000_3fd8;
        complete_syscall(&mut r, &mut s, &f, SETUP.star);
        assert_eq!(r.rip, SETUP.lstar);
        assert_eq!(r.rsp, 0x7ffe_0000);
        assert_eq!(r.rflags & RFLAGS_RF, 0);
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (0x10, 0, 1));
        assert_eq!((s.ss.selector, s.ss.dpl), (0x18, 0));
    }

    #[test]
    fn segments_changed_only_when_cs_differs_from_the_delivered_one() {
        let f = frame(SETUP.lstar, 0x33);
        let (mut r, mut at_handler) = (kvm_regs::default(), kvm_sregs::default());
        at_handler.cs = crate::arch::x86::flat_segment(0x10, 0xb, 0, true);
        let mut done = at_handler;
        complete_syscall(&mut r, &mut done, &f, SETUP.star);
        assert!(
            !segments_changed(&at_handler, &done),
            "SS alone is left as delivered"
        );
        at_handler.cs = crate::arch::x86::flat_segment(0x08, 0xb, 0, true);
        assert!(segments_changed(&at_handler, &done), "another kernel CS");
        at_handler.cs = crate::arch::x86::flat_segment(0x33, 0xb, 3, true);
        assert!(segments_changed(&at_handler, &done), "still at CPL 3");
    }

    fn decode(bytes: &[u8]) -> iced_x86::Instruction {
        iced_x86::Decoder::with_ip(64, bytes, 0x1000, iced_x86::DecoderOptions::NONE).decode()
    }

    #[test]
    fn step_over_endbr_nop_clac_only() {
        let mut r = kvm_regs {
            rip: 0x1000,
            rflags: RFLAGS_AC | 2,
            ..Default::default()
        };
        assert!(step_over(&decode(&[0xf3, 0x0f, 0x1e, 0xfa]), &mut r));
        assert_eq!(r.rip, 0x1004);
        assert!(step_over(&decode(&[0x0f, 0x01, 0xca]), &mut r));
        assert_eq!((r.rip, r.rflags & RFLAGS_AC), (0x1007, 0));
        assert!(step_over(&decode(&[0x0f, 0x1f, 0x44, 0x00, 0x00]), &mut r));
        assert_eq!(r.rip, 0x100c);
        assert!(!step_over(&decode(&[0x48, 0x89, 0xe5]), &mut r), "mov");
        assert_eq!(r.rip, 0x100c);
    }
}
