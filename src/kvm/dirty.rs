//! KVM's dirty page log for live migration: `KVM_MEM_LOG_DIRTY_PAGES` on the
//! RAM memslots and `KVM_GET_DIRTY_LOG` (which returns the pages vCPUs wrote
//! since the previous call and write-protects them again).
//!
//! It sees only what vCPUs write: the VMM's own writes to guest memory are
//! in gpc's bitmap (`gpc::MemoryMap::take_dirty`), which the migration
//! merges with this one.

use std::sync::Arc;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;

use super::vm::{KvmVmError, MemSlots};

/// One logged slot.
#[derive(Debug, Clone, Copy)]
struct Logged {
    slot: u32,
    gpa: u64,
    size: u64,
}

/// Dirty logging on the RAM slots; stopped when dropped.
pub struct DirtyLog {
    slots: Arc<MemSlots>,
    logged: Vec<Logged>,
}

/// Sets or clears `KVM_MEM_LOG_DIRTY_PAGES` on `slot` (a flags-only change).
fn set_logging(slots: &MemSlots, slot: u32, on: bool) -> Result<(), KvmVmError> {
    let _used = slots.used.lock();
    let mut regions = slots.regions.lock();
    let Some(r) = regions.get_mut(&slot) else {
        return Ok(()); // removed since: nothing to log
    };
    let mut region = *r;
    if on {
        region.flags |= KVM_MEM_LOG_DIRTY_PAGES;
    } else {
        region.flags &= !KVM_MEM_LOG_DIRTY_PAGES;
    }
    // SAFETY: the same host range as the slot already maps (only the flags
    // change); its owner keeps it mapped while the slot exists.
    unsafe { slots.vm.set_user_memory_region(region) }
        .map_err(|e| KvmVmError::Ioctl("KVM_SET_USER_MEMORY_REGION(LOG_DIRTY_PAGES)", e))?;
    *r = region;
    Ok(())
}

impl DirtyLog {
    /// Starts logging on every slot lying inside one of `ram` (guest
    /// physical (start, length) ranges).
    pub fn start(slots: &Arc<MemSlots>, ram: &[(u64, u64)]) -> Result<DirtyLog, KvmVmError> {
        let candidates: Vec<Logged> = slots
            .regions
            .lock()
            .iter()
            .filter(|(_, r)| {
                ram.iter().any(|(s, l)| {
                    r.guest_phys_addr >= *s && r.guest_phys_addr + r.memory_size <= s + l
                })
            })
            .map(|(slot, r)| Logged {
                slot: *slot,
                gpa: r.guest_phys_addr,
                size: r.memory_size,
            })
            .collect();
        let t0 = std::time::Instant::now();
        let mut log = DirtyLog {
            slots: slots.clone(),
            logged: Vec::new(),
        };
        for l in candidates {
            set_logging(slots, l.slot, true)?;
            log.logged.push(l);
        }
        log.logged.sort_by_key(|l| l.gpa);
        tracing::info!(
            slots = log.logged.len(),
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "KVM dirty logging on"
        );
        Ok(log)
    }

    /// The frames vCPUs wrote since the previous call (or the start), as
    /// (first frame of a slot, bitmap words: bit `i` of word `w` is frame
    /// `first + 64 * w + i`).
    pub fn take(&self) -> Result<Vec<(u64, Vec<u64>)>, KvmVmError> {
        let mut out = Vec::with_capacity(self.logged.len());
        for l in &self.logged {
            let bits = self
                .slots
                .vm
                .get_dirty_log(l.slot, l.size as usize)
                .map_err(|e| KvmVmError::Ioctl("KVM_GET_DIRTY_LOG", e))?;
            out.push((l.gpa >> 12, bits));
        }
        Ok(out)
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        for l in &self.logged {
            if let Err(e) = set_logging(&self.slots, l.slot, false) {
                tracing::warn!(slot = l.slot, %e, "cannot stop dirty logging");
            }
        }
        tracing::info!("KVM dirty logging off");
    }
}
