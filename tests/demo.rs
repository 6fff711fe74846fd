//! `xenkvm demo` boots the project's own test guest, which checks the Xen
//! interface from inside and reports each check.

mod common;

#[test]
fn demo_builtin_guest_all_checks_pass() {
    if !common::kvm_available("demo_builtin_guest_all_checks_pass") {
        return;
    }
    let (out, took) = common::xenkvm_with_stdin(&["demo", "--timeout", "60"], b"typed line\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n(took {:.2} s)", took.as_secs_f64());
    let checks: Vec<_> = stdout
        .lines()
        .filter(|l| l.starts_with("xenkvm-guest: check "))
        .collect();
    for name in [
        "cpuid",
        "xen_version",
        "shared_info",
        "hvm_params",
        "console_ring",
        "xenstore",
        "evtchn",
        "grant_table",
        "vcpu_op",
        "traps",
        "user_int80",
        "poll_timeout",
        "runstate",
        "smp",
        "upcall",
        "ipi_pingpong",
        "virq_timer",
        "poll_wakeup",
        "grant_v2",
        "xs_transaction",
        "console_input",
        "fifo",
        "pci",
        "vcpu_init",
    ] {
        assert!(
            checks
                .iter()
                .any(|l| l.starts_with(&format!("xenkvm-guest: check {name} "))),
            "the guest did not run the {name} check"
        );
    }
    let failed: Vec<_> = checks.iter().filter(|l| !l.contains(" ... ok")).collect();
    assert!(
        failed.is_empty(),
        "failed checks: {failed:#?}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("typed line"),
        "the line typed on stdin did not reach the guest's PV console"
    );
    assert!(
        !stdout.contains("skipped (1 vCPU)"),
        "demo must run with 2 vCPUs"
    );
    assert!(
        !stdout.contains("skipped (no vCPU 2"),
        "demo must run with a third vCPU for VCPUOP_initialise"
    );
    assert_eq!(common::test_result(&stdout).as_deref(), Some("SUCCESS"));
    assert!(out.status.success(), "exit status {:?}", out.status);
}

#[test]
fn run_missing_kernel_fails_with_one_line_reason() {
    let (out, _) = common::xenkvm(&["run", "--kernel", "/nonexistent/kernel"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read --kernel"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn run_timeout_expires_with_nonzero_exit() {
    if !common::kvm_available("run_timeout_expires_with_nonzero_exit") {
        return;
    }
    // The test guest in idle mode halts for ever: a 1 s timeout must end it.
    let guest = std::env::temp_dir().join(format!("xenkvm-test-guest-{}.elf", std::process::id()));
    std::fs::write(&guest, xenkvm::testing::TEST_GUEST_ELF).unwrap();
    let (out, took) = common::xenkvm(&[
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "idle",
        "--timeout",
        "1",
    ]);
    let _ = std::fs::remove_file(&guest);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("timeout"));
    assert!(took.as_secs_f64() < 10.0);
}

#[test]
fn demo_backend_requests_are_served_on_the_event_loop_thread() {
    if !common::kvm_available("demo_backend_requests_are_served_on_the_event_loop_thread") {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xenkvm"))
        .args(["demo", "--timeout", "60"])
        .env("XENKVM_LOG", "xenkvm::xen=debug")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let served: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("backend request served"))
        .collect();
    for backend in ["xenstore", "console"] {
        assert!(
            served
                .iter()
                .any(|l| l.contains(&format!("backend=\"{backend}\""))),
            "no {backend} request was served:\n{err}"
        );
    }
    let elsewhere: Vec<_> = served
        .iter()
        .filter(|l| !(l.contains(" xen-events ") && l.contains("thread=\"xen-events\"")))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "backend work ran off the event loop: {elsewhere:#?}"
    );
    println!("{} backend requests, all on xen-events", served.len());
}
