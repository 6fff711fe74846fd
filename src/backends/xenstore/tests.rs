//! Tests of the server through its ring, with a small guest-side client
//! over a [`MemRingPage`].

use super::layout::*;
use super::*;
use proptest::prelude::*;

const DOMID: u16 = 1;
const UUID: [u8; 16] = [
    0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef,
];

#[derive(Clone, Debug, PartialEq, Eq)]
struct Msg {
    ty: u32,
    req_id: u32,
    tx_id: u32,
    payload: Vec<u8>,
}

impl Msg {
    fn is_event(&self) -> bool {
        self.ty == MsgType::WatchEvent as u32
    }
    fn error(&self) -> Option<&[u8]> {
        (self.ty == MsgType::Error as u32).then(|| self.payload.strip_suffix(b"\0").unwrap())
    }
}

/// The guest side of a xenstore ring, as Linux's xenbus drives it.
struct Guest {
    page: MemRingPage,
    next_req: u32,
    rx: Vec<u8>,
}

impl Guest {
    fn new() -> Self {
        let page = MemRingPage::new();
        XenstoreServer::init_page(&page);
        Guest {
            page,
            next_req: 1,
            rx: Vec::new(),
        }
    }

    fn req_space(&self) -> usize {
        let used = self
            .page
            .load_u32(REQ_PROD)
            .wrapping_sub(self.page.load_u32(REQ_CONS));
        RING_SIZE - used as usize
    }

    /// Writes raw bytes into the request ring (they must fit).
    fn push(&self, data: &[u8]) {
        assert!(data.len() <= self.req_space(), "test wrote more than fits");
        let prod = self.page.load_u32(REQ_PROD);
        ring_write(&self.page, REQ, RING_SIZE, prod, data);
        self.page
            .store_u32(REQ_PROD, prod.wrapping_add(data.len() as u32));
    }

    fn encode(&mut self, ty: MsgType, tx: u32, payload: &[u8]) -> (u32, Vec<u8>) {
        let id = self.next_req;
        self.next_req += 1;
        (id, encode_msg(ty as u32, id, tx, payload))
    }

    fn send(&mut self, ty: MsgType, tx: u32, payload: &[u8]) -> u32 {
        let (id, m) = self.encode(ty, tx, payload);
        self.push(&m);
        id
    }

    /// Reads everything in the response ring and returns the complete
    /// messages.
    fn recv(&mut self) -> Vec<Msg> {
        let cons = self.page.load_u32(RSP_CONS);
        let prod = self.page.load_u32(RSP_PROD);
        let n = prod.wrapping_sub(cons) as usize;
        assert!(n <= RING_SIZE, "server overfilled the response ring");
        let mut buf = vec![0; n];
        ring_read(&self.page, RSP, RING_SIZE, cons, &mut buf);
        self.page.store_u32(RSP_CONS, prod);
        self.rx.extend_from_slice(&buf);
        let mut out = Vec::new();
        while self.rx.len() >= HEADER_LEN {
            let h = Header::parse(self.rx[..HEADER_LEN].try_into().unwrap());
            assert!(
                h.len as usize <= PAYLOAD_MAX,
                "server sent an oversized reply"
            );
            let total = HEADER_LEN + h.len as usize;
            if self.rx.len() < total {
                break;
            }
            let payload = self.rx[HEADER_LEN..total].to_vec();
            self.rx.drain(..total);
            out.push(Msg {
                ty: h.ty,
                req_id: h.req_id,
                tx_id: h.tx_id,
                payload,
            });
        }
        out
    }
}

fn cfg() -> DomainConfig {
    let mut c = DomainConfig::new(DOMID, "guest", UUID, 524_288);
    c.vcpus = 2;
    c.store = Some(RingRef {
        gfn: 0xfeffc,
        port: 1,
    });
    c.console = Some(RingRef {
        gfn: 0xfeffd,
        port: 2,
    });
    c
}

fn setup() -> (XenstoreServer, Guest) {
    (XenstoreServer::new_domain(&cfg()).unwrap(), Guest::new())
}

/// Sends one request, serves it, and returns its reply and any events.
fn call(xs: &mut XenstoreServer, g: &mut Guest, ty: MsgType, tx: u32, p: &[u8]) -> (Msg, Vec<Msg>) {
    let id = g.send(ty, tx, p);
    assert!(xs.process(&g.page), "a served request must notify");
    let mut msgs = g.recv();
    // A reply longer than the ring arrives over several rounds.
    for _ in 0..8 {
        if msgs.iter().any(|m| !m.is_event()) {
            break;
        }
        xs.process(&g.page);
        msgs.extend(g.recv());
    }
    let (mut replies, events): (Vec<Msg>, Vec<Msg>) = msgs.into_iter().partition(|m| !m.is_event());
    assert_eq!(replies.len(), 1, "exactly one reply");
    let r = replies.pop().unwrap();
    assert_eq!(r.req_id, id);
    assert_eq!(r.tx_id, tx);
    (r, events)
}

fn ok(xs: &mut XenstoreServer, g: &mut Guest, ty: MsgType, tx: u32, p: &[u8]) -> Vec<u8> {
    let (r, _) = call(xs, g, ty, tx, p);
    assert_eq!(r.error(), None, "{ty:?} {:?}", String::from_utf8_lossy(p));
    assert_eq!(r.ty, ty as u32);
    r.payload
}

fn err(xs: &mut XenstoreServer, g: &mut Guest, ty: MsgType, tx: u32, p: &[u8]) -> String {
    let (r, _) = call(xs, g, ty, tx, p);
    String::from_utf8(r.error().expect("expected an error reply").to_vec()).unwrap()
}

fn z(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn zz(a: &str, b: &str) -> Vec<u8> {
    let mut v = z(a);
    v.extend_from_slice(&z(b));
    v
}

fn write_req(path: &str, val: &str) -> Vec<u8> {
    let mut v = z(path);
    v.extend_from_slice(val.as_bytes());
    v
}

fn event(path: &str, token: &str) -> Msg {
    Msg {
        ty: MsgType::WatchEvent as u32,
        req_id: 0,
        tx_id: 0,
        payload: zz(path, token),
    }
}

// ---- standard tree ----

#[test]
fn tree_new_domain_has_standard_nodes() {
    let xs = XenstoreServer::new_domain(&cfg()).unwrap();
    let d = "/local/domain/1";
    assert_eq!(xs.read_string(&format!("{d}/domid")).unwrap(), "1");
    assert_eq!(xs.read_string(&format!("{d}/name")).unwrap(), "guest");
    let vm = "/vm/12345678-9abc-def0-0123-456789abcdef";
    assert_eq!(xs.read_string(&format!("{d}/vm")).unwrap(), vm);
    assert_eq!(xs.read_string(&format!("{vm}/name")).unwrap(), "guest");
    let max = xs.read_string(&format!("{d}/memory/static-max")).unwrap();
    assert_eq!(max, "524288");
    assert_eq!(xs.read_string(&format!("{d}/memory/target")).unwrap(), max);
    assert_eq!(
        xs.read_string(&format!("{d}/store/ring-ref")).unwrap(),
        "1044476"
    );
    assert_eq!(xs.read_string(&format!("{d}/console/port")).unwrap(), "2");
    assert_eq!(
        xs.read_string(&format!("{d}/cpu/1/availability")).unwrap(),
        "online"
    );
    for k in [
        "device",
        "data",
        "control/shutdown",
        "control/feature-poweroff",
    ] {
        assert_eq!(xs.get_perms(&format!("{d}/{k}")).unwrap().owner(), 1, "{k}");
    }
    assert_eq!(
        xs.get_perms(d).unwrap(),
        Perms::new(0, PermKind::None).with(1, PermKind::Read)
    );
    assert_eq!(xs.read_string("/local/domain/0/name").unwrap(), "Domain-0");
    xs.check_invariants().unwrap();
}

#[test]
fn tree_add_same_domain_twice_is_eexist() {
    let mut xs = XenstoreServer::new_domain(&cfg()).unwrap();
    assert_eq!(xs.add_domain(&cfg()), Err(XsError::Exist));
    assert_eq!(
        xs.add_domain(&DomainConfig::new(0, "x", UUID, 1)),
        Err(XsError::Inval)
    );
}

#[test]
fn tree_remove_domain_deletes_tree_and_fires_release() {
    let mut xs = XenstoreServer::new_domain(&cfg()).unwrap();
    xs.watch("@releaseDomain", "rel").unwrap();
    xs.take_events();
    xs.remove_domain(1).unwrap();
    assert!(!xs.exists("/local/domain/1"));
    assert!(xs.directory("/vm").unwrap().is_empty());
    assert_eq!(
        xs.take_events(),
        vec![WatchEvent {
            path: "@releaseDomain".into(),
            token: "rel".into()
        }]
    );
    assert_eq!(xs.remove_domain(1), Err(XsError::NoEnt));
    assert!(!xs.process(&MemRingPage::new()));
}

// ---- basic operations ----

#[test]
fn read_relative_path_resolves_under_domain() {
    let (mut xs, mut g) = setup();
    assert_eq!(ok(&mut xs, &mut g, MsgType::Read, 0, &z("domid")), b"1");
    assert_eq!(
        ok(
            &mut xs,
            &mut g,
            MsgType::Read,
            0,
            &z("/local/domain/1/name")
        ),
        b"guest"
    );
}

#[test]
fn read_missing_node_is_enoent_error_reply() {
    let (mut xs, mut g) = setup();
    let (r, _) = call(&mut xs, &mut g, MsgType::Read, 0, &z("nonexistent"));
    assert_eq!(r.ty, MsgType::Error as u32);
    assert_eq!(r.payload, b"ENOENT\0");
}

#[test]
fn read_unreadable_node_is_eacces() {
    let (mut xs, mut g) = setup();
    xs.write("/local/domain/0/secret", b"x").unwrap();
    assert_eq!(
        err(
            &mut xs,
            &mut g,
            MsgType::Read,
            0,
            &z("/local/domain/0/secret")
        ),
        "EACCES"
    );
}

#[test]
fn write_then_read_roundtrips_binary_value() {
    let (mut xs, mut g) = setup();
    let mut req = z("data/blob");
    req.extend_from_slice(b"a\0b\xff");
    ok(&mut xs, &mut g, MsgType::Write, 0, &req);
    assert_eq!(
        ok(&mut xs, &mut g, MsgType::Read, 0, &z("data/blob")),
        b"a\0b\xff"
    );
    assert_eq!(xs.read("/local/domain/1/data/blob").unwrap(), b"a\0b\xff");
}

#[test]
fn write_readonly_node_is_eacces() {
    let (mut xs, mut g) = setup();
    assert_eq!(
        err(
            &mut xs,
            &mut g,
            MsgType::Write,
            0,
            &write_req("name", "evil")
        ),
        "EACCES"
    );
    assert_eq!(
        err(
            &mut xs,
            &mut g,
            MsgType::Write,
            0,
            &write_req("control/new", "1")
        ),
        "EACCES"
    );
    assert_eq!(xs.read_string("/local/domain/1/name").unwrap(), "guest");
}

#[test]
fn write_control_feature_by_guest_succeeds() {
    let (mut xs, mut g) = setup();
    let r = ok(
        &mut xs,
        &mut g,
        MsgType::Write,
        0,
        &write_req("control/feature-poweroff", "1"),
    );
    assert_eq!(r, b"OK\0");
    assert_eq!(
        xs.read_string("/local/domain/1/control/feature-poweroff")
            .unwrap(),
        "1"
    );
}

#[test]
fn write_without_separator_is_einval() {
    let (mut xs, mut g) = setup();
    assert_eq!(err(&mut xs, &mut g, MsgType::Write, 0, b"data/x"), "EINVAL");
    assert_eq!(
        err(
            &mut xs,
            &mut g,
            MsgType::Write,
            0,
            &write_req("data//x", "1")
        ),
        "EINVAL"
    );
}

#[test]
fn mkdir_rm_directory_manage_children() {
    let (mut xs, mut g) = setup();
    ok(&mut xs, &mut g, MsgType::Mkdir, 0, &z("data/a/b"));
    ok(&mut xs, &mut g, MsgType::Mkdir, 0, &z("data/c"));
    ok(&mut xs, &mut g, MsgType::Mkdir, 0, &z("data/c"));
    assert_eq!(
        ok(&mut xs, &mut g, MsgType::Directory, 0, &z("data")),
        b"a\0c\0"
    );
    assert_eq!(ok(&mut xs, &mut g, MsgType::Read, 0, &z("data/a/b")), b"");
    ok(&mut xs, &mut g, MsgType::Rm, 0, &z("data/a"));
    assert_eq!(
        ok(&mut xs, &mut g, MsgType::Directory, 0, &z("data")),
        b"c\0"
    );
    ok(&mut xs, &mut g, MsgType::Rm, 0, &z("data/a"));
    assert_eq!(
        err(&mut xs, &mut g, MsgType::Rm, 0, &z("data/a/b")),
        "ENOENT"
    );
    assert_eq!(err(&mut xs, &mut g, MsgType::Rm, 0, &z("name")), "EACCES");
    assert_eq!(
        err(&mut xs, &mut g, MsgType::Directory, 0, &z("data/zz")),
        "ENOENT"
    );
    xs.check_invariants().unwrap();
}

#[test]
fn directory_standard_tree_lists_expected_children() {
    let (mut xs, mut g) = setup();
    let list = ok(
        &mut xs,
        &mut g,
        MsgType::Directory,
        0,
        &z("/local/domain/1"),
    );
    let names: Vec<&[u8]> = list
        .strip_suffix(b"\0")
        .unwrap()
        .split(|&b| b == 0)
        .collect();
    for want in [
        "domid", "name", "vm", "memory", "control", "device", "data", "console", "store", "cpu",
    ] {
        assert!(names.contains(&want.as_bytes()), "{want} missing");
    }
}

#[test]
fn directory_too_long_is_e2big_and_directory_part_pages_it() {
    let (mut xs, mut g) = setup();
    let long = "x".repeat(60);
    let mut want = Vec::new();
    for i in 0..200 {
        let name = format!("{long}{i:03}");
        xs.mkdir(&format!("/local/domain/1/data/many/{name}"))
            .unwrap();
        want.extend_from_slice(&z(&name));
    }
    assert_eq!(
        err(&mut xs, &mut g, MsgType::Directory, 0, &z("data/many")),
        "E2BIG"
    );
    let mut got = Vec::new();
    let mut gen = None;
    let mut pages = 0;
    loop {
        let r = ok(
            &mut xs,
            &mut g,
            MsgType::DirectoryPart,
            0,
            &zz("data/many", &got.len().to_string()),
        );
        pages += 1;
        let gpos = r.iter().position(|&b| b == 0).unwrap();
        let this_gen = r[..gpos].to_vec();
        assert_eq!(
            *gen.get_or_insert(this_gen.clone()),
            this_gen,
            "generation stable"
        );
        let body = &r[gpos + 1..];
        if let Some(rest) =
            body.strip_suffix(b"\0\0")
                .or(if body == b"\0" { Some(&b""[..]) } else { None })
        {
            got.extend_from_slice(rest);
            if !rest.is_empty() {
                got.push(0);
            }
            break;
        }
        got.extend_from_slice(body);
        assert!(pages < 10);
    }
    assert!(pages >= 4);
    assert_eq!(got, want);
    assert_eq!(
        err(
            &mut xs,
            &mut g,
            MsgType::DirectoryPart,
            0,
            &zz("data/many", "999999")
        ),
        "EINVAL"
    );
    assert_eq!(
        err(&mut xs, &mut g, MsgType::DirectoryPart, 0, &z("data/many")),
        "EINVAL"
    );
}

#[test]
fn perms_get_set_by_owner_succeed_and_by_other_fail() {
    let (mut xs, mut g) = setup();
    assert_eq!(
        ok(&mut xs, &mut g, MsgType::GetPerms, 0, &z("domid")),
        b"n0\0r1\0"
    );
    ok(
        &mut xs,
        &mut g,
        MsgType::Write,
        0,
        &write_req("data/p", "v"),
    );
    let mut req = z("data/p");
    req.extend_from_slice(b"n1\0r0\0b2\0");
    ok(&mut xs, &mut g, MsgType::SetPerms, 0, &req);
    assert_eq!(
        ok(&mut xs, &mut g, MsgType::GetPerms, 0, &z("data/p")),
        b"n1\0r0\0b2\0"
    );
    let mut steal = z("domid");
    steal.extend_from_slice(b"b1\0");
    assert_eq!(err(&mut xs, &mut g, MsgType::SetPerms, 0, &steal), "EACCES");
    let mut bad = z("data/p");
    bad.extend_from_slice(b"q1\0");
    assert_eq!(err(&mut xs, &mut g, MsgType::SetPerms, 0, &bad), "EINVAL");
    assert_eq!(
        err(&mut xs, &mut g, MsgType::SetPerms, 0, &z("data/p")),
        "EINVAL"
    );
}

#[test]
fn get_domain_path_returns_local_domain_path() {
    let (mut xs, mut g) = setup();
    assert_eq!(
        ok(&mut xs, &mut g, MsgType::GetDomainPath, 0, &z("7")),
        z("/local/domain/7")
    );
    assert_eq!(
        err(&mut xs, &mut g, MsgType::GetDomainPath, 0, &z("x")),
        "EINVAL"
    );
}

#[test]
fn request_unknown_or_privileged_type_is_refused() {
    let (mut xs, mut g) = setup();
    let (id, m) = g.encode(MsgType::Read, 0, b"");
    let mut m = m;
    m[0..4].copy_from_slice(&999u32.to_le_bytes());
    g.push(&m);
    assert!(xs.process(&g.page));
    let r = g.recv();
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].req_id, r[0].error()), (id, Some(&b"EINVAL"[..])));
    assert_eq!(r[0].ty, MsgType::Error as u32);
    for ty in [
        MsgType::Introduce,
        MsgType::Release,
        MsgType::Debug,
        MsgType::SetTarget,
    ] {
        assert_eq!(err(&mut xs, &mut g, ty, 0, &z("1")), "EACCES");
    }
    assert_eq!(
        err(&mut xs, &mut g, MsgType::WatchEvent, 0, &zz("a", "b")),
        "EINVAL"
    );
}

// ---- watches ----

#[test]
fn watch_registration_fires_initial_event_after_reply() {
    let (mut xs, mut g) = setup();
    let id = g.send(MsgType::Watch, 0, &zz("device", "tok"));
    assert!(xs.process(&g.page));
    let msgs = g.recv();
    assert_eq!(msgs.len(), 3);
    assert_eq!(
        (msgs[0].req_id, msgs[0].payload.as_slice()),
        (id, &b"OK\0"[..])
    );
    assert_eq!(msgs[1], event("device", "tok"));
    // The announcement of the one device xl creates for every domain.
    assert_eq!(msgs[2], event("device/suspend/event-channel", "tok"));
}

/// A guest restored with a device it did not have learns of it when it
/// watches its `device` directory again: one event per device, spelled as
/// the watch was, after the watch's own; other watches get none.
#[test]
fn watch_on_device_directory_announces_each_device() {
    let (mut xs, mut g) = setup();
    for p in ["vbd/51712/state", "vbd/51728/state", "vif/0/state"] {
        xs.write(&format!("/local/domain/1/device/{p}"), b"1")
            .unwrap();
    }
    let id = g.send(MsgType::Watch, 0, &zz("device", "tok"));
    assert!(xs.process(&g.page));
    let msgs = g.recv();
    assert_eq!(msgs[0].req_id, id);
    assert_eq!(
        msgs[1..].to_vec(),
        vec![
            event("device", "tok"),
            // xl's device/suspend/event-channel, which Linux enumerates at boot too.
            event("device/suspend/event-channel", "tok"),
            event("device/vbd/51712", "tok"),
            event("device/vbd/51728", "tok"),
            event("device/vif/0", "tok"),
        ]
    );
    let abs = zz("/local/domain/1/device", "abs");
    let (_, evs) = call(&mut xs, &mut g, MsgType::Watch, 0, &abs);
    assert_eq!(evs.len(), 5);
    assert_eq!(
        evs[2],
        event("/local/domain/1/device/vbd/51712", "abs"),
        "the absolute form"
    );
    let (_, evs) = call(&mut xs, &mut g, MsgType::Watch, 0, &zz("device/vbd", "sub"));
    assert_eq!(
        evs,
        vec![event("device/vbd", "sub")],
        "only the device directory"
    );
}

#[test]
fn watch_child_write_by_dom0_fires_relative_event() {
    let (mut xs, mut g) = setup();
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("device", "t1"));
    g.recv();
    xs.write("/local/domain/1/device/vbd/768/state", b"1")
        .unwrap();
    assert!(xs.wants_process(1));
    assert!(xs.process(&g.page));
    assert_eq!(g.recv(), vec![event("device/vbd/768/state", "t1")]);
    assert!(!xs.wants_process(1));
}

#[test]
fn watch_absolute_path_echoes_absolute_form() {
    let (mut xs, mut g) = setup();
    ok(
        &mut xs,
        &mut g,
        MsgType::Watch,
        0,
        &zz("/local/domain/1/control/shutdown", "s"),
    );
    g.recv();
    xs.write("/local/domain/1/control/shutdown", b"poweroff")
        .unwrap();
    xs.process(&g.page);
    assert_eq!(
        g.recv(),
        vec![event("/local/domain/1/control/shutdown", "s")]
    );
}

#[test]
fn watch_own_write_fires_event_after_reply() {
    let (mut xs, mut g) = setup();
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("data", "d"));
    let (r, evs) = call(
        &mut xs,
        &mut g,
        MsgType::Write,
        0,
        &write_req("data/x/y", "1"),
    );
    assert_eq!(r.payload, b"OK\0");
    assert_eq!(evs, vec![event("data/x/y", "d")]);
}

#[test]
fn watch_parent_removed_fires_with_watch_path() {
    let (mut xs, mut g) = setup();
    xs.write("/local/domain/1/data/a/b/c", b"1").unwrap();
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("data/a/b/c", "w"));
    g.recv();
    let (_, evs) = call(&mut xs, &mut g, MsgType::Rm, 0, &z("data/a"));
    assert_eq!(evs, vec![event("data/a/b/c", "w")]);
}

#[test]
fn watch_unreadable_change_is_not_delivered() {
    let (mut xs, mut g) = setup();
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("/", "root"));
    g.recv();
    xs.write("/local/domain/0/private", b"x").unwrap();
    assert!(!xs.wants_process(1));
    xs.write("/local/domain/1/data/public", b"x").unwrap();
    xs.process(&g.page);
    assert_eq!(g.recv(), vec![event("/local/domain/1/data/public", "root")]);
}

#[test]
fn watch_duplicate_is_eexist_and_unwatch_stops_events() {
    let (mut xs, mut g) = setup();
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("data", "t"));
    assert_eq!(
        err(&mut xs, &mut g, MsgType::Watch, 0, &zz("data", "t")),
        "EEXIST"
    );
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("data", "t2"));
    ok(&mut xs, &mut g, MsgType::Unwatch, 0, &zz("data", "t"));
    assert_eq!(
        err(&mut xs, &mut g, MsgType::Unwatch, 0, &zz("data", "t")),
        "ENOENT"
    );
    g.recv();
    xs.write("/local/domain/1/data/x", b"1").unwrap();
    xs.process(&g.page);
    assert_eq!(g.recv(), vec![event("data/x", "t2")]);
    assert_eq!(
        err(&mut xs, &mut g, MsgType::Watch, 0, &z("data")),
        "EINVAL"
    );
    assert_eq!(
        err(&mut xs, &mut g, MsgType::Watch, 0, &zz("bad//path", "t")),
        "EINVAL"
    );
}

#[test]
fn watch_quota_exceeded_is_e2big() {
    let q = Quotas {
        max_watches: 2,
        ..Quotas::default()
    };
    let mut xs = XenstoreServer::with_quotas(q);
    xs.add_domain(&cfg()).unwrap();
    let mut g = Guest::new();
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("a", "1"));
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("a", "2"));
    assert_eq!(
        err(&mut xs, &mut g, MsgType::Watch, 0, &zz("a", "3")),
        "E2BIG"
    );
    assert_eq!(xs.watch_count(1), 2);
}

#[test]
fn watch_special_release_domain_fires_for_guest() {
    let (mut xs, mut g) = setup();
    ok(
        &mut xs,
        &mut g,
        MsgType::Watch,
        0,
        &zz("@releaseDomain", "r"),
    );
    g.recv();
    xs.fire_special("@releaseDomain");
    xs.process(&g.page);
    assert_eq!(g.recv(), vec![event("@releaseDomain", "r")]);
}

#[test]
fn reset_watches_drops_watches_and_transactions() {
    let (mut xs, mut g) = setup();
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("data", "t"));
    let id = ok(&mut xs, &mut g, MsgType::TransactionStart, 0, b"\0");
    let tx: u32 = std::str::from_utf8(id.strip_suffix(b"\0").unwrap())
        .unwrap()
        .parse()
        .unwrap();
    ok(&mut xs, &mut g, MsgType::ResetWatches, 0, b"\0");
    assert_eq!(xs.watch_count(1), 0);
    assert_eq!(
        err(&mut xs, &mut g, MsgType::Read, tx, &z("domid")),
        "ENOENT"
    );
    g.recv();
    xs.write("/local/domain/1/data/x", b"1").unwrap();
    assert!(!xs.wants_process(1));
}

#[test]
fn events_over_queue_limit_are_dropped() {
    let q = Quotas {
        max_queued_bytes: 4096,
        ..Quotas::default()
    };
    let mut xs = XenstoreServer::with_quotas(q);
    xs.add_domain(&cfg()).unwrap();
    let mut g = Guest::new();
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("data", "t"));
    g.recv();
    for i in 0..500 {
        xs.write(&format!("/local/domain/1/data/n{i}"), b"1")
            .unwrap();
    }
    let mut got = 0;
    for _ in 0..100 {
        xs.process(&g.page);
        let m = g.recv();
        if m.is_empty() {
            break;
        }
        got += m.len();
    }
    assert!(got > 50 && got < 500, "got {got}");
}

// ---- dom0-side API ----

#[test]
fn dom0_watch_sees_guest_shutdown_ack_and_features() {
    let (mut xs, mut g) = setup();
    xs.watch("/local/domain/1/control", "ctl").unwrap();
    assert_eq!(
        xs.take_events(),
        vec![WatchEvent {
            path: "/local/domain/1/control".into(),
            token: "ctl".into()
        }]
    );
    ok(
        &mut xs,
        &mut g,
        MsgType::Write,
        0,
        &write_req("control/feature-reboot", "1"),
    );
    let ev = xs.take_events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].path, "/local/domain/1/control/feature-reboot");
    xs.unwatch("/local/domain/1/control", "ctl").unwrap();
    assert_eq!(
        xs.unwatch("/local/domain/1/control", "ctl"),
        Err(XsError::NoEnt)
    );
    ok(
        &mut xs,
        &mut g,
        MsgType::Write,
        0,
        &write_req("control/shutdown", ""),
    );
    assert!(xs.take_events().is_empty());
}

#[test]
fn dom0_write_oversized_value_is_e2big() {
    let mut xs = XenstoreServer::new();
    assert_eq!(
        xs.write("/x", &[b'a'; PAYLOAD_MAX + 1]),
        Err(XsError::TooBig)
    );
    xs.write("/x", &[b'a'; PAYLOAD_MAX]).unwrap();
    assert_eq!(xs.read("/x").unwrap().len(), PAYLOAD_MAX);
    assert_eq!(xs.read("/nope"), Err(XsError::NoEnt));
    assert_eq!(xs.read("bad//"), Err(XsError::Inval));
}

// ---- transactions ----

fn tx_start(xs: &mut XenstoreServer, g: &mut Guest) -> u32 {
    let id = ok(xs, g, MsgType::TransactionStart, 0, b"\0");
    let tx = std::str::from_utf8(id.strip_suffix(b"\0").unwrap())
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(tx, 0);
    tx
}

#[test]
fn transaction_commit_applies_and_fires_at_end() {
    let (mut xs, mut g) = setup();
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("data", "w"));
    g.recv();
    let tx = tx_start(&mut xs, &mut g);
    let (_, evs) = call(
        &mut xs,
        &mut g,
        MsgType::Write,
        tx,
        &write_req("data/k", "v"),
    );
    assert!(evs.is_empty(), "no event before commit");
    assert_eq!(ok(&mut xs, &mut g, MsgType::Read, tx, &z("data/k")), b"v");
    assert_eq!(
        err(&mut xs, &mut g, MsgType::Read, 0, &z("data/k")),
        "ENOENT"
    );
    let (r, evs) = call(&mut xs, &mut g, MsgType::TransactionEnd, tx, &z("T"));
    assert_eq!(r.payload, b"OK\0");
    assert_eq!(evs, vec![event("data/k", "w")]);
    assert_eq!(ok(&mut xs, &mut g, MsgType::Read, 0, &z("data/k")), b"v");
    assert_eq!(
        err(&mut xs, &mut g, MsgType::Read, tx, &z("data/k")),
        "ENOENT"
    );
    xs.check_invariants().unwrap();
}

#[test]
fn transaction_conflicting_write_is_eagain_and_not_applied() {
    let (mut xs, mut g) = setup();
    ok(
        &mut xs,
        &mut g,
        MsgType::Write,
        0,
        &write_req("data/state", "1"),
    );
    let tx = tx_start(&mut xs, &mut g);
    ok(&mut xs, &mut g, MsgType::Read, tx, &z("data/state"));
    ok(
        &mut xs,
        &mut g,
        MsgType::Write,
        tx,
        &write_req("data/ring-ref", "8"),
    );
    xs.write("/local/domain/1/data/state", b"2").unwrap();
    assert_eq!(
        err(&mut xs, &mut g, MsgType::TransactionEnd, tx, &z("T")),
        "EAGAIN"
    );
    assert!(!xs.exists("/local/domain/1/data/ring-ref"));
    // A retry succeeds.
    let tx = tx_start(&mut xs, &mut g);
    ok(&mut xs, &mut g, MsgType::Read, tx, &z("data/state"));
    ok(
        &mut xs,
        &mut g,
        MsgType::Write,
        tx,
        &write_req("data/ring-ref", "8"),
    );
    ok(&mut xs, &mut g, MsgType::TransactionEnd, tx, &z("T"));
    assert_eq!(
        xs.read_string("/local/domain/1/data/ring-ref").unwrap(),
        "8"
    );
}

#[test]
fn transaction_abort_discards_changes() {
    let (mut xs, mut g) = setup();
    let tx = tx_start(&mut xs, &mut g);
    ok(
        &mut xs,
        &mut g,
        MsgType::Write,
        tx,
        &write_req("data/k", "v"),
    );
    ok(&mut xs, &mut g, MsgType::Rm, tx, &z("device"));
    ok(&mut xs, &mut g, MsgType::TransactionEnd, tx, &z("F"));
    assert!(!xs.exists("/local/domain/1/data/k"));
    assert!(xs.exists("/local/domain/1/device"));
}

#[test]
fn transaction_bad_ids_and_args_are_refused() {
    let (mut xs, mut g) = setup();
    assert_eq!(
        err(&mut xs, &mut g, MsgType::Read, 77, &z("domid")),
        "ENOENT"
    );
    assert_eq!(
        err(&mut xs, &mut g, MsgType::TransactionEnd, 77, &z("T")),
        "ENOENT"
    );
    assert_eq!(
        err(&mut xs, &mut g, MsgType::TransactionEnd, 0, &z("T")),
        "ENOENT"
    );
    let tx = tx_start(&mut xs, &mut g);
    assert_eq!(
        err(&mut xs, &mut g, MsgType::TransactionStart, tx, b"\0"),
        "EBUSY"
    );
    assert_eq!(
        err(&mut xs, &mut g, MsgType::TransactionEnd, tx, &z("X")),
        "EINVAL"
    );
    // The transaction survives a malformed end.
    ok(&mut xs, &mut g, MsgType::TransactionEnd, tx, &z("T"));
}

#[test]
fn transaction_quota_exceeded_is_enospc() {
    let (mut xs, mut g) = setup();
    let n = xs.quotas().max_transactions;
    let ids: Vec<u32> = (0..n).map(|_| tx_start(&mut xs, &mut g)).collect();
    let mut uniq = ids.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), n);
    assert_eq!(
        err(&mut xs, &mut g, MsgType::TransactionStart, 0, b"\0"),
        "ENOSPC"
    );
    ok(&mut xs, &mut g, MsgType::TransactionEnd, ids[0], &z("F"));
    tx_start(&mut xs, &mut g);
}

#[test]
fn transaction_node_quota_checked_at_commit() {
    let q = Quotas {
        max_nodes: 20,
        ..Quotas::default()
    };
    let mut xs = XenstoreServer::with_quotas(q);
    xs.add_domain(&cfg()).unwrap();
    let mut g = Guest::new();
    let t1 = tx_start(&mut xs, &mut g);
    let t2 = tx_start(&mut xs, &mut g);
    // Each transaction alone fits the quota; together they do not.
    let mut created = 0;
    for i in 0..20 {
        let (r, _) = call(
            &mut xs,
            &mut g,
            MsgType::Write,
            t1,
            &write_req(&format!("data/a{i}"), ""),
        );
        if r.error().is_some() {
            break;
        }
        ok(
            &mut xs,
            &mut g,
            MsgType::Write,
            t2,
            &write_req(&format!("device/b{i}"), ""),
        );
        created += 1;
    }
    assert!(created > 0);
    ok(&mut xs, &mut g, MsgType::TransactionEnd, t1, &z("T"));
    assert_eq!(
        err(&mut xs, &mut g, MsgType::TransactionEnd, t2, &z("T")),
        "ENOSPC"
    );
}

// ---- ring transport ----

#[test]
fn ring_indexes_near_wrap_are_served_correctly() {
    let (mut xs, mut g) = setup();
    let start = u32::MAX - 300;
    for off in [REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD] {
        g.page.store_u32(off, start);
    }
    for i in 0..50 {
        let path = format!("data/wrap{i}");
        ok(
            &mut xs,
            &mut g,
            MsgType::Write,
            0,
            &write_req(&path, &"v".repeat(i * 7)),
        );
        let v = ok(&mut xs, &mut g, MsgType::Read, 0, &z(&path));
        assert_eq!(v, "v".repeat(i * 7).as_bytes());
    }
    assert!(g.page.load_u32(REQ_PROD) < start, "indexes wrapped");
}

#[test]
fn ring_partial_message_across_kicks_is_reassembled() {
    let (mut xs, mut g) = setup();
    let (id, m) = g.encode(MsgType::Read, 0, &z("name"));
    g.push(&m[..7]);
    assert!(xs.process(&g.page), "consuming bytes notifies");
    assert!(g.recv().is_empty());
    g.push(&m[7..HEADER_LEN + 2]);
    assert!(xs.process(&g.page));
    assert!(g.recv().is_empty());
    assert!(!xs.process(&g.page), "nothing new: no notify");
    g.push(&m[HEADER_LEN + 2..]);
    assert!(xs.process(&g.page));
    let r = g.recv();
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].req_id, r[0].payload.as_slice()), (id, &b"guest"[..]));
}

#[test]
fn ring_large_request_beyond_ring_size_streams_through() {
    let (mut xs, mut g) = setup();
    let val = "q".repeat(2000);
    let (id, m) = g.encode(MsgType::Write, 0, &write_req("data/big", &val));
    for chunk in m.chunks(RING_SIZE) {
        g.push(chunk);
        xs.process(&g.page);
    }
    let r = g.recv();
    assert_eq!((r[0].req_id, r[0].payload.as_slice()), (id, &b"OK\0"[..]));
    assert_eq!(xs.read("/local/domain/1/data/big").unwrap(), val.as_bytes());
}

#[test]
fn ring_all_queued_requests_drained_in_one_call() {
    let (mut xs, mut g) = setup();
    let ids: Vec<u32> = (0..20)
        .map(|_| g.send(MsgType::Read, 0, &z("domid")))
        .collect();
    assert!(xs.process(&g.page));
    let r = g.recv();
    assert_eq!(r.iter().map(|m| m.req_id).collect::<Vec<_>>(), ids);
}

#[test]
fn ring_full_response_ring_queues_and_flushes_later() {
    let (mut xs, mut g) = setup();
    xs.write("/local/domain/1/data/big", &[b'z'; 900]).unwrap();
    let ids: Vec<u32> = (0..3)
        .map(|_| g.send(MsgType::Read, 0, &z("data/big")))
        .collect();
    assert!(xs.process(&g.page));
    // The ring holds only the first reply and part of the second; the
    // third request waits (backpressure).
    assert!(xs.wants_process(1));
    let rsp_used = g
        .page
        .load_u32(RSP_PROD)
        .wrapping_sub(g.page.load_u32(RSP_CONS));
    assert_eq!(rsp_used as usize, RING_SIZE);
    let mut got = Vec::new();
    for _ in 0..10 {
        got.extend(g.recv());
        xs.process(&g.page);
    }
    assert_eq!(got.iter().map(|m| m.req_id).collect::<Vec<_>>(), ids);
    assert!(got.iter().all(|m| m.payload == [b'z'; 900]));
    assert!(!xs.wants_process(1));
}

#[test]
fn ring_producer_too_far_ahead_breaks_connection() {
    let (mut xs, mut g) = setup();
    g.page.store_u32(REQ_PROD, 1025);
    assert!(xs.process(&g.page));
    assert_eq!(xs.connection_error(1), Some(ConnError::Ring));
    assert_eq!(g.page.load_u32(ERROR), 2);
    assert!(g.recv().is_empty());
    assert!(!xs.process(&g.page), "a broken connection is not served");
}

#[test]
fn ring_corrupt_response_indexes_break_connection() {
    let (mut xs, mut g) = setup();
    g.page.store_u32(RSP_CONS, 5000);
    g.send(MsgType::Read, 0, &z("domid"));
    xs.process(&g.page);
    assert_eq!(xs.connection_error(1), Some(ConnError::Ring));
}

#[test]
fn ring_oversized_header_breaks_connection_with_protocol_error() {
    let (mut xs, mut g) = setup();
    g.push(
        &Header {
            ty: 2,
            req_id: 1,
            tx_id: 0,
            len: 4097,
        }
        .encode(),
    );
    xs.process(&g.page);
    assert_eq!(xs.connection_error(1), Some(ConnError::Proto));
    assert_eq!(g.page.load_u32(ERROR), 3);
    assert!(g.recv().is_empty());
}

#[test]
fn ring_reconnect_request_resets_connection() {
    let (mut xs, mut g) = setup();
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("data", "t"));
    g.page.store_u32(REQ_PROD, 99_999);
    xs.process(&g.page);
    assert_eq!(xs.connection_error(1), Some(ConnError::Ring));
    g.page.store_u32(CONNECTION, RECONNECT);
    assert!(xs.process(&g.page));
    assert_eq!(g.page.load_u32(CONNECTION), CONNECTED);
    assert_eq!(g.page.load_u32(ERROR), 0);
    assert_eq!(g.page.load_u32(REQ_CONS), g.page.load_u32(REQ_PROD));
    assert_eq!(xs.connection_error(1), None);
    assert_eq!(xs.watch_count(1), 0);
    g.rx.clear();
    assert_eq!(ok(&mut xs, &mut g, MsgType::Read, 0, &z("domid")), b"1");
}

#[test]
fn ring_features_advertised_on_first_process() {
    let (mut xs, g) = setup();
    let page = MemRingPage::new();
    assert!(!xs.process(&page));
    assert_eq!(
        page.load_u32(SERVER_FEATURES),
        FEATURE_RECONNECTION | FEATURE_ERROR
    );
    assert_eq!(
        g.page.load_u32(SERVER_FEATURES),
        FEATURE_RECONNECTION | FEATURE_ERROR
    );
    assert_eq!(xs.process_domain(9, &page), Err(XsError::NoEnt));
}

#[test]
fn ring_two_domains_watch_across_connections() {
    let mut xs = XenstoreServer::new_domain(&cfg()).unwrap();
    let mut c2 = cfg();
    c2.domid = 2;
    c2.uuid[0] = 0xff;
    xs.add_domain(&c2).unwrap();
    let mut g1 = Guest::new();
    let mut g2 = Guest::new();
    // Domain 2 watches domain 1's data; it may read it only once shared.
    let id = g2.send(MsgType::Watch, 0, &zz("/local/domain/1/data/shared", "x"));
    xs.process_domain(2, &g2.page).unwrap();
    let m = g2.recv();
    assert_eq!(m[0].req_id, id);
    assert_eq!(m.len(), 2);
    ok(
        &mut xs,
        &mut g1,
        MsgType::Write,
        0,
        &write_req("data/shared", "1"),
    );
    assert!(!xs.wants_process(2), "unreadable: not delivered");
    let mut sp = z("data/shared");
    sp.extend_from_slice(b"n1\0r2\0");
    ok(&mut xs, &mut g1, MsgType::SetPerms, 0, &sp);
    ok(
        &mut xs,
        &mut g1,
        MsgType::Write,
        0,
        &write_req("data/shared", "2"),
    );
    assert!(xs.wants_process(2));
    xs.process_domain(2, &g2.page).unwrap();
    let evs = g2.recv();
    assert_eq!(evs.len(), 2, "set_perms and write events");
    assert!(evs
        .iter()
        .all(|e| e.payload == zz("/local/domain/1/data/shared", "x")));
    g2.send(MsgType::Read, 0, &z("/local/domain/1/data/shared"));
    xs.process_domain(2, &g2.page).unwrap();
    assert_eq!(g2.recv()[0].payload, b"2");
}

// ---- property tests ----

/// Payloads built from pieces a guest might send: paths good and bad,
/// numbers, tokens, perms, random bytes.
fn payload_strategy() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"data".to_vec()),
        Just(b"data/a".to_vec()),
        Just(b"data/a/b".to_vec()),
        Just(b"device".to_vec()),
        Just(b"/local/domain/1".to_vec()),
        Just(b"/".to_vec()),
        Just(b"name".to_vec()),
        Just(b"@releaseDomain".to_vec()),
        Just(b"T".to_vec()),
        Just(b"F".to_vec()),
        Just(b"0".to_vec()),
        Just(b"b1".to_vec()),
        Just(b"n0".to_vec()),
        Just(b"r2".to_vec()),
        Just(b"//".to_vec()),
        prop::collection::vec(any::<u8>(), 0..40),
        "[a-z/]{0,30}".prop_map(|s| s.into_bytes()),
    ];
    prop::collection::vec(piece, 0..5).prop_map(|ps| {
        let mut out = Vec::new();
        for p in ps {
            out.extend_from_slice(&p);
            out.push(0);
        }
        out
    })
}

fn request_strategy() -> impl Strategy<Value = (u32, u32, Vec<u8>)> {
    (
        0u32..25,
        prop_oneof![Just(0u32), 1u32..4, any::<u32>()],
        payload_strategy(),
    )
}

/// Sends `reqs` (chunked by `chunks`) through a well-behaved guest and
/// returns every message the server sent back, in order.
fn run_session(reqs: &[(u32, u32, Vec<u8>)], chunks: &[usize]) -> (Vec<Msg>, XenstoreServer) {
    let (mut xs, mut g) = setup();
    let mut stream = Vec::new();
    for (i, (ty, tx, p)) in reqs.iter().enumerate() {
        stream.extend_from_slice(&encode_msg(*ty, i as u32 + 1, *tx, p));
    }
    let mut out = Vec::new();
    let mut pos = 0;
    let mut k = 0;
    let mut idle = 0;
    while idle < 3 {
        let space = g.req_space();
        let want = chunks.get(k).copied().unwrap_or(usize::MAX).max(1);
        k += 1;
        let n = want.min(space).min(stream.len() - pos);
        g.push(&stream[pos..pos + n]);
        pos += n;
        xs.process(&g.page);
        let got = g.recv();
        if n == 0 && got.is_empty() {
            idle += 1;
        } else {
            idle = 0;
        }
        out.extend(got);
        assert!(
            xs.connection_error(1).is_none(),
            "well-formed stream broke the connection"
        );
    }
    assert_eq!(pos, stream.len(), "server stopped consuming requests");
    (out, xs)
}

proptest! {
    #[test]
    fn prop_any_page_contents_never_panic_or_overfill(
        bytes in prop::collection::vec(any::<u8>(), PAGE_SIZE),
        req_cons in any::<u32>(),
        req_delta in 0u32..1100,
        rsp_cons in any::<u32>(),
        rsp_delta in 0u32..1100,
        conn in 0u32..3,
    ) {
        let (mut xs, _) = setup();
        let page = MemRingPage::from_bytes(&bytes);
        page.store_u32(REQ_CONS, req_cons);
        page.store_u32(REQ_PROD, req_cons.wrapping_add(req_delta));
        page.store_u32(RSP_CONS, rsp_cons);
        page.store_u32(RSP_PROD, rsp_cons.wrapping_add(rsp_delta));
        page.store_u32(CONNECTION, conn);
        for _ in 0..3 {
            let (rsp_before, req_before) = (page.load_u32(RSP_PROD), page.load_u32(REQ_CONS));
            xs.process(&page);
            // The server only moves its indexes within a consistent ring.
            if page.load_u32(RSP_PROD) != rsp_before {
                let used = page.load_u32(RSP_PROD).wrapping_sub(page.load_u32(RSP_CONS));
                prop_assert!(used as usize <= RING_SIZE);
            }
            if page.load_u32(REQ_CONS) != req_before && page.load_u32(CONNECTION) != RECONNECT {
                let pending = page.load_u32(REQ_PROD).wrapping_sub(page.load_u32(REQ_CONS));
                prop_assert!(pending as usize <= RING_SIZE);
            }
        }
        prop_assert!(xs.check_invariants().is_ok());
    }

    #[test]
    fn prop_every_request_gets_one_reply(
        reqs in prop::collection::vec(request_strategy(), 1..40),
        chunks in prop::collection::vec(1usize..700, 0..60),
    ) {
        let (out, xs) = run_session(&reqs, &chunks);
        let replies: Vec<&Msg> = out.iter().filter(|m| !m.is_event()).collect();
        prop_assert_eq!(replies.len(), reqs.len());
        for (i, r) in replies.iter().enumerate() {
            prop_assert_eq!(r.req_id, i as u32 + 1);
            prop_assert_eq!(r.tx_id, reqs[i].1);
            prop_assert!(r.ty == reqs[i].0 || r.ty == MsgType::Error as u32);
        }
        prop_assert!(xs.check_invariants().is_ok());
    }

    #[test]
    fn prop_chunking_does_not_change_replies(
        reqs in prop::collection::vec(request_strategy(), 1..25),
        chunks in prop::collection::vec(1usize..64, 1..200),
    ) {
        let (whole, _) = run_session(&reqs, &[]);
        let (split, _) = run_session(&reqs, &chunks);
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn prop_garbage_stream_never_panics(
        data in prop::collection::vec(any::<u8>(), 0..3000),
        chunks in prop::collection::vec(1usize..1024, 1..20),
    ) {
        let (mut xs, mut g) = setup();
        let mut pos = 0;
        for c in chunks {
            if xs.connection_error(1).is_some() || pos >= data.len() {
                break;
            }
            let n = c.min(g.req_space()).min(data.len() - pos);
            g.push(&data[pos..pos + n]);
            pos += n;
            xs.process(&g.page);
            for m in g.recv() {
                prop_assert!(m.payload.len() <= PAYLOAD_MAX);
            }
        }
        prop_assert!(xs.check_invariants().is_ok());
    }
}

/// A guest that writes more request bytes right after the server loaded
/// `req_prod` and before it published `req_cons`: Linux's `xb_write` then
/// sends no notification (it saw `req_cons` behind its old `req_prod`).
struct RacingPage {
    inner: MemRingPage,
    /// Bytes the guest appends at the next load of `req_prod`.
    late: parking_lot::Mutex<Option<Vec<u8>>>,
}

impl RingPage for RacingPage {
    fn load_u32(&self, off: usize) -> u32 {
        let v = self.inner.load_u32(off);
        if off == REQ_PROD {
            if let Some(data) = self.late.lock().take() {
                ring_write(&self.inner, REQ, RING_SIZE, v, &data);
                self.inner
                    .store_u32(REQ_PROD, v.wrapping_add(data.len() as u32));
            }
        }
        v
    }
    fn store_u32(&self, off: usize, v: u32) {
        self.inner.store_u32(off, v)
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        self.inner.read(off, buf)
    }
    fn write(&self, off: usize, data: &[u8]) {
        self.inner.write(off, data)
    }
}

#[test]
fn ring_request_body_written_while_header_is_read_is_served_without_a_new_notification() {
    // Seen with Linux: a transaction_end's 2-byte body stayed in the ring
    // behind a consumed header, and xenbus waited forever.
    let mut xs = XenstoreServer::new_domain(&cfg()).unwrap();
    let mut g = Guest::new();
    let (id, msg) = g.encode(MsgType::Write, 0, &write_req("data/race", "late"));
    let page = RacingPage {
        inner: MemRingPage::from_bytes(&g.page.snapshot()),
        late: parking_lot::Mutex::new(Some(msg[HEADER_LEN..].to_vec())),
    };
    // The header arrives and is notified; the body lands during that call.
    let prod = page.inner.load_u32(REQ_PROD);
    ring_write(&page.inner, REQ, RING_SIZE, prod, &msg[..HEADER_LEN]);
    page.inner
        .store_u32(REQ_PROD, prod.wrapping_add(HEADER_LEN as u32));
    let notify = xs.process_domain(DOMID, &page).unwrap();
    assert!(notify, "the reply must be notified");
    assert_eq!(
        page.inner.load_u32(REQ_CONS),
        page.inner.load_u32(REQ_PROD),
        "the whole request is consumed in the same call"
    );
    let mut g2 = Guest {
        page: MemRingPage::from_bytes(&page.inner.snapshot()),
        next_req: id + 1,
        rx: Vec::new(),
    };
    let replies = g2.recv();
    assert_eq!(replies.len(), 1, "one reply: {replies:?}");
    assert_eq!(replies[0].req_id, id);
    assert_eq!(replies[0].ty, MsgType::Write as u32);
    assert_eq!(xs.read("/local/domain/1/data/race").unwrap(), b"late");
}

#[test]
fn watched_covers_the_path_and_its_children_not_siblings() {
    let (mut xs, mut g) = setup();
    assert!(!xs.watched(1, "/local/domain/1/control/shutdown"));
    ok(&mut xs, &mut g, MsgType::Watch, 0, &zz("control", "t"));
    assert!(xs.watched(1, "/local/domain/1/control/shutdown"));
    assert!(xs.watched(1, "/local/domain/1/control"));
    assert!(!xs.watched(1, "/local/domain/1/controlx"));
    assert!(!xs.watched(1, "/local/domain/1/data"));
    assert!(
        !xs.watched(2, "/local/domain/1/control"),
        "another domain's"
    );
}

/// Issue 14: a transaction open when the guest was saved is reopened by the
/// restore; the guest's reads and writes in it work, its commit fails with
/// EAGAIN (a conflict: the guest retries) and lands nothing, an abort
/// succeeds, and a new transaction gets an id of its own and commits.
#[test]
fn transactions_open_at_a_save_commit_with_eagain_after_the_restore() {
    let (mut a, mut g) = setup();
    let t1 = tx_start(&mut a, &mut g);
    let t2 = tx_start(&mut a, &mut g);
    ok(
        &mut a,
        &mut g,
        MsgType::Write,
        t1,
        &write_req("data/x", "in-tx"),
    );
    let ids = a.export_transactions(DOMID);
    assert_eq!(ids, vec![t1, t2]);

    let (mut b, mut g) = setup();
    b.import(DOMID, &a.export_nodes(), &[]).unwrap();
    b.import_transactions(DOMID, &ids).unwrap();
    assert_eq!(ok(&mut b, &mut g, MsgType::Read, t1, &z("name")), b"guest");
    ok(
        &mut b,
        &mut g,
        MsgType::Write,
        t1,
        &write_req("data/y", "again"),
    );
    assert_eq!(
        err(&mut b, &mut g, MsgType::TransactionEnd, t1, &z("T")),
        "EAGAIN"
    );
    for p in ["/local/domain/1/data/x", "/local/domain/1/data/y"] {
        assert!(b.read_string(p).is_err(), "{p} landed");
    }
    assert_eq!(
        err(&mut b, &mut g, MsgType::TransactionEnd, t1, &z("T")),
        "ENOENT"
    );
    ok(&mut b, &mut g, MsgType::TransactionEnd, t2, &z("F"));
    let t3 = tx_start(&mut b, &mut g);
    assert!(t3 != t1 && t3 != t2, "{t3}");
    ok(
        &mut b,
        &mut g,
        MsgType::Write,
        t3,
        &write_req("data/z", "1"),
    );
    ok(&mut b, &mut g, MsgType::TransactionEnd, t3, &z("T"));
    assert_eq!(b.read_string("/local/domain/1/data/z").unwrap(), "1");
    assert!(b.import_transactions(DOMID, &[0]).is_err());
    assert!(b.import_transactions(9, &[5]).is_err());
}
