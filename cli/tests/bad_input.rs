//! Bad input through the real `vsnap` binary. Every case checks
//! (a) the exit code, 2;
//! (b) that stderr names what is wrong and what to do (key words);
//! (c) that nothing changed: the files (names, sizes, mtimes, modes,
//!     content hashes) of every directory involved, the catalog
//!     (`vol snapshot list --json` of every image involved) and the journal
//!     (`plan list --json`: no new plan at all).
//!
//! Every refusal here is made at plan time, before a plan is begun, except
//! one: an external snapshot on a nearly full filesystem, where only the
//! step that writes the overlay can find out; there a new *rolled-back*
//! plan is accepted (files and catalog must still be as they were).
//!
//! Needs root (mounts), qemu-img, qemu-io, qemu-system-x86_64, mkfs.ext4.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// A state directory, a work directory `vm/` with `a.qcow2` (4 MiB, data,
/// one internal snapshot `s1` made through the CLI) and `r.img` (raw,
/// 4 MiB, data, no snapshot), and a directory `xml/` for documents.
struct Fx {
    state: PathBuf,
    work: PathBuf,
    xml: PathBuf,
    qcow: PathBuf,
    raw: PathBuf,
    tmp: TempDir,
}

impl Fx {
    fn new(tag: &str) -> Fx {
        let tmp = TempDir::new(tag);
        let state = tmp.join("state");
        let work = tmp.join("vm");
        let xml = tmp.join("xml");
        std::fs::create_dir(&work).unwrap();
        std::fs::create_dir(&xml).unwrap();
        let qcow = work.join("a.qcow2");
        let raw = work.join("r.img");
        qemu_img_create(&qcow, "qcow2", 4 * MIB);
        qemu_io_write(&qcow, "qcow2", 0, 64 * 1024, 0x11);
        qemu_img_create(&raw, "raw", 4 * MIB);
        qemu_io_write(&raw, "raw", 0, 64 * 1024, 0x22);
        vsnap(&state, &["vol", "snapshot", "create", p(&qcow), "s1"]).ok();
        Fx {
            state,
            work,
            xml,
            qcow,
            raw,
            tmp,
        }
    }

    fn world(&self) -> World {
        world(
            &self.state,
            &[&self.work, &self.xml],
            &[&self.qcow, &self.raw],
        )
    }

    fn vsnap(&self, args: &[&str]) -> Out {
        vsnap(&self.state, args)
    }

    /// Run `args`: exit 2, stderr has `words`, nothing changed.
    #[track_caller]
    fn refused(&self, args: &[&str], words: &[&str]) -> Out {
        refused_untouched(
            &self.state,
            &[&self.work, &self.xml],
            &[&self.qcow, &self.raw],
            args,
            words,
        )
    }

    fn xml_doc(&self, name: &str, text: &str) -> PathBuf {
        let f = self.xml.join(name);
        std::fs::write(&f, text).unwrap();
        f
    }

    /// `create a.qcow2 --xml DOC`: refused, naming the document and `words`.
    #[track_caller]
    fn xml_refused(&self, doc: &str, words: &[&str]) -> Out {
        let f = self.xml_doc("doc.xml", doc);
        let mut w = vec![p(&f)];
        w.extend_from_slice(words);
        self.refused(
            &["vol", "snapshot", "create", p(&self.qcow), "--xml", p(&f)],
            &w,
        )
    }
}

// ------------------------------------------------------------------- XML

/// Broken XML: mismatched and unclosed tags, not XML at all, empty.
#[test]
fn malformed_xml_is_refused() {
    let fx = Fx::new("badxml");
    for doc in [
        "<volsnapshot><name>x</nam></volsnapshot>",
        "<volsnapshot><name>x",
        "<volsnapshot><name>x</name><kind>copy</volsnapshot>",
        "this is not XML",
        "",
        "<domainsnapshot><name>x</name></domainsnapshot>",
    ] {
        let out = fx.xml_refused(doc, &["malformed XML"]);
        assert!(
            out.stderr.len() > "malformed XML".len() + 20,
            "the error says what is malformed: {}",
            out.stderr
        );
    }
}

/// `<volsnapshot><name>x</name>` — the root element is never closed.
#[test]
fn malformed_xml_unclosed_root_is_refused() {
    let fx = Fx::new("unclosedroot");
    fx.xml_refused(
        "<volsnapshot><name>x</name>",
        &["malformed XML", "volsnapshot"],
    );
    fx.xml_refused(
        "<volsnapshot>\n  <name>x</name>\n  <kind>internal</kind>\n",
        &["malformed XML", "volsnapshot"],
    );
}

/// An unknown element: the error names it and lists what is allowed.
#[test]
fn unknown_element_is_named() {
    let fx = Fx::new("unknownel");
    fx.xml_refused(
        "<volsnapshot><name>x</name><colour>red</colour></volsnapshot>",
        &["unknown element <colour>", "allowed"],
    );
    fx.xml_refused(
        "<volsnapshot><name>x</name><parent><nmae>s1</nmae></parent></volsnapshot>",
        &["unknown element <nmae>"],
    );
    fx.xml_refused(
        "<volsnapshot><name>x</name><kind>snapshotty</kind></volsnapshot>",
        &[
            "<kind>snapshotty</kind>",
            "internal, external, reflink or copy",
        ],
    );
}

// ----------------------------------------------------------------- names

#[test]
fn duplicate_snapshot_name_is_refused() {
    let fx = Fx::new("dup");
    fx.refused(
        &["vol", "snapshot", "create", p(&fx.qcow), "s1"],
        &["already has a snapshot named \"s1\"", "choose another name"],
    );
    let doc = fx.xml_doc("dup.xml", "<volsnapshot><name>s1</name></volsnapshot>");
    fx.refused(
        &["vol", "snapshot", "create", p(&fx.qcow), "--xml", p(&doc)],
        &["already has a snapshot named \"s1\""],
    );
    // An internal snapshot someone made behind vsnap's back.
    qemu_img_snapshot_create(&fx.qcow, "manual");
    fx.refused(
        &["vol", "snapshot", "create", p(&fx.qcow), "manual"],
        &[
            "already holds an internal snapshot named \"manual\"",
            "choose another name",
        ],
    );
}

/// Names that would escape or confuse a directory: (name, what the error says).
const BAD_NAMES: &[(&str, &str)] = &[
    ("a/b", "contains '/'"),
    ("..", "contains '..'"),
    ("x..y", "contains '..'"),
    ("bell\x07", "control character"),
    ("tab\there", "control character"),
    ("new\nline", "control character"),
    ("esc\x1b[31m", "control character"),
    ("", "empty"),
    (".hidden", "starts with '.'"),
    ("-x", "starts with '.' or '-'"),
];

/// Every bad name is refused at plan time (exit 2, nothing changed), for
/// every kind of snapshot, and the error names the reason. `-x` is passed
/// after `--` (else it is an option).
#[test]
fn bad_names_are_refused() {
    let fx = Fx::new("badnames");
    for (name, why) in BAD_NAMES {
        fx.refused(
            &["vol", "snapshot", "create", p(&fx.qcow), "--", name],
            &["invalid snapshot name", why],
        );
        fx.refused(
            &[
                "vol",
                "snapshot",
                "create",
                p(&fx.raw),
                "--kind",
                "copy",
                "--",
                name,
            ],
            &["invalid snapshot name", why],
        );
        fx.refused(
            &[
                "vol",
                "snapshot",
                "create",
                p(&fx.raw),
                "--kind",
                "external",
                "--",
                name,
            ],
            &["invalid snapshot name", why],
        );
    }
}

/// The same errors say what to do (DESIGN: every error names what is wrong
/// and what to do).
#[test]
fn bad_name_errors_say_what_to_do() {
    let fx = Fx::new("badnamehint");
    for (name, _) in BAD_NAMES {
        let out = fx.refused(
            &["vol", "snapshot", "create", p(&fx.qcow), "--", name],
            &["invalid snapshot name"],
        );
        assert!(
            out.stderr.contains("choose"),
            "the error for name {name:?} does not say what to do:\n{}",
            out.stderr
        );
    }
}

/// Names given in XML: control characters as character references are
/// refused like on the command line.
#[test]
fn bad_names_in_xml_are_refused() {
    let fx = Fx::new("badxmlnames");
    for (name, why) in [
        ("a&#7;b", "control character"),
        ("a/b", "'/'"),
        ("..", "'..'"),
        (".x", "starts with '.'"),
    ] {
        let doc = fx.xml_doc(
            "doc.xml",
            &format!("<volsnapshot><name>{name}</name></volsnapshot>"),
        );
        fx.refused(
            &["vol", "snapshot", "create", p(&fx.qcow), "--xml", p(&doc)],
            &["invalid snapshot name", why],
        );
    }
}

/// NUL cannot be passed in argv. Through XML (`&#0;`) the XML parser
/// already refuses it (XML 1.0 forbids the character); the name check
/// itself is tested directly on `validate_name`.
#[test]
fn nul_in_a_name_is_refused() {
    let fx = Fx::new("nul");
    let out = fx.xml_refused(
        "<volsnapshot><name>a&#0;b</name></volsnapshot>",
        &["malformed XML"],
    );
    assert!(
        out.stderr.contains("0x0") || out.stderr.contains("NUL"),
        "the error names the NUL character: {}",
        out.stderr
    );
    let e = vsnap_engine::validate_name("a\0b").expect_err("NUL accepted");
    assert!(e.to_string().contains("NUL"), "{e}");
    assert!(vsnap_engine::validate_name("\0").is_err());
}

// -------------------------------------------------------------- the image

#[test]
fn missing_image_is_refused() {
    let fx = Fx::new("missing");
    let gone = fx.work.join("nothere.qcow2");
    let g = p(&gone);
    let words = &["nothere.qcow2", "does not exist", "existing disk image"];
    fx.refused(&["vol", "snapshot", "create", g, "s1"], words);
    fx.refused(
        &["vol", "snapshot", "create", g, "s1", "--kind", "external"],
        words,
    );
    fx.refused(&["vol", "snapshot", "revert", g, "s1"], words);
    fx.refused(&["vol", "snapshot", "delete", g, "s1"], words);
    fx.refused(&["vol", "snapshot", "list", g], words);
    // A directory is not an image either.
    fx.refused(
        &["vol", "snapshot", "create", p(&fx.xml), "s1"],
        &["not a regular file"],
    );
}

#[test]
fn internal_snapshot_of_a_raw_image_is_refused() {
    let fx = Fx::new("intraw");
    fx.refused(
        &[
            "vol",
            "snapshot",
            "create",
            p(&fx.raw),
            "s1",
            "--kind",
            "internal",
        ],
        &["internal snapshots need a qcow2 image", "--kind external"],
    );
}

#[test]
fn reflink_where_the_filesystem_cannot_is_refused() {
    let fx = Fx::new("noreflink");
    fx.refused(
        &[
            "vol",
            "snapshot",
            "create",
            p(&fx.raw),
            "s1",
            "--kind",
            "reflink",
        ],
        &["cannot make reflinks", "--kind copy"],
    );
}

#[test]
fn unknown_snapshot_is_refused() {
    let fx = Fx::new("unknownsnap");
    let words = &["no snapshot named \"nope\"", "vsnap vol snapshot list"];
    fx.refused(&["vol", "snapshot", "revert", p(&fx.qcow), "nope"], words);
    fx.refused(&["vol", "snapshot", "delete", p(&fx.qcow), "nope"], words);
    fx.refused(
        &[
            "vol",
            "snapshot",
            "delete",
            p(&fx.qcow),
            "nope",
            "--children",
        ],
        words,
    );
    fx.refused(&["vol", "snapshot", "info", p(&fx.qcow), "nope"], words);
    fx.refused(&["vol", "snapshot", "dumpxml", p(&fx.qcow), "nope"], words);
    // An image vsnap never saw has no snapshot either.
    fx.refused(
        &["vol", "snapshot", "revert", p(&fx.raw), "s1"],
        &["no snapshot named \"s1\""],
    );
}

/// `--file` (or the default file name) that already exists is never
/// overwritten, whatever it is.
#[test]
fn existing_file_is_never_overwritten() {
    let fx = Fx::new("exists");
    let taken = fx.work.join("taken.bin");
    std::fs::write(&taken, b"precious data that must survive").unwrap();
    let fresh = fx.work.join("b.qcow2");
    qemu_img_create(&fresh, "qcow2", MIB);
    let words = &[
        "already exists",
        "never overwrites",
        "choose another --file",
    ];
    fx.refused(
        &[
            "vol",
            "snapshot",
            "create",
            p(&fresh),
            "e1",
            "--kind",
            "external",
            "--file",
            p(&taken),
        ],
        words,
    );
    fx.refused(
        &[
            "vol",
            "snapshot",
            "create",
            p(&fx.raw),
            "c1",
            "--kind",
            "copy",
            "--file",
            p(&taken),
        ],
        words,
    );
    // The image itself as --file.
    fx.refused(
        &[
            "vol",
            "snapshot",
            "create",
            p(&fresh),
            "e1",
            "--kind",
            "external",
            "--file",
            p(&fresh),
        ],
        words,
    );
    fx.refused(
        &[
            "vol",
            "snapshot",
            "create",
            p(&fx.raw),
            "c1",
            "--kind",
            "copy",
            "--file",
            p(&fx.qcow),
        ],
        words,
    );
    // A dangling symlink: never followed, its target never created.
    let target = fx.tmp.join("outside-target");
    let link = fx.work.join("link.img");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    fx.refused(
        &[
            "vol",
            "snapshot",
            "create",
            p(&fx.raw),
            "c1",
            "--kind",
            "copy",
            "--file",
            p(&link),
        ],
        &["already exists"],
    );
    assert!(!target.exists(), "a symlink planted at --file was followed");
    // The default file name taken: <stem>.<name>.<ext>.
    std::fs::write(fx.work.join("r.c2.img"), b"not vsnap's").unwrap();
    fx.refused(
        &[
            "vol",
            "snapshot",
            "create",
            p(&fx.raw),
            "c2",
            "--kind",
            "copy",
        ],
        &["r.c2.img", "already exists"],
    );
    std::fs::write(fx.work.join("b.e2.qcow2"), b"not vsnap's").unwrap();
    fx.refused(
        &[
            "vol",
            "snapshot",
            "create",
            p(&fresh),
            "e2",
            "--kind",
            "external",
        ],
        &["b.e2.qcow2", "already exists"],
    );
}

// -------------------------------------------------- the filesystem refuses

/// A read-only directory (a read-only bind mount: root ignores mode bits).
/// Every operation that would write there is refused before a plan is begun.
#[test]
fn read_only_directory_is_refused() {
    let fx = Fx::new("readonly");
    let src = fx.tmp.join("src");
    std::fs::create_dir(&src).unwrap();
    for (f, fmt) in [
        ("i.qcow2", "qcow2"),
        ("e.qcow2", "qcow2"),
        ("c.img", "raw"),
        ("n.qcow2", "qcow2"),
        ("n.img", "raw"),
    ] {
        qemu_img_create(&src.join(f), fmt, 4 * MIB);
        qemu_io_write(&src.join(f), fmt, 0, 64 * 1024, 0x33);
    }
    let ro = Mount::bind(&src, &fx.tmp.join("ro"));
    let at = |f: &str| ro.mnt.join(f);
    let (i, e, c, nq, nr) = (
        at("i.qcow2"),
        at("e.qcow2"),
        at("c.img"),
        at("n.qcow2"),
        at("n.img"),
    );
    fx.vsnap(&[
        "vol",
        "snapshot",
        "create",
        p(&i),
        "s1",
        "--kind",
        "internal",
    ])
    .ok();
    fx.vsnap(&[
        "vol",
        "snapshot",
        "create",
        p(&e),
        "s1",
        "--kind",
        "external",
    ])
    .ok();
    fx.vsnap(&["vol", "snapshot", "create", p(&c), "s1", "--kind", "copy"])
        .ok();
    ro.remount_ro_bind();
    assert!(
        std::fs::write(ro.mnt.join("probe"), b"x").is_err(),
        "the bind mount is read-only"
    );

    let images: Vec<&Path> = vec![&i, &e, &c, &nq, &nr, &fx.raw];
    let check = |args: &[&str]| {
        let before = world(&fx.state, &[&src, &fx.work], &images);
        let out = fx.vsnap(args);
        out.expect_code(2).stderr_has(&["not writable", "--file"]);
        assert!(
            out.stderr.contains(p(&ro.mnt)),
            "the error names the directory: {}",
            out.stderr
        );
        assert_unchanged(&before, &world(&fx.state, &[&src, &fx.work], &images));
    };
    check(&["vol", "snapshot", "create", p(&i), "s2"]);
    check(&["vol", "snapshot", "create", p(&e), "s2"]);
    check(&["vol", "snapshot", "create", p(&c), "s2"]);
    check(&[
        "vol",
        "snapshot",
        "create",
        p(&nq),
        "s1",
        "--kind",
        "internal",
    ]);
    check(&[
        "vol",
        "snapshot",
        "create",
        p(&nq),
        "s1",
        "--kind",
        "external",
    ]);
    check(&["vol", "snapshot", "create", p(&nr), "s1", "--kind", "copy"]);
    check(&[
        "vol",
        "snapshot",
        "create",
        p(&nr),
        "s1",
        "--kind",
        "external",
    ]);
    for img in [&i, &e, &c] {
        check(&["vol", "snapshot", "revert", p(img), "s1"]);
        check(&["vol", "snapshot", "delete", p(img), "s1"]);
        check(&["vol", "snapshot", "delete", p(img), "s1", "--children"]);
    }
    // A writable image, --file into the read-only directory.
    check(&[
        "vol",
        "snapshot",
        "create",
        p(&fx.raw),
        "s1",
        "--kind",
        "copy",
        "--file",
        p(&ro.mnt.join("r.copy")),
    ]);
    drop(ro);
}

/// A full filesystem: a copy that cannot fit fails before anything changes,
/// with a "not enough space" message (create, and revert of a copy snapshot).
#[test]
fn full_filesystem_copy_is_refused_before_anything_changes() {
    let fx = Fx::new("fullcopy");
    let mnt = Mount::ext4(&fx.tmp.join("fs.img"), &fx.tmp.join("mnt"), "16M");
    let vm = mnt.mnt.join("vm");
    std::fs::create_dir(&vm).unwrap();
    let big = vm.join("big.img");
    qemu_img_create(&big, "raw", 10 * MIB);
    qemu_io_write(&big, "raw", 0, 10 * MIB, 0x44);
    let images: Vec<&Path> = vec![&big];
    let check = |args: &[&str]| {
        let before = world(&fx.state, &[&mnt.mnt], &images);
        fx.vsnap(args).expect_code(2).stderr_has(&[
            "not enough space",
            "bytes needed",
            "available",
            "free space or choose another --file",
        ]);
        assert_unchanged(&before, &world(&fx.state, &[&mnt.mnt], &images));
    };
    check(&["vol", "snapshot", "create", p(&big), "s1", "--kind", "copy"]);
    // Without --kind a raw image on ext4 gets a copy: the same refusal.
    check(&["vol", "snapshot", "create", p(&big), "s1"]);

    // A revert of a copy snapshot needs room for one more copy.
    std::fs::remove_file(&big).unwrap();
    let small = vm.join("small.img");
    qemu_img_create(&small, "raw", 5 * MIB);
    qemu_io_write(&small, "raw", 0, 5 * MIB, 0x55);
    fx.vsnap(&[
        "vol",
        "snapshot",
        "create",
        p(&small),
        "s1",
        "--kind",
        "copy",
    ])
    .ok();
    let images: Vec<&Path> = vec![&small];
    refused_untouched(
        &fx.state,
        &[&mnt.mnt],
        &images,
        &["vol", "snapshot", "revert", p(&small), "s1"],
        &["not enough space", "free space"],
    );
}

/// A qcow2 image (4 MiB virtual, 1 MiB of data) on a 16 MiB ext4 that is
/// then filled up completely. Returns (the mount, the image).
fn image_on_a_full_filesystem(fx: &Fx) -> (Mount, PathBuf) {
    let mnt = Mount::ext4(&fx.tmp.join("fs.img"), &fx.tmp.join("mnt"), "16M");
    let vm = mnt.mnt.join("vm");
    std::fs::create_dir(&vm).unwrap();
    let img = vm.join("d.qcow2");
    qemu_img_create(&img, "qcow2", 4 * MIB);
    qemu_io_write(&img, "qcow2", 0, MIB, 0x66);
    fill(&vm, "filler");
    (mnt, img)
}

/// A nearly full filesystem and an external snapshot: only the step that
/// writes the overlay can find out that there is no room. Whatever
/// happens, nothing is left behind: either it succeeded and `vol check` is
/// clean, or it failed (exit 2, saying the filesystem is full), was rolled
/// back (a rolled-back plan is accepted here), and files and catalog are
/// as they were.
#[test]
fn nearly_full_filesystem_external_leaves_nothing_behind() {
    let fx = Fx::new("nearlyfullext");
    let (mnt, img) = image_on_a_full_filesystem(&fx);
    let before = world(&fx.state, &[&mnt.mnt], &[&img]);
    let out = fx.vsnap(&[
        "vol",
        "snapshot",
        "create",
        p(&img),
        "s1",
        "--kind",
        "external",
    ]);
    if out.code != 0 {
        out.expect_code(2);
        assert!(
            out.stderr.contains("No space left") || out.stderr.contains("not enough space"),
            "the error says the filesystem is full: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("rolled back") || out.stderr.contains("free space"),
            "{}",
            out.stderr
        );
        assert_unchanged_but_rolled_back_plans(&before, &world(&fx.state, &[&mnt.mnt], &[&img]));
    }
    fx.vsnap(&["vol", "check", p(&img)]).ok();
    assert!(
        qemu_io_reads(&img, "qcow2", 0, MIB, 0x66),
        "the image keeps its data"
    );
}

/// The same for an internal snapshot: `qemu-img snapshot -c` runs out of
/// room inside the image. vsnap then says "the plan was rolled back,
/// nothing changed": the image file must indeed be unchanged.
#[test]
fn nearly_full_filesystem_internal_leaves_the_image_untouched() {
    let fx = Fx::new("nearlyfullint");
    let (mnt, img) = image_on_a_full_filesystem(&fx);
    let before = world(&fx.state, &[&mnt.mnt], &[&img]);
    let out = fx.vsnap(&[
        "vol",
        "snapshot",
        "create",
        p(&img),
        "s1",
        "--kind",
        "internal",
    ]);
    if out.code != 0 {
        let after = world(&fx.state, &[&mnt.mnt], &[&img]);
        out.expect_code(2);
        assert!(
            out.stderr.contains("No space left") || out.stderr.contains("not enough space"),
            "the error says the filesystem is full: {}",
            out.stderr
        );
        fx.vsnap(&["vol", "check", p(&img)]).ok();
        assert!(
            qemu_io_reads(&img, "qcow2", 0, MIB, 0x66),
            "the image keeps its data"
        );
        assert_unchanged_but_rolled_back_plans(&before, &after);
    } else {
        fx.vsnap(&["vol", "check", p(&img)]).ok();
    }
}

/// A dry run, and a create refused at plan time, make no entry in the
/// image's directory, not even one removed again (the directory's mtime
/// is unchanged): plan time is read-only, and a process killed then must
/// leave nothing that no plan records.
#[test]
fn dry_run_and_refusal_make_no_entry_in_the_directory() {
    let fx = Fx::new("dirmtime");
    fx.vsnap(&[
        "vol",
        "snapshot",
        "create",
        p(&fx.raw),
        "c1",
        "--kind",
        "copy",
    ])
    .ok();
    let fresh = fx.work.join("fresh.img");
    qemu_img_create(&fresh, "raw", MIB);
    let images: Vec<&Path> = vec![&fx.qcow, &fx.raw, &fresh];
    let cases: &[&[&str]] = &[
        &["vol", "snapshot", "create", p(&fx.qcow), "s2", "--dry-run"],
        &["vol", "snapshot", "create", p(&fx.raw), "c2", "--dry-run"],
        // No --kind on a raw image without snapshots: the kind depends on
        // whether the filesystem can reflink.
        &["vol", "snapshot", "create", p(&fresh), "f1", "--dry-run"],
        &["vol", "snapshot", "revert", p(&fx.qcow), "s1", "--dry-run"],
        &["vol", "snapshot", "revert", p(&fx.raw), "c1", "--dry-run"],
        &["vol", "snapshot", "delete", p(&fx.raw), "c1", "--dry-run"],
    ];
    let mut touched = Vec::new();
    for args in cases {
        let before = world(&fx.state, &[&fx.work], &images);
        fx.vsnap(args)
            .ok()
            .stdout_has(&["dry run: nothing was changed"]);
        let after = world(&fx.state, &[&fx.work], &images);
        assert_unchanged(&before, &after);
        if before.files != after.files {
            touched.push(format!("vsnap {}", args.join(" ")));
        }
    }
    // Refused after the kind was chosen: --file in a directory that does not exist.
    let bad_file = fx.tmp.join("no/such/dir/f1.img");
    let args = [
        "vol",
        "snapshot",
        "create",
        p(&fresh),
        "f1",
        "--file",
        p(&bad_file),
    ];
    let before = world(&fx.state, &[&fx.work], &images);
    fx.vsnap(&args)
        .expect_code(2)
        .stderr_has(&["--file", "not usable"]);
    let after = world(&fx.state, &[&fx.work], &images);
    assert_unchanged(&before, &after);
    if before.files != after.files {
        touched.push(format!("vsnap {}", args.join(" ")));
    }
    assert!(
        touched.is_empty(),
        "these made (and removed) an entry in {}:\n{}",
        fx.work.display(),
        touched.join("\n")
    );
}

// ------------------------------------------------------ someone else holds it

/// An image a running QEMU holds: every operation is refused, saying the
/// image is in use.
#[test]
fn image_in_use_by_a_running_qemu_is_refused() {
    let fx = Fx::new("inuse");
    let qemu = Qemu::start(&fx.qcow);
    let words = &["in use by another process", "stop it"];
    fx.refused(&["vol", "snapshot", "create", p(&fx.qcow), "s2"], words);
    fx.refused(
        &["vol", "snapshot", "create", p(&fx.qcow), "s2", "--dry-run"],
        words,
    );
    fx.refused(&["vol", "snapshot", "revert", p(&fx.qcow), "s1"], words);
    fx.refused(&["vol", "snapshot", "delete", p(&fx.qcow), "s1"], words);
    drop(qemu);
    fx.vsnap(&["vol", "snapshot", "create", p(&fx.qcow), "s2"])
        .ok();
}

/// A state directory another process holds: the CLI fails fast (no
/// waiting for the lock), naming the holder's pid, for every command that
/// opens it, and vsnap-recover too.
#[test]
fn locked_state_directory_fails_fast_naming_the_holder() {
    let fx = Fx::new("locked");
    let before = fx.world();
    // The holder: an engine opened by this test process, kept open by a
    // helper thread until told to let go.
    let (tx_held, rx_held) = std::sync::mpsc::channel();
    let (tx_release, rx_release) = std::sync::mpsc::channel::<()>();
    let state = fx.state.clone();
    let holder = std::thread::spawn(move || {
        let (engine, _) =
            vsnap_engine::Engine::open(&state).expect("the holder opens the state directory");
        tx_held.send(()).unwrap();
        let _ = rx_release.recv();
        drop(engine);
    });
    rx_held.recv().unwrap();
    let pid = std::process::id().to_string();
    let st = p(&fx.state).to_string();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            VSNAP,
            vec![
                "--state-dir",
                &st,
                "vol",
                "snapshot",
                "create",
                p(&fx.qcow),
                "s2",
            ],
        ),
        (
            VSNAP,
            vec![
                "--state-dir",
                &st,
                "vol",
                "snapshot",
                "revert",
                p(&fx.qcow),
                "s1",
            ],
        ),
        (
            VSNAP,
            vec!["--state-dir", &st, "vol", "snapshot", "list", p(&fx.qcow)],
        ),
        (VSNAP, vec!["--state-dir", &st, "vol", "check", p(&fx.qcow)]),
        (VSNAP, vec!["--state-dir", &st, "plan", "list"]),
        (VSNAP_RECOVER, vec!["--state-dir", &st]),
    ];
    for (prog, args) in &cases {
        let (out, took) = run_with_deadline(prog, args, std::time::Duration::from_secs(30));
        out.expect_code(2).stderr_has(&[
            &format!("locked by process {pid}"),
            "wait for it to finish or stop it",
        ]);
        assert!(
            took < std::time::Duration::from_secs(5),
            "{prog} {args:?} took {took:?} to give up"
        );
    }
    tx_release.send(()).unwrap();
    holder.join().unwrap();
    assert_unchanged(&before, &fx.world());
}
