//! The `HVM_CONTEXT` blob: Xen's typed HVM save records
//! (`xen/include/public/arch-x86/hvm/save.h`, `public/hvm/save.h`).
//!
//! The blob is a sequence of `{typecode u16, instance u16, length u32}`
//! descriptors, each followed by `length` bytes and no padding; it starts
//! with HEADER and ends with END (0, 0, 0). Instances are vCPU ids for
//! per-vCPU records and 0 for domain-wide ones (PIC has instances 0 = master
//! and 1 = slave).
//!
//! The codecs here encode field by field in little-endian order; the tests
//! check every offset against the bindgen layout of Xen 4.17's header in the
//! `xen-abi` crate. Older, shorter forms of a record that Xen loads
//! zero-extended (CPU without `flags`, LAPIC without `tdt_msr`, RTC without
//! `rtc_offset`) are accepted the same way. Records whose content xenkvm
//! does not model (PCI_IRQ, ISA_IRQ, PCI_LINK, HPET, PMTIMER, VIRIDIAN_*,
//! VMCE_VCPU and unknown codes) are kept as [`HvmRecord::Other`] so the
//! conversion layer can refuse or ignore them by name.

use crate::migration::stream::StreamError;

#[cfg(test)]
mod tests;

const LAYER: &str = "HVM_CONTEXT";

/// `HVM_FILE_MAGIC`.
pub const HVM_FILE_MAGIC: u32 = 0x5438_1286;
/// `HVM_FILE_VERSION`.
pub const HVM_FILE_VERSION: u32 = 1;
/// Largest CPU_XSAVE record accepted (AMX-sized areas are about 11 KiB).
pub const MAX_XSAVE: u32 = 1 << 20;
/// Most MSRs in one CPU_MSR record.
pub const MAX_MSRS: u32 = 4096;

/// save.h type codes.
pub mod code {
    /// END
    pub const END: u16 = 0;
    /// HEADER
    pub const HEADER: u16 = 1;
    /// CPU
    pub const CPU: u16 = 2;
    /// PIC
    pub const PIC: u16 = 3;
    /// IOAPIC
    pub const IOAPIC: u16 = 4;
    /// LAPIC
    pub const LAPIC: u16 = 5;
    /// LAPIC_REGS
    pub const LAPIC_REGS: u16 = 6;
    /// PCI_IRQ
    pub const PCI_IRQ: u16 = 7;
    /// ISA_IRQ
    pub const ISA_IRQ: u16 = 8;
    /// PCI_LINK
    pub const PCI_LINK: u16 = 9;
    /// PIT
    pub const PIT: u16 = 10;
    /// RTC
    pub const RTC: u16 = 11;
    /// HPET
    pub const HPET: u16 = 12;
    /// PMTIMER
    pub const PMTIMER: u16 = 13;
    /// MTRR
    pub const MTRR: u16 = 14;
    /// VIRIDIAN_DOMAIN
    pub const VIRIDIAN_DOMAIN: u16 = 15;
    /// CPU_XSAVE
    pub const CPU_XSAVE: u16 = 16;
    /// VIRIDIAN_VCPU
    pub const VIRIDIAN_VCPU: u16 = 17;
    /// VMCE_VCPU
    pub const VMCE_VCPU: u16 = 18;
    /// TSC_ADJUST
    pub const TSC_ADJUST: u16 = 19;
    /// CPU_MSR
    pub const CPU_MSR: u16 = 20;
}

/// The save.h name of a type code.
pub fn type_name(t: u16) -> String {
    let n = match t {
        code::END => "END",
        code::HEADER => "HEADER",
        code::CPU => "CPU",
        code::PIC => "PIC",
        code::IOAPIC => "IOAPIC",
        code::LAPIC => "LAPIC",
        code::LAPIC_REGS => "LAPIC_REGS",
        code::PCI_IRQ => "PCI_IRQ",
        code::ISA_IRQ => "ISA_IRQ",
        code::PCI_LINK => "PCI_LINK",
        code::PIT => "PIT",
        code::RTC => "RTC",
        code::HPET => "HPET",
        code::PMTIMER => "PMTIMER",
        code::MTRR => "MTRR",
        code::VIRIDIAN_DOMAIN => "VIRIDIAN_DOMAIN",
        code::CPU_XSAVE => "CPU_XSAVE",
        code::VIRIDIAN_VCPU => "VIRIDIAN_VCPU",
        code::VMCE_VCPU => "VMCE_VCPU",
        code::TSC_ADJUST => "TSC_ADJUST",
        code::CPU_MSR => "CPU_MSR",
        t => return format!("type {t}"),
    };
    n.to_string()
}

/// HEADER (`struct hvm_save_header`, 24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SaveHeader {
    /// Xen changeset of the saver.
    pub changeset: u64,
    /// CPUID.1:EAX of the saving host.
    pub cpuid: u32,
    /// Guest TSC frequency in kHz.
    pub gtsc_khz: u32,
}

/// One segment register as `hvm_hw_cpu` keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seg {
    /// Selector.
    pub sel: u32,
    /// Limit.
    pub limit: u32,
    /// Base.
    pub base: u64,
    /// Access rights: type 3:0, S 4, DPL 6:5, P 7, AVL 8, L 9, DB 10, G 11.
    pub arbytes: u32,
}

/// CPU (`struct hvm_hw_cpu`, 1032 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HvmCpu {
    /// FXSAVE image.
    pub fpu_regs: [u8; 512],
    /// rax, rbx, rcx, rdx, rbp, rsi, rdi, rsp, r8..r15 (save.h order).
    pub gprs: [u64; 16],
    /// rip.
    pub rip: u64,
    /// rflags.
    pub rflags: u64,
    /// cr0, cr2, cr3, cr4.
    pub cr: [u64; 4],
    /// dr0..dr3.
    pub dr: [u64; 4],
    /// dr6.
    pub dr6: u64,
    /// dr7.
    pub dr7: u64,
    /// cs, ds, es, fs, gs, ss, tr, ldtr (save.h order).
    pub segs: [Seg; 8],
    /// idtr limit and base.
    pub idtr: (u32, u64),
    /// gdtr limit and base.
    pub gdtr: (u32, u64),
    /// SYSENTER_CS, ESP, EIP.
    pub sysenter: [u64; 3],
    /// KERNEL_GS_BASE.
    pub shadow_gs: u64,
    /// msr_flags.
    pub msr_flags: u64,
    /// LSTAR.
    pub msr_lstar: u64,
    /// STAR.
    pub msr_star: u64,
    /// CSTAR.
    pub msr_cstar: u64,
    /// SFMASK.
    pub msr_syscall_mask: u64,
    /// EFER.
    pub msr_efer: u64,
    /// TSC_AUX.
    pub msr_tsc_aux: u64,
    /// The guest's TSC.
    pub tsc: u64,
    /// Pending event in VMX entry-info format: vector 7:0, type 10:8,
    /// error-code valid 11, valid 31.
    pub pending_event: u32,
    /// Its error code.
    pub error_code: u32,
    /// `XEN_X86_FPU_INITIALISED` (bit 0).
    pub flags: u32,
}

impl Default for HvmCpu {
    fn default() -> Self {
        HvmCpu {
            fpu_regs: [0; 512],
            gprs: [0; 16],
            rip: 0,
            rflags: 0,
            cr: [0; 4],
            dr: [0; 4],
            dr6: 0,
            dr7: 0,
            segs: [Seg::default(); 8],
            idtr: (0, 0),
            gdtr: (0, 0),
            sysenter: [0; 3],
            shadow_gs: 0,
            msr_flags: 0,
            msr_lstar: 0,
            msr_star: 0,
            msr_cstar: 0,
            msr_syscall_mask: 0,
            msr_efer: 0,
            msr_tsc_aux: 0,
            tsc: 0,
            pending_event: 0,
            error_code: 0,
            flags: 0,
        }
    }
}

/// `XEN_X86_FPU_INITIALISED`.
pub const XEN_X86_FPU_INITIALISED: u32 = 1;

/// PIC (`struct hvm_hw_vpic`, 8 bytes); instance 0 master, 1 slave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pic {
    /// IRR.
    pub irr: u8,
    /// IMR.
    pub imr: u8,
    /// ISR.
    pub isr: u8,
    /// Vector base.
    pub irq_base: u8,
    /// ICW init state (4 bits).
    pub init_state: u8,
    /// Priority rotation (4 bits).
    pub priority_add: u8,
    /// Reads at A=0 return ISR.
    pub readsel_isr: bool,
    /// Polling read.
    pub poll: bool,
    /// Auto EOI.
    pub auto_eoi: bool,
    /// Rotate on auto EOI.
    pub rotate_on_auto_eoi: bool,
    /// Special fully nested mode.
    pub special_fully_nested_mode: bool,
    /// Special mask mode.
    pub special_mask_mode: bool,
    /// Master (not programmable).
    pub is_master: bool,
    /// ELCR.
    pub elcr: u8,
    /// INT output.
    pub int_output: u8,
}

/// Xen's IOAPIC pin count on x86.
pub const VIOAPIC_NUM_PINS: usize = 48;

/// IOAPIC (`struct hvm_hw_vioapic`, 400 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoApic {
    /// MMIO base.
    pub base_address: u64,
    /// IOREGSEL.
    pub ioregsel: u32,
    /// IOAPIC id.
    pub id: u32,
    /// Redirection entries (bit layout of the hardware).
    pub redirtbl: [u64; VIOAPIC_NUM_PINS],
}

/// LAPIC (`struct hvm_hw_lapic`, 24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lapic {
    /// IA32_APIC_BASE.
    pub apic_base_msr: u64,
    /// `VLAPIC_*_DISABLED` flags.
    pub disabled: u32,
    /// Timer divisor.
    pub timer_divisor: u32,
    /// TSC_DEADLINE.
    pub tdt_msr: u64,
}

/// PIT channel (`struct hvm_hw_pit_channel`, 16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PitChannel {
    /// Count (can be 65536).
    pub count: u32,
    /// Latched count.
    pub latched_count: u16,
    /// Count latched.
    pub count_latched: u8,
    /// Status latched.
    pub status_latched: u8,
    /// Status.
    pub status: u8,
    /// Read state.
    pub read_state: u8,
    /// Write state.
    pub write_state: u8,
    /// Write latch.
    pub write_latch: u8,
    /// RW mode.
    pub rw_mode: u8,
    /// Mode.
    pub mode: u8,
    /// BCD.
    pub bcd: u8,
    /// Gate.
    pub gate: u8,
}

/// PIT (`struct hvm_hw_pit`, 56 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pit {
    /// Channels 0-2.
    pub channels: [PitChannel; 3],
    /// Speaker data.
    pub speaker_data_on: u32,
}

/// RTC (`struct hvm_hw_rtc`, 24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rtc {
    /// CMOS bytes 0-13.
    pub cmos_data: [u8; 14],
    /// Index register.
    pub cmos_index: u8,
    /// Offset of the guest's RTC from the host's, seconds.
    pub rtc_offset: i64,
}

/// MTRR (`struct hvm_hw_mtrr`, 240 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mtrr {
    /// PAT.
    pub pat: u64,
    /// Variable ranges: base, mask pairs.
    pub var: [u64; 16],
    /// Fixed ranges.
    pub fixed: [u64; 11],
    /// MTRRcap.
    pub cap: u64,
    /// MTRRdefType.
    pub def_type: u64,
}

/// CPU_XSAVE (`struct hvm_hw_cpu_xsave`, 24 bytes + the XSAVE area).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Xsave {
    /// Features the area may hold.
    pub xfeature_mask: u64,
    /// XCR0.
    pub xcr0: u64,
    /// Every XCR0 bit ever set.
    pub xcr0_accum: u64,
    /// The standard-format XSAVE area (legacy 512 + header 64 + extended).
    pub area: Vec<u8>,
}

/// One typed record of the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HvmRecord {
    /// HEADER.
    Header(SaveHeader),
    /// CPU, per vCPU.
    Cpu(u16, Box<HvmCpu>),
    /// PIC, instance 0 master / 1 slave.
    Pic(u16, Pic),
    /// IOAPIC.
    IoApic(u16, Box<IoApic>),
    /// LAPIC, per vCPU.
    Lapic(u16, Lapic),
    /// LAPIC_REGS (the 1 KiB APIC page), per vCPU.
    LapicRegs(u16, Box<[u8; 1024]>),
    /// PIT.
    Pit(u16, Pit),
    /// RTC.
    Rtc(u16, Rtc),
    /// MTRR, per vCPU.
    Mtrr(u16, Box<Mtrr>),
    /// CPU_XSAVE, per vCPU.
    Xsave(u16, Xsave),
    /// TSC_ADJUST, per vCPU.
    TscAdjust(u16, u64),
    /// CPU_MSR, per vCPU: (index, value).
    CpuMsr(u16, Vec<(u32, u64)>),
    /// Any other record, undecoded.
    Other {
        /// Type code.
        typecode: u16,
        /// Instance.
        instance: u16,
        /// Bytes.
        data: Vec<u8>,
    },
}

/// Sequential little-endian reader over a record whose length is checked.
struct Rd<'a> {
    b: &'a [u8],
    at: usize,
}

impl Rd<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        // Short (old-format) records read as zero-extended.
        if let Some(s) = self.b.get(self.at..) {
            let n = s.len().min(N);
            out[..n].copy_from_slice(&s[..n]);
        }
        self.at += N;
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

#[derive(Default)]
struct Wr(Vec<u8>);

impl Wr {
    fn b(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.b(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.b(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.b(&v.to_le_bytes());
    }
}

impl HvmCpu {
    /// Size of the current form.
    pub const SIZE: usize = 1032;

    fn decode(b: &[u8]) -> Self {
        let mut r = Rd { b, at: 0 };
        let mut c = HvmCpu {
            fpu_regs: r.take(),
            ..HvmCpu::default()
        };
        for g in &mut c.gprs {
            *g = r.u64();
        }
        c.rip = r.u64();
        c.rflags = r.u64();
        for x in &mut c.cr {
            *x = r.u64();
        }
        for x in &mut c.dr {
            *x = r.u64();
        }
        c.dr6 = r.u64();
        c.dr7 = r.u64();
        for s in &mut c.segs {
            s.sel = r.u32();
        }
        for s in &mut c.segs {
            s.limit = r.u32();
        }
        c.idtr.0 = r.u32();
        c.gdtr.0 = r.u32();
        for s in &mut c.segs {
            s.base = r.u64();
        }
        c.idtr.1 = r.u64();
        c.gdtr.1 = r.u64();
        for s in &mut c.segs {
            s.arbytes = r.u32();
        }
        for x in &mut c.sysenter {
            *x = r.u64();
        }
        c.shadow_gs = r.u64();
        c.msr_flags = r.u64();
        c.msr_lstar = r.u64();
        c.msr_star = r.u64();
        c.msr_cstar = r.u64();
        c.msr_syscall_mask = r.u64();
        c.msr_efer = r.u64();
        if b.len() == 1016 {
            // hvm_hw_cpu_compat (before Xen 3.4): no msr_tsc_aux.
            c.msr_tsc_aux = 0;
        } else {
            c.msr_tsc_aux = r.u64();
        }
        c.tsc = r.u64();
        c.pending_event = r.u32();
        c.error_code = r.u32();
        c.flags = r.u32();
        c
    }

    fn encode(&self, w: &mut Wr) {
        w.b(&self.fpu_regs);
        for g in self.gprs {
            w.u64(g);
        }
        w.u64(self.rip);
        w.u64(self.rflags);
        for x in self.cr {
            w.u64(x);
        }
        for x in self.dr {
            w.u64(x);
        }
        w.u64(self.dr6);
        w.u64(self.dr7);
        for s in &self.segs {
            w.u32(s.sel);
        }
        for s in &self.segs {
            w.u32(s.limit);
        }
        w.u32(self.idtr.0);
        w.u32(self.gdtr.0);
        for s in &self.segs {
            w.u64(s.base);
        }
        w.u64(self.idtr.1);
        w.u64(self.gdtr.1);
        for s in &self.segs {
            w.u32(s.arbytes);
        }
        for x in self.sysenter {
            w.u64(x);
        }
        for x in [
            self.shadow_gs,
            self.msr_flags,
            self.msr_lstar,
            self.msr_star,
            self.msr_cstar,
            self.msr_syscall_mask,
            self.msr_efer,
            self.msr_tsc_aux,
            self.tsc,
        ] {
            w.u64(x);
        }
        w.u32(self.pending_event);
        w.u32(self.error_code);
        w.u32(self.flags);
        w.u32(0);
    }
}

impl Pic {
    fn decode(b: &[u8]) -> Self {
        let mut r = Rd { b, at: 0 };
        let (irr, imr, isr, irq_base, f0, f1, elcr, int_output) = (
            r.u8(),
            r.u8(),
            r.u8(),
            r.u8(),
            r.u8(),
            r.u8(),
            r.u8(),
            r.u8(),
        );
        let bit = |n: u8| f1 & (1 << n) != 0;
        Pic {
            irr,
            imr,
            isr,
            irq_base,
            init_state: f0 & 0xF,
            priority_add: f0 >> 4,
            readsel_isr: bit(0),
            poll: bit(1),
            auto_eoi: bit(2),
            rotate_on_auto_eoi: bit(3),
            special_fully_nested_mode: bit(4),
            special_mask_mode: bit(5),
            is_master: bit(6),
            elcr,
            int_output,
        }
    }

    fn encode(&self, w: &mut Wr) {
        w.b(&[self.irr, self.imr, self.isr, self.irq_base]);
        w.u8((self.init_state & 0xF) | (self.priority_add << 4));
        let f = [
            self.readsel_isr,
            self.poll,
            self.auto_eoi,
            self.rotate_on_auto_eoi,
            self.special_fully_nested_mode,
            self.special_mask_mode,
            self.is_master,
        ]
        .iter()
        .enumerate()
        .fold(0u8, |a, (i, b)| a | (u8::from(*b) << i));
        w.u8(f);
        w.u8(self.elcr);
        w.u8(self.int_output);
    }
}

/// Accepted body sizes per type code (`None`: variable, checked by the decoder).
fn sizes(t: u16) -> Option<&'static [usize]> {
    Some(match t {
        code::HEADER => &[24],
        code::CPU => &[1016, 1024, 1032],
        code::PIC => &[8],
        code::IOAPIC => &[400],
        code::LAPIC => &[16, 24],
        code::LAPIC_REGS => &[1024],
        code::PIT => &[56],
        code::RTC => &[16, 24],
        code::MTRR => &[240],
        code::TSC_ADJUST => &[8],
        _ => return None,
    })
}

impl HvmRecord {
    /// The save.h type code.
    pub fn typecode(&self) -> u16 {
        match self {
            HvmRecord::Header(_) => code::HEADER,
            HvmRecord::Cpu(..) => code::CPU,
            HvmRecord::Pic(..) => code::PIC,
            HvmRecord::IoApic(..) => code::IOAPIC,
            HvmRecord::Lapic(..) => code::LAPIC,
            HvmRecord::LapicRegs(..) => code::LAPIC_REGS,
            HvmRecord::Pit(..) => code::PIT,
            HvmRecord::Rtc(..) => code::RTC,
            HvmRecord::Mtrr(..) => code::MTRR,
            HvmRecord::Xsave(..) => code::CPU_XSAVE,
            HvmRecord::TscAdjust(..) => code::TSC_ADJUST,
            HvmRecord::CpuMsr(..) => code::CPU_MSR,
            HvmRecord::Other { typecode, .. } => *typecode,
        }
    }

    /// The instance.
    pub fn instance(&self) -> u16 {
        match self {
            HvmRecord::Header(_) => 0,
            HvmRecord::Cpu(i, _)
            | HvmRecord::Pic(i, _)
            | HvmRecord::IoApic(i, _)
            | HvmRecord::Lapic(i, _)
            | HvmRecord::LapicRegs(i, _)
            | HvmRecord::Pit(i, _)
            | HvmRecord::Rtc(i, _)
            | HvmRecord::Mtrr(i, _)
            | HvmRecord::Xsave(i, _)
            | HvmRecord::TscAdjust(i, _)
            | HvmRecord::CpuMsr(i, _) => *i,
            HvmRecord::Other { instance, .. } => *instance,
        }
    }

    /// Decodes one record body (`at` is its descriptor's offset in the blob).
    pub fn decode(t: u16, inst: u16, b: &[u8], at: u64) -> Result<Self, StreamError> {
        let bad = |why: String| {
            StreamError::invalid(
                LAYER,
                format!("record {} instance {inst}", type_name(t)),
                at,
                why,
            )
        };
        if let Some(ok) = sizes(t) {
            if !ok.contains(&b.len()) {
                return Err(bad(format!("length {} (expected one of {ok:?})", b.len())));
            }
        }
        let mut r = Rd { b, at: 0 };
        Ok(match t {
            code::HEADER => {
                let (magic, version) = (r.u32(), r.u32());
                if magic != HVM_FILE_MAGIC {
                    return Err(bad(format!(
                        "magic {magic:#x} (expected {HVM_FILE_MAGIC:#x})"
                    )));
                }
                if version != HVM_FILE_VERSION {
                    return Err(bad(format!(
                        "version {version} (expected {HVM_FILE_VERSION})"
                    )));
                }
                HvmRecord::Header(SaveHeader {
                    changeset: r.u64(),
                    cpuid: r.u32(),
                    gtsc_khz: r.u32(),
                })
            }
            code::CPU => HvmRecord::Cpu(inst, Box::new(HvmCpu::decode(b))),
            code::PIC => HvmRecord::Pic(inst, Pic::decode(b)),
            code::IOAPIC => {
                let base_address = r.u64();
                let ioregsel = r.u32();
                let id = r.u32();
                let mut redirtbl = [0u64; VIOAPIC_NUM_PINS];
                for e in &mut redirtbl {
                    *e = r.u64();
                }
                HvmRecord::IoApic(
                    inst,
                    Box::new(IoApic {
                        base_address,
                        ioregsel,
                        id,
                        redirtbl,
                    }),
                )
            }
            code::LAPIC => HvmRecord::Lapic(
                inst,
                Lapic {
                    apic_base_msr: r.u64(),
                    disabled: r.u32(),
                    timer_divisor: r.u32(),
                    tdt_msr: r.u64(),
                },
            ),
            code::LAPIC_REGS => HvmRecord::LapicRegs(inst, Box::new(r.take())),
            code::PIT => {
                let mut p = Pit::default();
                for c in &mut p.channels {
                    *c = PitChannel {
                        count: r.u32(),
                        latched_count: r.u16(),
                        count_latched: r.u8(),
                        status_latched: r.u8(),
                        status: r.u8(),
                        read_state: r.u8(),
                        write_state: r.u8(),
                        write_latch: r.u8(),
                        rw_mode: r.u8(),
                        mode: r.u8(),
                        bcd: r.u8(),
                        gate: r.u8(),
                    };
                }
                p.speaker_data_on = r.u32();
                HvmRecord::Pit(inst, p)
            }
            code::RTC => {
                let cmos_data = r.take();
                let cmos_index = r.u8();
                let _pad0 = r.u8();
                HvmRecord::Rtc(
                    inst,
                    Rtc {
                        cmos_data,
                        cmos_index,
                        rtc_offset: r.u64() as i64,
                    },
                )
            }
            code::MTRR => {
                let mut m = Mtrr {
                    pat: r.u64(),
                    ..Mtrr::default()
                };
                for v in &mut m.var {
                    *v = r.u64();
                }
                for v in &mut m.fixed {
                    *v = r.u64();
                }
                m.cap = r.u64();
                m.def_type = r.u64();
                HvmRecord::Mtrr(inst, Box::new(m))
            }
            code::CPU_XSAVE => {
                if b.len() < 24 + 512 + 64 {
                    return Err(bad(format!(
                        "length {} is shorter than the 600-byte minimum",
                        b.len()
                    )));
                }
                if b.len() > MAX_XSAVE as usize {
                    return Err(bad(format!("length {} exceeds {MAX_XSAVE}", b.len())));
                }
                HvmRecord::Xsave(
                    inst,
                    Xsave {
                        xfeature_mask: r.u64(),
                        xcr0: r.u64(),
                        xcr0_accum: r.u64(),
                        area: b[24..].to_vec(),
                    },
                )
            }
            code::TSC_ADJUST => HvmRecord::TscAdjust(inst, r.u64()),
            code::CPU_MSR => {
                if b.len() < 8 {
                    return Err(bad(format!("length {} is shorter than 8", b.len())));
                }
                let count = r.u32();
                let _pad = r.u32();
                if count > MAX_MSRS || 8 + 16 * count as usize > b.len() {
                    return Err(bad(format!("{count} MSRs do not fit in {} bytes", b.len())));
                }
                let mut v = Vec::with_capacity(count as usize);
                for i in 0..count {
                    let (idx, rsvd, val) = (r.u32(), r.u32(), r.u64());
                    if rsvd != 0 {
                        return Err(bad(format!(
                            "MSR entry {i} ({idx:#x}) has reserved bits set"
                        )));
                    }
                    v.push((idx, val));
                }
                HvmRecord::CpuMsr(inst, v)
            }
            code::END => return Err(bad("END inside the blob".into())),
            _ => HvmRecord::Other {
                typecode: t,
                instance: inst,
                data: b.to_vec(),
            },
        })
    }

    /// Encodes the body (without the descriptor).
    pub fn encode_body(&self) -> Vec<u8> {
        let mut w = Wr::default();
        match self {
            HvmRecord::Header(h) => {
                w.u32(HVM_FILE_MAGIC);
                w.u32(HVM_FILE_VERSION);
                w.u64(h.changeset);
                w.u32(h.cpuid);
                w.u32(h.gtsc_khz);
            }
            HvmRecord::Cpu(_, c) => c.encode(&mut w),
            HvmRecord::Pic(_, p) => p.encode(&mut w),
            HvmRecord::IoApic(_, a) => {
                w.u64(a.base_address);
                w.u32(a.ioregsel);
                w.u32(a.id);
                for e in a.redirtbl {
                    w.u64(e);
                }
            }
            HvmRecord::Lapic(_, l) => {
                w.u64(l.apic_base_msr);
                w.u32(l.disabled);
                w.u32(l.timer_divisor);
                w.u64(l.tdt_msr);
            }
            HvmRecord::LapicRegs(_, r) => w.b(&r[..]),
            HvmRecord::Pit(_, p) => {
                for c in p.channels {
                    w.u32(c.count);
                    w.u16(c.latched_count);
                    w.b(&[
                        c.count_latched,
                        c.status_latched,
                        c.status,
                        c.read_state,
                        c.write_state,
                        c.write_latch,
                        c.rw_mode,
                        c.mode,
                        c.bcd,
                        c.gate,
                    ]);
                }
                w.u32(p.speaker_data_on);
                w.u32(0);
            }
            HvmRecord::Rtc(_, r) => {
                w.b(&r.cmos_data);
                w.u8(r.cmos_index);
                w.u8(0);
                w.u64(r.rtc_offset as u64);
            }
            HvmRecord::Mtrr(_, m) => {
                w.u64(m.pat);
                for v in m.var.iter().chain(m.fixed.iter()) {
                    w.u64(*v);
                }
                w.u64(m.cap);
                w.u64(m.def_type);
            }
            HvmRecord::Xsave(_, x) => {
                w.u64(x.xfeature_mask);
                w.u64(x.xcr0);
                w.u64(x.xcr0_accum);
                w.b(&x.area);
            }
            HvmRecord::TscAdjust(_, v) => w.u64(*v),
            HvmRecord::CpuMsr(_, ms) => {
                w.u32(ms.len() as u32);
                w.u32(0);
                for (i, v) in ms {
                    w.u32(*i);
                    w.u32(0);
                    w.u64(*v);
                }
            }
            HvmRecord::Other { data, .. } => w.b(data),
        }
        w.0
    }
}

/// Parses a whole blob: HEADER first, END last, every record checked.
pub fn parse(blob: &[u8]) -> Result<Vec<HvmRecord>, StreamError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    loop {
        let Some(d) = blob.get(at..at + 8) else {
            return Err(StreamError::Truncated {
                layer: LAYER,
                what: "descriptor".into(),
                offset: at as u64,
                have: (blob.len().saturating_sub(at)) as u64,
                need: 8,
            });
        };
        let t = u16::from_le_bytes([d[0], d[1]]);
        let inst = u16::from_le_bytes([d[2], d[3]]);
        let len = u32::from_le_bytes([d[4], d[5], d[6], d[7]]) as usize;
        let body_at = at + 8;
        let Some(body) = blob.get(body_at..).and_then(|s| s.get(..len)) else {
            return Err(StreamError::Truncated {
                layer: LAYER,
                what: format!("record {} instance {inst}", type_name(t)),
                offset: at as u64,
                have: (blob.len() - body_at) as u64,
                need: len as u64,
            });
        };
        if t == code::END {
            if out.is_empty() {
                return Err(StreamError::invalid(
                    LAYER,
                    "record END",
                    at as u64,
                    "no HEADER before END",
                ));
            }
            if len != 0 {
                return Err(StreamError::invalid(
                    LAYER,
                    "record END",
                    at as u64,
                    format!("length {len} (must be 0)"),
                ));
            }
            return Ok(out);
        }
        if out.is_empty() && t != code::HEADER {
            return Err(StreamError::invalid(
                LAYER,
                format!("record {}", type_name(t)),
                at as u64,
                "the blob must start with HEADER",
            ));
        }
        if !out.is_empty() && t == code::HEADER {
            return Err(StreamError::invalid(
                LAYER,
                "record HEADER",
                at as u64,
                "a second HEADER",
            ));
        }
        out.push(HvmRecord::decode(t, inst, body, at as u64)?);
        at = body_at + len;
    }
}

/// Writes a blob: the records in order (HEADER first is the caller's job;
/// [`build`] does it) and END.
pub fn write(records: &[HvmRecord]) -> Vec<u8> {
    let mut w = Wr::default();
    for r in records {
        let body = r.encode_body();
        w.u16(r.typecode());
        w.u16(r.instance());
        w.u32(body.len() as u32);
        w.b(&body);
    }
    w.b(&[0; 8]);
    w.0
}

/// A blob from a header and the other records, in the order Xen saves
/// them (by type code, then instance), as `hvm_save` does.
pub fn build(header: SaveHeader, mut records: Vec<HvmRecord>) -> Vec<u8> {
    records.sort_by_key(|r| (r.typecode(), r.instance()));
    let mut all = Vec::with_capacity(records.len() + 1);
    all.push(HvmRecord::Header(header));
    all.extend(records);
    write(&all)
}
