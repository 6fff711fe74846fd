//! x86 helpers the VMM needs in userspace, all pure functions over a
//! [`PhysMem`] and KVM's register structs, unit-tested without KVM:
//! - guest-virtual to guest-physical translation (a page-table walk for
//!   every paging mode), used for hypercall arguments;
//! - fix-ups for instructions this host's KVM cannot run (it stops with an
//!   emulation failure, RIP at the instruction): `int3` and `int n` are
//!   injected the way the CPU would deliver them (gate checks first), a
//!   32-bit `iret` is emulated (stack pops and descriptor loads), `rdtscp`
//!   and `xgetbv` are emulated. Instructions are decoded with iced-x86.

pub mod avx;
pub mod cpl3;
pub mod cpuid;
pub mod gates;
pub mod hcall_patch;
pub mod invpcid;
pub mod more;
pub mod sse_fp;
pub mod syscall_fix;
pub mod task;
#[cfg(test)]
pub(crate) mod testenv;
pub mod traps;
pub mod x87;
pub mod xsave;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

const CR0_PE: u64 = 1;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

const RFLAGS_AC: u64 = 1 << 18;

const PTE_P: u64 = 1;
const PTE_W: u64 = 1 << 1;
const PTE_U: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Exception vectors.
pub const DE: u8 = 0;
pub const BP: u8 = 3;
pub const UD: u8 = 6;
pub const NM: u8 = 7;
pub const MF: u8 = 16;
pub const NP: u8 = 11;
pub const SS: u8 = 12;
pub const GP: u8 = 13;
pub const PF: u8 = 14;

/// Guest-physical memory as the walker and emulator see it.
pub trait PhysMem {
    /// Reads `buf.len()` bytes at `gpa`; false if any byte is not RAM.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool;
    /// Writes `data` at `gpa`; false if any byte is not RAM.
    fn write(&self, gpa: u64, data: &[u8]) -> bool;
}

impl<B: vm_memory::bitmap::Bitmap + 'static> PhysMem for vm_memory::GuestMemoryMmap<B> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        use vm_memory::Bytes;
        self.read_slice(buf, vm_memory::GuestAddress(gpa)).is_ok()
    }
    fn write(&self, gpa: u64, data: &[u8]) -> bool {
        use vm_memory::Bytes;
        self.write_slice(data, vm_memory::GuestAddress(gpa)).is_ok()
    }
}

/// The control registers that define translation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl Paging {
    pub fn from_sregs(s: &kvm_sregs) -> Self {
        Paging {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        }
    }
}

/// Kind of access, for the permission checks of the walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub write: bool,
    pub user: bool,
}

impl Access {
    pub const READ: Access = Access {
        write: false,
        user: false,
    };
    pub const WRITE: Access = Access {
        write: true,
        user: false,
    };
}

/// A failed translation: what a #PF would report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    pub linear: u64,
    pub error_code: u32,
}

fn read_u64(mem: &dyn PhysMem, gpa: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    mem.read(gpa, &mut b).then(|| u64::from_le_bytes(b))
}

fn read_u32(mem: &dyn PhysMem, gpa: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    mem.read(gpa, &mut b).then(|| u32::from_le_bytes(b))
}

/// Translates a linear address. Bounded: at most five table reads.
pub fn translate(
    mem: &dyn PhysMem,
    p: &Paging,
    linear: u64,
    acc: Access,
) -> Result<u64, PageFault> {
    if p.cr0 & CR0_PG == 0 {
        // Paging off: linear == physical (32-bit in protected mode).
        return Ok(if p.efer & EFER_LMA != 0 {
            linear
        } else {
            linear & 0xffff_ffff
        });
    }
    let fault = |present: bool| PageFault {
        linear,
        error_code: (present as u32) | ((acc.write as u32) << 1) | ((acc.user as u32) << 2),
    };
    let check = |e: u64, w_ok: &mut bool, u_ok: &mut bool| {
        *w_ok &= e & PTE_W != 0;
        *u_ok &= e & PTE_U != 0;
    };
    let (mut w_ok, mut u_ok) = (true, true);
    let finish = |gpa: u64, w_ok: bool, u_ok: bool| {
        let wp = p.cr0 & CR0_WP != 0;
        if acc.user && !u_ok || acc.write && !w_ok && (acc.user || wp) {
            Err(fault(true))
        } else {
            Ok(gpa)
        }
    };
    if p.efer & EFER_LMA != 0 || p.cr4 & CR4_PAE != 0 {
        let long = p.efer & EFER_LMA != 0;
        let (levels, mut table) = if long {
            (if p.cr4 & CR4_LA57 != 0 { 5 } else { 4 }, p.cr3 & ADDR_MASK)
        } else {
            // PAE: the 4 PDPTEs at CR3 (32-byte aligned).
            let pdpte = read_u64(mem, (p.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8)
                .ok_or(fault(false))?;
            if pdpte & PTE_P == 0 {
                return Err(fault(false));
            }
            (2, pdpte & ADDR_MASK)
        };
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let idx = (linear >> shift) & 0x1ff;
            let e = read_u64(mem, table + idx * 8).ok_or(fault(false))?;
            if e & PTE_P == 0 {
                return Err(fault(false));
            }
            check(e, &mut w_ok, &mut u_ok);
            if level == 1 || (e & PTE_PS != 0 && level <= 3) {
                let page_mask = (1u64 << shift) - 1;
                let base = e & ADDR_MASK & !page_mask;
                return finish(base | (linear & page_mask), w_ok, u_ok);
            }
            table = e & ADDR_MASK;
        }
        Err(fault(false))
    } else {
        // Legacy 2-level 32-bit paging.
        let l = linear & 0xffff_ffff;
        let pde = read_u32(mem, (p.cr3 & 0xffff_f000) + (l >> 22) * 4).ok_or(fault(false))? as u64;
        if pde & PTE_P == 0 {
            return Err(fault(false));
        }
        check(pde, &mut w_ok, &mut u_ok);
        if pde & PTE_PS != 0 && p.cr4 & CR4_PSE != 0 {
            let base = (pde & 0xffc0_0000) | ((pde >> 13) & 0xff) << 32;
            return finish(base | (l & 0x3f_ffff), w_ok, u_ok);
        }
        let pte = read_u32(mem, (pde & 0xffff_f000) + ((l >> 12) & 0x3ff) * 4)
            .ok_or(fault(false))? as u64;
        if pte & PTE_P == 0 {
            return Err(fault(false));
        }
        check(pte, &mut w_ok, &mut u_ok);
        finish((pte & 0xffff_f000) | (l & 0xfff), w_ok, u_ok)
    }
}

/// A flat 4 GiB segment: code (`type_` >= 8, 64-bit if `long`) or data,
/// at privilege `dpl`.
pub fn flat_segment(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_bindings::kvm_segment {
    kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long || type_ < 8),
        s: 1,
        l: u8::from(long && type_ >= 8),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Reads `buf.len()` bytes at a linear address, page by page.
pub fn read_linear(
    mem: &dyn PhysMem,
    p: &Paging,
    linear: u64,
    buf: &mut [u8],
    acc: Access,
) -> Result<(), PageFault> {
    let mut done = 0usize;
    while done < buf.len() {
        let la = linear.wrapping_add(done as u64);
        let gpa = translate(mem, p, la, acc)?;
        let n = ((4096 - (la & 0xfff)) as usize).min(buf.len() - done);
        if !mem.read(gpa, &mut buf[done..done + n]) {
            return Err(PageFault {
                linear: la,
                error_code: 1,
            });
        }
        done += n;
    }
    Ok(())
}

/// Writes `data` at a linear address, page by page (each page translated
/// for write before any byte is written to it).
pub fn write_linear(
    mem: &dyn PhysMem,
    p: &Paging,
    linear: u64,
    data: &[u8],
    acc: Access,
) -> Result<(), PageFault> {
    let mut done = 0usize;
    while done < data.len() {
        let la = linear.wrapping_add(done as u64);
        let gpa = translate(mem, p, la, acc)?;
        let n = ((4096 - (la & 0xfff)) as usize).min(data.len() - done);
        if !mem.write(gpa, &data[done..done + n]) {
            return Err(PageFault {
                linear: la,
                error_code: 3,
            });
        }
        done += n;
    }
    Ok(())
}

/// Completes a hypercall-page stub after its `out` exit: RAX = `result`
/// (sign-extended in 64-bit mode), then the stub's near `ret` (RIP = the
/// word at SS:RSP, RSP += word size). If the stack cannot be read the `ret`
/// is left for the guest to execute (it will fault there, as the CPU would).
pub fn complete_stub_return(mem: &dyn PhysMem, regs: &mut kvm_regs, s: &kvm_sregs, result: i64) {
    let p = Paging::from_sregs(s);
    if is_64bit(s) {
        regs.rax = result as u64;
        let mut b = [0u8; 8];
        if read_linear(mem, &p, regs.rsp, &mut b, Access::READ).is_ok() {
            regs.rip = u64::from_le_bytes(b);
            regs.rsp = regs.rsp.wrapping_add(8);
        }
    } else {
        regs.rax = u64::from(result as i32 as u32);
        let stack32 = s.ss.db != 0;
        let sp = if stack32 {
            regs.rsp & 0xffff_ffff
        } else {
            regs.rsp & 0xffff
        };
        let mut b = [0u8; 4];
        if read_linear(
            mem,
            &p,
            s.ss.base.wrapping_add(sp) & 0xffff_ffff,
            &mut b,
            Access::READ,
        )
        .is_ok()
        {
            regs.rip = u64::from(u32::from_le_bytes(b));
            let nsp = sp.wrapping_add(4);
            regs.rsp = if stack32 {
                nsp & 0xffff_ffff
            } else {
                (regs.rsp & !0xffff) | (nsp & 0xffff)
            };
        }
    }
}

/// The linear address of the instruction at CS:RIP.
pub fn linear_rip(regs: &kvm_regs, s: &kvm_sregs) -> u64 {
    if is_64bit(s) {
        regs.rip
    } else {
        s.cs.base.wrapping_add(regs.rip) & 0xffff_ffff
    }
}

/// Privilege level of the vCPU.
pub fn cpl(s: &kvm_sregs) -> u8 {
    if s.cr0 & CR0_PE == 0 {
        0
    } else {
        s.ss.dpl
    }
}

/// True in 64-bit mode (long mode and a 64-bit code segment).
pub fn is_64bit(s: &kvm_sregs) -> bool {
    s.efer & EFER_LMA != 0 && s.cs.l != 0
}

/// Code size in bits of the current code segment.
pub fn code_bits(s: &kvm_sregs) -> u32 {
    if s.cr0 & CR0_PE == 0 {
        16
    } else if is_64bit(s) {
        64
    } else if s.cs.db != 0 {
        32
    } else {
        16
    }
}

/// What the VMM must do after a fix-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fixup {
    /// Registers were updated; resume.
    Resume,
    /// Resume after injecting an exception (RIP already points where the
    /// CPU would have left it).
    Exception { vector: u8, error_code: Option<u32> },
    /// Resume after injecting software interrupt `vector` (RIP advanced
    /// past the instruction).
    SoftInt { vector: u8 },
    /// A #PF while emulating: set CR2 and inject.
    PageFault(PageFault),
    /// Not something we can fix up.
    Unhandled(String),
}

/// Host services the emulator may need.
pub trait EmuEnv {
    fn rdtsc(&self) -> u64;
    fn tsc_aux(&self) -> u64;
    fn xcr0(&self) -> u64;
    /// The x87 status word (FSW).
    fn fpu_status(&self) -> u16;
    /// MXCSR.
    fn mxcsr(&self) -> u32;
    /// Sets MXCSR; false if the host refused.
    fn set_mxcsr(&self, v: u32) -> bool;
    /// XMM register `n` (0..16) as 16 bytes.
    fn xmm(&self, n: usize) -> Option<[u8; 16]>;
    /// Sets XMM register `n`; false if the host refused.
    fn set_xmm(&self, n: usize, v: [u8; 16]) -> bool;
    /// A VEX.128 register move: XMM `src` to XMM `dst`, and the upper half
    /// of YMM `dst` zeroed; false if the host refused or cannot.
    fn vex128_move(&self, _dst: usize, _src: usize) -> bool {
        false
    }
    /// The x87/SSE state (x87 registers, FSW, tags, XMM, MXCSR).
    fn fpu(&self) -> Option<kvm_bindings::kvm_fpu> {
        None
    }
    /// Sets the x87/SSE state; false if the host refused.
    fn set_fpu(&self, _f: &kvm_bindings::kvm_fpu) -> bool {
        false
    }
    /// The whole XSAVE state as KVM_GET_XSAVE returns it (standard format,
    /// [`xsave::KVM_AREA`] bytes), None if unavailable.
    fn xsave_area(&self) -> Option<Vec<u8>> {
        None
    }
    /// Loads the whole XSAVE state (KVM_SET_XSAVE); false if refused.
    fn set_xsave_area(&self, _area: &[u8]) -> bool {
        false
    }
    /// IA32_XSS (supervisor state components enabled for `xsaves`).
    fn xss(&self) -> u64 {
        0
    }
    /// Where the XSAVE state components live (CPUID leaf 0xD).
    fn xstate_layout(&self) -> xsave::XstateLayout {
        xsave::XstateLayout::sdm()
    }
    /// Flushes the guest's TLB (every PCID, global pages included); false
    /// if the host cannot.
    fn flush_guest_tlb(&self) -> bool {
        false
    }
}

/// Decodes the instruction at CS:RIP.
pub fn fetch(mem: &dyn PhysMem, regs: &kvm_regs, s: &kvm_sregs) -> Result<Instruction, Fixup> {
    let p = Paging::from_sregs(s);
    let bits = code_bits(s);
    let linear = if bits == 64 {
        regs.rip
    } else {
        s.cs.base.wrapping_add(regs.rip) & 0xffff_ffff
    };
    // Fetch up to 15 bytes, stopping early at an unmapped page.
    let mut buf = [0u8; 15];
    let mut n = 15;
    if read_linear(mem, &p, linear, &mut buf, Access::READ).is_err() {
        let first = (4096 - (linear & 0xfff)) as usize;
        n = first.min(15);
        read_linear(mem, &p, linear, &mut buf[..n], Access::READ).map_err(Fixup::PageFault)?;
    }
    let mut d = Decoder::with_ip(bits, &buf[..n], regs.rip, DecoderOptions::NONE);
    let i = d.decode();
    if i.is_invalid() {
        return Err(Fixup::Exception {
            vector: UD,
            error_code: None,
        });
    }
    Ok(i)
}

/// Handles an emulation failure: decodes the instruction at RIP and
/// emulates or injects it. Updates `regs`/`sregs` in place.
pub fn fixup(mem: &dyn PhysMem, env: &dyn EmuEnv, regs: &mut kvm_regs, s: &mut kvm_sregs) -> Fixup {
    let insn = match fetch(mem, regs, s) {
        Ok(i) => i,
        Err(f) => return f,
    };
    let next = regs.rip.wrapping_add(insn.len() as u64);
    let advance = |regs: &mut kvm_regs| {
        regs.rip = if code_bits(s) == 64 {
            next
        } else {
            next & 0xffff_ffff
        };
    };
    match insn.code() {
        Code::Int3 => {
            // The gate checks as for `int $3` (limit, DPL, present).
            if let Err(f) = check_soft_int_gate(mem, s, BP) {
                return f;
            }
            advance(regs);
            Fixup::Exception {
                vector: BP,
                error_code: None,
            }
        }
        Code::Int_imm8 => {
            let vector = insn.immediate8();
            match check_soft_int_gate(mem, s, vector) {
                Ok(()) => {
                    advance(regs);
                    Fixup::SoftInt { vector }
                }
                Err(f) => f,
            }
        }
        Code::Into if code_bits(s) != 64 => {
            if regs.rflags & (1 << 11) != 0 {
                if let Err(f) = check_soft_int_gate(mem, s, 4) {
                    return f;
                }
            }
            advance(regs);
            if regs.rflags & (1 << 11) != 0 {
                Fixup::SoftInt { vector: 4 }
            } else {
                Fixup::Resume
            }
        }
        Code::Iretd | Code::Iretw | Code::Iretq => iret(mem, regs, s, insn.code()),
        // SMAP's clac/stac (leaf 7 shows SMAP whatever the VMM sets): they
        // only flip EFLAGS.AC, and are #UD outside ring 0.
        Code::Clac | Code::Stac => {
            if cpl(s) != 0 {
                return Fixup::Exception {
                    vector: UD,
                    error_code: None,
                };
            }
            if insn.code() == Code::Stac {
                regs.rflags |= RFLAGS_AC;
            } else {
                regs.rflags &= !RFLAGS_AC;
            }
            advance(regs);
            Fixup::Resume
        }
        Code::Rdtscp => {
            let t = env.rdtsc();
            regs.rax = t & 0xffff_ffff;
            regs.rdx = t >> 32;
            regs.rcx = env.tsc_aux() & 0xffff_ffff;
            advance(regs);
            Fixup::Resume
        }
        Code::Rdtsc => {
            let t = env.rdtsc();
            regs.rax = t & 0xffff_ffff;
            regs.rdx = t >> 32;
            advance(regs);
            Fixup::Resume
        }
        Code::Xgetbv => {
            if regs.rcx & 0xffff_ffff != 0 {
                return Fixup::Exception {
                    vector: GP,
                    error_code: Some(0),
                };
            }
            let x = env.xcr0();
            regs.rax = x & 0xffff_ffff;
            regs.rdx = x >> 32;
            advance(regs);
            Fixup::Resume
        }
        // fwait: #NM if CR0.TS and CR0.MP, #MF if an unmasked x87 exception
        // is pending (FSW.ES), otherwise nothing.
        Code::Wait => {
            if s.cr0 & 0xa == 0xa {
                return Fixup::Exception {
                    vector: NM,
                    error_code: None,
                };
            }
            if env.fpu_status() & 0x80 != 0 {
                return Fixup::Exception {
                    vector: MF,
                    error_code: None,
                };
            }
            advance(regs);
            Fixup::Resume
        }
        // SSE control/status register loads and stores.
        Code::Ldmxcsr_m32 | Code::VEX_Vldmxcsr_m32 => {
            let v = match read_operand(mem, regs, s, &insn, 0, 4) {
                Ok(v) => v as u32,
                Err(f) => return f,
            };
            // Bits 31:16 are reserved (MXCSR_MASK is 0xffff here).
            if v >> 16 != 0 || !env.set_mxcsr(v) {
                return Fixup::Exception {
                    vector: GP,
                    error_code: Some(0),
                };
            }
            advance(regs);
            Fixup::Resume
        }
        Code::Stmxcsr_m32 | Code::VEX_Vstmxcsr_m32 => {
            match write_operand(mem, regs, s, &insn, 0, &env.mxcsr().to_le_bytes()) {
                Ok(()) => {
                    advance(regs);
                    Fixup::Resume
                }
                Err(f) => f,
            }
        }
        // movd/movq between a GPR or memory and an XMM register.
        Code::Movd_xmm_rm32 | Code::Movq_xmm_rm64 | Code::Movd_rm32_xmm | Code::Movq_rm64_xmm => {
            match movd_xmm(mem, env, regs, s, &insn) {
                Ok(()) => {
                    advance(regs);
                    Fixup::Resume
                }
                Err(f) => f,
            }
        }
        Code::Popcnt_r16_rm16
        | Code::Popcnt_r32_rm32
        | Code::Popcnt_r64_rm64
        | Code::Lzcnt_r16_rm16
        | Code::Lzcnt_r32_rm32
        | Code::Lzcnt_r64_rm64
        | Code::Tzcnt_r16_rm16
        | Code::Tzcnt_r32_rm32
        | Code::Tzcnt_r64_rm64 => match bit_count(mem, regs, s, &insn) {
            Ok(()) => {
                advance(regs);
                Fixup::Resume
            }
            Err(f) => f,
        },
        // icebp, x87/SIMD under CR0.TS/EM, VMX/SVM, task switches; then more
        // forms (descriptor queries, SSE, ...): see traps.rs and more.rs.
        _ => crate::arch::x86::traps::fixup(mem, env, regs, s, &insn)
            .unwrap_or_else(|| crate::arch::x86::more::fixup(mem, env, regs, s, &insn)),
    }
}

/// Reads general-purpose register `r` (any width, including AH..BH).
pub fn gpr_read(regs: &kvm_regs, r: Register) -> Option<u64> {
    let full = r.full_register();
    let v = match full {
        Register::RAX => regs.rax,
        Register::RCX => regs.rcx,
        Register::RDX => regs.rdx,
        Register::RBX => regs.rbx,
        Register::RSP => regs.rsp,
        Register::RBP => regs.rbp,
        Register::RSI => regs.rsi,
        Register::RDI => regs.rdi,
        Register::R8 => regs.r8,
        Register::R9 => regs.r9,
        Register::R10 => regs.r10,
        Register::R11 => regs.r11,
        Register::R12 => regs.r12,
        Register::R13 => regs.r13,
        Register::R14 => regs.r14,
        Register::R15 => regs.r15,
        Register::RIP => regs.rip,
        _ => return None,
    };
    Some(match r {
        Register::AH | Register::CH | Register::DH | Register::BH => (v >> 8) & 0xff,
        _ => match r.size() {
            1 => v & 0xff,
            2 => v & 0xffff,
            4 => v & 0xffff_ffff,
            _ => v,
        },
    })
}

/// Writes general-purpose register `r` with the CPU's rules: a 32-bit write
/// zero-extends, 8- and 16-bit writes merge.
pub fn gpr_write(regs: &mut kvm_regs, r: Register, val: u64) -> bool {
    let slot = match r.full_register() {
        Register::RAX => &mut regs.rax,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RBX => &mut regs.rbx,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return false,
    };
    *slot = match r {
        Register::AH | Register::CH | Register::DH | Register::BH => {
            (*slot & !0xff00) | ((val & 0xff) << 8)
        }
        _ => match r.size() {
            1 => (*slot & !0xff) | (val & 0xff),
            2 => (*slot & !0xffff) | (val & 0xffff),
            4 => val & 0xffff_ffff,
            _ => val,
        },
    };
    true
}

/// The linear address of memory operand `op`.
pub(crate) fn operand_address(
    regs: &kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
    op: u32,
) -> Result<u64, Fixup> {
    let seg_base = |seg: Register| match seg {
        Register::FS => s.fs.base,
        Register::GS => s.gs.base,
        Register::ES if !is_64bit(s) => s.es.base,
        Register::CS if !is_64bit(s) => s.cs.base,
        Register::SS if !is_64bit(s) => s.ss.base,
        Register::DS if !is_64bit(s) => s.ds.base,
        _ => 0,
    };
    let ea = insn
        .virtual_address(op, 0, |reg, _, _| match reg {
            Register::ES
            | Register::CS
            | Register::SS
            | Register::DS
            | Register::FS
            | Register::GS => Some(seg_base(reg)),
            r => gpr_read(regs, r),
        })
        .ok_or_else(|| Fixup::Unhandled("memory operand".into()))?;
    Ok(if is_64bit(s) { ea } else { ea & 0xffff_ffff })
}

/// Writes `data` to memory operand `op`.
pub(crate) fn write_operand(
    mem: &dyn PhysMem,
    regs: &kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
    op: u32,
    data: &[u8],
) -> Result<(), Fixup> {
    if insn.op_kind(op) != OpKind::Memory {
        return Err(Fixup::Unhandled("non-memory destination".into()));
    }
    let linear = operand_address(regs, s, insn, op)?;
    let acc = Access {
        write: true,
        user: cpl(s) == 3,
    };
    write_linear(mem, &Paging::from_sregs(s), linear, data, acc).map_err(Fixup::PageFault)
}

/// The value of source operand `op` (a register or memory) of `size` bytes.
pub(crate) fn read_operand(
    mem: &dyn PhysMem,
    regs: &kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
    op: u32,
    size: usize,
) -> Result<u64, Fixup> {
    match insn.op_kind(op) {
        OpKind::Register => gpr_read(regs, insn.op_register(op)).ok_or_else(|| {
            Fixup::Unhandled(format!("register operand {:?}", insn.op_register(op)))
        }),
        OpKind::Memory => {
            let linear = operand_address(regs, s, insn, op)?;
            let mut b = [0u8; 8];
            let user = cpl(s) == 3;
            read_linear(
                mem,
                &Paging::from_sregs(s),
                linear,
                &mut b[..size],
                Access { write: false, user },
            )
            .map_err(Fixup::PageFault)?;
            Ok(u64::from_le_bytes(b))
        }
        k => Err(Fixup::Unhandled(format!("operand kind {k:?}"))),
    }
}

/// movd/movq xmm <-> r/m32/64: to XMM zero-extends to 128 bits.
fn movd_xmm(
    mem: &dyn PhysMem,
    env: &dyn EmuEnv,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    let size = if matches!(insn.code(), Code::Movq_xmm_rm64 | Code::Movq_rm64_xmm) {
        8
    } else {
        4
    };
    let xmm_index = |r: Register| (r as usize).wrapping_sub(Register::XMM0 as usize);
    if matches!(insn.code(), Code::Movd_xmm_rm32 | Code::Movq_xmm_rm64) {
        let n = xmm_index(insn.op0_register());
        let v = read_operand(mem, regs, s, insn, 1, size)?;
        let mut x = [0u8; 16];
        x[..8].copy_from_slice(&v.to_le_bytes());
        if n >= 16 || !env.set_xmm(n, x) {
            return Err(Fixup::Unhandled(
                "movd to an XMM register the host refused".into(),
            ));
        }
    } else {
        let n = xmm_index(insn.op1_register());
        let x = (n < 16)
            .then(|| env.xmm(n))
            .flatten()
            .ok_or_else(|| Fixup::Unhandled("movd from XMM".into()))?;
        let v = u64::from_le_bytes(x[..8].try_into().unwrap_or([0; 8]));
        match insn.op0_kind() {
            OpKind::Register => {
                gpr_write(
                    regs,
                    insn.op0_register(),
                    if size == 4 { v & 0xffff_ffff } else { v },
                );
            }
            _ => write_operand(mem, regs, s, insn, 0, &v.to_le_bytes()[..size])?,
        }
    }
    Ok(())
}

/// popcnt, lzcnt, tzcnt: count bits of the source into the destination
/// register and set ZF/CF as the CPU does.
fn bit_count(
    mem: &dyn PhysMem,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    let dst = insn.op0_register();
    let size = dst.size();
    let bits = (size * 8) as u32;
    let src = read_operand(mem, regs, s, insn, 1, size)?;
    let (val, cf, zf) = match insn.mnemonic() {
        Mnemonic::Popcnt => (u64::from(src.count_ones()), false, src == 0),
        Mnemonic::Lzcnt => {
            let n = if src == 0 {
                bits
            } else {
                src.leading_zeros() - (64 - bits)
            };
            (u64::from(n), src == 0, n == 0)
        }
        _ => {
            let n = if src == 0 { bits } else { src.trailing_zeros() };
            (u64::from(n), src == 0, n == 0)
        }
    };
    gpr_write(regs, dst, val);
    // CF (0), PF (2), AF (4), ZF (6), SF (7), OF (11): popcnt clears all but
    // ZF; lzcnt/tzcnt define CF and ZF and leave the others undefined (we clear).
    regs.rflags &= !((1 << 0) | (1 << 2) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 11));
    regs.rflags |= u64::from(cf) | (u64::from(zf) << 6);
    Ok(())
}

/// The checks the CPU makes before delivering `int n`: the vector within
/// the IDT limit (#GP(n*8+2)), the gate's DPL >= CPL (#GP(n*8+2)), the
/// gate present (#NP(n*8+2)).
fn check_soft_int_gate(mem: &dyn PhysMem, s: &kvm_sregs, vector: u8) -> Result<(), Fixup> {
    if s.cr0 & CR0_PE == 0 {
        return Ok(());
    }
    let gp = |v: u8| Fixup::Exception {
        vector: v,
        error_code: Some(u32::from(vector) * 8 + 2),
    };
    let size: u64 = if s.efer & EFER_LMA != 0 { 16 } else { 8 };
    let off = u64::from(vector) * size;
    if off + size - 1 > u64::from(s.idt.limit) {
        return Err(gp(GP));
    }
    let mut g = [0u8; 8];
    read_linear(
        mem,
        &Paging::from_sregs(s),
        s.idt.base.wrapping_add(off),
        &mut g,
        Access::READ,
    )
    .map_err(Fixup::PageFault)?;
    let attr = g[5];
    let dpl = (attr >> 5) & 3;
    if dpl < cpl(s) {
        return Err(gp(GP));
    }
    if attr & 0x80 == 0 {
        return Err(gp(NP));
    }
    Ok(())
}

/// Reads a segment descriptor for `sel` from the GDT or LDT.
fn load_descriptor(mem: &dyn PhysMem, s: &kvm_sregs, sel: u16) -> Result<kvm_segment, Fixup> {
    let gp = Fixup::Exception {
        vector: GP,
        error_code: Some(u32::from(sel & 0xfffc)),
    };
    let (base, limit) = if sel & 4 != 0 {
        if s.ldt.unusable != 0 || s.ldt.present == 0 {
            return Err(gp);
        }
        (s.ldt.base, s.ldt.limit)
    } else {
        (s.gdt.base, u32::from(s.gdt.limit))
    };
    let idx = u64::from(sel >> 3) * 8;
    if idx + 7 > u64::from(limit) {
        return Err(gp);
    }
    let mut d = [0u8; 8];
    read_linear(
        mem,
        &Paging::from_sregs(s),
        base.wrapping_add(idx),
        &mut d,
        Access::READ,
    )
    .map_err(Fixup::PageFault)?;
    Ok(descriptor_to_segment(sel, u64::from_le_bytes(d)))
}

/// Decodes a legacy 8-byte segment descriptor into KVM's form.
pub fn descriptor_to_segment(sel: u16, d: u64) -> kvm_segment {
    let limit_raw = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let g = ((d >> 55) & 1) as u8;
    let limit = if g != 0 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    let base = ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24);
    kvm_segment {
        base,
        limit,
        selector: sel,
        type_: ((d >> 40) & 0xf) as u8,
        s: ((d >> 44) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        present: ((d >> 47) & 1) as u8,
        avl: ((d >> 52) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        db: ((d >> 54) & 1) as u8,
        g,
        unusable: 0,
        padding: 0,
    }
}

fn null_segment(sel: u16) -> kvm_segment {
    kvm_segment {
        selector: sel,
        unusable: 1,
        ..Default::default()
    }
}

/// What `iret` pops: IP, CS, FLAGS and, on a return to an outer level, SP and SS.
type IretFrame = (u64, u16, u64, Option<(u64, u16)>);

/// Emulates `iret` in protected mode (and `iretq`, should it ever fail):
/// same-privilege and outer-privilege returns. Task returns (NT) and
/// returns to virtual-8086 mode are refused.
fn iret(mem: &dyn PhysMem, regs: &mut kvm_regs, s: &mut kvm_sregs, code: Code) -> Fixup {
    if s.cr0 & CR0_PE == 0 {
        return Fixup::Unhandled("real-mode iret".into());
    }
    let long = is_64bit(s);
    if regs.rflags & (1 << 14) != 0 && !long {
        return Fixup::Unhandled("iret with EFLAGS.NT (task return)".into());
    }
    let opsize: u64 = match code {
        Code::Iretq => 8,
        Code::Iretd => 4,
        _ => 2,
    };
    let stack32 = long || s.ss.db != 0;
    let p = Paging::from_sregs(s);
    let mut sp = regs.rsp;
    let mut pop = |n: u64| -> Result<u64, Fixup> {
        let lin = if long {
            sp
        } else {
            let off = if stack32 {
                sp & 0xffff_ffff
            } else {
                sp & 0xffff
            };
            s.ss.base.wrapping_add(off) & 0xffff_ffff
        };
        let mut b = [0u8; 8];
        read_linear(mem, &p, lin, &mut b[..n as usize], Access::READ).map_err(Fixup::PageFault)?;
        sp = sp.wrapping_add(n);
        Ok(u64::from_le_bytes(b))
    };
    let res = (|| -> Result<IretFrame, Fixup> {
        let ip = pop(opsize)?;
        let cs = pop(opsize)? as u16;
        let fl = pop(opsize)?;
        let cpl = cpl(s);
        let outer = (cs & 3) as u8 > cpl || long;
        let stack = if outer {
            Some((pop(opsize)?, pop(opsize)? as u16))
        } else {
            None
        };
        Ok((ip, cs, fl, stack))
    })();
    let (ip, cs_sel, flags, stack) = match res {
        Ok(v) => v,
        Err(f) => return f,
    };
    if flags & (1 << 17) != 0 && !long {
        return Fixup::Unhandled("iret to virtual-8086 mode".into());
    }
    let old_cpl = cpl(s);
    let rpl = (cs_sel & 3) as u8;
    let gp_sel = |sel: u16| Fixup::Exception {
        vector: GP,
        error_code: Some(u32::from(sel & 0xfffc)),
    };
    if cs_sel & 0xfffc == 0 || rpl < old_cpl {
        return gp_sel(cs_sel);
    }
    let mut cs = match load_descriptor(mem, s, cs_sel) {
        Ok(d) => d,
        Err(f) => return f,
    };
    // Must be a code segment; non-conforming: DPL == RPL; conforming: DPL <= RPL.
    let conforming = cs.type_ & 4 != 0;
    if cs.s == 0
        || cs.type_ & 8 == 0
        || (!conforming && cs.dpl != rpl)
        || (conforming && cs.dpl > rpl)
    {
        return gp_sel(cs_sel);
    }
    if cs.present == 0 {
        return Fixup::Exception {
            vector: NP,
            error_code: Some(u32::from(cs_sel & 0xfffc)),
        };
    }
    cs.type_ |= 1; // accessed
    let mut new_ss = None;
    if let Some((new_sp, ss_sel)) = stack {
        if ss_sel & 0xfffc == 0 {
            // A null SS is allowed only in 64-bit mode returning to CPL < 3.
            if !(long && rpl < 3 && cs.l != 0) {
                return gp_sel(ss_sel);
            }
            let mut n = null_segment(ss_sel);
            n.dpl = rpl;
            new_ss = Some((new_sp, n));
        } else {
            let mut ss = match load_descriptor(mem, s, ss_sel) {
                Ok(d) => d,
                Err(f) => return f,
            };
            if (ss_sel & 3) as u8 != rpl
                || ss.dpl != rpl
                || ss.s == 0
                || ss.type_ & 8 != 0
                || ss.type_ & 2 == 0
            {
                return gp_sel(ss_sel);
            }
            if ss.present == 0 {
                return Fixup::Exception {
                    vector: SS,
                    error_code: Some(u32::from(ss_sel & 0xfffc)),
                };
            }
            ss.type_ |= 1;
            new_ss = Some((new_sp, ss));
        }
    }
    // EFLAGS: which bits may change.
    let iopl = ((regs.rflags >> 12) & 3) as u8;
    let mut mask: u64 = 0x0025_7fd5 & !(3 << 12) & !(1 << 9); // CF..OF, NT, RF, AC, ID (not IOPL, IF)
    if old_cpl == 0 {
        mask |= (3 << 12) | (1 << 19) | (1 << 20); // IOPL, VIF, VIP
    }
    if old_cpl <= iopl {
        mask |= 1 << 9; // IF
    }
    if opsize == 2 {
        mask &= 0xffff;
    }
    regs.rflags = (regs.rflags & !mask) | (flags & mask) | 2;
    regs.rip = if long {
        ip
    } else if opsize == 2 {
        ip & 0xffff
    } else {
        ip & 0xffff_ffff
    };
    s.cs = cs;
    match new_ss {
        Some((new_sp, ss)) => {
            regs.rsp = if long || ss.db != 0 {
                new_sp
            } else {
                (regs.rsp & !0xffff) | (new_sp & 0xffff)
            };
            s.ss = ss;
            if rpl > old_cpl {
                // Data segments the new privilege may not use become null.
                for seg in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs] {
                    let data_or_nc = seg.type_ & 8 == 0 || seg.type_ & 4 == 0;
                    if seg.unusable == 0 && data_or_nc && seg.dpl < rpl {
                        *seg = null_segment(0);
                    }
                }
            }
        }
        None => {
            regs.rsp = if stack32 {
                (regs.rsp & !0xffff_ffff) | (sp & 0xffff_ffff)
            } else {
                (regs.rsp & !0xffff) | (sp & 0xffff)
            };
        }
    }
    Fixup::Resume
}

/// Registers a hypercall is decoded from.
pub fn hypercall_args(regs: &kvm_regs, long: bool) -> (u64, [u64; 6]) {
    if long {
        (
            regs.rax,
            [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9],
        )
    } else {
        let l = |v: u64| v & 0xffff_ffff;
        (
            l(regs.rax),
            [
                l(regs.rbx),
                l(regs.rcx),
                l(regs.rdx),
                l(regs.rsi),
                l(regs.rdi),
                l(regs.rbp),
            ],
        )
    }
}

/// NX bit check helper (for completeness of the walk's documentation).
pub fn nx_enabled(p: &Paging) -> bool {
    p.efer & EFER_NXE != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Sparse guest memory: page number -> bytes.
    #[derive(Default)]
    struct Mem(std::cell::RefCell<HashMap<u64, Vec<u8>>>);

    impl Mem {
        fn write(&self, gpa: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                let a = gpa + i as u64;
                self.0
                    .borrow_mut()
                    .entry(a >> 12)
                    .or_insert_with(|| vec![0; 4096])[(a & 0xfff) as usize] = *b;
            }
        }
        fn w64(&self, gpa: u64, v: u64) {
            self.write(gpa, &v.to_le_bytes())
        }
    }

    impl PhysMem for Mem {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let m = self.0.borrow();
            for (i, b) in buf.iter_mut().enumerate() {
                let a = gpa + i as u64;
                match m.get(&(a >> 12)) {
                    Some(p) => *b = p[(a & 0xfff) as usize],
                    None => return false,
                }
            }
            true
        }
        fn write(&self, gpa: u64, data: &[u8]) -> bool {
            Mem::write(self, gpa, data);
            true
        }
    }

    struct Env;
    impl EmuEnv for Env {
        fn rdtsc(&self) -> u64 {
            0x1_2345_6789
        }
        fn tsc_aux(&self) -> u64 {
            7
        }
        fn xcr0(&self) -> u64 {
            3
        }
        fn fpu_status(&self) -> u16 {
            0
        }
        fn mxcsr(&self) -> u32 {
            0x1f80
        }
        fn set_mxcsr(&self, v: u32) -> bool {
            v == 0x1f80
        }
        fn xmm(&self, n: usize) -> Option<[u8; 16]> {
            Some([n as u8; 16])
        }
        fn set_xmm(&self, n: usize, v: [u8; 16]) -> bool {
            n == 15 && v[..8] == 0x1234_5678u64.to_le_bytes() && v[8..] == [0; 8]
        }
    }

    /// 4-level tables mapping `va` -> `pa` with 4 KiB pages.
    fn long_mode_map(m: &Mem, cr3: u64, va: u64, pa: u64, flags: u64) {
        let mut table = cr3;
        for level in (2..=4).rev() {
            let idx = (va >> (12 + 9 * (level - 1))) & 0x1ff;
            let next = cr3 + 0x1000 * (5 - level as u64) + 0x10000 * ((va >> 21) & 0xf);
            m.w64(table + idx * 8, next | PTE_P | PTE_W | PTE_U);
            table = next;
        }
        m.w64(table + ((va >> 12) & 0x1ff) * 8, pa | flags);
    }

    fn long_paging(cr3: u64) -> Paging {
        Paging {
            cr0: CR0_PE | CR0_PG | CR0_WP,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
        }
    }

    #[test]
    fn translate_long_mode_4k_page_resolved_with_offset() {
        let m = Mem::default();
        long_mode_map(&m, 0x100000, 0xffff_8000_0000_1000, 0x5000, PTE_P | PTE_W);
        let p = long_paging(0x100000);
        assert_eq!(
            translate(&m, &p, 0xffff_8000_0000_1234, Access::READ),
            Ok(0x5234)
        );
    }

    #[test]
    fn translate_not_present_faults_with_error_code() {
        let m = Mem::default();
        long_mode_map(&m, 0x100000, 0x40_0000, 0x5000, PTE_P);
        let p = long_paging(0x100000);
        let f = translate(&m, &p, 0x40_1000, Access::READ).unwrap_err();
        assert_eq!(f.error_code & 1, 0);
        // Read-only page, write with CR0.WP: protection fault.
        let f = translate(&m, &p, 0x40_0010, Access::WRITE).unwrap_err();
        assert_eq!(f.error_code, 3);
    }

    #[test]
    fn translate_paging_off_identity() {
        let m = Mem::default();
        let p = Paging {
            cr0: CR0_PE,
            ..Default::default()
        };
        assert_eq!(
            translate(&m, &p, 0x1_2345_6789, Access::READ),
            Ok(0x2345_6789)
        );
    }

    #[test]
    fn translate_pae_2m_page_resolved() {
        let m = Mem::default();
        // PDPT at 0x2000, PD at 0x3000, a 2 MiB page at 0x4000_0000.
        m.w64(0x2000, 0x3000 | PTE_P);
        m.w64(0x3000 + 8, 0x4000_0000 | PTE_P | PTE_PS | PTE_W);
        let p = Paging {
            cr0: CR0_PE | CR0_PG,
            cr3: 0x2000,
            cr4: CR4_PAE,
            efer: 0,
        };
        assert_eq!(translate(&m, &p, 0x20_1234, Access::WRITE), Ok(0x4000_1234));
    }

    #[test]
    fn translate_legacy_pse_4m_page_resolved() {
        let m = Mem::default();
        m.write(0x2000 + 4, &((0x80_0000u32 | 0x83).to_le_bytes()));
        let p = Paging {
            cr0: CR0_PE | CR0_PG,
            cr3: 0x2000,
            cr4: CR4_PSE,
            efer: 0,
        };
        assert_eq!(translate(&m, &p, 0x40_0010, Access::READ), Ok(0x80_0010));
    }

    #[test]
    fn read_linear_straddling_pages_joined() {
        let m = Mem::default();
        long_mode_map(&m, 0x100000, 0x7000, 0x9000, PTE_P);
        long_mode_map(&m, 0x100000, 0x8000, 0x3000, PTE_P);
        m.write(0x9ffe, &[1, 2]);
        m.write(0x3000, &[3, 4]);
        let mut b = [0u8; 4];
        read_linear(&m, &long_paging(0x100000), 0x7ffe, &mut b, Access::READ).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
    }

    fn flat32() -> (kvm_regs, kvm_sregs) {
        let code = kvm_segment {
            limit: 0xffff_ffff,
            selector: 8,
            type_: 0xb,
            present: 1,
            s: 1,
            db: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 3,
            ..code
        };
        let s = kvm_sregs {
            cs: code,
            ss: data,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            cr0: CR0_PE,
            ..Default::default()
        };
        let r = kvm_regs {
            rflags: 2,
            ..Default::default()
        };
        (r, s)
    }

    #[test]
    fn fixup_int3_advances_rip_and_injects_bp() {
        let m = Mem::default();
        m.write(0x1000, &[0xcc]);
        let (mut r, mut s) = flat32();
        r.rip = 0x1000;
        // A present DPL-0 interrupt gate for vector 3.
        s.idt.base = 0x8000;
        s.idt.limit = 0x7ff;
        m.w64(0x8000 + 3 * 8, 0x0000_8e00_0000_0000);
        assert_eq!(
            fixup(&m, &Env, &mut r, &mut s),
            Fixup::Exception {
                vector: BP,
                error_code: None
            }
        );
        assert_eq!(r.rip, 0x1001);
    }

    #[test]
    fn fixup_int_n_with_prefix_checks_gate_and_injects() {
        let m = Mem::default();
        // A redundant prefix before int $0x80: length 3.
        m.write(0x1000, &[0x3e, 0xcd, 0x80]);
        let (mut r, mut s) = flat32();
        r.rip = 0x1000;
        s.idt.base = 0x8000;
        s.idt.limit = 0x7ff;
        // Present interrupt gate, DPL 0.
        m.w64(0x8000 + 0x80 * 8, 0x0000_8e00_0000_0000);
        assert_eq!(
            fixup(&m, &Env, &mut r, &mut s),
            Fixup::SoftInt { vector: 0x80 }
        );
        assert_eq!(r.rip, 0x1003);
    }

    #[test]
    fn fixup_int_n_gate_dpl_below_cpl_raises_gp() {
        let m = Mem::default();
        m.write(0x1000, &[0xcd, 0x80]);
        let (mut r, mut s) = flat32();
        r.rip = 0x1000;
        s.ss.dpl = 3;
        s.cs.dpl = 3;
        s.idt.base = 0x8000;
        s.idt.limit = 0x7ff;
        m.w64(0x8000 + 0x80 * 8, 0x0000_8e00_0000_0000);
        assert_eq!(
            fixup(&m, &Env, &mut r, &mut s),
            Fixup::Exception {
                vector: GP,
                error_code: Some(0x80 * 8 + 2)
            }
        );
        assert_eq!(r.rip, 0x1000, "faulting int leaves RIP at the instruction");
    }

    #[test]
    fn fixup_int_n_beyond_idt_limit_raises_gp() {
        let m = Mem::default();
        m.write(0x1000, &[0xcd, 0x80]);
        let (mut r, mut s) = flat32();
        r.rip = 0x1000;
        s.idt.base = 0x8000;
        s.idt.limit = 0xff;
        assert!(matches!(
            fixup(&m, &Env, &mut r, &mut s),
            Fixup::Exception { vector: GP, .. }
        ));
    }

    /// GDT: 0x08 ring-0 code, 0x10 ring-0 data, 0x1b ring-3 code, 0x23 ring-3 data.
    fn gdt(m: &Mem, s: &mut kvm_sregs) {
        s.gdt.base = 0x9000;
        s.gdt.limit = 0x27;
        m.w64(0x9008, 0x00cf_9b00_0000_ffff);
        m.w64(0x9010, 0x00cf_9300_0000_ffff);
        m.w64(0x9018, 0x00cf_fb00_0000_ffff);
        m.w64(0x9020, 0x00cf_f300_0000_ffff);
    }

    #[test]
    fn fixup_iret32_same_privilege_pops_three() {
        let m = Mem::default();
        m.write(0x1000, &[0xcf]);
        let (mut r, mut s) = flat32();
        gdt(&m, &mut s);
        r.rip = 0x1000;
        r.rsp = 0x7000;
        m.write(0x7000, &0x2000u32.to_le_bytes());
        m.write(0x7004, &0x08u32.to_le_bytes());
        m.write(0x7008, &0x246u32.to_le_bytes());
        assert_eq!(fixup(&m, &Env, &mut r, &mut s), Fixup::Resume);
        assert_eq!((r.rip, r.rsp, r.rflags), (0x2000, 0x700c, 0x246));
        assert_eq!(s.cs.selector, 8);
    }

    #[test]
    fn fixup_iret32_to_user_loads_ss_and_nulls_kernel_data() {
        let m = Mem::default();
        m.write(0x1000, &[0xcf]);
        let (mut r, mut s) = flat32();
        gdt(&m, &mut s);
        r.rip = 0x1000;
        r.rsp = 0x7000;
        for (i, v) in [0x4000u32, 0x1b, 0x202, 0x6000, 0x23].iter().enumerate() {
            m.write(0x7000 + 4 * i as u64, &v.to_le_bytes());
        }
        assert_eq!(fixup(&m, &Env, &mut r, &mut s), Fixup::Resume);
        assert_eq!((r.rip, r.rsp), (0x4000, 0x6000));
        assert_eq!((s.cs.dpl, s.ss.dpl, s.ss.selector), (3, 3, 0x23));
        assert_eq!(cpl(&s), 3);
        assert_eq!(
            s.ds.unusable, 1,
            "ring-0 DS must not survive a return to ring 3"
        );
    }

    #[test]
    fn fixup_iret32_to_more_privileged_cs_raises_gp() {
        let m = Mem::default();
        m.write(0x1000, &[0xcf]);
        let (mut r, mut s) = flat32();
        gdt(&m, &mut s);
        s.cs.dpl = 3;
        s.ss.dpl = 3;
        r.rip = 0x1000;
        r.rsp = 0x7000;
        for (i, v) in [0x4000u32, 0x08, 0x202].iter().enumerate() {
            m.write(0x7000 + 4 * i as u64, &v.to_le_bytes());
        }
        assert!(matches!(
            fixup(&m, &Env, &mut r, &mut s),
            Fixup::Exception { vector: GP, .. }
        ));
        assert_eq!(r.rip, 0x1000);
    }

    #[test]
    fn fixup_iret_unmapped_stack_page_faults() {
        let m = Mem::default();
        m.write(0x1000, &[0xcf]);
        let (mut r, mut s) = flat32();
        s.cr0 |= CR0_PG;
        s.cr4 = CR4_PAE;
        s.cr3 = 0x2000;
        // Identity-map only the first 2 MiB.
        m.w64(0x2000, 0x3000 | PTE_P);
        m.w64(0x3000, PTE_P | PTE_PS | PTE_W);
        r.rip = 0x1000;
        r.rsp = 0x40_0000;
        assert!(matches!(
            fixup(&m, &Env, &mut r, &mut s),
            Fixup::PageFault(_)
        ));
    }

    #[test]
    fn fixup_rdtscp_emulated() {
        let m = Mem::default();
        m.write(0x1000, &[0x0f, 0x01, 0xf9]);
        let (mut r, mut s) = flat32();
        r.rip = 0x1000;
        assert_eq!(fixup(&m, &Env, &mut r, &mut s), Fixup::Resume);
        assert_eq!((r.rax, r.rdx, r.rcx, r.rip), (0x2345_6789, 1, 7, 0x1003));
    }

    #[test]
    fn fixup_clac_stac_flip_ac_in_ring0_ud_in_ring3() {
        let m = Mem::default();
        m.write(0x1000, &[0x0f, 0x01, 0xcb, 0x0f, 0x01, 0xca]); // stac; clac
        let (mut r, mut s) = flat32();
        r.rip = 0x1000;
        assert_eq!(fixup(&m, &Env, &mut r, &mut s), Fixup::Resume);
        assert_ne!(r.rflags & RFLAGS_AC, 0);
        assert_eq!(fixup(&m, &Env, &mut r, &mut s), Fixup::Resume);
        assert_eq!(r.rflags & RFLAGS_AC, 0);
        assert_eq!(r.rip, 0x1006);
        s.ss.dpl = 3;
        r.rip = 0x1000;
        assert_eq!(
            fixup(&m, &Env, &mut r, &mut s),
            Fixup::Exception {
                vector: UD,
                error_code: None
            }
        );
    }

    #[test]
    fn fixup_popcnt_register_and_memory_operands() {
        let m = Mem::default();
        // popcnt %rdi,%rax (f3 48 0f b8 c7); popcnt (%rbx),%ecx (f3 0f b8 0b) in 64-bit mode.
        m.write(
            0x1000,
            &[0xf3, 0x48, 0x0f, 0xb8, 0xc7, 0xf3, 0x0f, 0xb8, 0x0b],
        );
        m.write(0x2000, &0x0f0fu32.to_le_bytes());
        let (mut r, mut s) = flat32();
        s.efer = EFER_LMA;
        s.cs.l = 1;
        r.rip = 0x1000;
        r.rdi = 0xff00_0000_0000_0001;
        r.rax = u64::MAX;
        r.rbx = 0x2000;
        r.rcx = u64::MAX;
        assert_eq!(fixup(&m, &Env, &mut r, &mut s), Fixup::Resume);
        assert_eq!((r.rax, r.rip), (9, 0x1005));
        assert_eq!(fixup(&m, &Env, &mut r, &mut s), Fixup::Resume);
        assert_eq!(r.rcx, 8, "32-bit destination zero-extends");
        assert_eq!(r.rflags & (1 << 6), 0);
    }

    #[test]
    fn fixup_tzcnt_zero_source_sets_cf_and_width() {
        let m = Mem::default();
        m.write(0x1000, &[0xf3, 0x0f, 0xbc, 0xc3]); // tzcnt %ebx,%eax
        let (mut r, mut s) = flat32();
        r.rip = 0x1000;
        r.rbx = 0;
        assert_eq!(fixup(&m, &Env, &mut r, &mut s), Fixup::Resume);
        assert_eq!(r.rax, 32);
        assert_eq!(r.rflags & 1, 1);
    }

    #[test]
    fn gpr_write_width_rules() {
        let mut r = kvm_regs {
            rax: u64::MAX,
            ..Default::default()
        };
        gpr_write(&mut r, Register::AH, 0x12);
        assert_eq!(r.rax, 0xffff_ffff_ffff_12ff);
        gpr_write(&mut r, Register::AX, 0x3456);
        assert_eq!(r.rax, 0xffff_ffff_ffff_3456);
        gpr_write(&mut r, Register::EAX, 7);
        assert_eq!(r.rax, 7);
        assert_eq!(gpr_read(&r, Register::AL), Some(7));
    }

    #[test]
    fn fixup_fwait_nop_unless_ts_and_mp() {
        let m = Mem::default();
        m.write(0x1000, &[0x9b]);
        let (mut r, mut s) = flat32();
        r.rip = 0x1000;
        assert_eq!(fixup(&m, &Env, &mut r, &mut s), Fixup::Resume);
        assert_eq!(r.rip, 0x1001);
        r.rip = 0x1000;
        s.cr0 |= 0xa;
        assert_eq!(
            fixup(&m, &Env, &mut r, &mut s),
            Fixup::Exception {
                vector: NM,
                error_code: None
            }
        );
    }

    #[test]
    fn fixup_ldmxcsr_loads_and_rejects_reserved_bits_stmxcsr_stores() {
        let m = Mem::default();
        // ldmxcsr (%rax); stmxcsr 8(%rax) in 32-bit mode.
        m.write(0x1000, &[0x0f, 0xae, 0x10, 0x0f, 0xae, 0x58, 0x08]);
        m.write(0x3000, &0x1f80u32.to_le_bytes());
        let (mut r, mut s) = flat32();
        r.rip = 0x1000;
        r.rax = 0x3000;
        assert_eq!(fixup(&m, &Env, &mut r, &mut s), Fixup::Resume);
        assert_eq!(fixup(&m, &Env, &mut r, &mut s), Fixup::Resume);
        let mut b = [0u8; 4];
        assert!(m.read(0x3008, &mut b));
        assert_eq!(u32::from_le_bytes(b), 0x1f80);
        m.write(0x3000, &0x1_0000u32.to_le_bytes());
        r.rip = 0x1000;
        assert_eq!(
            fixup(&m, &Env, &mut r, &mut s),
            Fixup::Exception {
                vector: GP,
                error_code: Some(0)
            }
        );
    }

    #[test]
    fn fixup_movd_to_and_from_xmm() {
        let m = Mem::default();
        // movd %ecx,%xmm15 (66 44 0f 6e f9); movd %xmm3,%eax (66 0f 7e d8), 64-bit mode.
        m.write(
            0x1000,
            &[0x66, 0x44, 0x0f, 0x6e, 0xf9, 0x66, 0x0f, 0x7e, 0xd8],
        );
        let (mut r, mut s) = flat32();
        s.efer = EFER_LMA;
        s.cs.l = 1;
        r.rip = 0x1000;
        r.rcx = 0xffff_ffff_1234_5678;
        r.rax = u64::MAX;
        assert_eq!(
            fixup(&m, &Env, &mut r, &mut s),
            Fixup::Resume,
            "env checks the zero-extended value"
        );
        assert_eq!(fixup(&m, &Env, &mut r, &mut s), Fixup::Resume);
        assert_eq!((r.rax, r.rip), (0x0303_0303, 0x1009));
    }

    #[test]
    fn fixup_unknown_instruction_unhandled() {
        let m = Mem::default();
        m.write(0x1000, &[0x90]);
        let (mut r, mut s) = flat32();
        r.rip = 0x1000;
        assert!(matches!(
            fixup(&m, &Env, &mut r, &mut s),
            Fixup::Unhandled(_)
        ));
    }

    #[test]
    fn fixup_unmapped_rip_page_faults() {
        let m = Mem::default();
        let (mut r, mut s) = flat32();
        r.rip = 0x5000;
        assert!(matches!(
            fixup(&m, &Env, &mut r, &mut s),
            Fixup::PageFault(_)
        ));
    }

    #[test]
    fn complete_stub_return_pops_return_address_and_sets_result() {
        let m = Mem::default();
        let (mut r, s) = flat32();
        r.rsp = 0x7000;
        r.rip = 0x5007;
        m.write(0x7000, &0x1234u32.to_le_bytes());
        complete_stub_return(&m, &mut r, &s, -38);
        assert_eq!((r.rip, r.rsp, r.rax), (0x1234, 0x7004, 0xffff_ffda));
        let mut s64 = s;
        s64.efer = EFER_LMA;
        s64.cs.l = 1;
        let mut r = kvm_regs {
            rsp: 0x7000,
            rip: 0x5007,
            ..Default::default()
        };
        m.write(0x7000, &0xffff_8000_0000_1234u64.to_le_bytes());
        complete_stub_return(&m, &mut r, &s64, -38);
        assert_eq!(
            (r.rip, r.rsp, r.rax as i64),
            (0xffff_8000_0000_1234, 0x7008, -38)
        );
    }

    #[test]
    fn complete_stub_return_unreadable_stack_leaves_ret_to_guest() {
        let m = Mem::default();
        let (mut r, s) = flat32();
        r.rsp = 0x9_0000;
        r.rip = 0x5007;
        complete_stub_return(&m, &mut r, &s, 5);
        assert_eq!((r.rip, r.rsp, r.rax), (0x5007, 0x9_0000, 5));
    }

    #[test]
    fn hypercall_args_32bit_convention_truncated() {
        let r = kvm_regs {
            rax: 0xffff_ffff_0000_0011,
            rbx: 1 << 40 | 5,
            rcx: 6,
            ..Default::default()
        };
        let (nr, a) = hypercall_args(&r, false);
        assert_eq!(nr, 0x11);
        assert_eq!(a[0], 5);
        assert_eq!(a[1], 6);
    }
}
