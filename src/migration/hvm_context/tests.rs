use core::mem::offset_of;

use proptest::prelude::*;
use zerocopy::FromBytes;

use super::*;
use crate::migration::stream::tests::config;

/// A CPU record whose every field holds a different value.
fn distinct_cpu() -> HvmCpu {
    let mut n = 0u64;
    let mut next = || {
        n += 1;
        0x0101_0101_0000_0000 * n + n
    };
    let mut c = HvmCpu::default();
    for (i, b) in c.fpu_regs.iter_mut().enumerate() {
        *b = i as u8;
    }
    c.gprs.iter_mut().for_each(|g| *g = next());
    c.rip = next();
    c.rflags = next();
    c.cr.iter_mut().for_each(|g| *g = next());
    c.dr.iter_mut().for_each(|g| *g = next());
    c.dr6 = next();
    c.dr7 = next();
    for s in &mut c.segs {
        s.sel = next() as u32;
        s.limit = next() as u32;
        s.base = next();
        s.arbytes = next() as u32;
    }
    c.idtr = (next() as u32, next());
    c.gdtr = (next() as u32, next());
    c.sysenter.iter_mut().for_each(|g| *g = next());
    c.shadow_gs = next();
    c.msr_flags = next();
    c.msr_lstar = next();
    c.msr_star = next();
    c.msr_cstar = next();
    c.msr_syscall_mask = next();
    c.msr_efer = next();
    c.msr_tsc_aux = next();
    c.tsc = next();
    c.pending_event = 0x8000_0B0E;
    c.error_code = next() as u32;
    c.flags = XEN_X86_FPU_INITIALISED;
    c
}

#[test]
fn hvm_cpu_fields_sit_at_save_h_offsets() {
    let c = distinct_cpu();
    let b = HvmRecord::Cpu(0, Box::new(c.clone())).encode_body();
    assert_eq!(b.len(), HvmCpu::SIZE);
    assert_eq!(b.len(), size_of::<xen_abi::hvm_hw_cpu>());
    let x = xen_abi::hvm_hw_cpu::read_from_bytes(&b).unwrap();
    assert_eq!(x.fpu_regs, c.fpu_regs);
    let gprs = [
        x.rax, x.rbx, x.rcx, x.rdx, x.rbp, x.rsi, x.rdi, x.rsp, x.r8, x.r9, x.r10, x.r11, x.r12,
        x.r13, x.r14, x.r15,
    ];
    assert_eq!(gprs, c.gprs);
    assert_eq!((x.rip, x.rflags), (c.rip, c.rflags));
    assert_eq!([x.cr0, x.cr2, x.cr3, x.cr4], c.cr);
    assert_eq!(
        [x.dr0, x.dr1, x.dr2, x.dr3, x.dr6, x.dr7],
        [c.dr[0], c.dr[1], c.dr[2], c.dr[3], c.dr6, c.dr7]
    );
    let sels = [
        x.cs_sel, x.ds_sel, x.es_sel, x.fs_sel, x.gs_sel, x.ss_sel, x.tr_sel, x.ldtr_sel,
    ];
    let limits = [
        x.cs_limit,
        x.ds_limit,
        x.es_limit,
        x.fs_limit,
        x.gs_limit,
        x.ss_limit,
        x.tr_limit,
        x.ldtr_limit,
    ];
    let bases = [
        x.cs_base,
        x.ds_base,
        x.es_base,
        x.fs_base,
        x.gs_base,
        x.ss_base,
        x.tr_base,
        x.ldtr_base,
    ];
    let ars = [
        x.cs_arbytes,
        x.ds_arbytes,
        x.es_arbytes,
        x.fs_arbytes,
        x.gs_arbytes,
        x.ss_arbytes,
        x.tr_arbytes,
        x.ldtr_arbytes,
    ];
    for i in 0..8 {
        assert_eq!(
            (sels[i], limits[i], bases[i], ars[i]),
            (
                c.segs[i].sel,
                c.segs[i].limit,
                c.segs[i].base,
                c.segs[i].arbytes
            )
        );
    }
    assert_eq!(
        (x.idtr_limit, x.idtr_base, x.gdtr_limit, x.gdtr_base),
        (c.idtr.0, c.idtr.1, c.gdtr.0, c.gdtr.1)
    );
    assert_eq!([x.sysenter_cs, x.sysenter_esp, x.sysenter_eip], c.sysenter);
    assert_eq!(
        [
            x.shadow_gs,
            x.msr_flags,
            x.msr_lstar,
            x.msr_star,
            x.msr_cstar,
            x.msr_syscall_mask,
            x.msr_efer,
            x.msr_tsc_aux,
            x.tsc
        ],
        [
            c.shadow_gs,
            c.msr_flags,
            c.msr_lstar,
            c.msr_star,
            c.msr_cstar,
            c.msr_syscall_mask,
            c.msr_efer,
            c.msr_tsc_aux,
            c.tsc
        ]
    );
    // The pending_event word (a union in save.h).
    let pe = u32::from_le_bytes(
        b[offset_of!(xen_abi::hvm_hw_cpu, __bindgen_anon_1)..][..4]
            .try_into()
            .unwrap(),
    );
    assert_eq!(pe, c.pending_event);
    assert_eq!((x.error_code, x.flags), (c.error_code, c.flags));
    // The offsets MIGRATION.md lists.
    assert_eq!(offset_of!(xen_abi::hvm_hw_cpu, rax), 512);
    assert_eq!(offset_of!(xen_abi::hvm_hw_cpu, rip), 640);
    assert_eq!(offset_of!(xen_abi::hvm_hw_cpu, cs_arbytes), 888);
    assert_eq!(offset_of!(xen_abi::hvm_hw_cpu, msr_efer), 992);
    assert_eq!(offset_of!(xen_abi::hvm_hw_cpu, error_code), 1020);
    assert_eq!(offset_of!(xen_abi::hvm_hw_cpu, flags), 1024);
    assert_eq!(HvmCpu::decode(&b), c);
}

#[test]
fn hvm_cpu_old_forms_load_zero_extended() {
    let c = distinct_cpu();
    let b = HvmRecord::Cpu(0, Box::new(c.clone())).encode_body();
    // 1024: before `flags` (Xen < 4.7): same fields, flags read as 0.
    let HvmRecord::Cpu(_, old) = HvmRecord::decode(code::CPU, 0, &b[..1024], 0).unwrap() else {
        panic!()
    };
    assert_eq!(old.flags, 0);
    assert_eq!((old.tsc, old.error_code), (c.tsc, c.error_code));
    // 1016: hvm_hw_cpu_compat, no msr_tsc_aux: tsc sits where tsc_aux is now.
    let mut compat = b[..1000].to_vec();
    compat.extend_from_slice(&c.tsc.to_le_bytes());
    compat.extend_from_slice(&c.pending_event.to_le_bytes());
    compat.extend_from_slice(&c.error_code.to_le_bytes());
    let HvmRecord::Cpu(_, old) = HvmRecord::decode(code::CPU, 0, &compat, 0).unwrap() else {
        panic!()
    };
    assert_eq!(
        (old.msr_tsc_aux, old.tsc, old.pending_event, old.error_code),
        (0, c.tsc, c.pending_event, c.error_code)
    );
}

#[test]
fn hvm_pic_bitfields_match_bindgen() {
    let p = Pic {
        irr: 1,
        imr: 2,
        isr: 3,
        irq_base: 0x20,
        init_state: 0x5,
        priority_add: 0xA,
        readsel_isr: true,
        poll: false,
        auto_eoi: true,
        rotate_on_auto_eoi: false,
        special_fully_nested_mode: true,
        special_mask_mode: false,
        is_master: true,
        elcr: 0x0C,
        int_output: 1,
    };
    let b = HvmRecord::Pic(0, p).encode_body();
    let x = xen_abi::hvm_hw_vpic::read_from_bytes(&b).unwrap();
    assert_eq!(
        (x.irr, x.imr, x.isr, x.irq_base, x.elcr, x.int_output),
        (1, 2, 3, 0x20, 0x0C, 1)
    );
    assert_eq!((x.init_state(), x.priority_add()), (5, 0xA));
    assert_eq!(
        [
            x.readsel_isr(),
            x.poll(),
            x.auto_eoi(),
            x.rotate_on_auto_eoi(),
            x.special_fully_nested_mode(),
            x.special_mask_mode(),
            x.is_master()
        ],
        [1, 0, 1, 0, 1, 0, 1]
    );
    assert_eq!(Pic::decode(&b), p);
}

#[test]
fn hvm_fixed_records_have_save_h_sizes() {
    let recs = [
        (
            HvmRecord::Header(SaveHeader::default()),
            size_of::<xen_abi::hvm_save_header>(),
        ),
        (
            HvmRecord::Pic(0, Pic::default()),
            size_of::<xen_abi::hvm_hw_vpic>(),
        ),
        (
            HvmRecord::IoApic(
                0,
                Box::new(IoApic {
                    base_address: 0xFEC0_0000,
                    ioregsel: 0,
                    id: 0,
                    redirtbl: [0x1_0000; 48],
                }),
            ),
            size_of::<xen_abi::hvm_hw_vioapic>(),
        ),
        (
            HvmRecord::Lapic(0, Lapic::default()),
            size_of::<xen_abi::hvm_hw_lapic>(),
        ),
        (
            HvmRecord::LapicRegs(0, Box::new([0; 1024])),
            size_of::<xen_abi::hvm_hw_lapic_regs>(),
        ),
        (
            HvmRecord::Pit(0, Pit::default()),
            size_of::<xen_abi::hvm_hw_pit>(),
        ),
        (
            HvmRecord::Rtc(0, Rtc::default()),
            size_of::<xen_abi::hvm_hw_rtc>(),
        ),
        (
            HvmRecord::Mtrr(0, Box::default()),
            size_of::<xen_abi::hvm_hw_mtrr>(),
        ),
        (
            HvmRecord::TscAdjust(0, 0),
            size_of::<xen_abi::hvm_tsc_adjust>(),
        ),
    ];
    for (r, n) in recs {
        assert_eq!(r.encode_body().len(), n, "{}", type_name(r.typecode()));
    }
    assert_eq!(
        HvmRecord::Xsave(
            0,
            Xsave {
                area: vec![0; 576],
                ..Xsave::default()
            }
        )
        .encode_body()
        .len(),
        size_of::<xen_abi::hvm_hw_cpu_xsave>()
    );
    assert_eq!(
        HvmRecord::CpuMsr(0, vec![(0x10, 1), (0x3a, 2)])
            .encode_body()
            .len(),
        8 + 2 * 16
    );
}

#[test]
fn hvm_ioapic_lapic_pit_rtc_mtrr_fields_at_save_h_offsets() {
    let mut redirtbl = [0u64; 48];
    redirtbl
        .iter_mut()
        .enumerate()
        .for_each(|(i, e)| *e = 0x0100_0000_0001_0030 + i as u64);
    let a = IoApic {
        base_address: 0xFEC0_0000,
        ioregsel: 0x10,
        id: 0x11,
        redirtbl,
    };
    let b = HvmRecord::IoApic(0, Box::new(a.clone())).encode_body();
    let x = xen_abi::hvm_hw_vioapic::read_from_bytes(&b).unwrap();
    assert_eq!(
        (x.base_address, x.ioregsel, x.id),
        (a.base_address, a.ioregsel, a.id)
    );
    assert_eq!(offset_of!(xen_abi::hvm_hw_vioapic, redirtbl), 16);
    assert_eq!(
        u64::from_le_bytes(b[16 + 47 * 8..][..8].try_into().unwrap()),
        redirtbl[47]
    );

    let l = Lapic {
        apic_base_msr: 0xFEE0_0900,
        disabled: 2,
        timer_divisor: 16,
        tdt_msr: 77,
    };
    let x = xen_abi::hvm_hw_lapic::read_from_bytes(&HvmRecord::Lapic(0, l).encode_body()).unwrap();
    assert_eq!(
        (x.apic_base_msr, x.disabled, x.timer_divisor, x.tdt_msr),
        (l.apic_base_msr, 2, 16, 77)
    );

    let mut p = Pit {
        speaker_data_on: 9,
        ..Pit::default()
    };
    p.channels[2] = PitChannel {
        count: 65536,
        latched_count: 7,
        count_latched: 1,
        status_latched: 2,
        status: 3,
        read_state: 4,
        write_state: 5,
        write_latch: 6,
        rw_mode: 3,
        mode: 2,
        bcd: 0,
        gate: 1,
    };
    let x = xen_abi::hvm_hw_pit::read_from_bytes(&HvmRecord::Pit(0, p).encode_body()).unwrap();
    let c = x.channels[2];
    assert_eq!(
        (
            c.count,
            c.latched_count,
            c.write_latch,
            c.rw_mode,
            c.mode,
            c.gate
        ),
        (65536, 7, 6, 3, 2, 1)
    );
    assert_eq!(x.speaker_data_on, 9);

    let r = Rtc {
        cmos_data: [7; 14],
        cmos_index: 0xB,
        rtc_offset: -3600,
    };
    let x = xen_abi::hvm_hw_rtc::read_from_bytes(&HvmRecord::Rtc(0, r).encode_body()).unwrap();
    assert_eq!(
        (x.cmos_data, x.cmos_index, x.rtc_offset),
        ([7; 14], 0xB, -3600)
    );

    let mut m = Mtrr {
        pat: 0x0007_0406_0007_0406,
        cap: 0x508,
        def_type: 0xC06,
        ..Mtrr::default()
    };
    m.var[15] = 0xFFF;
    m.fixed[10] = 0x0606;
    let x = xen_abi::hvm_hw_mtrr::read_from_bytes(&HvmRecord::Mtrr(0, Box::new(m)).encode_body())
        .unwrap();
    assert_eq!(
        (
            x.msr_pat_cr,
            x.msr_mtrr_var[15],
            x.msr_mtrr_fixed[10],
            x.msr_mtrr_cap,
            x.msr_mtrr_def_type
        ),
        (m.pat, 0xFFF, 0x606, 0x508, 0xC06)
    );
}

#[test]
fn hvm_blob_round_trips_in_xen_order() {
    let recs = vec![
        HvmRecord::TscAdjust(1, 5),
        HvmRecord::Cpu(1, Box::new(distinct_cpu())),
        HvmRecord::Cpu(0, Box::default()),
        HvmRecord::Pic(1, Pic::default()),
        HvmRecord::Pic(
            0,
            Pic {
                is_master: true,
                ..Pic::default()
            },
        ),
        HvmRecord::CpuMsr(0, vec![(0x48, 0), (0x10a, 1)]),
        HvmRecord::Xsave(
            0,
            Xsave {
                xfeature_mask: 7,
                xcr0: 3,
                xcr0_accum: 3,
                area: vec![1; 576],
            },
        ),
        HvmRecord::Other {
            typecode: code::HPET,
            instance: 0,
            data: vec![0; 1048],
        },
    ];
    let hdr = SaveHeader {
        changeset: 0xDEAD,
        cpuid: 0x806E9,
        gtsc_khz: 2_000_000,
    };
    let blob = build(hdr, recs);
    let got = parse(&blob).unwrap();
    let order: Vec<_> = got.iter().map(|r| (r.typecode(), r.instance())).collect();
    assert_eq!(
        order,
        vec![
            (1, 0),
            (2, 0),
            (2, 1),
            (3, 0),
            (3, 1),
            (12, 0),
            (16, 0),
            (19, 1),
            (20, 0)
        ]
    );
    assert_eq!(got[0], HvmRecord::Header(hdr));
    assert_eq!(write(&got), blob);
}

#[test]
fn hvm_blob_errors_name_the_record() {
    let blob = build(
        SaveHeader::default(),
        vec![HvmRecord::Lapic(3, Lapic::default())],
    );
    // Cut inside the LAPIC body.
    let e = parse(&blob[..40]).unwrap_err().to_string();
    assert!(
        e.contains("HVM_CONTEXT record LAPIC instance 3 at offset 0x20") && e.contains("truncated"),
        "{e}"
    );
    // Wrong length for LAPIC.
    let mut bad = blob.clone();
    bad[32 + 4] = 20;
    let e = parse(&bad).unwrap_err().to_string();
    assert!(
        e.contains("LAPIC instance 3") && e.contains("length"),
        "{e}"
    );
    // No HEADER first.
    let e = parse(&write(&[HvmRecord::TscAdjust(0, 0)]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("must start with HEADER"), "{e}");
    // Bad magic.
    let mut bad = blob;
    bad[8] ^= 1;
    assert!(parse(&bad).unwrap_err().to_string().contains("magic"));
}

fn any_record() -> impl Strategy<Value = HvmRecord> {
    prop_oneof![
        (any::<u16>(), prop::collection::vec(any::<u8>(), 1032))
            .prop_map(|(i, b)| { HvmRecord::Cpu(i, Box::new(HvmCpu::decode(&b))) }),
        (any::<u16>(), any::<[u8; 8]>()).prop_map(|(i, b)| HvmRecord::Pic(
            i,
            Pic::decode(&{
                let mut b = b;
                b[5] &= 0x7F; // bit 7 of the flag byte is padding
                b
            })
        )),
        (
            any::<u16>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(|(i, a, d, t, tdt)| HvmRecord::Lapic(
                i,
                Lapic {
                    apic_base_msr: a,
                    disabled: d,
                    timer_divisor: t,
                    tdt_msr: tdt
                }
            )),
        (any::<u16>(), any::<[u8; 14]>(), any::<u8>(), any::<i64>()).prop_map(|(i, c, x, o)| {
            HvmRecord::Rtc(
                i,
                Rtc {
                    cmos_data: c,
                    cmos_index: x,
                    rtc_offset: o,
                },
            )
        }),
        (any::<u16>(), any::<u64>()).prop_map(|(i, v)| HvmRecord::TscAdjust(i, v)),
        (
            any::<u16>(),
            prop::collection::vec((any::<u32>(), any::<u64>()), 0..6)
        )
            .prop_map(|(i, v)| HvmRecord::CpuMsr(i, v)),
        (
            any::<u16>(),
            any::<[u64; 3]>(),
            prop::collection::vec(any::<u8>(), 576..700)
        )
            .prop_map(|(i, x, area)| HvmRecord::Xsave(
                i,
                Xsave {
                    xfeature_mask: x[0],
                    xcr0: x[1],
                    xcr0_accum: x[2],
                    area
                }
            )),
        (
            21u16..200,
            any::<u16>(),
            prop::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(t, i, data)| HvmRecord::Other {
                typecode: t,
                instance: i,
                data
            }),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn hvm_blob_arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse(&b);
        // And with a valid HEADER in front, so the record decoders see the garbage.
        let mut v = write(&[HvmRecord::Header(SaveHeader::default())]);
        v.truncate(32);
        v.extend(&b);
        let _ = parse(&v);
    }

    #[test]
    fn hvm_blob_arbitrary_descriptors_never_panic(
        recs in prop::collection::vec((0u16..24, any::<u16>(), prop::collection::vec(any::<u8>(), 0..1100)), 0..4)
    ) {
        let mut v = write(&[HvmRecord::Header(SaveHeader::default())]);
        v.truncate(32);
        for (t, i, b) in recs {
            v.extend(t.to_le_bytes());
            v.extend(i.to_le_bytes());
            v.extend((b.len() as u32).to_le_bytes());
            v.extend(b);
        }
        v.extend([0u8; 8]);
        let _ = parse(&v);
    }

    #[test]
    fn hvm_blob_write_then_parse_round_trips(recs in prop::collection::vec(any_record(), 0..6)) {
        let mut all = vec![HvmRecord::Header(SaveHeader { changeset: 1, cpuid: 2, gtsc_khz: 3 })];
        all.extend(recs);
        let blob = write(&all);
        prop_assert_eq!(parse(&blob).unwrap(), all);
    }
}
