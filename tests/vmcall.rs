//! Guests that issue `vmcall` directly (no hypercall page), as Linux does
//! since the hypercall page was removed. On a KVM without Xen support the
//! instruction never exits: xenkvm's monitor kicks the stuck vCPU, handles
//! the call, and arms a hardware breakpoint at the site so later calls there
//! exit at once.

mod common;

use iced_x86::code_asm::*;

/// 32-bit guest: xen_version once at one site, then 2000 times at another,
/// checking each result, then SCHEDOP_shutdown(poweroff); any wrong result
/// shuts down with SHUTDOWN_crash.
fn vmcall_guest(iterations: u32) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut fail = a.create_label();
    let mut again = a.create_label();
    // PVH entry leaves ESP undefined: give the guest a stack for its arguments.
    a.mov(esp, 0x8000u32).unwrap();
    a.mov(eax, 17u32).unwrap();
    a.xor(ebx, ebx).unwrap();
    a.vmcall().unwrap();
    a.cmp(eax, 0x40011u32 as i32).unwrap();
    a.jne(fail).unwrap();
    a.mov(esi, iterations).unwrap();
    a.set_label(&mut again).unwrap();
    a.mov(eax, 17u32).unwrap();
    a.xor(ebx, ebx).unwrap();
    a.vmcall().unwrap();
    a.cmp(eax, 0x40011u32 as i32).unwrap();
    a.jne(fail).unwrap();
    a.dec(esi).unwrap();
    a.jnz(again).unwrap();
    a.mov(eax, 29u32).unwrap();
    a.mov(ebx, 2u32).unwrap();
    a.push(0).unwrap(); // SHUTDOWN_poweroff
    a.mov(ecx, esp).unwrap();
    a.vmcall().unwrap();
    a.hlt().unwrap();
    a.set_label(&mut fail).unwrap();
    a.mov(eax, 29u32).unwrap();
    a.mov(ebx, 2u32).unwrap();
    a.push(3).unwrap(); // SHUTDOWN_crash
    a.mov(ecx, esp).unwrap();
    a.vmcall().unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x10_0000).unwrap();
    xenkvm::boot::build_pvh_elf32(0x10_0000, 0x10_0000, &code, 0)
}

#[test]
fn vmcall_guest_without_hypercall_page_completes_through_breakpoints() {
    if !common::kvm_available("vmcall_guest_without_hypercall_page_completes_through_breakpoints") {
        return;
    }
    let path = std::env::temp_dir().join(format!("xenkvm-vmcall-{}.elf", std::process::id()));
    std::fs::write(&path, vmcall_guest(2000)).unwrap();
    // Without the breakpoint every call would wait for the monitor (~20 ms):
    // 2000 calls would take 40 s and hit the timeout.
    let (out, took) = common::xenkvm(&[
        "run",
        "--kernel",
        path.to_str().unwrap(),
        "--memory",
        "32",
        "--timeout",
        "15",
    ]);
    let _ = std::fs::remove_file(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?} after {:.2} s: {err}",
        out.status,
        took.as_secs_f64()
    );
    println!("2002 vmcalls in {:.2} s", took.as_secs_f64());
}
