// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * xenkvm: host context switches of vCPU threads, for the Xen runstate area (issue 16).
 *
 * Rebuild with ./build.sh (clang, libbpf-dev); the compiled CO-RE object sched.bpf.o is
 * checked in next to this file and embedded by the VMM (loaded with the `aya` crate), so
 * the normal build needs no clang.
 *
 * `tids` holds the threads to watch: value 1 = a vCPU thread, 2 = the VMM's watch thread.
 * For a vCPU thread the program emits one event per switch-in, switch-out (preempted:
 * still runnable; blocked: went to sleep) and wake-up into the ring buffer of the CPU
 * it happened on (`rb0`..`rb7`, CPU modulo 8). Only a
 * preempted switch-out wakes the consumer (BPF_RB_FORCE_WAKEUP), and not when the CPU goes
 * to the watch thread itself: that preemption ends as soon as the watch thread sleeps
 * again, and waking it for it would feed a preemption loop (every watch thread has
 * that role). A failed reserve (ring full)
 * is counted in `lost`. A quarter-full ring also wakes the consumer.
 *
 * A preemption by another watched vCPU thread (a halted vCPU woken by an IPI
 * from this one, placed on its CPU, preempting it) does not wake the consumer
 * at once: most such preemptions end within a few hundred microseconds, when
 * the woken vCPU halts again, and waking the watch thread for each (it then
 * preempts the woken vCPU, and kicks the preempted one out of KVM_RUN) was most
 * of what tracking cost a halt-heavy guest. The switch-out is recorded
 * (no wake-up) and a per-thread BPF timer, pinned to that CPU, fires
 * SIBLING_DELAY_NS later: if the thread has not switched in by then it writes
 * an EV_STILL_OUT event that wakes the consumer, which shows the preemption as
 * it would have at once. Accounting is unchanged (every switch is recorded
 * either way); only showing a short preemption by a sibling is left out. If the
 * timer cannot be armed (no map slot, an older kernel refusing the pinned
 * flag) the consumer is woken at once as before.
 *
 * A preemption by the watch thread itself wakes nobody (it is awake), and is
 * over when the watch thread sleeps again, unless the CPU then goes to
 * another thread (a hog) instead of back to the vCPU: the preemption goes
 * on, now the hog's, and nobody would show it. So the CPU remembers the
 * vCPU the watch thread took it from (`self_out`), and the watch thread's
 * own switch-out writes an EV_STILL_OUT (flag EVF_BY_WATCHER) that wakes it
 * again if `next` is not that vCPU (if `next` is another vCPU thread, through
 * the sibling delay above). Once per preemption: the slot is cleared at every
 * switch-out of the watch thread, so the wake-up cannot loop.
 *
 * Publishing `running` at the switch-in itself (no kick): a vCPU whose runstate
 * area lies in a page of `pub_pages` (the VMM mapped that page over the guest's
 * RAM page, so it is the guest's page) has a `pub_ctl` slot (index: the vCPU, the
 * `tids` value >> 8). After the watch thread published `runnable` for a
 * preemption it writes the published entry time and time[] and the switch-out's
 * time (`arm_out`) into the slot and sets `armed`; at the thread's next switch-in,
 * if that switch-out is still the thread's last one, this program takes `armed`
 * back (compare-and-swap) and writes `running` into the area (XEN_RUNSTATE_UPDATE
 * protocol when `flag`), before the thread runs again: the vCPU never enters the
 * guest under `runnable`, and is not kicked out of KVM_RUN for it. `out` and
 * `last_out` (written at each switch-out, `out` cleared before the switch-in
 * looks at `armed`) let the watch thread find a switch-in that came before its
 * `armed` (it then takes `armed` back itself and kicks, as without this). The switch-in's guest time and host time go into the
 * slot, so the VMM applies the switch-in event at exactly the published time.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <stdbool.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

/* CO-RE: only the field used; relocated against the running kernel's BTF. */
struct task_struct {
    int pid;
} __attribute__((preserve_access_index));

enum { EV_IN = 0, EV_PREEMPTED = 1, EV_BLOCKED = 2, EV_WOKEN = 3, EV_STILL_OUT = 4 };
enum { WATCH_VCPU = 1, WATCH_SELF = 2 };
/* ev.flags */
#define EVF_BY_WATCHER 1u /* preempted by the watch thread itself */
#define EVF_BY_VCPU 2u    /* preempted by another vCPU thread: wake-up deferred */
#define EVF_PUBLISHED 4u  /* EV_IN: this program published running (ev.guest) */
#define EVF_LATE 8u       /* EV_IN: found at the end of __schedule() in the thread's
                             context, the switch-in not reported (on_sched_exit) */

/* How long a preemption by a sibling vCPU thread must last before the consumer
 * is woken for it (short ones end when the sibling halts again). */
#define SIBLING_DELAY_NS 300000ull
#define CLOCK_MONOTONIC 1
/* Not in older UAPI headers (kernel 6.7+): fire on the CPU that armed it. */
#define XK_BPF_F_TIMER_CPU_PIN (1ull << 1)

struct ev {
    __u32 tid;
    __u32 kind;
    __u64 ts; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u32 cpu;
    __u32 flags;
    __u64 guest; /* EV_IN with EVF_PUBLISHED: the guest time running was published at */
};

/* One ring per CPU (modulo NR_RINGS): an event goes into the ring of the CPU it
 * happened on, and the VMM runs one watch thread per ring, pinned to those CPUs, so
 * that the wake-up for a preempted vCPU runs on the CPU that preempted it (taking
 * the CPU from whatever preempted the vCPU) and never lands on the CPU of another
 * vCPU, which would then be kept from its guest (and from seeing the change). */
#define NR_RINGS 8
#define RB_BYTES (1 << 16)
#define RB_WAKE_BYTES (RB_BYTES / 4)

#define RING(n)                                                                       \
    struct {                                                                          \
        __uint(type, BPF_MAP_TYPE_RINGBUF);                                           \
        __uint(max_entries, RB_BYTES);                                                \
    } rb##n SEC(".maps");
RING(0)
RING(1)
RING(2)
RING(3)
RING(4)
RING(5)
RING(6)
RING(7)

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u32);
    __type(value, __u32);
} tids SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} lost SEC(".maps");

/* Per CPU: the vCPU thread the watch thread took this CPU from (tid 0: none). */
struct self_out {
    __u32 tid;
    __u32 pad;
    __u64 ts; /* its switch-out */
};

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct self_out);
} self_out SEC(".maps");

/* A vCPU thread's deferred wake-up (one slot per watched thread). */
struct deferred {
    struct bpf_timer timer;
    __u64 out_ts; /* the open preemption's switch-out time; 0: none open */
    __u32 tid;
    __u16 ready;  /* timer initialised and its callback set (a cancel unsets it) */
    __u16 flags;  /* of the EV_STILL_OUT it writes: EVF_BY_WATCHER if the
                     preemption began as the watch thread's own */
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u32);
    __type(value, struct deferred);
} deferred SEC(".maps");

static __always_inline void emit_to(void *rb, __u32 tid, __u32 kind, __u64 now, __u32 flags,
                                    int wake, __u64 guest)
{
    struct ev *e = bpf_ringbuf_reserve(rb, sizeof(*e), 0);
    if (!e) {
        __u32 k = 0;
        __u64 *n = bpf_map_lookup_elem(&lost, &k);
        if (n)
            __sync_fetch_and_add(n, 1);
        return;
    }
    e->tid = tid;
    e->kind = kind;
    e->ts = now;
    e->cpu = bpf_get_smp_processor_id();
    e->flags = flags;
    e->guest = guest;
    /* Also wake the consumer once a quarter of the ring is waiting (halts and
     * wake-ups alone would otherwise fill it while nothing is preempted). */
    if (!wake && bpf_ringbuf_query(rb, BPF_RB_AVAIL_DATA) >= RB_WAKE_BYTES)
        wake = 1;
    bpf_ringbuf_submit(e, wake ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

/* Into the ring of the current CPU. */
static __always_inline void emit_g(__u32 tid, __u32 kind, __u64 now, __u32 flags, int wake,
                                   __u64 guest)
{
    switch (bpf_get_smp_processor_id() % NR_RINGS) {
    case 0: emit_to(&rb0, tid, kind, now, flags, wake, guest); break;
    case 1: emit_to(&rb1, tid, kind, now, flags, wake, guest); break;
    case 2: emit_to(&rb2, tid, kind, now, flags, wake, guest); break;
    case 3: emit_to(&rb3, tid, kind, now, flags, wake, guest); break;
    case 4: emit_to(&rb4, tid, kind, now, flags, wake, guest); break;
    case 5: emit_to(&rb5, tid, kind, now, flags, wake, guest); break;
    case 6: emit_to(&rb6, tid, kind, now, flags, wake, guest); break;
    default: emit_to(&rb7, tid, kind, now, flags, wake, guest); break;
    }
}

#define emit(tid, kind, now, flags, wake) emit_g(tid, kind, now, flags, wake, 0)

/* The timer: the thread is still switched out (no switch-in cleared out_ts):
 * wake the consumer of this CPU's ring. A switch-in racing with this on
 * another CPU costs at most a wake-up that finds the preemption over. */
static int on_deferred(void *map, __u32 *key, struct deferred *d)
{
    __u64 out = d->out_ts;
    if (out) {
        d->out_ts = 0;
        emit(d->tid, EV_STILL_OUT, out, d->flags, 1);
    }
    return 0;
}

/* Arms `tid`'s timer for a preemption that began at `now`; false if it could
 * not (the caller wakes the consumer at once instead). `flags`: of the
 * EV_STILL_OUT the timer writes. */
static __always_inline int defer_wake(__u32 tid, __u64 now, __u16 flags)
{
    struct deferred *d = bpf_map_lookup_elem(&deferred, &tid);
    if (!d) {
        struct deferred z = {};
        z.tid = tid;
        bpf_map_update_elem(&deferred, &tid, &z, BPF_NOEXIST);
        d = bpf_map_lookup_elem(&deferred, &tid);
        if (!d)
            return 0;
    }
    if (!d->ready) {
        long r = bpf_timer_init(&d->timer, &deferred, CLOCK_MONOTONIC);
        if (r && r != -16 /* EBUSY: already initialised (after a cancel) */)
            return 0;
        if (bpf_timer_set_callback(&d->timer, on_deferred))
            return 0;
        d->ready = 1;
    }
    d->out_ts = now;
    d->flags = flags;
    if (bpf_timer_start(&d->timer, SIBLING_DELAY_NS, XK_BPF_F_TIMER_CPU_PIN)) {
        d->out_ts = 0;
        return 0;
    }
    return 1;
}

/* Direct publishing (see above). XK_MAX_VCPUS: the VMM's MAX_VCPUS. */
#define XK_MAX_VCPUS 32
#define XK_PAGE 4096
#define XK_AREA 48 /* the 64-bit vcpu_runstate_info */
#define XEN_RUNSTATE_UPDATE (1ull << 63)

struct pub_ctl {
    __u32 armed;     /* 1: publish running at the end of the switch-out `arm_out` */
    __u32 out;       /* 1 while the thread is switched out */
    __u32 page;      /* pub_pages index of the area's page */
    __u32 off;       /* the area's offset in it (8-aligned, <= XK_PAGE - XK_AREA) */
    __u32 enabled;   /* the area is in pub_pages */
    __u32 flag;      /* XEN_RUNSTATE_UPDATE protocol */
    __u64 arm_out;   /* the switch-out (its time) the watch thread armed for */
    __u64 last_out;  /* the thread's last switch-out (its time) */
    __u64 entry;     /* the published runnable's state_entry_time (guest ns) */
    __u64 time[4];   /* and its time[] */
    __s64 offset;    /* guest ns = bpf_ktime_get_ns() + offset */
    __u64 in_host;   /* the last published switch-in: its bpf_ktime_get_ns() */
    __u64 in_guest;  /* and the guest time published for it */
    __u64 published; /* switch-ins published */
    __u64 ins;       /* switch-ins (a locked add: also the barrier below) */
    __u64 outs;      /* switch-outs */
    __u64 missed_in; /* switch-outs with no switch-in seen since the last one */
    __u64 late_in;   /* switch-ins sched_switch missed, found by on_sched_exit */
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(map_flags, BPF_F_MMAPABLE);
    __uint(max_entries, XK_MAX_VCPUS);
    __type(key, __u32);
    __type(value, struct pub_ctl);
} pub_ctl SEC(".maps");

struct pub_page {
    __u64 w[XK_PAGE / 8];
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(map_flags, BPF_F_MMAPABLE);
    __uint(max_entries, XK_MAX_VCPUS);
    __type(key, __u32);
    __type(value, struct pub_page);
} pub_pages SEC(".maps");

#define barrier() asm volatile("" ::: "memory")

/* `running` from `now` into the slot's area: runnable's time grows by the
 * wait. Returns the guest time published (0: not published). */
static __always_inline __u64 publish_running(struct pub_ctl *c, __u64 now)
{
    __u32 pi = c->page;
    __u32 off = c->off;
    struct pub_page *pg = bpf_map_lookup_elem(&pub_pages, &pi);
    if (!pg || off > XK_PAGE - XK_AREA || (off & 7))
        return 0;
    __u64 entry = c->entry;
    __u64 guest = now + (__u64)c->offset;
    if ((__s64)(guest - entry) < 0)
        guest = entry;
    volatile __u64 *a = &pg->w[off / 8];
    if (c->flag) {
        a[1] = entry | XEN_RUNSTATE_UPDATE;
        barrier();
    }
    a[0] = 0; /* RUNSTATE_running, padding zero */
    a[2] = c->time[0];
    a[3] = c->time[1] + (guest - entry);
    a[4] = c->time[2];
    a[5] = c->time[3];
    barrier();
    a[1] = guest;
    c->in_host = now;
    c->in_guest = guest;
    c->published++;
    return guest;
}

static __always_inline struct pub_ctl *pub_slot(__u32 v)
{
    __u32 i = v >> 8;
    return bpf_map_lookup_elem(&pub_ctl, &i);
}

/* Thread `tid` (its `tids` value `v`, its slot `c` if any) switched in at
 * `now`: the end of a deferred preemption, running published if armed for
 * this switch-out, an EV_IN event. */
static __always_inline void switched_in(__u32 tid, __u32 v, __u64 now, struct pub_ctl *c,
                                        __u32 flags)
{
    struct deferred *d = bpf_map_lookup_elem(&deferred, &tid);
    if (d && d->out_ts) {
        /* The deferred preemption ended in time: no wake-up, and no
         * timer interrupt either (the callback would find nothing). */
        d->out_ts = 0;
        bpf_timer_cancel(&d->timer);
        /* Cancelling also drops the callback: set it again next time. */
        d->ready = 0;
    }
    __u64 guest = 0;
    if (c) {
        c->out = 0;
        /* A locked add: orders the store above before the loads below
         * (Dekker with the watch thread's store of armed and load of
         * out). Published only for the switch-out armed for, and only
         * if the watch thread has not taken armed back meanwhile. */
        __sync_fetch_and_add(&c->ins, 1);
        if (c->enabled && c->armed == 1 && c->arm_out == c->last_out &&
            __sync_val_compare_and_swap(&c->armed, 1, 0) == 1)
            guest = publish_running(c, now);
    }
    emit_g(tid, EV_IN, now, flags | (guest ? EVF_PUBLISHED : 0), 0, guest);
}

SEC("tp_btf/sched_switch")
int BPF_PROG(on_switch, bool preempt, struct task_struct *prev, struct task_struct *next,
             unsigned int prev_state)
{
    __u32 ptid = prev->pid, ntid = next->pid;
    __u64 now = 0;
    __u32 zero = 0;
    __u32 *pv = bpf_map_lookup_elem(&tids, &ptid);
    __u32 *nv = bpf_map_lookup_elem(&tids, &ntid);
    if (pv && (*pv & 0xff) == WATCH_SELF) {
        /* The watch thread leaves this CPU: if it had taken it from a vCPU
         * and the CPU does not go back to that vCPU, the preemption goes on
         * (another thread's now): wake the watch thread to show it. */
        struct self_out *so = bpf_map_lookup_elem(&self_out, &zero);
        if (so && so->tid) {
            /* To another vCPU thread: a sibling's preemption from here on,
             * shown only if it outlasts the delay, as those are. */
            if (so->tid != ntid &&
                !(nv && (*nv & 0xff) == WATCH_VCPU && defer_wake(so->tid, so->ts, EVF_BY_WATCHER)))
                emit(so->tid, EV_STILL_OUT, so->ts, EVF_BY_WATCHER, 1);
            so->tid = 0;
        }
    }
    if (pv && (*pv & 0xff) == WATCH_VCPU) {
        struct pub_ctl *c = pub_slot(*pv);
        now = bpf_ktime_get_ns();
        if (c) {
            if (c->out)
                c->missed_in++;
            c->last_out = now;
            c->out = 1;
            c->outs++;
        }
        if (preempt || prev_state == 0) {
            int by_watcher = nv && (*nv & 0xff) == WATCH_SELF;
            int by_vcpu = nv && (*nv & 0xff) == WATCH_VCPU && defer_wake(ptid, now, 0);
            __u32 flags = by_watcher ? EVF_BY_WATCHER : by_vcpu ? EVF_BY_VCPU : 0;
            if (by_watcher) {
                struct self_out *so = bpf_map_lookup_elem(&self_out, &zero);
                if (so) {
                    so->tid = ptid;
                    so->ts = now;
                }
            }
            emit(ptid, EV_PREEMPTED, now, flags, !by_watcher && !by_vcpu);
        } else {
            emit(ptid, EV_BLOCKED, now, 0, 0);
        }
    }
    if (nv && (*nv & 0xff) == WATCH_VCPU)
        switched_in(ntid, *nv, now ? now : bpf_ktime_get_ns(), pub_slot(*nv), 0);
    return 0;
}

/*
 * Switch-ins sched_switch does not report. On some hosts it is not reported
 * for every switch: on this project's (a sandbox's kernel) the switches away
 * from the sandbox's own supervisor threads never are, so a vCPU thread
 * preempted by one of them is seen switched out and never back in. Without a
 * fallback its area would say runnable while it runs (and with `bpf-direct`
 * the guest could see that itself). `sched_exit_tp` (kernel 6.16+, for the
 * runtime verification monitors) fires at the end of __schedule(), after the
 * switch, in the context of the thread that runs on: a vCPU thread still
 * marked `out` there was switched in unreported, and is switched in here,
 * before it runs its guest again. Where the kernel has no such tracepoint the
 * VMM loads the program without it (`SchedBpf::finds_late_switch_ins`).
 */
SEC("tp_btf/sched_exit_tp")
int BPF_PROG(on_sched_exit, bool is_switch)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    __u32 *v = bpf_map_lookup_elem(&tids, &tid);
    if (!v || (*v & 0xff) != WATCH_VCPU)
        return 0;
    struct pub_ctl *c = pub_slot(*v);
    if (!c || !c->out)
        return 0;
    c->late_in++;
    switched_in(tid, *v, bpf_ktime_get_ns(), c, EVF_LATE);
    return 0;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(on_wakeup, struct task_struct *p)
{
    __u32 tid = p->pid;
    __u32 *v = bpf_map_lookup_elem(&tids, &tid);
    if (v && (*v & 0xff) == WATCH_VCPU)
        emit(tid, EV_WOKEN, bpf_ktime_get_ns(), 0, 0);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
