//! Xenbus for vbd devices: the toolstack's nodes (as libxl's
//! `device_disk_add` writes them, with its permissions), blkback's probe
//! keys, and the backend side of blkif.h's state diagram.
//!
//! Backend `/local/domain/0/backend/vbd/<domid>/<devid>` (owner dom0, the
//! guest may read); frontend `/local/domain/<domid>/device/vbd/<devid>`
//! (owner the guest, dom0 may read). At creation the backend publishes
//! `feature-max-indirect-segments`, `multi-queue-max-queues`,
//! `max-ring-page-order`, `max-ring-pages` and goes to InitWait (2). On
//! frontend Initialised (3) or Connected (4) it maps the rings, binds the
//! event channels, writes `sectors`, `info`, `sector-size`,
//! `physical-sector-size` and the `feature-*` keys, then Connected (4).
//! Frontend Closing (5) -> backend Closing; frontend Closed (6) or gone ->
//! disconnect and Closed; frontend Initialising (1) with the backend
//! Closed -> InitWait again (a reloaded driver or a kexec'd kernel gets a
//! working device). A frontend whose rings cannot be used is refused: the
//! backend logs why, writes `error` and goes to Closing.

use std::sync::Arc;

use gpc::MemoryMap;
use hypercalls::Domain;

use super::config::BlkConfig;
use super::disk::Disk;
use super::queue::{Queue, QueueParams, RingSetup, MAX_RING_ORDER};
use super::{BlkError, BlkHost, QueueThread};
use crate::backends::blkif::request::MAX_INDIRECT_SEGMENTS;
use crate::backends::blkif::Abi;
use crate::backends::xenstore::{PermKind, Perms, XenstoreServer, XsError};

/// `enum xenbus_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    InitWait = 2,
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    /// From a `state` node's value (missing or garbage: Unknown).
    pub fn parse(v: Option<&str>) -> XenbusState {
        use XenbusState::*;
        match v.and_then(|s| s.trim().parse::<u32>().ok()) {
            Some(1) => Initialising,
            Some(2) => InitWait,
            Some(3) => Initialised,
            Some(4) => Connected,
            Some(5) => Closing,
            Some(6) => Closed,
            Some(7) => Reconfiguring,
            Some(8) => Reconfigured,
            _ => Unknown,
        }
    }
    /// The node value.
    pub fn value(self) -> String {
        (self as u32).to_string()
    }
}

/// What the backend does when the frontend's state changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing.
    Stay,
    /// Map the rings, publish the disk, go Connected.
    Connect,
    /// Switch to this state.
    Switch(XenbusState),
    /// Stop serving, give the rings back, then switch to Closed.
    Disconnect,
}

/// The backend's transition for frontend state `fe` while in `be`
/// (after Linux blkback's `frontend_changed`).
pub fn backend_step(be: XenbusState, fe: XenbusState) -> Step {
    use XenbusState::*;
    match fe {
        Initialising if be == Closed => Step::Switch(InitWait),
        Initialised | Connected if matches!(be, InitWait | Initialising | Initialised) => {
            Step::Connect
        }
        Closing if !matches!(be, Closing | Closed) => Step::Switch(Closing),
        Closed | Unknown if be != Closed => Step::Disconnect,
        _ => Step::Stay,
    }
}

/// Queues offered (`multi-queue-max-queues`): one per host CPU, at most 4
/// (Linux blkfront's own default limit).
pub fn max_queues() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u32)
}

/// Which host I/O goes through io_uring: reads by default;
/// `XENKVM_BLK_URING=1` (or `all`) adds writes, `0` (or `off`) turns it
/// off. Buffered writes measured no cheaper through io_uring (they mostly
/// go to its worker threads) than `pwritev` on the queue's thread.
pub fn uring_wanted() -> super::queue::UringUse {
    use super::queue::UringUse;
    match std::env::var("XENKVM_BLK_URING").as_deref().map(str::trim) {
        Ok("1" | "all") => UringUse::All,
        Ok("0" | "off") => UringUse::Off,
        _ => UringUse::Reads,
    }
}

/// One vbd and its connection.
pub struct VbdDevice {
    pub cfg: BlkConfig,
    domid: u16,
    disk: Arc<Disk>,
    be: String,
    fe: String,
    state: XenbusState,
    workers: Vec<QueueThread>,
    max_queues: u32,
}

impl std::fmt::Debug for VbdDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VbdDevice")
            .field("vdev", &self.cfg.vdev)
            .field("state", &self.state)
            .field("queues", &self.workers.len())
            .finish()
    }
}

impl VbdDevice {
    /// A device for guest `domid` over the opened `disk`.
    pub fn new(cfg: BlkConfig, domid: u16, disk: Arc<Disk>) -> VbdDevice {
        VbdDevice {
            be: format!("/local/domain/0/backend/vbd/{domid}/{}", cfg.devid),
            fe: format!("/local/domain/{domid}/device/vbd/{}", cfg.devid),
            cfg,
            domid,
            disk,
            state: XenbusState::Initialising,
            workers: Vec::new(),
            max_queues: max_queues(),
        }
    }

    /// The backend directory.
    pub fn backend_path(&self) -> &str {
        &self.be
    }
    /// The frontend directory.
    pub fn frontend_path(&self) -> &str {
        &self.fe
    }
    /// The backend's state.
    pub fn state(&self) -> XenbusState {
        self.state
    }
    /// Queues being served.
    pub fn queues(&self) -> usize {
        self.workers.len()
    }
    /// The watch token of this device.
    pub fn token(&self) -> String {
        format!("vbd:{}", self.cfg.devid)
    }

    /// Writes the toolstack's nodes and the probe keys, goes to InitWait,
    /// and watches the frontend's state.
    pub fn publish(&mut self, xs: &mut XenstoreServer) -> Result<(), XsError> {
        let d = self.domid;
        let be_perms = Perms::new(0, PermKind::None).with(d, PermKind::Read);
        let fe_perms = Perms::new(d, PermKind::None).with(0, PermKind::Read);
        let c = &self.cfg;
        let mode = if c.readonly { "r" } else { "w" };
        let be_nodes: Vec<(&str, String)> = vec![
            ("", String::new()),
            ("frontend", self.fe.clone()),
            ("frontend-id", d.to_string()),
            ("params", c.path.display().to_string()),
            ("online", "1".into()),
            ("removable", "0".into()),
            ("bootable", "1".into()),
            ("state", XenbusState::Initialising.value()),
            ("dev", c.vdev.clone()),
            ("type", "phy".into()),
            ("mode", mode.into()),
            ("device-type", "disk".into()),
            ("discard-enable", u8::from(c.discard).to_string()),
            ("specification", "xen".into()),
            ("hotplug-status", "connected".into()),
        ];
        for (k, v) in be_nodes {
            let p = if k.is_empty() {
                self.be.clone()
            } else {
                format!("{}/{k}", self.be)
            };
            xs.write_with_perms(&p, v.as_bytes(), &be_perms)?;
        }
        let fe_nodes: Vec<(&str, String)> = vec![
            ("", String::new()),
            ("backend", self.be.clone()),
            ("backend-id", "0".into()),
            ("state", XenbusState::Initialising.value()),
            ("virtual-device", c.devid.to_string()),
            ("device-type", "disk".into()),
            ("trusted", "1".into()),
        ];
        for (k, v) in fe_nodes {
            let p = if k.is_empty() {
                self.fe.clone()
            } else {
                format!("{}/{k}", self.fe)
            };
            xs.write_with_perms(&p, v.as_bytes(), &fe_perms)?;
        }
        // blkback's probe: what the frontend reads before it sets up rings.
        for (k, v) in [
            (
                "feature-max-indirect-segments",
                MAX_INDIRECT_SEGMENTS.to_string(),
            ),
            ("multi-queue-max-queues", self.max_queues.to_string()),
            ("max-ring-page-order", MAX_RING_ORDER.to_string()),
            ("max-ring-pages", (1u32 << MAX_RING_ORDER).to_string()),
        ] {
            xs.write_with_perms(&format!("{}/{k}", self.be), v.as_bytes(), &be_perms)?;
        }
        self.switch(xs, XenbusState::InitWait);
        xs.watch(&format!("{}/state", self.fe), &self.token())?;
        Ok(())
    }

    fn switch(&mut self, xs: &mut XenstoreServer, s: XenbusState) {
        self.state = s;
        if let Err(e) = xs.write(&format!("{}/state", self.be), s.value().as_bytes()) {
            tracing::warn!(vdev = %self.cfg.vdev, %e, "cannot write the backend state");
        }
        tracing::info!(vdev = %self.cfg.vdev, state = ?s, "vbd backend state");
    }

    /// The frontend's state node changed (or the watch fired at set-up).
    pub fn frontend_changed(
        &mut self,
        xs: &mut XenstoreServer,
        host: &BlkHost,
        domain: &Arc<Domain>,
        map: &MemoryMap,
    ) {
        let fe = XenbusState::parse(
            xs.read_string(&format!("{}/state", self.fe))
                .ok()
                .as_deref(),
        );
        match backend_step(self.state, fe) {
            Step::Stay => {}
            Step::Switch(s) => self.switch(xs, s),
            Step::Disconnect => {
                self.disconnect(host);
                self.switch(xs, XenbusState::Closed);
            }
            Step::Connect => {
                self.disconnect(host);
                match self.connect(xs, host, domain, map) {
                    Ok(()) => self.switch(xs, XenbusState::Connected),
                    Err(e) => {
                        self.disconnect(host);
                        tracing::warn!(vdev = %self.cfg.vdev, %e, "vbd frontend refused");
                        let _ = xs.write(&format!("{}/error", self.be), e.to_string().as_bytes());
                        self.switch(xs, XenbusState::Closing);
                    }
                }
            }
        }
    }

    /// Stops the queues and gives their rings back.
    pub fn disconnect(&mut self, host: &BlkHost) {
        for w in self.workers.drain(..) {
            (host.route)(w.dom0_port, None);
            w.stop();
        }
    }

    fn read_fe(&self, xs: &XenstoreServer, key: &str) -> Option<String> {
        xs.read_string(&format!("{}/{key}", self.fe)).ok()
    }

    /// The ring keys under `dir` (the frontend dir or `queue-N`).
    fn ring_setup(&self, xs: &XenstoreServer, dir: &str, abi: Abi) -> Result<RingSetup, BlkError> {
        let bad = |what: String| BlkError::Frontend(format!("{}: {what}", self.cfg.vdev));
        let num = |k: &str| -> Result<Option<u32>, BlkError> {
            match self.read_fe(xs, &format!("{dir}{k}")) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<u32>()
                    .map(Some)
                    .map_err(|_| bad(format!("{dir}{k} = {v:?} is not a number"))),
            }
        };
        // The page order is the device's, also with several queues.
        let top = |k: &str| -> Result<Option<u32>, BlkError> {
            match self.read_fe(xs, k) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<u32>()
                    .map(Some)
                    .map_err(|_| bad(format!("{k} = {v:?} is not a number"))),
            }
        };
        let order = top("ring-page-order")?;
        let pages = match (order, top("num-ring-pages")?) {
            (Some(o), _) if o <= MAX_RING_ORDER => Some(1u32 << o),
            (Some(o), _) => return Err(bad(format!("ring-page-order {o} over {MAX_RING_ORDER}"))),
            (None, Some(n)) if (1..=1 << MAX_RING_ORDER).contains(&n) && n.is_power_of_two() => {
                Some(n)
            }
            (None, Some(n)) => return Err(bad(format!("num-ring-pages {n} unusable"))),
            (None, None) => None,
        };
        let refs = match pages {
            Some(n) => (0..n)
                .map(|i| {
                    num(&format!("ring-ref{i}"))?
                        .ok_or_else(|| bad(format!("{dir}ring-ref{i} missing")))
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => vec![num("ring-ref")?.ok_or_else(|| bad(format!("{dir}ring-ref missing")))?],
        };
        let port =
            num("event-channel")?.ok_or_else(|| bad(format!("{dir}event-channel missing")))?;
        Ok(RingSetup { refs, port, abi })
    }

    fn connect(
        &mut self,
        xs: &mut XenstoreServer,
        host: &BlkHost,
        domain: &Arc<Domain>,
        map: &MemoryMap,
    ) -> Result<(), BlkError> {
        let vdev = self.cfg.vdev.clone();
        let protocol = self.read_fe(xs, "protocol");
        let abi = Abi::from_protocol(protocol.as_deref()).ok_or_else(|| {
            BlkError::Frontend(format!(
                "{vdev}: protocol {protocol:?} is not x86_64-abi or x86_32-abi"
            ))
        })?;
        let nq = match self.read_fe(xs, "multi-queue-num-queues") {
            None => 1,
            Some(v) => match v.trim().parse::<u32>() {
                Ok(n) if n >= 1 && n <= self.max_queues => n,
                _ => {
                    return Err(BlkError::Frontend(format!(
                        "{vdev}: multi-queue-num-queues {v:?} (1..={} offered)",
                        self.max_queues
                    )))
                }
            },
        };
        let setups = if nq == 1
            && self.read_fe(xs, "queue-0/ring-ref").is_none()
            && self.read_fe(xs, "queue-0/ring-ref0").is_none()
        {
            vec![self.ring_setup(xs, "", abi)?]
        } else {
            (0..nq)
                .map(|i| self.ring_setup(xs, &format!("queue-{i}/"), abi))
                .collect::<Result<Vec<_>, _>>()?
        };
        // Persistent grants when offered and the frontend says it reuses
        // its grants (blkif.h: both sides write `feature-persistent`).
        let fe_persistent = self
            .read_fe(xs, "feature-persistent")
            .is_some_and(|v| v.trim() == "1");
        let params = QueueParams {
            max_indirect: MAX_INDIRECT_SEGMENTS,
            discard: self.cfg.discard && !self.cfg.readonly,
            uring: uring_wanted(),
            persistent: if self.cfg.persistent && fe_persistent {
                super::persistent::MAX_PERSISTENT_GRANTS
            } else {
                0
            },
        };
        for (i, s) in setups.iter().enumerate() {
            let name = format!("blk{}.{}-q{i}", self.domid, self.cfg.devid);
            let q = Queue::connect(
                name.clone(),
                domain.clone(),
                self.domid,
                map.clone(),
                self.disk.clone(),
                params,
                s,
            )?;
            let w = QueueThread::start(host, name, q)?;
            (host.route)(w.dom0_port, Some(w.kick.clone()));
            self.workers.push(w);
        }
        let discard = params.discard;
        let info = if self.cfg.readonly { 4 } else { 0 };
        let mut keys: Vec<(&str, String)> = vec![
            ("sectors", self.disk.sectors().to_string()),
            ("info", info.to_string()),
            ("sector-size", "512".into()),
            ("physical-sector-size", "512".into()),
            ("feature-flush-cache", "1".into()),
            ("feature-barrier", "1".into()),
            ("feature-discard", u8::from(discard).to_string()),
            (
                "feature-persistent",
                u8::from(self.cfg.persistent).to_string(),
            ),
        ];
        if discard {
            keys.push(("discard-granularity", "4096".into()));
            keys.push(("discard-alignment", "0".into()));
            keys.push(("discard-secure", "0".into()));
        }
        for (k, v) in keys {
            xs.write(&format!("{}/{k}", self.be), v.as_bytes())
                .map_err(|e| BlkError::Xenstore(format!("{vdev}: {k}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::XenbusState::*;
    use super::*;

    #[test]
    fn backend_step_follows_blkif_state_diagram() {
        assert_eq!(backend_step(InitWait, Initialising), Step::Stay);
        assert_eq!(backend_step(InitWait, Initialised), Step::Connect);
        assert_eq!(
            backend_step(InitWait, Connected),
            Step::Connect,
            "frontend skipped 3"
        );
        assert_eq!(backend_step(Connected, Connected), Step::Stay);
        assert_eq!(backend_step(Connected, Initialised), Step::Stay);
        assert_eq!(backend_step(Connected, Closing), Step::Switch(Closing));
        assert_eq!(backend_step(Closing, Closing), Step::Stay);
        assert_eq!(backend_step(Closing, Closed), Step::Disconnect);
        assert_eq!(backend_step(Connected, Closed), Step::Disconnect);
        assert_eq!(
            backend_step(Connected, Unknown),
            Step::Disconnect,
            "frontend vanished"
        );
        assert_eq!(backend_step(Closed, Closed), Step::Stay);
        assert_eq!(
            backend_step(Closed, Initialising),
            Step::Switch(InitWait),
            "reconnect"
        );
        assert_eq!(
            backend_step(Closed, Connected),
            Step::Stay,
            "stale state after close"
        );
    }

    #[test]
    fn xenbus_state_parse_garbage_is_unknown() {
        assert_eq!(XenbusState::parse(Some("4")), Connected);
        assert_eq!(XenbusState::parse(Some(" 6\n")), Closed);
        assert_eq!(XenbusState::parse(Some("9")), Unknown);
        assert_eq!(XenbusState::parse(Some("x")), Unknown);
        assert_eq!(XenbusState::parse(None), Unknown);
    }
}
