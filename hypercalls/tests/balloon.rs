//! memory_op balloon operations: decrease/increase_reservation, populate_physmap,
//! remove_from_physmap, with Xen's counts and argument rules.

mod common;

use common::*;
use hypercalls::testing::Call;
use hypercalls::{DomainConfig, GuestWidth, OverlayId};

const INCREASE: u64 = 0;
const DECREASE: u64 = 1;
const CURRENT: u64 = 3;
const POPULATE: u64 = 6;
const REMOVE: u64 = 15;
const LIST: u64 = BUF + 0x1000;
const SELF: u16 = 0x7ff0;

/// A reservation `{list, nr, order, flags, dom}` at BUF and the gfns at LIST; returns RAX.
fn resv(e: &Env, cmd: u64, gfns: &[u64], nr: u64, order: u32, flags: u32, dom: u16) -> i64 {
    if e.is_64() {
        let b = st(
            32,
            &[
                (0, &LIST.to_le_bytes()),
                (8, &nr.to_le_bytes()),
                (16, &order.to_le_bytes()),
                (20, &flags.to_le_bytes()),
                (24, &le16(dom)),
            ],
        );
        e.v.poke(BUF, &b);
        for (i, g) in gfns.iter().enumerate() {
            e.v.poke(LIST + 8 * i as u64, &g.to_le_bytes());
        }
    } else {
        let b = st(
            20,
            &[
                (0, &(LIST as u32).to_le_bytes()),
                (4, &(nr as u32).to_le_bytes()),
                (8, &order.to_le_bytes()),
                (12, &flags.to_le_bytes()),
                (16, &le16(dom)),
            ],
        );
        e.v.poke(BUF, &b);
        for (i, g) in gfns.iter().enumerate() {
            e.v.poke(LIST + 4 * i as u64, &(*g as u32).to_le_bytes());
        }
    }
    e.ret(nr::MEMORY_OP, &[cmd, BUF])
}

fn simple(e: &Env, cmd: u64, gfns: &[u64]) -> i64 {
    resv(e, cmd, gfns, gfns.len() as u64, 0, 0, SELF)
}

fn current(e: &Env) -> i64 {
    e.v.poke(BUF + 0x800, &le16(SELF));
    e.ret(nr::MEMORY_OP, &[CURRENT, BUF + 0x800])
}

fn released(calls: &[Call]) -> Vec<u64> {
    calls
        .iter()
        .flat_map(|c| match c {
            Call::Release(v) => v.clone(),
            _ => Vec::new(),
        })
        .collect()
}

fn remove(e: &Env, dom: u16, gpfn: u64) -> i64 {
    let b = if e.is_64() {
        st(16, &[(0, &le16(dom)), (8, &gpfn.to_le_bytes())])
    } else {
        st(8, &[(0, &le16(dom)), (4, &(gpfn as u32).to_le_bytes())])
    };
    e.v.poke(BUF, &b);
    e.ret(nr::MEMORY_OP, &[REMOVE, BUF])
}

#[test]
fn balloon_decrease_releases_and_stops_at_first_bad_frame() {
    for w in both() {
        let e = env(w);
        let before = current(&e);
        assert_eq!(simple(&e, DECREASE, &[0x1000, 0x1001, 0x1002]), 3);
        assert_eq!(released(&e.p.take_calls()), vec![0x1000, 0x1001, 0x1002]);
        assert_eq!(current(&e), before - 3);
        assert_eq!(simple(&e, DECREASE, &[0x1001]), 0, "already given back");
        assert_eq!(
            simple(&e, DECREASE, &[0x1003, 0xa0, 0x1004]),
            1,
            "stops at the hole"
        );
        assert_eq!(simple(&e, DECREASE, &[0xff_ffff_ffff]), 0);
        assert!(released(&e.p.take_calls()) == vec![0x1003]);
    }
}

#[test]
fn balloon_decrease_order_9_aligned_only() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(resv(&e, DECREASE, &[0x2001], 1, 9, 0, SELF), 0, "unaligned");
    assert_eq!(
        resv(&e, DECREASE, &[0x2000], 1, 10, 0, SELF),
        0,
        "order > 9"
    );
    assert_eq!(resv(&e, DECREASE, &[0x2000], 1, 9, 0, SELF), 1);
    let r = released(&e.p.take_calls());
    assert_eq!(r.len(), 512);
    assert_eq!((r[0], r[511]), (0x2000, 0x21ff));
    assert_eq!(
        resv(&e, DECREASE, &[0x2000], 1, 1, 0, SELF),
        0,
        "part given back"
    );
}

#[test]
fn balloon_populate_brings_back_within_max_pages() {
    for w in both() {
        let e = env(w);
        assert_eq!(simple(&e, DECREASE, &[0x1000, 0x1001]), 2);
        e.p.take_calls();
        assert_eq!(simple(&e, POPULATE, &[0x1000]), 1);
        assert_eq!(e.p.take_calls(), vec![Call::Populate(vec![0x1000])]);
        assert_eq!(simple(&e, POPULATE, &[0xa0]), 0, "not RAM");
        *e.p.populate_fails_at.lock() = 0x1001;
        assert_eq!(simple(&e, POPULATE, &[0x1001]), 0, "the VMM could not");
        *e.p.populate_fails_at.lock() = u64::MAX;
        assert_eq!(
            resv(&e, POPULATE, &[0x1001], 1, 0, 1 << 16, SELF),
            0,
            "PoD on oneself"
        );
        assert_eq!(
            simple(&e, POPULATE, &[0x1001, 0x5000]),
            1,
            "then at max_pages"
        );
        assert_eq!(
            simple(&e, DECREASE, &[0x1001]),
            1,
            "populated frames are RAM again"
        );
    }
}

#[test]
fn balloon_populate_below_max_replaces_present_frames() {
    let e = env_cfg(
        GuestWidth::Bits64,
        DomainConfig {
            max_pages: Some(0x20000),
            ..DomainConfig::default()
        },
    );
    assert_eq!(simple(&e, POPULATE, &[0x5000, 0x5001]), 2);
    assert_eq!(
        e.p.take_calls(),
        vec![Call::Populate(vec![0x5000]), Call::Populate(vec![0x5001])]
    );
}

#[test]
fn balloon_increase_reservation_accounts_up_to_max() {
    let e = env_cfg(
        GuestWidth::Bits64,
        DomainConfig {
            max_pages: Some(0xff9f + 2),
            ..DomainConfig::default()
        },
    );
    let before = current(&e);
    assert_eq!(resv(&e, INCREASE, &[], 5, 0, 0, SELF), 2);
    assert_eq!(current(&e), before + 2);
    assert_eq!(resv(&e, INCREASE, &[], 5, 0, 0, SELF), 0);
}

#[test]
fn balloon_bad_arguments_return_the_start_extent() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(resv(&e, DECREASE, &[0x1000], 1, 0, 0, 0), 0, "dom0");
    assert_eq!(
        resv(&e, DECREASE, &[0x1000], 1, 0, 0, 9),
        0,
        "no such domain"
    );
    assert_eq!(
        resv(
            &e,
            DECREASE,
            &[0x1000],
            u64::from(u32::MAX >> 6) + 1,
            0,
            0,
            SELF
        ),
        0
    );
    assert_eq!(
        resv(&e, DECREASE, &[0x1000], 1, 0, 12, SELF),
        0,
        "address bits"
    );
    assert_eq!(
        resv(&e, DECREASE, &[0x1000], 1, 0, (3 << 8) | (1 << 17), SELF),
        0,
        "exact node"
    );
    assert_eq!(e.ret(nr::MEMORY_OP, &[DECREASE, HOLE]), 0);
    assert!(e.p.take_calls().is_empty());
    // A continuation start: only extents from it on; at or past the end, nothing.
    assert_eq!(resv(&e, DECREASE, &[0x1000, 0x1001, 0x1002], 3, 0, 0, 9), 0);
    e.v.poke(BUF + 24, &le16(SELF));
    assert_eq!(e.ret(nr::MEMORY_OP, &[DECREASE | (2 << 6), BUF]), 3);
    assert_eq!(released(&e.p.take_calls()), vec![0x1002]);
    assert_eq!(e.ret(nr::MEMORY_OP, &[DECREASE | (7 << 6), BUF]), 7);
    // A list running into unmapped memory stops there.
    let at = WINDOW_END - 16;
    let b = st(
        32,
        &[
            (0, &at.to_le_bytes()),
            (8, &4u64.to_le_bytes()),
            (24, &le16(SELF)),
        ],
    );
    e.v.poke(BUF, &b);
    e.v.poke(
        at,
        &st(
            16,
            &[(0, &0x3000u64.to_le_bytes()), (8, &0x3001u64.to_le_bytes())],
        ),
    );
    assert_eq!(e.ret(nr::MEMORY_OP, &[DECREASE, BUF]), 2);
}

#[test]
fn balloon_work_per_call_is_capped() {
    let e = env(GuestWidth::Bits64);
    let gfns: Vec<u64> = (0x8000..0x8000 + 600).collect();
    assert_eq!(simple(&e, DECREASE, &gfns), 512);
    assert_eq!(e.ret(nr::MEMORY_OP, &[DECREASE | (512 << 6), BUF]), 600);
    assert_eq!(released(&e.p.take_calls()).len(), 600);
}

#[test]
fn balloon_decrease_under_an_overlay_unplaces_it() {
    let e = env(GuestWidth::Bits64);
    let xatp = st(
        24,
        &[
            (0, &le16(SELF)),
            (4, &1u32.to_le_bytes()),
            (16, &0x4000u64.to_le_bytes()),
        ],
    );
    e.v.poke(BUF + 0x400, &xatp);
    assert_eq!(e.ret(nr::MEMORY_OP, &[7, BUF + 0x400]), 0);
    e.p.take_calls();
    assert_eq!(simple(&e, DECREASE, &[0x4000]), 1);
    assert_eq!(
        e.p.take_calls(),
        vec![
            Call::Unplace(OverlayId::GrantFrame(0)),
            Call::Release(vec![0x4000])
        ]
    );
    assert_eq!(e.d.overlay_gfn(OverlayId::GrantFrame(0)), None);
}

#[test]
fn remove_from_physmap_overlay_ram_and_errors() {
    for w in both() {
        let e = env(w);
        let xatp = if e.is_64() {
            st(24, &[(0, &le16(SELF)), (16, &0xf000u64.to_le_bytes())])
        } else {
            st(16, &[(0, &le16(SELF)), (12, &0xf000u32.to_le_bytes())])
        };
        e.v.poke(BUF + 0x400, &xatp);
        assert_eq!(e.ret(nr::MEMORY_OP, &[7, BUF + 0x400]), 0);
        e.p.take_calls();
        assert_eq!(remove(&e, SELF, 0xf000), 0, "shared_info unplaced");
        assert_eq!(e.p.take_calls(), vec![Call::Unplace(OverlayId::SharedInfo)]);
        assert_eq!(e.d.overlay_gfn(OverlayId::SharedInfo), None);
        assert_eq!(remove(&e, SELF, 0x3000), 0, "RAM given back");
        assert_eq!(e.p.take_calls(), vec![Call::Release(vec![0x3000])]);
        assert_eq!(remove(&e, SELF, 0x3000), ENOENT);
        assert_eq!(remove(&e, SELF, 0xa0), ENOENT);
        assert_eq!(remove(&e, 1, 0xfc000), ENOENT);
        assert_eq!(remove(&e, 0, 0x3001), EPERM);
        assert_eq!(remove(&e, 9, 0x3001), ESRCH);
        assert_eq!(e.ret(nr::MEMORY_OP, &[REMOVE, HOLE]), EFAULT);
        assert_eq!(e.ret(nr::MEMORY_OP, &[REMOVE | (1 << 6), BUF]), EINVAL);
        assert!(e.p.take_calls().is_empty());
    }
}
