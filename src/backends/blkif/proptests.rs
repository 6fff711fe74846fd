//! Property tests of the ring and request parsers. Two layers per parser:
//! proptest strategies (shrinking; `PROPTEST_CASES` sets their count) and a
//! seeded loop over random inputs, `XENKVM_BLKIF_CASES` cases each
//! (default 1,000,000; `XENKVM_BLKIF_SEED` picks the seed), so the million
//! cases of the acceptance run in every `cargo test`:
//! `cargo test --lib blkif::proptests -- --nocapture` prints the counts.

use proptest::prelude::*;

use super::request::*;
use super::ring::*;

fn cases() -> u64 {
    std::env::var("XENKVM_BLKIF_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

fn seed() -> u64 {
    std::env::var("XENKVM_BLKIF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15)
}

/// xorshift64*: enough randomness for a parser loop, no allocation.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What must hold for any parse result of `raw`.
fn check_parse(abi: Abi, raw: &[u8], max_ind: usize) {
    // The allocation-free form gives the same result whatever its spare
    // list held, and keeps the list when it does not use it.
    let mut spare = vec![Segment::decode(&[0xff; 8]); 3];
    let reused = parse_request_reusing(abi, raw, max_ind, &mut spare);
    assert_eq!(reused, parse_request(abi, raw, max_ind));
    if !matches!(reused, Ok(Request::Rw { .. })) {
        assert!(spare.capacity() >= 3, "spare list dropped");
    }
    match parse_request(abi, raw, max_ind) {
        Ok(r) => {
            match &r {
                Request::Rw { op, segs, .. } => {
                    assert!(segs.len() <= MAX_SEGMENTS);
                    assert!(segs.iter().all(Segment::valid));
                    assert!(!segs.is_empty() || matches!(op, RwOp::Flush | RwOp::Barrier));
                }
                Request::Indirect {
                    nr_segments,
                    pages,
                    op,
                    ..
                } => {
                    assert!(*nr_segments >= 1 && usize::from(*nr_segments) <= max_ind);
                    assert_eq!(pages.len(), usize::from(*nr_segments).div_ceil(512));
                    assert!(pages.len() <= MAX_INDIRECT_PAGES);
                    assert!(matches!(op, RwOp::Read | RwOp::Write));
                }
                Request::Discard { .. } => {}
            }
            // What parsed re-encodes to something that parses the same.
            let mut b = vec![0u8; abi.slot()];
            r.encode(abi, &mut b);
            assert_eq!(parse_request(abi, &b, max_ind), Ok(r));
        }
        Err(e) => {
            assert!(e.status == RSP_ERROR || e.status == RSP_EOPNOTSUPP);
            // The request's operation, or for an indirect read or write its
            // inner one (what Linux's blkfront checks).
            let op = raw.first().copied().unwrap_or(0);
            let inner = raw.get(1).copied().unwrap_or(0);
            let want = if op == OP_INDIRECT && (inner == OP_READ || inner == OP_WRITE) {
                inner
            } else {
                op
            };
            assert_eq!(e.operation, want);
        }
    }
}

/// A frontend that may lie, a backend that consumes and answers: the
/// backend never has more outstanding than the ring, never consumes past a
/// producer it accepted, and reports inconsistent indexes instead of looping.
fn ring_round(rng: &mut Rng) {
    let pages = 1usize << rng.below(5);
    let abi = if rng.below(2) == 0 {
        Abi::X86_64
    } else {
        Abi::X86_32
    };
    let ring = VecRing::new(pages);
    let start = rng.next() as u32;
    let mut back = BackRing::new(pages * PAGE, abi.slot(), start).expect("fits");
    let size = back.size;
    assert_eq!(
        size as usize,
        ring_entries(pages * PAGE, abi.slot()) as usize
    );
    let mut prod = start;
    let mut out = Vec::new();
    for _ in 0..8 {
        match rng.below(4) {
            // An honest frontend queues what fits.
            0 => {
                let room = size - prod.wrapping_sub(back.rsp_prod_pvt).min(size);
                prod = prod.wrapping_add(rng.below(u64::from(room) + 1) as u32);
            }
            // A lying one writes anything.
            1 => prod = rng.next() as u32,
            // Garbage in a slot.
            2 => {
                let off = rng.below((pages * PAGE) as u64) as usize;
                ring.write(off, &rng.next().to_le_bytes());
            }
            _ => {}
        }
        ring.store_u32(REQ_PROD, prod);
        out.clear();
        let before = back;
        match back.take_requests(&ring, rng.below(64) as usize + 1, &mut out) {
            Ok(n) => {
                assert_eq!(n, out.len());
                assert!(back.req_cons.wrapping_sub(back.rsp_prod_pvt) <= size);
                assert!(prod.wrapping_sub(back.req_cons) <= size);
                for raw in &out {
                    check_parse(abi, &raw[..abi.slot()], MAX_INDIRECT_SEGMENTS);
                }
            }
            Err(RingError::Overflow { .. }) => {
                assert_eq!(back, before, "nothing consumed on a bad index");
                let ahead = prod.wrapping_sub(back.rsp_prod_pvt);
                assert!(ahead > size || ahead < back.req_cons.wrapping_sub(back.rsp_prod_pvt));
                prod = back.req_cons;
            }
        }
        // Answer some of what is outstanding.
        let outstanding = back.req_cons.wrapping_sub(back.rsp_prod_pvt);
        for _ in 0..rng.below(u64::from(outstanding) + 1) {
            let (b, n) = encode_response(abi, rng.next(), 0, 0);
            back.put_response(&ring, &b[..n]);
        }
        ring.store_u32(RSP_EVENT, rng.next() as u32);
        let old = ring.load_u32(RSP_PROD);
        let ev = ring.load_u32(RSP_EVENT);
        let notify = back.push_responses(&ring);
        assert_eq!(notify, push_notify(old, back.rsp_prod_pvt, ev));
        assert_eq!(ring.load_u32(RSP_PROD), back.rsp_prod_pvt);
    }
}

#[test]
fn blkif_request_parser_million_random_inputs_never_panic() {
    let mut rng = Rng(seed());
    let n = cases();
    let mut raw = [0u8; 112];
    for k in 0..n {
        for c in raw.chunks_mut(8) {
            let v = rng.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        // Bias towards the known operations and sane counts half the time.
        if k % 2 == 0 {
            raw[0] = (rng.below(8)) as u8;
            raw[1] = rng.below(13) as u8;
            if raw[0] == OP_INDIRECT {
                raw[1] = rng.below(2) as u8;
                raw[2..4].copy_from_slice(&(rng.below(300) as u16).to_le_bytes());
            }
            for s in 0..MAX_SEGMENTS {
                for base in [24, 20] {
                    raw[base + s * 8 + 4] = rng.below(9) as u8;
                    raw[base + s * 8 + 5] = rng.below(9) as u8;
                }
            }
        }
        let abi = if k % 3 == 0 { Abi::X86_32 } else { Abi::X86_64 };
        check_parse(abi, &raw[..abi.slot()], [0, 11, 256][(k % 3) as usize]);
    }
    println!("blkif request parser: {n} seeded cases");
}

#[test]
fn blkif_ring_million_random_rounds_stay_bounded() {
    let mut rng = Rng(seed() ^ 0x5555);
    // Each round is 8 steps; a million cases = a million ring steps.
    let n = cases().div_ceil(8);
    for _ in 0..n {
        ring_round(&mut rng);
    }
    println!("blkif ring: {} seeded steps ({n} rounds of 8)", n * 8);
}

fn seg() -> impl Strategy<Value = Segment> {
    (any::<u32>(), 0u8..8)
        .prop_flat_map(|(g, f)| (Just(g), Just(f), f..8))
        .prop_map(|(gref, first_sect, last_sect)| Segment {
            gref,
            first_sect,
            last_sect,
        })
}

fn request() -> impl Strategy<Value = Request> {
    let rw = (
        prop_oneof![
            Just(RwOp::Read),
            Just(RwOp::Write),
            Just(RwOp::Flush),
            Just(RwOp::Barrier)
        ],
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(seg(), 1..=MAX_SEGMENTS),
    )
        .prop_map(|(op, handle, id, sector, segs)| Request::Rw {
            op,
            handle,
            id,
            sector,
            segs,
        });
    let discard = (
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(handle, id, sector, nr_sectors, secure)| Request::Discard {
                handle,
                id,
                sector,
                nr_sectors,
                secure,
            },
        );
    let ind = (
        prop_oneof![Just(RwOp::Read), Just(RwOp::Write)],
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        1u16..=256,
        proptest::collection::vec(any::<u32>(), 1),
    )
        .prop_map(
            |(op, handle, id, sector, nr_segments, pages)| Request::Indirect {
                op,
                handle,
                id,
                sector,
                nr_segments,
                pages,
            },
        );
    prop_oneof![rw, discard, ind]
}

proptest! {
    #[test]
    fn blkif_valid_request_roundtrips_both_abis(r in request(), abi32 in any::<bool>()) {
        let abi = if abi32 { Abi::X86_32 } else { Abi::X86_64 };
        let mut b = vec![0u8; abi.slot()];
        r.encode(abi, &mut b);
        prop_assert_eq!(parse_request(abi, &b, MAX_INDIRECT_SEGMENTS), Ok(r));
    }

    #[test]
    fn blkif_arbitrary_bytes_parse_consistently(raw in proptest::collection::vec(any::<u8>(), 112), abi32 in any::<bool>()) {
        let abi = if abi32 { Abi::X86_32 } else { Abi::X86_64 };
        check_parse(abi, &raw[..abi.slot()], MAX_INDIRECT_SEGMENTS);
    }

    #[test]
    fn blkif_ring_rounds_with_any_seed_stay_bounded(s in any::<u64>()) {
        ring_round(&mut Rng(s | 1));
    }

    #[test]
    fn blkif_indirect_page_segments_checked(page in proptest::collection::vec(any::<u8>(), 4096), n in 0usize..600) {
        let mut out = Vec::new();
        match parse_indirect_segments(&page, n, &mut out) {
            Ok(()) => prop_assert_eq!(out.len(), n.min(512)),
            Err(_) => prop_assert!(out.len() < n.min(512)),
        }
        prop_assert!(out.iter().all(Segment::valid));
    }
}
