//! Instruction coverage on this host: decodes the Debian kernel and the XTF
//! kernels, runs each distinct instruction form at CPL 0 in throwaway VMs
//! (what `xenkvm probe --coverage` prints), and checks that
//! - every form this host's KVM fails to emulate is on the checked-in list
//!   `tests/data/kvm-emulation-failures.txt` (so a new failure is noticed);
//! - xenkvm's fix-up handles each of them (the instance runs on, or gets the
//!   exception the CPU would raise), except the forms
//!   `x86_more::not_emulated_yet` names.

mod common;

use std::collections::BTreeSet;

use iced_x86::{Decoder, DecoderOptions};
use xenkvm::kvm::coverage::{parse_list_line, report, Outcome};

#[test]
fn coverage_host_failures_listed_and_handled_by_xenkvm() {
    if !common::kvm_available("coverage_host_failures_listed_and_handled_by_xenkvm") {
        return;
    }
    let shared = common::shared_dir().join("guests");
    let linux = shared.join("linux/vmlinuz");
    let xtf = shared.join("xtf");
    if !linux.exists() || !xtf.exists() {
        assert_ne!(
            std::env::var("REQUIRE_KVM").as_deref(),
            Ok("1"),
            "no guest kernels under {}",
            shared.display()
        );
        eprintln!("SKIPPED: no guest kernels under {}", shared.display());
        return;
    }
    let r = report(&[linux, xtf]).expect("coverage run");
    print!("{r}");
    assert!(r.groups.iter().all(|g| g.kernels > 0 && g.forms > 100));
    let listed: BTreeSet<(u32, String, bool)> = include_str!("data/kvm-emulation-failures.txt")
        .lines()
        .filter_map(parse_list_line)
        .map(|(b, c, m, _)| (b, c, m))
        .collect();
    let mut unhandled = Vec::new();
    for f in r.results.iter().filter(|f| f.outcome.host_failed()) {
        let key = (f.key.bits, format!("{:?}", f.key.code), f.key.mem);
        assert!(
            listed.contains(&key),
            "{}: this host's KVM fails on it and it is not on the list",
            f.key
        );
        let insn = Decoder::with_ip(f.key.bits, &f.bytes, 0, DecoderOptions::NONE).decode();
        if !f.outcome.xenkvm_handled() && !xenkvm::arch::x86::more::not_emulated_yet(&insn) {
            unhandled.push(format!("{}: {}", f.key, f.outcome));
        }
    }
    assert!(
        unhandled.is_empty(),
        "xenkvm does not handle:\n{}",
        unhandled.join("\n")
    );
    // The form that stopped Linux in its NMI entry.
    let lsl = r
        .results
        .iter()
        .find(|f| format!("{:?}", f.key.code).starts_with("Lsl_"))
        .expect("the Debian kernel has lsl");
    assert!(
        matches!(lsl.outcome, Outcome::Ok) || lsl.outcome.xenkvm_handled(),
        "{}: {}",
        lsl.key,
        lsl.outcome
    );
}
