//! A read-only copy of the domain's Xen-side state for save (issue 14): the
//! placement of shared_info and the grant frames, the event channel port
//! table, each vCPU's upcall vector and timers. Plain data; taking it locks
//! each table in turn, in the domain's lock order, never two at once.

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
}

impl Domain {
    /// The domain's Xen-side state now (see [`DomainSnapshot`]).
    pub fn snapshot(&self) -> DomainSnapshot {
        let (grant_version, grant_frames) = {
            let g = self.gnttab.lock();
            (g.version, g.nr_frames())
        };
        let mut s = DomainSnapshot {
            grant_version,
            grant_frames,
            ..Default::default()
        };
        for (id, gfn) in self.physmap.lock().iter() {
            match *id {
                OverlayId::SharedInfo => s.shared_info_gfn = Some(gfn.get()),
                OverlayId::GrantFrame(i) => s.grant_placed.push((i, false, gfn.get())),
                OverlayId::GrantStatus(i) => s.grant_placed.push((i, true, gfn.get())),
            }
        }
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
                });
            }
        }
        let timers = self.timers.lock().clone();
        s.vcpus = self
            .vcpus
            .iter()
            .zip(timers)
            .map(|(f, t)| VcpuSnapshot {
                upcall_vector: f.upcall_vector.load(Ordering::Acquire),
                singleshot_deadline: t.singleshot,
                periodic_ns: t.periodic.map(|p| p.period),
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
