//! Node permissions: an ordered list of `<n|r|w|b><domid>` entries. The first
//! entry names the owner, whose access is always full, and gives the access of
//! every domain not listed later; later entries grant a specific domain its
//! access. Dom0 (the privileged caller) has full access everywhere.

use super::wire::{parse_decimal, XsError};

/// The access one entry grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PermKind {
    /// `n`: no access.
    None,
    /// `r`: read only.
    Read,
    /// `w`: write only.
    Write,
    /// `b`: read and write.
    Both,
}

impl PermKind {
    /// Whether this access allows reading.
    pub fn can_read(self) -> bool {
        matches!(self, PermKind::Read | PermKind::Both)
    }

    /// Whether this access allows writing.
    pub fn can_write(self) -> bool {
        matches!(self, PermKind::Write | PermKind::Both)
    }

    fn letter(self) -> char {
        match self {
            PermKind::None => 'n',
            PermKind::Read => 'r',
            PermKind::Write => 'w',
            PermKind::Both => 'b',
        }
    }
}

/// One permission entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    /// The access granted.
    pub kind: PermKind,
    /// The domain it applies to (the owner, for the first entry).
    pub domid: u16,
}

impl Perm {
    /// Parses `r5`, `b0`, ...
    pub fn parse(s: &[u8]) -> Result<Self, XsError> {
        let (&k, id) = s.split_first().ok_or(XsError::Inval)?;
        let kind = match k {
            b'n' => PermKind::None,
            b'r' => PermKind::Read,
            b'w' => PermKind::Write,
            b'b' => PermKind::Both,
            _ => return Err(XsError::Inval),
        };
        let id = std::str::from_utf8(id).map_err(|_| XsError::Inval)?;
        Ok(Perm {
            kind,
            domid: parse_decimal(id)?,
        })
    }
}

impl std::fmt::Display for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.kind.letter(), self.domid)
    }
}

/// A node's permission list (never empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Perms(Vec<Perm>);

impl Perms {
    /// Owned by `owner`; every other domain gets `others`.
    pub fn new(owner: u16, others: PermKind) -> Self {
        Perms(vec![Perm {
            kind: others,
            domid: owner,
        }])
    }

    /// Adds an entry granting `domid` the access `kind`.
    pub fn with(mut self, domid: u16, kind: PermKind) -> Self {
        self.0.push(Perm { kind, domid });
        self
    }

    /// Builds a list from entries; `EINVAL` if there are none.
    pub fn from_entries(entries: Vec<Perm>) -> Result<Self, XsError> {
        if entries.is_empty() {
            return Err(XsError::Inval);
        }
        Ok(Perms(entries))
    }

    /// Parses the strings of a `SET_PERMS` request (empty strings, as a
    /// trailing reserved field, are skipped); `EINVAL` if none is left.
    pub fn parse<'a>(strings: impl IntoIterator<Item = &'a [u8]>) -> Result<Self, XsError> {
        let entries = strings
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(Perm::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_entries(entries)
    }

    /// The entries.
    pub fn entries(&self) -> &[Perm] {
        &self.0
    }

    /// The owning domain.
    pub fn owner(&self) -> u16 {
        self.0[0].domid
    }

    /// The same list with the owner replaced (the default access is kept).
    pub fn with_owner(&self, owner: u16) -> Self {
        let mut p = self.clone();
        p.0[0].domid = owner;
        p
    }

    /// The access `domid` has: full for dom0 and the owner, else the first
    /// entry naming it, else the default.
    pub fn access(&self, domid: u16) -> PermKind {
        if domid == 0 || self.owner() == domid {
            return PermKind::Both;
        }
        self.0[1..]
            .iter()
            .find(|p| p.domid == domid)
            .map_or(self.0[0].kind, |p| p.kind)
    }

    /// The `GET_PERMS` reply payload: each entry NUL-terminated.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &self.0 {
            out.extend_from_slice(p.to_string().as_bytes());
            out.push(0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_owner_and_dom0_are_full() {
        let p = Perms::new(5, PermKind::None);
        assert_eq!(p.access(5), PermKind::Both);
        assert_eq!(p.access(0), PermKind::Both);
        assert_eq!(p.access(6), PermKind::None);
    }

    #[test]
    fn access_specific_entry_overrides_default() {
        let p = Perms::new(0, PermKind::None).with(3, PermKind::Read);
        assert!(p.access(3).can_read());
        assert!(!p.access(3).can_write());
        assert!(!p.access(4).can_read());
    }

    #[test]
    fn parse_roundtrips_wire_form() {
        let p = Perms::parse([&b"n0"[..], b"r7", b"b12", b""]).unwrap();
        assert_eq!(p.to_wire(), b"n0\0r7\0b12\0");
        assert_eq!(p.owner(), 0);
    }

    #[test]
    fn parse_malformed_entry_is_einval() {
        for bad in [&b"x1"[..], b"r", b"r-1", b"r70000", b"r1a"] {
            assert_eq!(Perms::parse([bad]), Err(XsError::Inval), "{bad:?}");
        }
        assert_eq!(Perms::parse([&b""[..]]), Err(XsError::Inval));
    }
}
