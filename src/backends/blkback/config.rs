//! What one virtual disk is (`BlkConfig`), read from a `--disk` spec in xl's
//! `key=value` syntax (`xl-disk-configuration(5)`), and the virtual-device
//! numbers as xl encodes them (`xen-vbd-interface(7)`).
//!
//! Accepted keys: `target=PATH` (last, as in xl: everything after it is the
//! path, commas included), `format=raw|qcow2`, `vdev=NAME`,
//! `access=rw|w|ro|r`, `devtype=disk`, `backendtype=phy|qdisk|tap`
//! (accepted, xenkvm has one backend), `discard`/`no-discard`, and
//! xenkvm's own `persistent=0|1` (offer `feature-persistent`; off by
//! default because Linux then copies every I/O). The positional form and
//! the other keys are refused by name.

use std::path::PathBuf;

/// Image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// The xl spelling.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// One virtual disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// Image file or block device.
    pub path: PathBuf,
    pub format: DiskFormat,
    /// The vdev as written (`xvda`), the backend's `dev` key.
    pub vdev: String,
    /// The encoded device number (`virtual-device`, the xenstore devid).
    pub devid: u32,
    pub readonly: bool,
    /// Offer `discard` (xl's default).
    pub discard: bool,
    /// Offer `feature-persistent = 1`.
    pub persistent: bool,
}

impl BlkConfig {
    /// The backend's view of a disk the config layer parsed (`--disk`, an
    /// xl.cfg `disk =` entry). Refuses what this backend cannot serve, by
    /// name.
    pub fn from_spec(d: &crate::config::DiskSpec) -> Result<BlkConfig, String> {
        if d.cdrom {
            return Err(format!(
                "disk \"{d}\": devtype=cdrom: CD-ROMs are not offered (Linux does not attach them on HVM)"
            ));
        }
        Ok(BlkConfig {
            path: PathBuf::from(&d.target),
            format: match d.format {
                crate::config::DiskFormat::Raw => DiskFormat::Raw,
                crate::config::DiskFormat::Qcow2 => DiskFormat::Qcow2,
            },
            vdev: d.vdev.clone(),
            devid: d.devid,
            readonly: d.read_only,
            discard: d.discard,
            persistent: false,
        })
    }
}

/// A spec that cannot be used: which spec, which key, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--disk {spec:?}: {key}: {why}")]
pub struct SpecError {
    pub spec: String,
    pub key: String,
    pub why: String,
}

/// Parses a `--disk` spec.
pub fn parse_disk_spec(spec: &str) -> Result<BlkConfig, SpecError> {
    let err = |key: &str, why: &str| SpecError {
        spec: spec.to_string(),
        key: key.to_string(),
        why: why.to_string(),
    };
    let (head, target) = match spec.find("target=") {
        Some(i) if i == 0 || spec[..i].ends_with(',') => {
            (spec[..i].trim_end_matches(','), Some(&spec[i + 7..]))
        }
        _ => (spec, None),
    };
    let mut format = DiskFormat::Raw;
    let mut vdev = None;
    let mut readonly = false;
    let mut discard = true;
    let mut persistent = false;
    for item in head.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (item.trim(), None),
        };
        match (k, v) {
            ("format", Some(v)) => {
                format = match v {
                    "raw" => DiskFormat::Raw,
                    "qcow2" => DiskFormat::Qcow2,
                    _ => return Err(err("format", &format!("{v:?} is not raw or qcow2"))),
                }
            }
            ("vdev", Some(v)) => vdev = Some(v.to_string()),
            ("access", Some(v)) => {
                readonly = match v {
                    "rw" | "w" => false,
                    "ro" | "r" => true,
                    _ => return Err(err("access", &format!("{v:?} is not rw or ro"))),
                }
            }
            ("devtype", Some("disk")) => {}
            ("devtype", Some(v)) => {
                return Err(err(
                    "devtype",
                    &format!("{v:?} is not supported (only disk)"),
                ))
            }
            ("backendtype", Some("phy" | "qdisk" | "tap")) => {}
            ("backendtype", Some(v)) => {
                return Err(err(
                    "backendtype",
                    &format!("{v:?} is not phy, qdisk or tap"),
                ))
            }
            ("discard", None) => discard = true,
            ("no-discard", None) => discard = false,
            ("persistent", Some("0" | "off")) => persistent = false,
            ("persistent", Some("1" | "on")) => persistent = true,
            ("persistent", Some(v)) => {
                return Err(err("persistent", &format!("{v:?} is not 0 or 1")))
            }
            (k, None) => {
                return Err(err(
                    k,
                    "not a key=value pair (the positional form is not supported here)",
                ))
            }
            (k, Some(_)) => return Err(err(k, "unknown key")),
        }
    }
    let target = target
        .filter(|t| !t.is_empty())
        .ok_or_else(|| err("target", "missing (target=PATH, last)"))?;
    let vdev = vdev.ok_or_else(|| err("vdev", "missing (e.g. vdev=xvda)"))?;
    let devid = encode_vdev(&vdev).map_err(|why| err("vdev", why))?;
    Ok(BlkConfig {
        path: PathBuf::from(target),
        format,
        vdev,
        devid,
        readonly,
        discard,
        persistent,
    })
}

/// Bijective base-26 letters (`a` 0, `z` 25, `aa` 26) and the rest.
fn letters(s: &str) -> Option<(u32, &str)> {
    let end = s.find(|c: char| !c.is_ascii_lowercase()).unwrap_or(s.len());
    if end == 0 || end > 4 {
        return None;
    }
    let mut n = 0u32;
    for c in s[..end].bytes() {
        n = n * 26 + u32::from(c - b'a') + 1;
    }
    Some((n - 1, &s[end..]))
}

fn partition(s: &str) -> Result<u32, &'static str> {
    if s.is_empty() {
        return Ok(0);
    }
    if s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 3 {
        return Err("bad partition number");
    }
    s.parse().map_err(|_| "bad partition number")
}

/// The device number of a vdev name (`xen-vbd-interface(7)`): `xvdX[N]`
/// (`202<<8 | disk<<4 | part` for disk and part below 16, otherwise the
/// extended `1<<28 | disk<<8 | part`), `sdX[N]` (`8<<8 | disk<<4 | part`),
/// `hdX[N]` (`3<<8` for hda/hdb, `22<<8` for hdc/hdd, `disk<<6 | part`),
/// `dNpM`, or a decimal number.
pub fn encode_vdev(v: &str) -> Result<u32, &'static str> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v
            .parse::<u32>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or("device number out of range");
    }
    let xvd = |disk: u32, part: u32| -> Result<u32, &'static str> {
        if disk < 16 && part < 16 {
            Ok(202 << 8 | disk << 4 | part)
        } else if disk < (1 << 20) && part < 256 {
            Ok(1 << 28 | disk << 8 | part)
        } else {
            Err("disk or partition number too large")
        }
    };
    if let Some(r) = v.strip_prefix("xvd") {
        let (disk, rest) = letters(r).ok_or("xvd needs a disk letter")?;
        return xvd(disk, partition(rest)?);
    }
    if let Some(r) = v.strip_prefix("sd") {
        let (disk, rest) = letters(r).ok_or("sd needs a disk letter")?;
        let part = partition(rest)?;
        if disk >= 16 || part >= 16 {
            return Err("sd disks go up to sdp and partitions up to 15");
        }
        return Ok(8 << 8 | disk << 4 | part);
    }
    if let Some(r) = v.strip_prefix("hd") {
        let (disk, rest) = letters(r).ok_or("hd needs a disk letter")?;
        let part = partition(rest)?;
        if disk >= 4 || part >= 64 {
            return Err("hd disks go up to hdd and partitions up to 63");
        }
        return Ok(if disk < 2 {
            3 << 8 | disk << 6 | part
        } else {
            22 << 8 | (disk - 2) << 6 | part
        });
    }
    if let Some(r) = v.strip_prefix('d') {
        let (d, p) = r.split_once('p').unwrap_or((r, ""));
        if !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) && d.len() <= 7 {
            let disk: u32 = d.parse().map_err(|_| "bad disk number")?;
            return xvd(disk, partition(p)?);
        }
    }
    Err("not a vdev name (xvdX, sdX, hdX, dNpM or a number)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_vdev_matches_xl_numbers() {
        assert_eq!(encode_vdev("xvda"), Ok(51712));
        assert_eq!(encode_vdev("xvdb"), Ok(51728));
        assert_eq!(encode_vdev("xvde"), Ok(51776));
        assert_eq!(encode_vdev("xvda1"), Ok(51713));
        assert_eq!(encode_vdev("xvdp"), Ok(202 << 8 | 15 << 4));
        assert_eq!(
            encode_vdev("xvdq"),
            Ok(268439552),
            "extended form past 15 disks"
        );
        assert_eq!(encode_vdev("xvdaa"), Ok(1 << 28 | 26 << 8));
        assert_eq!(
            encode_vdev("xvda16"),
            Ok(1 << 28 | 16),
            "extended form past 15 partitions"
        );
        assert_eq!(encode_vdev("sda"), Ok(2048));
        assert_eq!(encode_vdev("hda"), Ok(768));
        assert_eq!(encode_vdev("hdb"), Ok(832));
        assert_eq!(encode_vdev("hdc"), Ok(5632));
        assert_eq!(encode_vdev("d0p1"), Ok(51713));
        assert_eq!(encode_vdev("51712"), Ok(51712));
        for bad in [
            "", "xvd", "xvd1", "sdq", "hde", "xvda01", "foo", "0", "xvdA",
        ] {
            assert!(encode_vdev(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parse_disk_spec_xl_keys_accepted() {
        let c = parse_disk_spec("format=raw,vdev=xvdb,access=ro,target=/tmp/a,b.img").unwrap();
        assert_eq!(c.path, PathBuf::from("/tmp/a,b.img"));
        assert_eq!(
            (c.devid, c.readonly, c.format),
            (51728, true, DiskFormat::Raw)
        );
        assert!(c.discard && !c.persistent);
        let c = parse_disk_spec("vdev=xvda,no-discard,persistent=1,target=/x").unwrap();
        assert!(!c.discard && c.persistent && !c.readonly);
    }

    #[test]
    fn parse_disk_spec_bad_key_named_in_error() {
        let e = parse_disk_spec("vdev=xvda,cache=none,target=/x").unwrap_err();
        assert_eq!(e.key, "cache");
        assert!(e.to_string().contains("cache=none"), "{e}");
        assert_eq!(parse_disk_spec("vdev=xvda").unwrap_err().key, "target");
        assert_eq!(parse_disk_spec("target=/x").unwrap_err().key, "vdev");
        assert_eq!(
            parse_disk_spec("vdev=xvdA,target=/x").unwrap_err().key,
            "vdev"
        );
        assert_eq!(
            parse_disk_spec("access=rx,vdev=xvda,target=/x")
                .unwrap_err()
                .key,
            "access"
        );
        assert_eq!(
            parse_disk_spec("format=vhd,vdev=xvda,target=/x")
                .unwrap_err()
                .key,
            "format"
        );
        assert_eq!(parse_disk_spec("/x,raw,xvda,rw").unwrap_err().key, "/x");
    }
}
