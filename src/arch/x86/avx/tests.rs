use super::*;
use crate::arch::x86::testenv::{machine, run, Env, Mem, DATA};
use iced_x86::code_asm::*;
use proptest::prelude::*;

fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(0x1000).unwrap()
}

/// AVX-512 enabled; ZMM n holds bytes n*16 + i (i = 0..63).
fn setup() -> (Mem, Env, kvm_regs, kvm_sregs) {
    let (m, r, s) = machine(64);
    let mut env = Env::new();
    env.xcr0 = 0xe7;
    let mut f = File::load(&env).unwrap();
    for n in 0..32 {
        let v: [u8; 64] = std::array::from_fn(|i| (n * 16 + i) as u8);
        f.set(n, &v, 64).unwrap();
    }
    f.store(&env).unwrap();
    (m, env, r, s)
}

fn zmm(env: &Env, n: usize) -> [u8; 64] {
    File::load(env).unwrap().get(n).unwrap()
}

fn pattern(n: usize) -> [u8; 64] {
    std::array::from_fn(|i| (n * 16 + i) as u8)
}

#[test]
fn vex_loads_stores_zero_upper_bits_and_check_alignment() {
    let (m, env, mut r, mut s) = setup();
    m.put(DATA, &[0xab; 64]);
    let code = asm(|a| a.vmovdqa(xmm1, xmmword_ptr(rbx)));
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    let v = zmm(&env, 1);
    assert_eq!(&v[..16], &[0xab; 16]);
    assert_eq!(&v[16..], &[0; 48], "VEX.128 zeroes bits 511:128");
    r.rip = 0x1000;
    let code = asm(|a| a.vmovdqu(ymm2, ymmword_ptr(rbx)));
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    let v = zmm(&env, 2);
    assert_eq!(&v[..32], &[0xab; 32]);
    assert_eq!(&v[32..], &[0; 32]);
    // vmovdqa ymm needs 32-byte alignment.
    r.rip = 0x1000;
    r.rbx = DATA + 16;
    let code = asm(|a| a.vmovdqa(ymm2, ymmword_ptr(rbx)));
    assert_eq!(
        run(&m, &env, &mut r, &mut s, &code),
        Fixup::Exception {
            vector: GP,
            error_code: Some(0)
        }
    );
    // Store: only 16 bytes written.
    r.rip = 0x1000;
    r.rbx = DATA + 16;
    let code = asm(|a| a.vmovdqu(xmmword_ptr(rbx), xmm3));
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    assert_eq!(m.get(DATA + 16, 16), pattern(3)[..16].to_vec());
    assert_eq!(m.get(DATA + 32, 4), vec![0xab; 4]);
}

#[test]
fn vex_integer_ops_shuffle_extract_and_vmovd() {
    let (m, env, mut r, mut s) = setup();
    let code = asm(|a| a.vpxor(xmm0, xmm1, xmm2));
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    let want: Vec<u8> = (0..16).map(|i| pattern(1)[i] ^ pattern(2)[i]).collect();
    assert_eq!(&zmm(&env, 0)[..16], &want[..]);
    assert_eq!(&zmm(&env, 0)[16..], &[0; 48]);

    r.rip = 0x1000;
    let code = asm(|a| a.vpaddd(ymm4, ymm5, ymm6));
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    let (x, y, z) = (
        dwords(&pattern(5)),
        dwords(&pattern(6)),
        dwords(&zmm(&env, 4)),
    );
    for i in 0..8 {
        assert_eq!(z[i], x[i].wrapping_add(y[i]));
    }
    assert_eq!(&z[8..], &[0; 8]);

    r.rip = 0x1000;
    let code = asm(|a| a.vpshufd(xmm7, xmm1, 0x1b));
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    let (src, got) = (dwords(&pattern(1)), dwords(&zmm(&env, 7)));
    assert_eq!(&got[..4], &[src[3], src[2], src[1], src[0]]);

    r.rip = 0x1000;
    let code = asm(|a| a.vextracti128(xmm8, ymm9, 1));
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    assert_eq!(&zmm(&env, 8)[..16], &pattern(9)[16..32]);

    r.rip = 0x1000;
    r.rax = 0xffff_ffff_1234_5678;
    let code = asm(|a| a.vmovd(xmm10, eax));
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    let mut want = [0u8; 64];
    want[..4].copy_from_slice(&0x1234_5678u32.to_le_bytes());
    assert_eq!(zmm(&env, 10), want);
    r.rip = 0x1000;
    let code = asm(|a| a.vmovd(ecx, xmm1));
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    assert_eq!(r.rcx, u64::from(dwords(&pattern(1))[0]));
}

#[test]
fn vzeroupper_clears_bits_above_128_of_every_register() {
    let (m, env, mut r, mut s) = setup();
    let code = asm(|a| a.vzeroupper());
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    for n in 0..16 {
        let v = zmm(&env, n);
        assert_eq!(&v[..16], &pattern(n)[..16]);
        assert_eq!(&v[16..], &[0; 48]);
    }
    assert_eq!(zmm(&env, 20), pattern(20), "ZMM16-31 untouched");
}

#[test]
fn evex_vprord_and_vpermi2d_with_opmask_merge_and_zeroing() {
    let (m, env, mut r, mut s) = setup();
    // k1 = 0b0101.
    {
        let mut f = File::load(&env).unwrap();
        let o = f.opmask.unwrap();
        f.area[o + 8..o + 16].copy_from_slice(&5u64.to_le_bytes());
        f.store(&env).unwrap();
    }
    let code = asm(|a| a.vprord(xmm0.k1(), xmm1, 8));
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    let (src, old, got) = (
        dwords(&pattern(1)),
        dwords(&pattern(0)),
        dwords(&zmm(&env, 0)),
    );
    assert_eq!(
        &got[..4],
        &[
            src[0].rotate_right(8),
            old[1],
            src[2].rotate_right(8),
            old[3]
        ]
    );
    assert_eq!(&got[4..], &[0; 12]);

    r.rip = 0x1000;
    let code = asm(|a| a.vprord(xmm2.k1().z(), xmm1, 8));
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    let got = dwords(&zmm(&env, 2));
    assert_eq!(
        &got[..4],
        &[src[0].rotate_right(8), 0, src[2].rotate_right(8), 0]
    );

    // vpermi2d ymm3, ymm4, ymm5: indexes in ymm3 pick from ymm4 (bit 3
    // clear) or ymm5 (set).
    r.rip = 0x1000;
    {
        let mut f = File::load(&env).unwrap();
        f.set(
            3,
            &from_dwords([0, 9, 7, 15, 8, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0]),
            32,
        )
        .unwrap();
        f.store(&env).unwrap();
    }
    let code = asm(|a| a.vpermi2d(ymm3, ymm4, ymm5));
    assert_eq!(run(&m, &env, &mut r, &mut s, &code), Fixup::Resume);
    let (t1, t2, got) = (
        dwords(&pattern(4)),
        dwords(&pattern(5)),
        dwords(&zmm(&env, 3)),
    );
    assert_eq!(
        &got[..8],
        &[t1[0], t2[1], t1[7], t2[7], t2[0], t1[1], t1[2], t1[3]]
    );
}

#[test]
fn avx_with_cr0_ts_raises_nm() {
    let (m, env, mut r, mut s) = setup();
    s.cr0 |= 1 << 3;
    let code = asm(|a| a.vpxor(xmm0, xmm1, xmm2));
    assert_eq!(
        run(&m, &env, &mut r, &mut s, &code),
        Fixup::Exception {
            vector: NM,
            error_code: None
        }
    );
}

proptest! {
    /// VEX/EVEX prefixes with random opcode bytes, operands and state: the
    /// fix-up returns and never panics.
    #[test]
    fn avx_random_forms_and_state_never_panic(
        prefix in prop_oneof![
            Just(vec![0xc5u8]), Just(vec![0xc4]), Just(vec![0x62]),
        ],
        body in proptest::collection::vec(any::<u8>(), 8),
        data in proptest::collection::vec(any::<u8>(), 64),
        rbx_off in 0u64..64,
        xcr0 in prop_oneof![Just(7u64), Just(0xe7)],
        rax_val in any::<u64>(),
    ) {
        let (m, mut r, mut s) = machine(64);
        let mut env = Env::new();
        env.xcr0 = xcr0;
        m.put(DATA, &data);
        r.rbx = DATA + rbx_off;
        r.rax = rax_val;
        let mut code = prefix.clone();
        code.extend_from_slice(&body);
        let _ = run(&m, &env, &mut r, &mut s, &code);
    }

    /// The handled forms with random registers and operands: no panic.
    #[test]
    fn avx_handled_forms_random_operands_never_panic(
        which in 0usize..8,
        a in 0u32..16, b in 0u32..16, c in 0u32..16,
        imm in 0u32..256,
        bits in prop_oneof![Just(64u32), Just(32)],
    ) {
        let (m, mut r, mut s) = machine(bits);
        let mut env = Env::new();
        env.xcr0 = 0xe7;
        let xs = [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm14, xmm15];
        let ys = [ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13, ymm14, ymm15];
        let x = |n: u32| xs[n as usize];
        let y = |n: u32| ys[n as usize];
        let code = asm(|asm| match which {
            0 => asm.vpxor(x(a), x(b), x(c)),
            1 => asm.vpaddq(y(a), y(b), y(c)),
            2 => asm.vpshufd(y(a), y(b), imm),
            3 => asm.vextracti128(x(a), y(b), imm),
            4 => asm.vmovdqa(y(a), ymmword_ptr(rbx)),
            5 => asm.vpermi2d(y(a), y(b), y(c)),
            6 => asm.vprord(x(a).k1(), x(b), imm),
            _ => asm.vzeroupper(),
        });
        // In 32-bit mode the same bytes decode differently (or not at
        // all): still no panic.
        let _ = run(&m, &env, &mut r, &mut s, &code);
    }
}
