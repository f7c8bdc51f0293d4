//! `<domainsnapshot>` documents against a shut-off domain, read as libvirt
//! reads them (formatsnapshot) or refused with the reason, nothing
//! changed. Real `vsnap`, real `qemu-img`. (Against the running test
//! guest: `live.rs`, case `xml_read_as_libvirt_reads_it`; the parser's
//! whole table: `engine/src/domsnap/request.rs` unit tests.)

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

struct Fx {
    _tmp: TempDir,
    root: PathBuf,
    state: PathBuf,
    vm: PathBuf,
}

impl Fx {
    /// Domain `d`: vda and vdb qcow2, vdc raw, in `vm/`.
    fn new(tag: &str) -> Fx {
        let tmp = TempDir::new(tag);
        let root = tmp.path.clone();
        let state = root.join("state");
        let vm = root.join("vm");
        std::fs::create_dir(&vm).unwrap();
        qemu_img_create(&vm.join("a.qcow2"), "qcow2", 4 * MIB);
        qemu_img_create(&vm.join("b.qcow2"), "qcow2", 4 * MIB);
        qemu_img_create(&vm.join("c.raw"), "raw", 4 * MIB);
        let dom = root.join("d.xml");
        std::fs::write(
            &dom,
            domain_xml(
                "d",
                &[
                    ("vda", &vm.join("a.qcow2"), Some("qcow2")),
                    ("vdb", &vm.join("b.qcow2"), Some("qcow2")),
                    ("vdc", &vm.join("c.raw"), Some("raw")),
                ],
            ),
        )
        .unwrap();
        vsnap(&state, &["domain", "define", p(&dom)]).ok();
        Fx {
            _tmp: tmp,
            root,
            state,
            vm,
        }
    }

    fn doc(&self, name: &str, inner: &str) -> PathBuf {
        let f = self.root.join(format!("{name}.xml"));
        let inner = inner.replace("VM/", &format!("{}/", self.vm.display()));
        std::fs::write(
            &f,
            format!("<domainsnapshot><name>{name}</name>{inner}</domainsnapshot>"),
        )
        .unwrap();
        f
    }

    /// The disks of the dry-run's snapshot: (target, mode, overlay file
    /// name), and its memory.
    fn planned(&self, xml: &Path, extra: &[&str]) -> (Vec<(String, String, String)>, Value) {
        let args = [
            &[
                "--json",
                "snapshot",
                "create",
                "d",
                "--xml",
                p(xml),
                "--dry-run",
            ][..],
            extra,
        ]
        .concat();
        let v = vsnap(&self.state, &args).ok().json();
        let disks = v["snapshot"]["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["target"].as_str().unwrap().to_string(),
                    d["snapshot"].as_str().unwrap().to_string(),
                    d["overlay"]
                        .as_str()
                        .map(|o| {
                            Path::new(o)
                                .file_name()
                                .unwrap()
                                .to_string_lossy()
                                .into_owned()
                        })
                        .unwrap_or_default(),
                )
            })
            .collect();
        (disks, v["snapshot"]["memory"].clone())
    }

    fn refused(&self, xml: &Path, extra: &[&str], words: &[&str]) {
        let args = [&["snapshot", "create", "d", "--xml", p(xml)][..], extra].concat();
        refused_untouched(&self.state, &[&self.vm], &[], &args, words);
    }
}

fn d(t: &str, mode: &str, file: &str) -> (String, String, String) {
    (t.into(), mode.into(), file.into())
}

#[test]
fn domainsnapshot_documents_plan_what_libvirt_would_do() {
    let fx = Fx::new("dsx-read");
    // A <source> without snapshot= is external; excluded disks get nothing.
    let x = fx.doc(
        "s1",
        "<disks><disk name='vda'><source file='VM/a.ovl'/></disk>\
         <disk name='vdb' snapshot='no'/><disk name='vdc' snapshot='no'/></disks>",
    );
    assert_eq!(
        fx.planned(&x, &[]).0,
        vec![
            d("vda", "external", "a.ovl"),
            d("vdb", "no", ""),
            d("vdc", "no", "")
        ]
    );
    // A <driver type='qcow2'/> alone is external too, at the default place.
    let x = fx.doc(
        "s2",
        "<disks><disk name='vdb'><driver type='qcow2'/></disk><disk name='vdc' snapshot='no'/></disks>",
    );
    assert_eq!(
        fx.planned(&x, &[]).0,
        vec![
            d("vda", "internal", ""),
            d("vdb", "external", "b.s2.qcow2"),
            d("vdc", "no", "")
        ]
    );
    // <memory snapshot='no'/> of a shut-off guest: the disks' defaults.
    let x = fx.doc(
        "s3",
        "<memory snapshot='no'/><disks><disk name='vdc' snapshot='no'/></disks>",
    );
    let (disks, memory) = fx.planned(&x, &[]);
    assert_eq!(
        disks,
        vec![
            d("vda", "internal", ""),
            d("vdb", "internal", ""),
            d("vdc", "no", "")
        ]
    );
    assert_eq!(memory, "no");
    // --disk-only of a shut-off guest: external overlays of every disk
    // chosen, as virsh snapshot-create --disk-only (before: internal).
    assert_eq!(
        fx.planned(&x, &["--disk-only"]).0,
        vec![
            d("vda", "external", "a.s3.qcow2"),
            d("vdb", "external", "b.s3.qcow2"),
            d("vdc", "no", "")
        ]
    );
    // --disk T=... replaces what the document asked for T.
    let x = fx.doc(
        "s4",
        "<disks><disk name='vda' snapshot='internal'/><disk name='vdc' snapshot='no'/></disks>",
    );
    assert_eq!(
        fx.planned(&x, &["--disk", "vda=no"]).0,
        vec![
            d("vda", "no", ""),
            d("vdb", "internal", ""),
            d("vdc", "no", "")
        ]
    );

    // And for real: only vda gets its overlay; vdb and vdc are untouched.
    let x = fx.doc(
        "r1",
        "<disks><disk name='vda'><source file='VM/a.r1.ovl'/></disk>\
         <disk name='vdb' snapshot='no'/><disk name='vdc' snapshot='no'/></disks>",
    );
    let b = hash_file(&fx.vm.join("b.qcow2"));
    let c = hash_file(&fx.vm.join("c.raw"));
    vsnap(&fx.state, &["snapshot", "create", "d", "--xml", p(&x)]).ok();
    assert!(fx.vm.join("a.r1.ovl").is_file());
    assert_eq!(hash_file(&fx.vm.join("b.qcow2")), b);
    assert_eq!(hash_file(&fx.vm.join("c.raw")), c);
    let dom = vsnap(&fx.state, &["domain", "dumpxml", "d"])
        .ok()
        .stdout
        .clone();
    assert!(
        dom.contains(&format!("{}", fx.vm.join("a.r1.ovl").display())),
        "{dom}"
    );
}

#[test]
fn domainsnapshot_documents_vsnap_cannot_do_exactly_are_refused_untouched() {
    let fx = Fx::new("dsx-refuse");
    let vm = fx.vm.display().to_string();
    let cases: &[(&str, &[&str], &[&str])] = &[
        // A memory file is a memory snapshot (not "no memory"): a shut-off
        // guest has no memory to save.
        ("<memory file='VM/m.mem'/>", &[], &["memory snapshot needs a running guest"]),
        ("<memory snapshot='no' file='VM/m.mem'/>", &[], &["contradicts itself"]),
        ("<memory file='m.mem'/>", &[], &["must be absolute"]),
        ("<disks><disk name='vda'/><disk name='vda' snapshot='no'/></disks>", &[], &["named twice"]),
        (
            "<disks><disk name='vda' snapshot='internal'/><disk name='VM/a.qcow2' snapshot='no'/></disks>",
            &[],
            &["disk vda is named twice", "a.qcow2"],
        ),
        ("<disks><disk name='vda' snapshot='internal'><source file='VM/x.qcow2'/></disk></disks>", &[], &["needs snapshot='external'"]),
        ("<disks><disk name='vda'><source file='x.qcow2'/></disk></disks>", &[], &["must be an absolute path"]),
        ("<disks><disk name='vda'><driver type='raw'/><source file='VM/x.raw'/></disk></disks>", &[], &["cannot be raw"]),
        ("<disks><disk name='vda'><driver type='qed'/><source file='VM/x.qed'/></disk></disks>", &[], &["qcow2 overlays only"]),
        ("<disks><disk name='vda' snapshot='manual'/></disks>", &[], &["snapshot='manual'"]),
        (
            "<disks><disk name='vda' snapshot='external' type='network'><source protocol='rbd' name='p/a'><host name='h'/></source></disk></disks>",
            &[],
            &["vda", "type='network'", "snapshot='no'"],
        ),
        ("<disks><disk name='vda'><source file='VM/x.qcow2' startupPolicy='optional'/></disk></disks>", &[], &["startupPolicy"]),
    ];
    for (i, (inner, extra, words)) in cases.iter().enumerate() {
        let x = fx.doc(&format!("n{i}"), inner);
        let words: Vec<String> = words
            .iter()
            .map(|w| w.replace("VM/", &format!("{vm}/")))
            .collect();
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        fx.refused(&x, extra, &words);
    }
}

/// `<disk type='block'><source dev=...>` (libvirt's way to put an overlay
/// onto a block device the caller made; a loop device here): planned as
/// an overlay written onto the device, done for real (the image's data
/// reads through it, the domain's disk becomes the device, the saved head
/// of the device is gone after the pivot); a symlink to the device and a
/// regular file are refused untouched.
#[test]
fn an_overlay_onto_a_block_device() {
    let fx = Fx::new("dsx-block");
    let devfile = fx.root.join("dev.img");
    std::fs::write(&devfile, vec![0xabu8; 8 << 20]).unwrap();
    let dev = LoopDev::attach(&devfile);
    let a = fx.vm.join("a.qcow2");
    qemu_io_write(&a, "qcow2", 0, 64 * 1024, 0x44);
    let block = |name: &str, dev: &str| {
        fx.doc(
            name,
            &format!(
                "<disks><disk name='vda' snapshot='external' type='block'><driver type='qcow2'/>\
                 <source dev='{dev}'/></disk><disk name='vdb' snapshot='no'/><disk name='vdc' snapshot='no'/></disks>"
            ),
        )
    };
    let link = fx.root.join("dev-link");
    std::os::unix::fs::symlink(dev.path(), &link).unwrap();
    fx.refused(&block("l1", p(&link)), &[], &[p(&link), "symlink"]);
    let plain = fx.root.join("plain.img");
    std::fs::write(&plain, vec![0u8; 8 << 20]).unwrap();
    fx.refused(
        &block("f1", p(&plain)),
        &[],
        &[p(&plain), "not a block device"],
    );

    // A device a QEMU process holds (here qemu-io, which takes QEMU's image
    // locks as qemu-system does) is refused.
    let mut holder = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &dev.0])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let held = || {
        let f = std::fs::File::open(dev.path()).unwrap();
        vsnap_steps::qcow2::qemu_holds_file(&f).unwrap()
    };
    // Bounded poll until qemu-io has opened the device (never a fixed wait).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !held() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(held(), "qemu-io took its locks");
    fx.refused(
        &block("q1", &dev.0),
        &[],
        &[&dev.0, "in use by a QEMU process"],
    );
    drop(holder.stdin.take());
    holder.wait().unwrap();

    let x = block("b1", dev.path().to_str().unwrap());
    let v = vsnap(
        &fx.state,
        &[
            "--json",
            "snapshot",
            "create",
            "d",
            "--xml",
            p(&x),
            "--dry-run",
        ],
    )
    .ok()
    .json();
    let steps = v["steps"].to_string();
    let heads = format!("remove {}", fx.state.join("devhead.").display());
    assert!(
        steps.contains(&format!("write overlay onto block device {}", dev.0))
            && steps.contains(&heads),
        "{steps}"
    );
    let no_heads = || {
        !std::fs::read_dir(&fx.state).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("devhead.")
        })
    };
    vsnap(&fx.state, &["snapshot", "create", "d", "--xml", p(&x)]).ok();
    assert!(qemu_io_reads(dev.path(), "qcow2", 0, 64 * 1024, 0x44));
    assert!(no_heads(), "the device's saved head goes after the pivot");
    let dom = vsnap(&fx.state, &["domain", "dumpxml", "d"])
        .ok()
        .stdout
        .clone();
    assert!(
        dom.contains(&format!("<source dev='{}'/>", dev.0)) && dom.contains("type='block'"),
        "{dom}"
    );
    vsnap(&fx.state, &["domain", "check", "d"]).ok();
}
