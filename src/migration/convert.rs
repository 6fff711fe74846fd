//! KVM vCPU and irqchip state <-> Xen's `HVM_CONTEXT` records.
//!
//! The inputs and outputs are `kvm_bindings` structs (plain data); the
//! ioctls that fill and apply them live in `src/kvm/` (`kvm::migration`).
//! What one side has and the other cannot hold is refused by name
//! ([`ConvertError`]) or, where it is harmless, logged and dropped; the
//! module doc of each function says which.
//!
//! Numbering: Xen's APIC IDs are `2 * vcpu_id` (`LAPIC_REGS` ID register);
//! xenkvm's KVM vCPUs have APIC ID = vCPU id. Xen's IOAPIC has 48 pins,
//! KVM's in-kernel one 24: pins 24-47 must be masked and idle to restore.

use kvm_bindings::{
    kvm_debugregs, kvm_dtable, kvm_fpu, kvm_pic_state, kvm_pit_state2, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, KVM_PIT_FLAGS_SPEAKER_DATA_ON,
};

use super::hvm_context::{
    code, type_name, HvmCpu, HvmRecord, IoApic, Lapic, Mtrr, Pic, Pit, PitChannel, Seg, Xsave,
    VIOAPIC_NUM_PINS, XEN_X86_FPU_INITIALISED,
};

/// Why state cannot be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A record or field has no KVM (or Xen) counterpart.
    #[error("HVM_CONTEXT record {record} instance {instance}: {why}")]
    Unrepresentable {
        /// save.h record name.
        record: String,
        /// Instance.
        instance: u16,
        /// What cannot be represented.
        why: String,
    },
    /// A record the restore needs is absent.
    #[error("HVM_CONTEXT has no {record} record for vCPU {vcpu}")]
    Missing {
        /// save.h record name.
        record: &'static str,
        /// vCPU.
        vcpu: u16,
    },
}

fn unrep(t: u16, instance: u16, why: impl Into<String>) -> ConvertError {
    ConvertError::Unrepresentable {
        record: type_name(t),
        instance,
        why: why.into(),
    }
}

/// MSR numbers.
pub mod msr {
    /// IA32_TSC
    pub const TSC: u32 = 0x10;
    /// IA32_TSC_ADJUST
    pub const TSC_ADJUST: u32 = 0x3B;
    /// IA32_SPEC_CTRL
    pub const SPEC_CTRL: u32 = 0x48;
    /// MTRRcap
    pub const MTRR_CAP: u32 = 0xFE;
    /// SYSENTER_CS
    pub const SYSENTER_CS: u32 = 0x174;
    /// SYSENTER_ESP
    pub const SYSENTER_ESP: u32 = 0x175;
    /// SYSENTER_EIP
    pub const SYSENTER_EIP: u32 = 0x176;
    /// First variable-range MTRR (base 0, mask 0, base 1, ...).
    pub const MTRR_VAR0: u32 = 0x200;
    /// Fixed-range MTRRs in save.h order.
    pub const MTRR_FIXED: [u32; 11] = [
        0x250, 0x258, 0x259, 0x268, 0x269, 0x26A, 0x26B, 0x26C, 0x26D, 0x26E, 0x26F,
    ];
    /// PAT
    pub const PAT: u32 = 0x277;
    /// MTRRdefType
    pub const MTRR_DEF_TYPE: u32 = 0x2FF;
    /// TSC_DEADLINE
    pub const TSC_DEADLINE: u32 = 0x6E0;
    /// STAR
    pub const STAR: u32 = 0xC000_0081;
    /// LSTAR
    pub const LSTAR: u32 = 0xC000_0082;
    /// CSTAR
    pub const CSTAR: u32 = 0xC000_0083;
    /// SFMASK
    pub const SFMASK: u32 = 0xC000_0084;
    /// KERNEL_GS_BASE
    pub const KERNEL_GS_BASE: u32 = 0xC000_0102;
    /// TSC_AUX
    pub const TSC_AUX: u32 = 0xC000_0103;
}

/// MSRs a save reads from KVM (those KVM refuses are left out).
pub fn saved_msrs() -> Vec<u32> {
    let mut v = vec![
        msr::TSC,
        msr::TSC_ADJUST,
        msr::SPEC_CTRL,
        msr::MTRR_CAP,
        msr::SYSENTER_CS,
        msr::SYSENTER_ESP,
        msr::SYSENTER_EIP,
        msr::PAT,
        msr::MTRR_DEF_TYPE,
        msr::TSC_DEADLINE,
        msr::STAR,
        msr::LSTAR,
        msr::CSTAR,
        msr::SFMASK,
        msr::KERNEL_GS_BASE,
        msr::TSC_AUX,
    ];
    v.extend(msr::MTRR_VAR0..msr::MTRR_VAR0 + 16);
    v.extend(msr::MTRR_FIXED);
    v
}

/// MSRs that travel in save.h's CPU_MSR record (the rest have their own fields).
const CPU_MSR_RECORD: &[u32] = &[msr::SPEC_CTRL];

/// One vCPU's KVM state, as `src/kvm/` reads and writes it.
#[derive(Debug, Clone, Default)]
pub struct KvmVcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87/SSE state (used when there is no XSAVE area).
    pub fpu: kvm_fpu,
    /// The standard-format XSAVE area (KVM_GET_XSAVE, 4096 bytes), if any.
    pub xsave: Option<Vec<u8>>,
    /// XCR0.
    pub xcr0: u64,
    /// Pending exception/interrupt/NMI state.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// (index, value) of the MSRs in [`saved_msrs`] that KVM returned.
    pub msrs: Vec<(u32, u64)>,
    /// The LAPIC register page (KVM_GET_LAPIC).
    pub lapic: Vec<u8>,
}

/// What `hvm_hw_cpu` cannot hold about a vCPU's events; travels in
/// xenkvm's own record ([`super::xenkvm_records`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventsExtra {
    /// NMIs blocked (an NMI handler is running).
    pub nmi_masked: bool,
    /// An NMI is pending (not yet injected).
    pub nmi_pending: bool,
    /// STI/MOV SS interrupt shadow.
    pub interrupt_shadow: u8,
}

fn seg_to_xen(s: &kvm_segment) -> Seg {
    let p = s.present != 0 && s.unusable == 0;
    Seg {
        sel: u32::from(s.selector),
        limit: s.limit,
        base: s.base,
        arbytes: u32::from(s.type_ & 0xF)
            | u32::from(s.s & 1) << 4
            | u32::from(s.dpl & 3) << 5
            | u32::from(p) << 7
            | u32::from(s.avl & 1) << 8
            | u32::from(s.l & 1) << 9
            | u32::from(s.db & 1) << 10
            | u32::from(s.g & 1) << 11,
    }
}

fn seg_to_kvm(s: &Seg) -> kvm_segment {
    let a = s.arbytes;
    let bit = |n: u32| ((a >> n) & 1) as u8;
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.sel as u16,
        type_: (a & 0xF) as u8,
        s: bit(4),
        dpl: ((a >> 5) & 3) as u8,
        present: bit(7),
        avl: bit(8),
        l: bit(9),
        db: bit(10),
        g: bit(11),
        unusable: 1 - bit(7),
        padding: 0,
    }
}

/// The FXSAVE image of a `kvm_fpu` (64-bit format).
pub fn fxsave_from_kvm(f: &kvm_fpu) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    b[4] = f.ftwx;
    b[6..8].copy_from_slice(&f.last_opcode.to_le_bytes());
    b[8..16].copy_from_slice(&f.last_ip.to_le_bytes());
    b[16..24].copy_from_slice(&f.last_dp.to_le_bytes());
    b[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    b[28..32].copy_from_slice(&0xFFFFu32.to_le_bytes());
    for (i, r) in f.fpr.iter().enumerate() {
        b[32 + 16 * i..48 + 16 * i].copy_from_slice(r);
    }
    for (i, r) in f.xmm.iter().enumerate() {
        b[160 + 16 * i..176 + 16 * i].copy_from_slice(r);
    }
    b
}

/// A `kvm_fpu` from an FXSAVE image.
pub fn fxsave_to_kvm(b: &[u8; 512]) -> kvm_fpu {
    let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64at = |o: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(x)
    };
    let mut f = kvm_fpu {
        fcw: u16at(0),
        fsw: u16at(2),
        ftwx: b[4],
        last_opcode: u16at(6),
        last_ip: u64at(8),
        last_dp: u64at(16),
        mxcsr: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
        ..kvm_fpu::default()
    };
    for (i, r) in f.fpr.iter_mut().enumerate() {
        r.copy_from_slice(&b[32 + 16 * i..48 + 16 * i]);
    }
    for (i, r) in f.xmm.iter_mut().enumerate() {
        r.copy_from_slice(&b[160 + 16 * i..176 + 16 * i]);
    }
    f
}

/// VMX entry-info event types as `hvm_hw_cpu.pending_event` uses them.
mod ev {
    pub const EXT_INTR: u32 = 0;
    pub const NMI: u32 = 2;
    pub const HW_EXCEPTION: u32 = 3;
    pub const SW_INTR: u32 = 4;
    pub const SW_EXCEPTION: u32 = 6;
    pub const ERROR_VALID: u32 = 1 << 11;
    pub const VALID: u32 = 1 << 31;
}

/// KVM events -> (pending_event, error_code, the rest).
pub fn events_to_xen(
    e: &kvm_vcpu_events,
    vcpu: u16,
) -> Result<(u32, u32, EventsExtra), ConvertError> {
    let mut pending = Vec::new();
    if e.exception.injected != 0 || e.exception.pending != 0 {
        let nr = u32::from(e.exception.nr);
        let t = if nr == 3 || nr == 4 {
            ev::SW_EXCEPTION
        } else {
            ev::HW_EXCEPTION
        };
        let err = if e.exception.has_error_code != 0 {
            ev::ERROR_VALID
        } else {
            0
        };
        pending.push((
            "exception",
            ev::VALID | err | t << 8 | nr,
            e.exception.error_code,
        ));
    }
    if e.nmi.injected != 0 {
        pending.push(("NMI", ev::VALID | ev::NMI << 8 | 2, 0));
    }
    if e.interrupt.injected != 0 {
        let t = if e.interrupt.soft != 0 {
            ev::SW_INTR
        } else {
            ev::EXT_INTR
        };
        pending.push((
            "interrupt",
            ev::VALID | t << 8 | u32::from(e.interrupt.nr),
            0,
        ));
    }
    if pending.len() > 1 {
        let names: Vec<_> = pending.iter().map(|p| p.0).collect();
        return Err(unrep(
            code::CPU,
            vcpu,
            format!(
                "{} events in flight at once ({}); hvm_hw_cpu holds one",
                pending.len(),
                names.join(", ")
            ),
        ));
    }
    if e.smi.smm != 0 || e.smi.pending != 0 {
        return Err(unrep(code::CPU, vcpu, "the vCPU is in or entering SMM"));
    }
    let (pe, err) = pending.first().map(|p| (p.1, p.2)).unwrap_or((0, 0));
    Ok((
        pe,
        err,
        EventsExtra {
            nmi_masked: e.nmi.masked != 0,
            nmi_pending: e.nmi.pending != 0,
            interrupt_shadow: e.interrupt.shadow,
        },
    ))
}

/// pending_event -> KVM events.
pub fn events_to_kvm(
    pe: u32,
    err: u32,
    extra: &EventsExtra,
    vcpu: u16,
) -> Result<kvm_vcpu_events, ConvertError> {
    let mut e = kvm_vcpu_events::default();
    e.nmi.masked = u8::from(extra.nmi_masked);
    e.nmi.pending = u8::from(extra.nmi_pending);
    e.interrupt.shadow = extra.interrupt_shadow;
    // KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW
    e.flags = 0x1 | 0x4;
    if pe & ev::VALID == 0 {
        return Ok(e);
    }
    let nr = (pe & 0xFF) as u8;
    match (pe >> 8) & 7 {
        ev::EXT_INTR | ev::SW_INTR => {
            e.interrupt.injected = 1;
            e.interrupt.nr = nr;
            e.interrupt.soft = u8::from((pe >> 8) & 7 == ev::SW_INTR);
        }
        ev::NMI => e.nmi.injected = 1,
        ev::HW_EXCEPTION | ev::SW_EXCEPTION | 5 => {
            e.exception.injected = 1;
            e.exception.nr = nr;
            e.exception.has_error_code = u8::from(pe & ev::ERROR_VALID != 0);
            e.exception.error_code = err;
        }
        t => {
            return Err(unrep(
                code::CPU,
                vcpu,
                format!("pending event {pe:#x} has type {t}, which KVM cannot inject"),
            ))
        }
    }
    Ok(e)
}

fn msr_of(m: &[(u32, u64)], idx: u32) -> u64 {
    m.iter()
        .find(|(i, _)| *i == idx)
        .map(|(_, v)| *v)
        .unwrap_or(0)
}

/// Bytes the standard-format XSAVE area needs for the features in `xcr0`
/// (offsets and sizes of CPUID leaf 0xD, fixed for these features).
pub fn xsave_size(xcr0: u64) -> Result<usize, String> {
    const FEATURES: &[(u32, usize, usize)] = &[
        (2, 576, 256),    // AVX
        (3, 960, 64),     // MPX BNDREGS
        (4, 1024, 64),    // MPX BNDCSR
        (5, 1088, 64),    // AVX-512 opmask
        (6, 1152, 512),   // ZMM_Hi256
        (7, 1664, 1024),  // Hi16_ZMM
        (9, 2688, 8),     // PKRU
        (17, 2752, 64),   // AMX TILECFG
        (18, 2816, 8192), // AMX TILEDATA
    ];
    let mut size = 576;
    for bit in 2..64u32 {
        if xcr0 & (1 << bit) == 0 {
            continue;
        }
        let Some((_, off, len)) = FEATURES.iter().find(|f| f.0 == bit) else {
            return Err(format!(
                "XCR0 bit {bit} is a state component xenkvm does not know"
            ));
        };
        size = size.max(off + len);
    }
    Ok(size)
}

/// Converts one vCPU. Returns the records (CPU, LAPIC, LAPIC_REGS, MTRR,
/// CPU_XSAVE if KVM gave an XSAVE area, TSC_ADJUST, CPU_MSR) and what
/// `hvm_hw_cpu` has no room for.
pub fn vcpu_to_records(
    vcpu: u16,
    s: &KvmVcpuState,
) -> Result<(Vec<HvmRecord>, EventsExtra), ConvertError> {
    let r = &s.regs;
    let sr = &s.sregs;
    let m = &s.msrs;
    let (pending_event, error_code, extra) = events_to_xen(&s.events, vcpu)?;
    let mut fpu_regs = fxsave_from_kvm(&s.fpu);
    if let Some(x) = &s.xsave {
        if let Some(legacy) = x.get(..512) {
            fpu_regs.copy_from_slice(legacy);
        }
    }
    let cpu = HvmCpu {
        fpu_regs,
        gprs: [
            r.rax, r.rbx, r.rcx, r.rdx, r.rbp, r.rsi, r.rdi, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        rip: r.rip,
        rflags: r.rflags,
        cr: [sr.cr0, sr.cr2, sr.cr3, sr.cr4],
        dr: s.debugregs.db,
        dr6: s.debugregs.dr6,
        dr7: s.debugregs.dr7,
        segs: [
            &sr.cs, &sr.ds, &sr.es, &sr.fs, &sr.gs, &sr.ss, &sr.tr, &sr.ldt,
        ]
        .map(seg_to_xen),
        idtr: (u32::from(sr.idt.limit), sr.idt.base),
        gdtr: (u32::from(sr.gdt.limit), sr.gdt.base),
        sysenter: [
            msr_of(m, msr::SYSENTER_CS),
            msr_of(m, msr::SYSENTER_ESP),
            msr_of(m, msr::SYSENTER_EIP),
        ],
        shadow_gs: msr_of(m, msr::KERNEL_GS_BASE),
        msr_flags: 0,
        msr_lstar: msr_of(m, msr::LSTAR),
        msr_star: msr_of(m, msr::STAR),
        msr_cstar: msr_of(m, msr::CSTAR),
        msr_syscall_mask: msr_of(m, msr::SFMASK),
        msr_efer: sr.efer,
        msr_tsc_aux: msr_of(m, msr::TSC_AUX),
        tsc: msr_of(m, msr::TSC),
        pending_event,
        error_code,
        flags: XEN_X86_FPU_INITIALISED,
    };
    let mut out = vec![HvmRecord::Cpu(vcpu, Box::new(cpu))];

    // LAPIC: the register page with Xen's APIC ID (2 * vcpu).
    let mut regs = [0u8; 1024];
    let n = s.lapic.len().min(1024);
    regs[..n].copy_from_slice(&s.lapic[..n]);
    let x2apic = sr.apic_base & (1 << 10) != 0;
    let xen_id = 2 * u32::from(vcpu);
    let id_reg = if x2apic { xen_id } else { xen_id << 24 };
    regs[0x20..0x24].copy_from_slice(&id_reg.to_le_bytes());
    let reg = |o: usize| u32::from_le_bytes([regs[o], regs[o + 1], regs[o + 2], regs[o + 3]]);
    let tdcr = reg(0x3E0) & 0xB;
    let sw_disabled = reg(0xF0) & (1 << 8) == 0;
    let hw_disabled = sr.apic_base & (1 << 11) == 0;
    out.push(HvmRecord::Lapic(
        vcpu,
        Lapic {
            apic_base_msr: sr.apic_base,
            disabled: u32::from(sw_disabled) | u32::from(hw_disabled) << 1,
            timer_divisor: 1 << ((((tdcr & 3) | ((tdcr & 8) >> 1)) + 1) & 7),
            tdt_msr: msr_of(m, msr::TSC_DEADLINE),
        },
    ));
    out.push(HvmRecord::LapicRegs(vcpu, Box::new(regs)));

    let mut mtrr = Mtrr {
        pat: msr_of(m, msr::PAT),
        cap: msr_of(m, msr::MTRR_CAP),
        def_type: msr_of(m, msr::MTRR_DEF_TYPE),
        ..Mtrr::default()
    };
    for (i, v) in mtrr.var.iter_mut().enumerate() {
        *v = msr_of(m, msr::MTRR_VAR0 + i as u32);
    }
    for (i, v) in mtrr.fixed.iter_mut().enumerate() {
        *v = msr_of(m, msr::MTRR_FIXED[i]);
    }
    out.push(HvmRecord::Mtrr(vcpu, Box::new(mtrr)));

    if let Some(x) = &s.xsave {
        let size = xsave_size(s.xcr0).map_err(|w| unrep(code::CPU_XSAVE, vcpu, w))?;
        let mut area = x.get(..size.min(x.len())).unwrap_or_default().to_vec();
        area.resize(size, 0);
        out.push(HvmRecord::Xsave(
            vcpu,
            Xsave {
                xfeature_mask: s.xcr0,
                xcr0: s.xcr0,
                xcr0_accum: s.xcr0,
                area,
            },
        ));
    }
    out.push(HvmRecord::TscAdjust(vcpu, msr_of(m, msr::TSC_ADJUST)));
    let msrs: Vec<(u32, u64)> = m
        .iter()
        .filter(|(i, _)| CPU_MSR_RECORD.contains(i))
        .copied()
        .collect();
    if !msrs.is_empty() {
        out.push(HvmRecord::CpuMsr(vcpu, msrs));
    }
    Ok((out, extra))
}

/// Converts the records of vCPU `vcpu` back to KVM state. CPU, LAPIC and
/// LAPIC_REGS are required; the others are optional (as in old Xen streams).
pub fn vcpu_from_records(
    vcpu: u16,
    recs: &[HvmRecord],
    extra: &EventsExtra,
) -> Result<KvmVcpuState, ConvertError> {
    let mut cpu = None;
    let mut lapic = None;
    let mut lapic_regs = None;
    let mut mtrr = None;
    let mut xsave = None;
    let mut tsc_adjust = None;
    let mut cpu_msrs: Vec<(u32, u64)> = Vec::new();
    for r in recs.iter().filter(|r| r.instance() == vcpu) {
        match r {
            HvmRecord::Cpu(_, c) => cpu = Some(c),
            HvmRecord::Lapic(_, l) => lapic = Some(l),
            HvmRecord::LapicRegs(_, l) => lapic_regs = Some(l),
            HvmRecord::Mtrr(_, x) => mtrr = Some(x),
            HvmRecord::Xsave(_, x) => xsave = Some(x),
            HvmRecord::TscAdjust(_, x) => tsc_adjust = Some(*x),
            HvmRecord::CpuMsr(_, ms) => cpu_msrs.extend(ms),
            _ => {}
        }
    }
    let c = cpu.ok_or(ConvertError::Missing {
        record: "CPU",
        vcpu,
    })?;
    let l = lapic.ok_or(ConvertError::Missing {
        record: "LAPIC",
        vcpu,
    })?;
    let lr = lapic_regs.ok_or(ConvertError::Missing {
        record: "LAPIC_REGS",
        vcpu,
    })?;
    let g = &c.gprs;
    let regs = kvm_regs {
        rax: g[0],
        rbx: g[1],
        rcx: g[2],
        rdx: g[3],
        rbp: g[4],
        rsi: g[5],
        rdi: g[6],
        rsp: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: c.rip,
        rflags: c.rflags,
    };
    let segs = c.segs.each_ref().map(seg_to_kvm);
    let mut tr = segs[6];
    tr.unusable = 0; // TR is never unusable to KVM
    let sregs = kvm_sregs {
        cs: segs[0],
        ds: segs[1],
        es: segs[2],
        fs: segs[3],
        gs: segs[4],
        ss: segs[5],
        tr,
        ldt: segs[7],
        idt: kvm_dtable {
            base: c.idtr.1,
            limit: c.idtr.0 as u16,
            ..Default::default()
        },
        gdt: kvm_dtable {
            base: c.gdtr.1,
            limit: c.gdtr.0 as u16,
            ..Default::default()
        },
        cr0: c.cr[0],
        cr2: c.cr[1],
        cr3: c.cr[2],
        cr4: c.cr[3],
        cr8: u64::from(lr[0x80] >> 4), // TPR[7:4]
        efer: c.msr_efer,
        apic_base: l.apic_base_msr,
        interrupt_bitmap: [0; 4],
    };
    if c.idtr.0 > 0xFFFF || c.gdtr.0 > 0xFFFF {
        return Err(unrep(
            code::CPU,
            vcpu,
            "a descriptor-table limit above 0xFFFF",
        ));
    }
    let events = events_to_kvm(c.pending_event, c.error_code, extra, vcpu)?;
    let mut msrs = vec![
        (msr::SYSENTER_CS, c.sysenter[0]),
        (msr::SYSENTER_ESP, c.sysenter[1]),
        (msr::SYSENTER_EIP, c.sysenter[2]),
        (msr::KERNEL_GS_BASE, c.shadow_gs),
        (msr::STAR, c.msr_star),
        (msr::LSTAR, c.msr_lstar),
        (msr::CSTAR, c.msr_cstar),
        (msr::SFMASK, c.msr_syscall_mask),
        (msr::TSC_AUX, c.msr_tsc_aux),
        (msr::TSC, c.tsc),
        (msr::TSC_DEADLINE, l.tdt_msr),
    ];
    if let Some(m) = mtrr {
        msrs.push((msr::PAT, m.pat));
        msrs.push((msr::MTRR_DEF_TYPE, m.def_type));
        msrs.extend(
            m.var
                .iter()
                .enumerate()
                .map(|(i, v)| (msr::MTRR_VAR0 + i as u32, *v)),
        );
        msrs.extend(
            m.fixed
                .iter()
                .enumerate()
                .map(|(i, v)| (msr::MTRR_FIXED[i], *v)),
        );
    }
    if let Some(a) = tsc_adjust {
        msrs.push((msr::TSC_ADJUST, a));
    }
    for (i, v) in cpu_msrs {
        if !CPU_MSR_RECORD.contains(&i) {
            return Err(unrep(
                code::CPU_MSR,
                vcpu,
                format!("MSR {i:#x} is not one xenkvm restores"),
            ));
        }
        msrs.push((i, v));
    }
    // The APIC ID back to KVM's numbering (vCPU id).
    let mut lapic_page = lr.to_vec();
    let x2apic = l.apic_base_msr & (1 << 10) != 0;
    let id_reg = u32::from_le_bytes([
        lapic_page[0x20],
        lapic_page[0x21],
        lapic_page[0x22],
        lapic_page[0x23],
    ]);
    let xen_id = if x2apic { id_reg } else { id_reg >> 24 };
    if xen_id != 2 * u32::from(vcpu) {
        tracing::warn!(
            vcpu,
            xen_id,
            "LAPIC_REGS: APIC ID is not Xen's 2 * vcpu_id; restoring with KVM's"
        );
    }
    let kvm_id = u32::from(vcpu) << 24;
    lapic_page[0x20..0x24].copy_from_slice(&kvm_id.to_le_bytes());
    let (xsave_area, xcr0) = match xsave {
        Some(x) => {
            let need = xsave_size(x.xcr0_accum).map_err(|w| unrep(code::CPU_XSAVE, vcpu, w))?;
            if x.area.len() < need {
                return Err(unrep(
                    code::CPU_XSAVE,
                    vcpu,
                    format!(
                        "area of {} bytes is shorter than the {need} XCR0 {:#x} needs",
                        x.area.len(),
                        x.xcr0_accum
                    ),
                ));
            }
            if x.area.len() > 4096 && x.area[4096..].iter().any(|b| *b != 0) {
                return Err(unrep(
                    code::CPU_XSAVE,
                    vcpu,
                    "state beyond 4096 bytes (AMX tiles): KVM_SET_XSAVE holds 4096",
                ));
            }
            let mut a = x.area.clone();
            a.resize(4096, 0);
            (Some(a), x.xcr0)
        }
        None => (None, 1),
    };
    Ok(KvmVcpuState {
        regs,
        sregs,
        fpu: fxsave_to_kvm(&c.fpu_regs),
        xsave: xsave_area,
        xcr0,
        events,
        debugregs: kvm_debugregs {
            db: c.dr,
            dr6: c.dr6,
            dr7: c.dr7,
            ..Default::default()
        },
        msrs,
        lapic: lapic_page,
    })
}

/// KVM's in-kernel IOAPIC, as plain data (the `kvm_ioapic_state` union
/// read out by `src/kvm/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvmIoapic {
    /// MMIO base.
    pub base_address: u64,
    /// IOREGSEL.
    pub ioregsel: u32,
    /// Id.
    pub id: u32,
    /// Pending (level) IRR bits.
    pub irr: u32,
    /// 24 redirection entries.
    pub redirtbl: [u64; 24],
}

/// The in-kernel irqchip and PIT.
#[derive(Debug, Clone, Default)]
pub struct KvmIrqchipState {
    /// Master (0) and slave (1) PIC.
    pub pic: [kvm_pic_state; 2],
    /// IOAPIC.
    pub ioapic: KvmIoapic,
    /// PIT.
    pub pit: kvm_pit_state2,
}

const REDIR_MASKED: u64 = 1 << 16;
const REDIR_REMOTE_IRR: u64 = 1 << 14;

/// PIC, IOAPIC and PIT records (Xen's 48-pin IOAPIC with pins 24-47 masked).
pub fn irqchip_to_records(s: &KvmIrqchipState) -> Vec<HvmRecord> {
    let mut out = Vec::new();
    for (i, p) in s.pic.iter().enumerate() {
        out.push(HvmRecord::Pic(
            i as u16,
            Pic {
                irr: p.irr,
                imr: p.imr,
                isr: p.isr,
                irq_base: p.irq_base,
                init_state: (p.init_state & 3) | (p.init4 & 1) << 2,
                priority_add: p.priority_add & 0xF,
                readsel_isr: p.read_reg_select != 0,
                poll: p.poll != 0,
                auto_eoi: p.auto_eoi != 0,
                rotate_on_auto_eoi: p.rotate_on_auto_eoi != 0,
                special_fully_nested_mode: p.special_fully_nested_mode != 0,
                special_mask_mode: p.special_mask != 0,
                is_master: i == 0,
                elcr: p.elcr,
                int_output: u8::from(p.irr & !p.imr & !p.isr != 0),
            },
        ));
    }
    let mut redirtbl = [REDIR_MASKED; VIOAPIC_NUM_PINS];
    redirtbl[..24].copy_from_slice(&s.ioapic.redirtbl);
    out.push(HvmRecord::IoApic(
        0,
        Box::new(IoApic {
            base_address: s.ioapic.base_address,
            ioregsel: s.ioapic.ioregsel,
            id: s.ioapic.id,
            redirtbl,
        }),
    ));
    let mut pit = Pit {
        speaker_data_on: u32::from(s.pit.flags & KVM_PIT_FLAGS_SPEAKER_DATA_ON != 0),
        ..Pit::default()
    };
    for (x, k) in pit.channels.iter_mut().zip(s.pit.channels.iter()) {
        *x = PitChannel {
            count: k.count,
            latched_count: k.latched_count,
            count_latched: k.count_latched,
            status_latched: k.status_latched,
            status: k.status,
            read_state: k.read_state,
            write_state: k.write_state,
            write_latch: k.write_latch,
            rw_mode: k.rw_mode,
            mode: k.mode,
            bcd: k.bcd,
            gate: k.gate,
        };
    }
    out.push(HvmRecord::Pit(0, pit));
    out
}

/// The irqchip from PIC, IOAPIC and PIT records. A missing record leaves
/// that device at its reset state (Xen omits none of them for HVM guests).
pub fn irqchip_from_records(recs: &[HvmRecord]) -> Result<KvmIrqchipState, ConvertError> {
    let mut s = KvmIrqchipState::default();
    s.pic[0].elcr_mask = 0xF8;
    s.pic[1].elcr_mask = 0xDE;
    s.ioapic.base_address = 0xFEC0_0000;
    s.ioapic.redirtbl = [REDIR_MASKED; 24];
    for r in recs {
        match r {
            HvmRecord::Pic(i, p) => {
                let Some(k) = s.pic.get_mut(usize::from(*i)) else {
                    return Err(unrep(
                        code::PIC,
                        *i,
                        "only instances 0 (master) and 1 (slave) exist",
                    ));
                };
                if p.init_state & 8 != 0 {
                    return Err(unrep(
                        code::PIC,
                        *i,
                        "single (non-cascaded) mode: KVM's PIC is always cascaded",
                    ));
                }
                *k = kvm_pic_state {
                    last_irr: 0,
                    irr: p.irr,
                    imr: p.imr,
                    isr: p.isr,
                    priority_add: p.priority_add,
                    irq_base: p.irq_base,
                    read_reg_select: u8::from(p.readsel_isr),
                    poll: u8::from(p.poll),
                    special_mask: u8::from(p.special_mask_mode),
                    init_state: p.init_state & 3,
                    auto_eoi: u8::from(p.auto_eoi),
                    rotate_on_auto_eoi: u8::from(p.rotate_on_auto_eoi),
                    special_fully_nested_mode: u8::from(p.special_fully_nested_mode),
                    init4: (p.init_state >> 2) & 1,
                    elcr: p.elcr,
                    elcr_mask: k.elcr_mask,
                };
            }
            HvmRecord::IoApic(i, a) => {
                if *i != 0 {
                    return Err(unrep(code::IOAPIC, *i, "KVM has one IOAPIC"));
                }
                for (pin, e) in a.redirtbl.iter().enumerate().skip(24) {
                    if e & REDIR_MASKED == 0 || e & REDIR_REMOTE_IRR != 0 {
                        return Err(unrep(
                            code::IOAPIC,
                            0,
                            format!("pin {pin} is in use (entry {e:#x}); KVM's in-kernel IOAPIC has 24 pins"),
                        ));
                    }
                }
                s.ioapic = KvmIoapic {
                    base_address: a.base_address,
                    ioregsel: a.ioregsel,
                    id: a.id,
                    irr: 0,
                    redirtbl: {
                        let mut t = [0u64; 24];
                        t.copy_from_slice(&a.redirtbl[..24]);
                        t
                    },
                };
            }
            HvmRecord::Pit(_, p) => {
                for (k, x) in s.pit.channels.iter_mut().zip(p.channels.iter()) {
                    k.count = x.count;
                    k.latched_count = x.latched_count;
                    k.count_latched = x.count_latched;
                    k.status_latched = x.status_latched;
                    k.status = x.status;
                    k.read_state = x.read_state;
                    k.write_state = x.write_state;
                    k.write_latch = x.write_latch;
                    k.rw_mode = x.rw_mode;
                    k.mode = x.mode;
                    k.bcd = x.bcd;
                    k.gate = x.gate;
                    k.count_load_time = 0;
                }
                s.pit.flags = if p.speaker_data_on != 0 {
                    KVM_PIT_FLAGS_SPEAKER_DATA_ON
                } else {
                    0
                };
            }
            _ => {}
        }
    }
    Ok(s)
}

/// Checks the records xenkvm does not convert: refuses those whose state
/// would be lost (asserted interrupt wires, an enabled HPET, Viridian
/// state, unknown codes), logs and drops the harmless ones.
pub fn check_unconverted(recs: &[HvmRecord]) -> Result<(), ConvertError> {
    for r in recs {
        let HvmRecord::Other {
            typecode: t,
            instance: i,
            data,
        } = r
        else {
            continue;
        };
        let zero = data.iter().all(|b| *b == 0);
        match *t {
            code::PCI_IRQ | code::ISA_IRQ if !zero => {
                return Err(unrep(
                    *t,
                    *i,
                    "asserted interrupt wires: xenkvm restores only idle lines",
                ))
            }
            code::PCI_LINK => {
                if data.get(..4).is_some_and(|l| l.iter().any(|x| *x != 0)) {
                    tracing::warn!("HVM_CONTEXT PCI_LINK: PCI-ISA link routes dropped (xenkvm routes INTx through the IOAPIC)");
                }
            }
            code::HPET => {
                // config register at offset 16, bit 0 = ENABLE_CNF
                if data.get(16).is_some_and(|c| c & 1 != 0) {
                    return Err(unrep(
                        *t,
                        *i,
                        "the guest enabled the HPET; xenkvm has no HPET",
                    ));
                }
            }
            code::VIRIDIAN_DOMAIN | code::VIRIDIAN_VCPU if !zero => {
                return Err(unrep(
                    *t,
                    *i,
                    "Viridian (Hyper-V) enlightenment state: not supported",
                ))
            }
            code::PCI_IRQ | code::ISA_IRQ | code::VIRIDIAN_DOMAIN | code::VIRIDIAN_VCPU => {}
            code::PMTIMER | code::VMCE_VCPU => {
                tracing::debug!(record = %type_name(*t), instance = i, "HVM_CONTEXT record not restored (xenkvm keeps its own)");
            }
            _ => return Err(unrep(*t, *i, "unknown record type")),
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
