//! Xen 4.17 ABI numbers and structure layouts this crate needs, taken from the generated
//! `xen-abi` bindings (typed as the handlers use them).
//!
//! Structures are decoded field by field from little-endian byte buffers, per guest width, so a
//! 32-bit (compat) guest's layout (4-byte aligned `uint64_t`, 32-bit handles and `xen_ulong_t`)
//! is handled by the same code as the 64-bit one. The offsets and sizes the decoders use are
//! checked at compile time against `xen_abi` and `xen_abi::compat` at the end of this file.

#![allow(dead_code)]
// the full set of numbers documents the ABI; not all are used yet
// bindgen types most macros as u32 and some as i32; the casts pin the types handlers use.
#![allow(clippy::unnecessary_cast)]

/// Hypercall numbers (`__HYPERVISOR_*`).
pub mod nr {
    pub const PLATFORM_OP: u64 = xen_abi::__HYPERVISOR_platform_op as u64;
    pub const MEMORY_OP: u64 = xen_abi::__HYPERVISOR_memory_op as u64;
    pub const MULTICALL: u64 = xen_abi::__HYPERVISOR_multicall as u64;
    pub const SET_TIMER_OP: u64 = xen_abi::__HYPERVISOR_set_timer_op as u64;
    pub const XEN_VERSION: u64 = xen_abi::__HYPERVISOR_xen_version as u64;
    pub const CONSOLE_IO: u64 = xen_abi::__HYPERVISOR_console_io as u64;
    pub const GRANT_TABLE_OP: u64 = xen_abi::__HYPERVISOR_grant_table_op as u64;
    pub const VM_ASSIST: u64 = xen_abi::__HYPERVISOR_vm_assist as u64;
    pub const VCPU_OP: u64 = xen_abi::__HYPERVISOR_vcpu_op as u64;
    pub const MMUEXT_OP: u64 = xen_abi::__HYPERVISOR_mmuext_op as u64;
    pub const XSM_OP: u64 = xen_abi::__HYPERVISOR_xsm_op as u64;
    pub const SCHED_OP: u64 = xen_abi::__HYPERVISOR_sched_op as u64;
    pub const EVENT_CHANNEL_OP: u64 = xen_abi::__HYPERVISOR_event_channel_op as u64;
    pub const PHYSDEV_OP: u64 = xen_abi::__HYPERVISOR_physdev_op as u64;
    pub const HVM_OP: u64 = xen_abi::__HYPERVISOR_hvm_op as u64;
    pub const SYSCTL: u64 = xen_abi::__HYPERVISOR_sysctl as u64;
    pub const DOMCTL: u64 = xen_abi::__HYPERVISOR_domctl as u64;
    pub const XENPMU_OP: u64 = xen_abi::__HYPERVISOR_xenpmu_op as u64;
    pub const DM_OP: u64 = xen_abi::__HYPERVISOR_dm_op as u64;
    pub const HYPFS_OP: u64 = xen_abi::__HYPERVISOR_hypfs_op as u64;
    /// Size of Xen's hypercall table (`NR_hypercalls`).
    pub const NR_HYPERCALLS: u64 = 64;
}

/// `XENVER_*` (version.h).
pub mod xenver {
    use core::mem::size_of;

    pub const VERSION: i32 = xen_abi::XENVER_version as i32;
    pub const EXTRAVERSION: i32 = xen_abi::XENVER_extraversion as i32;
    pub const COMPILE_INFO: i32 = xen_abi::XENVER_compile_info as i32;
    pub const CAPABILITIES: i32 = xen_abi::XENVER_capabilities as i32;
    pub const CHANGESET: i32 = xen_abi::XENVER_changeset as i32;
    pub const PLATFORM_PARAMETERS: i32 = xen_abi::XENVER_platform_parameters as i32;
    pub const GET_FEATURES: i32 = xen_abi::XENVER_get_features as i32;
    pub const PAGESIZE: i32 = xen_abi::XENVER_pagesize as i32;
    pub const GUEST_HANDLE: i32 = xen_abi::XENVER_guest_handle as i32;
    pub const COMMANDLINE: i32 = xen_abi::XENVER_commandline as i32;
    pub const BUILD_ID: i32 = xen_abi::XENVER_build_id as i32;

    pub const EXTRAVERSION_LEN: usize = size_of::<xen_abi::xen_extraversion_t>();
    /// `xen_compile_info_t`: compiler[64], compile_by[16], compile_domain[32], compile_date[32].
    pub const COMPILE_INFO_LEN: usize = size_of::<xen_abi::xen_compile_info>();
    pub const CAPABILITIES_LEN: usize = size_of::<xen_abi::xen_capabilities_info_t>();
    pub const CHANGESET_LEN: usize = size_of::<xen_abi::xen_changeset_info_t>();
    pub const DOMAIN_HANDLE_LEN: usize = size_of::<xen_abi::xen_domain_handle_t>();
    pub const FEATURE_INFO_LEN: usize = size_of::<xen_abi::xen_feature_info>();
    /// `HYPERVISOR_VIRT_START` of x86_64 Xen.
    pub const HYPERVISOR_VIRT_START_64: u64 = 0xFFFF_8000_0000_0000;
    /// `HYPERVISOR_COMPAT_VIRT_START(d)` of an HVM domain (`hv_compat_vstart` is never set).
    pub const HYPERVISOR_VIRT_START_COMPAT: u32 = 0;
    /// What Xen copies for privileged sub-ops a domU may not see (`xen_deny()`).
    pub const DENIED: &[u8] = b"<denied>\0";
}

/// `XENFEAT_*` (features.h).
pub mod xenfeat {
    pub const WRITABLE_PAGE_TABLES: u32 = xen_abi::XENFEAT_writable_page_tables as u32;
    pub const AUTO_TRANSLATED_PHYSMAP: u32 = xen_abi::XENFEAT_auto_translated_physmap as u32;
    pub const HVM_CALLBACK_VECTOR: u32 = xen_abi::XENFEAT_hvm_callback_vector as u32;
    pub const HVM_SAFE_PVCLOCK: u32 = xen_abi::XENFEAT_hvm_safe_pvclock as u32;
    pub const HVM_PIRQS: u32 = xen_abi::XENFEAT_hvm_pirqs as u32;
    pub const MEMORY_OP_VNODE_SUPPORTED: u32 = xen_abi::XENFEAT_memory_op_vnode_supported as u32;
    pub const NOT_DIRECT_MAPPED: u32 = xen_abi::XENFEAT_not_direct_mapped as u32;
}

pub mod consoleio {
    pub const WRITE: u32 = xen_abi::CONSOLEIO_write as u32;
    pub const READ: u32 = xen_abi::CONSOLEIO_read as u32;
}

pub mod xenmem {
    pub const INCREASE_RESERVATION: u32 = xen_abi::XENMEM_increase_reservation as u32;
    pub const DECREASE_RESERVATION: u32 = xen_abi::XENMEM_decrease_reservation as u32;
    pub const MAXIMUM_RAM_PAGE: u32 = xen_abi::XENMEM_maximum_ram_page as u32;
    pub const CURRENT_RESERVATION: u32 = xen_abi::XENMEM_current_reservation as u32;
    pub const MAXIMUM_RESERVATION: u32 = xen_abi::XENMEM_maximum_reservation as u32;
    pub const MACHPHYS_MFN_LIST: u32 = xen_abi::XENMEM_machphys_mfn_list as u32;
    pub const POPULATE_PHYSMAP: u32 = xen_abi::XENMEM_populate_physmap as u32;
    pub const ADD_TO_PHYSMAP: u32 = xen_abi::XENMEM_add_to_physmap as u32;
    pub const MEMORY_MAP: u32 = xen_abi::XENMEM_memory_map as u32;
    pub const MACHINE_MEMORY_MAP: u32 = xen_abi::XENMEM_machine_memory_map as u32;
    pub const EXCHANGE: u32 = xen_abi::XENMEM_exchange as u32;
    pub const MACHPHYS_MAPPING: u32 = xen_abi::XENMEM_machphys_mapping as u32;
    pub const SET_MEMORY_MAP: u32 = xen_abi::XENMEM_set_memory_map as u32;
    pub const MAXIMUM_GPFN: u32 = xen_abi::XENMEM_maximum_gpfn as u32;
    pub const REMOVE_FROM_PHYSMAP: u32 = xen_abi::XENMEM_remove_from_physmap as u32;
    pub const ADD_TO_PHYSMAP_BATCH: u32 = xen_abi::XENMEM_add_to_physmap_batch as u32;
    pub const GET_VNUMAINFO: u32 = xen_abi::XENMEM_get_vnumainfo as u32;

    /// `MEMOP_EXTENT_SHIFT` (guarded by `__XEN__` in memory.h, so not generated).
    pub const MEMOP_EXTENT_SHIFT: u32 = 6;
    pub const MEMOP_CMD_MASK: u64 = (1 << MEMOP_EXTENT_SHIFT) - 1;

    pub const MAPSPACE_SHARED_INFO: u32 = xen_abi::XENMAPSPACE_shared_info as u32;
    pub const MAPSPACE_GRANT_TABLE: u32 = xen_abi::XENMAPSPACE_grant_table as u32;
    pub const MAPSPACE_GMFN: u32 = xen_abi::XENMAPSPACE_gmfn as u32;
    pub const MAPSPACE_GMFN_RANGE: u32 = xen_abi::XENMAPSPACE_gmfn_range as u32;
    pub const MAPSPACE_GMFN_FOREIGN: u32 = xen_abi::XENMAPSPACE_gmfn_foreign as u32;
    pub const MAPSPACE_DEV_MMIO: u32 = xen_abi::XENMAPSPACE_dev_mmio as u32;
    pub const MAPIDX_GRANT_TABLE_STATUS: u64 = xen_abi::XENMAPIDX_grant_table_status as u64;

    /// `struct e820entry` is packed: addr u64, size u64, type u32.
    pub const E820_ENTRY_LEN: usize = 20;
}

pub mod hvmop {
    pub const SET_PARAM: u64 = xen_abi::HVMOP_set_param as u64;
    pub const GET_PARAM: u64 = xen_abi::HVMOP_get_param as u64;
    pub const FLUSH_TLBS: u64 = xen_abi::HVMOP_flush_tlbs as u64;
    pub const PAGETABLE_DYING: u64 = xen_abi::HVMOP_pagetable_dying as u64;
    pub const GET_TIME: u64 = xen_abi::HVMOP_get_time as u64;
    pub const XENTRACE: u64 = xen_abi::HVMOP_xentrace as u64;
    pub const GET_MEM_TYPE: u64 = xen_abi::HVMOP_get_mem_type as u64;
    pub const SET_EVTCHN_UPCALL_VECTOR: u64 = xen_abi::HVMOP_set_evtchn_upcall_vector as u64;
    pub const GUEST_REQUEST_VM_EVENT: u64 = xen_abi::HVMOP_guest_request_vm_event as u64;
    pub const ALTP2M: u64 = xen_abi::HVMOP_altp2m as u64;
}

/// `HVM_PARAM_*` (hvm/params.h).
pub mod param {
    pub const CALLBACK_IRQ: u32 = xen_abi::HVM_PARAM_CALLBACK_IRQ as u32;
    pub const STORE_PFN: u32 = xen_abi::HVM_PARAM_STORE_PFN as u32;
    pub const STORE_EVTCHN: u32 = xen_abi::HVM_PARAM_STORE_EVTCHN as u32;
    pub const PAE_ENABLED: u32 = xen_abi::HVM_PARAM_PAE_ENABLED as u32;
    pub const IOREQ_PFN: u32 = xen_abi::HVM_PARAM_IOREQ_PFN as u32;
    pub const BUFIOREQ_PFN: u32 = xen_abi::HVM_PARAM_BUFIOREQ_PFN as u32;
    pub const VIRIDIAN: u32 = xen_abi::HVM_PARAM_VIRIDIAN as u32;
    pub const TIMER_MODE: u32 = xen_abi::HVM_PARAM_TIMER_MODE as u32;
    pub const HPET_ENABLED: u32 = xen_abi::HVM_PARAM_HPET_ENABLED as u32;
    pub const IDENT_PT: u32 = xen_abi::HVM_PARAM_IDENT_PT as u32;
    pub const DM_DOMAIN: u32 = xen_abi::HVM_PARAM_DM_DOMAIN as u32;
    pub const ACPI_S_STATE: u32 = xen_abi::HVM_PARAM_ACPI_S_STATE as u32;
    pub const VM86_TSS: u32 = xen_abi::HVM_PARAM_VM86_TSS as u32;
    pub const VPT_ALIGN: u32 = xen_abi::HVM_PARAM_VPT_ALIGN as u32;
    pub const CONSOLE_PFN: u32 = xen_abi::HVM_PARAM_CONSOLE_PFN as u32;
    pub const CONSOLE_EVTCHN: u32 = xen_abi::HVM_PARAM_CONSOLE_EVTCHN as u32;
    pub const ACPI_IOPORTS_LOCATION: u32 = xen_abi::HVM_PARAM_ACPI_IOPORTS_LOCATION as u32;
    pub const MEMORY_EVENT_CR0: u32 = xen_abi::HVM_PARAM_MEMORY_EVENT_CR0 as u32;
    pub const MEMORY_EVENT_CR3: u32 = xen_abi::HVM_PARAM_MEMORY_EVENT_CR3 as u32;
    pub const MEMORY_EVENT_CR4: u32 = xen_abi::HVM_PARAM_MEMORY_EVENT_CR4 as u32;
    pub const MEMORY_EVENT_INT3: u32 = xen_abi::HVM_PARAM_MEMORY_EVENT_INT3 as u32;
    pub const NESTEDHVM: u32 = xen_abi::HVM_PARAM_NESTEDHVM as u32;
    pub const MEMORY_EVENT_SINGLE_STEP: u32 = xen_abi::HVM_PARAM_MEMORY_EVENT_SINGLE_STEP as u32;
    pub const BUFIOREQ_EVTCHN: u32 = xen_abi::HVM_PARAM_BUFIOREQ_EVTCHN as u32;
    pub const PAGING_RING_PFN: u32 = xen_abi::HVM_PARAM_PAGING_RING_PFN as u32;
    pub const MONITOR_RING_PFN: u32 = xen_abi::HVM_PARAM_MONITOR_RING_PFN as u32;
    pub const SHARING_RING_PFN: u32 = xen_abi::HVM_PARAM_SHARING_RING_PFN as u32;
    pub const MEMORY_EVENT_MSR: u32 = xen_abi::HVM_PARAM_MEMORY_EVENT_MSR as u32;
    pub const TRIPLE_FAULT_REASON: u32 = xen_abi::HVM_PARAM_TRIPLE_FAULT_REASON as u32;
    pub const IOREQ_SERVER_PFN: u32 = xen_abi::HVM_PARAM_IOREQ_SERVER_PFN as u32;
    pub const NR_IOREQ_SERVER_PAGES: u32 = xen_abi::HVM_PARAM_NR_IOREQ_SERVER_PAGES as u32;
    pub const VM_GENERATION_ID_ADDR: u32 = xen_abi::HVM_PARAM_VM_GENERATION_ID_ADDR as u32;
    pub const ALTP2M: u32 = xen_abi::HVM_PARAM_ALTP2M as u32;
    pub const X87_FIP_WIDTH: u32 = xen_abi::HVM_PARAM_X87_FIP_WIDTH as u32;
    pub const VM86_TSS_SIZED: u32 = xen_abi::HVM_PARAM_VM86_TSS_SIZED as u32;
    pub const MCA_CAP: u32 = xen_abi::HVM_PARAM_MCA_CAP as u32;
    pub const NR_PARAMS: u32 = xen_abi::HVM_NR_PARAMS as u32;
}

pub mod vcpuop {
    pub const INITIALISE: i32 = xen_abi::VCPUOP_initialise as i32;
    pub const UP: i32 = xen_abi::VCPUOP_up as i32;
    pub const DOWN: i32 = xen_abi::VCPUOP_down as i32;
    pub const IS_UP: i32 = xen_abi::VCPUOP_is_up as i32;
    pub const GET_RUNSTATE_INFO: i32 = xen_abi::VCPUOP_get_runstate_info as i32;
    pub const REGISTER_RUNSTATE_MEMORY_AREA: i32 =
        xen_abi::VCPUOP_register_runstate_memory_area as i32;
    pub const SET_PERIODIC_TIMER: i32 = xen_abi::VCPUOP_set_periodic_timer as i32;
    pub const STOP_PERIODIC_TIMER: i32 = xen_abi::VCPUOP_stop_periodic_timer as i32;
    pub const SET_SINGLESHOT_TIMER: i32 = xen_abi::VCPUOP_set_singleshot_timer as i32;
    pub const STOP_SINGLESHOT_TIMER: i32 = xen_abi::VCPUOP_stop_singleshot_timer as i32;
    pub const REGISTER_VCPU_INFO: i32 = xen_abi::VCPUOP_register_vcpu_info as i32;
    pub const SEND_NMI: i32 = xen_abi::VCPUOP_send_nmi as i32;
    pub const GET_PHYSID: i32 = xen_abi::VCPUOP_get_physid as i32;
    pub const REGISTER_VCPU_TIME_MEMORY_AREA: i32 =
        xen_abi::VCPUOP_register_vcpu_time_memory_area as i32;
    /// Xen 4.18's `VCPUOP_register_runstate_phys_area` (not in the 4.17 headers).
    pub const REGISTER_RUNSTATE_PHYS_AREA: i32 = 14;
}

pub mod schedop {
    pub const YIELD: i32 = xen_abi::SCHEDOP_yield as i32;
    pub const BLOCK: i32 = xen_abi::SCHEDOP_block as i32;
    pub const SHUTDOWN: i32 = xen_abi::SCHEDOP_shutdown as i32;
    pub const POLL: i32 = xen_abi::SCHEDOP_poll as i32;
    pub const REMOTE_SHUTDOWN: i32 = xen_abi::SCHEDOP_remote_shutdown as i32;
    pub const SHUTDOWN_CODE: i32 = xen_abi::SCHEDOP_shutdown_code as i32;
    pub const WATCHDOG: i32 = xen_abi::SCHEDOP_watchdog as i32;
    pub const PIN_OVERRIDE: i32 = xen_abi::SCHEDOP_pin_override as i32;
    /// `do_poll`: "Fairly arbitrary limit".
    pub const POLL_MAX_PORTS: u32 = 128;
}

/// `SHUTDOWN_*` reasons (sched.h).
pub mod shutdown {
    pub const POWEROFF: u8 = xen_abi::SHUTDOWN_poweroff as u8;
    pub const REBOOT: u8 = xen_abi::SHUTDOWN_reboot as u8;
    pub const SUSPEND: u8 = xen_abi::SHUTDOWN_suspend as u8;
    pub const CRASH: u8 = xen_abi::SHUTDOWN_crash as u8;
    pub const WATCHDOG: u8 = xen_abi::SHUTDOWN_watchdog as u8;
    pub const SOFT_RESET: u8 = xen_abi::SHUTDOWN_soft_reset as u8;
}

pub mod evtchnop {
    pub const BIND_INTERDOMAIN: i32 = xen_abi::EVTCHNOP_bind_interdomain as i32;
    pub const BIND_VIRQ: i32 = xen_abi::EVTCHNOP_bind_virq as i32;
    pub const BIND_PIRQ: i32 = xen_abi::EVTCHNOP_bind_pirq as i32;
    pub const CLOSE: i32 = xen_abi::EVTCHNOP_close as i32;
    pub const SEND: i32 = xen_abi::EVTCHNOP_send as i32;
    pub const STATUS: i32 = xen_abi::EVTCHNOP_status as i32;
    pub const ALLOC_UNBOUND: i32 = xen_abi::EVTCHNOP_alloc_unbound as i32;
    pub const BIND_IPI: i32 = xen_abi::EVTCHNOP_bind_ipi as i32;
    pub const BIND_VCPU: i32 = xen_abi::EVTCHNOP_bind_vcpu as i32;
    pub const UNMASK: i32 = xen_abi::EVTCHNOP_unmask as i32;
    pub const RESET: i32 = xen_abi::EVTCHNOP_reset as i32;
    pub const INIT_CONTROL: i32 = xen_abi::EVTCHNOP_init_control as i32;
    pub const EXPAND_ARRAY: i32 = xen_abi::EVTCHNOP_expand_array as i32;
    pub const SET_PRIORITY: i32 = xen_abi::EVTCHNOP_set_priority as i32;
    pub const RESET_CONT: i32 = 14;

    pub const STAT_CLOSED: u32 = xen_abi::EVTCHNSTAT_closed as u32;
    pub const STAT_UNBOUND: u32 = xen_abi::EVTCHNSTAT_unbound as u32;
    pub const STAT_INTERDOMAIN: u32 = xen_abi::EVTCHNSTAT_interdomain as u32;
    pub const STAT_PIRQ: u32 = xen_abi::EVTCHNSTAT_pirq as u32;
    pub const STAT_VIRQ: u32 = xen_abi::EVTCHNSTAT_virq as u32;
    pub const STAT_IPI: u32 = xen_abi::EVTCHNSTAT_ipi as u32;

    /// `sizeof(evtchn_fifo_control_block_t)`: ready, _rsvd, head[16].
    pub const FIFO_CONTROL_BLOCK_LEN: usize =
        core::mem::size_of::<xen_abi::evtchn_fifo_control_block>();
    pub const FIFO_LINK_BITS: u8 = xen_abi::EVTCHN_FIFO_LINK_BITS as u8;
}

/// `VIRQ_*` (xen.h).
pub mod virq {
    pub const TIMER: u32 = xen_abi::VIRQ_TIMER as u32;
    pub const DEBUG: u32 = xen_abi::VIRQ_DEBUG as u32;
    pub const XENOPROF: u32 = xen_abi::VIRQ_XENOPROF as u32;
    pub const XENPMU: u32 = xen_abi::VIRQ_XENPMU as u32;
    pub const NR_VIRQS: u32 = xen_abi::NR_VIRQS as u32;
}

pub mod gnttabop {
    pub const MAP_GRANT_REF: u32 = xen_abi::GNTTABOP_map_grant_ref as u32;
    pub const UNMAP_GRANT_REF: u32 = xen_abi::GNTTABOP_unmap_grant_ref as u32;
    pub const SETUP_TABLE: u32 = xen_abi::GNTTABOP_setup_table as u32;
    pub const COPY: u32 = xen_abi::GNTTABOP_copy as u32;
    pub const QUERY_SIZE: u32 = xen_abi::GNTTABOP_query_size as u32;
    pub const SET_VERSION: u32 = xen_abi::GNTTABOP_set_version as u32;
    pub const GET_VERSION: u32 = xen_abi::GNTTABOP_get_version as u32;
    pub const SWAP_GRANT_REF: u32 = xen_abi::GNTTABOP_swap_grant_ref as u32;

    pub const GNTST_OKAY: i16 = xen_abi::GNTST_okay as i16;
    pub const GNTST_GENERAL_ERROR: i16 = xen_abi::GNTST_general_error as i16;
    pub const GNTST_BAD_DOMAIN: i16 = xen_abi::GNTST_bad_domain as i16;
    pub const GNTST_BAD_VIRT_ADDR: i16 = xen_abi::GNTST_bad_virt_addr as i16;
    pub const GNTST_PERMISSION_DENIED: i16 = xen_abi::GNTST_permission_denied as i16;
    pub const GNTST_BAD_GNTREF: i16 = xen_abi::GNTST_bad_gntref as i16;
    pub const GNTST_BAD_HANDLE: i16 = xen_abi::GNTST_bad_handle as i16;
    pub const GNTST_NO_DEVICE_SPACE: i16 = xen_abi::GNTST_no_device_space as i16;
    pub const GNTST_BAD_PAGE: i16 = xen_abi::GNTST_bad_page as i16;
    pub const GNTST_BAD_COPY_ARG: i16 = xen_abi::GNTST_bad_copy_arg as i16;
    pub const GET_STATUS_FRAMES: u32 = xen_abi::GNTTABOP_get_status_frames as u32;

    pub const GTF_PERMIT_ACCESS: u16 = xen_abi::GTF_permit_access as u16;
    pub const GTF_TRANSITIVE: u16 = xen_abi::GTF_transitive as u16;
    pub const GTF_TYPE_MASK: u16 = xen_abi::GTF_type_mask as u16;
    pub const GTF_READONLY: u16 = xen_abi::GTF_readonly as u16;
    pub const GTF_READING: u16 = xen_abi::GTF_reading as u16;
    pub const GTF_WRITING: u16 = xen_abi::GTF_writing as u16;
    pub const GTF_SUB_PAGE: u16 = xen_abi::GTF_sub_page as u16;
    pub const GNTCOPY_SOURCE_GREF: u16 = xen_abi::GNTCOPY_source_gref as u16;
    pub const GNTCOPY_DEST_GREF: u16 = xen_abi::GNTCOPY_dest_gref as u16;
    /// `GNTTAB_NR_RESERVED_ENTRIES`.
    pub const NR_RESERVED_ENTRIES: u32 = 8;

    /// `INITIAL_NR_GRANT_FRAMES`.
    pub const INITIAL_FRAMES: u32 = 1;
}

pub mod vmasst {
    pub const CMD_ENABLE: u32 = xen_abi::VMASST_CMD_enable as u32;
    pub const CMD_DISABLE: u32 = xen_abi::VMASST_CMD_disable as u32;
    pub const TYPE_RUNSTATE_UPDATE_FLAG: u32 = xen_abi::VMASST_TYPE_runstate_update_flag as u32;
    /// `HVM_VM_ASSIST_MASK`.
    pub const HVM_VALID_MASK: u64 = 1 << TYPE_RUNSTATE_UPDATE_FLAG;
}

pub mod domid {
    pub const SELF: u16 = xen_abi::consts::DOMID_SELF;
    pub const FIRST_RESERVED: u16 = xen_abi::consts::DOMID_FIRST_RESERVED;
}

/// `XEN_SYSCTL_INTERFACE_VERSION` / `XEN_DOMCTL_INTERFACE_VERSION` of 4.17.
pub const SYSCTL_INTERFACE_VERSION: u32 = 0x15;
pub const DOMCTL_INTERFACE_VERSION: u32 = 0x15;

/// `XEN_PVCLOCK_TSC_STABLE_BIT`.
pub const PVCLOCK_TSC_STABLE_BIT: u8 = xen_abi::XEN_PVCLOCK_TSC_STABLE_BIT as u8;

/// `XEN_LEGACY_MAX_VCPUS`: vCPUs with a default `vcpu_info` slot in shared_info.
pub const LEGACY_MAX_VCPUS: u32 = xen_abi::XEN_LEGACY_MAX_VCPUS;

pub const PAGE_SIZE: usize = 4096;
pub const PAGE_SHIFT: u32 = 12;

/// Offsets inside shared_info and vcpu_info, per layout.
pub mod shinfo {
    use core::mem::{offset_of, size_of};

    /// Size of one `vcpu_info` (both layouts).
    pub const VCPU_INFO_LEN: usize = size_of::<xen_abi::vcpu_info>();
    pub const VI_UPCALL_PENDING: usize = 0;
    pub const VI_UPCALL_MASK: usize = 1;
    /// `evtchn_pending_sel`: `xen_ulong_t`, at +8 (64-bit) or +4 (32-bit).
    pub const VI_PENDING_SEL_64: usize = offset_of!(xen_abi::vcpu_info, evtchn_pending_sel);
    pub const VI_PENDING_SEL_32: usize = offset_of!(xen_abi::compat::vcpu_info, evtchn_pending_sel);
    /// `vcpu_time_info` at +32 in both layouts.
    pub const VI_TIME: usize = offset_of!(xen_abi::vcpu_info, time);

    pub const EVTCHN_PENDING: usize = offset_of!(xen_abi::shared_info, evtchn_pending);
    pub const EVTCHN_MASK_64: usize = offset_of!(xen_abi::shared_info, evtchn_mask);
    pub const EVTCHN_MASK_32: usize = offset_of!(xen_abi::compat::shared_info, evtchn_mask);
    pub const WC_VERSION_64: usize = offset_of!(xen_abi::shared_info, wc_version);
    pub const WC_VERSION_32: usize = offset_of!(xen_abi::compat::shared_info, wc_version);
    /// `wc_sec_hi` follows `wc_nsec` in the 64-bit layout; in the 32-bit one it is the last
    /// field of `arch_shared_info` (0x90c + 6 * 4).
    pub const WC_SEC_HI_64: usize = offset_of!(xen_abi::shared_info, wc_sec_hi);
    pub const WC_SEC_HI_32: usize = offset_of!(xen_abi::compat::shared_info, arch)
        + offset_of!(xen_abi::compat::arch_shared_info, wc_sec_hi);

    /// Fields of `vcpu_time_info`.
    pub const T_VERSION: usize = offset_of!(xen_abi::vcpu_time_info, version);
    pub const T_TSC_TIMESTAMP: usize = offset_of!(xen_abi::vcpu_time_info, tsc_timestamp);
    pub const T_SYSTEM_TIME: usize = offset_of!(xen_abi::vcpu_time_info, system_time);
    pub const T_MUL: usize = offset_of!(xen_abi::vcpu_time_info, tsc_to_system_mul);
    /// `tsc_shift` (i8) and `flags` (u8) share the u32 at +28 with two pad bytes.
    pub const T_SHIFT_FLAGS: usize = offset_of!(xen_abi::vcpu_time_info, tsc_shift);
}

/// Little-endian field access in a decoded structure buffer. Offsets are compile-time
/// constants of the layouts above, always inside the buffer the caller read.
pub fn get_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(a)
}

pub fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

pub fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Compile-time checks: the layouts the decoders assume are the generated ones.
#[allow(clippy::identity_op)]
const _: () = {
    use core::mem::{offset_of, size_of};
    use xen_abi as n;
    use xen_abi::compat as c;
    macro_rules! size {
        ($t:ident, $n64:expr, $n32:expr) => {
            assert!(size_of::<n::$t>() == $n64);
            assert!(size_of::<c::$t>() == $n32);
        };
    }
    size!(xen_feature_info, 8, 8);
    size!(xen_platform_parameters, 8, 4);
    size!(xen_add_to_physmap, 24, 16);
    size!(xen_memory_map, 16, 8);
    size!(xen_hvm_param, 16, 16);
    size!(xen_hvm_get_time, 8, 8);
    size!(xen_hvm_evtchn_upcall_vector, 8, 8);
    size!(xen_hvm_pagetable_dying, 16, 16);
    size!(vcpu_set_periodic_timer, 8, 8);
    size!(vcpu_set_singleshot_timer, 16, 12);
    size!(vcpu_register_vcpu_info, 16, 16);
    size!(sched_shutdown, 4, 4);
    size!(sched_remote_shutdown, 8, 8);
    size!(sched_poll, 24, 16);
    size!(evtchn_alloc_unbound, 8, 8);
    size!(evtchn_bind_interdomain, 12, 12);
    size!(evtchn_bind_virq, 12, 12);
    size!(evtchn_bind_ipi, 8, 8);
    size!(evtchn_bind_vcpu, 8, 8);
    size!(evtchn_status, 24, 24);
    size!(evtchn_init_control, 24, 24);
    size!(evtchn_expand_array, 8, 8);
    size!(evtchn_set_priority, 8, 8);
    size!(evtchn_fifo_control_block, 72, 72);
    size!(gnttab_setup_table, 24, 16);
    size!(gnttab_query_size, 16, 16);
    size!(gnttab_set_version, 4, 4);
    size!(gnttab_get_version, 8, 8);
    size!(gnttab_get_status_frames, 16, 12);
    size!(gnttab_copy, 40, 24);
    size!(grant_entry_v1, 8, 8);
    size!(grant_entry_v2, 16, 16);
    size!(xen_memory_reservation, 32, 20);
    size!(xen_remove_from_physmap, 16, 8);
    size!(sched_watchdog, 8, 8);
    size!(xen_vnuma_topology_info, 40, 40);
    assert!(size_of::<n::xen_compile_info>() == 144);
    assert!(offset_of!(n::xen_add_to_physmap, space) == 4);
    assert!(offset_of!(n::xen_add_to_physmap, idx) == 8);
    assert!(offset_of!(n::xen_add_to_physmap, gpfn) == 16);
    assert!(offset_of!(c::xen_add_to_physmap, idx) == 8);
    assert!(offset_of!(c::xen_add_to_physmap, gpfn) == 12);
    assert!(offset_of!(n::xen_memory_map, buffer) == 8);
    assert!(offset_of!(c::xen_memory_map, buffer) == 4);
    assert!(offset_of!(n::xen_hvm_param, index) == 4);
    assert!(offset_of!(n::xen_hvm_param, value) == 8);
    assert!(offset_of!(c::xen_hvm_param, value) == 8);
    assert!(offset_of!(n::xen_hvm_evtchn_upcall_vector, vector) == 4);
    assert!(offset_of!(n::sched_poll, nr_ports) == 8);
    assert!(offset_of!(n::sched_poll, timeout) == 16);
    assert!(offset_of!(c::sched_poll, nr_ports) == 4);
    assert!(offset_of!(c::sched_poll, timeout) == 8);
    assert!(offset_of!(n::evtchn_status, status) == 8);
    assert!(offset_of!(n::evtchn_status, vcpu) == 12);
    assert!(offset_of!(n::evtchn_status, u) == 16);
    assert!(offset_of!(n::evtchn_bind_interdomain, remote_port) == 4);
    assert!(offset_of!(n::evtchn_bind_interdomain, local_port) == 8);
    assert!(offset_of!(n::evtchn_bind_virq, port) == 8);
    assert!(offset_of!(n::evtchn_init_control, offset) == 8);
    assert!(offset_of!(n::evtchn_init_control, vcpu) == 12);
    assert!(offset_of!(n::evtchn_init_control, link_bits) == 16);
    assert!(offset_of!(n::evtchn_set_priority, priority) == 4);
    assert!(offset_of!(n::evtchn_fifo_control_block, head) == 8);
    assert!(offset_of!(n::gnttab_setup_table, nr_frames) == 4);
    assert!(offset_of!(n::gnttab_setup_table, status) == 8);
    assert!(offset_of!(n::gnttab_setup_table, frame_list) == 16);
    assert!(offset_of!(c::gnttab_setup_table, frame_list) == 12);
    assert!(offset_of!(n::gnttab_query_size, nr_frames) == 4);
    assert!(offset_of!(n::gnttab_query_size, max_nr_frames) == 8);
    assert!(offset_of!(n::gnttab_query_size, status) == 12);
    assert!(offset_of!(n::gnttab_get_version, version) == 4);
    assert!(offset_of!(n::gnttab_get_status_frames, dom) == 4);
    assert!(offset_of!(n::gnttab_get_status_frames, status) == 6);
    assert!(offset_of!(n::gnttab_get_status_frames, frame_list) == 8);
    assert!(offset_of!(c::gnttab_get_status_frames, frame_list) == 8);
    assert!(offset_of!(n::gnttab_copy, dest) == 16);
    assert!(offset_of!(n::gnttab_copy, len) == 32);
    assert!(offset_of!(n::gnttab_copy, flags) == 34);
    assert!(offset_of!(n::gnttab_copy, status) == 36);
    assert!(offset_of!(c::gnttab_copy, dest) == 8);
    assert!(offset_of!(c::gnttab_copy, len) == 16);
    assert!(offset_of!(c::gnttab_copy, status) == 20);
    assert!(offset_of!(n::gnttab_copy_gnttab_copy_ptr, domid) == 8);
    assert!(offset_of!(n::gnttab_copy_gnttab_copy_ptr, offset) == 10);
    assert!(offset_of!(c::gnttab_copy_gnttab_copy_ptr, domid) == 4);
    assert!(offset_of!(c::gnttab_copy_gnttab_copy_ptr, offset) == 6);
    assert!(offset_of!(n::grant_entry_v1, domid) == 2);
    assert!(offset_of!(n::grant_entry_v1, frame) == 4);
    assert!(offset_of!(n::xen_memory_reservation, nr_extents) == 8);
    assert!(offset_of!(n::xen_memory_reservation, extent_order) == 16);
    assert!(offset_of!(n::xen_memory_reservation, mem_flags) == 20);
    assert!(offset_of!(n::xen_memory_reservation, domid) == 24);
    assert!(offset_of!(c::xen_memory_reservation, nr_extents) == 4);
    assert!(offset_of!(c::xen_memory_reservation, extent_order) == 8);
    assert!(offset_of!(c::xen_memory_reservation, mem_flags) == 12);
    assert!(offset_of!(c::xen_memory_reservation, domid) == 16);
    assert!(offset_of!(n::xen_remove_from_physmap, gpfn) == 8);
    assert!(offset_of!(c::xen_remove_from_physmap, gpfn) == 4);
    assert!(offset_of!(n::vcpu_register_vcpu_info, offset) == 8);
    assert!(offset_of!(n::vcpu_time_info, flags) == shinfo::T_SHIFT_FLAGS + 1);
    assert!(size_of::<c::vcpu_info>() == shinfo::VCPU_INFO_LEN);
    assert!(offset_of!(c::vcpu_info, time) == shinfo::VI_TIME);
};
