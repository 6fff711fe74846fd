//! Host probe: runs a few instructions in throwaway VMs to learn what this
//! host's KVM cannot do, so that tests and users know exactly which guest
//! features are missing here (and which xenkvm fixes up).
//!
//! Each probe builds a tiny guest (page tables, descriptor tables and code
//! assembled with iced-x86), runs it, and classifies the exit:
//! - legacy 32-bit paging (PAE, PSE): enabling CR0.PG outside long mode;
//! - `int n` at CPL 3 in long mode;
//! - `int3` at CPL 0 and a 32-bit `iret` (emulation failures xenkvm fixes up).

use std::fmt;

use iced_x86::code_asm::*;
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
#[cfg(test)]
mod syscall_linux;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// How the host handles a feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// KVM runs it.
    Native,
    /// KVM gets it wrong (an emulation failure, a missed privilege switch)
    /// and xenkvm fixes it up.
    FixedUp,
    /// Neither KVM nor any VMM can run it here; the string says what happens.
    Unsupported(String),
    /// The probe itself failed (no /dev/kvm, ...).
    Unknown(String),
}

impl Support {
    pub fn works(&self) -> bool {
        matches!(self, Support::Native | Support::FixedUp)
    }
}

impl fmt::Display for Support {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Support::Native => write!(f, "native"),
            Support::FixedUp => write!(f, "fixed up by xenkvm"),
            Support::Unsupported(s) => write!(f, "NOT SUPPORTED on this host: {s}"),
            Support::Unknown(s) => write!(f, "unknown: {s}"),
        }
    }
}

/// What the probe found.
#[derive(Debug, Clone)]
pub struct HostProbe {
    pub legacy_pae_paging: Support,
    pub legacy_pse_paging: Support,
    pub user_int_n_long_mode: Support,
    pub user_int_n_prot32: Support,
    pub kernel_int3: Support,
    pub iret32: Support,
    pub user_syscall: Support,
    /// SSSE3 (`pshufb`) in kernel mode: Linux needs `clearcpuid=137` where
    /// it fails.
    pub kernel_ssse3: Support,
    /// `xsave` in kernel mode: Linux needs `noxsave` where it fails.
    pub kernel_xsave: Support,
    /// Virtual-8086 mode (EFLAGS.VM in protected mode): what a hardware
    /// task switch to a vm86 task (XTF `xsa-192`) needs.
    pub vm86: Support,
    /// A non-canonical memory access through an explicit `%ss:` override
    /// (base register not RSP/RBP) at CPL 3 in 64-bit mode: the override is
    /// ignored there, so the CPU raises #GP, not #SS (XTF `memop-seg`).
    pub user_ss_override_noncanonical: Support,
    /// `int3` at CPL 3 through a DPL-0 gate: #GP(3*8+2) on a CPU (XTF
    /// `swint-emulation`).
    pub user_int3_gate_dpl: Support,
    /// `icebp` at CPL 3 through a not-present gate: #NP(1*8+2+EXT) on a CPU
    /// (XTF `swint-emulation`).
    pub not_present_gate: Support,
}

/// `KVM_CAP_XEN_HVM` of this host's KVM (0: no in-kernel Xen support; -1: no /dev/kvm).
pub fn xen_hvm_cap() -> i32 {
    match kvm_ioctls::Kvm::new() {
        Ok(k) => k.check_extension_int(kvm_ioctls::Cap::XenHvm),
        Err(_) => -1,
    }
}

impl HostProbe {
    /// Runs every probe (a few milliseconds).
    pub fn run() -> HostProbe {
        HostProbe {
            legacy_pae_paging: probe_legacy_paging(true),
            legacy_pse_paging: probe_legacy_paging(false),
            user_int_n_long_mode: probe_user_int_n(),
            user_int_n_prot32: probe_user_int_n_prot32(),
            kernel_int3: probe_kernel_int3(),
            iret32: probe_iret32(),
            user_syscall: probe_user_syscall(),
            kernel_ssse3: probe_kernel_insn(false),
            kernel_xsave: probe_kernel_insn(true),
            vm86: probe_vm86(),
            user_ss_override_noncanonical: probe_ss_override(),
            user_int3_gate_dpl: probe_user_swint(&[0xcc, 0xf4], 3, false, 13),
            not_present_gate: probe_user_swint(&[0xf1, 0xf4], 1, true, 11),
        }
    }

    /// The probe results, once per process.
    pub fn get() -> &'static HostProbe {
        static P: std::sync::OnceLock<HostProbe> = std::sync::OnceLock::new();
        P.get_or_init(HostProbe::run)
    }

    /// True where `int n` at CPL 3 raises #UD on this host and xenkvm's
    /// #UD-handler trap delivers it ([`crate::arch::x86::cpl3`]); the VMM arms the
    /// trap only then.
    pub fn user_int_n_needs_fixup(&self) -> bool {
        self.user_int_n_long_mode == Support::FixedUp || self.user_int_n_prot32 == Support::FixedUp
    }

    pub fn rows(&self) -> [(&'static str, &Support); 13] {
        [
            ("legacy 32-bit PAE paging", &self.legacy_pae_paging),
            ("legacy 32-bit PSE paging", &self.legacy_pse_paging),
            ("int n at CPL 3 in long mode", &self.user_int_n_long_mode),
            ("int n at CPL 3, 32-bit mode", &self.user_int_n_prot32),
            ("int3 at CPL 0", &self.kernel_int3),
            ("32-bit iret", &self.iret32),
            ("syscall at CPL 3", &self.user_syscall),
            ("SSSE3 (pshufb) at CPL 0", &self.kernel_ssse3),
            ("xsave at CPL 0", &self.kernel_xsave),
            ("virtual-8086 mode", &self.vm86),
            (
                "%ss: non-canonical at CPL 3",
                &self.user_ss_override_noncanonical,
            ),
            ("int3 at CPL 3, DPL-0 gate", &self.user_int3_gate_dpl),
            ("icebp at CPL 3, gate absent", &self.not_present_gate),
        ]
    }

    /// Options a Linux guest's command line needs on this host (empty if
    /// none): what keeps the kernel off instructions the host cannot run.
    pub fn linux_cmdline_options(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if matches!(self.kernel_xsave, Support::Unsupported(_)) {
            v.push("noxsave");
        }
        if matches!(self.kernel_ssse3, Support::Unsupported(_)) {
            // X86_FEATURE_SSSE3: word 4 (CPUID 1 ECX), bit 9.
            v.push("clearcpuid=137");
        }
        v
    }
}

impl fmt::Display for HostProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, s) in self.rows() {
            writeln!(f, "{name:<30} {s}")?;
        }
        let opts = self.linux_cmdline_options();
        if !opts.is_empty() {
            writeln!(
                f,
                "Linux guests need on their command line here: {}",
                opts.join(" ")
            )?;
        }
        Ok(())
    }
}

/// Ports the probe guests report through.
const PORT_OK: u16 = 0x99;
const PORT_VEC: u16 = 0x90; // + vector low bits

/// How a probe guest ended.
#[derive(Debug)]
enum End {
    Out(u16),
    TripleFault,
    EmulationFailure,
    Other(String),
}

pub(crate) struct ProbeVm {
    pub(crate) _vm: kvm_ioctls::VmFd,
    pub(crate) vcpu: VcpuFd,
    pub(crate) mem: GuestMemoryMmap,
}

/// A throwaway VM: 4 MiB of RAM at 0, one vCPU with the supported CPUID.
pub(crate) fn new_vm() -> Result<ProbeVm, String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| e.to_string())?;
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).map_err(|e| e.to_string())?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| e.to_string())?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 4 << 20,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` owns the 4 MiB mapping and lives in the returned
    // ProbeVm next to the VM fd, so the memory outlives the slot's use.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| e.to_string())?;
    let _ = vm.set_tss_address(0xfffb_d000);
    let vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| e.to_string())?;
    vcpu.set_cpuid2(&cpuid).map_err(|e| e.to_string())?;
    Ok(ProbeVm { _vm: vm, vcpu, mem })
}

use crate::arch::x86::flat_segment as seg;

/// Flat code and data segments at privilege `dpl`, and a TSS at 0x8000
/// (its ring-0 stack pointer is set by the caller).
fn load_segments(s: &mut kvm_bindings::kvm_sregs, code: u16, data: u16, dpl: u8, long: bool) {
    s.cs = seg(code, 0xb, dpl, long);
    for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        *d = seg(data, 0x3, dpl, long);
    }
    s.tr = kvm_segment {
        base: 0x8000,
        limit: 0x67,
        type_: 0xb,
        present: 1,
        selector: 0x28,
        ..Default::default()
    };
}

fn run_vcpu(p: &mut ProbeVm) -> End {
    for _ in 0..16 {
        match p.vcpu.run() {
            Ok(VcpuExit::IoOut(port, _)) => return End::Out(port),
            Ok(VcpuExit::Shutdown) => return End::TripleFault,
            Ok(VcpuExit::InternalError) => return End::EmulationFailure,
            Ok(VcpuExit::Hlt) => return End::Other("hlt".into()),
            Ok(e) => return End::Other(format!("{e:?}")),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return End::Other(e.to_string()),
        }
    }
    End::Other("no exit".into())
}

fn asm(
    bits: u32,
    ip: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<Vec<u8>, String> {
    let mut a = CodeAssembler::new(bits).map_err(|e| e.to_string())?;
    f(&mut a).map_err(|e| e.to_string())?;
    a.assemble(ip).map_err(|e| e.to_string())
}

/// 32-bit protected mode, paging off, flat segments.
fn prot32(p: &ProbeVm, rip: u64) -> Result<(), String> {
    let mut s = p.vcpu.get_sregs().map_err(|e| e.to_string())?;
    s.cs = seg(0x8, 0xb, 0, false);
    for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        *d = seg(0x10, 0x3, 0, false);
    }
    s.tr = kvm_segment {
        limit: 0x67,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    s.cr0 = 0x11;
    s.cr4 = 0;
    s.efer = 0;
    p.vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
    let mut r = p.vcpu.get_regs().map_err(|e| e.to_string())?;
    r.rip = rip;
    r.rsp = 0x8000;
    r.rflags = 2;
    p.vcpu.set_regs(&r).map_err(|e| e.to_string())
}

/// The probe's result: `native_port` is the port the guest reports on when
/// the instruction ran natively.
fn verdict(r: Result<End, String>, native_port: u16) -> Support {
    match r {
        Ok(End::Out(port)) if port == native_port => Support::Native,
        Ok(e) => classify(e),
        Err(e) => Support::Unknown(e),
    }
}

fn classify(end: End) -> Support {
    match end {
        End::EmulationFailure => Support::FixedUp,
        End::TripleFault => Support::Unsupported("the guest triple-faults".into()),
        End::Out(p) if p == PORT_VEC + 6 => {
            Support::Unsupported("the guest gets #UD, with no exit to the VMM".into())
        }
        End::Out(p) => Support::Unsupported(format!("unexpected report on port {p:#x}")),
        End::Other(s) => Support::Unknown(s),
    }
}

fn probe_legacy_paging(pae: bool) -> Support {
    let r = (|| -> Result<End, String> {
        let mut p = new_vm()?;
        if pae {
            // PDPT at 0x2000 -> PD at 0x3000 -> one 2 MiB identity page.
            p.mem
                .write_obj(0x3001u64, GuestAddress(0x2000))
                .map_err(|e| e.to_string())?;
            p.mem
                .write_obj(0x83u64, GuestAddress(0x3000))
                .map_err(|e| e.to_string())?;
        } else {
            // Page directory at 0x2000 with one 4 MiB identity page.
            p.mem
                .write_obj(0x83u32, GuestAddress(0x2000))
                .map_err(|e| e.to_string())?;
        }
        let cr4_val = if pae { 0x20u32 } else { 0x10 };
        let code = asm(32, 0x1000, |a| {
            a.mov(eax, cr4_val)?;
            a.mov(cr4, eax)?;
            a.mov(eax, 0x2000u32)?;
            a.mov(cr3, eax)?;
            a.mov(eax, cr0)?;
            a.or(eax, 0x8000_0000u32 as i32)?;
            a.mov(cr0, eax)?;
            a.out(PORT_OK as u32, al)?;
            a.hlt()
        })?;
        p.mem
            .write_slice(&code, GuestAddress(0x1000))
            .map_err(|e| e.to_string())?;
        prot32(&p, 0x1000)?;
        Ok(run_vcpu(&mut p))
    })();
    verdict(r, PORT_OK)
}

/// Long mode with 2 MiB identity pages, a GDT, an IDT whose handlers
/// report their vector, and a TSS with RSP0.
fn long_mode(p: &ProbeVm, user: bool, rip: u64, gate_dpl: u8) -> Result<(), String> {
    let w = |v: u64, at: u64| {
        p.mem
            .write_obj(v, GuestAddress(at))
            .map_err(|e| e.to_string())
    };
    w(0x3000 | 7, 0x2000)?; // PML4 -> PDPT
    w(0x4000 | 7, 0x3000)?; // PDPT -> PD
    w(0x87, 0x4000)?; // 2 MiB page 0, user, writable
    w(0x20_0000 | 0x87, 0x4008)?;
    // IDT at 0x6000: every vector -> handler at 0x7400 + vec*16 which does
    // `out PORT_VEC+vec, al; hlt`.
    for vec in 0u64..32 {
        let handler = 0x7400 + vec * 16;
        let dpl = if vec == 0x10 { u64::from(gate_dpl) } else { 0 };
        let lo = (handler & 0xffff)
            | (0x08 << 16)
            | ((0x8e | (dpl << 5)) << 40)
            | ((handler >> 16 & 0xffff) << 48);
        w(lo, 0x6000 + vec * 16)?;
        w(handler >> 32, 0x6000 + vec * 16 + 8)?;
        let code = [0xe6, (PORT_VEC as u8).wrapping_add(vec as u8), 0xf4];
        p.mem
            .write_slice(&code, GuestAddress(handler))
            .map_err(|e| e.to_string())?;
    }
    // TSS at 0x8000: RSP0 = 0x9000.
    w(0x9000u64 << 32, 0x8000)?;
    let mut s = p.vcpu.get_sregs().map_err(|e| e.to_string())?;
    let dpl = if user { 3 } else { 0 };
    load_segments(
        &mut s,
        0x08 | u16::from(dpl),
        0x10 | u16::from(dpl),
        dpl,
        true,
    );
    s.idt.base = 0x6000;
    s.idt.limit = 32 * 16 - 1;
    s.gdt.base = 0x5000;
    s.gdt.limit = 0x37;
    // GDT: 0x08 code64 DPL0, 0x10 data DPL0 (user variants use RPL 3 on
    // DPL-3 copies at the same indexes is not needed for the probe).
    w(0x00af_9b00_0000_ffff, 0x5008)?;
    w(0x00cf_9300_0000_ffff, 0x5010)?;
    s.cr0 = 0x8000_0011;
    s.cr3 = 0x2000;
    s.cr4 = 0x20;
    s.efer = 0x500;
    p.vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
    let mut r = p.vcpu.get_regs().map_err(|e| e.to_string())?;
    r.rip = rip;
    r.rsp = 0xa000;
    r.rflags = 2;
    p.vcpu.set_regs(&r).map_err(|e| e.to_string())
}

/// Runs a probe guest that does `int $0x10` at CPL 3: natively, and where
/// that raises #UD, again with xenkvm's fix-up (a breakpoint on the #UD
/// handler at `ud_handler` that delivers the interrupt, [`crate::arch::x86::cpl3`]).
fn user_int_n_verdict(run: impl Fn(bool) -> Result<End, String>) -> Support {
    match run(false) {
        Ok(End::Out(p)) if p == PORT_VEC + 0x10 => Support::Native,
        Ok(End::Out(p)) if p == PORT_VEC + 6 => match run(true) {
            Ok(End::Out(p)) if p == PORT_VEC + 0x10 => Support::FixedUp,
            Ok(e) => Support::Unsupported(format!(
                "the guest gets #UD, with no exit to the VMM, and the fix-up fails ({e:?})"
            )),
            Err(e) => Support::Unknown(e),
        },
        r => verdict(r, PORT_VEC + 0x10),
    }
}

/// Runs the probe vCPU with a breakpoint on the #UD handler at `handler`;
/// at the breakpoint applies xenkvm's user software-interrupt delivery.
fn run_with_ud_fix(p: &mut ProbeVm, handler: u64) -> End {
    run_with_trap(p, handler, crate::arch::x86::cpl3::handle_ud)
}

/// Runs the probe vCPU with a breakpoint on the handler at `handler`; at
/// the breakpoint applies `handle` (xenkvm's decision for that handler).
fn run_with_trap(
    p: &mut ProbeVm,
    handler: u64,
    handle: fn(
        &dyn crate::arch::x86::PhysMem,
        &mut kvm_bindings::kvm_regs,
        &mut kvm_bindings::kvm_sregs,
    ) -> crate::arch::x86::cpl3::UdOutcome,
) -> End {
    let mut dbg = kvm_bindings::kvm_guest_debug {
        control: kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP,
        ..Default::default()
    };
    dbg.arch.debugreg[0] = handler;
    dbg.arch.debugreg[7] = 1;
    if let Err(e) = p.vcpu.set_guest_debug(&dbg) {
        return End::Other(e.to_string());
    }
    match p.vcpu.run() {
        Ok(VcpuExit::Debug(d)) if d.pc == handler => {}
        Ok(VcpuExit::IoOut(port, _)) => return End::Out(port),
        Ok(e) => return End::Other(format!("{e:?}")),
        Err(e) => return End::Other(e.to_string()),
    }
    let (Ok(mut r), Ok(mut s)) = (p.vcpu.get_regs(), p.vcpu.get_sregs()) else {
        return End::Other("cannot read registers".into());
    };
    match handle(&p.mem, &mut r, &mut s) {
        crate::arch::x86::cpl3::UdOutcome::Delivered { .. } => {}
        o => return End::Other(format!("fix-up at the handler: {o:?}")),
    }
    if p.vcpu.set_sregs(&s).is_err() || p.vcpu.set_regs(&r).is_err() {
        return End::Other("cannot write registers".into());
    }
    run_vcpu(p)
}

fn probe_user_int_n() -> Support {
    user_int_n_verdict(run_user_int_n)
}

fn run_user_int_n(fixup: bool) -> Result<End, String> {
    let mut p = new_vm()?;
    // int $0x10 from CPL 3 through a DPL-3 gate; the handler reports
    // vector 0x10 on port 0x90+0x10 = 0xa0.
    let code = asm(64, 0x1000, |a| {
        a.int(0x10)?;
        a.hlt()
    })?;
    p.mem
        .write_slice(&code, GuestAddress(0x1000))
        .map_err(|e| e.to_string())?;
    long_mode(&p, true, 0x1000, 3)?;
    Ok(if fixup {
        run_with_ud_fix(&mut p, 0x7400 + 6 * 16)
    } else {
        run_vcpu(&mut p)
    })
}

/// `int $0x10` at CPL 3 in 32-bit protected mode, paging off, through a
/// DPL-3 gate; the ring-0 stack comes from a 32-bit TSS.
fn probe_user_int_n_prot32() -> Support {
    user_int_n_verdict(run_user_int_n_prot32)
}

fn run_user_int_n_prot32(fixup: bool) -> Result<End, String> {
    let mut p = new_vm()?;
    let w = |v: u64, at: u64| {
        p.mem
            .write_obj(v, GuestAddress(at))
            .map_err(|e| e.to_string())
    };
    // GDT: 0x08 code DPL0, 0x10 data DPL0, 0x18 code DPL3, 0x20 data DPL3.
    w(0x00cf_9b00_0000_ffff, 0x5008)?;
    w(0x00cf_9300_0000_ffff, 0x5010)?;
    w(0x00cf_fb00_0000_ffff, 0x5018)?;
    w(0x00cf_f300_0000_ffff, 0x5020)?;
    // IDT: 8-byte interrupt gates; every vector reports itself.
    for vec in 0u64..32 {
        let handler = 0x7400 + vec * 16;
        let dpl = if vec == 0x10 { 3u64 } else { 0 };
        w(
            (handler & 0xffff)
                | (0x08 << 16)
                | ((0x8e | (dpl << 5)) << 40)
                | ((handler >> 16) << 48),
            0x6000 + vec * 8,
        )?;
        p.mem
            .write_slice(
                &[0xe6, (PORT_VEC as u8).wrapping_add(vec as u8), 0xf4],
                GuestAddress(handler),
            )
            .map_err(|e| e.to_string())?;
    }
    // 32-bit TSS at 0x8000: ESP0 = 0x9000, SS0 = 0x10.
    p.mem
        .write_obj(0x9000u32, GuestAddress(0x8004))
        .map_err(|e| e.to_string())?;
    p.mem
        .write_obj(0x10u32, GuestAddress(0x8008))
        .map_err(|e| e.to_string())?;
    p.mem
        .write_slice(&[0xcd, 0x10, 0xf4], GuestAddress(0x1000))
        .map_err(|e| e.to_string())?;
    prot32(&p, 0x1000)?;
    let mut s = p.vcpu.get_sregs().map_err(|e| e.to_string())?;
    load_segments(&mut s, 0x1b, 0x23, 3, false);
    s.gdt.base = 0x5000;
    s.gdt.limit = 0x2f;
    s.idt.base = 0x6000;
    s.idt.limit = 32 * 8 - 1;
    p.vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
    Ok(if fixup {
        run_with_ud_fix(&mut p, 0x7400 + 6 * 16)
    } else {
        run_vcpu(&mut p)
    })
}

fn probe_kernel_int3() -> Support {
    let r = (|| -> Result<End, String> {
        let mut p = new_vm()?;
        p.mem
            .write_slice(&[0xcc, 0xf4], GuestAddress(0x1000))
            .map_err(|e| e.to_string())?;
        long_mode(&p, false, 0x1000, 0)?;
        Ok(run_vcpu(&mut p))
    })();
    verdict(r, PORT_VEC + 3)
}

fn probe_iret32() -> Support {
    let r = (|| -> Result<End, String> {
        let mut p = new_vm()?;
        // GDT at 0x5000 with flat code (0x08) and data (0x10).
        p.mem
            .write_obj(0x00cf_9b00_0000_ffffu64, GuestAddress(0x5008))
            .map_err(|e| e.to_string())?;
        p.mem
            .write_obj(0x00cf_9300_0000_ffffu64, GuestAddress(0x5010))
            .map_err(|e| e.to_string())?;
        let code = asm(32, 0x1000, |a| {
            a.pushfd()?;
            a.push(0x08u32 as i32)?;
            a.push(0x1100u32 as i32)?;
            a.iretd()
        })?;
        p.mem
            .write_slice(&code, GuestAddress(0x1000))
            .map_err(|e| e.to_string())?;
        p.mem
            .write_slice(&[0xe6, PORT_OK as u8, 0xf4], GuestAddress(0x1100))
            .map_err(|e| e.to_string())?;
        prot32(&p, 0x1000)?;
        let mut s = p.vcpu.get_sregs().map_err(|e| e.to_string())?;
        s.gdt.base = 0x5000;
        s.gdt.limit = 0x17;
        p.vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
        Ok(run_vcpu(&mut p))
    })();
    verdict(r, PORT_OK)
}

/// SSSE3 `pshufb` (`xsave`: an `xsave` of the x87 state) at CPL 0 in long
/// mode. Both show in CPUID; where KVM's emulator runs the guest kernel's
/// code they may fail.
fn probe_kernel_insn(xsave: bool) -> Support {
    let r = (|| -> Result<End, String> {
        let mut p = new_vm()?;
        let code = asm(64, 0x1000, |a| {
            if xsave {
                a.xor(edx, edx)?;
                a.mov(eax, 1u32)?;
                a.xsave(ptr(0x10000u64))?;
            } else {
                a.pshufb(xmm0, xmm1)?;
            }
            a.out(PORT_OK as u32, al)?;
            a.hlt()
        })?;
        p.mem
            .write_slice(&code, GuestAddress(0x1000))
            .map_err(|e| e.to_string())?;
        long_mode(&p, false, 0x1000, 0)?;
        let mut s = p.vcpu.get_sregs().map_err(|e| e.to_string())?;
        // OSFXSR | OSXMMEXCPT, and OSXSAVE for xsave.
        s.cr4 |= (1 << 9) | (1 << 10) | if xsave { 1 << 18 } else { 0 };
        p.vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
        Ok(run_vcpu(&mut p))
    })();
    match r {
        Ok(End::Out(PORT_OK)) => Support::Native,
        Ok(End::EmulationFailure) => Support::Unsupported(
            "KVM's instruction emulator fails on it (the guest kernel must not use it)".into(),
        ),
        Ok(End::Out(v)) if v == PORT_VEC + 6 => Support::Unsupported("the guest gets #UD".into()),
        Ok(e) => classify(e),
        Err(e) => Support::Unknown(e),
    }
}

/// `syscall` at CPL 3 in long mode (EFER.SCE, STAR, LSTAR, SFMASK set)
/// into a kernel entry on a supervisor-only page that does `out PORT_OK`.
/// Where the host leaves the vCPU at CPL 3 the entry page-faults; then the
/// probe runs again with xenkvm's fix-up ([`crate::arch::x86::syscall_fix`]: a
/// breakpoint on the #PF handler that completes the `syscall`).
fn probe_user_syscall() -> Support {
    match run_user_syscall(false) {
        Ok(End::Out(PORT_OK)) => Support::Native,
        Ok(End::Out(p)) if p == PORT_VEC + 14 => match run_user_syscall(true) {
            Ok(End::Out(PORT_OK)) => Support::FixedUp,
            Ok(e) => Support::Unsupported(format!(
                "the kernel entry runs at CPL 3 and the fix-up fails ({e:?})"
            )),
            Err(e) => Support::Unknown(e),
        },
        r => verdict(r, PORT_OK),
    }
}

fn run_user_syscall(fixup: bool) -> Result<End, String> {
    use crate::arch::x86::syscall_fix::*;
    const LSTAR: u64 = 0x20_0000;
    const PF_HANDLER: u64 = 0x7400 + 14 * 16;
    let mut p = new_vm()?;
    let code = asm(64, 0x1000, |a| {
        a.syscall()?;
        a.hlt()
    })?;
    let w = |bytes: &[u8], at: u64| {
        p.mem
            .write_slice(bytes, GuestAddress(at))
            .map_err(|e| e.to_string())
    };
    w(&code, 0x1000)?;
    w(&[0xe6, PORT_OK as u8, 0xf4], LSTAR)?;
    long_mode(&p, true, 0x1000, 0)?;
    // The second 2 MiB page, where LSTAR points, is supervisor-only.
    w(&(LSTAR | 0x83).to_le_bytes(), 0x4008)?;
    let mut s = p.vcpu.get_sregs().map_err(|e| e.to_string())?;
    s.efer |= 1; // SCE
    p.vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
    let star = 0x08u64 << 32;
    let msr = |index, data| kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let msrs = kvm_bindings::Msrs::from_entries(&[
        msr(MSR_STAR, star),
        msr(MSR_LSTAR, LSTAR),
        msr(0xc000_0084, 0x200),
    ])
    .map_err(|e| format!("{e:?}"))?;
    p.vcpu.set_msrs(&msrs).map_err(|e| e.to_string())?;
    if !fixup {
        return Ok(run_vcpu(&mut p));
    }
    let mut dbg = kvm_bindings::kvm_guest_debug {
        control: kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP,
        ..Default::default()
    };
    dbg.arch.debugreg[0] = PF_HANDLER;
    dbg.arch.debugreg[7] = 1;
    p.vcpu.set_guest_debug(&dbg).map_err(|e| e.to_string())?;
    match p.vcpu.run() {
        Ok(VcpuExit::Debug(d)) if d.pc == PF_HANDLER => {}
        Ok(e) => return Ok(End::Other(format!("{e:?}"))),
        Err(e) => return Ok(End::Other(e.to_string())),
    }
    let mut s = p.vcpu.get_sregs().map_err(|e| e.to_string())?;
    let mut r = p.vcpu.get_regs().map_err(|e| e.to_string())?;
    let mut raw = [0u8; 48];
    p.mem
        .read_slice(&mut raw, GuestAddress(r.rsp))
        .map_err(|e| e.to_string())?;
    let f = Frame::parse(&raw);
    let setup = SyscallSetup {
        lstar: LSTAR,
        star,
        pf_handler: PF_HANDLER,
    };
    if !f.is_broken_syscall(&setup, s.cr2) {
        return Ok(End::Other(format!("unexpected #PF frame {f:?}")));
    }
    let cur = s;
    complete_syscall(&mut r, &mut s, &f, star);
    if segments_changed(&cur, &s) {
        p.vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
    }
    p.vcpu.set_regs(&r).map_err(|e| e.to_string())?;
    Ok(run_vcpu(&mut p))
}

/// Virtual-8086 mode: protected mode with EFLAGS.VM (IOPL 3), real-mode
/// style segments, an IDT whose DPL-3 interrupt gates lead to ring-0
/// handlers that report their vector, and a 32-bit TSS (SS0:ESP0). The
/// code does `out PORT_OK` (the mode runs at all), then `int $0x10`; the
/// frame the handler finds must be the virtual-8086 one (nine dwords with
/// EFLAGS.VM and ES, DS, FS, GS), or the guest's handler cannot return.
fn probe_vm86() -> Support {
    const ESP0: u64 = 0x9000;
    let r = (|| -> Result<Support, String> {
        let mut p = new_vm()?;
        let w = |v: u64, at: u64| {
            p.mem
                .write_obj(v, GuestAddress(at))
                .map_err(|e| e.to_string())
        };
        w(0x00cf_9b00_0000_ffff, 0x5008)?;
        w(0x00cf_9300_0000_ffff, 0x5010)?;
        for vec in 0u64..32 {
            let handler = 0x7400 + vec * 16;
            w(
                (handler & 0xffff) | (0x08 << 16) | (0xee << 40) | ((handler >> 16) << 48),
                0x6000 + vec * 8,
            )?;
            p.mem
                .write_slice(
                    &[0xe6, (PORT_VEC as u8).wrapping_add(vec as u8), 0xf4],
                    GuestAddress(handler),
                )
                .map_err(|e| e.to_string())?;
        }
        p.mem
            .write_obj(ESP0 as u32, GuestAddress(0x8004))
            .map_err(|e| e.to_string())?;
        p.mem
            .write_obj(0x10u32, GuestAddress(0x8008))
            .map_err(|e| e.to_string())?;
        p.mem
            .write_slice(
                &[0xe6, PORT_OK as u8, 0xcd, 0x10, 0xf4],
                GuestAddress(0x1000),
            )
            .map_err(|e| e.to_string())?;
        prot32(&p, 0)?;
        let mut s = p.vcpu.get_sregs().map_err(|e| e.to_string())?;
        let v86 = |sel: u16, type_: u8| kvm_segment {
            base: u64::from(sel) << 4,
            limit: 0xffff,
            selector: sel,
            type_,
            present: 1,
            dpl: 3,
            s: 1,
            ..Default::default()
        };
        s.cs = v86(0x100, 0xb);
        for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
            *d = v86(0x200, 0x3);
        }
        s.tr.base = 0x8000;
        s.gdt.base = 0x5000;
        s.gdt.limit = 0x17;
        s.idt.base = 0x6000;
        s.idt.limit = 32 * 8 - 1;
        p.vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
        let mut r = p.vcpu.get_regs().map_err(|e| e.to_string())?;
        r.rip = 0;
        r.rsp = 0x1000;
        r.rflags = 0x2_3002; // VM, IOPL 3
        p.vcpu.set_regs(&r).map_err(|e| e.to_string())?;
        match run_vcpu(&mut p) {
            End::Out(PORT_OK) => {}
            End::EmulationFailure => {
                return Ok(Support::Unsupported(
                    "the first instruction stops KVM (emulation failure)".into(),
                ))
            }
            End::TripleFault => return Ok(Support::Unsupported("the guest triple-faults".into())),
            e => {
                return Ok(Support::Unsupported(format!(
                    "the guest does not run ({e:?})"
                )))
            }
        }
        let port = match run_vcpu(&mut p) {
            End::Out(port) if (PORT_VEC..PORT_VEC + 32).contains(&port) => port,
            e => {
                return Ok(Support::Unsupported(format!(
                    "int $0x10 in virtual-8086 mode reaches no handler ({e:?})"
                )))
            }
        };
        let r = p.vcpu.get_regs().map_err(|e| e.to_string())?;
        let eflags: u32 = p
            .mem
            .read_obj(GuestAddress((r.rsp & 0xffff_ffff) + 8))
            .map_err(|e| e.to_string())?;
        let frame = ESP0.wrapping_sub(r.rsp & 0xffff_ffff);
        let vector = port - PORT_VEC;
        Ok(if frame == 36 && eflags & (1 << 17) != 0 {
            if vector == 0x10 {
                Support::Native
            } else {
                Support::Unsupported(format!(
                    "int $0x10 in virtual-8086 mode raises vector {vector}"
                ))
            }
        } else {
            Support::Unsupported(format!(
                "code runs, but an event out of virtual-8086 mode (vector {vector}) arrives with a \
                 {frame}-byte frame{} instead of the 36-byte one with EFLAGS.VM and the data segments, \
                 so the guest's handler cannot return",
                if eflags & (1 << 17) == 0 { " without EFLAGS.VM" } else { "" }
            ))
        })
    })();
    r.unwrap_or_else(Support::Unknown)
}

/// Measurements that take longer than the fix-up probes (up to about a
/// second); the VMM does not need them, `xenkvm probe` and the tests do.
#[derive(Debug, Clone)]
pub struct HostMeasures {
    /// Kernel-mode (CPL 0) loop iterations per second (`dec ecx; jnz`):
    /// on a host that emulates guest kernel code this is millions, not
    /// billions.
    pub kernel_loop_rate: Result<f64, String>,
    /// Kernel-mode (CPL 0, long mode, paging on) copy rates in bytes per
    /// second of 256 KiB by each of the three ways Linux copies memory:
    /// `rep movsb` (chosen with ERMS/FSRM), `rep movsq` (REP_GOOD without
    /// ERMS) and an unrolled `mov` loop (neither). On a host that emulates
    /// guest kernel code the string instructions cost per element, so the
    /// byte form is several times slower than the quadword form.
    pub kernel_copy_rates: Result<CopyRates, String>,
    /// The in-kernel LAPIC's ESR after a fixed IPI to itself with the
    /// illegal vector 15 (real APICs: Send and Receive Illegal Vector, 0x60;
    /// XTF `xsa-462` checks it).
    pub lapic_illegal_vector_esr: Support,
}

impl HostMeasures {
    pub fn run() -> HostMeasures {
        HostMeasures {
            kernel_loop_rate: kernel_loop_rate(),
            kernel_copy_rates: kernel_copy_rates(),
            lapic_illegal_vector_esr: probe_lapic_esr(),
        }
    }

    /// The measurements, once per process.
    pub fn get() -> &'static HostMeasures {
        static M: std::sync::OnceLock<HostMeasures> = std::sync::OnceLock::new();
        M.get_or_init(HostMeasures::run)
    }
}

impl fmt::Display for HostMeasures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kernel_loop_rate {
            Ok(r) => writeln!(f, "{:<30} {:.3e} iterations/s", "kernel-mode loop rate", r)?,
            Err(e) => writeln!(f, "{:<30} unknown: {e}", "kernel-mode loop rate")?,
        }
        match &self.kernel_copy_rates {
            Ok(c) => writeln!(
                f,
                "{:<30} rep movsb {:.2} MB/s, rep movsq {:.2} MB/s, mov loop {:.2} MB/s; \
                 guests see ERMS/FSRM: {}",
                "kernel-mode copy rate",
                c.movsb / 1e6,
                c.movsq / 1e6,
                c.mov_loop / 1e6,
                if hide_fast_strings() { "no" } else { "yes" }
            )?,
            Err(e) => writeln!(f, "{:<30} unknown: {e}", "kernel-mode copy rate")?,
        }
        writeln!(
            f,
            "{:<30} {}",
            "LAPIC ESR, illegal vector", self.lapic_illegal_vector_esr
        )
    }
}

/// Iterations of the kernel-mode loop [`kernel_loop_rate`] times.
const LOOP_ITERATIONS: u32 = 1 << 20;

/// Times `LOOP_ITERATIONS` iterations of `dec ecx; jnz` at CPL 0 in 32-bit
/// protected mode (the VM is built first, only the run is timed).
fn kernel_loop_rate() -> Result<f64, String> {
    let mut p = new_vm()?;
    let code = loop_code(LOOP_ITERATIONS, false)?;
    rate(&mut p, &code, prot32, LOOP_ITERATIONS, "the loop")
}

/// `iterations` of `dec ecx; jnz` at 0x1000, then `out PORT_OK`; with
/// `warm_exit`, an `out PORT_WARM` first (the code page is mapped by the
/// time the loop is timed).
fn loop_code(iterations: u32, warm_exit: bool) -> Result<Vec<u8>, String> {
    asm(32, 0x1000, |a| {
        let mut top = a.create_label();
        if warm_exit {
            a.out(PORT_WARM as u32, al)?;
        }
        a.mov(ecx, iterations)?;
        a.set_label(&mut top)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.out(PORT_OK as u32, al)?;
        a.hlt()
    })
}

/// Iterations of the quick loop [`kernel_code_emulated`] times.
const QUICK_ITERATIONS: u32 = 8192;
/// The quick loop's first exit, before the timed part.
const PORT_WARM: u16 = 0x98;

/// The kernel-mode loop rate (iterations per second of the vCPU thread's
/// CPU time) below which guest kernel code is taken to run in an
/// instruction emulator. The loop is two instructions: this project's
/// `kvm_pvm` host, which emulates guest kernel code, runs about 1e6;
/// hardware virtualization runs it at the CPU's speed, hundreds of
/// millions or more, and the quick loop's 8192 iterations stay above 1e7
/// even if its one timed entry and exit cost 800 us.
pub const EMULATED_BELOW: f64 = 1e7;

/// `Some(rate)` if this host runs guest kernel code in an instruction
/// emulator (the kernel-mode loop rate, see [`EMULATED_BELOW`]); `None` if
/// it runs natively, or if the probe failed (logged). Measured once per
/// process, about 10 ms on an emulating host and under 1 ms elsewhere.
/// The default host schedule tracking follows it
/// ([`crate::xen::sched::Mechanism::wanted`]).
pub fn kernel_code_emulated() -> Option<f64> {
    static R: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *R.get_or_init(|| match quick_kernel_loop_rate() {
        Ok(r) => {
            tracing::debug!(rate = r, "kernel-mode loop probe");
            (r < EMULATED_BELOW).then_some(r)
        }
        Err(e) => {
            tracing::warn!(%e, "kernel-mode loop probe failed: taking guest kernel code as running natively");
            None
        }
    })
}

/// The calling thread's CPU time.
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// [`QUICK_ITERATIONS`] of `dec ecx; jnz` at CPL 0, timed in the thread's
/// CPU time (a preempted probe is not slowed) from the loop's first exit
/// (the code page is mapped by then) to its last.
fn quick_kernel_loop_rate() -> Result<f64, String> {
    let mut p = new_vm()?;
    let code = loop_code(QUICK_ITERATIONS, true)?;
    p.mem
        .write_slice(&code, GuestAddress(0x1000))
        .map_err(|e| e.to_string())?;
    prot32(&p, 0x1000)?;
    match run_vcpu(&mut p) {
        End::Out(PORT_WARM) => {}
        e => return Err(format!("the quick loop did not start: {e:?}")),
    }
    let t = thread_cpu();
    match run_vcpu(&mut p) {
        End::Out(PORT_OK) => {
            Ok(f64::from(QUICK_ITERATIONS) / (thread_cpu() - t).as_secs_f64().max(1e-9))
        }
        e => Err(format!("the quick loop did not finish: {e:?}")),
    }
}

/// Loads `code` at 0x1000, enters it with `mode`, and returns `units` per
/// second of the run (only the run is timed); it must end with `out
/// PORT_OK`.
fn rate(
    p: &mut ProbeVm,
    code: &[u8],
    mode: impl FnOnce(&ProbeVm, u64) -> Result<(), String>,
    units: u32,
    what: &str,
) -> Result<f64, String> {
    p.mem
        .write_slice(code, GuestAddress(0x1000))
        .map_err(|e| e.to_string())?;
    mode(p, 0x1000)?;
    let t = std::time::Instant::now();
    match run_vcpu(p) {
        End::Out(PORT_OK) => Ok(f64::from(units) / t.elapsed().as_secs_f64().max(1e-9)),
        e => Err(format!("{what} did not finish: {e:?}")),
    }
}

/// Kernel-mode copy rates (bytes per second), see
/// [`HostMeasures::kernel_copy_rates`].
#[derive(Debug, Clone, Copy)]
pub struct CopyRates {
    pub movsb: f64,
    pub movsq: f64,
    pub mov_loop: f64,
}

/// Bytes each copy in [`kernel_copy_rates`] moves.
const COPY_BYTES: u32 = 256 << 10;

/// How a guest kernel copies memory (the three `memcpy` flavours of Linux).
#[derive(Clone, Copy)]
enum CopyWay {
    Movsb,
    Movsq,
    Loop,
}

/// Times one copy of `bytes` from 1 MiB to 2.5 MiB at CPL 0 in long mode
/// with paging (2 MiB pages), as a guest kernel's `memcpy` does: `rep
/// movsb`, `rep movsq`, or a loop of four 64-bit loads and stores. The VM
/// is built first; only the run is timed. Returns bytes per second.
fn copy_rate(way: CopyWay, bytes: u32) -> Result<f64, String> {
    let mut p = new_vm()?;
    let code = asm(64, 0x1000, |a| {
        a.mov(rsi, 0x10_0000u64)?;
        a.mov(rdi, 0x28_0000u64)?;
        match way {
            CopyWay::Movsb => {
                a.mov(rcx, u64::from(bytes))?;
                a.rep().movsb()?;
            }
            CopyWay::Movsq => {
                a.mov(rcx, u64::from(bytes / 8))?;
                a.rep().movsq()?;
            }
            CopyWay::Loop => {
                let mut top = a.create_label();
                a.mov(rcx, u64::from(bytes / 32))?;
                a.set_label(&mut top)?;
                a.mov(r8, qword_ptr(rsi))?;
                a.mov(r9, qword_ptr(rsi + 8))?;
                a.mov(r10, qword_ptr(rsi + 16))?;
                a.mov(r11, qword_ptr(rsi + 24))?;
                a.mov(qword_ptr(rdi), r8)?;
                a.mov(qword_ptr(rdi + 8), r9)?;
                a.mov(qword_ptr(rdi + 16), r10)?;
                a.mov(qword_ptr(rdi + 24), r11)?;
                a.lea(rsi, qword_ptr(rsi + 32))?;
                a.lea(rdi, qword_ptr(rdi + 32))?;
                a.dec(rcx)?;
                a.jnz(top)?;
            }
        }
        a.out(PORT_OK as u32, al)?;
        a.hlt()
    })?;
    rate(
        &mut p,
        &code,
        |p, rip| long_mode(p, false, rip, 0),
        bytes,
        "the copy",
    )
}

/// The three copy rates of [`HostMeasures::kernel_copy_rates`].
fn kernel_copy_rates() -> Result<CopyRates, String> {
    Ok(CopyRates {
        movsb: copy_rate(CopyWay::Movsb, COPY_BYTES)?,
        movsq: copy_rate(CopyWay::Movsq, COPY_BYTES)?,
        mov_loop: copy_rate(CopyWay::Loop, COPY_BYTES)?,
    })
}

/// Whether guests should not see ERMS and FSRM (CPUID 7.0 EBX bit 9, EDX
/// bit 4): only with `XENKVM_FAST_STRINGS=hide`. A flat CPL-0 test guest
/// copies 7-8 times faster here with `rep movsq` than with `rep movsb`
/// ([`HostMeasures::kernel_copy_rates`]), and without ERMS Linux copies and
/// clears with the quadword form; but a Debian 6.1 boot with them hidden was
/// not faster: run beside an identical boot that saw them, its initcall
/// phases took 2-3 times as long (one pair; the cause is not known). So the
/// host's bits stay unless asked.
pub fn hide_fast_strings() -> bool {
    static H: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *H.get_or_init(|| {
        let hide = std::env::var("XENKVM_FAST_STRINGS").as_deref() == Ok("hide");
        if hide {
            tracing::info!("XENKVM_FAST_STRINGS=hide: guests do not see ERMS/FSRM");
        }
        hide
    })
}

/// XTF `xsa-462`'s sequence on the in-kernel LAPIC: software-enable it,
/// clear ESR, LVTERR = 15, a fixed IPI with vector 15 to APIC 0 (itself),
/// clear ESR, read ESR.
fn probe_lapic_esr() -> Support {
    let r = (|| -> Result<u32, String> {
        let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
        let vm = kvm.create_vm().map_err(|e| e.to_string())?;
        vm.create_irq_chip().map_err(|e| e.to_string())?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)])
            .map_err(|e| e.to_string())?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| e.to_string())?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 4 << 20,
            userspace_addr: host as u64,
        };
        // SAFETY: `mem` owns the 4 MiB mapping; it moves into the ProbeVm
        // below next to the VM fd, whose fields drop in order (the VM
        // first), so the memory outlives the slot's use.
        unsafe { vm.set_user_memory_region(region) }.map_err(|e| e.to_string())?;
        let _ = vm.set_tss_address(0xfffb_d000);
        let vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
        let mut p = ProbeVm { _vm: vm, vcpu, mem };
        const APIC: u32 = 0xfee0_0000;
        let code = asm(32, 0x1000, |a| {
            a.mov(dword_ptr(APIC + 0xf0), 0x1ffu32)?;
            a.mov(dword_ptr(APIC + 0x280), 0u32)?;
            a.mov(dword_ptr(APIC + 0x370), 0xfu32)?;
            a.mov(dword_ptr(APIC + 0x310), 0u32)?;
            a.mov(dword_ptr(APIC + 0x300), 0xfu32)?;
            a.mov(dword_ptr(APIC + 0x280), 0u32)?;
            a.mov(eax, dword_ptr(APIC + 0x280))?;
            a.out(PORT_OK as u32, eax)?;
            a.hlt()
        })?;
        p.mem
            .write_slice(&code, GuestAddress(0x1000))
            .map_err(|e| e.to_string())?;
        prot32(&p, 0x1000)?;
        for _ in 0..16 {
            match p.vcpu.run() {
                Ok(VcpuExit::IoOut(PORT_OK, data)) => {
                    let mut b = [0u8; 4];
                    let n = data.len().min(4);
                    b[..n].copy_from_slice(&data[..n]);
                    return Ok(u32::from_le_bytes(b));
                }
                Err(e) if e.errno() == libc::EINTR => continue,
                Ok(e) => return Err(format!("{e:?}")),
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("no exit".into())
    })();
    match r {
        Ok(0x60) => Support::Native,
        Ok(v) => Support::Unsupported(format!(
            "ESR reads {v:#x}, not 0x60: this KVM's in-kernel LAPIC does not report illegal vectors"
        )),
        Err(e) => Support::Unknown(e),
    }
}

/// Runs `code` at CPL 3 in long mode with gate `vector` DPL 0 (and not
/// present if `not_present`); a CPU delivers exception `expect` instead.
/// Where the host delivers the wrong vector (#BP for the DPL check, #DF
/// for the absent gate), the probe runs again with xenkvm's handler trap
/// ([`crate::arch::x86::gates`]).
fn probe_user_swint(code: &[u8], vector: u64, not_present: bool, expect: u16) -> Support {
    let run = |fix: Option<u16>| -> Result<End, String> {
        let mut p = new_vm()?;
        p.mem
            .write_slice(code, GuestAddress(0x1000))
            .map_err(|e| e.to_string())?;
        long_mode(&p, true, 0x1000, 0)?;
        if not_present {
            let at = GuestAddress(0x6000 + vector * 16 + 5);
            let attr: u8 = p.mem.read_obj(at).map_err(|e| e.to_string())?;
            p.mem
                .write_obj(attr & 0x7f, at)
                .map_err(|e| e.to_string())?;
        }
        Ok(match fix {
            None => run_vcpu(&mut p),
            Some(3) => run_with_trap(&mut p, 0x7400 + 3 * 16, crate::arch::x86::gates::handle_bp),
            Some(v) => run_with_trap(
                &mut p,
                0x7400 + u64::from(v) * 16,
                crate::arch::x86::gates::handle_df,
            ),
        })
    };
    match run(None) {
        Ok(End::Out(p)) if p == PORT_VEC + expect => Support::Native,
        Ok(End::Out(p)) if p == PORT_VEC + 3 || p == PORT_VEC + 8 => {
            match run(Some(p - PORT_VEC)) {
                Ok(End::Out(q)) if q == PORT_VEC + expect => Support::FixedUp,
                r => Support::Unsupported(format!(
                    "the guest gets vector {} instead of {expect}, with no exit to the VMM, \
                     and the fix-up fails ({r:?})",
                    p - PORT_VEC
                )),
            }
        }
        Ok(End::Out(p)) if (PORT_VEC..PORT_VEC + 32).contains(&p) => Support::Unsupported(format!(
            "the guest gets vector {} instead of {expect}, with no exit to the VMM",
            p - PORT_VEC
        )),
        Ok(End::EmulationFailure) => Support::FixedUp,
        Ok(e) => Support::Unsupported(format!("unexpected outcome {e:?}")),
        Err(e) => Support::Unknown(e),
    }
}

/// `mov %ss:(%rax), %rax` with a non-canonical RAX at CPL 3 in 64-bit mode:
/// the handler of the exception that arrives reports its vector.
fn probe_ss_override() -> Support {
    let run = |fix: bool| -> Result<End, String> {
        let mut p = new_vm()?;
        let mut code = vec![0x48, 0xb8];
        code.extend_from_slice(&0x8000_0000_4000_0000u64.to_le_bytes());
        code.extend_from_slice(&[0x36, 0x48, 0x8b, 0x00, 0xf4]);
        p.mem
            .write_slice(&code, GuestAddress(0x1000))
            .map_err(|e| e.to_string())?;
        long_mode(&p, true, 0x1000, 0)?;
        Ok(if fix {
            run_with_trap(&mut p, 0x7400 + 12 * 16, crate::arch::x86::gates::handle_ss)
        } else {
            run_vcpu(&mut p)
        })
    };
    match run(false) {
        Ok(End::Out(p)) if p == PORT_VEC + 13 => Support::Native,
        Ok(End::Out(p)) if p == PORT_VEC + 12 => match run(true) {
            Ok(End::Out(p)) if p == PORT_VEC + 13 => Support::FixedUp,
            r => Support::Unsupported(format!(
                "the guest gets #SS, not #GP (the ignored override is honoured), with no exit \
                 to the VMM, and the fix-up fails ({r:?})"
            )),
        },
        Ok(e) => Support::Unsupported(format!("unexpected outcome {e:?}")),
        Err(e) => Support::Unknown(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: Support) -> HostProbe {
        HostProbe {
            legacy_pae_paging: s.clone(),
            legacy_pse_paging: s.clone(),
            user_int_n_long_mode: s.clone(),
            user_int_n_prot32: s.clone(),
            kernel_int3: s.clone(),
            iret32: s.clone(),
            user_syscall: s.clone(),
            kernel_ssse3: s.clone(),
            kernel_xsave: s.clone(),
            vm86: s.clone(),
            user_ss_override_noncanonical: s.clone(),
            user_int3_gate_dpl: s.clone(),
            not_present_gate: s,
        }
    }

    #[test]
    fn probe_report_failing_ssse3_xsave_names_linux_options() {
        let p = all(Support::Unsupported("emulator".into()));
        assert_eq!(p.linux_cmdline_options(), ["noxsave", "clearcpuid=137"]);
        assert!(p
            .to_string()
            .ends_with("Linux guests need on their command line here: noxsave clearcpuid=137\n"));
    }

    #[test]
    fn probe_report_native_host_needs_no_options() {
        let p = all(Support::Native);
        assert!(p.linux_cmdline_options().is_empty());
        assert!(!p.to_string().contains("need on their command line"));
    }
}
