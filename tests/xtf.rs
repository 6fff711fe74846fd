//! Boots every XTF test kernel in ../shared/guests/xtf and requires
//! `Test result: SUCCESS` (or SKIP, where the test itself says the feature
//! is absent). A kernel is excused only where the host probe shows this
//! host's KVM lacks what it needs; on a host without that limitation the
//! same kernel must pass.

mod common;

use std::time::Instant;

use xenkvm::kvm::probe::{HostProbe, Support};

/// What a kernel needs from the host beyond what xenkvm provides.
fn host_requirement(name: &str, p: &HostProbe) -> Option<(&'static str, Support)> {
    if name.contains("hvm32pae") {
        Some(("legacy 32-bit PAE paging", p.legacy_pae_paging.clone()))
    } else if name.contains("hvm32pse") {
        Some(("legacy 32-bit PSE paging", p.legacy_pse_paging.clone()))
    } else if name == "test-hvm64-selftest" || name == "test-hvm64-lm-ts" {
        Some((
            "int n at CPL 3 in long mode",
            p.user_int_n_long_mode.clone(),
        ))
    } else if name == "test-hvm32-selftest" {
        // "Userspace execution" returns to the kernel with `int $0x20` at CPL 3.
        Some((
            "int n at CPL 3 in 32-bit protected mode",
            p.user_int_n_prot32.clone(),
        ))
    } else {
        None
    }
}

#[test]
fn xtf_every_kernel_passes_or_is_excused_by_the_probe() {
    if !common::kvm_available("xtf_every_kernel_passes_or_is_excused_by_the_probe") {
        return;
    }
    let dir = common::shared_dir().join("guests/xtf");
    let mut kernels: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e}. The XTF kernels are the project's shared test data \
                 (../shared beside the clone, /work/shared on the project's machines; \
                 set XENKVM_SHARED to use another place): see README, \"On a new machine\"",
                dir.display()
            )
        })
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("test-"))
        })
        .collect();
    kernels.sort();
    assert!(!kernels.is_empty(), "no XTF kernels in {}", dir.display());
    let probe = HostProbe::get();
    let start = Instant::now();
    let (mut passed, mut skipped, mut excused, mut failed) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for k in &kernels {
        let name = k.file_name().unwrap().to_string_lossy().to_string();
        let (out, took) = common::xenkvm(&[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "128",
            "--timeout",
            "60",
            // One boot per kernel: a triple fault (a reboot to Xen) fails it.
            "--on-reboot",
            "destroy",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let result = common::test_result(&stdout);
        let ok_exit = out.status.success();
        let verdict = match (result.as_deref(), ok_exit) {
            (Some("SUCCESS"), true) => "SUCCESS",
            (Some("SKIP"), true) => "SKIP",
            _ => "FAIL",
        };
        let req = host_requirement(&name, probe);
        println!(
            "{name:<36} {verdict:<8} result={:<8} exit={:<4} {:>6.2}s",
            result.as_deref().unwrap_or("none"),
            out.status
                .code()
                .map(|c| c.to_string())
                .unwrap_or("sig".into()),
            took.as_secs_f64()
        );
        match (verdict, req) {
            ("SUCCESS", _) => passed.push(name),
            ("SKIP", _) => skipped.push(name),
            (_, Some((what, s))) if !s.works() => {
                println!("    excused: needs {what}; host probe: {s}");
                excused.push(name)
            }
            _ => {
                println!("    --- stdout (tail) ---");
                for l in stdout
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                {
                    println!("    {l}");
                }
                println!("    --- stderr ---\n    {}", stderr.trim());
                failed.push(name)
            }
        }
    }
    println!(
        "XTF tally: {} passed, {} skipped, {} excused by the host probe, {} failed, of {} kernels in {:.1} s",
        passed.len(),
        skipped.len(),
        excused.len(),
        failed.len(),
        kernels.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(failed.is_empty(), "XTF kernels failed: {failed:?}");
}
