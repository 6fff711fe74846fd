//! Host OS facilities other than KVM: the host scheduler's context switches
//! of our own threads through `perf_event_open` (see
//! ../shared/docs/RUNSTATE-SCHED.md for the measurements behind the choices).
//!
//! Rules: this layer imports no other xenkvm layer (it is below `xen/` and
//! `vmm/`, beside `kvm/`); its `unsafe` (the syscall, the ring mapping) stays
//! in this folder, each block with a `// SAFETY:` comment; it starts no
//! threads (the monitor thread is `vmm/`'s).

pub mod bpf;
pub mod cpu;
pub mod perf;
pub mod tap;

/// A new read-write shared mapping of `len` bytes of `fd` from offset 0
/// (a perf ring, a BPF array map's data); the caller unmaps it.
pub(crate) fn map_shared_rw(
    fd: std::os::fd::BorrowedFd<'_>,
    len: usize,
) -> std::io::Result<*mut u8> {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh mapping (no MAP_FIXED, so nothing is replaced); the
    // kernel checks `len` against what the descriptor allows.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p.cast())
}
