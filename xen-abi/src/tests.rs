//! Round trips through zerocopy: a value written through the Rust type must
//! land at the offset the C header documents, in both layouts.

use crate::consts::{DOMID_SELF, XEN_RUNSTATE_UPDATE};
use crate::{compat, errno};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

fn u64_at(bytes: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
}

fn u32_at(bytes: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap())
}

#[test]
fn runstate_64bit_state_entry_time_lands_at_offset_8() {
    let mut rs = crate::vcpu_runstate_info::new_zeroed();
    rs.state = crate::RUNSTATE_runnable as i32;
    rs.state_entry_time = XEN_RUNSTATE_UPDATE | 0x1234_5678;
    rs.time[3] = 99;
    let bytes = rs.as_bytes();
    assert_eq!(bytes.len(), 48);
    assert_eq!(u32_at(bytes, 0), crate::RUNSTATE_runnable);
    assert_eq!(u64_at(bytes, 8), (1 << 63) | 0x1234_5678);
    assert_eq!(u64_at(bytes, 16 + 3 * 8), 99);
    let back = crate::vcpu_runstate_info::read_from_bytes(bytes).unwrap();
    assert_eq!(back, rs);
}

#[test]
fn runstate_compat_state_entry_time_lands_at_offset_4() {
    let mut rs = compat::vcpu_runstate_info::new_zeroed();
    rs.state = crate::RUNSTATE_blocked as i32;
    rs.state_entry_time = XEN_RUNSTATE_UPDATE | 7;
    rs.time = [1, 2, 3, 4];
    let bytes = rs.as_bytes();
    assert_eq!(bytes.len(), 44);
    assert_eq!(u32_at(bytes, 0), crate::RUNSTATE_blocked);
    assert_eq!(u64_at(bytes, 4), (1 << 63) | 7);
    assert_eq!(u64_at(bytes, 12 + 2 * 8), 3);
    let back = compat::vcpu_runstate_info::read_from_bytes(bytes).unwrap();
    assert_eq!({ back.state_entry_time }, { rs.state_entry_time });
}

#[test]
fn shared_info_evtchn_pending_word_lands_at_0x800_plus_word_size() {
    let mut si = crate::shared_info::new_zeroed();
    si.evtchn_pending[1] = 0x8000_0000_0000_0001;
    si.evtchn_mask[0] = u64::MAX;
    si.wc_version = 3;
    let bytes = si.as_bytes();
    assert_eq!(u64_at(bytes, 0x808), 0x8000_0000_0000_0001);
    assert_eq!(u64_at(bytes, 0xa00), u64::MAX);
    assert_eq!(u32_at(bytes, 0xc00), 3);

    let mut si32 = compat::shared_info::new_zeroed();
    si32.evtchn_pending[1] = 0x8000_0001;
    si32.wc_version = 5;
    si32.arch.wc_sec_hi = 9;
    let bytes = si32.as_bytes();
    assert_eq!(u32_at(bytes, 0x804), 0x8000_0001);
    assert_eq!(u32_at(bytes, 0x900), 5);
    assert_eq!(u32_at(bytes, 0x90c + 24), 9);
}

#[test]
fn vcpu_info_time_read_from_guest_bytes_at_offset_32() {
    let mut page = [0u8; 64];
    page[0] = 1; // evtchn_upcall_pending
    page[8..16].copy_from_slice(&0xffu64.to_le_bytes()); // 64-bit evtchn_pending_sel
    page[32..36].copy_from_slice(&7u32.to_le_bytes()); // time.version
    page[48..56].copy_from_slice(&123_456u64.to_le_bytes()); // time.system_time
    let vi = crate::vcpu_info::read_from_bytes(&page).unwrap();
    assert_eq!(vi.evtchn_upcall_pending, 1);
    assert_eq!(vi.evtchn_pending_sel, 0xff);
    assert_eq!(vi.time.version, 7);
    assert_eq!(vi.time.system_time, 123_456);

    // In the compat layout evtchn_pending_sel is a 32-bit word at +4.
    let vi32 = compat::vcpu_info::read_from_bytes(&page).unwrap();
    assert_eq!({ vi32.evtchn_pending_sel }, 0);
    let time = vi32.time;
    assert_eq!({ time.version }, 7);
    assert_eq!({ time.system_time }, 123_456);
}

#[test]
fn hvm_start_info_written_by_vmm_reads_back_at_c_offsets() {
    let mut si = crate::hvm_start_info::new_zeroed();
    si.magic = crate::XEN_HVM_START_MAGIC_VALUE;
    si.version = 1;
    si.cmdline_paddr = 0x1_2000;
    si.memmap_paddr = 0x3000;
    si.memmap_entries = 4;
    let bytes = si.as_bytes();
    assert_eq!(u32_at(bytes, 0), 0x336e_c578);
    assert_eq!(u64_at(bytes, 24), 0x1_2000);
    assert_eq!(u64_at(bytes, 40), 0x3000);
    assert_eq!(u32_at(bytes, 48), 4);
    let e = crate::hvm_memmap_table_entry {
        addr: 0x10_0000,
        size: 0x40_0000,
        type_: crate::XEN_HVM_MEMMAP_TYPE_RAM,
        reserved: 0,
    };
    assert_eq!(u32_at(e.as_bytes(), 16), 1);
}

#[test]
fn xsd_sockmsg_header_parses_from_ring_bytes() {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&crate::xsd_sockmsg_type::XS_READ.to_le_bytes());
    hdr[4..8].copy_from_slice(&42u32.to_le_bytes());
    hdr[12..16].copy_from_slice(&6u32.to_le_bytes());
    let msg = crate::xsd_sockmsg::read_from_bytes(&hdr).unwrap();
    assert_eq!(msg.type_, crate::xsd_sockmsg_type::XS_READ);
    assert_eq!(msg.req_id, 42);
    assert_eq!(msg.len, 6);
    assert!(crate::xsd_sockmsg::read_from_bytes(&hdr[..15]).is_err());
}

#[test]
fn grant_entry_v1_fields_land_at_c_offsets() {
    let g = crate::grant_entry_v1 {
        flags: crate::GTF_permit_access as u16,
        domid: DOMID_SELF,
        frame: 0xabcd,
    };
    let b = g.as_bytes();
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), 1);
    assert_eq!(u16::from_le_bytes([b[2], b[3]]), 0x7ff0);
    assert_eq!(u32_at(b, 4), 0xabcd);
}

#[test]
fn errno_values_match_xen_public_errno_h() {
    // Spot checks against xen/include/public/errno.h.
    assert_eq!(errno::EPERM, 1);
    assert_eq!(errno::ENOENT, 2);
    assert_eq!(errno::EFAULT, 14);
    assert_eq!(errno::EINVAL, 22);
    assert_eq!(errno::ENOSYS, 38);
    assert_eq!(errno::EOPNOTSUPP, 95);
}

#[test]
fn guest_handle_is_a_guest_address_not_a_host_pointer() {
    let mut mm = crate::xen_memory_map::new_zeroed();
    mm.buffer.p = 0xffff_8000_0000_1000;
    assert_eq!(u64_at(mm.as_bytes(), 8), 0xffff_8000_0000_1000);
    let mut mm32 = compat::xen_memory_map::new_zeroed();
    mm32.buffer.p = 0xc000_1000;
    assert_eq!(u32_at(mm32.as_bytes(), 4), 0xc000_1000);
}

#[test]
fn xenmemf_helpers_invert_the_c_encoding() {
    // XENMEMF_node(3) | XENMEMF_address_bits(32) as a guest encodes it.
    let flags = ((3 + 1) << 8) | 32;
    assert_eq!(crate::consts::xenmemf_get_node(flags), 3);
    assert_eq!(crate::consts::xenmemf_get_address_bits(flags), 32);
}
