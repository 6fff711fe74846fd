//! Build script of the `xenkvm` package: builds the project's own test guest
//! (`tests/guest/`, freestanding C and GNU assembly) into
//! `$OUT_DIR/xenkvm-test-guest.elf`, which `src/test_guest.rs` embeds.
//!
//! The guest is compiled by the system C compiler rather than rustc because no
//! bare-metal Rust target is installed on the project's machines; gcc and ld are.
//! Set `XENKVM_GUEST_CC` to use another gcc-compatible compiler.
#![forbid(unsafe_code)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// Guest sources, relative to the package root; a change to any reruns this script.
const SOURCES: &[&str] = &["head.S", "guest.c"];
const OTHER_INPUTS: &[&str] = &["xen.h", "link.ld"];

fn main() {
    let root =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let dir = root.join("tests").join("guest");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("xenkvm-test-guest.elf");
    let cc = env::var("XENKVM_GUEST_CC").unwrap_or_else(|_| "gcc".to_owned());

    println!("cargo:rerun-if-env-changed=XENKVM_GUEST_CC");
    // tests/linux.rs: without XENKVM_LINUX=1 its tests are `ignored` with the
    // reason shown by the test runner, not a silent 0.00 s `ok`.
    println!("cargo:rustc-check-cfg=cfg(xenkvm_linux)");
    println!("cargo:rerun-if-env-changed=XENKVM_LINUX");
    if env::var("XENKVM_LINUX").as_deref() == Ok("1") {
        println!("cargo:rustc-cfg=xenkvm_linux");
    }
    for f in SOURCES.iter().chain(OTHER_INPUTS) {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }

    let mut cmd = Command::new(&cc);
    cmd.current_dir(&dir)
        .args([
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-fno-pic",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fcf-protection=none",
            "-fno-tree-loop-distribute-patterns", // no memset() calls inside memset()
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-O2",
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-Wl,-T,link.ld",
            "-Wl,--build-id=none",
            "-Wl,-z,max-page-size=4096",
            "-Wl,-z,noexecstack",
            "-o",
        ])
        .arg(&out)
        .args(SOURCES);
    run(cmd, &cc, &dir);
}

/// Runs the compiler; forwards its warnings to cargo and stops the build with a
/// clear message when it is missing or fails.
fn run(mut cmd: Command, cc: &str, dir: &Path) {
    let output = match cmd.output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "error: cannot run `{cc}` to build the xenkvm test guest in {}: {e}\n\
                 The test guest is freestanding C and assembly built by gcc and GNU ld: \
                 install them (Debian: `apt-get install gcc`) or set XENKVM_GUEST_CC.",
                dir.display()
            );
            exit(1);
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        eprintln!(
            "error: `{cc}` failed to build the xenkvm test guest ({}):\n{stderr}",
            output.status
        );
        exit(1);
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=test guest: {line}");
    }
}
