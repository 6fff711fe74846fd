//! Hardware task switches by far `jmp`/`call` through a 32-bit TSS
//! descriptor or a task gate, which this host's KVM stops on (emulation
//! failure). Emulated as the SDM's task-switch steps ("Task Switching",
//! Vol. 3A 8.3) do for protected mode:
//! - checks: the TSS or task-gate descriptor's DPL >= max(CPL, RPL) (#GP),
//!   present (#NP), the TSS available (not busy, #GP) and at least 0x67
//!   bytes long (#TS);
//! - the current state (EIP after the instruction, EFLAGS, the general
//!   registers and segment selectors) is saved in the current TSS; `jmp`
//!   clears the old TSS's busy bit, `call` writes the back link and sets NT;
//! - the new TSS's busy bit is set and its state loaded: CR3 (with paging),
//!   EIP, EFLAGS, the general registers, LDTR, the segment registers
//!   (virtual-8086 style when its EFLAGS.VM is set), TR; CR0.TS is set.
//!
//! 16-bit TSSs, task gates in the LDT and task switches in long mode (#GP
//! there) are refused as [`Fixup::Unhandled`] or #GP as the CPU does.

use iced_x86::{Code, Instruction};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::arch::x86::{self, Access, Fixup, Paging, PhysMem};

const EFER_LMA: u64 = 1 << 10;
const CR0_PG: u64 = 1 << 31;
const CR0_TS: u64 = 1 << 3;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_VM: u64 = 1 << 17;

fn fault(vector: u8, sel: u16) -> Fixup {
    Fixup::Exception {
        vector,
        error_code: Some(u32::from(sel & 0xfffc)),
    }
}

/// Reads GDT entry `sel` as raw bytes.
fn gdt_entry(mem: &dyn PhysMem, s: &kvm_sregs, sel: u16) -> Result<[u8; 8], Fixup> {
    let off = u64::from(sel >> 3) * 8;
    if sel & 4 != 0 || off + 7 > u64::from(s.gdt.limit) {
        return Err(fault(x86::GP, sel));
    }
    let mut d = [0u8; 8];
    x86::read_linear(
        mem,
        &Paging::from_sregs(s),
        s.gdt.base.wrapping_add(off),
        &mut d,
        Access::READ,
    )
    .map_err(Fixup::PageFault)?;
    Ok(d)
}

fn set_busy(mem: &dyn PhysMem, s: &kvm_sregs, sel: u16, busy: bool) -> Result<(), Fixup> {
    let mut d = gdt_entry(mem, s, sel)?;
    if busy {
        d[5] |= 2;
    } else {
        d[5] &= !2;
    }
    let off = u64::from(sel >> 3) * 8;
    x86::write_linear(
        mem,
        &Paging::from_sregs(s),
        s.gdt.base.wrapping_add(off) + 5,
        &d[5..6],
        Access::WRITE,
    )
    .map_err(Fixup::PageFault)
}

/// A virtual-8086 segment for selector `sel`.
fn vm86_segment(sel: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: u64::from(sel) << 4,
        limit: 0xffff,
        selector: sel,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        s: 1,
        ..Default::default()
    }
}

/// Loads a protected-mode segment register of the new task.
fn load_segment(mem: &dyn PhysMem, s: &kvm_sregs, sel: u16) -> Result<kvm_segment, Fixup> {
    if sel & 0xfffc == 0 {
        return Ok(kvm_segment {
            selector: sel,
            unusable: 1,
            ..Default::default()
        });
    }
    let (base, limit) = if sel & 4 != 0 {
        if s.ldt.unusable != 0 || s.ldt.present == 0 {
            return Err(fault(10, sel));
        }
        (s.ldt.base, s.ldt.limit)
    } else {
        (s.gdt.base, u32::from(s.gdt.limit))
    };
    let off = u64::from(sel >> 3) * 8;
    if off + 7 > u64::from(limit) {
        return Err(fault(10, sel));
    }
    let mut d = [0u8; 8];
    x86::read_linear(
        mem,
        &Paging::from_sregs(s),
        base.wrapping_add(off),
        &mut d,
        Access::READ,
    )
    .map_err(Fixup::PageFault)?;
    let seg = x86::descriptor_to_segment(sel, u64::from_le_bytes(d));
    if seg.s == 0 {
        return Err(fault(10, sel));
    }
    if seg.present == 0 {
        return Err(fault(x86::NP, sel));
    }
    Ok(seg)
}

/// The task switch for a far `jmp`/`call` at CS:RIP, or None if `insn` is
/// not one that names a TSS or task gate.
pub fn far_task_switch(
    mem: &dyn PhysMem,
    regs: &mut kvm_regs,
    s: &mut kvm_sregs,
    insn: &Instruction,
    next_rip: u64,
    vm86_ok: &dyn Fn() -> bool,
) -> Option<Fixup> {
    let call = match insn.code() {
        Code::Jmp_ptr1616 | Code::Jmp_ptr1632 => false,
        Code::Call_ptr1616 | Code::Call_ptr1632 => true,
        _ => return None,
    };
    let sel = insn.far_branch_selector();
    if s.cr0 & 1 == 0 || sel & 4 != 0 {
        return None;
    }
    let d = gdt_entry(mem, s, sel).ok()?;
    let (sys, kind) = (d[5] & 0x10 == 0, d[5] & 0xf);
    if !sys || !matches!(kind, 1 | 3 | 5 | 9 | 0xb) {
        return None;
    }
    Some(
        match switch(
            mem,
            regs,
            s,
            Transfer {
                sel,
                desc: d,
                call,
                next_rip,
            },
            vm86_ok,
        ) {
            Ok(()) => Fixup::Resume,
            Err(f) => f,
        },
    )
}

/// The far transfer that switches tasks.
#[derive(Clone, Copy)]
struct Transfer {
    /// The selector in the instruction and its GDT descriptor.
    sel: u16,
    desc: [u8; 8],
    call: bool,
    /// EIP after the instruction (saved in the old TSS).
    next_rip: u64,
}

fn switch(
    mem: &dyn PhysMem,
    regs: &mut kvm_regs,
    s: &mut kvm_sregs,
    t: Transfer,
    vm86_ok: &dyn Fn() -> bool,
) -> Result<(), Fixup> {
    let Transfer {
        sel,
        desc: d,
        call,
        next_rip,
    } = t;
    if s.efer & EFER_LMA != 0 {
        return Err(fault(x86::GP, sel));
    }
    let cpl = x86::cpl(s);
    let dpl = (d[5] >> 5) & 3;
    if dpl < cpl.max((sel & 3) as u8) {
        return Err(fault(x86::GP, sel));
    }
    if d[5] & 0x80 == 0 {
        return Err(fault(x86::NP, sel));
    }
    let (tss_sel, td) = if d[5] & 0xf == 5 {
        let t = u16::from_le_bytes([d[2], d[3]]);
        let td = gdt_entry(mem, s, t)?;
        if td[5] & 0x80 == 0 {
            return Err(fault(x86::NP, t));
        }
        (t, td)
    } else {
        (sel, d)
    };
    let tss = x86::descriptor_to_segment(tss_sel, u64::from_le_bytes(td));
    match tss.type_ {
        9 => {}
        1 => return Err(Fixup::Unhandled("a task switch to a 16-bit TSS".into())),
        _ => return Err(fault(x86::GP, tss_sel)),
    }
    if tss.limit < 0x67 {
        return Err(fault(10, tss_sel));
    }
    if s.tr.type_ != 0xb {
        return Err(Fixup::Unhandled(
            "a task switch from a task without a busy 32-bit TSS".into(),
        ));
    }
    let p = Paging::from_sregs(s);
    // Save the outgoing task.
    let mut old = [0u8; 0x40];
    let mut put =
        |off: usize, v: u32| old[off - 0x20..off - 0x20 + 4].copy_from_slice(&v.to_le_bytes());
    put(0x20, next_rip as u32);
    put(0x24, regs.rflags as u32);
    for (i, v) in [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi,
    ]
    .iter()
    .enumerate()
    {
        put(0x28 + 4 * i, *v as u32);
    }
    for (i, seg) in [&s.es, &s.cs, &s.ss, &s.ds, &s.fs, &s.gs]
        .iter()
        .enumerate()
    {
        put(0x48 + 4 * i, u32::from(seg.selector));
    }
    x86::write_linear(mem, &p, s.tr.base.wrapping_add(0x20), &old, Access::WRITE)
        .map_err(Fixup::PageFault)?;
    let mut new = [0u8; 0x68];
    x86::read_linear(mem, &p, tss.base, &mut new, Access::READ).map_err(Fixup::PageFault)?;
    let get = |off: usize| u32::from_le_bytes([new[off], new[off + 1], new[off + 2], new[off + 3]]);
    let sel16 = |off: usize| u16::from_le_bytes([new[off], new[off + 1]]);
    let mut eflags = u64::from(get(0x24)) | 2;
    if eflags & RFLAGS_VM != 0 && !vm86_ok() {
        return Err(Fixup::Unhandled(format!(
            "a task switch to selector {sel:#x}: the guest needs virtual-8086 mode, which this host cannot run (xenkvm probe)"
        )));
    }
    if call {
        x86::write_linear(
            mem,
            &p,
            tss.base,
            &s.tr.selector.to_le_bytes(),
            Access::WRITE,
        )
        .map_err(Fixup::PageFault)?;
        eflags |= RFLAGS_NT;
    } else {
        set_busy(mem, s, s.tr.selector, false)?;
    }
    set_busy(mem, s, tss_sel, true)?;
    // From here the new task's state is loaded.
    if s.cr0 & CR0_PG != 0 {
        s.cr3 = u64::from(get(0x1c));
    }
    s.tr = kvm_segment {
        type_: 0xb,
        selector: tss_sel,
        ..tss
    };
    s.cr0 |= CR0_TS;
    let ldt_sel = sel16(0x60);
    s.ldt = if ldt_sel & 0xfffc == 0 {
        kvm_segment {
            selector: ldt_sel,
            unusable: 1,
            ..Default::default()
        }
    } else {
        let ld = gdt_entry(mem, s, ldt_sel).map_err(|_| fault(10, ldt_sel))?;
        let l = x86::descriptor_to_segment(ldt_sel, u64::from_le_bytes(ld));
        if l.s != 0 || l.type_ != 2 {
            return Err(fault(10, ldt_sel));
        }
        l
    };
    regs.rip = u64::from(get(0x20));
    regs.rflags = eflags;
    let gpr = [
        &mut regs.rax,
        &mut regs.rcx,
        &mut regs.rdx,
        &mut regs.rbx,
        &mut regs.rsp,
        &mut regs.rbp,
        &mut regs.rsi,
        &mut regs.rdi,
    ];
    for (i, r) in gpr.into_iter().enumerate() {
        *r = u64::from(get(0x28 + 4 * i));
    }
    let sels = [0x48, 0x4c, 0x50, 0x54, 0x58, 0x5c].map(sel16);
    if eflags & RFLAGS_VM != 0 {
        s.es = vm86_segment(sels[0], false);
        s.cs = vm86_segment(sels[1], true);
        s.ss = vm86_segment(sels[2], false);
        s.ds = vm86_segment(sels[3], false);
        s.fs = vm86_segment(sels[4], false);
        s.gs = vm86_segment(sels[5], false);
    } else {
        let cs = load_segment(mem, s, sels[1])?;
        if cs.unusable != 0 || cs.type_ & 8 == 0 {
            return Err(fault(10, sels[1]));
        }
        let ss = load_segment(mem, s, sels[2])?;
        let es = load_segment(mem, s, sels[0])?;
        let ds = load_segment(mem, s, sels[3])?;
        let fs = load_segment(mem, s, sels[4])?;
        let gs = load_segment(mem, s, sels[5])?;
        s.cs = cs;
        s.ss = ss;
        s.es = es;
        s.ds = ds;
        s.fs = fs;
        s.gs = gs;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
