use super::*;
use crate::arch::x86::testenv::{machine, run, Env, CODE, DATA};
use proptest::prelude::*;

const ONE: u128 = 0x3fff_8000_0000_0000_0000;
const TWO: u128 = 0x4000_8000_0000_0000_0000;
const THREE: u128 = 0x4000_c000_0000_0000_0000;

fn ext(x: f64) -> u128 {
    widen(x.to_bits(), true).0
}

/// Puts `vals` on the x87 stack (the last one is ST0) with FCW `fcw`.
fn stack(env: &Env, fcw: u16, vals: &[u128]) {
    let mut f = env.fpu().unwrap();
    f.fcw = fcw;
    let mut st = Stack(&mut f);
    for &v in vals {
        st.push(v);
    }
    assert!(env.set_fpu(&f));
}

fn st(env: &Env, i: usize) -> u128 {
    let mut f = env.fpu().unwrap();
    Stack(&mut f).get(i)
}

#[test]
fn arith_exact_and_rounded_results_with_flags() {
    let o = arith(ArithOp::Add, ONE, TWO, false, 0x37f);
    assert_eq!((o.value, o.flags, o.c1), (Some(THREE), 0, false));
    // 1/3: to nearest rounds up (C1 set); toward zero rounds down.
    let o = arith(ArithOp::Div, ONE, THREE, false, 0x37f);
    assert_eq!(o.value, Some(0x3ffd_aaaa_aaaa_aaaa_aaab));
    assert_eq!((o.flags, o.c1), (PE, true));
    let o = arith(ArithOp::Div, ONE, THREE, false, 0xf7f);
    assert_eq!(o.value, Some(0x3ffd_aaaa_aaaa_aaaa_aaaa));
    assert_eq!((o.flags, o.c1), (PE, false));
}

#[test]
fn arith_invalid_zero_divide_and_nan_rules() {
    let inf = 0x7fff_8000_0000_0000_0000u128;
    let o = arith(ArithOp::Sub, inf, inf, false, 0x37f);
    assert_eq!((o.value, o.flags), (Some(INDEFINITE), IE));
    let o = arith(ArithOp::Div, ONE, 0, false, 0x37f);
    assert_eq!((o.value, o.flags), (Some(inf), ZE));
    // Unmasked zero divide: no result.
    let o = arith(ArithOp::Div, ONE, 0, false, 0x37b);
    assert_eq!((o.value, o.flags), (None, ZE));
    // SNaN quieted with IE; of two QNaNs the larger significand.
    let snan = 0x7fff_a000_0000_0000_0001u128;
    let o = arith(ArithOp::Mul, snan, ONE, false, 0x37f);
    assert_eq!((o.value, o.flags), (Some(snan | 1 << 62), IE));
    let (q1, q2) = (
        0x7fff_c000_0000_0000_0001u128,
        0xffff_c000_0000_0000_0002u128,
    );
    assert_eq!(arith(ArithOp::Add, q1, q2, false, 0x37f).value, Some(q2));
    // An unnormal is an invalid operand.
    let unnormal = 0x3fff_4000_0000_0000_0000u128;
    assert_eq!(arith(ArithOp::Add, unnormal, ONE, false, 0x37f).flags, IE);
}

#[test]
fn fadd_m32fp_adds_to_st0_and_records_fop_fip_fdp() {
    let (m, mut r, mut s) = machine(64);
    let env = Env::new();
    stack(&env, 0x37f, &[ONE]);
    m.put(DATA, &2.5f32.to_bits().to_le_bytes());
    assert_eq!(run(&m, &env, &mut r, &mut s, &[0xd8, 0x03]), Fixup::Resume);
    assert_eq!(r.rip, CODE + 2);
    assert_eq!(st(&env, 0), ext(3.5));
    let f = env.fpu().unwrap();
    assert_eq!(f.last_opcode, 0x003);
    assert_eq!((f.last_ip, f.last_dp), (CODE, DATA));
    assert_eq!(f.fsw & 0x3f, 0);
}

#[test]
fn fld_fild_fistp_push_and_pop_the_stack() {
    let (m, mut r, mut s) = machine(64);
    let env = Env::new();
    m.put(DATA, &1.25f64.to_bits().to_le_bytes());
    assert_eq!(run(&m, &env, &mut r, &mut s, &[0xdd, 0x03]), Fixup::Resume); // fld qword
    let f = env.fpu().unwrap();
    assert_eq!((f.fsw >> 11) & 7, 7);
    assert_eq!(f.ftwx, 0x80);
    assert_eq!(st(&env, 0), ext(1.25));
    m.put(DATA, &(-7i32).to_le_bytes());
    r.rip = CODE;
    assert_eq!(run(&m, &env, &mut r, &mut s, &[0xdb, 0x03]), Fixup::Resume); // fild dword
    assert_eq!(st(&env, 0), ext(-7.0));
    assert_eq!(st(&env, 1), ext(1.25));
    // fsubrp st(1), st: ST1 = ST0 - ST1 = -8.25, pop.
    r.rip = CODE;
    assert_eq!(run(&m, &env, &mut r, &mut s, &[0xde, 0xe1]), Fixup::Resume);
    assert_eq!(st(&env, 0), ext(-8.25));
    assert_eq!((env.fpu().unwrap().fsw >> 11) & 7, 7);
    // fistp dword: -8.25 rounds to -8 (PE, C1 clear: not rounded up).
    r.rip = CODE;
    assert_eq!(run(&m, &env, &mut r, &mut s, &[0xdb, 0x1b]), Fixup::Resume);
    assert_eq!(m.get(DATA, 4), (-8i32).to_le_bytes().to_vec());
    let f = env.fpu().unwrap();
    assert_eq!((f.ftwx, (f.fsw >> 11) & 7), (0, 0));
    assert_eq!(f.fsw & (PE | C1), PE);
}

#[test]
fn stack_overflow_and_underflow_masked_give_indefinite() {
    let (m, mut r, mut s) = machine(64);
    let env = Env::new();
    stack(&env, 0x37f, &[ONE; 8]);
    m.put(DATA, &1.0f64.to_bits().to_le_bytes());
    assert_eq!(run(&m, &env, &mut r, &mut s, &[0xdd, 0x03]), Fixup::Resume);
    assert_eq!(st(&env, 0), INDEFINITE);
    let fsw = env.fpu().unwrap().fsw;
    assert_eq!(fsw & (IE | SF | C1), IE | SF | C1);
    // Underflow: fistp from an empty stack stores the integer indefinite.
    let env = Env::new();
    r.rip = CODE;
    assert_eq!(run(&m, &env, &mut r, &mut s, &[0xdb, 0x1b]), Fixup::Resume);
    assert_eq!(m.get(DATA, 4), 0x8000_0000u32.to_le_bytes().to_vec());
    assert_eq!(env.fpu().unwrap().fsw & (IE | SF | C1), IE | SF);
}

#[test]
fn unmasked_exception_sets_es_keeps_operands_and_next_insn_raises_mf() {
    let (m, mut r, mut s) = machine(64);
    let env = Env::new();
    stack(&env, 0x37b, &[ONE]); // ZE unmasked
    m.put(DATA, &0.0f64.to_bits().to_le_bytes());
    assert_eq!(run(&m, &env, &mut r, &mut s, &[0xdc, 0x33]), Fixup::Resume); // fdiv qword
    assert_eq!(st(&env, 0), ONE);
    let fsw = env.fpu().unwrap().fsw;
    assert_eq!(fsw & (ZE | ES | B), ZE | ES | B);
    r.rip = CODE;
    assert_eq!(
        run(&m, &env, &mut r, &mut s, &[0xdc, 0x33]),
        Fixup::Exception {
            vector: MF,
            error_code: None
        }
    );
    assert_eq!(r.rip, CODE);
}

#[test]
fn precision_control_below_64_bits_refused_by_name() {
    let (m, mut r, mut s) = machine(64);
    let env = Env::new();
    stack(&env, 0x27f, &[ONE]);
    let f = run(&m, &env, &mut r, &mut s, &[0xdc, 0x0b]); // fmul qword
    assert!(
        matches!(&f, Fixup::Unhandled(w) if w.contains("precision control")),
        "{f:?}"
    );
}

#[test]
fn fist_rounding_modes_and_range() {
    let v = ext(2.5);
    assert_eq!(to_int(v, 32, 0x37f), (Some(2), PE, false));
    assert_eq!(to_int(v, 32, 0xb7f), (Some(3), PE, true));
    assert_eq!(to_int(ext(-2.5), 16, 0x77f), (Some(0xfffd), PE, true));
    assert_eq!(to_int(ext(1e10), 32, 0x37f), (Some(0x8000_0000), IE, false));
    assert_eq!(to_int(ext(40000.0), 16, 0x37e), (None, IE, false));
}

proptest! {
    /// Any x87 form handled here with any stack, FCW and operand bytes:
    /// no panic.
    #[test]
    fn x87_random_state_and_operands_never_panic(
        modrm_op in 0u8..8,
        opcode in prop_oneof![Just(0xd8u8), Just(0xd9), Just(0xda), Just(0xdb), Just(0xdc), Just(0xdd), Just(0xde), Just(0xdf)],
        reg_form in any::<bool>(),
        fpr in proptest::collection::vec(any::<u128>(), 8),
        ftwx in any::<u8>(),
        fsw in any::<u16>(),
        fcw in any::<u16>(),
        operand in proptest::array::uniform16(any::<u8>()),
    ) {
        let (m, mut r, mut s) = machine(64);
        let env = Env::new();
        let mut f = env.fpu().unwrap();
        for (i, v) in fpr.iter().enumerate() {
            f.fpr[i][..10].copy_from_slice(&v.to_le_bytes()[..10]);
        }
        f.ftwx = ftwx;
        f.fsw = fsw & !ES;
        f.fcw = fcw | 0x300;
        env.set_fpu(&f);
        m.put(DATA, &operand);
        let modrm = if reg_form { 0xc0 | (modrm_op << 3) | (fcw as u8 & 7) } else { (modrm_op << 3) | 3 };
        let _ = run(&m, &env, &mut r, &mut s, &[opcode, modrm]);
    }
}
