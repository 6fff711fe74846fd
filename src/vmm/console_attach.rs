//! The server side of `xenkvm console NAME` (as `xl console`): a client on
//! the control socket attached to the guest's console.
//!
//! The client sends `console`; the VM answers `ok attached` (or `error
//! ...`) and the connection becomes a byte stream both ways:
//! - to the client: a copy of everything the guest's console writes (the
//!   PV console hvc0 and COM1, and Xen's console with `--xen-console
//!   console`: exactly what the `--console` destination gets, which keeps
//!   getting it: fan-out through [`ConsoleOut::set_tap`]);
//! - from the client: console input for hvc0, queued in the PV console
//!   backend as `--console-input` input is ([`crate::xen::Xen::console_input`]).
//!
//! At most one client is attached: a second is refused with one line
//! naming the attached client's pid (two terminals typing into one console
//! would interleave their keystrokes). The guest and the VMM never wait
//! for a client: output for it waits in a bounded queue ([`TAP_BUFFER`];
//! beyond it the oldest bytes are dropped, logged, and the client is told
//! in-band where), moved to the socket by a thread of the session's own.
//! The session ends when the client closes the connection (Ctrl-] in
//! `xenkvm console`) or the VM ends (what is queued is sent first, for at
//! most [`END_DRAIN`]); it lasts across guest restarts (`--on-reboot
//! restart`).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::devices::ConsoleOut;
use crate::vmm::machine::Machine;
use crate::vmm::threads::{self, ThreadKind};

/// Console output held for a client that does not keep up: at most this
/// many bytes (the newest).
pub const TAP_BUFFER: usize = 256 << 10;
/// When the VM ends, how long queued output may take to reach the client.
pub const END_DRAIN: Duration = Duration::from_secs(2);
/// A write to the client blocks at most this long before the session
/// looks whether it was abandoned.
const WRITE_SLICE: Duration = Duration::from_millis(500);

/// The current guest, if one runs (none while it is being restarted).
pub type CurrentMachine = Arc<dyn Fn() -> Option<Arc<Machine>> + Send + Sync>;

/// The one attached session of a VM, if any.
#[derive(Default)]
pub struct Slot(Mutex<Option<Arc<Session>>>);

/// What the client's writer takes from the queue.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Bytes dropped (the client did not keep up) just before `data`.
    pub dropped: u64,
    pub data: Vec<u8>,
}

/// Output waiting for the client: bounded, never blocks the writer side
/// (the guest's console) beyond its mutex.
pub struct TapQueue {
    state: Mutex<TapState>,
    ready: Condvar,
    limit: usize,
}

#[derive(Default)]
struct TapState {
    data: VecDeque<u8>,
    dropped: u64,
    /// No more output comes: send what is queued, then end.
    closing: bool,
    /// The session is over: drop everything.
    abandoned: bool,
}

impl TapQueue {
    /// A queue holding at most `limit` bytes.
    pub fn new(limit: usize) -> Arc<TapQueue> {
        Arc::new(TapQueue {
            state: Mutex::new(TapState::default()),
            ready: Condvar::new(),
            limit: limit.max(1),
        })
    }

    /// Queues `b`, dropping the oldest bytes beyond the limit.
    pub fn push(&self, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        let mut s = self.state.lock();
        if s.abandoned || s.closing {
            return;
        }
        let b = if b.len() > self.limit {
            s.dropped += (b.len() - self.limit) as u64;
            &b[b.len() - self.limit..]
        } else {
            b
        };
        let over = (s.data.len() + b.len()).saturating_sub(self.limit);
        if over > 0 {
            s.data.drain(..over);
            s.dropped += over as u64;
        }
        s.data.extend(b);
        drop(s);
        self.ready.notify_one();
    }

    /// Waits for output: up to `max` bytes (with the count dropped before
    /// them), or `None` once the queue is closed and empty, or abandoned.
    pub fn next(&self, max: usize) -> Option<Chunk> {
        let mut s = self.state.lock();
        loop {
            if s.abandoned {
                return None;
            }
            if !s.data.is_empty() || s.dropped > 0 {
                let n = s.data.len().min(max);
                let data: Vec<u8> = s.data.drain(..n).collect();
                let dropped = std::mem::take(&mut s.dropped);
                return Some(Chunk { dropped, data });
            }
            if s.closing {
                return None;
            }
            self.ready.wait(&mut s);
        }
    }

    /// No more output: [`next`](Self::next) returns what is queued, then `None`.
    pub fn close(&self) {
        self.state.lock().closing = true;
        self.ready.notify_all();
    }

    /// The session is over: nothing more is queued or returned.
    pub fn abandon(&self) {
        let mut s = self.state.lock();
        s.abandoned = true;
        s.data.clear();
        drop(s);
        self.ready.notify_all();
    }

    fn abandoned(&self) -> bool {
        self.state.lock().abandoned
    }
}

/// One attached client.
pub struct Session {
    queue: Arc<TapQueue>,
    /// To shut the connection down from any side.
    conn: UnixStream,
    /// The client's pid (from `SO_PEERCRED`).
    pid: u32,
    console: Arc<ConsoleOut>,
    /// The writer thread finished (all it could send is sent).
    writer_done: Mutex<bool>,
    writer_cv: Condvar,
    ended: AtomicBool,
}

impl Session {
    /// Ends the session once (any side): the guest's console stops feeding
    /// it, the client sees the connection close.
    fn teardown(&self, slot: &Slot, why: &str) {
        if self.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        self.console.set_tap(None);
        self.queue.abandon();
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        let mut cur = slot.0.lock();
        if cur.as_ref().is_some_and(|c| std::ptr::eq(&**c, self)) {
            *cur = None;
        }
        tracing::info!(pid = self.pid, why, "console client detached");
    }
}

/// The VM ends: queued output goes to the attached client (for at most
/// [`END_DRAIN`]), then its connection is closed.
pub fn end(slot: &Slot) {
    let Some(sess) = slot.0.lock().clone() else {
        return;
    };
    sess.console.set_tap(None);
    sess.queue.close();
    let until = Instant::now() + END_DRAIN;
    let mut done = sess.writer_done.lock();
    while !*done {
        if sess.writer_cv.wait_until(&mut done, until).timed_out() {
            tracing::warn!(
                pid = sess.pid,
                "console client: the last output did not reach it in time"
            );
            break;
        }
    }
    drop(done);
    sess.teardown(slot, "the VM ended");
}

/// Serves a `console` request on `conn` (its peer already checked to be
/// the VM's owner): refuses it, or attaches it and starts its two threads.
pub fn attach(
    mut conn: UnixStream,
    slot: &Arc<Slot>,
    current: CurrentMachine,
) -> std::io::Result<()> {
    let pid = rustix::net::sockopt::socket_peercred(&conn)
        .map(|c| c.pid.as_raw_nonzero().get() as u32)
        .unwrap_or(0);
    let Some(m) = current() else {
        return conn.write_all(b"error no guest is running (it is being restarted)\n");
    };
    let mut cur = slot.0.lock();
    if let Some(other) = cur.as_ref() {
        return conn.write_all(
            format!(
                "error its console is already attached (xenkvm console, pid {}); one client at a time: detach that one (Ctrl-]) first\n",
                other.pid
            )
            .as_bytes(),
        );
    }
    conn.set_read_timeout(None)?;
    conn.set_write_timeout(Some(WRITE_SLICE))?;
    let queue = TapQueue::new(TAP_BUFFER);
    let sess = Arc::new(Session {
        queue: queue.clone(),
        conn: conn.try_clone()?,
        pid,
        console: m.console.clone(),
        writer_done: Mutex::new(false),
        writer_cv: Condvar::new(),
        ended: AtomicBool::new(false),
    });
    let mut reader = conn.try_clone()?;
    // The reply before any output: the tap starts after it is written.
    conn.write_all(b"ok attached\n")?;
    let q = queue.clone();
    sess.console
        .set_tap(Some(Arc::new(move |b: &[u8]| q.push(b))));
    *cur = Some(sess.clone());
    drop(cur);
    drop(m);
    tracing::info!(pid, "console client attached");

    let on_panic = |what: &'static str| -> threads::OnPanic {
        Arc::new(move |msg| tracing::error!(%msg, "console client {what} died"))
    };
    let (s1, slot1) = (sess.clone(), slot.clone());
    let w = threads::spawn(
        ThreadKind::Control,
        "console-out".into(),
        on_panic("writer"),
        move || {
            let why = write_out(&s1, conn);
            *s1.writer_done.lock() = true;
            s1.writer_cv.notify_all();
            if let Some(why) = why {
                s1.teardown(&slot1, why);
            }
        },
    );
    if let Err(e) = w {
        sess.teardown(slot, "no writer thread");
        return Err(e);
    }
    let (s2, slot2) = (sess.clone(), slot.clone());
    let r = threads::spawn(
        ThreadKind::Control,
        "console-in".into(),
        on_panic("reader"),
        move || {
            let why = read_in(&s2, &mut reader, &*current);
            s2.teardown(&slot2, why);
        },
    );
    if let Err(e) = r {
        sess.teardown(slot, "no reader thread");
        return Err(e);
    }
    Ok(())
}

/// Moves queued output to the client until the queue ends; `Some(why)`
/// if the client went away.
fn write_out(s: &Session, mut conn: UnixStream) -> Option<&'static str> {
    while let Some(c) = s.queue.next(64 << 10) {
        if c.dropped > 0 {
            tracing::warn!(
                bytes = c.dropped,
                "console client did not keep up: its oldest queued console output was dropped"
            );
            let note = format!(
                "\r\n[xenkvm: {} bytes of console output dropped here: this client did not keep up]\r\n",
                c.dropped
            );
            if send_all(&mut conn, note.as_bytes(), &s.queue).is_err() {
                return Some("writing to it failed");
            }
        }
        if send_all(&mut conn, &c.data, &s.queue).is_err() {
            return Some("writing to it failed");
        }
    }
    None
}

/// Writes all of `b`, waiting for a slow client in slices (the session may
/// be abandoned meanwhile).
fn send_all(conn: &mut UnixStream, mut b: &[u8], q: &TapQueue) -> std::io::Result<()> {
    use std::io::ErrorKind::{Interrupted, TimedOut, WouldBlock};
    while !b.is_empty() {
        match conn.write(b) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => b = &b[n..],
            Err(e) if matches!(e.kind(), WouldBlock | TimedOut | Interrupted) => {
                if q.abandoned() {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Feeds what the client types to the guest's console until it closes the
/// connection; why it ended.
fn read_in(
    s: &Session,
    conn: &mut UnixStream,
    current: &(dyn Fn() -> Option<Arc<Machine>> + Send + Sync),
) -> &'static str {
    let mut buf = [0u8; 1024];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => return "it closed the connection",
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return "reading from it failed",
        };
        if s.ended.load(Ordering::Acquire) {
            return "the session ended";
        }
        let Some(m) = current() else {
            tracing::debug!(
                bytes = n,
                "console client input dropped: no guest runs (restart)"
            );
            continue;
        };
        feed(
            &buf[..n],
            |d| m.xen.console_input(d),
            || m.stopping() || s.ended.load(Ordering::Acquire),
        );
    }
}

/// Hands `data` to `push` (which takes what fits the backend's input
/// queue), waiting for the guest to make room, until all is taken or
/// `stop()`: as the VMM's stdin is fed (`console_input::feed`).
pub fn feed(data: &[u8], mut push: impl FnMut(&[u8]) -> usize, stop: impl Fn() -> bool) -> usize {
    let mut off = 0;
    while off < data.len() && !stop() {
        off += push(&data[off..]);
        if off < data.len() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    off
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::console::{layout, ConsoleBackend};
    use crate::backends::xenstore::{ring_read, MemRingPage, RingPage};

    #[test]
    fn tap_queue_returns_output_in_order() {
        let q = TapQueue::new(100);
        q.push(b"hello ");
        q.push(b"world");
        assert_eq!(
            q.next(1000),
            Some(Chunk {
                dropped: 0,
                data: b"hello world".to_vec()
            })
        );
    }

    #[test]
    fn tap_queue_over_limit_drops_oldest_and_counts() {
        let q = TapQueue::new(8);
        q.push(b"0123456789");
        q.push(b"ab");
        let c = q.next(1000).unwrap();
        assert_eq!(c.data, b"456789ab");
        assert_eq!(c.dropped, 4);
        q.push(b"x");
        assert_eq!(q.next(1000).unwrap().dropped, 0, "counted once");
    }

    #[test]
    fn tap_queue_closed_drains_then_ends() {
        let q = TapQueue::new(100);
        q.push(b"last words");
        q.close();
        q.push(b"after close");
        assert_eq!(q.next(4).unwrap().data, b"last");
        assert_eq!(q.next(100).unwrap().data, b" words");
        assert_eq!(q.next(100), None);
    }

    #[test]
    fn tap_queue_abandoned_wakes_a_waiting_writer() {
        let q = TapQueue::new(100);
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.next(100));
        std::thread::sleep(Duration::from_millis(20));
        q.abandon();
        assert_eq!(t.join().unwrap(), None);
    }

    #[test]
    fn tap_queue_stalled_reader_never_blocks_the_pusher() {
        // Nobody reads: 100 MiB pushed returns, memory stays bounded.
        let q = TapQueue::new(TAP_BUFFER);
        let block = vec![b'x'; 1 << 20];
        for _ in 0..100 {
            q.push(&block);
        }
        let c = q.next(usize::MAX).unwrap();
        assert_eq!(c.data.len(), TAP_BUFFER);
        assert_eq!(c.dropped, (100 << 20) as u64 - TAP_BUFFER as u64);
    }

    #[test]
    fn console_out_tap_gets_what_the_destination_gets() {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let dest = Buf::default();
        let out = ConsoleOut::new(Box::new(dest.clone()));
        out.write(b"before ");
        let q = TapQueue::new(100);
        let q2 = q.clone();
        out.set_tap(Some(Arc::new(move |b: &[u8]| q2.push(b))));
        out.write(b"during\n");
        assert!(out.set_tap(None).is_some());
        out.write(b"after\n");
        assert_eq!(&*dest.0.lock(), b"before during\nafter\n");
        assert_eq!(q.next(100).unwrap().data, b"during\n");
    }

    /// The fan-in path: client bytes reach the guest's `in[]` ring through
    /// the same backend queue `--console-input` uses, across a full queue.
    #[test]
    fn console_client_input_reaches_the_guest_ring_when_it_makes_room() {
        let page = MemRingPage::new();
        let backend = Mutex::new(ConsoleBackend::with_input_limit(16));
        let data: Vec<u8> = (0..40u8).map(|i| b'a' + i % 26).collect();
        let mut got = Vec::new();
        let n = feed(
            &data,
            |d| {
                let mut b = backend.lock();
                let n = b.push_input(d);
                // The guest reads what the backend delivered.
                b.process(&page, &mut Vec::new());
                let (cons, prod) = (
                    page.load_u32(layout::IN_CONS),
                    page.load_u32(layout::IN_PROD),
                );
                let mut v = vec![0; prod.wrapping_sub(cons) as usize];
                ring_read(&page, layout::IN, layout::IN_SIZE, cons, &mut v);
                page.store_u32(layout::IN_CONS, prod);
                got.extend(v);
                n
            },
            || false,
        );
        assert_eq!(n, data.len());
        assert_eq!(got, data);
    }

    #[test]
    fn console_client_input_stops_when_the_guest_ends() {
        let n = feed(b"never taken", |_| 0, || true);
        assert_eq!(n, 0);
    }
}
