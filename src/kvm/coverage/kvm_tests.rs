//! The XSAVE-family and `invpcid` fix-ups on this host's real KVM (the
//! coverage VM, long mode, CPL 0): the guest runs a short sequence, every
//! emulation failure goes through `x86::fixup` as in the VMM, and the test
//! checks the vCPU state and guest memory afterwards. Needs /dev/kvm:
//! skipped with a printed reason without it, a failure with REQUIRE_KVM=1.

use super::*;

fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("REQUIRE_KVM").as_deref() != Ok("1"),
            "{test}: /dev/kvm is not usable and REQUIRE_KVM=1"
        );
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: /dev/kvm is not usable (set REQUIRE_KVM=1 to make this a failure)"
        );
    }
    ok
}

/// Port the test code uses to stop for the VMM in the middle.
const PORT_PAUSE: u16 = 0x97;

/// Runs `code` (ending at CODE_END, then the marker) after `setup` (which
/// may edit guest memory, the vCPU and the registers); `pause` is called at
/// each `out 0x97`, and every emulation failure must be fixed up to
/// [`Fixup::Resume`]. Returns the registers at the marker.
fn run_code(
    vm: &mut CovVm,
    code: &[u8],
    setup: &dyn Fn(&CovVm, &mut kvm_regs),
    pause: &mut dyn FnMut(&CovVm),
) -> kvm_regs {
    vm.prepare(64, code).unwrap();
    vm.set_state(64, code.len()).unwrap();
    let mut r = vm.p.vcpu.get_regs().unwrap();
    setup(vm, &mut r);
    vm.p.vcpu.set_regs(&r).unwrap();
    for _ in 0..64 {
        match vm.p.vcpu.run() {
            Ok(VcpuExit::IoOut(PORT_OK, _)) => return vm.p.vcpu.get_regs().unwrap(),
            Ok(VcpuExit::IoOut(PORT_PAUSE, _)) => pause(vm),
            Ok(VcpuExit::IoOut(PORT_VEC, _)) => {
                panic!("exception {}", vm.p.vcpu.get_regs().unwrap().rax as u8)
            }
            Ok(VcpuExit::InternalError) => {
                let fd = &vm.p.vcpu;
                let (mut regs, mut sregs) = (fd.get_regs().unwrap(), fd.get_sregs().unwrap());
                let fix = x86::fixup(&vm.p.mem, &ProbeEnv(fd), &mut regs, &mut sregs);
                assert_eq!(fix, Fixup::Resume);
                apply_fixup(fd, &fix, &regs, &mut sregs).unwrap();
            }
            x => panic!("{x:?}"),
        }
    }
    panic!("the guest did not reach the end");
}

fn set_xmm(vm: &CovVm, n: usize, v: [u8; 16]) {
    let mut f = super::super::vcpu::fpu_state(&vm.p.vcpu).unwrap();
    f.xmm[n] = v;
    assert!(super::super::vcpu::set_fpu_state(&vm.p.vcpu, &f));
}

/// A clean XSAVE header at SCRATCH (prepare() fills scratch memory with
/// CODE_END, which xrstor rightly refuses as reserved header bits).
fn zero_header(vm: &CovVm) {
    vm.p.mem
        .write_slice(&[0u8; 64], GuestAddress(SCRATCH + 512))
        .unwrap();
}

fn xmm(vm: &CovVm, n: usize) -> [u8; 16] {
    super::super::vcpu::fpu_state(&vm.p.vcpu).unwrap().xmm[n]
}

#[test]
fn kvm_xsave_and_xrstor_use_the_vcpus_real_state() {
    if !kvm_available("kvm_xsave_and_xrstor_use_the_vcpus_real_state") {
        return;
    }
    let mut vm = CovVm::new().unwrap();
    // xsave64 [rbx] with RFBM = x87|SSE; then pause (the test checks and
    // rewrites the image); then xrstor64 [rbx].
    let code = [
        0x48,
        0x0f,
        0xae,
        0x23, // xsave64 [rbx]
        0xe6,
        PORT_PAUSE as u8, // out 0x97, al
        0x48,
        0x0f,
        0xae,
        0x2b, // xrstor64 [rbx]
    ];
    let pattern = [0x5au8; 16];
    let mut checked = false;
    run_code(
        &mut vm,
        &code,
        &|vm, r| {
            zero_header(vm);
            r.rax = 3;
            r.rdx = 0;
        },
        &mut |vm| {
            let mut img = [0u8; 576];
            vm.p.mem
                .read_slice(&mut img, GuestAddress(SCRATCH))
                .unwrap();
            // FCW and MXCSR as set_state loaded them, XSTATE_BV in range.
            assert_eq!(&img[0..2], &0x37fu16.to_le_bytes());
            assert_eq!(&img[24..28], &0x1f80u32.to_le_bytes());
            let bv = u64::from_le_bytes(img[512..520].try_into().unwrap());
            assert_eq!(bv & !3, 0, "XSTATE_BV {bv:#x}: RFBM bits only");
            // Restore XMM1 = pattern, MXCSR with round-down.
            img[176..192].copy_from_slice(&pattern);
            img[24..28].copy_from_slice(&0x3f80u32.to_le_bytes());
            img[512..520].copy_from_slice(&3u64.to_le_bytes());
            img[520..576].fill(0);
            vm.p.mem.write_slice(&img, GuestAddress(SCRATCH)).unwrap();
            checked = true;
        },
    );
    assert!(checked);
    assert_eq!(xmm(&vm, 1), pattern);
    let f = super::super::vcpu::fpu_state(&vm.p.vcpu).unwrap();
    assert_eq!(f.mxcsr, 0x3f80);
}

#[test]
fn kvm_xsavec_then_xrstor_compacted_round_trip() {
    if !kvm_available("kvm_xsavec_then_xrstor_compacted_round_trip") {
        return;
    }
    let mut vm = CovVm::new().unwrap();
    let code = [
        0x48,
        0x0f,
        0xc7,
        0x23, // xsavec64 [rbx]
        0xe6,
        PORT_PAUSE as u8, // out 0x97: check, scramble XMM2
        0x48,
        0x0f,
        0xae,
        0x2b, // xrstor64 [rbx] (the compacted image)
    ];
    let mut checked = false;
    run_code(
        &mut vm,
        &code,
        &|vm, r| {
            set_xmm(vm, 2, [0x77; 16]);
            zero_header(vm);
            r.rax = 7;
            r.rdx = 0;
        },
        &mut |vm| {
            let mut img = [0u8; 576];
            vm.p.mem
                .read_slice(&mut img, GuestAddress(SCRATCH))
                .unwrap();
            let xcomp = u64::from_le_bytes(img[520..528].try_into().unwrap());
            assert_eq!(xcomp >> 63, 1, "compacted format");
            assert_eq!(&img[192..208], &[0x77; 16], "XMM2");
            set_xmm(vm, 2, [0x11; 16]);
            checked = true;
        },
    );
    assert!(checked);
    assert_eq!(xmm(&vm, 2), [0x77; 16]);
}

/// `invpcid` type 2 after the VMM remapped a page behind the guest's back
/// (a PDE rewritten in guest RAM while the vCPU was out): the fix-up runs
/// (its checks and the KVM_SET_SREGS flush) and the guest reads the new
/// page. It also prints whether the read before the flush was stale: on
/// this host it is not (KVM's instruction emulator, which runs guest kernel
/// code here, walks the guest's page tables itself), so the flush matters
/// for code the CPU runs natively through the shadow pages.
#[test]
fn kvm_invpcid_after_remap_guest_reads_new_page() {
    if !kvm_available("kvm_invpcid_after_remap_guest_reads_new_page") {
        return;
    }
    let mut vm = CovVm::new().unwrap();
    const VA: u64 = 0x40_0000 + 0x1_f000;
    const OLD: u64 = 0x1_f000; // through PD[2] -> 0
    const NEW: u64 = 0x21_f000; // through PD[2] -> 0x20_0000
    let code = [
        0x48,
        0x8b,
        0x06, // mov rax, [rsi]
        0xe6,
        PORT_PAUSE as u8, // out 0x97: the VMM remaps VA
        0x48,
        0x8b,
        0x0e, // mov rcx, [rsi]
        0x66,
        0x0f,
        0x38,
        0x82,
        0x17, // invpcid rdx, [rdi]
        0x48,
        0x8b,
        0x06, // mov rax, [rsi]
    ];
    let w = |vm: &CovVm, v: u64, at: u64| vm.p.mem.write_obj(v, GuestAddress(at)).unwrap();
    let r = run_code(
        &mut vm,
        &code,
        &|vm, r| {
            w(vm, 0x83, 0x4010); // PD[2]: VA 4 MiB -> 0
            w(vm, 0xaaaa, OLD);
            w(vm, 0xbbbb, NEW);
            vm.p.mem
                .write_slice(&[0u8; 16], GuestAddress(SCRATCH + 0x100))
                .unwrap();
            r.rsi = VA;
            r.rdi = SCRATCH + 0x100;
            r.rdx = 2;
        },
        &mut |vm| {
            assert_eq!(vm.p.vcpu.get_regs().unwrap().rax, 0xaaaa);
            w(vm, 0x20_0000 | 0x83, 0x4010); // PD[2]: VA 4 MiB -> 2 MiB
        },
    );
    eprintln!(
        "invpcid test: read before the flush {:#x} ({}), after {:#x}",
        r.rcx,
        if r.rcx == 0xaaaa {
            "stale"
        } else {
            "already new"
        },
        r.rax
    );
    assert_eq!(r.rax, 0xbbbb);
}

/// `vpaddd ymm0, ymm1, ymm2` then `vextracti128 xmm3, ymm0, 1` on the
/// vCPU's real AVX state: the sums are in YMM0 and its upper half in XMM3.
#[test]
fn kvm_avx_fixups_compute_on_the_vcpus_ymm_registers() {
    if !kvm_available("kvm_avx_fixups_compute_on_the_vcpus_ymm_registers") {
        return;
    }
    let mut vm = CovVm::new().unwrap();
    if vm.xcr0 & 4 == 0 {
        eprintln!("SKIPPED kvm_avx_fixups_compute_on_the_vcpus_ymm_registers: no AVX state");
        return;
    }
    let code = [
        0xc5, 0xf5, 0xfe, 0xc2, // vpaddd ymm0, ymm1, ymm2
        0xc4, 0xe3, 0x7d, 0x39, 0xc3, 0x01, // vextracti128 xmm3, ymm0, 1
    ];
    let dw = |b: &[u8], i: usize| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
    let hi = super::super::vcpu::xstate_layout()
        .component(2)
        .unwrap()
        .offset as usize;
    run_code(
        &mut vm,
        &code,
        &|vm, _| {
            let mut a = super::super::vcpu::xsave_bytes(&vm.p.vcpu).unwrap();
            for i in 0..4 {
                let (x, y) = (i as u32, 100 * i as u32);
                a[176 + 4 * i..180 + 4 * i].copy_from_slice(&(x + 1).to_le_bytes());
                a[192 + 4 * i..196 + 4 * i].copy_from_slice(&(y + 1).to_le_bytes());
                a[hi + 16 + 4 * i..hi + 20 + 4 * i].copy_from_slice(&(x + 5).to_le_bytes());
                a[hi + 32 + 4 * i..hi + 36 + 4 * i].copy_from_slice(&(y + 5).to_le_bytes());
            }
            a[512] |= 6;
            assert!(super::super::vcpu::set_xsave_bytes(&vm.p.vcpu, &a));
        },
        &mut |_| {},
    );
    let a = super::super::vcpu::xsave_bytes(&vm.p.vcpu).unwrap();
    for i in 0..4 {
        assert_eq!(dw(&a[160..], i), 101 * i as u32 + 2, "YMM0 low dword {i}");
        assert_eq!(dw(&a[hi..], i), 101 * i as u32 + 10, "YMM0 high dword {i}");
        assert_eq!(dw(&a[208..], i), 101 * i as u32 + 10, "XMM3 dword {i}");
    }
}
