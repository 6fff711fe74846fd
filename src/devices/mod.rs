//! Legacy port-I/O devices a Xen HVM guest touches: the Xen debug ports
//! (0xE9 and the platform device's log port 0x12), the 16550 serial port
//! (vm-superio), the CMOS/RTC (enough for a clock read), reset through the
//! keyboard controller and 0xCF9, PCI configuration space and the Xen
//! platform device's fixed ports 0x10/0x12 ([`crate::devices::pci`]), and the ACPI
//! sleep control/status registers through which the guest powers off.
//!
//! Each device is registered on the port [`Bus`] for its own range
//! ([`PlatformDevices::register`]); accesses are plain functions over
//! (port, data), tested without KVM. Console output goes to one shared
//! [`ConsoleOut`]. This layer never uses the KVM layer: interrupts leave
//! through eventfds (the serial IRQ is an irqfd the VMM registered).

pub mod bus;
pub mod pci;

pub use bus::{Bus, BusDevice, BusError, BusEvent};

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::pci::PciBus;

/// Where guest text goes: one writer shared by every console source
/// (console_io, debug ports, serial, PV console). Lines are flushed as they
/// complete so tests and users see output promptly.
///
/// It also tells the run loop (`crate::vmm::runner`) what a person would see:
/// whether the reader went away (EPIPE: stdout was a pipe whose reader
/// closed it), how long the guest has been silent, and it owns the one-line
/// status shown on a terminal while the guest is silent (erased before the
/// guest's next output).
pub struct ConsoleOut {
    out: Mutex<ConsoleState>,
    closed: AtomicBool,
    /// Called once when `closed` becomes true.
    on_closed: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// When the guest last wrote, in ms since `epoch`.
    last_write_ms: AtomicU64,
    epoch: Instant,
}

/// A second reader of the guest's console (`xenkvm console NAME`): gets a
/// copy of every byte the destination gets, in the same order. It must not
/// block (it is called with the console's lock held, from vCPU threads).
pub type ConsoleTap = Arc<dyn Fn(&[u8]) + Send + Sync>;

struct ConsoleState {
    out: Box<dyn Write + Send>,
    /// The last byte written was a newline (or nothing was written).
    at_line_start: bool,
    /// A status line is on the terminal (stderr) and must be erased first.
    status_shown: bool,
    /// An attached console client's copy ([`ConsoleOut::set_tap`]).
    tap: Option<ConsoleTap>,
}

impl ConsoleOut {
    pub fn new(out: Box<dyn Write + Send>) -> Arc<Self> {
        Arc::new(ConsoleOut {
            out: Mutex::new(ConsoleState {
                out,
                at_line_start: true,
                status_shown: false,
                tap: None,
            }),
            closed: AtomicBool::new(false),
            on_closed: Mutex::new(None),
            last_write_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    pub fn stdout() -> Arc<Self> {
        Self::new(Box::new(std::io::stdout()))
    }

    /// Writes guest bytes. Write errors do not fail the guest; a broken
    /// pipe (nobody reads the output any more) is remembered in
    /// [`ConsoleOut::closed`], and the run loop stops the guest.
    pub fn write(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.last_write_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let mut o = self.out.lock();
        if std::mem::take(&mut o.status_shown) {
            let _ = std::io::stderr().write_all(STATUS_ERASE.as_bytes());
        }
        if let Some(tap) = &o.tap {
            tap(data);
        }
        let mut r = o.out.write_all(data);
        o.at_line_start = data.last() == Some(&b'\n');
        if data.contains(&b'\n') {
            r = r.and_then(|()| o.out.flush());
        }
        if let Err(e) = r {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                drop(o);
                self.mark_closed();
            }
        }
    }

    pub fn flush(&self) {
        let mut o = self.out.lock();
        if let Err(e) = o.out.flush() {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                drop(o);
                self.mark_closed();
            }
        }
    }

    /// Sends a copy of everything written from now on to `tap` as well
    /// (`None`: stop); returns the previous tap.
    pub fn set_tap(&self, tap: Option<ConsoleTap>) -> Option<ConsoleTap> {
        std::mem::replace(&mut self.out.lock().tap, tap)
    }

    /// Calls `f` when the output's reader goes away (at once if it has).
    pub fn on_closed(&self, f: Box<dyn Fn() + Send + Sync>) {
        if self.closed() {
            f();
        }
        *self.on_closed.lock() = Some(f);
    }

    fn mark_closed(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            if let Some(f) = self.on_closed.lock().as_ref() {
                f();
            }
        }
    }

    /// The output's reader went away (a write failed with EPIPE).
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// How long since the guest last wrote (since creation if it never did).
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_write_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// Shows `line` as the terminal's status line on stderr (replacing the
    /// previous one) when the guest's output ends with a complete line; the
    /// guest's next output erases it. Returns false if not shown.
    pub fn show_status(&self, line: &str) -> bool {
        let mut o = self.out.lock();
        if !o.at_line_start {
            return false;
        }
        let _ = o.out.flush();
        let _ = write!(std::io::stderr(), "{STATUS_ERASE}{line}");
        o.status_shown = true;
        true
    }

    /// Erases the status line, if one is shown.
    pub fn clear_status(&self) {
        let mut o = self.out.lock();
        if std::mem::take(&mut o.status_shown) {
            let _ = std::io::stderr().write_all(STATUS_ERASE.as_bytes());
        }
    }
}

/// Where Xen's own console goes: what a guest writes with `console_io`
/// and to the debug ports 0xE9 and 0x12. The guest's console proper (the
/// PV console ring, hvc0; the serial port) always goes to the
/// [`ConsoleOut`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XenConsoleTo {
    /// The same output as the guest's console, interleaved with it (the
    /// library's default; what `xenkvm demo` uses for its test guest, which
    /// reports on Xen's console).
    #[default]
    Console,
    /// The log, one event per line at level info with target
    /// [`XEN_CONSOLE_TARGET`] (`--log-level xen_console=info` shows it), as
    /// Xen keeps it for `xl dmesg`: the command line's default.
    Log,
}

/// The tracing target of Xen's console lines.
pub const XEN_CONSOLE_TARGET: &str = "xen_console";

/// A line longer than this is logged in pieces.
const XEN_CONSOLE_LINE_MAX: usize = 1024;

/// One source of Xen-console text (`console_io`, a debug port), sent where
/// [`XenConsoleTo`] says. In the log, whole lines: a partial line waits for
/// its end (or the source's end).
pub struct XenConsole {
    to: XenConsoleTo,
    console: Arc<ConsoleOut>,
    source: &'static str,
    line: Mutex<Vec<u8>>,
}

impl XenConsole {
    pub fn new(to: XenConsoleTo, console: Arc<ConsoleOut>, source: &'static str) -> Self {
        XenConsole {
            to,
            console,
            source,
            line: Mutex::new(Vec::new()),
        }
    }

    pub fn write(&self, data: &[u8]) {
        if self.to == XenConsoleTo::Console {
            self.console.write(data);
            return;
        }
        let mut line = self.line.lock();
        for &b in data {
            if b == b'\n' {
                self.emit(&line);
                line.clear();
            } else {
                line.push(b);
                if line.len() >= XEN_CONSOLE_LINE_MAX {
                    self.emit(&line);
                    line.clear();
                }
            }
        }
    }

    /// Logs a partial line.
    pub fn flush(&self) {
        let mut line = self.line.lock();
        if !line.is_empty() {
            self.emit(&line);
            line.clear();
        }
    }

    fn emit(&self, line: &[u8]) {
        // Guest text: control characters (terminal escapes) are shown
        // escaped, not sent to the log's terminal.
        let text: String = String::from_utf8_lossy(line)
            .trim_end_matches('\r')
            .chars()
            .map(|c| {
                if c.is_control() && c != '\t' {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect();
        tracing::info!(target: XEN_CONSOLE_TARGET, source = self.source, "{text}");
    }
}

impl Drop for XenConsole {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Carriage return and "erase to end of line".
const STATUS_ERASE: &str = "\r\x1b[K";

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

pub const COM1: u16 = 0x3f8;
pub const DEBUG_PORT_E9: u16 = 0xe9;
pub const XEN_PLATFORM_LOG: u16 = 0x12;
const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;
const KBD_STATUS: u16 = 0x64;
const RESET_CF9: u16 = 0xcf9;
/// ACPI sleep control register (the FADT's SLEEP_CONTROL_REG, 8 bits).
pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
/// ACPI sleep status register (the FADT's SLEEP_STATUS_REG, 8 bits).
pub const ACPI_SLEEP_STATUS: u16 = 0x601;
/// The SLP_TYP value of S5 (the DSDT's `_S5_` package carries it).
pub const S5_SLP_TYP: u8 = 5;
/// Sleep control register: SLP_EN (bit 5) and SLP_TYP (bits 4:2).
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;

/// The platform's port-I/O devices, each registered on the port bus for
/// its own range.
pub struct PlatformDevices {
    pub pci: Arc<PciBus>,
}

impl PlatformDevices {
    /// Builds the devices and registers them on `pio`.
    pub fn register(
        pio: &Arc<Bus>,
        console: Arc<ConsoleOut>,
        xen_console: XenConsoleTo,
        serial_irq: EventFd,
    ) -> Result<Self, BusError> {
        let pci = Arc::new(PciBus::new());
        pio.insert(
            u64::from(DEBUG_PORT_E9),
            1,
            Arc::new(DebugPort(XenConsole::new(
                xen_console,
                console.clone(),
                "port 0xe9",
            ))),
        )?;
        pio.insert(
            u64::from(pci::PLATFORM_PORT_MAGIC),
            4,
            Arc::new(PlatformPorts {
                pci: pci.clone(),
                console: XenConsole::new(xen_console, console.clone(), "port 0x12"),
            }),
        )?;
        pio.insert(
            u64::from(COM1),
            8,
            Arc::new(SerialPort(Mutex::new(Serial::new(
                IrqFd(serial_irq),
                SerialOut(console),
            )))),
        )?;
        pio.insert(u64::from(CMOS_INDEX), 2, Arc::new(Cmos(Mutex::new(0))))?;
        pio.insert(u64::from(KBD_STATUS), 1, Arc::new(Keyboard))?;
        let cfg = Arc::new(PciConfig {
            pci: pci.clone(),
            pio: Arc::downgrade(pio),
            bar0: Mutex::new(None),
        });
        pio.insert(u64::from(pci::CONFIG_ADDRESS), 8, cfg.clone())?;
        cfg.rehome_bar0();
        pio.insert(u64::from(ACPI_SLEEP_CONTROL), 2, Arc::new(AcpiSleep))?;
        // POST codes, I/O delay and the PC speaker port: read as zero.
        for port in [0x61u16, 0x80, 0xed] {
            pio.insert(u64::from(port), 1, Arc::new(Quiet))?;
        }
        Ok(PlatformDevices { pci })
    }

    /// The Xen platform device's memory BAR (BAR1) as `(base, size)`, where
    /// the guest places grant-table frames; see [`PciBus::platform_mmio`].
    pub fn platform_mmio(&self) -> (u64, u64) {
        self.pci.platform_mmio()
    }
}

/// Port 0xE9: the Bochs/Xen debug console (reads 0xE9: present).
struct DebugPort(XenConsole);

impl BusDevice for DebugPort {
    fn read(&self, _: u64, data: &mut [u8]) {
        data[0] = 0xe9;
    }
    fn write(&self, _: u64, data: &[u8]) -> BusEvent {
        if data.len() == 1 {
            self.0.write(data);
        }
        BusEvent::None
    }
}

/// The Xen platform device's fixed ports 0x10-0x13 (unplug protocol);
/// byte writes to 0x12 are its log.
struct PlatformPorts {
    pci: Arc<PciBus>,
    console: XenConsole,
}

impl BusDevice for PlatformPorts {
    fn read(&self, addr: u64, data: &mut [u8]) {
        self.pci.platform_in(addr as u16, data);
    }
    fn write(&self, addr: u64, data: &[u8]) -> BusEvent {
        let port = addr as u16;
        if port == XEN_PLATFORM_LOG && data.len() == 1 {
            self.console.write(data);
        } else {
            self.pci.platform_out(port, data);
        }
        BusEvent::None
    }
}

/// COM1, a 16550 (vm-superio).
struct SerialPort(Mutex<Serial<IrqFd, NoEvents, SerialOut>>);

impl BusDevice for SerialPort {
    fn read(&self, addr: u64, data: &mut [u8]) {
        data[0] = self.0.lock().read((addr - u64::from(COM1)) as u8);
    }
    fn write(&self, addr: u64, data: &[u8]) -> BusEvent {
        if let Err(e) = self.0.lock().write((addr - u64::from(COM1)) as u8, data[0]) {
            tracing::warn!(?e, "serial write failed");
        }
        BusEvent::None
    }
}

/// The CMOS/RTC index and data ports (enough for a clock read).
struct Cmos(Mutex<u8>);

impl BusDevice for Cmos {
    fn read(&self, addr: u64, data: &mut [u8]) {
        let i = *self.0.lock();
        data[0] = if addr == u64::from(CMOS_DATA) {
            cmos_read(i)
        } else {
            i
        };
    }
    fn write(&self, addr: u64, data: &[u8]) -> BusEvent {
        if addr == u64::from(CMOS_INDEX) {
            *self.0.lock() = data[0] & 0x7f;
        }
        BusEvent::None
    }
}

/// The keyboard controller's status port: 0xFE written is a reset.
struct Keyboard;

impl BusDevice for Keyboard {
    fn read(&self, _: u64, data: &mut [u8]) {
        data[0] = 0x1c;
    }
    fn write(&self, _: u64, data: &[u8]) -> BusEvent {
        if data[0] == 0xfe {
            BusEvent::Reset
        } else {
            BusEvent::None
        }
    }
}

/// PCI configuration mechanism #1 (0xCF8-0xCFF) with the reset control
/// register at 0xCF9 (byte accesses). After each configuration write the
/// platform device's I/O BAR is registered where the guest put it (and only
/// while I/O decoding is on).
struct PciConfig {
    pci: Arc<PciBus>,
    pio: std::sync::Weak<Bus>,
    /// Where BAR0 is registered on the port bus now.
    bar0: Mutex<Option<u64>>,
}

impl PciConfig {
    fn rehome_bar0(&self) {
        let (base, size) = self.pci.platform_io();
        let want =
            (base != 0 && base + size <= 0x1_0000 && self.pci.platform_io_decodes(base as u16))
                .then_some(base);
        let mut cur = self.bar0.lock();
        if *cur == want {
            return;
        }
        let Some(pio) = self.pio.upgrade() else {
            return;
        };
        if let Some(old) = cur.take() {
            pio.remove(old);
        }
        if let Some(b) = want {
            match pio.insert(b, size, Arc::new(Quiet)) {
                Ok(()) => *cur = Some(b),
                Err(e) => tracing::warn!(%e, "the platform device's I/O BAR is not decoded"),
            }
        }
    }
}

impl BusDevice for PciConfig {
    fn read(&self, addr: u64, data: &mut [u8]) {
        let port = addr as u16;
        if port == RESET_CF9 && data.len() == 1 {
            // The reset control register: no bits set.
            data[0] = 0;
        } else {
            self.pci.config_in(port, data);
        }
    }
    fn write(&self, addr: u64, data: &[u8]) -> BusEvent {
        let port = addr as u16;
        if port == RESET_CF9 && data.len() == 1 {
            return if data[0] & 0x04 != 0 {
                BusEvent::Reset
            } else {
                BusEvent::None
            };
        }
        self.pci.config_out(port, data);
        self.rehome_bar0();
        BusEvent::None
    }
}

/// The ACPI sleep control and status registers.
struct AcpiSleep;

impl BusDevice for AcpiSleep {
    fn read(&self, _: u64, data: &mut [u8]) {
        // Not sleeping, never woken: no WAK_STS.
        if data.len() == 1 {
            data[0] = 0;
        }
    }
    fn write(&self, addr: u64, data: &[u8]) -> BusEvent {
        // Writing WAK_STS (the status register) clears it; it is never set.
        if addr == u64::from(ACPI_SLEEP_CONTROL) && data.len() == 1 {
            sleep_control(data[0])
        } else {
            BusEvent::None
        }
    }
}

/// Ports that read as zero and ignore writes.
struct Quiet;

impl BusDevice for Quiet {
    fn read(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _: u64, _: &[u8]) -> BusEvent {
        BusEvent::None
    }
}

/// A write to the ACPI sleep control register: SLP_EN with SLP_TYP = S5
/// powers off; other sleep states are not offered (no `_S3_` etc.).
fn sleep_control(v: u8) -> BusEvent {
    if v & SLP_EN == 0 {
        return BusEvent::None;
    }
    let typ = (v >> SLP_TYP_SHIFT) & 7;
    if typ == S5_SLP_TYP {
        return BusEvent::PowerOff;
    }
    tracing::warn!(
        typ,
        "guest asked for an ACPI sleep state that is not offered; ignored"
    );
    BusEvent::None
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

    struct ClosedPipe;
    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn console_out_broken_pipe_is_reported_closed() {
        let c = ConsoleOut::new(Box::new(ClosedPipe));
        assert!(!c.closed());
        c.write(b"hello\n");
        assert!(c.closed());
    }

    #[test]
    fn console_out_status_shown_only_at_line_start() {
        let c = ConsoleOut::new(Box::new(std::io::sink()));
        c.write(b"login: ");
        assert!(
            !c.show_status("status"),
            "mid-line: the guest waits for input"
        );
        c.write(b"\n");
        assert!(c.show_status("status"));
        c.clear_status();
    }

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

    /// The platform devices on a port bus, accessed as the vCPU does
    /// (unclaimed reads give all ones, unclaimed writes nothing).
    struct PortBus {
        bus: Arc<Bus>,
        dev: PlatformDevices,
    }

    impl PortBus {
        fn io_out(&self, port: u16, data: &[u8]) -> BusEvent {
            self.bus
                .write(u64::from(port), data)
                .unwrap_or(BusEvent::None)
        }
        fn io_in(&self, port: u16, data: &mut [u8]) {
            if !self.bus.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        fn pci(&self) -> &PciBus {
            &self.dev.pci
        }
        fn platform_mmio(&self) -> (u64, u64) {
            self.dev.platform_mmio()
        }
    }

    fn bus_with(xen: XenConsoleTo) -> (PortBus, Buf) {
        let b = Buf::default();
        let c = ConsoleOut::new(Box::new(b.clone()));
        let bus = Arc::new(Bus::new());
        let dev = PlatformDevices::register(&bus, c, xen, EventFd::new(0).unwrap()).unwrap();
        (PortBus { bus, dev }, b)
    }

    fn bus() -> (PortBus, Buf) {
        bus_with(XenConsoleTo::Console)
    }

    #[test]
    fn xen_console_log_keeps_debug_ports_off_the_guest_console() {
        let log = Buf::default();
        let l = log.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || l.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(sub, || {
            let (bus, out) = bus_with(XenConsoleTo::Log);
            for b in b"from e9\n" {
                bus.io_out(0xe9, &[*b]);
            }
            for b in b"from 12 \x1b[2J\n" {
                bus.io_out(0x12, &[*b]);
            }
            bus.io_out(0xe9, b"p");
            bus.io_out(COM1, b"!");
            assert_eq!(
                &*out.0.lock(),
                b"!",
                "only the serial port reaches the console"
            );
            drop(bus); // the partial line "p" is logged when its source ends
        });
        let log = String::from_utf8_lossy(&log.0.lock()).into_owned();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 3, "{log}");
        assert!(
            lines[0].contains("xen_console: from e9 source=\"port 0xe9\""),
            "{log}"
        );
        assert!(
            lines[1].contains("from 12 \\u{1b}[2J source=\"port 0x12\""),
            "escape sequences are escaped: {log}"
        );
        assert!(lines[2].contains(": p source=\"port 0xe9\""), "{log}");
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
        assert_eq!(bus.io_out(0x64, &[0xfe]), BusEvent::Reset);
        assert_eq!(bus.io_out(0xcf9, &[0x06]), BusEvent::Reset);
        assert_eq!(bus.io_out(0xcf9, &[0x02]), BusEvent::None);
    }

    fn inl(bus: &PortBus, port: u16) -> u32 {
        let mut d = [0u8; 4];
        bus.io_in(port, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn io_pci_config_reaches_devices_and_absent_read_all_ones() {
        let (bus, _) = bus();
        bus.io_out(0xcf8, &0x8000_0000u32.to_le_bytes());
        assert_eq!(inl(&bus, 0xcf8), 0x8000_0000);
        assert_eq!(inl(&bus, 0xcfc), 0x1237_8086);
        bus.io_out(0xcf8, &0x8000_1000u32.to_le_bytes());
        assert_eq!(inl(&bus, 0xcfc), 0x0001_5853);
        bus.io_out(0xcf8, &0x8000_0800u32.to_le_bytes());
        assert_eq!(inl(&bus, 0xcfc), 0xffff_ffff);
        // Type-1 probe byte writes leave the address register alone and
        // reset nothing.
        assert_eq!(bus.io_out(0xcfb, &[0x01]), BusEvent::None);
        assert_eq!(inl(&bus, 0xcf8), 0x8000_0800);
    }

    #[test]
    fn io_platform_unplug_handshake_and_log_byte() {
        let (bus, out) = bus();
        let (mut w, mut b) = ([0u8; 2], [0u8; 1]);
        bus.io_in(0x10, &mut w);
        bus.io_in(0x12, &mut b);
        assert_eq!((u16::from_le_bytes(w), b[0]), (0x49d2, 1));
        bus.io_out(0x12, &3u16.to_le_bytes());
        bus.io_out(0x10, &1u32.to_le_bytes());
        bus.io_in(0x10, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x49d2);
        bus.io_out(0x10, &3u16.to_le_bytes());
        let u = bus.pci().unplug_state();
        assert_eq!(
            (u.mask, u.product, u.driver_version),
            (Some(3), Some(3), Some(1))
        );
        bus.io_out(0x12, b"x");
        assert_eq!(&*out.0.lock(), b"x", "8-bit writes to 0x12 are the log");
    }

    #[test]
    fn io_platform_bar0_reads_zero_ignores_writes() {
        let (bus, _) = bus();
        let base = crate::boot::layout::PLATFORM_IO_BASE;
        bus.io_out(base + 4, &[0xff; 4]);
        assert_eq!(inl(&bus, base + 4), 0);
        assert_eq!(inl(&bus, base + 0x100), 0xffff_ffff, "past the BAR");
        assert_eq!(bus.platform_mmio().1, 16 << 20);
    }

    #[test]
    fn io_out_sleep_control_s5_powers_off() {
        let (bus, _) = bus();
        // What ACPICA writes for S5: SLP_TYP << 2 | SLP_EN.
        let s5 = (S5_SLP_TYP << 2) | 0x20;
        assert_eq!(bus.io_out(ACPI_SLEEP_STATUS, &[0x80]), BusEvent::None);
        assert_eq!(
            bus.io_out(ACPI_SLEEP_CONTROL, &[s5 & !0x20]),
            BusEvent::None
        );
        assert_eq!(
            bus.io_out(ACPI_SLEEP_CONTROL, &[(3 << 2) | 0x20]),
            BusEvent::None
        );
        assert_eq!(bus.io_out(ACPI_SLEEP_CONTROL, &[s5]), BusEvent::PowerOff);
        let mut b = [0xffu8];
        bus.io_in(ACPI_SLEEP_STATUS, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn io_odd_sizes_never_panic() {
        let (bus, _) = bus();
        for port in (0..0x20).chain(0xcf0..0xd08).chain(0x5f8..0x608) {
            for len in [0usize, 1, 2, 3, 4] {
                let mut d = vec![0u8; len];
                bus.io_in(port, &mut d);
                bus.io_out(port, &vec![0u8; len]);
            }
        }
    }

    #[test]
    fn civil_from_days_known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
    }
}
