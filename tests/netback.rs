//! netback against an in-process netfront (`common/netfront.rs` over the
//! in-process guest of `common/blkfront.rs`): the real grant table and
//! event channels, guest RAM in gpc's memory map, the real backend code
//! (queue engine, xenbus state machine over the real xenstore server) and
//! a real TAP in a network namespace the test creates, whose kernel answers
//! ARP, ICMP echo and TCP. No guest and no /dev/kvm needed; without root
//! (network namespaces, TAP devices) the tests are skipped with a reason.

#[path = "common/blkfront.rs"]
mod blkfront;
#[path = "common/mod.rs"]
mod common;
#[path = "common/netfront.rs"]
mod netfront;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blkfront::*;
use netfront::*;
use xenkvm::backends::netback::xenbus::HOST_MAC;
use xenkvm::backends::netback::{NetBackend, NetConfig};
use xenkvm::backends::netif::wire::*;
use xenkvm::backends::xenstore::{self, PermKind, XenstoreServer};

const T: Duration = Duration::from_secs(10);
static SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Option<Netns> {
        let name = format!(
            "xknb{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then_some(Netns(name))
    }
    fn ip(&self, args: &[&str]) {
        let o = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("ip");
        assert!(
            o.status.success(),
            "ip -n {} {args:?}: {}",
            self.0,
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn fe_mac(i: u32) -> [u8; 6] {
    [0x00, 0x16, 0x3e, 0x4e, 0x42, i as u8]
}
fn host_ip(i: u32) -> [u8; 4] {
    [10, 77, i as u8, 1]
}
fn fe_ip(i: u32) -> [u8; 4] {
    [10, 77, i as u8, 2]
}

/// The VMM's side (xenstore, the backend) and the namespace with the TAPs.
struct Fix {
    _ns: Netns,
    g: Arc<Guest>,
    xs: XenstoreServer,
    b: NetBackend,
}

impl Fix {
    /// `n` vifs, vif i's TAP in the namespace as 10.77.i.1/24 (MTU 65000),
    /// the frontend's address 10.77.i.2 in its neighbour table.
    fn new(test: &str, n: u32) -> Option<Fix> {
        let Some(ns) = Netns::new() else {
            common::skip(
                test,
                "cannot create a network namespace (needs root and iproute2)",
            );
            return None;
        };
        let g = Guest::new();
        let mut xs =
            XenstoreServer::new_domain(&xenstore::DomainConfig::new(DOMID, "t", [0; 16], 65536))
                .unwrap();
        let k = SEQ.fetch_add(1, Ordering::Relaxed);
        let cfgs: Vec<NetConfig> = (0..n)
            .map(|i| NetConfig {
                devid: i,
                mac: fe_mac(i),
                vifname: format!("xkv{}{k}x{i}", std::process::id() % 100_000),
                bridge: None,
                mtu: Some(65000),
            })
            .collect();
        let b = match NetBackend::new(&cfgs, DOMID, g.d.clone(), g.map.clone(), g.host(), &mut xs) {
            Ok(b) => b,
            Err(e) if e.contains("not permitted") || e.contains("No such file") => {
                common::skip(test, &format!("no TAP devices here: {e}"));
                return None;
            }
            Err(e) => panic!("backend: {e}"),
        };
        for (i, c) in cfgs.iter().enumerate() {
            let i = i as u32;
            let tap = &c.vifname;
            let o = Command::new("ip")
                .args(["link", "set", tap, "netns", &ns.0])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let a = host_ip(i);
            ns.ip(&[
                "addr",
                "add",
                &format!("{}.{}.{}.{}/24", a[0], a[1], a[2], a[3]),
                "dev",
                tap,
            ]);
            ns.ip(&["link", "set", tap, "mtu", "65000", "up"]);
            let f = fe_ip(i);
            let m = fe_mac(i);
            ns.ip(&[
                "neigh",
                "replace",
                &format!("{}.{}.{}.{}", f[0], f[1], f[2], f[3]),
                "lladdr",
                &format!(
                    "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                ),
                "dev",
                tap,
                "nud",
                "permanent",
            ]);
        }
        let mut f = Fix { _ns: ns, g, xs, b };
        f.settle();
        Some(f)
    }

    fn settle(&mut self) {
        for _ in 0..8 {
            let ev = self.xs.take_events();
            if ev.is_empty() {
                return;
            }
            let rest = self.b.handle_events(&mut self.xs, ev);
            assert!(rest.is_empty());
        }
    }
    fn fe(&self, devid: u32) -> String {
        format!("/local/domain/{DOMID}/device/vif/{devid}")
    }
    fn be(&self, devid: u32) -> String {
        format!("/local/domain/0/backend/vif/{DOMID}/{devid}")
    }
    fn read(&self, p: &str) -> String {
        self.xs
            .read_string(p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
    }
    fn w(&mut self, p: &str, v: &str) {
        self.xs.write(p, v.as_bytes()).unwrap();
    }
    fn be_state(&self, devid: u32) -> String {
        self.read(&format!("{}/state", self.be(devid)))
    }
    fn set_fe_state(&mut self, devid: u32, s: u32) {
        let p = format!("{}/state", self.fe(devid));
        self.w(&p, &s.to_string());
        self.settle();
    }
    /// Netfront's multi-queue connect: keys under `queue-N/`.
    fn connect_mq(&mut self, devid: u32, n: u32) -> Vec<NetFront> {
        let fe = self.fe(devid);
        let mut v = Vec::new();
        self.w(&format!("{fe}/multi-queue-num-queues"), &n.to_string());
        for q in 0..n {
            let nf = NetFront::new(&self.g, q % 2 == 1);
            for (k, val) in nf.keys() {
                let dir = if k.starts_with("tx-") || k.starts_with("rx-") || k.starts_with("event-")
                {
                    format!("{fe}/queue-{q}/{k}")
                } else {
                    format!("{fe}/{k}")
                };
                self.w(&dir, &val);
            }
            v.push(nf);
        }
        self.set_fe_state(devid, 4);
        assert_eq!(self.be_state(devid), "4", "backend connected");
        v
    }

    /// Netfront's connect: rings, keys, Initialising -> Connected.
    fn connect(&mut self, devid: u32, split: bool) -> NetFront {
        let nf = NetFront::new(&self.g, split);
        let fe = self.fe(devid);
        for (k, v) in nf.keys() {
            self.w(&format!("{fe}/{k}"), &v);
        }
        self.set_fe_state(devid, 4);
        assert_eq!(self.be_state(devid), "4", "backend connected");
        nf
    }
}

// --- frames -------------------------------------------------------------

fn csum(data: &[u8]) -> u16 {
    xenkvm::backends::netif::frame::csum_fold(xenkvm::backends::netif::frame::csum_add(0, data))
}

fn eth(dst: [u8; 6], src: [u8; 6], ty: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ty.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn icmp_echo(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![8u8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = csum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

fn arp_request(mac: [u8; 6], sip: [u8; 4], tip: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&mac);
    a.extend_from_slice(&sip);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tip);
    eth([0xff; 6], mac, 0x0806, &a)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn is_arp_reply(f: &RxFrame, from: [u8; 4]) -> bool {
    let d = &f.data;
    d.len() >= 42 && d[12..14] == [8, 6] && d[20..22] == [0, 2] && d[28..32] == from
}

/// The echo reply to (id, seq): its ICMP message.
fn echo_reply(f: &RxFrame, id: u16, seq: u16) -> Option<Vec<u8>> {
    let d = &f.data;
    if d.len() < 42 || d[12..14] != [8, 0] || d[23] != 1 {
        return None;
    }
    let ihl = usize::from(d[14] & 0xf) * 4;
    let m = &d[14 + ihl..];
    (m[0] == 0 && m[4..6] == id.to_be_bytes() && m[6..8] == seq.to_be_bytes()).then(|| m.to_vec())
}

/// ARP for the host side, then one echo of `payload`: the reply's ICMP
/// message (checked: same payload, checksum verifies).
fn ping(nf: &mut NetFront, i: u32, seq: u16, payload: &[u8], frag: usize) -> RxFrame {
    let ids = nf.send(
        &arp_request(fe_mac(i), fe_ip(i), host_ip(i)),
        TxOpts::default(),
    );
    let st = nf.tx_responses(ids.len());
    assert!(st.iter().all(|&(_, s)| s == RSP_OKAY), "ARP sent: {st:?}");
    let arp = nf
        .recv_matching(T, |f| is_arp_reply(f, host_ip(i)))
        .expect("the namespace's kernel answers ARP");
    assert_eq!(&arp.data[0..6], &fe_mac(i), "reply to our MAC");
    assert_eq!(&arp.data[22..28], &HOST_MAC, "the TAP's MAC");
    let frame = eth(
        HOST_MAC,
        fe_mac(i),
        0x0800,
        &ipv4(fe_ip(i), host_ip(i), 1, &icmp_echo(0x4242, seq, payload)),
    );
    let ids = nf.send(
        &frame,
        TxOpts {
            frag,
            ..TxOpts::default()
        },
    );
    let st = nf.tx_responses(ids.len());
    assert_eq!(st.len(), ids.len(), "one response per slot");
    for (k, &(id, s)) in st.iter().enumerate() {
        assert_eq!(id, ids[k], "responses in the requests' order and ids");
        assert_eq!(s, RSP_OKAY);
    }
    let r = nf
        .recv_matching(T, |f| echo_reply(f, 0x4242, seq).is_some())
        .expect("the namespace's kernel answers the echo request");
    let m = echo_reply(&r, 0x4242, seq).unwrap();
    assert!(!r.error);
    assert_eq!(&m[8..], payload, "the payload comes back");
    assert_eq!(csum(&m), 0, "the reply's ICMP checksum verifies");
    r
}

#[test]
fn netback_arp_and_ping_in_netns_get_replies() {
    let Some(mut f) = Fix::new("netback_arp_and_ping_in_netns_get_replies", 1) else {
        return;
    };
    let mut nf = f.connect(0, false);
    ping(&mut nf, 0, 1, &pattern(56, 1), 0);
    // Split event channels as well.
    let Some(mut f2) = Fix::new("netback_arp_and_ping_in_netns_get_replies", 1) else {
        return;
    };
    let mut nf2 = f2.connect(0, true);
    ping(&mut nf2, 0, 2, &pattern(1000, 2), 0);
    drop(f);
}

#[test]
fn netback_60k_frame_multi_slot_both_ways_checksum_matches() {
    let Some(mut f) = Fix::new("netback_60k_frame_multi_slot_both_ways_checksum_matches", 1) else {
        return;
    };
    let mut nf = f.connect(0, false);
    // 60,000 bytes of ICMP payload in one frame: 15 tx slots out, and the
    // kernel's 60,042-byte reply in 15 rx slots back.
    let payload = pattern(60_000, 7);
    let r = ping(&mut nf, 0, 3, &payload, 0);
    assert_eq!(r.data.len(), 14 + 20 + 8 + 60_000);
    // Odd fragment sizes (1000 bytes a slot: 61 slots is over the limit of
    // 18, so 40,000 bytes in 3000-byte fragments: 14 slots).
    let payload = pattern(40_000, 9);
    let r = ping(&mut nf, 0, 4, &payload, 3000);
    assert_eq!(r.data.len(), 14 + 20 + 8 + 40_000);
}

#[test]
fn netback_gso_tcp_segment_reaches_kernel_whole() {
    let Some(mut f) = Fix::new("netback_gso_tcp_segment_reaches_kernel_whole", 1) else {
        return;
    };
    let mut nf = f.connect(0, false);
    ping(&mut nf, 0, 5, b"hello", 0);
    // A 20,000-byte TCP segment (no ACK flag) to a closed port, as TSO with
    // a blank checksum: the kernel answers RST|ACK acknowledging every byte
    // (ack = seq + 20000), so it got the whole segment.
    let data = pattern(20_000, 3);
    let seq: u32 = 0x1000_0000;
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&9u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x08; // PSH
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    // CHECKSUM_PARTIAL: the field holds the pseudo-header sum.
    let mut ph = Vec::new();
    ph.extend_from_slice(&fe_ip(0));
    ph.extend_from_slice(&host_ip(0));
    ph.extend_from_slice(&[0, 6]);
    ph.extend_from_slice(&((20 + data.len()) as u16).to_be_bytes());
    let pseudo = !csum(&ph);
    tcp[16..18].copy_from_slice(&pseudo.to_be_bytes());
    tcp.extend_from_slice(&data);
    let frame = eth(
        HOST_MAC,
        fe_mac(0),
        0x0800,
        &ipv4(fe_ip(0), host_ip(0), 6, &tcp),
    );
    let ids = nf.send(
        &frame,
        TxOpts {
            csum_blank: true,
            gso: Some((1448, GSO_TCPV4)),
            ..TxOpts::default()
        },
    );
    // Data slots plus the extra info slot, each answered.
    let st = nf.tx_responses(ids.len() + 1);
    assert_eq!(st[0], (ids[0], RSP_OKAY));
    assert_eq!(st[1].1, RSP_NULL, "the extra info slot's response");
    assert!(st[2..].iter().all(|&(_, s)| s == RSP_OKAY));
    let rst = nf
        .recv_matching(T, |f| {
            f.data.len() >= 54 && f.data[12..14] == [8, 0] && f.data[23] == 6
        })
        .expect("the kernel answers the segment");
    let t = &rst.data[34..];
    assert_eq!(t[13] & 0x04, 0x04, "RST");
    let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
    assert_eq!(ack, seq + 20_000, "every byte of the segment arrived");
}

#[test]
fn netback_xenbus_nodes_have_xl_keys_and_permissions() {
    let Some(f) = Fix::new("netback_xenbus_nodes_have_xl_keys_and_permissions", 1) else {
        return;
    };
    let (fe, be) = (f.fe(0), f.be(0));
    assert_eq!(f.read(&format!("{fe}/backend")), be);
    assert_eq!(f.read(&format!("{fe}/backend-id")), "0");
    assert_eq!(f.read(&format!("{fe}/handle")), "0");
    assert_eq!(f.read(&format!("{fe}/mac")), "00:16:3e:4e:42:00");
    assert_eq!(f.read(&format!("{fe}/state")), "1");
    assert_eq!(f.read(&format!("{fe}/mtu")), "65000");
    assert_eq!(f.read(&format!("{be}/frontend")), fe);
    assert_eq!(f.read(&format!("{be}/frontend-id")), DOMID.to_string());
    assert_eq!(f.read(&format!("{be}/mac")), "00:16:3e:4e:42:00");
    assert_eq!(f.read(&format!("{be}/handle")), "0");
    assert_eq!(f.read(&format!("{be}/type")), "vif");
    assert_eq!(f.read(&format!("{be}/hotplug-status")), "connected");
    for k in [
        "feature-rx-copy",
        "feature-sg",
        "feature-gso-tcpv4",
        "feature-gso-tcpv6",
        "feature-split-event-channels",
    ] {
        assert_eq!(f.read(&format!("{be}/{k}")), "1", "{k}");
    }
    assert!(
        f.read(&format!("{be}/multi-queue-max-queues"))
            .parse::<u32>()
            .unwrap()
            >= 1
    );
    assert_eq!(f.be_state(0), "2", "InitWait");
    let fp = f.xs.get_perms(&fe).unwrap();
    assert_eq!(fp.owner(), DOMID);
    let bp = f.xs.get_perms(&format!("{be}/state")).unwrap();
    assert_eq!(bp.owner(), 0);
    assert_eq!(bp.access(DOMID), PermKind::Read);
    assert_eq!(bp.access(7), PermKind::None);
}

#[test]
fn netback_close_and_reconnect_serves_again() {
    let Some(mut f) = Fix::new("netback_close_and_reconnect_serves_again", 1) else {
        return;
    };
    let mut nf = f.connect(0, false);
    ping(&mut nf, 0, 6, b"before", 0);
    f.set_fe_state(0, 5);
    assert_eq!(f.be_state(0), "5");
    f.set_fe_state(0, 6);
    assert_eq!(f.be_state(0), "6");
    assert_eq!(f.b.devices()[0].queues(), 0, "queue stopped");
    // The grants are given back: the frontend can revoke its rings.
    assert!(f.g.revoke(nf.tx.gref) && f.g.revoke(nf.rx.gref));
    // A reloaded driver: Initialising -> InitWait, new rings, Connected.
    f.set_fe_state(0, 1);
    assert_eq!(f.be_state(0), "2");
    let mut nf = f.connect(0, false);
    ping(&mut nf, 0, 7, b"after", 0);
    // A kexec'd kernel's netfront starts over from Initialising while the
    // backend is connected: back to InitWait, and it connects again.
    f.set_fe_state(0, 1);
    assert_eq!(f.be_state(0), "2");
    assert_eq!(f.b.devices()[0].queues(), 0);
    let mut nf = f.connect(0, true);
    ping(&mut nf, 0, 13, b"after kexec", 0);
    // A frontend that vanishes (its state node gone): disconnected.
    let p = format!("{}/state", f.fe(0));
    f.xs.rm(&p).unwrap();
    f.settle();
    assert_eq!(f.be_state(0), "6");
}

#[test]
fn netback_bad_tx_grant_gets_error_response_device_goes_on() {
    let Some(mut f) = Fix::new("netback_bad_tx_grant_gets_error_response_device_goes_on", 1) else {
        return;
    };
    let mut nf = f.connect(0, false);
    let r = TxRequest {
        gref: 60_000,
        offset: 0,
        flags: 0,
        id: 77,
        size: 60,
    };
    nf.send_raw(&[r.encode()]);
    assert_eq!(nf.tx_responses(1), vec![(77, RSP_ERROR)]);
    // A fragment that crosses its page: error too (fatal for Linux netback:
    // the device is refused), so test it on its own device below.
    ping(&mut nf, 0, 8, b"still there", 0);
}

#[test]
fn netback_bad_rx_grant_gets_error_status_next_frame_fine() {
    let Some(mut f) = Fix::new("netback_bad_rx_grant_gets_error_status_next_frame_fine", 1) else {
        return;
    };
    let mut nf = f.connect(0, false);
    // Spoil the next posted rx request (the backend has not read it yet).
    let idx = nf.rx.rsp_cons;
    let off = 64 + (idx % nf.rx.size) as usize * RX_SLOT;
    let bad = RxRequest {
        id: (idx % nf.rx.size) as u16,
        gref: 60_001,
    };
    f.g.write_mem(nf.rx.addr(off), &bad.encode());
    let ids = nf.send(
        &arp_request(fe_mac(0), fe_ip(0), host_ip(0)),
        TxOpts::default(),
    );
    nf.tx_responses(ids.len());
    let got = nf.recv(T).expect("a response for the frame");
    assert!(got.error, "the slot with the bad grant has an error status");
    ping(&mut nf, 0, 9, b"after a bad rx grant", 0);
}

#[test]
fn netback_bad_frontends_refused_other_device_keeps_serving() {
    let Some(mut f) = Fix::new(
        "netback_bad_frontends_refused_other_device_keeps_serving",
        3,
    ) else {
        return;
    };
    let mut nf0 = f.connect(0, false);
    let mut nf1 = f.connect(1, true);
    let mut nf2 = f.connect(2, false);
    // vif 0: more slots than XEN_NETIF_NR_SLOTS_MIN in one packet.
    let mut slots = Vec::new();
    for i in 0..19u16 {
        let (_, gref) = nf0.tx_bufs[usize::from(i)];
        slots.push(
            TxRequest {
                gref,
                offset: 0,
                flags: if i < 18 { TXF_MORE_DATA } else { 0 },
                id: 100 + i,
                size: if i == 0 { 19 * 100 } else { 100 },
            }
            .encode(),
        );
    }
    nf0.send_raw(&slots);
    let st = nf0.tx_responses(19);
    assert!(st.iter().all(|&(_, s)| s == RSP_ERROR), "{st:?}");
    // ... and the device is refused: nothing more is answered.
    let ids = nf0.send(
        &arp_request(fe_mac(0), fe_ip(0), host_ip(0)),
        TxOpts::default(),
    );
    assert!(!ids.is_empty());
    assert!(!nf0.tx_response_within(500), "refused device is silent");
    // vif 2: a producer index beyond the ring.
    nf2.tx
        .set_req_prod(nf2.tx.req_prod_pvt.wrapping_add(1000), nf2.tx_port);
    assert!(!nf2.tx_response_within(300));
    // vif 2: a fragment crossing its page.
    // vif 1 is unaffected.
    ping(&mut nf1, 1, 10, b"the other device", 0);
    // The refused devices can be closed and reconnected.
    f.set_fe_state(0, 6);
    assert_eq!(f.be_state(0), "6");
    f.set_fe_state(0, 1);
    let mut nf0 = f.connect(0, false);
    ping(&mut nf0, 0, 11, b"reconnected", 0);
}

#[test]
fn netback_tx_fragment_crossing_page_refused_with_error() {
    let Some(mut f) = Fix::new("netback_tx_fragment_crossing_page_refused_with_error", 1) else {
        return;
    };
    let mut nf = f.connect(0, false);
    let (_, gref) = nf.tx_bufs[0];
    let r = TxRequest {
        gref,
        offset: 4000,
        flags: 0,
        id: 5,
        size: 200,
    };
    nf.send_raw(&[r.encode()]);
    assert_eq!(nf.tx_responses(1), vec![(5, RSP_ERROR)]);
}

/// A TCP segment from the frontend (checksum filled in).
fn tcp_frame(
    i: u32,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    opts: &[u8],
) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = (((20 + opts.len()) / 4) << 4) as u8;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(opts);
    let mut f = eth(
        HOST_MAC,
        fe_mac(i),
        0x0800,
        &ipv4(fe_ip(i), host_ip(i), 6, &t),
    );
    assert!(xenkvm::backends::netif::frame::checksum_fill(&mut f));
    f
}

#[test]
fn netback_kernel_tso_stream_arrives_as_gso_extra_info() {
    let Some(mut f) = Fix::new("netback_kernel_tso_stream_arrives_as_gso_extra_info", 1) else {
        return;
    };
    // An ordinary MTU so the kernel's TCP segments: it hands the TAP TSO
    // frames, which must reach the frontend with GSO extra info.
    let tap = f.b.devices()[0].tap().name().to_string();
    f._ns.ip(&["link", "set", &tap, "mtu", "1500"]);
    let mut nf = f.connect(0, false);
    ping(&mut nf, 0, 12, b"warm up", 0);
    const N: usize = 200_000;
    let script = format!(
        "import socket\ns=socket.create_connection(('10.77.0.2',5001),timeout=20)\n\
         s.sendall(bytes((i*7+3)%256 for i in range({N})))\ns.shutdown(socket.SHUT_WR)\n\
         s.settimeout(20)\ns.recv(1)\n"
    );
    let mut child = match Command::new("ip")
        .args(["netns", "exec", &f._ns.0, "python3", "-c", &script])
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            common::skip(
                "netback_kernel_tso_stream_arrives_as_gso_extra_info",
                &format!("no python3 for the sender: {e}"),
            );
            return;
        }
    };
    let is_tcp =
        |fr: &RxFrame| fr.data.len() >= 54 && fr.data[12..14] == [8, 0] && fr.data[23] == 6;
    let syn = nf
        .recv_matching(T, |fr| is_tcp(fr) && fr.data[47] & 0x02 != 0)
        .expect("the kernel's SYN");
    let t = &syn.data[34..];
    let sport = u16::from_be_bytes([t[0], t[1]]);
    let their = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let mut next = their.wrapping_add(1);
    let ours: u32 = 0x5000_0000;
    // SYN|ACK with MSS 1460.
    let sa = tcp_frame(0, 5001, sport, ours, next, 0x12, &[2, 4, 0x05, 0xb4]);
    nf.send(&sa, TxOpts::default());
    let mut got = Vec::new();
    let mut gso_frames = 0;
    let mut biggest = 0;
    let mut fin = false;
    while !fin {
        let fr = nf
            .recv_matching(T, |fr| is_tcp(fr))
            .expect("the stream goes on");
        let ihl = usize::from(fr.data[14] & 0xf) * 4;
        let t = &fr.data[14 + ihl..];
        let doff = usize::from(t[12] >> 4) * 4;
        let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
        let payload = &t[doff..];
        if let Some(Extra::Gso { size, kind, .. }) = fr.gso {
            assert_eq!(kind, GSO_TCPV4);
            assert!(size > 0 && usize::from(size) <= 1460);
            gso_frames += 1;
        }
        biggest = biggest.max(fr.data.len());
        if seq == next {
            got.extend_from_slice(payload);
            next = next.wrapping_add(payload.len() as u32);
            if t[13] & 0x01 != 0 {
                next = next.wrapping_add(1);
                fin = true;
            }
        }
        let ack = tcp_frame(0, 5001, sport, ours.wrapping_add(1), next, 0x10, &[]);
        nf.send(&ack, TxOpts::default());
        nf.tx_responses(1);
    }
    // Our FIN so the sender's recv returns.
    let fa = tcp_frame(0, 5001, sport, ours.wrapping_add(1), next, 0x11, &[]);
    nf.send(&fa, TxOpts::default());
    let _ = child.wait();
    let want: Vec<u8> = (0..N).map(|i| ((i * 7 + 3) % 256) as u8).collect();
    assert_eq!(got.len(), N);
    assert!(got == want, "the stream's bytes arrive intact");
    assert!(gso_frames > 0, "TSO frames came as GSO extra info");
    assert!(biggest > 1514, "frames larger than the MTU: {biggest}");
    println!("{gso_frames} GSO frames, the largest {biggest} bytes");
}

#[test]
fn netback_multi_queue_each_queue_carries_traffic() {
    let Some(mut f) = Fix::new("netback_multi_queue_each_queue_carries_traffic", 1) else {
        return;
    };
    let max: u32 = f
        .read(&format!("{}/multi-queue-max-queues", f.be(0)))
        .parse()
        .unwrap();
    if max < 2 {
        common::skip(
            "netback_multi_queue_each_queue_carries_traffic",
            "one host CPU: one queue offered",
        );
        return;
    }
    let mut qs = f.connect_mq(0, 2);
    assert_eq!(f.b.devices()[0].queues(), 2);
    // Each queue transmits; the replies come back on whichever queue the
    // TAP picks for the flow: collect from both.
    for (q, seq) in [(0usize, 20u16), (1, 21)] {
        let ids = qs[q].send(
            &arp_request(fe_mac(0), fe_ip(0), host_ip(0)),
            TxOpts::default(),
        );
        assert_eq!(qs[q].tx_responses(ids.len())[0].1, RSP_OKAY);
        let payload = pattern(3000 + usize::from(seq), seq as u8);
        let frame = eth(
            HOST_MAC,
            fe_mac(0),
            0x0800,
            &ipv4(fe_ip(0), host_ip(0), 1, &icmp_echo(0x4343, seq, &payload)),
        );
        let ids = qs[q].send(&frame, TxOpts::default());
        assert!(qs[q]
            .tx_responses(ids.len())
            .iter()
            .all(|&(_, s)| s == RSP_OKAY));
        let end = std::time::Instant::now() + T;
        let mut found = None;
        while found.is_none() && std::time::Instant::now() < end {
            for nf in qs.iter_mut() {
                if let Some(r) = nf.recv(Duration::from_millis(20)) {
                    if let Some(m) = echo_reply(&r, 0x4343, seq) {
                        found = Some(m);
                    }
                }
            }
        }
        let m = found.expect("the echo reply on one of the queues");
        assert_eq!(&m[8..], &payload[..]);
    }
}

#[test]
fn netback_frontend_without_csum_offload_gets_full_checksums() {
    let Some(mut f) = Fix::new(
        "netback_frontend_without_csum_offload_gets_full_checksums",
        1,
    ) else {
        return;
    };
    let fe = f.fe(0);
    f.w(&format!("{fe}/feature-no-csum-offload"), "1");
    let mut nf = f.connect(0, false);
    ping(&mut nf, 0, 30, b"x", 0);
    // A TCP segment with a blank checksum (the backend's TAP carries the
    // offload to the kernel), to a closed port: the kernel's RST comes back
    // with a complete checksum and no csum_blank.
    let mut seg = tcp_frame(0, 40001, 9, 77, 0, 0x08, &[]);
    seg.extend_from_slice(b"some data");
    // Fix the lengths for the payload, then blank the checksum.
    let ip_len = (seg.len() - 14) as u16;
    seg[16..18].copy_from_slice(&ip_len.to_be_bytes());
    seg[24..26].copy_from_slice(&[0, 0]);
    let c = csum(&seg[14..34]);
    seg[24..26].copy_from_slice(&c.to_be_bytes());
    assert!(xenkvm::backends::netif::frame::checksum_fill(&mut seg));
    nf.send(
        &seg,
        TxOpts {
            csum_blank: false,
            data_validated: true,
            ..TxOpts::default()
        },
    );
    let rst = nf
        .recv_matching(T, |fr| {
            fr.data.len() >= 54 && fr.data[12..14] == [8, 0] && fr.data[23] == 6
        })
        .expect("the kernel's RST");
    assert_eq!(rst.flags & RXF_CSUM_BLANK, 0, "no blank checksum");
    assert!(
        xenkvm::backends::netif::frame::checksum_ok(&rst.data),
        "the RST's TCP checksum verifies"
    );
    let t = &rst.data[34..];
    assert_eq!(t[13] & 0x04, 0x04, "RST");
    let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
    assert_eq!(ack, 77 + 9, "the segment's bytes were counted");
}

#[test]
fn netback_vifname_in_use_refused_by_name() {
    let g = Guest::new();
    let mut xs =
        XenstoreServer::new_domain(&xenstore::DomainConfig::new(DOMID, "t", [0; 16], 65536))
            .unwrap();
    let cfg = NetConfig {
        devid: 0,
        mac: fe_mac(0),
        vifname: format!("xkdup{}", std::process::id() % 100_000),
        bridge: None,
        mtu: None,
    };
    let first = match NetBackend::new(
        std::slice::from_ref(&cfg),
        DOMID,
        g.d.clone(),
        g.map.clone(),
        g.host(),
        &mut xs,
    ) {
        Ok(b) => b,
        Err(e) => {
            common::skip(
                "netback_vifname_in_use_refused_by_name",
                &format!("no TAP devices here: {e}"),
            );
            return;
        }
    };
    // Another VM with the same vifname: refused, not attached to the first
    // one's TAP.
    let mut xs2 =
        XenstoreServer::new_domain(&xenstore::DomainConfig::new(DOMID, "t", [0; 16], 65536))
            .unwrap();
    let e = NetBackend::new(
        &[cfg],
        DOMID,
        g.d.clone(),
        g.map.clone(),
        g.host(),
        &mut xs2,
    )
    .unwrap_err();
    assert!(e.contains("exists already") && e.contains("vif 0"), "{e}");
    drop(first);
}
