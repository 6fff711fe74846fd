//! Property test over `Domain::dispatch`: arbitrary numbers, sub-ops, arguments and guest
//! memory, in sequences sharing one domain. Nothing panics, every result is a bounded RAX value
//! or a well-formed outcome, and the domain still answers afterwards.

mod common;

use common::*;
use hypercalls::{GuestWidth, Outcome, SharedPage};
use proptest::prelude::*;

/// The case count: `default`, or PROPTEST_CASES for long fuzzing runs.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn arg() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (0..BUF_LEN).prop_map(|o| BUF + o),
        2 => 0u64..64,
        1 => Just(HOLE),
        1 => Just(STRADDLE),
        1 => Just(WINDOW_END - 2),
        1 => any::<u64>(),
        1 => Just(u64::MAX),
        1 => Just(0x7ff0),
    ]
}

fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => prop::sample::select(vec![12u64, 15, 17, 18, 20, 21, 24, 29, 32, 34]),
        2 => 0u64..70,
        1 => any::<u64>(),
    ]
}

#[derive(Debug, Clone)]
struct Step {
    nr: u64,
    args: Vec<u64>,
    poke_at: u64,
    bytes: Vec<u8>,
}

fn step() -> impl Strategy<Value = Step> {
    (
        number(),
        prop::collection::vec(arg(), 3),
        (0..BUF_LEN - 64).prop_map(|o| BUF + o),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(nr, args, poke_at, bytes)| Step {
            nr,
            args,
            poke_at,
            bytes,
        })
}

fn check(o: &Outcome) -> Result<(), TestCaseError> {
    match o {
        // Non-negative values are counts, frame numbers, or (memory_op reservations) the
        // start extent the guest passed in the command word, returned as Xen returns it.
        Outcome::Return(r) => prop_assert!(*r >= -128, "RAX {r}"),
        Outcome::Poll { ports, .. } => prop_assert!(ports.len() <= 128),
        Outcome::Shutdown { .. } | Outcome::Block { .. } | Outcome::Yield => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1000), ..ProptestConfig::default() })]

    #[test]
    fn dispatch_arbitrary_sequences_bounded(wide in any::<bool>(), steps in prop::collection::vec(step(), 1..12)) {
        let w = if wide { GuestWidth::Bits64 } else { GuestWidth::Bits32 };
        let e = env(w);
        // Some state to act on: ports of every kind.
        let _ = e.d.bind_backend_port(7);
        // A dom0 port (id 1) the guest may bind with bind_interdomain.
        let _ = e.d.backend_alloc_unbound(1);
        for s in &steps {
            e.v.poke(s.poke_at, &s.bytes);
            let o = e.call(s.nr, &s.args);
            check(&o)?;
            if let Outcome::Poll { .. } = o {
                e.d.end_poll(e.d.vcpu(0).expect("vcpu 0"));
            }
        }
        e.alive();
    }

    /// The same over a FIFO domain whose control blocks and event array the guest scribbles
    /// on between calls (event words with arbitrary LINK/flag bits).
    #[test]
    fn dispatch_fifo_sequences_with_garbage_event_words_bounded(
        wide in any::<bool>(),
        steps in prop::collection::vec((step(), prop::sample::select(vec![0x200u64, 0x300, 0x301]), 0usize..4088, any::<u64>()), 1..16),
    ) {
        let w = if wide { GuestWidth::Bits64 } else { GuestWidth::Bits32 };
        let e = env(w);
        let _ = e.d.bind_backend_port(7);
        // A dom0 port (id 1) the guest may bind with bind_interdomain.
        let _ = e.d.backend_alloc_unbound(1);
        e.v.poke(BUF, &{
            let mut b = [0u8; 24];
            b[..8].copy_from_slice(&0x200u64.to_le_bytes());
            b
        });
        prop_assert_eq!(e.call(32, &[11, BUF]), Outcome::Return(0));
        for g in [0x300u64, 0x301] {
            e.v.poke(BUF, &g.to_le_bytes());
            prop_assert_eq!(e.call(32, &[12, BUF]), Outcome::Return(0));
        }
        // IPI ports on both vCPUs (ports 2..=9) for the sends to hit.
        for i in 0u32..8 {
            e.v.poke(BUF, &(i % 2).to_le_bytes());
            prop_assert_eq!(e.call(32, &[7, BUF]), Outcome::Return(0));
        }
        for (s, gfn, off, val) in &steps {
            e.v.poke(s.poke_at, &s.bytes);
            if let Some(pg) = e.p.ram.lock().get(gfn) {
                pg.store_u64(off & !7, *val, std::sync::atomic::Ordering::SeqCst);
            }
            // Mostly event channel ops, on small port numbers.
            let nr = if s.nr % 2 == 0 { 32 } else { s.nr };
            let o = e.call(nr, &[s.args[0] % 16, s.args[1], s.args[2]]);
            check(&o)?;
            if let Outcome::Poll { .. } = o {
                e.d.end_poll(e.d.vcpu(0).expect("vcpu 0"));
            }
            let _ = e.d.raise_port(1);
        }
        e.alive();
    }

    #[test]
    fn dispatch_structured_subops_bounded(
        wide in any::<bool>(),
        nr in prop::sample::select(vec![12u64, 17, 18, 20, 24, 29, 32, 34]),
        cmd in 0u64..32,
        a1 in arg(),
        a2 in arg(),
        mem in prop::collection::vec(any::<u8>(), 64),
    ) {
        let w = if wide { GuestWidth::Bits64 } else { GuestWidth::Bits32 };
        let e = env(w);
        e.v.poke(BUF, &mem);
        e.v.poke(STRADDLE, &mem[..16]);
        check(&e.call(nr, &[cmd, a1, a2]))?;
        e.alive();
    }
}

#[derive(Debug, Clone)]
enum GrantStep {
    /// The guest scribbles on grant frame 0.
    Scribble(usize, u64),
    Map(u32, bool),
    Unmap(usize),
    CopyFrom(u32, usize, usize),
    CopyTo(u32, usize, usize),
    /// A grant table hypercall on guest memory at BUF.
    Op(u64, u64),
}

fn grant_step() -> impl Strategy<Value = GrantStep> {
    prop_oneof![
        3 => (0usize..4096, any::<u64>()).prop_map(|(o, v)| GrantStep::Scribble(o, v)),
        2 => (0u32..600, any::<bool>()).prop_map(|(g, r)| GrantStep::Map(g, r)),
        1 => (0usize..8).prop_map(GrantStep::Unmap),
        1 => (0u32..600, 0usize..5000, 0usize..300).prop_map(|(g, o, l)| GrantStep::CopyFrom(g, o, l)),
        1 => (0u32..600, 0usize..5000, 0usize..300).prop_map(|(g, o, l)| GrantStep::CopyTo(g, o, l)),
        2 => (prop::sample::select(vec![2u64, 5, 6, 8, 9, 10]), 0u64..4).prop_map(|(c, n)| GrantStep::Op(c, n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(500), ..ProptestConfig::default() })]

    /// The dom0 grant API and grant hypercalls over entries the guest fills with garbage, in
    /// either version: no panic, errors are GNTST values, and once every mapping is gone and
    /// the entries are clean, no status bit is left set.
    #[test]
    fn grant_api_on_garbage_entries_bounded(
        v2 in any::<bool>(),
        mem in prop::collection::vec(any::<u8>(), 64),
        steps in prop::collection::vec(grant_step(), 1..24),
    ) {
        let e = env(GuestWidth::Bits64);
        if v2 {
            e.v.poke(BUF, &2u32.to_le_bytes());
            prop_assert_eq!(e.call(20, &[8, BUF, 1]), Outcome::Return(0));
        }
        let f = e.d.grant_frame(0).expect("frame 0");
        let mut handles = Vec::new();
        for s in &steps {
            match *s {
                GrantStep::Scribble(o, v) => f.store_u64(o & !7, v, std::sync::atomic::Ordering::SeqCst),
                GrantStep::Map(g, ro) => match e.d.grant_map(g, 1, ro) {
                    Ok(m) => handles.push(m.handle),
                    Err(hypercalls::Error::Grant(st)) => prop_assert!((-13..0).contains(&st)),
                    Err(other) => prop_assert!(false, "{other}"),
                },
                GrantStep::Unmap(i) => {
                    if i < handles.len() {
                        let h = handles.swap_remove(i);
                        prop_assert!(e.d.grant_unmap(h).is_ok());
                    }
                }
                GrantStep::CopyFrom(g, o, l) => {
                    let mut b = vec![0u8; l];
                    let _ = e.d.grant_copy_from(g, o, &mut b);
                }
                GrantStep::CopyTo(g, o, l) => {
                    let _ = e.d.grant_copy_to(g, o, &vec![1u8; l]);
                }
                GrantStep::Op(cmd, n) => {
                    e.v.poke(BUF, &mem);
                    check(&e.call(20, &[cmd, BUF, n]))?;
                }
            }
        }
        for h in handles {
            prop_assert!(e.d.grant_unmap(h).is_ok());
        }
        // Clean entries: nothing pinned is left behind.
        f.write(0, &[0u8; 4096]);
        for g in 0..600 {
            prop_assert!(e.d.grant_copy_to(g, 0, &[0]).is_err());
        }
        if let Some(sf) = e.d.grant_status_frame(0) {
            let mut b = [0u8; 4096];
            sf.read(0, &mut b);
            prop_assert!(b.iter().all(|&x| x == 0), "status bits left set");
        }
        e.alive();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(300), ..ProptestConfig::default() })]

    /// Balloon sequences (decrease, populate, increase, remove_from_physmap) with frames near
    /// RAM edges and holes, arbitrary orders, counts and flags: no panic, every result is a
    /// count no larger than the request (or an errno for remove), and the reservation the
    /// guest sees matches what was released and populated.
    #[test]
    fn balloon_sequences_consistent(
        wide in any::<bool>(),
        steps in prop::collection::vec((
            prop::sample::select(vec![0u64, 1, 6, 15]),
            prop::collection::vec(prop_oneof![0x9du64..0xa2, 0xff00u64..0x10002, 0x1000u64..0x1400, any::<u64>()], 0..6),
            prop_oneof![4 => Just(0u32), 1 => 0u32..12],
            prop_oneof![4 => Just(0u32), 1 => any::<u32>()],
        ), 1..20),
    ) {
        let w = if wide { GuestWidth::Bits64 } else { GuestWidth::Bits32 };
        let e = env(w);
        let list = BUF + 0x1000;
        let cur = |e: &Env| {
            e.v.poke(BUF + 0x800, &0x7ff0u16.to_le_bytes());
            e.ret(12, &[3, BUF + 0x800])
        };
        let start = cur(&e);
        for (cmd, gfns, order, flags) in &steps {
            let n = gfns.len() as u64;
            if *cmd == 15 {
                let g = gfns.first().copied().unwrap_or(0);
                let mut b = [0u8; 16];
                b[..2].copy_from_slice(&0x7ff0u16.to_le_bytes());
                if e.is_64() { b[8..].copy_from_slice(&g.to_le_bytes()) } else { b[4..8].copy_from_slice(&(g as u32).to_le_bytes()) }
                e.v.poke(BUF, &b);
                let r = e.ret(12, &[15, BUF]);
                prop_assert!(r == 0 || r == ENOENT, "remove {r}");
                continue;
            }
            let mut b = [0u8; 32];
            if e.is_64() {
                b[..8].copy_from_slice(&list.to_le_bytes());
                b[8..16].copy_from_slice(&n.to_le_bytes());
                b[16..20].copy_from_slice(&order.to_le_bytes());
                b[20..24].copy_from_slice(&flags.to_le_bytes());
                b[24..26].copy_from_slice(&0x7ff0u16.to_le_bytes());
                for (i, g) in gfns.iter().enumerate() { e.v.poke(list + 8 * i as u64, &g.to_le_bytes()); }
            } else {
                b[..4].copy_from_slice(&(list as u32).to_le_bytes());
                b[4..8].copy_from_slice(&(n as u32).to_le_bytes());
                b[8..12].copy_from_slice(&order.to_le_bytes());
                b[12..16].copy_from_slice(&flags.to_le_bytes());
                b[16..18].copy_from_slice(&0x7ff0u16.to_le_bytes());
                for (i, g) in gfns.iter().enumerate() { e.v.poke(list + 4 * i as u64, &(*g as u32).to_le_bytes()); }
            }
            e.v.poke(BUF, &b);
            let r = e.ret(12, &[*cmd, BUF]);
            prop_assert!((0..=n as i64).contains(&r), "cmd {cmd}: {r} of {n}");
        }
        // Pages released minus populated (of frames that were out) is the reservation change.
        let mut out = std::collections::BTreeSet::new();
        for c in e.p.take_calls() {
            match c {
                hypercalls::testing::Call::Release(v) => { for g in v { prop_assert!(out.insert(g), "released twice: {g:#x}"); } }
                hypercalls::testing::Call::Populate(v) => { for g in v { out.remove(&g); } }
                _ => {}
            }
        }
        let unmapped_growth = cur(&e) - (start - out.len() as i64);
        prop_assert!(unmapped_growth >= 0, "reservation below what was released");
        e.alive();
    }
}
