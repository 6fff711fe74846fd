//! The Xen side of save and restore (issue 14): what `xenkvm save
//! --xen-state` puts in the XENKVM_XEN_STATE record ([`Xen::xen_state`]),
//! and what a restore applies before any vCPU runs ([`apply`], from
//! `Xen::new`): the domain's own state through
//! [`hypercalls::Domain::restore`], then what the VMM keeps outside it (the
//! runstate accounting and areas) and the xenstore contents and watches.
//! The rings of xenstore and the PV console are guest RAM and come back with
//! it; their pfns and ports are HVM params (in the record's DOMAIN_EXTRA
//! section), so the backends serve them where the guest has them.

use hypercalls::{Domain, GuestWidth, Platform, RunstateAreaSpec};
use runstate::{RunstateData, State};

use super::{
    Xen, XenPlatform, HVM_PARAM_CONSOLE_EVTCHN, HVM_PARAM_CONSOLE_PFN, HVM_PARAM_STORE_EVTCHN,
    HVM_PARAM_STORE_PFN,
};
use crate::backends::xenstore::{SavedNode, XenstoreServer};
use crate::migration::xenkvm_records::{
    self, ClockState, RunstateAreaPieces, XenState, XenstoreState, XsNode,
};

impl Xen {
    /// The record of this domain's Xen-side state now, for a paused guest;
    /// `clock` is the guest TSC and Xen system time read together.
    pub fn xen_state(&self, clock: ClockState) -> XenState {
        let n = self.platform.runstates.len() as u32;
        let runstates: Vec<_> = (0..n)
            .map(|v| self.runstate_at_entry(v).unwrap_or_default())
            .collect();
        let mut st = xenkvm_records::from_snapshot(&self.domain.snapshot(), clock, &runstates);
        let specs = self.platform.runstate_specs.lock().clone();
        for (i, spec) in specs.into_iter().enumerate() {
            let Some(spec) = spec else { continue };
            if let Some(v) = st.vcpus.get_mut(i) {
                v.runstate_area_gpa = spec.pieces.first().map(|p| p.0);
            }
            if let Some(x) = st.vcpu_extra.get_mut(i) {
                x.runstate_area = Some(RunstateAreaPieces {
                    compat32: spec.width == GuestWidth::Bits32,
                    pieces: spec.pieces.clone(),
                });
            }
        }
        let xs = self.xenstore.lock();
        let domid = self.domain.config().domid;
        st.xenstore = Some(XenstoreState {
            ring_gfn: self.store_ring >> 12,
            port: self.store_port,
            nodes: xs
                .export_nodes()
                .into_iter()
                .map(|n| XsNode {
                    path: n.path,
                    value: n.value,
                    perms: n.perms,
                })
                .collect(),
            watches: xs
                .export_watches(domid)
                .into_iter()
                .filter_map(|(p, t)| match String::from_utf8(t) {
                    Ok(t) => Some((p, t)),
                    Err(_) => {
                        tracing::warn!(path = %p, "xenstore watch with a non-UTF-8 token not saved");
                        None
                    }
                })
                .collect(),
        });
        st.xs_transactions = xs.export_transactions(domid);
        st
    }
}

/// Applies a saved record to a new domain (no vCPU has run): returns the
/// xenstore and console rings (gpa) and ports the guest uses.
/// `vcpu_up(v)`: the image has CPU state for vCPU `v` (used when the record
/// has no vCPU flags).
pub(super) fn apply(
    domain: &Domain,
    platform: &XenPlatform,
    xs: &mut XenstoreServer,
    st: &XenState,
    vcpu_up: &dyn Fn(u32) -> bool,
) -> Result<(u64, u64, u32, u32), String> {
    let t0 = std::time::Instant::now();
    let now = platform.clock.system_time();
    let snap = xenkvm_records::to_snapshot(st, now, vcpu_up);
    domain.restore(&snap).map_err(|e| e.to_string())?;
    let old_now = st.clock.map(|c| c.system_time_ns);
    let width = domain.width();
    for v in &st.vcpus {
        let Some(id) = domain.vcpu(v.id) else {
            return Err(format!("restore: vCPU {} is not in the domain", v.id));
        };
        let Some(m) = platform.runstates.get(v.id as usize) else {
            continue;
        };
        // Nothing in time[] decreases; the time the guest spent saved (if the
        // restored clock moved on by it, as on a host that cannot restore the
        // TSC) counts as offline.
        let r = v.runstate.continued(old_now.unwrap_or(now), now);
        let data = RunstateData {
            state: State::try_from(r.state).map_err(|e| format!("vCPU {}: {e}", v.id))?,
            state_entry_time: r.state_entry_time,
            time: r.time,
        };
        if let Err(e) = m.lock().acct.set_data(data) {
            tracing::warn!(vcpu = v.id, %e, ?data, "saved runstate refused: counted afresh");
        }
        let extra = st.vcpu_extra.iter().find(|x| x.id == v.id);
        let spec = match extra.and_then(|x| x.runstate_area.as_ref()) {
            Some(a) => Some(RunstateAreaSpec {
                pieces: a.pieces.clone(),
                width: if a.compat32 {
                    GuestWidth::Bits32
                } else {
                    GuestWidth::Bits64
                },
            }),
            None => v.runstate_area_gpa.map(|gpa| RunstateAreaSpec {
                pieces: vec![(gpa, if width == GuestWidth::Bits32 { 44 } else { 48 })],
                width,
            }),
        };
        if let Some(spec) = spec {
            platform
                .set_runstate_area(id, Some(spec))
                .map_err(|e| format!("vCPU {}: runstate area: {e}", v.id))?;
        }
    }
    if let Some(x) = &st.xenstore {
        let nodes: Vec<SavedNode> = x
            .nodes
            .iter()
            .map(|n| SavedNode {
                path: n.path.clone(),
                value: n.value.clone(),
                perms: n.perms.clone(),
            })
            .collect();
        let watches: Vec<(String, Vec<u8>)> = x
            .watches
            .iter()
            .map(|(p, t)| (p.clone(), t.clone().into_bytes()))
            .collect();
        xs.import(domain.config().domid, &nodes, &watches)
            .map_err(|e| format!("restore: xenstore: {e}"))?;
        xs.import_transactions(domain.config().domid, &st.xs_transactions)
            .map_err(|e| format!("restore: xenstore transactions: {e}"))?;
    }
    let param = |i| domain.param(i).unwrap_or(0);
    let store_ring = param(HVM_PARAM_STORE_PFN) << 12;
    let console_ring = param(HVM_PARAM_CONSOLE_PFN) << 12;
    let store_port = param(HVM_PARAM_STORE_EVTCHN) as u32;
    let console_port = param(HVM_PARAM_CONSOLE_EVTCHN) as u32;
    tracing::info!(
        ports = snap.ports.len(),
        vcpus = snap.vcpus.len(),
        xenstore_nodes = st.xenstore.as_ref().map_or(0, |x| x.nodes.len()),
        us = t0.elapsed().as_micros() as u64,
        "Xen state restored"
    );
    Ok((store_ring, console_ring, store_port, console_port))
}
