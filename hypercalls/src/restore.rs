//! Restore (issue 14): applies a [`DomainSnapshot`] taken by [`Domain::snapshot`] in another
//! process to a freshly created domain whose guest RAM already holds the saved pages, so the
//! guest continues without re-registering anything.
//!
//! Each piece goes through the path that set it up at first: overlays through `place` (as
//! `XENMEM_add_to_physmap`), grant frames through `set_version`/`map_grant_frame`, vcpu_info
//! and time areas are mapped as `VCPUOP_register_*` map them (but nothing is copied or marked
//! pending: their contents are in the restored RAM), ports are bound at their saved numbers
//! with the VIRQ and dom0 tables their state implies, timers are armed through `rearm`.
//! Everything is checked first against this domain's limits; a snapshot that does not fit
//! is refused with [`Error::Restore`] naming what.
//!
//! Times in the snapshot are Xen system time of the restored clock: the VMM continues the
//! saved clock, so the saved deadlines stay valid as they are (the caller converts remaining
//! times, see `src/migration/xenkvm_records.rs`).

use std::sync::atomic::Ordering;

use crate::abi::{self, shinfo, xenmem};
use crate::domain::{Domain, VcpuInfoMap};
use crate::evtchn::{EvtchnTable, Remote, State};
use crate::evtchn_fifo::Fifo;
use crate::platform::OverlayId;
use crate::snapshot::DomainSnapshot;
use crate::types::Gfn;
use crate::vcpu::{Periodic, VcpuTimers};
use crate::Error;

fn bad(why: impl Into<String>) -> Error {
    Error::Restore(why.into())
}

fn gfn(raw: u64, what: &str) -> Result<Gfn, Error> {
    Gfn::new(raw).ok_or_else(|| bad(format!("{what}: gfn {raw:#x}")))
}

impl Domain {
    /// Applies `s` (see the module doc). Call it once, on a domain no vCPU has run in yet;
    /// the event channel table is replaced by the saved one (the VMM's own ports included).
    pub fn restore(&self, s: &DomainSnapshot) -> Result<(), Error> {
        let n = self.cfg.vcpus as usize;
        if s.vcpus.len() > n {
            return Err(bad(format!(
                "{} vCPUs saved, the domain has {n}",
                s.vcpus.len()
            )));
        }
        if let Some(w) = s.width {
            self.latch_width(w);
        }
        self.vm_assist.store(s.vm_assist, Ordering::Release);
        for &(i, v) in &s.params {
            self.set_param_internal(i, v)?;
        }
        self.restore_gnttab(s)?;
        if !s.shared_info.is_empty() {
            if s.shared_info.len() != abi::PAGE_SIZE {
                return Err(bad("shared_info: not one page"));
            }
            self.shared_info.write(0, &s.shared_info);
        }
        if let Some(g) = s.shared_info_gfn {
            let page = self.shared_info.clone();
            self.place(OverlayId::SharedInfo, &page, gfn(g, "shared_info")?)
                .map_err(|e| bad(format!("shared_info at gfn {g:#x}: {e}")))?;
        }
        self.restore_evtchn(s)?;
        for (i, v) in s.vcpus.iter().enumerate() {
            let f = &self.vcpus[i];
            f.up.store(v.up, Ordering::Release);
            f.initialised.store(v.initialised, Ordering::Release);
            f.upcall_vector.store(v.upcall_vector, Ordering::Release);
            let map = |gpa: u64, what: &str, align: u64| -> Result<VcpuInfoMap, Error> {
                let off = (gpa & 0xfff) as usize;
                if off > abi::PAGE_SIZE - shinfo::VCPU_INFO_LEN.min(32) || gpa % align != 0 {
                    return Err(bad(format!("vCPU {i} {what} at {gpa:#x}: misplaced")));
                }
                let page = self
                    .platform
                    .map_guest_page(gfn(gpa >> 12, what)?)
                    .map_err(|e| bad(format!("vCPU {i} {what} at {gpa:#x}: {e}")))?;
                Ok(VcpuInfoMap { page, off, gpa })
            };
            if let Some(gpa) = v.vcpu_info_gpa {
                if (gpa & 0xfff) as usize > abi::PAGE_SIZE - shinfo::VCPU_INFO_LEN {
                    return Err(bad(format!(
                        "vCPU {i} vcpu_info at {gpa:#x}: crosses a page"
                    )));
                }
                self.vcpu_info.write()[i] = Some(map(gpa, "vcpu_info", 4)?);
            }
            if let Some(gpa) = v.time_area_gpa {
                self.time_areas.write()[i] = Some(map(gpa, "time area", 8)?);
            }
        }
        {
            let mut timers = self.timers.lock();
            for (i, v) in s.vcpus.iter().enumerate() {
                let t = VcpuTimers {
                    singleshot: v.singleshot_deadline,
                    periodic: v.periodic_ns.map(|period| Periodic {
                        period,
                        last: v.periodic_last.unwrap_or_else(|| self.now_ns()),
                    }),
                };
                timers[i] = t;
                if let Some(id) = self.vcpu(i as u32) {
                    self.platform.set_timer(id, t.earliest());
                }
            }
        }
        self.update_wallclock();
        for i in 0..self.cfg.vcpus {
            if let Some(id) = self.vcpu(i) {
                self.update_vcpu_time(id);
                // An upcall that was pending at the save is sent again (a duplicate of one
                // the restored LAPIC may hold is harmless: the guest finds nothing to do).
                if self.vcpu_is_up(id) && self.upcall_pending(id) {
                    self.platform.raise_upcall(id);
                }
            }
        }
        Ok(())
    }

    fn restore_gnttab(&self, s: &DomainSnapshot) -> Result<(), Error> {
        if !(1..=2).contains(&s.grant_version) {
            return Err(bad(format!("grant table version {}", s.grant_version)));
        }
        self.set_version(s.grant_version)
            .map_err(|e| bad(format!("grant table version {}: {e}", s.grant_version)))?;
        {
            let mut gt = self.gnttab.lock();
            if s.grant_frames > gt.max_frames {
                return Err(bad(format!(
                    "{} grant frames (at most {})",
                    s.grant_frames, gt.max_frames
                )));
            }
            gt.grow(&*self.platform, s.grant_frames)
                .map_err(|e| bad(format!("{} grant frames: {e}", s.grant_frames)))?;
            for (i, status, data) in &s.grant_pages {
                let list = if *status { &gt.status } else { &gt.frames };
                let page = list
                    .get(*i as usize)
                    .ok_or_else(|| bad(format!("grant frame {i} (status {status}): none")))?;
                if data.len() != abi::PAGE_SIZE {
                    return Err(bad(format!("grant frame {i}: not one page")));
                }
                page.write(0, data);
            }
        }
        for &(i, status, g) in &s.grant_placed {
            let idx = u64::from(i)
                | if status {
                    xenmem::MAPIDX_GRANT_TABLE_STATUS
                } else {
                    0
                };
            self.map_grant_frame(idx, gfn(g, "grant frame")?)
                .map_err(|e| bad(format!("grant frame {i} (status {status}) at {g:#x}: {e}")))?;
        }
        Ok(())
    }

    fn restore_evtchn(&self, s: &DomainSnapshot) -> Result<(), Error> {
        let mut t = EvtchnTable::new(
            self.cfg.vcpus,
            self.cfg
                .max_evtchn_port
                .min(crate::evtchn_fifo::NR_CHANNELS - 1),
        );
        if s.fifo {
            t.fifo = Some(Fifo::new(self.cfg.vcpus as usize));
            for (i, v) in s.vcpus.iter().enumerate() {
                if let Some(gpa) = v.fifo_control_gpa {
                    let off = (gpa & 0xfff) as u32;
                    if off as usize > abi::PAGE_SIZE - abi::evtchnop::FIFO_CONTROL_BLOCK_LEN
                        || off & 7 != 0
                    {
                        return Err(bad(format!("vCPU {i}: FIFO control block at {gpa:#x}")));
                    }
                    self.map_control_block(&mut t, i, gpa >> 12, off)
                        .map_err(|e| bad(format!("vCPU {i}: FIFO control block: {e}")))?;
                }
                if let Some(f) = t.fifo.as_mut() {
                    for (q, tail) in f.vcpus[i].tail.iter_mut().zip(v.fifo_tails) {
                        *q = tail;
                    }
                }
            }
            for &g in &s.fifo_array_gfns {
                let page = self
                    .map_ram_page(g)
                    .map_err(|e| bad(format!("FIFO event array page at gfn {g:#x}: {e}")))?;
                if let Some(f) = t.fifo.as_mut() {
                    f.push_page(page, g)
                        .map_err(|e| bad(format!("FIFO event array: {e}")))?;
                }
            }
        }
        let limit = t.limit(self.width());
        for p in &s.ports {
            let state = match p.state {
                1 => State::Reserved,
                2 => State::Unbound {
                    remote_dom: p.a as u16,
                },
                3 if p.a == 0 => State::Interdomain(Remote::Dom0(p.b)),
                3 if p.a == u32::from(self.cfg.domid) => State::Interdomain(Remote::Local(p.b)),
                5 => State::Virq(p.a),
                6 => State::Ipi,
                s => {
                    return Err(bad(format!(
                        "event channel port {}: state {s} remote {} (not restorable)",
                        p.port, p.a
                    )))
                }
            };
            if p.vcpu >= self.cfg.vcpus {
                return Err(bad(format!(
                    "event channel port {}: vCPU {}",
                    p.port, p.vcpu
                )));
            }
            t.restore_port(p.port, state, p.vcpu, limit)
                .map_err(|e| bad(format!("event channel port {}: {e}", p.port)))?;
            if let Some(c) = t.get_mut(p.port) {
                c.priority = p.priority.min(crate::evtchn_fifo::PRIORITY_MIN as u8);
                c.fifo_pending = p.fifo_pending;
                c.last_q = (
                    p.last_q.0.min(self.cfg.vcpus - 1),
                    p.last_q.1.min(crate::evtchn_fifo::PRIORITY_MIN as u8),
                );
            }
        }
        *self.evtchn.lock() = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testing::{Call, FakePlatform};
    use crate::{DomainConfig, GuestWidth};

    fn domain() -> (Domain, Arc<FakePlatform>) {
        let p = Arc::new(FakePlatform::default());
        let cfg = DomainConfig {
            vcpus: 2,
            ..Default::default()
        };
        (Domain::new(cfg, p.clone()).unwrap(), p)
    }

    /// A domain with something of everything a snapshot holds.
    fn busy_domain() -> Domain {
        let (d, _p) = domain();
        d.latch_width(GuestWidth::Bits64);
        d.set_param_internal(abi::param::CALLBACK_IRQ, 2 << 56 | 0xf3)
            .unwrap();
        let si = d.shared_info.clone();
        d.place(OverlayId::SharedInfo, &si, Gfn::new(0xfeff0).unwrap())
            .unwrap();
        si.write(0x800, b"pending bits");
        d.set_version(2).unwrap();
        d.map_grant_frame(3, Gfn::new(0xf0000).unwrap()).unwrap();
        d.map_grant_frame(
            xenmem::MAPIDX_GRANT_TABLE_STATUS,
            Gfn::new(0xf0010).unwrap(),
        )
        .unwrap();
        d.gnttab.lock().frames[3].write(8, b"grant entry");
        d.bind_backend_port(7).unwrap();
        d.bind_backend_port(8).unwrap();
        d.init_control(0x200, 64, 1).unwrap();
        d.expand_array(0x201).unwrap();
        let v1 = d.vcpu(1).unwrap();
        d.vcpu_started(v1);
        d.vcpus[1].upcall_vector.store(0xf3, Ordering::Release);
        d.set_timer_op(v1, 5_000_000_000);
        d
    }

    #[test]
    fn restore_snapshot_of_a_busy_domain_snapshots_the_same() {
        let a = busy_domain();
        let s = a.snapshot();
        assert!(
            s.fifo && s.vcpus[1].fifo_control_gpa == Some(0x200 << 12 | 64),
            "{s:?}"
        );
        let (b, pb) = domain();
        b.restore(&s).unwrap();
        let t = b.snapshot();
        // Page contents compared apart (a failure would print 5 pages).
        let strip = |s: &DomainSnapshot| DomainSnapshot {
            shared_info: Vec::new(),
            grant_pages: Vec::new(),
            ..s.clone()
        };
        assert_eq!(strip(&t), strip(&s));
        // The event bits (pending and mask arrays after the 32 vcpu_info slots, and each
        // slot's upcall bytes) came back; the time fields are published again.
        assert!(
            t.shared_info[0x800..0xc00] == s.shared_info[0x800..0xc00],
            "event bits differ"
        );
        assert_eq!(&t.shared_info[0x800..0x80c], b"pending bits");
        for v in 0..32 {
            let o = v * shinfo::VCPU_INFO_LEN;
            assert_eq!(
                t.shared_info[o..o + 16],
                s.shared_info[o..o + 16],
                "vcpu_info {v}"
            );
        }
        assert!(
            t.grant_pages == s.grant_pages,
            "grant frame contents differ"
        );
        // The overlays went through the platform, the timer was armed.
        let calls = pb.take_calls();
        assert!(
            calls.contains(&Call::Place(OverlayId::SharedInfo, 0xfeff0)),
            "{calls:?}"
        );
        assert!(
            calls.contains(&Call::Place(OverlayId::GrantFrame(3), 0xf0000)),
            "{calls:?}"
        );
        assert!(
            calls.contains(&Call::Timer(1, Some(5_000_000_000))),
            "{calls:?}"
        );
        // The VMM's port works on the restored table.
        assert_eq!(
            b.backend_peer(7).map(|p| p.get()),
            a.backend_peer(7).map(|p| p.get())
        );
    }

    #[test]
    fn restore_refuses_what_does_not_fit_naming_it() {
        let mut s = busy_domain().snapshot();
        s.ports[0].vcpu = 9;
        let (b, _) = domain();
        let e = b.restore(&s).unwrap_err().to_string();
        assert!(e.contains("vCPU 9"), "{e}");
        let mut s = busy_domain().snapshot();
        s.grant_frames = 100_000;
        let (b, _) = domain();
        let e = b.restore(&s).unwrap_err().to_string();
        assert!(e.contains("grant frames"), "{e}");
        let mut s = busy_domain().snapshot();
        s.ports[0].state = 4; // a pirq
        let (b, _) = domain();
        assert!(b.restore(&s).is_err());
    }
}
