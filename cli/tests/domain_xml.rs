//! The `<domain>` XML is read exactly (libvirt's formatdomain): a disk's
//! `snapshot=` default, disks vsnap cannot snapshot (network, volume,
//! nvme, vhostuser, lun) recorded and refused by name when a snapshot
//! includes them, writable floppies, `type='block'` and `<domain type>`
//! kept by `dumpxml`. Real `vsnap`, real `qemu-img`, guests shut off.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// The fixture: [`Work`] (a state directory and `vm/`), with this file's
/// own methods.
type Fx = Work;

impl Work {
    /// An image `name` in the work directory.
    fn image(&self, name: &str, format: &str) -> PathBuf {
        let f = self.work.join(name);
        qemu_img_create(&f, format, MIB);
        f
    }

    /// Define domain `name` from `<domain type=TYPE>` with these `<devices>`.
    #[track_caller]
    fn define(&self, name: &str, ty: &str, devices: &str) -> Out {
        let f = self.work.join(format!("{name}.xml"));
        std::fs::write(
            &f,
            format!("<domain type='{ty}'><name>{name}</name><devices>{devices}</devices></domain>"),
        )
        .unwrap();
        let out = self.vsnap(&["domain", "define", p(&f)]);
        std::fs::remove_file(&f).unwrap();
        out
    }

    /// The steps of `snapshot create DOM s1 EXTRA... --dry-run`.
    #[track_caller]
    fn dry_steps(&self, dom: &str, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["--json", "snapshot", "create", dom, "s1", "--dry-run"];
        args.extend(extra);
        let v = self.vsnap(&args).ok().json();
        v["steps"]
            .as_array()
            .unwrap_or_else(|| panic!("no steps: {v}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    }
}

/// A file `<disk>`.
fn file_disk(target: &str, src: &Path, ty: &str, attrs: &str) -> String {
    format!(
        "<disk type='file' device='disk'{attrs}><driver name='qemu' type='{ty}'/>\
         <source file='{}'/><target dev='{target}' bus='virtio'/></disk>",
        src.display()
    )
}

const RBD: &str = "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
    <source protocol='rbd' name='pool/image'><host name='mon1.example.org' port='6789'/></source>\
    <target dev='vdc' bus='virtio'/></disk>";

/// Internal snapshots inside a qcow2 image.
fn internal_snapshots(img: &Path) -> String {
    Out::from_command("qemu-img", &["snapshot", "-l", "-U", p(img)])
        .ok()
        .stdout
        .clone()
}

#[test]
fn a_disk_with_snapshot_no_gets_no_step_unless_named() {
    let fx = Fx::new("dx-snapno");
    let a = fx.image("a.qcow2", "qcow2");
    let b = fx.image("b.raw", "raw");
    let c = fx.image("c.qcow2", "qcow2");
    fx.define(
        "d",
        "kvm",
        &[
            file_disk("vda", &a, "qcow2", ""),
            file_disk("vdb", &b, "raw", " snapshot='no'"),
            file_disk("vdc", &c, "qcow2", " snapshot='external'"),
        ]
        .concat(),
    )
    .ok();
    let steps = fx.dry_steps("d", &[]);
    let all = steps.join("\n");
    assert!(
        !all.contains(p(&b)),
        "a snapshot='no' disk got a step:\n{all}"
    );
    // vda: vsnap's default for a shut-off qcow2 (internal); vdc: external,
    // as its snapshot= says.
    assert!(all.contains(&format!("'s1' in {}", a.display())), "{all}");
    assert!(all.contains(p(&fx.work.join("c.s1.qcow2"))), "{all}");
    // The request wins over the domain's default.
    let named = fx.dry_steps("d", &["--disk", "vdb=external"]).join("\n");
    assert!(named.contains(p(&fx.work.join("b.s1.qcow2"))), "{named}");
    let named = fx.dry_steps("d", &["--disk", "vdc=internal"]).join("\n");
    assert!(!named.contains("c.s1.qcow2"), "{named}");
    // For real.
    fx.vsnap(&["snapshot", "create", "d", "s1"]).ok();
    assert!(internal_snapshots(&a).contains("s1"));
    assert!(fx.work.join("c.s1.qcow2").is_file());
    assert!(!fx.work.join("b.s1.qcow2").exists());
    let info = fx
        .vsnap(&["--json", "snapshot", "info", "d", "s1"])
        .ok()
        .json();
    let disks = info["disks"].as_array().unwrap();
    let vdb = disks.iter().find(|x| x["target"] == "vdb").unwrap();
    assert_eq!(vdb["snapshot"], "no", "{info}");
    let xml = fx.vsnap(&["domain", "dumpxml", "d"]).ok().stdout.clone();
    assert!(xml.contains("snapshot='no'"), "{xml}");
    assert!(xml.contains(p(&fx.work.join("c.s1.qcow2"))), "{xml}");
    fx.vsnap(&["domain", "check", "d"]).ok();
}

#[test]
fn a_network_disk_is_recorded_refused_in_a_snapshot_and_left_out_on_request() {
    let fx = Fx::new("dx-net");
    let a = fx.image("a.raw", "raw");
    let out = fx.define(
        "d",
        "kvm",
        &[file_disk("vda", &a, "raw", ""), RBD.into()].concat(),
    );
    out.ok()
        .stdout_has(&["2 disk(s)", "vdc", "network disk", "--disk vdc=no"]);
    let info = fx.vsnap(&["--json", "domain", "info", "d"]).ok().json();
    let vdc = &info["disks"][1];
    assert_eq!(vdc["target"], "vdc", "{info}");
    assert!(vdc["source"].is_null(), "{info}");
    assert!(
        vdc["unsupported"]
            .as_str()
            .unwrap()
            .contains("rbd pool/image"),
        "{info}"
    );
    fx.refused(
        &[&a],
        &["snapshot", "create", "d", "s1"],
        &[
            "disk vdc",
            "network disk",
            "rbd",
            "mon1.example.org:6789",
            "--disk vdc=no",
            "snapshot='no'",
        ],
    );
    // Named, it is refused too.
    fx.refused(
        &[&a],
        &["snapshot", "create", "d", "s1", "--disk", "vdc=external"],
        &["disk vdc", "network disk", "--disk vdc=no"],
    );
    let steps = fx.dry_steps("d", &["--disk", "vdc=no"]).join("\n");
    assert!(!steps.contains("vdc") && !steps.contains("rbd"), "{steps}");
    fx.vsnap(&["snapshot", "create", "d", "s1", "--disk", "vdc=no"])
        .ok();
    let ov = fx.work.join("a.s1.qcow2");
    assert!(ov.is_file());
    assert_eq!(
        Out::from_command("qemu-img", &["info", "-U", "--output=json", p(&ov)]).json()
            ["backing-filename"],
        p(&a)
    );
    // The catalog: vda on its overlay, vdc as it was given.
    let xml = fx.vsnap(&["domain", "dumpxml", "d"]).ok().stdout.clone();
    assert!(
        xml.contains(&format!("<source file='{}'/>", ov.display())),
        "{xml}"
    );
    assert!(xml.contains("<disk type='network' device='disk'>"), "{xml}");
    assert!(
        xml.contains("<source protocol='rbd' name='pool/image'>"),
        "{xml}"
    );
    assert!(
        xml.contains("<host name='mon1.example.org' port='6789'/>"),
        "{xml}"
    );
    fx.vsnap(&["domain", "check", "d"]).ok();
    fx.vsnap(&["snapshot", "dumpxml", "d", "s1"]).ok();
    // The same disk with snapshot='no' in the domain: left out by default.
    let b = fx.image("b.raw", "raw");
    let rbd_no = RBD.replace("device='disk'>", "device='disk' snapshot='no'>");
    fx.define(
        "e",
        "kvm",
        &[file_disk("vda", &b, "raw", ""), rbd_no].concat(),
    )
    .ok();
    fx.vsnap(&["snapshot", "create", "e", "s1"]).ok();
    assert!(fx.work.join("b.s1.qcow2").is_file());
}

#[test]
fn volume_nvme_vhostuser_and_lun_disks_define_and_are_refused_by_name() {
    let fx = Fx::new("dx-other");
    let a = fx.image("a.raw", "raw");
    for (i, (disk, target, words)) in [
        (
            "<disk type='volume' device='disk'><driver name='qemu' type='raw'/>\
             <source pool='blk-pool0' volume='blk-pool0-vol0'/><target dev='vdd' bus='virtio'/></disk>",
            "vdd",
            &["storage-pool volume", "blk-pool0-vol0"][..],
        ),
        (
            "<disk type='nvme' device='disk'><driver name='qemu' type='raw'/>\
             <source type='pci' managed='yes' namespace='1'><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>\
             <target dev='vde' bus='virtio'/></disk>",
            "vde",
            &["NVMe", "0000:01:00.0"],
        ),
        (
            "<disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/>\
             <source type='unix' path='/tmp/vhost-blk.sock'><reconnect enabled='yes' timeout='10'/></source>\
             <target dev='vdf' bus='virtio'/></disk>",
            "vdf",
            &["vhost-user", "/tmp/vhost-blk.sock"],
        ),
        (
            "<disk type='block' device='lun'><driver name='qemu' type='raw'/>\
             <source dev='/dev/vsnap-no-such-lun'/><target dev='sda' bus='scsi'/></disk>",
            "sda",
            &["SCSI LUN", "/dev/vsnap-no-such-lun"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dom = format!("d{i}");
        fx.define(&dom, "kvm", &[file_disk("vda", &a, "raw", ""), disk.into()].concat())
            .ok()
            .stdout_has(&["2 disk(s)", target]);
        let leave_out = format!("--disk {target}=no");
        let mut w = vec![target, leave_out.as_str()];
        w.extend(words);
        fx.refused(&[&a], &["snapshot", "create", &dom, "s1"], &w);
        let steps = fx.dry_steps(&dom, &["--disk", &format!("{target}=no")]);
        assert_eq!(steps.len(), 2, "{steps:?}"); // vda's overlay, the catalog
        let xml = fx.vsnap(&["domain", "dumpxml", &dom]).ok().stdout.clone();
        let kind = disk.split('\'').nth(1).unwrap();
        assert!(xml.contains(&format!("<disk type='{kind}'")), "{xml}");
        fx.vsnap(&["domain", "check", &dom]).ok();
    }
    // For real, once: the lun left out.
    fx.vsnap(&["snapshot", "create", "d3", "s1", "--disk", "sda=no"])
        .ok();
    assert!(fx.work.join("a.s1.qcow2").is_file());
}

#[test]
fn a_manual_disk_is_accepted_in_the_domain_and_refused_unless_named() {
    let fx = Fx::new("dx-manual");
    let a = fx.image("a.raw", "raw");
    let m = fx.image("m.raw", "raw");
    fx.define(
        "d",
        "kvm",
        &[
            file_disk("vda", &a, "raw", ""),
            file_disk("vdm", &m, "raw", " snapshot='manual'"),
        ]
        .concat(),
    )
    .ok();
    fx.refused(
        &[&a, &m],
        &["snapshot", "create", "d", "s1"],
        &[
            "disk vdm",
            "snapshot='manual'",
            "--disk vdm=no",
            "<disk name='vdm' snapshot='no'/>",
        ],
    );
    let named = fx.dry_steps("d", &["--disk", "vdm=external"]).join("\n");
    assert!(named.contains("m.s1.qcow2"), "{named}");
    // Left out through <domainsnapshot>.
    let x = fx.work.join("snap.xml");
    std::fs::write(
        &x,
        "<domainsnapshot><name>s1</name><disks><disk name='vdm' snapshot='no'/></disks></domainsnapshot>",
    )
    .unwrap();
    fx.vsnap(&["snapshot", "create", "d", "--xml", p(&x)]).ok();
    assert!(fx.work.join("a.s1.qcow2").is_file());
    assert!(!fx.work.join("m.s1.qcow2").exists());
    fx.vsnap(&["domain", "dumpxml", "d"])
        .ok()
        .stdout_has(&["snapshot='manual'"]);
}

#[test]
fn a_writable_floppy_is_a_disk_and_read_only_media_are_named() {
    let fx = Fx::new("dx-floppy");
    let a = fx.image("a.raw", "raw");
    let fd = fx.image("fd.img", "raw");
    let iso = fx.image("x.iso", "raw");
    let out = fx.define(
        "d",
        "kvm",
        &format!(
            "{}<disk type='file' device='floppy'><driver name='qemu' type='raw'/><source file='{}'/><target dev='fda' bus='fdc'/></disk>\
             <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{}'/><target dev='sdb' bus='sata'/><readonly/></disk>",
            file_disk("vda", &a, "raw", ""),
            fd.display(),
            iso.display()
        ),
    );
    out.ok()
        .stdout_has(&["2 disk(s)", "left out: sdb (cdrom, read-only media)"]);
    fx.vsnap(&["snapshot", "create", "d", "s1"]).ok();
    assert!(
        fx.work.join("fd.s1.qcow2").is_file(),
        "the floppy was not snapshotted"
    );
    assert!(!fx.work.join("x.s1.qcow2").exists());
    fx.vsnap(&["domain", "dumpxml", "d"])
        .ok()
        .stdout_has(&["device='floppy'"]);
}

#[test]
fn dumpxml_keeps_type_block_and_the_domain_type() {
    let fx = Fx::new("dx-block");
    let backing = fx.image("blk.raw", "raw");
    let dev = LoopDev::attach(&backing);
    let a = fx.image("a.qcow2", "qcow2");
    fx.define(
        "d",
        "qemu",
        &format!(
            "{}<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{}'/><target dev='vdb'/></disk>",
            file_disk("vda", &a, "qcow2", ""),
            dev.0
        ),
    )
    .ok();
    let xml = fx.vsnap(&["domain", "dumpxml", "d"]).ok().stdout.clone();
    assert!(xml.starts_with("<domain type='qemu'>"), "{xml}");
    assert!(
        xml.contains(&format!(
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{}'/>",
            dev.0
        )),
        "{xml}"
    );
    // What dumpxml wrote defines the same domain.
    let f = fx.work.join("again.xml");
    std::fs::write(&f, xml.replace("<name>d</name>", "<name>e</name>")).unwrap();
    fx.vsnap(&["domain", "define", p(&f)]).ok();
    let again = fx.vsnap(&["domain", "dumpxml", "e"]).ok().stdout.clone();
    assert_eq!(again, xml.replace("<name>d</name>", "<name>e</name>"));
    // A domain type that is not QEMU's is refused.
    let xen = fx.work.join("xen.xml");
    std::fs::write(&xen, "<domain type='xen'><name>x</name></domain>").unwrap();
    fx.refused(&[], &["domain", "define", p(&xen)], &["type='xen'", "kvm"]);
}

#[test]
fn what_vsnap_does_not_act_on_is_kept_by_dumpxml_and_by_the_snapshot() {
    let fx = Fx::new("dx-keep");
    let a = fx.image("a.raw", "raw");
    let extras = "<serial>S-1</serial><boot order='1'/>\
        <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>\
        <iotune><total_bytes_sec>1000000</total_bytes_sec></iotune>";
    let disk = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>\
         <source file='{}'/><backingStore/><target dev='vda' bus='virtio'/>{extras}</disk>\
         <interface type='network'><source network='default'/></interface>",
        a.display()
    );
    fx.define("d", "kvm", &disk).ok();
    let given = format!("<domain type='kvm'><name>d</name><devices>{disk}</devices></domain>");
    assert_eq!(fx.vsnap(&["domain", "dumpxml", "d"]).ok().stdout, given);
    // An offline external snapshot: vda moves to its overlay.
    fx.vsnap(&["snapshot", "create", "d", "s1", "--disk-only"])
        .ok();
    let ov = fx.work.join("a.s1.qcow2");
    assert!(ov.is_file());
    let now = fx.vsnap(&["domain", "dumpxml", "d"]).ok().stdout.clone();
    assert!(
        now.contains(&format!(
            "<driver name='qemu' type='qcow2' cache='none'/><source file='{}'/><target dev='vda' bus='virtio'/>{extras}</disk>",
            ov.display()
        )),
        "{now}"
    );
    assert!(
        !now.contains("<backingStore/>"),
        "stale 'no backing file' kept: {now}"
    );
    assert!(now.contains("<interface type='network'>"), "{now}");
    // The snapshot keeps the domain as it was, extras included.
    let snap = fx
        .vsnap(&["snapshot", "dumpxml", "d", "s1"])
        .ok()
        .stdout
        .clone();
    assert!(
        snap.contains(&format!("<source file='{}'/><backingStore/>", a.display())),
        "{snap}"
    );
    assert!(snap.contains(extras), "{snap}");
    // dumpxml's output defines the same domain again.
    let f = fx.work.join("again.xml");
    std::fs::write(&f, now.replace("<name>d</name>", "<name>e</name>")).unwrap();
    fx.vsnap(&["domain", "define", p(&f)]).ok();
    assert_eq!(
        fx.vsnap(&["domain", "dumpxml", "e"]).ok().stdout,
        now.replace("<name>d</name>", "<name>e</name>")
    );
}
