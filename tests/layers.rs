//! The layer rules of `src/` (see `src/lib.rs` and ARCHITECTURE.md),
//! checked over the sources:
//! - only `src/kvm/` uses `kvm_ioctls`;
//! - only `src/vmm/` starts threads (test code excepted);
//! - `src/backends/` never touches KVM (`kvm_ioctls`, `kvm_bindings`, `crate::kvm`);
//! - `src/devices/` never uses the KVM layer (`crate::kvm`, `kvm_ioctls`);
//! - `src/config/` (parsing of user configuration, used by both `vmm/` and
//!   `backends/`) never touches KVM;
//! - `src/backends/`, `src/arch/` and `src/config/` forbid `unsafe`.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The non-test code of a file: everything before its first `#[cfg(test)]`
/// (test modules sit at the end of a file here), and nothing of a file
/// that is itself a test module (`tests.rs`).
fn product_code(p: &Path) -> String {
    if p.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let s = std::fs::read_to_string(p).unwrap();
    match s.find("#[cfg(test)]") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Lines of code (comments stripped) that break a rule.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for f in files {
        let rel = f
            .strip_prefix(src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let layer = rel.split('/').next().unwrap_or("").to_string();
        let code = product_code(&f);
        for (n, line) in code.lines().enumerate() {
            let l = line.split("//").next().unwrap_or("");
            let mut broke =
                |rule: &str| bad.push(format!("src/{rel}:{}: {rule}: {}", n + 1, line.trim()));
            if l.contains("kvm_ioctls") && layer != "kvm" {
                broke("only src/kvm/ may use kvm_ioctls");
            }
            if (l.contains("thread::spawn")
                || l.contains("thread::Builder")
                || l.contains("thread::scope"))
                && layer != "vmm"
            {
                broke("only src/vmm/ may start threads");
            }
            if layer == "backends"
                && (l.contains("kvm_bindings")
                    || l.contains("crate::kvm")
                    || l.contains("kvm_ioctls"))
            {
                broke("src/backends/ may not touch KVM");
            }
            if layer == "config"
                && (l.contains("kvm_bindings")
                    || l.contains("crate::kvm")
                    || l.contains("kvm_ioctls"))
            {
                broke("src/config/ may not touch KVM");
            }
            if layer == "devices" && l.contains("crate::kvm") {
                broke("src/devices/ may not use the KVM layer");
            }
        }
    }
    for (m, what) in [
        ("backends/mod.rs", "backends"),
        ("arch/mod.rs", "arch"),
        ("config/mod.rs", "config"),
    ] {
        let s = std::fs::read_to_string(src.join(m)).unwrap();
        if !s.contains("#![forbid(unsafe_code)]") {
            bad.push(format!("src/{m}: {what} must forbid unsafe code"));
        }
    }
    bad
}

#[test]
fn layers_sources_follow_the_layer_rules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    assert!(bad.is_empty(), "layer rules broken:\n{}", bad.join("\n"));
}

#[test]
fn layers_checker_catches_kvm_ioctls_in_a_backend() {
    // A copy of src/ with one offending line must fail the check.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let tmp = std::env::temp_dir().join(format!("xenkvm-layers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for f in &files {
        let to = tmp.join(f.strip_prefix(&src).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(f, &to).unwrap();
    }
    let victim = tmp.join("backends/console.rs");
    let s = std::fs::read_to_string(&victim).unwrap();
    std::fs::write(&victim, format!("use kvm_ioctls::VmFd;\n{s}")).unwrap();
    let thread = tmp.join("devices/pci.rs");
    let s = std::fs::read_to_string(&thread).unwrap();
    std::fs::write(
        &thread,
        format!("fn f() {{ std::thread::spawn(|| ()); }}\n{s}"),
    )
    .unwrap();
    let bad = violations(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        bad.iter()
            .any(|b| b.starts_with("src/backends/console.rs:1: only src/kvm/")),
        "{bad:?}"
    );
    assert!(
        bad.iter()
            .any(|b| b.contains("src/backends/console.rs:1: src/backends/ may not touch KVM")),
        "{bad:?}"
    );
    assert!(
        bad.iter()
            .any(|b| b.starts_with("src/devices/pci.rs:") && b.contains("start threads")),
        "{bad:?}"
    );
}
