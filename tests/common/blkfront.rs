//! An in-process blkfront for tests and benches: a domain (the real grant
//! table and event channels of `hypercalls`, over `FakePlatform`), guest
//! RAM as gpc's memfd-backed `MemoryMap`, and a frontend that grants pages
//! to domid 0, lays out the shared ring as Linux's `xen-blkfront` does
//! (`SHARED_RING_INIT`, `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`), signals its
//! event channel with `EVTCHNOP_send` and reads the responses. The VMM's
//! side is the real backend code (`xenkvm::backends::blkback`).

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use gpc::{GuestAddress, MemoryMap};
use hypercalls::testing::{Call, FakePlatform, FakeVcpu};
use hypercalls::{Domain, DomainConfig, GuestWidth, Hypercall, Outcome};
use parking_lot::Mutex;
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;
use xenkvm::backends::blkback::{BlkHost, QueueThread};
use xenkvm::backends::blkif::{decode_response, Abi, Request};

pub const DOMID: u16 = 1;
/// Guest RAM: 64 MiB at 1 MiB (inside FakePlatform's E820 RAM).
pub const RAM_BASE: u64 = 0x10_0000;
pub const RAM_SIZE: u64 = 64 << 20;
/// FakeVcpu's window for hypercall arguments (guest-virtual, separate).
const ARGS: u64 = 0x10_0000;
const PAGE: u64 = 4096;
const GRANT_FRAMES: u32 = 16;

/// Guest signals to the dom0 ports, as the VMM routes them.
pub type Routes = Arc<Mutex<HashMap<u32, Arc<EventFd>>>>;

pub struct Guest {
    pub p: Arc<FakePlatform>,
    pub d: Arc<Domain>,
    pub v: FakeVcpu,
    pub map: MemoryMap,
    pub routes: Routes,
    next_page: Mutex<u64>,
    next_gref: Mutex<u32>,
}

impl Guest {
    pub fn new() -> Arc<Guest> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("XENKVM_LOG")
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let p = Arc::new(FakePlatform::default());
        let d = Arc::new(
            Domain::new(
                DomainConfig {
                    domid: DOMID,
                    ..DomainConfig::default()
                },
                p.clone(),
            )
            .expect("domain"),
        );
        let v = FakeVcpu::new(0, GuestWidth::Bits64);
        v.map(ARGS, 4 * PAGE);
        let map = MemoryMap::new(&[(GuestAddress(RAM_BASE), RAM_SIZE)]).expect("guest RAM");
        let g = Guest {
            p,
            d,
            v,
            map,
            routes: Arc::new(Mutex::new(HashMap::new())),
            next_page: Mutex::new(RAM_BASE / PAGE),
            // Refs 0-7 are reserved by convention (xenstore, console).
            next_gref: Mutex::new(8),
        };
        // GNTTABOP_setup_table: grow the table to GRANT_FRAMES frames.
        let mut st = [0u8; 24];
        st[0..2].copy_from_slice(&0x7ff0u16.to_le_bytes());
        st[4..8].copy_from_slice(&GRANT_FRAMES.to_le_bytes());
        st[16..24].copy_from_slice(&(ARGS + 0x800).to_le_bytes());
        g.v.poke(ARGS, &st);
        assert_eq!(g.hcall(20, &[2, ARGS, 1]), 0, "setup_table");
        Arc::new(g)
    }

    pub fn hcall(&self, nr: u64, a: &[u64]) -> i64 {
        let mut x = [0u64; 6];
        x[..a.len()].copy_from_slice(a);
        match self.d.dispatch(
            &self.v,
            &Hypercall::from_regs64(nr, x[0], x[1], x[2], x[3], x[4], x[5]),
        ) {
            Outcome::Return(r) => r,
            o => panic!("hypercall {nr} did not return: {o:?}"),
        }
    }

    /// A host for the backend: plain threads, routes into `routes`.
    pub fn host(&self) -> BlkHost {
        let routes = self.routes.clone();
        BlkHost {
            spawn: Arc::new(|name, f| std::thread::Builder::new().name(name).spawn(f)),
            route: Arc::new(move |port, fd| {
                let mut r = routes.lock();
                match fd {
                    Some(fd) => r.insert(port, fd),
                    None => r.remove(&port),
                };
            }),
        }
    }

    /// `n` fresh zeroed pages of guest RAM (GFNs).
    pub fn alloc_pages(&self, n: u64) -> Vec<u64> {
        let mut np = self.next_page.lock();
        let first = *np;
        *np += n;
        assert!(*np <= (RAM_BASE + RAM_SIZE) / PAGE, "guest RAM exhausted");
        (first..first + n).collect()
    }

    /// Grants `gfn` to domid 0 (read-only if `ro`): a v1 entry.
    pub fn grant(&self, gfn: u64, ro: bool) -> u32 {
        let gref = {
            let mut g = self.next_gref.lock();
            let r = *g;
            *g += 1;
            r
        };
        self.grant_at(gref, gfn, ro);
        gref
    }

    pub fn grant_at(&self, gref: u32, gfn: u64, ro: bool) {
        let frame = self.d.grant_frame(gref / 512).expect("grant frame");
        let flags = 1u64 | if ro { 4 } else { 0 };
        frame.store_u64(
            (gref % 512) as usize * 8,
            flags | (gfn << 32),
            Ordering::SeqCst,
        );
    }

    /// Revokes a grant (`gnttab_end_foreign_access`): fails if the backend
    /// still has it mapped (GTF_reading/writing set).
    pub fn revoke(&self, gref: u32) -> bool {
        let frame = self.d.grant_frame(gref / 512).expect("grant frame");
        let off = (gref % 512) as usize * 8;
        let v = frame.load_u64(off, Ordering::SeqCst);
        if v & 0x18 != 0 {
            return false;
        }
        frame.store_u64(off, 0, Ordering::SeqCst);
        true
    }

    /// GTF_reading|GTF_writing of `gref`.
    pub fn busy(&self, gref: u32) -> u64 {
        let frame = self.d.grant_frame(gref / 512).expect("grant frame");
        frame.load_u64((gref % 512) as usize * 8, Ordering::SeqCst) & 0x18
    }

    /// EVTCHNOP_alloc_unbound for domid 0: the guest's port.
    pub fn alloc_port(&self) -> u32 {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&0x7ff0u16.to_le_bytes());
        b[2..4].copy_from_slice(&0u16.to_le_bytes());
        self.v.poke(ARGS, &b);
        assert_eq!(self.hcall(32, &[6, ARGS]), 0, "alloc_unbound");
        u32::from_le_bytes(self.v.peek(ARGS + 4, 4).try_into().unwrap())
    }

    /// EVTCHNOP_send on `port`, then deliver the backend notifications the
    /// domain asked the platform for (what the VMM's notify_backend does).
    pub fn send(&self, port: u32) {
        self.v.poke(ARGS + 0x100, &port.to_le_bytes());
        assert_eq!(self.hcall(32, &[4, ARGS + 0x100]), 0, "evtchn send");
        self.deliver();
    }

    /// Routes the platform's logged backend notifications to the queues.
    pub fn deliver(&self) {
        for c in self.p.take_calls() {
            if let Call::Backend(remote) = c {
                if let Some(fd) = self.routes.lock().get(&remote) {
                    let _ = fd.write(1);
                }
            }
        }
    }

    pub fn write_mem(&self, gpa: u64, data: &[u8]) {
        self.map
            .guest_memory()
            .write_slice(data, GuestAddress(gpa))
            .expect("guest write");
    }

    pub fn read_mem(&self, gpa: u64, buf: &mut [u8]) {
        self.map
            .guest_memory()
            .read_slice(buf, GuestAddress(gpa))
            .expect("guest read");
    }

    pub fn load_u32(&self, gpa: u64) -> u32 {
        self.map
            .guest_memory()
            .load(GuestAddress(gpa), Ordering::Acquire)
            .expect("guest load")
    }

    pub fn store_u32(&self, gpa: u64, v: u32) {
        self.map
            .guest_memory()
            .store(v, GuestAddress(gpa), Ordering::Release)
            .expect("guest store");
    }
}

/// One frontend ring (a queue): pages, grants, port, private indexes.
pub struct FrontRing {
    pub g: Arc<Guest>,
    pub pages: Vec<u64>,
    pub refs: Vec<u32>,
    pub port: u32,
    pub abi: Abi,
    pub size: u32,
    pub req_prod_pvt: u32,
    pub rsp_cons: u32,
    /// Host address of each ring page (guest RAM mappings live as long as
    /// the guest): request and response copies go straight to them, as a
    /// guest's frontend writes its ring, instead of through vm-memory's
    /// region lookup per access (which cost the benchmark's frontend more
    /// than the backend's ring parsing).
    hva: Vec<usize>,
}

impl FrontRing {
    /// A ring of `pages` pages (contiguous GFNs when `contiguous`, else
    /// every other page, so a multi-page ring is not contiguous in RAM).
    pub fn new(g: &Arc<Guest>, pages: usize, abi: Abi, contiguous: bool) -> FrontRing {
        let gfns: Vec<u64> = if contiguous {
            g.alloc_pages(pages as u64)
        } else {
            g.alloc_pages(2 * pages as u64)
                .into_iter()
                .step_by(2)
                .collect()
        };
        let refs = gfns.iter().map(|&f| g.grant(f, false)).collect();
        let hva = gfns
            .iter()
            .map(|&f| {
                g.map
                    .guest_memory()
                    .get_host_address(GuestAddress(f * PAGE))
                    .expect("ring page in RAM") as usize
            })
            .collect();
        let r = FrontRing {
            hva,
            g: g.clone(),
            size: xenkvm::backends::blkif::ring_entries(pages * 4096, abi.slot()),
            pages: gfns,
            refs,
            port: g.alloc_port(),
            abi,
            req_prod_pvt: 0,
            rsp_cons: 0,
        };
        // SHARED_RING_INIT
        for p in &r.pages {
            g.write_mem(p * PAGE, &[0u8; 4096]);
        }
        g.store_u32(r.addr(0), 0);
        g.store_u32(r.addr(4), 1);
        g.store_u32(r.addr(8), 0);
        g.store_u32(r.addr(12), 1);
        r
    }

    /// Guest physical address of byte `off` of the ring.
    pub fn addr(&self, off: usize) -> u64 {
        self.pages[off / 4096] * PAGE + (off % 4096) as u64
    }

    fn write(&self, off: usize, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let o = off + done;
            let n = (4096 - o % 4096).min(data.len() - done);
            let dst = (self.hva[o / 4096] + o % 4096) as *mut u8;
            // SAFETY: `dst..dst+n` lies inside one mapped ring page of guest
            // RAM (n stops at the page end); the backend reads it only after
            // the release store of req_prod in `push`.
            unsafe { std::ptr::copy_nonoverlapping(data[done..].as_ptr(), dst, n) };
            done += n;
        }
    }

    fn read(&self, off: usize, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let o = off + done;
            let n = (4096 - o % 4096).min(buf.len() - done);
            let src = (self.hva[o / 4096] + o % 4096) as *const u8;
            // SAFETY: as in `write`; read after the acquire load of rsp_prod.
            unsafe { std::ptr::copy_nonoverlapping(src, buf[done..].as_mut_ptr(), n) };
            done += n;
        }
    }

    fn slot(&self, idx: u32) -> usize {
        64 + (idx & (self.size - 1)) as usize * self.abi.slot()
    }

    /// Free slots.
    pub fn free(&self) -> u32 {
        self.size - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Queues a request (not yet visible).
    pub fn queue(&mut self, r: &Request) {
        let mut b = [0u8; 128];
        let b = &mut b[..self.abi.slot()];
        r.encode(self.abi, b);
        self.queue_raw(b);
    }

    pub fn queue_raw(&mut self, b: &[u8]) {
        let off = self.slot(self.req_prod_pvt);
        self.write(off, b);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
    }

    /// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, and the notification.
    pub fn push(&mut self) -> bool {
        let old = self.g.load_u32(self.addr(0));
        let new = self.req_prod_pvt;
        self.g.store_u32(self.addr(0), new);
        std::sync::atomic::fence(Ordering::SeqCst);
        let ev = self.g.load_u32(self.addr(4));
        let notify = new.wrapping_sub(ev) < new.wrapping_sub(old);
        if notify {
            self.g.send(self.port);
        }
        notify
    }

    /// Sets req_prod to anything (a broken frontend) and signals.
    pub fn set_req_prod(&self, v: u32) {
        self.g.store_u32(self.addr(0), v);
        self.g.send(self.port);
    }

    /// Takes the responses that arrived: (id, op, status). Arms rsp_event
    /// (RING_FINAL_CHECK_FOR_RESPONSES) when there are none.
    pub fn responses(&mut self, out: &mut Vec<(u64, u8, i16)>) -> usize {
        let prod = self.g.load_u32(self.addr(8));
        let mut n = 0;
        while self.rsp_cons != prod {
            let mut b = [0u8; 16];
            let len = self.abi.response_len();
            let off = self.slot(self.rsp_cons);
            self.read(off, &mut b[..len]);
            out.push(decode_response(&b[..len]));
            self.rsp_cons = self.rsp_cons.wrapping_add(1);
            n += 1;
        }
        if n == 0 {
            self.g
                .store_u32(self.addr(12), self.rsp_cons.wrapping_add(1));
        }
        n
    }

    /// Waits (polling, with a generous limit) until `n` responses arrived.
    pub fn wait(&mut self, n: usize) -> Vec<(u64, u8, i16)> {
        let mut out = Vec::new();
        let start = std::time::Instant::now();
        while out.len() < n {
            if self.responses(&mut out) == 0 {
                if start.elapsed() > std::time::Duration::from_secs(30) {
                    panic!("only {} of {n} responses after 30 s", out.len());
                }
                std::thread::yield_now();
            }
        }
        out
    }

    /// Whether any response arrived within `ms` (for "no answer" checks).
    pub fn any_within(&mut self, ms: u64) -> bool {
        let mut out = Vec::new();
        let end = std::time::Instant::now() + std::time::Duration::from_millis(ms);
        while std::time::Instant::now() < end {
            if self.responses(&mut out) > 0 {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    }
}

/// Starts serving `q` on a plain thread with the guest's routes.
pub fn start_queue(g: &Arc<Guest>, q: xenkvm::backends::blkback::Queue) -> QueueThread {
    let host = g.host();
    let t = QueueThread::start(&host, "blk-test".into(), q).expect("queue thread");
    (host.route)(t.dom0_port, Some(t.kick.clone()));
    t
}
