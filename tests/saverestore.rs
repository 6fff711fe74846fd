//! Save/restore in Xen's stream format: KVM state through Xen's HVM_CONTEXT
//! records and back (needs /dev/kvm; skipped with a reason without it,
//! fails with REQUIRE_KVM=1).

mod common;

use xenkvm::kvm::KvmVm;
use xenkvm::migration::convert::{
    irqchip_from_records, irqchip_to_records, msr, vcpu_from_records, vcpu_to_records,
};
use xenkvm::migration::hvm_context::{self, SaveHeader};

#[test]
fn saverestore_kvm_vcpu_state_survives_xen_records() {
    if !common::kvm_available("saverestore_kvm_vcpu_state_survives_xen_records") {
        return;
    }
    let a = KvmVm::create(&[]).unwrap();
    let va = a.create_vcpu(0).unwrap();
    let mut regs = va.regs().unwrap();
    regs.rax = 0x1111;
    regs.rbx = 0x2222;
    regs.r15 = 0xF15;
    regs.rip = 0x7C00;
    regs.rsp = 0x8000;
    regs.rflags = 0x202;
    va.set_regs(&regs).unwrap();
    let mut sregs = va.sregs().unwrap();
    sregs.cs.selector = 0x10;
    sregs.cs.base = 0;
    sregs.gdt.base = 0x5000;
    sregs.gdt.limit = 0x27;
    va.set_sregs(&sregs).unwrap();
    for (i, v) in [
        (msr::LSTAR, 0xFFFF_FFFF_8100_0000u64),
        (msr::SYSENTER_EIP, 0xC010_0000),
        (msr::PAT, 0x0007_0406_0007_0406),
        (msr::KERNEL_GS_BASE, 0x1234_5000),
    ] {
        assert!(va.write_msr(i, v), "set MSR {i:#x}");
    }
    let irq_a = a.save_irqchip().unwrap();
    let saved = va.save_state().unwrap();

    let (mut recs, extra) = vcpu_to_records(0, &saved).unwrap();
    recs.extend(irqchip_to_records(&irq_a));
    let blob = hvm_context::build(
        SaveHeader {
            changeset: 0,
            cpuid: 0,
            gtsc_khz: va.tsc_khz().unwrap_or(0),
        },
        recs,
    );
    let parsed = hvm_context::parse(&blob).unwrap();

    let b = KvmVm::create(&[]).unwrap();
    let vb = b.create_vcpu(0).unwrap();
    let state = vcpu_from_records(0, &parsed, &extra).unwrap();
    vb.restore_state(&state).unwrap();
    b.restore_irqchip(&irqchip_from_records(&parsed).unwrap())
        .unwrap();

    let again = vb.save_state().unwrap();
    assert_eq!(again.regs, saved.regs);
    assert_eq!(again.sregs.cs, saved.sregs.cs);
    assert_eq!(
        (again.sregs.gdt.base, again.sregs.gdt.limit),
        (0x5000, 0x27)
    );
    assert_eq!(again.sregs.cr0, saved.sregs.cr0);
    assert_eq!(again.fpu.fcw, saved.fpu.fcw);
    for i in [msr::LSTAR, msr::SYSENTER_EIP, msr::PAT, msr::KERNEL_GS_BASE] {
        let get = |s: &xenkvm::migration::convert::KvmVcpuState| {
            s.msrs.iter().find(|m| m.0 == i).map(|m| m.1)
        };
        assert_eq!(get(&again), get(&saved), "MSR {i:#x}");
    }
    assert_eq!(
        again.lapic[0x20..0x24],
        saved.lapic[0x20..0x24],
        "APIC ID back in KVM numbering"
    );
    let irq_b = b.save_irqchip().unwrap();
    assert_eq!(irq_b.ioapic.redirtbl, irq_a.ioapic.redirtbl);
    assert_eq!(irq_b.pic[0].imr, irq_a.pic[0].imr);
}
