//! Every hypercall through `Domain::dispatch`, in both widths: results, Xen errnos for bad
//! sub-ops, unmapped and page-straddling pointers and huge lengths, and that the domain keeps
//! working afterwards.

mod common;

use common::*;
use hypercalls::testing::{Call, FakeVcpu};
use hypercalls::{GuestWidth, Outcome, OverlayId};

// ---- dispatch ------------------------------------------------------------------------------

#[test]
fn dispatch_cpl3_any_number_eperm() {
    for w in both() {
        let mut e = env(w);
        e.v.cpl = 3;
        for n in [0u64, 17, 29, 63, 64, 1000] {
            assert_eq!(e.ret(n, &[0, 0]), EPERM, "nr {n}");
        }
        e.v.cpl = 0;
        e.alive();
    }
}

#[test]
fn dispatch_unknown_numbers_enosys() {
    for w in both() {
        let e = env(w);
        for n in [
            0u64,
            1,
            6,
            13,
            26,
            27,
            33,
            41,
            55,
            63,
            64,
            0x8000_0000,
            u64::MAX,
        ] {
            assert_eq!(e.ret(n, &[BUF, 1, 2]), ENOSYS, "nr {n:#x}");
        }
        e.alive();
    }
}

#[test]
fn dispatch_privileged_interfaces_refused() {
    let e = env(GuestWidth::Bits64);
    for n in [7u64, 35, 36, 42] {
        assert_eq!(e.ret(n, &[BUF]), EPERM, "nr {n}");
    }
    assert_eq!(e.ret(40, &[0, BUF]), EOPNOTSUPP);
}

#[test]
fn dispatch_32bit_guest_ignores_high_register_bits() {
    let e = env(GuestWidth::Bits32);
    let hc = hypercalls::Hypercall {
        nr: (1 << 32) | 17,
        args: [1 << 40, 0, 0, 0, 0, 0],
    };
    assert_eq!(e.d.dispatch(&e.v, &hc), Outcome::Return(0x40011));
}

#[test]
fn dispatch_vcpu_id_outside_domain_einval() {
    let e = env(GuestWidth::Bits64);
    let v = FakeVcpu::new(7, GuestWidth::Bits64);
    assert_eq!(
        e.call_on(&v, nr::XEN_VERSION, &[0, 0]),
        Outcome::Return(EINVAL)
    );
}

// ---- xen_version ---------------------------------------------------------------------------

/// XTF xsa-122's check: the string is NUL-terminated and nothing after it is non-zero.
fn assert_no_leak(buf: &[u8]) {
    let n = buf.iter().position(|&c| c == 0).expect("NUL-terminated");
    assert!(
        buf[n..].iter().all(|&c| c == 0),
        "bytes after the string: {buf:?}"
    );
}

#[test]
fn xen_version_version_is_4_17() {
    for w in both() {
        assert_eq!(env(w).ret(nr::XEN_VERSION, &[0, 0]), (4 << 16) | 17);
    }
}

#[test]
fn xen_version_strings_zero_whole_buffer_even_straddling() {
    for w in both() {
        let e = env(w);
        for (cmd, len) in [(1u64, 16usize), (3, 1024), (4, 64)] {
            for at in [BUF, STRADDLE] {
                e.v.poke(at, &vec![0xaa; len]);
                assert_eq!(e.ret(nr::XEN_VERSION, &[cmd, at]), 0);
                assert_no_leak(&e.v.peek(at, len));
            }
        }
        e.v.poke(STRADDLE, &[0xaa; 144]);
        assert_eq!(e.ret(nr::XEN_VERSION, &[2, STRADDLE]), 0);
        let ci = e.v.peek(STRADDLE, 144);
        for (s, l) in [(0, 64), (64, 16), (80, 32), (112, 32)] {
            assert_no_leak(&ci[s..s + l]);
        }
    }
}

#[test]
fn xen_version_capabilities_lists_hvm_abis() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(e.ret(nr::XEN_VERSION, &[3, BUF]), 0);
    let s = e.v.peek(BUF, 64);
    assert!(s.starts_with(b"hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64 \0"));
}

#[test]
fn xen_version_buffer_subops_unmapped_efault() {
    for w in both() {
        let e = env(w);
        for cmd in [1u64, 2, 3, 4, 5, 6, 8, 9] {
            assert_eq!(e.ret(nr::XEN_VERSION, &[cmd, HOLE]), EFAULT, "cmd {cmd}");
            // Ending in the unmapped page after the window (a compat virt_start is 4 bytes
            // and fits).
            let want = if cmd == 5 && !e.is_64() { 0 } else { EFAULT };
            assert_eq!(
                e.ret(nr::XEN_VERSION, &[cmd, WINDOW_END - 4]),
                want,
                "cmd {cmd}"
            );
        }
        e.alive();
    }
}

#[test]
fn xen_version_get_features_hvm_domu_bits() {
    for w in both() {
        let e = env(w);
        e.v.poke(STRADDLE, &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(e.ret(nr::XEN_VERSION, &[6, STRADDLE]), 0);
        let m = e.v.peek_u32(STRADDLE + 4);
        for bit in [0, 2, 8, 9, 13, 16] {
            assert!(m & (1 << bit) != 0, "bit {bit} missing in {m:#x}");
        }
        for bit in [1, 3, 10, 11, 17] {
            assert!(m & (1 << bit) == 0, "bit {bit} set in {m:#x}");
        }
        e.v.poke(BUF, &[1, 0, 0, 0]);
        assert_eq!(e.ret(nr::XEN_VERSION, &[6, BUF]), EINVAL);
    }
}

#[test]
fn xen_version_platform_parameters_per_width() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(e.ret(nr::XEN_VERSION, &[5, BUF]), 0);
    assert_eq!(e.v.peek_u64(BUF), 0xffff_8000_0000_0000);
    let e = env(GuestWidth::Bits32);
    e.v.poke(BUF, &[0xff; 8]);
    assert_eq!(e.ret(nr::XEN_VERSION, &[5, BUF]), 0);
    assert_eq!(e.v.peek_u32(BUF), 0);
    assert_eq!(
        e.v.peek_u32(BUF + 4),
        0xffff_ffff,
        "compat writes 4 bytes only"
    );
}

#[test]
fn xen_version_pagesize_handle_commandline_build_id() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(e.ret(nr::XEN_VERSION, &[7, 0]), 4096);
    assert_eq!(e.ret(nr::XEN_VERSION, &[7, BUF]), EINVAL);
    assert_eq!(e.ret(nr::XEN_VERSION, &[8, BUF]), 0);
    assert_eq!(e.v.peek(BUF, 16), b"0123456789abcdef");
    e.v.poke(BUF, &[0x55; 32]);
    assert_eq!(e.ret(nr::XEN_VERSION, &[9, BUF]), 0);
    assert_eq!(&e.v.peek(BUF, 10), b"<denied>\0\x55");
    assert_eq!(e.ret(nr::XEN_VERSION, &[10, BUF]), EPERM);
    assert_eq!(e.ret(nr::XEN_VERSION, &[10, 0]), EPERM);
}

#[test]
fn xen_version_unknown_subops_enosys() {
    let e = env(GuestWidth::Bits64);
    for cmd in [11u64, 12, 0x7fff_ffff, 0xffff_ffff, 0x1_0000_000b] {
        assert_eq!(e.ret(nr::XEN_VERSION, &[cmd, BUF]), ENOSYS, "cmd {cmd:#x}");
    }
    // `int cmd`: the upper half of RDI is not part of the command.
    assert_eq!(e.ret(nr::XEN_VERSION, &[1 << 32, 0]), 0x40011);
}

// ---- console_io ----------------------------------------------------------------------------

#[test]
fn console_write_filters_and_straddles() {
    for w in both() {
        let e = env(w);
        let msg = b"hello\r\n\x01world\t!\n";
        e.v.poke(BUF + 0x1000 - 5, msg);
        assert_eq!(
            e.ret(nr::CONSOLE_IO, &[0, msg.len() as u64, BUF + 0x1000 - 5]),
            0
        );
        assert_eq!(&*e.p.console.lock(), b"hello\nworld\t!\n");
    }
}

#[test]
fn console_write_zero_length_touches_nothing() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(e.ret(nr::CONSOLE_IO, &[0, 0, HOLE]), 0);
}

#[test]
fn console_write_unmapped_efault_after_mapped_prefix() {
    let e = env(GuestWidth::Bits64);
    e.v.poke(WINDOW_END - 3, b"abc");
    assert_eq!(e.ret(nr::CONSOLE_IO, &[0, 10, WINDOW_END - 3]), EFAULT);
    assert_eq!(&*e.p.console.lock(), b"abc");
    assert_eq!(e.ret(nr::CONSOLE_IO, &[0, 1, HOLE]), EFAULT);
    e.alive();
}

#[test]
fn console_write_huge_length_bounded_then_efault() {
    for w in both() {
        let e = env(w);
        // 16 MiB of zeros, then a hole; a length of 4 GiB - 1 and one "negative" as int.
        e.v.map_zero(0x4000_0000, 16 << 20);
        for len in [0xffff_ffffu64, 0x8000_0000] {
            assert_eq!(e.ret(nr::CONSOLE_IO, &[0, len, 0x4000_0000]), EFAULT);
        }
        assert!(e.p.console.lock().is_empty(), "zeros are not printable");
        e.alive();
    }
}

#[test]
fn console_read_returns_pending_input() {
    for w in both() {
        let e = env(w);
        assert_eq!(e.ret(nr::CONSOLE_IO, &[1, 16, BUF]), 0);
        e.p.input.lock().extend(b"xyz");
        assert_eq!(e.ret(nr::CONSOLE_IO, &[1, 2, STRADDLE + 7]), 2);
        assert_eq!(e.v.peek(STRADDLE + 7, 2), b"xy");
        assert_eq!(e.ret(nr::CONSOLE_IO, &[1, 16, BUF]), 1);
        assert_eq!(e.v.peek(BUF, 1), b"z");
    }
}

#[test]
fn console_read_huge_count_e2big_and_unmapped_efault() {
    let e = env(GuestWidth::Bits64);
    assert_eq!(e.ret(nr::CONSOLE_IO, &[1, 0x8000_0000, BUF]), E2BIG);
    e.p.input.lock().extend(b"q");
    assert_eq!(e.ret(nr::CONSOLE_IO, &[1, 4, HOLE]), EFAULT);
    assert_eq!(e.ret(nr::CONSOLE_IO, &[2, 4, BUF]), ENOSYS);
    e.alive();
}

// ---- memory_op -----------------------------------------------------------------------------

/// `xen_add_to_physmap` in the guest's layout.
fn xatp(e: &Env, domid: u16, space: u32, idx: u64, gpfn: u64) -> Vec<u8> {
    if e.is_64() {
        st(
            24,
            &[
                (0, &le16(domid)),
                (4, &space.to_le_bytes()),
                (8, &idx.to_le_bytes()),
                (16, &gpfn.to_le_bytes()),
            ],
        )
    } else {
        st(
            16,
            &[
                (0, &le16(domid)),
                (4, &space.to_le_bytes()),
                (8, &(idx as u32).to_le_bytes()),
                (12, &(gpfn as u32).to_le_bytes()),
            ],
        )
    }
}

#[test]
fn memory_add_to_physmap_shared_info_places_and_moves() {
    for w in both() {
        let e = env(w);
        e.v.poke(STRADDLE, &xatp(&e, 0x7ff0, 0, 0, 0x1234));
        assert_eq!(e.ret(nr::MEMORY_OP, &[7, STRADDLE]), 0);
        assert_eq!(
            e.d.overlay_gfn(OverlayId::SharedInfo).map(|g| g.get()),
            Some(0x1234)
        );
        e.v.poke(BUF, &xatp(&e, 1, 0, 0, 0x2000));
        assert_eq!(e.ret(nr::MEMORY_OP, &[7, BUF]), 0);
        assert_eq!(
            e.d.overlay_gfn(OverlayId::SharedInfo).map(|g| g.get()),
            Some(0x2000)
        );
        assert_eq!(
            e.p.take_calls(),
            vec![
                Call::Place(OverlayId::SharedInfo, 0x1234),
                Call::Place(OverlayId::SharedInfo, 0x2000)
            ]
        );
    }
}

/// A domain a guest resumes in after its own suspend: the shared_info it
/// places has every 2-level event channel masked (64-bit: 4096 bits at
/// 2560; 32-bit: 1024 bits at 2176), once; the pending bits are untouched;
/// a domain not marked so keeps its page as it is.
#[test]
fn memory_add_to_physmap_shared_info_of_a_resumed_domain_starts_masked() {
    for w in both() {
        let (base, len) = if w == GuestWidth::Bits64 {
            (2560, 512)
        } else {
            (2176, 128)
        };
        let e = env(w);
        let read = |off: usize, n: usize| {
            let mut b = vec![0u8; n];
            e.d.shared_info().read(off, &mut b);
            b
        };
        e.v.poke(BUF, &xatp(&e, 0x7ff0, 0, 0, 0x1234));
        assert_eq!(e.ret(nr::MEMORY_OP, &[7, BUF]), 0);
        assert!(
            read(base, len).iter().all(|&b| b == 0),
            "{w:?}: a booted domain"
        );
        e.d.mask_events_at_resume();
        assert_eq!(e.ret(nr::MEMORY_OP, &[7, BUF]), 0);
        assert!(read(base, len).iter().all(|&b| b == 0xff), "{w:?}: masked");
        assert!(
            read(2048, 128).iter().all(|&b| b == 0),
            "{w:?}: pending untouched"
        );
        // The guest unmasks port 3; placing the page again keeps that.
        e.d.shared_info().write(base, &[0xf7]);
        assert_eq!(e.ret(nr::MEMORY_OP, &[7, BUF]), 0);
        assert_eq!(read(base, 1), vec![0xf7], "{w:?}: masked once");
    }
}

#[test]
fn memory_add_to_physmap_bad_input_errnos() {
    for w in both() {
        let e = env(w);
        // INVALID_GFN (64-bit; a compat gpfn cannot express it).
        let invalid = if e.is_64() { u64::MAX } else { 0x100 };
        let invalid_want = if e.is_64() { EINVAL } else { EPERM };
        let cases: [(u16, u32, u64, u64, i64); 8] = [
            (0x7ff0, 0, 1, 0x100, EINVAL), // shared_info idx != 0
            (
                if e.is_64() { 0x7ff0 } else { 0 },
                0,
                0,
                invalid,
                invalid_want,
            ),
            (0x7ff0, 4, 0, 0x100, ENOSYS),  // gmfn_foreign
            (0x7ff0, 5, 0, 0x100, EACCES),  // dev_mmio
            (0x7ff0, 9, 0, 0x100, EINVAL),  // unknown space
            (0x7ff0, 1, 64, 0x100, EINVAL), // grant frame beyond max_grant_frames
            (0, 0, 0, 0x100, EPERM),        // dom0
            (42, 0, 0, 0x100, ESRCH),       // no such domain
        ];
        for (dom, space, idx, gpfn, want) in cases {
            e.v.poke(BUF, &xatp(&e, dom, space, idx, gpfn));
            assert_eq!(
                e.ret(nr::MEMORY_OP, &[7, BUF]),
                want,
                "{dom} {space} {idx} {gpfn:#x}"
            );
        }
        assert_eq!(e.ret(nr::MEMORY_OP, &[7, HOLE]), EFAULT);
        assert_eq!(e.ret(nr::MEMORY_OP, &[7, WINDOW_END - 8]), EFAULT);
        assert_eq!(e.ret(nr::MEMORY_OP, &[7 | (0x1_0000 << 6), BUF]), EDOM);
        assert!(e.p.take_calls().is_empty());
        e.alive();
    }
}

#[test]
fn memory_add_to_physmap_grant_frames_grow_and_displace() {
    let e = env(GuestWidth::Bits64);
    for i in 0..4u64 {
        e.v.poke(BUF, &xatp(&e, 0x7ff0, 1, i, 0xf000 + i));
        assert_eq!(e.ret(nr::MEMORY_OP, &[7, BUF]), 0);
    }
    // shared_info placed over grant frame 2 unplaces it.
    e.v.poke(BUF, &xatp(&e, 0x7ff0, 0, 0, 0xf002));
    assert_eq!(e.ret(nr::MEMORY_OP, &[7, BUF]), 0);
    assert_eq!(e.d.overlay_gfn(OverlayId::GrantFrame(2)), None);
    assert_eq!(
        e.d.overlay_gfn(OverlayId::GrantFrame(3)).map(|g| g.get()),
        Some(0xf003)
    );
    // query_size sees 4 frames.
    e.v.poke(BUF, &st(16, &[(0, &le16(0x7ff0))]));
    assert_eq!(e.ret(nr::GRANT_TABLE_OP, &[6, BUF, 1]), 0);
    assert_eq!(e.v.peek_u32(BUF + 4), 4);
}

#[test]
fn memory_memory_map_copies_min_entries() {
    for w in both() {
        let e = env(w);
        let hdr = |n: u32, buf: u64| {
            if e.is_64() {
                st(16, &[(0, &n.to_le_bytes()), (8, &buf.to_le_bytes())])
            } else {
                st(
                    8,
                    &[(0, &n.to_le_bytes()), (4, &(buf as u32).to_le_bytes())],
                )
            }
        };
        e.v.poke(STRADDLE, &hdr(2, BUF + 0x2000 - 30));
        assert_eq!(e.ret(nr::MEMORY_OP, &[9, STRADDLE]), 0);
        assert_eq!(e.v.peek_u32(STRADDLE), 2);
        let ent = e.v.peek(BUF + 0x2000 - 30, 40);
        assert_eq!(&ent[20..28], &0x10_0000u64.to_le_bytes());
        assert_eq!(&ent[36..40], &1u32.to_le_bytes());
        e.v.poke(BUF, &hdr(1000, BUF + 0x100));
        assert_eq!(e.ret(nr::MEMORY_OP, &[9, BUF]), 0);
        assert_eq!(e.v.peek_u32(BUF), 3);
        e.v.poke(BUF, &hdr(3, HOLE));
        assert_eq!(e.ret(nr::MEMORY_OP, &[9, BUF]), EFAULT);
        assert_eq!(e.ret(nr::MEMORY_OP, &[9, HOLE]), EFAULT);
    }
}

#[test]
fn memory_reservation_queries() {
    let e = env(GuestWidth::Bits64);
    let ram = 0x9f + 0xff00;
    assert_eq!(e.ret(nr::MEMORY_OP, &[2, 0]), 0x1_0000);
    assert_eq!(e.ret(nr::MEMORY_OP, &[2 | (1 << 6), 0]), EINVAL);
    e.v.poke(BUF, &le16(0x7ff0));
    assert_eq!(e.ret(nr::MEMORY_OP, &[3, BUF]), ram);
    assert_eq!(e.ret(nr::MEMORY_OP, &[4, BUF]), ram);
    assert_eq!(e.ret(nr::MEMORY_OP, &[14, BUF]), 0xffff);
    assert_eq!(e.ret(nr::MEMORY_OP, &[3 | (5 << 6), BUF]), EINVAL);
    e.v.poke(BUF, &le16(3));
    assert_eq!(e.ret(nr::MEMORY_OP, &[3, BUF]), ESRCH);
    e.v.poke(BUF, &le16(0));
    assert_eq!(e.ret(nr::MEMORY_OP, &[4, BUF]), EPERM);
    assert_eq!(e.ret(nr::MEMORY_OP, &[3, HOLE]), EFAULT);
}

#[test]
fn memory_other_ops_enosys() {
    let e = env(GuestWidth::Bits64);
    e.v.poke(BUF, &st(40, &[(0, &le16(0x7ff0))]));
    assert_eq!(e.ret(nr::MEMORY_OP, &[26, BUF]), EOPNOTSUPP, "no vNUMA");
    e.v.poke(BUF, &st(40, &[(0, &le16(0x7ff0)), (2, &le16(1))]));
    assert_eq!(e.ret(nr::MEMORY_OP, &[26, BUF]), EINVAL, "pad");
    e.v.poke(BUF, &st(40, &[(0, &le16(4))]));
    assert_eq!(e.ret(nr::MEMORY_OP, &[26, BUF]), ESRCH);
    assert_eq!(e.ret(nr::MEMORY_OP, &[26, WINDOW_END - 32]), EFAULT);
    for op in [5u64, 8, 10, 11, 12, 23, 63] {
        assert_eq!(e.ret(nr::MEMORY_OP, &[op, BUF]), ENOSYS, "op {op}");
    }
    // The reservation ops return a count (0 here: domid 4 does not exist), see balloon.rs.
    for op in [0u64, 1, 6] {
        assert_eq!(e.ret(nr::MEMORY_OP, &[op, BUF]), 0, "op {op}");
    }
    assert_eq!(e.ret(nr::MEMORY_OP, &[13, BUF]), EPERM);
}

// ---- hvm_op --------------------------------------------------------------------------------

fn hvm_param(domid: u16, idx: u32, val: u64) -> Vec<u8> {
    st(
        16,
        &[
            (0, &le16(domid)),
            (4, &idx.to_le_bytes()),
            (8, &val.to_le_bytes()),
        ],
    )
}

#[test]
fn hvm_get_param_store_and_console() {
    for w in both() {
        let e = env(w);
        e.d.set_param_internal(1, 0xfeffc).expect("param");
        e.d.set_param_internal(2, 3).expect("param");
        e.v.poke(STRADDLE, &hvm_param(0x7ff0, 1, 0));
        assert_eq!(e.ret(nr::HVM_OP, &[1, STRADDLE]), 0);
        assert_eq!(e.v.peek_u64(STRADDLE + 8), 0xfeffc);
        e.v.poke(BUF, &hvm_param(1, 2, 0));
        assert_eq!(e.ret(nr::HVM_OP, &[1, BUF]), 0);
        assert_eq!(e.v.peek_u64(BUF + 8), 3);
    }
}

#[test]
fn hvm_param_access_rules_errnos() {
    let e = env(GuestWidth::Bits64);
    let cases: [(u64, u16, u32, i64); 10] = [
        (0, 0x7ff0, 1, EPERM),   // set STORE_PFN
        (0, 0x7ff0, 12, EPERM),  // set IDENT_PT
        (1, 0x7ff0, 12, EPERM),  // get IDENT_PT
        (0, 0x7ff0, 13, EINVAL), // set DM_DOMAIN (deprecated)
        (1, 0x7ff0, 24, EINVAL), // get NESTEDHVM (deprecated)
        (1, 0x7ff0, 39, EINVAL), // index >= HVM_NR_PARAMS
        (1, 0x7ff0, u32::MAX, EINVAL),
        (1, 0, 1, EPERM),        // dom0's params
        (1, 9, 1, ESRCH),        // no such domain
        (0, 0x7ff0, 36, EINVAL), // X87_FIP_WIDTH value 5
    ];
    for (op, dom, idx, want) in cases {
        e.v.poke(BUF, &hvm_param(dom, idx, 5));
        assert_eq!(
            e.ret(nr::HVM_OP, &[op, BUF]),
            want,
            "op {op} dom {dom} idx {idx}"
        );
    }
    assert_eq!(e.ret(nr::HVM_OP, &[1, HOLE]), EFAULT);
    assert_eq!(e.ret(nr::HVM_OP, &[0, WINDOW_END - 8]), EFAULT);
    e.alive();
}

#[test]
fn hvm_set_callback_irq_and_evtchn_params_stick() {
    let e = env(GuestWidth::Bits64);
    let via = (2u64 << 56) | 0xf3;
    e.v.poke(BUF, &hvm_param(0x7ff0, 0, via));
    assert_eq!(e.ret(nr::HVM_OP, &[0, BUF]), 0);
    assert_eq!(e.d.callback_via(), hypercalls::CallbackVia::Vector(0xf3));
    e.v.poke(BUF, &hvm_param(0x7ff0, 18, 7));
    assert_eq!(e.ret(nr::HVM_OP, &[0, BUF]), 0);
    assert_eq!(e.d.param(18), Some(7));
}

#[test]
fn hvm_callback_irq_latches_width_of_caller() {
    let e = env(GuestWidth::Bits32);
    e.d.latch_width(GuestWidth::Bits64);
    e.v.poke(BUF, &hvm_param(0x7ff0, 0, 1));
    assert_eq!(e.ret(nr::HVM_OP, &[0, BUF]), 0);
    assert_eq!(e.d.width(), GuestWidth::Bits32);
}

#[test]
fn hvm_get_time_writes_system_time() {
    let e = env(GuestWidth::Bits32);
    e.p.set_now(123_456_789);
    assert_eq!(e.ret(nr::HVM_OP, &[10, STRADDLE + 4]), 0);
    assert_eq!(e.v.peek_u64(STRADDLE + 4), 123_456_789);
    assert_eq!(e.ret(nr::HVM_OP, &[10, HOLE]), EFAULT);
}

#[test]
fn hvm_upcall_vector_checks() {
    let e = env(GuestWidth::Bits64);
    let uv = |vcpu: u32, vec: u8| st(8, &[(0, &vcpu.to_le_bytes()), (4, &[vec])]);
    e.v.poke(BUF, &uv(1, 0xf3));
    assert_eq!(e.ret(nr::HVM_OP, &[23, BUF]), 0);
    assert_eq!(e.d.upcall_vector(e.d.vcpu(1).expect("vcpu")), Some(0xf3));
    e.v.poke(BUF, &uv(0, 0x0f));
    assert_eq!(e.ret(nr::HVM_OP, &[23, BUF]), EINVAL);
    e.v.poke(BUF, &uv(2, 0xf3));
    assert_eq!(e.ret(nr::HVM_OP, &[23, BUF]), ENOENT);
    assert_eq!(e.ret(nr::HVM_OP, &[23, HOLE]), EFAULT);
}

#[test]
fn hvm_other_ops() {
    let e = env(GuestWidth::Bits64);
    e.v.poke(BUF, &st(16, &[(0, &le16(0x7ff0))]));
    assert_eq!(e.ret(nr::HVM_OP, &[9, BUF]), EINVAL);
    e.v.poke(BUF, &st(16, &[(0, &le16(77))]));
    assert_eq!(e.ret(nr::HVM_OP, &[9, BUF]), ESRCH);
    assert_eq!(e.ret(nr::HVM_OP, &[24, 0]), 0);
    assert_eq!(e.ret(nr::HVM_OP, &[24, BUF]), EINVAL);
    for op in [2u64, 5, 11, 15, 25, 26, 1 << 40] {
        assert_eq!(e.ret(nr::HVM_OP, &[op, BUF]), ENOSYS, "op {op}");
    }
}

// ---- vm_assist and set_timer_op ---------------------------------------------------------------

#[test]
fn vm_assist_only_runstate_update_flag() {
    for w in both() {
        let e = env(w);
        assert_eq!(e.ret(nr::VM_ASSIST, &[0, 5]), 0);
        assert!(e.d.runstate_update_flag());
        assert_eq!(e.ret(nr::VM_ASSIST, &[1, 5]), 0);
        assert!(!e.d.runstate_update_flag());
        for ty in [0u64, 2, 3, 4, 6, 32, 63, 64, 0xffff_ffff] {
            assert_eq!(e.ret(nr::VM_ASSIST, &[0, ty]), EINVAL, "type {ty}");
        }
        assert_eq!(e.ret(nr::VM_ASSIST, &[2, 5]), ENOSYS);
    }
}

#[test]
fn set_timer_op_arms_stops_and_clamps() {
    let e = env(GuestWidth::Bits64);
    e.p.set_now(1_000);
    assert_eq!(e.ret(nr::SET_TIMER_OP, &[5_000]), 0);
    assert_eq!(e.ret(nr::SET_TIMER_OP, &[0]), 0);
    assert_eq!(e.ret(nr::SET_TIMER_OP, &[u64::MAX]), 0); // negative
    assert_eq!(e.ret(nr::SET_TIMER_OP, &[1 << 60]), 0); // > 2^50 ns ahead
    assert_eq!(
        e.p.take_calls(),
        vec![
            Call::Timer(0, Some(5_000)),
            Call::Timer(0, None),
            Call::Timer(0, Some(100_001_000)),
            Call::Timer(0, Some(100_001_000)),
        ]
    );
}

#[test]
fn set_timer_op_compat_joins_lo_hi() {
    let e = env(GuestWidth::Bits32);
    e.p.set_now(1_000);
    assert_eq!(e.ret(nr::SET_TIMER_OP, &[0x10, 0x1]), 0);
    assert_eq!(e.p.take_calls(), vec![Call::Timer(0, Some(0x1_0000_0010))]);
}
