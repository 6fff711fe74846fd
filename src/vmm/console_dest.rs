//! Where the guest's console (hvc0, the serial port) goes: stdout (the
//! default), a pseudo-terminal (`--console pty`, as `xl console` users
//! attach to one), or a file (`--console file:PATH`).
//!
//! A pty: xenkvm opens the master and keeps the slave open itself, in raw
//! mode, as xenconsoled does, so the guest runs on whether or not anyone
//! is attached and nothing hangs up when a reader detaches. Output waits in
//! a bounded buffer ([`PTY_BUFFER`], the oldest bytes dropped beyond it,
//! counted in the log) until the pty has room; a writer thread moves it, so
//! a guest never waits for a reader. What is typed on the pty is the
//! guest's console input (stdin is then not read).

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::devices::ConsoleOut;

/// `--console`: where the guest's console output goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ConsoleDest {
    #[default]
    Stdout,
    Pty,
    File(PathBuf),
}

impl ConsoleDest {
    /// `stdout`, `pty` or `file:PATH`.
    pub fn parse(s: &str) -> Result<ConsoleDest, String> {
        match s {
            "stdout" => Ok(ConsoleDest::Stdout),
            "pty" => Ok(ConsoleDest::Pty),
            _ => match s.strip_prefix("file:") {
                Some("") => Err("file: needs a path (file:PATH)".into()),
                Some(p) => Ok(ConsoleDest::File(PathBuf::from(p))),
                None => Err(format!("\"{s}\" is not stdout, pty or file:PATH")),
            },
        }
    }
}

/// Guest console output held for a pty with no room: at most this many
/// bytes (the newest).
pub const PTY_BUFFER: usize = 1 << 20;

/// The opened console: its output and, for a pty, the slave's path and the
/// master to read the guest's console input from.
pub struct OpenedConsole {
    pub out: Arc<ConsoleOut>,
    pub pty_path: Option<PathBuf>,
    pub input: Option<Arc<OwnedFd>>,
}

/// Opens `dest`.
pub fn open(dest: &ConsoleDest) -> Result<OpenedConsole, String> {
    match dest {
        ConsoleDest::Stdout => Ok(OpenedConsole {
            out: ConsoleOut::stdout(),
            pty_path: None,
            input: None,
        }),
        ConsoleDest::File(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("--console file:{}: {e}", p.display()))?;
            Ok(OpenedConsole {
                out: ConsoleOut::new(Box::new(f)),
                pty_path: None,
                input: None,
            })
        }
        ConsoleDest::Pty => open_pty().map_err(|e| format!("--console pty: {e}")),
    }
}

struct PtyShared {
    buf: Mutex<PtyBuf>,
    ready: Condvar,
}

#[derive(Default)]
struct PtyBuf {
    data: VecDeque<u8>,
    dropped: u64,
}

/// The ConsoleOut's writer for a pty: queues and wakes the writer thread.
struct PtyWriter(Arc<PtyShared>);

impl Write for PtyWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut q = self.0.buf.lock();
        q.data.extend(b);
        let over = q.data.len().saturating_sub(PTY_BUFFER);
        if over > 0 {
            q.data.drain(..over);
            q.dropped += over as u64;
        }
        drop(q);
        self.0.ready.notify_one();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn open_pty() -> Result<OpenedConsole, String> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .map_err(|e| format!("cannot open a pty: {e}"))?;
    grantpt(&master).map_err(|e| format!("grantpt: {e}"))?;
    unlockpt(&master).map_err(|e| format!("unlockpt: {e}"))?;
    let name = ptsname(&master, Vec::new()).map_err(|e| format!("ptsname: {e}"))?;
    let path = PathBuf::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name.as_bytes()),
    );
    let slave = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?
    };
    // Raw: no echo back into the output, no line editing, no CR/LF games.
    let mut t = rustix::termios::tcgetattr(&slave).map_err(|e| format!("tcgetattr: {e}"))?;
    t.make_raw();
    rustix::termios::tcsetattr(&slave, rustix::termios::OptionalActions::Now, &t)
        .map_err(|e| format!("tcsetattr: {e}"))?;
    rustix::io::ioctl_fionbio(&master, true).map_err(|e| format!("non-blocking pty: {e}"))?;
    let shared = Arc::new(PtyShared {
        buf: Mutex::new(PtyBuf::default()),
        ready: Condvar::new(),
    });
    let input = master
        .try_clone()
        .map_err(|e| format!("cannot duplicate the pty master: {e}"))?;
    let s = shared.clone();
    crate::vmm::threads::spawn(
        crate::vmm::threads::ThreadKind::ConsolePty,
        "console-pty".into(),
        Arc::new(
            |msg| tracing::error!(%msg, "the console pty writer died: no more console output"),
        ),
        move || pty_writer(&s, master, slave),
    )
    .map_err(|e| format!("cannot start the pty writer thread: {e}"))?;
    Ok(OpenedConsole {
        out: ConsoleOut::new(Box::new(PtyWriter(shared))),
        pty_path: Some(path),
        input: Some(Arc::new(input)),
    })
}

/// Moves queued output into the pty as it has room. `_slave` is held open
/// for the process's life (no hang-up when readers come and go).
fn pty_writer(s: &PtyShared, master: OwnedFd, _slave: std::fs::File) {
    let mut chunk = Vec::with_capacity(64 << 10);
    loop {
        {
            let mut q = s.buf.lock();
            while q.data.is_empty() {
                s.ready.wait(&mut q);
            }
            if q.dropped > 0 {
                tracing::warn!(
                    bytes = q.dropped,
                    "console pty: nobody read the guest's console; its oldest output was dropped"
                );
                q.dropped = 0;
            }
            let n = q.data.len().min(64 << 10);
            chunk.clear();
            chunk.extend(q.data.iter().take(n));
        }
        match rustix::io::write(&master, &chunk) {
            Ok(n) => {
                s.buf.lock().data.drain(..n);
            }
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {
                // Full: wait for room (a reader), looking again now and then.
                let mut fds = [rustix::event::PollFd::new(
                    &master,
                    rustix::event::PollFlags::OUT,
                )];
                let t = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 200_000_000,
                };
                let _ = rustix::event::poll(&mut fds, Some(&t));
            }
            Err(e) => {
                tracing::warn!(%e, "console pty: write failed; retrying in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_dest_parses_stdout_pty_and_file() {
        assert_eq!(ConsoleDest::parse("stdout"), Ok(ConsoleDest::Stdout));
        assert_eq!(ConsoleDest::parse("pty"), Ok(ConsoleDest::Pty));
        assert_eq!(
            ConsoleDest::parse("file:/tmp/x.log"),
            Ok(ConsoleDest::File("/tmp/x.log".into()))
        );
        assert!(ConsoleDest::parse("file:").is_err());
        assert!(ConsoleDest::parse("tty").unwrap_err().contains("\"tty\""));
    }

    #[test]
    fn console_pty_output_waits_for_a_late_reader() {
        let c = open(&ConsoleDest::Pty).expect("a pty");
        let path = c.pty_path.clone().unwrap();
        // Written before anyone is attached: kept.
        c.out.write(b"before attach\n");
        let mut r = std::fs::File::open(&path).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&got).contains("before attach\n") {
            let n = std::io::Read::read(&mut r, &mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            "before attach\n",
            "raw: no CR added"
        );
    }
}
