use super::*;
use crate::arch::x86::testenv::{machine, run, Env, Mem, CODE, DATA};
use proptest::prelude::*;

const XSAVE64: [u8; 4] = [0x48, 0x0f, 0xae, 0x23];
const XRSTOR64: [u8; 4] = [0x48, 0x0f, 0xae, 0x2b];
const XSAVEOPT64: [u8; 4] = [0x48, 0x0f, 0xae, 0x33];
const XSAVEC64: [u8; 4] = [0x48, 0x0f, 0xc7, 0x23];
const XSAVES64: [u8; 4] = [0x48, 0x0f, 0xc7, 0x2b];
const XRSTORS64: [u8; 4] = [0x48, 0x0f, 0xc7, 0x1b];
const XSAVE32: [u8; 3] = [0x0f, 0xae, 0x23];

fn gp() -> Fixup {
    Fixup::Exception {
        vector: GP,
        error_code: Some(0),
    }
}

/// A vCPU with x87 (FCW 0x27f, ST0's bytes), XMM1, YMM1's upper half and,
/// with AVX-512 on, opmask k1, ZMM_Hi256 and Hi16_ZMM marked: every
/// component in `inuse` holds a recognisable pattern.
fn state(env: &Env, inuse: u64) {
    let mut a = env.area.borrow_mut();
    a[0..2].copy_from_slice(&0x27fu16.to_le_bytes());
    a[4] = 0x80; // ST0 (physical 7 with TOP 7) valid
    a[2..4].copy_from_slice(&(7u16 << 11).to_le_bytes());
    a[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
    a[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes());
    a[32..42].copy_from_slice(&[0xaa; 10]);
    a[176..192].copy_from_slice(&[0x11; 16]);
    a[592..608].copy_from_slice(&[0x22; 16]);
    a[1088 + 8..1096 + 8].copy_from_slice(&[0x33; 8]);
    a[1152..1184].copy_from_slice(&[0x44; 32]);
    a[1664..1728].copy_from_slice(&[0x55; 64]);
    a[512..520].copy_from_slice(&inuse.to_le_bytes());
}

fn setup(inuse: u64) -> (Mem, Env, kvm_regs, kvm_sregs) {
    let (m, mut r, s) = machine(64);
    let env = Env::new();
    state(&env, inuse);
    m.put(DATA, &[0xcc; 4096]);
    m.put(DATA + 512, &[0; 64]); // a clean header, as a guest's area has
    r.rax = 0xffff_ffff;
    r.rdx = 0xffff_ffff;
    (m, env, r, s)
}

#[test]
fn xsave64_standard_format_saves_rfbm_components_and_xstate_bv() {
    let (m, env, mut r, mut s) = setup(7);
    m.put(DATA + 512, &[0xcc; 64]);
    assert_eq!(run(&m, &env, &mut r, &mut s, &XSAVE64), Fixup::Resume);
    assert_eq!(r.rip, CODE + 4);
    let img = m.get(DATA, 1024);
    assert_eq!(&img[0..2], &0x27fu16.to_le_bytes());
    assert_eq!(&img[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(&img[24..28], &0x1fa0u32.to_le_bytes());
    assert_eq!(&img[28..32], &0xffffu32.to_le_bytes(), "MXCSR_MASK");
    assert_eq!(&img[32..42], &[0xaa; 10]);
    assert_eq!(&img[176..192], &[0x11; 16], "XMM1");
    assert_eq!(&img[592..608], &[0x22; 16], "YMM1 upper half");
    assert_eq!(
        &img[464..512],
        &[0xcc; 48],
        "reserved legacy bytes untouched"
    );
    let bv = u64::from_le_bytes(img[512..520].try_into().unwrap());
    assert_eq!(
        bv,
        0xcccc_cccc_cccc_cccc & !7 | 7,
        "XSTATE_BV: RFBM bits only"
    );
    assert_eq!(&img[520..576], &[0xcc; 56], "rest of the header untouched");
}

#[test]
fn xsave_partial_rfbm_keeps_other_components_and_xstate_bv_bits() {
    let (m, env, mut r, mut s) = setup(7);
    m.put(DATA + 512, &[0xcc; 64]);
    r.rax = 2; // SSE only
    r.rdx = 0;
    assert_eq!(run(&m, &env, &mut r, &mut s, &XSAVE64), Fixup::Resume);
    let img = m.get(DATA, 1024);
    assert_eq!(&img[0..24], &[0xcc; 24], "x87 not saved");
    assert_eq!(
        &img[24..28],
        &0x1fa0u32.to_le_bytes(),
        "MXCSR saved with SSE"
    );
    assert_eq!(&img[176..192], &[0x11; 16]);
    assert_eq!(&img[592..608], &[0xcc; 16], "AVX not saved");
    let bv = u64::from_le_bytes(img[512..520].try_into().unwrap());
    assert_eq!(bv, 0xcccc_cccc_cccc_cccc & !2 | 2);
}

#[test]
fn xsaveopt64_skips_components_in_initial_state() {
    let (m, env, mut r, mut s) = setup(2); // only SSE in use
    assert_eq!(run(&m, &env, &mut r, &mut s, &XSAVEOPT64), Fixup::Resume);
    let img = m.get(DATA, 1024);
    assert_eq!(&img[0..24], &[0xcc; 24], "x87 not in use: not written");
    assert_eq!(&img[176..192], &[0x11; 16]);
    assert_eq!(&img[592..608], &[0xcc; 16], "AVX not in use: not written");
    let bv = u64::from_le_bytes(img[512..520].try_into().unwrap());
    assert_eq!(bv & 7, 2);
}

#[test]
fn xsavec64_compacted_offsets_and_xcomp_bv() {
    let (m, mut env, mut r, mut s) = setup(0xe7);
    env.xcr0 = 0xe7;
    state(&env, 0xe7);
    r.rax = 0xe5; // x87, AVX, opmask, ZMM_Hi256, Hi16_ZMM; not SSE
    assert_eq!(run(&m, &env, &mut r, &mut s, &XSAVEC64), Fixup::Resume);
    let img = m.get(DATA, 4096);
    assert_eq!(&img[0..2], &0x27fu16.to_le_bytes());
    assert_eq!(&img[176..192], &[0xcc; 16], "SSE not requested");
    assert_eq!(
        &img[24..28],
        &0x1fa0u32.to_le_bytes(),
        "MXCSR saved with AVX"
    );
    assert_eq!(u64::from_le_bytes(img[512..520].try_into().unwrap()), 0xe5);
    assert_eq!(
        u64::from_le_bytes(img[520..528].try_into().unwrap()),
        0xe5 | 1 << 63
    );
    assert_eq!(&img[576 + 16..576 + 32], &[0x22; 16], "AVX at 576");
    assert_eq!(&img[832 + 8..832 + 16], &[0x33; 8], "opmask at 832");
    assert_eq!(&img[896..928], &[0x44; 32], "ZMM_Hi256 at 896");
    assert_eq!(&img[1408..1472], &[0x55; 64], "Hi16_ZMM at 1408");
    assert_eq!(&img[2432..2440], &[0xcc; 8], "nothing past the end");
}

#[test]
fn xsavec_aligned_component_padded_to_64_bytes() {
    let l = XstateLayout::from_cpuid(|i| match i {
        2 => Some((256, 576, 0)),
        9 => Some((8, 2688, 2)),
        _ => None,
    });
    let (at, end) = l.compacted(0x204).unwrap();
    assert_eq!(at[2], 576);
    assert_eq!(at[9], 832);
    assert_eq!(end, 840);
    let l2 = XstateLayout::from_cpuid(|i| match i {
        5 => Some((8, 1088, 0)),
        9 => Some((8, 2688, 2)),
        _ => None,
    });
    assert_eq!(l2.compacted(0x220).unwrap().0[9], 640);
}

#[test]
fn xsave_then_xrstor_round_trips_the_state() {
    let (m, env, mut r, mut s) = setup(7);
    assert_eq!(run(&m, &env, &mut r, &mut s, &XSAVE64), Fixup::Resume);
    let before = env.area.borrow().clone();
    // Scramble the vCPU, then restore.
    {
        let mut a = env.area.borrow_mut();
        a[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
        a[176..192].fill(0x99);
        a[592..608].fill(0x98);
        a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    }
    r.rip = CODE;
    assert_eq!(run(&m, &env, &mut r, &mut s, &XRSTOR64), Fixup::Resume);
    assert_eq!(*env.area.borrow(), before);
}

#[test]
fn xrstor_clear_xstate_bv_bit_initialises_component_standard_mxcsr_loaded() {
    let (m, env, mut r, mut s) = setup(7);
    let mut img = vec![0u8; 1024];
    img[24..28].copy_from_slice(&0x1f00u32.to_le_bytes());
    img[176..192].fill(0x77);
    img[512..520].copy_from_slice(&1u64.to_le_bytes()); // x87 only
    m.put(DATA, &img);
    r.rax = 7;
    r.rdx = 0;
    assert_eq!(run(&m, &env, &mut r, &mut s, &XRSTOR64), Fixup::Resume);
    let a = env.area.borrow();
    assert_eq!(&a[176..192], &[0; 16], "XMM1 initialised");
    assert_eq!(&a[592..608], &[0; 16], "YMM1 upper initialised");
    assert_eq!(&a[24..28], &0x1f00u32.to_le_bytes(), "MXCSR from memory");
    assert_eq!(&a[0..2], &[0, 0], "FCW from memory");
    assert_eq!(u64::from_le_bytes(a[512..520].try_into().unwrap()) & 7, 1);
}

#[test]
fn xrstor_compacted_without_sse_sets_mxcsr_default() {
    let (m, env, mut r, mut s) = setup(7);
    let mut img = vec![0u8; 1024];
    img[24..28].copy_from_slice(&0x1f00u32.to_le_bytes());
    img[512..520].copy_from_slice(&4u64.to_le_bytes());
    img[520..528].copy_from_slice(&(4u64 | 1 << 63).to_le_bytes());
    img[576 + 16..576 + 32].fill(0x66); // YMM1 upper at the compacted 576
    m.put(DATA, &img);
    r.rax = 6;
    r.rdx = 0;
    assert_eq!(run(&m, &env, &mut r, &mut s, &XRSTOR64), Fixup::Resume);
    let a = env.area.borrow();
    assert_eq!(&a[24..28], &0x1f80u32.to_le_bytes());
    assert_eq!(&a[592..608], &[0x66; 16]);
    assert_eq!(&a[0..2], &0x27fu16.to_le_bytes(), "x87 not requested");
}

#[test]
fn xsaves_xrstors_round_trip_and_need_cpl0_and_compacted_form() {
    let (m, env, mut r, mut s) = setup(7);
    assert_eq!(run(&m, &env, &mut r, &mut s, &XSAVES64), Fixup::Resume);
    let before = env.area.borrow().clone();
    env.area.borrow_mut()[176..192].fill(0);
    r.rip = CODE;
    assert_eq!(run(&m, &env, &mut r, &mut s, &XRSTORS64), Fixup::Resume);
    assert_eq!(*env.area.borrow(), before);
    // Standard-format image: #GP.
    m.put(DATA + 520, &[0; 8]);
    r.rip = CODE;
    assert_eq!(run(&m, &env, &mut r, &mut s, &XRSTORS64), gp());
    // CPL 3: #GP.
    s.ss.dpl = 3;
    r.rip = CODE;
    assert_eq!(run(&m, &env, &mut r, &mut s, &XSAVES64), gp());
    assert_eq!(r.rip, CODE, "a fault leaves RIP at the instruction");
}

#[test]
fn xrstor_bad_header_or_mxcsr_raises_gp_and_changes_nothing() {
    let cases: [(usize, u64); 4] = [
        (512, 1 << 3), // XSTATE_BV bit outside XCR0
        (528, 1),      // header bytes 16..23 in the standard form
        (520, 1),      // XCOMP_BV without bit 63: standard form, bytes 8..15
        (24, 1 << 16), // reserved MXCSR bit
    ];
    for (off, v) in cases {
        let (m, env, mut r, mut s) = setup(7);
        let mut img = vec![0u8; 1024];
        img[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        img[off..off + 8].copy_from_slice(&v.to_le_bytes());
        m.put(DATA, &img);
        let before = env.area.borrow().clone();
        assert_eq!(run(&m, &env, &mut r, &mut s, &XRSTOR64), gp(), "{off}");
        assert_eq!(*env.area.borrow(), before);
    }
    // Compacted: XSTATE_BV outside XCOMP_BV, reserved bytes 16..63.
    for (off, v) in [(512usize, 6u64), (560, 1)] {
        let (m, env, mut r, mut s) = setup(7);
        let mut img = vec![0u8; 1024];
        img[520..528].copy_from_slice(&(2u64 | 1 << 63).to_le_bytes());
        img[off..off + 8].copy_from_slice(&v.to_le_bytes());
        m.put(DATA, &img);
        assert_eq!(run(&m, &env, &mut r, &mut s, &XRSTOR64), gp(), "{off}");
    }
}

#[test]
fn xsave_faults_ud_nm_gp_pf_as_the_sdm_says() {
    let (m, env, mut r, mut s) = setup(7);
    r.rbx = DATA + 8;
    assert_eq!(run(&m, &env, &mut r, &mut s, &XSAVE64), gp(), "misaligned");
    r.rbx = DATA;
    s.cr4 &= !(1 << 18);
    assert_eq!(
        run(&m, &env, &mut r, &mut s, &XSAVE64),
        Fixup::Exception {
            vector: UD,
            error_code: None
        }
    );
    s.cr4 |= 1 << 18;
    s.cr0 |= 1 << 3;
    assert_eq!(
        run(&m, &env, &mut r, &mut s, &XSAVE64),
        Fixup::Exception {
            vector: NM,
            error_code: None
        }
    );
    s.cr0 &= !(1 << 3);
    // The area's last page is beyond RAM: #PF, nothing written.
    r.rbx = crate::arch::x86::testenv::RAM as u64 - 512;
    let f = run(&m, &env, &mut r, &mut s, &XSAVE64);
    assert!(matches!(f, Fixup::PageFault(_)), "{f:?}");
    assert_eq!(m.get(r.rbx, 8), vec![0; 8]);
}

#[test]
fn xsave_without_rex_w_writes_32_bit_fip_and_zero_selectors() {
    let (m, mut r, mut s) = machine(32);
    let env = Env::new();
    state(&env, 7);
    m.put(DATA, &[0xcc; 1024]);
    r.rax = 1;
    r.rdx = 0;
    assert_eq!(run(&m, &env, &mut r, &mut s, &XSAVE32), Fixup::Resume);
    let img = m.get(DATA, 24);
    assert_eq!(&img[8..12], &0x5566_7788u32.to_le_bytes());
    assert_eq!(&img[12..16], &[0; 4]);
}

proptest! {
    /// Any XSAVE-family form, prefixes, RFBM, XCR0/XSS and guest area:
    /// the fix-up returns, and a restore leaves KVM's buffer acceptable.
    #[test]
    fn xsave_family_random_area_and_operands_never_panic(
        form in prop_oneof![
            Just(XSAVE64.to_vec()), Just(XRSTOR64.to_vec()), Just(XSAVEOPT64.to_vec()),
            Just(XSAVEC64.to_vec()), Just(XSAVES64.to_vec()), Just(XRSTORS64.to_vec()),
            Just(XSAVE32.to_vec()), Just(vec![0x0f, 0xae, 0x2b]), Just(vec![0x0f, 0xc7, 0x1b]),
        ],
        prefix in proptest::collection::vec(prop_oneof![Just(0xf0u8), Just(0x66), Just(0x64), Just(0x41)], 0..3),
        area in proptest::collection::vec(any::<u8>(), 1024),
        header in proptest::array::uniform4(any::<u64>()),
        rfbm in any::<u64>(),
        xcr0 in prop_oneof![Just(3u64), Just(7), Just(0xe7), Just(0x2e7)],
        xss in prop_oneof![Just(0u64), Just(1 << 8), Just(1 << 11)],
        rbx_off in prop_oneof![Just(0u64), Just(64), Just(8), Just(0xfc0)],
        bits in prop_oneof![Just(64u32), Just(32)],
    ) {
        let (m, mut r, mut s) = machine(bits);
        let mut env = Env::new();
        env.xcr0 = xcr0;
        env.xss = xss;
        let mut img = area.clone();
        for (i, h) in header.iter().enumerate() {
            img[512 + 8 * i..520 + 8 * i].copy_from_slice(&h.to_le_bytes());
        }
        m.put(DATA + rbx_off, &img);
        r.rbx = DATA + rbx_off;
        r.rax = rfbm & 0xffff_ffff;
        r.rdx = rfbm >> 32;
        let mut code = prefix.clone();
        code.extend_from_slice(&form);
        let _ = run(&m, &env, &mut r, &mut s, &code);
        let a = env.area.borrow();
        prop_assert_eq!(a.len(), KVM_AREA);
    }
}
