//! The xenstore wire protocol (`xen/include/public/io/xs_wire.h`): message
//! types, the 16-byte `xsd_sockmsg` header, the errno names sent in `XS_ERROR`
//! replies, and helpers that split a request payload into its NUL-separated
//! arguments without trusting it.

use thiserror::Error;

/// Size of the `xsd_sockmsg` header: `{type, req_id, tx_id, len}`, four `u32`.
pub const HEADER_LEN: usize = 16;
/// Largest payload in either direction (`XENSTORE_PAYLOAD_MAX`). A client
/// that exceeds it is a protocol violation and loses its connection.
pub const PAYLOAD_MAX: usize = 4096;
/// Longest absolute path (`XENSTORE_ABS_PATH_MAX`).
pub const ABS_PATH_MAX: usize = 3072;
/// Longest relative path a client may send (`XENSTORE_REL_PATH_MAX`).
pub const REL_PATH_MAX: usize = 2048;

/// Message types (`enum xsd_sockmsg_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MsgType {
    /// `XS_DEBUG` (now `XS_CONTROL`), privileged.
    Debug = 0,
    /// `XS_DIRECTORY`: list the children of a node.
    Directory = 1,
    /// `XS_READ`: read a node's value.
    Read = 2,
    /// `XS_GET_PERMS`.
    GetPerms = 3,
    /// `XS_WATCH`.
    Watch = 4,
    /// `XS_UNWATCH`.
    Unwatch = 5,
    /// `XS_TRANSACTION_START`.
    TransactionStart = 6,
    /// `XS_TRANSACTION_END`.
    TransactionEnd = 7,
    /// `XS_INTRODUCE`, privileged.
    Introduce = 8,
    /// `XS_RELEASE`, privileged.
    Release = 9,
    /// `XS_GET_DOMAIN_PATH`.
    GetDomainPath = 10,
    /// `XS_WRITE`.
    Write = 11,
    /// `XS_MKDIR`.
    Mkdir = 12,
    /// `XS_RM`.
    Rm = 13,
    /// `XS_SET_PERMS`.
    SetPerms = 14,
    /// `XS_WATCH_EVENT`: server to client only.
    WatchEvent = 15,
    /// `XS_ERROR`: server to client only.
    Error = 16,
    /// `XS_IS_DOMAIN_INTRODUCED`, privileged.
    IsDomainIntroduced = 17,
    /// `XS_RESUME`, privileged.
    Resume = 18,
    /// `XS_SET_TARGET`, privileged.
    SetTarget = 19,
    /// `XS_RESTRICT`, privileged (obsolete).
    Restrict = 20,
    /// `XS_RESET_WATCHES`.
    ResetWatches = 21,
    /// `XS_DIRECTORY_PART`.
    DirectoryPart = 22,
}

impl MsgType {
    /// Decodes a guest-supplied type word; `None` for anything unknown.
    pub fn from_u32(v: u32) -> Option<Self> {
        use MsgType::*;
        Some(match v {
            0 => Debug,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            20 => Restrict,
            21 => ResetWatches,
            22 => DirectoryPart,
            _ => return None,
        })
    }
}

/// The `xsd_sockmsg` header, as raw words: `ty` is kept undecoded so a reply
/// can echo whatever the guest sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Message type (`XS_*`).
    pub ty: u32,
    /// Request id, echoed in the reply.
    pub req_id: u32,
    /// Transaction id, 0 outside a transaction.
    pub tx_id: u32,
    /// Payload length in bytes.
    pub len: u32,
}

impl Header {
    /// Decodes a header (little-endian, as on x86).
    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            ty: w(0),
            req_id: w(4),
            tx_id: w(8),
            len: w(12),
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.ty.to_le_bytes());
        b[4..8].copy_from_slice(&self.req_id.to_le_bytes());
        b[8..12].copy_from_slice(&self.tx_id.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// Builds a complete message (header and payload). The payload must not
/// exceed [`PAYLOAD_MAX`]; the server only builds payloads that fit.
pub fn encode_msg(ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= PAYLOAD_MAX);
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut m = Vec::with_capacity(HEADER_LEN + payload.len());
    m.extend_from_slice(
        &Header {
            ty,
            req_id,
            tx_id,
            len,
        }
        .encode(),
    );
    m.extend_from_slice(payload);
    m
}

/// A xenstore error, sent to the client as the errno name in an `XS_ERROR`
/// reply. The set is exactly the table in `xs_wire.h`: a guest only
/// understands those names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Error)]
pub enum XsError {
    /// Malformed request: bad path, bad argument, unknown type.
    #[error("invalid argument (EINVAL)")]
    Inval,
    /// The caller lacks permission on the node.
    #[error("permission denied (EACCES)")]
    Acces,
    /// The watch or domain already exists.
    #[error("already exists (EEXIST)")]
    Exist,
    /// Is a directory.
    #[error("is a directory (EISDIR)")]
    IsDir,
    /// No such node, watch or transaction.
    #[error("no such node, watch or transaction (ENOENT)")]
    NoEnt,
    /// Out of memory.
    #[error("out of memory (ENOMEM)")]
    NoMem,
    /// A quota (nodes, entries, value size, transactions) is exhausted.
    #[error("quota exceeded (ENOSPC)")]
    NoSpc,
    /// I/O error.
    #[error("I/O error (EIO)")]
    Io,
    /// Directory not empty.
    #[error("directory not empty (ENOTEMPTY)")]
    NotEmpty,
    /// Operation not supported.
    #[error("operation not supported (ENOSYS)")]
    NoSys,
    /// Read-only.
    #[error("read-only (EROFS)")]
    RoFs,
    /// Busy, e.g. a transaction start inside a transaction.
    #[error("busy (EBUSY)")]
    Busy,
    /// The transaction conflicted with another change: retry it.
    #[error("transaction conflict, retry (EAGAIN)")]
    Again,
    /// Already connected.
    #[error("already connected (EISCONN)")]
    IsConn,
    /// Reply too large (a directory listing beyond the payload limit) or the
    /// watch quota is exhausted.
    #[error("too big (E2BIG)")]
    TooBig,
}

impl XsError {
    /// The errno name the wire carries (without the trailing NUL).
    pub fn wire_name(self) -> &'static str {
        match self {
            XsError::Inval => "EINVAL",
            XsError::Acces => "EACCES",
            XsError::Exist => "EEXIST",
            XsError::IsDir => "EISDIR",
            XsError::NoEnt => "ENOENT",
            XsError::NoMem => "ENOMEM",
            XsError::NoSpc => "ENOSPC",
            XsError::Io => "EIO",
            XsError::NotEmpty => "ENOTEMPTY",
            XsError::NoSys => "ENOSYS",
            XsError::RoFs => "EROFS",
            XsError::Busy => "EBUSY",
            XsError::Again => "EAGAIN",
            XsError::IsConn => "EISCONN",
            XsError::TooBig => "E2BIG",
        }
    }
}

/// The payload of a single-argument request (`<path>|`). A trailing NUL is
/// expected; a payload without any NUL is accepted whole, as some clients
/// omit it. A NUL anywhere but at the end is `EINVAL`, as is non-UTF-8.
pub fn one_arg(payload: &[u8]) -> Result<&str, XsError> {
    let body = match payload.iter().position(|&b| b == 0) {
        None => payload,
        Some(i) if i + 1 == payload.len() => &payload[..i],
        Some(_) => return Err(XsError::Inval),
    };
    std::str::from_utf8(body).map_err(|_| XsError::Inval)
}

/// Splits a payload into its NUL-terminated strings (`<a>|<b>|...`). A final
/// string without its NUL is still returned; an empty payload gives none.
pub fn split_args(payload: &[u8]) -> Vec<&[u8]> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if payload.is_empty() {
        return Vec::new();
    }
    body.split(|&b| b == 0).collect()
}

/// Splits `<path>|<value|>` at the first NUL. `EINVAL` without one.
pub fn path_and_value(payload: &[u8]) -> Result<(&str, &[u8]), XsError> {
    let i = payload.iter().position(|&b| b == 0).ok_or(XsError::Inval)?;
    let path = std::str::from_utf8(&payload[..i]).map_err(|_| XsError::Inval)?;
    Ok((path, &payload[i + 1..]))
}

/// Parses a decimal number the way a guest writes it (digits only, no sign,
/// no whitespace, no overflow).
pub fn parse_decimal<T: std::str::FromStr>(s: &str) -> Result<T, XsError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(XsError::Inval);
    }
    s.parse().map_err(|_| XsError::Inval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_preserves_fields() {
        let h = Header {
            ty: 11,
            req_id: 0xdead_beef,
            tx_id: 7,
            len: 4096,
        };
        assert_eq!(Header::parse(&h.encode()), h);
    }

    #[test]
    fn msgtype_from_u32_unknown_is_none() {
        assert_eq!(MsgType::from_u32(22), Some(MsgType::DirectoryPart));
        assert_eq!(MsgType::from_u32(2), Some(MsgType::Read));
        assert_eq!(MsgType::from_u32(23), None);
        assert_eq!(MsgType::from_u32(0xffff), None);
    }

    #[test]
    fn one_arg_embedded_nul_is_einval() {
        assert_eq!(one_arg(b"a\0b\0"), Err(XsError::Inval));
        assert_eq!(one_arg(b"abc\0"), Ok("abc"));
        assert_eq!(one_arg(b"abc"), Ok("abc"));
        assert_eq!(one_arg(b"\xff\0"), Err(XsError::Inval));
    }

    #[test]
    fn split_args_trailing_nul_gives_strings() {
        assert_eq!(split_args(b"a\0tok\0"), vec![&b"a"[..], &b"tok"[..]]);
        assert_eq!(split_args(b"a\0tok"), vec![&b"a"[..], &b"tok"[..]]);
        assert_eq!(split_args(b"\0"), vec![&b""[..]]);
        assert!(split_args(b"").is_empty());
    }

    #[test]
    fn path_and_value_no_nul_is_einval() {
        assert_eq!(path_and_value(b"a\0v\0x"), Ok(("a", &b"v\0x"[..])));
        assert_eq!(path_and_value(b"a"), Err(XsError::Inval));
    }

    #[test]
    fn parse_decimal_sign_or_overflow_is_einval() {
        assert_eq!(parse_decimal::<u16>("65535"), Ok(65535));
        assert_eq!(parse_decimal::<u16>("65536"), Err(XsError::Inval));
        assert_eq!(parse_decimal::<u32>("+1"), Err(XsError::Inval));
        assert_eq!(parse_decimal::<u32>(""), Err(XsError::Inval));
    }

    #[test]
    fn errno_names_match_xs_wire_table() {
        assert_eq!(XsError::NoEnt.wire_name(), "ENOENT");
        assert_eq!(XsError::Again.wire_name(), "EAGAIN");
        assert_eq!(XsError::TooBig.wire_name(), "E2BIG");
    }
}
