use super::*;
use proptest::prelude::*;
use std::cell::RefCell;

/// 1 MiB of fake guest RAM, paging off.
struct Mem(RefCell<Vec<u8>>);

impl Mem {
    fn new() -> Mem {
        Mem(RefCell::new(vec![0; 1 << 20]))
    }
    fn w64(&self, at: u64, v: u64) {
        self.write(at, &v.to_le_bytes());
    }
    fn r64(&self, at: u64) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.read(at, &mut b));
        u64::from_le_bytes(b)
    }
    fn r32(&self, at: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.read(at, &mut b));
        u32::from_le_bytes(b)
    }
}

impl PhysMem for Mem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let m = self.0.borrow();
        let Some(end) = gpa.checked_add(buf.len() as u64) else {
            return false;
        };
        if end > m.len() as u64 {
            return false;
        }
        buf.copy_from_slice(&m[gpa as usize..end as usize]);
        true
    }
    fn write(&self, gpa: u64, data: &[u8]) -> bool {
        let mut m = self.0.borrow_mut();
        let Some(end) = gpa.checked_add(data.len() as u64) else {
            return false;
        };
        if end > m.len() as u64 {
            return false;
        }
        m[gpa as usize..end as usize].copy_from_slice(data);
        true
    }
}

const GDT: u64 = 0x1000;
const IDT: u64 = 0x2000;
const TSS: u64 = 0x3000;
const USER_RIP: u64 = 0x4000;
const HANDLER: u64 = 0x5000;
const RSP0: u64 = 0x9000;

/// A long-mode gate (16 bytes) to HANDLER + vector, selector 0x08.
fn gate64(m: &Mem, vector: u8, attr: u8, ist: u8) {
    let h = HANDLER + u64::from(vector);
    let lo = (h & 0xffff)
        | (0x08 << 16)
        | (u64::from(ist) << 32)
        | (u64::from(attr) << 40)
        | ((h >> 16 & 0xffff) << 48);
    m.w64(IDT + u64::from(vector) * 16, lo);
    m.w64(IDT + u64::from(vector) * 16 + 8, h >> 32);
}

/// Long mode at the #UD handler after a user #UD at USER_RIP.
fn long_setup(m: &Mem, code: &[u8]) -> (kvm_regs, kvm_sregs) {
    m.w64(GDT + 0x08, 0x00af_9b00_0000_ffff);
    m.w64(GDT + 0x10, 0x00cf_9300_0000_ffff);
    m.w64(GDT + 0x18, 0x00af_fb00_0000_ffff);
    m.w64(GDT + 0x20, 0x00cf_f300_0000_ffff);
    for v in 0..=0x30u8 {
        gate64(m, v, 0xee, 0); // present, DPL 3, interrupt gate
    }
    m.w64(TSS + 4, RSP0);
    m.w64(TSS + 0x24, 0x7_0000); // IST1
    m.write(USER_RIP, code);
    // The #UD frame the CPU pushed at RSP0 - 40.
    let sp = RSP0 - 40;
    for (i, v) in [USER_RIP, 0x1b, 0x1_0202, 0x7000, 0x23].iter().enumerate() {
        m.w64(sp + 8 * i as u64, *v);
    }
    let mut s = kvm_sregs {
        cr0: 1,
        efer: EFER_LMA | (1 << 8),
        ..Default::default()
    };
    s.gdt.base = GDT;
    s.gdt.limit = 0x27;
    s.idt.base = IDT;
    s.idt.limit = 0x30 * 16 + 15;
    s.tr.base = TSS;
    s.tr.limit = 0x67;
    s.tr.selector = 0x28;
    s.cs = x86::flat_segment(0x08, 0xb, 0, true);
    s.ss = x86::flat_segment(0x10, 0x3, 0, true);
    let r = kvm_regs {
        rip: HANDLER + 6,
        rsp: sp,
        rflags: 2,
        ..Default::default()
    };
    (r, s)
}

fn frame64(m: &Mem, rsp: u64) -> [u64; 5] {
    [0, 1, 2, 3, 4].map(|i| m.r64(rsp + 8 * i))
}

#[test]
fn handle_ud_user_int_n_long_mode_delivered_on_rsp0_with_if_cleared() {
    let m = Mem::new();
    let (mut r, mut s) = long_setup(&m, &[0xcd, 0x20]);
    assert_eq!(
        handle_ud(&m, &mut r, &mut s),
        UdOutcome::Delivered { vector: 0x20 }
    );
    assert_eq!(r.rip, HANDLER + 0x20);
    assert_eq!(r.rsp, RSP0 - 40);
    assert_eq!(
        frame64(&m, r.rsp),
        [USER_RIP + 2, 0x1b, 0x202, 0x7000, 0x23]
    );
    assert_eq!(r.rflags & RFLAGS_IF, 0, "interrupt gate clears IF");
    assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (0x08, 0, 1));
}

#[test]
fn handle_ud_user_int_n_dpl0_gate_raises_gp_at_the_instruction() {
    let m = Mem::new();
    let (mut r, mut s) = long_setup(&m, &[0x67, 0xcd, 0x21]);
    gate64(&m, 0x21, 0x8e, 0); // DPL 0
    assert_eq!(
        handle_ud(&m, &mut r, &mut s),
        UdOutcome::Delivered { vector: 13 }
    );
    assert_eq!(r.rip, HANDLER + 13);
    let f = [0, 1, 2, 3, 4, 5].map(|i| m.r64(r.rsp + 8 * i));
    assert_eq!(f[0], 0x21 * 8 + 2, "error code");
    assert_eq!(f[1], USER_RIP, "fault: RIP at the int");
}

#[test]
fn handle_ud_user_icebp_ignores_gate_dpl_not_present_sets_ext() {
    let m = Mem::new();
    let (mut r, mut s) = long_setup(&m, &[0xf1]);
    gate64(&m, 1, 0x8e, 0);
    assert_eq!(
        handle_ud(&m, &mut r, &mut s),
        UdOutcome::Delivered { vector: 1 }
    );
    assert_eq!(m.r64(r.rsp), USER_RIP + 1);
    let (mut r, mut s) = long_setup(&m, &[0xf1]);
    gate64(&m, 1, 0x6e, 0); // not present
    assert_eq!(
        handle_ud(&m, &mut r, &mut s),
        UdOutcome::Delivered { vector: 11 }
    );
    assert_eq!(m.r64(r.rsp), 8 + 3, "#NP(IDT[1], EXT)");
}

#[test]
fn handle_ud_ist_gate_switches_to_the_ist_stack() {
    let m = Mem::new();
    let (mut r, mut s) = long_setup(&m, &[0xcd, 0x22]);
    gate64(&m, 0x22, 0xef, 1); // trap gate, IST1
    assert_eq!(
        handle_ud(&m, &mut r, &mut s),
        UdOutcome::Delivered { vector: 0x22 }
    );
    assert_eq!(r.rsp, 0x7_0000 - 40);
    assert_ne!(r.rflags & RFLAGS_IF, 0, "trap gate keeps IF");
}

#[test]
fn handle_ud_short_tss_raises_ts_with_the_tss_selector() {
    // XTF lm-ts: a DPL-3 gate to a ring-1 code segment, with the TSS limit
    // ending before RSP1.
    let m = Mem::new();
    let (mut r, mut s) = long_setup(&m, &[0xcd, 0x20]);
    m.w64(GDT + 0x30, 0x00af_bb00_0000_ffff);
    s.gdt.limit = 0x37;
    let h = HANDLER + 0x20;
    m.w64(
        IDT + 0x20 * 16,
        (h & 0xffff) | (0x31 << 16) | (0xee << 40) | ((h >> 16 & 0xffff) << 48),
    );
    s.tr.limit = 11;
    assert_eq!(
        handle_ud(&m, &mut r, &mut s),
        UdOutcome::Delivered { vector: 10 }
    );
    assert_eq!(m.r64(r.rsp), 0x28, "#TS(TSS selector)");
    assert_eq!(m.r64(r.rsp + 8), USER_RIP, "fault: RIP at the int");
}

#[test]
fn handle_ud_real_ud_and_kernel_frames_are_not_ours() {
    let m = Mem::new();
    let (mut r, mut s) = long_setup(&m, &[0x0f, 0x0b]);
    assert_eq!(handle_ud(&m, &mut r, &mut s), UdOutcome::NotOurs);
    let (mut r, mut s) = long_setup(&m, &[0xcd, 0x20]);
    m.w64(r.rsp + 8, 0x08);
    assert_eq!(handle_ud(&m, &mut r, &mut s), UdOutcome::NotOurs);
    // into is #UD in 64-bit mode.
    let (mut r, mut s) = long_setup(&m, &[0xce]);
    assert_eq!(handle_ud(&m, &mut r, &mut s), UdOutcome::NotOurs);
}

#[test]
fn handle_ud_user_int_n_32bit_switches_to_ss0_esp0() {
    let m = Mem::new();
    m.w64(GDT + 0x08, 0x00cf_9b00_0000_ffff);
    m.w64(GDT + 0x10, 0x00cf_9300_0000_ffff);
    m.w64(GDT + 0x18, 0x00cf_fb00_0000_ffff);
    m.w64(GDT + 0x20, 0x00cf_f300_0000_ffff);
    let h = HANDLER + 0x80;
    m.w64(
        IDT + 0x80 * 8,
        (h & 0xffff) | (0x08 << 16) | (0xee << 40) | ((h >> 16) << 48),
    );
    m.write(TSS + 4, &(RSP0 as u32).to_le_bytes());
    m.write(TSS + 8, &0x10u32.to_le_bytes());
    m.write(USER_RIP, &[0xcd, 0x80]);
    let sp = RSP0 - 20;
    for (i, v) in [USER_RIP as u32, 0x1b, 0x202, 0x7000, 0x23]
        .iter()
        .enumerate()
    {
        m.write(sp + 4 * i as u64, &v.to_le_bytes());
    }
    let mut s = kvm_sregs {
        cr0: 1,
        ..Default::default()
    };
    s.gdt.base = GDT;
    s.gdt.limit = 0x27;
    s.idt.base = IDT;
    s.idt.limit = 0x7ff;
    s.tr.base = TSS;
    s.tr.limit = 0x67;
    s.cs = x86::flat_segment(0x08, 0xb, 0, false);
    s.ss = x86::flat_segment(0x10, 0x3, 0, false);
    let mut r = kvm_regs {
        rsp: sp,
        rflags: 2,
        ..Default::default()
    };
    assert_eq!(
        handle_ud(&m, &mut r, &mut s),
        UdOutcome::Delivered { vector: 0x80 }
    );
    assert_eq!((r.rip, r.rsp), (h, RSP0 - 20));
    let f: Vec<u32> = (0..5).map(|i| m.r32(r.rsp + 4 * i)).collect();
    assert_eq!(f, vec![USER_RIP as u32 + 2, 0x1b, 0x202, 0x7000, 0x23]);
    assert_eq!((s.ss.selector, s.ss.dpl, s.cs.dpl), (0x10, 0, 0));
}

#[test]
fn step_over_entry_push_imm_emulated() {
    let m = Mem::new();
    let (mut r, s) = long_setup(&m, &[]);
    let insn = Decoder::with_ip(64, &[0x6a, 0x00], r.rip, DecoderOptions::NONE).decode();
    let sp = r.rsp;
    m.w64(sp - 8, u64::MAX);
    assert!(step_over_entry(&m, &insn, &mut r, &s));
    assert_eq!((r.rsp, m.r64(sp - 8), r.rip), (sp - 8, 0, HANDLER + 8));
    let mov = Decoder::with_ip(64, &[0x48, 0x89, 0xe5], 0, DecoderOptions::NONE).decode();
    assert!(!step_over_entry(&m, &mov, &mut r, &s));
}

/// Software-interrupt-like instruction bytes with random prefixes.
fn swint_bytes() -> impl Strategy<Value = Vec<u8>> {
    let prefix = prop::sample::select(vec![
        0x66u8, 0x67, 0xf2, 0xf3, 0x2e, 0x3e, 0x26, 0x64, 0x65, 0x36, 0xf0, 0x48, 0x40,
    ]);
    let op = prop::sample::select(vec![0xcdu8, 0xcc, 0xce, 0xf1, 0x0f, 0x90]);
    (
        prop::collection::vec(prefix, 0..16),
        op,
        prop::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|(mut p, op, rest)| {
            p.push(op);
            p.extend(rest);
            p
        })
}

proptest! {
    #[test]
    fn decode_swint_random_prefixes_never_panic(bytes in swint_bytes(), bits in prop::sample::select(vec![16u32, 32, 64, 7])) {
        if let Some(sw) = decode_swint(&bytes, bits, 0x1000) {
            prop_assert!(sw.len as usize <= bytes.len());
        }
    }

    #[test]
    fn handle_ud_random_frames_gates_and_bytes_never_panic(
        bytes in swint_bytes(),
        cs in any::<u16>(),
        ss in any::<u16>(),
        rip in prop_oneof![Just(USER_RIP), any::<u64>()],
        ursp in any::<u64>(),
        rflags in any::<u64>(),
        attr in any::<u8>(),
        ist in 0u8..8,
        idt_limit in any::<u16>(),
        tr_limit in 0u32..0x100,
        rsp0 in any::<u64>(),
        long in any::<bool>(),
    ) {
        let m = Mem::new();
        let (mut r, mut s) = long_setup(&m, &bytes);
        if !long {
            s.efer = 0;
        }
        let v = bytes.iter().position(|&b| b == 0xcd).and_then(|i| bytes.get(i + 1)).copied().unwrap_or(3);
        gate64(&m, v, attr, ist);
        gate64(&m, 13, attr.rotate_left(1), ist);
        m.w64(TSS + 4, rsp0);
        s.idt.limit = idt_limit;
        s.tr.limit = tr_limit;
        for (i, w) in [rip, u64::from(cs), rflags, ursp, u64::from(ss)].iter().enumerate() {
            m.w64(r.rsp + 8 * i as u64, *w);
        }
        let _ = handle_ud(&m, &mut r, &mut s);
    }
}

#[test]
fn handle_ud_vm86_int_n_pushes_the_vm86_frame_and_nulls_data_segments() {
    let m = Mem::new();
    m.w64(GDT + 0x08, 0x00cf_9b00_0000_ffff);
    m.w64(GDT + 0x10, 0x00cf_9300_0000_ffff);
    let h = HANDLER + 0x40;
    m.w64(
        IDT + 0x40 * 8,
        (h & 0xffff) | (0x08 << 16) | (0xee << 40) | ((h >> 16) << 48),
    );
    m.write(TSS + 4, &(RSP0 as u32).to_le_bytes());
    m.write(TSS + 8, &0x10u32.to_le_bytes());
    // vm86 CS 0x100: int $0x40 at linear 0x1000 + 0x10.
    m.write(0x1010, &[0xcd, 0x40]);
    let sp = RSP0 - 36;
    let eflags = 0x2_3202u32; // VM, IOPL 3, IF
    for (i, v) in [0x10u32, 0x100, eflags, 0x800, 0x200, 1, 2, 3, 4]
        .iter()
        .enumerate()
    {
        m.write(sp + 4 * i as u64, &v.to_le_bytes());
    }
    let mut s = kvm_sregs {
        cr0: 1,
        ..Default::default()
    };
    s.gdt.base = GDT;
    s.gdt.limit = 0x17;
    s.idt.base = IDT;
    s.idt.limit = 0x7ff;
    s.tr.base = TSS;
    s.tr.limit = 0x67;
    s.cs = x86::flat_segment(0x08, 0xb, 0, false);
    s.ss = x86::flat_segment(0x10, 0x3, 0, false);
    let mut r = kvm_regs {
        rsp: sp,
        rflags: 2,
        ..Default::default()
    };
    assert_eq!(
        handle_ud(&m, &mut r, &mut s),
        UdOutcome::Delivered { vector: 0x40 }
    );
    assert_eq!((r.rip, r.rsp), (h, RSP0 - 36));
    let f: Vec<u32> = (0..9).map(|i| m.r32(r.rsp + 4 * i)).collect();
    assert_eq!(f, vec![0x12, 0x100, eflags, 0x800, 0x200, 1, 2, 3, 4]);
    assert_eq!(r.rflags & (RFLAGS_VM | RFLAGS_IF), 0);
    assert_eq!(s.ds.unusable, 1);
}

/// A trap-style frame (RIP after the instruction) at RSP0 - 40 (+8 with an
/// error code) for code at USER_RIP with CS `cs`.
fn trap_frame(m: &Mem, r: &mut kvm_regs, len: u64, cs: u64, error: bool) {
    let mut sp = RSP0 - 40;
    if error {
        sp -= 8;
        m.w64(sp, 0);
    }
    let base = if error { sp + 8 } else { sp };
    for (i, v) in [USER_RIP + len, cs, 0x202, 0x7000, 0x23].iter().enumerate() {
        m.w64(base + 8 * i as u64, *v);
    }
    r.rsp = sp;
}

#[test]
fn x86_gates_handle_bp_user_int3_through_dpl0_gate_becomes_gp_at_the_int3() {
    let m = Mem::new();
    let (mut r, mut s) = long_setup(&m, &[0x67, 0xcc]);
    gate64(&m, 3, 0x8e, 0);
    trap_frame(&m, &mut r, 2, 0x1b, false);
    assert_eq!(
        crate::arch::x86::gates::handle_bp(&m, &mut r, &mut s),
        UdOutcome::Delivered { vector: 13 }
    );
    assert_eq!(m.r64(r.rsp), 3 * 8 + 2);
    assert_eq!(m.r64(r.rsp + 8), USER_RIP, "RIP at the prefix");
    // A DPL-3 gate: the #BP was right, the handler runs.
    let (mut r, mut s) = long_setup(&m, &[0xcc]);
    trap_frame(&m, &mut r, 1, 0x1b, false);
    assert_eq!(
        crate::arch::x86::gates::handle_bp(&m, &mut r, &mut s),
        UdOutcome::NotOurs
    );
}

#[test]
fn x86_gates_handle_df_absent_gate_becomes_np_with_ext_for_icebp() {
    let m = Mem::new();
    let (mut r, mut s) = long_setup(&m, &[0xf1]);
    gate64(&m, 1, 0x6e, 0);
    trap_frame(&m, &mut r, 1, 0x1b, true);
    assert_eq!(
        crate::arch::x86::gates::handle_df(&m, &mut r, &mut s),
        UdOutcome::Delivered { vector: 11 }
    );
    assert_eq!(m.r64(r.rsp), 8 + 3, "#NP(IDT[1], EXT)");
    assert_eq!(m.r64(r.rsp + 8), USER_RIP);
    // int $0x21 through an absent gate.
    let (mut r, mut s) = long_setup(&m, &[0xcd, 0x21]);
    gate64(&m, 1, 0xee, 0);
    gate64(&m, 0x21, 0x6e, 0);
    trap_frame(&m, &mut r, 2, 0x1b, true);
    assert_eq!(
        crate::arch::x86::gates::handle_df(&m, &mut r, &mut s),
        UdOutcome::Delivered { vector: 11 }
    );
    assert_eq!(m.r64(r.rsp), 0x21 * 8 + 2);
    // All gates present: a real #DF.
    let (mut r, mut s) = long_setup(&m, &[0xcc]);
    gate64(&m, 0x21, 0xee, 0);
    trap_frame(&m, &mut r, 1, 0x1b, true);
    assert_eq!(
        crate::arch::x86::gates::handle_df(&m, &mut r, &mut s),
        UdOutcome::NotOurs
    );
}

proptest! {
    #[test]
    fn x86_gates_random_frames_and_gates_never_panic(
        bytes in swint_bytes(),
        attrs in prop::collection::vec(any::<u8>(), 4),
        frame in prop::collection::vec(any::<u64>(), 6),
        long in any::<bool>(),
    ) {
        let m = Mem::new();
        let (mut r, mut s) = long_setup(&m, &bytes);
        if !long {
            s.efer = 0;
        }
        for (v, a) in [1u8, 3, 8, 11].iter().zip(&attrs) {
            gate64(&m, *v, *a, 0);
        }
        for (i, w) in frame.iter().enumerate() {
            m.w64(r.rsp + 8 * i as u64, *w);
        }
        let (mut r2, mut s2) = (r, s);
        let _ = crate::arch::x86::gates::handle_bp(&m, &mut r, &mut s);
        let _ = crate::arch::x86::gates::handle_df(&m, &mut r2, &mut s2);
        let _ = crate::arch::x86::gates::handle_ss(&m, &mut r, &mut s);
    }
}

#[test]
fn x86_gates_handle_ss_explicit_ss_override_noncanonical_becomes_gp() {
    let m = Mem::new();
    // mov %ss:(%rax), %rax with RAX non-canonical.
    let (mut r, mut s) = long_setup(&m, &[0x36, 0x48, 0x8b, 0x00]);
    r.rax = 0x8000_0000_4000_0000;
    trap_frame(&m, &mut r, 0, 0x1b, true);
    assert_eq!(
        crate::arch::x86::gates::handle_ss(&m, &mut r, &mut s),
        UdOutcome::Delivered { vector: 13 }
    );
    assert_eq!((m.r64(r.rsp), m.r64(r.rsp + 8)), (0, USER_RIP));
    // Through RSP the access is a stack access: #SS is right.
    let (mut r, mut s) = long_setup(&m, &[0x36, 0x48, 0x8b, 0x04, 0x24]);
    trap_frame(&m, &mut r, 0, 0x1b, true);
    assert_eq!(
        crate::arch::x86::gates::handle_ss(&m, &mut r, &mut s),
        UdOutcome::NotOurs
    );
}
