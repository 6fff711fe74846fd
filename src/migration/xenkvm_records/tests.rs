use proptest::prelude::*;

use super::*;
use crate::migration::stream::tests::config;

fn sample() -> XenState {
    XenState {
        clock: Some(ClockState {
            tsc_khz: 2_000_000,
            system_time_ns: 5_000_000_000,
            guest_tsc: 10_000_000_000,
        }),
        shared_info_gfn: Some(Some(0xfeff0)),
        vcpus: vec![
            VcpuXenState {
                id: 0,
                vcpu_info_gpa: Some(0x1234_0040),
                time_area_gpa: None,
                runstate_area_gpa: Some(0x5000),
                runstate: Runstate {
                    state: 0,
                    state_entry_time: 4_900_000_000,
                    time: [4_000_000_000, 100, 900_000_000, 0],
                },
                upcall_vector: 0xf3,
                oneshot_remaining_ns: Some(10_000_000),
                periodic_ns: None,
            },
            VcpuXenState {
                id: 1,
                periodic_ns: Some(1_000_000),
                ..Default::default()
            },
        ],
        evtchn: Some((
            0,
            vec![
                EvtchnPort {
                    port: 1,
                    state: 5,
                    vcpu: 0,
                    a: 0,
                    ..Default::default()
                },
                EvtchnPort {
                    port: 3,
                    state: 3,
                    vcpu: 1,
                    a: 0,
                    b: 7,
                    priority: 7,
                },
            ],
        )),
        gnttab: Some(GnttabState {
            version: 1,
            nr_frames: 2,
            frames: vec![GrantFrame {
                index: 0,
                status: false,
                gfn: 0xf0000,
            }],
        }),
        xenstore: Some(XenstoreState {
            ring_gfn: 0xfeffc,
            port: 2,
            nodes: vec![XsNode {
                path: "/local/domain/1/data/test".into(),
                value: b"hello".to_vec(),
                perms: vec![(1, b'n'), (0, b'r')],
            }],
            watches: vec![("/local/domain/1/control".into(), "tok".into())],
        }),
        pages: vec![SavedPage {
            kind: PageKind::SharedInfo,
            data: vec![0xa5; extra::PAGE_LEN],
        }],
        domain_extra: Some(DomainExtra {
            width: 1,
            vm_assist: 1 << 5,
            params: vec![(0, 2 << 56 | 0xf3), (1, 0xfeffc)],
        }),
        vcpu_extra: vec![VcpuExtra {
            id: 0,
            up: true,
            initialised: true,
            periodic_since_last_ns: Some(300),
            fifo_control_gpa: Some(0x1234_5000),
            fifo_tails: [3; 16],
            runstate_area: Some(RunstateAreaPieces {
                compat32: false,
                pieces: vec![(0x14efe8, 24), (0x14f000, 24)],
            }),
        }],
        fifo: Some(FifoState {
            array_gfns: vec![0x142],
            ports: vec![FifoPort {
                port: 3,
                vcpu: 1,
                priority: 7,
                pending: true,
            }],
        }),
        xs_transactions: vec![4, 9],
    }
}

#[test]
fn xen_state_sample_round_trips() {
    let s = sample();
    let b = encode(&s);
    assert_eq!(&b[..8], &MAGIC);
    assert_eq!(decode(&b).unwrap(), s);
}

#[test]
fn xen_state_empty_round_trips() {
    let s = XenState::default();
    assert_eq!(decode(&encode(&s)).unwrap(), s);
}

#[test]
fn xen_state_record_type_is_optional() {
    assert_ne!(REC_XENKVM_XEN_STATE & REC_TYPE_OPTIONAL, 0);
}

#[test]
fn xen_state_every_truncation_is_refused() {
    let b = encode(&sample());
    for n in 0..b.len() {
        assert!(decode(&b[..n]).is_err(), "prefix of {n} bytes accepted");
    }
}

#[test]
fn xen_state_duplicate_vcpu_is_refused() {
    let mut s = sample();
    s.vcpus[1].id = 0;
    let e = decode(&encode(&s)).unwrap_err();
    assert!(e.why.contains("VCPU 0 appears twice"), "{e}");
}

#[test]
fn xen_state_bad_runstate_names_its_offset() {
    let mut b = encode(&sample());
    // First section is CLOCK (8 + 24 bytes after the 16-byte header), then
    // DOMAIN (8 + 8), then VCPU 0: state at body offset 32.
    let vcpu_body = 16 + 32 + 16 + 8;
    b[vcpu_body + 32] = 9;
    let e = decode(&b).unwrap_err();
    assert_eq!(e.offset, vcpu_body + 32, "{e}");
    assert!(e.why.contains("runstate state 9"), "{e}");
}

#[test]
fn xen_state_unknown_section_is_skipped() {
    let mut b = encode(&XenState::default());
    b[12] = 1; // one section
    b.extend_from_slice(&99u32.to_le_bytes());
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&[1, 2, 3]);
    assert_eq!(decode(&b).unwrap(), XenState::default());
}

#[test]
fn xen_state_huge_count_is_refused_without_allocating() {
    let mut b = encode(&XenState::default());
    b[12] = 1;
    b.extend_from_slice(&tag::EVTCHN.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    let e = decode(&b).unwrap_err();
    assert!(e.why.contains("do not fit"), "{e}");
}

#[test]
fn runstate_rebased_keeps_time_in_state_and_moves_entry_by_clock_delta() {
    let r = Runstate {
        state: 0,
        state_entry_time: 900,
        time: [500, 100, 200, 0],
    };
    let n = r.rebased(1000, 50);
    assert_eq!(n.time, r.time);
    assert_eq!(
        n.state_entry_time,
        0 /* 50 - (1000 - 900), saturating */
    );
    let n = r.rebased(1000, 7000);
    assert_eq!(n.state_entry_time, 6900);
    assert_eq!(7000 - n.state_entry_time, 1000 - r.state_entry_time);
}

#[test]
fn runstate_continued_counts_the_gap_offline_and_keeps_the_invariant() {
    let r = Runstate {
        state: 2,
        state_entry_time: 900,
        time: [500, 100, 200, 0],
    };
    let offset = |r: &Runstate| r.state_entry_time - r.time.iter().sum::<u64>();
    let n = r.continued(1000, 5000);
    assert_eq!(n.time, [500, 100, 200, 4000]);
    assert_eq!(n.state_entry_time, 4900, "100 ns in the current state kept");
    assert_eq!(offset(&n), offset(&r));
    for (a, b) in r.time.iter().zip(n.time) {
        assert!(b >= *a);
    }
    // A clock behind: nothing moves, nothing decreases.
    assert_eq!(r.continued(1000, 10), r);
}

#[test]
fn xen_state_from_snapshot_turns_deadlines_into_remaining_time_and_decodes() {
    let snap = hypercalls::DomainSnapshot {
        shared_info_gfn: Some(0xfeff0),
        grant_version: 1,
        grant_frames: 1,
        grant_placed: vec![(0, false, 0xf0000)],
        fifo: false,
        ports: vec![hypercalls::PortSnapshot {
            port: 1,
            state: 5,
            vcpu: 0,
            priority: 7,
            a: 0,
            b: 0,
            fifo_pending: false,
            last_q: (0, 0),
        }],
        vcpus: vec![
            hypercalls::VcpuSnapshot {
                upcall_vector: 0xf3,
                singleshot_deadline: Some(1_500),
                periodic_ns: None,
                ..Default::default()
            },
            hypercalls::VcpuSnapshot {
                upcall_vector: 0,
                singleshot_deadline: Some(500),
                periodic_ns: Some(10_000_000),
                periodic_last: Some(400),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let clock = ClockState {
        tsc_khz: 1_000_000,
        system_time_ns: 1_000,
        guest_tsc: 1_000,
    };
    let rs = [hypercalls::RunstateInfo {
        state: 2,
        state_entry_time: 900,
        time: [600, 0, 300, 0],
    }];
    let s = from_snapshot(&snap, clock, &rs);
    assert_eq!(s.vcpus[0].runstate.time, [600, 0, 300, 0]);
    assert_eq!(s.vcpus[0].runstate.state, 2);
    assert_eq!(
        s.vcpus[1].runstate,
        Runstate::default(),
        "no runstate given"
    );
    assert_eq!(s.vcpus[0].oneshot_remaining_ns, Some(500));
    assert_eq!(
        s.vcpus[1].oneshot_remaining_ns,
        Some(0),
        "a due timer stays due"
    );
    assert_eq!(s.vcpus[1].periodic_ns, Some(10_000_000));
    assert_eq!(s.shared_info_gfn, Some(Some(0xfeff0)));
    assert_eq!(s.vcpu_extra[1].periodic_since_last_ns, Some(600));
    assert_eq!(decode(&encode(&s)).unwrap(), s);
    // Back on a clock that reads 5000: deadlines move with it.
    let back = to_snapshot(&s, 5_000, &|_| true);
    assert_eq!(back.vcpus[0].singleshot_deadline, Some(5_500));
    assert_eq!(back.vcpus[1].singleshot_deadline, Some(5_000));
    assert_eq!(back.vcpus[1].periodic_last, Some(4_400));
    assert_eq!(back.ports, snap.ports);
    assert_eq!(back.grant_placed, snap.grant_placed);
}

fn arb_opt_u64() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![Just(None), (0..u64::MAX).prop_map(Some)]
}

fn arb_vcpu() -> impl Strategy<Value = VcpuXenState> {
    (
        (0..MAX_VCPUS, arb_opt_u64(), arb_opt_u64(), arb_opt_u64()),
        (0u32..4, any::<u64>(), any::<[u64; 4]>()),
        (
            any::<u8>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
        ),
    )
        .prop_map(
            |((id, vi, ta, ra), (state, set, time), (v, o, p))| VcpuXenState {
                id,
                vcpu_info_gpa: vi,
                time_area_gpa: ta,
                runstate_area_gpa: ra,
                runstate: Runstate {
                    state,
                    state_entry_time: set,
                    time,
                },
                upcall_vector: v,
                oneshot_remaining_ns: o,
                periodic_ns: p,
            },
        )
}

fn arb_path() -> impl Strategy<Value = String> {
    "/[a-z0-9/_-]{0,40}"
}

fn arb_state() -> impl Strategy<Value = XenState> {
    let ports = proptest::collection::btree_map(
        1..=MAX_PORT,
        (
            1u8..=6,
            any::<u8>(),
            0..MAX_VCPUS,
            any::<u32>(),
            any::<u32>(),
        ),
        0..8,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(port, (state, priority, vcpu, a, b))| EvtchnPort {
                port,
                state,
                priority,
                vcpu,
                a,
                b,
            })
            .collect::<Vec<_>>()
    });
    let frames =
        proptest::collection::btree_map((0..MAX_GRANT_FRAMES, any::<bool>()), any::<u64>(), 0..4)
            .prop_map(|m| {
                m.into_iter()
                    .map(|((index, status), gfn)| GrantFrame { index, status, gfn })
                    .collect::<Vec<_>>()
            });
    let nodes = proptest::collection::btree_map(
        arb_path(),
        (
            proptest::collection::vec(any::<u8>(), 0..16),
            proptest::collection::vec(
                (
                    any::<u16>(),
                    prop_oneof![Just(b'n'), Just(b'r'), Just(b'w'), Just(b'b')],
                ),
                0..3,
            ),
        ),
        0..6,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(path, (value, perms))| XsNode { path, value, perms })
            .collect::<Vec<_>>()
    });
    let vcpus = proptest::collection::btree_map(0..MAX_VCPUS, arb_vcpu(), 0..4).prop_map(|m| {
        m.into_iter()
            .map(|(id, v)| VcpuXenState { id, ..v })
            .collect::<Vec<_>>()
    });
    let base = (
        proptest::option::of((any::<u32>(), any::<u64>(), any::<u64>())),
        proptest::option::of(arb_opt_u64()),
        vcpus,
        proptest::option::of((0u32..2, ports)),
        proptest::option::of((1u32..=2, 0..=MAX_GRANT_FRAMES, frames)),
        proptest::option::of((
            any::<u64>(),
            any::<u32>(),
            nodes,
            proptest::collection::vec((arb_path(), "[a-z0-9]{0,8}"), 0..3),
        )),
    )
        .prop_map(|(clock, si, vcpus, evtchn, gnttab, xs)| (clock, si, vcpus, evtchn, gnttab, xs));
    let txs = proptest::collection::btree_set(1u32.., 0..4)
        .prop_map(|s| s.into_iter().collect::<Vec<_>>());
    (base, arb_extra(), txs).prop_map(
        |(
            (clock, si, vcpus, evtchn, gnttab, xs),
            (pages, domain_extra, vcpu_extra, fifo),
            xs_transactions,
        )| {
            XenState {
                clock: clock.map(|(tsc_khz, system_time_ns, guest_tsc)| ClockState {
                    tsc_khz,
                    system_time_ns,
                    guest_tsc,
                }),
                shared_info_gfn: si,
                vcpus,
                evtchn,
                gnttab: gnttab.map(|(version, nr_frames, frames)| GnttabState {
                    version,
                    nr_frames,
                    frames,
                }),
                xenstore: xs.map(|(ring_gfn, port, nodes, watches)| XenstoreState {
                    ring_gfn,
                    port,
                    nodes,
                    watches,
                }),
                pages,
                domain_extra,
                vcpu_extra,
                fifo,
                xs_transactions,
            }
        },
    )
}

type Extra = (
    Vec<SavedPage>,
    Option<DomainExtra>,
    Vec<VcpuExtra>,
    Option<FifoState>,
);

fn arb_extra() -> impl Strategy<Value = Extra> {
    let kind = prop_oneof![
        Just(PageKind::SharedInfo),
        (0..MAX_GRANT_FRAMES).prop_map(PageKind::Grant),
        (0..MAX_GRANT_FRAMES).prop_map(PageKind::GrantStatus),
    ];
    let pages = proptest::collection::btree_map(kind, any::<u8>(), 0..3).prop_map(|m| {
        m.into_iter()
            .map(|(kind, b)| SavedPage {
                kind,
                data: vec![b; extra::PAGE_LEN],
            })
            .collect::<Vec<_>>()
    });
    let dom = proptest::option::of((
        0u32..=2,
        any::<u64>(),
        proptest::collection::btree_map(0..extra::MAX_PARAM, any::<u64>(), 0..6),
    ))
    .prop_map(|d| {
        d.map(|(width, vm_assist, p)| DomainExtra {
            width,
            vm_assist,
            params: p.into_iter().collect(),
        })
    });
    let area = proptest::option::of((
        any::<bool>(),
        proptest::collection::vec((0..u64::MAX / 2, 1u64..=48), 1..=extra::MAX_PIECES),
    ))
    .prop_map(|a| a.map(|(compat32, pieces)| RunstateAreaPieces { compat32, pieces }));
    let vx = proptest::collection::btree_map(
        0..MAX_VCPUS,
        (
            any::<[bool; 2]>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::array::uniform16(0..=MAX_PORT),
            area,
        ),
        0..3,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(
                |(id, ([up, initialised], since, cb, fifo_tails, runstate_area))| VcpuExtra {
                    id,
                    up,
                    initialised,
                    periodic_since_last_ns: since,
                    fifo_control_gpa: cb,
                    fifo_tails,
                    runstate_area,
                },
            )
            .collect::<Vec<_>>()
    });
    let fifo = proptest::option::of((
        proptest::collection::vec(any::<u64>(), 0..4),
        proptest::collection::btree_map(1..=MAX_PORT, (0..MAX_VCPUS, 0u8..16, any::<bool>()), 0..4),
    ))
    .prop_map(|f| {
        f.map(|(array_gfns, ports)| FifoState {
            array_gfns,
            ports: ports
                .into_iter()
                .map(|(port, (vcpu, priority, pending))| FifoPort {
                    port,
                    vcpu,
                    priority,
                    pending,
                })
                .collect(),
        })
    });
    (pages, dom, vx, fifo)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn xen_state_any_state_round_trips(s in arb_state()) {
        prop_assert_eq!(decode(&encode(&s)).unwrap(), s);
    }

    #[test]
    fn xen_state_any_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&b);
    }

    #[test]
    fn xen_state_mutated_body_never_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut b = encode(&sample());
        for (i, v) in flips {
            let i = i.index(b.len());
            b[i] = v;
        }
        let n = cut.index(b.len() + 1);
        if let Ok(s) = decode(&b[..n]) {
            // Whatever is accepted encodes back to something that decodes the same.
            prop_assert_eq!(decode(&encode(&s)).unwrap(), s);
        }
    }
}

#[test]
fn xen_state_xs_tx_section_refuses_id_0_a_repeat_and_a_second_section() {
    let body = |ids: &[u32]| {
        let mut b = Vec::new();
        b.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        for id in ids {
            b.extend_from_slice(&id.to_le_bytes());
        }
        b
    };
    let record = |secs: &[&[u8]]| {
        let mut r = MAGIC.to_vec();
        r.extend_from_slice(&VERSION.to_le_bytes());
        r.extend_from_slice(&(secs.len() as u32).to_le_bytes());
        for s in secs {
            r.extend_from_slice(&tag::XS_TX.to_le_bytes());
            r.extend_from_slice(&(s.len() as u32).to_le_bytes());
            r.extend_from_slice(s);
        }
        r
    };
    assert_eq!(
        decode(&record(&[&body(&[3, 7])])).unwrap().xs_transactions,
        vec![3, 7]
    );
    for (bad, want) in [
        (record(&[&body(&[0])]), "XS_TX id 0"),
        (record(&[&body(&[5, 5])]), "XS_TX id 5"),
        (record(&[&body(&[1]), &body(&[2])]), "XS_TX appears twice"),
        (record(&[&body(&[1; 65])]), "XS_TX count"),
    ] {
        let e = decode(&bad).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}
