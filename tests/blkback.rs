//! blkback against an in-process frontend (`common/blkfront.rs`): the real
//! grant table and event channels, guest RAM in gpc's memory map, and the
//! real backend code (queue engine, xenbus state machine over the real
//! xenstore server). No guest and no /dev/kvm needed.

#[path = "common/blkfront.rs"]
mod blkfront;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use blkfront::*;
use xenkvm::backends::blkback::{
    BlkBackend, BlkConfig, Disk, Queue, QueueParams, RingSetup, UringUse,
};
use xenkvm::backends::blkif::request::{RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY};
use xenkvm::backends::blkif::{Abi, Request, RwOp, Segment};
use xenkvm::backends::xenstore::{self, PermKind, XenstoreServer};

const SECTORS: u64 = 2048; // 1 MiB disks

struct TmpDir(PathBuf);
impl TmpDir {
    fn new(tag: &str) -> TmpDir {
        let p = std::env::temp_dir().join(format!("xenkvm-blk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TmpDir(p)
    }
    fn image(&self, name: &str, sectors: u64) -> PathBuf {
        let p = self.0.join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        let data: Vec<u8> = (0..sectors * 512)
            .map(|i| (i / 512) as u8 ^ (i as u8))
            .collect();
        f.write_all(&data).unwrap();
        p
    }
}
impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pattern(i: u64) -> u8 {
    ((i / 512) as u8) ^ (i as u8)
}

fn disk(path: &std::path::Path, ro: bool) -> Arc<Disk> {
    let spec = format!(
        "vdev=xvda,access={},target={}",
        if ro { "ro" } else { "rw" },
        path.display()
    );
    Arc::new(Disk::open(&BlkConfig::parse(&spec).unwrap()).unwrap())
}

fn params() -> QueueParams {
    QueueParams {
        max_indirect: 256,
        discard: true,
        uring: xenkvm::backends::blkback::xenbus::uring_wanted(),
        persistent: 0,
    }
}

/// A frontend ring connected to a queue served on a thread.
fn connect(
    g: &Arc<Guest>,
    d: Arc<Disk>,
    pages: usize,
    abi: Abi,
) -> (FrontRing, xenkvm::backends::blkback::QueueThread) {
    connect_with(g, d, pages, abi, params())
}

/// [`connect`] with other queue parameters.
fn connect_with(
    g: &Arc<Guest>,
    d: Arc<Disk>,
    pages: usize,
    abi: Abi,
    params: QueueParams,
) -> (FrontRing, xenkvm::backends::blkback::QueueThread) {
    let fr = FrontRing::new(g, pages, abi, pages == 1);
    let q = Queue::connect(
        "test".into(),
        g.d.clone(),
        DOMID,
        g.map.clone(),
        d,
        params,
        &RingSetup {
            refs: fr.refs.clone(),
            port: fr.port,
            abi,
        },
    )
    .expect("connect");
    let t = start_queue(g, q);
    (fr, t)
}

/// Data pages granted to the backend: (gfn, gref).
fn data_pages(g: &Arc<Guest>, n: u64, ro: bool) -> Vec<(u64, u32)> {
    g.alloc_pages(n)
        .into_iter()
        .map(|f| (f, g.grant(f, ro)))
        .collect()
}

fn full(gref: u32) -> Segment {
    Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
    }
}

fn rw(op: RwOp, id: u64, sector: u64, segs: Vec<Segment>) -> Request {
    Request::Rw {
        op,
        handle: 0,
        id,
        sector,
        segs,
    }
}

fn one(fr: &mut FrontRing, r: &Request) -> (u64, u8, i16) {
    fr.queue(r);
    fr.push();
    fr.wait(1)[0]
}

#[test]
fn blkback_read_write_both_abis_and_ring_sizes_moves_data() {
    let t = TmpDir::new("rw");
    for (abi, pages) in [
        (Abi::X86_64, 1),
        (Abi::X86_32, 1),
        (Abi::X86_64, 16),
        (Abi::X86_32, 4),
    ] {
        let path = t.image(&format!("d-{pages}-{abi:?}.img"), SECTORS);
        let g = Guest::new();
        let (mut fr, th) = connect(&g, disk(&path, false), pages, abi);
        let pg = data_pages(&g, 2, false);
        // Read sectors 8..24 (two pages, the second from sector 1 of its frame).
        let segs = vec![
            full(pg[0].1),
            Segment {
                gref: pg[1].1,
                first_sect: 1,
                last_sect: 7,
            },
        ];
        let r = one(&mut fr, &rw(RwOp::Read, 7, 8, segs.clone()));
        assert_eq!(r, (7, 0, RSP_OKAY), "{abi:?} {pages}");
        let mut b = vec![0u8; 4096];
        g.read_mem(pg[0].0 * 4096, &mut b);
        assert!(b
            .iter()
            .enumerate()
            .all(|(i, &x)| x == pattern(8 * 512 + i as u64)));
        g.read_mem(pg[1].0 * 4096 + 512, &mut b[..3584]);
        assert!(b[..3584]
            .iter()
            .enumerate()
            .all(|(i, &x)| x == pattern(16 * 512 + i as u64)));
        assert_eq!(g.busy(pg[0].1), 0, "grants unmapped before the response");
        // Write them back elsewhere, then check the file.
        g.write_mem(pg[0].0 * 4096, &[0xab; 4096]);
        let r = one(&mut fr, &rw(RwOp::Write, 8, 100, vec![full(pg[0].1)]));
        assert_eq!(r, (8, 1, RSP_OKAY));
        let mut f = std::fs::File::open(&path).unwrap();
        f.seek(SeekFrom::Start(100 * 512)).unwrap();
        let mut got = vec![0u8; 4096];
        f.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&x| x == 0xab));
        // Many requests: more than the ring holds, so slots and pages wrap.
        let n = fr.size as u64 * 3;
        let mut done = 0;
        let mut id = 1000;
        while done < n {
            let batch = u64::from(fr.free()).min(n - done);
            for _ in 0..batch {
                fr.queue(&rw(RwOp::Read, id, id % (SECTORS - 8), vec![full(pg[1].1)]));
                id += 1;
            }
            fr.push();
            let rs = fr.wait(batch as usize);
            assert!(rs.iter().all(|r| r.2 == RSP_OKAY));
            done += batch;
        }
        assert_eq!(fr.rsp_cons, fr.req_prod_pvt);
        drop(th);
        assert_eq!(g.busy(fr.refs[0]), 0, "ring grants released at disconnect");
    }
}

#[test]
fn blkback_indirect_flush_barrier_discard_work() {
    let t = TmpDir::new("ops");
    let path = t.image("d.img", SECTORS);
    let g = Guest::new();
    let (mut fr, _th) = connect(&g, disk(&path, false), 1, Abi::X86_64);
    // Indirect write of 256 segments (1 MiB would be 2048 sectors: the whole disk).
    let pg = data_pages(&g, 256, true);
    for (i, (f, _)) in pg.iter().enumerate() {
        g.write_mem(f * 4096, &[i as u8; 4096]);
    }
    let ind = g.alloc_pages(1)[0];
    let mut page = vec![0u8; 4096];
    for (i, (_, r)) in pg.iter().enumerate() {
        page[i * 8..i * 8 + 8].copy_from_slice(&full(*r).encode());
    }
    g.write_mem(ind * 4096, &page);
    let ind_ref = g.grant(ind, true);
    let req = Request::Indirect {
        op: RwOp::Write,
        handle: 0,
        id: 1,
        sector: 0,
        nr_segments: 256,
        pages: vec![ind_ref],
    };
    // Answered with the inner operation (write), not BLKIF_OP_INDIRECT:
    // Linux's blkfront disables a disk whose response says 6 here.
    assert_eq!(one(&mut fr, &req), (1, 1, RSP_OKAY));
    let data = std::fs::read(&path).unwrap();
    assert!((0..256).all(|i| data[i * 4096..(i + 1) * 4096].iter().all(|&x| x == i as u8)));
    // Past the end by one sector: refused.
    let req = Request::Indirect {
        op: RwOp::Read,
        handle: 0,
        id: 2,
        sector: 1,
        nr_segments: 256,
        pages: vec![ind_ref],
    };
    assert_eq!(one(&mut fr, &req), (2, 0, RSP_ERROR));
    // Flush without data, flush with data, barrier.
    assert_eq!(
        one(&mut fr, &rw(RwOp::Flush, 3, 0, vec![])),
        (3, 3, RSP_OKAY)
    );
    // Linux's empty flush carries sector -1 (its block layer's "no
    // position"); refusing it made blkfront print "empty flush op failed"
    // and turn flushes off.
    assert_eq!(
        one(&mut fr, &rw(RwOp::Flush, 7, u64::MAX, vec![])),
        (7, 3, RSP_OKAY)
    );
    let w = data_pages(&g, 1, true);
    assert_eq!(
        one(&mut fr, &rw(RwOp::Flush, 4, 16, vec![full(w[0].1)])).2,
        RSP_OKAY
    );
    assert_eq!(
        one(&mut fr, &rw(RwOp::Barrier, 5, 24, vec![full(w[0].1)])).2,
        RSP_OKAY
    );
    // Discard: the range reads as zeros.
    let d = Request::Discard {
        handle: 0,
        id: 6,
        sector: 512,
        nr_sectors: 64,
        secure: false,
    };
    let (_, op, st) = one(&mut fr, &d);
    assert_eq!(op, 5);
    if st == RSP_OKAY {
        let data = std::fs::read(&path).unwrap();
        assert!(data[512 * 512..576 * 512].iter().all(|&x| x == 0));
    } else {
        assert_eq!(
            st, RSP_EOPNOTSUPP,
            "only 'not supported here' is acceptable"
        );
    }
    let secure = Request::Discard {
        handle: 0,
        id: 7,
        sector: 512,
        nr_sectors: 64,
        secure: true,
    };
    assert_eq!(one(&mut fr, &secure).2, RSP_EOPNOTSUPP);
}

#[test]
fn blkback_bad_requests_get_error_responses_and_queue_goes_on() {
    let t = TmpDir::new("bad");
    let path = t.image("d.img", SECTORS);
    let g = Guest::new();
    let (mut fr, _th) = connect(&g, disk(&path, false), 1, Abi::X86_64);
    let pg = data_pages(&g, 1, false);
    // nr_segments over 11.
    let mut raw = vec![0u8; 112];
    rw(RwOp::Read, 1, 0, vec![full(pg[0].1)]).encode(Abi::X86_64, &mut raw);
    raw[1] = 12;
    fr.queue_raw(&raw);
    // first_sect > last_sect.
    let bad_seg = Segment {
        gref: pg[0].1,
        first_sect: 5,
        last_sect: 2,
    };
    fr.queue(&rw(RwOp::Read, 2, 0, vec![bad_seg]));
    // Sectors past the end.
    fr.queue(&rw(RwOp::Read, 3, SECTORS - 7, vec![full(pg[0].1)]));
    fr.queue(&rw(RwOp::Read, 4, u64::MAX, vec![full(pg[0].1)]));
    // A grant reference out of the table, and one not granted.
    fr.queue(&rw(RwOp::Read, 5, 0, vec![full(1 << 30)]));
    fr.queue(&rw(RwOp::Read, 6, 0, vec![full(7000)]));
    // Indirect with too many segments, unknown op.
    fr.queue(&Request::Indirect {
        op: RwOp::Read,
        handle: 0,
        id: 7,
        sector: 0,
        nr_segments: 300,
        pages: vec![0],
    });
    raw[0] = 42;
    raw[8] = 8;
    fr.queue_raw(&raw);
    // A read into a read-only grant.
    let ro = data_pages(&g, 1, true);
    fr.queue(&rw(RwOp::Read, 9, 0, vec![full(ro[0].1)]));
    // And a good one after all that.
    fr.queue(&rw(RwOp::Read, 10, 0, vec![full(pg[0].1)]));
    fr.push();
    let rs = fr.wait(10);
    let st: Vec<(u64, i16)> = rs.iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(
        st,
        vec![
            (1, RSP_ERROR),
            (2, RSP_ERROR),
            (3, RSP_ERROR),
            (4, RSP_ERROR),
            (5, RSP_ERROR),
            (6, RSP_ERROR),
            (7, RSP_ERROR),
            (8, RSP_EOPNOTSUPP),
            (9, RSP_ERROR),
            (10, RSP_OKAY),
        ]
    );
    assert_eq!(g.busy(pg[0].1), 0);
}

/// The grants of a batch's reads and writes are pinned under one lock; a
/// grant that cannot be pinned (here in the middle of the batch, after
/// pins of good requests were taken) fails only its own request: the
/// others are pinned again one by one and served, and every grant is
/// given back.
#[test]
fn blkback_bad_grant_in_a_batch_fails_only_its_request() {
    let t = TmpDir::new("badbatch");
    let path = t.image("d.img", SECTORS);
    let g = Guest::new();
    let (mut fr, _th) = connect(&g, disk(&path, false), 1, Abi::X86_64);
    let pg = data_pages(&g, 4, false);
    let ro = data_pages(&g, 1, true);
    // Non-consecutive sectors: four groups of one read each, a write.
    fr.queue(&rw(RwOp::Read, 1, 8, vec![full(pg[0].1)]));
    fr.queue(&rw(RwOp::Read, 2, 32, vec![full(pg[1].1), full(ro[0].1)]));
    fr.queue(&rw(RwOp::Read, 3, 64, vec![full(pg[2].1)]));
    fr.queue(&rw(RwOp::Read, 4, 96, vec![full(7000)]));
    g.write_mem(pg[3].0 * 4096, &[0x5c; 4096]);
    fr.queue(&rw(RwOp::Write, 5, 200, vec![full(pg[3].1)]));
    fr.push();
    let mut st: Vec<(u64, i16)> = fr.wait(5).iter().map(|r| (r.0, r.2)).collect();
    st.sort_unstable();
    assert_eq!(
        st,
        vec![
            (1, RSP_OKAY),
            (2, RSP_ERROR),
            (3, RSP_OKAY),
            (4, RSP_ERROR),
            (5, RSP_OKAY),
        ]
    );
    let mut b = vec![0u8; 4096];
    for (k, sector) in [(0, 8u64), (2, 64)] {
        g.read_mem(pg[k].0 * 4096, &mut b);
        assert!(
            b.iter()
                .enumerate()
                .all(|(i, &x)| x == pattern(sector * 512 + i as u64)),
            "page {k}"
        );
    }
    let mut f = std::fs::File::open(&path).unwrap();
    f.seek(SeekFrom::Start(200 * 512)).unwrap();
    f.read_exact(&mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 0x5c),
        "the write after the bad grant"
    );
    assert!(
        pg.iter().chain(&ro).all(|p| g.busy(p.1) == 0),
        "every grant given back"
    );
}

/// Reads and writes of the same sectors in one batch see each other in
/// order, whether writes go through io_uring or not (an I/O that overlaps
/// one queued in the batch waits for it).
#[test]
fn blkback_overlapping_reads_and_writes_in_one_batch_keep_their_order() {
    let t = TmpDir::new("overlap");
    for uring in [UringUse::Reads, UringUse::All] {
        let path = t.image(&format!("d-{uring:?}.img"), SECTORS);
        let g = Guest::new();
        let (mut fr, _th) = connect_with(
            &g,
            disk(&path, false),
            1,
            Abi::X86_64,
            QueueParams { uring, ..params() },
        );
        let pg = data_pages(&g, 5, false);
        g.write_mem(pg[0].0 * 4096, &[0xa1; 4096]);
        g.write_mem(pg[2].0 * 4096, &[0xb2; 4096]);
        // An unrelated read first, then on sectors 40..48: write A, read,
        // write B, read.
        fr.queue(&rw(RwOp::Read, 1, 200, vec![full(pg[4].1)]));
        fr.queue(&rw(RwOp::Write, 2, 40, vec![full(pg[0].1)]));
        fr.queue(&rw(RwOp::Read, 3, 40, vec![full(pg[1].1)]));
        fr.queue(&rw(RwOp::Write, 4, 40, vec![full(pg[2].1)]));
        fr.queue(&rw(RwOp::Read, 5, 40, vec![full(pg[3].1)]));
        fr.push();
        let rs = fr.wait(5);
        assert!(rs.iter().all(|r| r.2 == RSP_OKAY), "{uring:?}: {rs:?}");
        let mut b = vec![0u8; 4096];
        g.read_mem(pg[1].0 * 4096, &mut b);
        assert!(b.iter().all(|&x| x == 0xa1), "{uring:?}: first read sees A");
        g.read_mem(pg[3].0 * 4096, &mut b);
        assert!(
            b.iter().all(|&x| x == 0xb2),
            "{uring:?}: second read sees B"
        );
        let mut f = std::fs::File::open(&path).unwrap();
        f.seek(SeekFrom::Start(40 * 512)).unwrap();
        f.read_exact(&mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0xb2), "{uring:?}: the file holds B");
    }
}

#[test]
fn blkback_readonly_disk_refuses_writes_serves_reads() {
    let t = TmpDir::new("ro");
    let path = t.image("d.img", SECTORS);
    let g = Guest::new();
    let (mut fr, _th) = connect(&g, disk(&path, true), 1, Abi::X86_64);
    let pg = data_pages(&g, 1, false);
    assert_eq!(
        one(&mut fr, &rw(RwOp::Write, 1, 0, vec![full(pg[0].1)])).2,
        RSP_ERROR
    );
    let d = Request::Discard {
        handle: 0,
        id: 2,
        sector: 0,
        nr_sectors: 8,
        secure: false,
    };
    assert_ne!(one(&mut fr, &d).2, RSP_OKAY);
    assert_eq!(
        one(&mut fr, &rw(RwOp::Read, 3, 0, vec![full(pg[0].1)])).2,
        RSP_OKAY
    );
    assert_eq!(
        std::fs::read(&path).unwrap()[0],
        pattern(0),
        "file unchanged"
    );
}

/// Sets `path`'s access time a day before its modification time, so that
/// any read that updates access times (relatime included) moves it.
fn age_atime(path: &std::path::Path) -> i64 {
    let mtime = std::fs::metadata(path).unwrap().mtime();
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let t = [
        libc::timespec {
            tv_sec: mtime - 86_400,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    // SAFETY: a valid C path and two timespecs, as utimensat takes.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), t.as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat {}", path.display());
    mtime - 86_400
}

#[test]
fn blkback_guest_reads_leave_the_image_access_time_alone() {
    let t = TmpDir::new("atime");
    let path = t.image("d.img", SECTORS);
    // Control: a plain read here does update it (else the file system is
    // mounted noatime and this test cannot tell anything).
    let old = age_atime(&path);
    let _ = std::fs::read(&path).unwrap();
    if std::fs::metadata(&path).unwrap().atime() == old {
        eprintln!("skipped: {} does not update access times", t.0.display());
        return;
    }
    let old = age_atime(&path);
    let g = Guest::new();
    let (mut fr, _th) = connect(&g, disk(&path, false), 1, Abi::X86_64);
    let pg = data_pages(&g, 4, false);
    for (i, p) in pg.iter().enumerate() {
        let r = rw(RwOp::Read, i as u64, 8 * i as u64, vec![full(p.1)]);
        assert_eq!(one(&mut fr, &r).2, RSP_OKAY);
    }
    assert!(page_is_pattern(&g, pg[1].0, 8));
    assert_eq!(
        std::fs::metadata(&path).unwrap().atime(),
        old,
        "the backend's reads changed the image's access time"
    );
}

/// Whether guest page `gfn` holds the image's pattern from `sector` on.
fn page_is_pattern(g: &Guest, gfn: u64, sector: u64) -> bool {
    let mut b = vec![0u8; 4096];
    g.read_mem(gfn << 12, &mut b);
    b.iter()
        .enumerate()
        .all(|(i, &v)| v == pattern(sector * 512 + i as u64))
}

#[test]
fn blkback_ring_index_beyond_ring_refuses_device_others_keep_running() {
    let t = TmpDir::new("idx");
    let g = Guest::new();
    let (mut bad, bad_th) = connect(&g, disk(&t.image("a.img", SECTORS), false), 1, Abi::X86_64);
    let (mut good, _good_th) = connect(&g, disk(&t.image("b.img", SECTORS), false), 1, Abi::X86_64);
    bad.set_req_prod(1000);
    assert!(!bad.any_within(100), "no responses from a refused ring");
    drop(bad_th); // stops promptly: the thread waits for its stop
    assert_eq!(g.busy(bad.refs[0]), 0, "refused ring's grants given back");
    let pg = data_pages(&g, 1, false);
    assert_eq!(
        one(&mut good, &rw(RwOp::Read, 1, 0, vec![full(pg[0].1)])).2,
        RSP_OKAY
    );
}

#[test]
fn blkback_ungranted_ring_page_or_port_refused_at_connect() {
    let t = TmpDir::new("ung");
    let g = Guest::new();
    let d = disk(&t.image("a.img", SECTORS), false);
    let port = g.alloc_port();
    let setup = |refs: Vec<u32>, port| RingSetup {
        refs,
        port,
        abi: Abi::X86_64,
    };
    let c = |s: &RingSetup| {
        Queue::connect(
            "t".into(),
            g.d.clone(),
            DOMID,
            g.map.clone(),
            d.clone(),
            params(),
            s,
        )
    };
    let e = c(&setup(vec![4000], port)).unwrap_err();
    assert!(e.to_string().contains("ring page grant 4000"), "{e}");
    let f = g.alloc_pages(2);
    let r0 = g.grant(f[0], false);
    let e = c(&setup(vec![r0, 4001], port)).unwrap_err();
    assert!(e.to_string().contains("4001"), "{e}");
    assert_eq!(g.busy(r0), 0, "the first ring page is given back");
    let ro = g.grant(f[1], true);
    assert!(c(&setup(vec![ro], port)).is_err(), "read-only ring grant");
    assert!(c(&setup(vec![r0, r0, r0], port)).is_err(), "3 pages");
    assert!(c(&setup(vec![r0], 9999)).is_err(), "bad port");
    assert_eq!(g.busy(r0), 0);
}

// ---- xenbus --------------------------------------------------------------------------------

struct Bus {
    g: Arc<Guest>,
    xs: XenstoreServer,
    b: BlkBackend,
}

impl Bus {
    fn new(specs: &[String]) -> Bus {
        let g = Guest::new();
        let mut xs =
            XenstoreServer::new_domain(&xenstore::DomainConfig::new(DOMID, "t", [0; 16], 65536))
                .unwrap();
        let cfgs: Vec<_> = specs.iter().map(|s| BlkConfig::parse(s).unwrap()).collect();
        let b =
            BlkBackend::new(&cfgs, DOMID, g.d.clone(), g.map.clone(), g.host(), &mut xs).unwrap();
        let mut bus = Bus { g, xs, b };
        bus.settle();
        bus
    }
    /// What the VMM does after the store changed: hand the watch events to the backend.
    fn settle(&mut self) {
        for _ in 0..8 {
            let ev = self.xs.take_events();
            if ev.is_empty() {
                return;
            }
            let rest = self.b.handle_events(&mut self.xs, ev);
            assert!(rest.is_empty());
        }
    }
    fn fe(&self, devid: u32) -> String {
        format!("/local/domain/{DOMID}/device/vbd/{devid}")
    }
    fn be(&self, devid: u32) -> String {
        format!("/local/domain/0/backend/vbd/{DOMID}/{devid}")
    }
    fn read(&self, p: &str) -> String {
        self.xs
            .read_string(p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
    }
    fn w(&mut self, p: &str, v: &str) {
        self.xs.write(p, v.as_bytes()).unwrap();
    }
    fn be_state(&self, devid: u32) -> String {
        self.read(&format!("{}/state", self.be(devid)))
    }
    fn set_fe_state(&mut self, devid: u32, s: u32) {
        let p = format!("{}/state", self.fe(devid));
        self.w(&p, &s.to_string());
        self.settle();
    }
    /// blkfront's talk_to_blkback: rings (order, queues), event channels, protocol, state 3.
    fn talk(&mut self, devid: u32, order: u32, queues: u32, abi: Abi) -> Vec<FrontRing> {
        let fe = self.fe(devid);
        let mut rings = Vec::new();
        if queues > 1 {
            self.w(&format!("{fe}/multi-queue-num-queues"), &queues.to_string());
        }
        for q in 0..queues {
            let dir = if queues > 1 {
                format!("{fe}/queue-{q}")
            } else {
                fe.clone()
            };
            let fr = FrontRing::new(&self.g, 1 << order, abi, order == 0);
            if order == 0 {
                self.w(&format!("{dir}/ring-ref"), &fr.refs[0].to_string());
            } else {
                self.w(&format!("{fe}/ring-page-order"), &order.to_string());
                for (i, r) in fr.refs.iter().enumerate() {
                    self.w(&format!("{dir}/ring-ref{i}"), &r.to_string());
                }
            }
            self.w(&format!("{dir}/event-channel"), &fr.port.to_string());
            rings.push(fr);
        }
        let proto = if abi == Abi::X86_32 {
            "x86_32-abi"
        } else {
            "x86_64-abi"
        };
        self.w(&format!("{fe}/protocol"), proto);
        self.w(&format!("{fe}/feature-persistent"), "1");
        self.set_fe_state(devid, 3);
        rings
    }
}

#[test]
fn xenbus_vbd_nodes_have_xl_keys_and_permissions() {
    let t = TmpDir::new("nodes");
    let img = t.image("a.img", SECTORS);
    let bus = Bus::new(&[format!("vdev=xvda,target={}", img.display())]);
    let (fe, be) = (bus.fe(51712), bus.be(51712));
    assert_eq!(bus.read(&format!("{fe}/backend")), be);
    assert_eq!(bus.read(&format!("{fe}/backend-id")), "0");
    assert_eq!(bus.read(&format!("{fe}/virtual-device")), "51712");
    assert_eq!(bus.read(&format!("{fe}/device-type")), "disk");
    assert_eq!(bus.read(&format!("{fe}/state")), "1");
    assert_eq!(bus.read(&format!("{be}/frontend")), fe);
    assert_eq!(bus.read(&format!("{be}/frontend-id")), DOMID.to_string());
    assert_eq!(bus.read(&format!("{be}/dev")), "xvda");
    assert_eq!(bus.read(&format!("{be}/mode")), "w");
    assert_eq!(
        bus.read(&format!("{be}/feature-max-indirect-segments")),
        "256"
    );
    assert_eq!(bus.read(&format!("{be}/max-ring-page-order")), "4");
    assert_eq!(bus.read(&format!("{be}/max-ring-pages")), "16");
    assert!(
        bus.read(&format!("{be}/multi-queue-max-queues"))
            .parse::<u32>()
            .unwrap()
            >= 1
    );
    assert_eq!(bus.be_state(51712), "2");
    let fp = bus.xs.get_perms(&fe).unwrap();
    assert_eq!(fp.owner(), DOMID, "the guest owns its frontend dir");
    assert_eq!(fp.entries()[0].kind, PermKind::None, "others: none");
    assert_eq!(
        fp.entries().get(1).map(|p| (p.domid, p.kind)),
        Some((0, PermKind::Read))
    );
    let bp = bus.xs.get_perms(&format!("{be}/state")).unwrap();
    assert_eq!(bp.owner(), 0);
    assert_eq!(
        bp.access(DOMID),
        PermKind::Read,
        "the guest reads the backend"
    );
    assert_eq!(bp.access(7), PermKind::None, "other domains do not");
}

#[test]
fn xenbus_handshake_connect_close_reconnect_serves_io() {
    let t = TmpDir::new("hs");
    let img = t.image("a.img", SECTORS);
    let ro = t.image("b.img", SECTORS);
    let mut bus = Bus::new(&[
        format!("vdev=xvda,target={}", img.display()),
        format!("vdev=xvdq,access=ro,target={}", ro.display()),
    ]);
    let mut rings = bus.talk(51712, 0, 1, Abi::X86_64);
    assert_eq!(bus.be_state(51712), "4");
    let be = bus.be(51712);
    assert_eq!(bus.read(&format!("{be}/sectors")), SECTORS.to_string());
    assert_eq!(bus.read(&format!("{be}/info")), "0");
    assert_eq!(bus.read(&format!("{be}/sector-size")), "512");
    assert_eq!(bus.read(&format!("{be}/physical-sector-size")), "512");
    assert_eq!(bus.read(&format!("{be}/feature-flush-cache")), "1");
    assert_eq!(bus.read(&format!("{be}/feature-barrier")), "1");
    assert_eq!(bus.read(&format!("{be}/feature-discard")), "1");
    assert_eq!(bus.read(&format!("{be}/feature-persistent")), "0");
    bus.set_fe_state(51712, 4);
    assert_eq!(bus.be_state(51712), "4", "Connected stays");
    let g = bus.g.clone();
    let pg = data_pages(&g, 1, false);
    assert_eq!(
        one(&mut rings[0], &rw(RwOp::Read, 1, 0, vec![full(pg[0].1)])).2,
        RSP_OKAY
    );
    assert_eq!(
        g.busy(pg[0].1),
        0,
        "persistent grants not offered: unmapped although the frontend asked"
    );
    // Extended devid, read-only: info 4, connected too (32-bit frontend).
    let xvdq = 268439552;
    let mut r2 = bus.talk(xvdq, 0, 1, Abi::X86_32);
    assert_eq!(bus.be_state(xvdq), "4");
    assert_eq!(bus.read(&format!("{}/info", bus.be(xvdq))), "4");
    assert_eq!(bus.read(&format!("{}/feature-discard", bus.be(xvdq))), "0");
    assert_eq!(
        one(&mut r2[0], &rw(RwOp::Write, 2, 0, vec![full(pg[0].1)])).2,
        RSP_ERROR
    );
    // Clean close: 5 -> 5, 6 -> disconnect, 6; the ring grants are free again.
    bus.set_fe_state(51712, 5);
    assert_eq!(bus.be_state(51712), "5");
    bus.set_fe_state(51712, 6);
    assert_eq!(bus.be_state(51712), "6");
    assert!(g.revoke(rings[0].refs[0]), "backend unmapped the ring");
    // Re-connect (a reloaded driver): 1 -> 2, then a 4-page ring on 2 queues.
    bus.set_fe_state(51712, 1);
    assert_eq!(bus.be_state(51712), "2");
    let mq = bus.b.devices()[0].cfg.clone();
    let max_q: u32 = bus
        .read(&format!("{be}/multi-queue-max-queues"))
        .parse()
        .unwrap();
    let nq = max_q.min(2);
    let mut rings = bus.talk(51712, 2, nq, Abi::X86_64);
    assert_eq!(bus.be_state(51712), "4", "{mq:?}");
    assert_eq!(bus.b.devices()[0].queues(), nq as usize);
    for (i, r) in rings.iter_mut().enumerate() {
        assert_eq!(r.size, 128);
        let res = one(r, &rw(RwOp::Read, 10 + i as u64, 8, vec![full(pg[0].1)]));
        assert_eq!(res, (10 + i as u64, 0, RSP_OKAY));
    }
    // The frontend disappears (its directory removed) mid-connection.
    let fe = bus.fe(51712);
    bus.xs.rm(&fe).unwrap();
    bus.settle();
    assert_eq!(bus.be_state(51712), "6");
    assert!(g.revoke(rings[0].refs[0]));
    // The other device still works.
    assert_eq!(
        one(&mut r2[0], &rw(RwOp::Read, 3, 0, vec![full(pg[0].1)])).2,
        RSP_OKAY
    );
}

#[test]
fn xenbus_bad_frontend_keys_refused_with_error_node() {
    let t = TmpDir::new("badfe");
    let img = t.image("a.img", SECTORS);
    let mut bus = Bus::new(&[format!("vdev=xvda,target={}", img.display())]);
    let fe = bus.fe(51712);
    // A ring reference that is not granted.
    bus.w(&format!("{fe}/ring-ref"), "4000");
    let port = bus.g.alloc_port();
    bus.w(&format!("{fe}/event-channel"), &port.to_string());
    bus.set_fe_state(51712, 3);
    assert_eq!(bus.be_state(51712), "5", "refused: Closing");
    let err = bus.read(&format!("{}/error", bus.be(51712)));
    assert!(err.contains("4000"), "{err}");
    // The frontend gives up and closes, then retries properly.
    bus.set_fe_state(51712, 6);
    assert_eq!(bus.be_state(51712), "6");
    bus.set_fe_state(51712, 1);
    assert_eq!(bus.be_state(51712), "2");
    for (k, v) in [
        ("ring-page-order", "5"),
        ("multi-queue-num-queues", "99"),
        ("protocol", "arm-abi"),
    ] {
        bus.xs.rm(&format!("{fe}/ring-page-order")).unwrap();
        bus.xs.rm(&format!("{fe}/multi-queue-num-queues")).unwrap();
        bus.xs.rm(&format!("{fe}/protocol")).unwrap();
        bus.w(&format!("{fe}/{k}"), v);
        bus.set_fe_state(51712, 3);
        assert_eq!(bus.be_state(51712), "5", "{k}={v}");
        bus.set_fe_state(51712, 6);
        bus.set_fe_state(51712, 1);
        assert_eq!(bus.be_state(51712), "2");
    }
}

#[test]
fn blkbackend_duplicate_vdev_or_missing_file_named() {
    let t = TmpDir::new("dup");
    let img = t.image("a.img", SECTORS);
    let g = Guest::new();
    let mut xs = XenstoreServer::new();
    let a = BlkConfig::parse(&format!("vdev=xvda,target={}", img.display())).unwrap();
    let b = BlkConfig::parse(&format!("vdev=51712,target={}", img.display())).unwrap();
    let e = BlkBackend::new(
        &[a.clone(), b],
        DOMID,
        g.d.clone(),
        g.map.clone(),
        g.host(),
        &mut xs,
    )
    .unwrap_err();
    assert!(e.contains("same device number 51712"), "{e}");
    let m = BlkConfig::parse("vdev=xvdb,target=/nonexistent/x.img").unwrap();
    let e =
        BlkBackend::new(&[m], DOMID, g.d.clone(), g.map.clone(), g.host(), &mut xs).unwrap_err();
    assert!(
        e.contains("xvdb") && e.contains("/nonexistent/x.img"),
        "{e}"
    );
    let q = BlkConfig::parse(&format!("format=qcow2,vdev=xvdc,target={}", img.display())).unwrap();
    let e =
        BlkBackend::new(&[q], DOMID, g.d.clone(), g.map.clone(), g.host(), &mut xs).unwrap_err();
    // A raw image named as qcow2: not a qcow2 header.
    assert!(e.contains("not a usable qcow2 image"), "{e}");
}

#[test]
fn blkback_merged_consecutive_requests_keep_order_and_errors_apart() {
    let t = TmpDir::new("merge");
    let path = t.image("d.img", SECTORS);
    let g = Guest::new();
    let (mut fr, _th) = connect(&g, disk(&path, false), 1, Abi::X86_64);
    let pg = data_pages(&g, 8, false);
    for (i, (f, _)) in pg.iter().enumerate() {
        g.write_mem(f * 4096, &[0x10 + i as u8; 4096]);
    }
    // Writes of sectors 0..32 in four requests, one with a bad grant in the
    // middle, then a read of 0..16 into other pages, all in one push.
    fr.queue(&rw(RwOp::Write, 1, 0, vec![full(pg[0].1)]));
    fr.queue(&rw(RwOp::Write, 2, 8, vec![full(pg[1].1)]));
    fr.queue(&rw(RwOp::Write, 3, 16, vec![full(7777)]));
    fr.queue(&rw(RwOp::Write, 4, 24, vec![full(pg[3].1)]));
    fr.queue(&rw(RwOp::Read, 5, 0, vec![full(pg[4].1), full(pg[5].1)]));
    fr.queue(&rw(RwOp::Flush, 6, 0, vec![]));
    fr.push();
    let mut rs = fr.wait(6);
    rs.sort();
    let st: Vec<i16> = rs.iter().map(|r| r.2).collect();
    assert_eq!(
        st,
        vec![RSP_OKAY, RSP_OKAY, RSP_ERROR, RSP_OKAY, RSP_OKAY, RSP_OKAY]
    );
    let data = std::fs::read(&path).unwrap();
    assert!(data[..4096].iter().all(|&x| x == 0x10));
    assert!(data[4096..8192].iter().all(|&x| x == 0x11));
    assert!(data[8192..12288]
        .iter()
        .enumerate()
        .all(|(i, &x)| x == pattern(8192 + i as u64)));
    assert!(data[12288..16384].iter().all(|&x| x == 0x13));
    let mut b = vec![0u8; 4096];
    g.read_mem(pg[4].0 * 4096, &mut b);
    assert!(
        b.iter().all(|&x| x == 0x10),
        "the read saw the earlier write"
    );
    g.read_mem(pg[5].0 * 4096, &mut b);
    assert!(b.iter().all(|&x| x == 0x11));
    assert!(pg.iter().all(|p| g.busy(p.1) == 0));
}

// ---- qcow2 images (through imago) ----

/// `qemu-img`, or why the qcow2 tests cannot run.
fn qemu_img(test: &str) -> bool {
    let ok = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("{test}: skipped: qemu-img is not installed (apt-get install qemu-utils)");
    }
    ok
}

fn run_qemu_img(args: &[&str]) -> String {
    let o = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "qemu-img {args:?}: {out}");
    out
}

/// A 16 MiB qcow2 image with 4 KiB clusters (one L2 table maps 2 MiB)
/// holding `pattern`, and that pattern.
fn qcow2_image(t: &TmpDir, name: &str) -> (PathBuf, Vec<u8>) {
    let sectors = 16 * 2048;
    let raw = t.image(&format!("{name}.raw"), sectors);
    let q = t.0.join(name);
    run_qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    (q, data)
}

/// An empty qcow2 image `top.qcow2` (4 KiB clusters) over a backing image
/// made by [`qcow2_image`], and the backing image's data (what the top one
/// reads as).
fn qcow2_over_backing(t: &TmpDir) -> (PathBuf, Vec<u8>) {
    let (base, data) = qcow2_image(t, "base.qcow2");
    let top = t.0.join("top.qcow2");
    run_qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    (top, data)
}

fn qdisk(path: &std::path::Path, ro: bool) -> Arc<Disk> {
    let spec = format!(
        "format=qcow2,vdev=xvda,access={},target={}",
        if ro { "ro" } else { "rw" },
        path.display()
    );
    Arc::new(Disk::open(&BlkConfig::parse(&spec).unwrap()).unwrap())
}

/// One data request over fresh pages: segments `(first_sect, last_sect)`
/// (indirect past 11), `data` written from them for writes; returns the
/// status and, for reads, the bytes read.
fn seg_io(
    g: &Arc<Guest>,
    fr: &mut FrontRing,
    op: RwOp,
    id: u64,
    sector: u64,
    specs: &[(u8, u8)],
    data: Option<&[u8]>,
) -> (i16, Vec<u8>) {
    let write = op.writes();
    let pg = data_pages(g, specs.len() as u64, write);
    let mut pos = 0;
    let mut segs = Vec::new();
    for (&(first, last), &(f, r)) in specs.iter().zip(&pg) {
        let len = (usize::from(last) - usize::from(first) + 1) * 512;
        if let Some(d) = data {
            g.write_mem(f * 4096 + u64::from(first) * 512, &d[pos..pos + len]);
        }
        pos += len;
        segs.push(Segment {
            gref: r,
            first_sect: first,
            last_sect: last,
        });
    }
    let req = if segs.len() <= 11 {
        rw(op, id, sector, segs.clone())
    } else {
        let ind = g.alloc_pages(1)[0];
        let mut page = vec![0u8; 4096];
        for (i, s) in segs.iter().enumerate() {
            page[i * 8..i * 8 + 8].copy_from_slice(&s.encode());
        }
        g.write_mem(ind * 4096, &page);
        Request::Indirect {
            op,
            handle: 0,
            id,
            sector,
            nr_segments: segs.len() as u16,
            pages: vec![g.grant(ind, true)],
        }
    };
    let (rid, _, st) = one(fr, &req);
    assert_eq!(rid, id);
    let mut out = Vec::new();
    if !write {
        for (s, &(f, _)) in segs.iter().zip(&pg) {
            let mut b = vec![0u8; (usize::from(s.last_sect) - usize::from(s.first_sect) + 1) * 512];
            g.read_mem(f * 4096 + u64::from(s.first_sect) * 512, &mut b);
            out.extend(b);
        }
    }
    assert!(pg.iter().all(|p| g.busy(p.1) == 0), "grants given back");
    (st, out)
}

fn bytes(specs: &[(u8, u8)]) -> usize {
    specs
        .iter()
        .map(|&(a, b)| (usize::from(b) - usize::from(a) + 1) * 512)
        .sum()
}

#[test]
fn blkback_qcow2_unaligned_multi_segment_io_round_trips_and_survives_reopen() {
    if !qemu_img("blkback_qcow2_unaligned_multi_segment_io_round_trips_and_survives_reopen") {
        return;
    }
    let t = TmpDir::new("qcow2");
    let (path, mut expect) = qcow2_image(&t, "d.qcow2");
    let d = qdisk(&path, false);
    assert!(d.is_qcow2() && d.file().is_none());
    assert_eq!(d.sectors(), 16 * 2048, "the virtual size, not the file's");
    let g = Guest::new();
    let (mut fr, th) = connect(&g, d, 4, Abi::X86_64);
    // Existing data: 18 sectors from 3 sectors past 2 MiB (the second L2 table).
    let specs = [(1, 7), (0, 7), (0, 2)];
    let (st, got) = seg_io(&g, &mut fr, RwOp::Read, 1, 4096 + 3, &specs, None);
    assert_eq!(st, RSP_OKAY);
    let at = (4096 + 3) * 512;
    assert!(
        got == expect[at..at + bytes(&specs)],
        "read of existing data"
    );
    // Writes: 11 segments in the first L2 table, unaligned to clusters; two
    // segments across the 2 MiB boundary; 40 segments (indirect) at 5 MiB +
    // 5 sectors; each with its own data.
    let mut id = 10;
    let writes: Vec<(u64, Vec<(u8, u8)>)> = vec![
        (3, (0..11).map(|i| (i % 3, 7 - (i % 2))).collect()),
        (4096 - 5, vec![(0, 7), (2, 7)]),
        (5 * 2048 + 5, (0..40).map(|i| (i % 8, 7)).collect()),
    ];
    for (fill, (sector, specs)) in writes.iter().enumerate() {
        let n = bytes(specs);
        let data: Vec<u8> = (0..n)
            .map(|i| (i as u8).wrapping_mul(31) ^ (fill as u8 + 1))
            .collect();
        id += 1;
        let (st, _) = seg_io(&g, &mut fr, RwOp::Write, id, *sector, specs, Some(&data));
        assert_eq!(st, RSP_OKAY, "write at sector {sector}");
        let at = *sector as usize * 512;
        expect[at..at + n].copy_from_slice(&data);
    }
    // Read back each write, with a sector of context either side.
    for (sector, specs) in &writes {
        let n = bytes(specs) / 512 + 2;
        let specs: Vec<(u8, u8)> = (0..n.div_ceil(8))
            .map(|i| (0, (n - i * 8).min(8) as u8 - 1))
            .collect();
        id += 1;
        let (st, got) = seg_io(&g, &mut fr, RwOp::Read, id, sector - 1, &specs, None);
        assert_eq!(st, RSP_OKAY);
        let at = (*sector as usize - 1) * 512;
        assert!(got == expect[at..at + n * 512], "read back at {sector}");
    }
    assert_eq!(
        one(&mut fr, &rw(RwOp::Flush, 100, 0, vec![])),
        (100, 3, RSP_OKAY)
    );
    // Discard 3 MiB + 1 sector, 64 sectors: reads as zeros after.
    let dreq = Request::Discard {
        handle: 0,
        id: 101,
        sector: 6 * 1024 + 1,
        nr_sectors: 64,
        secure: false,
    };
    assert_eq!(one(&mut fr, &dreq).2, RSP_OKAY);
    let at = (6 * 1024 + 1) * 512;
    expect[at..at + 64 * 512].fill(0);
    let (st, got) = seg_io(&g, &mut fr, RwOp::Read, 102, 6 * 1024, &[(0, 7); 9], None);
    assert_eq!(st, RSP_OKAY);
    assert!(
        got == expect[at - 512..at - 512 + 72 * 512],
        "discarded range"
    );
    // Past the virtual end: refused.
    let (st, _) = seg_io(&g, &mut fr, RwOp::Read, 103, 16 * 2048 - 4, &[(0, 7)], None);
    assert_eq!(st, RSP_ERROR);
    // Close the image (the queue drops its disk), then read it elsewhere.
    th.stop();
    drop(fr);
    let out = run_qemu_img(&["check", path.to_str().unwrap()]);
    assert!(out.contains("No errors"), "{out}");
    let raw = t.0.join("back.raw");
    run_qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let back = std::fs::read(&raw).unwrap();
    assert_eq!(back.len(), expect.len());
    let first_diff = back.iter().zip(&expect).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "qemu-img sees what the guest wrote");
    // And reopened through the backend's own path.
    let d = qdisk(&path, true);
    let (mut fr, _th) = connect(&g, d, 1, Abi::X86_32);
    let (st, got) = seg_io(&g, &mut fr, RwOp::Read, 1, 5 * 2048 + 5, &[(0, 7); 5], None);
    assert_eq!(st, RSP_OKAY);
    let at = (5 * 2048 + 5) * 512;
    assert!(got == expect[at..at + 40 * 512], "reopened image");
}

#[test]
fn blkback_qcow2_discard_waits_for_a_batch_holding_the_mapping() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use xenkvm::backends::blkback::qcow2::Piece;
    if !qemu_img("blkback_qcow2_discard_waits_for_a_batch_holding_the_mapping") {
        return;
    }
    let t = TmpDir::new("qcow2hold");
    let (path, _) = qcow2_image(&t, "d.qcow2");
    let d = qdisk(&path, false);
    let q = d.qcow2().unwrap();
    let first = [gpc::Segment::new(gpc::GuestAddress(0), 4096)];
    // A batch planned cluster 0 (in the image's file) and has not run yet.
    let hold = q.hold();
    let planned = q.plan(&hold, 0, &first, false).unwrap().unwrap();
    assert!(matches!(planned[..], [Piece::File { .. }]), "{planned:?}");
    // Another queue discards that cluster: it must wait for the batch, or
    // the cluster could be freed and reused under the I/O in flight.
    let done = Arc::new(AtomicBool::new(false));
    let th = {
        let (d, done) = (d.clone(), done.clone());
        std::thread::spawn(move || {
            d.discard(0, 8).unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !done.load(Ordering::SeqCst),
        "discard ran under a batch's hold"
    );
    drop(hold);
    th.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    // Afterwards the cluster reads as zeros; a write there needs imago.
    let hold = q.hold();
    let planned = q.plan(&hold, 0, &first, false).unwrap().unwrap();
    assert!(matches!(planned[..], [Piece::Zero(_)]), "{planned:?}");
    assert!(q.plan(&hold, 0, &first, true).unwrap().is_none());
}

#[test]
fn blkback_qcow2_planned_pieces_hold_the_same_bytes_as_imago_reads() {
    use vm_memory::Bytes;
    use xenkvm::backends::blkback::qcow2::Piece;
    let name = "blkback_qcow2_planned_pieces_hold_the_same_bytes_as_imago_reads";
    if !qemu_img(name) {
        return;
    }
    // A backing image with the pattern, a top image with some clusters of
    // its own (written through imago) and a discarded range: pieces in two
    // files and zeros.
    let t = TmpDir::new("qcow2plan");
    let (top, mut expect) = qcow2_over_backing(&t);
    let d = qdisk(&top, false);
    let q = d.qcow2().unwrap();
    let map = gpc::MemoryMap::new(&[(gpc::GuestAddress(0), 1 << 20)]).unwrap();
    let mem = map.guest_memory();
    for (at, len, v) in [(8192u64, 12288usize, 0x11u8), (65536 + 512, 1024, 0x22)] {
        mem.write_slice(&vec![v; len], gpc::GuestAddress(0))
            .unwrap();
        let segs = [gpc::Segment::new(gpc::GuestAddress(0), len)];
        assert_eq!(q.write(&map, at, &segs).unwrap(), len);
        expect[at as usize..at as usize + len].fill(v);
    }
    d.discard(40, 16).unwrap();
    expect[40 * 512..56 * 512].fill(0);
    // Random reads of 1-64 sectors from 1-4 guest ranges: the pieces a
    // batch would move give the bytes imago itself reads.
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let (mut files, mut zeros) = (0, 0);
    for i in 0..300 {
        let sectors = 1 + next(64) as usize;
        // A third of them near the written and discarded clusters.
        let span = if i % 3 == 0 {
            200
        } else {
            32_768 - sectors as u64
        };
        let at = next(span) * 512;
        let mut segs = Vec::new();
        let (mut left, mut gpa) = (sectors * 512, 0u64);
        while left > 0 {
            let n = if left > 512 {
                512 * (1 + next((left / 512) as u64) as usize)
            } else {
                left
            };
            segs.push(gpc::Segment::new(gpc::GuestAddress(gpa), n));
            gpa += n as u64 + 4096;
            left -= n;
        }
        mem.write_slice(&vec![0xee; gpa as usize], gpc::GuestAddress(0))
            .unwrap();
        let hold = q.hold();
        let pieces = q
            .plan(&hold, at, &segs, false)
            .unwrap()
            .expect("reads need no imago");
        for p in &pieces {
            match p {
                Piece::File { file, offset, segs } => {
                    files += 1;
                    map.read_file_into(file, *offset, segs).unwrap();
                }
                Piece::Zero(segs) => {
                    zeros += 1;
                    q.zero(&map, segs).unwrap();
                }
            }
        }
        drop(hold);
        let mut pos = at as usize;
        for s in &segs {
            let mut got = vec![0u8; s.len];
            mem.read_slice(&mut got, s.gpa).unwrap();
            assert!(
                got == expect[pos..pos + s.len],
                "read of {sectors} sectors at {at}"
            );
            pos += s.len;
        }
    }
    assert!(
        files > 300 && zeros > 0,
        "{files} file pieces, {zeros} zero pieces"
    );
}

#[test]
fn blkback_qcow2_readonly_refuses_writes_and_leaves_file_unchanged() {
    if !qemu_img("blkback_qcow2_readonly_refuses_writes_and_leaves_file_unchanged") {
        return;
    }
    let t = TmpDir::new("qcow2ro");
    let (path, expect) = qcow2_image(&t, "d.qcow2");
    let before = std::fs::read(&path).unwrap();
    let g = Guest::new();
    let (mut fr, th) = connect(&g, qdisk(&path, true), 1, Abi::X86_64);
    let (st, _) = seg_io(
        &g,
        &mut fr,
        RwOp::Write,
        1,
        8,
        &[(0, 7)],
        Some(&[0xee; 4096]),
    );
    assert_eq!(st, RSP_ERROR);
    let dreq = Request::Discard {
        handle: 0,
        id: 2,
        sector: 0,
        nr_sectors: 8,
        secure: false,
    };
    assert_ne!(one(&mut fr, &dreq).2, RSP_OKAY);
    let (st, got) = seg_io(&g, &mut fr, RwOp::Read, 3, 8, &[(0, 7)], None);
    assert_eq!(st, RSP_OKAY);
    assert!(got == expect[8 * 512..16 * 512]);
    assert_eq!(
        one(&mut fr, &rw(RwOp::Flush, 4, 0, vec![])).2,
        RSP_OKAY,
        "a flush of a read-only image has nothing to do"
    );
    th.stop();
    assert!(std::fs::read(&path).unwrap() == before, "file unchanged");
}

#[test]
fn blkback_qcow2_missing_or_corrupt_image_refused_naming_file() {
    let t = TmpDir::new("qcow2bad");
    let g = Guest::new();
    let mut xs = XenstoreServer::new();
    let junk = t.image("junk.qcow2", 64);
    for p in [t.0.join("missing.qcow2"), junk] {
        let c =
            BlkConfig::parse(&format!("format=qcow2,vdev=xvdc,target={}", p.display())).unwrap();
        let e = BlkBackend::new(&[c], DOMID, g.d.clone(), g.map.clone(), g.host(), &mut xs)
            .unwrap_err();
        assert!(
            e.contains("xvdc") && e.contains(&p.display().to_string()),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
        println!("{e}");
    }
}

// ---- persistent grants (feature-persistent) -----------------------------------------------

use xenkvm::backends::blkback::persistent::MAX_PERSISTENT_GRANTS;

fn persistent(max: usize) -> QueueParams {
    QueueParams {
        persistent: max,
        ..params()
    }
}

/// Fills page `gfn` with `v`.
fn fill(g: &Guest, gfn: u64, v: u8) {
    g.write_mem(gfn * 4096, &[v; 4096]);
}

/// Whether page `gfn` is all `v`.
fn page_is(g: &Guest, gfn: u64, v: u8) -> bool {
    let mut b = vec![0u8; 4096];
    g.read_mem(gfn * 4096, &mut b);
    b.iter().all(|&x| x == v)
}

/// Whether the disk file holds `v` in the 4 KiB at `sector`.
fn file_is(path: &std::path::Path, sector: u64, v: u8) -> bool {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(sector * 512)).unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact(&mut b).unwrap();
    b.iter().all(|&x| x == v)
}

#[test]
fn blkback_persistent_grants_stay_mapped_are_reused_and_released_at_disconnect() {
    let t = TmpDir::new("pgnt");
    let path = t.image("d.img", SECTORS);
    let g = Guest::new();
    let (mut fr, th) = connect_with(
        &g,
        disk(&path, false),
        1,
        Abi::X86_64,
        persistent(MAX_PERSISTENT_GRANTS),
    );
    // The frontend's persistent pool: writable grants (blkif.h note 8).
    let pg = data_pages(&g, 4, false);
    let segs: Vec<Segment> = pg.iter().map(|p| full(p.1)).collect();
    for (i, p) in pg.iter().enumerate() {
        fill(&g, p.0, 0xa0 + i as u8);
    }
    assert_eq!(
        one(&mut fr, &rw(RwOp::Write, 1, 16, segs.clone())),
        (1, 1, RSP_OKAY)
    );
    for p in &pg {
        assert_ne!(g.busy(p.1), 0, "kept mapped after the response");
        assert!(!g.revoke(p.1), "a kept grant cannot be revoked");
    }
    // The same grants again, new data: the backend sees the new contents.
    for (i, p) in pg.iter().enumerate() {
        fill(&g, p.0, 0xb0 + i as u8);
    }
    assert_eq!(
        one(&mut fr, &rw(RwOp::Write, 2, 64, segs.clone())),
        (2, 1, RSP_OKAY)
    );
    for i in 0..4u64 {
        assert!(
            file_is(&path, 16 + 8 * i, 0xa0 + i as u8),
            "first write {i}"
        );
        assert!(
            file_is(&path, 64 + 8 * i, 0xb0 + i as u8),
            "second write {i}"
        );
    }
    // Reads into the same grants, direct and indirect (the indirect page
    // kept too).
    for p in &pg {
        fill(&g, p.0, 0);
    }
    assert_eq!(
        one(&mut fr, &rw(RwOp::Read, 3, 16, segs.clone())),
        (3, 0, RSP_OKAY)
    );
    for (i, p) in pg.iter().enumerate() {
        assert!(page_is(&g, p.0, 0xa0 + i as u8), "direct read {i}");
    }
    let ind = g.alloc_pages(1)[0];
    let mut page = vec![0u8; 4096];
    for (i, s) in segs.iter().enumerate() {
        page[i * 8..i * 8 + 8].copy_from_slice(&s.encode());
    }
    g.write_mem(ind * 4096, &page);
    let ind_ref = g.grant(ind, false);
    let req = Request::Indirect {
        op: RwOp::Read,
        handle: 0,
        id: 4,
        sector: 64,
        nr_segments: 4,
        pages: vec![ind_ref],
    };
    assert_eq!(one(&mut fr, &req), (4, 0, RSP_OKAY));
    for (i, p) in pg.iter().enumerate() {
        assert!(page_is(&g, p.0, 0xb0 + i as u8), "indirect read {i}");
    }
    assert_ne!(g.busy(ind_ref), 0, "the indirect page is kept too");
    // Disconnect gives every kept grant back.
    drop(th);
    for r in pg.iter().map(|p| p.1).chain([ind_ref]) {
        assert_eq!(g.busy(r), 0, "released at disconnect");
        assert!(g.revoke(r));
    }
}

#[test]
fn blkback_persistent_grants_over_the_limit_map_per_request_and_lru_replaces_old_ones() {
    let t = TmpDir::new("pgntmax");
    let path = t.image("d.img", SECTORS);
    let g = Guest::new();
    let (mut fr, _th) = connect_with(&g, disk(&path, false), 1, Abi::X86_64, persistent(4));
    let a = data_pages(&g, 4, false);
    let b = data_pages(&g, 4, false);
    let segs = |p: &[(u64, u32)]| p.iter().map(|p| full(p.1)).collect::<Vec<_>>();
    let read_checks = |g: &Guest, p: &[(u64, u32)], sector: u64| {
        for (i, q) in p.iter().enumerate() {
            let mut buf = vec![0u8; 4096];
            g.read_mem(q.0 * 4096, &mut buf);
            let base = (sector + 8 * i as u64) * 512;
            assert!(
                buf.iter()
                    .enumerate()
                    .all(|(j, &x)| x == pattern(base + j as u64)),
                "page {i} from sector {sector}"
            );
        }
    };
    assert_eq!(one(&mut fr, &rw(RwOp::Read, 1, 0, segs(&a))).2, RSP_OKAY);
    read_checks(&g, &a, 0);
    assert!(a.iter().all(|p| g.busy(p.1) != 0), "the first 4 are kept");
    // The table is full: B's grants are served, mapped for the request only.
    assert_eq!(one(&mut fr, &rw(RwOp::Read, 2, 32, segs(&b))).2, RSP_OKAY);
    read_checks(&g, &b, 32);
    assert!(a.iter().all(|p| g.busy(p.1) != 0));
    let kept = |g: &Guest| a.iter().chain(&b).filter(|p| g.busy(p.1) != 0).count();
    assert_eq!(kept(&g), 4, "never more than the limit kept");
    // As Linux's blkback: the overflowing table drops its least recently
    // used grants (every 100 ms), so the ones in use now become persistent.
    let mut rounds = 0;
    while !b.iter().all(|p| g.busy(p.1) != 0) {
        rounds += 1;
        assert!(rounds <= 40, "B's grants never became persistent");
        std::thread::sleep(std::time::Duration::from_millis(120));
        let sector = 64 + 8 * rounds;
        assert_eq!(
            one(&mut fr, &rw(RwOp::Read, 100 + rounds, sector, segs(&b))).2,
            RSP_OKAY
        );
        read_checks(&g, &b, sector);
        assert!(kept(&g) <= 4, "never more than the limit kept");
    }
    assert!(
        a.iter().all(|p| g.busy(p.1) == 0),
        "A's grants were dropped"
    );
    assert!(g.revoke(a[0].1));
}

#[test]
fn blkback_persistent_grants_read_only_grant_is_mapped_per_request() {
    let t = TmpDir::new("pgntro");
    let path = t.image("d.img", SECTORS);
    let g = Guest::new();
    let (mut fr, _th) = connect_with(
        &g,
        disk(&path, false),
        1,
        Abi::X86_64,
        persistent(MAX_PERSISTENT_GRANTS),
    );
    // A frontend that granted a write's page read-only (against blkif.h's
    // note 8): the write is served, the grant is not kept.
    let p = data_pages(&g, 1, true);
    fill(&g, p[0].0, 0x5c);
    assert_eq!(
        one(&mut fr, &rw(RwOp::Write, 1, 40, vec![full(p[0].1)])),
        (1, 1, RSP_OKAY)
    );
    assert!(file_is(&path, 40, 0x5c));
    assert_eq!(g.busy(p[0].1), 0);
    // A read into it still fails (it needs write access).
    assert_eq!(
        one(&mut fr, &rw(RwOp::Read, 2, 40, vec![full(p[0].1)])).2,
        RSP_ERROR
    );
}

#[test]
fn xenbus_persistent_grants_offered_with_disk_flag_and_used_when_frontend_agrees() {
    let t = TmpDir::new("pgntbus");
    let img = t.image("a.img", SECTORS);
    let mut bus = Bus::new(&[format!(
        "vdev=xvda,persistent-grants,target={}",
        img.display()
    )]);
    let mut rings = bus.talk(51712, 0, 1, Abi::X86_64);
    assert_eq!(bus.be_state(51712), "4");
    let be = bus.be(51712);
    assert_eq!(bus.read(&format!("{be}/feature-persistent")), "1");
    let g = bus.g.clone();
    let pg = data_pages(&g, 1, false);
    assert_eq!(
        one(&mut rings[0], &rw(RwOp::Read, 1, 8, vec![full(pg[0].1)])).2,
        RSP_OKAY
    );
    assert_ne!(g.busy(pg[0].1), 0, "kept mapped (feature-persistent)");
    // Closing gives it back.
    bus.set_fe_state(51712, 5);
    bus.set_fe_state(51712, 6);
    assert_eq!(bus.be_state(51712), "6");
    assert_eq!(g.busy(pg[0].1), 0);
    assert!(g.revoke(pg[0].1));
}

#[test]
fn blkback_qcow2_moves_allocated_clusters_zero_copy_reads_backing_and_zeros_and_allocates_through_imago(
) {
    let name = "blkback_qcow2_moves_allocated_clusters_zero_copy_reads_backing_and_zeros_and_allocates_through_imago";
    if !qemu_img(name) {
        return;
    }
    let t = TmpDir::new("qcow2zc");
    let (top, mut expect) = qcow2_over_backing(&t);
    let d = qdisk(&top, false);
    let g = Guest::new();
    let (mut fr, th) = connect(&g, d.clone(), 1, Abi::X86_64);
    let stats = || d.qcow2_stats().unwrap();
    let stats = &stats;
    // Reads go through the queue's io_uring batch where the host has one.
    let uring = params().uring != UringUse::Off && gpc::FileRing::new(&g.map, 1).is_ok();
    let batched = |n: u64| if uring { n } else { 0 };
    // Writes to allocated clusters too with `XENKVM_BLK_URING=1`.
    let write_batched = |n: u64| {
        if uring && params().uring == UringUse::All {
            n
        } else {
            0
        }
    };
    // Nothing in the top image yet: the read comes from the backing file's
    // clusters, straight into guest RAM.
    let (st, got) = seg_io(&g, &mut fr, RwOp::Read, 1, 100, &[(0, 7), (0, 7)], None);
    assert_eq!(st, RSP_OKAY);
    assert!(got == expect[100 * 512..116 * 512], "backing data");
    assert_eq!(stats().direct, 16 * 512, "{:?}", stats());
    assert_eq!(stats().batched, batched(16 * 512), "{:?}", stats());
    assert_eq!(stats().bounced, 0);
    // 3 sectors inside a cluster the top image lacks: imago allocates it
    // (copying the rest of the cluster from the backing file).
    let data: Vec<u8> = (0..3 * 512).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    let (st, _) = seg_io(&g, &mut fr, RwOp::Write, 2, 201, &[(1, 3)], Some(&data));
    assert_eq!(st, RSP_OKAY);
    expect[201 * 512..204 * 512].copy_from_slice(&data);
    assert_eq!(stats().bounced, 3 * 512, "allocation goes through imago");
    // The cluster is now the top image's own: an overwrite goes in place.
    let data2: Vec<u8> = (0..512).map(|i| (i % 13) as u8).collect();
    let (st, _) = seg_io(&g, &mut fr, RwOp::Write, 3, 206, &[(6, 6)], Some(&data2));
    assert_eq!(st, RSP_OKAY);
    expect[206 * 512..207 * 512].copy_from_slice(&data2);
    assert_eq!(stats().bounced, 3 * 512, "{:?}", stats());
    assert_eq!(stats().direct, 17 * 512);
    // Read the cluster back, and the one before (still the backing file's):
    // one group, two files' pieces in one batch.
    let (st, got) = seg_io(&g, &mut fr, RwOp::Read, 4, 192, &[(0, 7), (0, 7)], None);
    assert_eq!(st, RSP_OKAY);
    assert!(got == expect[192 * 512..208 * 512], "read back");
    assert_eq!(
        stats().batched,
        batched(32 * 512) + write_batched(512),
        "{:?}",
        stats()
    );
    th.stop();
    drop(fr);
    // The last reference: imago writes its cached tables back on close.
    drop(d);
    let out = run_qemu_img(&["check", top.to_str().unwrap()]);
    assert!(out.contains("No errors"), "{out}");
    let raw = t.0.join("top.raw");
    run_qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let back = std::fs::read(&raw).unwrap();
    assert_eq!(
        back.iter().zip(&expect).position(|(a, b)| a != b),
        None,
        "qemu-img sees backing data and both writes"
    );
    // A blank image (no backing file): unallocated clusters read as zeros,
    // written into the guest's pages over what was there.
    let blank = t.0.join("blank.qcow2");
    run_qemu_img(&["create", "-f", "qcow2", blank.to_str().unwrap(), "1M"]);
    let d = qdisk(&blank, true);
    let (mut fr, _th) = connect(&g, d.clone(), 1, Abi::X86_64);
    let pg = data_pages(&g, 1, false);
    g.write_mem(pg[0].0 * 4096, &[0xee; 4096]);
    let (_, _, st) = one(&mut fr, &rw(RwOp::Read, 5, 8, vec![full(pg[0].1)]));
    assert_eq!(st, RSP_OKAY);
    let mut b = vec![1u8; 4096];
    g.read_mem(pg[0].0 * 4096, &mut b);
    assert!(b.iter().all(|&x| x == 0), "zeros over the old contents");
    assert_eq!(d.qcow2_stats().unwrap().zeroed, 4096);
}
