//! ACPI tables for the guest (rust-vmm `acpi_tables`): RSDP, XSDT, a
//! hardware-reduced FADT, an empty DSDT, and a MADT with one local APIC per
//! vCPU (processor UID = APIC id = Xen vCPU id, as a Linux guest's Xen code
//! expects), the IOAPIC, and the ISA IRQ 0 -> GSI 2 override of the PIT.
//! Linux needs the MADT to reach `xen_time_init` and to bring up APs.
//!
//! They live in the reserved legacy area at [`ACPI_BASE`], where a BIOS-style
//! scan also finds the RSDP; PVH guests get its address in `hvm_start_info`.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{Immutable, IntoBytes};

use crate::GuestMem;

/// Where the tables go (in the e820-reserved 0xA0000-0xFFFFF hole).
pub const ACPI_BASE: u64 = 0xe_0000;
const OEM_ID: [u8; 6] = *b"XENKVM";
const OEM_TABLE: [u8; 8] = *b"XENKVM  ";
const LAPIC_BASE: u32 = 0xfee0_0000;
const IOAPIC_BASE: u32 = 0xfec0_0000;

/// MADT Interrupt Source Override (type 2), which acpi_tables lacks.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI supports at most 255 vCPUs here, not {0}")]
    TooManyVcpus(u32),
    #[error("the ACPI tables do not fit below 1 MiB")]
    TooLarge,
    #[error("cannot write the ACPI tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Builds the tables for `vcpus` vCPUs and writes them at [`ACPI_BASE`].
/// Returns the RSDP's guest-physical address.
pub fn write_tables(mem: &GuestMem, vcpus: u32) -> Result<u64, AcpiError> {
    if vcpus > 255 {
        return Err(AcpiError::TooManyVcpus(vcpus));
    }
    // An empty DSDT: Linux requires one, we describe no devices in AML yet.
    let dsdt = bytes(&Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, 1));
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC_BASE),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_BASE, 0));
    madt.add_structure(InterruptSourceOverride {
        kind: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2,
        flags: 0,
    });
    let madt = bytes(&madt);

    let rsdp_at = ACPI_BASE;
    let xsdt_at = ACPI_BASE + 0x40;
    let fadt_at = ACPI_BASE + 0x100;
    let dsdt_at = ACPI_BASE + 0x300;
    let madt_at = ACPI_BASE + 0x400;
    // Hardware-reduced: no PM timer, SCI or fixed registers to emulate. The
    // FADT sets neither "no CMOS RTC" nor "no VGA" (a Linux HVM guest would
    // switch itself to PVH mode if both were set).
    let fadt = bytes(
        &FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
            .dsdt_64(dsdt_at)
            .flag(Flags::HwReducedAcpi)
            .finalize(),
    );
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt = bytes(&xsdt);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_at));
    if madt_at + madt.len() as u64 > 0x10_0000 || xsdt.len() > 0xc0 || fadt.len() > 0x200 {
        return Err(AcpiError::TooLarge);
    }
    for (at, t) in [
        (rsdp_at, &rsdp),
        (xsdt_at, &xsdt),
        (fadt_at, &fadt),
        (dsdt_at, &dsdt),
        (madt_at, &madt),
    ] {
        mem.write_slice(t, GuestAddress(at))?;
    }
    Ok(rsdp_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn read(m: &GuestMem, at: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        m.read_slice(&mut b, GuestAddress(at)).unwrap();
        b
    }

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn write_tables_rsdp_xsdt_madt_linked_and_checksummed() {
        let m = mem();
        let rsdp_at = write_tables(&m, 3).unwrap();
        let rsdp = read(&m, rsdp_at, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xlen = u32::from_le_bytes(read(&m, xsdt_at + 4, 4).try_into().unwrap()) as usize;
        let xsdt = read(&m, xsdt_at, xlen);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<Vec<u8>> = entries.iter().map(|&a| read(&m, a, 4)).collect();
        assert!(sigs.contains(&b"FACP".to_vec()) && sigs.contains(&b"APIC".to_vec()));
        let madt_at = entries[sigs.iter().position(|s| s == b"APIC").unwrap()];
        let mlen = u32::from_le_bytes(read(&m, madt_at + 4, 4).try_into().unwrap()) as usize;
        let madt = read(&m, madt_at, mlen);
        assert!(checksum_ok(&madt));
        // Walk the structures: 3 local APICs with UID = APIC id, one IOAPIC, one override.
        let (mut lapics, mut ioapics, mut isos, mut off) = (Vec::new(), 0, 0, 44);
        while off + 2 <= madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => lapics.push((madt[off + 2], madt[off + 3])),
                1 => ioapics += 1,
                2 => isos += 1,
                _ => {}
            }
            off += len.max(1);
        }
        assert_eq!(lapics, vec![(0, 0), (1, 1), (2, 2)]);
        assert_eq!((ioapics, isos), (1, 1));
    }

    #[test]
    fn write_tables_fadt_hw_reduced_points_at_dsdt() {
        let m = mem();
        write_tables(&m, 1).unwrap();
        let fadt_at = ACPI_BASE + 0x100;
        let len = u32::from_le_bytes(read(&m, fadt_at + 4, 4).try_into().unwrap()) as usize;
        let fadt = read(&m, fadt_at, len);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(read(&m, x_dsdt, 4), b"DSDT");
    }

    #[test]
    fn write_tables_too_many_vcpus_refused() {
        assert!(matches!(
            write_tables(&mem(), 256),
            Err(AcpiError::TooManyVcpus(256))
        ));
    }
}
