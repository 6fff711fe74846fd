//! dom0-side services and domain control: `bind_interdomain` to dom0 ports the VMM opened,
//! the dom0 port API, `EVTCHNOP_reset`/`reset_cont`, and `SCHEDOP_watchdog`.

mod common;

use common::*;
use hypercalls::testing::Call;
use hypercalls::{Error, GuestWidth};

fn bind_interdomain(e: &Env, dom: u16, port: u32) -> i64 {
    e.v.poke(BUF, &st(12, &[(0, &le16(dom)), (4, &port.to_le_bytes())]));
    match e.ret(nr::EVENT_CHANNEL_OP, &[0, BUF]) {
        0 => i64::from(e.v.peek_u32(BUF + 8)),
        err => err,
    }
}

fn port_op(e: &Env, cmd: u64, port: u32) -> i64 {
    e.v.poke(BUF + 0x800, &port.to_le_bytes());
    e.ret(nr::EVENT_CHANNEL_OP, &[cmd, BUF + 0x800])
}

/// `(status, remote dom, remote port)` of EVTCHNOP_status.
fn status(e: &Env, port: u32) -> (u32, u32, u32) {
    e.v.poke(
        BUF,
        &st(24, &[(0, &le16(0x7ff0)), (4, &port.to_le_bytes())]),
    );
    assert_eq!(e.ret(nr::EVENT_CHANNEL_OP, &[5, BUF]), 0);
    (
        e.v.peek_u32(BUF + 8),
        e.v.peek_u32(BUF + 16) & 0xffff,
        e.v.peek_u32(BUF + 20),
    )
}

fn reset(e: &Env, cmd: u64, dom: u16) -> i64 {
    e.v.poke(BUF, &le16(dom));
    e.ret(nr::EVENT_CHANNEL_OP, &[cmd, BUF])
}

fn watchdog(e: &Env, id: u32, timeout: u32) -> i64 {
    e.v.poke(
        BUF,
        &st(8, &[(0, &id.to_le_bytes()), (4, &timeout.to_le_bytes())]),
    );
    e.ret(nr::SCHED_OP, &[6, BUF])
}

const STAT_UNBOUND: u32 = 1;
const STAT_INTERDOMAIN: u32 = 2;

#[test]
fn evtchn_bind_interdomain_to_dom0_port_and_notify() {
    for w in both() {
        let e = env(w);
        let id = e.d.backend_alloc_unbound(1).expect("dom0 port");
        assert_eq!(bind_interdomain(&e, 0, id + 1), EINVAL, "no such dom0 port");
        let lp = bind_interdomain(&e, 0, id) as u32;
        assert_eq!(lp, 1);
        assert_eq!(status(&e, lp), (STAT_INTERDOMAIN, 0, id));
        assert!(e.d.is_port_pending(lp), "Xen pends the new local port");
        assert_eq!(e.d.backend_peer(id).map(|p| p.get()), Some(lp));
        assert_eq!(bind_interdomain(&e, 0, id), EINVAL, "already bound");
        e.p.take_calls();
        assert_eq!(port_op(&e, 4, lp), 0);
        assert_eq!(e.p.take_calls(), vec![Call::Backend(id)]);
        // The guest closes: dom0's port is unbound for us again and can be re-bound.
        assert_eq!(port_op(&e, 3, lp), 0);
        assert_eq!(e.d.backend_peer(id), None);
        assert_eq!(bind_interdomain(&e, 0, id), i64::from(lp));
        // dom0 closes: the guest's end is unbound, remote dom 0.
        e.d.backend_close(id).expect("close");
        assert_eq!(status(&e, lp), (STAT_UNBOUND, 0, 0));
        assert!(matches!(e.d.backend_close(id), Err(Error::Evtchn(_))));
        assert_eq!(bind_interdomain(&e, 0, id), EINVAL);
    }
}

#[test]
fn backend_alloc_unbound_ids_and_bad_domid() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(e.d.bind_backend_port(1).expect("store").get(), 1);
    assert!(matches!(
        e.d.backend_alloc_unbound(2),
        Err(Error::Evtchn(_))
    ));
    assert!(matches!(
        e.d.backend_alloc_unbound(0x7ff0),
        Err(Error::Evtchn(_))
    ));
    assert_eq!(
        e.d.backend_alloc_unbound(1).expect("id"),
        2,
        "id 1 is taken"
    );
    assert_eq!(e.d.backend_alloc_unbound(1).expect("id"), 3);
    e.d.backend_close(2).expect("close");
    assert_eq!(
        e.d.backend_alloc_unbound(1).expect("id"),
        2,
        "lowest free id"
    );
    let mut n = 3;
    while e.d.backend_alloc_unbound(1).is_ok() {
        n += 1;
        assert!(n <= 4096, "the dom0 table is bounded");
    }
    assert_eq!(n, 4096);
}

#[test]
fn evtchn_reset_closes_dom0_channels_and_reset_cont_ebusy() {
    let e = env(GuestWidth::Bits64);
    let id = e.d.backend_alloc_unbound(1).expect("id");
    let lp = bind_interdomain(&e, 0, id) as u32;
    assert_eq!(
        reset(&e, 14, 0x7ff0),
        -16,
        "reset_cont with no reset in progress: EBUSY"
    );
    assert_eq!(reset(&e, 10, 9), ESRCH);
    assert_eq!(reset(&e, 10, 0), EPERM);
    assert_eq!(e.ret(nr::EVENT_CHANNEL_OP, &[10, HOLE]), EFAULT);
    assert_eq!(
        status(&e, lp).0,
        STAT_INTERDOMAIN,
        "still bound before reset"
    );
    assert_eq!(reset(&e, 10, 1), 0);
    assert_eq!(status(&e, lp), (0, 0, 0), "closed");
    assert_eq!(e.d.backend_peer(id), None);
    assert_eq!(
        bind_interdomain(&e, 0, id),
        i64::from(lp),
        "dom0's end survived"
    );
}

#[test]
fn sched_watchdog_create_ping_destroy_expire() {
    let e = env(GuestWidth::Bits64);
    e.p.set_now(1_000);
    assert_eq!(watchdog(&e, 0, 10), 1);
    assert_eq!(watchdog(&e, 0, 20), 2);
    assert_eq!(watchdog(&e, 0, 20), -28, "ENOSPC: two timers");
    assert_eq!(
        e.p.take_calls(),
        vec![
            Call::Watchdog(0, Some(10_000_001_000)),
            Call::Watchdog(1, Some(20_000_001_000))
        ]
    );
    assert_eq!(watchdog(&e, 3, 1), EINVAL);
    assert_eq!(watchdog(&e, u32::MAX, 1), EINVAL);
    e.p.set_now(5_000_000_000);
    assert_eq!(watchdog(&e, 1, 30), 0, "ping");
    assert_eq!(
        e.p.take_calls(),
        vec![Call::Watchdog(0, Some(35_000_000_000))]
    );
    assert_eq!(watchdog(&e, 2, 0), 0, "destroy");
    assert_eq!(e.p.take_calls(), vec![Call::Watchdog(1, None)]);
    assert_eq!(watchdog(&e, 2, 5), EINVAL, "not in use");
    assert_eq!(e.ret(nr::SCHED_OP, &[6, HOLE]), EFAULT);
    assert_eq!(e.d.watchdog_expired(1), None, "cancelled");
    assert_eq!(e.d.watchdog_expired(9), None);
    assert_eq!(e.d.watchdog_expired(0), None, "not due yet (a stale timer)");
    assert_eq!(e.d.shutdown_code(), None);
    e.p.set_now(35_000_000_000);
    assert_eq!(e.d.watchdog_expired(0), Some(4), "SHUTDOWN_watchdog");
    assert_eq!(e.d.shutdown_code(), Some(4));
    assert_eq!(watchdog(&e, 0, 1), 2, "the freed slot");
}
