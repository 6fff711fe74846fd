//! xl's disk specification (`xl-disk-configuration(5)`), as `disk = [...]`
//! in an xl.cfg and `--disk SPEC` on the command line take it:
//!
//! ```text
//! [<key>=<value>|<flag>,]*[<target>,[<format>,[<vdev>,[<access>]]]][,<key>=<value>|<flag>]*[,target=<target>]
//! ```
//!
//! Parsed as xl's scanner does (`tools/libs/util/libxlu_disk_l.l`): tokens
//! separated by commas, leading blanks ignored; `target=` takes the rest of
//! the string (the only way to name a path with commas); a token without
//! `=` that is not a flag fills the next unset positional parameter
//! (target, format, vdev, access); the deprecated prefixes (`phy:`, `file:`,
//! `tap:aio:`, `raw:`, `qcow2:`, ...) are stripped, and after one of them
//! the format is no longer positional (`phy:/dev/vg/lv,xvda,w`); each
//! parameter may be given once (an empty value means its default).
//!
//! The virtual-device number (`vdev`) is encoded as `xen-vbd-interface(7)`
//! and libxl's `libxl__device_disk_dev_number` do.

use std::fmt;

/// An image format xenkvm's block backend reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A parsed disk specification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image file or block device, as written (xl opens it relative to
    /// its working directory; so does xenkvm).
    pub target: String,
    pub format: DiskFormat,
    /// The virtual device as written (`xvda`, `hdc`, `d0p1`, `51712`).
    pub vdev: String,
    /// The xenstore virtual-device number ([`vdev_number`]).
    pub devid: u32,
    pub read_only: bool,
    /// `devtype=cdrom` (or the `cdrom` flag): a read-only removable disk.
    pub cdrom: bool,
    /// Advertise discard (xl's default; `no-discard` turns it off).
    pub discard: bool,
    /// `backendtype=` as written (xenkvm has one backend; recorded only).
    pub backendtype: Option<String>,
    /// Offer blkif's `feature-persistent` (a xenkvm flag, not xl's:
    /// `persistent-grants`; off by default and with `no-persistent-grants`,
    /// because a frontend that uses it copies every I/O through its
    /// persistently granted pages).
    pub persistent_grants: bool,
}

/// A refused disk or vif specification: names the spec and the key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} \"{spec}\": {key}: {msg}")]
pub struct SpecError {
    /// `disk` or `vif`.
    pub what: &'static str,
    pub spec: String,
    /// The offending key, flag or positional parameter (`vdev`, `format=vhd`).
    pub key: String,
    pub msg: String,
}

impl SpecError {
    pub(crate) fn new(what: &'static str, spec: &str, key: &str, msg: impl Into<String>) -> Self {
        SpecError {
            what,
            spec: spec.to_string(),
            key: key.to_string(),
            msg: msg.into(),
        }
    }
}

/// Prefixes xl strips and ignores (`tap:aio:/x`, `phy:/dev/x`).
const IGNORED_PREFIXES: &[&str] = &["tapdisk", "tap2", "tap", "aio", "ioemu", "file", "phy"];

#[derive(Default)]
struct Parse {
    target: Option<String>,
    format: Option<String>,
    vdev: Option<String>,
    access: Option<String>,
    devtype: Option<bool>,
    discard: Option<bool>,
    persistent_grants: Option<bool>,
    backendtype: Option<String>,
    depr_prefix: bool,
}

impl DiskSpec {
    /// Parses one disk specification.
    pub fn parse(spec: &str) -> Result<DiskSpec, SpecError> {
        let err = |key: &str, msg: &str| SpecError::new("disk", spec, key, msg);
        let mut p = Parse::default();
        let mut rest = spec;
        loop {
            rest = rest.trim_start_matches([' ', '\t', '\n']);
            if rest.is_empty() {
                break;
            }
            if let Some(t) = rest.strip_prefix("target=") {
                // Eats the rest of the string, but a trailing comma.
                let t = t.strip_suffix(',').unwrap_or(t);
                set_once(&mut p.target, t, || err("target", "given twice"))?;
                break;
            }
            if let Some((prefix, after)) = deprecated_prefix(rest) {
                match prefix {
                    "raw" | "qcow" | "qcow2" | "vhd" => {
                        set_format(&mut p.format, prefix, &err)?;
                    }
                    "iscsi" | "nbd" | "enbd" | "drbd" => {
                        return Err(err(
                            &format!("{prefix}:"),
                            "block scripts (script=block-...) are not run by xenkvm; give a file or block device",
                        ))
                    }
                    p2 if IGNORED_PREFIXES.contains(&p2) => {}
                    other => {
                        return Err(err(&format!("{other}:"), "unknown deprecated disk prefix"))
                    }
                }
                p.depr_prefix = true;
                rest = after;
                continue;
            }
            let (tok, next) = match rest.find(',') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, ""),
            };
            rest = next;
            if let Some((k, v)) = tok.split_once('=') {
                keyword(&mut p, k, v, tok, &err)?;
                continue;
            }
            match tok {
                "cdrom" => p.devtype = Some(true),
                "direct-io-safe" | "trusted" | "untrusted" => {}
                "discard" => p.discard = Some(true),
                "no-discard" => p.discard = Some(false),
                "persistent-grants" => p.persistent_grants = Some(true),
                "no-persistent-grants" => p.persistent_grants = Some(false),
                "colo" | "no-colo" => {
                    return Err(err(tok, "COLO replication is not offered by xenkvm"))
                }
                _ => positional(&mut p, tok, &err)?,
            }
        }
        let target = p.target.unwrap_or_default();
        let cdrom = p.devtype.unwrap_or(false);
        let format =
            match p.format.as_deref().unwrap_or("") {
                "" | "raw" => DiskFormat::Raw,
                "qcow2" => DiskFormat::Qcow2,
                f @ ("qcow" | "vhd" | "qed") => return Err(err(
                    &format!("format={f}"),
                    "xenkvm reads raw and qcow2 images (convert with `qemu-img convert -O qcow2`)",
                )),
                "empty" => return Err(err("format=empty", "an empty drive is not supported")),
                f => return Err(err(&format!("format={f}"), "unknown value for format")),
            };
        if target.is_empty() {
            return Err(err(
                "target",
                if cdrom {
                    "an empty CD-ROM drive is not supported: give an image"
                } else {
                    "missing: give the image or block device (target=PATH or the first positional parameter)"
                },
            ));
        }
        let vdev = match p.vdev.as_deref() {
            None | Some("") if target.contains("vdev=") => {
                return Err(err(
                    "vdev",
                    "missing: target= takes the rest of the spec, commas included; put it last (format=qcow2,vdev=xvda,target=PATH)",
                ))
            }
            None | Some("") => {
                return Err(err("vdev", "missing (the guest's device, e.g. vdev=xvda)"))
            }
            Some(v) => v.to_string(),
        };
        let devid = vdev_number(&vdev).ok_or_else(|| {
            err(
                &format!("vdev={vdev}"),
                "not a virtual device xl knows (xvda..., hda-hdd, sda-sdp, dNpM, or a number)",
            )
        })?;
        let read_only = match p.access.as_deref() {
            None | Some("") => cdrom,
            Some("r" | "ro") => true,
            Some("w" | "rw") => {
                if cdrom {
                    return Err(err("access", "a CD-ROM is read-only"));
                }
                false
            }
            Some(a) => {
                return Err(err(
                    &format!("access={a}"),
                    "unknown value for access (ro, r, rw, w)",
                ))
            }
        };
        Ok(DiskSpec {
            target,
            format,
            vdev,
            devid,
            read_only,
            cdrom,
            discard: p.discard.unwrap_or(true),
            backendtype: p.backendtype,
            persistent_grants: p.persistent_grants.unwrap_or(false),
        })
    }
}

impl std::str::FromStr for DiskSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        DiskSpec::parse(s)
    }
}

/// The canonical `key=value` form (target last), which parses back to the
/// same spec.
impl fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "format={},vdev={},access={}",
            self.format.name(),
            self.vdev,
            if self.read_only { "ro" } else { "rw" }
        )?;
        if self.cdrom {
            f.write_str(",devtype=cdrom")?;
        }
        if !self.discard {
            f.write_str(",no-discard")?;
        }
        if let Some(b) = &self.backendtype {
            write!(f, ",backendtype={b}")?;
        }
        if self.persistent_grants {
            f.write_str(",persistent-grants")?;
        }
        // `target=` drops one trailing comma: keep a target's own.
        let comma = if self.target.ends_with(',') { "," } else { "" };
        write!(f, ",target={}{comma}", self.target)
    }
}

/// `prefix:` at the start of `s` as xl recognises it: a lower-case word and
/// a colon (an unknown word only before something other than a lower-case
/// letter or digit, so `hdc:cdrom` is not a prefix).
fn deprecated_prefix(s: &str) -> Option<(&str, &str)> {
    let i = s.find(':')?;
    let word = &s[..i];
    let after = &s[i + 1..];
    let mut chars = word.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !first_ok
        || !word
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return None;
    }
    // A known prefix takes anything after it; an unknown word followed by
    // a letter or digit is not a prefix.
    let known = IGNORED_PREFIXES.contains(&word)
        || matches!(
            word,
            "raw" | "qcow" | "qcow2" | "vhd" | "iscsi" | "nbd" | "enbd" | "drbd"
        );
    if !known
        && after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return None;
    }
    Some((word, after))
}

fn set_once(
    slot: &mut Option<String>,
    v: &str,
    again: impl FnOnce() -> SpecError,
) -> Result<(), SpecError> {
    match slot {
        // xl does not complain about overwriting an empty value.
        Some(old) if !old.is_empty() => Err(again()),
        _ => {
            *slot = Some(v.to_string());
            Ok(())
        }
    }
}

fn set_format(
    slot: &mut Option<String>,
    v: &str,
    err: &dyn Fn(&str, &str) -> SpecError,
) -> Result<(), SpecError> {
    // "" means raw; the same format twice is fine, another is not.
    let norm = |s: &str| {
        if s.is_empty() {
            "raw".to_string()
        } else {
            s.to_string()
        }
    };
    match slot {
        Some(old) if norm(old) != norm(v) => Err(err(
            &format!("format={v}"),
            &format!("format given twice ({} and {})", norm(old), norm(v)),
        )),
        _ => {
            *slot = Some(v.to_string());
            Ok(())
        }
    }
}

fn keyword(
    p: &mut Parse,
    k: &str,
    v: &str,
    tok: &str,
    err: &dyn Fn(&str, &str) -> SpecError,
) -> Result<(), SpecError> {
    let again = || err(k, "given twice");
    match k {
        "format" => set_format(&mut p.format, v, err),
        "vdev" => set_once(&mut p.vdev, v, again),
        "access" => set_once(&mut p.access, v, again),
        "devtype" => {
            p.devtype = Some(match v {
                "cdrom" => true,
                "disk" => false,
                _ => return Err(err(tok, "unknown value for devtype (disk, cdrom)")),
            });
            Ok(())
        }
        "backendtype" => match v {
            "" | "phy" | "qdisk" | "tap" | "standalone" => {
                p.backendtype = (!v.is_empty()).then(|| v.to_string());
                Ok(())
            }
            _ => Err(err(
                tok,
                "unknown value for backendtype (phy, qdisk, tap, standalone)",
            )),
        },
        "specification" => match v {
            "" | "xen" => Ok(()),
            _ => Err(err(
                tok,
                "xenkvm offers Xen PV disks only (specification=xen)",
            )),
        },
        "backend" => match v {
            "" | "0" | "Domain-0" => Ok(()),
            _ => Err(err(
                tok,
                "driver domains are not supported: xenkvm itself is the backend",
            )),
        },
        "script" => Err(err(
            k,
            "block scripts are not run by xenkvm; give a file or block device",
        )),
        "colo-host" | "colo-port" | "colo-export" | "active-disk" | "hidden-disk" => {
            Err(err(k, "COLO replication is not offered by xenkvm"))
        }
        "grant_usage" => Err(err(
            k,
            "only for specification=virtio, which xenkvm does not offer",
        )),
        _ if k.starts_with(|c: char| c.is_ascii_lowercase())
            && k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_') =>
        {
            Err(err(k, "unknown parameter"))
        }
        _ => Err(err(tok, "bad disk syntax")),
    }
}

fn positional(
    p: &mut Parse,
    tok: &str,
    err: &dyn Fn(&str, &str) -> SpecError,
) -> Result<(), SpecError> {
    if p.target.is_none() {
        p.target = Some(tok.to_string());
    } else if !p.depr_prefix && p.format.is_none() {
        // `,hdc:cdrom,r`: an empty target, then vdev:devtype.
        if p.target.as_deref() == Some("") && tok.contains(':') {
            p.format = Some("empty".into());
            vdev_devtype(p, tok, err)?;
        } else {
            set_format(&mut p.format, tok, err)?;
        }
    } else if p.vdev.is_none() {
        if tok.contains(':') {
            vdev_devtype(p, tok, err)?;
        } else {
            p.vdev = Some(tok.to_string());
        }
    } else if p.access.is_none() {
        p.access = Some(tok.to_string());
    } else {
        return Err(err(
            tok,
            "too many positional parameters (target, format, vdev, access)",
        ));
    }
    Ok(())
}

/// The deprecated `vdev:devtype` (`hdc:cdrom`).
fn vdev_devtype(
    p: &mut Parse,
    tok: &str,
    err: &dyn Fn(&str, &str) -> SpecError,
) -> Result<(), SpecError> {
    let (vdev, t) = tok.rsplit_once(':').unwrap_or((tok, ""));
    set_once(&mut p.vdev, vdev, || err("vdev", "given twice"))?;
    p.devtype = Some(match t {
        "cdrom" => true,
        "disk" => false,
        _ => return Err(err(tok, "unknown deprecated type (cdrom, disk)")),
    });
    Ok(())
}

/// The xenstore virtual-device number of a vdev name, as libxl encodes it
/// (`xen-vbd-interface(7)`): `xvdN[P]` disks and partitions up to 15 as
/// `202 << 8 | disk << 4 | part`, beyond as `1 << 28 | disk << 8 | part`
/// (disks below 2^20, partitions to 255); `dNpM` the same; `hda`-`hdd`
/// (partitions to 63) as `3 << 8` / `22 << 8 | (disk & 1) << 6 | part`;
/// `sda`-`sdp` (partitions to 15) as `8 << 8 | disk << 4 | part`; a plain
/// number (decimal, `0x` hex, `0` octal) up to `i32::MAX` as itself.
pub fn vdev_number(vdev: &str) -> Option<u32> {
    let xvd = |disk: u32, part: u32| {
        if disk <= 15 && part <= 15 {
            (202 << 8) | (disk << 4) | part
        } else {
            (1 << 28) | (disk << 8) | part
        }
    };
    if let Some((d, p)) = d_p_form(vdev) {
        return Some(xvd(d, p));
    }
    if let Some((d, p)) = letters_form(vdev, "xvd", (1 << 20) - 1, 255) {
        return Some(xvd(d, p));
    }
    if let Some(n) = plain_number(vdev) {
        return Some(n);
    }
    if let Some((d, p)) = letters_form(vdev, "hd", 3, 63) {
        return Some(((if d < 2 { 3 } else { 22 }) << 8) | ((d & 1) << 6) | p);
    }
    if let Some((d, p)) = letters_form(vdev, "sd", 15, 15) {
        return Some((8 << 8) | (d << 4) | p);
    }
    None
}

/// `dN` or `dNpM` (disk below 2^20, partition below 256).
fn d_p_form(s: &str) -> Option<(u32, u32)> {
    let s = s.strip_prefix('d')?;
    let (d, p) = match s.split_once('p') {
        Some((d, p)) => (d, Some(p)),
        None => (s, None),
    };
    let num = |x: &str| -> Option<u32> {
        if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) || x.len() > 9 {
            return None;
        }
        x.parse().ok()
    };
    let d = num(d)?;
    let p = match p {
        Some(p) => num(p)?,
        None => 0,
    };
    (d < (1 << 20) && p < 256).then_some((d, p))
}

/// `<prefix><letters>[<partition>]`: the letters a bijective base-26
/// number (`a` 0, `z` 25, `aa` 26), the partition decimal without a
/// leading zero.
fn letters_form(s: &str, prefix: &str, max_disk: u32, max_part: u32) -> Option<(u32, u32)> {
    let rest = s.strip_prefix(prefix)?;
    let n = rest.bytes().take_while(|b| b.is_ascii_lowercase()).count();
    if n == 0 {
        return None;
    }
    let mut disk: i64 = -1;
    for b in rest[..n].bytes() {
        disk = (disk + 1) * 26 + i64::from(b - b'a');
        if disk > i64::from(max_disk) {
            return None;
        }
    }
    let part = &rest[n..];
    let p = if part.is_empty() {
        0
    } else {
        if part.starts_with('0') || part.len() > 4 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse::<u32>().ok().filter(|p| *p <= max_part)?
    };
    Some((disk as u32, p))
}

/// A number as strtoul(.., 0) reads it: `0x` hex, leading-0 octal, decimal.
fn plain_number(s: &str) -> Option<u32> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || digits.len() > 16 || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = u64::from_str_radix(digits, radix).ok()?;
    u32::try_from(v).ok().filter(|v| *v <= i32::MAX as u32)
}

#[cfg(test)]
mod tests;
