//! Property tests of the netif parsers and builders. Two layers: proptest
//! strategies (shrinking; `PROPTEST_CASES` sets their count) and seeded
//! loops over random inputs, `XENKVM_NETIF_CASES` cases each (default
//! 1,000,000; `XENKVM_NETIF_SEED` picks the seed), so the million cases run
//! in every `cargo test`: `cargo test --lib netif::proptests -- --nocapture`
//! prints the counts.

use proptest::prelude::*;

use super::frame::*;
use super::wire::*;

fn cases() -> u64 {
    std::env::var("XENKVM_NETIF_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

fn seed() -> u64 {
    std::env::var("XENKVM_NETIF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x2545_f491_4f6c_dd1d)
}

/// xorshift64*.
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
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// What must hold for any slot bytes: every parser answers, and what
/// parsed re-encodes to the same bytes (tx/rx requests and responses have
/// no padding the encoder drops except rx request's pad).
fn check_slot(b: &[u8; TX_SLOT]) {
    let t = TxRequest::parse(b).expect("a whole slot parses");
    assert_eq!(&t.encode(), b);
    match Extra::parse(b) {
        Ok((e, more)) => {
            assert_eq!(more, b[1] & EXTRA_FLAG_MORE != 0);
            let back = e.encode(more);
            assert_eq!(Extra::parse(&back), Ok((e, more)));
            assert_eq!(back[0], b[0]);
        }
        Err(_) => assert!(b[0] == EXTRA_NONE || b[0] >= EXTRA_TYPE_MAX),
    }
    let r = RxRequest::parse(&b[..RX_SLOT]).expect("rx request");
    assert_eq!(RxRequest::parse(&r.encode()), Some(r));
    let s = RxResponse::parse(&b[..RX_SLOT]).expect("rx response");
    assert_eq!(&s.encode()[..], &b[..RX_SLOT]);
    let x = TxResponse::parse(&b[..4]).expect("tx response");
    assert_eq!(&x.encode()[..], &b[..4]);
    // Short input is refused, not a panic.
    assert!(TxRequest::parse(&b[..TX_SLOT - 1]).is_none());
    assert!(RxResponse::parse(&b[..RX_SLOT - 1]).is_none());
    assert!(Extra::parse(&b[..3]).is_err());
}

/// What must hold for any gathered packet of `avail` slots.
fn check_gather(avail: &[[u8; TX_SLOT]], max_slots: usize) {
    match TxPacket::gather(avail, max_slots) {
        Ok(Some(p)) => {
            assert!(p.slots >= 1 && p.slots <= avail.len());
            assert_eq!(p.slots, p.frags.len() + p.extras);
            assert!(p.frags.len() <= max_slots);
            assert_eq!(p.lens.iter().sum::<usize>(), p.total);
            assert!(p.total <= MAX_PACKET && p.total >= 14);
            for (r, &l) in p.frags.iter().zip(&p.lens) {
                assert!(usize::from(r.offset) + l <= PAGE);
            }
            assert!(!p.frags.last().expect("a fragment").more_data());
            if let Some((size, kind)) = p.gso {
                assert!(size > 0 && (kind == GSO_TCPV4 || kind == GSO_TCPV6));
            }
        }
        // Incomplete: the chain runs past what is available.
        Ok(None) => {}
        Err(e) => {
            assert!(e.slots >= 1 && e.slots <= avail.len(), "{e:?}");
            assert!(e.extras < e.slots);
        }
    }
}

/// Random slots biased towards plausible packets.
fn random_slots(rng: &mut Rng, out: &mut Vec<[u8; TX_SLOT]>) {
    out.clear();
    let n = rng.below(24) as usize;
    for k in 0..n {
        let mut b = [0u8; TX_SLOT];
        rng.fill(&mut b);
        if rng.below(2) == 0 {
            // Plausible: small flags, sizes within a page.
            let flags = rng.below(16) as u16;
            b[6..8].copy_from_slice(&flags.to_le_bytes());
            b[4..6].copy_from_slice(&(rng.below(4200) as u16).to_le_bytes());
            let size = if k == 0 {
                rng.below(70_000)
            } else {
                rng.below(4200)
            };
            b[10..12].copy_from_slice(&(size as u16).to_le_bytes());
            if k == 1 && rng.below(2) == 0 {
                b[0] = rng.below(6) as u8;
                b[1] = rng.below(2) as u8;
                b[4] = rng.below(3) as u8;
            }
        }
        out.push(b);
    }
}

/// Random frames biased towards Ethernet/IP/TCP/UDP headers.
fn random_frame(rng: &mut Rng, f: &mut Vec<u8>) {
    let len = rng.below(200) as usize;
    f.resize(len, 0);
    rng.fill(f);
    if len >= 14 && rng.below(4) != 0 {
        let et: u16 = [0x0800, 0x86dd, 0x8100, 0x0806][rng.below(4) as usize];
        f[12..14].copy_from_slice(&et.to_be_bytes());
        let l3 = if et == 0x8100 {
            if len >= 18 {
                f[16..18].copy_from_slice(&[0x08, 0x00]);
            }
            18
        } else {
            14
        };
        if len > l3 + 10 {
            f[l3] = if et == 0x86dd { 0x60 } else { 0x45 };
            if et == 0x86dd {
                f[l3 + 6] = [6, 17, 0, 43][rng.below(4) as usize];
            } else {
                f[l3 + 6] = 0;
                f[l3 + 7] = 0;
                f[l3 + 9] = [6, 17, 1][rng.below(3) as usize];
            }
        }
    }
}

fn check_frame(f: &[u8]) {
    if let Some(i) = l4_offsets(f) {
        assert!(i.l4 + i.l4_len <= f.len());
        assert!(i.csum_offset + 2 <= i.l4_len);
        assert!(i.proto == IPPROTO_TCP || i.proto == IPPROTO_UDP);
    }
    let mut c = f.to_vec();
    if checksum_fill(&mut c) {
        assert_eq!(c.len(), f.len());
        assert!(checksum_ok(&c), "a filled checksum verifies");
    } else {
        assert_eq!(c, f, "an unfillable frame is left alone");
    }
}

#[test]
fn netif_slot_parsers_million_random_inputs_roundtrip() {
    let mut rng = Rng(seed());
    let n = cases();
    let mut b = [0u8; TX_SLOT];
    for k in 0..n {
        rng.fill(&mut b);
        if k % 2 == 0 {
            b[0] = rng.below(7) as u8;
            b[1] = rng.below(3) as u8;
        }
        check_slot(&b);
    }
    println!("netif slot parsers: {n} seeded cases");
}

#[test]
fn netif_tx_packet_gather_million_random_inputs_bounded() {
    let mut rng = Rng(seed() ^ 0xabcd);
    let n = cases();
    let mut slots = Vec::new();
    for k in 0..n {
        random_slots(&mut rng, &mut slots);
        check_gather(&slots, [1, 18, 64][(k % 3) as usize]);
    }
    println!("netif tx packet gather: {n} seeded cases");
}

#[test]
fn netif_frame_headers_million_random_frames_never_panic() {
    let mut rng = Rng(seed() ^ 0x1234);
    let n = cases();
    let mut f = Vec::new();
    for _ in 0..n {
        random_frame(&mut rng, &mut f);
        check_frame(&f);
        let h = VnetHdr::parse(&f);
        if let Some(h) = h {
            assert_eq!(VnetHdr::parse(&h.encode()), Some(h));
        }
    }
    println!("netif frame headers: {n} seeded cases");
}

fn tx_request() -> impl Strategy<Value = TxRequest> {
    (
        any::<u32>(),
        any::<u16>(),
        any::<u16>(),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(|(gref, offset, flags, id, size)| TxRequest {
            gref,
            offset,
            flags,
            id,
            size,
        })
}

proptest! {
    #[test]
    fn netif_tx_request_roundtrips(r in tx_request()) {
        prop_assert_eq!(TxRequest::parse(&r.encode()), Some(r));
    }

    #[test]
    fn netif_gso_extra_roundtrips(size in any::<u16>(), kind in any::<u8>(), features in any::<u16>(), more in any::<bool>()) {
        let e = Extra::Gso { size, kind, features };
        prop_assert_eq!(Extra::parse(&e.encode(more)), Ok((e, more)));
    }

    #[test]
    fn netif_rx_response_roundtrips(id in any::<u16>(), offset in any::<u16>(), flags in any::<u16>(), status in any::<i16>()) {
        let r = RxResponse { id, offset, flags, status };
        prop_assert_eq!(RxResponse::parse(&r.encode()), Some(r));
    }

    #[test]
    fn netif_arbitrary_slots_gather_consistently(raw in proptest::collection::vec(any::<[u8; 12]>(), 0..30), max in 1usize..40) {
        check_gather(&raw, max);
    }

    #[test]
    fn netif_arbitrary_frames_checked(f in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_frame(&f);
    }

    #[test]
    fn netif_valid_packet_gathers_whole(sizes in proptest::collection::vec(1u16..=4096, 1..18), gso in proptest::option::of(1u16..9000)) {
        let total: usize = sizes.iter().map(|&s| usize::from(s)).sum::<usize>() + 14;
        prop_assume!(total <= MAX_PACKET);
        let mut slots = Vec::new();
        let n = sizes.len();
        // First slot: 14 bytes of header plus the first fragment's bytes.
        for (i, &s) in sizes.iter().enumerate() {
            let mut flags = if i + 1 < n { TXF_MORE_DATA } else { 0 };
            if i == 0 && gso.is_some() {
                flags |= TXF_EXTRA_INFO;
            }
            let size = if i == 0 { total as u16 } else { s };
            slots.push(TxRequest { gref: i as u32, offset: 0, flags, id: i as u16, size }.encode());
            if i == 0 {
                if let Some(g) = gso {
                    let mut s = [0u8; TX_SLOT];
                    s[..EXTRA_LEN].copy_from_slice(&Extra::Gso { size: g, kind: GSO_TCPV4, features: 0 }.encode(false));
                    slots.push(s);
                }
            }
        }
        let first_bytes = total - sizes[1..].iter().map(|&s| usize::from(s)).sum::<usize>();
        prop_assume!(first_bytes <= PAGE);
        let p = TxPacket::gather(&slots, 18).expect("valid").expect("complete");
        prop_assert_eq!(p.slots, slots.len());
        prop_assert_eq!(p.total, total);
        prop_assert_eq!(p.gso, gso.map(|g| (g, GSO_TCPV4)));
        // One slot fewer is incomplete.
        prop_assert_eq!(TxPacket::gather(&slots[..slots.len() - 1], 18), Ok(None));
    }
}
