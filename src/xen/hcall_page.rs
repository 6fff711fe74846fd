//! The hypercall page: one 32-byte stub per hypercall number.
//!
//! Xen's own stubs are `mov $nr, %eax; vmcall; ret`, but on a KVM without
//! in-kernel Xen support `vmcall` never reaches userspace. Ours trap through
//! an I/O-port write, which every KVM delivers to userspace:
//!
//! ```text
//! b8 nr nr nr nr    mov  $nr, %eax
//! e7 PP             out  %eax, $HYPERCALL_PORT
//! c3                ret
//! cc ...            int3 padding
//! ```
//!
//! The VMM completes the call *and the stub's `ret`*: it sets RAX, pops the
//! return address from the guest stack into RIP, and the vCPU resumes in the
//! caller (see `vcpu::Vcpu::hypercall`). Measured on this host's shadow-
//! paging KVM: every guest page touched after an exit costs a refill of
//! about 1.4 µs, so returning into the stub page (and popping the stack in
//! the guest) made a hypercall 25-33% dearer than a bare exit, while the
//! register write-back through `kvm_run` costs nothing measurable. The `ret`
//! stays in the stub for the case where the VMM cannot read the stack (it
//! then sets only RAX and lets the guest execute the `ret`).
//!
//! The same bytes run in 32-bit and 64-bit mode; the exit handler decodes
//! the arguments and pops a 4- or 8-byte return address by the vCPU's mode
//! at the time of the call. `out` from CPL > 0 faults (#GP) in the guest
//! unless the guest grants I/O permission, and the handler refuses calls
//! from CPL > 0 with -EPERM either way.

/// The I/O port the stubs write.
pub const HYPERCALL_PORT: u16 = 0xe1;

/// The hypercall stubs' port on the bus: a write is a hypercall.
pub struct HypercallPort;

impl crate::devices::BusDevice for HypercallPort {
    fn read(&self, _: u64, _: &mut [u8]) {}
    fn write(&self, _: u64, _: &[u8]) -> crate::devices::BusEvent {
        crate::devices::BusEvent::Hypercall
    }
}
/// Stub size (Xen ABI: hypercall N is at page offset N * 32).
pub const STUB_SIZE: usize = 32;
/// Offset of the `ret` in each stub (where RIP is after the `out` exit).
pub const RET_OFFSET: usize = 7;
/// Page size.
pub const PAGE: usize = 4096;

/// Builds the contents of the hypercall page.
pub fn build() -> [u8; PAGE] {
    let mut page = [0xccu8; PAGE];
    for (nr, stub) in page.chunks_exact_mut(STUB_SIZE).enumerate() {
        stub[0] = 0xb8;
        stub[1..5].copy_from_slice(&(nr as u32).to_le_bytes());
        stub[5..8].copy_from_slice(&[0xe7, HYPERCALL_PORT as u8, 0xc3]);
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};

    #[test]
    fn build_every_stub_decodes_to_mov_out_ret_in_both_modes() {
        let page = build();
        for bits in [32, 64] {
            for nr in [0usize, 17, 29, 127] {
                let stub = &page[nr * STUB_SIZE..(nr + 1) * STUB_SIZE];
                let mut d = Decoder::new(bits, stub, DecoderOptions::NONE);
                let i1 = d.decode();
                assert_eq!(i1.mnemonic(), Mnemonic::Mov);
                assert_eq!(i1.immediate(1), nr as u64);
                let out = d.decode();
                assert_eq!(out.mnemonic(), Mnemonic::Out);
                assert_eq!(out.op0_kind(), OpKind::Immediate8);
                assert_eq!(out.immediate8(), HYPERCALL_PORT as u8);
                let ret = d.decode();
                assert_eq!(ret.mnemonic(), Mnemonic::Ret);
                assert_eq!(ret.ip() as usize, RET_OFFSET);
            }
        }
    }
}
