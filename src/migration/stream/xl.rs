//! The xl save-file header (`tools/xl/xl_saverestore.c`, `xl.h`
//! `struct save_file_header`): a 32-byte magic, then four u32 in the
//! domain's byte order (byte order marker, mandatory flags, optional flags,
//! optional data length), then the optional data: `u32 config_len` and the
//! domain configuration (libxl_domain_config JSON with a NUL when the JSON
//! flag is set). The libxl stream follows.

use std::io::{Read, Write};

use super::{Sink, Src, StreamError};

const LAYER: &str = "xl header";

/// `savefileheader_magic`.
pub const MAGIC: &[u8; 32] = b"Xen saved domain, xl format\n \0 \r";
/// `SAVEFILE_BYTEORDER_VALUE`.
pub const BYTEORDER: u32 = 0x0102_0304;
/// `XL_MANDATORY_FLAG_JSON`: the config is libxl JSON.
pub const FLAG_JSON: u32 = 1 << 0;
/// `XL_MANDATORY_FLAG_STREAMv2`: a libxl v2 stream follows.
pub const FLAG_STREAM_V2: u32 = 1 << 1;
/// Largest optional data accepted (a domain config is a few KiB).
pub const MAX_OPTIONAL_DATA: u32 = 16 << 20;

/// A parsed xl header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XlHeader {
    /// The mandatory flags (known bits only).
    pub mandatory_flags: u32,
    /// The domain configuration, NUL stripped (JSON when
    /// `mandatory_flags & FLAG_JSON`), if the image carries one.
    pub config: Option<Vec<u8>>,
}

impl XlHeader {
    /// A header for a v2 stream with `config_json` (or none).
    pub fn new(config_json: Option<&str>) -> Self {
        XlHeader {
            mandatory_flags: FLAG_STREAM_V2 | if config_json.is_some() { FLAG_JSON } else { 0 },
            config: config_json.map(|s| s.as_bytes().to_vec()),
        }
    }

    /// Reads the header after its magic (the caller has read and matched
    /// the 32 magic bytes, which started at offset `start`).
    pub fn read_after_magic<R: Read>(src: &mut Src<R>, start: u64) -> Result<Self, StreamError> {
        let mut b = [0u8; 16];
        src.exact(&mut b, LAYER, "fields", start)?;
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if word(0) != BYTEORDER {
            let why = if u32::from_be_bytes([b[0], b[1], b[2], b[3]]) == BYTEORDER {
                "big-endian image: only little-endian (x86) images are supported".to_string()
            } else {
                format!("bad byte order marker {:#010x}", word(0))
            };
            return Err(StreamError::invalid(LAYER, "byteorder", start, why));
        }
        let mandatory = word(4);
        let optional_flags = word(8);
        let optional_len = word(12);
        if mandatory & !(FLAG_JSON | FLAG_STREAM_V2) != 0 {
            return Err(StreamError::invalid(
                LAYER,
                "mandatory_flags",
                start,
                format!("unknown mandatory flags {mandatory:#x}"),
            ));
        }
        if mandatory & FLAG_STREAM_V2 == 0 {
            return Err(StreamError::invalid(
                LAYER,
                "mandatory_flags",
                start,
                "legacy (v1, before Xen 4.6) stream: convert it with Xen's convert-legacy-stream first",
            ));
        }
        if optional_flags != 0 {
            return Err(StreamError::invalid(
                LAYER,
                "optional_flags",
                start,
                format!("unknown optional flags {optional_flags:#x}"),
            ));
        }
        if optional_len > MAX_OPTIONAL_DATA {
            return Err(StreamError::invalid(
                LAYER,
                "optional data",
                start,
                format!("length {optional_len} exceeds {MAX_OPTIONAL_DATA}"),
            ));
        }
        let opt_start = src.offset();
        let data = src.bytes(u64::from(optional_len), LAYER, "optional data", opt_start)?;
        let config = if data.is_empty() {
            None
        } else {
            if data.len() < 4 {
                return Err(StreamError::invalid(
                    LAYER,
                    "config",
                    opt_start,
                    "optional data shorter than its config length field",
                ));
            }
            let clen = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
            let Some(cfg) = data.get(4..4 + clen) else {
                return Err(StreamError::invalid(
                    LAYER,
                    "config",
                    opt_start,
                    format!(
                        "config length {clen} runs past the optional data ({} bytes)",
                        data.len()
                    ),
                ));
            };
            // The config is written with its NUL; anything after it in the
            // optional data is skipped ("skip tail, if not understood").
            let cfg = match cfg.iter().position(|&c| c == 0) {
                Some(n) => &cfg[..n],
                None => cfg,
            };
            if mandatory & FLAG_JSON != 0 && std::str::from_utf8(cfg).is_err() {
                return Err(StreamError::invalid(
                    LAYER,
                    "config",
                    opt_start,
                    "JSON config is not UTF-8",
                ));
            }
            Some(cfg.to_vec())
        };
        Ok(XlHeader {
            mandatory_flags: mandatory,
            config,
        })
    }

    /// Reads a whole header, magic included.
    pub fn read<R: Read>(src: &mut Src<R>) -> Result<Self, StreamError> {
        let start = src.offset();
        let mut m = [0u8; 32];
        src.exact(&mut m, LAYER, "magic", start)?;
        if &m != MAGIC {
            return Err(StreamError::invalid(
                LAYER,
                "magic",
                start,
                "not an xl save image",
            ));
        }
        Self::read_after_magic(src, start)
    }

    /// Writes the header (48 bytes plus the optional data).
    pub fn write<W: Write>(&self, sink: &mut Sink<W>) -> std::io::Result<()> {
        let opt: Vec<u8> = match &self.config {
            None => Vec::new(),
            Some(cfg) => {
                let clen = u32::try_from(cfg.len() + 1).map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "config too large")
                })?;
                let mut v = Vec::with_capacity(cfg.len() + 5);
                v.extend_from_slice(&clen.to_le_bytes());
                v.extend_from_slice(cfg);
                v.push(0);
                v
            }
        };
        sink.put(MAGIC)?;
        sink.put(&BYTEORDER.to_le_bytes())?;
        sink.put(&self.mandatory_flags.to_le_bytes())?;
        sink.put(&0u32.to_le_bytes())?;
        sink.put(&(opt.len() as u32).to_le_bytes())?;
        sink.put(&opt)
    }
}
