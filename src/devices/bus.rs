//! A bus of non-overlapping address ranges (one for port I/O, one for
//! MMIO), after Firecracker's `Bus` and rust-vmm's `vm-device`
//! `IoManager`: a device is registered for a range, overlaps are refused at
//! insert, and an access is routed to the device whose range holds it with
//! the absolute address. What no device claims goes back to the vCPU's exit
//! decision (`vcpu::exit::decide`), which logs it.
//!
//! Written here rather than taken from `vm-device`: that crate's bus wants
//! `&mut` devices behind its own mutex and knows no per-access result; ours
//! returns the [`BusEvent`] a write asks of the VMM (power off, reset, a
//! hypercall) and lets devices lock as finely as they need.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

/// What a write asks of the VMM beyond its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusEvent {
    None,
    /// The guest asked for a reset (0xCF9 or the keyboard controller).
    Reset,
    /// The guest entered ACPI S5 (soft off): power the VM off.
    PowerOff,
    /// A hypercall through the hypercall page's I/O-port stub.
    Hypercall,
    /// The test guest's bench stub: complete its `ret`, nothing else.
    StubReturn,
}

/// A device on a bus. Accesses carry the absolute address.
pub trait BusDevice: Send + Sync {
    /// A read of `data.len()` bytes at `addr` (filled with 0xff before).
    fn read(&self, addr: u64, data: &mut [u8]);
    /// A write of `data` at `addr`.
    fn write(&self, addr: u64, data: &[u8]) -> BusEvent;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {start:#x}+{len:#x} overlaps {other_start:#x}+{other_len:#x}")]
    Overlap {
        start: u64,
        len: u64,
        other_start: u64,
        other_len: u64,
    },
    #[error("empty or wrapping bus range {start:#x}+{len:#x}")]
    BadRange { start: u64, len: u64 },
}

type Entry = (u64, Arc<dyn BusDevice>);

/// Ranges `start -> (len, device)`.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev` for `start..start+len`.
    pub fn insert(&self, start: u64, len: u64, dev: Arc<dyn BusDevice>) -> Result<(), BusError> {
        if len == 0 || start.checked_add(len).is_none() {
            return Err(BusError::BadRange { start, len });
        }
        let mut r = self.ranges.write();
        let end = start + len;
        // The nearest range starting below `end` is the only one that can
        // overlap (ranges never overlap each other).
        if let Some((&s, (l, _))) = r.range(..end).next_back() {
            if s + l > start {
                return Err(BusError::Overlap {
                    start,
                    len,
                    other_start: s,
                    other_len: *l,
                });
            }
        }
        r.insert(start, (len, dev));
        Ok(())
    }

    /// Unregisters the range that starts at `start`.
    pub fn remove(&self, start: u64) -> bool {
        self.ranges.write().remove(&start).is_some()
    }

    fn find(&self, addr: u64, len: usize) -> Option<Arc<dyn BusDevice>> {
        let r = self.ranges.read();
        let (&s, (l, d)) = r.range(..=addr).next_back()?;
        let end = addr.checked_add(len as u64)?;
        (end <= s + l).then(|| d.clone())
    }

    /// Routes a read; false if no device holds the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some(d) => {
                data.fill(0xff);
                d.read(addr, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; `None` if no device holds the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<BusEvent> {
        self.find(addr, data.len()).map(|d| d.write(addr, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use proptest::prelude::*;

    #[derive(Default)]
    struct Rec(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Rec {
        fn read(&self, addr: u64, data: &mut [u8]) {
            data.fill(addr as u8);
        }
        fn write(&self, addr: u64, data: &[u8]) -> BusEvent {
            self.0.lock().push((addr, data.to_vec()));
            BusEvent::None
        }
    }

    #[test]
    fn bus_overlapping_insert_is_refused() {
        let b = Bus::new();
        b.insert(0x10, 4, Arc::new(Rec::default())).unwrap();
        for (s, l) in [(0x10, 1), (0x13, 1), (0xf, 2), (0x0, 0x100), (0x12, 8)] {
            assert!(
                matches!(
                    b.insert(s, l, Arc::new(Rec::default())),
                    Err(BusError::Overlap { .. })
                ),
                "{s:#x}+{l}"
            );
        }
        b.insert(0x14, 1, Arc::new(Rec::default())).unwrap();
        b.insert(0xf, 1, Arc::new(Rec::default())).unwrap();
        assert!(matches!(
            b.insert(u64::MAX, 2, Arc::new(Rec::default())),
            Err(BusError::BadRange { .. })
        ));
    }

    #[test]
    fn bus_access_reaches_the_device_with_its_absolute_address() {
        let b = Bus::new();
        let d = Arc::new(Rec::default());
        b.insert(0x3f8, 8, d.clone()).unwrap();
        assert_eq!(b.write(0x3fd, &[7]), Some(BusEvent::None));
        assert_eq!(d.0.lock()[0], (0x3fd, vec![7]));
        let mut x = [0u8; 2];
        assert!(b.read(0x3fe, &mut x));
        assert_eq!(x, [0xfe, 0xfe]);
        // Straddling the end of the range: nobody claims it.
        assert!(!b.read(0x3ff, &mut [0u8; 2]));
        assert_eq!(b.write(0x400, &[1]), None);
        assert!(b.remove(0x3f8));
        assert_eq!(b.write(0x3fd, &[7]), None);
    }

    proptest! {
        /// Whatever the guest accesses, the bus answers without panicking,
        /// and a claimed access lies inside one registered range.
        #[test]
        fn bus_random_accesses_never_panic(addr in any::<u64>(), len in 0usize..9) {
            let b = Bus::new();
            b.insert(0x10, 4, Arc::new(Rec::default())).unwrap();
            b.insert(u64::MAX - 4, 4, Arc::new(Rec::default())).unwrap();
            let mut data = vec![0u8; len];
            let claimed = b.read(addr, &mut data);
            let inside = |s: u64, l: u64| addr >= s && addr.checked_add(len as u64).is_some_and(|e| e <= s + l);
            prop_assert_eq!(claimed, inside(0x10, 4) || inside(u64::MAX - 4, 4));
        }
    }
}
