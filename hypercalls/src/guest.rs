//! Access to the calling vCPU: its identity, privilege, mode, and guest-virtual memory.
//!
//! Hypercall arguments are guest-virtual addresses. The VMM walks the guest's page tables page
//! by page, so a structure may straddle pages; any page that does not translate is a
//! [`MemFault`], which every handler turns into `-EFAULT`. Handlers copy a structure in, work
//! on the copy, and copy results out: guest memory is never borrowed.

use crate::abi;
use crate::errno::Errno;
use crate::types::GuestWidth;

/// A guest-virtual access that did not translate to guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest virtual address {gva:#x} is not mapped")]
pub struct MemFault {
    /// The first address that failed.
    pub gva: u64,
}

/// What the calling vCPU gives a handler: identity, privilege, and guest-virtual memory.
pub trait VcpuAccess {
    /// The Xen vCPU id of the caller.
    fn vcpu_id(&self) -> u32;
    /// Current privilege level (0 in real mode).
    fn cpl(&self) -> u8;
    /// The current mode of the vCPU: long mode is [`GuestWidth::Bits64`].
    fn width(&self) -> GuestWidth;
    /// Read `buf.len()` bytes at `gva`, walking the guest page tables page by page.
    fn read_virt(&self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault>;
    /// Write `data` at `gva`, walking the guest page tables page by page.
    fn write_virt(&self, gva: u64, data: &[u8]) -> Result<(), MemFault>;
    /// The guest-physical address `gva` translates to now (for areas the VMM keeps writing
    /// after the hypercall, such as the runstate area), checked for write access.
    fn translate(&self, gva: u64) -> Result<u64, MemFault>;
    /// Whether the vCPU can take an interrupt now (RFLAGS.IF set and no
    /// interrupt shadow), as at the hypercall: Xen's `hvm_interrupt_blocked`
    /// for `SCHEDOP_block`/`SCHEDOP_poll`. Callers that cannot tell say yes.
    fn interrupts_enabled(&self) -> bool {
        true
    }
}

/// The calling vCPU's memory as a handler uses it: bounds-checked, errno-returning.
pub(crate) struct Guest<'a> {
    v: &'a dyn VcpuAccess,
    width: GuestWidth,
}

impl<'a> Guest<'a> {
    pub fn new(v: &'a dyn VcpuAccess, width: GuestWidth) -> Self {
        Guest { v, width }
    }

    pub fn width(&self) -> GuestWidth {
        self.width
    }

    /// See [`VcpuAccess::interrupts_enabled`].
    pub fn interrupts_enabled(&self) -> bool {
        self.v.interrupts_enabled()
    }

    pub fn is_compat(&self) -> bool {
        self.width == GuestWidth::Bits32
    }

    /// A 32-bit guest's linear addresses end at 4 GiB; a range past that (or past 2^64) faults.
    fn check_range(&self, gva: u64, len: usize) -> Result<(), Errno> {
        let end = gva.checked_add(len as u64).ok_or(Errno::EFAULT)?;
        if self.is_compat() && end > 1 << 32 {
            return Err(Errno::EFAULT);
        }
        Ok(())
    }

    pub fn read(&self, gva: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.check_range(gva, buf.len())?;
        self.v.read_virt(gva, buf).map_err(|_| Errno::EFAULT)
    }

    /// Read a fixed-size structure.
    pub fn read_arr<const N: usize>(&self, gva: u64) -> Result<[u8; N], Errno> {
        let mut b = [0u8; N];
        self.read(gva, &mut b)?;
        Ok(b)
    }

    pub fn write(&self, gva: u64, data: &[u8]) -> Result<(), Errno> {
        self.check_range(gva, data.len())?;
        self.v.write_virt(gva, data).map_err(|_| Errno::EFAULT)
    }

    /// The guest-physical pieces of the `len`-byte area at `gva`: one piece, or one per page
    /// when the area straddles pages (adjacent physical pieces are merged).
    pub fn phys_pieces(&self, gva: u64, len: usize) -> Result<Vec<(u64, u64)>, Errno> {
        self.check_range(gva, len)?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut done = 0u64;
        while done < len as u64 {
            let a = gva + done;
            let n = (abi::PAGE_SIZE as u64 - (a % abi::PAGE_SIZE as u64)).min(len as u64 - done);
            let gpa = self.v.translate(a).map_err(|_| Errno::EFAULT)?;
            match out.last_mut() {
                Some(last) if last.0 + last.1 == gpa => last.1 += n,
                _ => out.push((gpa, n)),
            }
            done += n;
        }
        Ok(out)
    }

    /// Element `i` of a guest array of `elem`-byte elements at `base`, with overflow checks.
    pub fn elem_addr(&self, base: u64, i: u64, elem: u64) -> Result<u64, Errno> {
        i.checked_mul(elem)
            .and_then(|o| base.checked_add(o))
            .ok_or(Errno::EFAULT)
    }
}
