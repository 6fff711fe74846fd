//! Instruction coverage: which instruction forms of real guest kernels this
//! host's KVM fails to emulate, and whether xenkvm's fix-up handles them.
//!
//! On this project's host (`kvm_pvm`) guest kernel code runs in KVM's
//! instruction emulator, so every instruction a guest kernel executes must
//! be one the emulator knows; the others stop the guest with an emulation
//! failure, RIP at the instruction, and [`crate::arch::x86::fixup`] gets a chance.
//!
//! [`kernel_forms`] decodes the executable sections of a kernel ELF (or the
//! ELF inside a bzImage) with iced-x86 and collects each distinct form: the
//! iced [`Code`] in its code size, and whether an operand is in memory.
//! [`run_forms`] runs one instance of each form at CPL 0 in a throwaway VM
//! (long mode for 64-bit forms, flat 32-bit protected mode for the others):
//! memory operands are rewritten to `[rbx]` pointing at mapped scratch
//! memory, near branches to the next instruction, and scratch memory and
//! the stack hold the address of the next instruction (so `ret`, `jmp
//! [mem]` land there). After the instruction, `out 0x99` reports success; an
//! exception reaches an IDT handler that reports its vector. An emulation
//! failure (twice in a row, as the VMM retries once) is a host failure; the
//! form is then handed to [`crate::arch::x86::fixup`] and the VM resumed with its
//! result, to show whether xenkvm handles it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use goblin::elf::{section_header::SHF_EXECINSTR, Elf};
use iced_x86::{Code, Decoder, DecoderOptions, Encoder, Instruction, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86::{self, EmuEnv, Fixup};
use crate::kvm::probe::{new_vm, ProbeVm};

/// One instruction form: code size, iced `Code`, and whether one operand is
/// in memory (iced's `Code` names `r/m` forms once for both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FormKey {
    pub bits: u32,
    pub code: Code,
    pub mem: bool,
}

impl fmt::Display for FormKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?} {}",
            self.bits,
            self.code,
            if self.mem { "mem" } else { "reg" }
        )
    }
}

/// A form and the first instance found of it.
#[derive(Clone, Debug)]
pub struct Form {
    pub key: FormKey,
    pub example: Instruction,
}

fn has_memory_operand(i: &Instruction) -> bool {
    (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory)
}

/// The kernel ELF of `image`: the image itself, or the one inside a bzImage.
pub fn kernel_elf(image: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, String> {
    if crate::boot::bzimage::is_bzimage(image) {
        crate::boot::bzimage::extract_elf(image)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| e.to_string())
    } else {
        Ok(std::borrow::Cow::Borrowed(image))
    }
}

/// Decodes every executable section of the kernel ELF `elf` and adds each
/// distinct form to `forms`. The code size is 64 for x86-64 ELFs (XTF's
/// 64-bit kernels are ELF32 files with machine x86-64), else 32. Returns
/// how many instructions were decoded.
pub fn kernel_forms(elf: &[u8], forms: &mut BTreeMap<FormKey, Form>) -> Result<usize, String> {
    let e = Elf::parse(elf).map_err(|e| e.to_string())?;
    let bits = if e.header.e_machine == goblin::elf::header::EM_X86_64 {
        64
    } else {
        32
    };
    let mut count = 0;
    for sh in &e.section_headers {
        if sh.sh_flags & u64::from(SHF_EXECINSTR) == 0
            || sh.sh_type != goblin::elf::section_header::SHT_PROGBITS
        {
            continue;
        }
        let (off, size) = (sh.sh_offset as usize, sh.sh_size as usize);
        let Some(data) = off.checked_add(size).and_then(|end| elf.get(off..end)) else {
            continue;
        };
        let mut d = Decoder::with_ip(bits, data, sh.sh_addr, DecoderOptions::NONE);
        let mut i = Instruction::default();
        while d.can_decode() {
            d.decode_out(&mut i);
            if i.is_invalid() {
                continue;
            }
            count += 1;
            let key = FormKey {
                bits,
                code: i.code(),
                mem: has_memory_operand(&i),
            };
            forms.entry(key).or_insert(Form { key, example: i });
        }
    }
    Ok(count)
}

/// Guest layout of the coverage VM.
const CODE_END: u64 = 0x1100; // the instruction ends here, the marker starts
const PML4: u64 = 0x2000;
const GDT: u64 = 0x5000;
const IDT: u64 = 0x6000;
const HANDLERS: u64 = 0x7000; // 256 x 8 bytes: mov al, vec; out 0x90, al; hlt
const TSS: u64 = 0x8000;
const STACK_LO: u64 = 0x1_0000;
const STACK_TOP: u64 = 0x1_8000;
const STACK_HI: u64 = 0x2_0000;
const SCRATCH: u64 = 0x20_0000;
const SCRATCH_FILL: u64 = 0x1_0000; // filled either side of SCRATCH
const PORT_OK: u16 = 0x99;
const PORT_VEC: u16 = 0x90;
const MARKER: [u8; 3] = [0xe6, PORT_OK as u8, 0xf4];
/// Count register value: small, so `rep` forms and shifts stay in bounds.
const COUNT: u64 = 8;

/// How one instance of a form ended in the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It ran (natively or in KVM's emulator) and reached the next instruction.
    Ok,
    /// KVM delivered exception `vector` (the setup did not suit the form, or
    /// the CPU raises it: both mean the host handled it).
    Exception(u8),
    /// Another exit to the VMM (hlt, I/O, ...): KVM handled it.
    Exit(String),
    /// KVM failed to emulate it; `xenkvm` says what the fix-up then did.
    EmulationFailure { xenkvm: Box<Outcome> },
    /// xenkvm's fix-up refused it.
    Unhandled(String),
    /// The vCPU never exited (it was kicked out): `vmcall` and `vmmcall`
    /// never exit on this host; xenkvm's stall monitor handles them.
    NoExit,
    /// The probe itself went wrong (encode failure, ioctl error).
    ProbeError(String),
}

impl Outcome {
    pub fn host_failed(&self) -> bool {
        matches!(self, Outcome::EmulationFailure { .. })
    }
    /// For a host failure: xenkvm's fix-up handled it (the instance then
    /// ran on, or got the exception the CPU would raise).
    pub fn xenkvm_handled(&self) -> bool {
        match self {
            Outcome::EmulationFailure { xenkvm } => {
                matches!(**xenkvm, Outcome::Ok | Outcome::Exception(_))
            }
            _ => false,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => write!(f, "ok"),
            Outcome::Exception(v) => write!(f, "exception {v}"),
            Outcome::Exit(s) => write!(f, "exit {s}"),
            Outcome::EmulationFailure { xenkvm } => {
                write!(f, "KVM emulation failure; xenkvm: {xenkvm}")
            }
            Outcome::Unhandled(s) => write!(f, "not handled: {s}"),
            Outcome::NoExit => write!(f, "never exited (kicked out)"),
            Outcome::ProbeError(s) => write!(f, "probe error: {s}"),
        }
    }
}

/// The bytes of the instance of `f` that runs in the VM, ending at
/// `CODE_END`: memory operands become `[rbx]` (`[ebx]`), near branches
/// target `CODE_END`. Forms the encoder refuses run as found.
pub fn instance(f: &Form) -> Vec<u8> {
    let bits = f.key.bits;
    let mut i = f.example;
    let base = if bits == 64 {
        Register::RBX
    } else {
        Register::EBX
    };
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Memory => {
                let vsib = i.memory_index().is_vector_register();
                i.set_memory_base(base);
                if !vsib {
                    i.set_memory_index(Register::None);
                    i.set_memory_index_scale(1);
                }
                i.set_memory_displacement64(0);
                i.set_memory_displ_size(0);
            }
            OpKind::NearBranch64 => i.set_near_branch64(CODE_END),
            OpKind::NearBranch32 => i.set_near_branch32(CODE_END as u32),
            OpKind::NearBranch16 => i.set_near_branch16(CODE_END as u16),
            _ => {}
        }
    }
    let encode = |i: &Instruction, at: u64| -> Option<Vec<u8>> {
        let mut e = Encoder::new(bits);
        e.encode(i, at).ok()?;
        Some(e.take_buffer())
    };
    // Encode once for the length, then again at the final address (branch
    // displacements depend on it).
    let Some(first) = encode(&i, CODE_END - 15) else {
        return raw_bytes(f);
    };
    let at = CODE_END - first.len() as u64;
    match encode(&i, at) {
        Some(b) if b.len() == first.len() => b,
        _ => raw_bytes(f),
    }
}

/// Re-encodes the example as found (its original address).
fn raw_bytes(f: &Form) -> Vec<u8> {
    let mut e = Encoder::new(f.key.bits);
    match e.encode(&f.example, f.example.ip()) {
        Ok(_) => e.take_buffer(),
        Err(_) => Vec::new(),
    }
}

/// Host services for fix-ups in the coverage VM.
struct ProbeEnv<'a>(&'a VcpuFd);

impl EmuEnv for ProbeEnv<'_> {
    fn fpu(&self) -> Option<kvm_bindings::kvm_fpu> {
        super::vcpu::fpu_state(self.0)
    }
    fn set_fpu(&self, f: &kvm_bindings::kvm_fpu) -> bool {
        super::vcpu::set_fpu_state(self.0, f)
    }
    fn rdtsc(&self) -> u64 {
        crate::xen::clock::host_tsc()
    }
    fn tsc_aux(&self) -> u64 {
        read_msr(self.0, 0xc000_0103).unwrap_or(0)
    }
    fn xcr0(&self) -> u64 {
        self.0
            .get_xcrs()
            .ok()
            .and_then(|x| {
                x.xcrs
                    .iter()
                    .take(x.nr_xcrs as usize)
                    .find(|x| x.xcr == 0)
                    .map(|x| x.value)
            })
            .unwrap_or(1)
    }
    fn fpu_status(&self) -> u16 {
        self.fpu().map(|f| f.fsw).unwrap_or(0)
    }
    fn mxcsr(&self) -> u32 {
        self.fpu().map(|f| f.mxcsr).unwrap_or(0x1f80)
    }
    fn set_mxcsr(&self, v: u32) -> bool {
        match self.fpu() {
            Some(mut f) => {
                f.mxcsr = v;
                self.set_fpu(&f)
            }
            None => false,
        }
    }
    fn xmm(&self, n: usize) -> Option<[u8; 16]> {
        self.fpu().and_then(|f| f.xmm.get(n).copied())
    }
    fn set_xmm(&self, n: usize, v: [u8; 16]) -> bool {
        match self.fpu() {
            Some(mut f) if n < f.xmm.len() => {
                f.xmm[n] = v;
                self.set_fpu(&f)
            }
            _ => false,
        }
    }
    fn xsave_area(&self) -> Option<Vec<u8>> {
        super::vcpu::xsave_bytes(self.0)
    }
    fn set_xsave_area(&self, area: &[u8]) -> bool {
        super::vcpu::set_xsave_bytes(self.0, area)
    }
    fn xss(&self) -> u64 {
        super::vcpu::xss(self.0)
    }
    fn xstate_layout(&self) -> x86::xsave::XstateLayout {
        super::vcpu::xstate_layout()
    }
    fn flush_guest_tlb(&self) -> bool {
        super::vcpu::flush_guest_tlb(self.0)
    }
}

fn read_msr(fd: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    (fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
}

/// Applies a fix-up to the vCPU the way the VMM's vCPU loop does.
pub fn apply_fixup(
    fd: &VcpuFd,
    fix: &Fixup,
    regs: &kvm_regs,
    sregs: &mut kvm_sregs,
) -> Result<(), String> {
    let inject = |f: &dyn Fn(&mut kvm_bindings::kvm_vcpu_events)| -> Result<(), String> {
        let mut ev = fd.get_vcpu_events().map_err(|e| e.to_string())?;
        f(&mut ev);
        fd.set_vcpu_events(&ev).map_err(|e| e.to_string())
    };
    match fix {
        Fixup::Resume => {}
        Fixup::Exception { vector, error_code } => inject(&|ev| {
            ev.exception.injected = 1;
            ev.exception.nr = *vector;
            ev.exception.has_error_code = u8::from(error_code.is_some());
            ev.exception.error_code = error_code.unwrap_or(0);
        })?,
        Fixup::SoftInt { vector } => inject(&|ev| {
            ev.interrupt.injected = 1;
            ev.interrupt.nr = *vector;
            ev.interrupt.soft = 1;
        })?,
        Fixup::PageFault(pf) => {
            sregs.cr2 = pf.linear;
            inject(&|ev| {
                ev.exception.injected = 1;
                ev.exception.nr = x86::PF;
                ev.exception.has_error_code = 1;
                ev.exception.error_code = pf.error_code;
            })?
        }
        Fixup::Unhandled(s) => return Err(s.clone()),
    }
    fd.set_regs(regs).map_err(|e| e.to_string())?;
    fd.set_sregs(sregs).map_err(|e| e.to_string())
}

/// The coverage VM and its initial state per code size.
struct CovVm {
    p: ProbeVm,
    sregs64: kvm_sregs,
    sregs32: kvm_sregs,
    xcr0: u64,
}

fn e<E: fmt::Display>(x: E) -> String {
    x.to_string()
}

/// CR4 bits the forms may need: OSFXSR, OSXMMEXCPT, and OSXSAVE and
/// FSGSBASE when the CPU has them (as Linux sets them).
fn cr4_bits(cpuid: &kvm_bindings::CpuId) -> u64 {
    let leaf = |l: u32| {
        cpuid
            .as_slice()
            .iter()
            .find(|c| c.function == l && c.index == 0)
            .copied()
    };
    let mut cr4 = (1 << 9) | (1 << 10);
    let xsave_states = cpuid
        .as_slice()
        .iter()
        .any(|c| c.function == 0xd && c.index == 0 && c.eax & 4 != 0);
    if xsave_states || leaf(1).is_some_and(|c| c.ecx & (1 << 26) != 0) {
        cr4 |= 1 << 18;
    }
    if leaf(7).is_some_and(|c| c.ebx & 1 != 0) {
        cr4 |= 1 << 16;
    }
    cr4
}

impl CovVm {
    fn new() -> Result<CovVm, String> {
        let p = new_vm()?;
        let kvm = kvm_ioctls::Kvm::new().map_err(e)?;
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(e)?;
        let cr4 = cr4_bits(&cpuid);
        // XCR0: the legacy, AVX and AVX-512 states the host offers.
        let xcr0 = cpuid
            .as_slice()
            .iter()
            .find(|c| c.function == 0xd && c.index == 0)
            .map(|c| u64::from(c.eax) & 0xe7)
            .unwrap_or(3)
            | 3;
        let w = |v: u64, at: u64| p.mem.write_obj(v, GuestAddress(at)).map_err(e);
        // Identity map of the 4 MiB with two 2 MiB pages.
        w(0x3000 | 3, PML4)?;
        w(0x4000 | 3, 0x3000)?;
        w(0x83, 0x4000)?;
        w(0x20_0000 | 0x83, 0x4008)?;
        // GDT: 0x08 code64, 0x10 data, 0x18 code32.
        w(0x00af_9b00_0000_ffff, GDT + 8)?;
        w(0x00cf_9300_0000_ffff, GDT + 0x10)?;
        w(0x00cf_9b00_0000_ffff, GDT + 0x18)?;
        // Handlers report their vector in AL on PORT_VEC.
        for v in 0..256u64 {
            p.mem
                .write_slice(
                    &[0xb0, v as u8, 0xe6, PORT_VEC as u8, 0xf4],
                    GuestAddress(HANDLERS + v * 8),
                )
                .map_err(e)?;
        }
        // TSS: RSP0.
        w(STACK_TOP << 32, TSS)?;
        let base = p.vcpu.get_sregs().map_err(e)?;
        let tr = kvm_segment {
            base: TSS,
            limit: 0x67,
            type_: 0xb,
            present: 1,
            selector: 0x28,
            ..Default::default()
        };
        let mut s64 = base;
        s64.cs = x86::flat_segment(0x08, 0xb, 0, true);
        for d in [
            &mut s64.ds,
            &mut s64.es,
            &mut s64.fs,
            &mut s64.gs,
            &mut s64.ss,
        ] {
            *d = x86::flat_segment(0x10, 0x3, 0, true);
        }
        s64.tr = tr;
        s64.gdt.base = GDT;
        s64.gdt.limit = 0x27;
        s64.idt.base = IDT;
        s64.idt.limit = 256 * 16 - 1;
        s64.cr0 = 0x8000_0033;
        s64.cr3 = PML4;
        s64.cr4 = 0x20 | cr4;
        s64.efer = 0xd01;
        let mut s32 = s64;
        s32.cs = x86::flat_segment(0x18, 0xb, 0, false);
        for d in [
            &mut s32.ds,
            &mut s32.es,
            &mut s32.fs,
            &mut s32.gs,
            &mut s32.ss,
        ] {
            *d = x86::flat_segment(0x10, 0x3, 0, false);
        }
        s32.idt.limit = 256 * 8 - 1;
        s32.cr0 = 0x33;
        s32.cr3 = 0;
        s32.cr4 = cr4;
        s32.efer = 0;
        Ok(CovVm {
            p,
            sregs64: s64,
            sregs32: s32,
            xcr0,
        })
    }

    /// Writes the IDT for `bits` and the per-run memory: code, marker,
    /// stack and scratch filled with `CODE_END`.
    fn prepare(&self, bits: u32, code: &[u8]) -> Result<(), String> {
        let mem = &self.p.mem;
        for v in 0..256u64 {
            let h = HANDLERS + v * 8;
            let sel = if bits == 64 { 0x08 } else { 0x18 };
            let lo = (h & 0xffff) | (sel << 16) | (0x8eu64 << 40) | ((h >> 16 & 0xffff) << 48);
            if bits == 64 {
                mem.write_obj(lo, GuestAddress(IDT + v * 16)).map_err(e)?;
                mem.write_obj(h >> 32, GuestAddress(IDT + v * 16 + 8))
                    .map_err(e)?;
            } else {
                mem.write_obj(lo, GuestAddress(IDT + v * 8)).map_err(e)?;
            }
        }
        let mut page = vec![0xf4u8; 0x1000];
        let end = (CODE_END - 0x1000) as usize;
        page[end - code.len()..end].copy_from_slice(code);
        page[end..end + MARKER.len()].copy_from_slice(&MARKER);
        mem.write_slice(&page, GuestAddress(0x1000)).map_err(e)?;
        let fill: Vec<u8> = std::iter::repeat_n(CODE_END.to_le_bytes(), 0x4000)
            .flatten()
            .collect();
        mem.write_slice(
            &fill[..(STACK_HI - STACK_LO) as usize],
            GuestAddress(STACK_LO),
        )
        .map_err(e)?;
        mem.write_slice(&fill, GuestAddress(SCRATCH - SCRATCH_FILL))
            .map_err(e)?;
        Ok(())
    }

    fn set_state(&self, bits: u32, len: usize) -> Result<(), String> {
        let fd = &self.p.vcpu;
        let s = if bits == 64 {
            self.sregs64
        } else {
            self.sregs32
        };
        fd.set_sregs(&s).map_err(e)?;
        let mut xcrs = kvm_bindings::kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = self.xcr0;
        if let Err(er) = fd.set_xcrs(&xcrs) {
            tracing::debug!(%er, xcr0 = self.xcr0, "coverage VM: cannot set XCR0");
        }
        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(e)?;
        let _ = fd.set_debug_regs(&kvm_bindings::kvm_debugregs {
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            ..Default::default()
        });
        let ev = kvm_bindings::kvm_vcpu_events::default();
        let _ = fd.set_vcpu_events(&ev);
        let r = kvm_regs {
            rax: CODE_END,
            rbx: SCRATCH,
            rcx: COUNT,
            rdx: CODE_END,
            rsi: SCRATCH,
            rdi: SCRATCH,
            rsp: STACK_TOP,
            rbp: STACK_TOP,
            r8: CODE_END,
            r9: CODE_END,
            r10: CODE_END,
            r11: CODE_END,
            r12: CODE_END,
            r13: CODE_END,
            r14: CODE_END,
            r15: CODE_END,
            rip: CODE_END - len as u64,
            rflags: 2,
        };
        fd.set_regs(&r).map_err(e)
    }
}

/// One KVM_RUN, as an outcome; `None` for an emulation failure.
fn run_once(fd: &mut VcpuFd) -> Result<Option<Outcome>, Outcome> {
    let exit = match fd.run() {
        Ok(VcpuExit::IoOut(port, _)) => Ok(port),
        Ok(VcpuExit::InternalError) => return Ok(None),
        Ok(VcpuExit::Hlt) => Err("hlt".to_string()),
        Ok(VcpuExit::Shutdown) => Err("triple fault".to_string()),
        Ok(x) => Err(format!("{x:?}")),
        Err(er) if er.errno() == libc::EINTR => return Err(Outcome::NoExit),
        Err(er) => return Err(Outcome::ProbeError(er.to_string())),
    };
    let r = fd
        .get_regs()
        .map_err(|er| Outcome::ProbeError(er.to_string()))?;
    Ok(Some(match exit {
        Ok(PORT_OK) if r.rip == CODE_END + 2 => Outcome::Ok,
        Ok(PORT_VEC) if (HANDLERS..HANDLERS + 0x800).contains(&r.rip) => {
            Outcome::Exception(r.rax as u8)
        }
        Ok(port) => Outcome::Exit(format!("out {port:#x}")),
        Err(s) => Outcome::Exit(s),
    }))
}

/// Runs one instance in the VM.
fn run_one(vm: &mut CovVm, f: &Form, code: &[u8]) -> Outcome {
    if code.is_empty() {
        return Outcome::ProbeError("cannot encode an instance".into());
    }
    let bits = f.key.bits;
    if let Err(s) = vm
        .prepare(bits, code)
        .and_then(|_| vm.set_state(bits, code.len()))
    {
        return Outcome::ProbeError(s);
    }
    let start = CODE_END - code.len() as u64;
    let fd = &mut vm.p.vcpu;
    let mut failures = 0;
    loop {
        match run_once(fd) {
            Ok(Some(o)) => return o,
            Err(o) => return o,
            Ok(None) => {}
        }
        let (regs, sregs) = match (fd.get_regs(), fd.get_sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            _ => return Outcome::ProbeError("cannot read registers".into()),
        };
        if regs.rip != start {
            return Outcome::Exit(format!("emulation failure at {:#x}", regs.rip));
        }
        failures += 1;
        // The VMM retries an emulation failure once (KVM sometimes fails
        // on what it can run); a host failure is one that repeats.
        if failures < 2 {
            continue;
        }
        let (mut regs, mut sregs) = (regs, sregs);
        tracing::trace!(
            cr4 = format_args!("{:#x}", sregs.cr4),
            xcr0 = format_args!("{:#x}", ProbeEnv(&*fd).xcr0()),
            "coverage: emulation failure"
        );
        let fix = x86::fixup(&vm.p.mem, &ProbeEnv(&*fd), &mut regs, &mut sregs);
        let xenkvm = match apply_fixup(fd, &fix, &regs, &mut sregs) {
            Err(s) => Outcome::Unhandled(s),
            Ok(()) => match run_once(fd) {
                Ok(Some(o)) => o,
                Ok(None) => Outcome::Unhandled("KVM failed again after the fix-up".into()),
                Err(o) => o,
            },
        };
        return Outcome::EmulationFailure {
            xenkvm: Box::new(xenkvm),
        };
    }
}

/// The result for one form.
#[derive(Clone, Debug)]
pub struct FormResult {
    pub key: FormKey,
    pub bytes: Vec<u8>,
    pub outcome: Outcome,
}

/// Runs every form in throwaway VMs (a fresh VM after any outcome that may
/// leave state behind), on the calling thread. A one-shot timer on the
/// thread kicks a run that does not exit within [`FORM_LIMIT`].
pub fn run_forms(forms: &[Form]) -> Result<Vec<FormResult>, String> {
    super::install_kick_handler();
    let kick = super::ThreadKick::monotonic().map_err(e)?;
    let mut vm = CovVm::new()?;
    let mut out = Vec::with_capacity(forms.len());
    for f in forms {
        let bytes = instance(f);
        kick.arm(FORM_LIMIT).map_err(e)?;
        let outcome = run_one(&mut vm, f, &bytes);
        kick.disarm().map_err(e)?;
        let fresh = !matches!(
            outcome,
            Outcome::Ok | Outcome::Exception(_) | Outcome::EmulationFailure { .. }
        );
        tracing::debug!(form = %f.key, %outcome, "coverage");
        out.push(FormResult {
            key: f.key,
            bytes,
            outcome,
        });
        if fresh {
            vm = CovVm::new()?;
        }
    }
    Ok(out)
}

/// How long one form may run before it is kicked out of `KVM_RUN`.
const FORM_LIMIT: Duration = Duration::from_secs(2);

/// The tally the probe prints.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub forms: usize,
    pub ok: usize,
    pub exceptions: usize,
    pub exits: usize,
    pub no_exit: usize,
    pub host_failures: usize,
    pub xenkvm_handled: usize,
    pub probe_errors: usize,
}

pub fn tally(results: &[FormResult]) -> Tally {
    let mut t = Tally {
        forms: results.len(),
        ..Default::default()
    };
    for r in results {
        match &r.outcome {
            Outcome::Ok => t.ok += 1,
            Outcome::Exception(_) => t.exceptions += 1,
            Outcome::Exit(_) => t.exits += 1,
            Outcome::NoExit => t.no_exit += 1,
            Outcome::EmulationFailure { .. } => {
                t.host_failures += 1;
                if r.outcome.xenkvm_handled() {
                    t.xenkvm_handled += 1;
                }
            }
            Outcome::Unhandled(_) | Outcome::ProbeError(_) => t.probe_errors += 1,
        }
    }
    t
}

/// One line of the checked-in list of host failures: `bits Code reg|mem hex`.
pub fn list_line(r: &FormResult) -> String {
    let hex: String = r.bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{} {hex}", r.key)
}

/// Parses a line written by [`list_line`]: the form and the instance bytes.
pub fn parse_list_line(line: &str) -> Option<(u32, String, bool, Vec<u8>)> {
    let mut it = line.split_whitespace();
    let bits = it.next()?.parse().ok()?;
    let code = it.next()?.to_string();
    let mem = match it.next()? {
        "mem" => true,
        "reg" => false,
        _ => return None,
    };
    let hex = it.next()?;
    if hex.len() % 2 != 0 || hex.len() > 30 {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((bits, code, mem, bytes))
}

/// Forms decoded from one input (a kernel file, or a directory of them).
#[derive(Clone, Debug)]
pub struct Group {
    pub name: String,
    pub kernels: usize,
    pub instructions: usize,
    pub forms: usize,
}

/// What `xenkvm probe --coverage` prints.
#[derive(Clone, Debug)]
pub struct Report {
    pub groups: Vec<Group>,
    pub results: Vec<FormResult>,
    pub tally: Tally,
}

/// The inputs used when none are given: the Debian kernel and the XTF
/// kernels under `$XENKVM_SHARED` or `../shared`.
pub fn default_inputs() -> Vec<std::path::PathBuf> {
    let shared = std::env::var_os("XENKVM_SHARED")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "../shared".into());
    vec![
        shared.join("guests/linux/vmlinuz"),
        shared.join("guests/xtf"),
    ]
}

/// Decodes the kernels at `inputs` (files, or directories whose ELF and
/// bzImage files are read) into their distinct forms.
pub fn collect(
    inputs: &[std::path::PathBuf],
) -> Result<(Vec<Group>, BTreeMap<FormKey, Form>), String> {
    let mut all = BTreeMap::new();
    let mut groups = Vec::new();
    for p in inputs {
        let files: Vec<std::path::PathBuf> = if p.is_dir() {
            let mut v: Vec<_> = std::fs::read_dir(p)
                .map_err(|er| format!("{}: {er}", p.display()))?
                .filter_map(|d| d.ok().map(|d| d.path()))
                .filter(|f| f.is_file())
                .collect();
            v.sort();
            v
        } else {
            vec![p.clone()]
        };
        let mut mine = BTreeMap::new();
        let (mut kernels, mut instructions) = (0, 0);
        for f in files {
            let image = std::fs::read(&f).map_err(|er| format!("{}: {er}", f.display()))?;
            if !crate::boot::is_elf(&image) && !crate::boot::bzimage::is_bzimage(&image) {
                continue;
            }
            let elf = kernel_elf(&image).map_err(|er| format!("{}: {er}", f.display()))?;
            instructions +=
                kernel_forms(&elf, &mut mine).map_err(|er| format!("{}: {er}", f.display()))?;
            kernels += 1;
        }
        groups.push(Group {
            name: p.display().to_string(),
            kernels,
            instructions,
            forms: mine.len(),
        });
        all.extend(mine);
    }
    Ok((groups, all))
}

/// Decodes `inputs` and runs every form.
pub fn report(inputs: &[std::path::PathBuf]) -> Result<Report, String> {
    let (groups, forms) = collect(inputs)?;
    let forms: Vec<Form> = forms.into_values().collect();
    let results = run_forms(&forms)?;
    let tally = tally(&results);
    Ok(Report {
        groups,
        results,
        tally,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "instruction forms (iced Code and code size, register or memory operand) in executable sections:"
        )?;
        for g in &self.groups {
            writeln!(
                f,
                "  {}: {} kernel(s), {} instructions, {} distinct forms",
                g.name, g.kernels, g.instructions, g.forms
            )?;
        }
        let t = &self.tally;
        writeln!(f, "  all inputs: {} distinct forms", t.forms)?;
        writeln!(
            f,
            "run at CPL 0 in throwaway VMs: {} ran, {} raised an exception, {} exited to the VMM, {} never exited, {} probe errors",
            t.ok, t.exceptions, t.exits, t.no_exit, t.probe_errors
        )?;
        writeln!(
            f,
            "this host's KVM fails to emulate {} forms; xenkvm handles {} of them",
            t.host_failures, t.xenkvm_handled
        )?;
        for r in self.results.iter().filter(|r| r.outcome.host_failed()) {
            writeln!(f, "  {:<40} {}", r.key.to_string(), r.outcome)?;
        }
        for r in self.results.iter().filter(|r| {
            matches!(
                r.outcome,
                Outcome::Unhandled(_) | Outcome::NoExit | Outcome::ProbeError(_)
            )
        }) {
            writeln!(f, "  {:<40} {}", r.key.to_string(), r.outcome)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm_available(test: &str) -> bool {
        let ok = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if !ok {
            assert_ne!(
                std::env::var("REQUIRE_KVM").as_deref(),
                Ok("1"),
                "{test}: /dev/kvm is not usable and REQUIRE_KVM=1"
            );
            eprintln!("SKIPPED {test}: /dev/kvm is not usable");
        }
        ok
    }

    #[test]
    fn instance_memory_operand_rewritten_to_rbx_and_branch_to_next() {
        let mut forms = BTreeMap::new();
        // mov rax, [rip+0x1000]; jne +0x20; lsl eax, [r12+r13*8+4] (as decoded).
        let bytes = [
            0x48, 0x8b, 0x05, 0x00, 0x10, 0x00, 0x00, 0x75, 0x20, 0x43, 0x0f, 0x03, 0x44, 0xec,
            0x04,
        ];
        let mut d = Decoder::with_ip(64, &bytes, 0xffff_ffff_8100_0000, DecoderOptions::NONE);
        for i in &mut d {
            let key = FormKey {
                bits: 64,
                code: i.code(),
                mem: has_memory_operand(&i),
            };
            forms.insert(key, Form { key, example: i });
        }
        let run_at = |b: &[u8]| {
            let mut d = Decoder::with_ip(64, b, CODE_END - b.len() as u64, DecoderOptions::NONE);
            d.decode()
        };
        for f in forms.values() {
            let b = instance(f);
            let i = run_at(&b);
            assert_eq!(i.code(), f.key.code);
            if f.key.mem {
                assert_eq!(i.memory_base(), Register::RBX);
                assert_eq!(i.memory_index(), Register::None);
                assert_eq!(i.memory_displacement64(), 0);
            } else {
                assert_eq!(i.near_branch_target(), CODE_END);
            }
        }
    }

    #[test]
    fn parse_list_line_round_trip_and_garbage_refused() {
        let r = FormResult {
            key: FormKey {
                bits: 64,
                code: Code::Lsl_r64_r64m16,
                mem: false,
            },
            bytes: vec![0x48, 0x0f, 0x03, 0xc0],
            outcome: Outcome::Ok,
        };
        let (bits, code, mem, bytes) = parse_list_line(&list_line(&r)).unwrap();
        assert_eq!((bits, code.as_str(), mem), (64, "Lsl_r64_r64m16", false));
        assert_eq!(bytes, r.bytes);
        for bad in [
            "",
            "64",
            "64 X mem",
            "64 X foo 00",
            "64 X reg 0",
            "64 X reg zz",
        ] {
            assert!(parse_list_line(bad).is_none(), "{bad:?}");
        }
    }

    /// Runs `code` (ending at CODE_END) with `data` at SCRATCH, fixing up
    /// emulation failures as the VMM does; returns the 16 bytes the guest
    /// left at SCRATCH + 32 and how many fix-ups ran.
    fn run_with_fixups(code: &[u8], data: &[u32]) -> ([u32; 4], u32) {
        let mut vm = CovVm::new().unwrap();
        vm.prepare(64, code).unwrap();
        vm.set_state(64, code.len()).unwrap();
        let words: Vec<u8> = data.iter().flat_map(|w| w.to_le_bytes()).collect();
        vm.p.mem.write_slice(&words, GuestAddress(SCRATCH)).unwrap();
        let fd = &mut vm.p.vcpu;
        let mut fixups = 0;
        loop {
            match fd.run() {
                Ok(VcpuExit::IoOut(port, _)) => {
                    assert_eq!(port, PORT_OK, "the guest took an exception");
                    break;
                }
                Ok(VcpuExit::InternalError) => {
                    let (mut r, mut s) = (fd.get_regs().unwrap(), fd.get_sregs().unwrap());
                    let fix = x86::fixup(&vm.p.mem, &ProbeEnv(&*fd), &mut r, &mut s);
                    assert!(!matches!(fix, Fixup::Unhandled(_)), "{fix:?}");
                    apply_fixup(fd, &fix, &r, &mut s).unwrap();
                    fixups += 1;
                    assert!(fixups < 10, "fix-ups do not make progress");
                }
                Ok(e) => panic!("unexpected exit {e:?}"),
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => panic!("KVM_RUN: {e}"),
            }
        }
        let mut out = [0u8; 16];
        vm.p.mem
            .read_slice(&mut out, GuestAddress(SCRATCH + 32))
            .unwrap();
        let mut w = [0u32; 4];
        for (i, c) in out.chunks(4).enumerate() {
            w[i] = u32::from_le_bytes(c.try_into().unwrap());
        }
        (w, fixups)
    }

    /// An SSE fix-up's result reaches the real XMM register: the guest
    /// loads xmm0/xmm1 (KVM emulates movdqu), `paddd` fails and is fixed
    /// up through the vCPU's FPU state, and the guest's next `movdqu` stores
    /// the sum.
    #[test]
    fn sse_fixup_result_visible_to_following_guest_instructions() {
        if !kvm_available("sse_fixup_result_visible_to_following_guest_instructions") {
            return;
        }
        let code = [
            0xf3, 0x0f, 0x6f, 0x03, // movdqu xmm0, [rbx]
            0xf3, 0x0f, 0x6f, 0x4b, 0x10, // movdqu xmm1, [rbx+16]
            0x66, 0x0f, 0xfe, 0xc1, // paddd xmm0, xmm1
            0xf3, 0x0f, 0x7f, 0x43, 0x20, // movdqu [rbx+32], xmm0
        ];
        let (got, fixups) = run_with_fixups(&code, &[1, 2, 3, 4, 10, 20, 30, 40]);
        assert_eq!(got, [11, 22, 33, 44]);
        assert!(fixups >= 1, "paddd did not go through the fix-up");
    }

    /// The same from SSE's initial state (every XMM register zero, as after
    /// a fresh vCPU): the fix-up's write must not be lost to the XSAVE
    /// init optimisation.
    #[test]
    fn sse_fixup_from_initial_state_visible_to_guest() {
        if !kvm_available("sse_fixup_from_initial_state_visible_to_guest") {
            return;
        }
        let code = [
            0x66, 0x0f, 0xfe, 0x03, // paddd xmm0, [rbx]
            0xf3, 0x0f, 0x7f, 0x43, 0x20, // movdqu [rbx+32], xmm0
        ];
        let (got, fixups) = run_with_fixups(&code, &[5, 6, 7, 8]);
        assert_eq!(got, [5, 6, 7, 8]);
        assert!(fixups >= 1, "paddd did not go through the fix-up");
    }

    /// KVM_NMI delivered to a vCPU running a kernel-mode loop: the NMI
    /// handler reads the CPU number with `lsl` as Linux's paranoid entry
    /// does (an emulation failure on this host, fixed up as the VMM does),
    /// returns with iretq, and the loop keeps running.
    #[test]
    fn nmi_during_kernel_loop_handler_lsl_fixed_up_guest_keeps_running() {
        if !kvm_available("nmi_during_kernel_loop_handler_lsl_fixed_up_guest_keeps_running") {
            return;
        }
        const MAIN: u64 = 0xa000;
        const NMI_HANDLER: u64 = 0xb000;
        let mut vm = CovVm::new().unwrap();
        vm.prepare(64, &[0x90]).unwrap();
        vm.set_state(64, 1).unwrap();
        let mem = &vm.p.mem;
        // The loop: inc r12; out 0x98, al; jmp back.
        mem.write_slice(
            &[0x49, 0xff, 0xc4, 0xe6, 0x98, 0xeb, 0xf9],
            GuestAddress(MAIN),
        )
        .unwrap();
        // NMI handler: mov eax, 0x7b; lsl eax, eax; mov r13, rax;
        // out 0x97, al; iretq.
        mem.write_slice(
            &[
                0xb8, 0x7b, 0, 0, 0, 0x0f, 0x03, 0xc0, 0x49, 0x89, 0xc5, 0xe6, 0x97, 0x48, 0xcf,
            ],
            GuestAddress(NMI_HANDLER),
        )
        .unwrap();
        let gate = (NMI_HANDLER & 0xffff) | (0x08 << 16) | (0x8eu64 << 40);
        mem.write_obj(gate, GuestAddress(IDT + 2 * 16)).unwrap();
        mem.write_obj(0u64, GuestAddress(IDT + 2 * 16 + 8)).unwrap();
        // GDT entry 15: Linux's CPUNODE segment, limit = node << 12 | cpu.
        mem.write_obj(0x0040_f500_0000_1003u64, GuestAddress(GDT + 15 * 8))
            .unwrap();
        let fd = &mut vm.p.vcpu;
        let mut s = fd.get_sregs().unwrap();
        s.gdt.limit = 16 * 8 - 1;
        fd.set_sregs(&s).unwrap();
        let mut r = fd.get_regs().unwrap();
        r.rip = MAIN;
        r.r12 = 0;
        fd.set_regs(&r).unwrap();
        let (mut loops, mut nmi_seen, mut fixups) = (0u32, false, 0u32);
        while loops < 50 {
            let port = match fd.run() {
                Ok(VcpuExit::IoOut(port, _)) => port,
                Ok(VcpuExit::InternalError) => {
                    let (mut r, mut s) = (fd.get_regs().unwrap(), fd.get_sregs().unwrap());
                    let fix = x86::fixup(&vm.p.mem, &ProbeEnv(&*fd), &mut r, &mut s);
                    assert!(!matches!(fix, Fixup::Unhandled(_)), "{fix:?}");
                    apply_fixup(fd, &fix, &r, &mut s).unwrap();
                    fixups += 1;
                    continue;
                }
                Ok(e) => panic!("unexpected exit {e:?}"),
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => panic!("KVM_RUN: {e}"),
            };
            match port {
                0x98 => {
                    loops += 1;
                    if loops == 5 {
                        fd.nmi().unwrap();
                    }
                }
                0x97 => nmi_seen = true,
                p => panic!("the guest reported on port {p:#x} (an exception)"),
            }
        }
        let r = fd.get_regs().unwrap();
        assert!(nmi_seen, "the NMI handler did not run");
        assert_eq!(r.r13, 0x1003, "lsl in the NMI handler read the wrong limit");
        assert_eq!(r.r12, 50, "the loop did not go on after the NMI");
        assert!((MAIN..MAIN + 7).contains(&r.rip));
        eprintln!("NMI handled; {fixups} emulation-failure fix-ups");
    }
}

#[cfg(test)]
mod kvm_tests;
