//! The xl.cfg file (`xl.cfg(5)`) as `xl create` reads it, for
//! `xenkvm create FILE.cfg [KEY=VALUE...]`.
//!
//! Syntax (xl's `libxlu_cfg_l.l`/`libxlu_cfg_y.y`): one `key = value` (or
//! `key += value`) per line or `;`-separated; keys `[a-z][._0-9a-z]*`;
//! values are strings in single or double quotes (a backslash takes the
//! next character literally), numbers (`[0-9][0-9a-fx]*`), or lists
//! `[ v, v, ... ]` that may span lines and end with a comma; `#` starts a
//! comment. A key given twice keeps the last value; `+=` appends to a
//! string or a list. `KEY=VALUE` overrides on the command line are lines of
//! the same syntax read after the file, as xl does.
//!
//! Paths: xl hands `kernel`, `ramdisk` and disk targets to libxl, which
//! opens them relative to xl's working directory; xenkvm does the same (a
//! relative path is not resolved against the cfg file's directory).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::disk::DiskSpec;
use crate::config::nic::NicSpec;

/// A value: a string (quoted or a number as written) or a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Str { s: String, quoted: bool },
    List(Vec<Value>),
}

/// One assignment, with where it was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub value: Value,
    pub line: usize,
    /// The file, or "command line" for an override.
    pub origin: String,
}

/// A refused config: file (or "command line"), line, key, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{origin}:{line}: {key}{sep}{msg}", sep = if key.is_empty() { "" } else { ": " })]
pub struct CfgError {
    pub origin: String,
    pub line: usize,
    /// Empty for a syntax error.
    pub key: String,
    pub msg: String,
}

/// The assignments of a config, in order of first assignment.
#[derive(Clone, Debug, Default)]
pub struct RawConfig {
    pub order: Vec<String>,
    pub map: HashMap<String, Setting>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Num(String),
    Str(String),
    Assign,
    AddAssign,
    Comma,
    Open,
    Close,
    End,
}

fn lex(text: &str, origin: &str) -> Result<Vec<(Tok, usize)>, CfgError> {
    let err = |line: usize, msg: String| CfgError {
        origin: origin.to_string(),
        line,
        key: String::new(),
        msg,
    };
    let mut out = Vec::new();
    let mut line = 1;
    let b: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            ' ' | '\t' | '\r' => i += 1,
            '\n' => {
                out.push((Tok::End, line));
                line += 1;
                i += 1;
            }
            '#' => {
                while i < b.len() && b[i] != '\n' {
                    i += 1;
                }
            }
            ';' => {
                out.push((Tok::End, line));
                i += 1;
            }
            ',' => {
                out.push((Tok::Comma, line));
                i += 1;
            }
            '[' => {
                out.push((Tok::Open, line));
                i += 1;
            }
            ']' => {
                out.push((Tok::Close, line));
                i += 1;
            }
            '=' => {
                out.push((Tok::Assign, line));
                i += 1;
            }
            '+' if b.get(i + 1) == Some(&'=') => {
                out.push((Tok::AddAssign, line));
                i += 2;
            }
            '\'' | '"' => {
                let q = c;
                let start = line;
                let mut s = String::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None | Some('\n') => {
                            return Err(err(start, "a string is not closed on its line".into()))
                        }
                        Some('\\') => {
                            match b.get(i + 1) {
                                None | Some('\n') => {
                                    return Err(err(
                                        start,
                                        "a string is not closed on its line".into(),
                                    ))
                                }
                                Some(&e) => s.push(e),
                            }
                            i += 2;
                        }
                        Some(&ch) if ch == q => {
                            i += 1;
                            break;
                        }
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                out.push((Tok::Str(s), start));
            }
            'a'..='z' => {
                let st = i;
                while i < b.len() && matches!(b[i], 'a'..='z' | '0'..='9' | '.' | '_') {
                    i += 1;
                }
                out.push((Tok::Ident(b[st..i].iter().collect()), line));
            }
            '0'..='9' => {
                let st = i;
                while i < b.len() && matches!(b[i], '0'..='9' | 'a'..='f' | 'x') {
                    i += 1;
                }
                out.push((Tok::Num(b[st..i].iter().collect()), line));
            }
            _ => {
                let st = i;
                while i < b.len() && !b[i].is_whitespace() {
                    i += 1;
                }
                let word: String = b[st..i].iter().take(40).collect();
                let hint = if "+-.():".contains(c) || c.is_ascii_uppercase() {
                    " (xl.cfg is not Python: keys are lower case, strings are quoted)"
                } else {
                    ""
                };
                return Err(err(line, format!("syntax error at \"{word}\"{hint}")));
            }
        }
    }
    out.push((Tok::End, line));
    Ok(out)
}

struct Parser<'a> {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    origin: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos.min(self.toks.len() - 1)].0
    }
    fn line(&self) -> usize {
        self.toks[self.pos.min(self.toks.len() - 1)].1
    }
    fn bump(&mut self) -> Tok {
        let t = self.peek().clone();
        self.pos += 1;
        t
    }
    fn err(&self, key: &str, msg: impl Into<String>) -> CfgError {
        CfgError {
            origin: self.origin.to_string(),
            line: self.line(),
            key: key.to_string(),
            msg: msg.into(),
        }
    }
    fn skip_newlines(&mut self) {
        while *self.peek() == Tok::End && self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
    }
    fn value(&mut self, key: &str, depth: usize) -> Result<Value, CfgError> {
        match self.bump() {
            Tok::Str(s) => Ok(Value::Str { s, quoted: true }),
            Tok::Num(s) => Ok(Value::Str { s, quoted: false }),
            Tok::Open => {
                if depth > 8 {
                    return Err(self.err(key, "lists nested too deep"));
                }
                let mut v = Vec::new();
                loop {
                    self.skip_newlines();
                    if *self.peek() == Tok::Close {
                        self.pos += 1;
                        break;
                    }
                    v.push(self.value(key, depth + 1)?);
                    self.skip_newlines();
                    match self.bump() {
                        Tok::Comma => {}
                        Tok::Close => break,
                        _ => {
                            self.pos -= 1;
                            return Err(self.err(key, "expected ',' or ']' in the list"));
                        }
                    }
                }
                Ok(Value::List(v))
            }
            Tok::Ident(w) => {
                self.pos -= 1;
                Err(self.err(
                    key,
                    format!(
                        "expected a quoted string, a number or a list, not {w} (quote strings)"
                    ),
                ))
            }
            _ => {
                self.pos -= 1;
                Err(self.err(
                    key,
                    "expected a value (a quoted string, a number or a list)",
                ))
            }
        }
    }
}

impl RawConfig {
    /// Reads `text` (from `origin`) into this config: later assignments
    /// replace earlier ones, `+=` appends.
    pub fn parse_into(&mut self, text: &str, origin: &str) -> Result<(), CfgError> {
        let mut p = Parser {
            toks: lex(text, origin)?,
            pos: 0,
            origin,
        };
        loop {
            p.skip_newlines();
            let line = p.line();
            let key = match p.bump() {
                Tok::End => return Ok(()),
                Tok::Ident(k) => k,
                _ => {
                    p.pos -= 1;
                    return Err(p.err("", "expected `key = value`"));
                }
            };
            let add = match p.bump() {
                Tok::Assign => false,
                Tok::AddAssign => true,
                _ => {
                    p.pos -= 1;
                    return Err(p.err(&key, "expected '=' after the key"));
                }
            };
            let value = p.value(&key, 0)?;
            if p.bump() != Tok::End {
                p.pos -= 1;
                return Err(p.err(&key, "expected the end of the line after the value"));
            }
            let value = match (add, self.map.get(&key).map(|s| &s.value)) {
                (true, Some(Value::List(old))) => {
                    let mut l = old.clone();
                    match value {
                        Value::List(more) => l.extend(more),
                        v => l.push(v),
                    }
                    Value::List(l)
                }
                (true, Some(Value::Str { s: old, quoted })) => match value {
                    Value::Str { s, .. } => Value::Str {
                        s: format!("{old}{s}"),
                        quoted: *quoted,
                    },
                    Value::List(_) => {
                        return Err(CfgError {
                            origin: origin.into(),
                            line,
                            key,
                            msg: "cannot append a list to a string".into(),
                        })
                    }
                },
                _ => value,
            };
            if !self.map.contains_key(&key) {
                self.order.push(key.clone());
            }
            self.map.insert(
                key,
                Setting {
                    value,
                    line,
                    origin: origin.to_string(),
                },
            );
        }
    }
}

/// What the guest does when it powers off, reboots or crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnEvent {
    Destroy,
    Restart,
}

/// The guest type (`type =`, or the older `builder =`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestType {
    /// Not given: xenkvm's default (PVH entry of an ELF; a bzImage's ELF).
    #[default]
    Unspecified,
    /// `type = "hvm"`: a bzImage enters by the Linux boot protocol as an
    /// HVM guest; an ELF by its PVH entry.
    Hvm,
    /// `type = "pvh"`.
    Pvh,
}

/// The keys xenkvm uses.
pub const KNOWN_KEYS: &[&str] = &[
    "name",
    "uuid",
    "type",
    "builder",
    "memory",
    "maxmem",
    "vcpus",
    "maxvcpus",
    "kernel",
    "ramdisk",
    "cmdline",
    "extra",
    "root",
    "disk",
    "vif",
    "on_poweroff",
    "on_reboot",
    "on_crash",
];

/// Keys refused by name: what they ask for xenkvm does not offer, and a
/// guest configured with them would not get what its owner expects.
pub const REFUSED_KEYS: &[(&str, &str)] = &[
    (
        "viridian",
        "Hyper-V enlightenments (viridian) are not offered",
    ),
    ("pci", "PCI passthrough is not offered"),
    ("device_model_", "xenkvm runs no device model (QEMU)"),
    ("vnc", "there is no graphical console (vnc)"),
    ("sdl", "there is no graphical console (sdl)"),
    ("spice", "there is no graphical console (spice)"),
    ("vfb", "there is no PV framebuffer"),
    ("vkb", "there is no PV keyboard"),
    ("usb", "USB is not emulated"),
    ("soundhw", "sound is not emulated"),
    ("bootloader", "xenkvm runs no bootloader: give kernel="),
    ("firmware", "xenkvm boots the kernel directly: give kernel="),
    ("nestedhvm", "nested HVM is not offered"),
    ("altp2m", "altp2m is not offered"),
    ("vtpm", "there is no vTPM"),
    ("p9", "there is no 9pfs"),
    ("channel", "PV channels are not offered"),
    ("vdispl", "there is no PV display"),
    ("vsnd", "there is no PV sound"),
    ("iomem", "I/O memory passthrough is not offered"),
    ("ioports", "I/O port passthrough is not offered"),
    ("irqs", "IRQ passthrough is not offered"),
    ("dtdev", "device-tree passthrough is not offered"),
    ("gfx_passthru", "graphics passthrough is not offered"),
    ("rdm", "reserved device memory (passthrough) is not offered"),
    ("cpuid", "CPUID policy strings are not applied"),
    ("stubdomain", "xenkvm runs no stub domain"),
];

/// Why `key` is refused, if it is.
pub fn refused(key: &str) -> Option<&'static str> {
    REFUSED_KEYS.iter().find_map(|(k, why)| {
        let hit = if k.ends_with('_') {
            key.starts_with(k)
        } else {
            key == *k
                || key.starts_with(&format!("{k}_"))
                || (*k == "usb" && key.starts_with("usb"))
                || (*k == "vnc" && key.starts_with("vnc"))
        };
        hit.then_some(*why)
    })
}

/// A domain configuration as xenkvm uses it.
#[derive(Clone, Debug, Default)]
pub struct XlConfig {
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub guest_type: GuestType,
    pub memory_mib: Option<u64>,
    pub vcpus: Option<u32>,
    pub kernel: Option<PathBuf>,
    pub ramdisk: Option<PathBuf>,
    /// `cmdline`, else `root=ROOT EXTRA`.
    pub cmdline: Option<String>,
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
    pub on_poweroff: Option<OnEvent>,
    pub on_reboot: Option<OnEvent>,
    pub on_crash: Option<OnEvent>,
    /// Keys xenkvm does not use, with where they were set: the line, or 0
    /// for a command-line override (for one warning).
    pub unused: Vec<(String, usize)>,
    /// Other notes for the user (maxmem above memory, ...).
    pub warnings: Vec<String>,
}

impl XlConfig {
    /// The key that names the domain for generated MACs: uuid, else name.
    pub fn domain_key(&self) -> String {
        self.uuid
            .clone()
            .or_else(|| self.name.clone())
            .unwrap_or_else(|| "xenkvm-guest".into())
    }

    /// Reads `path`, then applies `overrides` (xl's `KEY=VALUE` arguments).
    pub fn load(path: &Path, overrides: &[String]) -> Result<XlConfig, CfgError> {
        let origin = path.display().to_string();
        let text = std::fs::read(path).map_err(|e| CfgError {
            origin: origin.clone(),
            line: 0,
            key: String::new(),
            msg: format!("cannot read: {e}"),
        })?;
        if text.len() > 1 << 20 {
            return Err(CfgError {
                origin,
                line: 0,
                key: String::new(),
                msg: "larger than 1 MiB: not an xl.cfg".into(),
            });
        }
        let text = String::from_utf8(text).map_err(|e| CfgError {
            origin: origin.clone(),
            line: 0,
            key: String::new(),
            msg: format!("not UTF-8 text ({e})"),
        })?;
        Self::from_text(&text, &origin, overrides)
    }

    /// Parses config text from `origin`, then `overrides`.
    pub fn from_text(text: &str, origin: &str, overrides: &[String]) -> Result<XlConfig, CfgError> {
        let mut raw = RawConfig::default();
        raw.parse_into(text, origin)?;
        for o in overrides {
            raw.parse_into(o, "command line")?;
        }
        Self::from_raw(&raw)
    }

    /// Interprets parsed assignments.
    pub fn from_raw(raw: &RawConfig) -> Result<XlConfig, CfgError> {
        let mut c = XlConfig::default();
        for key in &raw.order {
            let s = &raw.map[key];
            let err = |msg: String| CfgError {
                origin: s.origin.clone(),
                line: s.line,
                key: key.clone(),
                msg,
            };
            if let Some(why) = refused(key) {
                return Err(err(format!("not supported by xenkvm: {why}")));
            }
            let string = || -> Result<String, CfgError> {
                match &s.value {
                    Value::Str { s, .. } => Ok(s.clone()),
                    Value::List(_) => Err(err("expected a string or number, not a list".into())),
                }
            };
            let number = |min: u64, max: u64| -> Result<u64, CfgError> {
                let v = string()?;
                let n = parse_number(&v).ok_or_else(|| err(format!("\"{v}\" is not a number")))?;
                if !(min..=max).contains(&n) {
                    return Err(err(format!("{n} is not between {min} and {max}")));
                }
                Ok(n)
            };
            let list = || -> Result<Vec<String>, CfgError> {
                match &s.value {
                    Value::List(l) => l
                        .iter()
                        .map(|v| match v {
                            Value::Str { s, .. } => Ok(s.clone()),
                            Value::List(_) => Err(err("a list inside the list".into())),
                        })
                        .collect(),
                    Value::Str { s, .. } => Ok(vec![s.clone()]),
                }
            };
            let action = |default_name: &str| -> Result<OnEvent, CfgError> {
                let v = string()?;
                match v.as_str() {
                    "destroy" => Ok(OnEvent::Destroy),
                    "restart" => Ok(OnEvent::Restart),
                    "preserve" | "rename-restart" | "coredump-destroy" | "coredump-restart"
                    | "soft-reset" => Err(err(format!(
                        "\"{v}\" is not offered by xenkvm (destroy or restart; xl's default here is {default_name})"
                    ))),
                    _ => Err(err(format!("unknown action \"{v}\""))),
                }
            };
            match key.as_str() {
                "name" => {
                    let n = string()?;
                    if n.is_empty() || n.len() > 64 || n.chars().any(|ch| ch.is_control()) {
                        return Err(err("a name of 1 to 64 printable characters".into()));
                    }
                    c.name = Some(n);
                }
                "uuid" => c.uuid = Some(string()?),
                "type" => {
                    c.guest_type = match string()?.as_str() {
                        "hvm" => GuestType::Hvm,
                        "pvh" => GuestType::Pvh,
                        "pv" => {
                            return Err(err(
                                "\"pv\" guests are not supported: xenkvm runs HVM and PVH guests (a Linux PV kernel boots as type = \"pvh\")".into(),
                            ))
                        }
                        t => return Err(err(format!("unknown type \"{t}\" (hvm, pvh)"))),
                    }
                }
                "builder" => {
                    let b = string()?;
                    match b.as_str() {
                        "hvm" => {
                            if !raw.map.contains_key("type") {
                                c.guest_type = GuestType::Hvm;
                            }
                        }
                        "generic" => {
                            if !raw.map.contains_key("type") {
                                return Err(err(
                                    "\"generic\" (PV) guests are not supported: set type = \"pvh\" or \"hvm\"".into(),
                                ));
                            }
                        }
                        _ => return Err(err(format!("unknown builder \"{b}\" (hvm, generic)"))),
                    }
                }
                "memory" => c.memory_mib = Some(number(16, 65536)?),
                "maxmem" => {
                    let m = number(16, 1 << 20)?;
                    let mem = raw
                        .map
                        .get("memory")
                        .and_then(|s| match &s.value {
                            Value::Str { s, .. } => parse_number(s),
                            Value::List(_) => None,
                        })
                        .unwrap_or(256);
                    if m > mem {
                        c.warnings.push(format!(
                            "{}:{}: maxmem: {m} MiB above memory = {mem}: xenkvm does not balloon; the guest has {mem} MiB",
                            s.origin, s.line
                        ));
                    }
                }
                "vcpus" => c.vcpus = Some(number(1, u64::from(crate::MAX_VCPUS))? as u32),
                "maxvcpus" => {
                    let m = number(1, u64::from(crate::MAX_VCPUS))? as u32;
                    let online = raw.map.get("vcpus").and_then(|s| match &s.value {
                        Value::Str { s, .. } => parse_number(s),
                        Value::List(_) => None,
                    });
                    // As xl: vcpus (default 1) are online at boot, the rest
                    // up to maxvcpus would be hot-pluggable.
                    let v = online.unwrap_or(1);
                    if u64::from(m) > v {
                        c.warnings.push(format!(
                            "{}:{}: maxvcpus: {m} above vcpus = {v}: xenkvm does not hot-plug vCPUs; the guest has {v}",
                            s.origin, s.line
                        ));
                    }
                }
                "kernel" => c.kernel = Some(PathBuf::from(string()?)),
                "ramdisk" => c.ramdisk = Some(PathBuf::from(string()?)),
                "cmdline" | "extra" | "root" => {
                    string()?;
                }
                "disk" => {
                    for d in list()? {
                        c.disks.push(DiskSpec::parse(&d).map_err(|e| err(e.to_string()))?);
                    }
                }
                "vif" => {
                    for v in list()? {
                        let (n, w) = crate::config::nic::NicSpec::parse_with_warnings(&v)
                            .map_err(|e| err(e.to_string()))?;
                        c.warnings
                            .extend(w.into_iter().map(|w| format!("{}:{}: {w}", s.origin, s.line)));
                        c.nics.push(n);
                    }
                }
                "on_poweroff" => c.on_poweroff = Some(action("destroy")?),
                "on_reboot" => c.on_reboot = Some(action("restart")?),
                "on_crash" => c.on_crash = Some(action("destroy")?),
                _ => c.unused.push((
                    key.clone(),
                    if s.origin == "command line" { 0 } else { s.line },
                )),
            }
        }
        // The command line: cmdline, else root= and extra (xl_parse.c).
        let get = |k: &str| {
            raw.map.get(k).and_then(|s| match &s.value {
                Value::Str { s, .. } => Some(s.clone()),
                Value::List(_) => None,
            })
        };
        let (cmdline, root, extra) = (get("cmdline"), get("root"), get("extra"));
        c.cmdline = match cmdline {
            Some(cl) => {
                if root.is_some() || extra.is_some() {
                    c.warnings
                        .push("cmdline is given: root and extra are ignored (as xl does)".into());
                }
                Some(cl)
            }
            None => {
                let parts: Vec<String> = root
                    .map(|r| format!("root={r}"))
                    .into_iter()
                    .chain(extra)
                    .collect();
                (!parts.is_empty()).then(|| parts.join(" "))
            }
        };
        // Two disks with one virtual device would clash in xenstore.
        for (i, d) in c.disks.iter().enumerate() {
            if let Some(o) = c.disks[..i].iter().find(|o| o.devid == d.devid) {
                let s = &raw.map["disk"];
                return Err(CfgError {
                    origin: s.origin.clone(),
                    line: s.line,
                    key: "disk".into(),
                    msg: format!(
                        "vdev={} and vdev={} are the same virtual device ({})",
                        o.vdev, d.vdev, d.devid
                    ),
                });
            }
        }
        Ok(c)
    }

    /// The one warning naming the keys xenkvm does not use, if any.
    pub fn unused_warning(&self, origin: &str) -> Option<String> {
        if self.unused.is_empty() {
            return None;
        }
        let keys: Vec<String> = self
            .unused
            .iter()
            .map(|(k, l)| match l {
                0 => format!("{k} (command line)"),
                l => format!("{k} (line {l})"),
            })
            .collect();
        Some(format!(
            "{origin}: ignoring keys xenkvm does not use: {}",
            keys.join(", ")
        ))
    }
}

/// xl's numbers: decimal, or `0x` hex.
fn parse_number(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x") {
        if h.is_empty() || h.len() > 15 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(h, 16).ok();
    }
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests;
