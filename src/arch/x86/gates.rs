//! Gate checks this host skips for events it delivers itself, in long mode
//! (`xenkvm probe` rows "int3 at CPL 3, DPL-0 gate" and "icebp at CPL 3,
//! gate absent"; XTF `swint-emulation`):
//! - `int3` from CPL 3 through a gate with DPL < 3 arrives as #BP; the CPU
//!   raises #GP(3*8+2) at the `int3`;
//! - `int3` (from CPL 0) or `icebp` through a not-present gate arrives as
//!   #DF; the CPU raises #NP(vector*8+2, +1 EXT for `icebp`) at the
//!   instruction.
//!
//! - a non-canonical access through an explicit `%ss:` override whose base
//!   register is not RSP/RBP (in 64-bit mode the override is ignored, so it
//!   is not a stack access) arrives as #SS; the CPU raises #GP(0).
//!
//! Like the #UD trap ([`crate::arch::x86::cpl3`]), xenkvm watches for that with
//! instruction breakpoints, on the guest's #BP handler while gate 3 has
//! DPL < 3 and on its #DF handler while gate 1 or 3 is not present; both
//! conditions are read from the guest's IDT at every exit (two 16-byte reads
//! at a guest-physical address cached with the #UD trap), so ordinary
//! guests (Linux: present gates, DPL-3 `int3`) never hold those debug
//! registers. At the breakpoint the frame and the instruction before the
//! saved RIP say whether this is such an event; if so the right exception
//! is delivered ([`crate::arch::x86::cpl3`]'s delivery), otherwise the guest's
//! handler runs (its first instruction completed here).

use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::arch::x86::cpl3::{deliver_exception, UdOutcome, UserFrame};
use crate::arch::x86::{self, Access, Paging, PhysMem};

const EFER_LMA: u64 = 1 << 10;

/// Which handler traps a long-mode IDT calls for, from its gates 1 and 3.
pub fn traps_wanted(gate1: &[u8; 16], gate3: &[u8; 16]) -> (bool, bool) {
    let present = |g: &[u8; 16]| g[5] & 0x80 != 0;
    let dpl = |g: &[u8; 16]| (g[5] >> 5) & 3;
    let bp = present(gate3) && dpl(gate3) < 3;
    let df = !present(gate1) || !present(gate3);
    (bp, df)
}

/// The guest-physical address of a long-mode IDT when its gates 0..15 lie
/// in one page (they do for every page-aligned IDT).
pub fn idt_gpa(mem: &dyn PhysMem, s: &kvm_sregs) -> Option<u64> {
    if s.efer & EFER_LMA == 0 || (s.idt.base & 0xfff) + 16 * 16 > 4096 || s.idt.limit < 63 {
        return None;
    }
    x86::translate(mem, &Paging::from_sregs(s), s.idt.base, Access::READ).ok()
}

/// [`traps_wanted`] from the IDT at `gpa` (see [`idt_gpa`]).
pub fn traps_wanted_at(mem: &dyn PhysMem, gpa: u64) -> (bool, bool) {
    let mut g = [0u8; 48];
    if !mem.read(gpa.wrapping_add(16), &mut g) {
        return (false, false);
    }
    let mut g1 = [0u8; 16];
    let mut g3 = [0u8; 16];
    g1.copy_from_slice(&g[..16]);
    g3.copy_from_slice(&g[32..48]);
    traps_wanted(&g1, &g3)
}

/// The long-mode frame at RSP (after an error code when `error` is set).
fn frame(mem: &dyn PhysMem, regs: &kvm_regs, s: &kvm_sregs, error: bool) -> Option<UserFrame> {
    if s.efer & EFER_LMA == 0 {
        return None;
    }
    let mut b = [0u8; 48];
    let skip = if error { 8 } else { 0 };
    x86::read_linear(
        mem,
        &Paging::from_sregs(s),
        regs.rsp.wrapping_add(skip),
        &mut b[..40],
        Access::READ,
    )
    .ok()?;
    let q = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    Some(UserFrame {
        rip: q(0),
        cs: q(1) as u16,
        rflags: q(2),
        rsp: q(3),
        ss: q(4) as u16,
        vm86_segs: None,
    })
}

/// The byte at linear `la` as the interrupted code sees it.
fn byte_at(mem: &dyn PhysMem, s: &kvm_sregs, la: u64, user: bool) -> Option<u8> {
    let mut b = [0u8; 1];
    x86::read_linear(
        mem,
        &Paging::from_sregs(s),
        la,
        &mut b,
        Access { write: false, user },
    )
    .ok()
    .map(|()| b[0])
}

/// The start of an instruction whose opcode bytes are `opcode` (`cc`
/// `int3`, `f1` `icebp`, `cd nn` `int $nn`) and which ends at linear `end`
/// (a trap's saved RIP), with any prefixes before it (at most 14, legacy or
/// REX prefixes).
fn insn_start(
    mem: &dyn PhysMem,
    s: &kvm_sregs,
    end: u64,
    user: bool,
    opcode: &[u8],
) -> Option<u64> {
    let n = opcode.len() as u64;
    for (i, &b) in opcode.iter().enumerate() {
        if byte_at(mem, s, end.wrapping_sub(n).wrapping_add(i as u64), user)? != b {
            return None;
        }
    }
    let mut start = end.wrapping_sub(n);
    for _ in 0..14 {
        match byte_at(mem, s, start.wrapping_sub(1), user) {
            Some(0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3) => {
                start = start.wrapping_sub(1)
            }
            Some(0x40..=0x4f) if start == end.wrapping_sub(n) => start = start.wrapping_sub(1),
            _ => break,
        }
    }
    Some(start)
}

/// The gate attribute byte of long-mode vector `v`, if readable.
fn gate_attr(mem: &dyn PhysMem, s: &kvm_sregs, v: u8) -> Option<u8> {
    let off = u64::from(v) * 16;
    if off + 15 > u64::from(s.idt.limit) {
        return None;
    }
    byte_at(mem, s, s.idt.base.wrapping_add(off + 5), false)
}

/// At the #BP handler: a CPL-3 `int3` or `int $3` that went through a
/// gate with DPL < 3 becomes #GP(3*8+2) at the instruction.
pub fn handle_bp(mem: &dyn PhysMem, regs: &mut kvm_regs, s: &mut kvm_sregs) -> UdOutcome {
    let Some(mut f) = frame(mem, regs, s, false) else {
        return UdOutcome::NotOurs;
    };
    let dpl = gate_attr(mem, s, 3).map(|a| (a >> 5) & 3);
    if f.cs & 3 != 3 || dpl.is_none_or(|d| d >= 3) {
        return UdOutcome::NotOurs;
    }
    let at = insn_start(mem, s, f.rip, true, &[0xcc])
        .or_else(|| insn_start(mem, s, f.rip, true, &[0xcd, 3]));
    let Some(at) = at else {
        return UdOutcome::NotOurs;
    };
    f.rip = at;
    match deliver_exception(mem, regs, s, &f, x86::GP, 3 * 8 + 2) {
        Ok(v) => UdOutcome::Delivered { vector: v },
        Err(e) => UdOutcome::Refused(e),
    }
}

/// At the #DF handler: an `int3` or `icebp` whose gate is not present
/// becomes #NP at the instruction.
pub fn handle_df(mem: &dyn PhysMem, regs: &mut kvm_regs, s: &mut kvm_sregs) -> UdOutcome {
    let Some(mut f) = frame(mem, regs, s, true) else {
        return UdOutcome::NotOurs;
    };
    let user = f.cs & 3 == 3;
    let absent = |v: u8| gate_attr(mem, s, v).is_some_and(|a| a & 0x80 == 0);
    // The host saves RIP after the instruction (from user mode) or at it
    // (from the kernel, whose code its emulator runs).
    let find = |opcode: &[u8]| {
        insn_start(mem, s, f.rip, user, opcode).or_else(|| {
            let len = opcode.len() as u64;
            let at_insn = insn_start(mem, s, f.rip.wrapping_add(len), user, opcode);
            at_insn.filter(|&a| a == f.rip)
        })
    };
    // `int $n` ending at the saved RIP (or starting there), for the vector
    // in its immediate.
    let int_n = [f.rip.wrapping_sub(1), f.rip.wrapping_add(1)]
        .into_iter()
        .filter_map(|imm| byte_at(mem, s, imm, user))
        .find_map(|v| {
            (absent(v) && v != 3)
                .then(|| find(&[0xcd, v]).map(|at| (at, u32::from(v) * 8 + 2)))
                .flatten()
        });
    let found = if absent(3) {
        find(&[0xcc])
            .or_else(|| find(&[0xcd, 3]))
            .map(|at| (at, 3 * 8 + 2))
    } else {
        None
    }
    .or_else(|| {
        absent(1)
            .then(|| find(&[0xf1]).map(|at| (at, 8 + 3)))
            .flatten()
    })
    .or(int_n);
    let Some((at, code)) = found else {
        return UdOutcome::NotOurs;
    };
    f.rip = at;
    match deliver_exception(mem, regs, s, &f, x86::NP, code) {
        Ok(v) => UdOutcome::Delivered { vector: v },
        Err(e) => UdOutcome::Refused(e),
    }
}

/// At the #SS handler: a CPL-3 access through an explicit `%ss:` override
/// with a base other than RSP/RBP to a non-canonical address becomes #GP(0)
/// at the instruction.
pub fn handle_ss(mem: &dyn PhysMem, regs: &mut kvm_regs, s: &mut kvm_sregs) -> UdOutcome {
    use iced_x86::{Decoder, DecoderOptions, OpKind, Register};
    let Some(f) = frame(mem, regs, s, true) else {
        return UdOutcome::NotOurs;
    };
    if f.cs & 3 != 3 {
        return UdOutcome::NotOurs;
    }
    let mut code = [0u8; 15];
    let p = Paging::from_sregs(s);
    let user = Access {
        write: false,
        user: true,
    };
    let n = (15u64).min(4096 - (f.rip & 0xfff)) as usize;
    if x86::read_linear(mem, &p, f.rip, &mut code[..n], user).is_err() {
        return UdOutcome::NotOurs;
    }
    let insn = Decoder::with_ip(64, &code[..n], f.rip, DecoderOptions::NONE).decode();
    if insn.is_invalid() || insn.segment_prefix() != Register::SS {
        return UdOutcome::NotOurs;
    }
    // The user's registers are the vCPU's (exception delivery leaves them).
    let noncanonical_ss = (0..insn.op_count()).any(|i| {
        insn.op_kind(i) == OpKind::Memory
            && !matches!(
                insn.memory_base(),
                Register::RSP | Register::RBP | Register::ESP | Register::EBP
            )
            && insn
                .virtual_address(i, 0, |r, _, _| match r {
                    Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
                    Register::FS => Some(s.fs.base),
                    Register::GS => Some(s.gs.base),
                    r => x86::gpr_read(regs, r),
                })
                .is_some_and(|a| {
                    let top = a >> 47;
                    top != 0 && top != 0x1_ffff
                })
    });
    if !noncanonical_ss {
        return UdOutcome::NotOurs;
    }
    match deliver_exception(mem, regs, s, &f, x86::GP, 0) {
        Ok(v) => UdOutcome::Delivered { vector: v },
        Err(e) => UdOutcome::Refused(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(attr: u8) -> [u8; 16] {
        let mut g = [0u8; 16];
        g[5] = attr;
        g
    }

    #[test]
    fn traps_wanted_only_for_dpl0_int3_or_absent_gates() {
        assert_eq!(traps_wanted(&gate(0xee), &gate(0xee)), (false, false));
        assert_eq!(traps_wanted(&gate(0xee), &gate(0x8e)), (true, false));
        assert_eq!(traps_wanted(&gate(0x6e), &gate(0xee)), (false, true));
        assert_eq!(traps_wanted(&gate(0xee), &gate(0x6e)), (false, true));
    }
}
