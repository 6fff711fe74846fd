//! A backend queue's I/O thread, shared by blkback and netback: started
//! through the VMM's spawner (never a vCPU thread), woken through its kick
//! eventfd (event-channel notifications are routed there), stopped by a flag
//! and a last kick, and joined when dropped, so that a queue's grants are
//! given back before its device goes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::blkback::SpawnFn;

/// A running I/O thread.
pub struct IoWorker {
    kick: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl IoWorker {
    /// Starts `body(kick, stop)` on a thread called `name`; `eventfd_flags`
    /// for the kick eventfd (e.g. `EFD_NONBLOCK`). The body returns once
    /// `stop` is set (it is kicked then).
    pub fn start(
        spawn: &SpawnFn,
        name: String,
        eventfd_flags: i32,
        body: impl FnOnce(&EventFd, &AtomicBool) + Send + 'static,
    ) -> std::io::Result<IoWorker> {
        let kick = Arc::new(EventFd::new(eventfd_flags)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (k, s) = (kick.clone(), stop.clone());
        let join = spawn(name, Box::new(move || body(&k, &s)))?;
        Ok(IoWorker {
            kick,
            stop,
            join: Some(join),
        })
    }

    /// The eventfd that wakes the thread.
    pub fn kick(&self) -> &Arc<EventFd> {
        &self.kick
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.kick.write(1);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for IoWorker {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `stop` wakes a body that sleeps in its kick eventfd and joins it.
    #[test]
    fn io_worker_stop_wakes_and_joins_a_sleeping_body() {
        let spawn: Arc<SpawnFn> =
            Arc::new(|name, f| std::thread::Builder::new().name(name).spawn(f));
        let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let s2 = served.clone();
        let w = IoWorker::start(&*spawn, "io-test".into(), 0, move |kick, stop| loop {
            // Blocks until kicked (a blocking eventfd).
            let _ = kick.read();
            if stop.load(Ordering::Acquire) {
                break;
            }
            s2.fetch_add(1, Ordering::Release);
        })
        .unwrap();
        w.kick().write(1).unwrap();
        let t = std::time::Instant::now();
        while served.load(Ordering::Acquire) == 0 {
            assert!(
                t.elapsed().as_secs() < 10,
                "the kick never reached the body"
            );
            std::thread::yield_now();
        }
        // The body is (or soon is) asleep in read(): stop must wake and join it.
        w.stop();
        assert_eq!(served.load(Ordering::Acquire), 1);
    }
}
