//! Xen's migration stream formats, read and written without KVM.
//!
//! - [`xl`]: the xl save-file header (`tools/xl/xl_saverestore.c`);
//! - [`libxl`]: the libxl v2 stream (`docs/specs/libxl-migration-stream.pandoc`);
//! - [`libxc`]: the libxc v2/v3 stream for an x86 HVM domain
//!   (`docs/specs/libxc-migration-stream.pandoc`);
//! - [`image`]: a reader over a whole image (xl header, libxl stream, or a
//!   bare libxc stream) that yields its parts in order and checks the order.
//!
//! Both stream layers share one record framing: `type u32, body_length u32`,
//! then the body zero-padded to a multiple of 8 bytes. Record bodies are in
//! the guest's byte order (little-endian on x86; a big-endian stream is
//! refused by name), the image and stream headers are big-endian.
//!
//! Hostile input: every length is checked against [`MAX_RECORD_BODY`] before
//! anything is read, and bodies are read incrementally, so a stream that
//! claims a large body but ends early costs no more memory than it holds.
//! Errors name the layer, the record and the byte offset where it starts.
//!
//! Written here rather than taken from a crate: no Rust crate reads or writes
//! these formats.

pub mod image;
pub mod libxc;
pub mod libxl;
pub mod xl;

#[cfg(test)]
pub(crate) mod tests;

use std::io::{self, Read, Write};

/// Largest record body either layer accepts (libxc's `REC_LENGTH_MAX`-style
/// bound: 128 MiB; a PAGE_DATA batch of 1024 pages is about 4 MiB).
pub const MAX_RECORD_BODY: u32 = 128 << 20;

/// A record type with this bit set is optional: a reader that does not know
/// it skips it (libxc spec, "Records").
pub const REC_TYPE_OPTIONAL: u32 = 0x8000_0000;

/// What went wrong reading a stream. The display form is one line naming
/// the layer, the record or header, and its byte offset in the image.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream ended inside a header or record.
    #[error("{layer} {what} at offset {offset:#x}: truncated (the image ends after {have} of {need} bytes)")]
    Truncated {
        /// `xl header`, `libxl`, `libxc`, `HVM_CONTEXT`.
        layer: &'static str,
        /// The header or record being read.
        what: String,
        /// Offset of its first byte in the image.
        offset: u64,
        /// Bytes present.
        have: u64,
        /// Bytes needed.
        need: u64,
    },
    /// A header or record is malformed or out of place.
    #[error("{layer} {what} at offset {offset:#x}: {why}")]
    Invalid {
        /// `xl header`, `libxl`, `libxc`, `HVM_CONTEXT`.
        layer: &'static str,
        /// The header or record being read.
        what: String,
        /// Offset of its first byte in the image.
        offset: u64,
        /// What is wrong, in words.
        why: String,
    },
    /// The underlying file failed.
    #[error("{layer} {what} at offset {offset:#x}: read failed: {source}")]
    Io {
        /// The layer being read.
        layer: &'static str,
        /// The header or record being read.
        what: String,
        /// Offset of its first byte in the image.
        offset: u64,
        /// The I/O error.
        source: io::Error,
    },
}

impl StreamError {
    pub(crate) fn invalid(
        layer: &'static str,
        what: impl Into<String>,
        offset: u64,
        why: impl Into<String>,
    ) -> Self {
        StreamError::Invalid {
            layer,
            what: what.into(),
            offset,
            why: why.into(),
        }
    }
}

/// A reader that counts the bytes it has consumed, so errors can name offsets.
pub struct Src<R> {
    r: R,
    off: u64,
}

impl<R: Read> Src<R> {
    /// Wraps `r`; offsets start at 0.
    pub fn new(r: R) -> Self {
        Src { r, off: 0 }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.off
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.r
    }

    /// The wrapped reader, for a caller that reads part of the stream
    /// itself (it then says how much with [`Src::count`]).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    /// Counts `n` bytes read through [`Src::get_mut`].
    pub fn count(&mut self, n: u64) {
        self.off += n;
    }

    /// Reads exactly `buf.len()` bytes of the header or record `what`
    /// (which started at `start`).
    pub fn exact(
        &mut self,
        buf: &mut [u8],
        layer: &'static str,
        what: &str,
        start: u64,
    ) -> Result<(), StreamError> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) => {
                    self.off += got as u64;
                    return Err(StreamError::Truncated {
                        layer,
                        what: what.to_string(),
                        offset: start,
                        have: self.off - start,
                        need: self.off - start + (buf.len() - got) as u64,
                    });
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(StreamError::Io {
                        layer,
                        what: what.to_string(),
                        offset: start,
                        source: e,
                    })
                }
            }
        }
        self.off += buf.len() as u64;
        Ok(())
    }

    /// Reads `len` bytes into a vector that grows only as data arrives
    /// (a lying length costs at most what the stream holds).
    pub fn bytes(
        &mut self,
        len: u64,
        layer: &'static str,
        what: &str,
        start: u64,
    ) -> Result<Vec<u8>, StreamError> {
        const CHUNK: u64 = 1 << 20;
        let mut v = Vec::with_capacity(len.min(CHUNK) as usize);
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK) as usize;
            let at = v.len();
            v.resize(at + n, 0);
            self.exact(&mut v[at..], layer, what, start)?;
            left -= n as u64;
        }
        Ok(v)
    }
}

/// A writer that counts the bytes it has written.
pub struct Sink<W> {
    w: W,
    off: u64,
}

impl<W: Write> Sink<W> {
    /// Wraps `w`.
    pub fn new(w: W) -> Self {
        Sink { w, off: 0 }
    }

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.off
    }

    /// Writes all of `b`.
    pub fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.off += b.len() as u64;
        Ok(())
    }

    /// Counts `n` bytes written through [`Sink::get_mut`].
    pub fn count(&mut self, n: u64) {
        self.off += n;
    }

    /// Flushes and returns the wrapped writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.w.flush()?;
        Ok(self.w)
    }

    /// The wrapped writer, for callers that write through it directly.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

/// A record as framed on the wire: its type (optional bit included) and body
/// (without padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    /// Record type, bit 31 = optional.
    pub rtype: u32,
    /// Byte offset of the record header in the image.
    pub offset: u64,
    /// The body, padding stripped.
    pub body: Vec<u8>,
}

/// Padding after a body of `len` bytes.
pub fn padding(len: usize) -> usize {
    (8 - len % 8) % 8
}

/// Reads one record's framing and body. `name` maps a type to its name for
/// messages.
pub fn read_raw_record<R: Read>(
    src: &mut Src<R>,
    layer: &'static str,
    name: fn(u32) -> String,
) -> Result<RawRecord, StreamError> {
    let (start, rtype, len) = read_record_header(src, layer, name)?;
    read_record_rest(src, layer, name, (start, rtype, len))
}

/// Reads one record's header: (offset, type, body length), the length
/// checked against the limit.
pub(crate) fn read_record_header<R: Read>(
    src: &mut Src<R>,
    layer: &'static str,
    name: fn(u32) -> String,
) -> Result<(u64, u32, u32), StreamError> {
    let start = src.offset();
    let mut hdr = [0u8; 8];
    src.exact(&mut hdr, layer, "record header", start)?;
    let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    if len > MAX_RECORD_BODY {
        return Err(StreamError::invalid(
            layer,
            format!("record {}", name(rtype)),
            start,
            format!("body length {len} exceeds the limit of {MAX_RECORD_BODY} bytes"),
        ));
    }
    Ok((start, rtype, len))
}

/// Reads the body and padding of the record whose header
/// [`read_record_header`] read.
pub(crate) fn read_record_rest<R: Read>(
    src: &mut Src<R>,
    layer: &'static str,
    name: fn(u32) -> String,
    (start, rtype, len): (u64, u32, u32),
) -> Result<RawRecord, StreamError> {
    let what = format!("record {}", name(rtype));
    let body = src.bytes(u64::from(len), layer, &what, start)?;
    read_padding(src, layer, &what, start, len as usize)?;
    Ok(RawRecord {
        rtype,
        offset: start,
        body,
    })
}

/// Reads and checks the zero padding after a body of `len` bytes.
pub(crate) fn read_padding<R: Read>(
    src: &mut Src<R>,
    layer: &'static str,
    what: &str,
    start: u64,
    len: usize,
) -> Result<(), StreamError> {
    let mut pad = [0u8; 8];
    let npad = padding(len);
    src.exact(&mut pad[..npad], layer, what, start)?;
    if pad[..npad].iter().any(|b| *b != 0) {
        return Err(StreamError::invalid(
            layer,
            what,
            start,
            "padding after the body contains non-zero bytes",
        ));
    }
    Ok(())
}

/// Writes one record: header, body, zero padding to 8 bytes.
pub fn write_raw_record<W: Write>(sink: &mut Sink<W>, rtype: u32, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_RECORD_BODY)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "record type {rtype:#x}: body of {} bytes exceeds the stream limit",
                    body.len()
                ),
            )
        })?;
    let mut hdr = [0u8; 8];
    hdr[..4].copy_from_slice(&rtype.to_le_bytes());
    hdr[4..].copy_from_slice(&len.to_le_bytes());
    sink.put(&hdr)?;
    sink.put(body)?;
    sink.put(&[0u8; 8][..padding(body.len())])
}

/// Little-endian field reader over a record body whose length the caller
/// has already checked (out-of-range reads return 0 rather than panic).
pub(crate) struct Le<'a>(pub &'a [u8]);

impl Le<'_> {
    pub fn u16(&self, at: usize) -> u16 {
        let mut b = [0u8; 2];
        if let Some(s) = self.0.get(at..at + 2) {
            b.copy_from_slice(s);
        }
        u16::from_le_bytes(b)
    }
    pub fn u32(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        if let Some(s) = self.0.get(at..at + 4) {
            b.copy_from_slice(s);
        }
        u32::from_le_bytes(b)
    }
    pub fn u64(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        if let Some(s) = self.0.get(at..at + 8) {
            b.copy_from_slice(s);
        }
        u64::from_le_bytes(b)
    }
}
