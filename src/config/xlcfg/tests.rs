use super::*;
use proptest::prelude::*;

fn cfg(text: &str) -> XlConfig {
    XlConfig::from_text(text, "guest.cfg", &[]).unwrap_or_else(|e| panic!("{e}"))
}

fn err(text: &str) -> String {
    XlConfig::from_text(text, "guest.cfg", &[])
        .expect_err("must be refused")
        .to_string()
}

const EXAMPLE: &str = r#"
# A Debian guest, as xl users write it.
name = "web"
type = 'pvh'
memory = 512
maxmem = 512
vcpus = 2
kernel = "/boot/vmlinuz"
ramdisk = "/boot/initrd.gz"
extra = "console=hvc0"
root = "/dev/xvda1 ro"
disk = [ 'format=raw, vdev=xvda, access=rw, target=/srv/web.img',
         "phy:/dev/vg/data,xvdb,w",   # a comment inside the list
       ]
vif = [ 'mac=00:16:3e:01:02:03,bridge=xenbr0', '' ]
on_poweroff = "destroy"; on_reboot = "restart"
on_crash = 'destroy'
acpi = 1
localtime = 0
"#;

#[test]
fn xlcfg_example_parses_every_key() {
    let c = cfg(EXAMPLE);
    assert_eq!(c.name.as_deref(), Some("web"));
    assert_eq!(c.guest_type, GuestType::Pvh);
    assert_eq!(c.memory_mib, Some(512));
    assert_eq!(c.vcpus, Some(2));
    assert_eq!(c.kernel.as_deref(), Some(Path::new("/boot/vmlinuz")));
    assert_eq!(c.ramdisk.as_deref(), Some(Path::new("/boot/initrd.gz")));
    assert_eq!(
        c.cmdline.as_deref(),
        Some("root=/dev/xvda1 ro console=hvc0")
    );
    assert_eq!(c.disks.len(), 2);
    assert_eq!(c.disks[0].target, "/srv/web.img");
    assert_eq!(c.disks[1].devid, 51728);
    assert_eq!(c.nics.len(), 2);
    assert_eq!(c.nics[0].bridge.as_deref(), Some("xenbr0"));
    assert_eq!(c.on_reboot, Some(OnEvent::Restart));
    assert_eq!(c.on_crash, Some(OnEvent::Destroy));
    assert_eq!(
        c.unused_warning("guest.cfg").as_deref(),
        Some("guest.cfg: ignoring keys xenkvm does not use: acpi (line 18), localtime (line 19)")
    );
}

#[test]
fn xlcfg_overrides_replace_and_append_as_xl_does() {
    let c = XlConfig::from_text(
        "memory = 256\nextra = 'a'\nvif = ['']\n",
        "g.cfg",
        &[
            "memory=1024".into(),
            "extra += ' b'".into(),
            "vif += 'bridge=br1'".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.memory_mib, Some(1024));
    assert_eq!(c.cmdline.as_deref(), Some("a b"));
    assert_eq!(c.nics.len(), 2);
    let c = XlConfig::from_text("acpi = 1\n", "g.cfg", &["hpet=1".into()]).unwrap();
    assert_eq!(
        c.unused_warning("g.cfg").as_deref(),
        Some("g.cfg: ignoring keys xenkvm does not use: acpi (line 1), hpet (command line)")
    );
    let e = XlConfig::from_text("", "g.cfg", &["viridian=1".into()]).unwrap_err();
    assert_eq!(e.to_string(), "command line:1: viridian: not supported by xenkvm: Hyper-V enlightenments (viridian) are not offered");
}

#[test]
fn xlcfg_cmdline_wins_over_root_and_extra() {
    let c = cfg("cmdline = 'console=hvc0'\nroot = '/dev/xvda'\n");
    assert_eq!(c.cmdline.as_deref(), Some("console=hvc0"));
    assert!(c
        .warnings
        .iter()
        .any(|w| w.contains("root and extra are ignored")));
}

#[test]
fn xlcfg_unsupported_keys_are_refused_with_file_line_and_key() {
    assert_eq!(
        err("name = 'x'\n\nviridian = 1\n"),
        "guest.cfg:3: viridian: not supported by xenkvm: Hyper-V enlightenments (viridian) are not offered"
    );
    for (text, needle) in [
        ("pci = [ '01:00.0' ]", "guest.cfg:1: pci: not supported"),
        (
            "device_model_version = 'qemu-xen'",
            "guest.cfg:1: device_model_version: not supported",
        ),
        ("vnc = 1", ": vnc: not supported"),
        ("vnclisten = '0.0.0.0'", ": vnclisten: not supported"),
        ("sdl = 0", ": sdl: not supported"),
        ("usb = 1", ": usb: not supported"),
        ("usbdevice = 'tablet'", ": usbdevice: not supported"),
        ("soundhw = 'hda'", ": soundhw: not supported"),
        (
            "type = 'pv'",
            "guest.cfg:1: type: \"pv\" guests are not supported",
        ),
        (
            "on_crash = 'preserve'",
            "guest.cfg:1: on_crash: \"preserve\" is not offered by xenkvm",
        ),
        (
            "on_reboot = 'soft-reset'",
            ": on_reboot: \"soft-reset\" is not offered",
        ),
        (
            "on_poweroff = 'bogus'",
            ": on_poweroff: unknown action \"bogus\"",
        ),
        (
            "memory = 8",
            "guest.cfg:1: memory: 8 is not between 16 and 65536",
        ),
        ("memory = '12x'", ": memory: \"12x\" is not a number"),
        ("vcpus = 33", ": vcpus: 33 is not between 1 and 32"),
        (
            "\n\ndisk = [ '/x,vhd,xvda' ]",
            "guest.cfg:3: disk: disk \"/x,vhd,xvda\": format=vhd:",
        ),
        (
            "vif = [ 'mac=zz' ]",
            "guest.cfg:1: vif: vif \"mac=zz\": mac=zz: not a MAC",
        ),
        (
            "disk = ['/a,,xvda', '/b,,d0p0']",
            ": disk: vdev=xvda and vdev=d0p0 are the same virtual device (51712)",
        ),
    ] {
        let e = err(text);
        assert!(e.contains(needle), "{text}: {e}");
    }
}

#[test]
fn xlcfg_syntax_errors_name_the_line() {
    for (text, needle) in [
        (
            "memory = 512\nkernel = /boot/vmlinuz\n",
            "guest.cfg:2: syntax error at \"/boot/vmlinuz\"",
        ),
        (
            "name = \"x\nmemory = 1",
            "guest.cfg:1: a string is not closed on its line",
        ),
        (
            "disk = [ 'a' 'b' ]",
            "guest.cfg:1: disk: expected ',' or ']' in the list",
        ),
        (
            "Memory = 512",
            "guest.cfg:1: syntax error at \"Memory\" (xl.cfg is not Python",
        ),
        (
            "memory 512",
            "guest.cfg:1: memory: expected '=' after the key",
        ),
        (
            "memory = 512 1024",
            "guest.cfg:1: memory: expected the end of the line",
        ),
        (
            "kernel = vmlinuz",
            "guest.cfg:1: kernel: expected a quoted string, a number or a list, not vmlinuz",
        ),
        (
            "\n\n\ndisk = [\n'a',\n",
            "guest.cfg:6: disk: expected a value",
        ),
    ] {
        let e = err(text);
        assert!(e.contains(needle), "{text:?}: {e}");
    }
}

#[test]
fn xlcfg_lists_span_lines_with_comments_and_trailing_commas() {
    let c = cfg("vif = [\n  'bridge=a', # first\n\n  'bridge=b',\n]\nvcpus=0x2\n");
    assert_eq!(c.nics.len(), 2);
    assert_eq!(c.vcpus, Some(2));
    assert_eq!(cfg("vif = []\n").nics.len(), 0);
    assert_eq!(cfg("name = 'it\\'s'").name.as_deref(), Some("it's"));
}

#[test]
fn xlcfg_type_hvm_and_builder() {
    assert_eq!(cfg("type = 'hvm'").guest_type, GuestType::Hvm);
    assert_eq!(cfg("builder = 'hvm'").guest_type, GuestType::Hvm);
    assert_eq!(cfg("").guest_type, GuestType::Unspecified);
    assert!(err("builder = 'generic'").contains("builder: \"generic\" (PV) guests"));
    let c = cfg("vcpus = 1\nmaxvcpus = 4\nmemory = 256\nmaxmem = 1024");
    assert_eq!(c.vcpus, Some(1));
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    let c = cfg("maxvcpus = 4");
    assert_eq!(c.vcpus, None, "xl: vcpus default to 1 online");
    assert!(
        c.warnings[0].contains("the guest has 1"),
        "{:?}",
        c.warnings
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn xlcfg_arbitrary_text_never_panics(s in any::<String>()) {
        let _ = XlConfig::from_text(&s, "f", &[]);
    }

    #[test]
    fn xlcfg_config_shaped_text_never_panics(
        lines in prop::collection::vec(
            (prop::sample::select(vec!["name", "memory", "vcpus", "disk", "vif", "kernel", "on_crash", "type", "maxvcpus", "extra", "x"]),
             prop::sample::select(vec!["=", "+=", " = ", ""]),
             prop_oneof![
                 "[0-9a-fx]{0,6}".prop_map(|s| s),
                 "'[ -~]{0,12}'",
                 "\"[ -~]{0,12}\"",
                 "\\[[ -~\n]{0,20}\\]",
             ]),
            0..8)
    ) {
        let text: String = lines.iter().map(|(k, op, v)| format!("{k}{op}{v}\n")).collect();
        let _ = XlConfig::from_text(&text, "f", &[]);
    }
}
