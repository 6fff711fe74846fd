//! What one virtual disk is to the block backend (`BlkConfig`): built from
//! the configuration layer's `DiskSpec` (xl's disk syntax and xl's
//! virtual-device numbers live there, `crate::config::disk`), with what
//! this backend cannot serve refused by name. `persistent` (offer
//! `feature-persistent`, the disk spec's `persistent-grants` flag) is off
//! by default: a Linux frontend that uses it copies every I/O.

use std::path::PathBuf;

/// Image format: the configuration layer's.
pub use crate::config::DiskFormat;

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
            format: d.format,
            vdev: d.vdev.clone(),
            devid: d.devid,
            readonly: d.read_only,
            discard: d.discard,
            persistent: d.persistent_grants,
        })
    }
}

impl BlkConfig {
    /// A `--disk` spec in xl's syntax, parsed by the configuration layer
    /// (`crate::config::DiskSpec`, the one disk parser) and checked by
    /// [`BlkConfig::from_spec`].
    pub fn parse(spec: &str) -> Result<BlkConfig, String> {
        let d = crate::config::DiskSpec::parse(spec).map_err(|e| e.to_string())?;
        BlkConfig::from_spec(&d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_config_from_xl_spec_keeps_what_the_backend_needs() {
        let c = BlkConfig::parse("format=raw,vdev=xvdb,access=ro,target=/tmp/a,b.img").unwrap();
        assert_eq!(c.path, PathBuf::from("/tmp/a,b.img"));
        assert_eq!((c.vdev.as_str(), c.devid), ("xvdb", 51728));
        assert!(c.readonly && c.discard && !c.persistent);
        assert!(
            BlkConfig::parse("vdev=xvda,persistent-grants,target=/x")
                .unwrap()
                .persistent
        );
        let c = BlkConfig::parse("/x.img,raw,xvdq,rw").unwrap();
        assert_eq!(c.devid, 268439552);
        assert!(
            !BlkConfig::parse("vdev=xvda,no-discard,target=/x")
                .unwrap()
                .discard
        );
    }

    #[test]
    fn blk_config_refuses_cdrom_by_name() {
        let e = BlkConfig::parse("vdev=hdc,devtype=cdrom,target=/x.iso").unwrap_err();
        assert!(e.contains("devtype=cdrom"), "{e}");
    }
}
