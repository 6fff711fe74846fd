//! Grant tables v1 and v2 (set_version, status frames through add_to_physmap), GNTTABOP_copy
//! from a domU, and the dom0-side API (map, unmap, copy) with its flag and bounds checks.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use hypercalls::testing::Call;
use hypercalls::{Error, GuestWidth, OverlayId, SharedPage};

const PERMIT: u16 = 1;
const READONLY: u16 = 4;
const READING: u16 = 8;
const WRITING: u16 = 16;
const SUB_PAGE: u16 = 256;
/// A guest RAM frame the grants name.
const FRAME: u64 = 0x400;

fn set_version(e: &Env, v: u32) -> i64 {
    e.v.poke(BUF, &v.to_le_bytes());
    e.ret(nr::GRANT_TABLE_OP, &[8, BUF, 1])
}

fn frame0(e: &Env) -> std::sync::Arc<dyn SharedPage> {
    e.d.grant_frame(0).expect("frame 0")
}

/// Write a grant in the current version's format (full page unless `sub`).
fn grant(e: &Env, gref: u32, flags: u16, domid: u16, frame: u64, sub: Option<(u16, u16)>) {
    let f = frame0(e);
    if e.d.grant_version() == 2 {
        let off = gref as usize * 16;
        f.store_u64(off + 8, frame, Ordering::SeqCst);
        let (s, l) = sub.unwrap_or((0, 0));
        f.store_u32(
            off + 4,
            u32::from(s) | (u32::from(l) << 16),
            Ordering::SeqCst,
        );
        f.store_u32(
            off,
            u32::from(flags) | (u32::from(domid) << 16),
            Ordering::SeqCst,
        );
    } else {
        f.store_u64(
            gref as usize * 8,
            u64::from(flags) | (u64::from(domid) << 16) | (frame << 32),
            Ordering::SeqCst,
        );
    }
}

/// The guest-visible GTF_reading/GTF_writing bits of `gref`.
fn busy(e: &Env, gref: u32) -> u16 {
    if e.d.grant_version() == 2 {
        let s = e.d.grant_status_frame(0).expect("status frame");
        let off = gref as usize * 2;
        (s.load_u64(off & !7, Ordering::SeqCst) >> ((off % 8) * 8)) as u16
    } else {
        frame0(e).load_u32(gref as usize * 8, Ordering::SeqCst) as u16 & (READING | WRITING)
    }
}

fn gnt_err(r: Result<impl std::fmt::Debug, Error>) -> i16 {
    match r {
        Err(Error::Grant(s)) => s,
        o => panic!("expected a grant error, got {o:?}"),
    }
}

fn ram(e: &Env, gfn: u64) -> std::sync::Arc<hypercalls::VecPage> {
    use hypercalls::Platform;
    let _ = e.p.map_guest_page(hypercalls::Gfn::new(gfn).expect("gfn"));
    e.p.ram.lock().get(&gfn).cloned().expect("page")
}

fn add_to_physmap(e: &Env, idx: u64, gpfn: u64) -> i64 {
    let b = if e.is_64() {
        st(
            24,
            &[
                (0, &le16(0x7ff0)),
                (4, &1u32.to_le_bytes()),
                (8, &idx.to_le_bytes()),
                (16, &gpfn.to_le_bytes()),
            ],
        )
    } else {
        st(
            16,
            &[
                (0, &le16(0x7ff0)),
                (4, &1u32.to_le_bytes()),
                (8, &(idx as u32).to_le_bytes()),
                (12, &(gpfn as u32).to_le_bytes()),
            ],
        )
    };
    e.v.poke(BUF + 0x400, &b);
    e.ret(nr::MEMORY_OP, &[7, BUF + 0x400])
}

#[test]
fn gnttab_set_version_2_keeps_reserved_entries_clears_others() {
    for w in both() {
        let e = env(w);
        grant(&e, 1, PERMIT | READONLY, 0, 0x1234, None);
        grant(&e, 20, PERMIT, 0, 0x99, None);
        assert_eq!(set_version(&e, 2), 0);
        assert_eq!(e.v.peek_u32(BUF), 2, "new version written back");
        assert_eq!(set_version(&e, 2), 0, "same version: nothing to do");
        e.v.poke(BUF, &st(8, &[(0, &le16(0x7ff0))]));
        assert_eq!(e.ret(nr::GRANT_TABLE_OP, &[10, BUF, 1]), 0);
        assert_eq!(e.v.peek_u32(BUF + 4), 2);
        let f = frame0(&e);
        assert_eq!(
            f.load_u32(16, Ordering::SeqCst),
            u32::from(PERMIT | READONLY),
            "ref 1 in v2 form"
        );
        assert_eq!(f.load_u64(24, Ordering::SeqCst), 0x1234);
        assert_eq!(f.load_u64(20 * 16, Ordering::SeqCst), 0, "ref 20 cleared");
        assert!(e.d.grant_status_frame(0).is_some());
        // Back to v1: the entry returns, the status frame placed by the guest is unplaced.
        assert_eq!(add_to_physmap(&e, 0x8000_0000, 0xf100), 0);
        assert_eq!(
            e.d.overlay_gfn(OverlayId::GrantStatus(0)).map(|g| g.get()),
            Some(0xf100)
        );
        e.p.take_calls();
        assert_eq!(set_version(&e, 1), 0);
        assert_eq!(
            e.p.take_calls(),
            vec![Call::Unplace(OverlayId::GrantStatus(0))]
        );
        assert_eq!(e.d.overlay_gfn(OverlayId::GrantStatus(0)), None);
        assert!(e.d.grant_status_frame(0).is_none());
        assert_eq!(
            f.load_u64(8, Ordering::SeqCst),
            u64::from(PERMIT | READONLY) | (0x1234 << 32)
        );
    }
}

#[test]
fn gnttab_set_version_refusals() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(e.ret(nr::GRANT_TABLE_OP, &[8, HOLE, 1]), EFAULT);
    // A pinned grant beyond the reserved ones blocks the switch; a reserved one does not.
    grant(&e, 9, PERMIT, 0, FRAME, None);
    let m = e.d.grant_map(9, 1, true).expect("map");
    assert_eq!(set_version(&e, 2), -16, "EBUSY");
    assert_eq!(e.v.peek_u32(BUF), 1);
    e.d.grant_unmap(m.handle).expect("unmap");
    grant(&e, 2, PERMIT, 0, FRAME, None);
    let r = e.d.grant_map(2, 1, false).expect("map reserved");
    assert_eq!(set_version(&e, 2), 0);
    assert_eq!(busy(&e, 2), READING | WRITING, "pin status carried into v2");
    e.d.grant_unmap(r.handle).expect("unmap");
    assert_eq!(busy(&e, 2), 0);
    // A reserved v2 entry v1 cannot hold: -ERANGE, still v2.
    grant(&e, 3, PERMIT, 0, 1 << 32, None);
    assert_eq!(set_version(&e, 1), -34, "ERANGE");
    assert_eq!(e.d.grant_version(), 2);
}

#[test]
fn gnttab_status_frames_through_add_to_physmap() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(
        add_to_physmap(&e, 0x8000_0000, 0xf100),
        EINVAL,
        "v1: no status"
    );
    assert_eq!(set_version(&e, 2), 0);
    assert_eq!(
        add_to_physmap(&e, 0x8000_0000 | 8, 0xf100),
        EINVAL,
        "72 frames > 64"
    );
    assert_eq!(
        add_to_physmap(&e, 0x8000_0000 | u64::from(u32::MAX), 0xf100),
        EINVAL
    );
    assert_eq!(
        add_to_physmap(&e, 0x8000_0000 | 7, 0xf107),
        0,
        "grows to 64 frames"
    );
    e.v.poke(BUF, &st(16, &[(0, &le16(0x7ff0))]));
    assert_eq!(e.ret(nr::GRANT_TABLE_OP, &[6, BUF, 1]), 0);
    assert_eq!(e.v.peek_u32(BUF + 4), 64);
    assert!(e.d.grant_status_frame(7).is_some());
    assert_eq!(add_to_physmap(&e, 3, 0xf003), 0, "shared frames still map");
    assert_eq!(
        e.d.overlay_gfn(OverlayId::GrantStatus(7)).map(|g| g.get()),
        Some(0xf107)
    );
    // get_status_frames is not offered to HVM guests.
    assert_eq!(e.ret(nr::GRANT_TABLE_OP, &[9, BUF, 1]), ENOSYS);
}

#[test]
fn grant_map_checks_flags_domid_and_sets_status() {
    for v in [1u32, 2] {
        let e = env(GuestWidth::Bits64);
        assert_eq!(set_version(&e, v), 0);
        grant(&e, 10, PERMIT, 0, FRAME, None);
        grant(&e, 11, PERMIT | READONLY, 0, FRAME, None);
        grant(&e, 12, PERMIT, 5, FRAME, None);
        grant(&e, 14, PERMIT, 0, 0xfc000, None);
        assert_eq!(gnt_err(e.d.grant_map(10, 2, true)), -2, "bad domain");
        assert_eq!(gnt_err(e.d.grant_map(u32::MAX, 1, true)), -3);
        assert_eq!(gnt_err(e.d.grant_map(512 * 64, 1, true)), -3);
        assert_eq!(gnt_err(e.d.grant_map(13, 1, true)), -1, "not granted");
        assert_eq!(gnt_err(e.d.grant_map(12, 1, true)), -1, "granted to dom5");
        assert_eq!(gnt_err(e.d.grant_map(11, 1, false)), -1, "read-only grant");
        assert_eq!(gnt_err(e.d.grant_map(14, 1, true)), -9, "not RAM");
        assert_eq!(busy(&e, 14), 0, "failed pins leave no status");
        let ro = e.d.grant_map(11, 1, true).expect("ro map");
        assert_eq!((ro.gfn.get(), ro.readonly), (FRAME, true));
        assert_eq!(busy(&e, 11), READING);
        let a = e.d.grant_map(10, 1, true).expect("map");
        assert_eq!(busy(&e, 10), READING);
        let b = e.d.grant_map(10, 1, false).expect("map rw");
        assert_ne!(a.handle, b.handle);
        assert_eq!(busy(&e, 10), READING | WRITING);
        e.d.grant_unmap(b.handle).expect("unmap");
        assert_eq!(busy(&e, 10), READING, "writing goes with the last writer");
        e.d.grant_unmap(a.handle).expect("unmap");
        assert_eq!(busy(&e, 10), 0);
        assert_eq!(gnt_err(e.d.grant_unmap(a.handle)), -4, "bad handle");
        // Once pinned, the grant's frame is the one seen at the first pin.
        let c = e.d.grant_map(11, 1, true).expect("second ro map");
        assert_eq!(c.gfn.get(), FRAME);
        e.d.grant_unmap(c.handle).expect("unmap");
        e.d.grant_unmap(ro.handle).expect("unmap");
        assert_eq!(busy(&e, 11), 0);
        if v == 2 {
            grant(&e, 15, PERMIT | SUB_PAGE, 0, FRAME, Some((0, 16)));
            assert_eq!(gnt_err(e.d.grant_map(15, 1, true)), -1, "no sub-page maps");
        }
    }
}

#[test]
fn grant_copy_from_to_roundtrip_and_bounds() {
    for v in [1u32, 2] {
        let e = env(GuestWidth::Bits64);
        assert_eq!(set_version(&e, v), 0);
        grant(&e, 10, PERMIT, 0, FRAME, None);
        grant(&e, 11, PERMIT | READONLY, 0, FRAME, None);
        e.d.grant_copy_to(10, 4090, b"abcdef").expect("copy to");
        let mut out = [0u8; 6];
        e.d.grant_copy_from(11, 4090, &mut out).expect("copy from");
        assert_eq!(&out, b"abcdef");
        let mut direct = [0u8; 6];
        ram(&e, FRAME).read(4090, &mut direct);
        assert_eq!(&direct, b"abcdef");
        assert_eq!(gnt_err(e.d.grant_copy_to(10, 4091, b"abcdef")), -10);
        assert_eq!(gnt_err(e.d.grant_copy_to(10, usize::MAX, b"a")), -10);
        assert_eq!(gnt_err(e.d.grant_copy_to(11, 0, b"a")), -1, "read-only");
        assert_eq!(gnt_err(e.d.grant_copy_from(13, 0, &mut out)), -1);
        assert_eq!(busy(&e, 10), 0);
        assert_eq!(busy(&e, 11), 0);
        if v == 2 {
            grant(&e, 12, PERMIT | SUB_PAGE, 0, FRAME, Some((100, 50)));
            e.d.grant_copy_to(12, 100, &[7; 50])
                .expect("inside the sub-page");
            assert_eq!(gnt_err(e.d.grant_copy_to(12, 99, &[7; 2])), -1);
            assert_eq!(gnt_err(e.d.grant_copy_to(12, 140, &[7; 11])), -1);
            grant(&e, 13, PERMIT | SUB_PAGE, 0, FRAME, Some((4000, 200)));
            assert_eq!(gnt_err(e.d.grant_copy_from(13, 4000, &mut out)), -1);
        }
    }
}

/// A gnttab_copy op in the caller's layout.
fn copy_op(e: &Env, src: (u64, u16, u16), dst: (u64, u16, u16), len: u16, flags: u16) -> Vec<u8> {
    if e.is_64() {
        st(
            40,
            &[
                (0, &src.0.to_le_bytes()),
                (8, &le16(src.1)),
                (10, &le16(src.2)),
                (16, &dst.0.to_le_bytes()),
                (24, &le16(dst.1)),
                (26, &le16(dst.2)),
                (32, &le16(len)),
                (34, &le16(flags)),
                (36, &le16(0x5a5a)),
            ],
        )
    } else {
        st(
            24,
            &[
                (0, &(src.0 as u32).to_le_bytes()),
                (4, &le16(src.1)),
                (6, &le16(src.2)),
                (8, &(dst.0 as u32).to_le_bytes()),
                (12, &le16(dst.1)),
                (14, &le16(dst.2)),
                (16, &le16(len)),
                (18, &le16(flags)),
                (20, &le16(0x5a5a)),
            ],
        )
    }
}

fn copy_status(e: &Env, i: u64) -> i16 {
    let (size, at) = if e.is_64() { (40, 36) } else { (24, 20) };
    i16::from_le_bytes(e.v.peek(BUF + i * size + at, 2).try_into().expect("2"))
}

#[test]
fn gnttab_copy_from_a_domu() {
    for w in both() {
        let e = env(w);
        const SELF: u16 = 0x7ff0;
        ram(&e, FRAME).write(0, b"hello");
        grant(&e, 10, PERMIT, 1, FRAME + 1, None); // granted to itself
        let ops = [
            copy_op(&e, (FRAME, SELF, 0), (FRAME + 1, SELF, 8), 5, 0), // frame to frame
            copy_op(&e, (FRAME, SELF, 0), (10, SELF, 100), 5, 2),      // into own grant
            copy_op(&e, (FRAME, 0, 0), (FRAME + 1, SELF, 0), 5, 0),    // dom0 frame
            copy_op(&e, (3, 0, 0), (FRAME + 1, SELF, 0), 5, 1),        // dom0 grant
            copy_op(&e, (3, 9, 0), (FRAME + 1, SELF, 0), 5, 1),        // no such domain
            copy_op(&e, (FRAME, SELF, 4000), (FRAME + 1, SELF, 0), 100, 0),
            copy_op(&e, (0xfc000, SELF, 0), (FRAME + 1, SELF, 0), 5, 0),
            copy_op(&e, (FRAME, SELF, 0), (11, SELF, 0), 5, 2), // not granted
        ];
        let mut all = Vec::new();
        for o in &ops {
            all.extend_from_slice(o);
        }
        e.v.poke(BUF, &all);
        assert_eq!(e.ret(nr::GRANT_TABLE_OP, &[5, BUF, ops.len() as u64]), 0);
        let got: Vec<i16> = (0..ops.len() as u64).map(|i| copy_status(&e, i)).collect();
        assert_eq!(got, vec![0, 0, -8, -3, -2, -10, -9, -1]);
        let mut b = [0u8; 5];
        ram(&e, FRAME + 1).read(8, &mut b);
        assert_eq!(&b, b"hello");
        ram(&e, FRAME + 1).read(100, &mut b);
        assert_eq!(&b, b"hello");
        assert_eq!(busy(&e, 10), 0, "pins released");
        assert_eq!(e.ret(nr::GRANT_TABLE_OP, &[5, HOLE, 1]), EFAULT);
        assert_eq!(e.ret(nr::GRANT_TABLE_OP, &[5, BUF, 0]), 0);
        assert_eq!(e.ret(nr::GRANT_TABLE_OP, &[5, BUF, 0x8000_0000]), EINVAL);
    }
}

#[test]
fn gnttab_copy_large_count_is_capped_per_call() {
    let e = env(GuestWidth::Bits64);
    // 1000 no-op copies (len 0, frame to frame) in mapped memory: one call does 512.
    e.v.map(0x20_0000, 1000 * 40);
    let op = copy_op(&e, (FRAME, 0x7ff0, 0), (FRAME, 0x7ff0, 0), 0, 0);
    for i in 0..1000u64 {
        e.v.poke(0x20_0000 + i * 40, &op);
    }
    assert_eq!(e.ret(nr::GRANT_TABLE_OP, &[5, 0x20_0000, 1000]), 1000 - 512);
    assert_eq!(e.v.peek(0x20_0000 + 511 * 40 + 36, 2), [0, 0]);
    assert_eq!(
        e.v.peek(0x20_0000 + 512 * 40 + 36, 2),
        [0x5a, 0x5a],
        "not reached"
    );
}

#[test]
fn grant_map_batch_rolls_back_on_failure_and_unmaps_in_one_go() {
    for v in [1u32, 2] {
        let e = env(GuestWidth::Bits64);
        assert_eq!(set_version(&e, v), 0);
        grant(&e, 10, PERMIT, 0, FRAME, None);
        grant(&e, 11, PERMIT, 0, FRAME + 1, None);
        grant(&e, 14, PERMIT, 0, 0xfc000, None);
        let mut out = Vec::new();
        let (i, err) =
            e.d.grant_map_batch(&[(10, false), (11, true), (14, true)], 1, &mut out)
                .unwrap_err();
        assert_eq!((i, gnt_err(Err::<(), _>(err))), (2, -9), "third is not RAM");
        assert!(out.is_empty());
        assert_eq!(
            (busy(&e, 10), busy(&e, 11)),
            (0, 0),
            "earlier pins rolled back"
        );
        assert!(
            e.d.grant_map_batch(&[(10, true)], 2, &mut out).is_err(),
            "bad domain"
        );
        e.d.grant_map_batch(&[(10, false), (11, true)], 1, &mut out)
            .expect("batch");
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].gfn.get(), FRAME + 1);
        assert_eq!(busy(&e, 10), READING | WRITING);
        assert_eq!(busy(&e, 11), READING);
        e.d.grant_unmap_batch(out.iter().map(|m| m.handle).chain([12345]));
        assert_eq!((busy(&e, 10), busy(&e, 11)), (0, 0));
        assert!(e.d.grant_unmap(out[0].handle).is_err(), "handle gone");
    }
}

#[test]
fn grant_pin_batch_sets_status_rolls_back_and_unpins_to_clear() {
    for v in [1u32, 2] {
        let e = env(GuestWidth::Bits64);
        assert_eq!(set_version(&e, v), 0);
        grant(&e, 10, PERMIT, 0, FRAME, None);
        grant(&e, 11, PERMIT | READONLY, 0, FRAME + 1, None);
        grant(&e, 14, PERMIT, 0, 0xfc000, None);
        let mut out = Vec::new();
        let (i, err) =
            e.d.grant_pin_batch(&[(10, false), (11, true), (14, true)], 1, &mut out)
                .unwrap_err();
        assert_eq!((i, gnt_err(Err::<(), _>(err))), (2, -9), "third is not RAM");
        assert!(out.is_empty());
        assert_eq!((busy(&e, 10), busy(&e, 11)), (0, 0), "pins rolled back");
        assert!(
            e.d.grant_pin_batch(&[(11, false)], 1, &mut out).is_err(),
            "read-only grant pinned for writing"
        );
        assert!(
            e.d.grant_pin_batch(&[(10, true)], 2, &mut out).is_err(),
            "bad domain"
        );
        // A pin beside a mapping of the same grant: the bits go with the last of them.
        let m = e.d.grant_map(10, 1, true).expect("map");
        e.d.grant_pin_batch(&[(10, false), (11, true)], 1, &mut out)
            .expect("batch");
        assert_eq!(
            out.iter().map(|g| g.get()).collect::<Vec<_>>(),
            [FRAME, FRAME + 1]
        );
        assert_eq!(busy(&e, 10), READING | WRITING);
        assert_eq!(busy(&e, 11), READING);
        // An unknown grant is skipped.
        e.d.grant_unpin_batch([(10, false), (11, true), (12, true)]);
        assert_eq!((busy(&e, 10), busy(&e, 11)), (READING, 0));
        e.d.grant_unmap(m.handle).expect("unmap");
        assert_eq!(busy(&e, 10), 0);
    }
}
