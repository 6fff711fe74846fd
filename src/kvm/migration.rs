//! Reading and writing the KVM state a save/restore moves: per vCPU the
//! registers, FPU/XSAVE, XCR0, events, debug registers, MSRs and LAPIC; per
//! VM the in-kernel PIC, IOAPIC and PIT. The conversion to and from Xen's
//! records is pure and lives in `crate::migration::convert`.

use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, kvm_xcr, kvm_xcrs, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};

use super::{Interrupts, KvmError, KvmVcpu, KvmVm};
use crate::migration::convert::{saved_msrs, KvmIoapic, KvmIrqchipState, KvmVcpuState};

/// A KVM state ioctl failed; says which and for what.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct KvmStateError {
    /// The ioctl and its object, e.g. `KVM_SET_LAPIC`.
    pub what: String,
    /// The errno.
    pub source: KvmError,
}

fn err(what: impl Into<String>) -> impl FnOnce(KvmError) -> KvmStateError {
    let what = what.into();
    move |source| KvmStateError { what, source }
}

impl KvmVcpu {
    /// Reads everything `migration::convert` needs. MSRs KVM does not
    /// know are left out (`saved_msrs` lists the candidates).
    pub fn save_state(&self) -> Result<KvmVcpuState, KvmStateError> {
        let regs = self.fd.get_regs().map_err(err("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        let fpu = self.fpu().map_err(err("KVM_GET_FPU"))?;
        let xsave = self.fd.get_xsave().ok().map(|x| {
            x.region
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect::<Vec<u8>>()
        });
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(err("KVM_GET_VCPU_EVENTS"))?;
        let debugregs = self.fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
        let mut msrs = Vec::new();
        for index in saved_msrs() {
            if let Some(v) = self.read_msr(index) {
                msrs.push((index, v));
            }
        }
        let lapic = self.fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        Ok(KvmVcpuState {
            regs,
            sregs,
            fpu,
            xcr0: if xsave.is_some() { self.xcr0() } else { 1 },
            xsave,
            events,
            debugregs,
            msrs,
            lapic: lapic.regs.iter().map(|b| *b as u8).collect(),
        })
    }

    /// Loads `s` into this vCPU (sregs before regs, MSRs with the TSC
    /// first, the LAPIC before events). An MSR KVM refuses is an error
    /// naming it.
    pub fn restore_state(&self, s: &KvmVcpuState) -> Result<(), KvmStateError> {
        self.fd.set_sregs(&s.sregs).map_err(err("KVM_SET_SREGS"))?;
        self.fd.set_regs(&s.regs).map_err(err("KVM_SET_REGS"))?;
        match &s.xsave {
            Some(area) => {
                let mut xcrs = kvm_xcrs {
                    nr_xcrs: 1,
                    ..Default::default()
                };
                xcrs.xcrs[0] = kvm_xcr {
                    xcr: 0,
                    value: s.xcr0,
                    ..Default::default()
                };
                self.fd.set_xcrs(&xcrs).map_err(err("KVM_SET_XCRS"))?;
                let n = area.len().min(4096);
                if !self.edit_xsave(&mut |b| b[..n].copy_from_slice(&area[..n])) {
                    return Err(KvmStateError {
                        what: "KVM_GET/SET_XSAVE".into(),
                        source: KvmError::new(libc::EIO),
                    });
                }
            }
            None => self.set_fpu(&s.fpu).map_err(err("KVM_SET_FPU"))?,
        }
        let mut order: Vec<&(u32, u64)> = s.msrs.iter().collect();
        order.sort_by_key(|(i, _)| *i != crate::migration::convert::msr::TSC);
        for (index, data) in order {
            let m = Msrs::from_entries(&[kvm_msr_entry {
                index: *index,
                data: *data,
                ..Default::default()
            }])
            .map_err(|_| KvmStateError {
                what: format!("MSR {index:#x}"),
                source: KvmError::new(libc::E2BIG),
            })?;
            match self.fd.set_msrs(&m) {
                Ok(1) => {}
                Ok(_) => {
                    return Err(KvmStateError {
                        what: format!("KVM_SET_MSRS refused MSR {index:#x} = {data:#x}"),
                        source: KvmError::new(libc::EINVAL),
                    })
                }
                Err(e) => return Err(err(format!("KVM_SET_MSRS {index:#x}"))(e)),
            }
        }
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        for (d, s) in lapic.regs.iter_mut().zip(s.lapic.iter()) {
            *d = *s as _;
        }
        self.fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }
}

impl KvmVm {
    /// Reads the in-kernel PIC, IOAPIC and PIT.
    pub fn save_irqchip(&self) -> Result<KvmIrqchipState, KvmStateError> {
        self.interrupts().save_irqchip()
    }

    /// Loads the PIC, IOAPIC and PIT.
    pub fn restore_irqchip(&self, s: &KvmIrqchipState) -> Result<(), KvmStateError> {
        self.interrupts().restore_irqchip(s)
    }
}

impl Interrupts {
    /// Reads the in-kernel PIC, IOAPIC and PIT.
    pub fn save_irqchip(&self) -> Result<KvmIrqchipState, KvmStateError> {
        let mut s = KvmIrqchipState::default();
        for (i, id) in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE]
            .into_iter()
            .enumerate()
        {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut c)
                .map_err(err("KVM_GET_IRQCHIP (PIC)"))?;
            // SAFETY: KVM filled the `pic` member for a PIC chip id.
            s.pic[i] = unsafe { c.chip.pic };
        }
        let mut c = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        self.vm
            .get_irqchip(&mut c)
            .map_err(err("KVM_GET_IRQCHIP (IOAPIC)"))?;
        // SAFETY: KVM filled the `ioapic` member for the IOAPIC chip id.
        let io = unsafe { c.chip.ioapic };
        let mut redirtbl = [0u64; 24];
        for (d, e) in redirtbl.iter_mut().zip(io.redirtbl.iter()) {
            // SAFETY: every redirection entry is a plain u64 (`bits`); the
            // other member is a bitfield view of the same bytes.
            *d = unsafe { e.bits };
        }
        s.ioapic = KvmIoapic {
            base_address: io.base_address,
            ioregsel: io.ioregsel,
            id: io.id,
            irr: io.irr,
            redirtbl,
        };
        s.pit = self.vm.get_pit2().map_err(err("KVM_GET_PIT2"))?;
        Ok(s)
    }

    /// Loads the PIC, IOAPIC and PIT.
    pub fn restore_irqchip(&self, s: &KvmIrqchipState) -> Result<(), KvmStateError> {
        for (i, id) in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE]
            .into_iter()
            .enumerate()
        {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            c.chip.pic = s.pic[i];
            self.vm
                .set_irqchip(&c)
                .map_err(err("KVM_SET_IRQCHIP (PIC)"))?;
        }
        let mut c = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        let mut io = kvm_bindings::kvm_ioapic_state {
            base_address: s.ioapic.base_address,
            ioregsel: s.ioapic.ioregsel,
            id: s.ioapic.id,
            irr: s.ioapic.irr,
            ..Default::default()
        };
        for (d, e) in io.redirtbl.iter_mut().zip(s.ioapic.redirtbl.iter()) {
            d.bits = *e;
        }
        c.chip.ioapic = io;
        self.vm
            .set_irqchip(&c)
            .map_err(err("KVM_SET_IRQCHIP (IOAPIC)"))?;
        self.vm.set_pit2(&s.pit).map_err(err("KVM_SET_PIT2"))?;
        Ok(())
    }
}
