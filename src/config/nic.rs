//! xl's network interface specification (`xl-network-configuration(5)`),
//! as `vif = [...]` in an xl.cfg and `--net SPEC` on the command line take
//! it: comma-separated `key=value` pairs and flags, all optional (`''` is a
//! vif with every default).
//!
//! Accepted: `mac`, `bridge`, `vifname`, `type` (`ioemu`, `vif`), `model`,
//! `ip`, `mtu`, `devid`, `script` (with a warning: xenkvm runs no hotplug
//! scripts), `backend` (only dom0), `trusted`/`untrusted`. Refused by name:
//! `rate`, `gatewaydev`, `forwarddev`, `vlan`, `accel`, and any other key.

use std::fmt;

use crate::config::disk::SpecError;

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Mac {
    /// Six colon-separated groups of two hex digits (as xl requires).
    pub fn parse(s: &str) -> Option<Mac> {
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.split(':') {
            if n == 6 || part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out[n] = u8::from_str_radix(part, 16).ok()?;
            n += 1;
        }
        (n == 6).then_some(Mac(out))
    }

    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }

    /// A stable address in Xen's OUI (00:16:3e) for vif `devid` of the
    /// domain `key` (its uuid, or its name): the same config gives the same
    /// MAC on every run. As libxl, the fourth byte's top bit is clear.
    pub fn generated(key: &str, devid: u32) -> Mac {
        // FNV-1a 64: fixed, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes().chain([0]).chain(devid.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        Mac([0x00, 0x16, 0x3e, b[0] & 0x7f, b[1], b[2]])
    }
}

/// A parsed vif specification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicSpec {
    /// The guest's MAC; `None`: generated ([`NicSpec::mac_for`]).
    pub mac: Option<Mac>,
    pub bridge: Option<String>,
    /// The host-side interface name (default `vif<domid>.<devid>`).
    pub vifname: Option<String>,
    /// `devid=N`; default: the vif's index in the list.
    pub devid: Option<u32>,
    /// `type=ioemu|vif` as written.
    pub nic_type: Option<String>,
    /// `model=` as written (xenkvm has no emulated NIC: the guest gets the
    /// PV vif whatever the model).
    pub model: Option<String>,
    pub ip: Option<String>,
    pub mtu: Option<u16>,
    /// `script=` as written; never run.
    pub script: Option<String>,
}

/// Linux interface names: 1-15 bytes, no '/', ':', blanks or control
/// characters, not `.` or `..`.
fn ifname_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

impl NicSpec {
    /// Parses one vif specification. Warnings (a `script` that is not run, a
    /// `model` that is not emulated) are returned for the caller to log.
    pub fn parse_with_warnings(spec: &str) -> Result<(NicSpec, Vec<String>), SpecError> {
        let err = |key: &str, msg: &str| SpecError::new("vif", spec, key, msg);
        let mut n = NicSpec::default();
        let mut warnings = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        for tok in spec.split(',') {
            let tok = tok.trim_matches([' ', '\t', '\n']);
            if tok.is_empty() {
                continue;
            }
            let (k, v) = tok.split_once('=').unwrap_or((tok, ""));
            let k = k.trim();
            let v = v.trim();
            if seen.iter().any(|s| s == k) {
                return Err(err(k, "given twice"));
            }
            seen.push(k.to_string());
            let need = |v: &str| -> Result<(), SpecError> {
                if v.is_empty() {
                    Err(err(k, "needs a value"))
                } else {
                    Ok(())
                }
            };
            match k {
                "mac" => {
                    let m = Mac::parse(v).ok_or_else(|| {
                        err(
                            &format!("mac={v}"),
                            "not a MAC address (six colon-separated pairs of hex digits, e.g. 00:16:3e:12:34:56)",
                        )
                    })?;
                    if m.is_multicast() {
                        return Err(err(
                            &format!("mac={v}"),
                            "a multicast address (the first byte's low bit is set) cannot be a NIC's",
                        ));
                    }
                    if m.0 == [0; 6] {
                        return Err(err(&format!("mac={v}"), "the all-zero address"));
                    }
                    n.mac = Some(m);
                }
                "bridge" => {
                    need(v)?;
                    if !ifname_ok(v) {
                        return Err(err(
                            &format!("bridge={v}"),
                            "not a Linux interface name (1-15 characters, no '/', ':' or blanks)",
                        ));
                    }
                    n.bridge = Some(v.into());
                }
                "vifname" => {
                    need(v)?;
                    if !ifname_ok(v) {
                        return Err(err(
                            &format!("vifname={v}"),
                            "not a Linux interface name (1-15 characters, no '/', ':' or blanks)",
                        ));
                    }
                    n.vifname = Some(v.into());
                }
                "devid" => {
                    n.devid = Some(v.parse::<u32>().ok().filter(|d| *d < 1 << 16).ok_or_else(
                        || err(&format!("devid={v}"), "not a device number (0 to 65535)"),
                    )?);
                }
                "type" => match v {
                    "ioemu" | "vif" => n.nic_type = Some(v.into()),
                    _ => {
                        return Err(err(
                            &format!("type={v}"),
                            "unknown value for type (ioemu, vif)",
                        ))
                    }
                },
                "model" => {
                    need(v)?;
                    warnings.push(format!(
                        "vif \"{spec}\": model={v}: xenkvm emulates no NIC; the guest gets the PV vif (netfront)"
                    ));
                    n.model = Some(v.into());
                }
                "ip" => {
                    need(v)?;
                    n.ip = Some(v.into());
                }
                "mtu" => {
                    n.mtu = Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|m| *m >= 68)
                            .ok_or_else(|| err(&format!("mtu={v}"), "not an MTU (68 to 65535)"))?,
                    );
                }
                "script" => {
                    need(v)?;
                    warnings.push(format!(
                        "vif \"{spec}\": script={v}: xenkvm runs no hotplug scripts; it is not run"
                    ));
                    n.script = Some(v.into());
                }
                "backend" => match v {
                    "" | "0" | "Domain-0" => {}
                    _ => {
                        return Err(err(
                            &format!("backend={v}"),
                            "driver domains are not supported: xenkvm itself is the backend",
                        ))
                    }
                },
                "trusted" | "untrusted" if v.is_empty() => {}
                "rate" | "gatewaydev" | "forwarddev" | "vlan" | "accel" | "colo" => {
                    return Err(err(k, "not offered by xenkvm's network backend"))
                }
                _ => return Err(err(k, "unknown vif parameter")),
            }
        }
        Ok((n, warnings))
    }

    /// Parses one vif specification; warnings are logged.
    pub fn parse(spec: &str) -> Result<NicSpec, SpecError> {
        let (n, w) = Self::parse_with_warnings(spec)?;
        for w in w {
            tracing::warn!("{w}");
        }
        Ok(n)
    }

    /// The MAC the guest gets: the configured one, or one generated from
    /// `domain_key` (uuid or name) and the device number.
    pub fn mac_for(&self, domain_key: &str, index: u32) -> Mac {
        self.mac
            .unwrap_or_else(|| Mac::generated(domain_key, self.devid.unwrap_or(index)))
    }
}

impl std::str::FromStr for NicSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        NicSpec::parse(s)
    }
}

/// The canonical form, which parses back to the same spec.
impl fmt::Display for NicSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(m) = self.mac {
            parts.push(format!("mac={m}"));
        }
        let kv = [
            ("bridge", &self.bridge),
            ("vifname", &self.vifname),
            ("type", &self.nic_type),
            ("model", &self.model),
            ("ip", &self.ip),
            ("script", &self.script),
        ];
        for (k, v) in kv {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        }
        if let Some(d) = self.devid {
            parts.push(format!("devid={d}"));
        }
        if let Some(m) = self.mtu {
            parts.push(format!("mtu={m}"));
        }
        f.write_str(&parts.join(","))
    }
}
