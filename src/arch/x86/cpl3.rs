//! Software interrupts from CPL 3 on hosts whose KVM raises #UD for them.
//!
//! On `kvm_pvm` an `int n` executed at CPL 3 never reaches the guest's gate:
//! the guest gets #UD at the instruction, with no exit to the VMM (`xenkvm
//! probe`, rows "int n at CPL 3"). XTF returns from user mode with
//! `int $0x20`, and 32-bit Linux user space makes system calls with
//! `int $0x80`, so both break.
//!
//! xenkvm sees those #UDs the way it sees the broken `syscall`
//! ([`crate::arch::x86::syscall_fix`]): an instruction breakpoint on the guest's #UD
//! handler. At the breakpoint the vCPU is at the handler's first instruction,
//! at CPL 0, with the #UD frame on its stack. If the frame says CPL 3 and the
//! bytes at the saved RIP are a software interrupt (`int imm8`, `int3`,
//! `into` outside 64-bit mode, `icebp`), xenkvm delivers that interrupt
//! through the guest's IDT as the CPU would ([`deliver_user_swint`]):
//! - gate checks in the CPU's order: the vector inside the IDT limit, an
//!   interrupt or trap gate, gate DPL >= CPL for `int n`/`int3`/`into` (not
//!   for `icebp`), present; a failed check delivers #GP or #NP with error code
//!   `vector*8+2` (+1, EXT, for `icebp`) instead, from the user's RIP;
//! - the stack switch: in long mode to the gate's IST stack or RSP0 of the
//!   TSS (aligned to 16, SS = NULL), in 32-bit protected mode to SS0:ESP0 of
//!   the 32-bit TSS;
//! - the frame (SS, RSP, RFLAGS, CS, RIP after the instruction; 8-byte slots
//!   in long mode, 4-byte in 32-bit mode), RFLAGS with TF, NT, RF and VM
//!   cleared and IF cleared for an interrupt gate.
//!
//! Anything else (a real #UD, a #UD from CPL 0) runs the guest's handler:
//! its first instruction is completed here ([`step_over_entry`]) because
//! this host ignores RFLAGS.RF and resuming at the breakpoint would trap
//! again. Each user-mode software interrupt and each #UD costs one exit.
//!
//! Which #UD handler: the vCPU thread compares IDTR (free: KVM syncs the
//! system registers into `kvm_run` at every exit) with the one it last saw,
//! and re-reads gate 6 when IDTR changes and at most every 10 ms otherwise
//! (the steal-time tick), so a gate rewritten in place is picked up too.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::arch::x86::{self, Access, Paging, PhysMem};

const EFER_LMA: u64 = 1 << 10;
const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_VM: u64 = 1 << 17;
const RFLAGS_OF: u64 = 1 << 11;

/// The user state a #UD frame saved (no error code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserFrame {
    pub rip: u64,
    pub cs: u16,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u16,
    /// From virtual-8086 mode: ES, DS, FS, GS, which the CPU saves too.
    pub vm86_segs: Option<[u16; 4]>,
}

/// True if the vCPU runs in long mode (IA-32e).
fn long_mode(s: &kvm_sregs) -> bool {
    s.efer & EFER_LMA != 0
}

/// Reads the #UD frame at the handler's first instruction (SS:RSP points at
/// the saved RIP). None if it cannot be read or does not come from CPL 3.
pub fn user_frame(mem: &dyn PhysMem, regs: &kvm_regs, s: &kvm_sregs) -> Option<UserFrame> {
    let p = Paging::from_sregs(s);
    if long_mode(s) {
        let mut b = [0u8; 40];
        x86::read_linear(mem, &p, regs.rsp, &mut b, Access::READ).ok()?;
        let q = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let f = UserFrame {
            rip: q(0),
            cs: q(1) as u16,
            rflags: q(2),
            rsp: q(3),
            ss: q(4) as u16,
            vm86_segs: None,
        };
        (f.cs & 3 == 3).then_some(f)
    } else {
        let mut b = [0u8; 36];
        let lin = s.ss.base.wrapping_add(regs.rsp & 0xffff_ffff) & 0xffff_ffff;
        x86::read_linear(mem, &p, lin, &mut b, Access::READ).ok()?;
        let d = |i: usize| {
            u64::from(u32::from_le_bytes(
                b[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]),
            ))
        };
        let vm86 = d(2) & RFLAGS_VM != 0;
        let f = UserFrame {
            rip: d(0),
            cs: d(1) as u16,
            rflags: d(2),
            rsp: d(3),
            ss: d(4) as u16,
            vm86_segs: vm86.then(|| [d(5) as u16, d(6) as u16, d(7) as u16, d(8) as u16]),
        };
        (vm86 || f.cs & 3 == 3).then_some(f)
    }
}

/// A software interrupt instruction found at a user #UD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwInt {
    pub vector: u8,
    /// Instruction length: the frame's RIP is after it.
    pub len: u8,
    /// `icebp` (INT1): no gate DPL check, and a failed gate sets EXT.
    pub icebp: bool,
}

/// Decodes the instruction bytes at a user #UD: the software interrupt the
/// CPU should have delivered, if any. `into` with OF clear is a no-op
/// (`Some` with vector 4 and the caller checks OF), and is #UD in 64-bit mode.
pub fn decode_swint(bytes: &[u8], bits: u32, ip: u64) -> Option<SwInt> {
    if !matches!(bits, 16 | 32 | 64) {
        return None;
    }
    let i: Instruction = Decoder::with_ip(bits, bytes, ip, DecoderOptions::NONE).decode();
    if i.is_invalid() {
        return None;
    }
    let len = i.len() as u8;
    match i.code() {
        Code::Int_imm8 => Some(SwInt {
            vector: i.immediate8(),
            len,
            icebp: false,
        }),
        Code::Int3 => Some(SwInt {
            vector: 3,
            len,
            icebp: false,
        }),
        Code::Into if bits != 64 => Some(SwInt {
            vector: 4,
            len,
            icebp: false,
        }),
        Code::Int1 => Some(SwInt {
            vector: 1,
            len,
            icebp: true,
        }),
        _ => None,
    }
}

/// What happened at a #UD breakpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UdOutcome {
    /// A user software interrupt was delivered: load these registers.
    Delivered { vector: u8 },
    /// `into` with OF clear: the user resumes after it.
    Resumed,
    /// Not a user software interrupt: let the guest's #UD handler run.
    NotOurs,
    /// A user software interrupt xenkvm cannot deliver (the string says
    /// why); the guest's #UD handler runs.
    Refused(String),
}

/// The whole decision at a #UD breakpoint, over guest memory and the
/// registers at the handler's first instruction. On `Delivered`/`Resumed`
/// `regs`/`sregs` hold the new state.
pub fn handle_ud(mem: &dyn PhysMem, regs: &mut kvm_regs, s: &mut kvm_sregs) -> UdOutcome {
    let Some(f) = user_frame(mem, regs, s) else {
        return UdOutcome::NotOurs;
    };
    // The user's code size: a 64-bit code segment in long mode, else 32-bit
    // (XTF and Linux use flat 32-bit user segments; a 16-bit one is refused).
    let user_cs = if f.vm86_segs.is_some() {
        kvm_segment {
            base: u64::from(f.cs) << 4,
            limit: 0xffff,
            selector: f.cs,
            ..Default::default()
        }
    } else {
        match read_descriptor(mem, s, f.cs) {
            Ok(d) => d,
            Err(_) => return UdOutcome::NotOurs,
        }
    };
    let bits = if long_mode(s) && user_cs.l != 0 {
        64
    } else if user_cs.db != 0 {
        32
    } else {
        16
    };
    let lin = if bits == 64 {
        f.rip
    } else {
        user_cs.base.wrapping_add(f.rip) & 0xffff_ffff
    };
    let p = Paging::from_sregs(s);
    let mut buf = [0u8; 15];
    let user = Access {
        write: false,
        user: true,
    };
    let n = if x86::read_linear(mem, &p, lin, &mut buf, user).is_ok() {
        15
    } else {
        let first = ((4096 - (lin & 0xfff)) as usize).min(15);
        if x86::read_linear(mem, &p, lin, &mut buf[..first], user).is_err() {
            return UdOutcome::NotOurs;
        }
        first
    };
    let Some(sw) = decode_swint(&buf[..n], bits, f.rip) else {
        return UdOutcome::NotOurs;
    };
    let next = f.rip.wrapping_add(u64::from(sw.len));
    let next = match bits {
        64 => next,
        32 => next & 0xffff_ffff,
        _ => next & 0xffff,
    };
    if f.vm86_segs.is_some() && (f.rflags >> 12) & 3 != 3 && !sw.icebp {
        // IOPL < 3 in virtual-8086 mode: `int n` is #GP(0) (no VME here).
        return match deliver_exception(mem, regs, s, &f, 13, 0) {
            Ok(v) => UdOutcome::Delivered { vector: v },
            Err(e) => UdOutcome::Refused(e),
        };
    }
    if f.vm86_segs.is_some() && sw.vector == 4 && f.rflags & RFLAGS_OF == 0 {
        return UdOutcome::Refused("into without overflow in virtual-8086 mode".into());
    }
    if sw.vector == 4 && !sw.icebp && f.rflags & RFLAGS_OF == 0 {
        // `into` without overflow: nothing happens but the user's RIP moves.
        return match resume_user(mem, regs, s, &f, user_cs, next) {
            Ok(()) => UdOutcome::Resumed,
            Err(e) => UdOutcome::Refused(e),
        };
    }
    match deliver_user_swint(mem, regs, s, &f, sw, next) {
        Ok(v) => UdOutcome::Delivered { vector: v },
        Err(e) => UdOutcome::Refused(e),
    }
}

/// Returns to the user state of `f` with RIP = `rip` (the CPU never left it).
fn resume_user(
    mem: &dyn PhysMem,
    regs: &mut kvm_regs,
    s: &mut kvm_sregs,
    f: &UserFrame,
    cs: kvm_segment,
    rip: u64,
) -> Result<(), String> {
    let ss = read_descriptor(mem, s, f.ss).map_err(|e| format!("user SS: {e}"))?;
    regs.rip = rip;
    regs.rsp = f.rsp;
    regs.rflags = (f.rflags & !RFLAGS_RF) | 2;
    s.cs = cs;
    s.ss = ss;
    Ok(())
}

/// Delivers exception `vector` with error code `code` from the state `f`
/// (CPL 3, or CPL 0 in long mode) at its RIP (a fault).
pub fn deliver_exception(
    mem: &dyn PhysMem,
    regs: &mut kvm_regs,
    s: &mut kvm_sregs,
    f: &UserFrame,
    vector: u8,
    code: u32,
) -> Result<u8, String> {
    let ev = Event {
        vector,
        error_code: Some(code),
        rip: f.rip,
        check_dpl: false,
        ext: false,
    };
    deliver(mem, regs, s, f, ev)
        .map(|()| vector)
        .map_err(|e| format!("exception {vector} could not be delivered: {e:?}"))
}

/// An event to deliver through the IDT from CPL 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Event {
    vector: u8,
    error_code: Option<u32>,
    /// The RIP the frame saves (after the instruction for a trap).
    rip: u64,
    /// Software interrupt: the gate's DPL must be >= CPL.
    check_dpl: bool,
    /// External to the instruction (EXT in gate error codes): `icebp`.
    ext: bool,
}

/// Delivers software interrupt `sw` from the user state `f`, or the #GP/#NP
/// its gate checks raise. Returns the vector delivered.
pub fn deliver_user_swint(
    mem: &dyn PhysMem,
    regs: &mut kvm_regs,
    s: &mut kvm_sregs,
    f: &UserFrame,
    sw: SwInt,
    next_rip: u64,
) -> Result<u8, String> {
    let ev = Event {
        vector: sw.vector,
        error_code: None,
        rip: next_rip,
        check_dpl: !sw.icebp,
        ext: sw.icebp,
    };
    match deliver(mem, regs, s, f, ev) {
        Ok(()) => Ok(sw.vector),
        Err(Fault::Raise { vector, code }) => {
            // The fault is delivered as a hardware exception from the
            // instruction itself; its own gate must be good.
            let ev = Event {
                vector,
                error_code: Some(code),
                rip: f.rip,
                check_dpl: false,
                ext: true,
            };
            match deliver(mem, regs, s, f, ev) {
                Ok(()) => Ok(vector),
                Err(e) => Err(format!(
                    "vector {} faulted ({vector}, error {code:#x}) and that fault could not be delivered: {e:?}",
                    sw.vector
                )),
            }
        }
        Err(e) => Err(format!("vector {}: {e:?}", sw.vector)),
    }
}

/// Why a delivery did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fault {
    /// The checks raise exception `vector` (#GP, #NP from the gate, #TS from
    /// the TSS) with error code `code`.
    Raise { vector: u8, code: u32 },
    /// Something xenkvm does not emulate (task gates, a bad target CS or
    /// stack, an unwritable stack, ...).
    Unsupported(String),
}

fn unsupported<T>(why: impl Into<String>) -> Result<T, Fault> {
    Err(Fault::Unsupported(why.into()))
}

/// Reads the descriptor for `sel` from the GDT or LDT.
fn read_descriptor(mem: &dyn PhysMem, s: &kvm_sregs, sel: u16) -> Result<kvm_segment, String> {
    let (base, limit) = if sel & 4 != 0 {
        if s.ldt.unusable != 0 || s.ldt.present == 0 {
            return Err(format!("selector {sel:#x} in a missing LDT"));
        }
        (s.ldt.base, s.ldt.limit)
    } else {
        (s.gdt.base, u32::from(s.gdt.limit))
    };
    let off = u64::from(sel >> 3) * 8;
    if sel & 0xfffc == 0 || off + 7 > u64::from(limit) {
        return Err(format!("selector {sel:#x} outside its table"));
    }
    let mut d = [0u8; 8];
    x86::read_linear(
        mem,
        &Paging::from_sregs(s),
        base.wrapping_add(off),
        &mut d,
        Access::READ,
    )
    .map_err(|e| format!("descriptor {sel:#x} unreadable: {e:?}"))?;
    Ok(x86::descriptor_to_segment(sel, u64::from_le_bytes(d)))
}

/// A decoded IDT gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gate {
    offset: u64,
    selector: u16,
    kind: u8,
    dpl: u8,
    present: bool,
    ist: u8,
}

fn read_gate(mem: &dyn PhysMem, s: &kvm_sregs, vector: u8, ext: bool) -> Result<Gate, Fault> {
    let long = long_mode(s);
    let size: u64 = if long { 16 } else { 8 };
    let code = u32::from(vector) * 8 + 2 + u32::from(ext);
    let off = u64::from(vector) * size;
    if off + size - 1 > u64::from(s.idt.limit) {
        return Err(Fault::Raise { vector: 13, code });
    }
    let mut g = [0u8; 16];
    x86::read_linear(
        mem,
        &Paging::from_sregs(s),
        s.idt.base.wrapping_add(off),
        &mut g[..size as usize],
        Access::READ,
    )
    .map_err(|e| Fault::Unsupported(format!("IDT unreadable: {e:?}")))?;
    let lo = u64::from(u16::from_le_bytes([g[0], g[1]]));
    let mid = u64::from(u16::from_le_bytes([g[6], g[7]]));
    let hi = if long {
        u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]]))
    } else {
        0
    };
    Ok(Gate {
        offset: lo | (mid << 16) | (hi << 32),
        selector: u16::from_le_bytes([g[2], g[3]]),
        kind: g[5] & 0xf,
        dpl: (g[5] >> 5) & 3,
        present: g[5] & 0x80 != 0,
        ist: if long { g[4] & 7 } else { 0 },
    })
}

/// Delivers `ev` from the user state `f` through the IDT (protected mode
/// or long mode, privilege change to the handler's CS DPL).
fn deliver(
    mem: &dyn PhysMem,
    regs: &mut kvm_regs,
    s: &mut kvm_sregs,
    f: &UserFrame,
    ev: Event,
) -> Result<(), Fault> {
    let long = long_mode(s);
    let cpl = if f.vm86_segs.is_some() {
        3
    } else {
        (f.cs & 3) as u8
    };
    let gate = read_gate(mem, s, ev.vector, ev.ext)?;
    let code = u32::from(ev.vector) * 8 + 2 + u32::from(ev.ext);
    let gp = Fault::Raise { vector: 13, code };
    // Interrupt (0xe) or trap (0xf) gates; in 32-bit mode task gates (5)
    // and 16-bit gates (6, 7) are valid too (xenkvm does not emulate them).
    let valid = matches!((long, gate.kind), (_, 0xe | 0xf) | (false, 5..=7));
    if !valid {
        return Err(gp);
    }
    if ev.check_dpl && gate.dpl < cpl {
        return Err(gp);
    }
    if !gate.present {
        return Err(Fault::Raise { vector: 11, code });
    }
    let interrupt_gate = match gate.kind {
        0xe => true,
        0xf => false,
        5 => return unsupported("task gate"),
        _ => return unsupported("16-bit gate"),
    };
    let cs_sel = gate.selector;
    let mut cs = read_descriptor(mem, s, cs_sel).map_err(Fault::Unsupported)?;
    if cs.s == 0 || cs.type_ & 8 == 0 || cs.present == 0 || cs.dpl > cpl {
        return unsupported(format!(
            "gate {} has a bad code selector {cs_sel:#x}",
            ev.vector
        ));
    }
    if long && cs.l == 0 {
        return unsupported("long-mode gate to a non-64-bit code segment");
    }
    let conforming = cs.type_ & 4 != 0;
    let new_cpl = if conforming { cpl } else { cs.dpl };
    if f.vm86_segs.is_some() && new_cpl != 0 {
        // From virtual-8086 mode the handler must run at CPL 0 (#GP(sel)).
        return Err(Fault::Raise {
            vector: 13,
            code: u32::from(cs_sel & 0xfffc),
        });
    }
    let p = Paging::from_sregs(s);
    let tss = |off: u64, buf: &mut [u8]| {
        if off + buf.len() as u64 > u64::from(s.tr.limit) + 1 {
            // The stack pointer lies beyond the TSS limit: #TS(TSS selector).
            return Err(Fault::Raise {
                vector: 10,
                code: u32::from(s.tr.selector & 0xfffc) | u32::from(ev.ext),
            });
        }
        x86::read_linear(mem, &p, s.tr.base.wrapping_add(off), buf, Access::READ)
            .map_err(|e| Fault::Unsupported(format!("TSS unreadable: {e:?}")))
    };
    let mut flags = f.rflags & !RFLAGS_RF;
    let frame_flags = flags | 2;
    flags &= !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
    if interrupt_gate {
        flags &= !RFLAGS_IF;
    }
    let supervisor_write = Access {
        write: true,
        user: new_cpl == 3,
    };
    if long {
        let mut rsp = if gate.ist != 0 {
            let mut b = [0u8; 8];
            tss(0x24 + 8 * u64::from(gate.ist - 1), &mut b)?;
            u64::from_le_bytes(b)
        } else if new_cpl < cpl {
            let mut b = [0u8; 8];
            tss(4 + 8 * u64::from(new_cpl), &mut b)?;
            u64::from_le_bytes(b)
        } else {
            f.rsp
        };
        rsp &= !0xf;
        let mut words = vec![u64::from(f.ss), f.rsp, frame_flags, u64::from(f.cs), ev.rip];
        if let Some(e) = ev.error_code {
            words.push(u64::from(e));
        }
        let bytes: Vec<u8> = words.iter().rev().flat_map(|w| w.to_le_bytes()).collect();
        let top = rsp.wrapping_sub(bytes.len() as u64);
        x86::write_linear(mem, &p, top, &bytes, supervisor_write)
            .map_err(|e| Fault::Unsupported(format!("handler stack not writable: {e:?}")))?;
        let ss = if new_cpl < cpl {
            kvm_segment {
                selector: u16::from(new_cpl),
                unusable: 1,
                dpl: new_cpl,
                ..Default::default()
            }
        } else {
            read_descriptor(mem, s, f.ss).map_err(Fault::Unsupported)?
        };
        cs.selector = (cs_sel & !3) | u16::from(new_cpl);
        cs.type_ |= 1;
        regs.rip = gate.offset;
        regs.rsp = top;
        regs.rflags = flags | 2;
        s.cs = cs;
        s.ss = ss;
    } else {
        let (ss, esp) = if new_cpl < cpl {
            let mut b = [0u8; 8];
            tss(4 + 8 * u64::from(new_cpl), &mut b)?;
            let esp = u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            let ss_sel = u16::from_le_bytes([b[4], b[5]]);
            let ss = read_descriptor(mem, s, ss_sel).map_err(Fault::Unsupported)?;
            // A writable data segment at the new privilege.
            if ss.s == 0 || ss.type_ & 0xa != 2 || ss.present == 0 || ss.dpl != new_cpl {
                return unsupported(format!("bad ring-{new_cpl} stack segment {ss_sel:#x}"));
            }
            (ss, esp)
        } else {
            let ss = read_descriptor(mem, s, f.ss).map_err(Fault::Unsupported)?;
            (ss, f.rsp & 0xffff_ffff)
        };
        let mut words: Vec<u32> = Vec::with_capacity(10);
        if let Some([es, ds, fs, gs]) = f.vm86_segs {
            words.extend([gs, fs, ds, es].map(u32::from));
        }
        if new_cpl < cpl {
            words.push(u32::from(f.ss));
            words.push(f.rsp as u32);
        }
        words.push(frame_flags as u32);
        words.push(u32::from(f.cs));
        words.push(ev.rip as u32);
        if let Some(e) = ev.error_code {
            words.push(e);
        }
        let bytes: Vec<u8> = words.iter().rev().flat_map(|w| w.to_le_bytes()).collect();
        let top = esp.wrapping_sub(bytes.len() as u64) & 0xffff_ffff;
        let lin = ss.base.wrapping_add(top) & 0xffff_ffff;
        x86::write_linear(mem, &p, lin, &bytes, supervisor_write)
            .map_err(|e| Fault::Unsupported(format!("handler stack not writable: {e:?}")))?;
        cs.selector = (cs_sel & !3) | u16::from(new_cpl);
        cs.type_ |= 1;
        regs.rip = gate.offset & 0xffff_ffff;
        regs.rsp = top;
        regs.rflags = flags | 2;
        s.cs = cs;
        s.ss = ss;
        if f.vm86_segs.is_some() {
            // Leaving virtual-8086 mode loads null data segments.
            for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs] {
                *d = kvm_segment {
                    unusable: 1,
                    ..Default::default()
                };
            }
        }
    }
    Ok(())
}

/// Completes the #UD handler's first instruction when the guest's handler
/// must run (this host ignores RFLAGS.RF: resuming at the breakpoint would
/// trap again). Handles what handlers start with: `endbr`, `nop`, `clac`
/// (via [`crate::arch::x86::syscall_fix::step_over`]) and `push imm` (XTF pushes a
/// dummy error code). False for anything else.
pub fn step_over_entry(
    mem: &dyn PhysMem,
    insn: &Instruction,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
) -> bool {
    match insn.code() {
        Code::Pushq_imm8 | Code::Pushq_imm32 | Code::Pushd_imm8 | Code::Pushd_imm32 => {
            let long = x86::is_64bit(s);
            let v = insn.immediate(0);
            let p = Paging::from_sregs(s);
            let (size, sp) = if long {
                (8u64, regs.rsp.wrapping_sub(8))
            } else {
                (4, regs.rsp.wrapping_sub(4) & 0xffff_ffff)
            };
            let lin = if long {
                sp
            } else {
                s.ss.base.wrapping_add(sp) & 0xffff_ffff
            };
            let bytes = v.to_le_bytes();
            if x86::write_linear(mem, &p, lin, &bytes[..size as usize], Access::WRITE).is_err() {
                return false;
            }
            regs.rsp = if long {
                sp
            } else {
                (regs.rsp & !0xffff_ffff) | sp
            };
            let next = regs.rip.wrapping_add(insn.len() as u64);
            regs.rip = if long { next } else { next & 0xffff_ffff };
            true
        }
        // `movl $imm, disp(%rsp)` (XTF's error-code-carrying entries).
        Code::Mov_rm32_imm32 if insn.op0_kind() == iced_x86::OpKind::Memory => {
            let Some(ea) = insn.virtual_address(0, 0, |r, _, _| match r {
                iced_x86::Register::ES
                | iced_x86::Register::CS
                | iced_x86::Register::SS
                | iced_x86::Register::DS => Some(0),
                r => x86::gpr_read(regs, r),
            }) else {
                return false;
            };
            let long = x86::is_64bit(s);
            let lin = if long {
                ea
            } else {
                s.ss.base.wrapping_add(ea) & 0xffff_ffff
            };
            let v = (insn.immediate(1) as u32).to_le_bytes();
            if x86::write_linear(mem, &Paging::from_sregs(s), lin, &v, Access::WRITE).is_err() {
                return false;
            }
            let next = regs.rip.wrapping_add(insn.len() as u64);
            regs.rip = if long { next } else { next & 0xffff_ffff };
            true
        }
        Code::Endbr32 => {
            regs.rip = regs.rip.wrapping_add(insn.len() as u64);
            true
        }
        _ => {
            let ok = crate::arch::x86::syscall_fix::step_over(insn, regs);
            if ok && !x86::is_64bit(s) {
                regs.rip &= 0xffff_ffff;
            }
            ok
        }
    }
}

/// The #UD handler the trap is armed on, and the IDTR it was read from;
/// also the #BP and #DF handler traps of [`crate::arch::x86::gates`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UdTrap {
    pub idt_base: u64,
    pub idt_limit: u16,
    /// Linear address of the handler's first instruction; 0: none.
    pub handler: u64,
    /// Guest-physical address of a long-mode IDT's gates 0..15 (all in one
    /// page), for the per-exit look at gates 1 and 3.
    pub idt_gpa: Option<u64>,
    /// The #BP and #DF handlers while [`crate::arch::x86::gates`] traps them; 0: not.
    pub bp_handler: u64,
    pub df_handler: u64,
    /// The #SS handler while [`crate::arch::x86::gates::handle_ss`] traps it.
    pub ss_handler: u64,
}

/// The #UD handler's linear address from the guest's IDT (vector 6), if the
/// gate is a present interrupt or trap gate.
pub fn ud_handler(mem: &dyn PhysMem, s: &kvm_sregs) -> Option<u64> {
    handler(mem, s, 6)
}

/// The linear address of the handler of `vector`, if its gate is a present
/// interrupt or trap gate.
pub fn handler(mem: &dyn PhysMem, s: &kvm_sregs, vector: u8) -> Option<u64> {
    if s.cr0 & 1 == 0 {
        return None;
    }
    let g = read_gate(mem, s, vector, false).ok()?;
    if !g.present || !(g.kind == 0xe || g.kind == 0xf) {
        return None;
    }
    if long_mode(s) {
        return Some(g.offset);
    }
    let cs = read_descriptor(mem, s, g.selector).ok()?;
    Some(cs.base.wrapping_add(g.offset) & 0xffff_ffff)
}

#[cfg(test)]
mod tests;
