//! Plans checked as a whole before anything is journaled: no two steps
//! create one path, every path a plan creates fits the filesystem's limits
//! (255-byte names), temporaries always fit; backing loops and over-deep
//! chains are found at once; disks whose image is a block device; a step
//! after the pivot that fails is "needs attention" (exit 1), not "nothing
//! changed". Real `vsnap`, real `qemu-img`, real loop devices.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// The fixture: [`Work`] (a state directory and `vm/`), with this file's
/// own methods.
type Fx = Work;

impl Work {
    /// Define domain `name` with `disks` (target, source, driver type).
    fn define(&self, name: &str, disks: &[(&str, &Path, &str)]) -> Out {
        let disks: Vec<_> = disks
            .iter()
            .map(|&(t, src, ty)| (t, src, Some(ty)))
            .collect();
        let f = self.work.join(format!("{name}.xml"));
        std::fs::write(&f, domain_xml(name, &disks)).unwrap();
        let out = self.vsnap(&["domain", "define", p(&f)]);
        std::fs::remove_file(&f).unwrap();
        out
    }
}

// ------------------------------------------------- item: one path, two steps

#[test]
fn two_disks_on_one_default_overlay_are_refused() {
    let fx = Fx::new("pp-same-default");
    let a = fx.work.join("data.img");
    let b = fx.work.join("data.raw");
    qemu_img_create(&a, "raw", MIB);
    qemu_img_create(&b, "raw", MIB);
    qemu_io_write(&a, "raw", 0, 4096, 0x11);
    qemu_io_write(&b, "raw", 0, 4096, 0x22);
    fx.define("d", &[("vda", &a, "raw"), ("vdb", &b, "raw")])
        .ok();
    // Both default to data.s1.qcow2: refused, naming both disks.
    let o = fx.refused(
        &[&a, &b],
        &["snapshot", "create", "d", "s1"],
        &["vda", "vdb", "data.s1.qcow2", "--disk"],
    );
    assert!(!fx.work.join("data.s1.qcow2").exists(), "{o:?}");
    // --dry-run too
    fx.refused(
        &[&a, &b],
        &["snapshot", "create", "d", "s1", "--dry-run"],
        &["data.s1.qcow2"],
    );
    // one explicit PATH twice, spelled two ways
    let o1 = fx.work.join("o.qcow2");
    let o2 = format!("{}/./o.qcow2", fx.work.display());
    fx.refused(
        &[&a, &b],
        &[
            "snapshot",
            "create",
            "d",
            "s1",
            "--disk",
            &format!("vda=external:{}", o1.display()),
            "--disk",
            &format!("vdb=external:{o2}"),
        ],
        &["vda", "vdb", "o.qcow2"],
    );
    // each its own file: fine, and each disk on its own overlay
    fx.vsnap(&[
        "snapshot",
        "create",
        "d",
        "s1",
        "--disk",
        &format!("vdb=external:{}", fx.work.join("data-b.s1.qcow2").display()),
    ])
    .ok();
    assert!(qemu_io_reads(
        &fx.work.join("data.s1.qcow2"),
        "qcow2",
        0,
        4096,
        0x11
    ));
    assert!(qemu_io_reads(
        &fx.work.join("data-b.s1.qcow2"),
        "qcow2",
        0,
        4096,
        0x22
    ));
    fx.vsnap(&["domain", "check", "d"]).ok();
}

// ------------------------------------------------- item: long names

/// An image whose name is 240 bytes (`<234 x>.qcow2`).
fn long_image(fx: &Fx) -> PathBuf {
    let img = fx.work.join(format!("{}.qcow2", "x".repeat(234)));
    qemu_img_create(&img, "qcow2", MIB);
    qemu_io_write(&img, "qcow2", 0, 4096, 0x33);
    img
}

#[test]
fn a_snapshot_file_name_over_255_bytes_is_refused_before_anything() {
    let fx = Fx::new("pp-long-file");
    let img = long_image(&fx);
    let name = "n".repeat(30); // <234 x>.<30 n>.qcow2: 271 bytes
    for kind in ["external", "copy"] {
        fx.refused(
            &[&img],
            &["vol", "snapshot", "create", p(&img), &name, "--kind", kind],
            &["255", "shorter"],
        );
    }
    let d = fx.work.join(format!("{}.img", "y".repeat(236)));
    qemu_img_create(&d, "raw", MIB);
    fx.define("dl", &[("vda", &d, "raw")]).ok();
    fx.refused(&[&img], &["snapshot", "create", "dl", &name], &["255"]);
    fx.vsnap(&["vol", "check", p(&img)]).ok();
}

#[test]
fn temporary_names_fit_when_only_they_would_be_too_long() {
    let fx = Fx::new("pp-long-temp");
    let img = long_image(&fx);
    // <234 x>.s1.qcow2 is 243 bytes (fits); `.vsnap-<tag>.<240>.tmp` would not
    fx.vsnap(&[
        "vol",
        "snapshot",
        "create",
        p(&img),
        "s1",
        "--kind",
        "external",
    ])
    .ok();
    qemu_io_write(&img, "qcow2", 0, 4096, 0x44);
    fx.vsnap(&[
        "vol",
        "snapshot",
        "create",
        p(&img),
        "s2",
        "--kind",
        "external",
    ])
    .ok();
    fx.vsnap(&["vol", "snapshot", "revert", p(&img), "s1"]).ok();
    assert!(qemu_io_reads(&img, "qcow2", 0, 4096, 0x33));
    fx.vsnap(&["vol", "check", p(&img)]).ok();
    // internal revert works on a clone at a temporary name too
    let img2 = fx.work.join(format!("{}.qcow2", "z".repeat(234)));
    qemu_img_create(&img2, "qcow2", MIB);
    qemu_io_write(&img2, "qcow2", 0, 4096, 0x55);
    fx.vsnap(&["vol", "snapshot", "create", p(&img2), "i1"])
        .ok();
    qemu_io_write(&img2, "qcow2", 0, 4096, 0x66);
    fx.vsnap(&["vol", "snapshot", "revert", p(&img2), "i1"])
        .ok();
    assert!(qemu_io_reads(&img2, "qcow2", 0, 4096, 0x55));
    fx.vsnap(&["vol", "check", p(&img2)]).ok();
    let plans = fx.vsnap(&["--json", "plan", "list"]).ok().json();
    for pl in plans.as_array().unwrap() {
        assert_eq!(pl["outcome"], "Committed", "{pl}");
    }
}

// ------------------------------------------------- item: after the pivot

/// `chattr +i` on a file (unlink fails with EPERM, even for root), undone on drop.
struct Immutable(PathBuf);

impl Immutable {
    fn set(p: &Path) -> Immutable {
        Out::from_command("chattr", &["+i", p.to_str().unwrap()]).ok();
        Immutable(p.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .args(["-i", self.0.to_str().unwrap()])
            .status();
    }
}

#[test]
fn a_step_after_the_pivot_that_fails_exits_1_saying_the_change_is_committed() {
    let fx = Fx::new("pp-after-pivot");
    let img = fx.work.join("r.img");
    qemu_img_create(&img, "raw", MIB);
    fx.vsnap(&["vol", "snapshot", "create", p(&img), "s1", "--kind", "copy"])
        .ok();
    let file = fx.work.join("r.s1.img");
    assert!(file.exists());
    // A real failure after the pivot: the delete's catalog write (the
    // pivot) commits, then removing the file fails (immutable: EPERM).
    let guard = Immutable::set(&file);
    let o = fx.vsnap(&["vol", "snapshot", "delete", p(&img), "s1"]);
    o.expect_code(1).stderr_has(&[
        "committed",
        "remove",
        "r.s1.img",
        "Operation not permitted",
        "left to do",
        "vsnap-recover",
    ]);
    assert!(!o.stderr.contains("nothing changed"), "{o:?}");
    // the plan is left unfinished for recovery (`plan list` does not recover)
    let plans = fx.vsnap(&["--json", "plan", "list"]).ok().json();
    let last = plans.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["outcome"], "UNFINISHED", "{last}");
    // once the cause is gone, vsnap-recover finishes it
    drop(guard);
    let r = vsnap_recover(&fx.state, &[]);
    r.ok().stdout_has(&["committed"]);
    assert!(!file.exists(), "recovery removed the freed file");
    fx.vsnap(&["vol", "check", p(&img)]).ok();
    let names = fx
        .vsnap(&["--json", "vol", "snapshot", "list", p(&img)])
        .ok()
        .json();
    assert_eq!(names.as_array().unwrap().len(), 0, "{names}");
    let plans = fx.vsnap(&["--json", "plan", "list"]).ok().json();
    let last = plans.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["outcome"], "Committed", "{last}");

    // When recovery's own tries fail too, the plan ends needs-attention
    // (exit 1 from vsnap-recover), naming what to do by hand.
    fx.vsnap(&["vol", "snapshot", "create", p(&img), "s2", "--kind", "copy"])
        .ok();
    let file = fx.work.join("r.s2.img");
    let _guard = Immutable::set(&file);
    fx.vsnap(&["vol", "snapshot", "delete", p(&img), "s2"])
        .expect_code(1)
        .stderr_has(&["committed", "vsnap-recover"]);
    vsnap_recover(&fx.state, &[])
        .expect_code(1)
        .stdout_has(&["needs-attention", "by hand"]);
}

// ------------------------------------------------- item: loops and deep chains

/// `cmd` of `program` (`qemu-img`), which must succeed.
fn must(program: &str, args: &[&str]) {
    Out::from_command(program, args).ok();
}

/// `vsnap --state-dir STATE args`, killed (and the test failed) after 30 s.
fn vsnap_deadline(fx: &Fx, args: &[&str]) -> Out {
    let mut a = vec!["--state-dir", p(&fx.state)];
    a.extend_from_slice(args);
    let (out, took) = run_with_deadline(VSNAP, &a, std::time::Duration::from_secs(30));
    assert!(took.as_secs() < 10, "{args:?} took {took:?}");
    out
}

#[test]
fn a_backing_loop_is_found_at_once_and_named() {
    let fx = Fx::new("pp-loop");
    let a = fx.work.join("a.qcow2");
    let b = fx.work.join("b.qcow2");
    qemu_img_create(&b, "qcow2", MIB);
    qemu_img_create_overlay(&a, p(&b));
    // a -> b -> a
    must(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            p(&a),
            "-F",
            "qcow2",
            p(&b),
        ],
    );
    let o = vsnap_deadline(&fx, &["vol", "check", p(&a)]);
    o.expect_code(1)
        .stdout_has(&["backing-file loop", p(&a), p(&b)]);
    assert!(!o.stdout.contains("in use"), "{o:?}");
    for kind in ["external", "internal", "copy"] {
        let before = fx.world(&[]);
        let o = vsnap_deadline(
            &fx,
            &["vol", "snapshot", "create", p(&a), "s1", "--kind", kind],
        );
        o.expect_code(2)
            .stderr_has(&["backing-file loop", p(&a), p(&b), "rebase -u"]);
        assert!(!o.stderr.contains("in use"), "{o:?}");
        assert_unchanged(&before, &fx.world(&[]));
    }
    // a domain on it is refused when defined
    fx.define("lp", &[("vda", &a, "qcow2")])
        .expect_code(2)
        .stderr_has(&["vda", "backing-file loop"]);
}

#[test]
fn a_chain_deeper_than_the_limit_is_refused_at_once() {
    let fx = Fx::new("pp-deep");
    // 257 files: base plus 256 overlays (`-u`: qemu-img does not open the
    // chain while making it)
    let mut prev = fx.work.join("c0.qcow2");
    qemu_img_create(&prev, "qcow2", MIB);
    for i in 1..=256 {
        let next = fx.work.join(format!("c{i}.qcow2"));
        must(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                p(&prev),
                "-F",
                "qcow2",
                p(&next),
                "1M",
            ],
        );
        prev = next;
    }
    let top = prev;
    let o = vsnap_deadline(&fx, &["vol", "check", p(&top)]);
    o.expect_code(1).stdout_has(&["longer than 256"]);
    let before = fx.world(&[]);
    vsnap_deadline(
        &fx,
        &[
            "vol",
            "snapshot",
            "create",
            p(&top),
            "s1",
            "--kind",
            "external",
        ],
    )
    .expect_code(2)
    .stderr_has(&["longer than 256", p(&top)]);
    assert_unchanged(&before, &fx.world(&[]));
    // one file less (256): fine to use, but an external snapshot would
    // make it 257
    let c255 = fx.work.join("c255.qcow2");
    vsnap_deadline(
        &fx,
        &[
            "vol",
            "snapshot",
            "create",
            p(&c255),
            "e1",
            "--kind",
            "external",
        ],
    )
    .expect_code(2)
    .stderr_has(&["longer than 256"]);
    vsnap_deadline(&fx, &["vol", "snapshot", "create", p(&c255), "i1"]).ok();
}

// ------------------------------------------------- item: block-device disks

#[test]
fn a_block_device_disk_gets_no_overlay_in_dev() {
    let fx = Fx::new("pp-blockdev");
    let backing = fx.work.join("blk.raw");
    qemu_img_create(&backing, "raw", 4 * MIB);
    qemu_io_write(&backing, "raw", 0, 4096, 0x77);
    let dev = LoopDev::attach(&backing);
    let xml = fx.work.join("bd.xml");
    std::fs::write(
        &xml,
        format!(
            "<domain><name>bd</name><devices><disk type='block' device='disk'>\
             <driver name='qemu' type='raw'/><source dev='{}'/><target dev='vda'/>\
             </disk></devices></domain>",
            dev.0
        ),
    )
    .unwrap();
    fx.vsnap(&["domain", "define", p(&xml)]).ok();
    std::fs::remove_file(&xml).unwrap();
    let default = format!("{}.s1.qcow2", dev.0);
    fx.refused(
        &[],
        &["snapshot", "create", "bd", "s1"],
        &["vda", &dev.0, "block device", "--disk vda=external:PATH"],
    );
    assert!(
        !Path::new(&default).exists(),
        "an overlay in /dev: {default}"
    );
    fx.refused(
        &[],
        &["snapshot", "create", "bd", "s1", "--disk", "vda=reflink"],
        &["vda", "block device"],
    );
    // an explicit PATH on a filesystem is accepted
    let ov = fx.work.join("bd.s1.qcow2");
    fx.vsnap(&[
        "snapshot",
        "create",
        "bd",
        "s1",
        "--disk",
        &format!("vda=external:{}", ov.display()),
    ])
    .ok();
    assert!(qemu_io_reads(&ov, "qcow2", 0, 4096, 0x77));
    fx.vsnap(&["domain", "check", "bd"]).ok();
    fx.vsnap(&["domain", "dumpxml", "bd"]).ok();
}

// ------------------------------------------------- item: smaller ones

#[test]
fn a_file_named_like_a_temporary_is_refused() {
    let fx = Fx::new("pp-tempname");
    let img = fx.work.join("r.img");
    qemu_img_create(&img, "raw", MIB);
    let f = fx.work.join(".vsnap-mine.tmp");
    fx.refused(
        &[&img],
        &[
            "vol",
            "snapshot",
            "create",
            p(&img),
            "s1",
            "--kind",
            "copy",
            "--file",
            p(&f),
        ],
        &[".vsnap-mine.tmp", "temporary", "another name"],
    );
    fx.define("t", &[("vda", &img, "raw")]).ok();
    fx.refused(
        &[&img],
        &[
            "snapshot",
            "create",
            "t",
            "s1",
            "--disk",
            &format!("vda=external:{}", f.display()),
        ],
        &[".vsnap-mine.tmp", "temporary"],
    );
    fx.vsnap(&["vol", "check", p(&img)]).ok();
}

#[test]
fn domain_define_refuses_a_directory_dev_null_and_one_image_for_two_disks() {
    let fx = Fx::new("pp-define");
    let img = fx.work.join("a.qcow2");
    qemu_img_create(&img, "qcow2", MIB);
    let dir = fx.work.join("adir");
    std::fs::create_dir(&dir).unwrap();
    let before = fx.world(&[]);
    fx.define("d1", &[("vda", &dir, "raw")])
        .expect_code(2)
        .stderr_has(&["vda", "directory", "image file"]);
    fx.define("d2", &[("vda", Path::new("/dev/null"), "raw")])
        .expect_code(2)
        .stderr_has(&["vda", "/dev/null", "character device"]);
    fx.define("d3", &[("vda", &img, "qcow2"), ("vdb", &img, "qcow2")])
        .expect_code(2)
        .stderr_has(&["vda", "vdb", "one image for two disks"]);
    // the same image under another name (a hard link)
    let other = fx.work.join("b.qcow2");
    std::fs::hard_link(&img, &other).unwrap();
    let before2 = fx.world(&[]);
    fx.define("d4", &[("vda", &img, "qcow2"), ("vdb", &other, "qcow2")])
        .expect_code(2)
        .stderr_has(&["one image for two disks"]);
    assert_unchanged(&before2, &fx.world(&[]));
    std::fs::remove_file(&other).unwrap();
    assert_unchanged(&before, &fx.world(&[]));
    let list = fx.vsnap(&["--json", "domain", "list"]).ok().json();
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
}
