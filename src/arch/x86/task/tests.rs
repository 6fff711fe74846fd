use super::*;
use iced_x86::{Decoder, DecoderOptions};
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

impl Mem {
    fn w64(&self, at: u64, v: u64) {
        self.write(at, &v.to_le_bytes());
    }
    fn w32(&self, at: u64, v: u32) {
        self.write(at, &v.to_le_bytes());
    }
    fn r32(&self, at: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.read(at, &mut b));
        u32::from_le_bytes(b)
    }
}

/// TSS descriptor for base/limit 0x67 with type `t` (9 available, 0xb busy).
fn tss_desc(base: u64, t: u64) -> u64 {
    0x67 | ((base & 0xff_ffff) << 16) | ((0x80 | t) << 40) | ((base >> 24) << 56)
}

/// GDT at 0x1000: 0x08 code, 0x10 data, 0x18 current TSS (busy, at
/// 0x3000), 0x20 new TSS (available, at 0x3100); far jmp at 0x5000.
fn setup(new_eflags: u32, insn: &[u8]) -> (Mem, kvm_regs, kvm_sregs) {
    let m = Mem(RefCell::new(vec![0; 1 << 16]));
    m.w64(0x1008, 0x00cf_9b00_0000_ffff);
    m.w64(0x1010, 0x00cf_9300_0000_ffff);
    m.w64(0x1018, tss_desc(0x3000, 0xb));
    m.w64(0x1020, tss_desc(0x3100, 9));
    m.w32(0x3100 + 0x20, 0x1000); // EIP
    m.w32(0x3100 + 0x24, new_eflags);
    m.w32(0x3100 + 0x28, 0xaaaa); // EAX
    m.w32(0x3100 + 0x38, 0x800); // ESP
    for off in [0x48, 0x50, 0x54, 0x58, 0x5c] {
        m.w32(0x3100 + off, 0x10);
    }
    m.w32(0x3100 + 0x4c, 0x08);
    m.write(0x5000, insn);
    let mut s = kvm_sregs {
        cr0: 1,
        ..Default::default()
    };
    s.gdt.base = 0x1000;
    s.gdt.limit = 0x27;
    s.cs = x86::flat_segment(0x08, 0xb, 0, false);
    s.ss = x86::flat_segment(0x10, 3, 0, false);
    s.ds = s.ss;
    s.es = s.ss;
    s.fs = s.ss;
    s.gs = s.ss;
    s.tr = x86::descriptor_to_segment(0x18, tss_desc(0x3000, 0xb));
    let r = kvm_regs {
        rip: 0x5000,
        rsp: 0x7000,
        rax: 0x1234,
        rflags: 0x202,
        ..Default::default()
    };
    (m, r, s)
}

fn run(m: &Mem, r: &mut kvm_regs, s: &mut kvm_sregs, vm86_ok: bool) -> Option<Fixup> {
    let mut b = [0u8; 15];
    m.read(0x5000, &mut b);
    let insn = Decoder::with_ip(32, &b, 0x5000, DecoderOptions::NONE).decode();
    let next = 0x5000 + insn.len() as u64;
    far_task_switch(m, r, s, &insn, next, &|| vm86_ok)
}

const JMP_TSS: [u8; 7] = [0xea, 0, 0, 0, 0, 0x20, 0];

#[test]
fn far_task_switch_jmp_saves_old_loads_new_and_moves_busy() {
    let (m, mut r, mut s) = setup(0x202, &JMP_TSS);
    assert_eq!(run(&m, &mut r, &mut s, true), Some(Fixup::Resume));
    assert_eq!((r.rip, r.rsp, r.rax), (0x1000, 0x800, 0xaaaa));
    assert_eq!((s.tr.selector, s.tr.base, s.tr.type_), (0x20, 0x3100, 0xb));
    assert_ne!(s.cr0 & CR0_TS, 0);
    assert_eq!(m.r32(0x3000 + 0x20), 0x5007, "old EIP after the jmp");
    assert_eq!(m.r32(0x3000 + 0x28), 0x1234, "old EAX");
    assert_eq!(m.r32(0x101c) >> 8 & 0xf, 9, "old TSS no longer busy");
    assert_eq!(m.r32(0x1024) >> 8 & 0xf, 0xb, "new TSS busy");
}

#[test]
fn far_task_switch_into_vm86_loads_vm86_segments_or_names_the_host_limit() {
    let (m, mut r, mut s) = setup(0x2_3002, &JMP_TSS);
    assert_eq!(run(&m, &mut r, &mut s, true), Some(Fixup::Resume));
    assert_eq!((s.cs.base, s.cs.limit, s.cs.dpl), (0x80, 0xffff, 3));
    let (m, mut r, mut s) = setup(0x2_3002, &JMP_TSS);
    assert!(matches!(
        run(&m, &mut r, &mut s, false),
        Some(Fixup::Unhandled(w)) if w.contains("needs virtual-8086 mode")
    ));
}

#[test]
fn far_task_switch_busy_tss_raises_gp_and_code_segment_is_not_a_switch() {
    let (m, mut r, mut s) = setup(0x202, &JMP_TSS);
    m.w64(0x1020, tss_desc(0x3100, 0xb));
    assert_eq!(
        run(&m, &mut r, &mut s, true),
        Some(Fixup::Exception {
            vector: x86::GP,
            error_code: Some(0x20)
        })
    );
    let (m, mut r, mut s) = setup(0x202, &[0xea, 0, 0, 0, 0, 0x08, 0]);
    assert_eq!(run(&m, &mut r, &mut s, true), None);
}
