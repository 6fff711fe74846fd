use kvm_bindings::{kvm_pit_channel_state, kvm_segment};

use super::*;
use crate::migration::hvm_context::{self, SaveHeader};

fn seg(sel: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0x1000 * u64::from(sel),
        limit: 0xFFFF_FFFF,
        selector: sel,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// A long-mode vCPU with every converted field set to something distinct.
#[allow(clippy::field_reassign_with_default)]
pub(crate) fn long_mode_vcpu(vcpu: u16) -> KvmVcpuState {
    let mut s = KvmVcpuState::default();
    s.regs = kvm_regs {
        rax: 1,
        rbx: 2,
        rcx: 3,
        rdx: 4,
        rsi: 5,
        rdi: 6,
        rsp: 7,
        rbp: 8,
        r8: 9,
        r9: 10,
        r10: 11,
        r11: 12,
        r12: 13,
        r13: 14,
        r14: 15,
        r15: 16,
        rip: 0xFFFF_8000_0010_0000,
        rflags: 0x246,
    };
    s.sregs.cs = seg(0x10, 0xB, 1, 0);
    s.sregs.ds = seg(0x18, 0x3, 0, 1);
    s.sregs.es = seg(0x18, 0x3, 0, 1);
    s.sregs.ss = seg(0x18, 0x3, 0, 1);
    s.sregs.fs = seg(0, 0x3, 0, 1);
    s.sregs.gs = seg(0, 0x3, 0, 1);
    s.sregs.tr = kvm_segment {
        s: 0,
        type_: 0xB,
        limit: 0x67,
        g: 0,
        ..seg(0x28, 0xB, 0, 0)
    };
    s.sregs.ldt = kvm_segment {
        present: 0,
        unusable: 1,
        ..kvm_segment::default()
    };
    s.sregs.gdt = kvm_dtable {
        base: 0x5000,
        limit: 0x57,
        ..Default::default()
    };
    s.sregs.idt = kvm_dtable {
        base: 0x6000,
        limit: 0xFFF,
        ..Default::default()
    };
    s.sregs.cr0 = 0x8005_0033;
    s.sregs.cr2 = 0xdead_0000;
    s.sregs.cr3 = 0x1_0000;
    s.sregs.cr4 = 0x6A0;
    s.sregs.cr8 = 2;
    s.sregs.efer = 0xD01;
    s.sregs.apic_base = 0xFEE0_0900;
    s.fpu.fcw = 0x37F;
    s.fpu.mxcsr = 0x1F80;
    s.fpu.xmm[3] = [0x33; 16];
    s.fpu.fpr[7] = [0x77; 16];
    s.debugregs.db = [0x10, 0x20, 0x30, 0x40];
    s.debugregs.dr6 = 0xFFFF_0FF0;
    s.debugregs.dr7 = 0x400;
    s.msrs = saved_msrs()
        .into_iter()
        .map(|i| (i, u64::from(i) * 3 + 1))
        .collect();
    let mut lapic = vec![0u8; 1024];
    lapic[0x20..0x24].copy_from_slice(&(u32::from(vcpu) << 24).to_le_bytes());
    lapic[0x80] = 0x20; // TPR
    lapic[0xF0..0xF4].copy_from_slice(&0x1FFu32.to_le_bytes()); // SVR enabled
    lapic[0x3E0] = 0x3; // divide by 16
    s.lapic = lapic;
    s
}

#[test]
fn convert_vcpu_round_trips_through_hvm_records() {
    let s = long_mode_vcpu(1);
    let (recs, extra) = vcpu_to_records(1, &s).unwrap();
    let names: Vec<_> = recs.iter().map(|r| type_name(r.typecode())).collect();
    assert_eq!(
        names,
        [
            "CPU",
            "LAPIC",
            "LAPIC_REGS",
            "MTRR",
            "TSC_ADJUST",
            "CPU_MSR"
        ]
    );
    // Through the blob bytes and back.
    let blob = hvm_context::build(SaveHeader::default(), recs);
    let parsed = hvm_context::parse(&blob).unwrap();
    let back = vcpu_from_records(1, &parsed, &extra).unwrap();
    assert_eq!(back.regs, s.regs);
    assert_eq!(back.sregs.cs, s.sregs.cs);
    assert_eq!(back.sregs.ds, s.sregs.ds);
    assert_eq!(back.sregs.tr, s.sregs.tr);
    assert_eq!(back.sregs.ldt.present, 0);
    assert_eq!(back.sregs.ldt.unusable, 1);
    assert_eq!((back.sregs.gdt.base, back.sregs.gdt.limit), (0x5000, 0x57));
    assert_eq!((back.sregs.idt.base, back.sregs.idt.limit), (0x6000, 0xFFF));
    assert_eq!(
        [
            back.sregs.cr0,
            back.sregs.cr2,
            back.sregs.cr3,
            back.sregs.cr4,
            back.sregs.cr8,
            back.sregs.efer,
            back.sregs.apic_base
        ],
        [
            s.sregs.cr0,
            s.sregs.cr2,
            s.sregs.cr3,
            s.sregs.cr4,
            2,
            s.sregs.efer,
            s.sregs.apic_base
        ]
    );
    assert_eq!(back.fpu, s.fpu);
    assert_eq!(
        (back.debugregs.db, back.debugregs.dr6, back.debugregs.dr7),
        (s.debugregs.db, s.debugregs.dr6, s.debugregs.dr7)
    );
    assert_eq!(back.lapic, s.lapic);
    // Every saved MSR that Xen has a field for comes back with its value
    // (MTRRcap is read-only and not restored).
    for (i, v) in &s.msrs {
        if *i == msr::MTRR_CAP {
            continue;
        }
        assert_eq!(
            back.msrs.iter().find(|m| m.0 == *i).map(|m| m.1),
            Some(*v),
            "MSR {i:#x}"
        );
    }
}

#[test]
fn convert_apic_id_is_twice_the_vcpu_id_in_xen_records() {
    let (recs, _) = vcpu_to_records(3, &long_mode_vcpu(3)).unwrap();
    let HvmRecord::LapicRegs(_, regs) = &recs[2] else {
        panic!()
    };
    assert_eq!(
        u32::from_le_bytes(regs[0x20..0x24].try_into().unwrap()),
        6 << 24
    );
    let HvmRecord::Lapic(_, l) = &recs[1] else {
        panic!()
    };
    assert_eq!((l.disabled, l.timer_divisor), (0, 16));
}

#[test]
fn convert_pending_exception_with_error_code_round_trips() {
    let mut s = long_mode_vcpu(0);
    s.events.exception.injected = 1;
    s.events.exception.nr = 14;
    s.events.exception.has_error_code = 1;
    s.events.exception.error_code = 2;
    s.events.nmi.masked = 1;
    s.events.interrupt.shadow = 1;
    let (recs, extra) = vcpu_to_records(0, &s).unwrap();
    let HvmRecord::Cpu(_, c) = &recs[0] else {
        panic!()
    };
    assert_eq!(c.pending_event, 0x8000_0B0E);
    assert_eq!(c.error_code, 2);
    let back = vcpu_from_records(0, &recs, &extra).unwrap();
    assert_eq!(
        (
            back.events.exception.injected,
            back.events.exception.nr,
            back.events.exception.error_code
        ),
        (1, 14, 2)
    );
    assert_eq!(
        (back.events.nmi.masked, back.events.interrupt.shadow),
        (1, 1)
    );
}

#[test]
fn convert_two_events_in_flight_refused_by_name() {
    let mut s = long_mode_vcpu(0);
    s.events.exception.injected = 1;
    s.events.interrupt.injected = 1;
    let e = vcpu_to_records(0, &s).unwrap_err().to_string();
    assert!(
        e.contains("record CPU instance 0") && e.contains("exception, interrupt"),
        "{e}"
    );
}

#[test]
fn convert_missing_lapic_refused_by_name() {
    let (recs, extra) = vcpu_to_records(0, &long_mode_vcpu(0)).unwrap();
    let recs: Vec<_> = recs
        .into_iter()
        .filter(|r| r.typecode() != code::LAPIC)
        .collect();
    let e = vcpu_from_records(0, &recs, &extra).unwrap_err().to_string();
    assert_eq!(e, "HVM_CONTEXT has no LAPIC record for vCPU 0");
}

#[test]
fn convert_xsave_area_sized_for_xcr0() {
    let mut s = long_mode_vcpu(0);
    s.xsave = Some(vec![0x11; 4096]);
    s.xcr0 = 0x7;
    let (recs, extra) = vcpu_to_records(0, &s).unwrap();
    let x = recs
        .iter()
        .find_map(|r| match r {
            HvmRecord::Xsave(_, x) => Some(x),
            _ => None,
        })
        .unwrap();
    assert_eq!(x.area.len(), 832);
    let back = vcpu_from_records(0, &recs, &extra).unwrap();
    assert_eq!(back.xcr0, 7);
    assert_eq!(&back.xsave.as_ref().unwrap()[..832], &[0x11; 832][..]);
    assert!(xsave_size(1 << 40).unwrap_err().contains("bit 40"));
}

pub(crate) fn irqchip() -> KvmIrqchipState {
    let mut s = KvmIrqchipState::default();
    s.pic[0] = kvm_pic_state {
        irr: 1,
        imr: 0xB8,
        isr: 0,
        irq_base: 0x20,
        init_state: 0,
        init4: 1,
        auto_eoi: 0,
        elcr: 0x0C,
        elcr_mask: 0xF8,
        priority_add: 3,
        ..Default::default()
    };
    s.pic[1] = kvm_pic_state {
        imr: 0xFF,
        irq_base: 0x28,
        init4: 1,
        elcr_mask: 0xDE,
        ..Default::default()
    };
    s.ioapic = KvmIoapic {
        base_address: 0xFEC0_0000,
        id: 0,
        ioregsel: 0x10,
        irr: 0,
        redirtbl: [REDIR_MASKED; 24],
    };
    s.ioapic.redirtbl[2] = 0x30;
    s.pit.channels[0] = kvm_pit_channel_state {
        count: 0x2E9C,
        mode: 2,
        rw_mode: 3,
        gate: 1,
        ..Default::default()
    };
    s.pit.flags = KVM_PIT_FLAGS_SPEAKER_DATA_ON;
    s
}

#[test]
fn convert_irqchip_round_trips_with_48_pin_ioapic() {
    let s = irqchip();
    let recs = irqchip_to_records(&s);
    let HvmRecord::IoApic(_, a) = &recs[2] else {
        panic!()
    };
    assert_eq!(a.redirtbl.len(), 48);
    assert!(a.redirtbl[24..].iter().all(|e| e & REDIR_MASKED != 0));
    let back = irqchip_from_records(&recs).unwrap();
    assert_eq!(back.pic[0].imr, 0xB8);
    assert_eq!(back.pic[0].init4, 1);
    assert_eq!(back.pic[0].priority_add, 3);
    assert_eq!(back.pic[1].irq_base, 0x28);
    assert_eq!(back.ioapic.redirtbl, s.ioapic.redirtbl);
    assert_eq!(back.pit.channels[0].count, 0x2E9C);
    assert_eq!(back.pit.flags, KVM_PIT_FLAGS_SPEAKER_DATA_ON);
}

#[test]
fn convert_ioapic_pin_above_23_in_use_refused_by_name() {
    let mut recs = irqchip_to_records(&irqchip());
    if let HvmRecord::IoApic(_, a) = &mut recs[2] {
        a.redirtbl[30] = 0x41;
    }
    let e = irqchip_from_records(&recs).unwrap_err().to_string();
    assert!(
        e.contains("record IOAPIC instance 0: pin 30 is in use"),
        "{e}"
    );
}

#[test]
fn convert_unconverted_records_refused_or_dropped_by_name() {
    let other = |t, data: Vec<u8>| HvmRecord::Other {
        typecode: t,
        instance: 0,
        data,
    };
    assert!(check_unconverted(&[
        other(code::PCI_IRQ, vec![0; 16]),
        other(code::PMTIMER, vec![1; 8])
    ])
    .is_ok());
    let mut hpet = vec![0u8; 1048];
    hpet[16] = 1;
    let e = check_unconverted(&[other(code::HPET, hpet)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("HPET"), "{e}");
    let e = check_unconverted(&[other(code::ISA_IRQ, vec![0, 1, 0, 0, 0, 0, 0, 0])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("ISA_IRQ") && e.contains("asserted"), "{e}");
    let e = check_unconverted(&[other(27, vec![])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("type 27") && e.contains("unknown"), "{e}");
}

mod hostile {
    use proptest::prelude::*;

    use super::super::*;
    use crate::migration::hvm_context::{self, HvmRecord, SaveHeader};
    use crate::migration::stream::tests::config;

    proptest! {
        // A tenth of the stream tests' cases: each case converts up to 8
        // records of up to 1 KiB for three vCPUs.
        #![proptest_config(ProptestConfig { cases: config().cases / 10, ..config() })]

        /// Whatever records a stream holds, converting them to KVM state
        /// returns a value or a named refusal, never a panic.
        #[test]
        fn convert_arbitrary_records_never_panic(
            recs in prop::collection::vec((2u16..24, 0u16..3, prop::collection::vec(any::<u8>(), 0..1100)), 0..8)
        ) {
            let mut all = vec![HvmRecord::Header(SaveHeader::default())];
            for (t, i, b) in recs {
                if let Ok(r) = HvmRecord::decode(t, i, &b, 0) {
                    all.push(r);
                }
            }
            let blob = hvm_context::write(&all);
            let parsed = hvm_context::parse(&blob).unwrap();
            let _ = check_unconverted(&parsed);
            let _ = irqchip_from_records(&parsed);
            for v in 0..3 {
                let _ = vcpu_from_records(v, &parsed, &EventsExtra::default());
            }
        }
    }
}
