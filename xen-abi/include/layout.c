/*
 * Prints sizeof/offsetof of the Xen structs that xenkvm shares with guests,
 * as the C compiler lays them out. The numbers in xen-abi/src/layout.rs were
 * taken from its output:
 *     gcc       -o layout64 include/layout.c && ./layout64
 *     gcc -m32  -o layout32 include/layout.c && ./layout32    (gcc-multilib)
 * (same #defines as wrapper.h; the 32-bit run is the compat layout).
 */
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include "wrapper.h"

#define S(t)       printf("%-40s size %5zu align %2zu\n", #t, sizeof(struct t), _Alignof(struct t))
#define O(t, f)    printf("  %-38s +0x%zx (%zu)\n", #f, offsetof(struct t, f), offsetof(struct t, f))

int main(void)
{
    printf("layout for %d-bit\n", (int)(8 * sizeof(void *)));
    S(shared_info);
    O(shared_info, vcpu_info); O(shared_info, evtchn_pending); O(shared_info, evtchn_mask);
    O(shared_info, wc_version); O(shared_info, wc_sec); O(shared_info, wc_nsec); O(shared_info, arch);
    S(arch_shared_info);
    O(arch_shared_info, max_pfn); O(arch_shared_info, pfn_to_mfn_frame_list_list);
    O(arch_shared_info, nmi_reason); O(arch_shared_info, p2m_cr3); O(arch_shared_info, p2m_vaddr);
    O(arch_shared_info, p2m_generation);
#ifdef __i386__
    O(arch_shared_info, wc_sec_hi);
#else
    O(shared_info, wc_sec_hi);
#endif
    S(vcpu_info);
    O(vcpu_info, evtchn_upcall_pending); O(vcpu_info, evtchn_upcall_mask);
    O(vcpu_info, evtchn_pending_sel); O(vcpu_info, arch); O(vcpu_info, time);
    S(arch_vcpu_info);
    O(arch_vcpu_info, cr2); O(arch_vcpu_info, pad);
    S(vcpu_time_info);
    O(vcpu_time_info, version); O(vcpu_time_info, tsc_timestamp); O(vcpu_time_info, system_time);
    O(vcpu_time_info, tsc_to_system_mul); O(vcpu_time_info, tsc_shift); O(vcpu_time_info, flags);
    S(vcpu_runstate_info);
    O(vcpu_runstate_info, state); O(vcpu_runstate_info, state_entry_time); O(vcpu_runstate_info, time);
    S(vcpu_register_runstate_memory_area);
    S(vcpu_register_vcpu_info);
    O(vcpu_register_vcpu_info, mfn); O(vcpu_register_vcpu_info, offset);
    S(vcpu_set_singleshot_timer);
    S(grant_entry_v1);
    O(grant_entry_v1, flags); O(grant_entry_v1, domid); O(grant_entry_v1, frame);
    printf("%-40s size %5zu\n", "grant_entry_v2", sizeof(union grant_entry_v2));
    S(grant_entry_header);
    S(gnttab_setup_table); O(gnttab_setup_table, dom); O(gnttab_setup_table, nr_frames);
    O(gnttab_setup_table, status); O(gnttab_setup_table, frame_list);
    S(gnttab_query_size);
    S(evtchn_fifo_control_block);
    O(evtchn_fifo_control_block, ready); O(evtchn_fifo_control_block, _rsvd);
    O(evtchn_fifo_control_block, head);
    S(evtchn_alloc_unbound); S(evtchn_send); S(evtchn_status); O(evtchn_status, u);
    S(xenstore_domain_interface);
    O(xenstore_domain_interface, req); O(xenstore_domain_interface, rsp);
    O(xenstore_domain_interface, req_cons); O(xenstore_domain_interface, req_prod);
    O(xenstore_domain_interface, rsp_cons); O(xenstore_domain_interface, rsp_prod);
    O(xenstore_domain_interface, server_features); O(xenstore_domain_interface, connection);
    O(xenstore_domain_interface, error);
    S(xsd_sockmsg);
    O(xsd_sockmsg, type); O(xsd_sockmsg, req_id); O(xsd_sockmsg, tx_id); O(xsd_sockmsg, len);
    S(xencons_interface);
    O(xencons_interface, in); O(xencons_interface, out); O(xencons_interface, in_cons);
    O(xencons_interface, in_prod); O(xencons_interface, out_cons); O(xencons_interface, out_prod);
    S(hvm_start_info);
    O(hvm_start_info, magic); O(hvm_start_info, version); O(hvm_start_info, flags);
    O(hvm_start_info, nr_modules); O(hvm_start_info, modlist_paddr); O(hvm_start_info, cmdline_paddr);
    O(hvm_start_info, rsdp_paddr); O(hvm_start_info, memmap_paddr); O(hvm_start_info, memmap_entries);
    O(hvm_start_info, reserved);
    S(hvm_modlist_entry);
    O(hvm_modlist_entry, paddr); O(hvm_modlist_entry, size); O(hvm_modlist_entry, cmdline_paddr);
    O(hvm_modlist_entry, reserved);
    S(hvm_memmap_table_entry);
    O(hvm_memmap_table_entry, addr); O(hvm_memmap_table_entry, size); O(hvm_memmap_table_entry, type);
    O(hvm_memmap_table_entry, reserved);
    S(xen_add_to_physmap);
    O(xen_add_to_physmap, domid); O(xen_add_to_physmap, size); O(xen_add_to_physmap, space);
    O(xen_add_to_physmap, idx); O(xen_add_to_physmap, gpfn);
    S(xen_memory_map); O(xen_memory_map, nr_entries); O(xen_memory_map, buffer);
    S(xen_memory_reservation);
    S(xen_hvm_param); O(xen_hvm_param, domid); O(xen_hvm_param, index); O(xen_hvm_param, value);
    S(xen_hvm_get_time);
    S(sched_shutdown); S(sched_poll);
    S(xen_feature_info);
    S(blkif_request);
    O(blkif_request, operation); O(blkif_request, nr_segments); O(blkif_request, handle);
    O(blkif_request, id); O(blkif_request, sector_number); O(blkif_request, seg);
    S(blkif_request_segment);
    S(blkif_response); O(blkif_response, id); O(blkif_response, operation); O(blkif_response, status);
    S(blkif_sring); O(blkif_sring, req_prod); O(blkif_sring, rsp_prod); O(blkif_sring, ring);
    return 0;
}
