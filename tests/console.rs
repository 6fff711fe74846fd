//! `xenkvm console NAME` (as `xl console`) against the built-in test guest
//! (needs /dev/kvm; skipped with a reason without it, fails with
//! REQUIRE_KVM=1; the unknown-name case runs anywhere).

mod common;

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Captured, RuntimeDir};

impl RuntimeDir {
    /// `xenkvm run` of the test guest with `cmdline`, as VM `name`.
    fn run_guest(&self, guest: &common::GuestFile, name: &str, cmdline: &str) -> Vm {
        let mut child = self
            .command(&[
                "run",
                "--xen-console",
                "console",
                "--kernel",
                guest.path(),
                "--cmdline",
                cmdline,
                "--console-input",
                "none",
                "--vcpus",
                "2",
                "--memory",
                "64",
                "--name",
                name,
                "--timeout",
                "180",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run xenkvm");
        let out = Captured::attach(child.stdout.take().unwrap());
        let err = Captured::attach(child.stderr.take().unwrap());
        Vm { child, out, err }
    }

    /// `xenkvm console name` with piped stdin/stdout/stderr.
    fn console(&self, name: &str) -> Client {
        let mut child = self
            .command(&["console", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run xenkvm console");
        let stdin = child.stdin.take();
        let out = Captured::attach(child.stdout.take().unwrap());
        let err = Captured::attach(child.stderr.take().unwrap());
        Client {
            child,
            stdin,
            out,
            err,
        }
    }

    fn list_row(&self, name: &str) -> Option<String> {
        let out = self.xenkvm(&["list"]);
        assert!(out.status.success(), "list: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(str::to_string)
    }
}

/// A running `xenkvm run`, killed if the test leaves it running.
struct Vm {
    child: Child,
    out: Captured,
    err: Captured,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Captured,
    err: Captured,
}

impl Client {
    fn type_bytes(&mut self, b: &[u8]) {
        let w = self.stdin.as_mut().expect("stdin open");
        w.write_all(b).unwrap();
        w.flush().unwrap();
    }

    /// Waits (up to 60 s) for the client to exit; its status code.
    fn wait(&mut self) -> Option<i32> {
        wait_code(&mut self.child, 60)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_code(c: &mut Child, secs: u64) -> Option<i32> {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code();
        }
        assert!(Instant::now() < until, "process did not exit in {secs} s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to 90 s) until `c` holds `what`.
fn wait_for(c: &Captured, what: &str, who: &str) {
    let until = Instant::now() + Duration::from_secs(90);
    while !c.text().contains(what) {
        assert!(
            Instant::now() < until,
            "no {what:?} from {who}: {}",
            c.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The highest `chatter N` in `text`.
fn last_chatter(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split("chatter ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn console_unknown_name_fails_with_one_line_naming_it() {
    let rt = RuntimeDir::new("unknown");
    let out = rt.xenkvm(&["console", "no-such-vm"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("xenkvm: no running VM no-such-vm") && err.lines().count() == 1,
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn console_attached_client_sees_output_destination_keeps_it_and_detach_leaves_guest_running() {
    let test =
        "console_attached_client_sees_output_destination_keeps_it_and_detach_leaves_guest_running";
    if !common::kvm_available(test) {
        return;
    }
    let rt = RuntimeDir::new("out");
    let guest = common::GuestFile::new("con-out");
    let vm = rt.run_guest(&guest, "con-out", "chatter");
    wait_for(&vm.out, "chatter 1\n", "the VM's stdout");

    let mut client = rt.console("con-out");
    // Output written after the attach reaches the client...
    let at_attach = last_chatter(&vm.out.text());
    let want = format!("chatter {}\n", at_attach + 200);
    wait_for(&client.out, &want, "the console client");
    // ...and still the --console destination (fan-out), in the same order.
    wait_for(&vm.out, &want, "the VM's stdout");
    // Nothing lost or repeated on the way (no line was dropped).
    let text = client.out.text();
    let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let nums: Vec<u64> = whole
        .lines()
        .filter_map(|l| l.split("chatter ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    assert!(nums.len() > 100, "{nums:?}");
    assert!(
        nums.windows(2).all(|w| w[1] == w[0] + 1),
        "the client's lines are not consecutive: {nums:?}"
    );

    // One client at a time: a second is refused, naming the first.
    let second = rt.xenkvm(&["console", "con-out"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains("already attached")
            && err.contains(&format!("pid {}", client.child.id()))
            && err.lines().count() == 1,
        "{err}"
    );

    // Ctrl-] detaches; the guest runs on.
    client.type_bytes(&[0x1d]);
    assert_eq!(client.wait(), Some(0), "{}", client.err.text());
    assert!(
        client
            .err
            .text()
            .contains("detached from the console of con-out"),
        "{}",
        client.err.text()
    );
    let row = rt.list_row("con-out").expect("list still shows the VM");
    assert!(row.contains("running"), "{row}");
    let after = last_chatter(&vm.out.text());
    wait_for(
        &vm.out,
        &format!("chatter {}\n", after + 100),
        "the VM's stdout after the detach",
    );

    // Attaching again works once the first is gone.
    let mut again = rt.console("con-out");
    let now = last_chatter(&vm.out.text());
    wait_for(
        &again.out,
        &format!("chatter {}\n", now + 50),
        "the second client",
    );
    // The VM ends: the client is told and exits 0.
    let out = rt.xenkvm(&["shutdown", "con-out"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(again.wait(), Some(0), "{}", again.err.text());
    assert!(
        again.err.text().contains("the VM ended"),
        "{}",
        again.err.text()
    );
    let mut vm = vm;
    assert_eq!(wait_code(&mut vm.child, 60), Some(0), "{}", vm.err.text());
}

#[test]
fn console_typed_input_reaches_the_guest() {
    if !common::kvm_available("console_typed_input_reaches_the_guest") {
        return;
    }
    let rt = RuntimeDir::new("in");
    let guest = common::GuestFile::new("con-in");
    // The demo's console_input check waits up to 120 s for a line on hvc0
    // (the VM itself reads no stdin: --console-input none).
    let mut vm = rt.run_guest(&guest, "con-in", "console_wait=120");
    // The control socket is up once the guest runs.
    wait_for(&vm.out, "booted:", "the VM's stdout");
    let mut client = rt.console("con-in");
    wait_for(
        &vm.out,
        "console_input: type a line for the guest",
        "the VM's stdout",
    );
    client.type_bytes(b"typed via xenkvm console\n");
    let want = "\"typed via xenkvm console\" + newline";
    wait_for(&client.out, want, "the console client");
    wait_for(&vm.out, want, "the VM's stdout");
    // The guest finishes its checks and stops (its timing checks may fail
    // on a loaded host: not this test's business); the client gets its
    // last line and ends with it.
    let code = wait_code(&mut vm.child, 120);
    assert!(
        matches!(code, Some(0) | Some(2)),
        "{code:?} {}",
        vm.err.text()
    );
    assert_eq!(client.wait(), Some(0), "{}", client.err.text());
    assert!(
        client.out.text().contains("Test result: "),
        "the client did not get the guest's last output: {}",
        client.out.text()
    );
    assert!(
        client.err.text().contains("the VM ended"),
        "{}",
        client.err.text()
    );
}

#[test]
fn console_on_a_terminal_is_raw_while_attached_and_restored_after_detach() {
    let test = "console_on_a_terminal_is_raw_while_attached_and_restored_after_detach";
    if !common::kvm_available(test) {
        return;
    }
    if Command::new("script").arg("--version").output().is_err() {
        common::skip(test, "no `script` (util-linux) to give it a terminal");
        return;
    }
    let rt = RuntimeDir::new("tty");
    let guest = common::GuestFile::new("con-tty");
    let vm = rt.run_guest(&guest, "con-tty", "idle");
    wait_for(&vm.out, "idle: halted", "the VM's stdout");
    // `script` gives the client a terminal; `stty -g` shows its settings
    // before and after.
    let cmd = format!(
        "stty -g; '{}' console con-tty; echo status=$?; stty -g",
        common::xenkvm_bin().display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("XDG_RUNTIME_DIR", &rt.0)
        .env("XENKVM_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script");
    let mut stdin = child.stdin.take().unwrap();
    let out = Captured::attach(child.stdout.take().unwrap());
    wait_for(&out, "attached to the console of con-tty", "the terminal");
    // Raw: Ctrl-C is a byte for the guest, not SIGINT for the client; then
    // Ctrl-] detaches.
    stdin.write_all(&[0x03]).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stdin.write_all(&[0x1d]).unwrap();
    stdin.flush().unwrap();
    assert_eq!(wait_code(&mut child, 60), Some(0), "{}", out.text());
    drop(stdin);
    let text = out.text();
    assert!(
        text.contains("detached from the console of con-tty") && text.contains("status=0"),
        "{text}"
    );
    let stty: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            l.split(':').count() > 10 && l.split(':').all(|f| u64::from_str_radix(f, 16).is_ok())
        })
        .collect();
    assert_eq!(stty.len(), 2, "{text}");
    assert_eq!(stty[0], stty[1], "the terminal was not restored");
    let row = rt.list_row("con-tty").expect("list still shows the VM");
    assert!(row.contains("running"), "{row}");
    let out = rt.xenkvm(&["shutdown", "con-tty"]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn console_client_that_stops_reading_never_holds_up_the_guest() {
    let test = "console_client_that_stops_reading_never_holds_up_the_guest";
    if !common::kvm_available(test) {
        return;
    }
    let rt = RuntimeDir::new("stall");
    let guest = common::GuestFile::new("con-stall");
    let vm = rt.run_guest(&guest, "con-stall", "chatter");
    wait_for(&vm.out, "chatter 1\n", "the VM's stdout");
    // A client whose stdout nobody reads: it stalls once the pipe is full.
    let mut child = rt
        .command(&["console", "con-stall"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run xenkvm console");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let err = Captured::attach(child.stderr.take().unwrap());
    // The guest writes on (about 650 KB: more than the client's pipe and
    // the VM's queue for it hold) and the destination gets all of it.
    let start = last_chatter(&vm.out.text());
    wait_for(
        &vm.out,
        &format!("chatter {}\n", start + 20000),
        "the VM's stdout while the client stalls",
    );
    // Read again, then detach.
    let out = Captured::attach(stdout);
    wait_for(&out, "chatter ", "the client");
    if vm.err.text().contains("console client did not keep up") {
        wait_for(&out, "bytes of console output dropped here", "the client");
    }
    stdin.write_all(&[0x1d]).unwrap();
    stdin.flush().unwrap();
    assert_eq!(wait_code(&mut child, 60), Some(0), "{}", err.text());
    let row = rt.list_row("con-stall").expect("list still shows the VM");
    assert!(row.contains("running"), "{row}");
    let out = rt.xenkvm(&["shutdown", "con-stall"]);
    assert!(out.status.success(), "{out:?}");
}
