use super::*;
use crate::config::nic::{Mac, NicSpec};
use proptest::prelude::*;

fn d(s: &str) -> DiskSpec {
    DiskSpec::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn e(s: &str) -> String {
    DiskSpec::parse(s).expect_err(s).to_string()
}

#[test]
fn disk_man_page_equivalent_forms_parse_the_same() {
    let a = d("/dev/vg/guest-volume,,hda");
    for s in [
        "/dev/vg/guest-volume,raw,hda,rw",
        "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
        "raw:/dev/vg/guest-volume,hda,w",
    ] {
        assert_eq!(d(s), a, "{s}");
    }
    assert_eq!(a.target, "/dev/vg/guest-volume");
    assert_eq!(a.devid, 768);
    assert!(!a.read_only);
    let c = d("/root/image.iso,,hdc,cdrom");
    for s in [
        "/root/image.iso,,hdc,,cdrom",
        "/root/image.iso,raw,hdc,devtype=cdrom",
        "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
        "raw:/root/image.iso,hdc:cdrom,ro",
    ] {
        assert_eq!(d(s), c, "{s}");
    }
    assert!(c.cdrom && c.read_only);
    assert_eq!(c.devid, 22 << 8);
}

#[test]
fn disk_positional_and_prefixed_forms_fill_the_right_fields() {
    let x = d("/img.raw,raw,xvda,rw");
    assert_eq!(
        (x.target.as_str(), x.format, x.devid, x.read_only),
        ("/img.raw", DiskFormat::Raw, 51712, false)
    );
    let p = d("phy:/dev/vg/lv,xvda,w");
    assert_eq!(
        (p.target.as_str(), p.devid, p.read_only),
        ("/dev/vg/lv", 51712, false)
    );
    let f = d("file:/x.img,hda,w");
    assert_eq!((f.target.as_str(), f.devid), ("/x.img", 768));
    let t = d("tap:aio:/x.img,xvdb,r");
    assert_eq!(
        (t.target.as_str(), t.devid, t.read_only),
        ("/x.img", 51728, true)
    );
    let q = d("tap:qcow2:/x.qcow2,xvdc,w");
    assert_eq!(q.format, DiskFormat::Qcow2);
    let k = d("vdev=xvda,format=raw,target=/img,with,commas.raw");
    assert_eq!(k.target, "/img,with,commas.raw");
    let k = d("format=qcow2,vdev=xvdb,access=ro,target=/a b,c.qcow2");
    assert_eq!(
        (k.target.as_str(), k.format, k.read_only),
        ("/a b,c.qcow2", DiskFormat::Qcow2, true)
    );
    let b = d("vdev=xvda,backendtype=qdisk,target=/x");
    assert_eq!(b.backendtype.as_deref(), Some("qdisk"));
    assert!(!d("/x,,xvda,no-discard").discard);
}

#[test]
fn disk_persistent_grants_flag_is_off_unless_given() {
    assert!(!d("vdev=xvda,target=/x").persistent_grants);
    assert!(d("vdev=xvda,persistent-grants,target=/x").persistent_grants);
    assert!(d("/x,raw,xvda,rw,persistent-grants").persistent_grants);
    assert!(!d("persistent-grants,no-persistent-grants,vdev=xvda,target=/x").persistent_grants);
    let s = d("vdev=xvda,persistent-grants,target=/x").to_string();
    assert!(s.contains(",persistent-grants,"), "{s}");
}

#[test]
fn disk_vdev_numbers_match_xen_vbd_interface() {
    for (v, n) in [
        ("xvda", 51712),
        ("xvdb", 51728),
        ("xvdb2", 51730),
        ("xvdp", 202 << 8 | 15 << 4),
        ("xvdq", 268_439_552),
        ("xvda16", 1 << 28 | 16),
        ("xvdaa", 1 << 28 | 26 << 8),
        ("xvdtq37", 1 << 28 | 536 << 8 | 37),
        ("d536p37", 1 << 28 | 536 << 8 | 37),
        ("d1p2", 202 << 8 | 1 << 4 | 2),
        ("d0", 51712),
        ("hda", 768),
        ("hda1", 769),
        ("hdb", 832),
        ("hdc", 5632),
        ("hdd63", 22 << 8 | 64 | 63),
        ("sda", 2048),
        ("sdb3", 2048 | 16 | 3),
        ("sdp15", 2048 | 15 << 4 | 15),
        ("51712", 51712),
        ("0xca00", 51712),
        ("0145000", 51712),
    ] {
        assert_eq!(vdev_number(v), Some(n), "{v}");
    }
    for bad in [
        "hde",
        "sdq",
        "sda16",
        "xvda0",
        "xvda01",
        "hda64",
        "xvd",
        "vda",
        "",
        "0x",
        "4294967295",
        "d1048576p0",
        "d0p256",
    ] {
        assert_eq!(vdev_number(bad), None, "{bad}");
    }
}

#[test]
fn disk_errors_name_the_spec_and_the_key() {
    assert_eq!(
        e("/x.img,vhd,xvda"),
        "disk \"/x.img,vhd,xvda\": format=vhd: xenkvm reads raw and qcow2 images (convert with `qemu-img convert -O qcow2`)"
    );
    assert!(e("/x.img,raw").contains(": vdev: missing"));
    assert!(e("target=/x.qcow2,format=qcow2,vdev=xvda").contains("put it last"));
    assert!(e("/x.img,raw,xvdA").contains(": vdev=xvdA: not a virtual device"));
    assert!(e("/x.img,raw,xvda,rx").contains(": access=rx: unknown value for access"));
    assert!(e("/x,raw,xvda,rw,extra").contains(": extra: too many positional"));
    assert!(e("bogus=1,/x,raw,xvda").contains(": bogus: unknown parameter"));
    assert!(e("script=foo,/x,,xvda").contains(": script: block scripts"));
    assert!(e("nbd:host:1,xvda,w").contains(": nbd:: block scripts"));
    assert!(e("zork:/x,xvda,w").contains(": zork:: unknown deprecated disk prefix"));
    assert!(e("vdev=xvda").contains(": target: missing"));
    assert!(e("backend=dd,/x,,xvda").contains(": backend=dd: driver domains"));
    assert!(e("/x,raw,xvda,vdev=xvdb").contains(": vdev: given twice"));
    assert!(e("format=raw,format=qcow2,/x,,xvda").contains("format given twice"));
}

#[test]
fn nic_specs_parse_and_validate() {
    let n = NicSpec::parse("mac=00:16:3E:74:3d:76,model=rtl8139,bridge=xenbr0").unwrap();
    assert_eq!(n.mac, Some(Mac([0, 0x16, 0x3e, 0x74, 0x3d, 0x76])));
    assert_eq!(n.bridge.as_deref(), Some("xenbr0"));
    assert_eq!(NicSpec::parse("").unwrap(), NicSpec::default());
    let n = NicSpec::parse(" vifname=vif-web , mtu=9000, type=vif, ip=10.0.0.2 10.0.0.3").unwrap();
    assert_eq!(
        (n.vifname.as_deref(), n.mtu, n.ip.as_deref()),
        (Some("vif-web"), Some(9000), Some("10.0.0.2 10.0.0.3"))
    );
    let (_, w) = NicSpec::parse_with_warnings("script=vif-bridge").unwrap();
    assert!(
        w[0].contains("script=vif-bridge: xenkvm runs no hotplug scripts"),
        "{w:?}"
    );
    for (spec, needle) in [
        (
            "mac=00:16:3e:74:3d",
            "\"mac=00:16:3e:74:3d\": mac=00:16:3e:74:3d: not a MAC",
        ),
        (
            "mac=01:16:3e:74:3d:76",
            ": mac=01:16:3e:74:3d:76: a multicast address",
        ),
        ("mac=0:16:3e:74:3d:76", "not a MAC"),
        ("bridge=a/b", ": bridge=a/b: not a Linux interface name"),
        ("vifname=0123456789abcdef", "not a Linux interface name"),
        ("mtu=20", ": mtu=20: not an MTU"),
        ("rate=10Mb/s", ": rate: not offered"),
        ("wibble=1", ": wibble: unknown vif parameter"),
        ("bridge=a,bridge=b", ": bridge: given twice"),
        ("type=tap", ": type=tap: unknown value"),
    ] {
        let err = NicSpec::parse(spec).expect_err(spec).to_string();
        assert!(err.starts_with("vif \""), "{err}");
        assert!(err.contains(needle), "{spec}: {err}");
    }
}

#[test]
fn nic_generated_mac_is_stable_in_xen_oui_and_differs_per_vif() {
    let a = Mac::generated("web", 0);
    assert_eq!(a, Mac::generated("web", 0));
    assert_eq!(&a.0[..3], &[0x00, 0x16, 0x3e]);
    assert_eq!(a.0[3] & 0x80, 0);
    assert_ne!(a, Mac::generated("web", 1));
    assert_ne!(a, Mac::generated("db", 0));
    let n = NicSpec::default();
    assert_eq!(n.mac_for("web", 0), a);
    let fixed = NicSpec::parse("mac=00:16:3e:00:00:01").unwrap();
    assert_eq!(fixed.mac_for("web", 0).to_string(), "00:16:3e:00:00:01");
}

fn vdev_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        ("[a-z]{1,3}", prop::option::of(1u32..256))
            .prop_map(|(l, p)| format!("xvd{l}{}", p.map(|p| p.to_string()).unwrap_or_default())),
        ("[a-d]", prop::option::of(1u32..64))
            .prop_map(|(l, p)| format!("hd{l}{}", p.map(|p| p.to_string()).unwrap_or_default())),
        ("[a-p]", prop::option::of(1u32..16))
            .prop_map(|(l, p)| format!("sd{l}{}", p.map(|p| p.to_string()).unwrap_or_default())),
        (0u32..(1 << 20), 0u32..256).prop_map(|(d, p)| format!("d{d}p{p}")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn disk_parse_arbitrary_input_never_panics(s in any::<String>()) {
        let _ = DiskSpec::parse(&s);
        let _ = vdev_number(&s);
    }

    #[test]
    fn disk_parse_spec_shaped_input_never_panics(
        parts in prop::collection::vec(prop_oneof![
            Just("target=".to_string()), Just("phy:".to_string()), Just("tap:aio:".to_string()),
            Just("raw:".to_string()), Just("cdrom".to_string()), Just("".to_string()),
            "[a-z]{1,6}=[a-z0-9:/]{0,6}", "[a-z0-9:/.]{0,8}", vdev_strategy(),
        ], 0..7)
    ) {
        let s = parts.join(",");
        if let Ok(d) = DiskSpec::parse(&s) {
            // Whatever parses prints back to itself.
            prop_assert_eq!(DiskSpec::parse(&d.to_string()).ok(), Some(d));
        }
    }

    #[test]
    fn disk_canonical_form_round_trips(
        target in "/[a-zA-Z0-9_./, -]{1,24}",
        qcow in any::<bool>(),
        vdev in vdev_strategy(),
        ro in any::<bool>(),
        discard in any::<bool>(),
        persistent in any::<bool>(),
    ) {
        let Some(devid) = vdev_number(&vdev) else { return Ok(()) };
        let spec = DiskSpec {
            target,
            format: if qcow { DiskFormat::Qcow2 } else { DiskFormat::Raw },
            vdev: vdev.clone(),
            devid,
            read_only: ro,
            cdrom: false,
            discard,
            backendtype: None,
            persistent_grants: persistent,
        };
        prop_assert_eq!(DiskSpec::parse(&spec.to_string()), Ok(spec.clone()));
        // The positional form gives the same disk when the target has no comma.
        if !spec.target.contains(',') && !spec.target.contains(' ') && discard && !persistent {
            let pos = format!("{},{},{},{}", spec.target, spec.format.name(), vdev, if ro { "ro" } else { "rw" });
            prop_assert_eq!(DiskSpec::parse(&pos), Ok(spec));
        }
    }

    #[test]
    fn nic_parse_arbitrary_input_never_panics(s in any::<String>()) {
        let _ = NicSpec::parse_with_warnings(&s);
        let _ = Mac::parse(&s);
    }

    #[test]
    fn nic_canonical_form_round_trips(
        mac in prop::option::of(any::<[u8; 6]>()),
        bridge in prop::option::of("[a-z][a-z0-9]{0,10}"),
        vifname in prop::option::of("[a-z][a-z0-9.]{0,10}"),
        mtu in prop::option::of(68u16..),
        devid in prop::option::of(0u32..65536),
    ) {
        let mac = mac.map(|mut m| { m[0] &= 0xfe; m[5] |= 1; Mac(m) });
        let n = NicSpec { mac, bridge, vifname, mtu, devid, ..NicSpec::default() };
        let (back, _) = NicSpec::parse_with_warnings(&n.to_string()).unwrap();
        prop_assert_eq!(back, n);
    }
}
