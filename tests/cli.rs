//! The command line as an operator meets it: signals, running in the
//! background of an interactive shell, a closed stdout, a rebooting guest,
//! the status line, bad values, `probe` without KVM. Each boots the built-in
//! test guest in one of its modes (`idle`: one line, then silent; `chatter`:
//! lines forever; `reboot`: asks for a reboot at once).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::GuestFile;

/// Safety net only: a broken build must fail, not hang the test run.
const GIVE_UP: Duration = Duration::from_secs(120);

fn spawn(args: &[&str]) -> Child {
    Command::new(common::xenkvm_bin())
        .args(args)
        .env("XENKVM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run the xenkvm binary")
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
            "set -m\n'{}' run --kernel '{}' --cmdline idle --timeout 2 &\nwait $!\necho xenkvm-exit=$?\nkill -KILL %1 2>/dev/null\ntrue\n",
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
    let (out, _) = common::xenkvm(&[
        "run",
        "--kernel",
        guest.path(),
        "--cmdline",
        "reboot",
        "--on-reboot",
        "destroy",
        "--timeout",
        "60",
    ]);
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

#[test]
fn run_trace_log_shows_hypercalls_with_vcpu() {
    if !common::kvm_available("run_trace_log_shows_hypercalls_with_vcpu") {
        return;
    }
    let guest = GuestFile::new("trace");
    let out = Command::new(common::xenkvm_bin())
        .args([
            "run",
            "--kernel",
            guest.path(),
            "--cmdline",
            "reboot",
            "--on-reboot",
            "destroy",
        ])
        .env("XENKVM_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .expect("xenkvm");
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

#[test]
fn demo_in_terminal_prompts_and_waits_for_typed_line() {
    if !common::kvm_available("demo_in_terminal_prompts_and_waits_for_typed_line") {
        return;
    }
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
        "xenkvm: --initrd {} ({} bytes) does not fit in --memory 16 MiB; it fits with --memory 22",
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
    let (out, _) = common::xenkvm(&[
        "run",
        "--kernel",
        guest.path(),
        "--cmdline",
        "reboot",
        "--on-reboot",
        "destroy",
        "--log-level",
        "info",
        "--log-file",
        log.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(text.contains("PVH kernel loaded"), "log file: {text}");
    assert!(!text.contains("\x1b["), "no colours in a file");
    assert!(!err.contains("PVH kernel loaded"), "stderr: {err}");
}

#[test]
fn run_disk_bad_spec_names_spec_and_key() {
    let out = Command::new(common::xenkvm_bin())
        .args([
            "run",
            "--kernel",
            "/nonexistent",
            "--disk",
            "vdev=xvda,cache=none,target=/tmp/x.img",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("xenkvm");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vdev=xvda,cache=none,target=/tmp/x.img")
            && err.contains("cache: unknown key"),
        "{err}"
    );
}

#[test]
fn run_disk_missing_image_named_and_good_disk_boots() {
    if !common::kvm_available("run_disk_missing_image_named_and_good_disk_boots") {
        return;
    }
    let guest = GuestFile::new("disk");
    let run = |disk: &str| {
        Command::new(common::xenkvm_bin())
            .args([
                "run",
                "--kernel",
                guest.path(),
                "--cmdline",
                "reboot",
                "--on-reboot",
                "destroy",
                "--disk",
                disk,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("xenkvm")
    };
    let out = run("vdev=xvdb,target=/nonexistent/disk.img");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("disk xvdb: cannot open /nonexistent/disk.img"),
        "{err}"
    );
    let img = std::env::temp_dir().join(format!("xenkvm-cli-disk-{}.img", std::process::id()));
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let out = run(&format!("vdev=xvda,access=ro,target={}", img.display()));
    let _ = std::fs::remove_file(&img);
    assert_eq!(
        out.status.code(),
        Some(3),
        "the guest reboots as without a disk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
