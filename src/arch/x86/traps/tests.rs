use super::*;
use iced_x86::{Decoder, DecoderOptions};
use proptest::prelude::*;
use std::cell::RefCell;

struct Mem(RefCell<Vec<u8>>);

impl PhysMem for Mem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let m = self.0.borrow();
        match gpa.checked_add(buf.len() as u64) {
            Some(end) if end <= m.len() as u64 => {
                buf.copy_from_slice(&m[gpa as usize..end as usize]);
                true
            }
            _ => false,
        }
    }
    fn write(&self, gpa: u64, data: &[u8]) -> bool {
        let mut m = self.0.borrow_mut();
        match gpa.checked_add(data.len() as u64) {
            Some(end) if end <= m.len() as u64 => {
                m[gpa as usize..end as usize].copy_from_slice(data);
                true
            }
            _ => false,
        }
    }
}

struct Env;

impl EmuEnv for Env {
    fn rdtsc(&self) -> u64 {
        0
    }
    fn tsc_aux(&self) -> u64 {
        0
    }
    fn xcr0(&self) -> u64 {
        7
    }
    fn fpu_status(&self) -> u16 {
        0
    }
    fn mxcsr(&self) -> u32 {
        0x1f80
    }
    fn set_mxcsr(&self, _: u32) -> bool {
        true
    }
    fn xmm(&self, n: usize) -> Option<[u8; 16]> {
        (n < 16).then_some([n as u8; 16])
    }
    fn set_xmm(&self, n: usize, _: [u8; 16]) -> bool {
        n < 16
    }
}

fn setup(code: &[u8]) -> (Mem, kvm_regs, kvm_sregs) {
    let m = Mem(RefCell::new(vec![0; 1 << 16]));
    m.write(0x1000, code);
    // IDT at 0x2000, 8-byte gates, all present.
    for v in 0..32u64 {
        m.write(0x2000 + v * 8, &0x0000_8e00_0008_0000u64.to_le_bytes());
    }
    let mut s = kvm_sregs {
        cr0: 1,
        cr4: CR4_OSFXSR | CR4_OSXSAVE,
        ..Default::default()
    };
    s.cs = x86::flat_segment(8, 0xb, 0, false);
    s.ss = x86::flat_segment(0x10, 3, 0, false);
    s.idt.base = 0x2000;
    s.idt.limit = 32 * 8 - 1;
    let r = kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    (m, r, s)
}

fn run(code: &[u8], f: impl FnOnce(&Mem, &mut kvm_sregs)) -> (Option<Fixup>, u64) {
    let (m, mut r, mut s) = setup(code);
    f(&m, &mut s);
    let insn = Decoder::with_ip(32, code, 0x1000, DecoderOptions::NONE).decode();
    let out = fixup(&m, &Env, &mut r, &mut s, &insn);
    (out, r.rip)
}

#[test]
fn fp_exception_matches_the_sdm_tables() {
    let (em, ts, mp) = (CR0_EM, CR0_TS, 1 << 1);
    for cr0 in [0, ts, mp, mp | ts, em, em | ts, em | mp, em | mp | ts] {
        let x87 = (cr0 & (em | ts) != 0).then_some(x86::NM);
        assert_eq!(
            fp_exception(FpClass::X87, cr0, 0, 0),
            x87,
            "x87 cr0={cr0:#x}"
        );
        let mmx = if cr0 & em != 0 {
            Some(x86::UD)
        } else if cr0 & ts != 0 {
            Some(x86::NM)
        } else {
            None
        };
        assert_eq!(fp_exception(FpClass::Mmx, cr0, 0, 0), mmx);
        assert_eq!(fp_exception(FpClass::Sse, cr0, CR4_OSFXSR, 0), mmx);
        assert_eq!(fp_exception(FpClass::Sse, cr0, 0, 0), Some(x86::UD));
        let avx = (cr0 & ts != 0).then_some(x86::NM);
        assert_eq!(fp_exception(FpClass::Avx, cr0, CR4_OSXSAVE, 7), avx);
        assert_eq!(
            fp_exception(FpClass::Avx, cr0, CR4_OSXSAVE, 3),
            Some(x86::UD)
        );
    }
}

#[test]
fn fixup_fnop_runs_without_ts_em_and_raises_nm_with_them() {
    assert_eq!(run(&[0xd9, 0xd0], |_, _| {}), (Some(Fixup::Resume), 0x1002));
    let (f, rip) = run(&[0xd9, 0xd0], |_, s| s.cr0 |= CR0_TS);
    assert_eq!((f, rip), (Some(exception(x86::NM)), 0x1000));
}

#[test]
fn fixup_icebp_kernel_traps_db_and_not_present_gate_raises_np_ext() {
    assert_eq!(run(&[0xf1], |_, _| {}), (Some(exception(DB)), 0x1001));
    let (f, rip) = run(&[0xf1], |m, _| {
        m.write(0x2008, &0x0000_0e00_0008_0000u64.to_le_bytes());
    });
    assert_eq!(
        (f, rip),
        (
            Some(Fixup::Exception {
                vector: x86::NP,
                error_code: Some(11)
            }),
            0x1000
        )
    );
}

#[test]
fn fixup_vmx_and_svm_instructions_raise_ud_when_disabled() {
    // vmclear (%eax); vmrun
    assert_eq!(
        run(&[0x66, 0x0f, 0xc7, 0x30], |_, _| {}).0,
        Some(exception(x86::UD))
    );
    assert_eq!(
        run(&[0x0f, 0x01, 0xd8], |_, _| {}).0,
        Some(exception(x86::UD))
    );
    assert_eq!(run(&[0x0f, 0x01, 0xc4], |_, s| s.cr4 |= CR4_VMXE).0, None);
}

fn insn_bytes() -> impl Strategy<Value = Vec<u8>> {
    let prefix = prop::sample::select(vec![0x66u8, 0x67, 0xf2, 0xf3, 0x2e, 0xf0, 0x9b]);
    let op: Vec<Vec<u8>> = vec![
        vec![0xf1],
        vec![0xcd],
        vec![0xd8],
        vec![0xd9],
        vec![0xdb],
        vec![0xdf],
        vec![0x0f, 0x01],
        vec![0x0f, 0xc7],
        vec![0x0f, 0x78],
        vec![0x0f, 0x79],
        vec![0x0f, 0x10],
        vec![0x0f, 0x6f],
        vec![0xc5, 0xf8, 0x10],
        vec![0xea],
        vec![0x9a],
    ];
    (
        prop::collection::vec(prefix, 0..6),
        prop::sample::select(op),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(mut p, op, rest)| {
            p.extend(op);
            p.extend(rest);
            p
        })
}

proptest! {
    #[test]
    fn fixup_random_fp_vmx_icebp_forms_never_panic(
        bytes in insn_bytes(),
        cr0 in any::<u64>(),
        cr4 in any::<u64>(),
        efer in any::<u64>(),
        idt_limit in any::<u16>(),
        gdt_limit in any::<u16>(),
        bits in prop::sample::select(vec![16u32, 32, 64]),
    ) {
        let (m, mut r, mut s) = setup(&bytes);
        s.cr0 = cr0;
        s.cr4 = cr4;
        s.efer = efer;
        s.idt.limit = idt_limit;
        s.gdt.limit = gdt_limit;
        let insn = Decoder::with_ip(bits, &bytes, 0x1000, DecoderOptions::NONE).decode();
        let _ = fixup(&m, &Env, &mut r, &mut s, &insn);
    }
}

#[test]
fn fixup_vex128_move_uses_env_and_raises_nm_under_ts() {
    // vmovups %xmm1,%xmm0 (c5 f8 10 c1): the fake env refuses VEX moves.
    assert_eq!(run(&[0xc5, 0xf8, 0x10, 0xc1], |_, _| {}).0, None);
    assert_eq!(
        run(&[0xc5, 0xf8, 0x10, 0xc1], |_, s| s.cr0 |= CR0_TS).0,
        Some(exception(x86::NM))
    );
    assert_eq!(
        run(&[0xc5, 0xf8, 0x10, 0xc1], |_, s| s.cr4 &= !CR4_OSXSAVE).0,
        Some(exception(x86::UD))
    );
}
