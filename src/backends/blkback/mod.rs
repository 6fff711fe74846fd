//! The PV block backend (blkback): the dom0 side of Xen's blkif for the
//! VMM's guest, over raw image files and block devices.
//!
//! - [`config`]: a disk as configured (`--disk` in xl's syntax) and xl's
//!   device numbers.
//! - [`disk`]: the host file or device, or a qcow2 image ([`qcow2`],
//!   through the `imago` crate; copied through a bounce buffer).
//! - [`queue`]: one ring being served (copy once, check, map the granted
//!   segments, `preadv`/`pwritev` into guest RAM, unmap, respond, notify).
//! - [`xenbus`]: the xenstore nodes and the state machine.
//!
//! Each queue runs on its own I/O thread (started through the VMM's
//! spawner in [`BlkHost`]; never a vCPU thread), woken by an eventfd that
//! the VMM writes when the guest signals the queue's event channel.
//! [`BlkBackend`] holds a guest's devices and reacts to xenstore watch
//! events on the event loop.
//!
//! The host I/O of a raw disk: reads through io_uring, one submission per
//! batch (`gpc::FileRing`), writes `pwritev` on the queue's thread
//! (`XENKVM_BLK_URING=1` sends writes through io_uring too, `0` reads
//! through `preadv`; see [`queue::UringUse`]).
//!
//! With `persistent-grants` in the disk's spec the backend offers
//! `feature-persistent` and, when the frontend uses it, keeps its grants
//! mapped ([`persistent`]).
//!
//! Not done: zero-copy I/O for qcow2 disks.

#![forbid(unsafe_code)]

pub mod config;
pub mod disk;
pub mod persistent;
pub mod poll;
pub mod qcow2;
pub mod queue;
pub mod xenbus;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use gpc::MemoryMap;
use hypercalls::Domain;
use vmm_sys_util::eventfd::EventFd;

use crate::backends::xenstore::{WatchEvent, XenstoreServer};
pub use config::{BlkConfig, DiskFormat};
pub use disk::Disk;
pub use queue::{Queue, QueueParams, QueueStats, RingSetup, UringUse};
pub use xenbus::{backend_step, Step, VbdDevice, XenbusState};

/// Why a disk or a frontend cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    /// The frontend broke the protocol (the device is refused).
    #[error("bad frontend: {0}")]
    Frontend(String),
    #[error("event channel: {0}")]
    Evtchn(String),
    #[error("xenstore: {0}")]
    Xenstore(String),
    #[error("cannot start an I/O thread: {0}")]
    Thread(String),
}

/// Starts a named thread (the VMM's `threads::spawn`).
pub type SpawnFn =
    dyn Fn(String, Box<dyn FnOnce() + Send>) -> std::io::Result<JoinHandle<()>> + Send + Sync;
/// Routes guest signals on a dom0 port to a queue's eventfd (`None`: stop).
pub type RouteFn = dyn Fn(u32, Option<Arc<EventFd>>) + Send + Sync;

/// What the VMM gives the backend: a thread spawner and the routing of
/// event-channel notifications.
#[derive(Clone)]
pub struct BlkHost {
    pub spawn: Arc<SpawnFn>,
    pub route: Arc<RouteFn>,
}

/// A queue's I/O thread.
pub struct QueueThread {
    pub dom0_port: u32,
    pub kick: Arc<EventFd>,
    worker: crate::backends::worker::IoWorker,
}

impl QueueThread {
    /// Starts serving `q` on a thread called `name`.
    pub fn start(host: &BlkHost, name: String, q: Queue) -> Result<QueueThread, BlkError> {
        let dom0_port = q.dom0_port();
        let worker =
            crate::backends::worker::IoWorker::start(&*host.spawn, name, 0, move |k, s| {
                serve(q, k, s)
            })
            .map_err(|e| BlkError::Thread(e.to_string()))?;
        Ok(QueueThread {
            dom0_port,
            kick: worker.kick().clone(),
            worker,
        })
    }

    /// Stops the thread and waits for it (its queue gives the grants back).
    pub fn stop(self) {
        self.worker.stop();
    }
}

/// The longest an idle queue polls its ring before it sleeps (the window
/// adapts below it, see [`poll`]).
pub const POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// [`POLL`], or `XENKVM_BLK_POLL_US` microseconds (read once; 0 turns
/// polling off; for measuring the trade-off between a polling thread's CPU
/// and the frontend's notifications).
pub fn poll_time() -> std::time::Duration {
    static T: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("XENKVM_BLK_POLL_US")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map_or(POLL, std::time::Duration::from_micros)
    })
}

/// The body of a queue's I/O thread: serve, sleep on the kick eventfd,
/// until stopped. A frontend that breaks the ring is refused: logged, its
/// grants given back, and the thread waits for its stop.
pub fn serve(mut q: Queue, kick: &EventFd, stop: &AtomicBool) {
    let mut window = poll::PollWindow::new(poll_time());
    loop {
        if stop.load(Ordering::Acquire) {
            break;
        }
        // `req_event` stays unarmed while the ring is polled: a frontend
        // that refills meanwhile sends no notification (no hypercall and
        // eventfd write on its side, no spurious wake-up on ours).
        let r = q.process_polling().and_then(|more| {
            if more {
                return Ok(true);
            }
            // Poll the ring a little before sleeping (an adaptive window,
            // see `poll`): a frontend that refills at once then needs no
            // notification and the thread no wake-up.
            let w = window.get();
            if !w.is_zero() {
                let until = std::time::Instant::now() + w;
                while std::time::Instant::now() < until {
                    if q.has_requests() || stop.load(Ordering::Relaxed) {
                        window.hit();
                        return Ok(true);
                    }
                    std::hint::spin_loop();
                }
                window.miss();
            }
            // Let a frontend that shares this CPU run before sleeping: it
            // may be what the poll waited for (the spin only kept it off
            // the CPU), and then it refills the ring without a
            // notification and this thread goes on without a wake-up.
            // `sched_yield` returns at once when nothing else is runnable
            // here. Not a hit for the window (a spin would not have found
            // it) unless the thread was away long (see `PollWindow::yielded`).
            let away = std::time::Instant::now();
            std::thread::yield_now();
            if q.has_requests() {
                window.yielded(away.elapsed());
                return Ok(true);
            }
            // RING_FINAL_CHECK_FOR_REQUESTS before sleeping.
            q.arm()
        });
        match r {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::error!(queue = ?q, %e, "blkback: refusing the device (its I/O stops; the VMM goes on)");
                drop(q);
                while !stop.load(Ordering::Acquire) {
                    let _ = kick.read();
                }
                return;
            }
        }
        let slept = std::time::Instant::now();
        let _ = kick.read();
        window.slept(slept.elapsed());
    }
}

/// A guest's vbd devices.
pub struct BlkBackend {
    devices: Vec<VbdDevice>,
    host: BlkHost,
    domain: Arc<Domain>,
    map: MemoryMap,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("devices", &self.devices)
            .finish()
    }
}

impl BlkBackend {
    /// Opens every disk (errors name the disk) and publishes the devices
    /// of guest `domid` in `xs`.
    pub fn new(
        disks: &[BlkConfig],
        domid: u16,
        domain: Arc<Domain>,
        map: MemoryMap,
        host: BlkHost,
        xs: &mut XenstoreServer,
    ) -> Result<BlkBackend, String> {
        let mut devices: Vec<VbdDevice> = Vec::new();
        for c in disks {
            if let Some(d) = devices.iter().find(|d| d.cfg.devid == c.devid) {
                return Err(format!(
                    "disks {} and {} have the same device number {}",
                    d.cfg.vdev, c.vdev, c.devid
                ));
            }
            let disk = Disk::open(c).map_err(|e| format!("disk {}: {e}", c.vdev))?;
            let mut dev = VbdDevice::new(c.clone(), domid, Arc::new(disk));
            dev.publish(xs)
                .map_err(|e| format!("disk {}: xenstore: {e}", c.vdev))?;
            devices.push(dev);
        }
        Ok(BlkBackend {
            devices,
            host,
            domain,
            map,
        })
    }

    /// The devices.
    pub fn devices(&self) -> &[VbdDevice] {
        &self.devices
    }

    /// Handles the dom0-side watch events that are ours; returns those
    /// that are not.
    pub fn handle_events(
        &mut self,
        xs: &mut XenstoreServer,
        events: Vec<WatchEvent>,
    ) -> Vec<WatchEvent> {
        let mut rest = Vec::new();
        for ev in events {
            match self.devices.iter_mut().find(|d| d.token() == ev.token) {
                Some(d) => d.frontend_changed(xs, &self.host, &self.domain, &self.map),
                None => rest.push(ev),
            }
        }
        rest
    }
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        for d in &mut self.devices {
            d.disconnect(&self.host);
        }
    }
}
