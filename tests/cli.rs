//! The command line as an operator meets it: signals, running in the
//! background of an interactive shell, a closed stdout, a rebooting guest,
//! the status line, bad values, `probe` without KVM. Each boots the built-in
//! test guest in one of its modes (`idle`: one line, then silent; `chatter`:
//! lines forever; `reboot`: asks for a reboot at once).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::GuestFile;

/// Safety net only: a broken build must fail, not hang the test run.
const GIVE_UP: Duration = Duration::from_secs(120);

/// Held by the tests that run the test guest's full check list on 3 vCPUs
/// (its IPI ping-pong checks have time limits): one at a time, so that they
/// do not starve each other of this host's 2 CPUs.
static FULL_CHECKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn full_checks() -> std::sync::MutexGuard<'static, ()> {
    FULL_CHECKS.lock().unwrap_or_else(|e| e.into_inner())
}

fn spawn(args: &[&str]) -> Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(common::xenkvm_bin());
    cmd.args(args)
        .env("XENKVM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // As started from an interactive shell: SIGINT and SIGTERM at their
    // defaults. A harness run in the background (`.ci/run &`) inherits
    // SIGINT ignored, and xenkvm rightly keeps an ignored SIGINT ignored
    // (run_in_background_of_interactive_shell_is_not_stopped).
    // SAFETY: signal(2) with SIG_DFL is async-signal-safe, as pre_exec
    // requires between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            Ok(())
        });
    }
    cmd.spawn().expect("cannot run the xenkvm binary")
}

/// Waits for the child (killing it after GIVE_UP) and returns its status
/// and stderr.
fn finish(mut child: Child) -> (ExitStatus, String) {
    let mut err = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let until = Instant::now() + GIVE_UP;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("xenkvm did not end within {GIVE_UP:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap_or_default())
}

/// Reads stdout lines until one contains `what`; returns the reader.
fn wait_for_line(child: &mut Child, what: &str) -> BufReader<std::process::ChildStdout> {
    let mut out = BufReader::new(child.stdout.take().expect("stdout piped"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("read stdout");
        assert!(n > 0, "xenkvm's stdout ended before a line with {what:?}");
        if line.contains(what) {
            return out;
        }
    }
}

fn signal_stops_guest(sig: &str, code: i32, name: &str) {
    let guest = GuestFile::new(&format!("sig{sig}"));
    let mut child = spawn(&[
        "run",
        // The test guest reports on Xen's console.
        "--xen-console",
        "console",
        "--kernel",
        guest.path(),
        "--cmdline",
        "idle",
        "--timeout",
        "60",
    ]);
    let _out = wait_for_line(&mut child, "idle: halted");
    let killed = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let (status, err) = finish(child);
    assert_eq!(
        status.code(),
        Some(code),
        "status {status:?}, stderr: {err}"
    );
    assert_eq!(
        err.trim(),
        format!("xenkvm: {name}: stopping the guest"),
        "one line on stderr"
    );
}

#[test]
fn run_sigint_prints_one_line_and_exits_130() {
    if !common::kvm_available("run_sigint_prints_one_line_and_exits_130") {
        return;
    }
    signal_stops_guest("INT", 130, "SIGINT");
}

#[test]
fn run_sigterm_prints_one_line_and_exits_143() {
    if !common::kvm_available("run_sigterm_prints_one_line_and_exits_143") {
        return;
    }
    signal_stops_guest("TERM", 143, "SIGTERM");
}

#[test]
fn run_stdout_closed_stops_guest_with_141() {
    if !common::kvm_available("run_stdout_closed_stops_guest_with_141") {
        return;
    }
    let guest = GuestFile::new("epipe");
    // The guest prints lines forever; only the timeout would end it.
    let mut child = spawn(&[
        "run",
        // The test guest reports on Xen's console.
        "--xen-console",
        "console",
        "--kernel",
        guest.path(),
        "--cmdline",
        "chatter",
        "--timeout",
        "60",
    ]);
    let out = wait_for_line(&mut child, "chatter 0");
    drop(out); // as `| head -1` does
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some(141), "status {status:?}, stderr: {err}");
    assert!(
        err.contains("xenkvm: stdout was closed (EPIPE"),
        "stderr: {err}"
    );
}

#[test]
fn run_in_background_of_interactive_shell_is_not_stopped() {
    if !common::kvm_available("run_in_background_of_interactive_shell_is_not_stopped") {
        return;
    }
    if Command::new("script").arg("--version").output().is_err() {
        common::skip(
            "run_in_background_of_interactive_shell_is_not_stopped",
            "no `script` (util-linux) to give it a terminal",
        );
        return;
    }
    let guest = GuestFile::new("bg");
    // `script` gives bash a pty as its controlling terminal; `set -m` puts
    // `&` jobs in their own process group, in the background, with the
    // terminal still on stdin (as in an interactive shell). A process that
    // reads the terminal from there is stopped by SIGTTIN (bash: status 149).
    let bin = common::xenkvm_bin();
    let script = std::env::temp_dir().join(format!("xenkvm-bg-{}.sh", std::process::id()));
    std::fs::write(
        &script,
        format!(
            "set -m\n'{}' run --kernel '{}' --xen-console console --cmdline idle --timeout 2 &\nwait $!\necho xenkvm-exit=$?\nkill -KILL %1 2>/dev/null\ntrue\n",
            bin.display(),
            guest.path()
        ),
    )
    .expect("write the script");
    let mut child = Command::new("script")
        .args(["-qec", &format!("bash {}", script.display()), "/dev/null"])
        .env("XENKVM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script");
    let mut out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let (status, err) = finish(child);
    let out = reader.join().unwrap_or_default();
    let _ = std::fs::remove_file(&script);
    assert!(status.success(), "script: {status:?} {err}");
    assert!(
        out.contains("xenkvm-exit=4"),
        "xenkvm in the background must run to its --timeout (4), not stop:\n{out}"
    );
    assert!(out.contains("idle: halted"), "{out}");
}

#[test]
fn run_rebooting_guest_restarts_until_restart_loop_limit() {
    if !common::kvm_available("run_rebooting_guest_restarts_until_restart_loop_limit") {
        return;
    }
    let guest = GuestFile::new("reboot");
    let child = spawn(&[
        "run",
        // The test guest reports on Xen's console.
        "--xen-console",
        "console",
        "--kernel",
        guest.path(),
        "--cmdline",
        "reboot",
        "--timeout",
        "100",
    ]);
    let mut child = child;
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let (status, err) = finish(child);
    let boots = stdout
        .matches("reboot mode: SCHEDOP_shutdown(reboot)")
        .count();
    let restarts = err
        .lines()
        .filter(|l| l.contains("restarting it (restart "))
        .count();
    assert_eq!(
        boots, 6,
        "the guest boots once and is restarted 5 times:\n{stdout}"
    );
    assert_eq!(restarts, 5, "one line per restart:\n{err}");
    assert!(err.contains("a restart loop, stopping"), "{err}");
    assert_eq!(status.code(), Some(3), "{err}");
}

#[test]
fn run_rebooting_guest_on_reboot_destroy_ends_with_3() {
    if !common::kvm_available("run_rebooting_guest_on_reboot_destroy_ends_with_3") {
        return;
    }
    let guest = GuestFile::new("destroy");
    // The test guest reports on Xen's console.
    let out = run_until_reboot(
        &guest,
        &["--xen-console", "console", "--timeout", "60"],
        &[("XENKVM_LOG", "warn")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout.matches("reboot mode").count(), 1, "{stdout}");
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("guest rebooted"), "{err}");
}

#[test]
fn run_silent_guest_shows_status_line() {
    if !common::kvm_available("run_silent_guest_shows_status_line") {
        return;
    }
    let guest = GuestFile::new("status");
    let (out, _) = common::xenkvm(&[
        "run",
        "--kernel",
        guest.path(),
        "--cmdline",
        "idle",
        "--status",
        "--status-after",
        "1",
        "--timeout",
        "4",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("xenkvm: guest silent "))
        .unwrap_or_else(|| panic!("no status line:\n{err}"));
    assert!(
        line.contains("/1 in guest") && line.contains("exits"),
        "{line}"
    );
    // --quiet: none.
    let (out, _) = common::xenkvm(&[
        "run",
        "--kernel",
        guest.path(),
        "--cmdline",
        "idle",
        "--quiet",
        "--status-after",
        "1",
        "--timeout",
        "3",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("guest silent"), "{err}");
}

/// `xenkvm run` of the test guest in `reboot` mode, ended at its first
/// reboot (`--on-reboot destroy`, exit status 3), with `extra` arguments
/// and `env` set (`XENKVM_SCHED` unset unless given).
fn run_until_reboot(guest: &GuestFile, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(common::xenkvm_bin());
    c.args([
        "run",
        "--kernel",
        guest.path(),
        "--cmdline",
        "reboot",
        "--on-reboot",
        "destroy",
    ])
    .args(extra)
    .env_remove("XENKVM_SCHED")
    .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("xenkvm")
}

#[test]
fn run_trace_log_shows_hypercalls_with_vcpu() {
    if !common::kvm_available("run_trace_log_shows_hypercalls_with_vcpu") {
        return;
    }
    let guest = GuestFile::new("trace");
    let out = run_until_reboot(&guest, &[], &[("XENKVM_LOG", "trace")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        // sched_op (29) is the guest's last hypercall: SHUTDOWN_reboot.
        err.contains("hypercall vcpu=0 call=Hypercall { nr: 29"),
        "no hypercall trace with the vCPU id"
    );
    assert!(
        !err.contains("goblin"),
        "the ELF parser's internals must stay out of xenkvm's trace"
    );
}

#[test]
fn run_unknown_log_level_is_refused() {
    let out = Command::new(common::xenkvm_bin())
        .args(["run", "--kernel", "/nonexistent"])
        .env("XENKVM_LOG", "verbose")
        .output()
        .expect("xenkvm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("xenkvm: XENKVM_LOG=verbose: unknown log level \"verbose\""),
        "{err}"
    );
}

#[test]
fn run_bad_timeout_values_fail_without_panic() {
    for bad in ["nan", "inf", "-1", "1e20", "0"] {
        for sub in [
            &["run", "--kernel", "/nonexistent", "--timeout", bad][..],
            &["demo", "--timeout", bad][..],
        ] {
            let (out, _) = common::xenkvm(sub);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{sub:?}: {err}");
            assert!(!err.contains("panicked"), "{sub:?}: {err}");
            assert!(err.contains("--timeout"), "{sub:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{sub:?}: {err}");
        }
    }
}

/// Runs `xenkvm probe`/`run` in a private mount namespace where /dev/kvm is
/// `/dev/null` (or absent). Needs root and unshare(1); skips otherwise.
fn without_kvm(what: &str, args: &str) -> Option<std::process::Output> {
    let bin = common::xenkvm_bin();
    let out = Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            &format!("{what} && exec '{}' {args}", bin.display()),
        ])
        .env("XENKVM_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("unshare failed")
        || err.contains("mount:")
        || err.contains("Operation not permitted")
    {
        common::skip(what, &format!("cannot make a mount namespace here: {err}"));
        return None;
    }
    Some(out)
}

#[test]
fn probe_without_dev_kvm_exits_1_with_one_line() {
    let Some(out) = without_kvm("mount -t tmpfs none /dev", "probe") else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot open /dev/kvm"), "{err}");
}

#[test]
fn probe_and_run_dev_kvm_not_kvm_say_so() {
    let Some(out) = without_kvm("mount --bind /dev/null /dev/kvm", "probe") else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/dev/kvm is not a KVM device"), "{err}");
    let guest = GuestFile::new("notkvm");
    let Some(out) = without_kvm(
        "mount --bind /dev/null /dev/kvm",
        &format!("run --kernel '{}'", guest.path()),
    ) else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/dev/kvm is not a KVM device"), "{err}");
}

#[test]
fn probe_names_linux_cmdline_options_when_needed() {
    if !common::kvm_available("probe_names_linux_cmdline_options_when_needed") {
        return;
    }
    let (out, _) = common::xenkvm(&["probe"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    let p = xenkvm::kvm::probe::HostProbe::run();
    let opts = p.linux_cmdline_options();
    if opts.is_empty() {
        assert!(!stdout.contains("Linux guests need"), "{stdout}");
    } else {
        assert!(
            stdout.contains(&format!(
                "Linux guests need on their command line here: {}",
                opts.join(" ")
            )),
            "{stdout}"
        );
    }
}

/// `xenkvm probe` names the default host schedule tracking, and the quick
/// loop behind it (10 ms at each start) classifies the host as the long
/// kernel-mode loop measurement (about a second here) does: `sampling`
/// where guest kernel code is emulated, `best` where it runs natively.
#[test]
fn probe_default_tracking_follows_the_kernel_loop_rate() {
    if !common::kvm_available("probe_default_tracking_follows_the_kernel_loop_rate") {
        return;
    }
    let (out, _) = common::xenkvm(&["probe"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("host schedule tracking"))
        .unwrap_or_else(|| panic!("no tracking line:\n{stdout}"));
    let rate = *xenkvm::kvm::probe::HostMeasures::run()
        .kernel_loop_rate
        .as_ref()
        .expect("kernel-mode loop rate");
    let emulated = rate < xenkvm::kvm::probe::EMULATED_BELOW;
    assert_eq!(
        line.contains("the default where guest kernel code is emulated"),
        emulated,
        "long loop {rate:.3e}/s: {line}"
    );
    assert_eq!(
        line.contains("run_delay sampled every 10 ms (the default"),
        emulated,
        "long loop {rate:.3e}/s: {line}"
    );
}

#[test]
fn demo_in_terminal_prompts_and_waits_for_typed_line() {
    if !common::kvm_available("demo_in_terminal_prompts_and_waits_for_typed_line") {
        return;
    }
    let _one_at_a_time = full_checks();
    if Command::new("script").arg("--version").output().is_err() {
        common::skip(
            "demo_in_terminal_prompts_and_waits_for_typed_line",
            "no `script` (util-linux) to give it a terminal",
        );
        return;
    }
    use std::io::Write;
    let bin = common::xenkvm_bin();
    let mut child = Command::new("script")
        .args(["-qec", &format!("'{}' demo", bin.display()), "/dev/null"])
        .env("XENKVM_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut out = wait_for_line(&mut child, "console_input: type a line for the guest");
    // Typed only after the prompt, as a person would.
    stdin.write_all(b"typed after the prompt\r").expect("type");
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    drop(stdin);
    let (status, err) = finish(child);
    assert!(status.success(), "{status:?} {err}\n{rest}");
    assert!(
        rest.contains("check console_input ... ok (read 23 bytes")
            && rest.contains("\"typed after the prompt\" + newline"),
        "{rest}"
    );
    assert!(rest.contains("Test result: SUCCESS"), "{rest}");
}

#[test]
fn run_initrd_too_big_says_which_memory_fits() {
    if !common::kvm_available("run_initrd_too_big_says_which_memory_fits") {
        return;
    }
    let guest = GuestFile::new("bigrd");
    let rd = std::env::temp_dir().join(format!("xenkvm-test-initrd-{}", std::process::id()));
    std::fs::write(&rd, vec![0u8; 20 << 20]).unwrap();
    let (out, _) = common::xenkvm(&[
        "run",
        "--kernel",
        guest.path(),
        "--initrd",
        rd.to_str().unwrap(),
        "--memory",
        "16",
    ]);
    let _ = std::fs::remove_file(&rd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let want = format!(
        "xenkvm: --initrd {} ({} bytes) does not fit in --memory 16 MiB; it fits with --memory 21",
        rd.display(),
        20 << 20
    );
    assert!(err.starts_with(&want), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn run_log_file_gets_the_logs_not_stderr() {
    if !common::kvm_available("run_log_file_gets_the_logs_not_stderr") {
        return;
    }
    let guest = GuestFile::new("logfile");
    let log = std::env::temp_dir().join(format!("xenkvm-test-log-{}", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let out = run_until_reboot(
        &guest,
        &["--log-level", "info", "--log-file", log.to_str().unwrap()],
        &[],
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(text.contains("PVH kernel loaded"), "log file: {text}");
    assert!(!text.contains("\x1b["), "no colours in a file");
    assert!(!err.contains("PVH kernel loaded"), "stderr: {err}");
}

/// An xl.cfg in a temporary directory (removed on drop).
struct CfgFile(std::path::PathBuf);

impl CfgFile {
    fn new(tag: &str, text: &str) -> CfgFile {
        let p = std::env::temp_dir().join(format!("xenkvm-{tag}-{}.cfg", std::process::id()));
        std::fs::write(&p, text).expect("write the cfg");
        CfgFile(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for CfgFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn create_cfg_with_vifs_makes_their_taps_and_boots() {
    if !common::kvm_available("create_cfg_with_vifs_makes_their_taps_and_boots") {
        return;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .is_err()
    {
        common::skip(
            "create_cfg_with_vifs_makes_their_taps_and_boots",
            "no /dev/net/tun",
        );
        return;
    }
    let guest = GuestFile::new("create-vif");
    let tap = format!("xkcf{}", std::process::id() % 100_000);
    let cfg = CfgFile::new(
        "create-vif",
        &format!(
            "name = \"xl-vif\"\ntype = \"pvh\"\nmemory = 64\n\
             kernel = \"{}\"\ncmdline = \"reboot\"\non_reboot = 'destroy'\n\
             vif = [ 'mac=00:16:3e:00:00:01,vifname={tap}', '' ]\n",
            guest.path()
        ),
    );
    let out = Command::new(common::xenkvm_bin())
        .args(["create", cfg.path()])
        .env("XENKVM_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("xenkvm");
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("not permitted") {
        common::skip(
            "create_cfg_with_vifs_makes_their_taps_and_boots",
            "no permission to create TAP devices",
        );
        return;
    }
    assert_eq!(out.status.code(), Some(3), "{err}");
    let ready: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("vif TAP ready"))
        .collect();
    assert_eq!(ready.len(), 2, "{err}");
    assert!(
        ready[0].contains(&format!("tap=\"{tap}\"")) && ready[0].contains("00:16:3e:00:00:01"),
        "{err}"
    );
    // The second vif: xl's default name and a generated 00:16:3e MAC.
    assert!(
        ready[1].contains("tap=\"vif1.1\"") && ready[1].contains("mac=00:16:3e:"),
        "{err}"
    );
}

#[test]
fn create_example_cfg_boots_test_guest_to_poweroff() {
    if !common::kvm_available("create_example_cfg_boots_test_guest_to_poweroff") {
        return;
    }
    let _one_at_a_time = full_checks();
    let guest = GuestFile::new("create");
    let cfg = CfgFile::new(
        "create",
        &format!(
            "# the built-in test guest, as xl users write a config\n\
             name = \"xl-test\"\ntype = \"pvh\"\nmemory = 64\nvcpus = 3\n\
             kernel = \"{}\"\ncmdline = \"demo\"\n\
             on_poweroff = \"destroy\"\non_reboot = 'restart'\non_crash = 'destroy'\n\
             acpi = 1\n",
            guest.path()
        ),
    );
    let (out, _) = common::xenkvm(&[
        "create",
        cfg.path(),
        "-c",
        "--xen-console",
        "console",
        "--timeout",
        "60",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}\n{stdout}");
    assert!(stdout.contains("cmdline \"demo\""), "{stdout}");
    assert!(
        stdout.contains("xenkvm-guest: check smp ... ok"),
        "vcpus = 3 reached the guest: {stdout}"
    );
    assert_eq!(common::test_result(&stdout).as_deref(), Some("SUCCESS"));
    // The key xenkvm does not use is named in one warning.
    let warned: Vec<_> = err
        .lines()
        .filter(|l| l.contains("ignoring keys"))
        .collect();
    assert_eq!(warned.len(), 1, "{err}");
    assert!(warned[0].contains("acpi (line 11)"), "{err}");
}

#[test]
fn create_overrides_apply_after_the_file() {
    if !common::kvm_available("create_overrides_apply_after_the_file") {
        return;
    }
    let guest = GuestFile::new("override");
    let cfg = CfgFile::new(
        "override",
        &format!(
            "memory = 64\nkernel = \"{}\"\ncmdline = \"demo\"\n",
            guest.path()
        ),
    );
    // xl's KEY=VALUE overrides: a rebooting guest, destroyed at its reboot.
    let (out, _) = common::xenkvm(&[
        "create",
        cfg.path(),
        "cmdline=\"reboot\"",
        "on_reboot='destroy'",
        "--xen-console",
        "console",
        "--timeout",
        "60",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(stdout.matches("reboot mode").count(), 1, "{stdout}");
}

#[test]
fn create_bad_cfg_names_file_line_and_key() {
    let guest = GuestFile::new("badcfg");
    for (text, line_key) in [
        (
            "name = 'x'\nmemory = 64\nviridian = 1\n",
            ":3: viridian: not supported by xenkvm",
        ),
        ("pci = [ '01:00.0' ]\n", ":1: pci: not supported by xenkvm"),
        ("vnc = 1\n", ":1: vnc: not supported by xenkvm"),
        (
            "device_model_version = 'qemu-xen'\n",
            ":1: device_model_version: not supported",
        ),
        (
            "\non_crash = 'preserve'\n",
            ":2: on_crash: \"preserve\" is not offered by xenkvm",
        ),
        (
            "disk = [ '/x.img,vhd,xvda' ]\n",
            ":1: disk: disk \"/x.img,vhd,xvda\": format=vhd:",
        ),
        (
            "vif = [ 'mac=00:16:3e' ]\n",
            ":1: vif: vif \"mac=00:16:3e\": mac=00:16:3e: not a MAC",
        ),
        (
            "memory = 512\nkernel = /boot/vmlinuz\n",
            ":2: syntax error at \"/boot/vmlinuz\"",
        ),
    ] {
        let cfg = CfgFile::new("badcfg", &format!("kernel = \"{}\"\n{text}", guest.path()));
        let (out, _) = common::xenkvm(&["create", cfg.path()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        // The line numbers count the kernel line written first.
        let (n, rest) = line_key[1..].split_once(':').unwrap();
        let want = format!(
            "xenkvm: {}:{}:{rest}",
            cfg.path(),
            n.parse::<usize>().unwrap() + 1
        );
        assert!(err.starts_with(&want), "{text}: want {want:?}\ngot {err}");
    }
    let cfg = CfgFile::new("nokernel", "memory = 64\n");
    let (out, _) = common::xenkvm(&["create", cfg.path()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(": kernel: missing"), "{err}");
    let (out, _) = common::xenkvm(&["create", "/nonexistent/guest.cfg"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("xenkvm: /nonexistent/guest.cfg:0: cannot read: "),
        "{err}"
    );
}

#[test]
fn run_disk_without_its_image_and_net_without_its_bridge_are_refused() {
    let guest = GuestFile::new("nobackend");
    let (out, _) = common::xenkvm(&[
        "run",
        "--kernel",
        guest.path(),
        "--disk",
        "/nonexistent/g.img,raw,xvda,rw",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.trim().ends_with(
            "disk xvda: cannot open /nonexistent/g.img: No such file or directory (os error 2)"
        ) && err.lines().count() == 1,
        "{err}"
    );
    // The TAP is created after KVM's VM: needs /dev/kvm (and root).
    if common::kvm_available("run_disk_without_its_image_and_net_without_its_bridge_are_refused") {
        let br = format!("xknobr{}", std::process::id() % 100_000);
        let (out, _) = common::xenkvm(&[
            "run",
            "--kernel",
            guest.path(),
            "--net",
            &format!("bridge={br},vifname=xknov{}", std::process::id() % 100_000),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let line = err.trim().lines().last().unwrap_or("");
        assert!(
            line.starts_with("xenkvm: vif 0: TAP xknov")
                && (line.contains(&format!("cannot join bridge {br}"))
                    || line.contains("not permitted")),
            "{err}"
        );
    }
    // Bad specs are usage errors naming the spec and the key.
    let (out, _) = common::xenkvm(&[
        "run",
        "--kernel",
        guest.path(),
        "--disk",
        "vdev=xvdA,target=/x",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("disk \"vdev=xvdA,target=/x\": vdev=xvdA: not a virtual device"),
        "{err}"
    );
    let (out, _) = common::xenkvm(&[
        "run",
        "--kernel",
        guest.path(),
        "--net",
        "mac=01:00:00:00:00:01",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mac=01:00:00:00:00:01: a multicast address"),
        "{err}"
    );
}

#[test]
fn run_xen_console_goes_to_the_log_not_stdout() {
    if !common::kvm_available("run_xen_console_goes_to_the_log_not_stdout") {
        return;
    }
    let guest = GuestFile::new("xencons");
    let out = run_until_reboot(&guest, &["--log-level", "warn,xen_console=info"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    // The test guest writes only with console_io: none of it on stdout,
    // each line once in the log, with its source.
    assert!(!stdout.contains("reboot mode"), "stdout: {stdout}");
    let logged: Vec<_> = err
        .lines()
        .filter(|l| l.contains("xen_console: ") && l.contains("reboot mode"))
        .collect();
    assert_eq!(logged.len(), 1, "{err}");
    assert!(logged[0].contains("source=\"console_io\""), "{err}");
}

#[test]
fn run_console_pty_prints_its_path_and_keeps_output_for_a_late_reader() {
    if !common::kvm_available("run_console_pty_prints_its_path_and_keeps_output_for_a_late_reader")
    {
        return;
    }
    let guest = GuestFile::new("pty");
    let mut child = spawn(&[
        "run",
        "--kernel",
        guest.path(),
        "--cmdline",
        "idle",
        "--xen-console",
        "console",
        "--console",
        "pty",
        "--timeout",
        "60",
    ]);
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    err.read_line(&mut line).expect("stderr line");
    let path = line
        .trim()
        .strip_prefix("xenkvm: guest console on ")
        .unwrap_or_else(|| panic!("first stderr line: {line:?}"))
        .to_string();
    assert!(path.starts_with("/dev/pts/"), "{path}");
    // Attach only after the guest has printed (nobody was reading).
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the guest runs on unattached"
    );
    let mut pty = std::fs::File::open(&path).expect("open the pty");
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&seen).contains("idle: halted") {
        let n = pty.read(&mut buf).expect("read the pty");
        assert!(n > 0, "pty ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.contains("xenkvm-guest: booted"), "{seen}");
    // Nothing of the guest's console on stdout.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert!(stdout.is_empty(), "stdout: {stdout}");
}

#[test]
fn run_console_file_gets_the_guest_console() {
    if !common::kvm_available("run_console_file_gets_the_guest_console") {
        return;
    }
    let guest = GuestFile::new("consfile");
    let file = std::env::temp_dir().join(format!("xenkvm-console-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let console = format!("file:{}", file.display());
    let out = run_until_reboot(
        &guest,
        &["--xen-console", "console", "--console", &console],
        &[("XENKVM_LOG", "warn")],
    );
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(text.matches("reboot mode").count(), 1, "{text}");
}

#[test]
fn run_console_pty_input_reaches_the_guest() {
    if !common::kvm_available("run_console_pty_input_reaches_the_guest") {
        return;
    }
    let _one_at_a_time = full_checks();
    use std::io::Write;
    let guest = GuestFile::new("ptyin");
    let mut child = spawn(&[
        "run",
        "--kernel",
        guest.path(),
        "--cmdline",
        "demo console_wait=30",
        "--vcpus",
        "3",
        "--memory",
        "64",
        "--xen-console",
        "console",
        "--console",
        "pty",
        "--timeout",
        "90",
    ]);
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    err.read_line(&mut line).expect("stderr line");
    let path = line
        .trim()
        .strip_prefix("xenkvm: guest console on ")
        .unwrap_or_else(|| panic!("first stderr line: {line:?}"))
        .to_string();
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open the pty");
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    let mut typed = false;
    while !String::from_utf8_lossy(&seen).contains("Test result: ") {
        let n = pty.read(&mut buf).expect("read the pty");
        assert!(n > 0, "pty ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        if !typed && String::from_utf8_lossy(&seen).contains("console_input: type a line") {
            pty.write_all(b"typed on the pty\n").expect("type");
            typed = true;
        }
    }
    let status = child.wait().expect("wait");
    let mut rest = String::new();
    let _ = err.read_to_string(&mut rest);
    let seen = String::from_utf8_lossy(&seen);
    assert!(status.success(), "{status:?} {rest}\n{seen}");
    assert!(
        seen.contains("\"typed on the pty\" + newline"),
        "the line typed on the pty reached the guest: {seen}"
    );
}

#[test]
fn run_with_a_disk_boots_as_without() {
    if !common::kvm_available("run_with_a_disk_boots_as_without") {
        return;
    }
    let guest = GuestFile::new("disk");
    let img = std::env::temp_dir().join(format!("xenkvm-cli-disk-{}.img", std::process::id()));
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let spec = format!("vdev=xvda,access=ro,target={}", img.display());
    let out = run_until_reboot(&guest, &["--disk", &spec], &[]);
    let _ = std::fs::remove_file(&img);
    assert_eq!(
        out.status.code(),
        Some(3),
        "the guest reboots as without a disk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_with_a_vif_on_a_bridge_restarts_as_without() {
    if !common::kvm_available("run_with_a_vif_on_a_bridge_restarts_as_without") {
        return;
    }
    let br = format!("xkbr{}", std::process::id() % 100_000);
    let made = Command::new("ip")
        .args(["link", "add", &br, "type", "bridge"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !made {
        common::skip(
            "run_with_a_vif_on_a_bridge_restarts_as_without",
            "cannot create a host bridge (needs root and iproute2)",
        );
        return;
    }
    let guest = GuestFile::new("vif");
    let out = Command::new(common::xenkvm_bin())
        .args([
            "run",
            "--kernel",
            guest.path(),
            "--cmdline",
            "reboot",
            "--net",
            &format!("bridge={br},vifname={br}v0"),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("xenkvm");
    let _ = Command::new("ip").args(["link", "del", &br]).output();
    // Restarted until the restart-loop limit: the vif (its TAP on the
    // bridge) is made again for every new VM.
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(
        err.lines()
            .filter(|l| l.contains("restarting it (restart "))
            .count(),
        5,
        "{err}"
    );
}

#[test]
fn run_sigterm_stops_the_guest_when_stdout_and_stderr_are_closed() {
    // The parent died (a killed test harness, `2>&-`): writing the "stopping"
    // line must not keep xenkvm from stopping the guest.
    let guest = GuestFile::new("sigterm-closed");
    let mut child = Command::new(common::xenkvm_bin())
        .args(["run", "--kernel", guest.path(), "--cmdline", "idle"])
        .args(["--vcpus", "2", "--timeout", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let it start, then close both pipes' read ends.
    std::thread::sleep(Duration::from_millis(500));
    drop(child.stdout.take());
    drop(child.stderr.take());
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Liveness, not timing: well before the guest's own 120 s limit.
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("xenkvm ignored SIGTERM with stdout and stderr closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(143), "{status:?}");
}

/// `--sched` picks the host schedule tracking and the log names it (`best`:
/// the best this host allows); without it (and without `XENKVM_SCHED`) the
/// VM gets the default: `sampling` on a host that emulates guest kernel
/// code (this project's), `best` elsewhere; an unknown name is refused in
/// one line that names the option.
#[test]
fn run_sched_option_picks_the_tracking() {
    let (out, _) = common::xenkvm(&["run", "--kernel", "/nonexistent", "--sched", "fastest"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--sched") && err.contains("fastest"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    if !common::kvm_available("run_sched_option_picks_the_tracking") {
        return;
    }
    let best = xenkvm::xen::sched::Mechanism::choose(Some("best"));
    let default = match xenkvm::kvm::probe::kernel_code_emulated() {
        Some(_) => "sampling",
        None => best.name(),
    };
    let guest = GuestFile::new("sched");
    for (extra, want) in [
        (None, default),
        (Some("best"), best.name()),
        (Some("sampling"), "sampling"),
    ] {
        let args = match extra {
            Some(m) => vec!["--sched", m],
            None => vec![],
        };
        let out = run_until_reboot(&guest, &args, &[("XENKVM_LOG", "info")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
        assert!(
            err.contains(&format!("host schedule tracking mechanism=\"{want}\"")),
            "{args:?}: expected {want} ({best}):\n{err}"
        );
    }
    // An unknown name in the environment: the default, and one warning
    // that names it (it is looked up several times per VM).
    let out = run_until_reboot(
        &guest,
        &[],
        &[("XENKVM_LOG", "info"), ("XENKVM_SCHED", "fastest")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!("host schedule tracking mechanism=\"{default}\"")),
        "{err}"
    );
    let warned: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("unknown schedule-tracking mechanism"))
        .collect();
    assert_eq!(warned.len(), 1, "{err}");
    assert!(warned[0].contains("fastest"), "{err}");
}
