//! The PV network backend (netback): the dom0 side of Xen's netif for the
//! VMM's guest, over a host TAP device (`crate::host::tap`) with vnet
//! headers and offloads, optionally a port of a host bridge.
//!
//! - [`queue`]: one tx/rx ring pair being served (copy once, check, copy
//!   the granted fragments to the TAP and TAP frames into the posted rx
//!   pages, respond, notify).
//! - [`xenbus`]: the vif's xenstore nodes and the state machine.
//!
//! Each connected queue runs on its own I/O thread (started through the
//! VMM's spawner; never a vCPU thread) that sleeps in `poll` on its kick
//! eventfd (written when the guest signals the queue's event channels) and
//! the TAP. [`NetBackend`] holds a guest's vifs and reacts to xenstore
//! watch events on the event loop.

#![forbid(unsafe_code)]

pub mod queue;
pub mod xenbus;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use gpc::MemoryMap;
use hypercalls::Domain;
use vmm_sys_util::eventfd::EventFd;

pub use crate::backends::blkback::BlkHost as NetHost;
use crate::backends::xenstore::{WatchEvent, XenstoreServer};
pub use queue::{NetQueue, NetRingSetup, NetStats, RxFeatures};
pub use xenbus::VifDevice;

/// Why a vif or a frontend cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("TAP {name}: {source}")]
    Tap {
        name: String,
        source: std::io::Error,
    },
    /// The frontend broke the protocol (the device is refused).
    #[error("bad frontend: {0}")]
    Frontend(String),
    #[error("event channel: {0}")]
    Evtchn(String),
    #[error("xenstore: {0}")]
    Xenstore(String),
    #[error("cannot start an I/O thread: {0}")]
    Thread(String),
}

/// A vif as configured (`--net` / `vif = [...]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub devid: u32,
    pub mac: [u8; 6],
    /// The host interface's name.
    pub vifname: String,
    pub bridge: Option<String>,
    pub mtu: Option<u16>,
}

impl NetConfig {
    /// From the configuration layer's spec: vif number `index` of guest
    /// `domid` (devid defaults to the index, the name to `vif<domid>.<devid>`
    /// as xl's hotplug names it, the MAC to a stable one in 00:16:3e).
    pub fn from_spec(n: &crate::config::NicSpec, index: u32, domid: u16) -> NetConfig {
        let devid = n.devid.unwrap_or(index);
        NetConfig {
            devid,
            mac: n.mac_for(&format!("domid{domid}"), index).0,
            vifname: n
                .vifname
                .clone()
                .unwrap_or_else(|| format!("vif{domid}.{devid}")),
            bridge: n.bridge.clone(),
            mtu: n.mtu,
        }
    }

    /// The MAC as xenstore writes it.
    pub fn mac_string(&self) -> String {
        crate::config::Mac(self.mac).to_string()
    }
}

/// A queue's I/O thread.
pub struct NetWorker {
    pub dom0_ports: Vec<u32>,
    pub kick: Arc<EventFd>,
    worker: crate::backends::worker::IoWorker,
}

impl NetWorker {
    /// Starts serving `q` on a thread called `name`.
    pub fn start(host: &NetHost, name: String, q: NetQueue) -> Result<NetWorker, NetError> {
        let dom0_ports = q.dom0_ports();
        let worker = crate::backends::worker::IoWorker::start(
            &*host.spawn,
            name,
            libc::EFD_NONBLOCK,
            move |k, s| serve(q, k, s),
        )
        .map_err(|e| NetError::Thread(e.to_string()))?;
        Ok(NetWorker {
            dom0_ports,
            kick: worker.kick().clone(),
            worker,
        })
    }

    /// Stops the thread and waits for it (its queue gives the grants back).
    pub fn stop(self) {
        self.worker.stop();
    }
}

/// How long an idle queue sleeps before looking at its rings again (a
/// safety net: the frontend's notifications and the TAP wake it).
const IDLE_MS: i32 = 200;

/// The body of a queue's I/O thread: serve, sleep on the kick eventfd and
/// the TAP, until stopped. A frontend that breaks the protocol is refused:
/// logged, its grants given back, and the thread waits for its stop.
pub fn serve(mut q: NetQueue, kick: &EventFd, stop: &AtomicBool) {
    loop {
        if stop.load(Ordering::Acquire) {
            break;
        }
        match q.process() {
            Ok(true) => continue,
            Ok(false) => {
                // Poll the tx ring a little before sleeping (as blkback
                // does): a frontend that keeps sending then needs no
                // notification and this thread no wake-up.
                let until = std::time::Instant::now() + crate::backends::blkback::POLL;
                let mut more = false;
                while std::time::Instant::now() < until {
                    if q.has_tx_requests() || stop.load(Ordering::Relaxed) {
                        more = true;
                        break;
                    }
                    std::hint::spin_loop();
                }
                if more {
                    continue;
                }
            }
            Err(e) => {
                tracing::error!(queue = ?q, %e, "netback: refusing the device (its traffic stops; the VMM goes on)");
                drop(q);
                while !stop.load(Ordering::Acquire) {
                    let _ = crate::host::tap::wait_readable(kick, None, IDLE_MS);
                    let _ = kick.read();
                }
                return;
            }
        }
        let tap = (!q.rx_blocked()).then(|| q.tap().clone());
        let _ = crate::host::tap::wait_readable(kick, tap.as_deref().map(|t| t.as_fd()), IDLE_MS);
        let _ = kick.read();
    }
}

/// A guest's vifs.
pub struct NetBackend {
    devices: Vec<VifDevice>,
    host: NetHost,
    domain: Arc<Domain>,
    map: MemoryMap,
}

impl std::fmt::Debug for NetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBackend")
            .field("devices", &self.devices)
            .finish()
    }
}

impl NetBackend {
    /// Creates every vif's TAP (errors name the vif) and publishes the
    /// devices of guest `domid` in `xs`.
    pub fn new(
        nics: &[NetConfig],
        domid: u16,
        domain: Arc<Domain>,
        map: MemoryMap,
        host: NetHost,
        xs: &mut XenstoreServer,
    ) -> Result<NetBackend, String> {
        let mut devices: Vec<VifDevice> = Vec::new();
        for c in nics {
            if devices.iter().any(|d| d.cfg.devid == c.devid) {
                return Err(format!("two vifs have the device number {}", c.devid));
            }
            let mut dev =
                VifDevice::new(c.clone(), domid).map_err(|e| format!("vif {}: {e}", c.devid))?;
            dev.publish(xs)
                .map_err(|e| format!("vif {}: xenstore: {e}", c.devid))?;
            devices.push(dev);
        }
        Ok(NetBackend {
            devices,
            host,
            domain,
            map,
        })
    }

    /// The devices.
    pub fn devices(&self) -> &[VifDevice] {
        &self.devices
    }

    /// Handles the dom0-side watch events that are ours; returns those
    /// that are not.
    pub fn handle_events(
        &mut self,
        xs: &mut XenstoreServer,
        events: Vec<WatchEvent>,
    ) -> Vec<WatchEvent> {
        let mut rest = Vec::new();
        for ev in events {
            match self.devices.iter_mut().find(|d| d.token() == ev.token) {
                Some(d) => d.frontend_changed(xs, &self.host, &self.domain, &self.map),
                None => rest.push(ev),
            }
        }
        rest
    }
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        for d in &mut self.devices {
            d.disconnect(&self.host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NicSpec;

    #[test]
    fn net_config_from_spec_defaults_follow_xl() {
        let n = NicSpec::parse("bridge=xenbr0").unwrap();
        let c = NetConfig::from_spec(&n, 2, 7);
        assert_eq!(c.devid, 2);
        assert_eq!(c.vifname, "vif7.2");
        assert_eq!(c.bridge.as_deref(), Some("xenbr0"));
        assert_eq!(&c.mac[..3], &[0x00, 0x16, 0x3e]);
        assert_eq!(c.mac, NetConfig::from_spec(&n, 2, 7).mac, "stable");
        let n = NicSpec::parse("mac=00:16:3e:01:02:03,vifname=web0,devid=5,mtu=9000").unwrap();
        let c = NetConfig::from_spec(&n, 0, 1);
        assert_eq!(
            (c.devid, c.vifname.as_str(), c.mtu),
            (5, "web0", Some(9000))
        );
        assert_eq!(c.mac_string(), "00:16:3e:01:02:03");
    }
}
