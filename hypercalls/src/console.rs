//! `console_io`: the guest's emergency console, to the VMM's stdout and from its input.
//!
//! Writes are copied in page-sized chunks (aligned to the guest's pages, so each chunk costs
//! one page walk) and filtered as Xen filters a domU's output: printable ASCII, tab and newline
//! pass, everything else is dropped. A length of up to 4 GiB is handled in bounded memory and
//! bounded time per chunk; the first unmapped chunk ends the call with `-EFAULT` after what was
//! already written (XSA consoleio-write: a huge or sign-confusable length neither hangs nor
//! overflows anything). Xen would preempt such a call with a continuation; a single vCPU
//! thread copying it through is equivalent for the guest.

use crate::abi::{consoleio, PAGE_SIZE};
use crate::domain::{Ctx, Domain};
use crate::errno::Errno;

/// Keep what Xen keeps of a domU's console output.
fn printable(c: u8) -> bool {
    c == b'\n' || c == b'\t' || (0x20..0x7f).contains(&c)
}

impl Domain {
    /// `do_console_io`.
    pub(crate) fn console_io(
        &self,
        ctx: &Ctx,
        cmd: u32,
        count: u32,
        buf: u64,
    ) -> Result<i64, Errno> {
        match cmd {
            consoleio::WRITE => self.console_write(ctx, count, buf).map(|()| 0),
            consoleio::READ => {
                if count > i32::MAX as u32 {
                    return Err(Errno::E2BIG);
                }
                self.console_read(ctx, count, buf)
            }
            _ => Err(Errno::ENOSYS),
        }
    }

    fn console_write(&self, ctx: &Ctx, count: u32, buf: u64) -> Result<(), Errno> {
        let mut chunk = [0u8; PAGE_SIZE];
        let mut out = Vec::with_capacity(PAGE_SIZE);
        let mut addr = buf;
        let mut left = u64::from(count);
        while left > 0 {
            let to_page_end = PAGE_SIZE as u64 - (addr % PAGE_SIZE as u64);
            let n = left.min(to_page_end) as usize;
            ctx.g.read(addr, &mut chunk[..n])?;
            out.clear();
            out.extend(chunk[..n].iter().copied().filter(|&c| printable(c)));
            if !out.is_empty() {
                self.platform.console_write(&out);
            }
            left -= n as u64;
            addr = addr.checked_add(n as u64).ok_or(Errno::EFAULT)?;
        }
        Ok(())
    }

    /// Copy pending console input (at most `count` bytes) to the guest; returns the count.
    fn console_read(&self, ctx: &Ctx, count: u32, buf: u64) -> Result<i64, Errno> {
        let mut chunk = [0u8; PAGE_SIZE];
        let mut done: u64 = 0;
        while done < u64::from(count) {
            let want = (u64::from(count) - done).min(PAGE_SIZE as u64) as usize;
            let got = self.platform.console_read(&mut chunk[..want]).min(want);
            if got == 0 {
                break;
            }
            let a = buf.checked_add(done).ok_or(Errno::EFAULT)?;
            ctx.g.write(a, &chunk[..got])?;
            done += got as u64;
        }
        Ok(done as i64)
    }
}
