//! The runstate operations of `vcpu_op`: registration by virtual and physical address, layout
//! of `get_runstate_info`, and refusals of bad areas.

mod common;

use common::*;
use hypercalls::testing::Call;
use hypercalls::{GuestWidth, RunstateAreaSpec, RunstateInfo, VcpuAccess};

const GET_RUNSTATE_INFO: u64 = 4;
const REGISTER_RUNSTATE_MEMORY_AREA: u64 = 5;
const REGISTER_RUNSTATE_PHYS_AREA: u64 = 14;

fn last_runstate(e: &Env) -> Option<(u32, Option<RunstateAreaSpec>)> {
    e.p.calls.lock().iter().rev().find_map(|c| match c {
        Call::Runstate(v, a) => Some((*v, a.clone())),
        _ => None,
    })
}

#[test]
fn runstate_register_virtual_straddling_area_reports_pieces_and_width() {
    for w in both() {
        let e = env(w);
        let size = if w == GuestWidth::Bits32 { 44 } else { 48 };
        // The argument {u64 addr} at BUF; the area straddles a page boundary.
        let area = BUF + 0x2000 - 15;
        e.v.write_virt(BUF, &area.to_le_bytes()).unwrap();
        assert_eq!(
            e.ret(nr::VCPU_OP, &[REGISTER_RUNSTATE_MEMORY_AREA, 1, BUF]),
            0
        );
        let (v, spec) = last_runstate(&e).expect("platform told");
        assert_eq!(v, 1);
        let spec = spec.expect("registered");
        assert_eq!(spec.width, w);
        // The fake translates identically, so the two pages merge into one piece.
        assert_eq!(spec.pieces, vec![(area, size)]);
        e.alive();
    }
}

#[test]
fn runstate_register_zero_unregisters_and_unmapped_area_efault() {
    let e = env(GuestWidth::Bits64);
    e.v.write_virt(BUF, &0u64.to_le_bytes()).unwrap();
    assert_eq!(
        e.ret(nr::VCPU_OP, &[REGISTER_RUNSTATE_MEMORY_AREA, 0, BUF]),
        0
    );
    assert_eq!(last_runstate(&e), Some((0, None)));
    // The area's second half is past the mapped window.
    let area = WINDOW_END - 16;
    e.v.write_virt(BUF, &area.to_le_bytes()).unwrap();
    assert_eq!(
        e.ret(nr::VCPU_OP, &[REGISTER_RUNSTATE_MEMORY_AREA, 0, BUF]),
        EFAULT
    );
    assert_eq!(
        e.ret(nr::VCPU_OP, &[REGISTER_RUNSTATE_MEMORY_AREA, 0, HOLE]),
        EFAULT
    );
    assert_eq!(
        e.ret(nr::VCPU_OP, &[REGISTER_RUNSTATE_MEMORY_AREA, 7, BUF]),
        ENOENT
    );
    e.alive();
}

#[test]
fn runstate_register_compat_uses_32bit_handle() {
    let e = env(GuestWidth::Bits32);
    let area = BUF + 0x100;
    // Garbage in the upper half of the union must be ignored for a 32-bit guest.
    e.v.write_virt(BUF, &(area | 0xdead_0000_0000_0000).to_le_bytes())
        .unwrap();
    assert_eq!(
        e.ret(nr::VCPU_OP, &[REGISTER_RUNSTATE_MEMORY_AREA, 0, BUF]),
        0
    );
    assert_eq!(
        last_runstate(&e).unwrap().1.unwrap().pieces,
        vec![(area, 44)]
    );
}

#[test]
fn runstate_register_phys_area_crossing_page_enxio() {
    let e = env(GuestWidth::Bits64);
    e.v.write_virt(BUF, &(0x5000u64 - 8).to_le_bytes()).unwrap();
    assert_eq!(
        e.ret(nr::VCPU_OP, &[REGISTER_RUNSTATE_PHYS_AREA, 0, BUF]),
        ENXIO
    );
    e.v.write_virt(BUF, &0x5008u64.to_le_bytes()).unwrap();
    assert_eq!(
        e.ret(nr::VCPU_OP, &[REGISTER_RUNSTATE_PHYS_AREA, 0, BUF]),
        0
    );
    assert_eq!(
        last_runstate(&e).unwrap().1.unwrap().pieces,
        vec![(0x5008, 48)]
    );
    e.v.write_virt(BUF, &u64::MAX.to_le_bytes()).unwrap();
    assert!(e.ret(nr::VCPU_OP, &[REGISTER_RUNSTATE_PHYS_AREA, 0, BUF]) < 0);
    e.alive();
}

#[test]
fn runstate_get_info_layouts_and_straddling_buffer() {
    for w in both() {
        let e = env(w);
        *e.p.runstate.lock() = RunstateInfo {
            state: 2,
            state_entry_time: 0x1122_3344_5566_7788,
            time: [1, 2, 3, 4],
        };
        assert_eq!(e.ret(nr::VCPU_OP, &[GET_RUNSTATE_INFO, 0, STRADDLE]), 0);
        let mut b = [0u8; 48];
        e.v.read_virt(STRADDLE, &mut b).unwrap();
        let (entry, time, size) = if w == GuestWidth::Bits32 {
            (4, 12, 44)
        } else {
            (8, 16, 48)
        };
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 2);
        assert_eq!(
            u64::from_le_bytes(b[entry..entry + 8].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
        assert_eq!(
            u64::from_le_bytes(b[time + 24..time + 32].try_into().unwrap()),
            4
        );
        assert_eq!(time + 32, size);
        assert_eq!(
            e.ret(nr::VCPU_OP, &[GET_RUNSTATE_INFO, 0, WINDOW_END - 8]),
            EFAULT
        );
        e.alive();
    }
}
