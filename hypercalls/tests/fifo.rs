//! The FIFO event channel ABI through `Domain::dispatch`: init_control, expand_array,
//! set_priority, queue linking and READY bits, unmask, busy ports, reset, and two vCPUs.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use hypercalls::testing::{Call, FakeVcpu};
use hypercalls::{GuestWidth, Outcome, SharedPage, VcpuAccess, VecPage};

const PENDING: u32 = 1 << 31;
const MASKED: u32 = 1 << 30;
const LINKED: u32 = 1 << 29;
const LINK_MASK: u32 = (1 << 17) - 1;

/// Control block pages of vCPU 0 and 1, and the first event array page (all guest RAM).
const CB0: u64 = 0x200;
const CB1: u64 = 0x201;
const ARRAY: u64 = 0x300;

fn init_control(e: &Env, gfn: u64, off: u32, vcpu: u32) -> i64 {
    e.v.poke(
        BUF,
        &st(
            24,
            &[
                (0, &gfn.to_le_bytes()),
                (8, &off.to_le_bytes()),
                (12, &vcpu.to_le_bytes()),
            ],
        ),
    );
    e.ret(nr::EVENT_CHANNEL_OP, &[11, BUF])
}

fn expand(e: &Env, gfn: u64) -> i64 {
    e.v.poke(BUF, &gfn.to_le_bytes());
    e.ret(nr::EVENT_CHANNEL_OP, &[12, BUF])
}

fn set_priority(e: &Env, port: u32, prio: u32) -> i64 {
    e.v.poke(
        BUF,
        &st(8, &[(0, &port.to_le_bytes()), (4, &prio.to_le_bytes())]),
    );
    e.ret(nr::EVENT_CHANNEL_OP, &[13, BUF])
}

fn port_op(e: &Env, cmd: u64, port: u32) -> i64 {
    e.v.poke(BUF + 0x800, &port.to_le_bytes());
    e.ret(nr::EVENT_CHANNEL_OP, &[cmd, BUF + 0x800])
}

fn send(e: &Env, port: u32) {
    assert_eq!(port_op(e, 4, port), 0, "send {port}");
}

fn bind_ipi(e: &Env, vcpu: u32) -> u32 {
    e.v.poke(BUF, &st(8, &[(0, &vcpu.to_le_bytes())]));
    assert_eq!(e.ret(nr::EVENT_CHANNEL_OP, &[7, BUF]), 0);
    e.v.peek_u32(BUF + 4)
}

fn page(e: &Env, gfn: u64) -> Arc<VecPage> {
    e.p.ram.lock().get(&gfn).cloned().expect("page mapped")
}

fn word(e: &Env, port: u32) -> u32 {
    page(e, ARRAY + u64::from(port / 1024)).load_u32((port % 1024) as usize * 4, Ordering::SeqCst)
}

fn set_word(e: &Env, port: u32, v: u32) {
    page(e, ARRAY + u64::from(port / 1024)).store_u32(
        (port % 1024) as usize * 4,
        v,
        Ordering::SeqCst,
    );
}

fn ready(e: &Env, cb: u64) -> u32 {
    page(e, cb).load_u32(0, Ordering::SeqCst)
}

fn head(e: &Env, cb: u64, prio: usize) -> u32 {
    page(e, cb).load_u32(8 + 4 * prio, Ordering::SeqCst)
}

fn upcalls(e: &Env) -> Vec<u32> {
    e.p.take_calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Upcall(v) => Some(v),
            _ => None,
        })
        .collect()
}

fn clear_upcall(e: &Env, vcpu: u32) {
    e.d.shared_info().write(vcpu as usize * 64, &[0]);
}

/// A FIFO domain: control blocks for both vCPUs, one event array page.
fn fifo_env(w: GuestWidth) -> Env {
    let e = env(w);
    assert_eq!(init_control(&e, CB0, 0, 0), 0);
    assert_eq!(init_control(&e, CB1, 0, 1), 0);
    assert_eq!(expand(&e, ARRAY), 0);
    e.p.take_calls();
    e
}

/// The ports on a queue, following LINK from the head while words are LINKED.
fn queue(e: &Env, cb: u64, prio: usize) -> Vec<u32> {
    let mut out = Vec::new();
    let mut p = head(e, cb, prio);
    while p != 0 && out.len() < 4096 {
        let w = word(e, p);
        assert!(w & LINKED != 0, "port {p} on the queue is linked");
        out.push(p);
        p = w & LINK_MASK;
    }
    out
}

#[test]
fn fifo_init_control_switches_abi_and_writes_link_bits() {
    for w in both() {
        let e = env(w);
        assert!(!e.d.evtchn_fifo_active());
        e.v.poke(BUF + 16, &[0xaa; 8]);
        assert_eq!(init_control(&e, CB0, 4096 - 72, 0), 0);
        assert_eq!(e.v.peek(BUF + 16, 1), [17], "EVTCHN_FIFO_LINK_BITS");
        assert!(e.d.evtchn_fifo_active());
        assert_eq!(
            init_control(&e, CB0, 0, 0),
            EINVAL,
            "vCPU 0 already has one"
        );
        assert_eq!(init_control(&e, CB1, 8, 1), 0);
        assert_eq!(init_control(&e, CB1, 8, 1), EINVAL);
    }
}

#[test]
fn fifo_init_control_bad_arguments_keep_2level() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(init_control(&e, CB0, 0, 2), ENOENT);
    assert_eq!(init_control(&e, CB0, 0, u32::MAX), ENOENT);
    assert_eq!(init_control(&e, CB0, 4, 0), EINVAL);
    assert_eq!(init_control(&e, CB0, 4096 - 64, 0), EINVAL);
    assert_eq!(init_control(&e, CB0, u32::MAX, 0), EINVAL);
    assert_eq!(init_control(&e, 0xfc000, 0, 0), EINVAL, "reserved, not RAM");
    assert_eq!(init_control(&e, u64::MAX, 0, 0), EINVAL);
    assert_eq!(e.ret(nr::EVENT_CHANNEL_OP, &[11, HOLE]), EFAULT);
    assert!(!e.d.evtchn_fifo_active());
    // Still 2-level: delivery goes to shared_info.
    let p = bind_ipi(&e, 0);
    send(&e, p);
    assert!(e.d.shared_info().load_u64(0x800, Ordering::SeqCst) & (1 << p) != 0);
    e.alive();
}

#[test]
fn fifo_expand_array_rules_and_limit() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(expand(&e, ARRAY), EOPNOTSUPP, "2-level");
    assert_eq!(init_control(&e, CB0, 0, 0), 0);
    assert_eq!(expand(&e, 0xfc000), EINVAL);
    assert_eq!(expand(&e, u64::MAX), EINVAL);
    assert_eq!(e.ret(nr::EVENT_CHANNEL_OP, &[12, HOLE]), EFAULT);
    for i in 0..128 {
        assert_eq!(expand(&e, ARRAY + i), 0, "page {i}");
    }
    assert_eq!(expand(&e, ARRAY), ENOSPC, "2^17 ports have words");
}

#[test]
fn fifo_set_priority_rules() {
    let e = fifo_env(GuestWidth::Bits64);
    let p = bind_ipi(&e, 0);
    assert_eq!(set_priority(&e, p, 16), EINVAL);
    assert_eq!(set_priority(&e, p, u32::MAX), EINVAL);
    assert_eq!(set_priority(&e, 64, 0), EINVAL, "invalid port");
    assert_eq!(set_priority(&e, p, 15), 0);
    assert_eq!(set_priority(&e, p, 0), 0);
    assert_eq!(e.ret(nr::EVENT_CHANNEL_OP, &[13, HOLE]), EFAULT);
}

#[test]
fn fifo_delivery_links_in_order_ready_and_upcall_once() {
    for w in both() {
        let e = fifo_env(w);
        let ports: Vec<u32> = (0..3).map(|_| bind_ipi(&e, 0)).collect();
        for &p in &ports {
            send(&e, p);
        }
        assert_eq!(queue(&e, CB0, 7), ports, "default priority 7, FIFO order");
        for &p in &ports {
            assert!(word(&e, p) & PENDING != 0);
        }
        assert_eq!(ready(&e, CB0), 1 << 7);
        assert_eq!(
            upcalls(&e),
            vec![0],
            "one upcall for the queue becoming ready"
        );
        // Sending a pending port again changes nothing.
        send(&e, ports[0]);
        assert_eq!(queue(&e, CB0, 7), ports);
        assert!(upcalls(&e).is_empty());
    }
}

#[test]
fn fifo_delivery_priorities_use_separate_queues() {
    let e = fifo_env(GuestWidth::Bits64);
    let low = bind_ipi(&e, 0);
    let high = bind_ipi(&e, 0);
    assert_eq!(set_priority(&e, high, 0), 0);
    send(&e, low);
    send(&e, high);
    assert_eq!(queue(&e, CB0, 7), vec![low]);
    assert_eq!(queue(&e, CB0, 0), vec![high]);
    assert_eq!(ready(&e, CB0), (1 << 7) | 1);
    assert_eq!(upcalls(&e), vec![0], "the second READY bit is no new edge");
}

#[test]
fn fifo_masked_port_pends_unlinked_until_unmask() {
    let e = fifo_env(GuestWidth::Bits64);
    let p = bind_ipi(&e, 0);
    set_word(&e, p, MASKED);
    send(&e, p);
    assert_eq!(word(&e, p), MASKED | PENDING);
    assert_eq!(ready(&e, CB0), 0);
    assert!(upcalls(&e).is_empty());
    assert_eq!(port_op(&e, 9, p), 0, "unmask");
    assert_eq!(word(&e, p), PENDING | LINKED);
    assert_eq!(head(&e, CB0, 7), p);
    assert_eq!(upcalls(&e), vec![0]);
    // Unmasking a port that is not pending links nothing.
    let q = bind_ipi(&e, 0);
    set_word(&e, q, MASKED);
    assert_eq!(port_op(&e, 9, q), 0);
    assert_eq!(word(&e, q), 0);
    assert_eq!(port_op(&e, 9, 64), EINVAL);
}

#[test]
fn fifo_consumed_tail_makes_next_event_the_head() {
    let e = fifo_env(GuestWidth::Bits64);
    let a = bind_ipi(&e, 0);
    let b = bind_ipi(&e, 0);
    send(&e, a);
    assert_eq!(upcalls(&e), vec![0]);
    // The guest consumes a: unlinks it, clears PENDING, READY and upcall_pending.
    set_word(&e, a, 0);
    page(&e, CB0).store_u32(0, 0, Ordering::SeqCst);
    clear_upcall(&e, 0);
    send(&e, b);
    assert_eq!(head(&e, CB0, 7), b, "a was unlinked: b heads the queue");
    assert_eq!(word(&e, a), 0, "no link written into the consumed word");
    assert_eq!(ready(&e, CB0), 1 << 7);
    assert_eq!(upcalls(&e), vec![0]);
}

#[test]
fn fifo_port_moved_to_other_queue_resets_old_tail() {
    let e = fifo_env(GuestWidth::Bits64);
    let a = bind_ipi(&e, 0);
    let b = bind_ipi(&e, 0);
    send(&e, a);
    // Consumed, then re-raised at another priority: the old queue's tail must not keep it.
    set_word(&e, a, 0);
    assert_eq!(set_priority(&e, a, 3), 0);
    send(&e, a);
    assert_eq!(queue(&e, CB0, 3), vec![a]);
    assert_eq!(set_priority(&e, b, 7), 0);
    send(&e, b);
    assert_eq!(head(&e, CB0, 7), b, "queue 7 was empty: b is its head");
    assert_eq!(
        word(&e, a) & LINK_MASK,
        0,
        "a on queue 3 does not link to b"
    );
}

#[test]
fn fifo_pending_before_switch_and_before_page_raised_on_expand() {
    let e = env(GuestWidth::Bits64);
    let a = bind_ipi(&e, 0);
    send(&e, a); // 2-level pending
    assert_eq!(init_control(&e, CB0, 0, 0), 0);
    let b = bind_ipi(&e, 0);
    send(&e, b); // no event word yet
    e.p.take_calls();
    clear_upcall(&e, 0);
    assert!(!e.d.is_port_pending(a), "no word, not pending yet");
    assert_eq!(expand(&e, ARRAY), 0);
    assert_eq!(queue(&e, CB0, 7), vec![a, b]);
    assert_eq!(upcalls(&e), vec![0]);
    assert!(e.d.is_port_pending(a));
}

#[test]
fn fifo_vcpu_without_control_block_gets_no_link() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(init_control(&e, CB0, 0, 0), 0);
    assert_eq!(expand(&e, ARRAY), 0);
    let p = bind_ipi(&e, 1);
    e.p.take_calls();
    send(&e, p);
    assert_eq!(word(&e, p), PENDING, "pending, not linked");
    assert!(upcalls(&e).is_empty());
}

#[test]
fn fifo_two_vcpus_deliver_to_bound_vcpu() {
    let e = fifo_env(GuestWidth::Bits64);
    let p0 = bind_ipi(&e, 0);
    let p1 = bind_ipi(&e, 1);
    send(&e, p1);
    assert_eq!(head(&e, CB1, 7), p1);
    assert_eq!(ready(&e, CB1), 1 << 7);
    assert_eq!(ready(&e, CB0), 0);
    assert_eq!(upcalls(&e), vec![1]);
    send(&e, p0);
    assert_eq!(head(&e, CB0, 7), p0);
    assert_eq!(upcalls(&e), vec![0]);
    // An unbound port moved to vCPU 1 by bind_vcpu, then raised by a loopback peer.
    e.v.poke(BUF, &st(8, &[(0, &le16(0x7ff0)), (2, &le16(0x7ff0))]));
    assert_eq!(e.ret(nr::EVENT_CHANNEL_OP, &[6, BUF]), 0);
    let u = e.v.peek_u32(BUF + 4);
    e.v.poke(
        BUF,
        &st(8, &[(0, &u.to_le_bytes()), (4, &1u32.to_le_bytes())]),
    );
    assert_eq!(e.ret(nr::EVENT_CHANNEL_OP, &[8, BUF]), 0);
    e.v.poke(BUF, &st(12, &[(0, &le16(0x7ff0)), (4, &u.to_le_bytes())]));
    assert_eq!(e.ret(nr::EVENT_CHANNEL_OP, &[0, BUF]), 0);
    let l = e.v.peek_u32(BUF + 8);
    e.p.take_calls();
    send(&e, l);
    assert_eq!(queue(&e, CB1, 7), vec![p1, u]);
}

#[test]
fn fifo_busy_port_not_reallocated_until_unlinked() {
    let e = fifo_env(GuestWidth::Bits64);
    let p = bind_ipi(&e, 0);
    send(&e, p);
    assert_eq!(port_op(&e, 3, p), 0, "close");
    assert_eq!(word(&e, p), LINKED, "close clears PENDING only");
    let q = bind_ipi(&e, 0);
    assert_ne!(q, p, "a linked port is busy");
    set_word(&e, p, 0);
    assert_eq!(bind_ipi(&e, 0), p);
}

#[test]
fn fifo_poll_sees_event_word_pending() {
    let e = fifo_env(GuestWidth::Bits64);
    let p = bind_ipi(&e, 0);
    set_word(&e, p, MASKED | PENDING);
    e.v.poke(BUF + 0x200, &p.to_le_bytes());
    let mut a = st(24, &[(0, &(BUF + 0x200).to_le_bytes())]);
    a[8..12].copy_from_slice(&1u32.to_le_bytes());
    e.v.poke(BUF + 0x100, &a);
    assert_eq!(e.call(nr::SCHED_OP, &[3, BUF + 0x100]), Outcome::Return(0));
    set_word(&e, p, MASKED);
    match e.call(nr::SCHED_OP, &[3, BUF + 0x100]) {
        Outcome::Poll { ports, .. } => assert_eq!(ports, vec![p]),
        o => panic!("{o:?}"),
    }
    let v0 = e.d.vcpu(0).expect("vcpu");
    assert!(!e.d.poll_should_wake(v0, &[p]));
    send(&e, p);
    assert!(
        e.d.poll_should_wake(v0, &[p]),
        "masked but pending wakes the poller"
    );
    assert!(e.p.take_calls().contains(&Call::Kick(0)));
}

#[test]
fn fifo_reset_switches_back_to_2level() {
    let e = fifo_env(GuestWidth::Bits64);
    bind_ipi(&e, 0);
    e.v.poke(BUF, &le16(0x7ff0));
    assert_eq!(e.ret(nr::EVENT_CHANNEL_OP, &[10, BUF]), 0);
    assert!(!e.d.evtchn_fifo_active());
    assert_eq!(expand(&e, ARRAY), EOPNOTSUPP);
    assert_eq!(init_control(&e, CB0, 0, 0), 0, "FIFO can be set up again");
}

#[test]
fn fifo_concurrent_senders_two_vcpus_every_port_queued_once() {
    let e = Arc::new(fifo_env(GuestWidth::Bits64));
    let p0: Vec<u32> = (0..40).map(|_| bind_ipi(&e, 0)).collect();
    let p1: Vec<u32> = (0..40).map(|_| bind_ipi(&e, 1)).collect();
    e.p.take_calls();
    std::thread::scope(|s| {
        for chunk in p0.chunks(10).chain(p1.chunks(10)) {
            let e = e.clone();
            s.spawn(move || {
                let v = FakeVcpu::new(0, GuestWidth::Bits64);
                v.map(BUF, BUF_LEN);
                for _ in 0..5 {
                    for &p in chunk {
                        v.poke(BUF, &p.to_le_bytes());
                        assert_eq!(
                            e.call_on(&v, nr::EVENT_CHANNEL_OP, &[4, BUF]),
                            Outcome::Return(0)
                        );
                    }
                }
                assert_eq!(v.vcpu_id(), 0);
            });
        }
    });
    let mut q0 = queue(&e, CB0, 7);
    let mut q1 = queue(&e, CB1, 7);
    q0.sort_unstable();
    q1.sort_unstable();
    assert_eq!(q0, p0);
    assert_eq!(q1, p1);
    let mut ups = upcalls(&e);
    ups.sort_unstable();
    assert_eq!(ups, vec![0, 1], "one upcall per vCPU");
}
