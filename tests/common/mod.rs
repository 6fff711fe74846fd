//! Helpers shared by the integration tests that boot guests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// True if tests that need /dev/kvm can run. Without /dev/kvm they are
/// skipped with a printed reason, unless REQUIRE_KVM=1 (CI), where they fail.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm is not usable and REQUIRE_KVM=1");
        }
        skip(
            test,
            "/dev/kvm is not usable (set REQUIRE_KVM=1 to make this a failure)",
        );
    }
    ok
}

/// Prints why `test` is skipped where the test runner shows it even for a
/// passing test (straight to stderr: libtest captures only `eprintln!`).
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// `../shared` next to the repository (or $XENKVM_SHARED).
pub fn shared_dir() -> PathBuf {
    std::env::var_os("XENKVM_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// The xenkvm binary under test: cargo's, or `$XENKVM_TEST_BIN` (to check
/// that a test fails on another build, e.g. an older commit's).
pub fn xenkvm_bin() -> PathBuf {
    std::env::var_os("XENKVM_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_xenkvm")))
}

/// The built-in test guest written to a file of its own (removed on drop),
/// for `xenkvm run --kernel`.
pub struct GuestFile(pub PathBuf);

impl GuestFile {
    pub fn new(tag: &str) -> GuestFile {
        let p = std::env::temp_dir().join(format!(
            "xenkvm-test-guest-{tag}-{}.elf",
            std::process::id()
        ));
        std::fs::write(&p, xenkvm::testing::TEST_GUEST_ELF).expect("cannot write the test guest");
        GuestFile(p)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8 here")
    }
}

impl Drop for GuestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the xenkvm binary; returns its output and wall time.
pub fn xenkvm(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new(xenkvm_bin())
        .args(args)
        .env("XENKVM_LOG", "warn")
        .output()
        .expect("cannot run the xenkvm binary");
    (out, t.elapsed())
}

/// Runs the xenkvm binary with `input` on its stdin (written after a short
/// delay, as a person would type it).
pub fn xenkvm_with_stdin(args: &[&str], input: &[u8]) -> (Output, Duration) {
    use std::io::Write;
    let t = Instant::now();
    let mut child = Command::new(xenkvm_bin())
        .args(args)
        .env("XENKVM_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run the xenkvm binary");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("xenkvm did not finish");
    let _ = writer.join();
    (out, t.elapsed())
}

/// The last `Test result: X` line of a guest's output.
pub fn test_result(stdout: &str) -> Option<String> {
    stdout.lines().rev().find_map(|l| {
        l.split_once("Test result: ")
            .map(|(_, r)| r.trim().to_string())
    })
}

/// A child's output collected by a reader thread as it arrives.
#[derive(Clone)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// Starts reading `r` (a child's stdout or stderr) until EOF.
    pub fn attach(mut r: impl std::io::Read + Send + 'static) -> Captured {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let b2 = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 65536];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b2.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Captured(buf)
    }

    /// Everything read so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A private $XDG_RUNTIME_DIR for one test, so tests neither see nor touch
/// real VMs (or each other's); removed on drop.
pub struct RuntimeDir(pub PathBuf);

impl RuntimeDir {
    pub fn new(tag: &str) -> RuntimeDir {
        let p = std::env::temp_dir().join(format!("xenkvm-rt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        RuntimeDir(p)
    }

    /// The xenkvm binary with `args` in this runtime directory (stdin
    /// empty unless the caller sets it).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(xenkvm_bin());
        c.args(args)
            .env("XDG_RUNTIME_DIR", &self.0)
            .env("XENKVM_LOG", "warn")
            .stdin(std::process::Stdio::null());
        c
    }

    /// Runs xenkvm with `args` here and returns its output.
    pub fn xenkvm(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run xenkvm")
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
