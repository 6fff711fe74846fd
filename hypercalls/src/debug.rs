//! What Xen's `e` debug key prints (`dump_evtchn_info`), for `xenkvm
//! debug-keys`: each vCPU's `vcpu_info` event fields and each open port's
//! binding, pending and mask bits, read without stopping the guest. A port
//! that is pending and unmasked while its vCPU's selector bit and
//! `evtchn_upcall_pending` are both clear is marked `stuck`: the guest will
//! not look at it, and Xen delivers a port only on its 0->1 pending
//! transition, so nothing sent to it again will be seen either.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use crate::abi::shinfo;
use crate::domain::Domain;
use crate::evtchn::{Remote, State};
use crate::shared::test_bit;
use crate::{GuestWidth, VcpuId};

impl Domain {
    /// Xen's `e` key: one line per vCPU, then one per open port (see the
    /// module doc). Reads shared memory the guest is writing: a snapshot,
    /// not an atomic one.
    pub fn debug_evtchn(&self) -> Vec<String> {
        let w = self.width();
        let word_bits: u32 = match w {
            GuestWidth::Bits64 => 64,
            GuestWidth::Bits32 => 32,
        };
        let mut out = Vec::new();
        let mut sel = Vec::new();
        for i in 0..self.cfg.vcpus {
            let Some(v) = VcpuId::new(i, self.cfg.vcpus) else {
                continue;
            };
            let (pending, mask, selector, loc) = match self.vcpu_info_loc(v) {
                Some((page, off)) => {
                    let head = page.load_u64(off, Ordering::Acquire);
                    let selector = match w {
                        GuestWidth::Bits64 => {
                            page.load_u64(off + shinfo::VI_PENDING_SEL_64, Ordering::Acquire)
                        }
                        GuestWidth::Bits32 => head >> 32,
                    };
                    let registered = self
                        .vcpu_info
                        .read()
                        .get(v.idx())
                        .and_then(|m| m.as_ref().map(|m| m.gpa));
                    let loc = match registered {
                        Some(gpa) => format!("gpa {gpa:#x}"),
                        None => format!("shared_info slot {i}"),
                    };
                    (head & 0xff, (head >> 8) & 0xff, selector, loc)
                }
                None => (0, 0, 0, "none".to_string()),
            };
            sel.push((pending != 0, selector));
            let vector = match self.upcall_vector(v) {
                Some(x) => format!("{x:#x}"),
                None => "none".into(),
            };
            out.push(format!(
                "vcpu {i}: vcpu_info at {loc}: upcall_pending {pending} upcall_mask {mask} pending_sel {selector:#x}; upcall vector {vector}; up {}",
                self.vcpu_is_up(v)
            ));
        }
        out.push(format!("callback via {:?}", self.callback_via()));
        let t = self.evtchn.lock();
        let fifo = t.fifo.is_some();
        out.push(format!(
            "event channels ({}):",
            if fifo { "FIFO" } else { "2-level" }
        ));
        let si = &*self.shared_info;
        let mask_base = match w {
            GuestWidth::Bits64 => shinfo::EVTCHN_MASK_64,
            GuestWidth::Bits32 => shinfo::EVTCHN_MASK_32,
        };
        for (port, c) in t.bound_ports().skip(1) {
            let what = match c.state {
                State::Free => continue,
                State::Reserved => "reserved".to_string(),
                State::Unbound { remote_dom } => format!("unbound (for dom{remote_dom})"),
                State::Interdomain(Remote::Dom0(p)) => format!("interdomain to dom0 ({p})"),
                State::Interdomain(Remote::Local(p)) => format!("loopback to port {p}"),
                State::Virq(v) => format!("virq {v}"),
                State::Ipi => "ipi".to_string(),
            };
            let mut line = format!("  port {port}: {what}, vcpu {}", c.vcpu);
            let (pending, masked) = match &t.fifo {
                Some(f) => (
                    f.word_bit(port, crate::evtchn_fifo::PENDING),
                    f.word_bit(port, crate::evtchn_fifo::MASKED),
                ),
                None => (
                    port < self.max_evtchns()
                        && test_bit(si, shinfo::EVTCHN_PENDING, port as usize),
                    port < self.max_evtchns() && test_bit(si, mask_base, port as usize),
                ),
            };
            let _ = write!(
                line,
                ", pending {}, masked {}",
                u8::from(pending),
                u8::from(masked)
            );
            if !fifo && pending && !masked {
                let word = port / word_bits;
                let noticed = sel
                    .get(c.vcpu as usize)
                    .is_some_and(|(up, s)| *up || (s >> word) & 1 == 1);
                if !noticed {
                    line.push_str(", stuck (neither its selector bit nor upcall_pending is set)");
                }
            }
            out.push(line);
        }
        out
    }
}
