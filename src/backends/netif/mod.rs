//! Xen's network interface (`io/netif.h` over `io/ring.h`) from the
//! backend's side: the layouts of the tx and rx ring entries and the extra
//! info segments ([`wire`]), and the frame headers a backend looks into to
//! turn `csum_blank` and GSO into a `virtio_net_hdr` and back ([`frame`]).
//! The ring arithmetic is `io/ring.h`'s, shared with blkif
//! ([`crate::backends::blkif::BackRing`]). Everything read from a ring is
//! copied once into private memory and then checked.

#![forbid(unsafe_code)]

pub mod frame;
pub mod wire;

#[cfg(test)]
mod proptests;

pub use frame::{checksum_fill, l4_offsets, L4Info, VnetHdr};
pub use wire::{
    Extra, RxRequest, RxResponse, TxPacket, TxRefused, TxRequest, TxResponse, RX_SLOT, TX_SLOT,
};
