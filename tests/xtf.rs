//! Boots every XTF test kernel in ../shared/guests/xtf (two at a time) and
//! requires `Test result: SUCCESS` (or SKIP, where the test itself says the
//! feature is absent). Prints one line per kernel (`name verdict seconds`)
//! and a tally; fails if any kernel fails.
//!
//! A kernel that does not pass is excused only by a check, never by its
//! name:
//! - the host probe shows this host's KVM cannot run what the run shows the
//!   kernel needed (legacy 32-bit paging: the kernel's XTF environment is
//!   `hvm32pae`/`hvm32pse` and the run ended in a triple fault; virtual-8086
//!   mode: xenkvm stopped the guest naming it);
//! - the kernel needs a feature xenkvm does not offer, which the run or the
//!   kernel itself names: `viridian` (xenkvm reports the guest's Hyper-V MSR
//!   access), Xen's forced-emulation prefix (the kernel's own `test_title`,
//!   read from its ELF symbols, says it tests for it);
//! - an in-kernel LAPIC behaviour a VMM cannot change, when the probe
//!   measures it on this host (ESR after an illegal vector, `xsa-462`);
//! - a known loop count in the limits table that the probe's measured
//!   kernel-mode loop rate cannot finish within the kernel's time limit.
//!
//! On a host without those limits the same kernels must pass.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use xenkvm::kvm::probe::{HostMeasures, HostProbe};

/// A kernel's wall-time limit and, where the XTF source fixes it, the
/// number of loop iterations it must run in kernel mode.
#[derive(Clone, Copy, Debug)]
struct Limit {
    secs: f64,
    kernel_loop_iterations: Option<u64>,
}

/// Per-kernel limits; the first entry is the default. Most kernels finish
/// in under a second here; `msr` walks MSR ranges (~2 s).
const LIMITS: &[(&str, Limit)] = &[
    (
        "",
        Limit {
            secs: 30.0,
            kernel_loop_iterations: None,
        },
    ),
    (
        // XTF tests/xsa-269/main.c: `for ( i = 0; i < GB(1); ++i ) barrier();`
        "test-hvm64-xsa-269",
        Limit {
            secs: 60.0,
            kernel_loop_iterations: Some(1 << 30),
        },
    ),
];

fn limit(name: &str) -> Limit {
    LIMITS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or(&LIMITS[0])
        .1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Skip,
    Fail,
}

struct Run {
    name: String,
    verdict: Verdict,
    result: Option<String>,
    exit: Option<i32>,
    secs: f64,
    stdout: String,
    stderr: String,
}

/// The kernel's own `test_title` string, read from its ELF symbol table.
fn test_title(path: &std::path::Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let elf = goblin::elf::Elf::parse(&bytes).ok()?;
    let sym = elf
        .syms
        .iter()
        .find(|s| elf.strtab.get_at(s.st_name) == Some("test_title"))?;
    let sh = elf.section_headers.iter().find(|sh| {
        sh.sh_type == goblin::elf::section_header::SHT_PROGBITS
            && (sh.sh_addr..sh.sh_addr + sh.sh_size).contains(&sym.st_value)
    })?;
    let off = (sym.st_value - sh.sh_addr + sh.sh_offset) as usize;
    let s = bytes.get(off..)?;
    let end = s.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&s[..end]).into_owned())
}

/// Why a kernel that did not pass is excused, from checks only.
fn excuse(run: &Run, path: &std::path::Path, p: &HostProbe, m: &HostMeasures) -> Option<String> {
    let env = run
        .name
        .strip_prefix("test-")
        .and_then(|r| r.split('-').next())
        .unwrap_or("");
    let triple_fault = run.exit == Some(3) && run.stderr.contains("triple fault");
    for (e, what, s) in [
        ("hvm32pae", "legacy 32-bit PAE paging", &p.legacy_pae_paging),
        ("hvm32pse", "legacy 32-bit PSE paging", &p.legacy_pse_paging),
    ] {
        if env == e && triple_fault && !s.works() {
            return Some(format!("needs {what}; host probe: {s}"));
        }
    }
    // The kernel died of the #GP its Viridian MSR access got (XTF prints
    // `Vec 13 #GP[0000]` for an unhandled exception), as on Xen without it.
    if run.stderr.contains("guest needs viridian")
        && run.exit == Some(2)
        && run.stdout.contains("#GP[0000]")
    {
        return Some(
            "needs viridian (Xen's Hyper-V enlightenments domain option), which xenkvm does not offer"
                .into(),
        );
    }
    if run.stderr.contains("needs virtual-8086 mode") && !p.vm86.works() {
        return Some(format!("needs virtual-8086 mode; host probe: {}", p.vm86));
    }
    if run.result.as_deref() == Some("FAILURE")
        && test_title(path).is_some_and(|t| t.to_lowercase().contains("forced emulation prefix"))
    {
        return Some(
            "tests for Xen's forced-emulation prefix (a debug-Xen option, `hvm_fep`), which xenkvm does not offer"
                .into(),
        );
    }
    let esr = &m.lapic_illegal_vector_esr;
    if run.result.as_deref() == Some("ERROR") && run.stdout.contains("ESR expected") && !esr.works()
    {
        return Some(format!("checks the LAPIC's ESR; host probe: {esr}"));
    }
    let lim = limit(&run.name);
    if let (Some(n), Some(4), Ok(rate)) =
        (lim.kernel_loop_iterations, run.exit, &m.kernel_loop_rate)
    {
        let need = n as f64 / rate;
        if need > lim.secs {
            return Some(format!(
                "runs {n} kernel-mode loop iterations; this host runs {rate:.3e}/s (probe), \
                 about {need:.0} s against a limit of {:.0} s",
                lim.secs
            ));
        }
    }
    None
}

/// vCPUs a kernel's XTF domain config asks for (XTF's per-test
/// `extra.cfg.in`: `vcpus=` lines); 1 otherwise.
const VCPUS: &[(&str, u32)] = &[("test-hvm32-xsa-472-3", 3)];

fn run_kernel(path: &std::path::Path) -> Run {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let secs = format!("{}", limit(&name).secs);
    let vcpus = VCPUS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(1, |(_, v)| *v)
        .to_string();
    let (out, took) = common::xenkvm(&[
        "run",
        "--kernel",
        path.to_str().unwrap(),
        "--memory",
        "128",
        "--vcpus",
        &vcpus,
        "--timeout",
        &secs,
        // One boot per kernel: a triple fault (a reboot to Xen) fails it.
        "--on-reboot",
        "destroy",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let result = common::test_result(&stdout);
    let verdict = match (result.as_deref(), out.status.success()) {
        (Some("SUCCESS"), true) => Verdict::Pass,
        (Some("SKIP"), true) => Verdict::Skip,
        _ => Verdict::Fail,
    };
    Run {
        name,
        verdict,
        result,
        exit: out.status.code(),
        secs: took.as_secs_f64(),
        stdout,
        stderr,
    }
}

#[test]
fn xtf_every_kernel_passes_or_is_excused_by_a_check() {
    if !common::kvm_available("xtf_every_kernel_passes_or_is_excused_by_a_check") {
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
    let measures = HostMeasures::get();
    print!("{probe}{measures}");
    let jobs = std::env::var("XTF_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(2)
        })
        .max(1);
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let runs = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..jobs {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(k) = kernels.get(i) else { break };
                let r = run_kernel(k);
                let why = (r.verdict == Verdict::Fail)
                    .then(|| excuse(&r, k, probe, measures))
                    .flatten();
                let v = match (r.verdict, &why) {
                    (Verdict::Pass, _) => "PASS",
                    (Verdict::Skip, _) => "SKIP",
                    (Verdict::Fail, Some(_)) => "EXCUSED",
                    (Verdict::Fail, None) => "FAIL",
                };
                println!("{:<40} {v:<8} {:>6.1}", r.name, r.secs);
                runs.lock().unwrap().push((r, why));
            });
        }
    });
    let mut runs = runs.into_inner().unwrap();
    runs.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let mut excused: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let (mut passed, mut skipped, mut failed) = (0, 0, Vec::new());
    for (r, why) in &runs {
        match (r.verdict, why) {
            (Verdict::Pass, _) => passed += 1,
            (Verdict::Skip, _) => skipped += 1,
            (Verdict::Fail, Some(w)) => excused.entry(w.clone()).or_default().push(r.name.clone()),
            (Verdict::Fail, None) => {
                println!(
                    "--- {} FAILED: result={} exit={:?}",
                    r.name,
                    r.result.as_deref().unwrap_or("none"),
                    r.exit
                );
                let tail: Vec<_> = r.stdout.lines().rev().take(12).collect();
                for l in tail.into_iter().rev() {
                    println!("    {l}");
                }
                for l in r.stderr.lines().rev().take(4) {
                    println!("    stderr: {l}");
                }
                failed.push(r.name.clone());
            }
        }
    }
    let nexcused: usize = excused.values().map(|v| v.len()).sum();
    println!(
        "XTF tally: {passed} passed, {skipped} skipped, {nexcused} excused, {} failed, of {} kernels in {:.1} s ({jobs} at a time)",
        failed.len(),
        runs.len(),
        start.elapsed().as_secs_f64()
    );
    for (why, names) in &excused {
        println!("  excused ({}): {why}", names.len());
        println!("    {}", names.join(" "));
    }
    assert!(failed.is_empty(), "XTF kernels failed: {failed:?}");
    // XTF prints each line on Xen's console and on its PV console: stdout
    // (the guest's console) must show it once.
    let doubled: Vec<_> = runs
        .iter()
        .filter(|(r, _)| r.stdout.matches("Test result: ").count() > 1)
        .map(|(r, _)| r.name.clone())
        .collect();
    assert!(
        doubled.is_empty(),
        "XTF kernels whose result line is on stdout more than once: {doubled:?}"
    );
}
