//! PCI bus 0 behind configuration mechanism #1 (ports 0xCF8/0xCFC), with the
//! two devices a Xen HVM guest looks for, and the Xen platform device's fixed
//! I/O ports 0x10/0x12 (the emulated-device unplug protocol).
//!
//! Why: a Linux PV-on-HVM guest sets up grant tables only when the
//! xen-platform-pci device (5853:0001) probes, and places its grant frames in
//! that device's memory BAR (BAR1); blkfront and netfront load only after the
//! unplug handshake on ports 0x10/0x12 succeeded. Linux's type-1 sanity check
//! wants a host bridge on bus 0, hence the 440FX at 00:00.0.
//!
//! Devices (bus 0, function 0 only, single-function headers):
//! - 00:00.0 Intel 440FX host bridge 8086:1237, class 0x060000;
//! - 00:02.0 Xen platform device 5853:0001 (subsystem 5853:0001, revision 1,
//!   class 0xff8000, INTA), BAR0 I/O 0x100 ports, BAR1 32-bit prefetchable
//!   memory of 16 MiB, both at [`crate::boot::layout`]'s initial addresses.
//!
//! Each function is 256 bytes of configuration space plus a write mask: a
//! guest write changes only the masked bits, which gives BAR sizing (write all
//! ones, read the size mask and the fixed type bits back), BAR reprogramming
//! and the command register for free. Accesses of any size and byte offset on
//! 0xCFC-0xCFF are split into bytes; nothing here can index out of bounds.
//! The address register at 0xCF8 is decoded for 32-bit accesses only, as on
//! real chipsets: Linux's type-1 probe writes a byte to 0xCFB and expects the
//! address register unchanged, and a byte at 0xCF9 is the reset register.
//!
//! Written by hand: the rust-vmm `vm-device`/`pci` crates bring a generic bus
//! and MSI machinery this two-device, INTx-less bus does not need.

use parking_lot::Mutex;

use crate::boot::layout::{PLATFORM_IO_BASE, PLATFORM_MMIO_BASE};

/// The configuration address register (32-bit accesses only).
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// First configuration data port; 0xCFC-0xCFF select bytes of the dword.
pub const CONFIG_DATA: u16 = 0xcfc;
const CONFIG_DATA_LAST: u16 = 0xcff;
const CONFIG_ENABLE: u32 = 1 << 31;

/// Slot (device number on bus 0) of the Xen platform device.
pub const PLATFORM_SLOT: u8 = 2;
pub const PLATFORM_VENDOR: u16 = 0x5853;
pub const PLATFORM_DEVICE: u16 = 0x0001;
/// Size of the platform device's I/O BAR (BAR0).
pub const PLATFORM_IO_SIZE: u64 = 0x100;
/// Size of the platform device's memory BAR (BAR1): room for the grant-table
/// frames (4096 frames of 4 KiB).
pub const PLATFORM_MMIO_SIZE: u64 = 16 << 20;

/// Fixed port: 16-bit read = magic, 16-bit write = unplug mask, 32-bit write
/// = PV driver version.
pub const PLATFORM_PORT_MAGIC: u16 = 0x10;
/// Fixed port: 8-bit read = protocol version, 8-bit write = debug log byte
/// (handled by the port bus's console), 16-bit write = product number.
pub const PLATFORM_PORT_PROTOCOL: u16 = 0x12;
/// The value a guest expects from a 16-bit read of [`PLATFORM_PORT_MAGIC`].
pub const PLATFORM_MAGIC: u16 = 0x49d2;
/// The unplug protocol version read from [`PLATFORM_PORT_PROTOCOL`].
pub const PLATFORM_PROTOCOL_VERSION: u8 = 1;

/// Bits of the unplug mask written to [`PLATFORM_PORT_MAGIC`].
pub mod unplug {
    /// All emulated IDE disks.
    pub const IDE_DISKS: u16 = 1 << 0;
    /// All emulated NICs.
    pub const NICS: u16 = 1 << 1;
    /// Emulated IDE disks other than the primary master.
    pub const AUX_IDE_DISKS: u16 = 1 << 2;
}

// Configuration-space offsets.
const VENDOR_ID: u8 = 0x00;
const DEVICE_ID: u8 = 0x02;
const COMMAND: u8 = 0x04;
const REVISION: u8 = 0x08;
const CLASS_PROG_IF: u8 = 0x09;
const CACHE_LINE: u8 = 0x0c;
const LATENCY: u8 = 0x0d;
const BAR0: u8 = 0x10;
const BAR1: u8 = 0x14;
const SUBSYS_VENDOR: u8 = 0x2c;
const SUBSYS_ID: u8 = 0x2e;
const INTERRUPT_LINE: u8 = 0x3c;
const INTERRUPT_PIN: u8 = 0x3d;

/// Command bits the guest may change: I/O space, memory space, bus master,
/// parity error response, SERR#, INTx disable.
const COMMAND_WRITABLE: u16 = 0x0547;
const COMMAND_IO: u16 = 1 << 0;
const COMMAND_MEMORY: u16 = 1 << 1;
/// BAR type bits: I/O space.
const BAR_IO: u32 = 0x1;
/// BAR type bits: 32-bit memory, prefetchable.
const BAR_MEM32_PREFETCH: u32 = 0x8;

/// What the guest told the platform device's fixed ports (unplug protocol).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnplugState {
    /// Last unplug mask written (see [`unplug`]).
    pub mask: Option<u16>,
    /// PV product number (Linux writes 3).
    pub product: Option<u16>,
    /// PV driver version/build number.
    pub driver_version: Option<u32>,
}

/// One PCI function's configuration space: values plus the bits the guest may
/// write. Indexing by `u8` keeps every access in bounds.
struct Function {
    cfg: [u8; 256],
    wmask: [u8; 256],
}

impl Function {
    fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut f = Function {
            cfg: [0; 256],
            wmask: [0; 256],
        };
        f.set16(VENDOR_ID, vendor, 0);
        f.set16(DEVICE_ID, device, 0);
        f.cfg[usize::from(REVISION)] = revision;
        let class = class.to_le_bytes();
        f.cfg[usize::from(CLASS_PROG_IF)..usize::from(CLASS_PROG_IF) + 3]
            .copy_from_slice(&class[..3]);
        f.set16(COMMAND, 0, COMMAND_WRITABLE);
        f.wmask[usize::from(CACHE_LINE)] = 0xff;
        f.wmask[usize::from(LATENCY)] = 0xff;
        f
    }

    fn set16(&mut self, off: u8, v: u16, wmask: u16) {
        self.set_bytes(off, &v.to_le_bytes(), &wmask.to_le_bytes());
    }

    fn set32(&mut self, off: u8, v: u32, wmask: u32) {
        self.set_bytes(off, &v.to_le_bytes(), &wmask.to_le_bytes());
    }

    fn set_bytes(&mut self, off: u8, v: &[u8], m: &[u8]) {
        let o = usize::from(off);
        self.cfg[o..o + v.len()].copy_from_slice(v);
        self.wmask[o..o + m.len()].copy_from_slice(m);
    }

    fn read16(&self, off: u8) -> u16 {
        let o = usize::from(off);
        u16::from_le_bytes([self.cfg[o], self.cfg[o + 1]])
    }

    fn read32(&self, off: u8) -> u32 {
        let o = usize::from(off);
        u32::from_le_bytes([
            self.cfg[o],
            self.cfg[o + 1],
            self.cfg[o + 2],
            self.cfg[o + 3],
        ])
    }

    fn read_byte(&self, off: u8) -> u8 {
        self.cfg[usize::from(off)]
    }

    fn write_byte(&mut self, off: u8, v: u8) {
        let o = usize::from(off);
        let m = self.wmask[o];
        self.cfg[o] = (self.cfg[o] & !m) | (v & m);
    }
}

/// The Xen platform device with its BARs and the unplug-protocol state.
fn platform_function() -> Function {
    let mut f = Function::new(PLATFORM_VENDOR, PLATFORM_DEVICE, 0xff_8000, 1);
    f.set16(SUBSYS_VENDOR, PLATFORM_VENDOR, 0);
    f.set16(SUBSYS_ID, PLATFORM_DEVICE, 0);
    // Decoding on from the start, as QEMU's Xen platform device has it: no
    // firmware here enables it.
    f.set16(COMMAND, COMMAND_IO | COMMAND_MEMORY, COMMAND_WRITABLE);
    f.cfg[usize::from(INTERRUPT_PIN)] = 1;
    f.wmask[usize::from(INTERRUPT_LINE)] = 0xff;
    f.set32(
        BAR0,
        u32::from(PLATFORM_IO_BASE) | BAR_IO,
        !(PLATFORM_IO_SIZE as u32 - 1),
    );
    f.set32(
        BAR1,
        PLATFORM_MMIO_BASE | BAR_MEM32_PREFETCH,
        !(PLATFORM_MMIO_SIZE as u32 - 1),
    );
    f
}

struct Inner {
    address: u32,
    host: Function,
    platform: Function,
    unplug: UnplugState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Host,
    Platform,
}

impl Inner {
    /// The device the address register selects, and the dword register.
    fn selected(&self) -> Option<(Slot, u8)> {
        let a = self.address;
        if a & CONFIG_ENABLE == 0 {
            return None;
        }
        let (bus, dev, func) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7);
        let reg = (a & 0xfc) as u8;
        match (bus, dev, func) {
            (0, 0, 0) => Some((Slot::Host, reg)),
            (0, d, 0) if d == u32::from(PLATFORM_SLOT) => Some((Slot::Platform, reg)),
            _ => None,
        }
    }

    fn function(&mut self, slot: Slot) -> &mut Function {
        match slot {
            Slot::Host => &mut self.host,
            Slot::Platform => &mut self.platform,
        }
    }
}

/// PCI bus 0 and the Xen platform device. Shared by all vCPU threads.
pub struct PciBus {
    inner: Mutex<Inner>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    pub fn new() -> Self {
        PciBus {
            inner: Mutex::new(Inner {
                address: 0,
                host: Function::new(0x8086, 0x1237, 0x06_0000, 2),
                platform: platform_function(),
                unplug: UnplugState::default(),
            }),
        }
    }

    /// Whether `port` is one of the configuration ports (0xCF8-0xCFF).
    pub fn is_config_port(port: u16) -> bool {
        (CONFIG_ADDRESS..=CONFIG_DATA_LAST).contains(&port)
    }

    /// A guest `in` from 0xCF8-0xCFF. Absent devices, a disabled address
    /// register and bytes past 0xCFF read as all ones.
    pub fn config_in(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        let mut s = self.inner.lock();
        if port == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&s.address.to_le_bytes());
            return;
        }
        let Some(first) = port.checked_sub(CONFIG_DATA).filter(|o| *o <= 3) else {
            return;
        };
        if let Some((slot, reg)) = s.selected() {
            let f = s.function(slot);
            for (i, b) in data.iter_mut().enumerate().take(usize::from(4 - first)) {
                *b = f.read_byte(reg + first as u8 + i as u8);
            }
        }
    }

    /// A guest `out` to 0xCF8-0xCFF. Writes to absent devices, read-only
    /// bits and bytes past 0xCFF are dropped.
    pub fn config_out(&self, port: u16, data: &[u8]) {
        let mut s = self.inner.lock();
        if port == CONFIG_ADDRESS {
            if let Ok(v) = <[u8; 4]>::try_from(data) {
                s.address = u32::from_le_bytes(v);
            }
            return;
        }
        let Some(first) = port.checked_sub(CONFIG_DATA).filter(|o| *o <= 3) else {
            return;
        };
        let Some((slot, reg)) = s.selected() else {
            return;
        };
        let f = s.function(slot);
        let before = (f.read32(BAR0), f.read32(BAR1));
        for (i, b) in data.iter().enumerate().take(usize::from(4 - first)) {
            f.write_byte(reg + first as u8 + i as u8, *b);
        }
        let after = (f.read32(BAR0), f.read32(BAR1));
        if slot == Slot::Platform && before != after {
            tracing::debug!(
                bar0 = format_args!("{:#x}", after.0),
                bar1 = format_args!("{:#x}", after.1),
                "xen-platform-pci BARs written"
            );
        }
    }

    /// The platform device's memory BAR (BAR1) as `(base, size)`: where the
    /// guest places grant-table frames (`XENMEM_add_to_physmap` to gpfn
    /// `base / 4096 + i`). The base is the BAR as last programmed, whether or
    /// not memory decoding is enabled; it is the initial
    /// [`PLATFORM_MMIO_BASE`] until the guest moves it. While the guest sizes
    /// the BAR (all ones written) the base reads as the size mask.
    pub fn platform_mmio(&self) -> (u64, u64) {
        let bar = self.inner.lock().platform.read32(BAR1);
        (u64::from(bar & !0xf), PLATFORM_MMIO_SIZE)
    }

    /// The platform device's I/O BAR (BAR0) as `(base, size)`.
    pub fn platform_io(&self) -> (u64, u64) {
        let bar = self.inner.lock().platform.read32(BAR0);
        (u64::from(bar & !0x3), PLATFORM_IO_SIZE)
    }

    /// Whether `port` falls in BAR0 while I/O decoding is enabled. The range
    /// has no registers: it reads as zeros and ignores writes.
    pub fn platform_io_decodes(&self, port: u16) -> bool {
        let s = self.inner.lock();
        if s.platform.read16(COMMAND) & COMMAND_IO == 0 {
            return false;
        }
        let base = u64::from(s.platform.read32(BAR0) & !0x3);
        (base..base + PLATFORM_IO_SIZE).contains(&u64::from(port))
    }

    /// Whether `port` is one of the platform device's fixed ports (0x10-0x13).
    pub fn is_platform_port(port: u16) -> bool {
        (PLATFORM_PORT_MAGIC..PLATFORM_PORT_MAGIC + 4).contains(&port)
    }

    /// A guest `in` from the fixed ports 0x10-0x13. Reads the protocol does
    /// not define return all ones.
    pub fn platform_in(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match (port, data.len()) {
            (PLATFORM_PORT_MAGIC, 2) => data.copy_from_slice(&PLATFORM_MAGIC.to_le_bytes()),
            // Platform flags (Xen's ROM lock bit): none.
            (PLATFORM_PORT_MAGIC, 1) => data[0] = 0,
            (PLATFORM_PORT_PROTOCOL, 1) => data[0] = PLATFORM_PROTOCOL_VERSION,
            _ => {}
        }
    }

    /// A guest `out` to the fixed ports 0x10-0x13, except the 8-bit debug log
    /// byte at 0x12, which the port bus sends to the console.
    pub fn platform_out(&self, port: u16, data: &[u8]) {
        match (port, data) {
            (PLATFORM_PORT_MAGIC, &[lo, hi]) => {
                let mask = u16::from_le_bytes([lo, hi]);
                tracing::info!(
                    mask = format_args!("{mask:#x}"),
                    ide_disks = mask & unplug::IDE_DISKS != 0,
                    nics = mask & unplug::NICS != 0,
                    aux_ide_disks = mask & unplug::AUX_IDE_DISKS != 0,
                    "guest unplugged emulated devices (none are emulated)"
                );
                self.inner.lock().unplug.mask = Some(mask);
            }
            (PLATFORM_PORT_MAGIC, &[a, b, c, d]) => {
                let v = u32::from_le_bytes([a, b, c, d]);
                tracing::debug!(version = format_args!("{v:#x}"), "guest PV driver version");
                self.inner.lock().unplug.driver_version = Some(v);
            }
            (PLATFORM_PORT_PROTOCOL, &[lo, hi]) => {
                let p = u16::from_le_bytes([lo, hi]);
                tracing::info!(product = p, "guest PV driver product number");
                self.inner.lock().unplug.product = Some(p);
            }
            _ => tracing::debug!(
                port = format_args!("{port:#x}"),
                len = data.len(),
                "ignored write to a Xen platform port"
            ),
        }
    }

    /// What the guest wrote to the unplug protocol so far.
    pub fn unplug_state(&self) -> UnplugState {
        self.inner.lock().unplug
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(dev: u32, reg: u32) -> [u8; 4] {
        (CONFIG_ENABLE | dev << 11 | reg).to_le_bytes()
    }

    fn read32(bus: &PciBus, dev: u32, reg: u32) -> u32 {
        bus.config_out(CONFIG_ADDRESS, &addr(dev, reg));
        let mut d = [0u8; 4];
        bus.config_in(CONFIG_DATA, &mut d);
        u32::from_le_bytes(d)
    }

    fn write32(bus: &PciBus, dev: u32, reg: u32, v: u32) {
        bus.config_out(CONFIG_ADDRESS, &addr(dev, reg));
        bus.config_out(CONFIG_DATA, &v.to_le_bytes());
    }

    #[test]
    fn config_in_host_bridge_identifies_as_440fx() {
        let bus = PciBus::new();
        assert_eq!(read32(&bus, 0, 0), 0x1237_8086);
        assert_eq!(read32(&bus, 0, 8) >> 8, 0x06_0000);
        assert_eq!(read32(&bus, 0, 0x0c) >> 16 & 0xff, 0, "header type 0");
    }

    #[test]
    fn config_in_platform_device_matches_xen() {
        let bus = PciBus::new();
        let d = u32::from(PLATFORM_SLOT);
        assert_eq!(read32(&bus, d, 0), 0x0001_5853);
        assert_eq!(
            read32(&bus, d, 8),
            0xff80_0001,
            "class 0xff8000, revision 1"
        );
        assert_eq!(read32(&bus, d, 0x2c), 0x0001_5853, "subsystem");
        assert_eq!(read32(&bus, d, 0x3c) >> 8 & 0xff, 1, "INTA");
        assert_eq!(read32(&bus, d, 0x10), u32::from(PLATFORM_IO_BASE) | 1);
        assert_eq!(read32(&bus, d, 0x14), PLATFORM_MMIO_BASE | 8);
        assert_eq!(read32(&bus, d, 0x18), 0, "no BAR2");
        assert_eq!(read32(&bus, d, 0x04) & 3, 3, "I/O and memory decoding on");
    }

    #[test]
    fn config_in_absent_devices_and_functions_read_all_ones() {
        let bus = PciBus::new();
        for dev in [1, 3, 31] {
            assert_eq!(read32(&bus, dev, 0), 0xffff_ffff);
        }
        // Function 1 of the host bridge, device 0 of bus 1.
        assert_eq!(read32(&bus, 0, 1 << 8), 0xffff_ffff);
        assert_eq!(read32(&bus, 0, 1 << 16), 0xffff_ffff);
    }

    #[test]
    fn config_in_disabled_address_reads_all_ones() {
        let bus = PciBus::new();
        bus.config_out(CONFIG_ADDRESS, &0u32.to_le_bytes());
        let mut d = [0u8; 4];
        bus.config_in(CONFIG_DATA, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn config_address_dword_only_survives_type1_probe() {
        // Linux's pci_check_type1: outb(0x01, 0xCFB), then outl/inl 0xCF8.
        let bus = PciBus::new();
        bus.config_out(CONFIG_ADDRESS, &0x8000_0000u32.to_le_bytes());
        bus.config_out(0xcfb, &[0x01]);
        bus.config_out(0xcfa, &[0x00]);
        bus.config_out(CONFIG_ADDRESS, &[0x00]);
        let mut d = [0u8; 4];
        bus.config_in(CONFIG_ADDRESS, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        let mut b = [0u8; 1];
        bus.config_in(CONFIG_ADDRESS, &mut b);
        assert_eq!(
            b,
            [0xff],
            "no byte-wide address register (type 2 probe fails)"
        );
    }

    #[test]
    fn config_in_byte_and_word_offsets_select_bytes() {
        let bus = PciBus::new();
        bus.config_out(CONFIG_ADDRESS, &addr(u32::from(PLATFORM_SLOT), 0));
        let mut w = [0u8; 2];
        bus.config_in(CONFIG_DATA + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), PLATFORM_DEVICE);
        let mut b = [0u8; 1];
        bus.config_in(CONFIG_DATA + 1, &mut b);
        assert_eq!(b[0], 0x58);
        // The class word at 0x0a as Linux's sanity check reads it.
        bus.config_out(CONFIG_ADDRESS, &addr(0, 8));
        bus.config_in(CONFIG_DATA + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0600);
    }

    #[test]
    fn config_odd_sizes_and_offsets_never_panic() {
        let bus = PciBus::new();
        for a in [0u32, 0x8000_0000, 0x8000_10ff, 0xffff_ffff, 0x8000_00fc] {
            bus.config_out(CONFIG_ADDRESS, &a.to_le_bytes());
            for port in CONFIG_ADDRESS..=CONFIG_DATA_LAST {
                for len in [0usize, 1, 2, 3, 4, 8] {
                    let mut d = vec![0u8; len];
                    bus.config_in(port, &mut d);
                    bus.config_out(port, &vec![0xff; len]);
                }
            }
        }
        // A dword at 0xCFE only reaches bytes 2 and 3 of the register.
        bus.config_out(CONFIG_ADDRESS, &addr(0, 0));
        let mut d = [0u8; 4];
        bus.config_in(0xcfe, &mut d);
        assert_eq!(d, [0x37, 0x12, 0xff, 0xff]);
    }

    #[test]
    fn bar_sizing_reads_size_mask_with_type_bits() {
        let bus = PciBus::new();
        let d = u32::from(PLATFORM_SLOT);
        write32(&bus, d, 0x10, 0xffff_ffff);
        assert_eq!(read32(&bus, d, 0x10), !(PLATFORM_IO_SIZE as u32 - 1) | 1);
        write32(&bus, d, 0x14, 0xffff_ffff);
        let sz = read32(&bus, d, 0x14);
        assert_eq!(sz & 0xf, 8, "32-bit prefetchable");
        assert_eq!(u64::from(!(sz & !0xf)) + 1, PLATFORM_MMIO_SIZE);
        // Unimplemented BARs and the ROM BAR size to zero.
        write32(&bus, d, 0x18, 0xffff_ffff);
        write32(&bus, d, 0x30, 0xffff_ffff);
        assert_eq!((read32(&bus, d, 0x18), read32(&bus, d, 0x30)), (0, 0));
    }

    #[test]
    fn bar_reprogramming_moves_platform_ranges() {
        let bus = PciBus::new();
        let d = u32::from(PLATFORM_SLOT);
        assert_eq!(
            bus.platform_mmio(),
            (u64::from(PLATFORM_MMIO_BASE), PLATFORM_MMIO_SIZE)
        );
        write32(&bus, d, 0x14, 0xe100_0000);
        write32(&bus, d, 0x10, 0xd001); // low bits are ignored
        assert_eq!(read32(&bus, d, 0x14), 0xe100_0008);
        assert_eq!(bus.platform_mmio(), (0xe100_0000, PLATFORM_MMIO_SIZE));
        assert_eq!(bus.platform_io(), (0xd000, PLATFORM_IO_SIZE));
        // An unaligned address keeps only the size-aligned bits.
        write32(&bus, d, 0x14, 0xe180_0000);
        assert_eq!(bus.platform_mmio().0, 0xe100_0000);
        assert!(bus.platform_io_decodes(0xd0ff) && !bus.platform_io_decodes(0xc000));
    }

    #[test]
    fn command_register_keeps_decode_bits_and_gates_io() {
        let bus = PciBus::new();
        let d = u32::from(PLATFORM_SLOT);
        bus.config_out(CONFIG_ADDRESS, &addr(d, 4));
        bus.config_out(CONFIG_DATA, &0xffffu16.to_le_bytes());
        assert_eq!(read32(&bus, d, 4) & 0xffff, u32::from(COMMAND_WRITABLE));
        assert!(bus.platform_io_decodes(PLATFORM_IO_BASE));
        write32(&bus, d, 4, 0);
        assert_eq!(read32(&bus, d, 4), 0, "status reads zero, command cleared");
        assert!(!bus.platform_io_decodes(PLATFORM_IO_BASE));
    }

    #[test]
    fn read_only_identity_ignores_writes() {
        let bus = PciBus::new();
        write32(&bus, 0, 0, 0);
        write32(&bus, u32::from(PLATFORM_SLOT), 8, 0);
        assert_eq!(read32(&bus, 0, 0), 0x1237_8086);
        assert_eq!(read32(&bus, u32::from(PLATFORM_SLOT), 8), 0xff80_0001);
    }

    #[test]
    fn platform_ports_linux_unplug_handshake_succeeds() {
        let bus = PciBus::new();
        let (mut w, mut b) = ([0u8; 2], [0u8; 1]);
        bus.platform_in(PLATFORM_PORT_MAGIC, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x49d2);
        bus.platform_in(PLATFORM_PORT_PROTOCOL, &mut b);
        assert_eq!(b[0], 1);
        bus.platform_out(PLATFORM_PORT_PROTOCOL, &3u16.to_le_bytes());
        bus.platform_out(PLATFORM_PORT_MAGIC, &0x0006_0100u32.to_le_bytes());
        bus.platform_in(PLATFORM_PORT_MAGIC, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x49d2, "not blacklisted");
        bus.platform_out(
            PLATFORM_PORT_MAGIC,
            &(unplug::IDE_DISKS | unplug::NICS).to_le_bytes(),
        );
        assert_eq!(
            bus.unplug_state(),
            UnplugState {
                mask: Some(3),
                product: Some(3),
                driver_version: Some(0x0006_0100),
            }
        );
    }

    #[test]
    fn platform_ports_undefined_accesses_read_all_ones() {
        let bus = PciBus::new();
        let mut d = [0u8; 4];
        bus.platform_in(PLATFORM_PORT_MAGIC, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut w = [0u8; 2];
        bus.platform_in(PLATFORM_PORT_PROTOCOL, &mut w);
        assert_eq!(w, [0xff; 2]);
        bus.platform_out(0x11, &[1, 2, 3]);
        bus.platform_out(PLATFORM_PORT_PROTOCOL, &[1, 2, 3, 4]);
        assert_eq!(bus.unplug_state(), UnplugState::default());
    }
}
