//! ACPI tables for the guest (rust-vmm `acpi_tables`): RSDP, XSDT, a
//! hardware-reduced FADT with the sleep control/status registers, a DSDT
//! with the PCI root bridge `\_SB.PCI0` (Linux finds PCI bus 0 through it)
//! and the `_S5_` sleep type (ACPI power-off), and a MADT with one local APIC per
//! vCPU (processor UID = APIC id = Xen vCPU id, as a Linux guest's Xen code
//! expects), the IOAPIC, and the ISA IRQ 0 -> GSI 2 override of the PIT.
//! Linux needs the MADT to reach `xen_time_init` and to bring up APs.
//!
//! They live in the reserved legacy area at [`ACPI_BASE`], where a BIOS-style
//! scan also finds the RSDP; PVH guests get its address in `hvm_start_info`.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Name, Package, Path, ResourceTemplate,
    IO, ZERO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{Immutable, IntoBytes};

use crate::boot::layout::{LOW_RAM_MAX, PCI_MMIO_END};
use crate::devices::pci::{CONFIG_ADDRESS, CONFIG_DATA};
use crate::devices::{ACPI_SLEEP_CONTROL, ACPI_SLEEP_STATUS, S5_SLP_TYP};
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

/// The DSDT: the PCI root bridge of bus 0 and the S5 sleep type.
///
/// `\_SB.PCI0` (PNP0A03, segment 0, bus 0) owns buses 0-255, consumes the
/// configuration ports 0xCF8-0xCFF and forwards the I/O ports around them and
/// the MMIO hole from [`LOW_RAM_MAX`] to below the IOAPIC, where the Xen
/// platform device's BARs sit. The windows follow Xen's hvmloader DSDT. There
/// is no `_PRT`: the platform device's INTA is unused (upcalls come through
/// the per-vCPU vector), and Linux only warns "no GSI".
fn dsdt() -> Vec<u8> {
    let bus_numbers = AddressSpace::new_bus_number(0u16, 0xff);
    let config_ports = IO::new(CONFIG_ADDRESS, CONFIG_ADDRESS, 1, 8);
    let io_below = AddressSpace::new_io(0u16, CONFIG_ADDRESS - 1, None);
    let io_above = AddressSpace::new_io(CONFIG_DATA + 4, 0xffffu16, None);
    let mmio = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        LOW_RAM_MAX as u32,
        PCI_MMIO_END,
        None,
    );
    let crs = ResourceTemplate::new(vec![
        &bus_numbers,
        &config_ports,
        &io_below,
        &io_above,
        &mmio,
    ]);
    let names = [
        Name::new(Path::new("_HID"), &EISAName::new("PNP0A03")),
        Name::new(Path::new("_SEG"), &ZERO),
        Name::new(Path::new("_BBN"), &ZERO),
        Name::new(Path::new("_UID"), &ZERO),
        Name::new(Path::new("_CRS"), &crs),
    ];
    let pci0 = Device::new(
        Path::new("\\_SB_.PCI0"),
        names.iter().map(|n| n as &dyn Aml).collect(),
    );
    // SLP_TYPa, SLP_TYPb, reserved, reserved.
    let s5 = Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &ZERO, &ZERO]),
    );
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, 1);
    t.append_slice(&bytes(&pci0));
    t.append_slice(&bytes(&s5));
    bytes(&t)
}

/// An 8-bit I/O-port register for the FADT.
fn io_register(port: u16) -> GAS {
    GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Builds the tables for `vcpus` vCPUs and writes them at [`ACPI_BASE`].
/// Returns the RSDP's guest-physical address.
pub fn write_tables(mem: &GuestMem, vcpus: u32) -> Result<u64, AcpiError> {
    if vcpus > 255 {
        return Err(AcpiError::TooManyVcpus(vcpus));
    }
    let dsdt = dsdt();
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
    let madt_at = ACPI_BASE + 0x400;
    let dsdt_at = ACPI_BASE + 0x800;
    // Hardware-reduced: no PM timer, SCI or fixed registers to emulate; S5
    // goes through the sleep control register. The FADT sets neither "no CMOS
    // RTC" nor "no VGA" (a Linux HVM guest would switch itself to PVH mode if
    // both were set).
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_at)
        .flag(Flags::HwReducedAcpi);
    fadt.sleep_control_reg = io_register(ACPI_SLEEP_CONTROL);
    fadt.sleep_status_reg = io_register(ACPI_SLEEP_STATUS);
    let fadt = bytes(&fadt.finalize());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt = bytes(&xsdt);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_at));
    if dsdt_at + dsdt.len() as u64 > 0x10_0000
        || madt.len() > 0x400
        || xsdt.len() > 0xc0
        || fadt.len() > 0x200
    {
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

    /// The table the FADT's X_DSDT points at.
    fn read_dsdt(m: &GuestMem) -> Vec<u8> {
        let fadt = read(m, ACPI_BASE + 0x100, 148);
        let at = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let len = u32::from_le_bytes(read(m, at + 4, 4).try_into().unwrap()) as usize;
        read(m, at, len)
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn write_tables_dsdt_has_pci_root_bridge_and_s5() {
        let m = mem();
        write_tables(&m, 2).unwrap();
        let d = read_dsdt(&m);
        assert_eq!(&d[..4], b"DSDT");
        assert!(checksum_ok(&d));
        // Device (\_SB.PCI0): ExtOp 0x5b 0x82 ... then "\" DualName _SB_ PCI0.
        let dev = find(&d, b"\\\x2e_SB_PCI0").expect("\\_SB.PCI0");
        // DeviceOp, then a 2-byte PkgLength (the body is over 63 bytes).
        assert_eq!(&d[dev - 4..dev - 2], &[0x5b, 0x82]);
        // _HID = EISAID("PNP0A03") = 0x030ad041 as a DWord.
        let hid = find(&d, b"_HID").expect("_HID");
        assert_eq!(&d[hid + 4..hid + 9], &[0x0c, 0x41, 0xd0, 0x0a, 0x03]);
        for name in [&b"_SEG"[..], b"_BBN", b"_UID", b"_CRS"] {
            assert!(
                find(&d, name).is_some(),
                "{}",
                String::from_utf8_lossy(name)
            );
        }
        // The _CRS holds the bus range, the 0xCF8 ports and the MMIO window.
        let io = [0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08];
        assert!(find(&d, &io).is_some(), "IO(0xcf8, 8)");
        let mut mmio = LOW_RAM_MAX.to_le_bytes()[..4].to_vec();
        mmio.extend_from_slice(&PCI_MMIO_END.to_le_bytes());
        assert!(find(&d, &mmio).is_some(), "memory window");
        // Name (_S5_, Package (4) {5, 5, 0, 0}).
        let s5 = find(&d, b"_S5_").expect("_S5_");
        assert_eq!(d[s5 - 1], 0x08, "NameOp");
        assert_eq!(&d[s5 + 4..s5 + 11], &[0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5]);
    }

    #[test]
    fn write_tables_fadt_sleep_registers_are_io_ports() {
        let m = mem();
        write_tables(&m, 1).unwrap();
        let fadt = read(&m, ACPI_BASE + 0x100, 276);
        assert!(checksum_ok(&fadt));
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256 (12-byte GAS).
        for (off, port) in [(244, ACPI_SLEEP_CONTROL), (256, ACPI_SLEEP_STATUS)] {
            assert_eq!(&fadt[off..off + 4], &[1, 8, 0, 1], "SystemIO, 8 bits, byte");
            let addr = u64::from_le_bytes(fadt[off + 4..off + 12].try_into().unwrap());
            assert_eq!(addr, u64::from(port));
        }
        // Neither NO_VGA (IAPC_BOOT_ARCH bit 2) nor NO_CMOS_RTC (bit 5).
        let boot_arch = u16::from_le_bytes(fadt[109..111].try_into().unwrap());
        assert_eq!(boot_arch & (1 << 2 | 1 << 5), 0);
    }

    #[test]
    fn write_tables_too_many_vcpus_refused() {
        assert!(matches!(
            write_tables(&mem(), 256),
            Err(AcpiError::TooManyVcpus(256))
        ));
    }
}
