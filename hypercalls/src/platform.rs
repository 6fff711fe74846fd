//! What the VMM provides to the domain: console, overlay pages, time, memory map, upcall and
//! timer plumbing, and the dom0-side services' notifications.
//!
//! Call discipline: `console_write`, `console_read` and `notify_backend` are called with no
//! domain lock held, so they may call back into the [`crate::Domain`] (a backend answering at
//! once with `raise_port`). Every other method may be called with domain locks held and must
//! not call back into the domain; they should only record or inject (an ioctl, a wake-up).

use std::sync::Arc;

use crate::errno::Errno;
use crate::shared::SharedPage;
use crate::types::{Gfn, GuestWidth, VcpuId};
use crate::vcpu_init::HvmVcpuState;

/// A page the Xen ABI lets the guest place at a GFN of its choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OverlayId {
    /// The domain's shared_info page (`XENMAPSPACE_shared_info`, idx 0).
    SharedInfo,
    /// Grant table shared frame `n` (`XENMAPSPACE_grant_table`, idx n).
    GrantFrame(u32),
    /// Grant table v2 status frame `n` (`XENMAPSPACE_grant_table`,
    /// idx `n | XENMAPIDX_grant_table_status`).
    GrantStatus(u32),
}

/// One entry of the guest's E820 memory map (`struct e820entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    /// 1 RAM, 2 reserved, 3 ACPI, 4 NVS, 5 unusable.
    pub kind: u32,
}

impl E820Entry {
    pub const RAM: u32 = 1;
}

/// The guest's TSC and Xen system time sampled at the same instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestTime {
    /// The guest's TSC value.
    pub tsc: u64,
    /// Nanoseconds since the domain started (Xen's `NOW()` as the guest sees it).
    pub system_time_ns: u64,
}

/// A vCPU's runstate as `vcpu_runstate_info` carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunstateInfo {
    /// `RUNSTATE_running` (0), `runnable` (1), `blocked` (2), `offline` (3).
    pub state: u32,
    /// Xen system time of the last state change.
    pub state_entry_time: u64,
    /// Time spent in each state, ns.
    pub time: [u64; 4],
}

/// Where a guest registered a vCPU's runstate area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunstateAreaSpec {
    /// Guest-physical pieces (address, length) in order: one, or two when the area straddles
    /// a page whose neighbour is not physically adjacent.
    pub pieces: Vec<(u64, u64)>,
    /// 64-bit (48 bytes) or compat (44 bytes, packed) layout.
    pub width: GuestWidth,
}

/// Services the VMM provides to the domain.
pub trait Platform: Send + Sync {
    /// `CONSOLEIO_write`: bytes the guest wrote (already filtered to printable text).
    fn console_write(&self, data: &[u8]);
    /// `CONSOLEIO_read`: fill `buf` with pending input; 0 when there is none.
    fn console_read(&self, buf: &mut [u8]) -> usize;

    /// A zeroed page to share with the guest (shared_info, grant frames).
    fn new_shared_page(&self) -> Result<Arc<dyn SharedPage>, Errno>;
    /// Map `page` at `gfn`, over whatever was there. If `id` was placed elsewhere before, the
    /// old GFN gets its RAM page back; if another overlay occupied `gfn`, that one is now
    /// unplaced (Xen unhooks it). Errors are returned to the guest.
    fn place_overlay(
        &self,
        id: OverlayId,
        page: &Arc<dyn SharedPage>,
        gfn: Gfn,
    ) -> Result<(), Errno>;
    /// A view of the guest RAM page at `gfn` (for `VCPUOP_register_vcpu_info`): `-EINVAL` if
    /// `gfn` is not writable RAM.
    fn map_guest_page(&self, gfn: Gfn) -> Result<Arc<dyn SharedPage>, Errno>;

    /// The guest's TSC and Xen system time now.
    fn guest_time(&self) -> GuestTime;
    /// The guest TSC frequency.
    fn tsc_khz(&self) -> u32;
    /// Whether the guest TSC is synchronised across vCPUs and constant
    /// (sets `XEN_PVCLOCK_TSC_STABLE_BIT`).
    fn tsc_stable(&self) -> bool;
    /// Wall-clock time now, in nanoseconds since the Unix epoch.
    fn wallclock_ns(&self) -> u64;
    /// The guest's E820 map (`XENMEM_memory_map`; RAM size for the reservation queries).
    fn memory_map(&self) -> Vec<E820Entry>;
    /// Whether `gpa` is RAM in [`memory_map`](Self::memory_map). Asked for every grant a
    /// backend maps: a platform whose map is computed should answer without building it.
    fn is_ram(&self, gpa: u64) -> bool {
        self.memory_map()
            .iter()
            .any(|e| e.kind == E820Entry::RAM && gpa >= e.addr && gpa - e.addr < e.size)
    }

    /// The guest sent on a port bound to a dom0-side service; `remote_port` is the VMM's id for
    /// the service end, as given to `bind_backend_port`/`backend_bind`.
    fn notify_backend(&self, remote_port: u32);
    /// `evtchn_upcall_pending` of `vcpu` went from 0 to 1: inject the upcall (per-vCPU vector,
    /// callback vector or GSI, see `Domain::upcall_vector`/`callback_via`) and wake the vCPU.
    fn raise_upcall(&self, vcpu: VcpuId);
    /// Wake `vcpu` if it waits in `SCHEDOP_poll` (a polled port became pending).
    fn kick_vcpu(&self, vcpu: VcpuId);
    /// Arm (or with `None` cancel) the host timer of `vcpu` at an absolute Xen system time;
    /// when it fires, call `Domain::timer_expired(vcpu)`. A deadline in the past fires at once.
    fn set_timer(&self, vcpu: VcpuId, deadline_ns: Option<u64>);
    /// `VCPUOP_down` took `vcpu` offline: stop running it until `vcpu_up`.
    fn vcpu_down(&self, vcpu: VcpuId);
    /// `VCPUOP_up` brought a downed, initialised `vcpu` back. If `vcpu_initialise` gave it a
    /// register state and it has not run since, it starts with that state now.
    fn vcpu_up(&self, vcpu: VcpuId);
    /// `VCPUOP_initialise` accepted `state` for `vcpu`, a vCPU that never ran (or was reset):
    /// keep it and load it when the vCPU next comes up (`vcpu_up`); until then the vCPU stays
    /// down. An error is returned to the guest and the vCPU stays uninitialised. The default
    /// refuses (`-ENOSYS`, as a Xen without `arch_initialise_vcpu` support would): the VMM
    /// overrides it.
    fn vcpu_initialise(&self, vcpu: VcpuId, state: &HvmVcpuState) -> Result<(), Errno> {
        let _ = (vcpu, state);
        Err(Errno::ENOSYS)
    }
    /// `VCPUOP_send_nmi`: inject an NMI into `vcpu`.
    fn send_nmi(&self, vcpu: VcpuId);

    /// Register (`Some`) or drop (`None`) `vcpu`'s runstate area. The VMM writes the area at
    /// once and at every schedule in and out of that vCPU; a new area replaces the old one,
    /// which is no longer written. An area the VMM cannot map is refused (`-EINVAL`).
    fn set_runstate_area(&self, vcpu: VcpuId, area: Option<RunstateAreaSpec>) -> Result<(), Errno>;
    /// `vcpu`'s runstate now (`VCPUOP_get_runstate_info`).
    fn runstate(&self, vcpu: VcpuId) -> RunstateInfo;

    /// `SCHEDOP_watchdog`: arm (`Some`, an absolute Xen system time) or cancel (`None`) the
    /// domain watchdog timer `id` (0 or 1); re-arming replaces the deadline. When it fires,
    /// call [`crate::Domain::watchdog_expired`] and shut the domain down if it says so.
    /// The default does nothing, so watchdogs never fire: the VMM overrides it.
    fn set_watchdog(&self, id: u32, deadline_ns: Option<u64>) {
        let _ = (id, deadline_ns);
    }

    /// Take overlay `id` out of the guest-physical space: the GFN it occupied gets its RAM
    /// page back (`XENMEM_remove_from_physmap` of an overlay; status frames dropped when the
    /// grant table goes back to v1). The domain has already forgotten where it was.
    /// The default refuses (`-EOPNOTSUPP`): the VMM overrides it.
    fn unplace_overlay(&self, id: OverlayId) -> Result<(), Errno> {
        let _ = id;
        Err(Errno::EOPNOTSUPP)
    }

    /// The guest gave these RAM pages back (`XENMEM_decrease_reservation`,
    /// `remove_from_physmap` of RAM): release their host memory (madvise) and tell the gpc.
    /// Until they are populated again the guest must not use them; if it does, it may read
    /// zeros. The default keeps the memory (nothing is freed): the VMM overrides it.
    fn release_pages(&self, gfns: &[Gfn]) {
        let _ = gfns;
    }

    /// The guest asks for RAM back at these frames (`XENMEM_populate_physmap`): they must be
    /// usable, zeroed RAM afterwards. An error stops the operation at that extent (the guest
    /// sees a short count). The default succeeds without touching the pages (matching the
    /// default `release_pages`, which never freed them): the VMM overrides it.
    fn populate_pages(&self, gfns: &[Gfn]) -> Result<(), Errno> {
        let _ = gfns;
        Ok(())
    }
}
