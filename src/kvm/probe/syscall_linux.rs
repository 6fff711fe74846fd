//! `syscall` at CPL 3 in a Linux-like layout: 4-level paging with 4 KiB
//! user pages, the kernel, its IDT/GDT/TSS and stacks on supervisor-only
//! global pages at `0xffffffff81c00000`, SMEP and SMAP on, an entry that
//! starts with `swapgs` and stores RSP through GS as Linux's does.

use super::*;
use crate::arch::x86::syscall_fix::*;

const KTEXT: u64 = 0xffff_ffff_81c0_0000; // phys 0x200000, 2 MiB
const KDATA: u64 = 0xffff_ffff_81e0_0000; // phys 0x400000, 2 MiB
const LSTAR: u64 = KTEXT + 0x80;
const HANDLERS: u64 = KTEXT + 0x1000;
const IDT: u64 = KDATA;
const GDT: u64 = KDATA + 0x1000;
const TSS: u64 = KDATA + 0x2000;
const PERCPU: u64 = KDATA + 0x3000;
const RSP0: u64 = KDATA + 0x1f_0000;
const IST1: u64 = KDATA + 0x1e_0000;
const USER_CODE: u64 = 0x1000;
const USER_STACK: u64 = 0xe000;
/// The page table of the low 2 MiB, inside the kernel's data mapping.
const LOW_PT: u64 = 0x48_0000;
const PF_HANDLER: u64 = KTEXT + 0x2000;

/// Variants of the layout, to find what the host's fault depends on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Variant {
    pub smep_smap: bool,
    pub global: bool,
    /// A user page fault (through the #PF trap, stepped over) before the syscall.
    pub user_pf_first: bool,
    /// Linux's CR4 (FSGSBASE, UMIP, PSE too).
    pub linux_cr4: bool,
    /// Write the fix-up through kvm_run's synced registers, as xenkvm does.
    pub sync_regs: bool,
    /// An in-kernel irqchip, as xenkvm's VMs have.
    pub irqchip: bool,
    /// Breakpoints on the #UD and #SS handlers too, as xenkvm arms for Linux.
    pub four_bps: bool,
    /// The guest's own #PF handler maps the user page and returns with
    /// `iretq` (after xenkvm steps over its `endbr64`), as Linux's does.
    pub guest_pf_handler: bool,
}

fn k2p(v: u64) -> u64 {
    // KTEXT -> 0x200000, KDATA -> 0x400000 (2 MiB each; RAM is 8 MiB).
    if v >= KDATA {
        0x40_0000 + (v - KDATA)
    } else {
        0x20_0000 + (v - KTEXT)
    }
}

/// Runs the layout with xenkvm's fix-up; the log of #PF traps and the end
/// (`out 0x99 ...` when the entry ran at CPL 0).
pub(crate) fn run(v: Variant) -> Result<String, String> {
    let kvm = Kvm::new().map_err(|e| e.to_string())?;
    let vm = kvm.create_vm().map_err(|e| e.to_string())?;
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).map_err(|e| e.to_string())?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| e.to_string())?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 8 << 20,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` outlives the VM (both dropped at the end of this function).
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| e.to_string())?;
    let _ = vm.set_tss_address(0xfffb_d000);
    if v.irqchip {
        vm.create_irq_chip().map_err(|e| e.to_string())?;
    }
    let mut vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| e.to_string())?;
    vcpu.set_cpuid2(&cpuid).map_err(|e| e.to_string())?;
    let w = |val: u64, at: u64| {
        mem.write_obj(val, GuestAddress(at))
            .map_err(|e| e.to_string())
    };
    let wb = |b: &[u8], at: u64| {
        mem.write_slice(b, GuestAddress(at))
            .map_err(|e| e.to_string())
    };
    let g = if v.global { 0x100 } else { 0 };
    // PML4 0x2000, PDPT low 0x3000, PD low 0x4000, PT low 0x5000,
    // PDPT high 0x6000, PD high 0x7000.
    w(0x3000 | 7, 0x2000)?;
    w(0x6000 | 3, 0x2000 + 511 * 8)?;
    w(0x4000 | 7, 0x3000)?;
    w(LOW_PT | 7, 0x4000)?;
    w(USER_CODE | 5, LOW_PT + 8)?; // user code: present, user, read-only
    w(
        (USER_STACK - 0x1000) | 7,
        LOW_PT + (USER_STACK / 0x1000 - 1) * 8,
    )?;
    w(0x7000 | 3, 0x6000 + 510 * 8)?;
    w(0x20_0000 | 0x81 | g, 0x7000 + 14 * 8)?; // text: P, PS (read-only)
    w(0x40_0000 | 0x83 | g, 0x7000 + 15 * 8)?; // data: P, RW, PS
                                               // User code: optionally touch an unmapped user page, then syscall.
    let code = asm(64, USER_CODE, |a| {
        if v.user_pf_first {
            a.mov(rax, qword_ptr(0x3000u64))?;
        }
        a.syscall()?;
        a.hlt()
    })?;
    wb(&code, USER_CODE)?;
    // Entry: swapgs; mov %gs:0x14, %rsp; out PORT_OK.
    let entry = asm(64, LSTAR, |a| {
        a.swapgs()?;
        a.mov(qword_ptr(0x14u64).gs(), rsp)?;
        a.out(PORT_OK as u32, al)?;
        a.hlt()
    })?;
    wb(&entry, k2p(LSTAR))?;
    let pf_code = asm(64, PF_HANDLER, |a| {
        a.endbr64()?;
        a.mov(rax, KDATA + (LOW_PT - 0x40_0000) + 3 * 8)?;
        a.mov(rbx, 0x3007u64)?;
        a.mov(qword_ptr(rax), rbx)?;
        a.add(rsp, 8)?;
        a.iretq()
    })?;
    wb(&pf_code, k2p(PF_HANDLER))?;
    for vec in 0u64..32 {
        let h = if vec == 14 && v.guest_pf_handler {
            PF_HANDLER
        } else {
            HANDLERS + vec * 16
        };
        wb(
            &[0xe6, (PORT_VEC as u8).wrapping_add(vec as u8), 0xf4],
            k2p(h),
        )?;
        let ist = if vec == 8 { 1u64 } else { 0 };
        let lo =
            (h & 0xffff) | (0x10 << 16) | (ist << 32) | (0x8e << 40) | ((h >> 16 & 0xffff) << 48);
        w(lo, k2p(IDT) + vec * 16)?;
        w(h >> 32, k2p(IDT) + vec * 16 + 8)?;
    }
    // GDT: 0x10 kernel code64, 0x18 kernel data, 0x2b user data, 0x33 user code64.
    w(0x00af_9b00_0000_ffff, k2p(GDT) + 0x10)?;
    w(0x00cf_9300_0000_ffff, k2p(GDT) + 0x18)?;
    w(0x00cf_f300_0000_ffff, k2p(GDT) + 0x28)?;
    w(0x00af_fb00_0000_ffff, k2p(GDT) + 0x30)?;
    // TSS: RSP0, IST1.
    w(RSP0, k2p(TSS) + 4)?;
    w(IST1, k2p(TSS) + 0x24)?;
    let mut s = vcpu.get_sregs().map_err(|e| e.to_string())?;
    s.cs = seg(0x33, 0xb, 3, true);
    for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        *d = seg(0x2b, 0x3, 3, true);
    }
    s.gs.base = 0;
    s.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        type_: 0xb,
        present: 1,
        selector: 0x40,
        ..Default::default()
    };
    s.idt.base = IDT;
    s.idt.limit = 32 * 16 - 1;
    s.gdt.base = GDT;
    s.gdt.limit = 0x4f;
    s.cr0 = 0x8005_0033;
    s.cr3 = 0x2000;
    s.cr4 =
        0x20 | 0x600 | if v.global { 0x80 } else { 0 } | if v.smep_smap { 0x30_0000 } else { 0 };
    if v.linux_cr4 {
        s.cr4 = 0x31_0eb0;
    }
    s.efer = 0xd01; // LME, LMA, SCE, NXE
    vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
    let mut r = vcpu.get_regs().map_err(|e| e.to_string())?;
    r.rip = USER_CODE;
    r.rsp = USER_STACK;
    r.rflags = 0x202;
    vcpu.set_regs(&r).map_err(|e| e.to_string())?;
    let star = (0x23u64 << 48) | (0x10u64 << 32);
    let msr = |index, data| kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let msrs = kvm_bindings::Msrs::from_entries(&[
        msr(MSR_STAR, star),
        msr(MSR_LSTAR, LSTAR),
        msr(0xc000_0084, 0x4_0700),
        msr(0xc000_0102, PERCPU), // KERNEL_GS_BASE
    ])
    .map_err(|e| format!("{e:?}"))?;
    vcpu.set_msrs(&msrs).map_err(|e| e.to_string())?;
    let pf = if v.guest_pf_handler {
        PF_HANDLER
    } else {
        HANDLERS + 14 * 16
    };
    let mut dbg = kvm_bindings::kvm_guest_debug {
        control: kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP,
        ..Default::default()
    };
    dbg.arch.debugreg[0] = pf;
    dbg.arch.debugreg[7] = 1;
    if v.four_bps {
        dbg.arch.debugreg[1] = HANDLERS + 6 * 16;
        dbg.arch.debugreg[2] = HANDLERS + 12 * 16;
        dbg.arch.debugreg[7] = 0x15;
    }
    if v.sync_regs {
        vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
    }
    vcpu.set_guest_debug(&dbg).map_err(|e| e.to_string())?;
    let mut log = String::new();
    for _ in 0..8 {
        let exit = match vcpu.run() {
            Ok(VcpuExit::Debug(d)) if d.pc == pf => None,
            Ok(VcpuExit::IoOut(port, _)) => Some(Ok(port)),
            Ok(e) => Some(Err(format!("exit {e:?}"))),
            Err(e) => Some(Err(format!("error {e}"))),
        };
        match exit {
            None => {}
            Some(Ok(port)) => {
                let s = vcpu.get_sregs().map_err(|e| e.to_string())?;
                let r = vcpu.get_regs().map_err(|e| e.to_string())?;
                log += &format!(
                    "out {port:#x} rip {:#x} cs {:#x} cr2 {:#x} rsp {:#x}",
                    r.rip, s.cs.selector, s.cr2, r.rsp
                );
                return Ok(log);
            }
            Some(Err(e)) => return Ok(log + &e),
        }
        let (mut s, mut r) = if v.sync_regs {
            (vcpu.sync_regs().sregs, vcpu.sync_regs().regs)
        } else {
            (
                vcpu.get_sregs().map_err(|e| e.to_string())?,
                vcpu.get_regs().map_err(|e| e.to_string())?,
            )
        };
        let mut raw = [0u8; 48];
        // The frame is on a supervisor page: read it through the VMM.
        let fp = if r.rsp >= KDATA { k2p(r.rsp) } else { r.rsp };
        mem.read_slice(&mut raw, GuestAddress(fp))
            .map_err(|e| e.to_string())?;
        let f = Frame::parse(&raw);
        log += &format!(
            "[#PF err {:#x} rip {:#x} cs {:#x} cr2 {:#x}] ",
            f.error, f.rip, f.cs, s.cr2
        );
        let setup = SyscallSetup {
            lstar: LSTAR,
            star,
            pf_handler: pf,
        };
        if f.is_broken_syscall(&setup, s.cr2) {
            let cur = s;
            complete_syscall(&mut r, &mut s, &f, star);
            let segs = segments_changed(&cur, &s);
            log += if segs {
                "(segments written) "
            } else {
                "(registers only) "
            };
            if v.sync_regs {
                vcpu.sync_regs_mut().regs = r;
                vcpu.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
                if segs {
                    vcpu.sync_regs_mut().sregs = s;
                    vcpu.set_sync_dirty_reg(kvm_ioctls::SyncReg::SystemRegister);
                }
            } else {
                if segs {
                    vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
                }
                vcpu.set_regs(&r).map_err(|e| e.to_string())?;
            }
        } else if v.guest_pf_handler {
            r.rip += 4; // endbr64
            if v.sync_regs {
                vcpu.sync_regs_mut().regs = r;
                vcpu.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
            } else {
                vcpu.set_regs(&r).map_err(|e| e.to_string())?;
            }
        } else if f.cs & 3 == 3 && s.cr2 == 0x3000 {
            // Map the user page and return to the faulting instruction.
            w(0x3000 | 7, LOW_PT + 3 * 8)?;
            r.rip = f.rip;
            r.rsp = f.rsp;
            r.rflags = f.rflags;
            s.cs = seg(0x33, 0xb, 3, true);
            s.ss = seg(0x2b, 0x3, 3, true);
            vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
            vcpu.set_regs(&r).map_err(|e| e.to_string())?;
        } else {
            return Ok(log + "unexpected #PF");
        }
    }
    Ok(log + "no end")
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

    /// On a host whose `syscall` stays at CPL 3 the fix-up must bring a
    /// Linux-like kernel entry (swapgs, a GS-relative store of the user
    /// RSP) to run at CPL 0 with the user's RSP, whatever the paging
    /// features, the way the state is written and the debug registers.
    #[test]
    fn syscall_fixup_linux_layout_runs_the_entry_at_cpl0_with_user_rsp() {
        if !kvm_available("syscall_fixup_linux_layout_runs_the_entry_at_cpl0_with_user_rsp") {
            return;
        }
        if super::super::HostProbe::get().user_syscall != Support::FixedUp {
            eprintln!("SKIPPED: syscall at CPL 3 needs no fix-up on this host");
            return;
        }
        for bits in 0u32..256 {
            let b = |i: u32| bits & (1 << i) != 0;
            let v = Variant {
                smep_smap: b(0),
                global: b(1),
                user_pf_first: b(2),
                linux_cr4: b(3),
                sync_regs: b(4),
                irqchip: b(5),
                four_bps: b(6),
                guest_pf_handler: b(7) && b(2),
            };
            let log = run(v).unwrap();
            assert!(
                log.ends_with(&format!(
                    "out 0x99 rip {:#x} cs 0x10 cr2 {LSTAR:#x} rsp {USER_STACK:#x}",
                    LSTAR + 14
                )),
                "{v:?}: {log}"
            );
        }
    }
}
