//! The in-process xenstore server: xenkvm plays dom0's xenstored for its
//! guest.
//!
//! A Xen guest finds its configuration (name, memory, devices) and talks to
//! its backends through xenstore, a small hierarchical key-value store with
//! watches and transactions, reached over a shared ring page
//! (`HVM_PARAM_STORE_PFN`) and an event channel (`HVM_PARAM_STORE_EVTCHN`).
//! This module implements the server side of that protocol with Xen's
//! semantics (docs/misc/xenstore.txt, docs/misc/xenstore-ring.txt,
//! `io/xs_wire.h`) and knows nothing of KVM:
//!
//! - [`XenstoreServer::process`] drains every complete request from a
//!   guest's ring, writes the replies and pending watch events into the
//!   response ring (what does not fit is queued and sent on the next call),
//!   and says whether the guest must be notified. Guest-controlled indexes
//!   and headers are checked: a bad index or an oversized header breaks the
//!   connection and sets the ring's error indicator, as xenstored does.
//! - Every operation a domU can send: `READ`, `WRITE`, `MKDIR`, `RM`,
//!   `DIRECTORY`, `DIRECTORY_PART`, `GET_PERMS`, `SET_PERMS`, `WATCH` (which
//!   fires once at once), `UNWATCH`, `RESET_WATCHES`, `GET_DOMAIN_PATH`,
//!   `TRANSACTION_START`/`END` (conflicts give `EAGAIN`); privileged ones
//!   give `EACCES`. Relative paths resolve under `/local/domain/<domid>`;
//!   watch events echo the path form the watch was registered with.
//! - Permissions (`n`/`r`/`w`/`b` entries with an owner) and per-domain
//!   [`Quotas`] (nodes, value size, entries per directory, watches,
//!   transactions, permission entries, queued output).
//! - The standard tree of a domU ([`XenstoreServer::add_domain`]), as libxl
//!   writes it, and a dom0-side API for the VMM itself (`read`, `write`,
//!   `watch`, ...), e.g. to see `control/shutdown` or to publish backends.
//!
//! Wiring, on the VMM's side: a zeroed page at the store GFN (reserved in
//! the E820 map) prepared with [`XenstoreServer::init_page`] and published
//! with its event channel as `HVM_PARAM_STORE_PFN`/`HVM_PARAM_STORE_EVTCHN`;
//! on every guest signal on that port call `process(page)` and signal the
//! port back when it returns `true`; after dom0-side changes do the same for
//! each domain whose [`wants_process`](XenstoreServer::wants_process) is
//! true, and collect the VMM's own watch events with
//! [`take_events`](XenstoreServer::take_events).
//!
//! Written here rather than taken from a crate: no maintained Rust xenstore
//! server exists that embeds in a VMM (oxenstored is OCaml, xenstored C).

#![forbid(unsafe_code)]

mod conn;
mod path;
mod perms;
mod ring;
mod saved;
mod store;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use conn::{Conn, Tx, Watch};
pub use saved::SavedNode;
use store::{Event, Store};

pub use conn::{layout, ConnError};
pub use path::domain_path;
pub use perms::{Perm, PermKind, Perms};
pub use ring::{ring_read, ring_write, MemRingPage, RingPage, PAGE_SIZE};
pub use wire::{
    encode_msg, Header, MsgType, XsError, ABS_PATH_MAX, HEADER_LEN, PAYLOAD_MAX, REL_PATH_MAX,
};

use path::{check_special, resolve};
use wire::{one_arg, parse_decimal, path_and_value, split_args};

const OK: &[u8] = b"OK\0";
/// Most requests handled in one `process` call before yielding (a guest
/// that keeps refilling its ring cannot hold the caller forever).
const MAX_REQUESTS_PER_CALL: usize = 1024;
/// Most dom0-side watch events kept until [`XenstoreServer::take_events`].
const MAX_LOCAL_EVENTS: usize = 4096;

/// Per-domain limits (xenstored's defaults). Dom0 is not limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    /// Nodes a domain may own.
    pub max_nodes: u32,
    /// Bytes in a value a domain writes.
    pub max_value: usize,
    /// Children of a node a domain may create entries under.
    pub max_children: usize,
    /// Watches per connection.
    pub max_watches: usize,
    /// Open transactions per connection.
    pub max_transactions: usize,
    /// Entries in a permission list a domain sets.
    pub max_perms: usize,
    /// Bytes of replies and events queued for a ring before watch events
    /// are dropped.
    pub max_queued_bytes: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            max_nodes: 1000,
            max_value: 2048,
            max_children: 512,
            max_watches: 128,
            max_transactions: 10,
            max_perms: 5,
            max_queued_bytes: 256 * 1024,
        }
    }
}

/// A ring page and its event channel, as published under the domain's tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingRef {
    /// Guest frame number of the ring page.
    pub gfn: u64,
    /// Event channel port (the guest's end).
    pub port: u32,
}

/// What [`XenstoreServer::add_domain`] publishes about a guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    /// Domain id (not 0).
    pub domid: u16,
    /// Domain name.
    pub name: String,
    /// Domain UUID (`/vm/<uuid>`).
    pub uuid: [u8; 16],
    /// Memory size in KiB (`memory/static-max` and `memory/target`).
    pub mem_kib: u64,
    /// Number of vCPUs (`cpu/<n>/availability`).
    pub vcpus: u32,
    /// The xenstore ring (`store/ring-ref`, `store/port`).
    pub store: Option<RingRef>,
    /// The PV console ring (`console/ring-ref`, `console/port`).
    pub console: Option<RingRef>,
}

impl DomainConfig {
    /// A configuration with one vCPU and no rings published.
    pub fn new(domid: u16, name: &str, uuid: [u8; 16], mem_kib: u64) -> Self {
        DomainConfig {
            domid,
            name: name.to_owned(),
            uuid,
            mem_kib,
            vcpus: 1,
            store: None,
            console: None,
        }
    }
}

/// Formats a UUID the usual way (`8-4-4-4-12` lower-case hex).
pub fn format_uuid(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A watch event for the VMM's own (dom0-side) watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path that changed (in the form the watch was registered with).
    pub path: String,
    /// The watch's token.
    pub token: String,
}

/// Allows one message per second and counts the ones it suppressed, for
/// warnings a guest can trigger.
#[derive(Debug, Default)]
pub struct RateLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimiter {
    /// `Some(n)` if a message may be logged now, `n` being how many were
    /// suppressed since the last one.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// The xenstore server: the store, the guests' connections and the VMM's
/// own watches.
#[derive(Debug)]
pub struct XenstoreServer {
    store: Store,
    conns: BTreeMap<u16, Conn>,
    primary: Option<u16>,
    local_watches: Vec<Watch>,
    local_events: VecDeque<WatchEvent>,
    quotas: Quotas,
    next_tx: u32,
}

impl Default for XenstoreServer {
    fn default() -> Self {
        Self::new()
    }
}

impl XenstoreServer {
    /// A server with dom0's part of the tree (`/local/domain/0`, `/vm`,
    /// `/tool`) and no guest.
    pub fn new() -> Self {
        Self::with_quotas(Quotas::default())
    }

    /// Like [`new`](Self::new) with explicit quotas.
    pub fn with_quotas(quotas: Quotas) -> Self {
        let mut s = XenstoreServer {
            store: Store::new(),
            conns: BTreeMap::new(),
            primary: None,
            local_watches: Vec::new(),
            local_events: VecDeque::new(),
            quotas,
            next_tx: 0,
        };
        for d in ["/local/domain", "/vm", "/tool/xenstored"] {
            s.dom0(|st, q| st.mkdir(0, d, q).map(|_| ()));
        }
        s.dom0(|st, q| st.write(0, "/local/domain/0/domid", b"0", q).map(|_| ()));
        s.dom0(|st, q| {
            st.write(0, "/local/domain/0/name", b"Domain-0", q)
                .map(|_| ())
        });
        s
    }

    /// Runs a dom0 operation on the fresh store, where it cannot fail.
    fn dom0(&mut self, f: impl FnOnce(&mut Store, &Quotas) -> Result<(), XsError>) {
        let q = self.quotas;
        if let Err(e) = f(&mut self.store, &q) {
            tracing::error!(error = %e, "xenstore: building the base tree failed");
        }
    }

    /// A server holding one guest, the primary domain that
    /// [`process`](Self::process) serves.
    pub fn new_domain(cfg: &DomainConfig) -> Result<Self, XsError> {
        let mut s = Self::new();
        s.add_domain(cfg)?;
        Ok(s)
    }

    /// The quotas in force.
    pub fn quotas(&self) -> Quotas {
        self.quotas
    }

    /// Adds a guest: writes its standard tree (as libxl does) and opens its
    /// connection. The first guest added is the primary domain.
    ///
    /// `/local/domain/<id>` and `/vm/<uuid>` are owned by dom0 and readable
    /// by the guest; `control/shutdown`, `control/sysrq`,
    /// `control/feature-*`, `device`, `data`, `drivers`, `feature`, `attr`
    /// and `error` are owned by the guest.
    pub fn add_domain(&mut self, cfg: &DomainConfig) -> Result<(), XsError> {
        let id = cfg.domid;
        if id == 0 {
            return Err(XsError::Inval);
        }
        if self.conns.contains_key(&id) {
            return Err(XsError::Exist);
        }
        let dom = domain_path(id);
        let vm = format!("/vm/{}", format_uuid(&cfg.uuid));
        let ro = Perms::new(0, PermKind::None).with(id, PermKind::Read);
        let rw = Perms::new(id, PermKind::None);
        self.rm(&dom)?;
        self.rm(&vm)?;
        self.write_with_perms(&dom, b"", &ro)?;
        self.write_with_perms(&vm, b"", &ro)?;
        self.write(&format!("{vm}/uuid"), format_uuid(&cfg.uuid).as_bytes())?;
        self.write(&format!("{vm}/name"), cfg.name.as_bytes())?;
        let kib = cfg.mem_kib.to_string();
        let mut ro_nodes: Vec<(String, String)> = vec![
            ("domid".into(), id.to_string()),
            ("name".into(), cfg.name.clone()),
            ("vm".into(), vm.clone()),
            ("memory/static-max".into(), kib.clone()),
            ("memory/target".into(), kib),
            (
                "control/platform-feature-multiprocessor-suspend".into(),
                "1".into(),
            ),
            (
                "control/platform-feature-xs_reset_watches".into(),
                "1".into(),
            ),
        ];
        for cpu in 0..cfg.vcpus {
            ro_nodes.push((format!("cpu/{cpu}/availability"), "online".into()));
        }
        if let Some(r) = cfg.store {
            ro_nodes.push(("store/ring-ref".into(), r.gfn.to_string()));
            ro_nodes.push(("store/port".into(), r.port.to_string()));
        }
        if let Some(r) = cfg.console {
            ro_nodes.push(("console/ring-ref".into(), r.gfn.to_string()));
            ro_nodes.push(("console/port".into(), r.port.to_string()));
            ro_nodes.push(("console/limit".into(), "1048576".into()));
            ro_nodes.push(("console/type".into(), "xenconsoled".into()));
            ro_nodes.push(("console/output".into(), "pty".into()));
        }
        for (k, v) in &ro_nodes {
            self.write(&format!("{dom}/{k}"), v.as_bytes())?;
        }
        for k in [
            "control/shutdown",
            "control/sysrq",
            "control/feature-poweroff",
            "control/feature-reboot",
            "control/feature-suspend",
            "control/feature-s3",
            "control/feature-s4",
            "device",
            "device/suspend/event-channel",
            "data",
            "drivers",
            "feature",
            "attr",
            "error",
        ] {
            self.write_with_perms(&format!("{dom}/{k}"), b"", &rw)?;
        }
        self.conns.insert(id, Conn::new(id));
        self.primary.get_or_insert(id);
        self.fire_special("@introduceDomain");
        Ok(())
    }

    /// Removes a guest: closes its connection, deletes its tree and fires
    /// `@releaseDomain`.
    pub fn remove_domain(&mut self, domid: u16) -> Result<(), XsError> {
        if self.conns.remove(&domid).is_none() {
            return Err(XsError::NoEnt);
        }
        if self.primary == Some(domid) {
            self.primary = None;
        }
        let dom = domain_path(domid);
        if let Ok(vm) = self.read(&format!("{dom}/vm")) {
            if let Ok(vm) = String::from_utf8(vm) {
                if vm.starts_with("/vm/") {
                    self.rm(&vm)?;
                }
            }
        }
        self.rm(&dom)?;
        self.fire_special("@releaseDomain");
        Ok(())
    }

    /// Prepares a fresh ring page: indexes zero, features advertised
    /// (reconnection and the error indicator), connected. Call once before
    /// the guest starts, not on a restored page.
    pub fn init_page(page: &dyn RingPage) {
        use layout::*;
        for off in [REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD, CONNECTION, ERROR] {
            page.store_u32(off, 0);
        }
        page.store_u32(SERVER_FEATURES, FEATURE_RECONNECTION | FEATURE_ERROR);
    }

    /// Serves the primary domain's ring (see
    /// [`process_domain`](Self::process_domain)); `false` if there is none.
    pub fn process(&mut self, page: &dyn RingPage) -> bool {
        match self.primary {
            Some(id) => self.process_domain(id, page).unwrap_or(false),
            None => false,
        }
    }

    /// Serves `domid`'s ring: handles a reconnect request, sends queued
    /// output, then handles every complete request (replies and watch
    /// events go to the response ring, the rest is queued). Returns whether
    /// the guest must be notified on its event channel. Stops reading
    /// requests while output is queued (the ring is full; the guest kicks
    /// when it has read it). `ENOENT` for an unknown domain.
    pub fn process_domain(&mut self, domid: u16, page: &dyn RingPage) -> Result<bool, XsError> {
        use layout::*;
        let conn = self.conns.get_mut(&domid).ok_or(XsError::NoEnt)?;
        let features = FEATURE_RECONNECTION | FEATURE_ERROR;
        if page.load_u32(SERVER_FEATURES) != features {
            page.store_u32(SERVER_FEATURES, features);
        }
        if page.load_u32(CONNECTION) == RECONNECT {
            conn.reconnect(page);
            return Ok(true);
        }
        if conn.error.is_some() {
            return Ok(false);
        }
        conn.more = false;
        let mut notify = false;
        let mut handled = 0;
        loop {
            let Some(conn) = self.conns.get_mut(&domid) else {
                return Ok(notify);
            };
            match conn.flush(page) {
                Ok(w) => notify |= w,
                Err(e) => {
                    conn.fail(page, e);
                    return Ok(true);
                }
            }
            if conn.has_output() {
                break;
            }
            if handled == MAX_REQUESTS_PER_CALL {
                conn.more = true;
                break;
            }
            match conn.read_request(page) {
                Err(e) => {
                    conn.fail(page, e);
                    return Ok(true);
                }
                Ok((consumed, None)) => {
                    notify |= consumed;
                    break;
                }
                Ok((consumed, Some(req))) => {
                    notify |= consumed;
                    handled += 1;
                    self.request(domid, req.hdr, &req.payload);
                }
            }
        }
        Ok(notify)
    }

    /// Whether `domid`'s connection has output queued or requests left
    /// unread: the VMM should call [`process_domain`](Self::process_domain)
    /// (e.g. after a dom0-side write that fired the guest's watches).
    pub fn wants_process(&self, domid: u16) -> bool {
        self.conns
            .get(&domid)
            .is_some_and(|c| c.error.is_none() && (c.has_output() || c.more))
    }

    /// Why `domid`'s connection was closed, if it was.
    pub fn connection_error(&self, domid: u16) -> Option<ConnError> {
        self.conns.get(&domid).and_then(|c| c.error)
    }

    /// Number of watches `domid` has registered.
    pub fn watch_count(&self, domid: u16) -> usize {
        self.conns.get(&domid).map_or(0, |c| c.watches.len())
    }

    /// Whether `domid` has a watch that fires for a change of `path`
    /// (absolute): one on the path itself or on an ancestor.
    pub fn watched(&self, domid: u16, path: &str) -> bool {
        self.conns.get(&domid).is_some_and(|c| {
            c.watches.iter().any(|w| {
                path == w.abs
                    || path
                        .strip_prefix(w.abs.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            })
        })
    }

    /// Handles one request and queues its reply and the events it fires.
    fn request(&mut self, domid: u16, hdr: Header, payload: &[u8]) {
        let mut fired = Vec::new();
        let mut initial = Vec::new();
        let result = self.handle(domid, &hdr, payload, &mut fired, &mut initial);
        let msg = match result {
            Ok(reply) => encode_msg(hdr.ty, hdr.req_id, hdr.tx_id, &reply),
            Err(e) => {
                tracing::debug!(domid, ty = hdr.ty, error = %e, "xenstore: request refused");
                let mut p = e.wire_name().as_bytes().to_vec();
                p.push(0);
                encode_msg(MsgType::Error as u32, hdr.req_id, hdr.tx_id, &p)
            }
        };
        let limit = self.quotas.max_queued_bytes;
        if let Some(c) = self.conns.get_mut(&domid) {
            c.push_reply(msg);
            for (path, token) in initial {
                if let Some(m) = event_msg(&path, &token) {
                    c.push_event(m, limit);
                }
            }
        }
        for ev in &fired {
            self.fire(ev);
        }
    }

    fn handle(
        &mut self,
        domid: u16,
        hdr: &Header,
        payload: &[u8],
        fired: &mut Vec<Event>,
        initial: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<u8>, XsError> {
        use MsgType::*;
        let ty = MsgType::from_u32(hdr.ty).ok_or(XsError::Inval)?;
        let q = self.quotas;
        match ty {
            Read | Write | Mkdir | Rm | Directory | DirectoryPart | GetPerms | SetPerms => {
                let (store, events) = if hdr.tx_id == 0 {
                    (&mut self.store, fired)
                } else {
                    let tx = self
                        .conns
                        .get_mut(&domid)
                        .and_then(|c| c.txs.get_mut(&hdr.tx_id))
                        .ok_or(XsError::NoEnt)?;
                    (&mut tx.store, &mut tx.events)
                };
                node_op(store, events, domid, ty, payload, &q)
            }
            Watch => {
                let args = split_args(payload);
                let (spec, token) = watch_args(&args)?;
                let w = make_watch(domid, spec, token)?;
                let devices = self.device_announcements(domid, &w.abs, &w.spec, &w.token);
                let conn = self.conns.get_mut(&domid).ok_or(XsError::Inval)?;
                if conn
                    .watches
                    .iter()
                    .any(|x| x.abs == w.abs && x.token == w.token)
                {
                    return Err(XsError::Exist);
                }
                if conn.watches.len() >= q.max_watches {
                    return Err(XsError::TooBig);
                }
                initial.push((w.spec.clone(), w.token.clone()));
                initial.extend(devices);
                conn.watches.push(w);
                Ok(OK.to_vec())
            }
            Unwatch => {
                let args = split_args(payload);
                let (spec, token) = watch_args(&args)?;
                let w = make_watch(domid, spec, token)?;
                let conn = self.conns.get_mut(&domid).ok_or(XsError::Inval)?;
                let i = conn
                    .watches
                    .iter()
                    .position(|x| x.abs == w.abs && x.token == w.token)
                    .ok_or(XsError::NoEnt)?;
                conn.watches.remove(i);
                Ok(OK.to_vec())
            }
            TransactionStart => {
                if hdr.tx_id != 0 {
                    return Err(XsError::Busy);
                }
                let conn = self.conns.get_mut(&domid).ok_or(XsError::Inval)?;
                if conn.txs.len() >= q.max_transactions {
                    return Err(XsError::NoSpc);
                }
                let id = loop {
                    self.next_tx = self.next_tx.wrapping_add(1);
                    if self.next_tx != 0 && !conn.txs.contains_key(&self.next_tx) {
                        break self.next_tx;
                    }
                };
                conn.txs.insert(
                    id,
                    Tx {
                        store: self.store.snapshot(),
                        events: Vec::new(),
                        stale: false,
                    },
                );
                Ok(format!("{id}\0").into_bytes())
            }
            TransactionEnd => {
                let commit = match one_arg(payload)? {
                    "T" => true,
                    "F" => false,
                    _ => return Err(XsError::Inval),
                };
                let conn = self.conns.get_mut(&domid).ok_or(XsError::Inval)?;
                let tx = conn.txs.remove(&hdr.tx_id).ok_or(XsError::NoEnt)?;
                if commit && tx.stale {
                    return Err(XsError::Again);
                }
                if commit {
                    self.store.commit(tx.store, domid, &q)?;
                    fired.extend(tx.events);
                }
                Ok(OK.to_vec())
            }
            GetDomainPath => {
                let id: u16 = parse_decimal(one_arg(payload)?)?;
                Ok(format!("{}\0", domain_path(id)).into_bytes())
            }
            ResetWatches => {
                let conn = self.conns.get_mut(&domid).ok_or(XsError::Inval)?;
                conn.watches.clear();
                conn.txs.clear();
                Ok(OK.to_vec())
            }
            WatchEvent | Error => Err(XsError::Inval),
            Debug | Introduce | Release | IsDomainIntroduced | Resume | SetTarget | Restrict => {
                Err(XsError::Acces)
            }
        }
    }

    /// The extra events a new watch on the guest's own `device` directory
    /// gets: one per device there (`device/<type>/<id>`, spelled as the
    /// watch was), as if each had just been added. xl's hotplug writes fire
    /// these; a guest restored with a device it did not have when it was
    /// saved (`restore --disk/--net`) re-registers this watch on resume and
    /// finds the device through them (Linux's xenbus probes a
    /// `device/<type>/<id>` event it has no device for and ignores the
    /// others, and the `device` event itself names no device). Spurious
    /// events are allowed: a watcher re-reads what it watches.
    fn device_announcements(
        &self,
        domid: u16,
        abs: &str,
        spec: &str,
        token: &[u8],
    ) -> Vec<(String, Vec<u8>)> {
        if abs != format!("{}/device", domain_path(domid)) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for ty in self.directory(abs).unwrap_or_default() {
            for id in self.directory(&format!("{abs}/{ty}")).unwrap_or_default() {
                out.push((format!("{spec}/{ty}/{id}"), token.to_vec()));
            }
        }
        out
    }

    /// Delivers an event to every matching watch that may see it.
    fn fire(&mut self, ev: &Event) {
        let special = ev.path.starts_with('@');
        let limit = self.quotas.max_queued_bytes;
        for conn in self.conns.values_mut() {
            if conn.error.is_some() || (!special && !ev.perms.access(conn.domid).can_read()) {
                continue;
            }
            let hits: Vec<Vec<u8>> = conn
                .watches
                .iter()
                .filter_map(|w| w.matches(ev).and_then(|p| event_msg(&p, &w.token)))
                .collect();
            for m in hits {
                conn.push_event(m, limit);
            }
        }
        for w in &self.local_watches {
            if let Some(path) = w.matches(ev) {
                if self.local_events.len() >= MAX_LOCAL_EVENTS {
                    tracing::warn!(path, "xenstore: dom0 watch events not taken; event dropped");
                    continue;
                }
                self.local_events.push_back(WatchEvent {
                    path,
                    token: String::from_utf8_lossy(&w.token).into_owned(),
                });
            }
        }
    }

    /// Fires a special event (`@introduceDomain`, `@releaseDomain`).
    pub fn fire_special(&mut self, name: &str) {
        if check_special(name).is_err() {
            return;
        }
        self.fire(&Event {
            path: name.into(),
            removed: false,
            perms: Perms::new(0, PermKind::None),
        });
    }

    // ---- dom0-side API (privileged; relative paths resolve under
    // /local/domain/0). Changes fire watches: afterwards call `process` for
    // any guest whose `wants_process` is true.

    /// Reads a node's value.
    pub fn read(&self, path: &str) -> Result<Vec<u8>, XsError> {
        let p = resolve(0, path)?;
        self.store
            .get(&p)
            .map(|n| n.value.clone())
            .ok_or(XsError::NoEnt)
    }

    /// Reads a node's value as UTF-8 (`EINVAL` if it is not).
    pub fn read_string(&self, path: &str) -> Result<String, XsError> {
        String::from_utf8(self.read(path)?).map_err(|_| XsError::Inval)
    }

    /// Whether a node exists.
    pub fn exists(&self, path: &str) -> bool {
        resolve(0, path).is_ok_and(|p| self.store.get(&p).is_some())
    }

    /// The leaf names of a node's children.
    pub fn directory(&self, path: &str) -> Result<Vec<String>, XsError> {
        let p = resolve(0, path)?;
        let n = self.store.get(&p).ok_or(XsError::NoEnt)?;
        Ok(n.children.iter().map(|c| c.to_string()).collect())
    }

    /// A node's permissions.
    pub fn get_perms(&self, path: &str) -> Result<Perms, XsError> {
        let p = resolve(0, path)?;
        Ok(self.store.get(&p).ok_or(XsError::NoEnt)?.perms.clone())
    }

    /// Writes a value (at most [`PAYLOAD_MAX`] bytes, else `E2BIG`),
    /// creating missing parents, which inherit their parent's permissions.
    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<(), XsError> {
        if value.len() > PAYLOAD_MAX {
            return Err(XsError::TooBig);
        }
        let p = resolve(0, path)?;
        let q = self.quotas;
        let ev = self.store.write(0, &p, value, &q)?;
        self.fire(&ev);
        Ok(())
    }

    /// Writes a value and then sets the node's permissions.
    pub fn write_with_perms(
        &mut self,
        path: &str,
        value: &[u8],
        perms: &Perms,
    ) -> Result<(), XsError> {
        self.write(path, value)?;
        self.set_perms(path, perms)
    }

    /// Creates a node (and parents) with an empty value if it is missing.
    pub fn mkdir(&mut self, path: &str) -> Result<(), XsError> {
        let p = resolve(0, path)?;
        let q = self.quotas;
        if let Some(ev) = self.store.mkdir(0, &p, &q)? {
            self.fire(&ev);
        }
        Ok(())
    }

    /// Removes a node and its subtree (a missing node is not an error).
    pub fn rm(&mut self, path: &str) -> Result<(), XsError> {
        let p = resolve(0, path)?;
        match self.store.rm(0, &p) {
            Ok(Some(ev)) => {
                self.fire(&ev);
                Ok(())
            }
            Ok(None) | Err(XsError::NoEnt) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sets a node's permissions.
    pub fn set_perms(&mut self, path: &str, perms: &Perms) -> Result<(), XsError> {
        let p = resolve(0, path)?;
        let q = self.quotas;
        let ev = self.store.set_perms(0, &p, perms.clone(), &q)?;
        self.fire(&ev);
        Ok(())
    }

    /// Adds a dom0-side watch on `path` (or an `@` special name). It fires
    /// once at once, like a guest's; events are collected by
    /// [`take_events`](Self::take_events).
    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        let w = make_watch(0, path, token.as_bytes())?;
        if self
            .local_watches
            .iter()
            .any(|x| x.abs == w.abs && x.token == w.token)
        {
            return Err(XsError::Exist);
        }
        self.local_events.push_back(WatchEvent {
            path: w.spec.clone(),
            token: token.to_owned(),
        });
        self.local_watches.push(w);
        Ok(())
    }

    /// Removes a dom0-side watch (`ENOENT` if there is none).
    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        let w = make_watch(0, path, token.as_bytes())?;
        let i = self
            .local_watches
            .iter()
            .position(|x| x.abs == w.abs && x.token == w.token)
            .ok_or(XsError::NoEnt)?;
        self.local_watches.remove(i);
        Ok(())
    }

    /// Takes the dom0-side watch events that fired since the last call.
    pub fn take_events(&mut self) -> Vec<WatchEvent> {
        self.local_events.drain(..).collect()
    }

    /// Number of nodes in the store.
    pub fn node_count(&self) -> usize {
        self.store.len()
    }

    /// Checks the store's internal consistency (tests, debugging).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.store.check_invariants()
    }
}

/// The reply to a node operation, run on the live store or a transaction's.
fn node_op(
    store: &mut Store,
    events: &mut Vec<Event>,
    caller: u16,
    ty: MsgType,
    payload: &[u8],
    q: &Quotas,
) -> Result<Vec<u8>, XsError> {
    match ty {
        MsgType::Read => {
            let p = resolve(caller, one_arg(payload)?)?;
            Ok(store.readable(caller, &p)?.value.clone())
        }
        MsgType::Write => {
            let (p, v) = path_and_value(payload)?;
            let p = resolve(caller, p)?;
            events.push(store.write(caller, &p, v, q)?);
            Ok(OK.to_vec())
        }
        MsgType::Mkdir => {
            let p = resolve(caller, one_arg(payload)?)?;
            events.extend(store.mkdir(caller, &p, q)?);
            Ok(OK.to_vec())
        }
        MsgType::Rm => {
            let p = resolve(caller, one_arg(payload)?)?;
            events.extend(store.rm(caller, &p)?);
            Ok(OK.to_vec())
        }
        MsgType::Directory => {
            let p = resolve(caller, one_arg(payload)?)?;
            let list = child_list(&store.readable(caller, &p)?.children);
            if list.len() > PAYLOAD_MAX {
                return Err(XsError::TooBig);
            }
            Ok(list)
        }
        MsgType::DirectoryPart => {
            let args = split_args(payload);
            let [path, off, ..] = args.as_slice() else {
                return Err(XsError::Inval);
            };
            let p = std::str::from_utf8(path).map_err(|_| XsError::Inval)?;
            let p = resolve(caller, p)?;
            let off = std::str::from_utf8(off).map_err(|_| XsError::Inval)?;
            let off: usize = parse_decimal(off)?;
            let node = store.readable(caller, &p)?;
            directory_part(&child_list(&node.children), node.gen, off)
        }
        MsgType::GetPerms => {
            let p = resolve(caller, one_arg(payload)?)?;
            Ok(store.readable(caller, &p)?.perms.to_wire())
        }
        MsgType::SetPerms => {
            let args = split_args(payload);
            let (path, rest) = args.split_first().ok_or(XsError::Inval)?;
            let p = std::str::from_utf8(path).map_err(|_| XsError::Inval)?;
            let p = resolve(caller, p)?;
            let perms = Perms::parse(rest.iter().copied())?;
            events.push(store.set_perms(caller, &p, perms, q)?);
            Ok(OK.to_vec())
        }
        _ => Err(XsError::Inval),
    }
}

/// Children as `<name>|*`.
fn child_list(children: &[std::sync::Arc<str>]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in children {
        out.extend_from_slice(c.as_bytes());
        out.push(0);
    }
    out
}

/// `DIRECTORY_PART` reply: `<gen>|` then whole names from byte `off` of the
/// list while they fit, and an empty string once the list is complete.
fn directory_part(list: &[u8], gen: u64, off: usize) -> Result<Vec<u8>, XsError> {
    if off > list.len() {
        return Err(XsError::Inval);
    }
    let mut out = format!("{gen}\0").into_bytes();
    let mut pos = off;
    while pos < list.len() {
        let end = list[pos..]
            .iter()
            .position(|&b| b == 0)
            .map_or(list.len(), |i| pos + i + 1);
        if out.len() + (end - pos) > PAYLOAD_MAX - 1 {
            break;
        }
        out.extend_from_slice(&list[pos..end]);
        pos = end;
    }
    if pos == list.len() {
        out.push(0);
    }
    Ok(out)
}

/// `<wpath>|<token>|?` of `WATCH`/`UNWATCH`.
fn watch_args<'a>(args: &[&'a [u8]]) -> Result<(&'a str, &'a [u8]), XsError> {
    let [path, token, ..] = args else {
        return Err(XsError::Inval);
    };
    let path = std::str::from_utf8(path).map_err(|_| XsError::Inval)?;
    Ok((path, token))
}

/// A watch as `domid` registers it. The token must leave room for any event
/// path in a message.
fn make_watch(domid: u16, spec: &str, token: &[u8]) -> Result<Watch, XsError> {
    if token.len() + ABS_PATH_MAX + 2 > PAYLOAD_MAX || token.contains(&0) {
        return Err(XsError::Inval);
    }
    let (abs, rel_base) = if spec.starts_with('@') {
        check_special(spec)?;
        (spec.to_owned(), None)
    } else {
        let abs = resolve(domid, spec)?;
        let rel = (!spec.starts_with('/')).then(|| format!("{}/", domain_path(domid)));
        (abs, rel)
    };
    Ok(Watch {
        spec: spec.to_owned(),
        abs,
        token: token.to_vec(),
        rel_base,
    })
}

/// A `WATCH_EVENT` message (`<epath>|<token>|`, ids 0), if it fits.
fn event_msg(path: &str, token: &[u8]) -> Option<Vec<u8>> {
    let mut p = Vec::with_capacity(path.len() + token.len() + 2);
    p.extend_from_slice(path.as_bytes());
    p.push(0);
    p.extend_from_slice(token);
    p.push(0);
    (p.len() <= PAYLOAD_MAX).then(|| encode_msg(MsgType::WatchEvent as u32, 0, 0, &p))
}
