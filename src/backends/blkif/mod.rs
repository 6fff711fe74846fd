//! Xen's block interface (`io/blkif.h` over `io/ring.h`) from the backend's
//! side: the shared ring ([`ring`]) and the request and response layouts of
//! both ABIs ([`request`]). Everything read from the ring is copied once
//! into private memory and then checked; bad indexes are an error for the
//! caller to refuse the device with, bad requests an error response.

#![forbid(unsafe_code)]

pub mod request;
pub mod ring;

#[cfg(test)]
mod proptests;

pub use request::{
    decode_response, encode_response, parse_indirect_segments, parse_request,
    parse_request_reusing, Abi, Refused, Request, RwOp, Segment,
};
pub use ring::{ring_entries, BackRing, RingError, RingMem, VecRing};
