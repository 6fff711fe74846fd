//! `hvm_op`: HVM parameters with Xen's guest access rules, `get_time`, the per-vCPU upcall
//! vector, and the few other operations an HVM domU may issue.
//!
//! Parameter rules (`hvm_allow_set_param` / `hvm_allow_get_param` for a domain acting on
//! itself): a short list is guest-writable (CALLBACK_IRQ, VM86_TSS(_SIZED),
//! ACPI_IOPORTS_LOCATION, VM_GENERATION_ID_ADDR, STORE_EVTCHN, CONSOLE_EVTCHN, X87_FIP_WIDTH) or
//! guest-readable (those plus STORE_PFN, CONSOLE_PFN, ALTP2M); deprecated indices are `-EINVAL`;
//! everything else is `-EPERM`. An index at or above `HVM_NR_PARAMS` is `-EINVAL`; a domid other
//! than DOMID_SELF/own is `-ESRCH`, or `-EPERM` for dom0.

use std::sync::atomic::Ordering;

use crate::abi::{get_u16, get_u32, get_u64, hvmop, param, put_u64};
use crate::domain::{Ctx, Domain, Lookup};
use crate::errno::Errno;

/// `VM86_TSS_UPDATED` (bit 62 of VM86_TSS_SIZED).
const VM86_TSS_UPDATED: u64 = 1 << 62;
/// `sizeof(struct tss32)`.
const TSS32_LEN: u64 = 104;

fn deprecated(idx: u32) -> bool {
    matches!(
        idx,
        param::PAE_ENABLED
            | param::DM_DOMAIN
            | param::MEMORY_EVENT_CR0
            | param::MEMORY_EVENT_CR3
            | param::MEMORY_EVENT_CR4
            | param::MEMORY_EVENT_INT3
            | param::NESTEDHVM
            | param::MEMORY_EVENT_SINGLE_STEP
            | param::BUFIOREQ_EVTCHN
            | param::MEMORY_EVENT_MSR
    )
}

fn guest_may_set(idx: u32) -> Result<(), Errno> {
    match idx {
        param::CALLBACK_IRQ
        | param::VM86_TSS
        | param::VM86_TSS_SIZED
        | param::ACPI_IOPORTS_LOCATION
        | param::VM_GENERATION_ID_ADDR
        | param::STORE_EVTCHN
        | param::CONSOLE_EVTCHN
        | param::X87_FIP_WIDTH => Ok(()),
        i if deprecated(i) => Err(Errno::EINVAL),
        _ => Err(Errno::EPERM),
    }
}

fn guest_may_get(idx: u32) -> Result<(), Errno> {
    match idx {
        param::CALLBACK_IRQ
        | param::VM86_TSS
        | param::VM86_TSS_SIZED
        | param::ACPI_IOPORTS_LOCATION
        | param::VM_GENERATION_ID_ADDR
        | param::STORE_PFN
        | param::STORE_EVTCHN
        | param::CONSOLE_PFN
        | param::CONSOLE_EVTCHN
        | param::ALTP2M
        | param::X87_FIP_WIDTH => Ok(()),
        i if deprecated(i) => Err(Errno::EINVAL),
        _ => Err(Errno::EPERM),
    }
}

impl Domain {
    /// `do_hvm_op`.
    pub(crate) fn hvm_op(&self, ctx: &Ctx, op: u64, arg: u64) -> Result<i64, Errno> {
        match op {
            hvmop::SET_PARAM => {
                let b: [u8; 16] = ctx.g.read_arr(arg)?;
                let idx = self.param_target(&b)?;
                self.set_param_guest(ctx, idx, get_u64(&b, 8)).map(|()| 0)
            }
            hvmop::GET_PARAM => {
                let mut b: [u8; 16] = ctx.g.read_arr(arg)?;
                let idx = self.param_target(&b)?;
                guest_may_get(idx)?;
                put_u64(&mut b, 8, self.get_param_value(idx));
                ctx.g.write(arg, &b)?;
                Ok(0)
            }
            hvmop::GET_TIME => {
                ctx.g.write(arg, &self.now_ns().to_le_bytes())?;
                Ok(0)
            }
            hvmop::SET_EVTCHN_UPCALL_VECTOR => {
                // {uint32_t vcpu; uint8_t vector;}
                let b: [u8; 8] = ctx.g.read_arr(arg)?;
                let vector = b[4];
                if vector < 0x10 {
                    return Err(Errno::EINVAL);
                }
                let v = self.vcpu(get_u32(&b, 0)).ok_or(Errno::ENOENT)?;
                self.vcpus[v.idx()]
                    .upcall_vector
                    .store(vector, Ordering::Release);
                tracing::info!(vcpu = v.get(), vector, "upcall vector set");
                // hvm_assert_evtchn_irq: re-deliver what is already pending.
                if self.upcall_pending(v) {
                    self.platform.raise_upcall(v);
                }
                Ok(0)
            }
            hvmop::PAGETABLE_DYING => {
                // {domid u16, pad u16[3], gpa u64}: a HAP domain ignores the hint (-EINVAL,
                // as Xen leaves rc when not shadow-paged); another domain is -EOPNOTSUPP.
                let b: [u8; 16] = ctx.g.read_arr(arg)?;
                match self.lookup(get_u16(&b, 0)) {
                    Lookup::None => Err(Errno::ESRCH),
                    Lookup::Dom0 => Err(Errno::EOPNOTSUPP),
                    Lookup::SelfDom => Err(Errno::EINVAL),
                }
            }
            hvmop::GUEST_REQUEST_VM_EVENT => {
                // No monitor is attached: a null handle is accepted and ignored.
                if arg == 0 {
                    Ok(0)
                } else {
                    Err(Errno::EINVAL)
                }
            }
            // TODO(issue 5): flush_tlbs needs a VMM-side all-vCPU TLB flush; get_mem_type.
            _ => Err(Errno::ENOSYS),
        }
    }

    /// `{domid u16, pad, index u32 @4, value u64 @8}` (same in both widths): the index, after
    /// the bounds and domain checks.
    fn param_target(&self, b: &[u8; 16]) -> Result<u32, Errno> {
        let idx = get_u32(b, 4);
        if idx >= param::NR_PARAMS {
            return Err(Errno::EINVAL);
        }
        self.target_self(get_u16(b, 0))?;
        Ok(idx)
    }

    /// `hvm_get_param` for the guest-visible representation.
    fn get_param_value(&self, idx: u32) -> u64 {
        let sized = self.params[param::VM86_TSS_SIZED as usize].load(Ordering::Acquire);
        match idx {
            param::VM86_TSS => sized & 0xffff_ffff,
            param::VM86_TSS_SIZED => sized & !VM86_TSS_UPDATED,
            _ => self.params[idx as usize].load(Ordering::Acquire),
        }
    }

    /// `hvm_set_param` for a guest acting on itself.
    fn set_param_guest(&self, ctx: &Ctx, idx: u32, value: u64) -> Result<(), Errno> {
        guest_may_set(idx)?;
        let (idx, value) = match idx {
            param::CALLBACK_IRQ => {
                self.latch_width(ctx.g.width());
                (idx, value)
            }
            param::X87_FIP_WIDTH => {
                if !matches!(value, 0 | 4 | 8) {
                    return Err(Errno::EINVAL);
                }
                (idx, value)
            }
            param::VM86_TSS => {
                // Xen also crashes a guest that sets high bits on itself; refusing is enough
                // here (the VMM's task switch emulation never uses it).
                if value != u64::from(value as u32) {
                    return Err(Errno::EINVAL);
                }
                let v = if value != 0 {
                    value | (128 << 32) | VM86_TSS_UPDATED
                } else {
                    value
                };
                (param::VM86_TSS_SIZED, v)
            }
            param::VM86_TSS_SIZED => {
                if (value >> 32) < TSS32_LEN {
                    return Err(Errno::EINVAL);
                }
                let max = TSS32_LEN + 0x100 / 8 + 0x10000 / 8 + 1;
                let v = if (value >> 32) > max {
                    (value & 0xffff_ffff) | (max << 32)
                } else {
                    value
                };
                (idx, v | VM86_TSS_UPDATED)
            }
            // The PM timer block does not move in this VMM (pmtimer_change_ioport accepts only
            // the two known locations; we keep the default one).
            param::ACPI_IOPORTS_LOCATION => {
                if value > 1 {
                    return Err(Errno::EINVAL);
                }
                (idx, value)
            }
            _ => (idx, value),
        };
        self.params[idx as usize].store(value, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules_store_pfn_readable_not_writable() {
        assert_eq!(guest_may_get(param::STORE_PFN), Ok(()));
        assert_eq!(guest_may_set(param::STORE_PFN), Err(Errno::EPERM));
        assert_eq!(guest_may_set(param::STORE_EVTCHN), Ok(()));
    }

    #[test]
    fn access_rules_deprecated_einval_other_eperm() {
        assert_eq!(guest_may_get(param::DM_DOMAIN), Err(Errno::EINVAL));
        assert_eq!(guest_may_set(param::NESTEDHVM), Err(Errno::EINVAL));
        assert_eq!(guest_may_get(param::IDENT_PT), Err(Errno::EPERM));
        assert_eq!(guest_may_set(param::ACPI_S_STATE), Err(Errno::EPERM));
    }
}
