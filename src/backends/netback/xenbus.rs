//! Xenbus for vif devices: the toolstack's nodes (as libxl writes them for
//! a vif, with its permissions), netback's feature keys, and the backend
//! side of netif's handshake.
//!
//! Backend `/local/domain/0/backend/vif/<domid>/<devid>` (owner dom0, the
//! guest may read); frontend `/local/domain/<domid>/device/vif/<devid>`
//! (owner the guest, dom0 may read). At creation the backend writes `mac`,
//! `handle`, `type`, `bridge`, `hotplug-status = connected` (xenkvm plays
//! the hotplug script: the TAP exists and is up), the `feature-*` keys and
//! `multi-queue-max-queues`, and goes to InitWait (2). Linux netfront then
//! writes its ring references and event channel(s) and goes from
//! Initialising (1) straight to Connected (4); the backend maps the rings,
//! starts the queue's I/O thread and goes Connected. Closing and reconnect
//! follow blkback's diagram ([`backend_step`]). A frontend whose keys or
//! rings cannot be used is refused: the backend logs why, writes `error`
//! and goes to Closing.

use std::sync::Arc;

use gpc::MemoryMap;
use hypercalls::Domain;

use super::queue::{NetQueue, NetRingSetup, RxFeatures};
use super::{NetConfig, NetError, NetHost, NetWorker};
use crate::backends::blkback::xenbus::{backend_step, Step, XenbusState};
use crate::backends::xenstore::{PermKind, Perms, XenstoreServer, XsError};
use crate::host::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};

/// Queues offered (`multi-queue-max-queues`): one per host CPU, at most 4
/// (each a TAP queue and an I/O thread).
pub fn max_queues() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u32)
}
/// The host side's MAC, as xl's vif scripts set it.
pub const HOST_MAC: [u8; 6] = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff];

/// One vif and its connection.
pub struct VifDevice {
    pub cfg: NetConfig,
    domid: u16,
    /// One TAP queue per offered queue (the first is the device's).
    taps: Vec<Arc<Tap>>,
    be: String,
    fe: String,
    state: XenbusState,
    workers: Vec<NetWorker>,
}

impl std::fmt::Debug for VifDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VifDevice")
            .field("devid", &self.cfg.devid)
            .field("tap", &self.taps[0].name())
            .field("state", &self.state)
            .field("queues", &self.workers.len())
            .finish()
    }
}

/// Creates and sets up the host side: the TAP with `queues` queues, its
/// MAC, MTU, bridge, up.
pub fn open_tap(cfg: &NetConfig, queues: u32) -> Result<Vec<Tap>, NetError> {
    let name = cfg.vifname.clone();
    let err = |source: std::io::Error| NetError::Tap {
        name: name.clone(),
        source,
    };
    let taps = Tap::open_queues(&cfg.vifname, queues as usize).map_err(err)?;
    let tap = &taps[0];
    tap.set_mac(HOST_MAC).map_err(err)?;
    if let Some(m) = cfg.mtu {
        tap.set_mtu(u32::from(m)).map_err(err)?;
    }
    if let Some(b) = &cfg.bridge {
        tap.attach_bridge(b).map_err(|e| NetError::Tap {
            name: name.clone(),
            source: std::io::Error::new(e.kind(), format!("cannot join bridge {b}: {e}")),
        })?;
    }
    tap.up().map_err(err)?;
    Ok(taps)
}

impl VifDevice {
    /// A device for guest `domid`: creates its TAP.
    pub fn new(cfg: NetConfig, domid: u16) -> Result<VifDevice, NetError> {
        let taps: Vec<Arc<Tap>> = open_tap(&cfg, max_queues())?
            .into_iter()
            .map(Arc::new)
            .collect();
        tracing::info!(devid = cfg.devid, tap = taps[0].name(), queues = taps.len(), mac = %cfg.mac_string(), bridge = ?cfg.bridge, "vif TAP ready");
        Ok(Self::with_taps(cfg, domid, taps))
    }

    /// A device over TAP queues already set up (at least one).
    pub fn with_taps(cfg: NetConfig, domid: u16, taps: Vec<Arc<Tap>>) -> VifDevice {
        VifDevice {
            be: format!("/local/domain/0/backend/vif/{domid}/{}", cfg.devid),
            fe: format!("/local/domain/{domid}/device/vif/{}", cfg.devid),
            cfg,
            domid,
            taps,
            state: XenbusState::Initialising,
            workers: Vec::new(),
        }
    }

    pub fn backend_path(&self) -> &str {
        &self.be
    }
    pub fn frontend_path(&self) -> &str {
        &self.fe
    }
    pub fn state(&self) -> XenbusState {
        self.state
    }
    /// Queues being served.
    pub fn queues(&self) -> usize {
        self.workers.len()
    }
    /// The TAP (its first queue).
    pub fn tap(&self) -> &Arc<Tap> {
        &self.taps[0]
    }
    /// The watch token of this device.
    pub fn token(&self) -> String {
        format!("vif:{}", self.cfg.devid)
    }

    /// Writes the toolstack's nodes and the feature keys, goes to
    /// InitWait, and watches the frontend's state.
    pub fn publish(&mut self, xs: &mut XenstoreServer) -> Result<(), XsError> {
        let d = self.domid;
        let be_perms = Perms::new(0, PermKind::None).with(d, PermKind::Read);
        let fe_perms = Perms::new(d, PermKind::None).with(0, PermKind::Read);
        let mac = self.cfg.mac_string();
        let handle = self.cfg.devid.to_string();
        let mut be_nodes: Vec<(&str, String)> = vec![
            ("", String::new()),
            ("frontend", self.fe.clone()),
            ("frontend-id", d.to_string()),
            ("online", "1".into()),
            ("state", XenbusState::Initialising.value()),
            ("mac", mac.clone()),
            ("handle", handle.clone()),
            ("type", "vif".into()),
            ("vifname", self.taps[0].name().to_string()),
            ("hotplug-status", "connected".into()),
            ("feature-sg", "1".into()),
            ("feature-gso-tcpv4", "1".into()),
            ("feature-gso-tcpv6", "1".into()),
            ("feature-ipv6-csum-offload", "1".into()),
            ("feature-rx-copy", "1".into()),
            ("feature-rx-flip", "0".into()),
            ("feature-split-event-channels", "1".into()),
            ("multi-queue-max-queues", self.taps.len().to_string()),
        ];
        if let Some(b) = &self.cfg.bridge {
            be_nodes.push(("bridge", b.clone()));
        }
        if let Some(m) = self.cfg.mtu {
            be_nodes.push(("mtu", m.to_string()));
        }
        for (k, v) in be_nodes {
            let p = if k.is_empty() {
                self.be.clone()
            } else {
                format!("{}/{k}", self.be)
            };
            xs.write_with_perms(&p, v.as_bytes(), &be_perms)?;
        }
        let mut fe_nodes: Vec<(&str, String)> = vec![
            ("", String::new()),
            ("backend", self.be.clone()),
            ("backend-id", "0".into()),
            ("state", XenbusState::Initialising.value()),
            ("handle", handle),
            ("mac", mac),
            ("trusted", "1".into()),
        ];
        // xenstore-paths: tells the frontend it may go above 1500.
        if let Some(m) = self.cfg.mtu {
            fe_nodes.push(("mtu", m.to_string()));
        }
        for (k, v) in fe_nodes {
            let p = if k.is_empty() {
                self.fe.clone()
            } else {
                format!("{}/{k}", self.fe)
            };
            xs.write_with_perms(&p, v.as_bytes(), &fe_perms)?;
        }
        self.switch(xs, XenbusState::InitWait);
        xs.watch(&format!("{}/state", self.fe), &self.token())?;
        Ok(())
    }

    fn switch(&mut self, xs: &mut XenstoreServer, s: XenbusState) {
        self.state = s;
        if let Err(e) = xs.write(&format!("{}/state", self.be), s.value().as_bytes()) {
            tracing::warn!(devid = self.cfg.devid, %e, "cannot write the vif backend state");
        }
        tracing::info!(devid = self.cfg.devid, state = ?s, "vif backend state");
    }

    /// The frontend's state node changed (or the watch fired at set-up).
    pub fn frontend_changed(
        &mut self,
        xs: &mut XenstoreServer,
        host: &NetHost,
        domain: &Arc<Domain>,
        map: &MemoryMap,
    ) {
        let fe = XenbusState::parse(
            xs.read_string(&format!("{}/state", self.fe))
                .ok()
                .as_deref(),
        );
        // A frontend that starts over (a kexec'd kernel, a driver loaded
        // again without closing) while connected: as Linux netback, drop
        // the connection and wait for it again.
        if fe == XenbusState::Initialising
            && matches!(
                self.state,
                XenbusState::Connected | XenbusState::Closing | XenbusState::Closed
            )
        {
            self.disconnect(host);
            self.switch(xs, XenbusState::InitWait);
            return;
        }
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
                        tracing::warn!(devid = self.cfg.devid, %e, "vif frontend refused");
                        let _ = xs.write(&format!("{}/error", self.be), e.to_string().as_bytes());
                        self.switch(xs, XenbusState::Closing);
                    }
                }
            }
        }
    }

    /// Stops the queues and gives their rings back.
    pub fn disconnect(&mut self, host: &NetHost) {
        for w in self.workers.drain(..) {
            for &p in &w.dom0_ports {
                (host.route)(p, None);
            }
            w.stop();
        }
    }

    fn read_fe(&self, xs: &XenstoreServer, key: &str) -> Option<String> {
        xs.read_string(&format!("{}/{key}", self.fe)).ok()
    }

    fn flag(&self, xs: &XenstoreServer, key: &str) -> bool {
        self.read_fe(xs, key)
            .is_some_and(|v| v.trim().parse::<u32>().is_ok_and(|n| n != 0))
    }

    /// The ring keys of one queue under `dir` (`""` or `queue-N/`).
    fn ring_setup(&self, xs: &XenstoreServer, dir: &str) -> Result<NetRingSetup, NetError> {
        let bad = |what: String| NetError::Frontend(format!("vif {}: {what}", self.cfg.devid));
        let num = |k: &str| -> Result<Option<u32>, NetError> {
            match self.read_fe(xs, &format!("{dir}{k}")) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<u32>()
                    .map(Some)
                    .map_err(|_| bad(format!("{dir}{k} = {v:?} is not a number"))),
            }
        };
        let tx_ref = num("tx-ring-ref")?.ok_or_else(|| bad(format!("{dir}tx-ring-ref missing")))?;
        let rx_ref = num("rx-ring-ref")?.ok_or_else(|| bad(format!("{dir}rx-ring-ref missing")))?;
        let (tx_port, rx_port) = match num("event-channel")? {
            Some(p) => (p, p),
            None => {
                let t = num("event-channel-tx")?;
                let r = num("event-channel-rx")?;
                match (t, r) {
                    (Some(t), Some(r)) => (t, r),
                    _ => return Err(bad(format!("{dir}event-channel missing"))),
                }
            }
        };
        Ok(NetRingSetup {
            tx_ref,
            rx_ref,
            tx_port,
            rx_port,
        })
    }

    fn connect(
        &mut self,
        xs: &mut XenstoreServer,
        host: &NetHost,
        domain: &Arc<Domain>,
        map: &MemoryMap,
    ) -> Result<(), NetError> {
        let devid = self.cfg.devid;
        let bad = |what: String| NetError::Frontend(format!("vif {devid}: {what}"));
        if !self.flag(xs, "request-rx-copy") {
            return Err(bad(
                "request-rx-copy is not 1 (page flipping is not offered)".into(),
            ));
        }
        let max = self.taps.len() as u32;
        let nq = match self.read_fe(xs, "multi-queue-num-queues") {
            None => 1,
            Some(v) => match v.trim().parse::<u32>() {
                Ok(n) if (1..=max).contains(&n) => n,
                _ => {
                    return Err(bad(format!(
                        "multi-queue-num-queues {v:?} (1..={max} offered)"
                    )))
                }
            },
        };
        let setups = if self.read_fe(xs, "tx-ring-ref").is_some() {
            vec![self.ring_setup(xs, "")?]
        } else {
            (0..nq)
                .map(|i| self.ring_setup(xs, &format!("queue-{i}/")))
                .collect::<Result<Vec<_>, _>>()?
        };
        let sg = self.flag(xs, "feature-sg");
        let features = RxFeatures {
            gso4: sg && self.flag(xs, "feature-gso-tcpv4"),
            gso6: sg && self.flag(xs, "feature-gso-tcpv6"),
            no_csum: self.flag(xs, "feature-no-csum-offload"),
        };
        // What the TAP may hand us is what the frontend accepts.
        let mut offload = 0;
        if !features.no_csum {
            offload |= TUN_F_CSUM;
            if features.gso4 {
                offload |= TUN_F_TSO4;
            }
            if features.gso6 {
                offload |= TUN_F_TSO6;
            }
        }
        let tap_err = |source: std::io::Error| NetError::Tap {
            name: self.taps[0].name().to_string(),
            source,
        };
        self.taps[0].set_offload(offload).map_err(tap_err)?;
        // Frames go to the queues in use only.
        if self.taps.len() > 1 {
            for (i, t) in self.taps.iter().enumerate() {
                t.set_queue_attached(i < setups.len()).map_err(tap_err)?;
            }
        }
        for (i, s) in setups.iter().enumerate() {
            let name = format!("vif{}.{}-q{i}", self.domid, devid);
            let q = NetQueue::connect(
                name.clone(),
                domain.clone(),
                self.domid,
                map.clone(),
                self.taps[i].clone(),
                features,
                s,
            )?;
            let w = NetWorker::start(host, name, q)?;
            for &p in &w.dom0_ports {
                (host.route)(p, Some(w.kick.clone()));
            }
            // Whatever the frontend queued before the route existed.
            let _ = w.kick.write(1);
            self.workers.push(w);
        }
        Ok(())
    }
}
