//! Compile-time layout checks of the structs xenkvm shares with guests.
//!
//! bindgen already asserts every generated struct against clang's layout; these
//! checks are independent of bindgen and clang: the numbers were printed by gcc
//! from the C headers with `include/layout.c`
//! (`gcc -D__XEN_TOOLS__=1 include/layout.c && ./a.out` for 64-bit,
//! `gcc -m32 include/layout.c && ./a.out` for the compat layout, gcc 12.2,
//! libxen-dev 4.17.7). If a regeneration changes one of these layouts, the
//! crate stops compiling.

/// `check!(Type, size N; field @ offset, ...)`: size and field offsets.
macro_rules! check {
    ($t:ty, size $size:expr $(; $($f:ident @ $off:expr),* $(,)?)?) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
        $($(const _: () = assert!(core::mem::offset_of!($t, $f) == $off);)*)?
    };
}

/// The 64-bit layout (crate root).
mod x86_64 {
    use crate as x;

    check!(x::shared_info, size 3136;
        vcpu_info @ 0, evtchn_pending @ 0x800, evtchn_mask @ 0xa00,
        wc_version @ 0xc00, wc_sec @ 0xc04, wc_nsec @ 0xc08, wc_sec_hi @ 0xc0c, arch @ 0xc10);
    check!(x::arch_shared_info, size 48;
        max_pfn @ 0, pfn_to_mfn_frame_list_list @ 8, nmi_reason @ 16, p2m_cr3 @ 24,
        p2m_vaddr @ 32, p2m_generation @ 40);
    check!(x::vcpu_info, size 64;
        evtchn_upcall_pending @ 0, evtchn_upcall_mask @ 1, evtchn_pending_sel @ 8,
        arch @ 16, time @ 32);
    check!(x::arch_vcpu_info, size 16; cr2 @ 0, pad @ 8);
    check!(x::vcpu_time_info, size 32;
        version @ 0, tsc_timestamp @ 8, system_time @ 16, tsc_to_system_mul @ 24,
        tsc_shift @ 28, flags @ 29);
    check!(x::vcpu_runstate_info, size 48; state @ 0, state_entry_time @ 8, time @ 16);
    check!(x::vcpu_register_runstate_memory_area, size 8);
    check!(x::vcpu_register_vcpu_info, size 16; mfn @ 0, offset @ 8);
    check!(x::vcpu_set_singleshot_timer, size 16);
    check!(x::grant_entry_v1, size 8; flags @ 0, domid @ 2, frame @ 4);
    check!(x::grant_entry_v2, size 16);
    check!(x::grant_entry_header, size 4);
    check!(x::gnttab_setup_table, size 24; dom @ 0, nr_frames @ 4, status @ 8, frame_list @ 16);
    check!(x::gnttab_query_size, size 16);
    check!(x::evtchn_fifo_control_block, size 72; ready @ 0, _rsvd @ 4, head @ 8);
    check!(x::evtchn_alloc_unbound, size 8);
    check!(x::evtchn_send, size 4);
    check!(x::evtchn_status, size 24; u @ 16);
    check!(x::xenstore_domain_interface, size 2076;
        req @ 0, rsp @ 0x400, req_cons @ 0x800, req_prod @ 0x804, rsp_cons @ 0x808,
        rsp_prod @ 0x80c, server_features @ 0x810, connection @ 0x814, error @ 0x818);
    check!(x::xsd_sockmsg, size 16; type_ @ 0, req_id @ 4, tx_id @ 8, len @ 12);
    check!(x::xencons_interface, size 3088;
        in_ @ 0, out @ 0x400, in_cons @ 0xc00, in_prod @ 0xc04, out_cons @ 0xc08,
        out_prod @ 0xc0c);
    check!(x::hvm_start_info, size 56;
        magic @ 0, version @ 4, flags @ 8, nr_modules @ 12, modlist_paddr @ 16,
        cmdline_paddr @ 24, rsdp_paddr @ 32, memmap_paddr @ 40, memmap_entries @ 48,
        reserved @ 52);
    check!(x::hvm_modlist_entry, size 32; paddr @ 0, size @ 8, cmdline_paddr @ 16, reserved @ 24);
    check!(x::hvm_memmap_table_entry, size 24; addr @ 0, size @ 8, type_ @ 16, reserved @ 20);
    check!(x::xen_add_to_physmap, size 24; domid @ 0, size @ 2, space @ 4, idx @ 8, gpfn @ 16);
    check!(x::xen_memory_map, size 16; nr_entries @ 0, buffer @ 8);
    check!(x::xen_memory_reservation, size 32);
    check!(x::xen_hvm_param, size 16; domid @ 0, index @ 4, value @ 8);
    check!(x::xen_hvm_get_time, size 8);
    check!(x::sched_shutdown, size 4);
    check!(x::sched_poll, size 24);
    check!(x::xen_feature_info, size 8);
    check!(x::blkif_request, size 112;
        operation @ 0, nr_segments @ 1, handle @ 2, id @ 8, sector_number @ 16, seg @ 24);
    check!(x::blkif_request_segment, size 8);
    check!(x::blkif_response, size 16; id @ 0, operation @ 8, status @ 10);
    check!(x::blkif_sring, size 176; req_prod @ 0, rsp_prod @ 8, ring @ 64);
}

/// The 32-bit compat layout ([`crate::compat`]).
mod x86_32 {
    use crate::compat as x;

    check!(x::shared_info, size 2344;
        vcpu_info @ 0, evtchn_pending @ 0x800, evtchn_mask @ 0x880,
        wc_version @ 0x900, wc_sec @ 0x904, wc_nsec @ 0x908, arch @ 0x90c);
    check!(x::arch_shared_info, size 28;
        max_pfn @ 0, pfn_to_mfn_frame_list_list @ 4, nmi_reason @ 8, p2m_cr3 @ 12,
        p2m_vaddr @ 16, p2m_generation @ 20, wc_sec_hi @ 24);
    check!(x::vcpu_info, size 64;
        evtchn_upcall_pending @ 0, evtchn_upcall_mask @ 1, evtchn_pending_sel @ 4,
        arch @ 8, time @ 32);
    check!(x::arch_vcpu_info, size 24; cr2 @ 0, pad @ 4);
    check!(x::vcpu_time_info, size 32;
        version @ 0, tsc_timestamp @ 8, system_time @ 16, tsc_to_system_mul @ 24,
        tsc_shift @ 28, flags @ 29);
    check!(x::vcpu_runstate_info, size 44; state @ 0, state_entry_time @ 4, time @ 12);
    check!(x::vcpu_register_runstate_memory_area, size 8);
    check!(x::vcpu_register_vcpu_info, size 16; mfn @ 0, offset @ 8);
    check!(x::vcpu_set_singleshot_timer, size 12);
    check!(x::grant_entry_v1, size 8; flags @ 0, domid @ 2, frame @ 4);
    check!(x::grant_entry_v2, size 16);
    check!(x::grant_entry_header, size 4);
    check!(x::gnttab_setup_table, size 16; dom @ 0, nr_frames @ 4, status @ 8, frame_list @ 12);
    check!(x::gnttab_query_size, size 16);
    check!(x::evtchn_fifo_control_block, size 72; ready @ 0, _rsvd @ 4, head @ 8);
    check!(x::evtchn_alloc_unbound, size 8);
    check!(x::evtchn_send, size 4);
    check!(x::evtchn_status, size 24; u @ 16);
    check!(x::xenstore_domain_interface, size 2076;
        req @ 0, rsp @ 0x400, req_cons @ 0x800, req_prod @ 0x804, rsp_cons @ 0x808,
        rsp_prod @ 0x80c, server_features @ 0x810, connection @ 0x814, error @ 0x818);
    check!(x::xsd_sockmsg, size 16; type_ @ 0, req_id @ 4, tx_id @ 8, len @ 12);
    check!(x::xencons_interface, size 3088;
        in_ @ 0, out @ 0x400, in_cons @ 0xc00, in_prod @ 0xc04, out_cons @ 0xc08,
        out_prod @ 0xc0c);
    check!(x::hvm_start_info, size 56;
        magic @ 0, version @ 4, flags @ 8, nr_modules @ 12, modlist_paddr @ 16,
        cmdline_paddr @ 24, rsdp_paddr @ 32, memmap_paddr @ 40, memmap_entries @ 48,
        reserved @ 52);
    check!(x::hvm_modlist_entry, size 32; paddr @ 0, size @ 8, cmdline_paddr @ 16, reserved @ 24);
    check!(x::hvm_memmap_table_entry, size 24; addr @ 0, size @ 8, type_ @ 16, reserved @ 20);
    check!(x::xen_add_to_physmap, size 16; domid @ 0, size @ 2, space @ 4, idx @ 8, gpfn @ 12);
    check!(x::xen_memory_map, size 8; nr_entries @ 0, buffer @ 4);
    check!(x::xen_memory_reservation, size 20);
    check!(x::xen_hvm_param, size 16; domid @ 0, index @ 4, value @ 8);
    check!(x::xen_hvm_get_time, size 8);
    check!(x::sched_shutdown, size 4);
    check!(x::sched_poll, size 16);
    check!(x::xen_feature_info, size 8);
    check!(x::blkif_request, size 108;
        operation @ 0, nr_segments @ 1, handle @ 2, id @ 4, sector_number @ 12, seg @ 20);
    check!(x::blkif_request_segment, size 8);
    check!(x::blkif_response, size 12; id @ 0, operation @ 8, status @ 10);
    check!(x::blkif_sring, size 172; req_prod @ 0, rsp_prod @ 8, ring @ 64);
}
