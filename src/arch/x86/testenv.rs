//! A fake machine for the fix-up tests of xsave.rs, x87.rs and invpcid.rs:
//! flat RAM, paging off, and a vCPU whose x87/SSE/AVX state is one XSAVE
//! buffer in KVM's layout (as `kvm::vcpu` keeps it).

use std::cell::{Cell, RefCell};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use crate::arch::x86::{flat_segment, xsave, EmuEnv, Fixup, PhysMem};

pub const RAM: usize = 0x30_0000;
pub const CODE: u64 = 0x1000;
pub const DATA: u64 = 0x20_0000;

pub struct Mem(pub RefCell<Vec<u8>>);

impl Mem {
    pub fn new() -> Mem {
        Mem(RefCell::new(vec![0; RAM]))
    }
    pub fn put(&self, gpa: u64, data: &[u8]) {
        self.0.borrow_mut()[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
    }
    pub fn get(&self, gpa: u64, n: usize) -> Vec<u8> {
        self.0.borrow()[gpa as usize..gpa as usize + n].to_vec()
    }
}

impl PhysMem for Mem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let m = self.0.borrow();
        let Some(src) = usize::try_from(gpa)
            .ok()
            .and_then(|a| m.get(a..a.checked_add(buf.len())?))
        else {
            return false;
        };
        buf.copy_from_slice(src);
        true
    }
    fn write(&self, gpa: u64, data: &[u8]) -> bool {
        let mut m = self.0.borrow_mut();
        let Some(dst) = usize::try_from(gpa)
            .ok()
            .and_then(|a| m.get_mut(a..a.checked_add(data.len())?))
        else {
            return false;
        };
        dst.copy_from_slice(data);
        true
    }
}

pub struct Env {
    pub area: RefCell<Vec<u8>>,
    pub xcr0: u64,
    pub xss: u64,
    pub flushes: Cell<u32>,
    pub layout: xsave::XstateLayout,
}

impl Env {
    /// x87, SSE and AVX enabled; FCW 0x37f, MXCSR 0x1f80 (MXCSR_MASK
    /// 0xffff), nothing in use.
    pub fn new() -> Env {
        let mut a = vec![0u8; xsave::KVM_AREA];
        a[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
        a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        a[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        Env {
            area: RefCell::new(a),
            xcr0: 7,
            xss: 0,
            flushes: Cell::new(0),
            layout: xsave::XstateLayout::sdm(),
        }
    }
}

impl EmuEnv for Env {
    fn rdtsc(&self) -> u64 {
        0
    }
    fn tsc_aux(&self) -> u64 {
        0
    }
    fn xcr0(&self) -> u64 {
        self.xcr0
    }
    fn fpu_status(&self) -> u16 {
        self.fpu().map(|f| f.fsw).unwrap_or(0)
    }
    fn mxcsr(&self) -> u32 {
        self.fpu().map(|f| f.mxcsr).unwrap_or(0)
    }
    fn set_mxcsr(&self, v: u32) -> bool {
        self.area.borrow_mut()[24..28].copy_from_slice(&v.to_le_bytes());
        true
    }
    fn xmm(&self, n: usize) -> Option<[u8; 16]> {
        self.fpu().and_then(|f| f.xmm.get(n).copied())
    }
    fn set_xmm(&self, n: usize, v: [u8; 16]) -> bool {
        let mut f = self.fpu().unwrap();
        f.xmm[n] = v;
        self.set_fpu(&f)
    }
    fn fpu(&self) -> Option<kvm_fpu> {
        let b = self.area.borrow();
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let mut f = kvm_fpu {
            fcw: u16_at(0),
            fsw: u16_at(2),
            ftwx: b[4],
            last_opcode: u16_at(6),
            last_ip: u64::from_le_bytes(b[8..16].try_into().ok()?),
            last_dp: u64::from_le_bytes(b[16..24].try_into().ok()?),
            mxcsr: u32::from_le_bytes(b[24..28].try_into().ok()?),
            ..Default::default()
        };
        for (i, r) in f.fpr.iter_mut().enumerate() {
            r.copy_from_slice(&b[32 + 16 * i..48 + 16 * i]);
        }
        for (i, r) in f.xmm.iter_mut().enumerate() {
            r.copy_from_slice(&b[160 + 16 * i..176 + 16 * i]);
        }
        Some(f)
    }
    fn set_fpu(&self, f: &kvm_fpu) -> bool {
        let mut b = self.area.borrow_mut();
        b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
        b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
        b[4] = f.ftwx;
        b[6..8].copy_from_slice(&f.last_opcode.to_le_bytes());
        b[8..16].copy_from_slice(&f.last_ip.to_le_bytes());
        b[16..24].copy_from_slice(&f.last_dp.to_le_bytes());
        b[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
        for (i, r) in f.fpr.iter().enumerate() {
            b[32 + 16 * i..48 + 16 * i].copy_from_slice(r);
        }
        for (i, r) in f.xmm.iter().enumerate() {
            b[160 + 16 * i..176 + 16 * i].copy_from_slice(r);
        }
        b[512] |= 3;
        true
    }
    fn xsave_area(&self) -> Option<Vec<u8>> {
        Some(self.area.borrow().clone())
    }
    fn set_xsave_area(&self, area: &[u8]) -> bool {
        // KVM refuses a reserved MXCSR bit and state outside XCR0.
        let mxcsr = u32::from_le_bytes(area[24..28].try_into().unwrap());
        let bv = u64::from_le_bytes(area[512..520].try_into().unwrap());
        if mxcsr >> 16 != 0 || bv & !self.xcr0 != 0 {
            return false;
        }
        self.area
            .borrow_mut()
            .copy_from_slice(&area[..xsave::KVM_AREA]);
        true
    }
    fn xss(&self) -> u64 {
        self.xss
    }
    fn xstate_layout(&self) -> xsave::XstateLayout {
        self.layout.clone()
    }
    fn flush_guest_tlb(&self) -> bool {
        self.flushes.set(self.flushes.get() + 1);
        true
    }
}

/// A CPL-0 machine in `bits` mode (64 or 32), paging off, OSFXSR and
/// OSXSAVE on, RBX = [`DATA`].
pub fn machine(bits: u32) -> (Mem, kvm_regs, kvm_sregs) {
    let m = Mem::new();
    let mut s = kvm_sregs::default();
    let long = bits == 64;
    s.cs = flat_segment(0x10, 0xb, 0, long);
    for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        *d = flat_segment(0x18, 0x3, 0, long);
    }
    s.cr0 = 0x11;
    s.cr4 = (1 << 9) | (1 << 18);
    if long {
        s.efer = 0x500;
    }
    let r = kvm_regs {
        rip: CODE,
        rflags: 2,
        rbx: DATA,
        rsp: 0x9000,
        ..Default::default()
    };
    (m, r, s)
}

/// Puts `code` at RIP and runs the fix-up on it.
pub fn run(m: &Mem, env: &Env, r: &mut kvm_regs, s: &mut kvm_sregs, code: &[u8]) -> Fixup {
    m.put(r.rip, code);
    crate::arch::x86::fixup(m, env, r, s)
}
