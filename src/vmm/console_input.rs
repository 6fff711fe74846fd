//! The guest's console input: the VMM's stdin fed into the PV console ring
//! (hvc0 input), and the decision whether to read stdin at all.
//!
//! Rules (see README, "Command line"):
//! - `--console-input auto` (the default) reads stdin when it is a terminal,
//!   a pipe, a socket or a regular file, not when it is another device such
//!   as `/dev/null`.
//! - A terminal is read only while xenkvm is in its foreground process group:
//!   `xenkvm run ... &` is never stopped by SIGTTIN (the reader checks
//!   `tcgetpgrp` against `getpgrp` before each read, and blocks SIGTTIN in its
//!   thread so that a read that races with `bg` fails with EIO instead of
//!   stopping the process). After `fg` it reads again.
//! - The reader waits with `poll` on stdin and the VM's stop eventfd, so a
//!   reader of a guest that ended returns at once and does not swallow input
//!   meant for a restarted guest, and a reader in the foreground never wakes
//!   without input. Only while xenkvm is in the background does it look
//!   again every [`RECHECK`] for its return to the foreground.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::sync::Weak;
use std::time::Duration;

use crate::vmm::machine::Machine;

/// `--console-input`: where the guest's console input comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InputMode {
    /// Stdin when it is a terminal, pipe, socket or file.
    #[default]
    Auto,
    /// Always stdin, whatever it is.
    Stdin,
    /// No console input.
    None,
}

/// What the VMM's stdin is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StdinKind {
    Terminal,
    /// A pipe, socket or regular file: input given on purpose.
    PipeOrFile,
    /// Another device (`/dev/null`, ...), or stdin is closed.
    Other,
}

impl StdinKind {
    /// Looks at fd 0.
    pub fn of_stdin() -> StdinKind {
        use std::os::unix::fs::FileTypeExt;
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            return StdinKind::Terminal;
        }
        let Ok(fd) = stdin.as_fd().try_clone_to_owned() else {
            return StdinKind::Other;
        };
        match std::fs::File::from(fd).metadata() {
            Ok(m) => {
                let t = m.file_type();
                if t.is_fifo() || t.is_socket() || t.is_file() {
                    StdinKind::PipeOrFile
                } else {
                    StdinKind::Other
                }
            }
            Err(_) => StdinKind::Other,
        }
    }
}

/// Whether the guest's console reads the VMM's stdin.
pub fn reads_stdin(mode: InputMode, kind: StdinKind) -> bool {
    match mode {
        InputMode::Stdin => true,
        InputMode::None => false,
        InputMode::Auto => matches!(kind, StdinKind::Terminal | StdinKind::PipeOrFile),
    }
}

/// True if stdin is a terminal whose foreground process group is not ours
/// (xenkvm runs in the background): reading it would stop us with SIGTTIN.
pub fn in_background() -> bool {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return false;
    }
    match rustix::termios::tcgetpgrp(stdin.as_fd()) {
        Ok(fg) => fg != rustix::process::getpgrp(),
        // No controlling terminal (ENOTTY) or it went away: nothing to read.
        Err(_) => true,
    }
}

/// How often a waiting reader looks again (foreground, guest gone).
const RECHECK: Duration = Duration::from_millis(200);

/// Feeds stdin (or `from`, a `--console pty` master) to `machine`'s PV
/// console until EOF or until `stop` is readable (the VM ended). Runs on
/// its own thread (started by the VMM).
pub fn feed(machine: Weak<Machine>, stop: &impl AsFd, from: Option<&std::os::fd::OwnedFd>) {
    // A read from the background then fails with EIO instead of stopping
    // the whole process (Linux treats a blocked SIGTTIN as ignored).
    if let Err(e) = vmm_sys_util::signal::block_signal(libc::SIGTTIN) {
        tracing::debug!(%e, "cannot block SIGTTIN in the console input thread");
    }
    let mut buf = [0u8; 512];
    let stdin = std::io::stdin();
    let input = match from {
        Some(fd) => fd.as_fd(),
        None => stdin.as_fd(),
    };
    // Only our stdin terminal can put us in the background.
    let tty = from.is_none() && stdin.is_terminal();
    let recheck = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: RECHECK.as_nanos() as _,
    };
    loop {
        match machine.upgrade() {
            Some(m) if !m.stopping() => {}
            _ => return,
        }
        let background = tty && in_background();
        let mut fds = [
            rustix::event::PollFd::new(stop, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(&input, rustix::event::PollFlags::IN),
        ];
        // In the background only the stop fd is watched, with a timeout to
        // notice the return to the foreground.
        let (watched, timeout) = if background {
            (&mut fds[..1], Some(&recheck))
        } else {
            (&mut fds[..], None)
        };
        match rustix::event::poll(watched, timeout) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::debug!(%e, "poll on stdin failed: no more console input");
                return;
            }
        }
        if !fds[0].revents().is_empty() {
            return;
        }
        if background || fds[1].revents().is_empty() {
            continue;
        }
        // A reader whose guest is gone leaves the input to the next one.
        let Some(m) = machine.upgrade().filter(|m| !m.stopping()) else {
            return;
        };
        // The fd itself, not std's buffered Stdin: bytes left in a buffer
        // would not wake `poll`.
        let n = match rustix::io::read(input, &mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => continue,
            // EIO: a terminal read from the background (see above).
            Err(rustix::io::Errno::IO) => {
                std::thread::sleep(RECHECK);
                continue;
            }
            Err(e) => {
                tracing::debug!(%e, "reading stdin failed: no more console input");
                return;
            }
        };
        let mut off = 0;
        // The backend queues a bounded amount; wait for the guest to drain it.
        while off < n && !m.stopping() {
            off += m.xen.console_input(&buf[off..n]);
            if off < n {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stdin_auto_dev_null_is_not_read() {
        assert!(!reads_stdin(InputMode::Auto, StdinKind::Other));
    }

    #[test]
    fn reads_stdin_auto_terminal_and_pipe_are_read() {
        assert!(reads_stdin(InputMode::Auto, StdinKind::Terminal));
        assert!(reads_stdin(InputMode::Auto, StdinKind::PipeOrFile));
    }

    #[test]
    fn reads_stdin_none_never_reads() {
        for k in [StdinKind::Terminal, StdinKind::PipeOrFile, StdinKind::Other] {
            assert!(!reads_stdin(InputMode::None, k));
            assert!(reads_stdin(InputMode::Stdin, k));
        }
    }
}
