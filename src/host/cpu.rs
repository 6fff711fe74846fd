//! Threads and CPUs of this process, for the schedule benchmark: pinning a
//! thread to a CPU, finding a thread by name, its scheduler counters.

use std::io;

/// Pins thread `tid` of this process to `cpu`.
pub fn pin(tid: i32, cpu: usize) -> io::Result<()> {
    pin_set(tid, &[cpu])
}

/// Lets thread `tid` run on every CPU again.
pub fn unpin(tid: i32) -> io::Result<()> {
    let all: Vec<usize> = (0..online_cpus()).collect();
    pin_set(tid, &all)
}

/// Pins thread `tid` of this process to the CPUs `cpus`.
pub fn pin_set(tid: i32, cpus: &[usize]) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `cpu` was checked against the set's capacity above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: a valid set of the size given; tid is a thread id (the kernel checks it).
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CPUs online on the host (`_SC_NPROCESSORS_ONLN`). Not
/// `available_parallelism`: that is the calling thread's affinity, so a
/// thread pinned to one CPU would "unpin" itself to that CPU again, and
/// every thread it starts (vCPUs included) would inherit it.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a system value.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// `run_delay` (ns waiting for a CPU) of thread `tid` of this process.
pub fn run_delay(tid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    s.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// `nonvoluntary_ctxt_switches` (preemptions) of thread `tid` of this process.
pub fn preemptions(tid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The host's clocksource (`/sys/devices/system/clocksource/clocksource0/current_clocksource`).
pub fn clocksource() -> String {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Makes thread `tid` of this process `SCHED_FIFO` at `prio` (0: back to
/// `SCHED_OTHER`).
pub fn set_fifo_tid(tid: i32, prio: i32) -> io::Result<()> {
    let p = libc::sched_param {
        sched_priority: prio,
    };
    let policy = if prio > 0 {
        libc::SCHED_FIFO
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: a thread id (the kernel checks it) and a valid sched_param.
    if unsafe { libc::sched_setscheduler(tid, policy, &p) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the calling thread `SCHED_FIFO` at `prio` (needs CAP_SYS_NICE or an
/// RLIMIT_RTPRIO allowance); the error says why not.
pub fn set_fifo(prio: i32) -> io::Result<()> {
    let p = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: pid 0 = the calling thread; a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(tid: i32) -> usize {
        // SAFETY: an all-zero cpu_set_t is a valid set for the kernel to fill.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: a valid set of the size given.
        let r = unsafe {
            libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set)
        };
        assert_eq!(r, 0);
        // SAFETY: reads the set filled above.
        unsafe { libc::CPU_COUNT(&set) as usize }
    }

    /// A thread pinned to one CPU still sees every host CPU, so `unpin`
    /// really lets it (and the threads it starts later) run anywhere.
    #[test]
    fn cpu_pinned_thread_unpins_to_every_online_cpu() {
        let n = online_cpus();
        std::thread::spawn(move || {
            let me = crate::host::perf::gettid();
            pin(me, 0).unwrap();
            assert_eq!(allowed(me), 1);
            assert_eq!(online_cpus(), n, "pinning changed the CPU count");
            unpin(me).unwrap();
            assert_eq!(allowed(me), n);
            let child = std::thread::spawn(|| allowed(crate::host::perf::gettid()));
            assert_eq!(child.join().unwrap(), n);
        })
        .join()
        .unwrap();
    }
}
