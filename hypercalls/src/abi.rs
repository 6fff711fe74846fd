//! Xen 4.17 ABI numbers and structure layouts this crate needs.
//!
//! Hand-written from the Xen public headers (`xen.h`, `version.h`, `event_channel.h`,
//! `grant_table.h`, `memory.h`, `sched.h`, `vcpu.h`, `hvm/hvm_op.h`, `hvm/params.h`) while the
//! generated `xen-abi` crate is being produced; once it builds, the constants below are replaced
//! by `xen_abi::*` and the sizes are cross-checked against its `size_of` assertions.
//!
//! Structures are decoded field by field from little-endian byte buffers, per guest width, so a
//! 32-bit (compat) guest's layout (4-byte aligned `uint64_t`, 32-bit handles and `xen_ulong_t`)
//! is handled by the same code as the 64-bit one, with no `repr(C)` guessing.

#![allow(dead_code)] // the full set of numbers documents the ABI; not all are used yet

/// Hypercall numbers (`__HYPERVISOR_*`).
pub mod nr {
    pub const PLATFORM_OP: u64 = 7;
    pub const MEMORY_OP: u64 = 12;
    pub const MULTICALL: u64 = 13;
    pub const SET_TIMER_OP: u64 = 15;
    pub const XEN_VERSION: u64 = 17;
    pub const CONSOLE_IO: u64 = 18;
    pub const GRANT_TABLE_OP: u64 = 20;
    pub const VM_ASSIST: u64 = 21;
    pub const VCPU_OP: u64 = 24;
    pub const MMUEXT_OP: u64 = 26;
    pub const XSM_OP: u64 = 27;
    pub const SCHED_OP: u64 = 29;
    pub const EVENT_CHANNEL_OP: u64 = 32;
    pub const PHYSDEV_OP: u64 = 33;
    pub const HVM_OP: u64 = 34;
    pub const SYSCTL: u64 = 35;
    pub const DOMCTL: u64 = 36;
    pub const XENPMU_OP: u64 = 40;
    pub const DM_OP: u64 = 41;
    pub const HYPFS_OP: u64 = 42;
    /// Size of Xen's hypercall table (`NR_hypercalls`).
    pub const NR_HYPERCALLS: u64 = 64;
}

/// `XENVER_*` (version.h).
pub mod xenver {
    pub const VERSION: i32 = 0;
    pub const EXTRAVERSION: i32 = 1;
    pub const COMPILE_INFO: i32 = 2;
    pub const CAPABILITIES: i32 = 3;
    pub const CHANGESET: i32 = 4;
    pub const PLATFORM_PARAMETERS: i32 = 5;
    pub const GET_FEATURES: i32 = 6;
    pub const PAGESIZE: i32 = 7;
    pub const GUEST_HANDLE: i32 = 8;
    pub const COMMANDLINE: i32 = 9;
    pub const BUILD_ID: i32 = 10;

    pub const EXTRAVERSION_LEN: usize = 16;
    /// `xen_compile_info_t`: compiler[64], compile_by[16], compile_domain[32], compile_date[32].
    pub const COMPILE_INFO_LEN: usize = 144;
    pub const CAPABILITIES_LEN: usize = 1024;
    pub const CHANGESET_LEN: usize = 64;
    pub const DOMAIN_HANDLE_LEN: usize = 16;
    pub const FEATURE_INFO_LEN: usize = 8;
    /// `HYPERVISOR_VIRT_START` of x86_64 Xen.
    pub const HYPERVISOR_VIRT_START_64: u64 = 0xFFFF_8000_0000_0000;
    /// `HYPERVISOR_COMPAT_VIRT_START(d)` of an HVM domain (`hv_compat_vstart` is never set).
    pub const HYPERVISOR_VIRT_START_COMPAT: u32 = 0;
    /// What Xen copies for privileged sub-ops a domU may not see (`xen_deny()`).
    pub const DENIED: &[u8] = b"<denied>\0";
}

/// `XENFEAT_*` (features.h).
pub mod xenfeat {
    pub const WRITABLE_PAGE_TABLES: u32 = 0;
    pub const AUTO_TRANSLATED_PHYSMAP: u32 = 2;
    pub const HVM_CALLBACK_VECTOR: u32 = 8;
    pub const HVM_SAFE_PVCLOCK: u32 = 9;
    pub const HVM_PIRQS: u32 = 10;
    pub const MEMORY_OP_VNODE_SUPPORTED: u32 = 13;
    pub const NOT_DIRECT_MAPPED: u32 = 16;
}

pub mod consoleio {
    pub const WRITE: u32 = 0;
    pub const READ: u32 = 1;
}

pub mod xenmem {
    pub const INCREASE_RESERVATION: u32 = 0;
    pub const DECREASE_RESERVATION: u32 = 1;
    pub const MAXIMUM_RAM_PAGE: u32 = 2;
    pub const CURRENT_RESERVATION: u32 = 3;
    pub const MAXIMUM_RESERVATION: u32 = 4;
    pub const MACHPHYS_MFN_LIST: u32 = 5;
    pub const POPULATE_PHYSMAP: u32 = 6;
    pub const ADD_TO_PHYSMAP: u32 = 7;
    pub const MEMORY_MAP: u32 = 9;
    pub const MACHINE_MEMORY_MAP: u32 = 10;
    pub const EXCHANGE: u32 = 11;
    pub const MACHPHYS_MAPPING: u32 = 12;
    pub const SET_MEMORY_MAP: u32 = 13;
    pub const MAXIMUM_GPFN: u32 = 14;
    pub const REMOVE_FROM_PHYSMAP: u32 = 15;
    pub const ADD_TO_PHYSMAP_BATCH: u32 = 23;
    pub const GET_VNUMAINFO: u32 = 26;

    pub const MEMOP_EXTENT_SHIFT: u32 = 6;
    pub const MEMOP_CMD_MASK: u64 = (1 << MEMOP_EXTENT_SHIFT) - 1;

    pub const MAPSPACE_SHARED_INFO: u32 = 0;
    pub const MAPSPACE_GRANT_TABLE: u32 = 1;
    pub const MAPSPACE_GMFN: u32 = 2;
    pub const MAPSPACE_GMFN_RANGE: u32 = 3;
    pub const MAPSPACE_GMFN_FOREIGN: u32 = 4;
    pub const MAPSPACE_DEV_MMIO: u32 = 5;
    pub const MAPIDX_GRANT_TABLE_STATUS: u64 = 0x8000_0000;

    /// `struct e820entry` is packed: addr u64, size u64, type u32.
    pub const E820_ENTRY_LEN: usize = 20;
}

pub mod hvmop {
    pub const SET_PARAM: u64 = 0;
    pub const GET_PARAM: u64 = 1;
    pub const FLUSH_TLBS: u64 = 5;
    pub const PAGETABLE_DYING: u64 = 9;
    pub const GET_TIME: u64 = 10;
    pub const XENTRACE: u64 = 11;
    pub const GET_MEM_TYPE: u64 = 15;
    pub const SET_EVTCHN_UPCALL_VECTOR: u64 = 23;
    pub const GUEST_REQUEST_VM_EVENT: u64 = 24;
    pub const ALTP2M: u64 = 25;
}

/// `HVM_PARAM_*` (hvm/params.h).
pub mod param {
    pub const CALLBACK_IRQ: u32 = 0;
    pub const STORE_PFN: u32 = 1;
    pub const STORE_EVTCHN: u32 = 2;
    pub const PAE_ENABLED: u32 = 4;
    pub const IOREQ_PFN: u32 = 5;
    pub const BUFIOREQ_PFN: u32 = 6;
    pub const VIRIDIAN: u32 = 9;
    pub const TIMER_MODE: u32 = 10;
    pub const HPET_ENABLED: u32 = 11;
    pub const IDENT_PT: u32 = 12;
    pub const DM_DOMAIN: u32 = 13;
    pub const ACPI_S_STATE: u32 = 14;
    pub const VM86_TSS: u32 = 15;
    pub const VPT_ALIGN: u32 = 16;
    pub const CONSOLE_PFN: u32 = 17;
    pub const CONSOLE_EVTCHN: u32 = 18;
    pub const ACPI_IOPORTS_LOCATION: u32 = 19;
    pub const MEMORY_EVENT_CR0: u32 = 20;
    pub const MEMORY_EVENT_CR3: u32 = 21;
    pub const MEMORY_EVENT_CR4: u32 = 22;
    pub const MEMORY_EVENT_INT3: u32 = 23;
    pub const NESTEDHVM: u32 = 24;
    pub const MEMORY_EVENT_SINGLE_STEP: u32 = 25;
    pub const BUFIOREQ_EVTCHN: u32 = 26;
    pub const PAGING_RING_PFN: u32 = 27;
    pub const MONITOR_RING_PFN: u32 = 28;
    pub const SHARING_RING_PFN: u32 = 29;
    pub const MEMORY_EVENT_MSR: u32 = 30;
    pub const TRIPLE_FAULT_REASON: u32 = 31;
    pub const IOREQ_SERVER_PFN: u32 = 32;
    pub const NR_IOREQ_SERVER_PAGES: u32 = 33;
    pub const VM_GENERATION_ID_ADDR: u32 = 34;
    pub const ALTP2M: u32 = 35;
    pub const X87_FIP_WIDTH: u32 = 36;
    pub const VM86_TSS_SIZED: u32 = 37;
    pub const MCA_CAP: u32 = 38;
    pub const NR_PARAMS: u32 = 39;
}

pub mod vcpuop {
    pub const INITIALISE: i32 = 0;
    pub const UP: i32 = 1;
    pub const DOWN: i32 = 2;
    pub const IS_UP: i32 = 3;
    pub const GET_RUNSTATE_INFO: i32 = 4;
    pub const REGISTER_RUNSTATE_MEMORY_AREA: i32 = 5;
    pub const SET_PERIODIC_TIMER: i32 = 6;
    pub const STOP_PERIODIC_TIMER: i32 = 7;
    pub const SET_SINGLESHOT_TIMER: i32 = 8;
    pub const STOP_SINGLESHOT_TIMER: i32 = 9;
    pub const REGISTER_VCPU_INFO: i32 = 10;
    pub const SEND_NMI: i32 = 11;
    pub const GET_PHYSID: i32 = 12;
    pub const REGISTER_VCPU_TIME_MEMORY_AREA: i32 = 13;
}

pub mod schedop {
    pub const YIELD: i32 = 0;
    pub const BLOCK: i32 = 1;
    pub const SHUTDOWN: i32 = 2;
    pub const POLL: i32 = 3;
    pub const REMOTE_SHUTDOWN: i32 = 4;
    pub const SHUTDOWN_CODE: i32 = 5;
    pub const WATCHDOG: i32 = 6;
    pub const PIN_OVERRIDE: i32 = 7;
    /// `do_poll`: "Fairly arbitrary limit".
    pub const POLL_MAX_PORTS: u32 = 128;
}

/// `SHUTDOWN_*` reasons (sched.h).
pub mod shutdown {
    pub const POWEROFF: u8 = 0;
    pub const REBOOT: u8 = 1;
    pub const SUSPEND: u8 = 2;
    pub const CRASH: u8 = 3;
    pub const WATCHDOG: u8 = 4;
    pub const SOFT_RESET: u8 = 5;
}

pub mod evtchnop {
    pub const BIND_INTERDOMAIN: i32 = 0;
    pub const BIND_VIRQ: i32 = 1;
    pub const BIND_PIRQ: i32 = 2;
    pub const CLOSE: i32 = 3;
    pub const SEND: i32 = 4;
    pub const STATUS: i32 = 5;
    pub const ALLOC_UNBOUND: i32 = 6;
    pub const BIND_IPI: i32 = 7;
    pub const BIND_VCPU: i32 = 8;
    pub const UNMASK: i32 = 9;
    pub const RESET: i32 = 10;
    pub const INIT_CONTROL: i32 = 11;
    pub const EXPAND_ARRAY: i32 = 12;
    pub const SET_PRIORITY: i32 = 13;
    pub const RESET_CONT: i32 = 14;

    pub const STAT_CLOSED: u32 = 0;
    pub const STAT_UNBOUND: u32 = 1;
    pub const STAT_INTERDOMAIN: u32 = 2;
    pub const STAT_PIRQ: u32 = 3;
    pub const STAT_VIRQ: u32 = 4;
    pub const STAT_IPI: u32 = 5;

    /// `sizeof(evtchn_fifo_control_block_t)`.
    pub const FIFO_CONTROL_BLOCK_LEN: u32 = 64;
    pub const FIFO_LINK_BITS: u8 = 17;
}

/// `VIRQ_*` (xen.h).
pub mod virq {
    pub const TIMER: u32 = 0;
    pub const DEBUG: u32 = 1;
    pub const XENOPROF: u32 = 7;
    pub const XENPMU: u32 = 13;
    pub const NR_VIRQS: u32 = 24;
}

pub mod gnttabop {
    pub const MAP_GRANT_REF: u32 = 0;
    pub const UNMAP_GRANT_REF: u32 = 1;
    pub const SETUP_TABLE: u32 = 2;
    pub const COPY: u32 = 5;
    pub const QUERY_SIZE: u32 = 6;
    pub const SET_VERSION: u32 = 8;
    pub const GET_VERSION: u32 = 10;
    pub const SWAP_GRANT_REF: u32 = 11;

    pub const GNTST_OKAY: i16 = 0;
    pub const GNTST_GENERAL_ERROR: i16 = -1;
    pub const GNTST_BAD_DOMAIN: i16 = -2;
    pub const GNTST_BAD_VIRT_ADDR: i16 = -5;
    pub const GNTST_PERMISSION_DENIED: i16 = -8;

    /// `INITIAL_NR_GRANT_FRAMES`.
    pub const INITIAL_FRAMES: u32 = 1;
}

pub mod vmasst {
    pub const CMD_ENABLE: u32 = 0;
    pub const CMD_DISABLE: u32 = 1;
    pub const TYPE_RUNSTATE_UPDATE_FLAG: u32 = 5;
    /// `HVM_VM_ASSIST_MASK`.
    pub const HVM_VALID_MASK: u64 = 1 << TYPE_RUNSTATE_UPDATE_FLAG;
}

pub mod domid {
    pub const SELF: u16 = 0x7FF0;
    pub const FIRST_RESERVED: u16 = 0x7FF0;
}

/// `XEN_SYSCTL_INTERFACE_VERSION` / `XEN_DOMCTL_INTERFACE_VERSION` of 4.17.
pub const SYSCTL_INTERFACE_VERSION: u32 = 0x15;
pub const DOMCTL_INTERFACE_VERSION: u32 = 0x15;

/// `XEN_PVCLOCK_TSC_STABLE_BIT`.
pub const PVCLOCK_TSC_STABLE_BIT: u8 = 1;

/// `XEN_LEGACY_MAX_VCPUS`: vCPUs with a default `vcpu_info` slot in shared_info.
pub const LEGACY_MAX_VCPUS: u32 = 32;

pub const PAGE_SIZE: usize = 4096;
pub const PAGE_SHIFT: u32 = 12;

/// Offsets inside shared_info and vcpu_info, per layout.
pub mod shinfo {
    /// Size of one `vcpu_info` (both layouts).
    pub const VCPU_INFO_LEN: usize = 64;
    pub const VI_UPCALL_PENDING: usize = 0;
    pub const VI_UPCALL_MASK: usize = 1;
    /// `evtchn_pending_sel`: `xen_ulong_t`, at +8 (64-bit) or +4 (32-bit).
    pub const VI_PENDING_SEL_64: usize = 8;
    pub const VI_PENDING_SEL_32: usize = 4;
    /// `vcpu_time_info` at +32 in both layouts.
    pub const VI_TIME: usize = 32;

    pub const EVTCHN_PENDING: usize = 0x800;
    pub const EVTCHN_MASK_64: usize = 0xa00;
    pub const EVTCHN_MASK_32: usize = 0x880;
    pub const WC_VERSION_64: usize = 0xc00;
    pub const WC_VERSION_32: usize = 0x900;
    /// `wc_sec_hi` follows `wc_nsec` in the 64-bit layout; in the 32-bit one it is the last
    /// field of `arch_shared_info` (0x90c + 6 * 4).
    pub const WC_SEC_HI_64: usize = 0xc0c;
    pub const WC_SEC_HI_32: usize = 0x924;

    /// Fields of `vcpu_time_info`.
    pub const T_VERSION: usize = 0;
    pub const T_TSC_TIMESTAMP: usize = 8;
    pub const T_SYSTEM_TIME: usize = 16;
    pub const T_MUL: usize = 24;
    /// `tsc_shift` (i8) and `flags` (u8) share the u32 at +28 with two pad bytes.
    pub const T_SHIFT_FLAGS: usize = 28;
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
