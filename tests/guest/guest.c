/*
 * xenkvm's test guest: a tiny long-mode kernel that finds Xen through CPUID, sets up
 * the hypercall page and checks, from inside a guest, what xenkvm promises: the Xen
 * CPUID leaves, xen_version, shared_info and pvclock time, HVM params, the PV console
 * ring, xenstore, event channels, grant tables, vcpu_op, the int3/int n fix-ups and
 * SCHEDOP_poll and the runstate area. `xenkvm demo` boots it and shows its output.
 *
 * Modes (chosen by the start_info command line):
 *  - demo (default): run the checks in `checks[]`, print one line each, then
 *    "Test result: SUCCESS|FAILURE" and shut down (poweroff, or crash on failure).
 *  - bench: serve timing requests from the host over I/O ports (see bench()).
 *
 * Add a check: write `static int check_foo(void)` returning PASS(...) or FAIL(...)
 * and add it to checks[]. Add a mode: test the command line in main().
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include "xen.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;

#define PAGE_SIZE 4096
#define PREFIX    "xenkvm-guest: "

/* ---------------------------------------------------------------- CPU helpers */

static inline void cpuid(u32 leaf, u32 sub, u32 r[4])
{
    asm volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static inline void wrmsr(u32 msr, u64 val)
{
    asm volatile("wrmsr" ::"c"(msr), "a"((u32)val), "d"((u32)(val >> 32)) : "memory");
}

/* rdtsc fenced on both sides, so it measures exactly the code between two reads. */
static inline u64 rdtsc_ordered(void)
{
    u32 lo, hi;
    asm volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi)::"memory");
    return ((u64)hi << 32) | lo;
}

static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { asm volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u32 inl(u16 port)
{
    u32 v;
    asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void mb(void) { asm volatile("mfence" ::: "memory"); }
static inline void cpu_relax(void) { asm volatile("pause" ::: "memory"); }

/* A triple fault: the last resort when Xen cannot shut us down. */
static void __attribute__((noreturn)) triple_fault(void)
{
    static const struct __attribute__((packed)) { u16 limit; u64 base; } no_idt = { 0, 0 };
    asm volatile("lidt %0; ud2" ::"m"(no_idt));
    __builtin_unreachable();
}

/* ------------------------------------------------- freestanding C library bits */

void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p - *q;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

static int streq(const char *a, const char *b) { return strlen(a) == strlen(b) && !memcmp(a, b, strlen(a)); }

static const char *strstr_(const char *hay, const char *needle)
{
    size_t n = strlen(needle);
    for (; *hay; hay++)
        if (!memcmp(hay, needle, n))
            return hay;
    return NULL;
}

/* ------------------------------------------------------------- hypercalls */

/* Filled by the hypervisor with one 32-byte stub per hypercall once its address is
 * written to the MSR named by CPUID leaf base+2. */
static u8 hypercall_page[PAGE_SIZE] __attribute__((aligned(PAGE_SIZE)));
static int have_hypercalls;

/* The 64-bit hypercall convention: RAX = number (the stub loads it), arguments in
 * RDI, RSI, RDX, R10, R8; result (or -errno) in RAX. Argument registers may be clobbered. */
static long hypercall5(unsigned nr, u64 a1, u64 a2, u64 a3, u64 a4, u64 a5)
{
    register u64 rdi asm("rdi") = a1;
    register u64 rsi asm("rsi") = a2;
    register u64 rdx asm("rdx") = a3;
    register u64 r10 asm("r10") = a4;
    register u64 r8 asm("r8") = a5;
    long rax;
    asm volatile("call *%[stub]"
                 : "=a"(rax), "+r"(rdi), "+r"(rsi), "+r"(rdx), "+r"(r10), "+r"(r8)
                 : [stub] "r"(hypercall_page + nr * 32)
                 : "memory", "cc", "rcx", "r9", "r11");
    return rax;
}
#define hypercall1(nr, a) hypercall5(nr, (u64)(a), 0, 0, 0, 0)
#define hypercall2(nr, a, b) hypercall5(nr, (u64)(a), (u64)(b), 0, 0, 0)
#define hypercall3(nr, a, b, c) hypercall5(nr, (u64)(a), (u64)(b), (u64)(c), 0, 0)
#define hypercall4(nr, a, b, c, d) hypercall5(nr, (u64)(a), (u64)(b), (u64)(c), (u64)(d), 0)

#define HYPERVISOR_console_io(cmd, len, buf) hypercall3(__HYPERVISOR_console_io, cmd, len, buf)
#define HYPERVISOR_xen_version(cmd, arg) hypercall2(__HYPERVISOR_xen_version, cmd, arg)
#define HYPERVISOR_memory_op(cmd, arg) hypercall2(__HYPERVISOR_memory_op, cmd, arg)
#define HYPERVISOR_hvm_op(op, arg) hypercall2(__HYPERVISOR_hvm_op, op, arg)
#define HYPERVISOR_event_channel_op(cmd, arg) hypercall2(__HYPERVISOR_event_channel_op, cmd, arg)
#define HYPERVISOR_grant_table_op(cmd, arg, count) hypercall3(__HYPERVISOR_grant_table_op, cmd, arg, count)
#define HYPERVISOR_vcpu_op(cmd, vcpu, arg) hypercall3(__HYPERVISOR_vcpu_op, cmd, vcpu, arg)
#define HYPERVISOR_sched_op(cmd, arg) hypercall2(__HYPERVISOR_sched_op, cmd, arg)
#define HYPERVISOR_vm_assist(cmd, type) hypercall2(__HYPERVISOR_vm_assist, cmd, type)

/* What the guest learnt about its hypervisor. */
static struct {
    u32 base;                   /* CPUID leaf with "XenVMMXenVMM", 0 if none */
    u32 tsc_khz;                /* from CPUID base+3, for timeouts and the time check */
    struct shared_info *shinfo; /* mapped by check_shared_info */
} xen;

static u8 shared_info_page[PAGE_SIZE] __attribute__((aligned(PAGE_SIZE)));

/* ------------------------------------------------------------------ output */

struct buf {
    char *p;
    size_t len, cap; /* cap includes the terminating NUL */
};

static void buf_putc(struct buf *b, char c)
{
    if (b->len + 1 < b->cap)
        b->p[b->len++] = c;
    b->p[b->len] = 0;
}

static void buf_num(struct buf *b, u64 v, unsigned base, int neg, int width, char pad)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    if (neg)
        tmp[n++] = '-';
    while (width-- > n)
        buf_putc(b, pad);
    while (n)
        buf_putc(b, tmp[--n]);
}

/* A small printf: %d %u %x %s %c %%, with an optional '0' flag, width and 'l'. */
static void vfmt(struct buf *b, const char *f, va_list ap)
{
    for (; *f; f++) {
        if (*f != '%') {
            buf_putc(b, *f);
            continue;
        }
        char pad = ' ';
        int width = 0, lng = 0;
        if (*++f == '0')
            pad = '0', f++;
        while (*f >= '0' && *f <= '9')
            width = width * 10 + (*f++ - '0');
        if (*f == 'l')
            lng = 1, f++;
        switch (*f) {
        case 'd': {
            s64 v = lng ? va_arg(ap, long) : va_arg(ap, int);
            buf_num(b, v < 0 ? -(u64)v : (u64)v, 10, v < 0, width, pad);
            break;
        }
        case 'u':
            buf_num(b, lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 10, 0, width, pad);
            break;
        case 'x':
            buf_num(b, lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 16, 0, width, pad);
            break;
        case 's':
            for (const char *s = va_arg(ap, const char *); *s; s++)
                buf_putc(b, *s);
            break;
        case 'c':
            buf_putc(b, (char)va_arg(ap, int));
            break;
        case '%':
            buf_putc(b, '%');
            break;
        default: /* unknown conversion (or end of string): show it, stop */
            buf_putc(b, '?');
            return;
        }
    }
}

static void __attribute__((format(printf, 3, 4))) snfmt(char *dst, size_t cap, const char *f, ...)
{
    struct buf b = { dst, 0, cap };
    va_list ap;
    dst[0] = 0;
    va_start(ap, f);
    vfmt(&b, f, ap);
    va_end(ap);
}

/* console_io when we have hypercalls; the 0xE9 debug port only when that fails. */
static void console_write(const char *s, size_t len)
{
    if (have_hypercalls && HYPERVISOR_console_io(CONSOLEIO_write, len, s) >= 0)
        return;
    while (len--)
        outb(0xe9, (u8)*s++);
}

/* Print one line; `prefix` selects the "xenkvm-guest: " prefix. */
static void vline(int prefix, const char *f, va_list ap)
{
    char line[512];
    struct buf b = { line, 0, sizeof(line) - 1 }; /* room for '\n' */
    line[0] = 0;
    if (prefix)
        for (const char *p = PREFIX; *p; p++)
            buf_putc(&b, *p);
    vfmt(&b, f, ap);
    line[b.len++] = '\n';
    console_write(line, b.len);
}

static void __attribute__((format(printf, 1, 2))) say(const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    vline(1, f, ap);
    va_end(ap);
}

static void __attribute__((format(printf, 1, 2))) say_raw(const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    vline(0, f, ap);
    va_end(ap);
}

static void __attribute__((noreturn)) shutdown(unsigned reason)
{
    struct sched_shutdown s = { .reason = reason };
    if (have_hypercalls)
        HYPERVISOR_sched_op(SCHEDOP_shutdown, &s);
    say("SCHEDOP_shutdown(%u) returned; triple-faulting instead", reason);
    triple_fault();
}

/* ------------------------------------------------------------ exceptions */

/* What head.S's exc_common pushed, lowest address first. */
struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error_code, rip, cs, rflags, rsp, ss;
};

struct idt_gate {
    u16 offset_lo, selector;
    u8 ist, type_attr; /* present | DPL << 5 | 0xe (64-bit interrupt gate) */
    u16 offset_mid;
    u32 offset_hi, zero;
};
_Static_assert(sizeof(struct idt_gate) == 16, "idt_gate");

extern const u64 exc_stubs[33]; /* head.S: vectors 0..31, then 0x80 */
static struct idt_gate idt[256] __attribute__((aligned(16)));

/* Traps a check expects (int3, int $0x80): counted, and the return RIP recorded. */
static volatile u32 trap_count[256];
static volatile u64 trap_rip[256];
static volatile int traps_expected;

static void set_gate(unsigned vec, u64 handler, unsigned dpl)
{
    idt[vec] = (struct idt_gate){
        .offset_lo = (u16)handler,
        .selector = 0x08, /* head.S: 64-bit code segment */
        .type_attr = (u8)(0x80 | dpl << 5 | 0xe),
        .offset_mid = (u16)(handler >> 16),
        .offset_hi = (u32)(handler >> 32),
    };
}

static void idt_init(void)
{
    for (unsigned v = 0; v < 32; v++)
        set_gate(v, exc_stubs[v], 0);
    set_gate(0x80, exc_stubs[32], 0); /* DPL 0: reachable from kernel mode only */
    struct __attribute__((packed)) { u16 limit; u64 base; } idtr = { sizeof(idt) - 1, (u64)idt };
    asm volatile("lidt %0" ::"m"(idtr));
}

void exception_handler(struct frame *f);
void exception_handler(struct frame *f)
{
    if (traps_expected && (f->vector == 3 || f->vector == 0x80)) {
        trap_count[f->vector]++;
        trap_rip[f->vector] = f->rip;
        return;
    }
    u64 cr2;
    asm volatile("mov %%cr2, %0" : "=r"(cr2));
    say("exception %lu at rip 0x%lx, error code 0x%lx, cr2 0x%lx, rsp 0x%lx", f->vector, f->rip,
        f->error_code, cr2, f->rsp);
    shutdown(SHUTDOWN_crash);
}

/* --------------------------------------------------------- Xen discovery */

/* The first hypervisor CPUID leaf whose EBX:ECX:EDX spell `sig` (12 bytes), or 0. */
static u32 find_leaves(const char *sig)
{
    for (u32 base = XEN_CPUID_FIRST_LEAF; base < XEN_CPUID_LAST_LEAF; base += XEN_CPUID_LEAF_STEP) {
        u32 r[4];
        cpuid(base, 0, r);
        if (!memcmp(&r[1], sig, 4) && !memcmp(&r[2], sig + 4, 4) && !memcmp(&r[3], sig + 8, 4))
            return base;
    }
    return 0;
}

/* Find Xen and install the hypercall page. */
static void xen_init(void)
{
    u32 r[4];
    xen.base = find_leaves("XenVMMXenVMM");
    if (!xen.base)
        return;
    cpuid(xen.base + 2, 0, r); /* EAX: hypercall pages, EBX: the MSR to write */
    if (r[0] < 1)
        return;
    wrmsr(r[1], (u64)hypercall_page); /* identity-mapped: GVA == GPA */
    have_hypercalls = 1;
    cpuid(xen.base + 3, 0, r); /* time leaf, subleaf 0: ECX = guest TSC kHz */
    xen.tsc_khz = r[2];
}

/* ------------------------------------------------------- time and events */

/* Xen's pvclock scaling: ((delta << shift) * mul) >> 32. */
static u64 pvclock_scale(u64 delta, u32 mul, int8_t shift)
{
    delta = shift < 0 ? delta >> -shift : delta << shift;
    return (u64)(((unsigned __int128)delta * mul) >> 32);
}

/* Xen system time in ns, read from vcpu_info[0].time with the version protocol.
 * Returns 0 if shared_info is not mapped or the record never held still. */
static int xen_time(u64 *ns)
{
    if (!xen.shinfo)
        return 0;
    volatile struct vcpu_time_info *t = &xen.shinfo->vcpu_info[0].time;
    for (int tries = 0; tries < 1000; tries++) {
        u32 version = t->version;
        mb();
        u64 tsc_timestamp = t->tsc_timestamp, system_time = t->system_time;
        u32 mul = t->tsc_to_system_mul;
        int8_t shift = t->tsc_shift;
        u64 tsc = rdtsc_ordered();
        mb();
        if ((version & 1) || t->version != version)
            continue;
        *ns = system_time + pvclock_scale(tsc - tsc_timestamp, mul, shift);
        return 1;
    }
    return 0;
}

/* A TSC deadline `ms` milliseconds away (3 GHz assumed if Xen told us no frequency). */
static u64 deadline_ms(u32 ms) { return rdtsc_ordered() + (u64)(xen.tsc_khz ? xen.tsc_khz : 3000000) * ms; }

static long evtchn_send(u32 port)
{
    struct evtchn_port_op op = { .port = port };
    return HYPERVISOR_event_channel_op(EVTCHNOP_send, &op);
}

/* Clear `port`'s pending bit (and the vCPU's upcall flags: this guest takes no upcalls).
 * Returns whether the port was pending. */
static int evtchn_clear(u32 port)
{
    if (!xen.shinfo)
        return 0;
    u64 bit = 1ull << (port % 64);
    u64 old = __atomic_fetch_and(&xen.shinfo->evtchn_pending[port / 64 % 64], ~bit, __ATOMIC_SEQ_CST);
    xen.shinfo->vcpu_info[0].evtchn_upcall_pending = 0;
    __atomic_store_n(&xen.shinfo->vcpu_info[0].evtchn_pending_sel, 0, __ATOMIC_SEQ_CST);
    return (old & bit) != 0;
}

/* Wait a little for an event on `port`: return at once if it was already pending,
 * else SCHEDOP_poll it for up to 1 ms (or just pause without shared_info). Callers
 * re-check their condition after each call and bound the loop with a deadline. */
static void wait_event(u32 port)
{
    u64 now;
    if (evtchn_clear(port) || !xen_time(&now)) {
        cpu_relax();
        return;
    }
    struct sched_poll poll = { .ports = &port, .nr_ports = 1, .timeout = now + 1000000 };
    HYPERVISOR_sched_op(SCHEDOP_poll, &poll);
}

static long get_param(u32 index, u64 *value)
{
    struct xen_hvm_param p = { .domid = DOMID_SELF, .index = index };
    long rc = HYPERVISOR_hvm_op(HVMOP_get_param, &p);
    *value = p.value;
    return rc;
}

/* The identity-mapped address of a guest frame, or NULL above 4 GiB (not mapped). */
static void *pfn_ptr(u64 pfn) { return pfn && pfn < (1ull << 20) ? (void *)(pfn << 12) : NULL; }

/* ------------------------------------------------------------------ checks */

static char detail[400];

static int __attribute__((format(printf, 2, 3))) result(int ok, const char *f, ...)
{
    struct buf b = { detail, 0, sizeof(detail) };
    va_list ap;
    va_start(ap, f);
    vfmt(&b, f, ap);
    va_end(ap);
    return ok;
}
#define PASS(...) result(1, __VA_ARGS__)
#define FAIL(...) result(0, __VA_ARGS__)

static int check_cpuid(void)
{
    u32 r[4], max, version, pages, msr, kvm = find_leaves("KVMKVMKVM\0\0\0");
    if (xen.base != XEN_CPUID_FIRST_LEAF)
        return FAIL("XenVMMXenVMM at leaf 0x%x, expected 0x40000000", xen.base);
    cpuid(xen.base, 0, r);
    max = r[0];
    cpuid(xen.base + 1, 0, r);
    version = r[0];
    cpuid(xen.base + 2, 0, r);
    pages = r[0], msr = r[1];
    if (max < xen.base + 2)
        return FAIL("max leaf 0x%x < 0x%x", max, xen.base + 2);
    if (version != 0x00040011)
        return FAIL("version 0x%x, expected 0x00040011 (4.17)", version);
    if (pages < 1 || msr != 0x40000000)
        return FAIL("%u hypercall pages, MSR 0x%x; expected >= 1 and 0x40000000", pages, msr);
    if (kvm)
        return FAIL("KVMKVMKVM signature at leaf 0x%x", kvm);
    return PASS("XenVMMXenVMM at 0x%x, max leaf 0x%x, version %u.%u, %u hypercall page(s), "
                "MSR 0x%x, no KVM leaves",
                xen.base, max, version >> 16, version & 0xffff, pages, msr);
}

static int check_xen_version(void)
{
    const u32 need = 1u << XENFEAT_auto_translated_physmap | 1u << XENFEAT_hvm_callback_vector |
                     1u << XENFEAT_hvm_safe_pvclock;
    struct xen_feature_info fi = { .submap_idx = 0 };
    long version = HYPERVISOR_xen_version(XENVER_version, NULL);
    long rc = HYPERVISOR_xen_version(XENVER_get_features, &fi);
    if (version != 0x40011)
        return FAIL("XENVER_version returned %ld (0x%lx), expected 0x40011", version, version);
    if (rc != 0 || (fi.submap & need) != need)
        return FAIL("XENVER_get_features rc %ld, submap 0 = 0x%x, needs bits 0x%x", rc, fi.submap, need);
    return PASS("XENVER_version 0x%lx (%lu.%lu), features submap 0 = 0x%x", version, version >> 16,
                version & 0xffff, fi.submap);
}

static int check_shared_info(void)
{
    struct xen_add_to_physmap xatp = {
        .domid = DOMID_SELF,
        .space = XENMAPSPACE_shared_info,
        .idx = 0,
        .gpfn = (u64)shared_info_page >> 12,
    };
    long rc = HYPERVISOR_memory_op(XENMEM_add_to_physmap, &xatp);
    if (rc)
        return FAIL("XENMEM_add_to_physmap(shared_info, gpfn 0x%lx) returned %ld", xatp.gpfn, rc);
    xen.shinfo = (struct shared_info *)shared_info_page;

    volatile struct vcpu_time_info *t = &xen.shinfo->vcpu_info[0].time;
    u64 ns0, ns1, tsc0, tsc1;
    tsc0 = rdtsc_ordered();
    if (!xen_time(&ns0))
        return FAIL("vcpu_info[0].time.version never even and stable (0x%x)", t->version);
    u32 version = t->version, mul = t->tsc_to_system_mul;
    int shift = t->tsc_shift;
    if (mul == 0)
        return FAIL("vcpu_info[0].time.tsc_to_system_mul is 0");
    if (!xen.tsc_khz)
        return FAIL("CPUID 0x%x subleaf 0 ECX (TSC kHz) is 0", xen.base + 3);
    while (rdtsc_ordered() - tsc0 < (u64)xen.tsc_khz * 10) /* ~10 ms by the TSC */
        cpu_relax();
    tsc1 = rdtsc_ordered();
    if (!xen_time(&ns1))
        return FAIL("vcpu_info[0].time.version never even and stable (0x%x)", t->version);
    u64 pv_ns = ns1 - ns0, tsc_ns = (tsc1 - tsc0) * 1000000 / xen.tsc_khz;
    u64 diff = pv_ns > tsc_ns ? pv_ns - tsc_ns : tsc_ns - pv_ns;
    if (ns1 <= ns0 || diff * 20 > tsc_ns)
        return FAIL("system time %lu -> %lu ns: advanced %ld ns, TSC (%u kHz) says %lu ns", ns0, ns1,
                    (long)(ns1 - ns0), xen.tsc_khz, tsc_ns);

    volatile struct shared_info *s = xen.shinfo;
    u64 wc_sec = 0;
    for (int tries = 0; tries < 1000; tries++) {
        u32 v = s->wc_version;
        mb();
        wc_sec = s->wc_sec | (u64)s->wc_sec_hi << 32;
        mb();
        if (!(v & 1) && v == s->wc_version)
            break;
    }
    if (wc_sec <= 1600000000)
        return FAIL("wallclock wc_sec %lu is not plausible", wc_sec);
    return PASS("gpfn 0x%lx, time version %u, mul %u shift %d, 10 ms: system time +%lu ns, "
                "TSC %u kHz says %lu ns, wallclock %lu s",
                xatp.gpfn, version, mul, shift, pv_ns, xen.tsc_khz, tsc_ns, wc_sec);
}

static int check_hvm_params(void)
{
    static const struct { u32 index; const char *name; } params[] = {
        { HVM_PARAM_STORE_PFN, "STORE_PFN" },
        { HVM_PARAM_STORE_EVTCHN, "STORE_EVTCHN" },
        { HVM_PARAM_CONSOLE_PFN, "CONSOLE_PFN" },
        { HVM_PARAM_CONSOLE_EVTCHN, "CONSOLE_EVTCHN" },
    };
    u64 v[4];
    for (int i = 0; i < 4; i++) {
        long rc = get_param(params[i].index, &v[i]);
        if (rc || !v[i])
            return FAIL("HVMOP_get_param(%s) rc %ld value 0x%lx", params[i].name, rc, v[i]);
    }
    return PASS("store pfn 0x%lx port %lu, console pfn 0x%lx port %lu", v[0], v[1], v[2], v[3]);
}

static int check_console_ring(void)
{
    static const char msg[] = PREFIX "hello from the PV console ring\n";
    const u32 len = sizeof(msg) - 1;
    u64 pfn, port;
    if (get_param(HVM_PARAM_CONSOLE_PFN, &pfn) || get_param(HVM_PARAM_CONSOLE_EVTCHN, &port))
        return FAIL("no console params");
    volatile struct xencons_interface *ring = pfn_ptr(pfn);
    if (!ring)
        return FAIL("console pfn 0x%lx is not below 4 GiB", pfn);

    u32 cons = ring->out_cons, prod = ring->out_prod;
    if (prod - cons > sizeof(ring->out) - len)
        return FAIL("ring full: out_cons %u out_prod %u", cons, prod);
    for (u32 i = 0; i < len; i++)
        ring->out[(prod + i) % sizeof(ring->out)] = msg[i];
    mb(); /* the bytes before the index */
    ring->out_prod = prod + len;
    long rc = evtchn_send((u32)port);
    if (rc)
        return FAIL("EVTCHNOP_send(console port %lu) returned %ld", port, rc);
    for (u64 end = deadline_ms(1000); ring->out_cons != prod + len && rdtsc_ordered() < end;)
        wait_event((u32)port);
    if (ring->out_cons != prod + len)
        return FAIL("backend consumed up to %u of %u after 1 s", ring->out_cons, prod + len);
    return PASS("%u bytes at pfn 0x%lx, port %lu, consumed (out_cons %u)", len, pfn, port, ring->out_cons);
}

/* --- a minimal xenstore client over the ring page */

static struct {
    volatile struct xenstore_domain_interface *ring;
    u32 port, req_id;
    int watch_events;        /* WATCH_EVENTs received so far */
    char event[64];          /* the last one: "path\0token\0" */
} xs;

/* Copy `len` reply bytes out of the rsp ring (NULL dst: discard); waits up to 1 s. */
static int xs_read(void *dst, u32 len)
{
    u64 end = deadline_ms(1000);
    while (len) {
        u32 cons = xs.ring->rsp_cons, avail = xs.ring->rsp_prod - cons;
        mb(); /* the index before the bytes */
        if (avail == 0 || avail > XENSTORE_RING_SIZE) {
            if (rdtsc_ordered() > end)
                return 0;
            wait_event(xs.port);
            continue;
        }
        u32 n = avail < len ? avail : len;
        for (u32 i = 0; i < n; i++) {
            char c = xs.ring->rsp[(cons + i) % XENSTORE_RING_SIZE];
            if (dst)
                ((char *)dst)[i] = c;
        }
        mb(); /* the bytes before the index */
        xs.ring->rsp_cons = cons + n;
        dst = dst ? (char *)dst + n : NULL;
        len -= n;
    }
    return 1;
}

/* Receive one message: the header into *r, the payload into buf (NUL-terminated,
 * truncated to cap - 1). A WATCH_EVENT goes to xs.event instead. Returns 0 on timeout. */
static int xs_recv(struct xsd_sockmsg *r, char *buf, u32 cap)
{
    if (!xs_read(r, sizeof(*r)))
        return 0;
    if (r->type == XS_WATCH_EVENT) {
        buf = xs.event, cap = sizeof(xs.event);
        memset(buf, 0, cap);
    }
    u32 n = r->len < cap - 1 ? r->len : cap - 1;
    if (!xs_read(buf, n) || !xs_read(NULL, r->len - n))
        return 0;
    buf[n] = 0;
    xs.watch_events += r->type == XS_WATCH_EVENT;
    evtchn_send(xs.port); /* we freed ring space */
    return 1;
}

/* Send one request with payload a (alen bytes) + b (blen bytes); receive its reply into
 * `reply` (NUL-terminated, truncated to cap - 1). Watch events that arrive meanwhile are
 * recorded in xs.event. Returns the reply type (XS_ERROR: reply holds the errno name),
 * or -1 on a ring timeout. */
static long xs_request(u32 type, const char *a, u32 alen, const char *b, u32 blen, char *reply, u32 cap)
{
    struct xsd_sockmsg h = { .type = type, .req_id = ++xs.req_id, .tx_id = 0, .len = alen + blen };
    u32 total = sizeof(h) + alen + blen, prod = xs.ring->req_prod;
    for (u64 end = deadline_ms(1000); XENSTORE_RING_SIZE - (prod - xs.ring->req_cons) < total;) {
        if (rdtsc_ordered() > end)
            return -1;
        wait_event(xs.port);
    }
    const char *parts[3] = { (const char *)&h, a, b };
    u32 lens[3] = { sizeof(h), alen, blen };
    for (int p = 0; p < 3; p++)
        for (u32 i = 0; i < lens[p]; i++)
            xs.ring->req[prod++ % XENSTORE_RING_SIZE] = parts[p][i];
    mb(); /* the bytes before the index */
    xs.ring->req_prod = prod;
    evtchn_send(xs.port);

    for (;;) {
        struct xsd_sockmsg r;
        if (!xs_recv(&r, reply, cap))
            return -1;
        if (r.type != XS_WATCH_EVENT && r.req_id == h.req_id)
            return r.type;
    }
}

/* Request with a single NUL-terminated string argument (path). */
static long xs_path_op(u32 type, const char *path, char *reply, u32 cap)
{
    return xs_request(type, path, strlen(path) + 1, NULL, 0, reply, cap);
}

static int check_xenstore(void)
{
    u64 pfn, port;
    char domid[16], name[64], val[64], home[32], dir[256], ok[8];
    if (get_param(HVM_PARAM_STORE_PFN, &pfn) || get_param(HVM_PARAM_STORE_EVTCHN, &port))
        return FAIL("no store params");
    xs.ring = pfn_ptr(pfn);
    xs.port = (u32)port;
    if (!xs.ring)
        return FAIL("store pfn 0x%lx is not below 4 GiB", pfn);

    long t = xs_path_op(XS_READ, "domid", domid, sizeof(domid));
    if (t != XS_READ)
        return FAIL("READ domid: type %ld \"%s\"", t, t < 0 ? "timeout" : domid);
    u32 id = 0;
    for (const char *p = domid; *p || p == domid; p++) {
        if (*p < '0' || *p > '9')
            return FAIL("READ domid: \"%s\" is not a number", domid);
        id = id * 10 + (u32)(*p - '0');
    }
    t = xs_path_op(XS_READ, "name", name, sizeof(name));
    if (t != XS_READ || !name[0])
        return FAIL("READ name: type %ld \"%s\"", t, t < 0 ? "timeout" : name);
    t = xs_request(XS_WRITE, "data/demo", sizeof("data/demo"), "hello", 5, ok, sizeof(ok));
    if (t != XS_WRITE || !streq(ok, "OK"))
        return FAIL("WRITE data/demo: type %ld \"%s\"", t, t < 0 ? "timeout" : ok);
    t = xs_path_op(XS_READ, "data/demo", val, sizeof(val));
    if (t != XS_READ || !streq(val, "hello"))
        return FAIL("READ data/demo: type %ld \"%s\", expected \"hello\"", t, t < 0 ? "timeout" : val);

    snfmt(home, sizeof(home), "/local/domain/%u", id);
    memset(dir, 0, sizeof(dir));
    t = xs_path_op(XS_DIRECTORY, home, dir, sizeof(dir) - 1);
    int entries = 0, has_name = 0;
    for (u32 i = 0; t == XS_DIRECTORY && i < sizeof(dir) - 1 && dir[i]; i += strlen(dir + i) + 1)
        entries++, has_name |= streq(dir + i, "name");
    if (t != XS_DIRECTORY || !has_name)
        return FAIL("DIRECTORY %s: type %ld, %d entries, \"name\" %s", home, t, entries,
                    has_name ? "present" : "missing");

    int events = xs.watch_events;
    t = xs_request(XS_WATCH, "data/demo", sizeof("data/demo"), "t1", 3, ok, sizeof(ok));
    if (t != XS_WATCH || !streq(ok, "OK"))
        return FAIL("WATCH data/demo t1: type %ld \"%s\"", t, t < 0 ? "timeout" : ok);
    /* The initial event may come before or after the reply. */
    for (int i = 0; i < 4 && xs.watch_events == events; i++) {
        struct xsd_sockmsg r;
        if (!xs_recv(&r, dir, sizeof(dir)))
            break;
    }
    const char *wpath = xs.event, *wtoken = xs.event + strlen(xs.event) + 1;
    if (xs.watch_events == events || !streq(wpath, "data/demo") || !streq(wtoken, "t1"))
        return FAIL("no initial WATCH_EVENT (data/demo, t1): %d events, last (%s, %s)",
                    xs.watch_events - events, wpath, wtoken);
    return PASS("domid %u, name \"%s\", data/demo = \"%s\", %s has %d entries incl. name, "
                "watch event (%s, %s)",
                id, name, val, home, entries, wpath, wtoken);
}

static int check_evtchn(void)
{
    struct evtchn_alloc_unbound a = { .dom = DOMID_SELF, .remote_dom = DOMID_SELF };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_alloc_unbound, &a);
    if (rc || a.port == 0)
        return FAIL("EVTCHNOP_alloc_unbound rc %ld port %u", rc, a.port);
    struct evtchn_status st = { .dom = DOMID_SELF, .port = a.port };
    rc = HYPERVISOR_event_channel_op(EVTCHNOP_status, &st);
    if (rc || st.status != EVTCHNSTAT_unbound)
        return FAIL("EVTCHNOP_status(%u) rc %ld status %u, expected 0 and unbound (1)", a.port, rc, st.status);
    u32 remote = st.u.unbound.dom, vcpu = st.vcpu;
    struct evtchn_port_op c = { .port = a.port };
    rc = HYPERVISOR_event_channel_op(EVTCHNOP_close, &c);
    if (rc)
        return FAIL("EVTCHNOP_close(%u) rc %ld", a.port, rc);
    st = (struct evtchn_status){ .dom = DOMID_SELF, .port = a.port };
    rc = HYPERVISOR_event_channel_op(EVTCHNOP_status, &st);
    if (!(rc == -XEN_EINVAL || (rc == 0 && st.status == EVTCHNSTAT_closed)))
        return FAIL("EVTCHNOP_status after close rc %ld status %u", rc, st.status);
    return PASS("port %u unbound (remote dom 0x%x, vcpu %u), closed, then status rc %ld status %u", a.port,
                remote, vcpu, rc, st.status);
}

static int check_grant_table(void)
{
    struct gnttab_query_size q = { .dom = DOMID_SELF };
    long rc = HYPERVISOR_grant_table_op(GNTTABOP_query_size, &q, 1);
    if (rc || q.status != GNTST_okay || q.max_nr_frames == 0)
        return FAIL("GNTTABOP_query_size rc %ld status %d frames %u max %u", rc, q.status, q.nr_frames,
                    q.max_nr_frames);
    u64 frame = 0;
    struct gnttab_setup_table s = { .dom = DOMID_SELF, .nr_frames = 1, .frame_list = &frame };
    rc = HYPERVISOR_grant_table_op(GNTTABOP_setup_table, &s, 1);
    if (rc || s.status != GNTST_okay)
        return FAIL("GNTTABOP_setup_table(1 frame) rc %ld status %d", rc, s.status);
    return PASS("query_size: %u of max %u frames; setup_table: frame 0x%lx", q.nr_frames, q.max_nr_frames,
                frame);
}

static int check_vcpu_op(void)
{
    long up0 = HYPERVISOR_vcpu_op(VCPUOP_is_up, 0, NULL);
    long up1000 = HYPERVISOR_vcpu_op(VCPUOP_is_up, 1000, NULL);
    if (up0 != 1 || (up1000 != -XEN_ENOENT && up1000 != -XEN_EINVAL))
        return FAIL("VCPUOP_is_up: vcpu 0 %ld (want 1), vcpu 1000 %ld (want -ENOENT or -EINVAL)", up0, up1000);
    return PASS("VCPUOP_is_up: vcpu 0 = %ld, vcpu 1000 = %ld", up0, up1000);
}

/* int3 and int $0x80 stop this host's KVM with an emulation failure; the VMM must
 * inject them so that our handlers run and return right after the instruction. */
static int check_traps(void)
{
    u64 after3, after80;
    trap_count[3] = trap_count[0x80] = 0;
    traps_expected = 1;
    asm volatile("int3\n1: lea 1b(%%rip), %0" : "=r"(after3)::"memory");
    asm volatile("int $0x80\n1: lea 1b(%%rip), %0" : "=r"(after80)::"memory");
    traps_expected = 0;
    if (trap_count[3] != 1 || trap_rip[3] != after3)
        return FAIL("int3: %u traps, return rip 0x%lx, expected 1 and 0x%lx", trap_count[3], trap_rip[3], after3);
    if (trap_count[0x80] != 1 || trap_rip[0x80] != after80)
        return FAIL("int $0x80: %u traps, return rip 0x%lx, expected 1 and 0x%lx", trap_count[0x80],
                    trap_rip[0x80], after80);
    return PASS("int3 trapped once, resumed at 0x%lx; int $0x80 (DPL 0 gate) trapped once, resumed at 0x%lx",
                after3, after80);
}

static int check_poll_timeout(void)
{
    u64 t0, t1;
    if (!xen_time(&t0))
        return FAIL("needs shared_info time (check shared_info)");
    struct evtchn_alloc_unbound a = { .dom = DOMID_SELF, .remote_dom = DOMID_SELF };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_alloc_unbound, &a);
    if (rc)
        return FAIL("EVTCHNOP_alloc_unbound rc %ld", rc);
    evtchn_clear(a.port);
    xen_time(&t0);
    struct sched_poll poll = { .ports = &a.port, .nr_ports = 1, .timeout = t0 + 1000000 };
    rc = HYPERVISOR_sched_op(SCHEDOP_poll, &poll);
    xen_time(&t1);
    struct evtchn_port_op c = { .port = a.port };
    HYPERVISOR_event_channel_op(EVTCHNOP_close, &c);
    if (rc || t1 - t0 < 900000)
        return FAIL("SCHEDOP_poll(port %u, 1 ms) rc %ld after %lu ns", a.port, rc, t1 - t0);
    return PASS("SCHEDOP_poll(port %u, timeout +1 ms) returned 0 after %lu us", a.port, (t1 - t0) / 1000);
}

/* --- the runstate area */

/* Two pages: the area straddles their boundary (24 bytes in each) with RS_CANARY bytes
 * of 0xA5 either side; later it moves to the start of the first page. */
static u8 runstate_pages[2 * PAGE_SIZE] __attribute__((aligned(PAGE_SIZE)));
#define RS_OFF    (PAGE_SIZE - 24)
#define RS_CANARY 16

/* Copy an area as Linux's xen_get_runstate_snapshot() does: retry while
 * XEN_RUNSTATE_UPDATE is set or state_entry_time changed under the copy. */
static int runstate_read(const volatile struct vcpu_runstate_info *a, struct vcpu_runstate_info *r)
{
    for (int tries = 0; tries < 1000000; tries++) {
        u64 e1 = a->state_entry_time;
        if (e1 & XEN_RUNSTATE_UPDATE) {
            cpu_relax();
            continue;
        }
        mb();
        r->state = a->state;
        for (int i = 0; i < 4; i++)
            r->time[i] = a->time[i];
        mb();
        r->state_entry_time = a->state_entry_time;
        if (r->state_entry_time == e1)
            return 1;
    }
    return 0;
}

/* state_entry_time - sum(time[]): constant for the whole life of the vCPU. */
static u64 rs_offset(const struct vcpu_runstate_info *r)
{
    return r->state_entry_time - r->time[0] - r->time[1] - r->time[2] - r->time[3];
}

static long register_runstate(void *area)
{
    struct vcpu_register_runstate_memory_area arg = { .addr = (u64)area };
    return HYPERVISOR_vcpu_op(VCPUOP_register_runstate_memory_area, 0, &arg);
}

/* SCHEDOP_poll `port` (never signalled) until `ns` from now. */
static long poll_ns(u32 port, u64 ns)
{
    u64 now = 0;
    xen_time(&now);
    evtchn_clear(port);
    struct sched_poll poll = { .ports = &port, .nr_ports = 1, .timeout = now + ns };
    return HYPERVISOR_sched_op(SCHEDOP_poll, &poll);
}

static int runstate_checks(u32 port)
{
    u8 *canary = runstate_pages + RS_OFF - RS_CANARY, saved[48 + 2 * RS_CANARY];
    const volatile struct vcpu_runstate_info *area = (void *)(runstate_pages + RS_OFF);
    const volatile struct vcpu_runstate_info *moved = (void *)runstate_pages;
    struct vcpu_runstate_info a, b, g, c, d;
    u64 now, t1;
    memset(canary, 0xa5, sizeof(saved));
    memset(runstate_pages + RS_OFF, 0xff, 48); /* so that state 0 and the times mean "written" */
    long rc = register_runstate((void *)area);
    if (rc)
        return FAIL("register_runstate_memory_area(0x%lx) rc %ld", (u64)area, rc);
    if (!runstate_read(area, &a) || a.state != RUNSTATE_running || !a.state_entry_time)
        return FAIL("area at 0x%lx not filled at registration: state %d, entry 0x%lx", (u64)area, a.state,
                    a.state_entry_time);

    rc = poll_ns(port, 5000000);
    int ok = runstate_read(area, &b);
    xen_time(&now);
    u64 blocked = b.time[2] - a.time[2], inv = rs_offset(&a);
    if (rc || !ok)
        return FAIL("SCHEDOP_poll(5 ms) rc %ld; area settled: %d", rc, ok);
    if (b.state != RUNSTATE_running || blocked < 4500000 || blocked > 50000000)
        return FAIL("after a 5 ms poll: state %d (want 0), blocked +%lu ns (want 4.5..50 ms)", b.state,
                    blocked);
    if (rs_offset(&b) != inv)
        return FAIL("invariant entry - sum(time): %lu ns before, %lu ns after the poll", inv, rs_offset(&b));
    for (int i = 0; i < 4; i++)
        if (b.time[i] < a.time[i])
            return FAIL("time[%d] went back: %lu -> %lu", i, a.time[i], b.time[i]);
    if (b.state_entry_time > now || now - b.state_entry_time > 50000000)
        return FAIL("state_entry_time %lu, pvclock now %lu", b.state_entry_time, now);
    for (int i = 0; i < RS_CANARY; i++)
        if (canary[i] != 0xa5 || canary[RS_CANARY + 48 + i] != 0xa5)
            return FAIL("canary byte %d before / after the area: 0x%x / 0x%x", i, canary[i],
                        canary[RS_CANARY + 48 + i]);

    /* Xen's get_runstate_info runs the current state's time up to the call: sum(time)
     * + invariant lies between state_entry_time and now. */
    rc = HYPERVISOR_vcpu_op(VCPUOP_get_runstate_info, 0, &g);
    xen_time(&t1);
    u64 run = g.time[0] + g.time[1] + g.time[2] + g.time[3] + inv - g.state_entry_time;
    if (rc || g.state != RUNSTATE_running || g.state_entry_time < b.state_entry_time ||
        g.state_entry_time > t1 || run > t1 - g.state_entry_time)
        return FAIL("get_runstate_info rc %ld: state %d, entry %lu (area %lu, now %lu), "
                    "sum + invariant - entry %ld ns",
                    rc, g.state, g.state_entry_time, b.state_entry_time, t1, (long)run);
    for (int i = 0; i < 4; i++)
        if (g.time[i] < b.time[i])
            return FAIL("get_runstate_info time[%d] %lu < the area's %lu", i, g.time[i], b.time[i]);

    memcpy(saved, canary, sizeof(saved));
    memset(runstate_pages, 0xff, 48);
    rc = register_runstate((void *)moved);
    if (rc || !runstate_read(moved, &c) || c.state != RUNSTATE_running || rs_offset(&c) != inv)
        return FAIL("moved to 0x%lx: rc %ld, state %d, invariant %lu (want %lu)", (u64)moved, rc, c.state,
                    rs_offset(&c), inv);
    rc = poll_ns(port, 1000000);
    if (rc || !runstate_read(moved, &d) || d.time[2] - c.time[2] < 900000)
        return FAIL("moved area: poll(1 ms) rc %ld, blocked +%lu ns", rc, d.time[2] - c.time[2]);
    if (memcmp(saved, canary, sizeof(saved)))
        return FAIL("old area at 0x%lx written after the move", (u64)area);
    if ((rc = register_runstate(NULL)))
        return FAIL("unregister (addr 0) rc %ld", rc);
    return PASS("area at 0x%lx straddles 0x%lx, blocked +%lu ns, invariant %lu ns, get_runstate_info agrees "
                "(+%lu ns running), moved area: blocked +%lu ns, old untouched",
                (u64)area, (u64)runstate_pages + PAGE_SIZE, blocked, inv, run, d.time[2] - c.time[2]);
}

static int check_runstate(void)
{
    u64 now;
    if (!xen_time(&now))
        return FAIL("needs shared_info time (check shared_info)");
    long rc = HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_runstate_update_flag);
    if (rc)
        return FAIL("vm_assist(enable, runstate_update_flag) rc %ld", rc);
    struct evtchn_alloc_unbound ch = { .dom = DOMID_SELF, .remote_dom = DOMID_SELF };
    rc = HYPERVISOR_event_channel_op(EVTCHNOP_alloc_unbound, &ch);
    if (rc)
        return FAIL("EVTCHNOP_alloc_unbound rc %ld", rc);
    int ok = runstate_checks(ch.port);
    struct evtchn_port_op c = { .port = ch.port };
    HYPERVISOR_event_channel_op(EVTCHNOP_close, &c);
    return ok;
}

static const struct check {
    const char *name;
    int (*run)(void); /* returns PASS(...) or FAIL(...) */
} checks[] = {
    { "cpuid", check_cpuid },
    { "xen_version", check_xen_version },
    { "shared_info", check_shared_info },
    { "hvm_params", check_hvm_params },
    { "console_ring", check_console_ring },
    { "xenstore", check_xenstore },
    { "evtchn", check_evtchn },
    { "grant_table", check_grant_table },
    { "vcpu_op", check_vcpu_op },
    { "traps", check_traps },
    { "poll_timeout", check_poll_timeout },
    { "runstate", check_runstate },
};

static void __attribute__((noreturn)) demo(void)
{
    unsigned n = sizeof(checks) / sizeof(checks[0]), failed = 0;
    for (unsigned i = 0; i < n; i++) {
        detail[0] = 0;
        int ok = checks[i].run();
        failed += !ok;
        say("check %s ... %s (%s)", checks[i].name, ok ? "ok" : "FAIL", detail);
    }
    say("%u checks, %u failed", n, failed);
    say_raw("Test result: %s", failed ? "FAILURE" : "SUCCESS");
    shutdown(failed ? SHUTDOWN_crash : SHUTDOWN_poweroff);
}

/* ------------------------------------------------------------------- bench */

/* The host drives the bench through I/O ports; each read/write is one exit. */
#define BENCH_PORT_CMD    0x511 /* inl: next command */
#define BENCH_PORT_COUNT  0x512 /* inl: iterations N (read for commands != STOP) */
#define BENCH_PORT_RESULT 0x513 /* outl: elapsed TSC cycles, low 32 bits then high 32 */
#define BENCH_PORT_NOP    0x514 /* outl: the bare I/O exit being timed */
#define BENCH_STOP        0     /* shut down (poweroff) */
#define BENCH_IO_EXIT     1     /* N x outl(BENCH_PORT_NOP, 0) */
#define BENCH_XEN_VERSION 2     /* N x xen_version(XENVER_version) */
#define BENCH_STUB_EXIT   3     /* N x call stub page +32: exits to BENCH_PORT_STUB, no Xen */
#define BENCH_STUB_XENVER 4     /* N x call stub page +0: a copy of the xen_version stub */
#define BENCH_PORT_STUB   0xe2  /* the VMM completes the stub's ret, nothing else */

/* A page laid out like the hypercall page but placed next to the stack (head.S):
 *   +0:  mov $17, %eax; out %eax, $0xe1; ret   -- xen_version, the full xenkvm path
 *   +32: mov $0, %eax;  out %eax, $0xe2; ret   -- the same exit without any Xen work
 * On a shadow-paging host each page block the guest touches after an exit costs a
 * refill; the hypercall page lives in its own block, this page shares the stack's. The
 * bench times all of them so the VMM's share and the host's share can be told apart. */
extern u8 bench_stub_page[PAGE_SIZE];

static void __attribute__((noreturn)) bench(void)
{
    say("bench mode: command on port 0x%x, count on 0x%x, TSC cycles out on 0x%x", BENCH_PORT_CMD,
        BENCH_PORT_COUNT, BENCH_PORT_RESULT);
    static const u8 stub[] = {0xb8, 17, 0, 0, 0, 0xe7, 0xe1, 0xc3};
    static const u8 nop_stub[] = {0xb8, 0, 0, 0, 0, 0xe7, BENCH_PORT_STUB, 0xc3};
    for (unsigned i = 0; i < sizeof(stub); i++) {
        bench_stub_page[i] = stub[i];
        bench_stub_page[32 + i] = nop_stub[i];
    }
    for (;;) {
        u32 cmd = inl(BENCH_PORT_CMD);
        if (cmd == BENCH_STOP)
            shutdown(SHUTDOWN_poweroff);
        if (cmd != BENCH_IO_EXIT && cmd != BENCH_XEN_VERSION && cmd != BENCH_STUB_EXIT &&
            cmd != BENCH_STUB_XENVER) {
            say("bench: unknown command %u", cmd);
            shutdown(SHUTDOWN_crash);
        }
        u32 n = inl(BENCH_PORT_COUNT);
        u64 t0 = rdtsc_ordered();
        if (cmd == BENCH_IO_EXIT)
            for (u32 i = 0; i < n; i++)
                outl(BENCH_PORT_NOP, 0);
        else if (cmd == BENCH_STUB_EXIT || cmd == BENCH_STUB_XENVER)
            for (u32 i = 0; i < n; i++) {
                register u64 rax asm("rax");
                register u64 rdi asm("rdi") = 0; /* XENVER_version, NULL */
                register u64 rsi asm("rsi") = 0;
                asm volatile("call *%[stub]"
                             : "=a"(rax), "+r"(rdi), "+r"(rsi)
                             : [stub] "r"(bench_stub_page + (cmd == BENCH_STUB_EXIT ? 32 : 0))
                             : "memory", "cc", "rcx", "rdx", "r8", "r9", "r10", "r11");
                (void)rax;
            }
        else
            for (u32 i = 0; i < n; i++)
                HYPERVISOR_xen_version(XENVER_version, NULL);
        u64 cycles = rdtsc_ordered() - t0;
        outl(BENCH_PORT_RESULT, (u32)cycles);
        outl(BENCH_PORT_RESULT, (u32)(cycles >> 32));
    }
}

/* -------------------------------------------------------------------- main */

void __attribute__((noreturn)) main(u32 start_info_paddr);
void __attribute__((noreturn)) main(u32 start_info_paddr)
{
    const struct hvm_start_info *si = (const struct hvm_start_info *)(u64)start_info_paddr;
    const char *cmdline = "";

    idt_init();
    xen_init();
    if (!si || si->magic != XEN_HVM_START_MAGIC_VALUE) {
        say("start_info at 0x%x: bad magic 0x%x, expected 0x%x", start_info_paddr, si ? si->magic : 0,
            XEN_HVM_START_MAGIC_VALUE);
        say_raw("Test result: FAILURE");
        shutdown(SHUTDOWN_crash);
    }
    if (si->cmdline_paddr && si->cmdline_paddr < (1ull << 32))
        cmdline = (const char *)si->cmdline_paddr;
    say("booted: start_info at 0x%x (version %u), cmdline \"%s\"", start_info_paddr, si->version, cmdline);
    if (!have_hypercalls) {
        say("no Xen CPUID leaves or hypercall page found");
        say_raw("Test result: FAILURE");
        triple_fault();
    }
    if (strstr_(cmdline, "bench"))
        bench();
    demo();
}
