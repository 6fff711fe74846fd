/*
 * The parts of the Xen 4.17 public ABI that xenkvm's test guest uses, restated from
 * the public headers (xen/xen.h, sched.h, event_channel.h, grant_table.h, memory.h,
 * version.h, vcpu.h, hvm/hvm_op.h, hvm/params.h, hvm/start_info.h, io/console.h,
 * io/xs_wire.h, arch-x86/cpuid.h). Only the 64-bit layouts: the guest runs in long mode.
 * Every structure has its size (and the offsets the VMM cares about) asserted.
 */
#ifndef XENKVM_GUEST_XEN_H
#define XENKVM_GUEST_XEN_H

/* elfnote.h: physical 32-bit entry point of a PVH kernel. */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

#ifndef __ASSEMBLER__
#include <stdint.h>

/* arch-x86/cpuid.h: the Xen leaves start at 0x40000000 + n*0x100. */
#define XEN_CPUID_FIRST_LEAF 0x40000000u
#define XEN_CPUID_LEAF_STEP  0x100u
#define XEN_CPUID_LAST_LEAF  0x40010000u

/* xen.h: hypercall numbers (the offset of a stub in the hypercall page is nr * 32). */
#define __HYPERVISOR_memory_op        12
#define __HYPERVISOR_xen_version      17
#define __HYPERVISOR_console_io       18
#define __HYPERVISOR_grant_table_op   20
#define __HYPERVISOR_vm_assist        21
#define __HYPERVISOR_vcpu_op          24
#define __HYPERVISOR_sched_op         29
#define __HYPERVISOR_event_channel_op 32
#define __HYPERVISOR_hvm_op           34

#define DOMID_SELF      0x7ff0 /* xen.h */
#define CONSOLEIO_write 0      /* xen.h: console_io(CONSOLEIO_write, len, buf) */

/* errno.h: hypercalls return -errno. */
#define XEN_ENOENT 2
#define XEN_EINVAL 22
#define XEN_EEXIST 17

/* version.h */
#define XENVER_version      0 /* returns (major << 16) | minor */
#define XENVER_get_features 6 /* arg: struct xen_feature_info */
struct xen_feature_info {
    uint32_t submap_idx; /* IN: which 32-bit submap */
    uint32_t submap;     /* OUT */
};
/* features.h */
#define XENFEAT_auto_translated_physmap 2
#define XENFEAT_hvm_callback_vector     8
#define XENFEAT_hvm_safe_pvclock        9

/* memory.h */
#define XENMEM_add_to_physmap   7
#define XENMAPSPACE_shared_info 0
struct xen_add_to_physmap {
    uint16_t domid;
    uint16_t size;  /* only for XENMAPSPACE_gmfn_range */
    uint32_t space; /* XENMAPSPACE_* */
    uint64_t idx;
    uint64_t gpfn;
};
_Static_assert(sizeof(struct xen_add_to_physmap) == 24, "xen_add_to_physmap");

/* hvm/hvm_op.h and hvm/params.h */
#define HVMOP_get_param          1
#define HVM_PARAM_STORE_PFN      1
#define HVM_PARAM_STORE_EVTCHN   2
#define HVM_PARAM_CONSOLE_PFN    17
#define HVM_PARAM_CONSOLE_EVTCHN 18
struct xen_hvm_param {
    uint16_t domid;
    uint16_t pad;
    uint32_t index;
    uint64_t value;
};
_Static_assert(sizeof(struct xen_hvm_param) == 16, "xen_hvm_param");

/* event_channel.h */
#define EVTCHNOP_close         3 /* struct evtchn_port_op */
#define EVTCHNOP_send          4 /* struct evtchn_port_op */
#define EVTCHNOP_status        5
#define EVTCHNOP_alloc_unbound 6
#define EVTCHNSTAT_closed  0
#define EVTCHNSTAT_unbound 1
struct evtchn_alloc_unbound {
    uint16_t dom, remote_dom; /* IN */
    uint32_t port;            /* OUT */
};
struct evtchn_port_op { /* evtchn_close, evtchn_send: just the port */
    uint32_t port;
};
struct evtchn_status {
    uint16_t dom;    /* IN */
    uint32_t port;   /* IN */
    uint32_t status; /* OUT: EVTCHNSTAT_* */
    uint32_t vcpu;   /* OUT */
    union {
        struct { uint16_t dom; } unbound;
        struct { uint16_t dom; uint32_t port; } interdomain;
        uint32_t pirq, virq;
    } u;
};
_Static_assert(sizeof(struct evtchn_alloc_unbound) == 8, "evtchn_alloc_unbound");
_Static_assert(sizeof(struct evtchn_status) == 24, "evtchn_status");

/* sched.h */
#define SCHEDOP_shutdown  2 /* struct sched_shutdown */
#define SCHEDOP_poll      3 /* struct sched_poll */
#define SHUTDOWN_poweroff 0
#define SHUTDOWN_reboot   1
#define SHUTDOWN_suspend  2
#define SHUTDOWN_crash    3
struct sched_shutdown {
    uint32_t reason;
};
struct sched_poll {
    uint32_t *ports;   /* guest handle: array of evtchn ports */
    uint32_t nr_ports;
    uint64_t timeout;  /* absolute Xen system time in ns; 0 = none */
};
_Static_assert(sizeof(struct sched_poll) == 24, "sched_poll");

/* grant_table.h */
#define GNTTABOP_setup_table 2
#define GNTTABOP_query_size  6
#define GNTST_okay           0
struct gnttab_query_size {
    uint16_t dom;           /* IN */
    uint32_t nr_frames;     /* OUT */
    uint32_t max_nr_frames; /* OUT */
    int16_t status;         /* OUT: GNTST_* */
};
struct gnttab_setup_table {
    uint16_t dom;           /* IN */
    uint32_t nr_frames;     /* IN */
    int16_t status;         /* OUT */
    uint64_t *frame_list;   /* guest handle, OUT: nr_frames frame numbers */
};
_Static_assert(sizeof(struct gnttab_query_size) == 16, "gnttab_query_size");
_Static_assert(sizeof(struct gnttab_setup_table) == 24, "gnttab_setup_table");

/* xen.h: vm_assist(cmd, type) */
#define VMASST_CMD_enable                0
#define VMASST_TYPE_runstate_update_flag 5 /* XEN_RUNSTATE_UPDATE in state_entry_time */

/* vcpu.h: vcpu_op(cmd, vcpuid, arg) */
#define VCPUOP_initialise                    0 /* arg: struct vcpu_hvm_context (HVM) */
#define VCPUOP_up                            1
#define VCPUOP_down                          2
#define VCPUOP_is_up                         3
#define VCPUOP_get_runstate_info             4 /* arg: struct vcpu_runstate_info */
#define VCPUOP_register_runstate_memory_area 5 /* arg: struct vcpu_register_runstate_memory_area */
#define RUNSTATE_running  0
#define RUNSTATE_runnable 1
#define RUNSTATE_blocked  2
#define RUNSTATE_offline  3
#define XEN_RUNSTATE_UPDATE (1ull << 63) /* in state_entry_time while Xen writes the area */
struct vcpu_runstate_info {
    int state;                 /* RUNSTATE_* */
    uint64_t state_entry_time; /* Xen system time (ns) of entering `state` */
    uint64_t time[4];          /* ns spent in each RUNSTATE_* */
};
/* hvm/hvm_vcpu.h: the 64-bit half of the union; the 32-bit half is 120 bytes. */
#define VCPU_HVM_MODE_32B 0
#define VCPU_HVM_MODE_64B 1
struct vcpu_hvm_x86_64 {
    uint64_t rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, rip, rflags;
    uint64_t cr0, cr3, cr4, efer;
};
struct vcpu_hvm_context {
    uint32_t mode; /* VCPU_HVM_MODE_* */
    uint32_t pad;
    union {
        struct vcpu_hvm_x86_64 x86_64;
        uint8_t x86_32[120];
    } cpu_regs;
};
_Static_assert(sizeof(struct vcpu_hvm_context) == 128, "vcpu_hvm_context");
struct vcpu_register_runstate_memory_area {
    uint64_t addr; /* guest virtual address of a struct vcpu_runstate_info; 0: none */
};
_Static_assert(sizeof(struct vcpu_runstate_info) == 48, "vcpu_runstate_info");
_Static_assert(__builtin_offsetof(struct vcpu_runstate_info, state_entry_time) == 8, "state_entry_time");
_Static_assert(__builtin_offsetof(struct vcpu_runstate_info, time) == 16, "time");

/* xen.h: shared_info and the per-vCPU time record (pvclock). */
struct vcpu_time_info {
    uint32_t version; /* odd while Xen updates the record */
    uint32_t pad0;
    uint64_t tsc_timestamp;
    uint64_t system_time; /* ns since boot at tsc_timestamp */
    uint32_t tsc_to_system_mul;
    int8_t tsc_shift;
    uint8_t flags;
    uint8_t pad1[2];
};
struct vcpu_info {
    uint8_t evtchn_upcall_pending;
    uint8_t evtchn_upcall_mask;
    uint8_t pad[6];
    uint64_t evtchn_pending_sel;
    uint64_t arch_cr2, arch_pad; /* struct arch_vcpu_info */
    struct vcpu_time_info time;
};
struct shared_info {
    struct vcpu_info vcpu_info[32];
    uint64_t evtchn_pending[64];
    uint64_t evtchn_mask[64];
    uint32_t wc_version, wc_sec, wc_nsec, wc_sec_hi; /* wallclock at system time 0 */
    /* struct arch_shared_info follows; unused here */
};
_Static_assert(sizeof(struct vcpu_time_info) == 32, "vcpu_time_info");
_Static_assert(sizeof(struct vcpu_info) == 64, "vcpu_info");
_Static_assert(__builtin_offsetof(struct vcpu_info, time) == 32, "vcpu_info.time");
_Static_assert(__builtin_offsetof(struct shared_info, evtchn_pending) == 0x800, "evtchn_pending");
_Static_assert(__builtin_offsetof(struct shared_info, wc_version) == 0xc00, "wc");

/* hvm/start_info.h: what EBX points at on PVH entry. */
#define XEN_HVM_START_MAGIC_VALUE 0x336ec578u
struct hvm_start_info {
    uint32_t magic;
    uint32_t version;
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr; /* NUL-terminated command line, or 0 */
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr;  /* version >= 1 */
    uint32_t memmap_entries;
    uint32_t reserved;
};
_Static_assert(__builtin_offsetof(struct hvm_start_info, cmdline_paddr) == 24, "cmdline_paddr");
_Static_assert(sizeof(struct hvm_start_info) == 56, "hvm_start_info");

/* io/console.h: the PV console ring page. */
struct xencons_interface {
    char in[1024];
    char out[2048];
    uint32_t in_cons, in_prod;
    uint32_t out_cons, out_prod;
};
_Static_assert(__builtin_offsetof(struct xencons_interface, out) == 0x400, "out");
_Static_assert(__builtin_offsetof(struct xencons_interface, out_cons) == 0xc08, "out_cons");

/* io/xs_wire.h: the xenstore ring page and message header. */
#define XENSTORE_RING_SIZE 1024
#define XS_DIRECTORY   1
#define XS_READ        2
#define XS_WATCH       4
#define XS_WRITE       11
#define XS_WATCH_EVENT 15
#define XS_ERROR       16
struct xenstore_domain_interface {
    char req[XENSTORE_RING_SIZE];
    char rsp[XENSTORE_RING_SIZE];
    uint32_t req_cons, req_prod;
    uint32_t rsp_cons, rsp_prod;
    uint32_t server_features, connection, error;
};
struct xsd_sockmsg {
    uint32_t type;   /* XS_* */
    uint32_t req_id; /* echoed in the reply */
    uint32_t tx_id;  /* 0: no transaction */
    uint32_t len;    /* payload bytes that follow */
};
_Static_assert(__builtin_offsetof(struct xenstore_domain_interface, req_cons) == 0x800, "req_cons");
_Static_assert(__builtin_offsetof(struct xenstore_domain_interface, rsp_prod) == 0x80c, "rsp_prod");


/* ------------------------------------------------------------------------
 * Event delivery, timers, SMP, FIFO, grant v2, xenstore transactions and
 * console input: the parts the issue-5 checks use.
 */

/* errno.h */
#define XEN_ENOSYS 38
#define XEN_EAGAIN 11
#define XEN_ETIME  62

/* hvm/hvm_op.h: a per-vCPU upcall vector (CPUID 0x40000004 EAX bit 6). */
#define HVMOP_set_evtchn_upcall_vector 23
struct xen_hvm_evtchn_upcall_vector {
    uint32_t vcpu;
    uint8_t vector;
};
_Static_assert(sizeof(struct xen_hvm_evtchn_upcall_vector) == 8, "xen_hvm_evtchn_upcall_vector");

/* event_channel.h */
#define EVTCHNOP_bind_virq     1
#define EVTCHNOP_bind_ipi      7
#define EVTCHNOP_init_control  11
#define EVTCHNOP_expand_array  12
#define VIRQ_TIMER 0
struct evtchn_bind_virq {
    uint32_t virq; /* IN */
    uint32_t vcpu; /* IN */
    uint32_t port; /* OUT */
};
struct evtchn_bind_ipi {
    uint32_t vcpu; /* IN */
    uint32_t port; /* OUT */
};
struct evtchn_init_control {
    uint64_t control_gfn; /* IN */
    uint32_t offset;      /* IN: of the control block in the frame, 8-byte aligned */
    uint32_t vcpu;        /* IN */
    uint8_t link_bits;    /* OUT */
    uint8_t _pad[7];
};
struct evtchn_expand_array {
    uint64_t array_gfn; /* IN: one more page of event words */
};
/* FIFO ABI: 32-bit event words in array pages, a control block per vCPU. */
#define EVTCHN_FIFO_PENDING   31
#define EVTCHN_FIFO_MASKED    30
#define EVTCHN_FIFO_LINKED    29
#define EVTCHN_FIFO_BUSY      28
#define EVTCHN_FIFO_LINK_MASK ((1u << 17) - 1)
#define EVTCHN_FIFO_MAX_QUEUES 16
struct evtchn_fifo_control_block {
    uint32_t ready; /* bit q: queue q is not empty */
    uint32_t _rsvd;
    uint32_t head[EVTCHN_FIFO_MAX_QUEUES];
};
_Static_assert(sizeof(struct evtchn_bind_virq) == 12, "evtchn_bind_virq");
_Static_assert(sizeof(struct evtchn_bind_ipi) == 8, "evtchn_bind_ipi");
_Static_assert(sizeof(struct evtchn_init_control) == 24, "evtchn_init_control");
_Static_assert(sizeof(struct evtchn_fifo_control_block) == 72, "evtchn_fifo_control_block");

/* vcpu.h: timers (VIRQ_TIMER on the calling vCPU). */
#define VCPUOP_set_periodic_timer   6 /* struct vcpu_set_periodic_timer */
#define VCPUOP_stop_periodic_timer  7
#define VCPUOP_set_singleshot_timer 8 /* struct vcpu_set_singleshot_timer */
#define VCPUOP_stop_singleshot_timer 9
struct vcpu_set_periodic_timer {
    uint64_t period_ns;
};
struct vcpu_set_singleshot_timer {
    uint64_t timeout_abs_ns; /* Xen system time */
    uint32_t flags;          /* VCPU_SSHOTTMR_* */
};
_Static_assert(sizeof(struct vcpu_set_singleshot_timer) == 16, "vcpu_set_singleshot_timer");

/* grant_table.h: versions, v2 status frames; memory.h: the grant map space. */
#define GNTTABOP_set_version       8
#define GNTTABOP_get_status_frames 9
#define GNTTABOP_get_version       10
#define XENMAPSPACE_grant_table      1
#define XENMAPIDX_grant_table_status (1ull << 31)
#define GTF_permit_access 1
struct gnttab_set_version {
    uint32_t version; /* IN/OUT */
};
struct gnttab_get_version {
    uint16_t dom;
    uint16_t pad;
    uint32_t version; /* OUT */
};
struct gnttab_get_status_frames {
    uint32_t nr_frames;   /* IN */
    uint16_t dom;         /* IN */
    int16_t status;       /* OUT */
    uint64_t *frame_list; /* guest handle, OUT */
};
struct grant_entry_v1 {
    uint16_t flags;
    uint16_t domid;
    uint32_t frame;
};
struct grant_entry_v2_full { /* union grant_entry_v2, the full_page form */
    uint16_t flags;
    uint16_t domid;
    uint32_t pad0;
    uint64_t frame;
};
_Static_assert(sizeof(struct gnttab_get_status_frames) == 16, "gnttab_get_status_frames");
_Static_assert(sizeof(struct grant_entry_v1) == 8, "grant_entry_v1");
_Static_assert(sizeof(struct grant_entry_v2_full) == 16, "grant_entry_v2");

/* io/xs_wire.h: transactions. */
#define XS_TRANSACTION_START 6
#define XS_TRANSACTION_END   7

#endif /* !__ASSEMBLER__ */
#endif /* XENKVM_GUEST_XEN_H */
