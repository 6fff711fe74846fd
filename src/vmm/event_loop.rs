//! The VMM's one event loop: an epoll set of eventfds (a backend was
//! notified by the guest), timerfds (Xen timers, watchdogs, the upcall
//! re-check) and the console's input, served by one thread (`xen-events`)
//! so that dom0-side work never runs on the vCPU that sent the event, and
//! an idle guest costs no wake-ups beyond its own timers.
//!
//! Written on `vmm_sys_util::epoll` (rust-vmm) rather than a general async
//! runtime: the loop has a dozen fixed sources and no futures.
//!
//! Lock order: `EventLoop::handlers` is held while a handler runs, so a
//! handler must not call [`EventLoop::add`].

use std::os::fd::{AsRawFd, RawFd};

use parking_lot::Mutex;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What a handler tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep the source.
    Keep,
    /// Remove the source (its fd is at end of file, say).
    Remove,
}

pub type Handler = Box<dyn FnMut() -> Next + Send>;

pub struct EventLoop {
    epoll: Epoll,
    handlers: Mutex<Vec<Option<(RawFd, Handler)>>>,
    stop: EventFd,
}

/// The token of the stop eventfd.
const STOP: u64 = u64::MAX;

impl EventLoop {
    pub fn new() -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        Ok(EventLoop {
            epoll,
            handlers: Mutex::new(Vec::new()),
            stop,
        })
    }

    /// Calls `h` on the loop thread whenever `fd` is readable (level-
    /// triggered: the handler must consume what made it readable).
    pub fn add(&self, fd: RawFd, h: Handler) -> std::io::Result<()> {
        let mut hs = self.handlers.lock();
        let token = hs.len() as u64;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
        hs.push(Some((fd, h)));
        Ok(())
    }

    /// Makes [`run`](Self::run) return.
    pub fn stop(&self) {
        let _ = self.stop.write(1);
    }

    /// Serves events until [`stop`](Self::stop).
    pub fn run(&self) {
        let span = tracing::info_span!("event_loop");
        let _e = span.enter();
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(%e, "epoll_wait failed: the event loop stops");
                    return;
                }
            };
            for ev in &events[..n] {
                if ev.data() == STOP {
                    return;
                }
                let mut hs = self.handlers.lock();
                let Some(slot) = hs.get_mut(ev.data() as usize) else {
                    continue;
                };
                let remove = match slot {
                    Some((_, h)) => h() == Next::Remove,
                    None => false,
                };
                if remove {
                    if let Some((fd, _)) = slot.take() {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            fd,
                            EpollEvent::new(EventSet::IN, 0),
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn event_loop_eventfd_write_runs_handler_on_loop_thread() {
        let l = Arc::new(EventLoop::new().unwrap());
        let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (f2, s2) = (fd.clone(), seen.clone());
        l.add(
            fd.as_raw_fd(),
            Box::new(move || {
                let _ = f2.read();
                s2.lock()
                    .push(std::thread::current().name().map(str::to_owned));
                Next::Keep
            }),
        )
        .unwrap();
        let l2 = l.clone();
        let t = std::thread::Builder::new()
            .name("loop-test".into())
            .spawn(move || l2.run())
            .unwrap();
        fd.write(1).unwrap();
        while seen.lock().is_empty() {
            std::thread::yield_now();
        }
        l.stop();
        t.join().unwrap();
        assert_eq!(seen.lock()[0].as_deref(), Some("loop-test"));
    }

    #[test]
    fn event_loop_handler_returning_remove_is_not_called_again() {
        let l = Arc::new(EventLoop::new().unwrap());
        let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let calls = Arc::new(AtomicU32::new(0));
        let c2 = calls.clone();
        // Never reads the eventfd: level-triggered, it would fire forever.
        l.add(
            fd.as_raw_fd(),
            Box::new(move || {
                c2.fetch_add(1, Ordering::SeqCst);
                Next::Remove
            }),
        )
        .unwrap();
        fd.write(1).unwrap();
        let l2 = l.clone();
        let t = std::thread::spawn(move || l2.run());
        while calls.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        l.stop();
        t.join().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
