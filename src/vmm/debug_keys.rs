//! `xenkvm debug-keys NAME KEYS`: Xen's debug keys (`xl debug-keys`) for
//! one VM, answered on its control socket rather than in a hypervisor log:
//!
//! - `e`: event channels (Xen's `dump_evtchn_info`): each vCPU's
//!   `vcpu_info` event fields, each open port's binding, pending and mask
//!   bits, and ports that are stuck (pending, unmasked, not signalled);
//! - `q`: vCPU state (Xen's `dump_domains`): registers, pending events and
//!   the local APIC's in-service and requested vectors, read with every vCPU
//!   paused for a moment (a VM the user paused stays paused);
//! - `r`: runstate (Xen's `dump_runq`): the accounting, the area as the
//!   guest reads it, the host schedule tracking's counters;
//! - `h`: the keys.
//!
//! `e` and `r` read the guest's shared memory without stopping it: what
//! they print is a snapshot, not an atomic one. This is for a hung guest:
//! where its interrupts and events stand, and what each vCPU executes.

use std::time::Duration;

use crate::migration::convert::KvmVcpuState;
use crate::vmm::machine::Machine;

/// What each key prints, for `h` and `--help`.
pub const KEYS: &[(char, &str)] = &[
    (
        'e',
        "event channels: vcpu_info event fields, ports, stuck ports",
    ),
    (
        'q',
        "vCPU state: registers, pending events, local APIC vectors (pauses the VM briefly)",
    ),
    (
        'r',
        "runstate: accounting, the guest's area, host schedule tracking",
    ),
    ('h', "this list"),
];

/// Runs `keys` in order against `m` (`paused`: the user paused the VM, so
/// `q` reads the states the vCPUs saved and does not resume it). Lines of
/// text, or why a key cannot be served.
pub fn run(m: &Machine, keys: &str, paused: bool) -> Result<Vec<String>, String> {
    if keys.is_empty() {
        return Err("no keys given (h lists them)".into());
    }
    if let Some(k) = keys.chars().find(|k| !KEYS.iter().any(|(c, _)| c == k)) {
        return Err(format!("unknown debug key {k:?} (h lists them)"));
    }
    let mut out = Vec::new();
    for k in keys.chars() {
        match k {
            'e' => {
                out.push("'e' pressed -> dumping event-channel info".into());
                out.extend(m.xen.domain.debug_evtchn());
            }
            'q' => {
                out.push("'q' pressed -> dumping vCPU state".into());
                out.extend(vcpu_states(m, paused)?);
            }
            'r' => {
                out.push("'r' pressed -> dumping runstate info".into());
                out.extend(m.xen.debug_runstate());
            }
            _ => {
                out.extend(KEYS.iter().map(|(c, what)| format!("'{c}': {what}")));
            }
        }
    }
    Ok(out)
}

fn vcpu_states(m: &Machine, paused: bool) -> Result<Vec<String>, String> {
    if !paused {
        m.pause(Duration::from_secs(10))
            .map_err(|e| format!("q: {e}"))?;
    }
    let mut out = Vec::new();
    for h in &m.vcpus {
        let head = format!(
            "vcpu {}: thread {:?}, {} entries to the guest",
            h.id,
            h.reported(),
            h.entries()
        );
        match h.saved_state() {
            Some(Ok(s)) => {
                out.push(head);
                out.extend(describe(h.id, &s));
            }
            Some(Err(e)) => out.push(format!("{head}; its state could not be read: {e}")),
            None => out.push(format!("{head}; no state (it has stopped)")),
        }
    }
    if !paused {
        m.resume();
    }
    Ok(out)
}

/// The lines of one vCPU's state.
pub fn describe(id: u32, s: &KvmVcpuState) -> Vec<String> {
    let r = &s.regs;
    let sr = &s.sregs;
    let if_set = r.rflags & (1 << 9) != 0;
    let ev = &s.events;
    let mut out = vec![
        format!(
            "vcpu {id}: rip {:#018x} rsp {:#018x} rflags {:#x} (interrupts {}) cs {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            if if_set { "enabled" } else { "disabled" },
            sr.cs.selector,
            sr.cr0,
            sr.cr3,
            sr.cr4,
            sr.efer
        ),
        format!(
            "vcpu {id}: rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x}",
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
        ),
        format!(
            "vcpu {id}: events: interrupt injected {} (vector {:#x}) shadow {}, exception injected {} pending {} (vector {}), nmi pending {} masked {}",
            ev.interrupt.injected,
            ev.interrupt.nr,
            ev.interrupt.shadow,
            ev.exception.injected,
            ev.exception.pending,
            ev.exception.nr,
            ev.nmi.pending,
            ev.nmi.masked
        ),
    ];
    out.push(format!("vcpu {id}: lapic: {}", lapic(&s.lapic)));
    out
}

/// The local APIC's TPR, PPR, in-service and requested vectors, and timer.
fn lapic(regs: &[u8]) -> String {
    let reg = |off: usize| {
        regs.get(off..off + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if regs.len() < 0x400 {
        return format!("{} bytes, not a register page", regs.len());
    }
    let vectors = |base: usize| {
        let v: Vec<String> = (0..8u32)
            .flat_map(|i| {
                let w = reg(base + 0x10 * i as usize);
                (0..32u32)
                    .filter(move |b| (w >> b) & 1 == 1)
                    .map(move |b| format!("{:#x}", i * 32 + b))
            })
            .collect();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(" ")
        }
    };
    format!(
        "id {} tpr {:#x} ppr {:#x} isr [{}] irr [{}] svr {:#x} lvt-timer {:#x} timer-initial {} timer-current {}",
        reg(0x20) >> 24,
        reg(0x80),
        reg(0xa0),
        vectors(0x100),
        vectors(0x200),
        reg(0xf0),
        reg(0x320),
        reg(0x380),
        reg(0x390)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_lists_the_set_vectors_of_isr_and_irr() {
        let mut page = vec![0u8; 0x400];
        // ISR bit 0xf3 (the Xen upcall vector Linux picks), IRR 0xec and 0x31.
        page[0x100 + 0x10 * 7..][..4].copy_from_slice(&(1u32 << 0x13).to_le_bytes());
        page[0x200 + 0x10 * 7..][..4].copy_from_slice(&(1u32 << 0xc).to_le_bytes());
        page[0x200 + 0x10..][..4].copy_from_slice(&(1u32 << 0x11).to_le_bytes());
        page[0x80..][..4].copy_from_slice(&0x20u32.to_le_bytes());
        let s = lapic(&page);
        assert!(s.contains("isr [0xf3]"), "{s}");
        assert!(s.contains("irr [0x31 0xec]"), "{s}");
        assert!(s.contains("tpr 0x20"), "{s}");
        assert_eq!(lapic(&[0u8; 16]), "16 bytes, not a register page");
    }
}
