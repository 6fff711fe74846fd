//! A whole save image: an xl header and a libxl stream, a bare libxl stream,
//! or a bare libxc stream, read as one sequence of [`Item`]s with the order
//! of both layers checked, and written in the order real Xen writes.

use std::io::{Read, Write};

use super::libxc::{LibxcHeader, LibxcReader, LibxcRecord};
use super::libxl::{LibxlHeader, LibxlRecord, IDENT as LIBXL_IDENT};
use super::xl::{XlHeader, MAGIC as XL_MAGIC};
use super::{Sink, Src, StreamError};

/// One part of an image, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// The xl save-file header.
    Xl(XlHeader),
    /// The libxl stream header.
    LibxlHeader(LibxlHeader),
    /// A libxl record other than LIBXC_CONTEXT and END (those are structure).
    Libxl(LibxlRecord),
    /// The libxc headers (after LIBXC_CONTEXT, or at the start of a bare stream).
    LibxcHeader(LibxcHeader),
    /// A libxc record other than END.
    Libxc(LibxcRecord),
    /// The libxc stream's END.
    LibxcEnd,
    /// The end of the image (libxl END, or libxc END of a bare libxc stream).
    End,
}

enum State {
    Start,
    AfterXl,
    Libxl { saw_libxc: bool },
    Libxc { reader: LibxcReader, nested: bool },
    Done,
}

/// Reads an image item by item.
pub struct ImageReader<R> {
    src: Src<R>,
    state: State,
}

impl<R: Read> ImageReader<R> {
    /// Starts reading `r` from its first byte.
    pub fn new(r: R) -> Self {
        ImageReader {
            src: Src::new(r),
            state: State::Start,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.src.offset()
    }

    /// The next item with the offset where it starts; `Ok(None)` after [`Item::End`].
    pub fn next_item(&mut self) -> Result<Option<(u64, Item)>, StreamError> {
        let at = self.src.offset();
        match std::mem::replace(&mut self.state, State::Done) {
            State::Done => Ok(None),
            State::Start => {
                let mut m = [0u8; 8];
                self.src.exact(&mut m, "image", "header", at)?;
                if m == XL_MAGIC[..8] {
                    let mut rest = [0u8; 24];
                    self.src.exact(&mut rest, "xl header", "magic", at)?;
                    if rest[..] != XL_MAGIC[8..] {
                        return Err(StreamError::invalid(
                            "xl header",
                            "magic",
                            at,
                            "not an xl save image",
                        ));
                    }
                    let h = XlHeader::read_after_magic(&mut self.src, at)?;
                    self.state = State::AfterXl;
                    Ok(Some((at, Item::Xl(h))))
                } else if u64::from_be_bytes(m) == LIBXL_IDENT {
                    let h = LibxlHeader::read_after_ident(&mut self.src, at)?;
                    self.state = State::Libxl { saw_libxc: false };
                    Ok(Some((at, Item::LibxlHeader(h))))
                } else if u64::from_be_bytes(m) == super::libxc::MARKER {
                    let reader = LibxcReader::open_after_marker(&mut self.src, Some(at))?;
                    let h = reader.header;
                    self.state = State::Libxc {
                        reader,
                        nested: false,
                    };
                    Ok(Some((at, Item::LibxcHeader(h))))
                } else {
                    Err(StreamError::invalid(
                        "image",
                        "header",
                        at,
                        "neither an xl save image, a libxl stream nor a libxc stream",
                    ))
                }
            }
            State::AfterXl => {
                let h = LibxlHeader::read(&mut self.src)?;
                self.state = State::Libxl { saw_libxc: false };
                Ok(Some((at, Item::LibxlHeader(h))))
            }
            State::Libxl { saw_libxc } => {
                let (at, r) = LibxlRecord::read(&mut self.src)?;
                match r {
                    LibxlRecord::LibxcContext => {
                        let reader = LibxcReader::open(&mut self.src)?;
                        let h = reader.header;
                        self.state = State::Libxc {
                            reader,
                            nested: true,
                        };
                        Ok(Some((at, Item::LibxcHeader(h))))
                    }
                    LibxlRecord::End if !saw_libxc => Err(StreamError::invalid(
                        "libxl",
                        "record END",
                        at,
                        "the stream ends without a LIBXC_CONTEXT (no guest memory or CPU state)",
                    )),
                    LibxlRecord::End => Ok(Some((at, Item::End))),
                    r => {
                        self.state = State::Libxl { saw_libxc };
                        Ok(Some((at, Item::Libxl(r))))
                    }
                }
            }
            State::Libxc { mut reader, nested } => {
                let got = reader.next(&mut self.src)?;
                Ok(self.libxc_item(got, reader, nested))
            }
        }
    }

    /// The item for a libxc record `got` (the state moves on: END leaves the
    /// libxc stream, back to libxl's when it was nested in one).
    fn libxc_item(
        &mut self,
        got: Option<(u64, LibxcRecord)>,
        reader: LibxcReader,
        nested: bool,
    ) -> Option<(u64, Item)> {
        match got {
            Some((at, LibxcRecord::End)) if nested => {
                self.state = State::Libxl { saw_libxc: true };
                Some((at, Item::LibxcEnd))
            }
            Some((at, LibxcRecord::End)) => Some((at, Item::End)),
            Some((at, r)) => {
                self.state = State::Libxc { reader, nested };
                Some((at, Item::Libxc(r)))
            }
            None => None,
        }
    }

    /// As [`next_item`](Self::next_item), but a libxc PAGE_DATA record's
    /// page data is read by `pages` (see
    /// [`LibxcReader::next_with`](super::libxc::LibxcReader::next_with));
    /// the item has empty `data`.
    pub fn next_item_with(
        &mut self,
        pages: &mut super::libxc::ReadPages<'_, R>,
    ) -> Result<Option<(u64, Item)>, StreamError> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Libxc { mut reader, nested } => {
                let got = reader.next_with(&mut self.src, pages)?;
                Ok(self.libxc_item(got, reader, nested))
            }
            other => {
                self.state = other;
                self.next_item()
            }
        }
    }

    /// Reads to the end, returning every item (for checks and tests; a
    /// restore streams items instead).
    pub fn collect_all(mut self) -> Result<Vec<(u64, Item)>, StreamError> {
        let mut v = Vec::new();
        while let Some(it) = self.next_item()? {
            let end = it.1 == Item::End;
            v.push(it);
            if end {
                break;
            }
        }
        Ok(v)
    }
}

/// Writes an xl save image: xl header, libxl header, LIBXC_CONTEXT and the
/// libxc headers at [`begin`](Self::begin); libxc records; then
/// [`finish`](Self::finish) writes libxc END, the trailing libxl records and
/// libxl END.
pub struct ImageWriter<W: Write> {
    sink: Sink<W>,
}

impl<W: Write> ImageWriter<W> {
    /// Writes everything up to the first libxc record. `xl_config` is the
    /// domain config as JSON; `None` writes a bare libxl stream (no xl header).
    pub fn begin(
        w: W,
        xl_config: Option<Option<&str>>,
        libxc: LibxcHeader,
    ) -> std::io::Result<Self> {
        let mut sink = Sink::new(w);
        if let Some(cfg) = xl_config {
            XlHeader::new(cfg).write(&mut sink)?;
        }
        LibxlHeader { options: 0 }.write(&mut sink)?;
        LibxlRecord::LibxcContext.write(&mut sink)?;
        libxc.write(&mut sink)?;
        Ok(ImageWriter { sink })
    }

    /// Writes one libxc record.
    pub fn libxc(&mut self, r: &LibxcRecord) -> std::io::Result<()> {
        r.write(&mut self.sink)
    }

    /// Writes one PAGE_DATA batch without copying it.
    pub fn page_data(&mut self, p: &super::libxc::PageData) -> std::io::Result<()> {
        p.write(&mut self.sink)
    }

    /// Writes one PAGE_DATA batch whose data pages (`pages`, one per entry
    /// of `pfns` that has data, in order) the output fetches itself (from
    /// guest RAM, without a copy for [`super::super::pageio::Direct`]).
    pub fn page_batch(
        &mut self,
        pfns: &[(u64, super::libxc::PageType)],
        pages: &[super::super::pageio::PageSrc],
    ) -> std::io::Result<()>
    where
        W: super::super::pageio::PageOut,
    {
        let data_len = pages.len() * super::libxc::PAGE_SIZE;
        let head = super::libxc::page_data_head(pfns, data_len)?;
        self.sink.get_mut().write_pages(&head, pages)?;
        self.sink.count((head.len() + data_len) as u64);
        Ok(())
    }

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.sink.offset()
    }

    /// Ends the libxc stream, writes `tail` and the libxl END; returns the writer.
    pub fn finish(mut self, tail: &[LibxlRecord]) -> std::io::Result<W> {
        LibxcRecord::End.write(&mut self.sink)?;
        for r in tail {
            r.write(&mut self.sink)?;
        }
        LibxlRecord::End.write(&mut self.sink)?;
        self.sink.finish()
    }
}
