//! `VCPUOP_initialise`, `VCPUOP_up`, `VCPUOP_down` and `VCPUOP_is_up` for HVM vCPUs, with
//! Xen 4.17's argument checks (`arch_set_info_hvm_guest`, `common_vcpu_op`), and a property
//! test over random contexts.

mod common;

use common::*;
use hypercalls::testing::Call;
use hypercalls::{CrPolicy, DomainConfig, Errno, GuestWidth, HvmSegment, HvmVcpuState, Outcome};
use proptest::prelude::*;

const INITIALISE: u64 = 0;
const UP: u64 = 1;
const DOWN: u64 = 2;
const IS_UP: u64 = 3;
const GET_RUNSTATE_INFO: u64 = 4;

const CTX_LEN: usize = 128;
/// Offset of `cpu_regs` in `vcpu_hvm_context`.
const R: usize = 8;

const CR0_PE_PG: u64 = 0x8000_0011;
const CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A 64-bit context: long mode with paging, as a kernel starts an AP.
fn ctx64(rip: u64, rsp: u64) -> Vec<u8> {
    let mut b = vec![0u8; CTX_LEN];
    b[0..4].copy_from_slice(&1u32.to_le_bytes());
    let mut q = |i: usize, v: u64| b[R + 8 * i..R + 8 * i + 8].copy_from_slice(&v.to_le_bytes());
    for (i, v) in [0xa0u64, 0xc1, 0xd2, 0xb3].iter().enumerate() {
        q(i, *v);
    }
    q(4, rsp);
    q(5, 0xbb);
    q(6, 0x51);
    q(7, 0xd1);
    q(8, rip);
    q(9, 0x2);
    q(10, CR0_PE_PG);
    q(11, 0x1000);
    q(12, CR4_PAE);
    q(13, EFER_LME);
    b
}

/// XTF xsa-472-3's 32-bit flat context (`launch_aps`): CS 0xc9b, data 0xc93, TR 0x8b.
fn ctx32(eip: u32, esp: u32) -> Vec<u8> {
    let mut b = vec![0u8; CTX_LEN];
    let mut d = |o: usize, v: u32| b[R + o..R + o + 4].copy_from_slice(&v.to_le_bytes());
    d(16, esp);
    d(32, eip);
    d(40, 0x11); // CR0.PE | ET
    for i in 0..4 {
        d(84 + 4 * i, !0);
    }
    d(84 + 16, 0x67);
    for (i, ar) in [0xc9bu16, 0xc93, 0xc93, 0xc93, 0x08b].iter().enumerate() {
        b[R + 104 + 2 * i..R + 106 + 2 * i].copy_from_slice(&ar.to_le_bytes());
    }
    b
}

/// A named change to a valid context.
type Case = (&'static str, Box<dyn Fn(&mut Vec<u8>)>);

fn set32(b: &mut [u8], o: usize, v: u32) {
    b[R + o..R + o + 4].copy_from_slice(&v.to_le_bytes());
}
fn set16(b: &mut [u8], o: usize, v: u16) {
    b[R + o..R + o + 2].copy_from_slice(&v.to_le_bytes());
}
fn set64(b: &mut [u8], o: usize, v: u64) {
    b[R + o..R + o + 8].copy_from_slice(&v.to_le_bytes());
}
/// 32-bit mode: segment attribute `i` (CS, DS, SS, ES, TR).
fn ar(b: &mut [u8], i: usize, v: u16) {
    set16(b, 104 + 2 * i, v);
}

fn init(e: &Env, vcpu: u64, ctx: &[u8]) -> i64 {
    e.v.poke(BUF, ctx);
    e.ret(nr::VCPU_OP, &[INITIALISE, vcpu, BUF])
}

fn inits(e: &Env) -> Vec<(u32, HvmVcpuState)> {
    e.p.take_calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::VcpuInit(v, s) => Some((v, *s)),
            _ => None,
        })
        .collect()
}

#[test]
fn vcpu_initialise_64bit_context_loads_long_mode_and_stays_down_until_up() {
    for w in both() {
        let e = env(w);
        assert_eq!(e.ret(nr::VCPU_OP, &[IS_UP, 1, 0]), 0);
        assert_eq!(
            e.ret(nr::VCPU_OP, &[UP, 1, 0]),
            EINVAL,
            "up before initialise"
        );
        assert_eq!(init(&e, 1, &ctx64(0xffff_8000_0010_0000, 0x20_0000)), 0);
        let got = inits(&e);
        assert_eq!(got.len(), 1);
        let (v, s) = got[0];
        assert_eq!(v, 1);
        assert_eq!(
            (s.rax, s.rcx, s.rdx, s.rbx, s.rsp, s.rbp, s.rsi, s.rdi),
            (0xa0, 0xc1, 0xd2, 0xb3, 0x20_0000, 0xbb, 0x51, 0xd1)
        );
        assert_eq!((s.rip, s.rflags), (0xffff_8000_0010_0000, 2));
        assert_eq!((s.cr0, s.cr3, s.cr4), (CR0_PE_PG, 0x1000, CR4_PAE));
        assert_eq!(s.efer, EFER_LME | EFER_LMA, "LMA follows LME");
        let flat = |attr| HvmSegment {
            base: 0,
            limit: !0,
            attr,
        };
        assert_eq!(s.cs, flat(0xa9b));
        assert_eq!((s.ds, s.ss, s.es), (flat(0xc93), flat(0xc93), flat(0xc93)));
        assert_eq!(
            s.tr,
            HvmSegment {
                base: 0,
                limit: 0x67,
                attr: 0x8b
            }
        );
        assert_eq!(
            e.ret(nr::VCPU_OP, &[IS_UP, 1, 0]),
            0,
            "initialise leaves it down"
        );
        assert_eq!(e.ret(nr::VCPU_OP, &[UP, 1, 0]), 0);
        assert_eq!(e.p.take_calls(), vec![Call::VcpuUp(1)]);
        assert_eq!(e.ret(nr::VCPU_OP, &[IS_UP, 1, 0]), 1);
        assert_eq!(e.ret(nr::VCPU_OP, &[UP, 1, 0]), 0, "up of an up vCPU");
        assert!(e.p.take_calls().is_empty(), "no second wake-up");
    }
}

#[test]
fn vcpu_initialise_32bit_flat_context_sets_accessed_and_busy_bits() {
    for w in both() {
        let e = env(w);
        assert_eq!(init(&e, 1, &ctx32(0x10_1234, 0x11_0000)), 0);
        let (_, s) = inits(&e)[0];
        assert_eq!(
            (s.rip, s.rsp, s.cr0, s.efer),
            (0x10_1234, 0x11_0000, 0x11, 0)
        );
        assert_eq!(s.cs.attr, 0xc9b);
        assert_eq!((s.ds.attr, s.ss.attr, s.es.attr), (0xc93, 0xc93, 0xc93));
        assert_eq!(s.tr.attr, 0x08b, "busy TSS");
        assert_eq!((s.cs.limit, s.tr.limit), (!0, 0x67));

        // Type bits without accessed/busy get them; null DS/ES are allowed.
        let e = env(w);
        let mut c = ctx32(0x1000, 0x2000);
        ar(&mut c, 0, 0xc9a);
        ar(&mut c, 1, 0);
        ar(&mut c, 2, 0xc92);
        ar(&mut c, 3, 0);
        ar(&mut c, 4, 0x089);
        set32(&mut c, 64, 0x1_0000); // CS base
        assert_eq!(init(&e, 1, &c), 0);
        let (_, s) = inits(&e)[0];
        assert_eq!((s.cs.attr, s.ss.attr, s.tr.attr), (0xc9b, 0xc93, 0x08b));
        assert_eq!((s.ds.attr, s.es.attr), (0, 0));
        assert_eq!(s.cs.base, 0x1_0000);
    }
}

#[test]
fn vcpu_initialise_initialised_vcpu_eexist_before_checking_the_context() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(init(&e, 0, &ctx64(0x1000, 0x2000)), EEXIST, "vCPU 0 runs");
    assert_eq!(init(&e, 1, &ctx64(0x1000, 0x2000)), 0);
    assert_eq!(init(&e, 1, &ctx64(0x1000, 0x2000)), EEXIST);
    let mut bad = ctx64(0x1000, 0x2000);
    bad[0] = 7;
    assert_eq!(init(&e, 1, &bad), EEXIST, "EEXIST wins over a bad mode");
    // A vCPU started by INIT/SIPI is initialised too.
    let e = env(GuestWidth::Bits64);
    e.d.vcpu_started(e.d.vcpu(1).expect("vcpu 1"));
    assert_eq!(init(&e, 1, &ctx64(0x1000, 0x2000)), EEXIST);
    assert!(inits(&e).is_empty());
}

#[test]
fn vcpu_initialise_bad_vcpu_id_enoent() {
    let e = env(GuestWidth::Bits64);
    e.v.poke(BUF, &ctx64(0x1000, 0x2000));
    for id in [2u64, 4096, u64::from(u32::MAX)] {
        for cmd in [INITIALISE, UP, DOWN, IS_UP] {
            assert_eq!(
                e.ret(nr::VCPU_OP, &[cmd, id, BUF]),
                ENOENT,
                "cmd {cmd} vcpu {id}"
            );
        }
    }
}

#[test]
fn vcpu_initialise_unreadable_context_efault_and_vcpu_stays_uninitialised() {
    for w in both() {
        let e = env(w);
        assert_eq!(e.ret(nr::VCPU_OP, &[INITIALISE, 1, HOLE]), EFAULT);
        // The last 64 bytes of the 128 are past the mapped window: Xen copies all 128.
        let at = WINDOW_END - 64;
        e.v.poke(at, &ctx64(0x1000, 0x2000)[..64]);
        assert_eq!(e.ret(nr::VCPU_OP, &[INITIALISE, 1, at]), EFAULT);
        assert_eq!(
            e.ret(nr::VCPU_OP, &[UP, 1, 0]),
            EINVAL,
            "still uninitialised"
        );
        // A context straddling two mapped pages is fine.
        e.v.poke(STRADDLE, &ctx64(0x1000, 0x2000));
        assert_eq!(e.ret(nr::VCPU_OP, &[INITIALISE, 1, STRADDLE]), 0);
    }
}

#[test]
fn vcpu_initialise_vcpu_without_vcpu_info_einval_before_reading() {
    let e = env_cfg(
        GuestWidth::Bits64,
        DomainConfig {
            vcpus: 40,
            ..DomainConfig::default()
        },
    );
    // vCPU 33 has no slot in shared_info and registered no vcpu_info: Xen's dummy_vcpu_info.
    assert_eq!(e.ret(nr::VCPU_OP, &[INITIALISE, 33, HOLE]), EINVAL);
    assert_eq!(init(&e, 33, &ctx64(0x1000, 0x2000)), EINVAL);
    assert_eq!(
        init(&e, 31, &ctx64(0x1000, 0x2000)),
        0,
        "vCPU 31 has a slot"
    );
}

#[test]
fn vcpu_initialise_from_user_mode_eperm() {
    let mut e = env(GuestWidth::Bits64);
    e.v.cpl = 3;
    assert_eq!(init(&e, 1, &ctx64(0x1000, 0x2000)), EPERM);
    e.v.cpl = 0;
    assert_eq!(init(&e, 1, &ctx64(0x1000, 0x2000)), 0);
}

#[test]
fn vcpu_initialise_64bit_checks_einval() {
    let policy = CrPolicy::default();
    let cases: Vec<Case> = vec![
        ("pad", Box::new(|b| b[4] = 1)),
        ("mode 2", Box::new(|b| b[0] = 2)),
        ("mode 0x100", Box::new(|b| b[1] = 1)),
        (
            "non-canonical RIP",
            Box::new(|b| set64(b, 64, 0x0000_8000_0000_0000)),
        ),
        (
            "non-canonical high RIP",
            Box::new(|b| set64(b, 64, 0xfff0_0000_0000_0000)),
        ),
        ("CR0.PG clear", Box::new(|b| set64(b, 80, 0x11))),
        ("CR4.PAE clear", Box::new(|b| set64(b, 96, 0))),
        ("EFER.LME clear", Box::new(|b| set64(b, 104, EFER_LMA))),
        (
            "CR4 bit outside the policy (VMXE)",
            Box::new(|b| set64(b, 96, CR4_PAE | 1 << 13)),
        ),
        (
            "CR4 reserved bit 63",
            Box::new(|b| set64(b, 96, CR4_PAE | 1 << 63)),
        ),
        (
            "EFER.SVME (no nested virt)",
            Box::new(|b| set64(b, 104, EFER_LME | 1 << 12)),
        ),
        (
            "EFER unknown bit",
            Box::new(|b| set64(b, 104, EFER_LME | 1 << 20)),
        ),
        // Xen accepts these and crashes the domain at VM entry; the host cannot load them.
        ("CR0.PG without PE", Box::new(|b| set64(b, 80, 0x8000_0010))),
        (
            "CR0.NW without CD",
            Box::new(|b| set64(b, 80, CR0_PE_PG | 1 << 29)),
        ),
        (
            "CR0 bit 32",
            Box::new(|b| set64(b, 80, CR0_PE_PG | 1 << 32)),
        ),
        ("RFLAGS bit 22", Box::new(|b| set64(b, 72, 2 | 1 << 22))),
    ];
    assert_eq!(policy.cr4_valid & (1 << 13), 0);
    for (what, f) in &cases {
        let e = env(GuestWidth::Bits64);
        let mut c = ctx64(0x1000, 0x2000);
        f(&mut c);
        assert_eq!(init(&e, 1, &c), EINVAL, "{what}");
        assert!(inits(&e).is_empty(), "{what}: nothing staged");
        assert_eq!(
            e.ret(nr::VCPU_OP, &[UP, 1, 0]),
            EINVAL,
            "{what}: not initialised"
        );
    }
}

#[test]
fn vcpu_initialise_cr_policy_from_the_vmm_applies() {
    let e = env(GuestWidth::Bits64);
    let mut c = ctx64(0x1000, 0x2000);
    set64(&mut c, 96, CR4_PAE | 1 << 16); // FSGSBASE
    assert_eq!(init(&e, 1, &c), EINVAL, "not in the baseline policy");
    e.d.set_cr_policy(CrPolicy {
        cr4_valid: CrPolicy::default().cr4_valid | 1 << 16,
        efer_valid: CrPolicy::default().efer_valid,
    });
    assert_eq!(init(&e, 1, &c), 0);
    let e = env(GuestWidth::Bits64);
    e.d.set_cr_policy(CrPolicy {
        cr4_valid: CrPolicy::default().cr4_valid,
        efer_valid: EFER_LME | EFER_LMA, // no NX on this CPU
    });
    let mut c = ctx64(0x1000, 0x2000);
    set64(&mut c, 104, EFER_LME | 1 << 11);
    assert_eq!(init(&e, 1, &c), EINVAL, "NXE without the feature");
}

#[test]
fn vcpu_initialise_32bit_segment_and_register_checks_einval() {
    let cases: Vec<Case> = vec![
        ("pad1", Box::new(|b| set32(b, 52, 1))),
        ("pad2[0]", Box::new(|b| set16(b, 114, 1))),
        ("pad2[2]", Box::new(|b| set16(b, 118, 0x8000))),
        ("CS attr bit 12", Box::new(|b| ar(b, 0, 0x1c9b))),
        ("ES attr bit 15", Box::new(|b| ar(b, 3, 0x8c93))),
        ("null CS", Box::new(|b| ar(b, 0, 0))),
        ("null SS", Box::new(|b| ar(b, 2, 0))),
        ("null TR", Box::new(|b| ar(b, 4, 0))),
        ("TR a code segment", Box::new(|b| ar(b, 4, 0x09b))),
        ("TR a 16-bit TSS", Box::new(|b| ar(b, 4, 0x081))),
        ("TR an LDT", Box::new(|b| ar(b, 4, 0x082))),
        ("CS a system segment", Box::new(|b| ar(b, 0, 0xc8b))),
        ("CS not present", Box::new(|b| ar(b, 0, 0xc1b))),
        ("DS not present", Box::new(|b| ar(b, 1, 0xc13))),
        ("TR not present", Box::new(|b| ar(b, 4, 0x00b))),
        ("CS data", Box::new(|b| ar(b, 0, 0xc93))),
        ("SS code", Box::new(|b| ar(b, 2, 0xc9b))),
        ("SS read-only", Box::new(|b| ar(b, 2, 0xc91))),
        ("DS execute-only code", Box::new(|b| ar(b, 1, 0xc99))),
        ("ES execute-only code", Box::new(|b| ar(b, 3, 0xc99))),
        (
            "EIP beyond a byte-granular CS limit",
            Box::new(|b| {
                ar(b, 0, 0x49b);
                set32(b, 84, 0xffff);
                set32(b, 32, 0x1_0000);
            }),
        ),
        (
            "EIP beyond a page-granular CS limit",
            Box::new(|b| {
                set32(b, 84, 0xf);
                set32(b, 32, 0x1_0000);
            }),
        ),
        ("SS.DPL != CS.DPL", Box::new(|b| ar(b, 2, 0xcf3))),
        ("DS.DPL above CS.DPL", Box::new(|b| ar(b, 1, 0xcb3))),
        (
            "ES.DPL above CS.DPL",
            Box::new(|b| {
                ar(b, 0, 0xcbb);
                ar(b, 2, 0xcb3);
                ar(b, 3, 0xcf3);
            }),
        ),
        ("EFER.LMA without LME", Box::new(|b| set64(b, 56, EFER_LMA))),
        // The host cannot load these (Xen would crash the domain at VM entry).
        (
            "EFER.LME without paging",
            Box::new(|b| set64(b, 56, EFER_LME)),
        ),
        ("CR0.PG without PE", Box::new(|b| set32(b, 40, 0x8000_0010))),
        ("CS.L outside long mode", Box::new(|b| ar(b, 0, 0xa9b))),
        ("EFLAGS bit 15", Box::new(|b| set32(b, 36, 1 << 15))),
    ];
    for w in both() {
        for (what, f) in &cases {
            let e = env(w);
            let mut c = ctx32(0x1000, 0x2000);
            f(&mut c);
            assert_eq!(init(&e, 1, &c), EINVAL, "{what}");
            assert!(inits(&e).is_empty(), "{what}: nothing staged");
        }
    }
}

#[test]
fn vcpu_initialise_32bit_accepted_variants() {
    let cases: Vec<Case> = vec![
        ("readable code in DS", Box::new(|b| ar(b, 1, 0xc9b))),
        ("null ES", Box::new(|b| ar(b, 3, 0))),
        (
            "DPL 3 everywhere",
            Box::new(|b| {
                for i in 0..4 {
                    ar(b, i, if i == 0 { 0xcfb } else { 0xcf3 });
                }
            }),
        ),
        (
            "DS.DPL 0 below CS.DPL 3",
            Box::new(|b| {
                ar(b, 0, 0xcfb);
                ar(b, 2, 0xcf3);
            }),
        ),
        (
            "EIP at a page-granular limit",
            Box::new(|b| {
                set32(b, 84, 0xf);
                set32(b, 32, 0xffff);
            }),
        ),
        (
            "compatibility mode (LME, paging, PAE)",
            Box::new(|b| {
                set32(b, 40, 0x8000_0011);
                set32(b, 48, CR4_PAE as u32);
                set64(b, 56, EFER_LME);
            }),
        ),
        (
            "32-bit paging with NX",
            Box::new(|b| {
                set32(b, 40, 0x8000_0011);
                set32(b, 48, CR4_PAE as u32);
                set64(b, 56, 1 << 11);
            }),
        ),
        ("EFLAGS.IF", Box::new(|b| set32(b, 36, 0x202))),
    ];
    for (what, f) in &cases {
        let e = env(GuestWidth::Bits32);
        let mut c = ctx32(0x1000, 0x2000);
        f(&mut c);
        assert_eq!(init(&e, 1, &c), 0, "{what}");
        let s = inits(&e);
        assert_eq!(s.len(), 1, "{what}");
        if what.starts_with("compat") {
            assert_eq!(s[0].1.efer, EFER_LME | EFER_LMA);
        }
    }
}

#[test]
fn vcpu_initialise_platform_refusal_returned_and_vcpu_stays_uninitialised() {
    let e = env(GuestWidth::Bits64);
    *e.p.vcpu_init_error.lock() = Some(Errno::ENOMEM);
    assert_eq!(init(&e, 1, &ctx64(0x1000, 0x2000)), -12);
    assert_eq!(e.ret(nr::VCPU_OP, &[UP, 1, 0]), EINVAL);
    *e.p.vcpu_init_error.lock() = None;
    assert_eq!(init(&e, 1, &ctx64(0x1000, 0x2000)), 0);
}

#[test]
fn vcpu_down_up_round_trip_and_last_vcpu_powers_off() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(init(&e, 1, &ctx64(0x1000, 0x2000)), 0);
    assert_eq!(e.ret(nr::VCPU_OP, &[DOWN, 1, 0]), 0, "down of a down vCPU");
    assert_eq!(e.ret(nr::VCPU_OP, &[UP, 1, 0]), 0);
    e.p.take_calls();
    assert_eq!(e.ret(nr::VCPU_OP, &[DOWN, 1, 0]), 0);
    assert_eq!(e.ret(nr::VCPU_OP, &[IS_UP, 1, 0]), 0);
    assert_eq!(e.p.take_calls(), vec![Call::VcpuDown(1)]);
    // Still initialised: no second initialise, and up brings it back as it was.
    assert_eq!(init(&e, 1, &ctx64(0x1000, 0x2000)), EEXIST);
    assert_eq!(e.ret(nr::VCPU_OP, &[UP, 1, 0]), 0);
    assert_eq!(e.p.take_calls(), vec![Call::VcpuUp(1)]);
    // vCPU 0 may go down while vCPU 1 is up; then vCPU 1 is the last one.
    assert_eq!(e.ret(nr::VCPU_OP, &[DOWN, 0, 0]), 0);
    assert_eq!(e.ret(nr::VCPU_OP, &[IS_UP, 0, 0]), 0);
    let v1 = hypercalls::testing::FakeVcpu::new(1, GuestWidth::Bits64);
    assert_eq!(
        e.call_on(&v1, nr::VCPU_OP, &[DOWN, 1, 0]),
        Outcome::Shutdown { reason: 0 }
    );
}

#[test]
fn vcpu_get_runstate_info_of_other_vcpu_reads_platform() {
    let e = env(GuestWidth::Bits64);
    e.p.runstate.lock().state = 3;
    assert_eq!(e.ret(nr::VCPU_OP, &[GET_RUNSTATE_INFO, 1, BUF]), 0);
    assert_eq!(e.v.peek_u32(BUF), 3, "offline");
}

// ---- property test -----------------------------------------------------------------------

/// A context: random bytes, or a valid one of either mode with a few bytes changed.
fn context() -> impl Strategy<Value = Vec<u8>> {
    let base = prop_oneof![
        Just(ctx64(0xffff_8000_0000_1000, 0x8000)),
        Just(ctx32(0x1000, 0x8000)),
        prop::collection::vec(any::<u8>(), CTX_LEN),
    ];
    let edits = prop::collection::vec((0..CTX_LEN, any::<u8>()), 0..6);
    let mode = prop_oneof![Just(None), Just(Some(0u8)), Just(Some(1u8))];
    (base, edits, mode).prop_map(|(mut b, edits, mode)| {
        for (i, v) in edits {
            b[i] = v;
        }
        if let Some(m) = mode {
            b[0..8].copy_from_slice(&[m, 0, 0, 0, 0, 0, 0, 0]);
        }
        b
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
    ))]

    /// Never a panic; 0 or -EINVAL; an accepted state is one the host can load; a second
    /// initialise is -EEXIST and up then succeeds.
    #[test]
    fn vcpu_initialise_random_context_errno_or_loadable_state(
        c in context(),
        compat in any::<bool>(),
    ) {
        let w = if compat { GuestWidth::Bits32 } else { GuestWidth::Bits64 };
        let e = env(w);
        let r = init(&e, 1, &c);
        prop_assert!(r == 0 || r == EINVAL, "rc {}", r);
        if r == 0 {
            let got = inits(&e);
            prop_assert_eq!(got.len(), 1);
            let s = got[0].1;
            let long = s.efer & EFER_LMA != 0;
            prop_assert_eq!(long, s.efer & EFER_LME != 0);
            prop_assert!(!long || (s.cr0 & 0x8000_0001 == 0x8000_0001 && s.cr4 & CR4_PAE != 0));
            prop_assert!(!s.cs.l() || long);
            prop_assert!(s.cs.attr & 0x90 == 0x90, "CS present code/data: {:#x}", s.cs.attr);
            prop_assert!(s.tr.attr & 0x9f == 0x8b, "TR a busy TSS: {:#x}", s.tr.attr);
            prop_assert_eq!(s.ss.dpl(), s.cs.dpl());
            prop_assert_eq!(init(&e, 1, &c), EEXIST);
            prop_assert_eq!(e.ret(nr::VCPU_OP, &[UP, 1, 0]), 0);
            prop_assert_eq!(e.ret(nr::VCPU_OP, &[IS_UP, 1, 0]), 1);
        } else {
            prop_assert!(inits(&e).is_empty());
            prop_assert_eq!(e.ret(nr::VCPU_OP, &[UP, 1, 0]), EINVAL);
        }
        e.alive();
    }
}
