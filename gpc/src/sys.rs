//! Thin wrappers over the few Linux calls the memory map and the cache need
//! (memfd, mmap, madvise/fallocate, mlock, membarrier).
//!
//! Every wrapper turns `-1`/`MAP_FAILED` into an [`std::io::Error`]; none of
//! them creates a Rust reference to the memory it maps.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

/// Page size the cache works in (x86 base pages).
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// Creates an anonymous memory file of `size` bytes (zero-filled, close-on-exec).
pub fn memfd(name: &CStr, size: usize) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no other
    // memory effects.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    Ok(file)
}

/// Maps `len` bytes of `file` at `offset` shared and read-write, at an address
/// the kernel chooses.
pub fn map_shared(file: &File, offset: u64, len: usize) -> io::Result<*mut u8> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: no MAP_FIXED, so no existing mapping is replaced; the result is
    // checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// Maps `len` bytes of zeroed anonymous read-write memory.
pub fn anon(len: usize) -> io::Result<*mut u8> {
    // SAFETY: anonymous mapping without MAP_FIXED: replaces nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// Reserves `len` bytes of address space with no access (a window to be
/// filled with [`map_fixed`]).
pub fn reserve(len: usize) -> io::Result<*mut u8> {
    // SAFETY: anonymous PROT_NONE mapping without MAP_FIXED: replaces nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// Maps `len` bytes of `file` at `offset` shared and read-write exactly at
/// `addr`, replacing whatever was mapped there.
///
/// # Safety
/// `addr..addr+len` must be page aligned and lie inside a mapping the caller
/// owns, and nobody may rely on the old contents of that range staying mapped
/// (the caller has made sure no access through the old pages is in flight).
pub unsafe fn map_fixed(addr: *mut u8, file: &File, offset: u64, len: usize) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller guarantees the range is its own and unused (see above).
    let p = unsafe {
        libc::mmap(
            addr.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            file.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmaps a range.
///
/// # Safety
/// The range must be a mapping the caller owns and nothing may access it any more.
pub unsafe fn unmap(addr: *mut u8, len: usize) {
    // SAFETY: guaranteed by the caller. munmap of an owned range cannot fail
    // except for invalid arguments, which would be a bug; ignore the result.
    unsafe { libc::munmap(addr.cast(), len) };
}

/// Frees the backing store of `len` bytes of `file` at `offset` (the pages read
/// as zero afterwards and are allocated again on the next write).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let l = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain syscall on an owned fd; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Locks a range into RAM (no page faults on access).
pub fn mlock(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: mlock only changes residency; an invalid range yields an error.
    if unsafe { libc::mlock(addr.cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

fn membarrier_call(cmd: libc::c_long) -> libc::c_long {
    // SAFETY: membarrier takes no pointers; unknown commands fail with EINVAL.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    }
}

/// Registers the process for expedited private membarriers; true when the
/// kernel supports them.
pub fn membarrier_register() -> bool {
    let q = membarrier_call(MEMBARRIER_CMD_QUERY);
    if q < 0 || q & MEMBARRIER_CMD_PRIVATE_EXPEDITED == 0 {
        return false;
    }
    membarrier_call(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0
}

/// Issues a full memory barrier on every CPU currently running a thread of
/// this process (requires [`membarrier_register`] to have succeeded).
pub fn membarrier() -> bool {
    membarrier_call(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0
}
