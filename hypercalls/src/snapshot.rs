//! A read-only copy of the domain's Xen-side state for save (issue 14): the
//! placement and contents of shared_info and the grant frames (VMM pages, not
//! guest RAM), the event channel port table and the FIFO ABI's registrations,
//! the HVM params, and each vCPU's flags, vcpu_info/time area placement,
//! upcall vector and timers. Plain data; taking it locks each table in turn,
//! in the domain's lock order, never two at once. [`Domain::restore`]
//! (`restore.rs`) applies one to a fresh domain.

use std::sync::atomic::Ordering;

use crate::domain::Domain;
use crate::evtchn::{Remote, State};
use crate::platform::OverlayId;

/// One bound event channel port, in Xen's `ECS_*` terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSnapshot {
    /// Port number.
    pub port: u32,
    /// `ECS_RESERVED` 1, `ECS_UNBOUND` 2, `ECS_INTERDOMAIN` 3, `ECS_VIRQ` 5, `ECS_IPI` 6.
    pub state: u8,
    /// `notify_vcpu_id`.
    pub vcpu: u32,
    /// FIFO priority.
    pub priority: u8,
    /// Unbound: the remote domid; interdomain: the remote domid (0 for a VMM service);
    /// VIRQ: the VIRQ number.
    pub a: u32,
    /// Interdomain: the remote port (the VMM's port id for a VMM service).
    pub b: u32,
    /// FIFO: raised while the port had no event word (`evtchn->pending`).
    pub fifo_pending: bool,
    /// FIFO: the queue (vCPU, priority) the port was last linked on.
    pub last_q: (u32, u8),
}

/// One vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VcpuSnapshot {
    /// `HVMOP_set_evtchn_upcall_vector` (0: none).
    pub upcall_vector: u8,
    /// One-shot timer deadline (Xen system time, ns).
    pub singleshot_deadline: Option<u64>,
    /// Periodic timer period (ns).
    pub periodic_ns: Option<u64>,
    /// Periodic timer: Xen system time of its last event.
    pub periodic_last: Option<u64>,
    /// Up (not down by `VCPUOP_down`, started).
    pub up: bool,
    /// `is_initialised`.
    pub initialised: bool,
    /// `VCPUOP_register_vcpu_info` area (guest-physical), if registered.
    pub vcpu_info_gpa: Option<u64>,
    /// `VCPUOP_register_vcpu_time_memory_area` (guest-physical), if registered.
    pub time_area_gpa: Option<u64>,
    /// FIFO control block (guest-physical), if registered.
    pub fifo_control_gpa: Option<u64>,
    /// FIFO queue tails by priority (0: empty).
    pub fifo_tails: [u32; 16],
}

/// The domain's Xen-side state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainSnapshot {
    /// Where shared_info sits, if the guest placed it.
    pub shared_info_gfn: Option<u64>,
    /// Grant table version.
    pub grant_version: u32,
    /// Grant frames in use.
    pub grant_frames: u32,
    /// Placed grant frames: (index, status frame, gfn).
    pub grant_placed: Vec<(u32, bool, u64)>,
    /// The FIFO event channel ABI is active.
    pub fifo: bool,
    /// Every port that is not free, port 0 (always reserved) left out.
    pub ports: Vec<PortSnapshot>,
    /// Per vCPU.
    pub vcpus: Vec<VcpuSnapshot>,
    /// The latched shared-structure layout (`None`: not latched yet).
    pub width: Option<crate::GuestWidth>,
    /// `vm_assist` bits.
    pub vm_assist: u64,
    /// HVM params that are not 0: (index, value).
    pub params: Vec<(u32, u64)>,
    /// The shared_info page's contents.
    pub shared_info: Vec<u8>,
    /// Every grant frame's contents: (index, status frame, 4096 bytes).
    pub grant_pages: Vec<(u32, bool, Vec<u8>)>,
    /// FIFO event array pages, in order.
    pub fifo_array_gfns: Vec<u64>,
}

impl Domain {
    /// The domain's Xen-side state now (see [`DomainSnapshot`]).
    pub fn snapshot(&self) -> DomainSnapshot {
        let page = |p: &dyn crate::SharedPage| {
            let mut b = vec![0u8; crate::abi::PAGE_SIZE];
            p.read(0, &mut b);
            b
        };
        let (grant_version, grant_frames, grant_pages) = {
            let g = self.gnttab.lock();
            let mut pages: Vec<(u32, bool, Vec<u8>)> = g
                .frames
                .iter()
                .enumerate()
                .map(|(i, f)| (i as u32, false, page(&**f)))
                .collect();
            pages.extend(
                g.status
                    .iter()
                    .enumerate()
                    .map(|(i, f)| (i as u32, true, page(&**f))),
            );
            (g.version, g.nr_frames(), pages)
        };
        let mut s = DomainSnapshot {
            grant_version,
            grant_frames,
            grant_pages,
            width: self.width_latched().then(|| self.width()),
            vm_assist: self.vm_assist.load(Ordering::Acquire),
            params: (0..self.params.len() as u32)
                .filter_map(|i| self.param(i).filter(|v| *v != 0).map(|v| (i, v)))
                .collect(),
            shared_info: page(&*self.shared_info),
            ..Default::default()
        };
        for (id, gfn) in self.physmap.lock().iter() {
            match *id {
                OverlayId::SharedInfo => s.shared_info_gfn = Some(gfn.get()),
                OverlayId::GrantFrame(i) => s.grant_placed.push((i, false, gfn.get())),
                OverlayId::GrantStatus(i) => s.grant_placed.push((i, true, gfn.get())),
            }
        }
        let fifo;
        {
            let e = self.evtchn.lock();
            s.fifo = e.fifo.is_some();
            // Port 0 is always reserved (Xen's `evtchn_init`), so it is not listed.
            for (port, c) in e.bound_ports().skip(1) {
                let (state, a, b) = match c.state {
                    State::Free => continue,
                    State::Reserved => (1, 0, 0),
                    State::Unbound { remote_dom } => (2, u32::from(remote_dom), 0),
                    State::Interdomain(Remote::Dom0(p)) => (3, 0, p),
                    State::Interdomain(Remote::Local(p)) => (3, u32::from(self.cfg.domid), p),
                    State::Virq(v) => (5, v, 0),
                    State::Ipi => (6, 0, 0),
                };
                s.ports.push(PortSnapshot {
                    port,
                    state,
                    vcpu: c.vcpu,
                    priority: c.priority,
                    a,
                    b,
                    fifo_pending: c.fifo_pending,
                    last_q: c.last_q,
                });
            }
            if let Some(f) = &e.fifo {
                s.fifo_array_gfns = f.page_gfns.clone();
            }
            fifo = e.fifo.as_ref().map(|f| {
                f.vcpus
                    .iter()
                    .map(|v| {
                        let mut tails = [0u32; 16];
                        for (t, q) in tails.iter_mut().zip(v.tail) {
                            *t = q;
                        }
                        (v.cb.as_ref().map(|_| v.cb_gpa), tails)
                    })
                    .collect::<Vec<_>>()
            });
        }
        let (infos, times) = {
            let gpa = |m: &Option<crate::domain::VcpuInfoMap>| m.as_ref().map(|m| m.gpa);
            (
                self.vcpu_info.read().iter().map(gpa).collect::<Vec<_>>(),
                self.time_areas.read().iter().map(gpa).collect::<Vec<_>>(),
            )
        };
        let timers = self.timers.lock().clone();
        s.vcpus = self
            .vcpus
            .iter()
            .zip(timers)
            .enumerate()
            .map(|(i, (f, t))| {
                let (cb, tails) = fifo
                    .as_ref()
                    .and_then(|v| v.get(i).copied())
                    .unwrap_or((None, [0; 16]));
                VcpuSnapshot {
                    upcall_vector: f.upcall_vector.load(Ordering::Acquire),
                    singleshot_deadline: t.singleshot,
                    periodic_ns: t.periodic.map(|p| p.period),
                    periodic_last: t.periodic.map(|p| p.last),
                    up: f.up.load(Ordering::Acquire),
                    initialised: f.initialised.load(Ordering::Acquire),
                    vcpu_info_gpa: infos.get(i).copied().flatten(),
                    time_area_gpa: times.get(i).copied().flatten(),
                    fifo_control_gpa: cb,
                    fifo_tails: tails,
                }
            })
            .collect();
        s
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::testing::FakePlatform;
    use crate::DomainConfig;

    use super::*;

    #[test]
    fn snapshot_domain_with_one_backend_port_lists_it_as_interdomain() {
        let cfg = DomainConfig::default();
        let d = Domain::new(cfg.clone(), Arc::new(FakePlatform::default())).unwrap();
        let s = d.snapshot();
        assert!(s.ports.is_empty(), "{s:?}");
        assert_eq!(s.shared_info_gfn, None);
        assert_eq!(s.grant_version, 1);
        assert_eq!(s.vcpus.len(), cfg.vcpus as usize);
        let port = d.bind_backend_port(7).unwrap().get();
        let s = d.snapshot();
        assert_eq!(s.ports.len(), 1, "{s:?}");
        let p = s.ports[0];
        assert_eq!((p.port, p.state, p.a, p.b, p.vcpu), (port, 3, 0, 7, 0));
        assert!(!s.fifo);
    }
}
