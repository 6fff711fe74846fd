//! The hypercall page: one 32-byte stub per hypercall number.
//!
//! Xen's own stubs are `mov $nr, %eax; vmcall; ret`, but on a KVM without
//! in-kernel Xen support `vmcall` never reaches userspace. Ours trap through
//! an I/O-port exit instead, which every KVM delivers to userspace:
//!
//! ```text
//! b8 nr nr nr nr    mov  $nr, %eax
//! e7 PP             out  %eax, $HYPERCALL_PORT
//! c3                ret
//! cc ...            int3 padding
//! ```
//!
//! The same bytes run in 32-bit and 64-bit mode; the exit handler decodes
//! the arguments by the vCPU's mode at the time of the call. `out` from
//! CPL > 0 faults (#GP) in the guest unless the guest grants I/O permission,
//! and the handler refuses calls from CPL > 0 with -EPERM either way.

/// The I/O port the stubs write the hypercall number to.
pub const HYPERCALL_PORT: u16 = 0xe1;
/// Stub size (Xen ABI: hypercall N is at page offset N * 32).
pub const STUB_SIZE: usize = 32;
/// Page size.
pub const PAGE: usize = 4096;

/// Builds the contents of the hypercall page.
pub fn build() -> [u8; PAGE] {
    let mut page = [0xccu8; PAGE];
    for (nr, stub) in page.chunks_exact_mut(STUB_SIZE).enumerate() {
        stub[0] = 0xb8;
        stub[1..5].copy_from_slice(&(nr as u32).to_le_bytes());
        stub[5] = 0xe7;
        stub[6] = HYPERCALL_PORT as u8;
        stub[7] = 0xc3;
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
                let i2 = d.decode();
                assert_eq!(i2.mnemonic(), Mnemonic::Out);
                assert_eq!(i2.op0_kind(), OpKind::Immediate8);
                assert_eq!(i2.immediate8(), HYPERCALL_PORT as u8);
                assert_eq!(d.decode().mnemonic(), Mnemonic::Ret);
            }
        }
    }
}
