//! The libxl v2 stream (`docs/specs/libxl-migration-stream.pandoc`): a
//! 16-byte big-endian header (`"LibxlFmt"`, version 2, options), then
//! records in the shared framing. `LIBXC_CONTEXT` has no body: the libxc
//! stream follows it, up to and including its own END record.

use std::io::{Read, Write};

use super::{read_raw_record, write_raw_record, Le, RawRecord, Sink, Src, StreamError};

const LAYER: &str = "libxl";

/// Header ident, "LibxlFmt".
pub const IDENT: u64 = 0x4C69_6278_6C46_6D74;
/// The only version.
pub const VERSION: u32 = 2;
/// Header option: the stream is big-endian.
pub const OPT_BIG_ENDIAN: u32 = 1 << 0;
/// Header option: converted from a legacy stream.
pub const OPT_LEGACY: u32 = 1 << 1;

/// Record type codes.
pub mod rec {
    /// END
    pub const END: u32 = 0;
    /// LIBXC_CONTEXT
    pub const LIBXC_CONTEXT: u32 = 1;
    /// EMULATOR_XENSTORE_DATA
    pub const EMULATOR_XENSTORE_DATA: u32 = 2;
    /// EMULATOR_CONTEXT
    pub const EMULATOR_CONTEXT: u32 = 3;
    /// CHECKPOINT_END
    pub const CHECKPOINT_END: u32 = 4;
    /// CHECKPOINT_STATE
    pub const CHECKPOINT_STATE: u32 = 5;
}

/// The name of a libxl record type, for messages.
pub fn record_name(t: u32) -> String {
    match t {
        rec::END => "END".into(),
        rec::LIBXC_CONTEXT => "LIBXC_CONTEXT".into(),
        rec::EMULATOR_XENSTORE_DATA => "EMULATOR_XENSTORE_DATA".into(),
        rec::EMULATOR_CONTEXT => "EMULATOR_CONTEXT".into(),
        rec::CHECKPOINT_END => "CHECKPOINT_END".into(),
        rec::CHECKPOINT_STATE => "CHECKPOINT_STATE".into(),
        t => format!("{t:#x}"),
    }
}

/// `emulator_id` of the upstream QEMU device model.
pub const EMULATOR_QEMU_UPSTREAM: u32 = 2;

/// The libxl stream header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibxlHeader {
    /// Options (only [`OPT_LEGACY`] may be set here).
    pub options: u32,
}

impl LibxlHeader {
    /// Reads the header after its 8-byte ident (read by the caller from `start`).
    pub fn read_after_ident<R: Read>(src: &mut Src<R>, start: u64) -> Result<Self, StreamError> {
        let mut b = [0u8; 8];
        src.exact(&mut b, LAYER, "header", start)?;
        let version = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let options = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        if version != VERSION {
            return Err(StreamError::invalid(
                LAYER,
                "header",
                start,
                format!("version {version} (only {VERSION} is defined)"),
            ));
        }
        if options & OPT_BIG_ENDIAN != 0 {
            return Err(StreamError::invalid(
                LAYER,
                "header",
                start,
                "big-endian stream: only little-endian (x86) streams are supported",
            ));
        }
        if options & !(OPT_BIG_ENDIAN | OPT_LEGACY) != 0 {
            return Err(StreamError::invalid(
                LAYER,
                "header",
                start,
                format!("unknown options {options:#x}"),
            ));
        }
        Ok(LibxlHeader { options })
    }

    /// Reads a whole header.
    pub fn read<R: Read>(src: &mut Src<R>) -> Result<Self, StreamError> {
        let start = src.offset();
        let mut b = [0u8; 8];
        src.exact(&mut b, LAYER, "header", start)?;
        if u64::from_be_bytes(b) != IDENT {
            return Err(StreamError::invalid(
                LAYER,
                "header",
                start,
                "bad ident (not \"LibxlFmt\")",
            ));
        }
        Self::read_after_ident(src, start)
    }

    /// Writes the header.
    pub fn write<W: Write>(&self, sink: &mut Sink<W>) -> std::io::Result<()> {
        sink.put(&IDENT.to_be_bytes())?;
        sink.put(&VERSION.to_be_bytes())?;
        sink.put(&self.options.to_be_bytes())
    }
}

/// A decoded libxl record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibxlRecord {
    /// END: the stream is over.
    End,
    /// LIBXC_CONTEXT: a libxc stream follows.
    LibxcContext,
    /// EMULATOR_XENSTORE_DATA: the device model's xenstore keys,
    /// NUL-terminated key/value strings.
    EmulatorXenstoreData {
        /// Which emulator.
        emulator_id: u32,
        /// Instance.
        index: u32,
        /// The key/value data.
        data: Vec<u8>,
    },
    /// EMULATOR_CONTEXT: the device model's own saved state.
    EmulatorContext {
        /// Which emulator.
        emulator_id: u32,
        /// Instance.
        index: u32,
        /// The blob.
        blob: Vec<u8>,
    },
    /// CHECKPOINT_END: end of one checkpoint (Remus/COLO).
    CheckpointEnd,
    /// CHECKPOINT_STATE: a COLO control message.
    CheckpointState(Vec<u8>),
}

impl LibxlRecord {
    /// Decodes `raw`, checking its length.
    pub fn decode(raw: &RawRecord) -> Result<Self, StreamError> {
        let name = record_name(raw.rtype);
        let bad =
            |why: String| StreamError::invalid(LAYER, format!("record {name}"), raw.offset, why);
        let b = &raw.body;
        let empty = |r: LibxlRecord| {
            if b.is_empty() {
                Ok(r)
            } else {
                Err(bad(format!(
                    "body of {} bytes where none is allowed",
                    b.len()
                )))
            }
        };
        match raw.rtype {
            rec::END => empty(LibxlRecord::End),
            rec::LIBXC_CONTEXT => empty(LibxlRecord::LibxcContext),
            rec::CHECKPOINT_END => empty(LibxlRecord::CheckpointEnd),
            rec::CHECKPOINT_STATE => Ok(LibxlRecord::CheckpointState(b.clone())),
            rec::EMULATOR_XENSTORE_DATA | rec::EMULATOR_CONTEXT => {
                if b.len() < 8 {
                    return Err(bad(format!(
                        "body of {} bytes is shorter than its 8-byte header",
                        b.len()
                    )));
                }
                let le = Le(b);
                let (emulator_id, index, rest) = (le.u32(0), le.u32(4), b[8..].to_vec());
                Ok(if raw.rtype == rec::EMULATOR_CONTEXT {
                    LibxlRecord::EmulatorContext {
                        emulator_id,
                        index,
                        blob: rest,
                    }
                } else {
                    LibxlRecord::EmulatorXenstoreData {
                        emulator_id,
                        index,
                        data: rest,
                    }
                })
            }
            t => Err(bad(format!("unknown record type {t:#x}"))),
        }
    }

    /// Reads and decodes one record.
    pub fn read<R: Read>(src: &mut Src<R>) -> Result<(u64, Self), StreamError> {
        let raw = read_raw_record(src, LAYER, record_name)?;
        Ok((raw.offset, Self::decode(&raw)?))
    }

    /// The record's type and body.
    pub fn encode(&self) -> (u32, Vec<u8>) {
        let hdr = |id: u32, ix: u32, rest: &[u8]| {
            let mut v = Vec::with_capacity(8 + rest.len());
            v.extend_from_slice(&id.to_le_bytes());
            v.extend_from_slice(&ix.to_le_bytes());
            v.extend_from_slice(rest);
            v
        };
        match self {
            LibxlRecord::End => (rec::END, Vec::new()),
            LibxlRecord::LibxcContext => (rec::LIBXC_CONTEXT, Vec::new()),
            LibxlRecord::CheckpointEnd => (rec::CHECKPOINT_END, Vec::new()),
            LibxlRecord::CheckpointState(b) => (rec::CHECKPOINT_STATE, b.clone()),
            LibxlRecord::EmulatorXenstoreData {
                emulator_id,
                index,
                data,
            } => (rec::EMULATOR_XENSTORE_DATA, hdr(*emulator_id, *index, data)),
            LibxlRecord::EmulatorContext {
                emulator_id,
                index,
                blob,
            } => (rec::EMULATOR_CONTEXT, hdr(*emulator_id, *index, blob)),
        }
    }

    /// Writes the record.
    pub fn write<W: Write>(&self, sink: &mut Sink<W>) -> std::io::Result<()> {
        let (t, b) = self.encode();
        write_raw_record(sink, t, &b)
    }
}
