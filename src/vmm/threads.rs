//! The one way the VMM starts a thread: named, of a known kind (so a
//! seccomp filter can be chosen per kind later), with a panic turned into a
//! stop of the VM with a clear message instead of a silently dead thread.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;

/// The kinds of thread a VM has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    /// The event loop (backends, timers).
    EventLoop,
    /// The VMM's stdin fed to the guest's PV console.
    ConsoleInput,
    /// The guest's console output written to a pty (`--console pty`).
    ConsolePty,
    /// Signals, a closed stdout and the status line, across VM restarts.
    Supervisor,
    /// The host-scheduler monitor (`vcpu-sched`): vCPU threads' context switches.
    SchedMonitor,
    /// A blkback queue's I/O thread.
    BlkIo,
    /// A netback queue's I/O thread.
    NetIo,
    /// `xenkvm bench sched`'s CPU hog.
    BenchHog,
    /// The VM's control socket (`xenkvm pause NAME`...).
    Control,
}

/// Called with a message when a thread panics.
pub type OnPanic = Arc<dyn Fn(String) + Send + Sync>;

/// Starts `f` on a new thread called `name`.
pub fn spawn<F>(
    kind: ThreadKind,
    name: String,
    on_panic: OnPanic,
    f: F,
) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let n = name.clone();
    std::thread::Builder::new().name(name).spawn(move || {
        tracing::trace!(?kind, thread = %n, "thread started");
        if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(f)) {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            on_panic(format!("thread {n} panicked: {what}"));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[test]
    fn spawn_panicking_thread_reports_its_name_and_message() {
        let got = Arc::new(Mutex::new(None));
        let g2 = got.clone();
        let h = spawn(
            ThreadKind::EventLoop,
            "boom".into(),
            Arc::new(move |m| *g2.lock() = Some(m)),
            || panic!("kaput"),
        )
        .unwrap();
        h.join().unwrap();
        assert_eq!(got.lock().as_deref(), Some("thread boom panicked: kaput"));
    }
}
