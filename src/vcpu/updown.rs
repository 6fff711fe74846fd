//! The KVM side of `VCPUOP_initialise`, `VCPUOP_up` and `VCPUOP_down` for HVM vCPUs.
//!
//! - `VCPUOP_initialise` (checked by `hypercalls`) stages the new register state in the target
//!   vCPU's slot here ([`StartSlots`]); the vCPU stays down.
//! - `VCPUOP_up` marks the domain's vCPU up and kicks its thread. A vCPU that never ran sits
//!   in `KVM_RUN` waiting for INIT/SIPI in the in-kernel LAPIC; the kick brings it out, and at
//!   the top of its loop the thread takes the staged state and loads it itself ([`apply`]:
//!   `KVM_SET_SREGS`, `KVM_SET_REGS`, `KVM_SET_MP_STATE` runnable), since a vCPU's registers
//!   can only be set from outside while it is not in `KVM_RUN`. The kick sets
//!   `immediate_exit` before its signal, so a kick that lands just before the thread enters
//!   `KVM_RUN` still gets it out at once.
//! - `VCPUOP_down` kicks the thread; at its next pass through the loop the thread sees the
//!   vCPU down and parks in the VMM (runstate offline) until `VCPUOP_up` wakes it, then
//!   resumes where the guest was. A vCPU downed while blocked in `SCHEDOP_block`/`poll` stays
//!   blocked (as in Xen) and parks when the block ends.
//!
//! An AP started by INIT/SIPI drops any staged state (INIT resets a vCPU in Xen too). Not
//! handled: INIT/SIPI sent to a vCPU parked by `VCPUOP_down` (the in-kernel LAPIC acts on it
//! only inside `KVM_RUN`; Linux's HVM CPU hotplug does not mix the two).

use kvm_bindings::kvm_segment;
use parking_lot::Mutex;

use hypercalls::{HvmSegment, HvmVcpuState};

use crate::kvm::{KvmError, KvmVcpu};

/// One slot per vCPU for the state `VCPUOP_initialise` gave it.
pub struct StartSlots(Vec<Mutex<Option<HvmVcpuState>>>);

impl StartSlots {
    pub fn new(vcpus: u32) -> Self {
        StartSlots((0..vcpus).map(|_| Mutex::new(None)).collect())
    }

    /// Keep `state` for `vcpu` (replacing a state it never used).
    pub fn stage(&self, vcpu: u32, state: HvmVcpuState) {
        if let Some(s) = self.0.get(vcpu as usize) {
            *s.lock() = Some(state);
        }
    }

    /// Take the staged state of `vcpu`, if any.
    pub fn take(&self, vcpu: u32) -> Option<HvmVcpuState> {
        self.0.get(vcpu as usize).and_then(|s| s.lock().take())
    }

    /// Whether `vcpu` has a staged state.
    pub fn is_staged(&self, vcpu: u32) -> bool {
        self.0
            .get(vcpu as usize)
            .is_some_and(|s| s.lock().is_some())
    }
}

/// A segment in KVM's form: Xen loads selector 0; attributes in Xen's `_ar` layout.
pub fn kvm_seg(s: &HvmSegment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: 0,
        type_: s.seg_type(),
        present: u8::from(s.present()),
        dpl: s.dpl(),
        db: u8::from(s.db()),
        s: u8::from(s.s()),
        l: u8::from(s.l()),
        g: u8::from(s.g()),
        avl: u8::from(s.avl()),
        unusable: u8::from(!s.present()),
        padding: 0,
    }
}

/// Loads `st` into the calling thread's vCPU and makes it runnable (out of the wait for
/// INIT/SIPI). Registers the state does not name keep their values.
pub fn apply(fd: &KvmVcpu, st: &HvmVcpuState) -> Result<(), KvmError> {
    let mut sregs = fd.sregs()?;
    sregs.cs = kvm_seg(&st.cs);
    sregs.ds = kvm_seg(&st.ds);
    sregs.ss = kvm_seg(&st.ss);
    sregs.es = kvm_seg(&st.es);
    sregs.tr = kvm_seg(&st.tr);
    sregs.cr0 = st.cr0;
    sregs.cr3 = st.cr3;
    sregs.cr4 = st.cr4;
    sregs.efer = st.efer;
    fd.set_sregs(&sregs)?;
    let mut regs = fd.regs()?;
    regs.rax = st.rax;
    regs.rcx = st.rcx;
    regs.rdx = st.rdx;
    regs.rbx = st.rbx;
    regs.rsp = st.rsp;
    regs.rbp = st.rbp;
    regs.rsi = st.rsi;
    regs.rdi = st.rdi;
    regs.rip = st.rip;
    regs.rflags = st.rflags | 2;
    fd.set_regs(&regs)?;
    fd.set_runnable()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_seg_long_mode_code_and_busy_tss() {
        let cs = kvm_seg(&HvmSegment {
            base: 0,
            limit: !0,
            attr: 0xa9b,
        });
        assert_eq!(
            (cs.type_, cs.s, cs.present, cs.l, cs.db, cs.g),
            (11, 1, 1, 1, 0, 1)
        );
        assert_eq!((cs.dpl, cs.unusable, cs.selector), (0, 0, 0));
        let tr = kvm_seg(&HvmSegment {
            base: 0,
            limit: 0x67,
            attr: 0x8b,
        });
        assert_eq!(
            (tr.type_, tr.s, tr.present, tr.g, tr.limit),
            (11, 0, 1, 0, 0x67)
        );
        let null = kvm_seg(&HvmSegment::default());
        assert_eq!((null.present, null.unusable), (0, 1));
        let dpl3 = kvm_seg(&HvmSegment {
            base: 0x1000,
            limit: 0xffff,
            attr: 0x1f3,
        });
        assert_eq!(
            (dpl3.dpl, dpl3.avl, dpl3.base, dpl3.type_),
            (3, 1, 0x1000, 3)
        );
    }

    #[test]
    fn start_slots_take_once() {
        let s = StartSlots::new(2);
        assert!(!s.is_staged(1));
        let st = HvmVcpuState {
            rax: 1,
            rcx: 0,
            rdx: 0,
            rbx: 0,
            rsp: 0,
            rbp: 0,
            rsi: 0,
            rdi: 0,
            rip: 0x1000,
            rflags: 2,
            cr0: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            cs: HvmSegment::default(),
            ds: HvmSegment::default(),
            ss: HvmSegment::default(),
            es: HvmSegment::default(),
            tr: HvmSegment::default(),
        };
        s.stage(1, st);
        s.stage(7, st);
        assert!(s.is_staged(1));
        assert_eq!(s.take(1), Some(st));
        assert_eq!(s.take(1), None);
        assert_eq!(s.take(7), None);
    }
}
