//! Legacy port-I/O devices a Xen HVM guest touches: the Xen debug ports
//! (0xE9 and the platform device's log port 0x12), the 16550 serial port
//! (vm-superio), the CMOS/RTC (enough for a clock read), reset through the
//! keyboard controller and 0xCF9, and an empty PCI configuration space.
//!
//! `PortBus::io_in`/`io_out` are plain functions over (port, data) so they
//! are tested without KVM. Console output goes to one shared [`ConsoleOut`].

use std::io::Write;
use std::sync::Arc;

use parking_lot::Mutex;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Where guest text goes: one writer shared by every console source
/// (console_io, debug ports, serial, PV console). Lines are flushed as they
/// complete so tests and users see output promptly.
pub struct ConsoleOut {
    out: Mutex<Box<dyn Write + Send>>,
}

impl ConsoleOut {
    pub fn new(out: Box<dyn Write + Send>) -> Arc<Self> {
        Arc::new(ConsoleOut {
            out: Mutex::new(out),
        })
    }

    pub fn stdout() -> Arc<Self> {
        Self::new(Box::new(std::io::stdout()))
    }

    /// Writes guest bytes; write errors (a closed stdout) are ignored on
    /// purpose: the guest must not fail because nobody reads its console.
    pub fn write(&self, data: &[u8]) {
        let mut o = self.out.lock();
        let _ = o.write_all(data);
        if data.contains(&b'\n') {
            let _ = o.flush();
        }
    }

    pub fn flush(&self) {
        let _ = self.out.lock().flush();
    }
}

/// A `Write` adapter for vm-superio's serial output.
struct SerialOut(Arc<ConsoleOut>);

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush();
        Ok(())
    }
}

/// Raises the serial IRQ through an irqfd.
pub struct IrqFd(pub EventFd);

impl Trigger for IrqFd {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What a port access asks of the VMM beyond its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortEvent {
    None,
    /// The guest asked for a reset (0xCF9 or the keyboard controller).
    Reset,
}

pub const COM1: u16 = 0x3f8;
pub const DEBUG_PORT_E9: u16 = 0xe9;
pub const XEN_PLATFORM_LOG: u16 = 0x12;
const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;
const KBD_STATUS: u16 = 0x64;
const RESET_CF9: u16 = 0xcf9;
const PCI_CONFIG_ADDR: u16 = 0xcf8;
const PCI_CONFIG_DATA: u16 = 0xcfc;

/// The port-I/O devices.
pub struct PortBus {
    console: Arc<ConsoleOut>,
    serial: Mutex<Serial<IrqFd, NoEvents, SerialOut>>,
    cmos_index: Mutex<u8>,
    pci_addr: Mutex<u32>,
    unknown_logged: Mutex<std::collections::HashSet<u16>>,
}

impl PortBus {
    pub fn new(console: Arc<ConsoleOut>, serial_irq: EventFd) -> Self {
        PortBus {
            serial: Mutex::new(Serial::new(IrqFd(serial_irq), SerialOut(console.clone()))),
            console,
            cmos_index: Mutex::new(0),
            pci_addr: Mutex::new(0),
            unknown_logged: Mutex::new(Default::default()),
        }
    }

    /// Handles a guest `out`. Returns what the VMM must do next.
    pub fn io_out(&self, port: u16, data: &[u8]) -> PortEvent {
        match port {
            DEBUG_PORT_E9 | XEN_PLATFORM_LOG if data.len() == 1 => self.console.write(data),
            COM1..=0x3ff => {
                if let Err(e) = self.serial.lock().write((port - COM1) as u8, data[0]) {
                    tracing::warn!(?e, "serial write failed");
                }
            }
            CMOS_INDEX => *self.cmos_index.lock() = data[0] & 0x7f,
            CMOS_DATA => {}
            KBD_STATUS if data[0] == 0xfe => return PortEvent::Reset,
            RESET_CF9 if data[0] & 0x04 != 0 => return PortEvent::Reset,
            PCI_CONFIG_ADDR if data.len() == 4 => {
                *self.pci_addr.lock() = u32::from_le_bytes([data[0], data[1], data[2], data[3]])
            }
            // POST codes and I/O delay ports.
            0x80 | 0xed => {}
            _ => self.log_unknown(port, "write"),
        }
        PortEvent::None
    }

    /// Handles a guest `in`, filling `data`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            // Reading 0xE9 returns 0xE9 (Bochs/Xen convention: port present).
            DEBUG_PORT_E9 => data[0] = 0xe9,
            COM1..=0x3ff => data[0] = self.serial.lock().read((port - COM1) as u8),
            CMOS_DATA => data[0] = cmos_read(*self.cmos_index.lock()),
            CMOS_INDEX => data[0] = *self.cmos_index.lock(),
            KBD_STATUS => data[0] = 0x1c,
            PCI_CONFIG_ADDR if data.len() == 4 => {
                data.copy_from_slice(&self.pci_addr.lock().to_le_bytes())
            }
            // No PCI device: all ones (vendor 0xffff).
            PCI_CONFIG_DATA..=0xcff => {}
            0x80 | 0xed | 0x61 => data.fill(0),
            _ => self.log_unknown(port, "read"),
        }
    }

    fn log_unknown(&self, port: u16, what: &str) {
        if self.unknown_logged.lock().insert(port) {
            tracing::debug!(
                port = format_args!("{port:#x}"),
                "guest {what} of an unemulated I/O port (logged once)"
            );
        }
    }
}

/// CMOS registers: the RTC from the host clock (binary mode, 24 h), status
/// registers saying "update not in progress".
fn cmos_read(index: u8) -> u8 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, secs) = (now / 86400, now % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    match index {
        0x00 => (secs % 60) as u8,
        0x02 => (secs / 60 % 60) as u8,
        0x04 => (secs / 3600) as u8,
        0x06 => ((days + 4) % 7 + 1) as u8,
        0x07 => d as u8,
        0x08 => m as u8,
        0x09 => (y % 100) as u8,
        0x32 => (y / 100) as u8,
        0x0a => 0x26,
        0x0b => 0x06, // binary, 24-hour
        0x0d => 0x80, // RTC power good
        _ => 0,
    }
}

/// Gregorian date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn bus() -> (PortBus, Buf) {
        let b = Buf::default();
        let c = ConsoleOut::new(Box::new(b.clone()));
        (PortBus::new(c, EventFd::new(0).unwrap()), b)
    }

    #[test]
    fn io_out_debug_ports_reach_console() {
        let (bus, out) = bus();
        bus.io_out(0xe9, b"h");
        bus.io_out(0x12, b"i");
        bus.io_out(COM1, b"!");
        assert_eq!(&*out.0.lock(), b"hi!");
    }

    #[test]
    fn io_out_reset_ports_request_reset() {
        let (bus, _) = bus();
        assert_eq!(bus.io_out(0x64, &[0xfe]), PortEvent::Reset);
        assert_eq!(bus.io_out(0xcf9, &[0x06]), PortEvent::Reset);
        assert_eq!(bus.io_out(0xcf9, &[0x02]), PortEvent::None);
    }

    #[test]
    fn io_in_pci_without_devices_reads_all_ones() {
        let (bus, _) = bus();
        bus.io_out(0xcf8, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        bus.io_in(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn civil_from_days_known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
    }
}
