//! AVX and AVX-512 forms this host's KVM cannot emulate, on the vCPU's
//! vector registers as KVM's XSAVE buffer holds them (standard format: XMM
//! at 160, the upper YMM halves in component 2, the opmask registers in 5,
//! bits 511:256 of ZMM0-15 in 6 and ZMM16-31 in 7, at their CPUID leaf 0xD
//! offsets).
//!
//! Handled, following the SDM: the VEX moves `vmovups`/`vmovaps`/
//! `vmovupd`/`vmovapd`/`vmovdqu`/`vmovdqa` (128 and 256 bits, loads,
//! stores and register moves; the aligned forms #GP(0) on a misaligned
//! operand), `vmovd`/`vmovq` to and from XMM, `vpshufd`, `vpxor`, `vpor`,
//! `vpand`, `vpandn`, `vxorps`/`vxorpd`, `vpaddd`, `vpaddq`, `vpsubd`,
//! `vpsubq`, `vextracti128`/`vextractf128`, `vzeroupper`, `vzeroall`; the
//! EVEX forms `vprord`/`vprold` and `vpermi2d` (128/256/512 bits, opmask
//! merging or zeroing, 32-bit broadcast). A VEX or EVEX write to a vector
//! register zeroes its bits above the vector length up to 511 (when the
//! AVX-512 state is enabled), as the SDM says for VEX/EVEX-encoded
//! instructions. #UD without CR4.OSXSAVE or the XCR0 state (checked by the
//! caller), #NM with CR0.TS, #PF through the guest's page tables.
//!
//! The result goes back with KVM_SET_XSAVE and every component written is
//! marked in use in XSTATE_BV. Other AVX forms stay refused by name.

use iced_x86::{Code, Instruction, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::arch::x86::{
    cpl, gpr_read, gpr_write, is_64bit, operand_address, read_linear, write_linear, Access, EmuEnv,
    Fixup, Paging, PhysMem, GP, NM,
};

const CR0_TS: u64 = 1 << 3;
const HEADER: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// A move: loads, stores and register moves.
    Move {
        aligned: bool,
    },
    /// vmovd/vmovq to XMM (zero-extended) or from XMM.
    MovGpr,
    ShufD,
    Xor,
    Or,
    And,
    AndNot,
    AddD,
    AddQ,
    SubD,
    SubQ,
    Extract128,
    ZeroUpper,
    ZeroAll,
    RotateRightD,
    RotateLeftD,
    Permi2D,
}

fn op_of(code: Code) -> Option<Op> {
    use Code::*;
    Some(match code {
        VEX_Vmovups_xmm_xmmm128
        | VEX_Vmovups_ymm_ymmm256
        | VEX_Vmovups_xmmm128_xmm
        | VEX_Vmovups_ymmm256_ymm
        | VEX_Vmovupd_xmm_xmmm128
        | VEX_Vmovupd_ymm_ymmm256
        | VEX_Vmovupd_xmmm128_xmm
        | VEX_Vmovupd_ymmm256_ymm
        | VEX_Vmovdqu_xmm_xmmm128
        | VEX_Vmovdqu_ymm_ymmm256
        | VEX_Vmovdqu_xmmm128_xmm
        | VEX_Vmovdqu_ymmm256_ymm => Op::Move { aligned: false },
        VEX_Vmovaps_xmm_xmmm128
        | VEX_Vmovaps_ymm_ymmm256
        | VEX_Vmovaps_xmmm128_xmm
        | VEX_Vmovaps_ymmm256_ymm
        | VEX_Vmovapd_xmm_xmmm128
        | VEX_Vmovapd_ymm_ymmm256
        | VEX_Vmovapd_xmmm128_xmm
        | VEX_Vmovapd_ymmm256_ymm
        | VEX_Vmovdqa_xmm_xmmm128
        | VEX_Vmovdqa_ymm_ymmm256
        | VEX_Vmovdqa_xmmm128_xmm
        | VEX_Vmovdqa_ymmm256_ymm => Op::Move { aligned: true },
        VEX_Vmovd_xmm_rm32 | VEX_Vmovq_xmm_rm64 | VEX_Vmovd_rm32_xmm | VEX_Vmovq_rm64_xmm => {
            Op::MovGpr
        }
        VEX_Vpshufd_xmm_xmmm128_imm8 | VEX_Vpshufd_ymm_ymmm256_imm8 => Op::ShufD,
        VEX_Vpxor_xmm_xmm_xmmm128
        | VEX_Vpxor_ymm_ymm_ymmm256
        | VEX_Vxorps_xmm_xmm_xmmm128
        | VEX_Vxorps_ymm_ymm_ymmm256
        | VEX_Vxorpd_xmm_xmm_xmmm128
        | VEX_Vxorpd_ymm_ymm_ymmm256 => Op::Xor,
        VEX_Vpor_xmm_xmm_xmmm128 | VEX_Vpor_ymm_ymm_ymmm256 => Op::Or,
        VEX_Vpand_xmm_xmm_xmmm128 | VEX_Vpand_ymm_ymm_ymmm256 => Op::And,
        VEX_Vpandn_xmm_xmm_xmmm128 | VEX_Vpandn_ymm_ymm_ymmm256 => Op::AndNot,
        VEX_Vpaddd_xmm_xmm_xmmm128 | VEX_Vpaddd_ymm_ymm_ymmm256 => Op::AddD,
        VEX_Vpaddq_xmm_xmm_xmmm128 | VEX_Vpaddq_ymm_ymm_ymmm256 => Op::AddQ,
        VEX_Vpsubd_xmm_xmm_xmmm128 | VEX_Vpsubd_ymm_ymm_ymmm256 => Op::SubD,
        VEX_Vpsubq_xmm_xmm_xmmm128 | VEX_Vpsubq_ymm_ymm_ymmm256 => Op::SubQ,
        VEX_Vextracti128_xmmm128_ymm_imm8 | VEX_Vextractf128_xmmm128_ymm_imm8 => Op::Extract128,
        VEX_Vzeroupper => Op::ZeroUpper,
        VEX_Vzeroall => Op::ZeroAll,
        EVEX_Vprord_xmm_k1z_xmmm128b32_imm8
        | EVEX_Vprord_ymm_k1z_ymmm256b32_imm8
        | EVEX_Vprord_zmm_k1z_zmmm512b32_imm8 => Op::RotateRightD,
        EVEX_Vprold_xmm_k1z_xmmm128b32_imm8
        | EVEX_Vprold_ymm_k1z_ymmm256b32_imm8
        | EVEX_Vprold_zmm_k1z_zmmm512b32_imm8 => Op::RotateLeftD,
        EVEX_Vpermi2d_xmm_k1z_xmm_xmmm128b32
        | EVEX_Vpermi2d_ymm_k1z_ymm_ymmm256b32
        | EVEX_Vpermi2d_zmm_k1z_zmm_zmmm512b32 => Op::Permi2D,
        _ => return None,
    })
}

/// Whether `insn` is an AVX form handled here.
pub fn handles(insn: &Instruction) -> bool {
    op_of(insn.code()).is_some()
}

/// Vector register `r`: its number and width in bytes.
fn vreg(r: Register) -> Option<(usize, usize)> {
    let n = r as usize;
    if r.is_xmm() {
        Some((n - Register::XMM0 as usize, 16))
    } else if r.is_ymm() {
        Some((n - Register::YMM0 as usize, 32))
    } else if r.is_zmm() {
        Some((n - Register::ZMM0 as usize, 64))
    } else {
        None
    }
}

/// The vector register file inside KVM's XSAVE buffer.
struct File {
    area: Vec<u8>,
    ymm_hi: usize,
    zmm_hi: Option<usize>,
    hi16: Option<usize>,
    opmask: Option<usize>,
    /// Components written (XSTATE_BV bits to set).
    written: u64,
}

impl File {
    fn load(env: &dyn EmuEnv) -> Result<File, Fixup> {
        let area = env
            .xsave_area()
            .filter(|a| a.len() >= crate::arch::x86::xsave::KVM_AREA)
            .ok_or_else(|| Fixup::Unhandled("AVX state unavailable".into()))?;
        let l = env.xstate_layout();
        let xcr0 = env.xcr0();
        let place = |i: u32, size: usize| {
            l.component(i)
                .filter(|_| xcr0 & (1 << i) != 0)
                .map(|c| c.offset as usize)
                .filter(|&o| o != 0 && o + size <= area.len())
        };
        let ymm_hi =
            place(2, 256).ok_or_else(|| Fixup::Unhandled("no AVX state component".into()))?;
        Ok(File {
            ymm_hi,
            zmm_hi: place(6, 512),
            hi16: place(7, 1024),
            opmask: place(5, 64),
            area,
            written: 0,
        })
    }

    fn get(&self, n: usize) -> Result<[u8; 64], Fixup> {
        let mut v = [0u8; 64];
        if n < 16 {
            v[..16].copy_from_slice(&self.area[160 + 16 * n..176 + 16 * n]);
            v[16..32].copy_from_slice(&self.area[self.ymm_hi + 16 * n..self.ymm_hi + 16 * n + 16]);
            if let Some(z) = self.zmm_hi {
                v[32..].copy_from_slice(&self.area[z + 32 * n..z + 32 * n + 32]);
            }
        } else {
            let h = self
                .hi16
                .filter(|_| n < 32)
                .ok_or_else(|| Fixup::Unhandled(format!("ZMM{n} without its state")))?;
            v.copy_from_slice(&self.area[h + 64 * (n - 16)..h + 64 * (n - 16) + 64]);
        }
        Ok(v)
    }

    /// Writes the low `len` bytes of `v` to register `n` and zeroes the
    /// rest up to bit 511 (the VEX/EVEX rule).
    fn set(&mut self, n: usize, v: &[u8; 64], len: usize) -> Result<(), Fixup> {
        let mut full = [0u8; 64];
        full[..len].copy_from_slice(&v[..len]);
        if n < 16 {
            self.area[160 + 16 * n..176 + 16 * n].copy_from_slice(&full[..16]);
            self.area[self.ymm_hi + 16 * n..self.ymm_hi + 16 * n + 16]
                .copy_from_slice(&full[16..32]);
            self.written |= 0b110;
            if let Some(z) = self.zmm_hi {
                self.area[z + 32 * n..z + 32 * n + 32].copy_from_slice(&full[32..]);
                self.written |= 1 << 6;
            }
        } else {
            let h = self
                .hi16
                .filter(|_| n < 32)
                .ok_or_else(|| Fixup::Unhandled(format!("ZMM{n} without its state")))?;
            self.area[h + 64 * (n - 16)..h + 64 * (n - 16) + 64].copy_from_slice(&full);
            self.written |= 1 << 7;
        }
        Ok(())
    }

    fn opmask(&self, k: Register) -> Result<u64, Fixup> {
        if k == Register::None {
            return Ok(u64::MAX);
        }
        let n = (k as usize).wrapping_sub(Register::K0 as usize);
        let o = self
            .opmask
            .filter(|_| n < 8)
            .ok_or_else(|| Fixup::Unhandled("opmask state unavailable".into()))?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.area[o + 8 * n..o + 8 * n + 8]);
        Ok(u64::from_le_bytes(b))
    }

    fn store(self, env: &dyn EmuEnv) -> Result<(), Fixup> {
        let mut area = self.area;
        let mut bv = u64::from_le_bytes(area[HEADER..HEADER + 8].try_into().unwrap_or([0; 8]));
        bv |= self.written;
        area[HEADER..HEADER + 8].copy_from_slice(&bv.to_le_bytes());
        if env.set_xsave_area(&area) {
            Ok(())
        } else {
            Err(Fixup::Unhandled("the host refused the AVX state".into()))
        }
    }
}

fn gp0() -> Fixup {
    Fixup::Exception {
        vector: GP,
        error_code: Some(0),
    }
}

fn dwords(v: &[u8; 64]) -> [u32; 16] {
    std::array::from_fn(|i| {
        u32::from_le_bytes([v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]])
    })
}

fn from_dwords(d: [u32; 16]) -> [u8; 64] {
    let mut v = [0u8; 64];
    for (i, x) in d.iter().enumerate() {
        v[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes());
    }
    v
}

fn qwords(v: &[u8; 64]) -> [u64; 8] {
    std::array::from_fn(|i| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v[8 * i..8 * i + 8]);
        u64::from_le_bytes(b)
    })
}

fn from_qwords(q: [u64; 8]) -> [u8; 64] {
    let mut v = [0u8; 64];
    for (i, x) in q.iter().enumerate() {
        v[8 * i..8 * i + 8].copy_from_slice(&x.to_le_bytes());
    }
    v
}

/// Emulates an AVX form (the caller checked CR4.OSXSAVE and XCR0 and
/// advances RIP).
pub fn emulate(
    mem: &dyn PhysMem,
    env: &dyn EmuEnv,
    regs: &mut kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    let op = op_of(insn.code())
        .ok_or_else(|| Fixup::Unhandled(format!("AVX form {:?}", insn.code())))?;
    if s.cr0 & CR0_TS != 0 {
        return Err(Fixup::Exception {
            vector: NM,
            error_code: None,
        });
    }
    let mut f = File::load(env)?;
    let p = Paging::from_sregs(s);
    let user = cpl(s) == 3;
    // The memory operand, if any: its linear address.
    let mem_op = (0..insn.op_count()).find(|&n| insn.op_kind(n) == OpKind::Memory);
    let lin = match mem_op {
        Some(n) => Some(operand_address(regs, s, insn, n)?),
        None => None,
    };
    let read_mem = |len: usize| -> Result<[u8; 64], Fixup> {
        let at = lin.ok_or_else(|| Fixup::Unhandled("AVX memory operand".into()))?;
        let mut b = [0u8; 64];
        read_linear(mem, &p, at, &mut b[..len], Access { write: false, user })
            .map_err(Fixup::PageFault)?;
        Ok(b)
    };
    // Operand `n` as a vector of `len` bytes (register or memory; an EVEX
    // 32-bit broadcast replicates one dword).
    let source = |f: &File, n: u32, len: usize| -> Result<[u8; 64], Fixup> {
        match insn.op_kind(n) {
            OpKind::Register => {
                let (r, _) = vreg(insn.op_register(n))
                    .ok_or_else(|| Fixup::Unhandled("AVX register operand".into()))?;
                f.get(r)
            }
            OpKind::Memory if insn.is_broadcast() => {
                let d = read_mem(4)?;
                Ok(std::array::from_fn(|i| d[i % 4]))
            }
            OpKind::Memory => read_mem(len),
            k => Err(Fixup::Unhandled(format!("AVX operand kind {k:?}"))),
        }
    };
    let dst_reg =
        || vreg(insn.op0_register()).ok_or_else(|| Fixup::Unhandled("AVX destination".into()));
    match op {
        Op::Move { aligned } => {
            if insn.op0_kind() == OpKind::Memory {
                let (r, len) = vreg(insn.op1_register())
                    .ok_or_else(|| Fixup::Unhandled("AVX store source".into()))?;
                let at = lin.unwrap_or(0);
                if aligned && at % len as u64 != 0 {
                    return Err(gp0());
                }
                let v = f.get(r)?;
                return write_linear(mem, &p, at, &v[..len], Access { write: true, user })
                    .map_err(Fixup::PageFault);
            }
            let (d, len) = dst_reg()?;
            if aligned && lin.is_some_and(|a| a % len as u64 != 0) {
                return Err(gp0());
            }
            let v = source(&f, 1, len)?;
            f.set(d, &v, len)?;
        }
        Op::MovGpr => {
            let wide = matches!(
                insn.code(),
                Code::VEX_Vmovq_xmm_rm64 | Code::VEX_Vmovq_rm64_xmm
            );
            let size = if wide { 8 } else { 4 };
            if let Some((d, _)) =
                vreg(insn.op0_register()).filter(|_| insn.op0_kind() == OpKind::Register)
            {
                let val = match insn.op1_kind() {
                    OpKind::Register => gpr_read(regs, insn.op1_register())
                        .ok_or_else(|| Fixup::Unhandled("vmovd source".into()))?,
                    _ => {
                        let b = read_mem(size)?;
                        u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]))
                            & if wide { u64::MAX } else { 0xffff_ffff }
                    }
                };
                let mut v = [0u8; 64];
                v[..8].copy_from_slice(&val.to_le_bytes());
                f.set(d, &v, 16)?;
            } else {
                let (src, _) = vreg(insn.op1_register())
                    .ok_or_else(|| Fixup::Unhandled("vmovd source".into()))?;
                let v = f.get(src)?;
                if insn.op0_kind() == OpKind::Register {
                    let val = u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8]));
                    gpr_write(
                        regs,
                        insn.op0_register(),
                        if wide { val } else { val & 0xffff_ffff },
                    );
                    return Ok(());
                }
                let at = lin.unwrap_or(0);
                return write_linear(mem, &p, at, &v[..size], Access { write: true, user })
                    .map_err(Fixup::PageFault);
            }
        }
        Op::ShufD => {
            let (d, len) = dst_reg()?;
            let a = dwords(&source(&f, 1, len)?);
            let imm = insn.immediate8();
            let r = std::array::from_fn(|i| {
                let lane = i & !3;
                a[lane + usize::from((imm >> (2 * (i & 3))) & 3)]
            });
            f.set(d, &from_dwords(r), len)?;
        }
        Op::Xor | Op::Or | Op::And | Op::AndNot | Op::AddD | Op::AddQ | Op::SubD | Op::SubQ => {
            let (d, len) = dst_reg()?;
            let a = source(&f, 1, len)?;
            let b = source(&f, 2, len)?;
            let v = match op {
                Op::Xor => std::array::from_fn(|i| a[i] ^ b[i]),
                Op::Or => std::array::from_fn(|i| a[i] | b[i]),
                Op::And => std::array::from_fn(|i| a[i] & b[i]),
                Op::AndNot => std::array::from_fn(|i| !a[i] & b[i]),
                Op::AddD | Op::SubD => {
                    let (x, y) = (dwords(&a), dwords(&b));
                    from_dwords(std::array::from_fn(|i| {
                        if op == Op::AddD {
                            x[i].wrapping_add(y[i])
                        } else {
                            x[i].wrapping_sub(y[i])
                        }
                    }))
                }
                _ => {
                    let (x, y) = (qwords(&a), qwords(&b));
                    from_qwords(std::array::from_fn(|i| {
                        if op == Op::AddQ {
                            x[i].wrapping_add(y[i])
                        } else {
                            x[i].wrapping_sub(y[i])
                        }
                    }))
                }
            };
            f.set(d, &v, len)?;
        }
        Op::Extract128 => {
            let (src, _) = vreg(insn.op1_register())
                .ok_or_else(|| Fixup::Unhandled("vextract source".into()))?;
            let v = f.get(src)?;
            let lane = usize::from(insn.immediate8() & 1) * 16;
            let mut out = [0u8; 64];
            out[..16].copy_from_slice(&v[lane..lane + 16]);
            if insn.op0_kind() == OpKind::Memory {
                let at = lin.unwrap_or(0);
                return write_linear(mem, &p, at, &out[..16], Access { write: true, user })
                    .map_err(Fixup::PageFault);
            }
            let (d, _) = dst_reg()?;
            f.set(d, &out, 16)?;
        }
        Op::ZeroUpper | Op::ZeroAll => {
            let count = if is_64bit(s) { 16 } else { 8 };
            for n in 0..count {
                let v = f.get(n)?;
                let keep = if op == Op::ZeroUpper { 16 } else { 0 };
                f.set(n, &v, keep)?;
            }
        }
        Op::RotateRightD | Op::RotateLeftD | Op::Permi2D => {
            let (d, len) = dst_reg()?;
            let n = len / 4;
            let k = f.opmask(insn.op_mask())?;
            let old = dwords(&f.get(d)?);
            let r: [u32; 16] = if op == Op::Permi2D {
                let t1 = dwords(&source(&f, 1, len)?);
                let t2 = dwords(&source(&f, 2, len)?);
                std::array::from_fn(|i| {
                    let idx = old[i] as usize & (n - 1);
                    if old[i] as usize & n != 0 {
                        t2[idx]
                    } else {
                        t1[idx]
                    }
                })
            } else {
                let a = dwords(&source(&f, 1, len)?);
                let c = u32::from(insn.immediate8() & 31);
                std::array::from_fn(|i| {
                    if op == Op::RotateRightD {
                        a[i].rotate_right(c)
                    } else {
                        a[i].rotate_left(c)
                    }
                })
            };
            let zeroing = insn.zeroing_masking();
            let masked: [u32; 16] = std::array::from_fn(|i| {
                if i >= n || k & (1 << i) != 0 {
                    r[i]
                } else if zeroing {
                    0
                } else {
                    old[i]
                }
            });
            f.set(d, &from_dwords(masked), len)?;
        }
    }
    f.store(env)
}

#[cfg(test)]
mod tests;
