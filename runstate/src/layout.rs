//! The two guest layouts of `struct vcpu_runstate_info`
//! (`xen/include/public/vcpu.h`; the compat one from `foreign/x86_32.h`):
//!
//! | field              | 64-bit | 32-bit (packed) |
//! |--------------------|--------|-----------------|
//! | `state` (int)      | 0      | 0               |
//! | padding            | 4..8   | -               |
//! | `state_entry_time` | 8      | 4               |
//! | `time[4]`          | 16     | 12              |
//! | size               | 48     | 44              |
//!
//! The offsets are this crate's own constants, checked against `xen-abi`'s
//! generated structs once those exist (see the tests).

use crate::RunstateData;

/// `XEN_RUNSTATE_UPDATE`: set in `state_entry_time` while an update is in
/// progress (guests opt in with `VMASST_TYPE_runstate_update_flag`).
pub const XEN_RUNSTATE_UPDATE: u64 = 1 << 63;

/// `VMASST_TYPE_runstate_update_flag`.
pub const VMASST_TYPE_RUNSTATE_UPDATE_FLAG: u32 = 5;

/// Which layout the guest uses (latched from its mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Layout {
    /// 64-bit guests: 48 bytes, `state_entry_time` at 8.
    Native64 = 0,
    /// 32-bit guests: 44 bytes packed, `state_entry_time` at 4.
    Compat32 = 1,
}

impl Layout {
    /// Size of the area in bytes.
    pub const fn size(self) -> usize {
        match self {
            Layout::Native64 => 48,
            Layout::Compat32 => 44,
        }
    }

    /// Offset of `state_entry_time`.
    pub const fn entry_offset(self) -> usize {
        match self {
            Layout::Native64 => 8,
            Layout::Compat32 => 4,
        }
    }

    /// Offset of `time[0]`.
    pub const fn time_offset(self) -> usize {
        match self {
            Layout::Native64 => 16,
            Layout::Compat32 => 12,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Layout {
        if v == Layout::Compat32 as u8 {
            Layout::Compat32
        } else {
            Layout::Native64
        }
    }

    /// The 64-bit image with `entry` as `state_entry_time` (padding zero).
    #[inline(always)]
    pub fn encode64(self, d: &RunstateData, entry: u64) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0..4].copy_from_slice(&d.state.value().to_le_bytes());
        b[8..16].copy_from_slice(&entry.to_le_bytes());
        for (i, t) in d.time.iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&t.to_le_bytes());
        }
        b
    }

    /// The 32-bit packed image with `entry` as `state_entry_time`.
    #[inline(always)]
    pub fn encode32(self, d: &RunstateData, entry: u64) -> [u8; 44] {
        let mut b = [0u8; 44];
        b[0..4].copy_from_slice(&d.state.value().to_le_bytes());
        b[4..12].copy_from_slice(&entry.to_le_bytes());
        for (i, t) in d.time.iter().enumerate() {
            b[12 + 8 * i..20 + 8 * i].copy_from_slice(&t.to_le_bytes());
        }
        b
    }

    /// Parses an image in this layout (tests, `VCPUOP_get_runstate_info`
    /// consumers, debugging). `None` if too short or the state is invalid.
    pub fn decode(self, b: &[u8]) -> Option<RunstateData> {
        if b.len() < self.size() {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let state = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
        let t = self.time_offset();
        Some(RunstateData {
            state: crate::State::try_from(state).ok()?,
            state_entry_time: u64_at(self.entry_offset()),
            time: [u64_at(t), u64_at(t + 8), u64_at(t + 16), u64_at(t + 24)],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::State;

    #[test]
    fn layout_sizes_match_xen_abi() {
        assert_eq!(Layout::Native64.size(), 48);
        assert_eq!(Layout::Compat32.size(), 44);
        assert_eq!(Layout::Native64.time_offset() + 32, Layout::Native64.size());
        assert_eq!(Layout::Compat32.time_offset() + 32, Layout::Compat32.size());
    }

    #[test]
    fn encode_decode_roundtrip_both_layouts() {
        let d = RunstateData {
            state: State::Blocked,
            state_entry_time: 0x1122_3344_5566_7788,
            time: [1, 2, 3, u64::MAX],
        };
        let b = Layout::Native64.encode64(&d, d.state_entry_time);
        assert_eq!(&b[4..8], &[0; 4]);
        assert_eq!(Layout::Native64.decode(&b), Some(d));
        let b = Layout::Compat32.encode32(&d, d.state_entry_time);
        assert_eq!(Layout::Compat32.decode(&b), Some(d));
        assert_eq!(b[11], 0x11, "top byte of state_entry_time at offset 11");
    }
}
