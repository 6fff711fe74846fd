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
        }
    }

    /// The probe results, once per process.
    pub fn get() -> &'static HostProbe {
        static P: std::sync::OnceLock<HostProbe> = std::sync::OnceLock::new();
        P.get_or_init(HostProbe::run)
    }

    pub fn rows(&self) -> [(&'static str, &Support); 7] {
        [
            ("legacy 32-bit PAE paging", &self.legacy_pae_paging),
            ("legacy 32-bit PSE paging", &self.legacy_pse_paging),
            ("int n at CPL 3 in long mode", &self.user_int_n_long_mode),
            ("int n at CPL 3, 32-bit mode", &self.user_int_n_prot32),
            ("int3 at CPL 0", &self.kernel_int3),
            ("32-bit iret", &self.iret32),
            ("syscall at CPL 3", &self.user_syscall),
        ]
    }
}

impl fmt::Display for HostProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, s) in self.rows() {
            writeln!(f, "{name:<30} {s}")?;
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

struct ProbeVm {
    _vm: kvm_ioctls::VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
}

fn new_vm() -> Result<ProbeVm, String> {
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

fn probe_user_int_n() -> Support {
    let r = (|| -> Result<End, String> {
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
        Ok(run_vcpu(&mut p))
    })();
    verdict(r, PORT_VEC + 0x10)
}

/// `int $0x10` at CPL 3 in 32-bit protected mode, paging off, through a
/// DPL-3 gate; the ring-0 stack comes from a 32-bit TSS.
fn probe_user_int_n_prot32() -> Support {
    let r = (|| -> Result<End, String> {
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
        Ok(run_vcpu(&mut p))
    })();
    verdict(r, PORT_VEC + 0x10)
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
    complete_syscall(&mut r, &mut s, &f, star);
    p.vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
    p.vcpu.set_regs(&r).map_err(|e| e.to_string())?;
    Ok(run_vcpu(&mut p))
}
