//! netback throughput against plain TAP writes and reads of the same
//! frames, in one run, interleaved (plain, backend, plain, backend).
//!
//! No guest: the in-process netfront of `tests/common/netfront.rs` drives
//! real tx/rx rings through the real grant table, event channels and gpc
//! guest RAM; the backend is the real queue engine on its own I/O thread.
//! Everything happens in a network namespace the bench creates, with two
//! TAPs on a bridge: the backend's (or, for the baseline, a plain one) and
//! a source TAP.
//!
//! - TX: the frontend keeps up to 200 tx slots in flight of one frame
//!   (prepared once in the granted pages, so the guest's own copy is not
//!   counted); the backend copies each out of guest RAM and writes it to its
//!   TAP. Baseline: one thread writing the same frame (with its vnet
//!   header) to a plain TAP. The frames are addressed to a MAC nobody has,
//!   so the bridge floods them to the source TAP, whose queue drops them.
//! - RX: a thread writes the frame into the source TAP as fast as it can;
//!   the bridge floods it to the backend's TAP; the backend copies it into
//!   the pages the frontend posted; the frontend takes the responses and
//!   posts the pages again. Baseline: the same writer, and a thread reading
//!   a plain TAP in the backend's place. Frames the slower reader misses
//!   are dropped by the kernel in both cases.
//!
//! Sizes: 1514-byte frames (one slot) and 60,042-byte frames (15 slots;
//! MTU 65000). `XENKVM_BENCH_SECS` seconds per measurement (default 1.5).
//! Needs root (network namespace, TAPs): says so and exits otherwise.
//! `cargo bench --bench netback`.

#[path = "../common/blkfront.rs"]
mod blkfront;
#[path = "../common/netfront.rs"]
mod netfront;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkfront::*;
use netfront::*;
use xenkvm::backends::netback::{NetQueue, NetRingSetup, NetWorker, RxFeatures};
use xenkvm::backends::netif::frame::VNET_HDR_LEN;
use xenkvm::backends::netif::wire::*;
use xenkvm::host::tap::Tap;

const FE_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x0b, 0xe0, 0x01];

fn secs() -> Duration {
    Duration::from_secs_f64(
        std::env::var("XENKVM_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1.5),
    )
}

fn ip(ns: &str, args: &[&str]) {
    let o = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ip -n {ns} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Moves TAP `name` into `ns`, on bridge `br`, up, MTU 65000.
fn plug(ns: &str, name: &str) {
    let o = Command::new("ip")
        .args(["link", "set", name, "netns", ns])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ip(
        ns,
        &["link", "set", name, "mtu", "65000", "master", "br0", "up"],
    );
}

/// A frame of `len` bytes to `dst`, of the local experimental ethertype
/// 0x88b5 (not IP: a bridge with `bridge-nf-call-iptables` would drop
/// malformed IP, and nothing up the stack spends time on it).
fn frame(dst: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = (i * 13) as u8;
    }
    f
}

struct Backend {
    g: Arc<Guest>,
    nf: NetFront,
    _worker: NetWorker,
}

impl Backend {
    fn new(ns: &str, name: &str) -> Backend {
        let g = Guest::new();
        let tap = Arc::new(Tap::open(name).expect("TAP"));
        tap.set_offload(0x1 | 0x2 | 0x4).unwrap();
        plug(ns, name);
        let nf = NetFront::new(&g, false);
        let setup = NetRingSetup {
            tx_ref: nf.tx.gref,
            rx_ref: nf.rx.gref,
            tx_port: nf.tx_port,
            rx_port: nf.rx_port,
        };
        let features = RxFeatures {
            gso4: true,
            gso6: true,
            no_csum: false,
        };
        let q = NetQueue::connect(
            "bench".into(),
            g.d.clone(),
            DOMID,
            g.map.clone(),
            tap,
            features,
            &setup,
        )
        .expect("queue");
        let host = g.host();
        let w = NetWorker::start(&host, "netback-bench".into(), q).expect("worker");
        for &p in &w.dom0_ports {
            (host.route)(p, Some(w.kick.clone()));
        }
        Backend { g, nf, _worker: w }
    }

    /// Sends `f` over and over for `d`: (frames, bytes, time).
    fn tx(&mut self, f: &[u8], d: Duration) -> (u64, u64, Duration) {
        let nf = &mut self.nf;
        let chunks: Vec<&[u8]> = f.chunks(4096).collect();
        let k = chunks.len();
        // The frame in every group of k tx pages, once.
        let groups = nf.tx_bufs.len() / k;
        for gi in 0..groups {
            for (j, c) in chunks.iter().enumerate() {
                let (gfn, _) = nf.tx_bufs[gi * k + j];
                self.g.write_mem(gfn * 4096, c);
            }
        }
        let max_inflight = (200 / k).max(1) * k;
        let mut inflight = 0usize;
        let (mut frames, mut gi) = (0u64, 0usize);
        let start = Instant::now();
        let mut id = 0u16;
        loop {
            while inflight + k <= max_inflight {
                for (j, c) in chunks.iter().enumerate() {
                    let (_, gref) = nf.tx_bufs[(gi % groups) * k + j];
                    let r = TxRequest {
                        gref,
                        offset: 0,
                        flags: if j + 1 < k { TXF_MORE_DATA } else { 0 },
                        id,
                        size: if j == 0 { f.len() } else { c.len() } as u16,
                    };
                    id = id.wrapping_add(1);
                    nf.tx.queue_raw(&r.encode());
                }
                gi += 1;
                inflight += k;
            }
            nf.tx.push(nf.tx_port);
            let mut got = 0;
            while let Some(b) = nf.tx.next_response() {
                let r = TxResponse::parse(&b).unwrap();
                assert!(r.status == RSP_OKAY || r.status == RSP_DROPPED);
                got += 1;
            }
            inflight -= got;
            frames += (got / k) as u64;
            if got == 0 {
                std::hint::spin_loop();
            }
            if start.elapsed() >= d {
                break;
            }
        }
        let t = start.elapsed();
        // Drain what is in flight.
        while inflight > 0 {
            if nf.tx.next_response().is_some() {
                inflight -= 1;
            }
        }
        (frames, frames * f.len() as u64, t)
    }

    /// Receives for `d` while `src` is flooded: (frames, bytes, time).
    fn rx(&mut self, d: Duration) -> (u64, u64, Duration) {
        let nf = &mut self.nf;
        let (mut frames, mut bytes) = (0u64, 0u64);
        let start = Instant::now();
        while start.elapsed() < d {
            let mut posted = false;
            while let Some(b) = nf.rx.next_response() {
                let r = RxResponse::parse(&b).unwrap();
                nf.post_rx();
                posted = true;
                if r.status > 0 {
                    bytes += r.status as u64;
                }
                if r.flags & RXF_MORE_DATA == 0 {
                    frames += 1;
                }
            }
            if posted {
                nf.rx.push(nf.rx_port);
            } else {
                std::hint::spin_loop();
            }
        }
        (frames, bytes, start.elapsed())
    }
}

/// Plain TAP writes of `f` for `d`.
fn plain_tx(tap: &Tap, f: &[u8], d: Duration) -> (u64, u64, Duration) {
    let mut buf = vec![0u8; VNET_HDR_LEN];
    buf.extend_from_slice(f);
    let start = Instant::now();
    let mut frames = 0u64;
    while start.elapsed() < d {
        for _ in 0..64 {
            if tap.write_frame(&buf).is_ok() {
                frames += 1;
            }
        }
    }
    (frames, frames * f.len() as u64, start.elapsed())
}

/// Plain TAP reads for `d`.
fn plain_rx(tap: &Tap, d: Duration) -> (u64, u64, Duration) {
    let mut buf = vec![0u8; 70_000];
    let start = Instant::now();
    let (mut frames, mut bytes) = (0u64, 0u64);
    while start.elapsed() < d {
        match tap.read_frame(&mut buf) {
            Ok(n) => {
                frames += 1;
                bytes += (n - VNET_HDR_LEN) as u64;
            }
            Err(_) => std::hint::spin_loop(),
        }
    }
    (frames, bytes, start.elapsed())
}

/// Floods `tap` with `f` until `stop`.
fn flood(tap: Arc<Tap>, f: Vec<u8>, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) {
    let mut buf = vec![0u8; VNET_HDR_LEN];
    buf.extend_from_slice(&f);
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            if tap.write_frame(&buf).is_ok() {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn main() {
    let ns = format!("xknbench{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!(
            "netback bench: cannot create a network namespace (needs root and iproute2): not run"
        );
        return;
    }
    ip(&ns, &["link", "add", "br0", "type", "bridge"]);
    ip(&ns, &["link", "set", "br0", "up"]);
    let pid = std::process::id() % 100_000;
    let (be_name, plain_name, src_name) = (
        format!("xkbe{pid}"),
        format!("xkpl{pid}"),
        format!("xksr{pid}"),
    );
    let mut be = Backend::new(&ns, &be_name);
    let plain = Arc::new(Tap::open(&plain_name).expect("TAP"));
    plug(&ns, &plain_name);
    let src = Arc::new(Tap::open(&src_name).expect("TAP"));
    plug(&ns, &src_name);
    let d = secs();
    println!(
        "netback vs plain TAP write/read, namespace {ns}, {:.1} s per run, 2 interleaved rounds",
        d.as_secs_f64()
    );
    println!(
        "{:<26} {:>12} {:>9} {:>12} {:>9} {:>7}",
        "workload", "be frames/s", "be MB/s", "plain fr/s", "plain MB/s", "ratio"
    );
    let nobody = [0x02, 0, 0, 0, 0, 0x77];
    let rate = |fr: u64, t: Duration| fr as f64 / t.as_secs_f64();
    let mbs = |b: u64, t: Duration| b as f64 / 1e6 / t.as_secs_f64();
    for len in [1514usize, 60_042] {
        // TX.
        let f = frame(nobody, len);
        be.tx(&f, Duration::from_millis(200));
        let (mut bf, mut bb, mut bt) = (0, 0, Duration::ZERO);
        let (mut pf, mut pb, mut pt) = (0, 0, Duration::ZERO);
        for _ in 0..2 {
            let (a, b, c) = plain_tx(&plain, &f, d);
            pf += a;
            pb += b;
            pt += c;
            let (a, b, c) = be.tx(&f, d);
            bf += a;
            bb += b;
            bt += c;
        }
        println!(
            "{:<26} {:>12.0} {:>9.1} {:>12.0} {:>9.1} {:>6.2}x",
            format!("tx {len} B"),
            rate(bf, bt),
            mbs(bb, bt),
            rate(pf, pt),
            mbs(pb, pt),
            rate(bf, bt) / rate(pf, pt)
        );
        // RX: the source floods frames to the frontend's MAC.
        let f = frame(FE_MAC, len);
        let (mut bf, mut bb, mut bt) = (0, 0, Duration::ZERO);
        let (mut pf, mut pb, mut pt) = (0, 0, Duration::ZERO);
        let mut sent = [0u64; 2];
        for _ in 0..2 {
            for (k, backend) in [(0usize, false), (1, true)] {
                let stop = Arc::new(AtomicBool::new(false));
                let count = Arc::new(AtomicU64::new(0));
                let (s, c, t, fr) = (stop.clone(), count.clone(), src.clone(), f.clone());
                let h = std::thread::spawn(move || flood(t, fr, s, c));
                let r = if backend {
                    be.rx(d)
                } else {
                    plain_rx(&plain, d)
                };
                stop.store(true, Ordering::Relaxed);
                h.join().unwrap();
                sent[k] += count.load(Ordering::Relaxed);
                if backend {
                    bf += r.0;
                    bb += r.1;
                    bt += r.2;
                } else {
                    pf += r.0;
                    pb += r.1;
                    pt += r.2;
                }
            }
        }
        println!(
            "{:<26} {:>12.0} {:>9.1} {:>12.0} {:>9.1} {:>6.2}x   (source wrote {:.0}/s and {:.0}/s)",
            format!("rx {len} B"),
            rate(bf, bt),
            mbs(bb, bt),
            rate(pf, pt),
            mbs(pb, pt),
            rate(bf, bt) / rate(pf, pt),
            rate(sent[1], bt),
            rate(sent[0], pt),
        );
    }
    if std::env::var("XENKVM_BENCH_DEBUG").is_ok() {
        let o = Command::new("ip")
            .args(["-n", &ns, "-s", "link"])
            .output()
            .unwrap();
        println!("{}", String::from_utf8_lossy(&o.stdout));
    }
    drop(be);
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
}
