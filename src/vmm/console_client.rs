//! `xenkvm console NAME` (as `xl console`): attaches this terminal (or
//! stdin/stdout when they are not one) to a running VM's console through
//! its control socket (the VM's side is [`crate::vmm::console_attach`]).
//!
//! What the guest writes appears on stdout; what is typed goes to the
//! guest's hvc0. Ctrl-] (0x1d, as `xl console`) detaches and leaves the
//! guest running; it is recognised in piped input too. On a terminal,
//! stdin is put in raw mode (every key goes to the guest, Ctrl-C
//! included; output processing is left as it was, so a guest's bare `\n`
//! still starts a new line) and restored on every way out: detach, the VM
//! ending, an error, SIGTERM/SIGHUP/SIGINT. End of piped input does not
//! detach: the output keeps coming until the VM ends or Ctrl-] arrives.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use crate::vmm::control::{socket_path, ControlError};

/// The byte that detaches: Ctrl-] (GS), as `xl console`.
pub const DETACH: u8 = 0x1d;
/// Typed input held while the VM does not take it; beyond it input is
/// dropped (with one note on stderr).
const PENDING_MAX: usize = 1 << 20;

/// How the console session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Ctrl-]: the guest runs on.
    Detached,
    /// The VM closed the connection (it ended).
    VmClosed,
    /// Our stdout went away.
    StdoutClosed,
    /// A signal (its number) ended the client.
    Signal(i32),
}

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

/// The terminal's settings before raw mode, put back when dropped.
struct RawTerminal {
    saved: rustix::termios::Termios,
}

impl RawTerminal {
    /// Raw input on stdin if it is a terminal (`None` otherwise, or if it
    /// cannot be changed).
    fn enter() -> Option<RawTerminal> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = rustix::termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut t = saved.clone();
        t.make_raw();
        // Output as it was (a guest's "\n" still returns the carriage).
        t.output_modes = saved.output_modes;
        rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &t)
            .ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin().as_fd(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// Connects to VM `name` (a name or a socket path) and asks for its
/// console; the connection once the VM said `ok attached`.
pub fn connect(name: &str) -> Result<UnixStream, ControlError> {
    let path = socket_path(name);
    let not_running = |why: String| ControlError::NotRunning {
        name: name.to_string(),
        path: path.clone(),
        why,
    };
    let mut c = UnixStream::connect(&path).map_err(|e| not_running(e.to_string()))?;
    let io = |e: std::io::Error| not_running(e.to_string());
    c.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let wrote = c.write_all(b"console\n");
    // The reply line byte by byte: console output may follow at once.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 4096 {
        match c.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    if line.is_empty() {
        return Err(not_running(match wrote {
            Err(e) => e.to_string(),
            Ok(()) => "it closed the connection without a reply".into(),
        }));
    }
    let line = String::from_utf8_lossy(&line);
    if line.trim_end() == "ok attached" {
        c.set_read_timeout(None).map_err(io)?;
        Ok(c)
    } else {
        Err(ControlError::Refused {
            name: name.to_string(),
            why: line
                .strip_prefix("error ")
                .unwrap_or(&line)
                .trim_end()
                .to_string(),
        })
    }
}

/// `xenkvm console NAME`: runs until detached or the VM ends.
pub fn run(name: &str) -> Result<Ended, ControlError> {
    let conn = connect(name)?;
    let raw = RawTerminal::enter();
    if raw.is_some() {
        for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
            if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_signal) {
                tracing::debug!(%e, sig, "cannot handle a signal in xenkvm console");
            }
        }
        let _ = write!(
            std::io::stderr(),
            "xenkvm: attached to the console of {name} (Ctrl-] detaches)\r\n"
        );
    }
    let ended = pump(&conn, &mut std::io::stdout().lock());
    drop(raw);
    Ok(ended)
}

/// Moves bytes between stdin/`out` and the connection until one side ends.
fn pump(conn: &UnixStream, out: &mut dyn Write) -> Ended {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use rustix::net::{send, SendFlags};
    let stdin = std::io::stdin();
    let stdin = stdin.as_fd();
    let mut stdin_open = true;
    let mut pending: Vec<u8> = Vec::new();
    let mut noted_drop = false;
    let mut buf = vec![0u8; 64 << 10];
    // Signals are looked at at least this often (a handler's flag).
    let tick = Timespec {
        tv_sec: 0,
        tv_nsec: 250_000_000,
    };
    loop {
        let sig = SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            return Ended::Signal(sig);
        }
        let mut conn_flags = PollFlags::IN;
        if !pending.is_empty() {
            conn_flags |= PollFlags::OUT;
        }
        let mut fds = [
            PollFd::new(conn, conn_flags),
            PollFd::new(&stdin, PollFlags::IN),
        ];
        let n = if stdin_open { 2 } else { 1 };
        match poll(&mut fds[..n], Some(&tick)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return Ended::VmClosed,
        }
        let (conn_ev, stdin_ev) = (fds[0].revents(), fds[1].revents());
        // The guest's output.
        if !conn_ev.is_empty() {
            match rustix::io::read(conn, &mut buf) {
                Ok(0) => return Ended::VmClosed,
                Ok(k) => {
                    if out.write_all(&buf[..k]).and_then(|()| out.flush()).is_err() {
                        return Ended::StdoutClosed;
                    }
                }
                Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
                Err(_) => return Ended::VmClosed,
            }
        }
        // What is typed.
        if n == 2 && !stdin_ev.is_empty() {
            match rustix::io::read(stdin, &mut buf) {
                Ok(0) => stdin_open = false,
                Ok(k) => {
                    let typed = &buf[..k];
                    let (typed, detach) = match typed.iter().position(|b| *b == DETACH) {
                        Some(i) => (&typed[..i], true),
                        None => (typed, false),
                    };
                    let room = PENDING_MAX.saturating_sub(pending.len());
                    if typed.len() > room && !noted_drop {
                        noted_drop = true;
                        let _ = write!(
                            std::io::stderr(),
                            "xenkvm: the guest does not take console input; input dropped\r\n"
                        );
                    }
                    pending.extend_from_slice(&typed[..typed.len().min(room)]);
                    if detach {
                        // What was typed before Ctrl-] still goes.
                        let mut c = conn;
                        let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
                        let _ = c.write_all(&pending);
                        return Ended::Detached;
                    }
                }
                Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
                // EIO: a terminal that went away; stop reading it.
                Err(_) => stdin_open = false,
            }
        }
        if !pending.is_empty() {
            match send(conn, &pending, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
                Ok(k) => {
                    pending.drain(..k);
                }
                Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
                Err(_) => return Ended::VmClosed,
            }
        }
    }
}
