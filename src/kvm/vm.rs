//! The VM file descriptor and what the VMM does with it: creation with the
//! capabilities xenkvm needs, the MSR filter, memslots (RAM and overlay
//! holes, with an allocator checked against KVM's slot limit), interrupt
//! injection (MSI to a vCPU's LAPIC, GSI pulses, irqfds) and vCPU creation.

use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_msi, kvm_pit_config, kvm_userspace_memory_region,
    KVM_CAP_X86_USER_SPACE_MSR, KVM_MAX_CPUID_ENTRIES, KVM_MSR_EXIT_REASON_FILTER,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use parking_lot::Mutex;
use vmm_sys_util::eventfd::EventFd;

use super::vcpu::{KvmError, KvmVcpu};
use crate::arch::x86::cpuid::CpuidEntry;

/// Why the VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KvmVmError {
    #[error("cannot open {0}: {1} (is KVM available and are you allowed to use it?)")]
    Open(String, KvmError),
    #[error("{0} is not a KVM device (KVM_GET_API_VERSION gave {1}, not 12)")]
    NotKvm(String, i32),
    #[error("KVM lacks {0}, which xenkvm needs")]
    MissingCap(&'static str),
    #[error("KVM ioctl {0} failed: {1}")]
    Ioctl(&'static str, KvmError),
    #[error("out of KVM memslots ({0} in use)")]
    NoSlot(usize),
}

fn ioctl(what: &'static str) -> impl Fn(KvmError) -> KvmVmError {
    move |e| KvmVmError::Ioctl(what, e)
}

/// Opens `path` (normally `/dev/kvm`) and checks that it is KVM: a device
/// that answers no KVM ioctl would otherwise look like a KVM lacking every
/// capability.
pub fn open_kvm_at(path: &std::ffi::CStr) -> Result<Kvm, KvmVmError> {
    let name = || path.to_string_lossy().into_owned();
    let kvm = Kvm::new_with_path(path).map_err(|e| KvmVmError::Open(name(), e))?;
    match kvm.get_api_version() {
        12 => Ok(kvm),
        v => Err(KvmVmError::NotKvm(name(), v)),
    }
}

/// [`open_kvm_at`] `/dev/kvm`.
pub fn open_kvm() -> Result<Kvm, KvmVmError> {
    open_kvm_at(c"/dev/kvm")
}

/// A created VM.
pub struct KvmVm {
    kvm: Kvm,
    pub(super) vm: Arc<VmFd>,
    slots: Arc<MemSlots>,
}

impl KvmVm {
    /// Opens KVM, checks the capabilities xenkvm needs and creates a VM
    /// with the in-kernel irqchip and PIT, and user-space exits for the MSR
    /// accesses in `traps` (all other MSRs stay in KVM).
    pub fn create(traps: &[MsrTrap]) -> Result<KvmVm, KvmVmError> {
        let kvm = open_kvm()?;
        for (cap, name) in [
            (Cap::Irqchip, "an in-kernel irqchip"),
            (Cap::X86UserSpaceMsr, "user-space MSR exits"),
            (Cap::X86MsrFilter, "MSR filters"),
            (Cap::SyncRegs, "sync regs"),
            (Cap::VcpuEvents, "vCPU events"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmVmError::MissingCap(name));
            }
        }
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        // Intel-only areas; harmless elsewhere. They sit in the MMIO hole.
        let _ = vm.set_tss_address(0xfffb_d000);
        let _ = vm.set_identity_map_address(0xfffb_c000);
        vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        enable_msr_exits(&vm, traps)?;
        let limit = kvm.get_nr_memslots();
        let vm = Arc::new(vm);
        Ok(KvmVm {
            slots: Arc::new(MemSlots {
                vm: vm.clone(),
                used: Mutex::new(Vec::new()),
                limit,
                regions: Mutex::new(std::collections::HashMap::new()),
            }),
            kvm,
            vm,
        })
    }

    /// The memslot allocator.
    pub fn slots(&self) -> Arc<MemSlots> {
        self.slots.clone()
    }

    /// The interrupt sink.
    pub fn interrupts(&self) -> Interrupts {
        Interrupts {
            vm: self.vm.clone(),
        }
    }

    /// The CPUID entries KVM supports on this host.
    pub fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>, KvmVmError> {
        let c = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(c.as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect())
    }

    /// Size of a vCPU's `kvm_run` mapping.
    pub fn vcpu_mmap_size(&self) -> usize {
        self.kvm.get_vcpu_mmap_size().unwrap_or(4096)
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u32) -> Result<KvmVcpu, KvmVmError> {
        let fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        Ok(KvmVcpu::new(fd))
    }

    /// Makes a write to `fd` raise `gsi` (level pulse) in the in-kernel irqchip.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), KvmVmError> {
        self.vm.register_irqfd(fd, gsi).map_err(ioctl("KVM_IRQFD"))
    }
}

/// MSR accesses that exit to the VMM: `count` MSRs from `base`, writes, and
/// reads too if `reads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsrTrap {
    pub base: u32,
    pub count: u32,
    pub reads: bool,
}

/// Enables user-space exits for the accesses in `traps` only.
fn enable_msr_exits(vm: &VmFd, traps: &[MsrTrap]) -> Result<(), KvmVmError> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER);
    vm.enable_cap(&cap)
        .map_err(ioctl("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
    // A zero bit denies the access, which the cap turns into an exit.
    let bitmaps: Vec<Vec<u8>> = traps
        .iter()
        .map(|t| vec![0u8; (t.count as usize).div_ceil(8)])
        .collect();
    let ranges: Vec<MsrFilterRange> = traps
        .iter()
        .zip(&bitmaps)
        .map(|(t, bitmap)| MsrFilterRange {
            flags: if t.reads {
                MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE
            } else {
                MsrFilterRangeFlags::WRITE
            },
            base: t.base,
            msr_count: t.count,
            bitmap,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(ioctl("KVM_X86_SET_MSR_FILTER"))
}

/// Interrupt injection into the in-kernel irqchip, for the Xen glue and
/// the devices.
#[derive(Clone)]
pub struct Interrupts {
    pub(super) vm: Arc<VmFd>,
}

impl Interrupts {
    /// Sends `vector` (or an NMI) to `vcpu`'s LAPIC: an MSI with fixed
    /// delivery, physical destination = APIC id = vCPU id.
    pub fn msi(&self, vcpu: u32, vector: u8, nmi: bool) -> Result<(), KvmError> {
        let msi = kvm_msi {
            address_lo: 0xfee0_0000 | (vcpu << 12),
            address_hi: 0,
            data: if nmi { 0x400 } else { u32::from(vector) },
            ..Default::default()
        };
        self.vm.signal_msi(msi).map(|_| ())
    }

    /// Raises and lowers `gsi` (an edge on a level line).
    pub fn pulse_gsi(&self, gsi: u32) -> Result<(), KvmError> {
        self.vm.set_irq_line(gsi, true)?;
        self.vm.set_irq_line(gsi, false)
    }
}

/// KVM memslots: the RAM regions at start, overlay pages in holes later.
/// Refuses to go past KVM's limit instead of failing in the ioctl.
pub struct MemSlots {
    pub(super) vm: Arc<VmFd>,
    /// Slots in use (index = slot number).
    pub(super) used: Mutex<Vec<bool>>,
    limit: usize,
    /// Each slot's region as last set (for `dirty`'s flag changes).
    pub(super) regions: Mutex<std::collections::HashMap<u32, kvm_userspace_memory_region>>,
}

impl MemSlots {
    /// Maps `size` bytes at host address `host` to guest-physical `gpa` in a
    /// new slot and returns the slot.
    ///
    /// # Safety
    /// `host..host+size` must stay mapped until [`MemSlots::remove`] for the
    /// returned slot (or until the VM is gone).
    pub unsafe fn insert(&self, gpa: u64, size: u64, host: u64) -> Result<u32, KvmVmError> {
        let mut used = self.used.lock();
        let slot = match used.iter().position(|u| !u) {
            Some(s) => s,
            None if used.len() < self.limit => {
                used.push(false);
                used.len() - 1
            }
            None => return Err(KvmVmError::NoSlot(used.len())),
        };
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the caller keeps the host range mapped while the slot
        // exists (this function's contract).
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        used[slot] = true;
        self.regions.lock().insert(slot as u32, region);
        Ok(slot as u32)
    }

    /// Deletes `slot`.
    pub fn remove(&self, slot: u32) -> Result<(), KvmVmError> {
        let mut used = self.used.lock();
        if !used.get(slot as usize).copied().unwrap_or(false) {
            return Ok(());
        }
        let region = kvm_userspace_memory_region {
            slot,
            memory_size: 0,
            ..Default::default()
        };
        // SAFETY: deleting a slot (size 0) maps nothing new.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        used[slot as usize] = false;
        self.regions.lock().remove(&slot);
        Ok(())
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.used.lock().iter().filter(|u| **u).count()
    }
}
