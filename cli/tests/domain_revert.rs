//! `vsnap snapshot revert` of shut-off domains (DESIGN.md 10.3): every
//! snapshot shape vsnap makes offline (external overlays, internal
//! snapshots in place and, once frozen by a later external snapshot,
//! through a clone), the tree branching after a revert, the discarded
//! branch's files removed and nothing a snapshot needs written to, and
//! the refusals that touch nothing. Real `vsnap`, `qemu-img`, `qemu-io`;
//! the data is checked with `qemu-io` reads of the active images.

mod common;

use common::*;
use std::path::{Path, PathBuf};

type Fx = Work;

const OFF: u64 = 64 * 1024;
const LEN: u64 = 64 * 1024;

impl Work {
    fn image(&self, name: &str, format: &str) -> PathBuf {
        let f = self.work.join(name);
        qemu_img_create(&f, format, MIB);
        f
    }

    #[track_caller]
    fn define(&self, name: &str, disks: &[(&str, &Path, Option<&str>)]) {
        let f = self.work.join(format!("{name}.xml"));
        std::fs::write(&f, domain_xml(name, disks)).unwrap();
        self.vsnap(&["domain", "define", p(&f)]).ok();
        std::fs::remove_file(&f).unwrap();
    }

    /// The domain's disks now: (target, active image, format).
    fn disks(&self, dom: &str) -> Vec<(String, PathBuf, String)> {
        let v = self.vsnap(&["--json", "domain", "info", dom]).ok().json();
        v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["target"].as_str().unwrap().to_string(),
                    PathBuf::from(d["source"].as_str().unwrap()),
                    d["format"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Write `pattern` into every disk's active image (the guest writing).
    fn write_all(&self, dom: &str, pattern: u8) {
        for (_, img, fmt) in self.disks(dom) {
            qemu_io_write(&img, &fmt, OFF, LEN, pattern);
        }
    }

    /// Every disk's active image reads `pattern`.
    #[track_caller]
    fn reads(&self, dom: &str, pattern: u8) {
        for (t, img, fmt) in self.disks(dom) {
            assert!(
                qemu_io_reads(&img, &fmt, OFF, LEN, pattern),
                "disk {t} ({}) does not read 0x{pattern:02x}",
                img.display()
            );
        }
    }

    #[track_caller]
    fn check(&self, dom: &str) {
        let out = self.vsnap(&["domain", "check", dom]);
        assert_eq!(out.code, 0, "domain check: {}{}", out.stdout, out.stderr);
    }

    fn revert(&self, dom: &str, snap: &str) -> serde_json::Value {
        self.vsnap(&["--json", "snapshot", "revert", dom, snap])
            .ok()
            .json()
    }

    fn current(&self, dom: &str) -> String {
        self.vsnap(&["snapshot", "current", dom])
            .ok()
            .stdout
            .trim()
            .to_string()
    }
}

#[test]
fn external_snapshots_revert_onto_new_overlays_and_the_tree_branches() {
    let fx = Fx::new("rv-ext");
    let a = fx.image("a.qcow2", "qcow2");
    let b = fx.image("b.raw", "raw");
    fx.define("d", &[("vda", &a, Some("qcow2")), ("vdb", &b, Some("raw"))]);
    fx.write_all("d", 0x11);
    fx.vsnap(&["snapshot", "create", "d", "s1", "--disk-only"])
        .ok();
    fx.write_all("d", 0x22);
    let s1_overlays: Vec<PathBuf> = fx.disks("d").into_iter().map(|x| x.1).collect();
    // A dry run plans and changes nothing.
    let before = fx.world(&[&a, &b]);
    let dry = fx
        .vsnap(&["--json", "snapshot", "revert", "d", "s1", "--dry-run"])
        .ok()
        .json();
    assert_eq!(dry["dry_run"], true);
    let steps = dry["steps"].to_string();
    assert!(
        steps.contains("create overlay") && steps.contains("write the catalog"),
        "{dry}"
    );
    assert_unchanged(&before, &fx.world(&[&a, &b]));

    let r = fx.revert("d", "s1");
    assert_eq!(r["state"], "shutoff", "{r}");
    fx.reads("d", 0x11);
    // The discarded overlays are gone; the snapshot's files untouched.
    for o in &s1_overlays {
        assert!(!o.exists(), "{} kept", o.display());
    }
    assert_eq!(r["removed"].as_array().unwrap().len(), 2, "{r}");
    assert!(qemu_io_reads(&a, "qcow2", OFF, LEN, 0x11));
    assert!(qemu_io_reads(&b, "raw", OFF, LEN, 0x11));
    for (_, img, fmt) in fx.disks("d") {
        assert_eq!(fmt, "qcow2");
        assert!(
            img.to_string_lossy().contains(".s1.revert-"),
            "{}",
            img.display()
        );
    }
    assert_eq!(fx.current("d"), "s1");
    fx.check("d");

    // The next snapshot is s1's child; reverting to it and back works.
    fx.write_all("d", 0x33);
    fx.vsnap(&["snapshot", "create", "d", "s2", "--disk-only"])
        .ok();
    fx.write_all("d", 0x44);
    let parent = fx
        .vsnap(&["snapshot", "parent", "d", "s2"])
        .ok()
        .stdout
        .clone();
    assert_eq!(parent.trim(), "s1");
    fx.revert("d", "s2");
    fx.reads("d", 0x33);
    fx.check("d");
    fx.revert("d", "s1");
    fx.reads("d", 0x11);
    fx.check("d");
    fx.revert("d", "s2");
    fx.reads("d", 0x33);
    fx.check("d");
}

#[test]
fn internal_snapshots_revert_in_place_or_through_a_clone_once_frozen() {
    let fx = Fx::new("rv-int");
    let a = fx.image("a.qcow2", "qcow2");
    fx.define("d", &[("vda", &a, Some("qcow2"))]);
    fx.write_all("d", 0x11);
    fx.vsnap(&["snapshot", "create", "d", "s1"]).ok();
    fx.write_all("d", 0x22);
    // In place: no new file, the image's active state is s1's.
    let r = fx.revert("d", "s1");
    assert!(r["removed"].as_array().unwrap().is_empty(), "{r}");
    assert_eq!(fx.disks("d")[0].1, a);
    fx.reads("d", 0x11);
    fx.check("d");
    // An external snapshot freezes a.qcow2 (s1 inside it); revert to s1
    // must not write to it: a clone with s1 applied becomes the disk.
    fx.write_all("d", 0x33);
    fx.vsnap(&["snapshot", "create", "d", "s2", "--disk-only"])
        .ok();
    fx.write_all("d", 0x44);
    let frozen = hash_file(&a);
    let r = fx.revert("d", "s1");
    assert_eq!(hash_file(&a), frozen, "the frozen image was written to");
    let now = fx.disks("d")[0].1.clone();
    assert!(
        now.to_string_lossy().contains("a.s1.revert-"),
        "{}",
        now.display()
    );
    fx.reads("d", 0x11);
    assert_eq!(r["removed"].as_array().unwrap().len(), 1, "{r}");
    fx.check("d");
    // s2 is still whole: revert to it reads what it froze.
    fx.revert("d", "s2");
    fx.reads("d", 0x33);
    fx.check("d");
}

#[test]
fn a_revert_that_cannot_be_done_exactly_is_refused_and_touches_nothing() {
    let fx = Fx::new("rv-refuse");
    let a = fx.image("a.qcow2", "qcow2");
    fx.define("d", &[("vda", &a, Some("qcow2"))]);
    fx.vsnap(&["snapshot", "create", "d", "s1"]).ok();
    fx.refused(
        &[&a],
        &["snapshot", "revert", "d", "nope"],
        &["no snapshot named \"nope\""],
    );
    // --running starts QEMU after the revert: this domain has no launch spec.
    fx.refused(
        &[&a],
        &["snapshot", "revert", "d", "s1", "--running"],
        &["no launch spec", "--launch"],
    );
    // The snapshot removed behind vsnap's back: refused, nothing touched.
    Out::from_command("qemu-img", &["snapshot", "-d", "s1", p(&a)]).ok();
    fx.refused(
        &[&a],
        &["snapshot", "revert", "d", "s1"],
        &[
            "does not hold internal snapshot \"s1\"",
            "vsnap domain check d",
        ],
    );
    let j = fx
        .vsnap(&["--json", "snapshot", "revert", "d", "s1"])
        .expect_code(2)
        .json();
    assert_eq!(j["kind"], "unsafe", "{j}");
}
