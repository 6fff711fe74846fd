//! `invpcid` and `vmfunc`, which this host's KVM cannot emulate.
//!
//! `invpcid r, m128` (SDM Vol. 2): #UD with a LOCK prefix; #GP(0) above
//! CPL 0, for a type above 3, for descriptor bits 63:12 not zero, for type
//! 0 or 1 with a PCID while CR4.PCIDE is clear, for type 0 with a
//! non-canonical address; #PF reading the descriptor. Every valid type is
//! then carried out as a flush of the guest's whole TLB, global entries
//! and every PCID included: the SDM allows invalidating more than asked.
//! The flush is the VMM's ([`EmuEnv::flush_guest_tlb`]): on this host
//! (shadow paging) xenkvm writes the vCPU's special registers twice with
//! CR4.PGE toggled, which makes KVM reset the vCPU's MMU context and flush
//! the guest TLB (KVM_SET_SREGS with changed CR0/CR3/CR4/EFER), the same
//! effect as the guest toggling CR4.PGE itself.
//!
//! `vmfunc` raises #UD: VM functions exist only in VMX non-root operation
//! and xenkvm's guests are never there (the CPU gives #UD everywhere else).

use iced_x86::Instruction;
use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::arch::x86::{
    cpl, gpr_read, is_64bit, operand_address, read_linear, Access, EmuEnv, Fixup, Paging, PhysMem,
    GP, UD,
};

const CR4_PCIDE: u64 = 1 << 17;

fn gp0() -> Fixup {
    Fixup::Exception {
        vector: GP,
        error_code: Some(0),
    }
}

/// `vmfunc`: #UD outside VMX non-root operation.
pub fn vmfunc() -> Fixup {
    Fixup::Exception {
        vector: UD,
        error_code: None,
    }
}

fn canonical(a: u64) -> bool {
    ((a as i64) << 16 >> 16) as u64 == a
}

/// Checks `invpcid` as the SDM says and, when valid, flushes the guest's
/// TLB. The caller advances RIP.
pub fn invpcid(
    mem: &dyn PhysMem,
    env: &dyn EmuEnv,
    regs: &kvm_regs,
    s: &kvm_sregs,
    insn: &Instruction,
) -> Result<(), Fixup> {
    if insn.has_lock_prefix() {
        return Err(Fixup::Exception {
            vector: UD,
            error_code: None,
        });
    }
    if cpl(s) != 0 {
        return Err(gp0());
    }
    let ty = gpr_read(regs, insn.op0_register())
        .ok_or_else(|| Fixup::Unhandled("invpcid type register".into()))?;
    let lin = operand_address(regs, s, insn, 1)?;
    let mut d = [0u8; 16];
    read_linear(
        mem,
        &Paging::from_sregs(s),
        lin,
        &mut d,
        Access {
            write: false,
            user: false,
        },
    )
    .map_err(Fixup::PageFault)?;
    let lo = u64::from_le_bytes(d[..8].try_into().unwrap_or([0; 8]));
    let addr = u64::from_le_bytes(d[8..].try_into().unwrap_or([0; 8]));
    if ty > 3 || lo >> 12 != 0 {
        return Err(gp0());
    }
    if ty <= 1 && lo & 0xfff != 0 && s.cr4 & CR4_PCIDE == 0 {
        return Err(gp0());
    }
    if ty == 0 && is_64bit(s) && !canonical(addr) {
        return Err(gp0());
    }
    if env.flush_guest_tlb() {
        Ok(())
    } else {
        Err(Fixup::Unhandled(
            "invpcid: the host cannot flush the guest TLB".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86::testenv::{machine, run, Env, DATA};
    use proptest::prelude::*;

    /// invpcid rdx, [rbx]
    const INVPCID: [u8; 5] = [0x66, 0x0f, 0x38, 0x82, 0x13];

    #[test]
    fn invpcid_valid_types_flush_invalid_ones_raise_gp() {
        let (m, mut r, mut s) = machine(64);
        let env = Env::new();
        for ty in 0..4 {
            r.rip = 0x1000;
            r.rdx = ty;
            assert_eq!(run(&m, &env, &mut r, &mut s, &INVPCID), Fixup::Resume);
            assert_eq!(r.rip, 0x1005);
        }
        assert_eq!(env.flushes.get(), 4);
        let gp = Fixup::Exception {
            vector: GP,
            error_code: Some(0),
        };
        // Type 4; descriptor bits 63:12; a PCID without CR4.PCIDE; a
        // non-canonical address for type 0; CPL 3.
        let cases: [(u64, u64, u64); 4] = [(4, 0, 0), (2, 1 << 12, 0), (1, 5, 0), (0, 0, 1 << 63)];
        for (ty, lo, addr) in cases {
            r.rip = 0x1000;
            r.rdx = ty;
            m.put(DATA, &lo.to_le_bytes());
            m.put(DATA + 8, &addr.to_le_bytes());
            assert_eq!(
                run(&m, &env, &mut r, &mut s, &INVPCID),
                gp,
                "{ty} {lo:#x} {addr:#x}"
            );
        }
        m.put(DATA, &[0; 16]);
        s.ss.dpl = 3;
        r.rip = 0x1000;
        assert_eq!(run(&m, &env, &mut r, &mut s, &INVPCID), gp, "CPL 3");
        assert_eq!(env.flushes.get(), 4, "no flush after a fault");
    }

    #[test]
    fn vmfunc_raises_ud() {
        let (m, mut r, mut s) = machine(64);
        let f = run(&m, &Env::new(), &mut r, &mut s, &[0x0f, 0x01, 0xd4]);
        assert_eq!(
            f,
            Fixup::Exception {
                vector: UD,
                error_code: None
            }
        );
    }

    proptest! {
        /// Any prefixes, type register, descriptor and mode: no panic.
        #[test]
        fn invpcid_random_operands_never_panic(
            prefix in proptest::collection::vec(prop_oneof![Just(0xf0u8), Just(0x66), Just(0x48), Just(0x67)], 0..3),
            ty in any::<u64>(),
            desc in proptest::array::uniform16(any::<u8>()),
            modrm in any::<u8>(),
            bits in prop_oneof![Just(64u32), Just(32)],
            pcide in any::<bool>(),
        ) {
            let (m, mut r, mut s) = machine(bits);
            if pcide {
                s.cr4 |= CR4_PCIDE;
            }
            r.rax = ty;
            r.rcx = ty;
            r.rdx = ty;
            m.put(DATA, &desc);
            let mut code = prefix.clone();
            code.extend_from_slice(&[0x66, 0x0f, 0x38, 0x82, modrm]);
            let _ = run(&m, &Env::new(), &mut r, &mut s, &code);
        }
    }
}
