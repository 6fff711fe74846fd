//! Cache and memory-map behaviour: ranges at page ends, across regions, in
//! pieces; overlays and balloon under live caches; dirty log; refusals.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use event_listener::Listener;
use gpc::{Cache, Error, Gfn, GuestAddress, MemoryMap, OverlayPage, Segment, PAGE_SIZE};
use vm_memory::{Bytes, GuestMemoryBackend};

const PS: u64 = PAGE_SIZE as u64;

/// Two adjacent regions [0, 16 pages) and [16, 32 pages), then a hole, then
/// [64, 72 pages).
fn map() -> MemoryMap {
    MemoryMap::new(&[
        (GuestAddress(0), 16 * PS),
        (GuestAddress(16 * PS), 16 * PS),
        (GuestAddress(64 * PS), 8 * PS),
    ])
    .expect("memory map")
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1)
        .collect()
}

fn read_gpa(m: &MemoryMap, gpa: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    m.guest_memory()
        .read_slice(&mut v, GuestAddress(gpa))
        .expect("read gpa");
    v
}

/// Writes a pattern through a cache over `segs`, checks it lands at each
/// piece's guest address, and that the canary bytes right after each piece
/// stay untouched.
fn roundtrip(m: &MemoryMap, segs: &[Segment]) {
    for s in segs {
        m.guest_memory()
            .write_slice(&[0xCC; 1], GuestAddress(s.gpa.0 + s.len as u64))
            .ok();
    }
    let c = Cache::new(m);
    c.activate(segs).expect("activate");
    let total: usize = segs.iter().map(|s| s.len).sum();
    let data = pattern(total, 3);
    {
        let g = c.guard().expect("valid after activate");
        assert_eq!(g.len(), total);
        g.write(0, &data).expect("write");
        let mut back = vec![0u8; total];
        g.read(0, &mut back).expect("read");
        assert_eq!(back, data);
        assert!(matches!(
            g.write(total - 1, &[0, 0]),
            Err(Error::OutOfBounds { .. })
        ));
    }
    let mut at = 0;
    for s in segs {
        assert_eq!(
            read_gpa(m, s.gpa.0, s.len),
            data[at..at + s.len],
            "piece at {:#x}",
            s.gpa.0
        );
        at += s.len;
        let after = s.gpa.0 + s.len as u64;
        if m.guest_memory().address_in_range(GuestAddress(after)) {
            assert_eq!(read_gpa(m, after, 1), [0xCC], "canary after {:#x}", s.gpa.0);
        }
    }
}

#[test]
fn map_new_overlapping_regions_refused() {
    let r = MemoryMap::new(&[(GuestAddress(0), 4 * PS), (GuestAddress(2 * PS), 4 * PS)]);
    assert!(matches!(r, Err(Error::BadRegion { .. })));
    let r = MemoryMap::new(&[(GuestAddress(100), 4 * PS)]);
    assert!(matches!(r, Err(Error::BadRegion { .. })));
}

#[test]
fn map_ram_regions_match_guest_memory() {
    let m = map();
    let rr = m.ram_regions();
    assert_eq!(rr.len(), 3);
    for (r, g) in rr.iter().zip(m.guest_memory().iter()) {
        use vm_memory::GuestMemoryRegion;
        assert_eq!(r.guest_base, g.start_addr());
        assert_eq!(r.size, g.len());
        assert_eq!(r.host_addr, g.as_ptr() as u64);
    }
}

#[test]
fn cache_page_end_minus_15_roundtrip_exact() {
    let m = map();
    roundtrip(&m, &[Segment::new(GuestAddress(3 * PS - 15), 48)]);
}

#[test]
fn cache_across_two_regions_roundtrip_exact() {
    let m = map();
    roundtrip(&m, &[Segment::new(GuestAddress(16 * PS - 15), 48)]);
}

#[test]
fn cache_multi_piece_roundtrip_exact() {
    let m = map();
    // The two frames of a guest-virtual area: page end - 15, then another
    // region's frame start.
    roundtrip(
        &m,
        &[
            Segment::new(GuestAddress(5 * PS - 15), 15),
            Segment::new(GuestAddress(65 * PS), 33),
        ],
    );
}

#[test]
fn cache_multi_page_single_region_roundtrip_exact() {
    let m = map();
    roundtrip(&m, &[Segment::new(GuestAddress(PS + 100), 3 * PAGE_SIZE)]);
}

#[test]
fn cache_unaligned_inner_boundary_refused() {
    let m = map();
    let c = Cache::new(&m);
    let r = c.activate(&[
        Segment::new(GuestAddress(100), 15),
        Segment::new(GuestAddress(PS), 8),
    ]);
    assert!(matches!(r, Err(Error::UnalignedPiece { index: 0 })));
    assert!(!c.is_active());
}

#[test]
fn cache_not_ram_refused() {
    let m = map();
    let c = Cache::new(&m);
    let r = c.activate_range(GuestAddress(40 * PS), 8);
    assert!(matches!(r, Err(Error::NotMemfdBacked { gpa }) if gpa == 40 * PS));
    // Straddling from RAM into the hole.
    let r = c.activate_range(GuestAddress(32 * PS - 8), 16);
    assert!(matches!(r, Err(Error::NotMemfdBacked { gpa }) if gpa == 32 * PS));
    assert!(!c.check());
}

#[test]
fn cache_too_long_refused() {
    let m = map();
    let c = Cache::new(&m);
    let r = c.activate_range(GuestAddress(0), (gpc::MAX_CACHE_PAGES + 1) * PAGE_SIZE);
    assert!(matches!(r, Err(Error::BadLength { .. })));
    let r = c.activate_range(GuestAddress(u64::MAX - 3), 8);
    assert!(matches!(r, Err(Error::BadLength { .. })));
}

#[test]
fn guard_atomics_misaligned_refused_aligned_work() {
    let m = map();
    let c = Cache::new(&m);
    c.activate_range(GuestAddress(2 * PS - 8), 16).unwrap();
    let g = c.guard().unwrap();
    g.store_u64(0, 5, Ordering::Relaxed).unwrap();
    assert_eq!(g.fetch_or_u64(0, 2, Ordering::AcqRel).unwrap(), 5);
    assert_eq!(g.fetch_and_u64(0, 6, Ordering::AcqRel).unwrap(), 7);
    assert_eq!(
        g.compare_exchange_u64(0, 6, 9, Ordering::AcqRel, Ordering::Acquire)
            .unwrap(),
        Ok(6)
    );
    assert_eq!(g.load_u64(0, Ordering::Acquire).unwrap(), 9);
    g.store_u32(12, 0xdead, Ordering::Release).unwrap();
    assert_eq!(g.load_u32(12, Ordering::Acquire).unwrap(), 0xdead);
    assert!(matches!(
        g.load_u64(4, Ordering::Relaxed),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        g.load_u32(2, Ordering::Relaxed),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        g.load_u64(16, Ordering::Relaxed),
        Err(Error::OutOfBounds { .. })
    ));
    drop(g);
    let mut b = [0u8; 8];
    m.guest_memory()
        .read_slice(&mut b, GuestAddress(2 * PS - 8))
        .unwrap();
    assert_eq!(u64::from_le_bytes(b), 9);
}

#[test]
fn guard_held_refresh_refused() {
    let m = map();
    let c = Cache::new(&m);
    let d = Cache::new(&m);
    c.activate_range(GuestAddress(0), 8).unwrap();
    d.activate_range(GuestAddress(PS), 8).unwrap();
    let g = c.guard().unwrap();
    assert!(matches!(d.refresh(), Err(Error::GuardHeld)));
    assert!(matches!(
        m.place_overlay(Gfn(3), &OverlayPage::new().unwrap()),
        Err(Error::GuardHeld)
    ));
    assert!(matches!(m.take_dirty(), Err(Error::GuardHeld)));
    drop(g);
    assert!(d.refresh().is_ok());
}

/// Overlay placed over a cached page: the cache becomes invalid, refreshes to
/// the overlay, never writes the RAM page underneath; removal brings RAM back.
fn overlay_under_cache(segs: &[Segment], overlay_gfn: u64, overlay_off_in_range: usize) {
    let m = map();
    let c = Cache::new(&m);
    c.activate(segs).unwrap();
    let len: usize = segs.iter().map(|s| s.len).sum();
    c.guard().unwrap().write(0, &vec![0x11; len]).unwrap();
    let listener = c.listen_invalidated();
    let gen0 = m.generation();
    let page = OverlayPage::new().unwrap();
    m.place_overlay(Gfn(overlay_gfn), &page).unwrap();
    assert!(m.generation() > gen0);
    assert!(
        !c.check(),
        "covering cache must be invalid after the overlay is placed"
    );
    assert!(
        listener
            .wait_timeout(std::time::Duration::from_secs(1))
            .is_some(),
        "cache not told"
    );
    c.refresh().unwrap();
    c.guard().unwrap().write(0, &vec![0x22; len]).unwrap();
    // The overlay page received the bytes of the range that fall in its frame.
    let gpa = segs[0].gpa.0 + overlay_off_in_range as u64;
    assert_eq!(gpa >> 12, overlay_gfn);
    let page_off = (gpa % PS) as usize;
    let mut b = [0u8; 1];
    page.read(page_off, &mut b).unwrap();
    assert_eq!(b, [0x22]);
    // The RAM page underneath still has the old bytes.
    let ri = m.ram_regions().iter().position(|r| {
        (overlay_gfn << 12) >= r.guest_base.0 && (overlay_gfn << 12) < r.guest_base.0 + r.size
    });
    let r = m.ram_regions()[ri.unwrap()];
    let mut under = [0u8; 1];
    m.ram_file(ri.unwrap())
        .unwrap()
        .read_exact_at(
            &mut under,
            (overlay_gfn << 12) - r.guest_base.0 + page_off as u64,
        )
        .unwrap();
    assert_eq!(under, [0x11], "stale RAM page was written");
    // Remove: the RAM page comes back with its old contents, the cache refreshes to it.
    let back = m.remove_overlay(Gfn(overlay_gfn)).unwrap();
    assert_eq!(back, page);
    assert!(!c.check());
    assert_eq!(
        read_gpa(&m, (overlay_gfn << 12) + page_off as u64, 1),
        [0x11]
    );
    let g = c.access().unwrap();
    let mut all = vec![0u8; len];
    g.read(0, &mut all).unwrap();
    assert_eq!(all[overlay_off_in_range], 0x11);
}

#[test]
fn overlay_placed_over_direct_cache_refreshes_to_overlay() {
    overlay_under_cache(&[Segment::new(GuestAddress(3 * PS - 15), 48)], 3, 20);
}

#[test]
fn overlay_placed_over_window_cache_refreshes_to_overlay() {
    overlay_under_cache(&[Segment::new(GuestAddress(16 * PS - 15), 48)], 16, 20);
}

#[test]
fn overlay_elsewhere_leaves_cache_valid() {
    let m = map();
    let c = Cache::new(&m);
    c.activate_range(GuestAddress(3 * PS - 15), 48).unwrap();
    m.place_overlay(Gfn(9), &OverlayPage::new().unwrap())
        .unwrap();
    assert!(c.check());
    assert!(matches!(
        m.place_overlay(Gfn(9), &OverlayPage::new().unwrap()),
        Err(Error::OverlayExists(9))
    ));
    assert!(matches!(m.remove_overlay(Gfn(8)), Err(Error::NoOverlay(8))));
    assert!(matches!(
        m.place_overlay(Gfn(40), &OverlayPage::new().unwrap()),
        Err(Error::NotMemfdBacked { .. })
    ));
}

#[test]
fn overlay_page_visible_through_guest_memory() {
    let m = map();
    let p = OverlayPage::new().unwrap();
    p.store_u64(8, 0x1234_5678, Ordering::Release).unwrap();
    m.place_overlay(Gfn(70), &p).unwrap();
    let mut b = [0u8; 8];
    m.guest_memory()
        .read_slice(&mut b, GuestAddress(70 * PS + 8))
        .unwrap();
    assert_eq!(u64::from_le_bytes(b), 0x1234_5678);
    m.guest_memory()
        .write_slice(&[9], GuestAddress(70 * PS))
        .unwrap();
    assert_eq!(p.load_u8(0, Ordering::Acquire).unwrap(), 9);
}

#[test]
fn dirty_log_records_guard_and_bytes_writes() {
    let m = map();
    m.take_dirty().unwrap();
    let c = Cache::new(&m);
    c.activate_range(GuestAddress(16 * PS - 15), 48).unwrap();
    {
        let g = c.guard().unwrap();
        g.store_u8(0, 1, Ordering::Relaxed).unwrap();
    }
    assert_eq!(m.dirty_pages(), vec![Gfn(15)]);
    {
        let g = c.guard().unwrap();
        g.write(20, &[1, 2]).unwrap();
        let mut b = [0u8; 4];
        g.read(0, &mut b).unwrap(); // reads do not dirty
    }
    m.guest_memory()
        .write_slice(&[1], GuestAddress(66 * PS))
        .unwrap();
    let mut d = m.take_dirty().unwrap();
    d.sort();
    assert_eq!(d, vec![Gfn(15), Gfn(16), Gfn(66)]);
    assert!(m.take_dirty().unwrap().is_empty());
}

#[test]
fn balloon_out_zeroes_pages_and_invalidates_cache() {
    let m = map();
    let c = Cache::new(&m);
    c.activate_range(GuestAddress(4 * PS + 8), 8).unwrap();
    c.guard()
        .unwrap()
        .store_u64(0, 77, Ordering::Relaxed)
        .unwrap();
    m.guest_memory()
        .write_slice(&[5], GuestAddress(6 * PS))
        .unwrap();
    m.balloon_out(Gfn(4), 2).unwrap();
    assert!(!c.check());
    assert_eq!(read_gpa(&m, 4 * PS + 8, 8), [0; 8]);
    assert_eq!(read_gpa(&m, 6 * PS, 1), [5]);
    let g = c.access().unwrap();
    assert_eq!(g.load_u64(0, Ordering::Relaxed).unwrap(), 0);
    drop(g);
    assert!(matches!(
        m.balloon_out(Gfn(30), 4),
        Err(Error::NotMemfdBacked { .. })
    ));
}

#[test]
fn pinned_cache_stays_usable_across_overlay() {
    let m = map();
    let c = Cache::new(&m);
    c.activate_range(GuestAddress(2 * PS - 4), 8).unwrap();
    match c.pin() {
        Ok(()) => {}
        Err(Error::Os { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
            eprintln!("skipping: mlock not permitted here");
            return;
        }
        Err(e) => panic!("pin: {e}"),
    }
    c.guard().unwrap().write(0, &[1; 8]).unwrap();
    assert_eq!(read_gpa(&m, 2 * PS - 4, 8), [1; 8]);
    let p = OverlayPage::new().unwrap();
    m.place_overlay(Gfn(1), &p).unwrap();
    c.access().unwrap().write(0, &[2; 8]).unwrap();
    assert_eq!(p.read_array::<4>(PAGE_SIZE - 4).unwrap(), [2; 4]);
    assert_eq!(read_gpa(&m, 2 * PS, 4), [2; 4]);
}

#[test]
fn deactivated_cache_check_fails() {
    let m = map();
    let c = Cache::new(&m);
    c.activate_range(GuestAddress(0), 8).unwrap();
    assert!(c.check());
    c.deactivate().unwrap();
    assert!(!c.check());
    assert!(matches!(c.refresh(), Err(Error::Inactive)));
    assert!(matches!(c.access(), Err(Error::Inactive)));
}

/// One thread writes a counter through caches it keeps activating,
/// refreshing and deactivating; another places and removes an overlay on the
/// same frame. While the overlay is placed, the RAM page underneath must never
/// receive a write that started after the placement.
#[test]
fn race_activate_refresh_vs_overlay_never_writes_stale_page() {
    let m = map();
    let gfn = 17u64; // region 1, page 1: window and direct caches both cover it
    let counter = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (m, counter, stop) = (m.clone(), counter.clone(), stop.clone());
        std::thread::spawn(move || {
            let direct = Cache::new(&m);
            let window = Cache::new(&m);
            let mut i = 0u64;
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                if i % 64 == 0 {
                    direct.deactivate().unwrap();
                }
                if i % 97 == 0 {
                    window.deactivate().unwrap();
                }
                if !direct.is_active() {
                    direct.activate_range(GuestAddress(gfn * PS), 8).unwrap();
                }
                if !window.is_active() {
                    // Multi-piece: gfn's first 8 bytes (offset 8) and a frame in region 0.
                    window
                        .activate(&[
                            Segment::new(GuestAddress(2 * PS), PAGE_SIZE),
                            Segment::new(GuestAddress(gfn * PS), 16),
                        ])
                        .unwrap();
                }
                for (c, off) in [(&direct, 0usize), (&window, PAGE_SIZE + 8)] {
                    let g = c.access().unwrap();
                    let v = counter.fetch_add(1, Ordering::SeqCst);
                    g.store_u64(off, v, Ordering::Release).unwrap();
                    writes += 1;
                }
            }
            writes
        })
    };
    let ri = 1usize;
    let file_off = (gfn - 16) * PS;
    let mut rounds = 0;
    let mut overlay_hits = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
    // At least 11 placements however slow the host (each waits for the
    // membarrier: a run beside two Linux boots managed 5 in 1.5 s).
    while std::time::Instant::now() < deadline || rounds <= 10 {
        let page = OverlayPage::new().unwrap();
        m.place_overlay(Gfn(gfn), &page).unwrap();
        let placed_at = counter.load(Ordering::SeqCst);
        for _ in 0..50 {
            let mut b = [0u8; 16];
            m.ram_file(ri)
                .unwrap()
                .read_exact_at(&mut b, file_off)
                .unwrap();
            let a = u64::from_le_bytes(b[0..8].try_into().unwrap());
            let w = u64::from_le_bytes(b[8..16].try_into().unwrap());
            assert!(
                a < placed_at && w < placed_at,
                "RAM page under overlay written: {a} {w} >= {placed_at}"
            );
            std::thread::yield_now();
        }
        if page.load_u64(0, Ordering::Acquire).unwrap() >= placed_at
            || page.load_u64(8, Ordering::Acquire).unwrap() >= placed_at
        {
            overlay_hits += 1;
        }
        m.remove_overlay(Gfn(gfn)).unwrap();
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(
        rounds > 10 && writes > 100,
        "too little happened: {rounds} rounds, {writes} writes"
    );
    assert!(
        overlay_hits > 0,
        "writes never reached the overlay ({rounds} rounds)"
    );
}

/// An overlay that is a page of some other file at an offset (a BPF map's
/// page, say): the guest range over it and the file's page are one page,
/// both ways, in a cache that spans it and the RAM page after it.
#[test]
fn overlay_from_file_offset_is_the_files_page() {
    use std::io::Write;
    let m = map();
    let mut f = tempfile_memfd(3 * PAGE_SIZE);
    f.write_all(&vec![0x33; 3 * PAGE_SIZE]).unwrap();
    let page = OverlayPage::from_file(f.try_clone().unwrap(), 2 * PS).unwrap();
    assert!(OverlayPage::from_file(f.try_clone().unwrap(), 100).is_err());
    m.place_overlay(Gfn(7), &page).unwrap();
    // The file's page 2 shows through at gfn 7; RAM after it is RAM.
    assert_eq!(read_gpa(&m, 7 * PS + 4090, 6), vec![0x33; 6]);
    let c = Cache::new(&m);
    c.activate(&[Segment::new(GuestAddress(7 * PS + 4088), 16)])
        .unwrap();
    c.guard().unwrap().write(0, &[0x44; 16]).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 2 * PS + 4088).unwrap();
    assert_eq!(b, [0x44; 8], "the write went to the file's page");
    f.read_exact_at(&mut b, PS + 4088).unwrap();
    assert_eq!(b, [0x33; 8], "not to another of its pages");
    assert_eq!(read_gpa(&m, 8 * PS, 8), vec![0x44; 8]);
    // The file written from elsewhere: the guest reads it.
    f.write_all_at(&[0x55; 4], 2 * PS + 16).unwrap();
    assert_eq!(read_gpa(&m, 7 * PS + 16, 4), vec![0x55; 4]);
}

/// A memfd of `len` bytes (a file shared with the test, as a BPF map is).
fn tempfile_memfd(len: usize) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name; the fd returned is ours.
    let fd = unsafe { libc::memfd_create(c"overlay-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len as u64).unwrap();
    f
}

/// Placing an overlay that keeps the page: what the guest had in the RAM
/// page is in the overlay afterwards; a plain placement shows the overlay's
/// own bytes.
#[test]
fn overlay_placed_copying_keeps_the_pages_bytes() {
    let m = map();
    m.guest_memory()
        .write_slice(&pattern(PAGE_SIZE, 9), GuestAddress(5 * PS))
        .unwrap();
    let f = tempfile_memfd(2 * PAGE_SIZE);
    let page = OverlayPage::from_file(f.try_clone().unwrap(), PS).unwrap();
    m.place_overlay_copying(Gfn(5), &page).unwrap();
    assert_eq!(read_gpa(&m, 5 * PS, PAGE_SIZE), pattern(PAGE_SIZE, 9));
    let mut b = vec![0u8; PAGE_SIZE];
    f.read_exact_at(&mut b, PS).unwrap();
    assert_eq!(b, pattern(PAGE_SIZE, 9), "copied into the file's page");
    let other = OverlayPage::from_file(f, 0).unwrap();
    m.place_overlay(Gfn(6), &other).unwrap();
    assert_eq!(read_gpa(&m, 6 * PS, 8), vec![0; 8]);
}
